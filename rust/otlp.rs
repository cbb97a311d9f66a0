//! OTLP trace ingest for `sigil collect`: an `ExportTraceServiceRequest`
//! (protobuf) decoded, its GenAI spans mapped to sigil events grouped by
//! session, and each session's events appended to its writer in one call.
//!
//! The mapping is `sigil.collect.mapping.map_span`'s, rule for rule (that
//! Python module is the reference the tests compare against); the dedupe and
//! aggregate rules are `sigil.collect.sink`'s. Decoding and writing run with
//! the GIL released.
//!
//! Bounds: the body is bounded by the caller (`--max-body`); a request holds at
//! most `max_spans` spans (more is `OverflowError`, HTTP 413); every text kept
//! from a span (its name, status message and the attributes the mapping reads)
//! is cut to `MAX_TEXT_BYTES`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Mutex;

use prost::Message;
use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::errors::guard;
use crate::writer::{itoa_u64, push_json_str};

/// The wire schema: opentelemetry-proto v1 (collector/trace/v1/trace_service.proto,
/// trace/v1/trace.proto, common/v1/common.proto, resource/v1/resource.proto),
/// only the fields read; the others are skipped by their wire type.
pub mod pb {
    //
    // ExportTraceServiceRequest (resource_spans = 1), ResourceSpans (resource = 1,
    // scope_spans = 2), Resource (attributes = 1) and ScopeSpans (spans = 2) are
    // walked on the wire (`super::each_field`), not decoded whole: a request's
    // spans are counted before one is allocated, then decoded one at a time.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "bytes", tag = "1")]
        pub trace_id: prost::bytes::Bytes,
        #[prost(bytes = "bytes", tag = "2")]
        pub span_id: prost::bytes::Bytes,
        #[prost(bytes = "bytes", tag = "4")]
        pub parent_span_id: prost::bytes::Bytes,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        // attributes (9) are read one at a time from the wire (`each_field`)
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(int32, tag = "3")]
        pub code: i32,
    }
    // Keys and string values are `Bytes` (the same wire type as a string):
    // slices of the body, not one allocation each; their UTF-8 is checked
    // where they are read.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(bytes = "bytes", tag = "1")]
        pub key: prost::bytes::Bytes,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(oneof = "Value", tags = "1, 2, 3, 4, 5, 6, 7")]
        pub value: Option<Value>,
    }
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(bytes = "bytes", tag = "1")]
        StringValue(prost::bytes::Bytes),
        #[prost(bool, tag = "2")]
        BoolValue(bool),
        #[prost(int64, tag = "3")]
        IntValue(i64),
        #[prost(double, tag = "4")]
        DoubleValue(f64),
        // An array or a list (never read) stays bytes of the body, checked on
        // the wire without allocating (`super::check_any_value`).
        #[prost(bytes = "bytes", tag = "5")]
        ArrayValue(prost::bytes::Bytes),
        #[prost(bytes = "bytes", tag = "6")]
        KvlistValue(prost::bytes::Bytes),
        #[prost(bytes = "bytes", tag = "7")]
        BytesValue(prost::bytes::Bytes),
    }
}

/// The longest text kept from a span (name, status message, attribute value).
pub const MAX_TEXT_BYTES: usize = 4096;
/// The most spans one request may carry.
pub const DEFAULT_MAX_SPANS: usize = 200_000;
/// A token count is at most MAX_TOKENS / 2, so input + output is one the log takes.
const MAX_COUNT: u64 = crate::parse::MAX_TOKENS / 2;
const STATUS_ERROR: i32 = 2;
/// `execution_logger._MAX_NAME_CHARS`: a longer event type + component is cut.
const MAX_NAME_CHARS: usize = 256;

// ---------------------------------------------------------------------------
// Attributes the mapping reads (decode.KEPT_ATTRIBUTES)

const IN: usize = 0;
const OUT: usize = 1;
const PROMPT: usize = 2;
const COMPLETION: usize = 3;
const REQ_MODEL: usize = 4;
const RESP_MODEL: usize = 5;
const OPERATION: usize = 6;
const AGENT: usize = 7;
const CONVERSATION: usize = 8;
const PROVIDER: usize = 9;
const SYSTEM: usize = 10;
const ERROR_TYPE: usize = 11;
const OI_PROMPT: usize = 12;
const OI_COMPLETION: usize = 13;
const OI_TOTAL: usize = 14;
const OI_MODEL: usize = 15;
const OI_PROVIDER: usize = 16;
const SESSION: usize = 17;
const OI_AGENT: usize = 18;
const OI_KIND: usize = 19;
const SIGIL_TOKENS: usize = 20;
const SIGIL_RUN_TOKENS: usize = 21;
const SIGIL_LATENCY: usize = 22;
const KEPT: usize = 23;

fn kept(key: &str) -> Option<usize> {
    Some(match key {
        "gen_ai.usage.input_tokens" => IN,
        "gen_ai.usage.output_tokens" => OUT,
        "gen_ai.usage.prompt_tokens" => PROMPT,
        "gen_ai.usage.completion_tokens" => COMPLETION,
        "gen_ai.request.model" => REQ_MODEL,
        "gen_ai.response.model" => RESP_MODEL,
        "gen_ai.operation.name" => OPERATION,
        "gen_ai.agent.name" => AGENT,
        "gen_ai.conversation.id" => CONVERSATION,
        "gen_ai.provider.name" => PROVIDER,
        "gen_ai.system" => SYSTEM,
        "error.type" => ERROR_TYPE,
        "llm.token_count.prompt" => OI_PROMPT,
        "llm.token_count.completion" => OI_COMPLETION,
        "llm.token_count.total" => OI_TOTAL,
        "llm.model_name" => OI_MODEL,
        "llm.provider" => OI_PROVIDER,
        "session.id" => SESSION,
        "agent.name" => OI_AGENT,
        "openinference.span.kind" => OI_KIND,
        "sigil.tokens" => SIGIL_TOKENS,
        "sigil.run.tokens" => SIGIL_RUN_TOKENS,
        "sigil.latency_ms" => SIGIL_LATENCY,
        _ => return None,
    })
}

/// An attribute's value as the Python decoders give it.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Str(String),
    Int(i64),
    /// A (JSON) integer outside i64, as Python's `float()` has it.
    BigInt(f64),
    Float(f64),
    Bool(bool),
}

type Attrs = [Option<Val>; KEPT];

/// One decoded span: IDs in lowercase hex.
#[derive(Clone, Debug)]
pub struct SpanIn {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub start_ns: i128,
    pub end_ns: i128,
    pub error: bool,
    pub status_message: String,
    pub attrs: Attrs,
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_TEXT_BYTES {
        let mut end = MAX_TEXT_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

fn utf8(bytes: &[u8]) -> Result<&str, Refused> {
    std::str::from_utf8(bytes).map_err(|_| {
        Refused::Malformed(
            "the body is not an OTLP protobuf trace request: \
             an attribute's key or value is not valid UTF-8"
                .into(),
        )
    })
}

fn pb_value(v: Option<&pb::AnyValue>) -> Result<Option<Val>, Refused> {
    let Some(value) = v.and_then(|v| v.value.as_ref()) else {
        return Ok(None);
    };
    Ok(match value {
        pb::Value::StringValue(s) => {
            let text = utf8(s)?;
            let mut end = text.len().min(MAX_TEXT_BYTES);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            Some(Val::Str(text[..end].to_string()))
        }
        pb::Value::BoolValue(b) => Some(Val::Bool(*b)),
        pb::Value::IntValue(i) => Some(Val::Int(*i)),
        pb::Value::DoubleValue(f) => Some(Val::Float(*f)),
        _ => None,
    })
}

fn pb_attr(kv: &pb::KeyValue, into: &mut Attrs) -> Result<(), Refused> {
    let key = utf8(&kv.key)?;
    match kept(key) {
        Some(slot) => into[slot] = pb_value(kv.value.as_ref())?,
        // not read, but a string that is not UTF-8 is a malformed body
        None => {
            if let Some(pb::Value::StringValue(s)) =
                kv.value.as_ref().and_then(|v| v.value.as_ref())
            {
                utf8(s)?;
            }
        }
    }
    Ok(())
}

/// Why a payload is refused.
#[derive(Debug, PartialEq)]
pub enum Refused {
    Malformed(String),
    TooManySpans(usize),
}

fn malformed(e: impl fmt::Display) -> Refused {
    Refused::Malformed(format!(
        "the body is not an OTLP protobuf trace request: {e}"
    ))
}

/// How deep arrays and lists of values may nest (prost's recursion limit).
const MAX_DEPTH: u32 = 100;

/// Walks the fields of one protobuf message on the wire, allocating nothing:
/// `on(tag, payload)` for each length-delimited field whose tag is in `wanted`
/// (one of them with another wire type is malformed); the others are skipped
/// by their wire type, as prost skips an unknown field.
fn each_field<'a>(
    mut buf: &'a [u8],
    wanted: &[u32],
    mut on: impl FnMut(u32, &'a [u8]) -> Result<(), Refused>,
) -> Result<(), Refused> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(malformed)?;
        let want = wanted.contains(&tag);
        if wire == WireType::LengthDelimited {
            let len = decode_varint(&mut buf).map_err(malformed)?;
            if len > buf.len() as u64 {
                return Err(malformed(
                    "failed to decode Protobuf message: buffer underflow",
                ));
            }
            let (field, rest) = buf.split_at(len as usize);
            buf = rest;
            if want {
                on(tag, field)?;
            }
        } else if want {
            return Err(malformed(format_args!(
                "failed to decode Protobuf message: invalid wire type: {wire:?} (expected LengthDelimited)"
            )));
        } else {
            skip_field(wire, tag, &mut buf, DecodeContext::default()).map_err(malformed)?;
        }
    }
    Ok(())
}

/// An array or a list of values (never read) checked as prost would decode
/// it (wire types, nesting depth) without building it. `depth` is the value's
/// message depth in the request (the request is 0), as prost counts it.
fn check_nested(value: Option<&pb::Value>, depth: u32) -> Result<(), Refused> {
    // an array's values are 2 messages deeper, a list's 3 (list, key-value)
    let any = |v: &[u8], step: u32| -> Result<(), Refused> {
        let depth = depth + step;
        if depth > MAX_DEPTH {
            return Err(malformed(
                "failed to decode Protobuf message: recursion limit reached",
            ));
        }
        let value = pb::AnyValue::decode(v).map_err(malformed)?;
        check_nested(value.value.as_ref(), depth)
    };
    match value {
        Some(pb::Value::ArrayValue(items)) => each_field(items, &[1], |_, v| any(v, 2)),
        Some(pb::Value::KvlistValue(items)) => {
            each_field(items, &[1], |_, kv| each_field(kv, &[2], |_, v| any(v, 3)))
        }
        _ => Ok(()),
    }
}

/// The span count of a request, walked on the wire: more than `max_spans` is
/// refused as soon as it is seen, before any span is decoded.
fn count_spans(body: &[u8], max_spans: usize) -> Result<usize, Refused> {
    let mut total = 0usize;
    each_field(body, &[1], |_, rs| {
        each_field(rs, &[2], |_, ss| {
            each_field(ss, &[2], |_, _| {
                total += 1;
                if total > max_spans {
                    return Err(Refused::TooManySpans(max_spans));
                }
                Ok(())
            })
        })
    })?;
    Ok(total)
}

/// Attributes (`KeyValue`s on the wire, field `tag` of `message`, at message
/// depth `depth`) read one at a time.
fn pb_attrs(
    body: &prost::bytes::Bytes,
    message: &[u8],
    tag: u32,
    depth: u32,
    into: &mut Attrs,
) -> Result<(), Refused> {
    each_field(message, &[tag], |_, kv| {
        let kv = pb::KeyValue::decode(sub(body, kv)).map_err(malformed)?;
        check_nested(kv.value.as_ref().and_then(|v| v.value.as_ref()), depth + 1)?;
        pb_attr(&kv, into)
    })
}

/// `part` (a slice of `body`'s bytes) as a `Bytes` sharing `body`'s buffer.
fn sub(body: &prost::bytes::Bytes, part: &[u8]) -> prost::bytes::Bytes {
    let start = part.as_ptr() as usize - body.as_ptr() as usize;
    body.slice(start..start + part.len())
}

/// An `ExportTraceServiceRequest` as spans (`decode.decode_protobuf`).
pub fn decode_protobuf(body: &[u8], max_spans: usize) -> Result<Vec<SpanIn>, Refused> {
    let total = count_spans(body, max_spans)?;
    let body = prost::bytes::Bytes::copy_from_slice(body);
    let mut out = Vec::with_capacity(total);
    each_field(&body, &[1], |_, rs| {
        let mut resource: Attrs = Default::default();
        each_field(rs, &[1, 2], |tag, field| {
            if tag == 1 {
                return pb_attrs(&body, field, 1, 3, &mut resource);
            }
            each_field(field, &[2], |_, raw| {
                let span = pb::Span::decode(sub(&body, raw)).map_err(malformed)?;
                if span.trace_id.len() != 16 || span.span_id.len() != 8 {
                    return Err(Refused::Malformed(format!(
                        "span {} has a trace ID of {} bytes and a span ID of {} bytes \
                         (16 and 8 expected)",
                        py_repr(&span.name),
                        span.trace_id.len(),
                        span.span_id.len()
                    )));
                }
                let mut attrs = resource.clone();
                pb_attrs(&body, raw, 9, 4, &mut attrs)?;
                let status = span.status.unwrap_or_default();
                out.push(SpanIn {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: cut(span.name),
                    start_ns: span.start_time_unix_nano.into(),
                    end_ns: span.end_time_unix_nano.into(),
                    error: status.code == STATUS_ERROR,
                    status_message: cut(status.message),
                    attrs,
                });
                Ok(())
            })
        })
    })?;
    Ok(out)
}

/// A string as Python's `repr` shows a plain one (for error messages only).
fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

// ---------------------------------------------------------------------------
// The mapping (mapping.map_span)

fn count(v: &Option<Val>) -> Option<u64> {
    match v.as_ref()? {
        Val::Int(i) => u64::try_from(*i).ok().filter(|&c| c <= MAX_COUNT),
        Val::Float(f) => (f.is_finite() && f.fract() == 0.0 && *f >= 0.0 && *f <= MAX_COUNT as f64)
            .then_some(*f as u64),
        // str.isdigit(), for ASCII digits
        Val::Str(s) => {
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                // all digits: a parse error is an overflow, far past MAX_COUNT
                s.parse::<u64>().ok().filter(|&c| c <= MAX_COUNT)
            } else {
                None
            }
        }
        Val::BigInt(_) | Val::Bool(_) => None,
    }
}

/// `mapping._reported`: the count under the first of `slots` the span has, and
/// whether that value is no count (negative, fractional, too large, text, a
/// bool). An invalid value is not skipped for the next name.
fn reported(a: &Attrs, slots: &[usize]) -> (Option<u64>, bool) {
    for &slot in slots {
        if a[slot].is_some() {
            let c = count(&a[slot]);
            return (c, c.is_none());
        }
    }
    (None, false)
}

fn text(v: &Option<Val>) -> Option<&str> {
    match v {
        Some(Val::Str(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// What one span becomes (mapping.SpanEvent), its texts scrubbed.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapped {
    /// `token_consumption` (else a step)
    pub tokens_only: bool,
    pub tokens: u64,
    pub usage: Option<u64>,
    pub error: bool,
    pub exported: bool,
    pub component: String,
    pub message: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub operation: Option<String>,
    pub latency_ms: Option<f64>,
    pub error_type: Option<String>,
    /// index into the batch's price requests
    pub price: Option<usize>,
    /// a span that can group model calls and report their usage again (GenAI
    /// `invoke_agent`/`create_agent`/`execute_tool`, an OpenInference kind
    /// other than `LLM`/`EMBEDDING`): held back when it reports usage before
    /// any of its children (`SessionState::write`)
    pub groups: bool,
}

impl Mapped {
    fn key(&self) -> String {
        let mut k = String::with_capacity(self.trace_id.len() + self.span_id.len());
        k.push_str(&self.trace_id);
        k.push_str(&self.span_id);
        k
    }
    fn parent_key(&self) -> Option<String> {
        (!self.parent_span_id.is_empty()).then(|| {
            let mut k = String::with_capacity(self.trace_id.len() + self.parent_span_id.len());
            k.push_str(&self.trace_id);
            k.push_str(&self.parent_span_id);
            k
        })
    }
}

/// Scrubs texts once per distinct string (`LogSanitizer`'s cache of clean ones).
#[derive(Default)]
struct Scrubber {
    cache: HashMap<String, String>,
}

impl Scrubber {
    const LIMIT: usize = 4096;
    fn scrub(&mut self, s: &str) -> String {
        if let Some(done) = self.cache.get(s) {
            return done.clone();
        }
        let done = crate::sanitize::sanitize(s).into_owned();
        if self.cache.len() >= Self::LIMIT {
            self.cache.clear();
        }
        self.cache.insert(s.to_string(), done.clone());
        done
    }
}

/// The raw session (conversation, session or trace ID) and the event of
/// `span`, or None when it is not a GenAI span.
fn map_span(span: &SpanIn, scrub: &mut Scrubber) -> Option<(String, Mapped)> {
    let a = &span.attrs;
    let operation = text(&a[OPERATION]);
    let sigil_tokens = count(&a[SIGIL_TOKENS]);
    let (mut input, bad_input) = reported(a, &[IN, PROMPT, OI_PROMPT]);
    let (mut output, bad_output) = reported(a, &[OUT, COMPLETION, OI_COMPLETION]);
    let mut invalid = bad_input || bad_output;
    let usage = if invalid {
        // A count that is no count makes the call's usage unknown, not the
        // valid half alone (as sigil proxy treats `prompt_tokens: -5`).
        input = None;
        output = None;
        None
    } else if input.is_some() || output.is_some() {
        Some(input.unwrap_or(0) + output.unwrap_or(0))
    } else {
        let (total, bad_total) = reported(a, &[OI_TOTAL]);
        invalid = bad_total;
        total
    };
    let oi_kind = text(&a[OI_KIND]);
    let llm_kind = matches!(oi_kind, Some("LLM" | "EMBEDDING"));
    let groups = match operation {
        Some(op) => matches!(op, "invoke_agent" | "create_agent" | "execute_tool"),
        None => oi_kind.is_some() && !llm_kind,
    };
    let tokens_only = if operation == Some("invoke_workflow") {
        if sigil_tokens.unwrap_or(0) == 0 {
            return None;
        }
        true
    } else if operation.is_some() || usage.is_some() || llm_kind || sigil_tokens.is_some() {
        false
    } else {
        return None;
    };
    let raw_session = text(&a[CONVERSATION])
        .or_else(|| text(&a[SESSION]))
        .unwrap_or(&span.trace_id)
        .to_string();
    let name = (!span.name.is_empty()).then_some(span.name.as_str());
    let component = text(&a[AGENT])
        .or_else(|| text(&a[OI_AGENT]))
        .or(operation)
        .or(name)
        .unwrap_or("llm");
    let tokens = sigil_tokens.unwrap_or(usage.unwrap_or(0));
    let model = text(&a[RESP_MODEL])
        .or_else(|| text(&a[REQ_MODEL]))
        .or_else(|| text(&a[OI_MODEL]));
    let provider = text(&a[PROVIDER])
        .or_else(|| text(&a[SYSTEM]))
        .or_else(|| text(&a[OI_PROVIDER]));
    let latency_ms = if span.end_ns >= span.start_ns && span.start_ns > 0 {
        Some((span.end_ns - span.start_ns) as f64 / 1e6)
    } else {
        match &a[SIGIL_LATENCY] {
            Some(Val::Int(i)) => Some(*i as f64),
            Some(Val::BigInt(f) | Val::Float(f)) => Some(*f),
            Some(Val::Bool(b)) => Some(if *b { 1.0 } else { 0.0 }),
            _ => None,
        }
    };
    let unknown = usage.is_none() && sigil_tokens.is_none();
    let shown = name.unwrap_or(component);
    let (error_type, message) = if span.error {
        let error_type = text(&a[ERROR_TYPE]).unwrap_or("_OTHER");
        let message = if span.status_message.is_empty() {
            format!("{shown} failed ({error_type})")
        } else {
            span.status_message.clone()
        };
        (Some(error_type), message)
    } else if unknown {
        let why = if invalid {
            "its token counts are not counts"
        } else {
            "the span reported none"
        };
        (None, format!("{shown}: usage unknown ({why})"))
    } else {
        (None, shown.to_string())
    };
    let model = model.map(|m| scrub.scrub(m));
    Some((
        raw_session,
        Mapped {
            tokens_only,
            tokens,
            usage,
            error: span.error,
            exported: sigil_tokens.is_some(),
            component: scrub.scrub(component),
            message: scrub.scrub(&message),
            trace_id: span.trace_id.clone(),
            span_id: span.span_id.clone(),
            parent_span_id: span.parent_span_id.clone(),
            input,
            output,
            model,
            provider: provider.map(|p| scrub.scrub(p)),
            operation: operation.map(|o| scrub.scrub(o)),
            latency_ms,
            error_type: error_type.map(|e| scrub.scrub(e)),
            price: None,
            groups,
        },
    ))
}

/// The mapped events of one request, grouped by raw session ID (in order of
/// first appearance), and the distinct (model, input, output) to price.
#[derive(Default, Debug)]
pub struct Batch {
    pub spans: usize,
    pub ignored: usize,
    pub groups: Vec<(String, Vec<Mapped>)>,
    pub prices: Vec<(String, u64, u64)>,
}

pub fn map_spans(spans: &[SpanIn]) -> Batch {
    let mut batch = Batch {
        spans: spans.len(),
        ..Batch::default()
    };
    let mut scrub = Scrubber::default();
    let mut by_session: HashMap<String, usize> = HashMap::new();
    let mut by_price: HashMap<(String, u64, u64), usize> = HashMap::new();
    for span in spans {
        let Some((raw, mut event)) = map_span(span, &mut scrub) else {
            batch.ignored += 1;
            continue;
        };
        if let Some(model) = &event.model {
            if event.input.is_some() || event.output.is_some() {
                let req = (
                    model.clone(),
                    event.input.unwrap_or(0),
                    event.output.unwrap_or(0),
                );
                let next = batch.prices.len();
                let idx = *by_price.entry(req.clone()).or_insert(next);
                if idx == next {
                    batch.prices.push(req);
                }
                event.price = Some(idx);
            }
        }
        let next = batch.groups.len();
        let idx = *by_session.entry(raw.clone()).or_insert(next);
        if idx == next {
            batch.groups.push((raw, Vec::new()));
        }
        batch.groups[idx].1.push(event);
    }
    batch
}

// ---------------------------------------------------------------------------
// Per-session state and writing (sink.SessionSink._write)
//
// Every token is counted once. A span reporting usage whose children reported
// theirs already is an *aggregate*: written with no tokens (`reported_*` and
// `aggregate: true` in its metadata). A span that can group model calls
// (`Mapped::groups`) reporting usage before any child is known is *pending*:
// written at once with no tokens (`reported_*`, `pending: true`) and held. A
// child reporting usage makes it an aggregate (nothing more is written for
// it); still without one when the grace passes or its run ends, it is
// *settled*: one `token_consumption` of its component with its tokens and cost
// (`settled: true`). A span whose parent is settled is *covered*: its usage is
// in that count, so it is written with no tokens (`covered: true`), and so
// are its own children. Each of these marks is in the log, so a session
// reopened from it (`add_parents`, `add_covered`, `add_pending`) keeps them.

/// Keys remembered per session in each set (the oldest half forgotten when full).
const MAX_PARENTS: usize = 65536;
/// Spans held pending per session at most: past it the oldest is settled.
const MAX_PENDING: usize = 4096;

/// A set of keys (trace ID + span ID) that forgets its oldest half when full.
#[derive(Default)]
struct Bounded {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Bounded {
    fn contains(&self, key: &str) -> bool {
        self.set.contains(key)
    }

    fn insert(&mut self, key: String) {
        if self.set.contains(&key) {
            return;
        }
        if self.set.len() >= MAX_PARENTS {
            for _ in 0..MAX_PARENTS / 2 {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
    }
}

/// A grouping span written with no tokens, waiting for a child or its settling.
struct Pending {
    /// when it was held (the caller's clock, seconds)
    held_at: f64,
    /// its place in `SessionState::pending_order`
    serial: u64,
    component: String,
    message: String,
    /// the metadata of its pending event (`reported_*`)
    meta: Vec<u8>,
}

#[derive(Default)]
pub struct SessionState {
    seen: HashSet<String>,
    /// spans whose children reported usage (a span reporting usage after is an aggregate)
    parents: Bounded,
    /// spans whose descendants' usage is counted already (settled or covered)
    covered: Bounded,
    pending: HashMap<String, Pending>,
    /// pending keys in the order they were held (stale entries skipped)
    pending_order: VecDeque<(u64, String)>,
    serial: u64,
}

fn push_key_str(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    push_json_str(out, value);
}

fn push_key_u64(out: &mut Vec<u8>, key: &str, value: u64) {
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(itoa_u64(value, &mut [0u8; 20]));
}

/// A float as orjson writes it (as `pyjson` does).
fn push_key_f64(out: &mut Vec<u8>, key: &str, value: f64) {
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    let _ = serde_json::to_writer(&mut *out, &value);
}

/// What the writes of one group did.
#[derive(Debug, Default, PartialEq)]
pub struct Written {
    pub written: u64,
    pub duplicates: u64,
}

/// Where events go: the writer (or a test's list).
pub trait Sink {
    fn event(
        &mut self,
        event_type: &str,
        component: &str,
        message: &str,
        tokens: u64,
        metadata: &[u8],
    ) -> Result<(), String>;
}

/// How a span reporting usage is counted.
#[derive(Clone, Copy, PartialEq)]
enum Count {
    /// its tokens
    Own,
    /// none: its children reported them
    Aggregate,
    /// none for now: held until a child reports or it is settled
    Pending,
    /// none: an ancestor settled with them
    Covered,
}

/// The settle event of a pending span: its tokens and metadata, from the
/// metadata of its pending event (None when that is not one).
fn settle_event(pending_meta: &[u8]) -> Option<(u64, Vec<u8>)> {
    use serde_json::{Map, Value};
    let meta: Map<String, Value> = serde_json::from_slice(pending_meta).ok()?;
    let tokens = meta.get("reported_tokens")?.as_u64()?;
    let mut out = Map::new();
    for (from, to) in [
        ("source", "source"),
        ("trace_id", "trace_id"),
        ("span_id", "span_id"),
        ("reported_input_tokens", "input_tokens"),
        ("reported_output_tokens", "output_tokens"),
        ("model", "model"),
        ("provider", "provider"),
        ("operation", "operation"),
        ("reported_cost_usd", "cost_usd"),
    ] {
        if let Some(v) = meta.get(from) {
            out.insert(to.to_string(), v.clone());
        }
    }
    out.insert("settled".to_string(), Value::Bool(true));
    Some((tokens, serde_json::to_vec(&out).ok()?))
}

/// The key (trace ID + span ID) in an event's metadata.
fn meta_key(meta: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ids<'a> {
        #[serde(borrow)]
        trace_id: Cow<'a, str>,
        #[serde(borrow)]
        span_id: Cow<'a, str>,
    }
    let ids: Ids<'_> = serde_json::from_slice(meta).ok()?;
    Some(format!("{}{}", ids.trace_id, ids.span_id))
}

impl SessionState {
    pub fn has_new(&self, events: &[Mapped]) -> bool {
        events.iter().any(|e| !self.seen.contains(&e.key()))
    }

    fn remember_parent(&mut self, key: String) {
        self.parents.insert(key);
    }

    /// Mark a span settled or covered (rebuilt from the log): its children count 0.
    fn remember_covered(&mut self, key: String) {
        self.covered.insert(key);
    }

    /// Hold a span pending (rebuilt from the log: `component`, `message` and
    /// the metadata of its pending event), unless a child made it an
    /// aggregate or it was settled. False when it is not held.
    fn hold(&mut self, component: &str, message: &str, meta: &[u8], now: f64) -> bool {
        let Some(key) = meta_key(meta) else {
            return false;
        };
        if settle_event(meta).is_none()
            || self.parents.contains(&key)
            || self.covered.contains(&key)
            || self.pending.contains_key(&key)
        {
            return false;
        }
        self.push_pending(
            key,
            component.to_string(),
            message.to_string(),
            meta.to_vec(),
            now,
        );
        true
    }

    fn push_pending(
        &mut self,
        key: String,
        component: String,
        message: String,
        meta: Vec<u8>,
        now: f64,
    ) {
        self.serial += 1;
        if self.pending_order.len() >= 4 * MAX_PENDING {
            // drop the entries of spans no longer pending
            let pending = &self.pending;
            self.pending_order
                .retain(|(serial, k)| pending.get(k).is_some_and(|p| p.serial == *serial));
        }
        self.pending_order.push_back((self.serial, key.clone()));
        self.pending.insert(
            key,
            Pending {
                held_at: now,
                serial: self.serial,
                component,
                message,
                meta,
            },
        );
    }

    /// How many spans are pending, held at or before `before` (None: all).
    pub fn pending_count(&self, before: Option<f64>) -> usize {
        match before {
            None => self.pending.len(),
            Some(b) => self.pending.values().filter(|p| p.held_at <= b).count(),
        }
    }

    /// Settle the pending spans held at or before `before` (None: all), the
    /// oldest first: each one `token_consumption` with its tokens. Returns
    /// how many were settled.
    pub fn settle(&mut self, before: Option<f64>, sink: &mut dyn Sink) -> Result<u64, String> {
        self.settle_some(before, usize::MAX, sink)
    }

    /// `settle`, at most `most` spans.
    fn settle_some(
        &mut self,
        before: Option<f64>,
        most: usize,
        sink: &mut dyn Sink,
    ) -> Result<u64, String> {
        let mut done = 0;
        let mut settled = 0;
        while settled < most {
            let Some((serial, key)) = self.pending_order.pop_front() else {
                break;
            };
            let Some(p) = self.pending.get(&key).filter(|p| p.serial == serial) else {
                continue; // made an aggregate (or held again) since
            };
            if before.is_some_and(|b| p.held_at > b) {
                self.pending_order.push_front((serial, key));
                break;
            }
            if let Some((tokens, meta)) = settle_event(&p.meta) {
                let mut component = Cow::Borrowed(p.component.as_str());
                bound_name("token_consumption", &mut component);
                let sent = sink.event("token_consumption", &component, &p.message, tokens, &meta);
                if let Err(e) = sent {
                    self.pending_order.push_front((serial, key));
                    return Err(e);
                }
                done += 1;
            }
            settled += 1;
            self.pending.remove(&key);
            self.covered.insert(key);
        }
        Ok(done)
    }

    /// Write `events` (of one session) to `sink`; `costs[i]` is the cost of
    /// the batch's i-th price request (None: unpriced); `now` is when (the
    /// caller's clock, seconds: what `settle` compares).
    pub fn write(
        &mut self,
        events: &[Mapped],
        costs: &[Option<f64>],
        now: f64,
        sink: &mut dyn Sink,
    ) -> Result<Written, String> {
        let mut done = Written::default();
        let mut meta = Vec::with_capacity(512);
        let mut ids = Vec::with_capacity(128);
        for e in events {
            let key = e.key();
            if self.seen.contains(&key) {
                done.duplicates += 1;
                continue;
            }
            let mut tokens = e.tokens;
            let mut count = Count::Own;
            let parent_key = if e.exported { None } else { e.parent_key() };
            // A descendant of a settled span: its usage is in that span's count.
            let covered = parent_key
                .as_ref()
                .is_some_and(|p| self.covered.contains(p));
            // A span reporting usage makes its parent an aggregate of it: the
            // parent's ID goes into the event, so a session reopened from its log
            // (idle, evicted, collect restarted) knows it again (`add_parents`).
            let mut child_of = None;
            if e.usage.is_some() && !e.exported {
                if tokens != 0 {
                    if covered {
                        count = Count::Covered;
                    } else if self.parents.contains(&key) {
                        // Its children reported this usage already (sink's module doc).
                        count = Count::Aggregate;
                    } else if e.groups {
                        // Its children may come: held until one does or it is settled.
                        count = Count::Pending;
                    }
                }
                if count != Count::Own {
                    tokens = 0;
                }
                if let Some(parent) = parent_key {
                    // A pending parent is an aggregate of this one now.
                    self.pending.remove(&parent);
                    self.remember_parent(parent);
                    child_of = Some(e.parent_span_id.as_str());
                }
            }
            meta.clear();
            meta.push(b'{');
            push_key_str(&mut meta, "source", "otlp");
            meta.push(b',');
            push_key_str(&mut meta, "trace_id", &e.trace_id);
            meta.push(b',');
            push_key_str(&mut meta, "span_id", &e.span_id);
            ids.clear();
            ids.extend_from_slice(&meta);
            ids.push(b'}');
            if let Some(parent) = child_of {
                meta.push(b',');
                push_key_str(&mut meta, "parent_span_id", parent);
            }
            if count == Count::Own {
                if let Some(n) = e.input {
                    meta.push(b',');
                    push_key_u64(&mut meta, "input_tokens", n);
                }
                if let Some(n) = e.output {
                    meta.push(b',');
                    push_key_u64(&mut meta, "output_tokens", n);
                }
            }
            if e.usage.is_none() && !e.exported {
                meta.push(b',');
                push_key_str(&mut meta, "usage", "unknown");
            }
            for (name, value) in [
                ("model", &e.model),
                ("provider", &e.provider),
                ("operation", &e.operation),
            ] {
                if let Some(v) = value {
                    meta.push(b',');
                    push_key_str(&mut meta, name, v);
                }
            }
            if let Some(l) = e.latency_ms {
                meta.push(b',');
                push_key_f64(&mut meta, "latency_ms", l);
            }
            if let Some(t) = &e.error_type {
                meta.push(b',');
                push_key_str(&mut meta, "error_type", t);
            }
            let cost = e.price.and_then(|i| costs.get(i).copied().flatten());
            if count == Count::Own {
                if let Some(cost) = cost {
                    meta.push(b',');
                    push_key_f64(&mut meta, "cost_usd", cost);
                }
            } else {
                if let Some(n) = e.input {
                    meta.push(b',');
                    push_key_u64(&mut meta, "reported_input_tokens", n);
                }
                if let Some(n) = e.output {
                    meta.push(b',');
                    push_key_u64(&mut meta, "reported_output_tokens", n);
                }
                meta.extend_from_slice(match count {
                    Count::Aggregate => b",\"aggregate\":true".as_slice(),
                    Count::Covered => b",\"covered\":true",
                    _ => b"",
                });
                if count == Count::Pending {
                    meta.push(b',');
                    push_key_u64(&mut meta, "reported_tokens", e.tokens);
                    if let Some(cost) = cost {
                        meta.push(b',');
                        push_key_f64(&mut meta, "reported_cost_usd", cost);
                    }
                    meta.extend_from_slice(b",\"pending\":true");
                }
            }
            if covered && count != Count::Covered && !e.exported {
                // no usage of its own, but its children are covered too
                meta.extend_from_slice(b",\"covered\":true");
            }
            meta.push(b'}');
            let mut component = Cow::Borrowed(e.component.as_str());
            if e.tokens_only {
                let event_type = "token_consumption";
                bound_name(event_type, &mut component);
                sink.event(event_type, &component, &e.message, tokens, &meta)?;
            } else {
                let end = if e.error {
                    "step_error"
                } else {
                    "step_complete"
                };
                let mut start_component = component.clone();
                bound_name("step_start", &mut start_component);
                bound_name(end, &mut component);
                sink.event("step_start", &start_component, &e.message, 0, &ids)?;
                sink.event(end, &component, &e.message, tokens, &meta)?;
            }
            if covered {
                self.covered.insert(key.clone());
            }
            if count == Count::Pending {
                self.push_pending(
                    key.clone(),
                    e.component.clone(),
                    e.message.clone(),
                    meta.clone(),
                    now,
                );
            }
            self.seen.insert(key);
            done.written += 1;
            if self.pending.len() > MAX_PENDING {
                self.settle_some(None, 1, sink)?;
            }
        }
        Ok(done)
    }
}

/// `execution_logger._bounded`'s cut of a long component.
fn bound_name(event_type: &str, component: &mut Cow<'_, str>) {
    if event_type.chars().count() + component.chars().count() > MAX_NAME_CHARS {
        let short: String = component.chars().take(128).collect();
        *component = Cow::Owned(short);
    }
}

struct WriterSink<'a> {
    writer: &'a crate::writer::AppendWriter,
}

impl Sink for WriterSink<'_> {
    fn event(
        &mut self,
        event_type: &str,
        component: &str,
        message: &str,
        tokens: u64,
        metadata: &[u8],
    ) -> Result<(), String> {
        self.writer
            .write_prepared(event_type, component, message, tokens, Some(metadata))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

// ---------------------------------------------------------------------------
// OTLP/JSON (decode.decode_json), for the shapes exporters send
//
// Typed and borrowed (no allocation per key or string without escapes). What
// these types refuse -- malformed JSON, a duplicate field, a value in an
// unusual form -- is left to the Python decoder, whose messages and
// conversions rule; so each type accepts only what Python reads the same way.

mod js {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;
    use serde_json::value::RawValue;

    /// A field that is present (null too: then `T` must take null, or it fails).
    pub fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        T::deserialize(d).map(Some)
    }

    /// A struct that must be a JSON object (serde's derive takes arrays too).
    pub struct Obj<T>(pub T);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = Obj<T>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                    T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Obj)
                }
            }
            d.deserialize_map(V(std::marker::PhantomData))
        }
    }

    #[derive(Deserialize)]
    pub struct Request<'a> {
        #[serde(rename = "resourceSpans", borrow, default)]
        pub resource_spans: Option<Vec<Obj<ResourceSpans<'a>>>>,
    }
    #[derive(Deserialize)]
    pub struct ResourceSpans<'a> {
        #[serde(borrow, default)]
        pub resource: Option<Obj<Resource<'a>>>,
        #[serde(rename = "scopeSpans", borrow, default)]
        pub scope_spans: Option<Vec<Obj<ScopeSpans<'a>>>>,
    }
    #[derive(Deserialize)]
    pub struct Resource<'a> {
        #[serde(borrow, default)]
        pub attributes: Option<Vec<Obj<KeyValue<'a>>>>,
    }
    #[derive(Deserialize)]
    pub struct ScopeSpans<'a> {
        #[serde(borrow, default)]
        pub spans: Option<Vec<Obj<Span<'a>>>>,
    }
    #[derive(Deserialize)]
    pub struct Span<'a> {
        #[serde(rename = "traceId", borrow)]
        pub trace_id: Cow<'a, str>,
        #[serde(rename = "spanId", borrow)]
        pub span_id: Cow<'a, str>,
        #[serde(rename = "parentSpanId", borrow, default)]
        pub parent_span_id: Option<Cow<'a, str>>,
        #[serde(borrow, default, deserialize_with = "present")]
        pub name: Option<Cow<'a, str>>,
        #[serde(rename = "startTimeUnixNano", default, deserialize_with = "present")]
        pub start: Option<Int>,
        #[serde(rename = "endTimeUnixNano", default, deserialize_with = "present")]
        pub end: Option<Int>,
        #[serde(borrow, default)]
        pub attributes: Option<Vec<Obj<KeyValue<'a>>>>,
        #[serde(borrow, default)]
        pub status: Option<Obj<Status<'a>>>,
    }
    #[derive(Deserialize)]
    pub struct Status<'a> {
        #[serde(default)]
        pub code: Option<Code>,
        #[serde(borrow, default, deserialize_with = "present")]
        pub message: Option<Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    pub struct KeyValue<'a> {
        #[serde(borrow)]
        pub key: Cow<'a, str>,
        #[serde(borrow, default, deserialize_with = "present")]
        pub value: Option<&'a RawValue>,
    }

    /// `_json_int` for a JSON integer or a string of ASCII digits (maybe `-`).
    pub struct Int(pub i128);

    impl<'de> Deserialize<'de> for Int {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Int;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an integer")
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                    Ok(Int(v.into()))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                    Ok(Int(v.into()))
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<Int, E> {
                    let digits = s.strip_prefix('-').unwrap_or(s);
                    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(E::custom("not plain digits"));
                    }
                    s.parse::<i128>().map(Int).map_err(E::custom)
                }
            }
            d.deserialize_any(V)
        }
    }

    /// Whether a status code is the error one (`code == 2 or "STATUS_CODE_ERROR"`).
    pub struct Code(pub bool);

    impl<'de> Deserialize<'de> for Code {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Code;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a status code")
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Code, E> {
                    Ok(Code(v == 2))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Code, E> {
                    Ok(Code(v == 2))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Code, E> {
                    Ok(Code(v == 2.0))
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<Code, E> {
                    Ok(Code(s == "STATUS_CODE_ERROR"))
                }
                fn visit_bool<E: de::Error>(self, _: bool) -> Result<Code, E> {
                    Ok(Code(false))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Code, E> {
                    Ok(Code(false))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Code, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Code(false))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Code, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(Code(false))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// A JSON number as Python's `float()` has it (never a string).
    struct Float(f64);

    impl<'de> Deserialize<'de> for Float {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Float;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a number")
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Float, E> {
                    Ok(Float(v as f64))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Float, E> {
                    Ok(Float(v as f64))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Float, E> {
                    Ok(Float(v))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// `_json_value`: the first of stringValue/intValue/doubleValue/boolValue
    /// (in the object's order), None when there is none.
    pub struct AnyValue(pub Option<super::Val>);

    impl<'de> Deserialize<'de> for AnyValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = AnyValue;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an AnyValue object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyValue, A::Error> {
                    use super::Val;
                    let mut found: Option<(Cow<'de, str>, Val)> = None;
                    while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                        let known = matches!(
                            name.as_ref(),
                            "stringValue" | "intValue" | "doubleValue" | "boolValue"
                        );
                        if !known {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                        if let Some((first, _)) = &found {
                            if *first == name {
                                // Python keeps the last value, at the first place
                                return Err(de::Error::custom("a duplicate key"));
                            }
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                        let value = match name.as_ref() {
                            "stringValue" => Val::Str(super::cut(
                                map.next_value::<Cow<'de, str>>()?.into_owned(),
                            )),
                            "intValue" => {
                                let Int(i) = map.next_value()?;
                                Val::Int(i64::try_from(i).map_err(de::Error::custom)?)
                            }
                            "doubleValue" => Val::Float(map.next_value::<Float>()?.0),
                            _ => Val::Bool(map.next_value::<bool>()?),
                        };
                        found = Some((name, value));
                    }
                    Ok(AnyValue(found.map(|(_, v)| v)))
                }
            }
            d.deserialize_map(V)
        }
    }
}

fn json_attrs(items: &Option<Vec<js::Obj<js::KeyValue<'_>>>>, into: &mut Attrs) -> Option<()> {
    for js::Obj(kv) in items.iter().flatten() {
        if let Some(slot) = kept(&kv.key) {
            into[slot] = match kv.value {
                None => None,
                Some(raw) => serde_json::from_str::<js::AnyValue>(raw.get()).ok()?.0,
            };
        }
    }
    Some(())
}

/// `_hex_id`: lowercase hex of `size` bytes.
fn json_id(s: &str, size: usize) -> Option<String> {
    (s.len() == size * 2 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| s.to_ascii_lowercase())
}

fn json_span(span: &js::Span<'_>, resource: &Attrs) -> Option<SpanIn> {
    let mut attrs = resource.clone();
    json_attrs(&span.attributes, &mut attrs)?;
    let (error, status_message) = match &span.status {
        None => (false, String::new()),
        Some(js::Obj(st)) => (
            st.code.as_ref().is_some_and(|c| c.0),
            st.message
                .as_deref()
                .map_or_else(String::new, |m| cut(m.to_string())),
        ),
    };
    let parent_span_id = match span.parent_span_id.as_deref() {
        None | Some("") => String::new(),
        Some(p) => json_id(p, 8)?,
    };
    Some(SpanIn {
        trace_id: json_id(&span.trace_id, 16)?,
        span_id: json_id(&span.span_id, 8)?,
        parent_span_id,
        name: span
            .name
            .as_deref()
            .map_or_else(String::new, |n| cut(n.to_string())),
        start_ns: span.start.as_ref().map_or(0, |t| t.0),
        end_ns: span.end.as_ref().map_or(0, |t| t.0),
        error,
        status_message,
        attrs,
    })
}

/// An `ExportTraceServiceRequest` in OTLP/JSON as spans, or `Ok(None)` when
/// the body is anything but the plain shapes exporters send (malformed, or a
/// value in an unusual form): the Python decoder then decides, with its
/// messages and its conversions.
pub fn decode_json(body: &[u8], max_spans: usize) -> Result<Option<Vec<SpanIn>>, Refused> {
    let Ok(js::Obj(request)) = serde_json::from_slice::<js::Obj<js::Request<'_>>>(body) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for js::Obj(rs) in request.resource_spans.iter().flatten() {
        let mut resource: Attrs = Default::default();
        if let Some(js::Obj(r)) = &rs.resource {
            if json_attrs(&r.attributes, &mut resource).is_none() {
                return Ok(None);
            }
        }
        for js::Obj(ss) in rs.scope_spans.iter().flatten() {
            for js::Obj(span) in ss.spans.iter().flatten() {
                if out.len() >= max_spans {
                    return Err(Refused::TooManySpans(max_spans));
                }
                match json_span(span, &resource) {
                    Some(s) => out.push(s),
                    None => return Ok(None),
                }
            }
        }
    }
    Ok(Some(out))
}

// ---------------------------------------------------------------------------
// Python

fn refused(r: Refused) -> PyErr {
    match r {
        Refused::Malformed(m) => PyValueError::new_err(m),
        Refused::TooManySpans(n) => {
            PyOverflowError::new_err(format!("the request has more than {n} spans"))
        }
    }
}

/// The mapped events of one OTLP trace request, grouped by session.
#[pyclass(frozen, module = "sigil._native", name = "OtlpBatch")]
pub struct PyOtlpBatch {
    batch: Batch,
}

#[pymethods]
impl PyOtlpBatch {
    /// Spans in the request.
    #[getter]
    fn spans(&self) -> usize {
        self.batch.spans
    }
    /// Spans that are not GenAI spans (no event).
    #[getter]
    fn ignored(&self) -> usize {
        self.batch.ignored
    }
    /// The raw session ID of each group (conversation, session or trace ID).
    fn sessions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.batch.groups.iter().map(|(raw, _)| raw.as_str()))
    }
    /// How many events each group holds.
    fn sizes(&self) -> Vec<usize> {
        self.batch.groups.iter().map(|(_, e)| e.len()).collect()
    }
    /// The distinct (model, input tokens, output tokens) to price.
    fn price_requests<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .batch
            .prices
            .iter()
            .map(|(m, i, o)| (m.as_str(), *i, *o).into_pyobject(py))
            .collect::<PyResult<Vec<Bound<'py, PyTuple>>>>()?;
        PyList::new(py, items)
    }
    /// The events as dicts (mapping.SpanEvent's fields; for tests).
    fn events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for (raw, events) in &self.batch.groups {
            for e in events {
                let d = PyDict::new(py);
                d.set_item("raw_session", raw)?;
                d.set_item("kind", if e.tokens_only { "tokens" } else { "step" })?;
                d.set_item("tokens", e.tokens)?;
                d.set_item("usage", e.usage)?;
                d.set_item("error", e.error)?;
                d.set_item("exported", e.exported)?;
                d.set_item("component", &e.component)?;
                d.set_item("message", &e.message)?;
                d.set_item("key", e.key())?;
                d.set_item("parent_key", e.parent_key().unwrap_or_default())?;
                d.set_item("input_tokens", e.input)?;
                d.set_item("output_tokens", e.output)?;
                d.set_item("model", &e.model)?;
                d.set_item("provider", &e.provider)?;
                d.set_item("operation", &e.operation)?;
                d.set_item("latency_ms", e.latency_ms)?;
                d.set_item("error_type", &e.error_type)?;
                d.set_item("groups", e.groups)?;
                out.append(d)?;
            }
        }
        Ok(out)
    }
}

/// Decode an `ExportTraceServiceRequest` (protobuf) and map its spans, with
/// the GIL released. `ValueError` for a malformed body, `OverflowError` for
/// more than `max_spans` spans.
#[pyfunction]
#[pyo3(signature = (body, *, max_spans = DEFAULT_MAX_SPANS))]
pub fn otlp_decode_protobuf(
    py: Python<'_>,
    body: &[u8],
    max_spans: usize,
) -> PyResult<PyOtlpBatch> {
    guard("otlp_decode_protobuf", || {
        let batch = py.detach(|| decode_protobuf(body, max_spans).map(|s| map_spans(&s)));
        batch.map(|batch| PyOtlpBatch { batch }).map_err(refused)
    })
}

/// Decode an OTLP/JSON trace request and map its spans, with the GIL
/// released; None when the body is not in the plain shapes exporters send
/// (then `decode.decode_json` decides). `OverflowError` past `max_spans`.
#[pyfunction]
#[pyo3(signature = (body, *, max_spans = DEFAULT_MAX_SPANS))]
pub fn otlp_decode_json(
    py: Python<'_>,
    body: &[u8],
    max_spans: usize,
) -> PyResult<Option<PyOtlpBatch>> {
    guard("otlp_decode_json", || {
        let batch =
            py.detach(|| decode_json(body, max_spans).map(|spans| spans.map(|s| map_spans(&s))));
        batch
            .map(|b| b.map(|batch| PyOtlpBatch { batch }))
            .map_err(refused)
    })
}

fn attr_value(v: &Bound<'_, PyAny>) -> PyResult<Option<Val>> {
    if let Ok(s) = v.cast_exact::<PyString>() {
        return Ok(Some(Val::Str(cut(s.to_str()?.to_string()))));
    }
    if let Ok(b) = v.cast::<pyo3::types::PyBool>() {
        return Ok(Some(Val::Bool(b.is_true())));
    }
    if v.is_instance_of::<pyo3::types::PyInt>() {
        return Ok(Some(match v.extract::<i64>() {
            Ok(i) => Val::Int(i),
            Err(_) => Val::BigInt(v.extract::<f64>()?),
        }));
    }
    if v.is_instance_of::<pyo3::types::PyFloat>() {
        return Ok(Some(Val::Float(v.extract::<f64>()?)));
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(Some(Val::Str(cut(s.to_str()?.to_string()))));
    }
    Ok(None)
}

fn span_in(span: &Bound<'_, PyAny>) -> PyResult<SpanIn> {
    let s = |name: &str| -> PyResult<String> { span.getattr(name)?.extract::<String>() };
    let mut attrs: Attrs = Default::default();
    let dict = span.getattr("attributes")?;
    let dict = dict.cast::<PyDict>()?;
    for (k, v) in dict.iter() {
        if let Ok(key) = k.cast::<PyString>() {
            if let Some(slot) = kept(key.to_str()?) {
                attrs[slot] = attr_value(&v)?;
            }
        }
    }
    Ok(SpanIn {
        trace_id: s("trace_id")?,
        span_id: s("span_id")?,
        parent_span_id: s("parent_span_id")?,
        name: cut(s("name")?),
        start_ns: span.getattr("start_ns")?.extract::<i128>()?,
        end_ns: span.getattr("end_ns")?.extract::<i128>()?,
        error: span.getattr("error")?.is_truthy()?,
        status_message: cut(s("status_message")?),
        attrs,
    })
}

/// Map spans decoded in Python (`sigil.collect.decode.SpanData`: the JSON
/// encoding's decoder) as `otlp_decode_protobuf` maps its own.
#[pyfunction]
#[pyo3(signature = (spans, *, max_spans = DEFAULT_MAX_SPANS))]
pub fn otlp_map_spans(
    py: Python<'_>,
    spans: &Bound<'_, PyAny>,
    max_spans: usize,
) -> PyResult<PyOtlpBatch> {
    guard("otlp_map_spans", || {
        let mut items = Vec::new();
        for span in spans.try_iter()? {
            if items.len() >= max_spans {
                return Err(refused(Refused::TooManySpans(max_spans)));
            }
            items.push(span_in(&span?).map_err(|e| PyValueError::new_err(e.to_string()))?);
        }
        let batch = py.detach(|| map_spans(&items));
        Ok(PyOtlpBatch { batch })
    })
}

/// One collected session's dedupe and aggregate state (sink.SessionSink).
#[pyclass(frozen, module = "sigil._native", name = "OtlpSession")]
pub struct PyOtlpSession {
    state: Mutex<SessionState>,
}

fn group(batch: &PyOtlpBatch, index: usize) -> PyResult<&[Mapped]> {
    batch
        .batch
        .groups
        .get(index)
        .map(|(_, e)| e.as_slice())
        .ok_or_else(|| PyValueError::new_err(format!("no group {index} in this batch")))
}

#[pymethods]
impl PyOtlpSession {
    #[new]
    fn new() -> Self {
        PyOtlpSession {
            state: Mutex::new(SessionState::default()),
        }
    }

    /// Mark spans (trace ID + span ID, hex) as written already.
    fn add_seen(&self, keys: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut st = crate::lock(&self.state);
        for key in keys.try_iter()? {
            st.seen.insert(key?.extract::<String>()?);
        }
        Ok(())
    }

    /// Mark spans (trace ID + span ID, hex) as parents whose children reported
    /// usage already (rebuilt from the log's `parent_span_id`): such a parent
    /// reporting usage is written as an aggregate, with no tokens.
    fn add_parents(&self, keys: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut st = crate::lock(&self.state);
        for key in keys.try_iter()? {
            st.remember_parent(key?.extract::<String>()?);
        }
        Ok(())
    }

    /// Mark spans (trace ID + span ID, hex) as settled or covered (rebuilt
    /// from the log's `settled`/`covered` events): their children count 0.
    fn add_covered(&self, keys: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut st = crate::lock(&self.state);
        for key in keys.try_iter()? {
            st.remember_covered(key?.extract::<String>()?);
        }
        Ok(())
    }

    /// Hold spans pending (rebuilt from the log: the component, message and
    /// metadata JSON of each `pending` event), held at `now`; after
    /// `add_parents` and `add_covered`, so that those made aggregates or
    /// settled are not. Returns how many are held.
    fn add_pending(&self, entries: &Bound<'_, PyAny>, now: f64) -> PyResult<usize> {
        let mut st = crate::lock(&self.state);
        let mut held = 0;
        for entry in entries.try_iter()? {
            let (component, message, meta): (String, String, Vec<u8>) = entry?.extract()?;
            held += usize::from(st.hold(&component, &message, &meta, now));
        }
        Ok(held)
    }

    /// How many spans are pending, held at or before `before` (None: all).
    #[pyo3(signature = (before = None))]
    fn pending(&self, before: Option<f64>) -> usize {
        crate::lock(&self.state).pending_count(before)
    }

    /// Settle the pending spans held at or before `before` (None: all) to
    /// `writer`: each one `token_consumption` with its tokens and cost, the
    /// GIL released. Returns (settled, dropped).
    #[pyo3(signature = (writer, before = None))]
    fn settle(
        &self,
        py: Python<'_>,
        writer: PyRef<'_, crate::PyAppendWriter>,
        before: Option<f64>,
    ) -> PyResult<(u64, u64)> {
        let w = &writer.inner;
        guard("OtlpSession.settle", || {
            let result = py.detach(|| {
                let before_dropped = w.dropped_events();
                let mut st = crate::lock(&self.state);
                let mut sink = WriterSink { writer: w };
                st.settle(before, &mut sink)
                    .map(|n| (n, w.dropped_events() - before_dropped))
            });
            result.map_err(PyValueError::new_err)
        })
    }

    /// How many spans are marked written.
    fn __len__(&self) -> usize {
        crate::lock(&self.state).seen.len()
    }

    /// Whether group `index` of `batch` holds a span not written yet.
    fn has_new(&self, batch: &PyOtlpBatch, index: usize) -> PyResult<bool> {
        let events = group(batch, index)?;
        Ok(crate::lock(&self.state).has_new(events))
    }

    /// Append group `index` of `batch` to `writer` (its events, in order, in
    /// one call, the GIL released); `costs` are the prices of the batch's
    /// `price_requests()` (None: unpriced); `now` is the clock `settle`
    /// compares (seconds, e.g. `time.monotonic()`). Returns (written,
    /// duplicates, dropped).
    fn write(
        &self,
        py: Python<'_>,
        batch: &PyOtlpBatch,
        index: usize,
        writer: PyRef<'_, crate::PyAppendWriter>,
        costs: Vec<Option<f64>>,
        now: f64,
    ) -> PyResult<(u64, u64, u64)> {
        let events = group(batch, index)?;
        let w = &writer.inner;
        guard("OtlpSession.write", || {
            let result = py.detach(|| {
                let before = w.dropped_events();
                let mut st = crate::lock(&self.state);
                let mut sink = WriterSink { writer: w };
                st.write(events, &costs, now, &mut sink)
                    .map(|d| (d.written, d.duplicates, w.dropped_events() - before))
            });
            result.map_err(PyValueError::new_err)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, v: pb::Value) -> pb::KeyValue {
        pb::KeyValue {
            key: prost::bytes::Bytes::copy_from_slice(key.as_bytes()),
            value: Some(pb::AnyValue { value: Some(v) }),
        }
    }

    /// The request's outer messages, for encoding (decoding walks them on the wire).
    mod enc {
        use super::pb;

        #[derive(Clone, PartialEq, prost::Message)]
        pub struct ExportTraceServiceRequest {
            #[prost(message, repeated, tag = "1")]
            pub resource_spans: Vec<ResourceSpans>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct ResourceSpans {
            #[prost(message, optional, tag = "1")]
            pub resource: Option<Resource>,
            #[prost(message, repeated, tag = "2")]
            pub scope_spans: Vec<ScopeSpans>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Resource {
            #[prost(message, repeated, tag = "1")]
            pub attributes: Vec<pb::KeyValue>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct ScopeSpans {
            #[prost(message, repeated, tag = "2")]
            pub spans: Vec<Span>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Span {
            #[prost(bytes = "bytes", tag = "1")]
            pub trace_id: prost::bytes::Bytes,
            #[prost(bytes = "bytes", tag = "2")]
            pub span_id: prost::bytes::Bytes,
            #[prost(bytes = "bytes", tag = "4")]
            pub parent_span_id: prost::bytes::Bytes,
            #[prost(string, tag = "5")]
            pub name: String,
            #[prost(fixed64, tag = "7")]
            pub start_time_unix_nano: u64,
            #[prost(fixed64, tag = "8")]
            pub end_time_unix_nano: u64,
            #[prost(message, repeated, tag = "9")]
            pub attributes: Vec<pb::KeyValue>,
            #[prost(message, optional, tag = "15")]
            pub status: Option<pb::Status>,
        }
    }

    /// A value as the whole schema has it (arrays and lists as messages).
    mod full {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Request {
            #[prost(message, repeated, tag = "1")]
            pub resource_spans: Vec<ResourceSpans>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct ResourceSpans {
            #[prost(message, repeated, tag = "2")]
            pub scope_spans: Vec<ScopeSpans>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct ScopeSpans {
            #[prost(message, repeated, tag = "2")]
            pub spans: Vec<Span>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Span {
            #[prost(bytes = "vec", tag = "1")]
            pub trace_id: Vec<u8>,
            #[prost(bytes = "vec", tag = "2")]
            pub span_id: Vec<u8>,
            #[prost(message, repeated, tag = "9")]
            pub attributes: Vec<KeyValue>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct KeyValue {
            #[prost(string, tag = "1")]
            pub key: String,
            #[prost(message, optional, tag = "2")]
            pub value: Option<AnyValue>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct AnyValue {
            #[prost(oneof = "Kind", tags = "1, 5, 6")]
            pub value: Option<Kind>,
        }
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Kind {
            #[prost(string, tag = "1")]
            Text(String),
            #[prost(message, tag = "5")]
            Array(ArrayValue),
            #[prost(message, tag = "6")]
            List(KeyValueList),
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct ArrayValue {
            #[prost(message, repeated, tag = "1")]
            pub values: Vec<AnyValue>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct KeyValueList {
            #[prost(message, repeated, tag = "1")]
            pub values: Vec<KeyValue>,
        }
    }

    #[test]
    fn nesting_is_refused_at_the_depth_prost_refuses_it() {
        for n in 1..60 {
            let mut value = full::AnyValue {
                value: Some(full::Kind::Text("leaf".into())),
            };
            for i in 0..n {
                value = full::AnyValue {
                    value: Some(if i % 2 == 0 {
                        full::Kind::Array(full::ArrayValue {
                            values: vec![value],
                        })
                    } else {
                        full::Kind::List(full::KeyValueList {
                            values: vec![full::KeyValue {
                                key: "k".into(),
                                value: Some(value),
                            }],
                        })
                    }),
                };
            }
            let request = full::Request {
                resource_spans: vec![full::ResourceSpans {
                    scope_spans: vec![full::ScopeSpans {
                        spans: vec![full::Span {
                            trace_id: vec![1; 16],
                            span_id: vec![2; 8],
                            attributes: vec![full::KeyValue {
                                key: "k".into(),
                                value: Some(value),
                            }],
                        }],
                    }],
                }],
            };
            let wire = request.encode_to_vec();
            let whole = full::Request::decode(wire.as_slice()).is_ok();
            let walked = decode_protobuf(&wire, 10);
            assert_eq!(walked.is_ok(), whole, "{n}: {walked:?}");
        }
    }

    fn body(spans: Vec<enc::Span>) -> Vec<u8> {
        enc::ExportTraceServiceRequest {
            resource_spans: vec![enc::ResourceSpans {
                resource: Some(enc::Resource {
                    attributes: vec![kv("session.id", pb::Value::StringValue("res".into()))],
                }),
                scope_spans: vec![enc::ScopeSpans { spans }],
            }],
        }
        .encode_to_vec()
    }

    fn chat(span: u8, parent: u8, input: i64) -> enc::Span {
        enc::Span {
            trace_id: vec![1; 16].into(),
            span_id: vec![span; 8].into(),
            parent_span_id: if parent == 0 {
                vec![].into()
            } else {
                vec![parent; 8].into()
            },
            name: "chat m".into(),
            start_time_unix_nano: 1_000_000,
            end_time_unix_nano: 3_500_000,
            attributes: vec![
                kv(
                    "gen_ai.operation.name",
                    pb::Value::StringValue("chat".into()),
                ),
                kv("gen_ai.usage.input_tokens", pb::Value::IntValue(input)),
                kv(
                    "gen_ai.usage.output_tokens",
                    pb::Value::StringValue("5".into()),
                ),
                kv("gen_ai.request.model", pb::Value::StringValue("m".into())),
                kv("server.port", pb::Value::IntValue(443)),
            ],
            status: None,
        }
    }

    struct Lines(Vec<String>);
    impl Sink for Lines {
        fn event(
            &mut self,
            t: &str,
            c: &str,
            m: &str,
            tokens: u64,
            meta: &[u8],
        ) -> Result<(), String> {
            self.0.push(format!(
                "{t} {c} {m} {tokens} {}",
                String::from_utf8_lossy(meta)
            ));
            Ok(())
        }
    }

    #[test]
    fn decodes_maps_and_groups_by_session() {
        let spans = decode_protobuf(&body(vec![chat(2, 0, 10), chat(3, 0, 7)]), 10).unwrap();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].trace_id, "01".repeat(16));
        let batch = map_spans(&spans);
        assert_eq!(batch.groups.len(), 1);
        assert_eq!(batch.groups[0].0, "res");
        let e = &batch.groups[0].1[0];
        assert_eq!((e.tokens, e.input, e.output), (15, Some(10), Some(5)));
        assert_eq!(e.component, "chat");
        assert_eq!(e.latency_ms, Some(2.5));
        assert_eq!(batch.prices, vec![("m".into(), 10, 5), ("m".into(), 7, 5)]);
    }

    #[test]
    fn writes_steps_dedupes_and_marks_aggregates() {
        // the child (span 2, parent 3) first, then its parent reporting the same usage
        let spans = decode_protobuf(&body(vec![chat(2, 3, 10), chat(3, 0, 10)]), 10).unwrap();
        let batch = map_spans(&spans);
        let mut st = SessionState::default();
        let mut out = Lines(Vec::new());
        let done = st
            .write(&batch.groups[0].1, &[Some(0.5)], 0.0, &mut out)
            .unwrap();
        assert_eq!(
            done,
            Written {
                written: 2,
                duplicates: 0
            }
        );
        let ids = format!(
            "\"source\":\"otlp\",\"trace_id\":\"{}\",\"span_id\":\"{}\"",
            "01".repeat(16),
            "02".repeat(8)
        );
        assert_eq!(out.0[0], format!("step_start chat chat m 0 {{{ids}}}"));
        assert_eq!(
            out.0[1],
            format!(
                "step_complete chat chat m 15 {{{ids},\"parent_span_id\":\"{}\",\
                 \"input_tokens\":10,\"output_tokens\":5,\
                 \"model\":\"m\",\"operation\":\"chat\",\"latency_ms\":2.5,\"cost_usd\":0.5}}",
                "03".repeat(8)
            )
        );
        assert!(
            out.0[3].starts_with("step_complete chat chat m 0 "),
            "{}",
            out.0[3]
        );
        assert!(out.0[3].ends_with(
            "\"reported_input_tokens\":10,\"reported_output_tokens\":5,\"aggregate\":true}"
        ));
        let again = st
            .write(&batch.groups[0].1, &[None], 0.0, &mut out)
            .unwrap();
        assert_eq!(
            again,
            Written {
                written: 0,
                duplicates: 2
            }
        );
        assert!(!st.has_new(&batch.groups[0].1));
    }

    #[test]
    fn a_parent_known_from_the_log_is_an_aggregate_after_a_reopen() {
        // the children written by an earlier state (a session since closed)
        let children = decode_protobuf(&body(vec![chat(2, 4, 10), chat(3, 4, 20)]), 10).unwrap();
        let mut first = SessionState::default();
        let mut out = Lines(Vec::new());
        first
            .write(&map_spans(&children).groups[0].1, &[], 0.0, &mut out)
            .unwrap();
        let parent_id = format!("\"parent_span_id\":\"{}\"", "04".repeat(8));
        assert!(out.0[1].contains(&parent_id), "{}", out.0[1]);
        assert!(out.0[3].contains(&parent_id), "{}", out.0[3]);
        // the parent (span 4, no parent of its own) arrives at a new state
        let parent = decode_protobuf(&body(vec![chat(4, 0, 30)]), 10).unwrap();
        let parent = map_spans(&parent);
        let mut forgetful = SessionState::default();
        let mut lines = Lines(Vec::new());
        forgetful
            .write(&parent.groups[0].1, &[], 0.0, &mut lines)
            .unwrap();
        assert!(lines.0[1].starts_with("step_complete chat chat m 35 "));
        assert!(!lines.0[1].contains("parent_span_id"));
        // rebuilt from the log, it is counted once
        let mut rebuilt = SessionState::default();
        rebuilt.remember_parent(format!("{}{}", "01".repeat(16), "04".repeat(8)));
        let mut lines = Lines(Vec::new());
        rebuilt
            .write(&parent.groups[0].1, &[], 0.0, &mut lines)
            .unwrap();
        assert!(
            lines.0[1].starts_with("step_complete chat chat m 0 "),
            "{}",
            lines.0[1]
        );
        assert!(lines.0[1].ends_with("\"aggregate\":true}"));
    }

    fn agent(span: u8, parent: u8, input: i64) -> enc::Span {
        let mut s = chat(span, parent, input);
        s.name = "invoke_agent planner".into();
        s.attributes[0] = kv(
            "gen_ai.operation.name",
            pb::Value::StringValue("invoke_agent".into()),
        );
        s
    }

    /// Events as (type, component, tokens, metadata).
    #[derive(Default)]
    struct Events(Vec<(String, String, u64, serde_json::Value)>);
    impl Sink for Events {
        fn event(
            &mut self,
            t: &str,
            c: &str,
            _m: &str,
            tokens: u64,
            meta: &[u8],
        ) -> Result<(), String> {
            let meta = serde_json::from_slice(meta).map_err(|e| e.to_string())?;
            self.0.push((t.into(), c.into(), tokens, meta));
            Ok(())
        }
    }
    impl Events {
        fn tokens(&self) -> u64 {
            self.0.iter().map(|e| e.2).sum()
        }
        fn done(&self) -> Vec<&(String, String, u64, serde_json::Value)> {
            self.0.iter().filter(|e| e.0 != "step_start").collect()
        }
    }

    fn events(spans: Vec<enc::Span>) -> Vec<Mapped> {
        let spans = decode_protobuf(&body(spans), 10).unwrap();
        map_spans(&spans).groups.remove(0).1
    }

    #[test]
    fn grouping_spans_are_marked() {
        let e = events(vec![agent(4, 0, 30), chat(2, 4, 10)]);
        assert_eq!((e[0].groups, e[1].groups), (true, false));
    }

    #[test]
    fn a_parent_first_is_pending_until_a_child_makes_it_an_aggregate() {
        let mut st = SessionState::default();
        let mut out = Events::default();
        st.write(&events(vec![agent(4, 0, 30)]), &[Some(0.25)], 1.0, &mut out)
            .unwrap();
        let (_, _, tokens, meta) = out.done()[0].clone();
        assert_eq!(tokens, 0);
        assert_eq!(meta["pending"], true);
        assert_eq!(meta["reported_tokens"], 35);
        assert_eq!(meta["reported_input_tokens"], 30);
        assert_eq!(meta["reported_cost_usd"], 0.25);
        assert!(meta.get("input_tokens").is_none() && meta.get("cost_usd").is_none());
        assert_eq!(st.pending_count(None), 1);
        // a sub-agent: it makes the agent an aggregate, and is pending itself
        st.write(&events(vec![agent(5, 4, 30)]), &[None], 2.0, &mut out)
            .unwrap();
        assert_eq!(st.pending_count(None), 1);
        assert_eq!(st.pending_count(Some(1.5)), 0);
        st.write(
            &events(vec![chat(2, 5, 10), chat(3, 5, 20)]),
            &[None, None],
            3.0,
            &mut out,
        )
        .unwrap();
        assert_eq!(st.pending_count(None), 0);
        assert_eq!(st.settle(None, &mut out), Ok(0));
        assert_eq!(out.tokens(), 15 + 25);
    }

    #[test]
    fn a_pending_span_without_children_is_settled_once_and_covers_later_ones() {
        let mut st = SessionState::default();
        let mut out = Events::default();
        st.write(&events(vec![agent(4, 0, 30)]), &[Some(0.25)], 1.0, &mut out)
            .unwrap();
        assert_eq!(st.settle(Some(0.5), &mut out), Ok(0));
        assert_eq!(st.settle(Some(1.0), &mut out), Ok(1));
        assert_eq!(st.settle(None, &mut out), Ok(0));
        let (kind, component, tokens, meta) = out.done()[1].clone();
        assert_eq!(
            (kind.as_str(), component.as_str(), tokens),
            ("token_consumption", "invoke_agent", 35,)
        );
        assert_eq!(
            meta,
            serde_json::json!({"source": "otlp", "trace_id": "01".repeat(16),
                "span_id": "04".repeat(8), "input_tokens": 30, "output_tokens": 5,
                "model": "m", "operation": "invoke_agent", "cost_usd": 0.25, "settled": true})
        );
        // a child arriving late, and its own child: covered by the settled count
        st.write(
            &events(vec![agent(5, 4, 30), chat(2, 5, 10)]),
            &[None],
            2.0,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.tokens(), 35);
        for e in &out.done()[2..] {
            assert_eq!(
                (e.2, &e.3["covered"]),
                (0, &serde_json::json!(true)),
                "{e:?}"
            );
            assert!(e.3.get("reported_input_tokens").is_some());
        }
        assert_eq!(st.pending_count(None), 0);
    }

    #[test]
    fn pending_spans_are_rebuilt_from_their_events() {
        let mut first = SessionState::default();
        let mut out = Lines(Vec::new());
        let spans = events(vec![agent(4, 0, 30), agent(6, 0, 7)]);
        first
            .write(&spans, &[Some(0.25), None], 1.0, &mut out)
            .unwrap();
        let mut settled = Events::default();
        first.settle(None, &mut settled).unwrap();
        // the pending events, as a reopened session reads them from the log
        let pending: Vec<(String, String, String)> = out
            .0
            .iter()
            .filter(|l| l.contains("\"pending\":true"))
            .map(|l| {
                let meta = &l[l.find('{').unwrap()..];
                (
                    "invoke_agent".into(),
                    "invoke_agent planner".into(),
                    meta.into(),
                )
            })
            .collect();
        assert_eq!(pending.len(), 2);
        let mut rebuilt = SessionState::default();
        // span 6 was made an aggregate by a child the log has
        rebuilt.remember_parent(format!("{}{}", "01".repeat(16), "06".repeat(8)));
        for (c, m, meta) in &pending {
            rebuilt.hold(c, m, meta.as_bytes(), 5.0);
        }
        assert_eq!(rebuilt.pending_count(None), 1);
        let mut again = Events::default();
        assert_eq!(rebuilt.settle(Some(5.0), &mut again), Ok(1));
        assert_eq!(again.0[0], settled.0[0]);
        // a settled one is not held again
        let mut later = SessionState::default();
        later.remember_covered(format!("{}{}", "01".repeat(16), "04".repeat(8)));
        assert!(!later.hold("c", "m", pending[0].2.as_bytes(), 0.0));
        assert!(!later.hold("c", "m", b"{\"trace_id\":\"a\",\"span_id\":\"b\"}", 0.0));
    }

    #[test]
    fn past_max_pending_the_oldest_is_settled() {
        let mut st = SessionState::default();
        let mut out = Events::default();
        let mut spans = Vec::new();
        for i in 0..=MAX_PENDING {
            let mut e = events(vec![agent(4, 0, 1)]).remove(0);
            e.span_id = format!("{i:016x}");
            spans.push(e);
        }
        st.write(&spans, &[], 1.0, &mut out).unwrap();
        assert_eq!(st.pending_count(None), MAX_PENDING);
        let settled: Vec<_> = out
            .0
            .iter()
            .filter(|e| e.0 == "token_consumption")
            .collect();
        assert_eq!(settled.len(), 1);
        assert_eq!(settled[0].3["span_id"], format!("{:016x}", 0));
    }

    #[test]
    fn malformed_bodies_and_bad_ids_are_refused() {
        assert!(matches!(
            decode_protobuf(b"\xff\xff\xff", 10),
            Err(Refused::Malformed(_))
        ));
        let mut bad = chat(2, 0, 1);
        bad.trace_id = vec![1; 3].into();
        assert_eq!(
            decode_protobuf(&body(vec![bad]), 10).err(),
            Some(Refused::Malformed(
                "span 'chat m' has a trace ID of 3 bytes and a span ID of 8 bytes \
                 (16 and 8 expected)"
                    .into()
            ))
        );
        assert_eq!(
            decode_protobuf(&body(vec![chat(2, 0, 1), chat(3, 0, 1)]), 1).err(),
            Some(Refused::TooManySpans(1))
        );
    }

    #[test]
    fn spans_are_counted_on_the_wire_before_decoding() {
        let two = body(vec![chat(2, 0, 1), chat(3, 0, 1)]);
        assert_eq!(count_spans(&two, 10), Ok(2));
        assert_eq!(count_spans(&two, 1), Err(Refused::TooManySpans(1)));
        // a million empty spans: refused at the first one past the limit
        let mut scope = Vec::new();
        for _ in 0..1_000_000 {
            scope.extend_from_slice(b"\x12\x00");
        }
        let mut rs = vec![0x12];
        prost::encoding::encode_varint(scope.len() as u64, &mut rs);
        rs.extend_from_slice(&scope);
        let mut wire = vec![0x0a];
        prost::encoding::encode_varint(rs.len() as u64, &mut wire);
        wire.extend_from_slice(&rs);
        assert_eq!(
            decode_protobuf(&wire, 10).err(),
            Some(Refused::TooManySpans(10))
        );
        // malformed after the spans: the decoder's error
        let mut torn = two.clone();
        torn.extend_from_slice(b"\x0a\x7f");
        assert!(matches!(
            decode_protobuf(&torn, 10),
            Err(Refused::Malformed(_))
        ));
        // an unread array value nested too deep is malformed, as prost has it
        let mut value = pb::AnyValue {
            value: Some(pb::Value::StringValue("leaf".into())),
        }
        .encode_to_vec();
        for _ in 0..200 {
            let mut kv = vec![0x0a, 0x01, b'k', 0x12];
            prost::encoding::encode_varint(value.len() as u64, &mut kv);
            kv.extend_from_slice(&value);
            let mut list = vec![0x0a];
            prost::encoding::encode_varint(kv.len() as u64, &mut list);
            list.extend_from_slice(&kv);
            value = pb::AnyValue {
                value: Some(pb::Value::KvlistValue(list.into())),
            }
            .encode_to_vec();
        }
        let mut deep = chat(2, 0, 1);
        deep.attributes.push(pb::KeyValue {
            key: "k".into(),
            value: Some(pb::AnyValue::decode(value.as_slice()).unwrap()),
        });
        assert!(matches!(
            decode_protobuf(&body(vec![deep]), 10),
            Err(Refused::Malformed(_))
        ));
    }

    #[test]
    fn counts_follow_the_python_rules() {
        for (v, want) in [
            (Val::Int(-1), None),
            (Val::Int(MAX_COUNT as i64), Some(MAX_COUNT)),
            (Val::Int(MAX_COUNT as i64 + 1), None),
            (Val::Float(3.0), Some(3)),
            (Val::Float(3.5), None),
            (Val::Float(f64::NAN), None),
            (Val::Str("0042".into()), Some(42)),
            (Val::Str("4 2".into()), None),
            (Val::Str("99999999999999999999999".into()), None),
            (Val::Bool(true), None),
        ] {
            assert_eq!(count(&Some(v.clone())), want, "{v:?}");
        }
    }

    #[test]
    fn the_first_count_present_decides_and_an_invalid_one_is_reported() {
        let mut a: Attrs = Default::default();
        assert_eq!(reported(&a, &[IN, PROMPT]), (None, false));
        a[PROMPT] = Some(Val::Int(10));
        assert_eq!(reported(&a, &[IN, PROMPT]), (Some(10), false));
        a[IN] = Some(Val::Int(-5));
        assert_eq!(reported(&a, &[IN, PROMPT]), (None, true));
        a[IN] = Some(Val::Float(2.5));
        assert_eq!(reported(&a, &[IN, PROMPT]), (None, true));
        a[IN] = Some(Val::Str("12".into()));
        assert_eq!(reported(&a, &[IN, PROMPT]), (Some(12), false));
    }

    #[test]
    fn long_texts_are_cut_on_a_char_boundary() {
        let s = "é".repeat(MAX_TEXT_BYTES);
        let c = cut(s);
        assert!(c.len() <= MAX_TEXT_BYTES && c.len() >= MAX_TEXT_BYTES - 1);
    }
    #[test]
    fn json_plain_shapes_decode_and_odd_ones_are_left_to_python() {
        let body = br#"{"resourceSpans":[{"resource":{"attributes":[
            {"key":"session.id","value":{"stringValue":"s"}}]},
            "scopeSpans":[{"spans":[{"traceId":"5B8EFFF798038103D269B633813FC60C",
            "spanId":"00000000000000a1","name":"chat","startTimeUnixNano":"10",
            "endTimeUnixNano":2000010,"status":{"code":"STATUS_CODE_ERROR"},
            "attributes":[{"key":"gen_ai.usage.input_tokens","value":{"intValue":"7"}},
            {"key":"gen_ai.usage.output_tokens","value":{"intValue":3}},
            {"key":"other","value":null}]}]}]}]}"#;
        let spans = decode_json(body, 10).unwrap().unwrap();
        assert_eq!(spans[0].trace_id, "5b8efff798038103d269b633813fc60c");
        assert!(spans[0].error);
        let batch = map_spans(&spans);
        let e = &batch.groups[0].1[0];
        assert_eq!((batch.groups[0].0.as_str(), e.tokens), ("s", 10));
        assert_eq!(e.latency_ms, Some(2.0));
        for odd in [
            &br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"x"}]}]}]}"#[..],
            br#"{"resourceSpans":{}}"#,
            br#"[1]"#,
            br#"[]"#,
            br#"{"resourceSpans":[[]]}"#,
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[["5b8efff798038103d269b633813fc60c","00000000000000a1"]]}]}]}"#,
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"00000000000000a1","name":null}]}]}]}"#,
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"00000000000000a1","attributes":[{"key":"session.id","value":{"stringValue":"a","stringValue":"b"}}]}]}]}]}"#,
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"00000000000000a1","attributes":[{"key":"session.id","value":{"stringValue":5}}]}]}]}]}"#,
        ] {
            assert_eq!(decode_json(odd, 10).unwrap().map(|s| s.len()), None);
        }
        assert_eq!(decode_json(body, 0).err(), Some(Refused::TooManySpans(0)));
    }
}
