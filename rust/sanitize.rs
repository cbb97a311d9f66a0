//! Secret scrubbing: the one pattern set of sigil (spec 11.2, issue 9).
//!
//! `python/sigil/telemetry/sanitization.py` documents the rules and calls this
//! module; the writer applies it to an event's message and every metadata
//! string in the pass that serialises the event.
//!
//! A string is first read once by one `RegexSet` of every rule (a lazy DFA
//! pass): most strings match none and cost nothing more. Where some match, only
//! those rules run, each where its family's gate (the reference's substring
//! tests, `Gate`) passes; after a rule changed the text, only the rules that
//! can match a mark's `*` run again unconditionally (`Pass`).
//!
//! Rust's `regex` has no lookaround or backreferences; the few Python rules that
//! used them are the same regex without the lookaround, the lookaround checked
//! in code at the match (a rejected start resumes one character later, as a
//! backtracking engine would try it), and the card rule's backreference spelled
//! out as one alternative per separator. Python's `\s` also matches \x1C-\x1F
//! (Rust's is Unicode White_Space only), so those are added where `\s` is used.
//! Every rule is linear in its input.

use std::borrow::Cow;
use std::sync::OnceLock;

use regex::bytes;
use regex::Regex;
#[cfg(test)]
use regex::RegexSet;

pub const REDACTED: &str = "***REDACTED***";
/// A URL's password and the '@' after it, as the URL rule writes them.
const URL_PASSWORD: &str = ":***REDACTED***@";

/// The literals one of which every credential-named key holds (matched
/// case-insensitively; `false`: not case-sensitive).
const LITERALS: &[(&str, bool)] = &[
    ("pass", false),
    ("pwd", false),
    ("secret", false),
    ("key", false),
    ("token", false),
    ("auth", false),
    ("credential", false),
    ("cookie", false),
];
const KEY_NAMES: u32 = (1 << LITERALS.len()) - 1;

struct Rules {
    /// The literals by their lower-cased first byte.
    gate: Vec<Vec<GateLit>>,
    pem: Re,
    jwt: Re,
    aws: Re,
    github: [Re; 2],
    gitlab: Re,
    slack: [(Re, &'static str); 3],
    apikey: [Re; 7],
    azure_conn: Re,
    azure_sig: Re,
    azure_entra: Re,
    url: Re,
    bearer: Re,
    kv_basic: Re,
    kv_flag: Re,
    kv_pair: Re,
    entropy: Re,
    card: Re,
    digit: Regex,
    py_word: Regex,
    sensitive_key: Regex,
}

// Each rule's place in `rule_set()`.
const R_PEM: usize = 0;
const R_JWT: usize = 1;
const R_AWS: usize = 2;
const R_GITHUB: usize = 3; // 2 rules
const R_GITLAB: usize = 5;
const R_SLACK: usize = 6; // 3 rules
const R_APIKEY: usize = 9; // 7 rules
const R_AZURE_CONN: usize = 16;
const R_AZURE_SIG: usize = 17;
const R_AZURE_ENTRA: usize = 18;
const R_URL: usize = 19;
const R_BEARER: usize = 20;
const R_KV_BASIC: usize = 21;
const R_KV_FLAG: usize = 22;
const R_KV_PAIR: usize = 23;
const R_ENTROPY: usize = 24;
const R_CARD: usize = 25;

/// Every rule's regex in one set, in the `R_*` order: the tests check that
/// `candidates` holds every rule this set says matches.
#[cfg(test)]
fn rule_set() -> &'static RegexSet {
    static SET: OnceLock<RegexSet> = OnceLock::new();
    SET.get_or_init(|| {
        let r = rules();
        let mut all: Vec<&Re> = vec![&r.pem, &r.jwt, &r.aws];
        all.extend(&r.github);
        all.push(&r.gitlab);
        all.extend(r.slack.iter().map(|(rule, _)| rule));
        all.extend(&r.apikey);
        all.extend([
            &r.azure_conn,
            &r.azure_sig,
            &r.azure_entra,
            &r.url,
            &r.bearer,
            &r.kv_basic,
            &r.kv_flag,
            &r.kv_pair,
            &r.entropy,
            &r.card,
        ]);
        debug_assert_eq!(all.len(), R_CARD + 1);
        RegexSet::new(all.iter().map(|rule| rule.as_str())).expect("built-in sanitizer patterns")
    })
}

fn re(pattern: &str) -> Regex {
    // The patterns are constants covered by the tests below.
    Regex::new(pattern).expect("built-in sanitizer pattern")
}

fn bytes_re(pattern: &str) -> bytes::Regex {
    bytes::Regex::new(pattern).expect("built-in sanitizer pattern")
}

/// One rule's regex, as `bytes::Regex`es whose match spans are character
/// boundaries of the `str` searched (Unicode mode on UTF-8 text; ASCII mode
/// only on ASCII text).
struct Re {
    /// The pattern (Unicode mode): any text.
    uni: bytes::Regex,
    /// The same pattern in ASCII mode (`(?-u)`): on ASCII text it matches
    /// exactly as `uni` (Unicode `\s`, `\d`, `.`, negated classes and case
    /// folding agree with ASCII's on ASCII characters), with a far smaller
    /// automaton.
    ascii: bytes::Regex,
    /// The same rule as literals and a run (`Token`), searched without an
    /// automaton; set for the provider-token rules of that shape.
    token: Option<Token>,
    /// The same rule on ASCII text of at most `ASCII_CODE_MAX` bytes, as code:
    /// the leftmost match at or after a position.
    ascii_code: Option<AsciiFind>,
}

type AsciiFind = fn(&[u8], usize) -> Option<(usize, usize)>;

/// The longest ASCII text the hand-written matchers (`Re::ascii_code`) run
/// on: they may rescan a value from each of many starts, and longer text goes
/// to the (linear) automaton.
const ASCII_CODE_MAX: usize = 2048;

impl Re {
    fn new(pattern: &str) -> Self {
        Re {
            uni: bytes_re(pattern),
            ascii: bytes_re(&format!("(?-u){pattern}")),
            token: None,
            ascii_code: None,
        }
    }

    /// A rule also written as code for ASCII text (the test
    /// `ascii_code_finds_what_the_regex_finds` compares them).
    fn with_ascii_code(pattern: &str, code: AsciiFind) -> Self {
        Re {
            ascii_code: Some(code),
            ..Re::new(pattern)
        }
    }

    /// A rule of `Token`'s shape: `token` is the same rule, searched by code
    /// (the test `tokens_find_what_their_regex_finds` compares them).
    fn token(pattern: &str, token: Token) -> Self {
        Re {
            token: Some(token),
            ..Re::new(pattern)
        }
    }

    /// The leftmost match at or after `pos` (a character boundary).
    fn find_at(&self, text: &str, pos: usize, ascii: bool) -> Option<(usize, usize)> {
        if let Some(t) = &self.token {
            return t.find_at(text.as_bytes(), pos);
        }
        match self.ascii_code {
            Some(code) if ascii && text.len() <= ASCII_CODE_MAX => code(text.as_bytes(), pos),
            _ => self
                .find(ascii)
                .find_at(text.as_bytes(), pos)
                .map(|m| (m.start(), m.end())),
        }
    }

    #[cfg(test)]
    fn as_str(&self) -> &str {
        self.uni.as_str()
    }

    fn find(&self, ascii: bool) -> &bytes::Regex {
        if ascii {
            &self.ascii
        } else {
            &self.uni
        }
    }
}

/// The first place of `needle` (non-empty, a few bytes) in `hay`: `memchr`
/// of its first byte and a comparison (no searcher built per call, which
/// `memmem::find` does and which costs more than the search on short text).
fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = memchr::memchr(first, &hay[from..]) {
        let at = from + i;
        if hay[at + 1..].starts_with(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// A rule of the shape `(?:L1|L2|...)C{min,max}`: one of a few ASCII literals
/// (none a prefix of another, so at most one matches at a start), then a
/// greedy run of an ASCII class. Its leftmost match is the first start where
/// a literal is followed by at least `min` bytes of the class, and the match
/// takes at most `max` of them. Every literal holds `finder`'s needle (the lead) at `back`.
struct Token {
    /// The searcher of the lead, built once (`find_bytes` on a few bytes at a
    /// time stops at every occurrence of its first byte).
    finder: memchr::memmem::Finder<'static>,
    back: usize,
    literals: &'static [&'static [u8]],
    class: &'static [bool; 256],
    min: usize,
    max: usize,
}

impl Token {
    fn find_at(&self, b: &[u8], pos: usize) -> Option<(usize, usize)> {
        let mut from = pos + self.back;
        while from <= b.len() {
            let j = from + self.finder.find(&b[from..])?;
            from = j + 1;
            let start = j - self.back;
            for lit in self.literals {
                if b[start..].starts_with(lit) {
                    let body = start + lit.len();
                    let run = b[body..]
                        .iter()
                        .take(self.max)
                        .take_while(|&&c| self.class[usize::from(c)])
                        .count();
                    if run >= self.min {
                        return Some((start, body + run));
                    }
                }
            }
        }
        None
    }
}

/// A byte class as a table: ASCII letters and digits (or upper case and
/// digits only), and the `extra` bytes.
const fn class_table(lower: bool, extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_uppercase() || b.is_ascii_digit() || (lower && b.is_ascii_lowercase());
        c += 1;
    }
    let mut k = 0;
    while k < extra.len() {
        t[extra[k] as usize] = true;
        k += 1;
    }
    t
}

static ALNUM: [bool; 256] = class_table(true, b"");
static ALNUM_DASH: [bool; 256] = class_table(true, b"_-");
static ALNUM_UNDER: [bool; 256] = class_table(true, b"_");
static UPPER_DIGIT: [bool; 256] = class_table(false, b"");
static SLACK_CLASS: [bool; 256] = class_table(true, b"-");
static WHSEC_CLASS: [bool; 256] = class_table(true, b"+/=");

/// ASCII `[\s\x1C-\x1F]`.
const fn ascii_space(c: u8) -> bool {
    matches!(
        c,
        b'\t' | b'\n' | b'\x0B' | b'\x0C' | b'\r' | b' ' | b'\x1C'..=b'\x1F'
    )
}

/// The bearer rule on ASCII text: "bearer" (any case), blanks, 12 or more of
/// the credential's characters (greedy; none is a blank or '='), then '='s.
fn bearer_ascii(b: &[u8], pos: usize) -> Option<(usize, usize)> {
    let at = |s: usize| -> Option<usize> {
        if !b.get(s..s + 6)?.eq_ignore_ascii_case(b"bearer") {
            return None;
        }
        let blank_end = s + 6 + b[s + 6..].iter().take_while(|&&c| ascii_space(c)).count();
        if blank_end == s + 6 {
            return None;
        }
        let v = b[blank_end..]
            .iter()
            .take_while(|&&c| c.is_ascii_alphanumeric() || b"._~+/-".contains(&c))
            .count();
        if v < 12 {
            return None;
        }
        let end = blank_end + v;
        Some(end + b[end..].iter().take_while(|&&c| c == b'=').count())
    };
    let mut from = pos;
    while from < b.len() {
        let s = from + memchr::memchr2(b'b', b'B', &b[from..])?;
        if let Some(end) = at(s) {
            return Some((s, end));
        }
        from = s + 1;
    }
    None
}

/// The URL-credential rule on ASCII text:
/// `[A-Za-z][A-Za-z0-9+.-]{0,20}://` (the scheme), a user part of bytes that
/// are none of blanks, ':', '/', '?', '#', '@', then ':', a password of bytes
/// that are none of blanks, '/', '?', '#' (greedy: it may hold '@' and ':'),
/// and '@'. No scheme byte is ':', so each start has one "://" (the end of its
/// scheme run) and the starts of a later "://" all lie after an earlier one:
/// the "://"s are tried in order. Past it nothing depends on the start: the
/// user part is the whole run (it cannot hold the ':' that must follow), and
/// the greedy password gives back to the last '@' of its run.
fn url_ascii(b: &[u8], pos: usize) -> Option<(usize, usize)> {
    let scheme = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'.' | b'-');
    let mut from = pos + 1;
    while from + 3 <= b.len() {
        let k = from + find_bytes(&b[from..], b"://")?;
        from = k + 1;
        // The leftmost start: a letter within 21 bytes before "://", at or
        // after `pos`, with only scheme bytes from it to "://".
        let lowest = k.saturating_sub(21).max(pos);
        let mut run = k;
        while run > lowest && scheme(b[run - 1]) {
            run -= 1;
        }
        let Some(start) = (run..k).find(|&s| b[s].is_ascii_alphabetic()) else {
            continue;
        };
        let user = k + 3;
        let colon = user
            + b[user..]
                .iter()
                .take_while(|&&c| {
                    !(ascii_space(c) || matches!(c, b':' | b'/' | b'?' | b'#' | b'@'))
                })
                .count();
        if b.get(colon) != Some(&b':') {
            continue;
        }
        let pass = colon + 1;
        let run_end = pass
            + b[pass..]
                .iter()
                .take_while(|&&c| !(ascii_space(c) || matches!(c, b'/' | b'?' | b'#')))
                .count();
        // The last '@' after at least one byte of password.
        if let Some(at) = b
            .get(pass + 1..run_end)
            .and_then(|w| memchr::memrchr(b'@', w))
        {
            return Some((start, pass + 1 + at + 1));
        }
    }
    None
}

/// The key-value rule's names as the regex tries them at one start
/// (alternatives in order, a greedy optional part first with it, then
/// without), by first letter: only those can match at a start.
fn kv_names(first: u8) -> &'static [&'static [u8]] {
    match first {
        b'p' => &[
            b"password",
            b"passwd",
            b"passphrase",
            b"pwd",
            b"private_key",
            b"private-key",
            b"privatekey",
        ],
        b's' => &[b"secret_key", b"secret-key", b"secretkey", b"secret"],
        b'a' => &[
            b"api_key",
            b"api-key",
            b"apikey",
            b"access_key",
            b"access-key",
            b"accesskey",
            b"authorization",
            b"auth",
        ],
        b't' => &[b"token"],
        b'c' => &[b"credentials", b"credential"],
        _ => &[],
    }
}

/// The key-value rule on ASCII text: at each start, the names in the regex's
/// order; after a name the rest of the pattern has at most one match
/// (`kv_rest`), so the first name it follows gives the regex's match.
fn kv_pair_ascii(b: &[u8], pos: usize) -> Option<(usize, usize)> {
    for s in pos..b.len() {
        let first = b[s].to_ascii_lowercase();
        if !matches!(first, b'p' | b's' | b'a' | b't' | b'c') {
            continue;
        }
        // Every name has 3 bytes or more: its second one is compared first.
        let second = b.get(s + 1).map(u8::to_ascii_lowercase);
        for name in kv_names(first) {
            if Some(name[1]) == second
                && b.get(s..s + name.len())
                    .is_some_and(|w| w.eq_ignore_ascii_case(name))
            {
                if let Some(end) = kv_rest(b, s + name.len()) {
                    return Some((s, end));
                }
            }
        }
    }
    None
}

/// The end of `(?:\\?["'])?[ \t]*[:=][ \t]*` and the value
/// (`"dq"`, `'sq'` or `(?:\\["'])?bare`) from `i`, on ASCII text.
fn kv_rest(b: &[u8], mut i: usize) -> Option<usize> {
    let quote = |c: Option<&u8>| matches!(c, Some(b'"' | b'\''));
    let blanks = |i: usize| {
        i + b[i..]
            .iter()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count()
    };
    if b.get(i) == Some(&b'\\') && quote(b.get(i + 1)) {
        i += 2;
    } else if quote(b.get(i)) {
        i += 1;
    }
    i = blanks(i);
    if !matches!(b.get(i), Some(b':' | b'=')) {
        return None;
    }
    i = blanks(i + 1);
    let bare = |from: usize| -> Option<usize> {
        let n = b[from..]
            .iter()
            .take_while(|&&c| {
                !(ascii_space(c) || matches!(c, b'"' | b'\'' | b',' | b';' | b'&' | b'\\'))
            })
            .count();
        (n > 0).then_some(from + n)
    };
    match b.get(i) {
        Some(b'"') => {
            let mut j = i + 1;
            loop {
                match b.get(j) {
                    Some(b'"') => return Some(j + 1),
                    Some(b'\\') if b.get(j + 1).is_some_and(|&c| c != b'\n') => j += 2,
                    Some(b'\\' | b'\n') | None => return None,
                    Some(_) => j += 1,
                }
            }
        }
        Some(b'\'') => {
            let k = b[i + 1..].iter().position(|&c| c == b'\'' || c == b'\n')?;
            (b[i + 1 + k] == b'\'').then_some(i + k + 2)
        }
        Some(b'\\') if quote(b.get(i + 1)) => bare(i + 2),
        _ => bare(i),
    }
}

const STRONG_NAMES: &str =
    r"pass(?:word|wd|phrase)|pwd|secret(?:[_-]?key)?|api[_-]?key|access[_-]?key|private[_-]?key";
const WEAK_NAMES: &str = r"token|auth(?:orization)?|credentials?";

fn rules() -> &'static Rules {
    static RULES: OnceLock<Rules> = OnceLock::new();
    RULES.get_or_init(|| Rules {
        gate: (0..=255u8)
            .map(|b| {
                (0..LITERALS.len())
                    .filter(|&id| LITERALS[id].0.as_bytes()[0].to_ascii_lowercase() == b)
                    .map(GateLit::new)
                    .collect()
            })
            .collect(),
        pem: Re::new(concat!(
            r"(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----",
            r"(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|.*)"
        )),
        jwt: Re::new(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"),
        aws: Re::token(
            r"A(?:KIA|SIA|BIA|CCA)[A-Z0-9]{16}",
            Token {
                finder: memchr::memmem::Finder::new(b"A"),
                back: 0,
                literals: &[b"AKIA", b"ASIA", b"ABIA", b"ACCA"],
                class: &UPPER_DIGIT,
                min: 16,
                max: 16,
            },
        ),
        github: [
            Re::token(
                r"gh[pousr]_[A-Za-z0-9]{30,251}",
                Token {
                    finder: memchr::memmem::Finder::new(b"gh"),
                    back: 0,
                    literals: &[b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_"],
                    class: &ALNUM,
                    min: 30,
                    max: 251,
                },
            ),
            Re::token(
                r"github_pat_[A-Za-z0-9_]{22,255}",
                Token {
                    finder: memchr::memmem::Finder::new(b"github_pat_"),
                    back: 0,
                    literals: &[b"github_pat_"],
                    class: &ALNUM_UNDER,
                    min: 22,
                    max: 255,
                },
            ),
        ],
        gitlab: Re::token(
            r"gl(?:pat|ptt|dt|rt|soat|cbt|ft|imt)-[A-Za-z0-9_-]{20,}",
            Token {
                finder: memchr::memmem::Finder::new(b"gl"),
                back: 0,
                literals: &[
                    b"glpat-", b"glptt-", b"gldt-", b"glrt-", b"glsoat-", b"glcbt-", b"glft-",
                    b"glimt-",
                ],
                class: &ALNUM_DASH,
                min: 20,
                max: usize::MAX,
            },
        ),
        slack: [
            (
                Re::new(
                    r"https?://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]+",
                ),
                "***SLACK_WEBHOOK***",
            ),
            (
                Re::token(
                    r"xox[abeprs]-[A-Za-z0-9-]{10,}",
                    Token {
                        finder: memchr::memmem::Finder::new(b"xox"),
                        back: 0,
                        literals: &[b"xoxa-", b"xoxb-", b"xoxe-", b"xoxp-", b"xoxr-", b"xoxs-"],
                        class: &SLACK_CLASS,
                        min: 10,
                        max: usize::MAX,
                    },
                ),
                "***SLACK_TOKEN***",
            ),
            (Re::new(r"xapp-\d-[A-Za-z0-9-]{10,}"), "***SLACK_TOKEN***"),
        ],
        apikey: [
            Re::token(
                r"sk-ant-[A-Za-z0-9_-]{20,}",
                Token {
                    finder: memchr::memmem::Finder::new(b"sk-ant-"),
                    back: 0,
                    literals: &[b"sk-ant-"],
                    class: &ALNUM_DASH,
                    min: 20,
                    max: usize::MAX,
                },
            ),
            Re::token(
                r"sk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_-]{20,}",
                Token {
                    finder: memchr::memmem::Finder::new(b"sk-"),
                    back: 0,
                    literals: &[b"sk-proj-", b"sk-svcacct-", b"sk-admin-", b"sk-None-"],
                    class: &ALNUM_DASH,
                    min: 20,
                    max: usize::MAX,
                },
            ),
            // Legacy OpenAI keys and most OpenAI-compatible providers: no dashes in
            // the body, which keeps kebab-case names such as "sk-learn-..." out.
            Re::token(
                r"sk-[A-Za-z0-9]{20,}",
                Token {
                    finder: memchr::memmem::Finder::new(b"sk-"),
                    back: 0,
                    literals: &[b"sk-"],
                    class: &ALNUM,
                    min: 20,
                    max: usize::MAX,
                },
            ),
            Re::token(
                r"[rs]k_(?:live|test)_[A-Za-z0-9]{16,}",
                Token {
                    finder: memchr::memmem::Finder::new(b"k_"),
                    back: 1,
                    literals: &[b"rk_live_", b"rk_test_", b"sk_live_", b"sk_test_"],
                    class: &ALNUM,
                    min: 16,
                    max: usize::MAX,
                },
            ),
            Re::token(
                r"AIza[0-9A-Za-z_-]{35}",
                Token {
                    finder: memchr::memmem::Finder::new(b"AIza"),
                    back: 0,
                    literals: &[b"AIza"],
                    class: &ALNUM_DASH,
                    min: 35,
                    max: 35,
                },
            ),
            Re::token(
                r"hf_[A-Za-z0-9]{30,}",
                Token {
                    finder: memchr::memmem::Finder::new(b"hf_"),
                    back: 0,
                    literals: &[b"hf_"],
                    class: &ALNUM,
                    min: 30,
                    max: usize::MAX,
                },
            ),
            Re::token(
                r"whsec_[A-Za-z0-9+/=]{24,}",
                Token {
                    finder: memchr::memmem::Finder::new(b"whsec_"),
                    back: 0,
                    literals: &[b"whsec_"],
                    class: &WHSEC_CLASS,
                    min: 24,
                    max: usize::MAX,
                },
            ),
        ],
        azure_conn: Re::new(
            r"(?i)(?P<head>(?:AccountKey|SharedAccessKey)=)[A-Za-z0-9+/]{20,}={0,2}",
        ),
        azure_sig: Re::new(r"(?i)(?P<head>[?&]sig=)[A-Za-z0-9%+/=]{20,}"),
        // Entra ID (Azure AD) client secrets, whose 4th-5th characters are "Q~";
        // not preceded by [\w~.-] (checked in code).
        azure_entra: Re::new(r"[A-Za-z0-9_~.-]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34}"),
        // The password may contain '@': the greedy run gives back to the last '@'
        // before the host, and stops at '/', '?', '#' so "host:8080/x?a@b" is left.
        url: Re::with_ascii_code(
            r"(?P<head>[A-Za-z][A-Za-z0-9+.-]{0,20}://[^\s\x1C-\x1F:/?#@]*):[^\s\x1C-\x1F/?#]+@",
            url_ascii,
        ),
        // The credential must hold a digit (checked in code).
        bearer: Re::with_ascii_code(
            r"(?i)(?P<head>bearer[\s\x1C-\x1F]+)(?P<v>[A-Za-z0-9._~+/-]{12,})=*",
            bearer_ascii,
        ),
        kv_basic: Re::new(concat!(
            r#"(?i)(?P<head>authorization(?:\\?["'])?[ \t]*[:=][ \t]*(?:\\?["'])?basic[ \t]+)"#,
            r"[A-Za-z0-9+/]{4,}={0,2}"
        )),
        kv_flag: Re::new(concat!(
            r"(?i)(?P<name>--(?:password|passwd|pass|token|api-?key|secret|client-secret))",
            r#"(?P<sep>[ \t]+)(?P<bare>[^\s\x1C-\x1F"']+)"#
        )),
        kv_pair: Re::with_ascii_code(
            &format!(
                concat!(
                    r"(?i)(?P<name>{}|{})",
                    r#"(?P<sep>(?:\\?["'])?[ \t]*[:=][ \t]*)"#,
                    r#"(?:"(?P<dq>(?:[^"\\\n]|\\.)*)""#,
                    r"|'(?P<sq>[^'\n]*)'",
                    r#"|(?:\\["'])?(?P<bare>[^\s\x1C-\x1F"',;&\\]+))"#
                ),
                STRONG_NAMES, WEAK_NAMES
            ),
            kv_pair_ascii,
        ),
        // A name=value whose value may be random; the name starts a run of name
        // characters and the value ends its run (both checked in code).
        entropy: Re::new(concat!(
            r"(?P<head>[A-Za-z_][A-Za-z0-9_.-]{0,63}[ \t]*(?:=|:[ \t]*))",
            r"(?P<value>[A-Za-z0-9+/_-]{24,}={0,2})"
        )),
        // 13-19 digits, bare or in groups of 4 (4-6-5 for Amex) with one
        // separator; not part of a longer number, decimal, word or list (in code).
        card: Re::new(concat!(
            r"[0-9]{13,19}",
            r"|[0-9]{4} [0-9]{4} [0-9]{4} [0-9]{1,7}|[0-9]{4}-[0-9]{4}-[0-9]{4}-[0-9]{1,7}",
            r"|[0-9]{4} [0-9]{6} [0-9]{4,5}|[0-9]{4}-[0-9]{6}-[0-9]{4,5}"
        )),
        digit: re(r"\d"),
        py_word: word_class(PYTHON_UNICODE.get().map(String::as_str)),
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

/// The Unicode version of the Python that loaded the module
/// (`unicodedata.unidata_version`), set once by the module's init.
static PYTHON_UNICODE: OnceLock<String> = OnceLock::new();

/// Record the Unicode version whose letters and numbers are Python's `\w`
/// (call before the first scrub; later calls are ignored).
pub fn set_python_unicode_version(version: &str) {
    let _ = PYTHON_UNICODE.set(version.to_string());
}

/// Python's `\w` for `str`: `str.isalnum()` or '_', i.e. the letters and
/// numbers of Python's own Unicode database. `regex`'s tables are of a newer
/// Unicode (16.0) than many Pythons (3.11: 14.0), and a letter Python does not
/// know yet (U+13460) is a word boundary there: without the age restriction a
/// key right after it would be kept here and redacted by the reference. An
/// unknown version (newer than the tables) takes the tables whole.
fn word_class(python_unicode: Option<&str>) -> Regex {
    let base = r"[\p{L}\p{N}_]";
    let age = python_unicode.and_then(|v| {
        let mut parts = v.split('.');
        let (major, minor) = (parts.next()?, parts.next()?);
        Regex::new(&format!(r"[{base}&&\p{{Age={major}.{minor}}}]")).ok()
    });
    age.unwrap_or_else(|| re(base))
}

/// Which key-name literals occur in `bytes` (a bit per literal), in one pass: at each
/// byte, only the literals starting with it (case-insensitively) are compared.
/// (aho-corasick's overlapping search, which the gate needs, measured several
/// times slower on short strings: it cannot use its prefilter.)
fn literals_in(bytes: &[u8]) -> u32 {
    // Short strings (keys, most values) are copied once, zero-padded, so that
    // every word below is one fixed 8-byte load.
    const SHORT: usize = 64;
    let mut padded = [0u8; SHORT + 8];
    let short = bytes.len() <= SHORT;
    if short {
        padded[..bytes.len()].copy_from_slice(bytes);
    }
    let gate = &rules().gate;
    let mut seen = 0u32;
    for (i, &b) in bytes.iter().enumerate() {
        let candidates = &gate[usize::from(b.to_ascii_lowercase())];
        if candidates.is_empty() {
            continue;
        }
        // The next 8 bytes as one word, zero-padded at the end.
        let rest = &bytes[i..];
        let mut buf = [0u8; 8];
        if short {
            buf.copy_from_slice(&padded[i..i + 8]);
        } else if rest.len() >= 8 {
            buf.copy_from_slice(&rest[..8]);
        } else {
            buf[..rest.len()].copy_from_slice(rest);
        }
        let word = u64::from_le_bytes(buf);
        for lit in candidates {
            if (word | lit.fold) & lit.mask == lit.value
                && (lit.tail.is_empty()
                    || rest
                        .get(8..8 + lit.tail.len())
                        .is_some_and(|t| t.eq_ignore_ascii_case(lit.tail)))
            {
                seen |= 1 << lit.id;
            }
        }
    }
    seen
}

/// A gate literal as a masked 8-byte word (letters folded to lower case when
/// the literal is case-insensitive), and the bytes past the eighth.
struct GateLit {
    id: u32,
    value: u64,
    mask: u64,
    fold: u64,
    tail: &'static [u8],
}

impl GateLit {
    fn new(id: usize) -> Self {
        let (lit, exact) = LITERALS[id];
        let b = lit.as_bytes();
        let (mut value, mut mask, mut fold) = ([0u8; 8], [0u8; 8], [0u8; 8]);
        for (k, &c) in b.iter().take(8).enumerate() {
            mask[k] = 0xff;
            if !exact && c.is_ascii_alphabetic() {
                // Only ASCII letters become lower-case letters with 0x20 set.
                fold[k] = 0x20;
                value[k] = c.to_ascii_lowercase();
            } else {
                value[k] = c;
            }
        }
        GateLit {
            id: id as u32,
            value: u64::from_le_bytes(value),
            mask: u64::from_le_bytes(mask),
            fold: u64::from_le_bytes(fold),
            tail: b.get(8..).unwrap_or(&[]),
        }
    }
}

/// The reference's family gates (`_families` in `tests/sanitize_reference.py`),
/// read on the original string and only where a rule could run. A family's rules
/// run only when its gate passes. Most gates are implied by a match of the
/// family's regex (the literal is part of every match: "-----", "eyJ", "AKIA",
/// "sk-", 13+ digits...), so the set's answer is enough; the others are here:
/// the case-insensitive ones (a regex's `(?i)` also folds 'ſ' to 's', where
/// `str.lower()` does not) and the URL gate for a rule run again after a change.
/// A family's gate holds every one of its rules' own literals: a gate that
/// misses one (once "gh" for "github_pat_", "accountkey" for
/// "SharedAccessKey=") silently skips that rule
/// (`tests/test_sanitize_rules.py` draws every rule's shapes from its regex).
struct Gate<'a> {
    value: &'a str,
    lowered: Option<Cow<'a, str>>,
}

impl<'a> Gate<'a> {
    fn new(value: &'a str) -> Self {
        Gate {
            value,
            lowered: None,
        }
    }

    fn has(&self, literal: &str) -> bool {
        find_bytes(self.value.as_bytes(), literal.as_bytes()).is_some()
    }

    /// `literal in value.lower()`.
    /// `value.lower()`, made once.
    fn lowered(&mut self) -> &[u8] {
        let value = self.value;
        self.lowered
            .get_or_insert_with(|| {
                if value.bytes().any(|b| b.is_ascii_uppercase()) || !value.is_ascii() {
                    Cow::Owned(value.to_lowercase())
                } else {
                    Cow::Borrowed(value)
                }
            })
            .as_bytes()
    }

    /// `literal in value.lower()`.
    fn lower_has(&mut self, literal: &str) -> bool {
        find_bytes(self.lowered(), literal.as_bytes()).is_some()
    }

    /// Every azure rule's own literal: "Q~" (Entra), "accountkey" or
    /// "sharedaccesskey" (connection strings), "sig=" (SAS).
    fn azure(&mut self) -> bool {
        self.has("Q~")
            || self.lower_has("accountkey")
            || self.lower_has("sharedaccesskey")
            || self.lower_has("sig=")
    }

    fn url(&self) -> bool {
        self.has("://") && self.has("@")
    }

    fn kv(&mut self) -> bool {
        let bytes = self.value.as_bytes();
        if !(memchr::memchr2(b':', b'=', bytes).is_some() || self.has("--")) {
            return false;
        }
        if self.value.is_ascii() {
            // The same names, in one pass (ASCII: lowering folds nothing else
            // to them); the first seven gate literals are these names.
            return literals_in(bytes) & 0b111_1111 != 0;
        }
        [
            "pass",
            "pwd",
            "secret",
            "key",
            "token",
            "auth",
            "credential",
        ]
        .iter()
        .any(|name| self.lower_has(name))
    }
}

/// What a rule decides at one match.
enum Verdict {
    /// The lookaround failed: no match here; try one character later.
    Reject,
    /// A match, left as it is (scanning resumes after it).
    Keep,
    /// The match becomes its first `keep` bytes, `mark`, and its last `tail`
    /// bytes (written straight into the output: no string per match).
    Replace {
        keep: usize,
        mark: &'static str,
        tail: usize,
    },
}

impl Verdict {
    /// The whole match becomes `mark`.
    fn mark(mark: &'static str) -> Self {
        Verdict::Replace {
            keep: 0,
            mark,
            tail: 0,
        }
    }

    /// The match's first `keep` bytes stay, the rest becomes `REDACTED`.
    fn redact_after(keep: usize) -> Self {
        Verdict::Replace {
            keep,
            mark: REDACTED,
            tail: 0,
        }
    }
}

/// The groups the judges read, derived from a match's span alone: in every
/// one of these rules a group ends at the first byte of a kind the group
/// cannot hold and the next part must start with, so the span decides them
/// (the test `derived_groups_equal_the_captures` compares them with the
/// regex's own groups). No capture search runs.
///
/// The head of `(?:AccountKey|SharedAccessKey)=...`, `[?&]sig=...` and the
/// entropy rule's `name[ \t]*(?:=|:[ \t]*)value`: through the first '=' or
/// ':' (no name holds one), and the blanks after a ':' (no value starts with one).
fn head_through_separator(m: &str) -> usize {
    let b = m.as_bytes();
    let Some(i) = memchr::memchr2(b'=', b':', b) else {
        return m.len();
    };
    let mut end = i + 1;
    if b[i] == b':' {
        while end < b.len() && matches!(b[end], b' ' | b'\t') {
            end += 1;
        }
    }
    end
}

/// The head of `authorization...basic[ \t]+credential`: through the last
/// blank (the credential holds none).
fn head_through_last_blank(m: &str) -> usize {
    m.bytes()
        .rposition(|b| b == b' ' || b == b'\t')
        .map_or(m.len(), |i| i + 1)
}

/// A key-value match's name and value spans (relative to the match).
struct Pair {
    name_end: usize,
    value: (usize, usize),
}

/// `kv_pair`: the name ends at the first byte that may start the separator
/// (names hold only letters, '_' and '-'); the separator is an optional
/// (escaped) quote, blanks, ':' or '=', and every blank after it (no value
/// starts with a blank); the value is `"dq"`, `'sq'` or `(?:\\["'])?bare`,
/// told apart by its first byte (a bare value never starts with a quote or '\\').
fn kv_pair_groups(m: &str) -> Pair {
    let b = m.as_bytes();
    let name_end = b
        .iter()
        .position(|c| matches!(c, b'\\' | b'"' | b'\'' | b' ' | b'\t' | b':' | b'='))
        .unwrap_or(b.len());
    let sep = memchr::memchr2(b':', b'=', &b[name_end..]).map_or(b.len(), |i| name_end + i + 1);
    let mut v = sep;
    while v < b.len() && matches!(b[v], b' ' | b'\t') {
        v += 1;
    }
    let value = match b.get(v) {
        Some(b'"' | b'\'') => (v + 1, b.len() - 1),
        Some(b'\\') => (v + 2, b.len()),
        _ => (v, b.len()),
    };
    Pair { name_end, value }
}

/// `kv_flag`: `--name`, blanks, then the bare value.
fn kv_flag_groups(m: &str) -> Pair {
    let b = m.as_bytes();
    let name_end = b
        .iter()
        .position(|&c| c == b' ' || c == b'\t')
        .unwrap_or(b.len());
    let mut v = name_end;
    while v < b.len() && matches!(b[v], b' ' | b'\t') {
        v += 1;
    }
    Pair {
        name_end,
        value: (v, b.len()),
    }
}

/// `substitute` for the rules that judge only the whole match.
fn substitute_match(
    text: &str,
    re: &Re,
    mut judge: impl FnMut(usize, usize) -> Verdict,
) -> Option<String> {
    let ascii = text.is_ascii();
    substitute_each(text, |pos| {
        let (start, end) = re.find_at(text, pos, ascii)?;
        Some((start, end, judge(start, end)))
    })
}

/// The substitution loop: `next(pos)` is the next match at or after `pos`
/// (start, end) and the verdict on it.
fn substitute_each(
    text: &str,
    mut next: impl FnMut(usize) -> Option<(usize, usize, Verdict)>,
) -> Option<String> {
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut pos = 0;
    while pos <= text.len() {
        let Some((start, end, verdict)) = next(pos) else {
            break;
        };
        match verdict {
            Verdict::Reject => {
                // The next character boundary after the rejected start.
                pos = start + text[start..].chars().next().map_or(1, char::len_utf8);
                continue;
            }
            Verdict::Keep => {}
            Verdict::Replace { keep, mark, tail } => {
                let o = out.get_or_insert_with(|| String::with_capacity(text.len() + 64));
                o.push_str(&text[copied..start + keep]);
                o.push_str(mark);
                copied = end - tail;
            }
        }
        // The rules never match the empty string; guard anyway.
        pos = if end > start { end } else { end + 1 };
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

/// Python's `\b` at the start of the rules that have one (they start with a
/// letter), and at the end of those that end with one: Rust's `\b` knows other
/// word characters (not '¼', but combining marks), so the boundaries are checked here.
fn bounded_at(text: &str, start: usize, end: usize, trail: bool) -> bool {
    starts_word(text, start) && (!trail || ends_word(text, end))
}

/// The provider-token rules' start (`(?<![^\W_])` in the reference): Python's
/// `\b`, or a '_' before the token, which is glued to a snake_case name there
/// ("comp_sk-proj-...", "MY_TOKEN_ghp_...").
fn starts_token(text: &str, at: usize) -> bool {
    !char_before(text, at).is_some_and(|c| c != '_' && is_word(c))
}

/// A provider token's rule (`starts_token`; `trail`: Python's `\b` after it).
fn replace_with(text: &str, re: &Re, trail: bool, mark: &'static str) -> Option<String> {
    substitute_match(text, re, |start, end| {
        if starts_token(text, start) && (!trail || ends_word(text, end)) {
            Verdict::mark(mark)
        } else {
            Verdict::Reject
        }
    })
}

fn replace_plain(text: &str, re: &Re, mark: &'static str) -> Option<String> {
    substitute_match(text, re, |_, _| Verdict::mark(mark))
}

fn keep_head(text: &str, re: &Re, lead: bool, head: fn(&str) -> usize) -> Option<String> {
    substitute_match(text, re, |start, end| {
        if lead && !bounded_at(text, start, end, false) {
            return Verdict::Reject;
        }
        Verdict::redact_after(head(&text[start..end]))
    })
}

fn char_before(text: &str, at: usize) -> Option<char> {
    text[..at].chars().next_back()
}

/// Python's `\w`: `str.isalnum()` or '_' (letters and numbers of any script).
fn is_word(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    let mut buf = [0u8; 4];
    rules().py_word.is_match(c.encode_utf8(&mut buf))
}

/// Python's `\b` before a match that starts with a word character.
fn starts_word(text: &str, at: usize) -> bool {
    !char_before(text, at).is_some_and(is_word)
}

/// Python's `\b` after a match that ends with a word character.
fn ends_word(text: &str, at: usize) -> bool {
    !text[at..].chars().next().is_some_and(is_word)
}

fn luhn_valid(digits: &[u8]) -> bool {
    let mut total = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if !i.is_multiple_of(2) {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        total += v;
    }
    total.is_multiple_of(10)
}

/// Whether some card network issues numbers with this prefix and length.
/// Luhn alone passes one random number in ten; a real issuer prefix keeps
/// e.g. 16-digit microsecond epochs (which start with 1) out.
fn issuer_length_ok(digits: &[u8]) -> bool {
    let n = digits.len();
    let num = |k: usize| {
        digits[..k]
            .iter()
            .fold(0u32, |a, &d| a * 10 + u32::from(d - b'0'))
    };
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
        && if value.is_ascii() {
            value.bytes().any(|b| b.is_ascii_digit())
        } else {
            rules().digit.is_match(value)
        }
}

/// The key-value rules' verdict on the match `m` and its groups.
fn key_value(m: &str, groups: fn(&str) -> Pair) -> Verdict {
    let Pair {
        name_end,
        value: (vs, ve),
    } = groups(m);
    let value = &m[vs..ve];
    // `str.lower()` of the name: ASCII names (all but the few a non-ASCII
    // letter folds into) on the stack.
    let raw = &m[..name_end];
    let mut buf = [0u8; 32];
    let lowered: Cow<'_, str> = match buf.get_mut(..raw.len()) {
        Some(b) if raw.is_ascii() => {
            b.copy_from_slice(raw.as_bytes());
            b.make_ascii_lowercase();
            std::str::from_utf8(b).map_or_else(|_| Cow::Owned(raw.to_lowercase()), Cow::Borrowed)
        }
        _ => Cow::Owned(raw.to_lowercase()),
    };
    let name: &str = &lowered;
    let weak = matches!(
        name,
        "token" | "auth" | "authorization" | "credential" | "credentials"
    );
    let keep = value.starts_with("***") // already redacted by a more specific rule
        || (name == "pwd" && (value.starts_with('/') || value.starts_with('~'))) // a shell's PWD
        || (weak && !credential_like(value));
    if keep || value.is_empty() {
        return Verdict::Keep;
    }
    Verdict::Replace {
        keep: vs,
        mark: REDACTED,
        tail: m.len() - ve,
    }
}

/// One string through the rules in order. A rule runs only where the one
/// `RegexSet` pass over the original text says its regex matches somewhere (its
/// code checks can still reject).
///
/// The set is not run again after a rule changed the text: a change only ever
/// replaces a substring by a mark (`***NAME***`, with `*` at both ends and only
/// `A-Z` and `_` inside), everything else is kept. A match the original text did
/// not have must therefore use a character of a mark; no rule matches within a
/// mark's letters, and only the rules in `may_match_marks` can match a `*`, so
/// those run whenever the text has changed.
struct Pass<'a> {
    text: Cow<'a, str>,
    /// A bit per rule (`R_*`) that may match the original text (`candidates`).
    set: u32,
    /// A bit per rule that cannot match even after a change.
    never: u32,
    changed: bool,
}

/// The rules whose regex can match a `*` (negated classes, `.`).
fn may_match_marks(index: usize) -> bool {
    matches!(index, R_PEM | R_URL | R_KV_FLAG | R_KV_PAIR)
}

impl Pass<'_> {
    /// Whether one of these rules would run.
    fn wants(&self, indices: &[usize]) -> bool {
        indices.iter().any(|&i| {
            self.never & (1 << i) == 0
                && (self.set & (1 << i) != 0 || (self.changed && may_match_marks(i)))
        })
    }

    /// `rule`, where a change is kept only if `gate()` passes.
    fn rule_gated(
        &mut self,
        index: usize,
        gate: &mut impl FnMut() -> bool,
        step: impl FnOnce(&str) -> Option<String>,
    ) {
        if !self.wants(&[index]) {
            return;
        }
        if let Some(new) = step(&self.text) {
            if gate() {
                self.text = Cow::Owned(new);
                self.changed = true;
            }
        }
    }

    fn rule(&mut self, index: usize, step: impl FnOnce(&str) -> Option<String>) {
        if !self.wants(&[index]) {
            return;
        }
        if let Some(new) = step(&self.text) {
            self.text = Cow::Owned(new);
            self.changed = true;
        }
    }
}

/// The longest run of token characters (`[A-Za-z0-9_.~+/-]`) a string may hold
/// and still match no rule by `surely_clean`: every rule that needs neither
/// ':', '=', "--" nor 13 digits matches such a run of 12 characters or more
/// (Bearer's credential, 12; a JWT, 13; every provider token, 15 or more).
const MAX_CLEAN_RUN: usize = 11;

/// The same for a run of word characters only (`[A-Za-z0-9_]`) in a string
/// without blanks: then no Bearer credential can follow a "bearer", and every
/// provider token made of word characters alone is 20 or longer (AWS; the
/// others 24 or more; the rest hold '-', '.', '~' or ':'). Identifiers such as
/// "step_complete" or "output_tokens" (event types, components, metadata
/// keys, all scrubbed per event) stay on the one-pass path.
const MAX_CLEAN_WORD_RUN: usize = 19;

/// Whether no rule's regex can match `value`, by necessary conditions read in
/// one pass over its bytes (no automaton): ASCII only (a case-insensitive rule
/// also folds some non-ASCII letters), no ':' or '=' (URLs, Azure, key-value
/// pairs, name=value entropy), no "--" (PEM blocks, command-line flags), fewer
/// than 13 digits (card numbers) and no run of token characters longer than
/// `MAX_CLEAN_RUN` (the provider tokens, JWTs, Entra secrets, Bearer values),
/// or `MAX_CLEAN_WORD_RUN` for a run of word characters in a string without blanks.
/// Most log text passes and skips the `RegexSet` pass.
fn surely_clean(value: &str) -> bool {
    let mut run = 0usize;
    // The current run holds word characters only.
    let mut word_run = true;
    // A run of word characters only, longer than `MAX_CLEAN_RUN`, was seen.
    let mut long_word_run = false;
    // A blank (Python's `\s` on ASCII) was seen.
    let mut blank = false;
    let mut digits = 0usize;
    let mut dash = false;
    for &b in value.as_bytes() {
        let c = CLEAN_CLASS[usize::from(b)];
        if c & C_REJECT != 0 {
            return false;
        }
        if c & C_DASH != 0 {
            if dash {
                return false;
            }
            dash = true;
        } else {
            dash = false;
        }
        if c & C_DIGIT != 0 {
            digits += 1;
            if digits >= 13 {
                return false;
            }
        }
        if c & C_RUN != 0 {
            run += 1;
            word_run &= c & C_WORD != 0;
            if run > MAX_CLEAN_RUN {
                if !word_run || run > MAX_CLEAN_WORD_RUN {
                    return false;
                }
                long_word_run = true;
            }
        } else {
            run = 0;
            word_run = true;
            blank |= c & C_BLANK != 0;
        }
    }
    !(long_word_run && blank)
}

/// `surely_clean`'s byte classes: a byte that ends the pass (non-ASCII, ':',
/// '='), '-', a digit, a token character (`[A-Za-z0-9_.~+/-]`), a word
/// character (`[A-Za-z0-9_]`), a blank (`ascii_space`).
const C_REJECT: u8 = 1;
const C_DASH: u8 = 2;
const C_DIGIT: u8 = 4;
const C_RUN: u8 = 8;
const C_WORD: u8 = 16;
const C_BLANK: u8 = 32;

static CLEAN_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0usize;
    while c < 256 {
        let b = c as u8;
        if b >= 0x80 || b == b':' || b == b'=' {
            t[c] |= C_REJECT;
        }
        if b == b'-' {
            t[c] |= C_DASH;
        }
        if b.is_ascii_digit() {
            t[c] |= C_DIGIT;
        }
        if b.is_ascii_alphanumeric() || b == b'_' {
            t[c] |= C_WORD | C_RUN;
        }
        if matches!(b, b'.' | b'~' | b'+' | b'/' | b'-') {
            t[c] |= C_RUN;
        }
        if ascii_space(b) {
            t[c] |= C_BLANK;
        }
        c += 1;
    }
    t
};

/// `candidates`' byte classes: a byte some literal starts with (or '-', ':',
/// '=', '@'), a byte of the entropy value's run (`[A-Za-z0-9+/_-]`), a digit.
const TRIGGER: u8 = 1;
const RUN: u8 = 2;
const DIGIT: u8 = 4;

static BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0usize;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'_' | b'-') {
            t[c] |= RUN;
        }
        if b.is_ascii_digit() {
            t[c] |= DIGIT;
        }
        if matches!(
            b,
            b'-' | b'e'
                | b'A'
                | b'g'
                | b'h'
                | b'x'
                | b's'
                | b'k'
                | b'w'
                | b'Q'
                | b':'
                | b'='
                | b'@'
                | b'b'
                | b'B'
        ) {
            t[c] |= TRIGGER;
        }
        c += 1;
    }
    t
};

/// What `candidates` learns at the bytes it stops at; `finish` turns it into
/// the rules.
#[derive(Default)]
struct Scan {
    set: u32,
    colon_eq: bool,
    eq: bool,
    at_sign: bool,
    url: bool,
    key_eq: bool,
    sig_eq: bool,
    basic: bool,
    kv_named: bool,
    /// The entropy rule's value: a run of 24+ of its characters right after
    /// '=', or ':' and blanks (the head's end, outside the class). The run is
    /// counted at the separator: it starts right after '=', or after ':' and
    /// its blanks (neither is a run character, so each run is counted from at
    /// most one separator).
    entropy: bool,
}

impl Scan {
    /// The byte `b[i]`, a `TRIGGER` byte (not a digit): the literals that start there.
    #[inline(always)]
    fn trigger(&mut self, b: &[u8], i: usize) {
        let at = |i: usize, lit: &[u8]| b.get(i..i + lit.len()) == Some(lit);
        let at_ci = |i: usize, lit: &[u8]| {
            b.get(i..i + lit.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(lit))
        };
        let run_from = |start: usize| {
            b[start..]
                .iter()
                .take(24)
                .take_while(|&&c| BYTE_CLASS[usize::from(c)] & RUN != 0)
                .count()
                >= 24
        };
        let bit = |i: usize| 1u32 << i;
        match b[i] {
            b'-' => {
                if at(i, b"-----BEGIN ") {
                    self.set |= bit(R_PEM);
                }
                if at(i + 1, b"-") {
                    self.set |= bit(R_KV_FLAG);
                }
            }
            b'e' if at(i, b"eyJ") => self.set |= bit(R_JWT),
            b'A' => {
                if at(i + 1, b"KIA") || at(i + 1, b"SIA") || at(i + 1, b"BIA") || at(i + 1, b"CCA")
                {
                    self.set |= bit(R_AWS);
                }
                if at(i, b"AIza") {
                    self.set |= bit(R_APIKEY + 4);
                }
            }
            b'g' => {
                if at(i, b"gh") {
                    self.set |= bit(R_GITHUB);
                }
                if at(i, b"github_pat_") {
                    self.set |= bit(R_GITHUB + 1);
                }
                if at(i, b"gl") {
                    self.set |= bit(R_GITLAB);
                }
            }
            b'h' => {
                if at(i, b"hooks.slack.com/") {
                    self.set |= bit(R_SLACK);
                }
                if at(i, b"hf_") {
                    self.set |= bit(R_APIKEY + 5);
                }
            }
            b'x' => {
                if at(i, b"xox") {
                    self.set |= bit(R_SLACK + 1);
                }
                if at(i, b"xapp-") {
                    self.set |= bit(R_SLACK + 2);
                }
            }
            b's' if at(i, b"sk-") => {
                self.set |= bit(R_APIKEY + 1) | bit(R_APIKEY + 2);
                if at(i, b"sk-ant-") {
                    self.set |= bit(R_APIKEY);
                }
            }
            b'k' if at(i, b"k_live_") || at(i, b"k_test_") => self.set |= bit(R_APIKEY + 3),
            b'w' if at(i, b"whsec_") => self.set |= bit(R_APIKEY + 6),
            b'Q' if at(i, b"Q~") => self.set |= bit(R_AZURE_ENTRA),
            b':' => {
                self.colon_eq = true;
                self.kv_named = self.kv_named || named_before_sep(b, i);
                if at(i, b"://") {
                    self.url = true;
                }
                let blanks = b[i + 1..]
                    .iter()
                    .take_while(|&&p| p == b' ' || p == b'\t')
                    .count();
                self.entropy = self.entropy || run_from(i + 1 + blanks);
            }
            b'=' => {
                self.colon_eq = true;
                self.kv_named = self.kv_named || named_before_sep(b, i);
                self.entropy = self.entropy || run_from(i + 1);
                self.eq = true;
                if i >= 3 && at_ci(i - 3, b"key") {
                    self.key_eq = true;
                }
                if i >= 3 && at_ci(i - 3, b"sig") {
                    self.sig_eq = true;
                }
            }
            b'@' => self.at_sign = true,
            b'b' | b'B' => {
                if at_ci(i, b"bearer") {
                    self.set |= bit(R_BEARER);
                }
                if at_ci(i, b"basic") {
                    self.basic = true;
                }
            }
            _ => {}
        }
    }

    /// The card rule: 13 digits in a row, or 4 digits, ' ' or '-', and 4 digits.
    fn cards(&mut self, b: &[u8]) {
        let mut digits = 0usize;
        for (i, &c) in b.iter().enumerate() {
            if c.is_ascii_digit() {
                digits += 1;
                if digits >= 13 {
                    self.set |= 1 << R_CARD;
                    return;
                }
                continue;
            }
            if digits >= 4
                && matches!(c, b' ' | b'-')
                && b.get(i + 1..i + 5)
                    .is_some_and(|w| w.iter().all(u8::is_ascii_digit))
            {
                self.set |= 1 << R_CARD;
                return;
            }
            digits = 0;
        }
    }

    fn finish(self, ascii: bool) -> u32 {
        let mut set = self.set;
        let bit = |i: usize| 1u32 << i;
        if self.eq && (!ascii || self.key_eq) {
            set |= bit(R_AZURE_CONN);
        }
        if self.eq && (!ascii || self.sig_eq) {
            set |= bit(R_AZURE_SIG);
        }
        if self.url && self.at_sign {
            set |= bit(R_URL);
        }
        if self.colon_eq {
            if !ascii || self.kv_named {
                set |= bit(R_KV_PAIR);
            }
            if !ascii || self.basic {
                set |= bit(R_KV_BASIC);
            }
            if self.entropy {
                set |= bit(R_ENTROPY);
            }
        }
        set
    }
}

/// The rules (a bit per `R_*`) whose regex may match `value`: for each, a
/// literal or a shape every one of its matches holds, so that a rule left out
/// surely has no match (a rule let in may still find none: it then changes
/// nothing). One byte pass instead of an
/// overlapping `RegexSet` pass, which cost several times more on the strings
/// that hold a secret. A case-insensitive rule whose literal has a letter some
/// non-ASCII character folds to ('s', 'k') is let in on any non-ASCII text.
///
/// On x86-64 the bytes where a literal may start are found 16 at a time
/// (`trigger_mask`, SSE2, which every x86-64 has) and only those are read one
/// by one; elsewhere, and as the reference the tests compare it with, byte by
/// byte (`candidates_scalar`). Both give the same answer on every string.
fn candidates(value: &str) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        candidates_sse2(value)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        candidates_scalar(value)
    }
}

/// `candidates`, one byte at a time.
#[cfg(any(test, not(target_arch = "x86_64")))]
fn candidates_scalar(value: &str) -> u32 {
    let b = value.as_bytes();
    let mut scan = Scan::default();
    let mut digits = 0usize;
    for (i, &c) in b.iter().enumerate() {
        let class = BYTE_CLASS[usize::from(c)];
        if class & DIGIT != 0 {
            digits += 1;
            if digits >= 13 {
                scan.set |= 1 << R_CARD;
            }
            continue;
        }
        if digits != 0 {
            if digits >= 4
                && matches!(c, b' ' | b'-')
                && b.get(i + 1..i + 5)
                    .is_some_and(|w| w.iter().all(u8::is_ascii_digit))
            {
                scan.set |= 1 << R_CARD;
            }
            digits = 0;
        }
        if class & TRIGGER != 0 {
            scan.trigger(b, i);
        }
    }
    scan.finish(value.is_ascii())
}

/// `candidates` with SSE2: per 16 bytes, a mask of the places where one of
/// `Scan::trigger`'s branches can hold (its byte and the next: "--", "ey",
/// "AK", "AS", "AB", "AC", "AI", "gh", "gi", "gl", "ho", "hf", "xo", "xa", "sk",
/// "k_", "wh", "Q~", "be" and "ba" in any case; ':', '=', '@'), and a count
/// of digits: the card rule needs 8 at least (4, a separator, 4), and only
/// then is it looked for (in the digit and separator masks of a string of at
/// most 128 bytes, byte by byte in a longer one).
#[cfg(target_arch = "x86_64")]
fn candidates_sse2(value: &str) -> u32 {
    let b = value.as_bytes();
    let mut scan = Scan::default();
    let mut digits = 0u32;
    // The digit and separator masks of the first 128 bytes, by block.
    let mut blocks = [(0u16, 0u16); 8];
    let mut i = 0;
    // The last block is read from a zero-padded copy (no literal starts
    // with a zero byte, and the mask keeps only places inside the string).
    let mut tail = [0u8; 33];
    while i < b.len() {
        let (block, valid): (&[u8], u32) = if b.len() - i > 16 {
            (&b[i..i + 17], 0xffff)
        } else {
            let n = b.len() - i;
            tail[..n].copy_from_slice(&b[i..]);
            tail[n..].fill(0);
            (&tail[..17], (1u32 << n) - 1)
        };
        // SAFETY: `block` holds 17 bytes, so both 16-byte loads are in bounds;
        // SSE2 is part of x86-64.
        let (mut mask, digit_mask, sep_mask) = unsafe { trigger_mask(block) };
        mask &= valid;
        let digit_mask = digit_mask & valid;
        digits += digit_mask.count_ones();
        if i < 128 {
            blocks[i / 16] = (digit_mask as u16, (sep_mask & valid) as u16);
        }
        while mask != 0 {
            let j = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            scan.trigger(b, i + j);
        }
        i += 16;
    }
    if digits >= 8 {
        if b.len() <= 128 {
            let (mut digit_bits, mut sep_bits) = (0u128, 0u128);
            for (k, &(d, sep)) in blocks.iter().enumerate() {
                digit_bits |= u128::from(d) << (16 * k);
                sep_bits |= u128::from(sep) << (16 * k);
            }
            if card_in_masks(digit_bits, sep_bits) {
                scan.set |= 1 << R_CARD;
            }
        } else {
            scan.cards(b);
        }
    }
    scan.finish(value.is_ascii())
}

/// The trigger, digit and card separator (' ', '-') masks of `block[..16]`
/// (`block[16]` is the byte after the last).
///
/// # Safety
/// `block.len() >= 17`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn trigger_mask(block: &[u8]) -> (u32, u32, u32) {
    use std::arch::x86_64::*;
    let v0 = _mm_loadu_si128(block.as_ptr().cast());
    let v1 = _mm_loadu_si128(block.as_ptr().add(1).cast());
    let eq0 = |c: u8| _mm_cmpeq_epi8(v0, _mm_set1_epi8(c as i8));
    let eq1 = |c: u8| _mm_cmpeq_epi8(v1, _mm_set1_epi8(c as i8));
    let or = |a: __m128i, b: __m128i| _mm_or_si128(a, b);
    let and = |a: __m128i, b: __m128i| _mm_and_si128(a, b);
    let lower0 = _mm_or_si128(v0, _mm_set1_epi8(0x20));
    let lower1 = _mm_or_si128(v1, _mm_set1_epi8(0x20));
    let mut m = or(or(eq0(b':'), eq0(b'=')), eq0(b'@'));
    m = or(m, and(eq0(b'-'), eq1(b'-')));
    m = or(m, and(eq0(b'e'), eq1(b'y')));
    let a_next = or(
        or(or(eq1(b'K'), eq1(b'S')), or(eq1(b'B'), eq1(b'C'))),
        eq1(b'I'),
    );
    m = or(m, and(eq0(b'A'), a_next));
    m = or(m, and(eq0(b'g'), or(or(eq1(b'h'), eq1(b'i')), eq1(b'l'))));
    m = or(m, and(eq0(b'h'), or(eq1(b'o'), eq1(b'f'))));
    m = or(m, and(eq0(b'x'), or(eq1(b'o'), eq1(b'a'))));
    m = or(m, and(eq0(b's'), eq1(b'k')));
    m = or(m, and(eq0(b'k'), eq1(b'_')));
    m = or(m, and(eq0(b'w'), eq1(b'h')));
    m = or(m, and(eq0(b'Q'), eq1(b'~')));
    // 'b' or 'B' then 'e'/'E' or 'a'/'A' (only 'B' and 'b' become 'b' with 0x20 set).
    let ea = or(
        _mm_cmpeq_epi8(lower1, _mm_set1_epi8(b'e' as i8)),
        _mm_cmpeq_epi8(lower1, _mm_set1_epi8(b'a' as i8)),
    );
    m = or(
        m,
        and(_mm_cmpeq_epi8(lower0, _mm_set1_epi8(b'b' as i8)), ea),
    );
    // Digits: byte - '0' <= 9, unsigned.
    let d = _mm_sub_epi8(v0, _mm_set1_epi8(b'0' as i8));
    let nine = _mm_set1_epi8(9);
    let digit = _mm_cmpeq_epi8(_mm_min_epu8(d, nine), d);
    let sep = or(eq0(b' '), eq0(b'-'));
    (
        _mm_movemask_epi8(m) as u32,
        _mm_movemask_epi8(digit) as u32,
        _mm_movemask_epi8(sep) as u32,
    )
}

/// The card rule's shapes on the masks of a string of at most 128 bytes (bit
/// `k`: a digit, or ' ' or '-', at `k`): 13 digits in a row, or 4 digits,
/// ' ' or '-', and 4 digits (`Scan::cards`).
#[cfg(target_arch = "x86_64")]
fn card_in_masks(digit: u128, sep: u128) -> bool {
    // Bit k of `run4`: digits at k..k+4.
    let run2 = digit & (digit >> 1);
    let run4 = run2 & (run2 >> 2);
    let run8 = run4 & (run4 >> 4);
    let run13 = run8 & (run4 >> 8) & (digit >> 12);
    // 4 digits ending just before k, then the separator at k, then 4 digits.
    run13 != 0 || (run4 << 4) & sep & (run4 >> 1) != 0
}

/// The ends of the key-value rule's names (`STRONG_NAMES`, `WEAK_NAMES`), lower case.
const NAME_ENDS: &[&[u8]] = &[
    b"word", b"wd", b"phrase", b"secret", b"key", b"token", b"auth", b"ion", b"tial", b"tials",
];

/// Whether the `:` or `=` at `b[i]` may end a key-value rule's separator: the
/// bytes before it, past blanks and an optional (escaped) quote, end like one
/// of its names (ASCII case-insensitively). Every match of the rule has such a
/// separator; in ASCII text a mark never makes a new one (a mark starts and
/// ends with `*`, and the URL rule's `:` was there before).
fn named_before_sep(b: &[u8], i: usize) -> bool {
    let mut j = i;
    while j > 0 && matches!(b[j - 1], b' ' | b'\t') {
        j -= 1;
    }
    if j > 0 && matches!(b[j - 1], b'"' | b'\'') {
        j -= 1;
        if j > 0 && b[j - 1] == b'\\' {
            j -= 1;
        }
    }
    let head = &b[..j];
    // Only the ends with the head's last letter are compared.
    let ends: &[&[u8]] = match head.last().map(u8::to_ascii_lowercase) {
        Some(b'd') => &[b"word", b"wd"],
        Some(b'e') => &[b"phrase"],
        Some(b't') => &[b"secret"],
        Some(b'y') => &[b"key"],
        Some(b'n') => &[b"token", b"ion"],
        Some(b'h') => &[b"auth"],
        Some(b'l') => &[b"tial"],
        Some(b's') => &[b"tials"],
        _ => return false,
    };
    debug_assert!(ends.iter().all(|e| NAME_ENDS.contains(e)));
    ends.iter().any(|end| {
        head.len() >= end.len() && head[head.len() - end.len()..].eq_ignore_ascii_case(end)
    })
}

/// `value` with every secret replaced by a `***...***` mark (borrowed when clean).
pub fn sanitize(value: &str) -> Cow<'_, str> {
    if surely_clean(value) {
        return Cow::Borrowed(value);
    }
    // No rule's regex can match anywhere: nothing can change (most strings end here).
    let set = candidates(value);
    if set == 0 {
        return Cow::Borrowed(value);
    }
    let mut gate = Gate::new(value);
    let r = rules();
    // In ASCII text without a named separator the key-value rule cannot match,
    // even after other rules' marks (see `named_before_sep`).
    let never = if value.is_ascii() && set & (1 << R_KV_PAIR) == 0 {
        1 << R_KV_PAIR
    } else {
        0
    };
    let mut p = Pass {
        text: Cow::Borrowed(value),
        set,
        never,
        changed: false,
    };
    p.rule(R_PEM, |s| replace_plain(s, &r.pem, "***PRIVATE_KEY***"));
    p.rule(R_JWT, |s| replace_with(s, &r.jwt, false, "***JWT***"));
    p.rule(R_AWS, |s| {
        replace_with(s, &r.aws, true, "***AWS_ACCESS_KEY***")
    });
    p.rule(R_GITHUB, |s| {
        replace_with(s, &r.github[0], true, "***GITHUB_TOKEN***")
    });
    // Gated on its own literal ("github_pat_", in every match: the set's
    // answer), not on the "gh" of the family's other rule, which it lacks.
    p.rule(R_GITHUB + 1, |s| {
        replace_with(s, &r.github[1], false, "***GITHUB_TOKEN***")
    });
    p.rule(R_GITLAB, |s| {
        replace_with(s, &r.gitlab, false, "***GITLAB_TOKEN***")
    });
    {
        let (webhook, mark) = &r.slack[0];
        p.rule(R_SLACK, |s| replace_plain(s, webhook, mark));
        for (k, (rule, mark)) in r.slack[1..].iter().enumerate() {
            p.rule(R_SLACK + 1 + k, |s| replace_with(s, rule, false, mark));
        }
    }
    let trails = [false, false, true, false, false, false, false];
    for (k, (rule, trail)) in r.apikey.iter().zip(trails).enumerate() {
        p.rule(R_APIKEY + k, |s| {
            replace_with(s, rule, trail, "***API_KEY***")
        });
    }
    if p.wants(&[R_AZURE_CONN, R_AZURE_SIG, R_AZURE_ENTRA]) && gate.azure() {
        p.rule(R_AZURE_CONN, |s| {
            keep_head(s, &r.azure_conn, true, head_through_separator)
        });
        p.rule(R_AZURE_SIG, |s| {
            keep_head(s, &r.azure_sig, false, head_through_separator)
        });
        p.rule(R_AZURE_ENTRA, |s| {
            substitute_match(s, &r.azure_entra, |start, _| match char_before(s, start) {
                Some(p) if is_word(p) || matches!(p, '~' | '.' | '-') => Verdict::Reject,
                _ => Verdict::mark("***AZURE_SECRET***"),
            })
        });
    }
    if p.wants(&[R_URL]) && gate.url() {
        p.rule(R_URL, |s| {
            substitute_match(s, &r.url, |start, end| {
                if bounded_at(s, start, end, false) {
                    // The head ends at the first ':' after "://": neither the
                    // scheme nor the user part can hold one.
                    let m = &s[start..end];
                    let user = find_bytes(m.as_bytes(), b"://").map_or(0, |i| i + 3);
                    let head = user + m[user..].find(':').unwrap_or(m.len() - user);
                    Verdict::Replace {
                        keep: head,
                        mark: URL_PASSWORD,
                        tail: 0,
                    }
                } else {
                    Verdict::Reject
                }
            })
        });
    }
    // The gate ("bearer" in value.lower()) is the candidate test itself: no
    // non-ASCII character lowers or folds to one of "bearer"'s letters, and the
    // rule is not run again after a change (it cannot match a mark).
    if p.wants(&[R_BEARER]) {
        p.rule(R_BEARER, |s| {
            substitute_match(s, &r.bearer, |start, end| {
                // The groups, read off the match: "bearer" (6 ASCII bytes: no
                // other character folds to its letters), the blank run, then `v`,
                // the longest run of the credential's characters.
                let m = &s[start..end];
                let blank = m[6..]
                    .find(|c: char| !(c.is_whitespace() || ('\x1C'..='\x1F').contains(&c)))
                    .unwrap_or(m.len() - 6);
                let head = 6 + blank;
                let v_len = m.as_bytes()[head..]
                    .iter()
                    .take_while(|b| b.is_ascii_alphanumeric() || b"._~+/-".contains(b))
                    .count();
                let v = &m[head..head + v_len];
                // Python's lookahead: a digit within the run or just after it.
                let digit = v.bytes().any(|b| b.is_ascii_digit())
                    || s[start + head + v_len..].chars().next().is_some_and(|ch| {
                        let mut buf = [0u8; 4];
                        r.digit.is_match(ch.encode_utf8(&mut buf))
                    });
                if digit && bounded_at(s, start, end, false) {
                    Verdict::redact_after(head)
                } else {
                    Verdict::Reject
                }
            })
        });
    }
    if p.wants(&[R_KV_BASIC, R_KV_FLAG, R_KV_PAIR]) {
        // The family's gate is read only when a rule would change the text: a
        // change it vetoes is dropped, as if the rules had not run (most texts
        // they run on, after another rule's change, hold no pair).
        let mut kv_gate: Option<bool> = None;
        let mut gate_ok = || *kv_gate.get_or_insert_with(|| gate.kv());
        p.rule_gated(R_KV_BASIC, &mut gate_ok, |s| {
            keep_head(s, &r.kv_basic, false, head_through_last_blank)
        });
        // Run again after a change only where its literal "--" still is.
        if p.set & (1 << R_KV_FLAG) != 0 || find_bytes(p.text.as_bytes(), b"--").is_some() {
            p.rule_gated(R_KV_FLAG, &mut gate_ok, |s| {
                substitute_match(s, &r.kv_flag, |a, b| key_value(&s[a..b], kv_flag_groups))
            });
        }
        p.rule_gated(R_KV_PAIR, &mut gate_ok, |s| {
            substitute_match(s, &r.kv_pair, |a, b| key_value(&s[a..b], kv_pair_groups))
        });
    }
    p.rule(R_ENTROPY, |s| {
        substitute_match(s, &r.entropy, |m_start, m_end| {
            let name_run = |ch: char| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-');
            if char_before(s, m_start).is_some_and(name_run) {
                return Verdict::Reject;
            }
            let after = s[m_end..].chars().next();
            if after.is_some_and(|ch| {
                ch.is_ascii_alphanumeric() || matches!(ch, '+' | '/' | '_' | '=' | '.' | ':' | '-')
            }) {
                return Verdict::Reject;
            }
            let m = &s[m_start..m_end];
            let head = head_through_separator(m);
            if high_entropy(&m[head..]) {
                Verdict::redact_after(head)
            } else {
                Verdict::Keep
            }
        })
    });
    p.rule(R_CARD, |s| {
        substitute_match(s, &r.card, |start, end| {
            let mut before = s[..start].chars().rev();
            let p1 = before.next();
            let p2 = before.next();
            if p1.is_some_and(|p| is_word(p) || matches!(p, '.' | '+' | '-'))
                || (p1.is_some_and(|p| p == ' ' || p == '-')
                    && p2.is_some_and(|p| p.is_ascii_digit()))
            {
                return Verdict::Reject;
            }
            let mut after = s[end..].chars();
            let a1 = after.next();
            let a2 = after.next();
            if a1.is_some_and(is_word)
                || (a1.is_some_and(|a| matches!(a, '.' | ',' | ' ' | '-'))
                    && a2.is_some_and(|a| a.is_ascii_digit()))
            {
                return Verdict::Reject;
            }
            let digits: Vec<u8> = s[start..end].bytes().filter(u8::is_ascii_digit).collect();
            if issuer_length_ok(&digits) && luhn_valid(&digits) {
                Verdict::mark("***CARD_NUMBER***")
            } else {
                Verdict::Keep
            }
        })
    });
    p.text
}

/// Whether a metadata key names a credential (its string value is redacted
/// whatever it holds).
pub fn is_sensitive_key(key: &str) -> bool {
    // Most keys hold none of the names: no regex work.
    let named = literals_in(key.as_bytes()) & KEY_NAMES != 0 || !key.is_ascii();
    named && rules().sensitive_key.is_match(key)
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

/// The text of the JSON string `src[start..end]` (quotes included).
fn json_text(src: &[u8], start: usize, end: usize, escaped: bool) -> Cow<'_, str> {
    if escaped {
        match serde_json::from_slice::<String>(&src[start..end]) {
            Ok(s) => Cow::Owned(s),
            Err(_) => Cow::Borrowed(""),
        }
    } else {
        String::from_utf8_lossy(&src[start + 1..end.saturating_sub(1).max(start + 1)])
    }
}

/// The name a key scrubbed to `scrubbed` takes in its object, so that no value
/// is lost to a duplicate key: `scrubbed` itself unless `is_key` (an original
/// key of the object: those keep their names) or `given` (the names already
/// given to scrubbed keys of the object) holds it; then the first free
/// `scrubbed#2`, `scrubbed#3`, ... (`LogSanitizer.sanitize_dict` does the same).
pub fn unique_key(
    scrubbed: String,
    is_key: &mut dyn FnMut(&str) -> bool,
    given: &[String],
) -> String {
    let mut free = |name: &str| !given.iter().any(|g| g == name) && !is_key(name);
    if free(&scrubbed) {
        return scrubbed;
    }
    // The object's keys are finitely many: some suffix is free.
    (2u64..)
        .map(|n| format!("{scrubbed}#{n}"))
        .find(|name| free(name))
        .unwrap_or(scrubbed)
}

/// The keys of the JSON object opening at `src[open] == b'{'` (one valid JSON
/// text), decoded.
fn object_keys(src: &[u8], open: usize) -> Vec<String> {
    let mut keys = Vec::new();
    let mut depth = 0usize;
    let mut expect_key = false;
    let mut i = open;
    while i < src.len() {
        match src[i] {
            b'{' | b'[' => {
                depth += 1;
                expect_key = depth == 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
            }
            b',' if depth == 1 => expect_key = true,
            b'"' => {
                let (end, escaped) = string_end(src, i);
                if depth == 1 && expect_key {
                    keys.push(json_text(src, i, end, escaped).into_owned());
                    expect_key = false;
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    keys
}

/// One open container of `sanitize_json`.
struct Frame {
    object: bool,
    /// Where it opens.
    open: usize,
    /// An object's original keys, read when one of them is first scrubbed.
    keys: Option<Vec<String>>,
    /// The names given to its scrubbed keys (`unique_key`).
    given: Vec<String>,
}

/// Sanitise every string of a JSON object (one valid JSON text, as the writer
/// checks it): values and keys are scrubbed, a non-empty string under a
/// credential-named key (its name as written) becomes `***REDACTED***`, and a
/// scrubbed key that would repeat a key of its object is renamed
/// (`unique_key`). Everything else is copied byte for byte; borrowed when
/// nothing changed.
pub fn sanitize_json(src: &[u8]) -> Cow<'_, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut stack: Vec<Frame> = Vec::new();
    let mut expect_key = false;
    // The last key read (its span and whether it holds an escape): whether it
    // names a credential is asked only when its value is a non-empty string.
    let mut key = (0usize, 0usize, false);
    let mut i = 0;
    while i < src.len() {
        match src[i] {
            c @ (b'{' | b'[') => {
                stack.push(Frame {
                    object: c == b'{',
                    open: i,
                    keys: None,
                    given: Vec::new(),
                });
                expect_key = c == b'{';
            }
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
            }
            b',' => expect_key = stack.last().is_some_and(|f| f.object),
            b':' => expect_key = false,
            b'"' => {
                let (end, escaped) = string_end(src, i);
                let text = json_text(src, i, end, escaped);
                let new: Option<Cow<'_, str>> = if expect_key {
                    key = (i, end, escaped);
                    match (sanitize(&text), stack.last_mut()) {
                        (Cow::Owned(scrubbed), Some(frame)) => {
                            let keys = frame
                                .keys
                                .get_or_insert_with(|| object_keys(src, frame.open));
                            let name = unique_key(
                                scrubbed,
                                &mut |n| keys.iter().any(|k| k == n),
                                &frame.given,
                            );
                            frame.given.push(name.clone());
                            Some(Cow::Owned(name))
                        }
                        _ => None,
                    }
                } else {
                    let in_object = stack.last().is_some_and(|f| f.object);
                    let sensitive = in_object
                        && !text.is_empty()
                        && is_sensitive_key(&json_text(src, key.0, key.1, key.2));
                    if sensitive {
                        Some(Cow::Borrowed(REDACTED))
                    } else {
                        match sanitize(&text) {
                            Cow::Owned(s) => Some(Cow::Owned(s)),
                            Cow::Borrowed(_) => None,
                        }
                    }
                };
                if let Some(new) = new {
                    let o = out.get_or_insert_with(|| Vec::with_capacity(src.len() + 32));
                    o.extend_from_slice(&src[copied..i]);
                    crate::parse::push_json_str(o, &new);
                    copied = end;
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

    /// Strings the one-pass pre-check calls clean match no rule of the set:
    /// generated near every condition it checks (lengths, separators, digits).
    #[test]
    fn surely_clean_implies_no_rule_matches() {
        let pieces = [
            "a",
            "Reasoning",
            "gpt-4o-mini",
            " ",
            "-",
            "_",
            ".",
            "~",
            "+",
            "/",
            "0",
            "9",
            "Q",
            "sk",
            "sk-",
            "ghp_",
            "xoxb-",
            "eyJ",
            "AKIA",
            "Bearer ",
            "bearer\t",
            "token",
            "pass",
            "key",
            "hf_",
            "AIza",
            "whsec_",
            "glpat-",
            "1234",
            "4111 ",
            "@",
            "!",
            ",",
            "\"",
            "abcdefghijk",
            "ABCDEFGHIJ12",
            "0123456789",
            "Q~",
            "github_pat_",
            "3Q~",
            "step_complete",
            "AKIAIOSFODNN7EXAMPL",
            "bcdefghijklmnopqrs",
            "\x1c",
            "\n",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut checked = 0;
        for _ in 0..200_000 {
            let n = 1 + (next() % 8) as usize;
            let s: String = (0..n)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            if surely_clean(&s) {
                checked += 1;
                assert!(!rule_set().is_match(&s), "{s:?}");
            }
        }
        assert!(checked > 10_000, "{checked}");
        for s in [
            "Reasoning completed",
            "gpt-4o-mini",
            "Acme Corp is a mid-size vendor",
            "step_complete",
            "output_tokens",
            "abcdefghij012345678",
        ] {
            assert!(surely_clean(s), "{s}");
        }
        for s in [
            "Bearer 0123456789ab",
            "a:b",
            "x=y",
            "--token",
            "4111111111111",
            "abcdefghijkl x",
            "x\u{1c}abcdefghijkl",
            "abcdefghij0123456789",
            "abcdefghijk.",
            "caf\u{e9}",
        ] {
            assert!(!surely_clean(s), "{s}");
        }
    }

    /// `candidates` lets in every rule the `RegexSet` of all rules says matches
    /// (it may let in more): strings made of pieces near every literal it reads.
    #[test]
    fn candidates_hold_every_matching_rule() {
        let pieces = [
            "a",
            "Z",
            " ",
            "\t",
            "-",
            "--",
            "_",
            ".",
            "~",
            "+",
            "/",
            "=",
            ":",
            "@",
            "?",
            "&",
            "0",
            "1234",
            "4111",
            "41111111",
            "9",
            "Q~",
            "3Q~",
            "sk-",
            "sk-ant-",
            "sk-proj-",
            "rk_live_",
            "sk_test_",
            "AIza",
            "hf_",
            "whsec_",
            "gh",
            "ghp_",
            "github_pat_",
            "glpat-",
            "xoxb-",
            "xapp-1-",
            "https://",
            "hooks.slack.com/services/",
            "eyJ",
            "AKIA",
            "ASIA",
            "-----BEGIN RSA PRIVATE KEY-----",
            "Bearer ",
            "bEaReR\t",
            "Authorization: Basic ",
            "AccountKey=",
            "\u{212a}ey=",
            "SharedAcce\u{17f}sKey=",
            "?sig=",
            "&SIG=",
            "password=",
            "pa\u{17f}sword: ",
            "--token ",
            "api_key",
            "abcdefghijklmnopqrstuvwx",
            "ABCDEFGHIJKL",
            "mnopqrstuvwxyz012345",
            "\u{e9}",
            "\"",
            "'",
            ",",
            "user:pw@",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut matched = 0;
        for _ in 0..100_000 {
            let n = 1 + (next() % 10) as usize;
            let s: String = (0..n)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            let got = candidates(&s);
            for i in rule_set().matches(&s).iter() {
                matched += 1;
                assert!(got & (1 << i) != 0, "rule {i} on {s:?}");
            }
        }
        assert!(matched > 50_000, "{matched}");
    }

    /// The SSE2 pass gives exactly the byte-by-byte pass's answer: strings of
    /// pieces near every literal and separator, random bytes (ASCII and not),
    /// at every length and alignment around the 16-byte blocks.
    #[test]
    fn candidates_sse2_equals_the_byte_pass() {
        let pieces = [
            "a",
            "Z",
            " ",
            "\t",
            "-",
            "--",
            "_",
            ".",
            "~",
            "+",
            "/",
            "=",
            ":",
            "@",
            "0",
            "1234",
            "4111",
            "41111111",
            "9",
            "Q~",
            "sk-",
            "sk-ant-",
            "sk-proj-",
            "rk_live_",
            "sk_test_",
            "k_",
            "AIza",
            "AK",
            "AKIA",
            "ASIA",
            "ABIA",
            "ACCA",
            "hf_",
            "whsec_",
            "wh",
            "gh",
            "ghp_",
            "gi",
            "github_pat_",
            "gl",
            "glpat-",
            "xo",
            "xoxb-",
            "xa",
            "xapp-1-",
            "https://",
            "ho",
            "hooks.slack.com/services/",
            "ey",
            "eyJ",
            "-----BEGIN RSA PRIVATE KEY-----",
            "Bearer ",
            "bEaReR\t",
            "BASIC",
            "Authorization: Basic ",
            "AccountKey=",
            "key=",
            "\u{212a}ey=",
            "?sig=",
            "&SIG=",
            "password=",
            "pa\u{17f}sword: ",
            "--token ",
            "abcdefghijklmnopqrstuvwx",
            "ABCDEFGHIJKL",
            "\u{e9}",
            "\0",
            "\"",
            "'",
            "user:pw@",
            "4111 1111 1111 1111",
            "1234-5678",
            "token: ",
            "\u{1F600}",
        ];
        let mut seed = 0x6a09_e667_f3bc_c908u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut nonzero = 0;
        for round in 0..200_000 {
            let s: String = if round % 4 == 0 {
                // Random bytes, mostly ASCII, as a valid string.
                let n = (next() % 70) as usize;
                let bytes: Vec<u8> = (0..n)
                    .map(|_| {
                        let r = next();
                        if r % 17 == 0 {
                            0x80 | (r >> 8) as u8
                        } else {
                            (r >> 8) as u8 & 0x7f
                        }
                    })
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                let n = 1 + (next() % 12) as usize;
                (0..n)
                    .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                    .collect()
            };
            let want = candidates_scalar(&s);
            nonzero += usize::from(want != 0);
            assert_eq!(candidates(&s), want, "{s:?}");
            // Longer than the card masks hold (130 bytes and more).
            let long = format!("{}{s}", "x".repeat(130));
            assert_eq!(candidates(&long), candidates_scalar(&long), "{long:?}");
            // The same string at every offset of a 16-byte block.
            for pad in 1..17 {
                let t = format!("{}{s}", " ".repeat(pad));
                assert_eq!(candidates(&t), candidates_scalar(&t), "{t:?}");
            }
        }
        assert!(nonzero > 100_000, "{nonzero}");
    }

    /// Every name end is found whatever its case, with blanks and quotes
    /// before the separator; other last letters are not.
    #[test]
    fn named_before_sep_knows_every_name_end() {
        for end in NAME_ENDS {
            let end = std::str::from_utf8(end).unwrap();
            for text in [
                format!("x{end}="),
                format!("{}:", end.to_uppercase()),
                format!("{end} \t:"),
                format!("{end}\\\":"),
            ] {
                let b = text.as_bytes();
                assert!(named_before_sep(b, b.len() - 1), "{text:?}");
            }
        }
        for text in ["word_=", "wdx:", "ke=", "tia:", "=", "secrets ="] {
            assert!(
                !named_before_sep(text.as_bytes(), text.len() - 1),
                "{text:?}"
            );
        }
    }

    type HeadFn = fn(&str) -> usize;
    type PairFn = fn(&str) -> Pair;

    /// The groups derived from a match's span are the regex's own groups, on
    /// strings near every separator, quote and escape (ASCII and not).
    #[test]
    fn derived_groups_equal_the_captures() {
        let r = rules();
        let pieces = [
            "a",
            "Z",
            " ",
            "\t",
            "\n",
            "\x1c",
            "-",
            "--",
            "_",
            ".",
            "/",
            "+",
            "%",
            "=",
            "==",
            ":",
            "?",
            "&",
            "0",
            "1234",
            "\"",
            "'",
            "\\",
            "\\\"",
            ",",
            ";",
            "\u{e9}",
            "\u{17f}",
            "\u{212a}",
            "password",
            "PASSWD",
            "pa\u{17f}sword",
            "secret_key",
            "secret-",
            "api-key",
            "Token",
            "auth",
            "Authorization",
            "credentials",
            "pwd",
            "--token",
            "--api-key",
            "--token ",
            "--PASS\t",
            "--secret  ",
            "--client-secret",
            "basic",
            "Basic ",
            "AccountKey=",
            "sharedaccesskey=",
            "&sig=",
            "?SIG=",
            "abcdefghijklmnopqrstuvwx",
            "ABCDEFGHIJKL0123",
            "Zk3pQ9vL2mN8rT5wY1aB7cD4",
        ];
        let mut seed = 0x6a09_e667_f3bc_c908u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let place = |re: &bytes::Regex, name: &str| {
            re.capture_names().position(|n| n == Some(name)).unwrap()
        };
        let mut checked = [0usize; 3];
        for _ in 0..40_000 {
            let n = 1 + (next() % 10) as usize;
            let s: String = (0..n)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            let b = s.as_bytes();
            let heads: [(&Re, HeadFn); 4] = [
                (&r.azure_conn, head_through_separator),
                (&r.azure_sig, head_through_separator),
                (&r.entropy, head_through_separator),
                (&r.kv_basic, head_through_last_blank),
            ];
            for (rule, head) in heads {
                let re = &rule.uni;
                for c in re.captures_iter(b) {
                    let (m, h) = (c.get(0).unwrap(), c.get(place(re, "head")).unwrap());
                    assert_eq!(head(&s[m.range()]), h.len(), "{} on {s:?}", re.as_str());
                    checked[0] += 1;
                }
            }
            let pairs: [(&Re, PairFn, &[&str]); 2] = [
                (&r.kv_pair, kv_pair_groups, &["dq", "sq", "bare"]),
                (&r.kv_flag, kv_flag_groups, &["bare"]),
            ];
            for (k, (rule, groups, values)) in pairs.into_iter().enumerate() {
                let re = &rule.uni;
                for c in re.captures_iter(b) {
                    let m = c.get(0).unwrap();
                    let got = groups(&s[m.range()]);
                    let name = c.get(place(re, "name")).unwrap();
                    assert_eq!(got.name_end, name.end() - m.start(), "{s:?}");
                    let v = values.iter().find_map(|g| c.get(place(re, g))).unwrap();
                    let want = (v.start() - m.start(), v.end() - m.start());
                    assert_eq!(got.value, want, "{} on {s:?}", re.as_str());
                    checked[1 + k] += 1;
                }
            }
        }
        assert!(checked.iter().all(|&n| n > 1000), "{checked:?}");
    }

    /// The rules searched as `Token`s find, from every start, what their
    /// regex finds (strings near every literal, class edge and length).
    #[test]
    fn tokens_find_what_their_regex_finds() {
        let r = rules();
        let mut all: Vec<&Re> = vec![&r.aws, &r.gitlab, &r.slack[1].0];
        all.extend(&r.github);
        all.extend(&r.apikey);
        let all: Vec<&Re> = all.into_iter().filter(|re| re.token.is_some()).collect();
        assert_eq!(all.len(), 12);
        let pieces = [
            "a",
            "Z",
            "0",
            "_",
            "-",
            "+",
            "/",
            "=",
            ".",
            " ",
            "\u{e9}",
            "A",
            "AKIA",
            "ASIA",
            "ACCA",
            "ABCDEFGHIJ012345",
            "gh",
            "ghp_",
            "ghs_",
            "gh_",
            "github_pat_",
            "gl",
            "glpat-",
            "glsoat-",
            "glx-",
            "xox",
            "xoxb-",
            "xoxox",
            "sk-",
            "sk-ant-",
            "sk-proj-",
            "sk-None-",
            "sk-admin",
            "rk_live_",
            "sk_test_",
            "k_live_",
            "AIza",
            "hf_",
            "whsec_",
            "abcdefghij",
            "KLMNOPQRST",
            "0123456789",
            "a-b_c-d_e-",
            "+/=+/=",
        ];
        let mut seed = 0xbb67_ae85_84ca_a73bu64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut matched = 0;
        for _ in 0..20_000 {
            let n = 1 + (next() % 12) as usize;
            let s: String = (0..n)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            for re in &all {
                for pos in (0..=s.len()).filter(|&p| s.is_char_boundary(p)) {
                    let want = re
                        .uni
                        .find_at(s.as_bytes(), pos)
                        .map(|m| (m.start(), m.end()));
                    let got = re.find_at(&s, pos, s.is_ascii());
                    assert_eq!(got, want, "{} on {s:?} from {pos}", re.as_str());
                    matched += usize::from(want.is_some());
                }
            }
        }
        assert!(matched > 20_000, "{matched}");
        // Runs longer than a rule's maximum.
        let long = "a".repeat(300);
        for s in [
            format!("ghp_{long}"),
            format!("x github_pat_{long}"),
            format!("AIza{long}"),
            format!("AKIA{}", "B".repeat(40)),
        ] {
            for re in &all {
                let want = re
                    .uni
                    .find_at(s.as_bytes(), 0)
                    .map(|m| (m.start(), m.end()));
                assert_eq!(re.find_at(&s, 0, true), want, "{}", re.as_str());
            }
        }
    }

    /// The rules written as code for ASCII text find, from every start, what
    /// their regex finds.
    #[test]
    fn ascii_code_finds_what_the_regex_finds() {
        let r = rules();
        let pieces = [
            "a",
            "Z",
            "0",
            "9",
            " ",
            "\t",
            "\n",
            "\x0b",
            "\x1c",
            "\x1f",
            "-",
            "_",
            ".",
            "~",
            "+",
            "/",
            "=",
            ":",
            ",",
            ";",
            "&",
            "\"",
            "'",
            "\\",
            "\\\"",
            "\\'",
            "\\n",
            "Bearer ",
            "bEaReR",
            "bearer\t\x1e",
            "abcdefghijkl",
            "0123456789AB",
            "Pass",
            "password",
            "PASSWD",
            "passphrase",
            "pwd",
            "secret",
            "secret_key",
            "Secret-Key",
            "secretkey",
            "api_key",
            "APIKEY",
            "access-key",
            "private_key",
            "token",
            "Authorization",
            "auth",
            "credential",
            "credentials",
            "***REDACTED***",
        ];
        let mut seed = 0x3c6e_f372_fe94_f82bu64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut matched = [0usize; 2];
        for _ in 0..20_000 {
            let n = 1 + (next() % 12) as usize;
            let s: String = (0..n)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            for (k, re) in [&r.bearer, &r.kv_pair].into_iter().enumerate() {
                for pos in 0..=s.len() {
                    let want = re
                        .uni
                        .find_at(s.as_bytes(), pos)
                        .map(|m| (m.start(), m.end()));
                    assert_eq!(
                        re.find_at(&s, pos, true),
                        want,
                        "{} on {s:?} from {pos}",
                        re.as_str()
                    );
                    matched[k] += usize::from(want.is_some());
                }
            }
        }
        assert!(matched.iter().all(|&n| n > 10_000), "{matched:?}");
    }

    /// The URL rule as code finds, from every start, what its regex finds, on
    /// ASCII strings made of pieces near each of its parts.
    #[test]
    fn url_code_finds_what_the_regex_finds() {
        let r = rules();
        let pieces = [
            "a",
            "Z",
            "0",
            "+",
            ".",
            "-",
            "_",
            " ",
            "\t",
            "\x1c",
            "\x1f",
            ":",
            "/",
            "?",
            "#",
            "@",
            "://",
            "https://",
            "h",
            "s3://",
            "x1+.-y://",
            "abcdefghijklmnopqrstu",
            "user",
            ":pw@",
            "admin:s3cr3t-P4ss@",
            "host",
            ".com",
            ":8080",
            "@@",
            "p@ss",
            "~",
            "%40",
            "=",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut matched = 0usize;
        for _ in 0..30_000 {
            let n = 1 + (next() % 12) as usize;
            let s: String = (0..n)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            for pos in 0..=s.len() {
                let want = r
                    .url
                    .uni
                    .find_at(s.as_bytes(), pos)
                    .map(|m| (m.start(), m.end()));
                assert_eq!(url_ascii(s.as_bytes(), pos), want, "{s:?} from {pos}");
                assert_eq!(r.url.find_at(&s, pos, true), want, "{s:?} from {pos}");
                matched += usize::from(want.is_some());
            }
        }
        assert!(matched > 20_000, "{matched}");
    }

    /// The ASCII forms find what the Unicode forms find, on ASCII text.
    #[test]
    fn ascii_forms_agree_on_ascii_text() {
        let r = rules();
        let mut all: Vec<&Re> = vec![&r.pem, &r.jwt, &r.aws, &r.gitlab];
        all.extend(&r.github);
        all.extend(r.slack.iter().map(|(rule, _)| rule));
        all.extend(&r.apikey);
        all.extend([
            &r.azure_conn,
            &r.azure_sig,
            &r.azure_entra,
            &r.url,
            &r.bearer,
            &r.kv_basic,
            &r.kv_flag,
            &r.kv_pair,
            &r.entropy,
            &r.card,
        ]);
        let mut seed = 0x51_7cc1_b727_220au64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pieces = [
            "a",
            "Z",
            " ",
            "\t",
            "\x0b",
            "\x1c",
            "\n",
            "-",
            "--",
            "_",
            ".",
            "~",
            "+",
            "/",
            "=",
            ":",
            "@",
            "?",
            "&",
            "0",
            "1234",
            "\"",
            "'",
            "\\",
            ",",
            ";",
            "sk-",
            "Bearer ",
            "PASSWORD",
            "Token",
            "api-key",
            "Authorization",
            "basic ",
            "AccountKey=",
            "&SIG=",
            "https://",
            "u:p@",
            "--token ",
            "-----BEGIN RSA PRIVATE KEY-----",
            "eyJ",
            "abcdefghijklmnopqrstuvwx",
            "ABCDEFGHIJKL0123",
            "4111 1111 1111 1111",
        ];
        for _ in 0..20_000 {
            let n = 1 + (next() % 12) as usize;
            let s: String = (0..n)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            for rule in &all {
                let b = s.as_bytes();
                let want: Vec<_> = rule.uni.find_iter(b).map(|m| m.range()).collect();
                let got: Vec<_> = rule.ascii.find_iter(b).map(|m| m.range()).collect();
                assert_eq!(got, want, "{} on {s:?}", rule.as_str());
            }
        }
    }

    #[test]
    fn clean_text_is_borrowed() {
        for s in [
            "",
            "Reasoning completed",
            "token: 512",
            "2024-01-01T00:00:00Z",
            "a=b",
        ] {
            assert!(matches!(sanitize(s), Cow::Borrowed(_)), "{s}");
        }
    }

    #[test]
    fn secrets_are_marked() {
        let cases = [
            (
                "key sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789",
                "key ***API_KEY***",
            ),
            ("AKIAIOSFODNN7EXAMPLE", "***AWS_ACCESS_KEY***"),
            (
                "https://admin:s3cr3t@host/x",
                "https://admin:***REDACTED***@host/x",
            ),
            (
                "Authorization: Bearer 0123456789abcdef0123",
                "Authorization: Bearer ***REDACTED***",
            ),
            ("password=hunter2", "password=***REDACTED***"),
            ("token: 512", "token: 512"),
            ("card 4111 1111 1111 1111.", "card ***CARD_NUMBER***."),
            ("ts 1700000000123456", "ts 1700000000123456"),
            ("cfg x=Zk3pQ9vL2mN8rT5wY1aB7cD4", "cfg x=***REDACTED***"),
            (
                "id x=0123456789abcdef0123456789abcdef",
                "id x=0123456789abcdef0123456789abcdef",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize(input), want, "{input}");
        }
    }

    /// The key-value gate, now read only when a rule would change the text,
    /// still vetoes: 'ſ' folds to 's' in the regex, not in `str.lower()`.
    #[test]
    fn kv_gate_vetoes_a_change() {
        assert_eq!(sanitize("pa\u{17f}sword=hunter2"), "pa\u{17f}sword=hunter2");
        assert_eq!(
            sanitize("sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789 password=hunter2"),
            "***API_KEY*** password=***REDACTED***"
        );
        // The entropy rule's head: '=' right before the value, or ':' and blanks.
        assert_eq!(
            sanitize("x = Zk3pQ9vL2mN8rT5wY1aB7cD4"),
            "x = Zk3pQ9vL2mN8rT5wY1aB7cD4"
        );
        assert_eq!(
            sanitize("x:\t Zk3pQ9vL2mN8rT5wY1aB7cD4"),
            "x:\t ***REDACTED***"
        );
    }

    #[test]
    fn lookbehind_rejections_resume_one_character_later() {
        // The first candidate start is inside a run (rejected); the real one follows.
        assert_eq!(
            sanitize("ab.c=Zk3pQ9vL2mN8rT5wY1aB7cD4"),
            "ab.c=***REDACTED***"
        );
        assert_eq!(
            sanitize("x-abc1Q~abcdefghijklmnopqrstuvwxyz01234"),
            "x-abc1Q~abcdefghijklmnopqrstuvwxyz01234"
        );
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
    fn json_keys_are_scrubbed_and_never_collide() {
        let a = "sk-proj-AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHHIIIIJJJJ1234";
        let b = "sk-proj-ZZZZYYYYXXXXWWWWVVVVUUUUTTTTSSSSRRRRQQQQ9876";
        let src = format!(
            r#"{{"{a}":1,"{b}":{{"{a}_password":"x"}},"***API_KEY***":"kept","l":[{{"{a}":[]}}]}}"#
        );
        // The value under "{a}_password" (credential-named as written) is redacted.
        let out = sanitize_json(src.as_bytes());
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            concat!(
                r#"{"***API_KEY***#2":1,"***API_KEY***#3":{"***API_KEY***":"***REDACTED***"},"#,
                r#""***API_KEY***":"kept","l":[{"***API_KEY***":[]}]}"#
            )
        );
        // An escaped key is read as its text.
        let out = sanitize_json(br#"{"\u0073k-proj-AAAABBBBCCCCDDDDEEEEFFFF":"v"}"#);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"***API_KEY***":"v"}"#
        );
    }

    #[test]
    fn object_keys_reads_one_level() {
        let src = br#"{"a":{"b":1,"c":["d",{"e":2}]},"f":"g","h\"i":null}"#;
        assert_eq!(object_keys(src, 0), ["a", "f", "h\"i"]);
        assert_eq!(object_keys(src, 5), ["b", "c"]);
        assert!(object_keys(b"{}", 0).is_empty());
    }

    #[test]
    fn unique_key_takes_the_first_free_suffix() {
        let keys = ["m", "m#2"];
        let mut is_key = |n: &str| keys.contains(&n);
        assert_eq!(unique_key("x".into(), &mut is_key, &[]), "x");
        assert_eq!(unique_key("m".into(), &mut is_key, &[]), "m#3");
        assert_eq!(unique_key("m".into(), &mut is_key, &["m#3".into()]), "m#4");
        assert_eq!(unique_key("x".into(), &mut is_key, &["x".into()]), "x#2");
    }

    #[test]
    fn every_rule_runs_on_its_own_literal() {
        // GitHub's documented fine-grained PAT: no "gh" anywhere in it.
        let pat = "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";
        assert!(!pat.contains("gh"));
        assert_eq!(sanitize(pat), "***GITHUB_TOKEN***");
        assert_eq!(sanitize(&format!("use {pat}.")), "use ***GITHUB_TOKEN***.");
        // "SharedAccessKey=" holds no "accountkey": the connection-string rule
        // (which keeps the '(') and not the key-value rule redacts it.
        assert_eq!(
            sanitize("SharedAccessKey=00000000000000000000("),
            "SharedAccessKey=***REDACTED***("
        );
    }

    #[test]
    fn a_token_glued_after_an_underscore_is_found() {
        let key = "sk-proj-AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHHIIIIJJJJ1234";
        assert_eq!(sanitize(&format!("comp_{key}")), "comp_***API_KEY***");
        assert_eq!(
            sanitize("MY_TOKEN_ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
            "MY_TOKEN_***GITHUB_TOKEN***"
        );
        assert_eq!(sanitize("x_AKIAIOSFODNN7EXAMPLE"), "x_***AWS_ACCESS_KEY***");
        // A letter or digit before the token still keeps it out ("task-...", "disk-...").
        assert_eq!(sanitize(&format!("comp{key}")), format!("comp{key}"));
        assert_eq!(sanitize(&format!("é{key}")), format!("é{key}"));
    }

    #[test]
    fn sensitive_keys() {
        assert!(is_sensitive_key("client_secret"));
        assert!(is_sensitive_key("OPENAI_API_KEY"));
        assert!(!is_sensitive_key("token"));
        assert!(!is_sensitive_key("input_tokens"));
    }

    #[test]
    fn word_characters_follow_pythons_unicode_version() {
        // U+13460 (Egyptian hieroglyph, Unicode 16.0) is a letter for Python 3.14
        // (Unicode 16.0) and not for Python 3.11 (14.0); 'é' and '٣' always.
        let new_letter = "\u{13460}";
        assert!(word_class(None).is_match(new_letter));
        assert!(word_class(Some("16.0.0")).is_match(new_letter));
        assert!(!word_class(Some("14.0.0")).is_match(new_letter));
        for old in ["é", "٣", "_", "A"] {
            assert!(word_class(Some("14.0.0")).is_match(old), "{old}");
        }
        // A version the tables do not know: the tables whole.
        assert!(word_class(Some("99.0.0")).is_match(new_letter));
    }

    #[test]
    fn large_input_is_linear() {
        let blob = "a=".repeat(200_000) + &"sk-".repeat(100_000);
        let t = std::time::Instant::now();
        let _ = sanitize(&blob);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
