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
     found, or the session is already running (nothing is written)
  3  the session's token budget ran out

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
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND...")
def run(
    session_id: str | None,
    budget: str | None,
    upstream: str | None,
    call_cap: str | None,
    timeout: str | None,
    log_path: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with its OpenAI calls metered and budgeted in a session."""
    if not command:
        usage("give the command to run after --, e.g. sigil run -- python agent.py")
    program = command[0]
    if os.sep not in program and shutil.which(program) is None:
        usage(f"command not found: {program}")
    if os.sep in program and not os.access(program, os.X_OK):
        usage(f"command not executable: {program}")
    from sigil.interfaces.cli.commands.proxy import check_options, run_async, serve

    options = check_options(
        session_id=session_id, budget=budget, upstream=upstream, port=0, host=None,
        token=None, log_path=log_path, call_cap=call_cap, timeout=timeout,
    )  # fmt: skip
    task = " ".join(command)[:500]
    exit_code: int = ExitCode.FAILED

    def announce(url: str) -> None:
        click.echo(f"sigil: session {options.session_id} · proxy {url}", err=True)

    async def child(url: str, meter: Meter) -> tuple[str, str | None]:
        import asyncio
        import signal

        nonlocal exit_code
        env = {**os.environ, "OPENAI_BASE_URL": url, "OPENAI_API_BASE": url,
               "SIGIL_SESSION": options.session_id}  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*command, env=env)
        loop = asyncio.get_running_loop()
        received: list[int] = []

        def forward(signum: int) -> None:
            # Ctrl-C reaches the child from the terminal too; SIGTERM sent to
            # sigil alone is passed on. Either way the child decides when to end.
            received.append(signum)
            if proc.returncode is None:
                proc.send_signal(signum)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, forward, signum)
        code = await proc.wait()
        exit_code = 128 - code if code < 0 else code
        if code < 0 or received:
            return "interrupted", f"command ended by signal (exit status {exit_code})"
        if code == 0:
            return "complete", None
        return "error", f"command exited with status {code}"

    async def main() -> object:
        return await serve(
            options, task, child, announce=announce, extra={"command": list(command)}
        )

    session, status = run_async(main)
    click.echo(session.summary(), err=True)
    if session.recording_error is not None:
        click.echo(f"Error: {session.recording_error_text()}", err=True)
        sys.exit(ExitCode.FAILED)
    sys.exit(ExitCode.BUDGET if status == "budget_exceeded" else exit_code)
