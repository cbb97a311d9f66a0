"""``sigil monitor``: watch a session's log live (spec 4.3, the second terminal).

Thin on purpose (STYLE.md): parse and check the flags, merge them with the
settings (contract 9: flags > environment > config.yaml > defaults), then hand
over to :class:`sigil.interfaces.cli.monitor.ExecutionMonitor`. Imports of the
monitor, the settings and rich happen inside the command, so ``sigil --help``
does not pay for them.
"""

from __future__ import annotations

import click

from sigil.interfaces.cli.early import MODES as _MODES
from sigil.interfaces.cli.errors import OneLineCommand, UsageFailure

_EPILOG = """\b
Examples:
  sigil monitor                                  the running session, or the next to start
  sigil monitor -s acme-1                        one session (the dashboard on a terminal)
  sigil monitor -s acme-1 --all                  every event from the start, then follow
  sigil monitor -s acme-1 --tail 50 --component reasoning
  sigil monitor -s acme-1 --since 10m --errors   errors and retries of the last 10 minutes
  sigil monitor -s acme-1 -m json --json-events | jq -c 'select(.type == "event")'
  sigil monitor -s acme-1 -m minimal             one line: tokens, rate, forecast, errors
  sigil monitor -s acme-1 --once                 the state now, then exit

\b
Alerts: the dashboard rings the bell once per budget level crossed (50/80/95 %)
and on a failed step. monitoring.alert_command in config.yaml (or
SIGIL_ALERT_COMMAND) also runs a command then, e.g. notify-send, with the
message as its last argument and SIGIL_ALERT_LEVEL, SIGIL_SESSION_ID and
SIGIL_ALERT_MESSAGE in its environment.
"""


@click.command(
    "monitor",
    cls=OneLineCommand,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_EPILOG,
)
@click.option(
    "--session",
    "-s",
    "session_id",
    metavar="ID",
    help="Session to watch (default: the running one, or the next to start, via current.jsonl).",
)
@click.option(
    "--mode",
    "-m",
    metavar="|".join(_MODES),
    help="Display mode (default: monitoring.default_mode, dashboard).",
)
@click.option(
    "--refresh-rate",
    "-r",
    metavar="SECONDS",
    help="Seconds between display updates (default: 1 / monitoring.refresh_rate_hz).",
)
@click.option(
    "--log-path",
    "-l",
    metavar="DIR",
    help="Base log directory (default: logging.path, ~/.sigil/logs).",
)
@click.option("--once", is_flag=True, help="Print the session's current state once and exit.")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Do not exit when a run ends: wait for the session's next run.",
)
@click.option(
    "--no-keys",
    is_flag=True,
    help="Dashboard: do not read keys (q quit, p pause, ? help, e, c, s, arrows, /).",
)
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Stream: every event from the start of the session, then follow.",
)
@click.option("--tail", metavar="N", help="Stream: the last N events, then follow.")
@click.option(
    "--since",
    metavar="TIME",
    help="Stream: events from TIME (ISO time, or a duration back: 90s, 10m, 2h, 1d).",
)
@click.option(
    "--component",
    "components",
    metavar="NAME",
    multiple=True,
    help="Stream: only this component's events (repeatable).",
)
@click.option(
    "--event-type",
    "event_types",
    metavar="TYPE",
    multiple=True,
    help="Stream: only events of this type, e.g. step_error (repeatable).",
)
@click.option(
    "--errors",
    is_flag=True,
    help="Stream: only error and retry events (step_error, session_error, retry_attempt).",
)
@click.option(
    "--json-events",
    is_flag=True,
    help='Json mode: one object per event too (the event as logged, "type": "event"), '
    "from now on; with --all, --tail or --since the earlier ones first.",
)
def monitor(
    session_id: str | None,
    mode: str | None,
    refresh_rate: str | None,
    log_path: str | None,
    once: bool,
    follow: bool,
    no_keys: bool,
    show_all: bool,
    tail: str | None,
    since: str | None,
    components: tuple[str, ...],
    event_types: tuple[str, ...],
    errors: bool,
    json_events: bool,
) -> None:
    """Watch a session's log live: where the tokens and the time go.

    Exit codes: 0 the run completed, 1 it failed or its writer is gone
    (incomplete), 2 bad usage, 3 its budget ran out, 130 interrupted (SIGINT),
    143 terminated (SIGTERM).

    The event options (--all, --tail, --since, --component, --event-type,
    --errors) select the events listed by --mode stream, or by --mode json with
    --json-events; without --mode they choose the stream. They never change a
    total: every number is the session model's.
    """
    from sigil.interfaces.cli.monitor_start import MonitorUsage, start

    try:
        start(
            session_id,
            mode,
            refresh_rate,
            log_path,
            once,
            follow,
            no_keys,
            show_all,
            tail,
            since,
            components,
            event_types,
            errors,
            json_events,
        )
    except MonitorUsage as exc:
        raise UsageFailure(str(exc)) from None
