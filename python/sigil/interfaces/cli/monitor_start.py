"""``sigil monitor`` after its flags are parsed: check them, load the settings, run.

No click here: :mod:`sigil.interfaces.cli.commands.monitor` (the click command)
calls :func:`start` with the flags it parsed, and so does the entry point for a
plain dashboard command line (:func:`sigil.interfaces.cli.early.run_monitor_without_click`),
so that the dashboard's first frame does not wait for click's import (issue 12).
Bad usage raises :class:`MonitorUsage`, before anything is shown: the command
prints it as one line (exit 2); the entry point falls back to the click command,
which reports it.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from sigil.interfaces.cli.early import MODES as _MODES

__all__ = ["MonitorUsage", "start"]


class MonitorUsage(Exception):
    """Bad usage of ``sigil monitor`` (the command shows it as one line, exit 2)."""


def _fail(message: str) -> MonitorUsage:
    return MonitorUsage(message)


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
    if selection is None or not selection.given:
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


def _refuse_archived(directory: Path) -> None:
    """An archived session (``sigil logs archive``) has ended and no writer may
    start it again: rather than wait for it showing 0 tokens, say where it is."""
    from sigil.core.paths import LOG_FILE_NAME, rotated_segments, session_archives

    if os.path.lexists(directory / LOG_FILE_NAME) or rotated_segments(directory):
        return
    archives = session_archives(directory)
    if archives:
        raise _fail(
            f"session {directory.name!r} is archived ({archives[-1]}): it has ended; "
            f"see it with sigil replay {directory.name} or sigil report session"
        )


def start(
    session_id: str | None,
    mode: str | None,
    refresh_rate: str | None,
    log_path: str | None,
    once: bool,
    follow: bool,
    no_keys: bool,
    show_all: bool = False,
    tail: str | None = None,
    since: str | None = None,
    components: tuple[str, ...] = (),
    event_types: tuple[str, ...] = (),
    errors: bool = False,
    json_events: bool = False,
) -> None:
    """Check the flags, load the settings and run the monitor; exits with its code.

    :class:`MonitorUsage` for bad usage, always before the terminal is touched.
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
    selection = None  # every event, as an empty selection (without importing one)
    if show_all or errors or tail is not None or since is not None or components or event_types:
        selection = _selection(show_all, tail, since, components, event_types, errors)
    if mode is None and selection is not None and selection.given and not json_events:
        mode = "stream"  # the event options list events: the stream does
    if mode is not None:
        _check_event_mode(mode, selection, json_events)

    # The catch-up (one native fold, without the GIL) starts as soon as the log is
    # known and runs while the settings, the monitor and the display are imported
    # (the entry point may have started it already): with --log-path that is now,
    # as a flag wins over every setting (contract 9). The monitor's model takes it over.
    from sigil.interfaces.cli.early import resume_gc, start_monitor_catch_up

    catching_up = bool(log_path) and start_monitor_catch_up(session_id, log_path, once=once)

    from sigil.core.config import ConfigError, load_settings

    try:
        settings = load_settings({"logging.path": log_path, "monitoring.default_mode": mode})
    except ConfigError as exc:
        raise _fail(exc.format_message()) from None
    resolved_log_path = resolve_log_path(settings.logging.path)
    _check_log_path(resolved_log_path)
    if session_id is not None:
        from sigil.core.paths import NotARegularFile, check_log_file, session_dir

        try:
            check_log_file(session_dir(session_id, resolved_log_path) / "execution.jsonl")
        except NotARegularFile as exc:
            raise _fail(str(exc)) from None
        _refuse_archived(session_dir(session_id, resolved_log_path))
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
