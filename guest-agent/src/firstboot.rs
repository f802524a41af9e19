//! First boot: who this VM is and where its broker is come from the OVF environment the
//! deployment filled — VMware Tools' `guestinfo.ovfEnv` (read with `vmware-rpctool`), or an
//! `ovf-env.xml` file (other hypervisors put it on a CD-ROM) — and become the agent's
//! config. The package's config names no VM (`agent_id = ""`): while it does, the agent
//! runs first boot before anything else.
//!
//! Everything is read and checked before anything is written; a missing, malformed or
//! incomplete environment names the property and writes nothing, and first boot tries
//! again. The fleet CA and the one-time token go to files beside the config, then the
//! config is written (atomically, last: it is the commit point — a crash before it leaves
//! the package's config, and first boot runs again). The token file is removed once the
//! agent has enrolled ([`crate::link`]); a reboot finds the config filled and the
//! identity enrolled, and does neither again.
//!
//! Properties (`oe:key` in the environment's `PropertySection`):
//! `dbvm.agent_id`, `dbvm.broker_address` (`host:port`), `dbvm.fleet_ca` (PEM, or base64
//! of the PEM: a vApp property is one line), `dbvm.enrollment_token`,
//! `dbvm.trusted_keys` (`key_id:public_key[,key_id:public_key…]`, as `dbvmctl keygen`
//! prints them), and optionally `dbvm.broker_server_name`.

use base64::Engine;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The OVF environment's namespace (the `oe:` prefix).
const OE: &str = "http://schemas.dmtf.org/ovf/environment/1";

pub const AGENT_ID: &str = "dbvm.agent_id";
pub const BROKER_ADDRESS: &str = "dbvm.broker_address";
pub const BROKER_SERVER_NAME: &str = "dbvm.broker_server_name";
pub const FLEET_CA: &str = "dbvm.fleet_ca";
pub const ENROLLMENT_TOKEN: &str = "dbvm.enrollment_token";
pub const TRUSTED_KEYS: &str = "dbvm.trusted_keys";

/// Why first boot cannot finish (yet). Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum FirstBootError {
    #[error("no OVF environment: {0}")]
    NoEnvironment(String),
    #[error("the OVF environment from {source_name} is not valid XML: {problem}")]
    Malformed {
        source_name: String,
        problem: String,
    },
    #[error("the OVF environment from {source_name} lacks the property {key}")]
    Missing {
        source_name: String,
        key: &'static str,
    },
    #[error("the OVF property {key} is not usable: {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("the config file {0} cannot be read as TOML: {1}")]
    Config(PathBuf, String),
}

/// Where the environment may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `vmware-rpctool 'info-get guestinfo.ovfEnv'` (VMware Tools).
    RpcTool,
    /// An `ovf-env.xml` file.
    File(PathBuf),
}

impl Source {
    /// The sources tried when none is named: VMware Tools, then the files other
    /// hypervisors' CD-ROMs hold once mounted.
    pub fn defaults() -> Vec<Source> {
        vec![
            Source::RpcTool,
            Source::File("/media/cdrom/ovf-env.xml".into()),
            Source::File("/mnt/cdrom/ovf-env.xml".into()),
        ]
    }

    fn name(&self) -> String {
        match self {
            Source::RpcTool => "guestinfo.ovfEnv (vmware-rpctool)".into(),
            Source::File(p) => p.display().to_string(),
        }
    }

    fn read(&self) -> Result<Option<String>, String> {
        match self {
            Source::RpcTool => {
                let out = match std::process::Command::new("vmware-rpctool")
                    .arg("info-get guestinfo.ovfEnv")
                    .output()
                {
                    Ok(o) => o,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(format!("vmware-rpctool: {e}")),
                };
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Ok((out.status.success() && !text.is_empty()).then_some(text))
            }
            Source::File(p) => match std::fs::read_to_string(p) {
                Ok(t) => Ok(Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", p.display())),
            },
        }
    }
}

/// The first source that has an environment: its name and text.
pub fn read_environment(sources: &[Source]) -> Result<(String, String), FirstBootError> {
    let mut tried = Vec::new();
    for s in sources {
        match s.read() {
            Ok(Some(text)) => return Ok((s.name(), text)),
            Ok(None) => tried.push(format!("{}: none", s.name())),
            Err(e) => tried.push(e),
        }
    }
    Err(FirstBootError::NoEnvironment(tried.join("; ")))
}

/// The `PropertySection`'s key/value pairs.
pub fn properties(
    source_name: &str,
    xml: &str,
) -> Result<BTreeMap<String, String>, FirstBootError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| FirstBootError::Malformed {
        source_name: source_name.into(),
        problem: e.to_string(),
    })?;
    let root = doc.root_element();
    if root.tag_name().name() != "Environment" {
        return Err(FirstBootError::Malformed {
            source_name: source_name.into(),
            problem: format!(
                "the root element is <{}>, not an OVF <Environment>",
                root.tag_name().name()
            ),
        });
    }
    Ok(root
        .descendants()
        .filter(|n| n.tag_name().name() == "Property")
        .filter_map(|n| {
            Some((
                n.attribute((OE, "key"))?.to_string(),
                n.attribute((OE, "value")).unwrap_or("").to_string(),
            ))
        })
        .collect())
}

/// What first boot writes, checked.
#[derive(Debug)]
pub struct Settings {
    pub agent_id: String,
    pub broker_address: String,
    pub broker_server_name: Option<String>,
    pub fleet_ca_pem: String,
    token: dbvm_protocol::seal::Secret,
    pub trusted_keys: Vec<(String, String)>,
}

impl Settings {
    /// Checks every property; the first problem is named.
    pub fn from_properties(
        source_name: &str,
        p: &BTreeMap<String, String>,
    ) -> Result<Self, FirstBootError> {
        let get = |key: &'static str| {
            p.get(key)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| FirstBootError::Missing {
                    source_name: source_name.into(),
                    key,
                })
        };
        let bad = |key: &'static str, problem: String| FirstBootError::Invalid { key, problem };
        let agent_id = get(AGENT_ID)?;
        dbvm_protocol::AgentId::new(agent_id.to_string())
            .map_err(|e| bad(AGENT_ID, e.to_string()))?;
        let broker_address = get(BROKER_ADDRESS)?;
        match broker_address.rsplit_once(':') {
            Some((host, port))
                if !host.is_empty()
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
                    && !host.contains(char::is_whitespace) => {}
            _ => {
                return Err(bad(
                    BROKER_ADDRESS,
                    format!("{broker_address:?} is not host:port"),
                ))
            }
        }
        let ca = get(FLEET_CA)?;
        let fleet_ca_pem = if ca.contains("-----BEGIN CERTIFICATE-----") {
            ca.replace("\\n", "\n")
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(ca.split_whitespace().collect::<String>())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|s| s.contains("-----BEGIN CERTIFICATE-----"))
                .ok_or_else(|| {
                    bad(
                        FLEET_CA,
                        "neither a PEM certificate nor base64 of one".into(),
                    )
                })?
        };
        dbvm_protocol::pki::validity_ms(&fleet_ca_pem)
            .map_err(|e| bad(FLEET_CA, format!("not a usable certificate: {e}")))?;
        let token = get(ENROLLMENT_TOKEN)?;
        if token.len() > 4096 || token.contains(char::is_whitespace) {
            return Err(bad(
                ENROLLMENT_TOKEN,
                "not an enrollment token (one word, as `dbvmctl enroll-token` prints it)".into(),
            ));
        }
        let mut trusted_keys = Vec::new();
        for entry in get(TRUSTED_KEYS)?.split(',') {
            // Key ids hold ':' themselves (`ed25519:…`); base64 never does.
            let (id, key) = entry.trim().rsplit_once(':').ok_or_else(|| {
                bad(
                    TRUSTED_KEYS,
                    format!("{:?} is not key_id:public_key", entry.trim()),
                )
            })?;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(key.trim())
                .map_err(|e| bad(TRUSTED_KEYS, format!("key {id}: not base64: {e}")))?;
            if raw.len() != 32 || id.trim().is_empty() {
                return Err(bad(
                    TRUSTED_KEYS,
                    format!("key {id}: an ed25519 public key is 32 bytes"),
                ));
            }
            trusted_keys.push((id.trim().to_string(), key.trim().to_string()));
        }
        Ok(Self {
            agent_id: agent_id.to_string(),
            broker_address: broker_address.to_string(),
            broker_server_name: p
                .get(BROKER_SERVER_NAME)
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
            fleet_ca_pem,
            token: dbvm_protocol::seal::Secret::new(token),
            trusted_keys,
        })
    }
}

/// Whether the config at `path` still names no VM (the package's default).
pub fn needed(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        .is_some_and(|t| t.get("agent_id").and_then(|v| v.as_str()) == Some(""))
}

/// Writes the CA and the token beside the config, then the config (atomically, last),
/// keeping every other setting it had.
pub fn apply(config_path: &Path, s: &Settings) -> Result<(), FirstBootError> {
    let dir = config_path.parent().unwrap_or(Path::new("/"));
    let text = std::fs::read_to_string(config_path)
        .map_err(|e| FirstBootError::Config(config_path.into(), e.to_string()))?;
    let mut table: toml::Table = toml::from_str(&text)
        .map_err(|e| FirstBootError::Config(config_path.into(), e.to_string()))?;
    let ca_path = dir.join("fleet-ca.crt");
    let token_path = dir.join("enrollment.token");
    let write = |p: &Path, bytes: &[u8], mode| {
        dbvm_host::fs::write_atomic(p, bytes, mode)
            .map_err(|e| FirstBootError::Write(p.to_path_buf(), e))
    };
    write(&ca_path, s.fleet_ca_pem.as_bytes(), 0o644)?;
    write(&token_path, s.token.expose().as_bytes(), 0o600)?;
    use toml::Value;
    table.insert("agent_id".into(), Value::String(s.agent_id.clone()));
    let broker = table
        .entry("broker")
        .or_insert_with(|| Value::Table(Default::default()));
    if let Value::Table(b) = broker {
        b.insert("address".into(), Value::String(s.broker_address.clone()));
        b.insert(
            "ca_cert".into(),
            Value::String(ca_path.display().to_string()),
        );
        b.insert(
            "enrollment_token_file".into(),
            Value::String(token_path.display().to_string()),
        );
        match &s.broker_server_name {
            Some(n) => {
                b.insert("server_name".into(), Value::String(n.clone()));
            }
            None => {
                b.remove("server_name");
            }
        }
    }
    table.insert(
        "trusted_keys".into(),
        Value::Array(
            s.trusted_keys
                .iter()
                .map(|(id, key)| {
                    let mut t = toml::Table::new();
                    t.insert("key_id".into(), Value::String(id.clone()));
                    t.insert("public_key".into(), Value::String(key.clone()));
                    Value::Table(t)
                })
                .collect(),
        ),
    );
    let out = format!(
        "# Written by dbvm-agent at first boot from the VM's OVF properties.\n{}",
        toml::to_string(&table)
            .map_err(|e| FirstBootError::Config(config_path.into(), e.to_string()))?
    );
    write(config_path, out.as_bytes(), 0o600)
}

/// Environment variable for tests only, honoured only by debug builds: this machine's
/// fingerprint (a test cannot give the host another SMBIOS UUID). A release agent
/// ignores it.
pub const TEST_MACHINE: &str = "DBVM_AGENT_TEST_MACHINE";

/// What makes this machine this machine: the SMBIOS product UUID (a hypervisor gives a
/// clone a new one) and `/etc/machine-id`. Unreadable parts are empty.
pub fn fingerprint() -> String {
    if cfg!(debug_assertions) {
        if let Ok(v) = std::env::var(TEST_MACHINE) {
            return v;
        }
    }
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_lowercase())
            .unwrap_or_default()
    };
    format!(
        "{}/{}",
        read("/sys/class/dmi/id/product_uuid"),
        read("/etc/machine-id")
    )
}

/// The file in the state directory that records where the identity was enrolled.
pub const MACHINE_FILE: &str = "machine";

/// Run before anything else: an identity enrolled on another machine (this VM is a clone
/// of an enrolled one) is set aside with its sealing key and journal
/// (`state_dir/cloned-<ms>/`), and the config goes back to naming no VM, so that this VM
/// takes its own properties and a new token at first boot instead of impersonating the
/// original. Returns what was done, for the log; `None` when nothing was.
pub fn set_aside_a_cloned_identity(config_path: &Path) -> Result<Option<String>, FirstBootError> {
    let Ok(text) = std::fs::read_to_string(config_path) else {
        return Ok(None);
    };
    let Ok(mut table) = toml::from_str::<toml::Table>(&text) else {
        return Ok(None);
    };
    let Some(state) = table
        .get("state_dir")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
    else {
        return Ok(None);
    };
    if !state.join("identity.pem").exists() {
        return Ok(None);
    }
    let here = fingerprint();
    let recorded = state.join(MACHINE_FILE);
    let enrolled_on = match std::fs::read_to_string(&recorded) {
        Ok(t) => t.trim().to_string(),
        // Enrolled before fingerprints were recorded: this machine is taken as its own.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            dbvm_host::fs::write_atomic(&recorded, here.as_bytes(), 0o600)
                .map_err(|e| FirstBootError::Write(recorded.clone(), e))?;
            return Ok(None);
        }
        Err(e) => return Err(FirstBootError::Write(recorded, e)),
    };
    if enrolled_on == here {
        return Ok(None);
    }
    let aside = state.join(format!("cloned-{}", dbvm_protocol::now_ms()));
    std::fs::create_dir_all(&aside).map_err(|e| FirstBootError::Write(aside.clone(), e))?;
    for name in [
        "identity.pem",
        "sealing.key",
        "journal.sqlite3",
        "journal.sqlite3-wal",
        "journal.sqlite3-shm",
        MACHINE_FILE,
    ] {
        match std::fs::rename(state.join(name), aside.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FirstBootError::Write(state.join(name), e)),
        }
    }
    let was = table
        .get("agent_id")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    table.insert("agent_id".into(), toml::Value::String(String::new()));
    let out = toml::to_string(&table)
        .map_err(|e| FirstBootError::Config(config_path.into(), e.to_string()))?;
    dbvm_host::fs::write_atomic(config_path, out.as_bytes(), 0o600)
        .map_err(|e| FirstBootError::Write(config_path.to_path_buf(), e))?;
    Ok(Some(format!(
        "this VM's identity (agent {was}) was enrolled on another machine ({enrolled_on}, this one is {here}): it is a clone; the identity, sealing key and journal were set aside in {} and the agent waits for this VM's own OVF properties and a new enrollment token",
        aside.display()
    )))
}

/// One attempt: read, check, write. Returns the agent id written.
pub fn run_once(config_path: &Path, sources: &[Source]) -> Result<String, FirstBootError> {
    let (name, xml) = read_environment(sources)?;
    let props = properties(&name, &xml)?;
    let settings = Settings::from_properties(&name, &props)?;
    apply(config_path, &settings)?;
    Ok(settings.agent_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn env_xml(props: &[(&str, &str)]) -> String {
        let p: String = props
            .iter()
            .map(|(k, v)| format!("    <Property oe:key=\"{k}\" oe:value=\"{v}\"/>\n"))
            .collect();
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Environment xmlns=\"http://schemas.dmtf.org/ovf/environment/1\" xmlns:oe=\"http://schemas.dmtf.org/ovf/environment/1\" xmlns:ve=\"http://www.vmware.com/schema/ovfenv\" oe:id=\"\" ve:vCenterId=\"vm-17\">\n  <PlatformSection><Kind>VMware ESXi</Kind></PlatformSection>\n  <PropertySection>\n{p}  </PropertySection>\n</Environment>\n"
        )
    }

    #[test]
    fn properties_are_read_by_their_namespaced_key() {
        let xml = env_xml(&[("dbvm.agent_id", "db-017"), ("other", "x")]);
        let p = properties("t", &xml).unwrap();
        assert_eq!(p["dbvm.agent_id"], "db-017");
        assert!(matches!(
            properties("t", "<Environment"),
            Err(FirstBootError::Malformed { .. })
        ));
        assert!(matches!(
            properties("t", "<Other/>"),
            Err(FirstBootError::Malformed { .. })
        ));
    }

    #[test]
    fn a_missing_or_bad_property_is_named() {
        let p = properties("t", &env_xml(&[("dbvm.agent_id", "db-017")])).unwrap();
        let e = Settings::from_properties("t", &p).unwrap_err().to_string();
        assert!(e.contains("dbvm.broker_address"), "{e}");
        let p = properties(
            "t",
            &env_xml(&[
                ("dbvm.agent_id", "db-017"),
                ("dbvm.broker_address", "broker.example.com"),
            ]),
        )
        .unwrap();
        let e = Settings::from_properties("t", &p).unwrap_err().to_string();
        assert!(
            e.contains("dbvm.broker_address") && e.contains("host:port"),
            "{e}"
        );
    }
}
