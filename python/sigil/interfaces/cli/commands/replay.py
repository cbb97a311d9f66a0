"""``sigil replay SESSION``: play a finished session through the monitor's views.

Thin on purpose (STYLE.md): check the flags, find the session (its directory,
else its newest archive, read in memory), then hand over to
:class:`sigil.interfaces.cli.replay.Player`. Heavy imports happen inside the
command, so ``sigil --help`` does not pay for them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from sigil.interfaces.cli.early import MODES as _MODES
from sigil.interfaces.cli.errors import OneLineCommand, UsageFailure

if TYPE_CHECKING:
    from pathlib import Path

    from sigil.core.config import Settings
    from sigil.interfaces.cli.replay import Timeline
    from sigil.telemetry.archived import Fold
    from sigil.telemetry.log_parser import Ledger, SessionSnapshot

_EPILOG = """\b
Examples:
  sigil replay acme-1                  real time, idle gaps cut to 2 s
  sigil replay acme-1 --speed 10x      ten times faster
  sigil replay acme-1 --speed max      as fast as it folds (the last frame stays)
  sigil replay acme-1 --run 2          the session up to run 2, then run 2 played
  sigil replay acme-1 --paused         step through it event by event (n)
  sigil replay acme-1 -m json --speed max | jq -c 'select(.type == "final")'
  sigil replay acme-1 -m minimal       one line: tokens, rate, forecast, errors

\b
Keys: the live view's (q, p, ?, e, c, s, arrows, /) and n or . to step one
event (it pauses first; p plays on).
"""


@click.command(
    "replay",
    cls=OneLineCommand,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_EPILOG,
)
@click.argument("session_id", metavar="SESSION")
@click.option(
    "--speed",
    default="1x",
    show_default=True,
    metavar="FACTOR",
    help="How much faster than it ran: 10x, 0.5x, or max.",
)
@click.option(
    "--run", "run_number", type=int, metavar="N", help="Play run N (earlier runs folded at once)."
)
@click.option(
    "--max-gap",
    default=2.0,
    show_default=True,
    type=float,
    metavar="SECONDS",
    help="The longest wait between two events, whatever their gap.",
)
@click.option(
    "--mode",
    "-m",
    metavar="|".join(_MODES),
    help="The monitor's display modes and formats (default: monitoring.default_mode, "
    "dashboard; off a terminal the dashboard is the stream).",
)
@click.option(
    "--json-events",
    is_flag=True,
    help='Json mode: one object per event too (the event as logged, "type": "event").',
)
@click.option(
    "--paused", is_flag=True, help="Dashboard: start paused; n steps one event at a time, p plays."
)
@click.option("--no-keys", is_flag=True, help="Do not read keys; exit at the end of the replay.")
@click.option("--log-path", "-l", metavar="DIR", help="Base log directory (default: logging.path).")
def replay(
    session_id: str,
    speed: str,
    run_number: int | None,
    max_gap: float,
    mode: str | None,
    json_events: bool,
    paused: bool,
    no_keys: bool,
    log_path: str | None,
) -> None:
    """Play a finished session (live or archived) through the monitor's views
    at a chosen speed: the dashboard, or --mode stream, minimal or json into a
    pipe (the monitor's formats). Every number is the native session model's,
    fed the session's lines one by one.

    Exit codes: 0 played (or q), 1 the session cannot be read, 2 bad usage
    (an unknown or still running session, a bad --speed), 130 interrupted.
    """
    from pathlib import Path

    from sigil.core.paths import InvalidSessionId, validate_session_id
    from sigil.interfaces.cli.replay import ReplayError, Timeline, parse_speed

    try:
        validate_session_id(session_id)
    except InvalidSessionId as exc:
        raise UsageFailure(str(exc)) from None
    try:
        factor = parse_speed(speed)
    except ValueError:
        raise UsageFailure(
            f"--speed must be a factor above 0 (10x, 0.5x) or max, got {speed!r}"
        ) from None
    if not max_gap >= 0 or max_gap == float("inf"):
        raise UsageFailure(f"--max-gap must be 0 seconds or more, got {max_gap!r}")
    if run_number is not None and run_number < 0:
        raise UsageFailure(f"--run must be a run number (0 or more), got {run_number}")
    if mode is not None:
        _check_mode(mode, "--mode", json_events, paused)
    if sys.stdout is None:  # ``sigil replay x >&-``: no stdout at all
        raise UsageFailure("stdout is closed: nothing to replay to (use > /dev/null to discard)")
    if mode == "dashboard" and not sys.stdout.isatty():
        raise UsageFailure(
            "--mode dashboard needs a terminal on stdout; use --mode stream, minimal or json"
        )

    from sigil.core.config import ConfigError, load_settings
    from sigil.reports.sources import find_session

    try:
        settings = load_settings({"logging.path": log_path, "monitoring.default_mode": mode})
    except ConfigError as exc:
        raise UsageFailure(exc.format_message()) from None
    # The monitor's choice: the flag, else monitoring.default_mode (the dashboard,
    # which is the stream off a terminal).
    mode = mode or settings.monitoring.default_mode
    _check_mode(mode, "monitoring.default_mode", json_events, paused)
    base = Path(settings.logging.path).expanduser()
    source = find_session(base, session_id)
    if source is None:
        raise UsageFailure(f"unknown session {session_id!r} in {str(base)!r}")
    if source.locked:
        raise UsageFailure(
            f"session {session_id!r} is still running: watch it live with "
            f"'sigil monitor --session {session_id}'"
        )
    # The whole session played ends on every view's totals: its ledger's
    # finished runs whose events are gone count too (not played).
    ledger = _ledger_of(Path(source.key), source.archived) if run_number is None else None
    try:
        timeline = Timeline.of(source, empty_ok=ledger is not None and ledger.present)
        first, stop = 0, timeline.count
        final: SessionSnapshot | None = None
        history: Fold | None = None
        if timeline.problem is not None:
            # An archive that breaks: its readable part is played, ending on
            # the native model of it and with its reason, as report and diff
            # count it and say it.
            from sigil.reports.sources import archive_read

            final, problem = archive_read(Path(source.key))
            click.echo(
                f"sigil replay: warning: session {session_id} is unreadable in part:"
                f" {problem or timeline.problem} (its readable part is replayed)",
                err=True,
            )
        if run_number is not None:
            # The runs before it are folded once: the search's fold goes on playing.
            first, stop, history = timeline.run_range(run_number)
    except ReplayError as exc:
        if run_number is not None and "has no run" in str(exc):
            raise UsageFailure(str(exc)) from None
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)

    try:
        code = _play(
            timeline,
            settings,
            factor,
            max_gap,
            first,
            stop,
            mode,
            json_events,
            no_keys,
            run_number,
            paused,
            ledger,
            final if run_number is None else None,
            history,
        )
        sys.stdout.flush()
    except ReplayError as exc:
        # A file that changed under the replay (it was read once, to count its lines).
        click.echo(f"Error: {exc}", err=True)
        code = 1
    except BrokenPipeError:
        # The reader went away (``sigil replay x | head``): done, as the monitor.
        _discard_stdout()
        code = 0
    except OSError as exc:
        # stdout failed (a full disk, a terminal hung up): one line, no traceback.
        _discard_stdout()
        click.echo(f"Error: replay stopped: {exc.strerror or exc}", err=True)
        code = 1
    sys.exit(code)


def _check_mode(mode: str, given_by: str, json_events: bool, paused: bool) -> None:
    """The mode and the flags that need one, as the monitor checks them."""
    if mode not in _MODES:
        raise UsageFailure(f"{given_by} must be one of {', '.join(_MODES)}, got {mode!r}")
    if json_events and mode != "json":
        raise UsageFailure(f"--json-events needs --mode json, got --mode {mode}")
    if paused and mode != "dashboard":
        raise UsageFailure(f"--paused steps through the dashboard, not --mode {mode}")


def _ledger_of(path: Path, archived: bool) -> Ledger | None:
    """The session's ledger (``tokens.json``: a live directory's, or an
    archive's first member), or None when it has none."""
    from sigil.telemetry.log_parser import Ledger

    if not archived:
        return Ledger.read(path / "tokens.json")
    import os
    import tempfile

    from sigil.telemetry.log_rotation import read_archived_summaries

    raw = read_archived_summaries(path).get("tokens.json")
    if raw is None:
        return None
    # The native ledger reads a file (bounded, as every ledger): this one's copy.
    fd, name = tempfile.mkstemp(prefix="sigil-replay-ledger-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
        return Ledger.read(name)
    finally:
        os.unlink(name)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what
    could not be written does not fail (and print) once more."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _play(
    timeline: Timeline,
    settings: Settings,
    speed: float | None,
    max_gap: float,
    first: int,
    stop: int,
    mode: str,
    json_events: bool,
    no_keys: bool,
    run_number: int | None,
    paused: bool,
    ledger: Ledger | None = None,
    final: SessionSnapshot | None = None,
    history: Fold | None = None,
) -> int:
    from sigil.interfaces.cli.display import DashboardRenderer, DisplayOptions, make_renderer
    from sigil.interfaces.cli.keys import TerminalKeys
    from sigil.interfaces.cli.replay import Player

    options = DisplayOptions.from_settings(settings)
    renderer = make_renderer(mode, options=options)
    renderer.select_events(None, json_events=json_events)
    keys: TerminalKeys | None = None
    if isinstance(renderer, DashboardRenderer) and not no_keys:
        candidate = TerminalKeys(sys.stdin.fileno())
        if candidate.enter():
            keys = candidate
            renderer.view.keys = True
    label = timeline.session_id + (f" run {run_number}" if run_number is not None else "")
    refresh = min(0.1, 1.0 / float(settings.monitoring.refresh_rate_hz))
    player = Player(
        timeline,
        renderer,
        speed=speed,
        max_gap=max_gap,
        first=first,
        stop=stop,
        refresh_rate=refresh,
        default_budget=int(settings.token_budget.default_total),
        keys=keys,
        label=label,
        start_paused=paused and keys is not None,
        ledger=ledger,
        final=final,
        history=history,
    )
    try:
        code = player.run()
        if player.ledger_only_runs and final is not None:
            n = player.ledger_only_runs
            click.echo(
                f"sigil replay: {n} run{'s' if n != 1 else ''} of session {timeline.session_id}"
                " not played (at or past where the archive breaks): counted in the totals,"
                " as report and diff count them",
                err=True,
            )
        elif player.ledger_only_runs:
            n = player.ledger_only_runs
            click.echo(
                f"sigil replay: {n} run{'s' if n != 1 else ''} of session {timeline.session_id}"
                f" known only to its ledger (tokens.json; {'their' if n != 1 else 'its'} events"
                " are gone): counted in the totals, not played",
                err=True,
            )
        return code
    finally:
        try:
            renderer.close()
        finally:
            # The terminal is given back even when the screen cannot be written.
            if keys is not None:
                keys.restore()
