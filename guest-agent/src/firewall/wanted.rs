//! The openings a role needs: ssh and https on the management interface, ssh and the
//! database's ports on the application interface, plus `firewall.extra_tcp_ports`.

use super::Firewall;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The database engine as far as the firewall cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbEngine {
    Postgres,
    Mysql,
}

/// What runs on this VM, which decides the open ports. `None` as engine (a VM being
/// prepared, a monitor) opens only ssh and https. The MySQL flags are ignored for
/// PostgreSQL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirewallRole {
    pub engine: Option<DbEngine>,
    /// MySQL group replication: opens 33061.
    pub mysql_group_replication: bool,
    /// MySQL Router: opens 6446–6449.
    pub mysql_router: bool,
}

/// One TCP port or an inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn one(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Which of the VM's two networks a rule is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    Management,
    Application,
}

/// One opening: TCP `ports` accepted on `interface`, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WantedRule {
    pub network: Network,
    pub interface: String,
    pub ports: PortRange,
    pub why: String,
}

/// The openings the agent wants for a role, for status and display. Everything else
/// arriving on any interface is dropped (loopback, replies and, with `allow_icmp`, the
/// essential ICMP messages excepted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WantedRules {
    pub table: String,
    pub allow_icmp: bool,
    pub rules: Vec<WantedRule>,
}

impl fmt::Display for WantedRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.rules {
            let ports = format!("tcp/{}", r.ports);
            writeln!(f, "{:<15} {:<14} {}", r.interface, ports, r.why)?;
        }
        Ok(())
    }
}

impl Firewall {
    /// The openings `role` needs, management interface first, then application ports in
    /// ascending order.
    pub fn wanted(&self, role: &FirewallRole) -> WantedRules {
        let c = &self.config;
        let mut rules = Vec::new();
        let mut open = |network: Network, ports: PortRange, why: &str| {
            let interface = match network {
                Network::Management => c.management_interface.clone(),
                Network::Application => c.application_interface.clone(),
            };
            rules.push(WantedRule {
                network,
                interface,
                ports,
                why: why.into(),
            });
        };
        open(Network::Management, PortRange::one(22), "ssh");
        open(
            Network::Management,
            PortRange::one(443),
            "https (management)",
        );
        open(Network::Application, PortRange::one(22), "ssh");
        match role.engine {
            Some(DbEngine::Postgres) => {
                open(Network::Application, PortRange::one(5432), "PostgreSQL");
            }
            Some(DbEngine::Mysql) => {
                open(Network::Application, PortRange::one(3306), "MySQL");
                if role.mysql_router {
                    open(
                        Network::Application,
                        PortRange {
                            first: 6446,
                            last: 6449,
                        },
                        "MySQL Router (6446 read-write, 6447 read-only, 6448-6449 X protocol)",
                    );
                }
                open(
                    Network::Application,
                    PortRange::one(33060),
                    "MySQL X protocol",
                );
                if role.mysql_group_replication {
                    open(
                        Network::Application,
                        PortRange::one(33061),
                        "MySQL group replication",
                    );
                }
            }
            None => {}
        }
        let mut extra = c.extra_tcp_ports.clone();
        extra.sort_unstable();
        extra.dedup();
        for port in extra {
            let already = rules
                .iter()
                .any(|r| r.network == Network::Application && r.ports.contains(port));
            if !already {
                rules.push(WantedRule {
                    network: Network::Application,
                    interface: c.application_interface.clone(),
                    ports: PortRange::one(port),
                    why: "firewall.extra_tcp_ports".into(),
                });
            }
        }
        // The two management rules come first and stay in seed order; the application
        // rules are listed by port.
        rules[2..].sort_by_key(|r| (r.ports, r.why.clone()));
        WantedRules {
            table: c.table.clone(),
            allow_icmp: c.allow_icmp,
            rules,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::test_support::{fw, MYSQL, PG};
    use super::super::FirewallConfig;
    use super::*;

    fn ports(w: &WantedRules, network: Network) -> Vec<String> {
        w.rules
            .iter()
            .filter(|r| r.network == network)
            .map(|r| r.ports.to_string())
            .collect()
    }

    #[test]
    fn each_role_opens_exactly_its_ports() {
        let f = fw(FirewallConfig::default());
        let cases: &[(FirewallRole, &[&str])] = &[
            (FirewallRole::default(), &["22"]),
            (PG, &["22", "5432"]),
            (MYSQL, &["22", "3306", "33060"]),
            (
                FirewallRole {
                    mysql_group_replication: true,
                    ..MYSQL
                },
                &["22", "3306", "33060", "33061"],
            ),
            (
                FirewallRole {
                    mysql_router: true,
                    ..MYSQL
                },
                &["22", "3306", "6446-6449", "33060"],
            ),
            (
                FirewallRole {
                    mysql_router: true,
                    mysql_group_replication: true,
                    ..MYSQL
                },
                &["22", "3306", "6446-6449", "33060", "33061"],
            ),
            // MySQL flags mean nothing to PostgreSQL.
            (
                FirewallRole {
                    mysql_router: true,
                    mysql_group_replication: true,
                    ..PG
                },
                &["22", "5432"],
            ),
        ];
        for (role, app) in cases {
            let w = f.wanted(role);
            assert_eq!(ports(&w, Network::Management), ["22", "443"], "{role:?}");
            assert_eq!(ports(&w, Network::Application), *app, "{role:?}");
            assert!(w.rules.iter().all(|r| r.interface
                == if r.network == Network::Management {
                    "eth0"
                } else {
                    "eth1"
                }));
            let text = f.render(role);
            let dports = text.matches("tcp dport").count();
            assert_eq!(dports, 2 + app.len(), "{text}");
            for p in *app {
                assert!(
                    text.contains(&format!("tcp dport {p} accept")),
                    "{p} missing:\n{text}"
                );
            }
        }
    }

    #[test]
    fn extra_ports_are_added_once_and_sorted() {
        let f = fw(FirewallConfig {
            extra_tcp_ports: vec![9187, 22, 6447, 8080, 9187],
            ..Default::default()
        });
        let role = FirewallRole {
            mysql_router: true,
            ..MYSQL
        };
        let w = f.wanted(&role);
        assert_eq!(
            ports(&w, Network::Application),
            ["22", "3306", "6446-6449", "8080", "9187", "33060"]
        );
        let shown = w.to_string();
        assert!(
            shown
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["eth1", "tcp/9187", "firewall.extra_tcp_ports"]),
            "{shown}"
        );
        assert!(
            shown.starts_with("eth0            tcp/22         ssh\n"),
            "{shown}"
        );
    }

    #[test]
    fn role_parses_from_toml() {
        let role: FirewallRole = toml::from_str("engine = \"mysql\"\nmysql_router = true").unwrap();
        assert_eq!(role.engine, Some(DbEngine::Mysql));
    }
}
