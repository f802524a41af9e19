//! The database lifecycle end to end: real broker, real agent, a real Docker engine (a
//! private one, see `dbvm_e2e::docker`), real PostgreSQL and MariaDB images built from
//! this machine's packages, every step a signed command. Clients connect over TCP with
//! the dbaas password that came back sealed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::{connected, eventually, AgentProc, BrokerProc, Fleet};
use dbvm_protocol::api::{CommandState, CommandView};
use dbvm_protocol::seal::Sealed;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// How often the agents here reconcile their database container, in seconds.
const RECONCILE_S: u64 = 1;

/// The `[database]` section for an agent on the test engine, reconciling every second.
fn db_section(
    engine: &dbvm_e2e::docker::Engine,
    data_root: &Path,
    container: &str,
    extra: &str,
) -> String {
    engine.database_section(data_root, container, RECONCILE_S, extra)
}

struct Setup {
    fleet: Fleet,
    _broker: BrokerProc,
    agent: AgentProc,
    client: dbvmctl::Client,
    engine: dbvm_e2e::docker::Engine,
    container: String,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Containers outlive the agent; remove this test's ones.
        self.engine.remove_container(&self.container);
        self.engine
            .remove_container(&format!("{}-init", self.container));
    }
}

async fn setup(id: &str, db_extra: &str) -> Setup {
    let engine = dbvm_e2e::docker::engine();
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let container = unique("dbvm-e2e");
    let section = db_section(
        &engine,
        &fleet.path(&format!("{id}-db")),
        &container,
        db_extra,
    );
    let agent = fleet
        .enroll_agent(&client, broker.agent_addr, id, &section)
        .await;
    Setup {
        fleet,
        _broker: broker,
        agent,
        client,
        engine,
        container,
    }
}

impl Setup {
    async fn send(&self, operation: &str, args: Value) -> CommandView {
        self.fleet
            .send(&self.client, &self.agent, operation, args)
            .await
    }

    async fn ok(&self, operation: &str, args: Value) -> Value {
        self.fleet
            .send_ok(&self.client, &self.agent, operation, args)
            .await
    }

    async fn refused(&self, operation: &str, args: Value) -> String {
        let v = self.send(operation, args).await;
        // Rejected: refused before anything ran (bad arguments); Failed: it ran and failed.
        assert!(
            matches!(v.state, CommandState::Failed | CommandState::Rejected),
            "{operation} should fail: {v:?}"
        );
        v.error
            .map(|e| format!("{}: {}", e.code, e.message))
            .unwrap_or_default()
    }

    fn password(&self, out: &Value) -> String {
        let sealed: Sealed =
            serde_json::from_value(out["password"].clone()).expect("sealed password");
        self.fleet
            .reply_key
            .open(&sealed)
            .expect("open")
            .expose()
            .to_string()
    }
}

use dbvm_e2e::dbtest::pg_dbaas as pg;

async fn pg_show(c: &tokio_postgres::Client, name: &str) -> String {
    c.query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_create_reconfigure_restart_upgrade_stop() {
    let s = setup("pg1", "").await;
    let port = free_port();
    let spec = json!({
        "engine": "postgres", "database": "app", "port": port,
        "parameters": {"max_connections": 50, "work_mem": "4MB"}
    });

    // Bad specs are refused before anything happens.
    let e = s.refused("db.create", json!({"engine": "postgres", "database": "app", "port": port, "parameters": {"max_conections": 5}})).await;
    assert!(
        e.contains("max_conections") && e.contains("max_connections"),
        "{e}"
    );
    let e = s.refused("db.status", json!({"verbose": true})).await;
    assert!(e.contains("verbose"), "{e}");

    let out = s.ok("db.create", spec.clone()).await;
    assert_eq!(out["configure"], "done", "{out}");
    let timings = &out["timings"];
    eprintln!("postgres create timings: {timings}");
    let password = s.password(&out);
    let raw = serde_json::to_string(&out).unwrap();
    assert!(
        !raw.contains(&password),
        "the password must travel sealed only"
    );

    let c = pg(port, &password, "app")
        .await
        .expect("dbaas connects over TCP");
    c.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        .await
        .unwrap();
    assert_eq!(pg_show(&c, "max_connections").await, "50");

    // The same create again is a no-op; another spec is refused.
    let again = s.ok("db.create", spec.clone()).await;
    assert_eq!(again["configure"], "already done", "{again}");
    let e = s
        .refused(
            "db.create",
            json!({"engine": "postgres", "database": "other", "port": port}),
        )
        .await;
    assert!(e.contains("different spec"), "{e}");

    // Parameters: bad ones change nothing, live ones apply without restart.
    let e = s
        .refused(
            "db.set_parameters",
            json!({"parameters": {"work_mem": "1TB", "bogus": 1, "max_connections": "many"}}),
        )
        .await;
    for needle in ["work_mem", "bogus", "max_connections"] {
        assert!(e.contains(needle), "{needle} not in {e}");
    }
    let out = s
        .ok(
            "db.set_parameters",
            json!({"parameters": {"work_mem": "8MB"}}),
        )
        .await;
    assert_eq!(out["restarted"], false, "{out}");
    assert_eq!(out["restart_required"], json!([]), "{out}");
    let c = pg(port, &password, "app").await.unwrap();
    assert_eq!(pg_show(&c, "work_mem").await, "8MB");

    // A change needing a restart says so, and restarts only when allowed.
    let out = s
        .ok(
            "db.set_parameters",
            json!({"parameters": {"max_connections": 60}}),
        )
        .await;
    assert_eq!(out["restart_required"], json!(["max_connections"]), "{out}");
    assert_eq!(out["restarted"], false);
    assert_eq!(pg_show(&c, "max_connections").await, "50");
    let out = s
        .ok(
            "db.set_parameters",
            json!({"parameters": {"max_connections": 60}, "allow_restart": true}),
        )
        .await;
    assert_eq!(out["restarted"], true, "{out}");
    let c = pg(port, &password, "app").await.unwrap();
    assert_eq!(pg_show(&c, "max_connections").await, "60");

    // Killed behind the agent's back: the reconciler brings it back.
    s.engine.kill_container(&s.container);
    let c = eventually(
        Duration::from_secs(60),
        "the database to come back",
        || async { pg(port, &password, "app").await.ok() },
    )
    .await;
    let n: i32 = c.query_one("SELECT x FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);

    let out = s.ok("db.restart", json!({})).await;
    assert_eq!(out["restarted"], true);
    let status = s.ok("db.status", json!({})).await;
    assert_eq!(status["server"]["role"], "primary", "{status}");
    assert!(
        status["server"]["version"]
            .as_str()
            .unwrap()
            .starts_with("15"),
        "{status}"
    );
    assert_eq!(status["container"]["matches_spec"], true, "{status}");

    // Upgrade to another tag of the image: data kept.
    let next = s
        .engine
        .tag_image(&s.engine.postgres_image, "dbvm/postgres:15-next");
    let out = s.ok("db.upgrade", json!({"image": next})).await;
    assert_eq!(out["changed"], true, "{out}");
    let c = pg(port, &password, "app").await.unwrap();
    let n: i32 = c.query_one("SELECT x FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
    // Upgrade to an image that cannot run the server: rolled back, still serving.
    let broken = s.engine.broken_image();
    let e = s.refused("db.upgrade", json!({"image": broken})).await;
    assert!(e.contains("rolled back"), "{e}");
    let c = pg(port, &password, "app")
        .await
        .expect("serving after the rollback");
    assert_eq!(pg_show(&c, "max_connections").await, "60");
    let e = s
        .refused(
            "db.upgrade",
            json!({"image": "dbvm/postgres:does-not-exist"}),
        )
        .await;
    assert!(e.contains("not on this VM"), "{e}");

    // Template: what a create accepts, with the current parameters.
    let t = s.ok("db.export_template", json!({})).await;
    assert_eq!(t["spec"]["parameters"]["max_connections"], 60, "{t}");
    assert!(!serde_json::to_string(&t).unwrap().contains(&password));

    // Stop: down, and stays down (the reconciler respects it); start again.
    s.ok("db.stop", json!({})).await;
    assert!(
        pg(port, &password, "app").await.is_err(),
        "down once db.stop has answered"
    );
    // A fixed wait, because nothing marks a reconciler pass that rightly leaves a stopped
    // server alone (it neither logs nor counts one). The reconciler runs (it revived the
    // killed container above), so two of its intervals give it the chance to wrongly
    // start the server again before checking that it did not.
    tokio::time::sleep(Duration::from_secs(2 * RECONCILE_S)).await;
    assert!(
        pg(port, &password, "app").await.is_err(),
        "stopped means stopped"
    );
    s.ok("db.start", json!({})).await;
    pg(port, &password, "app").await.expect("started again");
}

async fn maria(
    port: u16,
    password: &str,
    db: &str,
) -> Result<mysql_async::Conn, mysql_async::Error> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some("dbaas"))
        .pass(Some(password))
        .db_name(Some(db))
        .prefer_socket(false);
    mysql_async::Conn::new(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_create_reconfigure_restart_upgrade_stop() {
    use mysql_async::prelude::Queryable;
    let s = setup("my1", "").await;
    let port = free_port();
    let spec = json!({
        "engine": "mariadb", "database": "shop", "port": port,
        "parameters": {"max_connections": 40}
    });
    let e = s.refused("db.create", json!({"engine": "mariadb", "database": "shop", "port": port, "mysql": {"router": true}})).await;
    assert!(e.contains("MySQL 8 only"), "{e}");

    let out = s.ok("db.create", spec.clone()).await;
    eprintln!("mariadb create timings: {}", out["timings"]);
    let password = s.password(&out);
    let mut c = maria(port, &password, "shop")
        .await
        .expect("dbaas connects over TCP");
    c.query_drop("CREATE TABLE t (x INT); INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    let max: Option<i64> = c
        .query_first("SELECT @@global.max_connections")
        .await
        .unwrap();
    assert_eq!(max, Some(40));

    let out = s
        .ok(
            "db.set_parameters",
            json!({"parameters": {"max_connections": 45}}),
        )
        .await;
    assert_eq!(out["restarted"], false, "{out}");
    let max: Option<i64> = c
        .query_first("SELECT @@global.max_connections")
        .await
        .unwrap();
    assert_eq!(max, Some(45), "applied live: {out}");
    let e = s
        .refused(
            "db.set_parameters",
            json!({"parameters": {"max_connections": 5}}),
        )
        .await;
    assert!(e.contains("max_connections"), "{e}");
    drop(c);

    s.ok("db.restart", json!({})).await;
    let mut c = maria(port, &password, "shop").await.expect("after restart");
    let max: Option<i64> = c
        .query_first("SELECT @@global.max_connections")
        .await
        .unwrap();
    assert_eq!(max, Some(45), "kept across restart");
    drop(c);

    let next = s
        .engine
        .tag_image(&s.engine.mariadb_image, "dbvm/mariadb:10.11-next");
    let out = s.ok("db.upgrade", json!({"image": next})).await;
    assert_eq!(out["changed"], true, "{out}");
    let mut c = maria(port, &password, "shop").await.expect("after upgrade");
    let x: Option<i64> = c.query_first("SELECT x FROM t").await.unwrap();
    assert_eq!(x, Some(7));
    drop(c);

    s.ok("db.stop", json!({})).await;
    assert!(maria(port, &password, "shop").await.is_err());
    s.ok("db.start", json!({})).await;
    maria(port, &password, "shop").await.expect("started again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_resumes_after_the_agent_dies_between_phases() {
    let s = setup("pg2", "").await;
    let port = free_port();
    let spec = json!({"engine": "postgres", "database": "app", "port": port});
    // Preconfigure alone, then configure: each a command of its own.
    let out = s.ok("db.preconfigure", spec.clone()).await;
    assert_eq!(out["preconfigure"], "done", "{out}");
    let e = s
        .refused(
            "db.configure",
            json!({"engine": "postgres", "database": "app", "port": port + 1}),
        )
        .await;
    assert!(e.contains("different spec"), "{e}");
    drop(s);

    // Now the agent dies right after preconfigure inside one create (fault injection:
    // the process exits at exactly that point, as a kill would).
    let engine = dbvm_e2e::docker::engine();
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let token = client.enrollment_token("pg3", None).await.unwrap().token;
    let container = unique("dbvm-e2e");
    let section = db_section(&engine, &fleet.path("pg3-db"), &container, "");
    let mut agent = fleet.start_agent_env(
        "pg3",
        broker.agent_addr,
        Some(&token),
        &section,
        &[(
            dbvm_agent::db::manager::FAULT_EXIT_AFTER_PHASE,
            "preconfigure",
        )],
    );
    connected(&client, "pg3").await;
    let kind = |agents: Vec<dbvm_protocol::api::AgentView>| {
        agents
            .into_iter()
            .find(|a| a.id == "pg3")
            .and_then(|a| a.db_kind)
    };
    assert_eq!(
        kind(client.agents().await.unwrap()),
        None,
        "no database made yet: Hello names none"
    );
    let cmd = fleet.sign("pg3", "db.create", spec.clone());
    let v = client.submit(&cmd).await.unwrap();
    {
        // `is_running` reaps the process, so it needs the handle mutably inside the poll.
        let agent = std::sync::Mutex::new(&mut agent);
        eventually(
            Duration::from_secs(60),
            "the agent to exit after preconfigure",
            || async { (!agent.lock().unwrap().proc.is_running()).then_some(()) },
        )
        .await;
    }
    let agent = fleet.restart_agent(&agent);
    let v = client.wait(v.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(v.state, CommandState::Interrupted, "{v:?}");
    assert!(format!("{:?}", v.error).contains("not run again"), "{v:?}");
    // The restarted agent's Hello names the database it is making.
    assert_eq!(
        kind(client.agents().await.unwrap()).as_deref(),
        Some("postgres")
    );
    // Sent again, create resumes: preconfigure is not redone.
    let cmd = fleet.sign("pg3", "db.create", spec);
    let v = client.submit(&cmd).await.unwrap();
    let v = client.wait(v.id, Duration::from_secs(240)).await.unwrap();
    assert_eq!(
        v.state,
        CommandState::Succeeded,
        "{v:?}\n{}",
        agent.proc.log_tail()
    );
    let out = v.output.unwrap();
    assert_eq!(out["preconfigure"], "already done", "{out}");
    assert_eq!(out["configure"], "done", "{out}");
    engine.remove_container(&container);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_unwritable_and_full_disks_fail_clearly() {
    let s = setup("pg4", "").await;
    let port = free_port();
    let e = s
        .refused("db.create", json!({"engine": "postgres", "database": "app", "port": port, "image": "dbvm/postgres:missing"}))
        .await;
    assert!(
        e.contains("dbvm/postgres:missing") && e.contains("never pulled"),
        "{e}"
    );
    let status = s.ok("db.status", json!({})).await;
    assert_eq!(status["created"], false, "nothing recorded: {status}");
    drop(s);

    // A read-only data disk, and a data disk too small for initdb.
    for (case, opts, expect) in [
        ("ro", "ro,size=64m", "Read-only file system"),
        ("full", "size=12m", "initialising the database failed"),
    ] {
        let mnt = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                opts,
                "dbvm-test",
                mnt.path().to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _u = Unmount(mnt.path().to_path_buf());
        let engine = dbvm_e2e::docker::engine();
        let fleet = Fleet::new();
        let broker = fleet.start_broker("");
        let client = fleet.client(&broker);
        let id = format!("pg5{case}");
        let container = unique("dbvm-e2e");
        let section = db_section(&engine, &mnt.path().join("db"), &container, "");
        let _agent = fleet
            .enroll_agent(&client, broker.agent_addr, &id, &section)
            .await;
        let cmd = fleet.sign(
            &id,
            "db.create",
            json!({"engine": "postgres", "database": "app", "port": free_port()}),
        );
        let v = client.submit(&cmd).await.unwrap();
        let v = client.wait(v.id, Duration::from_secs(240)).await.unwrap();
        assert!(
            matches!(v.state, CommandState::Failed | CommandState::Rejected),
            "{case}: {v:?}"
        );
        let msg = format!("{:?}", v.error);
        assert!(msg.contains(expect), "{case}: {msg}");
        engine.remove_container(&container);
        engine.remove_container(&format!("{container}-init"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_down_is_a_clear_error_and_retried_when_it_returns() {
    let engine = dbvm_e2e::docker::engine();
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let container = unique("dbvm-e2e");
    // The agent's engine socket is a relay the test controls: absent = engine down.
    let relay_path = fleet.path("relay.sock");
    let mut down_engine = engine.clone();
    down_engine.socket = relay_path.clone();
    let section = db_section(&down_engine, &fleet.path("pg6-db"), &container, "")
        .replace("engine_wait_s = 5", "engine_wait_s = 20");
    let agent = fleet
        .enroll_agent(&client, broker.agent_addr, "pg6", &section)
        .await;

    // Status answers without an engine and names the socket it cannot reach.
    let v = client
        .submit(&fleet.sign("pg6", "db.status", json!({})))
        .await
        .unwrap();
    let v = client.wait(v.id, Duration::from_secs(30)).await.unwrap();
    let out = v.output.expect("status answers without an engine");
    assert!(format!("{out}").contains("relay.sock"), "{out}");

    // Create while the engine is down; bring it back once the create is waiting for it
    // (the agent logs it; the progress message it also sends comes too early for the
    // broker to keep): create goes through.
    let retrying = || {
        agent
            .proc
            .log_text()
            .matches("container engine unreachable; retrying")
            .count()
    };
    let before = retrying();
    let port = free_port();
    let cmd = fleet.sign(
        "pg6",
        "db.create",
        json!({"engine": "postgres", "database": "app", "port": port}),
    );
    let v = client.submit(&cmd).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the create to wait for the engine",
        || async { (retrying() > before).then_some(()) },
    )
    .await;
    let _relay = dbvm_e2e::dbtest::UnixRelay::start(&relay_path, &engine.socket);
    let v = client.wait(v.id, Duration::from_secs(240)).await.unwrap();
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    engine.remove_container(&container);
    engine.remove_container(&format!("{container}-init"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_client_tls_refuses_plain_connections() {
    let s = setup("pg7", "").await;
    let port = free_port();
    let out = s
        .ok(
            "db.create",
            json!({"engine": "postgres", "database": "app", "port": port, "tls": true}),
        )
        .await;
    let password = s.password(&out);
    // Without TLS: refused by pg_hba (hostssl only).
    let Err(e) = pg(port, &password, "app").await else {
        panic!("plain TCP must be refused");
    };
    assert!(
        format!("{e:?}").to_lowercase().contains("no encryption")
            || format!("{e:?}").contains("pg_hba"),
        "{e:?}"
    );
    // With TLS (the host's psql, sslmode=require): accepted, and the session is encrypted.
    let out = std::process::Command::new("psql")
        .args([
            &format!("host=127.0.0.1 port={port} user=dbaas dbname=app sslmode=require"),
            "-Atc",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .env("PGPASSWORD", &password)
        .output()
        .expect("psql (install it: bash scripts/setup.sh)");
    assert!(
        out.status.success(),
        "psql over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");
}
