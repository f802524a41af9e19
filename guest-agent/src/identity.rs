//! The agent's own files in `state_dir`: its certificate and key (one file, replaced
//! atomically so a crash never pairs a new key with an old certificate), its sealing key,
//! and the path of its command journal. Secret files are created 0600.

use dbvm_protocol::pki::validity_ms;
use dbvm_protocol::seal::SealingKey;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} is damaged: {1}")]
    Damaged(PathBuf, String),
}

/// The agent's TLS identity: certificate (PEM) and private key (PEM).
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("not_before_ms", &self.not_before_ms)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn new(cert_pem: String, key_pem: String) -> Result<Self, String> {
        let (not_before_ms, not_after_ms) = validity_ms(&cert_pem).map_err(|e| e.to_string())?;
        Ok(Self {
            cert_pem,
            key_pem,
            not_before_ms,
            not_after_ms,
        })
    }

    /// When to ask for a new certificate: two thirds into its lifetime.
    pub fn renew_at_ms(&self) -> i64 {
        self.not_before_ms + (self.not_after_ms - self.not_before_ms) * 2 / 3
    }

    pub fn expired(&self, now_ms: i64) -> bool {
        now_ms >= self.not_after_ms
    }
}

#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
}

/// Writes a file atomically and durably (see [`dbvm_host::fs::write_atomic`]).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    dbvm_host::fs::write_atomic(path, contents, mode)
        .map_err(|e| StateError::Write(path.to_path_buf(), e))
}

impl StateDir {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(path).map_err(|e| StateError::CreateDir(path.to_path_buf(), e))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn journal_path(&self) -> PathBuf {
        self.path.join("journal.sqlite3")
    }

    fn identity_path(&self) -> PathBuf {
        self.path.join("identity.pem")
    }

    /// Loads the sealing key, creating it on first start.
    pub fn sealing_key(&self) -> Result<SealingKey, StateError> {
        let path = self.path.join("sealing.key");
        match std::fs::read_to_string(&path) {
            Ok(text) => SealingKey::from_seed_base64(&text)
                .map_err(|e| StateError::Damaged(path, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SealingKey::generate();
                write_atomic(&path, key.seed_base64().as_bytes(), 0o600)?;
                Ok(key)
            }
            Err(e) => Err(StateError::Read(path, e)),
        }
    }

    /// The public half of the stored sealing key, without making one when there is none
    /// (an upgrade's trial run writes nothing).
    pub fn sealing_key_public(&self) -> Result<[u8; 32], StateError> {
        let path = self.path.join("sealing.key");
        let text = std::fs::read_to_string(&path).map_err(|e| StateError::Read(path.clone(), e))?;
        SealingKey::from_seed_base64(&text)
            .map(|k| k.public_key())
            .map_err(|e| StateError::Damaged(path, e.to_string()))
    }

    /// The stored certificate and key, if the agent has enrolled.
    pub fn identity(&self) -> Result<Option<Identity>, StateError> {
        let path = self.identity_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Read(path, e)),
        };
        let (cert, key) = text
            .split_once("-----BEGIN PRIVATE KEY-----")
            .ok_or_else(|| StateError::Damaged(path.clone(), "no private key".into()))?;
        let key = format!("-----BEGIN PRIVATE KEY-----{key}");
        Identity::new(cert.trim().to_string() + "\n", key)
            .map(Some)
            .map_err(|e| StateError::Damaged(path, e))
    }

    pub fn store_identity(&self, id: &Identity) -> Result<(), StateError> {
        let text = format!("{}\n{}", id.cert_pem.trim(), id.key_pem);
        write_atomic(&self.identity_path(), text.as_bytes(), 0o600)?;
        // Where it was enrolled: a clone of this VM finds another fingerprint and does not
        // use it (see `firstboot::set_aside_a_cloned_identity`).
        write_atomic(
            &self.path.join(crate::firstboot::MACHINE_FILE),
            crate::firstboot::fingerprint().as_bytes(),
            0o600,
        )
    }

    /// Sets a revoked identity aside (`identity.pem.revoked`, kept for whoever looks into
    /// why), so the next connection enrolls again with a new token.
    pub fn retire_identity(&self) -> Result<(), StateError> {
        let from = self.identity_path();
        let to = self.path.join("identity.pem.revoked");
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StateError::Write(from, e)),
        }
        dbvm_host::fs::sync_dir(&from).map_err(|e| StateError::Write(self.path.clone(), e))
    }
}
