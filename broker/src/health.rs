//! The fleet's health as the broker knows it: the latest health report of each agent,
//! checked and trimmed on the way in (reports are untrusted input), and the fleet metrics
//! kept up to date as reports replace each other.
//!
//! Reports live in memory only. That is enough because an agent sends a report every
//! time it connects (and when a status changes, and about every minute): after a broker
//! restart an agent has no report only until it reconnects, which it does within its
//! backoff. Keeping them out of the store also keeps a 60-second report from 10,000
//! agents off the store's fsync path.

use crate::metrics::Metrics;
use dbvm_protocol::api::{AgentHealth, AgentHealthSummary};
use dbvm_protocol::health::{title, HealthReport, HealthStatus};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// More checks than this and the report is refused (the agent has twelve).
pub const MAX_CHECKS: usize = 64;
/// Longer messages are cut to this many bytes (at a character boundary).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Figures beyond this many per check are dropped.
pub const MAX_FIGURES: usize = 32;
/// Longest check id or figure name kept.
pub const MAX_NAME_LEN: usize = 64;

/// Why a report was not stored; `reason()` is the label of
/// `dbvm_broker_health_reports_refused`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HealthRefused {
    #[error("report claims agent {claimed:?} but arrived on the link of agent {link:?}")]
    WrongAgent { claimed: String, link: String },
    #[error("report has {0} checks, more than the {MAX_CHECKS} accepted")]
    TooManyChecks(usize),
    #[error("report has a check id {0:?} that is not 1-64 characters of a-z, 0-9, '_'")]
    BadCheckId(String),
    #[error("report has check {0:?} twice")]
    DuplicateCheck(String),
}

impl HealthRefused {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::WrongAgent { .. } => "wrong_agent",
            Self::TooManyChecks(_) => "too_many_checks",
            Self::BadCheckId(_) => "bad_check_id",
            Self::DuplicateCheck(_) => "duplicate_check",
        }
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// Checks a report from the link of agent `link_agent` and trims what may be trimmed:
/// long messages are cut, figures that are not finite, badly named or too many are
/// dropped. What cannot be trimmed (another agent's id, too many checks, bad or
/// repeated check ids) refuses the whole report.
pub fn sanitize(mut report: HealthReport, link_agent: &str) -> Result<HealthReport, HealthRefused> {
    if report.agent_id != link_agent {
        return Err(HealthRefused::WrongAgent {
            claimed: report.agent_id.chars().take(MAX_NAME_LEN).collect(),
            link: link_agent.to_string(),
        });
    }
    if report.checks.len() > MAX_CHECKS {
        return Err(HealthRefused::TooManyChecks(report.checks.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for c in &mut report.checks {
        if !is_name(&c.check) {
            return Err(HealthRefused::BadCheckId(
                c.check.chars().take(MAX_NAME_LEN).collect(),
            ));
        }
        if !seen.insert(c.check.clone()) {
            return Err(HealthRefused::DuplicateCheck(c.check.clone()));
        }
        truncate_at_char(&mut c.message, MAX_MESSAGE_BYTES);
        // JSON has no NaN or infinity: such a figure would make the answer unreadable.
        c.figures
            .retain(|name, value| value.is_finite() && name.len() <= MAX_NAME_LEN);
        // The first ones by name stay, so what is kept does not depend on the encoding.
        while c.figures.len() > MAX_FIGURES {
            c.figures.pop_last();
        }
    }
    Ok(report)
}

struct Latest {
    report: Arc<HealthReport>,
    received_at_ms: i64,
}

/// The latest report of every agent that sent one since the broker started.
#[derive(Default)]
pub struct HealthBook {
    latest: Mutex<HashMap<String, Latest>>,
}

/// The `check` label of a check id: known ids as they are, anything else `other`, so a
/// misbehaving agent cannot create metric series at will.
fn check_label(check: &str) -> &str {
    if title(check).is_some() {
        check
    } else {
        "other"
    }
}

impl HealthBook {
    pub fn new() -> Self {
        Self::default()
    }

    fn latest(&self) -> std::sync::MutexGuard<'_, HashMap<String, Latest>> {
        // A poisoned lock only means another thread panicked mid-update of a plain map.
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a sanitized report as the agent's latest and moves the fleet gauges from
    /// the old report's statuses to the new one's (a few gauge steps, whatever the fleet
    /// size, so a scrape never walks the fleet). Returns the previous worst status.
    pub fn store(
        &self,
        report: HealthReport,
        received_at_ms: i64,
        metrics: &Metrics,
    ) -> Option<HealthStatus> {
        let new = Arc::new(report);
        let mut latest = self.latest();
        // Under the lock, so the gauges always match the stored reports.
        count(metrics, &new, 1);
        let old = latest.insert(
            new.agent_id.clone(),
            Latest {
                report: new,
                received_at_ms,
            },
        );
        old.map(|old| {
            count(metrics, &old.report, -1);
            old.report.worst()
        })
    }

    /// The agent's latest report and when it arrived.
    pub fn get(&self, agent: &str) -> Option<(Arc<HealthReport>, i64)> {
        self.latest()
            .get(agent)
            .map(|l| (l.report.clone(), l.received_at_ms))
    }

    pub fn len(&self) -> usize {
        self.latest().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All latest reports (a snapshot; the lock is held only to clone the pointers).
    pub fn snapshot(&self) -> HashMap<String, (Arc<HealthReport>, i64)> {
        self.latest()
            .iter()
            .map(|(k, l)| (k.clone(), (l.report.clone(), l.received_at_ms)))
            .collect()
    }

    /// `GET /v1/agents/{id}/health`.
    pub fn agent_health(&self, agent: &str, connected: bool) -> Option<AgentHealth> {
        self.get(agent)
            .map(|(r, at)| AgentHealth::new((*r).clone(), at, connected))
    }

    /// One line of `GET /v1/health`.
    pub fn summary(
        &self,
        agent: &str,
        connected: bool,
        last_seen_ms: Option<i64>,
    ) -> AgentHealthSummary {
        let latest = self.get(agent);
        AgentHealthSummary::new(
            agent,
            connected,
            last_seen_ms,
            latest.as_ref().map(|(r, at)| (r.as_ref(), *at)),
        )
    }
}

/// Adds (`delta` 1) or removes (`-1`) a report's contribution to the fleet gauges.
fn count(metrics: &Metrics, report: &HealthReport, delta: i64) {
    metrics
        .agents_by_health
        .get_or_create(&vec![("status", report.worst().as_str().to_string())])
        .inc_by(delta);
    for c in &report.checks {
        metrics
            .health_checks
            .get_or_create(&vec![
                ("check", check_label(&c.check).to_string()),
                ("status", c.status.as_str().to_string()),
            ])
            .inc_by(delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbvm_protocol::health::CheckReport;
    use std::collections::BTreeMap;

    fn check(id: &str, status: HealthStatus) -> CheckReport {
        CheckReport {
            check: id.into(),
            status,
            message: "fine".into(),
            figures: BTreeMap::from([("used_pct".into(), 12.5)]),
            duration_ms: 1,
            since_ms: 0,
        }
    }

    fn report(agent: &str, checks: Vec<CheckReport>) -> HealthReport {
        HealthReport {
            agent_id: agent.into(),
            at_ms: 1,
            interval_ms: 60_000,
            duration_ms: 2,
            checks,
        }
    }

    #[test]
    fn reports_are_refused_or_trimmed_as_untrusted_input() {
        let r = report("db2", vec![]);
        let e = sanitize(r, "db1").unwrap_err();
        assert_eq!(e.reason(), "wrong_agent");
        assert!(e.to_string().contains("\"db2\"") && e.to_string().contains("\"db1\""));

        let many = (0..65).map(|i| check(&format!("c{i}"), HealthStatus::Ok));
        let e = sanitize(report("db1", many.collect()), "db1").unwrap_err();
        assert_eq!(e, HealthRefused::TooManyChecks(65));
        let e = sanitize(
            report("db1", vec![check("Bad Id", HealthStatus::Ok)]),
            "db1",
        );
        assert_eq!(e.unwrap_err().reason(), "bad_check_id");
        let twice = vec![
            check("cpu", HealthStatus::Ok),
            check("cpu", HealthStatus::Ok),
        ];
        let e = sanitize(report("db1", twice), "db1").unwrap_err();
        assert_eq!(e.reason(), "duplicate_check");

        let mut c = check("cpu", HealthStatus::Warning);
        c.message = "é".repeat(5000);
        c.figures.insert("nan".into(), f64::NAN);
        c.figures.insert("inf".into(), f64::INFINITY);
        c.figures.insert("x".repeat(65), 1.0);
        for i in 0..40 {
            c.figures.insert(format!("f{i:02}"), f64::from(i));
        }
        let r = sanitize(report("db1", vec![c]), "db1").expect("trimmed, not refused");
        let c = &r.checks[0];
        assert!(c.message.len() <= MAX_MESSAGE_BYTES, "{}", c.message.len());
        assert!(c.message.ends_with('…'));
        assert_eq!(c.figures.len(), MAX_FIGURES);
        assert!(c.figures.values().all(|v| v.is_finite()));
        // The first 32 by name are kept.
        assert!(c.figures.contains_key("f00") && !c.figures.contains_key("used_pct"));
    }

    #[test]
    fn gauges_follow_the_latest_report_of_each_agent() {
        let metrics = Metrics::new();
        let book = HealthBook::new();
        let a1 = report(
            "db1",
            vec![
                check("cpu", HealthStatus::Ok),
                check("ntp_sync", HealthStatus::Critical),
                check("newer_check", HealthStatus::Warning),
            ],
        );
        assert_eq!(book.store(a1, 10, &metrics), None);
        book.store(
            report("db2", vec![check("cpu", HealthStatus::Ok)]),
            11,
            &metrics,
        );
        let text = metrics.render();
        assert!(
            text.contains("dbvm_broker_agents_by_health{status=\"critical\"} 1"),
            "{text}"
        );
        assert!(text.contains("dbvm_broker_agents_by_health{status=\"ok\"} 1"));
        assert!(text.contains("dbvm_broker_health_checks{check=\"cpu\",status=\"ok\"} 2"));
        assert!(text.contains("dbvm_broker_health_checks{check=\"other\",status=\"warning\"} 1"));

        // db1 recovers: its old statuses leave the gauges.
        let healed = report("db1", vec![check("ntp_sync", HealthStatus::Ok)]);
        assert_eq!(
            book.store(healed, 20, &metrics),
            Some(HealthStatus::Critical)
        );
        let text = metrics.render();
        assert!(text.contains("dbvm_broker_agents_by_health{status=\"critical\"} 0"));
        assert!(text.contains("dbvm_broker_agents_by_health{status=\"ok\"} 2"));
        assert!(text.contains("dbvm_broker_health_checks{check=\"cpu\",status=\"ok\"} 1"));
        assert!(
            text.contains("dbvm_broker_health_checks{check=\"ntp_sync\",status=\"critical\"} 0")
        );
        assert_eq!(book.len(), 2);

        let s = book.summary("db1", true, Some(30));
        assert_eq!(s.worst, Some(HealthStatus::Ok));
        assert_eq!(s.received_at_ms, Some(20));
        assert_eq!(book.summary("db9", false, None).worst, None);
        assert!(book.agent_health("db9", false).is_none());
        assert_eq!(
            book.agent_health("db2", true).map(|h| h.received_at_ms),
            Some(11)
        );
    }
}
