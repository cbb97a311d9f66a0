//! Times the sanitizer on the bench rows' strings (`benches/bench_sanitizer.py`):
//! `cargo run --release --example sanbench -- [secret|clean] [ROUNDS]`
//! (a profiling aid: `valgrind --tool=callgrind` on it counts instructions per string).
use std::hint::black_box;
use std::time::Instant;

use _native::sanitize::{is_sensitive_key, sanitize};

const SECRET: &[&str] = &[
    "401 from https://admin:s3cr3t-P4ss@api.example.com for key \
     sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789",
    "Authorization: Bearer 0123456789abcdef0123456789abcdef",
];
const CLEAN: &[&str] = &[
    "Reasoning completed",
    "gpt-4o-mini",
    "Acme Corp is a mid-size vendor",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map_or("secret", String::as_str);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let strings = if kind == "clean" { CLEAN } else { SECRET };
    let bytes: usize = strings.iter().map(|s| s.len()).sum();
    let mut changed = 0usize;
    let t = Instant::now();
    for _ in 0..rounds {
        for s in strings {
            changed += usize::from(matches!(sanitize(black_box(s)), std::borrow::Cow::Owned(_)));
        }
        changed += usize::from(is_sensitive_key(black_box("error")));
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{kind}: {} strings changed per round, {:.3} us per round ({bytes} bytes)",
        changed / rounds,
        s / rounds as f64 * 1e6
    );
}
