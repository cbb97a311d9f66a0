"""``sigil collect``: an OTLP/HTTP receiver that turns GenAI spans into session logs.

Thin on purpose (STYLE.md): check the flags, then serve
(:mod:`sigil.collect.server`). Exit codes: 0 stopped by SIGINT/SIGTERM, 1 the
port could not be bound, the extra is missing, or spans were refused or lost
because a session's log could not be written (said in the last line), 2 bad usage.
"""

from __future__ import annotations

import ipaddress
import sys

import click

from sigil.interfaces.cli.errors import ExitCode, OneLineCommand, UsageFailure

TOKEN_ENV = "SIGIL_COLLECT_TOKEN"
INSTALL_HINT = "sigil collect needs aiohttp: pip install 'sigil[collect]'"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command(
    "collect", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=4318, show_default=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (beyond loopback: needs --token).",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    metavar="T",
    help=f"Token exporters must send, as X-Sigil-Token or Authorization: Bearer (or ${TOKEN_ENV}).",
)
@click.option(
    "--log-path",
    "-l",
    metavar="DIR",
    help="Base log directory (default: logging.path, ~/.sigil/logs).",
)
@click.option(
    "--idle",
    "idle_seconds",
    type=click.FloatRange(0.05, None),
    default=60.0,
    show_default=True,
    help="Seconds without spans after which a session's run is ended and its lock released.",
)
@click.option(
    "--max-body",
    "max_body_mib",
    type=click.FloatRange(0.001, 1024),
    default=16.0,
    show_default=True,
    help="Largest request body, in MiB (after gzip inflation); larger ones get 413.",
)
def collect(
    port: int,
    host: str,
    token: str | None,
    log_path: str | None,
    idle_seconds: float,
    max_body_mib: float,
) -> int:
    """Receive OpenTelemetry GenAI spans (OTLP/HTTP, POST /v1/traces) into sigil sessions.

    Point any OTel-instrumented agent at it
    (OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318): each model call becomes a
    step in the session named by gen_ai.conversation.id (or session.id, or the
    trace), with its input and output tokens, model and latency; watch it with
    `sigil monitor`. A span sent twice is counted once.
    """
    if not host:
        raise UsageFailure("--host must not be empty")
    if not _loopback(host) and not token:
        raise UsageFailure(
            f"--host {host} exposes the collector beyond this machine: give --token T (or set"
            f" {TOKEN_ENV}); exporters send it as X-Sigil-Token or Authorization: Bearer T"
        )
    from sigil.core.config import load_settings

    try:
        # (protobuf bodies are decoded by the extension: no opentelemetry-proto)
        import aiohttp  # noqa: F401
    except ImportError:
        click.echo(f"Error: {INSTALL_HINT}", err=True)
        return ExitCode.FAILED
    settings = load_settings({"logging.path": log_path})
    import asyncio

    from sigil.collect.server import serve
    from sigil.telemetry.pricing import Pricer

    def ready(bound_host: str, bound_port: int) -> None:
        click.echo(f"sigil collect: listening on http://{bound_host}:{bound_port}/v1/traces")
        click.echo(f"sigil collect: writing sessions under {settings.logging.path}")
        sys.stdout.flush()

    try:
        stats = asyncio.run(
            serve(
                host,
                port,
                settings.logging.path,
                max_body_bytes=int(max_body_mib * (1 << 20)),
                idle_seconds=idle_seconds,
                on_ready=ready,
                token=token,
                pricer=Pricer.from_settings(settings),
            )
        )
    except OSError as exc:
        click.echo(f"Error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        return ExitCode.FAILED
    click.echo(
        f"sigil collect: {stats.spans} spans received, {stats.written} written,"
        f" {stats.duplicates} duplicates, {stats.ignored} not GenAI"
        + (f", {stats.archived} rejected (archived sessions)" if stats.archived else "")
        + (f", {stats.unwritten} refused (a log could not be written)" if stats.unwritten else "")
        + (f", {stats.dropped} events dropped by the writers" if stats.dropped else "")
        + " (tokens: sigil monitor or sigil sessions, from each session's model)"
    )
    if stats.failed:
        problems = stats.errors
        click.echo(
            "Error: sigil collect did not write everything it received"
            + (f" ({problems} error(s) above)" if problems else ""),
            err=True,
        )
        return ExitCode.FAILED
    return ExitCode.OK
