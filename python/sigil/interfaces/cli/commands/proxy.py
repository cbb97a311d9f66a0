"""``sigil proxy``: an OpenAI-compatible metering proxy in front of a model server.

Every model call through it is a step of the session (``step_start`` and
``step_complete`` with its tokens, or ``step_error``) in the session's log,
so ``sigil monitor --session ID`` shows it live; the session's budget caps
each call's output and, once spent, refuses calls (exit status 3).

The session side is the orchestrator's (:class:`MeteredSession`): the lock,
the history of earlier runs, the run number, the budget policy, the final
event and the summary files are exactly what ``sigil orchestrate`` does, so a
proxied session is a session like any other. Heavy imports (the
native transport) happen inside the command: ``sigil --help`` stays fast.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from sigil.interfaces.cli.errors import ExitCode, OneLineCommand, UsageFailure, usage

if TYPE_CHECKING:  # pragma: no cover
    from sigil.core.config import Settings
    from sigil.interfaces.cli.orchestrator import Orchestrator
    from sigil.proxy import Meter, ProxyConfig

DEFAULT_PORT = 8787
#: The least write buffer of a proxied session's logger (see MeteredSession).
PROXY_BUFFER_BYTES = 64 << 10
TOKEN_ENV = "SIGIL_PROXY_TOKEN"
#: How often (seconds, at most) the proxy reads its log writer's counters to
#: refuse calls it could not record (a few microseconds each).
RECORDING_CHECK_SECONDS = 0.005
#: How long (seconds) a call's answer waits for its record to reach the OS;
#: past it (a slow disk: an fsync under way) the call is answered and its
#: events stay queued: the transport's thread, which every call shares, waits
#: meanwhile, so the bound is short.
WRITE_WAIT_SECONDS = 0.5

_EPILOG = """\b
Exit status:
  0  stopped (Ctrl-C or SIGTERM) with budget left
  1  failed, or the session's log could not be written (calls were then refused)
  2  bad usage: invalid option, session ID, budget or upstream URL, the port is
     taken, or the session is already running (nothing is written)
  3  the session's token budget ran out

\b
Examples:
  sigil proxy --session agent-1 --budget 50000 --upstream http://127.0.0.1:8000/v1
  OPENAI_BASE_URL=http://127.0.0.1:8787/v1 python agent.py   (in another terminal)
  sigil monitor --session agent-1
"""


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """The checked options shared by ``sigil proxy`` and ``sigil run``."""

    session_id: str
    budget: int | None
    settings: Settings
    config: ProxyConfig


def check_options(
    *,
    session_id: str | None,
    budget: str | None,
    upstream: str | None,
    port: int,
    host: str | None,
    token: str | None,
    log_path: str | None,
    call_cap: str | None,
    timeout: str | None = None,
) -> ProxyOptions:
    """Every input checked (one-line usage errors, exit 2); writes nothing."""
    from sigil.core.config import ConfigError, load_settings
    from sigil.core.paths import InvalidSessionId, validate_session_id
    from sigil.interfaces.cli.commands.orchestrate import _parse_budget, make_session_id

    if session_id is not None:
        try:
            validate_session_id(session_id)
        except InvalidSessionId as exc:
            usage(str(exc))
    total = _parse_budget(budget)
    cap = 4096
    if call_cap is not None:
        from sigil.core.config import parse_ascii_int

        value = parse_ascii_int(call_cap)
        if value is None or not 1 <= value <= 1 << 31:
            usage(f"--call-cap must be a positive number of tokens, got {call_cap!r}")
        cap = value
    seconds: float | None = None
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = None
        if seconds is None or not 0 < seconds <= 86_400:
            usage(f"--timeout must be a number of seconds in (0, 86400], got {timeout!r}")
    if not 0 <= port <= 65535:
        usage(f"--port must be between 0 and 65535, got {port}")
    if host is not None and not token:
        usage(
            f"--host {host} exposes the proxy beyond this machine: give --token T (or set "
            f"{TOKEN_ENV}); clients send it as X-Sigil-Token or as their API key"
        )
    try:
        settings = load_settings({"logging.path": log_path})
    except ConfigError as exc:
        usage(exc.format_message())
    url = upstream or settings.provider.base_url
    _check_upstream(url, "--upstream" if upstream else "provider.base_url")
    from pathlib import Path

    base = Path(settings.logging.path).expanduser()
    if base.exists() and not base.is_dir():
        usage(f"log path {base} exists and is not a directory")
    if session_id is None:
        session_id = make_session_id()
    from sigil.core.locks import is_session_locked, lock_holder_pid

    if is_session_locked(base / "sessions" / session_id):
        pid = lock_holder_pid(base / "sessions" / session_id)
        holder = f" (process {pid})" if pid else ""
        usage(f"session {session_id!r} is already running{holder}; use another --session")
    from sigil.proxy import ProxyConfig

    config = ProxyConfig(
        upstream=url.rstrip("/"),
        host=host or "127.0.0.1",
        port=port,
        token=token if host is not None else None,
        api_key=os.environ.get(settings.provider.api_key_env) or None,
        timeout=seconds if seconds is not None else settings.provider.timeout_seconds,
        call_cap=cap,
    )
    return ProxyOptions(session_id, total, settings, config)


#: What a URL may carry (RFC 3986: unreserved, reserved and "%"); anything else
#: (a space, a control or non-ASCII character) the transport cannot send.
_URL_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?#[]@!$&'()*+,;=%"
)


def _check_upstream(url: str, where: str) -> None:
    bad = next((c for c in url if c not in _URL_CHARS), None)
    if bad is not None:
        usage(f"{where} has a character a URL cannot carry ({bad!r}): {url!r}")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        usage(f"{where} is not a valid URL ({e}): {url!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        usage(f"{where} must not contain credentials (user:password@); the client's key is sent")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        usage(f"{where} has an invalid port: {url!r}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        usage(f"{where} must be an http:// or https:// URL, got {url!r}")
    # The upstream is an API root the transport appends each path to: a query
    # or a fragment would end up in the middle of every forwarded URL. An
    # empty one ("...?", "...#") is refused too: urlsplit drops it silently.
    if parts.query or "?" in url:
        usage(f"{where} must not have a query string (?...); give the API root, got {url!r}")
    if parts.fragment or "#" in url:
        usage(f"{where} must not have a fragment (#...); give the API root, got {url!r}")


def _metered_session_class() -> type[Orchestrator]:
    """:class:`MeteredSession`, built on first use (the orchestrator import is heavy)."""
    from sigil.interfaces.cli.orchestrator import Orchestrator

    class _MeteredSession(Orchestrator):
        #: the session's history once the run closed its log (None: not built)
        final_history: Any = None

        def _make_steps(self, components: Any) -> dict[str, Any]:
            return {}

        def _history_at_end(self, prep: Any) -> Any:
            # Kept: the end line reads the run from it (contract 12).
            self.final_history = super()._history_at_end(prep)
            return self.final_history

        @property
        def provider_name(self) -> str:
            return "proxy"

    return _MeteredSession


class MeteredSession:
    """One run of a session whose steps are the model calls through the proxy.

    Wraps the orchestrator's session machinery: :meth:`prepare` locks the
    session and reads its history (run number, what earlier runs used, the
    recorded budget), :meth:`begin` logs ``session_start``, :meth:`end` logs
    the final event, closes the log, writes ``tokens.json``/``metrics.json``
    and releases the lock.
    """

    def __init__(self, options: ProxyOptions) -> None:
        self.options = options
        cls = _metered_session_class()
        self.orchestrator: Any = cls(
            options.session_id,
            token_budget=options.budget,
            log_path=options.settings.logging.path,
            provider="offline",
            settings=options.settings,
        )
        # A proxy logs two events per call, thousands of calls a second at peak.
        # With a buffer of the default 1 KiB the writer's hand-off costs the
        # event loop ~110 us per event on a loaded machine (its flush kicks in
        # every third event) against ~17 us at 64 KiB; the flush interval still
        # bounds how late a monitor sees an event.
        logger = self.orchestrator.execution_logger
        logger.buffer_size = max(logger.buffer_size, PROXY_BUFFER_BYTES)
        logger.max_buffer_bytes = max(logger.max_buffer_bytes, logger.buffer_size)
        self._prep: Any = None
        self._log: Any = None
        self.meter: Meter | None = None
        self._started = 0.0
        self._tokens_before = 0
        self._unrecorded_error: OSError | None = None
        #: why a call's record did not reach the OS in time (None: each one did)
        self._wait_error: OSError | None = None
        self._next_check = 0.0

    @property
    def session_id(self) -> str:
        return self.options.session_id

    @property
    def run(self) -> int:
        return int(self._prep.run.run) if self._prep is not None else 0

    async def prepare(self, task: str) -> Meter:
        """Lock the session, read its history, build the budget's tracker."""
        from sigil.interfaces.cli.orchestrator import _RecordingLogger, _to_the_end
        from sigil.proxy import Meter
        from sigil.telemetry.tokens import TokenTracker

        orch = self.orchestrator
        try:
            prep = await _to_the_end(asyncio.to_thread(orch._prepare, task))
        except asyncio.CancelledError:
            await asyncio.to_thread(orch._abandon_prepared)
            raise
        self._prep = prep
        history = prep.history
        tb = orch.settings.token_budget
        # The orchestrator's budget policy, with no pipeline allocations: the
        # proxy's components are whatever the calls name.
        tracker = TokenTracker(
            total_budget=prep.budget,
            allocations={},
            warning_threshold=tb.warning_threshold,
            critical_threshold=tb.critical_threshold,
            exceeded_threshold=tb.exceeded_threshold,
        )
        comp_tokens, comp_ops = history.component_totals()
        tracker.restore(history.tokens_used, comp_tokens, comp_ops)
        self._log = _RecordingLogger(orch.execution_logger)
        # The run's end continues the model with the events it kept when an
        # external rotator took them from the live file (as orchestrate's does).
        prep.log = self._log
        tracker.logger = self._log
        orch.token_tracker = tracker
        self._tokens_before = history.tokens_used
        # Tokens earlier runs held for calls of unknown usage stay held (the model's).
        self.meter = Meter(
            tracker,
            self._log,
            run=prep.run.run,
            pricer=orch.pricer,
            held_before=history.tokens_held,
        )
        self.meter.unrecorded = self._unrecorded
        self.meter.written = self._written
        return self.meter

    def _written(self) -> None:
        """Each call is answered once its record has reached the OS (the
        writer's ``write(2)`` done, so a ``kill -9`` of the proxy loses no
        answered call): the meter calls this as each call settles. The record
        is written at once (see ``ExecutionLogger.wait_written``), calls
        settling together share the write, and the GIL is released meanwhile.
        A write that fails is the log failing: the call is answered, and later
        ones are refused as unrecorded. One that does not finish within
        :data:`WRITE_WAIT_SECONDS` (the transport's thread waits meanwhile) is
        a slow disk: the call is answered and its events stay queued."""
        if self._unrecorded_error is not None:
            return
        try:
            self.orchestrator.execution_logger.wait_written(None, WRITE_WAIT_SECONDS)
        except TimeoutError:
            # A slow disk (an fsync under way), not a failing one: the events
            # stay queued for the writer, whose counters show a real failure.
            return
        except (OSError, ValueError) as exc:
            self._wait_error = self.unrecorded_now() or (
                exc if isinstance(exc, OSError) else OSError(errno.EBADF, str(exc))
            )
            self._unrecorded_error = self._wait_error

    def _unrecorded(self) -> OSError | None:
        """Why the session's log cannot be written (None: it can), as the meter
        asks before each call: the writer's counters are read at most every
        :data:`RECORDING_CHECK_SECONDS` (the writer flushes every 100 ms), and
        a failure, once seen, stands for the rest of the run."""
        if self._unrecorded_error is not None:
            return self._unrecorded_error
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + RECORDING_CHECK_SECONDS
        self._unrecorded_error = self.unrecorded_now()
        return self._unrecorded_error

    def unrecorded_now(self) -> OSError | None:
        """Why the session's log cannot be written, from the writer's counters now."""
        from sigil.proxy.policy import recording_failure

        stats = self.orchestrator.execution_logger.stats()
        return recording_failure(self._log.dropped, stats) or self._wait_error

    @property
    def recording_error(self) -> OSError | None:
        """Why the run's record is incomplete (set by :meth:`end`; None: it is whole)."""
        error: OSError | None = self.orchestrator.recording_error
        return error

    def recording_error_text(self) -> str:
        """The one-line error of a run whose record is incomplete."""
        from sigil.interfaces.cli.orchestrator import describe_write_error

        assert self.recording_error is not None
        what = describe_write_error(self.recording_error, self.orchestrator.session_dir)
        refused = self.meter.unrecorded_refused if self.meter is not None else 0
        calls = "call" if refused == 1 else "calls"
        return (
            f"{what}; the proxy refused {refused} {calls} it could not record and the run "
            "ended. tokens.json and metrics.json are rebuilt from the log by the next command "
            "once there is room"
        )

    async def begin(self, task: str, url: str, extra: dict[str, Any] | None = None) -> None:
        """Log ``session_start`` (and ``budget_exceeded`` when earlier runs spent it)."""
        from sigil.interfaces.cli.orchestrator import ORCHESTRATOR

        prep, tracker, log = self._prep, self.orchestrator.token_tracker, self._log
        history = prep.history
        if history.source is not None:
            # As the orchestrator does: the end continues the fold of the log at rest.
            prep.resting = asyncio.ensure_future(asyncio.to_thread(history.source.fold_at_rest))
        self._started = time.perf_counter()
        await log.log_event(
            "session_start",
            ORCHESTRATOR,
            f"Starting proxy for: {task}",
            0,
            {
                "task": task,
                "budget": prep.budget,
                "allocations": tracker.allocations,
                "run": prep.run.run,
                "thresholds": tracker.thresholds,
                "provider": "proxy",
                "upstream": _safe_url(self.options.config.upstream),
                "proxy_url": url,
                "steps": [],
                "tokens_before_run": tracker.used,
                **({"tokens_held_before_run": history.tokens_held} if history.tokens_held else {}),
                **(extra or {}),
            },
        )
        if not tracker.can_continue():
            notice = tracker.exhausted_notice()
            meta = notice.metadata() | {"reason": "spent by earlier runs"}
            await log.log_event(notice.event_type, ORCHESTRATOR, notice.message, 0, meta)
        elif self.meter is not None and self.meter.exhausted:
            self.meter.announce_held("held by earlier runs for calls of unknown usage")

    async def end(self, status: str, error: str | None) -> None:
        """The final event, then the log closed, the summaries written, the lock released."""
        from sigil.interfaces.cli.orchestrator import ORCHESTRATOR, _to_the_end

        await _to_the_end(self._end(status, error, ORCHESTRATOR), absorb=True)

    async def _end(self, status: str, error: str | None, component: str) -> None:
        from sigil.interfaces.cli.orchestrator import end_numbers
        from sigil.proxy.policy import recording_failure

        orch, prep, log = self.orchestrator, self._prep, self._log
        tracker, meter = orch.token_tracker, self.meter
        assert meter is not None
        # The session model's numbers (contract 12): a call still open after
        # the transport's abort wait holds its reservation there, as in every
        # view once the run has ended; the meter's own counts without it.
        wall_ms = round((time.perf_counter() - self._started) * 1000, 3)
        end = end_numbers(
            await orch._model_before_end(prep, log),
            prep.run.run,
            prep.budget,
            (tracker.used, tracker.used - self._tokens_before, meter.holding),
            (meter.unknown, meter.held),
        )
        meta: dict[str, Any] = {
            "status": status,
            "run": prep.run.run,
            "total_tokens": end.total,
            "run_tokens": end.run_tokens,
            "budget": prep.budget,
            "budget_remaining": end.budget_remaining,
            "wall_time_ms": wall_ms,
            "calls": meter.calls,
            "calls_failed": meter.failed,
            "calls_refused": meter.refused,
        }
        if end.unknown_calls:
            # Their tokens are not in total_tokens: shown as unknown, never as 0.
            meta["calls_usage_unknown"] = end.unknown_calls
            meta["tokens_held_unknown"] = end.tokens_held
        if error:
            meta["error"] = error
        try:
            if status == "complete":
                await log.log_event("session_complete", component, "Proxy run completed", 0, meta)
            else:
                text = f"Proxy run ended: {error}" if error else f"Proxy run ended ({status})"
                await log.log_event("session_error", component, text, 0, meta)
        finally:
            prep.run.status = status
            try:
                await orch.execution_logger.close()
            except OSError as exc:
                orch.recording_error = orch.recording_error or exc
            writer_stats = orch.execution_logger.stats()
            # As the orchestrator: a log that lacks events is a run not recorded whole.
            orch.recording_error = orch.recording_error or recording_failure(
                log.dropped, {k: v for k, v in writer_stats.items() if k != "buffered_bytes"}
            )
            if prep.resting is not None:
                try:
                    await prep.resting
                except Exception:
                    prep.history.source = None
            if orch.recording_error is None and log.dropped is None:
                try:
                    await asyncio.to_thread(orch._write_summaries, prep, [], writer_stats)
                except OSError as exc:
                    orch.recording_error = exc
            await asyncio.to_thread(orch._lock.release)

    def summary(self) -> str:
        """The end line: the run's calls and tokens as the session model reads the
        log the run closed (what every view shows), or, when the run could not
        build it (its log could not be written), the meter's own counts."""
        tracker, meter = self.orchestrator.token_tracker, self.meter
        assert meter is not None
        counts = self._model_counts()
        if counts is None:
            counts = (
                meter.calls, meter.failed, meter.unknown,
                tracker.used - self._tokens_before, tracker.used, meter.held,
            )  # fmt: skip
        calls, failed, unknown, run_tokens, used, held = counts
        total = tracker.total
        pct = used / total * 100 if total else 0.0
        head = f"sigil: session {self.session_id} run {self.run}: {calls} calls"
        if not unknown:
            return (
                f"{head} ({failed} failed), {run_tokens:,} tokens this run, {used:,} of "
                f"{total:,} used by the session ({pct:.1f}%)"
            )
        # Calls whose tokens nobody reported: unknown, never 0.
        noun = "call" if unknown == 1 else "calls"
        return (
            f"{head} ({failed} failed, {unknown} with usage unknown), at least "
            f"{run_tokens:,} tokens this run, at least {used:,} of {total:,} "
            f"used by the session ({pct:.1f}%) plus unknown usage of {unknown} {noun} "
            f"({held:,} tokens of the budget held for them)"
        )

    def _model_counts(self) -> tuple[int, int, int, int, int, int] | None:
        """(calls, failed, usage unknown, tokens) of this run, the session's
        tokens, and the tokens this run holds for calls of unknown usage, from the
        session model at the run's end (None: not built)."""
        history = getattr(self.orchestrator, "final_history", None)
        model = getattr(history, "model", None)
        if model is None:
            return None
        run = next((r for r in model.runs if r.number == self.run), None)
        if run is None:
            return None
        calls = run.steps_completed + run.steps_failed
        return (
            calls, run.steps_failed, run.unknown_usage_calls, run.tokens, model.tokens,
            run.tokens_held,
        )  # fmt: skip


def _safe_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


async def serve(
    options: ProxyOptions,
    task: str,
    main: Callable[[str, Meter], Awaitable[tuple[str, str | None]]],
    *,
    extra: dict[str, Any] | None = None,
) -> tuple[MeteredSession, str]:
    """Run a proxied session: lock it, serve, ``main(url, meter)`` until it returns
    ``(status, error)``, then end the run. Returns the session and its final status.

    ``main`` announces the URL itself, once SIGINT and SIGTERM are its own: a
    client may stop the proxy the moment it reads the URL, and a signal before
    the handlers cancelled the run ("Aborted.", exit 130)."""
    from sigil.proxy import ProxyServer

    session = MeteredSession(options)
    # The port first: a taken port refuses the run before the session is touched.
    server = ProxyServer(None, options.config)
    url = await server.start()
    try:
        meter = await session.prepare(task)
    except BaseException:
        await server.stop()
        raise
    status: str = "interrupted"
    error: str | None = "interrupted"
    try:
        await session.begin(task, url, extra)
        # Calls that arrived meanwhile wait: their events follow session_start.
        server.attach(meter)
        # What startup built (modules, the tokenizer, the session's history)
        # lives as long as the proxy: out of the collector's generations, a
        # full collection no longer walks it (~5% of the CPU under load).
        import gc

        gc.freeze()
        status, error = await main(url, meter)
    finally:
        await server.stop()
        unrecorded = session.unrecorded_now()
        if unrecorded is not None:
            # The record lacks calls: the run failed, whatever else it met.
            session.orchestrator.recording_error = unrecorded
            status, error = "error", f"the session's log cannot be written: {unrecorded}"
        elif meter.exhausted:
            status, error = "budget_exceeded", "token budget exhausted"
        elif meter.starved:
            # The run's last call was refused: its prompt did not fit in what
            # is left (a refused prompt followed by calls that fit does not
            # end the run: issue 14 review, finding 9).
            status, error = (
                "budget_exceeded",
                "a call's prompt did not fit in the token budget left"
                + ("" if can_admit_a_call(meter) else ", and what is left cannot admit any call"),
            )
        await session.end(status, error)
    return session, status


def can_admit_a_call(meter: Meter) -> bool:
    """Whether what is left of the budget admits the least call the proxy
    forwards: a prompt of no text (its format tokens only) and one token of
    output (said in the reason a run ends out of budget: a run whose last call
    was refused for its prompt ends as ``budget_exceeded``; one whose refused
    prompt was followed by calls that fit does not, finding 9)."""
    from sigil.proxy.usage import prompt_overhead

    left = meter.tracker.remaining - meter.holding
    return left >= prompt_overhead({}) + 1


def run_async(coro_factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run the command's coroutine, turning expected failures into one-line errors."""
    import errno

    from sigil.core.file_security import UnsafePathError
    from sigil.core.locks import SessionBusy
    from sigil.interfaces.cli.orchestrator import BudgetConfigError
    from sigil.proxy.server import UpstreamLoop

    try:
        return asyncio.run(coro_factory())  # type: ignore[arg-type]
    except (SessionBusy, BudgetConfigError, UnsafePathError, UpstreamLoop) as exc:
        raise UsageFailure(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageFailure(
                f"the port is taken ({exc.strerror}); choose another with --port"
            ) from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise UsageFailure(f"cannot listen there: {exc.strerror}") from None
        raise


@click.command(
    "proxy",
    cls=OneLineCommand,
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--session", "-s", "session_id", metavar="ID", help="Session ID (default: a new one)."
)
@click.option("--budget", "-b", metavar="N", help="Session token budget (default: the session's "
              "own, else token_budget.default_total).")  # fmt: skip
@click.option("--upstream", "-u", metavar="URL", help="The model server's API root "
              "(default: provider.base_url).")  # fmt: skip
@click.option("--port", "-p", type=int, default=DEFAULT_PORT, show_default=True,
              help="Port to listen on (0: any free port).")  # fmt: skip
@click.option("--host", metavar="ADDR", help="Listen on ADDR instead of 127.0.0.1 (needs --token).")
@click.option("--token", envvar=TOKEN_ENV, metavar="T", help=f"Token clients must send with "
              f"--host (or ${TOKEN_ENV}).")  # fmt: skip
@click.option("--call-cap", metavar="N", help="Output cap of a call that sets none (default 4096).")
@click.option("--timeout", metavar="SECONDS", help="Upstream timeout: connecting, a whole "
              "call, a stream's silence (default: provider.timeout_seconds).")  # fmt: skip
@click.option("--log-path", metavar="DIR", help="Base log directory (default: logging.path).")
def proxy(
    session_id: str | None,
    budget: str | None,
    upstream: str | None,
    port: int,
    host: str | None,
    token: str | None,
    call_cap: str | None,
    timeout: str | None,
    log_path: str | None,
) -> None:
    """Serve the OpenAI API on 127.0.0.1, metering every call into a session.

    Point any OpenAI-compatible client at http://127.0.0.1:PORT/v1; name the
    component a call is logged under with the X-Sigil-Component header (default:
    the model). Stop with Ctrl-C.
    """
    options = check_options(
        session_id=session_id, budget=budget, upstream=upstream, port=port, host=host,
        token=token, log_path=log_path, call_cap=call_cap, timeout=timeout,
    )  # fmt: skip

    def announce(url: str) -> None:
        click.echo(f"Session: {options.session_id}")
        click.echo(f"Proxy: {url} -> {_safe_url(options.config.upstream)}")
        click.echo(f"Point clients at it: OPENAI_BASE_URL={url}")
        sys.stdout.flush()

    async def until_stopped(url: str, meter: Meter) -> tuple[str, str | None]:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        announce(url)
        await stop.wait()
        return "complete", None

    async def main() -> tuple[MeteredSession, str]:
        return await serve(options, f"proxy to {_safe_url(options.config.upstream)}", until_stopped)

    session, status = run_async(main)
    click.echo(session.summary(), err=True)
    if session.recording_error is not None:
        click.echo(f"Error: {session.recording_error_text()}", err=True)
        sys.exit(ExitCode.FAILED)
    sys.exit(ExitCode.BUDGET if status == "budget_exceeded" else ExitCode.OK)
