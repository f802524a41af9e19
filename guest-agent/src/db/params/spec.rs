//! What describes a parameter: the engine and exact server it belongs to, its type and
//! range ([`Kind`]), and whether changing it needs a restart ([`ParamSpec`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::units::SECOND_MS;

/// A database engine. `Mysql` covers MySQL 8 and MariaDB; where they differ, see
/// [`Flavour`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Postgres,
    Mysql,
}

impl Engine {
    /// The name people know the engine by.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "PostgreSQL",
            Engine::Mysql => "MySQL",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The exact server a parameter set is meant for. MySQL 8 (the production target) and
/// MariaDB (what Debian ships, used in tests) share most parameters; some exist on only
/// one of them (see [`ParamSpec::flavours`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    Postgres,
    Mysql8,
    Mariadb,
}

impl Flavour {
    pub const ALL: [Flavour; 3] = [Flavour::Postgres, Flavour::Mysql8, Flavour::Mariadb];

    pub fn engine(self) -> Engine {
        match self {
            Flavour::Postgres => Engine::Postgres,
            Flavour::Mysql8 | Flavour::Mariadb => Engine::Mysql,
        }
    }

    /// The name people know the server by.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Postgres => "PostgreSQL",
            Flavour::Mysql8 => "MySQL 8",
            Flavour::Mariadb => "MariaDB",
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The unit a duration parameter is counted in by the server, and so the unit of a bare
/// number given for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeUnit {
    Millisecond,
    Second,
}

impl TimeUnit {
    pub fn ms(self) -> u64 {
        match self {
            TimeUnit::Millisecond => 1,
            TimeUnit::Second => SECOND_MS,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            TimeUnit::Millisecond => "ms",
            TimeUnit::Second => "s",
        }
    }
}

/// The type of a parameter and the values it may take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// A whole number.
    Int { min: i64, max: i64 },
    /// A size in bytes. The value must be a whole multiple of `step`; for PostgreSQL
    /// `step` is also the parameter's base unit (what `pg_settings.unit` says and what a
    /// bare number in `postgresql.conf` counts), because the server rounds to it.
    Bytes { min: u64, max: u64, step: u64 },
    /// A duration, normalised to milliseconds. Bare numbers count `unit`; the value must
    /// be a whole multiple of `step_ms`. With `minus_one_disables`, `-1` is accepted and
    /// becomes [`Value::Disabled`](super::Value::Disabled).
    Duration {
        min_ms: u64,
        max_ms: u64,
        unit: TimeUnit,
        step_ms: u64,
        minus_one_disables: bool,
    },
    /// `true`/`false`, or the strings `on`/`off`/`true`/`false` (any case).
    Bool,
    /// One of the listed words (matched without regard to case, stored as listed).
    Enum(&'static [&'static str]),
    /// A finite floating-point number.
    Real { min: f64, max: f64 },
}

/// One parameter a control plane may change.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamSpec {
    /// The server's own name for it.
    pub name: &'static str,
    pub kind: Kind,
    /// Whether a change takes effect only after a server restart (PostgreSQL: context
    /// `postmaster`; MySQL: not settable with `SET GLOBAL`). Everything else is applied
    /// with a reload (PostgreSQL) or `SET GLOBAL` (MySQL).
    pub restart: bool,
    /// The server's built-in default, as text for people (it may differ by flavour).
    pub default: &'static str,
    pub help: &'static str,
    /// The flavours that have this parameter.
    pub flavours: &'static [Flavour],
}

impl ParamSpec {
    pub fn available_on(&self, flavour: Flavour) -> bool {
        self.flavours.contains(&flavour)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn engine_and_flavour_names_on_the_wire() {
        assert_eq!(
            serde_json::to_value(Engine::Postgres).unwrap(),
            json!("postgres")
        );
        assert_eq!(serde_json::to_value(Engine::Mysql).unwrap(), json!("mysql"));
        assert_eq!(
            serde_json::to_value(Flavour::Mysql8).unwrap(),
            json!("mysql8")
        );
        assert_eq!(
            serde_json::to_value(Flavour::Mariadb).unwrap(),
            json!("mariadb")
        );
        assert_eq!(Flavour::Mariadb.engine(), Engine::Mysql);
        assert_eq!(Flavour::Postgres.engine(), Engine::Postgres);
        assert_eq!(Flavour::Mysql8.to_string(), "MySQL 8");
    }
}
