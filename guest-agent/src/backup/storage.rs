//! Where backups go: an S3 bucket over TLS, as a command names it. Everything is checked
//! before anything is written; the access keys arrive sealed to this agent and stay
//! [`Secret`]s (never printed, never in a result or an error).

use dbvm_protocol::seal::{Sealed, SealingKey, Secret};
pub use dbvm_s3::parse_endpoint;
use dbvm_s3::{check_bucket, check_prefix, check_region};
use serde::{Deserialize, Serialize};

/// A bucket as a command names it (the secrets travel beside it, sealed).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Location {
    /// `https://host[:port]`. Plain `http://` is refused: backups travel over TLS only.
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// The repository's folder in the bucket; the agent's id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// PEM of the CA that signed the endpoint's certificate, when it is not a public one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// A checked location with its keys.
#[derive(Clone, Debug)]
pub struct Storage {
    pub host: String,
    pub port: u16,
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    pub ca_pem: Option<String>,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
}

impl Storage {
    /// Where the S3 client points: this storage's endpoint, bucket, prefix, CA and keys.
    pub fn endpoint(&self) -> dbvm_s3::Endpoint {
        dbvm_s3::Endpoint {
            host: self.host.clone(),
            port: self.port,
            bucket: self.bucket.clone(),
            region: self.region.clone(),
            prefix: self.prefix.clone(),
            ca_pem: self.ca_pem.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
        }
    }

    /// Checks `location` and opens the sealed keys. Every problem is named; no secret is
    /// ever part of the message.
    pub fn open(
        location: &Location,
        access_key_id: &Sealed,
        secret_access_key: &Sealed,
        key: &SealingKey,
        default_prefix: &str,
    ) -> Result<Self, String> {
        let mut problems = Vec::new();
        let (host, port) = match parse_endpoint(&location.endpoint) {
            Ok(hp) => hp,
            Err(e) => {
                problems.push(format!("endpoint: {e}"));
                (String::new(), 0)
            }
        };
        if let Err(e) = check_bucket(&location.bucket) {
            problems.push(format!("bucket: {e}"));
        }
        if let Err(e) = check_region(&location.region) {
            problems.push(format!("region: {e}"));
        }
        let prefix = location
            .prefix
            .clone()
            .unwrap_or_else(|| default_prefix.to_string());
        if let Err(e) = check_prefix(&prefix) {
            problems.push(format!("prefix: {e}"));
        }
        if let Some(pem) = &location.ca_pem {
            if !pem.contains("-----BEGIN CERTIFICATE-----") || pem.len() > 64 * 1024 {
                problems.push("ca_pem: not a PEM certificate (at most 64 KiB)".into());
            }
        }
        let open = |name: &str, sealed: &Sealed, problems: &mut Vec<String>| match key.open(sealed)
        {
            Ok(s) if !s.expose().is_empty() && s.expose().len() <= 256 => Some(s),
            Ok(_) => {
                problems.push(format!("{name}: empty or longer than 256 characters"));
                None
            }
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                None
            }
        };
        let access_key_id = open("access_key_id", access_key_id, &mut problems);
        let secret_access_key = open("secret_access_key", secret_access_key, &mut problems);
        for (name, s) in [
            ("access_key_id", &access_key_id),
            ("secret_access_key", &secret_access_key),
        ] {
            // The keys end up in a config file of `key=value` lines.
            if s.as_ref()
                .is_some_and(|s| s.expose().chars().any(|c| c.is_control()))
            {
                problems.push(format!("{name}: contains a control character"));
            }
        }
        match (access_key_id, secret_access_key) {
            (Some(access_key_id), Some(secret_access_key)) if problems.is_empty() => Ok(Self {
                host,
                port,
                bucket: location.bucket.clone(),
                region: location.region.clone(),
                prefix,
                ca_pem: location.ca_pem.clone(),
                access_key_id,
                secret_access_key,
            }),
            _ => Err(problems.join("\n")),
        }
    }

    /// The location without secrets, for results and the state file.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "endpoint": format!("https://{}:{}", self.host, self.port),
            "bucket": self.bucket,
            "region": self.region,
            "prefix": self.prefix,
        })
    }
}

/// A storage with its keys as the agent keeps it on disk (a 0600 file of root's, outside
/// the data root the containers see). The keys are wiped from memory when it is dropped.
#[derive(serde::Deserialize, Serialize)]
struct StoredStorage {
    host: String,
    port: u16,
    bucket: String,
    region: String,
    prefix: String,
    ca_pem: Option<String>,
    access_key_id: String,
    secret_access_key: String,
}

impl Drop for StoredStorage {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.access_key_id.zeroize();
        self.secret_access_key.zeroize();
    }
}

/// Writes `storages` with their keys to `path` (atomically, 0600).
pub fn save_file(path: &std::path::Path, storages: &[&Storage]) -> Result<(), String> {
    let stored: Vec<StoredStorage> = storages
        .iter()
        .map(|s| StoredStorage {
            host: s.host.clone(),
            port: s.port,
            bucket: s.bucket.clone(),
            region: s.region.clone(),
            prefix: s.prefix.clone(),
            ca_pem: s.ca_pem.clone(),
            access_key_id: s.access_key_id.expose().to_string(),
            secret_access_key: s.secret_access_key.expose().to_string(),
        })
        .collect();
    // One storage is stored as an object (the format MariaDB's setup has had since it
    // was first written); more as an array.
    let bytes = zeroize::Zeroizing::new(
        match stored.as_slice() {
            [one] => serde_json::to_vec(one),
            many => serde_json::to_vec(many),
        }
        .map_err(|e| format!("cannot encode the storage: {e}"))?,
    );
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    dbvm_host::fs::write_atomic(path, &bytes, 0o600)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// What [`save_file`] wrote; `None` when there is no file.
pub fn load_file(path: &std::path::Path) -> Result<Option<Vec<Storage>>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => zeroize::Zeroizing::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let damaged = |e: serde_json::Error| {
        format!(
            "{} is damaged ({e}): send backup.configure again",
            path.display()
        )
    };
    let stored: Vec<StoredStorage> = if bytes.first() == Some(&b'[') {
        serde_json::from_slice(&bytes).map_err(damaged)?
    } else {
        vec![serde_json::from_slice(&bytes).map_err(damaged)?]
    };
    Ok(Some(
        stored
            .iter()
            .map(|s| Storage {
                host: s.host.clone(),
                port: s.port,
                bucket: s.bucket.clone(),
                region: s.region.clone(),
                prefix: s.prefix.clone(),
                ca_pem: s.ca_pem.clone(),
                access_key_id: Secret::new(s.access_key_id.clone()),
                secret_access_key: Secret::new(s.secret_access_key.clone()),
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_https_host_names() {
        assert_eq!(
            parse_endpoint("https://localhost:9443").unwrap(),
            ("localhost".into(), 9443)
        );
        assert_eq!(
            parse_endpoint("https://S3.example.com/").unwrap(),
            ("s3.example.com".into(), 443)
        );
        for (bad, needle) in [
            ("http://localhost:9000", "plain HTTP"),
            ("ftp://x", "not an https"),
            ("https://127.0.0.1:9443", "not an IP address"),
            ("https://localhost:0", "port"),
            ("https://localhost:9443/bucket", "path"),
            ("https://user@localhost", "path"),
            ("https://", "not a host name"),
            ("https://a b", "not a host name"),
        ] {
            let e = parse_endpoint(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn every_problem_is_named_and_no_secret_is_shown() {
        let key = SealingKey::generate();
        let other = SealingKey::generate();
        let ak = Sealed::seal(&key.public_key(), "AKIDSECRETVALUE").unwrap();
        let sk = Sealed::seal(&other.public_key(), "s3cr3t-v4lue").unwrap();
        let loc = Location {
            endpoint: "http://x".into(),
            bucket: "B".into(),
            region: "US".into(),
            prefix: Some("../x".into()),
            ca_pem: Some("junk".into()),
        };
        let e = Storage::open(&loc, &ak, &sk, &key, "db1").unwrap_err();
        for needle in [
            "endpoint:",
            "bucket:",
            "region:",
            "prefix:",
            "ca_pem:",
            "secret_access_key:",
        ] {
            assert!(e.contains(needle), "{needle} missing from {e}");
        }
        assert!(!e.contains("AKIDSECRETVALUE") && !e.contains("s3cr3t"));
        let sk = Sealed::seal(&key.public_key(), "s3cr3t-v4lue").unwrap();
        let good = Location {
            endpoint: "https://localhost:9443".into(),
            bucket: "dbvm".into(),
            region: "us-east-1".into(),
            prefix: None,
            ca_pem: None,
        };
        let s = Storage::open(&good, &ak, &sk, &key, "db1").unwrap();
        assert_eq!(s.prefix, "db1");
        assert!(!format!("{s:?}").contains("s3cr3t"));
        assert!(!s.describe().to_string().contains("AKID"));
    }
}
