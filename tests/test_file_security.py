"""Owner-only modes whatever the umask, symlinks refused, session IDs validated."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sigil.telemetry.file_security import (
    InvalidSessionId,
    UnsafePathError,
    check_not_symlink,
    ensure_private_dir,
    ensure_private_file,
    secure_log_directory,
    validate_session_id,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_ensure_private_dir_creates_0700_chain(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "home" / "logs" / "sessions" / "s1"
    assert ensure_private_dir(target) == target
    for directory in (target, target.parent, target.parent.parent, tmp_path / "home"):
        assert mode(directory) == 0o700, directory
    ensure_private_dir(target)  # idempotent
    assert mode(target) == 0o700


def test_ensure_private_dir_refuses_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    os.chmod(elsewhere, 0o755)
    link = tmp_path / "sessions" / "s1"
    link.parent.mkdir()
    link.symlink_to(elsewhere)
    with pytest.raises(UnsafePathError) as caught:
        ensure_private_dir(link)
    assert str(link) in str(caught.value) and "symbolic link" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert mode(elsewhere) == 0o755  # the target was not touched


def test_ensure_private_dir_refuses_a_dangling_symlink_and_a_file(tmp_path: Path) -> None:
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafePathError):
        ensure_private_dir(dangling)
    assert not (tmp_path / "nowhere").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UnsafePathError, match="not a directory"):
        ensure_private_dir(a_file)


def test_parent_symlinks_are_allowed(tmp_path: Path) -> None:
    real = tmp_path / "disk"
    real.mkdir()
    (tmp_path / "home").symlink_to(real)
    ensure_private_dir(tmp_path / "home" / "logs")
    assert mode(real / "logs") == 0o700


def test_ensure_private_file_creates_0600_and_keeps_content(tmp_path: Path, umask: int) -> None:
    created = tmp_path / "new.jsonl"
    ensure_private_file(created)
    assert mode(created) == 0o600 and created.read_bytes() == b""
    existing = tmp_path / "old.jsonl"
    existing.write_bytes(b"line\n")
    os.chmod(existing, 0o644)
    ensure_private_file(existing)
    assert mode(existing) == 0o600
    assert existing.read_bytes() == b"line\n"


def test_ensure_private_file_refuses_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "id_rsa"
    target.write_text("secret")
    os.chmod(target, 0o644)
    link = tmp_path / "execution.jsonl"
    link.symlink_to(target)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        ensure_private_file(link)
    assert mode(target) == 0o644 and target.read_text() == "secret"
    dangling = tmp_path / "tokens.json"
    dangling.symlink_to(tmp_path / "planted")
    with pytest.raises(UnsafePathError):
        ensure_private_file(dangling)
    assert not (tmp_path / "planted").exists()


def test_ensure_private_file_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ensure_private_file(tmp_path)


def test_check_not_symlink(tmp_path: Path) -> None:
    check_not_symlink(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    check_not_symlink(tmp_path / "file")
    check_not_symlink(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "file")
    with pytest.raises(UnsafePathError):
        check_not_symlink(tmp_path / "link")


def test_secure_log_directory_fixes_a_tree_without_following_links(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    session = logs / "sessions" / "s1"
    session.mkdir(parents=True)
    (session / "execution.jsonl").write_text("{}\n")
    for path in (logs, logs / "sessions", session):
        os.chmod(path, 0o755)
    os.chmod(session / "execution.jsonl", 0o644)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o644)
    outside_dir = tmp_path / "outside-dir"
    outside_dir.mkdir()
    os.chmod(outside_dir, 0o755)
    (logs / "current.jsonl").symlink_to(outside)
    (logs / "sessions" / "linked").symlink_to(outside_dir)

    secure_log_directory(logs)

    for directory in (logs, logs / "sessions", session):
        assert mode(directory) == 0o700
    assert mode(session / "execution.jsonl") == 0o600
    assert mode(outside) == 0o644
    assert mode(outside_dir) == 0o755


def test_secure_log_directory_creates_and_refuses_a_symlinked_root(tmp_path: Path) -> None:
    secure_log_directory(tmp_path / "fresh")
    assert mode(tmp_path / "fresh") == 0o700
    (tmp_path / "linked").symlink_to(tmp_path / "fresh")
    with pytest.raises(UnsafePathError):
        secure_log_directory(tmp_path / "linked")


@pytest.mark.parametrize("good", ["test-1", "production_abc123", "a", "Z" * 64])
def test_valid_session_ids(good: str) -> None:
    assert validate_session_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "../etc", "a/b", "a b", "x" * 65, ".", "..", "s1\n", "é", "a\x00b"]
)
def test_invalid_session_ids(bad: str) -> None:
    with pytest.raises(InvalidSessionId):
        validate_session_id(bad)
