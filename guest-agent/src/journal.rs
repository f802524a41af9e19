//! The agent's command journal: what makes execution at-most-once across restarts and
//! lets results the broker has not acknowledged be sent again.
//!
//! A command id is recorded durably (fsync) *before* the command runs. On start-up every
//! command that was started but never finished is marked interrupted, never re-run. A
//! result stays until the broker acknowledges it. Entries are kept until well after the
//! command's `not_after`, beyond which the verifier refuses the command anyway.
//!
//! Results are stored in the versioned encoding of `dbvm_protocol::stored`, not the wire
//! encoding, so an additive change to `CommandResult` never strands an unacknowledged
//! entry: the bytes go in `result`, their version in `result_format`. A journal written
//! before that column existed gets it on open, with the default 1, which is what its
//! results are; the agent before it ignores the column and reads every version 1 entry
//! (see that module for what a rollback keeps).

use dbvm_protocol::command::{CommandBody, ReplayGuard};
use dbvm_protocol::messages::{CommandResult, Outcome};
use dbvm_protocol::stored::{self, StoredError};
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
    #[error("command journal entry {id}: {source}")]
    Stored { id: Uuid, source: StoredError },
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
                acked INTEGER NOT NULL DEFAULT 0,
                result_format INTEGER NOT NULL DEFAULT 1
            );",
        )?;
        add_result_format(&conn)?;
        let acks = open()?;
        acks.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Self { conn, acks })
    }

    /// Opens the journal at `path` read-only and decodes every result in it: what an
    /// upgrade's trial run checks before the new binary may take over (it must read what
    /// the old one wrote). Returns how many entries there are; writes nothing.
    pub fn check_readable(path: &Path) -> Result<usize, JournalError> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| JournalError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let mut stmt = conn.prepare("SELECT id, result, result_format FROM commands")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?,
                r.get::<_, u16>(2)?,
            ))
        })?;
        let mut n = 0;
        for row in rows {
            let (id, bytes, version) = row?;
            let id = Uuid::from_slice(&id).map_err(|e| JournalError::Corrupt(e.to_string()))?;
            if let Some(bytes) = bytes {
                stored::decode(version, &bytes)
                    .map_err(|source| JournalError::Stored { id, source })?;
            }
            n += 1;
        }
        Ok(n)
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
        let stored = stored::encode(result).map_err(|source| JournalError::Stored {
            id: result.id,
            source,
        })?;
        let n = self.conn.execute(
            "UPDATE commands SET result = ?2, result_format = ?3 WHERE id = ?1 AND result IS NULL",
            rusqlite::params![
                result.id.as_bytes().as_slice(),
                stored.bytes,
                stored.version
            ],
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
            .prepare_cached("SELECT result, result_format, acked FROM commands WHERE id = ?1")?;
        let mut rows = stmt.query([id.as_bytes().as_slice()])?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        let result: Option<Vec<u8>> = row.get(0)?;
        let version: u16 = row.get(1)?;
        let acked: bool = row.get(2)?;
        Ok(Some(match result {
            None => Entry::Running,
            Some(bytes) => Entry::Finished {
                result: stored::decode(version, &bytes)
                    .map_err(|source| JournalError::Stored { id, source })?,
                acked,
            },
        }))
    }

    /// Results the broker has not acknowledged yet, oldest first. An entry this agent
    /// cannot read (one a newer agent wrote, before a rollback) is logged and left where
    /// it is, so it does not hold back the others; a later agent that reads it sends it.
    pub fn unacked_results(&self) -> Result<Vec<CommandResult>, JournalError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, result, result_format FROM commands
             WHERE result IS NOT NULL AND acked = 0 ORDER BY rowid",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, u16>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, bytes, version) = row?;
            let id = Uuid::from_slice(&id).map_err(|e| JournalError::Corrupt(e.to_string()))?;
            match stored::decode(version, &bytes) {
                Ok(result) => out.push(result),
                Err(source) => tracing::error!(
                    %id,
                    error = %JournalError::Stored { id, source },
                    "not re-sending an unacknowledged result this agent cannot read"
                ),
            }
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

/// Adds `result_format` to a journal written before stored results had versions. Every
/// result such a journal holds is version 1, the column's default.
fn add_result_format(conn: &rusqlite::Connection) -> Result<(), JournalError> {
    let present: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('commands') WHERE name = 'result_format'",
        [],
        |r| r.get(0),
    )?;
    if !present {
        conn.execute_batch(
            "ALTER TABLE commands ADD COLUMN result_format INTEGER NOT NULL DEFAULT 1;",
        )?;
    }
    Ok(())
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

    /// A journal the agent before stored versions wrote (see the file's header).
    const BEFORE_VERSIONS: &str = include_str!("../fixtures/journal-before-versions.sql");

    /// The SQL that agent ran, verbatim (commit e7d0d95): what it does to a journal this
    /// agent has opened, after a rollback.
    const OLD_INSERT: &str = "INSERT INTO commands (id, operation, not_after_ms, received_at_ms) VALUES (?1, ?2, ?3, ?4)";
    const OLD_FINISH: &str = "UPDATE commands SET result = ?2 WHERE id = ?1";
    const OLD_UNACKED: &str =
        "SELECT result FROM commands WHERE result IS NOT NULL AND acked = 0 ORDER BY rowid";

    /// Result `n` (0..4) of the fixture, rebuilt as the program that wrote it built it.
    fn before_versions(n: u128) -> CommandResult {
        use dbvm_protocol::messages::RejectCode;
        let outcome = match n {
            0 => Outcome::Succeeded {
                output_json: r#"{"state":"running","port":25432}"#.into(),
            },
            1 => Outcome::Failed {
                message: "initdb failed: données invalides".into(),
            },
            2 => Outcome::Rejected {
                code: RejectCode::BadArguments,
                message: "refused: bad_arguments".into(),
            },
            _ => Outcome::Interrupted {
                message: "the agent stopped while db.create was running".into(),
            },
        };
        CommandResult {
            id: Uuid::from_u128(0x0123_4567_89ab_cdef_1111_0000_0000_0000 + n),
            outcome,
            started_at_ms: 1_700_000_000_000 + n as i64,
            finished_at_ms: 1_700_000_000_250 + n as i64,
        }
    }

    fn load(sql: &str, path: &Path) {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch(sql).unwrap();
    }

    fn stored_bytes(path: &Path, id: Uuid) -> Vec<u8> {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.query_row(
            "SELECT result FROM commands WHERE id = ?1",
            [id.as_bytes().as_slice()],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn opens_a_journal_the_agent_before_versions_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite3");
        load(BEFORE_VERSIONS, &path);
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(
            j.unacked_results().unwrap(),
            [before_versions(1), before_versions(2), before_versions(3)]
        );
        assert_eq!(
            j.entry(before_versions(0).id).unwrap(),
            Some(Entry::Finished {
                result: before_versions(0),
                acked: true
            })
        );
        let running = Uuid::from_u128(0x0123_4567_89ab_cdef_1111_0000_0000_00ff);
        assert_eq!(j.entry(running).unwrap(), Some(Entry::Running));
        assert_eq!(j.interrupt_unfinished().unwrap(), 1);
        let unacked = j.unacked_results().unwrap();
        assert_eq!(unacked.len(), 4);
        assert_eq!(unacked[3].id, running);
        assert!(matches!(unacked[3].outcome, Outcome::Interrupted { .. }));
        // Opening it again does not add the column twice.
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.unacked_results().unwrap().len(), 4);
    }

    #[test]
    fn the_agent_before_versions_reads_what_this_one_writes() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.sqlite3");
        load(BEFORE_VERSIONS, &old);
        let path = dir.path().join("j.sqlite3");
        let mut j = Journal::open(&path).unwrap();
        for n in 0..3 {
            let result = before_versions(n);
            let mut b = body();
            b.id = result.id;
            assert!(j.record_new(&b).unwrap());
            j.finish(&result).unwrap();
            // Byte for byte what that agent wrote for the same result, so it reads it.
            assert_eq!(stored_bytes(&path, b.id), stored_bytes(&old, b.id), "{n}");
        }
        drop(j);

        // Rolled back: that agent's own statements work on this journal, and what it
        // finishes reads after the next upgrade.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let fourth = before_versions(3);
        conn.execute(
            OLD_INSERT,
            rusqlite::params![fourth.id.as_bytes().as_slice(), "db.create", 10, 0],
        )
        .unwrap();
        conn.execute(
            OLD_FINISH,
            rusqlite::params![
                fourth.id.as_bytes().as_slice(),
                stored_bytes(&old, fourth.id)
            ],
        )
        .unwrap();
        let mut stmt = conn.prepare(OLD_UNACKED).unwrap();
        let old_reads: Vec<Vec<u8>> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let old_bytes: Vec<Vec<u8>> = (0..4)
            .map(|n| stored_bytes(&old, before_versions(n).id))
            .collect();
        assert_eq!(old_reads, old_bytes);
        drop(stmt);
        drop(conn);
        let j = Journal::open(&path).unwrap();
        let all: Vec<CommandResult> = (0..4).map(before_versions).collect();
        assert_eq!(j.unacked_results().unwrap(), all);
    }

    #[test]
    fn an_entry_this_agent_cannot_read_does_not_hold_back_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.sqlite3");
        let mut j = Journal::open(&path).unwrap();
        for n in 0..2 {
            let result = before_versions(n);
            let mut b = body();
            b.id = result.id;
            j.record_new(&b).unwrap();
            j.finish(&result).unwrap();
        }
        // As a newer agent would leave it before a rollback.
        let newer = before_versions(0).id;
        j.conn
            .execute(
                "UPDATE commands SET result_format = 2 WHERE id = ?1",
                [newer.as_bytes().as_slice()],
            )
            .unwrap();
        assert_eq!(j.unacked_results().unwrap(), [before_versions(1)]);
        let e = j.entry(newer).unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::Stored {
                    id,
                    source: StoredError::Newer { found: 2 }
                } if id == newer
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("written by a newer agent"), "{e}");
    }
}
