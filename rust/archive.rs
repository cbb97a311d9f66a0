//! An archived session (`archive/<date>/<id>.tar.gz`, written by
//! `log_rotation.LogRotator`) folded natively, streamed from the archive:
//! nothing is extracted to disk and no event is handed to Python (issue 13).
//!
//! The archive is one gzip stream of a tar. Its log members are the session's
//! rotated segments (each may itself be gzip-compressed: its contents, not its
//! name, say so, as for a live session) and its live file; the archiver writes
//! them by name, which is not the order they are folded in (oldest segment
//! first, the live file last). So each member is folded on its own as it
//! streams past, with no buffer of its bytes, and the folds are merged in
//! segment order afterwards (`FoldState::merge`: the same result as one fold
//! of the files in order). A fold that had to fold names into `OTHER` cannot
//! be merged that way; then that member alone is folded again in its place,
//! read from the archive once more (a log with over `MAX_NAMES` names), at
//! most `MAX_REFOLDS` times per archive.
//!
//! The session's ledger (`tokens.json`, the archive's first member) is read
//! too and joined by the caller, as for a live session.
//!
//! The tar reader knows what Python's `tarfile` writes: ustar headers, pax
//! extended headers (`x`, for a long name, a size or a fractional mtime) and
//! GNU long names (`L`); any other entry is skipped by its size.

use std::io::{self, Read};
use std::path::Path;

use crate::fold::{self, FoldState};
use crate::ledger::{self, Ledger};
use crate::segments::{self, SegmentKey};

/// The log's name inside the session's directory.
pub const LOG_FILE: &str = "execution.jsonl";
/// A log member (or a compressed segment's contents) larger than this is not
/// read: the rotator bounds a segment far below it, and a gzip bomb is refused
/// rather than inflated.
pub const MAX_MEMBER_BYTES: u64 = 1 << 30;
/// Pax and GNU long-name headers larger than this are not a sigil archive.
const MAX_META_BYTES: u64 = 1 << 20;
const BLOCK: usize = 512;
/// At most this many members are folded again (each read from the archive
/// once more): past it an overflowed part is merged, its names beyond the
/// tables' `MAX_NAMES` counted under `OTHER` (every total stays exact), so a
/// hostile archive of many such members costs no more than this many reads.
const MAX_REFOLDS: usize = 16;

/// What an archive holds for the fold: its log members' folds (or, for the
/// ordered refold, their place) and its ledger.
pub struct ArchiveFold {
    pub fold: FoldState,
    pub ledger: Option<Ledger>,
    /// Why the archive's `tokens.json` is not a usable ledger, when it is not.
    pub ledger_problem: Option<String>,
    /// Why the archive could not be read to its end (one line naming the
    /// file), when it breaks after some of it was: `fold` then holds the
    /// members read before the break (the one it cuts, up to the cut), as a
    /// live session's damaged segment is folded up to where it breaks.
    pub problem: Option<String>,
}

/// Where a member sorts: the segments oldest first, then the live file; ties
/// in the archive's order.
type Order = (u8, Option<SegmentKey>, usize);

/// Fold the archived session at `path`. `Err` is one line naming the file,
/// when nothing of the session could be read; an archive that breaks after
/// some of it was read is its readable part, with the reason in `problem`.
/// The calls a killed run left open are settled, the writer gone ([`settle`]).
pub fn fold_archive(path: &Path, last_n: usize, max_line: usize) -> Result<ArchiveFold, String> {
    let shown = path.display().to_string();
    let fail = |e: io::Error| {
        let text = e.to_string();
        let text = text
            .rfind(" (os error ")
            .map_or(text.as_str(), |at| &text[..at]);
        format!("cannot read {shown}: {text}").replace(['\n', '\r'], " ")
    };
    let mut parts: Vec<(Order, FoldState)> = Vec::new();
    let mut ledger_raw: Option<Vec<u8>> = None;
    let walked = walk(path, |entry, index, data| {
        match entry {
            Wanted::Log(order) => {
                let mut part = FoldState::new(last_n);
                // A member cut short keeps the lines folded before the cut.
                let folded = fold_member(&mut part, data, order.0 == 0, max_line);
                parts.push(((order.0, order.1, index), part));
                folded?;
            }
            Wanted::Ledger => {
                let mut raw = Vec::new();
                data.take(ledger::MAX_LEDGER_BYTES + 1)
                    .read_to_end(&mut raw)?;
                ledger_raw = Some(raw);
            }
        }
        Ok(Walk::Continue)
    });
    let mut problem = match walked {
        Ok(()) => None,
        // Nothing of the session was read: no readable part to show.
        Err(e) if parts.is_empty() && ledger_raw.is_none() => return Err(fail(e)),
        Err(e) => Some(fail(e)),
    };
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    let mut st = FoldState::new(last_n);
    let mut refolds = 0usize;
    for (order, part) in parts {
        if st.lines > 0 && part.names_overflowed() && refolds < MAX_REFOLDS {
            // Only a part that folded names into `OTHER` merges inexactly:
            // it alone is folded again, in place (the later parts merge).
            refolds += 1;
            // A member cut short is folded again up to its cut: the break
            // is the one the walk above met.
            if let Err(e) = refold(path, &mut st, order.2, max_line) {
                problem.get_or_insert_with(|| fail(e));
            }
            continue;
        }
        st.merge(part);
    }
    let st = settle(st);
    let (ledger, ledger_problem) = match ledger_raw {
        None => (None, None),
        Some(raw) if raw.len() as u64 > ledger::MAX_LEDGER_BYTES => (
            None,
            Some(format!(
                "{shown}: tokens.json is larger than {} bytes",
                ledger::MAX_LEDGER_BYTES
            )),
        ),
        Some(raw) => match ledger::parse(&format!("{shown}: tokens.json"), &raw) {
            Ok(l) => (Some(l), None),
            Err(why) => (None, Some(why)),
        },
    };
    Ok(ArchiveFold {
        fold: st,
        ledger,
        ledger_problem,
        problem,
    })
}

/// The merged fold with its dead runs' calls settled (`FoldState::settled`),
/// the writer gone: an archive is of a session nobody writes (the archiver
/// holds the session's lock while it writes it, `LogRotator._archive_locked`,
/// and a writer refuses an archived ID), so a call a killed run left open
/// counts as a call of unknown usage holding its reservation, as it did in
/// every view of the live session before it was archived (contract 12).
fn settle(st: FoldState) -> FoldState {
    match st.settled(true) {
        std::borrow::Cow::Borrowed(_) => st,
        std::borrow::Cow::Owned(s) => s,
    }
}

/// Fold the member at `index` (in the archive's order) into `st`.
fn refold(path: &Path, st: &mut FoldState, index: usize, max_line: usize) -> io::Result<()> {
    walk(path, |entry, at, data| {
        if at != index {
            return Ok(Walk::Continue);
        }
        if let Wanted::Log(order) = entry {
            fold_member(st, data, order.0 == 0, max_line)?;
        }
        Ok(Walk::Stop)
    })
}

/// Fold one log member's bytes (a segment's, gzip-compressed or not; the
/// live file's, as it is) into `st`, from offset 0 as a file of its own.
fn fold_member(
    st: &mut FoldState,
    data: &mut dyn Read,
    segment: bool,
    max_line: usize,
) -> io::Result<()> {
    let mut head = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match data.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let mut whole = (&head[..got]).chain(data);
    if segment && got == 2 && head == [0x1f, 0x8b] {
        let mut inflated = Counted {
            inner: flate2::read::MultiGzDecoder::new(whole),
            left: MAX_MEMBER_BYTES,
        };
        fold::fold_reader(st, &mut inflated, 0, max_line)?;
        return Ok(());
    }
    fold::fold_reader(st, &mut whole, 0, max_line)?;
    Ok(())
}

/// A reader that fails once more than `left` bytes came through it.
struct Counted<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a compressed segment inflates to over {MAX_MEMBER_BYTES} bytes"),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

enum Wanted {
    /// A log member: its sort key (0 a segment, 1 the live file).
    Log((u8, Option<SegmentKey>)),
    Ledger,
}

enum Walk {
    Continue,
    Stop,
}

/// What a member of `<session>/<name>` is to the fold, if anything.
fn wanted(name: &str) -> Option<Wanted> {
    let mut parts = name.split('/');
    let (_, file) = (parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    if file == LOG_FILE {
        return Some(Wanted::Log((1, None)));
    }
    if file == "tokens.json" {
        return Some(Wanted::Ledger);
    }
    segments::segment_key(LOG_FILE, file).map(|k| Wanted::Log((0, Some(k))))
}

/// Stream the archive at `path`, calling `visit` with each wanted regular
/// member, its index among the archive's entries and a reader of its bytes
/// (what it leaves unread is skipped).
fn walk(
    path: &Path,
    mut visit: impl FnMut(Wanted, usize, &mut dyn Read) -> io::Result<Walk>,
) -> io::Result<()> {
    let file = segments::open_regular(path)?;
    let raw = io::BufReader::with_capacity(256 << 10, file);
    let mut tar = flate2::read::MultiGzDecoder::new(raw);
    let mut header = [0u8; BLOCK];
    let mut long_name: Option<String> = None;
    let mut pax_name: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut index = 0usize;
    loop {
        match read_block(&mut tar, &mut header)? {
            false => return Ok(()), // the stream ends without its zero blocks
            true if header.iter().all(|&b| b == 0) => return Ok(()),
            true => {}
        }
        check_sum(&header)?;
        let kind = header[156];
        let meta_entry = matches!(kind, b'x' | b'g' | b'L' | b'K');
        let size = match pax_size {
            Some(size) if !meta_entry => {
                pax_size = None;
                size
            }
            _ => octal(&header[124..136])?,
        };
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        match kind {
            _ if meta_entry => {
                if size > MAX_META_BYTES {
                    return Err(bad("an extended header is too large"));
                }
                let mut meta = Vec::with_capacity(size as usize);
                (&mut tar).take(size).read_to_end(&mut meta)?;
                if meta.len() as u64 != size {
                    return Err(truncated());
                }
                skip(&mut tar, padded - size)?;
                match kind {
                    b'x' => {
                        let (name, size) = pax_fields(&meta);
                        if name.is_some() {
                            pax_name = name;
                        }
                        pax_size = size;
                    }
                    b'L' => {
                        let end = meta.iter().position(|&b| b == 0).unwrap_or(meta.len());
                        long_name = Some(String::from_utf8_lossy(&meta[..end]).into_owned());
                    }
                    _ => {}
                }
                continue;
            }
            _ => {}
        }
        let name = match pax_name.take().or_else(|| long_name.take()) {
            Some(name) => name,
            None => header_name(&header),
        };
        let here = index;
        index += 1;
        let regular = matches!(kind, b'0' | 0 | b'7');
        let entry = if regular { wanted(&name) } else { None };
        let Some(entry) = entry else {
            skip(&mut tar, padded)?;
            continue;
        };
        if matches!(entry, Wanted::Log(_)) && size > MAX_MEMBER_BYTES {
            let file = name.rsplit('/').next().unwrap_or(&name);
            return Err(bad(&format!(
                "{file} is larger than {MAX_MEMBER_BYTES} bytes"
            )));
        }
        let mut member = (&mut tar).take(size);
        let step = visit(entry, here, &mut member)?;
        // What the visitor left unread, then the padding to the next block.
        io::copy(&mut member, &mut io::sink())?;
        if member.limit() > 0 {
            return Err(truncated());
        }
        skip(&mut tar, padded - size)?;
        if let Walk::Stop = step {
            return Ok(());
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the archive ends early")
}

/// One header block; false at a clean end of the stream.
fn read_block(r: &mut impl Read, buf: &mut [u8; BLOCK]) -> io::Result<bool> {
    let mut got = 0;
    while got < BLOCK {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(truncated()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let skipped = io::copy(&mut r.take(n), &mut io::sink())?;
    if skipped != n {
        return Err(truncated());
    }
    Ok(())
}

/// A header's checksum: its bytes summed with the checksum field as spaces.
fn check_sum(h: &[u8; BLOCK]) -> io::Result<()> {
    let stored = octal(&h[148..156]).map_err(|_| bad("not a tar archive"))?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    if sum != stored {
        return Err(bad("not a tar archive (a header's checksum is wrong)"));
    }
    Ok(())
}

/// A numeric field: octal digits (spaces and NULs around them), or GNU's
/// base-256 form (the first byte's high bit set).
fn octal(field: &[u8]) -> io::Result<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x3f) as u64;
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as u64))
                .ok_or_else(|| bad("a header's number is too large"))?;
        }
        return Ok(v);
    }
    let text = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect::<Vec<u8>>();
    if text.is_empty() {
        return Ok(0);
    }
    let mut v: u64 = 0;
    for b in text {
        if !(b'0'..=b'7').contains(&b) {
            return Err(bad("not a tar archive (a header's number is not octal)"));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add((b - b'0') as u64))
            .ok_or_else(|| bad("a header's number is too large"))?;
    }
    Ok(v)
}

/// The name of a ustar header: its prefix, a slash and its name.
fn header_name(h: &[u8; BLOCK]) -> String {
    let field = |bytes: &[u8]| {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    let name = field(&h[0..100]);
    if &h[257..263] == b"ustar\0" {
        let prefix = field(&h[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

/// `path` and `size` of a pax extended header (`<len> <key>=<value>\n` records).
fn pax_fields(meta: &[u8]) -> (Option<String>, Option<u64>) {
    let (mut name, mut size) = (None, None);
    let mut rest = meta;
    while !rest.is_empty() {
        let Some(space) = rest.iter().position(|&b| b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= space + 1 || len > rest.len() {
            break;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|&b| b == b'=') {
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            match key {
                b"path" => name = Some(String::from_utf8_lossy(value).into_owned()),
                b"size" => size = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()),
                _ => {}
            }
        }
        rest = &rest[len..];
    }
    (name, size)
}

// ---------------------------------------------------------------------------
// The binding

/// The session model of the archived session at `path` (its segments, oldest
/// first, then its live file, folded natively from the tar.gz stream without
/// the GIL), joined with the archive's ledger as a live session's snapshot is:
/// the runs only the ledger knows count too. A pair `(snapshot, problem)`:
/// `(snapshot, None)` read whole; `(snapshot, reason)` its readable part, the
/// archive breaking after it; `(None, reason)` nothing of it readable. The
/// reason is one line naming the archive.
#[pyo3::pyfunction]
#[pyo3(name = "fold_archive", signature = (path, last_n = 0, max_line_bytes = fold::DEFAULT_MAX_LINE))]
pub fn py_fold_archive(
    py: pyo3::Python<'_>,
    path: std::path::PathBuf,
    last_n: usize,
    max_line_bytes: usize,
) -> pyo3::PyResult<pyo3::Py<pyo3::PyAny>> {
    use pyo3::prelude::*;
    let outcome = py.detach(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fold_archive(&path, last_n, max_line_bytes)
        }))
    });
    let outcome = outcome.unwrap_or_else(|_| {
        Err(format!(
            "cannot read {}: internal error in sigil._native (fold_archive); please report it",
            path.display()
        ))
    });
    crate::errors::guard("fold_archive", || {
        let pair = match outcome {
            Ok(read) => {
                let snap = crate::snapshot::session_joined(py, &read.fold, read.ledger.as_ref())?;
                (Some(Py::new(py, snap)?), read.problem)
            }
            Err(reason) => (None, Some(reason)),
        };
        Ok(pair.into_pyobject(py)?.into_any().unbind())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn header(name: &str, size: u64, kind: u8) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000600\0");
        let size_field = format!("{size:011o}\0");
        h[124..136].copy_from_slice(size_field.as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn tar_gz(members: &[(&str, &[u8], u8)]) -> Vec<u8> {
        let mut tar = Vec::new();
        for (name, data, kind) in members {
            tar.extend_from_slice(&header(name, data.len() as u64, *kind));
            tar.extend_from_slice(data);
            let pad = data.len().div_ceil(BLOCK) * BLOCK - data.len();
            tar.extend(std::iter::repeat_n(0u8, pad));
        }
        tar.extend([0u8; 2 * BLOCK]);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&tar).unwrap();
        enc.finish().unwrap()
    }

    fn line(kind: &str, component: &str, tokens: u64, seq: u64) -> String {
        format!(
            "{{\"timestamp\":\"2026-01-11T10:00:{:02}+00:00\",\"session_id\":\"s\",\"event_type\":\"{kind}\",\"component\":\"{component}\",\"message\":\"m\",\"tokens\":{tokens},\"metadata\":{{}},\"seq\":{seq}}}\n",
            seq % 60
        )
    }

    fn sequential(files: &[&[u8]]) -> FoldState {
        let mut st = FoldState::new(10);
        for f in files {
            let mut r = *f;
            fold::fold_reader(&mut st, &mut r, 0, fold::DEFAULT_MAX_LINE).unwrap();
        }
        st
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn members_are_folded_oldest_first_whatever_the_archive_order() {
        let oldest = format!(
            "{}{}",
            line("session_start", "orchestrator", 0, 1),
            line("step_complete", "routing", 5, 2)
        );
        let middle = line("step_complete", "memory", 7, 3);
        let live = format!(
            "{}{}{{\"torn",
            line("step_complete", "routing", 11, 4),
            line("session_complete", "orchestrator", 0, 5)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar.gz");
        let middle_gz = gz(middle.as_bytes());
        std::fs::write(
            &path,
            tar_gz(&[
                ("s", b"", b'5'),
                ("s/execution.jsonl", live.as_bytes(), b'0'),
                ("s/execution.jsonl.1.gz", &middle_gz, b'0'),
                ("s/execution.jsonl.2", oldest.as_bytes(), b'0'),
                ("s/notes.txt", b"ignored", b'0'),
            ]),
        )
        .unwrap();
        let got = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE).unwrap();
        let want = sequential(&[oldest.as_bytes(), middle.as_bytes(), live.as_bytes()]);
        assert_eq!(got.fold.tokens, 23);
        assert_eq!(got.fold.tokens, want.tokens);
        assert_eq!(got.fold.entries, want.entries);
        assert_eq!(got.fold.lines, want.lines);
        assert_eq!(got.fold.runs, want.runs);
        assert_eq!(got.fold.status, want.status);
        assert_eq!(got.fold.seq_gaps, 0);
        assert!(got.fold.torn_tail && want.torn_tail);
        assert_eq!(got.fold.last_seq, Some(5));
        assert!(got.ledger.is_none() && got.ledger_problem.is_none());
    }

    #[test]
    fn calls_a_killed_run_left_open_hold_their_reservations_once_archived() {
        // `sigil proxy` killed with -9 while two calls were in flight: their
        // starts and no end, one in a rotated segment, one in the live file.
        let event = |kind: &str, tokens: u64, seq: u64, meta: &str| {
            format!(
                "{{\"timestamp\":\"2026-01-11T10:00:{seq:02}+00:00\",\"session_id\":\"s\",\"event_type\":\"{kind}\",\"component\":\"m\",\"message\":\"m\",\"tokens\":{tokens},\"metadata\":{meta},\"seq\":{seq}}}\n"
            )
        };
        let segment = format!(
            "{}{}{}",
            event("session_start", 0, 0, r#"{"run":1,"budget":1000}"#),
            event(
                "step_start",
                0,
                1,
                r#"{"run":1,"call":1,"model":"m","max_tokens":50,"prompt_tokens_reserved":10}"#
            ),
            event(
                "step_start",
                0,
                2,
                r#"{"run":1,"call":2,"model":"m","max_tokens":40,"prompt_tokens_reserved":5}"#
            ),
        );
        let live = format!(
            "{}{}",
            event(
                "step_complete",
                30,
                3,
                r#"{"run":1,"call":1,"model":"m","input_tokens":10,"output_tokens":20}"#
            ),
            event(
                "step_start",
                0,
                4,
                r#"{"run":1,"call":3,"model":"m","max_tokens":7,"prompt_tokens_reserved":3}"#
            ),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar.gz");
        std::fs::write(
            &path,
            tar_gz(&[
                ("s/execution.jsonl", live.as_bytes(), b'0'),
                ("s/execution.jsonl.1", segment.as_bytes(), b'0'),
            ]),
        )
        .unwrap();
        let got = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE).unwrap();
        // The live session's model with its writer gone, as every view of it
        // showed before it was archived.
        let whole = sequential(&[segment.as_bytes(), live.as_bytes()]);
        let want = whole.settled(true);
        let c = &got.fold.components["m"];
        assert_eq!((c.unknown_usage, c.tokens_held, c.tokens), (2, 55, 30));
        assert_eq!(
            (c.unknown_usage, c.tokens_held),
            (
                want.components["m"].unknown_usage,
                want.components["m"].tokens_held
            )
        );
        let run = got.fold.run();
        assert!(run.calls.open.is_empty());
        assert_eq!(run.components["m"].tokens_held, 55);
        let m = &got.fold.models()[&fold::model_key("m", "m")];
        assert_eq!((m.unknown_usage, m.tokens_held), (2, 55));
        assert_eq!(got.fold.tokens, want.tokens);
        // A session whose calls all ended is the fold as it is.
        let ended = format!(
            "{segment}{}{}",
            event("step_error", 0, 3, r#"{"run":1,"call":1,"model":"m"}"#),
            event("step_error", 0, 4, r#"{"run":1,"call":2,"model":"m"}"#),
        );
        std::fs::write(
            &path,
            tar_gz(&[("s/execution.jsonl", ended.as_bytes(), b'0')]),
        )
        .unwrap();
        let got = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE).unwrap();
        let c = &got.fold.components["m"];
        assert_eq!((c.unknown_usage, c.tokens_held), (0, 0));
    }

    #[test]
    fn a_pax_name_and_a_gnu_long_name_are_read() {
        let long = format!("s/{}", "x".repeat(120));
        let pax_record = |k: &str, v: &str| {
            let body = format!(" {k}={v}\n");
            let mut digits = 1;
            while (body.len() + digits).to_string().len() != digits {
                digits += 1;
            }
            format!("{}{body}", body.len() + digits)
        };
        let pax = pax_record("path", "s/execution.jsonl");
        let data = line("step_complete", "routing", 3, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar.gz");
        std::fs::write(
            &path,
            tar_gz(&[
                ("././@LongLink", long.as_bytes(), b'L'),
                ("ignored-name", b"{}\n", b'0'),
                ("pax", pax.as_bytes(), b'x'),
                ("truncated-name", data.as_bytes(), b'0'),
            ]),
        )
        .unwrap();
        let got = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE).unwrap();
        assert_eq!(got.fold.tokens, 3);
        assert_eq!(got.fold.lines, 1);
    }

    #[test]
    fn a_broken_or_truncated_archive_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.tar.gz");
        std::fs::write(&path, b"\x1f\x8b not really gzip").unwrap();
        let why = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE)
            .err()
            .unwrap();
        assert!(
            why.starts_with(&format!("cannot read {}", path.display())),
            "{why}"
        );
        let data = line("step_complete", "routing", 3, 1).repeat(2000);
        let whole = tar_gz(&[("s/execution.jsonl", data.as_bytes(), b'0')]);
        // Cut short: the readable part, and the reason.
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        let got = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE).unwrap();
        assert!(
            got.fold.lines > 0 && got.fold.lines < 2000,
            "{}",
            got.fold.lines
        );
        let why = got.problem.unwrap();
        assert!(
            why.starts_with(&format!("cannot read {}", path.display())),
            "{why}"
        );
        let not_tar = gz(&[7u8; 4096]);
        std::fs::write(&path, not_tar).unwrap();
        let why = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE)
            .err()
            .unwrap();
        assert!(why.contains("not a tar archive"), "{why}");
    }

    #[test]
    fn a_truncated_archive_keeps_the_members_folded_before_the_break() {
        // `truncate -s -300`: the segment before the break is folded whole,
        // the live file up to the cut, and the reason comes with them.
        let segment: String = (1..=50).map(|i| line("step_complete", "a", 3, i)).collect();
        let live: String = (51..=3000)
            .map(|i| line("step_complete", "b", i % 7 + 1, i))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar.gz");
        let whole = tar_gz(&[
            ("s/execution.jsonl.1", segment.as_bytes(), b'0'),
            ("s/execution.jsonl", live.as_bytes(), b'0'),
        ]);
        std::fs::write(&path, &whole[..whole.len() - 300]).unwrap();
        let got = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE).unwrap();
        let why = got.problem.expect("the break is named");
        assert!(
            why.starts_with(&format!("cannot read {}", path.display())) && !why.contains('\n'),
            "{why}"
        );
        let all = sequential(&[segment.as_bytes(), live.as_bytes()]);
        assert!(got.fold.lines > 50 && got.fold.lines < all.lines);
        assert!(got.fold.tokens > 150 && got.fold.tokens < all.tokens);
        // What was read is exactly the sequential fold of the lines before the cut.
        let kept = got.fold.lines as usize - 50;
        let head: String = live.lines().take(kept).map(|l| format!("{l}\n")).collect();
        let want = sequential(&[segment.as_bytes(), head.as_bytes()]);
        assert_eq!(got.fold.tokens, want.tokens);
        assert_eq!(got.fold.entries, want.entries);
        // Cut inside the first member: nothing read whole, still a part.
        std::fs::write(&path, &whole[..40]).unwrap();
        let got = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE);
        assert!(got.is_err() || got.unwrap().problem.is_some());
    }

    #[test]
    fn the_ledger_member_is_read_and_a_bad_one_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar.gz");
        std::fs::write(
            &path,
            tar_gz(&[
                ("s/tokens.json", b"not json", b'0'),
                ("s/execution.jsonl", b"", b'0'),
            ]),
        )
        .unwrap();
        let got = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE).unwrap();
        assert!(got.ledger.is_none());
        assert!(got
            .ledger_problem
            .unwrap()
            .contains("tokens.json is not JSON"));
    }

    #[test]
    fn past_the_refold_cap_overflowed_members_merge_with_exact_totals() {
        // More members with over MAX_NAMES names than MAX_REFOLDS: each is
        // read twice at most, and every total is still the sequential fold's.
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        let mut files: Vec<Vec<u8>> = Vec::new();
        let count = MAX_REFOLDS + 4;
        let mut seq = 0;
        for number in (1..=count).rev() {
            let mut data = String::new();
            for i in 0..300 {
                data.push_str(&line("step_complete", &format!("m{number}n{i}"), 2, seq));
                seq += 1;
            }
            files.push(data.clone().into_bytes());
            members.push((format!("s/execution.jsonl.{number}"), data.into_bytes()));
        }
        let live = line("step_complete", "live", 5, seq);
        files.push(live.clone().into_bytes());
        members.push(("s/execution.jsonl".to_string(), live.into_bytes()));
        members.reverse();
        let refs: Vec<(&str, &[u8], u8)> = members
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice(), b'0'))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar.gz");
        std::fs::write(&path, tar_gz(&refs)).unwrap();
        let got = fold_archive(&path, 10, fold::DEFAULT_MAX_LINE).unwrap();
        let slices: Vec<&[u8]> = files.iter().map(|f| f.as_slice()).collect();
        let want = sequential(&slices);
        assert_eq!(got.fold.tokens, want.tokens);
        assert_eq!(got.fold.tokens, (count as u64) * 600 + 5);
        assert_eq!(got.fold.entries, want.entries);
        assert_eq!(got.fold.lines, want.lines);
        assert_eq!(got.fold.seq_gaps, 0);
    }

    #[test]
    fn octal_and_base256_numbers() {
        assert_eq!(octal(b"00000000017\0").unwrap(), 15);
        assert_eq!(octal(b"     17 \0").unwrap(), 15);
        assert_eq!(octal(b"\0\0\0").unwrap(), 0);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 2;
        big[10] = 1;
        assert_eq!(octal(&big).unwrap(), 258);
        assert!(octal(b"0009").is_err());
    }

    #[test]
    fn pax_records_give_path_and_size() {
        let meta = b"30 mtime=1764420000.123456789\n26 path=s/execution.jsonl\n13 size=1234\n";
        let (name, size) = pax_fields(meta);
        assert_eq!(name.as_deref(), Some("s/execution.jsonl"));
        assert_eq!(size, Some(1234));
    }
}
