"""``sigil monitor``: watch a session's log live (spec 4.3, the second terminal).

Thin on purpose (STYLE.md): parse and check the flags, merge them with the
settings (contract 9: flags > environment > config.yaml > defaults), then hand
over to :class:`sigil.interfaces.cli.monitor.ExecutionMonitor`. Imports of the
monitor, the settings and rich happen inside the command, so ``sigil --help``
does not pay for them.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from sigil.interfaces.cli.early import MODES as _MODES
from sigil.interfaces.cli.errors import OneLineCommand, UsageFailure


def _fail(message: str) -> UsageFailure:
    return UsageFailure(message)


def _check_log_path(path: Path) -> None:
    """Refuse a log path that cannot be read or made.

    A missing one is created (0700; the monitor keeps ``monitor.pid`` there), so
    a path that can never exist is refused now instead of waited on forever.
    """
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return
        probe = probe.parent
    if probe != path and probe.is_dir():
        from sigil.core.file_security import ensure_private_dir

        try:
            ensure_private_dir(path)
        except OSError as exc:
            raise _fail(
                f"log path {str(path)!r} cannot be created: {exc.strerror or exc}"
            ) from None
        return
    if not probe.is_dir():
        raise _fail(f"log path {str(path)!r} is not a directory ({str(probe)!r} is a file)")
    if not os.access(probe, os.R_OK | os.X_OK):
        raise _fail(f"log path {str(path)!r} is not readable: check its permissions")


def _parse_refresh(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _fail(f"--refresh-rate must be a number of seconds, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise _fail(f"--refresh-rate must be above 0 seconds, got {text!r}")
    return value


def _import_ahead(mode: str) -> None:
    """Import now, while the catch-up folds in the background, what the first
    frame needs only after it: otherwise each import waits for the fold.

    The monitor probes the writer's lock after the catch-up (``sigil.core.locks``)
    and the json mode writes with orjson. A module missing here is only
    imported later; one listed here that the display no longer uses costs its
    import for nothing, so the list stays this short.
    """
    names = ["sigil.core.locks"]
    if mode == "json":
        names.append("orjson")
    for name in names:
        importlib.import_module(name)


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


def _selection(
    show_all: bool,
    tail: str | None,
    since: str | None,
    components: tuple[str, ...],
    event_types: tuple[str, ...],
    errors: bool,
) -> Any:
    """The events to list, every value checked (one line, exit 2, when bad)."""
    from sigil.interfaces.cli.event_selection import EventSelection, parse_since, parse_tail

    tail_n = None
    if tail is not None:
        tail_n = parse_tail(tail)
        if tail_n is None:
            raise _fail(f"--tail must be a whole number of events (0 or more), got {tail!r}")
    since_at = None
    if since is not None:
        since_at = parse_since(since)
        if since_at is None:
            raise _fail(
                "--since must be an ISO time (2026-01-11T10:15:00) or a duration "
                f"(90s, 10m, 2h, 1d), got {since!r}"
            )
    if show_all and (tail is not None or since is not None):
        other = "--tail" if tail is not None else "--since"
        raise _fail(f"--all and {other} cannot be used together")
    for name, values in (("--component", components), ("--event-type", event_types)):
        for value in values:
            if not value.strip():
                raise _fail(f"{name} must not be empty")
    return EventSelection(
        all=show_all,
        tail=tail_n,
        since=since_at,
        components=frozenset(components),
        event_types=frozenset(event_types),
        errors=errors,
    )


def _given_event_option(selection: Any) -> str | None:
    """The first event option given, for a message."""
    if not selection.given:
        return None
    if selection.all:
        return "--all"
    if selection.tail is not None:
        return "--tail"
    if selection.since is not None:
        return "--since"
    if selection.components:
        return "--component"
    if selection.event_types:
        return "--event-type"
    return "--errors"


def _check_event_mode(mode: str, selection: Any, json_events: bool) -> None:
    """Event options need a mode that lists events."""
    if json_events and mode != "json":
        raise _fail(f"--json-events needs --mode json, got --mode {mode}")
    option = _given_event_option(selection)
    if option is None or mode == "stream" or (mode == "json" and json_events):
        return
    if mode == "dashboard" and not sys.stdout.isatty():
        return  # off a terminal the dashboard is the stream
    if mode == "json":
        raise _fail(f"{option} selects events: with --mode json add --json-events")
    raise _fail(f"{option} selects events: use --mode stream (or json --json-events), not {mode}")


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
    from sigil.core.paths import InvalidSessionId, resolve_log_path, validate_session_id

    # Check the flags first, so that a typo is reported before any file is touched.
    if session_id is not None:
        try:
            validate_session_id(session_id)
        except InvalidSessionId as exc:
            raise _fail(str(exc)) from None
    if mode is not None and mode not in _MODES:
        raise _fail(f"--mode must be one of {', '.join(_MODES)}, got {mode!r}")
    refresh = _parse_refresh(refresh_rate)
    if once and follow:
        raise _fail("--once and --follow cannot be used together")
    if sys.stdout is None:  # ``sigil monitor >&-``: nowhere to show anything
        raise _fail("stdout is closed: nothing to show the session on (use > /dev/null to discard)")
    if mode == "dashboard" and not sys.stdout.isatty():
        raise _fail("--mode dashboard needs a terminal on stdout; use --mode stream or json")
    selection = _selection(show_all, tail, since, components, event_types, errors)
    if mode is None and selection.given and not json_events:
        mode = "stream"  # the event options list events: the stream does
    if mode is not None:
        _check_event_mode(mode, selection, json_events)

    # The catch-up (one native fold, without the GIL) starts as soon as the log is
    # known and runs while the settings, the monitor and the display are imported
    # (the entry point may have started it already): with --log-path that is now,
    # as a flag wins over every setting (contract 9). The monitor's model takes it over.
    from sigil.interfaces.cli.early import resume_gc, start_monitor_catch_up

    catching_up = bool(log_path) and start_monitor_catch_up(session_id, log_path, once=once)

    from sigil.core.config import load_settings

    settings = load_settings({"logging.path": log_path, "monitoring.default_mode": mode})
    resolved_log_path = resolve_log_path(settings.logging.path)
    _check_log_path(resolved_log_path)
    if session_id is not None:
        from sigil.core.paths import NotARegularFile, check_log_file, session_dir

        try:
            check_log_file(session_dir(session_id, resolved_log_path) / "execution.jsonl")
        except NotARegularFile as exc:
            raise _fail(str(exc)) from None
    if not catching_up:
        start_monitor_catch_up(session_id, resolved_log_path, once=once)
    chosen_mode = mode or settings.monitoring.default_mode
    if chosen_mode not in _MODES:
        raise _fail(
            f"monitoring.default_mode must be one of {', '.join(_MODES)}, got {chosen_mode!r}"
        )
    _check_event_mode(chosen_mode, selection, json_events)
    if refresh is None:
        refresh = 1.0 / float(settings.monitoring.refresh_rate_hz)

    from sigil.interfaces.cli.display import DisplayOptions
    from sigil.interfaces.cli.monitor import ExecutionMonitor

    _import_ahead(chosen_mode)

    runner = ExecutionMonitor(
        session_id,
        log_path=resolved_log_path,
        display_mode=chosen_mode,
        refresh_rate=refresh,
        follow=follow,
        once=once,
        options=DisplayOptions.from_settings(settings),
        default_budget=int(settings.token_budget.default_total),
        keys=not no_keys,
        selection=selection,
        json_events=json_events,
    )
    try:
        if once:
            resume_gc()  # start-up is over (the entry point paused it)
            code = runner.run_once()  # no event loop: most of --once is start-up
        else:
            # The dashboard draws its first frame before asyncio is even imported,
            # and before the collector's first pass over every object start-up made.
            runner.first_frame()
            resume_gc()
            import asyncio

            code = asyncio.run(runner.run())
    except KeyboardInterrupt:  # Ctrl-C before the monitor installed its handler
        code = 130
    finally:
        runner.close()  # what first_frame took, if run() never did (idempotent)
    sys.stdout.flush()
    sys.exit(code)
