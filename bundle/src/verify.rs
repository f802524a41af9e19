//! Reading a bundle back: [`verify`] checks an archive against its own manifest (every
//! file there with its size and SHA-256, nothing else, the manifest last), streaming, so
//! a bundle of any size is checked in flat memory; [`unpack`] reads every file whole
//! (for small bundles and tests).

use crate::writer::Manifest;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the archive cannot be read: {0}")]
    Read(#[from] std::io::Error),
    #[error("the archive has no manifest.json as its last entry: it is not a complete bundle")]
    NoManifest,
    #[error("manifest.json is not a bundle manifest: {0}")]
    BadManifest(serde_json::Error),
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the bundle `archive` (zstd-compressed tar) against its manifest; returns the
/// manifest.
pub fn verify(archive: impl Read) -> Result<Manifest, VerifyError> {
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(archive)?);
    let mut seen: HashMap<String, (u64, String)> = HashMap::new();
    let mut manifest: Option<Vec<u8>> = None;
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.display().to_string();
        if manifest.is_some() {
            return Err(VerifyError::File {
                path,
                problem: "comes after manifest.json, which must be the last entry".into(),
            });
        }
        if path == "manifest.json" {
            let mut text = Vec::new();
            entry.read_to_end(&mut text)?;
            manifest = Some(text);
            continue;
        }
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut size = 0u64;
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        if seen
            .insert(path.clone(), (size, hex(&h.finalize())))
            .is_some()
        {
            return Err(VerifyError::File {
                path,
                problem: "is in the archive twice".into(),
            });
        }
    }
    let text = manifest.ok_or(VerifyError::NoManifest)?;
    let m: Manifest = serde_json::from_slice(&text).map_err(VerifyError::BadManifest)?;
    let mut total = 0u64;
    for f in &m.files {
        let Some((size, sha)) = seen.remove(&f.path) else {
            return Err(VerifyError::File {
                path: f.path.clone(),
                problem: "is in the manifest but not in the archive".into(),
            });
        };
        if size != f.size || sha != f.sha256 {
            return Err(VerifyError::File {
                path: f.path.clone(),
                problem: format!(
                    "is {size} bytes with SHA-256 {sha}; the manifest says {} bytes with {}",
                    f.size, f.sha256
                ),
            });
        }
        total += size;
    }
    if let Some(path) = seen.into_keys().next() {
        return Err(VerifyError::File {
            path,
            problem: "is in the archive but not in the manifest".into(),
        });
    }
    if total != m.content_bytes {
        return Err(VerifyError::File {
            path: "manifest.json".into(),
            problem: format!(
                "content_bytes is {} but its files add up to {total}",
                m.content_bytes
            ),
        });
    }
    Ok(m)
}

/// Every file of the bundle `archive`, whole, by path (`manifest.json` included).
pub fn unpack(archive: impl Read) -> Result<BTreeMap<String, Vec<u8>>, VerifyError> {
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(archive)?);
    let mut files = BTreeMap::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.display().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        if files.insert(path.clone(), bytes).is_some() {
            return Err(VerifyError::File {
                path,
                problem: "is in the archive twice".into(),
            });
        }
    }
    Ok(files)
}
