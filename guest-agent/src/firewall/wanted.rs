//! The openings a role needs: ssh and https on the management interface, plus
//! `firewall.management_tcp_ports` there; ssh and the role's services on the application
//! interface, plus `firewall.extra_tcp_ports`. Which
//! engine listens where is not known here: [`FirewallRole::of_database`] (in `role`)
//! turns a database's spec into the services.

use super::Firewall;
use serde::Serialize;
use std::fmt;

/// One thing the VM serves on its application network: TCP `ports` and what listens there
/// (the rule's comment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub ports: PortRange,
    pub why: String,
}

impl Service {
    pub fn new(ports: PortRange, why: impl Into<String>) -> Self {
        Self {
            ports,
            why: why.into(),
        }
    }
}

/// What runs on this VM, which decides the open ports: the services its database offers
/// on the application network. Empty (no database yet, a monitor node) opens only ssh and
/// https.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FirewallRole {
    pub services: Vec<Service>,
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

    /// Whether every port of `other` is in this range.
    pub fn covers(&self, other: PortRange) -> bool {
        self.contains(other.first) && self.contains(other.last)
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
        // Management ports from the config, ascending, each once, and none that ssh or
        // https already opens; they stay on the management interface only.
        let mut management = c.management_tcp_ports.clone();
        management.sort_unstable();
        management.dedup();
        for p in management {
            if p != 22 && p != 443 {
                open(
                    Network::Management,
                    PortRange::one(p),
                    "firewall.management_tcp_ports",
                );
            }
        }
        let first_application = rules.len();
        rules.push(WantedRule {
            network: Network::Application,
            interface: c.application_interface.clone(),
            ports: PortRange::one(22),
            why: "ssh".into(),
        });
        // A service, then an extra port, is left out when an earlier application rule
        // already opens all of it.
        let wanted = role.services.iter().map(|s| (s.ports, s.why.as_str()));
        let mut extra = c.extra_tcp_ports.clone();
        extra.sort_unstable();
        extra.dedup();
        let extra = extra
            .into_iter()
            .map(|p| (PortRange::one(p), "firewall.extra_tcp_ports"));
        for (ports, why) in wanted.chain(extra) {
            let already = rules
                .iter()
                .any(|r| r.network == Network::Application && r.ports.covers(ports));
            if !already {
                rules.push(WantedRule {
                    network: Network::Application,
                    interface: c.application_interface.clone(),
                    ports,
                    why: why.into(),
                });
            }
        }
        // The management rules come first and stay in the order above; the application
        // rules are listed by port.
        rules[first_application..].sort_by_key(|r| (r.ports, r.why.clone()));
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
    use super::super::test_support::{fw, mysql, pg};
    use super::super::FirewallConfig;
    use super::*;

    fn ports(w: &WantedRules, network: Network) -> Vec<String> {
        w.rules
            .iter()
            .filter(|r| r.network == network)
            .map(|r| r.ports.to_string())
            .collect()
    }

    fn services(list: &[(u16, u16, &str)]) -> FirewallRole {
        FirewallRole {
            services: list
                .iter()
                .map(|&(first, last, why)| Service::new(PortRange { first, last }, why))
                .collect(),
        }
    }

    /// Which engine needs which ports is `role`'s business (tested there); here: every
    /// service of a role, and nothing else, is opened on the application interface.
    #[test]
    fn each_role_opens_exactly_its_ports() {
        let f = fw(FirewallConfig::default());
        let cases: &[(FirewallRole, &[&str])] = &[
            (FirewallRole::default(), &["22"]),
            (pg(), &["22", "5432"]),
            (mysql(), &["22", "3306", "33060"]),
            (services(&[(25432, 25432, "PostgreSQL")]), &["22", "25432"]),
            (
                services(&[(33061, 33061, "b"), (7000, 7003, "a"), (3307, 3307, "c")]),
                &["22", "3307", "7000-7003", "33061"],
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
        let w = f.wanted(&services(&[(25432, 25432, "PostgreSQL")]));
        let db = w.rules.iter().find(|r| r.ports.first == 25432).unwrap();
        assert_eq!(db.why, "PostgreSQL");
    }

    #[test]
    fn extra_ports_and_overlapping_services_are_added_once_and_sorted() {
        let f = fw(FirewallConfig {
            extra_tcp_ports: vec![9187, 22, 6447, 8080, 9187],
            ..Default::default()
        });
        let role = services(&[
            (3306, 3306, "MySQL"),
            (6446, 6449, "MySQL Router"),
            (33060, 33060, "MySQL X protocol"),
            (6448, 6448, "inside the router's range"),
            (3306, 3306, "MySQL again"),
        ]);
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
        assert!(
            !shown.contains("again") && !shown.contains("inside"),
            "{shown}"
        );
    }

    #[test]
    fn management_ports_open_on_the_management_interface_only() {
        let f = fw(FirewallConfig {
            management_tcp_ports: vec![9274, 443, 9100, 9274, 22],
            ..Default::default()
        });
        let w = f.wanted(&pg());
        assert_eq!(
            ports(&w, Network::Management),
            ["22", "443", "9100", "9274"]
        );
        assert_eq!(ports(&w, Network::Application), ["22", "5432"]);
        let telegraf = w.rules.iter().find(|r| r.ports.first == 9274).unwrap();
        assert_eq!(
            (telegraf.interface.as_str(), telegraf.why.as_str()),
            ("eth0", "firewall.management_tcp_ports")
        );
        let text = f.render(&pg());
        let management = text
            .split("chain management")
            .nth(1)
            .and_then(|rest| rest.split("chain ").next())
            .unwrap();
        assert!(
            management.contains("tcp dport 9274 accept"),
            "{management}\n{text}"
        );
        assert_eq!(text.matches("tcp dport 9274").count(), 1, "{text}");
        // Without the key nothing more is open than before.
        let plain = fw(FirewallConfig::default()).wanted(&pg());
        assert_eq!(ports(&plain, Network::Management), ["22", "443"]);
    }
}
