"""The ``sigil`` entry point (the console script and ``python -m sigil``).

Nothing heavy is imported here: the command group (click, and each subcommand
when it is invoked) lives in :mod:`sigil.interfaces.cli.group`. For
``sigil monitor`` on a session whose log is already there, the catch-up fold
starts first (:mod:`sigil.interfaces.cli.early`), so that it runs, natively and
without the GIL, while click and the command are imported; and a plain
dashboard command line (``sigil monitor -s ID`` on a terminal) runs without
click at all (:func:`sigil.interfaces.cli.early.run_monitor_without_click`),
anything else falling back to the click command.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Console-script entry point (see :func:`sigil.interfaces.cli.group.run`)."""
    if sys.argv[1:2] != ["monitor"]:
        from sigil.interfaces.cli.group import run

        run()
        return
    from sigil.interfaces.cli import early

    early.pause_gc()
    try:
        early.start_monitor_catch_up_from_argv(sys.argv[1:])
        try:
            # A plain dashboard command line runs (and exits) here, without click.
            early.run_monitor_without_click(sys.argv[1:])
        except KeyboardInterrupt:
            sys.exit(130)  # as the click path (ExitCode.INTERRUPTED)
        from sigil.interfaces.cli.group import run

        run()
    finally:
        early.resume_gc()


def __getattr__(name: str) -> object:
    # ``cli`` (the click group) used to live here; importing it costs click.
    if name == "cli":
        from sigil.interfaces.cli.group import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
