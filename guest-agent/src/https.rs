//! The agent's HTTPS client to the broker's API (downloading a new binary, uploading a
//! log bundle): the agent's own certificate, trusting only the fleet CA (the link's TLS
//! configuration), HTTP/1.1. hyper's client, already in the agent for the S3 client,
//! rather than reqwest, which added 1.3 MiB to the static binary.

use crate::identity::Identity;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client whose requests carry bodies of type `B`.
pub fn client<B>(
    ca_pem: &str,
    identity: &Identity,
) -> Result<Client<HttpsConnector<HttpConnector>, B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let tls = dbvm_protocol::tls::client_config(
        ca_pem,
        Some((identity.cert_pem.as_str(), identity.key_pem.as_str())),
    )
    .map_err(|e| format!("TLS setup: {e}"))?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

/// An error with its causes (hyper's client says "client error (Connect)" and hides why).
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The start of an error answer's body, as text safe to quote (no control characters).
pub async fn error_text<B>(body: B) -> String
where
    B: hyper::body::Body<Data = hyper::body::Bytes> + Unpin,
{
    use http_body_util::BodyExt;
    let mut body = body;
    let mut text = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            text.extend_from_slice(d);
        }
        if text.len() > 600 {
            break;
        }
    }
    String::from_utf8_lossy(&text)
        .chars()
        .take(300)
        .filter(|c| !c.is_control())
        .collect()
}
