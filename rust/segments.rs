//! Opening log files safely and finding a log's rotated segments
//! (ARCHITECTURE.md contracts 5 and 13).
//!
//! Readers open only regular files: never through a symlink (the writer refuses
//! them too), never a FIFO (opening one blocks until a writer appears, reading
//! one consumes another process's data), never a device.
//!
//! A log at `<dir>/<stem><ext>` (`execution.jsonl`) has rotated segments beside
//! it under three naming schemes, and this module is the one place that knows
//! them. `python/sigil/core/paths.py` mirrors the rule (the core layer cannot
//! import the native module) and `tests/test_segments.py` checks that both agree.
//! - sigil's rotator: `<stem>_<YYYYmmdd>_<HHMMSS>[_<n>]<ext>`;
//! - Debian logrotate, numbered: `<name>.<N>` (N = 1 is the newest);
//! - logrotate `dateext`: `<name>-<digits>` (its default `-%Y%m%d`, or any
//!   dateformat made of digits, `-` and `_`).
//!
//! Each may end in `.gz` (logrotate's `compress`). Oldest first means: the named
//! ones with a date (sigil's and dateext's, by date then counter), then the
//! numbered ones from the highest number down; a segment's contents, not its
//! name, say whether it is compressed.

use std::cmp::Ordering;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Open `path` for reading if it is a regular file; a clear error otherwise.
///
/// `O_NOFOLLOW` refuses a symlink at the last component and `O_NONBLOCK` keeps
/// a FIFO from blocking the open; `fstat` then decides on the opened file
/// itself, so a swap between a check and the open cannot fool it.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file (a symbolic link; sigil does not follow links to logs)",
                )
            } else {
                e
            }
        })?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_block_device() || kind.is_char_device() {
            "a device"
        } else {
            "not a plain file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({what}); sigil reads logs only from regular files"),
        ));
    }
    // Back to blocking reads: O_NONBLOCK only had to get us past the open.
    // SAFETY: fcntl on our own open descriptor.
    unsafe {
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&file);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Whether the file's first bytes are gzip's magic number.
pub fn is_gzip(file: &File) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match file.read_at(&mut magic[got..], got as u64) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(magic == [0x1f, 0x8b])
}

/// Reads a file through `pread` from an offset of its own, so that a decoder
/// never moves a descriptor someone else reads at offsets.
pub struct PreadReader {
    file: File,
    pos: u64,
}

impl PreadReader {
    pub fn new(file: File) -> Self {
        PreadReader { file, pos: 0 }
    }
}

impl Read for PreadReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A gzip-compressed segment read as a stream: its offsets are those of the
/// decompressed text, and nothing is extracted to disk.
pub fn gzip_reader(file: &File) -> io::Result<flate2::read::MultiGzDecoder<PreadReader>> {
    Ok(flate2::read::MultiGzDecoder::new(PreadReader::new(
        file.try_clone()?,
    )))
}

/// Where a rotated segment sorts, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentKey {
    /// sigil's stamp or a dateext date (digits, right-padded to 14) and the
    /// collision counter.
    Dated(String, u64),
    /// logrotate's `.N`: a higher number is older.
    Numbered(u64),
}

impl Ord for SegmentKey {
    fn cmp(&self, other: &Self) -> Ordering {
        use SegmentKey::*;
        match (self, other) {
            (Dated(a, n), Dated(b, m)) => (a, n).cmp(&(b, m)),
            (Dated(..), Numbered(_)) => Ordering::Less,
            (Numbered(_), Dated(..)) => Ordering::Greater,
            (Numbered(a), Numbered(b)) => b.cmp(a),
        }
    }
}

impl PartialOrd for SegmentKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn padded(digits: String) -> String {
    format!("{digits:0<14}")
}

/// The sort key of `name` if it is a rotated segment of the log `base`.
pub fn segment_key(base: &str, name: &str) -> Option<SegmentKey> {
    let plain = name.strip_suffix(".gz").unwrap_or(name);
    // logrotate: <base>.<N> and <base>-<date>
    if let Some(rest) = plain.strip_prefix(base) {
        if let Some(n) = rest.strip_prefix('.') {
            if all_digits(n) && n.len() <= 18 {
                return n.parse().ok().map(SegmentKey::Numbered);
            }
        }
        if let Some(date) = rest.strip_prefix('-') {
            let digits: String = date.chars().filter(char::is_ascii_digit).collect();
            let shape_ok = date
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'-' || b == b'_');
            if shape_ok && digits.len() >= 8 && date.as_bytes()[0].is_ascii_digit() {
                return Some(SegmentKey::Dated(padded(digits), 0));
            }
        }
    }
    // sigil: <stem>_<YYYYmmdd>_<HHMMSS>[_<n>]<ext>
    let (stem, ext) = match base.rfind('.') {
        Some(i) if i > 0 => (&base[..i], &base[i..]),
        _ => (base, ""),
    };
    let middle = plain
        .strip_prefix(stem)?
        .strip_prefix('_')?
        .strip_suffix(ext)?;
    let mut parts = middle.split('_');
    let (day, time) = (parts.next()?, parts.next()?);
    let counter = match parts.next() {
        None => 0,
        Some(n) if all_digits(n) && n.len() <= 18 => n.parse().ok()?,
        Some(_) => return None,
    };
    if parts.next().is_some() || day.len() != 8 || time.len() != 6 {
        return None;
    }
    if !all_digits(day) || !all_digits(time) {
        return None;
    }
    Some(SegmentKey::Dated(format!("{day}{time}"), counter))
}

/// A rotated segment found beside the log.
#[derive(Clone, Debug)]
pub struct Segment {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub key: SegmentKey,
}

/// The rotated segments of the log at `path` (regular files only), oldest first.
pub fn rotated_segments(path: &Path) -> Vec<Segment> {
    let (Some(dir), Some(base)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut segments: Vec<Segment> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let key = segment_key(base, &name)?;
            let meta = fs::symlink_metadata(entry.path()).ok()?;
            if !meta.is_file() {
                return None;
            }
            Some(Segment {
                path: entry.path(),
                dev: meta.dev(),
                ino: meta.ino(),
                key,
            })
        })
        .collect();
    segments.sort_by(|a, b| a.key.cmp(&b.key).then_with(|| a.path.cmp(&b.path)));
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(names: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            fs::write(dir.path().join(n), "x\n").unwrap();
        }
        fs::write(dir.path().join("execution.jsonl"), "").unwrap();
        rotated_segments(&dir.path().join("execution.jsonl"))
            .into_iter()
            .map(|s| s.path.file_name().unwrap().to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn names_of_all_three_schemes_sort_oldest_first() {
        let got = order(&[
            "execution.jsonl.1",
            "execution.jsonl.10.gz",
            "execution.jsonl.2.gz",
            "execution_20260101_000000_10.jsonl",
            "execution_20260101_000000_2.jsonl",
            "execution_20260101_000000.jsonl",
            "execution.jsonl-20251231",
            "execution.jsonl-20251230.gz",
            "execution.jsonl",
            "execution.jsonl.tmp",
            "execution.jsonl.1.bz2",
            "execution_foo.jsonl",
            "execution_20260101_0000.jsonl",
            "execution.jsonl-abc",
            "other.jsonl.1",
        ]);
        assert_eq!(
            got,
            vec![
                "execution.jsonl-20251230.gz",
                "execution.jsonl-20251231",
                "execution_20260101_000000.jsonl",
                "execution_20260101_000000_2.jsonl",
                "execution_20260101_000000_10.jsonl",
                "execution.jsonl.10.gz",
                "execution.jsonl.2.gz",
                "execution.jsonl.1",
            ]
        );
    }

    #[test]
    fn symlinks_and_fifos_are_not_segments_and_are_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::write(&real, "x\n").unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("execution.jsonl.1")).unwrap();
        let c = std::ffi::CString::new(
            dir.path()
                .join("execution.jsonl.2")
                .to_str()
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(rotated_segments(&dir.path().join("execution.jsonl")).is_empty());
        let e = open_regular(&dir.path().join("execution.jsonl.1")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = open_regular(&dir.path().join("execution.jsonl.2")).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = open_regular(dir.path()).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        assert!(open_regular(&real).is_ok());
    }

    #[test]
    fn a_gzip_segment_is_recognised_by_its_contents_and_streamed() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seg");
        let mut enc =
            flate2::write::GzEncoder::new(File::create(&p).unwrap(), flate2::Compression::fast());
        enc.write_all(b"a\nb\n").unwrap();
        enc.finish().unwrap();
        let f = open_regular(&p).unwrap();
        assert!(is_gzip(&f).unwrap());
        let mut text = String::new();
        gzip_reader(&f).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "a\nb\n");
        fs::write(&p, "{}\n").unwrap();
        assert!(!is_gzip(&open_regular(&p).unwrap()).unwrap());
    }
}
