//! The dbvm wire protocol: the only crate that knows how bytes on the agent link look.
//!
//! It defines the frames and messages exchanged between `dbvm-agent` and `dbvm-broker`
//! ([`frame`], [`messages`]), the signed command format and its verifier ([`command`]),
//! secrets sealed to their recipient ([`seal`]), identities inside fleet certificates
//! ([`pki`]) and the rustls configurations both ends use ([`tls`]). It also owns the
//! versioned encoding the agent's journal keeps results in ([`stored`]). It makes no
//! runtime choices: the async helpers only need `tokio::io` traits.
//!
//! The format is documented in `docs/wire-format.md`.

pub mod api;
pub mod command;
pub mod frame;
pub mod health;
pub mod ids;
pub mod messages;
pub mod pki;
pub mod seal;
pub mod stored;
pub mod tls;

/// Major version of the agent link protocol. Peers with another major are refused.
pub const PROTOCOL_MAJOR: u16 = 1;
/// Minor version: additions only (new optional messages, new operations).
///
/// - 1: `AgentMessage::Health` (full health reports); agents send it only to brokers
///   that speak minor 1 or later.
/// - 2: `RefuseCode::CertificateRevoked`. An agent before it cannot decode that refusal
///   and sees a broken frame: refused either way, only the reason is lost.
pub const PROTOCOL_MINOR: u16 = 2;

/// Milliseconds since the Unix epoch, the only clock unit on the wire.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

pub use command::{CommandBody, SignedCommand, VerifiedCommand, Verifier, VerifyError};
pub use ids::{AgentId, IdError};
pub use messages::{AgentMessage, BrokerMessage};
