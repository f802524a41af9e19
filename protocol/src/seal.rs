//! Sealed secrets: a value encrypted to its recipient with HPKE (RFC 9180, base mode,
//! X25519 + HKDF-SHA256 + ChaCha20-Poly1305), so that relays carry only ciphertext.
//!
//! Commands seal database passwords and S3 keys to the agent's key; results seal
//! generated credentials to the control plane's `reply_key`. The broker holds neither
//! private key. On the wire and in JSON a sealed value is one string:
//! `sealed:v1:<base64url(postcard(SealedInner))>`.

use base64::Engine;
use hpke::{
    aead::ChaCha20Poly1305, kdf::HkdfSha256, kem::X25519HkdfSha256, Deserializable, Kem as _,
    OpModeR, OpModeS, Serializable,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type Kem = X25519HkdfSha256;
const INFO: &[u8] = b"dbvm.sealed.v1";
const PREFIX: &str = "sealed:v1:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("not a sealed value (expected a string starting with {PREFIX:?})")]
    NotSealed,
    #[error("sealed value does not decode")]
    Malformed,
    #[error("sealed to another key (fingerprint {0}), not to this one")]
    WrongRecipient(String),
    #[error("sealed value could not be opened (tampered with, or not for this key)")]
    Open,
    #[error("public key is not a valid X25519 key")]
    BadKey,
    #[error("sealing failed")]
    Seal,
}

/// A secret in memory: zeroed on drop, `***` when printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// An X25519 key pair for opening sealed values (agent: commands; control plane: results).
pub struct SealingKey {
    seed: Zeroizing<[u8; 32]>,
    private: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; 32],
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey")
            .field("public", &fingerprint(&self.public))
            .finish_non_exhaustive()
    }
}

impl SealingKey {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).unwrap_or_else(|e| panic!("no OS randomness: {e}"));
        Self::from_seed(seed)
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        let (private, public) = Kem::derive_keypair(&seed);
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&public.to_bytes());
        Self {
            seed: Zeroizing::new(seed),
            private,
            public: pk,
        }
    }

    /// The 32 secret bytes the key is derived from (to store it).
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    pub fn seed_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*self.seed))
    }

    pub fn from_seed_base64(text: &str) -> Result<Self, SealError> {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| SealError::BadKey)?,
        );
        let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| SealError::BadKey)?;
        Ok(Self::from_seed(seed))
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Opens a sealed value addressed to this key.
    pub fn open(&self, sealed: &Sealed) -> Result<Secret, SealError> {
        let inner = sealed.inner()?;
        let mine = fingerprint_bytes(&self.public);
        if inner.recipient != mine {
            return Err(SealError::WrongRecipient(hex(&inner.recipient)));
        }
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&inner.enc)
            .map_err(|_| SealError::Malformed)?;
        let plain = Zeroizing::new(
            hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
                &OpModeR::Base,
                &self.private,
                &enc,
                INFO,
                &inner.ciphertext,
                &inner.recipient,
            )
            .map_err(|_| SealError::Open)?,
        );
        let text = String::from_utf8(plain.to_vec()).map_err(|_| SealError::Malformed)?;
        Ok(Secret::new(text))
    }
}

#[derive(Serialize, Deserialize)]
struct SealedInner {
    recipient: [u8; 8],
    enc: Vec<u8>,
    ciphertext: Vec<u8>,
}

/// A secret encrypted to one recipient. Serialises as a single string, in JSON and postcard.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sealed(String);

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

impl TryFrom<String> for Sealed {
    type Error = SealError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        let s = Self(value);
        s.inner()?;
        Ok(s)
    }
}

impl From<Sealed> for String {
    fn from(value: Sealed) -> Self {
        value.0
    }
}

impl Sealed {
    /// Seals `secret` to the X25519 public key `recipient`.
    pub fn seal(recipient: &[u8; 32], secret: &str) -> Result<Self, SealError> {
        let pk =
            <Kem as hpke::Kem>::PublicKey::from_bytes(recipient).map_err(|_| SealError::BadKey)?;
        let fp = fingerprint_bytes(recipient);
        let (enc, ciphertext) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
            &OpModeS::Base,
            &pk,
            INFO,
            secret.as_bytes(),
            &fp,
            &mut rand::rngs::OsRng,
        )
        .map_err(|_| SealError::Seal)?;
        let inner = SealedInner {
            recipient: fp,
            enc: enc.to_bytes().to_vec(),
            ciphertext,
        };
        let bytes = postcard::to_allocvec(&inner).map_err(|_| SealError::Seal)?;
        Ok(Self(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Fingerprint of the key this value is sealed to.
    pub fn recipient(&self) -> Result<String, SealError> {
        Ok(hex(&self.inner()?.recipient))
    }

    fn inner(&self) -> Result<SealedInner, SealError> {
        let rest = self.0.strip_prefix(PREFIX).ok_or(SealError::NotSealed)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(rest)
            .map_err(|_| SealError::Malformed)?;
        postcard::from_bytes(&bytes).map_err(|_| SealError::Malformed)
    }
}

fn fingerprint_bytes(public: &[u8; 32]) -> [u8; 8] {
    let d = Sha256::digest(public);
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Short printable fingerprint of an X25519 public key.
pub fn fingerprint(public: &[u8; 32]) -> String {
    hex(&fingerprint_bytes(public))
}

/// Parses a base64 X25519 public key.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], SealError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| SealError::BadKey)?;
    bytes.try_into().map_err(|_| SealError::BadKey)
}

pub fn public_key_base64(public: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open() {
        let key = SealingKey::generate();
        let sealed = Sealed::seal(&key.public_key(), "hunter2").unwrap();
        assert!(!sealed.as_str().contains("hunter2"));
        assert_eq!(key.open(&sealed).unwrap().expose(), "hunter2");
        assert_eq!(format!("{:?}", key.open(&sealed).unwrap()), "***");
        // serde round trip through JSON
        let json = serde_json::to_string(&sealed).unwrap();
        let back: Sealed = serde_json::from_str(&json).unwrap();
        assert_eq!(key.open(&back).unwrap().expose(), "hunter2");
    }

    #[test]
    fn wrong_key_and_tampering_are_refused() {
        let key = SealingKey::generate();
        let other = SealingKey::generate();
        let sealed = Sealed::seal(&key.public_key(), "s3cret").unwrap();
        assert!(matches!(
            other.open(&sealed),
            Err(SealError::WrongRecipient(_))
        ));
        let mut inner = sealed.inner().unwrap();
        let n = inner.ciphertext.len() - 1;
        inner.ciphertext[n] ^= 1;
        let bytes = postcard::to_allocvec(&inner).unwrap();
        let tampered = Sealed(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        ));
        assert_eq!(key.open(&tampered).unwrap_err(), SealError::Open);
        assert!(serde_json::from_str::<Sealed>("\"plain\"").is_err());
    }

    #[test]
    fn key_survives_its_seed() {
        let key = SealingKey::generate();
        let again = SealingKey::from_seed_base64(&key.seed_base64()).unwrap();
        assert_eq!(key.public_key(), again.public_key());
    }
}
