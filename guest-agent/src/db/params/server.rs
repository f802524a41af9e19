//! Values as a live server reports them (PostgreSQL `SHOW` and `pg_settings`, MySQL
//! `@@name`) and as it writes them in its config files, read into a [`Value`] that
//! compares equal to a validated one.

use super::catalog::lookup;
use super::spec::{Engine, Flavour, Kind, ParamSpec};
use super::units::{
    parse_duration, parse_mysql_size, parse_pg_size, parse_real, pg_memory_unit, time_unit_ms, Bare,
};
use super::validate::canonical_word;
use super::{quote, Value};

/// Reads a value as PostgreSQL writes it in `postgresql.conf` or `SHOW` output: a bare
/// number counts the parameter's base unit.
pub(super) fn pg_server_value(spec: &ParamSpec, raw: &str) -> Result<Value, String> {
    match spec.kind {
        Kind::Int { .. } => parse_server_int(raw)
            .map(Value::Int)
            .ok_or_else(|| format!("{} is not a whole number", quote(raw))),
        Kind::Bytes { step, .. } => parse_pg_size(raw, Bare::Times(step)).map(Value::Bytes),
        Kind::Duration {
            unit,
            minus_one_disables,
            ..
        } => parse_duration(raw, unit, minus_one_disables),
        Kind::Bool => parse_bool_text(raw)
            .map(Value::Bool)
            .ok_or_else(|| format!("{} is not on or off", quote(raw))),
        Kind::Enum(allowed) => Ok(Value::Text(
            canonical_word(allowed, raw).map_or_else(|| raw.trim().to_string(), str::to_string),
        )),
        Kind::Real { .. } => parse_real(raw).map(Value::Real),
    }
}

/// A whole number as a server reports it; MariaDB 10.6 and later report some counts as
/// doubles (`@@expire_logs_days` is `7.000000`).
fn parse_server_int(raw: &str) -> Option<i64> {
    let raw = raw.trim();
    let (whole, fraction) = raw.split_once('.').unwrap_or((raw, ""));
    if fraction.bytes().all(|b| b == b'0') {
        whole.parse().ok()
    } else {
        None
    }
}

/// Reads a value as MySQL writes it in an option file or reports it from `@@name` or
/// `SHOW VARIABLES`: sizes in bytes (or with a K/M/G/T suffix), durations in the base
/// unit with an optional fraction (`10.000000`).
pub(super) fn mysql_server_value(spec: &ParamSpec, raw: &str) -> Result<Value, String> {
    match spec.kind {
        Kind::Bytes { .. } => parse_mysql_size(raw).map(Value::Bytes),
        _ => pg_server_value(spec, raw),
    }
}

/// Reads what a live server reports for `name` (PostgreSQL `SHOW name`, e.g. `128MB`;
/// MySQL `SELECT @@name`, e.g. `134217728`) into a [`Value`] comparable with a validated
/// one. `None` when `flavour` has no such allowed parameter or the text is unreadable.
pub fn sql_show_value(flavour: Flavour, name: &str, raw: &str) -> Option<Value> {
    let spec = lookup(flavour, name)?;
    match flavour.engine() {
        Engine::Postgres => pg_server_value(spec, raw),
        Engine::Mysql => mysql_server_value(spec, raw),
    }
    .ok()
}

/// Reads a row of `SELECT name, setting, unit FROM pg_settings` (e.g. `shared_buffers`,
/// `16384`, `8kB`) into a [`Value`]. `None` when `name` is not an allowed PostgreSQL
/// parameter or the row is unreadable.
pub fn pg_settings_to_value(name: &str, setting: &str, unit: Option<&str>) -> Option<Value> {
    let spec = lookup(Flavour::Postgres, name)?;
    let setting = setting.trim();
    match spec.kind {
        Kind::Bytes { step, .. } => {
            let multiplier = match unit {
                Some(unit) => pg_settings_unit(unit, pg_memory_unit)?,
                None => step,
            };
            setting
                .parse::<u64>()
                .ok()?
                .checked_mul(multiplier)
                .map(Value::Bytes)
        }
        Kind::Duration {
            unit: base,
            minus_one_disables,
            ..
        } => {
            if minus_one_disables && setting == "-1" {
                return Some(Value::Disabled);
            }
            let multiplier = match unit {
                Some(unit) => pg_settings_unit(unit, time_unit_ms)?,
                None => base.ms(),
            };
            setting
                .parse::<u64>()
                .ok()?
                .checked_mul(multiplier)
                .map(Value::DurationMs)
        }
        _ => pg_server_value(spec, setting).ok(),
    }
}

/// A `pg_settings.unit` such as `8kB`, `kB`, `MB` or `s`: an optional count and a unit.
fn pg_settings_unit(unit: &str, symbol: fn(&str) -> Option<u64>) -> Option<u64> {
    let unit = unit.trim();
    let end = unit
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(unit.len());
    let (count, symbol_text) = unit.split_at(end);
    let count = if count.is_empty() {
        1
    } else {
        count.parse::<u64>().ok()?
    };
    count.checked_mul(symbol(symbol_text.trim())?)
}

fn parse_bool_text(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::params::test_support::one;
    use crate::db::params::units::{GIB, MIB};
    use serde_json::json;

    #[test]
    fn pg_settings_rows() {
        assert_eq!(
            pg_settings_to_value("shared_buffers", "16384", Some("8kB")),
            Some(Value::Bytes(128 * MIB))
        );
        assert_eq!(
            pg_settings_to_value("work_mem", "4096", Some("kB")),
            Some(Value::Bytes(4 * MIB))
        );
        assert_eq!(
            pg_settings_to_value("checkpoint_timeout", "300", Some("s")),
            Some(Value::DurationMs(300_000))
        );
        assert_eq!(
            pg_settings_to_value("max_wal_size", "1024", Some("MB")),
            Some(Value::Bytes(GIB))
        );
        assert_eq!(
            pg_settings_to_value("log_min_duration_statement", "-1", Some("ms")),
            Some(Value::Disabled)
        );
        assert_eq!(
            pg_settings_to_value("statement_timeout", "0", Some("ms")),
            Some(Value::DurationMs(0))
        );
        assert_eq!(
            pg_settings_to_value("random_page_cost", "4", None),
            Some(Value::Real(4.0))
        );
        assert_eq!(
            pg_settings_to_value("autovacuum", "on", None),
            Some(Value::Bool(true))
        );
        assert_eq!(
            pg_settings_to_value("max_connections", "100", None),
            Some(Value::Int(100))
        );
        assert_eq!(
            pg_settings_to_value("log_statement", "none", None),
            Some(Value::Text("none".into()))
        );
        assert_eq!(pg_settings_to_value("fsync", "on", None), None);
        assert_eq!(
            pg_settings_to_value("shared_buffers", "lots", Some("8kB")),
            None
        );
        assert_eq!(
            pg_settings_to_value("shared_buffers", "16384", Some("8 parsecs")),
            None
        );
        // The live form compares equal to the validated request.
        assert_eq!(
            pg_settings_to_value("shared_buffers", "131072", Some("8kB")),
            Some(one(Flavour::Postgres, "shared_buffers", json!("1GB")))
        );
    }

    #[test]
    fn show_values_compare_with_requests() {
        let pg = Flavour::Postgres;
        for (name, shown, requested) in [
            ("shared_buffers", "128MB", json!("128MB")),
            ("work_mem", "4MB", json!(4 * MIB)),
            ("effective_cache_size", "4GB", json!("4GB")),
            ("checkpoint_timeout", "5min", json!(300)),
            ("statement_timeout", "0", json!(0)),
            ("log_min_duration_statement", "-1", json!(-1)),
            ("log_min_duration_statement", "250ms", json!(250)),
            ("autovacuum", "on", json!(true)),
            ("log_statement", "none", json!("none")),
            ("random_page_cost", "1.1", json!(1.1)),
            ("max_connections", "100", json!(100)),
        ] {
            assert_eq!(
                sql_show_value(pg, name, shown),
                Some(one(pg, name, requested)),
                "{name} {shown}"
            );
        }
        let my = Flavour::Mariadb;
        for (name, shown, requested) in [
            ("innodb_buffer_pool_size", "134217728", json!("128M")),
            ("long_query_time", "10.000000", json!(10)),
            ("long_query_time", "0.500000", json!(0.5)),
            ("slow_query_log", "0", json!(false)),
            ("slow_query_log", "ON", json!(true)),
            ("wait_timeout", "28800", json!("8h")),
            ("innodb_flush_log_at_trx_commit", "1", json!(1)),
            ("max_connections", "151", json!(151)),
        ] {
            assert_eq!(
                sql_show_value(my, name, shown),
                Some(one(my, name, requested)),
                "{name} {shown}"
            );
        }
        assert_eq!(
            sql_show_value(my, "expire_logs_days", "7.000000"),
            Some(Value::Int(7))
        );
        assert_eq!(sql_show_value(my, "expire_logs_days", "0.500000"), None);
        assert_eq!(sql_show_value(my, "shared_buffers", "128MB"), None);
        assert_eq!(sql_show_value(pg, "shared_buffers", "many"), None);
        assert_eq!(
            sql_show_value(Flavour::Mysql8, "expire_logs_days", "0"),
            None
        );
    }
}
