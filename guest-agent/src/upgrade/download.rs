//! The new binary's download: HTTPS with the agent's own certificate, trusting only the
//! fleet CA (the same TLS configuration as the link), streamed to a file beside the
//! executable while it is hashed; never more than [`MAX_BYTES`]. hyper's client (already
//! in the agent for the S3 client) rather than reqwest, which added 1.3 MiB to the static
//! binary.

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
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
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
    let tls = dbvm_protocol::tls::client_config(
        ca_pem,
        Some((identity.cert_pem.as_str(), identity.key_pem.as_str())),
    )
    .map_err(|e| format!("TLS setup for the download: {e}"))?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(https);
    let resp = client
        .get(url.clone())
        .await
        .map_err(|e| format!("cannot download {url}: {}", causes(&e)))?;
    let status = resp.status();
    let total = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = resp.into_body();
    if !status.is_success() {
        let mut text = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                text.extend_from_slice(d);
            }
            if text.len() > 600 {
                break;
            }
        }
        let text: String = String::from_utf8_lossy(&text)
            .chars()
            .take(300)
            .filter(|c| !c.is_control())
            .collect();
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
        let frame = frame.map_err(|e| format!("downloading {url}: {}", causes(&e)))?;
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

/// An error with its causes (hyper's client says "client error (Connect)" and hides why).
fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
