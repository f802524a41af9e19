//! The revocation list in memory: what a handshake refuses without reading the store.
//!
//! `dbvmctl agents revoke <id>` revokes every certificate issued to that agent so far
//! (the store records each one at enrollment and renewal), not the agent id: the VM
//! comes back with a new enrollment token and a fresh certificate. A handshake looks up
//! the SHA-256 of the client certificate in a set loaded from the store at start, so
//! 10,000 handshakes cost 10,000 hash lookups; only a certificate of a revoked agent
//! that predates the revocation and is in no record (issued by a broker from before
//! certificates were recorded) costs a read of the store.

use crate::store::{AgentRevocation, IssuedCertificate, RevocationList};
use std::collections::HashMap;
use std::sync::RwLock;

/// SHA-256 of a certificate's DER: how the revocation list names a certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(der).into()
}

/// The client certificate of an agent link, as revocation and renewal need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkCert {
    pub fingerprint: [u8; 32],
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

impl LinkCert {
    pub fn from_der(der: &[u8]) -> Result<Self, dbvm_protocol::pki::PkiError> {
        let (not_before_ms, not_after_ms) = dbvm_protocol::pki::validity_ms_der(der)?;
        Ok(Self {
            fingerprint: fingerprint(der),
            not_before_ms,
            not_after_ms,
        })
    }
}

/// What a handshake decides from memory alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Good,
    Revoked(AgentRevocation),
    /// The agent was revoked after this certificate's `not_before`, and the certificate
    /// is not in the revoked set: good only if the store has a record of it that is not
    /// revoked (issued after the revocation, within the same second).
    AskStore(AgentRevocation),
}

#[derive(Debug, Default)]
struct Lists {
    /// Revoked certificates not expired yet → their `not_after_ms`.
    certificates: HashMap<[u8; 32], i64>,
    /// The latest revocation of each agent revoked at least once.
    agents: HashMap<String, AgentRevocation>,
}

#[derive(Debug, Default)]
pub struct Revocations {
    lists: RwLock<Lists>,
}

impl Revocations {
    pub fn new(list: RevocationList) -> Self {
        Self {
            lists: RwLock::new(Lists {
                certificates: list.certificates.into_iter().collect(),
                agents: list.agents.into_iter().collect(),
            }),
        }
    }

    // A poisoned lock only means a thread panicked while inserting into plain maps.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Lists> {
        self.lists.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Lists> {
        self.lists.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The verdict on a client certificate of `agent` (its SHA-256 and `not_before`).
    pub fn check(&self, fingerprint: &[u8; 32], agent: &str, not_before_ms: i64) -> Verdict {
        let lists = self.read();
        let revocation = lists.agents.get(agent);
        if lists.certificates.contains_key(fingerprint) {
            return Verdict::Revoked(revocation.cloned().unwrap_or(AgentRevocation {
                revoked_at_ms: 0,
                reason: None,
            }));
        }
        match revocation {
            // X.509 times have whole seconds: a certificate issued in the second of the
            // revocation, after it, has a `not_before` up to a second before it.
            Some(r) if not_before_ms <= r.revoked_at_ms => Verdict::AskStore(r.clone()),
            _ => Verdict::Good,
        }
    }

    /// When `agent` was last revoked (to notice a revocation between a handshake's
    /// check and the session's registration).
    pub fn revoked_at(&self, agent: &str) -> Option<i64> {
        self.read().agents.get(agent).map(|r| r.revoked_at_ms)
    }

    /// Adds a revocation the store has recorded.
    pub fn add(&self, agent: &str, revocation: AgentRevocation, certs: &[IssuedCertificate]) {
        let mut lists = self.write();
        for c in certs {
            lists.certificates.insert(c.fingerprint, c.not_after_ms);
        }
        lists.agents.insert(agent.to_string(), revocation);
    }

    /// Forgets revoked certificates that expired before `before_ms`.
    pub fn prune(&self, before_ms: i64) {
        self.write()
            .certificates
            .retain(|_, not_after| *not_after >= before_ms);
    }

    /// Revoked certificates held in memory.
    pub fn len(&self) -> usize {
        self.read().certificates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(fp: u8, agent: &str, not_after_ms: i64) -> IssuedCertificate {
        IssuedCertificate {
            fingerprint: [fp; 32],
            agent_id: agent.into(),
            issued_at_ms: 0,
            not_after_ms,
            revoked_at_ms: Some(50),
        }
    }

    #[test]
    fn revoked_certificates_are_refused_and_later_ones_of_the_agent_are_not() {
        let r = Revocations::new(RevocationList::default());
        assert_eq!(r.check(&[1; 32], "db1", 10), Verdict::Good);
        let at = AgentRevocation {
            revoked_at_ms: 50_000,
            reason: Some("stolen".into()),
        };
        r.add("db1", at.clone(), &[cert(1, "db1", 90_000)]);
        assert_eq!(r.check(&[1; 32], "db1", 10), Verdict::Revoked(at.clone()));
        // Unknown to the list and older than the revocation: the store decides.
        assert_eq!(
            r.check(&[2; 32], "db1", 49_000),
            Verdict::AskStore(at.clone())
        );
        assert_eq!(r.check(&[2; 32], "db1", 50_000), Verdict::AskStore(at));
        // Issued after the revocation: good. Another agent: untouched.
        assert_eq!(r.check(&[3; 32], "db1", 51_000), Verdict::Good);
        assert_eq!(r.check(&[2; 32], "db2", 10), Verdict::Good);
        assert_eq!(r.revoked_at("db1"), Some(50_000));
        r.prune(90_001);
        assert!(r.is_empty());
    }
}
