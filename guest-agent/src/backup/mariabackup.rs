//! MariaDB backups: mariabackup's xbstream, compressed with zstd, streamed straight to S3
//! by the agent's own client ([`super::s3`]) — no full local copy — and the binlogs
//! uploaded as they rotate, all recorded in a manifest per chain ([`super::manifest`]).
//!
//! The tool runs in a one-shot container of the database's image
//! ([`crate::db::DbManager::run_tool`]) as the database user: `mariadb-backup --stream |
//! zstd` writes into a FIFO the agent made in the data root (a bind mount both see), and the
//! agent reads the FIFO into a multipart upload. mariabackup logs in as the `mysql` user
//! over the server's socket with unix_socket authentication (`mariadb-install-db`, run as
//! that OS user, makes it): no password anywhere.
//!
//! The S3 keys are kept only in `state_dir/backup/mariadb-storage.json` (0600, root's,
//! outside the data root the containers see): never in argv, logs, results or the state
//! file.

use super::manifest::{self, Backup, Binlog, Manifest};
use super::s3::{S3Error, S3};
use super::storage::Storage;
use super::{BackupError, BackupManager, BackupState, Progress, RunKind};
use crate::db::engine::{Admin, Paths};
use crate::db::params::Flavour;
use crate::db::DbState;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most this many binlog uploads at once (DSM's limit of transaction-log uploads).
pub const BINLOG_UPLOADS: usize = 5;

impl From<S3Error> for BackupError {
    fn from(e: S3Error) -> Self {
        BackupError::Failed(e.to_string())
    }
}

/// What the binlog uploader has done, for health checks 9 and 10 and `backup.list`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BinlogStatus {
    /// Whether the uploader has a storage to upload to.
    pub configured: bool,
    /// Rotated binlogs not yet in the bucket.
    pub pending: usize,
    pub last_uploaded: Option<String>,
    pub last_uploaded_ms: Option<i64>,
    /// The last event time of the newest binlog in the bucket.
    pub newest_event_ms: Option<i64>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub last_round_ms: Option<i64>,
}

/// MariaDB's part of the backup manager's state.
#[derive(Debug, Default)]
pub struct MariaState {
    pub status: std::sync::Mutex<BinlogStatus>,
    /// Held while a manifest is read, changed and written (a backup, a binlog round).
    pub manifest_lock: tokio::sync::Mutex<()>,
    /// The binlog being written and its size right after the last rotation: while they
    /// stay the same the server wrote nothing, and no empty binlog is made.
    last_rotation: std::sync::Mutex<Option<(String, u64)>>,
}

/// Health check 10 for MariaDB: how far the newest binlog in the bucket is behind.
pub fn mysql_cloud_sync(
    status: &BinlogStatus,
    now_ms: i64,
    warning_s: f64,
    critical_s: f64,
) -> crate::health::Finding {
    use crate::health::Finding;
    use dbvm_protocol::health::HealthStatus;
    if !status.configured {
        return Finding::unknown(
            "no binlog upload is configured on this VM (send backup.configure): the newest log off the VM is unknown",
        );
    }
    let age_s = status
        .newest_event_ms
        .map(|t| (now_ms - t).max(0) as f64 / 1000.0);
    let behind = if status.pending == 0 && status.consecutive_failures == 0 {
        0.0
    } else {
        age_s.unwrap_or(f64::INFINITY)
    };
    let mut level = if behind >= critical_s {
        HealthStatus::Critical
    } else if behind >= warning_s {
        HealthStatus::Warning
    } else {
        HealthStatus::Ok
    };
    // Failing uploads mean nothing reaches the bucket now: the point a restore can reach
    // stops moving (as PostgreSQL's failing archive_command is).
    if status.consecutive_failures > 0 {
        level = HealthStatus::Critical;
    }
    let msg = match &status.last_error {
        Some(e) if status.consecutive_failures > 0 => format!(
            "{} binlog(s) wait; the last {} upload round(s) failed: {e}",
            status.pending, status.consecutive_failures
        ),
        _ if status.pending > 0 => format!("{} binlog(s) wait for upload", status.pending),
        _ => "every rotated binlog is in the bucket".to_string(),
    };
    Finding::new(level, msg)
        .figure("pending_binlogs", status.pending as f64)
        .figure("behind_s", behind)
        .figure("failures", f64::from(status.consecutive_failures))
}

/// Check 10 (`binlog_cloud_sync`) as the backup capability contributes it: MariaDB's from
/// the uploader's status ([`mysql_cloud_sync`]); other engines get the health
/// capability's own check unchanged.
pub struct CloudSyncCheck(pub Arc<BackupManager>);

#[async_trait::async_trait]
impl crate::health::Check for CloudSyncCheck {
    fn id(&self) -> &'static str {
        "binlog_cloud_sync"
    }

    async fn run(&self, run: &crate::health::Run) -> crate::health::Finding {
        let f = self.sync(run).await;
        let state = self.0.load().ok().flatten();
        let cloud = state.as_ref().is_some_and(|s| s.cloud.is_some());
        let f = with_drill(f, state.and_then(|s| s.last_verify));
        if !cloud {
            return f;
        }
        let t = &run.settings().thresholds;
        let status = self
            .0
            .cloud
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        super::cloud::with_cloud(
            f,
            &status,
            dbvm_protocol::now_ms(),
            t.archive_warning_s as f64,
            t.archive_critical_s as f64,
        )
    }
}

/// The last restore drill's result as figures of check 10 (`drill_ok`, `drill_age_s`); a
/// failed drill makes it at least a warning and says why.
fn with_drill(mut f: crate::health::Finding, last: Option<Value>) -> crate::health::Finding {
    use dbvm_protocol::health::HealthStatus;
    let Some(v) = last else { return f };
    let ok = v["ok"] == true;
    let age_s = v["at_ms"].as_i64().map_or(f64::NAN, |at| {
        (dbvm_protocol::now_ms() - at).max(0) as f64 / 1000.0
    });
    f.figures.insert("drill_ok".into(), f64::from(u8::from(ok)));
    f.figures.insert("drill_age_s".into(), age_s);
    if !ok {
        f.status = f.status.max(HealthStatus::Warning);
        f.message = format!(
            "{}; the last restore drill FAILED: {}",
            f.message,
            v["reason"].as_str().unwrap_or("see backup.verify")
        );
    }
    f
}

impl CloudSyncCheck {
    async fn sync(&self, run: &crate::health::Run) -> crate::health::Finding {
        use crate::health::Check;
        if self.0.db.flavour() != Some(Flavour::Mariadb) {
            return crate::health::checks::cloud_sync::CloudSync.run(run).await;
        }
        let t = &run.settings().thresholds;
        let mut status = self
            .0
            .maria
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        // Configured before the uploader's first round after a restart.
        status.configured |= storage_path(&self.0).exists();
        mysql_cloud_sync(
            &status,
            dbvm_protocol::now_ms(),
            t.archive_warning_s as f64,
            t.archive_critical_s as f64,
        )
    }
}

impl BackupManager {
    /// Whether MariaDB's backups are configured on this VM (its storage is stored).
    pub fn maria_configured(&self) -> bool {
        storage_path(self).exists()
    }
}

// ----- the stored storage ---------------------------------------------------------------

fn storage_path(m: &BackupManager) -> PathBuf {
    m.state_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("mariadb-storage.json")
}

fn save_storage(m: &BackupManager, s: &Storage) -> Result<(), BackupError> {
    super::storage::save_file(&storage_path(m), &[s]).map_err(BackupError::Failed)
}

pub(super) fn load_storage(m: &BackupManager) -> Result<Option<Storage>, BackupError> {
    Ok(super::storage::load_file(&storage_path(m))
        .map_err(BackupError::Failed)?
        .and_then(|mut v| v.drain(..).next()))
}

fn client(m: &BackupManager, s: &Storage) -> Result<S3, BackupError> {
    S3::new(&s.endpoint(), Duration::from_secs(m.settings.io_timeout_s))
        .map_err(|e| BackupError::Invalid(e.to_string()))
}

async fn mariadb(m: &BackupManager) -> Result<DbState, BackupError> {
    let st = m.db.configured_state().await?;
    match st.spec.engine {
        Flavour::Mariadb => Ok(st),
        other => Err(BackupError::Invalid(format!(
            "this path backs up MariaDB; this database is {}",
            format!("{other:?}").to_lowercase()
        ))),
    }
}

// ----- manifests in the bucket ----------------------------------------------------------

pub fn manifest_key(chain: &str) -> String {
    format!("chains/{chain}/manifest.json")
}

/// Every chain's manifest under the prefix, oldest chain first.
pub async fn manifests(s3: &S3) -> Result<Vec<Manifest>, BackupError> {
    let mut names: Vec<String> = s3
        .list("chains/")
        .await?
        .into_iter()
        .map(|l| l.name)
        .filter(|n| n.ends_with("/manifest.json"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let Some(bytes) = s3.get(&n).await? else {
            continue;
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            BackupError::Failed(format!(
                "the manifest s3://{}/{} is damaged ({e}): its chain cannot be used",
                s3.bucket,
                s3.key(&n)
            ))
        })?;
        out.push(m);
    }
    Ok(out)
}

async fn write_manifest(s3: &S3, m: &Manifest) -> Result<(), BackupError> {
    let bytes = serde_json::to_vec_pretty(m)
        .map_err(|e| BackupError::Failed(format!("cannot encode the manifest: {e}")))?;
    s3.put(&manifest_key(&m.chain), bytes).await?;
    Ok(())
}

/// A manifest's backups as pgBackRest's listing has them, for [`super::choose`] and
/// [`super::chains`].
pub fn as_sets(ms: &[Manifest]) -> Vec<super::pgbackrest::BackupSet> {
    ms.iter()
        .flat_map(|m| m.backups.iter())
        .map(|b| super::pgbackrest::BackupSet {
            label: b.label.clone(),
            kind: b.kind.clone(),
            prior: None,
            started_ms: b.started_ms,
            stopped_ms: b.stopped_ms,
            size_bytes: b.size,
            repo_size_bytes: b.size,
            wal_start: b.binlog_file.clone(),
            wal_stop: None,
            error: false,
        })
        .collect()
}

/// `20261203T204500Z` (UTC, seconds): labels sort as times do.
fn label(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

// ----- FIFOs shared with the one-shot container ------------------------------------------

/// A FIFO in the data root, owned by the database user (mode 0600).
pub fn make_fifo(path: &Path, uid: u32, gid: u32) -> Result<(), BackupError> {
    let _ = std::fs::remove_file(path);
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(|e| {
        BackupError::Failed(format!("cannot make the FIFO {}: {e}", path.display()))
    })?;
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| BackupError::Failed(format!("cannot chown {}: {e}", path.display())))
}

/// Opens a FIFO end, waiting for the other side (in a blocking thread: `open` of a FIFO
/// blocks until both ends are there). See [`unblock_fifo`] for when the other side never
/// comes.
pub async fn open_fifo(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .open(&path)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Opens and drops the other end of a FIFO without blocking, so that an [`open_fifo`]
/// still waiting returns (and then sees end-of-file or a broken pipe): what the agent does
/// when the container exited without opening its end.
pub fn unblock_fifo(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    for write in [false, true] {
        let _ = std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
    }
}

/// Single-quotes a word for `sh -c`.
pub fn sh_quote(w: &str) -> String {
    format!("'{}'", w.replace('\'', "'\\''"))
}

// ----- configure and run -----------------------------------------------------------------

/// The account mariabackup and the binlog replay log in with: `mysql@localhost`, reachable
/// only by the OS user `mysql` (the database user, uid 999 in the image, which owns the
/// data files anyway) over the server's socket with unix_socket authentication: no
/// password exists to leak. It is in every backup, so a restored server has it too.
async fn ensure_tool_user(m: &BackupManager, st: &DbState) -> Result<(), BackupError> {
    let mut admin = Admin::connect(&st.spec, m.db.paths()).await?;
    if let Admin::Mysql(c) = &mut admin {
        use mysql_async::prelude::Queryable;
        c.query_drop(
            "CREATE USER IF NOT EXISTS 'mysql'@'localhost' IDENTIFIED VIA unix_socket; \
             GRANT ALL PRIVILEGES ON *.* TO 'mysql'@'localhost'",
        )
        .await
        .map_err(|e| {
            BackupError::Failed(format!(
                "cannot create the backup account mysql@localhost (unix_socket): {e}"
            ))
        })?;
    }
    Ok(())
}

/// `backup.configure` for MariaDB: proves the bucket with the new keys (a marker written,
/// read back and deleted under the prefix) before the stored setup is replaced.
pub async fn configure(
    m: &BackupManager,
    storage: Storage,
    retention_days: u32,
    cloud: Option<super::cloud::Cloud>,
    progress: Progress<'_>,
) -> Result<Value, BackupError> {
    if !(1..=3650).contains(&retention_days) {
        return Err(BackupError::Invalid(
            "retention_days: must be 1..3650".into(),
        ));
    }
    let st = mariadb(m).await?;
    let _busy = m.busy.lock().await;
    let t = Instant::now();
    progress(10, "checking the bucket with the new keys");
    let s3 = client(m, &storage)?;
    s3.prove(&m.agent_id).await?;
    if let Some(c) = &cloud {
        progress(30, "checking the cloud bucket with its keys");
        super::cloud::prove(m, &c.storage).await?;
    }
    ensure_tool_user(m, &st).await?;
    progress(60, "storing the setup");
    save_storage(m, &storage)?;
    match &cloud {
        Some(c) => super::cloud::save_keys(m, &storage, &c.storage)?,
        None => super::cloud::forget(m)?,
    }
    let state = BackupState {
        location: storage.describe(),
        retention_days,
        configured_at_ms: dbvm_protocol::now_ms(),
        last_verify: None,
        cloud: cloud.as_ref().map(super::cloud::Cloud::state),
    };
    m.save(&state)?;
    if let Ok(mut s) = m.maria.status.lock() {
        s.configured = true;
    }
    progress(100, "backups configured");
    Ok(json!({
        "engine": "mariadb",
        "location": state.location,
        "retention_days": retention_days,
        "cloud": state.cloud,
        "check": "ok",
        "binlog_rotate_s": m.settings.binlog_rotate_s,
        "took_ms": t.elapsed().as_millis() as u64,
    }))
}

/// `backup.run` for MariaDB.
pub async fn run(
    m: &BackupManager,
    kind: RunKind,
    progress: Progress<'_>,
) -> Result<Value, BackupError> {
    let st = mariadb(m).await?;
    let state = m.configured()?;
    let storage = load_storage(m)?.ok_or_else(|| {
        BackupError::Invalid(
            "backups are not configured on this VM (send backup.configure first)".into(),
        )
    })?;
    let s3 = client(m, &storage)?;
    let _busy = m.busy.lock().await;
    // No binlog round rewrites a manifest while the backup runs.
    let _manifest = m.maria.manifest_lock.lock().await;
    let t = Instant::now();
    ensure_tool_user(m, &st).await?;
    progress(5, "reading the chains in the bucket");
    let mut all = manifests(&s3).await.map_err(|e| {
        BackupError::Failed(format!(
            "the bucket cannot be read: {e}; nothing was backed up"
        ))
    })?;
    let now = dbvm_protocol::now_ms();
    let (kind, why) = if super::maria_recover::new_chain_needed(m) {
        ("full", super::maria_recover::NEW_CHAIN_WHY.to_string())
    } else {
        super::choose(kind, &as_sets(&all), state.retention_days, now)
    };
    let lbl = label(now);
    let mut current = match (kind, all.pop()) {
        ("incr", Some(c)) => c,
        _ => Manifest {
            version: manifest::VERSION,
            engine: "mariadb".into(),
            chain: lbl.clone(),
            created_ms: now,
            backups: Vec::new(),
            binlogs: Vec::new(),
        },
    };
    let from_lsn = match kind {
        "incr" => current.backups.last().map(|b| b.to_lsn).unwrap_or(0),
        _ => 0,
    };
    let key = format!(
        "chains/{}/{lbl}-{}.xbs.zst",
        current.chain,
        if kind == "full" { "F" } else { "I" }
    );
    progress(10, &format!("{kind} backup starting ({why})"));

    let p = m.db.paths().clone();
    let (uid, gid) = (m.db.settings().uid, m.db.settings().gid);
    let work = p.run.join("backup");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)
        .map_err(|e| BackupError::Failed(format!("cannot create {}: {e}", work.display())))?;
    nix::unistd::chown(
        &work,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| BackupError::Failed(format!("cannot chown {}: {e}", work.display())))?;
    let fifo = work.join("stream");
    make_fifo(&fifo, uid, gid)?;
    let lsndir = work.join("lsn");
    let config = p.main_config(Flavour::Mariadb);
    let started = dbvm_protocol::now_ms();

    let tool = async {
        let r =
            m.db.run_tool(
                &st,
                "backup",
                |program| backup_argv(program, &config, &p, &lsndir, &fifo, from_lsn),
                Duration::from_secs(m.settings.timeout_s),
            )
            .await;
        // The container is gone: a reader still waiting for it must not wait forever.
        unblock_fifo(&fifo);
        (r, Instant::now())
    };
    let upload = async {
        let file = open_fifo(&fifo, false).await.map_err(|e| {
            BackupError::Failed(format!(
                "cannot open the backup stream {}: {e}",
                fifo.display()
            ))
        })?;
        let mut rx = tokio::net::unix::pipe::Receiver::from_file(file).map_err(|e| {
            BackupError::Failed(format!(
                "cannot read the backup stream {}: {e}",
                fifo.display()
            ))
        })?;
        // On failure the receiver is dropped here, so the writer in the container gets a
        // broken pipe and the backup ends instead of waiting.
        Ok::<_, BackupError>(s3.upload(&key, &mut rx).await?)
    };
    let streaming = Instant::now();
    let ((out, tool_done), stored) = tokio::join!(tool, upload);
    // Where the time went: the container (mariabackup | zstd, its start included) and
    // what the upload still needed after the stream ended (the last part, completion).
    let container_ms = tool_done.duration_since(streaming).as_millis() as u64;
    let upload_tail_ms = tool_done.elapsed().as_millis() as u64;
    let out = out?;
    let stopped = dbvm_protocol::now_ms();
    let tail = |s: &str| {
        let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    };
    if out.exit_code != 0 || !out.stdout.contains(STREAM_DONE) {
        // A cut stream may have been stored whole: it must not look like a backup.
        if stored.is_ok() {
            let _ = s3.delete(&key).await;
        }
        let up = match &stored {
            Err(e) => format!("; the upload: {e}"),
            Ok(_) => String::new(),
        };
        return Err(BackupError::Failed(format!(
            "mariabackup failed (exit code {}){up}; the chain is unchanged:\n{}",
            out.exit_code,
            tail(&out.stderr)
        )));
    }
    let stored = stored.map_err(|e| {
        BackupError::Failed(format!(
            "{e}; nothing was recorded and the chain is unchanged"
        ))
    })?;
    progress(90, "recording the backup in the chain's manifest");
    let read = |name: &str| {
        std::fs::read_to_string(lsndir.join(name)).map_err(|e| {
            BackupError::Failed(format!(
                "mariabackup left no {name} in {}: {e}",
                lsndir.display()
            ))
        })
    };
    let (lsn_from, to_lsn) = manifest::parse_checkpoints(&read("xtrabackup_checkpoints")?)
        .map_err(BackupError::Failed)?;
    let (binlog_file, binlog_pos, gtid) =
        manifest::parse_binlog_pos(&read("xtrabackup_info").unwrap_or_default());
    let b = Backup {
        label: lbl.clone(),
        kind: kind.to_string(),
        key: key.clone(),
        size: stored.size,
        sha256: stored.sha256.clone(),
        from_lsn: lsn_from,
        to_lsn,
        binlog_file,
        binlog_pos,
        gtid,
        started_ms: started,
        stopped_ms: stopped,
    };
    current.backups.push(b.clone());
    if let Err(e) = write_manifest(&s3, &current).await {
        let _ = s3.delete(&key).await;
        return Err(BackupError::Failed(format!(
            "the backup was stored but its manifest could not be written ({e}); the backup was removed and the chain is unchanged"
        )));
    }
    if kind == "full" {
        super::maria_recover::new_chain_started(m);
    }
    let _ = std::fs::remove_dir_all(&work);
    let chain = super::chains(
        &as_sets(std::slice::from_ref(&current)),
        state.retention_days,
    )
    .into_iter()
    .next();
    let took = t.elapsed();
    Ok(json!({
        "label": lbl,
        "type": kind,
        "why": why,
        "chain": chain.map(|c| json!({"full": c.full, "created_ms": c.created_ms, "expires_ms": c.expires_ms, "backups": c.backups.len()})),
        "object": s3.key(&key),
        "size_bytes": stored.size,
        "sha256": stored.sha256,
        "from_lsn": b.from_lsn,
        "to_lsn": b.to_lsn,
        "binlog_file": b.binlog_file,
        "binlog_pos": b.binlog_pos,
        "gtid": b.gtid,
        "started_ms": started,
        "stopped_ms": stopped,
        "took_ms": took.as_millis() as u64,
        "container_ms": container_ms,
        "upload_tail_ms": upload_tail_ms,
        "upload_mib_s": (stored.size as f64 / 1048576.0) / took.as_secs_f64().max(0.001),
    }))
}

/// Printed by the backup script once the pipeline succeeded.
const STREAM_DONE: &str = "dbvm: stream done";

/// `sh -c 'set -o pipefail; mariadb-backup --backup --stream=xbstream … | zstd -3 -T2 > FIFO'`.
fn backup_argv(
    program: &dyn Fn(&str) -> String,
    config: &Path,
    p: &Paths,
    lsndir: &Path,
    fifo: &Path,
    from_lsn: u64,
) -> Vec<String> {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let mut backup = vec![
        sh_quote(&program("mariadb-backup")),
        sh_quote(&format!("--defaults-file={}", config.display())),
        "--backup".into(),
        "--stream=xbstream".into(),
        "--user=mysql".into(),
        sh_quote(&format!("--socket={}", p.mysql_socket().display())),
        sh_quote(&format!("--target-dir={}", lsndir.display())),
        sh_quote(&format!("--extra-lsndir={}", lsndir.display())),
    ];
    if from_lsn > 0 {
        backup.push(format!("--incremental-lsn={from_lsn}"));
    }
    vec![
        program("sh"),
        "-c".into(),
        format!(
            "set -o pipefail; mkdir -p {lsn} && {backup} | {zstd} -3 -T2 -q > {fifo} && echo '{STREAM_DONE}'",
            lsn = q(lsndir),
            backup = backup.join(" "),
            zstd = sh_quote(&program("zstd")),
            fifo = q(fifo),
        ),
    ]
}

/// `backup.purge` for MariaDB: the chains whose last backup has expired go, never the
/// newest ([`super::purge::plan`]). A chain's manifest goes first — a chain without one is
/// never restored from — then its backups and the binlogs only it lists; what a purge cut
/// off left behind (objects of a chain with no manifest) goes on the next one.
pub async fn purge(m: &BackupManager, progress: super::Progress<'_>) -> Result<Value, BackupError> {
    let _st = mariadb(m).await?;
    let state = m.configured()?;
    let storage = load_storage(m)?.ok_or_else(|| {
        BackupError::Invalid(
            "backups are not configured on this VM (send backup.configure first)".into(),
        )
    })?;
    let s3 = client(m, &storage)?;
    let t = std::time::Instant::now();
    // No backup or binlog round writes a manifest meanwhile.
    let _manifest = m.maria.manifest_lock.lock().await;
    let mut out = purge_bucket(&s3, state.retention_days, "", progress).await?;
    if let Some(cs) = &state.cloud {
        // The cloud by its own retention; its failure is reported beside the local
        // purge, which stays done.
        let _turn = super::cloud::turn(m).await;
        let cloud = match super::cloud::cloud_storage(m)? {
            Some(c) => purge_bucket(&client(m, &c)?, cs.retention_days, "the cloud's ", progress)
                .await
                .unwrap_or_else(|e| json!({"error": e.to_string()})),
            None => {
                json!({"error": "the cloud's keys are not stored: send backup.configure again"})
            }
        };
        out["cloud"] = cloud;
    }
    progress(100, "purge done");
    out["took_ms"] = json!(t.elapsed().as_millis() as u64);
    Ok(out)
}

/// Purges one bucket by `retention_days`; `whose` names it in messages.
async fn purge_bucket(
    s3: &S3,
    retention_days: u32,
    whose: &str,
    progress: super::Progress<'_>,
) -> Result<Value, BackupError> {
    progress(10, &format!("reading {whose}chains' manifests"));
    let all = manifests(s3)
        .await
        .map_err(|e| BackupError::Failed(format!("{whose}{e}; nothing was purged")))?;
    let chains = super::chains(&as_sets(&all), retention_days);
    let plan = super::purge::plan(&chains, retention_days, dbvm_protocol::now_ms());
    let mut purged = Vec::new();
    let so_far = |p: &[String]| {
        if p.is_empty() {
            "none".to_string()
        } else {
            p.join(", ")
        }
    };
    for d in plan.iter().filter(|d| d.purge) {
        let Some(chain) = all.iter().find(|c| c.chain == d.full) else {
            continue;
        };
        progress(30, &format!("purging {whose}chain {} ({})", d.full, d.why));
        let keys = std::iter::once(manifest_key(&chain.chain))
            .chain(chain.backups.iter().map(|b| b.key.clone()))
            .chain(chain.binlogs.iter().map(|b| b.key.clone()));
        for key in keys {
            s3.delete(&key).await.map_err(|e| {
                BackupError::Failed(format!(
                    "{e}; purged so far: {} (the rest of chain {} goes on the next purge)",
                    so_far(&purged),
                    d.full
                ))
            })?;
        }
        purged.push(d.full.clone());
    }
    // Leftovers of a purge cut off: a chain folder with no manifest.
    let listed = s3.list("chains/").await?;
    let with_manifest: std::collections::BTreeSet<&str> = listed
        .iter()
        .filter_map(|l| l.name.strip_suffix("/manifest.json"))
        .collect();
    let mut leftovers = 0usize;
    for l in &listed {
        let dir = l.name.rsplit_once('/').map_or("", |(d, _)| d);
        if !with_manifest.contains(dir) {
            s3.delete(&l.name).await?;
            leftovers += 1;
        }
    }
    Ok(json!({
        "purged": purged,
        "chains": plan,
        "retention_days": retention_days,
        "leftovers_removed": leftovers,
    }))
}

/// `backup.list` for MariaDB: chains, sizes, binlogs and the window a restore can reach.
pub async fn list(m: &BackupManager) -> Result<Value, BackupError> {
    let _st = mariadb(m).await?;
    let state = m.configured()?;
    let storage = load_storage(m)?.ok_or_else(|| {
        BackupError::Invalid(
            "backups are not configured on this VM (send backup.configure first)".into(),
        )
    })?;
    let s3 = client(m, &storage)?;
    let status = m.maria.status.lock().map(|s| s.clone()).unwrap_or_default();
    // An unreachable bucket is an answer too (as pgBackRest's info gives it): what the
    // uploader knows stays visible.
    let all = match manifests(&s3).await {
        Ok(all) => all,
        Err(e) => {
            return Ok(json!({
                "engine": "mariadb",
                "location": state.location,
                "retention_days": state.retention_days,
                "status": {"reachable": false, "message": e.to_string()},
                "binlog_upload": status,
            }))
        }
    };
    let chains = super::chains(&as_sets(&all), state.retention_days);
    Ok(json!({
        "status": {"reachable": true},
        "engine": "mariadb",
        "location": state.location,
        "retention_days": state.retention_days,
        "chains": chains,
        "binlogs": all.iter().map(|m| json!({"chain": m.chain, "count": m.binlogs.len(), "first": m.binlogs.first().map(|b| &b.name), "last": m.binlogs.last().map(|b| &b.name)})).collect::<Vec<_>>(),
        "recoverable": manifest::window(&all).map(|w| json!({"from_ms": w.from_ms, "to_ms": w.to_ms, "from": super::restore::rfc3339(w.from_ms), "to": super::restore::rfc3339(w.to_ms)})),
        "binlog_upload": status,
        "cloud": match &state.cloud {
            Some(cs) => super::cloud::maria_list(m, cs).await,
            None => Value::Null,
        },
    }))
}

// ----- binlog upload ---------------------------------------------------------------------

/// The binlogs the server lists in its index, oldest first; the last one is being written.
fn binlog_index(p: &Paths) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string(p.data.join("binlog.index"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            Path::new(l.trim())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .filter(|n| manifest::seq(n).is_some())
        .collect())
}

/// One round of the uploader: rotates the binlog (so the newest events leave the VM),
/// then uploads every rotated binlog not yet in the newest chain's manifest (at most
/// [`BINLOG_UPLOADS`] at once, each with its SHA-256) and records them there.
pub async fn binlog_round(m: &BackupManager) -> Result<(), BackupError> {
    let Some(storage) = load_storage(m)? else {
        return Ok(());
    };
    if m.db.flavour() != Some(Flavour::Mariadb) {
        return Ok(());
    }
    let st = mariadb(m).await?;
    if let Ok(mut s) = m.maria.status.lock() {
        s.configured = true;
    }
    let p = m.db.paths().clone();
    let read_index = || {
        binlog_index(&p).map_err(|e| {
            BackupError::Failed(format!(
                "cannot read the binlog index in {}: {e}",
                p.data.display()
            ))
        })
    };
    let current = |index: &[String]| {
        index.last().map(|n| {
            let size = std::fs::metadata(p.data.join(n)).map_or(0, |md| md.len());
            (n.clone(), size)
        })
    };
    let mut index = read_index()?;
    // Idle: the same file as right after the last rotation, grown by at most a binlog
    // checkpoint event (the server appends one after a rotation, ~40 bytes; the smallest
    // transaction — GTID, BEGIN, table map, rows, XID — is over 200).
    let idle = {
        let last = m
            .maria
            .last_rotation
            .lock()
            .map(|l| l.clone())
            .unwrap_or(None);
        match (last, current(&index)) {
            (Some((n0, s0)), Some((n1, s1))) => n0 == n1 && s1 <= s0 + 128,
            _ => false,
        }
    };
    // Rotation, so the newest events leave the VM: only when the server wrote something
    // since the last one, and only while it runs.
    if !idle {
        if let Ok(mut admin) = Admin::connect(&st.spec, &p).await {
            use mysql_async::prelude::Queryable;
            let flushed = match &mut admin {
                Admin::Mysql(c) => c.query_drop("FLUSH BINARY LOGS").await,
                Admin::Postgres(..) => Ok(()),
            };
            match flushed {
                Ok(()) => {
                    index = read_index()?;
                    if let Ok(mut l) = m.maria.last_rotation.lock() {
                        *l = current(&index);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot rotate the binlog"),
            }
        }
    }
    let rotated = &index[..index.len().saturating_sub(1)];
    // Pending as far as this VM knows before asking the bucket (after the newest upload,
    // or every rotated file when nothing was uploaded since the agent started): what
    // health shows while the bucket cannot be reached.
    let newest_up = m
        .maria
        .status
        .lock()
        .ok()
        .and_then(|s| s.last_uploaded.as_deref().and_then(manifest::seq));
    set_pending(
        m,
        rotated
            .iter()
            .filter(|n| manifest::seq(n).is_some_and(|s| newest_up.is_none_or(|u| s > u)))
            .count(),
    );
    let s3 = client(m, &storage)?;
    let _manifest = m.maria.manifest_lock.lock().await;
    let mut all = manifests(&s3).await?;
    let Some(mut current) = all.pop() else {
        // No backup yet: binlogs before the first backup restore nothing.
        set_pending(m, 0);
        return Ok(());
    };
    let first = current
        .backups
        .iter()
        .filter_map(|b| b.binlog_file.as_deref().and_then(manifest::seq))
        .min()
        .unwrap_or(0);
    let have: std::collections::BTreeSet<&str> = all
        .iter()
        .chain(std::iter::once(&current))
        .flat_map(|m| m.binlogs.iter().map(|b| b.name.as_str()))
        .collect();
    let todo: Vec<String> = rotated
        .iter()
        .filter(|n| manifest::seq(n).is_some_and(|s| s >= first) && !have.contains(n.as_str()))
        .cloned()
        .collect();
    set_pending(m, todo.len());
    if todo.is_empty() {
        return Ok(());
    }
    use futures::StreamExt;
    let results: Vec<Result<Binlog, BackupError>> = futures::stream::iter(todo.iter().cloned())
        .map(|name| {
            let s3 = &s3;
            let path = p.data.join(&name);
            async move {
                let (first_event_ms, last_event_ms) =
                    manifest::binlog_times(&path).map_err(|e| {
                        BackupError::Failed(format!("cannot read {}: {e}", path.display()))
                    })?;
                let mut f = tokio::fs::File::open(&path).await.map_err(|e| {
                    BackupError::Failed(format!("cannot open {}: {e}", path.display()))
                })?;
                let key = format!("binlog/{name}");
                let stored = s3.upload(&key, &mut f).await?;
                Ok(Binlog {
                    name,
                    key,
                    size: stored.size,
                    sha256: stored.sha256,
                    first_event_ms,
                    last_event_ms,
                    uploaded_ms: dbvm_protocol::now_ms(),
                })
            }
        })
        .buffered(BINLOG_UPLOADS)
        .collect()
        .await;
    let mut first_error = None;
    for r in results {
        match r {
            Ok(b) => current.binlogs.push(b),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    current.binlogs.sort_by_key(|b| manifest::seq(&b.name));
    let uploaded = current.binlogs.len();
    write_manifest(&s3, &current).await?;
    // Only what is safe off the VM may be purged under the cap: the binlogs the bucket's
    // manifests hold, and those older than the oldest backup there (that backup holds
    // their changes; no restore replays them).
    let oldest_needed = all
        .iter()
        .chain(std::iter::once(&current))
        .flat_map(|m| m.backups.iter())
        .filter_map(|b| b.binlog_file.as_deref().and_then(manifest::seq))
        .min();
    let in_bucket: std::collections::BTreeSet<String> = all
        .iter()
        .chain(std::iter::once(&current))
        .flat_map(|m| m.binlogs.iter().map(|b| b.name.clone()))
        .chain(
            index
                .iter()
                .filter(|n| {
                    manifest::seq(n)
                        .zip(oldest_needed)
                        .is_some_and(|(s, oldest)| s < oldest)
                })
                .cloned(),
        )
        .collect();
    if let Err(e) = super::binlog_cap::enforce(&st, &p, &index, &in_bucket).await {
        tracing::warn!(error = %e, "binlog cap");
    }
    if let Ok(mut s) = m.maria.status.lock() {
        if let Some(last) = current.binlogs.last() {
            s.last_uploaded = Some(last.name.clone());
            s.last_uploaded_ms = Some(last.uploaded_ms);
            s.newest_event_ms = Some(last.last_event_ms);
        }
        s.pending = todo.len().saturating_sub(uploaded.min(todo.len()));
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            set_pending(m, 0);
            Ok(())
        }
    }
}

fn set_pending(m: &BackupManager, n: usize) {
    if let Ok(mut s) = m.maria.status.lock() {
        s.pending = n;
    }
}

/// The uploader: a round every `binlog_rotate_s`, until `stop`. Failures are counted
/// and the files stay; the next round catches up by itself.
pub async fn binlog_task(m: Arc<BackupManager>, stop: tokio_util::sync::CancellationToken) {
    let every = Duration::from_secs(m.settings.binlog_rotate_s);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if m.db.flavour() != Some(Flavour::Mariadb) {
            continue;
        }
        let r = binlog_round(&m).await;
        if let Ok(mut s) = m.maria.status.lock() {
            s.last_round_ms = Some(dbvm_protocol::now_ms());
            match &r {
                Ok(()) => {
                    s.consecutive_failures = 0;
                    s.last_error = None;
                }
                Err(e) => {
                    s.consecutive_failures += 1;
                    s.last_error = Some(e.to_string());
                }
            }
        }
        if let Err(e) = r {
            tracing::warn!(error = %e, "binlog upload round failed; the files stay and the next round retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backup_script_has_no_secret_and_fails_as_a_pipeline() {
        let p = Paths::new(Path::new("/d"));
        let v = backup_argv(
            &|s: &str| s.to_string(),
            &p.main_config(Flavour::Mariadb),
            &p,
            Path::new("/d/run/backup/lsn"),
            Path::new("/d/run/backup/stream"),
            4711,
        );
        assert_eq!(v[0], "sh");
        assert!(v[2].starts_with("set -o pipefail;"), "{}", v[2]);
        assert!(
            v[2].contains("'--defaults-file=/d/conf/my.cnf' --backup"),
            "{}",
            v[2]
        );
        assert!(v[2].contains("--incremental-lsn=4711"), "{}", v[2]);
        assert!(
            v[2].contains("| 'zstd' -3 -T2 -q > '/d/run/backup/stream'"),
            "{}",
            v[2]
        );
        assert!(!v[2].contains("password"), "{}", v[2]);
        assert_eq!(label(1_796_320_800_250), "20261203T180000Z");
    }

    #[test]
    fn cloud_sync_grades_waiting_and_failing_uploads() {
        use dbvm_protocol::health::HealthStatus;
        let mut s = BinlogStatus::default();
        assert_eq!(
            mysql_cloud_sync(&s, 0, 60.0, 600.0).status,
            HealthStatus::Unknown
        );
        s.configured = true;
        assert_eq!(
            mysql_cloud_sync(&s, 0, 60.0, 600.0).status,
            HealthStatus::Ok
        );
        s.pending = 2;
        s.consecutive_failures = 3;
        s.last_error = Some("S3 down".into());
        s.newest_event_ms = Some(0);
        let f = mysql_cloud_sync(&s, 1_000_000, 60.0, 600.0);
        assert_eq!(f.status, HealthStatus::Critical);
        assert!(f.message.contains("S3 down"), "{}", f.message);
    }
}
