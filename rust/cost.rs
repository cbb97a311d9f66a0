//! The cost of a session's model calls (issue 12, Cost), summed exactly.
//!
//! Each event that a writer priced carries `metadata.cost_usd`: a JSON number
//! of US dollars (the writers round it to the nano-dollar,
//! `sigil.telemetry.pricing`). The fold reads the number's text, never a
//! double, into whole nano-dollars, and sums integers: the total does not
//! depend on the order split folds merge in, and is the decimal sum of what
//! the events say.
//!
//! Rules (the reference is `tests/session_reference.py`):
//! - `cost_usd` counts when it is a JSON number >= 0 (`-0` is 0); its value is
//!   truncated to whole nano-dollars and saturates at `u64::MAX`; any other
//!   value (a string, a negative number) is no cost;
//! - an event with no cost that carries tokens and a `model` string is
//!   unpriced: its tokens count in `unpriced_tokens` and its model in
//!   `unpriced_models` (the first [`MAX_UNPRICED_MODELS`] names, in file order);
//! - an event with neither (an offline step: no model) is neither.

/// Distinct unpriced model names kept per component (the first ones seen).
pub const MAX_UNPRICED_MODELS: usize = 8;

/// The cost of the events of one component (of a session or of a run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cost {
    /// Nano-dollars over the priced events.
    pub nanousd: u64,
    /// Events that carried a cost.
    pub priced: u64,
    /// Tokens of events with a model and no cost.
    pub unpriced_tokens: u64,
    /// The models of those events, at most [`MAX_UNPRICED_MODELS`].
    pub unpriced_models: Vec<String>,
}

impl Cost {
    /// Count one event: its cost in nano-dollars if it had one, else its
    /// `tokens` as unpriced when `model` (the event's model, decoded) is known.
    #[inline(always)]
    pub fn observe(&mut self, cost: Option<u64>, tokens: u64, model: Option<&str>) {
        match cost {
            Some(n) => {
                self.nanousd = self.nanousd.saturating_add(n);
                self.priced = self.priced.saturating_add(1);
            }
            None => {
                if let (true, Some(m)) = (tokens > 0, model) {
                    self.unpriced_tokens = self.unpriced_tokens.saturating_add(tokens);
                    if self.unpriced_models.last().map(String::as_str) != Some(m) {
                        self.note_model(m);
                    }
                }
            }
        }
    }

    /// A model not the last one noted (rare: kept out of line).
    #[cold]
    #[inline(never)]
    fn note_model(&mut self, m: &str) {
        if self.unpriced_models.len() < MAX_UNPRICED_MODELS
            && !self.unpriced_models.iter().any(|x| x == m)
        {
            self.unpriced_models.push(m.to_string());
        }
    }

    /// Add `o`, the cost of events later in the file.
    pub fn add(&mut self, o: &Cost) {
        self.nanousd = self.nanousd.saturating_add(o.nanousd);
        self.priced = self.priced.saturating_add(o.priced);
        self.unpriced_tokens = self.unpriced_tokens.saturating_add(o.unpriced_tokens);
        for m in &o.unpriced_models {
            self.note_model(m);
        }
    }
}

/// A JSON number's text (`-?int(.frac)?([eE][+-]?exp)?`) as whole
/// nano-dollars: truncated toward zero, saturating at `u64::MAX`. None for a
/// negative number or text that is not a JSON number.
pub fn nano_usd(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if let Some(n) = plain_nano(b) {
        return Some(n);
    }
    let mut i = 0;
    let negative = b.first() == Some(&b'-');
    if negative {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &b[int_start..i];
    if int_digits.is_empty() || (int_digits.len() > 1 && int_digits[0] == b'0') {
        return None;
    }
    let mut frac_digits: &[u8] = &[];
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = &b[start..i];
        if frac_digits.is_empty() {
            return None;
        }
    }
    let mut exp: i64 = 0;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let exp_negative = match b.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            // Bounded far beyond any digit count a line can hold (1 MiB):
            // past it the value is 0 or saturates all the same.
            exp = (exp * 10 + i64::from(b[i] - b'0')).min(1 << 40);
            i += 1;
        }
        if i == start {
            return None;
        }
        if exp_negative {
            exp = -exp;
        }
    }
    if i != b.len() {
        return None;
    }
    // The digits of the value without its point, leading zeros dropped: the
    // value is digits * 10^(exp - frac_digits.len()).
    let all = || int_digits.iter().chain(frac_digits.iter()).copied();
    let lead = all().take_while(|&d| d == b'0').count();
    let count = int_digits.len() + frac_digits.len() - lead;
    if count == 0 {
        return Some(0); // zero, -0 included
    }
    if negative {
        return None;
    }
    // Nano-dollars: digits * 10^shift.
    let shift = exp - frac_digits.len() as i64 + 9;
    let kept = if shift >= 0 {
        count as i64
    } else {
        count as i64 + shift // the digits left after truncation
    };
    if kept <= 0 {
        return Some(0);
    }
    let width = kept + shift.max(0);
    if width > 20 {
        return Some(u64::MAX); // at least 10^20 > u64::MAX
    }
    let mut value: u128 = 0;
    for d in all().skip(lead).take(kept as usize) {
        value = value * 10 + u128::from(d - b'0');
    }
    for _ in 0..shift.max(0) {
        value *= 10;
    }
    Some(u64::try_from(value).unwrap_or(u64::MAX))
}

/// The writers' usual form, `int(.frac)?` with at most 10 integer digits and
/// 9 decimals, in one pass; None for anything else ([`nano_usd`] reads it).
#[inline]
fn plain_nano(b: &[u8]) -> Option<u64> {
    const SCALE: [u64; 10] = [
        1_000_000_000,
        100_000_000,
        10_000_000,
        1_000_000,
        100_000,
        10_000,
        1_000,
        100,
        10,
        1,
    ];
    let mut i = 0;
    let mut int: u64 = 0;
    while let Some(&d) = b.get(i).filter(|d| d.is_ascii_digit()) {
        if i == 10 {
            return None;
        }
        int = int * 10 + u64::from(d - b'0');
        i += 1;
    }
    if i == 0 || (i > 1 && b[0] == b'0') {
        return None;
    }
    let mut frac: u64 = 0;
    let mut k = 0;
    if i < b.len() {
        if b[i] != b'.' {
            return None;
        }
        i += 1;
        while let Some(&d) = b.get(i).filter(|d| d.is_ascii_digit()) {
            if k == 9 {
                return None;
            }
            frac = frac * 10 + u64::from(d - b'0');
            i += 1;
            k += 1;
        }
        if k == 0 || i != b.len() {
            return None;
        }
    }
    int.checked_mul(1_000_000_000)?.checked_add(frac * SCALE[k])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_exactly_into_nano_dollars() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("-0", Some(0)),
            ("-0.0e5", Some(0)),
            ("0.0005253", Some(525_300)),
            ("5.253e-4", Some(525_300)),
            ("2.4e-06", Some(2_400)),
            ("1", Some(1_000_000_000)),
            ("1E0", Some(1_000_000_000)),
            ("12.5", Some(12_500_000_000)),
            ("0.000000001", Some(1)),
            ("0.0000000019", Some(1)), // truncated
            ("1e-10", Some(0)),
            ("1e-99999999999999999999", Some(0)),
            ("123.456789123", Some(123_456_789_123)),
            ("18446744073.709551615", Some(u64::MAX)),
            ("18446744073.709551616", Some(u64::MAX)),
            ("18446744073.709551614", Some(u64::MAX - 1)),
            ("1e10", Some(10_000_000_000_000_000_000)),
            ("1e11", Some(u64::MAX)),
            ("1e99999999999999999999", Some(u64::MAX)),
            ("0.30000000000000004", Some(300_000_000)),
            ("100e-2", Some(1_000_000_000)),
            ("-1", None),
            ("-0.000000001", None),
            ("01", None),
            ("1.", None),
            (".5", None),
            ("1e", None),
            ("1e+", None),
            ("+1", None),
            ("\"1\"", None),
            ("true", None),
            ("", None),
            ("1 ", None),
            ("NaN", None),
            ("9999999999.999999999", Some(9_999_999_999_999_999_999)),
            ("18446744073", Some(18_446_744_073_000_000_000)),
            ("18446744074", Some(u64::MAX)),
            ("12345678901", Some(12_345_678_901_000_000_000)),
            ("0.1234567891", Some(123_456_789)),
            ("0.", None),
            ("00.5", None),
        ];
        for (text, want) in cases {
            assert_eq!(nano_usd(text), *want, "{text}");
        }
    }

    #[test]
    fn costs_add_in_any_order_to_the_same_total() {
        let events: Vec<(Option<u64>, u64, Option<&str>)> = vec![
            (Some(5), 10, Some("a")),
            (None, 7, Some("b")),
            (None, 0, Some("c")), // no tokens: not unpriced
            (None, 3, None),      // no model: neither
            (Some(u64::MAX), 1, None),
            (None, 2, Some("b")),
            (None, 4, Some("d")),
        ];
        let mut whole = Cost::default();
        for &(c, t, m) in &events {
            whole.observe(c, t, m);
        }
        assert_eq!(whole.nanousd, u64::MAX);
        assert_eq!(whole.priced, 2);
        assert_eq!(whole.unpriced_tokens, 13);
        assert_eq!(whole.unpriced_models, ["b", "d"]);
        for cut in 0..=events.len() {
            let (mut a, mut b) = (Cost::default(), Cost::default());
            for &(c, t, m) in &events[..cut] {
                a.observe(c, t, m);
            }
            for &(c, t, m) in &events[cut..] {
                b.observe(c, t, m);
            }
            a.add(&b);
            assert_eq!(a, whole, "cut at {cut}");
        }
    }

    #[test]
    fn unpriced_models_are_bounded() {
        let mut c = Cost::default();
        for i in 0..100 {
            c.observe(None, 1, Some(&format!("m{i}")));
        }
        assert_eq!(c.unpriced_models.len(), MAX_UNPRICED_MODELS);
        assert_eq!(c.unpriced_models[0], "m0");
        assert_eq!(c.unpriced_tokens, 100);
    }
}
