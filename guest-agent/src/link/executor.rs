//! The executor: verifies a delivered command, journals its id, runs its operation inside
//! a span that names it, journals and sends its result — and, when the agent stops,
//! drains: takes no new command, lets the running ones finish within a deadline, and
//! journals the rest as interrupted (never half-reported: a command has exactly one
//! result, the first one journaled, and that is the one sent).

use super::Outgoing;
use crate::dispatch::{Dispatcher, OpContext, OpError, ProgressUpdate};
use crate::journal::{Entry, Journal};
use dbvm_protocol::frame::MAX_FRAME_LEN;
use dbvm_protocol::messages::{AgentMessage, CommandResult, Outcome, RejectCode};
use dbvm_protocol::seal::SealingKey;
use dbvm_protocol::{AgentId, SignedCommand, VerifiedCommand, Verifier, VerifyError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

/// A command that has not finished after this long is acknowledged (`Ack`: it is
/// running); one that finishes sooner sends only its result, which says as much. The
/// broker writes `running` for a command only after 200 ms anyway.
const ACK_AFTER: Duration = Duration::from_millis(100);
/// Largest operation output: leaves room in one frame for the rest of the result.
const MAX_OUTPUT_BYTES: usize = MAX_FRAME_LEN - 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere mid-update; the data (a journal handle or a
    // map of running commands) stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Running {
    operation: String,
    started_at_ms: i64,
    abort: AbortHandle,
}

/// Runs verified commands at most once.
pub struct Executor {
    agent_id: AgentId,
    verifier: Verifier,
    dispatcher: Dispatcher,
    sealing_key: Arc<SealingKey>,
    journal: Arc<Mutex<Journal>>,
    outgoing: Arc<Outgoing>,
    progress_tx: mpsc::UnboundedSender<ProgressUpdate>,
    running: Mutex<HashMap<Uuid, Running>>,
    tracker: TaskTracker,
    accepting: AtomicBool,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("operations", &self.dispatcher)
            .finish_non_exhaustive()
    }
}

impl Executor {
    pub(super) fn new(
        agent_id: AgentId,
        verifier: Verifier,
        dispatcher: Dispatcher,
        sealing_key: Arc<SealingKey>,
        journal: Journal,
        outgoing: Arc<Outgoing>,
        progress_tx: mpsc::UnboundedSender<ProgressUpdate>,
    ) -> Self {
        Self {
            agent_id,
            verifier,
            dispatcher,
            sealing_key,
            journal: Arc::new(Mutex::new(journal)),
            outgoing,
            progress_tx,
            running: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            accepting: AtomicBool::new(true),
        }
    }

    /// The operations this agent offers (for `Hello`).
    pub fn operation_names(&self) -> Vec<String> {
        self.dispatcher.names()
    }

    /// Verifies a delivered command, journals it, and starts it — or says why not.
    pub(super) async fn on_deliver(
        self: &Arc<Self>,
        cmd: SignedCommand,
        out: &mpsc::Sender<AgentMessage>,
    ) {
        if !self.accepting.load(Ordering::Acquire) {
            // Not journaled, so not lost: the broker delivers it again after the restart.
            let id = cmd.peek_body().ok().map(|b| b.id);
            tracing::info!(
                id = ?id,
                "the agent is shutting down; the command is left for the broker to deliver after the restart"
            );
            return;
        }
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
                let span =
                    tracing::info_span!("command", %id, operation = %verified.body.operation);
                // The command's id and operation are in the event as well as in its span,
                // so a plain grep of the log finds each run.
                span.in_scope(|| {
                    tracing::info!(%id, operation = %verified.body.operation, key_id = %verified.key_id, "running command");
                });
                // The map is locked across the spawn, so the task cannot remove its entry
                // before it is there.
                let mut running = lock(&self.running);
                let operation = verified.body.operation.clone();
                let handle = self
                    .tracker
                    .spawn(self.clone().execute(verified, out.clone()).instrument(span));
                running.insert(
                    id,
                    Running {
                        operation,
                        started_at_ms: now,
                        abort: handle.abort_handle(),
                    },
                );
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
    async fn on_duplicate(&self, id: Uuid, out: &mpsc::Sender<AgentMessage>) {
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

    async fn run_operation(
        &self,
        body: &dbvm_protocol::CommandBody,
        out: &mpsc::Sender<AgentMessage>,
    ) -> Outcome {
        let id = body.id;
        let Some(op) = self.dispatcher.get(&body.operation) else {
            return Outcome::Rejected {
                code: RejectCode::UnsupportedOperation,
                message: format!(
                    "this agent does not support operation {:?} (it supports: {})",
                    body.operation,
                    self.dispatcher.names().join(", ")
                ),
            };
        };
        let args = match serde_json::from_str::<serde_json::Value>(&body.args_json) {
            Ok(a) => a,
            Err(e) => {
                return Outcome::Rejected {
                    code: RejectCode::BadArguments,
                    message: format!("arguments are not JSON: {e}"),
                }
            }
        };
        let ctx = OpContext::new(
            body.clone(),
            self.sealing_key.clone(),
            self.agent_id.to_string(),
            self.progress_tx.clone(),
        );
        // A command still running after ACK_AFTER is acknowledged as running; a faster one
        // is told by its result alone.
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

    async fn execute(self: Arc<Self>, verified: VerifiedCommand, out: mpsc::Sender<AgentMessage>) {
        let body = verified.body;
        let id = body.id;
        let started = dbvm_protocol::now_ms();
        let outcome = self.run_operation(&body, &out).await;
        let result = CommandResult {
            id,
            outcome,
            started_at_ms: started,
            finished_at_ms: dbvm_protocol::now_ms(),
        };
        let journaled = self.journal_result(result.clone()).await;
        lock(&self.running).remove(&id);
        tracing::info!(ms = result.finished_at_ms - started, "command finished");
        // Sent now if connected; otherwise the journal re-sends it after the next Welcome.
        if journaled {
            self.outgoing.send(AgentMessage::Result(result)).await;
        }
    }

    /// Journals a result unless the command already has one (a drain that gave up on it
    /// journaled it as interrupted first). Says whether this result is the one that counts.
    async fn journal_result(&self, result: CommandResult) -> bool {
        let journal = self.journal.clone();
        let id = result.id;
        match tokio::task::spawn_blocking(move || lock(&journal).finish(&result)).await {
            Ok(Ok(first)) => first,
            Ok(Err(e)) => {
                tracing::error!(%id, error = %e, "cannot journal a result");
                true
            }
            Err(e) => {
                tracing::error!(%id, error = %e, "journal task failed");
                true
            }
        }
    }

    /// Records the broker's acknowledgement of a result.
    pub(super) async fn mark_acked(&self, id: Uuid) {
        let journal = self.journal.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = lock(&journal).mark_acked(id) {
                tracing::error!(error = %e, "cannot record a result acknowledgement");
            }
        })
        .await;
    }

    /// Results the broker has not acknowledged yet (sent again after every Welcome).
    pub(super) async fn unacked_results(&self) -> Vec<CommandResult> {
        let journal = self.journal.clone();
        match tokio::task::spawn_blocking(move || lock(&journal).unacked_results()).await {
            Ok(Ok(results)) => results,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read unacknowledged results");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "journal task failed");
                Vec::new()
            }
        }
    }

    /// From now on deliveries are left to the broker (see [`Self::on_deliver`]).
    pub(super) fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// How many commands are running now.
    pub fn running(&self) -> usize {
        lock(&self.running).len()
    }

    /// Resolves once no command runs (call [`Self::stop_accepting`] first).
    pub(super) async fn idle(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// The end of a drain: every command still running is stopped and journaled as
    /// interrupted (unless it journaled its own result in the meantime), and whatever
    /// result counts is sent if the link is up. Returns how many were interrupted.
    pub(super) async fn interrupt_running(&self, deadline: Duration) -> usize {
        let left: Vec<(Uuid, Running)> = lock(&self.running).drain().collect();
        for (_, r) in &left {
            r.abort.abort();
        }
        // Aborted tasks end at their next await point.
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
        let now = dbvm_protocol::now_ms();
        let mut interrupted = 0;
        for (id, r) in left {
            let result = CommandResult {
                id,
                outcome: Outcome::Interrupted {
                    message: format!(
                        "the agent was shut down while {} was running and it did not finish within the drain deadline of {} s; it was stopped and will not be run again. Check the database state before resubmitting",
                        r.operation,
                        deadline.as_secs()
                    ),
                },
                started_at_ms: r.started_at_ms,
                finished_at_ms: now,
            };
            if self.journal_result(result).await {
                interrupted += 1;
                tracing::warn!(%id, operation = %r.operation, "command interrupted by the shutdown");
            }
            let journal = self.journal.clone();
            let entry = tokio::task::spawn_blocking(move || lock(&journal).entry(id)).await;
            if let Ok(Ok(Some(Entry::Finished { result, .. }))) = entry {
                self.outgoing.send(AgentMessage::Result(result)).await;
            }
        }
        interrupted
    }
}
