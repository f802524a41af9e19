//! An S3 server for backup tests: `s3s-fs` (verifies SigV4 signatures, keeps each object as
//! a file under its root, a bucket is a subdirectory) behind `stunnel` (TLS with a
//! certificate from a throwaway test CA). Both run as real processes with their logs in the
//! server's directory, and are killed when the handle drops; the logs are printed when the
//! test failed.
//!
//! Clients must name the server `localhost`: pgBackRest 2.45 ignores IP SANs (the
//! certificate has both `DNS:localhost` and `IP:127.0.0.1`). Keep bucket names and key
//! prefixes short: s3s-fs 0.14.1 names a multipart upload's metadata file after base64 of
//! bucket + key + upload id, and fails (HTTP 500) when that exceeds 255 bytes.
//!
//! Quirks of s3s-fs 0.14.1 worth knowing: `HEAD` on a key that is also a prefix of other
//! keys (a "directory" on its disk) answers 500, so `pgbackrest repo-ls` of a non-empty
//! prefix fails while listing its parent works; small requests take ~30 ms each, so a
//! restore of ~1,000 files takes ~20 s.

use dbvm_protocol::pki::FleetCa;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long `start`/`start_s3` wait for the processes to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running S3 server: plain s3s-fs on `http_port`, TLS (stunnel) on `port`.
pub struct S3Server {
    /// The host name clients must use: `localhost` (the certificate's DNS name).
    pub endpoint_host: String,
    /// The TLS port (stunnel).
    pub port: u16,
    /// The plain-HTTP port of s3s-fs itself, for tests that plain HTTP is refused.
    pub http_port: u16,
    /// Any region signs correctly (s3s-fs takes the region from the signature's scope);
    /// this is the one to configure.
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// The CA that signed the server certificate (PEM file).
    pub ca_pem_path: PathBuf,
    /// The data directory of s3s-fs: `root/<bucket>/<key>`.
    pub root: PathBuf,
    /// Where everything of this server lives: certificates, configs, logs.
    pub dir: PathBuf,
    s3s_fs: PathBuf,
    s3s_log: PathBuf,
    stunnel_log: PathBuf,
    other_ca_pem_path: PathBuf,
    /// s3s-fs, behind a lock so `stop_s3`/`start_s3` work through `&self`.
    s3: Mutex<Option<Child>>,
    stunnel: Mutex<Option<Child>>,
}

impl S3Server {
    /// Starts s3s-fs and stunnel with everything under `dir` (created if missing): a test
    /// CA and server certificate in `dir/tls`, the data in `dir/data`, logs
    /// `dir/s3s-fs.log` and `dir/stunnel.log`. Returns once a TLS request gets an answer
    /// from s3s-fs. Panics with the fix when s3s-fs or stunnel is not installed.
    pub fn start(dir: &Path) -> Self {
        let s3s_fs = find_program(&["s3s-fs"]).unwrap_or_else(|| {
            panic!(
                "s3s-fs is not installed (neither on PATH nor in ~/.cargo/bin): install it: \
                 bash scripts/setup.sh (cargo install s3s-fs --version 0.14.1 --features binary)"
            )
        });
        let stunnel = find_program(&["stunnel4", "stunnel"]).unwrap_or_else(|| {
            panic!("stunnel is not installed (Debian package stunnel4): install it: bash scripts/setup.sh")
        });
        std::fs::create_dir_all(dir).expect("create the S3 server's directory");
        let dir = dir.canonicalize().expect("canonical S3 server directory");
        let tls = dir.join("tls");
        let root = dir.join("data");
        std::fs::create_dir_all(&tls).expect("create tls/");
        std::fs::create_dir_all(&root).expect("create data/");

        let day = Duration::from_secs(24 * 3600);
        let ca = FleetCa::generate("dbvm test S3 CA", day).expect("test S3 CA");
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()], day)
            .expect("S3 server certificate");
        let other = FleetCa::generate("dbvm test other CA", day).expect("other CA");
        let ca_pem_path = tls.join("ca.crt");
        let other_ca_pem_path = tls.join("other-ca.crt");
        let cert_path = tls.join("server.crt");
        let key_path = tls.join("server.key");
        write_file(&ca_pem_path, ca.cert_pem(), 0o644);
        write_file(&other_ca_pem_path, other.cert_pem(), 0o644);
        write_file(&cert_path, &server.cert_pem, 0o644);
        write_file(&key_path, &server.key_pem, 0o600);

        let http_port = crate::docker::free_port();
        let port = crate::docker::free_port();
        let stunnel_conf = dir.join("stunnel.conf");
        let stunnel_log = dir.join("stunnel.log");
        // foreground: stunnel stays our child (killed by pid) and logs to stderr, which
        // goes to stunnel.log.
        write_file(
            &stunnel_conf,
            &format!(
                "foreground = yes\npid = {pid}\n[s3-tls]\naccept = 127.0.0.1:{port}\n\
                 connect = 127.0.0.1:{http_port}\ncert = {cert}\nkey = {key}\n",
                pid = dir.join("stunnel.pid").display(),
                cert = cert_path.display(),
                key = key_path.display(),
            ),
            0o600,
        );

        let server = Self {
            endpoint_host: "localhost".into(),
            port,
            http_port,
            region: "us-east-1".into(),
            access_key: format!("AK{}", &random_hex()[..18]).to_uppercase(),
            secret_key: format!("{}{}", random_hex(), &random_hex()[..8]),
            ca_pem_path,
            root,
            s3s_log: dir.join("s3s-fs.log"),
            stunnel_log: stunnel_log.clone(),
            dir,
            s3s_fs,
            other_ca_pem_path,
            s3: Mutex::new(None),
            stunnel: Mutex::new(None),
        };
        server.start_s3();
        let child = Command::new(&stunnel)
            .arg(&stunnel_conf)
            .stdin(Stdio::null())
            .stdout(log_file(&stunnel_log))
            .stderr(log_file(&stunnel_log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", stunnel.display()));
        *server.stunnel.lock().expect("stunnel lock") = Some(child);
        server.wait_tls();
        server
    }

    /// Creates a bucket (a subdirectory of the root). S3 names: 3 to 63 characters of
    /// lowercase letters, digits and `-`; keep them short (see the module docs).
    pub fn create_bucket(&self, name: &str) {
        assert!(
            (3..=63).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "bucket name {name:?}: S3 wants 3 to 63 characters of a-z, 0-9 and - \
             (s3s-fs answers InvalidBucketName otherwise)"
        );
        std::fs::create_dir_all(self.root.join(name)).expect("create the bucket directory");
    }

    /// `https://localhost:PORT`.
    pub fn endpoint_url(&self) -> String {
        format!("https://{}:{}", self.endpoint_host, self.port)
    }

    /// A CA certificate (PEM file) that did not sign the server certificate.
    pub fn other_ca_pem(&self) -> PathBuf {
        self.other_ca_pem_path.clone()
    }

    /// The `[global]` lines that point pgBackRest 2.45 at `bucket` under `repo_path` (say
    /// `/repo`): endpoint `localhost` (it ignores IP SANs), the port in
    /// `repo1-storage-port` (`repo1-port` is something else), path-style URIs, this
    /// server's CA. Holds the secret key: write it to a 0600 file.
    pub fn pgbackrest_repo_options(&self, bucket: &str, repo_path: &str) -> String {
        format!(
            "repo1-type=s3\nrepo1-s3-endpoint={host}\nrepo1-storage-port={port}\n\
             repo1-s3-uri-style=path\nrepo1-s3-bucket={bucket}\nrepo1-s3-region={region}\n\
             repo1-s3-key={key}\nrepo1-s3-key-secret={secret}\nrepo1-storage-ca-file={ca}\n\
             repo1-path={repo_path}\n",
            host = self.endpoint_host,
            port = self.port,
            region = self.region,
            key = self.access_key,
            secret = self.secret_key,
            ca = self.ca_pem_path.display(),
        )
    }

    /// Stops s3s-fs only (SIGKILL): stunnel keeps accepting TLS, and then closes each
    /// connection it cannot forward, as a load balancer with a dead backend does.
    pub fn stop_s3(&self) {
        if let Some(mut child) = self.s3.lock().expect("s3s-fs lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts s3s-fs (again) on the same port with the same data and keys; returns once
    /// it accepts connections. Does nothing when it runs.
    pub fn start_s3(&self) {
        let mut slot = self.s3.lock().expect("s3s-fs lock");
        if let Some(child) = slot.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return;
            }
        }
        let mut child = Command::new(&self.s3s_fs)
            .args(["--host", "127.0.0.1", "--port", &self.http_port.to_string()])
            .args([
                "--access-key",
                &self.access_key,
                "--secret-key",
                &self.secret_key,
            ])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(log_file(&self.s3s_log))
            .stderr(log_file(&self.s3s_log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.s3s_fs.display()));
        let addr = SocketAddr::from(([127, 0, 0, 1], self.http_port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "s3s-fs exited ({status}) while starting on port {}; log {}:\n{}",
                    self.http_port,
                    self.s3s_log.display(),
                    tail(&self.s3s_log)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "s3s-fs did not accept connections on port {} within {READY_TIMEOUT:?}; log {}:\n{}",
                    self.http_port,
                    self.s3s_log.display(),
                    tail(&self.s3s_log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *slot = Some(child);
    }

    /// Waits until an unsigned request through TLS gets s3s-fs's answer (403).
    fn wait_tls(&self) {
        let ca = std::fs::read_to_string(&self.ca_pem_path).expect("read the test CA");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = match https_get_status(self.port, &ca) {
                Ok(403) => return,
                Ok(status) => panic!(
                    "an unsigned request to {} answered {status}, not 403: is s3s-fs checking \
                     signatures? log {}:\n{}",
                    self.endpoint_url(),
                    self.s3s_log.display(),
                    tail(&self.s3s_log)
                ),
                Err(e) => e,
            };
            if let Some(child) = self.stunnel.lock().expect("stunnel lock").as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "stunnel exited ({status}) while starting; log {}:\n{}",
                        self.stunnel_log.display(),
                        tail(&self.stunnel_log)
                    );
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not answer within {READY_TIMEOUT:?} (last error: {last}); logs {} and {}:\n{}\n{}",
                    self.endpoint_url(),
                    self.stunnel_log.display(),
                    self.s3s_log.display(),
                    tail(&self.stunnel_log),
                    tail(&self.s3s_log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // The children are never waited for before this, so their pids are still ours.
        for slot in [&self.stunnel, &self.s3] {
            let child = match slot.lock() {
                Ok(mut guard) => guard.take(),
                Err(poisoned) => poisoned.into_inner().take(),
            };
            if let Some(mut child) = child {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for log in [&self.stunnel_log, &self.s3s_log] {
                eprintln!("===== end of {} =====\n{}", log.display(), tail(log));
            }
        }
    }
}

/// One `GET /` over TLS trusting `ca_pem`, server name `localhost`: the HTTP status.
fn https_get_status(port: u16, ca_pem: &str) -> std::io::Result<u16> {
    let config = dbvm_protocol::tls::client_config(ca_pem, None)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let name =
        rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    tls.read_exact(&mut head)?;
    let text = String::from_utf8_lossy(&head);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))
}

/// The first of `names` on PATH, else in `~/.cargo/bin` (where `cargo install` puts it).
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    names.iter().find_map(|name| {
        dirs.iter().map(|d| d.join(name)).find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
    })
}

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn write_file(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The last 40 lines of a log, for failure messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
