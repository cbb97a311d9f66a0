//! Typed snapshots of the session model (`fold.rs`) for Python: frozen
//! classes declared in `_native.pyi`, built from a copy of the fold's state
//! (STYLE.md "Types, not tuples"). Bindings only: every number is computed in
//! `fold.rs`; this file copies them out.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::cost::Cost;
use crate::fold::{self, ComponentTotals, FoldState, ModelTotals, RunTotals, LATENCY_BOUNDS_MS};
use crate::ledger::{self, Ledger, LedgerRun, RunRef};
use crate::parse::Event;

/// A line that is not a valid event: where it starts, what kind of problem
/// (`malformed` or `oversize`) and why.
#[pyclass(frozen, eq, get_all, module = "sigil._native", name = "MalformedLine")]
#[derive(Clone, PartialEq)]
pub struct PyMalformedLine {
    pub offset: u64,
    pub kind: &'static str,
    pub reason: String,
}

#[pymethods]
impl PyMalformedLine {
    #[new]
    #[pyo3(signature = (offset, reason, kind = "malformed"))]
    fn new(offset: u64, reason: String, kind: &str) -> PyResult<Self> {
        let kind = match kind {
            "malformed" => "malformed",
            "oversize" => "oversize",
            other => {
                return Err(crate::errors::value_error(format!(
                    "kind must be 'malformed' or 'oversize', not {other:?}"
                )))
            }
        };
        Ok(PyMalformedLine {
            offset,
            kind,
            reason,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "MalformedLine(offset={}, kind={:?}, reason={:?})",
            self.offset, self.kind, self.reason
        )
    }
}

/// The last failure a component reported (`step_error` or `retry_attempt`).
#[pyclass(frozen, get_all, module = "sigil._native", name = "LastError")]
pub struct PyLastError {
    pub event_type: String,
    pub category: Option<String>,
    pub message: String,
    pub attempt: Option<u64>,
    pub timestamp: String,
}

#[pymethods]
impl PyLastError {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("event_type", &self.event_type)?;
        d.set_item("category", &self.category)?;
        d.set_item("message", &self.message)?;
        d.set_item("attempt", self.attempt)?;
        d.set_item("timestamp", &self.timestamp)?;
        Ok(d)
    }
}

/// The step in flight: the latest `step_start` of the current run that no
/// `step_complete`/`step_error` of its component has closed yet, over every
/// event the fold read (`fold::OpenSteps`), however many came after it.
#[pyclass(frozen, eq, get_all, module = "sigil._native", name = "StepInFlight")]
#[derive(Clone, Debug, PartialEq)]
pub struct PyStepInFlight {
    pub component: String,
    /// The timestamp of the step's first `step_start` (at most `MAX_TEXT` bytes).
    pub started_at: String,
    /// The attempt running: the `step_start`'s `metadata.attempt`, else one
    /// more than the `retry_attempt` events of the step so far.
    pub attempt: u64,
    pub message: String,
}

#[pymethods]
impl PyStepInFlight {
    fn __repr__(&self) -> String {
        format!(
            "StepInFlight(component={:?}, attempt={}, started_at={:?})",
            self.component, self.attempt, self.started_at
        )
    }
}

#[cfg(test)]
fn meta_u64(meta: &str, key: &str) -> Option<u64> {
    if !meta.contains(key) {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(meta)
        .ok()?
        .get(key)?
        .as_u64()
}

/// The step in flight of `st`, see [`PyStepInFlight`].
pub fn in_flight(st: &FoldState) -> Option<PyStepInFlight> {
    st.in_flight().map(|(component, s)| PyStepInFlight {
        component: component.to_string(),
        started_at: s.started_at.clone(),
        attempt: s.attempt,
        message: s.message.clone(),
    })
}

/// The step in flight among `events` (oldest first), see [`PyStepInFlight`]:
/// the rule [`in_flight`] keeps over a whole fold, on a list of events (the
/// tests' oracle).
#[cfg(test)]
pub fn step_in_flight(events: &[Event]) -> Option<PyStepInFlight> {
    let mut open: Vec<PyStepInFlight> = Vec::new();
    for e in events {
        match e.event_type.as_str() {
            "session_start" | "session_complete" | "session_error" => open.clear(),
            "step_start" => {
                let explicit = meta_u64(&e.metadata, "attempt");
                match open.iter().position(|s| s.component == e.component) {
                    // A retry's new start: the same step, its next attempt.
                    Some(i) => {
                        let mut s = open.remove(i);
                        s.attempt = explicit.unwrap_or(s.attempt).max(s.attempt);
                        s.message = e.message.clone();
                        open.push(s);
                    }
                    None => open.push(PyStepInFlight {
                        component: e.component.clone(),
                        started_at: e.timestamp.clone(),
                        attempt: explicit.unwrap_or(1).max(1),
                        message: e.message.clone(),
                    }),
                }
            }
            "retry_attempt" => {
                if let Some(s) = open.iter_mut().find(|s| s.component == e.component) {
                    s.attempt = s.attempt.saturating_add(1);
                }
            }
            "step_complete" | "step_error" => open.retain(|s| s.component != e.component),
            _ => {}
        }
    }
    open.pop()
}

/// Tokens per bucket of `bucket_seconds`, `buckets` of them, oldest first,
/// ending `idle` seconds after the latest event (the rate window's seconds).
pub fn rate_series(
    w: &fold::RateWindow,
    buckets: usize,
    bucket_seconds: u64,
    idle: u64,
) -> Vec<u64> {
    let b = bucket_seconds.clamp(1, fold::WINDOW_SECONDS as u64) as i64;
    let n = buckets.min(fold::WINDOW_SECONDS);
    let Some(end) = w.end else {
        return vec![0; n];
    };
    let now = end.saturating_add(idle.min(1 << 40) as i64);
    let mut out: Vec<u64> = (0..n as i64)
        .map(|k| {
            let hi = now.saturating_sub(k.saturating_mul(b));
            let lo = hi.saturating_sub(b) + 1;
            w.tokens_between(lo, hi)
        })
        .collect();
    out.reverse();
    out
}

/// A step started again and again with the same input in one run (issue
/// 13: an agent loop): at least `fold::LOOP_MIN_STARTS` `step_start`s of
/// `component` with `metadata.input_sha256 == input_sha256`.
#[pyclass(frozen, eq, get_all, module = "sigil._native", name = "StepLoop")]
#[derive(Clone, PartialEq)]
pub struct PyStepLoop {
    pub run: u64,
    pub component: String,
    pub input_sha256: String,
    pub starts: u64,
    /// The `seq`s of its first starts (at most `fold::LOOP_SEQS`).
    pub seqs: Vec<u64>,
}

#[pymethods]
impl PyStepLoop {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("run", self.run)?;
        d.set_item("component", &self.component)?;
        d.set_item("input_sha256", &self.input_sha256)?;
        d.set_item("starts", self.starts)?;
        d.set_item("seqs", self.seqs.clone())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "StepLoop(run={}, component={:?}, starts={})",
            self.run, self.component, self.starts
        )
    }
}

fn loops(number: u64, steps: &fold::StepHashes) -> Vec<PyStepLoop> {
    steps
        .loops()
        .map(|(c, h, n, seqs)| PyStepLoop {
            run: number,
            component: c.clone(),
            input_sha256: h.clone(),
            starts: *n,
            seqs: seqs.clone(),
        })
        .collect()
}

fn loops_list<'py>(py: Python<'py>, ls: &[PyStepLoop]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for l in ls {
        list.append(l.to_dict(py)?)?;
    }
    Ok(list)
}

/// One model's totals (in a session, a run or a history): the events whose
/// `metadata.model` names it (fold.rs, `ModelTotals`), of one component
/// (`component`) or of all (`component` None).
#[pyclass(frozen, eq, get_all, module = "sigil._native", name = "ModelSnapshot")]
#[derive(Clone, PartialEq)]
pub struct PyModelSnapshot {
    pub name: String,
    pub component: Option<String>,
    pub tokens: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `step_complete` and `step_error` events with this model.
    pub calls: u64,
    pub errors: u64,
    pub cost_nanousd: u64,
    pub priced_events: u64,
    pub unpriced_tokens: u64,
    pub unpriced_calls: u64,
    /// Calls whose usage the proxy could not read (`metadata.usage == "unknown"`).
    pub unknown_usage_calls: u64,
    /// The budget the proxy held for those calls.
    pub tokens_held: u64,
}

#[pymethods]
impl PyModelSnapshot {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("tokens", self.tokens)?;
        d.set_item("input_tokens", self.input_tokens)?;
        d.set_item("output_tokens", self.output_tokens)?;
        d.set_item("calls", self.calls)?;
        d.set_item("errors", self.errors)?;
        d.set_item("cost_nanousd", self.cost_nanousd)?;
        d.set_item("priced_events", self.priced_events)?;
        d.set_item("unpriced_tokens", self.unpriced_tokens)?;
        d.set_item("unpriced_calls", self.unpriced_calls)?;
        d.set_item("unknown_usage_calls", self.unknown_usage_calls)?;
        d.set_item("tokens_held", self.tokens_held)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "ModelSnapshot(name={:?}, tokens={}, calls={}, errors={})",
            self.name, self.tokens, self.calls, self.errors
        )
    }
}

/// (component, model) pairs sorted by component and model.
type Models = Vec<PyModelSnapshot>;

fn model_snapshot(component: Option<&str>, name: &str, m: &ModelTotals) -> PyModelSnapshot {
    PyModelSnapshot {
        name: name.to_string(),
        component: component.map(str::to_string),
        tokens: m.tokens,
        input_tokens: m.input_tokens,
        output_tokens: m.output_tokens,
        calls: m.calls,
        errors: m.errors,
        cost_nanousd: m.cost_nanousd,
        priced_events: m.priced_events,
        unpriced_tokens: m.unpriced_tokens,
        unpriced_calls: m.unpriced_calls,
        unknown_usage_calls: m.unknown_usage,
        tokens_held: m.tokens_held,
    }
}

/// A models table (keyed by `fold::model_key`) as its pairs, sorted.
fn models<'a>(items: impl Iterator<Item = (&'a str, &'a ModelTotals)>) -> Models {
    let mut out: Models = items
        .map(|(k, m)| {
            let (component, model) = fold::split_model_key(k);
            model_snapshot(Some(component), model, m)
        })
        .collect();
    out.sort_by(|a, b| (&a.component, &a.name).cmp(&(&b.component, &b.name)));
    out
}

/// The pairs' totals per model over every component, by name.
fn by_model(pairs: &Models) -> Models {
    let mut totals: std::collections::BTreeMap<&str, ModelTotals> = Default::default();
    for p in pairs {
        totals
            .entry(p.name.as_str())
            .or_default()
            .add(&ModelTotals {
                tokens: p.tokens,
                input_tokens: p.input_tokens,
                output_tokens: p.output_tokens,
                calls: p.calls,
                errors: p.errors,
                cost_nanousd: p.cost_nanousd,
                priced_events: p.priced_events,
                unpriced_tokens: p.unpriced_tokens,
                unpriced_calls: p.unpriced_calls,
                unknown_usage: p.unknown_usage_calls,
                tokens_held: p.tokens_held,
            });
    }
    totals
        .iter()
        .map(|(name, m)| model_snapshot(None, name, m))
        .collect()
}

/// Per model over every component, by name.
fn models_dict<'py>(py: Python<'py>, pairs: &Models) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for m in by_model(pairs) {
        d.set_item(m.name.clone(), m)?;
    }
    Ok(d)
}

/// Per component, per model: `{component: {model: ModelSnapshot}}`.
fn component_models_dict<'py>(py: Python<'py>, pairs: &Models) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for m in pairs {
        let component = m.component.as_deref().unwrap_or_default();
        let inner = match d.get_item(component)? {
            Some(inner) => inner.cast_into::<PyDict>()?,
            None => {
                let inner = PyDict::new(py);
                d.set_item(component, &inner)?;
                inner
            }
        };
        inner.set_item(&m.name, m.clone())?;
    }
    Ok(d)
}

/// `models` and `component_models` of a `to_dict`, as plain data.
fn models_items(d: &Bound<'_, PyDict>, pairs: &Models) -> PyResult<()> {
    let py = d.py();
    let plain = PyDict::new(py);
    for m in by_model(pairs) {
        plain.set_item(&m.name, m.to_dict(py)?)?;
    }
    d.set_item("models", plain)?;
    let nested = PyDict::new(py);
    for m in pairs {
        let component = m.component.as_deref().unwrap_or_default();
        let inner = match nested.get_item(component)? {
            Some(inner) => inner.cast_into::<PyDict>()?,
            None => {
                let inner = PyDict::new(py);
                nested.set_item(component, &inner)?;
                inner
            }
        };
        inner.set_item(&m.name, m.to_dict(py)?)?;
    }
    d.set_item("component_models", nested)?;
    Ok(())
}

/// Calls with unknown usage over components.
fn unknown_usage<'a>(items: impl Iterator<Item = &'a ComponentTotals>) -> u64 {
    items.fold(0u64, |n, c| n.saturating_add(c.unknown_usage))
}

/// Tokens of the budget held for calls of unknown usage, over components.
fn tokens_held<'a>(items: impl Iterator<Item = &'a ComponentTotals>) -> u64 {
    items.fold(0u64, |n, c| n.saturating_add(c.tokens_held))
}

/// One component's totals (in a session or a run).
#[pyclass(frozen, get_all, module = "sigil._native", name = "ComponentSnapshot")]
pub struct PyComponentSnapshot {
    pub name: String,
    pub tokens: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub operations: u64,
    pub errors: u64,
    pub retries: u64,
    pub timed_operations: u64,
    pub latency_ms: f64,
    pub average_latency_ms: Option<f64>,
    pub p50_latency_ms: Option<f64>,
    pub p95_latency_ms: Option<f64>,
    pub p99_latency_ms: Option<f64>,
    pub max_latency_ms: Option<f64>,
    pub failed_latency_ms: f64,
    pub latency_histogram: Vec<u64>,
    pub model: Option<String>,
    pub last_error: Option<Py<PyLastError>>,
    /// Nano-dollars of the events that carried `cost_usd` (cost.rs).
    pub cost_nanousd: u64,
    /// Events that carried a cost (0: nothing priced, never a cost of $0).
    pub priced_events: u64,
    /// Tokens of events with a model and no cost, and those models.
    pub unpriced_tokens: u64,
    pub unpriced_models: Vec<String>,
    /// Calls whose usage the proxy could not read (`metadata.usage == "unknown"`).
    pub unknown_usage_calls: u64,
    /// The budget the proxy held for those calls (their `metadata.tokens_held`).
    pub tokens_held: u64,
    /// The heaviest calls as `(seq, tokens)`, most tokens first (issue 13:
    /// the events that show a token jump; `fold::HeaviestCalls`).
    pub heaviest_calls: Vec<(u64, u64)>,
    /// The `seq`s of the first failed attempts counted in `retries` (at most
    /// 5, in file order): the events that show a retry storm.
    pub retry_seqs: Vec<u64>,
}

/// The cost of a run or a session: its components', added in name order.
/// The session's cost as [`session`] reports it (`cost_nanousd`,
/// `priced_events`, `unpriced_tokens`), without building the snapshot.
pub fn fold_cost(st: &FoldState) -> Cost {
    cost_total(st.components.iter().map(|(k, c)| (k, &c.cost)))
}

fn cost_total<'a>(items: impl Iterator<Item = (&'a str, &'a Cost)>) -> Cost {
    let mut items: Vec<_> = items.collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let mut total = Cost::default();
    for (_, c) in items {
        total.add(c);
    }
    total
}

fn cost_items(d: &Bound<'_, PyDict>, c: &Cost) -> PyResult<()> {
    d.set_item("cost_nanousd", c.nanousd)?;
    d.set_item("priced_events", c.priced)?;
    d.set_item("unpriced_tokens", c.unpriced_tokens)?;
    d.set_item("unpriced_models", c.unpriced_models.clone())?;
    Ok(())
}

#[pymethods]
impl PyComponentSnapshot {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("tokens", self.tokens)?;
        d.set_item("input_tokens", self.input_tokens)?;
        d.set_item("output_tokens", self.output_tokens)?;
        d.set_item("operations", self.operations)?;
        d.set_item("errors", self.errors)?;
        d.set_item("retries", self.retries)?;
        d.set_item("timed_operations", self.timed_operations)?;
        d.set_item("latency_ms", self.latency_ms)?;
        d.set_item("average_latency_ms", self.average_latency_ms)?;
        d.set_item("p50_latency_ms", self.p50_latency_ms)?;
        d.set_item("p95_latency_ms", self.p95_latency_ms)?;
        d.set_item("p99_latency_ms", self.p99_latency_ms)?;
        d.set_item("max_latency_ms", self.max_latency_ms)?;
        d.set_item("failed_latency_ms", self.failed_latency_ms)?;
        d.set_item("latency_histogram", self.latency_histogram.clone())?;
        d.set_item("model", &self.model)?;
        match &self.last_error {
            Some(e) => d.set_item("last_error", e.get().to_dict(py)?)?,
            None => d.set_item("last_error", py.None())?,
        }
        d.set_item("cost_nanousd", self.cost_nanousd)?;
        d.set_item("priced_events", self.priced_events)?;
        d.set_item("unpriced_tokens", self.unpriced_tokens)?;
        d.set_item("unpriced_models", self.unpriced_models.clone())?;
        d.set_item("unknown_usage_calls", self.unknown_usage_calls)?;
        d.set_item("tokens_held", self.tokens_held)?;
        d.set_item("heaviest_calls", self.heaviest_calls.clone())?;
        d.set_item("retry_seqs", self.retry_seqs.clone())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "ComponentSnapshot(name={:?}, tokens={}, operations={}, errors={})",
            self.name, self.tokens, self.operations, self.errors
        )
    }
}

fn component(py: Python<'_>, name: &str, c: &ComponentTotals) -> PyResult<Py<PyComponentSnapshot>> {
    let last_error = match &c.last_error {
        Some(e) => Some(Py::new(
            py,
            PyLastError {
                event_type: e.event_type.clone(),
                category: e.category.clone(),
                message: e.message.clone(),
                attempt: e.attempt,
                timestamp: e.timestamp.clone(),
            },
        )?),
        None => None,
    };
    Py::new(
        py,
        PyComponentSnapshot {
            name: name.to_string(),
            tokens: c.tokens,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            operations: c.operations,
            errors: c.errors,
            retries: c.retries,
            timed_operations: c.timed,
            latency_ms: c.latency_ms,
            average_latency_ms: c.average_latency_ms(),
            p50_latency_ms: c.latency_quantile_ms(0.50),
            p95_latency_ms: c.latency_quantile_ms(0.95),
            p99_latency_ms: c.latency_quantile_ms(0.99),
            max_latency_ms: (c.timed > 0).then_some(c.latency_max_ms),
            failed_latency_ms: c.failed_latency_ms,
            latency_histogram: c.histogram.to_vec(),
            model: c.model.clone(),
            last_error,
            cost_nanousd: c.cost.nanousd,
            priced_events: c.cost.priced,
            unpriced_tokens: c.cost.unpriced_tokens,
            unpriced_models: c.cost.unpriced_models.clone(),
            unknown_usage_calls: c.unknown_usage,
            tokens_held: c.tokens_held,
            heaviest_calls: c.heaviest.calls().iter().map(|&(t, s)| (s, t)).collect(),
            retry_seqs: c.retry_seqs.seqs().to_vec(),
        },
    )
}

/// Components sorted by name.
type Components = Vec<(String, Py<PyComponentSnapshot>)>;

fn components(py: Python<'_>, names: &fold::Names<ComponentTotals>) -> PyResult<Components> {
    let mut out = names
        .iter()
        .map(|(k, c)| Ok((k.to_string(), component(py, k, c)?)))
        .collect::<PyResult<Components>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn components_dict<'py>(py: Python<'py>, comps: &Components) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, c) in comps {
        d.set_item(k, c.clone_ref(py))?;
    }
    Ok(d)
}

fn components_plain<'py>(py: Python<'py>, comps: &Components) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, c) in comps {
        d.set_item(k, c.get().to_dict(py)?)?;
    }
    Ok(d)
}

fn seconds_between(a: Option<&str>, b: Option<&str>) -> Option<f64> {
    let a = fold::timestamp_micros(a?)?;
    let b = fold::timestamp_micros(b?)?;
    Some((b.saturating_sub(a)).max(0) as f64 / 1e6)
}

/// One pipeline run of a session (contract 11).
#[pyclass(frozen, module = "sigil._native", name = "RunSnapshot")]
pub struct PyRunSnapshot {
    #[pyo3(get)]
    pub number: u64,
    #[pyo3(get)]
    pub status: String,
    #[pyo3(get)]
    pub reason: Option<String>,
    #[pyo3(get)]
    pub started_at: Option<String>,
    #[pyo3(get)]
    pub ended_at: Option<String>,
    #[pyo3(get)]
    pub last_at: Option<String>,
    /// From the start to the final event (or to the latest event of a run still going).
    #[pyo3(get)]
    pub duration_seconds: Option<f64>,
    #[pyo3(get)]
    pub tokens: u64,
    #[pyo3(get)]
    pub events: u64,
    #[pyo3(get)]
    pub budget: Option<u64>,
    #[pyo3(get)]
    pub steps_completed: u64,
    #[pyo3(get)]
    pub steps_failed: u64,
    #[pyo3(get)]
    pub start_metadata_json: Option<String>,
    /// `log` (folded from the log) or `ledger` (only `tokens.json` still knows it).
    #[pyo3(get)]
    pub source: &'static str,
    /// The `seq` of the run's first and latest events.
    #[pyo3(get)]
    pub first_seq: Option<u64>,
    #[pyo3(get)]
    pub last_seq: Option<u64>,
    /// Calls of the run whose usage is unknown (its components').
    #[pyo3(get)]
    pub unknown_usage_calls: u64,
    /// Tokens of the budget held for those calls (its components').
    #[pyo3(get)]
    pub tokens_held: u64,
    /// Steps started at least `fold::LOOP_MIN_STARTS` times with one input.
    #[pyo3(get)]
    pub loops: Vec<PyStepLoop>,
    /// `(ordinal, component, output_sha256)` of each `step_complete` that
    /// logged an output hash, in order (at most `fold::MAX_STEP_HASHES`).
    #[pyo3(get)]
    pub step_outputs: Vec<(u64, String, String)>,
    comps: Components,
    cost: Cost,
    mods: Models,
}

#[pymethods]
impl PyRunSnapshot {
    /// Per model, by name (see `ModelSnapshot`).
    #[getter]
    fn models<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        models_dict(py, &self.mods)
    }

    /// Per component, per model (`{component: {model: ModelSnapshot}}`).
    #[getter]
    fn component_models<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        component_models_dict(py, &self.mods)
    }

    /// Nano-dollars of the run's priced events (its components' cost).
    #[getter]
    fn cost_nanousd(&self) -> u64 {
        self.cost.nanousd
    }

    #[getter]
    fn priced_events(&self) -> u64 {
        self.cost.priced
    }

    #[getter]
    fn unpriced_tokens(&self) -> u64 {
        self.cost.unpriced_tokens
    }

    #[getter]
    fn unpriced_models(&self) -> Vec<String> {
        self.cost.unpriced_models.clone()
    }

    #[getter]
    fn components<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        components_dict(py, &self.comps)
    }

    /// The run's `session_start` metadata (task, thresholds, allocations...).
    #[getter]
    fn start_metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.start_metadata_json {
            Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(v) => crate::json_to_py(py, &v),
                Err(_) => Ok(PyDict::new(py).into_any()),
            },
            None => Ok(PyDict::new(py).into_any()),
        }
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("number", self.number)?;
        d.set_item("status", &self.status)?;
        d.set_item("reason", &self.reason)?;
        d.set_item("started_at", &self.started_at)?;
        d.set_item("ended_at", &self.ended_at)?;
        d.set_item("last_at", &self.last_at)?;
        d.set_item("duration_seconds", self.duration_seconds)?;
        d.set_item("tokens", self.tokens)?;
        d.set_item("events", self.events)?;
        d.set_item("budget", self.budget)?;
        d.set_item("steps_completed", self.steps_completed)?;
        d.set_item("steps_failed", self.steps_failed)?;
        d.set_item("first_seq", self.first_seq)?;
        d.set_item("last_seq", self.last_seq)?;
        d.set_item("source", self.source)?;
        d.set_item("components", components_plain(py, &self.comps)?)?;
        cost_items(&d, &self.cost)?;
        models_items(&d, &self.mods)?;
        d.set_item("unknown_usage_calls", self.unknown_usage_calls)?;
        d.set_item("tokens_held", self.tokens_held)?;
        d.set_item("loops", loops_list(py, &self.loops)?)?;
        d.set_item("step_outputs", self.step_outputs.clone())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "RunSnapshot(number={}, status={:?}, tokens={})",
            self.number, self.status, self.tokens
        )
    }
}

fn run(py: Python<'_>, st: &FoldState, r: &RunTotals) -> PyResult<Py<PyRunSnapshot>> {
    run_as(py, st, r, &r.status)
}

/// A run of the log, with its status in the session's history.
fn run_as(
    py: Python<'_>,
    st: &FoldState,
    r: &RunTotals,
    status: &str,
) -> PyResult<Py<PyRunSnapshot>> {
    let (ok, failed) = r.steps();
    let last_at = st.last_at(r);
    let end = r.ended_at.as_deref().or(last_at);
    Py::new(
        py,
        PyRunSnapshot {
            number: r.number,
            status: status.to_string(),
            reason: r.reason.clone(),
            started_at: r.started_at.clone(),
            ended_at: r.ended_at.clone(),
            last_at: last_at.map(str::to_string),
            duration_seconds: seconds_between(r.started_at.as_deref(), end),
            tokens: r.tokens,
            events: r.events,
            budget: r.budget,
            steps_completed: ok,
            steps_failed: failed,
            start_metadata_json: r.start_metadata.clone(),
            source: "log",
            first_seq: r.first_seq,
            last_seq: r.last_seq,
            unknown_usage_calls: unknown_usage(r.components.iter().map(|(_, c)| c)),
            tokens_held: tokens_held(r.components.iter().map(|(_, c)| c)),
            loops: loops(r.number, &r.steps),
            step_outputs: r
                .steps
                .outputs
                .iter()
                .enumerate()
                .map(|(i, (c, h))| (i as u64, c.clone(), h.clone()))
                .collect(),
            comps: components(py, &r.components)?,
            cost: cost_total(r.components.iter().map(|(k, c)| (k, &c.cost))),
            mods: models(r.models.iter()),
        },
    )
}

/// The loops the ledger recorded for a run.
fn ledger_loops(r: &LedgerRun) -> Vec<PyStepLoop> {
    r.loops
        .iter()
        .flatten()
        .map(|(c, h, n, seqs)| PyStepLoop {
            run: r.number,
            component: c.clone(),
            input_sha256: h.clone(),
            starts: *n,
            seqs: seqs.clone(),
        })
        .collect()
}

/// A run only the ledger knows, as it recorded it.
fn ledger_run(py: Python<'_>, r: &LedgerRun, status: &str) -> PyResult<Py<PyRunSnapshot>> {
    let mut meta = serde_json::Map::new();
    if let Some(task) = &r.task {
        meta.insert("task".into(), task.clone().into());
    }
    if let Some(budget) = r.budget {
        meta.insert("budget".into(), budget.into());
    }
    if let Some(a) = &r.allocations {
        let a: serde_json::Map<String, serde_json::Value> =
            a.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
        meta.insert("allocations".into(), a.into());
    }
    let mut comps = r
        .components
        .iter()
        .map(|(k, c)| Ok((k.clone(), component(py, k, c)?)))
        .collect::<PyResult<Components>>()?;
    comps.sort_by(|a, b| a.0.cmp(&b.0));
    Py::new(
        py,
        PyRunSnapshot {
            number: r.number,
            status: status.to_string(),
            reason: None,
            started_at: r.started_at.clone(),
            ended_at: r.ended_at.clone(),
            last_at: r.ended_at.clone().or_else(|| r.started_at.clone()),
            duration_seconds: Some(r.duration_seconds),
            tokens: r.tokens,
            events: r.events,
            budget: r.budget,
            steps_completed: r.steps_completed,
            steps_failed: r.steps_failed,
            start_metadata_json: Some(serde_json::Value::Object(meta).to_string()),
            source: "ledger",
            first_seq: r.first_seq,
            last_seq: r.last_seq,
            unknown_usage_calls: unknown_usage(r.components.iter().map(|(_, c)| c)),
            tokens_held: tokens_held(r.components.iter().map(|(_, c)| c)),
            loops: ledger_loops(r),
            step_outputs: Vec::new(),
            comps,
            cost: cost_total(r.components.iter().map(|(k, c)| (k.as_str(), &c.cost))),
            mods: models(r.models.iter().map(|(k, m)| (k.as_str(), m))),
        },
    )
}

/// The whole session's history: the runs the log holds (from the fold) and
/// the runs only its ledger knows, with the session's totals over both
/// (`ledger.rs` has the rules). Every number is computed natively.
#[pyclass(frozen, module = "sigil._native", name = "HistorySnapshot")]
pub struct PySessionHistory {
    /// The model of what the log holds (None: the history is the ledger alone,
    /// the log being exactly as the ledger last saw it).
    pub snapshot: Option<Py<PySessionSnapshot>>,
    /// Every run, in run-number order; `source` says where each comes from.
    pub runs: Vec<Py<PyRunSnapshot>>,
    /// Tokens over the whole session (the log's and the ledger-only runs').
    #[pyo3(get)]
    pub tokens: u64,
    /// Events counted (the ledger-only runs', then the log's).
    #[pyo3(get)]
    pub events: u64,
    /// Runs started: the ledger-only runs and every `session_start` the log
    /// holds (`runs` may keep fewer of the log's).
    #[pyo3(get)]
    pub run_count: u64,
    /// The highest `seq` of the session, from the log or the ledger.
    #[pyo3(get)]
    pub last_seq: Option<u64>,
    /// The ledger's `last_seq` (None without a usable ledger).
    #[pyo3(get)]
    pub ledger_seq: Option<u64>,
    /// Events the log and the ledger both lack (a hole in `seq`): the totals
    /// are then a lower bound.
    #[pyo3(get)]
    pub missing_events: u64,
    /// Tokens logged before the log's first `session_start`, in no known run.
    #[pyo3(get)]
    pub orphan_tokens: u64,
    #[pyo3(get)]
    pub malformed: u64,
    /// Why `tokens.json` was not usable as a ledger (None when it was, or is absent).
    #[pyo3(get)]
    pub ledger_problem: Option<String>,
    /// Calls whose usage is unknown, over the whole session.
    #[pyo3(get)]
    pub unknown_usage_calls: u64,
    /// Tokens of the budget held for those calls, over the whole session.
    #[pyo3(get)]
    pub tokens_held: u64,
    /// What is left of the session's budget over the whole history: budget -
    /// tokens - tokens_held, never below 0 (None without a budget), as the
    /// monitor's joined snapshot says it (`history_remaining`).
    #[pyo3(get)]
    pub tokens_remaining: Option<u64>,
    /// Components over the whole session (see `ledger.rs` for what the ledger adds).
    comps: Components,
    cost: Cost,
    mods: Models,
}

#[pymethods]
impl PySessionHistory {
    /// Nano-dollars over the whole session (its components', ledger-only runs' included).
    #[getter]
    fn cost_nanousd(&self) -> u64 {
        self.cost.nanousd
    }

    #[getter]
    fn priced_events(&self) -> u64 {
        self.cost.priced
    }

    #[getter]
    fn unpriced_tokens(&self) -> u64 {
        self.cost.unpriced_tokens
    }

    #[getter]
    fn unpriced_models(&self) -> Vec<String> {
        self.cost.unpriced_models.clone()
    }

    #[getter]
    fn snapshot(&self, py: Python<'_>) -> Option<Py<PySessionSnapshot>> {
        self.snapshot.as_ref().map(|s| s.clone_ref(py))
    }

    #[getter]
    fn runs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.runs.iter().map(|r| r.clone_ref(py)))
    }

    #[getter]
    fn components<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        components_dict(py, &self.comps)
    }

    /// Per model over the whole session (the log's and the ledger-only runs').
    #[getter]
    fn models<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        models_dict(py, &self.mods)
    }

    /// Per component, per model (`{component: {model: ModelSnapshot}}`).
    #[getter]
    fn component_models<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        component_models_dict(py, &self.mods)
    }

    /// Tokens per component over the whole session.
    fn component_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, c) in &self.comps {
            d.set_item(k, c.get().tokens)?;
        }
        Ok(d)
    }

    /// Successful steps per component over the whole session.
    fn component_operations<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, c) in &self.comps {
            d.set_item(k, c.get().operations)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "HistorySnapshot(tokens={}, events={}, runs={}, last_seq={:?})",
            self.tokens,
            self.events,
            self.runs.len(),
            self.last_seq
        )
    }
}

/// Build the history snapshot: `st` is the fold of the log (None: the ledger
/// alone is the history).
pub fn history(
    py: Python<'_>,
    st: Option<&FoldState>,
    ledger: Option<&Ledger>,
    problem: Option<String>,
) -> PyResult<PySessionHistory> {
    let h = match (st, ledger) {
        (Some(st), l) => ledger::join(st, l),
        (None, Some(l)) => ledger::alone(l),
        (None, None) => ledger::join(&FoldState::new(0), None),
    };
    let runs = h
        .runs
        .iter()
        .map(|(r, status)| match (r, st, ledger) {
            (RunRef::Log(i), Some(st), _) => run_as(py, st, &st.run_list[*i], status),
            (RunRef::Ledger(i), _, Some(l)) => ledger_run(py, &l.runs[*i], status),
            _ => Err(crate::errors::value_error("history run without its source")),
        })
        .collect::<PyResult<Vec<_>>>()?;
    let snapshot = match st {
        Some(st) => Some(Py::new(py, session(py, st)?)?),
        None => None,
    };
    let ledger_only = h
        .runs
        .iter()
        .filter(|(r, _)| matches!(r, RunRef::Ledger(_)))
        .count() as u64;
    let tokens_remaining = history_remaining(&h, st, ledger);
    Ok(PySessionHistory {
        snapshot,
        runs,
        run_count: ledger_only.saturating_add(st.map_or(0, |s| s.runs)),
        tokens: h.tokens,
        events: h.events,
        last_seq: h.last_seq,
        ledger_seq: h.ledger_seq,
        missing_events: h.missing_events,
        orphan_tokens: h.orphan_tokens,
        malformed: st.map_or(0, |s| s.malformed),
        ledger_problem: problem,
        unknown_usage_calls: unknown_usage(h.components.iter().map(|(_, c)| c)),
        tokens_held: tokens_held(h.components.iter().map(|(_, c)| c)),
        tokens_remaining,
        comps: components(py, &h.components)?,
        cost: cost_total(h.components.iter().map(|(k, c)| (k, &c.cost))),
        mods: models(h.models.iter()),
    })
}

/// Everything the views show about a session, at one moment (contract 12).
#[pyclass(frozen, module = "sigil._native", name = "SessionSnapshot")]
pub struct PySessionSnapshot {
    #[pyo3(get)]
    pub lines: u64,
    #[pyo3(get)]
    pub entries: u64,
    #[pyo3(get)]
    pub tokens: u64,
    /// `waiting`, `running`, or the latest run's final status.
    #[pyo3(get)]
    pub status: String,
    /// Why the latest run failed, when it did.
    #[pyo3(get)]
    pub reason: Option<String>,
    #[pyo3(get)]
    pub budget: Option<u64>,
    /// `session_start` events seen (runs kept in `runs` may be fewer).
    #[pyo3(get)]
    pub run_count: u64,
    #[pyo3(get)]
    pub runs_dropped: u64,
    #[pyo3(get)]
    pub run: Py<PyRunSnapshot>,
    #[pyo3(get)]
    pub first_timestamp: Option<String>,
    #[pyo3(get)]
    pub last_timestamp: Option<String>,
    /// From the first event to the latest one (event time).
    #[pyo3(get)]
    pub duration_seconds: Option<f64>,
    #[pyo3(get)]
    pub average_tokens_per_second: Option<f64>,
    #[pyo3(get)]
    pub first_seq: Option<u64>,
    #[pyo3(get)]
    pub last_seq: Option<u64>,
    #[pyo3(get)]
    pub max_seq: Option<u64>,
    #[pyo3(get)]
    pub seq_gaps: u64,
    #[pyo3(get)]
    pub seq_missing: u64,
    #[pyo3(get)]
    pub seq_regressions: u64,
    #[pyo3(get)]
    pub gap_samples: Vec<(u64, u64)>,
    #[pyo3(get)]
    pub dropped_events: u64,
    #[pyo3(get)]
    pub malformed: u64,
    #[pyo3(get)]
    pub oversize_lines: u64,
    #[pyo3(get)]
    pub torn_tail: bool,
    #[pyo3(get)]
    pub malformed_lines: Vec<PyMalformedLine>,
    /// `(unix_second, tokens)` of the recent window's nonzero seconds, oldest first.
    #[pyo3(get)]
    pub rate_buckets: Vec<(i64, u64)>,
    #[pyo3(get)]
    pub window_seconds: usize,
    #[pyo3(get)]
    pub latency_bounds_ms: Vec<f64>,
    /// Calls whose usage is unknown (the proxy saw none), over the components.
    #[pyo3(get)]
    pub unknown_usage_calls: u64,
    /// Tokens of the budget held for those calls, over the components.
    #[pyo3(get)]
    pub tokens_held: u64,
    /// What is left of the budget: budget - tokens - tokens_held, never below
    /// 0 (None without a budget). Held tokens count as spent (review 14).
    #[pyo3(get)]
    pub tokens_remaining: Option<u64>,
    /// The loops of the runs kept, oldest run first.
    #[pyo3(get)]
    pub loops: Vec<PyStepLoop>,
    comps: Components,
    cost: Cost,
    mods: Models,
    runs_kept: Vec<Py<PyRunSnapshot>>,
    counts: Vec<(String, u64)>,
    alloc: Vec<(String, u64)>,
    window: fold::RateWindow,
    last: Vec<Event>,
    flight: Option<PyStepInFlight>,
}

#[pymethods]
impl PySessionSnapshot {
    #[getter]
    fn components<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        components_dict(py, &self.comps)
    }

    /// Per model, by name (see `ModelSnapshot`).
    #[getter]
    fn models<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        models_dict(py, &self.mods)
    }

    /// Per component, per model (`{component: {model: ModelSnapshot}}`).
    #[getter]
    fn component_models<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        component_models_dict(py, &self.mods)
    }

    /// Nano-dollars over the session's priced events (its components' cost).
    #[getter]
    fn cost_nanousd(&self) -> u64 {
        self.cost.nanousd
    }

    #[getter]
    fn priced_events(&self) -> u64 {
        self.cost.priced
    }

    #[getter]
    fn unpriced_tokens(&self) -> u64 {
        self.cost.unpriced_tokens
    }

    #[getter]
    fn unpriced_models(&self) -> Vec<String> {
        self.cost.unpriced_models.clone()
    }

    /// The runs kept, oldest first.
    #[getter]
    fn runs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.runs_kept.iter().map(|r| r.clone_ref(py)))
    }

    #[getter]
    fn event_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.counts {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    #[getter]
    fn allocations<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.alloc {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// The last events kept (`last_n`), oldest first.
    #[getter]
    fn last_entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for e in &self.last {
            list.append(crate::entry(py, e.clone())?)?;
        }
        Ok(list)
    }

    /// Tokens of the events in the `seconds` seconds (at most `window_seconds`)
    /// ending `idle` seconds after the latest event (event time, whole seconds).
    #[pyo3(signature = (seconds = 60.0, idle = 0.0))]
    fn tokens_in(&self, seconds: f64, idle: f64) -> u64 {
        self.window.tokens_in(whole(seconds), whole(idle))
    }

    /// The recent rate: tokens of the last `seconds` of event time ending
    /// `idle` seconds after the latest event (a stalled session's rate decays),
    /// over that span, or over the session's duration plus `idle` when shorter.
    /// None before two distinct event times.
    #[pyo3(signature = (seconds = 60.0, idle = 0.0))]
    fn recent_tokens_per_second(&self, seconds: f64, idle: f64) -> Option<f64> {
        let idle = if idle.is_finite() { idle.max(0.0) } else { 0.0 };
        let seconds = if seconds.is_finite() {
            seconds.clamp(1.0, self.window_seconds as f64)
        } else {
            self.window_seconds as f64
        };
        let span = seconds.min(self.duration_seconds? + idle);
        (span > 0.0).then(|| self.window.tokens_in(whole(seconds), whole(idle)) as f64 / span)
    }

    /// The step in flight in the current run (see `StepInFlight`), or None.
    #[getter]
    fn in_flight(&self) -> Option<PyStepInFlight> {
        self.flight.clone()
    }

    /// Tokens per bucket of `bucket_seconds` (whole seconds), `buckets` of them,
    /// oldest first, ending `idle` seconds after the latest event: a sparkline
    /// of the recent rate (the window holds `window_seconds` seconds).
    #[pyo3(signature = (buckets = 16, bucket_seconds = 4.0, idle = 0.0))]
    fn rate_series(&self, buckets: usize, bucket_seconds: f64, idle: f64) -> Vec<u64> {
        rate_series(&self.window, buckets, whole(bucket_seconds), whole(idle))
    }

    /// The snapshot as plain data (for JSON views and tests).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("lines", self.lines)?;
        d.set_item("entries", self.entries)?;
        d.set_item("tokens", self.tokens)?;
        d.set_item("status", &self.status)?;
        d.set_item("reason", &self.reason)?;
        d.set_item("budget", self.budget)?;
        d.set_item("allocations", self.allocations(py)?)?;
        d.set_item("run_count", self.run_count)?;
        d.set_item("runs_dropped", self.runs_dropped)?;
        d.set_item("run", self.run.get().to_dict(py)?)?;
        let runs = PyList::empty(py);
        for r in &self.runs_kept {
            runs.append(r.get().to_dict(py)?)?;
        }
        d.set_item("runs", runs)?;
        d.set_item("components", components_plain(py, &self.comps)?)?;
        cost_items(&d, &self.cost)?;
        models_items(&d, &self.mods)?;
        d.set_item("unknown_usage_calls", self.unknown_usage_calls)?;
        d.set_item("tokens_held", self.tokens_held)?;
        d.set_item("tokens_remaining", self.tokens_remaining)?;
        d.set_item("loops", loops_list(py, &self.loops)?)?;
        d.set_item("event_counts", self.event_counts(py)?)?;
        d.set_item("first_timestamp", &self.first_timestamp)?;
        d.set_item("last_timestamp", &self.last_timestamp)?;
        d.set_item("duration_seconds", self.duration_seconds)?;
        d.set_item("average_tokens_per_second", self.average_tokens_per_second)?;
        d.set_item("first_seq", self.first_seq)?;
        d.set_item("last_seq", self.last_seq)?;
        d.set_item("max_seq", self.max_seq)?;
        d.set_item("seq_gaps", self.seq_gaps)?;
        d.set_item("seq_missing", self.seq_missing)?;
        d.set_item("seq_regressions", self.seq_regressions)?;
        d.set_item("gap_samples", self.gap_samples.clone())?;
        d.set_item("dropped_events", self.dropped_events)?;
        d.set_item("malformed", self.malformed)?;
        d.set_item("oversize_lines", self.oversize_lines)?;
        d.set_item("torn_tail", self.torn_tail)?;
        let bad = PyList::empty(py);
        for m in &self.malformed_lines {
            let t = PyTuple::new(
                py,
                [
                    m.offset.into_pyobject(py)?.into_any(),
                    m.kind.into_pyobject(py)?.into_any(),
                    m.reason.as_str().into_pyobject(py)?.into_any(),
                ],
            )?;
            bad.append(t)?;
        }
        d.set_item("malformed_lines", bad)?;
        d.set_item("rate_buckets", self.rate_buckets.clone())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "SessionSnapshot(status={:?}, tokens={}, entries={}, runs={})",
            self.status, self.tokens, self.entries, self.run_count
        )
    }
}

fn whole(seconds: f64) -> u64 {
    if seconds.is_finite() && seconds > 0.0 {
        seconds.floor() as u64
    } else {
        0
    }
}

/// Build the snapshot of `st` (a copy taken under the fold's lock).
pub fn session(py: Python<'_>, st: &FoldState) -> PyResult<PySessionSnapshot> {
    let duration = seconds_between(st.first_timestamp.as_deref(), st.last_timestamp.as_deref());
    let mut counts: Vec<(String, u64)> = st
        .event_counts
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    counts.sort();
    let held = tokens_held(st.components.iter().map(|(_, c)| c));
    Ok(PySessionSnapshot {
        lines: st.lines,
        entries: st.entries,
        tokens: st.tokens,
        status: st.status.clone(),
        reason: st.run().reason.clone(),
        budget: st.budget,
        run_count: st.runs,
        runs_dropped: st.runs_dropped,
        run: run(py, st, st.run())?,
        first_timestamp: st.first_timestamp.clone(),
        last_timestamp: st.last_timestamp.clone(),
        duration_seconds: duration,
        average_tokens_per_second: duration.filter(|d| *d > 0.0).map(|d| st.tokens as f64 / d),
        first_seq: st.first_seq,
        last_seq: st.last_seq,
        max_seq: st.max_seq,
        seq_gaps: st.seq_gaps,
        seq_missing: st.seq_missing,
        seq_regressions: st.seq_regressions,
        gap_samples: st.gap_samples.clone(),
        dropped_events: st.dropped_events,
        malformed: st.malformed,
        oversize_lines: st.oversize_lines,
        torn_tail: st.torn_tail,
        malformed_lines: st
            .malformed_samples
            .iter()
            .zip(&st.sample_oversize)
            .map(|(m, &o)| PyMalformedLine {
                offset: m.offset,
                kind: if o { "oversize" } else { "malformed" },
                reason: m.reason.clone(),
            })
            .collect(),
        rate_buckets: st.window.buckets(),
        window_seconds: fold::WINDOW_SECONDS,
        latency_bounds_ms: LATENCY_BOUNDS_MS.to_vec(),
        unknown_usage_calls: unknown_usage(st.components.iter().map(|(_, c)| c)),
        tokens_held: held,
        tokens_remaining: remaining(st.budget, st.tokens, held),
        loops: std::iter::once(&st.head)
            .chain(st.run_list.iter())
            .flat_map(|r| loops(r.number, &r.steps))
            .collect(),
        comps: components(py, &st.components)?,
        cost: fold_cost(st),
        mods: models(st.models().iter()),
        runs_kept: st
            .run_list
            .iter()
            .map(|r| run(py, st, r))
            .collect::<PyResult<_>>()?,
        counts,
        alloc: st.allocations.clone(),
        window: st.window.clone(),
        last: st.last_entries(),
        flight: in_flight(st),
    })
}

/// [`session`] of the whole history: the fold of what the log holds joined
/// with the session's ledger (`ledger::join`), for a view that follows the
/// log (the monitor). When the ledger knows runs the log no longer holds
/// (their events rotated or deleted by an external tool), the session's
/// tokens, components, runs and run count are the history's, so the view
/// agrees with `sigil sessions`, `tokens.json` and the orchestrator's result;
/// the rest (events, rates, sequence checks, last entries) is the log's.
pub fn session_joined(
    py: Python<'_>,
    st: &FoldState,
    ledger: Option<&Ledger>,
) -> PyResult<PySessionSnapshot> {
    let mut s = session(py, st)?;
    let Some(l) = ledger else { return Ok(s) };
    let h = ledger::join(st, Some(l));
    let ledger_only = h
        .runs
        .iter()
        .filter(|(r, _)| matches!(r, RunRef::Ledger(_)))
        .count() as u64;
    if ledger_only == 0 {
        return Ok(s); // the log holds every run: the fold is the history
    }
    s.tokens = h.tokens;
    s.run_count = ledger_only.saturating_add(st.runs);
    s.comps = components(py, &h.components)?;
    s.mods = models(h.models.iter());
    s.unknown_usage_calls = unknown_usage(h.components.iter().map(|(_, c)| c));
    s.tokens_held = tokens_held(h.components.iter().map(|(_, c)| c));
    // The ledger-only runs' loops (older than the log's), then the log's.
    let mut all: Vec<PyStepLoop> = h
        .runs
        .iter()
        .filter_map(|(r, _)| match r {
            RunRef::Ledger(i) => Some(ledger_loops(&l.runs[*i])),
            RunRef::Log(_) => None,
        })
        .flatten()
        .collect();
    all.append(&mut s.loops);
    s.loops = all;
    s.runs_kept = h
        .runs
        .iter()
        .map(|(r, status)| match r {
            RunRef::Log(i) => run_as(py, st, &st.run_list[*i], status),
            RunRef::Ledger(i) => ledger_run(py, &l.runs[*i], status),
        })
        .collect::<PyResult<_>>()?;
    // No run left in the log, or only runs older than the ledger's last (the
    // log cut or deleted after it): the session is where its last run left
    // it, as `sigil diff` and `sigil sessions` say.
    if let Some((RunRef::Ledger(i), status)) = h.runs.last() {
        let last = &l.runs[*i];
        s.run = ledger_run(py, last, status)?;
        s.status.clone_from(status);
        s.budget = last.budget;
    }
    s.tokens_remaining = remaining(s.budget, s.tokens, s.tokens_held);
    Ok(s)
}

/// The session's budget in a history: its last run's when only the ledger
/// knows that run (the log cut or deleted after it), else the latest the
/// fold read, as [`session_joined`] says it.
pub fn history_budget(
    h: &ledger::History,
    st: Option<&FoldState>,
    ledger: Option<&Ledger>,
) -> Option<u64> {
    match (h.runs.last(), ledger) {
        (Some((RunRef::Ledger(i), _)), Some(l)) => l.runs.get(*i).and_then(|r| r.budget),
        _ => st.and_then(|s| s.budget),
    }
}

/// What is left of the history's budget ([`history_budget`]) once its
/// tokens are used and its held tokens held.
pub fn history_remaining(
    h: &ledger::History,
    st: Option<&FoldState>,
    ledger: Option<&Ledger>,
) -> Option<u64> {
    let held = tokens_held(h.components.iter().map(|(_, c)| c));
    remaining(history_budget(h, st, ledger), h.tokens, held)
}

/// What is left of `budget` once `tokens` are used and `held` are held for
/// calls of unknown usage (never below 0; None without a budget).
pub fn remaining(budget: Option<u64>, tokens: u64, held: u64) -> Option<u64> {
    budget.map(|b| b.saturating_sub(tokens).saturating_sub(held))
}

// ---------------------------------------------------------------------------
// The pre-snapshot summary dict, kept until its callers (monitor.py's
// `SessionState.from_summary`, tests) read snapshots. Its component
// `operations`/`latency_ms` keep the old rule (every step event counted).

fn legacy_components<'py>(
    py: Python<'py>,
    comps: &fold::Names<ComponentTotals>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let mut names: Vec<(&str, &ComponentTotals)> = comps.iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    for (name, c) in names {
        let cd = PyDict::new(py);
        cd.set_item("tokens", c.tokens)?;
        cd.set_item("operations", c.operations.saturating_add(c.errors))?;
        cd.set_item("latency_ms", c.step_latency_ms)?;
        cd.set_item("errors", c.errors)?;
        d.set_item(name, cd)?;
    }
    Ok(d)
}

pub fn legacy_summary<'py>(py: Python<'py>, st: &FoldState) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("lines", st.lines)?;
    d.set_item("entries", st.entries)?;
    d.set_item("malformed", st.malformed)?;
    let samples = PyList::empty(py);
    for m in &st.malformed_samples {
        samples.append((m.offset, m.reason.as_str()))?;
    }
    d.set_item("malformed_samples", samples)?;
    d.set_item("oversize_lines", st.oversize_lines)?;
    d.set_item("torn_tail", st.torn_tail)?;
    d.set_item("tokens", st.tokens)?;
    let counts = PyDict::new(py);
    let mut kinds: Vec<(&str, &u64)> = st.event_counts.iter().collect();
    kinds.sort();
    for (k, v) in kinds {
        counts.set_item(k, v)?;
    }
    d.set_item("event_counts", counts)?;
    d.set_item("components", legacy_components(py, &st.components)?)?;
    d.set_item("status", &st.status)?;
    d.set_item("budget", st.budget)?;
    let alloc = PyDict::new(py);
    for (k, v) in &st.allocations {
        alloc.set_item(k, v)?;
    }
    d.set_item("allocations", alloc)?;
    d.set_item("runs", st.runs)?;
    let r = st.run();
    let run = PyDict::new(py);
    run.set_item("number", r.number)?;
    run.set_item("started_at", &r.started_at)?;
    run.set_item("ended_at", &r.ended_at)?;
    run.set_item("status", &r.status)?;
    run.set_item("tokens", r.tokens)?;
    run.set_item("budget", r.budget)?;
    run.set_item("components", legacy_components(py, &r.components)?)?;
    let start_meta = match &r.start_metadata {
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => crate::json_to_py(py, &v)?,
            Err(_) => py.None().into_bound(py),
        },
        None => py.None().into_bound(py),
    };
    run.set_item("start_metadata", start_meta)?;
    d.set_item("run", run)?;
    d.set_item("first_timestamp", &st.first_timestamp)?;
    d.set_item("last_timestamp", &st.last_timestamp)?;
    d.set_item("max_seq", st.max_seq)?;
    d.set_item("last_seq", st.last_seq)?;
    d.set_item("seq_gaps", st.seq_gaps)?;
    d.set_item("seq_missing", st.seq_missing)?;
    d.set_item("seq_regressions", st.seq_regressions)?;
    d.set_item("gap_samples", st.gap_samples.clone())?;
    d.set_item("dropped_events", st.dropped_events)?;
    let last = PyList::empty(py);
    for e in st.last_entries() {
        last.append(crate::entry(py, e)?)?;
    }
    d.set_item("last_entries", last)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, comp: &str, ts: &str, meta: &str) -> Event {
        Event {
            timestamp: ts.into(),
            session_id: "s".into(),
            event_type: kind.into(),
            component: comp.into(),
            message: format!("{comp} {kind}"),
            tokens: 0,
            seq: None,
            metadata: meta.into(),
            offset: 0,
        }
    }

    #[test]
    fn the_open_step_is_in_flight_and_a_closed_one_is_not() {
        let mut events = vec![
            ev("session_start", "orchestrator", "t0", "{}"),
            ev("step_start", "routing", "t1", "{}"),
            ev("step_complete", "routing", "t2", "{}"),
            ev("step_start", "reasoning", "t3", "{}"),
            ev("token_consumption", "reasoning", "t4", "{}"),
        ];
        let f = step_in_flight(&events).expect("reasoning is running");
        assert_eq!(
            (f.component.as_str(), f.started_at.as_str(), f.attempt),
            ("reasoning", "t3", 1)
        );
        events.push(ev("step_error", "reasoning", "t5", "{}"));
        assert_eq!(step_in_flight(&events), None);
    }

    #[test]
    fn retries_count_attempts_and_keep_the_step_start() {
        let events = vec![
            ev("step_start", "reasoning", "t1", "{}"),
            ev("retry_attempt", "reasoning", "t2", r#"{"attempt":1}"#),
            ev("retry_attempt", "orchestrator", "t2", r#"{"resume":true}"#),
        ];
        let f = step_in_flight(&events).unwrap();
        assert_eq!((f.attempt, f.started_at.as_str()), (2, "t1"));
        let mut again = events.clone();
        again.push(ev("step_start", "reasoning", "t3", r#"{"attempt":5}"#));
        let f = step_in_flight(&again).unwrap();
        assert_eq!((f.attempt, f.started_at.as_str()), (5, "t1"));
    }

    #[test]
    fn a_run_end_or_a_new_run_closes_every_step() {
        let events = vec![
            ev("step_start", "reasoning", "t1", "{}"),
            ev("session_error", "orchestrator", "t2", "{}"),
        ];
        assert_eq!(step_in_flight(&events), None);
    }

    fn fold_of(lines: &[String]) -> FoldState {
        let mut st = FoldState::new(0);
        let text = lines.concat();
        let mut r = text.as_bytes();
        fold::fold_reader(&mut st, &mut r, 0, 1 << 20).unwrap();
        st
    }

    fn line(kind: &str, comp: &str, tokens: u64, seq: u64, meta: &str) -> String {
        format!(
            "{{\"timestamp\":\"2026-01-01T00:00:{seq:02}+00:00\",\"session_id\":\"s\",\"event_type\":\"{kind}\",\"component\":\"{comp}\",\"message\":\"m\",\"tokens\":{tokens},\"metadata\":{meta},\"seq\":{seq}}}\n"
        )
    }

    const LEDGER: &str = r#"{"ledger_version": 1, "last_seq": 3, "total_used": 10, "events": 4,
        "missing_events": 0, "component_totals": {"planning": {"tokens": 10, "operations": 1}},
        "runs": [{"run": 1, "status": "complete", "tokens_used": 10, "events": 4,
                  "first_seq": 0, "last_seq": 3, "budget": 60,
                  "component_stats": {"planning": {"tokens": 10, "operations": 1,
                      "errors": 0, "retries": 0, "latency_ms": 2.5}}}]}"#;

    #[test]
    fn what_is_left_of_a_historys_budget_counts_its_held_tokens_and_ledger_runs() {
        let l = ledger::parse("t.json", LEDGER.as_bytes()).unwrap();
        // Run 1 is the ledger's alone (its events rotated away); the log holds
        // run 2: 7 tokens used, a proxy call left open holding 3 + 5.
        let st = fold_of(&[
            line(
                "session_start",
                "orchestrator",
                0,
                4,
                r#"{"run":2,"budget":100}"#,
            ),
            line("step_complete", "m", 7, 5, r#"{"run":2}"#),
            line(
                "step_start",
                "m",
                0,
                6,
                r#"{"run":2,"call":1,"prompt_tokens_reserved":3,"max_tokens":5}"#,
            ),
        ]);
        // The run live: its open call is in flight, nothing held.
        let h = ledger::join(&st, Some(&l));
        assert_eq!(history_budget(&h, Some(&st), Some(&l)), Some(100));
        assert_eq!(
            history_remaining(&h, Some(&st), Some(&l)),
            Some(100 - 10 - 7)
        );
        // Its writer gone: the call holds its reservation.
        let settled = st.settled(true);
        let h = ledger::join(&settled, Some(&l));
        assert_eq!(
            history_remaining(&h, Some(&settled), Some(&l)),
            Some(100 - 10 - 7 - 8)
        );
        // The ledger alone: its last run's budget.
        let h = ledger::alone(&l);
        assert_eq!(history_remaining(&h, None, Some(&l)), Some(60 - 10));
        // No budget anywhere: nothing to be left of.
        let st = fold_of(&[line("step_complete", "m", 7, 0, "{}")]);
        let h = ledger::join(&st, None);
        assert_eq!(history_remaining(&h, Some(&st), None), None);
        // Never below 0.
        let st = fold_of(&[
            line(
                "session_start",
                "orchestrator",
                0,
                0,
                r#"{"run":1,"budget":5}"#,
            ),
            line("step_complete", "m", 7, 1, r#"{"run":1}"#),
        ]);
        let h = ledger::join(&st, None);
        assert_eq!(history_remaining(&h, Some(&st), None), Some(0));
    }

    #[test]
    fn rate_series_splits_the_window_into_buckets_oldest_first() {
        let mut w = fold::RateWindow::default();
        w.add(100, 10);
        w.add(103, 5);
        w.add(107, 7);
        // Buckets of 4 s ending at 107: [100..103], [104..107].
        assert_eq!(rate_series(&w, 2, 4, 0), vec![15, 7]);
        // Idle 4 s later the newest bucket is empty.
        assert_eq!(rate_series(&w, 3, 4, 4), vec![15, 7, 0]);
        let total: u64 = rate_series(&w, 16, 4, 0).iter().sum();
        assert_eq!(total, w.tokens_in(64, 0));
        assert!(rate_series(&fold::RateWindow::default(), 4, 4, 0)
            .iter()
            .all(|&n| n == 0));
    }
}
