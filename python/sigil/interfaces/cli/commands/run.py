"""``sigil run -- COMMAND...``: run an agent behind the metering proxy.

Starts ``sigil proxy`` on a free loopback port, runs COMMAND with
``OPENAI_BASE_URL`` and ``OPENAI_API_BASE`` pointing at it (its API key passes
through), and ends the session when COMMAND exits. The exit status is
COMMAND's, or 3 when the session's budget ran out.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING

import click

from sigil.interfaces.cli.errors import ExitCode, OneLineCommand, usage

if TYPE_CHECKING:  # pragma: no cover
    from sigil.proxy import Meter

_EPILOG = """\b
Exit status:
  COMMAND's own status, or
  1  the session's log could not be written (the calls it could not record
     were refused)
  2  bad usage: invalid option, session ID, budget or upstream URL, COMMAND not
     found or not runnable, or the session is already running or archived
     (nothing is written; a COMMAND that only exec() refuses ends its session
     as an error)
  3  the session's token budget ran out
  130/143  sigil got SIGINT/SIGTERM: passed to COMMAND, the run is recorded as
     interrupted (whatever COMMAND then exits with); a second signal, or
     --kill-after seconds, kills COMMAND (SIGKILL)

\b
Examples:
  sigil run --session agent-1 --budget 50000 -- python agent.py
  sigil monitor --session agent-1          (in another terminal)
"""


@click.command(
    "run",
    cls=OneLineCommand,
    epilog=_EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "ignore_unknown_options": True},
)
@click.option(
    "--session", "-s", "session_id", metavar="ID", help="Session ID (default: a new one)."
)
@click.option("--budget", "-b", metavar="N", help="Session token budget (default: the session's "
              "own, else token_budget.default_total).")  # fmt: skip
@click.option("--upstream", "-u", metavar="URL", help="The model server's API root "
              "(default: provider.base_url).")  # fmt: skip
@click.option("--call-cap", metavar="N", help="Output cap of a call that sets none (default 4096).")
@click.option("--timeout", metavar="SECONDS", help="Upstream timeout (default: "
              "provider.timeout_seconds).")  # fmt: skip
@click.option("--log-path", metavar="DIR", help="Base log directory (default: logging.path).")
@click.option("--kill-after", metavar="SECONDS", default="10", show_default=True,
              help="After a SIGINT/SIGTERM passed to COMMAND, kill it if it has not "
              "ended (a second signal kills it at once).")  # fmt: skip
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND...")
def run(
    session_id: str | None,
    budget: str | None,
    upstream: str | None,
    call_cap: str | None,
    timeout: str | None,
    log_path: str | None,
    kill_after: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with its OpenAI calls metered and budgeted in a session."""
    if not command:
        usage("give the command to run after --, e.g. sigil run -- python agent.py")
    grace = _seconds(kill_after)
    if grace is None:
        usage(f"--kill-after must be a number of seconds above 0, not {kill_after!r}")
    program = command[0]
    if os.sep not in program and shutil.which(program) is None:
        usage(f"command not found: {program}")
    why = _unrunnable(program if os.sep in program else shutil.which(program) or program)
    if why:
        usage(f"cannot run {program}: {why}")
    from sigil.interfaces.cli.commands.proxy import check_options, run_async, serve

    options = check_options(
        session_id=session_id, budget=budget, upstream=upstream, port=0, host=None,
        token=None, log_path=log_path, call_cap=call_cap, timeout=timeout,
    )  # fmt: skip
    task = " ".join(command)[:500]
    exit_code: int = ExitCode.FAILED
    spawn_error: str | None = None

    def announce(url: str) -> None:
        click.echo(f"sigil: session {options.session_id} · proxy {url}", err=True)

    async def child(url: str, meter: Meter) -> tuple[str, str | None]:
        import asyncio
        import signal

        nonlocal exit_code, spawn_error
        env = {**os.environ, "OPENAI_BASE_URL": url, "OPENAI_API_BASE": url,
               "SIGIL_SESSION": options.session_id}  # fmt: skip
        loop = asyncio.get_running_loop()
        proc: asyncio.subprocess.Process | None = None
        received: list[int] = []
        killed = False
        deadline: asyncio.TimerHandle | None = None

        def kill() -> None:
            nonlocal killed
            if proc is not None and proc.returncode is None and not killed:
                killed = True
                proc.kill()

        def forward(signum: int) -> None:
            # Ctrl-C reaches the child from the terminal too; SIGTERM sent to
            # sigil alone is passed on. The child decides when to end, within
            # --kill-after seconds; a second signal means "now" (SIGKILL), so
            # a child that ignores signals cannot keep the session open.
            nonlocal deadline
            received.append(signum)
            if proc is None or proc.returncode is not None:
                return  # before the spawn: passed on once it is done
            if len(received) == 1:
                proc.send_signal(signum)
                deadline = loop.call_later(grace, kill)
            else:
                kill()

        # Installed before the spawn: a signal in between would otherwise kill
        # sigil alone and leave the child running, holding the session's pipes.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, forward, signum)
        announce(url)
        try:
            proc = await asyncio.create_subprocess_exec(*command, env=env)
        except OSError as exc:
            # What the checks above cannot see (a loader that refuses the file):
            # the run is recorded as the error it is, and ends with exit 2.
            spawn_error = f"cannot run {program}: {exc.strerror or exc}"
            exit_code = ExitCode.USAGE
            return "error", spawn_error
        if received:
            early, received[:] = list(received), []
            for pending in early[:2]:
                forward(pending)
        code = await proc.wait()
        if deadline is not None:
            deadline.cancel()
        if received:
            # sigil was told to stop: interrupted, and the exit code says so
            # (128 + that signal, as for sigil orchestrate), whatever the child
            # chose to exit with after it.
            name = signal.Signals(received[0]).name
            exit_code = 128 + received[0]
            if killed:
                return "interrupted", f"{name} did not end the command; it was killed (SIGKILL)"
            ended = f"signal {-code}" if code < 0 else f"exit status {code}"
            return "interrupted", f"{name} passed to the command; it ended with {ended}"
        exit_code = 128 - code if code < 0 else code
        if code < 0:
            return "interrupted", f"command ended by signal (exit status {exit_code})"
        if code == 0:
            return "complete", None
        return "error", f"command exited with status {code}"

    async def main() -> object:
        return await serve(options, task, child, extra={"command": list(command)})

    session, status = run_async(main)
    if spawn_error is not None:
        click.echo(f"Error: {spawn_error}", err=True)
        sys.exit(exit_code)
    click.echo(session.summary(), err=True)
    if session.recording_error is not None:
        click.echo(f"Error: {session.recording_error_text()}", err=True)
        sys.exit(ExitCode.FAILED)
    sys.exit(ExitCode.BUDGET if status == "budget_exceeded" else exit_code)


def _unrunnable(path: str) -> str | None:
    """Why ``exec`` of ``path`` would fail, found before anything is written, or
    None. A directory, a file without execute permission, a ``#!`` whose
    interpreter is missing or not an executable file, or (where no binfmt_misc
    handler could take it) a file that is neither a script nor an ELF program."""
    if os.path.isdir(path):
        return "it is a directory"
    if not os.path.exists(path):
        return "no such file"
    if not os.access(path, os.X_OK):
        return "it is not executable (chmod +x?)"
    try:
        with open(path, "rb") as file:
            head = file.read(256)
    except OSError as exc:
        return exc.strerror or str(exc)
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        if not words:
            return "its #! line names no interpreter"
        interpreter = os.fsdecode(words[0])
        if os.path.isdir(interpreter):
            return f"its interpreter {interpreter} is a directory"
        if not os.path.exists(interpreter):
            return f"its interpreter {interpreter} does not exist"
        if not os.access(interpreter, os.X_OK):
            return f"its interpreter {interpreter} is not executable"
        return None
    if not head.startswith(b"\x7fELF") and not _binfmt_handlers():
        return "not a program or a script (no #! line)"
    return None


def _binfmt_handlers() -> bool:
    """True when binfmt_misc has handlers that may run other formats."""
    try:
        names = os.listdir("/proc/sys/fs/binfmt_misc")
    except OSError:
        return False
    return any(name not in ("register", "status") for name in names)


def _seconds(text: str) -> float | None:
    """``text`` as a finite number of seconds above 0, else None."""
    import math

    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None
