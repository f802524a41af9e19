//! Creating the key material a control plane needs: its signing and sealing key pairs
//! (`dbvmctl keygen`) and the fleet CA with the broker's and its own certificates
//! (`dbvmctl ca init`). Existing files are never replaced without `force`.

use crate::home::{Home, HomeError, HomeFile};
use dbvm_protocol::command::{CommandSigner, PublicKeyFile, SigningKeyFile};
use dbvm_protocol::pki::{FleetCa, PkiError};
use dbvm_protocol::seal::{self, SealingKey};
use std::path::PathBuf;
use std::time::Duration;

/// Common name of the fleet CA certificate.
pub const CA_NAME: &str = "dbvm fleet CA";
/// Longest `ca_days` accepted (100 years).
pub const MAX_CA_DAYS: u32 = 36_500;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{what} {} already exists: pass --force to replace it ({consequence})", .path.display())]
    Exists {
        what: &'static str,
        path: PathBuf,
        consequence: &'static str,
    },
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error("cannot create the {what}: {error}")]
    Pki { what: &'static str, error: PkiError },
    #[error("--ca-days must be between 1 and {MAX_CA_DAYS}, not {0}")]
    BadDays(u32),
    #[error("broker name {0:?} is empty: give DNS names or IP addresses")]
    EmptyBrokerName(String),
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("give at least one --role (operator, reader, support)")]
    NoRole,
    #[error("--days must be between 1 and {MAX_CA_DAYS}, not {0}")]
    BadCertDays(u32),
    #[error("{} already exists: choose another --out or remove it", .0.display())]
    FileExists(PathBuf),
    #[error("cannot write {}: {error}", .path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// What `ca issue` made.
#[derive(Debug, serde::Serialize)]
pub struct CaIssueOutput {
    pub control_plane: String,
    pub roles: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after_ms: i64,
}

/// Issues one more control-plane client certificate from the home's fleet CA, with
/// exactly `roles`, as `<out>/<name>.crt` and `<name>.key` (0600). Existing files are
/// never replaced; nothing is written unless both can be.
pub fn ca_issue(
    home: &Home,
    name: &str,
    roles: &[dbvm_protocol::pki::Role],
    days: u32,
    out: &std::path::Path,
) -> Result<CaIssueOutput, KeysError> {
    if roles.is_empty() {
        return Err(KeysError::NoRole);
    }
    if days == 0 || days > MAX_CA_DAYS {
        return Err(KeysError::BadCertDays(days));
    }
    let ca = FleetCa::load(&home.read(HomeFile::CaCert)?, &home.read(HomeFile::CaKey)?).map_err(
        |error| KeysError::Pki {
            what: "fleet CA (run `dbvmctl ca init` first)",
            error,
        },
    )?;
    let lifetime = Duration::from_secs(u64::from(days) * 24 * 3600);
    let made = ca
        .issue_control_plane(name, roles, lifetime)
        .map_err(|error| KeysError::Pki {
            what: "control-plane certificate",
            error,
        })?;
    let (_, not_after_ms) =
        dbvm_protocol::pki::validity_ms(&made.cert_pem).map_err(|error| KeysError::Pki {
            what: "control-plane certificate",
            error,
        })?;
    let cert = out.join(format!("{name}.crt"));
    let key = out.join(format!("{name}.key"));
    for p in [&cert, &key] {
        if p.exists() {
            return Err(KeysError::FileExists(p.clone()));
        }
    }
    let write = |path: &std::path::Path, text: &str, mode: u32| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(out)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(path)
            })
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
            .map_err(|error| KeysError::Write {
                path: path.to_path_buf(),
                error,
            })
    };
    write(&key, &made.key_pem, 0o600)?;
    if let Err(e) = write(&cert, &made.cert_pem, 0o644) {
        let _ = std::fs::remove_file(&key);
        return Err(e);
    }
    let mut roles: Vec<String> = roles.iter().map(|r| r.as_str().to_string()).collect();
    roles.sort();
    roles.dedup();
    Ok(CaIssueOutput {
        control_plane: name.to_string(),
        roles,
        cert,
        key,
        not_after_ms,
    })
}

const KEYGEN_FILES: [HomeFile; 4] = [
    HomeFile::SigningKey,
    HomeFile::SigningPub,
    HomeFile::SealingKey,
    HomeFile::SealingPub,
];

const CA_FILES: [HomeFile; 6] = [
    HomeFile::CaKey,
    HomeFile::CaCert,
    HomeFile::BrokerKey,
    HomeFile::BrokerCert,
    HomeFile::ControlPlaneKey,
    HomeFile::ControlPlaneCert,
];

fn refuse_existing(
    home: &Home,
    files: &[HomeFile],
    consequence: &'static str,
) -> Result<(), KeysError> {
    match files.iter().find(|f| home.exists(**f)) {
        Some(f) => Err(KeysError::Exists {
            what: f.description(),
            path: home.path(*f),
            consequence,
        }),
        None => Ok(()),
    }
}

/// What `keygen` created. Holds public values only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeygenOutput {
    /// Id of the signing key, `ed25519:<hex>`.
    pub key_id: String,
    /// base64 of the ed25519 public key.
    pub signing_public_key: String,
    /// base64 of the X25519 public key results are sealed to.
    pub sealing_public_key: String,
    pub files: Vec<PathBuf>,
}

impl KeygenOutput {
    /// The lines an agent's configuration needs to trust this control plane.
    pub fn trusted_key_toml(&self) -> String {
        format!(
            "[[trusted_keys]]\nkey_id = \"{}\"\npublic_key = \"{}\"\n",
            self.key_id, self.signing_public_key
        )
    }
}

/// Creates a signing (ed25519) and a sealing (X25519) key pair in the home.
pub fn keygen(home: &Home, force: bool) -> Result<KeygenOutput, KeysError> {
    if !force {
        refuse_existing(
            home,
            &KEYGEN_FILES,
            "agents must then trust the new signing key, and results sealed to the old sealing key can no longer be opened",
        )?;
    }
    let signer = CommandSigner::generate();
    let sealing = SealingKey::generate();
    let signing_file = SigningKeyFile::from_signer(&signer);
    let public_file = PublicKeyFile::from_key(&signer.verifying_key());
    let encode = |what: &'static str, e: serde_json::Error| KeysError::Encode {
        what,
        reason: e.to_string(),
    };
    let signing_json =
        serde_json::to_string_pretty(&signing_file).map_err(|e| encode("the signing key", e))?;
    let public_json =
        serde_json::to_string_pretty(&public_file).map_err(|e| encode("the public key", e))?;
    let sealing_public = seal::public_key_base64(&sealing.public_key());

    // Secret halves first: a failure half-way leaves no public key without its secret.
    home.write(HomeFile::SigningKey, format!("{signing_json}\n").as_bytes())?;
    home.write(
        HomeFile::SealingKey,
        format!("{}\n", sealing.seed_base64().as_str()).as_bytes(),
    )?;
    home.write(HomeFile::SigningPub, format!("{public_json}\n").as_bytes())?;
    home.write(
        HomeFile::SealingPub,
        format!("{sealing_public}\n").as_bytes(),
    )?;

    Ok(KeygenOutput {
        key_id: public_file.key_id,
        signing_public_key: public_file.public_key,
        sealing_public_key: sealing_public,
        files: KEYGEN_FILES.iter().map(|f| home.path(*f)).collect(),
    })
}

/// Settings of `ca init`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaInitOptions {
    /// DNS names and IP addresses of the broker's server certificate.
    pub broker_names: Vec<String>,
    /// Name in the control-plane client certificate (`dbvm://control-plane/<name>`).
    pub control_plane: String,
    /// Lifetime of the CA and of the certificates issued here.
    pub ca_days: u32,
    pub force: bool,
}

impl Default for CaInitOptions {
    fn default() -> Self {
        Self {
            broker_names: vec!["localhost".into(), "127.0.0.1".into()],
            control_plane: "ops".into(),
            ca_days: 3650,
            force: false,
        }
    }
}

/// What `ca init` created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaInitOutput {
    pub broker_names: Vec<String>,
    pub control_plane: String,
    pub files: Vec<PathBuf>,
}

/// Creates the fleet CA, the broker's server certificate and a control-plane client
/// certificate for dbvmctl in the home.
pub fn ca_init(home: &Home, options: &CaInitOptions) -> Result<CaInitOutput, KeysError> {
    if options.ca_days == 0 || options.ca_days > MAX_CA_DAYS {
        return Err(KeysError::BadDays(options.ca_days));
    }
    let broker_names = if options.broker_names.is_empty() {
        CaInitOptions::default().broker_names
    } else {
        options.broker_names.clone()
    };
    if let Some(bad) = broker_names.iter().find(|n| n.trim().is_empty()) {
        return Err(KeysError::EmptyBrokerName(bad.clone()));
    }
    if !options.force {
        refuse_existing(
            home,
            &CA_FILES,
            "the broker and every agent then need certificates from the new CA",
        )?;
    }
    let lifetime = Duration::from_secs(u64::from(options.ca_days) * 24 * 3600);
    let pki = |what: &'static str| move |error: PkiError| KeysError::Pki { what, error };
    let ca = FleetCa::generate(CA_NAME, lifetime).map_err(pki("fleet CA"))?;
    // The certificates cannot outlive the CA anyway, and dbvmctl has no renewal command:
    // they get the CA's lifetime.
    let broker = ca
        .issue_server(&broker_names, lifetime)
        .map_err(pki("broker certificate"))?;
    // dbvmctl's own certificate may do everything (`ca issue` makes narrower ones).
    let control_plane = ca
        .issue_control_plane(
            &options.control_plane,
            &dbvm_protocol::pki::Role::ALL,
            lifetime,
        )
        .map_err(pki("control-plane certificate"))?;

    home.write(HomeFile::CaKey, ca.key_pem().as_bytes())?;
    home.write(HomeFile::CaCert, ca.cert_pem().as_bytes())?;
    home.write(HomeFile::BrokerKey, broker.key_pem.as_bytes())?;
    home.write(HomeFile::BrokerCert, broker.cert_pem.as_bytes())?;
    home.write(HomeFile::ControlPlaneKey, control_plane.key_pem.as_bytes())?;
    home.write(
        HomeFile::ControlPlaneCert,
        control_plane.cert_pem.as_bytes(),
    )?;

    Ok(CaInitOutput {
        broker_names,
        control_plane: options.control_plane.clone(),
        files: CA_FILES.iter().map(|f| home.path(*f)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbvm_protocol::pki::Identity;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keygen_writes_loadable_keys_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().join("home"));
        let out = keygen(&home, false).unwrap();
        assert_eq!(out.files.len(), 4);
        for f in KEYGEN_FILES {
            let want = if f.is_secret() { 0o600 } else { 0o644 };
            assert_eq!(mode(&home.path(f)), want, "{f:?}");
        }
        let signer = home.signer().unwrap();
        assert_eq!(signer.key_id(), out.key_id);
        assert_eq!(home.signing_public_key().unwrap().key_id, out.key_id);
        let sealing = home.sealing_key().unwrap();
        assert_eq!(home.sealing_public_key().unwrap(), sealing.public_key());
        let toml = out.trusted_key_toml();
        assert!(
            toml.starts_with("[[trusted_keys]]\nkey_id = \"ed25519:"),
            "{toml}"
        );
        assert!(toml.contains(&out.signing_public_key));
        // nothing secret in what is printed
        let seed = std::fs::read_to_string(home.path(HomeFile::SealingKey)).unwrap();
        assert!(!format!("{out:?}").contains(seed.trim()));

        let err = keygen(&home, false).unwrap_err();
        assert!(matches!(err, KeysError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("pass --force"), "{err}");
        assert_eq!(home.signer().unwrap().key_id(), out.key_id, "old key kept");

        let again = keygen(&home, true).unwrap();
        assert_ne!(again.key_id, out.key_id);
        assert_eq!(home.signer().unwrap().key_id(), again.key_id);
        assert_eq!(mode(&home.path(HomeFile::SigningKey)), 0o600);
    }

    #[test]
    fn keygen_refuses_when_any_one_key_file_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path());
        home.write(HomeFile::SealingPub, b"x").unwrap();
        let err = keygen(&home, false).unwrap_err().to_string();
        assert!(err.contains("sealing.pub already exists"), "{err}");
        assert!(!home.exists(HomeFile::SigningKey));
    }

    #[test]
    fn ca_init_creates_a_working_pki_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().join("home"));
        let options = CaInitOptions {
            ca_days: 30,
            ..CaInitOptions::default()
        };
        let out = ca_init(&home, &options).unwrap();
        assert_eq!(out.broker_names, ["localhost", "127.0.0.1"]);
        assert_eq!(out.files.len(), 6);
        for f in CA_FILES {
            let want = if f.is_secret() { 0o600 } else { 0o644 };
            assert_eq!(mode(&home.path(f)), want, "{f:?}");
        }
        // the control-plane certificate carries its identity and matches its key
        let cert = home.read(HomeFile::ControlPlaneCert).unwrap();
        let key = home.read(HomeFile::ControlPlaneKey).unwrap();
        assert!(dbvm_protocol::pki::cert_matches_key(&cert, &key));
        let der = dbvm_protocol::pki::first_cert_der(&cert).unwrap();
        assert_eq!(
            dbvm_protocol::pki::identity_of(&der).unwrap(),
            Identity::ControlPlane("ops".into())
        );
        // the CA can be reloaded and the broker's server side config builds
        let ca_pem = home.read(HomeFile::CaCert).unwrap();
        FleetCa::load(&ca_pem, &home.read(HomeFile::CaKey).unwrap()).unwrap();
        dbvm_protocol::tls::server_config(
            &home.read(HomeFile::BrokerCert).unwrap(),
            &home.read(HomeFile::BrokerKey).unwrap(),
            &ca_pem,
            dbvm_protocol::tls::ClientAuth::Required,
        )
        .unwrap();
        let tls = home.tls_client_config().unwrap();
        assert_eq!(tls.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        let (not_before, not_after) = dbvm_protocol::pki::validity_ms(&cert).unwrap();
        assert!((not_after - not_before) / 86_400_000 == 30);

        let err = ca_init(&home, &options).unwrap_err();
        assert!(
            err.to_string()
                .contains("ca.key already exists: pass --force"),
            "{err}"
        );
        assert_eq!(home.read(HomeFile::CaCert).unwrap(), ca_pem, "old CA kept");
        ca_init(
            &home,
            &CaInitOptions {
                force: true,
                ..options
            },
        )
        .unwrap();
        assert_ne!(home.read(HomeFile::CaCert).unwrap(), ca_pem);
    }

    #[test]
    fn ca_issue_makes_a_certificate_with_exactly_its_roles_and_never_replaces_files() {
        use dbvm_protocol::pki::{first_cert_der, identity_of, roles_of, Role};
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().join("home"));
        let out = tmp.path().join("certs");
        // No CA yet: refused, nothing written.
        assert!(ca_issue(&home, "dash", &[Role::Reader], 30, &out).is_err());
        assert!(!out.exists());
        ca_init(&home, &CaInitOptions::default()).unwrap();
        let own = first_cert_der(&home.read(HomeFile::ControlPlaneCert).unwrap()).unwrap();
        assert_eq!(
            roles_of(&own),
            Role::ALL.to_vec(),
            "dbvmctl's own may do everything"
        );
        assert!(matches!(
            ca_issue(&home, "dash", &[], 30, &out),
            Err(KeysError::NoRole)
        ));
        assert!(matches!(
            ca_issue(&home, "dash", &[Role::Reader], 0, &out),
            Err(KeysError::BadCertDays(0))
        ));
        assert!(ca_issue(&home, "Bad Name", &[Role::Reader], 30, &out).is_err());
        assert!(!out.exists(), "nothing written for bad input");
        let made = ca_issue(&home, "dash", &[Role::Support, Role::Reader], 30, &out).unwrap();
        assert_eq!(made.roles, ["reader", "support"]);
        assert_eq!(mode(&made.key), 0o600);
        let der = first_cert_der(&std::fs::read_to_string(&made.cert).unwrap()).unwrap();
        assert_eq!(
            identity_of(&der).unwrap(),
            Identity::ControlPlane("dash".into())
        );
        assert_eq!(roles_of(&der), vec![Role::Reader, Role::Support]);
        let key_before = std::fs::read(&made.key).unwrap();
        assert!(matches!(
            ca_issue(&home, "dash", &[Role::Operator], 30, &out),
            Err(KeysError::FileExists(_))
        ));
        assert_eq!(std::fs::read(&made.key).unwrap(), key_before);
    }

    #[test]
    fn ca_init_checks_its_options_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().join("home"));
        let bad_days = CaInitOptions {
            ca_days: 0,
            ..CaInitOptions::default()
        };
        assert!(matches!(
            ca_init(&home, &bad_days),
            Err(KeysError::BadDays(0))
        ));
        let bad_name = CaInitOptions {
            control_plane: "Not Valid".into(),
            ..CaInitOptions::default()
        };
        let err = ca_init(&home, &bad_name).unwrap_err();
        assert!(matches!(err, KeysError::Pki { .. }), "{err}");
        assert!(!home.dir().exists(), "nothing written");
    }
}
