//! Enrollment and renewal: one-time tokens bound to an agent id, and the CSRs they
//! (or an existing mTLS identity) turn into short-lived agent certificates.

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::revocation::LinkCert;
use crate::store::{AgentRevocation, IssuedCertificate};
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
    let issued = issued(&agent, &cert_pem).map_err(|e| {
        Metrics::count(&hub.metrics.enrollments, "result", "error");
        (RefuseCode::Internal, e)
    })?;
    match hub
        .store
        .consume_token(
            hash_token(&req.token),
            agent.as_str(),
            dbvm_protocol::now_ms(),
            issued,
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

/// The record of a certificate just signed for `agent`.
fn issued(agent: &AgentId, cert_pem: &str) -> Result<IssuedCertificate, String> {
    let cert = dbvm_protocol::pki::first_cert_der(cert_pem)
        .and_then(|der| LinkCert::from_der(&der))
        .map_err(|e| format!("the certificate the broker just signed does not parse: {e}"))?;
    Ok(IssuedCertificate {
        fingerprint: cert.fingerprint,
        agent_id: agent.to_string(),
        issued_at_ms: dbvm_protocol::now_ms(),
        not_after_ms: cert.not_after_ms,
        revoked_at_ms: None,
    })
}

/// Handles a `Renew` on an authenticated link: the identity is the connection's, and so
/// is the certificate renewed (`link`). `Ok` is the answer for the agent (a failed
/// renewal leaves the link up: the current certificate stays in use); `Err` refuses the
/// link, because its certificate was revoked.
pub async fn renew(
    hub: &Hub,
    agent: &AgentId,
    link: &LinkCert,
    csr_pem: &str,
) -> Result<BrokerMessage, (RefuseCode, String)> {
    let failed = |result: &str, message: String| {
        Metrics::count(&hub.metrics.renewals, "result", result);
        Ok(BrokerMessage::RenewFailed { message })
    };
    let cert_pem = match hub.ca.sign_agent_csr(csr_pem, agent, lifetime(hub)) {
        Ok(pem) => pem,
        Err(e) => {
            return failed(
                "refused",
                format!("certificate signing request refused: {e}"),
            )
        }
    };
    let issued = match issued(agent, &cert_pem) {
        Ok(c) => c,
        Err(e) => return failed("error", e),
    };
    match hub
        .store
        .record_renewal(issued, (link.fingerprint, link.not_before_ms))
        .await
    {
        Ok(Ok(())) => {
            Metrics::count(&hub.metrics.renewals, "result", "ok");
            tracing::info!(agent = %agent, "agent certificate renewed");
            Ok(BrokerMessage::Renewed { cert_pem })
        }
        Ok(Err(revoked)) => {
            Metrics::count(&hub.metrics.renewals, "result", "revoked");
            let revocation = AgentRevocation {
                revoked_at_ms: revoked.0,
                reason: None,
            };
            Err((
                RefuseCode::CertificateRevoked,
                format!(
                    "renewal refused: {}",
                    crate::hub::revoked_message(agent.as_str(), &revocation)
                ),
            ))
        }
        Err(e) => failed(
            "error",
            format!(
                "renewal could not be recorded by the broker ({e}); the agent tries again later"
            ),
        ),
    }
}
