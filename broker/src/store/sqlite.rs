//! The SQLite backend of the [`Store`]: the embedded default, one file in the data dir.
//!
//! Writes go through one writer thread that batches everything waiting into one
//! transaction and one fsync (group commit): a caller's future resolves only after its
//! write is durable. Reads use their own connection (WAL lets them run beside the writer).
//! Checkpoints (copying the WAL back into the database file) run on a third connection
//! in their own thread: left to SQLite's automatic checkpoint, the commit that crosses
//! 1,000 WAL pages copies them all before it returns, and every caller of that batch waits.

use super::{
    AgentRecord, AgentRevocation, CommandFilter, CommandPosition, CommandRecord, EventPage, Finish,
    IssuedCertificate, RenewalRevoked, RevocationList, Store, StoreError, StoredEvent,
    TokenRefusal,
};
use async_trait::async_trait;
use dbvm_protocol::api::{
    BundleCopy, BundleInfo, BundleState, CommandError, CommandState, OperationClass, Progress,
};
use rusqlite::OptionalExtension;
use std::path::Path;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Backend(Box::new(e))
    }
}

type WriteJob = Box<dyn FnOnce(&rusqlite::Transaction<'_>) -> Box<dyn FnOnce() + Send> + Send>;

pub struct SqliteStore {
    writer: std::sync::mpsc::SyncSender<WriteJob>,
    reader: Arc<Mutex<rusqlite::Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS commands (
    id BLOB PRIMARY KEY,
    agent_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    class TEXT NOT NULL,
    state TEXT NOT NULL,
    signed BLOB NOT NULL,
    submitted_at_ms INTEGER NOT NULL,
    not_after_ms INTEGER NOT NULL,
    delivered_at_ms INTEGER,
    finished_at_ms INTEGER,
    progress_percent INTEGER,
    progress_message TEXT,
    output_json TEXT,
    error_code TEXT,
    error_message TEXT
);
-- Unfinished commands per agent. Every terminal state sets finished_at_ms, so unfinished
-- means finished_at_ms IS NULL: a test SQLite makes without the temporary b-tree that a
-- three-value IN list costs on every insert and update (a third of the writer's time).
CREATE INDEX IF NOT EXISTS commands_open ON commands(agent_id)
    WHERE finished_at_ms IS NULL;
-- GET /v1/commands, newest first: by agent, and across the fleet. Both end in the rowid,
-- which orders commands submitted in the same millisecond (and is the cursor's second
-- half). Neither column changes after the insert, so finishing a command never touches them.
CREATE INDEX IF NOT EXISTS commands_agent ON commands(agent_id, submitted_at_ms);
CREATE INDEX IF NOT EXISTS commands_time ON commands(submitted_at_ms);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    last_seen_ms INTEGER,
    agent_version TEXT,
    protocol TEXT,
    operations TEXT,
    capabilities TEXT,
    sealing_key TEXT,
    db_kind TEXT,
    cert_not_after_ms INTEGER
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    hash BLOB PRIMARY KEY,
    agent_id TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    used_at_ms INTEGER
);
-- Every agent certificate this broker issued, by the SHA-256 of its DER.
CREATE TABLE IF NOT EXISTS certificates (
    fingerprint BLOB PRIMARY KEY,
    agent_id TEXT NOT NULL,
    issued_at_ms INTEGER NOT NULL,
    not_after_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS certificates_agent ON certificates(agent_id);
-- The latest revocation of each agent ever revoked.
CREATE TABLE IF NOT EXISTS agent_revocations (
    agent_id TEXT PRIMARY KEY,
    revoked_at_ms INTEGER NOT NULL,
    reason TEXT
);
-- Log bundles: one per bundle.collect command (same id); the bytes are files under
-- <data_dir>/bundles (see bundles.rs).
CREATE TABLE IF NOT EXISTS bundles (
    id BLOB PRIMARY KEY,
    agent_id TEXT NOT NULL,
    state TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT,
    created_at_ms INTEGER NOT NULL,
    completed_at_ms INTEGER,
    -- Its copy in S3 (BundleCopy as JSON), when the broker has a bucket.
    s3 TEXT
);
-- The event log GET /v1/events resumes from. AUTOINCREMENT: an id is never given twice,
-- even after pruning emptied the table, so a client's Last-Event-ID stays meaningful.
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    command_id BLOB,
    data TEXT NOT NULL
);
";

fn open(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk when it returns (the WAL is fsynced at every commit).
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir/broker.sqlite3`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.to_path_buf(),
            source: Box::new(e),
        })?;
        let path = dir.join("broker.sqlite3");
        let mut wconn = open(&path)?;
        wconn.execute_batch(SCHEMA)?;
        migrate(&wconn)?;
        // The checkpointer thread does this work instead (see the note above).
        wconn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // After a checkpoint lets the WAL start over, keep at most this much of its file.
        wconn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
        let rconn = open(&path)?;
        let cconn = open(&path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<WriteJob>(8192);
        let (ctx, crx) = std::sync::mpsc::sync_channel::<()>(1);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_loop(&cconn, crx, done_tx))
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                source: format!("cannot start the store checkpoint thread: {e}").into(),
            })?;
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&mut wconn, rx, ctx, done_rx))
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                source: format!("cannot start the store writer thread: {e}").into(),
            })?;
        Ok(Self {
            writer: tx,
            reader: Arc::new(Mutex::new(rconn)),
        })
    }

    /// Runs `f` inside the next group-commit transaction; resolves after the commit.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T, StoreError>>();
        let job: WriteJob = Box::new(move |txn| {
            let result = f(txn);
            Box::new(move || {
                let _ = tx.send(result);
            })
        });
        let sender = self.writer.clone();
        // The channel is bounded: if the writer falls behind, block a pool thread, not the runtime.
        match sender.try_send(job) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(job)) => {
                tokio::task::spawn_blocking(move || sender.send(job))
                    .await
                    .map_err(|_| StoreError::Closed)?
                    .map_err(|_| StoreError::Closed)?;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(StoreError::Closed),
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().map_err(|_| StoreError::Closed)?;
            f(&conn)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }
}

/// Brings a store made by an earlier broker up to the current schema.
fn migrate(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    let old_index: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'commands_unfinished')",
        [],
        |r| r.get(0),
    )?;
    let bundles_s3: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('bundles') WHERE name = 's3')",
        [],
        |r| r.get(0),
    )?;
    if !bundles_s3 {
        // Bundles recorded before the broker could copy them to S3.
        conn.execute_batch("ALTER TABLE bundles ADD COLUMN s3 TEXT;")?;
    }
    if old_index {
        // The index by state gave way to commands_open (by finished_at_ms); a finished
        // command always had its time, but make sure before relying on it.
        conn.execute_batch(
            "BEGIN;
             UPDATE commands SET finished_at_ms = submitted_at_ms
                 WHERE finished_at_ms IS NULL AND state NOT IN ('queued', 'delivered', 'running');
             DROP INDEX commands_unfinished;
             COMMIT;",
        )?;
    }
    Ok(())
}

/// The WAL file is cut back to this size when it starts over after a checkpoint.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 << 20;
/// The writer asks for a checkpoint after this many commits; the checkpointer also runs
/// once a second when anything was committed.
const CHECKPOINT_EVERY_COMMITS: u32 = 200;
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Copies committed WAL pages into the database file beside the writer (PASSIVE: it never
/// blocks the writer or a reader). Ends when the writer does, after a last checkpoint.
///
/// The WAL starts over only when a write transaction begins with every frame copied,
/// which under a steady stream of commits never happens on its own: frames keep arriving
/// while this thread copies, and the WAL grew without end (25 MB/s in the relay
/// benchmark). So after each run it tells the writer, which copies the few frames
/// committed meanwhile itself, between two batches (see `writer_loop`); its next commit
/// then rewrites the WAL from the start.
fn checkpoint_loop(
    conn: &rusqlite::Connection,
    rx: std::sync::mpsc::Receiver<()>,
    done: std::sync::mpsc::SyncSender<()>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let last = match rx.recv_timeout(CHECKPOINT_INTERVAL) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        match checkpoint(conn) {
            Ok((wal, copied)) => {
                tracing::trace!(wal, copied, "store: checkpoint");
                if wal > 0 {
                    // Full means the writer has not taken the last one yet.
                    let _ = done.try_send(());
                }
            }
            Err(e) => tracing::warn!(error = %e, "store: checkpoint failed; retrying later"),
        }
        if last {
            return;
        }
    }
}

/// One PASSIVE checkpoint: (frames in the WAL, frames copied into the database).
fn checkpoint(conn: &rusqlite::Connection) -> rusqlite::Result<(i64, i64)> {
    // The first column ("busy") only says another checkpoint was running.
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    })
}

fn writer_loop(
    conn: &mut rusqlite::Connection,
    rx: std::sync::mpsc::Receiver<WriteJob>,
    checkpoint_now: std::sync::mpsc::SyncSender<()>,
    checkpoint_done: std::sync::mpsc::Receiver<()>,
) {
    let mut commits = 0u32;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let txn = match conn.transaction() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "store: cannot begin a transaction");
                continue; // dropping the jobs resolves their callers with Closed
            }
        };
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch {
            // A failing statement (say, a duplicate id) is rolled back alone by SQLite;
            // the other writes of the batch stay in the transaction.
            replies.push(job(&txn));
        }
        match txn.commit() {
            Ok(()) => {
                replies.into_iter().for_each(|reply| reply());
                commits += 1;
                if commits >= CHECKPOINT_EVERY_COMMITS {
                    commits = 0;
                    // Full means one is already asked for.
                    let _ = checkpoint_now.try_send(());
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store: commit failed; the batch is lost and its callers get an error");
                drop(replies);
            }
        }
        // The checkpoint thread copied the bulk; copy what was committed meanwhile (a
        // few pages, after this batch has had its answers) so the WAL can start over.
        if checkpoint_done.try_recv().is_ok() {
            if let Err(e) = checkpoint(conn) {
                tracing::warn!(error = %e, "store: checkpoint failed; retrying later");
            }
        }
    }
}

fn class_from(s: &str) -> OperationClass {
    OperationClass::ALL
        .into_iter()
        .find(|c| c.as_str() == s)
        .unwrap_or(OperationClass::Management)
}

fn uuid_from(bytes: Vec<u8>) -> Result<Uuid, StoreError> {
    Uuid::from_slice(&bytes).map_err(|e| StoreError::Corrupt(format!("command id: {e}")))
}

const COMMAND_COLUMNS: &str = "id, agent_id, operation, class, state, signed, submitted_at_ms, not_after_ms,
    delivered_at_ms, finished_at_ms, progress_percent, progress_message, output_json, error_code, error_message";

fn command_from_row(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<Result<CommandRecord, StoreError>> {
    command_from_row_at(row, 0)
}

/// A command from [`COMMAND_COLUMNS`] starting at column `at`.
fn command_from_row_at(
    row: &rusqlite::Row<'_>,
    at: usize,
) -> rusqlite::Result<Result<CommandRecord, StoreError>> {
    let id: Vec<u8> = row.get(at)?;
    let state: String = row.get(at + 4)?;
    let percent: Option<u8> = row.get(at + 10)?;
    let message: Option<String> = row.get(at + 11)?;
    let code: Option<String> = row.get(at + 13)?;
    let error_message: Option<String> = row.get(at + 14)?;
    let class: String = row.get(at + 3)?;
    let rec = (|| {
        Ok(CommandRecord {
            id: uuid_from(id)?,
            agent_id: row.get(at + 1)?,
            operation: row.get(at + 2)?,
            class: class_from(&class),
            state: CommandState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("command state {state:?}")))?,
            signed: row.get(at + 5)?,
            submitted_at_ms: row.get(at + 6)?,
            not_after_ms: row.get(at + 7)?,
            delivered_at_ms: row.get(at + 8)?,
            finished_at_ms: row.get(at + 9)?,
            progress: percent.map(|percent| Progress {
                percent,
                message: message.unwrap_or_default(),
            }),
            output_json: row.get(at + 12)?,
            error: code.map(|code| CommandError {
                code,
                message: error_message.unwrap_or_default(),
            }),
        })
    })();
    Ok(rec)
}

fn agent_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRecord> {
    let ops: Option<String> = row.get(4)?;
    let caps: Option<String> = row.get(5)?;
    Ok(AgentRecord {
        id: row.get(0)?,
        last_seen_ms: row.get(1)?,
        agent_version: row.get(2)?,
        protocol: row.get(3)?,
        operations: ops
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
        capabilities: caps
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
        sealing_key: row.get(6)?,
        db_kind: row.get(7)?,
        cert_not_after_ms: row.get(8)?,
    })
}

fn in_list(states: &[CommandState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_command(&self, rec: CommandRecord) -> Result<(), StoreError> {
        self.write(move |txn| {
            // Cached statements: re-parsing the SQL was ~18% of the writer thread's time.
            let mut stmt = txn.prepare_cached(
                "INSERT INTO commands (id, agent_id, operation, class, state, signed, submitted_at_ms, not_after_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            let res = stmt.execute(
                rusqlite::params![
                    rec.id.as_bytes().as_slice(),
                    rec.agent_id,
                    rec.operation,
                    rec.class.as_str(),
                    rec.state.as_str(),
                    rec.signed,
                    rec.submitted_at_ms,
                    rec.not_after_ms,
                ],
            );
            match res {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::Conflict(rec.id))
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    async fn command(&self, id: Uuid) -> Result<Option<CommandRecord>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?1"
            ))?;
            let mut rows = stmt.query([id.as_bytes().as_slice()])?;
            match rows.next()? {
                Some(row) => command_from_row(row)?.map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn unfinished_for_agent(&self, agent: &str) -> Result<Vec<CommandRecord>, StoreError> {
        let agent = agent.to_string();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands
                 WHERE agent_id = ?1 AND finished_at_ms IS NULL ORDER BY rowid"
            ))?;
            let rows = stmt.query_map([agent], command_from_row)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row??);
            }
            Ok(out)
        })
        .await
    }

    async fn unfinished(&self) -> Result<Vec<(Uuid, OperationClass)>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare("SELECT id, class FROM commands WHERE finished_at_ms IS NULL")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, class) = row?;
                out.push((uuid_from(id)?, class_from(&class)));
            }
            Ok(out)
        })
        .await
    }

    async fn transition(
        &self,
        id: Uuid,
        from: &[CommandState],
        state: CommandState,
        delivered_at_ms: Option<i64>,
    ) -> Result<bool, StoreError> {
        let from = in_list(from);
        self.write(move |txn| {
            let mut stmt = txn.prepare_cached(&format!(
                "UPDATE commands SET state = ?2, delivered_at_ms = COALESCE(delivered_at_ms, ?3)
                 WHERE id = ?1 AND state IN ({from})"
            ))?;
            let n = stmt.execute(rusqlite::params![
                id.as_bytes().as_slice(),
                state.as_str(),
                delivered_at_ms
            ])?;
            Ok(n > 0)
        })
        .await
    }

    async fn progress(&self, id: Uuid, progress: Progress) -> Result<(), StoreError> {
        self.write(move |txn| {
            txn.prepare_cached(
                // Any unfinished command: the `delivered` / `running` marks are written only
                // 200 ms after the event, and progress sent sooner must not be lost.
                "UPDATE commands SET progress_percent = ?2, progress_message = ?3
                 WHERE id = ?1 AND finished_at_ms IS NULL",
            )?
            .execute(rusqlite::params![
                id.as_bytes().as_slice(),
                progress.percent,
                progress.message
            ])?;
            Ok(())
        })
        .await
    }

    async fn finish(&self, id: Uuid, finish: Finish) -> Result<Option<CommandRecord>, StoreError> {
        self.write(move |txn| {
            let mut stmt = txn.prepare_cached(&format!(
                "UPDATE commands SET state = ?2, finished_at_ms = ?3, output_json = ?4, error_code = ?5, error_message = ?6,
                     delivered_at_ms = COALESCE(delivered_at_ms, ?7)
                 WHERE id = ?1 AND finished_at_ms IS NULL RETURNING {COMMAND_COLUMNS}",
            ))?;
            let mut rows = stmt.query(
                rusqlite::params![
                    id.as_bytes().as_slice(),
                    finish.state.as_str(),
                    finish.finished_at_ms,
                    finish.output_json,
                    finish.error.as_ref().map(|e| e.code.clone()),
                    finish.error.as_ref().map(|e| e.message.clone()),
                    finish.delivered_at_ms,
                ],
            )?;
            match rows.next()? {
                Some(row) => command_from_row(row)?.map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn expire_due(&self, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError> {
        // Only commands never handed to the agent expire here: one the agent holds
        // finishes (or is refused as expired) on the agent and reports back.
        let due = self
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands WHERE state = 'queued' AND not_after_ms < ?1"
                ))?;
                let rows = stmt.query_map([now_ms], command_from_row)?;
                let mut out = Vec::new();
                for row in rows {
                    out.push(row??);
                }
                Ok(out)
            })
            .await?;
        let mut expired = Vec::new();
        for mut rec in due {
            let finish = Finish {
                state: CommandState::Expired,
                finished_at_ms: now_ms,
                delivered_at_ms: None,
                output_json: None,
                error: Some(CommandError {
                    code: "expired".into(),
                    message: format!(
                        "command expired before agent {} could take it (not after {} ms)",
                        rec.agent_id, rec.not_after_ms
                    ),
                }),
            };
            let id = rec.id;
            let f = finish.clone();
            let moved = self
                .write(move |txn| {
                    let n = txn.execute(
                        "UPDATE commands SET state = 'expired', finished_at_ms = ?2, error_code = ?3, error_message = ?4
                         WHERE id = ?1 AND state = 'queued'",
                        rusqlite::params![
                            id.as_bytes().as_slice(),
                            f.finished_at_ms,
                            f.error.as_ref().map(|e| e.code.clone()),
                            f.error.as_ref().map(|e| e.message.clone())
                        ],
                    )?;
                    Ok(n > 0)
                })
                .await?;
            if moved {
                rec.state = CommandState::Expired;
                rec.finished_at_ms = Some(now_ms);
                rec.error = finish.error;
                expired.push(rec);
            }
        }
        Ok(expired)
    }

    async fn commands(
        &self,
        filter: CommandFilter,
        limit: usize,
    ) -> Result<Vec<(CommandPosition, CommandRecord)>, StoreError> {
        self.read(move |conn| {
            use rusqlite::types::Value;
            let mut clauses: Vec<String> = Vec::new();
            let mut params: Vec<Value> = Vec::new();
            let mut param = |v: Value| {
                params.push(v);
                format!("?{}", params.len())
            };
            let by_agent = filter.agent_id.is_some();
            if let Some(a) = filter.agent_id {
                clauses.push(format!("agent_id = {}", param(Value::Text(a))));
            }
            // Only unfinished states: the partial index of unfinished commands holds
            // them all (a few per agent), so the page never walks the agent's history.
            let unfinished =
                !filter.states.is_empty() && filter.states.iter().all(|s| !s.is_terminal());
            let index = if unfinished && by_agent {
                "INDEXED BY commands_open"
            } else {
                ""
            };
            if unfinished {
                clauses.push("finished_at_ms IS NULL".into());
            }
            if !filter.states.is_empty() {
                // Known words only (CommandState::as_str): safe to inline.
                clauses.push(format!("state IN ({})", in_list(&filter.states)));
            }
            if let Some(op) = filter.operation {
                clauses.push(format!("operation = {}", param(Value::Text(op))));
            }
            if let Some(ms) = filter.since_ms {
                clauses.push(format!("submitted_at_ms >= {}", param(Value::Integer(ms))));
            }
            if let Some(ms) = filter.until_ms {
                clauses.push(format!("submitted_at_ms < {}", param(Value::Integer(ms))));
            }
            if let Some(p) = filter.before {
                // A range on the index (<=), then the tie-break inside that millisecond.
                let ms = param(Value::Integer(p.submitted_at_ms));
                let seq = param(Value::Integer(p.seq));
                clauses.push(format!(
                    "submitted_at_ms <= {ms} AND (submitted_at_ms < {ms} OR rowid < {seq})"
                ));
            }
            let limit = param(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
            let sql = format!(
                "SELECT rowid, {COMMAND_COLUMNS} FROM commands {index} {} {}
                 ORDER BY submitted_at_ms DESC, rowid DESC LIMIT {limit}",
                if clauses.is_empty() { "" } else { "WHERE" },
                clauses.join(" AND "),
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let seq: i64 = row.get(0)?;
                let rec = command_from_row_at(row, 1)??;
                let pos = CommandPosition {
                    submitted_at_ms: rec.submitted_at_ms,
                    seq,
                };
                out.push((pos, rec));
            }
            Ok(out)
        })
        .await
    }

    async fn cancel(
        &self,
        id: Uuid,
        at_ms: i64,
        error: CommandError,
    ) -> Result<Option<CommandRecord>, StoreError> {
        self.write(move |txn| {
            let mut stmt = txn.prepare_cached(&format!(
                "UPDATE commands SET state = 'cancelled', finished_at_ms = ?2, error_code = ?3, error_message = ?4
                 WHERE id = ?1 AND state = 'queued' RETURNING {COMMAND_COLUMNS}",
            ))?;
            let mut rows = stmt.query(rusqlite::params![
                id.as_bytes().as_slice(),
                at_ms,
                error.code,
                error.message
            ])?;
            match rows.next()? {
                Some(row) => command_from_row(row)?.map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn append_events(
        &self,
        mut events: Vec<StoredEvent>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.write(move |txn| {
            let mut stmt = txn.prepare_cached(
                "INSERT INTO events (at_ms, kind, agent_id, command_id, data) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for e in &mut events {
                stmt.execute(rusqlite::params![
                    e.at_ms,
                    e.kind,
                    e.agent_id,
                    e.command_id.map(|id| id.as_bytes().to_vec()),
                    e.data.to_string(),
                ])?;
                e.seq = u64::try_from(txn.last_insert_rowid())
                    .map_err(|_| StoreError::Corrupt("negative event id".into()))?;
            }
            Ok(events)
        })
        .await
    }

    async fn events_after(
        &self,
        after: u64,
        agent: Option<String>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.read(move |conn| {
            // One read transaction: the page and the bounds are the same snapshot, so a
            // prune between them cannot hide a gap from the caller.
            let txn = conn.unchecked_transaction()?;
            let after = i64::try_from(after).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut stmt = txn.prepare_cached(
                "SELECT id, at_ms, kind, agent_id, command_id, data FROM events
                 WHERE id > ?1 AND (?2 IS NULL OR agent_id = ?2) ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt.query_map(rusqlite::params![after, agent, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?;
            let mut events = Vec::new();
            for row in rows {
                let (id, at_ms, kind, agent_id, command_id, data) = row?;
                events.push(StoredEvent {
                    seq: u64::try_from(id)
                        .map_err(|_| StoreError::Corrupt("negative event id".into()))?,
                    at_ms,
                    kind,
                    agent_id,
                    command_id: command_id.map(uuid_from).transpose()?,
                    data: serde_json::from_str(&data)
                        .map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?,
                });
            }
            drop(stmt);
            let oldest: Option<i64> =
                txn.query_row("SELECT MIN(id) FROM events", [], |r| r.get(0))?;
            // sqlite_sequence keeps the last id given even when the table is empty.
            let last: Option<i64> = txn
                .query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            txn.commit()?;
            let u = |v: i64| u64::try_from(v).unwrap_or(0);
            Ok(EventPage {
                events,
                oldest: oldest.map(u),
                last_given: last.map(u).unwrap_or(0),
            })
        })
        .await
    }

    async fn prune_events(
        &self,
        keep: u64,
        before_ms: i64,
        max_rows: u64,
    ) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let (oldest, last): (Option<i64>, Option<i64>) =
                txn.query_row("SELECT MIN(id), MAX(id) FROM events", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let (Some(oldest), Some(last)) = (oldest, last) else {
                return Ok(0);
            };
            let by_count = last.saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX));
            // Only the oldest `max_rows` ids are looked at: ids rise with time, so an
            // event young enough there means none after it is old.
            let upper = oldest.saturating_add(i64::try_from(max_rows).unwrap_or(i64::MAX) - 1);
            let n = txn.execute(
                "DELETE FROM events WHERE id <= ?1 AND (id <= ?2 OR at_ms < ?3)",
                rusqlite::params![upper, by_count, before_ms],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn upsert_agent(&self, rec: AgentRecord) -> Result<(), StoreError> {
        self.write(move |txn| {
            txn.execute(
                "INSERT INTO agents (id, last_seen_ms, agent_version, protocol, operations, capabilities, sealing_key, db_kind, cert_not_after_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, agent_version = excluded.agent_version,
                   protocol = excluded.protocol, operations = excluded.operations, capabilities = excluded.capabilities,
                   sealing_key = excluded.sealing_key, db_kind = excluded.db_kind,
                   cert_not_after_ms = COALESCE(excluded.cert_not_after_ms, cert_not_after_ms)",
                rusqlite::params![
                    rec.id,
                    rec.last_seen_ms,
                    rec.agent_version,
                    rec.protocol,
                    serde_json::to_string(&rec.operations).unwrap_or_default(),
                    serde_json::to_string(&rec.capabilities).unwrap_or_default(),
                    rec.sealing_key,
                    rec.db_kind,
                    rec.cert_not_after_ms
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn touch_agent(&self, id: &str, last_seen_ms: i64) -> Result<(), StoreError> {
        let id = id.to_string();
        self.write(move |txn| {
            txn.execute(
                "UPDATE agents SET last_seen_ms = ?2 WHERE id = ?1",
                rusqlite::params![id, last_seen_ms],
            )?;
            Ok(())
        })
        .await
    }

    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, last_seen_ms, agent_version, protocol, operations, capabilities, sealing_key, db_kind, cert_not_after_ms
                 FROM agents ORDER BY id",
            )?;
            let rows = stmt.query_map([], agent_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn queued_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT agent_id, COUNT(*) FROM commands WHERE finished_at_ms IS NULL GROUP BY agent_id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn insert_token(
        &self,
        hash: [u8; 32],
        agent: &str,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        let agent = agent.to_string();
        self.write(move |txn| {
            txn.execute(
                "INSERT INTO enrollment_tokens (hash, agent_id, expires_at_ms) VALUES (?1, ?2, ?3)",
                rusqlite::params![hash.as_slice(), agent, expires_at_ms],
            )?;
            Ok(())
        })
        .await
    }

    async fn consume_token(
        &self,
        hash: [u8; 32],
        agent: &str,
        now_ms: i64,
        cert: IssuedCertificate,
    ) -> Result<Result<(), TokenRefusal>, StoreError> {
        let agent = agent.to_string();
        self.write(move |txn| {
            let row: Option<(String, i64, Option<i64>)> = {
                let mut stmt = txn.prepare_cached(
                    "SELECT agent_id, expires_at_ms, used_at_ms FROM enrollment_tokens WHERE hash = ?1",
                )?;
                let mut rows = stmt.query([hash.as_slice()])?;
                match rows.next()? {
                    Some(r) => Some((r.get(0)?, r.get(1)?, r.get(2)?)),
                    None => None,
                }
            };
            let Some((token_agent, expires, used)) = row else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            if used.is_some() {
                return Ok(Err(TokenRefusal::Used));
            }
            if now_ms > expires {
                return Ok(Err(TokenRefusal::Expired));
            }
            if token_agent != agent {
                return Ok(Err(TokenRefusal::OtherAgent(token_agent)));
            }
            txn.execute(
                "UPDATE enrollment_tokens SET used_at_ms = ?2 WHERE hash = ?1",
                rusqlite::params![hash.as_slice(), now_ms],
            )?;
            insert_certificate(txn, &cert)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn record_renewal(
        &self,
        cert: IssuedCertificate,
        renews: ([u8; 32], i64),
    ) -> Result<Result<(), RenewalRevoked>, StoreError> {
        self.write(move |txn| {
            let (fingerprint, not_before_ms) = renews;
            let recorded: Option<Option<i64>> = txn
                .prepare_cached("SELECT revoked_at_ms FROM certificates WHERE fingerprint = ?1")?
                .query_row([fingerprint.as_slice()], |r| r.get(0))
                .optional()?;
            let revoked_at = match recorded {
                Some(revoked_at) => revoked_at,
                // Not issued by this broker's records: revoked when the agent was revoked
                // after it was issued.
                None => txn
                    .prepare_cached(
                        "SELECT revoked_at_ms FROM agent_revocations WHERE agent_id = ?1 AND revoked_at_ms > ?2",
                    )?
                    .query_row(rusqlite::params![cert.agent_id, not_before_ms], |r| r.get(0))
                    .optional()?,
            };
            if let Some(at) = revoked_at {
                return Ok(Err(RenewalRevoked(at)));
            }
            insert_certificate(txn, &cert)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn revoke_agent(
        &self,
        agent: &str,
        at_ms: i64,
        reason: Option<String>,
    ) -> Result<Vec<IssuedCertificate>, StoreError> {
        let agent = agent.to_string();
        self.write(move |txn| {
            let revoked = {
                let mut stmt = txn.prepare_cached(&format!(
                    "UPDATE certificates SET revoked_at_ms = ?2
                     WHERE agent_id = ?1 AND revoked_at_ms IS NULL RETURNING {CERT_COLUMNS}"
                ))?;
                let rows = stmt.query_map(rusqlite::params![agent, at_ms], certificate_from_row)?;
                let mut out = Vec::new();
                for row in rows {
                    let c = row??;
                    if c.not_after_ms > at_ms {
                        out.push(c);
                    }
                }
                out
            };
            txn.execute(
                "INSERT INTO agent_revocations (agent_id, revoked_at_ms, reason) VALUES (?1, ?2, ?3)
                 ON CONFLICT(agent_id) DO UPDATE SET revoked_at_ms = excluded.revoked_at_ms, reason = excluded.reason",
                rusqlite::params![agent, at_ms, reason],
            )?;
            Ok(revoked)
        })
        .await
    }

    async fn revocations(&self, now_ms: i64) -> Result<RevocationList, StoreError> {
        self.read(move |conn| {
            let mut list = RevocationList::default();
            let mut stmt = conn.prepare(
                "SELECT fingerprint, not_after_ms FROM certificates
                 WHERE revoked_at_ms IS NOT NULL AND not_after_ms > ?1",
            )?;
            let rows = stmt.query_map([now_ms], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (fp, not_after) = row?;
                list.certificates.push((fingerprint_from(fp)?, not_after));
            }
            let mut stmt =
                conn.prepare("SELECT agent_id, revoked_at_ms, reason FROM agent_revocations")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    AgentRevocation {
                        revoked_at_ms: r.get(1)?,
                        reason: r.get(2)?,
                    },
                ))
            })?;
            list.agents = rows.collect::<Result<Vec<_>, _>>()?;
            Ok(list)
        })
        .await
    }

    async fn certificate(
        &self,
        fingerprint: [u8; 32],
    ) -> Result<Option<IssuedCertificate>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {CERT_COLUMNS} FROM certificates WHERE fingerprint = ?1"
            ))?;
            let mut rows = stmt.query([fingerprint.as_slice()])?;
            match rows.next()? {
                Some(row) => certificate_from_row(row)?.map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn certificates(&self, agent: &str) -> Result<Vec<IssuedCertificate>, StoreError> {
        let agent = agent.to_string();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {CERT_COLUMNS} FROM certificates WHERE agent_id = ?1 ORDER BY issued_at_ms, rowid"
            ))?;
            let rows = stmt.query_map([agent], certificate_from_row)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row??);
            }
            Ok(out)
        })
        .await
    }

    async fn prune_certificates(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let n = txn.execute(
                "DELETE FROM certificates WHERE not_after_ms < ?1",
                [before_ms],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn put_bundle(&self, b: BundleInfo) -> Result<(), StoreError> {
        self.write(move |txn| {
            txn.execute(
                "INSERT INTO bundles (id, agent_id, state, size, sha256, created_at_ms, completed_at_ms, s3)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(id) DO UPDATE SET state = excluded.state, size = excluded.size,
                   sha256 = excluded.sha256, completed_at_ms = excluded.completed_at_ms,
                   s3 = excluded.s3",
                rusqlite::params![
                    b.id.as_bytes().as_slice(),
                    b.agent_id,
                    b.state.as_str(),
                    i64::try_from(b.size).unwrap_or(i64::MAX),
                    b.sha256,
                    b.created_at_ms,
                    b.completed_at_ms,
                    copy_json(b.s3.as_ref())?
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn bundle(&self, id: Uuid) -> Result<Option<BundleInfo>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {BUNDLE_COLUMNS} FROM bundles WHERE id = ?1"
            ))?;
            let mut rows = stmt.query([id.as_bytes().as_slice()])?;
            match rows.next()? {
                Some(row) => Ok(Some(bundle_from_row(row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn bundles(&self) -> Result<Vec<BundleInfo>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {BUNDLE_COLUMNS} FROM bundles ORDER BY created_at_ms DESC, id"
            ))?;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(bundle_from_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn stats(&self) -> Result<serde_json::Value, StoreError> {
        self.read(Self::read_stats).await
    }

    async fn put_bundle_copy(&self, id: Uuid, copy: BundleCopy) -> Result<bool, StoreError> {
        self.write(move |txn| {
            let n = txn.execute(
                "UPDATE bundles SET s3 = ?2 WHERE id = ?1",
                rusqlite::params![id.as_bytes().as_slice(), copy_json(Some(&copy))?],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_bundle(&self, id: Uuid) -> Result<bool, StoreError> {
        self.write(move |txn| {
            let n = txn.execute(
                "DELETE FROM bundles WHERE id = ?1",
                [id.as_bytes().as_slice()],
            )?;
            Ok(n > 0)
        })
        .await
    }
}

impl SqliteStore {
    /// Counts by table (commands by state and operation class), read in one go.
    fn read_stats(conn: &rusqlite::Connection) -> Result<serde_json::Value, StoreError> {
        let mut commands = serde_json::Map::new();
        let mut stmt = conn.prepare_cached(
            "SELECT state, class, COUNT(*) FROM commands GROUP BY state, class ORDER BY state, class",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (state, class, n) = row?;
            commands.insert(format!("{state}/{class}"), n.into());
        }
        let count = |table: &str| -> Result<i64, StoreError> {
            Ok(conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?)
        };
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(serde_json::json!({
            "commands_by_state_and_class": commands,
            "agents": count("agents")?,
            // Not "enrollment_tokens": a key with a secret word is redacted in a bundle.
            "enrollments": count("enrollment_tokens")?,
            "certificates": count("certificates")?,
            "agent_revocations": count("agent_revocations")?,
            "bundles": count("bundles")?,
            "database_bytes": pages * page_size,
        }))
    }
}

const BUNDLE_COLUMNS: &str =
    "id, agent_id, state, size, sha256, created_at_ms, completed_at_ms, s3";

fn copy_json(copy: Option<&BundleCopy>) -> Result<Option<String>, StoreError> {
    copy.map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("bundle copy: {e}")))
}

fn bundle_from_row(row: &rusqlite::Row<'_>) -> Result<BundleInfo, StoreError> {
    let id = Uuid::from_slice(&row.get::<_, Vec<u8>>(0)?)
        .map_err(|e| StoreError::Corrupt(format!("bundle id: {e}")))?;
    let state = match row.get::<_, String>(2)?.as_str() {
        "uploading" => BundleState::Uploading,
        "complete" => BundleState::Complete,
        other => return Err(StoreError::Corrupt(format!("bundle state {other:?}"))),
    };
    Ok(BundleInfo {
        id,
        agent_id: row.get(1)?,
        state,
        size: u64::try_from(row.get::<_, i64>(3)?).unwrap_or_default(),
        sha256: row.get(4)?,
        created_at_ms: row.get(5)?,
        completed_at_ms: row.get(6)?,
        s3: match row.get::<_, Option<String>>(7)? {
            None => None,
            Some(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("bundle copy {text:?}: {e}")))?,
            ),
        },
    })
}

const CERT_COLUMNS: &str = "fingerprint, agent_id, issued_at_ms, not_after_ms, revoked_at_ms";

fn fingerprint_from(bytes: Vec<u8>) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        StoreError::Corrupt(format!(
            "certificate fingerprint of {} bytes, not 32",
            bytes.len()
        ))
    })
}

fn certificate_from_row(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<Result<IssuedCertificate, StoreError>> {
    let fingerprint: Vec<u8> = row.get(0)?;
    let agent_id: String = row.get(1)?;
    let issued_at_ms: i64 = row.get(2)?;
    let not_after_ms: i64 = row.get(3)?;
    let revoked_at_ms: Option<i64> = row.get(4)?;
    Ok(
        fingerprint_from(fingerprint).map(|fingerprint| IssuedCertificate {
            fingerprint,
            agent_id,
            issued_at_ms,
            not_after_ms,
            revoked_at_ms,
        }),
    )
}

fn insert_certificate(
    txn: &rusqlite::Transaction<'_>,
    cert: &IssuedCertificate,
) -> Result<(), StoreError> {
    txn.prepare_cached(
        "INSERT INTO certificates (fingerprint, agent_id, issued_at_ms, not_after_ms, revoked_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(rusqlite::params![
        cert.fingerprint.as_slice(),
        cert.agent_id,
        cert.issued_at_ms,
        cert.not_after_ms,
        cert.revoked_at_ms
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(agent: &str, not_after: i64) -> CommandRecord {
        CommandRecord {
            id: Uuid::new_v4(),
            agent_id: agent.into(),
            operation: "ping".into(),
            class: OperationClass::Query,
            state: CommandState::Queued,
            signed: vec![1, 2, 3],
            submitted_at_ms: 1,
            not_after_ms: not_after,
            delivered_at_ms: None,
            finished_at_ms: None,
            progress: None,
            output_json: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn a_store_from_before_the_open_commands_index_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let (open_id, done_id) = (Uuid::new_v4(), Uuid::new_v4());
        {
            // The earlier schema: unfinished commands indexed by state.
            let conn = rusqlite::Connection::open(dir.path().join("broker.sqlite3")).unwrap();
            let old = SCHEMA.replace(
                "CREATE INDEX IF NOT EXISTS commands_open ON commands(agent_id)\n    WHERE finished_at_ms IS NULL;",
                "CREATE INDEX commands_unfinished ON commands(agent_id) WHERE state IN ('queued', 'delivered', 'running');",
            );
            assert_ne!(old, SCHEMA, "the test must build the old schema");
            conn.execute_batch(&old).unwrap();
            for (id, state) in [(open_id, "delivered"), (done_id, "succeeded")] {
                conn.execute(
                    "INSERT INTO commands (id, agent_id, operation, class, state, signed, submitted_at_ms, not_after_ms)
                     VALUES (?1, 'db1', 'ping', 'query', ?2, x'01', 5, 99)",
                    rusqlite::params![id.as_bytes().as_slice(), state],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let open: Vec<Uuid> = store
            .unfinished()
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(open, vec![open_id]);
        let recs = store.unfinished_for_agent("db1").await.unwrap();
        assert_eq!(recs.iter().map(|r| r.id).collect::<Vec<_>>(), vec![open_id]);
        let done = store.command(done_id).await.unwrap().unwrap();
        assert_eq!(done.finished_at_ms, Some(5));
        let indexes: Vec<String> = store
            .read(|c| {
                let mut st = c.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'commands' AND sql IS NOT NULL")?;
                let names = st.query_map([], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
                Ok(names)
            })
            .await
            .unwrap();
        let mut indexes = indexes;
        indexes.sort();
        assert_eq!(
            indexes,
            ["commands_agent", "commands_open", "commands_time"].map(String::from)
        );
        drop(store);
        // Opening again changes nothing.
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.unfinished().await.unwrap().len(), 1);
    }

    /// The WAL header's checkpoint sequence number: SQLite adds one each time the WAL
    /// starts over from its beginning (0 before the first write).
    fn wal_restarts(dir: &Path) -> u32 {
        let wal = std::fs::read(dir.join("broker.sqlite3-wal")).unwrap_or_default();
        wal.get(12..16)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_a_steady_stream_of_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        // Writers that never pause: a background checkpoint alone never finds every
        // frame copied when a transaction begins, and the WAL would only grow. They write
        // until the WAL has started over three times (the header says so, whatever the
        // machine's speed: a WAL size after a fixed number of writes depended on how
        // many commits the load on the machine let them group into).
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for t in 0..16 {
            let (store, stop) = (store.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = rec(&format!("db{t}"), i64::MAX);
                    let id = r.id;
                    store.insert_command(r).await.unwrap();
                    let finish = Finish {
                        state: CommandState::Succeeded,
                        finished_at_ms: 2,
                        delivered_at_ms: Some(1),
                        output_json: Some("{}".into()),
                        error: None,
                    };
                    assert!(store.finish(id, finish).await.unwrap().is_some());
                }
            }));
        }
        let started = std::time::Instant::now();
        let mut restarts = 0;
        while restarts < 3 && started.elapsed() < std::time::Duration::from_secs(60) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            restarts = wal_restarts(dir.path());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            restarts >= 3,
            "the WAL started over {restarts} times in 60 s of steady commits"
        );
        assert!(store.unfinished().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn progress_is_kept_before_the_delivered_mark_and_not_after_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let r = rec("db1", i64::MAX);
        let id = r.id;
        store.insert_command(r).await.unwrap();
        // Still `queued` in the store: the delivered mark comes 200 ms after delivery.
        let early = Progress {
            percent: 5,
            message: "container engine unreachable, retrying".into(),
        };
        store.progress(id, early.clone()).await.unwrap();
        assert_eq!(
            store.command(id).await.unwrap().unwrap().progress,
            Some(early)
        );
        let finish = Finish {
            state: CommandState::Succeeded,
            finished_at_ms: 2,
            delivered_at_ms: Some(1),
            output_json: Some("{}".into()),
            error: None,
        };
        store.finish(id, finish).await.unwrap();
        let late = Progress {
            percent: 99,
            message: "late".into(),
        };
        store.progress(id, late).await.unwrap();
        assert_eq!(
            store
                .command(id)
                .await
                .unwrap()
                .unwrap()
                .progress
                .map(|p| p.percent),
            Some(5),
            "a finished command keeps its last progress"
        );
    }

    #[tokio::test]
    async fn commands_survive_reopening_and_finish_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = rec("db1", i64::MAX);
        let b = rec("db1", 10);
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            store.insert_command(a.clone()).await.unwrap();
            store.insert_command(b.clone()).await.unwrap();
            assert!(matches!(
                store.insert_command(a.clone()).await,
                Err(StoreError::Conflict(_))
            ));
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let pending = store.unfinished_for_agent("db1").await.unwrap();
        assert_eq!(
            pending.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![a.id, b.id]
        );
        let expired = store.expire_due(100).await.unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, b.id);
        assert!(store
            .transition(
                a.id,
                &[CommandState::Queued],
                CommandState::Delivered,
                Some(5)
            )
            .await
            .unwrap());
        let fin = Finish {
            state: CommandState::Succeeded,
            finished_at_ms: 6,
            // Already stored (5, above): kept.
            delivered_at_ms: Some(4),
            output_json: Some("{\"pong\":true}".into()),
            error: None,
        };
        let finished = store.finish(a.id, fin.clone()).await.unwrap().unwrap();
        assert!(store.finish(a.id, fin).await.unwrap().is_none());
        let got = store.command(a.id).await.unwrap().unwrap();
        assert_eq!(
            finished.view(),
            got.view(),
            "finish returns the stored record"
        );
        assert_eq!(got.state, CommandState::Succeeded);
        assert_eq!(got.delivered_at_ms, Some(5));
        assert_eq!(got.view().output, Some(serde_json::json!({"pong": true})));
    }

    fn cert(fp: u8, agent: &str, issued_at_ms: i64, not_after_ms: i64) -> IssuedCertificate {
        IssuedCertificate {
            fingerprint: [fp; 32],
            agent_id: agent.into(),
            issued_at_ms,
            not_after_ms,
            revoked_at_ms: None,
        }
    }

    #[tokio::test]
    async fn revoking_an_agent_revokes_every_certificate_issued_so_far_and_refuses_their_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.insert_token([1; 32], "db1", 1000).await.unwrap();
        store.insert_token([2; 32], "db1", 1000).await.unwrap();
        // Enrollment records its certificate with the token; renewal with the old one.
        assert_eq!(
            store
                .consume_token([1; 32], "db1", 5, cert(1, "db1", 5, 500))
                .await
                .unwrap(),
            Ok(())
        );
        assert_eq!(
            store
                .record_renewal(cert(2, "db1", 6, 600), ([1; 32], 5))
                .await
                .unwrap(),
            Ok(())
        );
        store
            .record_renewal(cert(9, "db2", 6, 600), ([8; 32], 5))
            .await
            .unwrap()
            .unwrap();
        let revoked = store
            .revoke_agent("db1", 100, Some("stolen".into()))
            .await
            .unwrap();
        assert_eq!(
            revoked.iter().map(|c| c.fingerprint[0]).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(revoked.iter().all(|c| c.revoked_at_ms == Some(100)));
        // A renewal of a revoked certificate is refused and records nothing.
        assert_eq!(
            store
                .record_renewal(cert(3, "db1", 101, 700), ([2; 32], 6))
                .await
                .unwrap(),
            Err(RenewalRevoked(100))
        );
        assert!(store.certificate([3; 32]).await.unwrap().is_none());
        // So is one of a certificate without a record, issued before the revocation;
        // one issued after it is not.
        assert_eq!(
            store
                .record_renewal(cert(4, "db1", 101, 700), ([7; 32], 99))
                .await
                .unwrap(),
            Err(RenewalRevoked(100))
        );
        store
            .record_renewal(cert(4, "db1", 101, 700), ([7; 32], 101))
            .await
            .unwrap()
            .unwrap();
        // A new enrollment of the same agent is good.
        store
            .consume_token([2; 32], "db1", 102, cert(5, "db1", 102, 800))
            .await
            .unwrap()
            .unwrap();
        let list = store.revocations(550).await.unwrap();
        assert_eq!(list.certificates, vec![([2; 32], 600)], "1 expired at 500");
        assert_eq!(
            list.agents,
            vec![(
                "db1".to_string(),
                AgentRevocation {
                    revoked_at_ms: 100,
                    reason: Some("stolen".into())
                }
            )]
        );
        let all = store.certificates("db1").await.unwrap();
        assert_eq!(
            all.iter()
                .map(|c| (c.fingerprint[0], c.revoked_at_ms))
                .collect::<Vec<_>>(),
            [(1, Some(100)), (2, Some(100)), (4, None), (5, None)]
        );
        assert_eq!(
            store.prune_certificates(650).await.unwrap(),
            3,
            "1, 2 and db2's"
        );
        assert_eq!(store.certificates("db1").await.unwrap().len(), 2);
        assert_eq!(store.certificates("db2").await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn tokens_are_single_use_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.insert_token([1; 32], "db1", 1000).await.unwrap();
        store.insert_token([2; 32], "db1", 10).await.unwrap();
        assert_eq!(
            store
                .consume_token([1; 32], "db2", 5, cert(1, "db2", 5, 9))
                .await
                .unwrap(),
            Err(TokenRefusal::OtherAgent("db1".into()))
        );
        assert_eq!(
            store
                .consume_token([1; 32], "db1", 5, cert(1, "db1", 5, 9))
                .await
                .unwrap(),
            Ok(())
        );
        assert_eq!(
            store
                .consume_token([1; 32], "db1", 6, cert(2, "db1", 6, 9))
                .await
                .unwrap(),
            Err(TokenRefusal::Used)
        );
        assert_eq!(
            store
                .consume_token([2; 32], "db1", 50, cert(3, "db1", 50, 90))
                .await
                .unwrap(),
            Err(TokenRefusal::Expired)
        );
        assert_eq!(
            store
                .consume_token([3; 32], "db1", 5, cert(4, "db1", 5, 9))
                .await
                .unwrap(),
            Err(TokenRefusal::Unknown)
        );
    }
}
