//! The firewall capability's bundle parts: the live table as `nft -j` prints it (inside
//! `firewall.netns` when set) and the status (the live table against the wanted one for
//! the database's current spec).

use super::{Firewall, FirewallRole};
use crate::bundle::{Part, Producer};
use crate::db::DbManager;
use std::sync::Arc;
use std::time::Duration;

pub fn parts(firewall: &Arc<Firewall>, db: Option<&Arc<DbManager>>) -> Vec<Part> {
    let c = &firewall.config;
    let mut argv: Vec<String> = Vec::new();
    if let Some(ns) = &c.netns {
        argv.extend(["ip", "netns", "exec", ns.as_str()].map(String::from));
    }
    argv.extend(
        [
            c.nft.as_str(),
            "-j",
            "list",
            "table",
            "inet",
            c.table.as_str(),
        ]
        .map(String::from),
    );
    let ruleset = Part::log(
        "firewall/ruleset.json",
        argv.join(" "),
        Producer::Command {
            argv,
            timeout: Duration::from_millis(c.command_timeout_ms),
        },
    );
    let (fw, db) = (firewall.clone(), db.cloned());
    let status = Part::produced("firewall/status.json", "firewall.status", async move {
        let spec = match &db {
            Some(db) => db.current_spec().await,
            None => None,
        };
        let status = fw
            .status(&FirewallRole::of_database(spec.as_ref()))
            .await
            .map_err(|e| e.to_string())?;
        serde_json::to_vec_pretty(&status).map_err(|e| e.to_string())
    });
    vec![ruleset, status]
}
