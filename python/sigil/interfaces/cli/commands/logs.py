"""``sigil logs``: rotate, archive and clean up session logs (spec 7.3, Appendix C).

Thin on purpose: each subcommand merges ``--log-path`` with the settings
(contract 9), hands the work to :class:`sigil.telemetry.log_rotation.LogRotator`
and prints what it did, or with ``--dry-run`` what it would do. A session or
archive that could not be handled is reported on stderr and makes the exit code
1; the others are still processed. Imports happen inside the commands so that
``sigil --help`` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sigil.interfaces.cli.errors import UsageFailure

if TYPE_CHECKING:
    from sigil.telemetry.log_rotation import LogRotator

_F = TypeVar("_F", bound=Callable[..., Any])


def _options(command: _F) -> _F:
    """The options every ``logs`` subcommand takes."""
    command = click.option(
        "--log-path",
        "-l",
        metavar="DIR",
        help="Base log directory (default: logging.path, ~/.sigil/logs).",
    )(command)
    command = click.option(
        "--json", "as_json", is_flag=True, help="Print the result as one JSON object."
    )(command)
    return click.option(
        "--dry-run", "-n", is_flag=True, help="Show what would be done; change nothing."
    )(command)


@click.group("logs", context_settings={"help_option_names": ["-h", "--help"]})
def logs() -> None:
    """Rotate, archive and clean up session logs.

    Limits come from config.yaml (logging.max_file_size_mb, retention_days,
    archive_retention_days). Sessions that are running are never archived.
    """


@logs.command("rotate")
@_options
def rotate(dry_run: bool, as_json: bool, log_path: str | None) -> None:
    """Rotate session logs larger than logging.max_file_size_mb.

    Safe while a session is being written: the writer and any monitor follow
    the rename without losing an event.
    """

    def action(rotator: LogRotator) -> dict[str, Any]:
        return {"rotated": [str(p) for p in rotator.rotate_large_logs(dry_run)]}

    _run(action, dry_run, as_json, log_path)


@logs.command("archive")
@_options
def archive(dry_run: bool, as_json: bool, log_path: str | None) -> None:
    """Archive sessions idle for logging.retention_days into archive/<date>/<id>.tar.gz."""

    def action(rotator: LogRotator) -> dict[str, Any]:
        archived = rotator.archive_old_sessions(dry_run)
        return {"sessions_archived": len(archived), "archived_paths": [str(p) for p in archived]}

    _run(action, dry_run, as_json, log_path)


@logs.command("cleanup")
@_options
def cleanup(dry_run: bool, as_json: bool, log_path: str | None) -> None:
    """Delete archives older than logging.archive_retention_days."""

    def action(rotator: LogRotator) -> dict[str, Any]:
        cleaned = rotator.cleanup_old_archives(dry_run)
        return {"archives_cleaned": len(cleaned), "cleaned_paths": [str(p) for p in cleaned]}

    _run(action, dry_run, as_json, log_path)


@logs.command("maintain")
@_options
def maintain(dry_run: bool, as_json: bool, log_path: str | None) -> None:
    """Rotate, archive and clean up, in that order (suitable for cron).

    Then brings the report index (sigil report) up to date, if there is one.
    """

    def action(rotator: LogRotator) -> dict[str, Any]:
        result = rotator.run_maintenance(dry_run)
        if not dry_run:
            result["report_index"] = _update_report_index(rotator)
        return result

    _run(action, dry_run, as_json, log_path)


def _update_report_index(rotator: LogRotator) -> dict[str, Any] | None:
    """After rotating, archiving and cleaning up: bring the report index up to
    date (issue 13), so archived sessions are found in their archives (once)
    and removed ones drop out. Only when an index exists (None otherwise: none
    is made). A failure is one warning line and leaves the exit status alone;
    the next ``sigil report`` refreshes the index anyway."""
    from sigil.reports.index import INDEX_FILE_NAME, IndexNotUpdated, update_existing

    if not (rotator.log_path / INDEX_FILE_NAME).is_file():
        return None
    try:
        state = update_existing(rotator.log_path, repair=True)
    except IndexNotUpdated as exc:
        click.echo(f"warning: report index not updated: {exc}", err=True)
        return {"updated": False, "error": str(exc)}
    if state is None:  # removed meanwhile: nothing to update
        return None
    return {
        "updated": True,
        "rebuilt": state.rebuilt,
        "sources": state.sources,
        "refolded": state.refolded,
        "removed": state.removed,
    }


def _run(
    action: Callable[[LogRotator], dict[str, Any]],
    dry_run: bool,
    as_json: bool,
    log_path: str | None,
) -> None:
    from sigil.core.config import load_settings
    from sigil.telemetry.log_rotation import LogRotator, MaintenanceBusy

    settings = load_settings({"logging.path": log_path})
    rotator = LogRotator.from_settings(settings)
    base = rotator.log_path
    if base.exists() and not base.is_dir():
        # Bad usage, like `sigil sessions` and `sigil orchestrate` say it.
        raise UsageFailure(f"log path {str(base)!r} is not a directory")
    try:
        result = action(rotator)
    except MaintenanceBusy as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{rotator.log_path}: {exc.strerror or exc}") from None
    result["errors"] = list(rotator.errors)
    result["dry_run"] = dry_run
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_human(result, dry_run)
    for error in rotator.errors:
        click.echo(f"error: {error}", err=True)
    if rotator.errors:
        raise SystemExit(1)


_SECTIONS = (
    ("rotated", "rotated", "log"),
    ("archived_paths", "archived", "session"),
    ("cleaned_paths", "removed", "archive day"),
)


def _print_human(result: dict[str, Any], dry_run: bool) -> None:
    counts: list[str] = []
    for key, verb, noun in _SECTIONS:
        if key not in result:
            continue
        paths = result[key]
        for path in paths:
            click.echo(f"{'would be ' if dry_run else ''}{verb}: {path}")
        counts.append(f"{len(paths)} {noun}{'' if len(paths) == 1 else 's'} {verb}")
    click.echo(", ".join(counts) + (" (dry run: nothing was changed)" if dry_run else ""))
    index = result.get("report_index")
    if index and index.get("updated"):
        click.echo(
            f"report index updated: {index['refolded']} refolded, {index['removed']} removed"
            + (" (rebuilt)" if index["rebuilt"] else "")
        )
