//! A throwaway fleet: CA, broker certificate, control-plane certificate and keys in a
//! temp dir; starts brokers and agents as real processes configured against it.

use crate::proc::{parse_listening, AgentProc, BrokerProc, Proc};
use dbvm_protocol::command::{CommandBody, CommandSigner, BODY_FORMAT};
use dbvm_protocol::pki::{CertifiedKey, FleetCa, Identity};
use dbvm_protocol::seal::SealingKey;
use dbvm_protocol::SignedCommand;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub ca: FleetCa,
    pub server: CertifiedKey,
    pub control_plane: CertifiedKey,
    pub signer: CommandSigner,
    pub reply_key: SealingKey,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Ten years, as `dbvmctl ca init` makes it: a CA near its end turns every agent's
        // connectivity check to warning.
        let ca =
            FleetCa::generate("test fleet CA", Duration::from_secs(3650 * 24 * 3600)).expect("CA");
        let server = ca
            .issue_server(
                &["localhost".into(), "127.0.0.1".into()],
                Duration::from_secs(24 * 3600),
            )
            .expect("server cert");
        let control_plane = ca
            .issue_client(
                &Identity::ControlPlane("tests".into()),
                Duration::from_secs(24 * 3600),
            )
            .expect("control-plane cert");
        let write =
            |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
        write("ca.crt", ca.cert_pem());
        write("ca.key", &ca.key_pem());
        write("broker.crt", &server.cert_pem);
        write("broker.key", &server.key_pem);
        Self {
            dir,
            ca,
            server,
            control_plane,
            signer: CommandSigner::generate(),
            reply_key: SealingKey::generate(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `[[trusted_keys]]` entry of this fleet's signing key (its public half), as
    /// both the broker and the agent configs carry it.
    pub fn trusted_key_entry(&self) -> String {
        let key = dbvm_protocol::command::PublicKeyFile::from_key(&self.signer.verifying_key());
        format!(
            "[[trusted_keys]]\nkey_id = \"{}\"\npublic_key = \"{}\"\n",
            key.key_id, key.public_key
        )
    }

    /// The config of a broker named `name` on this fleet's CA and certificates, trusting
    /// this fleet's signing key, with its data in `<name>-data` here; `extra` is appended.
    pub fn broker_config(
        &self,
        name: &str,
        agent: SocketAddr,
        api: SocketAddr,
        extra: &str,
    ) -> String {
        format!(
            r#"agent_listen = "{agent}"
api_listen = "{api}"
data_dir = {data}
[tls]
ca_cert = {ca}
ca_key = {ca_key}
server_cert = {cert}
server_key = {key}
{trusted_keys}
{extra}
"#,
            data = toml_path(&self.path(&format!("{name}-data"))),
            ca = toml_path(&self.path("ca.crt")),
            ca_key = toml_path(&self.path("ca.key")),
            cert = toml_path(&self.path("broker.crt")),
            key = toml_path(&self.path("broker.key")),
            trusted_keys = self.trusted_key_entry(),
        )
    }

    /// The config of agent `id` dialing `localhost:<broker_port>`, trusting this fleet's
    /// CA and signing key, enrolling with the token in `token_file`, with quick
    /// reconnects; `extra` (more sections) is appended.
    pub fn agent_config(
        &self,
        id: &str,
        broker_port: u16,
        state_dir: &Path,
        token_file: &Path,
        extra: &str,
    ) -> String {
        format!(
            r#"agent_id = "{id}"
state_dir = {state}
[broker]
address = "localhost:{broker_port}"
ca_cert = {ca}
enrollment_token_file = {token}
{trusted_keys}
[link]
initial_backoff_ms = 100
max_backoff_ms = 1000
{extra}
"#,
            state = toml_path(state_dir),
            ca = toml_path(&self.path("ca.crt")),
            token = toml_path(token_file),
            trusted_keys = self.trusted_key_entry(),
        )
    }

    /// Starts a broker named `name` (its data dir is kept across restarts) on the given
    /// addresses (`127.0.0.1:0` for any free port). `extra` is appended to its config.
    pub fn start_broker_at(
        &self,
        name: &str,
        agent: SocketAddr,
        api: SocketAddr,
        extra: &str,
    ) -> BrokerProc {
        let config = self.broker_config(name, agent, api, extra);
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, config).expect("broker config");
        let log = self.path(&format!("{name}.log"));
        let (proc, line) = Proc::spawn(
            name,
            "dbvm-broker",
            &["--config", path.to_str().unwrap_or_default()],
            log,
            &[],
        );
        let line = line.unwrap_or_default();
        let (agent_addr, api_addr) = parse_listening(&line).unwrap_or_else(|| {
            panic!(
                "broker did not report its addresses (got {line:?}):\n{}",
                proc.log_text()
            )
        });
        BrokerProc {
            proc,
            agent_addr,
            api_addr,
        }
    }

    pub fn start_broker(&self, extra: &str) -> BrokerProc {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        self.start_broker_at("broker", any, any, extra)
    }

    /// Restarts a broker on the same ports and data dir (after it was killed).
    pub fn restart_broker(&self, old: &BrokerProc, extra: &str) -> BrokerProc {
        self.start_broker_at(&old.proc.name, old.agent_addr, old.api_addr, extra)
    }

    /// Gets a one-time enrollment token for `id` through `client`, starts that agent
    /// with it (`extra` appended to its config) and waits until the broker lists it as
    /// connected.
    pub async fn enroll_agent(
        &self,
        client: &dbvmctl::Client,
        broker: SocketAddr,
        id: &str,
        extra: &str,
    ) -> AgentProc {
        let token = client
            .enrollment_token(id, None)
            .await
            .expect("enrollment token")
            .token;
        let agent = self.start_agent(id, broker, Some(&token), extra);
        crate::connected(client, id).await;
        agent
    }

    /// Writes an agent config and starts the agent. `token` goes into a token file.
    pub fn start_agent(
        &self,
        id: &str,
        broker: SocketAddr,
        token: Option<&str>,
        extra: &str,
    ) -> AgentProc {
        self.start_agent_env(id, broker, token, extra, &[])
    }

    /// [`Self::start_agent`] with extra environment variables for the agent process.
    pub fn start_agent_env(
        &self,
        id: &str,
        broker: SocketAddr,
        token: Option<&str>,
        extra: &str,
        env: &[(&str, &str)],
    ) -> AgentProc {
        let state_dir = self.path(&format!("agent-{id}"));
        let token_file = self.path(&format!("agent-{id}.token"));
        if let Some(t) = token {
            std::fs::write(&token_file, t).expect("token file");
        }
        // Many agents run at once here: unless a test sets up health itself, keep them
        // off the default metrics port (127.0.0.1:9273) and the real shadow file.
        let health = if extra.contains("[health]") {
            ""
        } else {
            "[health]\nmetrics_listen = \"\"\nshadow_file = \"/nonexistent/shadow\"\n"
        };
        let config = self.agent_config(
            id,
            broker.port(),
            &state_dir,
            &token_file,
            &format!("{health}{extra}"),
        );
        let config_path = self.path(&format!("agent-{id}.toml"));
        std::fs::write(&config_path, config).expect("agent config");
        self.run_agent_env(id, config_path, state_dir, env)
    }

    pub fn run_agent(&self, id: &str, config: PathBuf, state_dir: PathBuf) -> AgentProc {
        self.run_agent_env(id, config, state_dir, &[])
    }

    fn run_agent_env(
        &self,
        id: &str,
        config: PathBuf,
        state_dir: PathBuf,
        env: &[(&str, &str)],
    ) -> AgentProc {
        self.run_agent_exe(Path::new("dbvm-agent"), id, config, state_dir, env)
    }

    /// Starts agent `id` from the executable `exe` (a copy of the agent binary that an
    /// upgrade may replace; a bare name is one of the workspace's binaries).
    pub fn run_agent_exe(
        &self,
        exe: &Path,
        id: &str,
        config: PathBuf,
        state_dir: PathBuf,
        env: &[(&str, &str)],
    ) -> AgentProc {
        let log = self.path(&format!("agent-{id}.log"));
        let (proc, _) = Proc::spawn(
            &format!("agent {id}"),
            exe.to_str().unwrap_or_default(),
            &["--config", config.to_str().unwrap_or_default()],
            log,
            env,
        );
        AgentProc {
            proc,
            id: id.to_string(),
            config,
            state_dir,
        }
    }

    /// Gives agent `id` a certificate directly (no enrollment), for tests that point it
    /// at something other than a real broker.
    pub fn provision_identity(&self, id: &str) {
        self.provision_identity_for(id, Duration::from_secs(3600));
    }

    /// [`Self::provision_identity`] with a certificate valid for `lifetime`.
    pub fn provision_identity_for(&self, id: &str, lifetime: Duration) {
        let agent = dbvm_protocol::AgentId::new(id).expect("agent id");
        let (csr, key) = dbvm_protocol::pki::make_csr(&agent).expect("csr");
        let cert = self
            .ca
            .sign_agent_csr(&csr, &agent, lifetime)
            .expect("sign");
        let dir = self.path(&format!("agent-{id}"));
        std::fs::create_dir_all(&dir).expect("state dir");
        std::fs::write(
            dir.join("identity.pem"),
            format!("{}\n{}", cert.trim(), key),
        )
        .expect("identity");
    }

    /// A client certificate for an arbitrary identity, signed by the fleet CA.
    pub fn client_cert(&self, identity: Identity) -> CertifiedKey {
        self.ca
            .issue_client(&identity, Duration::from_secs(3600))
            .expect("client cert")
    }

    /// Starts the same agent again (same config and state) after it was killed.
    pub fn restart_agent(&self, old: &AgentProc) -> AgentProc {
        self.run_agent(&old.id, old.config.clone(), old.state_dir.clone())
    }

    pub fn client(&self, broker: &BrokerProc) -> dbvmctl::Client {
        client_as(
            &broker.api_url(),
            self.ca.cert_pem(),
            Some((&self.control_plane.cert_pem, &self.control_plane.key_pem)),
        )
    }

    pub fn body(&self, agent: &str, operation: &str, args: serde_json::Value) -> CommandBody {
        let now = dbvm_protocol::now_ms();
        CommandBody {
            format: BODY_FORMAT,
            id: Uuid::new_v4(),
            agent_id: agent.into(),
            issued_at_ms: now,
            not_after_ms: now + 300_000,
            operation: operation.into(),
            args_json: args.to_string(),
            reply_key: Some(self.reply_key.public_key()),
        }
    }

    pub fn sign(&self, agent: &str, operation: &str, args: serde_json::Value) -> SignedCommand {
        self.signer.sign(&self.body(agent, operation, args))
    }

    /// Signs, submits and waits (up to 240 s) for a command to `agent`.
    pub async fn send(
        &self,
        client: &dbvmctl::Client,
        agent: &AgentProc,
        operation: &str,
        args: serde_json::Value,
    ) -> dbvm_protocol::api::CommandView {
        let cmd = self.sign(&agent.id, operation, args);
        let v = client.submit(&cmd).await.expect("submit");
        client
            .wait(v.id, Duration::from_secs(240))
            .await
            .expect("wait")
    }

    /// [`Self::send`], asserting success (the agent's log tail on failure); the output.
    pub async fn send_ok(
        &self,
        client: &dbvmctl::Client,
        agent: &AgentProc,
        operation: &str,
        args: serde_json::Value,
    ) -> serde_json::Value {
        let v = self.send(client, agent, operation, args.clone()).await;
        assert_eq!(
            v.state,
            dbvm_protocol::api::CommandState::Succeeded,
            "{operation} {args} did not succeed: {:?}\n{}",
            v.error,
            agent.proc.log_tail()
        );
        v.output.expect("output")
    }
}

/// An API client presenting `identity` (or no certificate at all).
pub fn client_as(url: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> dbvmctl::Client {
    let tls = dbvm_protocol::tls::client_config(ca_pem, identity).expect("TLS config");
    dbvmctl::Client::new(url, tls).expect("API client")
}

/// A path as a TOML basic string.
pub fn toml_path(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}
