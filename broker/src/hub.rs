//! The broker's live state beside its store: connected agents, admission slots, waiters
//! for command completion, and the event stream. The API and the agent link both act
//! through the [`Hub`].

use crate::config::{AgentSettings, Limits};
use crate::health::HealthBook;
use crate::metrics::Metrics;
use crate::store::{AgentRecord, CommandRecord, Finish, Store, StoreError};
use dbvm_protocol::api::{
    AgentHealthSummary, AgentView, CommandError, CommandState, Event, FleetHealth, OperationClass,
};
use dbvm_protocol::command::TimeWindow;
use dbvm_protocol::pki::FleetCa;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use uuid::Uuid;

/// What the hub tells an agent's session.
#[derive(Debug)]
pub enum SessionCommand {
    /// A new command for this agent was stored; deliver it.
    Deliver(Box<CommandRecord>),
    /// Another connection for the same agent took over: close this one.
    Replaced,
}

pub struct ConnectedAgent {
    pub generation: u64,
    pub tx: mpsc::Sender<SessionCommand>,
    pub record: AgentRecord,
    pub last_seen_ms: Arc<AtomicI64>,
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
    agents: Mutex<HashMap<String, ConnectedAgent>>,
    generation: AtomicU64,
    events: broadcast::Sender<Event>,
    event_seq: AtomicU64,
    /// Callers waiting for a command to finish; woken with the finished record, so the
    /// answer to `?wait_ms` needs no read of the store.
    waiters: Mutex<HashMap<Uuid, Vec<oneshot::Sender<Arc<CommandRecord>>>>>,
}

impl Hub {
    pub async fn new(
        store: Arc<dyn Store>,
        ca: FleetCa,
        settings: AgentSettings,
        limits: Limits,
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
        let (events, _) = broadcast::channel(4096);
        Ok(Arc::new(Self {
            store,
            ca,
            settings,
            limits,
            admission,
            metrics: Metrics::new(),
            health: HealthBook::new(),
            agents: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            events,
            event_seq: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
        }))
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, ConnectedAgent>> {
        // A poisoned lock only means another thread panicked mid-update of a plain map.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- events ---------------------------------------------------------------------

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
        if self.events.receiver_count() == 0 {
            return;
        }
        let event = Event {
            seq: self.event_seq.fetch_add(1, Ordering::Relaxed),
            at_ms: dbvm_protocol::now_ms(),
            kind: kind.to_string(),
            agent_id: agent_id.to_string(),
            command_id,
            data: data(),
        };
        let _ = self.events.send(event);
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
    /// Returns the class of the command when this call finished it, `None` when it had
    /// already finished (a re-sent result) or is unknown.
    pub async fn finish(
        &self,
        agent_id: &str,
        id: Uuid,
        finish: Finish,
    ) -> Result<Option<OperationClass>, StoreError> {
        let state = finish.state;
        let error = finish.error.clone();
        let Some(rec) = self.store.finish(id, finish).await? else {
            return Ok(None);
        };
        let class = rec.class;
        self.class_finished(class);
        Metrics::count(&self.metrics.commands_finished, "state", state.as_str());
        self.publish_state(agent_id, id, &rec.operation, state, error.as_ref());
        self.wake(Arc::new(rec));
        Ok(Some(class))
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

    /// Registers a session; an older session of the same agent is told to close.
    pub fn register(
        &self,
        record: AgentRecord,
        tx: mpsc::Sender<SessionCommand>,
    ) -> (u64, Arc<AtomicI64>) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let last_seen = Arc::new(AtomicI64::new(dbvm_protocol::now_ms()));
        let id = record.id.clone();
        let old = self.agents().insert(
            id.clone(),
            ConnectedAgent {
                generation,
                tx,
                record,
                last_seen_ms: last_seen.clone(),
            },
        );
        match old {
            Some(old) => {
                let _ = old.tx.try_send(SessionCommand::Replaced);
            }
            None => {
                self.metrics.agents_connected.inc();
            }
        };
        self.publish("agent.connected", &id, None, || serde_json::json!({}));
        (generation, last_seen)
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
