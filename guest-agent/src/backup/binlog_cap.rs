//! MariaDB's binlog cap: while backups are on, a primary's binary logs are held to
//! [`crate::db::engine::BINLOG_CAP_PCT`] of the data disk (DSM's rule). After each upload
//! round the oldest binlogs that are safely in the bucket are purged with `PURGE BINARY
//! LOGS TO` until the rest fits; a binlog not uploaded yet is never purged, so when the
//! bucket cannot be reached the binlogs grow past the cap and health check 9 says so.

use super::{BackupError, BackupManager};
use crate::db::engine::{Admin, Paths, BINLOG_CAP_PCT};
use crate::db::DbState;
use std::collections::BTreeSet;

/// The cap for a data disk of `disk_bytes`.
pub fn cap(disk_bytes: u64) -> u64 {
    disk_bytes / 100 * BINLOG_CAP_PCT
}

/// The file to purge up to (exclusive), if any. Purging starts once the total passes 70%
/// of `cap` (a round's worth of writes must still fit under it) and goes down to 40% of
/// it: the oldest files first, only those in `uploaded`, never the one being written
/// (the last), never past one that is not uploaded.
pub fn purge_to(files: &[(String, u64)], uploaded: &BTreeSet<String>, cap: u64) -> Option<String> {
    let mut total: u64 = files.iter().map(|(_, s)| s).sum();
    if total <= cap / 10 * 7 {
        return None;
    }
    let low = cap / 10 * 4;
    let mut upto = None;
    for (i, (name, size)) in files.iter().enumerate() {
        if total <= low || i + 1 == files.len() || !uploaded.contains(name) {
            break;
        }
        total -= size;
        upto = Some(files[i + 1].0.clone());
    }
    upto
}

/// Purges uploaded binlogs while they exceed the cap. `index` is the server's binlog
/// index, oldest first (the last is being written).
pub async fn enforce(
    st: &DbState,
    p: &Paths,
    index: &[String],
    uploaded: &BTreeSet<String>,
) -> Result<Option<String>, BackupError> {
    let Some(disk) = crate::db::manager::fs_total(&p.data) else {
        return Ok(None);
    };
    let files: Vec<(String, u64)> = index
        .iter()
        .map(|n| {
            let size = std::fs::metadata(p.data.join(n)).map_or(0, |md| md.len());
            (n.clone(), size)
        })
        .collect();
    let Some(to) = purge_to(&files, uploaded, cap(disk)) else {
        return Ok(None);
    };
    let mut admin = Admin::connect(&st.spec, p).await?;
    use mysql_async::prelude::Queryable;
    if let Admin::Mysql(c) = &mut admin {
        // The name comes from the server's own index (digits and dots checked by
        // `manifest::seq`), quoted all the same.
        let q = format!("PURGE BINARY LOGS TO '{}'", to.replace('\'', "''"));
        c.query_drop(q)
            .await
            .map_err(|e| BackupError::Failed(format!("cannot purge binlogs before {to}: {e}")))?;
        tracing::info!(
            up_to = %to,
            cap_bytes = cap(disk),
            "purged uploaded binlogs over the cap"
        );
    }
    Ok(Some(to))
}

/// Check 9 (`binlog`) as the backup capability contributes it: for MariaDB with backups
/// on, the health capability's finding with the cap and the uploads added (over the cap
/// is critical: the binlogs that are not in the bucket are kept until they are); other
/// engines get the health capability's check unchanged.
pub struct BinlogCheck(pub std::sync::Arc<BackupManager>);

#[async_trait::async_trait]
impl crate::health::Check for BinlogCheck {
    fn id(&self) -> &'static str {
        "binlog"
    }

    async fn run(&self, run: &crate::health::Run) -> crate::health::Finding {
        use dbvm_protocol::health::HealthStatus;
        let base = crate::health::checks::binlog::Binlog.run(run).await;
        let m = &self.0;
        if m.db().flavour() != Some(crate::db::params::Flavour::Mariadb) || !m.maria_configured() {
            return base;
        }
        let Some(&share) = base.figures.get("data_disk_share_pct") else {
            return base;
        };
        let status = m.maria.status.lock().map(|s| s.clone()).unwrap_or_default();
        let capped = BINLOG_CAP_PCT as f64;
        let uploads = if status.consecutive_failures > 0 {
            format!(
                "uploads are FAILING ({} round(s)): {} binlog(s) wait and are kept",
                status.consecutive_failures, status.pending
            )
        } else {
            format!(
                "uploads work: {} waiting, the newest in the bucket {}",
                status.pending,
                status.last_uploaded.as_deref().unwrap_or("none yet")
            )
        };
        let volume = base
            .message
            .split("; ")
            .next()
            .unwrap_or(&base.message)
            .to_string();
        let (level, msg) = if share > capped {
            (
                HealthStatus::Critical,
                format!("binary logs are OVER their cap of {capped:.0}% of the data disk ({share:.1}%): only binlogs already in the bucket are purged, never the others; {uploads}; {volume}"),
            )
        } else {
            (
                if status.consecutive_failures > 0 {
                    HealthStatus::Critical
                } else {
                    base.status
                },
                format!("{volume} (cap {capped:.0}%: older binlogs already in the bucket are purged); {uploads}"),
            )
        };
        let mut f = crate::health::Finding::new(level, msg);
        f.figures = base.figures;
        f.figures.insert("cap_pct".into(), capped);
        f.figures
            .insert("pending_binlogs".into(), status.pending as f64);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(n: &str, s: u64) -> (String, u64) {
        (n.to_string(), s)
    }

    #[test]
    fn only_uploaded_binlogs_go_oldest_first_until_the_rest_fits() {
        let files = vec![f("b.1", 40), f("b.2", 40), f("b.3", 40), f("b.4", 10)];
        let all: BTreeSet<String> = ["b.1", "b.2", "b.3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // 130 bytes, cap 150: over 70% (105), down to 60: b.1 and b.2 go (50 left).
        assert_eq!(purge_to(&files, &all, 150).as_deref(), Some("b.3"));
        // Cap 20: everything uploaded goes, never the file being written.
        assert_eq!(purge_to(&files, &all, 20).as_deref(), Some("b.4"));
        // Under 70% of the cap: nothing.
        assert_eq!(purge_to(&files, &all, 190), None);
        // b.1 is not uploaded: nothing after it goes either (no gaps).
        let some: BTreeSet<String> = ["b.2", "b.3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(purge_to(&files, &some, 20), None);
        assert_eq!(cap(1000), 100);
    }
}
