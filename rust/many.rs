//! Folding many sessions at once (`sigil sessions`, issue 10 item 8).
//!
//! Each session is folded as `log_parser.snapshot_at_rest` reads it: its
//! rotated segments, oldest first, then the live file, each opened once as a
//! regular file (never through a symlink, never a FIFO) and read to its end,
//! with no tailer and so no inotify watcher. Sessions are spread over a small
//! pool of scoped threads that take the next session from a shared counter;
//! each session is folded on one thread (they are small and many: splitting a
//! file pays only past `fold::PARALLEL_MIN_BYTES`, and one session's files
//! are read in order). A session that cannot be read gives a one-line reason
//! that names the file instead of a fold, and the others are still folded.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::fold::{self, FoldState};
use crate::segments;

/// At most this many threads, whatever the caller asks.
pub const MAX_THREADS: usize = 64;

/// The fold of one session, or why it could not be read (one line naming the file).
pub type Outcome = Result<FoldState, String>;

/// Fold every session in `logs` (each the path of a session's live log,
/// `<session>/execution.jsonl`) on up to `threads` threads (0: the machine's
/// cores, at most 8). Returns one outcome per log, in the same order.
pub fn fold_sessions<P: AsRef<Path> + Sync>(
    logs: &[P],
    threads: usize,
    max_line: usize,
    last_n: usize,
) -> Vec<Outcome> {
    let threads = if threads == 0 {
        fold::fold_threads()
    } else {
        threads
    };
    let threads = threads.clamp(1, MAX_THREADS).min(logs.len().max(1));
    if threads == 1 {
        return logs
            .iter()
            .map(|log| fold_session(log.as_ref(), max_line, last_n))
            .collect();
    }
    let next = AtomicUsize::new(0);
    let mut parts: Vec<Vec<(usize, Outcome)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(log) = logs.get(i) else { break };
                        done.push((i, fold_session(log.as_ref(), max_line, last_n)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let mut out: Vec<Option<Outcome>> = Vec::with_capacity(logs.len());
    out.resize_with(logs.len(), || None);
    for (i, outcome) in parts.drain(..).flatten() {
        out[i] = Some(outcome);
    }
    // A slot left empty means its worker panicked (a bug): say so for that
    // session rather than losing the others.
    out.into_iter()
        .zip(logs)
        .map(|(o, log)| {
            o.unwrap_or_else(|| {
                Err(format!(
                    "{}: internal error while folding (please report it)",
                    log.as_ref().display()
                ))
            })
        })
        .collect()
}

/// Fold one session: its rotated segments, oldest first, then the live log.
/// A file that is missing (no log yet, or a segment archived meanwhile) is
/// skipped, as `log_parser.snapshot_files` skips it.
pub fn fold_session(log: &Path, max_line: usize, last_n: usize) -> Outcome {
    let run = || -> Outcome {
        let mut st = FoldState::new(last_n);
        for segment in segments::rotated_segments(log) {
            fold_file(&mut st, &segment.path, max_line, true)?;
        }
        fold_file(&mut st, log, max_line, false)?;
        Ok(st)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(outcome) => outcome,
        Err(_) => Err(format!(
            "{}: internal error while folding (please report it)",
            log.display()
        )),
    }
}

/// Fold one file of a session into `st` (a segment may be gzip-compressed:
/// its contents, not its name, say so).
fn fold_file(
    st: &mut FoldState,
    path: &Path,
    max_line: usize,
    segment: bool,
) -> Result<(), String> {
    let mut read = || -> io::Result<()> {
        let file = segments::open_regular(path)?;
        if segment && segments::is_gzip(&file)? {
            let mut reader = segments::gzip_reader(&file)?;
            fold::fold_reader(st, &mut reader, 0, max_line)?;
        } else {
            fold::fold_range(st, &file, 0, None, max_line, 1)?;
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

    #[test]
    fn a_reason_has_no_os_error_suffix() {
        let e = io::Error::from_raw_os_error(libc::EACCES);
        let r = reason(Path::new("/x/execution.jsonl"), &e);
        assert_eq!(r, "/x/execution.jsonl: Permission denied");
    }
}
