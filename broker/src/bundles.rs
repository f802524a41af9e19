//! Log bundles on the broker: what agents upload for `bundle.collect` commands, kept
//! under `<data_dir>/bundles` and recorded in the store, for control planes to list,
//! fetch and delete.
//!
//! A bundle's id is the id of the command that made it. The agent uploads it over its
//! own HTTPS connection to the API (a second connection beside its link, so a bundle
//! streaming never queues behind it the link's commands, heartbeats and results):
//!
//! - `PUT /v1/bundles/{id}/content?offset=N` appends the request's body to
//!   `<id>.part`, fsyncs it and answers how many bytes are stored. `offset` must be what
//!   is stored (409 with `Upload-Offset` otherwise), so a dropped connection or a broker
//!   restart loses nothing: the agent asks again from where the broker is. A newer
//!   upload of the same bundle takes over from one still open (an agent that reconnected
//!   before the broker saw its old connection die).
//! - `POST /v1/bundles/{id}/complete` with the size and SHA-256: the broker hashes what it
//!   stored, and only when both match renames the part to `<id>.tar.zst` and records it
//!   complete. A mismatch removes the part (422): the agent sends it again from the start.
//!
//! Only the agent the command was addressed to may upload, only while the command is
//! unfinished, with a certificate the revocation list does not refuse. Only complete
//! bundles are served. A full disk removes the part and answers 507: nothing partial is
//! ever kept as a bundle. [`BundleStore::expire`] removes bundles older than
//! `bundles.max_age_hours`, the oldest beyond `bundles.max_total_bytes`, and uploads
//! whose command ended without completing them.

use crate::api::{answer_draining, ApiFailure, Peer, PeerCertificate};
use crate::config::BundleSettings;
use crate::hub::Hub;
use crate::store::Store;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use dbvm_protocol::api::{BundleComplete, BundleInfo, BundleList, BundleState, BundleStored};
use dbvm_protocol::pki::Identity;
use futures::StreamExt;
use serde::Deserialize;
use sha2::Digest;
use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The directory under the data dir.
pub const DIR_NAME: &str = "bundles";
/// The operation whose commands make bundles.
pub const OPERATION: &str = "bundle.collect";
/// The header that tells an agent where to resume (the name the tus protocol uses).
pub const UPLOAD_OFFSET: &str = "upload-offset";
/// The header carrying a served bundle's SHA-256.
pub const SHA256_HEADER: &str = "x-dbvm-sha256";
/// An upload that sends nothing for this long is given up (what arrived is kept).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Read size when hashing or serving a file.
const CHUNK: usize = 256 * 1024;
/// An upload is synced every this many bytes as it arrives.
const SYNC_EVERY: u64 = 8 * 1024 * 1024;
/// The disk's write-back of an upload is started every this many bytes (see
/// [`dbvm_host::fs::start_writeback`]), so a sync, the store's or the upload's own, never
/// finds megabytes of it waiting. Without it the store's commits, which share the disk,
/// waited behind up to 8 MiB of bundle data each: signed pings while a bundle streamed
/// had a p99 of 167 and 189 ms in two runs of `E2E=1 benches/bundle/run.sh`, and 32 and
/// 39 ms with it (interleaved, the same evening; idle p99 8–14 ms).
const WRITEBACK_EVERY: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0:?} is not a bundle id: give the UUID of its bundle.collect command")]
    BadId(String),
    #[error("no bundle {0} on this broker (never uploaded, expired or deleted)")]
    NotFound(Uuid),
    #[error(
        "bundle {0} is still being uploaded by its agent; fetch it when its command has succeeded"
    )]
    NotComplete(Uuid),
    #[error("no command {0} on this broker: a bundle is uploaded for its bundle.collect command")]
    NoCommand(Uuid),
    #[error("command {id} is {operation}, not bundle.collect: nothing may be uploaded for it")]
    NotABundle { id: Uuid, operation: String },
    #[error(
        "command {id} is for agent {owner}, not for {agent}: an agent uploads only its own bundles"
    )]
    NotYours {
        id: Uuid,
        owner: String,
        agent: String,
    },
    #[error("command {0} has finished: its bundle can no longer be uploaded")]
    CommandFinished(Uuid),
    #[error("bundle {0} is complete already; nothing more is taken")]
    AlreadyComplete(Uuid),
    #[error("the upload starts at byte {offset} but the broker holds {stored} bytes of bundle {id}: resume at {stored}")]
    OffsetMismatch { id: Uuid, offset: u64, stored: u64 },
    #[error("bundle {id} would be larger than this broker's cap of {max} bytes (bundles.max_bytes); nothing of it is kept")]
    TooLarge { id: Uuid, max: u64 },
    #[error("the {stored} bytes stored of bundle {id} hash to {actual}, not {expected}: they were removed; upload the bundle again from the start")]
    Mismatch {
        id: Uuid,
        stored: u64,
        expected: String,
        actual: String,
    },
    #[error("{0:?} is not a SHA-256: give 64 lowercase hex digits")]
    BadSha256(String),
    #[error("a newer upload of bundle {0} took over from this one")]
    Superseded(Uuid),
    #[error("the upload sent nothing for {} s; what arrived is kept", .0.as_secs())]
    Stalled(Duration),
    #[error("the broker's disk is full: nothing of bundle {0} is kept; free space on the broker and collect the bundle again")]
    DiskFull(Uuid),
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the broker's own bundle could not be written: {0}")]
    Made(dbvm_bundle::writer::BundleError),
    #[error("bundles.s3: {0}")]
    S3(dbvm_s3::S3Error),
    #[error("the S3 copy of bundle {id} could not be deleted, so nothing was: {error}; try again")]
    CopyNotDeleted { id: Uuid, error: dbvm_s3::S3Error },
}

impl BundleError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    matches!(e.kind(), StorageFull | QuotaExceeded)
}

impl From<BundleError> for ApiFailure {
    fn from(e: BundleError) -> Self {
        use BundleError as E;
        let (status, code) = match &e {
            E::BadId(_) | E::BadSha256(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            E::NotFound(_) | E::NoCommand(_) => (StatusCode::NOT_FOUND, "not_found"),
            E::NotComplete(_) => (StatusCode::CONFLICT, "not_complete"),
            E::NotABundle { .. } => (StatusCode::CONFLICT, "not_a_bundle"),
            E::NotYours { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            E::CommandFinished(_) => (StatusCode::CONFLICT, "command_finished"),
            E::AlreadyComplete(_) => (StatusCode::CONFLICT, "already_complete"),
            E::OffsetMismatch { .. } => (StatusCode::CONFLICT, "offset_mismatch"),
            E::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            E::Mismatch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "sha256_mismatch"),
            E::Superseded(_) => (StatusCode::CONFLICT, "superseded"),
            E::CopyNotDeleted { .. } => (StatusCode::BAD_GATEWAY, "storage_unavailable"),
            E::Stalled(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            E::DiskFull(_) => {
                tracing::error!(error = %e, "bundle store: disk full");
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            E::Store(s) => {
                tracing::error!(error = %s, "bundle store: store error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            E::Io { .. } | E::Made(_) | E::S3(_) => {
                tracing::error!(error = %e, "bundle store error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiFailure::new(status, code, e.to_string())
    }
}

/// An answer that tells an agent where to resume: the error, with `Upload-Offset`.
fn with_offset(failure: impl IntoResponse, stored: u64) -> Response {
    let mut r = failure.into_response();
    r.headers_mut()
        .insert(UPLOAD_OFFSET, HeaderValue::from(stored));
    r
}

/// The upload under way of one bundle: a newer one cancels `current` and waits for
/// `lock`.
#[derive(Default)]
struct Slot {
    lock: tokio::sync::Mutex<()>,
    current: Mutex<CancellationToken>,
    /// The SHA-256 of the part's first `.1` bytes, as this broker appended them (so the
    /// completion need not read the whole part again; after a restart it does).
    hash: Mutex<Option<(sha2::Sha256, u64)>>,
}

/// The bundles of one broker, in `<data_dir>/bundles`.
pub struct BundleStore {
    dir: PathBuf,
    settings: BundleSettings,
    store: Arc<dyn Store>,
    slots: Mutex<HashMap<Uuid, Arc<Slot>>>,
    /// Copies complete bundles to `[bundles.s3]`, when configured.
    copier: Option<Arc<crate::bundle_s3::Copier>>,
}

impl std::fmt::Debug for BundleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleStore")
            .field("dir", &self.dir)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl BundleStore {
    /// Opens `<data_dir>/bundles` (made when absent). Parts of unfinished uploads stay:
    /// their agents resume them; what a broker bundle cut short by a crash left (dot
    /// names) is removed.
    pub fn open(
        data_dir: &Path,
        settings: BundleSettings,
        store: Arc<dyn Store>,
    ) -> Result<Self, BundleError> {
        let dir = data_dir.join(DIR_NAME);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)
            .map_err(BundleError::io("create", &dir))?;
        for entry in std::fs::read_dir(&dir).map_err(BundleError::io("list", &dir))? {
            let entry = entry.map_err(BundleError::io("list", &dir))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(BundleError::io("remove", &path))?;
            }
        }
        let copier = match &settings.s3 {
            None => None,
            Some(s3) => {
                let endpoint = s3
                    .open()
                    .map_err(|e| BundleError::S3(dbvm_s3::S3Error::Ca(e.to_string())))?;
                Some(Arc::new(
                    crate::bundle_s3::Copier::new(&endpoint).map_err(BundleError::S3)?,
                ))
            }
        };
        Ok(Self {
            dir,
            settings,
            store,
            slots: Mutex::new(HashMap::new()),
            copier,
        })
    }

    /// The S3 copier, when `[bundles.s3]` is configured (the broker runs it).
    pub fn copier(&self) -> Option<Arc<crate::bundle_s3::Copier>> {
        self.copier.clone()
    }

    /// Every bundle recorded, newest first.
    pub(crate) async fn records(&self) -> Result<Vec<BundleInfo>, BundleError> {
        Ok(self.store.bundles().await?)
    }

    /// Records where bundle `id`'s copy stands; false when the bundle is gone.
    pub(crate) async fn record_copy(
        &self,
        id: Uuid,
        copy: dbvm_protocol::api::BundleCopy,
    ) -> Result<bool, BundleError> {
        Ok(self.store.put_bundle_copy(id, copy).await?)
    }

    /// A complete bundle's record: its copy owed when there is a bucket.
    fn owe_copy(&self, rec: &mut BundleInfo) {
        if let Some(c) = &self.copier {
            rec.s3 = Some(c.pending(rec));
        }
    }

    fn wake_copier(&self) {
        if let Some(c) = &self.copier {
            c.wake();
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn part_path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.part"))
    }

    fn file_path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.tar.zst"))
    }

    fn slot(&self, id: Uuid) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(id).or_default().clone()
    }

    /// Checks that `agent` may upload bundle `id` now; returns its record, made when this
    /// is its first upload.
    async fn admit(&self, agent: &str, id: Uuid) -> Result<BundleInfo, BundleError> {
        let Some(cmd) = self.store.command(id).await? else {
            return Err(BundleError::NoCommand(id));
        };
        if cmd.operation != OPERATION {
            return Err(BundleError::NotABundle {
                id,
                operation: cmd.operation,
            });
        }
        if cmd.agent_id != agent {
            return Err(BundleError::NotYours {
                id,
                owner: cmd.agent_id,
                agent: agent.to_string(),
            });
        }
        match self.store.bundle(id).await? {
            Some(b) if b.state == BundleState::Complete => Err(BundleError::AlreadyComplete(id)),
            _ if cmd.state.is_terminal() => Err(BundleError::CommandFinished(id)),
            Some(b) => Ok(b),
            None => {
                let b = BundleInfo {
                    id,
                    agent_id: agent.to_string(),
                    state: BundleState::Uploading,
                    size: 0,
                    sha256: None,
                    created_at_ms: dbvm_protocol::now_ms(),
                    completed_at_ms: None,
                    s3: None,
                };
                self.store.put_bundle(b.clone()).await?;
                Ok(b)
            }
        }
    }

    /// Appends `body` to bundle `id` from `offset` (what must be stored already); returns
    /// the bytes stored after it, on disk.
    async fn append<S, E>(
        &self,
        id: Uuid,
        offset: u64,
        body: &mut S,
        cancelled: &CancellationToken,
    ) -> Result<u64, BundleError>
    where
        S: futures::Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let path = self.part_path(id);
        let file = tokio::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&path)
            .await
            .map_err(BundleError::io("open", &path))?;
        let mut file = file;
        let mut stored = file
            .metadata()
            .await
            .map_err(BundleError::io("stat", &path))?
            .len();
        if offset != stored {
            return Err(BundleError::OffsetMismatch { id, offset, stored });
        }
        let slot = self.slot(id);
        let mut hash = slot
            .hash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|(_, n)| *n == stored);
        if stored == 0 {
            hash = Some((sha2::Sha256::new(), 0));
        }
        let mut unsynced = 0u64;
        let mut unstarted = 0u64;
        let max = self.settings.max_bytes;
        let ended = loop {
            let next = tokio::select! {
                _ = cancelled.cancelled() => break Err(BundleError::Superseded(id)),
                n = tokio::time::timeout(STALL_TIMEOUT, body.next()) => n,
            };
            let chunk = match next {
                Err(_) => break Err(BundleError::Stalled(STALL_TIMEOUT)),
                Ok(None) => break Ok(()),
                // The agent's connection broke: what arrived is kept (synced below), and
                // the agent resumes from it.
                Ok(Some(Err(e))) => {
                    tracing::info!(bundle = %id, stored, error = %e, "bundle upload broke off; kept what arrived");
                    break Ok(());
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            if stored + chunk.len() as u64 > max {
                drop(file);
                self.discard(id).await;
                return Err(BundleError::TooLarge { id, max });
            }
            if let Err(e) = file.write_all(&chunk).await {
                drop(file);
                return Err(self.write_failed(id, &path, "write", e).await);
            }
            stored += chunk.len() as u64;
            if let Some((h, n)) = &mut hash {
                h.update(&chunk);
                *n = stored;
            }
            // Write-back started as it goes: see `WRITEBACK_EVERY`.
            unstarted += chunk.len() as u64;
            if unstarted >= WRITEBACK_EVERY {
                // The written bytes reach the file (tokio writes in the background)
                // before their write-back is asked for; a failed write shows here.
                if let Err(e) = file.flush().await {
                    drop(file);
                    return Err(self.write_failed(id, &path, "write", e).await);
                }
                dbvm_host::fs::start_writeback(&file, stored - unstarted, unstarted).await;
                unstarted = 0;
            }
            // Synced as it goes, so the sync before the answer is short.
            unsynced += chunk.len() as u64;
            if unsynced >= SYNC_EVERY {
                unsynced = 0;
                if let Err(e) = sync(&mut file).await {
                    drop(file);
                    return Err(self.write_failed(id, &path, "fsync", e).await);
                }
            }
        };
        // What is answered as stored is on disk: a broker restart keeps it.
        if let Err(e) = sync(&mut file).await {
            drop(file);
            return Err(self.write_failed(id, &path, "fsync", e).await);
        }
        *slot.hash.lock().unwrap_or_else(|p| p.into_inner()) = hash;
        ended.map(|()| stored)
    }

    /// The error of a failed write or sync of bundle `id`'s part: a full disk discards the
    /// part (nothing partial is kept), anything else leaves it for a retry.
    async fn write_failed(
        &self,
        id: Uuid,
        path: &Path,
        op: &'static str,
        e: std::io::Error,
    ) -> BundleError {
        if is_disk_full(&e) {
            self.discard(id).await;
            return BundleError::DiskFull(id);
        }
        BundleError::io(op, path)(e)
    }

    /// Removes bundle `id`'s part and its record: an upload that cannot go on.
    async fn discard(&self, id: Uuid) {
        let _ = tokio::fs::remove_file(self.part_path(id)).await;
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Err(e) = self.store.delete_bundle(id).await {
            tracing::warn!(bundle = %id, error = %e, "cannot forget a discarded bundle upload");
        }
    }

    /// Checks what is stored of bundle `id` against `claim` and makes it a bundle.
    async fn complete(
        &self,
        mut rec: BundleInfo,
        claim: &BundleComplete,
    ) -> Result<BundleInfo, BundleError> {
        let id = rec.id;
        if claim.sha256.len() != 64
            || !claim
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(BundleError::BadSha256(
                claim.sha256.chars().take(80).collect(),
            ));
        }
        let part = self.part_path(id);
        let stored = match tokio::fs::metadata(&part).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(BundleError::io("stat", &part)(e)),
        };
        if stored != claim.size {
            return Err(BundleError::OffsetMismatch {
                id,
                offset: claim.size,
                stored,
            });
        }
        let kept = self
            .slot(id)
            .hash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|(_, n)| *n == stored);
        let actual = match kept {
            Some((h, _)) => format!("{:x}", h.finalize()),
            // Appended before a restart: read it all again.
            None => {
                let p = part.clone();
                tokio::task::spawn_blocking(move || sha256_of(&p))
                    .await
                    .map_err(|e| BundleError::io("hash", &part)(std::io::Error::other(e)))?
                    .map_err(BundleError::io("hash", &part))?
            }
        };
        if actual != claim.sha256 {
            self.discard(id).await;
            return Err(BundleError::Mismatch {
                id,
                stored,
                expected: claim.sha256.clone(),
                actual,
            });
        }
        let file = self.file_path(id);
        tokio::fs::rename(&part, &file)
            .await
            .map_err(BundleError::io("rename", &part))?;
        let f = file.clone();
        tokio::task::spawn_blocking(move || dbvm_host::fs::sync_dir(&f))
            .await
            .map_err(|e| {
                BundleError::io("fsync the directory of", &file)(std::io::Error::other(e))
            })?
            .map_err(BundleError::io("fsync the directory of", &file))?;
        rec.state = BundleState::Complete;
        rec.size = stored;
        rec.sha256 = Some(actual);
        rec.completed_at_ms = Some(dbvm_protocol::now_ms());
        self.owe_copy(&mut rec);
        self.store.put_bundle(rec.clone()).await?;
        self.wake_copier();
        Ok(rec)
    }

    /// Makes a bundle of `parts` here (the broker's own) and stores it complete under a new
    /// id, for `agent`. It is written under `.made/` (which expiry leaves alone), recorded,
    /// then renamed into place.
    pub async fn store_made(
        &self,
        agent: &str,
        parts: Vec<dbvm_bundle::Part>,
        options: dbvm_bundle::Options,
    ) -> Result<BundleInfo, BundleError> {
        let id = Uuid::new_v4();
        let made = self.dir.join(".made");
        let name = format!("{id}.tar.zst");
        let created_at_ms = dbvm_protocol::now_ms();
        let (_, size, sha256) = dbvm_bundle::collect_to_file(parts, options, &made, &name)
            .await
            .map_err(BundleError::Made)?;
        let mut rec = BundleInfo {
            id,
            agent_id: agent.to_string(),
            state: BundleState::Complete,
            size,
            sha256: Some(sha256),
            created_at_ms,
            completed_at_ms: Some(dbvm_protocol::now_ms()),
            s3: None,
        };
        self.owe_copy(&mut rec);
        self.store.put_bundle(rec.clone()).await?;
        let file = self.file_path(id);
        tokio::fs::rename(made.join(&name), &file)
            .await
            .map_err(BundleError::io("rename", &file))?;
        let f = file.clone();
        tokio::task::spawn_blocking(move || dbvm_host::fs::sync_dir(&f))
            .await
            .map_err(|e| {
                BundleError::io("fsync the directory of", &file)(std::io::Error::other(e))
            })?
            .map_err(BundleError::io("fsync the directory of", &file))?;
        self.wake_copier();
        Ok(rec)
    }

    /// Every bundle, newest first (an upload with the bytes stored so far), and the
    /// bytes of the complete ones.
    pub async fn list(&self) -> Result<BundleList, BundleError> {
        let mut bundles = self.store.bundles().await?;
        for b in &mut bundles {
            if b.state == BundleState::Uploading {
                b.size = tokio::fs::metadata(self.part_path(b.id))
                    .await
                    .map_or(0, |m| m.len());
            }
        }
        let total_bytes = bundles
            .iter()
            .filter(|b| b.state == BundleState::Complete)
            .map(|b| b.size)
            .sum();
        Ok(BundleList {
            bundles,
            total_bytes,
        })
    }

    /// Opens complete bundle `id`: its record and file.
    pub async fn open_file(&self, id: Uuid) -> Result<(BundleInfo, tokio::fs::File), BundleError> {
        let rec = match self.store.bundle(id).await? {
            None => return Err(BundleError::NotFound(id)),
            Some(b) if b.state != BundleState::Complete => {
                return Err(BundleError::NotComplete(id))
            }
            Some(b) => b,
        };
        let path = self.file_path(id);
        match tokio::fs::File::open(&path).await {
            Ok(f) => Ok((rec, f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(BundleError::NotFound(id)),
            Err(e) => Err(BundleError::io("open", &path)(e)),
        }
    }

    /// Removes bundle `id` (complete or not) and, when `copy_too`, its S3 copy first (if
    /// that fails nothing is removed); whether there was one.
    pub async fn delete(&self, id: Uuid, copy_too: bool) -> Result<bool, BundleError> {
        if let (true, Some(copier)) = (copy_too, &self.copier) {
            if let Some(rec) = self.store.bundle(id).await? {
                if rec.s3.is_some() {
                    copier
                        .delete(&rec)
                        .await
                        .map_err(|error| BundleError::CopyNotDeleted { id, error })?;
                }
            }
        }
        let mut found = false;
        for path in [self.file_path(id), self.part_path(id)] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => found = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(BundleError::io("remove", &path)(e)),
            }
        }
        let recorded = self.store.delete_bundle(id).await?;
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        Ok(found || recorded)
    }

    /// Removes what the settings no longer keep: complete bundles older than
    /// `max_age_hours`, then the oldest beyond `max_total_bytes`; uploads whose command
    /// has finished (the agent gave up or failed) or whose command is gone; files no
    /// record names. Returns how many bundles went.
    pub async fn expire(&self, now_ms: i64) -> Result<usize, BundleError> {
        let max_age_ms = i64::from(self.settings.max_age_hours) * 3_600_000;
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        for mut b in self.store.bundles().await? {
            let mut dead_upload = b.state == BundleState::Uploading
                && match self.store.command(b.id).await? {
                    Some(c) => c.state.is_terminal(),
                    None => true,
                };
            if dead_upload {
                // The list was read before the command: the agent completes its upload
                // before it sends the command's result, so an upload that completed
                // meanwhile shows now. Without this read a bundle completing while
                // another one's completion ran this expiry was deleted as abandoned.
                match self.store.bundle(b.id).await? {
                    Some(now) if now.state == BundleState::Complete => {
                        b = now;
                        dead_upload = false;
                    }
                    Some(_) => {}
                    None => continue,
                }
            }
            let old = now_ms - b.completed_at_ms.unwrap_or(b.created_at_ms) > max_age_ms;
            if old || dead_upload {
                gone.push((b.id, if old { "expired" } else { "upload abandoned" }));
            } else if b.state == BundleState::Complete {
                kept.push(b);
            }
        }
        // Newest first: the oldest beyond the total go.
        let mut total = 0u64;
        for b in kept {
            total += b.size;
            if total > self.settings.max_total_bytes {
                gone.push((b.id, "over bundles.max_total_bytes"));
            }
        }
        for (id, why) in &gone {
            // The S3 copy stays: the bucket's lifecycle rules decide how long.
            self.delete(*id, false).await?;
            tracing::info!(bundle = %id, why, "bundle removed");
        }
        // Files no record names (a crash between a file and its record).
        let recorded: std::collections::HashSet<Uuid> = self
            .store
            .bundles()
            .await?
            .into_iter()
            .map(|b| b.id)
            .collect();
        let mut rd = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(BundleError::io("list", &self.dir))?;
        while let Ok(Some(e)) = rd.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            // A broker bundle being made (see `store_made`).
            if name.starts_with('.') {
                continue;
            }
            let id = name
                .split_once('.')
                .and_then(|(stem, _)| Uuid::parse_str(stem).ok());
            if id.is_none_or(|id| !recorded.contains(&id)) {
                let _ = tokio::fs::remove_file(e.path()).await;
                tracing::info!(file = %e.path().display(), "removed a bundle file no record names");
            }
        }
        Ok(gone.len())
    }
}

/// Flushes and syncs a part's data.
async fn sync(file: &mut tokio::fs::File) -> std::io::Result<()> {
    file.flush().await?;
    file.sync_data().await
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn parse_id(text: &str) -> Result<Uuid, BundleError> {
    crate::api::parse_uuid(text).ok_or_else(|| BundleError::BadId(text.chars().take(80).collect()))
}

/// The agent on the other end, when the request carries an agent certificate the
/// revocation list does not refuse (checked by [`auth_agent`]).
#[derive(Clone, Debug)]
pub(crate) struct UploadingAgent(String);

/// Bundle uploads are for agents only, with a certificate that is not revoked.
pub(crate) async fn auth_agent(
    State(hub): State<Arc<Hub>>,
    Extension(peer): Extension<Peer>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let refused = match &peer {
        Peer::Identity(Identity::Agent(agent)) => {
            let cert = req.extensions().get::<PeerCertificate>().copied();
            match crate::artifacts::agent_certificate_good(&hub, agent.as_str(), cert).await {
                Ok(()) => {
                    req.extensions_mut()
                        .insert(UploadingAgent(agent.as_str().to_string()));
                    None
                }
                Err(f) => Some(f),
            }
        }
        Peer::Identity(Identity::ControlPlane(name)) => Some(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("control plane {name:?} may not upload bundles: only the agent that collects one does"),
        )),
        other => crate::api::require_control_plane(other).err(),
    };
    match refused {
        None => next.run(req).await,
        Some(failure) => crate::api::answer_unread(req, failure).await,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OffsetQuery {
    offset: u64,
}

/// `PUT /v1/bundles/{id}/content?offset=N` (agents): 200 with the bytes stored.
pub(crate) async fn upload(
    Extension(bundles): Extension<Arc<BundleStore>>,
    Extension(UploadingAgent(agent)): Extension<UploadingAgent>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<OffsetQuery>,
    req: axum::extract::Request,
) -> Response {
    let admitted = match parse_id(&id) {
        Ok(id) => bundles.admit(&agent, id).await.map(|r| (id, r)),
        Err(e) => Err(e),
    };
    let id = match admitted {
        Ok((id, _)) => id,
        Err(e) => {
            let stored = match &e {
                BundleError::AlreadyComplete(id) => bundles
                    .store
                    .bundle(*id)
                    .await
                    .ok()
                    .flatten()
                    .map(|b| b.size),
                _ => None,
            };
            let failure = ApiFailure::from(e);
            return match stored {
                Some(s) => with_offset(answer_unread(req, failure).await, s),
                None => answer_unread(req, failure).await,
            };
        }
    };
    let slot = bundles.slot(id);
    let token = {
        let mut current = slot.current.lock().unwrap_or_else(|p| p.into_inner());
        current.cancel();
        *current = CancellationToken::new();
        current.clone()
    };
    let _held = slot.lock.lock().await;
    let mut body = req.into_body().into_data_stream();
    match bundles.append(id, q.offset, &mut body, &token).await {
        Ok(stored) => {
            tracing::debug!(bundle = %id, stored, "bundle bytes stored");
            with_offset(Json(BundleStored { stored }), stored)
        }
        Err(BundleError::OffsetMismatch { id, offset, stored }) => with_offset(
            answer_draining(
                body,
                BundleError::OffsetMismatch { id, offset, stored }.into(),
            )
            .await,
            stored,
        ),
        Err(e) => answer_draining(body, e.into()).await,
    }
}

async fn answer_unread(req: axum::extract::Request, failure: ApiFailure) -> Response {
    crate::api::answer_unread(req, failure).await
}

/// `POST /v1/bundles/{id}/complete` (agents): 200 with the bundle, now complete.
pub(crate) async fn complete(
    State(hub): State<Arc<Hub>>,
    Extension(bundles): Extension<Arc<BundleStore>>,
    Extension(UploadingAgent(agent)): Extension<UploadingAgent>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiFailure> {
    let id = parse_id(&id)?;
    let claim: BundleComplete = crate::api::json_object(body)?;
    let rec = match bundles.admit(&agent, id).await {
        Ok(r) => r,
        Err(BundleError::AlreadyComplete(_)) => {
            // The agent's retry of a completion whose answer it did not get.
            match bundles.store.bundle(id).await.map_err(BundleError::from)? {
                Some(b) if b.sha256.as_deref() == Some(claim.sha256.as_str()) => {
                    return Ok(Json(b).into_response())
                }
                _ => return Err(BundleError::AlreadyComplete(id).into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let slot = bundles.slot(id);
    slot.current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .cancel();
    let _held = slot.lock.lock().await;
    match bundles.complete(rec, &claim).await {
        Ok(b) => {
            tracing::info!(bundle = %id, agent, size = b.size, "bundle stored");
            hub.publish(
                "bundle.stored",
                &agent,
                Some(id),
                || serde_json::json!({ "size": b.size, "sha256": b.sha256 }),
            );
            // Room for it: the oldest beyond the total go now, not at the next tick.
            if let Err(e) = bundles.expire(dbvm_protocol::now_ms()).await {
                tracing::warn!(error = %e, "expiring bundles failed");
            }
            Ok(Json(b).into_response())
        }
        Err(BundleError::OffsetMismatch { id, offset, stored }) => Ok(with_offset(
            ApiFailure::from(BundleError::OffsetMismatch { id, offset, stored }),
            stored,
        )),
        Err(e) => Err(e.into()),
    }
}

/// `GET /v1/bundles` (control planes).
pub(crate) async fn list(
    Extension(bundles): Extension<Arc<BundleStore>>,
) -> Result<Json<BundleList>, ApiFailure> {
    Ok(Json(bundles.list().await?))
}

/// `GET /v1/bundles/{id}` (control planes): the archive, streamed, with its SHA-256 in
/// `X-Dbvm-Sha256`.
pub(crate) async fn download(
    Extension(bundles): Extension<Arc<BundleStore>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiFailure> {
    let id = parse_id(&id)?;
    let (rec, file) = bundles.open_file(id).await?;
    let name = format!("bundle-{}-{id}.tar.zst", rec.agent_id);
    Ok((
        [
            (header::CONTENT_TYPE, "application/zstd".to_string()),
            (header::CONTENT_LENGTH, rec.size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (
                header::HeaderName::from_static(SHA256_HEADER),
                rec.sha256.unwrap_or_default(),
            ),
        ],
        axum::body::Body::from_stream(crate::artifacts::file_stream(file)),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BrokerBundleQuery {
    hours: Option<u32>,
}

/// `POST /v1/broker/bundle[?hours=N]` (control planes): the broker's own bundle, made now
/// and stored like an agent's; 201 with it.
pub(crate) async fn broker_bundle(
    State(hub): State<Arc<Hub>>,
    Extension(bundles): Extension<Arc<BundleStore>>,
    Extension(sources): Extension<Arc<crate::own_bundle::Sources>>,
    Query(q): Query<BrokerBundleQuery>,
) -> Result<Response, ApiFailure> {
    let hours = q.hours.unwrap_or(24);
    if !(1..=720).contains(&hours) {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("hours must be between 1 and 720, not {hours}"),
        ));
    }
    let b = crate::own_bundle::collect(&hub, &bundles, &sources, hours).await?;
    tracing::info!(bundle = %b.id, size = b.size, "the broker's own bundle stored");
    Ok((StatusCode::CREATED, Json(b)).into_response())
}

/// `DELETE /v1/bundles/{id}` (control planes): 204.
pub(crate) async fn remove(
    Extension(bundles): Extension<Arc<BundleStore>>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiFailure> {
    let id = parse_id(&id)?;
    if !bundles.delete(id, true).await? {
        return Err(BundleError::NotFound(id).into());
    }
    tracing::info!(bundle = %id, "bundle deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CommandRecord, Finish, SqliteStore};
    use dbvm_protocol::api::{CommandState, OperationClass};

    fn command(agent: &str, operation: &str) -> CommandRecord {
        CommandRecord {
            id: Uuid::new_v4(),
            agent_id: agent.into(),
            operation: operation.into(),
            class: OperationClass::Management,
            state: CommandState::Running,
            signed: vec![1],
            submitted_at_ms: 1,
            not_after_ms: i64::MAX,
            delivered_at_ms: Some(1),
            finished_at_ms: None,
            progress: None,
            output_json: None,
            error: None,
        }
    }

    async fn open(settings: BundleSettings) -> (tempfile::TempDir, BundleStore) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let bundles = BundleStore::open(dir.path(), settings, store).unwrap();
        (dir, bundles)
    }

    fn body(
        chunks: &[&[u8]],
    ) -> impl futures::Stream<Item = Result<axum::body::Bytes, String>> + Unpin {
        futures::stream::iter(
            chunks
                .iter()
                .map(|c| Ok(axum::body::Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        )
    }

    /// Uploads `bytes` for a new bundle.collect of `agent` in two requests and completes it.
    async fn stored(b: &BundleStore, agent: &str, bytes: &[u8]) -> BundleInfo {
        let cmd = command(agent, OPERATION);
        let id = cmd.id;
        b.store.insert_command(cmd).await.unwrap();
        let rec = b.admit(agent, id).await.unwrap();
        let half = bytes.len() / 2;
        let token = CancellationToken::new();
        let n = b
            .append(id, 0, &mut body(&[&bytes[..half]]), &token)
            .await
            .unwrap();
        assert_eq!(n, half as u64);
        // A request from a stale offset is told where to resume, and nothing changes.
        match b.append(id, 0, &mut body(&[b"xx"]), &token).await {
            Err(BundleError::OffsetMismatch { stored, .. }) => assert_eq!(stored, half as u64),
            other => panic!("{other:?}"),
        }
        let n = b
            .append(id, n, &mut body(&[&bytes[half..]]), &token)
            .await
            .unwrap();
        assert_eq!(n, bytes.len() as u64);
        let sha = format!("{:x}", sha2::Sha256::digest(bytes));
        let claim = BundleComplete {
            size: n,
            sha256: sha.clone(),
        };
        let done = b.complete(rec, &claim).await.unwrap();
        assert_eq!(
            (done.state, done.sha256.as_deref()),
            (BundleState::Complete, Some(sha.as_str()))
        );
        done
    }

    #[tokio::test]
    async fn uploads_resume_complete_only_when_the_hash_matches_and_only_for_their_agent() {
        let (_dir, b) = open(BundleSettings::default()).await;
        let done = stored(&b, "db1", b"0123456789abcdef").await;
        let (rec, _) = b.open_file(done.id).await.unwrap();
        assert_eq!(rec.size, 16);
        assert!(matches!(
            b.admit("db1", done.id).await,
            Err(BundleError::AlreadyComplete(_))
        ));

        // Another agent, another operation, a finished command: refused.
        let cmd = command("db1", OPERATION);
        let id = cmd.id;
        b.store.insert_command(cmd).await.unwrap();
        assert!(matches!(
            b.admit("db2", id).await,
            Err(BundleError::NotYours { .. })
        ));
        let ping = command("db1", "ping");
        let ping_id = ping.id;
        b.store.insert_command(ping).await.unwrap();
        assert!(matches!(
            b.admit("db1", ping_id).await,
            Err(BundleError::NotABundle { .. })
        ));

        // A hash that does not match removes what was stored.
        let rec = b.admit("db1", id).await.unwrap();
        let token = CancellationToken::new();
        b.append(id, 0, &mut body(&[b"abc"]), &token).await.unwrap();
        let claim = BundleComplete {
            size: 3,
            sha256: "0".repeat(64),
        };
        assert!(matches!(
            b.complete(rec.clone(), &claim).await,
            Err(BundleError::Mismatch { .. })
        ));
        assert!(!b.part_path(id).exists());
        assert!(matches!(
            b.open_file(id).await,
            Err(BundleError::NotFound(_))
        ));

        // Past the cap: refused, nothing kept.
        let (_dir2, small) = open(BundleSettings {
            max_bytes: 64 * 1024,
            ..BundleSettings::default()
        })
        .await;
        let cmd = command("db1", OPERATION);
        let id = cmd.id;
        small.store.insert_command(cmd).await.unwrap();
        small.admit("db1", id).await.unwrap();
        let big = vec![7u8; 40 * 1024];
        let e = small.append(id, 0, &mut body(&[&big, &big]), &token).await;
        assert!(matches!(e, Err(BundleError::TooLarge { .. })), "{e:?}");
        assert!(!small.part_path(id).exists());
        assert!(small.store.bundle(id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn expiry_removes_old_bundles_the_oldest_beyond_the_total_abandoned_uploads_and_strays() {
        let (_dir, b) = open(BundleSettings {
            max_bytes: 64 * 1024,
            max_total_bytes: 64 * 1024,
            max_age_hours: 1,
            log_dir: None,
            s3: None,
        })
        .await;
        let a = stored(&b, "db1", &[1u8; 30 * 1024]).await;
        let c = stored(&b, "db2", &[2u8; 30 * 1024]).await;
        assert_eq!(b.expire(dbvm_protocol::now_ms()).await.unwrap(), 0);
        // A third passes the total: the oldest goes.
        let mut older = a.clone();
        older.created_at_ms -= 10;
        older.completed_at_ms = older.completed_at_ms.map(|t| t - 10);
        b.store.put_bundle(older).await.unwrap();
        let d = stored(&b, "db3", &[3u8; 30 * 1024]).await;
        assert_eq!(b.expire(dbvm_protocol::now_ms()).await.unwrap(), 1);
        let ids: Vec<Uuid> = b
            .list()
            .await
            .unwrap()
            .bundles
            .iter()
            .map(|x| x.id)
            .collect();
        assert!(
            !ids.contains(&a.id) && ids.contains(&c.id) && ids.contains(&d.id),
            "{ids:?}"
        );
        assert!(!b.file_path(a.id).exists());

        // An upload whose command finished without completing it, and a stray file.
        let cmd = command("db4", OPERATION);
        let id = cmd.id;
        b.store.insert_command(cmd).await.unwrap();
        b.admit("db4", id).await.unwrap();
        b.append(id, 0, &mut body(&[b"partial"]), &CancellationToken::new())
            .await
            .unwrap();
        let finish = Finish {
            state: CommandState::Failed,
            finished_at_ms: 2,
            delivered_at_ms: None,
            output_json: None,
            error: None,
        };
        b.store.finish(id, finish).await.unwrap();
        std::fs::write(b.dir().join("stray.tar.zst"), b"x").unwrap();
        assert_eq!(b.expire(dbvm_protocol::now_ms()).await.unwrap(), 1);
        assert!(!b.part_path(id).exists());
        assert!(!b.dir().join("stray.tar.zst").exists());

        // Two hours on, everything is past its age.
        assert_eq!(
            b.expire(dbvm_protocol::now_ms() + 2 * 3_600_000)
                .await
                .unwrap(),
            2
        );
        assert!(b.list().await.unwrap().bundles.is_empty());
        assert_eq!(std::fs::read_dir(b.dir()).unwrap().count(), 0);
    }
}
