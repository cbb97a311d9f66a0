"""The ``sigil`` command group (the entry point, ``main``, is in ``main.py``).

Subcommands are registered by import path and imported only when invoked (or
when their own ``--help`` is shown), so ``sigil --help`` imports click and
nothing else.
"""

from __future__ import annotations

import importlib
import sys

import click

from sigil import __version__

# name -> (module, attribute, one-line help shown by `sigil --help`)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "orchestrate": (
        "sigil.interfaces.cli.commands.orchestrate",
        "orchestrate",
        "Run the agent pipeline on a task under a token budget.",
    ),
    "monitor": (
        "sigil.interfaces.cli.commands.monitor",
        "monitor",
        "Watch a session's log live (dashboard, stream, minimal, json).",
    ),
    "sessions": (
        "sigil.interfaces.cli.commands.sessions",
        "sessions",
        "List sessions with status, tokens and size.",
    ),
    "top": (
        "sigil.interfaces.cli.commands.top",
        "top",
        "Every live session on this machine in one table, refreshed live.",
    ),
    "logs": (
        "sigil.interfaces.cli.commands.logs",
        "logs",
        "Rotate, archive and clean up session logs.",
    ),
    "report": (
        "sigil.interfaces.cli.commands.report",
        "report",
        "Tokens, runs, failures and latency per day, week, month or group.",
    ),
    "diff": (
        "sigil.interfaces.cli.commands.diff",
        "diff",
        "Compare two sessions or two runs component by component.",
    ),
    "replay": (
        "sigil.interfaces.cli.commands.replay",
        "replay",
        "Play a finished session through the live dashboard at a chosen speed.",
    ),
    "config": (
        "sigil.interfaces.cli.commands.config",
        "config",
        "Show the effective configuration and where it comes from.",
    ),
    "collect": (
        "sigil.interfaces.cli.commands.collect",
        "collect",
        "Receive OpenTelemetry GenAI spans (OTLP/HTTP) into sessions.",
    ),
    "proxy": (
        "sigil.interfaces.cli.commands.proxy",
        "proxy",
        "Serve the OpenAI API, metering every call into a session under a budget.",
    ),
    "run": (
        "sigil.interfaces.cli.commands.run",
        "run",
        "Run a command with its OpenAI calls metered and budgeted in a session.",
    ),
    "export": (
        "sigil.interfaces.cli.commands.export",
        "export",
        "Export a session as an OpenTelemetry trace (OTLP).",
    ),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = _COMMANDS.get(cmd_name)
        if spec is None:
            return None
        module = importlib.import_module(spec[0])
        command: click.Command = getattr(module, spec[1])
        return command

    def invoke(self, ctx: click.Context) -> object:
        # A bad setting (sigil.core.config.ConfigError, a plain ValueError so that
        # the settings load without click) is a usage error: one line, exit 2.
        try:
            return super().invoke(ctx)
        except ValueError as exc:
            config = sys.modules.get("sigil.core.config")
            if config is None or not isinstance(exc, config.ConfigError):
                raise
            from sigil.interfaces.cli.errors import UsageFailure

            raise UsageFailure(exc.format_message()) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Use the static help lines so that `sigil --help` imports no command module.
        rows = [(name, _COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="sigil")
def cli() -> None:
    """sigil: run LLM agent pipelines under a token budget and watch them live.

    Every event of a session is one JSON line in
    ~/.sigil/logs/sessions/<id>/execution.jsonl (or under $SIGIL_HOME);
    `sigil orchestrate` writes it and `sigil monitor` reads it.
    """


def run() -> None:
    """Run the command line (``sigil.interfaces.cli.main.main`` calls this).

    Errors are one line on stderr: click's own usage errors (an unknown
    option, a missing value) print "Usage:" and "Try ..." lines too, so they
    are caught here and shown as ``Error: <what> (see 'sigil CMD --help')``.
    Exit codes: 2 for usage errors, the command's own code otherwise.
    """
    from sigil.interfaces.cli.errors import ExitCode

    try:
        result = cli.main(prog_name="sigil", standalone_mode=False)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"Error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)
    sys.exit(result if isinstance(result, int) else 0)
