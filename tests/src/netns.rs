//! Network namespaces for tests: a "db" namespace with two interfaces (management and
//! application, named as the firewall config says) wired by veth pairs to a "client"
//! namespace, throwaway TCP listeners inside the db namespace, connection probes from
//! either side, commands run inside either namespace (a whole agent, for instance), and a
//! loopback forwarder that lets a process in a namespace reach one address on the host.
//!
//! Everything is created inside namespaces this helper makes (the veth pairs are born in
//! them) and deleted on drop, so the host's interfaces and ruleset are never touched. The
//! addresses only exist inside the pair, so concurrent pairs cannot disturb each other;
//! they are still chosen per process and per pair, away from anything the host routes,
//! to keep `ip` output unambiguous when debugging.

use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// What a test that needs a missing tool tells the reader to run.
pub const INSTALL_HINT: &str = "install with: bash scripts/setup.sh";

/// Prefix of every namespace this helper creates: `dbvmt-<pid>-<n>-db|cl`.
const PREFIX: &str = "dbvmt-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Fails the test (with the install command) unless `ip`, `ss`, `nft` and `socat` run
/// and the test runs as root.
pub fn require_tools() {
    for (tool, arg) in [
        ("ip", "-V"),
        ("ss", "-V"),
        ("nft", "--version"),
        ("socat", "-V"),
    ] {
        match Command::new(tool).arg(arg).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "`{tool} {arg}` failed ({}): {}; {INSTALL_HINT}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("{tool} cannot run ({e}); {INSTALL_HINT}"),
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("?");
    assert_eq!(
        uid, "0",
        "network namespace tests create namespaces and veth pairs: run them as root"
    );
}

/// Which namespace of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Db,
    Client,
}

/// What a connection attempt met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The handshake completed.
    Open,
    /// Actively refused (RST): nothing listens, but nothing filters either.
    Refused,
    /// No answer within the timeout: dropped by a firewall.
    TimedOut,
}

/// A "db" and a "client" namespace joined by two veth pairs, with listeners.
pub struct NetnsPair {
    pub db: String,
    pub client: String,
    /// The db namespace's management interface (its peer in the client is `mgmt0`).
    pub management_interface: String,
    /// The db namespace's application interface (its peer in the client is `app0`).
    pub application_interface: String,
    pub db_management: Ipv4Addr,
    pub db_application: Ipv4Addr,
    pub client_management: Ipv4Addr,
    pub client_application: Ipv4Addr,
    listeners: Vec<Child>,
    /// Unix sockets of [`NetnsPair::forward_to_host`], removed on drop.
    sockets: Vec<PathBuf>,
}

/// First loopback port [`NetnsPair::forward_to_host`] listens on inside a namespace (the
/// namespace is private, so any free port there will do).
const FORWARD_PORT_BASE: u16 = 17_400;

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}; {INSTALL_HINT}", args.join(" ")))
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "`{}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes namespaces left by test processes that died before their drop ran.
fn reap_orphans() {
    let list = run(&["ip", "netns", "list"]);
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            delete_namespace(name);
        }
    }
}

/// Kills what still runs in `ns` (forked listener children) and deletes it.
fn delete_namespace(ns: &str) {
    let pids = run(&["ip", "netns", "pids", ns]);
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = run(&["kill", "-9", pid]);
    }
    let _ = run(&["ip", "netns", "del", ns]);
}

/// Two adjacent /24s, `10.a.c.0/24` and `10.a.(c+1).0/24`, for pair `n` of process `pid`,
/// in a `10.a.0.0/16` the host has no address or route in.
fn pick_subnets(pid: u32, n: u32) -> (u8, u8) {
    let host = format!(
        "{}{}",
        run_ok(&["ip", "-4", "-o", "addr", "show"]),
        run_ok(&["ip", "-4", "route", "show", "table", "all"])
    );
    let host_has_10_8 = host.contains("10.0.0.0/8");
    for attempt in 0..10_000u32 {
        let k = pid
            .wrapping_mul(2_654_435_761)
            .wrapping_add(n.wrapping_add(attempt).wrapping_mul(40_503));
        let a = 16 + (k % 224) as u8;
        let c = (((k >> 8) % 127) * 2) as u8;
        if host_has_10_8 || !host.contains(&format!("10.{a}.")) {
            return (a, c);
        }
    }
    panic!("every 10.x.0.0/16 is in use on this host: cannot pick test subnets");
}

impl NetnsPair {
    /// Creates the pair: the db namespace gets `management_interface` (x.x.c.1/24) and
    /// `application_interface` (x.x.c+1.1/24); the client gets .2 on both; all links and
    /// loopbacks are up.
    pub fn new(management_interface: &str, application_interface: &str) -> Self {
        require_tools();
        reap_orphans();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let (a, c) = pick_subnets(pid, n);
        let pair = Self {
            db: format!("{PREFIX}{pid}-{n}-db"),
            client: format!("{PREFIX}{pid}-{n}-cl"),
            management_interface: management_interface.to_string(),
            application_interface: application_interface.to_string(),
            db_management: Ipv4Addr::new(10, a, c, 1),
            db_application: Ipv4Addr::new(10, a, c + 1, 1),
            client_management: Ipv4Addr::new(10, a, c, 2),
            client_application: Ipv4Addr::new(10, a, c + 1, 2),
            listeners: Vec::new(),
            sockets: Vec::new(),
        };
        // From here on a failure panics and `Drop` deletes what was made.
        let (db, cl) = (pair.db.as_str(), pair.client.as_str());
        run_ok(&["ip", "netns", "add", db]);
        run_ok(&["ip", "netns", "add", cl]);
        let links = [
            (
                management_interface,
                "mgmt0",
                pair.db_management,
                pair.client_management,
            ),
            (
                application_interface,
                "app0",
                pair.db_application,
                pair.client_application,
            ),
        ];
        for (db_if, cl_if, db_addr, cl_addr) in links {
            run_ok(&[
                "ip", "-n", db, "link", "add", db_if, "type", "veth", "peer", "name", cl_if,
                "netns", cl,
            ]);
            run_ok(&[
                "ip",
                "-n",
                db,
                "addr",
                "add",
                &format!("{db_addr}/24"),
                "dev",
                db_if,
            ]);
            run_ok(&[
                "ip",
                "-n",
                cl,
                "addr",
                "add",
                &format!("{cl_addr}/24"),
                "dev",
                cl_if,
            ]);
            run_ok(&["ip", "-n", db, "link", "set", db_if, "up"]);
            run_ok(&["ip", "-n", cl, "link", "set", cl_if, "up"]);
        }
        run_ok(&["ip", "-n", db, "link", "set", "lo", "up"]);
        run_ok(&["ip", "-n", cl, "link", "set", "lo", "up"]);
        pair
    }

    pub fn ns(&self, side: Side) -> &str {
        match side {
            Side::Db => &self.db,
            Side::Client => &self.client,
        }
    }

    /// Runs `args` inside the namespace and returns its output, whatever the exit status.
    pub fn exec(&self, side: Side, args: &[&str]) -> Output {
        let mut all = vec!["ip", "netns", "exec", self.ns(side)];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Runs `args` inside the namespace, fails the test if it fails, returns stdout.
    pub fn exec_ok(&self, side: Side, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", self.ns(side)];
        all.extend_from_slice(args);
        run_ok(&all)
    }

    /// `nft list ruleset` inside the namespace.
    pub fn ruleset(&self, side: Side) -> String {
        self.exec_ok(side, &["nft", "list", "ruleset"])
    }

    /// Starts a TCP listener on `addr:port` inside the db namespace for each port (it
    /// accepts and closes every connection) and waits until all are listening.
    pub fn listen(&mut self, addr: Ipv4Addr, ports: &[u16]) {
        for port in ports {
            let child = self
                .command(Side::Db, "socat")
                .arg(format!("TCP-LISTEN:{port},bind={addr},fork,reuseaddr"))
                .arg("EXEC:/bin/true")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start socat ({e}); {INSTALL_HINT}"));
            self.listeners.push(child);
        }
        let want: Vec<String> = ports.iter().map(|p| format!("{addr}:{p}")).collect();
        self.wait_listening(Side::Db, &want);
    }

    /// Waits (10 s at most) until every `addr:port` in `want` listens inside `side`; fails
    /// the test early if one of the pair's own listeners exited.
    fn wait_listening(&mut self, side: Side, want: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listening: Vec<String> = self
                .tcp_listeners(side)
                .into_iter()
                .map(|(addr, _)| addr)
                .collect();
            let missing: Vec<&String> = want.iter().filter(|w| !listening.contains(w)).collect();
            if missing.is_empty() {
                return;
            }
            for child in &mut self.listeners {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("a socat listener exited ({status}) before listening; {missing:?} are not up");
                }
            }
            assert!(
                Instant::now() < deadline,
                "listeners {missing:?} did not come up within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every listening TCP socket inside `side`: its local address (`ss` form:
    /// `10.1.2.1:22`, `0.0.0.0:5432`, `[::]:5432`) and the name of the process that owns it
    /// (empty when `ss` cannot tell).
    pub fn tcp_listeners(&self, side: Side) -> Vec<(String, String)> {
        let ss = self.exec_ok(side, &["ss", "-Hltnp"]);
        ss.lines()
            .filter_map(|l| {
                let local = l.split_whitespace().nth(3)?.to_string();
                // `users:(("postgres",pid=123,fd=6),…)`
                let process = l
                    .split_once("((\"")
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map(|(name, _)| name.to_string())
                    .unwrap_or_default();
                Some((local, process))
            })
            .collect()
    }

    /// A command that runs `program` inside `side` (`ip netns exec NS program`); the caller
    /// adds arguments, environment and standard streams. A process spawned this way is the
    /// program itself (`ip netns exec` execs it), and whatever it leaves running in the db
    /// or client namespace is killed when the pair drops.
    pub fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(side)]).arg(program);
        cmd
    }

    /// Makes `target`, an address on the host, reachable from inside `side` at
    /// `127.0.0.1:<the returned port>`, without giving the namespace a route or an
    /// interface towards the host: a socat inside the namespace hands each connection to a
    /// unix socket (the file system is shared), where a socat on the host connects it to
    /// `target`. An agent in the db namespace dials its broker this way.
    pub fn forward_to_host(&mut self, side: Side, target: SocketAddr) -> u16 {
        let n = self.sockets.len();
        let port = FORWARD_PORT_BASE + u16::try_from(n).expect("a few forwards per pair");
        let socket = std::env::temp_dir().join(format!("{}-fwd{n}.sock", self.ns(side)));
        let _ = std::fs::remove_file(&socket);
        self.sockets.push(socket.clone());
        let host_side = Command::new("socat")
            .arg(format!("UNIX-LISTEN:{},fork,mode=600", socket.display()))
            .arg(format!("TCP:{target}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start socat ({e}); {INSTALL_HINT}"));
        self.listeners.push(host_side);
        let ns_side = self
            .command(side, "socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
            .arg(format!("UNIX-CONNECT:{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start socat ({e}); {INSTALL_HINT}"));
        self.listeners.push(ns_side);
        self.wait_listening(side, &[format!("127.0.0.1:{port}")]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the forwarder's socket {} did not appear within 10 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        port
    }

    /// Tries a TCP connection to `addr:port` from inside `from`.
    pub fn reach(&self, from: Side, addr: Ipv4Addr, port: u16, timeout: Duration) -> Reach {
        let target = format!(
            "TCP:{addr}:{port},connect-timeout={:.3}",
            timeout.as_secs_f64()
        );
        let out = self.exec(from, &["socat", "-T1", "/dev/null", &target]);
        if out.status.success() {
            return Reach::Open;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("Connection refused") {
            Reach::Refused
        } else if stderr.contains("timed out") {
            Reach::TimedOut
        } else {
            panic!(
                "probe of {addr}:{port} from {} failed oddly ({}): {}",
                self.ns(from),
                out.status,
                stderr.trim()
            )
        }
    }

    /// Whether a TCP connection to `addr:port` from inside `from` completes.
    pub fn probe(&self, from: Side, addr: Ipv4Addr, port: u16, timeout: Duration) -> bool {
        self.reach(from, addr, port, timeout) == Reach::Open
    }

    /// `reach` for many targets at once (in parallel, so dropped ones cost one timeout).
    pub fn reach_all(
        &self,
        from: Side,
        targets: &[(Ipv4Addr, u16)],
        timeout: Duration,
    ) -> Vec<Reach> {
        std::thread::scope(|s| {
            let handles: Vec<_> = targets
                .iter()
                .map(|&(addr, port)| s.spawn(move || self.reach(from, addr, port, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("probe thread panicked"))
                .collect()
        })
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for child in &mut self.listeners {
            let _ = child.kill();
            let _ = child.wait();
        }
        delete_namespace(&self.db);
        delete_namespace(&self.client);
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// The host's nftables ruleset, for proving a test left it alone. Tables that
/// iptables-nft manages (Docker's, which other tests may change at the same time) and
/// traffic counters are left out; everything else is compared.
#[derive(Debug)]
pub struct HostRuleset(Vec<String>);

const IPTABLES_TABLES: &[&str] = &["filter", "nat", "mangle", "raw", "security", "broute"];

fn strip_counters(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("packets");
            m.remove("bytes");
            m.values_mut().for_each(strip_counters);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_counters),
        _ => {}
    }
}

impl HostRuleset {
    pub fn snapshot() -> Self {
        require_tools();
        let text = run_ok(&["nft", "-j", "list", "ruleset"]);
        let mut doc: Value = serde_json::from_str(&text).expect("nft -j prints JSON");
        strip_counters(&mut doc);
        let items = doc["nftables"].as_array().cloned().unwrap_or_default();
        let kept = items
            .into_iter()
            .filter(|item| {
                let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
                    return true;
                };
                if kind == "metainfo" {
                    return false;
                }
                let family = body["family"].as_str().unwrap_or_default();
                let table = if kind == "table" {
                    body["name"].as_str()
                } else {
                    body["table"].as_str()
                }
                .unwrap_or_default();
                let iptables = matches!(family, "ip" | "ip6" | "arp" | "bridge")
                    && IPTABLES_TABLES.contains(&table);
                !iptables
            })
            .map(|item| item.to_string())
            .collect();
        Self(kept)
    }

    /// Fails the test if the host's ruleset changed since `self` was taken.
    pub fn assert_unchanged(&self) {
        let now = Self::snapshot();
        let added: Vec<&String> = now.0.iter().filter(|x| !self.0.contains(x)).collect();
        let removed: Vec<&String> = self.0.iter().filter(|x| !now.0.contains(x)).collect();
        assert!(
            added.is_empty() && removed.is_empty(),
            "the host's nftables ruleset changed: added {added:#?}, removed {removed:#?}"
        );
    }
}
