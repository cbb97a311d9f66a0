//! Secret scrubbing: the one pattern set of sigil (spec 11.2, issue 9).
//!
//! `python/sigil/telemetry/sanitization.py` documents the rules and calls this
//! module; the writer applies it to an event's message and every metadata
//! string in the pass that serialises the event.
//!
//! A string is first read once by the gate: one Aho-Corasick automaton over the
//! literal prefixes of every rule family plus a byte loop for the shapes that
//! are not literals (digit groups of card numbers, long base64-ish runs).
//! Most strings trigger no family and cost no regex work; the exact rules of a
//! family run only when its gate fired.
//!
//! Rust's `regex` has no lookaround or backreferences; the few Python rules that
//! used them are the same regex without the lookaround, the lookaround checked
//! in code at the match (a rejected start resumes one character later, as a
//! backtracking engine would try it), and the card rule's backreference spelled
//! out as one alternative per separator. Every rule is linear in its input.

use std::borrow::Cow;
use std::sync::OnceLock;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use regex::{Captures, Regex};

pub const REDACTED: &str = "***REDACTED***";

// Rule families, in the order they are applied: specific shapes first, so that
// "api_key=sk-proj-..." reads "api_key=***API_KEY***" rather than a generic mark.
const PEM: u16 = 1 << 0;
const JWT: u16 = 1 << 1;
const AWS: u16 = 1 << 2;
const GITHUB: u16 = 1 << 3;
const GITLAB: u16 = 1 << 4;
const SLACK: u16 = 1 << 5;
const APIKEY: u16 = 1 << 6;
const AZURE: u16 = 1 << 7;
const URL: u16 = 1 << 8;
const BEARER: u16 = 1 << 9;
const KV: u16 = 1 << 10;
const ENTROPY: u16 = 1 << 11;
const CARD: u16 = 1 << 12;

/// The gate's literals. `true`: case-sensitive (checked at the match, the
/// automaton being ASCII case-insensitive); `false`: matched in the lower-cased
/// string. Each family's test is at least as loose as its rules.
const LITERALS: &[(&str, bool)] = &[
    ("-----", true),      // 0 pem
    ("eyJ", true),        // 1 jwt
    ("AKIA", true),       // 2 aws
    ("ASIA", true),       // 3
    ("ABIA", true),       // 4
    ("ACCA", true),       // 5
    ("gh", true),         // 6 github (with '_')
    ("gl", true),         // 7 gitlab (with '-')
    ("xox", true),        // 8 slack
    ("xapp-", true),      // 9
    ("hooks.slack", false), // 10
    ("sk-", true),        // 11 apikey
    ("k_", true),         // 12
    ("AIza", true),       // 13
    ("hf_", true),        // 14
    ("whsec_", true),     // 15
    ("Q~", true),         // 16 azure
    ("accountkey", false), // 17
    ("sig=", false),      // 18
    ("://", true),        // 19 url (with '@')
    ("bearer", false),    // 20
    ("--", true),         // 21 kv separators
    ("pass", false),      // 22 kv names
    ("pwd", false),       // 23
    ("secret", false),    // 24
    ("key", false),       // 25
    ("token", false),     // 26
    ("auth", false),      // 27
    ("credential", false), // 28
];
const KV_NAMES: u32 = 0x7f << 22; // literals 22..=28

struct Rules {
    gate: AhoCorasick,
    pem: Regex,
    jwt: Regex,
    aws: Regex,
    github: [Regex; 2],
    gitlab: Regex,
    slack: [(Regex, &'static str); 3],
    apikey: [Regex; 7],
    azure_conn: Regex,
    azure_sig: Regex,
    azure_entra: Regex,
    url: Regex,
    bearer: Regex,
    kv_basic: Regex,
    kv_flag: Regex,
    kv_pair: Regex,
    entropy: Regex,
    card: Regex,
    digit: Regex,
    sensitive_key: Regex,
}

fn re(pattern: &str) -> Regex {
    // The patterns are constants covered by the tests below.
    Regex::new(pattern).expect("built-in sanitizer pattern")
}

const STRONG_NAMES: &str =
    r"pass(?:word|wd|phrase)|pwd|secret(?:[_-]?key)?|api[_-]?key|access[_-]?key|private[_-]?key";
const WEAK_NAMES: &str = r"token|auth(?:orization)?|credentials?";

fn rules() -> &'static Rules {
    static RULES: OnceLock<Rules> = OnceLock::new();
    RULES.get_or_init(|| Rules {
        gate: AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .kind(Some(AhoCorasickKind::DFA))
            .build(LITERALS.iter().map(|(s, _)| s))
            .expect("gate automaton"),
        pem: re(concat!(
            r"(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----",
            r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|.*)"
        )),
        jwt: re(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"),
        aws: re(r"\bA(?:KIA|SIA|BIA|CCA)[A-Z0-9]{16}\b"),
        github: [
            re(r"\bgh[pousr]_[A-Za-z0-9]{30,251}\b"),
            re(r"\bgithub_pat_[A-Za-z0-9_]{22,255}"),
        ],
        gitlab: re(r"\bgl(?:pat|ptt|dt|rt|soat|cbt|ft|imt)-[A-Za-z0-9_-]{20,}"),
        slack: [
            (
                re(r"https?://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]+"),
                "***SLACK_WEBHOOK***",
            ),
            (re(r"\bxox[abeprs]-[A-Za-z0-9-]{10,}"), "***SLACK_TOKEN***"),
            (re(r"\bxapp-\d-[A-Za-z0-9-]{10,}"), "***SLACK_TOKEN***"),
        ],
        apikey: [
            re(r"\bsk-ant-[A-Za-z0-9_-]{20,}"),
            re(r"\bsk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_-]{20,}"),
            // Legacy OpenAI keys and most OpenAI-compatible providers: no dashes in
            // the body, which keeps kebab-case names such as "sk-learn-..." out.
            re(r"\bsk-[A-Za-z0-9]{20,}\b"),
            re(r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}"),
            re(r"\bAIza[0-9A-Za-z_-]{35}"),
            re(r"\bhf_[A-Za-z0-9]{30,}"),
            re(r"\bwhsec_[A-Za-z0-9+/=]{24,}"),
        ],
        azure_conn: re(r"(?i)(?P<head>\b(?:AccountKey|SharedAccessKey)=)[A-Za-z0-9+/]{20,}={0,2}"),
        azure_sig: re(r"(?i)(?P<head>[?&]sig=)[A-Za-z0-9%+/=]{20,}"),
        // Entra ID (Azure AD) client secrets, whose 4th-5th characters are "Q~";
        // not preceded by [\w~.-] (checked in code).
        azure_entra: re(r"[A-Za-z0-9_~.-]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34}"),
        // The password may contain '@': the greedy run gives back to the last '@'
        // before the host, and stops at '/', '?', '#' so "host:8080/x?a@b" is left.
        url: re(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]{0,20}://[^\s:/?#@]*):[^\s/?#]+@"),
        // The credential must hold a digit (checked in code).
        bearer: re(r"(?i)\b(?P<head>bearer\s+)(?P<v>[A-Za-z0-9._~+/-]{12,})=*"),
        kv_basic: re(concat!(
            r#"(?i)(?P<head>authorization(?:\\?["'])?[ \t]*[:=][ \t]*(?:\\?["'])?basic[ \t]+)"#,
            r"[A-Za-z0-9+/]{4,}={0,2}"
        )),
        kv_flag: re(concat!(
            r"(?i)(?P<name>--(?:password|passwd|pass|token|api-?key|secret|client-secret))",
            r#"(?P<sep>[ \t]+)(?P<bare>[^\s"']+)"#
        )),
        kv_pair: re(&format!(
            concat!(
                r"(?i)(?P<name>{}|{})",
                r#"(?P<sep>(?:\\?["'])?[ \t]*[:=][ \t]*)"#,
                r#"(?:"(?P<dq>(?:[^"\\\n]|\\.)*)""#,
                r"|'(?P<sq>[^'\n]*)'",
                r#"|(?:\\["'])?(?P<bare>[^\s"',;&\\]+))"#
            ),
            STRONG_NAMES, WEAK_NAMES
        )),
        // A name=value whose value may be random; the name starts a run of name
        // characters and the value ends its run (both checked in code).
        entropy: re(concat!(
            r"(?P<head>[A-Za-z_][A-Za-z0-9_.-]{0,63}[ \t]*(?:=|:[ \t]*))",
            r"(?P<value>[A-Za-z0-9+/_-]{24,}={0,2})"
        )),
        // 13-19 digits, bare or in groups of 4 (4-6-5 for Amex) with one
        // separator; not part of a longer number, decimal, word or list (in code).
        card: re(concat!(
            r"[0-9]{13,19}",
            r"|[0-9]{4} [0-9]{4} [0-9]{4} [0-9]{1,7}|[0-9]{4}-[0-9]{4}-[0-9]{4}-[0-9]{1,7}",
            r"|[0-9]{4} [0-9]{6} [0-9]{4,5}|[0-9]{4}-[0-9]{6}-[0-9]{4,5}"
        )),
        digit: re(r"\d"),
        // Credential-named keys: their string values are redacted whatever they
        // contain. Plain "token" is not one: in LLM pipelines it is a text token.
        sensitive_key: re(concat!(
            r"(?i)^(?:[a-z0-9]+[_.-])*?",
            r"(?:pass(?:word|wd|phrase)?|pwd|secret|client[_-]?secret|secret[_-]?key|api[_-]?key",
            r"|apikey|access[_-]?key(?:[_-]?id)?|private[_-]?key|auth[_-]?token|access[_-]?token",
            r"|refresh[_-]?token|session[_-]?token|id[_-]?token|bearer[_-]?token|api[_-]?token",
            r"|authorization|credentials?|cookie|set[_-]cookie)$"
        )),
    })
}

/// The families a string can trigger (a bit per family), read in one pass of
/// the automaton and one byte loop.
fn families(value: &str) -> u16 {
    let r = rules();
    let bytes = value.as_bytes();
    let mut seen: u32 = 0;
    for m in r.gate.find_overlapping_iter(bytes) {
        let id = m.pattern().as_usize();
        let (lit, exact) = LITERALS[id];
        if !exact || &bytes[m.start()..m.end()] == lit.as_bytes() {
            seen |= 1 << id;
        }
    }
    if !value.is_ascii() {
        // Lower-casing can turn a non-ASCII character into ASCII (the Kelvin sign
        // into 'k'): the case-insensitive literals are also sought in the lower-cased text.
        let lowered = value.to_lowercase();
        for m in r.gate.find_overlapping_iter(lowered.as_bytes()) {
            let id = m.pattern().as_usize();
            if !LITERALS[id].1 && lowered.as_bytes()[m.start()..m.end()] == *LITERALS[id].0.as_bytes() {
                seen |= 1 << id;
            }
        }
    }
    // Single characters and the runs no literal describes.
    let (mut under, mut dash, mut at, mut colon, mut equals) = (false, false, false, false, false);
    let (mut digits, mut sep_after_four, mut card) = (0usize, false, false);
    let (mut run, mut long_run) = (0usize, false);
    for &b in bytes {
        match b {
            b'_' => under = true,
            b'-' => dash = true,
            b'@' => at = true,
            b':' => colon = true,
            b'=' => equals = true,
            _ => {}
        }
        if b.is_ascii_digit() {
            digits += 1;
            if digits >= 8 || (sep_after_four && digits >= 4) {
                card = true;
            }
        } else {
            sep_after_four = (b == b' ' || b == b'-') && digits >= 4;
            digits = 0;
        }
        if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'_' | b'-') {
            run += 1;
            long_run |= run >= 24;
        } else {
            run = 0;
        }
    }
    let has = |id: u32| seen & (1 << id) != 0;
    let mut found = 0;
    if has(0) {
        found |= PEM;
    }
    if has(1) {
        found |= JWT;
    }
    if has(2) || has(3) || has(4) || has(5) {
        found |= AWS;
    }
    if has(6) && under {
        found |= GITHUB;
    }
    if has(7) && dash {
        found |= GITLAB;
    }
    if has(8) || has(9) || has(10) {
        found |= SLACK;
    }
    if has(11) || has(12) || has(13) || has(14) || has(15) {
        found |= APIKEY;
    }
    if has(16) || has(17) || has(18) {
        found |= AZURE;
    }
    if has(19) && at {
        found |= URL;
    }
    if has(20) {
        found |= BEARER;
    }
    if (colon || equals || has(21)) && seen & KV_NAMES != 0 {
        found |= KV;
    }
    if card {
        found |= CARD;
    }
    if (colon || equals) && long_run {
        found |= ENTROPY;
    }
    found
}

/// What a rule decides at one match.
enum Verdict {
    /// The lookaround failed: no match here; try one character later.
    Reject,
    /// A match, left as it is (scanning resumes after it).
    Keep,
    Replace(String),
}

/// `re.sub` of Python with a function replacement, plus rejected starts.
fn substitute(text: &str, re: &Regex, mut judge: impl FnMut(&Captures<'_>) -> Verdict) -> Option<String> {
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut pos = 0;
    while pos <= text.len() {
        let Some(caps) = re.captures_at(text, pos) else { break };
        let m = caps.get(0).expect("group 0");
        match judge(&caps) {
            Verdict::Reject => {
                // The next character boundary after the rejected start.
                pos = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8);
                continue;
            }
            Verdict::Keep => {}
            Verdict::Replace(new) => {
                let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
                o.push_str(&text[copied..m.start()]);
                o.push_str(&new);
                copied = m.end();
            }
        }
        // The rules never match the empty string; guard anyway.
        pos = if m.end() > m.start() { m.end() } else { m.end() + 1 };
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

fn replace_with(text: &str, re: &Regex, mark: &str) -> Option<String> {
    substitute(text, re, |_| Verdict::Replace(mark.to_string()))
}

fn keep_head(text: &str, re: &Regex) -> Option<String> {
    substitute(text, re, |c| Verdict::Replace(format!("{}{REDACTED}", &c["head"])))
}

fn char_before(text: &str, at: usize) -> Option<char> {
    text[..at].chars().next_back()
}

/// Python's `\w` (Unicode word characters).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn luhn_valid(digits: &[u8]) -> bool {
    let mut total = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        total += v;
    }
    total % 10 == 0
}

/// Whether some card network issues numbers with this prefix and length.
/// Luhn alone passes one random number in ten; a real issuer prefix keeps
/// e.g. 16-digit microsecond epochs (which start with 1) out.
fn issuer_length_ok(digits: &[u8]) -> bool {
    let n = digits.len();
    let num = |k: usize| digits[..k].iter().fold(0u32, |a, &d| a * 10 + u32::from(d - b'0'));
    let (two, three, four) = (num(2), num(3), num(4));
    if digits[0] == b'4' {
        return matches!(n, 13 | 16 | 19); // Visa
    }
    if (51..=55).contains(&two) || (2221..=2720).contains(&four) {
        return n == 16; // Mastercard
    }
    if two == 34 || two == 37 {
        return n == 15; // American Express
    }
    if four == 6011 || two == 65 || (644..=649).contains(&three) {
        return (16..=19).contains(&n); // Discover
    }
    if (300..=305).contains(&three) || matches!(two, 36 | 38 | 39) {
        return (14..=19).contains(&n); // Diners Club
    }
    if (3528..=3589).contains(&four) {
        return (16..=19).contains(&n); // JCB
    }
    if two == 62 {
        return (16..=19).contains(&n); // UnionPay
    }
    if two == 50 || (56..=58).contains(&two) || two == 67 {
        return (12..=19).contains(&n); // Maestro
    }
    false
}

/// Shannon entropy in bits per character, summed in first-seen order from 0.0
/// as Python's `sum` does, so that a value at the threshold is judged the same.
fn entropy(value: &str) -> f64 {
    let mut counts: Vec<(u8, u32)> = Vec::new();
    for &b in value.as_bytes() {
        match counts.iter_mut().find(|(c, _)| *c == b) {
            Some((_, n)) => *n += 1,
            None => counts.push((b, 1)),
        }
    }
    let n = value.len() as f64;
    let mut sum = 0.0f64;
    for &(_, c) in &counts {
        let p = f64::from(c) / n;
        sum += p * p.log2();
    }
    -sum
}

/// A value that looks random: upper case, lower case and digits mixed (hex
/// hashes and UUIDs are not), close to the entropy of a random string of its
/// length (85 % of log2(length), at most 4.5 bits), not a path.
fn high_entropy(value: &str) -> bool {
    let b = value.as_bytes();
    !(b[0] == b'/'
        || b[0] == b'-'
        || b.iter().filter(|&&c| c == b'/').count() >= 2
        || !b.iter().any(u8::is_ascii_uppercase)
        || !b.iter().any(u8::is_ascii_lowercase)
        || !b.iter().any(u8::is_ascii_digit)
        || entropy(value) < f64::min(4.5, 0.85 * (value.len() as f64).log2()))
}

/// A `token=` or `auth:` value is a secret only when it looks like a credential.
fn credential_like(value: &str) -> bool {
    value.chars().count() >= 8
        && value.bytes().any(|b| b.is_ascii_alphabetic())
        && rules().digit.is_match(value)
}

fn key_value(c: &Captures<'_>) -> Verdict {
    let Some(v) = ["dq", "sq", "bare"].iter().find_map(|g| c.name(g)) else {
        return Verdict::Keep;
    };
    let value = v.as_str();
    let name = c["name"].to_lowercase();
    let weak = matches!(
        name.as_str(),
        "token" | "auth" | "authorization" | "credential" | "credentials"
    );
    let keep = value.starts_with("***") // already redacted by a more specific rule
        || (name == "pwd" && (value.starts_with('/') || value.starts_with('~'))) // a shell's PWD
        || (weak && !credential_like(value));
    if keep || value.is_empty() {
        return Verdict::Keep;
    }
    let m = c.get(0).expect("group 0");
    let whole = m.as_str();
    let (s, e) = (v.start() - m.start(), v.end() - m.start());
    Verdict::Replace(format!("{}{REDACTED}{}", &whole[..s], &whole[e..]))
}

fn apply(mut text: Cow<'_, str>, step: impl FnOnce(&str) -> Option<String>) -> Cow<'_, str> {
    if let Some(new) = step(&text) {
        text = Cow::Owned(new);
    }
    text
}

/// `value` with every secret replaced by a `***...***` mark (borrowed when clean).
pub fn sanitize(value: &str) -> Cow<'_, str> {
    let fam = families(value);
    let mut t = Cow::Borrowed(value);
    if fam == 0 {
        return t;
    }
    let r = rules();
    if fam & PEM != 0 {
        t = apply(t, |s| replace_with(s, &r.pem, "***PRIVATE_KEY***"));
    }
    if fam & JWT != 0 {
        t = apply(t, |s| replace_with(s, &r.jwt, "***JWT***"));
    }
    if fam & AWS != 0 {
        t = apply(t, |s| replace_with(s, &r.aws, "***AWS_ACCESS_KEY***"));
    }
    if fam & GITHUB != 0 {
        for rule in &r.github {
            t = apply(t, |s| replace_with(s, rule, "***GITHUB_TOKEN***"));
        }
    }
    if fam & GITLAB != 0 {
        t = apply(t, |s| replace_with(s, &r.gitlab, "***GITLAB_TOKEN***"));
    }
    if fam & SLACK != 0 {
        for (rule, mark) in &r.slack {
            t = apply(t, |s| replace_with(s, rule, mark));
        }
    }
    if fam & APIKEY != 0 {
        for rule in &r.apikey {
            t = apply(t, |s| replace_with(s, rule, "***API_KEY***"));
        }
    }
    if fam & AZURE != 0 {
        t = apply(t, |s| keep_head(s, &r.azure_conn));
        t = apply(t, |s| keep_head(s, &r.azure_sig));
        t = apply(t, |s| {
            substitute(s, &r.azure_entra, |c| {
                let start = c.get(0).expect("group 0").start();
                match char_before(s, start) {
                    Some(p) if is_word(p) || matches!(p, '~' | '.' | '-') => Verdict::Reject,
                    _ => Verdict::Replace("***AZURE_SECRET***".to_string()),
                }
            })
        });
    }
    if fam & URL != 0 {
        t = apply(t, |s| {
            substitute(s, &r.url, |c| Verdict::Replace(format!("{}:{REDACTED}@", &c["head"])))
        });
    }
    if fam & BEARER != 0 {
        t = apply(t, |s| {
            substitute(s, &r.bearer, |c| {
                let v = c.name("v").expect("group v");
                // Python's lookahead: a digit within the run or just after it.
                let digit = v.as_str().bytes().any(|b| b.is_ascii_digit())
                    || s[v.end()..].chars().next().is_some_and(|ch| {
                        let mut buf = [0u8; 4];
                        r.digit.is_match(ch.encode_utf8(&mut buf))
                    });
                if digit {
                    Verdict::Replace(format!("{}{REDACTED}", &c["head"]))
                } else {
                    Verdict::Reject
                }
            })
        });
    }
    if fam & KV != 0 {
        t = apply(t, |s| keep_head(s, &r.kv_basic));
        t = apply(t, |s| substitute(s, &r.kv_flag, key_value));
        t = apply(t, |s| substitute(s, &r.kv_pair, key_value));
    }
    if fam & ENTROPY != 0 {
        t = apply(t, |s| {
            substitute(s, &r.entropy, |c| {
                let m = c.get(0).expect("group 0");
                let name_run = |ch: char| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-');
                if char_before(s, m.start()).is_some_and(name_run) {
                    return Verdict::Reject;
                }
                let after = s[m.end()..].chars().next();
                if after.is_some_and(|ch| {
                    ch.is_ascii_alphanumeric() || matches!(ch, '+' | '/' | '_' | '=' | '.' | ':' | '-')
                }) {
                    return Verdict::Reject;
                }
                if high_entropy(&c["value"]) {
                    Verdict::Replace(format!("{}{REDACTED}", &c["head"]))
                } else {
                    Verdict::Keep
                }
            })
        });
    }
    if fam & CARD != 0 {
        t = apply(t, |s| {
            substitute(s, &r.card, |c| {
                let m = c.get(0).expect("group 0");
                let mut before = s[..m.start()].chars().rev();
                let p1 = before.next();
                let p2 = before.next();
                if p1.is_some_and(|p| is_word(p) || matches!(p, '.' | '+' | '-'))
                    || (p1.is_some_and(|p| p == ' ' || p == '-') && p2.is_some_and(|p| p.is_ascii_digit()))
                {
                    return Verdict::Reject;
                }
                let mut after = s[m.end()..].chars();
                let a1 = after.next();
                let a2 = after.next();
                if a1.is_some_and(is_word)
                    || (a1.is_some_and(|a| matches!(a, '.' | ',' | ' ' | '-'))
                        && a2.is_some_and(|a| a.is_ascii_digit()))
                {
                    return Verdict::Reject;
                }
                let digits: Vec<u8> = m.as_str().bytes().filter(u8::is_ascii_digit).collect();
                if issuer_length_ok(&digits) && luhn_valid(&digits) {
                    Verdict::Replace("***CARD_NUMBER***".to_string())
                } else {
                    Verdict::Keep
                }
            })
        });
    }
    t
}

/// Whether a metadata key names a credential (its string value is redacted
/// whatever it holds).
pub fn is_sensitive_key(key: &str) -> bool {
    rules().sensitive_key.is_match(key)
}

/// The end (one past the closing quote) of the JSON string starting at
/// `src[start] == b'"'`, and whether it holds an escape.
fn string_end(src: &[u8], start: usize) -> (usize, bool) {
    let mut i = start + 1;
    let mut escaped = false;
    while let Some(off) = memchr::memchr2(b'"', b'\\', &src[i..]) {
        i += off;
        if src[i] == b'\\' {
            escaped = true;
            i += 2;
        } else {
            return (i + 1, escaped);
        }
    }
    (src.len(), escaped)
}

/// Sanitise every string of a JSON object (one valid JSON text, as the writer
/// checks it): values are scrubbed, a non-empty string under a credential-named
/// key becomes `***REDACTED***`, keys are kept. Everything else is copied byte
/// for byte; borrowed when nothing changed.
pub fn sanitize_json(src: &[u8]) -> Cow<'_, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    // One flag per open container: true for an object.
    let mut stack: Vec<bool> = Vec::new();
    let mut expect_key = false;
    let mut sensitive = false;
    let mut i = 0;
    while i < src.len() {
        match src[i] {
            b'{' => {
                stack.push(true);
                expect_key = true;
            }
            b'[' => {
                stack.push(false);
                expect_key = false;
            }
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
            }
            b',' => expect_key = stack.last() == Some(&true),
            b':' => expect_key = false,
            b'"' => {
                let (end, escaped) = string_end(src, i);
                let body = &src[i + 1..end.saturating_sub(1).max(i + 1)];
                let text: Cow<'_, str> = if escaped {
                    match serde_json::from_slice::<String>(&src[i..end]) {
                        Ok(s) => Cow::Owned(s),
                        Err(_) => Cow::Borrowed(""),
                    }
                } else {
                    String::from_utf8_lossy(body)
                };
                if expect_key {
                    sensitive = is_sensitive_key(&text);
                } else {
                    let in_object = stack.last() == Some(&true);
                    let new: Option<Cow<'_, str>> = if in_object && sensitive && !text.is_empty() {
                        Some(Cow::Borrowed(REDACTED))
                    } else {
                        match sanitize(&text) {
                            Cow::Owned(s) => Some(Cow::Owned(s)),
                            Cow::Borrowed(_) => None,
                        }
                    };
                    if let Some(new) = new {
                        let o = out.get_or_insert_with(|| Vec::with_capacity(src.len() + 32));
                        o.extend_from_slice(&src[copied..i]);
                        crate::parse::push_json_str(o, &new);
                        copied = end;
                    }
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    match out {
        None => Cow::Borrowed(src),
        Some(mut o) => {
            o.extend_from_slice(&src[copied..]);
            Cow::Owned(o)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_text_is_borrowed() {
        for s in ["", "Reasoning completed", "token: 512", "2024-01-01T00:00:00Z", "a=b"] {
            assert!(matches!(sanitize(s), Cow::Borrowed(_)), "{s}");
        }
    }

    #[test]
    fn secrets_are_marked() {
        let cases = [
            ("key sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789", "key ***API_KEY***"),
            ("AKIAIOSFODNN7EXAMPLE", "***AWS_ACCESS_KEY***"),
            ("https://admin:s3cr3t@host/x", "https://admin:***REDACTED***@host/x"),
            ("Authorization: Bearer 0123456789abcdef0123", "Authorization: Bearer ***REDACTED***"),
            ("password=hunter2", "password=***REDACTED***"),
            ("token: 512", "token: 512"),
            ("card 4111 1111 1111 1111.", "card ***CARD_NUMBER***."),
            ("ts 1700000000123456", "ts 1700000000123456"),
            ("cfg x=Zk3pQ9vL2mN8rT5wY1aB7cD4", "cfg x=***REDACTED***"),
            ("id x=0123456789abcdef0123456789abcdef", "id x=0123456789abcdef0123456789abcdef"),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize(input), want, "{input}");
        }
    }

    #[test]
    fn lookbehind_rejections_resume_one_character_later() {
        // The first candidate start is inside a run (rejected); the real one follows.
        assert_eq!(sanitize("ab.c=Zk3pQ9vL2mN8rT5wY1aB7cD4"), "ab.c=***REDACTED***");
        assert_eq!(sanitize("x-abc1Q~abcdefghijklmnopqrstuvwxyz01234"), "x-abc1Q~abcdefghijklmnopqrstuvwxyz01234");
    }

    #[test]
    fn json_values_are_scrubbed_keys_kept() {
        let src = br#"{"password":"x","a":["sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789",1],"n":{"api_key":""},"e":"\u00e9 ok"}"#;
        let out = sanitize_json(src);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"password":"***REDACTED***","a":["***API_KEY***",1],"n":{"api_key":""},"e":"\u00e9 ok"}"#
        );
        let clean = br#"{"model":"gpt-4o-mini","output":{"confidence":0.82}}"#;
        assert!(matches!(sanitize_json(clean), Cow::Borrowed(_)));
    }

    #[test]
    fn sensitive_keys() {
        assert!(is_sensitive_key("client_secret"));
        assert!(is_sensitive_key("OPENAI_API_KEY"));
        assert!(!is_sensitive_key("token"));
        assert!(!is_sensitive_key("input_tokens"));
    }

    #[test]
    fn large_input_is_linear() {
        let blob = "a=".repeat(200_000) + &"sk-".repeat(100_000);
        let t = std::time::Instant::now();
        let _ = sanitize(&blob);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
