//! The VM's firewall: the agent owns exactly one nftables table (`table inet dbvm`),
//! renders it from the VM's role (the ports its database listens on, read from the
//! database's spec), replaces it atomically, and checks the live table against what it
//! wants.
//!
//! Invariants:
//! - **Only the agent's table is touched.** Every command names `table inet <table>`;
//!   other tables (the image's base file, Docker's iptables-nft tables) are never read
//!   or written.
//! - **Replacement is atomic.** The table goes to the kernel as one `nft -f -` batch that
//!   creates, deletes and re-creates it, so it works whether or not the table exists and
//!   a batch the kernel rejects changes nothing. A dry run (`nft -c`) goes first.
//! - **Comparison is structural, not textual.** `nft` reorders set elements, drops
//!   comments from its JSON and prints `ct state` as a list; the live table
//!   (`nft -j list table`) and the wanted one are both reduced to canonical strings per
//!   chain and per rule before they are compared.
//!
//! One file per responsibility: `config` (the `[firewall]` section and its checks),
//! `role` (a database's spec → the ports it listens on: the only file that knows an
//! engine), `wanted` (the openings a role needs), `ruleset` (those openings as an nftables model,
//! rendered to the `nft -f` batch), `live` (the live table read with `nft -j`, both sides
//! normalised and compared), `apply` (apply, status and remove, with their reports) and
//! `nft` (running `nft` with a timeout, inside `firewall.netns` when set); `bundle` is what
//! the firewall adds to a log bundle.

mod apply;
mod bundle;
pub mod capability;
mod config;
mod live;
mod nft;
mod role;
mod ruleset;
mod wanted;

pub use apply::{ApplyOutcome, ApplyReport, FirewallStatus};
pub use config::{interface_name_problem, FirewallConfig};
pub use role::{MYSQL_GROUP_REPLICATION_PORT, MYSQL_ROUTER_PORTS, MYSQL_X_PORT};
pub use wanted::{FirewallRole, Network, PortRange, Service, WantedRule, WantedRules};

use std::fmt;

/// The errors of this module; each names the step that failed and the command.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("config key {key}: {problem}")]
    Config { key: String, problem: String },
    #[error("{program} was not found (running `{command}`): install nftables (Photon OS: `tdnf install -y nftables`, Debian: `apt-get install -y nftables`) or set firewall.nft to its path")]
    NftMissing { program: String, command: String },
    #[error("network namespace {netns:?} does not exist (firewall.netns; running `{command}`): {stderr}")]
    NetnsMissing {
        netns: String,
        command: String,
        stderr: String,
    },
    #[error("cannot run `{command}` while {step}: {source}")]
    Spawn {
        step: Step,
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {timeout_ms} ms while {step}; it was killed")]
    Timeout {
        step: Step,
        command: String,
        timeout_ms: u64,
    },
    #[error(
        "nftables refused the ruleset in the dry run (`{command}`), nothing was changed: {stderr}"
    )]
    DryRunRejected { command: String, stderr: String },
    #[error("nftables rejected the ruleset (`{command}`), the previous ruleset is still in place: {stderr}")]
    Rejected { command: String, stderr: String },
    #[error("`{command}` failed while {step}: {stderr}")]
    Command {
        step: Step,
        command: String,
        stderr: String,
    },
    #[error("cannot understand the JSON printed by `{command}`: {problem}")]
    ParseJson { command: String, problem: String },
}

/// The step of an operation, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    DryRun,
    Apply,
    ReadLive,
    Remove,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::DryRun => "checking the ruleset (dry run)",
            Step::Apply => "applying the ruleset",
            Step::ReadLive => "reading the live table",
            Step::Remove => "removing the table",
        })
    }
}

/// The agent's firewall, built from a validated configuration.
#[derive(Clone, Debug)]
pub struct Firewall {
    config: FirewallConfig,
}

impl Firewall {
    /// Validates the configuration; nothing runs yet.
    pub fn new(config: FirewallConfig) -> Result<Self, FirewallError> {
        config.validate()?;
        Ok(Self { config })
    }

    pub fn config(&self) -> &FirewallConfig {
        &self.config
    }
}

#[cfg(test)]
mod test_support {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::db::DatabaseSpec;

    pub(super) fn fw(config: FirewallConfig) -> Firewall {
        Firewall::new(config).unwrap()
    }

    /// The role of a database on the engine's default port.
    pub(super) fn role(engine: &str) -> FirewallRole {
        let spec: DatabaseSpec =
            serde_json::from_value(serde_json::json!({"engine": engine, "database": "app"}))
                .unwrap();
        FirewallRole::of_database(Some(&spec))
    }

    /// PostgreSQL on 5432.
    pub(super) fn pg() -> FirewallRole {
        role("postgres")
    }

    /// MySQL 8 on 3306 (and its X protocol on 33060).
    pub(super) fn mysql() -> FirewallRole {
        role("mysql8")
    }
}
