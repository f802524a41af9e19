//! Messages on the agent link. Agent→broker is [`AgentMessage`], broker→agent is
//! [`BrokerMessage`]. Variant order is part of the wire format: new variants are only ever
//! appended (a minor version bump), never reordered or removed.

use crate::command::SignedCommand;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// First frame an enrolled agent sends over mTLS. `protocol_major` and `protocol_minor`
/// must stay the first two fields in every future version so a peer can always read them
/// (see [`peek_hello_version`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_major: u16,
    pub protocol_minor: u16,
    pub agent_id: String,
    pub agent_version: String,
    /// Operations this agent can execute (for the control plane to read).
    pub operations: Vec<String>,
    /// Free-form capabilities (for example `journal`, `renew`).
    pub capabilities: Vec<String>,
    /// X25519 public key that commands seal secrets to.
    pub sealing_key: [u8; 32],
    /// `postgres`, `mysql`, or `None` before a database exists.
    pub db_kind: Option<String>,
}

/// First frame of a VM that has no certificate yet (sent over server-authenticated TLS).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub protocol_major: u16,
    pub protocol_minor: u16,
    pub agent_id: String,
    /// The one-time token, as issued by `dbvmctl enroll-token`.
    pub token: String,
    /// PEM certificate signing request made by the agent for its own key.
    pub csr_pem: String,
}

/// Why a command was refused by the agent before it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    Malformed,
    UnknownKey,
    BadSignature,
    WrongTarget,
    Expired,
    NotYetValid,
    LifetimeTooLong,
    Replayed,
    UnsupportedOperation,
    BadArguments,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::WrongTarget => "wrong_target",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::LifetimeTooLong => "lifetime_too_long",
            Self::Replayed => "replayed",
            Self::UnsupportedOperation => "unsupported_operation",
            Self::BadArguments => "bad_arguments",
        }
    }
}

/// How a command ended on the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The operation finished; `output_json` is its result as JSON text.
    Succeeded { output_json: String },
    /// The operation ran and failed.
    Failed { message: String },
    /// The agent refused the command before running it.
    Rejected { code: RejectCode, message: String },
    /// The agent stopped (crash, restart) while the command ran; it is not run again.
    Interrupted { message: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: Uuid,
    pub outcome: Outcome,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
}

/// Something the agent noticed on its own (health changed, role changed, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    pub kind: String,
    pub at_ms: i64,
    pub payload_json: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(Hello),
    Enroll(EnrollRequest),
    Heartbeat {
        seq: u64,
    },
    /// The command is in the agent's journal; the broker will not deliver it again.
    Ack {
        id: Uuid,
    },
    Progress {
        id: Uuid,
        percent: u8,
        message: String,
    },
    Result(CommandResult),
    Event(AgentEvent),
    /// Ask for a new certificate for a fresh key (sent over the mTLS link).
    Renew {
        csr_pem: String,
    },
    /// The latest full health report (protocol minor 1): sent on connect, when a status
    /// changes, and every `health.report_every_s`.
    Health(crate::health::HealthReport),
}

/// Why the broker refuses a connection or a request. The connection closes after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    UnsupportedVersion,
    IdentityMismatch,
    CertificateRequired,
    EnrollmentRefused,
    ProtocolViolation,
    Internal,
    /// The client certificate was revoked (`dbvmctl agents revoke`): the agent must
    /// enroll again with a new token. Added after 1.1; appended, so earlier codes keep
    /// their index.
    CertificateRevoked,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_major: u16,
    pub protocol_minor: u16,
    pub broker_version: String,
    /// How often the agent should send a heartbeat.
    pub heartbeat_interval_ms: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerMessage {
    Welcome(Welcome),
    Refused {
        code: RefuseCode,
        message: String,
    },
    Deliver(SignedCommand),
    /// The broker stored this result durably; the agent may forget it.
    ResultAck {
        id: Uuid,
    },
    HeartbeatAck {
        seq: u64,
    },
    /// Enrollment succeeded: the agent's certificate and the fleet CA, both PEM.
    Enrolled {
        cert_pem: String,
        ca_pem: String,
    },
    /// Renewal succeeded: the new certificate (PEM) for the key in the renewal CSR.
    Renewed {
        cert_pem: String,
    },
    /// Renewal failed; the current certificate stays in use.
    RenewFailed {
        message: String,
    },
}

/// Reads the protocol version of a first frame (Hello or Enroll) without decoding the
/// rest, so a peer speaking another major version gets a clear refusal, not a decode
/// error. Returns `None` when the frame is neither.
pub fn peek_hello_version(payload: &[u8]) -> Option<(u16, u16)> {
    #[derive(Deserialize)]
    struct Head {
        major: u16,
        minor: u16,
    }
    let (variant, rest) = payload.split_first()?;
    if *variant > 1 {
        return None;
    }
    let (head, _): (Head, _) = postcard::take_from_bytes(rest).ok()?;
    Some((head.major, head.minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_version_can_be_read_without_the_rest() {
        let hello = AgentMessage::Hello(Hello {
            protocol_major: 9,
            protocol_minor: 3,
            agent_id: "a".into(),
            agent_version: "x".into(),
            operations: vec![],
            capabilities: vec![],
            sealing_key: [0; 32],
            db_kind: None,
        });
        let bytes = postcard::to_allocvec(&hello).unwrap();
        assert_eq!(peek_hello_version(&bytes), Some((9, 3)));
        let hb = postcard::to_allocvec(&AgentMessage::Heartbeat { seq: 1 }).unwrap();
        assert_eq!(peek_hello_version(&hb), None);
    }
}
