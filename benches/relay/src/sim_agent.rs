//! Load-generator agents: each is one tokio task holding one real mTLS connection with its
//! own certificate. It says Hello, waits for Welcome, sends heartbeats at the interval the
//! broker asks for, verifies every delivered command (signature, target, time window and
//! an in-memory replay set, unless told to skip the signature) and answers with its
//! Result, as the real agent does for a command that finishes within its `Ack` delay
//! (100 ms): one frame, flushed.
//!
//! One task per agent and no channels keep the per-agent memory small: frames are read
//! with the protocol's cancel-safe `FrameBuf`, so the read can sit in a `select!` beside
//! the heartbeat timer.

use anyhow::{bail, Context, Result};
use dbvm_protocol::command::{CommandBody, ReplayGuard};
use dbvm_protocol::frame::{self, FrameBuf, MAX_FRAME_LEN};
use dbvm_protocol::messages::{AgentMessage, BrokerMessage, CommandResult, Hello, Outcome};
use dbvm_protocol::{SignedCommand, Verifier, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use ed25519_dalek::VerifyingKey;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::fleet::AgentCert;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_ATTEMPTS: u32 = 5;

/// What every simulated agent shares.
pub struct Settings {
    pub broker: SocketAddr,
    pub key_id: String,
    pub key: VerifyingKey,
    pub skip_verify: bool,
    pub roots: Arc<RootCertStore>,
    pub provider: Arc<rustls::crypto::CryptoProvider>,
}

/// Counters over all simulated agents.
#[derive(Default)]
pub struct Stats {
    pub connected: AtomicUsize,
    pub connect_failures: AtomicUsize,
    /// Sessions that ended before the benchmark asked them to.
    pub dropped: AtomicUsize,
    pub delivered: AtomicU64,
    pub rejected: AtomicU64,
    pub heartbeats: AtomicU64,
    pub first_error: Mutex<Option<String>>,
    pub changed: Notify,
}

impl Stats {
    fn error(&self, e: &anyhow::Error) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(format!("{e:#}"));
        }
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The in-memory replay set of one agent.
#[derive(Default)]
struct Seen(HashSet<Uuid>);

impl ReplayGuard for Seen {
    fn record_new(&mut self, body: &CommandBody) -> Result<bool, String> {
        Ok(self.0.insert(body.id))
    }
}

/// One connection with its read buffer.
struct Link {
    tls: TlsStream<TcpStream>,
    frames: FrameBuf,
}

impl Link {
    async fn send(&mut self, msg: &AgentMessage) -> Result<()> {
        let bytes = frame::encode(msg, MAX_FRAME_LEN)?;
        self.tls
            .write_all(&bytes)
            .await
            .context("writing to the broker")?;
        self.tls.flush().await.context("writing to the broker")?;
        Ok(())
    }

    /// The next frame; `None` when the broker closed the connection. Cancel-safe.
    async fn next_frame(&mut self) -> Result<Option<BrokerMessage>> {
        self.frames
            .next(&mut self.tls, MAX_FRAME_LEN)
            .await
            .context("reading from the broker")
    }
}

fn client_config(settings: &Settings, cert: &AgentCert) -> Result<Arc<ClientConfig>> {
    let certs = dbvm_protocol::tls::certs_from_pem(&cert.cert_pem, "agent certificate")?;
    let key = dbvm_protocol::tls::key_from_pem(&cert.key_pem, "agent key")?;
    // The same settings as dbvm_protocol::tls::client_config (TLS 1.3, ring, the fleet CA),
    // but sharing the root store and provider among all agents of this process.
    let mut config = ClientConfig::builder_with_provider(settings.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(settings.roots.clone())
        .with_client_auth_cert(certs, key)?;
    // The broker sends no tickets; a per-agent session cache would only cost memory.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

async fn connect_once(
    settings: &Settings,
    config: Arc<ClientConfig>,
    id: &str,
) -> Result<(Link, u32)> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(settings.broker))
        .await
        .context("TCP connect timed out")?
        .with_context(|| format!("cannot connect to {}", settings.broker))?;
    tcp.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    let name = ServerName::try_from("localhost").context("server name")?;
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .context("TLS handshake timed out")?
    .context("TLS handshake failed")?;
    let mut link = Link {
        tls,
        frames: FrameBuf::new(),
    };
    let hello = AgentMessage::Hello(Hello {
        protocol_major: PROTOCOL_MAJOR,
        protocol_minor: PROTOCOL_MINOR,
        agent_id: id.to_string(),
        agent_version: concat!("relay-bench-", env!("CARGO_PKG_VERSION")).to_string(),
        operations: vec!["ping".into()],
        capabilities: vec![],
        sealing_key: [7; 32],
        db_kind: None,
    });
    link.send(&hello).await?;
    let welcome = tokio::time::timeout(CONNECT_TIMEOUT, link.next_frame())
        .await
        .context("no Welcome within 30 s")??;
    match welcome {
        Some(BrokerMessage::Welcome(w)) => Ok((link, w.heartbeat_interval_ms.max(100))),
        Some(BrokerMessage::Refused { code, message }) => bail!("refused ({code:?}): {message}"),
        Some(other) => bail!("expected Welcome, got {other:?}"),
        None => bail!("the broker closed the connection before Welcome"),
    }
}

struct Agent {
    index: usize,
    total: usize,
    id: String,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    verifier: Option<Verifier>,
    seen: Seen,
}

impl Agent {
    async fn run(mut self, cert: AgentCert, gate: Arc<Semaphore>, shutdown: CancellationToken) {
        let connected = {
            let Ok(_permit) = gate.acquire().await else {
                return;
            };
            self.connect(&cert).await
        };
        drop(cert);
        let (link, interval_ms) = match connected {
            Ok(c) => c,
            Err(e) => {
                self.stats
                    .error(&e.context(format!("agent {} could not connect", self.id)));
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                self.stats.changed.notify_waiters();
                return;
            }
        };
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
        self.stats.changed.notify_waiters();
        if let Err(e) = self.session(link, interval_ms, &shutdown).await {
            if !shutdown.is_cancelled() {
                self.stats
                    .error(&e.context(format!("agent {} lost its link", self.id)));
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.stats.changed.notify_waiters();
            }
        }
    }

    async fn connect(&self, cert: &AgentCert) -> Result<(Link, u32)> {
        let config = client_config(&self.settings, cert)?;
        let mut last = None;
        for attempt in 0..CONNECT_ATTEMPTS {
            match connect_once(&self.settings, config.clone(), &self.id).await {
                Ok(ok) => return Ok(ok),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no connection attempt was made")))
    }

    async fn session(
        &mut self,
        mut link: Link,
        interval_ms: u32,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let period = Duration::from_millis(u64::from(interval_ms));
        // Spread the first heartbeats over one interval so 10,000 agents do not beat in step.
        let offset = period.mul_f64(self.index as f64 / self.total.max(1) as f64);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = heartbeat.tick() => {
                    seq += 1;
                    link.send(&AgentMessage::Heartbeat { seq }).await?;
                    self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                msg = link.next_frame() => match msg? {
                    Some(BrokerMessage::Deliver(cmd)) => self.deliver(&mut link, cmd).await?,
                    Some(BrokerMessage::ResultAck { .. } | BrokerMessage::HeartbeatAck { .. }) => {}
                    Some(BrokerMessage::Refused { code, message }) => bail!("refused ({code:?}): {message}"),
                    Some(other) => bail!("unexpected message in a session: {other:?}"),
                    None => bail!("the broker closed the connection"),
                },
            }
        }
    }

    async fn deliver(&mut self, link: &mut Link, cmd: SignedCommand) -> Result<()> {
        let s = &self.settings;
        let verifier = self.verifier.get_or_insert_with(|| {
            let v = Verifier::new(self.id.clone()).trust(s.key_id.clone(), s.key);
            if s.skip_verify {
                v.insecure_skip_signature_for_benchmarks()
            } else {
                v
            }
        });
        let now = dbvm_protocol::now_ms();
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        let (id, outcome) = match verifier.verify_once(&cmd, now, &mut self.seen) {
            Ok(verified) => {
                let id = verified.body.id;
                let output_json =
                    format!(r#"{{"pong":true,"agent_id":"{}","at_ms":{now}}}"#, self.id);
                (id, Outcome::Succeeded { output_json })
            }
            Err(e) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                let Ok(body) = cmd.peek_body() else {
                    bail!("the broker delivered a command whose body does not decode");
                };
                (
                    body.id,
                    Outcome::Rejected {
                        code: e.code(),
                        message: e.to_string(),
                    },
                )
            }
        };
        let result = CommandResult {
            id,
            outcome,
            started_at_ms: now,
            finished_at_ms: dbvm_protocol::now_ms(),
        };
        link.send(&AgentMessage::Result(result)).await
    }
}

/// Starts one task per certificate; at most `connect_concurrency` handshakes at a time.
pub fn spawn_all(
    certs: Vec<AgentCert>,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    connect_concurrency: usize,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let total = certs.len();
    let gate = Arc::new(Semaphore::new(connect_concurrency.max(1)));
    for (index, cert) in certs.into_iter().enumerate() {
        let agent = Agent {
            index,
            total,
            id: cert.id.clone(),
            settings: settings.clone(),
            stats: stats.clone(),
            verifier: None,
            seen: Seen::default(),
        };
        tracker.spawn(agent.run(cert, gate.clone(), shutdown.clone()));
    }
}

/// Waits until every agent connected or failed, or `timeout` passes.
pub async fn wait_connected(stats: &Stats, n: usize, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let changed = stats.changed.notified();
        let done = stats.connected.load(Ordering::Relaxed)
            + stats.connect_failures.load(Ordering::Relaxed);
        if done >= n {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            bail!(
                "only {} of {n} agents connected within {} s ({} failed)",
                stats.connected.load(Ordering::Relaxed),
                timeout.as_secs(),
                stats.connect_failures.load(Ordering::Relaxed)
            );
        }
    }
}
