//! What differs between PostgreSQL and the MySQL family: the directory layout inside
//! `data_root`, the commands that initialise and run the server, the configuration files
//! the agent writes, and the admin connection (a unix socket only root and the database
//! user can reach) through which the agent creates users and reads the server's state.

use super::params::{self, Flavour};
use super::{DatabaseSpec, DbError};
use crate::runtime::{ContainerRuntime, State};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The name of the user the control plane gets (DSM's single database user).
pub const DBAAS_USER: &str = "dbaas";

/// Directories under `data_root`. The container mounts `data_root` at the same path, so
/// every path here means the same inside and outside it.
#[derive(Clone, Debug)]
pub struct Paths {
    pub root: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    pub run: PathBuf,
    pub conf: PathBuf,
    pub tls: PathBuf,
}

impl Paths {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            data: root.join("data"),
            log: root.join("log"),
            run: root.join("run"),
            conf: root.join("conf"),
            tls: root.join("tls"),
        }
    }

    /// Every directory, in creation order.
    pub fn all(&self) -> [&Path; 6] {
        [
            &self.root, &self.data, &self.log, &self.run, &self.conf, &self.tls,
        ]
    }

    pub fn tls_cert(&self) -> PathBuf {
        self.tls.join("server.crt")
    }

    pub fn tls_key(&self) -> PathBuf {
        self.tls.join("server.key")
    }

    pub fn params_file(&self, f: Flavour) -> PathBuf {
        match f {
            Flavour::Postgres => self.conf.join("params.conf"),
            _ => self.conf.join("params.cnf"),
        }
    }

    pub fn main_config(&self, f: Flavour) -> PathBuf {
        match f {
            Flavour::Postgres => self.conf.join("postgresql.conf"),
            _ => self.conf.join("my.cnf"),
        }
    }

    pub fn mysql_socket(&self) -> PathBuf {
        self.run.join("mysqld.sock")
    }

    /// Whether the data directory holds an initialised database.
    pub fn initialised(&self, f: Flavour) -> bool {
        match f {
            Flavour::Postgres => self.data.join("PG_VERSION").is_file(),
            _ => {
                self.data.join("mysql").join("user.frm").exists()
                    || self.data.join("mysql").join("global_priv.frm").exists()
                    || self.data.join("mysql").join("global_priv.MAI").exists()
                    || self.data.join("mysql.ibd").exists()
            }
        }
    }
}

/// The one-shot command that initialises an empty data directory, run as the database user.
pub fn init_argv(f: Flavour, p: &Paths, program: impl Fn(&str) -> String) -> Vec<String> {
    match f {
        Flavour::Postgres => vec![
            program("initdb"),
            "-D".into(),
            p.data.display().to_string(),
            "-U".into(),
            "postgres".into(),
            "--auth-local=trust".into(),
            "--auth-host=scram-sha-256".into(),
            "--encoding=UTF8".into(),
            "--locale=C".into(),
            "--no-instructions".into(),
        ],
        Flavour::Mariadb => vec![
            program("mariadb-install-db"),
            format!("--defaults-file={}", p.main_config(f).display()),
            "--auth-root-authentication-method=socket".into(),
            "--skip-test-db".into(),
            "--skip-name-resolve".into(),
        ],
        Flavour::Mysql8 => vec![
            program("mysqld"),
            format!("--defaults-file={}", p.main_config(f).display()),
            "--initialize-insecure".into(),
        ],
    }
}

/// The server in the foreground (the container's main process).
pub fn server_argv(f: Flavour, p: &Paths, program: impl Fn(&str) -> String) -> Vec<String> {
    match f {
        Flavour::Postgres => vec![
            program("postgres"),
            "-D".into(),
            p.data.display().to_string(),
            "-c".into(),
            format!("config_file={}", p.main_config(f).display()),
        ],
        Flavour::Mariadb => vec![
            program("mariadbd"),
            format!("--defaults-file={}", p.main_config(f).display()),
        ],
        Flavour::Mysql8 => vec![
            program("mysqld"),
            format!("--defaults-file={}", p.main_config(f).display()),
        ],
    }
}

fn pg_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// DSM's log caps while backups are on: a PostgreSQL primary's WAL is held to this share
/// of the data disk, a MySQL primary's binary logs to [`BINLOG_CAP_PCT`].
pub const WAL_CAP_PCT: u64 = 15;
/// See [`WAL_CAP_PCT`].
pub const BINLOG_CAP_PCT: u64 = 10;

/// The WAL cap for a data disk of `disk_bytes`.
pub fn wal_cap(disk_bytes: u64) -> u64 {
    disk_bytes / 100 * WAL_CAP_PCT
}

/// The main configuration file (the agent's; parameters go to the include file).
/// `archive_command`: PostgreSQL's WAL archiving, on when the backup capability set it
/// (never a user parameter: the agent owns where WAL goes). `wal_cap_bytes`: the WAL
/// cap ([`WAL_CAP_PCT`] of the data disk), set with archiving.
pub fn main_config(
    spec: &DatabaseSpec,
    p: &Paths,
    archive_command: Option<&str>,
    wal_cap_bytes: Option<u64>,
) -> String {
    let f = spec.engine;
    let port = spec.port();
    match f {
        Flavour::Postgres => {
            let mut s = String::from(
                "# Written by dbvm-agent: changes here are overwritten. Parameters live in params.conf\n",
            );
            let kv = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k} = {v}\n"));
            kv(
                &mut s,
                "hba_file",
                pg_quote(&p.conf.join("pg_hba.conf").display().to_string()),
            );
            kv(&mut s, "listen_addresses", pg_quote("*"));
            kv(&mut s, "port", port.to_string());
            kv(
                &mut s,
                "unix_socket_directories",
                pg_quote(&p.run.display().to_string()),
            );
            kv(&mut s, "unix_socket_permissions", "0700".into());
            kv(&mut s, "password_encryption", pg_quote("scram-sha-256"));
            kv(&mut s, "logging_collector", "on".into());
            kv(
                &mut s,
                "log_directory",
                pg_quote(&p.log.display().to_string()),
            );
            kv(&mut s, "log_filename", pg_quote("postgresql-%a.log"));
            kv(&mut s, "log_truncate_on_rotation", "on".into());
            kv(&mut s, "log_rotation_age", pg_quote("1d"));
            kv(&mut s, "jit", "off".into());
            if let Some(cmd) = archive_command {
                kv(&mut s, "wal_level", "replica".into());
                kv(&mut s, "archive_mode", "on".into());
                kv(&mut s, "archive_command", pg_quote(cmd));
                // A quiet database still closes a WAL segment every minute: the newest
                // archived segment is never older than that while archiving works.
                kv(&mut s, "archive_timeout", pg_quote("60s"));
            }
            if spec.tls {
                kv(&mut s, "ssl", "on".into());
                kv(
                    &mut s,
                    "ssl_cert_file",
                    pg_quote(&p.tls_cert().display().to_string()),
                );
                kv(
                    &mut s,
                    "ssl_key_file",
                    pg_quote(&p.tls_key().display().to_string()),
                );
                kv(&mut s, "ssl_min_protocol_version", pg_quote("TLSv1.2"));
            }
            s.push_str(&format!(
                "include {}\n",
                pg_quote(&p.params_file(f).display().to_string())
            ));
            if let Some(cap) = wal_cap_bytes {
                // After the include, so a parameter cannot lift the cap. Checkpoints keep
                // WAL near max_wal_size; slots may hold the other half. PostgreSQL never
                // removes a segment that is not archived yet: a failing archive grows
                // past the cap, and health check 9 says so.
                let mb = |b: u64| format!("{}MB", (b >> 20).max(32));
                s.push_str(&format!(
                    "# The WAL cap: {WAL_CAP_PCT}% of the data disk ({} MiB) while backups are on\n",
                    cap >> 20
                ));
                kv(&mut s, "max_wal_size", mb(cap / 2));
                kv(&mut s, "min_wal_size", mb((cap / 4).min(80 << 20)));
                kv(&mut s, "max_slot_wal_keep_size", mb(cap / 2));
            }
            s
        }
        Flavour::Mariadb | Flavour::Mysql8 => {
            let mut s = String::from(
                "# Written by dbvm-agent: changes here are overwritten. Parameters live in params.cnf\n[mysqld]\n",
            );
            let kv = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k} = {v}\n"));
            kv(&mut s, "datadir", p.data.display().to_string());
            kv(&mut s, "socket", p.mysql_socket().display().to_string());
            kv(
                &mut s,
                "pid-file",
                p.run.join("mysqld.pid").display().to_string(),
            );
            kv(&mut s, "port", port.to_string());
            kv(&mut s, "bind-address", "0.0.0.0".into());
            kv(
                &mut s,
                "log-error",
                p.log.join("mysqld.err").display().to_string(),
            );
            kv(
                &mut s,
                "log-bin",
                p.data.join("binlog").display().to_string(),
            );
            kv(&mut s, "server-id", "1".into());
            kv(&mut s, "skip-name-resolve", "1".into());
            if spec.tls {
                kv(&mut s, "ssl-cert", p.tls_cert().display().to_string());
                kv(&mut s, "ssl-key", p.tls_key().display().to_string());
                kv(&mut s, "require-secure-transport", "ON".into());
            }
            s.push_str(&format!("!include {}\n", p.params_file(f).display()));
            s
        }
    }
}

/// PostgreSQL's client authentication: the admin socket trusts only the `postgres` role
/// (the socket directory is mode 0700, so only root and the database user reach it);
/// everything over the network needs a SCRAM password, and TLS when TLS is on — except
/// the agent's own health probe (`dbvm_monitor`), which may log in over loopback only
/// without TLS (traffic that never leaves the VM).
pub fn pg_hba(spec: &DatabaseSpec) -> String {
    let host = if spec.tls { "hostssl" } else { "host" };
    format!(
        "# Written by dbvm-agent: changes here are overwritten\n\
         local all postgres trust\n\
         local all all scram-sha-256\n\
         host all dbvm_monitor 127.0.0.1/32 scram-sha-256\n\
         {host} all all 0.0.0.0/0 scram-sha-256\n\
         {host} all all ::/0 scram-sha-256\n"
    )
}

/// The parameter include file for the given values.
pub fn params_file(f: Flavour, values: &BTreeMap<String, params::Value>) -> String {
    match f {
        Flavour::Postgres => params::render_postgres(values),
        _ => params::render_mysql(values),
    }
}

/// A generated password: 32 characters from [A-Za-z0-9] (~190 bits), safe to place in a
/// SQL string literal without escaping.
pub fn generate_password() -> dbvm_protocol::seal::Secret {
    use rand::distributions::{Alphanumeric, DistString};
    dbvm_protocol::seal::Secret::new(Alphanumeric.sample_string(&mut rand::rngs::OsRng, 32))
}

/// A self-signed server certificate for client TLS, named after this host.
pub fn make_tls(p: &Paths, uid: u32, gid: u32) -> Result<(), DbError> {
    let host = sysinfo::System::host_name().unwrap_or_else(|| "localhost".into());
    let key = rcgen::KeyPair::generate()
        .map_err(|e| DbError::Failed(format!("cannot generate the TLS key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![host.clone(), "localhost".into()])
        .map_err(|e| DbError::Failed(format!("cannot make TLS certificate parameters: {e}")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, host);
    let cert = params
        .self_signed(&key)
        .map_err(|e| DbError::Failed(format!("cannot sign the TLS certificate: {e}")))?;
    write_owned(&p.tls_cert(), cert.pem().as_bytes(), 0o644, uid, gid)?;
    write_owned(
        &p.tls_key(),
        key.serialize_pem().as_bytes(),
        0o600,
        uid,
        gid,
    )?;
    Ok(())
}

/// Writes a file atomically and durably with the given mode and owner.
pub fn write_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<(), DbError> {
    dbvm_host::fs::write_atomic_owned(path, bytes, mode, uid, gid)
        .map_err(|e| DbError::io("write", path, e))
}

/// An admin connection to the running server over its unix socket.
pub enum Admin {
    Postgres(tokio_postgres::Client, tokio::task::JoinHandle<()>),
    Mysql(mysql_async::Conn),
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Admin::Postgres(..) => "Admin::Postgres",
            Admin::Mysql(_) => "Admin::Mysql",
        })
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        if let Admin::Postgres(_, task) = self {
            task.abort();
        }
    }
}

const SQL_TIMEOUT: Duration = Duration::from_secs(15);

fn sql_err(e: impl std::fmt::Display) -> DbError {
    DbError::Sql(e.to_string())
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    tokio::time::timeout(SQL_TIMEOUT, f)
        .await
        .map_err(|_| DbError::Sql(format!("{what} took longer than {SQL_TIMEOUT:?}")))?
}

/// What `status` reports about the server itself.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerInfo {
    pub version: String,
    /// `primary` or `replica`.
    pub role: String,
    pub uptime_s: i64,
    pub connections: i64,
    pub max_connections: i64,
}

impl Admin {
    /// Connects once (no retry; see [`Admin::wait`]).
    pub async fn connect(spec: &DatabaseSpec, p: &Paths) -> Result<Self, DbError> {
        match spec.engine {
            Flavour::Postgres => {
                let mut cfg = tokio_postgres::Config::new();
                cfg.host_path(&p.run)
                    .port(spec.port())
                    .user("postgres")
                    .dbname("postgres")
                    .application_name("dbvm-agent")
                    .connect_timeout(Duration::from_secs(5));
                let (client, conn) = timed("connecting", async {
                    cfg.connect(tokio_postgres::NoTls).await.map_err(sql_err)
                })
                .await?;
                let task = tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "admin connection closed");
                    }
                });
                Ok(Admin::Postgres(client, task))
            }
            Flavour::Mariadb | Flavour::Mysql8 => {
                let opts = mysql_async::OptsBuilder::default()
                    .socket(Some(p.mysql_socket().display().to_string()))
                    .user(Some("root"))
                    .prefer_socket(true);
                let conn = timed("connecting", async {
                    mysql_async::Conn::new(opts).await.map_err(sql_err)
                })
                .await?;
                Ok(Admin::Mysql(conn))
            }
        }
    }

    /// Waits until the server accepts an admin connection and answers a query; gives up
    /// early when the server's container stops.
    pub async fn wait(
        spec: &DatabaseSpec,
        p: &Paths,
        timeout: Duration,
        runtime: &dyn ContainerRuntime,
        container: &str,
    ) -> Result<Self, DbError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = match Self::connect(spec, p).await {
                Ok(mut a) => match a.version().await {
                    Ok(_) => return Ok(a),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if let Some(st) = runtime.inspect(container).await? {
                if let State::Stopped { exit_code } = st.state {
                    return Err(DbError::Failed(format!(
                        "the database server stopped while starting (exit code {}): {last}; see the logs in {}",
                        exit_code.map_or("unknown".into(), |c| c.to_string()),
                        p.log.display()
                    )));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DbError::Failed(format!(
                    "the database server did not accept connections within {timeout:?} (last error: {last}); see the logs in {}",
                    p.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// PostgreSQL only: whether the server is still in recovery, and the commit time (ms
    /// since the epoch) of the last transaction recovery replayed, if any.
    pub async fn pg_recovery(&mut self) -> Result<(bool, Option<i64>), DbError> {
        match self {
            Admin::Postgres(c, _) => {
                timed("reading the recovery state", async {
                    let row = c
                        .query_one(
                            "SELECT pg_is_in_recovery(),
                                    (extract(epoch from pg_last_xact_replay_timestamp()) * 1000)::bigint",
                            &[],
                        )
                        .await
                        .map_err(sql_err)?;
                    Ok((row.get(0), row.get(1)))
                })
                .await
            }
            Admin::Mysql(_) => Err(DbError::Invalid(
                "recovery state is PostgreSQL's".into(),
            )),
        }
    }

    pub async fn version(&mut self) -> Result<String, DbError> {
        match self {
            Admin::Postgres(c, _) => {
                timed("SHOW server_version", async {
                    let row = c
                        .query_one("SHOW server_version", &[])
                        .await
                        .map_err(sql_err)?;
                    Ok(row.get::<_, String>(0))
                })
                .await
            }
            Admin::Mysql(c) => {
                timed("SELECT VERSION()", async {
                    use mysql_async::prelude::Queryable;
                    let v: Option<String> =
                        c.query_first("SELECT VERSION()").await.map_err(sql_err)?;
                    Ok(v.unwrap_or_default())
                })
                .await
            }
        }
    }

    pub async fn info(&mut self) -> Result<ServerInfo, DbError> {
        let version = self.version().await?;
        match self {
            Admin::Postgres(c, _) => timed("reading server status", async {
                let row = c
                    .query_one(
                        "SELECT pg_is_in_recovery(),
                                extract(epoch from now() - pg_postmaster_start_time())::bigint,
                                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::bigint,
                                current_setting('max_connections')::bigint",
                        &[],
                    )
                    .await
                    .map_err(sql_err)?;
                Ok(ServerInfo {
                    version,
                    role: if row.get::<_, bool>(0) { "replica" } else { "primary" }.into(),
                    uptime_s: row.get(1),
                    connections: row.get(2),
                    max_connections: row.get(3),
                })
            })
            .await,
            Admin::Mysql(c) => timed("reading server status", async {
                use mysql_async::prelude::Queryable;
                let read_only: Option<i64> =
                    c.query_first("SELECT @@global.read_only").await.map_err(sql_err)?;
                let status: Vec<(String, String)> = c
                    .query("SHOW GLOBAL STATUS WHERE Variable_name IN ('Uptime', 'Threads_connected')")
                    .await
                    .map_err(sql_err)?;
                let max: Option<i64> =
                    c.query_first("SELECT @@global.max_connections").await.map_err(sql_err)?;
                let get = |n: &str| {
                    status
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(n))
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0)
                };
                Ok(ServerInfo {
                    version,
                    role: if read_only.unwrap_or(0) == 1 { "replica" } else { "primary" }.into(),
                    uptime_s: get("Uptime"),
                    connections: get("Threads_connected"),
                    max_connections: max.unwrap_or(0),
                })
            })
            .await,
        }
    }

    /// Creates `dbaas` (or resets its password) and the user database it owns. The
    /// password is alphanumeric (see [`generate_password`]), so it is placed in the
    /// statement literally; the statement is never logged.
    pub async fn ensure_user_and_database(
        &mut self,
        database: &str,
        password: &dbvm_protocol::seal::Secret,
    ) -> Result<(), DbError> {
        let pw = password.expose();
        if !pw.chars().all(|c| c.is_ascii_alphanumeric()) || !super::valid_identifier(database) {
            return Err(DbError::Invalid(
                "unsafe user name, database or password".into(),
            ));
        }
        match self {
            Admin::Postgres(c, _) => {
                timed("creating the user and database", async {
                    let exists = c
                        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&DBAAS_USER])
                        .await
                        .map_err(sql_err)?
                        .is_some();
                    let verb = if exists { "ALTER" } else { "CREATE" };
                    // NOCREATEROLE (said explicitly, so that ALTER takes it from a role
                    // made by an older agent): in PostgreSQL 15 a CREATEROLE role may grant
                    // itself pg_read_server_files or pg_execute_server_program and so read
                    // any file the server's OS user can — pgBackRest's config, which holds
                    // the bucket's keys — or run programs as that user.
                    c.batch_execute(&format!(
                        "{verb} ROLE {DBAAS_USER} WITH LOGIN CREATEDB NOCREATEROLE PASSWORD '{pw}'"
                    ))
                    .await
                    .map_err(|e| {
                        DbError::Sql(format!(
                            "cannot {verb} ROLE {DBAAS_USER}: {}",
                            redact(&e.to_string(), pw)
                        ))
                    })?;
                    let db_exists = c
                        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
                        .await
                        .map_err(sql_err)?
                        .is_some();
                    if !db_exists {
                        c.batch_execute(&format!("CREATE DATABASE {database} OWNER {DBAAS_USER}"))
                            .await
                            .map_err(sql_err)?;
                    }
                    Ok(())
                })
                .await
            }
            Admin::Mysql(c) => {
                timed("creating the user and database", async {
                    use mysql_async::prelude::Queryable;
                    let stmts = [
                        format!(
                            "CREATE USER IF NOT EXISTS '{DBAAS_USER}'@'%' IDENTIFIED BY '{pw}'"
                        ),
                        format!("ALTER USER '{DBAAS_USER}'@'%' IDENTIFIED BY '{pw}'"),
                        format!(
                            "GRANT ALL PRIVILEGES ON *.* TO '{DBAAS_USER}'@'%' WITH GRANT OPTION"
                        ),
                        format!("CREATE DATABASE IF NOT EXISTS `{database}`"),
                    ];
                    for s in stmts {
                        c.query_drop(s)
                            .await
                            .map_err(|e| DbError::Sql(redact(&e.to_string(), pw)))?;
                    }
                    Ok(())
                })
                .await
            }
        }
    }

    /// Asks the server to re-read its configuration; returns the names of parameters it
    /// says need a restart.
    pub async fn reload(
        &mut self,
        values: &BTreeMap<String, params::Value>,
        flavour: Flavour,
    ) -> Result<Vec<String>, DbError> {
        match self {
            Admin::Postgres(c, _) => {
                timed("reloading the configuration", async {
                    c.batch_execute("SELECT pg_reload_conf()")
                        .await
                        .map_err(sql_err)?;
                    // The postmaster applies a reload asynchronously; give it a moment before
                    // asking which settings wait for a restart.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let rows = c
                        .query(
                            "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name",
                            &[],
                        )
                        .await
                        .map_err(sql_err)?;
                    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
                })
                .await
            }
            Admin::Mysql(c) => {
                timed("applying parameters", async {
                    use mysql_async::prelude::Queryable;
                    // MySQL has no reload: dynamic variables are set live (and persist through
                    // the include file); the others wait for a restart.
                    let mut pending = Vec::new();
                    for (name, value) in values {
                        let restart = params::lookup(flavour, name)
                            .map(|s| s.restart)
                            .unwrap_or(true);
                        if restart {
                            pending.push(name.clone());
                            continue;
                        }
                        let literal = mysql_literal(name, value);
                        c.query_drop(format!("SET GLOBAL {name} = {literal}"))
                            .await
                            .map_err(|e| DbError::Sql(format!("SET GLOBAL {name}: {e}")))?;
                    }
                    Ok(pending)
                })
                .await
            }
        }
    }

    /// The live value of a parameter, as the server reports it.
    pub async fn live_parameter(
        &mut self,
        flavour: Flavour,
        name: &str,
    ) -> Result<Option<params::Value>, DbError> {
        match self {
            Admin::Postgres(c, _) => {
                timed("reading a parameter", async {
                    let row = c
                        .query_opt(
                            "SELECT setting, unit FROM pg_settings WHERE name = $1",
                            &[&name],
                        )
                        .await
                        .map_err(sql_err)?;
                    Ok(row.and_then(|r| {
                        params::pg_settings_to_value(
                            name,
                            &r.get::<_, String>(0),
                            r.get::<_, Option<String>>(1).as_deref(),
                        )
                    }))
                })
                .await
            }
            Admin::Mysql(c) => {
                timed("reading a parameter", async {
                    use mysql_async::prelude::Queryable;
                    if !name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
                    {
                        return Ok(None);
                    }
                    let raw: Option<String> = c
                        .query_first(format!("SELECT CAST(@@global.{name} AS CHAR)"))
                        .await
                        .map_err(sql_err)?;
                    Ok(raw.and_then(|r| params::sql_show_value(flavour, name, &r)))
                })
                .await
            }
        }
    }
}

/// A parameter's value as a MySQL `SET GLOBAL` literal, in the same units the include
/// file uses (taken from the allow-list's own rendering, so the two never disagree).
fn mysql_literal(name: &str, value: &params::Value) -> String {
    let one = BTreeMap::from([(name.to_string(), value.clone())]);
    let rendered = params::render_mysql(&one);
    let raw = rendered
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let raw = raw.trim_matches(|c| c == '"' || c == '\'');
    if !raw.is_empty()
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        raw.to_string()
    } else {
        format!("'{}'", raw.replace('\\', "\\\\").replace('\'', "''"))
    }
}

fn redact(message: &str, secret: &str) -> String {
    if secret.is_empty() {
        message.to_string()
    } else {
        message.replace(secret, "***")
    }
}
