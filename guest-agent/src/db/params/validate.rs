//! A control plane's change set checked against the catalog: every entry resolved to an
//! allowed parameter, read in its engine's units, kept inside its range, and checked
//! against the other entries. Every problem is reported at once; nothing is partial.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value as Json;

use super::catalog::{allow_list, find};
use super::spec::{Engine, Flavour, Kind, ParamSpec, TimeUnit};
use super::template::TEMPLATE_FORMAT;
use super::units::{
    parse_duration, parse_mysql_size, parse_pg_size, parse_real, scale_decimal, size_error, Bare,
};
use super::value::human_bytes;
use super::{quote, shorten, Value};

/// A change set that passed [`validate`]: safe to render and apply as a whole.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    pub flavour: Flavour,
    /// Parameters to set, by name, normalised.
    pub values: BTreeMap<String, Value>,
    /// Parameters whose override is removed (given as `null`), sorted.
    pub reset: Vec<String>,
    /// Changed parameters (set or reset) that take effect only after a restart, sorted.
    pub restart_required: Vec<String>,
}

/// What is wrong with one entry of a change set.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamProblem {
    /// The parameter as given (cut short if very long).
    pub name: String,
    pub kind: ProblemKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ProblemKind {
    /// Not on the allow-list of this engine.
    Unknown {
        flavour: Flavour,
        /// The closest allowed name, when one is near.
        suggestion: Option<&'static str>,
        /// The other engine, when the name is one of its parameters.
        other_engine: Option<Engine>,
    },
    /// On the engine's allow-list, but this flavour lacks it.
    NotInFlavour {
        flavour: Flavour,
        available: &'static [Flavour],
    },
    WrongType {
        expected: String,
        got: String,
    },
    /// The right type, but unreadable (a bad unit, a fraction, a negative size).
    Invalid {
        reason: String,
    },
    BelowMinimum {
        value: Value,
        min: Value,
        max: Value,
    },
    AboveMaximum {
        value: Value,
        min: Value,
        max: Value,
    },
    /// The server would round it.
    NotMultiple {
        value: Value,
        step: Value,
    },
    NotOneOf {
        got: String,
        allowed: &'static [&'static str],
    },
    /// Fine alone, not together with another entry.
    Conflict {
        reason: String,
    },
    /// A template in a format this agent does not read.
    UnsupportedFormat {
        found: u32,
    },
}

impl ParamProblem {
    pub(super) fn new(name: &str, kind: ProblemKind) -> Self {
        ParamProblem {
            name: shorten(name, 64),
            kind,
        }
    }
}

impl fmt::Display for ParamProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.kind)
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::Unknown {
                other_engine: Some(other),
                flavour,
                ..
            } => write!(
                f,
                "unknown parameter for {flavour} (it is a {other} parameter)"
            ),
            ProblemKind::Unknown {
                suggestion: Some(near),
                ..
            } => write!(f, "unknown parameter (did you mean {near}?)"),
            ProblemKind::Unknown { flavour, .. } => {
                write!(f, "unknown parameter (not on the {flavour} allow-list)")
            }
            ProblemKind::NotInFlavour { flavour, available } => {
                let names: Vec<&str> = available.iter().map(|f| f.name()).collect();
                write!(
                    f,
                    "not available on {flavour} (only on {})",
                    names.join(" and ")
                )
            }
            ProblemKind::WrongType { expected, got } => write!(f, "expected {expected}, got {got}"),
            ProblemKind::Invalid { reason } | ProblemKind::Conflict { reason } => {
                f.write_str(reason)
            }
            ProblemKind::BelowMinimum { value, min, max } => write!(
                f,
                "{value} is below the minimum {min} (allowed {min}..{max})"
            ),
            ProblemKind::AboveMaximum { value, min, max } => write!(
                f,
                "{value} is above the maximum {max} (allowed {min}..{max})"
            ),
            ProblemKind::NotMultiple { value, step } => write!(
                f,
                "{value} is not a whole multiple of {step} (the server would round it)"
            ),
            ProblemKind::NotOneOf { got, allowed } => {
                write!(f, "{got} is not one of {}", allowed.join(", "))
            }
            ProblemKind::UnsupportedFormat { found } => write!(
                f,
                "template format {found} is not supported (this agent reads format \
                 {TEMPLATE_FORMAT})"
            ),
        }
    }
}

/// Every problem found in a change set, in the order of its entries (cross-parameter
/// conflicts last). Displayed one problem per line.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}", one_per_line(.0))]
pub struct ParamErrors(pub Vec<ParamProblem>);

fn one_per_line(problems: &[ParamProblem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Checks every entry of `changes` against `flavour`'s allow-list and returns either all
/// of it normalised, or every problem found. `null` removes an override.
pub fn validate(
    flavour: Flavour,
    changes: &serde_json::Map<String, Json>,
) -> Result<Validated, ParamErrors> {
    let mut problems = Vec::new();
    let mut values = BTreeMap::new();
    let mut reset = BTreeSet::new();
    let mut restart = BTreeSet::new();
    for (name, raw) in changes {
        let spec = match resolve(flavour, name) {
            Ok(spec) => spec,
            Err(kind) => {
                problems.push(ParamProblem::new(name, kind));
                continue;
            }
        };
        if raw.is_null() {
            reset.insert(spec.name.to_string());
        } else {
            match check_value(flavour.engine(), spec, raw) {
                Ok(value) => {
                    values.insert(spec.name.to_string(), value);
                }
                Err(kind) => {
                    problems.push(ParamProblem::new(name, kind));
                    continue;
                }
            }
        }
        if spec.restart {
            restart.insert(spec.name.to_string());
        }
    }
    cross_checks(&values, &mut problems);
    if problems.is_empty() {
        Ok(Validated {
            flavour,
            values,
            reset: reset.into_iter().collect(),
            restart_required: restart.into_iter().collect(),
        })
    } else {
        Err(ParamErrors(problems))
    }
}

fn resolve(flavour: Flavour, name: &str) -> Result<&'static ParamSpec, ProblemKind> {
    match find(flavour.engine(), name) {
        Some(spec) if spec.available_on(flavour) => Ok(spec),
        Some(spec) => Err(ProblemKind::NotInFlavour {
            flavour,
            available: spec.flavours,
        }),
        None => {
            let other = match flavour.engine() {
                Engine::Postgres => Engine::Mysql,
                Engine::Mysql => Engine::Postgres,
            };
            let other_engine = find(other, name).map(|_| other);
            Err(ProblemKind::Unknown {
                flavour,
                suggestion: if other_engine.is_some() {
                    None
                } else {
                    suggest(flavour, name)
                },
                other_engine,
            })
        }
    }
}

/// The allowed name closest to `name`: a small edit away, or the only one containing it.
fn suggest(flavour: Flavour, name: &str) -> Option<&'static str> {
    if name.len() > 100 {
        return None;
    }
    let wanted = name.trim().to_ascii_lowercase().replace('-', "_");
    let limit = if wanted.chars().count() >= 10 { 3 } else { 2 };
    let closest = allow_list(flavour)
        .map(|spec| (edit_distance(&wanted, spec.name), spec.name))
        .min_by_key(|(distance, _)| *distance);
    if let Some((distance, near)) = closest {
        if distance <= limit {
            return Some(near);
        }
    }
    if wanted.len() >= 8 {
        let mut containing = allow_list(flavour).filter(|spec| spec.name.contains(&wanted));
        if let (Some(only), None) = (containing.next(), containing.next()) {
            return Some(only.name);
        }
    }
    None
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            let delete = previous[j + 1] + 1;
            let insert = current[j] + 1;
            current.push(substitute.min(delete).min(insert));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Rules that involve two parameters of the same change set.
fn cross_checks(values: &BTreeMap<String, Value>, problems: &mut Vec<ParamProblem>) {
    if let (Some(Value::Bytes(min)), Some(Value::Bytes(max))) =
        (values.get("min_wal_size"), values.get("max_wal_size"))
    {
        if min > max {
            problems.push(ParamProblem::new(
                "min_wal_size",
                ProblemKind::Conflict {
                    reason: format!(
                        "{} is above max_wal_size {}",
                        human_bytes(*min),
                        human_bytes(*max)
                    ),
                },
            ));
        }
    }
    if values.contains_key("expire_logs_days") && values.contains_key("binlog_expire_logs_seconds")
    {
        problems.push(ParamProblem::new(
            "expire_logs_days",
            ProblemKind::Conflict {
                reason: "set either expire_logs_days or binlog_expire_logs_seconds, not both \
                         (the server treats them as one setting)"
                    .to_string(),
            },
        ));
    }
}

fn check_value(engine: Engine, spec: &ParamSpec, raw: &Json) -> Result<Value, ProblemKind> {
    let value = match spec.kind {
        Kind::Int { .. } => Value::Int(json_int(raw)?),
        Kind::Bytes { .. } => Value::Bytes(json_bytes(engine, raw)?),
        Kind::Duration {
            unit,
            minus_one_disables,
            ..
        } => json_duration(raw, unit, minus_one_disables)?,
        Kind::Bool => Value::Bool(json_bool(raw)?),
        Kind::Enum(allowed) => Value::Text(json_enum(raw, allowed)?.to_string()),
        Kind::Real { .. } => Value::Real(json_real(raw)?),
    };
    check_bounds(spec.kind, &value)?;
    Ok(value)
}

fn check_bounds(kind: Kind, value: &Value) -> Result<(), ProblemKind> {
    match (kind, value) {
        (Kind::Int { min, max }, Value::Int(v)) => in_range(*v, min, max, Value::Int),
        (Kind::Bytes { min, max, step }, Value::Bytes(v)) => {
            in_range(*v, min, max, Value::Bytes)?;
            whole_multiple(*v, step, Value::Bytes)
        }
        (
            Kind::Duration {
                min_ms,
                max_ms,
                step_ms,
                ..
            },
            Value::DurationMs(v),
        ) => {
            in_range(*v, min_ms, max_ms, Value::DurationMs)?;
            whole_multiple(*v, step_ms, Value::DurationMs)
        }
        (Kind::Real { min, max }, Value::Real(v)) => in_range(*v, min, max, Value::Real),
        _ => Ok(()),
    }
}

fn in_range<T: PartialOrd + Copy>(
    v: T,
    min: T,
    max: T,
    wrap: fn(T) -> Value,
) -> Result<(), ProblemKind> {
    if v < min {
        Err(ProblemKind::BelowMinimum {
            value: wrap(v),
            min: wrap(min),
            max: wrap(max),
        })
    } else if v > max {
        Err(ProblemKind::AboveMaximum {
            value: wrap(v),
            min: wrap(min),
            max: wrap(max),
        })
    } else {
        Ok(())
    }
}

fn whole_multiple(v: u64, step: u64, wrap: fn(u64) -> Value) -> Result<(), ProblemKind> {
    if step > 1 && !v.is_multiple_of(step) {
        Err(ProblemKind::NotMultiple {
            value: wrap(v),
            step: wrap(step),
        })
    } else {
        Ok(())
    }
}

fn wrong_type(expected: impl Into<String>, raw: &Json) -> ProblemKind {
    ProblemKind::WrongType {
        expected: expected.into(),
        got: describe_json(raw),
    }
}

fn invalid(reason: String) -> ProblemKind {
    ProblemKind::Invalid { reason }
}

fn describe_json(raw: &Json) -> String {
    match raw {
        Json::Null => "null".to_string(),
        Json::Bool(b) => format!("the boolean {b}"),
        Json::Number(n) => format!("the number {n}"),
        Json::String(s) => format!("the string {}", quote(s)),
        Json::Array(_) => "a list".to_string(),
        Json::Object(_) => "an object".to_string(),
    }
}

fn json_int(raw: &Json) -> Result<i64, ProblemKind> {
    let parsed = match raw {
        Json::Number(n) => n.as_i64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| wrong_type("a whole number", raw))
}

fn json_bytes(engine: Engine, raw: &Json) -> Result<u64, ProblemKind> {
    match raw {
        Json::Number(n) => match n.as_u64() {
            Some(b) => Ok(b),
            // A negative or fractional number: read its decimal text exactly.
            None => {
                let text = n.to_string();
                scale_decimal(&text, 1).map_err(|e| invalid(size_error(&text, e, engine)))
            }
        },
        Json::String(s) => match engine {
            Engine::Postgres => parse_pg_size(s, Bare::Refuse),
            Engine::Mysql => parse_mysql_size(s),
        }
        .map_err(invalid),
        _ => Err(wrong_type(
            match engine {
                Engine::Postgres => "a number of bytes or a size such as \"128MB\"",
                Engine::Mysql => "a number of bytes or a size such as \"128M\"",
            },
            raw,
        )),
    }
}

fn json_duration(
    raw: &Json,
    unit: TimeUnit,
    minus_one_disables: bool,
) -> Result<Value, ProblemKind> {
    match raw {
        Json::Number(n) => {
            if let Some(count) = n.as_u64() {
                count
                    .checked_mul(unit.ms())
                    .map(Value::DurationMs)
                    .ok_or_else(|| invalid(format!("{n} is too large")))
            } else if minus_one_disables && n.as_i64() == Some(-1) {
                Ok(Value::Disabled)
            } else {
                // Negative or fractional (0.5 s): read the decimal text exactly.
                parse_duration(&n.to_string(), unit, minus_one_disables).map_err(invalid)
            }
        }
        Json::String(s) => parse_duration(s, unit, minus_one_disables).map_err(invalid),
        _ => Err(wrong_type(
            match unit {
                TimeUnit::Millisecond => {
                    "a number of milliseconds or a duration such as \"30s\" or \"5min\""
                }
                TimeUnit::Second => "a number of seconds or a duration such as \"30s\" or \"5min\"",
            },
            raw,
        )),
    }
}

fn json_bool(raw: &Json) -> Result<bool, ProblemKind> {
    let parsed = match raw {
        Json::Bool(b) => Some(*b),
        Json::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "on" | "true" => Some(true),
            "off" | "false" => Some(false),
            _ => None,
        },
        _ => None,
    };
    parsed.ok_or_else(|| wrong_type("true, false, \"on\" or \"off\"", raw))
}

fn json_enum(raw: &Json, allowed: &'static [&'static str]) -> Result<&'static str, ProblemKind> {
    let text = match raw {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        _ => return Err(wrong_type(format!("one of {}", allowed.join(", ")), raw)),
    };
    canonical_word(allowed, &text).ok_or_else(|| ProblemKind::NotOneOf {
        got: quote(&text),
        allowed,
    })
}

fn json_real(raw: &Json) -> Result<f64, ProblemKind> {
    match raw {
        Json::Number(n) => n.as_f64().ok_or_else(|| wrong_type("a number", raw)),
        Json::String(s) => parse_real(s).map_err(invalid),
        _ => Err(wrong_type("a number", raw)),
    }
}

pub(super) fn canonical_word(allowed: &'static [&'static str], text: &str) -> Option<&'static str> {
    let text = text.trim();
    allowed
        .iter()
        .copied()
        .find(|word| word.eq_ignore_ascii_case(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::params::catalog::lookup;
    use crate::db::params::test_support::{message, ok, one, problems};
    use crate::db::params::units::{DAY_MS, GIB, HOUR_MS, KIB, MIB, TIB};
    use serde_json::json;

    #[test]
    fn int_accepts_numbers_and_numeric_strings() {
        assert_eq!(
            one(Flavour::Postgres, "max_connections", json!(200)),
            Value::Int(200)
        );
        assert_eq!(
            one(Flavour::Postgres, "max_connections", json!(" 300 ")),
            Value::Int(300)
        );
        assert_eq!(
            one(Flavour::Mysql8, "max_connections", json!(10_000)),
            Value::Int(10_000)
        );
    }

    #[test]
    fn int_range_and_type_messages() {
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!(5)),
            "max_connections: 5 is below the minimum 10 (allowed 10..10000)"
        );
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!(20_000)),
            "max_connections: 20000 is above the maximum 10000 (allowed 10..10000)"
        );
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!(true)),
            "max_connections: expected a whole number, got the boolean true"
        );
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!(100.5)),
            "max_connections: expected a whole number, got the number 100.5"
        );
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!("lots")),
            "max_connections: expected a whole number, got the string \"lots\""
        );
    }

    #[test]
    fn postgres_sizes_use_postgres_units() {
        let pg = Flavour::Postgres;
        assert_eq!(
            one(pg, "shared_buffers", json!("128MB")),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(one(pg, "shared_buffers", json!("1GB")), Value::Bytes(GIB));
        assert_eq!(one(pg, "shared_buffers", json!("1 TB")), Value::Bytes(TIB));
        assert_eq!(
            one(pg, "shared_buffers", json!("1.5GB")),
            Value::Bytes(1536 * MIB)
        );
        assert_eq!(
            one(pg, "shared_buffers", json!(134_217_728)),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(one(pg, "work_mem", json!("64kB")), Value::Bytes(64 * KIB));
        assert_eq!(one(pg, "work_mem", json!("65536B")), Value::Bytes(64 * KIB));
        assert_eq!(one(pg, "wal_keep_size", json!("0")), Value::Bytes(0));
        assert_eq!(one(pg, "wal_keep_size", json!(0)), Value::Bytes(0));
    }

    #[test]
    fn postgres_size_problems() {
        let pg = Flavour::Postgres;
        assert_eq!(
            message(pg, "work_mem", json!("64mb")),
            "work_mem: \"64mb\" has an unknown unit \"mb\": PostgreSQL sizes use B, kB, MB, GB \
             or TB (case matters)"
        );
        assert_eq!(
            message(pg, "work_mem", json!("1024")),
            "work_mem: \"1024\" has no unit: give one of B, kB, MB, GB, TB (e.g. \"128MB\"), or \
             a JSON number of bytes"
        );
        assert_eq!(
            message(pg, "work_mem", json!("128M")),
            "work_mem: \"128M\" has an unknown unit \"M\": PostgreSQL sizes use B, kB, MB, GB or \
             TB (case matters)"
        );
        assert_eq!(
            message(pg, "shared_buffers", json!("1MB")),
            "shared_buffers: 1 MiB is below the minimum 16 MiB (allowed 16 MiB..1 TiB)"
        );
        assert_eq!(
            message(pg, "shared_buffers", json!("2TB")),
            "shared_buffers: 2 TiB is above the maximum 1 TiB (allowed 16 MiB..1 TiB)"
        );
        assert_eq!(
            message(pg, "shared_buffers", json!("16388kB")),
            "shared_buffers: 16388 KiB is not a whole multiple of 8 KiB (the server would round \
             it)"
        );
        assert_eq!(
            message(pg, "work_mem", json!(100_000)),
            "work_mem: 100000 B is not a whole multiple of 1 KiB (the server would round it)"
        );
        assert_eq!(
            message(pg, "work_mem", json!(-5)),
            "work_mem: \"-5\" is negative"
        );
        assert_eq!(
            message(pg, "work_mem", json!("1.0001kB")),
            "work_mem: \"1.0001kB\" is not a whole number of bytes"
        );
        assert_eq!(
            message(pg, "work_mem", json!([1])),
            "work_mem: expected a number of bytes or a size such as \"128MB\", got a list"
        );
        assert_eq!(
            message(pg, "work_mem", json!("99999999999999999999TB")),
            "work_mem: \"99999999999999999999TB\" is too large"
        );
    }

    #[test]
    fn mysql_sizes_use_mysql_suffixes() {
        let my = Flavour::Mysql8;
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!("128M")),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!("1G")),
            Value::Bytes(GIB)
        );
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!("2g")),
            Value::Bytes(2 * GIB)
        );
        assert_eq!(
            one(my, "max_allowed_packet", json!("65536K")),
            Value::Bytes(64 * MIB)
        );
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!("134217728")),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!(134_217_728)),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(
            one(my, "tmp_table_size", json!(1_048_577)),
            Value::Bytes(MIB + 1)
        );
        assert_eq!(
            message(my, "innodb_buffer_pool_size", json!("128MB")),
            "innodb_buffer_pool_size: \"128MB\" is not a MySQL size: use a whole number of bytes \
             with an optional K, M, G or T suffix (e.g. \"128M\")"
        );
        assert_eq!(
            message(my, "max_allowed_packet", json!(MIB + 1)),
            "max_allowed_packet: 1048577 B is not a whole multiple of 1 KiB (the server would \
             round it)"
        );
        assert_eq!(
            message(my, "innodb_buffer_pool_size", json!("16M")),
            "innodb_buffer_pool_size: 16 MiB is below the minimum 32 MiB (allowed 32 MiB..1 TiB)"
        );
    }

    #[test]
    fn durations_take_base_unit_numbers_and_unit_strings() {
        let pg = Flavour::Postgres;
        // checkpoint_timeout counts seconds, statement_timeout milliseconds.
        assert_eq!(
            one(pg, "checkpoint_timeout", json!(300)),
            Value::DurationMs(300_000)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("300")),
            Value::DurationMs(300_000)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("5min")),
            Value::DurationMs(300_000)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("30s")),
            Value::DurationMs(30_000)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("1h")),
            Value::DurationMs(HOUR_MS)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("1d")),
            Value::DurationMs(DAY_MS)
        );
        assert_eq!(
            one(pg, "statement_timeout", json!(5000)),
            Value::DurationMs(5000)
        );
        assert_eq!(
            one(pg, "statement_timeout", json!("5s")),
            Value::DurationMs(5000)
        );
        assert_eq!(
            one(pg, "statement_timeout", json!("250ms")),
            Value::DurationMs(250)
        );
        assert_eq!(one(pg, "statement_timeout", json!(0)), Value::DurationMs(0));
        assert_eq!(
            one(pg, "log_min_duration_statement", json!(-1)),
            Value::Disabled
        );
        assert_eq!(
            one(pg, "log_min_duration_statement", json!("-1")),
            Value::Disabled
        );
        assert_eq!(
            one(pg, "log_min_duration_statement", json!(0)),
            Value::DurationMs(0)
        );
        let my = Flavour::Mariadb;
        assert_eq!(
            one(my, "wait_timeout", json!(28_800)),
            Value::DurationMs(28_800_000)
        );
        assert_eq!(
            one(my, "wait_timeout", json!("8h")),
            Value::DurationMs(28_800_000)
        );
        assert_eq!(
            one(my, "long_query_time", json!(0.5)),
            Value::DurationMs(500)
        );
        assert_eq!(
            one(my, "long_query_time", json!("0.25")),
            Value::DurationMs(250)
        );
        assert_eq!(
            one(my, "long_query_time", json!(2)),
            Value::DurationMs(2000)
        );
    }

    #[test]
    fn duration_problems() {
        let pg = Flavour::Postgres;
        assert_eq!(
            message(pg, "checkpoint_timeout", json!("29s")),
            "checkpoint_timeout: 29 s is below the minimum 30 s (allowed 30 s..1 d)"
        );
        assert_eq!(
            message(pg, "checkpoint_timeout", json!("90500ms")),
            "checkpoint_timeout: 90500 ms is not a whole multiple of 1 s (the server would round \
             it)"
        );
        assert_eq!(
            message(pg, "statement_timeout", json!(-1)),
            "statement_timeout: \"-1\" is negative"
        );
        assert_eq!(
            message(pg, "log_min_duration_statement", json!(-2)),
            "log_min_duration_statement: \"-2\" is negative (only -1, which disables it, may be)"
        );
        assert_eq!(
            message(pg, "statement_timeout", json!("5 minutes")),
            "statement_timeout: \"5 minutes\" has an unknown unit \"minutes\": durations use ms, \
             s, min, h or d (case matters)"
        );
        assert_eq!(
            message(pg, "statement_timeout", json!("0.5ms")),
            "statement_timeout: \"0.5ms\" is not a whole number of milliseconds"
        );
        assert_eq!(
            message(pg, "statement_timeout", json!(false)),
            "statement_timeout: expected a number of milliseconds or a duration such as \"30s\" \
             or \"5min\", got the boolean false"
        );
        assert_eq!(
            message(Flavour::Mysql8, "wait_timeout", json!(0.5)),
            "wait_timeout: 500 ms is below the minimum 10 s (allowed 10 s..365 d)"
        );
        assert_eq!(
            message(Flavour::Mysql8, "binlog_expire_logs_seconds", json!(0)),
            "binlog_expire_logs_seconds: 0 ms is below the minimum 1 d (allowed 1 d..90 d)"
        );
    }

    #[test]
    fn bools_enums_and_reals() {
        let pg = Flavour::Postgres;
        assert_eq!(one(pg, "autovacuum", json!(true)), Value::Bool(true));
        assert_eq!(one(pg, "autovacuum", json!("OFF")), Value::Bool(false));
        assert_eq!(one(pg, "log_connections", json!("on")), Value::Bool(true));
        assert_eq!(
            one(pg, "log_connections", json!("False")),
            Value::Bool(false)
        );
        assert_eq!(
            message(pg, "autovacuum", json!(1)),
            "autovacuum: expected true, false, \"on\" or \"off\", got the number 1"
        );
        assert_eq!(
            one(pg, "log_statement", json!("DDL")),
            Value::Text("ddl".into())
        );
        assert_eq!(
            message(pg, "log_statement", json!("everything")),
            "log_statement: \"everything\" is not one of none, ddl, mod, all"
        );
        let my = Flavour::Mysql8;
        assert_eq!(
            one(my, "innodb_flush_log_at_trx_commit", json!(2)),
            Value::Text("2".into())
        );
        assert_eq!(
            one(my, "innodb_flush_log_at_trx_commit", json!("0")),
            Value::Text("0".into())
        );
        assert_eq!(
            message(my, "innodb_flush_log_at_trx_commit", json!(3)),
            "innodb_flush_log_at_trx_commit: \"3\" is not one of 0, 1, 2"
        );
        assert_eq!(one(pg, "random_page_cost", json!(1.1)), Value::Real(1.1));
        assert_eq!(one(pg, "random_page_cost", json!("1.1")), Value::Real(1.1));
        assert_eq!(one(pg, "random_page_cost", json!(4)), Value::Real(4.0));
        assert_eq!(
            message(pg, "random_page_cost", json!(0.05)),
            "random_page_cost: 0.05 is below the minimum 0.1 (allowed 0.1..100)"
        );
        assert_eq!(
            message(pg, "random_page_cost", json!("NaN")),
            "random_page_cost: \"NaN\" is not a finite number"
        );
    }

    #[test]
    fn unknown_names_get_a_suggestion_when_one_is_near() {
        assert_eq!(
            message(Flavour::Postgres, "shared_bufers", json!("128MB")),
            "shared_bufers: unknown parameter (did you mean shared_buffers?)"
        );
        assert_eq!(
            message(Flavour::Postgres, "Shared_Buffers", json!("128MB")),
            "Shared_Buffers: unknown parameter (did you mean shared_buffers?)"
        );
        assert_eq!(
            message(Flavour::Postgres, "max-connections", json!(100)),
            "max-connections: unknown parameter (did you mean max_connections?)"
        );
        assert_eq!(
            message(Flavour::Mysql8, "buffer_pool_size", json!("1G")),
            "buffer_pool_size: unknown parameter (did you mean innodb_buffer_pool_size?)"
        );
        assert_eq!(
            message(Flavour::Postgres, "innodb_buffer_pool_size", json!("1G")),
            "innodb_buffer_pool_size: unknown parameter for PostgreSQL (it is a MySQL parameter)"
        );
        assert_eq!(
            message(Flavour::Mariadb, "shared_buffers", json!("1G")),
            "shared_buffers: unknown parameter for MariaDB (it is a PostgreSQL parameter)"
        );
        assert_eq!(
            message(Flavour::Postgres, "fsync", json!(false)),
            "fsync: unknown parameter (not on the PostgreSQL allow-list)"
        );
        let long = "x".repeat(500);
        let shown = message(Flavour::Postgres, &long, json!(1));
        assert!(shown.len() < 200, "{shown}");
    }

    #[test]
    fn every_problem_is_reported_together_and_nothing_is_partial() {
        let found = problems(
            Flavour::Postgres,
            json!({
                "work_mem": "64MB",
                "max_connections": 5,
                "shared_bufers": "1GB",
                "autovacuum": "maybe",
                "checkpoint_timeout": "10s",
                "random_page_cost": 1.1,
            }),
        );
        let text = ParamErrors(found.clone()).to_string();
        assert_eq!(found.len(), 4, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "autovacuum: expected true, false, \"on\" or \"off\", got the string \"maybe\"",
                "checkpoint_timeout: 10 s is below the minimum 30 s (allowed 30 s..1 d)",
                "max_connections: 5 is below the minimum 10 (allowed 10..10000)",
                "shared_bufers: unknown parameter (did you mean shared_buffers?)",
            ]
        );
        assert!(lines.iter().all(|line| !line.ends_with('.')));
    }

    #[test]
    fn null_resets_an_override() {
        let validated = ok(
            Flavour::Postgres,
            json!({"shared_buffers": null, "work_mem": null, "max_wal_size": "2GB"}),
        );
        assert_eq!(validated.reset, ["shared_buffers", "work_mem"]);
        assert_eq!(validated.restart_required, ["shared_buffers"]);
        assert_eq!(validated.values.len(), 1);
        assert_eq!(
            message(Flavour::Postgres, "shared_bufers", Json::Null),
            "shared_bufers: unknown parameter (did you mean shared_buffers?)"
        );
    }

    #[test]
    fn flavour_restrictions() {
        assert_eq!(
            message(Flavour::Mysql8, "expire_logs_days", json!(7)),
            "expire_logs_days: not available on MySQL 8 (only on MariaDB)"
        );
        assert_eq!(
            message(Flavour::Mariadb, "innodb_redo_log_capacity", json!("1G")),
            "innodb_redo_log_capacity: not available on MariaDB (only on MySQL 8)"
        );
        assert_eq!(
            one(Flavour::Mariadb, "expire_logs_days", json!(7)),
            Value::Int(7)
        );
        assert!(lookup(Flavour::Mysql8, "expire_logs_days").is_none());
        assert!(lookup(Flavour::Mysql8, "innodb_redo_log_capacity").is_some());
        assert!(allow_list(Flavour::Mariadb).all(|spec| spec.name != "innodb_redo_log_capacity"));
        assert!(allow_list(Flavour::Postgres).all(|spec| spec.available_on(Flavour::Postgres)));
        assert!(lookup(Flavour::Postgres, "wait_timeout").is_none());
        assert_eq!(
            one(Flavour::Mariadb, "binlog_expire_logs_seconds", json!("7d")),
            Value::DurationMs(7 * DAY_MS)
        );
    }

    #[test]
    fn conflicting_entries() {
        assert_eq!(
            problems(
                Flavour::Postgres,
                json!({"min_wal_size": "2GB", "max_wal_size": "1GB"})
            )[0]
            .to_string(),
            "min_wal_size: 2 GiB is above max_wal_size 1 GiB"
        );
        assert_eq!(
            problems(
                Flavour::Mariadb,
                json!({"expire_logs_days": 7, "binlog_expire_logs_seconds": 604_800})
            )[0]
            .to_string(),
            "expire_logs_days: set either expire_logs_days or binlog_expire_logs_seconds, not \
             both (the server treats them as one setting)"
        );
    }
}
