//! Helpers for the database tests: container chores on the private engine (through the
//! `docker` CLI, which negotiates the API version itself) and a unix-socket relay that
//! plays an engine going away and coming back.

use crate::docker::Engine;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `id -u NAME` and `id -g NAME`: a database server run as a host process runs as the
/// engine's system user, as it does in its image.
pub fn system_user(name: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, name])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "there is no user {name} (it comes with the engine's Debian package): install it: bash scripts/setup.sh"
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// `dbaas` over TCP to `127.0.0.1:port`, as a control plane's user connects with the
/// password `db.create` or `db.restore` sealed to it.
pub async fn pg_dbaas(
    port: u16,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("dbaas")
        .password(password)
        .dbname(db)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

impl Engine {
    fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", self.docker_host())
            .output()
            .expect("docker CLI (install it: bash scripts/setup.sh)")
    }

    /// Removes a container if it exists (tests clean up after themselves).
    pub fn remove_container(&self, name: &str) {
        let _ = self.docker(&["rm", "-f", name]);
    }

    /// SIGKILLs a container behind the agent's back.
    pub fn kill_container(&self, name: &str) {
        let out = self.docker(&["kill", "--signal", "KILL", name]);
        assert!(
            out.status.success(),
            "docker kill {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Tags `image` as `tag` (an "upgrade" to the same bits under a new name).
    pub fn tag_image(&self, image: &str, tag: &str) -> String {
        let out = self.docker(&["tag", image, tag]);
        assert!(
            out.status.success(),
            "docker tag: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tag.to_string()
    }

    /// An image that cannot run a database server (busybox only).
    pub fn broken_image(&self) -> String {
        self.busybox_image.clone()
    }
}

/// Accepts connections on `path` and forwards each to `target`; dropping it removes the
/// socket (the "engine" disappears again).
pub struct UnixRelay {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl UnixRelay {
    pub fn start(path: &Path, target: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).expect("bind relay socket");
        let target = target.to_path_buf();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::UnixStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            path: path.to_path_buf(),
            task,
        }
    }
}

impl Drop for UnixRelay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Every process of a container stopped with SIGSTOP behind the engine's back: the engine
/// still reports the container `running` (unlike `docker pause`, which the agent sees and
/// undoes), yet nothing in it answers — a real hang. Dropping it sends SIGCONT.
pub struct Stopped {
    pids: Vec<String>,
}

impl Engine {
    /// The host pids of the processes in a running container (`docker top`).
    pub fn container_pids(&self, name: &str) -> Vec<String> {
        let out = self.docker(&["top", name, "-eo", "pid"]);
        assert!(
            out.status.success(),
            "docker top {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        assert!(!pids.is_empty(), "docker top {name} listed no processes");
        pids
    }

    /// Stops every process of container `name` (SIGSTOP) until the guard drops.
    pub fn stop_processes(&self, name: &str) -> Stopped {
        let pids = self.container_pids(name);
        signal("STOP", &pids);
        Stopped { pids }
    }
}

fn signal(sig: &str, pids: &[String]) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids)
        .status()
        .expect("kill");
    assert!(st.success(), "kill -{sig} {pids:?} failed");
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").args(&self.pids).status();
    }
}
