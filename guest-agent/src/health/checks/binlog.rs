//! Check 9, Database bin log: WAL / binary log volume and its share of the data disk, and
//! whether archiving works (PostgreSQL's `pg_stat_archiver`: failures and the age of the
//! newest archived segment; MySQL: the binary logs and their sizes).

use crate::health::db::LogFacts;
use crate::health::{bytes, duration, grade, Check, Finding, Run};
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;

pub struct Binlog;

#[async_trait]
impl Check for Binlog {
    fn id(&self) -> &'static str {
        "binlog"
    }

    async fn run(&self, run: &Run) -> Finding {
        let db = run.db().await;
        let facts = match db.facts() {
            Ok(f) => f,
            Err(unknown) => return unknown,
        };
        let t = &run.settings().thresholds;
        let disk = run.shared.data_disk.clone();
        let disk_total = tokio::task::spawn_blocking(move || super::disk::usage(&disk))
            .await
            .ok()
            .and_then(Result::ok)
            .map_or(f64::NAN, |u| u.total);
        let (log_bytes, files, what) = match &facts.log {
            LogFacts::Postgres(p) => (p.wal_bytes, p.wal_files, "WAL"),
            LogFacts::Mysql(m) => (m.bytes, m.files, "binary logs"),
        };
        let share = if disk_total > 0.0 {
            100.0 * log_bytes / disk_total
        } else {
            f64::NAN
        };
        let volume_status = if share.is_finite() {
            grade(share, t.binlog_warning_pct, t.binlog_critical_pct)
        } else {
            HealthStatus::Ok
        };
        let volume = format!(
            "{what}: {files:.0} files, {} ({share:.1}% of the data disk)",
            bytes(log_bytes)
        );
        let mut figures = vec![
            ("log_bytes", log_bytes),
            ("log_files", files),
            ("data_disk_share_pct", share),
        ];
        let (status, msg) = match &facts.log {
            LogFacts::Mysql(m) if !m.log_bin => (
                volume_status.max(HealthStatus::Unknown),
                "binary logging is off (log_bin): nothing to archive, and point-in-time recovery is not possible".to_string(),
            ),
            LogFacts::Mysql(_) => (
                volume_status,
                format!("{volume}; their upload is not configured yet (see binlog_cloud_sync)"),
            ),
            LogFacts::Postgres(p) => {
                figures.extend([
                    ("archiving", f64::from(u8::from(p.archiving()))),
                    ("archived_count", p.archived_count),
                    ("failed_count", p.failed_count),
                    ("ready_segments", p.ready),
                    (
                        "last_archived_age_s",
                        p.last_archived_age_s.unwrap_or(f64::NAN),
                    ),
                    ("last_failed_age_s", p.last_failed_age_s.unwrap_or(f64::NAN)),
                ]);
                let newest = match p.last_archived_age_s {
                    Some(a) => format!("the newest archived segment is {} old", duration(a)),
                    None => "no segment was ever archived".into(),
                };
                if !p.archiving() {
                    (
                        volume_status.max(HealthStatus::Unknown),
                        format!("{volume}; WAL archiving is not configured (archive_mode={}, archive_command {}), so nothing is archived",
                            p.archive_mode,
                            if p.command_missing() { "not set" } else { "set" }),
                    )
                } else if p.failing() {
                    (
                        HealthStatus::Critical,
                        format!(
                            "WAL archiving is FAILING: {:.0} failures, the last {} ago for {}; {newest}; {:.0} segments wait and WAL keeps growing until archive_command works (see the database log); {volume}",
                            p.failed_count,
                            duration(p.last_failed_age_s.unwrap_or(0.0)),
                            p.last_failed_wal.as_deref().unwrap_or("?"),
                            p.ready
                        ),
                    )
                } else {
                    let waiting_age = if p.ready > 0.0 {
                        p.last_archived_age_s.unwrap_or(f64::MAX)
                    } else {
                        0.0
                    };
                    let s = grade(
                        waiting_age,
                        t.archive_warning_s as f64,
                        t.archive_critical_s as f64,
                    );
                    (
                        volume_status.max(s),
                        format!(
                            "WAL archiving works: {:.0} archived, {newest}, {:.0} waiting; {volume}",
                            p.archived_count, p.ready
                        ),
                    )
                }
            }
        };
        // While archiving is on (backups configured), DSM's cap holds WAL to a share of
        // the data disk; over it means the archive is not keeping up. Nothing unarchived
        // is ever deleted to get under it.
        let cap = crate::db::engine::WAL_CAP_PCT as f64;
        let (status, msg) = match &facts.log {
            LogFacts::Postgres(p) if p.archiving() && share.is_finite() => {
                figures.push(("cap_pct", cap));
                if share > cap {
                    (
                        HealthStatus::Critical,
                        format!("WAL is OVER its cap of {cap:.0}% of the data disk ({share:.1}%): segments are kept until they are archived, never deleted unarchived; {msg}"),
                    )
                } else {
                    (status, msg)
                }
            }
            _ => (status, msg),
        };
        let msg = if volume_status > HealthStatus::Ok {
            format!("{msg}: logs take a large share of the data disk; check archiving and replication slots")
        } else {
            msg
        };
        Finding::new(status, msg).figures(figures)
    }
}
