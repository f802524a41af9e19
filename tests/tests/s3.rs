//! The test S3 server (`dbvm_e2e::s3`) is real where backup tests rely on it: s3s-fs
//! refuses unsigned and badly signed requests, stunnel's certificate is checked, and
//! "S3 down" is a real outage. Proven with real clients from Debian: pgBackRest 2.45 (the
//! tool the agent runs) and curl's own SigV4 signing (pgBackRest 2.45 cannot upload
//! outside a backup).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::s3::S3Server;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A Debian tool the test needs, or a failure that says how to install it.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed (Debian package {package}): install it: bash scripts/setup.sh")
        })
}

/// Runs `pgbackrest --config=<dir>/<name>.conf ARGS` with `repo` as the repository lines.
/// Logs and locks stay in `dir`; failures retry for `io_timeout` seconds at most.
fn pgbackrest(dir: &Path, name: &str, repo: &str, io_timeout: &str, args: &[&str]) -> Output {
    let work = dir.join(name);
    std::fs::create_dir_all(&work).expect("pgbackrest work dir");
    let config = work.join("pgbackrest.conf");
    let text = format!(
        "[global]\n{repo}log-path={w}/log\nlock-path={w}/lock\nspool-path={w}/spool\n\
         log-level-file=off\nlog-level-console=off\nlog-level-stderr=warn\n",
        w = work.display()
    );
    std::fs::write(&config, text).expect("write pgbackrest.conf");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))
            .expect("chmod pgbackrest.conf");
    }
    Command::new(tool("pgbackrest", "pgbackrest"))
        .arg(format!("--config={}", config.display()))
        .arg(format!("--io-timeout={io_timeout}"))
        .args(args)
        .output()
        .expect("run pgbackrest")
}

/// curl with SigV4 signing (`--aws-sigv4`) when `credentials` are given: the HTTP status.
fn curl(s3: &S3Server, credentials: Option<(&str, &str)>, args: &[&str]) -> (u16, String) {
    let mut cmd = Command::new(tool("curl", "curl"));
    cmd.args([
        "-sS",
        "-w",
        "\n%{http_code}",
        "--max-time",
        "10",
        "--cacert",
    ])
    .arg(&s3.ca_pem_path);
    if let Some((key, secret)) = credentials {
        // UNSIGNED-PAYLOAD: S3's way to sign the request but not hash the body.
        cmd.arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:s3", s3.region))
            .arg("--user")
            .arg(format!("{key}:{secret}"))
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]);
    }
    let out = cmd.args(args).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {args:?} gave no HTTP status: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (status, body.to_string())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn signed_requests_are_served_and_unsigned_or_badly_signed_ones_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&tmp.path().join("s3"));
    s3.create_bucket("bkt");
    let body = tmp.path().join("hello.txt");
    std::fs::write(&body, "hello from curl\n").expect("write body");
    let url = |key: &str| format!("{}/bkt/{key}", s3.endpoint_url());
    let good = Some((s3.access_key.as_str(), s3.secret_key.as_str()));
    let body_arg = body.to_str().expect("utf-8 path");

    let (status, answer) = curl(&s3, good, &["-T", body_arg, &url("hello.txt")]);
    assert_eq!(status, 200, "signed PUT: {answer}");
    assert_eq!(
        std::fs::read_to_string(s3.root.join("bkt/hello.txt")).expect("object stored as a file"),
        "hello from curl\n"
    );

    let (status, answer) = curl(&s3, None, &["-T", body_arg, &url("unsigned.txt")]);
    assert_eq!(status, 403, "unsigned PUT must be refused: {answer}");
    let (status, answer) = curl(&s3, None, &[&url("hello.txt")]);
    assert_eq!(status, 403, "unsigned GET must be refused: {answer}");
    let bad = Some((s3.access_key.as_str(), "not-the-secret"));
    let (status, answer) = curl(&s3, bad, &["-T", body_arg, &url("forged.txt")]);
    assert_eq!(status, 403, "badly signed PUT must be refused: {answer}");
    assert!(answer.contains("SignatureDoesNotMatch"), "{answer}");
    assert!(!s3.root.join("bkt/unsigned.txt").exists());
    assert!(!s3.root.join("bkt/forged.txt").exists());

    // pgBackRest reads it back through TLS, with the server's CA.
    let repo = s3.pgbackrest_repo_options("bkt", "/");
    let out = pgbackrest(tmp.path(), "good", &repo, "5", &["repo-ls"]);
    assert!(out.status.success(), "repo-ls: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello.txt");
    let out = pgbackrest(tmp.path(), "good", &repo, "5", &["repo-get", "hello.txt"]);
    assert!(out.status.success(), "repo-get: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from curl\n");
}

#[test]
fn pgbackrest_with_a_wrong_secret_gets_403() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&tmp.path().join("s3"));
    s3.create_bucket("bkt");
    let repo = s3
        .pgbackrest_repo_options("bkt", "/repo")
        .replace(&s3.secret_key, "wrong-secret");
    let out = pgbackrest(tmp.path(), "bad", &repo, "1", &["repo-ls"]);
    let err = stderr(&out);
    // 039: pgBackRest's "HTTP request failed" (not retried: a 403 is final).
    assert_eq!(out.status.code(), Some(39), "{err}");
    assert!(err.contains("403 (Forbidden)"), "{err}");
}

#[test]
fn pgbackrest_refuses_a_certificate_from_another_ca_and_plain_http() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&tmp.path().join("s3"));
    s3.create_bucket("bkt");
    let ca = s3.ca_pem_path.display().to_string();
    let repo = s3.pgbackrest_repo_options("bkt", "/repo");

    let other = repo.replace(&ca, &s3.other_ca_pem().display().to_string());
    let out = pgbackrest(tmp.path(), "other-ca", &other, "1", &["repo-ls"]);
    let err = stderr(&out);
    // 095: pgBackRest's CryptoError.
    assert_eq!(out.status.code(), Some(95), "{err}");
    assert!(
        err.contains("unable to verify certificate presented by 'localhost:"),
        "{err}"
    );

    // The plain port is s3s-fs itself: a TLS client gets no TLS there.
    let plain = repo.replace(
        &format!("repo1-storage-port={}", s3.port),
        &format!("repo1-storage-port={}", s3.http_port),
    );
    let out = pgbackrest(tmp.path(), "plain", &plain, "1", &["repo-ls"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(101), "{err}");
    assert!(err.contains("wrong version number"), "{err}");

    // The same server and CA work, so the failures above are the CA and the port.
    let out = pgbackrest(tmp.path(), "good", &repo, "5", &["repo-ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn s3_down_fails_requests_and_comes_back_with_its_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&tmp.path().join("s3"));
    s3.create_bucket("bkt");
    std::fs::write(s3.root.join("bkt/kept.txt"), "kept\n").expect("write object");
    let repo = s3.pgbackrest_repo_options("bkt", "/");

    s3.stop_s3();
    let out = pgbackrest(tmp.path(), "down", &repo, "1", &["repo-get", "kept.txt"]);
    let err = stderr(&out);
    // stunnel still completes the handshake, then closes: 101 is pgBackRest's TLS error.
    assert_eq!(out.status.code(), Some(101), "S3 is down, yet: {err}");
    assert!(err.contains("TLS error"), "{err}");

    s3.start_s3();
    let out = pgbackrest(tmp.path(), "up", &repo, "5", &["repo-get", "kept.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
}
