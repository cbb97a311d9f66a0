//! A native load generator and upstream for the proxy bench (benches/bench_proxy.py,
//! issue 14 "Numbers"): the Python client there was the bottleneck it measured.
//!
//! `proxy_load serve [--latency-ms MS | --latency-ms LO..HI] [--seed S]`
//!   serves a minimal OpenAI chat completion (the JSON shape of
//!   tests/proxy_upstream.py, `usage` included, so the proxy meters it) on
//!   127.0.0.1, prints its API root (`http://127.0.0.1:PORT/v1`) on one line,
//!   and serves until its stdin closes. Each call is answered after the fixed
//!   latency, or after one drawn per call from a seeded xorshift in `LO..=HI`;
//!   the answer's `x-upstream-held-us` header says how long the upstream held
//!   the call (body read to answer), so a client can subtract it.
//!
//! `proxy_load load --url ROOT [--url ROOT2 ...] --concurrency N --calls C
//!                 [--warmup W] [--rounds R] [--together 0|1] [--timeout-s T]`
//!   opens N keep-alive connections to each target (one per worker, each its
//!   own HTTP/1.1 connection, kept from round to round) and sends non-streamed
//!   chat completions, N at a time, each worker sending its next call as soon
//!   as its last one is answered. The C calls of each target are split over R
//!   rounds, and the rounds alternate between the targets (A, B, A, B, ...), so
//!   that whatever else loads the machine loads them alike; each round first
//!   sends W calls that are not recorded. With `--together 1` the targets'
//!   rounds run at the same time instead (N workers on each), so that the
//!   machine's other load falls on both at the same moments. Prints one JSON object: per target
//!   `calls`, `errors`, `sent` (warmup included), `wall_s` (recorded calls),
//!   `p50_ms`/`p99_ms`/`max_ms` (latency, nearest rank) and
//!   `p50_excess_ms`/`p99_excess_ms` (latency minus the upstream's held time:
//!   what the path costs beside the model's latency); and `client_cpu_s`.
//!
//! Every body is read bounded; a bad answer (status, size, no `usage`, no
//! header, timeout, broken connection) counts as an error, never a panic.
use std::convert::Infallible;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

/// The largest request or response body read.
const MAX_BODY: usize = 1 << 20;
/// The most calls one run records (latencies are kept in memory).
const MAX_CALLS: usize = 10_000_000;
/// The most connections one run opens.
const MAX_CONCURRENCY: usize = 10_000;
const HELD_HEADER: &str = "x-upstream-held-us";
const REQUEST_BODY: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":16}"#;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve_main(&args[1..]),
        Some("load") => load_main(&args[1..]),
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy_load: {e}");
            ExitCode::from(2)
        }
    }
}

fn usage() -> String {
    "usage: proxy_load serve [--latency-ms MS|LO..HI] [--seed S]\n       \
     proxy_load load --url ROOT [--url ROOT ...] --concurrency N --calls C \
     [--warmup W] [--rounds R] [--together 0|1] [--timeout-s T]"
        .to_string()
}

/// `--name value` pairs.
fn options(args: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(name) = it.next() {
        let Some(name) = name.strip_prefix("--") else {
            return Err(format!("unexpected argument {name:?}\n{}", usage()));
        };
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        out.push((name.to_string(), value.clone()));
    }
    Ok(out)
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("--{name}: not a number: {value:?}"))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

// -- the upstream -------------------------------------------------------------------

/// xorshift64*: a tiny seeded generator for the per-call latency.
struct XorShift(AtomicU64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point; mix the seed so small seeds differ well.
        let s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        XorShift(AtomicU64::new(s))
    }

    fn next(&self) -> u64 {
        let step = |mut x: u64| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x
        };
        let old = match self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)))
        {
            Ok(x) | Err(x) => x,
        };
        step(old).wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi` (the modulo bias is negligible for these ranges).
    fn between(&self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next() % (hi - lo + 1)
    }
}

struct Upstream {
    /// Latency range in microseconds.
    lo_us: u64,
    hi_us: u64,
    rng: XorShift,
}

fn serve_main(args: &[String]) -> Result<(), String> {
    let (mut lo_us, mut hi_us, mut seed) = (0u64, 0u64, 1u64);
    for (name, value) in options(args)? {
        match name.as_str() {
            "latency-ms" => {
                let (lo, hi) = value.split_once("..").unwrap_or((&value, &value));
                let lo: f64 = number(&name, lo)?;
                let hi: f64 = number(&name, hi)?;
                if !(0.0..=3_600_000.0).contains(&lo) || !(lo..=3_600_000.0).contains(&hi) {
                    return Err(format!("--latency-ms: bad range {value:?}"));
                }
                lo_us = (lo * 1000.0) as u64;
                hi_us = (hi * 1000.0) as u64;
            }
            "seed" => seed = number(&name, &value)?,
            _ => return Err(format!("unknown option --{name}\n{}", usage())),
        }
    }
    let upstream = Arc::new(Upstream {
        lo_us,
        hi_us,
        rng: XorShift::new(seed),
    });
    // The bench stops the upstream by closing its stdin (or killing it).
    std::thread::spawn(|| {
        let mut sink = String::new();
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read_line(&mut sink), Ok(n) if n > 0) {
            sink.clear();
        }
        std::process::exit(0);
    });
    runtime()?.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("no address: {e}"))?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "http://{addr}/v1").map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())?;
        }
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    eprintln!("proxy_load: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let upstream = Arc::clone(&upstream);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let upstream = Arc::clone(&upstream);
                    async move { Ok::<_, Infallible>(answer(&upstream, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// A chat completion as tests/proxy_upstream.py answers one (non-streamed).
async fn answer(upstream: &Upstream, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || !req.uri().path().ends_with("/chat/completions") {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body unreadable or too large",
            )
        }
    };
    let held = Instant::now();
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return plain(StatusCode::BAD_REQUEST, "not JSON");
    };
    let model = request.get("model").and_then(|m| m.as_str()).unwrap_or("m");
    let messages = request.get("messages").map(|m| m.to_string());
    let inp = 7 + messages.map_or(0, |m| m.len()) % 41;
    let cap = ["max_tokens", "max_completion_tokens"]
        .iter()
        .filter_map(|k| request.get(*k).and_then(|v| v.as_u64()))
        .min()
        .unwrap_or(1000);
    let out = cap.min(5) as usize;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let data = serde_json::json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": created,
        "model": format!("{model}-2026"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "w ".repeat(out)},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out},
    });
    let delay = upstream.rng.between(upstream.lo_us, upstream.hi_us);
    if delay > 0 {
        tokio::time::sleep(Duration::from_micros(delay)).await;
    }
    let mut resp = Response::new(Full::new(Bytes::from(data.to_string())));
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let held_us = held.elapsed().as_micros() as u64;
    headers.insert(HELD_HEADER, HeaderValue::from(held_us));
    resp
}

// -- the client ---------------------------------------------------------------------

/// One target of a load run (an API root).
struct Target {
    url: String,
    addr: SocketAddr,
    host: HeaderValue,
    path: Uri,
}

/// One phase: `warmup` unrecorded calls, then `calls` recorded ones, on one target.
struct Phase {
    target: Arc<Target>,
    warmup: usize,
    calls: usize,
    timeout: Duration,
    next: AtomicUsize,
    /// When the first recorded call started.
    started: Mutex<Option<Instant>>,
}

/// One recorded call: latency and the upstream's held time, in microseconds.
type Sample = (u64, u64);

/// What a target's phases added up to.
#[derive(Default)]
struct Tally {
    samples: Vec<Sample>,
    errors: usize,
    sent: usize,
    wall: f64,
}

fn target(url: &str) -> Result<Target, String> {
    let root: Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
    if root.scheme_str() != Some("http") {
        return Err(format!("--url {url:?}: only http:// is supported"));
    }
    let authority = root
        .authority()
        .ok_or_else(|| format!("--url {url:?}: no host"))?
        .clone();
    let addr: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| format!("--url {url:?}: the host must be IP:PORT"))?;
    let path = format!("{}/chat/completions", root.path().trim_end_matches('/'));
    Ok(Target {
        url: url.to_string(),
        addr,
        host: HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?,
        path: path
            .parse()
            .map_err(|e| format!("bad path {path:?}: {e}"))?,
    })
}

fn load_main(args: &[String]) -> Result<(), String> {
    let mut urls = Vec::new();
    let (mut concurrency, mut calls, mut warmup, mut rounds, mut timeout_s) =
        (0usize, 0usize, 0usize, 1usize, 60.0f64);
    let mut together = false;
    for (name, value) in options(args)? {
        match name.as_str() {
            "url" => urls.push(value),
            "concurrency" => concurrency = number(&name, &value)?,
            "calls" => calls = number(&name, &value)?,
            "warmup" => warmup = number(&name, &value)?,
            "rounds" => rounds = number(&name, &value)?,
            "timeout-s" => timeout_s = number(&name, &value)?,
            "together" => together = number::<u8>(&name, &value)? != 0,
            _ => return Err(format!("unknown option --{name}\n{}", usage())),
        }
    }
    if urls.is_empty() || urls.len() > 16 {
        return Err(format!("--url: 1 to 16 of them\n{}", usage()));
    }
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        return Err(format!("--concurrency: 1 to {MAX_CONCURRENCY}"));
    }
    if !(1..=MAX_CALLS).contains(&calls) || warmup > MAX_CALLS {
        return Err(format!(
            "--calls: 1 to {MAX_CALLS} (and --warmup at most that)"
        ));
    }
    if !(1..=calls).contains(&rounds) {
        return Err("--rounds: 1 to --calls".to_string());
    }
    if !(timeout_s > 0.0 && timeout_s <= 3600.0) {
        return Err("--timeout-s: above 0, at most 3600".to_string());
    }
    let targets = urls
        .iter()
        .map(|u| target(u).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_secs_f64(timeout_s);
    let cpu_before = cpu_seconds();
    let tallies = runtime()?.block_on(async {
        // Each target keeps its connections from one round to the next.
        let mut pools: Vec<Vec<Option<Sender>>> = targets
            .iter()
            .map(|_| (0..concurrency).map(|_| None).collect())
            .collect();
        let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
        // The targets measured at the same time (`--together`: all of them), or one by one.
        let groups: Vec<Vec<usize>> = if together {
            vec![(0..targets.len()).collect()]
        } else {
            (0..targets.len()).map(|i| vec![i]).collect()
        };
        for round in 0..rounds {
            // The calls split evenly over the rounds (the first rounds take the rest).
            let share = calls / rounds + usize::from(round < calls % rounds);
            for group in &groups {
                let mut running = Vec::with_capacity(group.len());
                for &i in group {
                    let phase = Arc::new(Phase {
                        target: Arc::clone(&targets[i]),
                        warmup,
                        calls: share,
                        timeout,
                        next: AtomicUsize::new(0),
                        started: Mutex::new(None),
                    });
                    let workers: Vec<_> = pools[i]
                        .iter_mut()
                        .map(|conn| tokio::spawn(worker(Arc::clone(&phase), conn.take())))
                        .collect();
                    running.push((i, phase, workers));
                }
                for (i, phase, workers) in running {
                    let tally = &mut tallies[i];
                    let mut ended: Option<Instant> = None;
                    for (w, slot) in workers.into_iter().zip(pools[i].iter_mut()) {
                        match w.await {
                            Ok((conn, s, e, n, end)) => {
                                *slot = conn;
                                tally.samples.extend(s);
                                tally.errors += e;
                                tally.sent += n;
                                ended = ended.max(Some(end));
                            }
                            Err(_) => tally.errors += 1,
                        }
                    }
                    let started = phase.started.lock().ok().and_then(|s| *s);
                    if let (Some(s), Some(e)) = (started, ended) {
                        tally.wall += e.saturating_duration_since(s).as_secs_f64();
                    }
                }
            }
        }
        tallies
    });
    let ms = |v: Option<u64>| v.map(|us| us as f64 / 1000.0);
    let mut out = Vec::new();
    for (t, tally) in targets.iter().zip(tallies) {
        let mut latency: Vec<u64> = tally.samples.iter().map(|s| s.0).collect();
        let mut excess: Vec<u64> = tally
            .samples
            .iter()
            .map(|s| s.0.saturating_sub(s.1))
            .collect();
        latency.sort_unstable();
        excess.sort_unstable();
        out.push(serde_json::json!({
            "url": t.url,
            "calls": tally.samples.len(),
            "errors": tally.errors,
            "sent": tally.sent,
            "wall_s": tally.wall,
            "p50_ms": ms(quantile(&latency, 0.50)),
            "p99_ms": ms(quantile(&latency, 0.99)),
            "max_ms": ms(latency.last().copied()),
            "p50_excess_ms": ms(quantile(&excess, 0.50)),
            "p99_excess_ms": ms(quantile(&excess, 0.99)),
        }));
    }
    let report = serde_json::json!({
        "concurrency": concurrency,
        "rounds": rounds,
        "together": together,
        "targets": out,
        "client_cpu_s": cpu_seconds() - cpu_before,
    });
    println!("{report}");
    Ok(())
}

/// The nearest-rank quantile of sorted values.
fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// This process's user + system CPU time.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One connection's calls in a phase: (its connection, recorded samples,
/// recorded errors, calls sent, when its last call ended).
async fn worker(
    phase: Arc<Phase>,
    mut sender: Option<Sender>,
) -> (Option<Sender>, Vec<Sample>, usize, usize, Instant) {
    let mut samples = Vec::new();
    let (mut errors, mut sent) = (0usize, 0usize);
    loop {
        let i = phase.next.fetch_add(1, Ordering::Relaxed);
        if i >= phase.warmup + phase.calls {
            break;
        }
        let record = i >= phase.warmup;
        let started = Instant::now();
        if i == phase.warmup {
            if let Ok(mut s) = phase.started.lock() {
                *s = Some(started);
            }
        }
        sent += 1;
        match tokio::time::timeout(phase.timeout, call(&phase.target, &mut sender)).await {
            Ok(Ok(held_us)) => {
                if record {
                    samples.push((started.elapsed().as_micros() as u64, held_us));
                }
            }
            Ok(Err(_)) | Err(_) => {
                // A broken or timed-out connection is not reused.
                sender = None;
                if record {
                    errors += 1;
                }
            }
        }
    }
    (sender, samples, errors, sent, Instant::now())
}

/// One chat completion on the worker's connection (opened when there is
/// none); the upstream's held time in microseconds.
async fn call(target: &Target, sender: &mut Option<Sender>) -> Result<u64, String> {
    if sender.is_none() {
        *sender = Some(connect(target.addr).await?);
    }
    let s = sender.as_mut().ok_or("no connection")?;
    s.ready().await.map_err(|e| e.to_string())?;
    let mut req = Request::new(Full::new(Bytes::from_static(REQUEST_BODY.as_bytes())));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = target.path.clone();
    let headers = req.headers_mut();
    headers.insert(HOST, target.host.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer sk-bench"));
    let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let held = resp
        .headers()
        .get(HELD_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!("status {status}"));
    }
    if memchr::memmem::find(&body, b"\"usage\"").is_none() {
        return Err("no usage in the answer".to_string());
    }
    held.ok_or_else(|| format!("no {HELD_HEADER} header"))
}
