//! The session's durable ledger, `tokens.json` (ARCHITECTURE.md contract 11),
//! and its join with the session model of what the log still holds
//! (contract 12): one history of the whole session.
//!
//! A run's events can leave the log (an external rotator deletes or
//! compresses old segments; `rename` moves them away). The ledger written at
//! the end of every run keeps each run's totals and the last `seq` it covers,
//! so the runs only the ledger knows still count. The join:
//! - a run whose `session_start` the log holds is taken from the fold; a run
//!   only the ledger knows, from the ledger (`source` tells which);
//! - the session's tokens are the fold's when the ledger adds no run; else the
//!   runs' tokens plus the tokens logged before the log's first
//!   `session_start` (`orphan_tokens`), which a ledger covering the log's first
//!   events already counts in its runs;
//! - component totals are the fold's plus the ledger-only runs' (tokens,
//!   operations, errors, retries, failed-step latency, cost; the latency
//!   histogram of successful steps and the unpriced models' names are the
//!   log's: the ledger has neither);
//! - `last_seq` is the highest of the log's and the ledger's; a hole in `seq`
//!   that neither covers is counted in `missing_events`;
//! - a run left `running` before the last run is `incomplete` (its writer died
//!   and a later run started).
//!
//! Reading is bounded ([`MAX_LEDGER_BYTES`]); a file that is not a ledger is a
//! problem reported in words, and the log alone is folded then.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde_json::{Map, Value};

use crate::cost::Cost;
use crate::fold::{
    model_key, ComponentTotals, FoldState, ModelTotals, Names, LOOP_MIN_STARTS, LOOP_SEQS,
    MAX_HASH, MAX_NAMES, MAX_STEP_HASHES,
};

/// A run's step loop as the ledger recorded it (the model's: component,
/// input hash, starts, first `seq`s; `fold::StepHashes::loops`).
pub type LedgerLoop = (String, String, u64, Vec<u64>);

/// A component's whole-session totals in the ledger: name, tokens,
/// operations, cost, tokens held for calls of unknown usage.
pub type ComponentTotal = (String, u64, u64, Cost, u64);

/// `tokens.json`'s `ledger_version`.
pub const LEDGER_VERSION: u64 = 1;
/// A ledger is small (a few hundred bytes per run); anything larger is not ours.
pub const MAX_LEDGER_BYTES: u64 = 64 << 20;
/// Run statuses `--resume` continues: the writer died, or the run was interrupted.
pub const RESUMABLE: [&str; 2] = ["running", "interrupted"];

/// One run as the ledger recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRun {
    pub number: u64,
    pub status: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub task: Option<String>,
    pub budget: Option<u64>,
    pub tokens: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub events: u64,
    pub steps_completed: u64,
    pub steps_failed: u64,
    pub duration_seconds: f64,
    pub allocations: Option<Vec<(String, u64)>>,
    /// At most `MAX_NAMES`, in the ledger's order.
    pub components: Vec<(String, ComponentTotals)>,
    /// Per model (`model_stats`), at most `MAX_NAMES`, in the ledger's order.
    pub models: Vec<(String, ModelTotals)>,
    /// The run's step loops (`loops`), at most what the fold keeps
    /// (`MAX_STEP_HASHES`, `LOOP_SEQS` seqs each); None when the ledger has none
    /// (written before loops were kept).
    pub loops: Option<Vec<LedgerLoop>>,
}

/// One file of the log as the ledger saw it (what tells, later, that the log
/// has not changed since).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    pub name: String,
    pub size: u64,
    pub mtime_ns: i64,
}

/// A valid ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct Ledger {
    pub last_seq: u64,
    pub runs: Vec<LedgerRun>,
    /// name -> (tokens, operations, cost, tokens held for calls of unknown
    /// usage), the whole session's as last written.
    pub component_totals: Option<Vec<ComponentTotal>>,
    /// Per model, the whole session's as last written (`model_totals`).
    pub model_totals: Option<Vec<(String, ModelTotals)>>,
    pub log_files: Option<Vec<LogFile>>,
    pub total_used: u64,
    pub events: u64,
    pub missing_events: u64,
}

impl Ledger {
    /// Whether the ledger alone is the session's history: it was written from
    /// the model of exactly `files` (same names, sizes, mtimes), it has the
    /// session's component totals, and no run is left to resume.
    pub fn unchanged(&self, files: &[LogFile]) -> bool {
        let Some(last) = self.runs.last() else {
            return false;
        };
        !RESUMABLE.contains(&last.status.as_str())
            && self.component_totals.is_some()
            && self.model_totals.is_some()
            && self.runs.iter().all(|r| r.loops.is_some())
            && self.log_files.as_deref() == Some(files)
    }
}

/// `tokens.json` at `path`: `Ok(None)` when there is none, `Err(why)` when the
/// file is not a usable ledger.
pub fn read(path: &Path) -> Result<Option<Ledger>, String> {
    let shown = path.display().to_string();
    let raw = match read_bounded(path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {shown}: {}", strerror(&e))),
    };
    if raw.len() as u64 > MAX_LEDGER_BYTES {
        return Err(format!("{shown} is larger than {MAX_LEDGER_BYTES} bytes"));
    }
    parse(&shown, &raw).map(Some)
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut raw = Vec::new();
    file.take(MAX_LEDGER_BYTES + 1).read_to_end(&mut raw)?;
    Ok(raw)
}

fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    }
}

/// Parse and check a ledger's text (`shown` names the file in the problem).
pub fn parse(shown: &str, raw: &[u8]) -> Result<Ledger, String> {
    let doc: Value =
        serde_json::from_slice(raw).map_err(|e| format!("{shown} is not JSON: {e}"))?;
    let version_ok = doc.get("ledger_version").is_some_and(|v| {
        v.as_u64() == Some(LEDGER_VERSION) || v.as_f64() == Some(LEDGER_VERSION as f64)
    });
    let Some(obj) = doc.as_object().filter(|_| version_ok) else {
        return Err(format!(
            "{shown} is not a ledger (no ledger_version {LEDGER_VERSION})"
        ));
    };
    let (Some(last_seq), Some(runs)) = (
        obj.get("last_seq").and_then(Value::as_u64),
        obj.get("runs").and_then(Value::as_array),
    ) else {
        return Err(format!("{shown}: last_seq or runs missing"));
    };
    let runs = runs
        .iter()
        .filter_map(Value::as_object)
        .map(run)
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| format!("{shown}: {e}"))?;
    let component_totals = obj
        .get("component_totals")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, c)| {
                    let c = c.as_object()?;
                    Some((
                        k.clone(),
                        count(c.get("tokens")),
                        count(c.get("operations")),
                        cost(c),
                        count(c.get("tokens_held")),
                    ))
                })
                .collect()
        });
    let model_totals = obj.get("model_totals").map(models);
    Ok(Ledger {
        last_seq,
        runs,
        component_totals,
        model_totals,
        log_files: obj.get("log_files").and_then(log_files),
        total_used: count(obj.get("total_used")),
        events: count(obj.get("events")),
        missing_events: count(obj.get("missing_events")),
    })
}

fn log_files(v: &Value) -> Option<Vec<LogFile>> {
    v.as_array()?
        .iter()
        .map(|f| {
            let f = f.as_object().filter(|f| f.len() == 3)?;
            Some(LogFile {
                name: f.get("name")?.as_str()?.to_string(),
                size: f.get("size")?.as_u64()?,
                mtime_ns: f.get("mtime_ns")?.as_i64()?,
            })
        })
        .collect()
}

/// The cost a ledger recorded for a component (its exact integers; the
/// names of unpriced models are not kept).
fn cost(c: &Map<String, Value>) -> Cost {
    Cost {
        nanousd: count(c.get("cost_nanousd")),
        priced: count(c.get("priced_events")),
        unpriced_tokens: count(c.get("unpriced_tokens")),
        unpriced_models: Vec::new(),
    }
}

/// A ledger's per-model totals (`{component: {model: {tokens, ...}}}`),
/// keyed as the fold keys them ([`model_key`]), the first `MAX_NAMES` pairs
/// in its order; anything that is not an object is none.
fn models(v: &Value) -> Vec<(String, ModelTotals)> {
    let Some(m) = v.as_object() else {
        return Vec::new();
    };
    m.iter()
        .filter_map(|(component, ms)| Some((component, ms.as_object()?)))
        .flat_map(|(component, ms)| ms.iter().map(move |(model, c)| (component, model, c)))
        .filter_map(|(component, model, c)| {
            let c = c.as_object()?;
            Some((
                model_key(component, model),
                ModelTotals {
                    tokens: count(c.get("tokens")),
                    input_tokens: count(c.get("input_tokens")),
                    output_tokens: count(c.get("output_tokens")),
                    calls: count(c.get("calls")),
                    errors: count(c.get("errors")),
                    cost_nanousd: count(c.get("cost_nanousd")),
                    priced_events: count(c.get("priced_events")),
                    unpriced_tokens: count(c.get("unpriced_tokens")),
                    unpriced_calls: count(c.get("unpriced_calls")),
                    unknown_usage: count(c.get("unknown_usage_calls")),
                    tokens_held: count(c.get("tokens_held")),
                },
            ))
        })
        .take(MAX_NAMES)
        .collect()
}

/// A run's step loops (`[{component, input_sha256, starts, seqs}]`), bounded
/// as the fold bounds them; an entry that is not a loop is none, anything
/// that is not a list is no record (None).
fn loops(v: &Value) -> Option<Vec<LedgerLoop>> {
    let text = |v: Option<&Value>, max: usize| {
        let t = v?.as_str()?;
        let mut end = t.len().min(max);
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        Some(t[..end].to_string())
    };
    Some(
        v.as_array()?
            .iter()
            .filter_map(|l| {
                let l = l.as_object()?;
                let starts = l
                    .get("starts")?
                    .as_u64()
                    .filter(|&n| n >= LOOP_MIN_STARTS)?;
                let seqs = l
                    .get("seqs")
                    .and_then(Value::as_array)
                    .map(|s| s.iter().filter_map(Value::as_u64).take(LOOP_SEQS).collect())
                    .unwrap_or_default();
                Some((
                    l.get("component")?.as_str()?.to_string(),
                    text(l.get("input_sha256"), MAX_HASH)?,
                    starts,
                    seqs,
                ))
            })
            .take(MAX_STEP_HASHES)
            .collect(),
    )
}

/// A non-negative integer (anything else counts as 0).
fn count(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}

fn positive(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64).filter(|&n| n > 0)
}

fn float(v: Option<&Value>) -> f64 {
    v.and_then(Value::as_f64).unwrap_or(0.0)
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

/// How Python shows a JSON value (for the problem's words).
fn shown(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "None".to_string(),
        Some(Value::Bool(b)) => if *b { "True" } else { "False" }.to_string(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(other) => other.to_string(),
    }
}

fn run(e: &Map<String, Value>) -> Result<LedgerRun, String> {
    let Some(number) = positive(e.get("run")) else {
        return Err(format!("run number {}", shown(e.get("run"))));
    };
    let allocations = e.get("allocations").and_then(Value::as_object).map(|m| {
        m.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect()
    });
    let mut components = Vec::new();
    if let Some(stats) = e.get("component_stats").and_then(Value::as_object) {
        for (name, c) in stats.iter().take(MAX_NAMES) {
            let Some(c) = c.as_object() else { continue };
            let mut totals = ComponentTotals::default();
            totals.tokens = count(c.get("tokens"));
            totals.operations = count(c.get("operations"));
            totals.errors = count(c.get("errors"));
            totals.retries = count(c.get("retries"));
            totals.latency_ms = float(c.get("latency_ms"));
            totals.failed_latency_ms = float(c.get("failed_latency_ms"));
            totals.cost = cost(c);
            totals.unknown_usage = count(c.get("unknown_usage_calls"));
            totals.tokens_held = count(c.get("tokens_held"));
            components.push((name.clone(), totals));
        }
    }
    let tokens = count(e.get("tokens_used"));
    // A ledger whose parts disagree with its totals is not trusted.
    let parts: u128 = components.iter().map(|(_, c)| u128::from(c.tokens)).sum();
    if parts != u128::from(tokens) {
        return Err(format!(
            "run {number}: components do not add up to tokens_used"
        ));
    }
    Ok(LedgerRun {
        number,
        status: text(e.get("status")).unwrap_or_else(|| "incomplete".to_string()),
        started_at: text(e.get("started_at")),
        ended_at: text(e.get("ended_at")),
        task: text(e.get("task")),
        budget: positive(e.get("budget")),
        tokens,
        first_seq: e.get("first_seq").and_then(Value::as_u64),
        last_seq: e.get("last_seq").and_then(Value::as_u64),
        events: count(e.get("events")),
        steps_completed: count(e.get("steps_completed")),
        steps_failed: count(e.get("steps_failed")),
        duration_seconds: float(e.get("duration_seconds")),
        allocations,
        components,
        models: e.get("model_stats").map(models).unwrap_or_default(),
        loops: e.get("loops").and_then(loops),
    })
}

/// Where a run of the history comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunRef {
    /// `FoldState::run_list[i]`
    Log(usize),
    /// `Ledger::runs[i]`
    Ledger(usize),
}

/// The whole session's history: the fold's runs and the ledger's (see the
/// module's rules). Runs are referenced, not copied.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// In run-number order, with each run's status in the history.
    pub runs: Vec<(RunRef, String)>,
    pub components: Names<ComponentTotals>,
    /// Per model: the fold's plus the ledger-only runs'.
    pub models: Names<ModelTotals>,
    pub tokens: u64,
    pub events: u64,
    pub last_seq: Option<u64>,
    pub ledger_seq: Option<u64>,
    pub missing_events: u64,
    pub orphan_tokens: u64,
}

fn add_counts(into: &mut ComponentTotals, c: &ComponentTotals) {
    into.tokens = into.tokens.saturating_add(c.tokens);
    into.operations = into.operations.saturating_add(c.operations);
    into.errors = into.errors.saturating_add(c.errors);
    into.retries = into.retries.saturating_add(c.retries);
    into.failed_latency_ms += c.failed_latency_ms;
    into.cost.add(&c.cost);
    into.unknown_usage = into.unknown_usage.saturating_add(c.unknown_usage);
    into.tokens_held = into.tokens_held.saturating_add(c.tokens_held);
}

fn add_models(into: &mut Names<ModelTotals>, models: &[(String, ModelTotals)]) {
    for (name, m) in models {
        into.slot(name).add(m);
    }
}

/// The history from the ledger alone (when [`Ledger::unchanged`]: no fold).
pub fn alone(ledger: &Ledger) -> History {
    let mut components: Names<ComponentTotals> = Names::default();
    for (name, tokens, operations, cost, held) in ledger.component_totals.iter().flatten() {
        let c = components.slot(name);
        c.tokens = c.tokens.saturating_add(*tokens);
        c.operations = c.operations.saturating_add(*operations);
        c.cost.add(cost);
        c.tokens_held = c.tokens_held.saturating_add(*held);
    }
    // The component totals carry no count of calls of unknown usage: it is
    // the runs' (every run is in the ledger), as a fold of the log counts it.
    for r in &ledger.runs {
        for (name, rc) in &r.components {
            if rc.unknown_usage > 0 {
                let c = components.slot(name);
                c.unknown_usage = c.unknown_usage.saturating_add(rc.unknown_usage);
            }
        }
    }
    let mut models: Names<ModelTotals> = Names::default();
    add_models(
        &mut models,
        ledger.model_totals.as_deref().unwrap_or_default(),
    );
    History {
        runs: ledger
            .runs
            .iter()
            .enumerate()
            .map(|(i, r)| (RunRef::Ledger(i), r.status.clone()))
            .collect(),
        components,
        models,
        tokens: ledger.total_used,
        events: ledger.events,
        last_seq: Some(ledger.last_seq),
        ledger_seq: Some(ledger.last_seq),
        missing_events: ledger.missing_events,
        orphan_tokens: 0,
    }
}

/// The fold of what the log holds, joined with the ledger (if any).
pub fn join(st: &FoldState, ledger: Option<&Ledger>) -> History {
    let covered = ledger.map(|l| l.last_seq);
    let mut runs: Vec<(RunRef, u64, String)> = Vec::new();
    let mut ledger_only: Vec<&crate::ledger::LedgerRun> = Vec::new();
    if let Some(l) = ledger {
        for (i, r) in l.runs.iter().enumerate() {
            if !st.run_list.iter().any(|x| x.number == r.number) {
                runs.push((RunRef::Ledger(i), r.number, r.status.clone()));
                ledger_only.push(r);
            }
        }
    }
    for (i, r) in st.run_list.iter().enumerate() {
        runs.push((RunRef::Log(i), r.number, r.status.clone()));
    }
    runs.sort_by_key(|r| r.1); // stable, as Python's sorted()
    let last = runs.len().saturating_sub(1);
    for (_, _, status) in runs.iter_mut().take(last) {
        if status == "running" {
            *status = "incomplete".to_string();
        }
    }

    // Tokens before the log's first session_start belong to a run whose start
    // was rotated away: the ledger counts them when it covers the log's first
    // events.
    let in_runs: u128 = st.run_list.iter().map(|r| u128::from(r.tokens)).sum();
    let mut orphan = if st.runs_dropped == 0 {
        u64::try_from(u128::from(st.tokens).saturating_sub(in_runs)).unwrap_or(u64::MAX)
    } else {
        0
    };
    if let (Some(c), Some(first)) = (covered, st.first_seq) {
        if c >= first {
            orphan = 0;
        }
    }
    let (tokens, events) = if ledger_only.is_empty() {
        (st.tokens, st.entries)
    } else {
        let from_ledger: u128 = ledger_only.iter().map(|r| u128::from(r.tokens)).sum();
        let events: u128 = ledger_only.iter().map(|r| u128::from(r.events)).sum();
        let total = u128::from(orphan) + in_runs + from_ledger;
        (
            u64::try_from(total).unwrap_or(u64::MAX),
            u64::try_from(u128::from(st.entries) + events).unwrap_or(u64::MAX),
        )
    };

    let mut components: Names<ComponentTotals> = Names::default();
    for (name, c) in st.components.iter() {
        *components.slot(name) = c.clone();
    }
    for r in &ledger_only {
        for (name, c) in &r.components {
            add_counts(components.slot(name), c);
        }
    }
    let mut models: Names<ModelTotals> = Names::default();
    for (name, m) in st.models().iter() {
        models.slot(name).add(m);
    }
    for r in &ledger_only {
        add_models(&mut models, &r.models);
    }

    let last_seq = match (st.max_seq, covered) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    // Events between what the ledger covers and the log's first event are
    // lost from both (without a ledger: every seq before the log's first).
    let lead_gap = match (st.first_seq, covered) {
        (Some(first), Some(c)) => first.saturating_sub(c.saturating_add(1)),
        (Some(first), None) => first,
        (None, _) => 0,
    };
    // The ledger counted the holes it saw; the log may still show the same ones.
    let missing = ledger
        .map_or(0, |l| l.missing_events)
        .max(lead_gap.saturating_add(st.seq_missing));
    History {
        runs: runs.into_iter().map(|(r, _, s)| (r, s)).collect(),
        components,
        models,
        tokens,
        events,
        last_seq,
        ledger_seq: covered,
        missing_events: missing,
        orphan_tokens: orphan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kind: &str, comp: &str, tokens: u64, seq: u64, meta: &str) -> String {
        format!(
            "{{\"timestamp\":\"2026-01-01T00:00:{:02}+00:00\",\"session_id\":\"s\",\"event_type\":\"{kind}\",\"component\":\"{comp}\",\"message\":\"m\",\"tokens\":{tokens},\"metadata\":{meta},\"seq\":{seq}}}\n",
            seq % 60
        )
    }

    fn fold(text: &str) -> FoldState {
        let mut st = FoldState::new(0);
        let mut r = text.as_bytes();
        crate::fold::fold_reader(&mut st, &mut r, 0, 1 << 20).unwrap();
        st
    }

    const LEDGER: &str = r#"{"ledger_version": 1, "last_seq": 3, "total_used": 10, "events": 4,
        "missing_events": 0, "component_totals": {"planning": {"tokens": 10, "operations": 1}},
        "model_totals": {"planning": {"m1": {"tokens": 10, "calls": 1, "cost_nanousd": 7}}},
        "log_files": [{"name": "execution.jsonl", "size": 10, "mtime_ns": 5}],
        "runs": [{"run": 1, "status": "complete", "tokens_used": 10, "events": 4,
                  "first_seq": 0, "last_seq": 3, "task": "t", "loops": [],
                  "model_stats": {"planning": {"m1": {"tokens": 10, "calls": 1, "errors": 1,
                      "unknown_usage_calls": 1}}},
                  "component_stats": {"planning": {"tokens": 10, "operations": 1,
                      "errors": 0, "retries": 0, "latency_ms": 2.5}}}]}"#;

    #[test]
    fn a_ledger_parses_and_bad_ones_say_why() {
        let l = parse("t.json", LEDGER.as_bytes()).unwrap();
        assert_eq!((l.last_seq, l.runs.len(), l.total_used), (3, 1, 10));
        assert_eq!(l.runs[0].components[0].1.operations, 1);
        assert!(l.unchanged(&[LogFile {
            name: "execution.jsonl".into(),
            size: 10,
            mtime_ns: 5
        }]));
        assert!(!l.unchanged(&[]));
        assert!(parse("t.json", b"{")
            .unwrap_err()
            .starts_with("t.json is not JSON"));
        assert_eq!(
            parse("t.json", b"{\"ledger_version\": 2}").unwrap_err(),
            "t.json is not a ledger (no ledger_version 1)"
        );
        assert_eq!(
            parse("t.json", b"{\"ledger_version\": 1, \"runs\": []}").unwrap_err(),
            "t.json: last_seq or runs missing"
        );
        let bad = LEDGER.replace("\"tokens_used\": 10", "\"tokens_used\": 11");
        assert_eq!(
            parse("t.json", bad.as_bytes()).unwrap_err(),
            "t.json: run 1: components do not add up to tokens_used"
        );
        let bad = LEDGER.replace("\"run\": 1,", "\"run\": \"x\",");
        assert_eq!(
            parse("t.json", bad.as_bytes()).unwrap_err(),
            "t.json: run number \"x\""
        );
    }

    #[test]
    fn runs_only_the_ledger_knows_join_the_logs() {
        let l = parse("t.json", LEDGER.as_bytes()).unwrap();
        // Run 1's events were rotated away; the log holds run 2 from seq 4.
        let log = [
            line("session_start", "orchestrator", 0, 4, "{\"run\":2}"),
            line(
                "step_complete",
                "planning",
                7,
                5,
                "{\"latency_ms\":1.0,\"model\":\"m2\"}",
            ),
            line("session_complete", "orchestrator", 0, 6, "{}"),
        ]
        .concat();
        let st = fold(&log);
        let h = join(&st, Some(&l));
        assert_eq!(h.runs.len(), 2);
        assert_eq!(h.runs[0], (RunRef::Ledger(0), "complete".to_string()));
        assert_eq!(h.runs[1].0, RunRef::Log(0));
        assert_eq!((h.tokens, h.events), (17, 7));
        assert_eq!(
            (h.last_seq, h.ledger_seq, h.missing_events),
            (Some(6), Some(3), 0)
        );
        let p = h.components.get("planning").unwrap();
        assert_eq!((p.tokens, p.operations, p.timed), (17, 2, 1));
        // Per model: the log's (m2) and the ledger-only run's (m1).
        let m1 = h.models.get(&model_key("planning", "m1")).unwrap();
        assert_eq!(
            (m1.tokens, m1.calls, m1.errors, m1.unknown_usage),
            (10, 1, 1, 1)
        );
        assert_eq!(
            h.models.get(&model_key("planning", "m2")).unwrap().tokens,
            7
        );

        // Without the ledger the log alone: seq 0..3 are missing.
        let h = join(&st, None);
        assert_eq!((h.tokens, h.events, h.missing_events), (7, 3, 4));

        // A hole neither covers.
        let gap = LEDGER.replace("\"last_seq\": 3, \"total", "\"last_seq\": 1, \"total");
        let h = join(&st, Some(&parse("t.json", gap.as_bytes()).unwrap()));
        assert_eq!(h.missing_events, 2);
    }

    #[test]
    fn tokens_before_the_first_start_count_unless_the_ledger_covers_them() {
        let l = parse("t.json", LEDGER.as_bytes()).unwrap();
        let log = [
            line("step_complete", "planning", 5, 4, "{}"),
            line("session_start", "orchestrator", 0, 5, "{\"run\":2}"),
            line("step_complete", "planning", 7, 6, "{}"),
        ]
        .concat();
        let h = join(&fold(&log), Some(&l));
        assert_eq!((h.orphan_tokens, h.tokens), (5, 22));
        // A ledger that covers seq 4 already counts those 5 tokens in run 1.
        let covering = LEDGER.replace("\"last_seq\": 3, \"total", "\"last_seq\": 4, \"total");
        let h = join(
            &fold(&log),
            Some(&parse("t.json", covering.as_bytes()).unwrap()),
        );
        assert_eq!((h.orphan_tokens, h.tokens), (0, 17));
    }

    #[test]
    fn a_dead_run_before_the_last_is_incomplete() {
        let log = [
            line("session_start", "orchestrator", 0, 0, "{\"run\":1}"),
            line("session_start", "orchestrator", 0, 1, "{\"run\":2}"),
        ]
        .concat();
        let h = join(&fold(&log), None);
        let statuses: Vec<&str> = h.runs.iter().map(|r| r.1.as_str()).collect();
        assert_eq!(statuses, ["incomplete", "running"]);
    }

    #[test]
    fn the_ledger_alone_is_the_history() {
        let l = parse("t.json", LEDGER.as_bytes()).unwrap();
        let h = alone(&l);
        assert_eq!((h.tokens, h.events, h.last_seq), (10, 4, Some(3)));
        assert_eq!(h.components.get("planning").unwrap().operations, 1);
        let m1 = h.models.get(&model_key("planning", "m1")).unwrap();
        assert_eq!((m1.tokens, m1.calls, m1.cost_nanousd), (10, 1, 7));
        // Review 14, finding 8: the calls of unknown usage are the runs'.
        assert_eq!(h.components.get("planning").unwrap().unknown_usage, 0);
        let unknown = LEDGER.replace(
            "\"errors\": 0, \"retries\": 0,",
            "\"errors\": 0, \"retries\": 0, \"unknown_usage_calls\": 2, \"tokens_held\": 9,",
        );
        let u = alone(&parse("t.json", unknown.as_bytes()).unwrap());
        assert_eq!(u.components.get("planning").unwrap().unknown_usage, 2);
        // A ledger without per-model totals does not stand for the log alone.
        let old = LEDGER.replace("\"model_totals\"", "\"old_model_totals\"");
        let old = parse("t.json", old.as_bytes()).unwrap();
        assert!(!old.unchanged(&l.log_files.clone().unwrap()));
    }

    #[test]
    fn a_runs_loops_are_kept_bounded_and_an_old_ledger_has_none() {
        let one = r#"{"component": "planning", "input_sha256": "aa", "starts": 5,
            "seqs": [1, 2, 3, 4, 5, 6, 7]}"#;
        let many = vec![one; MAX_STEP_HASHES + 3].join(",");
        let with = LEDGER.replace(
            "\"loops\": []",
            &format!("\"loops\": [{many}, {{\"component\": \"x\", \"starts\": 9}}]"),
        );
        let l = parse("t.json", with.as_bytes()).unwrap();
        let loops = l.runs[0].loops.as_ref().unwrap();
        assert_eq!(loops.len(), MAX_STEP_HASHES);
        assert_eq!(
            loops[0],
            (
                "planning".to_string(),
                "aa".to_string(),
                5,
                vec![1, 2, 3, 4, 5]
            )
        );
        assert!(l.unchanged(&l.log_files.clone().unwrap()));
        // A run with no loops recorded: the ledger does not stand for the log alone.
        let old = parse("t.json", LEDGER.replace("\"loops\": [],", "").as_bytes()).unwrap();
        assert_eq!(old.runs[0].loops, None);
        assert!(!old.unchanged(&l.log_files.clone().unwrap()));
    }

    #[test]
    fn a_missing_ledger_is_none_and_a_huge_one_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&dir.path().join("tokens.json")), Ok(None));
        let path = dir.path().join("big.json");
        let f = File::create(&path).unwrap();
        f.set_len(MAX_LEDGER_BYTES + 1).unwrap();
        assert!(read(&path).unwrap_err().ends_with("bytes"));
    }
}
