//! The throw-away fleet of one run: a CA, the broker's server certificate, a
//! control-plane client certificate, a command signer, one client certificate per
//! simulated agent, the broker's config file, and the pre-signed commands.
//!
//! Everything here is made before the broker starts and before this process pins itself
//! to one core, so it may use every core; none of it is inside a timed phase.

use anyhow::{Context, Result};
use bytes::Bytes;
use dbvm_protocol::api::SubmitCommand;
use dbvm_protocol::command::{CommandSigner, PublicKeyFile, BODY_FORMAT};
use dbvm_protocol::pki::{CertifiedKey, FleetCa, Identity};
use dbvm_protocol::{AgentId, CommandBody};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// One simulated agent's identity (PEM, as the CA issues it).
pub struct AgentCert {
    pub id: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub ca_cert_path: PathBuf,
    pub control_plane: CertifiedKey,
    pub signer: CommandSigner,
    pub agents: Vec<AgentCert>,
    pub broker_config: PathBuf,
    /// Wall time to issue the agent certificates, and the threads used.
    pub issue_secs: f64,
    pub issue_threads: usize,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("dir", &self.dir.path())
            .field("agents", &self.agents.len())
            .finish_non_exhaustive()
    }
}

/// Agent ids: `bench-00000`, `bench-00001`, ...
pub fn agent_id(i: usize) -> String {
    format!("bench-{i:05}")
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A TOML string literal (quoted and escaped) for a path.
fn toml_path(path: &Path) -> String {
    toml_str(&path.display().to_string())
}

/// A TOML string literal (quoted and escaped).
pub fn toml_str(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

impl Fleet {
    /// Creates the fleet in a new temporary directory under `parent` (or the system's).
    pub fn create(
        agents: usize,
        parent: Option<&Path>,
        heartbeat_interval_ms: u32,
    ) -> Result<Self> {
        let dir = match parent {
            Some(p) => tempfile::Builder::new()
                .prefix("relay-bench-")
                .tempdir_in(p),
            None => tempfile::Builder::new().prefix("relay-bench-").tempdir(),
        }
        .context("cannot create the temporary fleet directory")?;
        let ca = FleetCa::generate("relay-bench CA", CERT_LIFETIME)
            .context("cannot create the fleet CA")?;
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()], CERT_LIFETIME)
            .context("cannot issue the broker's server certificate")?;
        let control_plane = ca
            .issue_client(&Identity::ControlPlane("bench".into()), CERT_LIFETIME)
            .context("cannot issue the control-plane certificate")?;
        let d = dir.path();
        let ca_cert_path = d.join("ca.crt");
        write(&ca_cert_path, ca.cert_pem())?;
        write(&d.join("ca.key"), &ca.key_pem())?;
        write(&d.join("broker.crt"), &server.cert_pem)?;
        write(&d.join("broker.key"), &server.key_pem)?;
        let broker_config = d.join("broker.toml");
        let signer = CommandSigner::generate();
        // The broker checks every submitted command against the control plane's public
        // key, as in production (that cost is part of what the bench measures).
        let public = PublicKeyFile::from_key(&signer.verifying_key());
        let config = format!(
            "agent_listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\ndata_dir = {data}\n\n\
             [tls]\nca_cert = {ca_cert}\nca_key = {ca_key}\nserver_cert = {cert}\nserver_key = {key}\n\n\
             [[trusted_keys]]\nkey_id = {kid}\npublic_key = {pk}\n\n\
             [agents]\nheartbeat_interval_ms = {heartbeat_interval_ms}\n",
            data = toml_path(&d.join("broker-data")),
            ca_cert = toml_path(&ca_cert_path),
            ca_key = toml_path(&d.join("ca.key")),
            cert = toml_path(&d.join("broker.crt")),
            key = toml_path(&d.join("broker.key")),
            kid = toml_str(&public.key_id),
            pk = toml_str(&public.public_key),
        );
        write(&broker_config, &config)?;

        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = Instant::now();
        let certs = issue_agent_certs(ca.cert_pem(), &ca.key_pem(), agents, threads)?;
        let issue_secs = started.elapsed().as_secs_f64();
        Ok(Self {
            dir,
            ca_pem: ca.cert_pem().to_string(),
            ca_cert_path,
            control_plane,
            signer,
            agents: certs,
            broker_config,
            issue_secs,
            issue_threads: threads,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Issues `n` agent certificates, each with its own fresh P-256 key, on `threads`
/// threads. Each thread loads its own copy of the CA (a reloaded CA issues certificates
/// that chain to the same root), so `FleetCa` need not be shared between threads.
fn issue_agent_certs(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    n: usize,
    threads: usize,
) -> Result<Vec<AgentCert>> {
    let threads = threads.clamp(1, n.max(1));
    let mut parts: Vec<Vec<(usize, AgentCert)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<Vec<(usize, AgentCert)>> {
                    let ca = FleetCa::load(ca_cert_pem, ca_key_pem)
                        .context("cannot reload the fleet CA")?;
                    (t..n)
                        .step_by(threads)
                        .map(|i| {
                            let id = agent_id(i);
                            let agent = AgentId::new(id.clone())
                                .with_context(|| format!("agent id {id}"))?;
                            let ck = ca
                                .issue_client(&Identity::Agent(agent), CERT_LIFETIME)
                                .with_context(|| format!("cannot issue the certificate of {id}"))?;
                            Ok((
                                i,
                                AgentCert {
                                    id,
                                    cert_pem: ck.cert_pem,
                                    key_pem: ck.key_pem,
                                },
                            ))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a certificate thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut all: Vec<(usize, AgentCert)> = parts.drain(..).flatten().collect();
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, c)| c).collect())
}

/// A small signed `ping` for `agent`, valid from now for `lifetime_ms`.
pub fn ping_body(agent: &str, lifetime_ms: i64) -> CommandBody {
    let now = dbvm_protocol::now_ms();
    CommandBody {
        format: BODY_FORMAT,
        id: uuid::Uuid::new_v4(),
        agent_id: agent.to_string(),
        issued_at_ms: now,
        not_after_ms: now + lifetime_ms,
        operation: "ping".into(),
        args_json: "{}".into(),
        reply_key: None,
    }
}

/// The JSON body of `POST /v1/commands` for one signed command.
pub fn submit_body(signer: &CommandSigner, body: &CommandBody) -> Result<Bytes> {
    let req = SubmitCommand {
        signed_command: signer.sign(body).to_base64(),
    };
    Ok(Bytes::from(
        serde_json::to_vec(&req).context("cannot encode a submission")?,
    ))
}

/// Signs `m` pings spread round-robin over `agents` (command i goes to agent i mod N),
/// on every core, and returns the request bodies ready to send. Signing happens here,
/// before any timed phase, so its cost never shows in the latencies.
pub fn presign(
    signer: &CommandSigner,
    agents: &[String],
    m: usize,
    lifetime_ms: i64,
) -> Result<Vec<Bytes>> {
    anyhow::ensure!(
        !agents.is_empty() || m == 0,
        "commands need at least one agent"
    );
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, m.max(1));
    let seed = signer.seed();
    let mut parts: Vec<Vec<(usize, Bytes)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<Vec<(usize, Bytes)>> {
                    let signer = CommandSigner::from_seed(seed);
                    (t..m)
                        .step_by(threads)
                        .map(|i| {
                            Ok((
                                i,
                                submit_body(
                                    &signer,
                                    &ping_body(&agents[i % agents.len()], lifetime_ms),
                                )?,
                            ))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a signing thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut all: Vec<(usize, Bytes)> = parts.drain(..).flatten().collect();
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, b)| b).collect())
}
