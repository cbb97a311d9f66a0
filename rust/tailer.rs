//! The inode-aware tailer (ARCHITECTURE.md contract 5).
//!
//! Follows a path, not an inode: the open file is identified by (device, inode)
//! plus a checksum of its first bytes, so a reused inode is not taken for the
//! old file. On rotation (rename, then a new file at the path) the old file is
//! read to its end before switching; on truncation (or a changed first-bytes
//! checksum) reading restarts at 0. A line is handed out only once its `\n` has
//! arrived, and lines over the limit are skipped as they stream past.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flate2::read::MultiGzDecoder;

use crate::fold::{fold_range, fold_threads, FoldState, LineSplitter, Piece, PARALLEL_MIN_BYTES};
use crate::parse;
use crate::segments::{self, PreadReader};

/// Bytes of the file's head used as its fingerprint.
pub const FINGERPRINT_BYTES: u64 = 256;
/// Bytes just before the read offset kept to recognise them again (the mark).
const MARK_BYTES: usize = 32;
const READ_CHUNK: usize = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Beginning,
    End,
}

/// Where a tailer stands: enough to resume without rereading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
    /// Length and CRC32 of the first bytes (0, 0 when unknown).
    pub fp_len: u64,
    pub fp_crc: u32,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TailerStats {
    pub lines: u64,
    pub bytes_read: u64,
    pub rotations: u64,
    pub truncations: u64,
    pub fingerprint_changes: u64,
    pub oversize_lines: u64,
    pub torn_lines: u64,
    pub reopens: u64,
    /// gzip-compressed segments read (logrotate's `compress`).
    pub compressed_segments: u64,
    /// Truncations (copytruncate) after which the unread rest was read from
    /// the copy beside the file.
    pub copies_followed: u64,
    /// Compressed segments that ended in a decoding error (read up to it).
    pub corrupt_segments: u64,
    /// Lines skipped by `fold_available` after a truncation that restarted
    /// the file at 0: their `seq` was folded already (see `reread_guard`).
    pub rereads: u64,
    pub checkpoint_restored: bool,
}

/// A compressed segment, read once from start to end as a stream.
struct GzStream {
    decoder: MultiGzDecoder<PreadReader>,
    /// Decompressed bytes consumed so far.
    pos: u64,
    eof: bool,
}

struct Current {
    file: File,
    dev: u64,
    ino: u64,
    fp_len: u64,
    fp_crc: u32,
    gz: Option<GzStream>,
    /// The last bytes read from this file (at most `MARK_BYTES`) and the
    /// offset they end at: a truncation that keeps the head and regrows past
    /// our offset before we look changes them (the fingerprint cannot see it).
    mark: [u8; MARK_BYTES],
    mark_len: usize,
    mark_end: u64,
}

impl Current {
    /// The readable length: the file's size, or for a compressed segment its
    /// decompressed length once known (unbounded until then).
    fn len(&self) -> io::Result<u64> {
        match &self.gz {
            None => Ok(self.file.metadata()?.len()),
            Some(g) if g.eof => Ok(g.pos),
            Some(_) => Ok(u64::MAX),
        }
    }

    /// Read at `pos`: `pread` for a plain file; for a compressed one, the
    /// stream (restarted when asked to go back, skipped forward when ahead).
    /// Returns `Ok(0)` at the end; a corrupt stream ends where it breaks.
    fn read_at(&mut self, buf: &mut [u8], pos: u64, stats: &mut TailerStats) -> io::Result<usize> {
        let Some(g) = &mut self.gz else {
            return self.file.read_at(buf, pos);
        };
        if pos < g.pos {
            *g = GzStream {
                decoder: segments::gzip_reader(&self.file)?,
                pos: 0,
                eof: false,
            };
        }
        while g.pos < pos && !g.eof {
            let skip = (pos - g.pos).min(buf.len() as u64) as usize;
            let n = gz_read(g, &mut buf[..skip], stats)?;
            if n == 0 {
                return Ok(0);
            }
        }
        if g.eof {
            return Ok(0);
        }
        gz_read(g, buf, stats)
    }
}

fn gz_read(g: &mut GzStream, buf: &mut [u8], stats: &mut TailerStats) -> io::Result<usize> {
    loop {
        match g.decoder.read(buf) {
            Ok(0) => {
                g.eof = true;
                return Ok(0);
            }
            Ok(n) => {
                g.pos += n as u64;
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_data_error(&e) => {
                // A damaged (or still being written) archive: what decoded so
                // far is kept, the rest is counted, not guessed at.
                stats.corrupt_segments += 1;
                g.eof = true;
                return Ok(0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A gzip stream that does not decode (damaged, or cut short), as opposed to a
/// failing disk, whose error (with its errno) is passed on.
fn is_data_error(e: &io::Error) -> bool {
    e.raw_os_error().is_none()
        && matches!(
            e.kind(),
            io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof
        )
}

pub struct Tailer {
    path: PathBuf,
    cur: Option<Current>,
    splitter: LineSplitter,
    start: Start,
    /// Offset at which to begin when a checkpoint could be restored.
    pending_checkpoint: Option<Checkpoint>,
    pub stats: TailerStats,
    /// While reading the rest of a file from its copytruncate copy: the file
    /// itself, to go back to from its start once the copy is done.
    after_copy: Option<Current>,
    /// Made by the first `wait`: a reader that never waits (a catch-up,
    /// `sigil monitor --once`) opens no inotify instance, whose close costs
    /// milliseconds (the kernel waits out a grace period).
    notify: Option<Notifier>,
    buf: Vec<u8>,
    /// Set by `fold_available` to the fold's highest `seq` before it polls: a
    /// restart of the same file at 0 then arms `reread_guard` with it.
    seq_high: Option<u64>,
    /// After such a restart, lines whose `seq` is at most this were read (and
    /// folded) before: they are skipped until a newer `seq` shows up.
    reread_guard: Option<u64>,
}

/// One piece of output: a complete line with its offset, or an oversize line.
pub enum Out<'a> {
    Line(&'a [u8], u64),
    Oversize(u64, u64),
}

fn fingerprint(file: &File, len: u64) -> io::Result<(u64, u32)> {
    let want = len.min(FINGERPRINT_BYTES) as usize;
    let mut buf = [0u8; FINGERPRINT_BYTES as usize];
    let mut got = 0;
    while got < want {
        match file.read_at(&mut buf[got..want], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok((got as u64, crc32fast::hash(&buf[..got])))
}

fn open_current(path: &Path) -> io::Result<Option<Current>> {
    let file = match segments::open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let (fp_len, fp_crc) = fingerprint(&file, meta.len())?;
    let gz = if segments::is_gzip(&file)? {
        Some(GzStream {
            decoder: segments::gzip_reader(&file)?,
            pos: 0,
            eof: false,
        })
    } else {
        None
    };
    Ok(Some(Current {
        file,
        dev: meta.dev(),
        ino: meta.ino(),
        fp_len,
        fp_crc,
        gz,
        mark: [0; MARK_BYTES],
        mark_len: 0,
        mark_end: 0,
    }))
}

/// Pread exactly `buf.len()` bytes at `at`; false if the file is shorter.
fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<bool> {
    match file.read_exact_at(buf, at) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl Tailer {
    pub fn new(
        path: impl Into<PathBuf>,
        start: Start,
        checkpoint: Option<Checkpoint>,
        max_line: usize,
    ) -> io::Result<Self> {
        let path = path.into();
        let mut t = Tailer {
            path,
            cur: None,
            splitter: LineSplitter::new(max_line, 0),
            start,
            pending_checkpoint: checkpoint,
            stats: TailerStats::default(),
            after_copy: None,
            notify: None,
            buf: Vec::new(),
            seq_high: None,
            reread_guard: None,
        };
        if !t.try_open()? {
            // `End` means the end of the file as it is now; a file that appears
            // later is new, and all of it is read.
            t.start = Start::Beginning;
        }
        Ok(t)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the file at the path if none is open; apply the start position or
    /// checkpoint the first time a file is found.
    fn try_open(&mut self) -> io::Result<bool> {
        if self.cur.is_some() {
            return Ok(true);
        }
        if let Some(cp) = self.pending_checkpoint.take() {
            if let Some(cur) = self.find_checkpointed(&cp)? {
                if cur.gz.is_some() {
                    self.stats.compressed_segments += 1;
                }
                self.cur = Some(cur);
                self.splitter.reset(cp.offset);
                self.stats.checkpoint_restored = true;
                return Ok(true);
            }
            // The checkpointed file is gone: everything at the path is new.
            self.start = Start::Beginning;
        }
        let Some(cur) = open_current(&self.path)? else {
            return Ok(false);
        };
        let len = cur.len()?;
        let (pos, mid_line) = match self.start {
            Start::Beginning => (0, false),
            // A compressed file is an archive, never the live end of a log:
            // there is no "end as it is now" to skip to, so all of it is read.
            Start::End if cur.gz.is_some() => (0, false),
            Start::End => (len, len > 0 && last_byte(&cur.file, len)? != b'\n'),
        };
        self.splitter.reset(pos);
        if mid_line {
            self.splitter.skip_to_next_line();
        }
        // Only the first file honours `End`; files found after a rotation are new.
        self.start = Start::Beginning;
        self.cur = Some(cur);
        Ok(true)
    }

    /// The checkpointed file at the path, or renamed beside it (rotated), if its
    /// identity and first bytes still match.
    fn find_checkpointed(&self, cp: &Checkpoint) -> io::Result<Option<Current>> {
        let mut candidates = vec![self.path.clone()];
        if let Some(dir) = self.path.parent() {
            if let Ok(rd) = fs::read_dir(dir) {
                for entry in rd.flatten() {
                    if entry.path() != self.path {
                        candidates.push(entry.path());
                    }
                }
            }
        }
        for p in candidates {
            let Ok(meta) = fs::symlink_metadata(&p) else {
                continue;
            };
            if !meta.is_file() || meta.dev() != cp.dev || meta.ino() != cp.ino {
                continue;
            }
            let Some(cur) = open_current(&p)? else {
                continue;
            };
            if cur.gz.is_none() && meta.len() < cp.offset {
                return Ok(None);
            }
            if cp.fp_len > 0 {
                let (len, crc) = fingerprint(&cur.file, cp.fp_len)?;
                if len != cp.fp_len || crc != cp.fp_crc {
                    return Ok(None); // same inode, different file
                }
            }
            return Ok(Some(cur));
        }
        Ok(None)
    }

    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.cur.as_ref().map(|c| Checkpoint {
            dev: c.dev,
            ino: c.ino,
            offset: self.splitter.line_start(),
            fp_len: c.fp_len,
            fp_crc: c.fp_crc,
        })
    }

    /// Read complete new lines, at most `max_lines` and about `max_bytes`
    /// (whole lines), calling `out` for each. Returns true when more is waiting.
    pub fn poll(
        &mut self,
        max_lines: usize,
        max_bytes: usize,
        out: impl FnMut(Out<'_>),
    ) -> io::Result<bool> {
        // One read buffer for the tailer's life: no allocation per poll.
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(READ_CHUNK, 0);
        let result = self.poll_with(&mut buf, max_lines, max_bytes, out);
        self.buf = buf;
        result
    }

    fn poll_with(
        &mut self,
        buf: &mut [u8],
        max_lines: usize,
        max_bytes: usize,
        mut out: impl FnMut(Out<'_>),
    ) -> io::Result<bool> {
        let mut lines = 0usize;
        let mut bytes = 0usize;
        loop {
            if !self.try_open()? {
                return Ok(false);
            }
            let len = self.check_truncation()?;
            // Drain the open file (nothing to read if it has not grown).
            while self.splitter.position < len || bytes > 0 {
                if lines >= max_lines || bytes >= max_bytes {
                    return Ok(true);
                }
                let cur = self.cur.as_mut().expect("opened above");
                let pos = self.splitter.position;
                let want = READ_CHUNK.min(max_bytes - bytes).max(1);
                let n = match cur.read_at(&mut buf[..want], pos, &mut self.stats) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    break;
                }
                // Never hand out more lines than asked: feed only up to the line
                // that reaches the limit, the rest is read again next time.
                let chunk = &buf[..n];
                let room = max_lines - lines;
                let cut = cut_after_lines(chunk, room);
                let stats = &mut self.stats;
                let guard = &mut self.reread_guard;
                self.splitter.feed(&chunk[..cut], |p| match p {
                    Piece::Line(l, o) => {
                        stats.lines += 1;
                        lines += 1;
                        if let Some(limit) = *guard {
                            // Parsed only while the guard is armed (right after
                            // a restart), so the usual path pays nothing.
                            match crate::parse::parse_line(l).ok().and_then(|e| e.seq) {
                                Some(seq) if seq <= limit => {
                                    stats.rereads += 1;
                                    return;
                                }
                                Some(_) => *guard = None,
                                None => {}
                            }
                        }
                        out(Out::Line(l, o))
                    }
                    Piece::Oversize(o, len) => {
                        stats.oversize_lines += 1;
                        out(Out::Oversize(o, len))
                    }
                });
                self.stats.bytes_read += cut as u64;
                bytes += cut;
                self.refresh_fingerprint()?;
                self.set_mark()?;
            }
            // At the end of the open file: has the path moved on to a new file?
            if !self.follow_rotation()? {
                return Ok(false);
            }
        }
    }

    /// Restart at 0 when the file shrank below our position or its first bytes
    /// changed (copytruncate, or a new file that reused the inode).
    /// Returns the file's current length.
    fn check_truncation(&mut self) -> io::Result<u64> {
        let cur = self.cur.as_ref().expect("caller opened");
        if cur.gz.is_some() {
            return cur.len(); // an archive: finished, never truncated
        }
        let len = cur.file.metadata()?.len();
        let mut restart = len < self.splitter.position;
        // Same length or longer may still be a new file in the old inode
        // (copytruncate, then as many bytes or more written before we looked):
        // its first bytes say so. Checked at equal length too, or a refill to
        // exactly our offset would hide its lines until the next write. This
        // costs one pread of at most 256 bytes from the page cache per poll.
        if !restart && cur.fp_len > 0 && fingerprint_changed(cur)? {
            restart = true;
            self.stats.fingerprint_changes += 1;
        }
        // The head survived: are the bytes we read last still there? (One
        // more pread of 32 bytes; at equal length too, or a refill to exactly
        // our offset would hide its lines.)
        if !restart && mark_changed(cur, self.splitter.position)? {
            restart = true;
        }
        if restart {
            self.stats.truncations += 1;
            // copytruncate: what we had not read yet is in the copy. Read on
            // from our offset there (the unfinished line too), then come back
            // to this file from its start (see `follow_rotation`).
            if cur.fp_len > 0 {
                let position = self.splitter.position;
                if let Some(copy) = self.find_copy(cur, position)? {
                    self.stats.copies_followed += 1;
                    if copy.gz.is_some() {
                        self.stats.compressed_segments += 1;
                    }
                    self.after_copy = self.cur.replace(copy);
                    return self.cur.as_ref().expect("just set").len();
                }
            }
            if self.splitter.pending() > 0 {
                self.stats.torn_lines += 1;
            }
            // The same file from 0: what is still at its head was handed out
            // before (a truncation that kept the head). Only a fold asks.
            self.reread_guard = self.seq_high;
            self.splitter.reset(0);
            let (fp_len, fp_crc) = fingerprint(&cur.file, len)?;
            let cur = self.cur.as_mut().expect("caller opened");
            cur.fp_len = fp_len;
            cur.fp_crc = fp_crc;
        }
        Ok(len)
    }

    /// Remember the bytes just before the read offset (plain files only).
    fn set_mark(&mut self) -> io::Result<()> {
        let end = self.splitter.position;
        let cur = self.cur.as_mut().expect("caller opened");
        if cur.gz.is_some() {
            return Ok(());
        }
        let n = end.min(MARK_BYTES as u64) as usize;
        let mut mark = [0u8; MARK_BYTES];
        if read_exact_at(&cur.file, &mut mark[..n], end - n as u64)? {
            cur.mark = mark;
            cur.mark_len = n;
            cur.mark_end = end;
        } else {
            cur.mark_len = 0; // shrank meanwhile: the next poll sees it
        }
        Ok(())
    }

    /// Lengthen the fingerprint while the file is shorter than its full size.
    fn refresh_fingerprint(&mut self) -> io::Result<()> {
        let cur = self.cur.as_mut().expect("caller opened");
        // (A compressed segment's fingerprint is of its whole head already.)
        if cur.gz.is_none() && cur.fp_len < FINGERPRINT_BYTES && self.splitter.position > cur.fp_len
        {
            let (l, crc) = fingerprint(&cur.file, self.splitter.position)?;
            cur.fp_len = l;
            cur.fp_crc = crc;
        }
        Ok(())
    }

    /// Move on from the current file once the path names another file.
    ///
    /// Rotated segments sit beside the path under the names `segments` knows
    /// (sigil's, and logrotate's numbered and dateext ones, maybe compressed).
    /// If the current file is one of them and a later one exists, that is the
    /// next file: this way a tailer that sleeps through several rotations still
    /// reads every segment, in order. Otherwise the next file is the one at the
    /// path, once it has content: until then the writer may still be finishing
    /// the old file, so we stay on it (this keeps lines in order).
    fn follow_rotation(&mut self) -> io::Result<bool> {
        let cur = self.cur.as_ref().expect("caller opened");
        if self.after_copy.is_some() {
            // Done with a copytruncate copy: back to the file it was copied
            // from (wherever it is now), whose new lines start at 0.
            if cur.len()? > self.splitter.position {
                return Ok(true);
            }
            if self.splitter.pending() > 0 {
                self.stats.torn_lines += 1;
            }
            let mut orig = self.after_copy.take().expect("checked");
            let len = orig.file.metadata()?.len();
            (orig.fp_len, orig.fp_crc) = fingerprint(&orig.file, len)?;
            self.splitter.reset(0);
            self.cur = Some(orig);
            return Ok(true);
        }
        let at_path = match fs::metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Some(m) = &at_path {
            if m.dev() == cur.dev && m.ino() == cur.ino {
                return Ok(false);
            }
        }
        let next_segment = self.segment_after(cur);
        let new_has_data = at_path.as_ref().is_some_and(|m| m.len() > 0);
        if next_segment.is_none() && !new_has_data {
            return Ok(false);
        }
        // Everything the writer put in the old file was written before the
        // next file got data, so one more drain of the old file completes it.
        let old_len = cur.len()?;
        if old_len > self.splitter.position {
            return Ok(true); // the caller drains, then comes back here
        }
        if self.splitter.pending() > 0 {
            self.stats.torn_lines += 1;
        }
        self.stats.rotations += 1;
        self.start = Start::Beginning;
        self.splitter.reset(0);
        if let Some(next) = next_segment {
            if let Some(cur) = open_current(&next)? {
                if cur.gz.is_some() {
                    self.stats.compressed_segments += 1;
                }
                self.cur = Some(cur);
                return Ok(true);
            }
        }
        self.cur = None;
        self.try_open()
    }

    /// The rotated segment that follows the file (dev, ino), if that file is a
    /// segment and a later one exists.
    ///
    /// A file that is no longer among them by inode may be there by content:
    /// logrotate's `compress` replaces `execution.jsonl.1` with a new file,
    /// `execution.jsonl.1.gz`, that starts with the same (decompressed) bytes.
    /// Finding it by its first bytes keeps the chain, so a reader paused
    /// across several compressed rotations still reads every segment.
    fn segment_after(&self, cur: &Current) -> Option<PathBuf> {
        let segments = segments::rotated_segments(&self.path);
        let i = match segments
            .iter()
            .position(|s| s.dev == cur.dev && s.ino == cur.ino)
        {
            Some(i) => i,
            None if cur.fp_len > 0 => segments
                .iter()
                .position(|s| same_head(&s.path, cur.fp_len, cur.fp_crc))?,
            None => return None,
        };
        segments.get(i + 1).map(|s| s.path.clone())
    }

    /// The copy logrotate's `copytruncate` made of the open file before
    /// truncating it: a segment, other than the open file, whose first bytes are
    /// the open file's fingerprint and which reaches at least `position`.
    fn find_copy(&self, cur: &Current, position: u64) -> io::Result<Option<Current>> {
        for seg in segments::rotated_segments(&self.path) {
            if (seg.dev, seg.ino) == (cur.dev, cur.ino)
                || !same_head(&seg.path, cur.fp_len, cur.fp_crc)
            {
                continue;
            }
            let Some(copy) = open_current(&seg.path)? else {
                continue;
            };
            if copy.gz.is_some() || copy.file.metadata()?.len() >= position {
                return Ok(Some(copy));
            }
        }
        Ok(None)
    }

    /// Fold everything available now into `fold`: a large unread stretch of the
    /// open file in parallel (no per-line callback), the rest line by line.
    pub fn fold_available(&mut self, fold: &mut FoldState) -> io::Result<u64> {
        let lines_before = fold.lines;
        self.seq_high = fold.max_seq;
        if self.try_open()? {
            self.check_truncation()?;
            let cur = self.cur.as_ref().expect("opened above");
            let pos = self.splitter.position;
            let len = cur.len()?;
            let plain = cur.gz.is_none();
            if plain
                && self.splitter.pending() == 0
                && self.reread_guard.is_none()
                && len.saturating_sub(pos) >= PARALLEL_MIN_BYTES
            {
                let torn_before = fold.torn_tail;
                let resume = fold_range(
                    fold,
                    &cur.file,
                    pos,
                    Some(len),
                    self.splitter.max_line,
                    fold_threads(),
                )?;
                // The partial line after `resume`, if any, is read again below.
                fold.torn_tail = torn_before;
                self.stats.bytes_read += resume - pos;
                self.stats.lines += fold.lines - lines_before;
                self.splitter.reset(resume);
                self.refresh_fingerprint()?;
                self.set_mark()?;
            }
        }
        loop {
            let more = self.poll(usize::MAX, 64 << 20, |o| match o {
                Out::Line(l, off) => fold.feed_line(l, off),
                Out::Oversize(off, len) => fold.note_oversize(off, len),
            })?;
            if !more {
                break;
            }
        }
        fold.torn_tail = self.splitter.pending() > 0;
        self.seq_high = None;
        Ok(fold.lines - lines_before)
    }

    /// Whether a poll now would find something (new bytes, a new file).
    pub fn has_news(&self) -> bool {
        match &self.cur {
            None => self.path.exists(),
            Some(cur) => {
                let grown = cur
                    .len()
                    .map(|len| len != self.splitter.position)
                    .unwrap_or(true);
                let replaced = cur.gz.is_none()
                    && ((cur.fp_len > 0 && fingerprint_changed(cur).unwrap_or(true))
                        || mark_changed(cur, self.splitter.position).unwrap_or(true));
                if grown || replaced {
                    return true;
                }
                match fs::metadata(&self.path) {
                    Ok(m) => (m.dev(), m.ino()) != (cur.dev, cur.ino) && m.len() > 0,
                    Err(_) => false,
                }
            }
        }
    }

    /// Block until the file (or its directory) changes, or `timeout` passes.
    /// Returns true if something may have changed.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        // Watch first, then look: a change after the watch is set wakes it, one
        // before is seen by `has_news`.
        if self.notify.is_none() {
            self.notify = Some(Notifier::new(&self.path));
        }
        if self.has_news() {
            return true;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return self.has_news();
            }
            let woke = match self.notify.as_mut() {
                Some(notify) => notify.wait(deadline - now),
                None => false,
            };
            if woke && self.has_news() {
                return true;
            }
            if self.has_news() {
                return true;
            }
        }
    }
}

/// The `seq` of the last valid event in a log file (plain or a compressed
/// segment); None when none is found. A plain file is read backwards from its
/// end, at most `max_scan` bytes; a compressed one is streamed through.
/// Lines are cut by the same `LineSplitter` the tailer and the fold use.
pub fn scan_last_seq(path: &Path, max_scan: u64, max_line: usize) -> io::Result<Option<u64>> {
    let file = segments::open_regular(path)?;
    if segments::is_gzip(&file)? {
        let mut reader = segments::gzip_reader(&file)?;
        let mut splitter = LineSplitter::new(max_line, 0);
        let mut found = None;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_data_error(&e) => break,
                Err(e) => return Err(e),
            };
            splitter.feed(&buf[..n], |piece| note_seq(piece, &mut found));
        }
        return Ok(found);
    }
    let len = file.metadata()?.len();
    let block = 64u64 << 10;
    let mut end = len;
    // The start of a line cut by the block below, to be completed by it.
    let mut carry: Vec<u8> = Vec::new();
    while end > 0 && len - end < max_scan {
        let start = end.saturating_sub(block);
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut buf, start)?;
        buf.extend_from_slice(&carry);
        // Whole lines only: the text before the block's first newline may be
        // the end of a line that starts in an earlier block.
        let first = if start == 0 {
            0
        } else {
            match memchr::memchr(b'\n', &buf) {
                Some(i) => i + 1,
                None if buf.len() > max_line => {
                    carry.clear(); // inside an oversize line: skip it
                    end = start;
                    continue;
                }
                None => {
                    carry = buf;
                    end = start;
                    continue;
                }
            }
        };
        let mut found = None;
        let mut splitter = LineSplitter::new(max_line, start + first as u64);
        splitter.feed(&buf[first..], |piece| note_seq(piece, &mut found));
        if found.is_some() {
            return Ok(found);
        }
        carry = buf[..first].to_vec();
        end = start;
    }
    Ok(None)
}

/// Whether the file at `path` (decompressed if it is gzip) starts with the
/// `fp_len` bytes whose CRC is `fp_crc`.
fn same_head(path: &Path, fp_len: u64, fp_crc: u32) -> bool {
    let Ok(file) = segments::open_regular(path) else {
        return false;
    };
    let head = match segments::is_gzip(&file) {
        Ok(false) => fingerprint(&file, fp_len),
        Ok(true) => segments::gzip_reader(&file).and_then(|r| {
            let mut buf = Vec::with_capacity(fp_len as usize);
            r.take(fp_len).read_to_end(&mut buf)?;
            Ok((buf.len() as u64, crc32fast::hash(&buf)))
        }),
        Err(_) => return false,
    };
    matches!(head, Ok((len, crc)) if len == fp_len && crc == fp_crc)
}

/// Whether the bytes just before `position`, read last, are gone (a mark
/// taken at another offset says nothing).
fn mark_changed(cur: &Current, position: u64) -> io::Result<bool> {
    if cur.gz.is_some() || cur.mark_len == 0 || cur.mark_end != position {
        return Ok(false);
    }
    let mut now = [0u8; MARK_BYTES];
    let n = cur.mark_len;
    Ok(!read_exact_at(&cur.file, &mut now[..n], position - n as u64)? || now[..n] != cur.mark[..n])
}

/// Whether the first bytes of the open file differ from its fingerprint.
fn fingerprint_changed(cur: &Current) -> io::Result<bool> {
    let (len, crc) = fingerprint(&cur.file, cur.fp_len)?;
    Ok(len != cur.fp_len || crc != cur.fp_crc)
}

/// Keep the `seq` of a valid event line.
fn note_seq(piece: Piece<'_>, found: &mut Option<u64>) {
    if let Piece::Line(line, _) = piece {
        if let Some(seq) = parse::parse_line(line).ok().and_then(|e| e.seq) {
            *found = Some(seq);
        }
    }
}

fn last_byte(file: &File, len: u64) -> io::Result<u8> {
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, len - 1)?;
    Ok(b[0])
}

/// Length of the prefix of `chunk` holding at most `room` newlines (all of the
/// chunk if it has fewer).
fn cut_after_lines(chunk: &[u8], room: usize) -> usize {
    if room == 0 {
        return 0;
    }
    match memchr::memchr_iter(b'\n', chunk).nth(room - 1) {
        Some(i) => i + 1,
        None => chunk.len(),
    }
}

/// Wakes on changes in the file's directory: inotify on Linux, polling elsewhere.
struct Notifier {
    dir: PathBuf,
    #[cfg(target_os = "linux")]
    fd: i32,
    #[cfg(target_os = "linux")]
    watching: bool,
}

const POLL_SLICE: Duration = Duration::from_millis(50);

#[cfg(target_os = "linux")]
impl Notifier {
    fn new(path: &Path) -> Self {
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        // SAFETY: plain syscall; a negative fd means polling.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        let mut n = Notifier {
            dir,
            fd,
            watching: false,
        };
        n.ensure_watch();
        n
    }

    fn ensure_watch(&mut self) {
        if self.watching || self.fd < 0 {
            return;
        }
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(self.dir.as_os_str().as_bytes()) else {
            return;
        };
        let mask = libc::IN_MODIFY
            | libc::IN_CREATE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_ATTRIB
            | libc::IN_CLOSE_WRITE
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd, c.as_ptr(), mask) };
        self.watching = wd >= 0;
    }

    /// Wait for an event; returns true if one arrived.
    fn wait(&mut self, timeout: Duration) -> bool {
        self.ensure_watch();
        if !self.watching {
            std::thread::sleep(timeout.min(POLL_SLICE));
            return false;
        }
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // Cap each wait so a change the kernel does not report (another mount,
        // NFS) is still seen within a poll slice.
        let ms = ms.min(1000);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms.max(1)) };
        if r <= 0 {
            return false;
        }
        self.drain();
        true
    }

    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a local buffer from our own fd.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            // IN_IGNORED (the directory went away): watch again when it is back.
            let mut off = 0usize;
            let n = n as usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            while off + header <= n {
                // SAFETY: the kernel wrote whole events into the buffer.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
                if ev.mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                    self.watching = false;
                }
                off += header + ev.len as usize;
            }
        }
        if !self.watching && self.fd >= 0 {
            // Re-create the instance so stale watches do not linger.
            // SAFETY: closing and reopening our own fd.
            unsafe {
                libc::close(self.fd);
                self.fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            }
        }
    }
}

#[cfg(target_os = "linux")]
impl Drop for Notifier {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: our own fd, closed once.
            unsafe { libc::close(self.fd) };
        }
    }
}

#[cfg(not(target_os = "linux"))]
impl Notifier {
    fn new(path: &Path) -> Self {
        Notifier {
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        }
    }

    fn wait(&mut self, timeout: Duration) -> bool {
        let _ = &self.dir;
        std::thread::sleep(timeout.min(POLL_SLICE));
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn collect(t: &mut Tailer) -> Vec<String> {
        let mut v = vec![];
        t.poll(usize::MAX, usize::MAX, |o| match o {
            Out::Line(l, _) => v.push(String::from_utf8_lossy(l).to_string()),
            Out::Oversize(_, n) => v.push(format!("<{n}>")),
        })
        .unwrap();
        v
    }

    fn append(path: &Path, s: &str) {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(s.as_bytes()).unwrap();
    }

    #[test]
    fn waits_for_the_file_and_hands_out_whole_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert!(collect(&mut t).is_empty());
        append(&path, "a\nb");
        assert_eq!(collect(&mut t), vec!["a"]);
        append(&path, "c\n");
        assert_eq!(collect(&mut t), vec!["bc"]);
        assert!(collect(&mut t).is_empty());
    }

    #[test]
    fn follows_rename_rotation_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, "1\n");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert_eq!(collect(&mut t), vec!["1"]);
        append(&path, "2\n");
        fs::rename(&path, dir.path().join("f.1")).unwrap();
        append(&dir.path().join("f.1"), "3\n"); // late write to the old file
        assert_eq!(collect(&mut t), vec!["2", "3"]);
        fs::write(&path, "").unwrap(); // empty new file: stay on the old one
        append(&dir.path().join("f.1"), "4\n");
        assert_eq!(collect(&mut t), vec!["4"]);
        append(&path, "5\n");
        assert_eq!(collect(&mut t), vec!["5"]);
        assert_eq!(t.stats.rotations, 1);
    }

    #[test]
    fn reads_every_segment_when_rotated_several_times_between_polls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("execution.jsonl");
        append(&path, "1\n");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert_eq!(collect(&mut t), vec!["1"]);
        append(&path, "2\n");
        let seg = |s: &str| dir.path().join(format!("execution_{s}.jsonl"));
        fs::rename(&path, seg("20260101_000000")).unwrap();
        append(&path, "3\n");
        fs::rename(&path, seg("20260101_000000_2")).unwrap();
        append(&path, "4\n");
        fs::rename(&path, seg("20260101_000000_10")).unwrap();
        append(&path, "5\n");
        fs::rename(&path, seg("20260101_000001")).unwrap();
        fs::write(&path, "").unwrap();
        assert_eq!(collect(&mut t), vec!["2", "3", "4", "5"]);
        append(&path, "6\n");
        assert_eq!(collect(&mut t), vec!["6"]);
        assert_eq!(t.stats.rotations, 4);
    }

    #[test]
    fn truncation_restarts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, "aaaa\nbbbb\n");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert_eq!(collect(&mut t).len(), 2);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&path, "c\n");
        assert_eq!(collect(&mut t), vec!["c"]);
        assert_eq!(t.stats.truncations, 1);
    }

    #[test]
    fn copytruncate_refilled_past_offset_is_caught_by_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, "old-1\n");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert_eq!(collect(&mut t), vec!["old-1"]);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&path, "new-1\nnew-2\n");
        assert_eq!(collect(&mut t), vec!["new-1", "new-2"]);
        assert_eq!(t.stats.fingerprint_changes, 1);
    }

    #[test]
    fn a_truncation_that_keeps_the_head_and_regrows_past_the_offset_is_seen() {
        // The head (and so the fingerprint) survives, and the file is longer
        // than our offset again before we look: only the bytes just before the
        // offset tell that what we read is gone.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let head = format!("{}\n", "h".repeat(300));
        append(&path, &format!("{head}{}\n", "gone-1"));
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert_eq!(collect(&mut t).len(), 2);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(head.len() as u64)
            .unwrap();
        append(&path, "new-1:longer\nnew-2\n");
        assert!(t.has_news());
        assert_eq!(
            collect(&mut t),
            vec!["h".repeat(300), "new-1:longer".into(), "new-2".into()]
        );
        assert_eq!(t.stats.truncations, 1);
    }

    #[test]
    fn a_truncation_that_keeps_the_head_and_refills_to_the_offset_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let head = format!("{}\n", "h".repeat(300));
        append(&path, &format!("{head}gone-1\n"));
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert_eq!(collect(&mut t).len(), 2);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(head.len() as u64)
            .unwrap();
        append(&path, "new-11\n"); // the same length as "gone-1\n"
        assert!(t.has_news());
        assert_eq!(collect(&mut t), vec!["h".repeat(300), "new-11".into()]);
        assert_eq!(t.stats.truncations, 1);
    }

    #[test]
    fn copytruncate_refilled_to_exactly_the_old_offset_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, "old-1\n");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert_eq!(collect(&mut t), vec!["old-1"]);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&path, "new-1\n"); // the same length as before
        assert!(t.has_news());
        assert_eq!(collect(&mut t), vec!["new-1"]);
        assert_eq!(t.stats.truncations, 1);
    }

    fn gzip(path: &Path, text: &str) {
        let mut enc =
            flate2::write::GzEncoder::new(File::create(path).unwrap(), flate2::Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
    }

    #[test]
    fn follows_logrotate_names_through_compressed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("execution.jsonl");
        gzip(&dir.path().join("execution.jsonl.3.gz"), "1\n2\n");
        gzip(&dir.path().join("execution.jsonl.2.gz"), "3\n");
        append(&dir.path().join("execution.jsonl.1"), "4\n");
        append(&path, "5\n");
        let oldest = fs::metadata(dir.path().join("execution.jsonl.3.gz")).unwrap();
        let cp = Checkpoint {
            dev: oldest.dev(),
            ino: oldest.ino(),
            offset: 0,
            fp_len: 0,
            fp_crc: 0,
        };
        let mut t = Tailer::new(&path, Start::Beginning, Some(cp), 1 << 20).unwrap();
        assert_eq!(collect(&mut t), vec!["1", "2", "3", "4", "5"]);
        assert_eq!(t.stats.compressed_segments, 2);
        assert_eq!(t.stats.rotations, 3);
    }

    fn event(seq: u64) -> String {
        format!(
            r#"{{"timestamp":"t","session_id":"s","event_type":"e","component":"c","message":"m","tokens":1,"metadata":{{}},"seq":{seq}}}"#
        )
    }

    #[test]
    fn scan_last_seq_reads_back_over_blocks_junk_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut text = String::new();
        for s in 0..3000 {
            text.push_str(&event(s));
            text.push('\n');
        }
        // A last line with no seq, junk, a torn tail: the last valid seq wins.
        text.push_str(&format!("not json\n{}\n{{\"torn", "x".repeat(200 << 10)));
        append(&path, &text);
        assert_eq!(scan_last_seq(&path, 64 << 20, 1 << 20).unwrap(), Some(2999));
        // Only the last 1 KiB may be read: the oversize line fills it.
        assert_eq!(scan_last_seq(&path, 1 << 10, 1 << 20).unwrap(), None);
        let gz = dir.path().join("f.1.gz");
        gzip(&gz, &text);
        assert_eq!(scan_last_seq(&gz, 1, 1 << 20).unwrap(), Some(2999));
        let empty = dir.path().join("e");
        append(&empty, "");
        assert_eq!(scan_last_seq(&empty, 1 << 20, 1 << 20).unwrap(), None);
    }

    #[test]
    fn oversize_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, &format!("a\n{}\nb\n", "x".repeat(100)));
        let mut t = Tailer::new(&path, Start::Beginning, None, 10).unwrap();
        assert_eq!(collect(&mut t), vec!["a", "<100>", "b"]);
        assert_eq!(t.stats.oversize_lines, 1);
    }

    #[test]
    fn start_at_end_of_a_missing_file_reads_it_all_once_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut t = Tailer::new(&path, Start::End, None, 1 << 20).unwrap();
        append(&path, "a\nb\n");
        assert_eq!(collect(&mut t), vec!["a", "b"]);
    }

    #[test]
    fn start_at_end_skips_existing_and_partial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, "old\npart");
        let mut t = Tailer::new(&path, Start::End, None, 1 << 20).unwrap();
        append(&path, "ial\nnew\n");
        assert_eq!(collect(&mut t), vec!["new"]);
    }

    #[test]
    fn checkpoint_resumes_and_rejects_a_different_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, "1\n2\n");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        collect(&mut t);
        let cp = t.checkpoint().unwrap();
        append(&path, "3\n");
        let mut t2 = Tailer::new(&path, Start::Beginning, Some(cp), 1 << 20).unwrap();
        assert_eq!(collect(&mut t2), vec!["3"]);
        assert!(t2.stats.checkpoint_restored);
        // Same identity claimed, different first bytes: start over.
        let bad = Checkpoint {
            fp_crc: cp.fp_crc ^ 1,
            ..cp
        };
        let mut t3 = Tailer::new(&path, Start::Beginning, Some(bad), 1 << 20).unwrap();
        assert_eq!(collect(&mut t3), vec!["1", "2", "3"]);
        // The checkpointed file was rotated: it is found beside the path.
        fs::rename(&path, dir.path().join("f.1")).unwrap();
        append(&path, "4\n");
        let mut t4 = Tailer::new(&path, Start::Beginning, Some(cp), 1 << 20).unwrap();
        assert_eq!(collect(&mut t4), vec!["3", "4"]);
    }

    #[test]
    fn max_lines_limits_a_poll_without_losing_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, "1\n2\n3\n4\n5\n");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        let mut all = vec![];
        loop {
            let mut got = vec![];
            let more = t
                .poll(2, usize::MAX, |o| {
                    if let Out::Line(l, _) = o {
                        got.push(String::from_utf8_lossy(l).to_string())
                    }
                })
                .unwrap();
            assert!(got.len() <= 2);
            all.extend(got);
            if !more {
                break;
            }
        }
        assert_eq!(all, vec!["1", "2", "3", "4", "5"]);
    }

    #[test]
    fn a_tailer_opens_its_directory_watch_only_when_it_first_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, "{\"a\":1}\n");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert_eq!(collect(&mut t).len(), 1);
        assert!(t.notify.is_none(), "reading alone watches nothing");
        assert!(!t.wait(Duration::from_millis(1)));
        assert!(t.notify.is_some());
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                append(&path, "{\"a\":2}\n");
            })
        };
        assert!(
            t.wait(Duration::from_secs(5)),
            "a later append wakes the wait"
        );
        writer.join().unwrap();
        assert_eq!(collect(&mut t).len(), 1);
    }

    #[test]
    fn fold_available_folds_a_large_file_in_parallel_then_tails_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let line = r#"{"timestamp":"t","session_id":"s","event_type":"step_complete","component":"routing","message":"m","tokens":3,"metadata":{},"seq":0}"#;
        let n = (PARALLEL_MIN_BYTES as usize / line.len()) + 100;
        let mut text = String::with_capacity(n * (line.len() + 1));
        for _ in 0..n {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("{\"part");
        append(&path, &text);
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        let mut fold = FoldState::new(5);
        assert_eq!(t.fold_available(&mut fold).unwrap(), n as u64);
        assert_eq!(fold.tokens, 3 * n as u64);
        assert!(fold.torn_tail);
        append(&path, "ial\n");
        assert_eq!(collect(&mut t), vec!["{\"partial"]);
        assert_eq!(t.stats.lines, n as u64 + 1);
    }

    #[test]
    fn a_fold_skips_what_a_head_keeping_truncation_hands_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let ev = |seq: u64, tokens: u64| {
            format!(
                "{{\"timestamp\":\"2026-01-01T00:00:00+00:00\",\"session_id\":\"s\",\"event_type\":\"x\",\"component\":\"c\",\"message\":\"m\",\"tokens\":{tokens},\"metadata\":{{}},\"seq\":{seq}}}\n"
            )
        };
        append(&path, &format!("{}{}{}", ev(0, 1), ev(1, 10), ev(2, 100)));
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        let mut fold = FoldState::new(5);
        assert_eq!(t.fold_available(&mut fold).unwrap(), 3);
        // Keep the first two lines, then the writer goes on at seq 3.
        let head = ev(0, 1).len() + ev(1, 10).len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(head as u64)
            .unwrap();
        append(&path, &format!("{}{}", ev(3, 1000), ev(4, 10000)));
        assert_eq!(t.fold_available(&mut fold).unwrap(), 2);
        assert_eq!(fold.tokens, 11111);
        assert_eq!((t.stats.truncations, t.stats.rereads), (1, 2));
        // A plain reader is handed every line, as before.
        let mut plain = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert_eq!(collect(&mut plain).len(), 4);
    }

    #[test]
    fn wait_wakes_on_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        append(&path, "");
        let mut t = Tailer::new(&path, Start::Beginning, None, 1 << 20).unwrap();
        assert!(!t.wait(Duration::from_millis(20)));
        let p2 = path.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            append(&p2, "x\n");
        });
        let start = Instant::now();
        assert!(t.wait(Duration::from_secs(5)));
        assert!(start.elapsed() < Duration::from_secs(2));
        h.join().unwrap();
        assert_eq!(collect(&mut t), vec!["x"]);
    }
}
