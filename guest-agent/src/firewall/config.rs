//! The `[firewall]` section of the agent's configuration and its checks: every key is
//! validated before `nft` ever runs, and the error names the key.

use super::FirewallError;
use serde::{Deserialize, Serialize};

fn invalid(key: &str, problem: impl Into<String>) -> FirewallError {
    FirewallError::Config {
        key: format!("firewall.{key}"),
        problem: problem.into(),
    }
}

/// The `[firewall]` section of the agent's configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FirewallConfig {
    /// Whether the agent manages the firewall at all. When false, `apply` changes nothing.
    pub enabled: bool,
    /// Name of the agent's table in the `inet` family: lower-case letters, digits, `_`.
    pub table: String,
    /// The management network's interface: ssh and https (443).
    pub management_interface: String,
    /// The application network's interface: ssh and the database's ports.
    pub application_interface: String,
    /// The `nft` executable (a name looked up in PATH, or a path).
    pub nft: String,
    /// Tests and the demo: apply inside this named network namespace
    /// (`ip netns exec NAME nft …`) instead of the agent's own.
    pub netns: Option<String>,
    /// More TCP ports to open on the application interface.
    pub extra_tcp_ports: Vec<u16>,
    /// More TCP ports to open on the management interface only (the image's Telegraf
    /// serves the fleet's Prometheus on 9274 there, and nowhere else).
    pub management_tcp_ports: Vec<u16>,
    /// Accept the ICMP and ICMPv6 messages a host needs (ping, unreachable, too big,
    /// neighbour discovery).
    pub allow_icmp: bool,
    /// Limit for each `nft` call; the process is killed when it passes.
    pub command_timeout_ms: u64,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            table: "dbvm".into(),
            management_interface: "eth0".into(),
            application_interface: "eth1".into(),
            nft: "nft".into(),
            netns: None,
            extra_tcp_ports: Vec::new(),
            management_tcp_ports: Vec::new(),
            allow_icmp: true,
            command_timeout_ms: 10_000,
        }
    }
}

/// Linux `IFNAMSIZ` is 16 including the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;

/// What is wrong with `name` as a Linux interface name, if anything (first boot checks
/// the OVF's interface properties with the same rule before writing them here).
pub fn interface_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > MAX_IFNAME_LEN {
        return Some(format!(
            "{name:?} is {} bytes; Linux interface names have at most {MAX_IFNAME_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some(format!("{name:?} is not an interface name"));
    }
    name.chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '"' | '\'' | '/' | '\\' | ':'))
        .map(|c| {
            format!("{name:?} contains {c:?}; interface names have no spaces, quotes, '/' or ':'")
        })
}

fn check_interface(key: &str, name: &str) -> Result<(), FirewallError> {
    match interface_name_problem(name) {
        Some(problem) => Err(invalid(key, problem)),
        None => Ok(()),
    }
}

impl FirewallConfig {
    /// Checks every key; the error names the first bad one.
    pub fn validate(&self) -> Result<(), FirewallError> {
        if self.table.is_empty() || self.table.len() > 64 {
            return Err(invalid("table", "must be 1 to 64 characters"));
        }
        if let Some(c) = self
            .table
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
        {
            return Err(invalid(
                "table",
                format!(
                    "{:?} contains {c:?}; use lower-case letters, digits and '_'",
                    self.table
                ),
            ));
        }
        if !self.table.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(invalid(
                "table",
                format!("{:?} must start with a letter", self.table),
            ));
        }
        check_interface("management_interface", &self.management_interface)?;
        check_interface("application_interface", &self.application_interface)?;
        if self.nft.trim().is_empty() || self.nft.contains('\0') {
            return Err(invalid("nft", "must name the nft executable"));
        }
        if let Some(ns) = &self.netns {
            if ns.is_empty()
                || ns == "."
                || ns == ".."
                || !ns
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(invalid(
                    "netns",
                    format!("{ns:?} is not a namespace name (letters, digits, '-', '_', '.')"),
                ));
            }
        }
        if self.extra_tcp_ports.contains(&0) {
            return Err(invalid("extra_tcp_ports", "0 is not a port"));
        }
        if self.management_tcp_ports.contains(&0) {
            return Err(invalid("management_tcp_ports", "0 is not a port"));
        }
        if self.command_timeout_ms == 0 || self.command_timeout_ms > 300_000 {
            return Err(invalid(
                "command_timeout_ms",
                "must be between 1 and 300000",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::test_support::fw;
    use super::super::Firewall;
    use super::*;

    fn config_error(c: FirewallConfig) -> (String, String) {
        match Firewall::new(c) {
            Err(FirewallError::Config { key, problem }) => (key, problem),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn bad_config_names_the_key() {
        let d = FirewallConfig::default;
        let cases = [
            (
                FirewallConfig {
                    table: "DBVM".into(),
                    ..d()
                },
                "firewall.table",
            ),
            (
                FirewallConfig {
                    table: "db vm".into(),
                    ..d()
                },
                "firewall.table",
            ),
            (
                FirewallConfig {
                    table: "".into(),
                    ..d()
                },
                "firewall.table",
            ),
            (
                FirewallConfig {
                    table: "9x".into(),
                    ..d()
                },
                "firewall.table",
            ),
            (
                FirewallConfig {
                    management_interface: "eth 0".into(),
                    ..d()
                },
                "firewall.management_interface",
            ),
            (
                FirewallConfig {
                    application_interface: "eth1\"".into(),
                    ..d()
                },
                "firewall.application_interface",
            ),
            (
                FirewallConfig {
                    application_interface: "a-very-long-name0".into(),
                    ..d()
                },
                "firewall.application_interface",
            ),
            (
                FirewallConfig {
                    application_interface: "".into(),
                    ..d()
                },
                "firewall.application_interface",
            ),
            (
                FirewallConfig {
                    nft: " ".into(),
                    ..d()
                },
                "firewall.nft",
            ),
            (
                FirewallConfig {
                    netns: Some("a/b".into()),
                    ..d()
                },
                "firewall.netns",
            ),
            (
                FirewallConfig {
                    extra_tcp_ports: vec![0],
                    ..d()
                },
                "firewall.extra_tcp_ports",
            ),
            (
                FirewallConfig {
                    management_tcp_ports: vec![9274, 0],
                    ..d()
                },
                "firewall.management_tcp_ports",
            ),
            (
                FirewallConfig {
                    command_timeout_ms: 0,
                    ..d()
                },
                "firewall.command_timeout_ms",
            ),
        ];
        for (c, key) in cases {
            let (k, problem) = config_error(c.clone());
            assert_eq!(k, key, "{c:?}: {problem}");
        }
        let (_, problem) = config_error(FirewallConfig {
            management_interface: "eth 0".into(),
            ..d()
        });
        assert!(problem.contains("no spaces"), "{problem}");
        let msg = Firewall::new(FirewallConfig {
            table: "Bad".into(),
            ..d()
        })
        .unwrap_err()
        .to_string();
        assert!(msg.starts_with("config key firewall.table:"), "{msg}");
        // 15 bytes is the longest Linux allows.
        fw(FirewallConfig {
            application_interface: "abcdefghijklmno".into(),
            ..d()
        });
    }

    #[test]
    fn config_parses_with_defaults_and_refuses_unknown_keys() {
        let c: FirewallConfig =
            toml::from_str("application_interface = \"ens224\"\nextra_tcp_ports = [9100]").unwrap();
        assert_eq!(c.table, "dbvm");
        assert_eq!(c.application_interface, "ens224");
        assert!(c.enabled && c.allow_icmp && c.netns.is_none());
        assert!(c.management_tcp_ports.is_empty());
        let c: FirewallConfig = toml::from_str("management_tcp_ports = [9274]").unwrap();
        assert_eq!(c.management_tcp_ports, [9274]);
        let err = toml::from_str::<FirewallConfig>("tabel = \"x\"").unwrap_err();
        assert!(err.to_string().contains("tabel"), "{err}");
    }
}
