//! The link to the broker: enroll when there is no certificate, dial over mTLS, say
//! Hello, heartbeat, verify and run delivered commands, re-send unacknowledged results,
//! renew the certificate at two thirds of its life, and reconnect with jittered
//! exponential backoff when anything breaks.

use crate::dispatch::{Dispatcher, OpContext, OpError, ProgressUpdate};
use crate::identity::{Identity, StateDir};
use crate::journal::{Entry, Journal};
use dbvm_protocol::frame::{self, FrameError, MAX_FRAME_LEN};
use dbvm_protocol::messages::{
    AgentMessage, BrokerMessage, CommandResult, EnrollRequest, Hello, Outcome, RejectCode,
};
use dbvm_protocol::seal::SealingKey;
use dbvm_protocol::{
    AgentId, SignedCommand, VerifiedCommand, Verifier, VerifyError, PROTOCOL_MAJOR, PROTOCOL_MINOR,
};
use rand::Rng;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// A command that has not finished after this long is acknowledged (`Ack`: it is
/// running); one that finishes sooner sends only its result, which says as much. The
/// broker writes `running` for a command only after 200 ms anyway.
const ACK_AFTER: Duration = Duration::from_millis(100);
/// Largest operation output: leaves room in one frame for the rest of the result.
const MAX_OUTPUT_BYTES: usize = MAX_FRAME_LEN - 4096;

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

/// Everything the link needs, shared with running operations.
pub struct Agent {
    pub agent_id: AgentId,
    pub server_name: String,
    pub broker_address: String,
    pub ca_pem: String,
    pub token_file: Option<std::path::PathBuf>,
    pub state: StateDir,
    pub verifier: Verifier,
    pub dispatcher: Dispatcher,
    pub sealing_key: Arc<SealingKey>,
    pub journal: Arc<Mutex<Journal>>,
    pub backoff: (Duration, Duration),
    /// Events and health reports waiting for the broker.
    pub uplink: Arc<crate::uplink::Uplink>,
    /// Sender of the live connection, if any: results go through it.
    outbox: Mutex<Option<mpsc::Sender<AgentMessage>>>,
    progress_tx: mpsc::UnboundedSender<ProgressUpdate>,
    progress_rx: Mutex<Option<mpsc::UnboundedReceiver<ProgressUpdate>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

type Reader = tokio::io::ReadHalf<TlsStream<TcpStream>>;

enum SessionEnd {
    /// The connection worked for a while before ending.
    AfterWelcome(Duration),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere mid-update; the data (a journal handle or an
    // optional sender) stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        agent_id: AgentId,
        server_name: String,
        broker_address: String,
        ca_pem: String,
        token_file: Option<std::path::PathBuf>,
        state: StateDir,
        verifier: Verifier,
        dispatcher: Dispatcher,
        sealing_key: SealingKey,
        journal: Journal,
        backoff: (Duration, Duration),
        uplink: Arc<crate::uplink::Uplink>,
    ) -> Arc<Self> {
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            agent_id,
            server_name,
            broker_address,
            ca_pem,
            token_file,
            state,
            verifier,
            dispatcher,
            sealing_key: Arc::new(sealing_key),
            journal: Arc::new(Mutex::new(journal)),
            backoff,
            uplink,
            outbox: Mutex::new(None),
            progress_tx,
            progress_rx: Mutex::new(Some(progress_rx)),
        })
    }

    /// Runs the link until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if let Some(mut rx) = lock(&self.progress_rx).take() {
            let me = self.clone();
            tokio::spawn(async move {
                while let Some(p) = rx.recv().await {
                    me.send_best_effort(AgentMessage::Progress {
                        id: p.id,
                        percent: p.percent,
                        message: p.message,
                    });
                }
            });
        }
        let mut backoff = Backoff::new(self.backoff.0, self.backoff.1);
        loop {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.clone().connect_once(shutdown.clone()) => r,
            };
            match attempt {
                Ok(SessionEnd::AfterWelcome(lasted)) => {
                    if lasted > Duration::from_secs(10) {
                        backoff.reset();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "link to the broker failed"),
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
        *lock(&self.outbox) = None;
    }

    fn send_best_effort(&self, msg: AgentMessage) {
        if let Some(tx) = lock(&self.outbox).as_ref() {
            let _ = tx.try_send(msg);
        }
    }

    async fn dial(&self, identity: Option<&Identity>) -> Result<TlsStream<TcpStream>, LinkError> {
        let config = dbvm_protocol::tls::client_config(
            &self.ca_pem,
            identity.map(|i| (i.cert_pem.as_str(), i.key_pem.as_str())),
        )?;
        let connector = TlsConnector::from(Arc::new(config));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.broker_address))
            .await
            .map_err(|_| LinkError::Timeout("connecting to the broker"))?
            .map_err(|source| LinkError::Connect {
                addr: self.broker_address.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|e| LinkError::Pki(e.to_string()))?;
        tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| LinkError::Timeout("TLS handshake with the broker"))?
            .map_err(LinkError::Tls)
    }

    fn read_token(&self) -> Result<String, LinkError> {
        if let Ok(t) = std::env::var("DBVM_AGENT_ENROLLMENT_TOKEN") {
            if !t.trim().is_empty() {
                return Ok(t.trim().to_string());
            }
        }
        let path = self.token_file.as_ref().ok_or(LinkError::NoToken)?;
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
            Ok(_) => Err(LinkError::NoToken),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LinkError::NoToken),
            Err(e) => Err(LinkError::TokenFile(path.clone(), e)),
        }
    }

    /// First boot: trade the one-time token and a CSR for a certificate.
    pub async fn enroll(&self) -> Result<Identity, LinkError> {
        let token = self.read_token()?;
        let (csr_pem, key_pem) = dbvm_protocol::pki::make_csr(&self.agent_id)
            .map_err(|e| LinkError::Pki(e.to_string()))?;
        let mut tls = self.dial(None).await?;
        let req = AgentMessage::Enroll(EnrollRequest {
            protocol_major: PROTOCOL_MAJOR,
            protocol_minor: PROTOCOL_MINOR,
            agent_id: self.agent_id.to_string(),
            token,
            csr_pem,
        });
        frame::write_frame(&mut tls, &req, MAX_FRAME_LEN).await?;
        let reply = tokio::time::timeout(
            REPLY_TIMEOUT,
            frame::read_frame::<BrokerMessage, _>(&mut tls, MAX_FRAME_LEN),
        )
        .await
        .map_err(|_| LinkError::Timeout("waiting for the enrollment answer"))??;
        match reply {
            Some(BrokerMessage::Enrolled { cert_pem, .. }) => {
                let identity = Identity::new(cert_pem, key_pem).map_err(LinkError::Pki)?;
                self.state.store_identity(&identity)?;
                tracing::info!(
                    not_after_ms = identity.not_after_ms,
                    "enrolled with the broker"
                );
                Ok(identity)
            }
            Some(BrokerMessage::Refused { code, message }) => {
                Err(LinkError::Refused { code, message })
            }
            Some(other) => Err(LinkError::Unexpected(format!("{other:?}"))),
            None => Err(LinkError::Closed),
        }
    }

    async fn connect_once(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<SessionEnd, LinkError> {
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
        let tls = self.dial(Some(&identity)).await?;
        let (rd, mut wr) = tokio::io::split(tls);
        let hello = AgentMessage::Hello(Hello {
            protocol_major: PROTOCOL_MAJOR,
            protocol_minor: PROTOCOL_MINOR,
            agent_id: self.agent_id.to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            operations: self.dispatcher.names(),
            capabilities: vec!["journal".into(), "renew".into(), "sealed-secrets".into()],
            sealing_key: self.sealing_key.public_key(),
            db_kind: None,
        });
        frame::write_frame(&mut wr, &hello, MAX_FRAME_LEN).await?;
        let mut rd = rd;
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
        let started = Instant::now();

        let (out_tx, mut out_rx) = mpsc::channel::<AgentMessage>(1024);
        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if let Err(e) = frame::write_frame(&mut wr, &msg, MAX_FRAME_LEN).await {
                    tracing::debug!(error = %e, "writing to the broker failed");
                    break;
                }
            }
        });
        *lock(&self.outbox) = Some(out_tx.clone());
        self.uplink.link_up(welcome.protocol_minor);
        if let Some(report) = self.uplink.on_connect() {
            let _ = out_tx.send(report).await;
        }
        for m in self.uplink.drain() {
            let _ = out_tx.send(m).await;
        }

        // Results the broker has not acknowledged yet (from before a restart or a cut).
        let journal = self.journal.clone();
        let unacked = tokio::task::spawn_blocking(move || lock(&journal).unacked_results())
            .await
            .map_err(|e| LinkError::Unexpected(e.to_string()))?;
        match unacked {
            Ok(results) => {
                for r in results {
                    let _ = out_tx.send(AgentMessage::Result(r)).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read unacknowledged results"),
        }

        let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
        let dead_after = interval * 3;
        let (in_tx, mut in_rx) = mpsc::channel::<Result<Option<BrokerMessage>, FrameError>>(16);
        let reader = tokio::spawn(read_loop(rd, in_tx));
        let mut heartbeat = tokio::time::interval(interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut last_frame = Instant::now();
        let mut renewal = Renewal::new(&identity);

        let end: Result<(), LinkError> = loop {
            let renew_in = renewal.due_in();
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
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
                    match renewal.start(&self.agent_id) {
                        Ok(csr_pem) => {
                            tracing::info!("renewing the agent certificate");
                            let _ = out_tx.send(AgentMessage::Renew { csr_pem }).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot make a renewal request"),
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
                        BrokerMessage::Deliver(cmd) => self.clone().on_deliver(cmd, out_tx.clone()).await,
                        BrokerMessage::ResultAck { id } => {
                            let journal = self.journal.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                if let Err(e) = lock(&journal).mark_acked(id) {
                                    tracing::error!(error = %e, "cannot record a result acknowledgement");
                                }
                            }).await;
                        }
                        BrokerMessage::HeartbeatAck { .. } => {}
                        BrokerMessage::Renewed { cert_pem } => {
                            if let Err(e) = renewal.finish(&self.state, cert_pem) {
                                tracing::error!(error = %e, "renewed certificate could not be stored; keeping the old one");
                            }
                        }
                        BrokerMessage::RenewFailed { message } => {
                            tracing::warn!(%message, "the broker refused to renew the certificate; retrying later");
                            renewal.failed();
                        }
                        BrokerMessage::Refused { code, message } => break Err(LinkError::Refused { code, message }),
                        other @ (BrokerMessage::Welcome(_) | BrokerMessage::Enrolled { .. }) => {
                            break Err(LinkError::Unexpected(format!("{other:?} in an established session")));
                        }
                    }
                }
            }
        };
        *lock(&self.outbox) = None;
        self.uplink.link_down();
        reader.abort();
        drop(out_tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        match end {
            Ok(()) => Ok(SessionEnd::AfterWelcome(started.elapsed())),
            Err(e) => {
                tracing::warn!(error = %e, after_ms = started.elapsed().as_millis() as u64, "session with the broker ended");
                Ok(SessionEnd::AfterWelcome(started.elapsed()))
            }
        }
    }

    /// Verifies a delivered command, journals it, and starts it — or says why not.
    async fn on_deliver(self: Arc<Self>, cmd: SignedCommand, out: mpsc::Sender<AgentMessage>) {
        let now = dbvm_protocol::now_ms();
        let journal = self.journal.clone();
        let verifier = self.verifier.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let peeked = cmd.peek_body().ok().map(|b| b.id);
            let verdict = verifier.verify_once(&cmd, now, &mut *lock(&journal));
            (verdict, peeked)
        })
        .await;
        let Ok((verdict, peeked)) = checked else {
            return;
        };
        match verdict {
            Ok(verified) => {
                let id = verified.body.id;
                tracing::info!(%id, operation = %verified.body.operation, key_id = %verified.key_id, "running command");
                tokio::spawn(self.clone().execute(verified, out));
            }
            Err(VerifyError::Replayed(id)) => self.on_duplicate(id, out).await,
            Err(e) => {
                tracing::warn!(code = e.code().as_str(), error = %e, "refused a command");
                if let Some(id) = peeked {
                    let _ = out
                        .send(AgentMessage::Result(CommandResult {
                            id,
                            outcome: Outcome::Rejected {
                                code: e.code(),
                                message: e.to_string(),
                            },
                            started_at_ms: now,
                            finished_at_ms: now,
                        }))
                        .await;
                }
            }
        }
    }

    /// A command id seen before: a redelivery gets its state again; it never runs twice.
    async fn on_duplicate(&self, id: Uuid, out: mpsc::Sender<AgentMessage>) {
        let journal = self.journal.clone();
        let entry = tokio::task::spawn_blocking(move || lock(&journal).entry(id)).await;
        let now = dbvm_protocol::now_ms();
        let reply = match entry {
            Ok(Ok(Some(Entry::Running))) => AgentMessage::Ack { id },
            Ok(Ok(Some(Entry::Finished {
                result,
                acked: false,
            }))) => AgentMessage::Result(result),
            _ => {
                tracing::warn!(%id, "replayed command refused: it was already received and answered");
                AgentMessage::Result(CommandResult {
                    id,
                    outcome: Outcome::Rejected {
                        code: RejectCode::Replayed,
                        message: VerifyError::Replayed(id).to_string(),
                    },
                    started_at_ms: now,
                    finished_at_ms: now,
                })
            }
        };
        let _ = out.send(reply).await;
    }

    async fn execute(self: Arc<Self>, verified: VerifiedCommand, out: mpsc::Sender<AgentMessage>) {
        let body = verified.body;
        let id = body.id;
        let started = dbvm_protocol::now_ms();
        let outcome = match self.dispatcher.get(&body.operation) {
            None => Outcome::Rejected {
                code: RejectCode::UnsupportedOperation,
                message: format!(
                    "this agent does not support operation {:?} (it supports: {})",
                    body.operation,
                    self.dispatcher.names().join(", ")
                ),
            },
            Some(op) => match serde_json::from_str::<serde_json::Value>(&body.args_json) {
                Err(e) => Outcome::Rejected {
                    code: RejectCode::BadArguments,
                    message: format!("arguments are not JSON: {e}"),
                },
                Ok(args) => {
                    let ctx = OpContext::new(
                        body.clone(),
                        self.sealing_key.clone(),
                        self.agent_id.to_string(),
                        self.progress_tx.clone(),
                    );
                    // A command still running after ACK_AFTER is acknowledged as
                    // running; a faster one is told by its result alone.
                    let run = op.run(ctx, args);
                    tokio::pin!(run);
                    let ran = tokio::select! {
                        biased;
                        r = &mut run => r,
                        _ = tokio::time::sleep(ACK_AFTER) => {
                            let _ = out.send(AgentMessage::Ack { id }).await;
                            run.await
                        }
                    };
                    match ran {
                        Ok(v) => {
                            let text = v.to_string();
                            if text.len() > MAX_OUTPUT_BYTES {
                                Outcome::Failed {
                                    message: format!(
                                        "output of {} bytes exceeds {MAX_OUTPUT_BYTES}",
                                        text.len()
                                    ),
                                }
                            } else {
                                Outcome::Succeeded { output_json: text }
                            }
                        }
                        Err(OpError::BadArguments(m)) => Outcome::Rejected {
                            code: RejectCode::BadArguments,
                            message: m,
                        },
                        Err(OpError::Failed(m)) => Outcome::Failed { message: m },
                    }
                }
            },
        };
        let result = CommandResult {
            id,
            outcome,
            started_at_ms: started,
            finished_at_ms: dbvm_protocol::now_ms(),
        };
        let journal = self.journal.clone();
        let r = result.clone();
        match tokio::task::spawn_blocking(move || lock(&journal).finish(&r)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(%id, error = %e, "cannot journal a result"),
            Err(e) => tracing::error!(%id, error = %e, "journal task failed"),
        }
        tracing::info!(%id, operation = %body.operation, ms = result.finished_at_ms - started, "command finished");
        // Sent now if connected; otherwise the journal re-sends it after the next Welcome.
        let tx = lock(&self.outbox).clone();
        if let Some(tx) = tx {
            let _ = tx.send(AgentMessage::Result(result)).await;
        }
    }
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

/// Certificate renewal state for one session.
struct Renewal {
    renew_at_ms: i64,
    not_after_ms: i64,
    pending_key: Option<String>,
}

impl Renewal {
    fn new(identity: &Identity) -> Self {
        Self {
            renew_at_ms: identity.renew_at_ms(),
            not_after_ms: identity.not_after_ms,
            pending_key: None,
        }
    }

    fn due_in(&self) -> Duration {
        let ms = self.renew_at_ms - dbvm_protocol::now_ms();
        Duration::from_millis(ms.max(0) as u64)
    }

    fn start(&mut self, agent: &AgentId) -> Result<String, String> {
        let (csr, key) = dbvm_protocol::pki::make_csr(agent).map_err(|e| e.to_string())?;
        self.pending_key = Some(key);
        // If no answer comes, ask again after a tenth of the remaining time (at least 1 s).
        let now = dbvm_protocol::now_ms();
        self.renew_at_ms = now + ((self.not_after_ms - now) / 10).max(1000);
        Ok(csr)
    }

    fn failed(&mut self) {
        self.pending_key = None;
    }

    fn finish(&mut self, state: &StateDir, cert_pem: String) -> Result<(), String> {
        let key = self
            .pending_key
            .take()
            .ok_or("a renewed certificate arrived without a pending request")?;
        let identity = Identity::new(cert_pem, key)?;
        // The new pair must belong together before it replaces the old one.
        if !dbvm_protocol::pki::cert_matches_key(&identity.cert_pem, &identity.key_pem) {
            return Err("renewed certificate is not for the key this agent asked for".into());
        }
        state.store_identity(&identity).map_err(|e| e.to_string())?;
        tracing::info!(
            not_after_ms = identity.not_after_ms,
            "agent certificate renewed; the next connection uses it"
        );
        self.renew_at_ms = identity.renew_at_ms();
        self.not_after_ms = identity.not_after_ms;
        Ok(())
    }
}
