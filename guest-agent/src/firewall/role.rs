//! The role a database gives the VM: the TCP ports its server listens on, read from the
//! spec it was created with. This is the one place that maps a database to ports; the rest
//! of the firewall opens what a [`FirewallRole`] lists and knows no engine.
//!
//! No operation moves the port of an existing database: `db.create`, `db.preconfigure` and
//! `db.configure` with another spec are refused, `db.set_parameters` has no port among its
//! allowed parameters (a test below keeps it that way), and `db.upgrade` changes only the
//! image. Apply and status derive the role again from the stored spec every time, so the
//! firewall follows the spec the server's configuration is written from.

use super::wanted::{FirewallRole, PortRange, Service};
use crate::db::params::Flavour;
use crate::db::DatabaseSpec;

/// MySQL 8's X protocol (`mysqlx_port`): the X plugin is on by default and the agent's
/// `my.cnf` leaves it on its default port. MariaDB has no X plugin.
pub const MYSQL_X_PORT: u16 = 33060;
/// MySQL group replication's port (`group_replication_local_address`, default 33061).
pub const MYSQL_GROUP_REPLICATION_PORT: u16 = 33061;
/// MySQL Router: 6446 read-write, 6447 read-only, 6448-6449 the same over the X protocol.
pub const MYSQL_ROUTER_PORTS: PortRange = PortRange {
    first: 6446,
    last: 6449,
};

impl FirewallRole {
    /// The services of the database `spec` describes (none without a database): its
    /// client port as the spec says (5432 / 3306 when absent), and for MySQL 8 the X
    /// protocol, plus group replication and MySQL Router when the spec turns them on
    /// (the spec accepts those for MySQL 8 only).
    pub fn of_database(spec: Option<&DatabaseSpec>) -> Self {
        let Some(spec) = spec else {
            return Self::default();
        };
        let client = |why: &str| Service::new(PortRange::one(spec.port()), why);
        let services = match spec.engine {
            Flavour::Postgres => vec![client("PostgreSQL")],
            Flavour::Mariadb => vec![client("MariaDB")],
            Flavour::Mysql8 => {
                let mut s = vec![
                    client("MySQL"),
                    Service::new(PortRange::one(MYSQL_X_PORT), "MySQL X protocol"),
                ];
                if spec.mysql.group_replication {
                    s.push(Service::new(
                        PortRange::one(MYSQL_GROUP_REPLICATION_PORT),
                        "MySQL group replication",
                    ));
                }
                if spec.mysql.router {
                    s.push(Service::new(
                        MYSQL_ROUTER_PORTS,
                        "MySQL Router (6446 read-write, 6447 read-only, 6448-6449 X protocol)",
                    ));
                }
                s
            }
        };
        Self { services }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::test_support::fw;
    use super::super::{FirewallConfig, Network};
    use super::*;
    use crate::db::{engine, params};
    use serde_json::json;

    fn spec(v: serde_json::Value) -> DatabaseSpec {
        let s: DatabaseSpec = serde_json::from_value(v).unwrap();
        s.validate().unwrap();
        s
    }

    fn application_ports(role: &FirewallRole) -> Vec<String> {
        fw(FirewallConfig::default())
            .wanted(role)
            .rules
            .iter()
            .filter(|r| r.network == Network::Application)
            .map(|r| r.ports.to_string())
            .collect()
    }

    #[test]
    fn each_database_opens_its_spec_port_and_only_the_extras_it_uses() {
        let cases: &[(serde_json::Value, &[&str])] = &[
            (
                json!({"engine": "postgres", "database": "a"}),
                &["22", "5432"],
            ),
            // Issue 11: the spec's port, not the engine's default.
            (
                json!({"engine": "postgres", "database": "a", "port": 25432}),
                &["22", "25432"],
            ),
            // MariaDB has no X plugin: no 33060.
            (
                json!({"engine": "mariadb", "database": "a"}),
                &["22", "3306"],
            ),
            (
                json!({"engine": "mariadb", "database": "a", "port": 23306}),
                &["22", "23306"],
            ),
            (
                json!({"engine": "mysql8", "database": "a"}),
                &["22", "3306", "33060"],
            ),
            (
                json!({"engine": "mysql8", "database": "a", "port": 13306,
                       "mysql": {"group_replication": true}}),
                &["22", "13306", "33060", "33061"],
            ),
            (
                json!({"engine": "mysql8", "database": "a", "mysql": {"router": true}}),
                &["22", "3306", "6446-6449", "33060"],
            ),
            (
                json!({"engine": "mysql8", "database": "a", "port": 3307,
                       "mysql": {"router": true, "group_replication": true}}),
                &["22", "3307", "6446-6449", "33060", "33061"],
            ),
        ];
        for (s, want) in cases {
            let role = FirewallRole::of_database(Some(&spec(s.clone())));
            assert_eq!(application_ports(&role), *want, "{s}");
        }
        assert_eq!(application_ports(&FirewallRole::of_database(None)), ["22"]);
    }

    /// The port the role opens is the one the agent writes into the server's
    /// configuration, and MySQL 8's X plugin is left on the port the role opens for it.
    #[test]
    fn the_role_opens_the_port_the_server_is_configured_with() {
        let paths = engine::Paths::new(std::path::Path::new("/var/lib/dbvm/db"));
        for f in Flavour::ALL {
            let s = spec(json!({"engine": f, "database": "a", "port": 24680}));
            let config = engine::main_config(&s, &paths, None, None);
            assert!(config.contains("\nport = 24680\n"), "{f}: {config}");
            let role = FirewallRole::of_database(Some(&s));
            assert_eq!(role.services[0].ports, PortRange::one(24680), "{f}");
            assert!(
                !config.contains("mysqlx"),
                "{f}: the X port moved: {config}"
            );
            let x_open = role.services.iter().any(|s| s.ports.contains(MYSQL_X_PORT));
            assert_eq!(x_open, f == Flavour::Mysql8, "{f}");
        }
    }

    /// `db.set_parameters` is the only day-2 operation that changes the server's
    /// configuration; if it could move a listening port, the firewall would have to follow
    /// it there. It cannot: none of the allowed parameters is about where the server
    /// listens.
    #[test]
    fn no_allowed_parameter_moves_a_listening_port() {
        for f in Flavour::ALL {
            for p in params::allow_list(f) {
                let name = p.name.replace('-', "_");
                for word in [
                    "port",
                    "listen",
                    "bind",
                    "mysqlx",
                    "group_replication",
                    "network",
                ] {
                    assert!(
                        !name.contains(word),
                        "{f} allows {}: the firewall must follow it (see firewall/role.rs)",
                        p.name
                    );
                }
            }
        }
    }
}
