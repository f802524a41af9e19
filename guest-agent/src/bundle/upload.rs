//! A bundle's way to the broker: uploaded while it is written, resumable.
//!
//! The archive's chunks go to a file in the state directory ([`spool`]), which is the
//! upload's buffer: [`upload`] streams that file to `PUT /v1/bundles/{id}/content` as it
//! grows, over an HTTPS connection of its own ([`crate::https`]), not over the link, so
//! a bundle never queues the link's commands, heartbeats and results behind it. TCP's
//! flow control is the back-pressure: the file is read only as fast as the broker takes
//! it. When the connection breaks or the broker restarts, the next request says where
//! it starts, the broker answers what it holds (`Upload-Offset`) and the upload resumes
//! from there: nothing is sent twice, nothing is lost. At the end the agent tells the
//! broker the size and SHA-256; the broker checks them against what it stored.

use crate::identity::Identity;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};

/// Bytes read from the file for one chunk of the request body.
const CHUNK: usize = 256 * 1024;
/// A request that moves nothing for this long is dropped and the upload resumed (a
/// connection that died without a reset).
const STALL: Duration = Duration::from_secs(60);
/// Retries wait from the first to the second, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));
/// The upload gives up when the broker took nothing new for this long.
pub const GIVE_UP: Duration = Duration::from_secs(600);

/// What the writer has put in the file so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub end: Option<End>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The archive is whole: its size and SHA-256.
    Complete { size: u64, sha256: String },
    /// The archive will not be finished.
    Failed,
}

/// Where a bundle goes: the broker's API and the agent's credentials for it.
#[derive(Clone)]
pub struct Destination {
    /// `https://host:port/v1/bundles/<id>`.
    pub bundle_url: String,
    pub ca_pem: String,
    pub identity: Identity,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("bundle_url", &self.bundle_url)
            .finish_non_exhaustive()
    }
}

/// Checks the broker's API address a command gives (`https://host:port`, nothing else).
pub fn check_broker_url(url: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("broker_url {url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("broker_url {url:?} must be https://host:port"));
    }
    let Some(auth) = uri.authority() else {
        return Err(format!("broker_url {url:?} names no host"));
    };
    if auth.as_str().contains('@') {
        return Err(
            "broker_url must not carry credentials: the agent authenticates with its certificate"
                .into(),
        );
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "broker_url {url:?} must be the API's address only (https://host:port), without a path or query"
        ));
    }
    Ok(uri)
}

/// How the upload went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uploaded {
    pub bytes: u64,
    pub sha256: String,
    /// Requests after the first (each resumed from what the broker held).
    pub resumed: u32,
}

/// Creates the file the archive is written to (0600, empty), before its upload reads it.
pub async fn create(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await
}

/// Writes the archive's chunks to `file` (from [`create`]), publishing how much is
/// written; returns its size and SHA-256. On a thread of its own at the bundle's
/// priority (`dbvm_bundle::in_background`): plain writes and the hash, where tokio's
/// file cost two trips to the blocking pool per chunk and the hash ran on the runtime
/// beside the link.
pub async fn spool(
    file: tokio::fs::File,
    mut chunks: mpsc::Receiver<Vec<u8>>,
    written: &watch::Sender<Written>,
) -> std::io::Result<(u64, String)> {
    use std::io::Write;
    let mut file = file.into_std().await;
    let written = written.clone();
    dbvm_bundle::in_background("bundle-upload-spool", move || {
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = chunks.blocking_recv() {
            hasher.update(&chunk);
            // A plain write: in the file, where the upload reads it, once it returns.
            file.write_all(&chunk)?;
            bytes += chunk.len() as u64;
            written.send_modify(|w| w.bytes = bytes);
        }
        // Not synced: the file is the upload's buffer, read back at once; an agent that
        // crashes does not resume (its command is interrupted), so no fsync of the whole
        // archive delays the end of the upload.
        let sha: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok((bytes, sha))
    })
    .await
    .map_err(std::io::Error::other)?
}

enum Attempt {
    /// The broker holds this many bytes.
    Stored(u64),
    /// Try again after a pause (the broker may say what it holds).
    Retry { why: String, stored: Option<u64> },
    /// The broker dropped what it held: send it all again.
    Restart(String),
    /// Retrying cannot help.
    Fatal(String),
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    BoxBody<Bytes, std::io::Error>,
>;

/// Uploads the growing file `path` to `dest` until the writer says it is complete and
/// the broker has checked it. `progress` hears the bytes the broker holds.
pub async fn upload(
    dest: &Destination,
    path: &Path,
    mut written: watch::Receiver<Written>,
    progress: impl Fn(u64),
) -> Result<Uploaded, String> {
    let client: Client = crate::https::client(&dest.ca_pem, &dest.identity)
        .map_err(|e| format!("the bundle upload's {e}"))?;
    let mut offset = 0u64;
    let mut requests = 0u32;
    let mut backoff = BACKOFF.0;
    let mut last_gain = Instant::now();
    let mut restarts = 0u32;
    // After a request that got no answer, an empty one first asks where the broker is: a
    // body sent from a wrong offset is refused while it is still being written, and the
    // refusal (with the broker's offset) is lost in the broken pipe.
    let mut probe_first = false;
    loop {
        let end = written.borrow().end.clone();
        let attempt = match &end {
            Some(End::Failed) => return Err("the bundle was not finished".into()),
            Some(End::Complete { size, sha256 }) if offset == *size => {
                complete(&client, dest, *size, sha256).await
            }
            _ if probe_first => match put_empty(&client, dest, offset).await {
                // What the broker holds is where this upload goes on.
                Attempt::Stored(n)
                | Attempt::Retry {
                    stored: Some(n), ..
                } => {
                    probe_first = false;
                    offset = n;
                    continue;
                }
                other => other,
            },
            _ => {
                requests += 1;
                put(&client, dest, path, offset, written.clone()).await
            }
        };
        match attempt {
            Attempt::Stored(stored) => {
                if let Some(End::Complete { size, sha256 }) = &end {
                    if offset == *size && stored == *size {
                        return Ok(Uploaded {
                            bytes: *size,
                            sha256: sha256.clone(),
                            resumed: requests.saturating_sub(1),
                        });
                    }
                }
                if stored > offset {
                    last_gain = Instant::now();
                    backoff = BACKOFF.0;
                }
                offset = stored;
                progress(stored);
            }
            Attempt::Restart(why) => {
                // The broker dropped what it held (its hash did not match): the whole
                // file again, once; a second mismatch is no accident of the transfer.
                restarts += 1;
                if restarts > 1 {
                    return Err(format!("the bundle failed the broker's check twice: {why}"));
                }
                offset = 0;
            }
            Attempt::Retry { why, stored } => {
                match stored {
                    Some(s) => offset = s,
                    None => probe_first = true,
                }
                if last_gain.elapsed() > GIVE_UP {
                    return Err(format!(
                        "the broker took nothing of the bundle for {} s: {why}",
                        GIVE_UP.as_secs()
                    ));
                }
                tracing::info!(offset, error = %why, "bundle upload interrupted; resuming");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
            Attempt::Fatal(why) => return Err(why),
        }
        // Nothing new to send yet: wait for the writer.
        let w = written.borrow().clone();
        if w.end.is_none() && w.bytes <= offset && written.changed().await.is_err() {
            return Err("the bundle writer stopped".into());
        }
    }
}

/// One `PUT …/content?offset=N` streaming the file from `offset` as it grows.
async fn put(
    client: &Client,
    dest: &Destination,
    path: &Path,
    offset: u64,
    written: watch::Receiver<Written>,
) -> Attempt {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => return Attempt::Fatal(format!("cannot read {}: {e}", path.display())),
    };
    if let Err(e) = file.seek(std::io::SeekFrom::Start(offset)).await {
        return Attempt::Fatal(format!("cannot read {}: {e}", path.display()));
    }
    let moved = Arc::new(AtomicI64::new(dbvm_protocol::now_ms()));
    let body = growing_file(file, path.to_path_buf(), offset, written, moved.clone());
    let url = format!("{}/content?offset={offset}", dest.bundle_url);
    let req = match hyper::Request::put(&url)
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
        .body(BoxBody::new(StreamBody::new(body)))
    {
        Ok(r) => r,
        Err(e) => return Attempt::Fatal(format!("bad upload request {url}: {e}")),
    };
    let sent = client.request(req);
    tokio::pin!(sent);
    let resp = loop {
        tokio::select! {
            r = &mut sent => break r,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                let idle = dbvm_protocol::now_ms() - moved.load(Ordering::Relaxed);
                if idle > STALL.as_millis() as i64 {
                    return Attempt::Retry {
                        why: format!("the upload moved nothing for {} s", STALL.as_secs()),
                        stored: None,
                    };
                }
            }
        }
    };
    answer(resp, &url).await
}

/// An empty `PUT …/content?offset=N`: the broker answers what it holds (200 when that is
/// `offset`, 409 with `Upload-Offset` otherwise).
async fn put_empty(client: &Client, dest: &Destination, offset: u64) -> Attempt {
    let url = format!("{}/content?offset={offset}", dest.bundle_url);
    let req = match hyper::Request::put(&url)
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
        .body(BoxBody::new(
            Full::new(Bytes::new()).map_err(|never| match never {}),
        )) {
        Ok(r) => r,
        Err(e) => return Attempt::Fatal(format!("bad upload request {url}: {e}")),
    };
    match tokio::time::timeout(STALL, client.request(req)).await {
        Err(_) => Attempt::Retry {
            why: format!("the broker did not answer within {} s", STALL.as_secs()),
            stored: None,
        },
        Ok(r) => answer(r, &url).await,
    }
}

/// `POST …/complete` with the size and SHA-256.
async fn complete(client: &Client, dest: &Destination, size: u64, sha256: &str) -> Attempt {
    let url = format!("{}/complete", dest.bundle_url);
    let json = serde_json::json!({ "size": size, "sha256": sha256 }).to_string();
    let req = match hyper::Request::post(&url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(BoxBody::new(
            Full::new(Bytes::from(json)).map_err(|never| match never {}),
        )) {
        Ok(r) => r,
        Err(e) => return Attempt::Fatal(format!("bad completion request {url}: {e}")),
    };
    match tokio::time::timeout(STALL, client.request(req)).await {
        Err(_) => Attempt::Retry {
            why: format!(
                "the broker did not answer the completion within {} s",
                STALL.as_secs()
            ),
            stored: None,
        },
        Ok(r) => match answer(r, &url).await {
            // The answer to a completion is the bundle; it holds all of it.
            Attempt::Stored(_) => Attempt::Stored(size),
            other => other,
        },
    }
}

/// What the broker's answer means for the upload.
async fn answer(
    resp: Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
    url: &str,
) -> Attempt {
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            return Attempt::Retry {
                why: format!("{url}: {}", crate::https::causes(&e)),
                stored: None,
            }
        }
    };
    let status = resp.status();
    let stored = resp
        .headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let text = crate::https::error_text(resp.into_body()).await;
    use hyper::StatusCode as S;
    match status {
        s if s.is_success() => match stored {
            Some(n) => Attempt::Stored(n),
            // A completion's answer carries no offset.
            None => Attempt::Stored(0),
        },
        S::CONFLICT if text.contains("\"offset_mismatch\"") || text.contains("\"superseded\"") => {
            Attempt::Retry { why: text, stored }
        }
        // The broker dropped what it held (its hash did not match): from the start.
        S::UNPROCESSABLE_ENTITY => Attempt::Restart(text),
        S::REQUEST_TIMEOUT
        | S::TOO_MANY_REQUESTS
        | S::BAD_GATEWAY
        | S::SERVICE_UNAVAILABLE
        | S::GATEWAY_TIMEOUT
        | S::INTERNAL_SERVER_ERROR => Attempt::Retry {
            why: format!("the broker answered {status}: {text}"),
            stored,
        },
        _ => Attempt::Fatal(format!("the broker refused the bundle ({status}): {text}")),
    }
}

/// The file from `pos` as it grows, ending when the writer says the archive is complete
/// and all of it was read.
fn growing_file(
    file: tokio::fs::File,
    path: PathBuf,
    pos: u64,
    written: watch::Receiver<Written>,
    moved: Arc<AtomicI64>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static {
    struct State {
        file: tokio::fs::File,
        path: PathBuf,
        pos: u64,
        written: watch::Receiver<Written>,
        moved: Arc<AtomicI64>,
    }
    let state = State {
        file,
        path,
        pos,
        written,
        moved,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            let w = st.written.borrow_and_update().clone();
            if st.pos < w.bytes {
                let want = usize::try_from(w.bytes - st.pos)
                    .unwrap_or(CHUNK)
                    .min(CHUNK);
                let mut buf = vec![0u8; want];
                let read = st.file.read_exact(&mut buf).await;
                if let Err(e) = read {
                    let e = std::io::Error::new(e.kind(), format!("{}: {e}", st.path.display()));
                    return Some((Err(e), st));
                }
                st.pos += want as u64;
                st.moved.store(dbvm_protocol::now_ms(), Ordering::Relaxed);
                return Some((Ok(Frame::data(Bytes::from(buf))), st));
            }
            match w.end {
                Some(End::Complete { .. }) => return None,
                Some(End::Failed) => {
                    return Some((
                        Err(std::io::Error::other("the bundle was not finished")),
                        st,
                    ))
                }
                None => {}
            }
            // Waiting for the writer is not a stall of the connection.
            st.moved.store(dbvm_protocol::now_ms(), Ordering::Relaxed);
            if st.written.changed().await.is_err() {
                return Some((Err(std::io::Error::other("the bundle writer stopped")), st));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_an_https_address_only() {
        assert!(check_broker_url("https://broker.example:8443").is_ok());
        assert!(check_broker_url("https://127.0.0.1:8443/").is_ok());
        for bad in [
            "http://broker:8443",
            "https://user:pw@broker:8443",
            "https://broker:8443/v1/bundles",
            "https://broker:8443?x=1",
            "broker:8443",
            "",
        ] {
            assert!(check_broker_url(bad).is_err(), "{bad} accepted");
        }
    }
}
