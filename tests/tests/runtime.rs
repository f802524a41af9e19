//! The agent's container runtimes against the real thing: the Docker runtime against a
//! private Docker engine (`dbvm_e2e::docker::engine()`), with the database images built
//! from this machine's Debian files; the process runtime against host processes.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use dbvm_agent::runtime::{
    ContainerRuntime, ContainerSpec, DockerRuntime, Mount, ProcessRuntime, Reconciled,
    RestartPolicy, RuntimeError, State,
};
use dbvm_e2e::docker::{engine, free_port, unique_name};
use dbvm_e2e::eventually;

const T: Duration = Duration::from_secs(60);

fn docker() -> DockerRuntime {
    DockerRuntime::connect(&engine().socket).expect("connect")
}

fn argv(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

/// A long-running throwaway container (busybox sleep).
fn sleeper(name: &str, image: &str) -> ContainerSpec {
    let mut spec = ContainerSpec::new(name, image);
    spec.command = argv(&["sleep", "3600"]);
    spec.stop_timeout_s = 1;
    spec.labels.insert("test".into(), "runtime".into());
    spec
}

/// Removes the container when the test ends, however it ends.
struct Cleanup<'a, R: ContainerRuntime>(&'a R, String);
impl<R: ContainerRuntime> Drop for Cleanup<'_, R> {
    fn drop(&mut self) {
        let name = self.1.clone();
        let rt = self.0;
        // Drop runs inside the test's runtime: use a scoped thread with its own runtime.
        std::thread::scope(|s| {
            s.spawn(|| {
                let r = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let _ = r.block_on(rt.remove(&name));
            });
        });
    }
}

async fn wait_not_running<R: ContainerRuntime>(rt: &R, name: &str) -> State {
    eventually(T, "the container to stop", || async {
        let st = rt.inspect(name).await.unwrap().expect("container exists");
        (st.state != State::Running).then_some(st.state)
    })
    .await
}

// ---------------------------------------------------------------- docker

#[tokio::test]
async fn docker_negotiates_api_1_41() {
    let rt = docker();
    assert_eq!(rt.kind(), "docker");
    let v = rt.version().await.unwrap();
    assert!(v.contains("using API 1.41"), "{v}");
    assert!(v.contains("Docker Engine 20.10"), "{v}");
}

#[tokio::test]
async fn docker_image_present() {
    let rt = docker();
    let e = engine();
    assert!(rt.image_present(&e.busybox_image).await.unwrap());
    assert!(rt.image_present(&e.postgres_image).await.unwrap());
    assert!(rt.image_present(&e.mariadb_image).await.unwrap());
    assert!(!rt.image_present("dbvm-test/no-such-image:0").await.unwrap());
}

#[tokio::test]
async fn docker_converges_a_container() {
    let rt = docker();
    let name = unique_name("conv");
    let _cleanup = Cleanup(&rt, name.clone());
    let spec = sleeper(&name, &engine().busybox_image);

    let t0 = Instant::now();
    assert_eq!(rt.ensure_running(&spec).await.unwrap(), Reconciled::Created);
    eprintln!("docker create+start: {:?}", t0.elapsed());
    let first = rt.inspect(&name).await.unwrap().unwrap();
    assert_eq!(first.state, State::Running);
    assert_eq!(
        first.fingerprint.as_deref(),
        Some(spec.fingerprint().as_str())
    );
    assert!(first.pid.is_some() && first.started_at_ms.is_some());
    assert_eq!(first.image, spec.image);

    // Again: nothing to do, same container.
    assert_eq!(
        rt.ensure_running(&spec).await.unwrap(),
        Reconciled::AlreadyRunning
    );
    assert_eq!(rt.inspect(&name).await.unwrap().unwrap().id, first.id);

    // Killed behind its back: started again, same container.
    rt.kill(&name, "SIGKILL").await.unwrap();
    let state = wait_not_running(&rt, &name).await;
    assert_eq!(
        state,
        State::Stopped {
            exit_code: Some(137)
        }
    );
    let t0 = Instant::now();
    assert_eq!(rt.ensure_running(&spec).await.unwrap(), Reconciled::Started);
    eprintln!("docker start (existing): {:?}", t0.elapsed());
    let again = rt.inspect(&name).await.unwrap().unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(again.state, State::Running);

    // A changed spec (here a label; an image upgrade is the same): recreated.
    let mut changed = spec.clone();
    changed.labels.insert("version".into(), "2".into());
    changed.memory_bytes = Some(64 << 20);
    changed.cpus = Some(0.5);
    changed.restart = RestartPolicy::UnlessStopped;
    let t0 = Instant::now();
    assert_eq!(
        rt.ensure_running(&changed).await.unwrap(),
        Reconciled::Recreated
    );
    eprintln!("docker recreate: {:?}", t0.elapsed());
    let recreated = rt.inspect(&name).await.unwrap().unwrap();
    assert_ne!(recreated.id, first.id);
    assert_eq!(
        recreated.fingerprint.as_deref(),
        Some(changed.fingerprint().as_str())
    );
    assert_eq!(recreated.state, State::Running);

    // Stop, then remove.
    assert!(rt.stop(&name, Duration::from_secs(1)).await.unwrap());
    assert!(matches!(
        rt.inspect(&name).await.unwrap().unwrap().state,
        State::Stopped { .. }
    ));
    assert!(rt.remove(&name).await.unwrap());
    assert!(rt.inspect(&name).await.unwrap().is_none());
    assert!(!rt.remove(&name).await.unwrap());
    assert!(!rt.stop(&name, Duration::from_secs(1)).await.unwrap());
}

#[tokio::test]
async fn docker_runs_to_completion_and_execs() {
    let rt = docker();
    let name = unique_name("once");
    let mut spec = ContainerSpec::new(&name, engine().busybox_image);
    spec.command = argv(&["sh", "-c", "echo out; echo err >&2; echo $GREETING; exit 3"]);
    spec.env = vec![("GREETING".into(), "hello".into())];
    let t0 = Instant::now();
    let out = rt.run_to_completion(&spec, T).await.unwrap();
    eprintln!("docker run_to_completion: {:?}", t0.elapsed());
    assert_eq!(out.exit_code, 3);
    assert_eq!(out.stdout, "out\nhello\n");
    assert_eq!(out.stderr, "err\n");
    assert!(rt.inspect(&name).await.unwrap().is_none(), "removed after");

    // Too slow: killed, removed, Timeout.
    spec.command = argv(&["sleep", "60"]);
    let t0 = Instant::now();
    match rt.run_to_completion(&spec, Duration::from_secs(1)).await {
        Err(RuntimeError::Timeout(m)) => assert!(m.contains(&name), "{m}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(rt.inspect(&name).await.unwrap().is_none(), "removed after");

    // exec in a running container, as another user.
    let name = unique_name("exec");
    let _cleanup = Cleanup(&rt, name.clone());
    rt.ensure_running(&sleeper(&name, &engine().busybox_image))
        .await
        .unwrap();
    let out = rt
        .exec(
            &name,
            &argv(&["sh", "-c", "id -u; echo oops >&2; exit 4"]),
            Some("999:999"),
            T,
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 4);
    assert_eq!(out.stdout, "999\n");
    assert_eq!(out.stderr, "oops\n");
}

#[tokio::test]
async fn docker_missing_image_is_explained() {
    let rt = docker();
    let name = unique_name("noimg");
    let _cleanup = Cleanup(&rt, name.clone());
    let spec = sleeper(&name, "dbvm-test/no-such-image:0");
    for result in [
        rt.ensure_running(&spec).await.map(|_| ()),
        rt.run_to_completion(&spec, T).await.map(|_| ()),
    ] {
        match result {
            Err(RuntimeError::ImageMissing(m)) => {
                assert!(m.contains("dbvm-test/no-such-image:0"), "{m}");
                assert!(m.contains("build-image.sh"), "{m}");
                assert!(m.contains("never pulls"), "{m}");
            }
            other => panic!("expected ImageMissing, got {other:?}"),
        }
    }
    assert!(rt.inspect(&name).await.unwrap().is_none());
}

#[tokio::test]
async fn docker_engine_down_is_engine_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file with nothing listening (connection refused), and no file at all.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for sock in [stale, dir.path().join("missing.sock")] {
        let rt = DockerRuntime::connect(&sock).unwrap();
        for result in [
            rt.version().await.map(|_| ()),
            rt.inspect("x").await.map(|_| ()),
            rt.ensure_running(&sleeper("x", "busybox"))
                .await
                .map(|_| ()),
        ] {
            match result {
                Err(RuntimeError::EngineUnavailable(m)) => {
                    assert!(m.contains(&sock.display().to_string()), "{m}");
                    assert!(m.contains("start it"), "{m}");
                }
                other => panic!(
                    "{}: expected EngineUnavailable, got {other:?}",
                    sock.display()
                ),
            }
        }
    }
}

/// A directory the database user (uid 999 in the images) owns, under target/ so the
/// private engine (and the host) see it at the same path.
fn db_dir(what: &str) -> tempfile::TempDir {
    let base = dbvm_e2e::docker::workspace_root()
        .join("target")
        .join("dbvm-test-data");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::Builder::new()
        .prefix(what)
        .tempdir_in(&base)
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(999), Some(999)).unwrap();
    dir
}

fn bind(dir: &Path) -> Mount {
    Mount {
        source: dir.to_path_buf(),
        target: dir.to_path_buf(),
        read_only: false,
    }
}

fn host_ok(cmd: &str, args: &[&str]) -> bool {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test]
async fn docker_postgres_image_initialises_and_serves() {
    let rt = docker();
    let e = engine();
    let dir = db_dir("pg");
    let data = dir.path().join("data");
    let data_s = data.display().to_string();
    let port = free_port();

    let name = unique_name("pginit");
    let mut init = ContainerSpec::new(&name, &e.postgres_image);
    init.command = argv(&[
        "initdb",
        "-D",
        &data_s,
        "-U",
        "postgres",
        "--auth-local=trust",
        "--auth-host=trust",
        "--locale=C.UTF-8",
        "-E",
        "UTF8",
    ]);
    init.user = Some("999:999".into());
    init.mounts = vec![bind(dir.path())];
    let t0 = Instant::now();
    let out = rt
        .run_to_completion(&init, Duration::from_secs(120))
        .await
        .unwrap();
    let t_init = t0.elapsed();
    assert_eq!(out.exit_code, 0, "initdb: {}\n{}", out.stdout, out.stderr);

    let name = unique_name("pg");
    let _cleanup = Cleanup(&rt, name.clone());
    let mut spec = ContainerSpec::new(&name, &e.postgres_image);
    spec.command = argv(&[
        "postgres",
        "-D",
        &data_s,
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        &format!("port={port}"),
        "-c",
        "unix_socket_directories=/tmp",
        "-c",
        "jit=off",
    ]);
    spec.user = Some("999:999".into());
    spec.mounts = vec![bind(dir.path())];
    spec.restart = RestartPolicy::UnlessStopped;
    spec.memory_bytes = Some(512 << 20);
    let t0 = Instant::now();
    assert_eq!(rt.ensure_running(&spec).await.unwrap(), Reconciled::Created);
    let p = port.to_string();
    eventually(T, "postgres to accept connections", || async {
        host_ok("pg_isready", &["-q", "-h", "127.0.0.1", "-p", &p]).then_some(())
    })
    .await;
    eprintln!(
        "postgres: initdb {t_init:?}, start until ready {:?}",
        t0.elapsed()
    );
    // The host's client over TCP, and the image's client inside the container.
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &p,
            "-U",
            "postgres",
            "-Atc",
            "select 40+2",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{out:?}");
    let out = rt
        .exec(
            &name,
            &argv(&[
                "psql", "-h", "/tmp", "-p", &p, "-U", "postgres", "-Atc", "show jit",
            ]),
            None,
            T,
        )
        .await
        .unwrap();
    assert_eq!((out.exit_code, out.stdout.trim()), (0, "off"), "{out:?}");

    // The image's stop signal (SIGINT, fast shutdown) makes a clean, quick stop.
    let t0 = Instant::now();
    assert!(rt.stop(&name, Duration::from_secs(30)).await.unwrap());
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(
        rt.inspect(&name).await.unwrap().unwrap().state,
        State::Stopped { exit_code: Some(0) }
    );
}

#[tokio::test]
async fn docker_mariadb_image_initialises_and_serves() {
    let rt = docker();
    let e = engine();
    let dir = db_dir("my");
    let data = dir.path().join("data");
    let sock = dir.path().join("mysqld.sock").display().to_string();
    let data_s = data.display().to_string();
    let port = free_port();

    let name = unique_name("myinit");
    let mut init = ContainerSpec::new(&name, &e.mariadb_image);
    init.command = argv(&[
        "mariadb-install-db",
        "--no-defaults",
        &format!("--datadir={data_s}"),
        "--user=mysql",
        "--skip-name-resolve",
        "--auth-root-authentication-method=socket",
        "--skip-test-db",
    ]);
    init.user = Some("999:999".into());
    init.mounts = vec![bind(dir.path())];
    let t0 = Instant::now();
    let out = rt
        .run_to_completion(&init, Duration::from_secs(120))
        .await
        .unwrap();
    let t_init = t0.elapsed();
    assert_eq!(
        out.exit_code, 0,
        "install-db: {}\n{}",
        out.stdout, out.stderr
    );

    let name = unique_name("my");
    let _cleanup = Cleanup(&rt, name.clone());
    let mut spec = ContainerSpec::new(&name, &e.mariadb_image);
    spec.command = argv(&[
        "mariadbd",
        "--no-defaults",
        &format!("--datadir={data_s}"),
        "--bind-address=127.0.0.1",
        &format!("--port={port}"),
        &format!("--socket={sock}"),
        &format!("--pid-file={}/mysqld.pid", dir.path().display()),
        "--skip-name-resolve",
    ]);
    spec.user = Some("999:999".into());
    spec.mounts = vec![bind(dir.path())];
    spec.stop_timeout_s = 30;
    let t0 = Instant::now();
    assert_eq!(rt.ensure_running(&spec).await.unwrap(), Reconciled::Created);
    let ping = argv(&[
        "mariadb-admin",
        "--no-defaults",
        &format!("--socket={sock}"),
        "-u",
        "mysql",
        "ping",
    ]);
    eventually(T, "mariadbd to answer", || async {
        let out = rt.exec(&name, &ping, None, T).await.ok()?;
        (out.exit_code == 0).then_some(())
    })
    .await;
    eprintln!(
        "mariadb: install-db {t_init:?}, start until ready {:?}",
        t0.elapsed()
    );
    let sql =
        "CREATE USER 'dbaas'@'%' IDENTIFIED BY 'pw-for-test'; GRANT ALL ON *.* TO 'dbaas'@'%';";
    let out = rt
        .exec(
            &name,
            &argv(&[
                "mariadb",
                "--no-defaults",
                &format!("--socket={sock}"),
                "-u",
                "mysql",
                "-e",
                sql,
            ]),
            None,
            T,
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    // The host's client over TCP.
    let out = std::process::Command::new("mariadb")
        .args([
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "-P",
            &port.to_string(),
            "-u",
            "dbaas",
            "-ppw-for-test",
            "-Nse",
            "select 40+2",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{out:?}");

    assert!(rt.stop(&name, Duration::from_secs(30)).await.unwrap());
    assert_eq!(
        rt.inspect(&name).await.unwrap().unwrap().state,
        State::Stopped { exit_code: Some(0) }
    );
}

// ---------------------------------------------------------------- process

#[tokio::test]
async fn process_converges_a_process() {
    let dir = tempfile::tempdir().unwrap();
    let rt = ProcessRuntime::new(dir.path().to_path_buf());
    assert_eq!(rt.kind(), "process");
    assert!(rt.version().await.unwrap().contains("process runtime"));
    assert!(rt.image_present("anything").await.unwrap());
    let name = unique_name("proc");
    let _cleanup = Cleanup(&rt, name.clone());
    let spec = sleeper(&name, "host");

    assert_eq!(rt.ensure_running(&spec).await.unwrap(), Reconciled::Created);
    let first = rt.inspect(&name).await.unwrap().unwrap();
    assert_eq!(first.state, State::Running);
    let pid = first.pid.unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(
        rt.ensure_running(&spec).await.unwrap(),
        Reconciled::AlreadyRunning
    );

    // A restarted agent (a new runtime on the same state) finds the same process.
    let rt2 = ProcessRuntime::new(dir.path().to_path_buf());
    assert_eq!(
        rt2.ensure_running(&spec).await.unwrap(),
        Reconciled::AlreadyRunning
    );
    assert_eq!(rt2.inspect(&name).await.unwrap().unwrap().pid, Some(pid));

    // Killed behind its back: started again, same id, new pid.
    rt.kill(&name, "SIGKILL").await.unwrap();
    let state = wait_not_running(&rt, &name).await;
    assert_eq!(
        state,
        State::Stopped {
            exit_code: Some(137)
        }
    );
    assert_eq!(rt.ensure_running(&spec).await.unwrap(), Reconciled::Started);
    let again = rt.inspect(&name).await.unwrap().unwrap();
    assert_eq!(again.id, first.id);
    assert_ne!(again.pid, Some(pid));

    // Changed spec: recreated (new id, new process).
    let mut changed = spec.clone();
    changed.labels.insert("version".into(), "2".into());
    assert_eq!(
        rt.ensure_running(&changed).await.unwrap(),
        Reconciled::Recreated
    );
    let recreated = rt.inspect(&name).await.unwrap().unwrap();
    assert_ne!(recreated.id, first.id);
    assert_ne!(recreated.pid, again.pid);
    assert_eq!(recreated.state, State::Running);

    // Stop (SIGTERM ends sleep), then remove.
    assert!(rt.stop(&name, Duration::from_secs(5)).await.unwrap());
    assert!(matches!(
        rt.inspect(&name).await.unwrap().unwrap().state,
        State::Stopped { .. }
    ));
    assert!(rt.remove(&name).await.unwrap());
    assert!(rt.inspect(&name).await.unwrap().is_none());
    assert!(!rt.remove(&name).await.unwrap());
    assert!(!rt.stop(&name, Duration::from_secs(1)).await.unwrap());
}

#[tokio::test]
async fn process_runs_to_completion_and_execs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = ProcessRuntime::new(dir.path().to_path_buf());
    let mut spec = ContainerSpec::new(unique_name("once"), "host");
    spec.command = argv(&[
        "sh",
        "-c",
        "echo out; echo err >&2; echo $GREETING; id -u; exit 3",
    ]);
    spec.env = vec![("GREETING".into(), "hello".into())];
    spec.user = Some("999:999".into());
    let out = rt.run_to_completion(&spec, T).await.unwrap();
    assert_eq!(out.exit_code, 3);
    assert_eq!(out.stdout, "out\nhello\n999\n");
    assert_eq!(out.stderr, "err\n");

    spec.command = argv(&["sleep", "60"]);
    let t0 = Instant::now();
    assert!(matches!(
        rt.run_to_completion(&spec, Duration::from_millis(300))
            .await,
        Err(RuntimeError::Timeout(_))
    ));
    assert!(t0.elapsed() < Duration::from_secs(10));

    // A missing program is this runtime's "missing image".
    spec.command = argv(&["dbvm-no-such-program", "x"]);
    match rt.run_to_completion(&spec, T).await {
        Err(RuntimeError::ImageMissing(m)) => assert!(m.contains("dbvm-no-such-program"), "{m}"),
        other => panic!("expected ImageMissing, got {other:?}"),
    }
    let mut missing = sleeper(&unique_name("missing"), "host");
    missing.command = argv(&["/nonexistent/dbvm-server"]);
    assert!(matches!(
        rt.ensure_running(&missing).await,
        Err(RuntimeError::ImageMissing(_))
    ));

    let name = unique_name("exec");
    let _cleanup = Cleanup(&rt, name.clone());
    rt.ensure_running(&sleeper(&name, "host")).await.unwrap();
    let out = rt
        .exec(
            &name,
            &argv(&["sh", "-c", "id -u; exit 4"]),
            Some("999:999"),
            T,
        )
        .await
        .unwrap();
    assert_eq!((out.exit_code, out.stdout.as_str()), (4, "999\n"));
    assert!(matches!(
        rt.exec("dbvm-t-nothing", &argv(&["true"]), None, T).await,
        Err(RuntimeError::NotFound(_))
    ));
}
