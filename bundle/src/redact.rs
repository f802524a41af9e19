//! Redaction: what keeps secrets out of a bundle. Two kinds, chosen by each part:
//!
//! - **config-style**: the config is parsed (TOML, JSON, or `key = value` lines as in
//!   `postgresql.conf`, `my.cnf`, `pgbackrest.conf`) and only keys on the part's
//!   allow-list keep their values; every other value becomes [`MARKER`]. Whatever comes
//!   out then also passes the log patterns (a safe key holding a URL with a password
//!   still loses the password). A file that does not parse is redacted line by line.
//! - **log-style**: line by line, patterns for passwords (`key=value`, `password: x`,
//!   `PASSWORD 'x'`, `IDENTIFIED BY 'x'`), URLs with `user:pass@`, PEM private key blocks
//!   (dropped whole, across lines), the fleet's enrollment tokens (`dbvm-enroll-…`) and
//!   sealed secrets (`sealed:v1:…`), JWTs, AWS access key ids (`AKIA…`) and secret keys,
//!   and `Authorization`/`Bearer` credentials.
//!
//! Each redaction is counted (the manifest carries the count per file, never a value).
//!
//! Speed: most log lines hold nothing to redact, and the patterns together cost far more
//! per byte than a literal search, so ASCII text first goes through a pre-filter
//! (`KeyWords`): each pattern names what its every match contains, and only lines with
//! one of those run the patterns that need them. It never passes a line a pattern
//! matches (a unit test checks the two against each other on generated lines).

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use regex::{Captures, Regex, RegexSet};
use std::borrow::Cow;
use std::sync::LazyLock;

/// What replaces a redacted value.
pub const MARKER: &str = "<redacted>";

/// Lines longer than this are cut (the rest of the line is dropped, with a note): a
/// pattern cannot see a secret split across two pieces, so no piece is ever passed on
/// unseen.
pub const MAX_LINE: usize = 64 * 1024;

/// How a part is redacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redaction {
    /// Patterns, line by line.
    Log,
    /// Only keys matching `safe_keys` keep their values (see [`key_allowed`]).
    Config {
        format: ConfigFormat,
        safe_keys: &'static [&'static str],
    },
}

/// The syntax of a config-style part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigFormat {
    Toml,
    Json,
    /// `key = value` or `key value` lines, `[section]` headers, `#`/`;` comments.
    KeyValue,
}

/// Whether the dotted key `key` (`broker.address`; a `[section]`'s keys are
/// `section.key`) matches one of `patterns`: segments compare equal, `*` matches any one
/// segment, a final `**` matches everything below.
pub fn key_allowed(key: &str, patterns: &[&str]) -> bool {
    let key: Vec<&str> = key.split('.').collect();
    patterns.iter().any(|p| {
        let p: Vec<&str> = p.split('.').collect();
        let mut i = 0;
        loop {
            match (p.get(i), key.get(i)) {
                (Some(&"**"), _) if i + 1 == p.len() => return true,
                (Some(a), Some(b)) if *a == "*" || a == b => i += 1,
                (None, None) => return true,
                _ => return false,
            }
        }
    })
}

struct Pattern {
    regex: Regex,
    /// Rewrites one match (`None`: leave this match alone).
    replace: fn(&Captures) -> Option<String>,
    /// What any ASCII text the pattern matches contains (see [`KEY_WORDS`]).
    needs: Needs,
}

/// What a pattern's every match in ASCII text contains.
#[derive(Clone, Copy)]
enum Needs {
    /// One of these words, ASCII-case-insensitively.
    Words(&'static [&'static str]),
    /// As `Words`, but many words alike: a block is searched for them by a search of its
    /// own. Teddy (the SIMD search) packs words into a few buckets by their first bytes;
    /// the ten AWS prefixes in one search with the other fifteen words took 0.52 s per
    /// GiB of `bundle-bench`'s logs, apart 0.08 s beside 0.29 s for the rest (the same
    /// lines found; one core of an AMD EPYC, Teddy on AVX2).
    WordsApart(&'static [&'static str]),
    /// As `Words`, each occurrence followed by an assignment: past name characters
    /// (`[A-Za-z0-9_.-]`), an optional quote and blanks, a `:` or `=` (see [`Assigned`]).
    /// A `key=value` pattern's key word is one: PostgreSQL's most common error ("duplicate
    /// key value violates unique constraint \"orders_pkey\"", "Key (id)=(7) already
    /// exists") has the word and no assignment. Passing such occurrences over took the
    /// block path over `bundle-bench`'s logs (2 % of entries that error) from 0.90 s to
    /// 0.77 s per GiB (one core), the same output.
    Assigned(&'static [&'static str]),
    /// A run of [`BASE64_RUN`] base64 characters.
    Base64Run,
}

/// The key words that make a `key=value` value secret.
const SECRET_WORDS: &str = r"password|passwd|pwd|passphrase|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?|cipher[_-]?pass|s3[_-]key|session[_-]?key|auth[_-]?key";

/// What every word of [`SECRET_WORDS`] contains: password, passwd, passphrase and
/// cipher-pass have "pass"; the api, access, private, s3, session and auth keys have "key";
/// credential(s). What follows such a word in a `key=value` pattern's match is name
/// characters (the rest of the word among them), an optional quote, blanks, and `:` or
/// `=`: so the patterns need these words as [`Needs::Assigned`].
const SECRET_NEEDS: &[&str] = &["pass", "pwd", "secret", "token", "key", "credential"];

static PATTERNS: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    let p = |needs: Needs, re: &str, replace: fn(&Captures) -> Option<String>| Pattern {
        // The patterns are constants checked by the unit tests; a typo fails every test.
        regex: Regex::new(re).unwrap_or_else(|e| panic!("redaction pattern {re:?}: {e}")),
        replace,
        needs,
    };
    vec![
        // URLs with credentials: scheme://user:password@host
        p(
            Needs::Words(&["://"]),
            r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*):([^@\s/]+)@",
            |c| fresh(c).then(|| format!("{}:{MARKER}@", &c[1])),
        ),
        // Authorization headers and bearer tokens.
        p(
            Needs::Words(&["authorization"]),
            r"(?i)(\bauthorization\s*[:=]\s*(?:bearer|basic|token|digest|negotiate|aws4-hmac-sha256)?\s*)([^\s,;]+)",
            |c| fresh(c).then(|| format!("{}{MARKER}", &c[1])),
        ),
        p(
            Needs::Words(&["bearer"]),
            r"(?i)(\bbearer\s+)([A-Za-z0-9._~+/=-]{8,})",
            |c| Some(format!("{}{MARKER}", &c[1])),
        ),
        // The fleet's own formats: enrollment tokens and sealed secrets.
        p(
            Needs::Words(&["dbvm-enroll-"]),
            r"dbvm-enroll-[A-Za-z0-9_-]+",
            |_| Some(MARKER.to_string()),
        ),
        p(
            Needs::Words(&["sealed:v1:"]),
            r"sealed:v1:[A-Za-z0-9_-]+",
            |_| Some(MARKER.to_string()),
        ),
        // JSON Web Tokens.
        p(
            Needs::Words(&["eyj"]),
            r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
            |_| Some(MARKER.to_string()),
        ),
        // AWS access key ids (20 characters; shorter look-alikes too).
        p(
            Needs::WordsApart(&[
                "akia", "asia", "agpa", "aida", "aroa", "anpa", "anva", "aipa", "abia", "acca",
            ]),
            r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|ABIA|ACCA)[A-Z0-9]{12,}\b",
            |_| Some(MARKER.to_string()),
        ),
        // SQL: ALTER ROLE … PASSWORD 'x', IDENTIFIED BY 'x' (MySQL, MariaDB).
        p(
            Needs::Words(&["password"]),
            r#"(?i)(\bpassword\s+)('[^']*'|"[^"]*")"#,
            |c| fresh(c).then(|| format!("{}{MARKER}", &c[1])),
        ),
        p(
            Needs::Words(&["identified"]),
            r#"(?i)(\bidentified\s+(?:with\s+\S+\s+)?by\s+(?:password\s+)?)('[^']*'|"[^"]*"|[^\s;,)]+)"#,
            |c| fresh(c).then(|| format!("{}{MARKER}", &c[1])),
        ),
        // key: value, "key": "value", with a secret key word in the key. Unquoted, the
        // value runs to the end of the line (or a `,`, `;`, `}`, `]`): prose and YAML
        // put phrases there, and half a pass phrase is still a secret.
        p(
            Needs::Assigned(SECRET_NEEDS),
            &format!(
                r#"(?i)(["']?[A-Za-z0-9_.-]*(?:{SECRET_WORDS})[A-Za-z0-9_.-]*["']?\s*:\s*)("[^"]*"|'[^']*'|[^\s"',;}}\]][^,;}}\]]*)"#
            ),
            |c| fresh(c).then(|| format!("{}{MARKER}", &c[1])),
        ),
        // key=value, with a secret key word in the key: one token unquoted (connection
        // strings put the next key after a space).
        p(
            Needs::Assigned(SECRET_NEEDS),
            &format!(
                r#"(?i)(["']?[A-Za-z0-9_.-]*(?:{SECRET_WORDS})[A-Za-z0-9_.-]*["']?\s*=\s*)("[^"]*"|'[^']*'|[^\s,;&"'}}\])]+)"#
            ),
            |c| fresh(c).then(|| format!("{}{MARKER}", &c[1])),
        ),
        // AWS-style secret access keys: 40 characters of base64 with upper and lower case
        // and a digit or `/`/`+` (hex digests such as commit ids have no upper case).
        p(
            Needs::Base64Run,
            r"(^|[^A-Za-z0-9/+=])([A-Za-z0-9/+]{40})($|[^A-Za-z0-9/+=])",
            |c| {
                let s = &c[2];
                let upper = s.bytes().any(|b| b.is_ascii_uppercase());
                let lower = s.bytes().any(|b| b.is_ascii_lowercase());
                let other = s
                    .bytes()
                    .any(|b| b.is_ascii_digit() || b == b'/' || b == b'+');
                (upper && lower && other).then(|| format!("{}{MARKER}{}", &c[1], &c[3]))
            },
        ),
    ]
});

/// Whether a pattern's value (its second group) is not a marker already (a value the
/// allow-list redacted passes the patterns again: counted once).
fn fresh(c: &Captures) -> bool {
    c.get(2)
        .is_none_or(|v| v.as_str().trim_matches(|ch| ch == '"' || ch == '\'') != MARKER)
}

/// Applies the log patterns to one line (no newline inside), adding to `count`.
pub fn redact_text<'a>(line: &'a str, count: &mut u64) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(line);
    // One pass finds which patterns may match; only those run (a replacement only ever
    // writes the marker, which no pattern matches, so none becomes a match later). ASCII
    // text: the pre-filter's candidates (a superset of the patterns that match); other
    // text: the pattern set itself.
    let candidates = if line.is_ascii() {
        candidates(line)
    } else {
        ANY.matches(line)
            .iter()
            .filter(|&i| i < PATTERNS.len())
            .fold(0, |set, i| set | 1 << i)
    };
    if candidates == 0 {
        return out;
    }
    for (i, pattern) in PATTERNS.iter().enumerate() {
        if candidates & (1 << i) == 0 {
            continue;
        }
        let mut n = 0u64;
        let replaced = pattern
            .regex
            .replace_all(&out, |c: &Captures| match (pattern.replace)(c) {
                Some(s) => {
                    n += 1;
                    s
                }
                None => c[0].to_string(),
            })
            .into_owned();
        *count += n;
        out = Cow::Owned(replaced);
    }
    out
}

static PEM_BEGIN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY|[A-Z0-9 ]*ENCRYPTED[A-Z0-9 ]*)-----")
        .unwrap_or_else(|e| panic!("PEM pattern: {e}"))
});
static PEM_END: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"-----END [A-Z0-9 ]*-----").unwrap_or_else(|e| panic!("PEM pattern: {e}"))
});

/// Every pattern at once (and the start of a private key): a block of lines none of them
/// matches passes unchanged without a per-line pass. Any line's match is also a match in
/// the block (a line's start and end are the block's or a newline, which every anchored
/// pattern accepts), so the shortcut never skips a secret.
static ANY: LazyLock<RegexSet> = LazyLock::new(|| {
    let all = PATTERNS
        .iter()
        .map(|p| p.regex.as_str())
        .chain([PEM_BEGIN.as_str()]);
    RegexSet::new(all).unwrap_or_else(|e| panic!("redaction pattern set: {e}"))
});

/// The pre-filter. Every pattern of [`PATTERNS`] names what any ASCII text it matches
/// must contain ([`Needs`]): one of a few words (compared ASCII-case-insensitively), or,
/// for the AWS secret key pattern, a run of 40 base64 characters ([`base64_run`]); a PEM
/// private key's BEGIN line has "-----begin ". A line of ASCII text with none of them is
/// matched by no pattern, so it passes unchanged without the patterns' pass, and a line
/// with some runs only the patterns that need them (most lines of a log have none: the
/// pattern set costs far more per byte than this search). Non-ASCII text always takes the
/// patterns' own pass: under `(?i)` a pattern's letters also match non-ASCII look-alikes
/// (`ſ` for `s`, `K` for `k`). `the_prefilter_agrees_with_the_patterns` checks the
/// words against the patterns.
struct KeyWords {
    /// ASCII-case-insensitive, for one line (every occurrence: overlapping).
    search: AhoCorasick,
    /// Case-sensitive, for a block lower-cased first (see [`LogRedactor::block`]): the
    /// words of `Needs::Words` and `Needs::Assigned` in two, those of [`SHORT_WORD`]
    /// bytes or more and those shorter, and each `Needs::WordsApart`'s in one of its own.
    lower: Vec<LowerSearch>,
    /// For each word (by its pattern id in `search`), the patterns that need it (bit i:
    /// `PATTERNS[i]`).
    patterns: Vec<u64>,
    /// For each word (by its pattern id in `search`), whether every pattern that needs it
    /// needs it assigned ([`Needs::Assigned`]): an occurrence without an assignment after
    /// it is no reason to look at its line.
    assigned_only: Vec<bool>,
    /// The pattern that needs a base64 run, as a bit.
    base64_run: u64,
}

const PEM_BEGIN_WORD: &str = "-----begin ";

/// Words shorter than this get a block search of their own. Teddy tests as many leading
/// bytes of every word as its shortest has (up to 4), by nibbles, so a 3-byte word among
/// longer ones makes every search see far more false starts: over `bundle-bench`'s logs
/// the fifteen words in one search took 0.29 s per GiB, the eleven of 4 bytes or more
/// 0.12 s and the four of 3 bytes (`key`, `pwd`, `eyj`, `://`) 0.07 s apart.
const SHORT_WORD: usize = 4;

static KEY_WORDS: LazyLock<KeyWords> = LazyLock::new(|| {
    let mut words: Vec<&str> = vec![PEM_BEGIN_WORD];
    let mut patterns = vec![0u64];
    // Whether every pattern that needs the word needs it assigned (the PEM word: none).
    let mut assigned_only = vec![false];
    let mut base64_run = 0;
    // The words of `Words` and `Assigned`: of SHORT_WORD bytes or more, shorter.
    let mut groups: Vec<Vec<&str>> = vec![vec![PEM_BEGIN_WORD], Vec::new()];
    for (i, p) in PATTERNS.iter().enumerate() {
        let (ws, apart) = match p.needs {
            Needs::Words(ws) | Needs::Assigned(ws) => (ws, None),
            Needs::WordsApart(ws) => {
                groups.push(Vec::new());
                (ws, Some(groups.len() - 1))
            }
            Needs::Base64Run => {
                base64_run |= 1 << i;
                continue;
            }
        };
        for w in ws {
            let group = apart.unwrap_or(usize::from(w.len() < SHORT_WORD));
            if !groups[group].contains(w) {
                groups[group].push(*w);
            }
            let at = match words.iter().position(|x| x == w) {
                Some(at) => at,
                None => {
                    words.push(w);
                    patterns.push(0);
                    assigned_only.push(true);
                    words.len() - 1
                }
            };
            patterns[at] |= 1 << i;
            assigned_only[at] &= matches!(p.needs, Needs::Assigned(_));
        }
    }
    // Constant words; a failure fails every test.
    let search = AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .kind(Some(AhoCorasickKind::DFA))
        .build(&words)
        .unwrap_or_else(|e| panic!("redaction key words: {e}"));
    // The words are lower case already (a test checks): over lower-cased text, a
    // case-sensitive search finds the same, and can use the SIMD searcher (Teddy) where
    // the processor has it.
    let lower = groups
        .iter()
        .filter(|group| !group.is_empty())
        .map(|group| {
            // Leftmost (as the packed searcher always is): a word passed over at `at`
            // then never hides one that starts before it (see `LowerSearch::find`).
            let search = match aho_corasick::packed::Config::new()
                .match_kind(aho_corasick::packed::MatchKind::LeftmostFirst)
                .builder()
                .extend(group)
                .build()
            {
                Some(packed) => Search::Packed(packed),
                None => Search::Automaton(
                    AhoCorasick::builder()
                        .kind(Some(AhoCorasickKind::DFA))
                        .match_kind(MatchKind::LeftmostFirst)
                        .build(group)
                        .unwrap_or_else(|e| panic!("redaction key words: {e}")),
                ),
            };
            let own = group
                .iter()
                .map(|w| {
                    let at = words.iter().position(|x| x == w).unwrap_or(0);
                    (*w, assigned_only[at])
                })
                .collect();
            LowerSearch { search, words: own }
        })
        .collect();
    KeyWords {
        search,
        lower,
        patterns,
        assigned_only,
        base64_run,
    }
});

/// One search of the block path, over lower-cased text.
struct LowerSearch {
    search: Search,
    /// Its words (by pattern id), each with whether it is only wanted assigned.
    words: Vec<(&'static str, bool)>,
}

enum Search {
    Packed(aho_corasick::packed::Searcher),
    Automaton(AhoCorasick),
}

impl LowerSearch {
    /// Where the first word at or after `from` in `text` starts that some pattern needs
    /// there: an occurrence of a word wanted only assigned, with no other word (or
    /// assignment) at the same place, is passed over. The searches are leftmost, so
    /// every word starting before a passed-over one was reported before it.
    fn find(&self, text: &[u8], mut from: usize) -> Option<usize> {
        let mut assigned = Assigned::default();
        loop {
            let m = match &self.search {
                Search::Packed(s) => s.find_in(text, aho_corasick::Span::from(from..text.len())),
                Search::Automaton(a) => {
                    a.find(aho_corasick::Input::new(text).span(from..text.len()))
                }
            }?;
            let at = m.start();
            if !self.words[m.pattern().as_usize()].1 || self.wanted_at(text, at, &mut assigned) {
                return Some(at);
            }
            from = at + 1;
        }
    }

    /// Whether a word of this search starts at `at` in `text` and is wanted there.
    fn wanted_at(&self, text: &[u8], at: usize, assigned: &mut Assigned) -> bool {
        self.words.iter().any(|&(w, assigned_only)| {
            text[at..].starts_with(w.as_bytes())
                && (!assigned_only || assigned.after(text, at + w.len()))
        })
    }
}

/// Whether a text at a place goes on as a `key=value` pattern's key does after its key
/// word: name characters (`[A-Za-z0-9_.-]*`), an optional quote (`["']?`), blanks (`\s*`,
/// ASCII), then `:` or `=`. Exact for ASCII text: none of the steps can give back a
/// character the next one wants (so the patterns' backtracking finds nothing more).
///
/// Asked about many places in one text, it stays linear: every place inside a run of
/// name characters reaches the same end of it, so the answer for the last run is kept.
/// Without that, a line of key words ("keykeykey…", 60 KB) took 1.4 s in the block path:
/// a scan to the run's end for each of its 20,000 words.
#[derive(Default)]
struct Assigned {
    /// The last place asked about, the end of its run of name characters, the answer.
    last: Option<(usize, usize, bool)>,
    /// Runs scanned (the tests count them).
    #[cfg(test)]
    scans: usize,
}

impl Assigned {
    fn after(&mut self, text: &[u8], at: usize) -> bool {
        if let Some((from, end, answer)) = self.last {
            if (from..=end).contains(&at) {
                return answer;
            }
        }
        #[cfg(test)]
        {
            self.scans += 1;
        }
        let end = name_end(text, at);
        let answer = assignment_at(text, end);
        self.last = Some((at, end, answer));
        answer
    }
}

/// [`Assigned`] at one place.
#[cfg(test)]
fn assigned(text: &[u8], at: usize) -> bool {
    assignment_at(text, name_end(text, at))
}

/// Where the run of name characters (`[A-Za-z0-9_.-]`) from `at` in `text` ends.
fn name_end(text: &[u8], at: usize) -> usize {
    text[at..]
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
        .map_or(text.len(), |i| at + i)
}

/// Whether `text` at `at`, past its name characters, has an optional quote, blanks and
/// `:` or `=` (the rest of [`Assigned`]).
fn assignment_at(text: &[u8], at: usize) -> bool {
    let mut i = at;
    let next = |i: usize| text.get(i).copied();
    if matches!(next(i), Some(b'"' | b'\'')) {
        i += 1;
    }
    // `\s` in ASCII: tab, newline, vertical tab, form feed, carriage return, space.
    while matches!(next(i), Some(b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')) {
        i += 1;
    }
    matches!(next(i), Some(b':' | b'='))
}

/// The patterns (bit i: `PATTERNS[i]`) that may match `line`, ASCII text: those whose
/// word or base64 run it contains.
fn candidates(line: &str) -> u64 {
    let kw = &*KEY_WORDS;
    let mut set = 0;
    let mut assigned = Assigned::default();
    for m in kw.search.find_overlapping_iter(line) {
        let word = m.pattern().as_usize();
        if kw.assigned_only[word] && !assigned.after(line.as_bytes(), m.end()) {
            continue;
        }
        set |= kw.patterns[word];
    }
    if base64_run(line.as_bytes(), 0).is_some() {
        set |= kw.base64_run;
    }
    set
}

/// The length of the base64 run the AWS secret key pattern needs.
const BASE64_RUN: usize = 40;

/// Whether `b` is in the AWS secret key pattern's class (`[A-Za-z0-9/+]`).
fn base64_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'/' || b == b'+'
}

/// The blocks [`base64_run`] looks at: any run of [`BASE64_RUN`] characters holds a whole
/// block of this many, wherever the blocks start (40 >= 2 x 16 - 1).
const BASE64_BLOCK: usize = 16;
const _: () = assert!(BASE64_RUN >= 2 * BASE64_BLOCK - 1);

/// The start of the first run of at least [`BASE64_RUN`] base64 characters in `text` at
/// or after `from` (hand-written: no crate searches for a run of a byte class). It looks
/// at `text` in blocks of [`BASE64_BLOCK`] bytes, each tested whole (a test the compiler
/// turns into SIMD compares; a block of log text almost always holds a space or a
/// punctuation mark), and only around a block of base64 characters for the run's ends
/// (the test before, one window of 40 checked from its end backwards at a time, took
/// 40 % longer over `bundle-bench`'s logs).
fn base64_run(text: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(block) = text.get(at..at + BASE64_BLOCK) {
        if !block.iter().fold(true, |all, &b| all & base64_byte(b)) {
            at += BASE64_BLOCK;
            continue;
        }
        let start = text[from..at]
            .iter()
            .rposition(|&b| !base64_byte(b))
            .map_or(from, |i| from + i + 1);
        let end = text[at + BASE64_BLOCK..]
            .iter()
            .position(|&b| !base64_byte(b))
            .map_or(text.len(), |i| at + BASE64_BLOCK + i);
        if end - start >= BASE64_RUN {
            return Some(start);
        }
        // A later run starts after this one's end (which is not base64).
        at = end + 1;
    }
    None
}

/// Log-style redaction of a stream of lines: the patterns, and PEM private key blocks
/// dropped whole (from their BEGIN line to their END line).
#[derive(Debug, Default)]
pub struct LogRedactor {
    in_private_key: bool,
    /// A block, lower-cased (kept to be reused).
    lowered: Vec<u8>,
    /// Redactions so far.
    pub count: u64,
}

impl LogRedactor {
    /// Whether `block` (whole lines) needs no redaction at all: outside a key block and
    /// matched by no pattern.
    pub fn passes_unchanged(&self, block: &str) -> bool {
        !self.in_private_key && !ANY.is_match(block)
    }

    /// Redacts `block` (whole lines, each ending in `\n`, none longer than [`MAX_LINE`])
    /// into `out`: lines the pre-filter (`KeyWords`) clears are copied
    /// as they are, the rest (and every line of a private key block) go through
    /// [`Self::push_line`]. Returns false, writing nothing, when `block` is not ASCII (the
    /// caller then goes line by line).
    pub fn block(&mut self, block: &[u8], out: &mut Vec<u8>) -> bool {
        if !block.is_ascii() {
            return false;
        }
        self.lowered.clear();
        self.lowered.extend_from_slice(block);
        self.lowered.make_ascii_lowercase();
        let lowered = std::mem::take(&mut self.lowered);
        self.block_lowered(block, &lowered, out);
        self.lowered = lowered;
        true
    }

    /// [`Self::block`] with the block lower-cased beside it.
    fn block_lowered(&mut self, block: &[u8], lowered: &[u8], out: &mut Vec<u8>) {
        let mut pos = 0;
        // The next hit of each search at or after `pos` (searched again once passed).
        let searches = &KEY_WORDS.lower;
        let mut words: Vec<Option<usize>> = vec![None; searches.len()];
        let mut run: Option<usize> = None;
        while pos < block.len() {
            let suspect = if self.in_private_key {
                pos
            } else {
                let mut first = block.len();
                for (word, search) in words.iter_mut().zip(searches) {
                    if word.is_none_or(|w| w < pos) {
                        *word = Some(search.find(lowered, pos).unwrap_or(block.len()));
                    }
                    first = first.min(word.unwrap_or(block.len()));
                }
                if run.is_none_or(|r| r < pos) {
                    run = Some(base64_run(block, pos).unwrap_or(block.len()));
                }
                let first = first.min(run.unwrap_or(block.len()));
                if first >= block.len() {
                    out.extend_from_slice(&block[pos..]);
                    return;
                }
                first
            };
            let start = block[pos..suspect]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(pos, |i| pos + i + 1);
            let end = block[suspect..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(block.len(), |i| suspect + i);
            out.extend_from_slice(&block[pos..start]);
            self.push_line(&block[start..end], true, out);
            pos = end + 1;
        }
    }

    /// One line's bytes (without its newline; a trailing `\r` is dropped), redacted, onto
    /// `out`, with a newline when `newline`.
    pub fn push_line(&mut self, line: &[u8], newline: bool, out: &mut Vec<u8>) {
        let text = String::from_utf8_lossy(line);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        out.extend_from_slice(self.line(text).as_bytes());
        if newline {
            out.push(b'\n');
        }
    }

    /// One line, without its newline; what to write instead (empty inside a key block).
    pub fn line<'a>(&mut self, line: &'a str) -> Cow<'a, str> {
        if self.in_private_key {
            if let Some(m) = PEM_END.find(line) {
                self.in_private_key = false;
                let rest = &line[m.end()..];
                return Cow::Owned(redact_text(rest, &mut self.count).into_owned());
            }
            return Cow::Borrowed("");
        }
        if let Some(m) = PEM_BEGIN.find(line) {
            self.count += 1;
            let before = redact_text(&line[..m.start()], &mut self.count).into_owned();
            let after = &line[m.end()..];
            if let Some(end) = PEM_END.find(after) {
                // A key on one line (escaped newlines in JSON, say).
                let rest = redact_text(&after[end.end()..], &mut self.count);
                return Cow::Owned(format!("{before}<redacted private key>{rest}"));
            }
            self.in_private_key = true;
            return Cow::Owned(format!("{before}<redacted private key>"));
        }
        redact_text(line, &mut self.count)
    }
}

/// Config-style redaction of a whole config text; returns the redacted text and the
/// number of values redacted.
pub fn redact_config(text: &str, format: ConfigFormat, safe_keys: &[&str]) -> (String, u64) {
    let mut count = 0;
    let structured = match format {
        ConfigFormat::Toml => toml::from_str::<toml::Value>(text).ok().and_then(|mut v| {
            redact_toml(&mut v, "", safe_keys, &mut count);
            toml::to_string(&v).ok()
        }),
        ConfigFormat::Json => serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|mut v| {
                redact_json(&mut v, "", safe_keys, &mut count);
                serde_json::to_string_pretty(&v).ok()
            }),
        ConfigFormat::KeyValue => None,
    };
    let text = match structured {
        Some(t) => t,
        None => {
            // Not parseable as its format (or key = value lines): line by line.
            count = 0;
            redact_key_value(text, safe_keys, &mut count)
        }
    };
    // Defence in depth: what the allow-list kept still passes the log patterns.
    let mut log = LogRedactor::default();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        out.push_str(&log.line(line));
        out.push('\n');
    }
    (out, count + log.count)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn redact_toml(v: &mut toml::Value, path: &str, safe: &[&str], count: &mut u64) {
    match v {
        toml::Value::Table(t) => {
            for (k, child) in t.iter_mut() {
                redact_toml(child, &join(path, k), safe, count);
            }
        }
        toml::Value::Array(items) if items.iter().all(|i| i.is_table()) && !items.is_empty() => {
            for item in items {
                redact_toml(item, path, safe, count);
            }
        }
        _ if key_allowed(path, safe) => {}
        _ => {
            *count += 1;
            *v = toml::Value::String(MARKER.to_string());
        }
    }
}

fn redact_json(v: &mut serde_json::Value, path: &str, safe: &[&str], count: &mut u64) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                redact_json(child, &join(path, k), safe, count);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                redact_json(item, path, safe, count);
            }
        }
        serde_json::Value::Null => {}
        _ if key_allowed(path, safe) => {}
        _ => {
            *count += 1;
            *v = serde_json::Value::String(MARKER.to_string());
        }
    }
}

/// `key = value` / `key value` lines: sections name their keys `section.key`; comments
/// and bare flags are kept (comments pass the log patterns afterwards).
fn redact_key_value(text: &str, safe: &[&str], count: &mut u64) -> String {
    let mut section = String::new();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            out.push_str(line);
        } else if trimmed.starts_with('[') && trimmed.ends_with(']') {
            section = trimmed[1..trimmed.len() - 1].trim().to_string();
            out.push_str(line);
        } else {
            let (key, has_value) = match trimmed.split_once('=') {
                Some((k, _)) => (k.trim(), true),
                None => match trimmed.split_once(char::is_whitespace) {
                    Some((k, _)) => (k, true),
                    None => (trimmed, false),
                },
            };
            if !has_value || key_allowed(&join(&section, key), safe) {
                out.push_str(line);
            } else {
                *count += 1;
                out.push_str(&format!("{key} = {MARKER}"));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(text: &str) -> (String, u64) {
        let mut r = LogRedactor::default();
        let mut out = String::new();
        for line in text.lines() {
            out.push_str(&r.line(line));
            out.push('\n');
        }
        (out, r.count)
    }

    /// Every kind of secret a log line can carry, each with a distinct planted value, and
    /// the safe text around it that must survive.
    #[test]
    fn log_patterns_remove_every_planted_secret_and_keep_the_rest() {
        let cases = [
            ("password=Plant1Secret", "Plant1Secret", "password="),
            (
                "db password: Plant2Secret ok",
                "Plant2Secret",
                "db password: ",
            ),
            (
                "passphrase: two Plant2bSecret words",
                "Plant2bSecret",
                "passphrase: ",
            ),
            ("{\"token\": \"Plant2c\", \"n\": 1}", "Plant2c", "\"n\": 1"),
            (
                "secret: Plant2dSecret, next: kept",
                "Plant2dSecret",
                ", next: kept",
            ),
            (
                "{\"password\": \"Plant3 Secret\"}",
                "Plant3 Secret",
                "{\"password\"",
            ),
            ("PGPASSWORD='Plant4Secret' psql", "Plant4Secret", " psql"),
            (
                "connecting to postgres://app:Plant5Secret@db.internal:5432/app",
                "Plant5Secret",
                "db.internal:5432/app",
            ),
            (
                "host=db port=5432 user=app password=Plant6Secret sslmode=verify-full",
                "Plant6Secret",
                "sslmode=verify-full",
            ),
            (
                "Server=db;Database=x;User Id=app;Pwd=Plant7Secret;",
                "Plant7Secret",
                "Database=x",
            ),
            (
                "enrolling with dbvm-enroll-Plant8SecretAbcdefGhijklmnopqrstuvwxyz012345",
                "Plant8Secret",
                "enrolling with ",
            ),
            (
                "seed sealed:v1:Plant9SecretQUJDREVGR0hJSktMTU5PUA in body",
                "Plant9Secret",
                " in body",
            ),
            (
                "key id AKIAPLANT10SECRET123 used",
                "AKIAPLANT10SECRET123",
                " used",
            ),
            (
                "aws_secret_access_key = Plant11SecretwJalrXUtnFEMIK7MDENGbPxRfiCY",
                "Plant11Secret",
                "aws_secret_access_key",
            ),
            (
                "got wJalrXUtnFEMI/K7MDENG/Plant12SecretEXAMP in a header",
                "Plant12Secret",
                " in a header",
            ),
            (
                "Authorization: Bearer Plant13Secret.abc.def",
                "Plant13Secret",
                "Authorization: Bearer ",
            ),
            (
                "curl -H 'authorization: Basic Plant14SecretdXNlcjpwYXNz'",
                "Plant14Secret",
                "curl -H",
            ),
            (
                "ALTER ROLE app PASSWORD 'Plant15Secret' VALID UNTIL 'infinity'",
                "Plant15Secret",
                " VALID UNTIL",
            ),
            (
                "CREATE USER x IDENTIFIED BY 'Plant16Secret';",
                "Plant16Secret",
                "CREATE USER x",
            ),
            (
                "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJQbGFudDE3In0.Plant17Secret_sig",
                "Plant17Secret",
                "token ",
            ),
            (
                "repo1-s3-key-secret=Plant18Secret",
                "Plant18Secret",
                "repo1-s3",
            ),
            ("repo1-cipher-pass: Plant19Secret", "Plant19Secret", "repo1"),
            (
                "mysql://root:Plant20Secret@127.0.0.1/",
                "Plant20Secret",
                "127.0.0.1",
            ),
        ];
        for (input, secret, kept) in cases {
            let (out, n) = log(input);
            assert!(!out.contains(secret), "{secret} survived in {out:?}");
            assert!(out.contains(kept), "{kept:?} lost from {out:?}");
            assert!(n >= 1, "no redaction counted for {input:?}");
        }
    }

    #[test]
    fn the_block_shortcut_passes_only_blocks_with_nothing_to_redact() {
        let r = LogRedactor::default();
        assert!(r.passes_unchanged("a\nb c\n2026-12-04 LOG: checkpoint\n"));
        let lines = [
            "x password=PlantS1",
            "AKIAPLANTSHORTCUT234",
            "wJalrXUtnFEMI/K7MDENG/PlantS2SecretEXAMP",
            "-----BEGIN PRIVATE KEY-----",
            "dbvm-enroll-PlantS3",
            "Authorization: Bearer PlantS4abcdef",
        ];
        for line in lines {
            assert!(!r.passes_unchanged(&format!("a\n{line}\nb\n")), "{line}");
            assert!(!r.passes_unchanged(&format!("{line}\n")), "{line}");
        }
        let mut inside = LogRedactor::default();
        inside.line("-----BEGIN PRIVATE KEY-----");
        assert!(!inside.passes_unchanged("MIIsecret\n"));
    }

    /// Every word search of the block path (each `Needs::WordsApart` has one of its
    /// own) finds its pattern's secrets: a block holding one such line among clean ones
    /// comes out as line by line does, redacted.
    #[test]
    fn the_block_path_finds_what_every_word_search_needs() {
        // (line, whether something in it is redacted)
        let lines = [
            ("x password=PlantB1", true),
            ("key id AKIAPLANTBLOCK234567 used", true),
            ("ASIAPLANTBLOCK2345678", true),
            ("asiaplantblock234567: the pattern wants upper case", false),
            ("wJalrXUtnFEMI/K7MDENG/PlantB2SecretEXAMP", true),
            ("dbvm-enroll-PlantB3", true),
            ("Authorization: Bearer PlantB4abcdef", true),
            ("postgres://app:PlantB5@db:5432/x", true),
        ];
        assert_block_as_by_line(&lines, "PlantB");
    }

    /// Each line, between two clean ones, through the block path: it comes out as line
    /// by line does, with the same count, redacted or not as its flag says, and with
    /// nothing of `plant` left when redacted.
    fn assert_block_as_by_line(lines: &[(&str, bool)], plant: &str) {
        for &(line, redacted) in lines {
            let block = format!("2026-12-05 LOG: clean\n{line}\nclean again\n");
            let mut want = Vec::new();
            let mut by_line = LogRedactor::default();
            for l in block.lines() {
                by_line.push_line(l.as_bytes(), true, &mut want);
            }
            let mut got = Vec::new();
            let mut r = LogRedactor::default();
            assert!(r.block(block.as_bytes(), &mut got));
            let got = String::from_utf8_lossy(&got);
            assert_eq!(got, String::from_utf8_lossy(&want));
            assert_eq!(r.count > 0, redacted, "{line}");
            assert_eq!(by_line.count, r.count, "{line}");
            if redacted {
                assert!(!got.contains(plant), "{line}: {got}");
            }
        }
    }

    /// `assigned` is the `key=value` patterns' way from their key word to `:` or `=`,
    /// exactly, on ASCII text.
    #[test]
    fn an_assignment_is_what_the_patterns_see_after_a_key_word() {
        let after = Regex::new(r#"^[A-Za-z0-9_.-]*["']?\s*[:=]"#).expect("regex");
        const BYTES: &[u8] = b"aZ9_.-\"' \t\r\n\x0b\x0c:=x,;@\\/";
        let mut state: u64 = 7;
        let mut tried = [0; 2];
        for _ in 0..50_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (state >> 60) as usize;
            let text: Vec<u8> = (0..len)
                .map(|i| BYTES[((state >> (i * 4 % 56)) as usize) % BYTES.len()])
                .collect();
            let want = after.is_match(std::str::from_utf8(&text).expect("ascii"));
            assert_eq!(
                assigned(&text, 0),
                want,
                "{:?}",
                String::from_utf8_lossy(&text)
            );
            tried[usize::from(want)] += 1;
        }
        assert!(tried[0] > 1000 && tried[1] > 1000, "{tried:?}");
        // Linear over many places in one text: a run of key words is scanned once.
        let text = "key".repeat(20_000) + " value";
        let mut a = Assigned::default();
        for at in (3..=text.len() - 6).step_by(3) {
            assert!(!a.after(text.as_bytes(), at));
        }
        assert_eq!(a.scans, 1);
        let text = "key=1 ".repeat(1000);
        let mut a = Assigned::default();
        for at in (3..text.len()).step_by(6) {
            assert!(a.after(text.as_bytes(), at));
        }
        assert_eq!(a.scans, 1000);
        // From the middle of a text, as the searches call it.
        assert!(assigned(b"xx_password\" = 'y'", 7));
        assert!(!assigned(b"duplicate key value", 13));
    }

    /// A key word without an assignment is passed over, and what it would hide is not:
    /// a key word assigned later on its line, another word at the same place, or another
    /// pattern's word.
    #[test]
    fn a_key_word_without_an_assignment_hides_nothing() {
        // (line, whether something in it is redacted)
        let lines = [
            ("ERROR:  duplicate key value violates \"x_pkey\"", false),
            ("DETAIL:  Key (id)=(7) already exists.", false),
            ("the key (id) then api_key=PlantA1", true),
            ("token token: PlantA2", true),
            ("key\t\"api_key\" = \"PlantA3\"", true),
            ("passed PASSWORD 'PlantA4'", true),
            ("pass by, postgres://u:PlantA5@h/db", true),
            ("secret eyJhbGciOi.eyJzdWIi.PlantA6", true),
            ("s3-key\r: PlantA7", true),
        ];
        assert_block_as_by_line(&lines, "PlantA");
    }

    /// A word passed over never hides another that starts at the same place, whichever
    /// of the two the search reports (it reports the one added first).
    #[test]
    fn a_passed_over_word_hides_no_other_at_its_place() {
        for words in [["pass", "password"], ["password", "pass"]] {
            let search = LowerSearch {
                search: Search::Packed(
                    aho_corasick::packed::Config::new()
                        .builder()
                        .extend(words)
                        .build()
                        .expect("a packed search"),
                ),
                words: words.iter().map(|&w| (w, w == "pass")).collect(),
            };
            assert_eq!(search.find(b"x password 'y'\n", 0), Some(2), "{words:?}");
            assert_eq!(
                search.find(b"x passed; pass: y\n", 0),
                Some(10),
                "{words:?}"
            );
            assert_eq!(search.find(b"x passed\n", 0), None, "{words:?}");
        }
    }

    /// Lines made of the patterns' pieces, deterministic (a small LCG: the test needs
    /// no crate).
    fn mixed_lines(n: usize) -> Vec<String> {
        const PIECES: &[&str] = &[
            "password",
            "PassWord",
            "pass",
            "Pwd",
            "passphrase",
            "=",
            ": ",
            ":",
            " ",
            "'",
            "\"",
            "x",
            "Secret",
            "token",
            "api-key",
            "KEY",
            "s3_key",
            "credentials",
            "://",
            "https://",
            "u:pw@",
            "@",
            "host",
            "Authorization",
            "Authorization: ",
            "Bearer ",
            "bearer",
            "abcdefgh12",
            "dbvm-enroll-",
            "sealed:v1:",
            "eyJ",
            "eyJabc.def.ghi",
            "AKIA",
            "asia",
            "ABCDEFGHIJKL0123",
            "IDENTIFIED BY ",
            "identified",
            "by ",
            "-----BEGIN PRIVATE KEY-----",
            "-----END PRIVATE KEY-----",
            "-----BEGIN CERTIFICATE-----",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEK",
            "/",
            "+",
            ",",
            ";",
            "}",
            "PlantM",
            "é",
            "paſſword",
            "ſecret",
            "2026-12-04 03:00:00 UTC LOG:  ",
            "checkpoint",
            "ERROR:  duplicate key value violates unique constraint \"orders_pkey\"",
            "DETAIL:  Key (id)=(7) already exists.",
            "_",
            ".",
            "-",
            "\t",
            "\r",
            "\u{b}",
        ];
        let mut state: u64 = 14;
        let mut next = |m: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as usize) % m
        };
        (0..n)
            .map(|_| {
                (0..1 + next(10))
                    .map(|_| PIECES[next(PIECES.len())])
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_prefilter_agrees_with_the_patterns() {
        assert!(PATTERNS.len() <= 64, "the candidate sets are 64-bit masks");
        for p in PATTERNS.iter() {
            if let Needs::Words(ws) | Needs::WordsApart(ws) | Needs::Assigned(ws) = p.needs {
                for w in ws {
                    assert_eq!(
                        *w,
                        w.to_ascii_lowercase(),
                        "the block search needs lower case"
                    );
                }
            }
        }
        for (text, run) in [
            ("", None),
            ("a b", None),
            ("x wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", Some(2)),
            (" wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKE ", None),
            ("ab cd wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEYxyz", Some(6)),
        ] {
            assert_eq!(base64_run(text.as_bytes(), 0), run, "{text:?}");
        }
        let lines = mixed_lines(20_000);
        let mut matched = 0;
        for line in lines.iter().filter(|l| l.is_ascii()) {
            let set = candidates(line);
            for (i, p) in PATTERNS.iter().enumerate() {
                if p.regex.is_match(line) {
                    matched += 1;
                    assert!(
                        set & (1 << i) != 0,
                        "pattern {i} matches {line:?}, not a candidate"
                    );
                }
            }
        }
        assert!(
            matched > 1000,
            "the lines hardly exercise the patterns: {matched}"
        );

        // Blocks through the pre-filter give what line by line gives.
        for chunk in lines.chunks(37) {
            let text: String = chunk.iter().map(|l| format!("{l}\n")).collect();
            let mut by_line = LogRedactor::default();
            let mut expected = Vec::new();
            for l in chunk {
                by_line.push_line(l.as_bytes(), true, &mut expected);
            }
            let mut by_block = LogRedactor::default();
            let mut got = Vec::new();
            if by_block.block(text.as_bytes(), &mut got) {
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&expected)
                );
                assert_eq!(by_block.count, by_line.count);
            } else {
                assert!(!text.is_ascii() && got.is_empty());
            }
        }
    }

    /// The block search finds the same runs as a byte-by-byte one, wherever they start
    /// and end relative to its blocks, and whatever `from` is.
    #[test]
    fn base64_runs_are_found_wherever_they_fall() {
        fn naive(text: &[u8], from: usize) -> Option<usize> {
            let mut start = from;
            for (i, &b) in text.iter().enumerate().skip(from) {
                if !base64_byte(b) {
                    start = i + 1;
                } else if i + 1 - start >= BASE64_RUN {
                    return Some(start);
                }
            }
            None
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let class = b"AZaz09/+Kq";
        let other = b" =-.:\n_@";
        for _ in 0..3000 {
            let mut text = Vec::new();
            while text.len() < 300 {
                // Runs around the length that counts, and short ones.
                let len = match next(3) {
                    0 => 30 + next(20),
                    _ => next(12),
                };
                for _ in 0..len {
                    text.push(class[next(class.len() as u64) as usize]);
                }
                for _ in 0..1 + next(2) {
                    text.push(other[next(other.len() as u64) as usize]);
                }
            }
            let from = next(60) as usize;
            assert_eq!(
                base64_run(&text, from),
                naive(&text, from),
                "{:?} from {from}",
                String::from_utf8_lossy(&text)
            );
        }
    }

    #[test]
    fn non_ascii_look_alikes_still_go_through_the_patterns() {
        let (out, n) = log("paſſword=PlantU1 and ſecret: PlantU2");
        assert!(
            !out.contains("PlantU1") && !out.contains("PlantU2"),
            "{out}"
        );
        assert!(n >= 2);
    }

    #[test]
    fn safe_log_text_is_untouched() {
        let safe = "2026-12-04 03:00:00 UTC LOG:  checkpoint complete: wrote 42 buffers (0.3%); \
                    commit 3f786850e387550fdab836ed7e6dc881de23001b passed 12 tests, \
                    https://example.com/docs/a:b path /var/lib/dbvm/state, tokens_used 5";
        let (out, n) = log(safe);
        assert_eq!(out.trim_end(), safe);
        assert_eq!(n, 0);
    }

    #[test]
    fn private_key_blocks_go_whole_and_what_follows_stays() {
        let text = "before\n-----BEGIN PRIVATE KEY-----\nMIIPlantKeyLine1\nPlantKeyLine2\n\
                    -----END PRIVATE KEY-----\nafter\n-----BEGIN EC PRIVATE KEY-----\nPlantKeyLine3\n\
                    -----END EC PRIVATE KEY-----\n\
                    {\"key\": \"-----BEGIN RSA PRIVATE KEY-----\\nPlantKeyLine4\\n-----END RSA PRIVATE KEY-----\\n\"}\n\
                    -----BEGIN CERTIFICATE-----\nMIIcert\n-----END CERTIFICATE-----\n";
        let (out, n) = log(text);
        for s in [
            "PlantKeyLine1",
            "PlantKeyLine2",
            "PlantKeyLine3",
            "PlantKeyLine4",
        ] {
            assert!(!out.contains(s), "{s} survived in {out}");
        }
        assert!(out.contains("before") && out.contains("after") && out.contains("MIIcert"));
        assert_eq!(n, 3);
    }

    const AGENT_SAFE: &[&str] = &[
        "agent_id",
        "broker.address",
        "trusted_keys.key_id",
        "link.**",
        "*.port",
    ];

    #[test]
    fn toml_config_keeps_only_allowed_values() {
        let text = r#"
agent_id = "db1"
secret_thing = "PlantT1"
[broker]
address = "broker:7443"
ca_cert = "/etc/PlantT2/ca.pem"
[link]
initial_backoff_ms = 500
[link.deep]
x = "kept-deep"
[[trusted_keys]]
key_id = "cp1"
public_key = "PlantT3"
[db]
port = 5432
password = "PlantT4"
url = "kept?"
"#;
        let (out, n) = redact_config(text, ConfigFormat::Toml, AGENT_SAFE);
        for s in ["PlantT1", "PlantT2", "PlantT3", "PlantT4", "kept?"] {
            assert!(!out.contains(s), "{s} survived in {out}");
        }
        for s in ["db1", "broker:7443", "cp1", "500", "kept-deep", "5432"] {
            assert!(out.contains(s), "{s} lost from {out}");
        }
        assert_eq!(n, 5);
    }

    #[test]
    fn an_allowed_value_still_loses_a_password_in_it() {
        let text = "broker.address = 1\n[broker]\naddress = \"https://u:PlantA1@b:1\"\n";
        let (out, n) = redact_config(text, ConfigFormat::Toml, AGENT_SAFE);
        assert!(!out.contains("PlantA1"), "{out}");
        assert!(out.contains("b:1"));
        assert!(n >= 1);
    }

    #[test]
    fn json_config_keeps_only_allowed_values() {
        let text = r#"{"agent_id":"db1","creds":{"key":"PlantJ1","port":1},"list":[{"x":"PlantJ2"}],"n":null}"#;
        let (out, n) = redact_config(text, ConfigFormat::Json, AGENT_SAFE);
        assert!(
            !out.contains("PlantJ1") && !out.contains("PlantJ2"),
            "{out}"
        );
        assert!(out.contains("db1") && out.contains("\"port\": 1"), "{out}");
        assert_eq!(n, 2);
    }

    #[test]
    fn key_value_configs_keep_only_allowed_values() {
        let text = "# a comment with password=PlantK1\n\
                    shared_buffers = 128MB\n\
                    ssl_passphrase_command 'echo PlantK2'\n\
                    [global]\n\
                    repo1-s3-key=PlantK3\n\
                    repo1-s3-key-secret = PlantK4\n\
                    repo1-path=/backups\n\
                    [mysqld]\n\
                    skip-name-resolve\n\
                    port = 3306\n";
        let safe = &["shared_buffers", "global.repo1-path", "*.port"];
        let (out, n) = redact_config(text, ConfigFormat::KeyValue, safe);
        for s in ["PlantK1", "PlantK2", "PlantK3", "PlantK4"] {
            assert!(!out.contains(s), "{s} survived in {out}");
        }
        for s in ["128MB", "/backups", "skip-name-resolve", "3306", "[global]"] {
            assert!(out.contains(s), "{s} lost from {out}");
        }
        assert_eq!(n, 4);
    }

    #[test]
    fn a_config_that_does_not_parse_is_redacted_line_by_line() {
        let text = "agent_id = \"db1\"\nbroken [[ = \nsecret = \"PlantB1\"\n";
        let (out, _) = redact_config(text, ConfigFormat::Toml, AGENT_SAFE);
        assert!(!out.contains("PlantB1"), "{out}");
        assert!(out.contains("db1"));
    }

    #[test]
    fn key_patterns() {
        assert!(key_allowed("link.a.b", &["link.**"]));
        assert!(key_allowed("x.port", &["*.port"]));
        assert!(!key_allowed("x.y.port", &["*.port"]));
        assert!(!key_allowed("linked", &["link.**"]));
        assert!(!key_allowed("broker", &["broker.address"]));
    }
}
