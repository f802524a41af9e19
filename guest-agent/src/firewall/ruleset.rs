//! The wanted table as an nftables model (chains, rules, matches, verdicts), rendered to
//! the `nft -f` batch that replaces the table and to the JSON shape `nft -j` prints, so
//! the same normaliser reads both sides of a comparison.

use super::{Firewall, FirewallRole, Network, PortRange, WantedRules};
use serde_json::{json, Value};

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

pub(super) enum Match {
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

    pub(super) fn json(&self) -> Value {
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

pub(super) enum Verdict {
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

    pub(super) fn json(&self) -> Value {
        match self {
            Verdict::Accept => json!({"accept": null}),
            Verdict::Drop => json!({"drop": null}),
            Verdict::Jump(c) => json!({"jump": {"target": c}}),
        }
    }
}

pub(super) struct Rule {
    pub(super) matches: Vec<Match>,
    pub(super) verdict: Verdict,
    comment: String,
}

fn rule(matches: Vec<Match>, verdict: Verdict, comment: impl Into<String>) -> Rule {
    Rule {
        matches,
        verdict,
        comment: comment.into(),
    }
}

pub(super) struct Chain {
    pub(super) name: &'static str,
    comment: String,
    /// Base chains: (hook, policy).
    pub(super) hook: Option<(&'static str, &'static str)>,
    pub(super) rules: Vec<Rule>,
}

pub(super) struct Model {
    pub(super) chains: Vec<Chain>,
}

impl Firewall {
    pub(super) fn model(&self, wanted: &WantedRules) -> Model {
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
}

pub(super) fn chain_json(chain: &Chain) -> Value {
    match chain.hook {
        Some((hook, policy)) => json!({
            "name": chain.name, "type": "filter", "hook": hook, "prio": 0, "policy": policy
        }),
        None => json!({ "name": chain.name }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::test_support::{fw, pg};
    use super::super::FirewallConfig;

    #[test]
    fn render_is_deterministic_and_replaces_only_its_table() {
        let f = fw(FirewallConfig {
            table: "agent_fw".into(),
            management_interface: "ens192".into(),
            application_interface: "ens224".into(),
            ..Default::default()
        });
        let a = f.render(&pg());
        assert_eq!(a, f.render(&pg()));
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
        assert!(!quiet.render(&pg()).contains("icmp"));
    }
}
