//! Helpers the parameter tests share: change sets from JSON, and two validated samples.

use serde_json::{json, Value as Json};

use super::{validate, Flavour, ParamErrors, ParamProblem, Validated, Value};

fn changes(value: Json) -> serde_json::Map<String, Json> {
    match value {
        Json::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

pub(super) fn ok(flavour: Flavour, value: Json) -> Validated {
    match validate(flavour, &changes(value)) {
        Ok(validated) => validated,
        Err(errors) => panic!("unexpected problems:\n{errors}"),
    }
}

pub(super) fn one(flavour: Flavour, name: &str, raw: Json) -> Value {
    let validated = ok(flavour, json!({ name: raw }));
    validated.values[name].clone()
}

pub(super) fn problems(flavour: Flavour, value: Json) -> Vec<ParamProblem> {
    match validate(flavour, &changes(value)) {
        Ok(validated) => panic!("expected problems, got {validated:?}"),
        Err(ParamErrors(problems)) => problems,
    }
}

pub(super) fn message(flavour: Flavour, name: &str, raw: Json) -> String {
    let found = problems(flavour, json!({ name: raw }));
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].to_string()
}

pub(super) fn postgres_sample() -> Validated {
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

pub(super) fn mysql_sample() -> Validated {
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
