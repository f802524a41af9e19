//! Check 10, Database bin log cloud sync: how far the newest log safely stored off the VM is
//! behind. With backups configured, PostgreSQL's `archive_command` is pgBackRest's
//! `archive-push` to the bucket and succeeds only once the segment is stored there, so
//! the archiver's own figures are the bucket's state: segments waiting, the age of the
//! newest one stored, failures (critical: nothing reaches the bucket). `unknown` where
//! nothing is configured — never a made-up `ok`. MySQL's binary log upload replaces this
//! check through the backup capability.

use crate::health::db::LogFacts;
use crate::health::{duration, grade, Check, Finding, Run};
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;

pub struct CloudSync;

#[async_trait]
impl Check for CloudSync {
    fn id(&self) -> &'static str {
        "binlog_cloud_sync"
    }

    async fn run(&self, run: &Run) -> Finding {
        let db = run.db().await;
        let facts = match db.facts() {
            Ok(f) => f,
            Err(unknown) => return unknown,
        };
        let t = &run.settings().thresholds;
        match &facts.log {
            LogFacts::Mysql(_) => Finding::unknown(
                "no binary log upload to object storage is configured on this VM (it comes with backups): the newest log off the VM is unknown",
            ),
            LogFacts::Postgres(p) if !p.archiving() => Finding::unknown(
                "no WAL archiving is configured (archive_mode off or no archive_command): nothing is stored off the VM, so how far behind it is cannot be known",
            ),
            LogFacts::Postgres(p) => {
                // Behind = the age of the newest archived segment while segments wait;
                // nothing waiting means the archive is current.
                let behind = if p.ready > 0.0 || p.failing() {
                    p.last_archived_age_s.unwrap_or(f64::INFINITY)
                } else {
                    0.0
                };
                let mut status = grade(
                    behind,
                    t.archive_warning_s as f64,
                    t.archive_critical_s as f64,
                );
                // A failing archive_command means nothing reaches the bucket now: the
                // point a restore can reach stops moving, whatever the age so far.
                if p.failing() {
                    status = HealthStatus::Critical;
                }
                let msg = if behind == 0.0 {
                    format!(
                        "the archive is current: every finished WAL segment was handed to archive_command (the newest {} ago)",
                        p.last_archived_age_s.map_or("never".into(), duration)
                    )
                } else if behind.is_infinite() {
                    format!(
                        "nothing was ever archived and {:.0} segments wait: the archive is missing everything since the database started",
                        p.ready
                    )
                } else {
                    format!(
                        "the archive is {} behind: {:.0} segments wait{}",
                        duration(behind),
                        p.ready,
                        if p.failing() { " and archive_command is failing (see binlog)" } else { "" }
                    )
                };
                Finding::new(status, format!("{msg} (as PostgreSQL's archiver reports it)")).figures([
                    ("behind_s", behind),
                    ("ready_segments", p.ready),
                    ("last_archived_age_s", p.last_archived_age_s.unwrap_or(f64::NAN)),
                ])
            }
        }
    }
}
