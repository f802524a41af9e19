//! The health capability's bundle parts: the latest report and the recent ones the
//! monitor keeps in memory ([`super::HISTORY_REPORTS`]), as JSON with log-style
//! redaction (a check's message can quote what it saw).

use super::Monitor;
use crate::bundle::{Part, Producer};
use std::sync::Arc;

pub fn parts(monitor: &Arc<Monitor>) -> Vec<Part> {
    let latest = match monitor.latest() {
        Some(report) => Part::produced(
            "health/latest.json",
            "the latest health report",
            async move { serde_json::to_vec_pretty(&*report).map_err(|e| e.to_string()) },
        ),
        None => Part::log(
            "health/latest.json",
            "the latest health report",
            Producer::Unavailable("no health run has finished yet".into()),
        ),
    };
    let history = monitor.history();
    let history = Part::produced(
        "health/history.jsonl",
        format!(
            "the last {} health reports kept in memory, one per line, oldest first",
            super::HISTORY_REPORTS
        ),
        async move {
            let mut out = Vec::new();
            for report in history {
                serde_json::to_writer(&mut out, &*report).map_err(|e| e.to_string())?;
                out.push(b'\n');
            }
            Ok(out)
        },
    );
    vec![latest, history]
}
