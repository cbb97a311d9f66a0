"""``sigil export``: send a session to an OpenTelemetry backend as traces (OTLP).

Thin on purpose (STYLE.md): check the flags, merge them with the settings
(contract 9: flags > ``OTEL_EXPORTER_OTLP_*`` > config.yaml ``export.*``), then
stream the session's log through the native parser into
:class:`sigil.telemetry.otlp.SpanBuilder` and the SDK's OTLP exporter in
batches, so memory stays bounded whatever the session's size. The IDs are
derived from the session, so running it again (say, after a live export lost
spans) completes the same traces instead of adding new ones.

Exit codes: 0 sent, 1 the collector could not be reached or refused the spans
(or the OpenTelemetry extra is missing), 2 bad usage (a malformed endpoint or
header, an unknown session).
"""

from __future__ import annotations

import sys

import click

from sigil.interfaces.cli.errors import OneLineCommand, UsageFailure


def _usage(message: str) -> click.ClickException:
    return UsageFailure(message)


@click.command(
    "export", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--session", "-s", "session_id", metavar="ID", required=False, help="The session to export."
)
@click.option(
    "--endpoint",
    "-e",
    metavar="URL",
    help="OTLP endpoint, e.g. http://collector:4318 (default:"
    " OTEL_EXPORTER_OTLP_ENDPOINT, then export.otlp_endpoint).",
)
@click.option(
    "--protocol",
    "-p",
    metavar="http/protobuf|grpc",
    help="OTLP transport (default: OTEL_EXPORTER_OTLP_PROTOCOL, then"
    " export.otlp_protocol, http/protobuf).",
)
@click.option(
    "--header",
    "-H",
    "header_args",
    metavar="KEY=VALUE",
    multiple=True,
    help="Request header, repeatable; added to OTEL_EXPORTER_OTLP_HEADERS and export.otlp_headers.",
)
@click.option(
    "--log-path",
    "-l",
    metavar="DIR",
    help="Base log directory (default: logging.path, ~/.sigil/logs).",
)
@click.option(
    "--timeout",
    "timeout_text",
    metavar="SECONDS",
    default="10",
    show_default=True,
    help="Time allowed per request, retries included.",
)
def export(
    session_id: str | None,
    endpoint: str | None,
    protocol: str | None,
    header_args: tuple[str, ...],
    log_path: str | None,
    timeout_text: str,
) -> None:
    """Export a session as OpenTelemetry traces: one per run, a span per step attempt.

    Uses the OpenTelemetry GenAI semantic conventions; needs the optional
    packages: pip install 'sigil[otlp]'.
    """
    from sigil.core.paths import InvalidSessionId, validate_session_id
    from sigil.telemetry import otlp

    # Flags first, so that a typo is reported before any file or socket is touched.
    if not session_id:
        raise _usage("missing --session ID: the session to export")
    try:
        validate_session_id(session_id)
    except InvalidSessionId as exc:
        raise _usage(str(exc)) from None
    extra_headers: dict[str, str] = {}
    for text in header_args:
        try:
            key, value = otlp.parse_header(text)
        except ValueError as exc:
            raise _usage(f"--header: {exc}") from None
        extra_headers[key] = value
    try:
        timeout = float(timeout_text)
    except ValueError:
        timeout = float("nan")
    if not 0 < timeout < float("inf"):
        raise _usage(f"--timeout must be a number of seconds above 0, got {timeout_text!r}")
    if protocol is not None and protocol not in otlp.PROTOCOLS:
        raise _usage(f"--protocol must be http/protobuf or grpc, got {protocol!r}")

    from sigil.core.config import load_settings
    from sigil.core.paths import (
        NotARegularFile,
        check_log_file,
        resolve_log_path,
        rotated_segments,
        session_dir,
    )

    # ConfigError is a one-line usage error (exit 2) naming the key and its source.
    settings = load_settings(
        {
            "logging.path": log_path,
            "export.otlp_endpoint": endpoint,
            "export.otlp_protocol": protocol,
        }
    )
    chosen_protocol = settings.export.otlp_protocol
    if chosen_protocol not in otlp.PROTOCOLS:
        raise _usage(
            f"OTLP protocol {chosen_protocol!r} ({settings.source('export.otlp_protocol')})"
            " is not supported: use http/protobuf or grpc"
        )
    if not settings.export.otlp_endpoint:
        raise _usage(
            "no OTLP endpoint: pass --endpoint URL, or set OTEL_EXPORTER_OTLP_ENDPOINT"
            " or export.otlp_endpoint in config.yaml"
        )
    try:
        url = otlp.traces_endpoint(settings.export.otlp_endpoint, chosen_protocol)
    except ValueError as exc:
        raise _usage(str(exc)) from None
    headers = {**settings.export.otlp_headers, **extra_headers}

    base = resolve_log_path(settings.logging.path)
    directory = session_dir(session_id, base)
    try:
        check_log_file(directory / "execution.jsonl")
    except NotARegularFile as exc:
        raise _usage(str(exc)) from None
    if not (directory / "execution.jsonl").is_file() and not rotated_segments(directory):
        raise _usage(f"no session {session_id!r} in {base} (sigil sessions lists them)")

    try:
        otlp.require_otlp(chosen_protocol)
    except otlp.OtlpUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    try:
        otlp.check_reachable(url, timeout=min(timeout, 5.0))
    except ConnectionError as exc:
        raise click.ClickException(f"{exc} ({url})") from None

    export = otlp.export_session(
        directory, session_id, url, headers, chosen_protocol, timeout=timeout
    )
    result, stats, running = export.result, export.read, export.running
    if stats.malformed:
        click.echo(
            f"sigil: warning: skipped {stats.malformed} malformed lines of session"
            f" {session_id} (their tokens are not in the export)",
            err=True,
        )
    if running:
        click.echo(
            f"sigil: note: session {session_id} is still running; export it again when it"
            " ends to complete its last trace",
            err=True,
        )
    if not result.ok:
        raise click.ClickException(
            f"export to {url} failed: {result.error} ({result.spans_sent} spans sent,"
            f" {result.spans_failed} not sent; the same command resends them)"
        )
    click.echo(
        f"exported session {session_id}: {result.spans_sent} spans in {result.traces}"
        f" traces, {result.tokens} tokens -> {url}"
    )
    sys.stdout.flush()
