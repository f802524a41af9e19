//! The session of a connected agent: one task, one `select!` loop that reads frames,
//! delivers commands within admission slots, stores acks, progress and results, and
//! keeps one timer for everything it waits on.

use super::handshake::kind;
use super::{refuse, send, Reader, Writer, WRITE_TIMEOUT};
use crate::enroll;
use crate::hub::{Close, Hub, SessionCommand};
use crate::metrics::Metrics;
use crate::revocation::LinkCert;
use crate::store::{AgentRecord, CommandRecord, Finish};
use dbvm_protocol::api::{CommandError, CommandState, OperationClass, Progress};
use dbvm_protocol::frame::{self, FrameBuf, FrameError};
use dbvm_protocol::health::HealthReport;
use dbvm_protocol::messages::{
    AgentMessage, BrokerMessage, CommandResult, Hello, Outcome, RefuseCode, Welcome,
};
use dbvm_protocol::{AgentId, SignedCommand, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

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

/// A state of a delivered command not written yet (see [`MARK_DELAY`]).
#[derive(Clone, Copy, Debug)]
struct Mark {
    state: CommandState,
    /// When it was handed to the agent, unless that is stored already.
    delivered_at_ms: Option<i64>,
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
    inflight: HashMap<Uuid, Inflight>,
    known: HashSet<Uuid>,
    cert_not_after_ms: Option<i64>,
    /// The client certificate this link was opened with (a renewal renews it).
    link: LinkCert,
    record: AgentRecord,
    generation: u64,
    /// Refused health reports so far: only the first few are logged above debug.
    health_refusals: u32,
    /// What the agent is told before the link closes, when the session ends for something
    /// it did (a bad frame) or is (a revoked certificate).
    refusal: Option<(RefuseCode, String)>,
    /// `delivered` / `running` not yet written: the latest state per command, and when
    /// each becomes due (see [`MARK_DELAY`]).
    marks: HashMap<Uuid, Mark>,
    mark_due: VecDeque<(Instant, Uuid)>,
}

/// A command with the agent: the class whose admission slot it holds, and its operation
/// (for the span of its result).
struct Inflight {
    class: OperationClass,
    operation: String,
}

/// What the handshake learned about a link that the session needs.
pub(super) struct Link {
    pub peer: SocketAddr,
    pub cert: LinkCert,
    /// When the agent was last revoked, as the handshake's check saw it.
    pub revoked_at_ms: Option<i64>,
}

/// When a link's certificate runs out (far away when it has no end).
fn cert_deadline(not_after_ms: Option<i64>) -> Instant {
    let left = not_after_ms
        .map_or(i64::MAX / 4, |na| na - dbvm_protocol::now_ms())
        .max(0) as u64;
    Instant::now() + Duration::from_millis(left)
}

pub(super) async fn session(
    hub: Arc<Hub>,
    agent: AgentId,
    hello: Hello,
    link: Link,
    mut rd: Reader,
    mut wr: Writer,
    shutdown: CancellationToken,
) {
    let cert_not_after = Some(link.cert.not_after_ms);
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
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<SessionCommand>(64);
    let registered = match hub.register(record.clone(), cmd_tx, link.peer, link.revoked_at_ms) {
        Ok(r) => r,
        Err(message) => {
            refuse(&mut wr, &hub, RefuseCode::CertificateRevoked, message).await;
            return;
        }
    };
    let (generation, last_seen, end) = (
        registered.generation,
        registered.last_seen_ms,
        registered.end,
    );
    let welcome = BrokerMessage::Welcome(Welcome {
        protocol_major: PROTOCOL_MAJOR,
        protocol_minor: PROTOCOL_MINOR,
        broker_version: dbvm_host::VERSION.to_string(),
        heartbeat_interval_ms: hub.settings.heartbeat_interval_ms,
    });
    if send(&mut wr, &welcome, max).await.is_err() {
        hub.unregister(agent.as_str(), generation);
        return;
    }
    tracing::info!(version = %hello.agent_version, "agent connected");
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
        link: link.cert,
        record,
        generation,
        health_refusals: 0,
        refusal: None,
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
    // The hub closes this session (replaced, revoked) through this, not the channel.
    let closed = end.closed();
    tokio::pin!(closed);
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
                // Oversized, empty, undecodable, or cut off inside a frame: the agent
                // broke the protocol and is told so (the peer may still read after
                // closing its side). Other read errors mean the peer is gone.
                Err(e @ (FrameError::TooLarge { .. } | FrameError::Empty | FrameError::Decode(_) | FrameError::Truncated)) => {
                    s.refuse(RefuseCode::ProtocolViolation, format!("bad frame: {e}"))
                }
                Err(e) => Err(e.to_string()),
            },
            c = cmd_rx.recv() => match c {
                Some(SessionCommand::Deliver(rec)) => {
                    s.enqueue(*rec);
                    s.deliver()
                }
                None => Err("hub dropped the session".into()),
            },
            why = &mut closed => match why {
                Close::Replaced { by } => Err(format!("replaced by a newer connection of the same agent from {by}")),
                Close::Revoked { message } => s.refuse(RefuseCode::CertificateRevoked, message),
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
    if let Some((code, _)) = &s.refusal {
        // Counted like a refusal at the first frame, under the same reason.
        let label = format!("{code:?}").to_lowercase();
        Metrics::count(&hub.metrics.link_errors, "reason", &label);
        tracing::warn!(%reason, "agent disconnected: refused");
    } else {
        tracing::info!(%reason, "agent disconnected");
    }
    if reason.contains("peer considered dead") {
        Metrics::count(&hub.metrics.link_errors, "reason", "dead_peer");
    }
    // Commands still with the agent keep their informational state.
    s.write_due_marks(true);
    for (_, f) in s.inflight.drain() {
        hub.admission.release(f.class);
    }
    hub.unregister(agent.as_str(), generation);
    let _ = hub
        .store
        .touch_agent(agent.as_str(), last_seen.load(Ordering::Relaxed))
        .await;
    // Acknowledgements still waiting go out if the link still takes them; if not, the
    // agent re-sends those results after it reconnects and they are acknowledged then.
    s.queue_acks();
    if let Some((code, message)) = s.refusal.take() {
        // Last: nothing follows a Refused.
        let _ = s.queue(&BrokerMessage::Refused { code, message });
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = s.flush().await;
        s.wr.shutdown().await
    })
    .await;
}

impl Session {
    /// Ends the session: the agent gets `Refused { code, message }` before the link
    /// closes (and the refusal is counted then).
    fn refuse(&mut self, code: RefuseCode, message: String) -> Result<(), String> {
        let reason = format!("{code:?}: {message}");
        self.refusal = Some((code, message));
        Err(reason)
    }

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
            if !self.hub.claim_delivery(rec.id) {
                // Cancelled by the control plane (POST /v1/commands/{id}/cancel).
                self.hub.admission.release(rec.class);
                self.known.remove(&rec.id);
                continue;
            }
            // Debug-level, like the other per-command spans: free at the default level (an
            // info span per command cost ~7 % of the broker's CPU per command in the
            // relay benchmark); events above debug name the command themselves.
            let span = tracing::debug_span!("deliver", id = %rec.id, operation = %rec.operation);
            let _in_span = span.enter();
            let signed = match SignedCommand::from_bytes(&rec.signed) {
                Ok(s) => s,
                Err(e) => {
                    self.hub.admission.release(rec.class);
                    tracing::error!(id = %rec.id, operation = %rec.operation, error = %e, "stored command does not decode");
                    continue;
                }
            };
            if let Err(e) = self.queue(&BrokerMessage::Deliver(signed)) {
                self.hub.admission.release(rec.class);
                return Err(format!("delivery failed: {e}"));
            }
            tracing::debug!(state = rec.state.as_str(), "handed to the agent");
            let inflight = Inflight {
                class: rec.class,
                operation: rec.operation,
            };
            self.inflight.insert(rec.id, inflight);
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
                let reply = match enroll::renew(&self.hub, &self.agent, &self.link, &csr_pem).await
                {
                    Ok(reply) => reply,
                    Err((code, message)) => return self.refuse(code, message),
                };
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
            other @ (AgentMessage::Hello(_) | AgentMessage::Enroll(_)) => self.refuse(
                RefuseCode::ProtocolViolation,
                format!("{} after the session started", kind(&other)),
            ),
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

    /// Stores a result inside a span carrying its command's id and operation.
    async fn result(&mut self, r: CommandResult) -> Result<(), String> {
        let span = tracing::debug_span!("result", id = %r.id, operation = tracing::field::Empty);
        if let Some(f) = self.inflight.get(&r.id) {
            span.record("operation", tracing::field::display(&f.operation));
        }
        self.store_result(r).instrument(span).await
    }

    async fn store_result(&mut self, r: CommandResult) -> Result<(), String> {
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
                tracing::debug!("result for a command already finished or unknown; acknowledged")
            }
            Ok(Some(rec)) => {
                let span = tracing::Span::current();
                if !self.inflight.contains_key(&r.id) {
                    // Delivered by an earlier session: the operation comes from the store.
                    span.record("operation", tracing::field::display(&rec.operation));
                }
                tracing::debug!(state = rec.state.as_str(), "result stored");
            }
            // Not acknowledged: the agent keeps the result and sends it again.
            Err(e) => return Err(format!("cannot store the result of {}: {e}", r.id)),
        }
        if let Some(f) = self.inflight.remove(&r.id) {
            self.hub.admission.release(f.class);
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
