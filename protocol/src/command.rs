//! Signed commands: what a control plane asks an agent to do, and how the agent decides
//! to believe it.
//!
//! A [`SignedCommand`] carries the exact postcard bytes of a [`CommandBody`] and an
//! ed25519 signature over `SIGNING_CONTEXT || body`. The broker (before it stores a
//! command) and the agent (before it runs one) each verify those bytes as they arrived
//! against the control plane's public keys ([`TrustedKeys`]) and only then decode them:
//! nothing is ever re-encoded to be verified. Both apply the one [`TimeWindow`] rule.

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
    #[error("command expired {0} ms ago (beyond the allowed clock skew)")]
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

/// The one rule for when a command may run, shared by the broker (at submission and when
/// it expires queued commands) and the agent (before it runs one), so that the broker
/// never refuses or expires what the agent would still accept:
///
/// - issued at most `skew` in the future: `issued_at <= now + skew`;
/// - not expired beyond the skew: `now <= not_after + skew`;
/// - a lifetime (`not_after - issued_at`) of at most [`MAX_COMMAND_LIFETIME_MS`].
///
/// Arithmetic saturates: the times come from the wire and may be anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeWindow {
    skew_ms: i64,
}

impl Default for TimeWindow {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TimeWindow {
    /// With [`DEFAULT_CLOCK_SKEW_MS`]: what the broker uses, and the agent by default.
    pub const DEFAULT: Self = Self {
        skew_ms: DEFAULT_CLOCK_SKEW_MS,
    };

    /// A window allowing `skew_ms` of clock disagreement (negative counts as 0).
    pub fn with_skew_ms(skew_ms: i64) -> Self {
        Self {
            skew_ms: skew_ms.max(0),
        }
    }

    pub fn skew_ms(&self) -> i64 {
        self.skew_ms
    }

    /// True when a command with this `not_after` may no longer run at `now`.
    pub fn is_expired(&self, not_after_ms: i64, now_ms: i64) -> bool {
        now_ms > not_after_ms.saturating_add(self.skew_ms)
    }

    /// The smallest `not_after` still valid at `now`: a command whose `not_after` is
    /// below it has expired (the same rule as [`Self::is_expired`], for a store query).
    pub fn expiry_cutoff(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.skew_ms)
    }

    /// Checks the three rules above, in that order.
    pub fn check(&self, body: &CommandBody, now_ms: i64) -> Result<(), VerifyError> {
        if body.issued_at_ms > now_ms.saturating_add(self.skew_ms) {
            return Err(VerifyError::NotYetValid(
                body.issued_at_ms.saturating_sub(now_ms),
            ));
        }
        if self.is_expired(body.not_after_ms, now_ms) {
            return Err(VerifyError::Expired(
                now_ms.saturating_sub(body.not_after_ms),
            ));
        }
        let lifetime = body.not_after_ms.saturating_sub(body.issued_at_ms);
        if lifetime > MAX_COMMAND_LIFETIME_MS {
            return Err(VerifyError::LifetimeTooLong(lifetime));
        }
        Ok(())
    }
}

/// Why a `[[trusted_keys]]` entry (key id and public key) is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustedKeyError {
    #[error("{0}")]
    PublicKey(String),
    #[error("{given:?} does not belong to this public key (its id is {derived:?})")]
    KeyIdMismatch { given: String, derived: String },
}

impl TrustedKeyError {
    /// The field of the entry that is wrong: `public_key` or `key_id`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::PublicKey(_) => "public_key",
            Self::KeyIdMismatch { .. } => "key_id",
        }
    }
}

/// The control-plane public keys that are believed, by key id. Checks a command's key id
/// and its signature over the exact bytes that arrived, then decodes them: what the
/// broker checks before it stores a command (it has no target, time or replay to check
/// beyond that), and the first half of the agent's [`Verifier`].
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: HashMap<String, VerifyingKey>,
}

impl TrustedKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `key` under `key_id` as given (the caller vouches for the pairing).
    pub fn trust(mut self, key_id: impl Into<String>, key: VerifyingKey) -> Self {
        self.keys.insert(key_id.into(), key);
        self
    }

    /// Trusts a configured entry: `public_key` (base64 ed25519) must parse and
    /// `key_id` must be the id derived from it ([`key_id_for`]).
    pub fn add_entry(&mut self, key_id: &str, public_key: &str) -> Result<(), TrustedKeyError> {
        let key = parse_public_key(public_key).map_err(TrustedKeyError::PublicKey)?;
        let derived = key_id_for(&key);
        if derived != key_id {
            return Err(TrustedKeyError::KeyIdMismatch {
                given: key_id.to_string(),
                derived,
            });
        }
        self.keys.insert(derived, key);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Checks that `cmd` is signed by a trusted key over its exact body bytes, then
    /// decodes the body (of a supported format). Never re-encodes anything.
    pub fn verify(&self, cmd: &SignedCommand) -> Result<CommandBody, VerifyError> {
        let key = self.key(cmd)?;
        let sig = Signature::from_slice(&cmd.signature)
            .map_err(|_| VerifyError::BadSignature(cmd.key_id.clone()))?;
        let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + cmd.body.len());
        msg.extend_from_slice(SIGNING_CONTEXT);
        msg.extend_from_slice(&cmd.body);
        key.verify(&msg, &sig)
            .map_err(|_| VerifyError::BadSignature(cmd.key_id.clone()))?;
        decode_body(&cmd.body)
    }

    fn key(&self, cmd: &SignedCommand) -> Result<&VerifyingKey, VerifyError> {
        self.keys
            .get(&cmd.key_id)
            .ok_or_else(|| VerifyError::UnknownKey(cmd.key_id.clone()))
    }
}

/// Decodes body bytes of the format this build reads.
fn decode_body(bytes: &[u8]) -> Result<CommandBody, VerifyError> {
    let body: CommandBody =
        postcard::from_bytes(bytes).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if body.format != BODY_FORMAT {
        return Err(VerifyError::Malformed(format!(
            "body format {} is not supported (this build reads format {BODY_FORMAT})",
            body.format
        )));
    }
    Ok(body)
}

/// Checks commands for one agent: [`TrustedKeys`] (key and signature), then the target,
/// then the [`TimeWindow`]; [`Self::verify_once`] adds the replay journal.
#[derive(Clone, Debug)]
pub struct Verifier {
    agent_id: String,
    keys: TrustedKeys,
    window: TimeWindow,
    /// Skip the signature check (the relay benchmark only: shows the broker's own cost).
    /// Exists only with the `insecure-bench` feature, which no shipped binary enables.
    #[cfg(feature = "insecure-bench")]
    skip_signature: bool,
}

impl Verifier {
    pub fn new(agent_id: impl Into<String>) -> Self {
        Self {
            agent_id: agent_id.into(),
            keys: TrustedKeys::new(),
            window: TimeWindow::DEFAULT,
            #[cfg(feature = "insecure-bench")]
            skip_signature: false,
        }
    }

    pub fn trust(mut self, key_id: impl Into<String>, key: VerifyingKey) -> Self {
        self.keys = self.keys.trust(key_id, key);
        self
    }

    /// Trusts exactly `keys` (checked entries, as a config gives them).
    pub fn with_keys(mut self, keys: TrustedKeys) -> Self {
        self.keys = keys;
        self
    }

    pub fn with_skew_ms(mut self, skew_ms: i64) -> Self {
        self.window = TimeWindow::with_skew_ms(skew_ms);
        self
    }

    /// For the relay benchmark only: accept any signature so the broker's cost shows.
    /// Compiled only with the `insecure-bench` feature of `dbvm-protocol`, which only
    /// `benches/relay` enables: the agent has no way to turn its signature check off.
    #[cfg(feature = "insecure-bench")]
    pub fn insecure_skip_signature_for_benchmarks(mut self) -> Self {
        self.skip_signature = true;
        self
    }

    fn check_signature(&self, cmd: &SignedCommand) -> Result<CommandBody, VerifyError> {
        #[cfg(feature = "insecure-bench")]
        if self.skip_signature {
            self.keys.key(cmd)?;
            return decode_body(&cmd.body);
        }
        self.keys.verify(cmd)
    }

    /// Checks key, signature, target and time window. Does not check replay.
    pub fn verify(&self, cmd: &SignedCommand, now_ms: i64) -> Result<VerifiedCommand, VerifyError> {
        let body = self.check_signature(cmd)?;
        if body.agent_id != self.agent_id {
            return Err(VerifyError::WrongTarget {
                target: body.agent_id,
                me: self.agent_id.clone(),
            });
        }
        self.window.check(&body, now_ms)?;
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

    /// The window's edges, exactly: the last valid millisecond and the first invalid one
    /// on each side, for the default skew and a configured one.
    #[test]
    fn time_window_boundaries() {
        for skew in [DEFAULT_CLOCK_SKEW_MS, 0, 5_000] {
            let w = TimeWindow::with_skew_ms(skew);
            let now = 1_000_000_000;
            let at = |issued: i64, not_after: i64| {
                let mut b = body("db1", 0);
                b.issued_at_ms = issued;
                b.not_after_ms = not_after;
                w.check(&b, now)
            };
            // issued-at: up to now + skew
            assert_eq!(at(now + skew, now + 60_000), Ok(()));
            assert_eq!(
                at(now + skew + 1, now + 60_000),
                Err(VerifyError::NotYetValid(skew + 1))
            );
            // expiry: still valid at not_after + skew, expired one millisecond later
            assert_eq!(at(now - 60_000, now - skew), Ok(()));
            assert!(!w.is_expired(now - skew, now));
            assert_eq!(
                at(now - 60_000, now - skew - 1),
                Err(VerifyError::Expired(skew + 1))
            );
            assert!(w.is_expired(now - skew - 1, now));
            // the store's cutoff is the same rule: expired iff not_after < cutoff
            assert_eq!(w.expiry_cutoff(now), now - skew);
            for not_after in [now - skew - 1, now - skew, now - skew + 1] {
                assert_eq!(
                    not_after < w.expiry_cutoff(now),
                    w.is_expired(not_after, now),
                    "{not_after}"
                );
            }
            // lifetime: at most the maximum
            assert_eq!(at(now, now + MAX_COMMAND_LIFETIME_MS), Ok(()));
            assert_eq!(
                at(now, now + MAX_COMMAND_LIFETIME_MS + 1),
                Err(VerifyError::LifetimeTooLong(MAX_COMMAND_LIFETIME_MS + 1))
            );
        }
        assert_eq!(TimeWindow::with_skew_ms(-5).skew_ms(), 0);
        assert_eq!(TimeWindow::default().skew_ms(), DEFAULT_CLOCK_SKEW_MS);
    }

    #[test]
    fn time_window_survives_extreme_times_from_the_wire() {
        let w = TimeWindow::DEFAULT;
        let now = crate::now_ms();
        let mut b = body("db1", now);
        b.issued_at_ms = i64::MIN;
        b.not_after_ms = i64::MAX;
        assert!(matches!(
            w.check(&b, now),
            Err(VerifyError::LifetimeTooLong(_))
        ));
        b.issued_at_ms = i64::MAX;
        assert!(matches!(w.check(&b, now), Err(VerifyError::NotYetValid(_))));
        b.issued_at_ms = i64::MIN;
        b.not_after_ms = i64::MIN;
        assert!(matches!(w.check(&b, now), Err(VerifyError::Expired(_))));
        assert!(!w.is_expired(i64::MAX, now));
        assert_eq!(w.expiry_cutoff(i64::MIN), i64::MIN);
    }

    /// The agent's verifier applies the same window as the broker.
    #[test]
    fn the_verifier_uses_the_time_window() {
        let (s, v) = setup();
        let now = crate::now_ms();
        let mut b = body("db1", now - 60_000);
        b.not_after_ms = now - DEFAULT_CLOCK_SKEW_MS;
        assert!(v.verify(&s.sign(&b), now).is_ok());
        b.not_after_ms -= 1;
        assert_eq!(
            v.verify(&s.sign(&b), now).map(|_| ()),
            TimeWindow::DEFAULT.check(&b, now)
        );
        assert!(matches!(
            v.verify(&s.sign(&b), now),
            Err(VerifyError::Expired(_))
        ));
    }

    #[test]
    fn trusted_keys_check_key_and_signature_over_the_exact_bytes_without_a_target() {
        let s = CommandSigner::generate();
        let keys = TrustedKeys::new().trust(s.key_id(), s.verifying_key());
        let now = crate::now_ms();
        // any target, any time: those are the agent's to judge
        let b = body("any-agent", now - 10 * MAX_COMMAND_LIFETIME_MS);
        assert_eq!(keys.verify(&s.sign(&b)), Ok(b.clone()));
        let mut forged = s.sign(&b);
        forged.signature = vec![0; 64];
        assert_eq!(
            keys.verify(&forged),
            Err(VerifyError::BadSignature(s.key_id().into()))
        );
        let mut unsigned = s.sign(&b);
        unsigned.signature.clear();
        assert!(matches!(
            keys.verify(&unsigned),
            Err(VerifyError::BadSignature(_))
        ));
        let other = CommandSigner::generate();
        assert!(matches!(
            keys.verify(&other.sign(&b)),
            Err(VerifyError::UnknownKey(_))
        ));
        let mut claimed = other.sign(&b);
        claimed.key_id = s.key_id().into();
        assert!(matches!(
            keys.verify(&claimed),
            Err(VerifyError::BadSignature(_))
        ));
        assert!(matches!(
            keys.verify(&s.sign_bytes(vec![1, 2, 3])),
            Err(VerifyError::Malformed(_))
        ));
        let mut old = b.clone();
        old.format = BODY_FORMAT + 1;
        assert!(matches!(
            keys.verify(&s.sign(&old)),
            Err(VerifyError::Malformed(_))
        ));
        assert!(TrustedKeys::new().verify(&s.sign(&b)).is_err());
    }

    #[test]
    fn trusted_key_entries_are_checked_against_their_key_id() {
        let s = CommandSigner::generate();
        let p = PublicKeyFile::from_key(&s.verifying_key());
        let mut keys = TrustedKeys::new();
        assert!(keys.is_empty());
        keys.add_entry(&p.key_id, &p.public_key).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys.verify(&s.sign(&body("db1", 0))).is_ok());
        let e = keys
            .add_entry("ed25519:0000000000000000", &p.public_key)
            .unwrap_err();
        assert_eq!(e.field(), "key_id");
        assert!(e.to_string().contains(&p.key_id), "{e}");
        let e = keys.add_entry(&p.key_id, "not base64!").unwrap_err();
        assert_eq!(e.field(), "public_key");
        assert!(e.to_string().contains("base64"), "{e}");
        assert_eq!(keys.len(), 1);
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
