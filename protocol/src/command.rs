//! Signed commands: what a control plane asks an agent to do, and how the agent decides
//! to believe it.
//!
//! A [`SignedCommand`] carries the exact postcard bytes of a [`CommandBody`] and an
//! ed25519 signature over `SIGNING_CONTEXT || body`. The agent verifies those bytes as
//! they arrived and only then decodes them: nothing is ever re-encoded to be verified.

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use uuid::Uuid;

use crate::messages::RejectCode;

/// Domain separation: a signature over a command can never be mistaken for another use.
pub const SIGNING_CONTEXT: &[u8] = b"dbvm.command.v1\0";
/// Version of the [`CommandBody`] layout.
pub const BODY_FORMAT: u16 = 1;
/// Default allowance for clocks that disagree (agent vs control plane).
pub const DEFAULT_CLOCK_SKEW_MS: i64 = 30_000;
/// Longest a command may stay valid; bounds how long the replay journal must remember.
pub const MAX_COMMAND_LIFETIME_MS: i64 = 7 * 24 * 3600 * 1000;

/// What the control plane signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandBody {
    pub format: u16,
    pub id: Uuid,
    pub agent_id: String,
    pub issued_at_ms: i64,
    pub not_after_ms: i64,
    /// Operation name, for example `ping` or `facts`.
    pub operation: String,
    /// Operation arguments as JSON text (an object); sealed secrets inside are strings.
    pub args_json: String,
    /// Public X25519 key that secrets in the result are sealed to.
    pub reply_key: Option<[u8; 32]>,
}

/// The envelope that travels: key id, the exact body bytes, the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    pub key_id: String,
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

impl SignedCommand {
    /// Decodes the body *without* verifying it. For relays (the broker) that route on the
    /// id and target; never for deciding to act.
    pub fn peek_body(&self) -> Result<CommandBody, postcard::Error> {
        postcard::from_bytes(&self.body)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding a struct of Strings and Vecs into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_bytes())
    }

    pub fn from_base64(text: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| format!("signed command is not base64: {e}"))?;
        Self::from_bytes(&bytes).map_err(|e| format!("signed command does not decode: {e}"))
    }
}

/// Key id derived from a public key: `ed25519:` and the first 8 bytes of its SHA-256.
pub fn key_id_for(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("ed25519:{hex}")
}

/// A control-plane signing key with its id.
pub struct CommandSigner {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for CommandSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandSigner")
            .field("key_id", &self.key_id)
            .field("key", &"***")
            .finish()
    }
}

impl CommandSigner {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        // getrandom only fails when the OS has no entropy source; nothing can run then.
        getrandom::getrandom(&mut seed).unwrap_or_else(|e| panic!("no OS randomness: {e}"));
        Self::from_seed(seed)
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let key_id = key_id_for(&key.verifying_key());
        Self { key, key_id }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn sign(&self, body: &CommandBody) -> SignedCommand {
        let body = postcard::to_allocvec(body).unwrap_or_default();
        self.sign_bytes(body)
    }

    /// Signs arbitrary body bytes (tests use this to sign malformed bodies).
    pub fn sign_bytes(&self, body: Vec<u8>) -> SignedCommand {
        let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
        msg.extend_from_slice(SIGNING_CONTEXT);
        msg.extend_from_slice(&body);
        let signature = self.key.sign(&msg).to_bytes().to_vec();
        SignedCommand {
            key_id: self.key_id.clone(),
            body,
            signature,
        }
    }
}

/// Why a command is not believed. Each maps to a [`RejectCode`] sent back to the broker.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("command body does not decode: {0}")]
    Malformed(String),
    #[error("command signed by unknown key id {0:?}")]
    UnknownKey(String),
    #[error("signature does not match the command bytes for key id {0:?}")]
    BadSignature(String),
    #[error("command is for agent {target:?}, this is agent {me:?}")]
    WrongTarget { target: String, me: String },
    #[error("command expired {0} ms ago")]
    Expired(i64),
    #[error("command issued {0} ms in the future (beyond the allowed clock skew)")]
    NotYetValid(i64),
    #[error("command lifetime of {0} ms exceeds the maximum of {MAX_COMMAND_LIFETIME_MS} ms")]
    LifetimeTooLong(i64),
    #[error("command {0} was already received; refusing to run it again")]
    Replayed(Uuid),
    #[error("replay journal unavailable: {0}")]
    Journal(String),
}

impl VerifyError {
    pub fn code(&self) -> RejectCode {
        match self {
            Self::Malformed(_) | Self::Journal(_) => RejectCode::Malformed,
            Self::UnknownKey(_) => RejectCode::UnknownKey,
            Self::BadSignature(_) => RejectCode::BadSignature,
            Self::WrongTarget { .. } => RejectCode::WrongTarget,
            Self::Expired(_) => RejectCode::Expired,
            Self::NotYetValid(_) => RejectCode::NotYetValid,
            Self::LifetimeTooLong(_) => RejectCode::LifetimeTooLong,
            Self::Replayed(_) => RejectCode::Replayed,
        }
    }
}

/// A command whose signature, target and time window were checked.
#[derive(Clone, Debug)]
pub struct VerifiedCommand {
    pub body: CommandBody,
    pub key_id: String,
}

/// Remembers which command ids were seen. Implemented by the agent's durable journal;
/// `record_new` must be atomic: of two calls with the same id, exactly one returns true.
pub trait ReplayGuard {
    fn record_new(&mut self, body: &CommandBody) -> Result<bool, String>;
}

/// Checks commands for one agent against a set of trusted control-plane keys.
#[derive(Clone, Debug)]
pub struct Verifier {
    agent_id: String,
    keys: HashMap<String, VerifyingKey>,
    skew_ms: i64,
    /// Skip the signature check (benchmarks only: shows the broker's own cost).
    skip_signature: bool,
}

impl Verifier {
    pub fn new(agent_id: impl Into<String>) -> Self {
        Self {
            agent_id: agent_id.into(),
            keys: HashMap::new(),
            skew_ms: DEFAULT_CLOCK_SKEW_MS,
            skip_signature: false,
        }
    }

    pub fn trust(mut self, key_id: impl Into<String>, key: VerifyingKey) -> Self {
        self.keys.insert(key_id.into(), key);
        self
    }

    pub fn with_skew_ms(mut self, skew_ms: i64) -> Self {
        self.skew_ms = skew_ms;
        self
    }

    /// For the relay benchmark only: accept any signature so the broker's cost shows.
    pub fn insecure_skip_signature_for_benchmarks(mut self) -> Self {
        self.skip_signature = true;
        self
    }

    /// Checks key, signature, target and time window. Does not check replay.
    pub fn verify(&self, cmd: &SignedCommand, now_ms: i64) -> Result<VerifiedCommand, VerifyError> {
        let key = self
            .keys
            .get(&cmd.key_id)
            .ok_or_else(|| VerifyError::UnknownKey(cmd.key_id.clone()))?;
        if !self.skip_signature {
            let sig = Signature::from_slice(&cmd.signature)
                .map_err(|_| VerifyError::BadSignature(cmd.key_id.clone()))?;
            let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + cmd.body.len());
            msg.extend_from_slice(SIGNING_CONTEXT);
            msg.extend_from_slice(&cmd.body);
            key.verify(&msg, &sig)
                .map_err(|_| VerifyError::BadSignature(cmd.key_id.clone()))?;
        }
        let body: CommandBody =
            postcard::from_bytes(&cmd.body).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        if body.format != BODY_FORMAT {
            return Err(VerifyError::Malformed(format!(
                "body format {} is not supported (this agent reads format {BODY_FORMAT})",
                body.format
            )));
        }
        if body.agent_id != self.agent_id {
            return Err(VerifyError::WrongTarget {
                target: body.agent_id,
                me: self.agent_id.clone(),
            });
        }
        if body.issued_at_ms > now_ms + self.skew_ms {
            return Err(VerifyError::NotYetValid(body.issued_at_ms - now_ms));
        }
        if now_ms > body.not_after_ms + self.skew_ms {
            return Err(VerifyError::Expired(now_ms - body.not_after_ms));
        }
        let lifetime = body.not_after_ms - body.issued_at_ms;
        if lifetime > MAX_COMMAND_LIFETIME_MS {
            return Err(VerifyError::LifetimeTooLong(lifetime));
        }
        Ok(VerifiedCommand {
            body,
            key_id: cmd.key_id.clone(),
        })
    }

    /// Full check: [`Self::verify`] and then the replay journal.
    pub fn verify_once(
        &self,
        cmd: &SignedCommand,
        now_ms: i64,
        journal: &mut impl ReplayGuard,
    ) -> Result<VerifiedCommand, VerifyError> {
        let verified = self.verify(cmd, now_ms)?;
        match journal.record_new(&verified.body) {
            Ok(true) => Ok(verified),
            Ok(false) => Err(VerifyError::Replayed(verified.body.id)),
            Err(e) => Err(VerifyError::Journal(e)),
        }
    }
}

/// Files that hold keys, shared by `dbvmctl` (writes) and the agent (reads the public one).
#[derive(Clone, Serialize, Deserialize)]
pub struct SigningKeyFile {
    pub key_id: String,
    /// base64 of the 32-byte ed25519 seed.
    pub secret_key: String,
}

impl std::fmt::Debug for SigningKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyFile")
            .field("key_id", &self.key_id)
            .field("secret_key", &"***")
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyFile {
    pub key_id: String,
    /// base64 of the 32-byte ed25519 public key.
    pub public_key: String,
}

impl SigningKeyFile {
    pub fn from_signer(signer: &CommandSigner) -> Self {
        Self {
            key_id: signer.key_id().to_string(),
            secret_key: base64::engine::general_purpose::STANDARD.encode(signer.seed()),
        }
    }

    pub fn to_signer(&self) -> Result<CommandSigner, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.secret_key)
            .map_err(|e| format!("secret_key is not base64: {e}"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "secret_key must be 32 bytes".to_string())?;
        let signer = CommandSigner::from_seed(seed);
        if signer.key_id() != self.key_id {
            return Err(format!(
                "key_id {:?} does not match the key (expected {:?})",
                self.key_id,
                signer.key_id()
            ));
        }
        Ok(signer)
    }
}

impl PublicKeyFile {
    pub fn from_key(key: &VerifyingKey) -> Self {
        Self {
            key_id: key_id_for(key),
            public_key: base64::engine::general_purpose::STANDARD.encode(key.as_bytes()),
        }
    }

    pub fn to_key(&self) -> Result<VerifyingKey, String> {
        parse_public_key(&self.public_key)
    }
}

/// Parses a base64 ed25519 public key.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("public key is not base64: {e}"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "public key must be 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an ed25519 public key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    struct Seen(HashSet<Uuid>);
    impl ReplayGuard for Seen {
        fn record_new(&mut self, body: &CommandBody) -> Result<bool, String> {
            Ok(self.0.insert(body.id))
        }
    }

    fn body(agent: &str, now: i64) -> CommandBody {
        CommandBody {
            format: BODY_FORMAT,
            id: Uuid::new_v4(),
            agent_id: agent.into(),
            issued_at_ms: now,
            not_after_ms: now + 60_000,
            operation: "ping".into(),
            args_json: "{}".into(),
            reply_key: None,
        }
    }

    fn setup() -> (CommandSigner, Verifier) {
        let signer = CommandSigner::generate();
        let v = Verifier::new("db1").trust(signer.key_id(), signer.verifying_key());
        (signer, v)
    }

    #[test]
    fn good_command_verifies_once() {
        let (s, v) = setup();
        let now = crate::now_ms();
        let cmd = s.sign(&body("db1", now));
        let mut seen = Seen(HashSet::new());
        assert!(v.verify_once(&cmd, now, &mut seen).is_ok());
        assert!(matches!(
            v.verify_once(&cmd, now, &mut seen),
            Err(VerifyError::Replayed(_))
        ));
    }

    #[test]
    fn every_bad_command_is_refused_with_its_reason() {
        let (s, v) = setup();
        let now = crate::now_ms();
        // forged: body changed after signing
        let mut cmd = s.sign(&body("db1", now));
        let last = cmd.body.len() - 1;
        cmd.body[last] ^= 1;
        assert!(matches!(
            v.verify(&cmd, now),
            Err(VerifyError::BadSignature(_))
        ));
        // unknown key
        let other = CommandSigner::generate();
        let cmd = other.sign(&body("db1", now));
        assert!(matches!(
            v.verify(&cmd, now),
            Err(VerifyError::UnknownKey(_))
        ));
        // right key id, wrong key
        let mut cmd = other.sign(&body("db1", now));
        cmd.key_id = s.key_id().into();
        assert!(matches!(
            v.verify(&cmd, now),
            Err(VerifyError::BadSignature(_))
        ));
        // another agent
        let cmd = s.sign(&body("db2", now));
        assert!(matches!(
            v.verify(&cmd, now),
            Err(VerifyError::WrongTarget { .. })
        ));
        // expired
        let mut b = body("db1", now - 600_000);
        b.not_after_ms = now - 60_000;
        assert!(matches!(
            v.verify(&s.sign(&b), now),
            Err(VerifyError::Expired(_))
        ));
        // from the future
        let b = body("db1", now + 120_000);
        assert!(matches!(
            v.verify(&s.sign(&b), now),
            Err(VerifyError::NotYetValid(_))
        ));
        // too long-lived
        let mut b = body("db1", now);
        b.not_after_ms = now + MAX_COMMAND_LIFETIME_MS + 1;
        assert!(matches!(
            v.verify(&s.sign(&b), now),
            Err(VerifyError::LifetimeTooLong(_))
        ));
        // signed garbage
        let cmd = s.sign_bytes(vec![1, 2, 3]);
        assert!(matches!(
            v.verify(&cmd, now),
            Err(VerifyError::Malformed(_))
        ));
        // truncated signature
        let mut cmd = s.sign(&body("db1", now));
        cmd.signature.truncate(10);
        assert!(matches!(
            v.verify(&cmd, now),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn small_skew_is_allowed() {
        let (s, v) = setup();
        let now = crate::now_ms();
        let b = body("db1", now + 5_000);
        assert!(v.verify(&s.sign(&b), now).is_ok());
    }

    #[test]
    fn key_files_round_trip_and_refuse_mismatched_ids() {
        let s = CommandSigner::generate();
        let f = SigningKeyFile::from_signer(&s);
        assert_eq!(f.to_signer().unwrap().key_id(), s.key_id());
        assert!(!format!("{f:?}").contains(&f.secret_key));
        let mut bad = f.clone();
        bad.key_id = "ed25519:0000".into();
        assert!(bad.to_signer().is_err());
        let p = PublicKeyFile::from_key(&s.verifying_key());
        assert_eq!(p.to_key().unwrap(), s.verifying_key());
    }
}
