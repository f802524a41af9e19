//! First boot from the OVF environment, with the real agent and broker: the package's
//! config (`packaging/rpm/agent.toml`, which names no VM) and an `ovf-env.xml` in the
//! format VMware Tools hands over (`guestinfo.ovfEnv`); the agent fills its config from
//! it, enrolls, answers a signed command, removes the spent token, and a reboot neither
//! runs first boot nor enrolls again. A missing, malformed or incomplete environment is
//! named, changes nothing, and first boot tries again until it is complete.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use base64::Engine;
use dbvm_e2e::proc::Proc;
use dbvm_e2e::{eventually, Fleet};
use dbvm_protocol::api::CommandState;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The package's default config, with this test's state directory and quick reconnects.
fn package_config(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(repo.join("packaging/rpm/agent.toml"))
        .unwrap()
        .replace(
            "state_dir = \"/var/lib/dbvm-agent\"",
            &format!("state_dir = \"{}\"", dir.join("state").display()),
        )
        .replace("/etc/dbvm/", &format!("{}/", dir.display()))
        // The package's firewall would apply nftables rules to this machine:
        // the agent keeps the section (first boot writes the interfaces into it) but
        // leaves the host's firewall alone. The firewall itself is tested in network
        // namespaces (tests/firewall.rs).
        .replace(
            "[firewall]\n",
            "[firewall]\n# this test: never the host's firewall\nenabled = false\n",
        )
        .replace("\nenabled = true\n", "\n");
    assert!(text.contains("agent_id = \"\""), "the package names no VM");
    assert!(
        text.contains("enabled = false") && !text.contains("enabled = true"),
        "the package's firewall is off here: {text}"
    );
    let text = format!(
        "{text}\n[link]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n[health]\nmetrics_listen = \"\"\nshadow_file = \"/nonexistent/shadow\"\n"
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// An OVF environment as VMware Tools hands it over, with `props`.
fn ovf_env(props: &[(&str, &str)]) -> String {
    let p: String = props
        .iter()
        .map(|(k, v)| format!("      <Property oe:key=\"{k}\" oe:value=\"{v}\"/>\n"))
        .collect();
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Environment
     xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:ve="http://www.vmware.com/schema/ovfenv"
     oe:id=""
     ve:vCenterId="vm-1017">
   <PlatformSection>
      <Kind>VMware ESXi</Kind>
      <Version>8.0.2</Version>
      <Vendor>VMware, Inc.</Vendor>
      <Locale>en</Locale>
   </PlatformSection>
   <PropertySection>
{p}   </PropertySection>
   <ve:EthernetAdapterSection>
      <ve:Adapter ve:mac="00:50:56:aa:bb:01" ve:network="mgmt" ve:unitNumber="7"/>
   </ve:EthernetAdapterSection>
</Environment>
"#
    )
}

/// The properties a deployment fills for agent `id` on this fleet.
fn properties(fleet: &Fleet, broker_port: u16, id: &str, token: &str) -> Vec<(String, String)> {
    let key = dbvm_protocol::command::PublicKeyFile::from_key(&fleet.signer.verifying_key());
    let ca = std::fs::read(fleet.path("ca.crt")).unwrap();
    vec![
        ("dbvm.agent_id".into(), id.into()),
        (
            "dbvm.broker_address".into(),
            format!("localhost:{broker_port}"),
        ),
        (
            "dbvm.fleet_ca".into(),
            base64::engine::general_purpose::STANDARD.encode(ca),
        ),
        ("dbvm.enrollment_token".into(), token.into()),
        (
            "dbvm.trusted_keys".into(),
            format!("{}:{}", key.key_id, key.public_key),
        ),
    ]
}

fn write_env(path: &Path, props: &[(String, String)], leave_out: &[&str]) {
    let kept: Vec<(&str, &str)> = props
        .iter()
        .filter(|(k, _)| !leave_out.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    std::fs::write(path, ovf_env(&kept)).unwrap();
}

fn start(fleet: &Fleet, name: &str, config: &Path, env: &Path) -> Proc {
    start_on(fleet, name, config, env, "machine-a")
}

/// [`start`] on the machine with fingerprint `machine` (see the agent's
/// `firstboot::TEST_MACHINE`).
/// The agent writes its systemd-networkd files into `network/` beside the environment,
/// never into this machine's `/etc/systemd/network`.
fn start_on(fleet: &Fleet, name: &str, config: &Path, env: &Path, machine: &str) -> Proc {
    let network_dir = network_dir(env);
    Proc::spawn(
        name,
        "dbvm-agent",
        &[
            "--config",
            config.to_str().unwrap(),
            "--ovf-env",
            env.to_str().unwrap(),
        ],
        fleet.path(&format!("{name}.log")),
        &[
            (dbvm_agent::firstboot::TEST_MACHINE, machine),
            ("DBVM_NETWORK_DIR", network_dir.to_str().unwrap()),
        ],
    )
    .0
}

fn network_dir(env: &Path) -> PathBuf {
    env.parent().unwrap().join("network")
}

/// The network properties of a deployment: a static management network on ens192, DHCP
/// on ens224 with a DNS server of its own.
fn network_properties() -> Vec<(String, String)> {
    [
        ("dbvm.mgmt_interface", "ens192"),
        ("dbvm.mgmt_mode", "static"),
        ("dbvm.mgmt_ip", "10.20.0.17"),
        ("dbvm.mgmt_netmask", "255.255.252.0"),
        ("dbvm.mgmt_gateway", "10.20.0.1"),
        ("dbvm.mgmt_dns", "10.20.0.2,10.20.0.3"),
        ("dbvm.app_interface", "ens224"),
        ("dbvm.app_mode", "dhcp"),
        ("dbvm.app_ip", ""),
        ("dbvm.app_netmask", ""),
        ("dbvm.app_gateway", ""),
        ("dbvm.app_dns", "192.168.7.53"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn ping(fleet: &Fleet, client: &dbvmctl::Client, id: &str) -> serde_json::Value {
    let cmd = fleet.sign(id, "ping", json!({"echo": "first boot"}));
    let v = client.submit(&cmd).await.unwrap();
    let v = client.wait(v.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
    v.output.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_boot_fills_the_config_enrolls_answers_and_a_reboot_does_not_enroll_again() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let dir = fleet.path("vm1");
    let config = package_config(&dir);
    let token = client.enrollment_token("fb1", None).await.unwrap().token;
    let env = dir.join("ovf-env.xml");
    let mut props = properties(&fleet, broker.agent_addr.port(), "fb1", &token);
    props.extend(network_properties());
    write_env(&env, &props, &[]);

    let started = std::time::Instant::now();
    let mut agent = start(&fleet, "fb1", &config, &env);
    dbvm_e2e::connected(&client, "fb1").await;
    let out = ping(&fleet, &client, "fb1").await;
    eprintln!(
        "first boot to a signed ping answered: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(out["echo"], "first boot", "{out}");

    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains("agent_id = \"fb1\""), "{written}");
    assert!(!written.contains(&token), "the token is not in the config");
    assert!(
        !dir.join("enrollment.token").exists(),
        "the spent token was removed"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // The networks: a systemd-networkd file each, and the interfaces in the firewall
    // section (which stays off on this machine).
    let net = network_dir(&env);
    let mgmt = std::fs::read_to_string(net.join("10-dbvm-mgmt.network")).unwrap();
    let body = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect()
    };
    assert_eq!(
        body(&mgmt),
        [
            "[Match]",
            "Name=ens192",
            "",
            "[Network]",
            "Address=10.20.0.17/22",
            "DNS=10.20.0.2",
            "DNS=10.20.0.3",
            "Gateway=10.20.0.1",
        ],
        "{mgmt}"
    );
    let app = std::fs::read_to_string(net.join("20-dbvm-app.network")).unwrap();
    assert_eq!(
        body(&app),
        [
            "[Match]",
            "Name=ens224",
            "",
            "[Network]",
            "DHCP=yes",
            "DNS=192.168.7.53"
        ],
        "{app}"
    );
    let firewall = written.split("[firewall]").nth(1).unwrap();
    let firewall = firewall.split("\n[").next().unwrap();
    for line in [
        "management_interface = \"ens192\"",
        "application_interface = \"ens224\"",
        "management_tcp_ports = [9274]",
        "enabled = false",
    ] {
        assert!(firewall.lines().any(|l| l == line), "{line}:\n{written}");
    }
    let log = agent.log_text();
    assert!(log.contains("10-dbvm-mgmt.network"), "{log}");

    // A reboot: the config is filled, the identity enrolled; no token is needed (there is
    // none left) and the agent answers again.
    agent.terminate();
    let seen = agent.log_text().len();
    let mut agent = start(&fleet, "fb1", &config, &env);
    dbvm_e2e::connected(&client, "fb1").await;
    ping(&fleet, &client, "fb1").await;
    let after = agent.log_text()[seen..].to_string();
    assert!(
        !after.contains("first boot:") && !after.contains("enrolled with the broker"),
        "{after}"
    );
    agent.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_malformed_or_incomplete_environment_is_named_changes_nothing_and_is_retried() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let dir = fleet.path("vm2");
    let config = package_config(&dir);
    let before = std::fs::read(&config).unwrap();
    let token = client.enrollment_token("fb2", None).await.unwrap().token;
    let props = properties(&fleet, broker.agent_addr.port(), "fb2", &token);
    let env = dir.join("ovf-env.xml");

    let agent = start(&fleet, "fb2", &config, &env);
    let said = |text: &'static str| {
        let agent = &agent;
        async move {
            eventually(Duration::from_secs(30), text, || async {
                agent.log_text().contains(text).then_some(())
            })
            .await
        }
    };
    said("no OVF environment").await;
    std::fs::write(&env, "<Environment><PropertySection>").unwrap();
    said("is not valid XML").await;
    write_env(&env, &props, &["dbvm.enrollment_token"]);
    said("lacks the property dbvm.enrollment_token").await;
    let mut bad_ca = props.clone();
    bad_ca[2].1 = "bm90IGEgY2VydGlmaWNhdGU=".into();
    write_env(&env, &bad_ca, &[]);
    said("dbvm.fleet_ca is not usable").await;
    // Everything else right, but a management address that is not one: named, and no
    // network file either.
    let mut bad_ip = props.clone();
    bad_ip.extend(network_properties());
    for (k, v) in bad_ip.iter_mut() {
        if k == "dbvm.mgmt_ip" {
            *v = "10.20.0.999".into();
        }
    }
    write_env(&env, &bad_ip, &[]);
    said("dbvm.mgmt_ip is not usable: \"10.20.0.999\" is not an IPv4 or IPv6 address").await;
    assert!(!network_dir(&env).exists(), "no network file was written");
    assert_eq!(std::fs::read(&config).unwrap(), before, "nothing written");
    assert!(!dir.join("enrollment.token").exists());
    assert!(!dir.join("fleet-ca.crt").exists());
    assert!(
        !agent.log_text().contains(&token),
        "the token is never logged"
    );

    // Complete now: the next attempt configures and enrolls.
    write_env(&env, &props, &[]);
    dbvm_e2e::connected(&client, "fb2").await;
    ping(&fleet, &client, "fb2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_already_used_leaves_the_agent_unenrolled_and_says_why() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let token = client.enrollment_token("fb3", None).await.unwrap().token;
    let props = properties(&fleet, broker.agent_addr.port(), "fb3", &token);
    // The first VM uses the token.
    let dir = fleet.path("vm3");
    let config = package_config(&dir);
    let env = dir.join("ovf-env.xml");
    write_env(&env, &props, &[]);
    let mut first = start(&fleet, "fb3", &config, &env);
    dbvm_e2e::connected(&client, "fb3").await;
    first.terminate();
    // A second VM deployed with the same properties does not get in.
    let dir = fleet.path("vm3b");
    let config = package_config(&dir);
    let env = dir.join("ovf-env.xml");
    write_env(&env, &props, &[]);
    let second = start(&fleet, "fb3b", &config, &env);
    eventually(Duration::from_secs(30), "the refusal logged", || async {
        second.log_text().contains("already used").then_some(())
    })
    .await;
    assert!(!client
        .agents()
        .await
        .unwrap()
        .iter()
        .any(|a| a.id == "fb3" && a.connected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloned_vm_sets_the_identity_aside_and_enrolls_with_its_own_properties() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let dir = fleet.path("vm4");
    let config = package_config(&dir);
    let token = client.enrollment_token("fb4", None).await.unwrap().token;
    let env = dir.join("ovf-env.xml");
    write_env(
        &env,
        &properties(&fleet, broker.agent_addr.port(), "fb4", &token),
        &[],
    );
    let mut original = start_on(&fleet, "fb4", &config, &env, "machine-a");
    dbvm_e2e::connected(&client, "fb4").await;
    original.terminate();

    // The VM is cloned: its disk (config, state) copied whole to another machine, which
    // was deployed with its own properties.
    let clone_dir = fleet.path("vm4c");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&dir)
        .arg(&clone_dir)
        .status()
        .unwrap();
    assert!(copied.success());
    let clone_config = clone_dir.join("agent.toml");
    let text = std::fs::read_to_string(&clone_config).unwrap().replace(
        &format!("{}/", dir.display()),
        &format!("{}/", clone_dir.display()),
    );
    std::fs::write(&clone_config, text).unwrap();
    let clone_token = client.enrollment_token("fb4c", None).await.unwrap().token;
    let clone_env = clone_dir.join("ovf-env.xml");
    write_env(
        &clone_env,
        &properties(&fleet, broker.agent_addr.port(), "fb4c", &clone_token),
        &[],
    );
    let clone = start_on(&fleet, "fb4c", &clone_config, &clone_env, "machine-b");
    dbvm_e2e::connected(&client, "fb4c").await;
    ping(&fleet, &client, "fb4c").await;
    let log = clone.log_text();
    assert!(log.contains("it is a clone"), "{log}");
    let aside: Vec<_> = std::fs::read_dir(clone_dir.join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cloned-"))
        .collect();
    assert_eq!(aside.len(), 1, "the original's identity was set aside");

    // The original, back on its own machine, is still itself.
    let _original = start_on(&fleet, "fb4", &config, &env, "machine-a");
    dbvm_e2e::connected(&client, "fb4").await;
    ping(&fleet, &client, "fb4").await;
}
