//! A typed client for the broker's HTTPS API (`broker/openapi.json`), authenticated by
//! the control plane's client certificate.
//!
//! Every call has a time limit: 10 s to connect, 30 s per request; the long polls of
//! [`Client::wait`] get their poll time on top, and [`Client::events`] only limits how
//! long the stream may stay silent (the broker sends a keep-alive every 15 s).

use crate::sse::{SseError, SseParser};
use dbvm_protocol::api::{
    AgentHealth, AgentPage, AgentView, ApiError, ArtifactEntry, ArtifactInfo, BundleInfo,
    BundleList, CommandPage, CommandView, EnrollmentToken, EnrollmentTokenRequest, Event,
    FleetHealth, Revocation, RevokeRequest, SubmitCommand,
};
use dbvm_protocol::command::SignedCommand;
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest single long poll the broker serves.
pub const MAX_POLL: Duration = Duration::from_secs(60);
/// How long the event stream may carry nothing, not even a keep-alive.
pub const EVENTS_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The broker's address when none is configured.
pub const DEFAULT_BROKER_URL: &str = "https://localhost:8443";
/// A download's write-back to the disk is started every this many bytes, so its sync at
/// the end waits for the last of them only, not for the whole file: the sync of a 120 MiB
/// bundle took 0.15-0.18 s here, serial after its last byte came.
const WRITEBACK_EVERY: u64 = 4 * 1024 * 1024;

/// The causes of an error, joined by `: ` (reqwest's own message only names the URL).
struct Causes<'a>(&'a reqwest::Error);

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut cause = std::error::Error::source(self.0);
        if cause.is_none() {
            return write!(f, "{}", self.0);
        }
        let mut first = true;
        while let Some(c) = cause {
            if !first {
                f.write_str(": ")?;
            }
            write!(f, "{c}")?;
            first = false;
            cause = c.source();
        }
        Ok(())
    }
}

/// Errors of the broker client. Each message is complete: causes are written into it
/// rather than chained, so it prints well on one line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("broker address {url:?} is not usable: {reason}; give an https:// URL with --broker or DBVM_BROKER")]
    BadUrl { url: String, reason: String },
    #[error("cannot set up the HTTPS client: {}", Causes(.0))]
    Build(reqwest::Error),
    #[error("cannot reach the broker at {url} ({}): check the address (--broker, DBVM_BROKER), that the broker runs and that it trusts this control plane's certificate", Causes(.error))]
    Connect { url: String, error: reqwest::Error },
    #[error("{method} {url} did not answer within {} s", .after.as_secs())]
    Timeout {
        method: Method,
        url: String,
        after: Duration,
    },
    #[error("{method} {url} failed: {}", Causes(.error))]
    Transport {
        method: Method,
        url: String,
        error: reqwest::Error,
    },
    /// The broker answered with an error status and its JSON error body (or one made
    /// up from the status when the body is not the broker's).
    #[error("broker answered {0}: {code}: {error}", code = .1.code, error = .1.error)]
    Http(StatusCode, ApiError),
    #[error("answer to {method} {url} is not what the API describes: {error}")]
    Decode {
        method: Method,
        url: String,
        error: serde_json::Error,
    },
    #[error("event {event:?} from the broker does not decode: {error}")]
    EventDecode {
        event: Option<String>,
        error: serde_json::Error,
    },
    #[error("event stream from {url} is malformed: {error}")]
    EventStream { url: String, error: SseError },
    #[error("event stream from {url} broke off: {}", Causes(.error))]
    EventRead { url: String, error: reqwest::Error },
    #[error("event stream from {url} carried nothing, not even a keep-alive, for {} s", .after.as_secs())]
    EventsIdle { url: String, after: Duration },
    #[error("cannot {op} {}: {error}", .path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
}

impl ClientError {
    /// The HTTP status, when the broker answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Http(status, _) => Some(*status),
            _ => None,
        }
    }

    /// The API's error code (`busy`, `conflict`, ...), when the broker answered with one.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            Self::Http(_, e) => Some(&e.code),
            _ => None,
        }
    }

    /// Whether the fault is in this side's settings (a bad URL) rather than the broker.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            Self::BadUrl { .. } | Self::Build(_) | Self::File { .. }
        )
    }
}

/// The stream [`Client::events`] returns. Ends when the broker closes the stream; a
/// transport error is its last item; an undecodable event is an error item after which
/// the stream goes on.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, ClientError>> + Send>>;

/// What a download wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    pub bytes: u64,
    /// SHA-256 of the bytes written.
    pub sha256: String,
    /// The SHA-256 the broker said the bytes have (`X-Dbvm-Sha256`), when it said.
    pub claimed_sha256: Option<String>,
}

/// A client of one broker.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
}

impl Client {
    /// `broker_url` is `https://host:port` (a path prefix is kept); `tls` is usually
    /// [`crate::Home::tls_client_config`].
    pub fn new(broker_url: &str, tls: rustls::ClientConfig) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadUrl {
            url: broker_url.to_string(),
            reason: reason.to_string(),
        };
        let base = Url::parse(broker_url).map_err(|e| bad(&e.to_string()))?;
        if base.scheme() != "https" {
            return Err(bad("the broker speaks HTTPS only"));
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(bad("no host"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(bad("a query or fragment does not belong in it"));
        }
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .https_only(true)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self { http, base })
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// The URL of an API path, each segment escaped.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // `new` refused URLs that cannot be a base, so path segments are always there.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// `GET` of a plain-text path such as `/metrics` or `/healthz`.
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let bytes = self.plain(Method::GET, self.url(&segments)).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A request without a body whose answer is not JSON: the body of a success, the
    /// broker's error otherwise.
    async fn plain(&self, method: Method, url: Url) -> Result<bytes::Bytes, ClientError> {
        let fail = |error: reqwest::Error| transport_error(&method, &url, REQUEST_TIMEOUT, error);
        let resp = self
            .http
            .request(method.clone(), url.clone())
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(fail)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(fail)?;
        if !status.is_success() {
            return Err(http_error(status, &bytes));
        }
        Ok(bytes)
    }

    /// Sends a request and decodes the JSON answer; error statuses become [`ClientError::Http`].
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        timeout: Duration,
        body: Option<RequestBody<'_>>,
    ) -> Result<T, ClientError> {
        let mut req: RequestBuilder = self
            .http
            .request(method.clone(), url.clone())
            .timeout(timeout);
        req = match body {
            Some(RequestBody::Submit(b)) => req.json(b),
            Some(RequestBody::Token(b)) => req.json(b),
            Some(RequestBody::Revoke(b)) => req.json(b),
            None => req,
        };
        let fail = |error: reqwest::Error| transport_error(&method, &url, timeout, error);
        let resp = req.send().await.map_err(fail)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(fail)?;
        if !status.is_success() {
            return Err(http_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|error| ClientError::Decode {
            method,
            url: url.to_string(),
            error,
        })
    }

    /// `POST /v1/commands`.
    pub async fn submit(&self, command: &SignedCommand) -> Result<CommandView, ClientError> {
        let body = SubmitCommand {
            signed_command: command.to_base64(),
        };
        let url = self.url(&["v1", "commands"]);
        self.call(
            Method::POST,
            url,
            REQUEST_TIMEOUT,
            Some(RequestBody::Submit(&body)),
        )
        .await
    }

    /// `GET /v1/commands/{id}`.
    pub async fn command(&self, id: Uuid) -> Result<CommandView, ClientError> {
        let url = self.url(&["v1", "commands", &id.to_string()]);
        self.call(Method::GET, url, REQUEST_TIMEOUT, None).await
    }

    /// One long poll: `GET /v1/commands/{id}/wait?timeout_ms=N` (`poll` at most 60 s).
    pub async fn wait_once(&self, id: Uuid, poll: Duration) -> Result<CommandView, ClientError> {
        let poll = poll.min(MAX_POLL);
        let mut url = self.url(&["v1", "commands", &id.to_string(), "wait"]);
        url.query_pairs_mut()
            .append_pair("timeout_ms", &poll.as_millis().to_string());
        self.call(Method::GET, url, poll + REQUEST_TIMEOUT, None)
            .await
    }

    /// Waits until the command is in a terminal state or `timeout` has passed, and
    /// returns its last view (not terminal when the time ran out).
    pub async fn wait(&self, id: Uuid, timeout: Duration) -> Result<CommandView, ClientError> {
        self.wait_with_progress(id, timeout, MAX_POLL, |_| {}).await
    }

    /// Like [`Self::wait`], with long polls of at most `poll` (so `on_view` sees the
    /// command's progress that often) and `on_view` called with every view received.
    pub async fn wait_with_progress(
        &self,
        id: Uuid,
        timeout: Duration,
        poll: Duration,
        mut on_view: impl FnMut(&CommandView),
    ) -> Result<CommandView, ClientError> {
        let deadline = Instant::now() + timeout;
        let poll = poll.clamp(Duration::from_millis(100), MAX_POLL);
        loop {
            let started = Instant::now();
            let this_poll = deadline.saturating_duration_since(started).min(poll);
            let view = self.wait_once(id, this_poll).await?;
            on_view(&view);
            let now = Instant::now();
            if view.state.is_terminal() || now >= deadline {
                return Ok(view);
            }
            // A broker that answers long before the poll time is up must not make this
            // a busy loop.
            let quick = now.duration_since(started) < this_poll / 2;
            if quick {
                let pause = Duration::from_millis(250).min(deadline.saturating_duration_since(now));
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// `GET /v1/agents`, every page.
    pub async fn agents(&self) -> Result<Vec<AgentView>, ClientError> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = self.url(&["v1", "agents"]);
            url.query_pairs_mut().append_pair("limit", "1000");
            if let Some(c) = &cursor {
                url.query_pairs_mut().append_pair("cursor", c);
            }
            let page: AgentPage = self.call(Method::GET, url, REQUEST_TIMEOUT, None).await?;
            all.extend(page.agents);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(all),
            }
        }
    }

    /// `GET /v1/commands`: one page, newest first. `query` holds the filters
    /// (`agent`, `state`, `operation`, `since_ms`, `until_ms`, `limit`, `cursor`).
    pub async fn commands(&self, query: &[(&str, String)]) -> Result<CommandPage, ClientError> {
        let mut url = self.url(&["v1", "commands"]);
        for (k, v) in query {
            url.query_pairs_mut().append_pair(k, v);
        }
        self.call(Method::GET, url, REQUEST_TIMEOUT, None).await
    }

    /// `POST /v1/commands/{id}/cancel`: the command, now cancelled; a 409 carries its
    /// state when it reached its agent first.
    pub async fn cancel(&self, id: Uuid) -> Result<CommandView, ClientError> {
        let url = self.url(&["v1", "commands", &id.to_string(), "cancel"]);
        self.call(Method::POST, url, REQUEST_TIMEOUT, None).await
    }

    /// `GET /v1/agents/{id}`.
    pub async fn agent(&self, id: &str) -> Result<AgentView, ClientError> {
        let url = self.url(&["v1", "agents", id]);
        self.call(Method::GET, url, REQUEST_TIMEOUT, None).await
    }

    /// `GET /v1/agents/{id}/health`: the agent's latest health report as the broker keeps
    /// it. A 404 means an unknown agent or one that has not reported (the message says
    /// which); [`crate::health::fresh`] runs the checks now instead.
    pub async fn health(&self, agent: &str) -> Result<AgentHealth, ClientError> {
        let url = self.url(&["v1", "agents", agent, "health"]);
        self.call(Method::GET, url, REQUEST_TIMEOUT, None).await
    }

    /// `GET /v1/health`: every agent the broker knows with a summary of its health.
    pub async fn fleet_health(&self) -> Result<FleetHealth, ClientError> {
        let url = self.url(&["v1", "health"]);
        self.call(Method::GET, url, REQUEST_TIMEOUT, None).await
    }

    /// `POST /v1/enrollment-tokens`; `ttl` `None` takes the broker's default (15 min).
    pub async fn enrollment_token(
        &self,
        agent: &str,
        ttl: Option<Duration>,
    ) -> Result<EnrollmentToken, ClientError> {
        let body = EnrollmentTokenRequest {
            agent_id: agent.to_string(),
            ttl_seconds: ttl.map(|t| t.as_secs()),
        };
        let url = self.url(&["v1", "enrollment-tokens"]);
        self.call(
            Method::POST,
            url,
            REQUEST_TIMEOUT,
            Some(RequestBody::Token(&body)),
        )
        .await
    }

    /// `POST /v1/agents/{id}/revoke`: every certificate issued to the agent so far is
    /// refused from now on and its session is closed; a new enrollment token
    /// ([`Client::enrollment_token`]) brings the VM back with a fresh certificate.
    pub async fn revoke(
        &self,
        agent: &str,
        reason: Option<&str>,
    ) -> Result<Revocation, ClientError> {
        let body = RevokeRequest {
            reason: reason.map(str::to_string),
        };
        let url = self.url(&["v1", "agents", agent, "revoke"]);
        self.call(
            Method::POST,
            url,
            REQUEST_TIMEOUT,
            Some(RequestBody::Revoke(&body)),
        )
        .await
    }

    /// The URL agents download artifact `sha256` from when they reach the broker by the
    /// same address as this client: `<base>/v1/artifacts/<sha256>`.
    pub fn artifact_url(&self, sha256: &str) -> Url {
        self.url(&["v1", "artifacts", sha256])
    }

    /// `PUT /v1/artifacts/{sha256}`: streams the file at `path` (never whole in memory)
    /// as artifact `sha256`, which must be the SHA-256 of its bytes (the broker checks).
    /// Returns the broker's description and whether it is new (`false`: it was stored
    /// already). The time limit grows with the size: 30 s plus 1 s per MiB.
    pub async fn upload_artifact(
        &self,
        path: &Path,
        sha256: &str,
    ) -> Result<(ArtifactInfo, bool), ClientError> {
        let file_error = |op: &'static str| {
            move |error: std::io::Error| ClientError::File {
                op,
                path: path.to_path_buf(),
                error,
            }
        };
        let file = tokio::fs::File::open(path)
            .await
            .map_err(file_error("open"))?;
        let size = file.metadata().await.map_err(file_error("stat"))?.len();
        let url = self.url(&["v1", "artifacts", sha256]);
        let method = Method::PUT;
        let timeout = REQUEST_TIMEOUT + Duration::from_secs(size / (1024 * 1024));
        let fail = |error: reqwest::Error| transport_error(&method, &url, timeout, error);
        let resp = self
            .http
            .put(url.clone())
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(file_chunks(file)))
            .send()
            .await
            .map_err(fail)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(fail)?;
        if !status.is_success() {
            return Err(http_error(status, &bytes));
        }
        let info = serde_json::from_slice(&bytes).map_err(|error| ClientError::Decode {
            method: method.clone(),
            url: url.to_string(),
            error,
        })?;
        Ok((info, status == StatusCode::CREATED))
    }

    /// `GET /v1/artifacts`.
    pub async fn artifacts(&self) -> Result<Vec<ArtifactEntry>, ClientError> {
        let url = self.url(&["v1", "artifacts"]);
        self.call(Method::GET, url, REQUEST_TIMEOUT, None).await
    }

    /// `GET /v1/artifacts/{sha256}` into a new file at `dest` (streamed; a file already
    /// there is an error); returns the bytes written. Whatever fails removes `dest`.
    /// The stream may not stay silent for more than 30 s.
    pub async fn download_artifact(&self, sha256: &str, dest: &Path) -> Result<u64, ClientError> {
        let url = self.url(&["v1", "artifacts", sha256]);
        self.download(url, dest, |_, _| {}).await.map(|d| d.bytes)
    }

    /// `GET /v1/bundles`.
    pub async fn bundles(&self) -> Result<BundleList, ClientError> {
        let url = self.url(&["v1", "bundles"]);
        self.call(Method::GET, url, REQUEST_TIMEOUT, None).await
    }

    /// `GET /v1/bundles/{id}` into a new file at `dest` (streamed and hashed; a file
    /// already there is an error); `progress` hears the bytes so far and the total.
    /// Whatever fails removes `dest`. The answer's `X-Dbvm-Sha256` is returned beside
    /// the hash of what arrived: the caller compares them (see [`crate::bundle::fetch`]).
    pub async fn download_bundle(
        &self,
        id: Uuid,
        dest: &Path,
        progress: impl FnMut(u64, Option<u64>),
    ) -> Result<Downloaded, ClientError> {
        let url = self.url(&["v1", "bundles", &id.to_string()]);
        self.download(url, dest, progress).await
    }

    /// `POST /v1/broker/bundle?hours=N`: the broker's own bundle, made now.
    pub async fn broker_bundle(&self, hours: u32) -> Result<BundleInfo, ClientError> {
        let mut url = self.url(&["v1", "broker", "bundle"]);
        url.query_pairs_mut()
            .append_pair("hours", &hours.to_string());
        // Made while the request waits: journalctl over a long window takes a while.
        self.call(Method::POST, url, Duration::from_secs(300), None)
            .await
    }

    /// `DELETE /v1/bundles/{id}`.
    pub async fn delete_bundle(&self, id: Uuid) -> Result<(), ClientError> {
        self.plain(
            Method::DELETE,
            self.url(&["v1", "bundles", &id.to_string()]),
        )
        .await
        .map(drop)
    }

    /// A `GET` streamed into a new file at `dest` while it is hashed, synced at the end
    /// (its write-back started as it arrives: see [`WRITEBACK_EVERY`]); whatever fails
    /// removes `dest`. The stream may not stay silent for more than 30 s.
    async fn download(
        &self,
        url: Url,
        dest: &Path,
        mut progress: impl FnMut(u64, Option<u64>),
    ) -> Result<Downloaded, ClientError> {
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        let method = Method::GET;
        let fail = |error: reqwest::Error| transport_error(&method, &url, REQUEST_TIMEOUT, error);
        let send = self.http.get(url.clone()).send();
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, send)
            .await
            .map_err(|_| ClientError::Timeout {
                method: method.clone(),
                url: url.to_string(),
                after: REQUEST_TIMEOUT,
            })?
            .map_err(fail)?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        let total = resp.content_length();
        let claimed_sha256 = resp
            .headers()
            .get("x-dbvm-sha256")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let file_error = |op: &'static str| {
            move |error: std::io::Error| ClientError::File {
                op,
                path: dest.to_path_buf(),
                error,
            }
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .await
            .map_err(file_error("create"))?;
        let written = async {
            let mut body = resp.bytes_stream();
            let mut n = 0u64;
            // Where the bytes whose write-back is not started yet begin.
            let mut started = 0u64;
            let mut hash = sha2::Sha256::new();
            loop {
                let chunk = match tokio::time::timeout(REQUEST_TIMEOUT, body.next()).await {
                    Err(_) => {
                        return Err(ClientError::Timeout {
                            method: method.clone(),
                            url: url.to_string(),
                            after: REQUEST_TIMEOUT,
                        })
                    }
                    Ok(None) => break,
                    Ok(Some(chunk)) => chunk.map_err(fail)?,
                };
                hash.update(&chunk);
                file.write_all(&chunk).await.map_err(file_error("write"))?;
                n += chunk.len() as u64;
                progress(n, total);
                if n - started >= WRITEBACK_EVERY {
                    // The bytes reach the file (tokio writes in the background) before
                    // their write-back is asked for; a failed write shows here.
                    file.flush().await.map_err(file_error("write"))?;
                    dbvm_host::fs::start_writeback(&file, started, n - started).await;
                    started = n;
                }
            }
            file.flush().await.map_err(file_error("write"))?;
            file.sync_all().await.map_err(file_error("fsync"))?;
            Ok(Downloaded {
                bytes: n,
                sha256: format!("{:x}", hash.finalize()),
                claimed_sha256,
            })
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(dest).await;
        }
        written
    }

    /// `DELETE /v1/artifacts/{sha256}`.
    pub async fn delete_artifact(&self, sha256: &str) -> Result<(), ClientError> {
        self.plain(Method::DELETE, self.url(&["v1", "artifacts", sha256]))
            .await
            .map(drop)
    }

    /// `GET /v1/events[?agent=ID][&after=N]`: follows the broker's event stream, from
    /// the logged events after `after` when given (a `dropped` event first when the log
    /// no longer holds them all).
    pub async fn events(
        &self,
        agent: Option<&str>,
        after: Option<u64>,
    ) -> Result<EventStream, ClientError> {
        let mut url = self.url(&["v1", "events"]);
        if let Some(agent) = agent {
            url.query_pairs_mut().append_pair("agent", agent);
        }
        if let Some(after) = after {
            url.query_pairs_mut()
                .append_pair("after", &after.to_string());
        }
        let method = Method::GET;
        // No overall timeout: the stream lasts. The answer's head must come in time,
        // and the body may not stay silent for long (see below).
        let send = self
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send();
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, send).await {
            Err(_) => {
                return Err(ClientError::Timeout {
                    method,
                    url: url.to_string(),
                    after: REQUEST_TIMEOUT,
                })
            }
            Ok(r) => r.map_err(|e| transport_error(&method, &url, REQUEST_TIMEOUT, e))?,
        };
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        let state = EventsState {
            body: Box::pin(resp.bytes_stream()),
            parser: SseParser::new(),
            pending: VecDeque::new(),
            done: false,
            url,
        };
        Ok(Box::pin(futures::stream::unfold(state, next_event)))
    }
}

enum RequestBody<'a> {
    Submit(&'a SubmitCommand),
    Token(&'a EnrollmentTokenRequest),
    Revoke(&'a RevokeRequest),
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send>>;

/// The bytes of an open file as a stream of 64 KiB chunks, for an upload body.
/// Hand-written (a few lines) rather than enabling tokio-util's `io` feature for
/// `ReaderStream` workspace-wide.
fn file_chunks(
    file: tokio::fs::File,
) -> impl Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    futures::stream::try_unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; 64 * 1024];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((bytes::Bytes::from(buf), file)))
    })
}

struct EventsState {
    body: ByteStream,
    parser: SseParser,
    pending: VecDeque<Result<Event, ClientError>>,
    done: bool,
    url: Url,
}

async fn next_event(mut st: EventsState) -> Option<(Result<Event, ClientError>, EventsState)> {
    loop {
        if let Some(item) = st.pending.pop_front() {
            return Some((item, st));
        }
        if st.done {
            return None;
        }
        let failure = match tokio::time::timeout(EVENTS_IDLE_TIMEOUT, st.body.next()).await {
            Err(_) => ClientError::EventsIdle {
                url: st.url.to_string(),
                after: EVENTS_IDLE_TIMEOUT,
            },
            // The broker closed the stream (it shuts down, or dropped this client).
            Ok(None) => return None,
            Ok(Some(Err(error))) => ClientError::EventRead {
                url: st.url.to_string(),
                error,
            },
            Ok(Some(Ok(chunk))) => match st.parser.push(&chunk) {
                Ok(messages) => {
                    for m in messages {
                        let item = serde_json::from_str::<Event>(&m.data).map_err(|error| {
                            ClientError::EventDecode {
                                event: m.event,
                                error,
                            }
                        });
                        st.pending.push_back(item);
                    }
                    continue;
                }
                Err(error) => ClientError::EventStream {
                    url: st.url.to_string(),
                    error,
                },
            },
        };
        st.done = true;
        return Some((Err(failure), st));
    }
}

fn transport_error(
    method: &Method,
    url: &Url,
    after: Duration,
    error: reqwest::Error,
) -> ClientError {
    // A connection that is not set up within CONNECT_TIMEOUT is a connect error (that
    // also counts as a timeout): check for it first.
    if error.is_connect() {
        ClientError::Connect {
            url: url.to_string(),
            error,
        }
    } else if error.is_timeout() {
        ClientError::Timeout {
            method: method.clone(),
            url: url.to_string(),
            after,
        }
    } else {
        ClientError::Transport {
            method: method.clone(),
            url: url.to_string(),
            error,
        }
    }
}

/// The broker's `ApiError` body, or one made from the status and the start of the body
/// when something else (a proxy) answered.
/// The broker's error from a refused answer (its body read for at most REQUEST_TIMEOUT).
async fn refusal(resp: reqwest::Response) -> ClientError {
    let status = resp.status();
    let bytes = tokio::time::timeout(REQUEST_TIMEOUT, resp.bytes())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    http_error(status, &bytes)
}

fn http_error(status: StatusCode, body: &[u8]) -> ClientError {
    let error = serde_json::from_slice::<ApiError>(body).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(body);
        let text: String = text.trim().chars().take(200).collect();
        ApiError {
            code: status
                .canonical_reason()
                .unwrap_or("error")
                .to_lowercase()
                .replace(' ', "_"),
            error: if text.is_empty() {
                "the answer has no error details".to_string()
            } else {
                text
            },
            state: None,
        }
    });
    ClientError::Http(status, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> rustls::ClientConfig {
        let ca = dbvm_protocol::pki::FleetCa::generate("t", Duration::from_secs(600)).unwrap();
        dbvm_protocol::tls::client_config(ca.cert_pem(), None).unwrap()
    }

    #[test]
    fn urls_are_built_from_the_base_with_escaped_segments() {
        let c = Client::new("https://broker.example:8443", tls()).unwrap();
        let id = Uuid::nil();
        assert_eq!(
            c.url(&["v1", "commands", &id.to_string(), "wait"]).as_str(),
            "https://broker.example:8443/v1/commands/00000000-0000-0000-0000-000000000000/wait"
        );
        assert_eq!(
            c.url(&["v1", "agents", "a/b?c"]).as_str(),
            "https://broker.example:8443/v1/agents/a%2Fb%3Fc"
        );
        let c = Client::new("https://h/prefix/", tls()).unwrap();
        assert_eq!(
            c.url(&["v1", "agents"]).as_str(),
            "https://h/prefix/v1/agents"
        );
    }

    #[test]
    fn unusable_broker_addresses_are_refused() {
        for bad in [
            "http://localhost:8443",
            "localhost:8443",
            "https://",
            "https://h/?x=1",
            "not a url",
        ] {
            let err = Client::new(bad, tls()).unwrap_err();
            assert!(matches!(err, ClientError::BadUrl { .. }), "{bad}: {err}");
            assert!(err.is_local());
        }
    }

    #[test]
    fn error_bodies_become_api_errors() {
        let err = http_error(
            StatusCode::TOO_MANY_REQUESTS,
            br#"{"code":"busy","error":"8 deployments run and 2 wait; try again later"}"#,
        );
        assert_eq!(err.api_code(), Some("busy"));
        assert_eq!(err.status(), Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(
            err.to_string(),
            "broker answered 429 Too Many Requests: busy: 8 deployments run and 2 wait; try again later"
        );
        let err = http_error(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>\n");
        assert_eq!(err.api_code(), Some("bad_gateway"));
        assert!(
            err.to_string()
                .ends_with("bad_gateway: <html>bad gateway</html>"),
            "{err}"
        );
        let err = http_error(StatusCode::NOT_FOUND, b"");
        assert!(err.to_string().contains("no error details"), "{err}");
    }
}
