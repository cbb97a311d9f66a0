"""``sigil monitor``'s catch-up, started before the command is even parsed.

The catch-up is one native fold of the session's log, run without the GIL
(:func:`sigil.telemetry.session_tailer.start_catch_up`), and on a large session it is
most of ``sigil monitor --once``. So the entry point reads a plain
``sigil monitor`` command line here, with no click, and when the log it names is
already there starts folding it at once: click, the settings, the monitor and
the display are imported while it runs. The monitor's session model takes the
fold over when the command gets there.

Only a guess that costs nothing when wrong: the command still parses and checks
every flag and resolves the log path from the settings; a catch-up started for
another session or path is never taken over (the model checks), and anything
unusual on the command line starts nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = [
    "MODES",
    "pause_gc",
    "resume_gc",
    "run_monitor_without_click",
    "start_monitor_catch_up",
    "start_monitor_catch_up_from_argv",
]

#: ``sigil monitor --mode`` values (the command checks them; so does the guess here,
#: so that a usage error does not wait for a fold started for nothing).
MODES = ("dashboard", "stream", "minimal", "json")
#: The link to the active session's log (spec 7.1; the monitor's CURRENT_LINK_NAME).
_CURRENT_LINK = "current.jsonl"
_VALUE_OPTIONS = {
    "--session": "session",
    "-s": "session",
    "--log-path": "log_path",
    "-l": "log_path",
    "--mode": "mode",
    "-m": "mode",
    "--refresh-rate": "refresh",
    "-r": "refresh",
    "--tail": "tail",
    "--component": "component",
    "--event-type": "event_type",
}
_FLAGS = {
    "--once": "once",
    "--follow": "follow",
    "-f": "follow",
    "--no-keys": "no_keys",
    "--all": "all",
    "--errors": "errors",
    "--json-events": "json_events",
}
#: The options of a plain dashboard command line, run without click (issue 12).
_PLAIN_OPTIONS = frozenset({"session", "log_path", "mode", "refresh", "no_keys", "follow"})
#: The event options (issue 12): they list events, in the stream or json --json-events.
_EVENT_KEYS = ("all", "errors", "tail", "component", "event_type")


def _monitor_options(args: list[str]) -> dict[str, str] | None:
    """The options of ``sigil monitor ...`` if every word is one of its own, else None."""
    if not args or args[0] != "monitor":
        return None
    found: dict[str, str] = {}
    words = iter(args[1:])
    for word in words:
        if word in _FLAGS:
            found[_FLAGS[word]] = ""
            continue
        name, eq, value = word.partition("=")
        if name.startswith("--") and eq and name in _VALUE_OPTIONS:
            found[_VALUE_OPTIONS[name]] = value
        elif word in _VALUE_OPTIONS:
            given = next(words, None)
            if given is None:
                return None
            found[_VALUE_OPTIONS[word]] = given
        elif len(word) > 2 and word[:2] in _VALUE_OPTIONS and not word.startswith("--"):
            found[_VALUE_OPTIONS[word[:2]]] = word[2:]
        else:
            return None  # --help, an unknown option, a typo: click decides
    if "once" in found and "follow" in found:
        return None
    if found.get("mode", MODES[0]) not in MODES:
        return None
    if found.get("mode") == "dashboard" and not _stdout_is_a_terminal():
        return None  # refused by the command
    if not _event_options_fit(found):
        return None  # refused by the command (or too unusual to guess about)
    return found


def _event_options_fit(found: dict[str, str]) -> bool:
    """The event options as the command accepts them (``--since`` is left to it)."""
    mode = found.get("mode")
    if "json_events" in found and mode != "json":
        return False
    if any(key in found for key in _EVENT_KEYS):
        if mode not in (None, "stream") and not (mode == "json" and "json_events" in found):
            return False
        tail = found.get("tail")
        if tail is not None and (not tail.isascii() or not tail.isdigit() or "all" in found):
            return False
        if any(key in found and not found[key].strip() for key in ("component", "event_type")):
            return False
    return True


def _stdout_is_a_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def start_monitor_catch_up_from_argv(args: list[str]) -> None:
    """Start the catch-up of the session a ``sigil monitor`` command line names.

    The log path is the ``--log-path`` flag, else ``$SIGIL_LOG_PATH``, else the
    default one when there is no ``config.yaml`` (which could name another).
    """
    options = _monitor_options(args)
    if options is None:
        return
    log_path = options.get("log_path") or os.environ.get("SIGIL_LOG_PATH") or None
    if log_path is None:
        from sigil.core.paths import sigil_home

        if os.path.lexists(sigil_home() / "config.yaml"):
            return
    start_monitor_catch_up(options.get("session"), log_path, once="once" in options)


def run_monitor_without_click(args: list[str]) -> None:
    """Run a plain ``sigil monitor`` dashboard command line without importing click.

    The common case, ``sigil monitor -s ID`` on a terminal (with ``--log-path``,
    ``--refresh-rate``, ``--follow``, ``--no-keys`` or ``--mode dashboard``), and
    the scripted snapshot ``sigil monitor -s ID --mode json --once`` are run
    here, so that click's import is not on the way to the first frame (issues 12
    and 9). It exits with the monitor's code. Returns, having shown nothing,
    for anything else: another option, ``--help``, a typo, a value the command
    refuses or a bad setting; the click command then parses, checks and reports
    it exactly as always.
    """
    options = _monitor_options(args)
    if options is None or not options.keys() <= _PLAIN_OPTIONS | {"once"}:
        return
    once = "once" in options
    mode = options.get("mode", MODES[0])
    dashboard = mode == MODES[0] and not once and _stdout_is_a_terminal()
    # ``--mode json --once``, the scripted snapshot (issue 9's 1M-entry row).
    json_once = options.get("mode") == "json" and once and "follow" not in options
    if not (dashboard or json_once):
        return
    if "_SIGIL_COMPLETE" in os.environ:  # click's shell completion
        return
    from sigil.interfaces.cli.monitor_start import MonitorUsage, start

    try:
        start(
            options.get("session"),
            options.get("mode"),
            options.get("refresh"),
            options.get("log_path"),
            once=once,
            follow="follow" in options,
            no_keys="no_keys" in options,
        )
    except MonitorUsage:
        return  # before anything was shown: the click command reports it


def start_monitor_catch_up(
    session_id: str | None, log_path: str | os.PathLike[str] | None, *, once: bool
) -> bool:
    """Start folding the log the monitor is about to read, if it is there.

    Without a session, ``--once`` reads the session ``current.jsonl`` links to
    (the live monitor decides more carefully, so it gets nothing here).
    """
    from sigil.telemetry.session_tailer import start_catch_up

    if session_id is None:
        if not once:
            return False
        from sigil.core.paths import resolve_log_path

        target = Path(os.path.realpath(resolve_log_path(log_path) / _CURRENT_LINK))
        session_id = target.parent.name
    # The monitor's model keeps the default 100 recent events, as start_catch_up.
    return start_catch_up(session_id, log_path)


_gc_paused = False


def pause_gc() -> None:
    """Pause the cyclic garbage collector for the start-up.

    Start-up makes objects that live as long as the process (modules, classes,
    functions) and no garbage worth a collection; the collections it would run
    while the modules are imported cost about 7 % of that time, on the
    critical path beside the catch-up. :func:`resume_gc` turns it back on,
    before the monitor runs.
    """
    global _gc_paused
    import gc

    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """Turn the collector back on if :func:`pause_gc` turned it off (idempotent).

    What start-up made is frozen first (:func:`gc.freeze`): with the collector
    off it all sits in the youngest generation, so the first collection after
    this would walk every module, class and function (about 5 ms, on the way to
    the first frame) for no garbage; frozen, no collection visits it again.
    """
    global _gc_paused
    if _gc_paused:
        import gc

        _gc_paused = False
        gc.freeze()
        gc.enable()
