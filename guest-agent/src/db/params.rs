//! Database parameters: the allow-list per engine and flavour, validation of a requested
//! change set, the override include file the agent writes (and reads back), live values
//! as the server reports them, and creation templates.
//!
//! **Invariant:** only this module knows which server parameters a control plane may
//! change, their types, their safe ranges and whether a change needs a restart. A change
//! set is checked as a whole: every problem is reported at once, and nothing is applied
//! unless all of it is valid.
//!
//! Units. Sizes are normalised to bytes and durations to milliseconds.
//! - A size given as a JSON number is bytes. As a string it carries a unit: PostgreSQL's
//!   `B`, `kB`, `MB`, `GB`, `TB` (1024-based, case matters, as in `postgresql.conf`) for
//!   PostgreSQL; MySQL's `K`, `M`, `G`, `T` suffixes (or none: bytes) for MySQL and
//!   MariaDB. `"0"` needs no unit. A PostgreSQL size string without a unit is refused,
//!   because the server would read it in the parameter's own unit (8 kB pages for
//!   `shared_buffers`) while a JSON number here means bytes.
//! - A duration given as a number, or as a string without a unit, is in the parameter's
//!   base unit ([`TimeUnit`], named in each parameter's help). A string may carry `ms`,
//!   `s`, `min`, `h` or `d`, for either engine.
//!
//! A value the server would silently round (not a whole number of its base unit) is
//! refused rather than rounded, so what the agent writes is what the server runs and a
//! wanted value compares equal to the live one. `null` for a parameter removes the
//! override (the server default applies again).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// The version of the [`Template`] format this agent writes and reads.
pub const TEMPLATE_FORMAT: u32 = 1;

/// A database engine. `Mysql` covers MySQL 8 and MariaDB; where they differ, see
/// [`Flavour`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Postgres,
    Mysql,
}

impl Engine {
    /// The name people know the engine by.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "PostgreSQL",
            Engine::Mysql => "MySQL",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The exact server a parameter set is meant for. MySQL 8 (the production target) and
/// MariaDB (what Debian ships, used in tests) share most parameters; some exist on only
/// one of them (see [`ParamSpec::flavours`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    Postgres,
    Mysql8,
    Mariadb,
}

impl Flavour {
    pub const ALL: [Flavour; 3] = [Flavour::Postgres, Flavour::Mysql8, Flavour::Mariadb];

    pub fn engine(self) -> Engine {
        match self {
            Flavour::Postgres => Engine::Postgres,
            Flavour::Mysql8 | Flavour::Mariadb => Engine::Mysql,
        }
    }

    /// The name people know the server by.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Postgres => "PostgreSQL",
            Flavour::Mysql8 => "MySQL 8",
            Flavour::Mariadb => "MariaDB",
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The unit a duration parameter is counted in by the server, and so the unit of a bare
/// number given for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeUnit {
    Millisecond,
    Second,
}

impl TimeUnit {
    pub fn ms(self) -> u64 {
        match self {
            TimeUnit::Millisecond => 1,
            TimeUnit::Second => SECOND_MS,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            TimeUnit::Millisecond => "ms",
            TimeUnit::Second => "s",
        }
    }
}

/// The type of a parameter and the values it may take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// A whole number.
    Int { min: i64, max: i64 },
    /// A size in bytes. The value must be a whole multiple of `step`; for PostgreSQL
    /// `step` is also the parameter's base unit (what `pg_settings.unit` says and what a
    /// bare number in `postgresql.conf` counts), because the server rounds to it.
    Bytes { min: u64, max: u64, step: u64 },
    /// A duration, normalised to milliseconds. Bare numbers count `unit`; the value must
    /// be a whole multiple of `step_ms`. With `minus_one_disables`, `-1` is accepted and
    /// becomes [`Value::Disabled`].
    Duration {
        min_ms: u64,
        max_ms: u64,
        unit: TimeUnit,
        step_ms: u64,
        minus_one_disables: bool,
    },
    /// `true`/`false`, or the strings `on`/`off`/`true`/`false` (any case).
    Bool,
    /// One of the listed words (matched without regard to case, stored as listed).
    Enum(&'static [&'static str]),
    /// A finite floating-point number.
    Real { min: f64, max: f64 },
}

/// One parameter a control plane may change.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamSpec {
    /// The server's own name for it.
    pub name: &'static str,
    pub kind: Kind,
    /// Whether a change takes effect only after a server restart (PostgreSQL: context
    /// `postmaster`; MySQL: not settable with `SET GLOBAL`). Everything else is applied
    /// with a reload (PostgreSQL) or `SET GLOBAL` (MySQL).
    pub restart: bool,
    /// The server's built-in default, as text for people (it may differ by flavour).
    pub default: &'static str,
    pub help: &'static str,
    /// The flavours that have this parameter.
    pub flavours: &'static [Flavour],
}

impl ParamSpec {
    pub fn available_on(&self, flavour: Flavour) -> bool {
        self.flavours.contains(&flavour)
    }
}

const fn bytes(min: u64, max: u64, step: u64) -> Kind {
    Kind::Bytes { min, max, step }
}

const fn millis(min_ms: u64, max_ms: u64) -> Kind {
    Kind::Duration {
        min_ms,
        max_ms,
        unit: TimeUnit::Millisecond,
        step_ms: 1,
        minus_one_disables: false,
    }
}

const fn seconds(min_s: u64, max_s: u64) -> Kind {
    Kind::Duration {
        min_ms: min_s * SECOND_MS,
        max_ms: max_s * SECOND_MS,
        unit: TimeUnit::Second,
        step_ms: SECOND_MS,
        minus_one_disables: false,
    }
}

const POSTGRES: &[Flavour] = &[Flavour::Postgres];
const MYSQL_ALL: &[Flavour] = &[Flavour::Mysql8, Flavour::Mariadb];
const MYSQL8_ONLY: &[Flavour] = &[Flavour::Mysql8];
const MARIADB_ONLY: &[Flavour] = &[Flavour::Mariadb];

/// PostgreSQL 15, sorted by name. Restart flags follow `pg_settings.context`
/// (`postmaster` = restart).
static POSTGRES_PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "autovacuum",
        kind: Kind::Bool,
        restart: false,
        default: "on",
        help: "Run the autovacuum launcher. Turning it off risks transaction ID wraparound; \
               prefer tuning it",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "checkpoint_timeout",
        kind: seconds(30, 86_400),
        restart: false,
        default: "5min",
        help: "Longest time between automatic WAL checkpoints. Numbers are seconds",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "default_statistics_target",
        kind: Kind::Int {
            min: 1,
            max: 10_000,
        },
        restart: false,
        default: "100",
        help: "Statistics detail ANALYZE gathers for columns without their own target",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "effective_cache_size",
        kind: bytes(8 * MIB, 8 * TIB, 8 * KIB),
        restart: false,
        default: "4GB",
        help: "The planner's assumption of memory available for caching (shared_buffers plus \
               the OS page cache); allocates nothing. Whole 8 kB pages",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "effective_io_concurrency",
        kind: Kind::Int { min: 0, max: 1000 },
        restart: false,
        default: "1",
        help: "Concurrent disk I/O the server expects the storage to handle",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "idle_in_transaction_session_timeout",
        kind: millis(0, 7 * DAY_MS),
        restart: false,
        default: "0",
        help: "End sessions idle inside a transaction for longer than this; 0 disables. \
               Numbers are milliseconds",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "idle_session_timeout",
        kind: millis(0, 7 * DAY_MS),
        restart: false,
        default: "0",
        help: "End sessions idle outside a transaction for longer than this; 0 disables. \
               Numbers are milliseconds",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "log_connections",
        kind: Kind::Bool,
        restart: false,
        default: "off",
        help: "Log each successful connection; applies to connections made after the reload",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "log_disconnections",
        kind: Kind::Bool,
        restart: false,
        default: "off",
        help: "Log the end of each session with its duration; applies to connections made \
               after the reload",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "log_min_duration_statement",
        kind: Kind::Duration {
            min_ms: 0,
            max_ms: DAY_MS,
            unit: TimeUnit::Millisecond,
            step_ms: 1,
            minus_one_disables: true,
        },
        restart: false,
        default: "-1",
        help: "Log statements that run at least this long; 0 logs all, -1 disables. Numbers \
               are milliseconds",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "log_statement",
        kind: Kind::Enum(&["none", "ddl", "mod", "all"]),
        restart: false,
        default: "none",
        help: "Which statements to log: none, ddl (schema changes), mod (ddl plus data \
               changes) or all",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "maintenance_work_mem",
        kind: bytes(MIB, 64 * GIB, KIB),
        restart: false,
        default: "64MB",
        help: "Memory for VACUUM, CREATE INDEX and ALTER TABLE ADD FOREIGN KEY. Whole kB",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "max_connections",
        kind: Kind::Int {
            min: 10,
            max: 10_000,
        },
        restart: true,
        default: "100",
        help: "Most concurrent client connections. Replicas must be set at least as high as \
               their primary, or they refuse to start",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "max_locks_per_transaction",
        kind: Kind::Int { min: 10, max: 8192 },
        restart: true,
        default: "64",
        help: "Sizes the shared lock table (this times max_connections objects). Replicas \
               must be set at least as high as their primary",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "max_parallel_workers",
        kind: Kind::Int { min: 0, max: 1024 },
        restart: false,
        default: "8",
        help: "Most parallel workers at once; capped by max_worker_processes",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "max_parallel_workers_per_gather",
        kind: Kind::Int { min: 0, max: 1024 },
        restart: false,
        default: "2",
        help: "Most parallel workers one query node may use; capped by max_parallel_workers",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "max_wal_size",
        kind: bytes(64 * MIB, TIB, MIB),
        restart: false,
        default: "1GB",
        help: "WAL growth that triggers a checkpoint (a soft limit). With automated backups \
               on, the agent holds a primary's WAL to 15% of the data disk; keep this well \
               below that. Whole MB",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "max_worker_processes",
        kind: Kind::Int { min: 1, max: 1024 },
        restart: true,
        default: "8",
        help: "Most background worker processes. Replicas must be set at least as high as \
               their primary",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "min_wal_size",
        kind: bytes(32 * MIB, TIB, MIB),
        restart: false,
        default: "80MB",
        help: "WAL kept for reuse instead of removed at checkpoints; at least two 16 MB \
               segments and not above max_wal_size. Whole MB",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "random_page_cost",
        kind: Kind::Real {
            min: 0.1,
            max: 100.0,
        },
        restart: false,
        default: "4",
        help: "The planner's cost of a non-sequential page read; 1.1 suits SSDs",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "shared_buffers",
        kind: bytes(16 * MIB, TIB, 8 * KIB),
        restart: true,
        default: "128MB",
        help: "The server's shared page cache, allocated at start; about a quarter of the \
               VM's memory is usual. Whole 8 kB pages",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "statement_timeout",
        kind: millis(0, 7 * DAY_MS),
        restart: false,
        default: "0",
        help: "Cancel statements that run longer than this; 0 disables. Numbers are \
               milliseconds",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "wal_keep_size",
        kind: bytes(0, TIB, MIB),
        restart: false,
        default: "0",
        help: "WAL kept for replicas that fall behind, on top of what replication slots \
               hold; counts against the disk the agent caps. Whole MB",
        flavours: POSTGRES,
    },
    ParamSpec {
        name: "work_mem",
        kind: bytes(64 * KIB, 8 * GIB, KIB),
        restart: false,
        default: "4MB",
        help: "Memory per sort or hash operation before spilling to disk; one query may use \
               several times this. Whole kB",
        flavours: POSTGRES,
    },
];

/// MySQL 8 and MariaDB (10.6 or later), sorted by name. Restart means the variable is
/// not dynamic (`SET GLOBAL` refuses it).
static MYSQL_PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "binlog_expire_logs_seconds",
        kind: seconds(86_400, 90 * 86_400),
        restart: false,
        default: "2592000 (MySQL 8); 0, which defers to expire_logs_days (MariaDB)",
        help: "Purge binary logs older than this (MariaDB has it from 10.6). At least a day, \
               so logs are archived before they go; 0 (never purge) is refused because \
               binlogs would fill the disk. Numbers are seconds",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "expire_logs_days",
        kind: Kind::Int { min: 1, max: 99 },
        restart: false,
        default: "0",
        help: "MariaDB's older form of binlog_expire_logs_seconds, in whole days; set one of \
               the two, not both",
        flavours: MARIADB_ONLY,
    },
    ParamSpec {
        name: "innodb_buffer_pool_instances",
        kind: Kind::Int { min: 1, max: 64 },
        restart: true,
        default: "8 (1 when the buffer pool is under 1 GiB)",
        help: "Regions the buffer pool is split into. MariaDB 10.5 and later always use one",
        flavours: MYSQL8_ONLY,
    },
    ParamSpec {
        name: "innodb_buffer_pool_size",
        kind: bytes(32 * MIB, TIB, MIB),
        restart: false,
        default: "134217728 (128M)",
        help: "InnoDB's page cache; resized online (MySQL 8, MariaDB 10.2 and later), in the \
               background. The server rounds it up to a multiple of \
               innodb_buffer_pool_chunk_size times innodb_buffer_pool_instances (128 MiB by \
               default), so the live value may be larger than the one asked for. Whole MiB",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "innodb_flush_log_at_trx_commit",
        kind: Kind::Enum(&["0", "1", "2"]),
        restart: false,
        default: "1",
        help: "1 writes and flushes the redo log at every commit (durable); 2 and 0 can lose \
               about a second of commits in a crash",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "innodb_io_capacity",
        kind: Kind::Int {
            min: 100,
            max: 100_000,
        },
        restart: false,
        default: "200",
        help: "I/O operations per second InnoDB background tasks may use",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "innodb_lock_wait_timeout",
        kind: seconds(1, 3600),
        restart: false,
        default: "50",
        help: "How long a transaction waits for a row lock before giving up. Numbers are \
               seconds",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "innodb_log_file_size",
        kind: bytes(32 * MIB, 32 * GIB, MIB),
        restart: true,
        default: "50331648 (48M, MySQL 8); 100663296 (96M, MariaDB)",
        help: "Size of the redo log file(s); takes effect at restart. MySQL 8.0.30 and later \
               prefer innodb_redo_log_capacity, which overrides it when set. Whole MiB",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "innodb_redo_log_capacity",
        kind: bytes(8 * MIB, 128 * GIB, MIB),
        restart: false,
        default: "104857600 (100M)",
        help: "Total redo log space, resized online; MySQL 8.0.30 and later. Whole MiB",
        flavours: MYSQL8_ONLY,
    },
    ParamSpec {
        name: "long_query_time",
        kind: Kind::Duration {
            min_ms: 0,
            max_ms: DAY_MS,
            unit: TimeUnit::Second,
            step_ms: 1,
            minus_one_disables: false,
        },
        restart: false,
        default: "10",
        help: "Statements slower than this go to the slow query log (when slow_query_log is \
               on). Numbers are seconds and may have a fraction; millisecond precision",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "max_allowed_packet",
        kind: bytes(MIB, GIB, KIB),
        restart: false,
        default: "67108864 (64M, MySQL 8); 16777216 (16M, MariaDB)",
        help: "Largest packet or generated string; sessions take it when they connect. Whole \
               KiB (the server rounds down otherwise)",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "max_connections",
        kind: Kind::Int {
            min: 10,
            max: 10_000,
        },
        restart: false,
        default: "151",
        help: "Most concurrent client connections (one more is kept for an administrator)",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "max_heap_table_size",
        kind: bytes(MIB, 16 * GIB, KIB),
        restart: false,
        default: "16777216 (16M)",
        help: "Largest MEMORY table, and a cap on in-memory temporary tables; applies to \
               sessions opened afterwards. Whole KiB",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "performance_schema",
        kind: Kind::Bool,
        restart: true,
        default: "ON (MySQL 8); OFF (MariaDB)",
        help: "Collect performance_schema instrumentation; costs some memory and CPU",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "slow_query_log",
        kind: Kind::Bool,
        restart: false,
        default: "OFF",
        help: "Log statements slower than long_query_time",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "sync_binlog",
        kind: Kind::Int {
            min: 0,
            max: 10_000,
        },
        restart: false,
        default: "1 (MySQL 8); 0 (MariaDB)",
        help: "1 syncs the binary log at every commit (durable); N every N commit groups; 0 \
               leaves it to the operating system",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "table_open_cache",
        kind: Kind::Int {
            min: 64,
            max: 100_000,
        },
        restart: false,
        default: "4000 (MySQL 8); 2000 (MariaDB)",
        help: "Open tables kept cached across all threads",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "thread_cache_size",
        kind: Kind::Int {
            min: 0,
            max: 16_384,
        },
        restart: false,
        default: "sized by the server from max_connections",
        help: "Threads kept for reuse by new connections",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "tmp_table_size",
        kind: bytes(MIB, 16 * GIB, 1),
        restart: false,
        default: "16777216 (16M)",
        help: "Largest in-memory internal temporary table before it goes to disk; the \
               smaller of this and max_heap_table_size applies",
        flavours: MYSQL_ALL,
    },
    ParamSpec {
        name: "wait_timeout",
        kind: seconds(10, 365 * 86_400),
        restart: false,
        default: "28800",
        help: "Close client connections idle for longer than this; applies to connections \
               opened afterwards. Numbers are seconds",
        flavours: MYSQL_ALL,
    },
];

fn engine_params(engine: Engine) -> &'static [ParamSpec] {
    match engine {
        Engine::Postgres => POSTGRES_PARAMS,
        Engine::Mysql => MYSQL_PARAMS,
    }
}

fn find(engine: Engine, name: &str) -> Option<&'static ParamSpec> {
    engine_params(engine).iter().find(|spec| spec.name == name)
}

/// The parameter `name` if `flavour` has it and it is on the allow-list.
pub fn lookup(flavour: Flavour, name: &str) -> Option<&'static ParamSpec> {
    find(flavour.engine(), name).filter(|spec| spec.available_on(flavour))
}

/// Every parameter `flavour` may change, sorted by name.
pub fn allow_list(flavour: Flavour) -> impl Iterator<Item = &'static ParamSpec> {
    engine_params(flavour.engine())
        .iter()
        .filter(move |spec| spec.available_on(flavour))
}

/// A normalised parameter value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Bytes(u64),
    DurationMs(u64),
    Bool(bool),
    Text(String),
    Real(f64),
    /// `-1` for a duration whose `-1` switches the feature off
    /// (`log_min_duration_statement`).
    Disabled,
}

impl fmt::Display for Value {
    /// Human units: `128 MiB`, `5 s`, `on`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Bytes(b) => f.write_str(&human_bytes(*b)),
            Value::DurationMs(ms) => f.write_str(&human_duration(*ms)),
            Value::Bool(b) => f.write_str(if *b { "on" } else { "off" }),
            Value::Text(s) => f.write_str(s),
            Value::Real(x) => write!(f, "{x}"),
            Value::Disabled => f.write_str("disabled (-1)"),
        }
    }
}

fn human_bytes(b: u64) -> String {
    for (unit, symbol) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if b != 0 && b.is_multiple_of(unit) {
            return format!("{} {symbol}", b / unit);
        }
    }
    format!("{b} B")
}

fn human_duration(ms: u64) -> String {
    for (unit, symbol) in [
        (DAY_MS, "d"),
        (HOUR_MS, "h"),
        (MINUTE_MS, "min"),
        (SECOND_MS, "s"),
    ] {
        if ms != 0 && ms.is_multiple_of(unit) {
            return format!("{} {symbol}", ms / unit);
        }
    }
    format!("{ms} ms")
}

/// A change set that passed [`validate`]: safe to render and apply as a whole.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    pub flavour: Flavour,
    /// Parameters to set, by name, normalised.
    pub values: BTreeMap<String, Value>,
    /// Parameters whose override is removed (given as `null`), sorted.
    pub reset: Vec<String>,
    /// Changed parameters (set or reset) that take effect only after a restart, sorted.
    pub restart_required: Vec<String>,
}

/// What is wrong with one entry of a change set.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamProblem {
    /// The parameter as given (cut short if very long).
    pub name: String,
    pub kind: ProblemKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ProblemKind {
    /// Not on the allow-list of this engine.
    Unknown {
        flavour: Flavour,
        /// The closest allowed name, when one is near.
        suggestion: Option<&'static str>,
        /// The other engine, when the name is one of its parameters.
        other_engine: Option<Engine>,
    },
    /// On the engine's allow-list, but this flavour lacks it.
    NotInFlavour {
        flavour: Flavour,
        available: &'static [Flavour],
    },
    WrongType {
        expected: String,
        got: String,
    },
    /// The right type, but unreadable (a bad unit, a fraction, a negative size).
    Invalid {
        reason: String,
    },
    BelowMinimum {
        value: Value,
        min: Value,
        max: Value,
    },
    AboveMaximum {
        value: Value,
        min: Value,
        max: Value,
    },
    /// The server would round it.
    NotMultiple {
        value: Value,
        step: Value,
    },
    NotOneOf {
        got: String,
        allowed: &'static [&'static str],
    },
    /// Fine alone, not together with another entry.
    Conflict {
        reason: String,
    },
    /// A template in a format this agent does not read.
    UnsupportedFormat {
        found: u32,
    },
}

impl ParamProblem {
    fn new(name: &str, kind: ProblemKind) -> Self {
        ParamProblem {
            name: shorten(name, 64),
            kind,
        }
    }
}

impl fmt::Display for ParamProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.kind)
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::Unknown {
                other_engine: Some(other),
                flavour,
                ..
            } => write!(
                f,
                "unknown parameter for {flavour} (it is a {other} parameter)"
            ),
            ProblemKind::Unknown {
                suggestion: Some(near),
                ..
            } => write!(f, "unknown parameter (did you mean {near}?)"),
            ProblemKind::Unknown { flavour, .. } => {
                write!(f, "unknown parameter (not on the {flavour} allow-list)")
            }
            ProblemKind::NotInFlavour { flavour, available } => {
                let names: Vec<&str> = available.iter().map(|f| f.name()).collect();
                write!(
                    f,
                    "not available on {flavour} (only on {})",
                    names.join(" and ")
                )
            }
            ProblemKind::WrongType { expected, got } => write!(f, "expected {expected}, got {got}"),
            ProblemKind::Invalid { reason } | ProblemKind::Conflict { reason } => {
                f.write_str(reason)
            }
            ProblemKind::BelowMinimum { value, min, max } => write!(
                f,
                "{value} is below the minimum {min} (allowed {min}..{max})"
            ),
            ProblemKind::AboveMaximum { value, min, max } => write!(
                f,
                "{value} is above the maximum {max} (allowed {min}..{max})"
            ),
            ProblemKind::NotMultiple { value, step } => write!(
                f,
                "{value} is not a whole multiple of {step} (the server would round it)"
            ),
            ProblemKind::NotOneOf { got, allowed } => {
                write!(f, "{got} is not one of {}", allowed.join(", "))
            }
            ProblemKind::UnsupportedFormat { found } => write!(
                f,
                "template format {found} is not supported (this agent reads format \
                 {TEMPLATE_FORMAT})"
            ),
        }
    }
}

/// Every problem found in a change set, in the order of its entries (cross-parameter
/// conflicts last). Displayed one problem per line.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}", one_per_line(.0))]
pub struct ParamErrors(pub Vec<ParamProblem>);

fn one_per_line(problems: &[ParamProblem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Checks every entry of `changes` against `flavour`'s allow-list and returns either all
/// of it normalised, or every problem found. `null` removes an override.
pub fn validate(
    flavour: Flavour,
    changes: &serde_json::Map<String, Json>,
) -> Result<Validated, ParamErrors> {
    let mut problems = Vec::new();
    let mut values = BTreeMap::new();
    let mut reset = BTreeSet::new();
    let mut restart = BTreeSet::new();
    for (name, raw) in changes {
        let spec = match resolve(flavour, name) {
            Ok(spec) => spec,
            Err(kind) => {
                problems.push(ParamProblem::new(name, kind));
                continue;
            }
        };
        if raw.is_null() {
            reset.insert(spec.name.to_string());
        } else {
            match check_value(flavour.engine(), spec, raw) {
                Ok(value) => {
                    values.insert(spec.name.to_string(), value);
                }
                Err(kind) => {
                    problems.push(ParamProblem::new(name, kind));
                    continue;
                }
            }
        }
        if spec.restart {
            restart.insert(spec.name.to_string());
        }
    }
    cross_checks(&values, &mut problems);
    if problems.is_empty() {
        Ok(Validated {
            flavour,
            values,
            reset: reset.into_iter().collect(),
            restart_required: restart.into_iter().collect(),
        })
    } else {
        Err(ParamErrors(problems))
    }
}

fn resolve(flavour: Flavour, name: &str) -> Result<&'static ParamSpec, ProblemKind> {
    match find(flavour.engine(), name) {
        Some(spec) if spec.available_on(flavour) => Ok(spec),
        Some(spec) => Err(ProblemKind::NotInFlavour {
            flavour,
            available: spec.flavours,
        }),
        None => {
            let other = match flavour.engine() {
                Engine::Postgres => Engine::Mysql,
                Engine::Mysql => Engine::Postgres,
            };
            let other_engine = find(other, name).map(|_| other);
            Err(ProblemKind::Unknown {
                flavour,
                suggestion: if other_engine.is_some() {
                    None
                } else {
                    suggest(flavour, name)
                },
                other_engine,
            })
        }
    }
}

/// The allowed name closest to `name`: a small edit away, or the only one containing it.
fn suggest(flavour: Flavour, name: &str) -> Option<&'static str> {
    if name.len() > 100 {
        return None;
    }
    let wanted = name.trim().to_ascii_lowercase().replace('-', "_");
    let limit = if wanted.chars().count() >= 10 { 3 } else { 2 };
    let closest = allow_list(flavour)
        .map(|spec| (edit_distance(&wanted, spec.name), spec.name))
        .min_by_key(|(distance, _)| *distance);
    if let Some((distance, near)) = closest {
        if distance <= limit {
            return Some(near);
        }
    }
    if wanted.len() >= 8 {
        let mut containing = allow_list(flavour).filter(|spec| spec.name.contains(&wanted));
        if let (Some(only), None) = (containing.next(), containing.next()) {
            return Some(only.name);
        }
    }
    None
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            let delete = previous[j + 1] + 1;
            let insert = current[j] + 1;
            current.push(substitute.min(delete).min(insert));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Rules that involve two parameters of the same change set.
fn cross_checks(values: &BTreeMap<String, Value>, problems: &mut Vec<ParamProblem>) {
    if let (Some(Value::Bytes(min)), Some(Value::Bytes(max))) =
        (values.get("min_wal_size"), values.get("max_wal_size"))
    {
        if min > max {
            problems.push(ParamProblem::new(
                "min_wal_size",
                ProblemKind::Conflict {
                    reason: format!(
                        "{} is above max_wal_size {}",
                        human_bytes(*min),
                        human_bytes(*max)
                    ),
                },
            ));
        }
    }
    if values.contains_key("expire_logs_days") && values.contains_key("binlog_expire_logs_seconds")
    {
        problems.push(ParamProblem::new(
            "expire_logs_days",
            ProblemKind::Conflict {
                reason: "set either expire_logs_days or binlog_expire_logs_seconds, not both \
                         (the server treats them as one setting)"
                    .to_string(),
            },
        ));
    }
}

fn check_value(engine: Engine, spec: &ParamSpec, raw: &Json) -> Result<Value, ProblemKind> {
    let value = match spec.kind {
        Kind::Int { .. } => Value::Int(json_int(raw)?),
        Kind::Bytes { .. } => Value::Bytes(json_bytes(engine, raw)?),
        Kind::Duration {
            unit,
            minus_one_disables,
            ..
        } => json_duration(raw, unit, minus_one_disables)?,
        Kind::Bool => Value::Bool(json_bool(raw)?),
        Kind::Enum(allowed) => Value::Text(json_enum(raw, allowed)?.to_string()),
        Kind::Real { .. } => Value::Real(json_real(raw)?),
    };
    check_bounds(spec.kind, &value)?;
    Ok(value)
}

fn check_bounds(kind: Kind, value: &Value) -> Result<(), ProblemKind> {
    match (kind, value) {
        (Kind::Int { min, max }, Value::Int(v)) => in_range(*v, min, max, Value::Int),
        (Kind::Bytes { min, max, step }, Value::Bytes(v)) => {
            in_range(*v, min, max, Value::Bytes)?;
            whole_multiple(*v, step, Value::Bytes)
        }
        (
            Kind::Duration {
                min_ms,
                max_ms,
                step_ms,
                ..
            },
            Value::DurationMs(v),
        ) => {
            in_range(*v, min_ms, max_ms, Value::DurationMs)?;
            whole_multiple(*v, step_ms, Value::DurationMs)
        }
        (Kind::Real { min, max }, Value::Real(v)) => in_range(*v, min, max, Value::Real),
        _ => Ok(()),
    }
}

fn in_range<T: PartialOrd + Copy>(
    v: T,
    min: T,
    max: T,
    wrap: fn(T) -> Value,
) -> Result<(), ProblemKind> {
    if v < min {
        Err(ProblemKind::BelowMinimum {
            value: wrap(v),
            min: wrap(min),
            max: wrap(max),
        })
    } else if v > max {
        Err(ProblemKind::AboveMaximum {
            value: wrap(v),
            min: wrap(min),
            max: wrap(max),
        })
    } else {
        Ok(())
    }
}

fn whole_multiple(v: u64, step: u64, wrap: fn(u64) -> Value) -> Result<(), ProblemKind> {
    if step > 1 && !v.is_multiple_of(step) {
        Err(ProblemKind::NotMultiple {
            value: wrap(v),
            step: wrap(step),
        })
    } else {
        Ok(())
    }
}

fn wrong_type(expected: impl Into<String>, raw: &Json) -> ProblemKind {
    ProblemKind::WrongType {
        expected: expected.into(),
        got: describe_json(raw),
    }
}

fn invalid(reason: String) -> ProblemKind {
    ProblemKind::Invalid { reason }
}

fn describe_json(raw: &Json) -> String {
    match raw {
        Json::Null => "null".to_string(),
        Json::Bool(b) => format!("the boolean {b}"),
        Json::Number(n) => format!("the number {n}"),
        Json::String(s) => format!("the string {}", quote(s)),
        Json::Array(_) => "a list".to_string(),
        Json::Object(_) => "an object".to_string(),
    }
}

fn json_int(raw: &Json) -> Result<i64, ProblemKind> {
    let parsed = match raw {
        Json::Number(n) => n.as_i64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| wrong_type("a whole number", raw))
}

fn json_bytes(engine: Engine, raw: &Json) -> Result<u64, ProblemKind> {
    match raw {
        Json::Number(n) => match n.as_u64() {
            Some(b) => Ok(b),
            // A negative or fractional number: read its decimal text exactly.
            None => {
                let text = n.to_string();
                scale_decimal(&text, 1).map_err(|e| invalid(size_error(&text, e, engine)))
            }
        },
        Json::String(s) => match engine {
            Engine::Postgres => parse_pg_size(s, Bare::Refuse),
            Engine::Mysql => parse_mysql_size(s),
        }
        .map_err(invalid),
        _ => Err(wrong_type(
            match engine {
                Engine::Postgres => "a number of bytes or a size such as \"128MB\"",
                Engine::Mysql => "a number of bytes or a size such as \"128M\"",
            },
            raw,
        )),
    }
}

fn json_duration(
    raw: &Json,
    unit: TimeUnit,
    minus_one_disables: bool,
) -> Result<Value, ProblemKind> {
    match raw {
        Json::Number(n) => {
            if let Some(count) = n.as_u64() {
                count
                    .checked_mul(unit.ms())
                    .map(Value::DurationMs)
                    .ok_or_else(|| invalid(format!("{n} is too large")))
            } else if minus_one_disables && n.as_i64() == Some(-1) {
                Ok(Value::Disabled)
            } else {
                // Negative or fractional (0.5 s): read the decimal text exactly.
                parse_duration(&n.to_string(), unit, minus_one_disables).map_err(invalid)
            }
        }
        Json::String(s) => parse_duration(s, unit, minus_one_disables).map_err(invalid),
        _ => Err(wrong_type(
            match unit {
                TimeUnit::Millisecond => {
                    "a number of milliseconds or a duration such as \"30s\" or \"5min\""
                }
                TimeUnit::Second => "a number of seconds or a duration such as \"30s\" or \"5min\"",
            },
            raw,
        )),
    }
}

fn json_bool(raw: &Json) -> Result<bool, ProblemKind> {
    let parsed = match raw {
        Json::Bool(b) => Some(*b),
        Json::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "on" | "true" => Some(true),
            "off" | "false" => Some(false),
            _ => None,
        },
        _ => None,
    };
    parsed.ok_or_else(|| wrong_type("true, false, \"on\" or \"off\"", raw))
}

fn json_enum(raw: &Json, allowed: &'static [&'static str]) -> Result<&'static str, ProblemKind> {
    let text = match raw {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        _ => return Err(wrong_type(format!("one of {}", allowed.join(", ")), raw)),
    };
    canonical_word(allowed, &text).ok_or_else(|| ProblemKind::NotOneOf {
        got: quote(&text),
        allowed,
    })
}

fn json_real(raw: &Json) -> Result<f64, ProblemKind> {
    match raw {
        Json::Number(n) => n.as_f64().ok_or_else(|| wrong_type("a number", raw)),
        Json::String(s) => parse_real(s).map_err(invalid),
        _ => Err(wrong_type("a number", raw)),
    }
}

fn canonical_word(allowed: &'static [&'static str], text: &str) -> Option<&'static str> {
    let text = text.trim();
    allowed
        .iter()
        .copied()
        .find(|word| word.eq_ignore_ascii_case(text))
}

fn parse_real(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(format!("{} is not a finite number", quote(text))),
    }
}

fn parse_bool_text(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// `text` in double quotes with escapes, cut short if long (messages echo what was sent).
fn quote(text: &str) -> String {
    format!("{:?}", shorten(text, 60))
}

fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let mut short: String = text.chars().take(max_chars).collect();
        short.push('…');
        short
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NumberError {
    NotANumber,
    Negative,
    NotWhole,
    TooLarge,
}

/// `text` (a non-negative decimal such as `1.5`) times `multiplier`, exactly; refused
/// when the result is not a whole number.
fn scale_decimal(text: &str, multiplier: u64) -> Result<u64, NumberError> {
    let text = text.strip_prefix('+').unwrap_or(text);
    if text.starts_with('-') {
        return Err(NumberError::Negative);
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(NumberError::NotANumber);
    }
    let mut total: u128 = 0;
    for digit in whole.bytes() {
        total = total * 10 + u128::from(digit - b'0');
        if total > u128::from(u64::MAX) {
            return Err(NumberError::TooLarge);
        }
    }
    total = total
        .checked_mul(u128::from(multiplier))
        .ok_or(NumberError::TooLarge)?;
    let fraction = fraction.trim_end_matches('0');
    if !fraction.is_empty() {
        // 19 digits keep numerator below 10^19 * 2^64, well inside u128.
        let places = u32::try_from(fraction.len())
            .ok()
            .filter(|places| *places <= 19)
            .ok_or(NumberError::NotWhole)?;
        let denominator = 10u128.pow(places);
        let numerator = fraction
            .parse::<u128>()
            .map_err(|_| NumberError::NotANumber)?
            .checked_mul(u128::from(multiplier))
            .ok_or(NumberError::TooLarge)?;
        if numerator % denominator != 0 {
            return Err(NumberError::NotWhole);
        }
        total = total
            .checked_add(numerator / denominator)
            .ok_or(NumberError::TooLarge)?;
    }
    u64::try_from(total).map_err(|_| NumberError::TooLarge)
}

/// Splits `128MB` or `128 MB` into the number and the unit.
fn split_number_unit(text: &str) -> (&str, &str) {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
        .unwrap_or(text.len());
    (&text[..end], text[end..].trim_start())
}

/// How a size without a unit is read.
#[derive(Clone, Copy, Debug)]
enum Bare {
    /// Refused unless zero: a request must say what it means.
    Refuse,
    /// Counted in this many bytes: the server's own reading.
    Times(u64),
}

fn pg_memory_unit(unit: &str) -> Option<u64> {
    match unit {
        "B" => Some(1),
        "kB" => Some(KIB),
        "MB" => Some(MIB),
        "GB" => Some(GIB),
        "TB" => Some(TIB),
        _ => None,
    }
}

fn mysql_size_suffix(unit: &str) -> Option<u64> {
    match unit {
        "" => Some(1),
        "K" | "k" => Some(KIB),
        "M" | "m" => Some(MIB),
        "G" | "g" => Some(GIB),
        "T" | "t" => Some(TIB),
        _ => None,
    }
}

fn time_unit_ms(unit: &str) -> Option<u64> {
    match unit {
        "ms" => Some(1),
        "s" => Some(SECOND_MS),
        "min" => Some(MINUTE_MS),
        "h" => Some(HOUR_MS),
        "d" => Some(DAY_MS),
        _ => None,
    }
}

fn size_error(text: &str, error: NumberError, engine: Engine) -> String {
    let shown = quote(text);
    match error {
        NumberError::NotANumber => match engine {
            Engine::Postgres => format!("{shown} is not a size (e.g. \"128MB\")"),
            Engine::Mysql => format!("{shown} is not a size (e.g. \"128M\")"),
        },
        NumberError::Negative => format!("{shown} is negative"),
        NumberError::NotWhole => format!("{shown} is not a whole number of bytes"),
        NumberError::TooLarge => format!("{shown} is too large"),
    }
}

fn parse_pg_size(text: &str, bare: Bare) -> Result<u64, String> {
    let (number, unit) = split_number_unit(text);
    if number.is_empty() {
        return Err(size_error(text, NumberError::NotANumber, Engine::Postgres));
    }
    let multiplier = if unit.is_empty() {
        match bare {
            Bare::Times(base) => base,
            Bare::Refuse if scale_decimal(number, 1) == Ok(0) => 1,
            Bare::Refuse => {
                return Err(format!(
                    "{} has no unit: give one of B, kB, MB, GB, TB (e.g. \"128MB\"), or a \
                     JSON number of bytes",
                    quote(text)
                ))
            }
        }
    } else {
        pg_memory_unit(unit).ok_or_else(|| {
            format!(
                "{} has an unknown unit {}: PostgreSQL sizes use B, kB, MB, GB or TB (case \
                 matters)",
                quote(text),
                quote(unit)
            )
        })?
    };
    scale_decimal(number, multiplier).map_err(|e| size_error(text, e, Engine::Postgres))
}

fn parse_mysql_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(end);
    if number.is_empty() {
        return Err(size_error(text, NumberError::NotANumber, Engine::Mysql));
    }
    let multiplier = mysql_size_suffix(unit).ok_or_else(|| {
        format!(
            "{} is not a MySQL size: use a whole number of bytes with an optional K, M, G or \
             T suffix (e.g. \"128M\")",
            quote(text)
        )
    })?;
    scale_decimal(number, multiplier).map_err(|e| size_error(text, e, Engine::Mysql))
}

fn parse_duration(text: &str, unit: TimeUnit, minus_one_disables: bool) -> Result<Value, String> {
    let trimmed = text.trim();
    if minus_one_disables && trimmed == "-1" {
        return Ok(Value::Disabled);
    }
    let (number, suffix) = split_number_unit(trimmed);
    if number.is_empty() {
        return Err(format!(
            "{} is not a duration (e.g. \"30s\" or \"5min\")",
            quote(text)
        ));
    }
    let multiplier = if suffix.is_empty() {
        unit.ms()
    } else {
        time_unit_ms(suffix).ok_or_else(|| {
            format!(
                "{} has an unknown unit {}: durations use ms, s, min, h or d (case matters)",
                quote(text),
                quote(suffix)
            )
        })?
    };
    scale_decimal(number, multiplier)
        .map(Value::DurationMs)
        .map_err(|e| {
            let shown = quote(text);
            match e {
                NumberError::NotANumber => {
                    format!("{shown} is not a duration (e.g. \"30s\" or \"5min\")")
                }
                NumberError::Negative if minus_one_disables => {
                    format!("{shown} is negative (only -1, which disables it, may be)")
                }
                NumberError::Negative => format!("{shown} is negative"),
                NumberError::NotWhole => format!("{shown} is not a whole number of milliseconds"),
                NumberError::TooLarge => format!("{shown} is too large"),
            }
        })
}

/// Reads a value as PostgreSQL writes it in `postgresql.conf` or `SHOW` output: a bare
/// number counts the parameter's base unit.
fn pg_server_value(spec: &ParamSpec, raw: &str) -> Result<Value, String> {
    match spec.kind {
        Kind::Int { .. } => parse_server_int(raw)
            .map(Value::Int)
            .ok_or_else(|| format!("{} is not a whole number", quote(raw))),
        Kind::Bytes { step, .. } => parse_pg_size(raw, Bare::Times(step)).map(Value::Bytes),
        Kind::Duration {
            unit,
            minus_one_disables,
            ..
        } => parse_duration(raw, unit, minus_one_disables),
        Kind::Bool => parse_bool_text(raw)
            .map(Value::Bool)
            .ok_or_else(|| format!("{} is not on or off", quote(raw))),
        Kind::Enum(allowed) => Ok(Value::Text(
            canonical_word(allowed, raw).map_or_else(|| raw.trim().to_string(), str::to_string),
        )),
        Kind::Real { .. } => parse_real(raw).map(Value::Real),
    }
}

/// A whole number as a server reports it; MariaDB 10.6 and later report some counts as
/// doubles (`@@expire_logs_days` is `7.000000`).
fn parse_server_int(raw: &str) -> Option<i64> {
    let raw = raw.trim();
    let (whole, fraction) = raw.split_once('.').unwrap_or((raw, ""));
    if fraction.bytes().all(|b| b == b'0') {
        whole.parse().ok()
    } else {
        None
    }
}

/// Reads a value as MySQL writes it in an option file or reports it from `@@name` or
/// `SHOW VARIABLES`: sizes in bytes (or with a K/M/G/T suffix), durations in the base
/// unit with an optional fraction (`10.000000`).
fn mysql_server_value(spec: &ParamSpec, raw: &str) -> Result<Value, String> {
    match spec.kind {
        Kind::Bytes { .. } => parse_mysql_size(raw).map(Value::Bytes),
        _ => pg_server_value(spec, raw),
    }
}

/// Reads what a live server reports for `name` (PostgreSQL `SHOW name`, e.g. `128MB`;
/// MySQL `SELECT @@name`, e.g. `134217728`) into a [`Value`] comparable with a validated
/// one. `None` when `flavour` has no such allowed parameter or the text is unreadable.
pub fn sql_show_value(flavour: Flavour, name: &str, raw: &str) -> Option<Value> {
    let spec = lookup(flavour, name)?;
    match flavour.engine() {
        Engine::Postgres => pg_server_value(spec, raw),
        Engine::Mysql => mysql_server_value(spec, raw),
    }
    .ok()
}

/// Reads a row of `SELECT name, setting, unit FROM pg_settings` (e.g. `shared_buffers`,
/// `16384`, `8kB`) into a [`Value`]. `None` when `name` is not an allowed PostgreSQL
/// parameter or the row is unreadable.
pub fn pg_settings_to_value(name: &str, setting: &str, unit: Option<&str>) -> Option<Value> {
    let spec = lookup(Flavour::Postgres, name)?;
    let setting = setting.trim();
    match spec.kind {
        Kind::Bytes { step, .. } => {
            let multiplier = match unit {
                Some(unit) => pg_settings_unit(unit, pg_memory_unit)?,
                None => step,
            };
            setting
                .parse::<u64>()
                .ok()?
                .checked_mul(multiplier)
                .map(Value::Bytes)
        }
        Kind::Duration {
            unit: base,
            minus_one_disables,
            ..
        } => {
            if minus_one_disables && setting == "-1" {
                return Some(Value::Disabled);
            }
            let multiplier = match unit {
                Some(unit) => pg_settings_unit(unit, time_unit_ms)?,
                None => base.ms(),
            };
            setting
                .parse::<u64>()
                .ok()?
                .checked_mul(multiplier)
                .map(Value::DurationMs)
        }
        _ => pg_server_value(spec, setting).ok(),
    }
}

/// A `pg_settings.unit` such as `8kB`, `kB`, `MB` or `s`: an optional count and a unit.
fn pg_settings_unit(unit: &str, symbol: fn(&str) -> Option<u64>) -> Option<u64> {
    let unit = unit.trim();
    let end = unit
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(unit.len());
    let (count, symbol_text) = unit.split_at(end);
    let count = if count.is_empty() {
        1
    } else {
        count.parse::<u64>().ok()?
    };
    count.checked_mul(symbol(symbol_text.trim())?)
}

const POSTGRES_HEADER: &str = "\
# Parameter overrides written by dbvm-agent; included from postgresql.conf.
# Do not edit: the agent rewrites this file on every parameter change.
";

const MYSQL_HEADER: &str = "\
# Parameter overrides written by dbvm-agent; read after the server's own option files.
# Do not edit: the agent rewrites this file on every parameter change.
[mysqld]
";

/// Whether `name` can be written into a config file as is. Validated names always can.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

/// The body of the PostgreSQL include file holding the overrides: `name = 'value'`, one
/// per line, sorted by name; sizes in the largest exact unit (`kB`, `MB`, `GB`, `TB`),
/// durations likewise (`ms`, `s`, `min`, `h`, `d`), booleans `on`/`off`. A name that is
/// not a plain identifier (never one from [`validate`]) is skipped with a warning.
pub fn render_postgres(values: &BTreeMap<String, Value>) -> String {
    let mut out = String::from(POSTGRES_HEADER);
    for (name, value) in values {
        if !is_plain_name(name) {
            tracing::warn!(parameter = %name.escape_debug(), "not writing a parameter whose name is not a plain identifier");
            continue;
        }
        let _ = writeln!(out, "{name} = '{}'", escape_pg(&postgres_text(value)));
    }
    out
}

fn postgres_text(value: &Value) -> String {
    match value {
        Value::Int(n) => n.to_string(),
        Value::Bytes(b) => pg_size_text(*b),
        Value::DurationMs(ms) => duration_text(*ms),
        Value::Bool(b) => (if *b { "on" } else { "off" }).to_string(),
        Value::Text(s) => s.clone(),
        Value::Real(x) => x.to_string(),
        Value::Disabled => "-1".to_string(),
    }
}

fn pg_size_text(b: u64) -> String {
    if b == 0 {
        return "0".to_string();
    }
    for (unit, symbol) in [(TIB, "TB"), (GIB, "GB"), (MIB, "MB"), (KIB, "kB")] {
        if b.is_multiple_of(unit) {
            return format!("{}{symbol}", b / unit);
        }
    }
    format!("{b}B")
}

fn mysql_size_text(b: u64) -> Option<String> {
    [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")]
        .into_iter()
        .find(|(unit, _)| b != 0 && b.is_multiple_of(*unit))
        .map(|(unit, symbol)| format!("{}{symbol}", b / unit))
}

fn duration_text(ms: u64) -> String {
    if ms == 0 {
        return "0".to_string();
    }
    for (unit, symbol) in [
        (DAY_MS, "d"),
        (HOUR_MS, "h"),
        (MINUTE_MS, "min"),
        (SECOND_MS, "s"),
    ] {
        if ms.is_multiple_of(unit) {
            return format!("{}{symbol}", ms / unit);
        }
    }
    format!("{ms}ms")
}

/// Quoting inside `'...'` as `postgresql.conf` reads it: `''` for a quote, backslash
/// escapes for backslash and control characters.
fn escape_pg(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            _ => out.push(c),
        }
    }
    out
}

/// A line of the override file (or any config file the agent reads) that it cannot read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct OverridesParseError {
    pub line: usize,
    pub message: String,
}

/// Reads back the PostgreSQL include file [`render_postgres`] wrote (the agent's current
/// overrides). Names not on the allow-list (say, from an older agent) are kept as
/// [`Value::Text`] so that rewriting the file preserves them.
pub fn parse_rendered_postgres(text: &str) -> Result<BTreeMap<String, Value>, OverridesParseError> {
    let mut values = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let error = |message: String| OverridesParseError {
            line: index + 1,
            message,
        };
        let Some((name, raw)) = parse_pg_line(line).map_err(error)? else {
            continue;
        };
        let value = match find(Engine::Postgres, &name) {
            Some(spec) => pg_server_value(spec, &raw).map_err(|m| error(format!("{name}: {m}")))?,
            None => Value::Text(raw),
        };
        values.insert(name, value);
    }
    Ok(values)
}

/// `name = 'value'`, `name = value` or `name value`, with an optional `# comment`.
fn parse_pg_line(line: &str) -> Result<Option<(String, String)>, String> {
    let rest = line.trim_start();
    if rest.is_empty() || rest.starts_with('#') {
        return Ok(None);
    }
    let name_end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(rest.len());
    if name_end == 0 {
        return Err(format!("expected a parameter name, found {}", quote(rest)));
    }
    let name = rest[..name_end].to_ascii_lowercase();
    let mut rest = rest[name_end..].trim_start();
    if let Some(after_equals) = rest.strip_prefix('=') {
        rest = after_equals.trim_start();
    }
    let (value, after) = if let Some(quoted) = rest.strip_prefix('\'') {
        unquote_pg(quoted).map_err(|m| format!("{name}: {m}"))?
    } else {
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '#')
            .unwrap_or(rest.len());
        if end == 0 {
            return Err(format!("{name}: no value"));
        }
        (rest[..end].to_string(), &rest[end..])
    };
    let after = after.trim_start();
    if !(after.is_empty() || after.starts_with('#')) {
        return Err(format!(
            "{name}: unexpected {} after the value",
            quote(after)
        ));
    }
    Ok(Some((name, value)))
}

/// The inside of a `'...'` value (after the opening quote) and what follows the closing
/// quote.
fn unquote_pg(text: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\'' if text[i + 1..].starts_with('\'') => {
                chars.next();
                out.push('\'');
            }
            '\'' => return Ok((out, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 'r')) => out.push('\r'),
                Some((_, 't')) => out.push('\t'),
                Some((_, 'b')) => out.push('\u{8}'),
                Some((_, 'f')) => out.push('\u{c}'),
                Some((_, other)) => out.push(other),
                None => break,
            },
            _ => out.push(c),
        }
    }
    Err("unterminated quoted value".to_string())
}

/// The body of the MySQL option file holding the overrides: a `[mysqld]` section with
/// `name = value`, one per line, sorted by name; sizes in bytes, durations in the
/// parameter's base unit (seconds, with a fraction where the server takes one:
/// `long_query_time = 0.5`), booleans `ON`/`OFF`. A name that is not a plain identifier
/// (never one from [`validate`]) is skipped with a warning.
pub fn render_mysql(values: &BTreeMap<String, Value>) -> String {
    let mut out = String::from(MYSQL_HEADER);
    for (name, value) in values {
        if !is_plain_name(name) {
            tracing::warn!(parameter = %name.escape_debug(), "not writing a parameter whose name is not a plain identifier");
            continue;
        }
        let _ = writeln!(out, "{name} = {}", mysql_text(name, value));
    }
    out
}

fn mysql_text(name: &str, value: &Value) -> String {
    match value {
        Value::Int(n) => n.to_string(),
        Value::Bytes(b) => b.to_string(),
        Value::DurationMs(ms) => {
            let unit = match find(Engine::Mysql, name).map(|spec| spec.kind) {
                Some(Kind::Duration { unit, .. }) => unit,
                _ => TimeUnit::Second,
            };
            match unit {
                TimeUnit::Millisecond => ms.to_string(),
                TimeUnit::Second => seconds_text(*ms),
            }
        }
        Value::Bool(b) => (if *b { "ON" } else { "OFF" }).to_string(),
        Value::Text(s) => mysql_quote(s),
        Value::Real(x) => x.to_string(),
        Value::Disabled => "-1".to_string(),
    }
}

fn seconds_text(ms: u64) -> String {
    let (whole, rest) = (ms / SECOND_MS, ms % SECOND_MS);
    if rest == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{rest:03}")
            .trim_end_matches('0')
            .to_string()
    }
}

/// A plain word as is; anything else in double quotes with backslash escapes.
fn mysql_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ',' | '-' | '+' | '/' | ':')
        });
    if plain {
        return text.to_string();
    }
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Reads back the MySQL option file [`render_mysql`] wrote: the `[mysqld]` section's
/// options (other sections are skipped). Names not on the allow-list are kept as
/// [`Value::Text`] so that rewriting the file preserves them.
pub fn parse_rendered_mysql(text: &str) -> Result<BTreeMap<String, Value>, OverridesParseError> {
    let mut values = BTreeMap::new();
    let mut section: Option<String> = None;
    for (index, line) in text.lines().enumerate() {
        let error = |message: String| OverridesParseError {
            line: index + 1,
            message,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let name = header
                .strip_suffix(']')
                .ok_or_else(|| error(format!("{} is not a [section] header", quote(line))))?;
            section = Some(name.trim().to_string());
            continue;
        }
        match section.as_deref() {
            None => return Err(error("an option before any [section]".to_string())),
            Some("mysqld") => {}
            Some(_) => continue,
        }
        let (key, raw) = match line.split_once('=') {
            Some((key, raw)) => (key, Some(unquote_mysql(raw.trim()).map_err(&error)?)),
            None => (line, None),
        };
        let name = key.trim().to_ascii_lowercase().replace('-', "_");
        if !is_plain_name(&name) {
            return Err(error(format!(
                "{} is not an option name",
                quote(key.trim())
            )));
        }
        let spec = find(Engine::Mysql, &name);
        let value = match (spec, raw) {
            (Some(spec), Some(raw)) => {
                mysql_server_value(spec, &raw).map_err(|m| error(format!("{name}: {m}")))?
            }
            (Some(spec), None) if matches!(spec.kind, Kind::Bool) => Value::Bool(true),
            (Some(_), None) => return Err(error(format!("{name}: no value"))),
            (None, Some(raw)) => Value::Text(raw),
            (None, None) => Value::Bool(true),
        };
        values.insert(name, value);
    }
    Ok(values)
}

/// An option value: `"quoted"` or `'quoted'` with backslash escapes, or bare up to a
/// `#` comment.
fn unquote_mysql(text: &str) -> Result<String, String> {
    let Some(quote_char) = text.chars().next().filter(|c| *c == '"' || *c == '\'') else {
        let bare = text.split('#').next().unwrap_or_default();
        return Ok(bare.trim().to_string());
    };
    let mut out = String::new();
    let mut chars = text.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 'r')) => out.push('\r'),
                Some((_, 't')) => out.push('\t'),
                Some((_, 'b')) => out.push('\u{8}'),
                Some((_, 's')) => out.push(' '),
                Some((_, other)) => out.push(other),
                None => break,
            },
            c if c == quote_char => {
                let after = text[i + 1..].trim_start();
                if after.is_empty() || after.starts_with('#') {
                    return Ok(out);
                }
                return Err(format!("unexpected {} after the value", quote(after)));
            }
            _ => out.push(c),
        }
    }
    Err("unterminated quoted value".to_string())
}

/// The reusable part of a database's creation parameters (DSM's "reuse creation
/// parameters"): the flavour and the tuned parameters, without the instance name.
///
/// A template never contains secrets: it holds only parameters on the allow-list, which
/// are tuning knobs; passwords, user names, certificates and storage keys are not
/// parameters, and [`Template::validate`] refuses any name not on the allow-list, so
/// none can ride along.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Template {
    /// [`TEMPLATE_FORMAT`].
    pub format: u32,
    pub flavour: Flavour,
    /// As a control plane would send them to [`validate`]; sizes and durations with
    /// units (`"256MB"`, `"5min"`) so people can read them.
    pub parameters: BTreeMap<String, Json>,
}

impl Template {
    /// A template of validated values (say, [`Validated::values`] of a database's
    /// creation, or its overrides read back from the include file).
    pub fn from_values(flavour: Flavour, values: &BTreeMap<String, Value>) -> Self {
        let parameters = values
            .iter()
            .map(|(name, value)| (name.clone(), template_json(flavour.engine(), value)))
            .collect();
        Template {
            format: TEMPLATE_FORMAT,
            flavour,
            parameters,
        }
    }

    /// Checks the template for its own flavour.
    pub fn validate(&self) -> Result<Validated, ParamErrors> {
        self.validate_for(self.flavour)
    }

    /// Checks the template for a database of `flavour` (a MySQL 8 template reused for
    /// MariaDB, say): every parameter the target lacks is reported.
    pub fn validate_for(&self, flavour: Flavour) -> Result<Validated, ParamErrors> {
        let mut problems = Vec::new();
        if self.format != TEMPLATE_FORMAT {
            problems.push(ParamProblem::new(
                "format",
                ProblemKind::UnsupportedFormat { found: self.format },
            ));
        }
        if self.flavour.engine() != flavour.engine() {
            problems.push(ParamProblem::new(
                "flavour",
                ProblemKind::Conflict {
                    reason: format!(
                        "the template is for {}, the database is {flavour}",
                        self.flavour
                    ),
                },
            ));
        }
        let changes: serde_json::Map<String, Json> = self
            .parameters
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        match validate(flavour, &changes) {
            Ok(validated) if problems.is_empty() => Ok(validated),
            Ok(_) => Err(ParamErrors(problems)),
            Err(ParamErrors(more)) => {
                problems.extend(more);
                Err(ParamErrors(problems))
            }
        }
    }
}

fn template_json(engine: Engine, value: &Value) -> Json {
    match value {
        Value::Int(n) => Json::from(*n),
        Value::Bytes(0) | Value::DurationMs(0) => Json::from(0),
        Value::Bytes(b) => match engine {
            Engine::Postgres => Json::String(pg_size_text(*b)),
            Engine::Mysql => mysql_size_text(*b).map_or_else(|| Json::from(*b), Json::String),
        },
        Value::DurationMs(ms) => Json::String(duration_text(*ms)),
        Value::Bool(b) => Json::Bool(*b),
        Value::Text(s) => Json::String(s.clone()),
        Value::Real(x) => serde_json::Number::from_f64(*x).map_or(Json::Null, Json::Number),
        Value::Disabled => Json::from(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn changes(value: Json) -> serde_json::Map<String, Json> {
        match value {
            Json::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn ok(flavour: Flavour, value: Json) -> Validated {
        match validate(flavour, &changes(value)) {
            Ok(validated) => validated,
            Err(errors) => panic!("unexpected problems:\n{errors}"),
        }
    }

    fn one(flavour: Flavour, name: &str, raw: Json) -> Value {
        let validated = ok(flavour, json!({ name: raw }));
        validated.values[name].clone()
    }

    fn problems(flavour: Flavour, value: Json) -> Vec<ParamProblem> {
        match validate(flavour, &changes(value)) {
            Ok(validated) => panic!("expected problems, got {validated:?}"),
            Err(ParamErrors(problems)) => problems,
        }
    }

    fn message(flavour: Flavour, name: &str, raw: Json) -> String {
        let found = problems(flavour, json!({ name: raw }));
        assert_eq!(found.len(), 1, "{found:?}");
        found[0].to_string()
    }

    #[test]
    fn tables_are_sorted_unique_and_consistent() {
        for engine in [Engine::Postgres, Engine::Mysql] {
            let params = engine_params(engine);
            for pair in params.windows(2) {
                assert!(
                    pair[0].name < pair[1].name,
                    "{} then {}",
                    pair[0].name,
                    pair[1].name
                );
            }
            for spec in params {
                assert!(!spec.flavours.is_empty(), "{}", spec.name);
                assert!(
                    spec.flavours.iter().all(|f| f.engine() == engine),
                    "{}",
                    spec.name
                );
                assert!(
                    !spec.help.is_empty() && !spec.default.is_empty(),
                    "{}",
                    spec.name
                );
                assert!(!spec.help.ends_with('.'), "{}", spec.name);
                assert!(is_plain_name(spec.name), "{}", spec.name);
                match spec.kind {
                    Kind::Int { min, max } => assert!(min <= max, "{}", spec.name),
                    Kind::Real { min, max } => assert!(min <= max, "{}", spec.name),
                    Kind::Bytes { min, max, step } => {
                        assert!(min <= max && step > 0, "{}", spec.name);
                        assert_eq!(min % step, 0, "{}", spec.name);
                        assert_eq!(max % step, 0, "{}", spec.name);
                        if engine == Engine::Postgres {
                            // step doubles as the pg_settings base unit.
                            assert!([KIB, 8 * KIB, MIB].contains(&step), "{}", spec.name);
                        }
                    }
                    Kind::Duration {
                        min_ms,
                        max_ms,
                        unit,
                        step_ms,
                        ..
                    } => {
                        assert!(min_ms <= max_ms && step_ms > 0, "{}", spec.name);
                        assert_eq!(min_ms % step_ms, 0, "{}", spec.name);
                        assert_eq!(max_ms % step_ms, 0, "{}", spec.name);
                        if engine == Engine::Postgres {
                            assert_eq!(step_ms, unit.ms(), "{}", spec.name);
                        }
                    }
                    Kind::Bool => {}
                    Kind::Enum(words) => assert!(!words.is_empty(), "{}", spec.name),
                }
            }
        }
    }

    #[test]
    fn the_required_parameters_are_allowed() {
        for name in [
            "max_connections",
            "shared_buffers",
            "work_mem",
            "maintenance_work_mem",
            "effective_cache_size",
            "max_wal_size",
            "min_wal_size",
            "checkpoint_timeout",
            "wal_keep_size",
            "random_page_cost",
            "log_min_duration_statement",
            "statement_timeout",
            "idle_in_transaction_session_timeout",
            "max_worker_processes",
            "max_parallel_workers",
            "autovacuum",
            "log_connections",
        ] {
            assert!(lookup(Flavour::Postgres, name).is_some(), "{name}");
        }
        for name in [
            "max_connections",
            "innodb_buffer_pool_size",
            "binlog_expire_logs_seconds",
            "innodb_log_file_size",
            "max_allowed_packet",
            "wait_timeout",
            "long_query_time",
            "slow_query_log",
            "innodb_flush_log_at_trx_commit",
            "sync_binlog",
            "table_open_cache",
            "thread_cache_size",
            "tmp_table_size",
        ] {
            assert!(lookup(Flavour::Mysql8, name).is_some(), "{name}");
            assert!(lookup(Flavour::Mariadb, name).is_some(), "{name}");
        }
        assert!(lookup(Flavour::Mariadb, "expire_logs_days").is_some());
    }

    #[test]
    fn int_accepts_numbers_and_numeric_strings() {
        assert_eq!(
            one(Flavour::Postgres, "max_connections", json!(200)),
            Value::Int(200)
        );
        assert_eq!(
            one(Flavour::Postgres, "max_connections", json!(" 300 ")),
            Value::Int(300)
        );
        assert_eq!(
            one(Flavour::Mysql8, "max_connections", json!(10_000)),
            Value::Int(10_000)
        );
    }

    #[test]
    fn int_range_and_type_messages() {
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!(5)),
            "max_connections: 5 is below the minimum 10 (allowed 10..10000)"
        );
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!(20_000)),
            "max_connections: 20000 is above the maximum 10000 (allowed 10..10000)"
        );
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!(true)),
            "max_connections: expected a whole number, got the boolean true"
        );
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!(100.5)),
            "max_connections: expected a whole number, got the number 100.5"
        );
        assert_eq!(
            message(Flavour::Postgres, "max_connections", json!("lots")),
            "max_connections: expected a whole number, got the string \"lots\""
        );
    }

    #[test]
    fn postgres_sizes_use_postgres_units() {
        let pg = Flavour::Postgres;
        assert_eq!(
            one(pg, "shared_buffers", json!("128MB")),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(one(pg, "shared_buffers", json!("1GB")), Value::Bytes(GIB));
        assert_eq!(one(pg, "shared_buffers", json!("1 TB")), Value::Bytes(TIB));
        assert_eq!(
            one(pg, "shared_buffers", json!("1.5GB")),
            Value::Bytes(1536 * MIB)
        );
        assert_eq!(
            one(pg, "shared_buffers", json!(134_217_728)),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(one(pg, "work_mem", json!("64kB")), Value::Bytes(64 * KIB));
        assert_eq!(one(pg, "work_mem", json!("65536B")), Value::Bytes(64 * KIB));
        assert_eq!(one(pg, "wal_keep_size", json!("0")), Value::Bytes(0));
        assert_eq!(one(pg, "wal_keep_size", json!(0)), Value::Bytes(0));
    }

    #[test]
    fn postgres_size_problems() {
        let pg = Flavour::Postgres;
        assert_eq!(
            message(pg, "work_mem", json!("64mb")),
            "work_mem: \"64mb\" has an unknown unit \"mb\": PostgreSQL sizes use B, kB, MB, GB \
             or TB (case matters)"
        );
        assert_eq!(
            message(pg, "work_mem", json!("1024")),
            "work_mem: \"1024\" has no unit: give one of B, kB, MB, GB, TB (e.g. \"128MB\"), or \
             a JSON number of bytes"
        );
        assert_eq!(
            message(pg, "work_mem", json!("128M")),
            "work_mem: \"128M\" has an unknown unit \"M\": PostgreSQL sizes use B, kB, MB, GB or \
             TB (case matters)"
        );
        assert_eq!(
            message(pg, "shared_buffers", json!("1MB")),
            "shared_buffers: 1 MiB is below the minimum 16 MiB (allowed 16 MiB..1 TiB)"
        );
        assert_eq!(
            message(pg, "shared_buffers", json!("2TB")),
            "shared_buffers: 2 TiB is above the maximum 1 TiB (allowed 16 MiB..1 TiB)"
        );
        assert_eq!(
            message(pg, "shared_buffers", json!("16388kB")),
            "shared_buffers: 16388 KiB is not a whole multiple of 8 KiB (the server would round \
             it)"
        );
        assert_eq!(
            message(pg, "work_mem", json!(100_000)),
            "work_mem: 100000 B is not a whole multiple of 1 KiB (the server would round it)"
        );
        assert_eq!(
            message(pg, "work_mem", json!(-5)),
            "work_mem: \"-5\" is negative"
        );
        assert_eq!(
            message(pg, "work_mem", json!("1.0001kB")),
            "work_mem: \"1.0001kB\" is not a whole number of bytes"
        );
        assert_eq!(
            message(pg, "work_mem", json!([1])),
            "work_mem: expected a number of bytes or a size such as \"128MB\", got a list"
        );
        assert_eq!(
            message(pg, "work_mem", json!("99999999999999999999TB")),
            "work_mem: \"99999999999999999999TB\" is too large"
        );
    }

    #[test]
    fn mysql_sizes_use_mysql_suffixes() {
        let my = Flavour::Mysql8;
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!("128M")),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!("1G")),
            Value::Bytes(GIB)
        );
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!("2g")),
            Value::Bytes(2 * GIB)
        );
        assert_eq!(
            one(my, "max_allowed_packet", json!("65536K")),
            Value::Bytes(64 * MIB)
        );
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!("134217728")),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(
            one(my, "innodb_buffer_pool_size", json!(134_217_728)),
            Value::Bytes(128 * MIB)
        );
        assert_eq!(
            one(my, "tmp_table_size", json!(1_048_577)),
            Value::Bytes(MIB + 1)
        );
        assert_eq!(
            message(my, "innodb_buffer_pool_size", json!("128MB")),
            "innodb_buffer_pool_size: \"128MB\" is not a MySQL size: use a whole number of bytes \
             with an optional K, M, G or T suffix (e.g. \"128M\")"
        );
        assert_eq!(
            message(my, "max_allowed_packet", json!(MIB + 1)),
            "max_allowed_packet: 1048577 B is not a whole multiple of 1 KiB (the server would \
             round it)"
        );
        assert_eq!(
            message(my, "innodb_buffer_pool_size", json!("16M")),
            "innodb_buffer_pool_size: 16 MiB is below the minimum 32 MiB (allowed 32 MiB..1 TiB)"
        );
    }

    #[test]
    fn durations_take_base_unit_numbers_and_unit_strings() {
        let pg = Flavour::Postgres;
        // checkpoint_timeout counts seconds, statement_timeout milliseconds.
        assert_eq!(
            one(pg, "checkpoint_timeout", json!(300)),
            Value::DurationMs(300_000)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("300")),
            Value::DurationMs(300_000)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("5min")),
            Value::DurationMs(300_000)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("30s")),
            Value::DurationMs(30_000)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("1h")),
            Value::DurationMs(HOUR_MS)
        );
        assert_eq!(
            one(pg, "checkpoint_timeout", json!("1d")),
            Value::DurationMs(DAY_MS)
        );
        assert_eq!(
            one(pg, "statement_timeout", json!(5000)),
            Value::DurationMs(5000)
        );
        assert_eq!(
            one(pg, "statement_timeout", json!("5s")),
            Value::DurationMs(5000)
        );
        assert_eq!(
            one(pg, "statement_timeout", json!("250ms")),
            Value::DurationMs(250)
        );
        assert_eq!(one(pg, "statement_timeout", json!(0)), Value::DurationMs(0));
        assert_eq!(
            one(pg, "log_min_duration_statement", json!(-1)),
            Value::Disabled
        );
        assert_eq!(
            one(pg, "log_min_duration_statement", json!("-1")),
            Value::Disabled
        );
        assert_eq!(
            one(pg, "log_min_duration_statement", json!(0)),
            Value::DurationMs(0)
        );
        let my = Flavour::Mariadb;
        assert_eq!(
            one(my, "wait_timeout", json!(28_800)),
            Value::DurationMs(28_800_000)
        );
        assert_eq!(
            one(my, "wait_timeout", json!("8h")),
            Value::DurationMs(28_800_000)
        );
        assert_eq!(
            one(my, "long_query_time", json!(0.5)),
            Value::DurationMs(500)
        );
        assert_eq!(
            one(my, "long_query_time", json!("0.25")),
            Value::DurationMs(250)
        );
        assert_eq!(
            one(my, "long_query_time", json!(2)),
            Value::DurationMs(2000)
        );
    }

    #[test]
    fn duration_problems() {
        let pg = Flavour::Postgres;
        assert_eq!(
            message(pg, "checkpoint_timeout", json!("29s")),
            "checkpoint_timeout: 29 s is below the minimum 30 s (allowed 30 s..1 d)"
        );
        assert_eq!(
            message(pg, "checkpoint_timeout", json!("90500ms")),
            "checkpoint_timeout: 90500 ms is not a whole multiple of 1 s (the server would round \
             it)"
        );
        assert_eq!(
            message(pg, "statement_timeout", json!(-1)),
            "statement_timeout: \"-1\" is negative"
        );
        assert_eq!(
            message(pg, "log_min_duration_statement", json!(-2)),
            "log_min_duration_statement: \"-2\" is negative (only -1, which disables it, may be)"
        );
        assert_eq!(
            message(pg, "statement_timeout", json!("5 minutes")),
            "statement_timeout: \"5 minutes\" has an unknown unit \"minutes\": durations use ms, \
             s, min, h or d (case matters)"
        );
        assert_eq!(
            message(pg, "statement_timeout", json!("0.5ms")),
            "statement_timeout: \"0.5ms\" is not a whole number of milliseconds"
        );
        assert_eq!(
            message(pg, "statement_timeout", json!(false)),
            "statement_timeout: expected a number of milliseconds or a duration such as \"30s\" \
             or \"5min\", got the boolean false"
        );
        assert_eq!(
            message(Flavour::Mysql8, "wait_timeout", json!(0.5)),
            "wait_timeout: 500 ms is below the minimum 10 s (allowed 10 s..365 d)"
        );
        assert_eq!(
            message(Flavour::Mysql8, "binlog_expire_logs_seconds", json!(0)),
            "binlog_expire_logs_seconds: 0 ms is below the minimum 1 d (allowed 1 d..90 d)"
        );
    }

    #[test]
    fn bools_enums_and_reals() {
        let pg = Flavour::Postgres;
        assert_eq!(one(pg, "autovacuum", json!(true)), Value::Bool(true));
        assert_eq!(one(pg, "autovacuum", json!("OFF")), Value::Bool(false));
        assert_eq!(one(pg, "log_connections", json!("on")), Value::Bool(true));
        assert_eq!(
            one(pg, "log_connections", json!("False")),
            Value::Bool(false)
        );
        assert_eq!(
            message(pg, "autovacuum", json!(1)),
            "autovacuum: expected true, false, \"on\" or \"off\", got the number 1"
        );
        assert_eq!(
            one(pg, "log_statement", json!("DDL")),
            Value::Text("ddl".into())
        );
        assert_eq!(
            message(pg, "log_statement", json!("everything")),
            "log_statement: \"everything\" is not one of none, ddl, mod, all"
        );
        let my = Flavour::Mysql8;
        assert_eq!(
            one(my, "innodb_flush_log_at_trx_commit", json!(2)),
            Value::Text("2".into())
        );
        assert_eq!(
            one(my, "innodb_flush_log_at_trx_commit", json!("0")),
            Value::Text("0".into())
        );
        assert_eq!(
            message(my, "innodb_flush_log_at_trx_commit", json!(3)),
            "innodb_flush_log_at_trx_commit: \"3\" is not one of 0, 1, 2"
        );
        assert_eq!(one(pg, "random_page_cost", json!(1.1)), Value::Real(1.1));
        assert_eq!(one(pg, "random_page_cost", json!("1.1")), Value::Real(1.1));
        assert_eq!(one(pg, "random_page_cost", json!(4)), Value::Real(4.0));
        assert_eq!(
            message(pg, "random_page_cost", json!(0.05)),
            "random_page_cost: 0.05 is below the minimum 0.1 (allowed 0.1..100)"
        );
        assert_eq!(
            message(pg, "random_page_cost", json!("NaN")),
            "random_page_cost: \"NaN\" is not a finite number"
        );
    }

    #[test]
    fn unknown_names_get_a_suggestion_when_one_is_near() {
        assert_eq!(
            message(Flavour::Postgres, "shared_bufers", json!("128MB")),
            "shared_bufers: unknown parameter (did you mean shared_buffers?)"
        );
        assert_eq!(
            message(Flavour::Postgres, "Shared_Buffers", json!("128MB")),
            "Shared_Buffers: unknown parameter (did you mean shared_buffers?)"
        );
        assert_eq!(
            message(Flavour::Postgres, "max-connections", json!(100)),
            "max-connections: unknown parameter (did you mean max_connections?)"
        );
        assert_eq!(
            message(Flavour::Mysql8, "buffer_pool_size", json!("1G")),
            "buffer_pool_size: unknown parameter (did you mean innodb_buffer_pool_size?)"
        );
        assert_eq!(
            message(Flavour::Postgres, "innodb_buffer_pool_size", json!("1G")),
            "innodb_buffer_pool_size: unknown parameter for PostgreSQL (it is a MySQL parameter)"
        );
        assert_eq!(
            message(Flavour::Mariadb, "shared_buffers", json!("1G")),
            "shared_buffers: unknown parameter for MariaDB (it is a PostgreSQL parameter)"
        );
        assert_eq!(
            message(Flavour::Postgres, "fsync", json!(false)),
            "fsync: unknown parameter (not on the PostgreSQL allow-list)"
        );
        let long = "x".repeat(500);
        let shown = message(Flavour::Postgres, &long, json!(1));
        assert!(shown.len() < 200, "{shown}");
    }

    #[test]
    fn every_problem_is_reported_together_and_nothing_is_partial() {
        let found = problems(
            Flavour::Postgres,
            json!({
                "work_mem": "64MB",
                "max_connections": 5,
                "shared_bufers": "1GB",
                "autovacuum": "maybe",
                "checkpoint_timeout": "10s",
                "random_page_cost": 1.1,
            }),
        );
        let text = ParamErrors(found.clone()).to_string();
        assert_eq!(found.len(), 4, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "autovacuum: expected true, false, \"on\" or \"off\", got the string \"maybe\"",
                "checkpoint_timeout: 10 s is below the minimum 30 s (allowed 30 s..1 d)",
                "max_connections: 5 is below the minimum 10 (allowed 10..10000)",
                "shared_bufers: unknown parameter (did you mean shared_buffers?)",
            ]
        );
        assert!(lines.iter().all(|line| !line.ends_with('.')));
    }

    #[test]
    fn restart_flags_follow_the_server() {
        let restart: Vec<&str> = allow_list(Flavour::Postgres)
            .filter(|spec| spec.restart)
            .map(|spec| spec.name)
            .collect();
        assert_eq!(
            restart,
            [
                "max_connections",
                "max_locks_per_transaction",
                "max_worker_processes",
                "shared_buffers"
            ]
        );
        let restart: Vec<&str> = allow_list(Flavour::Mysql8)
            .filter(|spec| spec.restart)
            .map(|spec| spec.name)
            .collect();
        assert_eq!(
            restart,
            [
                "innodb_buffer_pool_instances",
                "innodb_log_file_size",
                "performance_schema"
            ]
        );
        let validated = ok(
            Flavour::Postgres,
            json!({"shared_buffers": "1GB", "work_mem": "8MB", "max_connections": 200}),
        );
        assert_eq!(
            validated.restart_required,
            ["max_connections", "shared_buffers"]
        );
        let validated = ok(
            Flavour::Mysql8,
            json!({"innodb_buffer_pool_size": "1G", "innodb_log_file_size": "256M"}),
        );
        assert_eq!(validated.restart_required, ["innodb_log_file_size"]);
        let validated = ok(Flavour::Mariadb, json!({"innodb_buffer_pool_size": "1G"}));
        assert!(validated.restart_required.is_empty());
    }

    #[test]
    fn null_resets_an_override() {
        let validated = ok(
            Flavour::Postgres,
            json!({"shared_buffers": null, "work_mem": null, "max_wal_size": "2GB"}),
        );
        assert_eq!(validated.reset, ["shared_buffers", "work_mem"]);
        assert_eq!(validated.restart_required, ["shared_buffers"]);
        assert_eq!(validated.values.len(), 1);
        assert_eq!(
            message(Flavour::Postgres, "shared_bufers", Json::Null),
            "shared_bufers: unknown parameter (did you mean shared_buffers?)"
        );
    }

    #[test]
    fn flavour_restrictions() {
        assert_eq!(
            message(Flavour::Mysql8, "expire_logs_days", json!(7)),
            "expire_logs_days: not available on MySQL 8 (only on MariaDB)"
        );
        assert_eq!(
            message(Flavour::Mariadb, "innodb_redo_log_capacity", json!("1G")),
            "innodb_redo_log_capacity: not available on MariaDB (only on MySQL 8)"
        );
        assert_eq!(
            one(Flavour::Mariadb, "expire_logs_days", json!(7)),
            Value::Int(7)
        );
        assert!(lookup(Flavour::Mysql8, "expire_logs_days").is_none());
        assert!(lookup(Flavour::Mysql8, "innodb_redo_log_capacity").is_some());
        assert!(allow_list(Flavour::Mariadb).all(|spec| spec.name != "innodb_redo_log_capacity"));
        assert!(allow_list(Flavour::Postgres).all(|spec| spec.available_on(Flavour::Postgres)));
        assert!(lookup(Flavour::Postgres, "wait_timeout").is_none());
        assert_eq!(
            one(Flavour::Mariadb, "binlog_expire_logs_seconds", json!("7d")),
            Value::DurationMs(7 * DAY_MS)
        );
    }

    #[test]
    fn conflicting_entries() {
        assert_eq!(
            problems(
                Flavour::Postgres,
                json!({"min_wal_size": "2GB", "max_wal_size": "1GB"})
            )[0]
            .to_string(),
            "min_wal_size: 2 GiB is above max_wal_size 1 GiB"
        );
        assert_eq!(
            problems(
                Flavour::Mariadb,
                json!({"expire_logs_days": 7, "binlog_expire_logs_seconds": 604_800})
            )[0]
            .to_string(),
            "expire_logs_days: set either expire_logs_days or binlog_expire_logs_seconds, not \
             both (the server treats them as one setting)"
        );
    }

    fn postgres_sample() -> Validated {
        ok(
            Flavour::Postgres,
            json!({
                "autovacuum": "on",
                "checkpoint_timeout": "15min",
                "effective_cache_size": "3GB",
                "log_connections": false,
                "log_min_duration_statement": -1,
                "log_statement": "ddl",
                "maintenance_work_mem": "1536MB",
                "max_connections": 250,
                "max_wal_size": "2GB",
                "min_wal_size": "80MB",
                "random_page_cost": 1.1,
                "shared_buffers": "1GB",
                "statement_timeout": 1500,
                "wal_keep_size": 0,
                "work_mem": "4100kB",
            }),
        )
    }

    #[test]
    fn render_postgres_exactly() {
        let rendered = render_postgres(&postgres_sample().values);
        let body: Vec<&str> = rendered.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "autovacuum = 'on'",
                "checkpoint_timeout = '15min'",
                "effective_cache_size = '3GB'",
                "log_connections = 'off'",
                "log_min_duration_statement = '-1'",
                "log_statement = 'ddl'",
                "maintenance_work_mem = '1536MB'",
                "max_connections = '250'",
                "max_wal_size = '2GB'",
                "min_wal_size = '80MB'",
                "random_page_cost = '1.1'",
                "shared_buffers = '1GB'",
                "statement_timeout = '1500ms'",
                "wal_keep_size = '0'",
                "work_mem = '4100kB'",
            ]
        );
    }

    #[test]
    fn render_postgres_round_trips() {
        let mut values = postgres_sample().values;
        let parsed = parse_rendered_postgres(&render_postgres(&values));
        assert_eq!(parsed.as_ref(), Ok(&values));
        // Names the agent no longer allows survive as text, quotes and backslashes too.
        values.insert(
            "application_name".into(),
            Value::Text("it's a \\ test\n\tx".into()),
        );
        let rendered = render_postgres(&values);
        assert!(
            rendered.contains("application_name = 'it''s a \\\\ test\\n\\tx'"),
            "{rendered}"
        );
        assert_eq!(parse_rendered_postgres(&rendered), Ok(values));
    }

    #[test]
    fn parse_postgres_reads_server_syntax_and_reports_lines() {
        let text =
            "# comment\n\nshared_buffers = 16384 # pages\nwork_mem '4MB'\nMAX_CONNECTIONS=100\n";
        let parsed = parse_rendered_postgres(text).unwrap();
        assert_eq!(parsed["shared_buffers"], Value::Bytes(128 * MIB));
        assert_eq!(parsed["work_mem"], Value::Bytes(4 * MIB));
        assert_eq!(parsed["max_connections"], Value::Int(100));
        assert_eq!(
            parse_rendered_postgres("work_mem = '4MB'\nshared_buffers = '128MB"),
            Err(OverridesParseError {
                line: 2,
                message: "shared_buffers: unterminated quoted value".into()
            })
        );
        assert_eq!(
            parse_rendered_postgres("\nwork_mem = 'lots'").map_err(|e| e.to_string()),
            Err("line 2: work_mem: \"lots\" is not a size (e.g. \"128MB\")".to_string())
        );
        assert_eq!(
            parse_rendered_postgres("work_mem = '4MB' extra").map_err(|e| e.line),
            Err(1)
        );
    }

    fn mysql_sample() -> Validated {
        ok(
            Flavour::Mysql8,
            json!({
                "binlog_expire_logs_seconds": "7d",
                "innodb_buffer_pool_size": "2G",
                "innodb_flush_log_at_trx_commit": 2,
                "innodb_redo_log_capacity": "1G",
                "long_query_time": 0.5,
                "max_allowed_packet": "64M",
                "max_connections": 500,
                "slow_query_log": true,
                "sync_binlog": 1,
                "tmp_table_size": 16_777_217,
                "wait_timeout": 600,
            }),
        )
    }

    #[test]
    fn render_mysql_exactly() {
        let rendered = render_mysql(&mysql_sample().values);
        let body: Vec<&str> = rendered.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "[mysqld]",
                "binlog_expire_logs_seconds = 604800",
                "innodb_buffer_pool_size = 2147483648",
                "innodb_flush_log_at_trx_commit = 2",
                "innodb_redo_log_capacity = 1073741824",
                "long_query_time = 0.5",
                "max_allowed_packet = 67108864",
                "max_connections = 500",
                "slow_query_log = ON",
                "sync_binlog = 1",
                "tmp_table_size = 16777217",
                "wait_timeout = 600",
            ]
        );
    }

    #[test]
    fn render_mysql_round_trips() {
        let mut values = mysql_sample().values;
        assert_eq!(
            parse_rendered_mysql(&render_mysql(&values)).as_ref(),
            Ok(&values)
        );
        values.insert(
            "log_error".into(),
            Value::Text("/var/log/my sql/\"err\".log".into()),
        );
        values.insert("long_query_time".into(), Value::DurationMs(1250));
        let rendered = render_mysql(&values);
        assert!(rendered.contains("long_query_time = 1.25\n"), "{rendered}");
        assert_eq!(parse_rendered_mysql(&rendered), Ok(values));
    }

    #[test]
    fn parse_mysql_reads_option_file_syntax() {
        let text = "[client]\nport = 3306\n[mysqld]\n; comment\nmax-connections = 300\n\
                    slow_query_log\ninnodb_buffer_pool_size = 1G # one gig\n\
                    wait_timeout = '600'\n";
        let parsed = parse_rendered_mysql(text).unwrap();
        assert_eq!(parsed.len(), 4, "{parsed:?}");
        assert_eq!(parsed["max_connections"], Value::Int(300));
        assert_eq!(parsed["slow_query_log"], Value::Bool(true));
        assert_eq!(parsed["innodb_buffer_pool_size"], Value::Bytes(GIB));
        assert_eq!(parsed["wait_timeout"], Value::DurationMs(600_000));
        assert_eq!(
            parse_rendered_mysql("max_connections = 1").map_err(|e| e.line),
            Err(1)
        );
        assert_eq!(
            parse_rendered_mysql("[mysqld]\nmax_connections = many").map_err(|e| e.to_string()),
            Err("line 2: max_connections: \"many\" is not a whole number".to_string())
        );
    }

    #[test]
    fn pg_settings_rows() {
        assert_eq!(
            pg_settings_to_value("shared_buffers", "16384", Some("8kB")),
            Some(Value::Bytes(128 * MIB))
        );
        assert_eq!(
            pg_settings_to_value("work_mem", "4096", Some("kB")),
            Some(Value::Bytes(4 * MIB))
        );
        assert_eq!(
            pg_settings_to_value("checkpoint_timeout", "300", Some("s")),
            Some(Value::DurationMs(300_000))
        );
        assert_eq!(
            pg_settings_to_value("max_wal_size", "1024", Some("MB")),
            Some(Value::Bytes(GIB))
        );
        assert_eq!(
            pg_settings_to_value("log_min_duration_statement", "-1", Some("ms")),
            Some(Value::Disabled)
        );
        assert_eq!(
            pg_settings_to_value("statement_timeout", "0", Some("ms")),
            Some(Value::DurationMs(0))
        );
        assert_eq!(
            pg_settings_to_value("random_page_cost", "4", None),
            Some(Value::Real(4.0))
        );
        assert_eq!(
            pg_settings_to_value("autovacuum", "on", None),
            Some(Value::Bool(true))
        );
        assert_eq!(
            pg_settings_to_value("max_connections", "100", None),
            Some(Value::Int(100))
        );
        assert_eq!(
            pg_settings_to_value("log_statement", "none", None),
            Some(Value::Text("none".into()))
        );
        assert_eq!(pg_settings_to_value("fsync", "on", None), None);
        assert_eq!(
            pg_settings_to_value("shared_buffers", "lots", Some("8kB")),
            None
        );
        assert_eq!(
            pg_settings_to_value("shared_buffers", "16384", Some("8 parsecs")),
            None
        );
        // The live form compares equal to the validated request.
        assert_eq!(
            pg_settings_to_value("shared_buffers", "131072", Some("8kB")),
            Some(one(Flavour::Postgres, "shared_buffers", json!("1GB")))
        );
    }

    #[test]
    fn show_values_compare_with_requests() {
        let pg = Flavour::Postgres;
        for (name, shown, requested) in [
            ("shared_buffers", "128MB", json!("128MB")),
            ("work_mem", "4MB", json!(4 * MIB)),
            ("effective_cache_size", "4GB", json!("4GB")),
            ("checkpoint_timeout", "5min", json!(300)),
            ("statement_timeout", "0", json!(0)),
            ("log_min_duration_statement", "-1", json!(-1)),
            ("log_min_duration_statement", "250ms", json!(250)),
            ("autovacuum", "on", json!(true)),
            ("log_statement", "none", json!("none")),
            ("random_page_cost", "1.1", json!(1.1)),
            ("max_connections", "100", json!(100)),
        ] {
            assert_eq!(
                sql_show_value(pg, name, shown),
                Some(one(pg, name, requested)),
                "{name} {shown}"
            );
        }
        let my = Flavour::Mariadb;
        for (name, shown, requested) in [
            ("innodb_buffer_pool_size", "134217728", json!("128M")),
            ("long_query_time", "10.000000", json!(10)),
            ("long_query_time", "0.500000", json!(0.5)),
            ("slow_query_log", "0", json!(false)),
            ("slow_query_log", "ON", json!(true)),
            ("wait_timeout", "28800", json!("8h")),
            ("innodb_flush_log_at_trx_commit", "1", json!(1)),
            ("max_connections", "151", json!(151)),
        ] {
            assert_eq!(
                sql_show_value(my, name, shown),
                Some(one(my, name, requested)),
                "{name} {shown}"
            );
        }
        assert_eq!(
            sql_show_value(my, "expire_logs_days", "7.000000"),
            Some(Value::Int(7))
        );
        assert_eq!(sql_show_value(my, "expire_logs_days", "0.500000"), None);
        assert_eq!(sql_show_value(my, "shared_buffers", "128MB"), None);
        assert_eq!(sql_show_value(pg, "shared_buffers", "many"), None);
        assert_eq!(
            sql_show_value(Flavour::Mysql8, "expire_logs_days", "0"),
            None
        );
    }

    #[test]
    fn values_display_in_human_units() {
        assert_eq!(Value::Bytes(128 * MIB).to_string(), "128 MiB");
        assert_eq!(Value::Bytes(1536 * KIB).to_string(), "1536 KiB");
        assert_eq!(Value::Bytes(GIB).to_string(), "1 GiB");
        assert_eq!(Value::Bytes(1000).to_string(), "1000 B");
        assert_eq!(Value::Bytes(0).to_string(), "0 B");
        assert_eq!(Value::DurationMs(5000).to_string(), "5 s");
        assert_eq!(Value::DurationMs(300_000).to_string(), "5 min");
        assert_eq!(Value::DurationMs(250).to_string(), "250 ms");
        assert_eq!(Value::DurationMs(DAY_MS).to_string(), "1 d");
        assert_eq!(Value::Bool(true).to_string(), "on");
        assert_eq!(Value::Real(1.1).to_string(), "1.1");
        assert_eq!(Value::Int(-3).to_string(), "-3");
        assert_eq!(Value::Text("ddl".into()).to_string(), "ddl");
        assert_eq!(Value::Disabled.to_string(), "disabled (-1)");
    }

    #[test]
    fn templates_round_trip_through_json() {
        for sample in [postgres_sample(), mysql_sample()] {
            let template = Template::from_values(sample.flavour, &sample.values);
            let text = serde_json::to_string(&template).unwrap();
            let back: Template = serde_json::from_str(&text).unwrap();
            assert_eq!(back, template);
            assert_eq!(back.validate().unwrap().values, sample.values, "{text}");
        }
        let template = Template::from_values(
            Flavour::Postgres,
            &ok(
                Flavour::Postgres,
                json!({"shared_buffers": "256MB", "checkpoint_timeout": 600}),
            )
            .values,
        );
        assert_eq!(
            serde_json::to_value(&template).unwrap(),
            json!({
                "format": 1,
                "flavour": "postgres",
                "parameters": {"checkpoint_timeout": "10min", "shared_buffers": "256MB"}
            })
        );
        let template = Template::from_values(Flavour::Mysql8, &mysql_sample().values);
        assert_eq!(template.parameters["innodb_buffer_pool_size"], json!("2G"));
        assert_eq!(template.parameters["tmp_table_size"], json!(16_777_217));
        assert_eq!(template.parameters["long_query_time"], json!("500ms"));
    }

    #[test]
    fn template_problems() {
        let mut template = Template::from_values(Flavour::Mysql8, &mysql_sample().values);
        let errors = template.validate_for(Flavour::Mariadb).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "innodb_redo_log_capacity: not available on MariaDB (only on MySQL 8)"
        );
        template.format = 2;
        template
            .parameters
            .insert("password".into(), json!("hunter2"));
        let errors = template.validate().unwrap_err().to_string();
        let lines: Vec<&str> = errors.lines().collect();
        assert_eq!(lines.len(), 2, "{errors}");
        assert_eq!(
            lines[0],
            "format: template format 2 is not supported (this agent reads format 1)"
        );
        assert_eq!(
            lines[1],
            "password: unknown parameter (not on the MySQL 8 allow-list)"
        );
        assert!(!errors.contains("hunter2"));
        let template = Template::from_values(Flavour::Postgres, &postgres_sample().values);
        let errors = template.validate_for(Flavour::Mysql8).unwrap_err();
        assert_eq!(
            errors.0[0].to_string(),
            "flavour: the template is for PostgreSQL, the database is MySQL 8"
        );
        let template: Template = serde_json::from_value(json!({
            "format": 1, "flavour": "mariadb", "parameters": {"expire_logs_days": 3}
        }))
        .unwrap();
        assert_eq!(
            template.validate().unwrap().values["expire_logs_days"],
            Value::Int(3)
        );
    }

    #[test]
    fn engine_and_flavour_names_on_the_wire() {
        assert_eq!(
            serde_json::to_value(Engine::Postgres).unwrap(),
            json!("postgres")
        );
        assert_eq!(serde_json::to_value(Engine::Mysql).unwrap(), json!("mysql"));
        assert_eq!(
            serde_json::to_value(Flavour::Mysql8).unwrap(),
            json!("mysql8")
        );
        assert_eq!(
            serde_json::to_value(Flavour::Mariadb).unwrap(),
            json!("mariadb")
        );
        assert_eq!(Flavour::Mariadb.engine(), Engine::Mysql);
        assert_eq!(Flavour::Postgres.engine(), Engine::Postgres);
        assert_eq!(Flavour::Mysql8.to_string(), "MySQL 8");
    }

    #[test]
    fn exact_decimal_scaling() {
        assert_eq!(scale_decimal("1.5", GIB), Ok(1536 * MIB));
        assert_eq!(scale_decimal(".5", SECOND_MS), Ok(500));
        assert_eq!(scale_decimal("10.000000", SECOND_MS), Ok(10_000));
        assert_eq!(
            scale_decimal("0.0001", SECOND_MS),
            Err(NumberError::NotWhole)
        );
        assert_eq!(scale_decimal(".", 1), Err(NumberError::NotANumber));
        assert_eq!(scale_decimal("1e5", 1), Err(NumberError::NotANumber));
        assert_eq!(scale_decimal("-1", 1), Err(NumberError::Negative));
        assert_eq!(
            scale_decimal("18446744073709551616", 1),
            Err(NumberError::TooLarge)
        );
        assert_eq!(scale_decimal("18446744073709551615", 1), Ok(u64::MAX));
        assert_eq!(
            scale_decimal("17179869184", GIB),
            Err(NumberError::TooLarge)
        );
    }
}
