//! The agent's certificate: enrollment at first boot (a one-time token and a CSR for a
//! certificate, on a connection without a client certificate) and renewal in band at two
//! thirds of the certificate's life. What the link learns here is also published to the
//! connectivity check through [`crate::uplink::CertificateStatus`].

use super::{Link, LinkError, MAX_FRAME_LEN, REPLY_TIMEOUT};
use crate::identity::{Identity, StateDir};
use crate::uplink::Uplink;
use dbvm_protocol::frame;
use dbvm_protocol::messages::{AgentMessage, BrokerMessage, EnrollRequest};
use dbvm_protocol::{AgentId, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use std::time::Duration;

impl Link {
    fn read_token(&self) -> Result<String, LinkError> {
        if let Ok(t) = std::env::var("DBVM_AGENT_ENROLLMENT_TOKEN") {
            if !t.trim().is_empty() {
                return Ok(t.trim().to_string());
            }
        }
        let path = self.token_file.as_ref().ok_or(LinkError::NoToken)?;
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
            Ok(_) => Err(LinkError::NoToken),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LinkError::NoToken),
            Err(e) => Err(LinkError::TokenFile(path.clone(), e)),
        }
    }

    /// First boot: trade the one-time token and a CSR for a certificate.
    pub async fn enroll(&self) -> Result<Identity, LinkError> {
        let token = self.read_token()?;
        let (csr_pem, key_pem) = dbvm_protocol::pki::make_csr(&self.agent_id)
            .map_err(|e| LinkError::Pki(e.to_string()))?;
        let mut tls = self.dial(None).await?;
        let req = AgentMessage::Enroll(EnrollRequest {
            protocol_major: PROTOCOL_MAJOR,
            protocol_minor: PROTOCOL_MINOR,
            agent_id: self.agent_id.to_string(),
            token,
            csr_pem,
        });
        frame::write_frame(&mut tls, &req, MAX_FRAME_LEN).await?;
        let reply = tokio::time::timeout(
            REPLY_TIMEOUT,
            frame::read_frame::<BrokerMessage, _>(&mut tls, MAX_FRAME_LEN),
        )
        .await
        .map_err(|_| LinkError::Timeout("waiting for the enrollment answer"))??;
        match reply {
            Some(BrokerMessage::Enrolled { cert_pem, .. }) => {
                let identity = Identity::new(cert_pem, key_pem).map_err(LinkError::Pki)?;
                self.state.store_identity(&identity)?;
                tracing::info!(
                    not_after_ms = identity.not_after_ms,
                    "enrolled with the broker"
                );
                // The token is spent: it leaves the VM (first boot wrote it to this file).
                if let Some(path) = &self.token_file {
                    match std::fs::remove_file(path) {
                        Ok(()) => {
                            tracing::info!(file = %path.display(), "enrollment token removed")
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e, "cannot remove the used enrollment token")
                        }
                    }
                }
                Ok(identity)
            }
            Some(BrokerMessage::Refused { code, message }) => {
                Err(LinkError::Refused { code, message })
            }
            Some(other) => Err(LinkError::Unexpected(format!("{other:?}"))),
            None => Err(LinkError::Closed),
        }
    }
}

/// Publishes the certificate the link is about to use (for the connectivity check).
pub(super) fn publish(identity: &Identity, uplink: &Uplink, ca_not_after_ms: Option<i64>) {
    uplink.update_certificate(|c| {
        if c.not_after_ms != identity.not_after_ms {
            c.renewal_failures = 0;
            c.last_renewal_error = None;
        }
        c.not_before_ms = identity.not_before_ms;
        c.not_after_ms = identity.not_after_ms;
        c.renew_at_ms = identity.renew_at_ms();
        c.ca_not_after_ms = ca_not_after_ms;
    });
}

/// Certificate renewal state for one session.
pub(super) struct Renewal {
    renew_at_ms: i64,
    not_after_ms: i64,
    pending_key: Option<String>,
}

impl Renewal {
    /// Starts from the session's certificate.
    pub(super) fn new(identity: &Identity) -> Self {
        Self {
            renew_at_ms: identity.renew_at_ms(),
            not_after_ms: identity.not_after_ms,
            pending_key: None,
        }
    }

    pub(super) fn due_in(&self) -> Duration {
        let ms = self.renew_at_ms - dbvm_protocol::now_ms();
        Duration::from_millis(ms.max(0) as u64)
    }

    /// A CSR for a new key (kept until the answer comes).
    pub(super) fn start(&mut self, agent: &AgentId, uplink: &Uplink) -> Result<String, String> {
        // If no answer comes, ask again after a tenth of the remaining time (at least 1 s).
        let now = dbvm_protocol::now_ms();
        self.renew_at_ms = now + ((self.not_after_ms - now) / 10).max(1000);
        match dbvm_protocol::pki::make_csr(agent) {
            Ok((csr, key)) => {
                self.pending_key = Some(key);
                Ok(csr)
            }
            Err(e) => {
                let e = format!("cannot make a renewal request: {e}");
                self.failed(uplink, e.clone());
                Err(e)
            }
        }
    }

    /// The broker refused (or the answer could not be used): counted for the
    /// connectivity check, tried again at the next due time.
    pub(super) fn failed(&mut self, uplink: &Uplink, why: String) {
        self.pending_key = None;
        uplink.update_certificate(|c| {
            c.renewal_failures = c.renewal_failures.saturating_add(1);
            c.last_renewal_error = Some(why);
        });
    }

    pub(super) fn finish(
        &mut self,
        state: &StateDir,
        uplink: &Uplink,
        cert_pem: String,
    ) -> Result<(), String> {
        let key = self
            .pending_key
            .take()
            .ok_or("a renewed certificate arrived without a pending request")?;
        let identity = Identity::new(cert_pem, key)?;
        // The new pair must belong together before it replaces the old one.
        if !dbvm_protocol::pki::cert_matches_key(&identity.cert_pem, &identity.key_pem) {
            return Err("renewed certificate is not for the key this agent asked for".into());
        }
        state.store_identity(&identity).map_err(|e| e.to_string())?;
        tracing::info!(
            not_after_ms = identity.not_after_ms,
            "agent certificate renewed; the next connection uses it"
        );
        self.renew_at_ms = identity.renew_at_ms();
        self.not_after_ms = identity.not_after_ms;
        uplink.update_certificate(|c| {
            c.not_before_ms = identity.not_before_ms;
            c.not_after_ms = identity.not_after_ms;
            c.renew_at_ms = identity.renew_at_ms();
            c.renewal_failures = 0;
            c.last_renewal_error = None;
        });
        Ok(())
    }
}
