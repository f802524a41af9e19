//! The link to the broker: enroll when there is no certificate (`enroll`), dial over
//! mTLS, say Hello, heartbeat, hand delivered commands to the [`executor`], re-send
//! unacknowledged results, renew the certificate at two thirds of its life, and
//! reconnect with jittered exponential backoff when anything breaks. On shutdown it
//! drains: no new command, the running ones get until the drain deadline, events waiting
//! in the uplink go out, then the connection closes.

mod enroll;
pub mod executor;

use crate::identity::{Identity, StateDir};
use crate::uplink::Uplink;
use dbvm_protocol::frame::{self, FrameError, MAX_FRAME_LEN};
use dbvm_protocol::messages::{AgentMessage, BrokerMessage, Hello};
use dbvm_protocol::seal::SealingKey;
use dbvm_protocol::{AgentId, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use enroll::Renewal;
use executor::Executor;
use rand::Rng;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the last frames (results, events) get to reach the broker at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach the broker at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with the broker failed: {0}")]
    Tls(std::io::Error),
    #[error("TLS setup: {0}")]
    TlsConfig(#[from] dbvm_protocol::tls::TlsError),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("link: {0}")]
    Frame(#[from] FrameError),
    #[error("the broker refused this agent ({code:?}): {message}")]
    Refused {
        code: dbvm_protocol::messages::RefuseCode,
        message: String,
    },
    #[error("not enrolled: no certificate in the state directory and no enrollment token (set broker.enrollment_token_file)")]
    NoToken,
    #[error("cannot read the enrollment token file {0}: {1}")]
    TokenFile(std::path::PathBuf, std::io::Error),
    #[error("unexpected message from the broker: {0}")]
    Unexpected(String),
    #[error("state: {0}")]
    State(#[from] crate::identity::StateError),
    #[error("certificate: {0}")]
    Pki(String),
    #[error("the broker closed the connection")]
    Closed,
}

impl LinkError {
    /// The broker refused this agent's certificate as revoked.
    pub fn is_revoked(&self) -> bool {
        matches!(
            self,
            LinkError::Refused {
                code: dbvm_protocol::messages::RefuseCode::CertificateRevoked,
                ..
            }
        )
    }
}

/// Jittered exponential backoff: each delay is drawn between half and all of the
/// current step; the step doubles up to the cap.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            step: initial,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let ms = step.as_millis() as u64;
        Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms.max(1)))
    }

    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

/// The sender of the live connection, if any: results and progress go through it.
#[derive(Debug, Default)]
pub(crate) struct Outgoing(Mutex<Option<mpsc::Sender<AgentMessage>>>);

impl Outgoing {
    fn set(&self, tx: Option<mpsc::Sender<AgentMessage>>) {
        *lock(&self.0) = tx;
    }

    /// Sends if the link is up (waiting for room); drops the message otherwise.
    pub(crate) async fn send(&self, msg: AgentMessage) {
        let tx = lock(&self.0).clone();
        if let Some(tx) = tx {
            let _ = tx.send(msg).await;
        }
    }

    /// Sends if the link is up and has room; drops the message otherwise.
    fn try_send(&self, msg: AgentMessage) {
        if let Some(tx) = lock(&self.0).as_ref() {
            let _ = tx.try_send(msg);
        }
    }
}

/// Where the link dials and how it proves who it is.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub agent_id: AgentId,
    pub server_name: String,
    pub broker_address: String,
    pub ca_pem: String,
    pub token_file: Option<std::path::PathBuf>,
    /// First and largest reconnect delay.
    pub backoff: (Duration, Duration),
}

/// What `Hello` says of the database (only the database capability knows it).
pub type DbKind = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The link to the broker and the executor behind it.
pub struct Link {
    agent_id: AgentId,
    server_name: String,
    broker_address: String,
    ca_pem: String,
    ca_not_after_ms: Option<i64>,
    token_file: Option<std::path::PathBuf>,
    backoff: (Duration, Duration),
    state: StateDir,
    sealing_key: Arc<SealingKey>,
    executor: Arc<Executor>,
    uplink: Arc<Uplink>,
    outgoing: Arc<Outgoing>,
    db_kind: DbKind,
    progress_rx: Mutex<Option<mpsc::UnboundedReceiver<crate::dispatch::ProgressUpdate>>>,
    lifecycle: crate::lifecycle::Lifecycle,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

enum SessionEnd {
    /// The connection worked for this long before ending.
    After(Duration),
    /// The session drained the commands (shutdown) before ending.
    Drained,
    /// A capability holds the link down (see [`crate::lifecycle::Lifecycle::hold_link`]).
    Held,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere mid-update; the data (an optional sender or
    // receiver) stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Link {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        endpoint: Endpoint,
        state: StateDir,
        verifier: dbvm_protocol::Verifier,
        dispatcher: crate::dispatch::Dispatcher,
        sealing_key: SealingKey,
        journal: crate::journal::Journal,
        uplink: Arc<Uplink>,
        db_kind: DbKind,
        lifecycle: crate::lifecycle::Lifecycle,
    ) -> Arc<Self> {
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        let outgoing = Arc::new(Outgoing::default());
        let sealing_key = Arc::new(sealing_key);
        let executor = Arc::new(Executor::new(
            endpoint.agent_id.clone(),
            verifier,
            dispatcher,
            sealing_key.clone(),
            journal,
            outgoing.clone(),
            progress_tx,
        ));
        let ca_not_after_ms = dbvm_protocol::pki::validity_ms(&endpoint.ca_pem)
            .ok()
            .map(|(_, na)| na);
        Arc::new(Self {
            agent_id: endpoint.agent_id,
            server_name: endpoint.server_name,
            broker_address: endpoint.broker_address,
            ca_pem: endpoint.ca_pem,
            ca_not_after_ms,
            token_file: endpoint.token_file,
            backoff: endpoint.backoff,
            state,
            sealing_key,
            executor,
            uplink,
            outgoing,
            db_kind,
            progress_rx: Mutex::new(Some(progress_rx)),
            lifecycle,
        })
    }

    pub fn executor(&self) -> &Arc<Executor> {
        &self.executor
    }

    /// Runs the link until `shutdown`, then drains: running commands get `drain` to
    /// finish (their results go out while the link is up), the rest are journaled as
    /// interrupted and reported, waiting events are sent, and the connection closes.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, drain: Duration) {
        if let Some(mut rx) = lock(&self.progress_rx).take() {
            let outgoing = self.outgoing.clone();
            tokio::spawn(async move {
                while let Some(p) = rx.recv().await {
                    outgoing.try_send(AgentMessage::Progress {
                        id: p.id,
                        percent: p.percent,
                        message: p.message,
                    });
                }
            });
        }
        let mut backoff = Backoff::new(self.backoff.0, self.backoff.1);
        let mut drained = false;
        let mut held = self.lifecycle.hold_changes();
        loop {
            if *held.borrow_and_update() {
                tracing::info!("the link is held down (an upgrade is on trial)");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = async { let _ = held.wait_for(|h| !*h).await; } => {}
                }
                tracing::info!("the link is released");
                backoff.reset();
            }
            // Shutdown cuts dialling short; a live session drains itself.
            let established = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.establish() => r,
            };
            let attempt = match established {
                Ok(e) => self.clone().session(e, shutdown.clone(), drain).await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(SessionEnd::Drained) => {
                    drained = true;
                    break;
                }
                Ok(SessionEnd::Held) => continue,
                Ok(SessionEnd::After(lasted)) => {
                    if lasted > Duration::from_secs(10) {
                        backoff.reset();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "link to the broker failed");
                    self.uplink.link_failed(e.to_string());
                    if e.is_revoked() {
                        self.retire_identity();
                    }
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            let delay = backoff.next_delay();
            tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if !drained {
            // Shut down while not connected: results are journaled and go out after the
            // restart.
            self.executor.stop_accepting();
            self.wait_for_commands(drain).await;
        }
        self.outgoing.set(None);
    }

    /// The broker revoked this agent's certificate: set it aside so the next attempt
    /// enrolls again, which needs a new one-time token.
    fn retire_identity(&self) {
        let token = self.token_file.as_ref().map_or_else(
            || "DBVM_AGENT_ENROLLMENT_TOKEN".to_string(),
            |p| p.display().to_string(),
        );
        tracing::error!(
            "the broker revoked this agent's certificate; it enrolls again as soon as a new one-time token is in {token} (dbvmctl enroll-token {})",
            self.agent_id
        );
        if let Err(e) = self.state.retire_identity() {
            tracing::error!(error = %e, "cannot set the revoked certificate aside");
        }
    }

    /// Waits up to `drain` for running commands, then interrupts the rest.
    async fn wait_for_commands(&self, drain: Duration) {
        let running = self.executor.running();
        if running > 0 {
            tracing::info!(
                running,
                drain_ms = drain.as_millis() as u64,
                "waiting for running commands to finish"
            );
        }
        if tokio::time::timeout(drain, self.executor.idle())
            .await
            .is_err()
        {
            let n = self.executor.interrupt_running(drain).await;
            tracing::warn!(
                interrupted = n,
                "commands still running at the drain deadline were interrupted"
            );
        }
    }

    async fn dial(&self, identity: Option<&Identity>) -> Result<TlsStream<TcpStream>, LinkError> {
        dial(
            &self.ca_pem,
            &self.broker_address,
            &self.server_name,
            identity,
        )
        .await
    }

    /// Enrolls if needed, dials, says Hello and reads the Welcome.
    async fn establish(&self) -> Result<Established, LinkError> {
        let identity = match self.state.identity()? {
            Some(id) if !id.expired(dbvm_protocol::now_ms()) => id,
            Some(_) => {
                tracing::warn!(
                    "the agent certificate expired; enrolling again (needs a new enrollment token)"
                );
                self.enroll().await?
            }
            None => self.enroll().await?,
        };
        enroll::publish(&identity, &self.uplink, self.ca_not_after_ms);
        let tls = self.dial(Some(&identity)).await?;
        let (mut rd, mut wr) = tokio::io::split(tls);
        let hello = AgentMessage::Hello(Hello {
            protocol_major: PROTOCOL_MAJOR,
            protocol_minor: PROTOCOL_MINOR,
            agent_id: self.agent_id.to_string(),
            agent_version: dbvm_host::VERSION.to_string(),
            operations: self.executor.operation_names(),
            capabilities: vec!["journal".into(), "renew".into(), "sealed-secrets".into()],
            sealing_key: self.sealing_key.public_key(),
            db_kind: (self.db_kind)(),
        });
        frame::write_frame(&mut wr, &hello, MAX_FRAME_LEN).await?;
        let first = tokio::time::timeout(
            REPLY_TIMEOUT,
            frame::read_frame::<BrokerMessage, _>(&mut rd, MAX_FRAME_LEN),
        )
        .await
        .map_err(|_| LinkError::Timeout("waiting for Welcome"))??;
        let welcome = match first {
            Some(BrokerMessage::Welcome(w)) => w,
            Some(BrokerMessage::Refused { code, message }) => {
                return Err(LinkError::Refused { code, message })
            }
            Some(other) => return Err(LinkError::Unexpected(format!("{other:?} before Welcome"))),
            None => return Err(LinkError::Closed),
        };
        if welcome.protocol_major != PROTOCOL_MAJOR {
            return Err(LinkError::Unexpected(format!(
                "broker speaks protocol {}.{}",
                welcome.protocol_major, welcome.protocol_minor
            )));
        }
        tracing::info!(broker_version = %welcome.broker_version, "connected to the broker");
        Ok(Established {
            identity,
            rd,
            wr,
            welcome,
        })
    }

    /// One session, from the Welcome until the connection ends or the drain is done.
    async fn session(
        self: Arc<Self>,
        established: Established,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> Result<SessionEnd, LinkError> {
        let Established {
            identity,
            rd,
            mut wr,
            welcome,
        } = established;
        let started = Instant::now();
        let mut renewal = Renewal::new(&identity);

        let (out_tx, mut out_rx) = mpsc::channel::<AgentMessage>(1024);
        // The writer ends when the session does: what is queued by then is written (within
        // FLUSH_TIMEOUT), but it does not wait for senders that outlive the session (a
        // running command's clone of the channel).
        let ended = CancellationToken::new();
        let writer_ended = ended.clone();
        let writer = tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    biased;
                    m = out_rx.recv() => m,
                    _ = writer_ended.cancelled() => out_rx.try_recv().ok(),
                };
                let Some(msg) = msg else { break };
                if let Err(e) = frame::write_frame(&mut wr, &msg, MAX_FRAME_LEN).await {
                    tracing::debug!(error = %e, "writing to the broker failed");
                    break;
                }
            }
        });
        self.outgoing.set(Some(out_tx.clone()));
        self.uplink.link_up(welcome.protocol_minor);
        if let Some(report) = self.uplink.on_connect() {
            let _ = out_tx.send(report).await;
        }
        for m in self.uplink.drain() {
            let _ = out_tx.send(m).await;
        }
        // Results the broker has not acknowledged yet (from before a restart or a cut).
        for r in self.executor.unacked_results().await {
            let _ = out_tx.send(AgentMessage::Result(r)).await;
        }

        let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
        let dead_after = interval * 3;
        let (in_tx, mut in_rx) = mpsc::channel::<Result<Option<BrokerMessage>, FrameError>>(16);
        let reader = tokio::spawn(read_loop(rd, in_tx));
        let mut heartbeat = tokio::time::interval(interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut last_frame = Instant::now();
        let mut held = self.lifecycle.hold_changes();
        self.lifecycle.set_connected(true);
        // Set when shutdown begins: until then commands are taken; after it, the session
        // lives on only until the running ones are done or the deadline passes.
        let mut drain_until: Option<tokio::time::Instant> = None;

        let end: Result<SessionEnd, LinkError> = loop {
            let renew_in = renewal.due_in();
            let drain_deadline = drain_until.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                _ = shutdown.cancelled(), if drain_until.is_none() => {
                    self.executor.stop_accepting();
                    drain_until = Some(tokio::time::Instant::now() + drain);
                    let running = self.executor.running();
                    if running > 0 {
                        tracing::info!(running, drain_ms = drain.as_millis() as u64, "shutting down: waiting for running commands to finish");
                    }
                }
                _ = self.executor.idle(), if drain_until.is_some() => break Ok(SessionEnd::Drained),
                _ = async { let _ = held.wait_for(|h| *h).await; }, if drain_until.is_none() => {
                    tracing::info!("closing the session: the link is held down");
                    break Ok(SessionEnd::Held);
                }
                _ = tokio::time::sleep_until(drain_deadline), if drain_until.is_some() => {
                    let n = self.executor.interrupt_running(drain).await;
                    tracing::warn!(interrupted = n, "commands still running at the drain deadline were interrupted");
                    break Ok(SessionEnd::Drained);
                }
                _ = heartbeat.tick() => {
                    if last_frame.elapsed() > dead_after {
                        break Err(LinkError::Timeout("no frame from the broker for three heartbeat intervals"));
                    }
                    seq += 1;
                    if out_tx.send(AgentMessage::Heartbeat { seq }).await.is_err() {
                        break Err(LinkError::Closed);
                    }
                }
                _ = self.uplink.notified() => {
                    for m in self.uplink.drain() {
                        if out_tx.send(m).await.is_err() {
                            break;
                        }
                    }
                }
                _ = tokio::time::sleep(renew_in) => {
                    match renewal.start(&self.agent_id, &self.uplink) {
                        Ok(csr_pem) => {
                            tracing::info!("renewing the agent certificate");
                            let _ = out_tx.send(AgentMessage::Renew { csr_pem }).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot renew the agent certificate"),
                    }
                }
                incoming = in_rx.recv() => {
                    let msg = match incoming {
                        Some(Ok(Some(m))) => m,
                        Some(Ok(None)) | None => break Err(LinkError::Closed),
                        Some(Err(e)) => break Err(e.into()),
                    };
                    last_frame = Instant::now();
                    match msg {
                        BrokerMessage::Deliver(cmd) => self.executor.on_deliver(cmd, &out_tx).await,
                        BrokerMessage::ResultAck { id } => self.executor.mark_acked(id).await,
                        BrokerMessage::HeartbeatAck { .. } => {}
                        BrokerMessage::Renewed { cert_pem } => {
                            if let Err(e) = renewal.finish(&self.state, &self.uplink, cert_pem) {
                                tracing::error!(error = %e, "renewed certificate could not be stored; keeping the old one");
                                renewal.failed(&self.uplink, e);
                            }
                        }
                        BrokerMessage::RenewFailed { message } => {
                            tracing::warn!(%message, "the broker refused to renew the certificate; retrying later");
                            renewal.failed(&self.uplink, format!("the broker refused: {message}"));
                        }
                        BrokerMessage::Refused { code, message } => break Err(LinkError::Refused { code, message }),
                        other @ (BrokerMessage::Welcome(_) | BrokerMessage::Enrolled { .. }) => {
                            break Err(LinkError::Unexpected(format!("{other:?} in an established session")));
                        }
                    }
                }
            }
        };
        if matches!(end, Ok(SessionEnd::Drained)) {
            // Events that are still waiting (a last health change, say) go out with the rest.
            for m in self.uplink.drain() {
                let _ = out_tx.send(m).await;
            }
        }
        self.outgoing.set(None);
        self.uplink.link_down();
        reader.abort();
        drop(out_tx);
        ended.cancel();
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, writer).await;
        self.lifecycle.set_connected(false);
        match end {
            Ok(SessionEnd::Drained) => Ok(SessionEnd::Drained),
            Ok(SessionEnd::Held) => Ok(SessionEnd::Held),
            Ok(SessionEnd::After(_)) => Ok(SessionEnd::After(started.elapsed())),
            // The caller sets the revoked certificate aside.
            Err(e) if e.is_revoked() => Err(e),
            Err(e) => {
                self.uplink.link_failed(e.to_string());
                tracing::warn!(error = %e, after_ms = started.elapsed().as_millis() as u64, "session with the broker ended");
                Ok(SessionEnd::After(started.elapsed()))
            }
        }
    }
}

/// Dials the broker over mTLS (`identity` is the client certificate, none when enrolling).
async fn dial(
    ca_pem: &str,
    broker_address: &str,
    server_name: &str,
    identity: Option<&Identity>,
) -> Result<TlsStream<TcpStream>, LinkError> {
    let config = dbvm_protocol::tls::client_config(
        ca_pem,
        identity.map(|i| (i.cert_pem.as_str(), i.key_pem.as_str())),
    )?;
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(broker_address))
        .await
        .map_err(|_| LinkError::Timeout("connecting to the broker"))?
        .map_err(|source| LinkError::Connect {
            addr: broker_address.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| LinkError::Pki(e.to_string()))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| LinkError::Timeout("TLS handshake with the broker"))?
        .map_err(LinkError::Tls)
}

/// What an upgrade's trial run proved (see [`trial`]).
#[derive(Debug, serde::Serialize)]
pub struct TrialReport {
    pub broker_version: String,
    /// From the start of this attempt to the heartbeat's answer.
    pub connected_ms: u64,
}

/// An upgrade's trial run of a new agent binary (`dbvm-agent --upgrade-trial`, started by
/// the old agent while it holds its own link down): with the stored identity (it never
/// enrolls), dial the broker, say Hello, read the Welcome, and have one heartbeat
/// answered; then close without taking a command (the broker delivers whatever it handed
/// this session again to the next one). The Hello names no operation: the agent that
/// runs after the trial says which it has.
pub async fn trial(
    endpoint: &Endpoint,
    state: &StateDir,
    sealing_public: [u8; 32],
) -> Result<TrialReport, LinkError> {
    let started = Instant::now();
    let identity = match state.identity()? {
        Some(id) if !id.expired(dbvm_protocol::now_ms()) => id,
        Some(_) => return Err(LinkError::Pki("the agent certificate expired".into())),
        None => return Err(LinkError::NoToken),
    };
    let tls = dial(
        &endpoint.ca_pem,
        &endpoint.broker_address,
        &endpoint.server_name,
        Some(&identity),
    )
    .await?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let hello = AgentMessage::Hello(Hello {
        protocol_major: PROTOCOL_MAJOR,
        protocol_minor: PROTOCOL_MINOR,
        agent_id: endpoint.agent_id.to_string(),
        agent_version: dbvm_host::VERSION.to_string(),
        operations: Vec::new(),
        capabilities: vec![
            "journal".into(),
            "renew".into(),
            "sealed-secrets".into(),
            "upgrade-trial".into(),
        ],
        sealing_key: sealing_public,
        db_kind: None,
    });
    frame::write_frame(&mut wr, &hello, MAX_FRAME_LEN).await?;
    let mut broker_version = None;
    let answered = tokio::time::timeout(REPLY_TIMEOUT, async {
        loop {
            match frame::read_frame::<BrokerMessage, _>(&mut rd, MAX_FRAME_LEN).await? {
                Some(BrokerMessage::Welcome(w)) if broker_version.is_none() => {
                    broker_version = Some(w.broker_version);
                    let beat = AgentMessage::Heartbeat { seq: 1 };
                    frame::write_frame(&mut wr, &beat, MAX_FRAME_LEN).await?;
                }
                Some(BrokerMessage::HeartbeatAck { seq: 1 }) if broker_version.is_some() => {
                    return Ok(())
                }
                Some(BrokerMessage::Refused { code, message }) => {
                    return Err(LinkError::Refused { code, message })
                }
                // Deliveries and the rest: left for the agent that runs after the trial.
                Some(_) => {}
                None => return Err(LinkError::Closed),
            }
        }
    })
    .await
    .map_err(|_| LinkError::Timeout("waiting for the broker's answer to a heartbeat"))?;
    answered?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
    Ok(TrialReport {
        broker_version: broker_version.unwrap_or_default(),
        connected_ms: started.elapsed().as_millis() as u64,
    })
}

type Reader = tokio::io::ReadHalf<TlsStream<TcpStream>>;
type Writer = tokio::io::WriteHalf<TlsStream<TcpStream>>;

/// A connection that got its Welcome.
struct Established {
    identity: Identity,
    rd: Reader,
    wr: Writer,
    welcome: dbvm_protocol::messages::Welcome,
}

async fn read_loop(mut rd: Reader, tx: mpsc::Sender<Result<Option<BrokerMessage>, FrameError>>) {
    loop {
        let r = frame::read_frame::<BrokerMessage, _>(&mut rd, MAX_FRAME_LEN).await;
        let stop = !matches!(r, Ok(Some(_)));
        if tx.send(r).await.is_err() || stop {
            return;
        }
    }
}
