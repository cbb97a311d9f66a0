//! The buffered append writer (ARCHITECTURE.md contracts 3 and 4).
//!
//! Callers hand over whole lines and return at once; a background thread writes
//! them with as few `write(2)` calls as possible and fsyncs per policy. The file
//! is opened O_APPEND|O_CREAT, mode 0600, never through a symlink and never if
//! it is not a regular file (a FIFO would block). A torn tail left by a crash is
//! repaired by starting on a new line. When the path is renamed away
//! (rotation), the next flush reopens the path. A file or directory the writer
//! creates has its directory fsynced at the next sync.
//!
//! Disk errors never reach `write`: the buffer stays under `max_buffer_bytes`.
//! While the disk takes writes (the last flush succeeded), a line that does
//! not fit waits for the flusher to make room (backpressure): a burst larger
//! than the buffer is written whole, never dropped. While it fails (ENOSPC,
//! EIO: the last flush failed), or when it has not taken a buffer within
//! [`BACKPRESSURE_LIMIT`], what does not fit is dropped and counted, and the
//! next successful flush writes one `events_dropped` line saying how many
//! events were lost and, in its `tokens` field, how many tokens they carried
//! (contract 2: the sum of `tokens` over the log stays the session's
//! consumption).
//!
//! A failed fsync is sticky ("fsyncgate": after a failed fsync the kernel may
//! have dropped the dirty pages and will not report it again). The bytes
//! written since the last good sync are kept aside; after a failure every
//! flush and close fails until they have been written again, to a freshly
//! opened descriptor, in place of the uncertain tail, and synced.
//!
//! A writer belongs to the process that opened it: in a forked child every
//! use is refused (close is a no-op), so nothing the parent queued is written
//! twice and no lock the parent's flush thread held at the fork is touched.

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A JSON string, as `parse::push_json_str` writes it: most strings need no
/// escape, which is checked a word at a time and then copied whole.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        crate::parse::push_json_str(out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Whether `bytes` holds a control character, `"` or `\` (a false positive
/// only costs the byte-by-byte escaper, which writes the same bytes).
pub(crate) fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let special = |w: u64| {
        let below_space = w.wrapping_sub(ONES * 0x20) & !w;
        let q = w ^ (ONES * u64::from(b'"'));
        let bs = w ^ (ONES * u64::from(b'\\'));
        (below_space | (q.wrapping_sub(ONES) & !q) | (bs.wrapping_sub(ONES) & !bs)) & HIGH != 0
    };
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        if special(u64::from_le_bytes(word)) {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// The largest `buffer_bytes` and `max_buffer_bytes` accepted (256 MiB). The
/// buffer is memory held for one log whose lines are at most 1 MiB each; beyond
/// this a size can only be a mistake that would take the process down.
pub const MAX_BUFFER_BYTES: usize = 256 << 20;

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
    /// Scrub secrets from each event's message and metadata strings
    /// (`sanitize::sanitize`) while formatting it.
    pub sanitize: bool,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            buffer_bytes: 1024,
            flush_interval: Duration::from_millis(100),
            fsync: FsyncPolicy::Interval,
            max_buffer_bytes: 8 << 20,
            session_id: String::new(),
            sanitize: false,
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
    pub dropped_tokens: u64,
    pub reopens: u64,
    pub torn_tails_repaired: u64,
    pub buffered_bytes: u64,
    pub fsync_failures: u64,
    pub sync_recoveries: u64,
    /// A failed fsync whose data is not yet written again and synced.
    pub sync_failed: bool,
    pub last_error: Option<(i32, String)>,
}

// ---------------------------------------------------------------------------
// Fork detection: a generation counter bumped in every forked child, so the
// check on the write path is one atomic load (getpid is a system call).

static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static AT_FORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Relaxed);
}

fn fork_generation() -> u64 {
    AT_FORK.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic, which is
        // async-signal-safe as a forked child's handlers must be.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
    FORK_GENERATION.load(Relaxed)
}

/// The longest a write waits for room in the buffer while the disk takes
/// writes; past it the disk counts as stalled and the line is dropped (and
/// counted) as on a failing disk.
pub const BACKPRESSURE_LIMIT: Duration = Duration::from_secs(10);

/// The queue: taken by writers and, briefly, by the flusher; never held across I/O.
struct State {
    buf: Vec<u8>,
    /// The buffer starts with the rest of a line whose head is already in the file
    /// (a write that failed half-way).
    head_partial: bool,
    /// Once a line is dropped, everything is dropped until a flush succeeds, so
    /// the notice line sits exactly where the events went missing.
    dropping: bool,
    dropped_pending: u64,
    dropped_tokens_pending: u64,
    flush_requested: bool,
    /// The background thread is waiting on `wake` (it checks the buffer
    /// under this lock before it waits): only then is a notify needed.
    flusher_waiting: bool,
    /// While flushes fail, the background thread retries at most once per
    /// interval. Kept here, not in `Io`, so the thread never takes the `io`
    /// lock while holding this one (lock order is always io, then state).
    retry_at: Option<Instant>,
    next_seq: u64,
    /// Writers waiting on `room` for the flusher to take the buffer.
    room_waiters: usize,
    /// Every event with a smaller seq is in the file (handed to the OS by a
    /// completed `write(2)`) or was dropped (`drop_range` says which).
    written_upto: u64,
    /// The seqs between which events were dropped (inclusive; conservative:
    /// an event in between may have been written): a waiter for one of them
    /// is told its event is not in the log.
    drop_range: Option<(u64, u64)>,
    /// Bumped by every failed flush (waiters then stop waiting, with its error).
    failures: u64,
    /// Callers of `wait_written` waiting now (the flusher notifies only then).
    waiters: u32,
    /// `close()` has made its last flush: nothing more will be written.
    final_flush_done: bool,
}

/// Counters read by `stats()` without any lock that I/O can hold.
#[derive(Default)]
struct Counters {
    lines_accepted: AtomicU64,
    lines_written: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    fsyncs: AtomicU64,
    dropped_lines: AtomicU64,
    dropped_tokens: AtomicU64,
    reopens: AtomicU64,
    torn_tails_repaired: AtomicU64,
    fsync_failures: AtomicU64,
    sync_recoveries: AtomicU64,
    sync_failed: AtomicBool,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

/// The file side, held by whoever writes or syncs (across the system calls).
struct Io {
    file: Option<File>,
    ident: (u64, u64),
    /// The file's length as this writer made it: where its next write lands.
    len: u64,
    needs_newline: bool,
    dirty: bool,
    last_fsync: Instant,
    /// The file holding the head of a half-written line, if any.
    partial_ident: Option<(u64, u64)>,
    /// What was written to `file` since its last good sync, kept so that a
    /// failed sync can be redone.
    unsynced: Vec<u8>,
    /// The file's length at its last good sync: what is durable.
    synced_len: u64,
    /// Bytes were written that `unsynced` does not hold (policy `never` past
    /// the bound): a failed sync covering them cannot be redone.
    untracked: bool,
    /// `unsynced` reached its bound: sync now instead of keeping more.
    force_sync: bool,
    /// A sync failed and what it covered is not yet written again and synced.
    failed: Option<Failed>,
    /// Directories whose new entries (a created file or directory) are not durable yet.
    dirs_to_sync: Vec<PathBuf>,
}

struct Failed {
    /// The descriptor whose sync failed (kept to cut its uncertain tail if the
    /// file was renamed away meanwhile).
    file: File,
    ident: (u64, u64),
    synced_len: u64,
    /// The file's length if nobody but this writer changed it.
    len: u64,
    errno: i32,
    unrecoverable: bool,
}

struct Shared {
    path: PathBuf,
    cfg: WriterConfig,
    state: Mutex<State>,
    wake: Condvar,
    /// Notified when the buffer is taken (room for waiting writers) or a
    /// flush fails (they stop waiting and drop).
    room: Condvar,
    /// A writer found the buffer full on a healthy disk (cleared when the
    /// flusher takes the buffer): the next writes wait for room first, off
    /// the caller's interpreter lock (`wait_for_room`).
    full: AtomicBool,
    /// Signalled (with `state`) when a flush has written or failed.
    written: Condvar,
    io: Mutex<Io>,
    counters: Counters,
    last_error: Mutex<Option<(i32, String)>>,
    closed: AtomicBool,
    fork_generation: u64,
    owner_pid: u32,
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

/// The errno and the message without Rust's " (os error N)" suffix.
fn err_of(e: &io::Error) -> (i32, String) {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    };
    (e.raw_os_error().unwrap_or(0), text)
}

fn record_error(shared: &Shared, e: &io::Error) {
    *lock(&shared.last_error) = Some(err_of(e));
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

/// Create `dir` and missing parents with mode 0700 whatever the umask; the
/// parent of every directory created is added to `created_in`, whose new
/// entries must be fsynced to be durable.
pub fn create_private_dirs(dir: &Path, created_in: &mut Vec<PathBuf>) -> io::Result<()> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(invalid(&format!(
                "refusing to use {}: it is a symlink",
                dir.display()
            )))
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
            create_private_dirs(parent, created_in)?;
        }
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            created_in.push(parent_dir(dir));
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct Opened {
    file: File,
    ident: (u64, u64),
    len: u64,
    /// The last byte is not `\n`.
    torn: bool,
}

/// Open `path` for appending: O_APPEND|O_NOFOLLOW|O_NONBLOCK (so that a FIFO
/// or device cannot block the open), 0600, a regular file only; O_NONBLOCK is
/// cleared before use. The directory of a file this call creates (and of any
/// directory it creates) is added to `created_in`.
fn open_append(path: &Path, created_in: &mut Vec<PathBuf>) -> io::Result<Opened> {
    let mut new_dirs = Vec::new();
    if let Some(parent) = path.parent() {
        create_private_dirs(parent, &mut new_dirs)?;
    }
    created_in.append(&mut new_dirs);
    let open = |create: bool| {
        let mut o = OpenOptions::new();
        o.read(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
        if create {
            o.create_new(true);
        }
        o.open(path)
    };
    // The existing file first: only a file created here needs its directory
    // entry made durable.
    let opened = match open(false) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match open(true) {
            Ok(f) => Ok((f, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open(false).map(|f| (f, false)),
            Err(e) => Err(e),
        },
        other => other.map(|f| (f, false)),
    };
    let (file, created) = opened.map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            invalid("refusing to write through a symlink")
        } else {
            e
        }
    })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(invalid("not a regular file"));
    }
    // SAFETY: plain fcntl on a descriptor this function owns.
    unsafe {
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if created {
        created_in.push(parent_dir(path));
    }
    if meta.mode() & 0o777 != 0o600 {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    let torn = ends_mid_line(&file, meta.len())?;
    Ok(Opened {
        file,
        ident: (meta.dev(), meta.ino()),
        len: meta.len(),
        torn,
    })
}

fn ends_mid_line(file: &File, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(false);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    Ok(last[0] != b'\n')
}

/// The `tokens` of a JSON line, 0 if it has none (used only for dropped lines:
/// the drop notice carries their sum).
fn line_tokens(line: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Tokens {
        #[serde(default)]
        tokens: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Tokens>(line)
        .ok()
        .and_then(|t| t.tokens)
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

fn lines_tokens(lines: &[u8]) -> u64 {
    lines
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(line_tokens)
        .fold(0u64, u64::saturating_add)
}

impl AppendWriter {
    pub fn open(path: impl Into<PathBuf>, cfg: WriterConfig, start_seq: u64) -> io::Result<Self> {
        let path = path.into();
        if !(1..=MAX_BUFFER_BYTES).contains(&cfg.buffer_bytes)
            || !(1..=MAX_BUFFER_BYTES).contains(&cfg.max_buffer_bytes)
        {
            return Err(invalid(&format!(
                "buffer_bytes and max_buffer_bytes must be from 1 to {MAX_BUFFER_BYTES}"
            )));
        }
        let fork_generation = fork_generation();
        let mut dirs_to_sync = Vec::new();
        let opened = open_append(&path, &mut dirs_to_sync)?;
        let shared = Arc::new(Shared {
            path,
            state: Mutex::new(State {
                // Allocated as lines arrive (with try_reserve), never up front.
                buf: Vec::new(),
                head_partial: false,
                dropping: false,
                dropped_pending: 0,
                dropped_tokens_pending: 0,
                flush_requested: false,
                flusher_waiting: false,
                retry_at: None,
                next_seq: start_seq,
                room_waiters: 0,
                written_upto: start_seq,
                drop_range: None,
                failures: 0,
                waiters: 0,
                final_flush_done: false,
            }),
            wake: Condvar::new(),
            room: Condvar::new(),
            full: AtomicBool::new(false),
            written: Condvar::new(),
            io: Mutex::new(Io {
                file: Some(opened.file),
                ident: opened.ident,
                len: opened.len,
                needs_newline: opened.torn,
                dirty: false,
                last_fsync: Instant::now(),
                partial_ident: None,
                unsynced: Vec::new(),
                synced_len: opened.len,
                untracked: false,
                force_sync: false,
                failed: None,
                dirs_to_sync,
            }),
            counters: Counters {
                torn_tails_repaired: AtomicU64::new(u64::from(opened.torn)),
                ..Counters::default()
            },
            last_error: Mutex::new(None),
            closed: AtomicBool::new(false),
            fork_generation,
            owner_pid: std::process::id(),
            cfg,
        });
        let bg = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sigil-writer".into())
            .spawn(move || background(bg))?;
        flusher_priority(&thread);
        Ok(AppendWriter {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// In a forked child: the pid of the process that owns this writer.
    pub fn forked_from(&self) -> Option<u32> {
        (FORK_GENERATION.load(Relaxed) != self.shared.fork_generation)
            .then_some(self.shared.owner_pid)
    }

    /// Queue one line (a trailing `\n` is optional and never doubled).
    /// Errors only for a closed writer, a forked child or a line with an
    /// embedded newline; never for the disk.
    pub fn write_line(&self, line: &[u8]) -> Result<(), WriteError> {
        if let Some(owner) = self.forked_from() {
            return Err(WriteError::Forked(owner));
        }
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if memchr::memchr(b'\n', line).is_some() {
            return Err(WriteError::EmbeddedNewline);
        }
        let mut st = self.room_for(lock(&self.shared.state), line.len() + 1);
        if self.shared.closed.load(Relaxed) {
            return Err(WriteError::Closed);
        }
        self.push_locked(
            &mut st,
            None,
            |buf| buf.extend_from_slice(line),
            line.len(),
            || line_tokens(line),
        );
        Ok(())
    }

    /// Format and queue one event, assigning its `seq` under the buffer lock so
    /// that seq order is file order even with several writing threads. An event
    /// dropped on a full disk keeps its seq (the gap is counted by readers) and
    /// its tokens go into the drop notice.
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
        if let Some(owner) = self.forked_from() {
            return Err(WriteError::Forked(owner));
        }
        if let Some(m) = metadata {
            // One JSON object on one line, or the event would be written malformed.
            let valid = m.first() == Some(&b'{')
                && memchr::memchr(b'\n', m).is_none()
                && serde_json::from_slice::<serde::de::IgnoredAny>(m).is_ok();
            if !valid {
                return Err(WriteError::BadMetadata);
            }
        }
        // Scrubbed before the buffer lock: other writing threads never wait on it.
        let (event_type, component, message, metadata) = if self.shared.cfg.sanitize {
            (
                crate::sanitize::sanitize(event_type),
                crate::sanitize::sanitize(component),
                crate::sanitize::sanitize(message),
                metadata.map(crate::sanitize::sanitize_json),
            )
        } else {
            (
                Cow::Borrowed(event_type),
                Cow::Borrowed(component),
                Cow::Borrowed(message),
                metadata.map(Cow::Borrowed),
            )
        };
        self.push_event(
            session_id,
            &event_type,
            &component,
            &message,
            tokens,
            metadata.as_deref(),
            timestamp,
        )
    }

    /// Whether this writer scrubs each event (`WriterConfig::sanitize`).
    pub fn sanitizes(&self) -> bool {
        self.shared.cfg.sanitize
    }

    /// The session id every event of `write_prepared` carries.
    pub fn session_id(&self) -> &str {
        &self.shared.cfg.session_id
    }

    /// Queue one event whose parts are ready: `event_type`, `component` and
    /// `message` already scrubbed when the writer scrubs, `metadata` one JSON object on one line (written by
    /// the caller's own encoder, so neither checked nor scrubbed again).
    pub fn write_prepared(
        &self,
        event_type: &str,
        component: &str,
        message: &str,
        tokens: u64,
        metadata: Option<&[u8]>,
    ) -> Result<u64, WriteError> {
        if let Some(owner) = self.forked_from() {
            return Err(WriteError::Forked(owner));
        }
        self.push_event(
            &self.shared.cfg.session_id,
            event_type,
            component,
            message,
            tokens,
            metadata,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn push_event(
        &self,
        session_id: &str,
        event_type: &str,
        component: &str,
        message: &str,
        tokens: u64,
        metadata: Option<&[u8]>,
        timestamp: Option<&str>,
    ) -> Result<u64, WriteError> {
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
        let mut st = self.room_for(lock(&self.shared.state), estimate);
        if self.shared.closed.load(Relaxed) {
            return Err(WriteError::Closed);
        }
        let seq = st.next_seq;
        st.next_seq = seq.checked_add(1).ok_or(WriteError::SeqExhausted)?;
        self.push_locked(
            &mut st,
            Some(seq),
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
            || tokens,
        );
        Ok(seq)
    }

    /// Wait, the queue lock released, until the buffer has room for `need`
    /// more bytes, while the disk takes writes (backpressure: a burst larger
    /// than the buffer is held back, not dropped). Never waits when the line
    /// fits, could never fit (`need` at the bound), the writer is dropping or
    /// its last flush failed (a failing disk: the line is dropped and
    /// counted), it is closed, or past [`BACKPRESSURE_LIMIT`] (a stalled disk).
    fn room_for<'a>(&'a self, mut st: MutexGuard<'a, State>, need: usize) -> MutexGuard<'a, State> {
        let shared = &self.shared;
        let max = shared.cfg.max_buffer_bytes;
        if st.buf.len() + need < max || need >= max {
            return st;
        }
        let deadline = Instant::now() + BACKPRESSURE_LIMIT;
        while st.buf.len() + need >= max
            && !st.dropping
            && st.retry_at.is_none()
            && !shared.closed.load(Relaxed)
        {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            shared.full.store(true, Relaxed);
            st.flush_requested = true;
            if st.flusher_waiting {
                shared.wake.notify_one();
            }
            st.room_waiters += 1;
            st = shared
                .room
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            st.room_waiters -= 1;
        }
        st
    }

    /// Whether a write of `need` bytes may wait for room now: a writer is
    /// already waiting, or the buffer (read under the queue lock, which no
    /// I/O holds) lacks room for `need` plus a quarter of its bound, the
    /// margin for what the caller's estimate of its line leaves out. A caller
    /// holding an interpreter lock checks this, then releases it to
    /// [`Self::wait_for_room`], so that its write itself does not wait.
    pub fn may_wait(&self, need: usize) -> bool {
        if self.shared.full.load(Relaxed) {
            return true;
        }
        let max = self.shared.cfg.max_buffer_bytes;
        let need = need.saturating_add(max / 4).min(max.saturating_sub(1));
        let st = lock(&self.shared.state);
        st.buf.len() + need >= max
            && !st.dropping
            && st.retry_at.is_none()
            && !self.shared.closed.load(Relaxed)
    }

    /// [`Self::wait_for_room`] with the margin of [`Self::may_wait`].
    pub fn wait_for_room_with_margin(&self, need: usize) {
        let max = self.shared.cfg.max_buffer_bytes;
        self.wait_for_room(need.saturating_add(max / 4).min(max.saturating_sub(1)));
    }

    /// Wait until the buffer has room for a line of `need` bytes (as a write
    /// would, see `room_for`), without writing: a caller holding an
    /// interpreter lock waits here with it released, then writes.
    pub fn wait_for_room(&self, need: usize) {
        if self.forked_from().is_none() {
            drop(self.room_for(lock(&self.shared.state), need));
        }
    }

    fn push_locked(
        &self,
        st: &mut State,
        seq: Option<u64>,
        fill: impl FnOnce(&mut Vec<u8>),
        estimate: usize,
        tokens: impl FnOnce() -> u64,
    ) {
        let c = &self.shared.counters;
        bump(&c.lines_accepted, 1);
        let max = self.shared.cfg.max_buffer_bytes;
        let fits = !st.dropping
            && st.buf.len() + estimate < max
            // Memory that cannot be had is a drop, not an abort.
            && st.buf.try_reserve(estimate + 1).is_ok();
        let before = st.buf.len();
        if fits {
            fill(&mut st.buf);
            if st.buf.len() < max {
                st.buf.push(b'\n');
                // Wake the flusher once, when the buffer crosses the threshold:
                // later lines ride along with that flush (no wake-up per line).
                // A flusher that is not waiting checks the buffer before it
                // waits again: no wake-up (a futex call) is needed then.
                let threshold = self.shared.cfg.buffer_bytes;
                if before < threshold && st.buf.len() >= threshold && st.flusher_waiting {
                    self.shared.wake.notify_one();
                }
                return;
            }
            st.buf.truncate(before);
        }
        let tokens = tokens();
        if let Some(seq) = seq {
            mark_dropped(st, seq, seq);
        }
        st.dropping = true;
        st.dropped_pending += 1;
        st.dropped_tokens_pending = st.dropped_tokens_pending.saturating_add(tokens);
        bump(&c.dropped_lines, 1);
        bump(&c.dropped_tokens, tokens);
    }

    pub fn next_seq(&self) -> u64 {
        lock(&self.shared.state).next_seq
    }

    /// Wait until the event `seq` (None: every event queued so far) has been
    /// handed to the OS (its `write(2)` done; fsync stays on the policy's
    /// schedule), at most `timeout`. The batch is written at once, not at the
    /// next interval: by the waiter itself when the writer is idle (no
    /// hand-off to the background thread), else by the write under way or
    /// the background thread, woken for it. One write covers every event
    /// queued by then, so concurrent waiters share it (group commit). A
    /// waiter never waits on a busy writer (a write or fsync under way, a
    /// hung disk) beyond its timeout.
    ///
    /// Fails at once (without waiting) while flushes are failing, and as soon
    /// as the flush that was to write the event fails; fails if the event was
    /// dropped (a full disk or buffer), or the writer closed without writing it.
    pub fn wait_written(&self, seq: Option<u64>, timeout: Duration) -> Result<(), WaitError> {
        if let Some(owner) = self.forked_from() {
            return Err(WaitError::Forked(owner));
        }
        let shared = &self.shared;
        let mut st = lock(&shared.state);
        let (from, target) = match seq {
            Some(s) => (s, s.saturating_add(1).min(st.next_seq)),
            None => (st.written_upto, st.next_seq),
        };
        if st.written_upto < target {
            if st.retry_at.is_some() {
                // The last flush failed and the writer waits before retrying.
                return Err(self.failure());
            }
            if st.final_flush_done {
                // Closed, and what close() could not write stays unwritten.
                return Err(WaitError::Closed);
            }
            let failures = st.failures;
            let deadline = Instant::now() + timeout;
            let outcome = loop {
                if st.written_upto >= target {
                    break Ok(());
                }
                if st.failures != failures {
                    break Err(None);
                }
                if st.final_flush_done {
                    break Err(Some(WaitError::Closed));
                }
                let now = Instant::now();
                if now >= deadline {
                    break Err(Some(WaitError::TimedOut(timeout)));
                }
                // The writer is idle and sound: write the batch here, at once.
                // Handing it to the writer's thread costs two wake-ups, each a
                // scheduler slice on a busy machine; a writer busy (a write or
                // an fsync under way: maybe a hung disk) or failing is waited
                // for, within the timeout.
                if st.retry_at.is_none() && !shared.closed.load(Relaxed) {
                    if let Ok(io) = shared.io.try_lock() {
                        if io.failed.is_none() {
                            drop(st);
                            // A failure is recorded (and counted in `failures`) by the flush.
                            // Under `always` each flush is fsynced (contract 4); the
                            // interval's fsync stays on the writer's thread.
                            let sync = if shared.cfg.fsync == FsyncPolicy::Always {
                                Sync::Now
                            } else {
                                Sync::No
                            };
                            let _ = flush_locked(shared, io, sync);
                            st = lock(&shared.state);
                            continue;
                        }
                    }
                }
                st.flush_requested = true;
                if st.flusher_waiting {
                    shared.wake.notify_one();
                }
                st.waiters += 1;
                st = shared
                    .written
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                st.waiters -= 1;
            };
            match outcome {
                Ok(()) => {}
                Err(Some(e)) => return Err(e),
                Err(None) => {
                    drop(st);
                    return Err(self.failure());
                }
            }
        }
        if let Some((lo, hi)) = st.drop_range {
            if lo < target && hi >= from {
                drop(st);
                let (errno, text) = lock(&shared.last_error)
                    .clone()
                    .unwrap_or((libc::ENOBUFS, "the write buffer is full".to_string()));
                return Err(WaitError::Dropped(errno, text));
            }
        }
        Ok(())
    }

    /// The last write error, as a wait's failure.
    fn failure(&self) -> WaitError {
        let (errno, text) = lock(&self.shared.last_error)
            .clone()
            .unwrap_or((libc::EIO, "the log could not be written".to_string()));
        WaitError::Failed(errno, text)
    }

    /// Write everything queued; fsync unless the policy is `never` (or `force_fsync`).
    /// After a failed fsync this fails until what it covered is written again and synced.
    pub fn flush(&self, force_fsync: bool) -> io::Result<()> {
        if let Some(owner) = self.forked_from() {
            return Err(io::Error::other(WriteError::Forked(owner).to_string()));
        }
        let sync = force_fsync || self.shared.cfg.fsync != FsyncPolicy::Never;
        flush_once(&self.shared, if sync { Sync::Now } else { Sync::No })
    }

    /// Flush, fsync, stop the background thread. Idempotent; a no-op in a
    /// forked child (the parent writes what it queued).
    pub fn close(&self) -> io::Result<()> {
        if self.forked_from().is_some() {
            return Ok(());
        }
        // No early return for an already-closed writer: if an earlier close
        // failed (disk full, failed fsync), this one tries again.
        {
            let _st = lock(&self.shared.state);
            self.shared.closed.store(true, Relaxed);
        }
        self.shared.wake.notify_all();
        self.shared.room.notify_all();
        if let Some(handle) = lock(&self.thread).take() {
            let _ = handle.join();
        }
        let result = flush_once(&self.shared, Sync::Now);
        if result.is_ok() {
            lock(&self.shared.io).file = None;
        }
        let mut st = lock(&self.shared.state);
        st.final_flush_done = true;
        if st.waiters > 0 {
            self.shared.written.notify_all();
        }
        drop(st);
        result
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Relaxed)
    }

    /// Events dropped so far (one atomic load: cheap enough to check after every write).
    pub fn dropped_events(&self) -> u64 {
        self.shared.counters.dropped_lines.load(Relaxed)
    }

    /// Never waits for I/O: counters are atomics, the queue lock is held only briefly.
    pub fn stats(&self) -> WriterStats {
        let c = &self.shared.counters;
        let buffered_bytes = lock(&self.shared.state).buf.len() as u64;
        WriterStats {
            lines_accepted: c.lines_accepted.load(Relaxed),
            lines_written: c.lines_written.load(Relaxed),
            bytes_written: c.bytes_written.load(Relaxed),
            flushes: c.flushes.load(Relaxed),
            fsyncs: c.fsyncs.load(Relaxed),
            dropped_lines: c.dropped_lines.load(Relaxed),
            dropped_tokens: c.dropped_tokens.load(Relaxed),
            reopens: c.reopens.load(Relaxed),
            torn_tails_repaired: c.torn_tails_repaired.load(Relaxed),
            buffered_bytes,
            fsync_failures: c.fsync_failures.load(Relaxed),
            sync_recoveries: c.sync_recoveries.load(Relaxed),
            sync_failed: c.sync_failed.load(Relaxed),
            last_error: lock(&self.shared.last_error).clone(),
        }
    }
}

impl Drop for AppendWriter {
    fn drop(&mut self) {
        if self.forked_from().is_some() {
            // The parent's thread does not exist here: never join or detach it.
            let handle = self.thread.get_mut().unwrap_or_else(|p| p.into_inner());
            std::mem::forget(handle.take());
            return;
        }
        if !self.shared.closed.load(Relaxed) {
            let _ = self.close();
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum WriteError {
    Closed,
    EmbeddedNewline,
    BadMetadata,
    SeqExhausted,
    /// Used in a forked child; the owner's pid.
    Forked(u32),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Closed => f.write_str("write to a closed AppendWriter"),
            WriteError::EmbeddedNewline => {
                f.write_str("a line must not contain a newline except at its end")
            }
            WriteError::BadMetadata => f.write_str("metadata must be one JSON object on one line"),
            WriteError::SeqExhausted => f.write_str("seq would overflow 64 bits"),
            WriteError::Forked(owner) => write!(
                f,
                "this AppendWriter belongs to process {owner}; a forked child (process {}) \
                 cannot use it: open a new writer in the child",
                std::process::id()
            ),
        }
    }
}

/// Why `wait_written` returned without the event in the file.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitError {
    /// Not written within the timeout (a slow or hung disk).
    TimedOut(Duration),
    /// The flush that was to write it failed: errno and message.
    Failed(i32, String),
    /// The event was dropped (full disk or buffer): errno and message.
    Dropped(i32, String),
    /// The writer closed without writing it.
    Closed,
    /// Used in a forked child; the owner's pid.
    Forked(u32),
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitError::TimedOut(t) => write!(
                f,
                "the log's write did not complete within {:.3}s",
                t.as_secs_f64()
            ),
            WaitError::Failed(_, text) => f.write_str(text),
            WaitError::Dropped(_, text) => {
                write!(
                    f,
                    "the event was dropped, the log could not take it: {text}"
                )
            }
            WaitError::Closed => f.write_str("the writer closed before the event was written"),
            WaitError::Forked(owner) => write!(
                f,
                "this AppendWriter belongs to process {owner}; a forked child cannot use it"
            ),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Sync {
    No,
    Now,
    /// fsync if the interval since the last one has passed.
    IfDue,
}

/// Linux: make the flusher's thread `SCHED_BATCH`. Its wake-ups
/// then never preempt the thread that woke it: on a busy machine the flusher
/// was woken on the logging thread's CPU once per buffer, and each wake-up
/// preempted the caller of `log_event` (whose wall time then held the
/// flusher's as well). A batch thread still gets its fair share of the CPU,
/// and an idle CPU at once when there is one; only whether it preempts
/// changes (at most one scheduler tick of delay on a busy machine, far below
/// the flush interval). Set by the spawner, so that it holds once `open`
/// returns. Best effort: a refusal leaves the default policy.
fn flusher_priority<T>(thread: &JoinHandle<T>) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::thread::JoinHandleExt;
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: the handle's thread has not been joined, so its pthread_t is
        // valid; the parameter is a valid sched_param.
        unsafe {
            libc::pthread_setschedparam(thread.as_pthread_t(), libc::SCHED_BATCH, &param);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = thread;
}

fn background(shared: Arc<Shared>) {
    let interval = shared.cfg.flush_interval.max(Duration::from_millis(1));
    loop {
        {
            let mut st = lock(&shared.state);
            let deadline = Instant::now() + interval;
            loop {
                if shared.closed.load(Relaxed) {
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
                st.flusher_waiting = true;
                st = shared
                    .wake
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                st.flusher_waiting = false;
            }
            st.flush_requested = false;
        }
        if shared.closed.load(Relaxed) {
            return; // close() does the final flush and fsync on its own thread
        }
        let sync = match shared.cfg.fsync {
            FsyncPolicy::Always => Sync::Now,
            FsyncPolicy::Interval => Sync::IfDue,
            FsyncPolicy::Never => Sync::No,
        };
        // A failure is recorded (last_error, the sticky sync state) by flush_once.
        let _ = flush_once(&shared, sync);
    }
}

fn flush_once(shared: &Shared, sync: Sync) -> io::Result<()> {
    flush_locked(shared, lock(&shared.io), sync)
}

/// `flush_once` with the file side already locked (by a waiter that found it free).
fn flush_locked(shared: &Shared, mut io: MutexGuard<'_, Io>, sync: Sync) -> io::Result<()> {
    // Every event below this seq is in the batch taken here (or was written or dropped before).
    let upto;
    let (mut data, dropped, dropped_tokens, head_partial) = {
        let mut st = lock(&shared.state);
        let mut fresh = Vec::new();
        let _ = fresh.try_reserve(st.buf.len().min(shared.cfg.buffer_bytes.saturating_mul(2)));
        let data = std::mem::replace(&mut st.buf, fresh);
        let partial = std::mem::take(&mut st.head_partial);
        // Room for the writers waiting for it (they fill the fresh buffer while
        // this one is written).
        shared.full.store(false, Relaxed);
        if st.room_waiters > 0 {
            shared.room.notify_all();
        }
        upto = st.next_seq;
        (data, st.dropped_pending, st.dropped_tokens_pending, partial)
    };
    let interval = shared.cfg.flush_interval;
    let result = match recover(shared, &mut io) {
        Err(e) => Err((e, data, head_partial)),
        Ok(()) => write_batch(
            shared,
            &mut io,
            &mut data,
            (dropped, dropped_tokens),
            head_partial,
        ),
    };
    match result {
        Ok(()) => {
            {
                // Written: waiters for these events go on now, before any fsync.
                let mut st = lock(&shared.state);
                st.retry_at = None;
                st.written_upto = st.written_upto.max(upto);
                if st.waiters > 0 {
                    shared.written.notify_all();
                }
            }
            let due = io.force_sync
                || match sync {
                    Sync::Now => io.dirty || !io.dirs_to_sync.is_empty(),
                    Sync::IfDue => io.dirty && io.last_fsync.elapsed() >= interval,
                    Sync::No => false,
                };
            if due {
                sync_now(shared, &mut io)?;
            }
            Ok(())
        }
        Err((e, rest, rest_partial)) => {
            record_error(shared, &e);
            let mut st = lock(&shared.state);
            st.retry_at = Some(Instant::now() + interval);
            st.failures += 1;
            if st.waiters > 0 {
                shared.written.notify_all();
            }
            let mut lost_lines = Vec::new();
            if !rest.is_empty() {
                // Lines queued while the write failed go after what it kept back;
                // the newest whole lines that no longer fit are dropped and counted.
                let room = shared.cfg.max_buffer_bytes.saturating_sub(rest.len());
                let mut newer = std::mem::take(&mut st.buf);
                let keep = whole_lines_within(&newer, room);
                lost_lines = newer.split_off(keep);
                let lost = memchr::memchr_iter(b'\n', &lost_lines).count() as u64;
                if lost > 0 {
                    // The newest lines: which events they are is not known here.
                    let (lo, hi) = (st.written_upto, st.next_seq.saturating_sub(1));
                    mark_dropped(&mut st, lo, hi);
                    st.dropping = true;
                    st.dropped_pending += lost;
                    bump(&shared.counters.dropped_lines, lost);
                }
                let mut merged = rest;
                merged.extend_from_slice(&newer);
                st.buf = merged;
                st.head_partial = rest_partial;
            } else if rest_partial {
                st.head_partial = true;
            }
            if st.buf.len() >= shared.cfg.max_buffer_bytes {
                st.dropping = true;
            }
            // The disk failed: writers waiting for room stop waiting and drop.
            shared.full.store(false, Relaxed);
            if st.room_waiters > 0 {
                shared.room.notify_all();
            }
            drop(st);
            if !lost_lines.is_empty() {
                // Parsed without the queue lock (writers wait on it); the io lock,
                // still held, keeps the notice from being written meanwhile.
                let tokens = lines_tokens(&lost_lines);
                let mut st = lock(&shared.state);
                st.dropped_tokens_pending = st.dropped_tokens_pending.saturating_add(tokens);
                bump(&shared.counters.dropped_tokens, tokens);
            }
            Err(e)
        }
    }
}

/// Events `lo..=hi` (or some of them) were dropped.
fn mark_dropped(st: &mut State, lo: u64, hi: u64) {
    st.drop_range = Some(match st.drop_range {
        Some((a, b)) => (a.min(lo), b.max(hi)),
        None => (lo, hi),
    });
}

/// Make new directory entries durable, then the file's data. A failed file
/// sync moves the writer into the sticky failed state.
fn sync_now(shared: &Shared, io: &mut Io) -> io::Result<()> {
    sync_dirs(shared, io)?;
    if !io.dirty {
        io.force_sync = false;
        return Ok(());
    }
    let Some(file) = io.file.as_ref() else {
        return Ok(());
    };
    match file.sync_data() {
        Ok(()) => {
            synced(shared, io);
            Ok(())
        }
        Err(e) => Err(fail_sync(shared, io, e)),
    }
}

fn sync_dirs(shared: &Shared, io: &mut Io) -> io::Result<()> {
    while let Some(dir) = io.dirs_to_sync.first() {
        if let Err(e) = sync_dir(dir) {
            record_error(shared, &e);
            return Err(e);
        }
        io.dirs_to_sync.remove(0);
    }
    Ok(())
}

/// Everything written to the current file is durable.
fn synced(shared: &Shared, io: &mut Io) {
    bump(&shared.counters.fsyncs, 1);
    io.dirty = false;
    io.force_sync = false;
    io.last_fsync = Instant::now();
    io.synced_len = io.len;
    io.untracked = false;
    if io.unsynced.capacity() > 2 * shared.cfg.buffer_bytes.max(4096) {
        io.unsynced = Vec::new();
    } else {
        io.unsynced.clear();
    }
}

/// Record a failed sync of the current file: from now on nothing is reported
/// durable until `recover` has written the kept bytes again and synced them.
fn fail_sync(shared: &Shared, io: &mut Io, e: io::Error) -> io::Error {
    record_error(shared, &e);
    bump(&shared.counters.fsync_failures, 1);
    shared.counters.sync_failed.store(true, Relaxed);
    if let Some(file) = io.file.take() {
        io.failed = Some(Failed {
            file,
            ident: io.ident,
            synced_len: io.synced_len,
            len: io.len,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            unrecoverable: io.untracked,
        });
    }
    e
}

/// After a failed sync: open the path again, cut the tail the failed sync
/// covered (its pages may be gone), write the kept bytes again and sync them.
fn recover(shared: &Shared, io: &mut Io) -> io::Result<()> {
    let Some(failed) = io.failed.as_ref() else {
        return Ok(());
    };
    if failed.unrecoverable {
        // What the failed sync covered was not kept (policy `never`): it cannot
        // be made durable, so this is never reported as success.
        return Err(io::Error::from_raw_os_error(failed.errno));
    }
    let (failed_ident, failed_len, failed_synced) = (failed.ident, failed.len, failed.synced_len);
    let opened = open_append(&shared.path, &mut io.dirs_to_sync)?;
    let (base, replay_exact) = if opened.ident == failed_ident {
        if opened.len == failed_len && failed_len >= failed_synced {
            opened.file.set_len(failed_synced)?;
            (failed_synced, true)
        } else {
            (opened.len, false) // someone else changed the file: append after them
        }
    } else {
        // The file was renamed away since: cut its uncertain tail there, so
        // that the kept bytes exist once, at the head of the new file.
        if let Some(old) = io.failed.as_ref().map(|f| &f.file) {
            if old.metadata().map(|m| m.len()).ok() == Some(failed_len) {
                let _ = old.set_len(failed_synced);
                let _ = old.sync_data();
            }
        }
        (opened.len, false)
    };
    let mut file = opened.file;
    let torn = if replay_exact {
        ends_mid_line(&file, base)?
    } else {
        opened.torn
    };
    let mut replay = Vec::new();
    if torn && io.unsynced.first() != Some(&b'\n') {
        replay.push(b'\n');
    }
    replay.extend_from_slice(&io.unsynced);
    let (written, failure) = write_fully(&mut file, &replay);
    let result = match failure {
        Some(e) => Err(e),
        None => sync_dirs(shared, io).and_then(|()| {
            file.sync_data().inspect_err(|_| {
                bump(&shared.counters.fsync_failures, 1);
            })
        }),
    };
    match result {
        Ok(()) => {
            if opened.ident != io.ident {
                bump(&shared.counters.reopens, 1);
            }
            io.file = Some(file);
            io.ident = opened.ident;
            io.len = base + written as u64;
            io.needs_newline = match replay.last() {
                Some(b) => *b != b'\n',
                None => torn,
            };
            io.failed = None;
            synced(shared, io);
            bump(&shared.counters.sync_recoveries, 1);
            shared.counters.sync_failed.store(false, Relaxed);
            Ok(())
        }
        Err(e) => {
            record_error(shared, &e);
            // Next time, the tail to cut is what this attempt wrote.
            io.failed = Some(Failed {
                file,
                ident: opened.ident,
                synced_len: base,
                len: base + written as u64,
                errno: e.raw_os_error().unwrap_or(libc::EIO),
                unrecoverable: false,
            });
            Err(e)
        }
    }
}

/// Write all of `buf`, retrying short writes; returns how much got in and the error that stopped it.
fn write_fully(file: &mut File, buf: &[u8]) -> (usize, Option<io::Error>) {
    let mut written = 0usize;
    while written < buf.len() {
        match file.write(&buf[written..]) {
            Ok(0) => {
                return (
                    written,
                    Some(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
                )
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (written, Some(e)),
        }
    }
    (written, None)
}

/// A failed write: the error, the bytes not written, whether they start mid-line.
type Unwritten = (io::Error, Vec<u8>, bool);

/// Keep a copy of what was just written until it is synced; past the bound,
/// sync early (or, under policy `never`, stop keeping).
fn keep_unsynced(shared: &Shared, io: &mut Io, out: Vec<u8>, written: usize) {
    if io.untracked {
        return;
    }
    let bound = shared.cfg.max_buffer_bytes;
    if io.unsynced.len() + written > bound {
        if shared.cfg.fsync == FsyncPolicy::Never {
            io.untracked = true;
            io.unsynced = Vec::new();
            return;
        }
        io.force_sync = true;
    }
    if io.unsynced.is_empty() && written == out.len() {
        io.unsynced = out; // no copy in the common case
    } else if io.unsynced.try_reserve(written).is_ok() {
        io.unsynced.extend_from_slice(&out[..written]);
    } else {
        io.untracked = true;
        io.unsynced = Vec::new();
        io.force_sync = shared.cfg.fsync != FsyncPolicy::Never;
    }
}

/// Write the batch (plus the drop notice) to the file; on failure return what
/// was not written and whether it starts mid-line.
fn write_batch(
    shared: &Shared,
    io: &mut Io,
    data: &mut Vec<u8>,
    (dropped, dropped_tokens): (u64, u64),
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
        let last_error = lock(&shared.last_error).clone();
        out.extend_from_slice(&drop_notice(
            &shared.cfg.session_id,
            dropped,
            dropped_tokens,
            &last_error,
        ));
    }
    let Some(file) = io.file.as_mut() else {
        out.truncate(data_len);
        return Err((io::Error::other("writer is closed"), out, head_partial));
    };
    let (written, failure) = write_fully(file, &out);
    if written > 0 {
        let c = &shared.counters;
        io.needs_newline = false;
        io.dirty = true;
        io.len += written as u64;
        bump(&c.flushes, 1);
        bump(&c.bytes_written, written as u64);
        bump(
            &c.lines_written,
            memchr::memchr_iter(b'\n', &out[..written]).count() as u64,
        );
    }
    // The notice counts as delivered once any of it is in the file: its rest is
    // then ordinary pending bytes that complete the line.
    let notice_delivered = dropped > 0 && written > data_len;
    if failure.is_none() || notice_delivered {
        let mut st = lock(&shared.state);
        st.dropped_pending -= dropped;
        st.dropped_tokens_pending = st.dropped_tokens_pending.saturating_sub(dropped_tokens);
        if st.dropped_pending == 0 {
            st.dropping = false;
        }
    }
    match failure {
        None => {
            keep_unsynced(shared, io, out, written);
            Ok(())
        }
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
            if written > 0 {
                keep_unsynced(shared, io, out, written);
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
    if io.file.is_some() {
        // Make what went to the old file durable before moving on; a failure
        // is sticky like any other (the kept bytes go to the new file).
        sync_now(shared, io)?;
    }
    let opened = open_append(&shared.path, &mut io.dirs_to_sync)?;
    if io.file.is_some() {
        bump(&shared.counters.reopens, 1);
    }
    io.file = Some(opened.file);
    io.ident = opened.ident;
    io.len = opened.len;
    io.synced_len = opened.len;
    io.dirty = false;
    io.unsynced.clear();
    io.untracked = false;
    if opened.torn {
        bump(&shared.counters.torn_tails_repaired, 1);
    }
    io.needs_newline = opened.torn;
    Ok(())
}

fn drop_notice(
    session_id: &str,
    dropped: u64,
    tokens: u64,
    last_error: &Option<(i32, String)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(320);
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
        &format!(
            "{dropped} events carrying {tokens} tokens were lost while the log could not be written: {text}"
        ),
    );
    // The lost events' tokens go in `tokens` (contract 2: every reader's sum
    // includes them), and again in metadata for whoever wants the split.
    out.extend_from_slice(b",\"tokens\":");
    out.extend_from_slice(itoa_u64(tokens, &mut [0u8; 20]));
    out.extend_from_slice(b",\"metadata\":{\"dropped\":");
    out.extend_from_slice(itoa_u64(dropped, &mut [0u8; 20]));
    out.extend_from_slice(b",\"dropped_tokens\":");
    out.extend_from_slice(itoa_u64(tokens, &mut [0u8; 20]));
    out.extend_from_slice(b",\"errno\":");
    out.extend_from_slice(itoa_u64(errno.max(0) as u64, &mut [0u8; 20]));
    out.extend_from_slice(b"}}\n");
    out
}

pub(crate) fn itoa_u64(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
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
    thread_local! {
        /// The last second formatted on this thread, and its text: within the
        /// same second only the microseconds are written.
        static LAST: std::cell::Cell<(i64, [u8; 32])> = const { std::cell::Cell::new((-1, [0; 32])) };
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, micros) = (now.as_secs() as i64, now.subsec_micros());
    let (last, text) = LAST.get();
    if last == secs && micros < 1_000_000 {
        *buf = text;
        let mut v = micros;
        for k in (20..26).rev() {
            buf[k] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        return std::str::from_utf8(&buf[..]).unwrap_or("1970-01-01T00:00:00.000000+00:00");
    }
    let len = format_timestamp(secs, micros, buf).len();
    if len == 32 {
        LAST.set((secs, *buf));
    }
    std::str::from_utf8(&buf[..len]).unwrap_or("1970-01-01T00:00:00.000000+00:00")
}

pub fn format_timestamp(secs: i64, micros: u32, buf: &mut [u8; 32]) -> &str {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    if (0..=9999).contains(&y) && micros < 1_000_000 {
        // The common case by hand: `write!` costs a fifth of an event's formatting.
        let mut put = |at: usize, width: usize, mut v: u64| {
            for k in (at..at + width).rev() {
                buf[k] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, y as u64);
        put(5, 2, u64::from(m));
        put(8, 2, u64::from(d));
        put(11, 2, hh as u64);
        put(14, 2, mm as u64);
        put(17, 2, ss as u64);
        put(20, 6, u64::from(micros));
        for (k, c) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
        ] {
            buf[k] = c;
        }
        buf[26..32].copy_from_slice(b"+00:00");
        return std::str::from_utf8(&buf[..]).unwrap_or("1970-01-01T00:00:00.000000+00:00");
    }
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

    fn slow_cfg() -> WriterConfig {
        // No interval flush and no size flush during a test: only waiters write.
        WriterConfig {
            flush_interval: Duration::from_secs(3600),
            buffer_bytes: 1 << 20,
            ..cfg()
        }
    }

    #[test]
    fn a_waiter_has_its_event_written_at_once_not_at_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let w = AppendWriter::open(&path, slow_cfg(), 0).unwrap();
        let started = Instant::now();
        for i in 0..20u64 {
            let seq = w.write_event("s", "e", "c", "m", i, None, None).unwrap();
            w.wait_written(Some(seq), Duration::from_secs(30)).unwrap();
            assert_eq!(read(&path).lines().count() as u64, i + 1);
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        // Nothing queued: returns at once; a seq never assigned waits for nothing.
        w.wait_written(None, Duration::ZERO).unwrap();
        w.wait_written(Some(1 << 40), Duration::ZERO).unwrap();
        assert_eq!(w.stats().fsyncs, 0, "fsync stays on the policy's schedule");
        w.close().unwrap();
    }

    #[test]
    fn concurrent_waiters_share_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let w = Arc::new(AppendWriter::open(&path, slow_cfg(), 0).unwrap());
        let io = lock(&w.shared.io); // the writer is busy: waiters pile up
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || {
                    let seq = w.write_event("s", "e", "c", "m", 1, None, None).unwrap();
                    w.wait_written(Some(seq), Duration::from_secs(60))
                })
            })
            .collect();
        let start = Instant::now();
        while lock(&w.shared.state).waiters < 8 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "waiters never waited"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(io);
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(read(&path).lines().count(), 8);
        assert_eq!(w.stats().flushes, 1, "one write for all eight");
        w.close().unwrap();
    }

    #[test]
    fn a_wait_is_bounded_when_the_disk_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let w = AppendWriter::open(dir.path().join("f"), slow_cfg(), 0).unwrap();
        let io = lock(&w.shared.io); // a write that never returns
        let seq = w.write_event("s", "e", "c", "m", 1, None, None).unwrap();
        let started = Instant::now();
        let got = w.wait_written(Some(seq), Duration::from_millis(50));
        assert_eq!(got, Err(WaitError::TimedOut(Duration::from_millis(50))));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(io);
        w.wait_written(Some(seq), Duration::from_secs(30)).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn a_failed_write_fails_its_waiter_at_once_and_later_ones_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let w = AppendWriter::open(&path, slow_cfg(), 0).unwrap();
        // The descriptor cannot write (EBADF), as a disk that refuses every write.
        lock(&w.shared.io).file = Some(File::open(&path).unwrap());
        let seq = w.write_event("s", "e", "c", "m", 1, None, None).unwrap();
        let started = Instant::now();
        let got = w.wait_written(Some(seq), Duration::from_secs(60));
        assert!(
            matches!(got, Err(WaitError::Failed(e, _)) if e == libc::EBADF),
            "{got:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        let seq = w.write_event("s", "e", "c", "m", 1, None, None).unwrap();
        let got = w.wait_written(Some(seq), Duration::from_secs(60));
        assert!(matches!(got, Err(WaitError::Failed(..))), "{got:?}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_dropped_event_fails_its_waiter_and_a_written_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = WriterConfig {
            max_buffer_bytes: 400,
            ..slow_cfg()
        };
        let path = dir.path().join("f");
        let w = AppendWriter::open(
            &path,
            WriterConfig {
                buffer_bytes: 400,
                ..c
            },
            0,
        )
        .unwrap();
        // Events are dropped only while the disk fails (a healthy one makes a
        // burst wait for room instead).
        fail_disk(&w, &path);
        let seqs: Vec<u64> = (0..10)
            .map(|_| w.write_event("s", "e", "c", "m", 1, None, None).unwrap())
            .collect();
        assert!(w.dropped_events() > 0);
        heal_disk(&w, &path);
        w.flush(false).unwrap();
        let fresh = w.write_event("s", "e", "c", "m", 1, None, None).unwrap();
        w.wait_written(Some(fresh), Duration::from_secs(30))
            .unwrap();
        let last = w.wait_written(Some(seqs[9]), Duration::from_secs(30));
        assert!(matches!(last, Err(WaitError::Dropped(..))), "{last:?}");
        w.close().unwrap();
        assert_eq!(
            w.wait_written(Some(w.next_seq()), Duration::ZERO),
            Ok(()),
            "nothing to wait for"
        );
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

    /// The disk fails: the writer's descriptor is swapped for a read-only one
    /// of the same file, so every write fails (EBADF) as on a failing disk.
    fn fail_disk(w: &AppendWriter, path: &Path) {
        lock(&w.shared.io).file = Some(File::open(path).unwrap());
    }

    /// The disk takes writes again.
    fn heal_disk(w: &AppendWriter, path: &Path) {
        let file = OpenOptions::new().append(true).open(path).unwrap();
        lock(&w.shared.io).file = Some(file);
    }

    #[test]
    fn a_burst_larger_than_the_buffer_waits_for_a_healthy_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // The flush threshold at the bound and an hour's interval: only the
        // writes waiting for room wake the flusher.
        let c = WriterConfig {
            max_buffer_bytes: 1000,
            buffer_bytes: 1000,
            flush_interval: Duration::from_secs(3600),
            ..cfg()
        };
        let w = AppendWriter::open(&path, c, 0).unwrap();
        for i in 0..200 {
            w.write_line(format!("line {i:04}").as_bytes()).unwrap();
        }
        for i in 0..200u64 {
            w.write_event("s", "step", "c", "m", i, None, None).unwrap();
        }
        w.close().unwrap();
        let text = read(&path);
        assert_eq!(text.lines().count(), 400);
        assert!(!text.contains("events_dropped"));
        assert_eq!(w.stats().dropped_lines, 0);
        assert_eq!(w.stats().lines_written, 400);
    }

    #[test]
    fn bounded_buffer_drops_and_counts_while_the_disk_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let c = WriterConfig {
            max_buffer_bytes: 100,
            buffer_bytes: 1 << 20,
            flush_interval: Duration::from_secs(3600),
            ..cfg()
        };
        let w = AppendWriter::open(&path, c, 0).unwrap();
        fail_disk(&w, &path);
        for _ in 0..20 {
            w.write_line(b"0123456789").unwrap();
        }
        heal_disk(&w, &path);
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
    fn sizes_out_of_range_are_refused_before_anything_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        for (buffer_bytes, max_buffer_bytes) in
            [(1 << 40, 1 << 40), (0, 10), (10, MAX_BUFFER_BYTES + 1)]
        {
            let c = WriterConfig {
                buffer_bytes,
                max_buffer_bytes,
                ..cfg()
            };
            let err = AppendWriter::open(dir.path().join("f"), c, 0)
                .err()
                .unwrap();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        assert!(!dir.path().join("f").exists());
    }

    #[test]
    fn the_drop_notice_carries_the_dropped_events_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let c = WriterConfig {
            max_buffer_bytes: 600,
            buffer_bytes: 600,
            flush_interval: Duration::from_secs(3600),
            ..cfg()
        };
        let w = AppendWriter::open(&path, c, 0).unwrap();
        fail_disk(&w, &path);
        let mut sent = 0;
        for i in 0..20u64 {
            w.write_event("s", "step", "c", "m", i, None, None).unwrap();
            sent += i;
        }
        w.write_line(br#"{"tokens":1000}"#).unwrap(); // a raw line's tokens count too
        sent += 1000;
        heal_disk(&w, &path);
        w.close().unwrap();
        let text = read(&path);
        let total: u64 = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["tokens"]
                    .as_u64()
                    .unwrap()
            })
            .sum();
        assert_eq!(total, sent);
        let notice: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(notice["event_type"], "events_dropped");
        assert_eq!(notice["metadata"]["dropped_tokens"], notice["tokens"]);
        let s = w.stats();
        assert_eq!(notice["metadata"]["dropped"], s.dropped_lines);
        assert_eq!(notice["tokens"], s.dropped_tokens);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_flusher_is_a_batch_thread_and_its_caller_is_not() {
        // SAFETY: sched_getscheduler on the calling thread.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let caller = policy();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let flusher = std::thread::spawn(move || {
            wait.recv().unwrap();
            policy()
        });
        flusher_priority(&flusher);
        go.send(()).unwrap();
        let flusher = flusher.join().unwrap();
        assert_eq!(flusher, libc::SCHED_BATCH);
        assert_eq!(policy(), caller, "only the flusher's own thread changes");
    }

    #[test]
    fn a_created_file_queues_its_directory_for_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/f");
        let mut dirs = Vec::new();
        open_append(&path, &mut dirs).unwrap();
        assert_eq!(dirs, vec![dir.path().to_path_buf(), dir.path().join("new")]);
        dirs.clear();
        open_append(&path, &mut dirs).unwrap();
        assert!(dirs.is_empty(), "an existing file needs no directory fsync");
    }

    #[test]
    fn error_messages_lose_the_os_error_suffix() {
        let e = io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(err_of(&e), (libc::EIO, "Input/output error".to_string()));
        assert_eq!(line_tokens(br#"{"a":{"tokens":5},"tokens":7}"#), 7);
        assert_eq!(line_tokens(b"not json"), 0);
    }

    #[test]
    fn needs_escape_finds_every_special_byte_anywhere() {
        for len in 0..20 {
            for at in 0..len {
                for b in 0u8..=0x7f {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let want = b < 0x20 || b == b'"' || b == b'\\';
                    assert_eq!(needs_escape(&bytes), want, "{len} {at} {b}");
                }
            }
            assert!(!needs_escape("é☃𝄞\u{7f}".repeat(len).as_bytes()));
        }
    }

    #[test]
    fn the_current_time_is_formatted_as_format_timestamp_does() {
        for _ in 0..3 {
            let mut a = [0u8; 32];
            let now = format_now(&mut a).to_string();
            let mut b = [0u8; 32];
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let micros: u32 = now[20..26].parse().unwrap();
            let fresh = format_timestamp(secs, micros, &mut b);
            // The same second, or the second has just turned.
            assert!(fresh == now || fresh[..19] != now[..19], "{now} {fresh}");
            std::thread::sleep(Duration::from_millis(400));
        }
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
        // The hand-written digits agree with `write!` over four centuries.
        let mut secs = 0i64;
        while secs < 253_402_300_800 {
            let days = secs.div_euclid(86_400);
            let sod = secs.rem_euclid(86_400);
            let (y, m, d) = civil_from_days(days);
            let micros = (secs % 1_000_000) as u32;
            let want = format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}+00:00",
                sod / 3600,
                (sod / 60) % 60,
                sod % 60
            );
            assert_eq!(format_timestamp(secs, micros, &mut b), want);
            secs += 7_777_777;
        }
        assert_eq!(
            format_timestamp(253_402_300_799, 999_999, &mut b),
            "9999-12-31T23:59:59.999999+00:00"
        );
    }
}
