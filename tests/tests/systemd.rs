//! systemd integration of the real binaries: `READY=1` once started, `WATCHDOG=1`
//! keep-alives at half of `WATCHDOG_USEC`, `STOPPING=1` when a drain begins — read from a
//! notification socket of the test's own, as systemd would (`Type=notify`,
//! `WatchdogSec=`). systemd names the process the watchdog is for (`WATCHDOG_PID`): a
//! shell sets it to its own pid and `exec`s the program, which keeps that pid.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::Fleet;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Messages from `sock` until `done` says so; panics after `limit`.
fn until(
    sock: &UnixDatagram,
    limit: Duration,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while !done(&got) {
        assert!(Instant::now() < end, "{what}: only {got:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            got.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    got
}

fn count(got: &[String], line: &str) -> usize {
    got.iter().filter(|l| *l == line).count()
}

/// `bin --config config` as systemd would start it: `NOTIFY_SOCKET`, and with `watchdog`
/// the watchdog's interval and pid.
fn start(bin: &str, config: &Path, sock: &Path, watchdog: bool, log: &Path) -> Child {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(if watchdog {
            "WATCHDOG_PID=$$ WATCHDOG_USEC=400000 exec \"$0\" \"$@\""
        } else {
            "exec \"$0\" \"$@\""
        })
        .arg(dbvm_e2e::proc::bin_dir().join(bin))
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", sock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().unwrap()
}

fn terminate(child: &mut Child) {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_agent_notify_ready_feed_the_watchdog_and_say_stopping() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let mut enrolled = fleet
        .enroll_agent(&client, broker.agent_addr, "sd1", "")
        .await;
    enrolled.proc.terminate();

    // A second broker on its own config, started as systemd would.
    let any = "127.0.0.1:0".parse().unwrap();
    let mut first = fleet.start_broker_at("b2", any, any, "");
    first.proc.terminate();
    let path = fleet.path("b2-notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut b2 = start(
        "dbvm-broker",
        &fleet.path("b2.toml"),
        &path,
        true,
        &fleet.path("b2-sd.log"),
    );
    let got = until(
        &sock,
        Duration::from_secs(15),
        "broker ready and watchdog",
        |g| count(g, "READY=1") == 1 && count(g, "WATCHDOG=1") >= 3,
    );
    assert_eq!(got[0], "READY=1", "ready first: {got:?}");
    terminate(&mut b2);
    until(&sock, Duration::from_secs(15), "broker stopping", |g| {
        count(g, "STOPPING=1") == 1
    });
    b2.wait().unwrap();

    // The enrolled agent, started as systemd would: ready, fed, connected; then a drain.
    let path = fleet.path("agent-notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut agent = start(
        "dbvm-agent",
        &enrolled.config,
        &path,
        true,
        &fleet.path("sd1-sd.log"),
    );
    let got = until(
        &sock,
        Duration::from_secs(15),
        "agent ready and watchdog",
        |g| count(g, "READY=1") == 1 && count(g, "WATCHDOG=1") >= 3,
    );
    assert_eq!(got[0], "READY=1", "ready first: {got:?}");
    dbvm_e2e::connected(&client, "sd1").await;
    terminate(&mut agent);
    until(&sock, Duration::from_secs(15), "agent stopping", |g| {
        count(g, "STOPPING=1") == 1
    });
    agent.wait().unwrap();
}

#[test]
fn without_a_watchdog_only_readiness_is_sent() {
    let fleet = Fleet::new();
    let any = "127.0.0.1:0".parse().unwrap();
    let mut first = fleet.start_broker_at("b3", any, any, "");
    first.proc.terminate();
    let path = fleet.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut b3 = start(
        "dbvm-broker",
        &fleet.path("b3.toml"),
        &path,
        false,
        &fleet.path("b3-sd.log"),
    );
    let got = until(&sock, Duration::from_secs(15), "broker ready", |g| {
        count(g, "READY=1") == 1
    });
    std::thread::sleep(Duration::from_millis(600));
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let more = sock
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).to_string());
    terminate(&mut b3);
    b3.wait().unwrap();
    assert!(
        more.is_err(),
        "nothing after READY=1 without a watchdog: {got:?} then {more:?}"
    );
}
