//! The parser and the fold against a plain `serde_json::Value` reference on
//! arbitrary bytes (after jiter's `crates/fuzz/fuzz_targets/compare_to_serde.rs`).
//! Every line must get the same verdict and the same fields, and the fold's
//! totals must equal the sum over the reference's valid lines.
#![no_main]

use _native::parse::reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|b| *b == b'\n') {
        reference::check_line(line);
    }
    reference::check_fold(data);
});
