//! Scheduled backups: `backup.configure` takes `schedule_hours` (24 by default; 0 turns
//! the schedule off) and the agent runs `backup.run type=auto` that often by itself —
//! full for a new chain, incremental otherwise — reporting each result as an event
//! (`backup.completed`, `backup.failed`). When the last one ran is kept on disk, so a
//! restarted agent neither skips a backup nor runs one twice.

use super::{day_ms, BackupError, BackupManager, RunKind};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// `state_dir/backup/schedule.json`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Schedule {
    /// Hours between backups; 0: no schedule.
    pub every_hours: u32,
    /// When the schedule was set, or when its last backup started.
    pub since_ms: i64,
}

impl Schedule {
    /// When the next backup is due, if any.
    pub fn due_ms(&self) -> Option<i64> {
        (self.every_hours > 0).then(|| self.since_ms + i64::from(self.every_hours) * hour_ms())
    }
}

/// An hour, as retention days count it (shorter only in tests, see [`super::TEST_DAY_S`]).
pub fn hour_ms() -> i64 {
    day_ms() / 24
}

impl BackupManager {
    fn schedule_path(&self) -> std::path::PathBuf {
        self.state_path.with_file_name("schedule.json")
    }

    /// The schedule, if one was set.
    pub fn schedule(&self) -> Option<Schedule> {
        let bytes = std::fs::read(self.schedule_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save_schedule(&self, s: &Schedule) -> Result<(), BackupError> {
        let path = self.schedule_path();
        let bytes = serde_json::to_vec_pretty(s)
            .map_err(|e| BackupError::Failed(format!("cannot encode the schedule: {e}")))?;
        dbvm_host::fs::write_atomic(&path, &bytes, 0o600)
            .map_err(|e| BackupError::Failed(format!("cannot write {}: {e}", path.display())))
    }

    /// Sets the schedule (after `backup.configure` succeeded): the first scheduled backup
    /// is `every_hours` from now.
    pub fn set_schedule(&self, every_hours: u32) -> Result<Schedule, BackupError> {
        let s = Schedule {
            every_hours,
            since_ms: dbvm_protocol::now_ms(),
        };
        self.save_schedule(&s)?;
        Ok(s)
    }

    /// Runs the scheduled backups until `token` is cancelled.
    pub async fn run_schedule(self: Arc<Self>, token: tokio_util::sync::CancellationToken) {
        // Looked at often enough to be on time, seldom enough to cost nothing.
        let tick = Duration::from_millis((hour_ms() / 4).clamp(100, 60_000) as u64);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            self.drill_if_due().await;
            let Some(mut s) = self.schedule() else {
                continue;
            };
            let Some(due) = s.due_ms() else { continue };
            let now = dbvm_protocol::now_ms();
            if now < due {
                continue;
            }
            // Recorded before the backup starts: an agent that dies during it does not
            // run it again at once on restart (the next one comes an interval later).
            s.since_ms = now;
            if let Err(e) = self.save_schedule(&s) {
                tracing::warn!(error = %e, "cannot record the scheduled backup; skipping it");
                continue;
            }
            let (kind, payload) = match self.run(RunKind::Auto, &|_, _| {}).await {
                Ok(v) => {
                    tracing::info!(label = %v["label"], kind = %v["type"], "scheduled backup done");
                    ("backup.completed", json!({"scheduled": true, "backup": v}))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduled backup failed");
                    (
                        "backup.failed",
                        json!({"scheduled": true, "error": e.to_string()}),
                    )
                }
            };
            if let Some(outbox) = self.outbox.get() {
                outbox.event(kind, dbvm_protocol::now_ms(), payload.to_string());
            }
        }
    }
}

impl BackupManager {
    /// The scheduled restore drill (`[backup] verify_every_days`, PostgreSQL and MariaDB): due that
    /// many days after the last drill, or after backups were configured. Its result is
    /// kept in the state file and sent as an event by [`BackupManager::verify`].
    async fn drill_if_due(&self) {
        let days = self.settings.verify_every_days;
        use crate::db::params::Flavour;
        if days == 0
            || !matches!(
                self.db.flavour(),
                Some(Flavour::Postgres | Flavour::Mariadb)
            )
        {
            return;
        }
        let Ok(Some(state)) = self.load() else { return };
        let since = state
            .last_verify
            .as_ref()
            .and_then(|v| v["at_ms"].as_i64())
            .unwrap_or(state.configured_at_ms);
        if dbvm_protocol::now_ms() < since + i64::from(days) * day_ms() {
            return;
        }
        match self.verify(None, &|_, _| {}).await {
            Ok(_) => tracing::info!("scheduled restore drill passed"),
            Err(e) => {
                tracing::warn!(error = %e, "scheduled restore drill failed");
                // A drill that could not even run (no backup yet, storage down) is not
                // retried on every tick: recorded, it is tried again a day later.
                if let Ok(Some(mut st)) = self.load() {
                    let recorded = st.last_verify.as_ref().and_then(|v| v["at_ms"].as_i64());
                    if recorded.is_none_or(|at| at <= since) {
                        st.last_verify = Some(json!({
                            "ok": false,
                            "reason": e.to_string(),
                            "at_ms": dbvm_protocol::now_ms()
                                - i64::from(days.saturating_sub(1)) * day_ms(),
                        }));
                        let _ = self.save(&st);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_backup_is_an_interval_after_the_last() {
        let s = Schedule {
            every_hours: 24,
            since_ms: 1_000,
        };
        assert_eq!(s.due_ms(), Some(1_000 + 86_400_000));
        let off = Schedule {
            every_hours: 0,
            since_ms: 1_000,
        };
        assert_eq!(off.due_ms(), None);
    }
}
