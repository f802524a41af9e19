//! Agent configuration: one TOML file, validated (keys, files, addresses) before the
//! agent touches anything. Environment variables starting with `DBVM_AGENT_` override
//! a few keys for first boot (see [`Config::apply_env`]).

use dbvm_protocol::command::TrustedKeys;
use dbvm_protocol::AgentId;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0} is invalid: {1}")]
    Parse(PathBuf, String),
    #[error("config key {key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This VM's agent id (from OVF properties at first boot).
    pub agent_id: String,
    /// Where the agent keeps its key, certificate, sealing key and command journal.
    pub state_dir: PathBuf,
    pub broker: BrokerSettings,
    /// Control-plane keys whose signatures the agent accepts.
    #[serde(default)]
    pub trusted_keys: Vec<TrustedKey>,
    #[serde(default)]
    pub link: LinkSettings,
    #[serde(default)]
    pub log: LogSettings,
    /// The database this VM runs (absent: the agent manages no database, `db.*`
    /// commands are refused as unknown operations).
    #[serde(default)]
    pub database: Option<crate::db::DbSettings>,
    /// The VM's firewall (absent: the agent leaves the firewall alone).
    #[serde(default)]
    pub firewall: Option<crate::firewall::FirewallConfig>,
    /// The twelve health checks (on by default, every 10 s).
    #[serde(default)]
    pub health: crate::health::HealthSettings,
    /// Backups of the database (a capability whenever `[database]` is there; this
    /// section only tunes it).
    #[serde(default)]
    pub backup: crate::backup::BackupSettings,
    /// Log bundles (`bundle.collect`; this section only tunes them).
    #[serde(default)]
    pub bundle: crate::bundle::capability::BundleSettings,
    /// The file this config was read from (set by [`Config::load`]; log bundles include
    /// it, redacted, and check it again).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    /// `host:port` of the broker's agent listener.
    pub address: String,
    /// Name in the broker's certificate; defaults to the host part of `address`.
    pub server_name: Option<String>,
    /// Fleet CA certificate (PEM) that the broker's certificate must chain to.
    pub ca_cert: PathBuf,
    /// File holding a one-time enrollment token (used only while not enrolled).
    pub enrollment_token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    pub key_id: String,
    /// base64 ed25519 public key.
    pub public_key: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkSettings {
    /// First reconnect delay; doubles on each failure (with jitter) up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// On SIGTERM, how long running commands get to finish before they are stopped and
    /// reported interrupted (keep it below systemd's `TimeoutStopSec`).
    pub drain_timeout_s: u64,
}

impl Default for LinkSettings {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 500,
            max_backoff_ms: 30_000,
            drain_timeout_s: 30,
        }
    }
}

pub use dbvm_host::logging::{LogFormat, LogSettings};

/// The configuration after validation: parsed ids and keys.
#[derive(Clone, Debug)]
pub struct Validated {
    pub config: Config,
    pub agent_id: AgentId,
    /// The control-plane keys, each checked against its key id.
    pub keys: TrustedKeys,
    pub server_name: String,
    pub ca_pem: String,
}

/// Keys that no longer exist, with why: refused by name, so a config written for an
/// older agent gets a clear answer instead of serde's generic "unknown field".
const REMOVED_KEYS: &[(&str, &str, &str)] = &[
    (
        "link",
        "insecure_skip_signature_check",
        "no longer exists: the agent always checks command signatures, and no setting turns \
         that off; remove the line (and list the control plane's keys in [[trusted_keys]])",
    ),
    (
        "link",
        "clock_skew_ms",
        "no longer exists: the allowed clock skew is one rule of the protocol (30 s), the \
         same in the broker and every agent, so neither refuses what the other accepts; \
         remove the line and keep the VM's clock synchronised (health check ntp_sync)",
    ),
];

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let mut config = Self::parse(path, &text)?;
        config.file = Some(path.to_path_buf());
        config.apply_env();
        Ok(config)
    }

    /// Parses the text of config file `path`, refusing keys that no longer exist by name first (they are listed with why).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let parse_error =
            |e: toml::de::Error| ConfigError::Parse(path.to_path_buf(), e.to_string());
        let table: toml::Table = toml::from_str(text).map_err(parse_error)?;
        for (section, key, why) in REMOVED_KEYS {
            if let Some(toml::Value::Table(t)) = table.get(*section) {
                if t.contains_key(*key) {
                    return Err(invalid(format!("{section}.{key}"), *why));
                }
            }
        }
        toml::from_str(text).map_err(parse_error)
    }

    /// `DBVM_AGENT_ID`, `DBVM_AGENT_BROKER`, `DBVM_AGENT_ENROLLMENT_TOKEN_FILE`.
    pub fn apply_env(&mut self) {
        if let Ok(v) = std::env::var("DBVM_AGENT_ID") {
            self.agent_id = v;
        }
        if let Ok(v) = std::env::var("DBVM_AGENT_BROKER") {
            self.broker.address = v;
        }
        if let Ok(v) = std::env::var("DBVM_AGENT_ENROLLMENT_TOKEN_FILE") {
            self.broker.enrollment_token_file = Some(PathBuf::from(v));
        }
    }

    pub fn validate(self) -> Result<Validated, ConfigError> {
        let agent_id =
            AgentId::new(self.agent_id.clone()).map_err(|e| invalid("agent_id", e.to_string()))?;
        let (host, port) = self
            .broker
            .address
            .rsplit_once(':')
            .ok_or_else(|| invalid("broker.address", "must be host:port"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(invalid(
                "broker.address",
                format!("{:?} is not host:port", self.broker.address),
            ));
        }
        let server_name = self.broker.server_name.clone().unwrap_or_else(|| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        });
        rustls::pki_types::ServerName::try_from(server_name.clone())
            .map_err(|e| invalid("broker.server_name", format!("{server_name:?}: {e}")))?;
        let ca_pem = std::fs::read_to_string(&self.broker.ca_cert).map_err(|e| {
            invalid(
                "broker.ca_cert",
                format!("cannot read {}: {e}", self.broker.ca_cert.display()),
            )
        })?;
        dbvm_protocol::tls::roots_from_pem(&ca_pem)
            .map_err(|e| invalid("broker.ca_cert", e.to_string()))?;
        if self.trusted_keys.is_empty() {
            return Err(invalid(
                "trusted_keys",
                "no control-plane key is trusted, so no command could ever run; add the [[trusted_keys]] that `dbvmctl keygen` printed",
            ));
        }
        // The same checks as the broker's (protocol::command::TrustedKeys::add_entry).
        let mut keys = TrustedKeys::new();
        for (i, k) in self.trusted_keys.iter().enumerate() {
            keys.add_entry(&k.key_id, &k.public_key)
                .map_err(|e| invalid(format!("trusted_keys[{i}].{}", e.field()), e.to_string()))?;
        }
        let l = &self.link;
        if l.initial_backoff_ms == 0 || l.max_backoff_ms < l.initial_backoff_ms {
            return Err(invalid(
                "link.max_backoff_ms",
                "initial_backoff_ms must be > 0 and max_backoff_ms at least as large",
            ));
        }
        if !(1..=3600).contains(&l.drain_timeout_s) {
            return Err(invalid(
                "link.drain_timeout_s",
                "must be between 1 and 3600 seconds",
            ));
        }
        self.log.validate().map_err(|p| invalid("log.level", p))?;
        if let Some(db) = &self.database {
            db.validate().map_err(|(k, p)| invalid(k, p))?;
        }
        self.health.validate().map_err(|(k, p)| invalid(k, p))?;
        self.backup.validate().map_err(|(k, p)| invalid(k, p))?;
        self.bundle.validate().map_err(|(k, p)| invalid(k, p))?;
        if let Some(fw) = &self.firewall {
            fw.validate().map_err(|e| match e {
                crate::firewall::FirewallError::Config { key, problem } => invalid(key, problem),
                other => invalid("firewall", other.to_string()),
            })?;
        }
        Ok(Validated {
            config: self,
            agent_id,
            keys,
            server_name,
            ca_pem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, keys: &str) -> String {
        let ca =
            dbvm_protocol::pki::FleetCa::generate("t", std::time::Duration::from_secs(60)).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
        format!(
            "agent_id = \"db1\"\nstate_dir = \"{d}/state\"\n[broker]\naddress = \"localhost:7443\"\nca_cert = \"{d}/ca.crt\"\n{keys}",
            d = dir.display()
        )
    }

    fn check(text: &str) -> Result<Validated, ConfigError> {
        Config::parse(Path::new("x"), text).and_then(Config::validate)
    }

    #[test]
    fn a_good_config_validates_and_each_mistake_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let signer = dbvm_protocol::command::CommandSigner::generate();
        let key = dbvm_protocol::command::PublicKeyFile::from_key(&signer.verifying_key());
        let keys = format!(
            "[[trusted_keys]]\nkey_id = \"{}\"\npublic_key = \"{}\"\n",
            key.key_id, key.public_key
        );
        let good = config(dir.path(), &keys);
        let v = check(&good).unwrap();
        assert_eq!(v.server_name, "localhost");
        assert_eq!(v.keys.len(), 1);

        let e = check(&config(dir.path(), "")).unwrap_err().to_string();
        assert!(e.contains("trusted_keys"), "{e}");
        let wrong_id = keys.replace(&key.key_id, "ed25519:0000000000000000");
        let e = check(&config(dir.path(), &wrong_id))
            .unwrap_err()
            .to_string();
        assert!(e.contains("trusted_keys[0].key_id"), "{e}");
        let e = check(&good.replace("agent_id = \"db1\"", "agent_id = \"DB 1\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent_id"), "{e}");
        let e = check(&good.replace("localhost:7443", "localhost"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker.address"), "{e}");
        let e = check(&good.replace("ca.crt", "missing.crt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker.ca_cert"), "{e}");
        let e = check(&format!("{good}\nsurprise = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("surprise"), "{e}");
    }

    /// No setting turns signature checks off: the old switch is refused by name, with
    /// or without trusted keys, whatever its value.
    #[test]
    fn the_removed_signature_switch_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let signer = dbvm_protocol::command::CommandSigner::generate();
        let key = dbvm_protocol::command::PublicKeyFile::from_key(&signer.verifying_key());
        let keys = format!(
            "[[trusted_keys]]\nkey_id = \"{}\"\npublic_key = \"{}\"\n",
            key.key_id, key.public_key
        );
        for (keys, value) in [
            ("", "true"),
            (keys.as_str(), "true"),
            (keys.as_str(), "false"),
        ] {
            let text = format!(
                "{}[link]\ninsecure_skip_signature_check = {value}\n",
                config(dir.path(), keys)
            );
            let e = check(&text).unwrap_err().to_string();
            assert!(
                e.starts_with("config key link.insecure_skip_signature_check: no longer exists"),
                "{e}"
            );
        }
        // The clock skew is the protocol's, the broker's and the agent's alike.
        let text = format!(
            "{}[link]\nclock_skew_ms = 600000\n",
            config(dir.path(), &keys)
        );
        let e = check(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("config key link.clock_skew_ms: no longer exists"),
            "{e}"
        );
    }
}
