//! What the mesh reads out of an X.509 certificate: its SPIFFE ID, serial,
//! validity and key type. Parsing only; trust is decided in `verify`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::{
    extensions::GeneralName,
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
    prelude::{FromDer as _, X509Certificate},
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("not an X.509 certificate: {0}")]
    Parse(String),
    #[error("has no URI SAN: a SPIFFE certificate has exactly one")]
    NoSpiffeId,
    #[error("has {0} URI SANs: a SPIFFE certificate has exactly one")]
    ManyUris(usize),
    #[error("its URI SAN {0:?} is not a SPIFFE ID")]
    NotSpiffe(String),
    #[error("is a CA certificate, not a workload or node certificate")]
    IsCa,
    #[error("lacks the {0} extended key usage")]
    MissingUsage(&'static str),
}

/// The facts the mesh uses about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, as `CN=…, O=…` (empty for SVIDs).
    pub subject: String,
    /// The raw subject and issuer names (DER), to match issuers to roots.
    pub subject_der: Vec<u8>,
    pub issuer_der: Vec<u8>,
    /// Lowercase hex of the serial number's bytes.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Every URI SAN, in order.
    pub uris: Vec<String>,
    pub is_ca: bool,
    /// `None`: no extended key usage extension; otherwise (serverAuth,
    /// clientAuth).
    pub usages: Option<(bool, bool)>,
    /// Whether the public key is ECDSA P-256, the mesh's only key type.
    pub p256: bool,
    /// The SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, CertError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
        let parse_err = |e: x509_parser::error::X509Error| CertError::Parse(e.to_string());
        let uris = match cert.subject_alternative_name().map_err(parse_err)? {
            Some(san) => san
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        let usages = cert
            .extended_key_usage()
            .map_err(parse_err)?
            .map(|eku| (eku.value.server_auth, eku.value.client_auth));
        let spki = cert.public_key();
        let p256 = is_p256(spki);
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            subject_der: cert.subject().as_raw().to_vec(),
            issuer_der: cert.issuer().as_raw().to_vec(),
            serial: hex(cert.raw_serial()),
            not_before: system_time(cert.validity().not_before.timestamp()),
            not_after: system_time(cert.validity().not_after.timestamp()),
            uris,
            is_ca: cert.is_ca(),
            usages,
            p256,
            spki: spki.raw.to_vec(),
        })
    }

    /// The certificate's SPIFFE ID: its one and only URI SAN.
    pub fn spiffe_id(&self) -> Result<&str, CertError> {
        match self.uris.as_slice() {
            [] => Err(CertError::NoSpiffeId),
            [uri] if crate::spiffe::parse(uri).is_some() => Ok(uri),
            [uri] => Err(CertError::NotSpiffe(uri.clone())),
            many => Err(CertError::ManyUris(many.len())),
        }
    }

    /// Checks what the mesh requires of a leaf (an SVID): exactly one
    /// SPIFFE ID, not a CA, usable for both ends of mutual TLS. Returns the
    /// SPIFFE ID.
    pub fn svid_id(&self) -> Result<&str, CertError> {
        let id = self.spiffe_id()?;
        if self.is_ca {
            return Err(CertError::IsCa);
        }
        match self.usages {
            Some((true, true)) => Ok(id),
            Some((false, _)) | None => Err(CertError::MissingUsage("serverAuth")),
            Some((true, false)) => Err(CertError::MissingUsage("clientAuth")),
        }
    }

    /// Whether the certificate names itself as its issuer (a root).
    pub fn self_issued(&self) -> bool {
        self.subject_der == self.issuer_der
    }
}

/// The SPIFFE ID of a certificate (its one URI SAN), without any trust
/// decision.
pub fn spiffe_id_of(der: &[u8]) -> Result<String, CertError> {
    CertInfo::parse(der)?.spiffe_id().map(str::to_owned)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn system_time(unix_seconds: i64) -> SystemTime {
    if unix_seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix_seconds as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs())
    }
}

/// RFC 3339, UTC, whole seconds: how the mesh writes times for people and
/// scripts.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Whether a public key is ECDSA P-256, the only key type of the mesh.
pub(crate) fn is_p256(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> bool {
    spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256)
}
