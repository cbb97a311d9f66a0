//! Times the fold of a file: `cargo run --release --example foldbench -- PATH [THREADS] [ROUNDS]`
//! (a profiling aid: `valgrind --tool=callgrind` on it counts instructions per line).
use std::path::Path;
use std::time::Instant;

use _native::fold::{fold_path_with, FoldState, DEFAULT_MAX_LINE};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = Path::new(args.get(1).map_or("/tmp/s1m.jsonl", String::as_str));
    let threads: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
    let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3);
    for _ in 0..rounds {
        let mut fold = FoldState::new(10);
        let t = Instant::now();
        if let Err(e) = fold_path_with(&mut fold, path, DEFAULT_MAX_LINE, threads) {
            eprintln!("{e}");
            std::process::exit(1);
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{} entries, {} malformed, {} tokens: {:.3} s, {:.2} M entries/s",
            fold.entries,
            fold.malformed,
            fold.tokens,
            s,
            fold.entries as f64 / s / 1e6
        );
    }
}
