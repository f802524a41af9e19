//! The artifact store: files control planes upload (`PUT /v1/artifacts/{sha256}`) for
//! agents to download (`GET`), each named by the SHA-256 of its bytes: new agent
//! binaries for the signed `agent.upgrade` command.
//!
//! Files live in `<data_dir>/artifacts/<sha256>`. An upload streams into a part file of
//! its own, `<sha256>.<random>.part`, hashed and counted as it arrives (never whole in
//! memory). Only bytes that hash to the name and fit under `artifacts.max_bytes` become
//! the artifact: the part is fsynced, hard-linked to `<sha256>`, the directory fsynced,
//! the part removed. A hard link rather than a rename because it never replaces: of two
//! uploads of one artifact at once, the second finds the first's file in place (same
//! bytes, proven by the hash) and answers "already stored", and a reader never sees a
//! file change under it. Whatever fails, and an upload that breaks off, removes its part;
//! parts a crash left behind are removed when the broker starts.
//!
//! Who may do what is decided in [`crate::api`]'s router: control planes everything,
//! agents only `GET /v1/artifacts/{sha256}`, with a certificate that is not revoked.

use crate::api::{answer_draining, ApiFailure, Peer, PeerCertificate};
use crate::hub::Hub;
use crate::revocation::Verdict;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use dbvm_protocol::api::{ArtifactEntry, ArtifactInfo};
use dbvm_protocol::pki::Identity;
use futures::{Stream, StreamExt};
use sha2::Digest;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The directory under the data dir.
pub const DIR_NAME: &str = "artifacts";
const PART_SUFFIX: &str = ".part";
/// An upload that sends nothing for this long is given up (its connection slot is
/// wanted by others).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Read size when serving a file.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{0:?} is not a SHA-256: give 64 lowercase hex digits")]
    BadSha256(String),
    #[error("the uploaded bytes hash to {actual}, not to {expected} named in the path: the file changed or another one was sent; nothing was stored")]
    Mismatch { expected: String, actual: String },
    #[error("the artifact is larger than this broker's cap of {max} bytes (artifacts.max_bytes in its config); nothing was stored")]
    TooLarge { max: u64 },
    #[error("no artifact {0} on this broker: upload it with PUT /v1/artifacts/{0} (dbvmctl upgrade does)")]
    NotFound(String),
    #[error("the upload sent nothing for {} s; nothing was stored", .0.as_secs())]
    Stalled(Duration),
    #[error("the upload broke off ({0}); nothing was stored")]
    Body(String),
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ArtifactError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The disk (or the broker user's quota) is full.
    pub fn is_disk_full(&self) -> bool {
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        matches!(self, Self::Io { source, .. } if matches!(source.kind(), StorageFull | QuotaExceeded))
    }
}

impl From<ArtifactError> for ApiFailure {
    fn from(e: ArtifactError) -> Self {
        let (status, code) = match &e {
            ArtifactError::BadSha256(_) => (StatusCode::BAD_REQUEST, "bad_sha256"),
            ArtifactError::Mismatch { .. } => (StatusCode::BAD_REQUEST, "sha256_mismatch"),
            ArtifactError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ArtifactError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ArtifactError::Stalled(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ArtifactError::Body(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ArtifactError::Io { .. } if e.is_disk_full() => {
                tracing::error!(error = %e, "artifact store: disk full");
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            ArtifactError::Io { .. } => {
                tracing::error!(error = %e, "artifact store error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiFailure::new(status, code, e.to_string())
    }
}

/// Checks that `text` is a SHA-256 as artifacts are named: 64 lowercase hex digits.
pub fn parse_sha256(text: &str) -> Result<&str, ArtifactError> {
    if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(text)
    } else {
        Err(ArtifactError::BadSha256(text.chars().take(80).collect()))
    }
}

fn info(sha256: &str, size: u64) -> ArtifactInfo {
    ArtifactInfo {
        sha256: sha256.to_string(),
        size,
        path: format!("/v1/artifacts/{sha256}"),
    }
}

/// A part file being written; removed when dropped unless it was removed already (so
/// an upload whose request is dropped mid-way leaves nothing behind).
struct Part {
    path: PathBuf,
    file: tokio::fs::File,
}

impl Drop for Part {
    fn drop(&mut self) {
        // Quick (an unlink), and Drop cannot await.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The artifacts of one broker, in `<data_dir>/artifacts`.
#[derive(Debug)]
pub struct ArtifactStore {
    dir: PathBuf,
    max_bytes: u64,
}

impl ArtifactStore {
    /// Opens `<data_dir>/artifacts` (made when absent) and removes the part files a
    /// crash left behind. Called once at start, before the API serves.
    pub fn open(data_dir: &Path, max_bytes: u64) -> Result<Self, ArtifactError> {
        let dir = data_dir.join(DIR_NAME);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)
            .map_err(ArtifactError::io("create", &dir))?;
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir).map_err(ArtifactError::io("list", &dir))? {
            let entry = entry.map_err(ArtifactError::io("list", &dir))?;
            if entry.file_name().to_string_lossy().ends_with(PART_SUFFIX) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(ArtifactError::io("remove", &path))?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, dir = %dir.display(), "removed unfinished artifact uploads");
        }
        Ok(Self { dir, max_bytes })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Stores the bytes of `body` as artifact `sha256` (already checked with
    /// [`parse_sha256`]). Returns its description and whether it is new (`false`: it
    /// was stored already, by an earlier or a concurrent upload of the same bytes).
    pub async fn put<S, E>(
        &self,
        sha256: &str,
        mut body: S,
    ) -> Result<(ArtifactInfo, bool), ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let path = self.path_of(sha256);
        let part_path = self.dir.join(format!(
            "{sha256}.{}{PART_SUFFIX}",
            uuid::Uuid::new_v4().simple()
        ));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&part_path)
            .await
            .map_err(ArtifactError::io("create", &part_path))?;
        let mut part = Part {
            path: part_path,
            file,
        };
        let mut hasher = sha2::Sha256::new();
        let mut size: u64 = 0;
        loop {
            let chunk = match tokio::time::timeout(STALL_TIMEOUT, body.next()).await {
                Err(_) => return Err(ArtifactError::Stalled(STALL_TIMEOUT)),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(ArtifactError::Body(e.to_string())),
                Ok(Some(Ok(chunk))) => chunk,
            };
            size = size.saturating_add(chunk.len() as u64);
            if size > self.max_bytes {
                return Err(ArtifactError::TooLarge {
                    max: self.max_bytes,
                });
            }
            hasher.update(&chunk);
            part.file
                .write_all(&chunk)
                .await
                .map_err(ArtifactError::io("write", &part.path))?;
        }
        let actual = format!("{:x}", hasher.finalize());
        if actual != sha256 {
            return Err(ArtifactError::Mismatch {
                expected: sha256.to_string(),
                actual,
            });
        }
        part.file
            .flush()
            .await
            .map_err(ArtifactError::io("write", &part.path))?;
        part.file
            .sync_all()
            .await
            .map_err(ArtifactError::io("fsync", &part.path))?;
        let created = match tokio::fs::hard_link(&part.path, &path).await {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(ArtifactError::io("link", &path)(e)),
        };
        drop(part);
        if created {
            let dir_of = path.clone();
            tokio::task::spawn_blocking(move || dbvm_host::fs::sync_dir(&dir_of))
                .await
                .map_err(|e| ArtifactError::io("fsync the directory of", &path)(e.into()))?
                .map_err(ArtifactError::io("fsync the directory of", &path))?;
        }
        Ok((info(sha256, size), created))
    }

    /// Opens artifact `sha256` for reading; its size.
    pub async fn open_file(&self, sha256: &str) -> Result<(tokio::fs::File, u64), ArtifactError> {
        let path = self.path_of(sha256);
        let file = match tokio::fs::File::open(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ArtifactError::NotFound(sha256.to_string()))
            }
            other => other.map_err(ArtifactError::io("open", &path))?,
        };
        let size = file
            .metadata()
            .await
            .map_err(ArtifactError::io("stat", &path))?
            .len();
        Ok((file, size))
    }

    /// Every stored artifact, by SHA-256.
    pub async fn list(&self) -> Result<Vec<ArtifactEntry>, ArtifactError> {
        let dir = self.dir.clone();
        let listed = tokio::task::spawn_blocking(move || -> Result<_, ArtifactError> {
            let mut out = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(ArtifactError::io("list", &dir))? {
                let entry = entry.map_err(ArtifactError::io("list", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // Parts of uploads under way are not artifacts yet.
                if parse_sha256(&name).is_err() {
                    continue;
                }
                let path = entry.path();
                let meta = match entry.metadata() {
                    // Deleted between the listing and now.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    other => other.map_err(ArtifactError::io("stat", &path))?,
                };
                let stored_at_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                out.push(ArtifactEntry {
                    sha256: name,
                    size: meta.len(),
                    stored_at_ms,
                });
            }
            out.sort_by(|a, b| a.sha256.cmp(&b.sha256));
            Ok(out)
        });
        listed.await.map_err(|e| ArtifactError::Io {
            op: "list",
            path: self.dir.clone(),
            source: e.into(),
        })?
    }

    /// Removes artifact `sha256`. A download under way finishes (it holds the file open).
    pub async fn delete(&self, sha256: &str) -> Result<(), ArtifactError> {
        let path = self.path_of(sha256);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ArtifactError::NotFound(sha256.to_string()))
            }
            other => other.map_err(ArtifactError::io("remove", &path))?,
        }
        let dir_of = path.clone();
        tokio::task::spawn_blocking(move || dbvm_host::fs::sync_dir(&dir_of))
            .await
            .map_err(|e| ArtifactError::io("fsync the directory of", &path)(e.into()))?
            .map_err(ArtifactError::io("fsync the directory of", &path))
    }
}

/// The bytes of an open file as a stream of chunks. Hand-written (a few lines) rather
/// than enabling tokio-util's `io` feature for `ReaderStream` workspace-wide.
pub(crate) fn file_stream(
    file: tokio::fs::File,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0; CHUNK];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), file)))
    })
}

/// Who may download: a control plane, or an agent whose certificate is not revoked (the
/// agent link's handshake applies the same check). Everything else about artifacts is
/// for control planes only (the router puts those routes behind [`crate::api`]'s
/// control-plane check).
pub(crate) async fn auth_download(
    State(hub): State<Arc<Hub>>,
    Extension(peer): Extension<Peer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let refused = match &peer {
        Peer::Identity(Identity::ControlPlane(_)) => {
            let roles = req
                .extensions()
                .get::<crate::api::PeerRoles>()
                .map(|r| r.0.clone())
                .unwrap_or_default();
            crate::api::require_role(&peer, &roles, "get", "/v1/artifacts/{sha256}").err()
        }
        Peer::Identity(Identity::Agent(agent)) => {
            let cert = req.extensions().get::<PeerCertificate>().copied();
            agent_certificate_good(&hub, agent.as_str(), cert)
                .await
                .err()
        }
        other => crate::api::require_control_plane(other).err(),
    };
    match refused {
        None => next.run(req).await,
        Some(failure) => crate::api::answer_unread(req, failure).await,
    }
}

pub(crate) async fn agent_certificate_good(
    hub: &Hub,
    agent: &str,
    cert: Option<PeerCertificate>,
) -> Result<(), ApiFailure> {
    let forbidden = |why: String| ApiFailure::new(StatusCode::FORBIDDEN, "forbidden", why);
    let Some(PeerCertificate(cert)) = cert else {
        return Err(forbidden(format!(
            "the certificate of agent {agent} could not be checked against the revocation list"
        )));
    };
    let revocation = match hub
        .revocations
        .check(&cert.fingerprint, agent, cert.not_before_ms)
    {
        Verdict::Good => return Ok(()),
        Verdict::Revoked(r) => r,
        Verdict::AskStore(r) => match hub.store.certificate(cert.fingerprint).await {
            Ok(Some(c)) if c.revoked_at_ms.is_none() && c.agent_id == agent => return Ok(()),
            Ok(_) => r,
            Err(e) => return Err(e.into()),
        },
    };
    Err(forbidden(crate::hub::revoked_message(agent, &revocation)))
}

/// `PUT /v1/artifacts/{sha256}`: 201 when stored, 200 when it was there already.
pub(crate) async fn upload(
    Extension(store): Extension<Arc<ArtifactStore>>,
    UrlPath(sha256): UrlPath<String>,
    req: axum::extract::Request,
) -> Response {
    let refused = match parse_sha256(&sha256) {
        Err(e) => Some(e),
        Ok(_) => req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|len| *len > store.max_bytes())
            .map(|_| ArtifactError::TooLarge {
                max: store.max_bytes(),
            }),
    };
    if let Some(e) = refused {
        return crate::api::answer_unread(req, e.into()).await;
    }
    let mut body = req.into_body().into_data_stream();
    match store.put(&sha256, &mut body).await {
        Ok((info, created)) => {
            tracing::info!(sha256, size = info.size, created, "artifact stored");
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(info)).into_response()
        }
        // Refused before the body ended (too large): let the client finish sending
        // before the answer, as for any early answer.
        Err(e) => answer_draining(body, e.into()).await,
    }
}

/// `GET /v1/artifacts/{sha256}`: the bytes, streamed.
pub(crate) async fn download(
    Extension(store): Extension<Arc<ArtifactStore>>,
    UrlPath(sha256): UrlPath<String>,
) -> Result<Response, ApiFailure> {
    let sha256 = parse_sha256(&sha256)?;
    let (file, size) = store.open_file(sha256).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        axum::body::Body::from_stream(file_stream(file)),
    )
        .into_response())
}

/// `GET /v1/artifacts`.
pub(crate) async fn list(
    Extension(store): Extension<Arc<ArtifactStore>>,
) -> Result<Json<Vec<ArtifactEntry>>, ApiFailure> {
    Ok(Json(store.list().await?))
}

/// `DELETE /v1/artifacts/{sha256}`: 204.
pub(crate) async fn remove(
    Extension(store): Extension<Arc<ArtifactStore>>,
    UrlPath(sha256): UrlPath<String>,
) -> Result<StatusCode, ApiFailure> {
    let sha256 = parse_sha256(&sha256)?;
    store.delete(sha256).await?;
    tracing::info!(sha256, "artifact deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        format!("{:x}", sha2::Sha256::digest(bytes))
    }

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn only_64_lowercase_hex_digits_name_an_artifact() {
        let good = sha(b"x");
        assert!(parse_sha256(&good).is_ok());
        for bad in [
            good.to_uppercase(),
            good[..63].to_string(),
            format!("{good}0"),
            "../../etc/passwd".to_string(),
            format!("{}.part", &good[..59]),
            String::new(),
        ] {
            let e = parse_sha256(&bad).unwrap_err();
            assert!(matches!(e, ArtifactError::BadSha256(_)), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn uploads_are_checked_stored_once_and_leave_no_parts() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path(), 4096).unwrap();
        let name = sha(b"hello world");
        let (info, created) = store
            .put(&name, chunks(&[b"hello", b" ", b"world"]))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(
            (info.size, info.path.clone()),
            (11, format!("/v1/artifacts/{name}"))
        );
        let (again, created) = store.put(&name, chunks(&[b"hello world"])).await.unwrap();
        assert_eq!((again, created), (info, false));
        assert_eq!(names(store.dir()), [name.as_str()]);

        // Wrong bytes, or too many: refused, nothing left.
        let other = sha(b"other");
        let e = store
            .put(&other, chunks(&[b"not other"]))
            .await
            .unwrap_err();
        assert!(matches!(e, ArtifactError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains(&other), "{e}");
        static BIG: [u8; 3000] = [7; 3000];
        let e = store
            .put(&sha(&[7; 6000]), chunks(&[&BIG, &BIG]))
            .await
            .unwrap_err();
        assert!(matches!(e, ArtifactError::TooLarge { max: 4096 }), "{e}");
        // A body that breaks off.
        let broken = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"part")),
            Err(std::io::Error::other("connection reset")),
        ]);
        let e = store.put(&other, broken).await.unwrap_err();
        assert!(e.to_string().contains("connection reset"), "{e}");
        assert_eq!(names(store.dir()), [name.as_str()]);

        let listed = store.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].sha256.as_str(), listed[0].size), (&*name, 11));
        assert!(listed[0].stored_at_ms > 0);
        store.delete(&name).await.unwrap();
        assert!(matches!(
            store.delete(&name).await.unwrap_err(),
            ArtifactError::NotFound(_)
        ));
        assert!(matches!(
            store.open_file(&name).await.unwrap_err(),
            ArtifactError::NotFound(_)
        ));
    }

    #[tokio::test]
    async fn concurrent_uploads_of_one_artifact_store_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ArtifactStore::open(dir.path(), 1 << 20).unwrap());
        static DATA: [u8; 100_000] = [42; 100_000];
        let name = sha(&DATA);
        let uploads = (0..8).map(|_| {
            let store = store.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let body = futures::stream::iter(
                    DATA.chunks(1000)
                        .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c)))
                        .collect::<Vec<_>>(),
                );
                store.put(&name, body).await.unwrap().1
            })
        });
        let created: Vec<bool> = futures::future::join_all(uploads)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
        assert_eq!(names(store.dir()), [name.as_str()]);
        assert_eq!(std::fs::read(store.dir().join(&name)).unwrap(), DATA);
    }

    #[test]
    fn parts_left_by_a_crash_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = dir.path().join(DIR_NAME);
        std::fs::create_dir_all(&artifacts).unwrap();
        let kept = sha(b"kept");
        std::fs::write(artifacts.join(&kept), b"kept").unwrap();
        std::fs::write(artifacts.join(format!("{kept}.abc.part")), b"ha").unwrap();
        std::fs::write(artifacts.join(format!("{}.part", sha(b"x"))), b"x").unwrap();
        let store = ArtifactStore::open(dir.path(), 4096).unwrap();
        assert_eq!(names(store.dir()), [kept]);
    }
}
