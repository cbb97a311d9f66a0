//! Indexes of bytes, 64 at a time (issue 9, "the fold").
//!
//! Each 64-byte chunk is classified once, with SIMD where the CPU has it
//! (AVX2 chosen at run time, SSE2 otherwise on x86_64, a portable loop
//! elsewhere): where its quotes (and newlines) are, and whether it holds a
//! backslash, a control byte or a non-ASCII byte. The parser's fast path then
//! finds string ends with a bit scan instead of `memchr` per field plus a
//! byte-by-byte check, and skips UTF-8 validation on ASCII lines. Lines with a
//! backslash or a control byte are left to the general parser (they need
//! decoding, or are invalid).
//!
//! [`BlockIndex`] classifies a whole read buffer of the fold once (its
//! newlines split the lines); [`LineIndex`] classifies one line on its own (a
//! line cut across two reads, or a line parsed alone). Both answer the
//! parser through [`Quotes`].

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

/// How the parser's fast path finds string ends in a line: the first quote at
/// or after a position of the line, and what the line holds.
pub trait Quotes {
    /// The first quote at or after `from` (a position in the line), None when
    /// there is none in the line or the line holds an unusual byte.
    fn next_quote(&mut self, from: usize) -> Option<usize>;
    /// What the whole line holds.
    fn finish(&mut self) -> Seen;
}

impl Quotes for LineIndex<'_> {
    #[inline]
    fn next_quote(&mut self, from: usize) -> Option<usize> {
        LineIndex::next_quote(self, from)
    }
    #[inline]
    fn finish(&mut self) -> Seen {
        LineIndex::finish(self)
    }
}

/// A whole read buffer classified once, 64 bytes at a time (issue 9, "the
/// fold"): bitmaps of its quotes, newlines, unusual bytes (a backslash, or a
/// control byte other than the newline) and non-ASCII bytes. The fold splits
/// lines at the newline bits and parses each line against the quote bits,
/// instead of a `memchr` per line plus a classification per line.
#[derive(Default)]
pub struct BlockIndex {
    quotes: Vec<u64>,
    newlines: Vec<u64>,
    unusual: Vec<u64>,
    high: Vec<u64>,
    len: usize,
    /// Whether any word of `unusual` / `high` is non-zero: most buffers hold
    /// neither, and their lines then skip both checks.
    any_unusual: bool,
    any_high: bool,
}

/// One 64-byte chunk's masks: quotes, newlines, unusual bytes, non-ASCII bytes.
type Masks = [u64; 4];

impl BlockIndex {
    pub fn new() -> Self {
        BlockIndex::default()
    }

    /// Classify `data` (replacing what was indexed before); buffers are reused.
    pub fn index(&mut self, data: &[u8]) {
        let words = data.len().div_ceil(64);
        self.len = data.len();
        // Every word is written below: only the length changes.
        for v in [
            &mut self.quotes,
            &mut self.newlines,
            &mut self.unusual,
            &mut self.high,
        ] {
            v.resize(words, 0);
        }
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx2() {
                // SAFETY: the CPU has AVX2 (checked at run time just above).
                unsafe { self.index_avx2(data) };
            } else {
                self.index_with(data, x86::masks_sse2);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.index_with(data, masks_portable);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn index_avx2(&mut self, data: &[u8]) {
        let words = data.len() / 64;
        let (q, n, u, h) = (
            &mut self.quotes[..words],
            &mut self.newlines[..words],
            &mut self.unusual[..words],
            &mut self.high[..words],
        );
        let (mut any_u, mut any_h) = (0, 0);
        for w in 0..words {
            // SAFETY: the CPU has AVX2 (the caller checked); chunk `w` lies
            // within `data` (w < data.len() / 64).
            let m = unsafe { x86::masks_avx2_usual_at(data.as_ptr().add(w * 64)) };
            q[w] = m[0];
            n[w] = m[1];
            u[w] = m[2];
            h[w] = m[3];
            any_u |= m[2];
            any_h |= m[3];
        }
        (self.any_unusual, self.any_high) = (any_u != 0, any_h != 0);
        self.tail(data, words, |b: &[u8; 64]| unsafe { x86::masks_avx2(b) });
    }

    #[inline(always)]
    fn index_with(&mut self, data: &[u8], masks: impl Fn(&[u8; 64]) -> Masks) {
        let mut w = 0;
        let (mut any_u, mut any_h) = (0, 0);
        for chunk in data.chunks_exact(64) {
            let m = masks(chunk.try_into().unwrap_or(&[b' '; 64]));
            self.quotes[w] = m[0];
            self.newlines[w] = m[1];
            self.unusual[w] = m[2];
            self.high[w] = m[3];
            any_u |= m[2];
            any_h |= m[3];
            w += 1;
        }
        (self.any_unusual, self.any_high) = (any_u != 0, any_h != 0);
        self.tail(data, w, masks);
    }

    /// The last, partial chunk (from word `w`), padded with spaces (a plain byte).
    #[inline(always)]
    fn tail(&mut self, data: &[u8], w: usize, masks: impl Fn(&[u8; 64]) -> Masks) {
        let rest = &data[w * 64..];
        if !rest.is_empty() {
            let mut buf = [b' '; 64];
            buf[..rest.len()].copy_from_slice(rest);
            let m = masks(&buf);
            self.quotes[w] = m[0];
            self.newlines[w] = m[1];
            self.unusual[w] = m[2];
            self.high[w] = m[3];
            self.any_unusual |= m[2] != 0;
            self.any_high |= m[3] != 0;
        }
    }

    /// Positions of the newlines, in order.
    pub fn newlines(&self) -> impl Iterator<Item = usize> + '_ {
        self.newlines.iter().enumerate().flat_map(|(w, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let i = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    w * 64 + i
                })
            })
        })
    }

    /// The line at `start..start + len` of the indexed data, or None when it
    /// holds an unusual byte (the general parser decides such lines).
    #[inline(always)]
    pub fn line(&self, start: usize, len: usize) -> Option<BlockLine<'_>> {
        let end = start + len;
        if end > self.len || (self.any_unusual && any_in(&self.unusual, start, end)) {
            return None;
        }
        Some(BlockLine {
            quotes: &self.quotes,
            base: start,
            end,
            non_ascii: self.any_high && any_in(&self.high, start, end),
        })
    }
}

/// Whether any bit of `bits` in `start..end` is set.
#[inline(always)]
fn any_in(bits: &[u64], start: usize, end: usize) -> bool {
    if start >= end {
        return false;
    }
    let (first, last) = (start / 64, (end - 1) / 64);
    let head = !0u64 << (start % 64);
    let tail = !0u64 >> (63 - (end - 1) % 64);
    if first == last {
        return bits[first] & head & tail != 0;
    }
    bits[first] & head != 0
        || bits[last] & tail != 0
        || bits[first + 1..last].iter().any(|&w| w != 0)
}

/// A line of a [`BlockIndex`]: positions are the line's own (0 at its start).
pub struct BlockLine<'a> {
    quotes: &'a [u64],
    base: usize,
    end: usize,
    non_ascii: bool,
}

impl Quotes for BlockLine<'_> {
    #[inline(always)]
    fn next_quote(&mut self, from: usize) -> Option<usize> {
        let pos = self.base + from;
        if pos >= self.end {
            return None;
        }
        let mut w = pos / 64;
        let mut bits = self.quotes[w] >> (pos % 64) << (pos % 64);
        let last = (self.end - 1) / 64;
        loop {
            if bits != 0 {
                let q = w * 64 + bits.trailing_zeros() as usize;
                return (q < self.end).then(|| q - self.base);
            }
            if w >= last {
                return None;
            }
            w += 1;
            bits = self.quotes[w];
        }
    }

    #[inline]
    fn finish(&mut self) -> Seen {
        Seen {
            unusual: false,
            non_ascii: self.non_ascii,
        }
    }
}

/// The four masks of a chunk, byte by byte (the reference for the SIMD ones).
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
fn masks_portable(block: &[u8; 64]) -> Masks {
    let mut m = [0u64; 4];
    for (i, &c) in block.iter().enumerate() {
        let bit = 1u64 << i;
        if c == b'"' {
            m[0] |= bit;
        }
        if c == b'\n' {
            m[1] |= bit;
        } else if c == b'\\' || c < 0x20 {
            m[2] |= bit;
        }
        if c >= 0x80 {
            m[3] |= bit;
        }
    }
    m
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

    /// One 32-byte half's masks (see [`super::masks_portable`]), as a macro
    /// so that it is inlined where AVX2 is enabled.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn masks_avx2(block: &[u8; 64]) -> super::Masks {
        // SAFETY: the 64 bytes of the array are readable.
        unsafe { masks_avx2_at(block.as_ptr()) }
    }

    /// The masks of the 64 bytes at `p`.
    ///
    /// # Safety
    /// The CPU has AVX2 and `p..p + 64` is readable.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn masks_avx2_at(p: *const u8) -> super::Masks {
        // SAFETY: two unaligned 32-byte reads within the 64 readable bytes.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(32) as *const __m256i),
            )
        };
        let m = |x| u64::from(_mm256_movemask_epi8(x) as u32);
        let both = |f: &dyn Fn(__m256i) -> __m256i| m(f(lo)) | m(f(hi)) << 32;
        let quotes = both(&|v| _mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'"' as i8)));
        let newlines = both(&|v| _mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'\n' as i8)));
        // Signed v < 0x20: a control byte, or 0x80 and above (negative); or
        // a backslash.
        let special = both(&|v| {
            _mm256_or_si256(
                _mm256_cmpgt_epi8(_mm256_set1_epi8(0x20), v),
                _mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'\\' as i8)),
            )
        });
        if special & !newlines == 0 {
            // The common chunk: printable ASCII and newlines.
            return [quotes, newlines, 0, 0];
        }
        let high = m(lo) | m(hi) << 32;
        [quotes, newlines, special & !high & !newlines, high]
    }

    /// [`masks_avx2_at`], with the usual chunk (printable ASCII and
    /// newlines) told by one vector test: no mask of its unusual and
    /// non-ASCII bytes is built (they are zero).
    ///
    /// # Safety
    /// The CPU has AVX2 and `p..p + 64` is readable.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn masks_avx2_usual_at(p: *const u8) -> super::Masks {
        // SAFETY: two unaligned 32-byte reads within the 64 readable bytes.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(32) as *const __m256i),
            )
        };
        let m = |x| u64::from(_mm256_movemask_epi8(x) as u32);
        let (q_lo, q_hi) = (
            _mm256_cmpeq_epi8(lo, _mm256_set1_epi8(b'"' as i8)),
            _mm256_cmpeq_epi8(hi, _mm256_set1_epi8(b'"' as i8)),
        );
        let (n_lo, n_hi) = (
            _mm256_cmpeq_epi8(lo, _mm256_set1_epi8(b'\n' as i8)),
            _mm256_cmpeq_epi8(hi, _mm256_set1_epi8(b'\n' as i8)),
        );
        // Signed v < 0x20 (a control byte, or 0x80 and above) or a
        // backslash, other than a newline.
        let special = |v, n| {
            _mm256_andnot_si256(
                n,
                _mm256_or_si256(
                    _mm256_cmpgt_epi8(_mm256_set1_epi8(0x20), v),
                    _mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'\\' as i8)),
                ),
            )
        };
        let any = _mm256_or_si256(special(lo, n_lo), special(hi, n_hi));
        if _mm256_testz_si256(any, any) == 1 {
            return [m(q_lo) | m(q_hi) << 32, m(n_lo) | m(n_hi) << 32, 0, 0];
        }
        // SAFETY: as above (the caller's promise).
        unsafe { masks_avx2_at(p) }
    }

    /// SSE2 is part of x86_64: always available.
    #[inline]
    pub fn masks_sse2(block: &[u8; 64]) -> super::Masks {
        let mut out = [0u64; 4];
        for i in 0..4 {
            // SAFETY: SSE2 is in the x86_64 baseline; an unaligned 16-byte
            // read within the 64-byte array.
            let [q, n, b, low_or_high, h] = unsafe {
                let v = _mm_loadu_si128(block.as_ptr().add(i * 16) as *const __m128i);
                let m = |x| _mm_movemask_epi8(x) as u16 as u64;
                [
                    m(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8))),
                    m(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8))),
                    m(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8))),
                    m(_mm_cmpgt_epi8(_mm_set1_epi8(0x20), v)),
                    m(v),
                ]
            };
            let shift = i * 16;
            out[0] |= q << shift;
            out[1] |= n << shift;
            out[2] |= ((low_or_high & !h & !n) | b) << shift;
            out[3] |= h << shift;
        }
        out
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

    /// 5,000 pseudo-random 64-byte blocks (xorshift from `seed`): mostly the
    /// bytes of `interesting`, every third block any byte at all.
    fn random_blocks(seed: u64, interesting: &[u8]) -> impl Iterator<Item = [u8; 64]> + '_ {
        let mut x = seed;
        (0..5000).map(move |round| {
            let mut block = [0u8; 64];
            for byte in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = if round % 3 == 0 {
                    x as u8
                } else {
                    interesting[(x % interesting.len() as u64) as usize]
                };
            }
            block
        })
    }

    #[test]
    fn simd_classifiers_equal_the_portable_one() {
        for block in random_blocks(
            0x9e37_79b9_7f4a_7c15,
            b"\"\\\x00\x1f\x20a{}\x7f\x80\xff\xc3",
        ) {
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

    #[test]
    fn block_masks_equal_the_portable_ones() {
        let interesting = b"\"\\\x00\n\r\x1f\x20a{}\x7f\x80\xff\xc3";
        // Also plain chunks (printable ASCII and newlines: the usual ones),
        // some with one byte of another kind.
        let plain = random_blocks(0x0bad_cafe, b"\"\n a{}:,0~\x7f")
            .enumerate()
            .map(|(i, mut b)| {
                if i % 2 == 0 {
                    let odd = [b'\\', 0, b'\r', 0x1f, 0x80, 0xff, 0xc3, b'\t'];
                    b[(i * 7) % 64] = odd[i % odd.len()];
                }
                b
            });
        for block in random_blocks(0x1234_5678_9abc_def1, interesting).chain(plain) {
            let want = masks_portable(&block);
            #[cfg(target_arch = "x86_64")]
            {
                assert_eq!(x86::masks_sse2(&block), want, "{block:?}");
                if x86::has_avx2() {
                    // SAFETY: the CPU has AVX2.
                    assert_eq!(unsafe { x86::masks_avx2(&block) }, want, "{block:?}");
                    // SAFETY: the CPU has AVX2; the block's 64 bytes are readable.
                    let usual = unsafe { x86::masks_avx2_usual_at(block.as_ptr()) };
                    assert_eq!(usual, want, "{block:?}");
                }
            }
        }
    }

    #[test]
    fn block_lines_see_only_their_own_bytes() {
        // Lines of every length around the 64-byte edges, each between
        // neighbours full of quotes, backslashes and non-ASCII bytes.
        for len in 0..200 {
            for start in [0usize, 1, 63, 64, 65, 127] {
                let mut data = vec![b'\\'; start];
                data.extend((0..len).map(|i| if i % 7 == 3 { b'"' } else { b'a' }));
                data.extend_from_slice(b"\"\\\xc3\xa9\"\n\"");
                let mut ix = BlockIndex::new();
                ix.index(&data);
                let mut line = ix.line(start, len).expect("a plain line");
                let mut got = vec![];
                let mut from = 0;
                while let Some(q) = line.next_quote(from) {
                    got.push(q);
                    from = q + 1;
                }
                let want: Vec<usize> = (0..len).filter(|i| i % 7 == 3).collect();
                assert_eq!(got, want, "len {len} start {start}");
                let seen = line.finish();
                assert!(!seen.unusual && !seen.non_ascii);
                // The line with the neighbour's bytes is another matter.
                assert!(ix.line(start, len + 2).is_none());
                let mut with_e = ix.line(start, len + 1).expect("no backslash");
                assert!(!with_e.finish().non_ascii);
                if start > 0 {
                    assert!(ix.line(start - 1, len + 1).is_none());
                }
                let nl: Vec<usize> = ix.newlines().collect();
                assert_eq!(nl, vec![start + len + 5]);
            }
        }
        let mut ix = BlockIndex::new();
        ix.index(b"");
        assert_eq!(ix.newlines().count(), 0);
        assert!(ix.line(0, 0).is_some());
        assert!(ix.line(0, 1).is_none());
        ix.index("a\u{e9}\"b".as_bytes());
        let mut l = ix.line(0, 5).unwrap();
        assert_eq!(l.next_quote(0), Some(3));
        assert!(l.finish().non_ascii);
    }
}
