//! The VM's firewall: the agent owns exactly one nftables table (`table inet dbvm`),
//! renders it from the VM's database role, replaces it atomically, and checks the live
//! table against what it wants.
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

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

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
            allow_icmp: true,
            command_timeout_ms: 10_000,
        }
    }
}

/// Linux `IFNAMSIZ` is 16 including the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;

fn check_interface(key: &str, name: &str) -> Result<(), FirewallError> {
    if name.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(invalid(
            key,
            format!(
                "{name:?} is {} bytes; Linux interface names have at most {MAX_IFNAME_LEN}",
                name.len()
            ),
        ));
    }
    if name == "." || name == ".." {
        return Err(invalid(key, format!("{name:?} is not an interface name")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '"' | '\'' | '/' | '\\' | ':'))
    {
        return Err(invalid(
            key,
            format!("{name:?} contains {c:?}; interface names have no spaces, quotes, '/' or ':'"),
        ));
    }
    Ok(())
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
        if self.command_timeout_ms == 0 || self.command_timeout_ms > 300_000 {
            return Err(invalid(
                "command_timeout_ms",
                "must be between 1 and 300000",
            ));
        }
        Ok(())
    }
}

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

/// What `apply` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    /// The live table already matched; nothing was sent to the kernel.
    Unchanged,
    /// The table was (re)placed.
    Applied,
    /// `firewall.enabled` is false; nothing was read or changed.
    Disabled,
}

#[derive(Clone, Debug, Serialize)]
pub struct ApplyReport {
    pub outcome: ApplyOutcome,
    /// The differences the apply corrected (empty unless `Applied`).
    pub corrected: Vec<String>,
    /// Differences still seen after applying. Empty unless this `nft` prints the table
    /// in a form the comparison does not know; the kernel accepted the batch either way.
    pub unverified: Vec<String>,
    pub wanted: WantedRules,
    pub elapsed_ms: u64,
}

impl ApplyReport {
    /// Whether the live table was changed.
    pub fn changed(&self) -> bool {
        self.outcome == ApplyOutcome::Applied
    }
}

/// The live table compared with the wanted one.
#[derive(Clone, Debug, Serialize)]
pub struct FirewallStatus {
    /// `inet <table>`.
    pub table: String,
    pub present: bool,
    pub matches: bool,
    /// Why it does not match, in one line; `None` when it matches.
    pub reason: Option<String>,
    /// Wanted chains and rules that are not live (`chain: rule`).
    pub missing: Vec<String>,
    /// Live chains, rules and objects that are not wanted, or rules out of order.
    pub unexpected: Vec<String>,
    /// `nft list table` as the kernel has it (empty when the table is absent).
    pub live_ruleset: String,
    pub wanted: WantedRules,
    pub elapsed_ms: u64,
}

/// The agent's firewall, built from a validated configuration.
#[derive(Clone, Debug)]
pub struct Firewall {
    config: FirewallConfig,
}

// ---------------------------------------------------------------------------------------
// The ruleset model: rendered to nft text and to the JSON shape `nft -j` prints, so the
// same normaliser reads both sides of a comparison.

const ICMP_TYPES: &[&str] = &[
    "echo-request",
    "destination-unreachable",
    "time-exceeded",
    "parameter-problem",
];
const ICMPV6_TYPES: &[&str] = &[
    "echo-request",
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
];

enum Match {
    CtState(&'static [&'static str]),
    IifName(String),
    TcpDport(PortRange),
    IcmpType(&'static [&'static str]),
    Icmpv6Type(&'static [&'static str]),
}

impl Match {
    fn text(&self) -> String {
        match self {
            Match::CtState(s) => format!("ct state {}", s.join(",")),
            Match::IifName(n) => format!("iifname \"{n}\""),
            Match::TcpDport(p) => format!("tcp dport {p}"),
            Match::IcmpType(t) => format!("icmp type {{ {} }}", t.join(", ")),
            Match::Icmpv6Type(t) => format!("icmpv6 type {{ {} }}", t.join(", ")),
        }
    }

    fn json(&self) -> Value {
        let (left, right) = match self {
            Match::CtState(s) => (json!({"ct": {"key": "state"}}), json!(s)),
            Match::IifName(n) => (json!({"meta": {"key": "iifname"}}), json!(n)),
            Match::TcpDport(p) => (
                json!({"payload": {"protocol": "tcp", "field": "dport"}}),
                if p.first == p.last {
                    json!(p.first)
                } else {
                    json!({"range": [p.first, p.last]})
                },
            ),
            Match::IcmpType(t) => (
                json!({"payload": {"protocol": "icmp", "field": "type"}}),
                json!({ "set": t }),
            ),
            Match::Icmpv6Type(t) => (
                json!({"payload": {"protocol": "icmpv6", "field": "type"}}),
                json!({ "set": t }),
            ),
        };
        json!({"match": {"op": "==", "left": left, "right": right}})
    }
}

enum Verdict {
    Accept,
    Drop,
    Jump(&'static str),
}

impl Verdict {
    fn text(&self) -> String {
        match self {
            Verdict::Accept => "accept".into(),
            Verdict::Drop => "drop".into(),
            Verdict::Jump(c) => format!("jump {c}"),
        }
    }

    fn json(&self) -> Value {
        match self {
            Verdict::Accept => json!({"accept": null}),
            Verdict::Drop => json!({"drop": null}),
            Verdict::Jump(c) => json!({"jump": {"target": c}}),
        }
    }
}

struct Rule {
    matches: Vec<Match>,
    verdict: Verdict,
    comment: String,
}

fn rule(matches: Vec<Match>, verdict: Verdict, comment: impl Into<String>) -> Rule {
    Rule {
        matches,
        verdict,
        comment: comment.into(),
    }
}

struct Chain {
    name: &'static str,
    comment: String,
    /// Base chains: (hook, policy).
    hook: Option<(&'static str, &'static str)>,
    rules: Vec<Rule>,
}

struct Model {
    chains: Vec<Chain>,
}

/// Canonical forms of a table: chains, rules per chain in order, and other objects.
#[derive(Debug, Default, PartialEq, Eq)]
struct Normalised {
    chains: Vec<String>,
    rules: Vec<(String, String)>,
    others: Vec<String>,
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

    fn model(&self, wanted: &WantedRules) -> Model {
        let c = &self.config;
        let mut input = vec![
            rule(
                vec![Match::CtState(&["established", "related"])],
                Verdict::Accept,
                "replies to connections already allowed",
            ),
            rule(
                vec![Match::CtState(&["invalid"])],
                Verdict::Drop,
                "packets conntrack cannot place",
            ),
            rule(
                vec![Match::IifName("lo".into())],
                Verdict::Accept,
                "loopback",
            ),
        ];
        if c.allow_icmp {
            input.push(rule(
                vec![Match::IcmpType(ICMP_TYPES)],
                Verdict::Accept,
                "essential ICMP",
            ));
            input.push(rule(
                vec![Match::Icmpv6Type(ICMPV6_TYPES)],
                Verdict::Accept,
                "essential ICMPv6 and neighbour discovery",
            ));
        }
        input.push(rule(
            vec![Match::IifName(c.management_interface.clone())],
            Verdict::Jump("management"),
            "management network",
        ));
        input.push(rule(
            vec![Match::IifName(c.application_interface.clone())],
            Verdict::Jump("application"),
            "application network",
        ));
        let per_network = |network: Network| {
            wanted
                .rules
                .iter()
                .filter(|r| r.network == network)
                .map(|r| rule(vec![Match::TcpDport(r.ports)], Verdict::Accept, &r.why))
                .collect::<Vec<_>>()
        };
        Model {
            chains: vec![
                Chain {
                    name: "input",
                    comment: "what may reach this VM; everything else is dropped".into(),
                    hook: Some(("input", "drop")),
                    rules: input,
                },
                Chain {
                    name: "management",
                    comment: format!(
                        "TCP ports open on the management interface {}",
                        c.management_interface
                    ),
                    hook: None,
                    rules: per_network(Network::Management),
                },
                Chain {
                    name: "application",
                    comment: format!(
                        "TCP ports open on the application interface {}",
                        c.application_interface
                    ),
                    hook: None,
                    rules: per_network(Network::Application),
                },
                Chain {
                    name: "forward",
                    comment: "a database VM routes nothing".into(),
                    hook: Some(("forward", "drop")),
                    rules: Vec::new(),
                },
                Chain {
                    name: "output",
                    comment: "outgoing traffic is not filtered".into(),
                    hook: Some(("output", "accept")),
                    rules: Vec::new(),
                },
            ],
        }
    }

    /// The `nft -f` batch that replaces the agent's table with the one `role` needs.
    /// Deterministic: the same configuration and role give the same text.
    pub fn render(&self, role: &FirewallRole) -> String {
        let t = &self.config.table;
        let model = self.model(&self.wanted(role));
        let mut s = String::new();
        s.push_str(&format!(
            "# dbvm-agent firewall: replaces table inet {t} atomically (generated, edits are overwritten)\n"
        ));
        s.push_str(&format!("table inet {t}\ndelete table inet {t}\n"));
        s.push_str(&format!("table inet {t} {{\n"));
        s.push_str("\tcomment \"managed by dbvm-agent; changes are overwritten\"\n");
        for (i, chain) in model.chains.iter().enumerate() {
            if i > 0 {
                s.push('\n');
            }
            s.push_str(&format!("\tchain {} {{\n", chain.name));
            s.push_str(&format!("\t\tcomment \"{}\"\n", chain.comment));
            if let Some((hook, policy)) = chain.hook {
                s.push_str(&format!(
                    "\t\ttype filter hook {hook} priority filter; policy {policy};\n"
                ));
            }
            for r in &chain.rules {
                let matches: Vec<String> = r.matches.iter().map(Match::text).collect();
                s.push_str(&format!(
                    "\t\t{} {} comment \"{}\"\n",
                    matches.join(" "),
                    r.verdict.text(),
                    r.comment
                ));
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
        s
    }

    fn normalised_wanted(&self, wanted: &WantedRules) -> Normalised {
        let model = self.model(wanted);
        let mut n = Normalised::default();
        for chain in &model.chains {
            n.chains.push(canonical_chain(&chain_json(chain)));
            for r in &chain.rules {
                let mut expr: Vec<Value> = r.matches.iter().map(Match::json).collect();
                expr.push(r.verdict.json());
                n.rules
                    .push((chain.name.to_string(), canonical_rule(chain.name, &expr)));
            }
        }
        n
    }

    /// Replaces the agent's table with the one `role` needs, unless the live table
    /// already matches (then nothing is sent). Dry-runs the batch first; a rejected batch
    /// leaves the previous ruleset in place.
    pub async fn apply(&self, role: &FirewallRole) -> Result<ApplyReport, FirewallError> {
        let started = Instant::now();
        let wanted = self.wanted(role);
        if !self.config.enabled {
            tracing::info!(table = %self.config.table, "firewall.enabled is false: the firewall is left alone");
            return Ok(ApplyReport {
                outcome: ApplyOutcome::Disabled,
                corrected: Vec::new(),
                unverified: Vec::new(),
                wanted,
                elapsed_ms: elapsed_ms(started),
            });
        }
        let want = self.normalised_wanted(&wanted);
        let before = self.read_live_json().await?;
        let corrected = match &before {
            Some(live) => {
                let (missing, unexpected) = compare(&want, live);
                if missing.is_empty() && unexpected.is_empty() {
                    tracing::debug!(table = %self.config.table, "firewall already as wanted");
                    return Ok(ApplyReport {
                        outcome: ApplyOutcome::Unchanged,
                        corrected: Vec::new(),
                        unverified: Vec::new(),
                        wanted,
                        elapsed_ms: elapsed_ms(started),
                    });
                }
                describe_diff(&missing, &unexpected)
            }
            None => vec![format!("table inet {} was absent", self.config.table)],
        };
        let batch = self.render(role);
        let out = self
            .run(Step::DryRun, &["-c", "-f", "-"], Some(&batch))
            .await?;
        if !out.success {
            return Err(FirewallError::DryRunRejected {
                command: out.command,
                stderr: out.stderr,
            });
        }
        let out = self.run(Step::Apply, &["-f", "-"], Some(&batch)).await?;
        if !out.success {
            return Err(FirewallError::Rejected {
                command: out.command,
                stderr: out.stderr,
            });
        }
        let unverified = match self.read_live_json().await? {
            Some(live) => {
                let (missing, unexpected) = compare(&want, &live);
                describe_diff(&missing, &unexpected)
            }
            None => vec![format!(
                "table inet {} is absent right after applying it",
                self.config.table
            )],
        };
        if !unverified.is_empty() {
            tracing::warn!(table = %self.config.table, ?unverified, "the firewall was applied but the live table reads back differently");
        }
        tracing::info!(table = %self.config.table, ?corrected, "firewall applied");
        Ok(ApplyReport {
            outcome: ApplyOutcome::Applied,
            corrected,
            unverified,
            wanted,
            elapsed_ms: elapsed_ms(started),
        })
    }

    /// Reads the live table and compares it with the one `role` needs.
    pub async fn status(&self, role: &FirewallRole) -> Result<FirewallStatus, FirewallError> {
        let started = Instant::now();
        let wanted = self.wanted(role);
        let table = format!("inet {}", self.config.table);
        let Some(live) = self.read_live_json().await? else {
            return Ok(FirewallStatus {
                reason: Some(format!(
                    "table {table} does not exist: the firewall was never applied here or was removed"
                )),
                missing: vec![format!("table {table}")],
                table,
                present: false,
                matches: false,
                unexpected: Vec::new(),
                live_ruleset: String::new(),
                wanted,
                elapsed_ms: elapsed_ms(started),
            });
        };
        let (missing, unexpected) = compare(&self.normalised_wanted(&wanted), &live);
        let list = ["list", "table", "inet", self.config.table.as_str()];
        let out = self.run(Step::ReadLive, &list, None).await?;
        // The table can vanish between the two reads; report what the first read saw.
        let live_ruleset = if out.success {
            out.stdout
        } else {
            String::new()
        };
        let matches = missing.is_empty() && unexpected.is_empty();
        let reason = (!matches).then(|| {
            format!(
                "table {table} differs from the wanted one: {} missing, {} unexpected",
                missing.len(),
                unexpected.len()
            )
        });
        Ok(FirewallStatus {
            table,
            present: true,
            matches,
            reason,
            missing,
            unexpected,
            live_ruleset,
            wanted,
            elapsed_ms: elapsed_ms(started),
        })
    }

    /// Deletes the agent's table (and nothing else). Returns whether it existed.
    pub async fn remove(&self) -> Result<bool, FirewallError> {
        let args = ["delete", "table", "inet", self.config.table.as_str()];
        let out = self.run(Step::Remove, &args, None).await?;
        if out.success {
            tracing::info!(table = %self.config.table, "firewall table removed");
            Ok(true)
        } else if is_enoent(&out.stderr) {
            Ok(false)
        } else {
            Err(FirewallError::Command {
                step: Step::Remove,
                command: out.command,
                stderr: out.stderr,
            })
        }
    }

    /// The live table in canonical form, or `None` if it does not exist.
    async fn read_live_json(&self) -> Result<Option<Normalised>, FirewallError> {
        let args = ["-j", "list", "table", "inet", self.config.table.as_str()];
        let out = self.run(Step::ReadLive, &args, None).await?;
        if !out.success {
            if is_enoent(&out.stderr) {
                return Ok(None);
            }
            return Err(FirewallError::Command {
                step: Step::ReadLive,
                command: out.command,
                stderr: out.stderr,
            });
        }
        normalise_live(&out.stdout, &self.config.table)
            .map(Some)
            .map_err(|problem| FirewallError::ParseJson {
                command: out.command,
                problem,
            })
    }

    /// Runs `nft ARGS` (inside `firewall.netns` if set) with a timeout. Failures to start
    /// and a missing namespace are errors; a non-zero exit is returned for the caller to
    /// interpret.
    async fn run(
        &self,
        step: Step,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<NftOutput, FirewallError> {
        let c = &self.config;
        let mut argv: Vec<&str> = Vec::new();
        if let Some(ns) = &c.netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()]);
        }
        argv.push(c.nft.as_str());
        argv.extend_from_slice(args);
        let command = argv.join(" ");
        let mut cmd = tokio::process::Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let timeout_ms = c.command_timeout_ms;
        let run = async {
            let mut child = cmd.spawn().map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    FirewallError::NftMissing {
                        program: argv[0].to_string(),
                        command: command.clone(),
                    }
                } else {
                    FirewallError::Spawn {
                        step,
                        command: command.clone(),
                        source: e,
                    }
                }
            })?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                // nft reads its whole input before it answers, so writing first cannot
                // dead-lock on a full stdout pipe.
                pipe.write_all(text.as_bytes())
                    .await
                    .map_err(|e| FirewallError::Spawn {
                        step,
                        command: command.clone(),
                        source: e,
                    })?;
                drop(pipe);
            }
            child
                .wait_with_output()
                .await
                .map_err(|e| FirewallError::Spawn {
                    step,
                    command: command.clone(),
                    source: e,
                })
        };
        let output = tokio::time::timeout(Duration::from_millis(timeout_ms), run)
            .await
            .map_err(|_| FirewallError::Timeout {
                step,
                command: command.clone(),
                timeout_ms,
            })??;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if !output.status.success() {
            if let Some(ns) = &c.netns {
                if stderr.contains("Cannot open network namespace") {
                    return Err(FirewallError::NetnsMissing {
                        netns: ns.clone(),
                        command,
                        stderr,
                    });
                }
                // `ip netns exec` reports an executable it cannot start this way.
                if stderr.starts_with("exec of") {
                    return Err(FirewallError::NftMissing {
                        program: c.nft.clone(),
                        command,
                    });
                }
            }
        }
        Ok(NftOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr,
            command,
        })
    }
}

struct NftOutput {
    success: bool,
    stdout: String,
    stderr: String,
    command: String,
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// nft reports a missing table as the kernel's ENOENT.
fn is_enoent(stderr: &str) -> bool {
    stderr.contains("No such file or directory")
}

fn describe_diff(missing: &[String], unexpected: &[String]) -> Vec<String> {
    missing
        .iter()
        .map(|m| format!("missing: {m}"))
        .chain(unexpected.iter().map(|u| format!("unexpected: {u}")))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Normalisation. Each chain becomes `chain NAME` (plus type, hook, priority and policy
// for base chains); each rule becomes `CHAIN: EXPR … VERDICT` with set elements sorted,
// one-element sets and lists reduced to their element, and `in` treated like `==`.
// Comments and handles are ignored: they do not change what passes.

fn chain_json(chain: &Chain) -> Value {
    match chain.hook {
        Some((hook, policy)) => json!({
            "name": chain.name, "type": "filter", "hook": hook, "prio": 0, "policy": policy
        }),
        None => json!({ "name": chain.name }),
    }
}

fn canonical_chain(c: &Value) -> String {
    let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
    match c.get("hook").and_then(Value::as_str) {
        Some(hook) => format!(
            "chain {name} (type {} hook {hook} priority {} policy {})",
            c.get("type").map(canonical_value).unwrap_or_default(),
            c.get("prio").map(canonical_value).unwrap_or_default(),
            c.get("policy")
                .map(canonical_value)
                .unwrap_or_else(|| "accept".into()),
        ),
        None => format!("chain {name}"),
    }
}

fn canonical_rule(chain: &str, expr: &[Value]) -> String {
    let parts: Vec<String> = expr.iter().map(canonical_expr).collect();
    format!("{chain}: {}", parts.join(" "))
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The only key of a one-key JSON object, with its value.
fn single(v: &Value) -> Option<(&str, &Value)> {
    let obj = v.as_object()?;
    if obj.len() != 1 {
        return None;
    }
    obj.iter().next().map(|(k, v)| (k.as_str(), v))
}

fn canonical_expr(e: &Value) -> String {
    let Some((kind, body)) = single(e) else {
        return compact(e);
    };
    match kind {
        "match" => {
            let left = body.get("left").map(canonical_left).unwrap_or_default();
            let right = body.get("right").map(canonical_value).unwrap_or_default();
            match body.get("op").and_then(Value::as_str).unwrap_or("==") {
                "==" | "in" => format!("{left} {right}"),
                op => format!("{left} {op} {right}"),
            }
        }
        "accept" | "drop" | "continue" | "return" if body.is_null() => kind.to_string(),
        "jump" | "goto" => format!(
            "{kind} {}",
            body.get("target").and_then(Value::as_str).unwrap_or("?")
        ),
        // Counters change with traffic; only their presence matters.
        "counter" => "counter".into(),
        _ => compact(e),
    }
}

fn canonical_left(v: &Value) -> String {
    match single(v) {
        Some(("payload", p)) => format!(
            "{} {}",
            p.get("protocol").and_then(Value::as_str).unwrap_or("?"),
            p.get("field").and_then(Value::as_str).unwrap_or("?")
        ),
        Some((kind @ ("meta" | "ct"), m)) => format!(
            "{kind} {}",
            m.get("key").and_then(Value::as_str).unwrap_or("?")
        ),
        _ => compact(v),
    }
}

fn canonical_value(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) => canonical_set(items),
        _ => match single(v) {
            Some(("set", Value::Array(items))) => canonical_set(items),
            Some(("set", item)) => canonical_value(item),
            Some(("range", Value::Array(r))) if r.len() == 2 => {
                format!("{}-{}", canonical_value(&r[0]), canonical_value(&r[1]))
            }
            Some(("prefix", p)) => format!(
                "{}/{}",
                p.get("addr").map(canonical_value).unwrap_or_default(),
                p.get("len").map(canonical_value).unwrap_or_default()
            ),
            _ => compact(v),
        },
    }
}

fn canonical_set(items: &[Value]) -> String {
    let mut elems: Vec<String> = items.iter().map(canonical_value).collect();
    elems.sort();
    elems.dedup();
    if elems.len() == 1 {
        elems.remove(0)
    } else {
        format!("{{{}}}", elems.join(","))
    }
}

/// Reads `nft -j list table inet TABLE` output into canonical form.
fn normalise_live(json_text: &str, table: &str) -> Result<Normalised, String> {
    let doc: Value = serde_json::from_str(json_text).map_err(|e| e.to_string())?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no \"nftables\" array")?;
    let ours = |body: &Value| {
        body.get("family").and_then(Value::as_str) == Some("inet")
            && body.get("table").and_then(Value::as_str) == Some(table)
    };
    let mut n = Normalised::default();
    for item in items {
        let Some((kind, body)) = single(item) else {
            return Err(format!("unexpected item {}", compact(item)));
        };
        match kind {
            "metainfo" | "table" => {}
            "chain" if ours(body) => n.chains.push(canonical_chain(body)),
            "rule" if ours(body) => {
                let chain = body.get("chain").and_then(Value::as_str).unwrap_or("?");
                let expr = body
                    .get("expr")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                n.rules
                    .push((chain.to_string(), canonical_rule(chain, expr)));
            }
            "chain" | "rule" => {}
            other => {
                let name = body.get("name").and_then(Value::as_str).unwrap_or("?");
                n.others.push(format!("{other} {name}"));
            }
        }
    }
    Ok(n)
}

/// `(missing, unexpected)`: multiset differences of chains and rules, then, when the
/// rules are the same, any chain whose rules are in a different order.
fn compare(want: &Normalised, live: &Normalised) -> (Vec<String>, Vec<String>) {
    fn diff(a: &[String], b: &[String]) -> Vec<String> {
        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
        for x in b {
            *counts.entry(x).or_default() += 1;
        }
        let mut out = Vec::new();
        for x in a {
            let c = counts.entry(x).or_default();
            if *c > 0 {
                *c -= 1;
            } else {
                out.push(x.clone());
            }
        }
        out
    }
    let want_all: Vec<String> = want
        .chains
        .iter()
        .cloned()
        .chain(want.rules.iter().map(|(_, r)| r.clone()))
        .collect();
    let live_all: Vec<String> = live
        .chains
        .iter()
        .cloned()
        .chain(live.rules.iter().map(|(_, r)| r.clone()))
        .chain(live.others.iter().cloned())
        .collect();
    let missing = diff(&want_all, &live_all);
    let mut unexpected = diff(&live_all, &want_all);
    if missing.is_empty() && unexpected.is_empty() {
        for chain in &want.chains {
            let name = chain
                .strip_prefix("chain ")
                .and_then(|s| s.split(' ').next())
                .unwrap_or_default();
            let of = |n: &Normalised| -> Vec<String> {
                n.rules
                    .iter()
                    .filter(|(c, _)| c == name)
                    .map(|(_, r)| r.clone())
                    .collect()
            };
            if of(want) != of(live) {
                unexpected.push(format!(
                    "the rules of chain {name} are in a different order"
                ));
            }
        }
    }
    (missing, unexpected)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn fw(config: FirewallConfig) -> Firewall {
        Firewall::new(config).unwrap()
    }

    fn ports(w: &WantedRules, network: Network) -> Vec<String> {
        w.rules
            .iter()
            .filter(|r| r.network == network)
            .map(|r| r.ports.to_string())
            .collect()
    }

    const PG: FirewallRole = FirewallRole {
        engine: Some(DbEngine::Postgres),
        mysql_group_replication: false,
        mysql_router: false,
    };
    const MYSQL: FirewallRole = FirewallRole {
        engine: Some(DbEngine::Mysql),
        mysql_group_replication: false,
        mysql_router: false,
    };

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
    fn render_is_deterministic_and_replaces_only_its_table() {
        let f = fw(FirewallConfig {
            table: "agent_fw".into(),
            management_interface: "ens192".into(),
            application_interface: "ens224".into(),
            ..Default::default()
        });
        let a = f.render(&PG);
        assert_eq!(a, f.render(&PG));
        let lines: Vec<&str> = a.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines[0], "table inet agent_fw");
        assert_eq!(lines[1], "delete table inet agent_fw");
        assert_eq!(lines[2], "table inet agent_fw {");
        assert_eq!(a.matches("table ").count(), 4, "{a}"); // 3 lines + the header comment
        assert!(a.contains("type filter hook input priority filter; policy drop;"));
        assert!(a.contains("type filter hook forward priority filter; policy drop;"));
        assert!(a.contains("type filter hook output priority filter; policy accept;"));
        assert!(a.contains("iifname \"ens192\" jump management"));
        assert!(a.contains("iifname \"ens224\" jump application"));
        assert!(a.contains("ct state established,related accept"));
        assert!(a.contains("icmpv6 type {"));
        let quiet = fw(FirewallConfig {
            allow_icmp: false,
            ..Default::default()
        });
        assert!(!quiet.render(&PG).contains("icmp"));
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
        let err = toml::from_str::<FirewallConfig>("tabel = \"x\"").unwrap_err();
        assert!(err.to_string().contains("tabel"), "{err}");
        let role: FirewallRole = toml::from_str("engine = \"mysql\"\nmysql_router = true").unwrap();
        assert_eq!(role.engine, Some(DbEngine::Mysql));
    }

    /// `nft -j list table inet dbvm` (nftables 1.0.6) after applying `render(&PG)` with
    /// the default config, then `nft add rule inet dbvm input tcp dport 9999 accept`.
    /// Note what nft changed: ICMP sets reordered, `ct state` as `in` with a list or a
    /// bare string, comments gone.
    const LIVE_PG_WITH_9999: &str = r#"{"nftables":[
{"metainfo":{"version":"1.0.6","release_name":"Lester Gooch #5","json_schema_version":1}},
{"table":{"family":"inet","name":"dbvm","handle":2}},
{"chain":{"family":"inet","table":"dbvm","name":"input","handle":1,"type":"filter","hook":"input","prio":0,"policy":"drop"}},
{"chain":{"family":"inet","table":"dbvm","name":"management","handle":2}},
{"chain":{"family":"inet","table":"dbvm","name":"application","handle":3}},
{"chain":{"family":"inet","table":"dbvm","name":"forward","handle":4,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},
{"chain":{"family":"inet","table":"dbvm","name":"output","handle":5,"type":"filter","hook":"output","prio":0,"policy":"accept"}},
{"rule":{"family":"inet","table":"dbvm","chain":"input","handle":6,"comment":"replies to connections already allowed","expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"input","handle":7,"comment":"packets conntrack cannot place","expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":"invalid"}},{"drop":null}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"input","handle":8,"comment":"loopback","expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"lo"}},{"accept":null}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"input","handle":10,"comment":"essential ICMP","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"icmp","field":"type"}},"right":{"set":["destination-unreachable","echo-request","time-exceeded","parameter-problem"]}}},{"accept":null}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"input","handle":12,"comment":"essential ICMPv6 and neighbour discovery","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"icmpv6","field":"type"}},"right":{"set":["destination-unreachable","packet-too-big","time-exceeded","parameter-problem","echo-request","nd-router-advert","nd-neighbor-solicit","nd-neighbor-advert"]}}},{"accept":null}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"input","handle":13,"comment":"management network","expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"eth0"}},{"jump":{"target":"management"}}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"input","handle":14,"comment":"application network","expr":[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"eth1"}},{"jump":{"target":"application"}}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"input","handle":19,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":9999}},{"accept":null}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"management","handle":15,"comment":"ssh","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":22}},{"accept":null}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"management","handle":16,"comment":"https (management)","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":443}},{"accept":null}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"application","handle":17,"comment":"ssh","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":22}},{"accept":null}]}},
{"rule":{"family":"inet","table":"dbvm","chain":"application","handle":18,"comment":"PostgreSQL","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":5432}},{"accept":null}]}}
]}"#;

    #[test]
    fn live_json_normalises_to_the_wanted_table() {
        let f = fw(FirewallConfig::default());
        let want = f.normalised_wanted(&f.wanted(&PG));
        let mut live = normalise_live(LIVE_PG_WITH_9999, "dbvm").unwrap();
        let (missing, unexpected) = compare(&want, &live);
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(unexpected, ["input: tcp dport 9999 accept"]);

        // Without the added rule it matches exactly.
        live.rules.retain(|(_, r)| !r.contains("9999"));
        assert_eq!(compare(&want, &live), (vec![], vec![]));

        // A different role: 5432 is unexpected, MySQL's ports are missing.
        let (missing, unexpected) = compare(&f.normalised_wanted(&f.wanted(&MYSQL)), &live);
        assert_eq!(
            missing,
            [
                "application: tcp dport 3306 accept",
                "application: tcp dport 33060 accept"
            ]
        );
        assert_eq!(unexpected, ["application: tcp dport 5432 accept"]);

        // Reordered rules are reported even though the set is the same.
        let i = live
            .rules
            .iter()
            .position(|(_, r)| r.contains("invalid"))
            .unwrap();
        live.rules.swap(0, i);
        let (missing, unexpected) = compare(&want, &live);
        assert!(missing.is_empty());
        assert_eq!(
            unexpected,
            ["the rules of chain input are in a different order"]
        );
    }

    #[test]
    fn policies_extra_objects_and_other_tables_are_told_apart() {
        let doc = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "dbvm", "handle": 1}},
            {"chain": {"family": "inet", "table": "dbvm", "name": "input", "handle": 1,
                "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
            {"set": {"family": "inet", "table": "dbvm", "name": "blocked", "type": "ipv4_addr"}},
            {"rule": {"family": "inet", "table": "other", "chain": "input", "expr": [{"accept": null}]}},
            {"rule": {"family": "inet", "table": "dbvm", "chain": "input", "handle": 9, "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                    "right": {"set": [443, {"range": [8000, 8080]}, 22]}}},
                {"counter": {"packets": 3, "bytes": 180}},
                {"accept": null}]}},
        ]});
        let live = normalise_live(&doc.to_string(), "dbvm").unwrap();
        assert_eq!(
            live.chains,
            ["chain input (type filter hook input priority 0 policy accept)"]
        );
        assert_eq!(
            live.rules,
            [(
                "input".to_string(),
                "input: tcp dport {22,443,8000-8080} counter accept".to_string()
            )]
        );
        assert_eq!(live.others, ["set blocked"]);
        let f = fw(FirewallConfig::default());
        let (missing, unexpected) = compare(&f.normalised_wanted(&f.wanted(&PG)), &live);
        assert!(missing
            .contains(&"chain input (type filter hook input priority 0 policy drop)".to_string()));
        assert!(unexpected.contains(
            &"chain input (type filter hook input priority 0 policy accept)".to_string()
        ));
        assert!(unexpected.contains(&"set blocked".to_string()));
        assert!(normalise_live("{\"nope\": 1}", "dbvm").is_err());
        assert!(normalise_live("not json", "dbvm").is_err());
    }

    #[tokio::test]
    async fn a_missing_nft_says_how_to_install_it() {
        let f = fw(FirewallConfig {
            nft: "/nonexistent/dbvm-test/nft".into(),
            ..Default::default()
        });
        let err = f.status(&PG).await.unwrap_err();
        assert!(matches!(err, FirewallError::NftMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("install nftables"), "{err}");
        // Disabled: nothing runs at all, so the missing binary does not matter.
        let off = fw(FirewallConfig {
            enabled: false,
            nft: "/nonexistent/dbvm-test/nft".into(),
            ..Default::default()
        });
        let r = off.apply(&PG).await.unwrap();
        assert_eq!(r.outcome, ApplyOutcome::Disabled);
        assert!(!r.changed());
    }

    #[tokio::test]
    async fn a_hung_nft_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nft");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = fw(FirewallConfig {
            nft: fake.display().to_string(),
            command_timeout_ms: 200,
            ..Default::default()
        });
        let started = Instant::now();
        let err = f.apply(&PG).await.unwrap_err();
        assert!(
            matches!(
                err,
                FirewallError::Timeout {
                    step: Step::ReadLive,
                    timeout_ms: 200,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            err.to_string().contains("did not finish within 200 ms"),
            "{err}"
        );
    }
}
