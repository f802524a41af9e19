//! Broker configuration: one TOML file, parsed and validated before anything binds.

use dbvm_protocol::command::TrustedKeys;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0} is invalid: {1}")]
    Parse(PathBuf, String),
    #[error("config key {key}: {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("config key {key}: cannot read {path}: {source}")]
    File {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config key {key}: {problem}")]
    Tls { key: &'static str, problem: String },
    #[error("config key trusted_keys[{index}].{field}: {problem}")]
    TrustedKey {
        index: usize,
        field: &'static str,
        problem: String,
    },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where agents connect (mTLS).
    pub agent_listen: SocketAddr,
    /// Where control planes connect (HTTPS, client certificates).
    pub api_listen: SocketAddr,
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    /// Control-plane public keys: a command is stored only when one of them signed it,
    /// so nobody without the signing key can take a command id (the agent checks the
    /// signature again before it runs the command).
    #[serde(default)]
    pub trusted_keys: Vec<TrustedKey>,
    #[serde(default)]
    pub agents: AgentSettings,
    #[serde(default)]
    pub limits: Limits,
    /// Caps and the handshake timeout of the two TLS listeners (`[listeners.agent]`,
    /// `[listeners.api]`); see [`Config::listener_limits`].
    #[serde(default)]
    pub listeners: Listeners,
    #[serde(default)]
    pub log: LogSettings,
    /// `[artifacts]`: the files control planes upload for agents (new agent binaries).
    #[serde(default)]
    pub artifacts: ArtifactSettings,
    /// `[bundles]`: the log bundles agents upload (see `bundles.rs`).
    #[serde(default)]
    pub bundles: BundleSettings,
    /// `[events]`: the durable event log `GET /v1/events` resumes from.
    #[serde(default)]
    pub events: EventSettings,
    /// The file this config was read from (set by [`Config::load`]), for the broker's own
    /// bundle.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundleSettings {
    /// Largest single bundle stored, in bytes (compressed, as uploaded).
    pub max_bytes: u64,
    /// Every bundle stored together; the oldest go first when a new one needs the room.
    pub max_total_bytes: u64,
    /// Bundles older than this are removed.
    pub max_age_hours: u32,
    /// A directory of the broker's own log files (every regular file in it), for its own
    /// bundle where journald does not run.
    pub log_dir: Option<PathBuf>,
    /// `[bundles.s3]`: a bucket every complete bundle is copied to as well.
    pub s3: Option<BundleS3Settings>,
}

/// `[bundles.s3]`: where the broker copies complete bundles. The keys are read from
/// files (one value each, like systemd credentials), never from this file, so the config
/// can be shown and bundled whole.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleS3Settings {
    /// `https://host[:port]`: S3 traffic travels over TLS only.
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "BundleS3Settings::default_region")]
    pub region: String,
    /// The folder in the bucket; a bundle is `<prefix>/<agent>/<id>.tar.zst`.
    #[serde(default = "BundleS3Settings::default_prefix")]
    pub prefix: String,
    /// PEM of the CA that signed the endpoint's certificate; the system's roots when absent.
    pub ca_file: Option<PathBuf>,
    pub access_key_id_file: PathBuf,
    /// Must not be readable by group or others.
    pub secret_access_key_file: PathBuf,
}

impl BundleS3Settings {
    fn default_region() -> String {
        "us-east-1".into()
    }
    fn default_prefix() -> String {
        "dbvm-bundles".into()
    }

    /// Checks every key and reads the files: where the broker's S3 client points.
    pub fn open(&self) -> Result<dbvm_s3::Endpoint, ConfigError> {
        let invalid =
            |key: &'static str| move |problem: String| ConfigError::Invalid { key, problem };
        let (host, port) =
            dbvm_s3::parse_endpoint(&self.endpoint).map_err(invalid("bundles.s3.endpoint"))?;
        dbvm_s3::check_bucket(&self.bucket).map_err(invalid("bundles.s3.bucket"))?;
        dbvm_s3::check_region(&self.region).map_err(invalid("bundles.s3.region"))?;
        dbvm_s3::check_prefix(&self.prefix).map_err(invalid("bundles.s3.prefix"))?;
        let read = |key: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ConfigError::File {
                key,
                path: path.to_path_buf(),
                source,
            })
        };
        let ca_pem = match &self.ca_file {
            None => None,
            Some(path) => {
                let pem = read("bundles.s3.ca_file", path)?;
                dbvm_s3::check_ca(&pem).map_err(|e| ConfigError::Invalid {
                    key: "bundles.s3.ca_file",
                    problem: format!("{}: {e}", path.display()),
                })?;
                Some(pem)
            }
        };
        let key = |name: &'static str, path: &Path| -> Result<dbvm_s3::Secret, ConfigError> {
            let text = dbvm_s3::Secret::new(read(name, path)?);
            let value = text.expose().trim_end_matches(['\n', '\r']);
            if value.is_empty() || value.len() > 256 || value.contains(['\n', '\r']) {
                return Err(ConfigError::Invalid {
                    key: name,
                    problem: format!(
                        "{} must hold one value of 1 to 256 characters on one line",
                        path.display()
                    ),
                });
            }
            Ok(dbvm_s3::Secret::new(value))
        };
        let secret_file = &self.secret_access_key_file;
        if let Ok(m) = std::fs::metadata(secret_file) {
            use std::os::unix::fs::PermissionsExt;
            if m.permissions().mode() & 0o077 != 0 {
                return Err(ConfigError::Invalid {
                    key: "bundles.s3.secret_access_key_file",
                    problem: format!(
                        "{} is readable by group or others (mode {:o}): chmod 600 it",
                        secret_file.display(),
                        m.permissions().mode() & 0o777
                    ),
                });
            }
        }
        Ok(dbvm_s3::Endpoint {
            host,
            port,
            bucket: self.bucket.clone(),
            region: self.region.clone(),
            prefix: self.prefix.clone(),
            ca_pem,
            access_key_id: key("bundles.s3.access_key_id_file", &self.access_key_id_file)?,
            secret_access_key: key("bundles.s3.secret_access_key_file", secret_file)?,
        })
    }
}

impl BundleSettings {
    const GIB: u64 = 1024 * 1024 * 1024;
    /// Bounds of `bundles.max_bytes` and `bundles.max_total_bytes`: 64 KiB (tests) to 1 TiB.
    pub const BYTES_RANGE: std::ops::RangeInclusive<u64> = 64 * 1024..=1024 * Self::GIB;
    /// Bounds of `bundles.max_age_hours`: an hour to a year.
    pub const AGE_RANGE: std::ops::RangeInclusive<u32> = 1..=8760;
}

impl Default for BundleSettings {
    fn default() -> Self {
        Self {
            max_bytes: 4 * Self::GIB,
            max_total_bytes: 20 * Self::GIB,
            max_age_hours: 7 * 24,
            log_dir: None,
            s3: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArtifactSettings {
    /// Largest artifact accepted by `PUT /v1/artifacts/{sha256}`, in bytes.
    pub max_bytes: u64,
}

impl ArtifactSettings {
    /// An agent binary is ~15 MiB; room for much larger ones without letting one upload
    /// fill the broker's disk.
    pub const DEFAULT_MAX_BYTES: u64 = 128 * 1024 * 1024;
    /// Bounds of `artifacts.max_bytes`: 4 KiB (tests) to 16 GiB.
    pub const MAX_BYTES_RANGE: std::ops::RangeInclusive<u64> = 4096..=16 * 1024 * 1024 * 1024;
}

impl Default for ArtifactSettings {
    fn default() -> Self {
        Self {
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Fleet CA certificate (PEM): client certificates must chain to it.
    pub ca_cert: PathBuf,
    /// Fleet CA key (PEM): signs agent certificates at enrollment and renewal.
    pub ca_key: PathBuf,
    /// The broker's server certificate and key (PEM).
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// One `[[trusted_keys]]` entry, as `dbvmctl keygen` prints it (the agent's are the same).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    pub key_id: String,
    /// base64 ed25519 public key.
    pub public_key: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    /// Lifetime of agent certificates; agents renew after two thirds of it.
    pub cert_lifetime_seconds: u64,
    /// How often agents send a heartbeat.
    pub heartbeat_interval_ms: u32,
    /// A connection with no frame for this many intervals is closed.
    pub missed_heartbeats: u32,
    /// Longest accepted enrollment token lifetime.
    pub max_token_ttl_seconds: u64,
    /// Largest frame accepted from an agent.
    pub max_frame_bytes: usize,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            cert_lifetime_seconds: 24 * 3600,
            heartbeat_interval_ms: 10_000,
            missed_heartbeats: 3,
            max_token_ttl_seconds: 24 * 3600,
            max_frame_bytes: dbvm_protocol::frame::MAX_FRAME_LEN,
        }
    }
}

/// `[events]`: how much of the event log the broker keeps for subscribers that were away
/// (`GET /v1/events` with `Last-Event-ID`). An event goes when either bound is passed;
/// a subscriber asking for an event gone is told so (a `dropped` event) and re-lists.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventSettings {
    /// Newest events kept.
    pub keep: u64,
    /// Events older than this many hours go.
    pub max_age_hours: u64,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            keep: 500_000,
            max_age_hours: 7 * 24,
        }
    }
}

impl EventSettings {
    pub const KEEP_RANGE: std::ops::RangeInclusive<u64> = 1..=100_000_000;
    pub const AGE_RANGE: std::ops::RangeInclusive<u64> = 1..=24 * 366;
}

/// Admission limits by operation class (DSM seed: 8+2 deployments, 8 management,
/// 5 backups, 5 log uploads).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub deployments_running: u32,
    pub deployments_waiting: u32,
    pub management_running: u32,
    pub backups_running: u32,
    pub log_uploads_running: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deployments_running: 8,
            deployments_waiting: 2,
            management_running: 8,
            backups_running: 5,
            log_uploads_running: 5,
        }
    }
}

pub use dbvm_host::logging::{LogFormat, LogSettings};

/// `[listeners.agent]` and `[listeners.api]`: each key left out takes that listener's
/// default (see [`ListenerLimits::AGENT`] and [`ListenerLimits::API`]).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    pub agent: ListenerSection,
    pub api: ListenerSection,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerSection {
    /// Connections open at once; at the cap, new ones wait in the kernel's backlog.
    pub max_connections: Option<u32>,
    /// TLS handshakes in progress at once; at the cap, accepted connections wait for a slot.
    pub max_handshakes: Option<u32>,
    /// How long a connection may take to finish its TLS handshake (on the agent port also
    /// to send its first frame) before it is closed.
    pub handshake_timeout_ms: Option<u64>,
}

/// The resolved limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    pub max_connections: u32,
    pub max_handshakes: u32,
    pub handshake_timeout: std::time::Duration,
}

impl ListenerLimits {
    /// The agent port: a fleet of 10,000 agents with room to spare (the systemd unit allows
    /// 65,536 open files), and handshakes enough for a fleet reconnecting after a restart
    /// (each takes a millisecond or two of CPU) without letting a flood of half-open
    /// connections take every slot for long.
    pub const AGENT: Self = Self {
        max_connections: 20_000,
        max_handshakes: 256,
        handshake_timeout: std::time::Duration::from_secs(10),
    };
    /// The API port: a few control planes, each with a handful of connections and event
    /// streams.
    pub const API: Self = Self {
        max_connections: 1_024,
        max_handshakes: 64,
        handshake_timeout: std::time::Duration::from_secs(10),
    };

    fn resolve(
        section: &ListenerSection,
        defaults: Self,
        keys: [&'static str; 3],
    ) -> Result<Self, ConfigError> {
        let limits = Self {
            max_connections: section.max_connections.unwrap_or(defaults.max_connections),
            max_handshakes: section.max_handshakes.unwrap_or(defaults.max_handshakes),
            handshake_timeout: section
                .handshake_timeout_ms
                .map_or(defaults.handshake_timeout, std::time::Duration::from_millis),
        };
        // Tokio's semaphore holds at most usize::MAX >> 3 permits; far below that, a
        // cap above a million connections is a typo, not a plan.
        if !(1..=1_000_000).contains(&limits.max_connections) {
            return Err(ConfigError::Invalid {
                key: keys[0],
                problem: "must be between 1 and 1000000".into(),
            });
        }
        if limits.max_handshakes < 1 || limits.max_handshakes > limits.max_connections {
            return Err(ConfigError::Invalid {
                key: keys[1],
                problem: format!(
                    "must be between 1 and max_connections ({})",
                    limits.max_connections
                ),
            });
        }
        if !(100..=600_000).contains(&limits.handshake_timeout.as_millis()) {
            return Err(ConfigError::Invalid {
                key: keys[2],
                problem: "must be between 100 and 600000".into(),
            });
        }
        Ok(limits)
    }
}

/// PEM texts read from the files named in [`TlsFiles`], checked to build.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let mut config: Self = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))?;
        config.validate()?;
        config.file = Some(path.to_path_buf());
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.command_keys()?;
        let a = &self.agents;
        if a.cert_lifetime_seconds < 3 {
            return Err(ConfigError::Invalid {
                key: "agents.cert_lifetime_seconds",
                problem: "must be at least 3".into(),
            });
        }
        if !(100..=600_000).contains(&a.heartbeat_interval_ms) {
            return Err(ConfigError::Invalid {
                key: "agents.heartbeat_interval_ms",
                problem: "must be between 100 and 600000".into(),
            });
        }
        if a.missed_heartbeats < 2 {
            return Err(ConfigError::Invalid {
                key: "agents.missed_heartbeats",
                problem: "must be at least 2".into(),
            });
        }
        if !(4096..=dbvm_protocol::frame::MAX_FRAME_LEN).contains(&a.max_frame_bytes) {
            return Err(ConfigError::Invalid {
                key: "agents.max_frame_bytes",
                problem: format!(
                    "must be between 4096 and {}",
                    dbvm_protocol::frame::MAX_FRAME_LEN
                ),
            });
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.deployments_running", l.deployments_running),
            ("limits.management_running", l.management_running),
            ("limits.backups_running", l.backups_running),
            ("limits.log_uploads_running", l.log_uploads_running),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    problem: "must be at least 1".into(),
                });
            }
        }
        self.listener_limits()?;
        let e = &self.events;
        for (key, v, range) in [
            ("events.keep", e.keep, EventSettings::KEEP_RANGE),
            (
                "events.max_age_hours",
                e.max_age_hours,
                EventSettings::AGE_RANGE,
            ),
        ] {
            if !range.contains(&v) {
                return Err(ConfigError::Invalid {
                    key,
                    problem: format!("{v} is outside {}..={}", range.start(), range.end()),
                });
            }
        }
        let b = &self.bundles;
        for (key, v) in [
            ("bundles.max_bytes", b.max_bytes),
            ("bundles.max_total_bytes", b.max_total_bytes),
        ] {
            if !BundleSettings::BYTES_RANGE.contains(&v) {
                return Err(ConfigError::Invalid {
                    key,
                    problem: format!(
                        "{v} is outside {}..={} bytes",
                        BundleSettings::BYTES_RANGE.start(),
                        BundleSettings::BYTES_RANGE.end()
                    ),
                });
            }
        }
        if b.max_bytes > b.max_total_bytes {
            return Err(ConfigError::Invalid {
                key: "bundles.max_bytes",
                problem: format!(
                    "{} is more than bundles.max_total_bytes ({}): no bundle that large could be kept",
                    b.max_bytes, b.max_total_bytes
                ),
            });
        }
        if !BundleSettings::AGE_RANGE.contains(&b.max_age_hours) {
            return Err(ConfigError::Invalid {
                key: "bundles.max_age_hours",
                problem: format!("{} is outside 1..=8760 hours", b.max_age_hours),
            });
        }
        if let Some(s3) = &b.s3 {
            s3.open()?;
        }
        if !ArtifactSettings::MAX_BYTES_RANGE.contains(&self.artifacts.max_bytes) {
            return Err(ConfigError::Invalid {
                key: "artifacts.max_bytes",
                problem: format!(
                    "must be between {} and {}",
                    ArtifactSettings::MAX_BYTES_RANGE.start(),
                    ArtifactSettings::MAX_BYTES_RANGE.end()
                ),
            });
        }
        self.log
            .validate()
            .map_err(|problem| ConfigError::Invalid {
                key: "log.level",
                problem,
            })?;
        if self.agent_listen == self.api_listen && self.agent_listen.port() != 0 {
            return Err(ConfigError::Invalid {
                key: "api_listen",
                problem: "must differ from agent_listen".into(),
            });
        }
        Ok(())
    }

    /// The keys of `[[trusted_keys]]`, each checked against its key id.
    pub fn command_keys(&self) -> Result<TrustedKeys, ConfigError> {
        if self.trusted_keys.is_empty() {
            return Err(ConfigError::Invalid {
                key: "trusted_keys",
                problem: "no control-plane public key is trusted, so every command would be refused; \
                          add the [[trusted_keys]] entry (key_id and public_key) that `dbvmctl keygen` printed \
                          (the public key only: the broker never holds a signing key)"
                    .into(),
            });
        }
        let mut keys = TrustedKeys::new();
        for (index, k) in self.trusted_keys.iter().enumerate() {
            keys.add_entry(&k.key_id, &k.public_key)
                .map_err(|e| ConfigError::TrustedKey {
                    index,
                    field: e.field(),
                    problem: e.to_string(),
                })?;
        }
        Ok(keys)
    }

    /// The limits of the agent and the API listener, defaults filled in and checked.
    pub fn listener_limits(&self) -> Result<(ListenerLimits, ListenerLimits), ConfigError> {
        let agent = ListenerLimits::resolve(
            &self.listeners.agent,
            ListenerLimits::AGENT,
            [
                "listeners.agent.max_connections",
                "listeners.agent.max_handshakes",
                "listeners.agent.handshake_timeout_ms",
            ],
        )?;
        let api = ListenerLimits::resolve(
            &self.listeners.api,
            ListenerLimits::API,
            [
                "listeners.api.max_connections",
                "listeners.api.max_handshakes",
                "listeners.api.handshake_timeout_ms",
            ],
        )?;
        Ok((agent, api))
    }

    /// Reads and checks the TLS files (each error names its key).
    pub fn tls_material(&self) -> Result<TlsMaterial, ConfigError> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ConfigError::File {
                key,
                path: path.to_path_buf(),
                source,
            })
        };
        let m = TlsMaterial {
            ca_cert_pem: read("tls.ca_cert", &self.tls.ca_cert)?,
            ca_key_pem: read("tls.ca_key", &self.tls.ca_key)?,
            server_cert_pem: read("tls.server_cert", &self.tls.server_cert)?,
            server_key_pem: read("tls.server_key", &self.tls.server_key)?,
        };
        dbvm_protocol::pki::FleetCa::load(&m.ca_cert_pem, &m.ca_key_pem).map_err(|e| {
            ConfigError::Tls {
                key: "tls.ca_key",
                problem: format!("CA certificate and key do not load together: {e}"),
            }
        })?;
        dbvm_protocol::tls::server_config(
            &m.server_cert_pem,
            &m.server_key_pem,
            &m.ca_cert_pem,
            dbvm_protocol::tls::ClientAuth::Optional,
        )
        .map_err(|e| ConfigError::Tls {
            key: "tls.server_cert",
            problem: e.to_string(),
        })?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TLS: &str = r#"
agent_listen = "127.0.0.1:0"
api_listen = "127.0.0.1:0"
data_dir = "/tmp/x"
[tls]
ca_cert = "a"
ca_key = "b"
server_cert = "c"
server_key = "d"
"#;

    fn key_entry() -> (dbvm_protocol::command::PublicKeyFile, String) {
        let signer = dbvm_protocol::command::CommandSigner::generate();
        let key = dbvm_protocol::command::PublicKeyFile::from_key(&signer.verifying_key());
        let entry = format!(
            "[[trusted_keys]]\nkey_id = \"{}\"\npublic_key = \"{}\"\n",
            key.key_id, key.public_key
        );
        (key, entry)
    }

    #[test]
    fn trusted_keys_are_required_and_each_mistake_names_its_entry() {
        let e = toml::from_str::<Config>(TLS)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config key trusted_keys: "), "{e}");
        assert!(
            e.contains("dbvmctl keygen") && e.contains("public_key"),
            "{e}"
        );

        let (key, entry) = key_entry();
        let (_, second) = key_entry();
        let c: Config = toml::from_str(&format!("{TLS}{entry}{second}")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.command_keys().unwrap().len(), 2);

        let wrong_id = second.replace("ed25519:", "ed25519:00");
        let c: Config = toml::from_str(&format!("{TLS}{entry}{wrong_id}")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("config key trusted_keys[1].key_id: "), "{e}");

        let bad_key = entry.replace(&key.public_key, "AAAA");
        let c: Config = toml::from_str(&format!("{TLS}{bad_key}")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("config key trusted_keys[0].public_key: "),
            "{e}"
        );

        // A signing key has no place here.
        let e = toml::from_str::<Config>(&format!("{TLS}{}secret_key = \"x\"\n", entry))
            .unwrap_err()
            .to_string();
        assert!(e.contains("secret_key"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let (_, entry) = key_entry();
        let base = format!("{TLS}{entry}");
        let c: Config = toml::from_str(&base).unwrap();
        c.validate().unwrap();
        let e = toml::from_str::<Config>(&format!("{base}\n[limits]\nbackups = 3\n")).unwrap_err();
        assert!(e.to_string().contains("backups"), "{e}");
        let c: Config =
            toml::from_str(&format!("{base}\n[limits]\nbackups_running = 0\n")).unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("limits.backups_running"), "{e}");
    }

    #[test]
    fn the_artifact_size_cap_defaults_and_is_checked() {
        let (_, entry) = key_entry();
        let base = format!("{TLS}{entry}");
        let c: Config = toml::from_str(&base).unwrap();
        assert_eq!(c.artifacts.max_bytes, 128 * 1024 * 1024);
        let c: Config =
            toml::from_str(&format!("{base}\n[artifacts]\nmax_bytes = 4096\n")).unwrap();
        c.validate().unwrap();
        for bad in ["0", "4095", "17179869185"] {
            let c: Config =
                toml::from_str(&format!("{base}\n[artifacts]\nmax_bytes = {bad}\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with("config key artifacts.max_bytes: "), "{e}");
        }
        let e = toml::from_str::<Config>(&format!("{base}\n[artifacts]\nmax = 1\n")).unwrap_err();
        assert!(e.to_string().contains("max"), "{e}");
    }
}

#[cfg(test)]
mod listener_tests {
    use super::*;

    fn with(listeners: &str) -> Result<Config, String> {
        let text = format!(
            "agent_listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\n\
             [tls]\nca_cert = \"a\"\nca_key = \"b\"\nserver_cert = \"c\"\nserver_key = \"d\"\n{listeners}"
        );
        toml::from_str(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn listener_limits_default_per_listener_and_name_the_key_when_wrong() {
        let c = with("").unwrap();
        assert_eq!(
            c.listener_limits().unwrap(),
            (ListenerLimits::AGENT, ListenerLimits::API)
        );
        // A key left out keeps that listener's own default.
        let c = with("[listeners.api]\nmax_handshakes = 2\n").unwrap();
        let (agent, api) = c.listener_limits().unwrap();
        assert_eq!(agent, ListenerLimits::AGENT);
        assert_eq!(
            (api.max_handshakes, api.max_connections),
            (2, ListenerLimits::API.max_connections)
        );
        for (section, key) in [
            (
                "[listeners.agent]\nmax_connections = 0\n",
                "listeners.agent.max_connections",
            ),
            (
                "[listeners.agent]\nmax_connections = 10\nmax_handshakes = 11\n",
                "listeners.agent.max_handshakes",
            ),
            (
                "[listeners.api]\nhandshake_timeout_ms = 5\n",
                "listeners.api.handshake_timeout_ms",
            ),
        ] {
            let e = with(section).unwrap().listener_limits().unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("config key {key}: ")),
                "{e}"
            );
        }
        let e = with("[listeners.agent]\nmax_conections = 3\n").unwrap_err();
        assert!(e.contains("max_conections"), "{e}");
    }
}
