//! Folding a session's events into totals without keeping the events
//! (ARCHITECTURE.md "Where speed comes from", contracts 2 and 6).
//!
//! Memory is bounded: per-component and per-event-type maps are capped, the
//! kept samples (malformed lines, seq gaps, last entries) are capped by count
//! and by bytes, and files are read in fixed-size chunks.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::fxhash::FxMap as HashMap;
use crate::parse::{
    for_each_line, is_json, parse_line, parse_line_lazy, Event, Malformed, RawEvent,
};

/// Distinct component / event-type names kept; the rest fold into `OTHER`.
pub const MAX_NAMES: usize = 256;
pub const OTHER: &str = "(other)";
/// Samples of malformed lines and seq gaps kept for display.
pub const MAX_SAMPLES: usize = 100;
/// Bytes the last-N ring may hold, whatever N is.
pub const MAX_RING_BYTES: usize = 8 << 20;
pub const READ_CHUNK: usize = 1 << 20;
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// Token sums saturate at `u64::MAX` rather than wrap: a log that claims more
/// than 2^64 tokens is shown as the maximum, never as a small number.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ComponentTotals {
    pub tokens: u64,
    pub operations: u64,
    pub latency_ms: f64,
    pub errors: u64,
}

impl ComponentTotals {
    fn add(&mut self, o: &ComponentTotals) {
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.operations += o.operations;
        self.latency_ms += o.latency_ms;
        self.errors += o.errors;
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunTotals {
    pub number: u64,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub status: String,
    pub tokens: u64,
    pub budget: Option<u64>,
    pub components: HashMap<String, ComponentTotals>,
    /// The metadata of the run's `session_start` (task, thresholds, ...), as JSON.
    pub start_metadata: Option<String>,
}

impl RunTotals {
    /// Add the events that continue this run (a later part of the same file).
    fn absorb(&mut self, o: &RunTotals) {
        self.tokens = self.tokens.saturating_add(o.tokens);
        for (k, c) in &o.components {
            with_component(&mut self.components, k, |x| x.add(c));
        }
        if o.ended_at.is_some() {
            self.ended_at.clone_from(&o.ended_at);
            self.status.clone_from(&o.status);
        }
    }
}

/// Only the metadata keys the fold needs; everything else is skipped unparsed.
#[derive(Deserialize, Default)]
struct MetaKeys<'a> {
    #[serde(borrow, default)]
    latency_ms: Option<&'a RawValue>,
    #[serde(borrow, default)]
    budget: Option<&'a RawValue>,
    #[serde(borrow, default)]
    status: Option<&'a RawValue>,
    #[serde(borrow, default)]
    run: Option<&'a RawValue>,
    #[serde(borrow, default)]
    allocations: Option<&'a RawValue>,
    #[serde(borrow, default)]
    dropped: Option<&'a RawValue>,
}

/// The metadata values the fold uses, read leniently: a value of the wrong
/// type counts as absent (the event itself is valid).
#[derive(Default)]
struct FoldMeta {
    latency_ms: Option<f64>,
    budget: Option<u64>,
    status: Option<String>,
    run: Option<u64>,
    allocations: Option<HashMap<String, u64>>,
    dropped: Option<u64>,
}

impl FoldMeta {
    fn from_keys(k: &MetaKeys<'_>) -> Self {
        FoldMeta {
            latency_ms: num(k.latency_ms),
            budget: num(k.budget),
            status: num(k.status),
            run: num(k.run),
            allocations: num(k.allocations),
            dropped: num(k.dropped),
        }
    }

    fn from_map(m: &serde_json::Map<String, Value>) -> Self {
        fn get<T: for<'de> Deserialize<'de>>(
            m: &serde_json::Map<String, Value>,
            k: &str,
        ) -> Option<T> {
            m.get(k).and_then(|v| T::deserialize(v).ok())
        }
        FoldMeta {
            latency_ms: get(m, "latency_ms"),
            budget: get(m, "budget"),
            status: get(m, "status"),
            run: get(m, "run"),
            allocations: get(m, "allocations"),
            dropped: get(m, "dropped"),
        }
    }
}

/// Event types whose metadata the fold reads.
fn needs_meta(kind: &str) -> bool {
    matches!(
        kind,
        "session_start"
            | "session_complete"
            | "session_error"
            | "step_complete"
            | "step_error"
            | "events_dropped"
    )
}

fn num<T: for<'de> Deserialize<'de>>(raw: Option<&RawValue>) -> Option<T> {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
}

#[derive(Debug, Clone, PartialEq)]
pub struct FoldState {
    pub last_n: usize,
    pub lines: u64,
    pub entries: u64,
    pub malformed: u64,
    pub malformed_samples: Vec<Malformed>,
    pub oversize_lines: u64,
    pub torn_tail: bool,
    pub tokens: u64,
    pub event_counts: HashMap<String, u64>,
    pub components: HashMap<String, ComponentTotals>,
    pub status: String,
    pub budget: Option<u64>,
    pub allocations: Vec<(String, u64)>,
    pub runs: u64,
    pub run: RunTotals,
    /// Run totals accumulated before this fold's first `session_start`: in a
    /// fold of the second half of a file they belong to the first half's run.
    head: Option<RunTotals>,
    /// The current run's number was counted from this fold's start (no declared
    /// number since), so a merge offsets it by the preceding run's number.
    run_number_local: bool,
    pub first_seq: Option<u64>,
    pub first_timestamp: Option<String>,
    pub last_timestamp: Option<String>,
    pub max_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub seq_gaps: u64,
    pub seq_missing: u64,
    pub seq_regressions: u64,
    pub gap_samples: Vec<(u64, u64)>,
    pub dropped_events: u64,
    /// The last `last_n` valid lines, raw, with their offsets; their buffers
    /// are reused so folding allocates nothing per line.
    ring: VecDeque<(u64, Vec<u8>)>,
    ring_bytes: usize,
}

impl FoldState {
    pub fn new(last_n: usize) -> Self {
        FoldState {
            last_n,
            lines: 0,
            entries: 0,
            malformed: 0,
            malformed_samples: Vec::new(),
            oversize_lines: 0,
            torn_tail: false,
            tokens: 0,
            event_counts: HashMap::default(),
            components: HashMap::default(),
            status: "waiting".to_string(),
            budget: None,
            allocations: Vec::new(),
            runs: 0,
            run: RunTotals::default(),
            head: None,
            run_number_local: false,
            first_seq: None,
            first_timestamp: None,
            last_timestamp: None,
            max_seq: None,
            last_seq: None,
            seq_gaps: 0,
            seq_missing: 0,
            seq_regressions: 0,
            gap_samples: Vec::new(),
            dropped_events: 0,
            ring: VecDeque::new(),
            ring_bytes: 0,
        }
    }

    /// Fold one line (without `\n`) found at `offset`.
    pub fn feed_line(&mut self, line: &[u8], offset: u64) {
        self.lines += 1;
        let (event, checked) = match parse_line_lazy(line, false) {
            Ok(parsed) => parsed,
            Err(reason) => return self.note_malformed(offset, reason),
        };
        // Parse the metadata keys the fold needs; on the fast path this is also
        // the metadata's validation (one pass instead of two).
        let meta = match event.metadata {
            Some(text) if needs_meta(&event.event_type) => {
                match serde_json::from_str::<MetaKeys<'_>>(text) {
                    Ok(keys) => FoldMeta::from_keys(&keys),
                    // Duplicate keys make the struct parse fail on valid JSON:
                    // read them as a map, the last value winning as in Python.
                    Err(_) => match serde_json::from_str::<serde_json::Map<String, Value>>(text) {
                        Ok(map) => FoldMeta::from_map(&map),
                        Err(_) => {
                            return self.note_malformed(offset, "invalid JSON in `metadata`".into())
                        }
                    },
                }
            }
            Some(text) if !checked && !is_json(text) => {
                return self.note_malformed(offset, "invalid JSON in `metadata`".into());
            }
            _ => FoldMeta::default(),
        };
        self.feed_event(&event, &meta);
        self.remember(line, offset);
    }

    fn remember(&mut self, line: &[u8], offset: u64) {
        if self.last_n == 0 {
            return;
        }
        let mut slot = if self.ring.len() >= self.last_n {
            self.ring.pop_front().map(|(_, v)| v).unwrap_or_default()
        } else {
            Vec::new()
        };
        self.ring_bytes = self.ring_bytes - slot.len() + line.len();
        slot.clear();
        slot.extend_from_slice(line);
        self.ring.push_back((offset, slot));
        while self.ring_bytes > MAX_RING_BYTES && self.ring.len() > 1 {
            if let Some((_, old)) = self.ring.pop_front() {
                self.ring_bytes -= old.len();
            }
        }
    }

    /// The last `last_n` valid events, oldest first.
    pub fn last_entries(&self) -> Vec<Event> {
        self.ring
            .iter()
            .filter_map(|(off, line)| parse_line(line).ok().map(|e| e.to_owned_event(*off)))
            .collect()
    }

    pub fn note_malformed(&mut self, offset: u64, reason: String) {
        self.malformed += 1;
        if self.malformed_samples.len() < MAX_SAMPLES {
            self.malformed_samples.push(Malformed { offset, reason });
        }
    }

    /// An oversize line is counted apart from malformed ones but sampled with them,
    /// so the monitor can show where it was.
    pub fn note_oversize(&mut self, offset: u64, len: u64) {
        self.oversize_lines += 1;
        self.lines += 1;
        if self.malformed_samples.len() < MAX_SAMPLES {
            self.malformed_samples.push(Malformed {
                offset,
                reason: format!("line of {len} bytes exceeds the line limit"),
            });
        }
    }

    fn feed_event(&mut self, e: &RawEvent<'_>, meta: &FoldMeta) {
        self.entries += 1;
        self.tokens = self.tokens.saturating_add(e.tokens);
        if self.first_timestamp.is_none() {
            self.first_timestamp = Some(e.timestamp.to_string());
        }
        // Reuse the buffer: no allocation per line.
        let last = self.last_timestamp.get_or_insert_with(String::new);
        last.clear();
        last.push_str(&e.timestamp);
        bump(&mut self.event_counts, &e.event_type, 1);
        self.track_seq(e.seq);

        let kind: &str = &e.event_type;
        match kind {
            "session_start" => {
                self.runs += 1;
                // An undeclared run number follows the previous run's.
                let declared = meta.run;
                let chain = self.runs == 1 || self.run_number_local;
                self.run_number_local = declared.is_none() && chain;
                let number = declared.unwrap_or(self.run.number + 1);
                if let Some(b) = meta.budget {
                    self.budget = Some(b);
                }
                if let Some(a) = meta.allocations.clone() {
                    let mut a: Vec<(String, u64)> = a.into_iter().collect();
                    a.sort();
                    a.truncate(MAX_NAMES);
                    self.allocations = a;
                }
                self.status = "running".to_string();
                let previous = std::mem::take(&mut self.run);
                if self.runs == 1 {
                    // What came before the first start (for merging folds of a split file).
                    self.head = Some(previous);
                }
                self.run = RunTotals {
                    number,
                    started_at: Some(e.timestamp.to_string()),
                    ended_at: None,
                    status: "running".to_string(),
                    tokens: 0,
                    budget: self.budget,
                    components: HashMap::default(),
                    start_metadata: e.metadata.map(str::to_string),
                };
            }
            "session_complete" | "session_error" => {
                let declared = meta.status.clone();
                let status = match (kind, declared.as_deref()) {
                    (_, Some(s @ ("complete" | "error" | "budget_exceeded" | "interrupted"))) => {
                        s.to_string()
                    }
                    ("session_complete", _) => "complete".to_string(),
                    _ => "error".to_string(),
                };
                self.status = status.clone();
                self.run.status = status;
                self.run.ended_at = Some(e.timestamp.to_string());
            }
            "events_dropped" => {
                self.dropped_events = self
                    .dropped_events
                    .saturating_add(meta.dropped.unwrap_or(0));
            }
            _ => {}
        }

        let is_step = matches!(kind, "step_complete" | "step_error");
        let latency = if is_step {
            meta.latency_ms.filter(|v| v.is_finite()).unwrap_or(0.0)
        } else {
            0.0
        };
        let update = |c: &mut ComponentTotals| {
            c.tokens = c.tokens.saturating_add(e.tokens);
            if is_step {
                c.operations += 1;
                c.latency_ms += latency;
                if kind == "step_error" {
                    c.errors += 1;
                }
            }
        };
        with_component(&mut self.components, &e.component, update);
        with_component(&mut self.run.components, &e.component, update);
        self.run.tokens = self.run.tokens.saturating_add(e.tokens);
    }

    fn track_seq(&mut self, seq: Option<u64>) {
        let Some(seq) = seq else { return };
        if self.first_seq.is_none() {
            self.first_seq = Some(seq);
        }
        self.check_seq_step(seq);
        self.last_seq = Some(seq);
        self.max_seq = Some(self.max_seq.map_or(seq, |m| m.max(seq)));
    }

    fn check_seq_step(&mut self, seq: u64) {
        if let Some(last) = self.last_seq {
            if seq > last + 1 {
                self.seq_gaps += 1;
                self.seq_missing += seq - last - 1;
                if self.gap_samples.len() < MAX_SAMPLES {
                    self.gap_samples.push((last, seq));
                }
            } else if seq <= last {
                self.seq_regressions += 1;
            }
        }
    }

    /// Append the fold of what directly follows this fold's input.
    pub fn merge(&mut self, b: FoldState) {
        self.lines += b.lines;
        self.entries += b.entries;
        self.malformed += b.malformed;
        self.oversize_lines += b.oversize_lines;
        self.tokens = self.tokens.saturating_add(b.tokens);
        self.dropped_events = self.dropped_events.saturating_add(b.dropped_events);
        self.torn_tail = b.torn_tail;
        for m in b.malformed_samples {
            if self.malformed_samples.len() < MAX_SAMPLES {
                self.malformed_samples.push(m);
            }
        }
        for (k, v) in &b.event_counts {
            bump(&mut self.event_counts, k, *v);
        }
        for (k, c) in &b.components {
            with_component(&mut self.components, k, |x| x.add(c));
        }
        if b.runs == 0 {
            self.run.absorb(&b.run);
        } else {
            if let Some(h) = &b.head {
                self.run.absorb(h);
            }
            let mut run = b.run;
            if b.run_number_local {
                run.number += self.run.number;
            }
            if run.budget.is_none() {
                run.budget = self.budget;
            }
            self.run_number_local = b.run_number_local && (self.runs == 0 || self.run_number_local);
            let before = std::mem::replace(&mut self.run, run);
            if self.runs == 0 {
                self.head = Some(before);
            }
            self.runs += b.runs;
        }
        if b.status != "waiting" {
            self.status = b.status;
        }
        if b.budget.is_some() {
            self.budget = b.budget;
        }
        if !b.allocations.is_empty() {
            self.allocations = b.allocations;
        }
        if self.first_timestamp.is_none() {
            self.first_timestamp = b.first_timestamp;
        }
        if b.last_timestamp.is_some() {
            self.last_timestamp = b.last_timestamp;
        }
        if let Some(first) = b.first_seq {
            self.check_seq_step(first);
            if self.first_seq.is_none() {
                self.first_seq = Some(first);
            }
        }
        self.seq_gaps += b.seq_gaps;
        self.seq_missing += b.seq_missing;
        self.seq_regressions += b.seq_regressions;
        for g in b.gap_samples {
            if self.gap_samples.len() < MAX_SAMPLES {
                self.gap_samples.push(g);
            }
        }
        if let Some(m) = b.max_seq {
            self.max_seq = Some(self.max_seq.map_or(m, |x| x.max(m)));
        }
        if b.last_seq.is_some() {
            self.last_seq = b.last_seq;
        }
        for (off, line) in b.ring {
            self.remember(&line, off);
        }
    }
}

fn bump(map: &mut HashMap<String, u64>, key: &str, by: u64) {
    if let Some(v) = map.get_mut(key) {
        *v += by;
    } else if map.len() < MAX_NAMES {
        map.insert(key.to_string(), by);
    } else {
        *map.entry(OTHER.to_string()).or_insert(0) += by;
    }
}

/// Update a component's totals with one hash lookup in the common case.
fn with_component(
    map: &mut HashMap<String, ComponentTotals>,
    key: &str,
    update: impl FnOnce(&mut ComponentTotals),
) {
    if let Some(c) = map.get_mut(key) {
        update(c);
        return;
    }
    let key = if map.len() < MAX_NAMES { key } else { OTHER };
    update(map.entry(key.to_string()).or_default());
}

/// Splits a byte stream into bounded lines: a line longer than `max_line` is
/// skipped as it streams past, never held whole. The result does not depend on
/// how the stream is chunked.
pub struct LineSplitter {
    pub max_line: usize,
    partial: Vec<u8>,
    /// Offset of the first byte of the line being accumulated or skipped.
    line_start: u64,
    skipping: Skip,
    /// Offset just past the last byte fed.
    pub position: u64,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Skip {
    No,
    /// An oversize line: this many bytes of it went by.
    Oversize(u64),
    /// The rest of a line we joined mid-way (tailing from the end): not counted.
    Silent,
}

pub enum Piece<'a> {
    Line(&'a [u8], u64),
    Oversize(u64, u64),
}

impl LineSplitter {
    pub fn new(max_line: usize, position: u64) -> Self {
        LineSplitter {
            max_line: max_line.max(1),
            partial: Vec::new(),
            line_start: position,
            skipping: Skip::No,
            position,
        }
    }

    /// Bytes of an unfinished line held (or skipped) at the end of the stream.
    pub fn pending(&self) -> u64 {
        self.position - self.line_start
    }

    /// Offset where the unfinished line starts (a resume point).
    pub fn line_start(&self) -> u64 {
        self.line_start
    }

    /// Forget the unfinished line (a torn tail, or a restart at `position`).
    pub fn reset(&mut self, position: u64) {
        self.partial.clear();
        self.partial.shrink_to(64 << 10);
        self.skipping = Skip::No;
        self.line_start = position;
        self.position = position;
    }

    /// Discard up to the next newline without counting it (tailing from the end).
    pub fn skip_to_next_line(&mut self) {
        self.partial.clear();
        self.skipping = Skip::Silent;
        self.line_start = self.position;
    }

    pub fn feed(&mut self, data: &[u8], mut out: impl FnMut(Piece<'_>)) {
        let base = self.position;
        self.position += data.len() as u64;
        let mut start = 0usize;
        for nl in memchr::memchr_iter(b'\n', data) {
            let seg = &data[start..nl];
            let line_start = self.line_start;
            match std::mem::replace(&mut self.skipping, Skip::No) {
                Skip::Oversize(n) => out(Piece::Oversize(line_start, n + seg.len() as u64)),
                Skip::Silent => {}
                Skip::No => {
                    let len = self.partial.len() + seg.len();
                    if len > self.max_line {
                        out(Piece::Oversize(line_start, len as u64));
                    } else if self.partial.is_empty() {
                        out(Piece::Line(seg, line_start));
                    } else {
                        self.partial.extend_from_slice(seg);
                        out(Piece::Line(&self.partial, line_start));
                    }
                    self.partial.clear();
                }
            }
            start = nl + 1;
            self.line_start = base + start as u64;
        }
        let rest = &data[start..];
        if rest.is_empty() {
            return;
        }
        match &mut self.skipping {
            Skip::Oversize(n) => *n += rest.len() as u64,
            Skip::Silent => {}
            Skip::No => {
                let len = self.partial.len() + rest.len();
                if len > self.max_line {
                    self.skipping = Skip::Oversize(len as u64);
                    self.partial.clear();
                    self.partial.shrink_to(64 << 10);
                } else {
                    self.partial.extend_from_slice(rest);
                }
            }
        }
    }
}

/// Feed a file from `start` to its current end into `fold`. Returns the offset
/// just past the last complete line (where a tailer should resume).
pub fn fold_reader(
    fold: &mut FoldState,
    reader: &mut impl Read,
    start: u64,
    max_line: usize,
) -> io::Result<u64> {
    let mut splitter = LineSplitter::new(max_line, start);
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        splitter.feed(&buf[..n], |piece| feed_piece(fold, piece));
    }
    fold.torn_tail = splitter.pending() > 0;
    Ok(splitter.line_start())
}

pub fn feed_piece(fold: &mut FoldState, piece: Piece<'_>) {
    match piece {
        Piece::Line(line, off) => fold.feed_line(line, off),
        Piece::Oversize(off, len) => fold.note_oversize(off, len),
    }
}

/// Files smaller than this are folded on one thread.
pub const PARALLEL_MIN_BYTES: u64 = 8 << 20;

/// Fold a whole file, splitting it at line boundaries across `threads` threads
/// when it is large, then merging the parts in order.
pub fn fold_path(fold: &mut FoldState, path: &Path, max_line: usize) -> io::Result<u64> {
    fold_path_with(fold, path, max_line, fold_threads())
}

/// Threads used for a large fold: the machine's cores, at most 8.
pub fn fold_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

pub fn fold_path_with(
    fold: &mut FoldState,
    path: &Path,
    max_line: usize,
    threads: usize,
) -> io::Result<u64> {
    let file = crate::segments::open_regular(path)?;
    fold_range(fold, &file, 0, None, max_line, threads)
}

/// Reads a file through `pread` from `pos` up to `end` (or its end), so that
/// several threads can share one descriptor.
struct At<'a> {
    file: &'a File,
    pos: u64,
    end: Option<u64>,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = match self.end {
            Some(end) => (end.saturating_sub(self.pos)).min(buf.len() as u64) as usize,
            None => buf.len(),
        };
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Fold `file` from `start` (a line start) to `end` (or its end), split at
/// line boundaries across `threads` threads when the range is large. Returns
/// the offset just past the last complete line.
pub fn fold_range(
    fold: &mut FoldState,
    file: &File,
    start: u64,
    end: Option<u64>,
    max_line: usize,
    threads: usize,
) -> io::Result<u64> {
    let len = match end {
        Some(e) => e,
        None => file.metadata()?.len(),
    };
    if threads < 2 || len.saturating_sub(start) < PARALLEL_MIN_BYTES {
        let mut r = At {
            file,
            pos: start,
            end,
        };
        return fold_reader(fold, &mut r, start, max_line);
    }
    let span = len - start;
    let mut cuts = vec![start];
    for i in 1..threads as u64 {
        let at = next_line_start(file, start + span * i / threads as u64, len)?;
        if at > *cuts.last().unwrap_or(&start) && at < len {
            cuts.push(at);
        }
    }
    let last_n = fold.last_n;
    let ranges: Vec<(u64, Option<u64>)> = cuts
        .iter()
        .enumerate()
        .map(|(i, &lo)| (lo, cuts.get(i + 1).copied().or(end)))
        .collect();
    let parts: Vec<io::Result<(FoldState, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|&(lo, hi)| {
                s.spawn(move || -> io::Result<(FoldState, u64)> {
                    let mut part = FoldState::new(last_n);
                    let mut r = At {
                        file,
                        pos: lo,
                        end: hi,
                    };
                    let resume = fold_reader(&mut part, &mut r, lo, max_line)?;
                    Ok((part, resume))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("fold thread panicked")))
            })
            .collect()
    });
    let mut resume = start;
    for part in parts {
        let (part, r) = part?;
        fold.merge(part);
        resume = r;
    }
    Ok(resume)
}

/// The offset just after the first newline at or after `at` (or `len`).
fn next_line_start(file: &File, at: u64, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = at;
    while pos < len {
        let n = file.read_at(&mut buf, pos)?;
        if n == 0 {
            break;
        }
        if let Some(i) = memchr::memchr(b'\n', &buf[..n]) {
            return Ok(pos + i as u64 + 1);
        }
        pos += n as u64;
    }
    Ok(len)
}

/// Parse every complete line of `data` (used by the Python `parse_*` helpers).
pub fn parse_all(
    data: &[u8],
    base_offset: u64,
    mut ok: impl FnMut(RawEvent<'_>, u64),
    mut bad: impl FnMut(Malformed),
) -> usize {
    for_each_line(data, base_offset, |line, off| match parse_line(line) {
        Ok(e) => ok(e, off),
        Err(reason) => bad(Malformed {
            offset: off,
            reason,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kind: &str, comp: &str, tokens: u64, seq: u64, meta: &str) -> String {
        format!(
            r#"{{"timestamp":"2026-01-11T10:00:{:02}+00:00","session_id":"s","event_type":"{kind}","component":"{comp}","message":"m","tokens":{tokens},"metadata":{meta},"seq":{seq}}}"#,
            seq % 60
        )
    }

    fn session() -> String {
        [
            line(
                "session_start",
                "orchestrator",
                0,
                0,
                r#"{"budget":1000,"allocations":{"routing":10},"run":1}"#,
            ),
            line("step_complete", "routing", 50, 1, r#"{"latency_ms":12.5}"#),
            line("token_consumption", "reasoning", 7, 2, "{}"),
            line("step_error", "reasoning", 0, 3, r#"{"latency_ms":3}"#),
            line(
                "step_complete",
                "reasoning",
                100,
                5,
                r#"{"latency_ms":"bad"}"#,
            ),
            line(
                "session_complete",
                "orchestrator",
                0,
                6,
                r#"{"status":"complete","total_tokens":157}"#,
            ),
        ]
        .join("\n")
            + "\n"
    }

    #[test]
    fn folds_a_session() {
        let mut f = FoldState::new(3);
        let data = session();
        let end = fold_reader(&mut f, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        assert_eq!(end, data.len() as u64);
        assert_eq!(f.tokens, 157);
        assert_eq!(f.entries, 6);
        assert_eq!(f.status, "complete");
        assert_eq!(f.budget, Some(1000));
        assert_eq!(f.allocations, vec![("routing".to_string(), 10)]);
        let r = &f.components["reasoning"];
        assert_eq!((r.tokens, r.operations, r.errors), (107, 2, 1));
        assert_eq!(r.latency_ms, 3.0);
        assert_eq!(f.components["routing"].latency_ms, 12.5);
        assert_eq!((f.seq_gaps, f.seq_missing, f.max_seq), (1, 1, Some(6)));
        assert_eq!(f.gap_samples, vec![(3, 5)]);
        let last = f.last_entries();
        assert_eq!(last.len(), 3);
        assert_eq!(last[2].event_type, "session_complete");
        assert_eq!(last[0].seq, Some(3));
        assert_eq!(f.run.number, 1);
        assert_eq!(f.run.tokens, 157);
        assert!(!f.torn_tail);
    }

    fn busy_session() -> String {
        let mut lines = vec![
            line("step_complete", "routing", 3, 0, "{}"), // before any start
            line("session_start", "orchestrator", 0, 1, r#"{"budget":500}"#),
            line("step_complete", "memory", 9, 2, r#"{"latency_ms":4}"#),
            "garbage".to_string(),
            line("session_complete", "orchestrator", 0, 3, "{}"),
            line(
                "session_start",
                "orchestrator",
                0,
                4,
                r#"{"budget":700,"run":5}"#,
            ),
            line("step_error", "reasoning", 0, 7, r#"{"latency_ms":1}"#),
            line("token_consumption", "reasoning", 11, 6, "{}"),
            line(
                "session_start",
                "orchestrator",
                0,
                8,
                r#"{"allocations":{"a":1}}"#,
            ),
            line("step_complete", "planning", 2, 9, "{}"),
            line(
                "session_error",
                "orchestrator",
                0,
                10,
                r#"{"status":"budget_exceeded"}"#,
            ),
        ];
        lines.push(line("events_dropped", "logger", 0, 11, r#"{"dropped":4}"#));
        lines.join("\n") + "\n"
    }

    #[test]
    fn merging_split_folds_equals_one_fold() {
        let data = busy_session();
        let mut whole = FoldState::new(4);
        fold_reader(&mut whole, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        assert_eq!(whole.runs, 3);
        assert_eq!(whole.run.number, 6); // counted after an explicit run 5
        let starts: Vec<usize> = std::iter::once(0)
            .chain(data.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        for &a in &starts {
            for &b in starts.iter().filter(|&&b| b >= a) {
                let mut merged = FoldState::new(4);
                let mut off = 0;
                for (lo, hi) in [(0, a), (a, b), (b, data.len())] {
                    let mut part = FoldState::new(4);
                    off = fold_reader(&mut part, &mut &data.as_bytes()[lo..hi], lo as u64, 1 << 20)
                        .unwrap();
                    merged.merge(part);
                }
                assert_eq!(off as usize, data.len());
                assert_eq!(merged, whole, "split at {a} and {b}");
            }
        }
    }

    #[test]
    fn parallel_fold_of_a_large_file_equals_one_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.jsonl");
        let block = busy_session();
        let mut text = String::new();
        while (text.len() as u64) < PARALLEL_MIN_BYTES + 1000 {
            text.push_str(&block);
        }
        text.push_str("{\"torn");
        std::fs::write(&path, &text).unwrap();
        let mut one = FoldState::new(10);
        let end1 = fold_path_with(&mut one, &path, 1 << 20, 1).unwrap();
        for threads in [2, 3, 8] {
            let mut many = FoldState::new(10);
            let end = fold_path_with(&mut many, &path, 1 << 20, threads).unwrap();
            assert_eq!(end, end1);
            assert_eq!(many, one, "{threads} threads");
        }
        assert!(one.torn_tail);
    }

    #[test]
    fn a_new_run_resets_run_totals_but_not_session_totals() {
        let mut f = FoldState::new(0);
        let mut data = session();
        data += &line(
            "session_start",
            "orchestrator",
            0,
            7,
            r#"{"budget":1000,"run":2}"#,
        );
        data += "\n";
        data += &line("step_complete", "routing", 5, 8, "{}");
        data += "\n";
        fold_reader(&mut f, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        assert_eq!(f.tokens, 162);
        assert_eq!(f.run.tokens, 5);
        assert_eq!(f.run.number, 2);
        assert_eq!(f.status, "running");
        assert_eq!(f.runs, 2);
    }

    #[test]
    fn invalid_metadata_on_the_fast_path_is_malformed() {
        for kind in ["step_complete", "token_consumption"] {
            let mut f = FoldState::new(0);
            let bad = line(kind, "routing", 5, 0, r#"{"latency_ms":}"#);
            let good = line(kind, "routing", 7, 1, r#"{"latency_ms":2}"#);
            f.feed_line(bad.as_bytes(), 0);
            f.feed_line(good.as_bytes(), 100);
            assert_eq!((f.malformed, f.tokens, f.entries), (1, 7, 1), "{kind}");
            assert!(f.malformed_samples[0].reason.contains("metadata"));
        }
    }

    #[test]
    fn budget_exceeded_status_comes_from_metadata() {
        let mut f = FoldState::new(0);
        let data = line(
            "session_error",
            "orchestrator",
            0,
            0,
            r#"{"status":"budget_exceeded"}"#,
        ) + "\n";
        fold_reader(&mut f, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        assert_eq!(f.status, "budget_exceeded");
    }

    #[test]
    fn malformed_oversize_and_torn_lines_are_counted() {
        let mut f = FoldState::new(0);
        let big = "x".repeat(5000);
        let data = format!(
            "{}\nnot json\n{big}\n{}\n{{\"torn",
            line("step_complete", "routing", 1, 0, "{}"),
            line("step_complete", "routing", 2, 1, "{}")
        );
        let end = fold_reader(&mut f, &mut data.as_bytes(), 0, 1000).unwrap();
        assert_eq!(f.tokens, 3);
        assert_eq!(f.malformed, 1);
        assert_eq!(f.oversize_lines, 1);
        assert!(f.torn_tail);
        assert_eq!(end as usize, data.len() - "{\"torn".len());
        assert_eq!(
            f.malformed_samples[0].offset as usize,
            data.find("not json").unwrap()
        );
    }

    #[test]
    fn splitter_handles_any_chunking() {
        let data = b"aa\nbbbbbbbbbbbb\ncc\n\ndd";
        for chunk in 1..data.len() {
            let mut s = LineSplitter::new(5, 0);
            let mut got = vec![];
            for c in data.chunks(chunk) {
                s.feed(c, |p| match p {
                    Piece::Line(l, o) => got.push((String::from_utf8_lossy(l).to_string(), o)),
                    Piece::Oversize(o, n) => got.push((format!("<{n}>"), o)),
                });
            }
            assert_eq!(
                got,
                vec![
                    ("aa".to_string(), 0),
                    ("<12>".to_string(), 3),
                    ("cc".to_string(), 16),
                    ("".to_string(), 19)
                ],
                "chunk {chunk}"
            );
            assert_eq!(s.pending(), 2);
            assert_eq!(s.line_start(), 20);
        }
    }

    #[test]
    fn skip_to_next_line_drops_the_partial_silently() {
        let mut s = LineSplitter::new(100, 10);
        s.skip_to_next_line();
        let mut got = vec![];
        s.feed(b"tail\nnext\n", |p| match p {
            Piece::Line(l, o) => got.push((l.to_vec(), o)),
            Piece::Oversize(..) => panic!("not oversize"),
        });
        assert_eq!(got, vec![(b"next".to_vec(), 15)]);
    }

    #[test]
    fn name_maps_are_capped() {
        let mut f = FoldState::new(0);
        for i in 0..(MAX_NAMES + 50) {
            let l = line("step_complete", &format!("c{i}"), 1, i as u64, "{}");
            f.feed_line(l.as_bytes(), 0);
        }
        assert_eq!(f.components.len(), MAX_NAMES + 1);
        assert_eq!(f.components[OTHER].tokens, 50);
        assert_eq!(f.tokens, (MAX_NAMES + 50) as u64);
    }
}
