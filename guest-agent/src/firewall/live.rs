//! The live table against the wanted one. Each chain becomes `chain NAME` (plus type,
//! hook, priority and policy for base chains); each rule becomes `CHAIN: EXPR … VERDICT`
//! with set elements sorted, one-element sets and lists reduced to their element, and `in`
//! treated like `==`. Comments and handles are ignored: they do not change what passes.

use super::ruleset::{chain_json, Match};
use super::{Firewall, WantedRules};
use serde_json::Value;
use std::collections::BTreeMap;

/// Canonical forms of a table: chains, rules per chain in order, and other objects.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Normalised {
    chains: Vec<String>,
    rules: Vec<(String, String)>,
    others: Vec<String>,
}

impl Firewall {
    pub(super) fn normalised_wanted(&self, wanted: &WantedRules) -> Normalised {
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
}

pub(super) fn describe_diff(missing: &[String], unexpected: &[String]) -> Vec<String> {
    missing
        .iter()
        .map(|m| format!("missing: {m}"))
        .chain(unexpected.iter().map(|u| format!("unexpected: {u}")))
        .collect()
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
pub(super) fn normalise_live(json_text: &str, table: &str) -> Result<Normalised, String> {
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
pub(super) fn compare(want: &Normalised, live: &Normalised) -> (Vec<String>, Vec<String>) {
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
    use super::super::test_support::{fw, mysql, pg};
    use super::super::FirewallConfig;
    use super::*;
    use serde_json::json;

    /// `nft -j list table inet dbvm` (nftables 1.0.6) after applying `render(&pg())` with
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
        let want = f.normalised_wanted(&f.wanted(&pg()));
        let mut live = normalise_live(LIVE_PG_WITH_9999, "dbvm").unwrap();
        let (missing, unexpected) = compare(&want, &live);
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(unexpected, ["input: tcp dport 9999 accept"]);

        // Without the added rule it matches exactly.
        live.rules.retain(|(_, r)| !r.contains("9999"));
        assert_eq!(compare(&want, &live), (vec![], vec![]));

        // A different role: 5432 is unexpected, MySQL's ports are missing.
        let (missing, unexpected) = compare(&f.normalised_wanted(&f.wanted(&mysql())), &live);
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
        let (missing, unexpected) = compare(&f.normalised_wanted(&f.wanted(&pg())), &live);
        assert!(missing
            .contains(&"chain input (type filter hook input priority 0 policy drop)".to_string()));
        assert!(unexpected.contains(
            &"chain input (type filter hook input priority 0 policy accept)".to_string()
        ));
        assert!(unexpected.contains(&"set blocked".to_string()));
        assert!(normalise_live("{\"nope\": 1}", "dbvm").is_err());
        assert!(normalise_live("not json", "dbvm").is_err());
    }
}
