//! Check 11, Database service: the container and the server are up, in the expected role
//! (primary / replica), with the replication lag where relevant.

use crate::health::db::Absent;
use crate::health::{duration, grade, Check, Finding, Run};
use crate::runtime::State;
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;

pub struct DbService;

#[async_trait]
impl Check for DbService {
    fn id(&self) -> &'static str {
        "db_service"
    }

    async fn run(&self, run: &Run) -> Finding {
        let db = run.db().await;
        let st = match &db.state {
            Err(Absent::NotManaged) => return Finding::unknown(Absent::NotManaged.message()),
            Err(a) => return Finding::unknown(a.message()),
            Ok(st) => st,
        };
        let engine = st.spec.engine.name();
        let container = match &db.container {
            Err(e) => {
                return Finding::new(
                    HealthStatus::Critical,
                    format!("the container engine does not answer: {e}; start it (systemctl start docker) — the database cannot be managed"),
                )
                .figure("up", 0.0)
            }
            Ok(None) => {
                return Finding::new(
                    HealthStatus::Critical,
                    format!("the {engine} container is missing; the agent recreates it within {} s (db.start does it at once)", run.shared.db.as_ref().map_or(10, |m| m.settings().reconcile_interval_s)),
                )
                .figure("up", 0.0)
            }
            Ok(Some(c)) => c,
        };
        if container.state != State::Running {
            let why = match &container.state {
                State::Stopped { exit_code } if !st.want_running => format!(
                    "is stopped on request (db.stop, exit code {}); start it with db.start",
                    exit_code.map_or("?".into(), |c| c.to_string())
                ),
                State::Stopped { exit_code } => format!(
                    "exited (code {}) and is being restarted by the agent; see the database log in {}",
                    exit_code.map_or("?".into(), |c| c.to_string()),
                    run.shared.db.as_ref().map_or(String::new(), |m| m.paths().log.display().to_string())
                ),
                // `docker pause` (or a freezer): the reconciler unpauses it.
                State::Other(what) if st.want_running => format!(
                    "is {what}: it serves nothing; the agent brings it back within {} s",
                    run.shared.db.as_ref().map_or(10, |m| m.settings().reconcile_interval_s)
                ),
                State::Other(what) => format!("is {what}"),
                State::Restarting => "is restarting (the engine's restart policy); see the database log".to_string(),
                State::Running => "is running".to_string(),
            };
            return Finding::new(HealthStatus::Critical, format!("the {engine} server {why}"))
                .figure("up", 0.0);
        }
        let facts = match &db.server {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                return Finding::new(
                    HealthStatus::Critical,
                    format!("the {engine} container runs but the server does not answer: {e}"),
                )
                .figure("up", 0.0)
            }
            None => return Finding::unknown("the server was not asked"),
        };
        let t = &run.settings().thresholds;
        let expected = &run.settings().expected_role;
        let role_ok = &facts.info.role == expected;
        let mut status = if role_ok {
            HealthStatus::Ok
        } else {
            HealthStatus::Critical
        };
        let mut msg = format!(
            "{engine} {} is up for {} as {}",
            facts.info.version.split_whitespace().next().unwrap_or(""),
            duration(facts.info.uptime_s as f64),
            facts.info.role
        );
        if !role_ok {
            msg.push_str(&format!(
                " but should be {expected}: a failover or a wrong promote happened; check the HA state"
            ));
        }
        if let Some(lag) = facts.replication_lag_s {
            let s = grade(
                lag,
                t.replication_lag_warning_s,
                t.replication_lag_critical_s,
            );
            status = status.max(s);
            msg.push_str(&format!(", {} behind the primary", duration(lag)));
        }
        if !st.restart_pending.is_empty() {
            msg.push_str(&format!(
                "; parameters waiting for a restart: {}",
                st.restart_pending.join(", ")
            ));
        }
        Finding::new(status, msg).figures([
            ("up", 1.0),
            ("uptime_s", facts.info.uptime_s as f64),
            (
                "is_primary",
                f64::from(u8::from(facts.info.role == "primary")),
            ),
            (
                "replication_lag_s",
                facts.replication_lag_s.unwrap_or(f64::NAN),
            ),
            ("restart_pending", st.restart_pending.len() as f64),
        ])
    }
}
