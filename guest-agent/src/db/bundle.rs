//! The database capability's bundle parts: its status (phase, parameters, the
//! container's state), the config files the agent writes (only the agent's own keys and
//! the parameter allow-list keep their values), `pg_hba.conf`, the server's log files
//! (with `include_db_logs`) and the server's diagnostic views — settings, sessions,
//! sizes — read over the admin socket (with `include_db_views`).

use super::engine::Admin;
use super::params::{allow_list, Flavour};
use super::DbManager;
use crate::bundle::{ConfigFormat, Part, Producer, Request};
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};

/// The keys of the main config files the agent writes (see
/// [`super::engine::main_config`]); none holds a secret.
const OWN_KEYS: &[&str] = &[
    "hba_file",
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "unix_socket_permissions",
    "password_encryption",
    "logging_collector",
    "log_directory",
    "log_filename",
    "log_truncate_on_rotation",
    "log_rotation_age",
    "jit",
    "wal_level",
    "archive_mode",
    "archive_command",
    "archive_timeout",
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_min_protocol_version",
    "max_wal_size",
    "min_wal_size",
    "max_slot_wal_keep_size",
    "mysqld.datadir",
    "mysqld.socket",
    "mysqld.pid-file",
    "mysqld.port",
    "mysqld.bind-address",
    "mysqld.log-error",
    "mysqld.log-bin",
    "mysqld.server-id",
    "mysqld.skip-name-resolve",
    "mysqld.ssl-cert",
    "mysqld.ssl-key",
    "mysqld.require-secure-transport",
];

/// The agent's own keys and every parameter of the allow-list (users may set only
/// those, and none is a secret), for one engine family. Leaked once per process: the
/// redaction takes `'static` key lists.
pub(crate) fn safe_keys(flavour: Flavour) -> &'static [&'static str] {
    static POSTGRES: LazyLock<Vec<&'static str>> =
        LazyLock::new(|| keys_for(Flavour::Postgres, ""));
    static MARIADB: LazyLock<Vec<&'static str>> =
        LazyLock::new(|| keys_for(Flavour::Mariadb, "mysqld."));
    static MYSQL8: LazyLock<Vec<&'static str>> =
        LazyLock::new(|| keys_for(Flavour::Mysql8, "mysqld."));
    match flavour {
        Flavour::Postgres => &POSTGRES,
        Flavour::Mariadb => &MARIADB,
        Flavour::Mysql8 => &MYSQL8,
    }
}

fn keys_for(flavour: Flavour, section: &str) -> Vec<&'static str> {
    let mut keys: Vec<&'static str> = OWN_KEYS.to_vec();
    for spec in allow_list(flavour) {
        keys.push(spec.name);
        if !section.is_empty() {
            // The include file has the same [mysqld] section; a key may be written with
            // dashes or underscores.
            keys.push(Box::leak(
                format!("{section}{}", spec.name).into_boxed_str(),
            ));
            let dashed = spec.name.replace('_', "-");
            keys.push(Box::leak(format!("{section}{dashed}").into_boxed_str()));
        }
    }
    keys
}

pub fn parts(db: &Arc<DbManager>, request: &Request) -> Vec<Part> {
    let d = db.clone();
    let mut parts = vec![Part::produced("db/status.json", "db.status", async move {
        let status = d.status().await.map_err(|e| e.to_string())?;
        serde_json::to_vec_pretty(&status).map_err(|e| e.to_string())
    })];
    let Some(flavour) = db.flavour() else {
        parts.push(Part::log(
            "db/",
            "the database",
            Producer::Unavailable("no database has been created on this VM yet".into()),
        ));
        return parts;
    };
    let p = db.paths();
    for file in [p.main_config(flavour), p.params_file(flavour)] {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        parts.push(Part::config(
            format!("db/conf/{name}"),
            file.display().to_string(),
            Producer::File(file),
            ConfigFormat::KeyValue,
            safe_keys(flavour),
        ));
    }
    if flavour == Flavour::Postgres {
        // Rules, no secrets: log-style.
        parts.push(Part::log_file(
            "db/conf/pg_hba.conf",
            p.conf.join("pg_hba.conf"),
        ));
    }
    if request.include_db_views {
        let d = db.clone();
        parts.push(Part::produced(
            "db/views.txt",
            "the server's settings, sessions and sizes (admin socket)",
            async move {
                let Some(spec) = d.current_spec().await else {
                    return Err("no database has been created on this VM yet".into());
                };
                let mut admin = Admin::connect(&spec, d.paths())
                    .await
                    .map_err(|e| format!("cannot reach the server: {e}"))?;
                Ok(views(&mut admin).await.into_bytes())
            },
        ));
    } else {
        parts.push(Part::log(
            "db/views.txt",
            "the server's diagnostic views",
            Producer::Unavailable("the bundle was asked without include_db_views".into()),
        ));
    }
    if request.include_db_logs {
        parts.push(Part::log(
            "db/log/",
            p.log.display().to_string(),
            Producer::Dir(p.log.clone()),
        ));
    } else {
        parts.push(Part::log(
            "db/log/",
            p.log.display().to_string(),
            Producer::Unavailable("the bundle was asked without database logs".into()),
        ));
    }
    parts
}

/// The diagnostic queries, per engine family: a title and the SQL.
const PG_VIEWS: &[(&str, &str)] = &[
    (
        "settings",
        "SELECT name, setting, unit, source FROM pg_settings ORDER BY name",
    ),
    (
        "sessions",
        "SELECT pid, usename, datname, application_name, client_addr, state, wait_event_type, \
         wait_event, backend_start, xact_start, query_start, left(query, 1000) AS query \
         FROM pg_stat_activity ORDER BY pid",
    ),
    (
        "database sizes",
        "SELECT datname, pg_database_size(datname) AS bytes FROM pg_database ORDER BY datname",
    ),
    ("archiver", "SELECT * FROM pg_stat_archiver"),
    ("replication", "SELECT * FROM pg_stat_replication"),
];
const MYSQL_VIEWS: &[(&str, &str)] = &[
    ("settings", "SHOW GLOBAL VARIABLES"),
    ("status", "SHOW GLOBAL STATUS"),
    ("sessions", "SHOW FULL PROCESSLIST"),
    (
        "database sizes",
        "SELECT table_schema, SUM(data_length + index_length) AS bytes \
         FROM information_schema.tables GROUP BY table_schema ORDER BY table_schema",
    ),
];

/// Every view as `column='value'` rows (quoted so the log patterns see a whole value: a
/// column named like a secret loses all of it; a query's text passes the SQL patterns).
/// A query that fails is a line saying so; the others still run.
async fn views(admin: &mut Admin) -> String {
    let mut out = String::new();
    match admin {
        Admin::Postgres(c, _) => {
            for (title, sql) in PG_VIEWS {
                let _ = writeln!(out, "== {title}: {sql}");
                match c.simple_query(sql).await {
                    Ok(messages) => {
                        for m in messages {
                            if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                                let cells = row.columns().iter().enumerate().map(|(i, col)| {
                                    (col.name().to_string(), row.get(i).map(str::to_string))
                                });
                                out.push_str(&render_row(cells));
                            }
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(out, "-- failed: {e}");
                    }
                }
            }
        }
        Admin::Mysql(c) => {
            use mysql_async::prelude::Queryable;
            for (title, sql) in MYSQL_VIEWS {
                let _ = writeln!(out, "== {title}: {sql}");
                match c.query::<mysql_async::Row, _>(*sql).await {
                    Ok(rows) => {
                        for row in rows {
                            let names: Vec<String> = row
                                .columns_ref()
                                .iter()
                                .map(|c| c.name_str().into_owned())
                                .collect();
                            let values = row.unwrap();
                            let cells = names.into_iter().zip(values).map(|(n, v)| {
                                let text = match v {
                                    mysql_async::Value::NULL => None,
                                    mysql_async::Value::Bytes(b) => {
                                        Some(String::from_utf8_lossy(&b).into_owned())
                                    }
                                    other => Some(other.as_sql(true)),
                                };
                                (n, text)
                            });
                            out.push_str(&render_row(cells));
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(out, "-- failed: {e}");
                    }
                }
            }
        }
    }
    out
}

/// One row: `name = 'value'` for a name/value view (settings), else
/// `col='value' col='value'`; NULL as NULL, newlines as spaces. A value is wrapped in a
/// quote it does not contain (`'`, else `"`; a value with both has its `"` made `'`), so
/// the log patterns see it whole: a setting named like a secret loses all of its value,
/// and `PASSWORD '…'` inside a query's text is still found.
fn render_row(cells: impl Iterator<Item = (String, Option<String>)>) -> String {
    let quote = |v: Option<String>| match v {
        None => "NULL".to_string(),
        Some(v) => {
            let v = v.replace(['\n', '\r'], " ");
            if !v.contains('\'') {
                format!("'{v}'")
            } else {
                format!("\"{}\"", v.replace('"', "'"))
            }
        }
    };
    let cells: Vec<(String, Option<String>)> = cells.collect();
    let names: Vec<&str> = cells.iter().map(|(n, _)| n.as_str()).collect();
    let setting_name = matches!(names.first(), Some(&"name") | Some(&"Variable_name"));
    let mut line = String::new();
    let mut rest = cells.into_iter();
    if setting_name {
        if let Some((_, Some(name))) = rest.next() {
            if let Some((_, value)) = rest.next() {
                line.push_str(&format!("{name} = {}", quote(value)));
            }
        }
    }
    for (n, v) in rest {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&format!("{n}={}", quote(v)));
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_quote_whole_values_so_the_patterns_see_them() {
        let row = |cells: &[(&str, Option<&str>)]| {
            render_row(
                cells
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.map(str::to_string))),
            )
        };
        let settings = row(&[
            ("name", Some("ssl_passphrase_command")),
            ("setting", Some("echo Plant Secret'x")),
            ("unit", None),
        ]);
        assert_eq!(
            settings,
            "ssl_passphrase_command = \"echo Plant Secret'x\" unit=NULL\n"
        );
        let session = row(&[
            ("pid", Some("7")),
            ("query", Some("ALTER ROLE app PASSWORD 'PlantQuery1'")),
            ("note", Some("a \"b\" 'c'")),
        ]);
        assert_eq!(
            session,
            "pid='7' query=\"ALTER ROLE app PASSWORD 'PlantQuery1'\" note=\"a 'b' 'c'\"\n"
        );
        for (line, planted) in [(settings, "Plant"), (session, "PlantQuery1")] {
            let mut n = 0;
            let out = crate::bundle::redact::redact_text(line.trim_end(), &mut n);
            assert!(!out.contains(planted), "{out}");
            assert_eq!(n, 1, "{out}");
        }
    }

    #[test]
    fn config_keys_cover_the_parameters_and_the_agents_own() {
        let pg = safe_keys(Flavour::Postgres);
        assert!(pg.contains(&"shared_buffers") && pg.contains(&"archive_command"));
        let maria = safe_keys(Flavour::Mariadb);
        assert!(maria.contains(&"mysqld.port"));
        assert!(maria
            .iter()
            .any(|k| k.starts_with("mysqld.") && k.contains("buffer")));
    }
}
