//! The fleet PKI: a CA that issues the broker's server certificate, control-plane client
//! certificates and short-lived agent certificates, and how an identity is written into
//! (and read back from) a certificate.
//!
//! Identities are URI subject alternative names: `dbvm://agent/<id>` and
//! `dbvm://control-plane/<name>`. The broker trusts only these, never a common name.
//! A control plane's certificate also carries its roles, one URI each:
//! `dbvm://role/<operator|reader|support>` (see [`Role`]).

use crate::ids::AgentId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::time::Duration;
use time::OffsetDateTime;

const AGENT_URI: &str = "dbvm://agent/";
const CONTROL_PLANE_URI: &str = "dbvm://control-plane/";
const ROLE_URI: &str = "dbvm://role/";

/// What a control-plane certificate may do on the broker's API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Submits and cancels commands, enrolls and revokes agents, uploads and deletes
    /// artifacts; reads everything a reader does.
    Operator,
    /// Lists and reads commands, agents, health, events and artifacts.
    Reader,
    /// A reader who also collects, fetches and deletes log bundles.
    Support,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Operator, Role::Reader, Role::Support];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Reader => "reader",
            Self::Support => "support",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("certificate carries no dbvm identity (no dbvm:// URI name)")]
    NoIdentity,
    #[error("certificate carries an invalid agent id: {0}")]
    BadAgentId(#[from] crate::ids::IdError),
    #[error("control-plane name {0:?} must be 1-63 characters of a-z, 0-9, '-', '.'")]
    BadName(String),
    #[error("a control-plane certificate needs at least one role (operator, reader, support)")]
    NoRole,
}

/// Who a certificate speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Agent(AgentId),
    ControlPlane(String),
}

impl Identity {
    fn uri(&self) -> String {
        match self {
            Self::Agent(id) => format!("{AGENT_URI}{id}"),
            Self::ControlPlane(name) => format!("{CONTROL_PLANE_URI}{name}"),
        }
    }
    fn common_name(&self) -> String {
        match self {
            Self::Agent(id) => format!("agent {id}"),
            Self::ControlPlane(name) => format!("control-plane {name}"),
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"***")
            .finish()
    }
}

/// The fleet certificate authority.
pub struct FleetCa {
    issuer: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").finish_non_exhaustive()
    }
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).unwrap_or_else(|e| panic!("no OS randomness: {e}"));
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "dbvm fleet");
    dn.push(DnType::CommonName, cn);
    dn
}

fn validity(params: &mut CertificateParams, lifetime: Duration, backdate: bool) {
    // CA and server certificates are back-dated a minute so a peer whose clock is slightly
    // behind accepts them at once. Client certificates are not: the broker that issues
    // them is also the one that checks them, and agents schedule renewal from not_before.
    let now = OffsetDateTime::now_utc();
    params.not_before = if backdate {
        now - time::Duration::minutes(1)
    } else {
        now
    };
    params.not_after =
        now + time::Duration::seconds(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 4));
}

impl FleetCa {
    /// Creates a new CA with a fresh key (ECDSA P-256), valid for `lifetime`.
    pub fn generate(name: &str, lifetime: Duration) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(serial());
        validity(&mut params, lifetime, true);
        let issuer = params.self_signed(&key)?;
        let cert_pem = issuer.pem();
        Ok(Self {
            issuer,
            key,
            cert_pem,
        })
    }

    /// Loads an existing CA from its PEM certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // rcgen signs with an issuer `Certificate`; re-creating it from the same params
        // and key yields the same subject and key identifier as the stored CA.
        let issuer = params.self_signed(&key)?;
        Ok(Self {
            issuer,
            key,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A control plane's client certificate with exactly `roles` (at least one).
    pub fn issue_control_plane(
        &self,
        name: &str,
        roles: &[Role],
        lifetime: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        if roles.is_empty() {
            return Err(PkiError::NoRole);
        }
        let key = KeyPair::generate()?;
        let mut params = client_params(&Identity::ControlPlane(name.to_string()), lifetime)?;
        let mut roles = roles.to_vec();
        roles.sort();
        roles.dedup();
        for r in roles {
            let uri = rcgen::Ia5String::try_from(format!("{ROLE_URI}{r}"))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for the broker, for the given DNS names and IP addresses.
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = dn(names.first().map(String::as_str).unwrap_or("dbvm-broker"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial());
        validity(&mut params, lifetime, true);
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate (with a fresh key) for an identity.
    pub fn issue_client(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        // A control plane this way may do everything: every role.
        if let Identity::ControlPlane(name) = identity {
            return self.issue_control_plane(name, &Role::ALL, lifetime);
        }
        let key = KeyPair::generate()?;
        let params = client_params(identity, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs an agent's CSR. Everything but the public key is ignored: the identity comes
    /// from the caller (the enrollment token or the mTLS peer), never from the CSR.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        agent: &AgentId,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = client_params(&Identity::Agent(agent.clone()), lifetime)?;
        let cert = csr.signed_by(&self.issuer, &self.key)?;
        Ok(cert.pem())
    }
}

fn client_params(identity: &Identity, lifetime: Duration) -> Result<CertificateParams, PkiError> {
    if let Identity::ControlPlane(name) = identity {
        AgentId::new(name.clone()).map_err(|_| PkiError::BadName(name.clone()))?;
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&identity.common_name());
    let uri = rcgen::Ia5String::try_from(identity.uri())?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial());
    validity(&mut params, lifetime, false);
    Ok(params)
}

/// A fresh key and a CSR for it (the agent's side of enrollment and renewal).
pub fn make_csr(agent: &AgentId) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&Identity::Agent(agent.clone()).common_name());
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Reads the dbvm identity from a DER certificate.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?
        .ok_or(PkiError::NoIdentity)?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(id) = uri.strip_prefix(AGENT_URI) {
                return Ok(Identity::Agent(AgentId::new(id)?));
            }
            if let Some(cp) = uri.strip_prefix(CONTROL_PLANE_URI) {
                return Ok(Identity::ControlPlane(cp.to_string()));
            }
        }
    }
    Err(PkiError::NoIdentity)
}

/// The roles a DER certificate carries (`dbvm://role/<role>` URI names; unknown ones are
/// ignored, so a newer CA's roles never widen an older broker's grants).
pub fn roles_of(cert_der: &[u8]) -> Vec<Role> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    let mut roles: Vec<Role> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => {
                uri.strip_prefix(ROLE_URI).and_then(Role::parse)
            }
            _ => None,
        })
        .collect();
    roles.sort();
    roles.dedup();
    roles
}

/// Validity window of a PEM certificate, in Unix milliseconds.
pub fn validity_ms(cert_pem: &str) -> Result<(i64, i64), PkiError> {
    validity_ms_der(&first_cert_der(cert_pem)?)
}

/// Validity window of a DER certificate, in Unix milliseconds.
pub fn validity_ms_der(der: &[u8]) -> Result<(i64, i64), PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let v = cert.validity();
    Ok((
        v.not_before.timestamp() * 1000,
        v.not_after.timestamp() * 1000,
    ))
}

/// Whether the first certificate in `cert_pem` is for the private key in `key_pem`.
pub fn cert_matches_key(cert_pem: &str, key_pem: &str) -> bool {
    let (Ok(der), Ok(key)) = (first_cert_der(cert_pem), KeyPair::from_pem(key_pem)) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    cert.public_key().raw == key.public_key_der().as_slice()
}

/// DER bytes of the first certificate in a PEM text.
pub fn first_cert_der(cert_pem: &str) -> Result<Vec<u8>, PkiError> {
    let mut reader = cert_pem.as_bytes();
    let first = rustls_pemfile::certs(&mut reader).next();
    match first {
        Some(Ok(der)) => Ok(der.to_vec()),
        Some(Err(e)) => Err(PkiError::Parse(e.to_string())),
        None => Err(PkiError::Parse("no certificate in PEM text".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_certificates() {
        let ca = FleetCa::generate("test CA", Duration::from_secs(3600)).unwrap();
        let id = AgentId::new("db-1").unwrap();
        let (csr, _key) = make_csr(&id).unwrap();
        let cert = ca
            .sign_agent_csr(&csr, &id, Duration::from_secs(60))
            .unwrap();
        let der = first_cert_der(&cert).unwrap();
        assert_eq!(identity_of(&der).unwrap(), Identity::Agent(id.clone()));
        assert!(cert_matches_key(&cert, &_key));
        let (_, other_key) = make_csr(&id).unwrap();
        assert!(!cert_matches_key(&cert, &other_key));
        let (nb, na) = validity_ms(&cert).unwrap();
        assert!((59_000..=61_000).contains(&(na - nb)), "{}", na - nb);

        let cp = ca
            .issue_client(
                &Identity::ControlPlane("ops".into()),
                Duration::from_secs(60),
            )
            .unwrap();
        let der = first_cert_der(&cp.cert_pem).unwrap();
        assert_eq!(
            identity_of(&der).unwrap(),
            Identity::ControlPlane("ops".into())
        );
        assert_eq!(roles_of(&der), Role::ALL.to_vec());
        let reader = ca
            .issue_control_plane(
                "dash",
                &[Role::Reader, Role::Reader],
                Duration::from_secs(60),
            )
            .unwrap();
        let der = first_cert_der(&reader.cert_pem).unwrap();
        assert_eq!(
            identity_of(&der).unwrap(),
            Identity::ControlPlane("dash".into())
        );
        assert_eq!(roles_of(&der), vec![Role::Reader]);
        assert!(matches!(
            ca.issue_control_plane("none", &[], Duration::from_secs(60)),
            Err(PkiError::NoRole)
        ));
        // An agent's certificate carries no role.
        let (csr, _) = make_csr(&id).unwrap();
        let agent = ca
            .sign_agent_csr(&csr, &id, Duration::from_secs(60))
            .unwrap();
        assert!(roles_of(&first_cert_der(&agent).unwrap()).is_empty());

        let server = ca
            .issue_server(
                &["localhost".into(), "127.0.0.1".into()],
                Duration::from_secs(60),
            )
            .unwrap();
        let der = first_cert_der(&server.cert_pem).unwrap();
        assert!(matches!(identity_of(&der), Err(PkiError::NoIdentity)));
    }

    #[test]
    fn a_reloaded_ca_issues_certificates_that_chain() {
        let ca = FleetCa::generate("test CA", Duration::from_secs(3600)).unwrap();
        let again = FleetCa::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        let client = again
            .issue_client(
                &Identity::Agent(AgentId::new("x").unwrap()),
                Duration::from_secs(60),
            )
            .unwrap();
        // verified by rustls in the tls module tests
        assert!(client.cert_pem.contains("BEGIN CERTIFICATE"));
    }
}
