//! Agent identifiers: the names agents are known by in certificates, commands and queues.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A validated agent id: 1–63 characters of `a-z`, `0-9`, `-` and `.`, starting with a
/// letter or digit, so it fits in a DNS label, a file name and a certificate URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("agent id is empty")]
    Empty,
    #[error("agent id {0:?} is longer than 63 characters")]
    TooLong(String),
    #[error(
        "agent id {0:?} may only hold a-z, 0-9, '-' and '.', and must start with a letter or digit"
    )]
    BadCharacter(String),
}

impl AgentId {
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(IdError::Empty);
        }
        if id.len() > 63 {
            return Err(IdError::TooLong(id));
        }
        let first_ok = id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !first_ok || !rest_ok {
            return Err(IdError::BadCharacter(id));
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AgentId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<AgentId> for String {
    fn from(value: AgentId) -> Self {
        value.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for AgentId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_like_ids_and_refuses_the_rest() {
        assert!(AgentId::new("db-01.example").is_ok());
        assert_eq!(AgentId::new(""), Err(IdError::Empty));
        assert!(matches!(AgentId::new("Db"), Err(IdError::BadCharacter(_))));
        assert!(matches!(AgentId::new("-db"), Err(IdError::BadCharacter(_))));
        assert!(matches!(AgentId::new("a/b"), Err(IdError::BadCharacter(_))));
        assert!(matches!(
            AgentId::new("a".repeat(64)),
            Err(IdError::TooLong(_))
        ));
    }
}
