//! The agent link: the mTLS listener agents dial into, one session per connected agent.
//!
//! A session delivers the agent's stored commands (respecting admission slots), records
//! acks, progress and results (a result is acknowledged only once it is durable), relays
//! events, renews the agent's certificate, and closes a connection that stays silent for
//! `missed_heartbeats` intervals.

use crate::enroll;
use crate::hub::{Hub, SessionCommand};
use crate::metrics::Metrics;
use crate::store::{AgentRecord, CommandRecord, Finish};
use dbvm_protocol::api::{CommandError, CommandState, OperationClass, Progress};
use dbvm_protocol::frame::{self, FrameBuf, FrameError};
use dbvm_protocol::health::HealthReport;
use dbvm_protocol::messages::{
    peek_hello_version, AgentMessage, BrokerMessage, CommandResult, Hello, Outcome, RefuseCode,
    Welcome,
};
use dbvm_protocol::pki::{identity_of, validity_ms_der, Identity};
use dbvm_protocol::{AgentId, SignedCommand, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// `delivered` and `running` are written only for commands still unfinished this long
/// after the event: most commands finish sooner, and their result write is then the only
/// write after the insert (two durable writes per command instead of four). Both states
/// are informational: the agent's journal absorbs a re-delivery after a broker restart.
const MARK_DELAY: Duration = Duration::from_millis(200);
/// A stored result is acknowledged with the next frame that goes to its agent, or after
/// this long: under load most acknowledgements ride along with the next delivery instead
/// of costing a write (and an agent wake-up) of their own. The agent keeps an
/// unacknowledged result in its journal and sends it again after a reconnect; the
/// broker acknowledges a result it already has without storing it twice.
const ACK_DELAY: Duration = Duration::from_millis(1000);
/// How often commands waiting for an admission slot are retried without a wake-up.
const BLOCKED_RETRY: Duration = Duration::from_millis(250);
/// A command this close to its expiry is marked `delivered` at once, so the expirer
/// (which expires only `queued` commands) can never expire a command the agent runs.
const MARK_NOW_BEFORE_EXPIRY_MS: i64 = 5_000;

type Reader = ReadHalf<TlsStream<TcpStream>>;
type Writer = WriteHalf<TlsStream<TcpStream>>;

/// A state of a delivered command not written yet (see [`MARK_DELAY`]).
#[derive(Clone, Copy, Debug)]
struct Mark {
    state: CommandState,
    /// When it was handed to the agent, unless that is stored already.
    delivered_at_ms: Option<i64>,
}

/// Accepts agent connections until `shutdown`. Per-connection errors stay per connection.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "agent listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        Metrics::count(&hub.metrics.link_errors, "reason", "tls_handshake");
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        Metrics::count(&hub.metrics.link_errors, "reason", "tls_handshake_timeout");
                        return;
                    }
                };
                connection(tls, hub, shutdown).await;
            }
            .instrument(tracing::debug_span!("agent_conn", %peer)),
        );
    }
}

async fn send(wr: &mut Writer, msg: &BrokerMessage, max: usize) -> Result<(), FrameError> {
    match tokio::time::timeout(WRITE_TIMEOUT, frame::write_frame(wr, msg, max)).await {
        Ok(r) => r,
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "agent did not read its frames for 10 s",
        ))),
    }
}

async fn refuse(wr: &mut Writer, hub: &Hub, code: RefuseCode, message: String) {
    let reason = format!("{code:?}").to_lowercase();
    Metrics::count(&hub.metrics.link_errors, "reason", &reason);
    tracing::info!(code = ?code, %message, "refusing agent connection");
    let _ = send(
        wr,
        &BrokerMessage::Refused { code, message },
        frame::MAX_FRAME_LEN,
    )
    .await;
    let _ = wr.shutdown().await;
}

async fn connection(tls: TlsStream<TcpStream>, hub: Arc<Hub>, shutdown: CancellationToken) {
    let peer_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let max = hub.settings.max_frame_bytes;
    let (mut rd, mut wr) = tokio::io::split(tls);

    let payload =
        match tokio::time::timeout(FIRST_FRAME_TIMEOUT, frame::read_payload(&mut rd, max)).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                refuse(
                    &mut wr,
                    &hub,
                    RefuseCode::ProtocolViolation,
                    format!("first frame refused: {e}"),
                )
                .await;
                return;
            }
            Err(_) => {
                refuse(
                    &mut wr,
                    &hub,
                    RefuseCode::ProtocolViolation,
                    "no Hello within 10 s".into(),
                )
                .await;
                return;
            }
        };
    if let Some((major, minor)) = peek_hello_version(&payload) {
        if major != PROTOCOL_MAJOR {
            let msg = format!(
                "agent speaks protocol {major}.{minor}; this broker speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}: upgrade the older side"
            );
            refuse(&mut wr, &hub, RefuseCode::UnsupportedVersion, msg).await;
            return;
        }
    }
    let first: AgentMessage = match frame::decode(&payload) {
        Ok(m) => m,
        Err(e) => {
            refuse(
                &mut wr,
                &hub,
                RefuseCode::ProtocolViolation,
                format!("first frame refused: {e}"),
            )
            .await;
            return;
        }
    };
    match first {
        AgentMessage::Enroll(req) => match enroll::enroll(&hub, req).await {
            Ok(reply) => {
                let _ = send(&mut wr, &reply, frame::MAX_FRAME_LEN).await;
                let _ = wr.shutdown().await;
            }
            Err((code, message)) => refuse(&mut wr, &hub, code, message).await,
        },
        AgentMessage::Hello(hello) => {
            let Some(der) = peer_cert else {
                let msg = "no client certificate: this agent must enroll first".to_string();
                refuse(&mut wr, &hub, RefuseCode::CertificateRequired, msg).await;
                return;
            };
            let agent = match identity_of(&der) {
                Ok(Identity::Agent(id)) => id,
                Ok(Identity::ControlPlane(name)) => {
                    let msg = format!("certificate is for control plane {name:?}, not an agent");
                    refuse(&mut wr, &hub, RefuseCode::IdentityMismatch, msg).await;
                    return;
                }
                Err(e) => {
                    refuse(&mut wr, &hub, RefuseCode::IdentityMismatch, e.to_string()).await;
                    return;
                }
            };
            if hello.agent_id != agent.as_str() {
                let msg = format!(
                    "Hello claims agent {:?} but the client certificate is for agent {:?}",
                    hello.agent_id,
                    agent.as_str()
                );
                refuse(&mut wr, &hub, RefuseCode::IdentityMismatch, msg).await;
                return;
            }
            let not_after = validity_ms_der(&der).ok().map(|(_, na)| na);
            let span = tracing::info_span!("agent", agent = %agent);
            session(hub, agent, hello, not_after, rd, wr, shutdown)
                .instrument(span)
                .await;
        }
        other => {
            let msg = format!("first frame must be Hello or Enroll, got {}", kind(&other));
            refuse(&mut wr, &hub, RefuseCode::ProtocolViolation, msg).await;
        }
    }
}

fn kind(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Hello(_) => "Hello",
        AgentMessage::Enroll(_) => "Enroll",
        AgentMessage::Heartbeat { .. } => "Heartbeat",
        AgentMessage::Ack { .. } => "Ack",
        AgentMessage::Progress { .. } => "Progress",
        AgentMessage::Result(_) => "Result",
        AgentMessage::Event(_) => "Event",
        AgentMessage::Renew { .. } => "Renew",
        AgentMessage::Health(_) => "Health",
    }
}

struct Session {
    hub: Arc<Hub>,
    agent: AgentId,
    wr: Writer,
    max: usize,
    /// Frames to write at the end of this turn of the session loop: whatever one turn
    /// queues goes out in one write (one TLS record, one syscall).
    out: Vec<u8>,
    /// Results stored durably but not yet acknowledged, and when the acknowledgement is
    /// due at the latest (see [`ACK_DELAY`]).
    acks: Vec<Uuid>,
    ack_due: Option<Instant>,
    /// Commands to deliver, oldest first.
    pending: VecDeque<CommandRecord>,
    /// Commands waiting for an admission slot.
    blocked: VecDeque<CommandRecord>,
    /// Delivered commands and the class whose slot they hold.
    inflight: HashMap<Uuid, OperationClass>,
    known: HashSet<Uuid>,
    cert_not_after_ms: Option<i64>,
    record: AgentRecord,
    generation: u64,
    /// Refused health reports so far: only the first few are logged above debug.
    health_refusals: u32,
    /// `delivered` / `running` not yet written: the latest state per command, and when
    /// each becomes due (see [`MARK_DELAY`]).
    marks: HashMap<Uuid, Mark>,
    mark_due: VecDeque<(Instant, Uuid)>,
}

/// When a link's certificate runs out (far away when it has no end).
fn cert_deadline(not_after_ms: Option<i64>) -> Instant {
    let left = not_after_ms
        .map_or(i64::MAX / 4, |na| na - dbvm_protocol::now_ms())
        .max(0) as u64;
    Instant::now() + Duration::from_millis(left)
}

async fn session(
    hub: Arc<Hub>,
    agent: AgentId,
    hello: Hello,
    cert_not_after: Option<i64>,
    mut rd: Reader,
    mut wr: Writer,
    shutdown: CancellationToken,
) {
    let max = hub.settings.max_frame_bytes;
    let record = AgentRecord {
        id: agent.to_string(),
        last_seen_ms: Some(dbvm_protocol::now_ms()),
        agent_version: Some(hello.agent_version.clone()),
        protocol: Some(format!("{}.{}", hello.protocol_major, hello.protocol_minor)),
        operations: hello.operations.clone(),
        capabilities: hello.capabilities.clone(),
        sealing_key: Some(dbvm_protocol::seal::public_key_base64(&hello.sealing_key)),
        db_kind: hello.db_kind.clone(),
        cert_not_after_ms: cert_not_after,
    };
    if let Err(e) = hub.store.upsert_agent(record.clone()).await {
        refuse(
            &mut wr,
            &hub,
            RefuseCode::Internal,
            format!("broker store unavailable: {e}"),
        )
        .await;
        return;
    }
    let welcome = BrokerMessage::Welcome(Welcome {
        protocol_major: PROTOCOL_MAJOR,
        protocol_minor: PROTOCOL_MINOR,
        broker_version: env!("CARGO_PKG_VERSION").to_string(),
        heartbeat_interval_ms: hub.settings.heartbeat_interval_ms,
    });
    if send(&mut wr, &welcome, max).await.is_err() {
        return;
    }
    tracing::info!(version = %hello.agent_version, "agent connected");

    let (cmd_tx, mut cmd_rx) = mpsc::channel::<SessionCommand>(64);
    let (generation, last_seen) = hub.register(record.clone(), cmd_tx);
    let dead_after = Duration::from_millis(
        u64::from(hub.settings.heartbeat_interval_ms) * u64::from(hub.settings.missed_heartbeats),
    );

    let mut s = Session {
        hub: hub.clone(),
        agent: agent.clone(),
        wr,
        max,
        out: Vec::new(),
        acks: Vec::new(),
        ack_due: None,
        pending: VecDeque::new(),
        blocked: VecDeque::new(),
        inflight: HashMap::new(),
        known: HashSet::new(),
        cert_not_after_ms: cert_not_after,
        record,
        generation,
        health_refusals: 0,
        marks: HashMap::new(),
        mark_due: VecDeque::new(),
    };
    let mut result = match hub.store.unfinished_for_agent(agent.as_str()).await {
        Ok(recs) => {
            for rec in recs {
                s.enqueue(rec);
            }
            s.deliver()
        }
        Err(e) => Err(format!("cannot load queued commands: {e}")),
    };
    let mut last_persisted = dbvm_protocol::now_ms();
    // Frames are read here, not by a task of their own: `FrameBuf::next` is cancel-safe.
    let mut frames = FrameBuf::new();
    let mut last_frame = Instant::now();
    // The dead-peer deadline moves with every frame; it is only re-read when it passes.
    let mut dead_check = last_frame + dead_after;
    // A link lives no longer than its certificate unless the agent renews in band.
    let mut cert_for = s.cert_not_after_ms;
    let mut cert_end = cert_deadline(cert_for);
    let mut blocked_retry: Option<Instant> = None;
    // One timer for everything the session waits on (dead peer, certificate, marks,
    // acknowledgements, blocked commands), reset only when its deadline moves.
    let timer = tokio::time::sleep_until(dead_check);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = Some(dead_check);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);

    while result.is_ok() {
        if let Err(e) = s.flush().await {
            result = Err(e);
            break;
        }
        if s.cert_not_after_ms != cert_for {
            cert_for = s.cert_not_after_ms;
            cert_end = cert_deadline(cert_for);
        }
        let blocked = !s.blocked.is_empty();
        if !blocked {
            blocked_retry = None;
        }
        let mut next = dead_check.min(cert_end);
        if let Some(t) = s.next_mark_due() {
            next = next.min(t);
        }
        if let Some(t) = s.ack_due {
            next = next.min(t);
        }
        if blocked {
            next = next.min(*blocked_retry.get_or_insert_with(|| Instant::now() + BLOCKED_RETRY));
        }
        if armed != Some(next) {
            timer.as_mut().reset(next);
            armed = Some(next);
        }
        result = tokio::select! {
            _ = &mut cancelled => Err("broker shutting down".into()),
            m = frames.next::<AgentMessage, _>(&mut rd, max) => match m {
                Ok(Some(m)) => {
                    last_frame = Instant::now();
                    let now = dbvm_protocol::now_ms();
                    last_seen.store(now, Ordering::Relaxed);
                    if now - last_persisted > 60_000 {
                        last_persisted = now;
                        let store = hub.store.clone();
                        let id = agent.to_string();
                        tokio::spawn(async move { let _ = store.touch_agent(&id, now).await; });
                    }
                    s.handle(m).await
                }
                Ok(None) => Err("agent closed the connection".into()),
                Err(e) => Err(e.to_string()),
            },
            c = cmd_rx.recv() => match c {
                Some(SessionCommand::Deliver(rec)) => {
                    s.enqueue(*rec);
                    s.deliver()
                }
                Some(SessionCommand::Replaced) => Err("replaced by a newer connection of the same agent".into()),
                None => Err("hub dropped the session".into()),
            },
            _ = hub.admission.freed.notified(), if blocked => s.unblock(),
            _ = &mut timer => {
                armed = None;
                let now = Instant::now();
                if now >= cert_end {
                    Err("the agent certificate expired and was not renewed".into())
                } else if now >= dead_check && now.duration_since(last_frame) >= dead_after {
                    Err(format!("no frame for {} ms: peer considered dead", dead_after.as_millis()))
                } else {
                    dead_check = last_frame + dead_after;
                    s.write_due_marks(false);
                    if s.ack_due.is_some_and(|t| t <= now) {
                        s.queue_acks();
                    }
                    if blocked_retry.is_some_and(|t| t <= now) {
                        blocked_retry = None;
                        s.unblock()
                    } else {
                        Ok(())
                    }
                }
            }
        };
    }
    let reason = result.err().unwrap_or_default();
    tracing::info!(%reason, "agent disconnected");
    if reason.contains("peer considered dead") {
        Metrics::count(&hub.metrics.link_errors, "reason", "dead_peer");
    } else if reason.contains("frame") {
        Metrics::count(&hub.metrics.link_errors, "reason", "bad_frame");
    }
    // Commands still with the agent keep their informational state.
    s.write_due_marks(true);
    for (_, class) in s.inflight.drain() {
        hub.admission.release(class);
    }
    hub.unregister(agent.as_str(), generation);
    let _ = hub
        .store
        .touch_agent(agent.as_str(), last_seen.load(Ordering::Relaxed))
        .await;
    // Acknowledgements still waiting go out if the link still takes them; if not, the
    // agent re-sends those results after it reconnects and they are acknowledged then.
    s.queue_acks();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = s.flush().await;
        s.wr.shutdown().await
    })
    .await;
}

impl Session {
    /// Queues a frame for the end of this turn.
    fn queue(&mut self, msg: &BrokerMessage) -> Result<(), String> {
        frame::encode_into(msg, self.max, &mut self.out)
            .map_err(|e| format!("cannot encode a frame for the agent: {e}"))
    }

    /// Writes what this turn queued (with any acknowledgements waiting) in one write.
    async fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        // Acknowledgements ride along with anything else that goes out.
        self.queue_acks();
        let wr = &mut self.wr;
        let out = &self.out;
        let written = tokio::time::timeout(WRITE_TIMEOUT, async move {
            wr.write_all(out).await?;
            wr.flush().await
        })
        .await;
        self.out.clear();
        if self.out.capacity() > 64 * 1024 {
            // A large frame (a big command) went out; do not keep its buffer per agent.
            self.out = Vec::new();
        }
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("writing to the agent failed: {e}")),
            Err(_) => Err("agent did not read its frames for 10 s".into()),
        }
    }

    /// Moves the waiting acknowledgements to the front of this turn's frames (a result
    /// is acknowledged before the delivery its finished slot let through).
    fn queue_acks(&mut self) {
        self.ack_due = None;
        if self.acks.is_empty() {
            return;
        }
        let mut acks = Vec::with_capacity(24 * self.acks.len());
        for id in self.acks.drain(..) {
            // A ResultAck is a few bytes: it always encodes.
            let _ = frame::encode_into(&BrokerMessage::ResultAck { id }, self.max, &mut acks);
        }
        self.out.splice(0..0, acks);
    }

    /// Records an informational state, written after [`MARK_DELAY`] if the command is
    /// still unfinished then (at once with `now`); a finished command's delivery time
    /// goes with its result instead.
    fn mark(&mut self, id: Uuid, state: CommandState, now: bool) {
        let delivered_now = (state == CommandState::Delivered).then(dbvm_protocol::now_ms);
        let fresh = match self.marks.get_mut(&id) {
            Some(m) => {
                // `running` replacing a `delivered` not yet written keeps its time.
                m.state = state;
                m.delivered_at_ms = delivered_now.or(m.delivered_at_ms);
                false
            }
            None => {
                let m = Mark {
                    state,
                    delivered_at_ms: delivered_now,
                };
                self.marks.insert(id, m);
                true
            }
        };
        if now {
            self.write_mark(id);
        } else if fresh {
            self.mark_due.push_back((Instant::now() + MARK_DELAY, id));
        }
    }

    /// When the oldest mark still wanted is due (marks of finished commands are dropped).
    fn next_mark_due(&mut self) -> Option<Instant> {
        while let Some(&(due, id)) = self.mark_due.front() {
            if self.marks.contains_key(&id) {
                return Some(due);
            }
            self.mark_due.pop_front();
        }
        None
    }

    fn write_mark(&mut self, id: Uuid) {
        let Some(Mark {
            state,
            delivered_at_ms,
        }) = self.marks.remove(&id)
        else {
            return;
        };
        let from: &'static [CommandState] = if state == CommandState::Running {
            &[CommandState::Queued, CommandState::Delivered]
        } else {
            &[CommandState::Queued]
        };
        let store = self.hub.store.clone();
        // Not awaited: informational (see MARK_DELAY).
        tokio::spawn(async move {
            let _ = store.transition(id, from, state, delivered_at_ms).await;
        });
    }

    /// Writes the marks that are due (all of them with `all`).
    fn write_due_marks(&mut self, all: bool) {
        let now = Instant::now();
        while let Some(&(due, id)) = self.mark_due.front() {
            if !all && due > now {
                break;
            }
            self.mark_due.pop_front();
            self.write_mark(id);
        }
    }

    fn enqueue(&mut self, rec: CommandRecord) {
        if self.known.insert(rec.id) {
            self.pending.push_back(rec);
        }
    }

    fn unblock(&mut self) -> Result<(), String> {
        while let Some(rec) = self.blocked.pop_back() {
            self.pending.push_front(rec);
        }
        self.deliver()
    }

    /// Queues every pending command that gets an admission slot.
    fn deliver(&mut self) -> Result<(), String> {
        let now = dbvm_protocol::now_ms();
        while let Some(rec) = self.pending.pop_front() {
            if rec.state == CommandState::Queued
                && dbvm_protocol::command::TimeWindow::DEFAULT.is_expired(rec.not_after_ms, now)
            {
                // The expirer marks it expired; never hand out a command past its time.
                self.known.remove(&rec.id);
                continue;
            }
            if !self.hub.admission.try_acquire(rec.class) {
                self.blocked.push_back(rec);
                continue;
            }
            let signed = match SignedCommand::from_bytes(&rec.signed) {
                Ok(s) => s,
                Err(e) => {
                    self.hub.admission.release(rec.class);
                    tracing::error!(id = %rec.id, error = %e, "stored command does not decode");
                    continue;
                }
            };
            if let Err(e) = self.queue(&BrokerMessage::Deliver(signed)) {
                self.hub.admission.release(rec.class);
                return Err(format!("delivery failed: {e}"));
            }
            self.inflight.insert(rec.id, rec.class);
            if rec.state == CommandState::Queued {
                self.mark(
                    rec.id,
                    CommandState::Delivered,
                    rec.not_after_ms - now < MARK_NOW_BEFORE_EXPIRY_MS,
                );
            }
        }
        Ok(())
    }

    async fn handle(&mut self, m: AgentMessage) -> Result<(), String> {
        match m {
            AgentMessage::Heartbeat { seq } => self.queue(&BrokerMessage::HeartbeatAck { seq }),
            AgentMessage::Ack { id } => {
                if self.inflight.contains_key(&id) {
                    self.mark(id, CommandState::Running, false);
                }
                self.hub.publish(
                    "command.state",
                    self.agent.as_str(),
                    Some(id),
                    || serde_json::json!({ "state": "running" }),
                );
                Ok(())
            }
            AgentMessage::Progress {
                id,
                percent,
                message,
            } => {
                let store = self.hub.store.clone();
                let progress = Progress {
                    percent: percent.min(100),
                    message: message.clone(),
                };
                tokio::spawn(async move {
                    let _ = store.progress(id, progress).await;
                });
                self.hub.publish(
                    "command.progress",
                    self.agent.as_str(),
                    Some(id),
                    || serde_json::json!({ "percent": percent, "message": message }),
                );
                Ok(())
            }
            AgentMessage::Result(result) => self.result(result).await,
            AgentMessage::Event(e) => {
                self.hub
                    .publish("agent.event", self.agent.as_str(), None, || {
                        let payload: serde_json::Value = serde_json::from_str(&e.payload_json)
                            .unwrap_or(serde_json::Value::String(e.payload_json.clone()));
                        serde_json::json!({ "kind": e.kind, "at_ms": e.at_ms, "payload": payload })
                    });
                Ok(())
            }
            AgentMessage::Health(report) => {
                self.health(report);
                Ok(())
            }
            AgentMessage::Renew { csr_pem } => {
                let reply = enroll::renew(&self.hub, &self.agent, &csr_pem);
                if let BrokerMessage::Renewed { cert_pem } = &reply {
                    self.cert_not_after_ms = dbvm_protocol::pki::validity_ms(cert_pem)
                        .ok()
                        .map(|(_, na)| na);
                    self.record.cert_not_after_ms = self.cert_not_after_ms;
                    self.hub.update_record(self.record.clone(), self.generation);
                    let store = self.hub.store.clone();
                    let record = self.record.clone();
                    tokio::spawn(async move {
                        let _ = store.upsert_agent(record).await;
                    });
                }
                self.queue(&reply)
            }
            other @ (AgentMessage::Hello(_) | AgentMessage::Enroll(_)) => {
                Metrics::count(
                    &self.hub.metrics.link_errors,
                    "reason",
                    "protocol_violation",
                );
                Err(format!(
                    "protocol violation: {} after the session started",
                    kind(&other)
                ))
            }
        }
    }

    /// Keeps a health report as the agent's latest, unless it is refused (another
    /// agent's id, too many checks, bad check ids): a refused report is counted and
    /// logged, and the link stays up, since commands should not suffer from a faulty
    /// health check.
    fn health(&mut self, report: HealthReport) {
        let metrics = &self.hub.metrics;
        match crate::health::sanitize(report, self.agent.as_str()) {
            Ok(report) => {
                let worst = report.worst();
                let checks = report.checks.len();
                let before = self
                    .hub
                    .health
                    .store(report, dbvm_protocol::now_ms(), metrics);
                Metrics::count(&metrics.health_reports, "result", "stored");
                if before != Some(worst) {
                    tracing::info!(%worst, before = ?before.map(|b| b.as_str()), checks, "agent health changed");
                } else {
                    tracing::debug!(%worst, checks, "health report");
                }
            }
            Err(e) => {
                Metrics::count(&metrics.health_reports, "result", e.reason());
                self.health_refusals = self.health_refusals.saturating_add(1);
                if self.health_refusals <= 3 {
                    tracing::warn!(error = %e, "health report refused");
                } else {
                    tracing::debug!(error = %e, "health report refused");
                }
            }
        }
    }

    async fn result(&mut self, r: CommandResult) -> Result<(), String> {
        let (state, output_json, error) = match r.outcome {
            Outcome::Succeeded { output_json } => {
                (CommandState::Succeeded, Some(output_json), None)
            }
            Outcome::Failed { message } => (
                CommandState::Failed,
                None,
                Some(CommandError {
                    code: "failed".into(),
                    message,
                }),
            ),
            Outcome::Rejected { code, message } => (
                CommandState::Rejected,
                None,
                Some(CommandError {
                    code: code.as_str().into(),
                    message,
                }),
            ),
            Outcome::Interrupted { message } => (
                CommandState::Interrupted,
                None,
                Some(CommandError {
                    code: "interrupted".into(),
                    message,
                }),
            ),
        };
        let finish = Finish {
            state,
            finished_at_ms: r.finished_at_ms,
            delivered_at_ms: self.marks.get(&r.id).and_then(|m| m.delivered_at_ms),
            output_json,
            error,
        };
        match self.hub.finish(self.agent.as_str(), r.id, finish).await {
            Ok(None) => {
                tracing::debug!(id = %r.id, "result for a command already finished or unknown; acknowledged")
            }
            Ok(Some(_)) => {}
            // Not acknowledged: the agent keeps the result and sends it again.
            Err(e) => return Err(format!("cannot store the result of {}: {e}", r.id)),
        }
        if let Some(class) = self.inflight.remove(&r.id) {
            self.hub.admission.release(class);
        }
        // Finished: its `delivered` / `running` need never be written.
        self.marks.remove(&r.id);
        self.known.remove(&r.id);
        // Acknowledged with the next frame that goes to this agent, or after ACK_DELAY.
        self.acks.push(r.id);
        self.ack_due
            .get_or_insert_with(|| Instant::now() + ACK_DELAY);
        Ok(())
    }
}
