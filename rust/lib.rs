//! `sigil._native`: the Python binding over the pure-Rust hot paths.
//!
//! This file holds the bindings: argument checks, conversions between Rust and
//! Python values, errors, and the GIL. The logic lives in `writer`, `tailer`,
//! `parse` and `fold`, which know nothing of Python; `snapshot` holds the
//! session model's typed classes. Every call that touches the disk or loops
//! over bytes releases the GIL.

pub mod archive;
pub mod cost;
pub mod errors;
pub mod fold;
pub mod fxhash;
pub mod ledger;
pub mod many;
pub mod otlp;
pub mod parse;
pub mod proxy;
pub mod pyjson;
pub mod sanitize;
pub mod scan;
pub mod segments;
pub mod select;
pub mod snapshot;
pub mod tailer;
pub mod writer;

use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::errors::{guard, guard_io, os_error, value_error};
use crate::fold::{FoldState, DEFAULT_MAX_LINE};
use crate::parse::{Event, Malformed};
use crate::snapshot::PyMalformedLine;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn panic_err(what: &str, detail: String) -> PyErr {
    PyRuntimeError::new_err(format!(
        "internal error in sigil._native ({what}): {detail}; please report it"
    ))
}

/// Run blocking I/O without the GIL and with panics caught.
fn detached_io<T: Send>(
    py: Python<'_>,
    what: &str,
    path: Option<&std::path::Path>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(|| guard_io(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(os_error(&e, path)),
        Err(detail) => Err(panic_err(what, detail)),
    }
}

// ---------------------------------------------------------------------------
// Parsed records

/// One parsed event. Fields are plain attributes; `metadata` is parsed from
/// its JSON text on first access.
#[pyclass(frozen, module = "sigil._native", name = "ParsedEntry")]
pub struct PyEntry {
    event: Event,
    metadata: OnceLock<Py<PyAny>>,
}

#[pymethods]
impl PyEntry {
    #[getter]
    fn timestamp(&self) -> &str {
        &self.event.timestamp
    }
    #[getter]
    fn session_id(&self) -> &str {
        &self.event.session_id
    }
    #[getter]
    fn event_type(&self) -> &str {
        &self.event.event_type
    }
    #[getter]
    fn component(&self) -> &str {
        &self.event.component
    }
    #[getter]
    fn message(&self) -> &str {
        &self.event.message
    }
    #[getter]
    fn tokens(&self) -> u64 {
        self.event.tokens
    }
    #[getter]
    fn seq(&self) -> Option<u64> {
        self.event.seq
    }
    #[getter]
    fn offset(&self) -> u64 {
        self.event.offset
    }
    #[getter]
    fn metadata_json(&self) -> &str {
        &self.event.metadata
    }
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if let Some(v) = self.metadata.get() {
            return Ok(v.bind(py).clone());
        }
        let value: serde_json::Value = serde_json::from_str(&self.event.metadata)
            .map_err(|e| value_error(format!("metadata is not valid JSON: {e}")))?;
        let obj = json_to_py(py, &value)?;
        let _ = self.metadata.set(obj.clone().unbind());
        Ok(obj)
    }

    /// The entry as a dict with the log line's keys.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("timestamp", &self.event.timestamp)?;
        d.set_item("session_id", &self.event.session_id)?;
        d.set_item("event_type", &self.event.event_type)?;
        d.set_item("component", &self.event.component)?;
        d.set_item("message", &self.event.message)?;
        d.set_item("tokens", self.event.tokens)?;
        d.set_item("metadata", self.metadata(py)?)?;
        d.set_item("seq", self.event.seq)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let seq = self
            .event
            .seq
            .map_or_else(|| "None".to_string(), |s| s.to_string());
        format!(
            "ParsedEntry(seq={seq}, event_type={:?}, component={:?}, tokens={}, offset={})",
            self.event.event_type, self.event.component, self.event.tokens, self.event.offset
        )
    }
}

pub(crate) fn entry(py: Python<'_>, event: Event) -> PyResult<Bound<'_, PyEntry>> {
    Bound::new(
        py,
        PyEntry {
            event,
            metadata: OnceLock::new(),
        },
    )
}

pub(crate) fn json_to_py<'py>(
    py: Python<'py>,
    v: &serde_json::Value,
) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let items = a
                .iter()
                .map(|x| json_to_py(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// A reject of the parser (a line that is not an event) as Python sees it.
fn malformed_line(m: Malformed) -> PyMalformedLine {
    PyMalformedLine {
        offset: m.offset,
        kind: "malformed",
        reason: m.reason,
    }
}

fn entries_result<'py>(
    py: Python<'py>,
    events: Vec<Event>,
    bad: Vec<PyMalformedLine>,
) -> PyResult<Bound<'py, PyTuple>> {
    let list = PyList::empty(py);
    for e in events {
        list.append(entry(py, e)?)?;
    }
    let bad = PyList::new(py, bad)?;
    PyTuple::new(py, [list.into_any(), bad.into_any()])
}

/// Offsets, seqs and counts are 64-bit; inputs near the top would wrap.
const MAX_START: u64 = 1 << 62;

fn check_offset(base_offset: u64) -> PyResult<()> {
    if base_offset > MAX_START {
        return Err(value_error(format!(
            "base_offset must be at most 2**62, not {base_offset}"
        )));
    }
    Ok(())
}

/// Parse lines (each `bytes`, with or without its newline) into
/// `(entries, malformed)`; `malformed` holds `MalformedLine`s.
#[pyfunction]
#[pyo3(signature = (lines, base_offset = 0))]
fn parse_lines<'py>(
    py: Python<'py>,
    lines: Vec<PyBackedBytes>,
    base_offset: u64,
) -> PyResult<Bound<'py, PyTuple>> {
    check_offset(base_offset)?;
    let (events, bad) = guard("parse_lines", || {
        Ok(py.detach(|| {
            let chunks: Vec<&[u8]> = lines.iter().map(|b| &b[..]).collect();
            parse::parse_chunks(&chunks, base_offset, false)
        }))
    })?;
    entries_result(py, events, bad.into_iter().map(malformed_line).collect())
}

/// Parse a block of newline-separated lines; an unterminated last line is
/// reported as malformed.
#[pyfunction]
#[pyo3(signature = (data, base_offset = 0))]
fn parse_bytes<'py>(
    py: Python<'py>,
    data: PyBackedBytes,
    base_offset: u64,
) -> PyResult<Bound<'py, PyTuple>> {
    check_offset(base_offset)?;
    let (events, bad) = guard("parse_bytes", || {
        Ok(py.detach(|| parse::parse_chunks(&[&data[..]], base_offset, true)))
    })?;
    entries_result(py, events, bad.into_iter().map(malformed_line).collect())
}

// ---------------------------------------------------------------------------
// Fold

/// Accumulates a session's totals across files (rotated segments, then the
/// live file through a `Tailer`).
#[pyclass(frozen, module = "sigil._native", name = "Fold")]
pub struct PyFold {
    state: Mutex<FoldState>,
}

#[pymethods]
impl PyFold {
    #[new]
    #[pyo3(signature = (last_n = 100))]
    fn new(last_n: usize) -> Self {
        PyFold {
            state: Mutex::new(FoldState::new(last_n)),
        }
    }

    /// Fold a whole file; returns the offset just past its last complete line.
    #[pyo3(signature = (path, max_line_bytes = DEFAULT_MAX_LINE))]
    fn feed_file(&self, py: Python<'_>, path: PathBuf, max_line_bytes: usize) -> PyResult<u64> {
        let p = path.clone();
        detached_io(py, "Fold.feed_file", Some(&path), || {
            let mut st = lock(&self.state);
            fold::fold_path(&mut st, &p, max_line_bytes)
        })
    }

    /// Fold a block of bytes (whole lines; a trailing partial line is ignored
    /// and reported as a torn tail).
    #[pyo3(signature = (data, base_offset = 0))]
    fn feed_bytes(&self, py: Python<'_>, data: PyBackedBytes, base_offset: u64) -> PyResult<u64> {
        check_offset(base_offset)?;
        detached_io(py, "Fold.feed_bytes", None, || {
            let mut st = lock(&self.state);
            let mut reader = &data[..];
            fold::fold_reader(&mut st, &mut reader, base_offset, DEFAULT_MAX_LINE)
        })
    }

    /// An independent fold holding everything folded so far: a reader that
    /// must fold one more line to learn what it does (which run a
    /// `session_start` opens) keeps the fold from before it.
    #[pyo3(name = "copy")]
    fn py_copy(&self, py: Python<'_>) -> PyResult<PyFold> {
        Ok(PyFold {
            state: Mutex::new(self.copy(py)?),
        })
    }

    /// The totals as a dict (the pre-snapshot form; prefer `snapshot()`).
    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.copy(py)?;
        snapshot::legacy_summary(py, &st)
    }

    /// A typed snapshot of everything folded so far (cheap: a monitor takes
    /// one per frame). With the session's `ledger`, the whole history's
    /// tokens, components and runs: the runs only the ledger knows (their
    /// events rotated or deleted by an external tool) count too.
    ///
    /// `writer_gone`: the session's writer is gone (nobody holds its lock),
    /// so the calls its last run left unended are held (`FoldState::settled`).
    #[pyo3(signature = (ledger = None, writer_gone = false))]
    fn snapshot(
        &self,
        py: Python<'_>,
        ledger: Option<&PyLedger>,
        writer_gone: bool,
    ) -> PyResult<snapshot::PySessionSnapshot> {
        let st = self.copy(py)?;
        let st = st.settled(writer_gone);
        snapshot::session_joined(py, &st, ledger.and_then(|l| l.doc.as_ref()))
    }

    /// Fold one event given by its fields, for a reader that holds events
    /// rather than lines (the span mapping). The same rules as a line's: an
    /// event whose `metadata_json` is not a JSON object is malformed.
    #[pyo3(signature = (timestamp, event_type, component, tokens, seq = None, metadata_json = "{}", message = "", session_id = "", offset = 0))]
    #[allow(clippy::too_many_arguments)]
    fn feed_event(
        &self,
        timestamp: &str,
        event_type: &str,
        component: &str,
        tokens: u64,
        seq: Option<u64>,
        metadata_json: &str,
        message: &str,
        session_id: &str,
        offset: u64,
    ) -> PyResult<()> {
        let text = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
        let mut line = String::with_capacity(128 + metadata_json.len() + message.len());
        line.push_str("{\"timestamp\":");
        line.push_str(&text(timestamp));
        line.push_str(",\"session_id\":");
        line.push_str(&text(session_id));
        line.push_str(",\"event_type\":");
        line.push_str(&text(event_type));
        line.push_str(",\"component\":");
        line.push_str(&text(component));
        line.push_str(",\"message\":");
        line.push_str(&text(message));
        line.push_str(",\"tokens\":");
        line.push_str(&tokens.to_string());
        line.push_str(",\"metadata\":");
        line.push_str(metadata_json);
        if let Some(seq) = seq {
            line.push_str(",\"seq\":");
            line.push_str(&seq.to_string());
        }
        line.push('}');
        // One short line: the GIL is kept (releasing it per event would cost
        // more than the fold, and a busy thread would wait to get it back).
        guard("Fold.feed_event", || {
            lock(&self.state).feed_line(line.as_bytes(), offset);
            Ok(())
        })
    }

    /// The tokens of everything folded so far (no snapshot taken).
    #[getter]
    fn tokens(&self, py: Python<'_>) -> PyResult<u64> {
        guard("Fold.tokens", || Ok(py.detach(|| lock(&self.state).tokens)))
    }

    /// `(cost_nanousd, priced_events, unpriced_tokens)` of everything folded so
    /// far: the snapshot's cost, without building a snapshot (the span mapping
    /// prices every span, and a snapshot clones the whole state).
    fn cost(&self, py: Python<'_>) -> PyResult<(u64, u64, u64)> {
        guard("Fold.cost", || {
            Ok(py.detach(|| {
                let c = snapshot::fold_cost(&lock(&self.state));
                (c.nanousd, c.priced, c.unpriced_tokens)
            }))
        })
    }

    /// The whole session's history: this fold of the log joined with the
    /// session's ledger (`tokens.json`), if one was read and is usable.
    /// `writer_gone` as for `snapshot` (a writer that holds the lock and has
    /// not started its run: the last run's writer is gone).
    #[pyo3(signature = (ledger = None, writer_gone = false))]
    fn history(
        &self,
        py: Python<'_>,
        ledger: Option<&PyLedger>,
        writer_gone: bool,
    ) -> PyResult<snapshot::PySessionHistory> {
        let st = self.copy(py)?;
        let st = st.settled(writer_gone);
        let (doc, problem) = ledger.map_or((None, None), |l| (l.doc.as_ref(), l.problem.clone()));
        snapshot::history(py, Some(&st), doc, problem)
    }

    /// Fold `path` from `checkpoint` (the same file, `offset` a line start
    /// this fold stopped at) or, without one, from its start. Returns where
    /// the next call continues; None, folding nothing, when `path` is no
    /// longer the checkpoint's file (renamed away, replaced) or is shorter
    /// than its offset (truncated): the caller folds the log again then.
    #[pyo3(signature = (path, checkpoint = None, max_line_bytes = DEFAULT_MAX_LINE))]
    fn continue_file(
        &self,
        py: Python<'_>,
        path: PathBuf,
        checkpoint: Option<&Bound<'_, PyCheckpoint>>,
        max_line_bytes: usize,
    ) -> PyResult<Option<PyCheckpoint>> {
        use std::os::unix::fs::MetadataExt;
        let checkpoint = checkpoint.map(|c| *c.get());
        let p = path.clone();
        detached_io(py, "Fold.continue_file", Some(&path), || {
            let file = segments::open_regular(&p)?;
            let meta = file.metadata()?;
            let start = match checkpoint {
                Some(c) if (c.dev, c.ino) != (meta.dev(), meta.ino()) || meta.len() < c.offset => {
                    return Ok(None)
                }
                Some(c) => c.offset,
                None => 0,
            };
            let mut st = lock(&self.state);
            let threads = fold::fold_threads();
            let end = fold::fold_range(&mut st, &file, start, None, max_line_bytes, threads)?;
            Ok(Some(PyCheckpoint {
                dev: meta.dev(),
                ino: meta.ino(),
                offset: end,
                fp_len: 0,
                fp_crc: 0,
            }))
        })
    }
}

/// The session's ledger, `tokens.json`, read and checked (`ledger.rs`):
/// usable (`present`), absent, or a `problem` told in words.
#[pyclass(frozen, module = "sigil._native", name = "Ledger")]
pub struct PyLedger {
    doc: Option<ledger::Ledger>,
    problem: Option<String>,
}

#[pymethods]
impl PyLedger {
    /// Read `path` (at most `ledger.MAX_LEDGER_BYTES`, without the GIL).
    #[staticmethod]
    fn read(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let read = py
            .detach(|| guard_io(|| Ok(ledger::read(&path))))
            .map_err(|detail| panic_err("Ledger.read", detail))?;
        Ok(match read {
            Ok(Ok(doc)) => PyLedger { doc, problem: None },
            Ok(Err(problem)) => PyLedger {
                doc: None,
                problem: Some(problem),
            },
            Err(e) => return Err(os_error(&e, Some(&path))),
        })
    }

    /// No ledger at all (the log alone is the history).
    #[staticmethod]
    fn absent() -> Self {
        PyLedger {
            doc: None,
            problem: None,
        }
    }

    /// A usable ledger was read.
    #[getter]
    fn present(&self) -> bool {
        self.doc.is_some()
    }

    /// Why the file is not a usable ledger (None when it is, or is absent).
    #[getter]
    fn problem(&self) -> Option<String> {
        self.problem.clone()
    }

    /// The last `seq` the ledger covers.
    #[getter]
    fn last_seq(&self) -> Option<u64> {
        self.doc.as_ref().map(|d| d.last_seq)
    }

    /// Whether the ledger alone is the history: it was written from exactly
    /// these log files (`(name, size, mtime_ns)`, oldest first) and no run is
    /// left to resume.
    fn unchanged(&self, files: Vec<(String, u64, i64)>) -> bool {
        let files: Vec<ledger::LogFile> = files
            .into_iter()
            .map(|(name, size, mtime_ns)| ledger::LogFile {
                name,
                size,
                mtime_ns,
            })
            .collect();
        self.doc.as_ref().is_some_and(|d| d.unchanged(&files))
    }

    /// The history from the ledger alone (no fold of the log).
    fn history(&self, py: Python<'_>) -> PyResult<snapshot::PySessionHistory> {
        match &self.doc {
            Some(doc) => snapshot::history(py, None, Some(doc), None),
            None => Err(value_error("no usable ledger")),
        }
    }

    fn __repr__(&self) -> String {
        match (&self.doc, &self.problem) {
            (Some(d), _) => format!("Ledger(last_seq={}, runs={})", d.last_seq, d.runs.len()),
            (None, Some(p)) => format!("Ledger(problem={p:?})"),
            (None, None) => "Ledger(absent)".to_string(),
        }
    }
}

impl PyFold {
    /// A copy of the state. The lock is taken without the GIL: a `feed_file`
    /// in another thread holds it while it reads (issue 9, defect 4).
    fn copy(&self, py: Python<'_>) -> PyResult<FoldState> {
        guard("Fold.snapshot", || {
            Ok(py.detach(|| lock(&self.state).clone()))
        })
    }
}

/// Fold one file into a summary dict, in one call without the GIL.
#[pyfunction]
#[pyo3(signature = (path, last_n = 100, max_line_bytes = DEFAULT_MAX_LINE))]
fn fold_file<'py>(
    py: Python<'py>,
    path: PathBuf,
    last_n: usize,
    max_line_bytes: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let st = fold_whole_file(py, path, last_n, max_line_bytes)?;
    snapshot::legacy_summary(py, &st)
}

/// Fold one file into a `SessionSnapshot`, in one call without the GIL.
#[pyfunction]
#[pyo3(signature = (path, last_n = 100, max_line_bytes = DEFAULT_MAX_LINE))]
fn fold_file_snapshot(
    py: Python<'_>,
    path: PathBuf,
    last_n: usize,
    max_line_bytes: usize,
) -> PyResult<snapshot::PySessionSnapshot> {
    let st = fold_whole_file(py, path, last_n, max_line_bytes)?;
    snapshot::session(py, &st)
}

fn fold_whole_file(
    py: Python<'_>,
    path: PathBuf,
    last_n: usize,
    max_line_bytes: usize,
) -> PyResult<FoldState> {
    let p = path.clone();
    detached_io(py, "fold_file", Some(&path), move || {
        let mut st = FoldState::new(last_n);
        fold::fold_path(&mut st, &p, max_line_bytes)?;
        Ok(st)
    })
}

/// Fold many sessions (each the path of its live log) across a small thread
/// pool without the GIL: one `SessionSnapshot` per session, in order, or a
/// one-line reason (a `str` naming the file) for a session that cannot be read.
#[pyfunction]
#[pyo3(signature = (paths, threads = 0, max_line_bytes = DEFAULT_MAX_LINE, last_n = 0))]
fn fold_sessions(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    threads: usize,
    max_line_bytes: usize,
    last_n: usize,
) -> PyResult<Vec<Py<PyAny>>> {
    guard("fold_sessions", || {
        let outcomes = py.detach(|| many::fold_sessions(&paths, threads, max_line_bytes, last_n));
        outcomes
            .into_iter()
            .map(|o| match o {
                Ok(st) => Ok(Py::new(py, snapshot::session(py, &st)?)?.into_any()),
                Err(reason) => Ok(PyString::new(py, &reason).into_any().unbind()),
            })
            .collect()
    })
}

/// The whole history of many sessions (each the path of its live log), as
/// `fold_sessions` folds them: each session's ledger (`tokens.json`) is read
/// too and joined with the fold of its log, which is skipped when the ledger
/// stands for the log. One `HistorySnapshot` per session, in order, or a
/// one-line reason (a `str` naming the file) when its log cannot be read.
#[pyfunction]
#[pyo3(signature = (paths, threads = 0, max_line_bytes = DEFAULT_MAX_LINE, last_n = 0))]
fn read_histories(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    threads: usize,
    max_line_bytes: usize,
    last_n: usize,
) -> PyResult<Vec<Py<PyAny>>> {
    guard("read_histories", || {
        let outcomes = py.detach(|| many::read_histories(&paths, threads, max_line_bytes, last_n));
        outcomes
            .into_iter()
            .map(|o| match o {
                Ok(read) => {
                    let h = snapshot::history(
                        py,
                        read.fold.as_ref(),
                        read.ledger.as_ref(),
                        read.problem,
                    )?;
                    Ok(Py::new(py, h)?.into_any())
                }
                Err(reason) => Ok(PyString::new(py, &reason).into_any().unbind()),
            })
            .collect()
    })
}

/// The `p` quantile (0 to 1) of a latency histogram: bucket counts in the
/// order of a snapshot's `latency_bounds_ms` (the last bucket is above them),
/// e.g. many runs' histograms merged bucket by bucket. The model's own rule
/// (`ComponentTotals::latency_quantile_ms`): the upper bound of the bucket
/// holding rank `ceil(p * n)`, never above `max_ms`, the largest latency seen.
/// None without a timed step.
#[pyfunction]
#[pyo3(signature = (histogram, max_ms, p))]
fn latency_quantile_ms(histogram: Vec<u64>, max_ms: f64, p: f64) -> PyResult<Option<f64>> {
    let mut c = crate::fold::ComponentTotals::default();
    if histogram.len() > c.histogram.len() {
        return Err(value_error(format!(
            "a latency histogram has at most {} buckets, got {}",
            c.histogram.len(),
            histogram.len()
        )));
    }
    if !(0.0..=1.0).contains(&p) {
        return Err(value_error(format!("p must be from 0 to 1, got {p}")));
    }
    for (slot, n) in c.histogram.iter_mut().zip(&histogram) {
        *slot = *n;
    }
    c.timed = histogram.iter().fold(0u64, |a, n| a.saturating_add(*n));
    c.latency_max_ms = max_ms;
    Ok(c.latency_quantile_ms(p))
}

/// The `seq` of the last valid event in a file, reading backwards from its end
/// (at most `max_scan_bytes`; a compressed segment is streamed through); None
/// when none is found.
#[pyfunction]
#[pyo3(signature = (path, max_scan_bytes = 64 << 20))]
fn tail_max_seq(py: Python<'_>, path: PathBuf, max_scan_bytes: u64) -> PyResult<Option<u64>> {
    let p = path.clone();
    detached_io(py, "tail_max_seq", Some(&path), move || {
        tailer::scan_last_seq(&p, max_scan_bytes, DEFAULT_MAX_LINE)
    })
}

// ---------------------------------------------------------------------------
// Writer

/// Above this size a string is scrubbed with the GIL released.
const SANITIZE_DETACH_BYTES: usize = 64 << 10;

/// `value` with every secret replaced by a `***...***` mark: the built-in rules
/// of `sigil.telemetry.sanitization` (the same object when nothing changed).
#[pyfunction]
fn sanitize_string<'py>(value: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyString>> {
    let py = value.py();
    let text = value.to_cow()?;
    let cleaned = if text.len() < SANITIZE_DETACH_BYTES {
        guard("sanitize_string", || Ok(sanitize::sanitize(&text)))?
    } else {
        let text: &str = &text;
        py.detach(|| guard("sanitize_string", || Ok(sanitize::sanitize(text))))?
    };
    Ok(match cleaned {
        // Clean strings, the common case, are returned without a copy.
        std::borrow::Cow::Borrowed(_) => value.clone(),
        std::borrow::Cow::Owned(s) => PyString::new(py, &s),
    })
}

/// Whether a metadata key names a credential (its string values are redacted
/// whatever they hold).
#[pyfunction]
fn is_sensitive_key(key: &str) -> bool {
    sanitize::is_sensitive_key(key)
}

/// Buffered append-only line writer with a background flush thread.
#[pyclass(frozen, module = "sigil._native", name = "AppendWriter")]
pub struct PyAppendWriter {
    inner: writer::AppendWriter,
    path: PathBuf,
}

fn write_err(e: writer::WriteError) -> PyErr {
    match e {
        writer::WriteError::Forked(_) => PyRuntimeError::new_err(e.to_string()),
        _ => value_error(e.to_string()),
    }
}

/// A size argument: any int, out of range being a `ValueError` like any bad size.
fn size_arg(name: &str, v: Option<&Bound<'_, PyAny>>, default: u64) -> PyResult<u64> {
    let Some(v) = v else { return Ok(default) };
    v.extract::<u64>().map_err(|_| {
        let shown = v.repr().map_or_else(|_| "?".to_string(), |r| r.to_string());
        value_error(format!(
            "{name} must be an int from 1 to {} (256 MiB), not {shown}",
            writer::MAX_BUFFER_BYTES
        ))
    })
}

impl PyAppendWriter {
    /// While the buffer is (nearly) full on a healthy disk, wait for room with
    /// the GIL released: the write itself, GIL held, then waits only if other
    /// threads refilled the buffer meanwhile or its line is larger than `need`
    /// by more than a quarter of the buffer's bound.
    fn room(&self, py: Python<'_>, need: usize) {
        if self.inner.may_wait(need) {
            py.detach(|| self.inner.wait_for_room_with_margin(need));
        }
    }

    /// A writer is refused in a forked child (its locks may be held by a thread
    /// that does not exist there).
    fn owned(&self) -> PyResult<()> {
        match self.inner.forked_from() {
            Some(owner) => Err(write_err(writer::WriteError::Forked(owner))),
            None => Ok(()),
        }
    }
}

/// The longest line the logger writes (`execution_logger.MAX_EVENT_BYTES`), and
/// the sizes below which `log_event` cuts nothing (`_CHEAP_*` there): larger
/// parts go the Python way, which cuts them to size.
const MAX_EVENT_BYTES: usize = DEFAULT_MAX_LINE - 4096;
const CHEAP_MESSAGE_BYTES: usize = MAX_EVENT_BYTES / 16;
const CHEAP_METADATA_BYTES: usize = MAX_EVENT_BYTES / 4;
const MAX_NAME_BYTES: usize = 256;

thread_local! {
    /// The metadata's JSON, written here before the buffer lock is taken.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `PyAppendWriter::log_event` (None: declined, nothing done).
fn log_prepared(
    py: Python<'_>,
    w: &writer::AppendWriter,
    event_type: &str,
    component: &str,
    message: &str,
    tokens: &Bound<'_, PyAny>,
    metadata: &Bound<'_, PyAny>,
) -> Option<u64> {
    if !tokens.is_exact_instance_of::<pyo3::types::PyInt>() {
        return None;
    }
    let tokens = tokens
        .extract::<u64>()
        .ok()
        .filter(|&t| t <= parse::MAX_TOKENS)?;
    if message.len() > CHEAP_MESSAGE_BYTES || event_type.len() + component.len() > MAX_NAME_BYTES {
        return None;
    }
    let sanitize = w.sanitizes();
    fn scrub(on: bool, text: &str) -> std::borrow::Cow<'_, str> {
        if on {
            sanitize::sanitize(text)
        } else {
            std::borrow::Cow::Borrowed(text)
        }
    }
    let (event_type, component, message) = (
        scrub(sanitize, event_type),
        scrub(sanitize, component),
        scrub(sanitize, message),
    );
    let (event_type, component): (&str, &str) = (&event_type, &component);
    let dict = if metadata.is_none() {
        None
    } else {
        let d = metadata.cast_exact::<PyDict>().ok()?;
        (!d.is_empty()).then_some(d)
    };
    let Some(dict) = dict else {
        return w
            .write_prepared(event_type, component, &message, tokens, None)
            .ok();
    };
    let run = |out: &mut Vec<u8>| {
        out.clear();
        let ok = pyjson::Encoder::new(py, out, sanitize, CHEAP_METADATA_BYTES).dict(dict, 1);
        let seq = if ok {
            w.write_prepared(event_type, component, &message, tokens, Some(out))
                .ok()
        } else {
            None
        };
        if out.capacity() > 64 << 10 {
            *out = Vec::new();
        }
        seq
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut out) => run(&mut out),
        Err(_) => run(&mut Vec::new()),
    })
}

impl Drop for PyAppendWriter {
    /// An unclosed writer is closed here: its final write and fsync run with
    /// the GIL released, so other threads go on while the disk is slow.
    fn drop(&mut self) {
        let inner = &self.inner;
        let close = || {
            let _ = guard_io(|| inner.close());
        };
        if Python::try_attach(|py| py.detach(close)).is_none() {
            close(); // the interpreter is shutting down: nobody else to wait for us
        }
    }
}

#[pymethods]
impl PyAppendWriter {
    #[new]
    #[pyo3(signature = (path, *, buffer_bytes = None, flush_interval = 0.1, fsync = "interval",
                        max_buffer_bytes = None, session_id = "", start_seq = 0, sanitize = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        buffer_bytes: Option<&Bound<'_, PyAny>>,
        flush_interval: f64,
        fsync: &str,
        max_buffer_bytes: Option<&Bound<'_, PyAny>>,
        session_id: &str,
        start_seq: u64,
        sanitize: bool,
    ) -> PyResult<Self> {
        let policy = writer::FsyncPolicy::parse(fsync).ok_or_else(|| {
            value_error(format!(
                "fsync must be 'always', 'interval' or 'never', not {fsync:?}"
            ))
        })?;
        let max = writer::MAX_BUFFER_BYTES as u64;
        let buffer_bytes = size_arg("buffer_bytes", buffer_bytes, 1024)?;
        let max_buffer_bytes = size_arg("max_buffer_bytes", max_buffer_bytes, 8 << 20)?;
        if buffer_bytes == 0 || buffer_bytes > max {
            return Err(value_error(format!(
                "buffer_bytes must be from 1 to {max} (256 MiB), not {buffer_bytes}"
            )));
        }
        if max_buffer_bytes > max {
            return Err(value_error(format!(
                "max_buffer_bytes must be at most {max} (256 MiB), not {max_buffer_bytes}"
            )));
        }
        if !(flush_interval.is_finite() && flush_interval > 0.0 && flush_interval <= 3600.0) {
            return Err(value_error(
                "flush_interval must be between 0 and 3600 seconds",
            ));
        }
        if start_seq > MAX_START {
            return Err(value_error(format!(
                "start_seq must be at most 2**62, not {start_seq}"
            )));
        }
        if max_buffer_bytes < buffer_bytes {
            return Err(value_error(
                "max_buffer_bytes must be at least buffer_bytes",
            ));
        }
        let cfg = writer::WriterConfig {
            buffer_bytes: buffer_bytes as usize,
            flush_interval: Duration::from_secs_f64(flush_interval),
            fsync: policy,
            max_buffer_bytes: max_buffer_bytes as usize,
            session_id: session_id.to_string(),
            sanitize,
        };
        let p = path.clone();
        let inner = detached_io(py, "AppendWriter()", Some(&path), move || {
            writer::AppendWriter::open(p, cfg, start_seq)
        })?;
        Ok(PyAppendWriter { inner, path })
    }

    /// Queue one line (`bytes` or `str`, with or without its trailing newline).
    fn write(&self, py: Python<'_>, line: &Bound<'_, PyAny>) -> PyResult<()> {
        self.room(py, line.len().unwrap_or(0) + 1);
        if let Ok(b) = line.cast::<PyBytes>() {
            return self.inner.write_line(b.as_bytes()).map_err(write_err);
        }
        if let Ok(s) = line.cast::<PyString>() {
            return self
                .inner
                .write_line(s.to_str()?.as_bytes())
                .map_err(write_err);
        }
        Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "write() takes bytes or str, not {}",
            line.get_type().name()?
        )))
    }

    /// Format one event as a JSON line, assign its `seq`, queue it; returns the seq.
    #[pyo3(signature = (session_id, event_type, component, message, tokens = None, metadata = None, timestamp = None))]
    #[allow(clippy::too_many_arguments)]
    fn write_event(
        &self,
        py: Python<'_>,
        session_id: &str,
        event_type: &str,
        component: &str,
        message: &str,
        tokens: Option<&Bound<'_, PyAny>>,
        metadata: Option<&[u8]>,
        timestamp: Option<&str>,
    ) -> PyResult<u64> {
        let tokens: u64 = match tokens {
            None => 0,
            Some(t) => match t.extract::<u64>() {
                Ok(n) if n <= parse::MAX_TOKENS => n,
                _ => {
                    return Err(value_error(format!(
                        "tokens must be an int from 0 to 2**53, not {}",
                        t.repr().map_or_else(|_| "?".to_string(), |r| r.to_string())
                    )))
                }
            },
        };
        self.room(
            py,
            128 + event_type.len()
                + component.len()
                + message.len()
                + metadata.map_or(2, <[u8]>::len),
        );
        guard("AppendWriter.write_event", || {
            self.inner
                .write_event(
                    session_id, event_type, component, message, tokens, metadata, timestamp,
                )
                .map_err(write_err)
        })
    }

    /// The logger's hot path (`ExecutionLogger.log_event_sync`): the event of
    /// this writer's session with `metadata` (a dict or None) written as JSON
    /// here, exactly as `orjson.dumps` writes it, and scrubbed in the same walk
    /// when the writer scrubs; returns its seq. Returns None, having done
    /// nothing, whenever the Python path must decide: a closed or forked
    /// writer, `tokens` not an int in range, metadata holding anything but
    /// plain dicts (str keys), lists, tuples, str, int, float, bool and None
    /// (or nested past 64 levels), and parts large enough to need cutting.
    ///
    /// `reported_drops`: the `dropped_events` the caller has reported; when
    /// the writer has dropped more, the seq comes back as `-1 - seq`, so that
    /// one call tells the caller both.
    #[pyo3(signature = (event_type, component, message, tokens, metadata, reported_drops = None))]
    #[allow(clippy::too_many_arguments)]
    fn log_event(
        &self,
        py: Python<'_>,
        event_type: &str,
        component: &str,
        message: &str,
        tokens: &Bound<'_, PyAny>,
        metadata: &Bound<'_, PyAny>,
        reported_drops: Option<u64>,
    ) -> PyResult<Option<i64>> {
        self.room(py, 128 + event_type.len() + component.len() + message.len());
        guard("AppendWriter.log_event", || {
            let Some(seq) = log_prepared(
                py,
                &self.inner,
                event_type,
                component,
                message,
                tokens,
                metadata,
            ) else {
                return Ok(None);
            };
            // Seqs start at most at 2**62 (`start_seq`) and rise by one per event.
            let seq = i64::try_from(seq).unwrap_or(i64::MAX);
            let drops = reported_drops.is_some_and(|r| r != self.inner.dropped_events());
            Ok(Some(if drops { -1 - seq } else { seq }))
        })
    }

    /// Wait, with the GIL released, until the event `seq` (None: every event
    /// queued so far) has been handed to the OS; it is written at once (by
    /// the caller when the writer is idle, else by the write under way or the
    /// writer's thread), one write for every event queued by then (fsync
    /// stays on the policy's schedule). Raises `TimeoutError` (ETIMEDOUT) after
    /// `timeout` seconds, `OSError` with the disk's errno when the write failed
    /// or the event was dropped, at once while flushes are failing.
    #[pyo3(signature = (seq = None, timeout = 5.0))]
    fn wait_written(&self, py: Python<'_>, seq: Option<u64>, timeout: f64) -> PyResult<()> {
        if !(timeout.is_finite() && (0.0..=86_400.0).contains(&timeout)) {
            return Err(value_error("timeout must be between 0 and 86400 seconds"));
        }
        let wait = Duration::from_secs_f64(timeout);
        let inner = &self.inner;
        let out = py.detach(|| guard_io(|| Ok(inner.wait_written(seq, wait))));
        let path = self.path.display().to_string();
        match out {
            Err(detail) => Err(panic_err("AppendWriter.wait_written", detail)),
            Ok(Err(e)) => Err(os_error(&e, Some(&self.path))),
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => {
                let text = e.to_string();
                Err(match e {
                    writer::WaitError::TimedOut(_) => {
                        pyo3::exceptions::PyTimeoutError::new_err((libc::ETIMEDOUT, text, path))
                    }
                    writer::WaitError::Failed(errno, _) | writer::WaitError::Dropped(errno, _) => {
                        pyo3::exceptions::PyOSError::new_err((errno, text, path))
                    }
                    writer::WaitError::Closed => value_error(text),
                    writer::WaitError::Forked(_) => PyRuntimeError::new_err(text),
                })
            }
        }
    }

    /// Write everything queued now (and fsync unless the policy is `never`).
    /// After a failed fsync, raises until what it covered is written again and synced.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.owned()?;
        detached_io(py, "AppendWriter.flush", Some(&self.path), || {
            self.inner.flush(false)
        })
    }

    /// Flush, fsync and stop the background thread. Idempotent; in a forked
    /// child a no-op that writes nothing (the parent writes what it queued).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        detached_io(py, "AppendWriter.close", Some(&self.path), || {
            self.inner.close()
        })
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    #[getter]
    fn next_seq(&self) -> PyResult<u64> {
        self.owned()?;
        Ok(self.inner.next_seq())
    }

    /// Events dropped so far because the disk failed or the buffer was full
    /// (cheap: meant to be checked after each write).
    #[getter]
    fn dropped_events(&self) -> u64 {
        self.inner.dropped_events()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.owned()?;
        let s = py.detach(|| self.inner.stats());
        let d = PyDict::new(py);
        d.set_item("lines", s.lines_accepted)?;
        d.set_item("lines_written", s.lines_written)?;
        d.set_item("bytes", s.bytes_written)?;
        d.set_item("flushes", s.flushes)?;
        d.set_item("fsyncs", s.fsyncs)?;
        d.set_item("dropped_lines", s.dropped_lines)?;
        d.set_item("dropped_events", s.dropped_lines)?;
        d.set_item("dropped_tokens", s.dropped_tokens)?;
        d.set_item("reopens", s.reopens)?;
        d.set_item("torn_tails_repaired", s.torn_tails_repaired)?;
        d.set_item("buffered_bytes", s.buffered_bytes)?;
        d.set_item("fsync_failures", s.fsync_failures)?;
        d.set_item("sync_recoveries", s.sync_recoveries)?;
        d.set_item("sync_failed", s.sync_failed)?;
        match s.last_error {
            Some((errno, msg)) => {
                d.set_item("last_errno", errno)?;
                d.set_item("last_error", msg)?;
            }
            None => {
                d.set_item("last_errno", py.None())?;
                d.set_item("last_error", py.None())?;
            }
        }
        Ok(d)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "AppendWriter({:?}, closed={})",
            self.path.display().to_string(),
            self.inner.is_closed()
        )
    }
}

// ---------------------------------------------------------------------------
// Tailer

#[pyclass(frozen, module = "sigil._native", name = "Tailer")]
pub struct PyTailer {
    /// Held across reads and each wait slice (I/O): taken only without the GIL.
    inner: Mutex<tailer::Tailer>,
    /// Stats and checkpoint as of the end of the last call, so that `stats()`
    /// and `checkpoint()` never wait behind a read or a wait (issue 9, defect 4).
    published: Mutex<Published>,
    path: PathBuf,
}

type Published = (tailer::TailerStats, Option<tailer::Checkpoint>);

/// Longest stretch `wait()` spends without the GIL before it checks for
/// signals, so Ctrl-C is seen within this time (issue 9, defect 8).
const WAIT_SLICE: Duration = Duration::from_millis(100);

impl PyTailer {
    /// Run `f` on the tailer without the GIL, then publish its stats.
    fn with_tailer<T: Send>(
        &self,
        py: Python<'_>,
        what: &str,
        f: impl FnOnce(&mut tailer::Tailer) -> io::Result<T> + Send,
    ) -> PyResult<T> {
        detached_io(py, what, Some(&self.path), || {
            let mut t = lock(&self.inner);
            let result = f(&mut t);
            *lock(&self.published) = (t.stats.clone(), t.checkpoint());
            result
        })
    }
}

/// Where a tailer stands in a file: the file's identity, the offset of the next
/// line, and the length and CRC-32 of the file's first bytes, by which a reused
/// inode is told from the file it was (`fp_len` 0: no fingerprint, trusted as
/// given).
#[pyclass(
    frozen,
    eq,
    hash,
    get_all,
    module = "sigil._native",
    name = "Checkpoint"
)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PyCheckpoint {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
    pub fp_len: u64,
    pub fp_crc: u32,
}

/// An int argument in `0..=max`; anything else is a `ValueError` (contract 10).
fn uint_arg(name: &str, v: &Bound<'_, PyAny>, max: u64) -> PyResult<u64> {
    match v.extract::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => {
            let shown = v.repr().map_or_else(|_| "?".to_string(), |r| r.to_string());
            Err(value_error(format!(
                "{name} must be an int from 0 to {max}, not {shown}"
            )))
        }
    }
}

#[pymethods]
impl PyCheckpoint {
    #[new]
    #[pyo3(signature = (dev, ino, offset, fp_len = None, fp_crc = None))]
    fn new(
        dev: &Bound<'_, PyAny>,
        ino: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        fp_len: Option<&Bound<'_, PyAny>>,
        fp_crc: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        Ok(PyCheckpoint {
            dev: uint_arg("dev", dev, u64::MAX)?,
            ino: uint_arg("ino", ino, u64::MAX)?,
            offset: uint_arg("offset", offset, MAX_START)?,
            fp_len: fp_len.map_or(Ok(0), |v| uint_arg("fp_len", v, u64::MAX))?,
            fp_crc: fp_crc.map_or(Ok(0), |v| uint_arg("fp_crc", v, u32::MAX.into()))? as u32,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Checkpoint(dev={}, ino={}, offset={}, fp_len={}, fp_crc={})",
            self.dev, self.ino, self.offset, self.fp_len, self.fp_crc
        )
    }
}

impl From<tailer::Checkpoint> for PyCheckpoint {
    fn from(c: tailer::Checkpoint) -> Self {
        PyCheckpoint {
            dev: c.dev,
            ino: c.ino,
            offset: c.offset,
            fp_len: c.fp_len,
            fp_crc: c.fp_crc,
        }
    }
}

impl From<&PyCheckpoint> for tailer::Checkpoint {
    fn from(c: &PyCheckpoint) -> Self {
        tailer::Checkpoint {
            dev: c.dev,
            ino: c.ino,
            offset: c.offset,
            fp_len: c.fp_len,
            fp_crc: c.fp_crc,
        }
    }
}

const DEFAULT_BATCH_LINES: usize = 65_536;
const DEFAULT_BATCH_BYTES: usize = 16 << 20;

#[pymethods]
impl PyTailer {
    #[new]
    #[pyo3(signature = (path, *, start = "beginning", checkpoint = None, max_line_bytes = DEFAULT_MAX_LINE))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        start: &str,
        checkpoint: Option<&Bound<'_, PyCheckpoint>>,
        max_line_bytes: usize,
    ) -> PyResult<Self> {
        let start = match start {
            "beginning" => tailer::Start::Beginning,
            "end" => tailer::Start::End,
            other => {
                return Err(value_error(format!(
                    "start must be 'beginning' or 'end', not {other:?}"
                )))
            }
        };
        if max_line_bytes == 0 {
            return Err(value_error("max_line_bytes must be positive"));
        }
        let cp = checkpoint.map(|c| tailer::Checkpoint::from(c.get()));
        let p = path.clone();
        let t = detached_io(py, "Tailer()", Some(&path), move || {
            tailer::Tailer::new(p, start, cp, max_line_bytes)
        })?;
        let published = Mutex::new((t.stats.clone(), t.checkpoint()));
        Ok(PyTailer {
            inner: Mutex::new(t),
            published,
            path,
        })
    }

    /// New complete lines (without their newline), exactly once each.
    #[pyo3(signature = (max_lines = DEFAULT_BATCH_LINES, max_bytes = DEFAULT_BATCH_BYTES))]
    fn read_lines<'py>(
        &self,
        py: Python<'py>,
        max_lines: usize,
        max_bytes: usize,
    ) -> PyResult<Bound<'py, PyList>> {
        let (data, ends) = self.with_tailer(py, "Tailer.read_lines", |t| {
            let mut data = Vec::new();
            let mut ends = Vec::new();
            t.poll(max_lines.max(1), max_bytes.max(1), |o| {
                if let tailer::Out::Line(l, _) = o {
                    data.extend_from_slice(l);
                    ends.push(data.len());
                }
            })?;
            Ok((data, ends))
        })?;
        let mut start = 0;
        let list = PyList::empty(py);
        for end in ends {
            list.append(PyBytes::new(py, &data[start..end]))?;
            start = end;
        }
        Ok(list)
    }

    /// New complete lines parsed: `(entries, malformed)`; oversize lines are
    /// reported in `malformed` with their length.
    #[pyo3(signature = (max_lines = DEFAULT_BATCH_LINES, max_bytes = DEFAULT_BATCH_BYTES))]
    fn read_entries<'py>(
        &self,
        py: Python<'py>,
        max_lines: usize,
        max_bytes: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let (events, bad) = self.with_tailer(py, "Tailer.read_entries", |t| {
            let mut events = Vec::new();
            let mut bad = Vec::new();
            t.poll(max_lines.max(1), max_bytes.max(1), |o| match o {
                tailer::Out::Line(l, off) => match parse::parse_line(l) {
                    Ok(e) => events.push(e.to_owned_event(off)),
                    Err(reason) => bad.push(malformed_line(Malformed {
                        offset: off,
                        reason,
                    })),
                },
                tailer::Out::Oversize(off, len) => bad.push(PyMalformedLine {
                    offset: off,
                    kind: "oversize",
                    reason: format!("line of {len} bytes exceeds the line limit"),
                }),
            })?;
            Ok((events, bad))
        })?;
        entries_result(py, events, bad)
    }

    /// Fold everything available now into `fold` (no Python object per line).
    /// Returns the number of lines folded.
    fn fold_into(&self, py: Python<'_>, fold: &PyFold) -> PyResult<u64> {
        self.with_tailer(py, "Tailer.fold_into", |t| {
            let mut st = lock(&fold.state);
            t.fold_available(&mut st)
        })
    }

    /// Block (without the GIL) until the file changes or `timeout` seconds pass.
    ///
    /// Waits in slices of at most 100 ms and runs Python's signal handlers
    /// between them, so Ctrl-C raises `KeyboardInterrupt` at once.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(value_error("timeout must be a finite number >= 0"));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(timeout.min(86_400.0));
        loop {
            let slice = deadline
                .saturating_duration_since(std::time::Instant::now())
                .min(WAIT_SLICE);
            let news = detached_io(
                py,
                "Tailer.wait",
                None,
                || Ok(lock(&self.inner).wait(slice)),
            )?;
            if news || std::time::Instant::now() >= deadline {
                return Ok(news);
            }
            py.check_signals()?;
        }
    }

    /// Where the tailer stands in the open file, or None.
    fn checkpoint(&self) -> Option<PyCheckpoint> {
        lock(&self.published).1.map(PyCheckpoint::from)
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = lock(&self.published).0.clone();
        let d = PyDict::new(py);
        d.set_item("lines", s.lines)?;
        d.set_item("bytes_read", s.bytes_read)?;
        d.set_item("rotations", s.rotations)?;
        d.set_item("truncations", s.truncations)?;
        d.set_item("fingerprint_changes", s.fingerprint_changes)?;
        d.set_item("oversize_lines", s.oversize_lines)?;
        d.set_item("torn_lines", s.torn_lines)?;
        d.set_item("compressed_segments", s.compressed_segments)?;
        d.set_item("copies_followed", s.copies_followed)?;
        d.set_item("corrupt_segments", s.corrupt_segments)?;
        d.set_item("rereads", s.rereads)?;
        d.set_item("checkpoint_restored", s.checkpoint_restored)?;
        Ok(d)
    }
}

/// The module. Every class guards its state with a mutex or is frozen, and
/// the GIL is released around I/O, so it runs without the GIL on a
/// free-threaded Python too.
#[pymodule(gil_used = false)]
mod _native {
    #[pymodule_export]
    use super::{
        fold_file, fold_file_snapshot, fold_sessions, is_sensitive_key, latency_quantile_ms,
        parse_bytes, parse_lines, read_histories, sanitize_string, tail_max_seq, PyAppendWriter,
        PyCheckpoint, PyEntry, PyFold, PyLedger, PyTailer,
    };
    #[pymodule_export]
    use crate::archive::py_fold_archive;
    #[pymodule_export]
    use crate::otlp::{
        otlp_decode_json, otlp_decode_protobuf, otlp_map_spans, PyOtlpBatch, PyOtlpSession,
    };
    #[pymodule_export]
    use crate::snapshot::{
        PyComponentSnapshot, PyLastError, PyMalformedLine, PyModelSnapshot, PyRunSnapshot,
        PySessionHistory, PySessionSnapshot, PyStepInFlight, PyStepLoop,
    };

    #[pymodule_export]
    use crate::proxy::PyProxyTransport;
    #[pymodule_export]
    use crate::select::{since_start, tail_start};

    #[pymodule_export]
    const MAX_LINE_BYTES: usize = crate::fold::DEFAULT_MAX_LINE;
    #[pymodule_export]
    const MAX_BUFFER_BYTES: usize = crate::writer::MAX_BUFFER_BYTES;
    #[pymodule_export]
    const MAX_DEPTH: usize = crate::parse::MAX_DEPTH;
    #[pymodule_export]
    const MAX_TOKENS: u64 = crate::parse::MAX_TOKENS;
    #[pymodule_export]
    const MAX_LEDGER_BYTES: u64 = crate::ledger::MAX_LEDGER_BYTES;

    /// The sanitizer's word boundaries are Python's `\w`, of this Python's
    /// Unicode database (`sanitize::set_python_unicode_version`).
    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::prelude::*;
        let version: String = m
            .py()
            .import("unicodedata")?
            .getattr("unidata_version")?
            .extract()?;
        crate::sanitize::set_python_unicode_version(&version);
        // The proxy's tables, read by sigil.telemetry.proxy_transport (one source).
        let py = m.py();
        m.add(
            "PROXY_ENDPOINT_PATHS",
            pyo3::types::PyTuple::new(py, crate::proxy::ENDPOINTS)?,
        )?;
        m.add(
            "PROXY_KEY_HEADERS",
            pyo3::types::PyTuple::new(py, crate::proxy::KEY_HEADERS)?,
        )?;
        Ok(())
    }
}
