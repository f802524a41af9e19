//! Enrollment and renewal: one-time tokens bound to an agent id, and the CSRs they
//! (or an existing mTLS identity) turn into short-lived agent certificates.

use crate::hub::Hub;
use crate::metrics::Metrics;
use base64::Engine;
use dbvm_protocol::messages::{BrokerMessage, EnrollRequest, RefuseCode};
use dbvm_protocol::AgentId;
use sha2::{Digest, Sha256};
use std::time::Duration;

const TOKEN_PREFIX: &str = "dbvm-enroll-";

/// A fresh token and the hash the store keeps (the token itself is never stored).
pub fn new_token() -> (String, [u8; 32]) {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).unwrap_or_else(|e| panic!("no OS randomness: {e}"));
    let token = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hash_token(&token);
    (token, hash)
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

fn lifetime(hub: &Hub) -> Duration {
    Duration::from_secs(hub.settings.cert_lifetime_seconds)
}

/// Handles an `Enroll` first frame. The CSR is checked before the token is spent, so a
/// broken request does not burn a good token.
pub async fn enroll(hub: &Hub, req: EnrollRequest) -> Result<BrokerMessage, (RefuseCode, String)> {
    let refuse = |msg: String| {
        Metrics::count(&hub.metrics.enrollments, "result", "refused");
        (RefuseCode::EnrollmentRefused, msg)
    };
    let agent = AgentId::new(req.agent_id.clone()).map_err(|e| refuse(e.to_string()))?;
    let cert_pem = hub
        .ca
        .sign_agent_csr(&req.csr_pem, &agent, lifetime(hub))
        .map_err(|e| refuse(format!("certificate signing request refused: {e}")))?;
    match hub
        .store
        .consume_token(
            hash_token(&req.token),
            agent.as_str(),
            dbvm_protocol::now_ms(),
        )
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(refusal)) => return Err(refuse(refusal.to_string())),
        Err(e) => {
            Metrics::count(&hub.metrics.enrollments, "result", "error");
            return Err((
                RefuseCode::Internal,
                format!("enrollment failed inside the broker: {e}"),
            ));
        }
    }
    Metrics::count(&hub.metrics.enrollments, "result", "ok");
    tracing::info!(agent = %agent, "agent enrolled");
    Ok(BrokerMessage::Enrolled {
        cert_pem,
        ca_pem: hub.ca.cert_pem().to_string(),
    })
}

/// Handles a `Renew` on an authenticated link: the identity is the connection's.
pub fn renew(hub: &Hub, agent: &AgentId, csr_pem: &str) -> BrokerMessage {
    match hub.ca.sign_agent_csr(csr_pem, agent, lifetime(hub)) {
        Ok(cert_pem) => {
            Metrics::count(&hub.metrics.renewals, "result", "ok");
            tracing::info!(agent = %agent, "agent certificate renewed");
            BrokerMessage::Renewed { cert_pem }
        }
        Err(e) => {
            Metrics::count(&hub.metrics.renewals, "result", "refused");
            BrokerMessage::RenewFailed {
                message: format!("certificate signing request refused: {e}"),
            }
        }
    }
}
