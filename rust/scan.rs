//! A forward-only index of one line's bytes, 64 at a time (issue 9, "the fold").
//!
//! Each 64-byte block is classified once, with SIMD where the CPU has it: where
//! its quotes are, and whether it holds a backslash, a control byte or a
//! non-ASCII byte. The parser's fast path then finds string ends with a bit
//! scan instead of `memchr` per field plus a byte-by-byte check, and skips
//! UTF-8 validation on ASCII lines. Lines with a backslash or a control byte
//! are left to the general parser (they need decoding, or are invalid).

/// What the blocks indexed so far hold.
#[derive(Clone, Copy, Default)]
pub struct Seen {
    /// A backslash or a byte below 0x20.
    pub unusual: bool,
    /// A byte of 0x80 or above (the line needs UTF-8 validation).
    pub non_ascii: bool,
}

/// One block's classification: bit `i` of `quotes` stands for byte `i`;
/// `unusual` and `non_ascii` are non-zero when the block holds such a byte.
#[derive(Clone, Copy, Default)]
struct Block {
    quotes: u64,
    unusual: u64,
    non_ascii: u64,
}

/// Blocks classified in one go: a window of 1 KiB, which holds a whole line
/// of sigil's usual size (longer lines slide it forward).
const WINDOW: usize = 16;

pub struct LineIndex<'a> {
    line: &'a [u8],
    /// Quote masks of blocks `base..base + WINDOW` (zero past the line).
    quotes: [u64; WINDOW],
    base: usize,
    /// Blocks classified so far (all of those before `base + WINDOW`).
    done: usize,
    pub seen: Seen,
}

impl<'a> LineIndex<'a> {
    pub fn new(line: &'a [u8]) -> Self {
        let mut ix = LineIndex {
            line,
            quotes: [0; WINDOW],
            base: 0,
            done: 0,
            seen: Seen::default(),
        };
        ix.fill(0);
        ix
    }

    fn blocks(&self) -> usize {
        self.line.len().div_ceil(64)
    }

    /// Classify the window of blocks starting at `base`, with the widest SIMD
    /// this CPU has (chosen at run time; SSE2 is part of x86_64).
    fn fill(&mut self, base: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx2() {
                // SAFETY: the CPU has AVX2 (checked at run time just above).
                unsafe { self.fill_avx2(base) };
            } else {
                self.fill_with(base, x86::classify_sse2);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.fill_with(base, |b: &[u8; 64]| classify_portable(b));
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fill_avx2(&mut self, base: usize) {
        // SAFETY (of the call inside): the caller checked AVX2; inlined here,
        // where the feature is enabled.
        self.fill_with(base, |b: &[u8; 64]| unsafe { x86::classify_avx2(b) });
    }

    #[inline(always)]
    fn fill_with(&mut self, base: usize, classify: impl Fn(&[u8; 64]) -> Block) {
        let len = self.line.len();
        let end = self.blocks().min(base + WINDOW);
        self.base = base;
        self.quotes = [0; WINDOW];
        for block in base..end {
            let start = block * 64;
            let b = if let Some(full) = self.line.get(start..start + 64) {
                classify(full.try_into().unwrap_or(&[b' '; 64]))
            } else if len >= 64 {
                // The last, partial block: classify the line's last 64 bytes
                // and drop the quotes of the bytes before the block. (Their
                // unusual and non-ASCII bytes were counted already.)
                let tail = &self.line[len - 64..];
                let b = classify(tail.try_into().unwrap_or(&[b' '; 64]));
                Block {
                    quotes: b.quotes >> (64 - (len - start)),
                    ..b
                }
            } else {
                // A line shorter than a block, padded with spaces (a plain byte).
                let mut buf = [b' '; 64];
                buf[..len].copy_from_slice(self.line);
                classify(&buf)
            };
            self.seen.unusual |= b.unusual != 0;
            self.seen.non_ascii |= b.non_ascii != 0;
            self.quotes[block - base] = b.quotes;
        }
        self.done = self.done.max(end);
        if self.seen.unusual {
            // The fast path is over: hide every quote from `next_quote`.
            self.quotes = [0; WINDOW];
            self.done = self.blocks();
        }
    }

    /// The first quote at or after `from`. None when there is none, or when
    /// the line holds an unusual byte in a block classified so far.
    #[inline]
    pub fn next_quote(&mut self, from: usize) -> Option<usize> {
        let mut block = from / 64;
        let mut shift = from % 64;
        loop {
            let i = block.wrapping_sub(self.base);
            if i >= WINDOW {
                if block < self.base || block >= self.blocks() || self.seen.unusual {
                    // Behind the window (callers go forward) or past the end.
                    return None;
                }
                self.fill(block);
                continue;
            }
            let bits = self.quotes[i] >> shift;
            if bits != 0 {
                return Some(block * 64 + shift + bits.trailing_zeros() as usize);
            }
            if block + 1 >= self.blocks() {
                return None;
            }
            block += 1;
            shift = 0;
        }
    }

    /// Classify the rest of the line; the final `seen`.
    pub fn finish(&mut self) -> Seen {
        while self.done < self.blocks() && !self.seen.unusual {
            self.fill(self.done);
        }
        self.seen
    }
}

/// Byte by byte: the reference the SIMD versions are tested against, the
/// classifier on other CPUs, and the SIMD versions' rare path.
fn classify_portable(block: &[u8; 64]) -> Block {
    let mut b = Block::default();
    for (i, &c) in block.iter().enumerate() {
        let bit = 1u64 << i;
        if c == b'"' {
            b.quotes |= bit;
        }
        if c == b'\\' || c < 0x20 {
            b.unusual |= bit;
        }
        if c >= 0x80 {
            b.non_ascii |= bit;
        }
    }
    b
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Block;
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    /// Whether the CPU has AVX2, detected once (0: not yet, 1: no, 2: yes).
    #[inline]
    pub fn has_avx2() -> bool {
        static HAS: AtomicU8 = AtomicU8::new(0);
        match HAS.load(Ordering::Relaxed) {
            0 => {
                let yes = std::arch::is_x86_feature_detected!("avx2");
                HAS.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
            v => v == 2,
        }
    }

    /// The SSE2 classifier with 32-byte vectors.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn classify_avx2(block: &[u8; 64]) -> Block {
        let quote = _mm256_set1_epi8(b'"' as i8);
        let backslash = _mm256_set1_epi8(b'\\' as i8);
        let space = _mm256_set1_epi8(0x20);
        // SAFETY: two unaligned 32-byte reads within the 64-byte array.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(block.as_ptr() as *const __m256i),
                _mm256_loadu_si256(block.as_ptr().add(32) as *const __m256i),
            )
        };
        let q_lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(lo, quote)) as u32 as u64;
        let q_hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(hi, quote)) as u32 as u64;
        let special =
            |v| _mm256_or_si256(_mm256_cmpgt_epi8(space, v), _mm256_cmpeq_epi8(v, backslash));
        let quotes = q_lo | (q_hi << 32);
        if _mm256_movemask_epi8(_mm256_or_si256(special(lo), special(hi))) == 0 {
            return Block {
                quotes,
                unusual: 0,
                non_ascii: 0,
            };
        }
        Block {
            quotes,
            ..super::classify_portable(block)
        }
    }

    /// SSE2 is part of x86_64: always available.
    #[inline]
    pub fn classify_sse2(block: &[u8; 64]) -> Block {
        // SAFETY: SSE2 is in the x86_64 baseline; the loads are unaligned
        // reads of 16 bytes within the 64-byte array.
        unsafe {
            let quote = _mm_set1_epi8(b'"' as i8);
            let backslash = _mm_set1_epi8(b'\\' as i8);
            let space = _mm_set1_epi8(0x20);
            let mut quotes = 0u64;
            let mut special = _mm_setzero_si128();
            for i in 0..4 {
                let v = _mm_loadu_si128(block.as_ptr().add(i * 16) as *const __m128i);
                let q = _mm_movemask_epi8(_mm_cmpeq_epi8(v, quote)) as u16 as u64;
                quotes |= q << (i * 16);
                // Signed v < 0x20: a control byte, or 0x80 and above (negative).
                let low_or_high = _mm_cmpgt_epi8(space, v);
                let bs = _mm_cmpeq_epi8(v, backslash);
                special = _mm_or_si128(special, _mm_or_si128(low_or_high, bs));
            }
            if _mm_movemask_epi8(special) == 0 {
                // The common block: printable ASCII without a backslash.
                return Block {
                    quotes,
                    unusual: 0,
                    non_ascii: 0,
                };
            }
            // Rare: tell control bytes and backslashes from non-ASCII ones.
            let b = super::classify_portable(block);
            Block { quotes, ..b }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: Block, b: Block) -> bool {
        (a.quotes, a.unusual != 0, a.non_ascii != 0) == (b.quotes, b.unusual != 0, b.non_ascii != 0)
    }

    #[test]
    fn simd_classifiers_equal_the_portable_one() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..5000 {
            let mut block = [0u8; 64];
            for byte in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly the interesting bytes, sometimes any byte.
                *byte = if round % 3 == 0 {
                    x as u8
                } else {
                    b"\"\\\x00\x1f\x20a{}\x7f\x80\xff\xc3"[(x % 12) as usize]
                };
            }
            let want = classify_portable(&block);
            #[cfg(target_arch = "x86_64")]
            {
                assert!(same(x86::classify_sse2(&block), want), "{block:?}");
                if x86::has_avx2() {
                    // SAFETY: the CPU has AVX2.
                    let got = unsafe { x86::classify_avx2(&block) };
                    assert!(same(got, want), "{block:?}");
                }
            }
        }
    }

    #[test]
    fn finds_quotes_across_blocks_and_stops_at_unusual_bytes() {
        let mut line = vec![b'a'; 200];
        for at in [0, 63, 64, 130, 199] {
            line[at] = b'"';
        }
        let mut ix = LineIndex::new(&line);
        let mut got = vec![];
        let mut from = 0;
        while let Some(q) = ix.next_quote(from) {
            got.push(q);
            from = q + 1;
        }
        assert_eq!(got, vec![0, 63, 64, 130, 199]);
        let s = ix.finish();
        assert!(!s.unusual && !s.non_ascii);

        line[150] = b'\\';
        let mut ix = LineIndex::new(&line);
        assert_eq!(ix.next_quote(0), None); // the line holds a backslash
                                            // Lines longer than the window slide it forward.
        let mut long = vec![b'a'; 5000];
        for at in [3, 1023, 1024, 2049, 4999] {
            long[at] = b'"';
        }
        let mut ix = LineIndex::new(&long);
        let mut got = vec![];
        let mut from = 0;
        while let Some(q) = ix.next_quote(from) {
            got.push(q);
            from = q + 1;
        }
        assert_eq!(got, vec![3, 1023, 1024, 2049, 4999]);
        long[4500] = 0x01;
        let mut ix = LineIndex::new(&long);
        assert_eq!(ix.next_quote(1025), Some(2049));
        assert!(ix.finish().unusual);
        line[150] = 0xc3;
        let mut ix = LineIndex::new(&line);
        assert_eq!(ix.next_quote(131), Some(199));
        assert!(ix.finish().non_ascii);
        assert!(LineIndex::new(b"").next_quote(0).is_none());
    }
}
