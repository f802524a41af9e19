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
}

/// The key words that make a `key=value` value secret.
const SECRET_WORDS: &str = r"password|passwd|pwd|passphrase|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?|cipher[_-]?pass|s3[_-]key|session[_-]?key|auth[_-]?key";

static PATTERNS: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    let p = |re: &str, replace: fn(&Captures) -> Option<String>| Pattern {
        // The patterns are constants checked by the unit tests; a typo fails every test.
        regex: Regex::new(re).unwrap_or_else(|e| panic!("redaction pattern {re:?}: {e}")),
        replace,
    };
    vec![
        // URLs with credentials: scheme://user:password@host
        p(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*):([^@\s/]+)@", |c| {
            fresh(c).then(|| format!("{}:{MARKER}@", &c[1]))
        }),
        // Authorization headers and bearer tokens.
        p(
            r"(?i)(\bauthorization\s*[:=]\s*(?:bearer|basic|token|digest|negotiate|aws4-hmac-sha256)?\s*)([^\s,;]+)",
            |c| fresh(c).then(|| format!("{}{MARKER}", &c[1])),
        ),
        p(r"(?i)(\bbearer\s+)([A-Za-z0-9._~+/=-]{8,})", |c| {
            Some(format!("{}{MARKER}", &c[1]))
        }),
        // The fleet's own formats: enrollment tokens and sealed secrets.
        p(r"dbvm-enroll-[A-Za-z0-9_-]+", |_| Some(MARKER.to_string())),
        p(r"sealed:v1:[A-Za-z0-9_-]+", |_| Some(MARKER.to_string())),
        // JSON Web Tokens.
        p(
            r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
            |_| Some(MARKER.to_string()),
        ),
        // AWS access key ids (20 characters; shorter look-alikes too).
        p(
            r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|ABIA|ACCA)[A-Z0-9]{12,}\b",
            |_| Some(MARKER.to_string()),
        ),
        // SQL: ALTER ROLE … PASSWORD 'x', IDENTIFIED BY 'x' (MySQL, MariaDB).
        p(r#"(?i)(\bpassword\s+)('[^']*'|"[^"]*")"#, |c| {
            fresh(c).then(|| format!("{}{MARKER}", &c[1]))
        }),
        p(
            r#"(?i)(\bidentified\s+(?:with\s+\S+\s+)?by\s+(?:password\s+)?)('[^']*'|"[^"]*"|[^\s;,)]+)"#,
            |c| fresh(c).then(|| format!("{}{MARKER}", &c[1])),
        ),
        // key: value, "key": "value", with a secret key word in the key. Unquoted, the
        // value runs to the end of the line (or a `,`, `;`, `}`, `]`): prose and YAML
        // put phrases there, and half a pass phrase is still a secret.
        p(
            &format!(
                r#"(?i)(["']?[A-Za-z0-9_.-]*(?:{SECRET_WORDS})[A-Za-z0-9_.-]*["']?\s*:\s*)("[^"]*"|'[^']*'|[^\s"',;}}\]][^,;}}\]]*)"#
            ),
            |c| fresh(c).then(|| format!("{}{MARKER}", &c[1])),
        ),
        // key=value, with a secret key word in the key: one token unquoted (connection
        // strings put the next key after a space).
        p(
            &format!(
                r#"(?i)(["']?[A-Za-z0-9_.-]*(?:{SECRET_WORDS})[A-Za-z0-9_.-]*["']?\s*=\s*)("[^"]*"|'[^']*'|[^\s,;&"'}}\])]+)"#
            ),
            |c| fresh(c).then(|| format!("{}{MARKER}", &c[1])),
        ),
        // AWS-style secret access keys: 40 characters of base64 with upper and lower case
        // and a digit or `/`/`+` (hex digests such as commit ids have no upper case).
        p(
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
    // One pass finds which patterns match at all; only those run (a replacement only
    // ever writes the marker, which no pattern matches, so none becomes a match later).
    let matched = ANY.matches(line);
    if !matched.matched_any() {
        return out;
    }
    for (i, pattern) in PATTERNS.iter().enumerate() {
        if !matched.matched(i) {
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

/// Log-style redaction of a stream of lines: the patterns, and PEM private key blocks
/// dropped whole (from their BEGIN line to their END line).
#[derive(Debug, Default)]
pub struct LogRedactor {
    in_private_key: bool,
    /// Redactions so far.
    pub count: u64,
}

impl LogRedactor {
    /// Whether `block` (whole lines) needs no redaction at all: outside a key block and
    /// matched by no pattern.
    pub fn passes_unchanged(&self, block: &str) -> bool {
        !self.in_private_key && !ANY.is_match(block)
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
