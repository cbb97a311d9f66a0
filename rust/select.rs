//! Where to start reading a log for `sigil monitor --tail N` / `--since TIME`
//! (issue 12): found from the end of the file or by bisection, reading a few
//! blocks, never the whole file.
//!
//! Both work on byte offsets of one open file up to `end` (the offset just
//! past the last complete line a reader folded); what they return is the
//! start of a line, from which the caller parses forward to `end`. Memory is
//! one block, whatever the file's size.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::{guard_io, os_error};

/// How many bytes are read at a time.
const BLOCK: usize = 64 * 1024;
/// Below this span, bisection stops and lines are read one after another.
const LINEAR_SPAN: u64 = 64 * 1024;
/// The bytes read at a line's start for its timestamp.
const HEAD: usize = 96;

/// The start of the `n`-th line before `end` (counting back from the line
/// that ends at `end`), and how many lines lie from there to `end`: fewer
/// than `n` when the file's start came first (then the start is 0).
pub fn last_lines_start(file: &File, end: u64, n: u64) -> io::Result<(u64, u64)> {
    if n == 0 || end == 0 {
        return Ok((end, 0));
    }
    let mut buf = vec![0u8; BLOCK];
    // `end - 1` is the newline of the last line: the newlines before it
    // each end a line, so the one after them starts one.
    let mut pos = end - 1;
    let mut found = 0u64;
    while pos > 0 {
        let take = (BLOCK as u64).min(pos) as usize;
        let at = pos - take as u64;
        let got = read_exact_at(file, &mut buf[..take], at)?;
        if got < take {
            // The file shrank under us: what is left starts at 0.
            return Ok((0, found + 1));
        }
        for i in memchr::memrchr_iter(b'\n', &buf[..take]) {
            found += 1;
            if found == n {
                return Ok((at + i as u64 + 1, found));
            }
        }
        pos = at;
    }
    Ok((0, found + 1))
}

/// How far back a line's timestamp may step from an earlier line's (a slewed
/// clock) with the bisection still exact: the caller starts a second early.
const STEP_BACK_US: i64 = 1_000_000;

/// The first line start before `end` whose timestamp is at or after
/// `since_us` (microseconds since the epoch, UTC); `end` if none is. A line
/// whose timestamp cannot be read (not in sigil's layout, no UTC offset)
/// counts as "at or after": the caller filters every event it reads, so the
/// search may start early, never late.
///
/// The lines are bisected on their timestamps, which assumes they are in
/// time order. A clock stepped back breaks that: when the first and last
/// lines, or a probe and the lines around it, are out of order by more than
/// [`STEP_BACK_US`], the file is read line by line from its start instead
/// (one block of memory, every line's head looked at once).
pub fn since_offset(file: &File, end: u64, since_us: i64) -> io::Result<u64> {
    let mut lo = 0u64; // a line start; 0 or a line before `since_us`
    let mut hi = end; // a line start at or after `since_us`, or `end`
    let mut buf = vec![0u8; BLOCK];
    if end == 0 {
        return Ok(0);
    }
    // The times known below `lo` and from `hi` on: every probe lies between.
    let mut lo_ts = stamp_at(file, 0)?;
    let mut hi_ts = match prev_line_start(file, end - 1, 0, &mut buf)? {
        Some(last) => stamp_at(file, last)?,
        None => lo_ts,
    };
    if out_of_order(lo_ts, hi_ts) {
        return first_at_or_after(file, end, since_us);
    }
    while hi - lo > LINEAR_SPAN {
        let mid = lo + (hi - lo) / 2;
        let probe = match next_line_start(file, mid, hi, &mut buf)? {
            Some(s) => s,
            // No line starts in mid..hi: try the one that holds `mid`.
            None => match prev_line_start(file, mid, lo, &mut buf)? {
                Some(s) if s > lo => s,
                _ => break,
            },
        };
        let ts = stamp_at(file, probe)?;
        if out_of_order(lo_ts, ts) || out_of_order(ts, hi_ts) {
            return first_at_or_after(file, end, since_us);
        }
        match ts {
            Some(t) if t < since_us => {
                lo = probe;
                lo_ts = ts;
            }
            Some(_) => {
                hi = probe;
                hi_ts = ts;
            }
            None => hi = probe,
        }
    }
    // The last stretch, line by line.
    let mut at = lo;
    while at < hi {
        if !before(file, at, since_us)? {
            return Ok(at);
        }
        match next_line_start(file, at + 1, hi, &mut buf)? {
            Some(s) => at = s,
            None => return Ok(hi),
        }
    }
    Ok(hi)
}

/// Whether `later` (a line's time) steps back from `earlier` (an earlier
/// line's) by more than [`STEP_BACK_US`]; unreadable times are in order.
fn out_of_order(earlier: Option<i64>, later: Option<i64>) -> bool {
    matches!((earlier, later), (Some(a), Some(b)) if b < a.saturating_sub(STEP_BACK_US))
}

/// The timestamp of the line at `start`, if it has a readable one.
fn stamp_at(file: &File, start: u64) -> io::Result<Option<i64>> {
    let mut head = [0u8; HEAD];
    let got = read_exact_at(file, &mut head, start)?;
    Ok(line_timestamp_us(&head[..got]))
}

/// The first line start before `end`, in file order, whose timestamp is not
/// before `since_us` (none readable counts as not before); `end` if none.
/// Exact whatever the order of the lines' times: the file read once, a block
/// at a time.
fn first_at_or_after(file: &File, end: u64, since_us: i64) -> io::Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut pos = 0u64;
    let mut in_line = false; // `pos` is inside a line already looked at
    while pos < end {
        let take = (BLOCK as u64).min(end - pos) as usize;
        let got = read_exact_at(file, &mut buf[..take], pos)?;
        if got == 0 {
            break;
        }
        let mut i = 0usize;
        if in_line {
            match memchr::memchr(b'\n', &buf[..got]) {
                Some(nl) => {
                    i = nl + 1;
                    in_line = false;
                }
                None => i = got,
            }
        }
        while i < got {
            let at = pos + i as u64;
            let ts = if i + HEAD <= got {
                line_timestamp_us(&buf[i..i + HEAD])
            } else {
                stamp_at(file, at)?
            };
            if ts.is_none_or(|t| t >= since_us) {
                return Ok(at);
            }
            match memchr::memchr(b'\n', &buf[i..got]) {
                Some(nl) => i += nl + 1,
                None => {
                    in_line = true;
                    i = got;
                }
            }
        }
        if got < take {
            break; // the file shrank under us
        }
        pos += got as u64;
    }
    Ok(end)
}

/// Whether the line at `start` has a readable timestamp before `since_us`.
fn before(file: &File, start: u64, since_us: i64) -> io::Result<bool> {
    let mut head = [0u8; HEAD];
    let got = read_exact_at(file, &mut head, start)?;
    Ok(line_timestamp_us(&head[..got]).is_some_and(|t| t < since_us))
}

/// The first line start in `from..limit` (a position just after a newline).
fn next_line_start(file: &File, from: u64, limit: u64, buf: &mut [u8]) -> io::Result<Option<u64>> {
    if from == 0 {
        return Ok(Some(0).filter(|_| limit > 0));
    }
    // A line starts at `from` when the byte before it is a newline.
    let mut pos = from - 1;
    while pos < limit {
        let take = (buf.len() as u64).min(limit - pos) as usize;
        let got = read_exact_at(file, &mut buf[..take], pos)?;
        if let Some(i) = memchr::memchr(b'\n', &buf[..got]) {
            let s = pos + i as u64 + 1;
            return Ok(Some(s).filter(|&s| s < limit));
        }
        if got < take {
            return Ok(None);
        }
        pos += take as u64;
    }
    Ok(None)
}

/// The start of the line that holds `pos` (at most `pos`), not before `floor`.
fn prev_line_start(file: &File, pos: u64, floor: u64, buf: &mut [u8]) -> io::Result<Option<u64>> {
    let mut hi = pos;
    while hi > floor {
        let take = (buf.len() as u64).min(hi - floor) as usize;
        let at = hi - take as u64;
        let got = read_exact_at(file, &mut buf[..take], at)?;
        if let Some(i) = memchr::memrchr(b'\n', &buf[..got]) {
            return Ok(Some(at + i as u64 + 1));
        }
        hi = at;
    }
    Ok(None)
}

/// Fill `buf` from `offset` until it is full or the file ends; the count read.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The timestamp of a line in sigil's layout (`{"timestamp":"...`), in
/// microseconds since the epoch; None without one, or without a UTC offset.
pub fn line_timestamp_us(head: &[u8]) -> Option<i64> {
    let rest = head.strip_prefix(b"{\"timestamp\":\"")?;
    let close = memchr::memchr(b'"', rest)?;
    rfc3339_us(&rest[..close])
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` in microseconds since
/// the epoch (`T` may be a space, as Python's `fromisoformat` allows).
pub fn rfc3339_us(t: &[u8]) -> Option<i64> {
    if t.len() < 20 || t[4] != b'-' || t[7] != b'-' || t[13] != b':' || t[16] != b':' {
        return None;
    }
    if t[10] != b'T' && t[10] != b't' && t[10] != b' ' {
        return None;
    }
    let (y, mo, d) = (digits(&t[0..4])?, digits(&t[5..7])?, digits(&t[8..10])?);
    let (h, mi, s) = (
        digits(&t[11..13])?,
        digits(&t[14..16])?,
        digits(&t[17..19])?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut p = 19;
    let mut micros = 0i64;
    if t[p] == b'.' || t[p] == b',' {
        let start = p + 1;
        p = start;
        while p < t.len() && t[p].is_ascii_digit() {
            p += 1;
        }
        let frac = &t[start..p];
        if frac.is_empty() {
            return None;
        }
        for i in 0..6 {
            micros = micros * 10 + frac.get(i).map_or(0, |d| i64::from(d - b'0'));
        }
    }
    let zone = &t[p..];
    let offset_s = match zone {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let oh = digits(&[*h1, *h2])?;
            let om = digits(&[*m1, *m2])?;
            let v = oh * 3600 + om * 60;
            if *sign == b'-' {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + s - offset_s;
    Some(secs * 1_000_000 + micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------
// The binding

/// Open `path` for reading; None when it is not the file `dev`/`ino` names.
fn open_same(path: &Path, ident: Option<(u64, u64)>) -> io::Result<Option<File>> {
    let file = File::open(path)?;
    if let Some((dev, ino)) = ident {
        let meta = file.metadata()?;
        if (meta.dev(), meta.ino()) != (dev, ino) {
            return Ok(None);
        }
    }
    Ok(Some(file))
}

fn ident(dev: Option<u64>, ino: Option<u64>) -> Option<(u64, u64)> {
    dev.zip(ino)
}

fn detached<T: Send>(
    py: Python<'_>,
    what: &str,
    path: &Path,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(|| guard_io(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(os_error(&e, Some(path))),
        Err(detail) => Err(PyRuntimeError::new_err(format!(
            "internal error in sigil._native ({what}): {detail}; please report it"
        ))),
    }
}

/// `(start, lines)`: where the last `n` lines before offset `end` of `path`
/// begin, and how many lines that is (fewer than `n` when the file's start
/// came first). None when `path` is no longer the file `dev`/`ino` (given
/// together) names. Reads backwards from `end`, a block at a time.
#[pyfunction]
#[pyo3(signature = (path, end, n, *, dev = None, ino = None))]
pub fn tail_start(
    py: Python<'_>,
    path: PathBuf,
    end: u64,
    n: u64,
    dev: Option<u64>,
    ino: Option<u64>,
) -> PyResult<Option<(u64, u64)>> {
    let p = path.clone();
    detached(py, "tail_start", &path, move || {
        let Some(file) = open_same(&p, ident(dev, ino))? else {
            return Ok(None);
        };
        let end = end.min(file.metadata()?.len());
        last_lines_start(&file, end, n).map(Some)
    })
}

/// The offset of the first line before `end` of `path` whose timestamp is at
/// or after `since_us` (microseconds since the epoch), bisecting the file on
/// the lines' timestamps (a line without a readable one may start the
/// answer early, never late); `end` if no line is. None as for `tail_start`.
#[pyfunction]
#[pyo3(signature = (path, end, since_us, *, dev = None, ino = None))]
pub fn since_start(
    py: Python<'_>,
    path: PathBuf,
    end: u64,
    since_us: i64,
    dev: Option<u64>,
    ino: Option<u64>,
) -> PyResult<Option<u64>> {
    let p = path.clone();
    detached(py, "since_start", &path, move || {
        let Some(file) = open_same(&p, ident(dev, ino))? else {
            return Ok(None);
        };
        let end = end.min(file.metadata()?.len());
        since_offset(&file, end, since_us).map(Some)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn line(ts: &str, i: usize) -> String {
        format!("{{\"timestamp\":\"{ts}\",\"session_id\":\"s\",\"event_type\":\"x\",\"component\":\"c\",\"message\":\"m{i}\",\"tokens\":1,\"metadata\":{{}},\"seq\":{i}}}\n")
    }

    fn file_of(text: &str) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn stamp(second: usize) -> String {
        format!(
            "2026-11-29T{:02}:{:02}:{:02}.000001+00:00",
            second / 3600,
            second / 60 % 60,
            second % 60
        )
    }

    #[test]
    fn timestamps_read_as_python_reads_them() {
        assert_eq!(rfc3339_us(b"1970-01-01T00:00:00+00:00"), Some(0));
        assert_eq!(rfc3339_us(b"1970-01-01T00:00:01.5Z"), Some(1_500_000));
        assert_eq!(rfc3339_us(b"1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(rfc3339_us(b"1969-12-31T23:00:00-01:00"), Some(0));
        assert_eq!(
            rfc3339_us(b"2026-01-11T10:15:32.123456+00:00"),
            Some(1_768_126_532_123_456)
        );
        assert_eq!(rfc3339_us(b"2026-01-11T10:15:32.123456"), None); // local time
        assert_eq!(rfc3339_us(b"2026-13-11T10:15:32Z"), None);
        assert_eq!(rfc3339_us(b"not a time at all...."), None);
        assert_eq!(
            line_timestamp_us(line("1970-01-01T00:00:02Z", 0).as_bytes()),
            Some(2_000_000)
        );
    }

    #[test]
    fn the_last_lines_are_found_from_the_end() {
        let text: String = (0..10).map(|i| line(&stamp(i), i)).collect();
        let f = file_of(&text);
        let end = text.len() as u64;
        let starts: Vec<u64> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i as u64 + 1))
            .collect();
        assert_eq!(last_lines_start(&f, end, 0).unwrap(), (end, 0));
        assert_eq!(last_lines_start(&f, end, 1).unwrap(), (starts[9], 1));
        assert_eq!(last_lines_start(&f, end, 3).unwrap(), (starts[7], 3));
        assert_eq!(last_lines_start(&f, end, 10).unwrap(), (0, 10));
        assert_eq!(last_lines_start(&f, end, 50).unwrap(), (0, 10));
        // Up to an earlier end: the lines after it are not counted.
        assert_eq!(last_lines_start(&f, starts[5], 2).unwrap(), (starts[3], 2));
        assert_eq!(last_lines_start(&f, 0, 5).unwrap(), (0, 0));
    }

    #[test]
    fn the_last_lines_of_a_file_larger_than_a_block() {
        let text: String = (0..5000).map(|i| line(&stamp(i), i)).collect();
        let f = file_of(&text);
        let end = text.len() as u64;
        let starts: Vec<u64> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i as u64 + 1))
            .collect();
        for n in [1u64, 100, 999, 4999, 5000] {
            assert_eq!(
                last_lines_start(&f, end, n).unwrap(),
                (starts[5000 - n as usize], n)
            );
        }
    }

    #[test]
    fn since_bisects_to_the_first_line_at_or_after() {
        let text: String = (0..5000).map(|i| line(&stamp(i), i)).collect();
        let f = file_of(&text);
        let end = text.len() as u64;
        let starts: Vec<u64> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i as u64 + 1))
            .collect();
        let at = |i: usize| rfc3339_us(stamp(i).as_bytes()).unwrap();
        for i in [0usize, 1, 17, 2500, 4098, 4999] {
            assert_eq!(since_offset(&f, end, at(i)).unwrap(), starts[i], "{i}");
            assert_eq!(since_offset(&f, end, at(i) - 1).unwrap(), starts[i], "{i}");
        }
        assert_eq!(since_offset(&f, end, at(4999) + 1).unwrap(), end);
        assert_eq!(since_offset(&f, end, 0).unwrap(), 0);
        assert_eq!(since_offset(&f, 0, 0).unwrap(), 0);
    }

    #[test]
    fn a_clock_stepped_back_is_read_in_file_order_not_bisected() {
        // From line 2500 on the writer's clock is an hour behind: the first
        // line at or after TIME, in file order, is the answer.
        let hour = 3600;
        let text: String = (0..5000)
            .map(|i| {
                let second = if i < 2500 { i + 2 * hour } else { i + hour };
                line(&stamp(second), i)
            })
            .collect();
        let f = file_of(&text);
        let end = text.len() as u64;
        let starts: Vec<u64> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i as u64 + 1))
            .collect();
        let at = |second: usize| rfc3339_us(stamp(second).as_bytes()).unwrap();
        // TIME inside the first stretch: its line, though later lines are older.
        assert_eq!(
            since_offset(&f, end, at(2 * hour + 300)).unwrap(),
            starts[300]
        );
        // TIME after every line: none.
        assert_eq!(since_offset(&f, end, at(3 * hour)).unwrap(), end);
        // TIME before every line: the first.
        assert_eq!(since_offset(&f, end, at(0)).unwrap(), 0);
        // The reference, line by line, agrees wherever TIME falls.
        for second in [hour + 10, hour + 2600, 2 * hour + 2499, 2 * hour + 2500] {
            let want = (0..5000)
                .find(|&i| {
                    let s = if i < 2500 { i + 2 * hour } else { i + hour };
                    at(s) >= at(second)
                })
                .map_or(end, |i| starts[i]);
            assert_eq!(since_offset(&f, end, at(second)).unwrap(), want, "{second}");
        }
    }

    #[test]
    fn a_slewed_clock_still_bisects_exactly_within_the_slack() {
        // Every other line half a second back: within the caller's second.
        let text: String = (0..5000)
            .map(|i| {
                // An odd line 0.4 s before the even line just before it.
                let (second, fraction) = if i % 2 == 1 { (i - 1, 5) } else { (i, 9) };
                line(&format!("{}.{fraction}+00:00", &stamp(second)[..19]), i)
            })
            .collect();
        let f = file_of(&text);
        let end = text.len() as u64;
        let offset = since_offset(&f, end, rfc3339_us(stamp(3000).as_bytes()).unwrap()).unwrap();
        let first = text[offset as usize..].lines().next().unwrap();
        assert!(first.contains("\"seq\":3000}"), "{first}");
    }

    #[test]
    fn an_unreadable_timestamp_starts_early_never_late() {
        let mut text: String = (0..3000).map(|i| line(&stamp(i), i)).collect();
        let odd = text.len() as u64;
        text.push_str("not json at all\n");
        text.extend((3000..6000).map(|i| line(&stamp(i), i)));
        let f = file_of(&text);
        let want = rfc3339_us(stamp(3000).as_bytes()).unwrap();
        let got = since_offset(&f, text.len() as u64, want).unwrap();
        assert!(got <= odd + 16, "{got} > {odd}");
        assert!(got >= odd);
    }

    #[test]
    fn one_long_line_at_the_end() {
        let mut text: String = (0..100).map(|i| line(&stamp(i), i)).collect();
        let long_at = text.len() as u64;
        let mut long = line(&stamp(100), 100);
        long.insert_str(long.len() - 3, &" ".repeat(300_000));
        text.push_str(&long);
        let f = file_of(&text);
        let want = rfc3339_us(stamp(100).as_bytes()).unwrap();
        assert_eq!(since_offset(&f, text.len() as u64, want).unwrap(), long_at);
        let want = rfc3339_us(stamp(50).as_bytes()).unwrap();
        let starts: Vec<u64> = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i as u64 + 1))
            .collect();
        assert_eq!(
            since_offset(&f, text.len() as u64, want).unwrap(),
            starts[50]
        );
    }
}
