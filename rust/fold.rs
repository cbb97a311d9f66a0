//! The session model: folding a session's events into every number a view
//! shows, without keeping the events (ARCHITECTURE.md contracts 2, 6, 11, 12
//! and 13, "Where speed comes from").
//!
//! This is the only place a session's numbers are computed. The rules:
//! - tokens add up over every event (contract 2); `input_tokens`,
//!   `output_tokens` and `model` come from the metadata of the events that
//!   carry them;
//! - a component's `operations` count its successful steps (`step_complete`),
//!   `errors` its failed steps (`step_error`), `retries` its `retry_attempt`
//!   events (a resume notice, `metadata.resume == true`, is not a retry); its
//!   latency total, average and histogram cover the successful steps that
//!   report a finite `latency_ms`; the latency failed steps report is kept
//!   apart (`failed_latency_ms`);
//! - the last error of a component comes from its latest `step_error` or
//!   `retry_attempt` (category, message, attempt, timestamp);
//! - a `session_start` opens a run (its number declared in `metadata.run`,
//!   else the previous run's plus one); `session_complete`/`session_error`
//!   close it with `metadata.status` (`complete | error | budget_exceeded |
//!   interrupted`, else complete/error by event type) and the failure reason
//!   (`metadata.reason`, else `metadata.error`);
//! - the recent rate reads the tokens of the last [`WINDOW_SECONDS`] seconds of
//!   event time, in one-second buckets ending at the latest event;
//! - a component's cost adds its events' `metadata.cost_usd` in whole
//!   nano-dollars, read from the number's text; an event with tokens and a
//!   `model` but no cost is unpriced (`cost.rs` has the rules); a run's and
//!   the session's cost are their components'.
//!
//! Memory is bounded: name tables are capped at [`MAX_NAMES`] names in the
//! order the file first shows them (the rest fold into [`OTHER`]), the runs
//! kept are capped, kept samples and texts are capped by count and bytes, and
//! files are read in fixed-size chunks. Counters saturate instead of wrapping:
//! a log that claims more than 2^64 of something shows the maximum.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::cost::{nano_usd, Cost};
use crate::fxhash::FxMap as HashMap;
use crate::parse::{
    digit_run, layout_block_line, parse_block_line, parse_line, parse_line_picking, same_bytes,
    Event, KeySet, Layout, Malformed, Pick, Picks, RawEvent, LAYOUT_TIMESTAMP_AT,
};
use crate::scan::BlockIndex;

/// Distinct component / event-type names kept; the rest fold into `OTHER`.
pub const MAX_NAMES: usize = 256;
pub const OTHER: &str = "(other)";
/// Samples of malformed lines and seq gaps kept for display.
pub const MAX_SAMPLES: usize = 100;
/// Runs kept with their totals; older ones are dropped (and counted).
pub const MAX_RUNS: usize = 1000;
/// Bytes kept of a text taken from metadata (a reason, an error message, a model).
pub const MAX_TEXT: usize = 1024;
/// Bytes the last-N ring may hold, whatever N is.
pub const MAX_RING_BYTES: usize = 8 << 20;
/// Small enough that a chunk the kernel just copied is still in the CPU's
/// cache when it is parsed.
pub const READ_CHUNK: usize = 128 << 10;
pub const DEFAULT_MAX_LINE: usize = 1 << 20;
/// Seconds of event time the recent-rate window can look back: 34 minutes
/// (a power of two: a second's slot is a mask, not a division),
/// so a sparkline of the last 30 minutes is exact (one bucket per second,
/// 16 KiB per fold).
pub const WINDOW_SECONDS: usize = 2048;
/// Upper bounds (ms) of the latency histogram's buckets; one more bucket holds the rest.
pub const LATENCY_BOUNDS_MS: [f64; 18] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5,
    5e5,
];
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;
/// The statuses a final event may declare (contract 13).
pub const FINAL_STATUSES: [&str; 4] = ["complete", "error", "budget_exceeded", "interrupted"];

/// A name table capped at `MAX_NAMES` names, in first-seen order: which names
/// are kept depends only on the order of the file, never on how a fold was
/// split (issue 9, defect 9).
#[derive(Debug, Clone, PartialEq)]
pub struct Names<V> {
    items: Vec<(String, V)>,
    index: HashMap<String, usize>,
    /// A name was folded into `OTHER` (a split fold must then be redone in order).
    pub overflowed: bool,
    /// The slot used last: consecutive events mostly repeat a name (a
    /// comparison instead of a hash lookup). A cache, outside equality.
    last: LastSlot,
}

#[derive(Debug, Clone, Copy, Default)]
struct LastSlot(Option<usize>);

impl PartialEq for LastSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<V> Default for Names<V> {
    fn default() -> Self {
        Names {
            items: Vec::new(),
            index: HashMap::default(),
            overflowed: false,
            last: LastSlot(None),
        }
    }
}

impl<V: Default> Names<V> {
    /// The slot of `key`, or of `OTHER` once the table is full.
    pub fn slot(&mut self, key: &str) -> &mut V {
        let i = self.slot_index(key);
        &mut self.items[i].1
    }

    /// The index of `key`'s slot (or of `OTHER`'s once the table is full),
    /// stable for the table's life: slots are only ever appended, so the
    /// fold caches it per interned name.
    pub fn slot_index(&mut self, key: &str) -> usize {
        if let Some(i) = self.last.0 {
            if self.items[i].0 == key {
                return i;
            }
        }
        if let Some(&i) = self.index.get(key) {
            self.last = LastSlot(Some(i));
            return i;
        }
        let key = if self.items.len() < MAX_NAMES {
            key
        } else {
            self.overflowed = true;
            if let Some(&i) = self.index.get(OTHER) {
                return i;
            }
            OTHER
        };
        self.index.insert(key.to_string(), self.items.len());
        self.items.push((key.to_string(), V::default()));
        self.items.len() - 1
    }
}

impl<V> Names<V> {
    /// The value of a slot [`Names::slot_index`] gave.
    #[inline]
    fn at_mut(&mut self, i: usize) -> &mut V {
        &mut self.items[i].1
    }
    /// The name and value of a slot [`Names::slot_index`] gave.
    #[inline]
    fn entry_mut(&mut self, i: usize) -> (&str, &mut V) {
        let (k, v) = &mut self.items[i];
        (k.as_str(), v)
    }
    pub fn get(&self, key: &str) -> Option<&V> {
        self.index.get(key).map(|&i| &self.items[i].1)
    }
    /// The slot of `key` when the table holds that name itself.
    pub fn position(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }
    /// The name of a slot [`Names::slot_index`] gave.
    #[inline]
    pub fn name_at(&self, i: usize) -> &str {
        &self.items[i].0
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    /// Names and values in first-seen order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.items.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl<V> std::ops::Index<&str> for Names<V> {
    type Output = V;
    fn index(&self, key: &str) -> &V {
        self.get(key).expect("name in table")
    }
}

/// A cache inside a fold: it takes no part in a fold's equality (two folds
/// of the same events are equal however their caches were filled).
#[derive(Debug, Clone, Default)]
struct Cache<T>(T);

impl<T> PartialEq for Cache<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Names interned per fold into small dense ids (issue 9, "the fold"): a
/// line's event type and component are found with one cheap hash of their
/// bytes, and the totals are then updated through slot indexes cached per id,
/// not through a string-hashed map per table. Bounded: past
/// [`MAX_INTERNED`] names the fold looks names up in its tables directly.
#[derive(Debug, Clone, Default)]
struct Interner {
    /// Open addressing, twice `MAX_INTERNED` long: (id + 1, or 0 when empty;
    /// the name's key). A name of up to 16 bytes is equal to another exactly
    /// when their keys are, so most lookups never touch `names`.
    table: Vec<(u32, Key)>,
    names: Vec<Box<[u8]>>,
    /// The last name found, as a table entry: consecutive lines mostly repeat
    /// their event type and component, which are then found without the
    /// table.
    last: (u32, Key),
}

/// A name's length and two words that hold all of its bytes when it is at
/// most 16 bytes long (the first and last 8, 4 or 1 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Key(usize, u64, u64);

const MAX_INTERNED: usize = 1024;

impl Key {
    #[inline(always)]
    fn of(b: &[u8]) -> Key {
        let n = b.len();
        let word = |s: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&s[..8]);
            u64::from_le_bytes(w)
        };
        let half = |s: &[u8]| u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
        match n {
            8.. => Key(n, word(b), word(&b[n - 8..])),
            4..=7 => Key(n, half(b) | half(&b[n - 4..]) << 32, 0),
            1..=3 => Key(
                n,
                u64::from(b[0]) << 16 | u64::from(b[n / 2]) << 8 | u64::from(b[n - 1]),
                0,
            ),
            0 => Key(0, 0, 0),
        }
    }

    #[inline(always)]
    fn hash(self) -> usize {
        let h = (self.1 ^ self.2.rotate_left(29) ^ (self.0 as u64).rotate_left(53))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 40) as usize
    }
}

impl Interner {
    /// The id of `name`, interning it; None once `MAX_INTERNED` names are held.
    #[inline(always)]
    fn id(&mut self, name: &[u8]) -> Option<usize> {
        // The usual cases, inline: the name is the last one found, or in its
        // first slot.
        let key = Key::of(name);
        let hit = |(v, k): (u32, Key), names: &[Box<[u8]>]| {
            let v = v as usize;
            (v != 0 && k == key && (name.len() <= 16 || *names[v - 1] == *name)).then(|| v - 1)
        };
        if let Some(id) = hit(self.last, &self.names) {
            return Some(id);
        }
        if !self.table.is_empty() {
            let entry = self.table[key.hash() & (self.table.len() - 1)];
            if let Some(id) = hit(entry, &self.names) {
                self.last = entry;
                return Some(id);
            }
        }
        let id = self.id_probe(name)?;
        self.last = (id as u32 + 1, key);
        Some(id)
    }

    /// [`Interner::id`] past the first slot, or interning a new name.
    #[cold]
    #[inline(never)]
    fn id_probe(&mut self, name: &[u8]) -> Option<usize> {
        // The table starts small and doubles at half full (a fold of a small
        // session allocates little), up to twice `MAX_INTERNED` slots.
        if self.table.len() < 2 * MAX_INTERNED && 2 * (self.names.len() + 1) > self.table.len() {
            let size = (self.table.len() * 2).clamp(64, 2 * MAX_INTERNED);
            let mut table = vec![(0, Key::default()); size];
            for (id, n) in self.names.iter().enumerate() {
                let key = Key::of(n);
                let mut i = key.hash() & (size - 1);
                while table[i].0 != 0 {
                    i = (i + 1) & (size - 1);
                }
                table[i] = (id as u32 + 1, key);
            }
            self.table = table;
        }
        let key = Key::of(name);
        let mask = self.table.len() - 1;
        let mut i = key.hash() & mask;
        loop {
            let (v, k) = self.table[i];
            let v = v as usize;
            if v == 0 {
                if self.names.len() >= MAX_INTERNED {
                    return None;
                }
                self.names.push(name.into());
                self.table[i] = (self.names.len() as u32, key);
                return Some(self.names.len() - 1);
            }
            if k == key && (name.len() <= 16 || *self.names[v - 1] == *name) {
                return Some(v - 1);
            }
            i = (i + 1) & mask;
        }
    }
}

/// The event types the fold treats apart, told once per interned name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    SessionStart,
    SessionComplete,
    SessionError,
    StepComplete,
    StepError,
    RetryAttempt,
    TokenConsumption,
    EventsDropped,
    StepStart,
    Other,
}

impl Kind {
    fn of(name: &str) -> Kind {
        match name {
            "session_start" => Kind::SessionStart,
            "session_complete" => Kind::SessionComplete,
            "session_error" => Kind::SessionError,
            "step_complete" => Kind::StepComplete,
            "step_error" => Kind::StepError,
            "retry_attempt" => Kind::RetryAttempt,
            "token_consumption" => Kind::TokenConsumption,
            "events_dropped" => Kind::EventsDropped,
            "step_start" => Kind::StepStart,
            _ => Kind::Other,
        }
    }

    /// Event types whose metadata the fold reads.
    fn needs_meta(self) -> bool {
        self != Kind::Other
    }

    /// [`Kind::of`] on bytes, by length and then two or three word compares
    /// (no hashing): the event types the fold treats apart.
    #[inline(always)]
    fn of_bytes(name: &[u8]) -> Kind {
        let is = |want: &[u8]| same_bytes(name, want);
        match name.len() {
            13 if is(b"step_complete") => Kind::StepComplete,
            13 if is(b"session_start") => Kind::SessionStart,
            13 if is(b"session_error") => Kind::SessionError,
            13 if is(b"retry_attempt") => Kind::RetryAttempt,
            10 if is(b"step_error") => Kind::StepError,
            10 if is(b"step_start") => Kind::StepStart,
            16 if is(b"session_complete") => Kind::SessionComplete,
            14 if is(b"events_dropped") => Kind::EventsDropped,
            17 if same_bytes(&name[..16], b"token_consumptio") && name[16] == b'n' => {
                Kind::TokenConsumption
            }
            _ => Kind::Other,
        }
    }
}

/// The kinds other than [`Kind::Other`], as indexes of [`Ids::known_slot`].
const KNOWN_KINDS: usize = 9;

/// Slot indexes cached per interned name (see [`Interner`]).
#[derive(Debug, Clone)]
struct Ids {
    /// Per kind other than `Other` (in `Kind` order): its `event_counts`
    /// slot, `NONE` until the fold first meets it.
    known_slot: [u32; KNOWN_KINDS],
    kinds: Interner,
    /// Per event-type id: its kind and its `event_counts` slot.
    kind_info: Vec<(Kind, u32)>,
    comps: Interner,
    /// Per component id: its slot in the fold's `components`.
    comp_slot: Vec<u32>,
    /// Per component id: its slot in the current run's table (`NONE`: not
    /// looked up since that run became current).
    run_slot: Vec<u32>,
}

const NONE: u32 = u32::MAX;

impl Default for Ids {
    fn default() -> Self {
        Ids {
            known_slot: [NONE; KNOWN_KINDS],
            kinds: Interner::default(),
            kind_info: Vec::new(),
            comps: Interner::default(),
            comp_slot: Vec::new(),
            run_slot: Vec::new(),
        }
    }
}

/// Where the last valid lines and the last timestamp of the block being
/// folded are, as positions in it: copied out once when the block is done
/// (or when a line needs them), not for every line.
#[derive(Debug, Clone, Default)]
struct Pending {
    /// (file offset, start in the block, length) of the valid lines since
    /// the last flush, in order (one push per line; only the last `last_n`
    /// are copied out).
    lines: Vec<(u64, usize, usize)>,
    /// Start and length of the latest timestamp in the block.
    timestamp: Option<(usize, usize)>,
}

/// The last failure a component reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LastError {
    pub event_type: String,
    pub category: Option<String>,
    pub message: String,
    pub attempt: Option<u64>,
    pub timestamp: String,
}

/// What the calls of one component to one model add up to (issue 13: reports
/// by model): every event the fold reads metadata of whose `metadata.model` is
/// a string counts here under its component and that model (at most
/// [`MAX_TEXT`] bytes of it). A call is a `step_complete` or `step_error` with
/// a model. The tables are keyed by [`model_key`] and capped at `MAX_NAMES`
/// pairs in first-seen order, like the components.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelTotals {
    pub tokens: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `step_complete` and `step_error` events.
    pub calls: u64,
    /// `step_error` events.
    pub errors: u64,
    /// Nano-dollars of the events that carried `cost_usd`, and how many did.
    pub cost_nanousd: u64,
    pub priced_events: u64,
    /// Tokens of the events without a cost, and the calls without one.
    pub unpriced_tokens: u64,
    pub unpriced_calls: u64,
    /// Calls whose `metadata.usage` is `"unknown"` (the proxy saw no usage).
    pub unknown_usage: u64,
    /// The calls' `metadata.tokens_held` (the budget held for unknown usage).
    pub tokens_held: u64,
}

/// The key of a (component, model) pair in a models table: the two names
/// joined by [`MODEL_KEY_SEP`] (a control byte no sigil name holds).
pub fn model_key(component: &str, model: &str) -> String {
    let mut k = String::with_capacity(component.len() + model.len() + 1);
    k.push_str(component);
    k.push(MODEL_KEY_SEP);
    k.push_str(model);
    k
}

pub const MODEL_KEY_SEP: char = '\u{1f}';

/// A models table key's (component, model); `OTHER` is (OTHER, OTHER).
pub fn split_model_key(key: &str) -> (&str, &str) {
    key.split_once(MODEL_KEY_SEP).unwrap_or((key, key))
}

impl ModelTotals {
    pub fn add(&mut self, o: &ModelTotals) {
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.calls = self.calls.saturating_add(o.calls);
        self.errors = self.errors.saturating_add(o.errors);
        self.cost_nanousd = self.cost_nanousd.saturating_add(o.cost_nanousd);
        self.priced_events = self.priced_events.saturating_add(o.priced_events);
        self.unpriced_tokens = self.unpriced_tokens.saturating_add(o.unpriced_tokens);
        self.unpriced_calls = self.unpriced_calls.saturating_add(o.unpriced_calls);
        self.unknown_usage = self.unknown_usage.saturating_add(o.unknown_usage);
        self.tokens_held = self.tokens_held.saturating_add(o.tokens_held);
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ComponentTotals {
    pub tokens: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Successful steps.
    pub operations: u64,
    /// Failed steps.
    pub errors: u64,
    pub retries: u64,
    /// Successful steps that reported a finite latency.
    pub timed: u64,
    pub latency_ms: f64,
    pub latency_max_ms: f64,
    pub histogram: [u64; LATENCY_BUCKETS],
    pub failed_latency_ms: f64,
    /// The latency of every step event in file order (the pre-model rule,
    /// kept only for `Fold.summary()`'s `latency_ms` until its callers move).
    pub step_latency_ms: f64,
    pub model: Option<String>,
    /// `model` as JSON text, to skip decoding an unchanged model.
    model_json: Option<String>,
    pub last_error: Option<LastError>,
    /// The events' `cost_usd`, and the tokens of models without one (cost.rs).
    pub cost: Cost,
    /// Calls (`step_complete`, `step_error`) whose `metadata.usage` is
    /// `"unknown"`: their tokens are not known, never 0 silently.
    pub unknown_usage: u64,
    /// The `tokens_held` of those calls: the budget the proxy kept for them
    /// (counted as spent against the budget, never as tokens).
    pub tokens_held: u64,
    /// The component's heaviest calls, the events that show its tokens per
    /// call (issue 13's token jumps; see [`HeaviestCalls`]).
    pub heaviest: HeaviestCalls,
    /// The `seq`s of its first failed attempts (`retry_attempt`s counted in
    /// `retries`): the events that show a retry storm (issue 13).
    pub retry_seqs: FirstSeqs,
    /// The slot of (this component, `model`) in the models table this
    /// component's updates go to (the fold's or its run's). A cache, outside
    /// equality.
    model_slot: Cache<Option<u32>>,
}

/// What one event adds to its component's totals, in the fold's table and
/// in the current run's (the same for both: worked out once per event).
struct Step<'m> {
    tokens: u64,
    input_tokens: u64,
    output_tokens: u64,
    /// The JSON text of the event's `model`.
    model: Option<&'m str>,
    /// The event's `cost_usd` in nano-dollars ([`nano_usd`]).
    cost: Option<u64>,
    kind: Kind,
    latency: Option<f64>,
    /// The histogram bucket of `latency` (for a successful step).
    bucket: usize,
    error: bool,
    last_error: &'m Option<LastError>,
    /// `metadata.usage == "unknown"`.
    unknown_usage: bool,
    /// `metadata.tokens_held` (0 when absent).
    tokens_held: u64,
    /// The event's `seq` (a call's: [`HeaviestCalls`]).
    seq: Option<u64>,
}

impl Step<'_> {
    #[inline(always)]
    fn update(&self, c: &mut ComponentTotals) {
        c.tokens = c.tokens.saturating_add(self.tokens);
        c.input_tokens = c.input_tokens.saturating_add(self.input_tokens);
        c.output_tokens = c.output_tokens.saturating_add(self.output_tokens);
        if let Some(json) = self.model {
            if !c
                .model_json
                .as_deref()
                .is_some_and(|m| same_bytes(m.as_bytes(), json.as_bytes()))
            {
                c.set_model(json);
            }
        }
        if self.cost.is_some() || self.model.is_some() {
            // Unpriced: a model (a string, now `c.model`), tokens and no cost.
            let named = self.model.is_some_and(|j| j.starts_with('"'));
            let model = if named { c.model.as_deref() } else { None };
            c.cost.observe(self.cost, self.tokens, model);
        }
        let call = matches!(self.kind, Kind::StepComplete | Kind::StepError);
        if call && self.unknown_usage {
            c.unknown_usage = c.unknown_usage.saturating_add(1);
        }
        if call {
            c.tokens_held = c.tokens_held.saturating_add(self.tokens_held);
        }
        match self.kind {
            Kind::StepComplete => {
                c.operations = c.operations.saturating_add(1);
                if let Some(ms) = self.latency {
                    c.observe_latency(ms, self.bucket);
                    c.step_latency_ms += ms;
                }
                c.heaviest.observe(self.tokens, self.seq);
            }
            Kind::StepError => {
                c.errors = c.errors.saturating_add(1);
                c.heaviest.observe(self.tokens, self.seq);
                if let Some(ms) = self.latency {
                    c.failed_latency_ms += ms;
                    c.step_latency_ms += ms;
                }
            }
            Kind::RetryAttempt if self.error => {
                c.retries = c.retries.saturating_add(1);
                c.retry_seqs.observe(self.seq);
            }
            _ => {}
        }
        if self.last_error.is_some() {
            c.last_error.clone_from(self.last_error);
        }
    }
}

impl Step<'_> {
    /// [`Step::update`] of a run's component `name`, and the event counted
    /// under its model (a string: now `c.model`) in the run's `models` (the
    /// session's models table is its runs', see [`FoldState::models`]: one
    /// update per line, not two).
    #[inline(always)]
    fn update_run(&self, c: &mut ComponentTotals, name: &str, models: &mut Names<ModelTotals>) {
        self.update(c);
        if self.model.is_some_and(|j| j.starts_with('"')) {
            self.update_model(c, name, models);
        }
    }

    /// Count the event under its model (a string: now `c.model`), in `models`.
    #[inline(always)]
    fn update_model(&self, c: &mut ComponentTotals, name: &str, models: &mut Names<ModelTotals>) {
        let slot = match c.model_slot.0 {
            Some(s) => s as usize,
            None => {
                let Some(model) = c.model.as_deref() else {
                    return;
                };
                let s = models.slot_index(&model_key(name, model));
                c.model_slot.0 = Some(s as u32);
                s
            }
        };
        let m = models.at_mut(slot);
        m.tokens = m.tokens.saturating_add(self.tokens);
        m.input_tokens = m.input_tokens.saturating_add(self.input_tokens);
        m.output_tokens = m.output_tokens.saturating_add(self.output_tokens);
        let call = matches!(self.kind, Kind::StepComplete | Kind::StepError);
        match self.cost {
            Some(n) => {
                m.cost_nanousd = m.cost_nanousd.saturating_add(n);
                m.priced_events = m.priced_events.saturating_add(1);
            }
            None => {
                m.unpriced_tokens = m.unpriced_tokens.saturating_add(self.tokens);
                m.unpriced_calls = m.unpriced_calls.saturating_add(u64::from(call));
            }
        }
        if call {
            m.calls = m.calls.saturating_add(1);
            m.errors = m
                .errors
                .saturating_add(u64::from(self.kind == Kind::StepError));
            m.unknown_usage = m
                .unknown_usage
                .saturating_add(u64::from(self.unknown_usage));
            m.tokens_held = m.tokens_held.saturating_add(self.tokens_held);
        }
    }
}

/// The histogram bucket of a latency: the first bound at or above `ms` (the
/// bounds are sorted).
#[inline]
fn latency_bucket(ms: f64) -> usize {
    LATENCY_BOUNDS_MS.partition_point(|&b| b < ms)
}

/// The bucket of the last latency and its bounds: successive latencies mostly
/// fall in the same bucket, found with two comparisons instead of a search.
#[derive(Debug, Clone, Copy)]
struct BucketCache {
    /// `ms` is in the bucket when `low < ms <= high`.
    low: f64,
    high: f64,
    bucket: usize,
}

impl Default for BucketCache {
    fn default() -> Self {
        // Empty: no `ms` is above +inf.
        BucketCache {
            low: f64::INFINITY,
            high: f64::INFINITY,
            bucket: 0,
        }
    }
}

impl BucketCache {
    /// [`latency_bucket`] of a finite `ms`.
    #[inline(always)]
    fn of(&mut self, ms: f64) -> usize {
        if self.low < ms && ms <= self.high {
            return self.bucket;
        }
        let b = latency_bucket(ms);
        self.bucket = b;
        self.low = if b == 0 {
            f64::NEG_INFINITY
        } else {
            LATENCY_BOUNDS_MS[b - 1]
        };
        self.high = LATENCY_BOUNDS_MS.get(b).copied().unwrap_or(f64::INFINITY);
        b
    }
}

impl ComponentTotals {
    fn add(&mut self, o: &ComponentTotals) {
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.operations = self.operations.saturating_add(o.operations);
        self.errors = self.errors.saturating_add(o.errors);
        self.retries = self.retries.saturating_add(o.retries);
        self.timed = self.timed.saturating_add(o.timed);
        self.latency_ms += o.latency_ms;
        self.latency_max_ms = self.latency_max_ms.max(o.latency_max_ms);
        for (a, b) in self.histogram.iter_mut().zip(o.histogram.iter()) {
            *a = a.saturating_add(*b);
        }
        self.failed_latency_ms += o.failed_latency_ms;
        self.step_latency_ms += o.step_latency_ms;
        if o.model.is_some() {
            self.model.clone_from(&o.model);
            self.model_json.clone_from(&o.model_json);
            self.model_slot.0 = None;
        }
        self.unknown_usage = self.unknown_usage.saturating_add(o.unknown_usage);
        self.tokens_held = self.tokens_held.saturating_add(o.tokens_held);
        if o.last_error.is_some() {
            self.last_error.clone_from(&o.last_error);
        }
        self.cost.add(&o.cost);
        self.heaviest.merge(&o.heaviest);
        self.retry_seqs.merge(&o.retry_seqs);
    }

    /// A model other than the one last seen (rare: kept out of line).
    #[cold]
    #[inline(never)]
    fn set_model(&mut self, json: &str) {
        if let Some(m) = decode_str(json) {
            let m = bounded(&m);
            if self.model.as_deref() != Some(m.as_str()) {
                self.model_slot.0 = None;
            }
            self.model = Some(m);
            self.model_json = Some(json.to_string());
        }
    }

    /// Count a successful step's latency `ms`, whose histogram bucket is
    /// `bucket` ([`latency_bucket`]: found once per event, not per table).
    #[inline(always)]
    fn observe_latency(&mut self, ms: f64, bucket: usize) {
        self.timed = self.timed.saturating_add(1);
        self.latency_ms += ms;
        self.latency_max_ms = self.latency_max_ms.max(ms);
        self.histogram[bucket] = self.histogram[bucket].saturating_add(1);
    }

    /// The `p` quantile (0 < p <= 1) of the successful steps' latency: the
    /// upper bound of the histogram bucket holding that rank, never above the
    /// largest latency seen. None without timed steps.
    pub fn latency_quantile_ms(&self, p: f64) -> Option<f64> {
        if self.timed == 0 {
            return None;
        }
        let rank = ((p * self.timed as f64).ceil() as u64).clamp(1, self.timed);
        let mut seen = 0u64;
        for (i, &n) in self.histogram.iter().enumerate() {
            seen = seen.saturating_add(n);
            if seen >= rank {
                let bound = LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY);
                return Some(bound.min(self.latency_max_ms));
            }
        }
        Some(self.latency_max_ms)
    }

    /// Mean latency of the successful timed steps.
    pub fn average_latency_ms(&self) -> Option<f64> {
        (self.timed > 0).then(|| self.latency_ms / self.timed as f64)
    }
}

/// Calls kept per component by [`HeaviestCalls`].
pub const HEAVIEST_CALLS: usize = 5;

/// A component's heaviest calls (issue 13: a token jump "with the events that
/// show it"): the `(tokens, seq)` of its `step_complete` and `step_error`
/// events that carry a `seq`, at most [`HEAVIEST_CALLS`], most tokens first
/// and, at equal tokens, the lower `seq` first. The first N of a union are the
/// first N of its parts' first N, so split folds merge exactly. A fixed array:
/// nothing is allocated per component.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HeaviestCalls {
    calls: [(u64, u64); HEAVIEST_CALLS],
    len: u8,
}

impl HeaviestCalls {
    /// `a` goes before `b`: more tokens, or as many and a lower seq.
    #[inline(always)]
    fn before(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
    }

    /// Count a call of `tokens` (kept when it has a `seq`). Once full, most
    /// calls are lighter than the last kept: two comparisons, inline; the
    /// insertion is out of line, to keep the fold's hot loop small.
    #[inline(always)]
    fn observe(&mut self, tokens: u64, seq: Option<u64>) {
        if let Some(seq) = seq {
            if usize::from(self.len) == HEAVIEST_CALLS
                && !Self::before((tokens, seq), self.calls[HEAVIEST_CALLS - 1])
            {
                return;
            }
            self.insert((tokens, seq));
        }
    }

    #[inline(never)]
    fn offer(&mut self, call: (u64, u64)) {
        let len = usize::from(self.len);
        if len == HEAVIEST_CALLS && !Self::before(call, self.calls[len - 1]) {
            return;
        }
        self.insert(call);
    }

    /// Put `call` in its place (it goes before the last kept, or there is room).
    #[inline(never)]
    fn insert(&mut self, call: (u64, u64)) {
        let len = usize::from(self.len);
        // After every call that goes before it or equals it.
        let at = self.calls[..len].partition_point(|&x| !Self::before(call, x));
        let end = len.min(HEAVIEST_CALLS - 1);
        self.calls.copy_within(at..end, at + 1);
        self.calls[at] = call;
        self.len = (end + 1) as u8;
    }

    fn merge(&mut self, o: &HeaviestCalls) {
        for &call in o.calls() {
            self.offer(call);
        }
    }

    /// `(tokens, seq)`, heaviest first.
    pub fn calls(&self) -> &[(u64, u64)] {
        &self.calls[..usize::from(self.len)]
    }
}

/// `seq`s kept by [`FirstSeqs`].
pub const FIRST_SEQS: usize = 5;

/// The first [`FIRST_SEQS`] `seq`s of some events, in file order: a later part
/// of a file adds its own after them, so split folds merge exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FirstSeqs {
    seqs: [u64; FIRST_SEQS],
    len: u8,
}

impl FirstSeqs {
    #[inline(never)]
    fn observe(&mut self, seq: Option<u64>) {
        let len = usize::from(self.len);
        if let (Some(seq), true) = (seq, len < FIRST_SEQS) {
            self.seqs[len] = seq;
            self.len += 1;
        }
    }

    fn merge(&mut self, o: &FirstSeqs) {
        for &seq in o.seqs() {
            self.observe(Some(seq));
        }
    }

    pub fn seqs(&self) -> &[u64] {
        &self.seqs[..usize::from(self.len)]
    }
}

/// Times the same component started with the same input before it counts
/// as a loop (issue 13: an agent repeating a step).
pub const LOOP_MIN_STARTS: u64 = 3;
/// Distinct (component, input) pairs and step outputs kept per run.
pub const MAX_STEP_HASHES: usize = 1024;
/// `seq`s kept per (component, input) pair: the first ones.
pub const LOOP_SEQS: usize = 5;
/// Bytes kept of a hash's text.
pub const MAX_HASH: usize = 128;

/// A run's step hashes (issue 13): the `step_start`s per component and
/// `metadata.input_sha256`, and each `step_complete`'s
/// `metadata.output_sha256` in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepHashes {
    /// (component, input hash, starts, first `seq`s), in first-seen order.
    pub inputs: Vec<(String, String, u64, Vec<u64>)>,
    index: HashMap<(String, String), usize>,
    /// (component, output hash) of each `step_complete` that has one, in order.
    pub outputs: Vec<(String, String)>,
    /// Starts and outputs past the caps (not kept).
    pub dropped: u64,
}

impl StepHashes {
    fn start(&mut self, component: &str, hash: &str, seq: Option<u64>) {
        let key = (bounded(component), hash_text(hash));
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None if self.inputs.len() < MAX_STEP_HASHES => {
                self.index.insert(key.clone(), self.inputs.len());
                self.inputs.push((key.0, key.1, 0, Vec::new()));
                self.inputs.len() - 1
            }
            None => {
                self.dropped = self.dropped.saturating_add(1);
                return;
            }
        };
        let e = &mut self.inputs[i];
        e.2 = e.2.saturating_add(1);
        if let Some(seq) = seq {
            if e.3.len() < LOOP_SEQS {
                e.3.push(seq);
            }
        }
    }

    fn output(&mut self, component: &str, hash: &str) {
        if self.outputs.len() < MAX_STEP_HASHES {
            self.outputs.push((bounded(component), hash_text(hash)));
        } else {
            self.dropped = self.dropped.saturating_add(1);
        }
    }

    fn absorb(&mut self, o: &StepHashes) {
        for (c, h, n, seqs) in &o.inputs {
            let key = (c.clone(), h.clone());
            let i = match self.index.get(&key) {
                Some(&i) => i,
                None if self.inputs.len() < MAX_STEP_HASHES => {
                    self.index.insert(key, self.inputs.len());
                    self.inputs.push((c.clone(), h.clone(), 0, Vec::new()));
                    self.inputs.len() - 1
                }
                None => {
                    self.dropped = self.dropped.saturating_add(*n);
                    continue;
                }
            };
            let e = &mut self.inputs[i];
            e.2 = e.2.saturating_add(*n);
            for &s in seqs {
                if e.3.len() < LOOP_SEQS {
                    e.3.push(s);
                }
            }
        }
        for (c, h) in &o.outputs {
            self.output(c, h);
        }
        self.dropped = self.dropped.saturating_add(o.dropped);
    }

    /// The (component, input hash, starts, first seqs) started at least
    /// [`LOOP_MIN_STARTS`] times.
    pub fn loops(&self) -> impl Iterator<Item = &(String, String, u64, Vec<u64>)> {
        self.inputs.iter().filter(|e| e.2 >= LOOP_MIN_STARTS)
    }
}

fn hash_text(h: &str) -> String {
    let mut end = h.len().min(MAX_HASH);
    while !h.is_char_boundary(end) {
        end -= 1;
    }
    h[..end].to_string()
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunTotals {
    pub number: u64,
    /// The number was counted from this fold's start, with no declared
    /// number before it, so a merge offsets it by the preceding run's number.
    number_local: bool,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// Timestamp of the run's latest event, set when a later run starts: the
    /// current run's is the fold's `last_timestamp` (no copy per event).
    last_at: Option<String>,
    pub status: String,
    pub reason: Option<String>,
    pub tokens: u64,
    pub events: u64,
    /// The `seq` of the run's first and latest events that carry one.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub budget: Option<u64>,
    pub components: Names<ComponentTotals>,
    /// Per model (see [`ModelTotals`]).
    pub models: Names<ModelTotals>,
    /// Step input and output hashes (see [`StepHashes`]).
    pub steps: StepHashes,
    /// The metadata of the run's `session_start` (task, thresholds, ...), as JSON.
    pub start_metadata: Option<String>,
    /// The proxy's calls started and not closed yet (see [`OpenCalls`]).
    pub calls: OpenCalls,
}

/// The most calls a run keeps open, and closes of calls a part of a split
/// fold did not see start: bounded whatever the log holds.
pub const MAX_OPEN_CALLS: usize = 4096;

/// A call the proxy started (a `step_start` with `metadata.call`) that no
/// `step_complete`/`step_error` of its run closed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenCall {
    pub call: u64,
    pub component: String,
    /// `metadata.model` of its start, when a string.
    pub model: Option<String>,
    /// `metadata.prompt_tokens_reserved` + `metadata.max_tokens`: what the
    /// call holds of the budget until it settles.
    pub reserved: u64,
}

/// A run's calls in flight (review 14, finding 2). While the run is live they
/// are in flight; once it is dead (it ended, a later run started, or its
/// writer is gone) a call with a reservation that never ended is a call of
/// unknown usage holding its reservation, as the proxy counts one itself
/// ([`FoldState::settled`]): the upstream may have spent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenCalls {
    /// Oldest start first.
    pub open: Vec<OpenCall>,
    /// Closes of calls this fold did not see start (an earlier part of the
    /// file did): a merge closes them there.
    closed: Vec<u64>,
}

impl OpenCalls {
    fn start(&mut self, c: OpenCall) {
        if self.open.len() < MAX_OPEN_CALLS {
            self.open.push(c);
        }
    }

    fn close(&mut self, call: u64) {
        if let Some(i) = self.open.iter().rposition(|c| c.call == call) {
            self.open.remove(i);
        } else if self.closed.len() < MAX_OPEN_CALLS {
            self.closed.push(call);
        }
    }

    /// Continue with `o`, the calls of what directly follows in the same run.
    fn absorb(&mut self, o: &OpenCalls) {
        for &call in &o.closed {
            self.close(call);
        }
        for c in &o.open {
            self.start(c.clone());
        }
    }

    /// The calls holding a reservation.
    pub fn holding(&self) -> impl Iterator<Item = &OpenCall> {
        self.open.iter().filter(|c| c.reserved > 0)
    }
}

/// Count a dead run's open calls with a reservation as calls of unknown usage
/// holding it: in the run's components and models and in `session`.
fn settle_calls(r: &mut RunTotals, session: &mut Names<ComponentTotals>) {
    for c in std::mem::take(&mut r.calls.open) {
        if c.reserved == 0 {
            continue;
        }
        for t in [r.components.slot(&c.component), session.slot(&c.component)] {
            t.unknown_usage = t.unknown_usage.saturating_add(1);
            t.tokens_held = t.tokens_held.saturating_add(c.reserved);
        }
        if let Some(m) = &c.model {
            // Keyed as the call's events are: by the run's name of the component.
            let name = match r.components.get(&c.component) {
                Some(_) => c.component.as_str(),
                None => OTHER,
            };
            let t = r.models.slot(&model_key(name, m));
            t.unknown_usage = t.unknown_usage.saturating_add(1);
            t.tokens_held = t.tokens_held.saturating_add(c.reserved);
        }
    }
}

impl Default for RunTotals {
    fn default() -> Self {
        RunTotals {
            number: 0,
            number_local: true,
            started_at: None,
            ended_at: None,
            last_at: None,
            status: "waiting".to_string(),
            reason: None,
            tokens: 0,
            events: 0,
            first_seq: None,
            last_seq: None,
            budget: None,
            components: Names::default(),
            models: Names::default(),
            steps: StepHashes::default(),
            start_metadata: None,
            calls: OpenCalls::default(),
        }
    }
}

impl RunTotals {
    /// Add the events that continue this run (a later part of the same file).
    fn absorb(&mut self, o: &RunTotals) {
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.events = self.events.saturating_add(o.events);
        if self.first_seq.is_none() {
            self.first_seq = o.first_seq;
        }
        if o.last_seq.is_some() {
            self.last_seq = o.last_seq;
        }
        for (k, c) in o.components.iter() {
            self.components.slot(k).add(c);
        }
        for (k, m) in o.models.iter() {
            self.models.slot(k).add(m);
        }
        self.steps.absorb(&o.steps);
        self.calls.absorb(&o.calls);
        if o.ended_at.is_some() {
            self.ended_at.clone_from(&o.ended_at);
            self.status.clone_from(&o.status);
            self.reason.clone_from(&o.reason);
        }
    }

    /// Successful and failed steps of the run.
    pub fn steps(&self) -> (u64, u64) {
        self.components
            .iter()
            .fold((0u64, 0u64), |(ok, bad), (_, c)| {
                (
                    ok.saturating_add(c.operations),
                    bad.saturating_add(c.errors),
                )
            })
    }
}

/// Tokens per second of event time over the last `WINDOW_SECONDS` seconds
/// ending at the latest event. Its content does not depend on the order the
/// events were folded in: it holds exactly the events whose second is within
/// the window of the latest second seen, so split folds merge exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct RateWindow {
    /// The latest event second seen (Unix seconds), if any.
    pub end: Option<i64>,
    buckets: Box<[u64]>,
}

impl Default for RateWindow {
    fn default() -> Self {
        RateWindow {
            end: None,
            buckets: vec![0; WINDOW_SECONDS].into_boxed_slice(),
        }
    }
}

impl RateWindow {
    fn slot(sec: i64) -> usize {
        sec.rem_euclid(WINDOW_SECONDS as i64) as usize
    }

    pub fn add(&mut self, sec: i64, tokens: u64) {
        let end = match self.end {
            None => sec,
            Some(end) if sec > end => {
                // Clear the seconds the window moves past.
                let steps = (sec - end).min(WINDOW_SECONDS as i64);
                for s in 1..=steps {
                    self.buckets[Self::slot(end + s)] = 0;
                }
                sec
            }
            Some(end) => end,
        };
        self.end = Some(end);
        if sec > end - WINDOW_SECONDS as i64 {
            let b = &mut self.buckets[Self::slot(sec)];
            *b = b.saturating_add(tokens);
        }
    }

    fn merge(&mut self, o: &RateWindow) {
        let Some(oend) = o.end else { return };
        for back in 0..WINDOW_SECONDS as i64 {
            let sec = oend - back;
            let n = o.buckets[Self::slot(sec)];
            if n > 0 {
                self.add(sec, n);
            } else if back == 0 {
                self.add(sec, 0);
            }
        }
    }

    /// Tokens of the events in the `seconds` whole seconds ending `idle`
    /// seconds after the latest event's second.
    pub fn tokens_in(&self, seconds: u64, idle: u64) -> u64 {
        let Some(end) = self.end else { return 0 };
        let now = end.saturating_add(idle.min(1 << 40) as i64);
        let seconds = seconds.min(WINDOW_SECONDS as u64) as i64;
        (0..seconds)
            .map(|back| now - back)
            .filter(|&s| s <= end && s > end - WINDOW_SECONDS as i64)
            .map(|s| self.buckets[Self::slot(s)])
            .fold(0u64, u64::saturating_add)
    }

    /// Tokens of the seconds `lo..=hi` (Unix seconds) that the window holds.
    pub fn tokens_between(&self, lo: i64, hi: i64) -> u64 {
        let Some(end) = self.end else { return 0 };
        let lo = lo.max(end - WINDOW_SECONDS as i64 + 1);
        let hi = hi.min(end);
        (lo..=hi)
            .map(|s| self.buckets[Self::slot(s)])
            .fold(0u64, u64::saturating_add)
    }

    /// Nonzero `(second, tokens)` buckets, oldest first.
    pub fn buckets(&self) -> Vec<(i64, u64)> {
        let Some(end) = self.end else {
            return Vec::new();
        };
        (0..WINDOW_SECONDS as i64)
            .rev()
            .map(|back| end - back)
            .map(|s| (s, self.buckets[Self::slot(s)]))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// An ISO 8601 timestamp as microseconds since the Unix epoch. An offset-less
/// timestamp is read as UTC: the model only subtracts timestamps, and a
/// session's timestamps share one form (contract 1).
pub fn timestamp_micros(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = b.get(r)?;
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(s.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let year = digits(0..4)?;
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || !matches!(b.get(10), Some(b'T' | b' '))
    {
        return None;
    }
    let (month, day) = (digits(5..7)?, digits(8..10)?);
    if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return None;
    }
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &b[start..i.min(start + 6)];
        micros = frac.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
        for _ in frac.len()..6 {
            micros *= 10;
        }
    }
    let offset = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let oh = digits(i + 1..i + 3)?;
            let om = if b.get(i + 3) == Some(&b':') {
                (b.len() == i + 6).then_some(())?;
                digits(i + 4..i + 6)?
            } else {
                (b.len() == i + 5).then_some(())?;
                digits(i + 3..i + 5)?
            };
            let secs = oh * 3600 + om * 60;
            if sign == b'+' {
                secs
            } else {
                -secs
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(secs * 1_000_000 + micros)
}

/// The Unix second of the last timestamp read, keyed by its text without the
/// fraction: consecutive events mostly share a second, so most timestamps are
/// compared, not parsed. A cache: it takes no part in a fold's equality.
#[derive(Debug, Clone, Default)]
struct SecondCache {
    /// The date and time up to the second (`YYYY-MM-DDTHH:MM:SS`) of the
    /// cached timestamp, as three words (bytes 0..8, 8..16 and 15..19, see
    /// [`head_words`]); None before the first.
    head: Option<(u64, u64, u32)>,
    /// What follows its fraction (the offset).
    tail: Vec<u8>,
    second: i64,
}

impl PartialEq for SecondCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The first 19 bytes of `b` as three words (the last two overlap), None
/// when `b` is shorter: equal words, equal bytes.
#[inline(always)]
fn head_words(b: &[u8]) -> Option<(u64, u64, u32)> {
    let h: &[u8; 19] = b.get(..19)?.try_into().ok()?;
    let w8 = |i: usize| {
        u64::from_le_bytes([
            h[i],
            h[i + 1],
            h[i + 2],
            h[i + 3],
            h[i + 4],
            h[i + 5],
            h[i + 6],
            h[i + 7],
        ])
    };
    Some((
        w8(0),
        w8(8),
        u32::from_le_bytes([h[15], h[16], h[17], h[18]]),
    ))
}

impl SecondCache {
    #[inline(always)]
    fn second(&mut self, timestamp: &str) -> Option<i64> {
        let b = timestamp.as_bytes();
        let parse = || timestamp_micros(timestamp).map(|us| us.div_euclid(1_000_000));
        let Some(head) = head_words(b) else {
            return parse();
        };
        let mut end = 19;
        if b.get(19) == Some(&b'.') {
            end = 20 + digit_run(b, 20);
            if end == 20 {
                return parse(); // "." without digits: invalid, never cached
            }
        }
        let tail = &b[end..];
        if self.head == Some(head) && same_bytes(&self.tail, tail) {
            return Some(self.second);
        }
        let second = parse()?;
        self.head = Some(head);
        self.tail.clear();
        self.tail.extend_from_slice(tail);
        self.second = second;
        Some(second)
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
    #[serde(borrow, default)]
    reason: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    category: Option<&'a RawValue>,
    #[serde(borrow, default)]
    attempt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    resume: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cost_usd: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tokens_held: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input_sha256: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output_sha256: Option<&'a RawValue>,
    #[serde(borrow, default)]
    call: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt_tokens_reserved: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
}

/// The metadata values the fold uses, read leniently: a value of the wrong
/// type counts as absent (the event itself is valid).
#[derive(Default)]
struct FoldMeta<'a> {
    latency_ms: Option<f64>,
    budget: Option<u64>,
    status: Option<Cow<'a, str>>,
    run: Option<u64>,
    allocations: Option<HashMap<String, u64>>,
    dropped: Option<u64>,
    reason: Option<Cow<'a, str>>,
    error: Option<Cow<'a, str>>,
    category: Option<Cow<'a, str>>,
    attempt: Option<u64>,
    /// The model's JSON text, decoded only when it changes.
    model: Option<Cow<'a, str>>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    resume: Option<bool>,
    /// `cost_usd` in nano-dollars, read from the number's text (cost.rs).
    cost: Option<u64>,
    /// `usage` is the string `"unknown"`.
    usage_unknown: bool,
    /// The tokens of the budget a call of unknown usage held (the proxy's).
    tokens_held: Option<u64>,
    /// A step's `input_sha256` / `output_sha256` (strings).
    input_sha256: Option<Cow<'a, str>>,
    output_sha256: Option<Cow<'a, str>>,
    /// The proxy's call number in its run, and what its start reserved.
    call: Option<u64>,
    prompt_tokens_reserved: Option<u64>,
    max_tokens: Option<u64>,
}

impl<'a> FoldMeta<'a> {
    fn from_keys(k: &MetaKeys<'a>) -> Self {
        FoldMeta {
            latency_ms: num(k.latency_ms),
            budget: num(k.budget),
            status: text(k.status),
            run: num(k.run),
            allocations: num(k.allocations),
            dropped: num(k.dropped),
            reason: text(k.reason),
            error: text(k.error),
            category: text(k.category),
            attempt: num(k.attempt),
            model: k.model.map(|r| Cow::Borrowed(r.get())),
            input_tokens: num(k.input_tokens),
            output_tokens: num(k.output_tokens),
            resume: num(k.resume),
            cost: k.cost_usd.and_then(|r| nano_usd(r.get())),
            usage_unknown: text(k.usage).as_deref() == Some("unknown"),
            tokens_held: num(k.tokens_held),
            input_sha256: text(k.input_sha256),
            output_sha256: text(k.output_sha256),
            call: num(k.call),
            prompt_tokens_reserved: num(k.prompt_tokens_reserved),
            max_tokens: num(k.max_tokens),
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
            status: get::<String>(m, "status").map(Cow::Owned),
            run: get(m, "run"),
            allocations: get(m, "allocations"),
            dropped: get(m, "dropped"),
            reason: get::<String>(m, "reason").map(Cow::Owned),
            error: get::<String>(m, "error").map(Cow::Owned),
            category: get::<String>(m, "category").map(Cow::Owned),
            attempt: get(m, "attempt"),
            model: m.get("model").map(|v| Cow::Owned(v.to_string())),
            input_tokens: get(m, "input_tokens"),
            output_tokens: get(m, "output_tokens"),
            resume: get(m, "resume"),
            // A map's numbers are doubles: the caller reads cost_usd's text.
            cost: None,
            usage_unknown: m.get("usage").and_then(Value::as_str) == Some("unknown"),
            tokens_held: get(m, "tokens_held"),
            input_sha256: get::<String>(m, "input_sha256").map(Cow::Owned),
            output_sha256: get::<String>(m, "output_sha256").map(Cow::Owned),
            call: get(m, "call"),
            prompt_tokens_reserved: get(m, "prompt_tokens_reserved"),
            max_tokens: get(m, "max_tokens"),
        }
    }
}

/// The metadata keys the fold reads, picked by the parser's fast path
/// (the fields of [`MetaKeys`], in this order).
const META_KEYS: [&str; 22] = [
    "latency_ms",
    "budget",
    "status",
    "run",
    "allocations",
    "dropped",
    "reason",
    "error",
    "category",
    "attempt",
    "model",
    "input_tokens",
    "output_tokens",
    "resume",
    "cost_usd",
    "usage",
    "input_sha256",
    "output_sha256",
    "tokens_held",
    "call",
    "prompt_tokens_reserved",
    "max_tokens",
];

/// [`META_KEYS`] indexed for the parser's fast path.
const FOLD_KEYS: KeySet<'static, 22> = KeySet::new(&META_KEYS);

/// The metadata values the fold uses (the parser has validated the metadata),
/// set in `m` (a default one: filled in place, not moved per line).
#[inline(always)]
fn fold_meta<'a>(
    m: &mut FoldMeta<'a>,
    event: &RawEvent<'a>,
    picks: Option<Picks<'a, 22>>,
    kind: Kind,
) {
    match (event.metadata, picks) {
        (Some(_), _) if !kind.needs_meta() => {}
        // The fast path picked the values: no second parse.
        // Only the keys the line holds are read (the indexes of META_KEYS).
        (Some(_), Some(p)) => {
            for (i, v) in p.each() {
                match i {
                    0 => m.latency_ms = p.f64_at(i),
                    1 => m.budget = p.u64_at(i),
                    2 => m.status = plain_str(v),
                    3 => m.run = p.u64_at(i),
                    4 => m.allocations = allocations(v),
                    5 => m.dropped = p.u64_at(i),
                    6 => m.reason = plain_str(v),
                    7 => m.error = plain_str(v),
                    8 => m.category = plain_str(v),
                    9 => m.attempt = p.u64_at(i),
                    10 => m.model = Some(Cow::Borrowed(v)),
                    11 => m.input_tokens = p.u64_at(i),
                    12 => m.output_tokens = p.u64_at(i),
                    13 => m.resume = json_bool(v),
                    14 => m.cost = nano_usd(v),
                    15 => m.usage_unknown = v == "\"unknown\"",
                    16 => m.input_sha256 = plain_str(v),
                    17 => m.output_sha256 = plain_str(v),
                    18 => m.tokens_held = p.u64_at(i),
                    19 => m.call = p.u64_at(i),
                    20 => m.prompt_tokens_reserved = p.u64_at(i),
                    _ => m.max_tokens = p.u64_at(i),
                }
            }
        }
        (Some(text), None) => *m = parse_meta(text),
        (None, _) => {}
    }
}

/// The metadata values of a line the general parser took (kept out of line:
/// the fast path's lines never come here).
#[cold]
#[inline(never)]
fn parse_meta(text: &str) -> FoldMeta<'_> {
    match serde_json::from_str::<MetaKeys<'_>>(text) {
        Ok(keys) => FoldMeta::from_keys(&keys),
        // Duplicate keys make the struct parse fail on valid JSON:
        // read them as a map, the last value winning as in Python.
        Err(_) => serde_json::from_str::<serde_json::Map<String, Value>>(text)
            .map(|map| FoldMeta {
                cost: last_cost(text),
                ..FoldMeta::from_map(&map)
            })
            .unwrap_or_default(),
    }
}

/// The last `cost_usd` of a metadata object whose keys repeat, from its text
/// (a map holds numbers as doubles, which would not be the decimal written).
fn last_cost(text: &str) -> Option<u64> {
    struct LastCost(Option<u64>);
    impl<'de> Deserialize<'de> for LastCost {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = LastCost;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<LastCost, A::Error> {
                    let mut cost = None;
                    while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                        if key == "cost_usd" {
                            let raw: &'de RawValue = map.next_value()?;
                            cost = nano_usd(raw.get());
                        } else {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                    Ok(LastCost(cost))
                }
            }
            d.deserialize_map(Visit)
        }
    }
    serde_json::from_str::<LastCost>(text)
        .ok()
        .and_then(|c| c.0)
}

/// A string value the parser's fast path picked: the fast path takes only
/// lines without a backslash, so its text between the quotes is the string.
/// None for a value of another type.
#[inline]
fn plain_str(json: &str) -> Option<Cow<'_, str>> {
    debug_assert!(!json.contains('\\'));
    let s = json.strip_prefix('"')?.strip_suffix('"')?;
    Some(Cow::Borrowed(s))
}

/// A JSON value's text read as a boolean, as serde reads a `bool`.
#[inline]
fn json_bool(json: &str) -> Option<bool> {
    match json {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// A `session_start`'s allocations (rare: kept out of line).
#[cold]
#[inline(never)]
fn allocations(json: &str) -> Option<HashMap<String, u64>> {
    serde_json::from_str(json).ok()
}

fn num<T: for<'de> Deserialize<'de>>(raw: Option<&RawValue>) -> Option<T> {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
}

/// A string value, borrowed from the line unless it has escapes (no
/// allocation per event for a `model` or `status`).
fn text<'a>(raw: Option<&'a RawValue>) -> Option<Cow<'a, str>> {
    decode_str(raw?.get())
}

fn decode_str<'a>(raw: &'a str) -> Option<Cow<'a, str>> {
    match serde_json::from_str::<&'a str>(raw) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(raw).ok().map(Cow::Owned),
    }
}

/// `text` cut to at most `MAX_TEXT` bytes, at a character boundary.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_string();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// A step started and not closed yet (issue 12, "Now running").
#[derive(Debug, Clone, PartialEq)]
pub struct OpenStep {
    /// The component's slot in the fold's `components`.
    pub slot: u32,
    /// The timestamp of the step's first `step_start` (at most [`MAX_TEXT`] bytes).
    pub started_at: String,
    pub seq: Option<u64>,
    /// The `step_start`'s `metadata.attempt` (at least 1), raised by a later
    /// start's, plus one per `retry_attempt` of the component since.
    pub attempt: u64,
    /// The latest `step_start`'s message (at most [`MAX_TEXT`] bytes).
    pub message: String,
    /// While nothing in this fold closed the component's step before this
    /// one started: what this fold's events of the component do to a step of
    /// it an earlier part of the file left open, `attempt -> max(attempt +
    /// add, floor)` (saturating) as `(add, floor)`. A merge continues that
    /// step (its start, its attempt so raised).
    carry: Option<(u64, u64)>,
}

/// What the events of a component do to a step of it an earlier part left open.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Touch {
    /// Closed (a `step_complete`/`step_error`).
    Closed,
    /// `retry_attempt`s while it was not open here: its attempt goes up by this.
    Retried(u64),
}

/// The steps in flight (issue 12): the rule of the views' "Now running", kept
/// over the whole fold (not only the last events): a `step_start` opens its
/// component's step, or moves it last when it is open (same start, the
/// attempt raised to the start's `metadata.attempt`, its message); a
/// `retry_attempt` raises the open step's attempt by one; a
/// `step_complete`/`step_error` closes the component's step; a run's start or
/// end closes every step. The step in flight is the last one open. Only the
/// components the fold's `components` table names are tracked (a name folded
/// into `OTHER` is not), so the table holds at most one step per name there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpenSteps {
    /// Oldest (re)start first.
    open: Vec<OpenStep>,
    /// A run's start or end closed every step: what came before this fold no
    /// longer counts.
    cleared: bool,
    /// Until `cleared`: per component slot (sorted) with no step open here,
    /// what this fold did to a step an earlier part left open.
    touched: Vec<(u32, Touch)>,
}

fn carry_retry(c: &mut Option<(u64, u64)>, n: u64) {
    if let Some((add, floor)) = c {
        *add = add.saturating_add(n);
        *floor = floor.saturating_add(n);
    }
}

impl OpenSteps {
    /// The step in flight: the latest open one.
    pub fn latest(&self) -> Option<&OpenStep> {
        self.open.last()
    }

    /// The steps open, oldest (re)start first.
    pub fn open(&self) -> &[OpenStep] {
        &self.open
    }

    fn find(&self, slot: u32) -> Option<usize> {
        self.open.iter().position(|s| s.slot == slot)
    }

    fn touch(&self, slot: u32) -> Result<usize, usize> {
        self.touched.binary_search_by_key(&slot, |t| t.0)
    }

    fn set_touch(&mut self, slot: u32, t: Touch) {
        match self.touch(slot) {
            Ok(i) => self.touched[i].1 = t,
            Err(i) => self.touched.insert(i, (slot, t)),
        }
    }

    /// A run started or ended.
    fn clear(&mut self) {
        self.open.clear();
        self.touched.clear();
        self.cleared = true;
    }

    /// `step_complete` / `step_error` of the component in `slot`.
    #[inline]
    fn close(&mut self, slot: u32) {
        if self.cleared && self.open.is_empty() {
            return;
        }
        if let Some(i) = self.find(slot) {
            self.open.remove(i);
        }
        if !self.cleared {
            self.set_touch(slot, Touch::Closed);
        }
    }

    /// `retry_attempt` of the component in `slot`.
    fn retry(&mut self, slot: u32) {
        if let Some(s) = self.open.iter_mut().find(|s| s.slot == slot) {
            s.attempt = s.attempt.saturating_add(1);
            carry_retry(&mut s.carry, 1);
        } else if !self.cleared {
            match self.touch(slot) {
                Ok(i) => {
                    if let Touch::Retried(n) = &mut self.touched[i].1 {
                        *n = n.saturating_add(1);
                    }
                }
                Err(i) => self.touched.insert(i, (slot, Touch::Retried(1))),
            }
        }
    }

    /// `step_start` of the component in `slot`.
    fn start(
        &mut self,
        slot: u32,
        timestamp: &str,
        message: &str,
        seq: Option<u64>,
        explicit: Option<u64>,
    ) {
        if let Some(i) = self.find(slot) {
            // A retry's new start: the same step, its next attempt.
            let mut s = self.open.remove(i);
            if let Some(a) = explicit {
                s.attempt = s.attempt.max(a);
                if let Some((_, floor)) = &mut s.carry {
                    *floor = (*floor).max(a);
                }
            }
            s.message = bounded(message);
            self.open.push(s);
            return;
        }
        let carry = if self.cleared {
            None
        } else {
            match self.touch(slot) {
                Ok(i) => match self.touched[i].1 {
                    Touch::Closed => None,
                    Touch::Retried(n) => {
                        self.touched.remove(i);
                        Some((n, n))
                    }
                },
                Err(_) => Some((0, 0)),
            }
        };
        self.open.push(OpenStep {
            slot,
            started_at: bounded(timestamp),
            seq,
            attempt: explicit.unwrap_or(1).max(1),
            message: bounded(message),
            carry: carry.map(|(add, floor)| (add, floor.max(explicit.unwrap_or(0)))),
        });
    }

    /// Append `b`, the table of the fold of what directly follows this
    /// fold's input; `slot_of` gives this fold's slot of a slot of `b`'s
    /// (None: a name this fold does not track).
    fn merge(&mut self, b: OpenSteps, slot_of: impl Fn(u32) -> Option<u32>) {
        if b.cleared {
            self.clear();
            for mut s in b.open {
                if let Some(slot) = slot_of(s.slot) {
                    s.slot = slot;
                    self.open.push(s);
                }
            }
            return;
        }
        for (slot, t) in b.touched {
            let Some(slot) = slot_of(slot) else { continue };
            match t {
                Touch::Closed => self.close(slot),
                Touch::Retried(n) => {
                    if let Some(s) = self.open.iter_mut().find(|s| s.slot == slot) {
                        s.attempt = s.attempt.saturating_add(n);
                        carry_retry(&mut s.carry, n);
                    } else if !self.cleared {
                        match self.touch(slot) {
                            Ok(i) => {
                                if let Touch::Retried(j) = &mut self.touched[i].1 {
                                    *j = j.saturating_add(n);
                                }
                            }
                            Err(i) => self.touched.insert(i, (slot, Touch::Retried(n))),
                        }
                    }
                }
            }
        }
        for mut s in b.open {
            let Some(slot) = slot_of(s.slot) else {
                continue;
            };
            s.slot = slot;
            if let Some((add, floor)) = s.carry {
                if let Some(i) = self.find(slot) {
                    // The step an earlier part started goes on.
                    let x = self.open.remove(i);
                    s.started_at = x.started_at;
                    s.seq = x.seq;
                    s.attempt = x.attempt.saturating_add(add).max(floor);
                    s.carry = x
                        .carry
                        .map(|(a, f)| (a.saturating_add(add), f.saturating_add(add).max(floor)));
                } else if self.cleared {
                    s.carry = None;
                } else if let Ok(i) = self.touch(slot) {
                    match self.touched[i].1 {
                        Touch::Closed => s.carry = None,
                        Touch::Retried(j) => {
                            self.touched.remove(i);
                            let a = j.saturating_add(add);
                            s.carry = Some((a, a.max(floor)));
                        }
                    }
                }
            }
            self.open.push(s);
        }
    }
}

/// What a fold of events knows about a session.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldState {
    pub last_n: usize,
    pub lines: u64,
    pub entries: u64,
    pub malformed: u64,
    pub malformed_samples: Vec<Malformed>,
    /// Which samples are oversize lines (parallel to `malformed_samples`).
    pub sample_oversize: Vec<bool>,
    pub oversize_lines: u64,
    pub torn_tail: bool,
    pub tokens: u64,
    pub event_counts: Names<u64>,
    pub components: Names<ComponentTotals>,
    /// Per (component, model) of the runs dropped from `run_list` (see
    /// [`FoldState::models`]).
    pub dropped_models: Names<ModelTotals>,
    pub status: String,
    pub budget: Option<u64>,
    pub allocations: Vec<(String, u64)>,
    /// `session_start` events seen.
    pub runs: u64,
    /// Events before this fold's first `session_start`: in a fold of the second
    /// half of a file they continue the first half's run.
    pub head: RunTotals,
    /// The latest runs, oldest first (at most `MAX_RUNS`).
    pub run_list: VecDeque<RunTotals>,
    pub runs_dropped: u64,
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
    pub window: RateWindow,
    /// The steps in flight (see [`OpenSteps`]).
    pub steps: OpenSteps,
    seconds: SecondCache,
    /// The last `last_n` valid lines, raw, with their offsets; their buffers
    /// are reused so folding allocates nothing per line.
    ring: VecDeque<(u64, Vec<u8>)>,
    ring_bytes: usize,
    ids: Cache<Ids>,
    pending: Cache<Pending>,
    bucket: Cache<BucketCache>,
}

impl FoldState {
    pub fn new(last_n: usize) -> Self {
        FoldState {
            last_n,
            lines: 0,
            entries: 0,
            malformed: 0,
            malformed_samples: Vec::new(),
            sample_oversize: Vec::new(),
            oversize_lines: 0,
            torn_tail: false,
            tokens: 0,
            event_counts: Names::default(),
            components: Names::default(),
            dropped_models: Names::default(),
            status: "waiting".to_string(),
            budget: None,
            allocations: Vec::new(),
            runs: 0,
            head: RunTotals::default(),
            run_list: VecDeque::new(),
            runs_dropped: 0,
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
            window: RateWindow::default(),
            steps: OpenSteps::default(),
            seconds: SecondCache::default(),
            ring: VecDeque::new(),
            ring_bytes: 0,
            ids: Cache::default(),
            pending: Cache::default(),
            bucket: Cache::default(),
        }
    }

    /// The session's per-(component, model) totals: its runs' (the dropped
    /// ones, the events before the first start, then each run kept), added in
    /// that order, which is the file's (the table's cap keeps the file's
    /// first pairs). Built when asked for: the fold updates only the run's
    /// table per line.
    pub fn models(&self) -> Names<ModelTotals> {
        let mut out = self.dropped_models.clone();
        for r in std::iter::once(&self.head).chain(self.run_list.iter()) {
            for (k, m) in r.models.iter() {
                out.slot(k).add(m);
            }
        }
        out
    }

    /// The fold with the calls of dead runs settled: a call the proxy started
    /// with a reservation and never ended, in a run that ended, that a later
    /// run followed, or (`writer_gone`: nobody holds the session's lock, or
    /// the caller holds it before its run starts) whose writer is gone, counts
    /// as a call of unknown usage holding its reservation (review 14, finding
    /// 2). The live run's calls stay in flight. Borrowed when nothing changes.
    pub fn settled(&self, writer_gone: bool) -> Cow<'_, FoldState> {
        let last = self.run_list.len();
        let dead = |i: usize, r: &RunTotals| i < last || r.ended_at.is_some() || writer_gone;
        let runs = std::iter::once(&self.head).chain(self.run_list.iter());
        if !runs
            .enumerate()
            .any(|(i, r)| dead(i, r) && r.calls.holding().next().is_some())
        {
            return Cow::Borrowed(self);
        }
        let mut st = self.clone();
        let FoldState {
            head,
            run_list,
            components,
            ..
        } = &mut st;
        for (i, r) in std::iter::once(head).chain(run_list.iter_mut()).enumerate() {
            if dead(i, r) {
                settle_calls(r, components);
            }
        }
        Cow::Owned(st)
    }

    /// The current run (the latest; before any `session_start`, run 0).
    pub fn run(&self) -> &RunTotals {
        self.run_list.back().unwrap_or(&self.head)
    }

    fn run_mut(&mut self) -> &mut RunTotals {
        self.run_list.back_mut().unwrap_or(&mut self.head)
    }

    /// Timestamp of the latest event of `run` (one of this fold's runs).
    pub fn last_at<'a>(&'a self, run: &'a RunTotals) -> Option<&'a str> {
        if std::ptr::eq(run, self.run()) {
            (run.events > 0)
                .then_some(self.last_timestamp.as_deref())
                .flatten()
        } else {
            run.last_at.as_deref()
        }
    }

    /// Whether a name table of this fold had to use `OTHER`.
    pub fn names_overflowed(&self) -> bool {
        self.event_counts.overflowed
            || self.components.overflowed
            || self.dropped_models.overflowed
            || self.head.components.overflowed
            || self.head.models.overflowed
            || self
                .run_list
                .iter()
                .any(|r| r.components.overflowed || r.models.overflowed)
    }

    /// Fold one line (without `\n`) found at `offset`.
    pub fn feed_line(&mut self, line: &[u8], offset: u64) {
        self.feed_line_in(line, offset, &[], None);
    }

    /// Fold one line found at `offset`; when the line lies in `block` (the
    /// buffer being folded), its copy for the last-N ring and the copy of its
    /// timestamp wait until [`FoldState::flush_block`].
    #[inline]
    fn feed_line_in(&mut self, line: &[u8], offset: u64, block: &[u8], ix: Option<&BlockIndex>) {
        self.lines += 1;
        let in_block = within(block, line);
        if let (Some(ix), Some(start)) = (ix, in_block) {
            // sigil's own layout, folded as it is read (the usual line).
            if let Some(l) = layout_block_line(block, ix, start, line.len()) {
                if self.feed_layout(&l, block, start) {
                    self.pend_line(offset, start, line.len());
                    return;
                }
            }
        }
        let mut at = [Pick::default(); META_KEYS.len()];
        let parsed = match (ix, in_block) {
            (Some(ix), Some(start)) => {
                parse_block_line(block, ix, start, line.len(), &FOLD_KEYS, &mut at)
            }
            _ => parse_line_picking(line, &FOLD_KEYS, &mut at),
        };
        match parsed {
            Ok((event, picks)) => {
                let (kind, slot) = self.kind_of(&event.event_type);
                let mut meta = FoldMeta::default();
                let fast = picks.is_some();
                fold_meta(&mut meta, &event, picks, kind);
                self.feed_event(&event, kind, slot, &meta, block);
                if fast && meta.allocations.is_none() {
                    // The fast path's values borrow the line (`plain_str`):
                    // nothing of `meta` owns memory, nothing to drop.
                    std::mem::forget(meta);
                }
                match in_block {
                    Some(start) => self.pend_line(offset, start, line.len()),
                    None => {
                        self.flush_block(block);
                        self.remember(line, offset);
                    }
                }
            }
            Err(reason) => self.note_malformed(offset, reason),
        }
    }

    /// The line at `start..start + len` of the block being folded is the
    /// latest valid one: kept as a position until the block is done.
    #[inline(always)]
    fn pend_line(&mut self, offset: u64, start: usize, len: usize) {
        if self.last_n > 0 {
            self.pending.0.lines.push((offset, start, len));
        }
    }

    /// Fold a line of sigil's own layout that lies in `block`, read by
    /// [`layout_block_line`], when its event type is one whose update needs
    /// only what [`Layout`] carries (steps started and completed, token counts
    /// and the event types the fold does not treat apart: almost every line). False,
    /// with nothing changed, for the others ([`FoldState::feed_event`]
    /// folds them). The update is [`FoldState::feed_event`]'s for these kinds.
    #[inline(always)]
    fn feed_layout(&mut self, l: &Layout<'_>, block: &[u8], start: usize) -> bool {
        let (kind, kind_slot) = match Kind::of_bytes(l.event_type.as_bytes()) {
            Kind::Other => self.kind_of(l.event_type),
            kind => {
                let known = &mut self.ids.0.known_slot[kind as usize];
                if *known == NONE {
                    *known = self.event_counts.slot_index(l.event_type) as u32;
                }
                (kind, *known as usize)
            }
        };
        let uses_meta = match kind {
            Kind::StepComplete | Kind::TokenConsumption => true,
            // A start's metadata counts only for its step, call and input hash.
            Kind::StepStart | Kind::Other => false,
            _ => return false,
        };
        // The timestamp's text starts at a fixed place in the layout.
        let ts_start = start + LAYOUT_TIMESTAMP_AT;
        debug_assert_eq!(
            within(block, l.timestamp.as_bytes()),
            Some(ts_start).filter(|_| !block.is_empty())
        );
        self.entries = self.entries.saturating_add(1);
        self.tokens = self.tokens.saturating_add(l.tokens);
        if self.first_timestamp.is_none() {
            self.first_timestamp = Some(l.timestamp.to_string());
        }
        self.pending.0.timestamp = Some((ts_start, l.timestamp.len()));
        let count = self.event_counts.at_mut(kind_slot);
        *count = count.saturating_add(1);
        self.track_seq(Some(l.seq));
        if let Some(second) = self.seconds.second(l.timestamp) {
            self.window.add(second, l.tokens);
        }
        let (latency, bucket) = match l.latency_ms.filter(|v| v.is_finite()) {
            Some(ms) if kind == Kind::StepComplete => (Some(ms), self.bucket.0.of(ms)),
            _ => (None, 0),
        };
        let step = if uses_meta {
            Step {
                tokens: l.tokens,
                input_tokens: l.input_tokens.unwrap_or(0),
                output_tokens: l.output_tokens.unwrap_or(0),
                model: l.model,
                cost: l.cost_nanousd,
                kind,
                latency,
                bucket,
                error: false,
                last_error: &None,
                unknown_usage: l.usage_unknown,
                tokens_held: l.tokens_held.unwrap_or(0),
                seq: Some(l.seq),
            }
        } else {
            Step {
                tokens: l.tokens,
                input_tokens: 0,
                output_tokens: 0,
                model: None,
                cost: None,
                kind,
                latency: None,
                bucket: 0,
                error: false,
                last_error: &None,
                unknown_usage: false,
                tokens_held: 0,
                seq: Some(l.seq),
            }
        };
        let (slot, run_slot) = self.component_slots(l.component);
        step.update(self.components.at_mut(slot));
        if matches!(kind, Kind::StepComplete | Kind::StepStart) && self.tracked(slot, l.component) {
            let slot = slot as u32;
            match kind {
                Kind::StepStart => {
                    self.steps
                        .start(slot, l.timestamp, l.message, Some(l.seq), l.attempt);
                }
                _ => self.steps.close(slot),
            }
        }
        let run = self.run_list.back_mut().unwrap_or(&mut self.head);
        let (name, c) = run.components.entry_mut(run_slot);
        step.update_run(c, name, &mut run.models);
        match kind {
            Kind::StepComplete => {
                // A proxy call's end closes its call (`metadata.call`).
                if let Some(call) = l.call {
                    run.calls.close(call);
                }
                if let Some(h) = l.output_sha256 {
                    run.steps.output(l.component, h);
                }
            }
            Kind::StepStart => {
                if let Some(call) = l.call {
                    run.calls.start(OpenCall {
                        call,
                        component: l.component.to_string(),
                        model: l.model.and_then(decode_str).map(|m| bounded(&m)),
                        reserved: l
                            .prompt_tokens_reserved
                            .unwrap_or(0)
                            .saturating_add(l.max_tokens.unwrap_or(0)),
                    });
                }
                if let Some(h) = l.input_sha256 {
                    run.steps.start(l.component, h, Some(l.seq));
                }
            }
            _ => {}
        }
        run.tokens = run.tokens.saturating_add(l.tokens);
        run.events = run.events.saturating_add(1);
        run.first_seq.get_or_insert(l.seq);
        run.last_seq = Some(l.seq);
        true
    }

    /// Copy out what [`FoldState::feed_line_in`] left as positions in `block`.
    fn flush_block(&mut self, block: &[u8]) {
        self.flush_timestamp(block);
        let mut lines = std::mem::take(&mut self.pending.0.lines);
        let skip = lines.len().saturating_sub(self.last_n);
        for &(offset, start, len) in &lines[skip..] {
            self.remember(&block[start..start + len], offset);
        }
        lines.clear();
        self.pending.0.lines = lines;
    }

    fn flush_timestamp(&mut self, block: &[u8]) {
        if let Some((start, len)) = self.pending.0.timestamp.take() {
            let last = self.last_timestamp.get_or_insert_with(String::new);
            last.clear();
            // The positions are those of a parsed timestamp's text (UTF-8).
            last.push_str(&String::from_utf8_lossy(&block[start..start + len]));
        }
    }

    /// An event type's kind and `event_counts` slot.
    #[inline]
    fn kind_of(&mut self, name: &str) -> (Kind, usize) {
        let ids = &mut self.ids.0;
        match ids.kinds.id(name.as_bytes()) {
            Some(id) => {
                if id == ids.kind_info.len() {
                    let slot = self.event_counts.slot_index(name);
                    ids.kind_info.push((Kind::of(name), slot as u32));
                }
                let (kind, slot) = ids.kind_info[id];
                (kind, slot as usize)
            }
            None => (Kind::of(name), self.event_counts.slot_index(name)),
        }
    }

    /// A component's slots in the fold's table and in the current run's.
    #[inline]
    fn component_slots(&mut self, name: &str) -> (usize, usize) {
        let ids = &mut self.ids.0;
        let Some(id) = ids.comps.id(name.as_bytes()) else {
            let slot = self.components.slot_index(name);
            let run = self.run_list.back_mut().unwrap_or(&mut self.head);
            return (slot, run.components.slot_index(name));
        };
        if id == ids.comp_slot.len() {
            ids.comp_slot.push(self.components.slot_index(name) as u32);
            ids.run_slot.push(NONE);
        }
        let mut run_slot = ids.run_slot[id];
        if run_slot == NONE {
            let run = self.run_list.back_mut().unwrap_or(&mut self.head);
            run_slot = run.components.slot_index(name) as u32;
            ids.run_slot[id] = run_slot;
        }
        (ids.comp_slot[id] as usize, run_slot as usize)
    }

    /// Whether the steps of `name`, whose slot is `slot`, are tracked (see
    /// [`OpenSteps`]): the table names it (it is not folded into `OTHER`).
    #[inline]
    fn tracked(&self, slot: usize, name: &str) -> bool {
        !self.components.overflowed || self.components.name_at(slot) == name
    }

    /// The step in flight: its component, and the step (see [`OpenSteps`]).
    pub fn in_flight(&self) -> Option<(&str, &OpenStep)> {
        let s = self.steps.latest()?;
        Some((self.components.name_at(s.slot as usize), s))
    }

    /// The current run changed: its slots are looked up again.
    fn new_current_run(&mut self) {
        self.ids.0.run_slot.fill(NONE);
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

    fn sample(&mut self, m: Malformed, oversize: bool) {
        if self.malformed_samples.len() < MAX_SAMPLES {
            self.malformed_samples.push(m);
            self.sample_oversize.push(oversize);
        }
    }

    pub fn note_malformed(&mut self, offset: u64, reason: String) {
        self.malformed = self.malformed.saturating_add(1);
        self.sample(Malformed { offset, reason }, false);
    }

    /// An oversize line is counted apart from malformed ones but sampled with them,
    /// so the monitor can show where it was.
    pub fn note_oversize(&mut self, offset: u64, len: u64) {
        self.oversize_lines = self.oversize_lines.saturating_add(1);
        self.lines = self.lines.saturating_add(1);
        let reason = format!("line of {len} bytes exceeds the line limit");
        self.sample(Malformed { offset, reason }, true);
    }

    fn start_run(&mut self, e: &RawEvent<'_>, meta: &FoldMeta<'_>) {
        self.runs = self.runs.saturating_add(1);
        // An undeclared run number follows the previous run's.
        let previous = self.run();
        let number = meta.run.unwrap_or(previous.number.saturating_add(1));
        let number_local = meta.run.is_none() && previous.number_local;
        if let Some(b) = meta.budget {
            self.budget = Some(b);
        }
        if let Some(a) = &meta.allocations {
            let mut a: Vec<(String, u64)> = a.iter().map(|(k, v)| (k.clone(), *v)).collect();
            a.sort();
            a.truncate(MAX_NAMES);
            self.allocations = a;
        }
        self.status = "running".to_string();
        self.push_run(RunTotals {
            number,
            number_local,
            started_at: Some(e.timestamp.to_string()),
            status: "running".to_string(),
            budget: self.budget,
            start_metadata: e.metadata.map(str::to_string),
            ..RunTotals::default()
        });
    }

    fn push_run(&mut self, run: RunTotals) {
        self.new_current_run();
        if self.run_list.len() >= MAX_RUNS {
            if let Some(mut old) = self.run_list.pop_front() {
                // A later run started: its calls never ended are held.
                settle_calls(&mut old, &mut self.components);
                for (k, m) in old.models.iter() {
                    self.dropped_models.slot(k).add(m);
                }
            }
            self.runs_dropped = self.runs_dropped.saturating_add(1);
        }
        self.run_list.push_back(run);
    }

    fn feed_event(
        &mut self,
        e: &RawEvent<'_>,
        kind: Kind,
        kind_slot: usize,
        meta: &FoldMeta<'_>,
        block: &[u8],
    ) {
        self.entries = self.entries.saturating_add(1);
        self.tokens = self.tokens.saturating_add(e.tokens);
        if self.first_timestamp.is_none() {
            self.first_timestamp = Some(e.timestamp.to_string());
        }
        if kind == Kind::SessionStart {
            // The run this start closes ended with the event before it.
            self.flush_timestamp(block);
            let before = self.last_timestamp.clone();
            let closing = self.run_mut();
            if closing.events > 0 {
                closing.last_at = before;
            }
        }
        // A timestamp in the block is copied out when the block is done.
        match within(block, e.timestamp.as_bytes()) {
            Some(start) => self.pending.0.timestamp = Some((start, e.timestamp.len())),
            None => {
                self.pending.0.timestamp = None;
                let last = self.last_timestamp.get_or_insert_with(String::new);
                last.clear();
                last.push_str(&e.timestamp);
            }
        }
        let count = self.event_counts.at_mut(kind_slot);
        *count = count.saturating_add(1);
        self.track_seq(e.seq);
        if let Some(second) = self.seconds.second(&e.timestamp) {
            self.window.add(second, e.tokens);
        }

        match kind {
            Kind::SessionStart => self.start_run(e, meta),
            Kind::SessionComplete | Kind::SessionError => {
                let status = match (kind, meta.status.as_deref()) {
                    (_, Some(s)) if FINAL_STATUSES.contains(&s) => s.to_string(),
                    (Kind::SessionComplete, _) => "complete".to_string(),
                    _ => "error".to_string(),
                };
                let reason = meta
                    .reason
                    .as_deref()
                    .or(meta.error.as_deref())
                    .map(bounded);
                self.status.clone_from(&status);
                let run = self.run_mut();
                run.status = status;
                run.reason = reason;
                run.ended_at = Some(e.timestamp.to_string());
            }
            Kind::EventsDropped => {
                self.dropped_events = self
                    .dropped_events
                    .saturating_add(meta.dropped.unwrap_or(0));
            }
            _ => {}
        }

        let latency = meta.latency_ms.filter(|v| v.is_finite());
        let bucket = match (kind, latency) {
            (Kind::StepComplete, Some(ms)) => latency_bucket(ms),
            _ => 0,
        };
        let error = match kind {
            Kind::StepError => true,
            Kind::RetryAttempt => meta.resume != Some(true),
            _ => false,
        };
        let last_error = error.then(|| LastError {
            event_type: e.event_type.to_string(),
            category: meta.category.as_deref().map(bounded),
            message: bounded(meta.error.as_deref().unwrap_or(&e.message)),
            attempt: meta.attempt,
            timestamp: e.timestamp.to_string(),
        });
        // A step_start's metadata counts only for its input hash (its other
        // keys are not the model's: the reference reads none of them).
        let counted = kind != Kind::StepStart;
        let step = Step {
            tokens: e.tokens,
            input_tokens: meta.input_tokens.filter(|_| counted).unwrap_or(0),
            output_tokens: meta.output_tokens.filter(|_| counted).unwrap_or(0),
            model: meta.model.as_deref().filter(|_| counted),
            cost: meta.cost.filter(|_| counted),
            kind,
            latency,
            bucket,
            error,
            last_error: &last_error,
            unknown_usage: meta.usage_unknown && counted,
            tokens_held: meta.tokens_held.filter(|_| counted).unwrap_or(0),
            seq: e.seq,
        };
        let (slot, run_slot) = self.component_slots(&e.component);
        step.update(self.components.at_mut(slot));
        match kind {
            Kind::SessionStart | Kind::SessionComplete | Kind::SessionError => self.steps.clear(),
            Kind::StepStart | Kind::StepComplete | Kind::StepError | Kind::RetryAttempt
                if self.tracked(slot, &e.component) =>
            {
                let slot = slot as u32;
                match kind {
                    Kind::StepStart => {
                        self.steps
                            .start(slot, &e.timestamp, &e.message, e.seq, meta.attempt);
                    }
                    Kind::RetryAttempt => self.steps.retry(slot),
                    _ => self.steps.close(slot),
                }
            }
            _ => {}
        }
        let run = self.run_list.back_mut().unwrap_or(&mut self.head);
        let (name, c) = run.components.entry_mut(run_slot);
        step.update_run(c, name, &mut run.models);
        if let Some(call) = meta.call {
            match kind {
                Kind::StepStart => run.calls.start(OpenCall {
                    call,
                    component: e.component.to_string(),
                    model: meta
                        .model
                        .as_deref()
                        .and_then(decode_str)
                        .map(|m| bounded(&m)),
                    reserved: meta
                        .prompt_tokens_reserved
                        .unwrap_or(0)
                        .saturating_add(meta.max_tokens.unwrap_or(0)),
                }),
                Kind::StepComplete | Kind::StepError => run.calls.close(call),
                _ => {}
            }
        }
        match (kind, &meta.input_sha256, &meta.output_sha256) {
            (Kind::StepStart, Some(h), _) => run.steps.start(&e.component, h, e.seq),
            (Kind::StepComplete, _, Some(h)) => run.steps.output(&e.component, h),
            _ => {}
        }
        run.tokens = run.tokens.saturating_add(e.tokens);
        run.events = run.events.saturating_add(1);
        if let Some(seq) = e.seq {
            run.first_seq.get_or_insert(seq);
            run.last_seq = Some(seq);
        }
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

    /// Count a gap or a regression between the previous seq and `seq`. No
    /// `last + 1`: a seq of 2^64-1 must not overflow (issue 9, defect 5).
    fn check_seq_step(&mut self, seq: u64) {
        if let Some(last) = self.last_seq {
            if seq > last {
                let missing = seq - last - 1;
                if missing > 0 {
                    self.seq_gaps = self.seq_gaps.saturating_add(1);
                    self.seq_missing = self.seq_missing.saturating_add(missing);
                    if self.gap_samples.len() < MAX_SAMPLES {
                        self.gap_samples.push((last, seq));
                    }
                }
            } else {
                self.seq_regressions = self.seq_regressions.saturating_add(1);
            }
        }
    }

    /// Append the fold of what directly follows this fold's input. The result
    /// equals one fold of both inputs, unless `b` had to fold names into
    /// `OTHER` (see [`FoldState::names_overflowed`]): which names a table
    /// keeps depends on the names before `b`, so such a part is refolded.
    pub fn merge(&mut self, b: FoldState) {
        self.lines = self.lines.saturating_add(b.lines);
        self.entries = self.entries.saturating_add(b.entries);
        self.malformed = self.malformed.saturating_add(b.malformed);
        self.oversize_lines = self.oversize_lines.saturating_add(b.oversize_lines);
        self.tokens = self.tokens.saturating_add(b.tokens);
        self.dropped_events = self.dropped_events.saturating_add(b.dropped_events);
        self.torn_tail = b.torn_tail;
        for (m, o) in b.malformed_samples.into_iter().zip(b.sample_oversize) {
            self.sample(m, o);
        }
        for (k, v) in b.event_counts.iter() {
            let c = self.event_counts.slot(k);
            *c = c.saturating_add(*v);
        }
        for (k, c) in b.components.iter() {
            self.components.slot(k).add(c);
        }
        let names = &self.components;
        let slot_of = |i: u32| {
            names
                .position(b.components.name_at(i as usize))
                .map(|j| j as u32)
        };
        self.steps.merge(b.steps, slot_of);
        for (k, m) in b.dropped_models.iter() {
            self.dropped_models.slot(k).add(m);
        }
        let last_of_a = self.last_timestamp.clone();
        let current = self.run_mut();
        current.absorb(&b.head);
        if b.runs > 0 && current.events > 0 {
            // `b` starts a run: this one ended with b's head, or with a's last event.
            current.last_at = if b.head.events > 0 {
                b.head.last_at.clone()
            } else {
                last_of_a
            };
        }
        let offset = self.run().number;
        let chained = self.run().number_local;
        for mut run in b.run_list {
            if run.number_local {
                run.number = run.number.saturating_add(offset);
                run.number_local = chained;
            }
            if run.budget.is_none() {
                run.budget = self.budget;
            }
            self.push_run(run);
        }
        self.runs = self.runs.saturating_add(b.runs);
        self.runs_dropped = self.runs_dropped.saturating_add(b.runs_dropped);
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
        self.seq_gaps = self.seq_gaps.saturating_add(b.seq_gaps);
        self.seq_missing = self.seq_missing.saturating_add(b.seq_missing);
        self.seq_regressions = self.seq_regressions.saturating_add(b.seq_regressions);
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
        self.window.merge(&b.window);
        for (off, line) in b.ring {
            self.remember(&line, off);
        }
        self.new_current_run();
    }
}

/// Where `part` starts in `block`, when it lies inside it.
#[inline]
fn within(block: &[u8], part: &[u8]) -> Option<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(block.as_ptr() as usize);
    (start <= block.len() && part.len() <= block.len() - start && !block.is_empty())
        .then_some(start)
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

    pub fn feed(&mut self, data: &[u8], out: impl FnMut(Piece<'_>)) {
        self.feed_at(data, memchr::memchr_iter(b'\n', data), out);
    }

    /// [`LineSplitter::feed`] with the positions of `data`'s newlines, in
    /// order, already known (a [`BlockIndex`]).
    #[inline]
    pub fn feed_at(
        &mut self,
        data: &[u8],
        newlines: impl Iterator<Item = usize>,
        mut out: impl FnMut(Piece<'_>),
    ) {
        let base = self.position;
        self.position += data.len() as u64;
        let mut start = 0usize;
        for nl in newlines {
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
    // One read buffer and block index per thread, reused from fold to fold: a
    // listing folds a thousand small files per thread, and a fresh 128 KiB
    // buffer each (an mmap and its page faults) cost about a tenth of a small
    // fold. A nested fold on the same thread (none today) gets its own.
    thread_local! {
        static SCRATCH: std::cell::RefCell<(Vec<u8>, BlockIndex)> =
            std::cell::RefCell::new((Vec::new(), BlockIndex::new()));
    }
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            let (buf, ix) = &mut *scratch;
            buf.resize(READ_CHUNK, 0);
            fold_reader_with(fold, reader, start, max_line, buf, ix)
        }
        Err(_) => {
            let (mut buf, mut ix) = (vec![0u8; READ_CHUNK], BlockIndex::new());
            fold_reader_with(fold, reader, start, max_line, &mut buf, &mut ix)
        }
    })
}

fn fold_reader_with(
    fold: &mut FoldState,
    reader: &mut impl Read,
    start: u64,
    max_line: usize,
    buf: &mut [u8],
    ix: &mut BlockIndex,
) -> io::Result<u64> {
    let mut splitter = LineSplitter::new(max_line, start);
    loop {
        let n = match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let block = &buf[..n];
        ix.index(block);
        splitter.feed_at(block, ix.newlines(), |piece| match piece {
            Piece::Line(line, off) => fold.feed_line_in(line, off, block, Some(&*ix)),
            Piece::Oversize(off, len) => fold.note_oversize(off, len),
        });
        fold.flush_block(block);
    }
    fold.torn_tail = splitter.pending() > 0;
    Ok(splitter.line_start())
}

/// Files smaller than this are folded on one thread.
pub const PARALLEL_MIN_BYTES: u64 = 8 << 20;
/// A large fold is cut into this many parts per thread ...
const PARTS_PER_THREAD: u64 = 4;
/// ... of at least this size.
const MIN_PART_BYTES: u64 = 1 << 20;

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
    // More parts than threads, taken in turn by whichever thread is free: a
    // thread that gets less of the CPU (a busy machine) folds fewer parts
    // instead of holding up the whole fold. The parts merge in file order.
    let parts_n = (threads as u64 * PARTS_PER_THREAD)
        .min(span / MIN_PART_BYTES)
        .max(threads as u64);
    let mut cuts = vec![start];
    for i in 1..parts_n {
        let at = next_line_start(file, start + span * i / parts_n, len)?;
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
    type Part = Option<io::Result<(FoldState, u64)>>;
    let results: Vec<std::sync::Mutex<Part>> =
        ranges.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.min(ranges.len()))
            .map(|_| {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(lo, hi)) = ranges.get(i) else {
                        return;
                    };
                    let mut part = FoldState::new(last_n);
                    let mut r = At {
                        file,
                        pos: lo,
                        end: hi,
                    };
                    let got = fold_reader(&mut part, &mut r, lo, max_line).map(|at| (part, at));
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(got);
                    }
                })
            })
            .collect();
        for h in handles {
            // A panicked thread leaves its parts empty: reported below.
            let _ = h.join();
        }
    });
    let parts = results.into_iter().map(|m| {
        m.into_inner()
            .ok()
            .flatten()
            .unwrap_or_else(|| Err(io::Error::other("fold thread panicked")))
    });
    let mut resume = start;
    for ((lo, _), part) in ranges.iter().zip(parts) {
        let (part, r) = part?;
        if fold.lines > 0 && part.names_overflowed() {
            // The names this part folded into `OTHER` depend on the names
            // before it: fold the rest again in order (a log with over
            // MAX_NAMES names; issue 9, defect 9).
            let mut rest = At {
                file,
                pos: *lo,
                end,
            };
            return fold_reader(fold, &mut rest, *lo, max_line);
        }
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
        // One rule: operations are successful steps, errors failed ones; the
        // latency a failed step reports is kept apart.
        assert_eq!((r.tokens, r.operations, r.errors, r.timed), (107, 1, 1, 0));
        assert_eq!((r.latency_ms, r.failed_latency_ms), (0.0, 3.0));
        assert_eq!(r.average_latency_ms(), None);
        assert_eq!(f.components["routing"].latency_ms, 12.5);
        assert_eq!((f.seq_gaps, f.seq_missing, f.max_seq), (1, 1, Some(6)));
        assert_eq!(f.gap_samples, vec![(3, 5)]);
        let last = f.last_entries();
        assert_eq!(last.len(), 3);
        assert_eq!(last[2].event_type, "session_complete");
        assert_eq!(last[0].seq, Some(3));
        assert_eq!(f.run().number, 1);
        assert_eq!(f.run().tokens, 157);
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
        // The model's other inputs: retries, errors with reasons, usage, models.
        lines.extend([
            line("session_start", "orchestrator", 0, 12, "{}"),
            line(
                "retry_attempt",
                "reasoning",
                0,
                13,
                r#"{"error":"timeout","category":"network","attempt":1}"#,
            ),
            line(
                "token_consumption",
                "reasoning",
                40,
                14,
                r#"{"input_tokens":30,"output_tokens":10,"model":"m1"}"#,
            ),
            line(
                "step_complete",
                "reasoning",
                60,
                15,
                r#"{"latency_ms":250,"input_tokens":50,"output_tokens":10,"model":"m2"}"#,
            ),
            line("retry_attempt", "orchestrator", 0, 16, r#"{"resume":true}"#),
            line(
                "session_error",
                "orchestrator",
                0,
                17,
                r#"{"status":"interrupted","reason":"SIGTERM"}"#,
            ),
            // Issue 13: per-model totals and calls with unknown usage.
            line(
                "step_complete",
                "reasoning",
                0,
                18,
                r#"{"latency_ms":5,"model":"m1","usage":"unknown","tokens_held":40}"#,
            ),
            line(
                "step_error",
                "planning",
                3,
                19,
                r#"{"model":"m1","cost_usd":0.5,"usage":"unknown", "tokens_held": 7}"#,
            ),
            // Issue 13: a step started three times with one input (a loop),
            // and the output hashes of steps.
            line("step_start", "planning", 0, 20, r#"{"input_sha256":"h1"}"#),
            line("step_start", "planning", 0, 21, r#"{"input_sha256":"h1"}"#),
            line(
                "step_complete",
                "planning",
                1,
                22,
                r#"{"output_sha256":"o1"}"#,
            ),
            line("step_start", "planning", 0, 23, r#"{"input_sha256":"h1"}"#),
            line("step_start", "memory", 0, 24, r#"{"input_sha256":"h1"}"#),
            line(
                "step_complete",
                "memory",
                1,
                25,
                r#"{"output_sha256":"o2"}"#,
            ),
        ]);
        lines.join("\n") + "\n"
    }

    #[test]
    fn the_sessions_models_count_the_runs_dropped_too() {
        let mut data = String::new();
        for i in 0..(MAX_RUNS as u64 + 3) {
            data.push_str(&line("session_start", "orchestrator", 0, 2 * i, "{}"));
            data.push('\n');
            let meta = r#"{"model":"m1","usage":"unknown"}"#;
            data.push_str(&line("step_complete", "planning", 2, 2 * i + 1, meta));
            data.push('\n');
        }
        let mut f = FoldState::new(0);
        fold_reader(&mut f, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        assert_eq!(f.runs_dropped, 3);
        let models = f.models();
        let m = models.get(&model_key("planning", "m1")).unwrap();
        assert_eq!((m.calls, m.tokens, m.unknown_usage), (1003, 2006, 1003));
        assert_eq!(f.components["planning"].unknown_usage, 1003);
    }

    #[test]
    fn first_seqs_keep_the_first_n_and_merge_exactly() {
        let seqs: Vec<u64> = (0..12).map(|i| (i * 7) % 5).collect();
        let mut whole = FirstSeqs::default();
        seqs.iter().for_each(|&s| whole.observe(Some(s)));
        whole.observe(None);
        assert_eq!(whole.seqs(), &seqs[..FIRST_SEQS]);
        for cut in 0..=seqs.len() {
            let (mut a, mut b) = (FirstSeqs::default(), FirstSeqs::default());
            seqs[..cut].iter().for_each(|&s| a.observe(Some(s)));
            seqs[cut..].iter().for_each(|&s| b.observe(Some(s)));
            a.merge(&b);
            assert_eq!(a, whole, "cut at {cut}");
        }
    }

    #[test]
    fn heaviest_calls_keep_the_first_n_and_merge_exactly() {
        // (tokens, seq) in a made-up order, with ties and a repeated call.
        let calls: Vec<(u64, u64)> = (0..40u64)
            .map(|i| ((i * 37) % 11 * 10, i % 13))
            .chain([(100, 3), (100, 3), (0, 0)])
            .collect();
        let mut expected = calls.clone();
        expected.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        expected.truncate(HEAVIEST_CALLS);
        let mut whole = HeaviestCalls::default();
        for &(t, s) in &calls {
            whole.observe(t, Some(s));
        }
        whole.observe(1_000, None); // no seq: not an event to show
        assert_eq!(whole.calls(), expected.as_slice());
        for cut in 0..=calls.len() {
            let (mut a, mut b) = (HeaviestCalls::default(), HeaviestCalls::default());
            calls[..cut]
                .iter()
                .for_each(|&(t, s)| a.observe(t, Some(s)));
            calls[cut..]
                .iter()
                .for_each(|&(t, s)| b.observe(t, Some(s)));
            a.merge(&b);
            assert_eq!(a, whole, "cut at {cut}");
        }
    }

    #[test]
    fn merging_split_folds_equals_one_fold() {
        let data = busy_session();
        let mut whole = FoldState::new(4);
        fold_reader(&mut whole, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        assert_eq!(whole.runs, 4);
        let numbers: Vec<u64> = whole.run_list.iter().map(|r| r.number).collect();
        assert_eq!(numbers, vec![1, 5, 6, 7]); // counted after an explicit run 5
        let r = whole.run();
        assert_eq!(
            (r.status.as_str(), r.reason.as_deref()),
            ("interrupted", Some("SIGTERM"))
        );
        let c = &whole.components["reasoning"];
        assert_eq!((c.retries, c.errors, c.operations), (1, 1, 2));
        assert_eq!((c.input_tokens, c.output_tokens), (80, 20));
        assert_eq!(c.model.as_deref(), Some("m1"));
        assert_eq!(c.unknown_usage, 1);
        assert_eq!(whole.components["planning"].unknown_usage, 1);
        // Issue 14: the budget held for calls of unknown usage.
        assert_eq!(c.tokens_held, 40);
        assert_eq!(whole.components["planning"].tokens_held, 7);
        let held: Vec<u64> = whole
            .run()
            .components
            .iter()
            .map(|(_, c)| c.tokens_held)
            .collect();
        assert_eq!(held.iter().sum::<u64>(), 47);
        let models = whole.models();
        let m1 = models.get(&model_key("reasoning", "m1")).unwrap();
        assert_eq!((m1.tokens, m1.input_tokens, m1.calls), (40, 30, 1));
        assert_eq!((m1.errors, m1.unknown_usage, m1.tokens_held), (0, 1, 40));
        assert_eq!((m1.cost_nanousd, m1.priced_events), (0, 0));
        assert_eq!((m1.unpriced_tokens, m1.unpriced_calls), (40, 1));
        let p1 = models.get(&model_key("planning", "m1")).unwrap();
        assert_eq!(
            (p1.tokens, p1.calls, p1.errors, p1.unknown_usage),
            (3, 1, 1, 1)
        );
        assert_eq!((p1.cost_nanousd, p1.priced_events), (500_000_000, 1));
        let m2 = models.get(&model_key("reasoning", "m2")).unwrap();
        assert_eq!((m2.tokens, m2.calls, m2.output_tokens), (60, 1, 10));
        let run_p1 = whole.run().models.get(&model_key("planning", "m1"));
        assert_eq!(run_p1.map(|m| m.calls), Some(1));
        assert!(whole.run_list[0].models.is_empty());
        assert_eq!(split_model_key(&model_key("a", "b")), ("a", "b"));
        assert_eq!(split_model_key(OTHER), (OTHER, OTHER));
        let steps = &whole.run().steps;
        let loops: Vec<_> = steps.loops().collect();
        assert_eq!(loops.len(), 1);
        assert_eq!(
            (loops[0].0.as_str(), loops[0].2, loops[0].3.clone()),
            ("planning", 3, vec![20, 21, 23])
        );
        let outputs: Vec<(&str, &str)> = steps
            .outputs
            .iter()
            .map(|(c, h)| (c.as_str(), h.as_str()))
            .collect();
        assert_eq!(outputs, [("planning", "o1"), ("memory", "o2")]);
        assert_eq!(c.last_error.as_ref().map(|e| e.attempt), Some(Some(1)));
        assert_eq!(whole.components["orchestrator"].retries, 0);
        // Issue 12: planning restarted after its step_complete, memory closed.
        let (c, s) = whole.in_flight().unwrap();
        assert_eq!((c, s.seq, s.attempt), ("planning", Some(23), 1));
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

    /// Every split of `data` in three parts, merged, equals one fold of it.
    fn assert_every_split_equals_one_fold(data: &str, last_n: usize) -> FoldState {
        let mut whole = FoldState::new(last_n);
        fold_reader(&mut whole, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        let starts: Vec<usize> = std::iter::once(0)
            .chain(data.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        for &a in &starts {
            for &b in starts.iter().filter(|&&b| b >= a) {
                let mut merged = FoldState::new(last_n);
                for (lo, hi) in [(0, a), (a, b), (b, data.len())] {
                    let mut part = FoldState::new(last_n);
                    fold_reader(&mut part, &mut &data.as_bytes()[lo..hi], lo as u64, 1 << 20)
                        .unwrap();
                    merged.merge(part);
                }
                assert_eq!(merged, whole, "split at {a} and {b}");
            }
        }
        whole
    }

    /// Review 14, finding 2: a proxy run killed with calls in flight.
    fn killed_proxy_session() -> String {
        let start = |seq, call, reserved: &str| {
            line(
                "step_start",
                "m",
                0,
                seq,
                &format!(r#"{{"run":1,"call":{call},"model":"m",{reserved}}}"#),
            )
        };
        [
            line(
                "session_start",
                "orchestrator",
                0,
                0,
                r#"{"run":1,"budget":1000}"#,
            ),
            start(1, 1, r#""max_tokens":50,"prompt_tokens_reserved":10"#),
            start(2, 2, r#""max_tokens":40"#),
            start(3, 3, r#""prompt_tokens_reserved":0"#), // a refusal's start: nothing reserved
            line("step_error", "m", 0, 4, r#"{"run":1,"call":3,"model":"m"}"#),
            line(
                "step_complete",
                "m",
                30,
                5,
                r#"{"run":1,"call":1,"model":"m","input_tokens":10,"output_tokens":20}"#,
            ),
            start(6, 4, r#""max_tokens":7,"prompt_tokens_reserved":3"#),
            // killed here: calls 2 and 4 never end
        ]
        .join("\n")
            + "\n"
    }

    #[test]
    fn calls_a_dead_run_left_unended_hold_their_reservations() {
        let data = killed_proxy_session();
        let whole = assert_every_split_equals_one_fold(&data, 0);
        assert_eq!(
            whole
                .run()
                .calls
                .holding()
                .map(|c| c.call)
                .collect::<Vec<_>>(),
            [2, 4]
        );
        // Live: in flight, not held.
        let live = whole.settled(false);
        assert!(matches!(live, Cow::Borrowed(_)));
        assert_eq!(live.components["m"].tokens_held, 0);
        // The writer is gone: held, unknown usage, per component, model and run.
        let gone = whole.settled(true);
        let c = &gone.components["m"];
        assert_eq!((c.unknown_usage, c.tokens_held, c.tokens), (2, 50, 30));
        let r = gone.run();
        assert_eq!(r.components["m"].tokens_held, 50);
        assert!(r.calls.open.is_empty());
        let m = &gone.models()[&model_key("m", "m")];
        assert_eq!((m.unknown_usage, m.tokens_held), (2, 50));
        // A later run started (or the run ended): dead whatever the lock says.
        for tail in [
            line("session_start", "orchestrator", 0, 7, r#"{"run":2}"#),
            line(
                "session_error",
                "orchestrator",
                0,
                7,
                r#"{"status":"error"}"#,
            ),
        ] {
            let next = format!("{data}{tail}\n");
            let f = assert_every_split_equals_one_fold(&next, 0);
            let s = f.settled(false);
            let c = &s.components["m"];
            assert_eq!((c.unknown_usage, c.tokens_held), (2, 50));
            let first = s.run_list.iter().find(|r| r.number == 1).unwrap();
            assert_eq!(first.components["m"].unknown_usage, 2);
        }
    }

    /// Step starts (the proxy's, with a call and its reservation, and the
    /// orchestrator's, with an input hash and an attempt) are folded by the
    /// layout reader, and open their step and call as the general path does.
    #[test]
    fn a_step_start_takes_the_layout_path_and_opens_its_step_and_call() {
        let starts = [
            r#"{"run":1,"call":7,"endpoint":"/v1/chat/completions","model":"gpt-4o-mini","stream":false,"max_tokens":1024,"prompt_tokens_reserved":350}"#,
            r#"{"run":1,"input_sha256":"0f3a9c5e"}"#,
            r#"{"attempt":3,"input_sha256":"ab","call":7,"model":5,"max_tokens":"9"}"#,
            r#"{"attempt":"2","input_sha256":7,"call":"7","prompt_tokens_reserved":-1}"#,
            r#"{"call":7,"max_tokens":18446744073709551615,"prompt_tokens_reserved":5}"#,
            r#"{}"#,
        ];
        for meta in starts {
            let start = line("step_start", "m", 0, 1, meta);
            let block = format!("{start}\n");
            let mut ix = BlockIndex::new();
            ix.index(block.as_bytes());
            let l = layout_block_line(block.as_bytes(), &ix, 0, start.len())
                .unwrap_or_else(|| panic!("not a layout line: {start}"));
            let mut fold = FoldState::new(0);
            assert!(fold.feed_layout(&l, block.as_bytes(), 0), "{start}");
            // Started twice (a retry's new start), then completed: by block and
            // line by line.
            let data = [
                line("session_start", "orchestrator", 0, 0, r#"{"run":1}"#),
                start.clone(),
                line("retry_attempt", "m", 0, 2, "{}"),
                line("step_start", "m", 0, 3, meta),
                line(
                    "step_complete",
                    "m",
                    5,
                    4,
                    r#"{"call":7,"output_sha256":"cd"}"#,
                ),
                start.clone(),
            ]
            .join("\n")
                + "\n";
            let whole = assert_every_split_equals_one_fold(&data, 0);
            let mut by_line = FoldState::new(0);
            let mut offset = 0;
            for l in data.lines() {
                by_line.feed_line(l.as_bytes(), offset);
                offset += l.len() as u64 + 1;
            }
            assert!(whole == by_line, "{start}");
            let opened = serde_json::from_str::<serde_json::Value>(meta).unwrap()["call"] == 7;
            // Two starts open it twice, the completion closes the latest.
            assert_eq!(
                whole.run().calls.open.len(),
                2 * usize::from(opened),
                "{start}"
            );
            assert_eq!(
                whole.in_flight().map(|(c, s)| (c, s.seq)),
                Some(("m", Some(1)))
            );
        }
    }

    /// A proxy's `step_complete` (it carries `metadata.call`) is folded by the
    /// layout reader, as the orchestrator's are, and closes its call there
    /// exactly as the general path closes it.
    #[test]
    fn a_proxy_step_complete_takes_the_layout_path_and_closes_its_call() {
        let ends = [
            r#"{"run":1,"call":7,"endpoint":"/v1/chat/completions","model":"gpt-4o-mini","stream":false,"latency_ms":812.347,"status":200,"max_tokens":1024,"input_tokens":301,"output_tokens":21,"cost_usd":0.00005775}"#,
            r#"{"run":1,"call":7,"model":"m","latency_ms":3.5,"status":200,"usage":"unknown","tokens_held":1374}"#,
            r#"{"call":"7","call":7}"#,
            r#"{"call":7,"call":"7"}"#,
            r#"{"call":-7}"#,
            r#"{"call":7.0,"model":"m"}"#,
            r#"{"call":18446744073709551615}"#,
            r#"{"call":18446744073709551616}"#,
            r#"{"call":null}"#,
            r#"{"call":[7]}"#,
        ];
        for meta in ends {
            let end = line("step_complete", "m", 322, 2, meta);
            // The fold's own path: the line inside an indexed block.
            let block = format!("{end}\n");
            let mut ix = BlockIndex::new();
            ix.index(block.as_bytes());
            let l = layout_block_line(block.as_bytes(), &ix, 0, end.len())
                .unwrap_or_else(|| panic!("not a layout line: {end}"));
            let mut fold = FoldState::new(0);
            assert!(fold.feed_layout(&l, block.as_bytes(), 0), "{end}");

            // The same call started, then ended: by block and line by line.
            let data = [
                line("session_start", "orchestrator", 0, 0, r#"{"run":1}"#),
                line(
                    "step_start",
                    "m",
                    0,
                    1,
                    r#"{"run":1,"call":7,"model":"m","max_tokens":50}"#,
                ),
                end.clone(),
            ]
            .join("\n")
                + "\n";
            let whole = assert_every_split_equals_one_fold(&data, 0);
            let mut by_line = FoldState::new(0);
            let mut offset = 0;
            for l in data.lines() {
                by_line.feed_line(l.as_bytes(), offset);
                offset += l.len() as u64 + 1;
            }
            assert!(whole == by_line, "{end}");
            let closed = serde_json::from_str::<serde_json::Value>(meta).unwrap()["call"] == 7;
            assert_eq!(whole.run().calls.open.is_empty(), closed, "{end}");
        }
    }

    /// Issue 12: steps opened, restarted, retried and closed across runs.
    fn steps_session() -> String {
        let lines = [
            line("retry_attempt", "reasoning", 0, 0, "{}"), // nothing open
            line("step_start", "routing", 0, 1, "{}"),      // before any run
            line("retry_attempt", "routing", 0, 2, "{}"),
            line("step_start", "planning", 0, 3, r#"{"attempt":3}"#),
            line("retry_attempt", "memory", 0, 4, "{}"),
            line("step_complete", "routing", 1, 5, "{}"),
            line("step_start", "routing", 0, 6, "{}"),
            line("step_start", "memory", 0, 7, r#"{"attempt":2}"#),
            line("retry_attempt", "memory", 0, 8, r#"{"attempt":1}"#),
            line("step_start", "memory", 0, 9, r#"{"attempt":2}"#),
            line("step_start", "planning", 0, 10, r#"{"attempt":1}"#),
            line("retry_attempt", "planning", 0, 11, "{}"),
            line("step_start", "planning", 0, 12, r#"{"attempt":9}"#),
            line("token_consumption", "validation", 5, 13, "{}"),
            line("step_error", "memory", 0, 14, "{}"),
            line("session_start", "orchestrator", 0, 15, "{}"),
            line("step_start", "reasoning", 0, 16, "{}"),
            line("retry_attempt", "reasoning", 0, 17, "{}"),
            line("step_start", "validation", 0, 18, "{}"),
            line("step_complete", "validation", 3, 19, "{}"),
            line("step_start", "memory", 0, 20, r#"{"attempt":4}"#),
            line("session_complete", "orchestrator", 0, 21, "{}"),
            line("step_start", "routing", 0, 22, "{}"),
            line("session_start", "orchestrator", 0, 23, "{}"),
            line("step_start", "reasoning", 0, 24, r#"{"attempt":2}"#),
            line("step_start", "planning", 0, 25, "{}"),
            line("retry_attempt", "reasoning", 0, 26, "{}"),
            line("step_start", "reasoning", 0, 27, "{}"),
            line("step_start", "memory", 0, 28, "{}"),
            line("step_error", "memory", 0, 29, "{}"),
        ];
        lines.join("\n") + "\n"
    }

    #[test]
    fn the_step_in_flight_is_the_rule_on_every_event_and_splits_merge_exactly() {
        let data = steps_session();
        let events: Vec<Event> = data
            .lines()
            .map(|l| parse_line(l.as_bytes()).unwrap().to_owned_event(0))
            .collect();
        let prefix: Vec<&str> = data.lines().collect();
        for n in 0..=prefix.len() {
            let part = prefix[..n]
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>();
            // A fold keeping no events at all still knows the step in flight.
            let whole = assert_every_split_equals_one_fold(&part, 0);
            let want = crate::snapshot::step_in_flight(&events[..n]);
            let got = whole
                .in_flight()
                .map(|(c, s)| (c.to_string(), s.started_at.clone(), s.attempt));
            assert_eq!(
                got,
                want.map(|f| (f.component, f.started_at, f.attempt)),
                "after {n} events"
            );
        }
        let whole = assert_every_split_equals_one_fold(&data, 3);
        let (c, s) = whole.in_flight().unwrap();
        // reasoning: started at 24 (attempt 2), retried (3), restarted: planning is older.
        assert_eq!((c, s.attempt, s.seq), ("reasoning", 3, Some(24)));
        let open: Vec<&str> = whole
            .steps
            .open()
            .iter()
            .map(|s| whole.components.name_at(s.slot as usize))
            .collect();
        assert_eq!(open, ["planning", "reasoning"]);
    }

    #[test]
    fn a_step_started_before_a_burst_of_events_is_still_in_flight() {
        let mut data = line("session_start", "orchestrator", 0, 0, "{}") + "\n";
        data += &(line("step_start", "reasoning", 0, 1, r#"{"attempt":2}"#) + "\n");
        for i in 0..500 {
            data += &(line("token_consumption", "memory", 1, 2 + i, "{}") + "\n");
        }
        let mut f = FoldState::new(10);
        fold_reader(&mut f, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        let (c, s) = f.in_flight().unwrap();
        assert_eq!((c, s.attempt, s.seq), ("reasoning", 2, Some(1)));
        data += &(line("step_complete", "reasoning", 1, 502, "{}") + "\n");
        let mut f = FoldState::new(10);
        fold_reader(&mut f, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        assert!(f.in_flight().is_none());
    }

    #[test]
    fn steps_of_names_folded_into_other_are_not_tracked() {
        let mut data = String::new();
        for i in 0..MAX_NAMES {
            data += &(line("token_consumption", &format!("c{i}"), 1, i as u64, "{}") + "\n");
        }
        data += &(line("step_start", "late", 0, 300, "{}") + "\n");
        data += &(line("step_start", OTHER, 0, 301, "{}") + "\n");
        data += &(line("step_start", "c7", 0, 302, "{}") + "\n");
        data += &(line("step_complete", "later", 0, 303, "{}") + "\n");
        let mut f = FoldState::new(0);
        fold_reader(&mut f, &mut data.as_bytes(), 0, 1 << 20).unwrap();
        let open: Vec<&str> = f
            .steps
            .open()
            .iter()
            .map(|s| f.components.name_at(s.slot as usize))
            .collect();
        assert_eq!(open, [OTHER, "c7"]);
        // Split after the names: each part names its own, the merge drops the late ones.
        let cut = data
            .find(r#""late""#)
            .and_then(|i| data[..i].rfind('\n'))
            .unwrap()
            + 1;
        let mut a = FoldState::new(0);
        fold_reader(&mut a, &mut &data.as_bytes()[..cut], 0, 1 << 20).unwrap();
        let mut b = FoldState::new(0);
        fold_reader(&mut b, &mut &data.as_bytes()[cut..], cut as u64, 1 << 20).unwrap();
        a.merge(b);
        assert_eq!(a, f);
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
        assert_eq!(f.run().tokens, 5);
        assert_eq!(f.run().number, 2);
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

    /// Reads at most `sizes[i]` bytes per call, in turn.
    struct Chunked<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        turn: usize,
    }

    impl Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.sizes[self.turn % self.sizes.len()]
                .min(buf.len())
                .min(self.data.len());
            self.turn += 1;
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_fold_is_the_same_whatever_the_read_sizes() {
        // Lines cut across reads take the line-alone path, whole lines the
        // block index: both give the same fold, field for field.
        use crate::parse::tests::{random_line, Rng};
        let mut rng = Rng(0xb10c_5eed);
        let mut data = session().into_bytes();
        for _ in 0..3000 {
            data.extend_from_slice(&random_line(&mut rng));
            data.push(b'\n');
        }
        data.extend_from_slice(busy_session().as_bytes());
        let mut whole = FoldState::new(5);
        fold_reader(&mut whole, &mut &data[..], 0, DEFAULT_MAX_LINE).unwrap();
        for sizes in [
            vec![1],
            vec![7, 64, 3],
            vec![63, 65, 200],
            vec![4096, 1, 129],
        ] {
            let mut part = FoldState::new(5);
            let mut r = Chunked {
                data: &data,
                sizes,
                turn: 0,
            };
            fold_reader(&mut part, &mut r, 0, DEFAULT_MAX_LINE).unwrap();
            assert!(part == whole);
            assert_eq!(part.last_entries(), whole.last_entries());
        }
        assert!(
            whole.entries > 500 && whole.malformed > 50,
            "{} {}",
            whole.entries,
            whole.malformed
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

    #[test]
    fn seq_and_run_numbers_at_the_top_of_u64_neither_panic_nor_wrap() {
        // Issue 9 defect 5: `last + 1` overflowed (a panic in debug builds, a
        // miscount in release builds) once a seq reached 2^64-1.
        let m = u64::MAX;
        let seqs = [m - 2, m, m, 0, m, 0, 5];
        let lines: Vec<String> = seqs
            .iter()
            .map(|&s| line("step_complete", "routing", 1, s, "{}"))
            .collect();
        let mut f = FoldState::new(0);
        for (i, l) in lines.iter().enumerate() {
            f.feed_line(l.as_bytes(), i as u64);
        }
        // m-2 -> m: 1 missing; m -> m, m -> 0, m -> 0: regressions; 0 -> m:
        // m-1 missing; 0 -> 5: 4 more, which saturates.
        assert_eq!(f.seq_gaps, 3);
        assert_eq!(f.seq_missing, u64::MAX);
        assert_eq!(f.seq_regressions, 3);
        assert_eq!((f.max_seq, f.last_seq), (Some(m), Some(5)));
        // The same through a split fold (the merge's seq step).
        let data = lines.join("\n") + "\n";
        for cut in data.match_indices('\n').map(|(i, _)| i + 1) {
            let mut a = FoldState::new(0);
            fold_reader(&mut a, &mut &data.as_bytes()[..cut], 0, 1 << 20).unwrap();
            let mut b = FoldState::new(0);
            fold_reader(&mut b, &mut &data.as_bytes()[cut..], cut as u64, 1 << 20).unwrap();
            a.merge(b);
            assert_eq!(
                (a.seq_gaps, a.seq_missing, a.seq_regressions),
                (3, u64::MAX, 3)
            );
        }
        // A declared run number of 2^64-1 followed by an undeclared one.
        let mut f = FoldState::new(0);
        let run_max = format!(r#"{{"run":{m}}}"#);
        for (i, meta) in [run_max.as_str(), "{}"].iter().enumerate() {
            let l = line("session_start", "orchestrator", 0, i as u64, meta);
            f.feed_line(l.as_bytes(), 0);
        }
        assert_eq!(f.runs, 2);
        assert_eq!(f.entries, 2);
    }

    #[test]
    fn the_name_cap_keeps_the_files_first_names_whatever_the_thread_count() {
        // Issue 9 defect 9: each thread capped its own part, so which names
        // were kept (and their totals) depended on where the file was split.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("names.jsonl");
        let mut text = String::new();
        let mut seq = 0u64;
        while (text.len() as u64) < 2 * PARALLEL_MIN_BYTES {
            for i in 0..400 {
                text.push_str(&line("step_complete", &format!("c{i}"), 1, seq, "{}"));
                text.push('\n');
                seq += 1;
            }
        }
        std::fs::write(&path, &text).unwrap();
        let rounds = seq / 400;
        let mut one = FoldState::new(0);
        fold_path_with(&mut one, &path, 1 << 20, 1).unwrap();
        assert_eq!(one.components.len(), MAX_NAMES + 1);
        assert_eq!(one.components["c0"].tokens, rounds);
        assert_eq!(one.components["c255"].tokens, rounds);
        assert!(one.components.get("c256").is_none());
        assert_eq!(one.components[OTHER].tokens, 144 * rounds);
        for threads in [2, 4] {
            let mut many = FoldState::new(0);
            fold_path_with(&mut many, &path, 1 << 20, threads).unwrap();
            assert_eq!(many.components, one.components, "{threads} threads");
            assert_eq!(many.tokens, one.tokens);
        }
    }

    #[test]
    fn interned_ids_tell_every_name_apart_and_stop_at_the_cap() {
        let mut names: Vec<Vec<u8>> = Vec::new();
        for n in 0..40usize {
            let base: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            names.push(base.clone());
            for at in 0..n {
                let mut v = base.clone();
                v[at] = b'Z';
                names.push(v);
            }
        }
        names.sort();
        names.dedup();
        assert!(names.len() < MAX_INTERNED);
        let mut ix = Interner::default();
        let ids: Vec<usize> = names.iter().map(|n| ix.id(n).unwrap()).collect();
        assert_eq!(ids, (0..names.len()).collect::<Vec<_>>());
        for (n, &id) in names.iter().zip(&ids) {
            assert_eq!(ix.id(n), Some(id), "{n:?}");
        }
        // The same name twice in a row (the last-name cache), then pairs of
        // names that differ in one byte, in both orders.
        for w in names.windows(2) {
            let (a, b) = (ix.id(&w[0]), ix.id(&w[1]));
            assert_eq!(ix.id(&w[1]), b);
            assert_eq!(ix.id(&w[0]), a);
            assert_eq!(ix.id(&w[0]), a);
            assert_ne!(a, b, "{w:?}");
        }
        let long = b"a-component-name-longer-than-sixteen".to_vec();
        let mut other = long.clone();
        other[20] = b'X';
        let (l, o) = (ix.id(&long), ix.id(&other));
        assert_ne!(l, o);
        assert_eq!((ix.id(&long), ix.id(&other), ix.id(&other)), (l, o, o));
        let mut i = 0;
        while ix.names.len() < MAX_INTERNED {
            assert!(ix.id(format!("more-{i}").as_bytes()).is_some());
            i += 1;
        }
        assert_eq!(ix.id(b"one too many"), None);
        assert_eq!(ix.id(&names[3]), Some(3));
    }

    #[test]
    fn kinds_told_from_bytes_equal_kinds_told_from_names() {
        let names = [
            "session_start",
            "session_complete",
            "session_error",
            "step_complete",
            "step_error",
            "retry_attempt",
            "token_consumption",
            "events_dropped",
            "",
            "x",
            "step",
            "other_event",
        ];
        for name in names {
            let mut variants = vec![name.to_string(), format!("{name}x"), format!("x{name}")];
            for at in 0..name.len() {
                let mut v = name.as_bytes().to_vec();
                v[at] ^= 1;
                variants.push(String::from_utf8(v).unwrap());
                variants.push(name[..at].to_string());
            }
            for v in variants {
                assert_eq!(Kind::of_bytes(v.as_bytes()), Kind::of(&v), "{v}");
            }
        }
    }

    #[test]
    fn the_bucket_cache_gives_the_searched_bucket() {
        let mut cache = BucketCache::default();
        let mut values = vec![0.0, -0.0, -5.0, 1e-300, 1e300, f64::MAX, f64::MIN];
        for &b in &LATENCY_BOUNDS_MS {
            values.extend([b, b.next_down(), b.next_up(), b * 0.7, b * 1.3]);
        }
        // Each value after each other value (the cache holds the previous one).
        for &a in &values {
            for &v in &values {
                cache.of(a);
                assert_eq!(cache.of(v), latency_bucket(v), "{a} then {v}");
                assert_eq!(cache.of(v), latency_bucket(v), "{v} twice");
            }
        }
    }

    #[test]
    fn timestamps_read_as_microseconds() {
        let base = timestamp_micros("2026-01-11T10:00:00+00:00").unwrap();
        assert_eq!(base, 1_768_125_600_000_000);
        assert_eq!(timestamp_micros("2026-01-11T10:00:00Z"), Some(base));
        assert_eq!(timestamp_micros("2026-01-11T10:00:00"), Some(base));
        assert_eq!(timestamp_micros("2026-01-11T11:30:00+01:30"), Some(base));
        assert_eq!(timestamp_micros("2026-01-11T09:00:00-0100"), Some(base));
        assert_eq!(
            timestamp_micros("2026-01-11T10:00:00.137+00:00"),
            Some(base + 137_000)
        );
        assert_eq!(
            timestamp_micros("2026-01-11T10:00:00.1234567"),
            Some(base + 123_456)
        );
        assert_eq!(
            timestamp_micros("1969-12-31T23:59:59+00:00"),
            Some(-1_000_000)
        );
        for bad in [
            "",
            "t",
            "2026-13-01T00:00:00",
            "2026-01-11T10:00:00+",
            "2026-01-11T10:00:00.",
            "2026-01-11T10:00:00Zx",
            "２026-01-11T10:00:00",
        ] {
            assert_eq!(timestamp_micros(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_rate_window_holds_the_last_seconds_of_event_time() {
        let mut w = RateWindow::default();
        let last = WINDOW_SECONDS as i64 + 36;
        for s in 0..last {
            w.add(s, 10);
        }
        w.add(10, 1000); // long before the window: counted in totals only
        assert_eq!(w.tokens_in(60, 0), 600);
        assert_eq!(w.tokens_in(60, 30), 300);
        assert_eq!(w.tokens_in(60, 1000), 0);
        assert_eq!(w.buckets().len(), WINDOW_SECONDS);
        let mut a = RateWindow::default();
        let mut b = RateWindow::default();
        (0..50).for_each(|s| a.add(s, 10));
        (50..last).for_each(|s| b.add(s, 10));
        b.add(10, 1000);
        a.merge(&b);
        assert_eq!(a, w);
        // The window reaches 30 minutes back (issue 12's sparkline).
        let mut w = RateWindow::default();
        w.add(0, 100);
        w.add(1200, 5);
        assert_eq!(w.tokens_in(1800, 0), 105);
        assert_eq!(w.tokens_between(0, 0), 100);
    }
}
