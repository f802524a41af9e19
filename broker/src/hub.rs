//! The broker's live state beside its store: connected agents, admission slots, waiters
//! for command completion, and the event stream. The API and the agent link both act
//! through the [`Hub`].

use crate::config::{AgentSettings, EventSettings, Limits};
use crate::health::HealthBook;
use crate::metrics::Metrics;
use crate::revocation::Revocations;
use crate::store::AgentRevocation;
use crate::store::{AgentRecord, CommandRecord, Finish, Store, StoreError};
use dbvm_protocol::api::Revocation;
use dbvm_protocol::api::{
    AgentHealthSummary, AgentView, CommandError, CommandState, Event, FleetHealth, OperationClass,
};
use dbvm_protocol::command::TimeWindow;
use dbvm_protocol::pki::FleetCa;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What the hub tells an agent's session.
#[derive(Debug)]
pub enum SessionCommand {
    /// A new command for this agent was stored; deliver it.
    Deliver(Box<CommandRecord>),
}

/// Why the hub closes a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Close {
    /// Another connection of the same agent took over.
    Replaced { by: SocketAddr },
    /// The agent's certificates were revoked: the session is refused with this message.
    Revoked { message: String },
}

/// How the hub closes a session: a token the session loop waits on, and why (set
/// before the token is cancelled). Unlike a message on the session's channel, it
/// cannot be lost to a full queue.
#[derive(Debug, Default)]
pub struct SessionEnd {
    token: CancellationToken,
    why: OnceLock<Close>,
}

impl SessionEnd {
    pub fn close(&self, why: Close) {
        let _ = self.why.set(why);
        self.token.cancel();
    }

    /// Resolves when the hub closed the session; says why.
    pub async fn closed(&self) -> Close {
        self.token.cancelled().await;
        self.why.get().cloned().unwrap_or(Close::Revoked {
            message: "closed by the broker".into(),
        })
    }
}

/// Replacements of one agent's session counted within this window ...
pub const FLAP_WINDOW_MS: i64 = 5 * 60 * 1000;
/// ... make it flapping from this many on: one is a reconnect the broker had not yet
/// noticed was needed; several in minutes are two holders of one identity taking turns
/// (a stolen certificate: revoke it, `dbvmctl agents revoke`).
pub const FLAP_THRESHOLD: usize = 3;

pub struct ConnectedAgent {
    pub generation: u64,
    pub tx: mpsc::Sender<SessionCommand>,
    pub record: AgentRecord,
    pub last_seen_ms: Arc<AtomicI64>,
    /// Where the session's connection comes from.
    pub peer: SocketAddr,
    pub end: Arc<SessionEnd>,
    /// When this agent's sessions were replaced within [`FLAP_WINDOW_MS`], oldest first
    /// (carried from each session to the one that replaces it; at most
    /// [`FLAP_THRESHOLD`] × 4 kept).
    replaced_at_ms: VecDeque<i64>,
    /// When `agent.flapping` was last published for it.
    flapping_announced_ms: Option<i64>,
}

/// What [`Hub::register`] hands a new session.
pub struct Registered {
    pub generation: u64,
    pub last_seen_ms: Arc<AtomicI64>,
    pub end: Arc<SessionEnd>,
}

/// Admission limits by class: a slot is held while a command is with a connected agent.
pub struct Admission {
    limits: HashMap<OperationClass, u32>,
    running: HashMap<OperationClass, AtomicU32>,
    deployments_outstanding: AtomicU32,
    deployments_max_outstanding: u32,
    pub freed: Notify,
}

impl Admission {
    pub fn new(l: &Limits) -> Self {
        let limits = HashMap::from([
            (OperationClass::Deployment, l.deployments_running),
            (OperationClass::Management, l.management_running),
            (OperationClass::Backup, l.backups_running),
            (OperationClass::LogUpload, l.log_uploads_running),
        ]);
        let running = OperationClass::ALL
            .into_iter()
            .map(|c| (c, AtomicU32::new(0)))
            .collect();
        Self {
            limits,
            running,
            deployments_outstanding: AtomicU32::new(0),
            deployments_max_outstanding: l.deployments_running + l.deployments_waiting,
            freed: Notify::new(),
        }
    }

    /// Takes a slot for `class`; query operations always get one.
    pub fn try_acquire(&self, class: OperationClass) -> bool {
        let Some(limit) = self.limits.get(&class) else {
            return true;
        };
        let counter = &self.running[&class];
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < *limit).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn release(&self, class: OperationClass) {
        if self.limits.contains_key(&class) {
            let _ = self.running[&class]
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            self.freed.notify_waiters();
        }
    }

    pub fn running(&self, class: OperationClass) -> u32 {
        self.running[&class].load(Ordering::Acquire)
    }

    /// Reserves room for a new deployment (running + waiting). False: refuse it.
    fn admit_deployment(&self) -> bool {
        let max = self.deployments_max_outstanding;
        self.deployments_outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn deployment_done(&self) {
        let _ =
            self.deployments_outstanding
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error(
        "busy: {running} database deployments are running and {waiting} are waiting (limit {limit_running} running + {limit_waiting} waiting); retry when one finishes"
    )]
    Busy {
        running: u32,
        waiting: u32,
        limit_running: u32,
        limit_waiting: u32,
    },
}

pub struct Hub {
    pub store: Arc<dyn Store>,
    pub ca: FleetCa,
    pub settings: AgentSettings,
    pub limits: Limits,
    pub admission: Admission,
    pub metrics: Metrics,
    /// The latest health report of each agent (memory only; see [`crate::health`]).
    pub health: HealthBook,
    /// Revoked certificates, checked at every Hello (see [`crate::revocation`]).
    pub revocations: Revocations,
    /// Refused first frames are caused by peers (a revoked certificate's holder can cause
    /// one per handshake): their log lines are rate-limited like failed handshakes; the
    /// metric counts every one.
    pub(crate) refusal_log: crate::listener::LogLimit,
    agents: Mutex<HashMap<String, ConnectedAgent>>,
    generation: AtomicU64,
    /// Events after they are in the durable log (ids set): live subscribers.
    events: broadcast::Sender<Event>,
    /// Events on their way to the log (see `event_log_loop`).
    event_log: mpsc::UnboundedSender<Event>,
    /// Who got a command first: its delivery or its cancellation (see [`Hub::cancel`]).
    claims: Mutex<Claims>,
    /// Callers waiting for a command to finish; woken with the finished record, so the
    /// answer to `?wait_ms` needs no read of the store.
    waiters: Mutex<HashMap<Uuid, Vec<oneshot::Sender<Arc<CommandRecord>>>>>,
}

/// The answer to [`Hub::cancel`].
#[derive(Debug)]
pub enum Cancel {
    Cancelled(CommandRecord),
    /// Not queued any more: the command as it stands.
    TooLate(CommandRecord),
    Unknown,
}

/// Commands handed to an agent and not finished, and those cancelled (with their
/// `not_after_ms`): whichever a command is in first wins it.
#[derive(Debug, Default)]
struct Claims {
    handed: std::collections::HashSet<Uuid>,
    cancelled: HashMap<Uuid, i64>,
}

/// Most events written to the log in one store write.
const EVENT_BATCH: usize = 1024;
/// How often old events are pruned.
const EVENT_PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Most events deleted in one store write.
const EVENT_PRUNE_ROWS: u64 = 2_000;

/// Writes published events to the durable log in batches (one store write each, in the
/// store's group commit), then hands them to live subscribers with their ids. One task,
/// so ids and the order subscribers see are the same. Prunes by `settings` once a minute.
/// Ends when the hub is dropped.
async fn event_log_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    live: broadcast::Sender<Event>,
    settings: EventSettings,
) {
    // The first prune ran before the broker served (Hub::new).
    let mut prune = tokio::time::interval_at(
        tokio::time::Instant::now() + EVENT_PRUNE_INTERVAL,
        EVENT_PRUNE_INTERVAL,
    );
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(EVENT_BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, EVENT_BATCH) => {
                if n == 0 {
                    return;
                }
                match store.append_events(std::mem::take(&mut batch)).await {
                    Ok(written) => {
                        for e in written {
                            let _ = live.send(e);
                        }
                    }
                    // Only a failing store gets here, and then commands fail too.
                    Err(e) => tracing::error!(error = %e, events = n, "events could not be logged and are lost"),
                }
            }
            _ = prune.tick() => prune_events(&*store, &settings).await,
        }
    }
}

/// Drops events beyond `settings` (in writes of EVENT_PRUNE_ROWS, so commands
/// committing meanwhile never wait behind one large delete). A failure is logged and
/// left for the next round.
async fn prune_events(store: &dyn Store, settings: &EventSettings) {
    let max_age_ms = i64::try_from(settings.max_age_hours * 3_600_000).unwrap_or(i64::MAX);
    let before = dbvm_protocol::now_ms().saturating_sub(max_age_ms);
    let mut pruned = 0;
    loop {
        match store
            .prune_events(settings.keep, before, EVENT_PRUNE_ROWS)
            .await
        {
            Ok(n) => {
                pruned += n;
                if n < EVENT_PRUNE_ROWS {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "old events could not be pruned; retrying in a minute");
                break;
            }
        }
    }
    if pruned > 0 {
        tracing::debug!(events = pruned, "old events pruned");
    }
}

impl Hub {
    pub async fn new(
        store: Arc<dyn Store>,
        ca: FleetCa,
        settings: AgentSettings,
        limits: Limits,
        event_settings: EventSettings,
    ) -> Result<Arc<Self>, StoreError> {
        let admission = Admission::new(&limits);
        // Deployments accepted before a restart still count against the waiting room.
        for (_, class) in store.unfinished().await? {
            if class == OperationClass::Deployment {
                admission
                    .deployments_outstanding
                    .fetch_add(1, Ordering::AcqRel);
            }
        }
        let revocations = Revocations::new(store.revocations(dbvm_protocol::now_ms()).await?);
        let metrics = Metrics::new();
        match dbvm_protocol::pki::validity_ms(ca.cert_pem()) {
            Ok((_, not_after_ms)) => {
                metrics.ca_cert_expiry.set(not_after_ms / 1000);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the fleet CA certificate's expiry"),
        }
        // Before anything is served, so a client resuming from an old id is told what a
        // smaller `keep` dropped rather than racing the first prune.
        prune_events(&*store, &event_settings).await;
        let (events, _) = broadcast::channel(4096);
        let (event_log, log_rx) = mpsc::unbounded_channel();
        tokio::spawn(event_log_loop(
            store.clone(),
            log_rx,
            events.clone(),
            event_settings,
        ));
        Ok(Arc::new(Self {
            store,
            ca,
            settings,
            limits,
            admission,
            metrics,
            health: HealthBook::new(),
            revocations,
            refusal_log: crate::listener::LogLimit::new("agent"),
            agents: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            events,
            event_log,
            claims: Mutex::new(Claims::default()),
            waiters: Mutex::new(HashMap::new()),
        }))
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, ConnectedAgent>> {
        // A poisoned lock only means another thread panicked mid-update of a plain map.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- events ---------------------------------------------------------------------

    /// Live events, each after it is in the durable log. Subscribe before reading the
    /// log (`Store::events_after`) and skip ids already read: nothing falls between.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn publish(
        &self,
        kind: &str,
        agent_id: &str,
        command_id: Option<Uuid>,
        data: impl FnOnce() -> serde_json::Value,
    ) {
        let event = Event {
            // Given by the log, in order (see event_log_loop).
            seq: 0,
            at_ms: dbvm_protocol::now_ms(),
            kind: kind.to_string(),
            agent_id: agent_id.to_string(),
            command_id,
            data: data(),
        };
        let _ = self.event_log.send(event);
    }

    fn publish_state(
        &self,
        rec_agent: &str,
        id: Uuid,
        operation: &str,
        state: CommandState,
        error: Option<&CommandError>,
    ) {
        self.publish("command.state", rec_agent, Some(id), || {
            serde_json::json!({
                "operation": operation,
                "state": state.as_str(),
                "error": error,
            })
        });
    }

    // ----- commands -------------------------------------------------------------------

    /// Accepts a command: admission, durable store, then hand-off to a connected agent.
    #[tracing::instrument(name = "submit", level = "debug", skip_all, fields(id = %rec.id, operation = %rec.operation))]
    pub async fn submit(&self, rec: CommandRecord) -> Result<(), SubmitError> {
        let deployment = rec.class == OperationClass::Deployment;
        if deployment && !self.admission.admit_deployment() {
            let running = self.admission.running(OperationClass::Deployment);
            let outstanding = self
                .admission
                .deployments_outstanding
                .load(Ordering::Acquire);
            Metrics::count(&self.metrics.submissions_refused, "reason", "busy");
            return Err(SubmitError::Busy {
                running,
                waiting: outstanding.saturating_sub(running),
                limit_running: self.limits.deployments_running,
                limit_waiting: self.limits.deployments_waiting,
            });
        }
        if let Err(e) = self.store.insert_command(rec.clone()).await {
            if deployment {
                self.admission.deployment_done();
            }
            Metrics::count(&self.metrics.submissions_refused, "reason", "store");
            return Err(e.into());
        }
        tracing::debug!(agent = %rec.agent_id, class = rec.class.as_str(), "command stored");
        Metrics::count(
            &self.metrics.commands_submitted,
            "class",
            rec.class.as_str(),
        );
        self.publish_state(
            &rec.agent_id,
            rec.id,
            &rec.operation,
            CommandState::Queued,
            None,
        );
        let tx = self.agents().get(&rec.agent_id).map(|a| a.tx.clone());
        if let Some(tx) = tx {
            // If the session is gone the command stays queued in the store for the next one.
            let _ = tx.send(SessionCommand::Deliver(Box::new(rec))).await;
        }
        Ok(())
    }

    /// Records a command's end durably; wakes waiters; frees the deployment room.
    /// Returns the finished command when this call finished it, `None` when it had
    /// already finished (a re-sent result) or is unknown.
    pub async fn finish(
        &self,
        agent_id: &str,
        id: Uuid,
        finish: Finish,
    ) -> Result<Option<Arc<CommandRecord>>, StoreError> {
        let state = finish.state;
        let error = finish.error.clone();
        let Some(rec) = self.store.finish(id, finish).await? else {
            return Ok(None);
        };
        self.claims().handed.remove(&id);
        let class = rec.class;
        self.class_finished(class);
        Metrics::count(&self.metrics.commands_finished, "state", state.as_str());
        self.publish_state(agent_id, id, &rec.operation, state, error.as_ref());
        let rec = Arc::new(rec);
        self.wake(rec.clone());
        Ok(Some(rec))
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a session just before it hands a command to its agent: whether it may
    /// (not when the command was cancelled). The store's `delivered` mark is written
    /// late (see the session's `MARK_DELAY`), so this, not the store, is what a
    /// cancellation races against.
    pub fn claim_delivery(&self, id: Uuid) -> bool {
        let mut claims = self.claims();
        if claims.cancelled.contains_key(&id) {
            return false;
        }
        claims.handed.insert(id);
        true
    }

    /// Takes back a command not yet handed to its agent: `POST /v1/commands/{id}/cancel`.
    pub async fn cancel(&self, id: Uuid) -> Result<Cancel, StoreError> {
        let Some(mut rec) = self.store.command(id).await? else {
            return Ok(Cancel::Unknown);
        };
        if rec.state != CommandState::Queued {
            return Ok(Cancel::TooLate(rec));
        }
        {
            let mut claims = self.claims();
            if claims.handed.contains(&id) {
                // Handed out; its `delivered` mark is not written yet.
                rec.state = CommandState::Delivered;
                return Ok(Cancel::TooLate(rec));
            }
            let now = dbvm_protocol::now_ms();
            // A session holding a cancelled command skips it; past its time it would
            // skip it anyway (expired), so the claim can go then.
            claims
                .cancelled
                .retain(|_, not_after| !TimeWindow::DEFAULT.is_expired(*not_after, now));
            claims.cancelled.insert(id, rec.not_after_ms);
        }
        let error = CommandError {
            code: "cancelled".into(),
            message: "cancelled by the control plane before it was delivered".into(),
        };
        let Some(done) = self
            .store
            .cancel(id, dbvm_protocol::now_ms(), error)
            .await?
        else {
            // It moved on meanwhile (expired, or finished by another broker's record).
            self.claims().cancelled.remove(&id);
            return Ok(match self.store.command(id).await? {
                Some(rec) => Cancel::TooLate(rec),
                None => Cancel::Unknown,
            });
        };
        tracing::info!(%id, agent = %done.agent_id, operation = %done.operation, "command cancelled");
        self.class_finished(done.class);
        Metrics::count(&self.metrics.commands_finished, "state", "cancelled");
        self.publish_state(
            &done.agent_id,
            id,
            &done.operation,
            CommandState::Cancelled,
            done.error.as_ref(),
        );
        self.wake(Arc::new(done.clone()));
        Ok(Cancel::Cancelled(done))
    }

    fn class_finished(&self, class: OperationClass) {
        if class == OperationClass::Deployment {
            self.admission.deployment_done();
        }
    }

    fn wake(&self, rec: Arc<CommandRecord>) {
        let senders = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.id);
        for s in senders.into_iter().flatten() {
            let _ = s.send(rec.clone());
        }
    }

    fn add_waiter(&self, id: Uuid) -> oneshot::Receiver<Arc<CommandRecord>> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let list = waiters.entry(id).or_default();
        // Waiters that gave up (timed out) leave closed senders behind; drop them here.
        list.retain(|s| !s.is_closed());
        list.push(tx);
        rx
    }

    fn drop_waiters_if_idle(&self, id: Uuid) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = waiters.get_mut(&id) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                waiters.remove(&id);
            }
        }
    }

    /// Waits for a registered waiter; on timeout reads the record's current state.
    async fn await_waiter(
        &self,
        id: Uuid,
        mut rx: oneshot::Receiver<Arc<CommandRecord>>,
        timeout: Duration,
    ) -> Result<Option<CommandRecord>, StoreError> {
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(rec)) => Ok(Some((*rec).clone())),
            _ => {
                drop(rx);
                self.drop_waiters_if_idle(id);
                self.store.command(id).await
            }
        }
    }

    /// Waits until the command is finished or `timeout` passes; returns its record.
    pub async fn wait_finished(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> Result<Option<CommandRecord>, StoreError> {
        // Register before reading, so a finish between the read and the wait is not missed.
        let rx = self.add_waiter(id);
        match self.store.command(id).await? {
            None => {
                drop(rx);
                self.drop_waiters_if_idle(id);
                Ok(None)
            }
            Some(r) if r.state.is_terminal() => {
                drop(rx);
                self.drop_waiters_if_idle(id);
                Ok(Some(r))
            }
            Some(_) => self.await_waiter(id, rx, timeout).await,
        }
    }

    /// Accepts a command and waits up to `timeout` for it to finish. The waiter is
    /// registered before the command can run, so the finished record comes straight
    /// from the result write: on the fast path the store is not read at all.
    pub async fn submit_and_wait(
        &self,
        rec: CommandRecord,
        timeout: Duration,
    ) -> Result<Option<CommandRecord>, SubmitError> {
        let id = rec.id;
        let rx = self.add_waiter(id);
        if let Err(e) = self.submit(rec).await {
            drop(rx);
            self.drop_waiters_if_idle(id);
            return Err(e);
        }
        Ok(self.await_waiter(id, rx, timeout).await?)
    }

    /// Expires queued commands whose time ran out (called periodically): by the agent's
    /// rule, so only once `not_after` plus the clock skew has passed.
    pub async fn expire_due(&self) -> Result<usize, StoreError> {
        let cutoff = TimeWindow::DEFAULT.expiry_cutoff(dbvm_protocol::now_ms());
        let expired = self.store.expire_due(cutoff).await?;
        let n = expired.len();
        for rec in expired {
            let _span =
                tracing::debug_span!("expire", id = %rec.id, operation = %rec.operation).entered();
            tracing::debug!(
                not_after_ms = rec.not_after_ms,
                "command expired before delivery"
            );
            self.class_finished(rec.class);
            Metrics::count(&self.metrics.commands_finished, "state", "expired");
            self.publish_state(
                &rec.agent_id,
                rec.id,
                &rec.operation,
                CommandState::Expired,
                rec.error.as_ref(),
            );
            self.wake(Arc::new(rec));
        }
        Ok(n)
    }

    // ----- agents ---------------------------------------------------------------------

    /// Registers a session; an older session of the same agent is told to close, and
    /// the replacement is counted (several within [`FLAP_WINDOW_MS`] make the agent
    /// flapping: an event and a metric). `revoked_at` is when the agent was last revoked
    /// as the handshake saw it: a revocation since then refuses the session (checked
    /// under the same lock [`Hub::revoke`] closes sessions under, so none slips between).
    pub fn register(
        &self,
        record: AgentRecord,
        tx: mpsc::Sender<SessionCommand>,
        peer: SocketAddr,
        revoked_at: Option<i64>,
    ) -> Result<Registered, String> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let last_seen = Arc::new(AtomicI64::new(dbvm_protocol::now_ms()));
        let end = Arc::new(SessionEnd::default());
        let id = record.id.clone();
        let mut agents = self.agents();
        if self.revocations.revoked_at(&id) != revoked_at {
            return Err(format!(
                "the certificates of agent {id} were revoked while this connection was set up: enroll again with a new enrollment token"
            ));
        }
        let mut entry = ConnectedAgent {
            generation,
            tx,
            record,
            last_seen_ms: last_seen.clone(),
            peer,
            end: end.clone(),
            replaced_at_ms: VecDeque::new(),
            flapping_announced_ms: None,
        };
        let now = dbvm_protocol::now_ms();
        let replaced = agents.remove(&id).map(|old| {
            old.end.close(Close::Replaced { by: peer });
            let mut history = old.replaced_at_ms;
            history.push_back(now);
            while history.front().is_some_and(|t| now - t > FLAP_WINDOW_MS)
                || history.len() > FLAP_THRESHOLD * 4
            {
                history.pop_front();
            }
            let flapping = history.len() >= FLAP_THRESHOLD;
            let announce = flapping
                && old
                    .flapping_announced_ms
                    .is_none_or(|t| now - t > FLAP_WINDOW_MS);
            entry.flapping_announced_ms = if announce {
                Some(now)
            } else {
                old.flapping_announced_ms
            };
            let count = history.len();
            entry.replaced_at_ms = history;
            (old.peer, count, announce)
        });
        agents.insert(id.clone(), entry);
        drop(agents);
        match replaced {
            Some((previous, count, announce)) => {
                self.metrics.session_replacements.inc();
                let data = || {
                    serde_json::json!({
                        "previous_peer": previous.to_string(),
                        "peer": peer.to_string(),
                        "replacements_in_window": count,
                        "window_s": FLAP_WINDOW_MS / 1000,
                    })
                };
                tracing::info!(agent = %id, %previous, %peer, count, "agent session replaced by a newer connection");
                self.publish("agent.replaced", &id, None, data);
                if announce {
                    self.metrics.agents_flapped.inc();
                    tracing::warn!(
                        agent = %id,
                        %previous,
                        %peer,
                        count,
                        "agent session replaced {count} times within {} s: two holders of one identity may be taking turns; if a certificate was stolen, revoke it with `dbvmctl agents revoke {id}`",
                        FLAP_WINDOW_MS / 1000
                    );
                    self.publish("agent.flapping", &id, None, data);
                }
            }
            None => {
                self.metrics.agents_connected.inc();
            }
        }
        self.publish(
            "agent.connected",
            &id,
            None,
            || serde_json::json!({ "peer": peer.to_string() }),
        );
        Ok(Registered {
            generation,
            last_seen_ms: last_seen,
            end,
        })
    }

    /// Revokes every certificate issued to `agent` so far (durably first), refuses them
    /// at every handshake and renewal from now on, and closes the agent's session. The
    /// agent id stays usable: a new enrollment token gets the VM a fresh certificate.
    pub async fn revoke(
        &self,
        agent: &str,
        reason: Option<String>,
    ) -> Result<Revocation, StoreError> {
        let at = dbvm_protocol::now_ms();
        let certs = self.store.revoke_agent(agent, at, reason.clone()).await?;
        let revocation = AgentRevocation {
            revoked_at_ms: at,
            reason: reason.clone(),
        };
        self.revocations.add(agent, revocation.clone(), &certs);
        let message = revoked_message(agent, &revocation);
        let session_closed = match self.agents().get(agent) {
            Some(a) => {
                a.end.close(Close::Revoked { message });
                true
            }
            None => false,
        };
        self.metrics.certificates_revoked.inc_by(certs.len() as u64);
        tracing::warn!(agent, certificates = certs.len(), reason = ?reason, session_closed, "agent certificates revoked");
        let n = certs.len();
        self.publish("agent.revoked", agent, None, || {
            serde_json::json!({
                "certificates": n,
                "reason": reason,
                "session_closed": session_closed,
            })
        });
        Ok(Revocation {
            agent_id: agent.to_string(),
            revoked_at_ms: at,
            reason: revocation.reason,
            certificates: certs.iter().map(|c| c.view()).collect(),
            session_closed,
        })
    }

    /// Forgets certificates that expired more than an hour ago (TLS refuses an expired
    /// certificate before any revocation check; the hour is for clocks that disagree).
    pub async fn prune_certificates(&self) {
        let before = dbvm_protocol::now_ms() - 3_600_000;
        match self.store.prune_certificates(before).await {
            Ok(n) => {
                self.revocations.prune(before);
                if n > 0 {
                    tracing::debug!(certificates = n, "forgot expired agent certificates");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning expired agent certificates failed; retrying in an hour")
            }
        }
    }

    /// Sets the gauges that are read from the live state rather than kept up to date
    /// (called before each scrape): agents flapping now, and the earliest expiry of a
    /// connected agent's certificate.
    pub fn refresh_metrics(&self) {
        let now = dbvm_protocol::now_ms();
        let (mut flapping, mut earliest) = (0i64, None::<i64>);
        for a in self.agents().values() {
            let recent = a
                .replaced_at_ms
                .iter()
                .filter(|t| now - **t <= FLAP_WINDOW_MS)
                .count();
            if recent >= FLAP_THRESHOLD {
                flapping += 1;
            }
            if let Some(na) = a.record.cert_not_after_ms {
                earliest = Some(earliest.map_or(na, |e| e.min(na)));
            }
        }
        self.metrics.agents_flapping.set(flapping);
        // No connected agent: no series (see OptionalGauge).
        self.metrics
            .agent_cert_earliest_expiry
            .set(earliest.map(|ms| ms / 1000));
    }

    pub fn unregister(&self, id: &str, generation: u64) {
        let mut agents = self.agents();
        if agents.get(id).is_some_and(|a| a.generation == generation) {
            agents.remove(id);
            drop(agents);
            self.metrics.agents_connected.dec();
            self.publish("agent.disconnected", id, None, || serde_json::json!({}));
        }
    }

    /// Replaces what the hub shows for a connected agent (after a renewal, say).
    pub fn update_record(&self, record: AgentRecord, generation: u64) {
        if let Some(a) = self.agents().get_mut(&record.id) {
            if a.generation == generation {
                a.record = record;
            }
        }
    }

    pub fn is_connected(&self, id: &str) -> bool {
        self.agents().contains_key(id)
    }

    pub async fn agent_views(&self) -> Result<Vec<AgentView>, StoreError> {
        let stored = self.store.agents().await?;
        let queued: HashMap<String, u64> = self.store.queued_counts().await?.into_iter().collect();
        let live: HashMap<String, (AgentRecord, i64)> = self
            .agents()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    (v.record.clone(), v.last_seen_ms.load(Ordering::Relaxed)),
                )
            })
            .collect();
        let mut views: Vec<AgentView> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for rec in stored {
            let (rec, connected, last_seen) = match live.get(&rec.id) {
                Some((live_rec, seen_ms)) => (live_rec.clone(), true, Some(*seen_ms)),
                None => (rec.clone(), false, rec.last_seen_ms),
            };
            seen.insert(rec.id.clone());
            views.push(view(
                &rec,
                connected,
                last_seen,
                queued.get(&rec.id).copied().unwrap_or(0),
            ));
        }
        for (id, (rec, seen_ms)) in &live {
            if !seen.contains(id) {
                views.push(view(
                    rec,
                    true,
                    Some(*seen_ms),
                    queued.get(id).copied().unwrap_or(0),
                ));
            }
        }
        // Agents that have commands waiting but never connected are worth showing too.
        for (id, n) in &queued {
            if !views.iter().any(|v| &v.id == id) {
                views.push(view(
                    &AgentRecord {
                        id: id.clone(),
                        ..Default::default()
                    },
                    false,
                    None,
                    *n,
                ));
            }
        }
        views.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(views)
    }
}

impl Hub {
    /// `GET /v1/health`: every agent the broker knows (as `GET /v1/agents` lists them,
    /// connected or not) with the summary of its latest health report.
    pub async fn fleet_health(&self) -> Result<FleetHealth, StoreError> {
        let views = self.agent_views().await?;
        let mut reports = self.health.snapshot();
        let mut agents: Vec<AgentHealthSummary> = views
            .iter()
            .map(|v| {
                let latest = reports.remove(&v.id);
                AgentHealthSummary::new(
                    &v.id,
                    v.connected,
                    v.last_seen_ms,
                    latest.as_ref().map(|(r, at)| (r.as_ref(), *at)),
                )
            })
            .collect();
        // A report is only stored from a connected agent, which the store knows; this is
        // for the case where its record could not be read back.
        for (id, (r, at)) in reports {
            let connected = self.is_connected(&id);
            agents.push(AgentHealthSummary::new(
                &id,
                connected,
                None,
                Some((&r, at)),
            ));
        }
        Ok(FleetHealth::new(dbvm_protocol::now_ms(), agents))
    }
}

/// What a session or handshake refused for a revoked certificate is told.
pub fn revoked_message(agent: &str, r: &AgentRevocation) -> String {
    let reason = r
        .reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!(
        "the certificates of agent {agent} were revoked at {} ms (Unix time){reason}: enroll again with a new enrollment token (`dbvmctl enroll-token {agent}`)",
        r.revoked_at_ms
    )
}

fn view(rec: &AgentRecord, connected: bool, last_seen_ms: Option<i64>, queued: u64) -> AgentView {
    AgentView {
        id: rec.id.clone(),
        connected,
        last_seen_ms,
        agent_version: rec.agent_version.clone(),
        protocol: rec.protocol.clone(),
        operations: rec.operations.clone(),
        capabilities: rec.capabilities.clone(),
        sealing_key: rec.sealing_key.clone(),
        db_kind: rec.db_kind.clone(),
        cert_not_after_ms: rec.cert_not_after_ms,
        queued_commands: queued,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentSettings, Limits};
    use crate::revocation::LinkCert;
    use dbvm_protocol::messages::{BrokerMessage, RefuseCode};
    use dbvm_protocol::AgentId;

    async fn hub() -> (tempfile::TempDir, Arc<Hub>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let ca = FleetCa::generate("t", Duration::from_secs(3600)).unwrap();
        let hub = Hub::new(
            store,
            ca,
            AgentSettings::default(),
            Limits::default(),
            Default::default(),
        )
        .await
        .unwrap();
        (dir, hub)
    }

    fn record(id: &str, cert_not_after_ms: i64) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            cert_not_after_ms: Some(cert_not_after_ms),
            ..Default::default()
        }
    }

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn series(text: &str, name: &str) -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .map(|l| l.rsplit_once(' ').unwrap().1.to_string())
    }

    #[tokio::test]
    async fn repeated_replacement_of_one_agent_is_an_event_and_a_metric() {
        let (_dir, hub) = hub().await;
        let mut events = hub.subscribe();
        let (tx, _rx) = mpsc::channel(1);
        let first = hub
            .register(record("db1", 1), tx.clone(), peer(1), None)
            .unwrap();
        let mut ends = vec![first.end];
        for port in 2..=5 {
            let r = hub
                .register(record("db1", 1), tx.clone(), peer(port), None)
                .unwrap();
            ends.push(r.end);
        }
        // Every session but the last was told who replaced it.
        for (i, end) in ends[..4].iter().enumerate() {
            let by = peer(i as u16 + 2);
            assert_eq!(end.closed().await, Close::Replaced { by });
        }
        // Events reach subscribers once they are in the log.
        let mut kinds = Vec::new();
        while kinds.len() < 5 {
            let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("logged within 10 s")
                .unwrap();
            if e.kind == "agent.replaced" || e.kind == "agent.flapping" {
                kinds.push((e.kind, e.data["replacements_in_window"].as_u64()));
            }
        }
        let s = |k: &str| k.to_string();
        assert_eq!(
            kinds,
            [
                (s("agent.replaced"), Some(1)),
                (s("agent.replaced"), Some(2)),
                (s("agent.replaced"), Some(3)),
                (s("agent.flapping"), Some(3)),
                (s("agent.replaced"), Some(4)),
            ],
            "flapping is announced once per window"
        );
        hub.refresh_metrics();
        let m = hub.metrics.render();
        assert_eq!(
            series(&m, "dbvm_broker_agent_session_replacements_total").as_deref(),
            Some("4")
        );
        assert_eq!(
            series(&m, "dbvm_broker_agents_flapping").as_deref(),
            Some("1")
        );
        assert_eq!(
            series(&m, "dbvm_broker_agent_flapping_episodes_total").as_deref(),
            Some("1")
        );
        assert_eq!(
            series(&m, "dbvm_broker_agents_connected").as_deref(),
            Some("1")
        );
        // Another agent's first connection is not a replacement.
        hub.register(record("db2", 1), tx, peer(9), None).unwrap();
        hub.refresh_metrics();
        let m = hub.metrics.render();
        assert_eq!(
            series(&m, "dbvm_broker_agent_session_replacements_total").as_deref(),
            Some("4")
        );
        assert_eq!(
            series(&m, "dbvm_broker_agents_flapping").as_deref(),
            Some("1")
        );
    }

    #[tokio::test]
    async fn metrics_show_the_earliest_agent_certificate_expiry_and_the_ca_expiry() {
        let (_dir, hub) = hub().await;
        let name = "dbvm_broker_agent_cert_earliest_expiry_timestamp_seconds";
        hub.refresh_metrics();
        let m = hub.metrics.render();
        assert_eq!(series(&m, name), None, "no agent, no series:\n{m}");
        let (_, ca_not_after) = dbvm_protocol::pki::validity_ms(hub.ca.cert_pem()).unwrap();
        assert_eq!(
            series(&m, "dbvm_broker_ca_cert_expiry_timestamp_seconds"),
            Some((ca_not_after / 1000).to_string())
        );
        let (tx, _rx) = mpsc::channel(1);
        let a = hub
            .register(record("db1", 9_000_000), tx.clone(), peer(1), None)
            .unwrap();
        hub.register(record("db2", 7_000_000), tx.clone(), peer(2), None)
            .unwrap();
        hub.refresh_metrics();
        let m = hub.metrics.render();
        assert!(m.contains(&format!("\n{name} 7000\n")), "{m}");
        // A renewal moves it; a disconnected agent leaves it.
        hub.update_record(record("db1", 5_000_000), a.generation);
        hub.refresh_metrics();
        assert_eq!(series(&hub.metrics.render(), name).as_deref(), Some("5000"));
        hub.unregister("db1", a.generation);
        hub.refresh_metrics();
        assert_eq!(series(&hub.metrics.render(), name).as_deref(), Some("7000"));
    }

    #[tokio::test]
    async fn a_revoked_link_cannot_renew_and_a_session_registering_across_a_revocation_is_refused()
    {
        let (_dir, hub) = hub().await;
        let agent = AgentId::new("db1").unwrap();
        // The link's certificate, issued as at enrollment.
        let token = crate::enroll::new_token();
        hub.store
            .insert_token(token.1, "db1", dbvm_protocol::now_ms() + 60_000)
            .await
            .unwrap();
        let (csr, _key) = dbvm_protocol::pki::make_csr(&agent).unwrap();
        let enrolled = crate::enroll::enroll(
            &hub,
            dbvm_protocol::messages::EnrollRequest {
                protocol_major: 1,
                protocol_minor: 1,
                agent_id: "db1".into(),
                token: token.0,
                csr_pem: csr.clone(),
            },
        )
        .await
        .unwrap();
        let BrokerMessage::Enrolled { cert_pem, .. } = enrolled else {
            panic!("{enrolled:?}")
        };
        let der = dbvm_protocol::pki::first_cert_der(&cert_pem).unwrap();
        let link = LinkCert::from_der(&der).unwrap();
        // Before the revocation it renews; the new certificate is recorded.
        let renewed = crate::enroll::renew(&hub, &agent, &link, &csr)
            .await
            .unwrap();
        assert!(
            matches!(renewed, BrokerMessage::Renewed { .. }),
            "{renewed:?}"
        );
        assert_eq!(hub.store.certificates("db1").await.unwrap().len(), 2);

        let seen = hub.revocations.revoked_at("db1");
        let (tx, _rx) = mpsc::channel(1);
        let live = hub
            .register(record("db1", 1), tx.clone(), peer(1), seen)
            .unwrap();
        let revocation = hub
            .revoke("db1", Some("laptop stolen".into()))
            .await
            .unwrap();
        assert_eq!(revocation.certificates.len(), 2);
        assert!(revocation.session_closed);
        let Close::Revoked { message } = live.end.closed().await else {
            panic!("the live session must be refused")
        };
        assert!(
            message.contains("laptop stolen") && message.contains("enroll"),
            "{message}"
        );

        // The link's certificate no longer renews.
        let (code, message) = crate::enroll::renew(&hub, &agent, &link, &csr)
            .await
            .unwrap_err();
        assert_eq!(code, RefuseCode::CertificateRevoked);
        assert!(message.starts_with("renewal refused"), "{message}");
        assert_eq!(hub.store.certificates("db1").await.unwrap().len(), 2);
        assert!(matches!(
            hub.revocations
                .check(&link.fingerprint, "db1", link.not_before_ms),
            crate::revocation::Verdict::Revoked(_)
        ));
        // A handshake that checked before the revocation cannot register after it.
        assert!(hub.register(record("db1", 1), tx, peer(2), seen).is_err());
    }

    #[tokio::test]
    async fn events_are_logged_with_rising_ids_that_survive_pruning_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let open = || async {
            let store = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
            let ca = FleetCa::generate("t", Duration::from_secs(3600)).unwrap();
            // The defaults: the log's own pruning (at start, then each minute) keeps all.
            Hub::new(
                store,
                ca,
                AgentSettings::default(),
                Limits::default(),
                EventSettings::default(),
            )
            .await
            .unwrap()
        };
        let hub = open().await;
        let mut live = hub.subscribe();
        for i in 0..5 {
            hub.publish("agent.event", "db1", None, || serde_json::json!({ "i": i }));
        }
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(live.recv().await.unwrap().seq);
        }
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        let bounds = |page: crate::store::EventPage| (page.oldest, page.last_given);
        let logged = hub.store.events_after(2, None, 10).await.unwrap();
        assert_eq!(
            logged.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(logged.events[0].data["i"], 2);
        assert_eq!(bounds(logged), (Some(1), 5));
        // Keep 3: the two oldest go; then everything older than now (all of it), at most
        // two rows a write.
        assert_eq!(hub.store.prune_events(3, 0, 100).await.unwrap(), 2);
        assert_eq!(
            bounds(hub.store.events_after(0, None, 1).await.unwrap()),
            (Some(3), 5)
        );
        let now = dbvm_protocol::now_ms() + 1;
        assert_eq!(hub.store.prune_events(3, now, 2).await.unwrap(), 2);
        assert_eq!(
            bounds(hub.store.events_after(0, None, 1).await.unwrap()),
            (Some(5), 5)
        );
        assert_eq!(hub.store.prune_events(3, now, 2).await.unwrap(), 1);
        assert_eq!(
            bounds(hub.store.events_after(0, None, 1).await.unwrap()),
            (None, 5)
        );
        drop(live);
        drop(hub);
        // A new broker on the same store goes on from the last id ever given.
        let hub = open().await;
        let mut live = hub.subscribe();
        hub.publish("agent.event", "db2", None, || serde_json::json!({}));
        assert_eq!(live.recv().await.unwrap().seq, 6);
    }

    #[tokio::test]
    async fn a_command_goes_to_its_cancellation_or_its_delivery_never_both() {
        let (_dir, hub) = hub().await;
        let now = dbvm_protocol::now_ms();
        let rec = |id: Uuid| CommandRecord {
            id,
            agent_id: "db1".into(),
            operation: "ping".into(),
            class: OperationClass::Query,
            state: CommandState::Queued,
            signed: vec![1],
            submitted_at_ms: now,
            not_after_ms: now + 60_000,
            delivered_at_ms: None,
            finished_at_ms: None,
            progress: None,
            output_json: None,
            error: None,
        };
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        for id in [a, b] {
            hub.store.insert_command(rec(id)).await.unwrap();
        }
        // Handed out first (its `delivered` not written yet): too late to cancel.
        assert!(hub.claim_delivery(a));
        match hub.cancel(a).await.unwrap() {
            Cancel::TooLate(r) => assert_eq!(r.state, CommandState::Delivered),
            other => panic!("{other:?}"),
        }
        // Cancelled first: no session may hand it out after.
        match hub.cancel(b).await.unwrap() {
            Cancel::Cancelled(r) => assert_eq!(r.state, CommandState::Cancelled),
            other => panic!("{other:?}"),
        }
        assert!(!hub.claim_delivery(b));
        assert!(
            matches!(hub.cancel(b).await.unwrap(), Cancel::TooLate(r) if r.state == CommandState::Cancelled)
        );
        assert!(matches!(
            hub.cancel(Uuid::new_v4()).await.unwrap(),
            Cancel::Unknown
        ));
    }
}
