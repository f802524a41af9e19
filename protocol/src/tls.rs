//! rustls configurations for both ends of the agent link and the broker API: TLS 1.3
//! only, the ring provider, certificates from the fleet CA on both sides.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate found in {0}")]
    NoCertificate(String),
    #[error("no private key found in {0}")]
    NoKey(String),
    #[error("bad PEM in {what}: {source}")]
    Pem {
        what: String,
        source: std::io::Error,
    },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Whether a server asks for, or insists on, a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// The handshake succeeds without one; the application refuses what needs it.
    Optional,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut reader = pem.as_bytes();
    let certs: Vec<_> = rustls_pemfile::certs(&mut reader)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let mut reader = pem.as_bytes();
    rustls_pemfile::private_key(&mut reader)
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(what.to_string()))
}

pub fn roots_from_pem(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Server side: our certificate chain and key, client certificates checked against `client_ca_pem`.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
    auth: ClientAuth,
) -> Result<ServerConfig, TlsError> {
    let roots = Arc::new(roots_from_pem(client_ca_pem)?);
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    let builder = match auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs_from_pem(cert_pem, "server certificate")?,
            key_from_pem(key_pem, "server key")?,
        )?;
    // Agents hold one long connection: resumption tickets would only cost memory.
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![];
    Ok(config)
}

/// Client side: trust only `ca_pem`; present a certificate when one is given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<ClientConfig, TlsError> {
    let roots = roots_from_pem(ca_pem)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(
            certs_from_pem(cert, "client certificate")?,
            key_from_pem(key, "client key")?,
        )?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{FleetCa, Identity};
    use std::time::Duration;

    #[test]
    fn configs_build_from_fleet_certificates() {
        let ca = FleetCa::generate("t", Duration::from_secs(600)).unwrap();
        let server = ca
            .issue_server(&["localhost".into()], Duration::from_secs(600))
            .unwrap();
        server_config(
            &server.cert_pem,
            &server.key_pem,
            ca.cert_pem(),
            ClientAuth::Required,
        )
        .unwrap();
        let client = ca
            .issue_client(
                &Identity::ControlPlane("ops".into()),
                Duration::from_secs(600),
            )
            .unwrap();
        client_config(ca.cert_pem(), Some((&client.cert_pem, &client.key_pem))).unwrap();
        assert!(matches!(
            client_config("nonsense", None),
            Err(TlsError::NoCertificate(_))
        ));
    }
}
