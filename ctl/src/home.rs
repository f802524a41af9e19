//! The dbvmctl home: one directory holding the fleet CA, the certificates, and the
//! control plane's signing and sealing keys under fixed file names.
//!
//! Secret files are written with mode 0600 through a temporary file in the same
//! directory and a rename, so a crash never leaves a half-written key behind.

use dbvm_protocol::command::{CommandSigner, PublicKeyFile, SigningKeyFile};
use dbvm_protocol::seal::{self, SealingKey};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Environment variable naming the home directory (same as the `--dir` flag).
pub const HOME_ENV: &str = "DBVM_HOME";
/// Name of the home directory inside `$HOME` when neither `--dir` nor `DBVM_HOME` is set.
pub const DEFAULT_DIR_NAME: &str = ".dbvm";

const KEYGEN: &str = "dbvmctl keygen";
const CA_INIT: &str = "dbvmctl ca init";

/// The files a home holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HomeFile {
    CaCert,
    CaKey,
    BrokerCert,
    BrokerKey,
    ControlPlaneCert,
    ControlPlaneKey,
    /// [`SigningKeyFile`] JSON.
    SigningKey,
    /// [`PublicKeyFile`] JSON.
    SigningPub,
    /// base64 of the 32-byte X25519 seed.
    SealingKey,
    /// base64 of the 32-byte X25519 public key.
    SealingPub,
}

impl HomeFile {
    pub const ALL: [Self; 10] = [
        Self::CaCert,
        Self::CaKey,
        Self::BrokerCert,
        Self::BrokerKey,
        Self::ControlPlaneCert,
        Self::ControlPlaneKey,
        Self::SigningKey,
        Self::SigningPub,
        Self::SealingKey,
        Self::SealingPub,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Self::CaCert => "ca.crt",
            Self::CaKey => "ca.key",
            Self::BrokerCert => "broker.crt",
            Self::BrokerKey => "broker.key",
            Self::ControlPlaneCert => "controlplane.crt",
            Self::ControlPlaneKey => "controlplane.key",
            Self::SigningKey => "signing.key",
            Self::SigningPub => "signing.pub",
            Self::SealingKey => "sealing.key",
            Self::SealingPub => "sealing.pub",
        }
    }

    /// Whether the file holds secret key material (written with mode 0600).
    pub fn is_secret(self) -> bool {
        matches!(
            self,
            Self::CaKey
                | Self::BrokerKey
                | Self::ControlPlaneKey
                | Self::SigningKey
                | Self::SealingKey
        )
    }

    /// What the file is, for messages.
    pub fn description(self) -> &'static str {
        match self {
            Self::CaCert => "fleet CA certificate",
            Self::CaKey => "fleet CA key",
            Self::BrokerCert => "broker certificate",
            Self::BrokerKey => "broker key",
            Self::ControlPlaneCert => "control-plane certificate",
            Self::ControlPlaneKey => "control-plane key",
            Self::SigningKey => "signing key",
            Self::SigningPub => "signing public key",
            Self::SealingKey => "sealing key",
            Self::SealingPub => "sealing public key",
        }
    }

    /// The command that creates the file.
    pub fn created_by(self) -> &'static str {
        match self {
            Self::SigningKey | Self::SigningPub | Self::SealingKey | Self::SealingPub => KEYGEN,
            _ => CA_INIT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("cannot find the dbvm home: $HOME is not set; pass --dir or set {HOME_ENV}")]
    NoHomeDir,
    #[error("cannot create directory {}: {error}", .path.display())]
    CreateDir { path: PathBuf, error: io::Error },
    #[error("{what} {} not found: run `{create}`", .path.display())]
    Missing {
        what: &'static str,
        path: PathBuf,
        create: &'static str,
    },
    #[error("cannot read {what} {}: {error}", .path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{what} {} is invalid: {reason}; restore it from a backup or create it again with `{create} --force`", .path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
        create: &'static str,
    },
    #[error("cannot write {what} {}: {error}", .path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("cannot build the TLS settings from {}: {reason}; run `{CA_INIT}` to create them", .dir.display())]
    Tls { dir: PathBuf, reason: String },
}

/// A dbvmctl home directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `explicit` (the `--dir` flag) if given, else `$DBVM_HOME`, else `$HOME/.dbvm`.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, HomeError> {
        if let Some(dir) = explicit {
            return Ok(Self::new(dir));
        }
        if let Some(dir) = std::env::var_os(HOME_ENV).filter(|d| !d.is_empty()) {
            return Ok(Self::new(dir));
        }
        Self::default_dir().map(Self::new)
    }

    /// `$HOME/.dbvm`.
    pub fn default_dir() -> Result<PathBuf, HomeError> {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .ok_or(HomeError::NoHomeDir)?;
        Ok(PathBuf::from(home).join(DEFAULT_DIR_NAME))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, file: HomeFile) -> PathBuf {
        self.dir.join(file.file_name())
    }

    pub fn exists(&self, file: HomeFile) -> bool {
        self.path(file).exists()
    }

    /// Reads a file as text; a missing file names the command that creates it.
    pub fn read(&self, file: HomeFile) -> Result<String, HomeError> {
        let path = self.path(file);
        fs::read_to_string(&path).map_err(|error| {
            if error.kind() == io::ErrorKind::NotFound {
                HomeError::Missing {
                    what: file.description(),
                    path,
                    create: file.created_by(),
                }
            } else {
                HomeError::Read {
                    what: file.description(),
                    path,
                    error,
                }
            }
        })
    }

    /// Creates the home directory (mode 0700) when it does not exist.
    pub fn create_dir(&self) -> Result<(), HomeError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|error| HomeError::CreateDir {
                path: self.dir.clone(),
                error,
            })
    }

    /// Replaces a file atomically: secret files get mode 0600, the others 0644.
    pub fn write(&self, file: HomeFile, contents: &[u8]) -> Result<(), HomeError> {
        self.create_dir()?;
        let mode = if file.is_secret() { 0o600 } else { 0o644 };
        let path = self.path(file);
        dbvm_host::fs::write_atomic(&path, contents, mode).map_err(|error| HomeError::Write {
            what: file.description(),
            path,
            error,
        })
    }

    fn invalid(&self, file: HomeFile, reason: impl Into<String>) -> HomeError {
        HomeError::Invalid {
            what: file.description(),
            path: self.path(file),
            reason: reason.into(),
            create: file.created_by(),
        }
    }

    /// The control plane's command signing key.
    pub fn signer(&self) -> Result<CommandSigner, HomeError> {
        let text = self.read(HomeFile::SigningKey)?;
        let file: SigningKeyFile = serde_json::from_str(&text).map_err(|e| {
            self.invalid(HomeFile::SigningKey, format!("not a signing key file: {e}"))
        })?;
        file.to_signer()
            .map_err(|e| self.invalid(HomeFile::SigningKey, e))
    }

    /// The public half of the signing key, as agents are configured with it.
    pub fn signing_public_key(&self) -> Result<PublicKeyFile, HomeError> {
        let text = self.read(HomeFile::SigningPub)?;
        let file: PublicKeyFile = serde_json::from_str(&text).map_err(|e| {
            self.invalid(HomeFile::SigningPub, format!("not a public key file: {e}"))
        })?;
        file.to_key()
            .map_err(|e| self.invalid(HomeFile::SigningPub, e))?;
        Ok(file)
    }

    /// The key that opens secrets agents seal to this control plane.
    pub fn sealing_key(&self) -> Result<SealingKey, HomeError> {
        let text = self.read(HomeFile::SealingKey)?;
        SealingKey::from_seed_base64(&text).map_err(|_| {
            self.invalid(
                HomeFile::SealingKey,
                "expected the base64 of a 32-byte X25519 seed",
            )
        })
    }

    /// The public sealing key, sent as `reply_key` in commands.
    pub fn sealing_public_key(&self) -> Result<[u8; 32], HomeError> {
        let text = self.read(HomeFile::SealingPub)?;
        seal::parse_public_key(&text).map_err(|_| {
            self.invalid(
                HomeFile::SealingPub,
                "expected the base64 of a 32-byte X25519 public key",
            )
        })
    }

    /// TLS settings for talking to the broker: trust `ca.crt`, present
    /// `controlplane.crt`. Offers HTTP/2 and HTTP/1.1 by ALPN.
    pub fn tls_client_config(&self) -> Result<rustls::ClientConfig, HomeError> {
        let ca = self.read_pem(HomeFile::CaCert, true)?;
        let cert = self.read_pem(HomeFile::ControlPlaneCert, true)?;
        let key = self.read_pem(HomeFile::ControlPlaneKey, false)?;
        let mut config =
            dbvm_protocol::tls::client_config(&ca, Some((&cert, &key))).map_err(|e| {
                HomeError::Tls {
                    dir: self.dir.clone(),
                    reason: e.to_string(),
                }
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Reads a PEM file and checks it holds a certificate (or a key), so that errors
    /// name the file rather than a role.
    fn read_pem(&self, file: HomeFile, certificate: bool) -> Result<String, HomeError> {
        let pem = self.read(file)?;
        let what = self.path(file).display().to_string();
        let checked = if certificate {
            dbvm_protocol::tls::certs_from_pem(&pem, &what).map(|_| ())
        } else {
            dbvm_protocol::tls::key_from_pem(&pem, &what).map(|_| ())
        };
        checked.map_err(|e| self.invalid(file, e.to_string()))?;
        Ok(pem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn missing_files_name_the_command_that_creates_them() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().join("h"));
        let err = home.signer().unwrap_err().to_string();
        let path = tmp.path().join("h").join("signing.key");
        assert_eq!(
            err,
            format!(
                "signing key {} not found: run `dbvmctl keygen`",
                path.display()
            )
        );
        let err = home.tls_client_config().unwrap_err().to_string();
        assert!(
            err.contains("ca.crt not found: run `dbvmctl ca init`"),
            "{err}"
        );
    }

    #[test]
    fn writes_are_atomic_with_the_right_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().join("a").join("b"));
        home.write(HomeFile::SealingKey, b"one").unwrap();
        home.write(HomeFile::SealingKey, b"two").unwrap();
        home.write(HomeFile::SealingPub, b"pub").unwrap();
        let mode = |f| fs::metadata(home.path(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(HomeFile::SealingKey), 0o600);
        assert_eq!(mode(HomeFile::SealingPub), 0o644);
        assert_eq!(
            fs::read_to_string(home.path(HomeFile::SealingKey)).unwrap(),
            "two"
        );
        let dir_mode = fs::metadata(home.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        // no temporary file left behind
        let names: Vec<_> = fs::read_dir(home.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn invalid_files_say_so_and_how_to_recover() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path());
        home.write(HomeFile::SealingKey, b"not base64!").unwrap();
        let err = home.sealing_key().unwrap_err().to_string();
        assert!(err.contains("sealing.key is invalid"), "{err}");
        assert!(err.contains("`dbvmctl keygen --force`"), "{err}");
        assert!(!err.contains("not base64!"), "{err}");
    }

    #[test]
    fn explicit_dir_wins() {
        let home = Home::resolve(Some(PathBuf::from("/x/y"))).unwrap();
        assert_eq!(home.dir(), Path::new("/x/y"));
        assert_eq!(
            home.path(HomeFile::ControlPlaneKey),
            Path::new("/x/y/controlplane.key")
        );
    }
}
