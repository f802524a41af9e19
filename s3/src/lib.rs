//! dbvm's own S3 client: the agent's MariaDB backups and binlogs (PostgreSQL's go through
//! pgBackRest) and the broker's copies of log bundles. aws-sdk-s3 over rustls on ring,
//! trusting exactly the CA an [`Endpoint`] names (the system's roots only when it names
//! none), path-style addressing, the endpoint's keys (never logged: they are [`Secret`]s,
//! and the SDK's `Credentials` redacts them in `Debug`).
//!
//! Objects carry a SHA-256: a small object is put whole with `x-amz-checksum-sha256` (the
//! server checks it: s3s-fs 0.14.1 does on PutObject), a large one is a multipart upload
//! whose every part carries its own SHA-256 (real S3 checks those; s3s-fs 0.14.1 does not
//! check parts), and the SHA-256 of the whole object is returned to be recorded in the
//! manifest, against which downloads are checked while they stream.

use aws_sdk_s3::config::{
    retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Credentials, Region,
    RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;
pub use dbvm_protocol::seal::Secret;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of one part of a multipart upload: memory is bounded by two of them (the one being
/// filled and the one in flight).
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// The most a small object read whole ([`S3::get`]) may be: manifests and markers.
const SMALL_MAX: usize = 64 * 1024 * 1024;

/// Why an S3 call failed.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The CA a command named cannot be used.
    #[error("ca_pem: {0}")]
    Ca(String),
    /// A request failed: what, on which object, why in words a person can act on, and the
    /// server's or the connection's own message.
    #[error("S3 {op} of {key}: {cause} ({detail})")]
    Request {
        op: &'static str,
        key: String,
        cause: &'static str,
        detail: String,
    },
    #[error("S3 {op} of {key}: the object does not exist")]
    NotFound { op: &'static str, key: String },
    /// The bytes read were not the bytes recorded.
    #[error("object {key} is damaged: its SHA-256 is {got}, the manifest recorded {want} ({size} bytes read)")]
    Mismatch {
        key: String,
        want: String,
        got: String,
        size: u64,
    },
    #[error("{what} {key}: {source}")]
    Io {
        what: &'static str,
        key: String,
        source: std::io::Error,
    },
}

impl S3Error {
    /// Whether this is the storage refusing or failing (as opposed to a damaged object or
    /// the local side).
    pub fn cause(&self) -> &'static str {
        match self {
            S3Error::Request { cause, .. } => cause,
            S3Error::Ca(_) => "the CA is not usable",
            S3Error::NotFound { .. } => "the object does not exist",
            S3Error::Mismatch { .. } => "the object is damaged",
            S3Error::Io { .. } => "a local read or write failed",
        }
    }
}

/// What was stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stored {
    pub size: u64,
    /// Hex SHA-256 of the whole object.
    pub sha256: String,
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The key relative to the prefix.
    pub name: String,
    pub size: u64,
}

/// A checked bucket on an S3 endpoint with its keys: where a client points.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub bucket: String,
    pub region: String,
    /// The folder in the bucket every name is under.
    pub prefix: String,
    /// PEM of the CA that signed the endpoint's certificate; the system's roots when absent.
    pub ca_pem: Option<String>,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
}

/// A bucket and prefix with their keys.
#[derive(Clone, Debug)]
pub struct S3 {
    client: aws_sdk_s3::Client,
    pub bucket: String,
    pub prefix: String,
}

/// The hex form of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that `pem` holds at least one certificate rustls can use: the SDK's TLS layer
/// panics on one it cannot parse, so a bad CA must be refused before it gets there.
pub fn check_ca(pem: &str) -> Result<(), S3Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| S3Error::Ca(format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(S3Error::Ca("holds no certificate".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| S3Error::Ca(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(())
}

impl S3 {
    /// A client for `storage` (no request is made). `io_timeout` bounds connecting and
    /// each read of an answer.
    pub fn new(storage: &Endpoint, io_timeout: Duration) -> Result<Self, S3Error> {
        use aws_smithy_http_client::tls;
        let trust = match &storage.ca_pem {
            Some(pem) => {
                check_ca(pem)?;
                tls::TrustStore::empty().with_pem_certificate(pem.as_bytes().to_vec())
            }
            None => tls::TrustStore::default(),
        };
        let context = tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .map_err(|e| S3Error::Ca(e.to_string()))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .tls_context(context)
            .build_https();
        let credentials = Credentials::new(
            storage.access_key_id.expose(),
            storage.secret_access_key.expose(),
            None,
            None,
            "dbvm-command",
        );
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(storage.region.clone()))
            .endpoint_url(format!("https://{}:{}", storage.host, storage.port))
            .force_path_style(true)
            .credentials_provider(credentials)
            .http_client(http)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(io_timeout)
                    .read_timeout(io_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            // The SHA-256 this client sends is the checksum; no CRC32 on top of it.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .build();
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket: storage.bucket.clone(),
            prefix: storage.prefix.clone(),
        })
    }

    /// The full key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    fn fail<E, R>(&self, op: &'static str, key: &str, e: SdkError<E, R>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let code = e.code().map(str::to_string);
        let detail = match (&code, e.message()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.clone(),
            _ => sources(&e),
        };
        if code.as_deref() == Some("NoSuchKey") {
            return S3Error::NotFound {
                op,
                key: key.to_string(),
            };
        }
        S3Error::Request {
            op,
            key: format!("s3://{}/{key}", self.bucket),
            cause: cause(code.as_deref(), &detail),
            detail: redact_echoes(&detail),
        }
    }

    /// Puts a small object whole, with its SHA-256 for the server to check.
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<Stored, S3Error> {
        let key = self.key(name);
        let digest = Sha256::digest(&bytes);
        let size = bytes.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .checksum_sha256(base64::engine::general_purpose::STANDARD.encode(digest))
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| self.fail("put", &key, e))?;
        Ok(Stored {
            size,
            sha256: hex(&digest),
        })
    }

    /// Reads a small object whole; `None` when it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, S3Error> {
        let key = self.key(name);
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) => {
                return match self.fail("get", &key, e) {
                    S3Error::NotFound { .. } => Ok(None),
                    other => Err(other),
                }
            }
        };
        let mut body = out.body.into_async_read();
        let mut buf = Vec::new();
        (&mut body)
            .take(SMALL_MAX as u64 + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| S3Error::Io {
                what: "reading",
                key: key.clone(),
                source: e,
            })?;
        if buf.len() > SMALL_MAX {
            return Err(S3Error::Io {
                what: "reading",
                key,
                source: std::io::Error::other("larger than 64 MiB: not a manifest"),
            });
        }
        Ok(Some(buf))
    }

    /// Streams an object into `out`, checking its SHA-256 against `want` (hex) when given.
    /// The bytes reach `out` before the end is checked: the caller must treat what it
    /// wrote as untrusted until this returns `Ok`.
    pub async fn download(
        &self,
        name: &str,
        out: &mut (impl AsyncWrite + Unpin),
        want: Option<&str>,
    ) -> Result<Stored, S3Error> {
        let key = self.key(name);
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.fail("get", &key, e))?;
        let mut body = resp.body;
        let mut hash = Sha256::new();
        let mut size = 0u64;
        loop {
            let chunk = match body.next().await {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    return Err(S3Error::Request {
                        op: "get",
                        key: format!("s3://{}/{key}", self.bucket),
                        cause: "the storage could not be reached",
                        detail: DisplayErrorContext(&e).to_string(),
                    })
                }
            };
            hash.update(&chunk);
            size += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(|e| S3Error::Io {
                what: "writing",
                key: key.clone(),
                source: e,
            })?;
        }
        out.flush().await.map_err(|e| S3Error::Io {
            what: "writing",
            key: key.clone(),
            source: e,
        })?;
        let got = hex(&hash.finalize());
        if let Some(want) = want {
            if want != got {
                return Err(S3Error::Mismatch {
                    key: format!("s3://{}/{key}", self.bucket),
                    want: want.to_string(),
                    got,
                    size,
                });
            }
        }
        Ok(Stored { size, sha256: got })
    }

    /// Uploads everything `input` gives until its end: one put when it fits in a part, a
    /// multipart upload otherwise (at most one part read ahead while another is sent;
    /// aborted on any failure so no half object stays behind).
    pub async fn upload(
        &self,
        name: &str,
        input: &mut (impl AsyncRead + Unpin),
    ) -> Result<Stored, S3Error> {
        let key = self.key(name);
        let read_err = |e| S3Error::Io {
            what: "reading the stream for",
            key: key.clone(),
            source: e,
        };
        let first = read_part(input).await.map_err(read_err)?;
        if first.len() < PART_SIZE {
            return self.put(name, first).await;
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| self.fail("multipart upload start", &key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = self.parts(&key, &upload_id, first, input).await;
        match result {
            Ok(stored) => Ok(stored),
            Err(e) => {
                if let Err(abort) = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .send()
                    .await
                {
                    tracing::warn!(key = %key, error = %DisplayErrorContext(&abort), "cannot abort a failed multipart upload (the bucket's lifecycle rules remove it)");
                }
                Err(e)
            }
        }
    }

    async fn parts(
        &self,
        key: &str,
        upload_id: &str,
        first: Vec<u8>,
        input: &mut (impl AsyncRead + Unpin),
    ) -> Result<Stored, S3Error> {
        let mut whole = Sha256::new();
        let mut size = 0u64;
        let mut done = Vec::new();
        let mut part = first;
        let mut number = 1i32;
        loop {
            whole.update(&part);
            size += part.len() as u64;
            let digest = Sha256::digest(&part);
            let send = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .checksum_sha256(base64::engine::general_purpose::STANDARD.encode(digest))
                .body(ByteStream::from(part))
                .send();
            // The next part is read while this one travels.
            let (sent, next) = tokio::join!(send, read_part(input));
            let sent = sent.map_err(|e| self.fail("multipart upload part", key, e))?;
            done.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(sent.e_tag().map(str::to_string))
                    .set_checksum_sha256(sent.checksum_sha256().map(str::to_string))
                    .build(),
            );
            let next = next.map_err(|e| S3Error::Io {
                what: "reading the stream for",
                key: key.to_string(),
                source: e,
            })?;
            if next.is_empty() {
                break;
            }
            part = next;
            number += 1;
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.fail("multipart upload completion", key, e))?;
        Ok(Stored {
            size,
            sha256: hex(&whole.finalize()),
        })
    }

    /// Objects under `dir` (relative to the prefix), all pages.
    pub async fn list(&self, dir: &str) -> Result<Vec<Listed>, S3Error> {
        let base = self.key(dir);
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&base)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.fail("list", &base, e))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    let name = k
                        .strip_prefix(&format!("{}/", self.prefix))
                        .unwrap_or(k)
                        .to_string();
                    out.push(Listed {
                        name,
                        size: o.size().unwrap_or(0).max(0) as u64,
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    pub async fn delete(&self, name: &str) -> Result<(), S3Error> {
        let key = self.key(name);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.fail("delete", &key, e))?;
        Ok(())
    }

    /// Proves the keys can write, read back and delete under the prefix (a marker object
    /// named after `who`), before anything depends on them.
    pub async fn prove(&self, who: &str) -> Result<(), S3Error> {
        // A listing first: some servers (s3s-fs) create a missing bucket on a put.
        let base = self.key("");
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&base)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| self.fail("list", &base, e))?;
        let name = format!("dbvm-check-{who}");
        let body = format!("written by dbvm-agent {who} to check the storage; safe to delete\n");
        let stored = self.put(&name, body.clone().into_bytes()).await?;
        let mut back = Vec::new();
        self.download(&name, &mut back, Some(&stored.sha256))
            .await?;
        self.delete(&name).await
    }
}

/// An error and its sources, each by its `Display` (the SDK's own context printer adds
/// `Debug` dumps of every layer).
fn sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// Reads up to one part (less only at the end of the input) into one allocation of
/// exactly [`PART_SIZE`]: `read_to_end` would grow a full buffer to twice its size
/// while probing for more, doubling the memory a backup holds.
async fn read_part(input: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; PART_SIZE];
    let mut filled = 0;
    while filled < PART_SIZE {
        let n = input.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}

/// S3 error bodies can echo what was signed: the access key id, the string to sign, the
/// canonical request. Their contents are cut out (see [`redact_echoes`]).
const ECHOED_TAGS: [&str; 5] = [
    "AWSAccessKeyId",
    "StringToSign",
    "StringToSignBytes",
    "CanonicalRequest",
    "SignatureProvided",
];

/// Cuts the contents of the tags S3 echoes (`ECHOED_TAGS`) out of `text`: error details
/// from the SDK here, pgBackRest's output on the agent.
pub fn redact_echoes(text: &str) -> String {
    let mut out = text.to_string();
    for tag in ECHOED_TAGS {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        let mut from = 0;
        while let Some(i) = out[from..].find(&open).map(|i| i + from + open.len()) {
            let end = out[i..].find(&close).map_or(out.len(), |j| i + j);
            out.replace_range(i..end, "[redacted]");
            from = i + "[redacted]".len();
        }
    }
    out
}

/// The cause of a failure, in words a person can act on (the same words as the agent's
/// `pgbackrest::cause` uses for pgBackRest's failures).
fn cause(code: Option<&str>, detail: &str) -> &'static str {
    match code {
        Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied") => {
            return "the storage refused the credentials (wrong access key or secret)"
        }
        Some("NoSuchBucket") => return "the bucket does not exist",
        _ => {}
    }
    let lower = detail.to_lowercase();
    if lower.contains("invalid peer certificate")
        || lower.contains("unknownissuer")
        || lower.contains("certificate")
    {
        "the storage's TLS certificate was not accepted (is ca_pem the CA that signed it, and does it name the endpoint's host?)"
    } else if lower.contains("nosuchbucket") {
        "the bucket does not exist"
    } else if lower.contains("connection refused")
        || lower.contains("dispatch failure")
        || lower.contains("timeout")
        || lower.contains("timed out")
        || lower.contains("dns")
        || lower.contains("connect")
        || lower.contains("io error")
    {
        "the storage could not be reached"
    } else if lower.contains("no space left") {
        "the disk is full"
    } else {
        "the storage answered with an error"
    }
}

// Checks of what names an endpoint, for every side that takes one from a person.

/// `https://host[:port][/]` → host and port (443 when absent). Written by hand: four
/// rules, and the refusals must say why (plain HTTP, an IP address, a path).
pub fn parse_endpoint(endpoint: &str) -> Result<(String, u16), String> {
    if endpoint.starts_with("http://") {
        return Err(format!(
            "{endpoint:?} is plain HTTP: S3 traffic travels over TLS only (https://)"
        ));
    }
    let rest = endpoint.strip_prefix("https://").ok_or_else(|| {
        format!("{endpoint:?} is not an https:// URL (expected https://host[:port])")
    })?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "{endpoint:?} has a path, query or user part: give https://host[:port] only"
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{endpoint:?}: port {p:?} is not 1..65535"))?,
        ),
        None => (rest, 443),
    };
    if host.is_empty()
        || host.len() > 253
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        || host.starts_with(['-', '.'])
    {
        return Err(format!("{endpoint:?}: {host:?} is not a host name"));
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        // pgBackRest 2.45 checks only the DNS names of the server's certificate.
        return Err(format!(
            "{endpoint:?}: give the endpoint's DNS name, not an IP address (pgBackRest verifies the certificate against DNS names only)"
        ));
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// S3 bucket naming rules (the strict, DNS-compatible ones).
pub fn check_bucket(b: &str) -> Result<(), String> {
    let ok_chars = b
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends_ok = b
        .chars()
        .next()
        .zip(b.chars().last())
        .is_some_and(|(f, l)| f.is_ascii_alphanumeric() && l.is_ascii_alphanumeric());
    if (3..=63).contains(&b.len()) && ok_chars && ends_ok && !b.contains("..") {
        Ok(())
    } else {
        Err(format!(
            "{b:?} is not a bucket name (3-63 lower-case letters, digits, '-' and '.', starting and ending with a letter or digit)"
        ))
    }
}

/// A folder inside the bucket: segments of letters, digits, `-`, `_`, `.`, no `..`.
pub fn check_prefix(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.len() <= 128
        && p.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{p:?} is not a folder name (segments of letters, digits, '-', '_', '.' separated by '/', at most 128)"
        ))
    }
}

/// A region name: lower-case letters, digits and `-`.
pub fn check_region(r: &str) -> Result<(), String> {
    if r.is_empty()
        || r.len() > 64
        || !r
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "{r:?} is not a region name (lower-case letters, digits, '-')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_named() {
        assert!(cause(Some("SignatureDoesNotMatch"), "").contains("credentials"));
        assert!(cause(Some("InvalidAccessKeyId"), "").contains("credentials"));
        assert!(cause(Some("NoSuchBucket"), "").contains("bucket does not exist"));
        assert!(cause(
            None,
            "dispatch failure: io error: invalid peer certificate: UnknownIssuer"
        )
        .contains("certificate"));
        assert!(cause(
            None,
            "dispatch failure: io error: Connection refused (os error 111)"
        )
        .contains("could not be reached"));
    }

    #[test]
    fn a_ca_that_is_not_a_certificate_is_refused_before_the_sdk_sees_it() {
        assert!(check_ca("junk").is_err());
        assert!(
            check_ca("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err()
        );
        let ca = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        check_ca(&ca.cert.pem()).unwrap();
    }
}
