//! The new binary's download: HTTPS with the agent's own certificate, trusting only the
//! fleet CA ([`crate::https`]), streamed to a file beside the executable while it is
//! hashed; never more than [`MAX_BYTES`].

use crate::dispatch::OpContext;
use crate::identity::Identity;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Largest binary accepted (the static agent is ~23 MiB).
pub const MAX_BYTES: u64 = 256 * 1024 * 1024;
/// The whole download; a stalled one is given up.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(600);

/// Downloads `url` into `dest` (created 0700, replaced if a crashed attempt left it),
/// synced, and returns its SHA-256 in lowercase hex.
pub async fn fetch(
    url: &hyper::Uri,
    ca_pem: &str,
    identity: &Identity,
    dest: &Path,
    ctx: &OpContext,
) -> Result<String, String> {
    tokio::time::timeout(TOTAL_TIMEOUT, fetch_inner(url, ca_pem, identity, dest, ctx))
        .await
        .map_err(|_| {
            format!(
                "downloading {url} took more than {} s",
                TOTAL_TIMEOUT.as_secs()
            )
        })?
}

async fn fetch_inner(
    url: &hyper::Uri,
    ca_pem: &str,
    identity: &Identity,
    dest: &Path,
    ctx: &OpContext,
) -> Result<String, String> {
    let client = crate::https::client::<Empty<Bytes>>(ca_pem, identity)
        .map_err(|e| format!("the download's {e}"))?;
    let resp = client
        .get(url.clone())
        .await
        .map_err(|e| format!("cannot download {url}: {}", crate::https::causes(&e)))?;
    let status = resp.status();
    let total = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = crate::https::error_text(body).await;
        return Err(format!(
            "downloading {url}: the server answered {status}: {text}"
        ));
    }
    if total.is_some_and(|n| n > MAX_BYTES) {
        return Err(format!(
            "{url} is {} bytes, more than an agent binary may be ({MAX_BYTES})",
            total.unwrap_or_default()
        ));
    }
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true).mode(0o700);
        let f = o.open(dest).map_err(|e| {
            format!(
                "cannot write beside the agent's executable ({}): {e}",
                dest.display()
            )
        })?;
        tokio::fs::File::from_std(f)
    };
    let mut hash = Sha256::new();
    let mut got: u64 = 0;
    let mut last_percent = 0;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| format!("downloading {url}: {}", crate::https::causes(&e)))?;
        let Some(chunk) = frame.data_ref() else {
            continue;
        };
        got += chunk.len() as u64;
        if got > MAX_BYTES {
            return Err(format!(
                "{url} is more than an agent binary may be ({MAX_BYTES} bytes)"
            ));
        }
        hash.update(chunk);
        file.write_all(chunk)
            .await
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        if let Some(t) = total.filter(|t| *t > 0) {
            // The download is the first 60 % of the operation.
            let percent = (1 + got * 58 / t) as u8;
            if percent >= last_percent + 10 {
                last_percent = percent;
                ctx.progress(percent, format!("downloaded {got} of {t} bytes"));
            }
        }
    }
    if total.is_some_and(|t| t != got) {
        return Err(format!(
            "downloading {url}: the connection ended after {got} of {} bytes",
            total.unwrap_or_default()
        ));
    }
    file.flush()
        .await
        .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    file.sync_all()
        .await
        .map_err(|e| format!("cannot sync {}: {e}", dest.display()))?;
    let sum = hash.finalize();
    Ok(sum.iter().map(|b| format!("{b:02x}")).collect())
}
