//! The control-plane side of the load: a pool of HTTPS connections to the broker's API
//! (HTTP/2, or HTTP/1.1 keep-alive) and the two ways of driving it. Every round trip
//! (`POST /v1/commands?wait_ms=…` until the finished command comes back) lands in an HDR
//! histogram in microseconds.
//!
//! - Fixed rate (open loop): command i is due at `start + i/rate`; its latency is taken
//!   from that scheduled time, so a stalled broker (or a late generator) shows as latency
//!   instead of silently lowering the rate (coordinated omission). The time from actual
//!   send and the generator's own lateness are recorded beside it.
//! - Saturation (closed loop): `concurrency` workers each send the next command as soon as
//!   their previous one finished.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use dbvm_protocol::api::{AgentView, CommandState, EnrollmentToken, EnrollmentTokenRequest};
use dbvm_protocol::pki::CertifiedKey;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// Which HTTP version the pool speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum HttpVersion {
    /// HTTP/1.1 with keep-alive: one connection per request in flight.
    #[value(name = "1")]
    Http1,
    /// HTTP/2: requests multiplexed over `--api-connections` connections.
    #[value(name = "2")]
    Http2,
}

/// Several HTTP clients (each with its own connection pool), used in turn.
pub struct ApiClient {
    clients: Vec<reqwest::Client>,
    base: String,
    /// The submission URL, parsed once: parsing it per request showed in the profile.
    submit_url: std::sync::OnceLock<(u64, reqwest::Url)>,
    next: AtomicUsize,
    request_timeout: Duration,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// How one submission ended.
pub enum Outcome {
    Succeeded,
    Failed(String),
}

impl ApiClient {
    pub fn new(
        ca_pem: &str,
        cp: &CertifiedKey,
        api: SocketAddr,
        http: HttpVersion,
        connections: usize,
        request_timeout: Duration,
    ) -> Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            let mut tls =
                dbvm_protocol::tls::client_config(ca_pem, Some((&cp.cert_pem, &cp.key_pem)))
                    .context("cannot build the control-plane TLS configuration")?;
            let builder = reqwest::Client::builder()
                .resolve("localhost", api)
                .timeout(request_timeout)
                .tcp_nodelay(true)
                .pool_idle_timeout(None);
            let builder = match http {
                HttpVersion::Http2 => {
                    tls.alpn_protocols = vec![b"h2".to_vec()];
                    builder.use_preconfigured_tls(tls).http2_prior_knowledge()
                }
                HttpVersion::Http1 => {
                    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                    builder.use_preconfigured_tls(tls).http1_only()
                }
            };
            clients.push(builder.build().context("cannot build the HTTP client")?);
        }
        Ok(Self {
            clients,
            base: format!("https://localhost:{}", api.port()),
            submit_url: std::sync::OnceLock::new(),
            next: AtomicUsize::new(0),
            request_timeout,
        })
    }

    fn client(&self) -> &reqwest::Client {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[i]
    }

    /// Opens the connections before timing: `n` concurrent `GET /healthz` per client.
    /// Returns the HTTP version the broker answered with.
    pub async fn warm_up(&self, per_client: usize) -> Result<String> {
        let mut version = String::new();
        for client in &self.clients {
            let url = format!("{}/healthz", self.base);
            let calls = (0..per_client.max(1)).map(|_| client.get(&url).send());
            for r in futures_join_all(calls).await {
                let resp = r.with_context(|| format!("GET {url}"))?;
                if !resp.status().is_success() {
                    bail!("GET {url}: {}", resp.status());
                }
                version = format!("{:?}", resp.version());
            }
        }
        Ok(version)
    }

    /// Submits one command and waits (server side, up to `wait_ms`) for it to finish.
    pub async fn submit(&self, body: Bytes, wait_ms: u64) -> Outcome {
        let url = match self.submit_url.get() {
            Some((ms, url)) if *ms == wait_ms => url.clone(),
            _ => {
                let text = format!("{}/v1/commands?wait_ms={wait_ms}", self.base);
                match reqwest::Url::parse(&text) {
                    Ok(url) => {
                        let _ = self.submit_url.set((wait_ms, url.clone()));
                        url
                    }
                    Err(e) => return Outcome::Failed(format!("{text}: {e}")),
                }
            }
        };
        let sent = self
            .client()
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Outcome::Failed(format!(
                    "timeout after {} s",
                    self.request_timeout.as_secs()
                ))
            }
            Err(e) => return Outcome::Failed(format!("transport: {}", error_chain(&e))),
        };
        let status = resp.status();
        if status != reqwest::StatusCode::ACCEPTED {
            let text = resp.text().await.unwrap_or_default();
            return Outcome::Failed(format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            ));
        }
        // Only the state is read: the rest of the view is not needed here.
        #[derive(serde::Deserialize)]
        struct Answer {
            state: CommandState,
        }
        match resp.json::<Answer>().await {
            Ok(view) if view.state == CommandState::Succeeded => Outcome::Succeeded,
            Ok(view) => Outcome::Failed(format!(
                "state {} when the answer came",
                view.state.as_str()
            )),
            Err(e) => Outcome::Failed(format!("answer does not decode: {}", error_chain(&e))),
        }
    }

    /// `POST /v1/enrollment-tokens` for `agent_id`.
    pub async fn enrollment_token(&self, agent_id: &str) -> Result<String> {
        let url = format!("{}/v1/enrollment-tokens", self.base);
        let req = EnrollmentTokenRequest {
            agent_id: agent_id.to_string(),
            ttl_seconds: None,
        };
        let resp = self
            .client()
            .post(&url)
            .json(&req)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!(
                "POST {url}: {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let token: EnrollmentToken = resp
            .json()
            .await
            .with_context(|| format!("POST {url}: answer"))?;
        Ok(token.token)
    }

    /// Whether the broker has `agent_id` connected (`GET /v1/agents/{id}`).
    pub async fn agent_connected(&self, agent_id: &str) -> Result<bool> {
        let url = format!("{}/v1/agents/{agent_id}", self.base);
        let resp = self
            .client()
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        if !resp.status().is_success() {
            bail!("GET {url}: {}", resp.status());
        }
        let view: AgentView = resp
            .json()
            .await
            .with_context(|| format!("GET {url}: answer"))?;
        Ok(view.connected)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Runs futures concurrently and collects their outputs in order (a tiny `join_all`).
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// 1 µs .. 10 min at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    // constant bounds that satisfy 1 <= low, high >= 2*low, sigfig <= 5
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Everything recorded during one load phase.
pub struct Recorder {
    /// From the intended send time (scheduled for fixed rate; actual for closed loop).
    pub latency: Histogram<u64>,
    /// From the actual send time.
    pub service: Histogram<u64>,
    /// Actual minus scheduled send time (fixed rate only).
    pub lag: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub error_examples: Vec<String>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            latency: histogram(),
            service: histogram(),
            lag: histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            error_examples: Vec::new(),
        }
    }

    fn record(&mut self, intended: Instant, sent: Instant, done: Instant, outcome: Outcome) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.lag
            .saturating_record(us(sent.saturating_duration_since(intended)));
        match outcome {
            Outcome::Succeeded => {
                self.ok += 1;
                self.latency
                    .saturating_record(us(done.saturating_duration_since(intended)));
                self.service
                    .saturating_record(us(done.saturating_duration_since(sent)));
            }
            Outcome::Failed(text) => {
                // Group by the text before any detail that varies (ids, sizes).
                let kind: String = text.chars().take(60).collect();
                *self.errors.entry(kind).or_default() += 1;
                if self.error_examples.len() < 5 {
                    self.error_examples.push(text);
                }
            }
        }
    }
}

/// What a load phase produced.
pub struct LoadResult {
    pub sent: usize,
    pub elapsed: Duration,
    pub recorder: Recorder,
}

fn lock(r: &Mutex<Recorder>) -> std::sync::MutexGuard<'_, Recorder> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Open loop at `rate` commands/s. A pacing thread (not the tokio timer, whose 1 ms
/// granularity would add up to a millisecond of lateness to every command) sleeps until
/// each scheduled time and hands the request to the runtime; the time from the schedule
/// to the task's first poll is recorded as the generator's lateness.
pub async fn fixed_rate(
    api: Arc<ApiClient>,
    bodies: Vec<Bytes>,
    rate: f64,
    wait_ms: u64,
) -> LoadResult {
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let tracker = TaskTracker::new();
    let sent = bodies.len();
    let handle = tokio::runtime::Handle::current();
    let start = std::time::Instant::now() + Duration::from_millis(5);
    let pacer = {
        let (tracker, recorder, api) = (tracker.clone(), recorder.clone(), api.clone());
        tokio::task::spawn_blocking(move || {
            for (i, body) in bodies.into_iter().enumerate() {
                let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
                let now = std::time::Instant::now();
                if scheduled > now {
                    std::thread::sleep(scheduled - now);
                }
                let (api, recorder) = (api.clone(), recorder.clone());
                let scheduled = Instant::from_std(scheduled);
                tracker.spawn_on(
                    async move {
                        let sent = Instant::now();
                        let outcome = api.submit(body, wait_ms).await;
                        lock(&recorder).record(scheduled, sent, Instant::now(), outcome);
                    },
                    &handle,
                );
            }
        })
    };
    let _ = pacer.await;
    tracker.close();
    tracker.wait().await;
    let elapsed = start.elapsed();
    let recorder = std::mem::replace(&mut *lock(&recorder), Recorder::new());
    LoadResult {
        sent,
        elapsed,
        recorder,
    }
}

/// Closed loop with `concurrency` commands outstanding.
pub async fn closed_loop(
    api: Arc<ApiClient>,
    bodies: Vec<Bytes>,
    concurrency: usize,
    wait_ms: u64,
) -> LoadResult {
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let tracker = TaskTracker::new();
    let start = Instant::now();
    for _ in 0..concurrency.max(1) {
        let (api, bodies, next, recorder) =
            (api.clone(), bodies.clone(), next.clone(), recorder.clone());
        tracker.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let sent = Instant::now();
                let outcome = api.submit(body.clone(), wait_ms).await;
                lock(&recorder).record(sent, sent, Instant::now(), outcome);
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    let elapsed = start.elapsed();
    let recorder = std::mem::replace(&mut *lock(&recorder), Recorder::new());
    LoadResult {
        sent: bodies.len(),
        elapsed,
        recorder,
    }
}
