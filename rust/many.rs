//! Folding many sessions at once (`sigil sessions`, issue 10 item 8).
//!
//! Each session is folded as `log_parser.snapshot_at_rest` reads it: its
//! rotated segments, oldest first, then the live file, each opened once as a
//! regular file (never through a symlink, never a FIFO) and read to its end,
//! with no tailer and so no inotify watcher. Sessions are spread over a small
//! pool of scoped threads that take the next session from a shared counter;
//! each small session is folded on one thread (splitting a file pays only past
//! `fold::PARALLEL_MIN_BYTES`), and a large one after them with every thread.
//! A session that cannot be read gives a one-line reason that names the file
//! instead of a fold, and the others are still folded.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::fold::{self, FoldState};
use crate::ledger::{self, Ledger, LogFile};
use crate::segments;

/// At most this many threads, whatever the caller asks.
pub const MAX_THREADS: usize = 64;

/// The fold of one session, or why it could not be read (one line naming the file).
pub type Outcome = Result<FoldState, String>;

/// Fold every session in `logs` (each the path of a session's live log,
/// `<session>/execution.jsonl`) on up to `threads` threads (0: the machine's
/// cores, at most 8). Returns one outcome per log, in the same order.
///
/// Small sessions are spread over the pool, one thread each. A large one
/// (`fold::PARALLEL_MIN_BYTES` or more in all) is left for after them and then
/// folded with every thread, its files split at line boundaries as
/// `fold::fold_path` splits one: a listing with one heavy session is as fast as
/// folding that session alone, and the threads are never oversubscribed.
pub fn fold_sessions<P: AsRef<Path> + Sync>(
    logs: &[P],
    threads: usize,
    max_line: usize,
    last_n: usize,
) -> Vec<Outcome> {
    in_pool(
        logs,
        threads,
        |log, threads, limit| {
            fold_session_with(log, max_line, last_n, threads, limit)
                .map(|o| o.map(|st| settle(st, log)))
        },
        |log| Err(internal(log)),
    )
}

/// What one session's history is read from: its ledger (`tokens.json`, or why
/// it is not a usable one) and, unless the ledger alone is the history, the
/// fold of its log (`ledger::join` makes the history of both).
#[derive(Debug)]
pub struct SessionRead {
    pub fold: Option<FoldState>,
    pub ledger: Option<Ledger>,
    pub problem: Option<String>,
}

/// A session's history sources, or why its log could not be read.
pub type HistoryOutcome = Result<SessionRead, String>;

/// The name of a session's ledger, beside its log.
pub const LEDGER_FILE: &str = "tokens.json";

/// [`fold_sessions`] for whole histories: each session's ledger is read too,
/// and its log is folded only when the ledger does not stand for it (the log
/// is not exactly as the ledger last saw it, or a run is left to resume), as
/// `log_parser.HistoryModel.read` does for one session. So a listing shows the
/// runs only the ledger knows (their events rotated or deleted by an external
/// tool) whether the session is finished or live, and a finished session costs
/// one small read instead of a fold.
pub fn read_histories<P: AsRef<Path> + Sync>(
    logs: &[P],
    threads: usize,
    max_line: usize,
    last_n: usize,
) -> Vec<HistoryOutcome> {
    in_pool(
        logs,
        threads,
        |log, threads, limit| read_history_with(log, max_line, last_n, threads, limit),
        |log| Err(internal(log)),
    )
}

/// The files of the log at `log` as the ledger records them (name, size,
/// mtime in ns), oldest first: `log_parser.log_files`.
pub fn log_files(log: &Path) -> Vec<LogFile> {
    use std::os::unix::fs::MetadataExt;
    let segments = segments::rotated_segments(log);
    segments
        .iter()
        .map(|s| s.path.as_path())
        .chain(std::iter::once(log))
        .filter_map(|path| {
            let meta = std::fs::symlink_metadata(path).ok()?;
            let name = path.file_name()?.to_str()?.to_string();
            Some(LogFile {
                name,
                size: meta.len(),
                mtime_ns: meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
            })
        })
        .collect()
}

/// The fold with its dead runs' calls settled (`FoldState::settled`), the
/// writer gone when nobody holds the session's lock (beside the log).
fn settle(st: FoldState, log: &Path) -> FoldState {
    let gone = !locked(&log.parent().unwrap_or(Path::new(".")).join(LOCK_FILE));
    match st.settled(gone) {
        std::borrow::Cow::Borrowed(_) => st,
        std::borrow::Cow::Owned(s) => s,
    }
}

/// The name of a session's lock file (python/sigil/core/paths.py).
pub const LOCK_FILE: &str = ".lock";

/// Whether some process holds the lock at `path` (as
/// `sigil.core.locks.is_session_locked`: a shared, non-blocking `flock`
/// tried and released at once; a missing file is not locked). A lock that
/// cannot be tried (unreadable, out of descriptors, no locks on this file
/// system) counts as held: a live run is never shown as dead; a dead one is
/// shown as live until a later run starts.
pub fn locked(path: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return e.kind() != io::ErrorKind::NotFound,
    };
    let fd = f.as_raw_fd();
    // SAFETY: `fd` is open for the call (owned by `f`).
    let r = unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) };
    if r != 0 {
        return true;
    }
    // SAFETY: as above.
    unsafe { libc::flock(fd, libc::LOCK_UN) };
    false
}

fn read_history_with(
    log: &Path,
    max_line: usize,
    last_n: usize,
    threads: usize,
    limit: Option<u64>,
) -> Option<HistoryOutcome> {
    let run = || -> Option<HistoryOutcome> {
        let at = log.parent().unwrap_or(Path::new(".")).join(LEDGER_FILE);
        let (ledger, problem) = match ledger::read(&at) {
            Ok(doc) => (doc, None),
            Err(why) => (None, Some(why)),
        };
        if ledger
            .as_ref()
            .is_some_and(|l| l.unchanged(&log_files(log)))
        {
            return Some(Ok(SessionRead {
                fold: None,
                ledger,
                problem,
            }));
        }
        let folded = fold_session_with(log, max_line, last_n, threads, limit)?;
        Some(folded.map(|st| SessionRead {
            fold: Some(settle(st, log)),
            ledger,
            problem,
        }))
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Some(Err(internal(log))))
}

/// Run `each` over every session on a pool of up to `threads` threads (0: the
/// machine's cores, at most 8), one outcome per log, in order. `each` gets the
/// log, the threads it may use for one large file and a size limit: with a
/// limit it returns None for a session that large, which is then done after
/// the small ones with every thread (and no limit). `lost` stands for a slot a
/// panicking worker left empty (a bug): that session says so, the others are
/// kept.
fn in_pool<P, T, F, L>(logs: &[P], threads: usize, each: F, lost: L) -> Vec<T>
where
    P: AsRef<Path> + Sync,
    T: Send,
    F: Fn(&Path, usize, Option<u64>) -> Option<T> + Sync,
    L: Fn(&Path) -> T,
{
    let threads = if threads == 0 {
        fold::fold_threads()
    } else {
        threads
    };
    let threads = threads.clamp(1, MAX_THREADS);
    let limit = (threads > 1).then_some(fold::PARALLEL_MIN_BYTES);
    let pool = threads.min(logs.len().max(1));
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(log) = logs.get(i) else { break };
            done.push((i, each(log.as_ref(), 1, limit)));
        }
        done
    };
    let parts: Vec<Vec<(usize, Option<T>)>> = if pool == 1 {
        vec![work()]
    } else {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..pool).map(|_| s.spawn(work)).collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect()
        })
    };
    let mut out: Vec<Option<T>> = Vec::with_capacity(logs.len());
    out.resize_with(logs.len(), || None);
    for (i, outcome) in parts.into_iter().flatten() {
        out[i] = Some(outcome.unwrap_or_else(|| {
            // A large session: every thread on it, one session at a time.
            each(logs[i].as_ref(), threads, None).unwrap_or_else(|| lost(logs[i].as_ref()))
        }));
    }
    out.into_iter()
        .zip(logs)
        .map(|(o, log)| o.unwrap_or_else(|| lost(log.as_ref())))
        .collect()
}

fn internal(log: &Path) -> String {
    format!(
        "{}: internal error while folding (please report it)",
        log.display()
    )
}

/// Fold one session: its rotated segments, oldest first, then the live log.
/// A file that is missing (no log yet, or a segment archived meanwhile) is
/// skipped, as `log_parser.snapshot_files` skips it.
pub fn fold_session(log: &Path, max_line: usize, last_n: usize) -> Outcome {
    fold_session_with(log, max_line, last_n, fold::fold_threads(), None)
        .unwrap_or_else(|| Err(internal(log)))
}

/// [`fold_session`] with `threads` per large file; None, folding nothing, when
/// the session's files hold `limit` bytes or more.
fn fold_session_with(
    log: &Path,
    max_line: usize,
    last_n: usize,
    threads: usize,
    limit: Option<u64>,
) -> Option<Outcome> {
    let run = || -> Option<Outcome> {
        let segments = segments::rotated_segments(log);
        if let Some(limit) = limit {
            let size = |p: &Path| std::fs::symlink_metadata(p).map_or(0, |m| m.len());
            let bytes: u64 = segments.iter().map(|s| size(&s.path)).sum::<u64>() + size(log);
            if bytes >= limit {
                return None;
            }
        }
        let mut st = FoldState::new(last_n);
        for segment in &segments {
            if let Err(e) = fold_file(&mut st, &segment.path, max_line, threads, true) {
                return Some(Err(e));
            }
        }
        Some(fold_file(&mut st, log, max_line, threads, false).map(|()| st))
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Some(Err(internal(log))))
}

/// Fold one file of a session into `st` (a segment may be gzip-compressed:
/// its contents, not its name, say so), split across `threads` threads when
/// it is large.
fn fold_file(
    st: &mut FoldState,
    path: &Path,
    max_line: usize,
    threads: usize,
    segment: bool,
) -> Result<(), String> {
    let mut read = || -> io::Result<()> {
        let file = segments::open_regular(path)?;
        if segment && segments::is_gzip(&file)? {
            let mut reader = segments::gzip_reader(&file)?;
            fold::fold_reader(st, &mut reader, 0, max_line)?;
        } else {
            fold::fold_range(st, &file, 0, None, max_line, threads)?;
        }
        Ok(())
    };
    match read() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(reason(path, &e)),
    }
}

/// One line: the file, then what went wrong, without Rust's "(os error N)".
pub fn reason(path: &Path, e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(pos) => &text[..pos],
        None => &text,
    };
    let line = format!("{}: {text}", path.display());
    line.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;

    fn event(seq: u64, kind: &str, tokens: u64) -> String {
        format!(
            concat!(
                r#"{{"timestamp":"2026-01-11T10:00:{:02}.000000+00:00","session_id":"s","#,
                r#""event_type":"{}","component":"reasoning","message":"m","tokens":{},"#,
                r#""metadata":{{}},"seq":{}}}"#,
                "\n"
            ),
            seq % 60,
            kind,
            tokens,
            seq
        )
    }

    fn session(dir: &Path, name: &str, tokens: &[u64]) -> std::path::PathBuf {
        let d = dir.join(name);
        fs::create_dir_all(&d).unwrap();
        let log = d.join("execution.jsonl");
        let text: String = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| event(i as u64, "step_complete", *t))
            .collect();
        fs::write(&log, text).unwrap();
        log
    }

    fn tokens(o: &Outcome) -> u64 {
        o.as_ref().expect("folded").tokens
    }

    #[test]
    fn folds_each_session_in_order_whatever_the_threads() {
        let dir = tempfile::tempdir().unwrap();
        let logs: Vec<_> = (0..37u64)
            .map(|i| session(dir.path(), &format!("s{i}"), &[i, 1, 2]))
            .collect();
        for threads in [0, 1, 2, 3, 64] {
            let out = fold_sessions(&logs, threads, fold::DEFAULT_MAX_LINE, 0);
            let got: Vec<u64> = out.iter().map(tokens).collect();
            let want: Vec<u64> = (0..37u64).map(|i| i + 3).collect();
            assert_eq!(got, want, "threads {threads}");
        }
        assert!(fold_sessions::<&Path>(&[], 0, 1024, 0).is_empty());
    }

    #[test]
    fn equals_one_fold_of_the_segments_then_the_live_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = session(dir.path(), "rot", &[5, 6]);
        let d = log.parent().unwrap();
        // logrotate's numbered segments: .2 is older than .1.
        fs::write(d.join("execution.jsonl.2"), event(0, "session_start", 0)).unwrap();
        let gz = fs::File::create(d.join("execution.jsonl.1.gz")).unwrap();
        let mut enc = flate2::write::GzEncoder::new(gz, flate2::Compression::fast());
        enc.write_all(event(1, "step_complete", 100).as_bytes())
            .unwrap();
        enc.finish().unwrap();
        let out = fold_session(&log, fold::DEFAULT_MAX_LINE, 0).unwrap();
        assert_eq!(out.tokens, 111);
        assert_eq!(out.runs, 1);
        assert_eq!(out.entries, 4);
    }

    #[test]
    fn a_large_session_among_small_ones_folds_as_alone() {
        let dir = tempfile::tempdir().unwrap();
        let n = fold::PARALLEL_MIN_BYTES as usize / 100;
        let big: Vec<u64> = (0..n as u64).map(|i| i % 7).collect();
        let mut logs = vec![session(dir.path(), "a", &[1, 2])];
        logs.push(session(dir.path(), "big", &big));
        logs.push(session(dir.path(), "z", &[3]));
        assert!(fs::metadata(&logs[1]).unwrap().len() >= fold::PARALLEL_MIN_BYTES);
        let mut alone = FoldState::new(0);
        fold::fold_path_with(&mut alone, &logs[1], fold::DEFAULT_MAX_LINE, 1).unwrap();
        for threads in [1, 2, 3] {
            let out = fold_sessions(&logs, threads, fold::DEFAULT_MAX_LINE, 0);
            assert_eq!(tokens(&out[0]), 3);
            assert_eq!(tokens(&out[2]), 3);
            let got = out[1].as_ref().unwrap();
            assert_eq!((got.tokens, got.entries), (alone.tokens, alone.entries));
            assert_eq!(got.components, alone.components, "threads {threads}");
        }
    }

    #[test]
    fn a_fold_on_a_thread_that_folded_before_starts_clean() {
        // Each thread reuses one read buffer and block index: what a larger,
        // torn file left in them must not reach the next session's fold.
        let dir = tempfile::tempdir().unwrap();
        let small = session(dir.path(), "small", &[4, 5]);
        let fresh = fold_sessions(&[&small], 1, fold::DEFAULT_MAX_LINE, 0);
        let fresh = fresh[0].as_ref().unwrap();
        let big_tokens: Vec<u64> = (0..3000u64).map(|i| i % 5).collect();
        let big = session(dir.path(), "big", &big_tokens);
        let mut f = fs::OpenOptions::new().append(true).open(&big).unwrap();
        f.write_all(br#"{"timestamp":"2026-01-11T10:00:00Z","tok"#)
            .unwrap();
        drop(f);
        assert!(fs::metadata(&big).unwrap().len() > 2 * fold::READ_CHUNK as u64);
        for threads in [1, 2] {
            let out = fold_sessions(&[&big, &small, &big, &small], threads, 1 << 20, 0);
            let b = out[0].as_ref().unwrap();
            assert_eq!((b.tokens, b.entries, b.torn_tail), (6000, 3000, true));
            for o in [&out[1], &out[3]] {
                let s = o.as_ref().unwrap();
                assert_eq!((s.tokens, s.entries, s.lines), (9, 2, fresh.lines));
                assert_eq!((s.torn_tail, s.malformed), (false, fresh.malformed));
            }
        }
    }

    #[test]
    fn a_missing_log_folds_to_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = fold_session(&dir.path().join("none/execution.jsonl"), 1024, 0).unwrap();
        assert_eq!((out.entries, out.status.as_str()), (0, "waiting"));
    }

    #[test]
    fn an_unreadable_session_says_why_and_the_others_are_folded() {
        let dir = tempfile::tempdir().unwrap();
        let good = session(dir.path(), "good", &[7]);
        let fifo_dir = dir.path().join("fifo");
        fs::create_dir(&fifo_dir).unwrap();
        let fifo = fifo_dir.join("execution.jsonl");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let dir_log = dir.path().join("dir/execution.jsonl");
        fs::create_dir_all(&dir_log).unwrap();
        let link_dir = dir.path().join("link");
        fs::create_dir(&link_dir).unwrap();
        let link = link_dir.join("execution.jsonl");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let logs = vec![fifo.clone(), good, dir_log.clone(), link.clone()];
        let out = fold_sessions(&logs, 2, fold::DEFAULT_MAX_LINE, 0);
        assert_eq!(tokens(&out[1]), 7);
        for (o, path, what) in [
            (&out[0], &fifo, "a FIFO"),
            (&out[2], &dir_log, "a directory"),
            (&out[3], &link, "a symbolic link"),
        ] {
            let e = o.as_ref().expect_err("unreadable");
            assert!(
                e.starts_with(&format!("{}: not a regular file", path.display())),
                "{e}"
            );
            assert!(e.contains(what) && !e.contains('\n'), "{e}");
        }
    }

    /// A ledger of one run (seq 0..=2, 5 tokens) written from exactly `files`.
    fn ledger_of(files: &[LogFile]) -> String {
        let files: Vec<String> = files
            .iter()
            .map(|f| {
                format!(
                    r#"{{"name":"{}","size":{},"mtime_ns":{}}}"#,
                    f.name, f.size, f.mtime_ns
                )
            })
            .collect();
        format!(
            concat!(
                r#"{{"ledger_version":1,"last_seq":2,"total_used":5,"events":3,"#,
                r#""missing_events":0,"component_totals":{{"reasoning":{{"tokens":5,"operations":1}}}},"model_totals":{{}},"#,
                r#""log_files":[{}],"runs":[{{"run":1,"status":"complete","tokens_used":5,"#,
                r#""events":3,"first_seq":0,"last_seq":2,"loops":[],"component_stats":{{"reasoning":"#,
                r#"{{"tokens":5,"operations":1,"errors":0,"retries":0}}}}}}]}}"#
            ),
            files.join(",")
        )
    }

    #[test]
    fn a_history_folds_the_log_only_when_the_ledger_does_not_stand_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = session(dir.path(), "h", &[5]);
        let d = log.parent().unwrap();
        fs::write(d.join(LEDGER_FILE), ledger_of(&log_files(&log))).unwrap();
        let none = session(dir.path(), "none", &[3]);
        let bad = session(dir.path(), "bad", &[4]);
        fs::write(bad.parent().unwrap().join(LEDGER_FILE), "{").unwrap();
        for threads in [1, 2] {
            let out = read_histories(&[&log, &none, &bad], threads, fold::DEFAULT_MAX_LINE, 0);
            let current = out[0].as_ref().unwrap();
            assert!(current.fold.is_none() && current.ledger.is_some());
            let plain = out[1].as_ref().unwrap();
            assert_eq!(plain.fold.as_ref().unwrap().tokens, 3);
            assert!(plain.ledger.is_none() && plain.problem.is_none());
            let broken = out[2].as_ref().unwrap();
            assert_eq!(broken.fold.as_ref().unwrap().tokens, 4);
            assert!(broken.problem.as_deref().unwrap().contains("is not JSON"));
        }
        // The log moved on (a new run appended): the ledger and the fold both.
        let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(event(3, "step_complete", 7).as_bytes())
            .unwrap();
        drop(f);
        let out = read_histories(&[&log], 1, fold::DEFAULT_MAX_LINE, 0);
        let moved = out[0].as_ref().unwrap();
        assert_eq!(moved.fold.as_ref().unwrap().tokens, 12);
        assert_eq!(moved.ledger.as_ref().unwrap().total_used, 5);
    }

    #[test]
    fn log_files_list_segments_oldest_first_then_the_live_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = session(dir.path(), "r", &[1]);
        let d = log.parent().unwrap();
        fs::write(d.join("execution.jsonl.1"), "ab").unwrap();
        fs::write(d.join("execution.jsonl.2"), "abc").unwrap();
        let files = log_files(&log);
        let got: Vec<(&str, u64)> = files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        let live = fs::metadata(&log).unwrap().len();
        assert_eq!(
            got,
            [
                ("execution.jsonl.2", 3),
                ("execution.jsonl.1", 2),
                ("execution.jsonl", live)
            ]
        );
        assert!(files.iter().all(|f| f.mtime_ns > 1_000_000_000_000_000_000));
        assert!(log_files(&dir.path().join("none/execution.jsonl")).is_empty());
    }

    #[test]
    fn a_lock_is_held_only_while_a_process_holds_it() {
        use std::os::unix::io::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        assert!(!locked(&path)); // no lock file: nobody
        let f = File::create(&path).unwrap();
        assert!(!locked(&path));
        // SAFETY: `f` is open.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        assert!(locked(&path));
        drop(f);
        assert!(!locked(&path)); // the holder is gone
                                 // A lock that cannot be tried counts as held (never a live run shown dead).
        assert!(locked(&path.join("under-a-file")));
    }

    #[test]
    fn a_reason_has_no_os_error_suffix() {
        let e = io::Error::from_raw_os_error(libc::EACCES);
        let r = reason(Path::new("/x/execution.jsonl"), &e);
        assert_eq!(r, "/x/execution.jsonl: Permission denied");
    }
}
