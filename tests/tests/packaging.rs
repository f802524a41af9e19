//! The RPMs for Photon OS, as an image builder uses them: built by `scripts/build-rpms.sh`
//! (here from the debug binaries; the script builds the static ones by default), signed
//! with a throwaway GPG key, verified, then installed, upgraded and erased with the real
//! `rpm` in a throwaway root (`rpm --root`). The scriptlets run there for real: the root
//! gets a static shell (busybox) and the host's `systemctl` and `systemd-sysusers` with
//! their libraries, as a Photon image build's chroot has them. The units are verified
//! offline with `systemd-analyze verify --root`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} cannot run: {e}"));
    eprintln!(
        "$ {cmd:?} -> {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A GPG keyring of its own with one signing key for `email`.
fn keyring(dir: &Path, email: &str) -> PathBuf {
    let home = dir.join(format!("gnupg-{email}"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    ok(Command::new("gpg")
        .env("GNUPGHOME", &home)
        .args(["--batch", "--passphrase", "", "--quick-gen-key"])
        .arg(format!("dbvm test <{email}>"))
        .args(["rsa2048", "sign", "never"]));
    home
}

/// Builds both RPMs at `version` into `out`, signed with `email`'s key when given.
fn build(out: &Path, version: &str, key: Option<(&Path, &str)>) -> (PathBuf, PathBuf) {
    let bins = dbvm_e2e::proc::bin_dir();
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/build-rpms.sh"))
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--out")
        .arg(out)
        .args(["--version", version]);
    if let Some((home, email)) = key {
        cmd.env("GNUPGHOME", home).args(["--sign-key", email]);
    }
    ok(&mut cmd);
    (
        out.join(format!("dbvm-agent-{version}-1.x86_64.rpm")),
        out.join(format!("dbvm-broker-{version}-1.x86_64.rpm")),
    )
}

/// Copies `bin` and the libraries `ldd` names into `root`.
fn copy_with_libraries(bin: &str, root: &Path) {
    let ldd = ok(Command::new("ldd").arg(bin));
    let libs = ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_string);
    for f in std::iter::once(bin.to_string()).chain(libs) {
        let to = root.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&f, &to).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
}

/// A throwaway root with what the scriptlets need and an empty RPM database.
fn throwaway_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed (bash scripts/setup.sh)");
    assert!(
        ok(Command::new("file").arg(busybox)).contains("statically linked"),
        "busybox must be the static one (Debian package busybox-static)"
    );
    std::fs::copy(busybox, root.join("bin/sh")).unwrap();
    for tool in ["/usr/bin/systemctl", "/usr/bin/systemd-sysusers"] {
        copy_with_libraries(tool, &root);
    }
    // The targets the units name, so that systemd-analyze can load them offline.
    let units = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for e in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".target") || name.ends_with(".slice") {
            let _ = std::fs::copy(e.path(), units.join(&*name));
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    ok(rpm(&root).arg("--initdb"));
    root
}

/// `rpm --root ROOT --dbpath /var/lib/rpm` that refuses any package without a valid
/// signature (as tdnf's `gpgcheck=1` does).
fn rpm(root: &Path) -> Command {
    let mut c = Command::new("rpm");
    c.arg("--root")
        .arg(root)
        .args(["--dbpath", "/var/lib/rpm"])
        .args(["--define", "_pkgverify_level signature"]);
    c
}

fn mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// The id `name` has in the root's `etc/passwd` or `etc/group`.
fn id_in(root: &Path, file: &str, name: &str) -> u32 {
    std::fs::read_to_string(root.join("etc").join(file))
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{name} not in {file}"))
}

#[test]
fn signed_rpms_install_upgrade_and_erase_in_a_throwaway_root_and_unsigned_ones_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let signer = keyring(dir, "builder@dbvm.test");
    let stranger = keyring(dir, "stranger@dbvm.test");
    let (agent1, broker1) = build(
        &dir.join("v1"),
        "0.1.0",
        Some((&signer, "builder@dbvm.test")),
    );
    let (agent2, broker2) = build(
        &dir.join("v2"),
        "0.1.1",
        Some((&signer, "builder@dbvm.test")),
    );
    let (unsigned, _) = build(&dir.join("unsigned"), "0.1.0", None);
    let (foreign, _) = build(
        &dir.join("foreign"),
        "0.1.0",
        Some((&stranger, "stranger@dbvm.test")),
    );
    let root = throwaway_root(dir);
    let public = ok(Command::new("gpg").env("GNUPGHOME", &signer).args([
        "--armor",
        "--export",
        "builder@dbvm.test",
    ]));
    std::fs::write(dir.join("builder.asc"), public).unwrap();
    ok(rpm(&root).arg("--import").arg(dir.join("builder.asc")));

    // Signatures: the builder's verify; none and a stranger's are refused, nothing installed.
    let checked = ok(rpm(&root).arg("-K").arg(&agent1).arg(&broker1));
    assert_eq!(
        checked.matches("digests signatures OK").count(),
        2,
        "{checked}"
    );
    for (bad, why) in [(&unsigned, "no signature"), (&foreign, "NOKEY")] {
        let out = run(rpm(&root).args(["--nodeps", "-i"]).arg(bad));
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} installed", bad.display());
        assert!(
            text.contains(why) || text.contains("does not verify"),
            "{text}"
        );
    }
    assert!(!root.join("usr/bin/dbvm-agent").exists());

    // Install: files, modes, owners, the broker's user, the units enabled.
    ok(rpm(&root)
        .args(["--nodeps", "-i"])
        .arg(&agent1)
        .arg(&broker1));
    let broker_uid = id_in(&root, "passwd", "dbvm-broker");
    let broker_gid = id_in(&root, "group", "dbvm-broker");
    assert!(broker_uid > 0 && broker_gid > 0);
    for (path, want) in [
        ("usr/bin/dbvm-agent", (0o755, 0, 0)),
        ("usr/bin/dbvm-broker", (0o755, 0, 0)),
        ("usr/lib/systemd/system/dbvm-agent.service", (0o644, 0, 0)),
        ("usr/lib/systemd/system/dbvm-broker.service", (0o644, 0, 0)),
        ("etc/dbvm/agent.toml", (0o600, 0, 0)),
        ("etc/dbvm/firewall-base.nft", (0o644, 0, 0)),
        ("etc/dbvm/broker.toml", (0o640, 0, broker_gid)),
        ("var/lib/dbvm-agent", (0o700, 0, 0)),
        ("var/lib/dbvm-broker", (0o700, broker_uid, broker_gid)),
    ] {
        assert_eq!(mode(&root.join(path)), want, "{path}");
    }
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    for unit in ["dbvm-agent.service", "dbvm-broker.service"] {
        assert!(
            wants.join(unit).symlink_metadata().is_ok(),
            "{unit} enabled"
        );
    }
    // The installed units verify offline (and the check is real: a broken one fails).
    ok(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .args([
            "/usr/lib/systemd/system/dbvm-agent.service",
            "/usr/lib/systemd/system/dbvm-broker.service",
        ]));
    let broken = root.join("usr/lib/systemd/system/dbvm-broken.service");
    std::fs::write(
        &broken,
        std::fs::read_to_string(root.join("usr/lib/systemd/system/dbvm-agent.service"))
            .unwrap()
            .replace(
                "ExecStart=/usr/bin/dbvm-agent",
                "ExecStart=/usr/bin/dbvm-missing",
            ),
    )
    .unwrap();
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg("/usr/lib/systemd/system/dbvm-broken.service"));
    assert!(!out.status.success(), "a broken unit fails the check");
    std::fs::remove_file(&broken).unwrap();

    // The VM's own state: first boot's config and the agent's identity.
    let config = root.join("etc/dbvm/agent.toml");
    std::fs::write(&config, "agent_id = \"db-017\"\n# first boot wrote this\n").unwrap();
    std::fs::write(root.join("var/lib/dbvm-agent/identity"), "key").unwrap();
    std::fs::write(root.join("var/lib/dbvm-broker/store.db"), "store").unwrap();

    // Upgrade: the config and the state stay, the units stay enabled.
    ok(rpm(&root)
        .args(["--nodeps", "-U"])
        .arg(&agent2)
        .arg(&broker2));
    let versions = ok(rpm(&root).args(["-q", "dbvm-agent", "dbvm-broker"]));
    assert!(
        versions.contains("dbvm-agent-0.1.1-1") && versions.contains("dbvm-broker-0.1.1-1"),
        "{versions}"
    );
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .contains("first boot wrote this"));
    assert!(root.join("var/lib/dbvm-agent/identity").exists());
    assert!(wants.join("dbvm-agent.service").symlink_metadata().is_ok());

    // Erase: disabled and gone, but the state and the changed config are kept.
    ok(rpm(&root).args(["-e", "dbvm-agent", "dbvm-broker"]));
    assert!(!root.join("usr/bin/dbvm-agent").exists());
    assert!(!root
        .join("usr/lib/systemd/system/dbvm-agent.service")
        .exists());
    for unit in ["dbvm-agent.service", "dbvm-broker.service"] {
        assert!(
            wants.join(unit).symlink_metadata().is_err(),
            "{unit} disabled"
        );
    }
    assert!(
        root.join("var/lib/dbvm-agent/identity").exists(),
        "state kept"
    );
    assert!(
        root.join("var/lib/dbvm-broker/store.db").exists(),
        "store kept"
    );
    let saved = root.join("etc/dbvm/agent.toml.rpmsave");
    assert!(
        saved.exists() || config.exists(),
        "the changed config is kept"
    );
}
