//! The agent's command journal: what makes execution at-most-once across restarts and
//! lets results the broker has not acknowledged be sent again.
//!
//! A command id is recorded durably (fsync) *before* the command runs. On start-up every
//! command that was started but never finished is marked interrupted, never re-run. A
//! result stays until the broker acknowledges it. Entries are kept until well after the
//! command's `not_after`, beyond which the verifier refuses the command anyway.

use dbvm_protocol::command::{CommandBody, ReplayGuard};
use dbvm_protocol::messages::{CommandResult, Outcome};
use std::path::{Path, PathBuf};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open the command journal {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("command journal: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("command journal holds a record that does not decode: {0}")]
    Corrupt(String),
}

/// What the journal knows of a command id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Started, not finished (still running in this process).
    Running,
    /// Finished; `acked` once the broker stored the result.
    Finished { result: CommandResult, acked: bool },
}

pub struct Journal {
    conn: rusqlite::Connection,
    /// A second connection for acknowledgements only, which need not be durable: one lost
    /// in a crash means the result is sent again, and the broker acknowledges a result it
    /// already holds without storing it twice. It commits without an fsync
    /// (`synchronous = NORMAL` in WAL mode); the next durable write on `conn` syncs it too.
    acks: rusqlite::Connection,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Journal")
    }
}

/// How long after `not_after` an entry is kept (the verifier refuses expired commands,
/// so older ids can never come back as anything but an expiry refusal).
const KEEP_AFTER_EXPIRY_MS: i64 = 24 * 3600 * 1000;

impl Journal {
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let open = || {
            rusqlite::Connection::open(path).map_err(|source| JournalError::Open {
                path: path.to_path_buf(),
                source,
            })
        };
        let conn = open()?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS commands (
                id BLOB PRIMARY KEY,
                operation TEXT NOT NULL,
                not_after_ms INTEGER NOT NULL,
                received_at_ms INTEGER NOT NULL,
                result BLOB,
                acked INTEGER NOT NULL DEFAULT 0
            );",
        )?;
        let acks = open()?;
        acks.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Self { conn, acks })
    }

    /// Marks every command that was running when the agent stopped as interrupted and
    /// returns how many there were. Called once at start-up, before the link starts.
    pub fn interrupt_unfinished(&mut self) -> Result<usize, JournalError> {
        let now = dbvm_protocol::now_ms();
        let ids: Vec<(Vec<u8>, String, i64)> = {
            let mut stmt = self.conn.prepare(
                "SELECT id, operation, received_at_ms FROM commands WHERE result IS NULL",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (id, operation, received) in &ids {
            let id = Uuid::from_slice(id).map_err(|e| JournalError::Corrupt(e.to_string()))?;
            tracing::warn!(%id, %operation, "command was running when the agent stopped; reporting it interrupted, not running it again");
            self.finish(&CommandResult {
                id,
                outcome: Outcome::Interrupted {
                    message: format!(
                        "the agent stopped while {operation} was running; it was not run again. Check the database state before resubmitting"
                    ),
                },
                started_at_ms: *received,
                finished_at_ms: now,
            })?;
        }
        Ok(ids.len())
    }

    /// Records a command's result, unless it has one already: the first result journaled
    /// is the one that counts (a drain that gave up on a command journals it interrupted;
    /// the command's own result, arriving later, is then dropped). Says whether this one
    /// was recorded.
    pub fn finish(&mut self, result: &CommandResult) -> Result<bool, JournalError> {
        let bytes =
            postcard::to_allocvec(result).map_err(|e| JournalError::Corrupt(e.to_string()))?;
        let n = self.conn.execute(
            "UPDATE commands SET result = ?2 WHERE id = ?1 AND result IS NULL",
            rusqlite::params![result.id.as_bytes().as_slice(), bytes],
        )?;
        Ok(n == 1)
    }

    /// Records that the broker stored the result (not synced to disk: see `acks`).
    pub fn mark_acked(&mut self, id: Uuid) -> Result<(), JournalError> {
        self.acks.execute(
            "UPDATE commands SET acked = 1 WHERE id = ?1 AND result IS NOT NULL",
            [id.as_bytes().as_slice()],
        )?;
        Ok(())
    }

    pub fn entry(&self, id: Uuid) -> Result<Option<Entry>, JournalError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT result, acked FROM commands WHERE id = ?1")?;
        let mut rows = stmt.query([id.as_bytes().as_slice()])?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        let result: Option<Vec<u8>> = row.get(0)?;
        let acked: bool = row.get(1)?;
        Ok(Some(match result {
            None => Entry::Running,
            Some(bytes) => Entry::Finished {
                result: postcard::from_bytes(&bytes)
                    .map_err(|e| JournalError::Corrupt(e.to_string()))?,
                acked,
            },
        }))
    }

    /// Results the broker has not acknowledged yet, oldest first.
    pub fn unacked_results(&self) -> Result<Vec<CommandResult>, JournalError> {
        let mut stmt = self.conn.prepare(
            "SELECT result FROM commands WHERE result IS NOT NULL AND acked = 0 ORDER BY rowid",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for bytes in rows {
            out.push(
                postcard::from_bytes(&bytes?).map_err(|e| JournalError::Corrupt(e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// Forgets acknowledged entries whose commands expired long ago.
    pub fn prune(&mut self, now_ms: i64) -> Result<usize, JournalError> {
        Ok(self.conn.execute(
            "DELETE FROM commands WHERE acked = 1 AND not_after_ms < ?1",
            [now_ms - KEEP_AFTER_EXPIRY_MS],
        )?)
    }
}

impl ReplayGuard for Journal {
    fn record_new(&mut self, body: &CommandBody) -> Result<bool, String> {
        let res = self.conn.execute(
            "INSERT INTO commands (id, operation, not_after_ms, received_at_ms) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![
                body.id.as_bytes().as_slice(),
                body.operation,
                body.not_after_ms,
                dbvm_protocol::now_ms()
            ],
        );
        match res {
            Ok(_) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Ok(false)
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> CommandBody {
        CommandBody {
            format: 1,
            id: Uuid::new_v4(),
            agent_id: "db1".into(),
            issued_at_ms: 0,
            not_after_ms: 10,
            operation: "ping".into(),
            args_json: "{}".into(),
            reply_key: None,
        }
    }

    #[test]
    fn started_commands_come_back_interrupted_not_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite3");
        let b = body();
        {
            let mut j = Journal::open(&path).unwrap();
            assert!(j.record_new(&b).unwrap());
            assert!(!j.record_new(&b).unwrap());
            assert_eq!(j.entry(b.id).unwrap(), Some(Entry::Running));
        }
        let mut j = Journal::open(&path).unwrap();
        assert!(!j.record_new(&b).unwrap(), "replay after restart");
        assert_eq!(j.interrupt_unfinished().unwrap(), 1);
        let unacked = j.unacked_results().unwrap();
        assert_eq!(unacked.len(), 1);
        assert!(matches!(unacked[0].outcome, Outcome::Interrupted { .. }));
        j.mark_acked(b.id).unwrap();
        assert!(j.unacked_results().unwrap().is_empty());
        assert!(matches!(
            j.entry(b.id).unwrap(),
            Some(Entry::Finished { acked: true, .. })
        ));
        // The acknowledgement went through the second connection, unsynced; a restart
        // of the process still finds it (it is in the WAL).
        drop(j);
        let mut j = Journal::open(&path).unwrap();
        assert!(j.unacked_results().unwrap().is_empty());
        assert_eq!(j.prune(KEEP_AFTER_EXPIRY_MS + 100).unwrap(), 1);
    }
}
