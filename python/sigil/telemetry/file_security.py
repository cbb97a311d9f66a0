"""The spec's import path for owner-only permissions and symlink refusal.

The code lives in :mod:`sigil.core.file_security`: ``core`` (the session lock among
others) needs it and imports nothing above itself (ARCHITECTURE.md, Layers).
"""

from sigil.core.file_security import (
    DIR_MODE,
    FILE_MODE,
    InvalidSessionId,
    UnsafePathError,
    check_not_symlink,
    ensure_private_dir,
    ensure_private_file,
    secure_log_directory,
    symlink_error,
    validate_session_id,
    write_private_atomic,
)

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "InvalidSessionId",
    "UnsafePathError",
    "check_not_symlink",
    "ensure_private_dir",
    "ensure_private_file",
    "secure_log_directory",
    "symlink_error",
    "validate_session_id",
    "write_private_atomic",
]
