//! Command results at rest: the versioned encoding the agent's journal keeps a result in
//! until the broker acknowledges it, apart from the wire encoding.
//!
//! The wire encoding of [`CommandResult`] follows the protocol: a minor version may add to
//! it. A journal entry written before an upgrade must still read after it, or a result the
//! broker never acknowledged is lost. So a stored result is a version tag
//! ([`StoredResult::version`]) and bytes in that version's *frozen* layout, defined here
//! and converted to and from the current [`CommandResult`].
//!
//! Rules for changing it:
//! - A released layout never changes: nothing is added to, removed from or reordered in
//!   `v1::Result` and the types it holds. Postcard (varints, length-prefixed strings and
//!   byte strings, enums as a variant index) then fixes the bytes.
//! - A change to [`CommandResult`] (a new field, outcome or reject code) leaves `to_v1`
//!   unable to hold it; the compiler says so, because its matches are exhaustive. Then add
//!   version 2 beside version 1: a new frozen module, its conversions, a decode arm, and
//!   [`NEWEST_VERSION`] = 2. Version 1 keeps decoding (what it lacks gets its default).
//! - [`encode`] writes the *oldest* version that holds a result exactly, so an agent
//!   rolled back to before version N still reads every result it could have produced
//!   itself.
//!
//! Version 1 is postcard of the wire `CommandResult` of protocol 1.0 and 1.1, which is
//! what agents wrote into their journal before stored results had versions: their
//! journals read as version 1, byte for byte (`protocol/fixtures/command-result-v1.hex`
//! holds such bytes, and a test decodes them).
//!
//! The tag travels *beside* the bytes, not inside them (the journal keeps it in a column
//! of its own). Inside, it would make every entry unreadable to the agent before this
//! module, which decodes the whole blob as a `CommandResult`.
//!
//! Rollback, what holds:
//! - To the agent before this module: it reads every entry, because every result today
//!   is written as version 1, whose bytes are exactly what that agent writes and reads; it
//!   ignores the tag column and its own rows get the column's default, 1.
//! - Across a future version N: results that only N holds cannot be read by an older
//!   agent. One that knows tags skips that entry with [`StoredError::Newer`] and sends
//!   the others; the agent before tags finds the entry corrupt, and while it is there that
//!   agent re-sends none of its unacknowledged results (it reads them all or none). So
//!   roll back across N only after the broker has acknowledged the newer agent's results
//!   (acknowledged entries are never read again): stop sending it commands and wait until
//!   it has no unacknowledged result, then roll back.

use serde::Deserialize;
use uuid::Uuid;

use crate::messages::{CommandResult, Outcome, RejectCode};

/// The newest stored-result version this build reads.
pub const NEWEST_VERSION: u16 = 1;

/// A result ready to store: its layout version and the bytes in that layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResult {
    pub version: u16,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoredError {
    #[error(
        "stored result version {found} was written by a newer agent (this one reads versions \
         1 to {NEWEST_VERSION}); upgrade the agent again to send it"
    )]
    Newer { found: u16 },
    #[error(
        "stored result version {found} does not exist (versions start at 1): the entry is damaged"
    )]
    Unknown { found: u16 },
    #[error("stored result (version {version}) does not decode: {reason}")]
    Undecodable { version: u16, reason: String },
    #[error("cannot encode a result for storage: {0}")]
    Encode(String),
}

/// Encodes `result` in the oldest version that holds it exactly (today: version 1).
pub fn encode(result: &CommandResult) -> Result<StoredResult, StoredError> {
    let bytes =
        postcard::to_allocvec(&to_v1(result)).map_err(|e| StoredError::Encode(e.to_string()))?;
    Ok(StoredResult { version: 1, bytes })
}

/// Decodes bytes stored as `version`. Every version up to [`NEWEST_VERSION`] reads; a
/// newer one is a clear error, never a guess.
pub fn decode(version: u16, bytes: &[u8]) -> Result<CommandResult, StoredError> {
    match version {
        0 => Err(StoredError::Unknown { found: version }),
        1 => from_v1(strict(version, bytes)?)
            .map_err(|reason| StoredError::Undecodable { version, reason }),
        _ => Err(StoredError::Newer { found: version }),
    }
}

/// The whole of `bytes` as one `T`: trailing bytes mean the entry is not what its tag
/// says, so they are refused rather than ignored.
fn strict<'a, T: Deserialize<'a>>(version: u16, bytes: &'a [u8]) -> Result<T, StoredError> {
    let undecodable = |reason: String| StoredError::Undecodable { version, reason };
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| undecodable(e.to_string()))?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(undecodable(format!(
            "{} bytes after the end of the result",
            rest.len()
        )))
    }
}

/// Version 1, frozen: the wire `CommandResult` of protocol 1.0 and 1.1. Never edit.
mod v1 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct Result {
        /// The command id as a byte string: length 16, then its bytes (what `uuid`
        /// writes in postcard, spelled out so a change there cannot move these bytes).
        pub id: Vec<u8>,
        pub outcome: Outcome,
        pub started_at_ms: i64,
        pub finished_at_ms: i64,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) enum Outcome {
        Succeeded { output_json: String },
        Failed { message: String },
        Rejected { code: RejectCode, message: String },
        Interrupted { message: String },
    }

    #[derive(Clone, Copy, Debug, Serialize, Deserialize)]
    pub(super) enum RejectCode {
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
}

// The matches below are exhaustive on purpose: a new field, outcome or reject code does
// not compile until it has a stored version (see the module rules).

fn to_v1(r: &CommandResult) -> v1::Result {
    // Destructured so that a new field fails to compile here instead of being dropped.
    let CommandResult {
        id,
        outcome,
        started_at_ms,
        finished_at_ms,
    } = r;
    let outcome = match outcome {
        Outcome::Succeeded { output_json } => v1::Outcome::Succeeded {
            output_json: output_json.clone(),
        },
        Outcome::Failed { message } => v1::Outcome::Failed {
            message: message.clone(),
        },
        Outcome::Rejected { code, message } => v1::Outcome::Rejected {
            code: code_to_v1(*code),
            message: message.clone(),
        },
        Outcome::Interrupted { message } => v1::Outcome::Interrupted {
            message: message.clone(),
        },
    };
    v1::Result {
        id: id.as_bytes().to_vec(),
        outcome,
        started_at_ms: *started_at_ms,
        finished_at_ms: *finished_at_ms,
    }
}

fn from_v1(r: v1::Result) -> Result<CommandResult, String> {
    let id = Uuid::from_slice(&r.id)
        .map_err(|_| format!("the command id has {} bytes, not 16", r.id.len()))?;
    let outcome = match r.outcome {
        v1::Outcome::Succeeded { output_json } => Outcome::Succeeded { output_json },
        v1::Outcome::Failed { message } => Outcome::Failed { message },
        v1::Outcome::Rejected { code, message } => Outcome::Rejected {
            code: code_from_v1(code),
            message,
        },
        v1::Outcome::Interrupted { message } => Outcome::Interrupted { message },
    };
    Ok(CommandResult {
        id,
        outcome,
        started_at_ms: r.started_at_ms,
        finished_at_ms: r.finished_at_ms,
    })
}

fn code_to_v1(code: RejectCode) -> v1::RejectCode {
    match code {
        RejectCode::Malformed => v1::RejectCode::Malformed,
        RejectCode::UnknownKey => v1::RejectCode::UnknownKey,
        RejectCode::BadSignature => v1::RejectCode::BadSignature,
        RejectCode::WrongTarget => v1::RejectCode::WrongTarget,
        RejectCode::Expired => v1::RejectCode::Expired,
        RejectCode::NotYetValid => v1::RejectCode::NotYetValid,
        RejectCode::LifetimeTooLong => v1::RejectCode::LifetimeTooLong,
        RejectCode::Replayed => v1::RejectCode::Replayed,
        RejectCode::UnsupportedOperation => v1::RejectCode::UnsupportedOperation,
        RejectCode::BadArguments => v1::RejectCode::BadArguments,
    }
}

fn code_from_v1(code: v1::RejectCode) -> RejectCode {
    match code {
        v1::RejectCode::Malformed => RejectCode::Malformed,
        v1::RejectCode::UnknownKey => RejectCode::UnknownKey,
        v1::RejectCode::BadSignature => RejectCode::BadSignature,
        v1::RejectCode::WrongTarget => RejectCode::WrongTarget,
        v1::RejectCode::Expired => RejectCode::Expired,
        v1::RejectCode::NotYetValid => RejectCode::NotYetValid,
        v1::RejectCode::LifetimeTooLong => RejectCode::LifetimeTooLong,
        v1::RejectCode::Replayed => RejectCode::Replayed,
        v1::RejectCode::UnsupportedOperation => RejectCode::UnsupportedOperation,
        v1::RejectCode::BadArguments => RejectCode::BadArguments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../fixtures/command-result-v1.hex");

    const CODES: [RejectCode; 10] = [
        RejectCode::Malformed,
        RejectCode::UnknownKey,
        RejectCode::BadSignature,
        RejectCode::WrongTarget,
        RejectCode::Expired,
        RejectCode::NotYetValid,
        RejectCode::LifetimeTooLong,
        RejectCode::Replayed,
        RejectCode::UnsupportedOperation,
        RejectCode::BadArguments,
    ];

    /// The results the fixture holds, rebuilt exactly as the program that wrote it built
    /// them: line `n` (from 0) is this `n`.
    fn fixture_result(n: usize) -> (&'static str, CommandResult) {
        let (name, outcome) = match n {
            0 => (
                "succeeded",
                Outcome::Succeeded {
                    output_json: r#"{"state":"running","port":25432}"#.into(),
                },
            ),
            1 => (
                "failed",
                Outcome::Failed {
                    message: "initdb failed: données invalides".into(),
                },
            ),
            2 => (
                "interrupted",
                Outcome::Interrupted {
                    message: "the agent stopped while db.create was running".into(),
                },
            ),
            _ => {
                let code = CODES[n - 3];
                (
                    code.as_str(),
                    Outcome::Rejected {
                        code,
                        message: format!("refused: {}", code.as_str()),
                    },
                )
            }
        };
        let i = n as u128;
        let result = CommandResult {
            id: Uuid::from_u128(0x0123_4567_89ab_cdef_0000_0000_0000_0000 + i),
            outcome,
            started_at_ms: 1_700_000_000_000 + n as i64,
            finished_at_ms: 1_700_000_000_250 + n as i64,
        };
        (name, result)
    }

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn fixture() -> Vec<(String, Vec<u8>)> {
        FIXTURE
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| {
                let (name, hex) = line.split_once(' ').expect("<name> <hex>");
                (name.to_string(), unhex(hex.trim()))
            })
            .collect()
    }

    #[test]
    fn version_1_reads_what_the_agent_before_versions_wrote_byte_for_byte() {
        let lines = fixture();
        assert_eq!(
            lines.len(),
            3 + CODES.len(),
            "one line per outcome and code"
        );
        for (n, (name, bytes)) in lines.iter().enumerate() {
            let (want_name, want) = fixture_result(n);
            assert_eq!(name, want_name, "line {n}");
            assert_eq!(decode(1, bytes).as_ref(), Ok(&want), "{name}");
            // And what this agent writes is those same bytes, which the agent before
            // versions reads after a rollback.
            assert_eq!(
                encode(&want),
                Ok(StoredResult {
                    version: 1,
                    bytes: bytes.clone()
                }),
                "{name}"
            );
        }
    }

    #[test]
    fn every_result_round_trips() {
        for n in 0..3 + CODES.len() {
            let (_, result) = fixture_result(n);
            let stored = encode(&result).expect("encode");
            assert_eq!(decode(stored.version, &stored.bytes), Ok(result));
        }
    }

    #[test]
    fn unknown_versions_and_damaged_bytes_are_clear_errors() {
        let (_, result) = fixture_result(0);
        let good = encode(&result).expect("encode").bytes;
        let newer = decode(2, &good).unwrap_err();
        assert_eq!(newer, StoredError::Newer { found: 2 });
        assert_eq!(
            newer.to_string(),
            "stored result version 2 was written by a newer agent (this one reads versions 1 \
             to 1); upgrade the agent again to send it"
        );
        assert_eq!(
            decode(u16::MAX, &[]),
            Err(StoredError::Newer { found: u16::MAX })
        );
        assert_eq!(decode(0, &good), Err(StoredError::Unknown { found: 0 }));
        for (what, bytes) in [
            ("empty", Vec::new()),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("garbage", vec![0xff; 40]),
            ("a 4-byte id", {
                let mut b = vec![4, 1, 2, 3, 4];
                b.extend_from_slice(&good[17..]);
                b
            }),
            ("an unknown outcome", {
                let mut b = good.clone();
                b[17] = 9;
                b
            }),
            ("trailing bytes", {
                let mut b = good.clone();
                b.push(0);
                b
            }),
        ] {
            match decode(1, &bytes) {
                Err(StoredError::Undecodable { version: 1, reason }) => {
                    assert!(!reason.is_empty(), "{what}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        let e = decode(1, &[4, 1, 2, 3, 4]).unwrap_err().to_string();
        assert!(
            e.starts_with("stored result (version 1) does not decode"),
            "{e}"
        );
    }
}
