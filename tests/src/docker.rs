//! A private Docker engine for tests: one per workspace, under `target/dbvm-test-docker`,
//! started by `scripts/dockerd.sh` (host-neutral: no bridge, no iptables, its own containerd)
//! the first time a test asks for it, and left running between test binaries. `scripts/
//! test.sh` stops it at the end: `bash scripts/dockerd.sh stop target/dbvm-test-docker`.
//!
//! The database images (`packaging/images/build-image.sh`) and a tiny busybox image for
//! throwaway containers are built into it when missing, and the database images again
//! when the build script changed since (their `dbvm.recipe` label). Test binaries run in parallel, so
//! all of this happens under a file lock (`flock`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The running private engine and the images loaded in it.
#[derive(Clone, Debug)]
pub struct Engine {
    /// The engine's API socket (`…/target/dbvm-test-docker/docker.sock`).
    pub socket: PathBuf,
    /// The directory holding everything the engine owns.
    pub dir: PathBuf,
    /// `dbvm/postgres:15`, built from this machine's Debian files.
    pub postgres_image: String,
    /// `dbvm/mariadb:10.11`, built from this machine's Debian files.
    pub mariadb_image: String,
    /// `dbvm-test/busybox:1`: static busybox only (`/bin/sh`, `sleep`, …), runs as root.
    pub busybox_image: String,
}

impl Engine {
    /// The `[database]` section of an agent config for this engine (its socket, its
    /// locally built images): data under `data_root`, the database in `container`,
    /// reconciled every `reconcile_s`; `extra` lines go into the `[database]` table.
    pub fn database_section(
        &self,
        data_root: &Path,
        container: &str,
        reconcile_s: u64,
        extra: &str,
    ) -> String {
        format!(
            r#"[database]
runtime = "docker"
docker_socket = {sock}
data_root = {root}
container_name = "{container}"
start_timeout_s = 60
engine_wait_s = 5
reconcile_interval_s = {reconcile_s}
{extra}
[database.images]
postgres = "{pg}"
mariadb = "{maria}"
"#,
            sock = crate::fleet::toml_path(&self.socket),
            root = crate::fleet::toml_path(data_root),
            pg = self.postgres_image,
            maria = self.mariadb_image,
        )
    }

    /// `unix://<socket>`, for `DOCKER_HOST`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

pub const POSTGRES_IMAGE: &str = "dbvm/postgres:15";
pub const MARIADB_IMAGE: &str = "dbvm/mariadb:10.11";
pub const BUSYBOX_IMAGE: &str = "dbvm-test/busybox:1";

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Starts (or finds) the private engine and makes sure the images are loaded. Once per test
/// process; safe across processes. Panics with the fix when something is missing.
pub fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(start).clone()
}

fn start() -> Engine {
    for (tool, package) in [
        ("dockerd", "docker.io"),
        ("containerd", "docker.io (containerd)"),
        ("docker", "docker.io"),
        ("flock", "util-linux"),
        ("busybox", "busybox-static"),
    ] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is not installed ({package}): install it: bash scripts/setup.sh"
        );
    }
    let root = workspace_root();
    let dir = root.join("target").join("dbvm-test-docker");
    std::fs::create_dir_all(&dir).expect("create target/dbvm-test-docker");
    let lock = root.join("target").join("dbvm-test-docker.lock");
    // One script under the lock: start the engine, then build what is missing or stale. The
    // image builds check their content label themselves, but comparing the `dbvm.recipe`
    // label (the build script's sha256) first keeps the common case (everything current)
    // at a few milliseconds, and still rebuilds an image made by an older script.
    let script = format!(
        r#"set -euo pipefail
sock=$(bash scripts/dockerd.sh start {dir})
export DOCKER_HOST=unix://$sock
recipe=$(sha256sum packaging/images/build-image.sh | cut -c1-64)
current() {{
  [ "$(docker image inspect --format '{{{{index .Config.Labels "dbvm.recipe"}}}}' "$1" 2>/dev/null)" = "$recipe" ]
}}
current {pg} || bash packaging/images/build-image.sh postgres {pg} >&2
current {my} || bash packaging/images/build-image.sh mariadb {my} >&2
if ! docker image inspect {bb} >/dev/null 2>&1; then
  t=$(mktemp -d)
  mkdir -p "$t/bin" "$t/tmp"
  cp "$(command -v busybox)" "$t/bin/busybox"
  for a in sh sleep echo cat true false id kill ls; do ln -s busybox "$t/bin/$a"; done
  tar -C "$t" --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -cf - . |
    docker import -c 'CMD ["/bin/sh"]' -c 'ENV PATH=/bin' - {bb} >/dev/null
  rm -rf "$t"
fi
echo "$sock"
"#,
        dir = dir.display(),
        pg = POSTGRES_IMAGE,
        my = MARIADB_IMAGE,
        bb = BUSYBOX_IMAGE,
    );
    // `-o`: the daemons this starts must not inherit the lock (they would hold it forever).
    // `-w`: a holder that never lets go fails the test with a message instead of hanging it.
    let out = Command::new("flock")
        .arg("-o")
        .args(["-w", "600"])
        .arg(&lock)
        .arg("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&root)
        .env_remove("DOCKER_HOST")
        .output()
        .expect("run flock");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "starting the private Docker engine in {} failed ({}):\n{stderr}\nlogs: {}/dockerd.log, {}/containerd.log",
        dir.display(),
        out.status,
        dir.display(),
        dir.display(),
    );
    if !stderr.trim().is_empty() {
        eprintln!("{stderr}");
    }
    let socket = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("dockerd.sh prints the socket path")
            .trim(),
    );
    assert!(socket.exists(), "{} does not exist", socket.display());
    Engine {
        socket,
        dir,
        postgres_image: POSTGRES_IMAGE.to_string(),
        mariadb_image: MARIADB_IMAGE.to_string(),
        busybox_image: BUSYBOX_IMAGE.to_string(),
    }
}

/// A container name unique to this test run: `dbvm-t-<what>-<8 hex>`.
pub fn unique_name(what: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("dbvm-t-{what}-{}", &id[..8])
}

/// A free TCP port on 127.0.0.1 (bound then released; fine for host-network containers).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}
