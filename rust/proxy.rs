//! The metering proxy's HTTP transport (issue 14): hyper 1.x on a tokio
//! runtime of its own thread, serving the OpenAI API and forwarding to the
//! upstream through a pooled keep-alive client.
//!
//! The transport is here; the budget policy stays in Python (sigil.proxy):
//! the transport calls a policy object with the GIL held, synchronously, at
//! the few points where a call is decided or recorded, and runs everything
//! else (accept, route, auth, bounded reads, forwarding with timeouts, the
//! relay of bodies and streams, disconnects, shutdown) without the GIL.
//!
//! The policy (see python/sigil/proxy/server.py, `_Policy`):
//!
//! * `admit(endpoint, body, component, keys)` for a metered call (`keys`: the
//!   `(name, value)` pairs of its key headers) returns
//!   `(0, flight, body, stream)` to forward `body`, `(1, retry)` to wait until
//!   a call settles (then `retry()` answers the same way), or
//!   `(2, (status, body, headers))` to answer at once;
//! * `error(kind, detail)` answers a failed `GET /v1/models`;
//! * the flight records the call: `done(status, body)` (a 2xx answer; `None`
//!   relays it, a response tuple replaces it), `failed(kind, detail)` (returns
//!   the response), `upstream_error(status, body)`, and for a stream
//!   `feed(chunk)` (the bytes to relay, `None`: the stream is cut) and
//!   `stream_end(outcome, detail)` (the bytes to send last).
//!
//! Every buffer is bounded (request and response bodies, error bodies, the
//! stream's channel), and the bodies of all calls in flight together
//! (`max_in_flight_bytes`, see `Memory`); no panic crosses into Python (tokio
//! catches a task's, the pymethods are guarded).

use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pyo3::exceptions::PyRuntimeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::time::Instant;

use crate::errors::os_error;

/// The metered endpoints below `/v1`, by the index the policy is given: the
/// one table of them, exported to Python as `sigil._native.PROXY_ENDPOINT_PATHS`
/// (sigil.proxy.server maps each to its policy by this order).
pub const ENDPOINTS: [&str; 4] = [
    "/chat/completions",
    "/completions",
    "/responses",
    "/embeddings",
];
/// Request headers never forwarded: hop-by-hop, recomputed, or the proxy's own.
const DROP_REQUEST: [&str; 14] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
    "x-sigil-component",
    "x-sigil-token",
];
/// Request headers that carry a key: the policy is given their values, to cut
/// them out of what it logs about the call (an upstream may quote them).
/// Exported to Python as `sigil._native.PROXY_KEY_HEADERS`.
pub const KEY_HEADERS: [&str; 4] = ["authorization", "api-key", "x-api-key", "x-goog-api-key"];
/// Response headers never passed back: hop-by-hop, or recomputed.
const DROP_RESPONSE: [&str; 9] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "upgrade",
    "trailer",
    "server",
    "date",
];
/// What is kept of an upstream's error body.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Chunks of a stream relayed ahead of a slow client.
const STREAM_QUEUE: usize = 64;
/// After the grace period, how long calls get to record that they were cut.
const ABORT_WAIT: Duration = Duration::from_secs(5);
/// How long a call waits for memory (`Memory`) before it is refused with 503:
/// long enough for a burst to pass, short beside a model call.
const MEMORY_WAIT: Duration = Duration::from_secs(2);
/// How often a request waiting for memory looks again (`Held::take`).
const BEHIND_POLL: Duration = Duration::from_millis(5);
/// A request body is held twice for its call's life: by the transport (as
/// read, then as forwarded; the read copy is dropped once the call is
/// admitted) and by the policy, which keeps the parsed body to count a stream
/// that breaks (sigil.proxy.server `_Flight`).
const REQUEST_COPIES: usize = 2;
/// At most this much of a refused call's unread body is read and dropped
/// (`drain`) before its answer, or the call's own limit when larger; a client
/// that sends more has its connection closed.
const MAX_DRAIN: usize = 64 << 20;

type Out = Response<ProxyBody>;
type Upstream = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A response body: whole, or the chunks of a relayed stream.
pub enum ProxyBody {
    Whole(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ProxyBody::Whole(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ProxyBody::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Whole(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Whole(None) => SizeHint::with_exact(0),
            ProxyBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// How the transport listens and forwards.
struct Settings {
    upstream: String,
    timeout: Duration,
    max_body: usize,
    max_response: usize,
    max_in_flight: usize,
    token: Option<String>,
    api_key: Option<String>,
    grace: Duration,
}

struct Shared {
    settings: Settings,
    policy: Py<PyAny>,
    client: Upstream,
    memory: Memory,
    /// Woken whenever a call settles (or the policy says so): admits waiting retry.
    settled: Notify,
    /// true once stop() begins: stop accepting, close idle connections
    shutdown: watch::Sender<bool>,
    /// true once the grace period is over: calls still running are cut
    abort: watch::Sender<bool>,
    /// call tasks running
    active: AtomicUsize,
    idle: Notify,
}

/// Counts a call task while it runs.
struct Active(Arc<Shared>);

impl Active {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.active.fetch_add(1, Ordering::SeqCst);
        Active(shared.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The bytes all calls in flight may hold at once (`max_in_flight_bytes`):
/// their request bodies (REQUEST_COPIES times) and the answers read whole (a
/// non-streamed 2xx, an error's first 64 KiB, `GET /v1/models`). Each body is
/// bounded on its own (413, `max_response_bytes`); this bounds them together,
/// where 200 calls of 32 MiB would otherwise hold 12 GiB. A stream's chunks
/// are not held here: its channel is bounded (STREAM_QUEUE).
///
/// A call takes its bytes as they arrive (a body whose length is given, all
/// at once: calls waiting for memory then never hold part of what they need),
/// from a fair semaphore; it waits for them up to MEMORY_WAIT for its request
/// (then 503, see `overloaded`) and up to its deadline for its answer.
struct Memory {
    free: Arc<Semaphore>,
    limit: usize,
}

impl Memory {
    fn new(limit: usize) -> Self {
        Memory {
            free: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// The bytes calls hold now.
    fn held(&self) -> usize {
        self.limit.saturating_sub(self.free.available_permits())
    }
}

/// What one call holds of `Memory`: given back when it is dropped.
struct Held {
    free: Arc<Semaphore>,
    bytes: usize,
}

impl Held {
    fn new(memory: &Memory) -> Self {
        Held {
            free: memory.free.clone(),
            bytes: 0,
        }
    }

    /// Take `n` more bytes, waiting for them until `until`; false when they
    /// were not free in time (or are more than the limit). `behind` (a new
    /// call's request) never queues: it takes what is free once the queued
    /// takers (answers the upstream has already billed) are served, so that
    /// an answer never waits behind a request.
    async fn take(&mut self, n: usize, until: Instant, behind: bool) -> bool {
        if n == 0 {
            return true;
        }
        let Ok(count) = u32::try_from(n) else {
            return false;
        };
        if behind {
            loop {
                if let Ok(permit) = self.free.try_acquire_many(count) {
                    permit.forget();
                    self.bytes += n;
                    return true;
                }
                if Instant::now() >= until {
                    return false;
                }
                tokio::time::sleep_until(until.min(Instant::now() + BEHIND_POLL)).await;
            }
        }
        match tokio::time::timeout_at(until, self.free.acquire_many(count)).await {
            Ok(Ok(permit)) => {
                permit.forget();
                self.bytes += n;
                true
            }
            _ => false,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.free.add_permits(self.bytes);
        }
    }
}

// ---------------------------------------------------------------------------
// Responses

fn commas(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// An error and its causes, as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn whole(status: u16, body: Bytes, headers: HeaderMap) -> Out {
    let mut resp = Response::new(ProxyBody::Whole(Some(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = headers;
    resp
}

/// An error shaped like OpenAI's, which every OpenAI client can read.
fn openai_error(status: u16, message: &str, kind: &str, code: Option<&str>) -> Out {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    whole(status, Bytes::from(body.to_string()), headers)
}

fn back_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len());
    for (k, v) in from {
        if !DROP_RESPONSE.contains(&k.as_str()) {
            out.append(k.clone(), v.clone());
        }
    }
    out
}

/// A response the policy built: `(status, body, [(name, value), ...])`.
type PyResponse = (u16, PyBackedBytes, Vec<(String, String)>);

fn from_policy(r: PyResponse) -> Out {
    let (status, body, pairs) = r;
    let mut headers = HeaderMap::new();
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            headers.append(k, v);
        }
    }
    whole(status, Bytes::copy_from_slice(&body), headers)
}

/// The answer to a call refused because the calls in flight hold all the
/// memory they may (`Memory`): nothing was forwarded or recorded. 503, not
/// 429: a 429 from sigil means the budget is spent (`insufficient_quota`, not
/// to be retried), and an overloaded server is what 503 says (OpenAI's own
/// overloaded answer). The official SDKs retry it (twice by default, after
/// `retry-after`; `x-should-retry` says so explicitly), so a burst is absorbed
/// and only an overload that lasts reaches the caller, as `InternalServerError`.
fn overloaded(memory: &Memory) -> Out {
    let text = format!(
        "sigil proxy: the calls in flight hold all the memory the proxy gives them ({} bytes \
         of request and response bodies); nothing was forwarded, retry shortly",
        commas(memory.limit)
    );
    let mut out = openai_error(503, &text, "server_error", Some("server_overloaded"));
    let headers = out.headers_mut();
    headers.insert("retry-after", HeaderValue::from_static("1"));
    headers.insert("x-should-retry", HeaderValue::from_static("true"));
    out
}

fn proxy_failure() -> Out {
    openai_error(
        500,
        "sigil proxy: internal error (see the proxy's stderr)",
        "server_error",
        None,
    )
}

/// Run a policy call with the GIL; a Python exception is reported on stderr
/// (as unraisable) and becomes None.
fn with_policy<T>(f: impl FnOnce(Python<'_>) -> PyResult<T>) -> Option<T> {
    Python::attach(|py| match f(py) {
        Ok(v) => Some(v),
        Err(e) => {
            e.write_unraisable(py, None);
            None
        }
    })
}

// ---------------------------------------------------------------------------
// Reading bodies

enum ReadError {
    TooLarge,
    Broken(String),
    /// Memory did not free in time (`Memory`).
    Overloaded,
}

/// What reading a body takes of `Memory`: `copies` bytes for each byte read,
/// waited for until `until`.
struct Charge<'a> {
    held: &'a mut Held,
    copies: usize,
    until: Instant,
    /// A new call's request: it yields to the answers waiting (`Held::take`).
    behind: bool,
}

impl Charge<'_> {
    /// Hold `total` bytes read in all (`paid`: those held already).
    async fn cover(&mut self, total: usize, paid: &mut usize) -> Result<(), ReadError> {
        if total > *paid {
            let more = (total - *paid).saturating_mul(self.copies);
            if !self.held.take(more, self.until, self.behind).await {
                return Err(ReadError::Overloaded);
            }
            *paid = total;
        }
        Ok(())
    }
}

/// The body, at most `limit` bytes (past it: cut when `truncate`, else
/// TooLarge), holding what it reads of `Memory` through `charge`.
async fn read_bounded<B>(
    mut body: B,
    limit: usize,
    truncate: bool,
    mut charge: Option<Charge<'_>>,
) -> Result<Bytes, ReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    let mut paid = 0;
    if let Some(c) = charge.as_mut() {
        // A length given up front is held at once, before a byte is read.
        let given = body
            .size_hint()
            .exact()
            .and_then(|n| usize::try_from(n).ok());
        if let Some(n) = given.map(|n| if truncate { n.min(limit) } else { n }) {
            if n <= limit {
                c.cover(n, &mut paid).await?;
            }
        }
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Broken(chain(&e)))?;
        if let Ok(mut data) = frame.into_data() {
            let over = buf.len() + data.len() > limit;
            if over {
                if !truncate {
                    return Err(ReadError::TooLarge);
                }
                data.truncate(limit - buf.len());
            }
            if let Some(c) = charge.as_mut() {
                c.cover(buf.len() + data.len(), &mut paid).await?;
            }
            if over {
                buf.extend_from_slice(&data);
                return Ok(buf.freeze());
            }
            if buf.is_empty() && body.is_end_stream() {
                return Ok(data);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Read and drop the rest of a body, at most `limit` bytes: a client whose
/// call is refused before its body was read then gets the answer, not a reset
/// while it is still sending (hyper closes a connection whose request body is
/// left unread, and the unread bytes reset it).
async fn drain<B>(mut body: B, limit: usize)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen > limit {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Serving

enum Route {
    Metered(usize),
    Models,
    NotFound,
}

/// The API root every route is below.
const API_ROOT: &str = "/v1";

/// HEAD is GET without the content (RFC 9110, 9.3.2): `HEAD /v1/models` is
/// answered as GET is (forwarded as a GET; hyper sends no body for a HEAD), as
/// the OpenAI API answers it, for the clients and health checks that probe a
/// base URL so.
fn route(method: &Method, path: &str) -> Route {
    let Some(below) = path.strip_prefix(API_ROOT) else {
        return Route::NotFound;
    };
    if method == Method::POST {
        if let Some(i) = ENDPOINTS.iter().position(|e| *e == below) {
            return Route::Metered(i);
        }
    } else if method == Method::GET || method == Method::HEAD {
        let model = below
            .strip_prefix("/models/")
            .is_some_and(|m| !m.is_empty());
        if below == "/models" || model {
            return Route::Models;
        }
    }
    Route::NotFound
}

/// The answer to a route the proxy does not serve, naming those it does.
fn not_served(method: &Method, path: &str) -> Out {
    let metered: Vec<String> = ENDPOINTS.iter().map(|e| format!("{API_ROOT}{e}")).collect();
    let text = format!(
        "sigil proxy does not forward {method} {path}; it serves POST {} and GET (or HEAD) \
         {API_ROOT}/models",
        metered.join(", ")
    );
    openai_error(404, &text, "invalid_request_error", Some("unknown_url"))
}

/// Wait until the flag is set (or its sender is gone).
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Whether `host` (a Host header, or an origin's host, with or without its
/// port) names this machine's loopback: `localhost`, a `127.0.0.0/8` literal
/// or `[::1]`. A name that only resolves to 127.0.0.1 (DNS rebinding) is not.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, port)) if port.is_empty() || port.starts_with(':') => inner,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a call looks sent by a web page of another site, if it does. Without a
/// token the proxy forwards what reaches it with the proxy's own key, and a
/// browser lets any page POST to 127.0.0.1 without a preflight (a `text/plain`
/// body) and, by rebinding its own name to 127.0.0.1, read the answers. Such a
/// call carries an `Origin` that is not a loopback origin, `Sec-Fetch-Site:
/// cross-site`, or a `Host` that is not a loopback name; programs send none.
fn from_another_site(headers: &HeaderMap) -> Option<&'static str> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if let Some(host) = text("host") {
        if !loopback_host(host) {
            return Some("its Host is not a loopback name");
        }
    }
    if let Some(origin) = text("origin") {
        let host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if !host.is_some_and(|h| !h.contains('/') && loopback_host(h)) {
            return Some("it comes from a web page of another origin");
        }
    }
    if text("sec-fetch-site").is_some_and(|s| s.eq_ignore_ascii_case("cross-site")) {
        return Some("it comes from a web page of another site");
    }
    None
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Shared {
    /// Check the proxy token; the upstream request's headers.
    fn authorize(&self, headers: &HeaderMap) -> Result<HeaderMap, Box<Out>> {
        let mut out = HeaderMap::with_capacity(headers.len() + 2);
        for (k, v) in headers {
            if !DROP_REQUEST.contains(&k.as_str()) {
                out.append(k.clone(), v.clone());
            }
        }
        let mut auth = headers.contains_key(AUTHORIZATION);
        if self.settings.token.is_none() {
            if let Some(why) = from_another_site(headers) {
                return Err(Box::new(openai_error(
                    403,
                    &format!(
                        "sigil proxy: refused, {why}; without --token it serves only programs \
                         on this machine"
                    ),
                    "invalid_request_error",
                    Some("forbidden_origin"),
                )));
            }
        }
        if let Some(token) = &self.settings.token {
            let given = headers.get("x-sigil-token");
            if given.is_some_and(|g| ct_eq(g.as_bytes(), token.as_bytes())) {
            } else if headers
                .get(AUTHORIZATION)
                .is_some_and(|a| ct_eq(a.as_bytes(), format!("Bearer {token}").as_bytes()))
            {
                // The token stood in for a key: the upstream gets the proxy's own.
                out.remove(AUTHORIZATION);
                auth = false;
            } else {
                return Err(Box::new(openai_error(
                    401,
                    "sigil proxy: missing or wrong proxy token (send it as X-Sigil-Token or as \
                     the API key)",
                    "invalid_request_error",
                    Some("invalid_api_key"),
                )));
            }
        }
        if !auth {
            if let Some(key) = self.settings.api_key.as_deref().filter(|k| !k.is_empty()) {
                if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
                    out.insert(AUTHORIZATION, v);
                }
            }
        }
        Ok(out)
    }

    fn uri(&self, path: &str) -> Result<Uri, String> {
        format!("{}{}", self.settings.upstream, path)
            .parse::<Uri>()
            .map_err(|e| e.to_string())
    }

    async fn aborted(&self) {
        until_true(&mut self.abort.subscribe()).await;
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Out, Infallible> {
    match route(req.method(), req.uri().path()) {
        Route::NotFound => Ok(not_served(req.method(), req.uri().path())),
        Route::Models => Ok(models(&shared, req).await),
        Route::Metered(endpoint) => {
            // The call runs as a task of its own: a client that leaves cannot
            // cut it short before it is recorded.
            let (tx, rx) = oneshot::channel();
            let active = Active::new(&shared);
            tokio::spawn(async move {
                let _active = active;
                metered(shared, req, endpoint, tx).await;
            });
            Ok(rx.await.unwrap_or_else(|_| proxy_failure()))
        }
    }
}

async fn models(shared: &Shared, req: Request<Incoming>) -> Out {
    let headers = match shared.authorize(req.headers()) {
        Ok(h) => h,
        Err(denied) => return *denied,
    };
    let path = &req.uri().path()[API_ROOT.len()..];
    let fail = |kind: &str, detail: String| -> Out {
        with_policy(|py| {
            shared
                .policy
                .call_method1(py, intern!(py, "error"), (kind, detail))?
                .extract::<PyResponse>(py)
        })
        .map(from_policy)
        .unwrap_or_else(proxy_failure)
    };
    let uri = match shared.uri(path) {
        Ok(u) => u,
        Err(e) => return fail("unreachable", e),
    };
    // A HEAD is asked upstream as a GET too: an upstream need not know HEAD.
    let mut up = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .unwrap_or_default();
    *up.headers_mut() = headers;
    let mut held = Held::new(&shared.memory);
    let charge = Charge {
        held: &mut held,
        copies: 1,
        until: Instant::now() + shared.settings.timeout,
        behind: false,
    };
    let work = async {
        let resp = shared
            .client
            .request(up)
            .await
            .map_err(|e| ("unreachable", chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let raw = read_bounded(body, shared.settings.max_response, false, Some(charge))
            .await
            .map_err(|e| match e {
                ReadError::TooLarge => (
                    "unreachable",
                    format!(
                        "response body over {} bytes",
                        commas(shared.settings.max_response)
                    ),
                ),
                ReadError::Broken(t) => ("unreachable", t),
                ReadError::Overloaded => ("overloaded", String::new()),
            })?;
        Ok::<Out, (&str, String)>(whole(
            parts.status.as_u16(),
            raw,
            back_headers(&parts.headers),
        ))
    };
    match tokio::time::timeout(shared.settings.timeout, work).await {
        Ok(Ok(out)) => out,
        Ok(Err(("overloaded", _))) => overloaded(&shared.memory),
        Ok(Err((kind, detail))) => fail(kind, detail),
        Err(_) => fail("timeout", String::new()),
    }
}

enum Admit {
    Forward(Py<PyAny>, Bytes, bool),
    Wait(Py<PyAny>),
    Answer(PyResponse),
}

fn parse_admit(py: Python<'_>, out: Py<PyAny>) -> PyResult<Admit> {
    let out = out.bind(py);
    let kind: u8 = out.get_item(0)?.extract()?;
    Ok(match kind {
        0 => {
            let body: PyBackedBytes = out.get_item(2)?.extract()?;
            Admit::Forward(
                out.get_item(1)?.unbind(),
                Bytes::copy_from_slice(&body),
                out.get_item(3)?.is_truthy()?,
            )
        }
        1 => Admit::Wait(out.get_item(1)?.unbind()),
        _ => Admit::Answer(out.get_item(1)?.extract()?),
    })
}

async fn metered(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    endpoint: usize,
    mut reply: oneshot::Sender<Out>,
) {
    let headers = match shared.authorize(req.headers()) {
        Ok(h) => h,
        Err(denied) => {
            let _ = reply.send(*denied);
            return;
        }
    };
    let component = req
        .headers()
        .get("x-sigil-component")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let keys: Vec<(&'static str, String)> = KEY_HEADERS
        .iter()
        .flat_map(|name| {
            req.headers()
                .get_all(*name)
                .iter()
                .filter_map(move |v| v.to_str().ok().map(|s| (*name, s.to_owned())))
        })
        .collect();
    // What the call holds of Memory, for its life (its answer's bytes too).
    let mut held = Held::new(&shared.memory);
    let charge = Charge {
        held: &mut held,
        copies: REQUEST_COPIES,
        until: Instant::now() + MEMORY_WAIT.min(shared.settings.timeout),
        behind: true,
    };
    // The body must arrive within the timeout: a client that stops sending
    // would otherwise hold its call (a task and its buffer) indefinitely.
    let mut body = req.into_body();
    let read = tokio::time::timeout(
        shared.settings.timeout,
        read_bounded(&mut body, shared.settings.max_body, false, Some(charge)),
    )
    .await;
    let Ok(read) = read else {
        let text = format!(
            "sigil proxy: request body not received within {}s",
            shared.settings.timeout.as_secs_f64()
        );
        let _ = reply.send(openai_error(
            408,
            &text,
            "invalid_request_error",
            Some("request_timeout"),
        ));
        return;
    };
    let raw = match read {
        Ok(raw) => raw,
        Err(ReadError::TooLarge) => {
            let text = format!(
                "sigil proxy: request body over {} bytes",
                commas(shared.settings.max_body)
            );
            let limit = MAX_DRAIN.max(shared.settings.max_body);
            let _ = tokio::time::timeout(shared.settings.timeout, drain(&mut body, limit)).await;
            let _ = reply.send(openai_error(
                413,
                &text,
                "invalid_request_error",
                Some("request_too_large"),
            ));
            return;
        }
        Err(ReadError::Overloaded) => {
            // What it sends meanwhile is dropped as it comes: it holds nothing.
            let limit = MAX_DRAIN.max(shared.settings.max_body);
            let _ = tokio::time::timeout(shared.settings.timeout, drain(&mut body, limit)).await;
            let _ = reply.send(overloaded(&shared.memory));
            return;
        }
        Err(ReadError::Broken(_)) => return, // the client left while sending
    };
    let mut pending: Option<Py<PyAny>> = None;
    let (flight, body, stream) = loop {
        let notified = shared.settled.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let admitted = with_policy(|py| {
            let out = match &pending {
                None => shared.policy.call_method1(
                    py,
                    intern!(py, "admit"),
                    (
                        endpoint,
                        PyBytes::new(py, &raw),
                        component.as_deref(),
                        keys.clone(),
                    ),
                )?,
                Some(retry) => retry.call0(py)?,
            };
            parse_admit(py, out)
        });
        match admitted {
            None => {
                let _ = reply.send(proxy_failure());
                return;
            }
            Some(Admit::Answer(r)) => {
                let _ = reply.send(from_policy(r));
                return;
            }
            Some(Admit::Forward(flight, body, stream)) => break (flight, body, stream),
            Some(Admit::Wait(retry)) => {
                pending = Some(retry);
                tokio::select! {
                    _ = &mut notified => {}
                    // The client left while waiting: nothing was admitted, so
                    // nothing is forwarded or recorded (as a client that left
                    // before its call was read).
                    _ = reply.closed() => return,
                    _ = shared.aborted() => {
                        let _ = reply.send(openai_error(
                            503, "sigil proxy: the proxy stopped", "server_error", None,
                        ));
                        return;
                    }
                }
            }
        }
    };
    // Admitted: the body as read gives way to the body forwarded (held alike).
    drop(raw);
    let flight = Flight {
        shared: shared.clone(),
        call: flight,
    };
    // Kept here (not moved into `forward`), so a call cut by the stop before
    // it was answered still gets the policy's answer for it.
    let mut reply = Some(reply);
    tokio::select! {
        biased;
        done = forward(&flight, endpoint, headers, body, stream, &mut reply, &mut held) => {
            if let Some((tx, rx, status)) = done {
                relay(&flight, tx, rx, status).await;
            }
        }
        _ = shared.aborted() => {
            let out = flight.failed("stopped", String::new());
            if let Some(reply) = reply.take() {
                let _ = reply.send(out);
            }
        }
    }
    shared.settled.notify_waiters();
}

/// One admitted call, recorded through its Python flight.
struct Flight {
    shared: Arc<Shared>,
    call: Py<PyAny>,
}

impl Flight {
    fn failed(&self, kind: &str, detail: String) -> Out {
        let out = with_policy(|py| {
            self.call
                .call_method1(py, intern!(py, "failed"), (kind, detail))?
                .extract::<PyResponse>(py)
        });
        self.shared.settled.notify_waiters();
        out.map(from_policy).unwrap_or_else(proxy_failure)
    }
}

/// Forward the call; answers the client through `reply` (taken when
/// answered). A stream's response
/// is answered with a channel body: returns its sender and the upstream body.
async fn forward(
    flight: &Flight,
    endpoint: usize,
    mut headers: HeaderMap,
    body: Bytes,
    stream: bool,
    reply: &mut Option<oneshot::Sender<Out>>,
    held: &mut Held,
) -> Option<(mpsc::Sender<Bytes>, Incoming, u16)> {
    let shared = &flight.shared;
    let timeout = shared.settings.timeout;
    let answer = |reply: &mut Option<oneshot::Sender<Out>>, out: Out| {
        if let Some(reply) = reply.take() {
            let _ = reply.send(out);
        }
        None
    };
    let uri = match shared.uri(ENDPOINTS[endpoint]) {
        Ok(u) => u,
        Err(e) => return answer(reply, flight.failed("unreachable", e)),
    };
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let mut up = Request::post(uri).body(Full::new(body)).unwrap_or_default();
    *up.headers_mut() = headers;
    let deadline = tokio::time::Instant::now() + timeout;
    let resp = match tokio::time::timeout_at(deadline, shared.client.request(up)).await {
        Err(_) => return answer(reply, flight.failed("timeout", String::new())),
        Ok(Err(e)) => return answer(reply, flight.failed("unreachable", chain(&e))),
        Ok(Ok(resp)) => resp,
    };
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let headers = back_headers(&parts.headers);
    // An answer read whole is held in Memory, waited for until the deadline:
    // the upstream has answered (and billed) by now, so it is not refused.
    let charge = Charge {
        held,
        copies: 1,
        until: deadline,
        behind: false,
    };
    if status >= 300 {
        let read = read_bounded(body, MAX_ERROR_BODY, true, Some(charge));
        let raw = tokio::time::timeout_at(deadline, read)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        with_policy(|py| {
            flight.call.call_method1(
                py,
                intern!(py, "upstream_error"),
                (status, PyBytes::new(py, &raw)),
            )
        });
        // The client sees the upstream's own answer, so its SDK retries what it would retry.
        return answer(reply, whole(status, raw, headers));
    }
    let is_sse = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .is_some_and(|v| v.eq_ignore_ascii_case("text/event-stream"));
    if stream && is_sse {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let mut out = Response::new(ProxyBody::Stream(rx));
        *out.status_mut() = parts.status;
        *out.headers_mut() = headers;
        answer(reply, out);
        return Some((tx, body, status));
    }
    let raw = match tokio::time::timeout_at(
        deadline,
        read_bounded(body, shared.settings.max_response, false, Some(charge)),
    )
    .await
    {
        Err(_) => return answer(reply, flight.failed("timeout", String::new())),
        Ok(Err(ReadError::TooLarge)) => {
            let text = format!(
                "response body over {} bytes",
                commas(shared.settings.max_response)
            );
            return answer(reply, flight.failed("read", text));
        }
        Ok(Err(ReadError::Broken(t))) => return answer(reply, flight.failed("read", t)),
        Ok(Err(ReadError::Overloaded)) => {
            let text = format!(
                "the calls in flight held all the memory the proxy gives them ({} bytes) \
                 until the timeout; the answer could not be read",
                commas(shared.memory.limit)
            );
            return answer(reply, flight.failed("read", text));
        }
        Ok(Ok(raw)) => raw,
    };
    let replaced = Python::attach(|py| -> Result<Option<PyResponse>, ()> {
        let out = flight
            .call
            .call_method1(py, intern!(py, "done"), (status, PyBytes::new(py, &raw)))
            .map_err(|e| e.write_unraisable(py, None))?;
        if out.is_none(py) {
            return Ok(None);
        }
        out.extract::<PyResponse>(py)
            .map(Some)
            .map_err(|e| e.write_unraisable(py, None))
    });
    shared.settled.notify_waiters();
    match replaced {
        Ok(None) => answer(reply, whole(status, raw, headers)),
        Ok(Some(r)) => answer(reply, from_policy(r)),
        Err(()) => answer(reply, proxy_failure()),
    }
}

/// Relay a stream chunk by chunk, each through the flight's `feed`.
async fn relay(flight: &Flight, tx: mpsc::Sender<Bytes>, mut body: Incoming, status: u16) {
    let shared = &flight.shared;
    let timeout = shared.settings.timeout;
    let mut abort = shared.abort.subscribe();
    let (outcome, detail): (&str, String) = loop {
        let frame = tokio::select! {
            biased;
            _ = until_true(&mut abort) => break ("stopped", String::new()),
            _ = tx.closed() => break ("client", String::new()),
            f = tokio::time::timeout(timeout, body.frame()) => f,
        };
        let data = match frame {
            Err(_) => break ("stalled", String::new()),
            Ok(None) => break ("eof", String::new()),
            Ok(Some(Err(e))) => break ("error", chain(&e)),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        let fed = Python::attach(|py| -> PyResult<Option<Bytes>> {
            let out =
                flight
                    .call
                    .call_method1(py, intern!(py, "feed"), (PyBytes::new(py, &data),))?;
            if out.is_none(py) {
                return Ok(None);
            }
            let b: PyBackedBytes = out.extract(py)?;
            Ok(Some(Bytes::copy_from_slice(&b)))
        });
        match fed {
            Err(e) => {
                Python::attach(|py| e.write_unraisable(py, None));
                break ("error", "sigil proxy: internal error".to_string());
            }
            Ok(None) => break ("oversize", String::new()),
            Ok(Some(b)) if b.is_empty() => {}
            Ok(Some(b)) => {
                let sent = tokio::select! {
                    biased;
                    _ = until_true(&mut abort) => Err("stopped"),
                    r = tx.send(b) => r.map_err(|_| "client"),
                };
                if let Err(outcome) = sent {
                    break (outcome, String::new());
                }
            }
        }
    };
    // Stop the upstream generating what nobody reads (the connection is not reused).
    drop(body);
    let tail = with_policy(|py| {
        let out =
            flight
                .call
                .call_method1(py, intern!(py, "stream_end"), (outcome, detail, status))?;
        let b: PyBackedBytes = out.extract(py)?;
        Ok(Bytes::copy_from_slice(&b))
    });
    shared.settled.notify_waiters();
    if let Some(tail) = tail.filter(|t| !t.is_empty()) {
        let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(tail)).await;
    }
}

/// The upstream connector: plain TCP for `http://`, TLS (rustls, the system's
/// roots, else Mozilla's) for `https://`.
fn connector(timeout: Duration) -> std::io::Result<HttpsConnector<HttpConnector>> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    http.enforce_http(false);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        match HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
            Ok(b) => b,
            Err(_) => HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(provider)
                .map_err(std::io::Error::other)?,
        };
    Ok(builder.https_or_http().enable_http1().wrap_connector(http))
}

async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = until_true(&mut shutdown) => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors or the like: try again shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut stop = shared.shutdown.subscribe();
            let svc_shared = shared.clone();
            let svc = service_fn(move |req| handle(svc_shared.clone(), req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = until_true(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    // Calls in flight get the grace period to end (and be recorded) ...
    let wait_idle = |limit: Duration| {
        let shared = shared.clone();
        async move {
            let _ = tokio::time::timeout(limit, async {
                loop {
                    let idle = shared.idle.notified();
                    tokio::pin!(idle);
                    idle.as_mut().enable();
                    if shared.active.load(Ordering::SeqCst) == 0 {
                        return;
                    }
                    idle.await;
                }
            })
            .await;
        }
    };
    wait_idle(shared.settings.grace).await;
    // ... then the rest are cut, and recorded as cut.
    let _ = shared.abort.send(true);
    wait_idle(ABORT_WAIT).await;
}

// ---------------------------------------------------------------------------
// Python

struct Running {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

/// The proxy's HTTP transport: serves on `host:port` and forwards to
/// `upstream`, deciding and recording each call through `policy`.
#[pyclass(module = "sigil._native", name = "ProxyTransport")]
pub struct PyProxyTransport {
    settings: Mutex<Option<Settings>>,
    policy: Py<PyAny>,
    host: String,
    port: u16,
    running: Mutex<Option<Running>>,
}

/// The memory bound must let one call alone hold its largest body (twice) and
/// its largest answer, or that call could never be served; a semaphore takes
/// at most `u32::MAX` at once.
fn check_memory(max_body: usize, max_response: usize, limit: usize) -> Result<(), String> {
    let one_call = max_body
        .saturating_mul(REQUEST_COPIES)
        .saturating_add(max_response);
    if limit > u32::MAX as usize {
        return Err(format!(
            "max_in_flight_bytes must be at most {}, got {}",
            commas(u32::MAX as usize),
            commas(limit)
        ));
    }
    if limit < one_call {
        return Err(format!(
            "max_in_flight_bytes ({}) must hold one call: its body twice and its answer, {} \
             bytes",
            commas(limit),
            commas(one_call)
        ));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[pymethods]
impl PyProxyTransport {
    #[new]
    #[pyo3(signature = (policy, upstream, host, port, *, timeout, max_body_bytes, max_response_bytes, max_in_flight_bytes, token=None, api_key=None, grace=5.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        policy: Py<PyAny>,
        upstream: &str,
        host: &str,
        port: u16,
        timeout: f64,
        max_body_bytes: usize,
        max_response_bytes: usize,
        max_in_flight_bytes: usize,
        token: Option<String>,
        api_key: Option<String>,
        grace: f64,
    ) -> PyResult<Self> {
        let secs = |s: f64, what: &str| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| crate::errors::value_error(format!("{what} must be >= 0, got {s}")))
        };
        check_memory(max_body_bytes, max_response_bytes, max_in_flight_bytes)
            .map_err(crate::errors::value_error)?;
        Ok(PyProxyTransport {
            settings: Mutex::new(Some(Settings {
                upstream: upstream.trim_end_matches('/').to_string(),
                timeout: secs(timeout, "timeout")?,
                max_body: max_body_bytes,
                max_response: max_response_bytes,
                max_in_flight: max_in_flight_bytes,
                token,
                api_key,
                grace: secs(grace, "grace")?,
            })),
            policy,
            host: host.to_string(),
            port,
            running: Mutex::new(None),
        })
    }

    /// Bind and serve (on a thread of its own); returns the bound `(host, port)`.
    fn start(&self, py: Python<'_>) -> PyResult<(String, u16)> {
        let settings = lock(&self.settings)
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the proxy transport was started already"))?;
        let policy = self.policy.clone_ref(py);
        let (host, port) = (self.host.clone(), self.port);
        let (running, addr) = py
            .detach(move || -> std::io::Result<(Running, SocketAddr)> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let addr = (host.as_str(), port)
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| std::io::Error::other(format!("cannot resolve {host}")))?;
                let listener = rt.block_on(async {
                    let socket = if addr.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    socket.set_reuseaddr(true)?;
                    socket.bind(addr)?;
                    socket.listen(1024)
                })?;
                let bound = listener.local_addr()?;
                let connector = connector(settings.timeout)?;
                let client = Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build(connector);
                let shared = Arc::new(Shared {
                    memory: Memory::new(settings.max_in_flight),
                    settings,
                    policy,
                    client,
                    settled: Notify::new(),
                    shutdown: watch::channel(false).0,
                    abort: watch::channel(false).0,
                    active: AtomicUsize::new(0),
                    idle: Notify::new(),
                });
                let serving = shared.clone();
                let thread = std::thread::Builder::new()
                    .name("sigil-proxy".into())
                    .spawn(move || {
                        // Attached once for the thread's life, detached while it
                        // serves: each policy call then takes the GIL with this
                        // thread's own state, rather than creating and destroying
                        // a thread state per call.
                        Python::attach(|py| py.detach(|| rt.block_on(serve(serving, listener))))
                    })?;
                Ok((Running { shared, thread }, bound))
            })
            .map_err(|e| os_error(&e, None))?;
        *lock(&self.running) = Some(running);
        Ok((addr.ip().to_string(), addr.port()))
    }

    /// Wake the calls waiting to be admitted (they ask the policy again).
    fn wake(&self) {
        if let Some(r) = lock(&self.running).as_ref() {
            r.shared.settled.notify_waiters();
        }
    }

    /// Stop accepting, give calls in flight the grace period to end (they are
    /// recorded), cut the rest (recorded as cut), and close. Idempotent.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let running = lock(&self.running).take();
        let Some(running) = running else {
            return Ok(());
        };
        let _ = running.shared.shutdown.send(true);
        let joined = py.detach(move || running.thread.join());
        joined.map_err(|_| PyRuntimeError::new_err("internal error in sigil._native (proxy)"))
    }

    /// Bytes of request and response bodies the calls in flight hold now (of
    /// `max_in_flight_bytes`).
    #[getter]
    fn held_bytes(&self) -> usize {
        lock(&self.running)
            .as_ref()
            .map_or(0, |r| r.shared.memory.held())
    }

    /// Calls being served now.
    #[getter]
    fn active(&self) -> usize {
        lock(&self.running)
            .as_ref()
            .map_or(0, |r| r.shared.active.load(Ordering::SeqCst))
    }
}

impl Drop for PyProxyTransport {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.running).take() {
            let _ = r.shared.shutdown.send(true);
            let _ = r.shared.abort.send(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_group_thousands() {
        assert_eq!(commas(0), "0");
        assert_eq!(commas(999), "999");
        assert_eq!(commas(1000), "1,000");
        assert_eq!(commas(33_554_432), "33,554,432");
    }

    #[test]
    fn routes() {
        assert!(matches!(
            route(&Method::POST, "/v1/chat/completions"),
            Route::Metered(0)
        ));
        assert!(matches!(
            route(&Method::POST, "/v1/embeddings"),
            Route::Metered(3)
        ));
        assert!(matches!(route(&Method::GET, "/v1/models"), Route::Models));
        assert!(matches!(route(&Method::HEAD, "/v1/models"), Route::Models));
        assert!(matches!(
            route(&Method::HEAD, "/v1/models/m"),
            Route::Models
        ));
        assert!(matches!(
            route(&Method::HEAD, "/v1/chat/completions"),
            Route::NotFound
        ));
        assert!(matches!(route(&Method::PUT, "/v1/models"), Route::NotFound));
        assert!(matches!(route(&Method::POST, "/v1"), Route::NotFound));
        assert!(matches!(
            route(&Method::POST, "/chat/completions"),
            Route::NotFound
        ));
        for (i, e) in ENDPOINTS.iter().enumerate() {
            let path = format!("{API_ROOT}{e}");
            assert!(matches!(route(&Method::POST, &path), Route::Metered(j) if j == i));
        }
        assert!(matches!(
            route(&Method::GET, "/v1/models/a/b"),
            Route::Models
        ));
        assert!(matches!(
            route(&Method::GET, "/v1/models/"),
            Route::NotFound
        ));
        assert!(matches!(
            route(&Method::GET, "/v1/chat/completions"),
            Route::NotFound
        ));
        assert!(matches!(
            route(&Method::POST, "/v1/audio/speech"),
            Route::NotFound
        ));
    }

    #[test]
    fn loopback_names() {
        for host in [
            "localhost",
            "LOCALHOST:8080",
            "localhost.",
            "127.0.0.1",
            "127.0.0.1:4000",
            "127.9.9.9",
            "[::1]",
            "[::1]:4000",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:4000",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1",
            "[::2]:1",
            "[::1]x",
            "",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn pages_of_other_sites_are_told_apart_from_programs() {
        let of = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            from_another_site(&h)
        };
        assert_eq!(of(&[]), None);
        assert_eq!(of(&[("host", "127.0.0.1:9")]), None);
        assert_eq!(of(&[("origin", "http://localhost:3000")]), None);
        assert_eq!(of(&[("sec-fetch-site", "same-site")]), None);
        assert!(of(&[("host", "evil.example:9")]).is_some());
        assert!(of(&[("origin", "https://evil.example")]).is_some());
        assert!(of(&[("origin", "null")]).is_some());
        assert!(of(&[("origin", "http://localhost:3000/x")]).is_some());
        assert!(of(&[("sec-fetch-site", "cross-site")]).is_some());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bodies_are_read_to_their_bound() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(
            read_bounded(body.clone(), 10, false, None).await.ok(),
            Some(Bytes::from_static(b"0123456789"))
        );
        assert!(matches!(
            read_bounded(body.clone(), 9, false, None).await,
            Err(ReadError::TooLarge)
        ));
        assert_eq!(
            read_bounded(body, 4, true, None).await.ok(),
            Some(Bytes::from_static(b"0123"))
        );
    }

    /// A body of unknown length, in frames.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn frames(parts: &[&'static [u8]]) -> Frames {
        Frames(parts.iter().map(|p| Bytes::from_static(p)).collect())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_hold_memory_while_they_run_and_wait_for_it_briefly() {
        let memory = Memory::new(25);
        let soon = || Instant::now() + Duration::from_millis(20);
        // A body of known length is held at once, REQUEST_COPIES times over.
        let mut first = Held::new(&memory);
        let charge = Charge {
            held: &mut first,
            copies: 2,
            until: soon(),
            behind: false,
        };
        let body = Full::new(Bytes::from_static(b"0123456789"));
        assert!(read_bounded(body, 100, false, Some(charge)).await.is_ok());
        assert_eq!((first.bytes, memory.held()), (20, 20));
        // What does not fit waits, then gives up; nothing stays held.
        let mut second = Held::new(&memory);
        let charge = Charge {
            held: &mut second,
            copies: 1,
            until: soon(),
            behind: false,
        };
        let mut body = Full::new(Bytes::from_static(b"0123456789"));
        assert!(matches!(
            read_bounded(&mut body, 100, false, Some(charge)).await,
            Err(ReadError::Overloaded)
        ));
        drain(&mut body, 100).await;
        assert!(body.is_end_stream());
        drop(second);
        assert_eq!(memory.held(), 20);
        // A body of unknown length takes its bytes frame by frame.
        let mut third = Held::new(&memory);
        let charge = Charge {
            held: &mut third,
            copies: 1,
            until: soon(),
            behind: false,
        };
        let body = frames(&[b"01", b"23", b"4567"]);
        assert!(matches!(
            read_bounded(body, 100, false, Some(charge)).await,
            Err(ReadError::Overloaded)
        ));
        assert_eq!(third.bytes, 4);
        drop(third);
        // Given back when the call ends; then it fits.
        drop(first);
        assert_eq!(memory.held(), 0);
        let mut fourth = Held::new(&memory);
        let charge = Charge {
            held: &mut fourth,
            copies: 1,
            until: soon(),
            behind: false,
        };
        let body = frames(&[b"01", b"23", b"4567"]);
        let read = read_bounded(body, 100, false, Some(charge)).await;
        assert_eq!(read.ok(), Some(Bytes::from_static(b"01234567")));
        assert_eq!(memory.held(), 8);
        // A cut body holds only what it keeps.
        let mut fifth = Held::new(&memory);
        let charge = Charge {
            held: &mut fifth,
            copies: 1,
            until: soon(),
            behind: false,
        };
        let body = Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(
            read_bounded(body, 4, true, Some(charge)).await.ok(),
            Some(Bytes::from_static(b"0123"))
        );
        assert_eq!(fifth.bytes, 4);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_never_waits_behind_a_request() {
        let memory = Memory::new(100);
        let later = Instant::now() + Duration::from_secs(30);
        let mut first = Held::new(&memory);
        assert!(first.take(100, later, false).await);
        // A request waits for 50 bytes first; then an answer for all 100.
        let mut request = Held::new(&memory);
        let asked = tokio::spawn(async move { (request.take(50, later, true).await, request) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut answer = Held::new(&memory);
        let answered = tokio::spawn(async move { (answer.take(100, later, false).await, answer) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        // The freed bytes go to the answer, though the request came first.
        let (ok, answer) = answered.await.unwrap();
        assert!(ok);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!asked.is_finished());
        assert_eq!(memory.held(), 100);
        drop(answer);
        let (ok, _request) = asked.await.unwrap();
        assert!(ok);
        assert_eq!(memory.held(), 50);
    }

    #[test]
    fn the_memory_bound_holds_one_call() {
        assert!(check_memory(32 << 20, 256 << 20, 512 << 20).is_ok());
        assert!(check_memory(32 << 20, 256 << 20, 319 << 20).is_err());
        assert!(check_memory(1, 1, u32::MAX as usize + 1).is_err());
    }
}
