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
//!
//! The two networks (`dbvm.mgmt_*`, `dbvm.app_*`, all optional): an `*_interface` becomes
//! the `[firewall]` section's `management_interface` / `application_interface` (in the
//! package's config, which has that section); `*_mode`, `*_ip`, `*_netmask`,
//! `*_gateway` and `*_dns` become a systemd-networkd file per interface (Photon OS
//! configures its network with systemd-networkd), `10-dbvm-mgmt.network` and
//! `20-dbvm-app.network`, written before the config (a crash between them means first
//! boot again, which writes the same files). No address property given (the descriptor's
//! default mode alone included) writes no file: Photon's default, DHCP, stays. The
//! management gateway is the default route; the application gateway is not (the
//! descriptor says so): it is the route for replies from the application address, in a
//! routing table of its own (a source rule), so clients on other networks are answered
//! through it while everything else leaves by the management network.

use base64::Engine;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// The OVF environment's namespace (the `oe:` prefix).
const OE: &str = "http://schemas.dmtf.org/ovf/environment/1";

pub const AGENT_ID: &str = "dbvm.agent_id";
pub const BROKER_ADDRESS: &str = "dbvm.broker_address";
pub const BROKER_SERVER_NAME: &str = "dbvm.broker_server_name";
pub const FLEET_CA: &str = "dbvm.fleet_ca";
pub const ENROLLMENT_TOKEN: &str = "dbvm.enrollment_token";
pub const TRUSTED_KEYS: &str = "dbvm.trusted_keys";

/// Where systemd-networkd reads `.network` files from (the administrator's directory).
pub const NETWORK_DIR: &str = "/etc/systemd/network";

/// The routing table the application gateway's route goes to (not `main`: the default
/// route is the management network's).
pub const APP_ROUTE_TABLE: u32 = 20;

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
    pub management: NetworkSettings,
    pub application: NetworkSettings,
}

/// Which of the VM's two networks, with its OVF keys and defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    Management,
    Application,
}

impl Net {
    /// The OVF keys: interface, mode, ip, netmask, gateway, dns.
    fn keys(self) -> [&'static str; 6] {
        match self {
            Net::Management => [
                "dbvm.mgmt_interface",
                "dbvm.mgmt_mode",
                "dbvm.mgmt_ip",
                "dbvm.mgmt_netmask",
                "dbvm.mgmt_gateway",
                "dbvm.mgmt_dns",
            ],
            Net::Application => [
                "dbvm.app_interface",
                "dbvm.app_mode",
                "dbvm.app_ip",
                "dbvm.app_netmask",
                "dbvm.app_gateway",
                "dbvm.app_dns",
            ],
        }
    }

    /// The interface when the property names none: the descriptor's and the firewall's
    /// default.
    fn default_interface(self) -> &'static str {
        match self {
            Net::Management => "eth0",
            Net::Application => "eth1",
        }
    }

    /// The `[firewall]` key the interface goes to.
    fn firewall_key(self) -> &'static str {
        match self {
            Net::Management => "management_interface",
            Net::Application => "application_interface",
        }
    }

    /// The systemd-networkd file (`10-`: before the distribution's catch-all files).
    pub fn file_name(self) -> &'static str {
        match self {
            Net::Management => "10-dbvm-mgmt.network",
            Net::Application => "20-dbvm-app.network",
        }
    }
}

/// How an interface gets its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addressing {
    Dhcp {
        dns: Vec<IpAddr>,
    },
    Static {
        address: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
        dns: Vec<IpAddr>,
    },
}

/// One network's properties, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSettings {
    pub net: Net,
    /// Given: goes to the config's `[firewall]` section.
    pub interface: Option<String>,
    /// Given: a systemd-networkd file is written.
    pub addressing: Option<Addressing>,
}

/// The prefix length of `netmask`: a dotted IPv4 mask (`255.255.255.0`) or a length
/// (`24` or `/24`), which IPv6 needs.
fn prefix_of(netmask: &str, address: IpAddr) -> Result<u8, String> {
    let max: u8 = if address.is_ipv4() { 32 } else { 128 };
    let prefix = if let Ok(mask) = netmask.parse::<Ipv4Addr>() {
        if !address.is_ipv4() {
            return Err(format!(
                "{netmask:?} is an IPv4 netmask for an IPv6 address; give a prefix length (e.g. 64)"
            ));
        }
        let bits = u32::from(mask);
        if bits.leading_ones() + bits.trailing_zeros() != 32 {
            return Err(format!(
                "{netmask:?} is not a netmask (its ones are not contiguous)"
            ));
        }
        u8::try_from(bits.leading_ones()).unwrap_or(0)
    } else {
        netmask
            .trim_start_matches('/')
            .parse::<u8>()
            .map_err(|_| format!("{netmask:?} is neither a dotted netmask nor a prefix length"))?
    };
    if prefix == 0 || prefix > max {
        return Err(format!(
            "{netmask:?} gives a prefix length of {prefix}; it must be 1 to {max}"
        ));
    }
    Ok(prefix)
}

impl NetworkSettings {
    /// Checks one network's properties; the first problem is named by its key.
    fn from_properties(net: Net, p: &BTreeMap<String, String>) -> Result<Self, FirstBootError> {
        let [k_if, k_mode, k_ip, k_mask, k_gw, k_dns] = net.keys();
        let get = |key: &str| p.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
        let bad = |key: &'static str, problem: String| FirstBootError::Invalid { key, problem };
        let interface = match get(k_if) {
            Some(name) => {
                if let Some(problem) = crate::firewall::interface_name_problem(name) {
                    return Err(bad(k_if, problem));
                }
                Some(name.to_string())
            }
            None => None,
        };
        let addr = |key: &'static str, v: &str| {
            v.parse::<IpAddr>()
                .map_err(|_| bad(key, format!("{v:?} is not an IPv4 or IPv6 address")))
        };
        let dns = match get(k_dns) {
            Some(list) => list
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(|s| addr(k_dns, s))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let (ip, mask, gateway) = (get(k_ip), get(k_mask), get(k_gw));
        let statics = ip.is_some() || mask.is_some() || gateway.is_some();
        let addressing = match get(k_mode) {
            Some("dhcp") => {
                if let Some((key, Some(v))) = [(k_ip, ip), (k_mask, mask), (k_gw, gateway)]
                    .into_iter()
                    .find(|(_, v)| v.is_some())
                {
                    return Err(bad(
                        key,
                        format!("{v:?} is for static addressing only and {k_mode} is dhcp; empty it or set {k_mode} to static"),
                    ));
                }
                Some(Addressing::Dhcp { dns })
            }
            // The descriptor's default mode is static: with no address given at all it
            // is no choice the deployment made, and nothing is written (DHCP stays).
            Some("static") | None if !statics && dns.is_empty() => None,
            Some("static") | None => {
                let ip = ip.ok_or_else(|| {
                    bad(
                        k_ip,
                        format!("it is empty and static addressing ({k_mode}) needs it"),
                    )
                })?;
                let address = addr(k_ip, ip)?;
                if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
                    return Err(bad(k_ip, format!("{ip} cannot be an interface's address")));
                }
                let mask = mask.ok_or_else(|| {
                    bad(
                        k_mask,
                        format!("it is empty and static addressing ({k_mode}) needs it"),
                    )
                })?;
                let prefix = prefix_of(mask, address).map_err(|e| bad(k_mask, e))?;
                let gateway = match gateway {
                    Some(g) => {
                        let g = addr(k_gw, g)?;
                        if g.is_ipv4() != address.is_ipv4() {
                            return Err(bad(
                                k_gw,
                                format!("{g} is not of the same IP version as {k_ip} {address}"),
                            ));
                        }
                        Some(g)
                    }
                    None => None,
                };
                Some(Addressing::Static {
                    address,
                    prefix,
                    gateway,
                    dns,
                })
            }
            Some(other) => {
                return Err(bad(k_mode, format!("{other:?} is neither static nor dhcp")))
            }
        };
        Ok(Self {
            net,
            interface,
            addressing,
        })
    }

    /// The interface the network file matches.
    pub fn interface_name(&self) -> &str {
        self.interface
            .as_deref()
            .unwrap_or(self.net.default_interface())
    }

    /// The systemd-networkd file for this network, when an address property was given.
    pub fn network_file(&self) -> Option<String> {
        let addressing = self.addressing.as_ref()?;
        let mut s = format!(
            "# Written by dbvm-agent at first boot from the VM's OVF properties ({}*).\n[Match]\nName={}\n\n[Network]\n",
            self.net.keys()[0].trim_end_matches("interface"),
            self.interface_name()
        );
        let dns = match addressing {
            Addressing::Dhcp { dns } => {
                s.push_str("DHCP=yes\n");
                dns
            }
            Addressing::Static {
                address,
                prefix,
                dns,
                ..
            } => {
                s.push_str(&format!("Address={address}/{prefix}\n"));
                dns
            }
        };
        for d in dns {
            s.push_str(&format!("DNS={d}\n"));
        }
        if let Addressing::Static {
            address,
            gateway: Some(g),
            ..
        } = addressing
        {
            match self.net {
                Net::Management => s.push_str(&format!("Gateway={g}\n")),
                // Not a second default route: replies from the application address
                // leave through its gateway (a table of its own and a source rule).
                Net::Application => {
                    let host = if address.is_ipv4() { 32 } else { 128 };
                    s.push_str(&format!(
                        "\n[Route]\nGateway={g}\nTable={APP_ROUTE_TABLE}\n\n[RoutingPolicyRule]\nFrom={address}/{host}\nTable={APP_ROUTE_TABLE}\n"
                    ));
                }
            }
        }
        Some(s)
    }
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
            management: NetworkSettings::from_properties(Net::Management, p)?,
            application: NetworkSettings::from_properties(Net::Application, p)?,
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

/// Writes the network files into `network_dir`, the CA and the token beside the config,
/// then the config (atomically, last), keeping every other setting it had.
pub fn apply(config_path: &Path, network_dir: &Path, s: &Settings) -> Result<(), FirstBootError> {
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
    if [&s.management, &s.application]
        .iter()
        .any(|n| n.addressing.is_some())
    {
        std::fs::create_dir_all(network_dir)
            .map_err(|e| FirstBootError::Write(network_dir.to_path_buf(), e))?;
    }
    for n in [&s.management, &s.application] {
        if let Some(file) = n.network_file() {
            write(&network_dir.join(n.net.file_name()), file.as_bytes(), 0o644)?;
        }
    }
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
    // Only into a [firewall] section the config has (the package's has one): creating
    // one would turn on a firewall the config leaves alone.
    if let Some(Value::Table(fw)) = table.get_mut("firewall") {
        for n in [&s.management, &s.application] {
            if let Some(name) = &n.interface {
                fw.insert(n.net.firewall_key().into(), Value::String(name.clone()));
            }
        }
    }
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

/// What a finished first boot did, for the log.
#[derive(Debug)]
pub struct Done {
    pub agent_id: String,
    /// The network files written.
    pub network_files: Vec<PathBuf>,
    /// What `networkctl reload` said when it could not reload (not fatal: the files
    /// apply at the next boot anyway).
    pub reload_problem: Option<String>,
}

/// One attempt: read, check, write; network files go to `network_dir`.
pub fn run_once(
    config_path: &Path,
    sources: &[Source],
    network_dir: &Path,
) -> Result<Done, FirstBootError> {
    let (name, xml) = read_environment(sources)?;
    let props = properties(&name, &xml)?;
    let settings = Settings::from_properties(&name, &props)?;
    apply(config_path, network_dir, &settings)?;
    let network_files: Vec<PathBuf> = [&settings.management, &settings.application]
        .into_iter()
        .filter(|n| n.addressing.is_some())
        .map(|n| network_dir.join(n.net.file_name()))
        .collect();
    // networkd reads only its own directories: a reload after writing elsewhere (tests)
    // would only disturb the host's network.
    let reload_problem = if !network_files.is_empty() && network_dir == Path::new(NETWORK_DIR) {
        reload_networkd()
    } else {
        None
    };
    Ok(Done {
        agent_id: settings.agent_id,
        network_files,
        reload_problem,
    })
}

/// `networkctl reload`, when networkctl is there; what went wrong, if anything.
fn reload_networkd() -> Option<String> {
    match std::process::Command::new("networkctl")
        .arg("reload")
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "networkctl reload exited with {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some("networkctl is not installed; the network files apply at the next boot".into())
        }
        Err(e) => Some(format!("cannot run networkctl reload: {e}")),
    }
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

    fn net(net: Net, props: &[(&str, &str)]) -> Result<NetworkSettings, FirstBootError> {
        let p: BTreeMap<String, String> = props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NetworkSettings::from_properties(net, &p)
    }

    fn invalid_key(r: Result<NetworkSettings, FirstBootError>) -> (&'static str, String) {
        match r {
            Err(FirstBootError::Invalid { key, problem }) => (key, problem),
            other => panic!("expected an invalid property, got {other:?}"),
        }
    }

    #[test]
    fn static_management_renders_address_gateway_and_dns() {
        let n = net(
            Net::Management,
            &[
                ("dbvm.mgmt_interface", "ens192"),
                ("dbvm.mgmt_mode", "static"),
                ("dbvm.mgmt_ip", "10.0.0.17"),
                ("dbvm.mgmt_netmask", "255.255.255.0"),
                ("dbvm.mgmt_gateway", "10.0.0.2"),
                ("dbvm.mgmt_dns", "10.0.0.2, 10.0.0.3 2001:db8::53"),
            ],
        )
        .unwrap();
        assert_eq!(n.interface.as_deref(), Some("ens192"));
        let file = n.network_file().unwrap();
        let body: Vec<&str> = file.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "[Match]",
                "Name=ens192",
                "",
                "[Network]",
                "Address=10.0.0.17/24",
                "DNS=10.0.0.2",
                "DNS=10.0.0.3",
                "DNS=2001:db8::53",
                "Gateway=10.0.0.2",
            ]
        );
    }

    #[test]
    fn the_application_gateway_is_a_source_route_not_a_second_default() {
        let n = net(
            Net::Application,
            &[
                ("dbvm.app_mode", "static"),
                ("dbvm.app_ip", "192.168.50.10"),
                ("dbvm.app_netmask", "/23"),
                ("dbvm.app_gateway", "192.168.50.1"),
            ],
        )
        .unwrap();
        assert_eq!(
            n.interface, None,
            "no interface property: the config keeps its own"
        );
        let file = n.network_file().unwrap();
        assert!(file.contains("Name=eth1\n"), "{file}");
        assert!(file.contains("Address=192.168.50.10/23\n"), "{file}");
        assert!(
            file.ends_with("[Route]\nGateway=192.168.50.1\nTable=20\n\n[RoutingPolicyRule]\nFrom=192.168.50.10/32\nTable=20\n"),
            "{file}"
        );
        // IPv6 takes a prefix length.
        let n = net(
            Net::Application,
            &[("dbvm.app_ip", "2001:db8::10"), ("dbvm.app_netmask", "64")],
        )
        .unwrap();
        assert!(n
            .network_file()
            .unwrap()
            .contains("Address=2001:db8::10/64\n"));
    }

    #[test]
    fn dhcp_and_nothing_given() {
        let n = net(
            Net::Application,
            &[("dbvm.app_mode", "dhcp"), ("dbvm.app_dns", "10.1.0.53")],
        )
        .unwrap();
        let file = n.network_file().unwrap();
        assert!(
            file.contains("Name=eth1\n\n[Network]\nDHCP=yes\nDNS=10.1.0.53\n"),
            "{file}"
        );
        // The descriptor's defaults (static, nothing filled): no file, DHCP stays.
        let n = net(
            Net::Management,
            &[
                ("dbvm.mgmt_interface", "eth0"),
                ("dbvm.mgmt_mode", "static"),
                ("dbvm.mgmt_ip", ""),
                ("dbvm.mgmt_netmask", " "),
            ],
        )
        .unwrap();
        assert_eq!(n.network_file(), None);
        assert_eq!(n.interface.as_deref(), Some("eth0"));
        assert_eq!(net(Net::Management, &[]).unwrap().network_file(), None);
    }

    #[test]
    fn a_bad_network_property_is_named() {
        let static_ = |extra: &[(&'static str, &'static str)]| {
            let mut p = vec![
                ("dbvm.mgmt_mode", "static"),
                ("dbvm.mgmt_ip", "10.0.0.17"),
                ("dbvm.mgmt_netmask", "255.255.255.0"),
            ];
            for (k, v) in extra {
                p.retain(|(key, _)| key != k);
                p.push((k, v));
            }
            net(Net::Management, &p)
        };
        // (properties changed, the key named, what the problem says)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (
                &[("dbvm.mgmt_ip", "10.0.0.300")],
                "dbvm.mgmt_ip",
                "not an IPv4 or IPv6",
            ),
            (&[("dbvm.mgmt_ip", "0.0.0.0")], "dbvm.mgmt_ip", "cannot be"),
            (
                &[("dbvm.mgmt_ip", "")],
                "dbvm.mgmt_ip",
                "static addressing (dbvm.mgmt_mode) needs it",
            ),
            (
                &[("dbvm.mgmt_netmask", "")],
                "dbvm.mgmt_netmask",
                "needs it",
            ),
            (
                &[("dbvm.mgmt_netmask", "255.0.255.0")],
                "dbvm.mgmt_netmask",
                "contiguous",
            ),
            (
                &[("dbvm.mgmt_netmask", "33")],
                "dbvm.mgmt_netmask",
                "1 to 32",
            ),
            (
                &[("dbvm.mgmt_netmask", "0.0.0.0")],
                "dbvm.mgmt_netmask",
                "1 to 32",
            ),
            (
                &[("dbvm.mgmt_netmask", "wide")],
                "dbvm.mgmt_netmask",
                "neither",
            ),
            (
                &[("dbvm.mgmt_gateway", "gw.example")],
                "dbvm.mgmt_gateway",
                "not an IPv4",
            ),
            (
                &[("dbvm.mgmt_gateway", "2001:db8::1")],
                "dbvm.mgmt_gateway",
                "same IP version",
            ),
            (
                &[("dbvm.mgmt_dns", "10.0.0.2,dns.example")],
                "dbvm.mgmt_dns",
                "\"dns.example\"",
            ),
            (
                &[("dbvm.mgmt_mode", "manual")],
                "dbvm.mgmt_mode",
                "neither static nor dhcp",
            ),
            (
                &[("dbvm.mgmt_mode", "dhcp")],
                "dbvm.mgmt_ip",
                "for static addressing only",
            ),
            (
                &[("dbvm.mgmt_interface", "eth0/../x")],
                "dbvm.mgmt_interface",
                "'/'",
            ),
            (
                &[("dbvm.mgmt_interface", "a-very-long-name0")],
                "dbvm.mgmt_interface",
                "at most 15",
            ),
        ];
        for (extra, key, says) in cases {
            let (k, problem) = invalid_key(static_(extra));
            assert_eq!(k, *key, "{extra:?}: {problem}");
            assert!(problem.contains(says), "{extra:?}: {problem}");
        }
        let (k, problem) = invalid_key(net(
            Net::Application,
            &[
                ("dbvm.app_ip", "2001:db8::10"),
                ("dbvm.app_netmask", "255.255.255.0"),
            ],
        ));
        assert_eq!(k, "dbvm.app_netmask");
        assert!(problem.contains("prefix length"), "{problem}");
    }

    #[test]
    fn apply_writes_the_network_files_then_the_interfaces_into_the_firewall_section() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            "agent_id = \"\"\n[broker]\naddress = \"\"\n[firewall]\nenabled = false\nmanagement_tcp_ports = [9274]\n",
        )
        .unwrap();
        let net_dir = dir.path().join("network");
        std::fs::create_dir(&net_dir).unwrap();
        let p: BTreeMap<String, String> = [
            ("dbvm.mgmt_interface", "ens192"),
            ("dbvm.mgmt_mode", "dhcp"),
            ("dbvm.app_interface", "ens224"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = Settings {
            agent_id: "db-017".into(),
            broker_address: "broker:7443".into(),
            broker_server_name: None,
            fleet_ca_pem: "-----BEGIN CERTIFICATE-----\n".into(),
            token: dbvm_protocol::seal::Secret::new("t"),
            trusted_keys: Vec::new(),
            management: NetworkSettings::from_properties(Net::Management, &p).unwrap(),
            application: NetworkSettings::from_properties(Net::Application, &p).unwrap(),
        };
        apply(&config, &net_dir, &s).unwrap();
        let mgmt = std::fs::read_to_string(net_dir.join("10-dbvm-mgmt.network")).unwrap();
        assert!(
            mgmt.contains("Name=ens192\n") && mgmt.contains("DHCP=yes\n"),
            "{mgmt}"
        );
        assert!(
            !net_dir.join("20-dbvm-app.network").exists(),
            "no address for eth1"
        );
        let written: toml::Table =
            toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        let fw = written["firewall"].as_table().unwrap();
        assert_eq!(fw["management_interface"].as_str(), Some("ens192"));
        assert_eq!(fw["application_interface"].as_str(), Some("ens224"));
        assert_eq!(fw["enabled"].as_bool(), Some(false));
        assert_eq!(fw["management_tcp_ports"].as_array().unwrap().len(), 1);

        // A config without a [firewall] section does not get one.
        std::fs::write(&config, "agent_id = \"\"\n").unwrap();
        apply(&config, &net_dir, &s).unwrap();
        let written = std::fs::read_to_string(&config).unwrap();
        assert!(!written.contains("firewall"), "{written}");
    }
}
