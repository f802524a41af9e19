//! The cloud bucket: a second copy of the backups for disaster recovery, with its own
//! retention (DSM's *cloud* bucket beside the *local* one). Backups and logs land in the
//! local bucket first; the cloud bucket follows it, so a slow or unreachable cloud never
//! holds up archiving or a backup.
//!
//! - **PostgreSQL**: the cloud is a pgBackRest repository of its own (its config beside
//!   the local one, `pgbackrest-cloud.conf`, 0600). After a local backup, a backup to the
//!   cloud runs when the cloud's newest is older than `backup_every_hours`: its own
//!   chains, expired by its own retention. WAL reaches it by copy: the agent copies the
//!   archived segments from the local repository to the cloud's (objects are immutable,
//!   named by segment and checksum), at most [`COPIES`] at once. pgBackRest's own
//!   multi-repository archiving was not used: `archive-push` then fails for PostgreSQL
//!   while any repository is unreachable, so a cloud outage would stop the local archive
//!   too (pgBackRest's docs: the other repositories get "one WAL segment ahead" without
//!   async archiving).
//! - **MariaDB**: every object a chain's manifest names (backups, binlogs) is copied and
//!   checked against the SHA-256 the manifest recorded; the manifest is copied last, so
//!   the cloud never names an object it lacks. Chains the cloud's retention has expired
//!   are not copied again.
//!
//! Restoring from the cloud is `db.restore` naming the cloud bucket. The copier runs every
//! `[backup] cloud_copy_s` and before a cloud backup; health check 10 says how far behind
//! the cloud is.

use super::s3::S3;
use super::storage::{Location, Storage};
use super::{BackupError, BackupManager};
use crate::db::params::Flavour;
use dbvm_protocol::seal::{Sealed, SealingKey};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// At most this many copies at once (DSM's limit of transaction-log uploads).
pub const COPIES: usize = 5;

/// `backup.configure`'s `cloud` argument.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudArgs {
    pub storage: Location,
    pub access_key_id: Sealed,
    pub secret_access_key: Sealed,
    /// The cloud's own retention (chain expiry = creation + these days).
    #[serde(default = "default_retention")]
    pub retention_days: u32,
    /// PostgreSQL: a backup goes to the cloud after a local one when the cloud's newest is
    /// at least this old; 0: after every local backup.
    #[serde(default = "default_every")]
    pub backup_every_hours: u32,
}

fn default_retention() -> u32 {
    30
}

fn default_every() -> u32 {
    24
}

/// A checked cloud setup with its keys.
#[derive(Debug)]
pub struct Cloud {
    pub storage: Storage,
    pub retention_days: u32,
    pub backup_every_hours: u32,
}

impl CloudArgs {
    /// Checks everything and opens the sealed keys; every problem is named `cloud.…`.
    pub fn open(&self, key: &SealingKey, default_prefix: &str) -> Result<Cloud, String> {
        let mut problems = Vec::new();
        let storage = Storage::open(
            &self.storage,
            &self.access_key_id,
            &self.secret_access_key,
            key,
            default_prefix,
        )
        .map_err(|e| {
            problems.extend(e.lines().map(|l| format!("cloud.{l}")));
        });
        if !(1..=3650).contains(&self.retention_days) {
            problems.push("cloud.retention_days: must be 1..3650".into());
        }
        if self.backup_every_hours > 24 * 366 {
            problems.push("cloud.backup_every_hours: must be 0 (every backup) to 8784".into());
        }
        match storage {
            Ok(storage) if problems.is_empty() => Ok(Cloud {
                storage,
                retention_days: self.retention_days,
                backup_every_hours: self.backup_every_hours,
            }),
            _ => Err(problems.join("\n")),
        }
    }
}

/// The cloud setup as the state file keeps it (no secrets).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CloudState {
    pub location: Value,
    pub retention_days: u32,
    pub backup_every_hours: u32,
    /// PostgreSQL: the oldest WAL segment the cloud's archive kept after its last purge;
    /// older ones are not copied to it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_floor: Option<String>,
}

impl Cloud {
    pub fn state(&self) -> CloudState {
        CloudState {
            location: self.storage.describe(),
            retention_days: self.retention_days,
            backup_every_hours: self.backup_every_hours,
            archive_floor: None,
        }
    }
}

/// What the copier has done, for health check 10 and `backup.list`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyStatus {
    /// Objects in the local bucket not yet in the cloud after the last round.
    pub pending: usize,
    /// Objects copied since the agent started.
    pub copied: u64,
    pub last_round_ms: Option<i64>,
    /// Since when the cloud has been behind (a round left something or failed).
    pub behind_since_ms: Option<i64>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

/// The copier's state in the backup manager.
#[derive(Debug, Default)]
pub struct CloudRuntime {
    pub status: std::sync::Mutex<CopyStatus>,
    /// One copy round at a time (the background task, a cloud backup, a purge).
    round: tokio::sync::Mutex<()>,
}

/// `state_dir/backup/cloud-storage.json` (0600, root's): the local and the cloud storage
/// with their keys, for the copier (pgBackRest keeps its own copies in its configs).
pub fn keys_path(m: &BackupManager) -> PathBuf {
    m.state_path
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("cloud-storage.json")
}

/// pgBackRest's config for the cloud repository.
pub fn pg_config_path(p: &crate::db::engine::Paths) -> PathBuf {
    p.conf.join("pgbackrest-cloud.conf")
}

/// Stores the keys the copier needs.
pub fn save_keys(m: &BackupManager, local: &Storage, cloud: &Storage) -> Result<(), BackupError> {
    super::storage::save_file(&keys_path(m), &[local, cloud]).map_err(BackupError::Failed)
}

/// Forgets the cloud (a `backup.configure` without one): the copier stops.
pub fn forget(m: &BackupManager) -> Result<(), BackupError> {
    for path in [
        keys_path(m),
        pg_config_path(m.db.paths()),
        super::pgbackrest::ca_path(m.db.paths(), "cloud"),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(BackupError::Failed(format!(
                    "cannot remove {}: {e}",
                    path.display()
                )))
            }
        }
    }
    if let Ok(mut s) = m.cloud.status.lock() {
        *s = CopyStatus::default();
    }
    Ok(())
}

fn load_keys(m: &BackupManager) -> Result<Option<(Storage, Storage)>, BackupError> {
    let Some(mut v) = super::storage::load_file(&keys_path(m)).map_err(BackupError::Failed)? else {
        return Ok(None);
    };
    if v.len() != 2 {
        return Err(BackupError::Failed(format!(
            "{} is damaged (it should hold two storages): send backup.configure again",
            keys_path(m).display()
        )));
    }
    let cloud = v.pop();
    let local = v.pop();
    Ok(local.zip(cloud))
}

fn client(m: &BackupManager, s: &Storage) -> Result<S3, BackupError> {
    S3::new(&s.endpoint(), Duration::from_secs(m.settings.io_timeout_s))
        .map_err(|e| BackupError::Invalid(e.to_string()))
}

/// Proves the cloud bucket with its keys before anything depends on it (MariaDB; for
/// PostgreSQL, pgBackRest's `stanza-create` on the cloud's config proves it).
pub async fn prove(m: &BackupManager, cloud: &Storage) -> Result<(), BackupError> {
    client(m, cloud)?
        .prove(&m.agent_id)
        .await
        .map_err(|e| BackupError::Failed(format!("the cloud bucket: {e}")))
}

/// The copier's turn: held by a round, and by a purge of the cloud bucket (which would
/// otherwise take a chain's objects copied before its manifest for a cut-off purge's
/// leftovers).
pub async fn turn(m: &BackupManager) -> tokio::sync::MutexGuard<'_, ()> {
    m.cloud.round.lock().await
}

/// One copy round: everything the local bucket has that the cloud lacks goes over.
/// Returns how many objects were copied; a VM without a cloud copies nothing.
pub async fn round(m: &BackupManager) -> Result<usize, BackupError> {
    let _turn = m.cloud.round.lock().await;
    let Some(state) = m.load()? else {
        return Ok(0);
    };
    let (Some(cs), Some((local, cloud))) = (state.cloud, load_keys(m)?) else {
        return Ok(0);
    };
    let (l, c) = (client(m, &local)?, client(m, &cloud)?);
    let result = match m.db.flavour() {
        Some(Flavour::Mariadb) => maria_round(&l, &c, cs.retention_days).await,
        _ => pg_round(&l, &c, cs.archive_floor.as_deref()).await,
    };
    let now = dbvm_protocol::now_ms();
    if let Ok(mut s) = m.cloud.status.lock() {
        s.last_round_ms = Some(now);
        match &result {
            Ok((copied, left)) => {
                s.copied += *copied as u64;
                s.pending = *left;
                s.consecutive_failures = 0;
                s.last_error = None;
                s.behind_since_ms = if *left == 0 {
                    None
                } else {
                    s.behind_since_ms.or(Some(now))
                };
            }
            Err(e) => {
                s.consecutive_failures += 1;
                s.last_error = Some(e.to_string());
                s.behind_since_ms = s.behind_since_ms.or(Some(now));
            }
        }
    }
    result.map(|(copied, _)| copied)
}

/// pgBackRest's WAL archive, under the repository's prefix.
const ARCHIVE: &str = "archive/";

/// Copies the archived WAL segments (and timeline history files) the cloud lacks; the
/// archive's `archive.info` is the cloud's own (`stanza-create` wrote it).
async fn pg_round(
    local: &S3,
    cloud: &S3,
    floor: Option<&str>,
) -> Result<(usize, usize), BackupError> {
    let there: std::collections::HashSet<String> = cloud
        .list(ARCHIVE)
        .await
        .map_err(|e| BackupError::Failed(format!("the cloud bucket: {e}")))?
        .into_iter()
        .map(|l| l.name)
        .collect();
    let todo: Vec<String> = local
        .list(ARCHIVE)
        .await
        .map_err(|e| BackupError::Failed(format!("the local bucket: {e}")))?
        .into_iter()
        .map(|l| l.name)
        .filter(|n| {
            let file = n.rsplit('/').next().unwrap_or("");
            !file.starts_with("archive.info")
                && !there.contains(n)
                && floor.is_none_or(|f| file >= f)
        })
        .collect();
    let total = todo.len();
    let copied = copy_all(local, cloud, todo.into_iter().map(|n| (n, None)).collect()).await;
    match copied {
        Ok(n) => Ok((n, total - n)),
        Err(e) => Err(e),
    }
}

/// MariaDB: each chain's objects, checked against its manifest, then the manifest.
async fn maria_round(
    local: &S3,
    cloud: &S3,
    retention_days: u32,
) -> Result<(usize, usize), BackupError> {
    let manifests = super::mariabackup::manifests(local)
        .await
        .map_err(|e| BackupError::Failed(format!("the local bucket: {e}")))?;
    let there: HashMap<String, u64> = cloud
        .list("chains/")
        .await
        .map_err(|e| BackupError::Failed(format!("the cloud bucket: {e}")))?
        .into_iter()
        .map(|l| (l.name, l.size))
        .collect();
    let now = dbvm_protocol::now_ms();
    let newest = manifests.last().map(|c| c.chain.clone());
    let mut copied = 0;
    // No manifest lock: the local manifests were read whole, each names only objects that
    // were stored before it, and objects never change; a copy of a large backup must not
    // stop the binlog uploader. Only the copier writes the cloud's manifests, and the
    // cloud's purge waits for the copier's turn ([`turn`]).
    for man in &manifests {
        // A chain the cloud's retention has expired is not brought back (the cloud's
        // purger removed it, or would); the newest chain always goes.
        let last = man.backups.last().map_or(man.created_ms, |b| b.started_ms);
        if Some(&man.chain) != newest.as_ref()
            && last + i64::from(retention_days) * super::day_ms() <= now
        {
            continue;
        }
        let objects: Vec<(String, Option<String>)> = man
            .backups
            .iter()
            .map(|b| (b.key.clone(), b.size, b.sha256.clone()))
            .chain(
                man.binlogs
                    .iter()
                    .map(|b| (b.key.clone(), b.size, b.sha256.clone())),
            )
            .filter(|(key, size, _)| there.get(key) != Some(size))
            .map(|(key, _, sha)| (key, Some(sha)))
            .collect();
        copied += copy_all(local, cloud, objects).await?;
        let key = super::mariabackup::manifest_key(&man.chain);
        let bytes = serde_json::to_vec_pretty(man)
            .map_err(|e| BackupError::Failed(format!("cannot encode the manifest: {e}")))?;
        let current = cloud
            .get(&key)
            .await
            .map_err(|e| BackupError::Failed(format!("the cloud bucket: {e}")))?;
        if current.as_deref() != Some(bytes.as_slice()) {
            cloud
                .put(&key, bytes)
                .await
                .map_err(|e| BackupError::Failed(format!("the cloud bucket: {e}")))?;
            copied += 1;
        }
    }
    Ok((copied, 0))
}

/// Copies `objects` (name, and the SHA-256 it must have when known), [`COPIES`] at once;
/// stops at the first failure. Returns how many were copied.
async fn copy_all(
    from: &S3,
    to: &S3,
    objects: Vec<(String, Option<String>)>,
) -> Result<usize, BackupError> {
    futures::stream::iter(objects)
        .map(|(name, sha): (String, Option<String>)| async move {
            copy(from, to, &name, sha.as_deref()).await
        })
        .buffer_unordered(COPIES)
        .try_fold(0usize, |n, ()| async move { Ok(n + 1) })
        .await
}

/// Streams one object from `from` to `to` (memory stays bounded whatever its size) and
/// proves the copy: the bytes read must have the SHA-256 `want` when given, and the
/// stored copy the SHA-256 of what was read; a copy that does not is deleted.
async fn copy(from: &S3, to: &S3, name: &str, want: Option<&str>) -> Result<(), BackupError> {
    let (mut w, r) = tokio::io::duplex(1 << 20);
    let down = async move {
        let got = from.download(name, &mut w, want).await;
        // The upload sees the end of the stream only once this end is gone.
        drop(w);
        got
    };
    let up = async move {
        let mut r = r;
        // Dropping the reader when the upload ends makes a download still writing stop.
        to.upload(name, &mut r).await
    };
    let (got, stored) = tokio::join!(down, up);
    let bad = match (&got, &stored) {
        (Ok(g), Ok(s)) if g.sha256 == s.sha256 && g.size == s.size => None,
        (Err(e), _) => Some(format!("the local bucket: {e}")),
        (_, Err(e)) => Some(format!("the cloud bucket: {e}")),
        (Ok(g), Ok(s)) => Some(format!(
            "the copy of {name} in the cloud bucket is not what was read ({} bytes, SHA-256 {} read; {} bytes, SHA-256 {} stored)",
            g.size, g.sha256, s.size, s.sha256
        )),
    };
    match bad {
        None => Ok(()),
        Some(why) => {
            // A copy that is not proven is not left to look like one.
            if stored.is_ok() {
                let _ = to.delete(name).await;
            }
            Err(BackupError::Failed(why))
        }
    }
}

/// The copier: a round every `[backup] cloud_copy_s` while a cloud is configured, until
/// `stop` is cancelled. Failures are counted for health check 10 and logged.
pub async fn task(m: Arc<BackupManager>, stop: tokio_util::sync::CancellationToken) {
    let every = Duration::from_secs(m.settings.cloud_copy_s);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if !keys_path(&m).exists() {
            continue;
        }
        match round(&m).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(copied = n, "copied to the cloud bucket"),
            Err(e) => tracing::warn!(error = %e, "copy to the cloud bucket failed"),
        }
    }
}

/// Check 10's figures for the cloud copy (`cloud_pending`, `cloud_behind_s`,
/// `cloud_failures`): a cloud falling behind is a warning (the local bucket still has
/// everything: nothing is lost yet, but the disaster copy is not current), critical once
/// it has been behind for `critical_s`.
pub fn with_cloud(
    mut f: crate::health::Finding,
    status: &CopyStatus,
    now_ms: i64,
    warning_s: f64,
    critical_s: f64,
) -> crate::health::Finding {
    use dbvm_protocol::health::HealthStatus;
    let behind_s = status
        .behind_since_ms
        .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
    f.figures
        .insert("cloud_pending".into(), status.pending as f64);
    f.figures.insert("cloud_behind_s".into(), behind_s);
    f.figures.insert(
        "cloud_failures".into(),
        f64::from(status.consecutive_failures),
    );
    let level = if behind_s >= critical_s {
        HealthStatus::Critical
    } else if status.consecutive_failures > 0 || behind_s >= warning_s {
        HealthStatus::Warning
    } else {
        HealthStatus::Ok
    };
    if level != HealthStatus::Ok {
        f.status = f.status.max(level);
        f.message = match &status.last_error {
            Some(e) => format!(
                "{}; the cloud copy is {behind_s:.0} s behind: the last {} copy round(s) failed: {e}",
                f.message, status.consecutive_failures
            ),
            None => format!(
                "{}; the cloud copy is {behind_s:.0} s behind ({} object(s) wait)",
                f.message, status.pending
            ),
        };
    }
    f
}

/// The cloud's part of `backup.list` for MariaDB: its chains and window, from its own
/// manifests.
pub async fn maria_list(m: &BackupManager, cs: &CloudState) -> Value {
    let copy = m.cloud.status.lock().map(|s| s.clone()).unwrap_or_default();
    let listing = async {
        let (_, cloud) = load_keys(m)?.ok_or_else(|| {
            BackupError::Invalid("the cloud's keys are not stored: send backup.configure".into())
        })?;
        super::mariabackup::manifests(&client(m, &cloud)?).await
    };
    match listing.await {
        Ok(all) => json!({
            "location": cs.location,
            "retention_days": cs.retention_days,
            "status": {"reachable": true},
            "chains": super::chains(&super::mariabackup::as_sets(&all), cs.retention_days),
            "recoverable": super::manifest::window(&all).map(|w| json!({"from_ms": w.from_ms, "to_ms": w.to_ms})),
            "copy": copy,
        }),
        Err(e) => json!({
            "location": cs.location,
            "retention_days": cs.retention_days,
            "status": {"reachable": false, "message": e.to_string()},
            "copy": copy,
        }),
    }
}

/// The cloud's keys, for a purge of the cloud bucket (MariaDB).
pub fn cloud_storage(m: &BackupManager) -> Result<Option<Storage>, BackupError> {
    Ok(load_keys(m)?.map(|(_, c)| c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Finding;
    use dbvm_protocol::health::HealthStatus;

    #[test]
    fn a_cloud_behind_is_a_warning_then_critical_and_says_why() {
        let f = || Finding::new(HealthStatus::Ok, "archiving works");
        let mut s = CopyStatus::default();
        let ok = with_cloud(f(), &s, 1_000_000, 900.0, 3600.0);
        assert_eq!(ok.status, HealthStatus::Ok);
        assert_eq!(ok.figures["cloud_behind_s"], 0.0);
        s.consecutive_failures = 2;
        s.last_error = Some("the cloud bucket: unreachable".into());
        s.behind_since_ms = Some(1_000_000 - 10_000);
        let w = with_cloud(f(), &s, 1_000_000, 900.0, 3600.0);
        assert_eq!(w.status, HealthStatus::Warning);
        assert!(w.message.contains("unreachable"), "{}", w.message);
        assert_eq!(w.figures["cloud_behind_s"], 10.0);
        s.behind_since_ms = Some(1_000_000 - 4_000_000);
        let c = with_cloud(f(), &s, 1_000_000, 900.0, 3600.0);
        assert_eq!(c.status, HealthStatus::Critical);
    }
}
