"""``sigil orchestrate``: run the pipeline on a task under a token budget.

The command only parses and checks its arguments, then hands over to
:class:`~sigil.interfaces.cli.orchestrator.Orchestrator`. Everything that can be
wrong with the input is checked before anything is written, and reported as one
line with exit status 2. Heavy imports (the orchestrator, the native writer, the
tokenizer) happen inside the command so that ``sigil --help`` and
``sigil orchestrate --help`` stay fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from sigil.interfaces.cli.errors import ExitCode, OneLineCommand, UsageFailure

if TYPE_CHECKING:  # pragma: no cover
    from sigil.interfaces.cli.orchestrator import Orchestrator, PipelineResult
    from sigil.interfaces.cli.progress import StepProgress
    from sigil.telemetry.log_parser import SessionSnapshot

PROVIDERS = ("offline", "openai")

_EPILOG = """\b
Exit status:
  0  the pipeline completed
  1  the pipeline failed (a required step failed)
  2  bad usage: invalid option, session ID, task, budget, provider or config,
     or the session is already running (nothing is written)
  3  the token budget ran out before the pipeline finished
  130/143  interrupted by SIGINT (Ctrl-C) / SIGTERM: the run is recorded as
     interrupted; continue it with --resume

\b
Examples:
  sigil orchestrate --task "Analyze Acme Corp"
  sigil orchestrate --task "Analyze Acme Corp" --session acme-1 --budget 5000
  sigil orchestrate --session acme-1 --resume
  sigil monitor --session acme-1          (in another terminal)
"""


def _usage(message: str) -> NoReturn:
    raise UsageFailure(message)


def _parse_budget(text: str | None) -> int | None:
    if text is None:
        return None
    from sigil.core.config import parse_ascii_int

    value = parse_ascii_int(text)
    if value is None:
        _usage(f"--budget must be a positive integer (a number of tokens), got {text!r}")
    if not 1 <= value < 1 << 63:
        _usage(
            f"--budget must be a positive integer below 2**63 (a number of tokens), got {text!r}"
        )
    return value


def _is_utf8(text: str) -> bool:
    """False for text holding surrogate escapes (bytes the shell passed that are not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def make_session_id() -> str:
    """A readable, unique session ID such as ``20260111-101532-brisk-otter-3f2a``."""
    import secrets
    from datetime import datetime

    adjectives = (
        "amber", "brisk", "calm", "deft", "eager", "fond", "gentle", "hardy", "keen",
        "lucid", "mellow", "nimble", "plucky", "quiet", "rapid", "steady", "tidy", "vivid",
        "wise", "zesty",
    )  # fmt: skip
    nouns = (
        "badger", "crane", "dolphin", "falcon", "gecko", "heron", "ibis", "jaguar", "koala",
        "lynx", "marten", "newt", "otter", "panda", "quail", "raven", "stoat", "tapir",
        "viper", "wren",
    )  # fmt: skip
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.choice(adjectives)}-{secrets.choice(nouns)}-{secrets.token_hex(2)}"


@click.command(
    "orchestrate",
    cls=OneLineCommand,
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("--task", "-t", metavar="TEXT", help="The task to run the pipeline on.")
@click.option(
    "--session",
    "-s",
    "session_id",
    metavar="ID",
    help="Session ID (letters, digits, '-', '_'; up to 64). Default: a new readable ID. "
    "An existing session gets a new run under the same budget.",
)
@click.option(
    "--budget",
    "-b",
    metavar="N",
    help="Session token budget. Default: the session's own budget, else "
    "token_budget.default_total (256,000).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the session's interrupted run (its writer died): completed steps are "
    "not run again and their tokens stay counted. Needs --session.",
)
@click.option(
    "--log-path",
    metavar="DIR",
    help="Base log directory (default: logging.path, i.e. ~/.sigil/logs).",
)
@click.option(
    "--provider",
    "-p",
    metavar="NAME",
    help="Model provider for the reasoning step: offline (default, no network) or openai "
    "(any OpenAI-compatible server; see provider.* in config.yaml).",
)
@click.option(
    "--export-otlp",
    is_flag=True,
    help="Also send the run's spans to an OpenTelemetry collector while it runs "
    "(export.otlp_endpoint / OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318). "
    "Needs pip install 'sigil[otlp]'.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def orchestrate(
    task: str | None,
    session_id: str | None,
    budget: str | None,
    resume: bool,
    log_path: str | None,
    provider: str | None,
    export_otlp: bool,
    as_json: bool,
) -> None:
    """Run the agent pipeline on a task under a token budget.

    Prints the session ID first (point `sigil monitor --session ID` at it), then
    each step with its tokens and latency, the totals and the result. Every event
    goes to <log path>/sessions/<ID>/execution.jsonl; tokens.json and metrics.json
    are written beside it when the run ends.
    """
    orchestrator = _build(task, session_id, budget, resume, log_path, provider, export_otlp)
    code = _run(orchestrator, task, as_json)
    _update_report_index(orchestrator)
    _ignore_signals()
    sys.exit(code)


def _update_report_index(orchestrator: Orchestrator) -> None:
    """The run has ended and everything about it is printed: bring this
    session's rows of the report index up to date (issue 13), so the next
    ``sigil report`` has nothing of it to refold. Only when an index exists (a
    user who never runs ``sigil report`` pays nothing); a failure here leaves
    the exit status alone and is one warning line (the next report refreshes
    the index anyway)."""
    log_path = orchestrator.log_path
    from sigil.reports.index import INDEX_FILE_NAME

    if not (log_path / INDEX_FILE_NAME).is_file() or not orchestrator.session_dir.is_dir():
        return
    import contextlib

    for stream in (sys.stdout, sys.stderr):
        # What is printed is out before the index is touched, even on a pipe.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    from sigil.reports.index import IndexNotUpdated, update_existing

    try:
        update_existing(log_path, [orchestrator.session_id])
    except IndexNotUpdated as exc:
        _echo(f"warning: report index not updated: {exc}", err=True)
    except Exception as exc:  # never the run's outcome: the index is a cache
        if os.environ.get("SIGIL_DEBUG"):
            raise
        _echo(f"warning: report index not updated: {type(exc).__name__}: {exc}", err=True)


def _ignore_signals() -> None:
    """The run is recorded and its outcome decided: a signal from here on changes
    nothing. Python restores the default handlers while it shuts down, and a
    late SIGTERM would then kill the process with its exit code half-reported."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _build(
    task: str | None,
    session_id: str | None,
    budget_text: str | None,
    resume: bool,
    log_path: str | None,
    provider: str | None,
    export_otlp: bool = False,
) -> Orchestrator:
    """Check every input and build the orchestrator; writes nothing."""
    if task is not None and not task.strip():
        _usage("--task must not be empty")
    if task is not None and not _is_utf8(task):
        _usage("--task is not valid UTF-8 text; check the terminal's or the script's encoding")
    if task is None and not resume:
        _usage("--task is required: say what the pipeline should do, e.g. --task 'Analyze lead'")
    if resume and session_id is None:
        _usage("--resume needs --session ID: the session whose run to continue")
    budget = _parse_budget(budget_text)
    if provider is not None and provider not in PROVIDERS:
        _usage(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")

    from sigil.core.paths import InvalidSessionId, validate_session_id

    if session_id is not None:
        try:
            validate_session_id(session_id)
        except InvalidSessionId as exc:
            _usage(str(exc))

    from sigil.core.config import ConfigError, check_allocations, load_settings
    from sigil.interfaces.cli.orchestrator import allocations_origin

    overrides: dict[str, object] = {"provider.name": provider, "logging.path": log_path}
    try:
        settings = load_settings(overrides)
        if budget is not None:
            check_allocations(settings, budget, "--budget", allocations_origin(settings))
    except ConfigError as exc:
        _usage(exc.format_message())

    from pathlib import Path

    base = Path(settings.logging.path).expanduser()
    if base.exists() and not base.is_dir():
        _usage(f"log path {base} exists and is not a directory")
    if settings.provider.name == "openai":
        _check_openai(settings)
    if export_otlp:
        from sigil.telemetry.otlp import OtlpUnavailable, require_otlp

        try:
            require_otlp(settings.export.otlp_protocol)
        except OtlpUnavailable as exc:
            _usage(str(exc))

    if session_id is None:
        session_id = make_session_id()
        while (base / "sessions" / session_id).exists():  # pragma: no cover - 1 in 10^10
            session_id = make_session_id()

    from sigil.core.locks import is_session_locked, lock_holder_pid
    from sigil.interfaces.cli.orchestrator import Orchestrator
    from sigil.pipeline.base import StepConfigError

    session_dir = base / "sessions" / session_id
    if is_session_locked(session_dir):
        pid = lock_holder_pid(session_dir)
        holder = f" (process {pid})" if pid else ""
        _usage(f"session {session_id!r} is already running{holder}; use another --session")
    try:
        return Orchestrator(
            session_id,
            token_budget=budget,
            log_path=base,
            settings=settings,
            resume=resume,
            export_otlp=export_otlp,
        )
    except StepConfigError as exc:
        # Steps come only from the config file: name it with the key.
        _usage(f"{settings.config_path}: {exc}")
    except (ValueError, TypeError) as exc:
        _usage(str(exc))


def _check_openai(settings: Any) -> None:
    p = settings.provider
    key = os.environ.get(p.api_key_env)
    if not key and "api.openai.com" in p.base_url:
        _usage(
            f"provider openai needs an API key: set {p.api_key_env} "
            "(or point provider.base_url at a local OpenAI-compatible server)"
        )


class _Signals:
    """SIGINT and SIGTERM for the whole command, including its shutdown.

    The first signal cancels the run, which then ends through its one final
    path (final event with status ``interrupted``, summary files, lock
    released). Every later signal is absorbed: a second Ctrl-C must not cut
    that path in half (asyncio's own handler raises KeyboardInterrupt wherever
    the second one lands). Installed before the event loop starts, so no
    window is left where the default handler applies.
    """

    def __init__(self) -> None:
        self.first: int | None = None
        self._loop: Any = None
        self._task: Any = None

    def install(self) -> None:
        import signal

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def attach(self, loop: Any, task: Any) -> None:
        self._loop, self._task = loop, task
        if self.first is not None:
            self._deliver()

    def detach(self) -> None:
        self._loop = self._task = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.first is not None:
            return  # absorbed: the run is already on its way out
        self.first = signum
        self._deliver()

    def _deliver(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            # Runs between bytecodes of the main thread: only hand the cancel to
            # the loop, which does it on its own turn.
            loop.call_soon_threadsafe(task.cancel)

    @property
    def exit_code(self) -> int:
        import signal

        return ExitCode.TERMINATED if self.first == signal.SIGTERM else ExitCode.INTERRUPTED


#: What everything this command prints goes through: the run's sanitizer
#: (issue 11 item 9; a step's error text is what an HTTP client put there,
#: credentials included). Set by :func:`_run` once the settings are known.
_scrub: Callable[[str], str] | None = None


def _echo(message: str = "", *, err: bool = False, data: bool = False) -> None:
    """One message, scrubbed; each of its lines with the control characters a
    step's text or a model's name may hold shown, not sent to the terminal
    (``screen.shown``), except ``data`` (JSON, which escapes them itself)."""
    text = _scrub(message) if _scrub is not None else message
    if not data and not text.isprintable():
        from sigil.interfaces.cli.screen import shown

        text = "\n".join(shown(line) for line in text.split("\n"))
    click.echo(text, err=err)


def _run(orchestrator: Orchestrator, task: str | None, as_json: bool) -> int:
    import asyncio
    import errno

    from sigil.core.file_security import UnsafePathError
    from sigil.core.locks import SessionBusy
    from sigil.interfaces.cli.orchestrator import (
        BudgetConfigError,
        ResumeError,
        describe_write_error,
    )

    global _scrub
    sanitizer = orchestrator.sanitizer
    _scrub = sanitizer.sanitize_string if sanitizer is not None else None
    announced = False
    # On a terminal, a live table of the run's steps (piped or --json: quiet).
    progress: StepProgress | None = None

    def announce(orch: Orchestrator) -> None:
        nonlocal announced, progress
        announced = True
        # The first line, so a monitor can be pointed at the session right away.
        _echo(f"Session: {orch.session_id}", err=as_json)
        if orch.abandoned_run is not None:
            _echo(
                f"note: run {orch.abandoned_run} of this session never finished (its writer "
                "died); its tokens stay counted. Use --resume to continue such a run.",
                err=True,
            )
        if orch.missing_events:
            _echo(
                f"warning: {orch.missing_events} events of this session are missing from both "
                "its log and tokens.json (rotated or deleted before they were counted): its "
                "totals are incomplete data, a lower bound",
                err=True,
            )
        if orch.interrupted_run is not None:
            _echo(
                f"note: run {orch.interrupted_run} of this session was interrupted; its tokens "
                "stay counted. Use --resume to continue such a run.",
                err=True,
            )
        sys.stdout.flush()
        if not as_json and _progress_wanted():
            from sigil.interfaces.cli.progress import StepProgress

            progress = StepProgress(orch.session_id, orch.log_path, orch.run_number)
            progress.start()

    signals = _Signals()

    async def main() -> PipelineResult:
        signals.attach(asyncio.get_running_loop(), asyncio.current_task())
        try:
            return await orchestrator.execute(task, {}, on_ready=announce, keep_exporting=True)
        finally:
            signals.detach()

    # Stays installed until the process exits: a signal while the result is
    # printed is absorbed too (the run is recorded; the log says how it ended).
    signals.install()
    try:
        try:
            result = asyncio.run(main())
        finally:
            if progress is not None:
                progress.stop()
    except (SessionBusy, ResumeError, BudgetConfigError, UnsafePathError) as exc:
        raise UsageFailure(_scrub(str(exc)) if _scrub else str(exc)) from None
    except OSError as exc:
        if announced or exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # Not bad usage: the disk refused what the run had to record.
            where = orchestrator.session_dir
            _echo(f"Error: {describe_write_error(exc, where)}", err=True)
            return ExitCode.FAILED
        # The session's directory or log could not be made: nothing ran.
        where = exc.filename or orchestrator.log_path
        raise UsageFailure(
            f"cannot use log path {orchestrator.log_path}: {exc.strerror or exc} ({where})"
        ) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        run = orchestrator.run_number
        if announced and run is not None:
            _echo(
                f"Interrupted: run {run} is recorded as interrupted; continue it with "
                f"sigil orchestrate --session {orchestrator.session_id} --resume",
                err=True,
            )
        else:
            _echo("Interrupted before the run started; nothing ran", err=True)
        return signals.exit_code
    except Exception as exc:
        if os.environ.get("SIGIL_DEBUG"):
            raise
        _echo(f"Error: {type(exc).__name__}: {exc}", err=True)
        return ExitCode.FAILED

    if as_json:
        import json

        _echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str), data=True)
    else:
        # On a terminal the live table's model has folded the whole run: its costs.
        _print_result(result, progress.snapshot if progress is not None else None)
    # The result is out; only now wait (bounded) for live export to finish, so a
    # slow or absent collector never holds back what the user sees.
    report = orchestrator.finish_export(5.0)
    if report is not None and not report.complete:
        # What live export could not send, and the command that sends it later.
        _echo(report.summary(), err=True)
    if orchestrator.recording_error is not None:
        what = describe_write_error(orchestrator.recording_error, orchestrator.session_dir)
        if result.status == "interrupted":
            then = (
                "; the run stopped before its next step. Free some space, then continue it "
                f"with sigil orchestrate --session {orchestrator.session_id} --resume"
            )
        else:
            then = (
                f"; the run ended ({result.status}) and its log holds it: tokens.json and "
                "metrics.json are rebuilt from the log by the next command once there is room"
            )
        _echo(f"Error: {what}{then}", err=True)
        return ExitCode.FAILED
    if result.status == "complete":
        return ExitCode.OK
    if result.status == "budget_exceeded":
        return ExitCode.BUDGET
    return ExitCode.FAILED


def _progress_wanted() -> bool:
    """The live step table: on a terminal, unless ``SIGIL_NO_PROGRESS`` is set
    or the terminal is ``dumb``."""
    if os.environ.get("SIGIL_NO_PROGRESS") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _print_result(result: PipelineResult, snap: SessionSnapshot | None = None) -> None:
    """The result table. With the session model's snapshot of the run (on a
    terminal), each step's cost and the run's and the session's too."""
    echo = _echo
    resumed = " (resumed)" if result.resumed else ""
    echo(f"Run {result.run}{resumed} · budget {result.budget:,} tokens")
    echo("")
    run = snap.run if snap is not None and snap.run.number == result.run else None
    costs: dict[str, str] = {}
    if run is not None:
        from sigil.interfaces.cli.progress import step_cost

        costs = {name: step_cost(c) for name, c in run.components.items()}
        if not any(costs.values()):
            costs = {}  # no model answered any step: no cost column
    cost_head = f"{'cost':>11}" if costs else ""
    if not result.steps:
        echo("  no step ran")
    else:
        echo(f"  {'step':<12}{'status':<10}{'tokens':>9}{'latency':>13}{cost_head}  note")
    for step in result.steps:
        if step.metadata.get("resumed"):
            state, note = "ok", "recovered from the log"
        elif step.success:
            state = "ok"
            attempts = step.metadata.get("attempts", 1)
            note = f"after {attempts} attempts" if attempts and attempts > 1 else ""
        else:
            state, note = "failed", _shorten(step.error or "", 60)
        cost = f"{costs.get(str(step.step), ''):>11}" if costs else ""
        echo(
            f"  {step.step!s:<12}{state:<10}{step.tokens_used:>9,}"
            f"{step.latency_ms:>10.1f} ms{cost}  {note}".rstrip()
        )
    echo("")
    pct = result.total_tokens / result.budget * 100 if result.budget else 0.0
    echo(
        f"Tokens: {result.run_tokens:,} this run · {result.total_tokens:,} of "
        f"{result.budget:,} used by the session ({pct:.1f}%) · {result.total_latency_ms:.1f} ms"
    )
    if result.unrecorded_tokens:
        echo(
            f"Not recorded: {result.unrecorded_tokens:,} more tokens this run spent could not "
            "be written to the log (not in the total above); recorded in the session's "
            "reserve (.reserve), its next run counts them once there is room"
        )
    if costs and run is not None and snap is not None:
        echo(_cost_summary(run, snap))
    if result.quality_score is not None:
        echo(
            f"Quality: {result.quality_score:.2f} · recommended action: "
            f"{result.recommended_action or '-'}"
        )
    _print_output(result.final_output)
    tail = f" — {result.error}" if result.error else ""
    echo(f"Status: {result.status}{tail}")
    if result.log_file:
        echo(f"Log: {result.log_file}")


def _cost_summary(run: Any, snap: SessionSnapshot) -> str:
    """``Cost: $0.54+ this run · $1.20+ session · 22 tokens unpriced (model)``."""
    from sigil.interfaces.cli.display import format_cost

    line = f"Cost: {format_cost(run)} this run · {format_cost(snap)} session"
    if run.unpriced_tokens:
        models = ", ".join(run.unpriced_models)
        line += f" · {run.unpriced_tokens:,} tokens unpriced" + (f" ({models})" if models else "")
    return line


def _print_output(output: Any) -> None:
    if output is None:
        return
    analysis = output.get("result") if isinstance(output, dict) else None
    if not isinstance(analysis, dict):
        analysis = output if isinstance(output, dict) else None
    _echo("Result:")
    if analysis is None or "summary" not in analysis:
        import json

        _echo("  " + _shorten(json.dumps(output, default=str, ensure_ascii=False), 400))
        return
    _echo(f"  {analysis.get('summary')}")
    for finding in analysis.get("findings") or []:
        _echo(f"  - {finding}")
    if analysis.get("recommendation"):
        _echo(f"  Recommendation: {analysis['recommendation']}")


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
