//! Check 1, Connectivity: the database accepts an authenticated connection on its client port
//! and answers a query, and the agent's link to the broker is up.
//!
//! The login uses `dbvm_monitor`, a role the agent creates for itself (over the admin
//! socket) with a generated password kept in `state_dir/db/monitor.secret` (0600, never
//! logged). It connects to 127.0.0.1 on the client port like any client would, so it
//! proves the listener, authentication and query path, not just that a process exists.
//! On PostgreSQL the role may log in over loopback without TLS (see `engine::pg_hba`);
//! on MySQL with TLS on, the probe uses TLS and trusts exactly this VM's certificate.
//!
//! It also watches what keeps the link alive tomorrow: the agent certificate (renewed at
//! two thirds of its life; warning when a renewal is overdue or the broker refused it)
//! and the fleet CA certificate (warning `ca_warning_days` before it runs out), with their
//! remaining lives as figures.

use crate::db::engine::{Admin, Paths};
use crate::db::params::Flavour;
use crate::db::DatabaseSpec;
use crate::health::db::Absent;
use crate::health::{Check, Finding, Run, Shared};
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const MONITOR_ROLE: &str = "dbvm_monitor";

pub struct Connectivity;

/// A freshly started agent is not "unlinked" while it is still dialling.
const LINK_GRACE_MS: i64 = 30_000;

/// (link counts as fine, link is up, sentence).
fn link(run: &Run) -> (bool, bool, String) {
    let link = run.shared.outbox.link();
    let (up, since) = (link.connected, link.since_ms);
    if !up && since == 0 && run.at_ms - run.shared.started_ms < LINK_GRACE_MS {
        return (
            true,
            false,
            "connecting to the broker (the agent just started)".into(),
        );
    }
    let ago = if since > 0 {
        format!(
            " for {}",
            crate::health::duration((run.at_ms - since) as f64 / 1000.0)
        )
    } else {
        String::new()
    };
    if up {
        (true, true, format!("linked to the broker{ago}"))
    } else {
        let why = link
            .last_error
            .as_deref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        (
            false,
            false,
            format!("NOT linked to the broker{ago}{why}: results and events wait until it is back (see the agent log)"),
        )
    }
}

/// A renewal is overdue once it has been due for this share of the certificate's life
/// (at least a minute): the first attempt and a retry or two have had their chance.
const OVERDUE_SHARE: f64 = 0.05;

/// What the agent and CA certificates say: a status, a sentence when it is not ok, figures.
fn certificates(run: &Run) -> (HealthStatus, Option<String>, Vec<(&'static str, f64)>) {
    let Some(c) = run.shared.outbox.link().certificate else {
        return (HealthStatus::Ok, None, Vec::new());
    };
    let now = run.at_ms;
    let life_ms = (c.not_after_ms - c.not_before_ms).max(1);
    let left_ms = c.not_after_ms - now;
    let grace_ms = ((life_ms as f64 * OVERDUE_SHARE) as i64).max(60_000);
    let overdue_ms = (now - c.renew_at_ms - grace_ms).max(0);
    let mut figures = vec![
        ("agent_cert_left_s", left_ms as f64 / 1000.0),
        ("agent_cert_renewal_overdue_s", overdue_ms as f64 / 1000.0),
        ("agent_cert_renewal_failures", f64::from(c.renewal_failures)),
    ];
    let left = crate::health::duration(left_ms as f64 / 1000.0);
    let mut status = HealthStatus::Ok;
    let mut said = Vec::new();
    if left_ms <= 0 {
        status = HealthStatus::Critical;
        said.push(
            "the agent certificate has expired: the agent needs a new enrollment token".to_string(),
        );
    } else if c.renewal_failures > 0 {
        status = HealthStatus::Warning;
        said.push(format!(
            "the agent certificate could not be renewed ({} attempt(s) failed, last: {}); it runs out in {left}, then the link drops until the agent is enrolled again: see the broker's log",
            c.renewal_failures,
            c.last_renewal_error.as_deref().unwrap_or("no reason given"),
        ));
    } else if overdue_ms > 0 {
        status = HealthStatus::Warning;
        said.push(format!(
            "renewal of the agent certificate is overdue by {} (is the link up?); it runs out in {left}",
            crate::health::duration(overdue_ms as f64 / 1000.0)
        ));
    }
    if let Some(ca_after) = c.ca_not_after_ms {
        let ca_left_days = (ca_after - now) as f64 / 86_400_000.0;
        figures.push(("ca_cert_left_days", ca_left_days));
        let warn_days = f64::from(run.settings().thresholds.ca_warning_days);
        if ca_left_days <= 0.0 {
            status = HealthStatus::Critical;
            said.push("the fleet CA certificate has expired: no agent can connect until the fleet gets a new CA".into());
        } else if ca_left_days < warn_days {
            status = status.max(HealthStatus::Warning);
            said.push(format!(
                "the fleet CA certificate runs out in {} (warning below {warn_days:.0} days): every agent certificate ends with it; plan the CA rotation now",
                crate::health::duration(ca_left_days * 86_400.0)
            ));
        }
    }
    let sentence = (!said.is_empty()).then(|| said.join("; "));
    (status, sentence, figures)
}

#[async_trait]
impl Check for Connectivity {
    fn id(&self) -> &'static str {
        "connectivity"
    }

    async fn run(&self, run: &Run) -> Finding {
        let (cert_status, cert_sentence, cert_figures) = certificates(run);
        let finding = self.database_and_link(run).await;
        let mut f = finding.figures(cert_figures);
        if cert_status > f.status {
            f.status = cert_status;
        }
        if let Some(s) = cert_sentence {
            f.message = format!("{}; {s}", f.message);
        }
        f
    }
}

impl Connectivity {
    async fn database_and_link(&self, run: &Run) -> Finding {
        let (fine, up, link_msg) = link(run);
        let link_status = if fine {
            HealthStatus::Ok
        } else {
            HealthStatus::Warning
        };
        let db = run.db().await;
        let st = match &db.state {
            Err(Absent::NotManaged) => {
                return Finding::new(link_status, format!("{link_msg}; no database here"))
                    .figure("broker_link_up", f64::from(u8::from(up)))
            }
            Err(a) => {
                return Finding::unknown(format!("{}; {link_msg}", a.message()))
                    .figure("broker_link_up", f64::from(u8::from(up)))
            }
            Ok(st) => st,
        };
        let port = st.spec.port();
        if !db.running() {
            let why = if st.want_running {
                "is not running (the agent restarts it; see db_service)"
            } else {
                "is stopped (on request: db.stop); start it with db.start"
            };
            return Finding::new(
                HealthStatus::Critical,
                format!(
                    "the database server {why}: clients cannot connect to port {port}; {link_msg}"
                ),
            )
            .figure("db_accepting", 0.0)
            .figure("broker_link_up", f64::from(u8::from(up)));
        }
        let shared = run.shared.clone();
        let paths = match &shared.db {
            Some(m) => m.paths().clone(),
            None => return Finding::unknown("no database"),
        };
        match probe(&shared, &st.spec, &paths).await {
            Ok(took) => Finding::new(
                link_status,
                format!(
                    "the database accepts an authenticated connection on 127.0.0.1:{port} and answers in {:.1} ms; {link_msg}",
                    took * 1000.0
                ),
            )
            .figure("db_accepting", 1.0)
            .figure("login_query_ms", took * 1000.0)
            .figure("broker_link_up", f64::from(u8::from(up))),
            Err(e) => Finding::new(
                HealthStatus::Critical,
                format!("the database does not accept an authenticated connection on 127.0.0.1:{port}: {e}; {link_msg}"),
            )
            .figure("db_accepting", 0.0)
            .figure("broker_link_up", f64::from(u8::from(up))),
        }
    }
}

fn secret_path(shared: &Shared) -> PathBuf {
    shared.state_dir.join("db").join("monitor.secret")
}

/// Logs in as the monitor role and runs `SELECT 1`; returns how long it took (s). A
/// missing or refused password is (re)made once over the admin socket.
async fn probe(shared: &Shared, spec: &DatabaseSpec, paths: &Paths) -> Result<f64, String> {
    let path = secret_path(shared);
    let mut secret = std::fs::read_to_string(&path)
        .ok()
        .map(|s| s.trim().to_string());
    if secret.as_deref().is_none_or(str::is_empty) {
        secret = Some(ensure_role(shared, spec, paths, &path).await?);
    }
    let pw = secret.unwrap_or_default();
    match login(spec, paths, &pw).await {
        Ok(t) => Ok(t),
        Err(Login::Auth(e)) => {
            tracing::info!(error = %e, "the monitor role was refused; setting it up again");
            let pw = ensure_role(shared, spec, paths, &path).await?;
            login(spec, paths, &pw).await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug)]
enum Login {
    Auth(String),
    Other(String),
}

impl std::fmt::Display for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Login::Auth(e) | Login::Other(e) => f.write_str(e),
        }
    }
}

async fn login(spec: &DatabaseSpec, paths: &Paths, password: &str) -> Result<f64, Login> {
    let t = Instant::now();
    match spec.engine {
        Flavour::Postgres => {
            let mut cfg = tokio_postgres::Config::new();
            cfg.host("127.0.0.1")
                .port(spec.port())
                .user(MONITOR_ROLE)
                .password(password)
                .dbname("postgres")
                .application_name("dbvm-agent-health")
                .connect_timeout(Duration::from_secs(3));
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(|e| {
                let auth = e.code().is_some_and(|c| {
                    *c == tokio_postgres::error::SqlState::INVALID_PASSWORD
                        || *c
                            == tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                });
                let text = pg_error(&e);
                if auth {
                    Login::Auth(text)
                } else {
                    Login::Other(text)
                }
            })?;
            let task = tokio::spawn(conn);
            let r = client.query_one("SELECT 1", &[]).await;
            drop(client);
            let _ = task.await;
            r.map_err(|e| Login::Other(pg_error(&e)))?;
        }
        Flavour::Mariadb | Flavour::Mysql8 => {
            use mysql_async::prelude::Queryable;
            let mut opts = mysql_async::OptsBuilder::default()
                .ip_or_hostname("127.0.0.1")
                .tcp_port(spec.port())
                .user(Some(MONITOR_ROLE))
                .pass(Some(password))
                .prefer_socket(false);
            if spec.tls {
                opts = opts.ssl_opts(Some(
                    mysql_async::SslOpts::default()
                        .with_root_certs(vec![paths.tls_cert().into()])
                        .with_disable_built_in_roots(true)
                        .with_danger_skip_domain_validation(true),
                ));
            }
            let mut conn = mysql_async::Conn::new(opts).await.map_err(|e| {
                let text = e.to_string();
                match &e {
                    mysql_async::Error::Server(s) if s.code == 1045 => Login::Auth(text),
                    _ => Login::Other(text),
                }
            })?;
            let r: Result<Option<i64>, _> = conn.query_first("SELECT 1").await;
            let _ = conn.disconnect().await;
            r.map_err(|e| Login::Other(e.to_string()))?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// tokio-postgres' Display of a server error is only "db error"; the server's message is
/// what a person needs.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

/// Creates the monitor role (or resets its password) over the admin socket and stores
/// the new password. Needs a writable primary.
async fn ensure_role(
    shared: &Shared,
    spec: &DatabaseSpec,
    paths: &Paths,
    path: &std::path::Path,
) -> Result<String, String> {
    let pw = crate::db::engine::generate_password();
    let pw = pw.expose().to_string();
    let mut slot = shared.admin.lock().await;
    let mut admin = match slot.take() {
        Some(a) => a,
        None => Admin::connect(spec, paths)
            .await
            .map_err(|e| format!("cannot set up the monitor role: {e}"))?,
    };
    // The password is alphanumeric (generate_password), safe inside a literal; these
    // statements are never logged.
    let result = match &mut admin {
        Admin::Postgres(c, _) => c
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{MONITOR_ROLE}') THEN
                     CREATE ROLE {MONITOR_ROLE} LOGIN;
                   END IF;
                 END $$;
                 ALTER ROLE {MONITOR_ROLE} WITH LOGIN PASSWORD '{pw}' CONNECTION LIMIT 3;
                 GRANT pg_monitor TO {MONITOR_ROLE};"
            ))
            .await
            .map_err(|e| pg_error(&e)),
        Admin::Mysql(c) => {
            use mysql_async::prelude::Queryable;
            c.query_drop(format!(
                "CREATE USER IF NOT EXISTS '{MONITOR_ROLE}'@'127.0.0.1' IDENTIFIED BY '{pw}' WITH MAX_USER_CONNECTIONS 3"
            ))
            .await
            .and(
                c.query_drop(format!(
                    "ALTER USER '{MONITOR_ROLE}'@'127.0.0.1' IDENTIFIED BY '{pw}'"
                ))
                .await,
            )
            .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => *slot = Some(admin),
        Err(e) => return Err(format!("cannot set up the monitor role: {e}")),
    }
    drop(slot);
    write_secret(path, &pw).map_err(|e| {
        format!(
            "cannot store the monitor password in {}: {e}",
            path.display()
        )
    })?;
    Ok(pw)
}

fn write_secret(path: &std::path::Path, pw: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    dbvm_host::fs::write_atomic(path, pw.as_bytes(), 0o600)
}
