//! Parsing one JSON line into an event (ARCHITECTURE.md contracts 1 and 6).
//!
//! Pure Rust: no Python here. A line is valid when it is a JSON object with the
//! spec's required string fields, a non-negative integer `tokens` (default 0),
//! an optional non-negative integer `seq` and an optional object `metadata`.
//! Anything else is reported as malformed with a reason; nothing panics.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// An event borrowed from the line it was parsed from.
#[derive(Debug, Deserialize)]
pub struct RawEvent<'a> {
    #[serde(borrow)]
    pub timestamp: Cow<'a, str>,
    #[serde(borrow)]
    pub session_id: Cow<'a, str>,
    #[serde(borrow)]
    pub event_type: Cow<'a, str>,
    #[serde(borrow)]
    pub component: Cow<'a, str>,
    #[serde(borrow)]
    pub message: Cow<'a, str>,
    #[serde(default)]
    pub tokens: u64,
    #[serde(default)]
    pub seq: Option<u64>,
    /// The metadata object's JSON text.
    #[serde(default, borrow, deserialize_with = "raw_text")]
    pub metadata: Option<&'a str>,
}

fn raw_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de str>, D::Error> {
    let raw: Option<&'de RawValue> = Option::deserialize(d)?;
    Ok(raw.map(RawValue::get))
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
    parse_line_lazy(line, true).map(|(e, _)| e)
}

/// Like [`parse_line`], but on the fast path the metadata object's JSON may be
/// left for the caller to validate (the fold parses it anyway for the keys it
/// needs). Returns whether the metadata was validated.
pub fn parse_line_lazy(line: &[u8], validate_meta: bool) -> Result<(RawEvent<'_>, bool), String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if let Some(event) = fast_parse(line, validate_meta) {
        return Ok((event, validate_meta));
    }
    parse_general(line).map(|e| (e, true))
}

/// The general parser (serde): any key order, escapes, extra keys. Decides
/// every line the fast path does not take.
pub fn parse_general(line: &[u8]) -> Result<RawEvent<'_>, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        return Err("empty line".to_string());
    }
    if std::str::from_utf8(line).is_err() {
        return Err("invalid UTF-8".to_string());
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
    let event: RawEvent<'_> = serde_json::from_slice(line).map_err(describe)?;
    if let Some(meta) = event.metadata {
        if !meta.starts_with('{') {
            return Err("`metadata` is not an object".to_string());
        }
    }
    Ok(event)
}

/// The layout sigil's own writer produces, with no escapes in its strings:
/// `{"timestamp":"..","session_id":"..","event_type":"..","component":"..",
/// "message":"..","tokens":N,"metadata":{..},"seq":N}`. Parsed by hand in one
/// pass (the metadata object is still validated by serde); anything else
/// returns `None` and goes through the general parser, so results are the same.
fn fast_parse(line: &[u8], validate_meta: bool) -> Option<RawEvent<'_>> {
    let text = std::str::from_utf8(line).ok()?;
    let mut c = Cursor { s: text, i: 0 };
    c.lit("{\"timestamp\":")?;
    let timestamp = c.plain_str()?;
    c.lit(",\"session_id\":")?;
    let session_id = c.plain_str()?;
    c.lit(",\"event_type\":")?;
    let event_type = c.plain_str()?;
    c.lit(",\"component\":")?;
    let component = c.plain_str()?;
    c.lit(",\"message\":")?;
    let message = c.plain_str()?;
    c.lit(",\"tokens\":")?;
    let tokens = c.uint()?;
    c.lit(",\"metadata\":")?;
    // The metadata object ends at its matching brace; any other key after it
    // is not this layout (the general parser takes the line).
    let meta = c.object()?;
    c.lit(",\"seq\":")?;
    let seq = c.uint()?;
    c.lit("}")?;
    if c.i != text.len() {
        return None;
    }
    if validate_meta && !is_json(meta) {
        return None;
    }
    Some(RawEvent {
        timestamp: Cow::Borrowed(timestamp),
        session_id: Cow::Borrowed(session_id),
        event_type: Cow::Borrowed(event_type),
        component: Cow::Borrowed(component),
        message: Cow::Borrowed(message),
        tokens,
        seq: Some(seq),
        metadata: Some(meta),
    })
}

/// Whether `text` is one valid JSON value.
pub fn is_json(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn lit(&mut self, want: &str) -> Option<()> {
        if self.s[self.i..].starts_with(want) {
            self.i += want.len();
            Some(())
        } else {
            None
        }
    }

    /// A string without escapes or control characters.
    fn plain_str(&mut self) -> Option<&'a str> {
        let bytes = self.s.as_bytes();
        if bytes.get(self.i) != Some(&b'"') {
            return None;
        }
        let start = self.i + 1;
        let len = memchr::memchr2(b'"', b'\\', &bytes[start..])?;
        let end = start + len;
        if bytes[end] != b'"' || bytes[start..end].iter().any(|&b| b < 0x20) {
            return None;
        }
        self.i = end + 1;
        Some(&self.s[start..end])
    }

    /// The text of a `{...}` value up to its matching brace, skipping strings.
    /// Only delimits: the caller validates the JSON inside.
    fn object(&mut self) -> Option<&'a str> {
        let bytes = self.s.as_bytes();
        if bytes.get(self.i) != Some(&b'{') {
            return None;
        }
        let start = self.i;
        let mut depth = 0usize;
        let mut i = start;
        while i < bytes.len() {
            match bytes[i] {
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        self.i = i + 1;
                        return Some(&self.s[start..=i]);
                    }
                }
                b'"' => {
                    // Skip the string: up to the next quote not escaped.
                    i += 1;
                    loop {
                        let n = memchr::memchr2(b'"', b'\\', &bytes[i..])?;
                        i += n;
                        if bytes[i] == b'"' {
                            break;
                        }
                        i += 2;
                        if i > bytes.len() {
                            return None;
                        }
                    }
                }
                _ => {}
            }
            i += 1;
        }
        None
    }

    /// A non-negative JSON integer (no sign, fraction, exponent or leading zero).
    fn uint(&mut self) -> Option<u64> {
        let bytes = self.s.as_bytes();
        let start = self.i;
        let mut v: u64 = 0;
        while let Some(&b) = bytes.get(self.i) {
            if !b.is_ascii_digit() {
                break;
            }
            v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            self.i += 1;
        }
        let n = self.i - start;
        if n == 0 || (n > 1 && bytes[start] == b'0') {
            return None;
        }
        Some(v)
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

/// Split `data` into lines and parse them. Returns the complete lines' events and
/// rejects; `consumed` is the number of bytes up to and including the last `\n`
/// (a trailing partial line is left for the caller).
pub fn for_each_line<'a>(
    data: &'a [u8],
    base_offset: u64,
    mut on_line: impl FnMut(&'a [u8], u64),
) -> usize {
    let mut start = 0usize;
    for nl in memchr::memchr_iter(b'\n', data) {
        on_line(&data[start..nl], base_offset + start as u64);
        start = nl + 1;
    }
    start
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

#[cfg(test)]
mod tests {
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
            let fast = fast_parse(line.as_bytes(), true).expect("fast path applies");
            let slow: RawEvent<'_> = serde_json::from_str(line).unwrap();
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
            assert!(fast_parse(line.as_bytes(), true).is_none(), "{line}");
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
        assert!(fast_parse(line.as_bytes(), false).is_none());
        let (e, checked) = parse_line_lazy(line.as_bytes(), false).unwrap();
        assert!(checked);
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
    fn splits_lines_and_reports_offsets() {
        let data = b"ab\ncd\nef";
        let mut seen = vec![];
        let consumed = for_each_line(data, 10, |l, off| seen.push((l.to_vec(), off)));
        assert_eq!(consumed, 6);
        assert_eq!(seen, vec![(b"ab".to_vec(), 10), (b"cd".to_vec(), 13)]);
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
}
