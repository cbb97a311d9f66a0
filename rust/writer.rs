//! The buffered append writer (ARCHITECTURE.md contracts 3 and 4).
//!
//! Callers hand over whole lines and return at once; a background thread writes
//! them with as few `write(2)` calls as possible and fsyncs per policy. The file
//! is opened O_APPEND|O_CREAT, mode 0600, never through a symlink. A torn tail
//! left by a crash is repaired by starting on a new line. When the path is
//! renamed away (rotation), the next flush reopens the path. Disk errors never
//! reach `write`: the buffer stays under `max_buffer_bytes`, what does not fit
//! is dropped and counted, and the next successful flush writes one
//! `events_dropped` line saying how many events were lost.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::parse::push_json_str;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    Always,
    Interval,
    Never,
}

impl FsyncPolicy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "always" => Some(Self::Always),
            "interval" => Some(Self::Interval),
            "never" => Some(Self::Never),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub buffer_bytes: usize,
    pub flush_interval: Duration,
    pub fsync: FsyncPolicy,
    pub max_buffer_bytes: usize,
    /// Used in the `events_dropped` notice line.
    pub session_id: String,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            buffer_bytes: 1024,
            flush_interval: Duration::from_millis(100),
            fsync: FsyncPolicy::Interval,
            max_buffer_bytes: 8 << 20,
            session_id: String::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriterStats {
    pub lines_accepted: u64,
    pub lines_written: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub fsyncs: u64,
    pub dropped_lines: u64,
    pub reopens: u64,
    pub torn_tails_repaired: u64,
    pub buffered_bytes: u64,
    pub last_error: Option<(i32, String)>,
}

struct State {
    buf: Vec<u8>,
    /// The buffer starts with the rest of a line whose head is already in the file
    /// (a write that failed half-way).
    head_partial: bool,
    /// Once a line is dropped, everything is dropped until a flush succeeds, so
    /// the notice line sits exactly where the events went missing.
    dropping: bool,
    dropped_pending: u64,
    flush_requested: bool,
    closed: bool,
    /// While flushes fail, the background thread retries at most once per
    /// interval. Kept here, not in `Io`, so the thread never takes the `io`
    /// lock while holding this one (lock order is always io, then state).
    retry_at: Option<Instant>,
    next_seq: u64,
    lines_accepted: u64,
    dropped_lines: u64,
}

struct Io {
    file: Option<File>,
    ident: (u64, u64),
    needs_newline: bool,
    dirty: bool,
    last_fsync: Instant,
    lines_written: u64,
    bytes_written: u64,
    flushes: u64,
    fsyncs: u64,
    reopens: u64,
    torn_tails_repaired: u64,
    last_error: Option<(i32, String)>,
    /// The file holding the head of a half-written line, if any.
    partial_ident: Option<(u64, u64)>,
}

struct Shared {
    path: PathBuf,
    cfg: WriterConfig,
    state: Mutex<State>,
    wake: Condvar,
    io: Mutex<Io>,
}

pub struct AppendWriter {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A poisoned lock only means another thread panicked mid-update; the data is
/// plain counters and bytes, so keep going rather than propagate the panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn err_of(e: &io::Error) -> (i32, String) {
    (e.raw_os_error().unwrap_or(0), e.to_string())
}

/// Create `dir` and missing parents with mode 0700 whatever the umask.
pub fn create_private_dirs(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to use {}: it is a symlink", dir.display()),
            ))
        }
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dir.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        if !parent.exists() {
            create_private_dirs(parent)?;
        }
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o700)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Open `path` for appending: O_APPEND|O_CREAT|O_NOFOLLOW, 0600.
/// Returns the file, its identity and whether its last byte is not `\n`.
fn open_append(path: &Path) -> io::Result<(File, (u64, u64), bool)> {
    if let Some(parent) = path.parent() {
        create_private_dirs(parent)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("refusing to write {}: it is a symlink", path.display()),
                )
            } else {
                e
            }
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.mode() & 0o777 != 0o600 {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    let torn = if meta.len() > 0 {
        let mut last = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut last, meta.len() - 1)?;
        last[0] != b'\n'
    } else {
        false
    };
    Ok((file, (meta.dev(), meta.ino()), torn))
}

impl AppendWriter {
    pub fn open(path: impl Into<PathBuf>, cfg: WriterConfig, start_seq: u64) -> io::Result<Self> {
        let path = path.into();
        let (file, ident, torn) = open_append(&path)?;
        let repaired = u64::from(torn);
        let shared = Arc::new(Shared {
            path,
            state: Mutex::new(State {
                buf: Vec::with_capacity(cfg.buffer_bytes.max(64) * 2),
                head_partial: false,
                dropping: false,
                dropped_pending: 0,
                flush_requested: false,
                closed: false,
                retry_at: None,
                next_seq: start_seq,
                lines_accepted: 0,
                dropped_lines: 0,
            }),
            wake: Condvar::new(),
            io: Mutex::new(Io {
                file: Some(file),
                ident,
                needs_newline: torn,
                dirty: false,
                last_fsync: Instant::now(),
                lines_written: 0,
                bytes_written: 0,
                flushes: 0,
                fsyncs: 0,
                reopens: 0,
                torn_tails_repaired: repaired,
                last_error: None,
                partial_ident: None,
            }),
            cfg,
        });
        let bg = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sigil-writer".into())
            .spawn(move || background(bg))?;
        Ok(AppendWriter {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queue one line (a trailing `\n` is optional and never doubled).
    /// Errors only for a closed writer or a line with an embedded newline.
    pub fn write_line(&self, line: &[u8]) -> Result<(), WriteError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if memchr::memchr(b'\n', line).is_some() {
            return Err(WriteError::EmbeddedNewline);
        }
        let mut st = lock(&self.shared.state);
        if st.closed {
            return Err(WriteError::Closed);
        }
        self.push_locked(&mut st, |buf| buf.extend_from_slice(line), line.len());
        Ok(())
    }

    /// Format and queue one event, assigning its `seq` under the buffer lock so
    /// that seq order is file order even with several writing threads.
    #[allow(clippy::too_many_arguments)]
    pub fn write_event(
        &self,
        session_id: &str,
        event_type: &str,
        component: &str,
        message: &str,
        tokens: u64,
        metadata: Option<&[u8]>,
        timestamp: Option<&str>,
    ) -> Result<u64, WriteError> {
        if let Some(m) = metadata {
            // One JSON object on one line, or the event would be written malformed.
            let valid = m.first() == Some(&b'{')
                && memchr::memchr(b'\n', m).is_none()
                && serde_json::from_slice::<serde::de::IgnoredAny>(m).is_ok();
            if !valid {
                return Err(WriteError::BadMetadata);
            }
        }
        let mut ts_buf = [0u8; 32];
        let ts = match timestamp {
            Some(t) => t,
            None => format_now(&mut ts_buf),
        };
        let estimate = 128
            + ts.len()
            + session_id.len()
            + event_type.len()
            + component.len()
            + message.len()
            + metadata.map_or(2, |m| m.len());
        let mut st = lock(&self.shared.state);
        if st.closed {
            return Err(WriteError::Closed);
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        self.push_locked(
            &mut st,
            |out| {
                out.extend_from_slice(b"{\"timestamp\":");
                push_json_str(out, ts);
                out.extend_from_slice(b",\"session_id\":");
                push_json_str(out, session_id);
                out.extend_from_slice(b",\"event_type\":");
                push_json_str(out, event_type);
                out.extend_from_slice(b",\"component\":");
                push_json_str(out, component);
                out.extend_from_slice(b",\"message\":");
                push_json_str(out, message);
                out.extend_from_slice(b",\"tokens\":");
                out.extend_from_slice(itoa_u64(tokens, &mut [0u8; 20]));
                out.extend_from_slice(b",\"metadata\":");
                out.extend_from_slice(metadata.unwrap_or(b"{}"));
                out.extend_from_slice(b",\"seq\":");
                out.extend_from_slice(itoa_u64(seq, &mut [0u8; 20]));
                out.push(b'}');
            },
            estimate,
        );
        Ok(seq)
    }

    fn push_locked(&self, st: &mut State, fill: impl FnOnce(&mut Vec<u8>), estimate: usize) {
        st.lines_accepted += 1;
        if st.dropping || st.buf.len() + estimate + 1 > self.shared.cfg.max_buffer_bytes {
            st.dropping = true;
            st.dropped_pending += 1;
            st.dropped_lines += 1;
            return;
        }
        let before = st.buf.len();
        fill(&mut st.buf);
        if st.buf.len() - before + 1 > self.shared.cfg.max_buffer_bytes {
            st.buf.truncate(before);
            st.dropping = true;
            st.dropped_pending += 1;
            st.dropped_lines += 1;
            return;
        }
        st.buf.push(b'\n');
        // Wake the flusher once, when the buffer crosses the threshold: later
        // lines ride along with that flush (no wake-up per line).
        let threshold = self.shared.cfg.buffer_bytes;
        if before < threshold && st.buf.len() >= threshold {
            self.shared.wake.notify_one();
        }
    }

    pub fn next_seq(&self) -> u64 {
        lock(&self.shared.state).next_seq
    }

    /// Write everything queued; fsync unless the policy is `never` (or `force_fsync`).
    pub fn flush(&self, force_fsync: bool) -> io::Result<()> {
        let sync = force_fsync || self.shared.cfg.fsync != FsyncPolicy::Never;
        flush_once(&self.shared, if sync { Sync::Now } else { Sync::No })
    }

    /// Flush, fsync, stop the background thread. Idempotent.
    pub fn close(&self) -> io::Result<()> {
        // No early return for an already-closed writer: if an earlier close
        // failed (disk full), this one tries again to write what is held.
        lock(&self.shared.state).closed = true;
        self.shared.wake.notify_all();
        if let Some(handle) = lock(&self.thread).take() {
            let _ = handle.join();
        }
        let result = flush_once(&self.shared, Sync::Now);
        let mut io = lock(&self.shared.io);
        if result.is_ok() {
            io.file = None;
        }
        result
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.shared.state).closed
    }

    pub fn stats(&self) -> WriterStats {
        let io = lock(&self.shared.io);
        let st = lock(&self.shared.state);
        WriterStats {
            lines_accepted: st.lines_accepted,
            lines_written: io.lines_written,
            bytes_written: io.bytes_written,
            flushes: io.flushes,
            fsyncs: io.fsyncs,
            dropped_lines: st.dropped_lines,
            reopens: io.reopens,
            torn_tails_repaired: io.torn_tails_repaired,
            buffered_bytes: st.buf.len() as u64,
            last_error: io.last_error.clone(),
        }
    }
}

impl Drop for AppendWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum WriteError {
    Closed,
    EmbeddedNewline,
    BadMetadata,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriteError::Closed => "write to a closed AppendWriter",
            WriteError::EmbeddedNewline => "a line must not contain a newline except at its end",
            WriteError::BadMetadata => "metadata must be one JSON object on one line",
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Sync {
    No,
    Now,
    /// fsync if the interval since the last one has passed.
    IfDue,
}

fn background(shared: Arc<Shared>) {
    let interval = shared.cfg.flush_interval.max(Duration::from_millis(1));
    loop {
        let closing;
        {
            let mut st = lock(&shared.state);
            let deadline = Instant::now() + interval;
            loop {
                if st.closed {
                    break;
                }
                let retry_wait = st.retry_at.filter(|at| *at > Instant::now());
                let ready = (st.buf.len() >= shared.cfg.buffer_bytes || st.flush_requested)
                    && retry_wait.is_none();
                if ready {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let mut wait = deadline - now;
                if let Some(at) = retry_wait {
                    wait = wait.min(at.saturating_duration_since(now));
                }
                st = shared
                    .wake
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            st.flush_requested = false;
            closing = st.closed;
        }
        if closing {
            return; // close() does the final flush and fsync on its own thread
        }
        let sync = match shared.cfg.fsync {
            FsyncPolicy::Always => Sync::Now,
            FsyncPolicy::Interval => Sync::IfDue,
            FsyncPolicy::Never => Sync::No,
        };
        let _ = flush_once(&shared, sync);
    }
}

fn flush_once(shared: &Shared, sync: Sync) -> io::Result<()> {
    let mut io = lock(&shared.io);
    let (mut data, dropped, head_partial) = {
        let mut st = lock(&shared.state);
        let cap = st.buf.capacity().min(1 << 20);
        let data = std::mem::replace(&mut st.buf, Vec::with_capacity(cap));
        let partial = std::mem::take(&mut st.head_partial);
        (data, st.dropped_pending, partial)
    };
    let interval = shared.cfg.flush_interval;
    let result = write_batch(shared, &mut io, &mut data, dropped, head_partial);
    match result {
        Ok(()) => {
            lock(&shared.state).retry_at = None;
            let due = match sync {
                Sync::Now => io.dirty,
                Sync::IfDue => io.dirty && io.last_fsync.elapsed() >= interval,
                Sync::No => false,
            };
            if due {
                if let Some(f) = io.file.as_ref() {
                    if let Err(e) = f.sync_data() {
                        io.last_error = Some(err_of(&e));
                        return Err(e);
                    }
                }
                io.fsyncs += 1;
                io.dirty = false;
                io.last_fsync = Instant::now();
            }
            Ok(())
        }
        Err((e, rest, rest_partial)) => {
            io.last_error = Some(err_of(&e));
            let mut st = lock(&shared.state);
            st.retry_at = Some(Instant::now() + interval);
            if !rest.is_empty() {
                // Lines queued while the write failed go after what it kept back;
                // the newest whole lines that no longer fit are dropped and counted.
                let room = shared.cfg.max_buffer_bytes.saturating_sub(rest.len());
                let newer = std::mem::take(&mut st.buf);
                let keep = whole_lines_within(&newer, room);
                let lost = memchr::memchr_iter(b'\n', &newer[keep..]).count() as u64;
                if lost > 0 {
                    st.dropping = true;
                    st.dropped_pending += lost;
                    st.dropped_lines += lost;
                }
                let mut merged = rest;
                merged.extend_from_slice(&newer[..keep]);
                st.buf = merged;
                st.head_partial = rest_partial;
            } else if rest_partial {
                st.head_partial = true;
            }
            if st.buf.len() >= shared.cfg.max_buffer_bytes {
                st.dropping = true;
            }
            Err(e)
        }
    }
}

/// A failed write: the error, the bytes not written, whether they start mid-line.
type Unwritten = (io::Error, Vec<u8>, bool);

/// Write the batch (plus the drop notice) to the file; on failure return what
/// was not written and whether it starts mid-line.
fn write_batch(
    shared: &Shared,
    io: &mut Io,
    data: &mut Vec<u8>,
    dropped: u64,
    mut head_partial: bool,
) -> Result<(), Unwritten> {
    if data.is_empty() && dropped == 0 {
        return Ok(());
    }
    if let Err(e) = ensure_current(shared, io) {
        return Err((e, std::mem::take(data), head_partial));
    }
    if head_partial && io.partial_ident != Some(io.ident) {
        // The head of this line went to a file that has since been rotated away;
        // its rest would be garbage in the new one. Drop it up to the next newline.
        let cut = memchr::memchr(b'\n', data).map_or(data.len(), |i| i + 1);
        data.drain(..cut);
        head_partial = false;
    }
    let mut out = std::mem::take(data);
    // The newline that repairs a torn tail is added here on every attempt until
    // one write gets it into the file, so it is never part of what is kept back.
    let repair = usize::from(io.needs_newline && !head_partial);
    if repair == 1 {
        out.insert(0, b'\n');
    }
    let data_len = out.len();
    if dropped > 0 {
        out.extend_from_slice(&drop_notice(
            &shared.cfg.session_id,
            dropped,
            &io.last_error,
        ));
    }
    let file = match io.file.as_mut() {
        Some(f) => f,
        None => {
            out.truncate(data_len);
            return Err((io::Error::other("writer is closed"), out, head_partial));
        }
    };
    let mut written = 0usize;
    let mut failure = None;
    while written < out.len() {
        match file.write(&out[written..]) {
            Ok(0) => {
                failure = Some(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
                break;
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if written > 0 {
        io.needs_newline = false;
        io.dirty = true;
        io.flushes += 1;
        io.bytes_written += written as u64;
        io.lines_written += memchr::memchr_iter(b'\n', &out[..written]).count() as u64;
    }
    // The notice counts as delivered once any of it is in the file: its rest is
    // then ordinary pending bytes that complete the line.
    let notice_delivered = dropped > 0 && written > data_len;
    if failure.is_none() || notice_delivered {
        let mut st = lock(&shared.state);
        st.dropped_pending -= dropped;
        if st.dropped_pending == 0 {
            st.dropping = false;
        }
    }
    match failure {
        None => Ok(()),
        Some(e) => {
            let keep_to = if notice_delivered {
                out.len()
            } else {
                data_len
            };
            let rest = out[written.max(repair).min(keep_to)..keep_to].to_vec();
            // Nothing written: the rest starts where it started before.
            let partial = if written > 0 {
                out[written - 1] != b'\n'
            } else {
                head_partial
            };
            if written > 0 && partial {
                io.partial_ident = Some(io.ident);
            }
            Err((e, rest, partial))
        }
    }
}

/// Length of the longest prefix of `buf` made of whole lines and at most `room` bytes.
fn whole_lines_within(buf: &[u8], room: usize) -> usize {
    if buf.len() <= room {
        return buf.len();
    }
    memchr::memrchr(b'\n', &buf[..room]).map_or(0, |i| i + 1)
}

/// Reopen the path if it was renamed away or replaced (rotation).
fn ensure_current(shared: &Shared, io: &mut Io) -> io::Result<()> {
    let current = match fs::symlink_metadata(&shared.path) {
        Ok(m) => Some((m.dev(), m.ino())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if io.file.is_some() && current == Some(io.ident) {
        return Ok(());
    }
    let (file, ident, torn) = open_append(&shared.path)?;
    if io.file.is_some() {
        io.reopens += 1;
        // Make what went to the old file durable before moving on.
        if let Some(old) = io.file.as_ref() {
            let _ = old.sync_data();
        }
    }
    io.file = Some(file);
    io.ident = ident;
    if torn {
        io.torn_tails_repaired += 1;
    }
    io.needs_newline = torn;
    Ok(())
}

fn drop_notice(session_id: &str, dropped: u64, last_error: &Option<(i32, String)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut ts = [0u8; 32];
    let (errno, text) = last_error
        .clone()
        .unwrap_or((0, "buffer limit reached".to_string()));
    out.extend_from_slice(b"{\"timestamp\":");
    push_json_str(&mut out, format_now(&mut ts));
    out.extend_from_slice(b",\"session_id\":");
    push_json_str(&mut out, session_id);
    out.extend_from_slice(
        b",\"event_type\":\"events_dropped\",\"component\":\"logger\",\"message\":",
    );
    push_json_str(
        &mut out,
        &format!("{dropped} events were lost while the log could not be written: {text}"),
    );
    out.extend_from_slice(b",\"tokens\":0,\"metadata\":{\"dropped\":");
    out.extend_from_slice(itoa_u64(dropped, &mut [0u8; 20]));
    out.extend_from_slice(b",\"errno\":");
    out.extend_from_slice(itoa_u64(errno.max(0) as u64, &mut [0u8; 20]));
    out.extend_from_slice(b"}}\n");
    out
}

fn itoa_u64(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Format the current UTC time as `YYYY-MM-DDTHH:MM:SS.ffffff+00:00` (the form
/// `datetime.now(timezone.utc).isoformat()` gives).
pub fn format_now(buf: &mut [u8; 32]) -> &str {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_timestamp(now.as_secs() as i64, now.subsec_micros(), buf)
}

pub fn format_timestamp(secs: i64, micros: u32, buf: &mut [u8; 32]) -> &str {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let mut w = &mut buf[..];
    let _ = write!(
        w,
        "{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{micros:06}+00:00"
    );
    let len = 32 - w.len();
    std::str::from_utf8(&buf[..len]).unwrap_or("1970-01-01T00:00:00.000000+00:00")
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn read(path: &Path) -> String {
        let mut s = String::new();
        File::open(path).unwrap().read_to_string(&mut s).unwrap();
        s
    }

    fn cfg() -> WriterConfig {
        WriterConfig {
            session_id: "s".into(),
            ..Default::default()
        }
    }

    #[test]
    fn writes_lines_and_creates_private_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/execution.jsonl");
        let w = AppendWriter::open(&path, cfg(), 0).unwrap();
        w.write_line(b"one").unwrap();
        w.write_line(b"two\n").unwrap();
        w.close().unwrap();
        w.close().unwrap();
        assert_eq!(read(&path), "one\ntwo\n");
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        assert_eq!(w.write_line(b"x"), Err(WriteError::Closed));
        let s = w.stats();
        assert_eq!((s.lines_written, s.fsyncs >= 1), (2, true));
    }

    #[test]
    fn rejects_embedded_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let w = AppendWriter::open(dir.path().join("f"), cfg(), 0).unwrap();
        assert_eq!(w.write_line(b"a\nb"), Err(WriteError::EmbeddedNewline));
    }

    #[test]
    fn repairs_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, "whole\n{\"torn").unwrap();
        let w = AppendWriter::open(&path, cfg(), 0).unwrap();
        w.write_line(b"next").unwrap();
        w.close().unwrap();
        assert_eq!(read(&path), "whole\n{\"torn\nnext\n");
    }

    #[test]
    fn refuses_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = AppendWriter::open(&link, cfg(), 0).err().unwrap();
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    #[test]
    fn write_event_formats_json_and_assigns_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let w = AppendWriter::open(&path, cfg(), 7).unwrap();
        let seq = w
            .write_event(
                "s",
                "step_complete",
                "routing",
                "a \"q\"",
                5,
                Some(b"{\"k\":1}"),
                None,
            )
            .unwrap();
        assert_eq!(seq, 7);
        assert_eq!(w.next_seq(), 8);
        assert_eq!(
            w.write_event("s", "x", "c", "m", 0, Some(b"[1]"), None),
            Err(WriteError::BadMetadata)
        );
        w.close().unwrap();
        let text = read(&path);
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["message"], "a \"q\"");
        assert_eq!(v["metadata"]["k"], 1);
        assert!(v["timestamp"].as_str().unwrap().ends_with("+00:00"));
    }

    #[test]
    fn follows_a_rename_by_reopening_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let w = AppendWriter::open(&path, cfg(), 0).unwrap();
        w.write_line(b"1").unwrap();
        w.flush(false).unwrap();
        fs::rename(&path, dir.path().join("f.1")).unwrap();
        w.write_line(b"2").unwrap();
        w.close().unwrap();
        assert_eq!(read(&dir.path().join("f.1")), "1\n");
        assert_eq!(read(&path), "2\n");
        assert_eq!(w.stats().reopens, 1);
    }

    #[test]
    fn bounded_buffer_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let c = WriterConfig {
            max_buffer_bytes: 100,
            buffer_bytes: 1 << 20,
            flush_interval: Duration::from_secs(3600),
            ..cfg()
        };
        let w = AppendWriter::open(&path, c, 0).unwrap();
        for _ in 0..20 {
            w.write_line(b"0123456789").unwrap();
        }
        w.close().unwrap();
        let text = read(&path);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10);
        assert!(lines[9].contains("\"events_dropped\""));
        assert!(lines[9].contains("\"dropped\":11"), "{}", lines[9]);
        assert_eq!(w.stats().dropped_lines, 11);
    }

    #[test]
    fn background_thread_flushes_on_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let c = WriterConfig {
            flush_interval: Duration::from_millis(10),
            ..cfg()
        };
        let w = AppendWriter::open(&path, c, 0).unwrap();
        w.write_line(b"x").unwrap();
        let start = Instant::now();
        while read(&path).is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5), "never flushed");
            std::thread::sleep(Duration::from_millis(5));
        }
        w.close().unwrap();
    }

    #[test]
    fn flush_from_callers_never_deadlocks_with_the_background_thread() {
        let dir = tempfile::tempdir().unwrap();
        let c = WriterConfig {
            flush_interval: Duration::from_millis(1),
            buffer_bytes: 64,
            ..cfg()
        };
        let w = Arc::new(AppendWriter::open(dir.path().join("f"), c, 0).unwrap());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (w2, d2) = (Arc::clone(&w), Arc::clone(&done));
        let flusher = std::thread::spawn(move || {
            while !d2.load(std::sync::atomic::Ordering::Relaxed) {
                w2.flush(false).unwrap();
            }
        });
        for i in 0..20_000 {
            w.write_line(format!("line {i}").as_bytes()).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        flusher.join().unwrap();
        w.close().unwrap();
        assert_eq!(w.stats().lines_written, 20_000);
    }

    #[test]
    fn timestamps_are_iso_utc() {
        let mut b = [0u8; 32];
        assert_eq!(
            format_timestamp(0, 0, &mut b),
            "1970-01-01T00:00:00.000000+00:00"
        );
        assert_eq!(
            format_timestamp(1_768_126_532, 123_456, &mut b),
            "2026-01-11T10:15:32.123456+00:00"
        );
        assert_eq!(
            format_timestamp(951_782_400, 1, &mut b),
            "2000-02-29T00:00:00.000001+00:00"
        );
    }
}
