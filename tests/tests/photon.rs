//! The Photon OS image recipe (`photon/`), checked with the real tools short of a vCenter:
//! the Packer template validates with Debian's `packer` and dummy variables; the kickstart
//! parses and carries what an install needs; the kickstart and every file it copies, and
//! a root the signed RPMs were installed into with the real `rpm`, hold no private key,
//! token, clear-text password or host identity; the OVF fragment declares every property
//! first boot reads, and `make-ova.sh` puts it into a vSphere-shaped descriptor; the image
//! manifest names the agent's version, its real sha256 and real dependencies.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use base64::Engine;
use dbvm_agent::firstboot;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn photon() -> PathBuf {
    repo().join("photon")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The properties first boot requires (guest-agent/src/firstboot.rs): the fragment must
/// declare each without a default, and the reader must accept what the fragment declares.
const REQUIRED_PROPERTIES: [&str; 5] = [
    firstboot::AGENT_ID,
    firstboot::BROKER_ADDRESS,
    firstboot::FLEET_CA,
    firstboot::ENROLLMENT_TOKEN,
    firstboot::TRUSTED_KEYS,
];
const NETWORK_FIELDS: [&str; 6] = ["interface", "mode", "ip", "netmask", "gateway", "dns"];

/// Everything in `text` that an image must not carry: private keys, tokens and passwords
/// with a value, machine ids, SSH host keys. Placeholders (`""`, `*`, `!`) are fine.
fn secrets_in(name: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{name}:{}", n + 1);
        let lower = line.to_ascii_lowercase();
        if lower.contains("private key-----") {
            found.push(format!("{at}: a PEM private key"));
        }
        if lower.contains("ssh_host_") && lower.contains("key") && !lower.contains("rm -f") {
            found.push(format!("{at}: an SSH host key"));
        }
        // `token = "…"`, `"token": "…"`, `password": "…"` with a real value.
        for word in ["token", "password"] {
            let Some(i) = lower.find(word) else { continue };
            let rest = line[i + word.len()..].trim_start_matches(['"', '\'', '_', ' ']);
            let Some(value) = rest.strip_prefix([':', '=']) else {
                continue;
            };
            let value = value.trim().trim_end_matches(',').trim_matches(['"', '\'']);
            let placeholder = value.is_empty()
                || ["*", "!", "{"].contains(&value)
                || value.starts_with('/') // a path to a file first boot writes
                || value.starts_with('$'); // an environment variable
            if !placeholder && !lower.contains("_file") {
                found.push(format!("{at}: {word} with a value ({value})"));
            }
        }
    }
    found
}

fn machine_id_like(text: &str) -> bool {
    let t = text.trim();
    t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit())
}

#[test]
fn the_secret_scanner_finds_what_it_looks_for() {
    // The scan below is only worth something if it fires on the real thing.
    for bad in [
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----",
        r#"enrollment_token = "t0k3n-123""#,
        r#""password": {"crypted": false, "text": "changeme"}, "password": "hunter2""#,
        "HostKey /etc/ssh/ssh_host_ed25519_key",
    ] {
        assert!(!secrets_in("sample", bad).is_empty(), "missed: {bad}");
    }
    for fine in [
        r#"enrollment_token_file = "/etc/dbvm/enrollment.token""#,
        r#""text": "*""#,
        "agent_id = \"\"",
        "-----BEGIN PGP PUBLIC KEY BLOCK-----",
    ] {
        assert!(secrets_in("sample", fine).is_empty(), "false alarm: {fine}");
    }
    assert!(machine_id_like("4c4c4544004d3610804bb4c04f4e3232\n"));
    assert!(!machine_id_like(""));
}

/// Dummy inputs for the template's cd_files and a variables file naming them.
fn dummy_build_inputs(dir: &Path, with_credentials: bool) -> PathBuf {
    std::fs::create_dir_all(dir.join("rpm")).unwrap();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("rpm/dbvm-agent-0.1.0-1.x86_64.rpm"), "rpm").unwrap();
    std::fs::write(dir.join("images/postgres.tar"), "tar").unwrap();
    std::fs::write(dir.join("images/mariadb.tar"), "tar").unwrap();
    std::fs::write(dir.join("RPM-GPG-KEY-dbvm.asc"), "public key").unwrap();
    let mut vars = format!(
        "vcenter_server = \"vcenter.invalid\"\nvcenter_datacenter = \"dc\"\n\
         vcenter_cluster = \"cluster\"\nvcenter_datastore = \"ds\"\n\
         network_management = \"mgmt\"\nnetwork_application = \"app\"\n\
         photon_iso_path = \"[iso] photon-5.0.iso\"\ndbvm_version = \"0.1.0\"\n\
         rpm_dir = \"{0}/rpm\"\nimage_dir = \"{0}/images\"\n\
         rpm_signing_key = \"{0}/RPM-GPG-KEY-dbvm.asc\"\noutput_dir = \"{0}/ova\"\n",
        dir.display()
    );
    if with_credentials {
        vars.push_str("vcenter_username = \"builder\"\nvcenter_password = \"dummy\"\n");
    }
    let file = dir.join(if with_credentials {
        "dummy.pkrvars.hcl"
    } else {
        "nocreds.pkrvars.hcl"
    });
    std::fs::write(&file, vars).unwrap();
    file
}

/// What a command said, on either stream (packer prints its errors on stdout).
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn packer_validate(vars: &Path) -> Output {
    assert!(
        Command::new("packer").arg("version").output().is_ok(),
        "packer is missing: bash scripts/setup.sh installs it (Debian package packer)"
    );
    // No checkpoint call home (Packer's version check).
    run(Command::new("packer")
        .current_dir(photon())
        .env("CHECKPOINT_DISABLE", "1")
        .args(["validate", "-var-file"])
        .arg(vars)
        .arg("."))
}

#[test]
fn the_packer_template_validates_and_credentials_have_no_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let vars = dummy_build_inputs(tmp.path(), true);
    // vsphere-iso validates offline: the builder checks its settings and that every
    // cd_files input exists, and connects to nothing until `packer build`.
    let out = packer_validate(&vars);
    assert!(out.status.success(), "packer validate failed");

    // The check is real: a missing RPM fails it, naming the file.
    std::fs::remove_file(tmp.path().join("rpm/dbvm-agent-0.1.0-1.x86_64.rpm")).unwrap();
    let out = packer_validate(&vars);
    assert!(!out.status.success());
    assert!(said(&out).contains("dbvm-agent-0.1.0-1.x86_64.rpm"));

    // Credentials: no default (validate fails without them, naming them) and sensitive.
    let vars = dummy_build_inputs(tmp.path(), false);
    let out = packer_validate(&vars);
    assert!(!out.status.success());
    let said = said(&out);
    for name in ["vcenter_username", "vcenter_password"] {
        assert!(said.contains(name), "{name} not named: {said}");
        let variables = read(&photon().join("variables.pkr.hcl"));
        let block = variables
            .split(&format!("variable \"{name}\" {{"))
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .unwrap_or_else(|| panic!("{name} not declared"));
        assert!(block.contains("sensitive   = true"), "{name}: {block}");
        assert!(!block.contains("default"), "{name} has a default");
    }
}

/// The photon/ files the kickstart copies (`additional_files` sources found in photon/).
fn kickstart() -> serde_json::Value {
    serde_json::from_str(&read(&photon().join("kickstart.json"))).expect("kickstart.json is JSON")
}

#[test]
fn the_kickstart_installs_what_a_database_vm_needs_and_carries_no_secret() {
    let ks = kickstart();
    assert_eq!(ks["disk"], "/dev/sda");
    let parts = ks["partitions"].as_array().expect("partitions");
    assert!(parts.iter().any(|p| p["mountpoint"] == "/"));
    let packages: Vec<&str> = ks["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for p in [
        "dbvm-agent",
        "telegraf",
        "nftables",
        "docker",
        "open-vm-tools",
    ] {
        assert!(packages.contains(&p), "package {p} missing");
    }
    assert!(
        !packages.contains(&"dbvm-broker"),
        "a database VM has no broker"
    );
    assert!(ks["additional_rpms_path"].is_string());
    // Root is locked: crypted "*" (no password in clear text, none at all).
    assert_eq!(ks["password"]["crypted"], true);
    assert_eq!(ks["password"]["text"], "*");
    assert!(ks.get("public_key").is_none(), "no authorized key baked in");

    let lines = |key: &str| -> String {
        ks[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} missing"))
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    };
    // The signing key is imported and every dbvm RPM verified before anything installs.
    let pre = lines("prepkgsinstall");
    assert!(pre.contains("--import") && pre.contains("-K"), "{pre}");
    assert!(pre.contains("_pkgverify_level signature"));
    let post = lines("postinstall");
    assert!(post.contains("/etc/sysconfig/nftables.conf") && post.contains("firewall-base.nft"));
    assert!(post.contains(": > /etc/machine-id") && post.contains("rm -f /etc/ssh/ssh_host_*"));
    for (unit, state) in [
        ("dbvm-agent", "enabled"),
        ("nftables", "enabled"),
        ("telegraf", "enabled"),
        ("docker", "enabled"),
        ("iptables", "disabled"),
    ] {
        assert_eq!(ks["services"][unit], state, "{unit}");
    }

    // The kickstart and every file of photon/ it copies: no secret, no identity.
    let mut found = secrets_in("kickstart.json", &read(&photon().join("kickstart.json")));
    let mut copied = 0;
    for pair in ks["additional_files"].as_array().expect("additional_files") {
        let (src, _) = pair.as_object().unwrap().iter().next().unwrap();
        let path = photon().join(src);
        if path.exists() {
            copied += 1;
            found.extend(secrets_in(src, &read(&path)));
        } else {
            // The rest comes from the build: the RPM key (public) and the images.
            assert!(
                src.ends_with(".tar") || src == "RPM-GPG-KEY-dbvm.asc",
                "{src}: neither in photon/ nor a build output"
            );
        }
    }
    assert_eq!(copied, 3, "telegraf.conf, seal.sh, dbvm-seal.service");
    // The scripts parse (seal.sh with a POSIX shell: Photon's /bin/sh is bash, dash is
    // stricter).
    ok(Command::new("sh").arg("-n").arg(photon().join("seal.sh")));
    for script in ["make-ova.sh", "image-manifest.sh"] {
        ok(Command::new("bash").arg("-n").arg(photon().join(script)));
    }
    assert!(found.is_empty(), "{found:#?}");
    // Telegraf scrapes the agent where its config says it serves.
    let telegraf = read(&photon().join("telegraf.conf"));
    assert!(telegraf.contains("http://127.0.0.1:9273/metrics"));
    assert!(telegraf.contains("/var/lib/telegraf/metrics.out"));
    // The fleet's Prometheus reaches Telegraf's endpoint because the package's agent
    // config opens that port on the management interface (and only there).
    let listen = telegraf
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen = \":"))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("[[outputs.prometheus_client]] listen");
    let port: u16 = listen.parse().unwrap();
    let package = dbvm_agent::config::Config::load(&repo().join("packaging/rpm/agent.toml"))
        .expect("the package's agent.toml parses");
    let firewall = package
        .firewall
        .expect("the package's config has [firewall]");
    assert!(firewall.enabled);
    assert!(
        firewall.management_tcp_ports.contains(&port) && !firewall.extra_tcp_ports.contains(&port),
        "{port}: {firewall:?}"
    );
}

fn ovf_keys(doc: &roxmltree::Document) -> Vec<(String, bool, Option<String>)> {
    doc.descendants()
        .filter(|n| n.has_tag_name("Property"))
        .map(|n| {
            let attr = |name: &str| {
                n.attributes()
                    .find(|a| a.name() == name)
                    .map(|a| a.value().to_string())
            };
            (
                attr("key").expect("ovf:key"),
                attr("password").as_deref() == Some("true"),
                attr("value"),
            )
        })
        .collect()
}

#[test]
fn the_ovf_fragment_declares_every_first_boot_property_and_make_ova_places_it() {
    let text = read(&photon().join("ovf-properties.xml"));
    let doc = roxmltree::Document::parse(&text).expect("ovf-properties.xml is well-formed XML");
    assert!(doc
        .root_element()
        .has_tag_name(("http://schemas.dmtf.org/ovf/envelope/1", "ProductSection")));
    let keys = ovf_keys(&doc);
    let names: BTreeSet<&str> = keys.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(names.len(), keys.len(), "a key is declared twice");
    let mut want: BTreeSet<String> = REQUIRED_PROPERTIES.iter().map(|k| k.to_string()).collect();
    want.insert(firstboot::BROKER_SERVER_NAME.to_string());
    for nic in ["mgmt", "app"] {
        for f in NETWORK_FIELDS {
            want.insert(format!("dbvm.{nic}_{f}"));
        }
    }
    let want_refs: BTreeSet<&str> = want.iter().map(String::as_str).collect();
    assert_eq!(names, want_refs);
    let readme = read(&photon().join("README.md"));
    for (key, password, default) in &keys {
        assert!(
            readme.contains(&format!("`{key}`")),
            "{key} not in photon/README.md"
        );
        // Only the token is a password; the required ones have no default value.
        assert_eq!(*password, key == firstboot::ENROLLMENT_TOKEN, "{key}");
        assert_eq!(
            default.is_none(),
            REQUIRED_PROPERTIES.contains(&key.as_str()),
            "{key}: the required properties, and only they, have no default"
        );
    }

    // The reader takes an environment holding what the fragment declares (the defaults,
    // and values for the required ones), and names each required one left out.
    let ca =
        dbvm_protocol::pki::FleetCa::generate("image test CA", Duration::from_secs(3600)).unwrap();
    let signer = dbvm_protocol::command::CommandSigner::generate();
    let public = dbvm_protocol::command::PublicKeyFile::from_key(&signer.verifying_key());
    let value = |key: &str, default: &Option<String>| -> String {
        match key {
            firstboot::AGENT_ID => "db-017".into(),
            firstboot::BROKER_ADDRESS => "broker.example.com:7443".into(),
            firstboot::FLEET_CA => base64::engine::general_purpose::STANDARD.encode(ca.cert_pem()),
            firstboot::ENROLLMENT_TOKEN => "one-time".into(),
            firstboot::TRUSTED_KEYS => format!("{}:{}", public.key_id, public.public_key),
            _ => default.clone().unwrap(),
        }
    };
    let filled: Vec<(String, String)> = keys
        .iter()
        .map(|(k, _, default)| (k.clone(), value(k, default)))
        .collect();
    let settings = firstboot::Settings::from_properties(
        "test",
        &firstboot::properties("test", &ovf_env(&filled)).unwrap(),
    )
    .expect("the reader accepts the fragment's properties");
    assert_eq!(settings.agent_id, "db-017");
    for left_out in REQUIRED_PROPERTIES {
        let kept: Vec<(String, String)> = filled
            .iter()
            .filter(|(k, _)| k != left_out)
            .cloned()
            .collect();
        let err = firstboot::Settings::from_properties(
            "test",
            &firstboot::properties("test", &ovf_env(&kept)).unwrap(),
        )
        .err()
        .unwrap_or_else(|| panic!("accepted without {left_out}"));
        assert!(err.to_string().contains(left_out), "{err}");
    }

    // make-ova.sh on a descriptor shaped like vSphere's export.
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    std::fs::create_dir_all(&export).unwrap();
    std::fs::write(
        export.join("dbvm.ovf"),
        r#"<?xml version="1.0" encoding="UTF-8"?>
<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <ovf:References><ovf:File ovf:href="dbvm-1.vmdk" ovf:id="file1"/><ovf:File ovf:href="dbvm-2.vmdk" ovf:id="file2"/></ovf:References>
  <ovf:VirtualSystem ovf:id="dbvm">
    <ovf:Info>A virtual machine</ovf:Info>
    <ovf:VirtualHardwareSection>
      <ovf:Info>Virtual hardware requirements</ovf:Info>
    </ovf:VirtualHardwareSection>
  </ovf:VirtualSystem>
</ovf:Envelope>
"#,
    )
    .unwrap();
    std::fs::write(export.join("dbvm-1.vmdk"), "system disk").unwrap();
    std::fs::write(export.join("dbvm-2.vmdk"), "data disk").unwrap();
    std::fs::write(export.join("dbvm.mf"), "SHA1(dbvm.ovf)= 00\n").unwrap();
    let ova = tmp.path().join("dbvm.ova");
    ok(Command::new("bash")
        .arg(photon().join("make-ova.sh"))
        .arg(&export)
        .arg(photon().join("ovf-properties.xml"))
        .arg(&ova));
    let members = ok(Command::new("tar").arg("tf").arg(&ova));
    let members: Vec<&str> = members.lines().collect();
    assert_eq!(
        members,
        ["dbvm.ovf", "dbvm.mf", "dbvm-1.vmdk", "dbvm-2.vmdk"],
        "the descriptor first"
    );
    let unpacked = tmp.path().join("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    ok(Command::new("tar")
        .arg("xf")
        .arg(&ova)
        .arg("-C")
        .arg(&unpacked));
    let ovf = read(&unpacked.join("dbvm.ovf"));
    let doc = roxmltree::Document::parse(&ovf).expect("the OVA's descriptor is well-formed");
    let product = doc
        .descendants()
        .find(|n| n.has_tag_name("ProductSection"))
        .expect("a ProductSection");
    assert!(product.parent().unwrap().has_tag_name("VirtualSystem"));
    assert_eq!(ovf_keys(&doc).len(), keys.len());
    let hardware = doc
        .descendants()
        .find(|n| n.has_tag_name("VirtualHardwareSection"))
        .unwrap();
    assert_eq!(
        hardware.attribute(("http://schemas.dmtf.org/ovf/envelope/1", "transport")),
        Some("com.vmware.guestInfo")
    );
    let manifest = read(&unpacked.join("dbvm.mf"));
    for f in ["dbvm.ovf", "dbvm-1.vmdk", "dbvm-2.vmdk"] {
        let sum = hex(&Sha256::digest(std::fs::read(unpacked.join(f)).unwrap()));
        assert!(
            manifest.contains(&format!("SHA256({f})= {sum}")),
            "{f}: {manifest}"
        );
    }
    // Run twice on one export: refused, nothing doubled.
    let out = run(Command::new("bash")
        .arg(photon().join("make-ova.sh"))
        .arg(&export)
        .arg(photon().join("ovf-properties.xml"))
        .arg(&ova));
    assert!(!out.status.success());
}

/// An OVF environment as VMware Tools hands it over (`guestinfo.ovfEnv`), with `props`.
fn ovf_env(props: &[(String, String)]) -> String {
    let p: String = props
        .iter()
        .map(|(k, v)| format!("    <Property oe:key=\"{k}\" oe:value=\"{v}\"/>\n"))
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <Environment xmlns=\"http://schemas.dmtf.org/ovf/environment/1\" \
         xmlns:oe=\"http://schemas.dmtf.org/ovf/environment/1\" oe:id=\"\">\n\
         <PropertySection>\n{p}</PropertySection>\n</Environment>\n"
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_image_manifest_names_the_agent_its_sha256_and_its_real_dependencies() {
    let agent = dbvm_e2e::proc::bin_dir().join("dbvm-agent");
    let tmp = tempfile::tempdir().unwrap();
    let printed = ok(Command::new("bash")
        .arg(photon().join("image-manifest.sh"))
        .arg(&agent)
        .arg(tmp.path()));
    let manifest: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(
        manifest,
        serde_json::from_str::<serde_json::Value>(&read(
            &tmp.path().join("dbvm-agent.manifest.json")
        ))
        .unwrap()
    );
    assert_eq!(manifest["agent"]["version"], env!("CARGO_PKG_VERSION"));
    let sum = hex(&Sha256::digest(std::fs::read(&agent).unwrap()));
    assert_eq!(manifest["agent"]["sha256"], sum.as_str());

    let sbom: serde_json::Value =
        serde_json::from_str(&read(&tmp.path().join("dbvm-agent.cdx.json"))).unwrap();
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    assert_eq!(
        sbom["metadata"]["component"]["hashes"][0]["content"],
        sum.as_str()
    );
    let components = sbom["components"].as_array().unwrap();
    assert_eq!(
        manifest["sbom"]["dependencies"].as_u64().unwrap(),
        components.len() as u64
    );
    let names: BTreeSet<&str> = components
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for linked in ["tokio", "rustls", "ring", "rusqlite", "dbvm-protocol"] {
        assert!(names.contains(linked), "{linked} missing from the SBOM");
    }
    // Not in the binary: proc-macros, build-only crates, other members, dev-dependencies.
    for absent in [
        "serde_derive",
        "tokio-macros",
        "cc",
        "dbvm-broker",
        "tempfile",
    ] {
        assert!(
            !names.contains(absent),
            "{absent} is not linked into the agent"
        );
    }
    for c in components {
        let purl = c["purl"].as_str().unwrap();
        assert_eq!(
            purl,
            format!(
                "pkg:cargo/{}@{}",
                c["name"].as_str().unwrap(),
                c["version"].as_str().unwrap()
            )
        );
    }
}

#[test]
fn the_image_manifest_reads_the_crate_list_a_cargo_auditable_binary_carries() {
    // A binary built with `cargo auditable build` carries its exact crate list (the ELF
    // section .dep-v0); the manifest uses it instead of the source tree's graph. A small
    // crate stands in for the agent (named like it, one local dependency, no registry):
    // building the agent itself this way takes minutes.
    let have = dbvm_e2e::proc::cargo_command()
        .args(["auditable", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have,
        "cargo-auditable is missing: bash scripts/setup.sh installs it \
         (cargo install cargo-auditable --version 0.7.7 --locked)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let krate = tmp.path().join("agent");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::create_dir_all(krate.join("probe/src")).unwrap();
    std::fs::write(
        krate.join("Cargo.toml"),
        "[package]\nname = \"dbvm-agent\"\nversion = \"9.9.9\"\nedition = \"2021\"\n\
         [dependencies]\ndbvm-sbom-probe = { path = \"probe\" }\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(
        krate.join("src/main.rs"),
        "fn main() { println!(\"dbvm-agent {}\", dbvm_sbom_probe::VERSION); }\n",
    )
    .unwrap();
    std::fs::write(
        krate.join("probe/Cargo.toml"),
        "[package]\nname = \"dbvm-sbom-probe\"\nversion = \"0.3.1\"\nedition = \"2021\"\n",
    )
    .unwrap();
    std::fs::write(
        krate.join("probe/src/lib.rs"),
        "pub const VERSION: &str = \"9.9.9\";\n",
    )
    .unwrap();
    ok(dbvm_e2e::proc::cargo_command()
        .current_dir(&krate)
        .env("CARGO_TARGET_DIR", krate.join("target"))
        .args(["auditable", "build", "--offline", "--quiet"]));
    let out = tmp.path().join("manifest");
    let printed = ok(Command::new("bash")
        .arg(photon().join("image-manifest.sh"))
        .arg(krate.join("target/debug/dbvm-agent"))
        .arg(&out));
    let manifest: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(manifest["agent"]["version"], "9.9.9");
    assert!(manifest["sbom"]["source"]
        .as_str()
        .unwrap()
        .starts_with("cargo-auditable"));
    let sbom: serde_json::Value =
        serde_json::from_str(&read(&out.join("dbvm-agent.cdx.json"))).unwrap();
    let components: Vec<(&str, &str)> = sbom["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["version"].as_str().unwrap()))
        .collect();
    assert_eq!(components, [("dbvm-sbom-probe", "0.3.1")]);
}

// The installed root: the RPMs as the kickstart installs them.

fn keyring(dir: &Path, email: &str) -> PathBuf {
    let home = dir.join("gnupg");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    ok(Command::new("gpg")
        .env("GNUPGHOME", &home)
        .args(["--batch", "--passphrase", "", "--quick-gen-key"])
        .arg(format!("dbvm image builder <{email}>"))
        .args(["rsa2048", "sign", "never"]));
    home
}

fn rpm(root: &Path) -> Command {
    let mut c = Command::new("rpm");
    c.arg("--root")
        .arg(root)
        .args(["--dbpath", "/var/lib/rpm"])
        .args(["--define", "_pkgverify_level signature"]);
    c
}

/// Every file under `root` that holds a secret or an identity (text files; the agent's
/// executable is checked by its sha256 in the manifest, and names PEM labels it parses).
fn identity_in(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = e.path().symlink_metadata().unwrap();
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("ssh_host_") || name == "enrollment.token" || name == "key.json" {
                found.push(format!("{rel}: an identity file"));
            }
            if !meta.is_file() || rel.starts_with("var/lib/rpm") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            if bytes.starts_with(b"\x7fELF") {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            if name == "machine-id" && !text.trim().is_empty() {
                found.push(format!("{rel}: a machine id"));
            }
            if machine_id_like(&text) {
                found.push(format!("{rel}: looks like a machine id"));
            }
            found.extend(secrets_in(&rel, &text));
        }
    }
    found
}

#[test]
fn a_root_with_the_signed_rpms_and_the_kickstart_files_holds_no_identity_or_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let email = "builder@dbvm.test";
    let home = keyring(dir, email);
    let rpms = dir.join("rpm");
    ok(Command::new("bash")
        .arg(repo().join("scripts/build-rpms.sh"))
        .arg("--bin-dir")
        .arg(dbvm_e2e::proc::bin_dir())
        .arg("--out")
        .arg(&rpms)
        .args(["--version", "0.1.0", "--sign-key", email])
        .env("GNUPGHOME", &home));
    let agent_rpm = rpms.join("dbvm-agent-0.1.0-1.x86_64.rpm");
    let public = ok(Command::new("gpg")
        .env("GNUPGHOME", &home)
        .args(["--armor", "--export", email]));
    assert!(public.contains("PUBLIC KEY BLOCK"));
    std::fs::write(dir.join("RPM-GPG-KEY-dbvm.asc"), &public).unwrap();

    // As the kickstart's prepkgsinstall: import the key, verify, install (scriptlets
    // skipped: the kickstart's `services` enables the units; packaging.rs runs them).
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    ok(rpm(&root).arg("--initdb"));
    ok(rpm(&root)
        .arg("--import")
        .arg(dir.join("RPM-GPG-KEY-dbvm.asc")));
    let checked = ok(rpm(&root).arg("-K").arg(&agent_rpm));
    assert!(checked.contains("signatures OK"), "{checked}");
    ok(rpm(&root)
        .args(["--nodeps", "--noscripts", "-i"])
        .arg(&agent_rpm));
    // The kickstart's additional_files from photon/ at their places, and the postinstall's
    // empty machine id.
    for pair in kickstart()["additional_files"].as_array().unwrap() {
        let (src, dst) = pair.as_object().unwrap().iter().next().unwrap();
        let from = photon().join(src);
        if from.exists() {
            let to = root.join(dst.as_str().unwrap().trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&from, &to).unwrap();
        }
    }
    std::fs::write(root.join("etc/machine-id"), "").unwrap();

    let found = identity_in(&root);
    assert!(found.is_empty(), "{found:#?}");
    let config = read(&root.join("etc/dbvm/agent.toml"));
    assert!(
        config.lines().any(|l| l.trim() == "agent_id = \"\""),
        "{config}"
    );
    assert!(
        !config.contains("enrollment_token ="),
        "no token in the default config"
    );
    assert!(!root.join("etc/dbvm/enrollment.token").exists());
    assert_eq!(
        std::fs::read_dir(root.join("var/lib/dbvm-agent"))
            .unwrap()
            .count(),
        0,
        "the agent's state directory is empty"
    );

    // The scan is real: what a booted VM writes is found.
    std::fs::write(
        root.join("etc/machine-id"),
        "4c4c4544004d3610804bb4c04f4e3232\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    std::fs::write(
        root.join("etc/ssh/ssh_host_ed25519_key"),
        "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/dbvm/enrollment.token"), "t0k3n\n").unwrap();
    let found = identity_in(&root);
    assert!(found.len() >= 4, "{found:#?}");
}
