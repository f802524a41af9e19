//! The include file holding the agent's overrides: rendered from validated values
//! (`postgresql.conf` syntax for PostgreSQL, an option file for MySQL) and read back, so a
//! change rewrites the whole file from what it held plus the change.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::catalog::find;
use super::server::{mysql_server_value, pg_server_value};
use super::spec::{Engine, Kind, TimeUnit};
use super::units::{duration_text, pg_size_text, seconds_text};
use super::{quote, Value};

const POSTGRES_HEADER: &str = "\
# Parameter overrides written by dbvm-agent; included from postgresql.conf.
# Do not edit: the agent rewrites this file on every parameter change.
";

const MYSQL_HEADER: &str = "\
# Parameter overrides written by dbvm-agent; read after the server's own option files.
# Do not edit: the agent rewrites this file on every parameter change.
[mysqld]
";

/// Whether `name` can be written into a config file as is. Validated names always can.
pub(super) fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

/// The body of the PostgreSQL include file holding the overrides: `name = 'value'`, one
/// per line, sorted by name; sizes in the largest exact unit (`kB`, `MB`, `GB`, `TB`),
/// durations likewise (`ms`, `s`, `min`, `h`, `d`), booleans `on`/`off`. A name that is
/// not a plain identifier (never one from [`validate`](fn@super::validate)) is skipped
/// with a warning.
pub fn render_postgres(values: &BTreeMap<String, Value>) -> String {
    let mut out = String::from(POSTGRES_HEADER);
    for (name, value) in values {
        if !is_plain_name(name) {
            tracing::warn!(parameter = %name.escape_debug(), "not writing a parameter whose name is not a plain identifier");
            continue;
        }
        let _ = writeln!(out, "{name} = '{}'", escape_pg(&postgres_text(value)));
    }
    out
}

fn postgres_text(value: &Value) -> String {
    match value {
        Value::Int(n) => n.to_string(),
        Value::Bytes(b) => pg_size_text(*b),
        Value::DurationMs(ms) => duration_text(*ms),
        Value::Bool(b) => (if *b { "on" } else { "off" }).to_string(),
        Value::Text(s) => s.clone(),
        Value::Real(x) => x.to_string(),
        Value::Disabled => "-1".to_string(),
    }
}

/// Quoting inside `'...'` as `postgresql.conf` reads it: `''` for a quote, backslash
/// escapes for backslash and control characters.
fn escape_pg(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            _ => out.push(c),
        }
    }
    out
}

/// A line of the override file (or any config file the agent reads) that it cannot read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct OverridesParseError {
    pub line: usize,
    pub message: String,
}

/// Reads back the PostgreSQL include file [`render_postgres`] wrote (the agent's current
/// overrides). Names not on the allow-list (say, from an older agent) are kept as
/// [`Value::Text`] so that rewriting the file preserves them.
pub fn parse_rendered_postgres(text: &str) -> Result<BTreeMap<String, Value>, OverridesParseError> {
    let mut values = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let error = |message: String| OverridesParseError {
            line: index + 1,
            message,
        };
        let Some((name, raw)) = parse_pg_line(line).map_err(error)? else {
            continue;
        };
        let value = match find(Engine::Postgres, &name) {
            Some(spec) => pg_server_value(spec, &raw).map_err(|m| error(format!("{name}: {m}")))?,
            None => Value::Text(raw),
        };
        values.insert(name, value);
    }
    Ok(values)
}

/// `name = 'value'`, `name = value` or `name value`, with an optional `# comment`.
fn parse_pg_line(line: &str) -> Result<Option<(String, String)>, String> {
    let rest = line.trim_start();
    if rest.is_empty() || rest.starts_with('#') {
        return Ok(None);
    }
    let name_end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(rest.len());
    if name_end == 0 {
        return Err(format!("expected a parameter name, found {}", quote(rest)));
    }
    let name = rest[..name_end].to_ascii_lowercase();
    let mut rest = rest[name_end..].trim_start();
    if let Some(after_equals) = rest.strip_prefix('=') {
        rest = after_equals.trim_start();
    }
    let (value, after) = if let Some(quoted) = rest.strip_prefix('\'') {
        unquote_pg(quoted).map_err(|m| format!("{name}: {m}"))?
    } else {
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '#')
            .unwrap_or(rest.len());
        if end == 0 {
            return Err(format!("{name}: no value"));
        }
        (rest[..end].to_string(), &rest[end..])
    };
    let after = after.trim_start();
    if !(after.is_empty() || after.starts_with('#')) {
        return Err(format!(
            "{name}: unexpected {} after the value",
            quote(after)
        ));
    }
    Ok(Some((name, value)))
}

/// The inside of a `'...'` value (after the opening quote) and what follows the closing
/// quote.
fn unquote_pg(text: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\'' if text[i + 1..].starts_with('\'') => {
                chars.next();
                out.push('\'');
            }
            '\'' => return Ok((out, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 'r')) => out.push('\r'),
                Some((_, 't')) => out.push('\t'),
                Some((_, 'b')) => out.push('\u{8}'),
                Some((_, 'f')) => out.push('\u{c}'),
                Some((_, other)) => out.push(other),
                None => break,
            },
            _ => out.push(c),
        }
    }
    Err("unterminated quoted value".to_string())
}

/// The body of the MySQL option file holding the overrides: a `[mysqld]` section with
/// `name = value`, one per line, sorted by name; sizes in bytes, durations in the
/// parameter's base unit (seconds, with a fraction where the server takes one:
/// `long_query_time = 0.5`), booleans `ON`/`OFF`. A name that is not a plain identifier
/// (never one from [`validate`](fn@super::validate)) is skipped with a warning.
pub fn render_mysql(values: &BTreeMap<String, Value>) -> String {
    let mut out = String::from(MYSQL_HEADER);
    for (name, value) in values {
        if !is_plain_name(name) {
            tracing::warn!(parameter = %name.escape_debug(), "not writing a parameter whose name is not a plain identifier");
            continue;
        }
        let _ = writeln!(out, "{name} = {}", mysql_text(name, value));
    }
    out
}

fn mysql_text(name: &str, value: &Value) -> String {
    match value {
        Value::Int(n) => n.to_string(),
        Value::Bytes(b) => b.to_string(),
        Value::DurationMs(ms) => {
            let unit = match find(Engine::Mysql, name).map(|spec| spec.kind) {
                Some(Kind::Duration { unit, .. }) => unit,
                _ => TimeUnit::Second,
            };
            match unit {
                TimeUnit::Millisecond => ms.to_string(),
                TimeUnit::Second => seconds_text(*ms),
            }
        }
        Value::Bool(b) => (if *b { "ON" } else { "OFF" }).to_string(),
        Value::Text(s) => mysql_quote(s),
        Value::Real(x) => x.to_string(),
        Value::Disabled => "-1".to_string(),
    }
}

/// A plain word as is; anything else in double quotes with backslash escapes.
fn mysql_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ',' | '-' | '+' | '/' | ':')
        });
    if plain {
        return text.to_string();
    }
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Reads back the MySQL option file [`render_mysql`] wrote: the `[mysqld]` section's
/// options (other sections are skipped). Names not on the allow-list are kept as
/// [`Value::Text`] so that rewriting the file preserves them.
pub fn parse_rendered_mysql(text: &str) -> Result<BTreeMap<String, Value>, OverridesParseError> {
    let mut values = BTreeMap::new();
    let mut section: Option<String> = None;
    for (index, line) in text.lines().enumerate() {
        let error = |message: String| OverridesParseError {
            line: index + 1,
            message,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let name = header
                .strip_suffix(']')
                .ok_or_else(|| error(format!("{} is not a [section] header", quote(line))))?;
            section = Some(name.trim().to_string());
            continue;
        }
        match section.as_deref() {
            None => return Err(error("an option before any [section]".to_string())),
            Some("mysqld") => {}
            Some(_) => continue,
        }
        let (key, raw) = match line.split_once('=') {
            Some((key, raw)) => (key, Some(unquote_mysql(raw.trim()).map_err(&error)?)),
            None => (line, None),
        };
        let name = key.trim().to_ascii_lowercase().replace('-', "_");
        if !is_plain_name(&name) {
            return Err(error(format!(
                "{} is not an option name",
                quote(key.trim())
            )));
        }
        let spec = find(Engine::Mysql, &name);
        let value = match (spec, raw) {
            (Some(spec), Some(raw)) => {
                mysql_server_value(spec, &raw).map_err(|m| error(format!("{name}: {m}")))?
            }
            (Some(spec), None) if matches!(spec.kind, Kind::Bool) => Value::Bool(true),
            (Some(_), None) => return Err(error(format!("{name}: no value"))),
            (None, Some(raw)) => Value::Text(raw),
            (None, None) => Value::Bool(true),
        };
        values.insert(name, value);
    }
    Ok(values)
}

/// An option value: `"quoted"` or `'quoted'` with backslash escapes, or bare up to a
/// `#` comment.
fn unquote_mysql(text: &str) -> Result<String, String> {
    let Some(quote_char) = text.chars().next().filter(|c| *c == '"' || *c == '\'') else {
        let bare = text.split('#').next().unwrap_or_default();
        return Ok(bare.trim().to_string());
    };
    let mut out = String::new();
    let mut chars = text.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 'r')) => out.push('\r'),
                Some((_, 't')) => out.push('\t'),
                Some((_, 'b')) => out.push('\u{8}'),
                Some((_, 's')) => out.push(' '),
                Some((_, other)) => out.push(other),
                None => break,
            },
            c if c == quote_char => {
                let after = text[i + 1..].trim_start();
                if after.is_empty() || after.starts_with('#') {
                    return Ok(out);
                }
                return Err(format!("unexpected {} after the value", quote(after)));
            }
            _ => out.push(c),
        }
    }
    Err("unterminated quoted value".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::params::test_support::{mysql_sample, postgres_sample};
    use crate::db::params::units::{GIB, MIB};

    #[test]
    fn render_postgres_exactly() {
        let rendered = render_postgres(&postgres_sample().values);
        let body: Vec<&str> = rendered.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "autovacuum = 'on'",
                "checkpoint_timeout = '15min'",
                "effective_cache_size = '3GB'",
                "log_connections = 'off'",
                "log_min_duration_statement = '-1'",
                "log_statement = 'ddl'",
                "maintenance_work_mem = '1536MB'",
                "max_connections = '250'",
                "max_wal_size = '2GB'",
                "min_wal_size = '80MB'",
                "random_page_cost = '1.1'",
                "shared_buffers = '1GB'",
                "statement_timeout = '1500ms'",
                "wal_keep_size = '0'",
                "work_mem = '4100kB'",
            ]
        );
    }

    #[test]
    fn render_postgres_round_trips() {
        let mut values = postgres_sample().values;
        let parsed = parse_rendered_postgres(&render_postgres(&values));
        assert_eq!(parsed.as_ref(), Ok(&values));
        // Names the agent no longer allows survive as text, quotes and backslashes too.
        values.insert(
            "application_name".into(),
            Value::Text("it's a \\ test\n\tx".into()),
        );
        let rendered = render_postgres(&values);
        assert!(
            rendered.contains("application_name = 'it''s a \\\\ test\\n\\tx'"),
            "{rendered}"
        );
        assert_eq!(parse_rendered_postgres(&rendered), Ok(values));
    }

    #[test]
    fn parse_postgres_reads_server_syntax_and_reports_lines() {
        let text =
            "# comment\n\nshared_buffers = 16384 # pages\nwork_mem '4MB'\nMAX_CONNECTIONS=100\n";
        let parsed = parse_rendered_postgres(text).unwrap();
        assert_eq!(parsed["shared_buffers"], Value::Bytes(128 * MIB));
        assert_eq!(parsed["work_mem"], Value::Bytes(4 * MIB));
        assert_eq!(parsed["max_connections"], Value::Int(100));
        assert_eq!(
            parse_rendered_postgres("work_mem = '4MB'\nshared_buffers = '128MB"),
            Err(OverridesParseError {
                line: 2,
                message: "shared_buffers: unterminated quoted value".into()
            })
        );
        assert_eq!(
            parse_rendered_postgres("\nwork_mem = 'lots'").map_err(|e| e.to_string()),
            Err("line 2: work_mem: \"lots\" is not a size (e.g. \"128MB\")".to_string())
        );
        assert_eq!(
            parse_rendered_postgres("work_mem = '4MB' extra").map_err(|e| e.line),
            Err(1)
        );
    }

    #[test]
    fn render_mysql_exactly() {
        let rendered = render_mysql(&mysql_sample().values);
        let body: Vec<&str> = rendered.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "[mysqld]",
                "binlog_expire_logs_seconds = 604800",
                "innodb_buffer_pool_size = 2147483648",
                "innodb_flush_log_at_trx_commit = 2",
                "innodb_redo_log_capacity = 1073741824",
                "long_query_time = 0.5",
                "max_allowed_packet = 67108864",
                "max_connections = 500",
                "slow_query_log = ON",
                "sync_binlog = 1",
                "tmp_table_size = 16777217",
                "wait_timeout = 600",
            ]
        );
    }

    #[test]
    fn render_mysql_round_trips() {
        let mut values = mysql_sample().values;
        assert_eq!(
            parse_rendered_mysql(&render_mysql(&values)).as_ref(),
            Ok(&values)
        );
        values.insert(
            "log_error".into(),
            Value::Text("/var/log/my sql/\"err\".log".into()),
        );
        values.insert("long_query_time".into(), Value::DurationMs(1250));
        let rendered = render_mysql(&values);
        assert!(rendered.contains("long_query_time = 1.25\n"), "{rendered}");
        assert_eq!(parse_rendered_mysql(&rendered), Ok(values));
    }

    #[test]
    fn parse_mysql_reads_option_file_syntax() {
        let text = "[client]\nport = 3306\n[mysqld]\n; comment\nmax-connections = 300\n\
                    slow_query_log\ninnodb_buffer_pool_size = 1G # one gig\n\
                    wait_timeout = '600'\n";
        let parsed = parse_rendered_mysql(text).unwrap();
        assert_eq!(parsed.len(), 4, "{parsed:?}");
        assert_eq!(parsed["max_connections"], Value::Int(300));
        assert_eq!(parsed["slow_query_log"], Value::Bool(true));
        assert_eq!(parsed["innodb_buffer_pool_size"], Value::Bytes(GIB));
        assert_eq!(parsed["wait_timeout"], Value::DurationMs(600_000));
        assert_eq!(
            parse_rendered_mysql("max_connections = 1").map_err(|e| e.line),
            Err(1)
        );
        assert_eq!(
            parse_rendered_mysql("[mysqld]\nmax_connections = many").map_err(|e| e.to_string()),
            Err("line 2: max_connections: \"many\" is not a whole number".to_string())
        );
    }
}
