//! The normalised value of a parameter (sizes in bytes, durations in milliseconds) and
//! how people read it (`128 MiB`, `5 min`).

use std::fmt;

use super::units::{DAY_MS, GIB, HOUR_MS, KIB, MIB, MINUTE_MS, SECOND_MS, TIB};

/// A normalised parameter value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Bytes(u64),
    DurationMs(u64),
    Bool(bool),
    Text(String),
    Real(f64),
    /// `-1` for a duration whose `-1` switches the feature off
    /// (`log_min_duration_statement`).
    Disabled,
}

impl fmt::Display for Value {
    /// Human units: `128 MiB`, `5 s`, `on`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Bytes(b) => f.write_str(&human_bytes(*b)),
            Value::DurationMs(ms) => f.write_str(&human_duration(*ms)),
            Value::Bool(b) => f.write_str(if *b { "on" } else { "off" }),
            Value::Text(s) => f.write_str(s),
            Value::Real(x) => write!(f, "{x}"),
            Value::Disabled => f.write_str("disabled (-1)"),
        }
    }
}

pub(super) fn human_bytes(b: u64) -> String {
    for (unit, symbol) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if b != 0 && b.is_multiple_of(unit) {
            return format!("{} {symbol}", b / unit);
        }
    }
    format!("{b} B")
}

fn human_duration(ms: u64) -> String {
    for (unit, symbol) in [
        (DAY_MS, "d"),
        (HOUR_MS, "h"),
        (MINUTE_MS, "min"),
        (SECOND_MS, "s"),
    ] {
        if ms != 0 && ms.is_multiple_of(unit) {
            return format!("{} {symbol}", ms / unit);
        }
    }
    format!("{ms} ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_display_in_human_units() {
        assert_eq!(Value::Bytes(128 * MIB).to_string(), "128 MiB");
        assert_eq!(Value::Bytes(1536 * KIB).to_string(), "1536 KiB");
        assert_eq!(Value::Bytes(GIB).to_string(), "1 GiB");
        assert_eq!(Value::Bytes(1000).to_string(), "1000 B");
        assert_eq!(Value::Bytes(0).to_string(), "0 B");
        assert_eq!(Value::DurationMs(5000).to_string(), "5 s");
        assert_eq!(Value::DurationMs(300_000).to_string(), "5 min");
        assert_eq!(Value::DurationMs(250).to_string(), "250 ms");
        assert_eq!(Value::DurationMs(DAY_MS).to_string(), "1 d");
        assert_eq!(Value::Bool(true).to_string(), "on");
        assert_eq!(Value::Real(1.1).to_string(), "1.1");
        assert_eq!(Value::Int(-3).to_string(), "-3");
        assert_eq!(Value::Text("ddl".into()).to_string(), "ddl");
        assert_eq!(Value::Disabled.to_string(), "disabled (-1)");
    }
}
