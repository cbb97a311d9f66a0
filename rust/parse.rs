//! Parsing one JSON line into an event (ARCHITECTURE.md contracts 1 and 6).
//!
//! Pure Rust: no Python here. A line is valid when it is a JSON object with the
//! spec's required string fields, an integer `tokens` from 0 to 2^53 (default
//! 0), an optional non-negative integer `seq` and an optional object
//! `metadata`, with no value nested deeper than [`MAX_DEPTH`] levels; a key
//! given twice keeps its last value, as Python's `json` reads it. Anything
//! else is reported as malformed with a reason; nothing panics.
//!
//! Two parsers, one verdict: a fast path for the layout sigil's writer
//! produces, and the general (serde) parser for every other line. The fast
//! path only ever hands a line to the general parser, never rules it
//! malformed; `reference` and `fuzz/` compare both with plain JSON.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cost::nano_usd;
use crate::fold::{LineSplitter, Piece};
use crate::scan::{BlockIndex, LineIndex, Quotes};

/// The largest `tokens` a line may hold (issue 11): 2^53, the largest integer
/// every JSON reader (a double in JavaScript, jq) holds exactly, so every
/// reader gives the same total. A line above it is malformed.
pub const MAX_TOKENS: u64 = 1 << 53;

/// How deep a value of an event (its `metadata`, or any other key) may nest,
/// the value itself counting as one level: `{}` is 1, `{"a":[1]}` is 2. The
/// writer applies the same bound, so a session can never hold a line its
/// readers refuse; deeper is malformed, never a recursion error.
pub const MAX_DEPTH: usize = 64;

/// An event borrowed from the line it was parsed from.
#[derive(Debug)]
pub struct RawEvent<'a> {
    pub timestamp: Cow<'a, str>,
    pub session_id: Cow<'a, str>,
    pub event_type: Cow<'a, str>,
    pub component: Cow<'a, str>,
    pub message: Cow<'a, str>,
    pub tokens: u64,
    pub seq: Option<u64>,
    /// The metadata object's JSON text.
    pub metadata: Option<&'a str>,
}

/// The event's keys, in the order of [`Fields`].
const KEYS: [&str; 8] = [
    "timestamp",
    "session_id",
    "event_type",
    "component",
    "message",
    "tokens",
    "seq",
    "metadata",
];

/// The raw JSON of each event key. A key given twice keeps its last value, as
/// Python's `json` and orjson do (RFC 8259 leaves duplicates to the reader), so
/// the fold's totals equal a plain JSON sum whatever the line.
struct Fields<'a>([Option<&'a RawValue>; 8]);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Key(Option<usize>);
        impl<'de> Deserialize<'de> for Key {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = Key;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a key")
                    }
                    fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<Key, E> {
                        Ok(Key(KEYS.iter().position(|x| *x == k)))
                    }
                }
                d.deserialize_identifier(V)
            }
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("struct RawEvent")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = [None; 8];
                while let Some(Key(k)) = m.next_key()? {
                    match k {
                        Some(i) => {
                            // Name the key whose value is not JSON (the
                            // monitor shows this reason).
                            let v = m.next_value::<&'de RawValue>().map_err(|e| {
                                let e = e.to_string();
                                let e = e.rsplit_once(" at line ").map_or(&*e, |(head, _)| head);
                                serde::de::Error::custom(format!(
                                    "invalid JSON in `{}`: {e}",
                                    KEYS[i]
                                ))
                            })?;
                            out[i] = Some(v);
                        }
                        None => {
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Fields<'a> {
    fn into_event(self) -> Result<RawEvent<'a>, String> {
        let [ts, sid, kind, comp, msg, tokens, seq, meta] = self.0;
        let text = |i: usize, raw: Option<&'a RawValue>| -> Result<Cow<'a, str>, String> {
            let raw = raw.ok_or_else(|| format!("missing field `{}`", KEYS[i]))?;
            let json = raw.get();
            // A string without escapes is its own text; RawValue checked it.
            if json.len() >= 2 && json.starts_with('"') && !json.contains('\\') {
                return Ok(Cow::Borrowed(&json[1..json.len() - 1]));
            }
            serde_json::from_str::<String>(json)
                .map(Cow::Owned)
                .map_err(|e| field_error(KEYS[i], e))
        };
        let event = RawEvent {
            timestamp: text(0, ts)?,
            session_id: text(1, sid)?,
            event_type: text(2, kind)?,
            component: text(3, comp)?,
            message: text(4, msg)?,
            tokens: match tokens {
                None => 0,
                Some(raw) => match serde_json::from_str::<u64>(raw.get()) {
                    Ok(t) if t <= MAX_TOKENS => t,
                    Ok(t) => return Err(format!("`tokens` out of range: {t} is above 2**53")),
                    Err(e) => return Err(field_error("tokens", e)),
                },
            },
            seq: match seq {
                None => None,
                Some(raw) => serde_json::from_str(raw.get()).map_err(|e| field_error("seq", e))?,
            },
            metadata: meta.map(RawValue::get).filter(|m| *m != "null"),
        };
        if let Some(m) = event.metadata {
            if !m.starts_with('{') {
                return Err("`metadata` is not an object".to_string());
            }
        }
        Ok(event)
    }
}

fn field_error(key: &str, e: serde_json::Error) -> String {
    format!("`{key}`: {}", describe(e))
}

/// An event that owns its data, for records handed to Python.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub timestamp: String,
    pub session_id: String,
    pub event_type: String,
    pub component: String,
    pub message: String,
    pub tokens: u64,
    pub seq: Option<u64>,
    /// The metadata object's JSON text (`{}` when absent), parsed on demand.
    pub metadata: String,
    /// Byte offset of the line's first byte in its file.
    pub offset: u64,
}

impl RawEvent<'_> {
    pub fn to_owned_event(&self, offset: u64) -> Event {
        Event {
            timestamp: self.timestamp.to_string(),
            session_id: self.session_id.to_string(),
            event_type: self.event_type.to_string(),
            component: self.component.to_string(),
            message: self.message.to_string(),
            tokens: self.tokens,
            seq: self.seq,
            metadata: self.metadata.unwrap_or("{}").to_string(),
            offset,
        }
    }
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    pub offset: u64,
    pub reason: String,
}

/// Parse one line (without its `\n`). A trailing `\r` is tolerated.
pub fn parse_line(line: &[u8]) -> Result<RawEvent<'_>, String> {
    parse_line_picking(line, &KeySet::new(&[]), &mut []).map(|(event, _)| event)
}

/// The JSON text of each picked metadata key's value (None: not in the line).
#[derive(Clone, Copy)]
pub struct Picks<'a, const N: usize> {
    line: &'a str,
    /// Start and end of each value in `line`, where bit `i` of `seen` is
    /// set (the other entries are stale). The caller's buffer: nothing is
    /// copied or cleared per line.
    at: &'a PickAt<N>,
    seen: u32,
    /// Bit `i`: the value of key `i` is a short number the fast path read
    /// while validating it (`m` and `frac` of its entry are set).
    nums: u32,
}

/// Where a picked value is in a line and, for a short number
/// (`-?(0|[1-9]\d{0,6})(\.\d{1,7})?`), its digits read once.
#[derive(Clone, Copy, Default)]
pub struct Pick {
    start: u32,
    end: u32,
    /// Digits after the point.
    frac: u8,
    neg: bool,
    /// All the digits as one integer (below 10^14: an exact double).
    m: u64,
}

/// Where the picked values are in a line (see [`Picks`]).
pub type PickAt<const N: usize> = [Pick; N];

/// Exact powers of ten (doubles up to 10^15 are exact).
const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];
const POW10_INT: [u64; 8] = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000];
/// Nano-units per unit of the last digit of a number with `i` decimals (i <= 7).
const NANO_PER_UNIT: [u64; 8] = [
    1_000_000_000,
    100_000_000,
    10_000_000,
    1_000_000,
    100_000,
    10_000,
    1_000,
    100,
];

impl<'a, const N: usize> Picks<'a, N> {
    /// The JSON text of the value of key `i`, if the line holds it.
    #[inline(always)]
    pub fn get(&self, i: usize) -> Option<&'a str> {
        (self.seen >> i & 1 != 0).then(|| self.at(i))
    }

    /// Bit `i` set: the line holds key `i` (see [`Picks::get`]).
    #[inline(always)]
    pub fn seen(&self) -> u32 {
        self.seen
    }

    /// Each picked key's index and the JSON text of its value, in index
    /// order (the keys of [`Picks::seen`]).
    #[inline(always)]
    pub fn each(&self) -> impl Iterator<Item = (usize, &'a str)> + '_ {
        let mut bits = self.seen;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                (i, self.at(i))
            })
        })
    }

    /// The value of key `i` (which the line holds) read as [`json_u64`]
    /// reads its text, without reading a short number's digits again.
    #[inline(always)]
    pub fn u64_at(&self, i: usize) -> Option<u64> {
        if self.nums >> i & 1 != 0 {
            let p = &self.at[i];
            return (p.frac == 0 && !p.neg).then_some(p.m);
        }
        json_u64(self.at(i))
    }

    /// The value of key `i` (which the line holds) read as [`json_f64`]
    /// reads its text, without reading a short number's digits again.
    #[inline(always)]
    pub fn f64_at(&self, i: usize) -> Option<f64> {
        if self.nums >> i & 1 != 0 {
            let p = &self.at[i];
            // At most 14 digits: the same division as `short_decimal`.
            let x = p.m as f64 / POW10[usize::from(p.frac)];
            return Some(if p.neg { -x } else { x });
        }
        json_f64(self.at(i))
    }

    /// The JSON text of the value of key `i`, which the line holds (bit `i`
    /// of `seen`).
    #[inline(always)]
    pub fn at(&self, i: usize) -> &'a str {
        debug_assert!(self.seen >> i & 1 != 0);
        let Pick {
            start: a, end: b, ..
        } = self.at[i];
        // SAFETY: bit `i` of `seen` is set, so the fast path set this entry
        // for this line, to a range of it on character boundaries (see
        // `fast_parse_with`).
        unsafe { self.line.get_unchecked(a as usize..b as usize) }
    }
}

/// [`parse_line`], also picking the JSON text of the metadata's top-level
/// `keys` (the last value of a key given twice, as Python's `json` reads it)
/// when the fast path took the line, so the caller need not parse the
/// metadata again. None when the general parser took it.
pub fn parse_line_picking<'a: 'b, 'p: 'b, 'b, const N: usize>(
    line: &'a [u8],
    keys: &KeySet<'_, N>,
    at: &'p mut PickAt<N>,
) -> Result<(RawEvent<'a>, Option<Picks<'b, N>>), String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if let Some((event, picks)) = fast_parse_with(line, LineIndex::new(line), keys, at) {
        return Ok((event, Some(picks)));
    }
    parse_general(line).map(|event| (event, None))
}

/// [`parse_line_picking`] for the line at `start..start + len` of `block`,
/// which `ix` has indexed: the fast path reads the block's quote bitmap
/// instead of classifying the line again.
#[inline]
pub fn parse_block_line<'a: 'b, 'p: 'b, 'b, const N: usize>(
    block: &'a [u8],
    ix: &BlockIndex,
    start: usize,
    len: usize,
    keys: &KeySet<'_, N>,
    at: &'p mut PickAt<N>,
) -> Result<(RawEvent<'a>, Option<Picks<'b, N>>), String> {
    let line = &block[start..start + len];
    if let Some(bl) = ix.line(start, len) {
        if let Some((event, picks)) = fast_parse_with(line, bl, keys, at) {
            return Ok((event, Some(picks)));
        }
    }
    parse_general(line).map(|event| (event, None))
}

/// The general parser (serde): any key order, escapes, extra keys. Decides
/// every line the fast path does not take.
pub fn parse_general(line: &[u8]) -> Result<RawEvent<'_>, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        return Err("empty line".to_string());
    }
    let Ok(text) = std::str::from_utf8(line) else {
        return Err("invalid UTF-8".to_string());
    };
    // Bounded here, before serde (whose own limit is 128 and an error).
    if nesting_exceeds(line, MAX_DEPTH + 1) {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    // serde would also accept an array in place of a struct; events are objects.
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
                Ok(_) => "not a JSON object".to_string(),
                Err(e) => describe(e),
            },
        );
    }
    let fields: Fields<'_> = serde_json::from_str(text).map_err(describe)?;
    fields.into_event()
}

/// Whether brackets outside strings nest deeper than `max` anywhere in `line`.
fn nesting_exceeds(line: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(n) = memchr::memchr3(b'"', b'{', b'[', &line[i..]).map(|n| i + n) {
        // Closing brackets between here and the last stop lower the depth.
        depth = depth.saturating_sub(count_closers(&line[i..n]));
        i = n + 1;
        match line[n] {
            b'"' => match skip_string(line, i) {
                Some(end) => i = end,
                None => return false, // an unterminated string: invalid JSON anyway
            },
            _ => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
        }
    }
    false
}

fn count_closers(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'}' || b == b']').count()
}

/// The index just past the closing quote of a string whose body starts at `i`.
fn skip_string(bytes: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i += memchr::memchr2(b'"', b'\\', bytes.get(i..)?)?;
        if bytes[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

#[inline(always)]
fn word8(s: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&s[i..i + 8]);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn word4(s: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&s[i..i + 4]);
    u32::from_le_bytes(w)
}

/// How many of the eight bytes of `x` (the first in the low byte) are ASCII
/// digits before the first that is not.
#[inline(always)]
fn leading_digits(x: u64) -> usize {
    const HIGH: u64 = 0xf0f0_f0f0_f0f0_f0f0;
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    // A digit is 0x30..=0x39: its high nibble is 3, and still 3 after adding
    // 6. A carry out of a byte only changes the bytes after it, which come
    // after a byte that is not a digit.
    let not_digit = ((x & HIGH) ^ ZEROS) | ((x.wrapping_add(0x0606_0606_0606_0606) & HIGH) ^ ZEROS);
    (not_digit.trailing_zeros() / 8) as usize
}

/// How many ASCII digits start at `p` of `b` (eight bytes at a time).
#[inline(always)]
pub fn digit_run(b: &[u8], p: usize) -> usize {
    let mut n = 0;
    while p + n + 8 <= b.len() {
        let k = leading_digits(word8(b, p + n));
        n += k;
        if k < 8 {
            return n;
        }
    }
    n + b[(p + n).min(b.len())..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count()
}

/// The value of the first `n` bytes of `x` (1 to 7 ASCII digits, the first
/// in the low byte).
#[inline(always)]
fn digits_value(x: u64, n: usize) -> u64 {
    debug_assert!((1..8).contains(&n));
    // Move the digits to the top and fill the bytes below with '0'.
    let shift = 8 * (8 - n);
    let mut v = (x << shift) | (0x3030_3030_3030_3030u64 >> (64 - shift));
    v -= 0x3030_3030_3030_3030;
    v = (v * 10) + (v >> 8);
    const MASK: u64 = 0x0000_00ff_0000_00ff;
    const MUL1: u64 = 0x000f_4240_0000_0064;
    const MUL2: u64 = 0x0000_2710_0000_0001;
    ((v & MASK).wrapping_mul(MUL1) + ((v >> 16) & MASK).wrapping_mul(MUL2)) >> 32
}

/// `a == b`, inline for the short names and keys the fold compares on every
/// line (two overlapping word loads instead of a call to `memcmp`).
#[inline(always)]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => word4(a, 0) == word4(b, 0) && word4(a, n - 4) == word4(b, n - 4),
        8..=16 => word8(a, 0) == word8(b, 0) && word8(a, n - 8) == word8(b, n - 8),
        _ => a == b,
    }
}

/// A JSON value's text read as a non-negative integer, as serde reads a
/// `u64` (a fraction, exponent, sign or anything else is not one).
pub fn json_u64(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.is_empty() || b.len() > 20 || (b.len() > 1 && b[0] == b'0') {
        return None;
    }
    b.iter().try_fold(0u64, |v, &c| {
        let d = c.wrapping_sub(b'0');
        (d <= 9).then_some(())?;
        v.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// A JSON value's text read as a number, as serde reads an `f64` (the value
/// nearest the decimal; not a number gives None). Past the double range it
/// gives an infinity where serde gives an error: callers keep finite values.
pub fn json_f64(text: &str) -> Option<f64> {
    if let Some(x) = short_decimal(text.as_bytes()) {
        return Some(x);
    }
    // Rust's float grammar also takes "inf", "NaN" and "+1", which JSON does
    // not: a JSON number starts with a digit or a minus.
    match text.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => text.parse().ok(),
        _ => None,
    }
}

/// A JSON number of at most 15 digits and no exponent (`-?(0|[1-9]\d*)(\.\d+)?`,
/// a latency such as `1100.5`): its digits as an integer below 2^53 and a
/// power of ten up to 10^15 are both exact doubles, so one division gives the
/// correctly rounded value, as the general parser would (Clinger's fast path).
/// None for anything else (the general parser decides).
fn short_decimal(b: &[u8]) -> Option<f64> {
    let (neg, digits) = match b.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, b),
    };
    if digits.len() > 16 || digits.is_empty() {
        return None;
    }
    let (mut m, mut n, mut frac, mut dot) = (0u64, 0usize, 0usize, false);
    for (i, &c) in digits.iter().enumerate() {
        match c {
            b'0'..=b'9' => {
                if i == 1 && digits[0] == b'0' {
                    return None; // a leading zero
                }
                m = m * 10 + u64::from(c - b'0');
                n += 1;
                frac += usize::from(dot);
            }
            b'.' if !dot && i > 0 && i + 1 < digits.len() => dot = true,
            _ => return None,
        }
    }
    if n > 15 {
        return None;
    }
    let x = m as f64 / POW10[frac];
    Some(if neg { -x } else { x })
}

/// The layout sigil's own writer produces:
/// `{"timestamp":"..","session_id":"..","event_type":"..","component":"..",
/// "message":"..","tokens":N,"metadata":{..},"seq":N}` with no backslash or
/// control byte anywhere. Checked against a SIMD index of the line's quotes
/// (`scan.rs`) with literal key comparisons, integers parsed directly and the
/// metadata validated in the same pass; UTF-8 is validated only when the line
/// has a non-ASCII byte. Anything else returns `None` and goes to the general
/// parser, never straight to "malformed", so the result is the general
/// parser's (the comparison tests and `fuzz/` check it).
#[cfg(any(test, feature = "fuzzing"))]
fn fast_parse<'a, const N: usize>(
    line: &'a [u8],
    keys: &[&str; N],
) -> Option<(RawEvent<'a>, [Option<&'a str>; N])> {
    let mut at = [Pick::default(); N];
    let (event, p) = fast_parse_with(line, LineIndex::new(line), &KeySet::new(keys), &mut at)?;
    // The digits read once give what reading the text gives.
    for i in 0..N {
        if p.seen() >> i & 1 != 0 {
            assert_eq!(p.u64_at(i), json_u64(p.at(i)));
            assert_eq!(
                p.f64_at(i).map(f64::to_bits),
                json_f64(p.at(i)).map(f64::to_bits)
            );
        }
    }
    let seen = p.seen();
    let text = std::str::from_utf8(line).ok()?;
    let picks = std::array::from_fn(|i| {
        let Pick {
            start: a, end: b, ..
        } = at[i];
        (seen >> i & 1 != 0).then(|| &text[a as usize..b as usize])
    });
    Some((event, picks))
}

/// [`fast_parse`] against any index of the line's quotes.
#[inline(always)]
fn fast_parse_with<'a: 'b, 'p: 'b, 'b, Q: Quotes, const N: usize>(
    line: &'a [u8],
    ix: Q,
    keys: &KeySet<'_, N>,
    at: &'p mut PickAt<N>,
) -> Option<(RawEvent<'a>, Picks<'b, N>)> {
    let mut f = Fast {
        line,
        ix,
        keys,
        picks: at,
        seen: 0,
        nums: 0,
    };
    // Positions are kept as u32 (the picks): longer lines go to the general parser.
    if line.len() > u32::MAX as usize {
        return None;
    }
    let p = f.lit(0, b"{\"timestamp\":\"")?;
    let (ts, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"session_id\":\"")?;
    let (sid, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"event_type\":\"")?;
    let (kind, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"component\":\"")?;
    let (comp, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"message\":\"")?;
    let (msg, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"tokens\":")?;
    let (tokens, p) = f.uint(p)?;
    if tokens > MAX_TOKENS {
        return None;
    }
    let p = f.lit(p, b",\"metadata\":")?;
    let meta_start = p;
    let p = f.object(p, 1)?;
    let meta_end = p;
    let p = f.lit(p, b",\"seq\":")?;
    let (seq, p) = f.uint(p)?;
    if p + 1 != line.len() || line[p] != b'}' {
        return None;
    }
    let seen = f.ix.finish();
    if seen.unusual {
        return None;
    }
    let text = if seen.non_ascii {
        std::str::from_utf8(line).ok()?
    } else {
        // SAFETY: every byte is below 0x80 (the index saw no other), and
        // ASCII is valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(line) }
    };
    // Every range starts just after an ASCII byte (a quote or a delimiter)
    // and ends at one or at the line's end, and an ASCII byte is never part
    // of a multi-byte character: each range is on character boundaries.
    let s = |(a, b): (usize, usize)| {
        debug_assert!(text.is_char_boundary(a) && text.is_char_boundary(b) && a <= b);
        // SAFETY: in bounds and on character boundaries (just above).
        unsafe { text.get_unchecked(a..b) }
    };
    let event = RawEvent {
        timestamp: Cow::Borrowed(s(ts)),
        session_id: Cow::Borrowed(s(sid)),
        event_type: Cow::Borrowed(s(kind)),
        component: Cow::Borrowed(s(comp)),
        message: Cow::Borrowed(s(msg)),
        tokens,
        seq: Some(seq),
        metadata: Some(s((meta_start, meta_end))),
    };
    let (seen, nums) = (f.seen, f.nums);
    let at: &'b PickAt<N> = f.picks;
    for (
        i,
        &Pick {
            start: a, end: b, ..
        },
    ) in at.iter().enumerate()
    {
        debug_assert!(
            seen >> i & 1 == 0
                || text.is_char_boundary(a as usize) && text.is_char_boundary(b as usize)
        );
    }
    let picks = Picks {
        line: text,
        at,
        seen,
        nums,
    };
    Some((event, picks))
}

/// What the fold reads of a line in sigil's own layout, read straight from
/// the line (issue 9, "the fold"): no [`RawEvent`], no picks, no second pass
/// over the metadata. The metadata's values are those [`parse_line_picking`]
/// gives the fold for the same keys (the last of a key given twice; a value
/// of another type is read as the fold's readers read it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout<'a> {
    pub timestamp: &'a str,
    pub event_type: &'a str,
    pub component: &'a str,
    pub message: &'a str,
    pub tokens: u64,
    pub seq: u64,
    /// `metadata.latency_ms` read as [`json_f64`] reads it.
    pub latency_ms: Option<f64>,
    /// The JSON text of `metadata.model` (any type).
    pub model: Option<&'a str>,
    /// `metadata.input_tokens` / `output_tokens` read as [`json_u64`] reads them.
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// `metadata.cost_usd` in nano-dollars, read as [`nano_usd`] reads it.
    pub cost_nanousd: Option<u64>,
    /// `metadata.usage` is the string `"unknown"`.
    pub usage_unknown: bool,
    /// `metadata.tokens_held` read as [`json_u64`] reads it.
    pub tokens_held: Option<u64>,
    /// The text of `metadata.output_sha256` when it is a string.
    pub output_sha256: Option<&'a str>,
    /// `metadata.call` (the proxy's call id) read as [`json_u64`] reads it.
    pub call: Option<u64>,
    /// A step's start: `metadata.attempt`, `prompt_tokens_reserved` and
    /// `max_tokens` read as [`json_u64`] reads them, and the text of
    /// `input_sha256` when it is a string.
    pub attempt: Option<u64>,
    pub prompt_tokens_reserved: Option<u64>,
    pub max_tokens: Option<u64>,
    pub input_sha256: Option<&'a str>,
}

/// Where the timestamp's text starts in a line of the layout (just after
/// `{"timestamp":"`).
pub const LAYOUT_TIMESTAMP_AT: usize = 14;

/// The metadata values [`Layout`] carries, as positions while reading.
#[derive(Default)]
struct LayoutMeta {
    latency_ms: Option<f64>,
    model: Option<(usize, usize)>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cost_nanousd: Option<u64>,
    usage_unknown: bool,
    tokens_held: Option<u64>,
    output_sha256: Option<(usize, usize)>,
    call: Option<u64>,
    attempt: Option<u64>,
    prompt_tokens_reserved: Option<u64>,
    max_tokens: Option<u64>,
    input_sha256: Option<(usize, usize)>,
}

/// The line at `start..start + len` of `block` in sigil's own layout, read
/// against the block's index; None for any other line (which the general
/// path then decides: this never rules a line malformed).
#[inline]
pub fn layout_block_line<'a>(
    block: &'a [u8],
    ix: &BlockIndex,
    start: usize,
    len: usize,
) -> Option<Layout<'a>> {
    let bl = ix.line(start, len)?;
    layout_line(&block[start..start + len], bl)
}

/// [`layout_block_line`] against any index of the line's quotes: the layout
/// [`fast_parse_with`] takes, with the same checks.
#[inline(always)]
pub fn layout_line<'a, Q: Quotes>(line: &'a [u8], ix: Q) -> Option<Layout<'a>> {
    let mut none: PickAt<0> = [];
    let mut f = Fast {
        line,
        ix,
        keys: &NO_KEYS,
        picks: &mut none,
        seen: 0,
        nums: 0,
    };
    if line.len() > u32::MAX as usize {
        return None;
    }
    let p = f.lit(0, b"{\"timestamp\":\"")?;
    debug_assert_eq!(p, LAYOUT_TIMESTAMP_AT);
    let (ts, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"session_id\":\"")?;
    let (_, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"event_type\":\"")?;
    let (kind, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"component\":\"")?;
    let (comp, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"message\":\"")?;
    let (msg, p) = f.string_body(p)?;
    let p = f.lit(p, b"\",\"tokens\":")?;
    let (tokens, p) = f.uint(p)?;
    if tokens > MAX_TOKENS {
        return None;
    }
    let p = f.lit(p, b",\"metadata\":")?;
    let mut m = LayoutMeta::default();
    let p = f.layout_meta(p, &mut m)?;
    let p = f.lit(p, b",\"seq\":")?;
    let (seq, p) = f.uint(p)?;
    if p + 1 != line.len() || line[p] != b'}' {
        return None;
    }
    let seen = f.ix.finish();
    if seen.unusual {
        return None;
    }
    let text = if seen.non_ascii {
        std::str::from_utf8(line).ok()?
    } else {
        // SAFETY: every byte is below 0x80 (the index saw no other), and
        // ASCII is valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(line) }
    };
    // As in `fast_parse_with`: every range starts just after an ASCII byte
    // and ends at one, so it is on character boundaries.
    let s = |(a, b): (usize, usize)| {
        debug_assert!(text.is_char_boundary(a) && text.is_char_boundary(b) && a <= b);
        // SAFETY: in bounds and on character boundaries (just above).
        unsafe { text.get_unchecked(a..b) }
    };
    Some(Layout {
        timestamp: s(ts),
        event_type: s(kind),
        component: s(comp),
        message: s(msg),
        tokens,
        seq,
        latency_ms: m.latency_ms,
        model: m.model.map(s),
        input_tokens: m.input_tokens,
        output_tokens: m.output_tokens,
        cost_nanousd: m.cost_nanousd,
        usage_unknown: m.usage_unknown,
        tokens_held: m.tokens_held,
        output_sha256: m.output_sha256.map(s),
        call: m.call,
        attempt: m.attempt,
        prompt_tokens_reserved: m.prompt_tokens_reserved,
        max_tokens: m.max_tokens,
        input_sha256: m.input_sha256.map(s),
    })
}

/// No metadata keys to pick (the layout reader reads its own).
const NO_KEYS: KeySet<'static, 0> = KeySet::new(&[]);

/// The metadata keys [`Layout`] carries.
#[derive(Clone, Copy, PartialEq)]
enum LayoutKey {
    Latency,
    Model,
    Input,
    Output,
    Cost,
    Usage,
    Held,
    OutputHash,
    Call,
    Attempt,
    Reserved,
    MaxTokens,
    InputHash,
    Other,
}

#[inline(always)]
fn layout_key(key: &[u8]) -> LayoutKey {
    match key.len() {
        10 if same_bytes(key, b"latency_ms") => LayoutKey::Latency,
        10 if same_bytes(key, b"max_tokens") => LayoutKey::MaxTokens,
        5 if same_bytes(key, b"model") => LayoutKey::Model,
        5 if same_bytes(key, b"usage") => LayoutKey::Usage,
        12 if same_bytes(key, b"input_tokens") => LayoutKey::Input,
        13 if same_bytes(key, b"output_tokens") => LayoutKey::Output,
        13 if same_bytes(key, b"output_sha256") => LayoutKey::OutputHash,
        8 if same_bytes(key, b"cost_usd") => LayoutKey::Cost,
        11 if same_bytes(key, b"tokens_held") => LayoutKey::Held,
        4 if same_bytes(key, b"call") => LayoutKey::Call,
        7 if same_bytes(key, b"attempt") => LayoutKey::Attempt,
        12 if same_bytes(key, b"input_sha256") => LayoutKey::InputHash,
        22 if same_bytes(key, b"prompt_tokens_reserved") => LayoutKey::Reserved,
        _ => LayoutKey::Other,
    }
}

/// The fast path's cursor: positions in `line`, quotes found through `ix`.
struct Fast<'a, 'k, 'p, Q, const N: usize> {
    line: &'a [u8],
    ix: Q,
    /// Top-level metadata keys to pick, and where their values were seen.
    keys: &'k KeySet<'k, N>,
    picks: &'p mut PickAt<N>,
    /// Bit `i`: key `i` was seen (its entry in `picks` is set).
    seen: u32,
    /// Bit `i`: key `i`'s value is a short number read while validating it.
    nums: u32,
}

/// Metadata keys to pick, with their indexes by length: a key of the line is
/// compared only with the keys of its length.
pub struct KeySet<'k, const N: usize> {
    keys: [&'k str; N],
    /// Bit `i` of `by_len[n]`: `keys[i]` is `n` bytes long (31: 31 or more).
    by_len: [u32; 32],
}

impl<'k, const N: usize> KeySet<'k, N> {
    pub const fn new(keys: &[&'k str; N]) -> Self {
        assert!(N <= 32, "at most 32 keys");
        let mut by_len = [0u32; 32];
        let mut i = 0;
        while i < N {
            let n = keys[i].len();
            by_len[if n < 31 { n } else { 31 }] |= 1 << i;
            i += 1;
        }
        KeySet {
            keys: *keys,
            by_len,
        }
    }

    /// The index of `name` among the keys.
    #[inline(always)]
    fn find(&self, name: &[u8]) -> Option<usize> {
        let mut m = self.by_len[name.len().min(31)];
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            if same_bytes(self.keys[i].as_bytes(), name) {
                return Some(i);
            }
            m &= m - 1;
        }
        None
    }
}

impl<Q: Quotes, const N: usize> Fast<'_, '_, '_, Q, N> {
    /// `want` at `p` (a fixed-size compare the compiler inlines).
    #[inline(always)]
    fn lit<const L: usize>(&self, p: usize, want: &[u8; L]) -> Option<usize> {
        let got: &[u8; L] = self.line.get(p..p + L)?.try_into().ok()?;
        if (8..=16).contains(&L) {
            // Two overlapping words (the literal's are constants).
            let same = word8(got, 0) == word8(want, 0) && word8(got, L - 8) == word8(want, L - 8);
            return same.then_some(p + L);
        }
        (got == want).then_some(p + L)
    }

    /// A string whose body starts at `p`: (body range, position of its closing
    /// quote). With no backslash in the line the next quote ends it.
    #[inline(always)]
    fn string_body(&mut self, p: usize) -> Option<((usize, usize), usize)> {
        let end = self.ix.next_quote(p)?;
        Some(((p, end), end))
    }

    /// A JSON integer from 0 to 2^64-1 (no sign, fraction, exponent or
    /// leading zero): (value, position after it).
    #[inline(always)]
    fn uint(&self, p: usize) -> Option<(u64, usize)> {
        let line = self.line;
        // Eight bytes at a time: those from `p`, or the line's last eight
        // moved down so that `p` comes first (zeros after the line's end).
        let word = if p + 8 <= line.len() {
            Some(word8(line, p))
        } else if line.len() >= 8 && p < line.len() {
            Some(word8(line, line.len() - 8) >> (8 * (8 - (line.len() - p))))
        } else {
            None
        };
        if let Some(x) = word {
            let n = leading_digits(x);
            if n < 8 {
                if n == 0 || (n > 1 && line[p] == b'0') {
                    return None;
                }
                return Some((digits_value(x, n), p + n));
            }
        }
        self.uint_slow(p)
    }

    #[cold]
    #[inline(never)]
    fn uint_slow(&self, p: usize) -> Option<(u64, usize)> {
        let digits = self.line.get(p..)?;
        let mut v: u64 = 0;
        let mut n = 0;
        for &b in digits {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            v = v.checked_mul(10)?.checked_add(u64::from(d))?;
            n += 1;
        }
        if n == 0 || (n > 1 && digits[0] == b'0') {
            return None;
        }
        Some((v, p + n))
    }

    /// How many ASCII digits start at `p` (eight bytes at a time).
    #[inline(always)]
    fn digit_run(&self, p: usize) -> usize {
        digit_run(self.line, p)
    }

    #[inline(always)]
    fn spaces(&self, mut p: usize) -> usize {
        // Tab, CR and LF are control bytes: such lines never reach here.
        while self.line.get(p) == Some(&b' ') {
            p += 1;
        }
        p
    }

    /// One JSON value at `p` nested `depth` levels into the metadata; the
    /// position after it. Validates as serde_json does.
    fn value(&mut self, p: usize, depth: usize) -> Option<usize> {
        match *self.line.get(p)? {
            b'{' => self.object(p, depth + 1),
            b'[' => self.array(p, depth + 1),
            b'"' => self.ix.next_quote(p + 1).map(|q| q + 1),
            b't' => self.lit(p, b"true"),
            b'f' => self.lit(p, b"false"),
            b'n' => self.lit(p, b"null"),
            b'-' | b'0'..=b'9' => self.number(p),
            _ => None,
        }
    }

    /// An object at `p` that is nesting level `depth` (the metadata is 1).
    fn object(&mut self, p: usize, depth: usize) -> Option<usize> {
        if depth > MAX_DEPTH || self.line.get(p) != Some(&b'{') {
            return None;
        }
        let mut p = self.spaces(p + 1);
        if self.line.get(p) == Some(&b'}') {
            return Some(p + 1);
        }
        loop {
            if self.line.get(p) != Some(&b'"') {
                return None;
            }
            let key_end = self.ix.next_quote(p + 1)?;
            let key = (p + 1, key_end);
            p = key_end + 1;
            if self.line.get(p) != Some(&b':') {
                p = self.spaces(p);
                if self.line.get(p) != Some(&b':') {
                    return None;
                }
            }
            let start = self.spaces(p + 1);
            let pick = if depth == 1 && N > 0 {
                self.keys.find(&self.line[key.0..key.1])
            } else {
                None
            };
            if let Some(i) = pick {
                self.nums &= !(1 << i); // the last value of a key wins
            }
            // Strings and numbers, the usual values, without a call.
            let end = match *self.line.get(start)? {
                b'"' => self.ix.next_quote(start + 1)? + 1,
                b'-' | b'0'..=b'9' => match pick {
                    Some(i) => match self.short_number(start) {
                        Some((m, frac, neg, end)) => {
                            let e = &mut self.picks[i];
                            (e.m, e.frac, e.neg) = (m, frac, neg);
                            self.nums |= 1 << i;
                            end
                        }
                        None => self.number(start)?,
                    },
                    None => self.number(start)?,
                },
                _ => self.value(start, depth)?,
            };
            if let Some(i) = pick {
                let e = &mut self.picks[i];
                (e.start, e.end) = (start as u32, end as u32); // the last one wins
                self.seen |= 1 << i;
            }
            p = end;
            match *self.line.get(p)? {
                b',' => p = self.spaces(p + 1),
                b'}' => return Some(p + 1),
                b' ' => {
                    p = self.spaces(p);
                    match *self.line.get(p)? {
                        b',' => p = self.spaces(p + 1),
                        b'}' => return Some(p + 1),
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
    }

    /// The metadata object at `p` (validated as [`Fast::object`] validates
    /// it), setting the values [`Layout`] carries; the position after it.
    #[inline(always)]
    fn layout_meta(&mut self, p: usize, m: &mut LayoutMeta) -> Option<usize> {
        if self.line.get(p) != Some(&b'{') {
            return None;
        }
        let mut p = self.spaces(p + 1);
        if self.line.get(p) == Some(&b'}') {
            return Some(p + 1);
        }
        loop {
            // The writer's keys as literals (key, quote and colon), any other
            // key through the quote index.
            let (key, start) = if let Some(q) = self.lit(p, b"\"latency_ms\":") {
                (LayoutKey::Latency, q)
            } else if let Some(q) = self.lit(p, b"\"model\":") {
                (LayoutKey::Model, q)
            } else {
                if self.line.get(p) != Some(&b'"') {
                    return None;
                }
                let key_end = self.ix.next_quote(p + 1)?;
                let key = layout_key(&self.line[p + 1..key_end]);
                p = key_end + 1;
                if self.line.get(p) != Some(&b':') {
                    p = self.spaces(p);
                    if self.line.get(p) != Some(&b':') {
                        return None;
                    }
                }
                (key, p + 1)
            };
            let start = self.spaces(start);
            let first = *self.line.get(start)?;
            let end = match (key, first) {
                (_, b'"') => self.ix.next_quote(start + 1)? + 1,
                (LayoutKey::Latency, b'-' | b'0'..=b'9') => match self.short_number(start) {
                    Some((v, frac, neg, end)) => {
                        let x = v as f64 / POW10[usize::from(frac)];
                        m.latency_ms = Some(if neg { -x } else { x });
                        end
                    }
                    None => {
                        let end = self.number(start)?;
                        m.latency_ms = self.ascii(start, end).and_then(json_f64);
                        end
                    }
                },
                (
                    LayoutKey::Input
                    | LayoutKey::Output
                    | LayoutKey::Held
                    | LayoutKey::Call
                    | LayoutKey::Attempt
                    | LayoutKey::Reserved
                    | LayoutKey::MaxTokens,
                    b'-' | b'0'..=b'9',
                ) => {
                    let (v, end) = match self.short_number(start) {
                        Some((v, frac, neg, end)) => ((frac == 0 && !neg).then_some(v), end),
                        None => {
                            let end = self.number(start)?;
                            (self.ascii(start, end).and_then(json_u64), end)
                        }
                    };
                    match key {
                        LayoutKey::Input => m.input_tokens = v,
                        LayoutKey::Output => m.output_tokens = v,
                        LayoutKey::Held => m.tokens_held = v,
                        LayoutKey::Call => m.call = v,
                        LayoutKey::Attempt => m.attempt = v,
                        LayoutKey::Reserved => m.prompt_tokens_reserved = v,
                        _ => m.max_tokens = v,
                    }
                    end
                }
                (LayoutKey::Cost, b'-' | b'0'..=b'9') => match self.short_number(start) {
                    // At most 7 decimals (most costs): whole nano-dollars at once.
                    Some((v, frac, neg, end)) => {
                        let nano = v.saturating_mul(NANO_PER_UNIT[usize::from(frac)]);
                        m.cost_nanousd = (!neg || nano == 0).then_some(nano);
                        end
                    }
                    None => {
                        let end = self.number(start)?;
                        m.cost_nanousd = self.ascii(start, end).and_then(nano_usd);
                        end
                    }
                },
                (_, b'-' | b'0'..=b'9') => self.number(start)?,
                _ => self.value(start, 1)?,
            };
            // A value of another type reads as absent (a string, an object..).
            match key {
                LayoutKey::Latency if first > b'9' || first == b'"' => m.latency_ms = None,
                LayoutKey::Input if first > b'9' || first == b'"' => m.input_tokens = None,
                LayoutKey::Output if first > b'9' || first == b'"' => m.output_tokens = None,
                LayoutKey::Cost if first > b'9' || first == b'"' => m.cost_nanousd = None,
                LayoutKey::Held if first > b'9' || first == b'"' => m.tokens_held = None,
                LayoutKey::Call if first > b'9' || first == b'"' => m.call = None,
                LayoutKey::Attempt if first > b'9' || first == b'"' => m.attempt = None,
                LayoutKey::Reserved if first > b'9' || first == b'"' => {
                    m.prompt_tokens_reserved = None;
                }
                LayoutKey::MaxTokens if first > b'9' || first == b'"' => m.max_tokens = None,
                LayoutKey::InputHash => {
                    m.input_sha256 = (first == b'"').then(|| (start + 1, end - 1));
                }
                LayoutKey::Model => m.model = Some((start, end)),
                LayoutKey::Usage => m.usage_unknown = &self.line[start..end] == b"\"unknown\"",
                LayoutKey::OutputHash => {
                    m.output_sha256 = (first == b'"').then(|| (start + 1, end - 1));
                }
                _ => {}
            }
            p = end;
            match *self.line.get(p)? {
                b',' => p = self.spaces(p + 1),
                b'}' => return Some(p + 1),
                b' ' => {
                    p = self.spaces(p);
                    match *self.line.get(p)? {
                        b',' => p = self.spaces(p + 1),
                        b'}' => return Some(p + 1),
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
    }

    /// The bytes `a..b` of the line as text, when they are ASCII (a number's).
    #[inline]
    fn ascii(&self, a: usize, b: usize) -> Option<&str> {
        std::str::from_utf8(&self.line[a..b]).ok()
    }

    fn array(&mut self, p: usize, depth: usize) -> Option<usize> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut p = self.spaces(p + 1);
        if self.line.get(p) == Some(&b']') {
            return Some(p + 1);
        }
        loop {
            let end = self.value(p, depth)?;
            p = self.spaces(end);
            match self.line.get(p)? {
                b',' => p = self.spaces(p + 1),
                b']' => return Some(p + 1),
                _ => return None,
            }
        }
    }

    /// A number at `p` of the form `-?(0|[1-9]\d{0,6})(\.\d{1,7})?` (eight
    /// bytes at a time): (its digits as one integer, digits after the point,
    /// minus, position after it). None for any other text, valid or not
    /// ([`Fast::number`] decides it).
    #[inline(always)]
    fn short_number(&self, p: usize) -> Option<(u64, u8, bool, usize)> {
        let b = self.line;
        let neg = b.get(p) == Some(&b'-');
        let q = p + usize::from(neg);
        if q + 8 > b.len() {
            return None;
        }
        let x = word8(b, q);
        let n = leading_digits(x);
        if n == 0 || n == 8 || (n > 1 && b[q] == b'0') {
            return None;
        }
        let mut e = q + n;
        if (x >> (8 * n)) as u8 == b'.' && n < 6 {
            // Point and fraction in the same word (`1100.5`): the digits
            // either side of the point joined, read in one go.
            let y = x >> (8 * (n + 1));
            let k = leading_digits(y);
            if k >= 1 && n + 1 + k < 8 {
                let low = (1u64 << (8 * n)) - 1;
                let joined = (x & low) | (y << (8 * n));
                e += 1 + k;
                if matches!(b.get(e), Some(b'e' | b'E')) {
                    return None;
                }
                return Some((digits_value(joined, n + k), k as u8, neg, e));
            }
        }
        let mut m = digits_value(x, n);
        let mut frac = 0;
        if b.get(e) == Some(&b'.') {
            if e + 9 > b.len() {
                return None;
            }
            let y = word8(b, e + 1);
            let k = leading_digits(y);
            if k == 0 || k == 8 {
                return None;
            }
            m = m * POW10_INT[k] + digits_value(y, k);
            frac = k as u8;
            e += 1 + k;
        }
        if matches!(b.get(e), Some(b'e' | b'E')) {
            return None;
        }
        Some((m, frac, neg, e))
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    #[inline(always)]
    fn number(&self, mut p: usize) -> Option<usize> {
        let b = self.line;
        let digits = |p: usize| self.digit_run(p);
        if b.get(p) == Some(&b'-') {
            p += 1;
        }
        match b.get(p)? {
            b'0' => p += 1,
            b'1'..=b'9' => p += digits(p),
            _ => return None,
        }
        if b.get(p) == Some(&b'.') {
            let n = digits(p + 1);
            if n == 0 {
                return None;
            }
            p += 1 + n;
        }
        if matches!(b.get(p), Some(b'e' | b'E')) {
            p += 1;
            if matches!(b.get(p), Some(b'+' | b'-')) {
                p += 1;
            }
            let n = digits(p);
            if n == 0 {
                return None;
            }
            p += n;
        }
        Some(p)
    }
}

fn describe(err: serde_json::Error) -> String {
    use serde_json::error::Category;
    let text = err.to_string();
    // serde_json appends " at line 1 column N"; the byte offset says more.
    let text = match text.rfind(" at line ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    };
    match err.classify() {
        Category::Syntax | Category::Eof => format!("invalid JSON: {text}"),
        Category::Data => {
            if text.starts_with("invalid type") && text.contains("expected struct") {
                "not a JSON object".to_string()
            } else {
                text
            }
        }
        Category::Io => text,
    }
}

/// Parse bytes a caller hands over (Python's `parse_lines` and `parse_bytes`)
/// into events and rejects.
///
/// With `split`, each chunk is a block of lines, cut by the same
/// [`LineSplitter`] the tailer and the fold use, and an unterminated last line
/// is a reject. Without, each chunk is one line, with or without its newline,
/// the lines taken to be consecutive. Bytes already in memory are not bounded
/// by the line limit.
pub fn parse_chunks(
    chunks: &[&[u8]],
    base_offset: u64,
    split: bool,
) -> (Vec<Event>, Vec<Malformed>) {
    let mut events = Vec::new();
    let mut bad = Vec::new();
    let mut parse = |line: &[u8], offset: u64, bad: &mut Vec<Malformed>| match parse_line(line) {
        Ok(e) => events.push(e.to_owned_event(offset)),
        Err(reason) => bad.push(Malformed { offset, reason }),
    };
    let mut offset = base_offset;
    for chunk in chunks {
        if split {
            let mut splitter = LineSplitter::new(usize::MAX, offset);
            splitter.feed(chunk, |piece| {
                if let Piece::Line(line, off) = piece {
                    parse(line, off, &mut bad);
                }
            });
            if splitter.pending() > 0 {
                bad.push(Malformed {
                    offset: splitter.line_start(),
                    reason: "incomplete last line (no newline)".to_string(),
                });
            }
            offset += chunk.len() as u64;
        } else {
            let line = chunk.strip_suffix(b"\n").unwrap_or(chunk);
            parse(line, offset, &mut bad);
            offset += line.len() as u64 + 1;
        }
    }
    (events, bad)
}

/// Write `s` as a JSON string literal (with quotes) the way orjson does:
/// UTF-8 kept as is, `"` and `\` escaped, control characters escaped.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A second, plain implementation of what a line holds, built on
/// `serde_json::Value` the way a user would (the last of duplicate keys wins),
/// for the comparison tests and the fuzz target (`fuzz/`). Never used by the
/// library itself.
#[cfg(any(test, feature = "fuzzing"))]
pub mod reference {
    use serde_json::{Map, Value};

    #[derive(Debug, Clone, PartialEq)]
    pub struct RefEvent {
        pub timestamp: String,
        pub session_id: String,
        pub event_type: String,
        pub component: String,
        pub message: String,
        pub tokens: u64,
        pub seq: Option<u64>,
        pub metadata: Map<String, Value>,
    }

    #[derive(Debug)]
    pub enum Verdict {
        Valid(Box<RefEvent>),
        Invalid,
        /// Beyond what `Value` can hold (a float out of range): not compared.
        Unknown,
    }

    pub fn verdict(line: &[u8]) -> Verdict {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let v: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) if e.to_string().contains("number out of range") => return Verdict::Unknown,
            Err(_) => return Verdict::Invalid,
        };
        event(v).map_or(Verdict::Invalid, |e| Verdict::Valid(Box::new(e)))
    }

    fn event(v: Value) -> Option<RefEvent> {
        let Value::Object(mut o) = v else { return None };
        let mut text = |k: &str| match o.remove(k) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let (timestamp, session_id, event_type, component, message) = (
            text("timestamp")?,
            text("session_id")?,
            text("event_type")?,
            text("component")?,
            text("message")?,
        );
        let int = |v: &Value| match v {
            Value::Number(n) if n.is_u64() => n.as_u64(),
            _ => None,
        };
        if o.values().any(|v| depth(v) > super::MAX_DEPTH) {
            return None;
        }
        let tokens = match o.get("tokens") {
            None => 0,
            Some(v) => int(v).filter(|t| *t <= super::MAX_TOKENS)?,
        };
        let seq = match o.get("seq") {
            None | Some(Value::Null) => None,
            Some(v) => Some(int(v)?),
        };
        let metadata = match o.remove("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => return None,
        };
        Some(RefEvent {
            timestamp,
            session_id,
            event_type,
            component,
            message,
            tokens,
            seq,
            metadata,
        })
    }

    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// Compare the parser with the reference on one line; panics with the line
    /// on any disagreement.
    pub fn check_line(line: &[u8]) {
        let ours = super::parse_line(line);
        let show = String::from_utf8_lossy(line);
        let bare = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some((fast, _)) = super::fast_parse(bare, &[]) {
            let general = super::parse_general(bare).unwrap_or_else(|e| {
                panic!("fast path took a line the general one rejects ({e}): {show}")
            });
            assert_eq!(fast.to_owned_event(0), general.to_owned_event(0), "{show}");
            let meta = fast.metadata.unwrap_or("{}");
            if let Ok(map) = serde_json::from_str::<Map<String, Value>>(meta) {
                for (k, v) in map {
                    let (_, picks) = super::fast_parse(bare, &["?", k.as_str()]).unwrap();
                    let text = picks[1].unwrap_or("?");
                    let got: Value = serde_json::from_str(text).unwrap();
                    assert_eq!(got, v, "key {k}: {show}");
                    // The fold's number readers read as serde does.
                    assert_eq!(
                        super::json_u64(text),
                        serde_json::from_str::<u64>(text).ok()
                    );
                    if let Ok(x) = serde_json::from_str::<f64>(text) {
                        let y = super::json_f64(text).map(f64::to_bits);
                        assert_eq!(y, Some(x.to_bits()), "{text}");
                    } else {
                        assert!(
                            super::json_f64(text).is_none_or(|x| !x.is_finite()),
                            "{text}"
                        );
                    }
                }
            }
        }
        check_block_path(line);
        match verdict(line) {
            Verdict::Unknown => {}
            Verdict::Invalid => assert!(ours.is_err(), "accepted an invalid line: {show}"),
            Verdict::Valid(want) => {
                let got = ours.unwrap_or_else(|e| panic!("rejected a valid line ({e}): {show}"));
                assert_eq!(got.timestamp, want.timestamp, "{show}");
                assert_eq!(got.session_id, want.session_id, "{show}");
                assert_eq!(got.event_type, want.event_type, "{show}");
                assert_eq!(got.component, want.component, "{show}");
                assert_eq!(got.message, want.message, "{show}");
                assert_eq!((got.tokens, got.seq), (want.tokens, want.seq), "{show}");
                let meta: Value = serde_json::from_str(got.metadata.unwrap_or("{}")).unwrap();
                assert_eq!(meta, Value::Object(want.metadata), "{show}");
            }
        }
    }

    /// The fold's path (the line inside an indexed block, with quotes,
    /// backslashes, control and non-ASCII bytes around it) gives what the
    /// line alone gives: the same verdict, fields and picked values.
    fn check_block_path(line: &[u8]) {
        use crate::scan::BlockIndex;
        const KEYS: [&str; 4] = ["latency_ms", "model", "status", "?"];
        let keys = super::KeySet::new(&KEYS);
        let show = String::from_utf8_lossy(line);
        let mut at = [super::Pick::default(); KEYS.len()];
        let alone = super::parse_line_picking(line, &keys, &mut at);
        let noise = b"\"\\\x01\xc3\xa9x{";
        let pad = line.len() % 71;
        let mut block: Vec<u8> = (0..pad).map(|i| noise[i % noise.len()]).collect();
        block.extend_from_slice(line);
        block.extend_from_slice(b"\n\"\\\xe9\"");
        let mut ix = BlockIndex::new();
        ix.index(&block);
        let mut at2 = [super::Pick::default(); KEYS.len()];
        let inside = super::parse_block_line(&block, &ix, pad, line.len(), &keys, &mut at2);
        match (alone, inside) {
            (Ok((a, pa)), Ok((b, pb))) => {
                assert_eq!(a.to_owned_event(0), b.to_owned_event(0), "{show}");
                if let (Some(pa), Some(pb)) = (pa, pb) {
                    for i in 0..KEYS.len() {
                        assert_eq!(pa.get(i), pb.get(i), "{show}");
                    }
                }
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "{show}"),
            (a, b) => panic!(
                "the block path disagrees ({:?} vs {:?}): {show}",
                a.map(|e| e.0.to_owned_event(0)),
                b.map(|e| e.0.to_owned_event(0))
            ),
        }
    }

    /// Fold `data` (lines split at `\n`, a partial last line left out) and
    /// compare the totals with a sum over the reference's valid lines.
    pub fn check_fold(data: &[u8]) {
        use crate::fold::{fold_reader, FoldState, MAX_NAMES};
        use std::collections::HashMap;
        let mut fold = FoldState::new(0);
        fold_reader(&mut fold, &mut &data[..], 0, 1 << 20).unwrap();
        let mut lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
        lines.pop(); // the piece after the last newline is not a line yet
        let (mut entries, mut tokens, mut bad) = (0u64, 0u64, 0u64);
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut comps: HashMap<String, u64> = HashMap::new();
        for line in &lines {
            match verdict(line) {
                Verdict::Unknown => return,
                Verdict::Invalid => bad += 1,
                Verdict::Valid(e) => {
                    entries += 1;
                    tokens = tokens.saturating_add(e.tokens);
                    *counts.entry(e.event_type).or_default() += 1;
                    let c = comps.entry(e.component).or_default();
                    *c = c.saturating_add(e.tokens);
                }
            }
        }
        let show = String::from_utf8_lossy(data);
        // Line by line, without the block index: the same fold exactly.
        let mut by_line = FoldState::new(0);
        let mut offset = 0u64;
        for line in &lines {
            by_line.feed_line(line, offset);
            offset += line.len() as u64 + 1;
        }
        by_line.torn_tail = fold.torn_tail;
        assert!(fold == by_line, "{show}");
        assert_eq!(fold.entries, entries, "{show}");
        assert_eq!(fold.malformed + fold.oversize_lines, bad, "{show}");
        assert_eq!(fold.tokens, tokens, "{show}");
        if counts.len() < MAX_NAMES && comps.len() < MAX_NAMES {
            let got: HashMap<String, u64> = fold
                .event_counts
                .iter()
                .map(|(k, &n)| (k.to_string(), n))
                .collect();
            assert_eq!(got, counts, "{show}");
            let got: HashMap<String, u64> = fold
                .components
                .iter()
                .map(|(k, c)| (k.to_string(), c.tokens))
                .collect();
            assert_eq!(got, comps, "{show}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const GOOD: &str = r#"{"timestamp":"2026-01-11T10:15:33.234567","session_id":"s","event_type":"step_complete","component":"routing","message":"ok","tokens":50,"metadata":{"latency_ms":1100},"seq":3}"#;

    #[test]
    fn parses_a_valid_line() {
        let e = parse_line(GOOD.as_bytes()).unwrap();
        assert_eq!(e.tokens, 50);
        assert_eq!(e.seq, Some(3));
        assert_eq!(e.component, "routing");
        assert_eq!(e.metadata.unwrap(), r#"{"latency_ms":1100}"#);
    }

    #[test]
    fn tokens_default_to_zero_and_seq_is_optional() {
        let line =
            r#"{"timestamp":"t","session_id":"s","event_type":"x","component":"c","message":"m"}"#;
        let e = parse_line(line.as_bytes()).unwrap();
        assert_eq!(e.tokens, 0);
        assert_eq!(e.seq, None);
        assert!(e.metadata.is_none());
    }

    #[test]
    fn rejects_bad_lines_with_reasons() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"   ", "empty"),
            (b"{not json", "invalid JSON"),
            (b"[1,2]", "not a JSON object"),
            (b"42", "not a JSON object"),
            (b"\xff\xfe{}", "invalid UTF-8"),
            (br#"{"timestamp":"t","session_id":"s","event_type":"x","component":"c"}"#, "missing field `message`"),
            (br#"{"timestamp":"t","session_id":"s","event_type":"x","component":"c","message":"m","tokens":-5}"#, "invalid value"),
            (br#"{"timestamp":"t","session_id":"s","event_type":"x","component":"c","message":"m","tokens":1.5}"#, "invalid type"),
            (br#"{"timestamp":"t","session_id":"s","event_type":"x","component":"c","message":"m","tokens":"7"}"#, "invalid type"),
            (br#"{"timestamp":"t","session_id":"s","event_type":"x","component":"c","message":"m","metadata":[1]}"#, "metadata"),
            (br#"{"timestamp":1,"session_id":"s","event_type":"x","component":"c","message":"m"}"#, "invalid type"),
        ];
        for (line, want) in cases {
            let err = parse_line(line).unwrap_err();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn fast_path_agrees_with_the_general_parser() {
        let lines = [
            GOOD.to_string(),
            GOOD.replace(r#""seq":3}"#, r#""seq":0}"#),
            GOOD.replace(r#""tokens":50"#, r#""tokens":0"#),
            GOOD.replace(
                r#"{"latency_ms":1100}"#,
                r#"{"a":{"b":[1,"x}"]},"seq":"no"}"#,
            ),
            GOOD.replace(r#""message":"ok""#, r#""message":"café ✓""#),
        ];
        for line in &lines {
            let (fast, _) = fast_parse(line.as_bytes(), &[]).expect("fast path applies");
            let slow = parse_general(line.as_bytes()).unwrap();
            assert_eq!(fast.to_owned_event(0), slow.to_owned_event(0), "{line}");
        }
        // Shapes the fast path must leave to the general parser (or reject).
        let odd = [
            GOOD.replace(r#""tokens":50"#, r#""tokens":050"#),
            GOOD.replace(r#""tokens":50"#, r#""tokens":-50"#),
            GOOD.replace(r#""seq":3}"#, r#""seq":3} "#),
            GOOD.replace(r#""message":"ok""#, r#""message":"o\"k""#),
            GOOD.replace(r#"{"latency_ms":1100}"#, r#"{"latency_ms":}"#),
            GOOD.replace(r#"{"latency_ms":1100}"#, "[1]"),
            GOOD.replace(r#""seq":3}"#, r#""seq":99999999999999999999}"#),
        ];
        for line in &odd {
            assert!(fast_parse(line.as_bytes(), &[]).is_none(), "{line}");
        }
        assert!(parse_line(odd[0].as_bytes()).is_err());
        assert!(parse_line(odd[1].as_bytes()).is_err());
        assert_eq!(parse_line(odd[2].as_bytes()).unwrap().seq, Some(3));
        assert_eq!(parse_line(odd[3].as_bytes()).unwrap().message, "o\"k");
        assert!(parse_line(odd[4].as_bytes()).is_err());
        assert!(parse_line(odd[5].as_bytes()).is_err());
        assert!(parse_line(odd[6].as_bytes()).is_err());
    }

    #[test]
    fn a_key_after_metadata_goes_to_the_general_parser() {
        let line = GOOD.replace(r#","seq":3}"#, r#","extra":{"x":"}"},"seq":3}"#);
        assert!(fast_parse(line.as_bytes(), &[]).is_none());
        let e = parse_line(line.as_bytes()).unwrap();
        assert_eq!(e.metadata, Some(r#"{"latency_ms":1100}"#));
        assert_eq!((e.tokens, e.seq), (50, Some(3)));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let line = r#"{"timestamp":"t","session_id":"s","event_type":"x","component":"c","message":"a\"b\nc\u00e9"}"#;
        let e = parse_line(line.as_bytes()).unwrap();
        assert_eq!(e.message, "a\"b\nc\u{e9}");
    }

    #[test]
    fn parse_chunks_splits_lines_and_reports_offsets() {
        let good =
            br#"{"timestamp":"t","session_id":"s","event_type":"x","component":"c","message":"m"}"#;
        let mut data = good.to_vec();
        data.extend_from_slice(b"\nnot json\n");
        data.extend_from_slice(good);
        let (events, bad) = parse_chunks(&[&data], 10, true);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].offset, 10);
        let at: Vec<u64> = bad.iter().map(|m| m.offset).collect();
        let torn = 10 + good.len() as u64 + 10;
        assert_eq!(at, vec![10 + good.len() as u64 + 1, torn]);
        assert_eq!(bad[1].reason, "incomplete last line (no newline)");

        // One line per chunk, with or without its newline, taken as consecutive.
        let with_nl = [good.as_slice(), b"\n"].concat();
        let (events, bad) = parse_chunks(&[&with_nl, good, b"{"], 0, false);
        let offsets: Vec<u64> = events.iter().map(|e| e.offset).collect();
        let step = good.len() as u64 + 1;
        assert_eq!(offsets, vec![0, step]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].offset, 2 * step);
    }

    #[test]
    fn short_decimals_read_as_the_general_parser_reads_them() {
        let mut rng = Rng(0x0dec_1a57_0000_0001);
        let mut texts: Vec<String> = [
            "0",
            "-0",
            "0.0",
            "-0.5",
            "1100.5",
            "13.114189588",
            "999999999999999",
            "0.000000000000001",
            "9007199254740.99",
            "1.5",
            "00",
            "01.5",
            "1.",
            ".5",
            "-",
            "1.2.3",
            "+1",
            "1e3",
            "123456789012345678",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for _ in 0..20_000 {
            let int = rng.next() % 10u64.pow(1 + rng.below(9) as u32);
            let frac_digits = rng.below(8);
            let frac = rng.next() % 10u64.pow(frac_digits as u32 + 1);
            let sign = if rng.below(4) == 0 { "-" } else { "" };
            texts.push(format!("{sign}{int}.{frac:0w$}", w = frac_digits + 1));
        }
        for t in &texts {
            let want = serde_json::from_str::<f64>(t).ok().map(f64::to_bits);
            if let Some(got) = short_decimal(t.as_bytes()) {
                assert_eq!(Some(got.to_bits()), want, "{t}");
            }
            assert_eq!(
                json_f64(t).map(f64::to_bits),
                t.parse::<f64>()
                    .ok()
                    .filter(|_| { matches!(t.as_bytes()[0], b'-' | b'0'..=b'9') })
                    .map(f64::to_bits),
                "{t}"
            );
        }
        assert_eq!(short_decimal(b"1100.5"), Some(1100.5));
        assert!(short_decimal(b"01").is_none() && short_decimal(b"1e3").is_none());
    }

    #[test]
    fn word_at_a_time_integers_read_as_serde_reads_them() {
        let mut rng = Rng(0x1_2345_6789);
        let mut texts: Vec<String> = [
            "0",
            "00",
            "01",
            "7",
            "10",
            "1234567",
            "12345678",
            "99999999",
            "18446744073709551615",
            "18446744073709551616",
            "123456789012345678901",
            "",
            "-1",
            "1.5",
            "1e3",
            "9007199254740992",
            "9007199254740993",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for _ in 0..5000 {
            let digits = 1 + rng.below(20);
            let mut t: String = (0..digits)
                .map(|_| (b'0' + rng.below(10) as u8) as char)
                .collect();
            if rng.below(4) == 0 {
                t.push(*rng.pick(&['}', ',', '.', 'e', ' ', '/', ':', '\u{ff}']));
            }
            texts.push(t);
        }
        for t in &texts {
            for (pre, post) in [
                ("", ""),
                ("\"tokens\":", ""),
                ("\"seq\":", "}"),
                ("", ",\"x\":1}"),
            ] {
                let line = format!("{pre}{t}{post}");
                let f = Fast {
                    line: line.as_bytes(),
                    ix: LineIndex::new(line.as_bytes()),
                    keys: &KeySet::new(&[]),
                    picks: &mut [],
                    seen: 0,
                    nums: 0,
                };
                let got = f.uint(pre.len());
                let want = f.uint_slow(pre.len());
                assert_eq!(got, want, "{line}");
                // As serde reads the number the line holds there.
                let digits = line[pre.len()..]
                    .bytes()
                    .take_while(u8::is_ascii_digit)
                    .count();
                let text = &line[pre.len()..pre.len() + digits];
                let plain = serde_json::from_str::<u64>(text)
                    .ok()
                    .filter(|_| !text.is_empty());
                assert_eq!(got.map(|(v, _)| v), plain, "{line}");
            }
        }
    }

    #[test]
    fn numbers_read_while_validating_read_as_their_text_reads() {
        let texts = [
            "0",
            "-0",
            "7",
            "-7",
            "1100.5",
            "-1100.5",
            "9999999",
            "10000000",
            "1234567.1234567",
            "1.12345678",
            "0.1",
            "-0.0",
            "00",
            "01",
            "1.",
            "1.e5",
            "1e5",
            "1.5E-3",
            "-",
            "-a",
            "12345678",
            "0.30000001",
            "3.0",
            "18446744073709551615",
            "18446744073709551616",
            "\"5\"",
            "true",
            "null",
            "[1]",
            "{\"a\":1}",
        ];
        for text in texts {
            for tail in ["", ",\"b\":2", " "] {
                let line = format!(
                    r#"{{"timestamp":"t","session_id":"s","event_type":"e","component":"c","message":"m","tokens":1,"metadata":{{"x":{text}{tail},"x":{text}}},"seq":1}}"#
                );
                reference::check_line(line.as_bytes());
                // fast_parse asserts the read-once values equal the text's.
                let got = super::fast_parse(line.as_bytes(), &["x"]);
                let valid = serde_json::from_str::<serde_json::Value>(text).is_ok();
                assert_eq!(got.is_some(), valid, "{line}");
                if let Some((_, picks)) = got {
                    assert_eq!(picks[0], Some(text), "{line}");
                }
            }
        }
    }

    #[test]
    fn same_bytes_equals_slice_equality() {
        let words: Vec<Vec<u8>> = (0..40)
            .flat_map(|n| {
                let base: Vec<u8> = (0..n as u8).map(|i| b'a' + i % 26).collect();
                let mut variants = vec![base.clone()];
                for at in 0..n {
                    let mut v = base.clone();
                    v[at] ^= 1;
                    variants.push(v);
                }
                variants
            })
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(same_bytes(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn json_string_escaping_round_trips() {
        for s in [
            "plain",
            "quote\"back\\slash",
            "ctl\u{1}\u{1f}\n\t\r\u{8}\u{c}",
            "ünïcødé ✓",
        ] {
            let mut out = vec![];
            push_json_str(&mut out, s);
            let back: String = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, s);
        }
        let mut out = vec![];
        push_json_str(&mut out, "\u{1}");
        assert_eq!(out, br#""\u0001""#);
    }

    /// A deterministic pseudo-random corpus (so `cargo test` runs what the
    /// fuzz target does): event lines with keys in any order, extra and
    /// duplicate keys, wrong types, escapes, non-ASCII, and byte mutations.
    #[test]
    fn the_parser_and_the_fold_agree_with_plain_json_on_a_random_corpus() {
        let mut rng = Rng(0x5eed_1234_abcd_9876);
        let mut block = Vec::new();
        for n in 0..20_000 {
            let line = random_line(&mut rng);
            reference::check_line(&line);
            block.extend_from_slice(&line);
            block.push(b'\n');
            if n % 50 == 49 {
                reference::check_fold(&block);
                block.clear();
            }
        }
    }

    /// The fuzz target's seeds (fuzz/seeds: the writer's layout, the proxy's
    /// calls, escapes, odd key orders) pass what the fuzz target checks.
    #[test]
    fn the_fuzz_seeds_agree_with_plain_json() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/compare_to_serde");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            for line in data.split(|b| *b == b'\n') {
                reference::check_line(line);
            }
            reference::check_fold(&data);
            seen += 1;
        }
        assert!(seen >= 7, "{seen} seeds in {}", dir.display());
    }

    /// The layout reader takes only lines the general parser reads the same
    /// way, and reads the metadata values the fold uses as plain JSON does.
    #[test]
    fn the_layout_reader_reads_what_plain_json_reads() {
        let mut rng = Rng(0x1a70_u64 << 32 | 0x5eed);
        let mut taken = 0;
        for _ in 0..30_000 {
            let line = writer_layout_line(&mut rng);
            let Some(l) = layout_line(&line, LineIndex::new(&line)) else {
                continue;
            };
            taken += 1;
            let e = parse_general(&line).expect("a layout line is valid");
            assert_eq!(
                (
                    l.timestamp,
                    l.event_type,
                    l.component,
                    l.tokens,
                    Some(l.seq)
                ),
                (
                    &*e.timestamp,
                    &*e.event_type,
                    &*e.component,
                    e.tokens,
                    e.seq
                )
            );
            // (A number past the double range is valid JSON that `Value`
            // refuses: the fold comparisons cover such lines.)
            let Ok(meta) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(
                e.metadata.unwrap(),
            ) else {
                continue;
            };
            let f = |k: &str| meta.get(k).and_then(|v| f64::deserialize(v).ok());
            let u = |k: &str| meta.get(k).and_then(|v| u64::deserialize(v).ok());
            let show = String::from_utf8_lossy(&line);
            assert_eq!(
                l.latency_ms.filter(|x| x.is_finite()).map(f64::to_bits),
                f("latency_ms").map(f64::to_bits),
                "{show}"
            );
            assert_eq!(l.input_tokens, u("input_tokens"), "{show}");
            assert_eq!(l.output_tokens, u("output_tokens"), "{show}");
            assert_eq!(l.tokens_held, u("tokens_held"), "{show}");
            assert_eq!(l.call, u("call"), "{show}");
            assert_eq!(l.attempt, u("attempt"), "{show}");
            assert_eq!(l.prompt_tokens_reserved, u("prompt_tokens_reserved"));
            assert_eq!(l.max_tokens, u("max_tokens"), "{show}");
            let text = |k: &str| meta.get(k).and_then(serde_json::Value::as_str);
            assert_eq!(l.input_sha256, text("input_sha256"), "{show}");
            assert_eq!(l.message, &*e.message, "{show}");
            let usage = meta.get("usage").and_then(serde_json::Value::as_str);
            assert_eq!(l.usage_unknown, usage == Some("unknown"), "{show}");
            let model = |json: &str| serde_json::from_str::<serde_json::Value>(json).unwrap();
            assert_eq!(l.model.map(model), meta.get("model").cloned(), "{show}");
            // cost_usd: as cost.rs reads the number (the corpus' are exact doubles).
            assert_eq!(
                l.cost_nanousd,
                meta.get("cost_usd")
                    .filter(|v| v.is_number())
                    .and_then(|v| nano_usd(&v.to_string())),
                "{show}"
            );
            // The picking fast path takes the same lines.
            assert!(fast_parse(&line, &["x"]).is_some(), "{show}");
        }
        assert!(taken > 5_000, "{taken}");
    }

    /// The writer's layout, the fast path's input, sometimes damaged.
    fn writer_layout_line(rng: &mut Rng) -> Vec<u8> {
        let mut line = format!(
            r#"{{"timestamp":{},"session_id":{},"event_type":{},"component":{},"message":{},"tokens":{},"metadata":{},"seq":{}}}"#,
            rng.pick(PLAIN),
            rng.pick(PLAIN),
            rng.pick(PLAIN),
            rng.pick(PLAIN),
            rng.pick(PLAIN),
            rng.pick(INTS),
            rng.pick(METAS),
            rng.pick(SEQS),
        )
        .into_bytes();
        if rng.below(100) < 20 {
            let at = rng.below(line.len());
            line[at] = *rng.pick(b"{}[]\",:\\0a \t\x7f\xc3\xa9\xff\r");
        }
        line
    }

    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    const STRINGS: &[&str] = &[
        r#""routing""#,
        r#""step_complete""#,
        r#""session_start""#,
        r#""2026-01-11T10:15:33.234567+00:00""#,
        r#""caf\u00e9 \"q\" \n""#,
        r#""m\u00e9moire""#,
        "\"mémoire ✓ 🚀\"",
        r#""""#,
        r#""a\\b""#,
        r#""\ud83d\ude80""#,
    ];
    const WRONG: &[&str] = &[
        "1",
        "-1",
        "1.5",
        "2.0",
        "1e3",
        "true",
        "null",
        "[]",
        "{}",
        r#""7""#,
        "-0",
        "18446744073709551616",
        "9007199254740993",
    ];
    const INTS: &[&str] = &[
        "0",
        "7",
        "50",
        "1100",
        "1234567",
        "12345678",
        "00",
        "07",
        "9007199254740992",
        "18446744073709551615",
    ];
    const SEQS: &[&str] = &[
        "0",
        "3",
        "4",
        "1100",
        "9999999",
        "12345678",
        "100000000",
        "9007199254740992",
        "18446744073709551614",
        "18446744073709551615",
        "18446744073709551616",
    ];
    const METAS: &[&str] = &[
        "{}",
        r#"{"latency_ms":1100.5,"model":"gpt-4o-mini"}"#,
        r#"{"budget":1000,"run":2,"allocations":{"routing":10}}"#,
        r#"{"a":"},\"seq\":1}","n":[1,{"b":"]"}]}"#,
        r#"{"status":"error","status":"complete"}"#,
        r#"{"latency_ms":1,"latency_ms":"x"}"#,
        r#"{"dropped":4}"#,
        r#"{"k\u00e9y":"v\\"}"#,
        "null",
        "[1]",
        r#"{"a":}"#,
        r#"{"a":[}"#,
        r#"{"deep":[[[[[[[[{"x":[1]}]]]]]]]]}"#,
        r#"{"n":-0,"m":1E+2,"o":0.5e-3,"p":-12.25}"#,
        r#"{"a":0.1,"b":123456789012345678901234567890,"c":1.7976931348623157e308}"#,
        r#"{"a":5e-324,"b":2.2250738585072011e-308,"c":943.3567169983137,"d":18446744073709551615}"#,
        r#"{"latency_ms":13.114189588902203,"budget":18446744073709551616,"run":007}"#,
        r#"{"n":01}"#,
        r#"{"n":1.}"#,
        r#"{"n":.5}"#,
        r#"{"n":1e}"#,
        r#"{"n":-}"#,
        r#"{"n":tru}"#,
        r#"{"n":nulls}"#,
        r#"{ "a" : 1 , "b" : [ 1 , { } , [ ] ] }"#,
        r#"{"a":1,}"#,
        r#"{,}"#,
        r#"{"a":[1,]}"#,
        r#"{"a":1 "b":2}"#,
        r#"{"a" 1}"#,
        r#"{"n":1e400}"#,
        r#"{"k":"}"}}"#,
        r#"{"1":1,"2":2,"3":3,"4":4,"5":5,"6":6,"7":7,"8":8,"9":9,"latency_ms":4}"#,
        r#"{"latency_ms":5,"latency_ms":6}"#,
        r#"{"a":1 ,"b":"x" }"#,
        r#"{"a":-0.5e+3,"model":"m" , "latency_ms" : 7 }"#,
        r#"{"a":1 x}"#,
        r#"{"a":"x" "b":1}"#,
        r#"{"a":-}"#,
        r#"{"a":-01}"#,
        r#"{"a":1.5E}"#,
        r#"{"latency_ms":12345678.25,"model":"gpt-4o-mini"}"#,
        r#"{"latency_ms":"1100","model":1,"status":{"x":1}}"#,
        r#"{"input_tokens":12,"output_tokens":30,"model":"m"}"#,
        r#"{"input_tokens":1.5,"output_tokens":-3,"latency_ms":"7"}"#,
        r#"{"output_tokens":"4","input_tokens":null,"model":{"a":[1]}}"#,
        r#"{"input_tokens":18446744073709551615,"output_tokens":18446744073709551616,"model":7}"#,
        r#"{"latency_ms":1e3,"input_tokens":1e2,"input_tokens":3,"output_tokens":0}"#,
        r#"{"model":"a","model":"b","latency_ms":-0.0,"latency_ms":12345678901.5}"#,
        r#"{ "model" : "x" , "input_tokens" : 5 , "output_tokens" : 07 }"#,
        r#"{"input_tokens":5,"input_tokens":"x","output_tokens":9,"output_tokens":[2]}"#,
        r#"{"input_tokens":12,"output_tokens":30,"model":"gpt-4o-mini","cost_usd":0.0005253}"#,
        r#"{"cost_usd":2.4e-06,"model":"m","cost_usd":1E+2}"#,
        r#"{"cost_usd":-0.5,"model":"m"}"#,
        r#"{"cost_usd":"0.5","model":"m"}"#,
        r#"{"cost_usd":3,"cost_usd":{"a":1}}"#,
        r#"{ "cost_usd" : 0.30000000000000004 , "model" : "x" }"#,
        // The proxy's events (python/sigil/proxy/metering.py): a call's start,
        // its end with usage or with unknown usage, a failure, a refusal.
        r#"{"run":1,"call":1,"endpoint":"/v1/chat/completions","model":"gpt-4o-mini","stream":false,"max_tokens":1024,"requested_max_tokens":2048,"prompt_tokens_reserved":350}"#,
        r#"{"run":1,"call":1,"endpoint":"/v1/chat/completions","model":"gpt-4o-mini","stream":true,"latency_ms":812.347,"status":200,"max_tokens":1024,"input_tokens":301,"output_tokens":21,"cached_input_tokens":128,"cost_usd":0.00005775}"#,
        r#"{"run":1,"call":3,"endpoint":"/v1/messages","model":"m","stream":false,"latency_ms":4.5,"status":200,"usage":"unknown","tokens_held":1374}"#,
        r#"{"run":2,"call":4,"endpoint":"/v1/responses","model":"m","stream":false,"latency_ms":30000.125,"status":502,"usage":"none","error":"upstream: bad gateway","category":"upstream"}"#,
        r#"{"run":1,"call":5,"endpoint":"/v1/chat/completions","model":"m","status":429,"error":"budget exceeded","category":"budget","latency_ms":0.012}"#,
        r#"{"run":1,"call":6,"model":"m","input_tokens":10,"output_tokens":2,"outcome":"failed_call","usage":"unknown","tokens_held":0}"#,
        r#"{"call":7,"call":"7","tokens_held":5,"tokens_held":null,"usage":"unknown","usage":"none"}"#,
        r#"{"call":"8","call":8,"tokens_held":"9","tokens_held":9,"usage":1,"usage":"unknown"}"#,
        r#"{"call":-1,"tokens_held":1.5,"usage":"Unknown"}"#,
        r#"{"call":9.0,"tokens_held":-0,"usage":["unknown"]}"#,
        r#"{"call":18446744073709551615,"tokens_held":18446744073709551616}"#,
        r#"{"call":1e2,"prompt_tokens_reserved":"x","max_tokens":-3}"#,
        r#"{ "call" : 12 , "tokens_held" : 34 , "usage" : "unknown" }"#,
        r#"{"call":{"id":1},"tokens_held":[1],"usage":{"x":"unknown"}}"#,
        // The orchestrator's step starts, and odd values of a start's keys.
        r#"{"run":1,"input_sha256":"0f3a9c5e"}"#,
        r#"{"attempt":2,"input_sha256":7,"attempt":"3","input_sha256":"ab"}"#,
        r#"{"attempt":-1,"max_tokens":18446744073709551615,"prompt_tokens_reserved":5}"#,
        r#"{"attempt":1.0,"max_tokens":"9","prompt_tokens_reserved":-0,"input_sha256":null}"#,
        r#"{"prompt_tokens_reserved":18446744073709551616,"max_tokens":[1],"attempt":null}"#,
    ];
    /// Strings the fast path takes (no backslash).
    const PLAIN: &[&str] = &[
        r#""routing""#,
        r#""step_complete""#,
        r#""token_consumption""#,
        r#""session_start""#,
        r#""step_error""#,
        r#""step_start""#,
        r#""2026-01-11T10:15:33.234567+00:00""#,
        "\"mémoire ✓ 🚀\"",
        r#""""#,
    ];

    pub(crate) fn random_line(rng: &mut Rng) -> Vec<u8> {
        if rng.below(100) < 40 {
            return writer_layout_line(rng);
        }
        let keys = [
            "timestamp",
            "session_id",
            "event_type",
            "component",
            "message",
            "tokens",
            "metadata",
            "seq",
        ];
        let mut parts: Vec<String> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let roll = rng.below(100);
            if roll < 3 {
                continue; // a missing key
            }
            let value = if roll < 8 {
                rng.pick(WRONG).to_string()
            } else {
                match i {
                    0..=4 => rng.pick(STRINGS).to_string(),
                    5 => rng.pick(INTS).to_string(),
                    7 => rng.pick(SEQS).to_string(),
                    _ => rng.pick(METAS).to_string(),
                }
            };
            parts.push(format!("\"{key}\":{value}"));
            if rng.below(100) < 4 {
                parts.push(format!("\"{key}\":{}", rng.pick(WRONG))); // a duplicate
            }
        }
        if rng.below(100) < 30 {
            let at = rng.below(parts.len() + 1);
            let extra = format!("\"extra\":{}", rng.pick(METAS));
            parts.insert(at, extra);
        }
        if rng.below(100) < 30 {
            // any key order
            for i in (1..parts.len()).rev() {
                parts.swap(i, rng.below(i + 1));
            }
        }
        let sep = if rng.below(100) < 5 { ", " } else { "," };
        let mut line = format!("{{{}}}", parts.join(sep)).into_bytes();
        let mutations = if rng.below(100) < 15 {
            1 + rng.below(3)
        } else {
            0
        };
        for _ in 0..mutations {
            let at = rng.below(line.len());
            match rng.below(3) {
                0 => line[at] = *rng.pick(b"{}[]\",:\\0a \x7f\xc3\xa9\xff\r\n"),
                1 => {
                    line.remove(at);
                }
                _ => line.insert(at, *rng.pick(b"{}\"\\,:9")),
            }
        }
        // A line never holds its newline.
        line.retain(|b| *b != b'\n');
        line
    }
}
