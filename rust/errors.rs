//! Mapping Rust failures to Python exceptions (ARCHITECTURE.md contract 10).
//!
//! I/O errors become `OSError(errno, strerror, filename)` (CPython picks the
//! subclass, e.g. `FileNotFoundError`, from the errno); bad input becomes
//! `ValueError`; a panic, which would be a bug, becomes `RuntimeError` instead
//! of crossing into Python.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// `io::Error` as `OSError`, naming the file when there is one.
pub fn os_error(e: &io::Error, path: Option<&Path>) -> PyErr {
    let text = e.to_string();
    // Rust appends " (os error N)"; Python shows "[Errno N]" itself.
    let text = match text.rfind(" (os error ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    };
    match (e.raw_os_error(), path) {
        (Some(code), Some(p)) => PyOSError::new_err((code, text, p.display().to_string())),
        (Some(code), None) => PyOSError::new_err((code, text)),
        (None, Some(p)) => PyOSError::new_err(format!("{text}: {}", p.display())),
        (None, None) => PyOSError::new_err(text),
    }
}

pub fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// Run `f`, turning a panic into a Python `RuntimeError`.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, PyErr>) -> Result<T, PyErr> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let detail = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(PyRuntimeError::new_err(format!(
                "internal error in sigil._native ({what}): {detail}; please report it"
            )))
        }
    }
}

/// The same for code that runs without the GIL and returns plain Rust errors.
pub fn guard_io<T>(f: impl FnOnce() -> io::Result<T>) -> Result<io::Result<T>, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string())
    })
}
