//! The allow-list: every parameter a control plane may change, one table per engine,
//! with its type, safe range, restart flag, default and help. The data of this module is
//! the whole policy; the other modules only interpret it.

use super::spec::{Engine, Flavour, Kind, ParamSpec, TimeUnit};
use super::units::{DAY_MS, GIB, KIB, MIB, SECOND_MS, TIB};

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

pub(super) fn find(engine: Engine, name: &str) -> Option<&'static ParamSpec> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::params::overrides::is_plain_name;
    use crate::db::params::test_support::ok;
    use serde_json::json;

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
}
