//! The agent's twelve health checks end to end: a real agent with a `[health]` section
//! (1 s interval, 800 ms check timeout, its own Prometheus port), a real broker, real
//! PostgreSQL and MariaDB servers on the private Docker engine, a real tmpfs data disk
//! and a throwaway shadow file. Reports come from signed `health` commands; changes are
//! watched where a control plane watches them, as `agent.event`s on the broker's SSE
//! stream.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::docker::{free_port, unique_name, Engine};
use dbvm_e2e::{connected, AgentProc, BrokerProc, Fleet};
use dbvm_protocol::health::{CheckReport, HealthChange, HealthReport, HealthStatus, CHECKS};
use dbvm_protocol::seal::Sealed;
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `health.interval_s` of every agent here.
const INTERVAL: Duration = Duration::from_secs(1);
/// `health.check_timeout_ms` of every agent here.
const CHECK_TIMEOUT_MS: u32 = 800;

/// The checks that ask the database (the others must report on time when it hangs).
const DB_CHECKS: [&str; 5] = [
    "connectivity",
    "max_connections",
    "binlog",
    "binlog_cloud_sync",
    "db_service",
];

/// What a test changes in the `[health]` section.
#[derive(Default)]
struct HealthConfig<'a> {
    /// `health.data_disk` (default: the database's data root or the state directory).
    data_disk: Option<&'a Path>,
    /// Lines for `[health.thresholds]`.
    thresholds: &'a str,
}

struct Setup {
    fleet: Fleet,
    _broker: BrokerProc,
    agent: AgentProc,
    client: dbvmctl::Client,
    engine: Option<Engine>,
    container: String,
    data_root: PathBuf,
    metrics: String,
    shadow: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Containers outlive the agent; remove this test's ones.
        if let Some(engine) = &self.engine {
            engine.remove_container(&self.container);
            engine.remove_container(&format!("{}-init", self.container));
        }
    }
}

/// A broker and an agent with a fast `[health]` section; with `database`, also a
/// `[database]` section on the private engine (no database created yet).
async fn setup(id: &str, database: bool, health: HealthConfig<'_>) -> Setup {
    let engine = database.then(dbvm_e2e::docker::engine);
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let token = client
        .enrollment_token(id, None)
        .await
        .expect("token")
        .token;
    let container = unique_name("health");
    let data_root = fleet.path(&format!("{id}-db"));
    let shadow = fleet.path("shadow");
    std::fs::write(&shadow, "root:*:19000:0:99999:7:::\n").expect("shadow file");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut config = String::new();
    if let Some(engine) = &engine {
        config.push_str(&engine.database_section(&data_root, &container, 1, ""));
    }
    config.push_str(&format!(
        r#"[health]
interval_s = {interval}
check_timeout_ms = {CHECK_TIMEOUT_MS}
report_every_s = 5
metrics_listen = "{metrics}"
shadow_file = "{shadow}"
chronyc = "/nonexistent/chronyc"
"#,
        interval = INTERVAL.as_secs(),
        shadow = shadow.display(),
    ));
    if let Some(disk) = health.data_disk {
        config.push_str(&format!("data_disk = \"{}\"\n", disk.display()));
    }
    config.push_str("[health.thresholds]\n");
    config.push_str(health.thresholds);
    let agent = fleet.start_agent(id, broker.agent_addr, Some(&token), &config);
    connected(&client, id).await;
    Setup {
        fleet,
        _broker: broker,
        agent,
        client,
        engine,
        container,
        data_root,
        metrics,
        shadow,
    }
}

impl Setup {
    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("this test has a database")
    }

    async fn ok(&self, operation: &str, args: Value) -> Value {
        self.fleet
            .send_ok(&self.client, &self.agent, operation, args)
            .await
    }

    /// Runs the twelve checks now (a signed `health` command) and returns the report.
    async fn health(&self) -> HealthReport {
        let out = self.ok("health", json!({})).await;
        let report: HealthReport =
            serde_json::from_value(out.clone()).unwrap_or_else(|e| panic!("{e}: {out}"));
        let ids: Vec<&str> = report.checks.iter().map(|c| c.check.as_str()).collect();
        let want: Vec<&str> = CHECKS.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, want, "all twelve checks, in order");
        report
    }

    /// Runs fresh reports until `check` satisfies `pred` (`within` at most).
    async fn health_until(
        &self,
        check: &str,
        within: Duration,
        pred: impl Fn(&CheckReport) -> bool,
    ) -> HealthReport {
        let deadline = Instant::now() + within;
        loop {
            let report = self.health().await;
            if pred(report.check(check).expect("check")) {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "{check} did not get there within {within:?}; last report:\n{}\n{}",
                render(&report),
                self.agent.proc.log_tail()
            );
            // Paces the polls of a condition that has a deadline (the loop is the wait;
            // it keeps its own failure message with the last report).
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Creates the database; returns the dbaas password (opened from its sealed form).
    async fn create(&self, spec: Value) -> String {
        let out = self.ok("db.create", spec).await;
        let sealed: Sealed =
            serde_json::from_value(out["password"].clone()).expect("sealed password");
        self.fleet
            .reply_key
            .open(&sealed)
            .expect("open")
            .expose()
            .to_string()
    }

    /// A superuser session over the server's unix socket (what the agent itself uses).
    async fn admin(&self, port: u16) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(self.data_root.join("run"))
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await
            .expect("postgres over the admin socket");
        tokio::spawn(conn);
        client
    }
}

fn render(r: &HealthReport) -> String {
    r.checks
        .iter()
        .map(|c| {
            format!(
                "  {:<18} {:<8} {:>5} ms  {}  {:?}",
                c.check, c.status, c.duration_ms, c.message, c.figures
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn check<'a>(r: &'a HealthReport, id: &str) -> &'a CheckReport {
    r.check(id)
        .unwrap_or_else(|| panic!("no {id} in\n{}", render(r)))
}

fn fig(c: &CheckReport, name: &str) -> f64 {
    *c.figures
        .get(name)
        .unwrap_or_else(|| panic!("{} has no figure {name}: {c:?}", c.check))
}

/// `health.changed` events as an SSE subscriber of the broker sees them, with the time
/// each arrived.
struct Changes {
    rx: tokio::sync::mpsc::UnboundedReceiver<(Instant, HealthChange)>,
}

impl Changes {
    async fn subscribe(client: &dbvmctl::Client, agent: &str) -> Self {
        let mut stream = client.events(Some(agent), None).await.expect("events");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                if ev.kind != "agent.event" || ev.data["kind"] != "health.changed" {
                    continue;
                }
                let change: HealthChange = serde_json::from_value(ev.data["payload"].clone())
                    .unwrap_or_else(|e| panic!("health.changed payload: {e}: {}", ev.data));
                if tx.send((Instant::now(), change)).is_err() {
                    break;
                }
            }
        });
        Self { rx }
    }

    /// Forgets what arrived so far.
    fn clear(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// The next change of `check` to `to` (others are skipped), `within` at most.
    async fn next(
        &mut self,
        check: &str,
        to: HealthStatus,
        within: Duration,
    ) -> (Instant, HealthChange) {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(within, async {
            loop {
                let (at, c) = self.rx.recv().await.expect("event stream ended");
                if c.check == check && c.to == to {
                    return (at, c);
                }
                seen.push(format!(
                    "{} {:?} → {}: {}",
                    c.check, c.from, c.to, c.message
                ));
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no health.changed {check} → {to} within {within:?}; seen:\n{}",
                seen.join("\n")
            )
        })
    }
}

/// `GET http://addr/path` over a plain TCP connection: (status code, body).
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("metrics answer within 10 s")
        .expect("read answer");
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

/// The value of the sample `name` (with its labels, as printed) in exposition text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

async fn dbaas(port: u16, password: &str) -> tokio_postgres::Client {
    dbvm_e2e::dbtest::pg_dbaas(port, password, "app")
        .await
        .expect("dbaas connects over TCP")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_checks_stop_start_events_and_metrics() {
    let s = setup("hpg1", true, HealthConfig::default()).await;
    let mut changes = Changes::subscribe(&s.client, "hpg1").await;
    let port = free_port();
    let password = s
        .create(json!({"engine": "postgres", "database": "app", "port": port}))
        .await;

    // A fresh report: all twelve, the database reached like a client reaches it.
    let r = s
        .health_until("connectivity", Duration::from_secs(10), |c| {
            c.status == HealthStatus::Ok
        })
        .await;
    eprintln!("fresh report:\n{}", render(&r));
    let conn = check(&r, "connectivity");
    assert!(
        conn.message
            .contains(&format!("authenticated connection on 127.0.0.1:{port}")),
        "{conn:?}"
    );
    assert_eq!(fig(conn, "db_accepting"), 1.0);
    assert_eq!(fig(conn, "broker_link_up"), 1.0);
    let svc = check(&r, "db_service");
    assert_eq!(svc.status, HealthStatus::Ok, "{svc:?}");
    assert!(svc.message.contains("as primary"), "{svc:?}");
    let maxc = check(&r, "max_connections");
    assert_eq!(fig(maxc, "max_connections"), 100.0, "{maxc:?}");
    // The login really was dbvm_monitor's, with a password, over TCP.
    let c = dbaas(port, &password).await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'dbvm_monitor' AND rolcanlogin",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the monitor role exists and may log in");
    let secret = s.agent.state_dir.join("db").join("monitor.secret");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&secret).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", secret.display());
    let logged = std::fs::read_to_string(s.fleet.path("agent-hpg1.log")).unwrap_or_default();
    let pw = std::fs::read_to_string(&secret).unwrap();
    assert!(
        !logged.contains(pw.trim()),
        "the monitor password is never logged"
    );
    drop(c);

    // The Prometheus endpoint: every check's status and the database basics.
    let (code, text) = http_get(&s.metrics, "/metrics").await;
    assert_eq!(code, 200, "{text}");
    for (id, _) in CHECKS {
        assert!(
            sample(
                &text,
                &format!("dbvm_agent_health_status{{check=\"{id}\"}}")
            )
            .is_some(),
            "no status of {id} in:\n{text}"
        );
    }
    assert_eq!(
        sample(&text, "dbvm_agent_health_status{check=\"connectivity\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "dbvm_agent_db_up"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "dbvm_agent_db_max_connections"),
        Some(100.0),
        "{text}"
    );
    assert!(
        sample(&text, "dbvm_agent_db_connections").is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, "dbvm_agent_db_uptime_seconds").is_some(),
        "{text}"
    );
    assert!(
        sample(&text, "dbvm_agent_db_log_bytes").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "dbvm_agent_link_up"), Some(1.0), "{text}");
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let (code, _) = http_get(&s.metrics, "/nope").await;
    assert_eq!(code, 404);

    // Stopped: the scheduled run notices within an interval and the broker relays it.
    changes.clear();
    s.ok("db.stop", json!({})).await;
    let stopped = Instant::now();
    let (at, change) = changes
        .next(
            "connectivity",
            HealthStatus::Critical,
            Duration::from_secs(15),
        )
        .await;
    let after = at.saturating_duration_since(stopped);
    eprintln!(
        "connectivity → critical reached the SSE subscriber {after:?} after db.stop finished"
    );
    assert!(
        after <= INTERVAL + Duration::from_secs(1),
        "the change took {after:?} (interval {INTERVAL:?} + 1 s allowed)"
    );
    assert!(change.message.contains("db.start"), "{change:?}");
    assert_eq!(change.title, "Connectivity");
    let r = s.health().await;
    for id in ["connectivity", "db_service"] {
        let c = check(&r, id);
        assert_eq!(c.status, HealthStatus::Critical, "{id}:\n{}", render(&r));
        assert!(c.message.contains("db.start"), "{c:?}");
    }
    assert_eq!(fig(check(&r, "db_service"), "up"), 0.0);

    // Started again: ok again, and said so.
    s.ok("db.start", json!({})).await;
    changes
        .next("connectivity", HealthStatus::Ok, Duration::from_secs(15))
        .await;
    let r = s.health().await;
    for id in ["connectivity", "db_service"] {
        assert_eq!(
            check(&r, id).status,
            HealthStatus::Ok,
            "{id}:\n{}",
            render(&r)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_max_connections_near_the_limit_warns_with_figures() {
    let s = setup("hpg2", true, HealthConfig::default()).await;
    let port = free_port();
    let password = s
        .create(
            json!({"engine": "postgres", "database": "app", "port": port,
                       "parameters": {"max_connections": 10}}),
        )
        .await;
    let r = s
        .health_until("max_connections", Duration::from_secs(10), |c| {
            c.status == HealthStatus::Ok && c.figures.contains_key("connections")
        })
        .await;
    let before = fig(check(&r, "max_connections"), "connections");
    // 10 slots, 3 of them kept for superusers: 7 usable. The agent's admin session is one;
    // five more make 6 of 7 (86%): above the 80% warning, below the 95% critical.
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(dbaas(port, &password).await);
    }
    let r = s
        .health_until("max_connections", Duration::from_secs(10), |c| {
            c.status == HealthStatus::Warning
        })
        .await;
    let c = check(&r, "max_connections");
    eprintln!("{c:?}");
    assert_eq!(fig(c, "max_connections"), 10.0);
    assert_eq!(fig(c, "usable_connections"), 7.0);
    assert!(
        fig(c, "connections") >= before + 5.0,
        "{c:?} (before: {before})"
    );
    assert!((80.0..95.0).contains(&fig(c, "used_pct")), "{c:?}");
    assert!(
        c.message.contains("of 7 client connections in use")
            && c.message.contains("3 reserved for superusers")
            && c.message.contains("raise max_connections"),
        "{c:?}"
    );
    // Connections released: ok again.
    drop(clients);
    s.health_until("max_connections", Duration::from_secs(10), |c| {
        c.status == HealthStatus::Ok
    })
    .await;
}

/// Keeps the data_disk changes: a warning (before any critical), then the critical one.
fn take(
    (_, c): (Instant, HealthChange),
    warned: &mut Option<HealthChange>,
    critical: &mut Option<HealthChange>,
) {
    if c.check != "data_disk" {
        return;
    }
    eprintln!("data_disk {:?} → {}: {}", c.from, c.to, c.message);
    match c.to {
        HealthStatus::Warning if critical.is_none() => *warned = Some(c),
        HealthStatus::Critical => *critical = Some(c),
        _ => panic!("data_disk went {:?} → {}: {c:?}", c.from, c.to),
    }
}

/// Unmounts a tmpfs when dropped (also when the test fails).
struct Mounted(PathBuf);

impl Mounted {
    fn tmpfs(dir: &Path, size: &str) -> Self {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "dbvm-health"])
            .arg(dir)
            .status()
            .expect("mount (util-linux; the tests run as root)");
        assert!(st.success(), "mount -t tmpfs {}", dir.display());
        Self(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_disk_filling_up_warns_then_goes_critical_with_a_time_to_full() {
    let dir = tempfile::tempdir().unwrap();
    let _mount = Mounted::tmpfs(dir.path(), "64m");
    // Growth counts once it spans 2 s; full within a day warns; 90% used is critical.
    let s = setup(
        "hdisk",
        false,
        HealthConfig {
            data_disk: Some(dir.path()),
            thresholds: "disk_growth_window_s = 120\ndisk_growth_min_span_s = 2\ndisk_full_critical_h = 0.0001\n",
        },
    )
    .await;
    let mut changes = Changes::subscribe(&s.client, "hdisk").await;
    let r = s.health().await;
    let d = check(&r, "data_disk");
    assert_eq!(d.status, HealthStatus::Ok, "{d:?}");
    assert_eq!(fig(d, "total_bytes"), 64.0 * 1024.0 * 1024.0);
    assert!(
        d.message.contains(&dir.path().display().to_string()),
        "{d:?}"
    );

    // 4 MiB every 500 ms (~8 MiB/s, over several intervals) up to 60 MiB (94%).
    let chunk = vec![7u8; 4 << 20];
    let mut warned = None;
    let mut critical = None;
    for n in 0..15 {
        std::fs::write(dir.path().join(format!("fill-{n}")), &chunk).expect("fill");
        // Not a wait: the pause is the input. The check measures a growth rate over
        // time, so the disk must fill at a known pace across several of its runs.
        tokio::time::sleep(Duration::from_millis(500)).await;
        while let Ok(c) = changes.rx.try_recv() {
            take(c, &mut warned, &mut critical);
        }
    }
    // The last chunk crossed 90%: the next run says so.
    let deadline = Instant::now() + INTERVAL * 5;
    while critical.is_none() && Instant::now() < deadline {
        if let Ok(Some(c)) =
            tokio::time::timeout(Duration::from_millis(200), changes.rx.recv()).await
        {
            take(c, &mut warned, &mut critical);
        }
    }
    let critical = critical.expect("data_disk critical after 94% used");
    let warned = warned.expect("a warning before critical");
    assert_eq!(warned.from, Some(HealthStatus::Ok), "{warned:?}");
    assert_eq!(critical.from, Some(HealthStatus::Warning), "{critical:?}");
    for c in [&warned, &critical] {
        let rate = c.figures.get("growth_bytes_per_s").copied().unwrap_or(0.0);
        let ttf = c.figures.get("time_to_full_s").copied();
        assert!(rate > 0.0, "growth measured: {c:?}");
        assert!(
            ttf.is_some_and(|t| t > 0.0 && t < 3600.0),
            "time to full: {c:?}"
        );
        assert!(c.message.contains("full in about"), "{c:?}");
        assert!(
            c.message.contains("grow the data disk or free space"),
            "{c:?}"
        );
    }
    assert!(
        critical.figures["used_pct"] >= 90.0,
        "critical at 90% used: {critical:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_expiring_in_five_days_warns_and_a_locked_account_is_ignored() {
    let s = setup("hpw", false, HealthConfig::default()).await;
    let today = dbvm_protocol::now_ms().div_euclid(86_400_000);
    std::fs::write(
        &s.shadow,
        format!(
            "root:*:19000:0:99999:7:::\n\
             alice:$6$salt$hash:{alice}:0:30:7:::\n\
             bob:!$6$salt$hash:{bob}:0:30:7:::\n\
             carol:$6$salt$hash:{carol}:0:99999:7:::\n",
            alice = today - 25,
            bob = today - 29,
            carol = today - 10,
        ),
    )
    .unwrap();
    let r = s.health().await;
    let p = check(&r, "password_expiry");
    eprintln!("{p:?}");
    assert_eq!(p.status, HealthStatus::Warning, "{p:?}");
    assert!(
        p.message.contains("alice's password expires in 5 days"),
        "{p:?}"
    );
    assert!(p.message.contains("passwd"), "{p:?}");
    assert!(!p.message.contains("bob"), "bob is locked: {p:?}");
    assert_eq!(fig(p, "min_days_left"), 5.0);
    assert_eq!(fig(p, "accounts_checked"), 2.0, "alice and carol");
    assert_eq!(fig(p, "accounts_expiring"), 1.0);
    // Without a database, its checks say so instead of guessing.
    let svc = check(&r, "db_service");
    assert_eq!(svc.status, HealthStatus::Unknown, "{svc:?}");
    assert!(svc.message.contains("no [database]"), "{svc:?}");
    assert_eq!(check(&r, "connectivity").status, HealthStatus::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_is_cut_off_as_unknown_while_the_rest_report_on_time() {
    let s = setup("hpg3", true, HealthConfig::default()).await;
    let port = free_port();
    s.create(json!({"engine": "postgres", "database": "app", "port": port}))
        .await;
    s.health_until("connectivity", Duration::from_secs(10), |c| {
        c.status == HealthStatus::Ok
    })
    .await;

    // Every process of the server stopped: the engine says running, nothing answers.
    let stopped = s.engine().stop_processes(&s.container);
    let t = Instant::now();
    let r = s.health().await;
    let took = t.elapsed();
    eprintln!("hung report in {took:?}:\n{}", render(&r));
    let timeout = CHECK_TIMEOUT_MS;
    assert!(
        r.duration_ms >= timeout - 50 && r.duration_ms <= timeout + 700,
        "the run took {} ms; the checks are cut off at {timeout} ms",
        r.duration_ms
    );
    for id in DB_CHECKS {
        let c = check(&r, id);
        assert_eq!(c.status, HealthStatus::Unknown, "{id}: {c:?}");
        assert!(
            c.message.contains(&format!(
                "did not finish within {CHECK_TIMEOUT_MS} ms and was cut off"
            )),
            "{c:?}"
        );
    }
    for id in [
        "cpu",
        "ntp_sync",
        "system_disk",
        "data_disk",
        "password_expiry",
        "metrics",
    ] {
        let c = check(&r, id);
        assert!(
            !c.message.contains("cut off"),
            "{id} reported on time: {c:?}"
        );
        assert!(c.duration_ms < timeout, "{id} took {} ms", c.duration_ms);
        assert!(
            !c.figures.is_empty() || c.status == HealthStatus::Ok,
            "{c:?}"
        );
    }
    assert_eq!(check(&r, "password_expiry").status, HealthStatus::Ok);
    assert!(check(&r, "system_disk").figures.contains_key("used_pct"));

    // Released: the next runs find it again (nothing stayed stuck in the agent).
    drop(stopped);
    let r = s
        .health_until("connectivity", Duration::from_secs(15), |c| {
            c.status == HealthStatus::Ok
        })
        .await;
    for id in DB_CHECKS {
        assert!(
            !check(&r, id).message.contains("cut off"),
            "{id}:\n{}",
            render(&r)
        );
    }
    assert_eq!(check(&r, "db_service").status, HealthStatus::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_archiving_broken_is_critical_with_failures_and_age() {
    let s = setup("hpg4", true, HealthConfig::default()).await;
    let port = free_port();
    s.create(json!({"engine": "postgres", "database": "app", "port": port}))
        .await;
    let r = s
        .health_until("binlog", Duration::from_secs(10), |c| {
            c.figures.contains_key("log_bytes")
        })
        .await;
    let b = check(&r, "binlog");
    assert_eq!(b.status, HealthStatus::Unknown, "not configured yet: {b:?}");
    assert!(b.message.contains("not configured"), "{b:?}");
    assert_eq!(check(&r, "binlog_cloud_sync").status, HealthStatus::Unknown);

    // archive_command is not in the allow-list: set it the way an operator would.
    let admin = s.admin(port).await;
    admin
        .batch_execute("ALTER SYSTEM SET archive_mode = 'on'")
        .await
        .unwrap();
    admin
        .batch_execute("ALTER SYSTEM SET archive_command = '/bin/false'")
        .await
        .unwrap();
    drop(admin);
    s.ok("db.restart", json!({})).await;
    let admin = s.admin(port).await;
    admin
        .batch_execute(
            "CREATE TABLE filler AS SELECT g AS n FROM generate_series(1, 20000) g;
             SELECT pg_switch_wal();",
        )
        .await
        .unwrap();

    let r = s
        .health_until("binlog", Duration::from_secs(20), |c| {
            c.status == HealthStatus::Critical
        })
        .await;
    eprintln!("{}", render(&r));
    let b = check(&r, "binlog");
    assert!(fig(b, "failed_count") > 0.0, "{b:?}");
    assert_eq!(fig(b, "archiving"), 1.0, "{b:?}");
    assert!(fig(b, "ready_segments") >= 1.0, "{b:?}");
    assert!(b.figures.contains_key("last_failed_age_s"), "{b:?}");
    assert!(
        b.message.contains("WAL archiving is FAILING")
            && b.message.contains("failures, the last")
            && b.message.contains(" ago for ")
            && b.message.contains("no segment was ever archived"),
        "{b:?}"
    );
    let sync = check(&r, "binlog_cloud_sync");
    assert_ne!(sync.status, HealthStatus::Ok, "{sync:?}");
    assert_ne!(sync.status, HealthStatus::Unknown, "{sync:?}");
    assert!(sync.message.contains("segments wait"), "{sync:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_connectivity_binlog_and_max_connections() {
    let s = setup("hmy1", true, HealthConfig::default()).await;
    let port = free_port();
    s.create(
        json!({"engine": "mariadb", "database": "shop", "port": port,
                    "parameters": {"max_connections": 40}}),
    )
    .await;
    let r = s
        .health_until("connectivity", Duration::from_secs(15), |c| {
            c.status == HealthStatus::Ok
        })
        .await;
    eprintln!("{}", render(&r));
    let conn = check(&r, "connectivity");
    assert!(
        conn.message
            .contains(&format!("authenticated connection on 127.0.0.1:{port}")),
        "{conn:?}"
    );
    let b = check(&r, "binlog");
    match b.status {
        HealthStatus::Unknown => assert!(b.message.contains("log_bin"), "{b:?}"),
        HealthStatus::Ok => assert!(b.message.contains("binary logs"), "{b:?}"),
        _ => panic!("{b:?}"),
    }
    let m = check(&r, "max_connections");
    assert_eq!(m.status, HealthStatus::Ok, "{m:?}");
    assert_eq!(fig(m, "max_connections"), 40.0, "{m:?}");
    assert_eq!(fig(m, "usable_connections"), 40.0, "{m:?}");
    assert!(fig(m, "connections") >= 1.0, "{m:?}");
    let svc = check(&r, "db_service");
    assert_eq!(svc.status, HealthStatus::Ok, "{svc:?}");
    assert!(
        svc.message.contains("mariadb") || svc.message.contains("MariaDB"),
        "{svc:?}"
    );
    assert_eq!(check(&r, "binlog_cloud_sync").status, HealthStatus::Unknown);
}
