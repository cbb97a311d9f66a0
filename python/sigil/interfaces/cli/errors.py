"""Exit codes and usage errors, shared by every ``sigil`` command.

One convention for the whole CLI (README "Commands and exit codes"): 0 done,
1 failed (or incomplete), 2 bad usage (one line on stderr, nothing written),
3 the token budget ran out, and the shell's codes for signals: 130 after SIGINT,
143 after SIGTERM.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NoReturn

import click

__all__ = ["ExitCode", "OneLineCommand", "UsageFailure", "usage"]


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    BUDGET = 3
    INTERRUPTED = 130  # 128 + SIGINT
    TERMINATED = 143  # 128 + SIGTERM


class UsageFailure(click.ClickException):
    """Bad input: one line (``Error: ...``) and exit code 2.

    A :class:`click.UsageError` raised inside a command gets its context
    attached by click and prints the usage block and a help hint too, three
    lines where the user needs one sentence that says what to do.
    """

    exit_code = ExitCode.USAGE


def usage(message: str) -> NoReturn:
    raise UsageFailure(message)


class OneLineCommand(click.Command):
    """A command whose click parsing errors (unknown option, missing value) are one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise UsageFailure(
                f"{exc.format_message()} (see '{ctx.command_path} --help')"
            ) from None
