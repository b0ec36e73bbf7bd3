//! The mesh CA, kept in a directory:
//!
//! | file | holds |
//! | --- | --- |
//! | `ca.pem` | the signing certificate |
//! | `ca-key.pem` | its key (0600) |
//! | `chain.pem` | the signing certificate's chain up to, not including, the root (empty for a root CA) |
//! | `bundle.pem` | every root the mesh trusts: during a rotation the old ones and the new one |
//!
//! CA certificates carry the trust domain's own SPIFFE ID (`spiffe://<td>`)
//! as their URI SAN, so a directory says which trust domain it serves.
//! Every key is ECDSA P-256.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tracing::warn;
use x509_parser::prelude::{FromDer as _, X509CertificationRequest};

use super::{
    cert::{self, CertInfo, rfc3339},
    files::{self, FileError, Mode},
    spiffe,
    store::Svid,
    verify::TrustBundle,
};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CHAIN: &str = "chain.pem";
pub const BUNDLE: &str = "bundle.pem";
const FILES: [&str; 4] = [CA_CERT, CA_KEY, CHAIN, BUNDLE];

/// How far back a new certificate's validity starts: peers whose clocks
/// run a little behind the CA's still accept it.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Default lifetime of a CA created by `init` or `rotate`.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Lifetime of the certificate the CA's gRPC service presents.
pub const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "{}: already holds a CA ({file}); refusing to overwrite it \
         (`mesh-agent ca rotate` changes the root of an existing CA)", .dir.display()
    )]
    Exists { dir: PathBuf, file: &'static str },
    #[error("{}: cannot create the directory: {source}", .dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{0:?} is not a SPIFFE trust domain name (lowercase letters, digits, `.`, `-`, `_`)")]
    TrustDomain(String),
    #[error("{}: {message}", .path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{0:?} is not a SPIFFE ID of trust domain {1}")]
    ForeignId(String, String),
    #[error("{0:?} is not a node name (a DNS-1123 subdomain)")]
    NodeName(String),
    #[error("the certificate signing request is refused: {0}")]
    Csr(String),
    #[error("a certificate lifetime must be at least one second")]
    Lifetime,
    #[error("the CA certificate expired at {0}: rotate the CA (`mesh-agent ca rotate`)")]
    Expired(String),
    #[error(
        "{}: this is an intermediate CA, signed by a root this directory does not hold; \
         to move to a new root, create a new intermediate CA with \
         `mesh-agent ca init --trust-domain TD --out NEW_DIR --root-cert ROOT.pem --root-key ROOT-KEY.pem` \
         and serve it instead", .0.display()
    )]
    IntermediateRotate(PathBuf),
    #[error("cannot build the certificate: {0}")]
    Build(#[from] rcgen::Error),
}

/// A loaded CA: its signing certificate and key, chain and trust bundle.
pub struct Ca {
    dir: PathBuf,
    trust_domain: String,
    cert: CertificateDer<'static>,
    info: CertInfo,
    key: KeyPair,
    chain: Vec<CertificateDer<'static>>,
    bundle: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("subject", &self.info.subject)
            .field("roots", &self.bundle.len())
            .finish()
    }
}

impl Ca {
    /// Creates a CA in `out_dir`: a self-signed root, or with `root` (its
    /// certificate file, possibly followed by its own chain up to a root,
    /// and its key) an intermediate signed by it, whose bundle is that
    /// root. Refuses a directory that already holds any CA file.
    pub fn init(
        trust_domain: &str,
        out_dir: &Path,
        root: Option<(&Path, &Path)>,
        lifetime: Duration,
    ) -> Result<Ca, CaError> {
        if !spiffe::is_trust_domain(trust_domain) {
            return Err(CaError::TrustDomain(trust_domain.to_owned()));
        }
        if lifetime < Duration::from_secs(1) {
            return Err(CaError::Lifetime);
        }
        for file in FILES {
            if out_dir.join(file).exists() {
                return Err(CaError::Exists {
                    dir: out_dir.to_owned(),
                    file,
                });
            }
        }
        create_private_dir(out_dir)?;
        let now = SystemTime::now();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let (cert, chain, bundle) = match root {
            None => {
                let cert = new_root(trust_domain, &key, now, lifetime)?;
                (cert.clone(), Vec::new(), vec![cert])
            }
            Some((root_cert, root_key)) => {
                let (parents, parent_key) = files::read_credentials(root_cert, root_key, now)?;
                let parent = CertInfo::parse(&parents[0]).map_err(|e| CaError::Invalid {
                    path: root_cert.to_owned(),
                    message: format!("certificate 1 {e}"),
                })?;
                if !parent.is_ca {
                    return Err(CaError::Invalid {
                        path: root_cert.to_owned(),
                        message: "not a CA certificate (no basicConstraints CA:TRUE)".into(),
                    });
                }
                let top = parents.last().expect("read_certs returns at least one");
                let top_info = CertInfo::parse(top).map_err(|e| CaError::Invalid {
                    path: root_cert.to_owned(),
                    message: e.to_string(),
                })?;
                if !top_info.self_issued() {
                    return Err(CaError::Invalid {
                        path: root_cert.to_owned(),
                        message: format!(
                            "its last certificate ({}) is not a root: put the chain up to and \
                             including the root in the file",
                            top_info.subject
                        ),
                    });
                }
                let issuer = Issuer::from_ca_cert_der(&parents[0], &parent_key)?;
                let mut params = ca_params(trust_domain, "intermediate", now, lifetime)?;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.not_after = params.not_after.min(offset(parent.not_after));
                let cert = params.signed_by(&key, &issuer)?.der().clone();
                let chain = parents[..parents.len() - 1].to_vec();
                (cert, chain, vec![top.clone()])
            }
        };
        write_pem(out_dir, CA_KEY, &key.serialize_pem(), Mode::Private)?;
        write_pem(out_dir, CA_CERT, &files::certs_pem(&[cert]), Mode::Public)?;
        write_pem(out_dir, CHAIN, &files::certs_pem(&chain), Mode::Public)?;
        write_pem(out_dir, BUNDLE, &files::certs_pem(&bundle), Mode::Public)?;
        Ca::load(out_dir)
    }

    /// Reads a CA directory, checking that the key is the certificate's,
    /// that it is a CA of a trust domain, and that its bundle holds the
    /// root that issued it. An expired CA loads (so that it can be
    /// rotated) but signs nothing.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join(CA_CERT);
        let certs = files::read_certs(&cert_path)?;
        let key = files::read_key_pair(&dir.join(CA_KEY))?;
        let invalid = |path: &Path, message: String| CaError::Invalid {
            path: path.to_owned(),
            message,
        };
        if certs.len() != 1 {
            return Err(invalid(
                &cert_path,
                format!(
                    "holds {} certificates; the signing certificate alone belongs here, its chain in {CHAIN}",
                    certs.len()
                ),
            ));
        }
        let cert = certs.into_iter().next().expect("one certificate");
        let info = CertInfo::parse(&cert).map_err(|e| invalid(&cert_path, e.to_string()))?;
        if info.spki != key.subject_public_key_info() {
            return Err(FileError::KeyMismatch {
                cert: cert_path,
                key: dir.join(CA_KEY),
            }
            .into());
        }
        if !info.is_ca {
            return Err(invalid(&cert_path, "not a CA certificate".into()));
        }
        let trust_domain = match info.uris.as_slice() {
            [uri] => spiffe::parse(uri)
                .filter(|(_, path)| path.is_empty())
                .map(|(td, _)| td.to_owned()),
            _ => None,
        }
        .ok_or_else(|| {
            invalid(
                &cert_path,
                "names no trust domain (a URI SAN spiffe://<trust-domain>): \
                 not a CA created by `mesh-agent ca init`"
                    .into(),
            )
        })?;
        let chain = files::read_certs_or_none(&dir.join(CHAIN))?;
        let bundle_path = dir.join(BUNDLE);
        let bundle = files::read_certs(&bundle_path)?;
        // Every root must be usable as a trust anchor (webpki is stricter
        // than parsing: no v1 certificates, for one).
        TrustBundle::new(bundle.clone()).map_err(|e| invalid(&bundle_path, e.to_string()))?;
        let top = match chain.last() {
            Some(der) => {
                CertInfo::parse(der).map_err(|e| invalid(&dir.join(CHAIN), e.to_string()))?
            }
            None => info.clone(),
        };
        let issued_by_bundle = bundle
            .iter()
            .any(|root| CertInfo::parse(root).is_ok_and(|r| r.subject_der == top.issuer_der));
        if !issued_by_bundle {
            return Err(invalid(
                &bundle_path,
                format!(
                    "holds no root that issued {CA_CERT} (issuer of the chain's top: {})",
                    { top.subject }
                ),
            ));
        }
        Ok(Ca {
            dir: dir.to_owned(),
            trust_domain,
            cert,
            info,
            key,
            chain,
            bundle,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Every root the mesh trusts.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    #[cfg(test)]
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn not_after(&self) -> SystemTime {
        self.info.not_after
    }

    /// Whether the signing certificate is a root (rather than an
    /// intermediate under someone else's root).
    pub fn is_root(&self) -> bool {
        self.info.self_issued()
    }

    /// Signs a workload's or node's CSR (PKCS#10 DER) for `spiffe_id`.
    /// Only the CSR's key is used (after checking its signature, so the
    /// requester holds the key): the subject and SANs are what the CA
    /// authorised, whatever the CSR asked for. Returns the chain, leaf
    /// first, without the root.
    pub fn sign(
        &self,
        csr_der: &[u8],
        spiffe_id: &str,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let (_, request) = X509CertificationRequest::from_der(csr_der)
            .map_err(|e| CaError::Csr(format!("not a PKCS#10 request: {e}")))?;
        if !cert::is_p256(&request.certification_request_info.subject_pki) {
            return Err(CaError::Csr("its key is not ECDSA P-256".into()));
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CaError::Csr(e.to_string()))?;
        self.sign_key(&csr.public_key, spiffe_id, lifetime, None)
    }

    /// Issues a certificate and a fresh key for `spiffe_id` (node
    /// credentials, the CA's own serving certificate, in-process issuance).
    pub fn issue(
        &self,
        spiffe_id: &str,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let chain = self.sign_key(&key, spiffe_id, lifetime, None)?;
        Ok((chain, key))
    }

    fn sign_key(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &str,
        lifetime: Duration,
        validity: Option<(SystemTime, SystemTime)>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        if !spiffe::in_trust_domain(spiffe_id, &self.trust_domain) {
            return Err(CaError::ForeignId(
                spiffe_id.to_owned(),
                self.trust_domain.clone(),
            ));
        }
        if lifetime < Duration::from_secs(1) {
            return Err(CaError::Lifetime);
        }
        let now = SystemTime::now();
        if now >= self.info.not_after {
            return Err(CaError::Expired(rfc3339(self.info.not_after)));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (not_before, not_after) = validity.unwrap_or_else(|| {
            (
                (now - CLOCK_SKEW).max(self.info.not_before),
                now.checked_add(lifetime)
                    .map_or(self.info.not_after, |end| end.min(self.info.not_after)),
            )
        });
        params.not_before = offset(not_before);
        params.not_after = offset(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        let leaf = params.signed_by(public_key, &issuer)?.der().clone();
        let mut chain = vec![leaf];
        if !self.is_root() {
            chain.push(self.cert.clone());
        }
        // An intermediate's chain, or a rotated root's cross-certificates.
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }

    /// A certificate valid exactly from `not_before` to `not_after`, for
    /// tests of expiry.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn issue_with_validity(
        &self,
        spiffe_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> (Vec<CertificateDer<'static>>, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = self
            .sign_key(
                &key,
                spiffe_id,
                Duration::from_secs(1),
                Some((not_before, not_after)),
            )
            .unwrap();
        (chain, key)
    }

    /// Writes a node's credentials to `out_dir`: `cert.pem` (chain, leaf
    /// first), `key.pem`, `bundle.pem`. The node agent authenticates to the
    /// CA service with them.
    pub fn issue_node(
        &self,
        node: &str,
        lifetime: Duration,
        out_dir: &Path,
    ) -> Result<(), CaError> {
        if !spiffe::is_node_name(node) {
            return Err(CaError::NodeName(node.to_owned()));
        }
        self.issue_to(
            &spiffe::node_id(&self.trust_domain, node),
            lifetime,
            out_dir,
        )
    }

    /// Writes credentials for any identity of the trust domain to `out_dir`
    /// (`cert.pem`, `key.pem`, `bundle.pem`): the operator holds the CA's
    /// key, so no authorisation applies (tests, tools, bootstrapping).
    pub fn issue_to(
        &self,
        spiffe_id: &str,
        lifetime: Duration,
        out_dir: &Path,
    ) -> Result<(), CaError> {
        let (chain, key) = self.issue(spiffe_id, lifetime)?;
        create_private_dir(out_dir)?;
        write_pem(out_dir, NODE_KEY, &key.serialize_pem(), Mode::Private)?;
        write_pem(out_dir, NODE_CERT, &files::certs_pem(&chain), Mode::Public)?;
        write_pem(
            out_dir,
            NODE_BUNDLE,
            &files::certs_pem(&self.bundle),
            Mode::Public,
        )?;
        Ok(())
    }

    /// The certificate of the CA's own gRPC service
    /// (`spiffe://<td>/mesh/ca`), with a fresh key held in memory only.
    pub fn serving_svid(&self, lifetime: Duration) -> Result<Svid, CaError> {
        let (chain, key) = self.issue(&spiffe::ca_id(&self.trust_domain), lifetime)?;
        Svid::new(chain, PrivatePkcs8KeyDer::from(key.serialize_der()).into()).map_err(|e| {
            CaError::Invalid {
                path: self.dir.join(CA_CERT),
                message: format!("its serving certificate is unusable: {e}"),
            }
        })
    }

    /// Replaces a root CA's signing certificate by a new root and adds that
    /// root to the bundle: certificates of the old root stay trusted while
    /// workloads move over (at their next renewal); [`Ca::prune`] drops the
    /// old roots once they have. An intermediate CA is refused: its root
    /// belongs to someone else.
    ///
    /// The old root also cross-signs the new one (`chain.pem`), and every
    /// chain the CA hands out carries that certificate: nodes that still
    /// trust only the old root accept certificates of the new one (and the
    /// CA service's own), so nothing breaks before the merged bundle has
    /// reached every node.
    pub fn rotate(dir: &Path, lifetime: Option<Duration>) -> Result<Ca, CaError> {
        let old = Ca::load(dir)?;
        if !old.is_root() {
            return Err(CaError::IntermediateRotate(dir.to_owned()));
        }
        let lifetime = lifetime.unwrap_or_else(|| {
            old.info
                .not_after
                .duration_since(old.info.not_before)
                .unwrap_or(DEFAULT_CA_LIFETIME)
        });
        let now = SystemTime::now();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(&old.trust_domain, "root", now, lifetime)?;
        let cert = params.self_signed(&key)?.der().clone();
        let mut chain = Vec::new();
        // An expired old root can vouch for nothing.
        if old.info.not_after > now + Duration::from_secs(1) {
            let mut cross = params.clone();
            cross.serial_number = Some(random_serial());
            cross.not_after = cross.not_after.min(offset(old.info.not_after));
            let issuer = Issuer::from_ca_cert_der(&old.cert, &old.key)?;
            chain.push(cross.signed_by(&key, &issuer)?.der().clone());
            // …and the old root's own cross-certificates reach older roots.
            chain.extend(old.chain.iter().cloned());
        }
        let mut bundle = old.bundle.clone();
        bundle.push(cert.clone());
        // Bundle and chain first: a reader that sees the new certificate
        // also sees what verifies it.
        write_pem(dir, BUNDLE, &files::certs_pem(&bundle), Mode::Public)?;
        write_pem(dir, CHAIN, &files::certs_pem(&chain), Mode::Public)?;
        write_pem(dir, CA_KEY, &key.serialize_pem(), Mode::Private)?;
        write_pem(dir, CA_CERT, &files::certs_pem(&[cert]), Mode::Public)?;
        Ca::load(dir)
    }

    /// Drops every root from the bundle but the one the signing
    /// certificate chains to, and a rotated root's cross-certificates;
    /// returns the CA and the subjects dropped. Certificates of the old
    /// roots are no longer accepted anywhere once nodes have the pruned
    /// bundle (at their next renewal).
    pub fn prune(dir: &Path) -> Result<(Ca, Vec<String>), CaError> {
        let ca = Ca::load(dir)?;
        let top_issuer = match ca.chain.last() {
            Some(der) => CertInfo::parse(der)
                .map(|c| c.issuer_der)
                .unwrap_or_default(),
            None => ca.info.issuer_der.clone(),
        };
        let (keep, dropped): (Vec<_>, Vec<_>) = ca.bundle.iter().cloned().partition(|root| {
            if ca.is_root() {
                *root == ca.cert
            } else {
                CertInfo::parse(root).is_ok_and(|r| r.subject_der == top_issuer)
            }
        });
        if keep.is_empty() {
            return Err(CaError::Invalid {
                path: dir.join(BUNDLE),
                message: format!("holds no root that issued {CA_CERT}; nothing pruned"),
            });
        }
        let dropped: Vec<String> = dropped
            .iter()
            .map(|d| CertInfo::parse(d).map(|c| c.subject).unwrap_or_default())
            .collect();
        if ca.is_root() && !ca.chain.is_empty() {
            // Cross-certificates only lead to the roots dropped now; first,
            // so that the directory loads at every step.
            write_pem(dir, CHAIN, "", Mode::Public)?;
        }
        if !dropped.is_empty() {
            write_pem(dir, BUNDLE, &files::certs_pem(&keep), Mode::Public)?;
        }
        Ok((Ca::load(dir)?, dropped))
    }
}

pub const NODE_CERT: &str = "cert.pem";
pub const NODE_KEY: &str = "key.pem";
pub const NODE_BUNDLE: &str = "bundle.pem";

/// A CA shared by a running service: re-read when its directory changes
/// (checked at most once a second), so that `mesh-agent ca rotate` or
/// `prune` reach a running CA without a restart. A directory that no
/// longer loads (half-way through an edit) keeps the last good CA.
#[derive(Clone)]
pub struct CaHandle(Arc<HandleInner>);

struct HandleInner {
    dir: Option<PathBuf>,
    bundle: TrustBundle,
    state: Mutex<HandleState>,
}

struct HandleState {
    ca: Arc<Ca>,
    stamp: Vec<Option<(SystemTime, u64)>>,
    checked: Instant,
    generation: u64,
}

impl CaHandle {
    /// Loads the CA of `dir` and follows changes to it.
    pub fn load(dir: &Path) -> Result<CaHandle, CaError> {
        let stamp = stamp(dir);
        let ca = Ca::load(dir)?;
        Ok(CaHandle::build(Some(dir.to_owned()), ca, stamp))
    }

    /// A CA that is never re-read.
    #[cfg(test)]
    pub fn fixed(ca: Ca) -> CaHandle {
        CaHandle::build(None, ca, Vec::new())
    }

    fn build(dir: Option<PathBuf>, ca: Ca, stamp: Vec<Option<(SystemTime, u64)>>) -> CaHandle {
        let bundle = TrustBundle::new(ca.bundle.clone()).expect("Ca::load checked the bundle");
        CaHandle(Arc::new(HandleInner {
            dir,
            bundle,
            state: Mutex::new(HandleState {
                ca: Arc::new(ca),
                stamp,
                checked: Instant::now(),
                generation: 0,
            }),
        }))
    }

    /// The CA in force, re-read first if its files changed.
    pub fn current(&self) -> Arc<Ca> {
        self.current_with_generation().0
    }

    /// The CA in force and a number that changes whenever it is replaced.
    pub fn current_with_generation(&self) -> (Arc<Ca>, u64) {
        let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dir) = &self.0.dir
            && state.checked.elapsed() >= Duration::from_secs(1)
        {
            state.checked = Instant::now();
            let now = stamp(dir);
            if now != state.stamp {
                match Ca::load(dir) {
                    Ok(ca) => {
                        if let Err(e) = self.0.bundle.replace(ca.bundle.clone()) {
                            warn!(error = %e, "new CA bundle refused; keeping the old one");
                        } else {
                            state.ca = Arc::new(ca);
                            state.stamp = now;
                            state.generation += 1;
                            tracing::info!(dir = %dir.display(), "CA reloaded");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "CA directory changed but does not load; keeping the CA in force")
                    }
                }
            }
        }
        (state.ca.clone(), state.generation)
    }

    /// The CA's trust bundle, kept in step with its `bundle.pem`.
    pub fn trust_bundle(&self) -> TrustBundle {
        self.0.bundle.clone()
    }

    pub fn trust_domain(&self) -> String {
        self.current().trust_domain.clone()
    }
}

/// Modification time and length of each CA file.
fn stamp(dir: &Path) -> Vec<Option<(SystemTime, u64)>> {
    FILES
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn new_root(
    trust_domain: &str,
    key: &KeyPair,
    now: SystemTime,
    lifetime: Duration,
) -> Result<CertificateDer<'static>, CaError> {
    let params = ca_params(trust_domain, "root", now, lifetime)?;
    Ok(params.self_signed(key)?.der().clone())
}

fn ca_params(
    trust_domain: &str,
    kind: &str,
    now: SystemTime,
    lifetime: Duration,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "mesh");
    // Creation time and a random tag tell roots apart in `inspect` and
    // logs, and keep two CAs made in the same second from sharing a subject
    // (path building matches issuers by subject).
    let mut tag = [0u8; 4];
    super::random_bytes(&mut tag);
    name.push(
        DnType::CommonName,
        format!(
            "mesh {kind} CA {trust_domain} {} {}",
            rfc3339(now),
            super::cert::hex(&tag)
        ),
    );
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(
        spiffe::trust_domain_id(trust_domain).try_into()?,
    )];
    params.not_before = offset(now - CLOCK_SKEW);
    params.not_after = offset(now + lifetime);
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// 16 random bytes, positive and without a leading zero byte, so every
/// serial has the same length.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    super::random_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// X.509 times have whole seconds.
fn offset(t: SystemTime) -> OffsetDateTime {
    let t = OffsetDateTime::from(t);
    t.replace_nanosecond(0).unwrap_or(t)
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::CreateDir {
            dir: dir.to_owned(),
            source,
        })
}

fn write_pem(dir: &Path, file: &str, text: &str, mode: Mode) -> Result<(), CaError> {
    Ok(files::write_atomic(&dir.join(file), text.as_bytes(), mode)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cert::CertInfo,
        testing::TempDir,
        verify::{Usage, verify_chain},
    };

    const TD: &str = "cluster.local";
    const HOUR: Duration = Duration::from_secs(3600);

    fn csr(key: &KeyPair, asks_for: &str) -> Vec<u8> {
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.subject_alt_names = vec![SanType::URI(asks_for.try_into().unwrap())];
        params.distinguished_name.push(DnType::CommonName, "evil");
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn init_root_writes_a_loadable_ca_and_refuses_to_overwrite() {
        let dir = TempDir::new("ca-init-root");
        let ca = Ca::init(TD, dir.path(), None, DEFAULT_CA_LIFETIME).unwrap();
        assert_eq!(ca.trust_domain(), TD);
        assert!(ca.is_root());
        assert_eq!(ca.bundle(), std::slice::from_ref(ca.cert()));
        assert_eq!(std::fs::read_to_string(dir.path().join(CHAIN)).unwrap(), "");
        let key_mode = std::fs::metadata(dir.path().join(CA_KEY))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            0o600
        );
        let again = Ca::init(TD, dir.path(), None, DEFAULT_CA_LIFETIME).unwrap_err();
        assert!(
            again.to_string().contains("refusing to overwrite"),
            "{again}"
        );
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.cert(), ca.cert());
        assert!(Ca::init("Bad TD", &dir.path().join("x"), None, HOUR).is_err());
    }

    #[test]
    fn init_intermediate_under_a_users_root() {
        let root_dir = TempDir::new("ca-user-root");
        let root = Ca::init(TD, root_dir.path(), None, DEFAULT_CA_LIFETIME).unwrap();
        let dir = TempDir::new("ca-intermediate");
        let ca = Ca::init(
            TD,
            dir.path(),
            Some((
                &root_dir.path().join(CA_CERT),
                &root_dir.path().join(CA_KEY),
            )),
            DEFAULT_CA_LIFETIME * 2,
        )
        .unwrap();
        assert!(!ca.is_root());
        assert_eq!(ca.bundle(), root.bundle());
        // Never outlives its root.
        assert!(ca.not_after() <= root.not_after());
        let (chain, _) = ca
            .issue(&mesh_policy::spiffe_id(TD, "shop", "cart"), HOUR)
            .unwrap();
        assert_eq!(chain.len(), 2, "leaf and intermediate");
        verify_chain(root.bundle(), &chain, SystemTime::now(), Usage::Client).unwrap();
        // Rotation of an intermediate is refused with the way forward.
        let e = Ca::rotate(dir.path(), None).unwrap_err().to_string();
        assert!(
            e.contains("intermediate CA") && e.contains("ca init"),
            "{e}"
        );
        // A key that is not the root's is refused.
        let e = Ca::init(
            TD,
            &dir.path().join("other"),
            Some((&root_dir.path().join(CA_CERT), &dir.path().join(CA_KEY))),
            HOUR,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not match"), "{e}");
    }

    #[test]
    fn sign_puts_exactly_the_authorised_identity() {
        let dir = TempDir::new("ca-sign");
        let ca = Ca::init(TD, dir.path(), None, DEFAULT_CA_LIFETIME).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cart = mesh_policy::spiffe_id(TD, "shop", "cart");
        let chain = ca
            .sign(
                &csr(&key, "spiffe://cluster.local/ns/kube-system/sa/admin"),
                &cart,
                HOUR,
            )
            .unwrap();
        let info = CertInfo::parse(&chain[0]).unwrap();
        assert_eq!(info.uris, vec![cart.clone()]);
        assert_eq!(info.subject, "");
        assert!(!info.is_ca);
        assert_eq!(info.usages, Some((true, true)));
        assert_eq!(info.spki, key.subject_public_key_info());
        assert_eq!(info.serial.len(), 32);
        let now = SystemTime::now();
        assert!(info.not_before <= now - Duration::from_secs(50));
        assert!(info.not_before >= CertInfo::parse(ca.cert()).unwrap().not_before);
        assert!(
            info.not_after <= now + HOUR && info.not_after > now + HOUR - Duration::from_secs(5)
        );
        assert_eq!(
            verify_chain(ca.bundle(), &chain, now, Usage::Server).unwrap(),
            cart
        );
        // Serials are random.
        let again = ca.sign(&csr(&key, &cart), &cart, HOUR).unwrap();
        assert_ne!(CertInfo::parse(&again[0]).unwrap().serial, info.serial);
        // Never beyond the CA's own end.
        let long = ca
            .sign(&csr(&key, &cart), &cart, DEFAULT_CA_LIFETIME * 3)
            .unwrap();
        assert_eq!(CertInfo::parse(&long[0]).unwrap().not_after, ca.not_after());
        // Another trust domain, other key types and garbage are refused.
        assert!(matches!(
            ca.sign(&csr(&key, &cart), "spiffe://other/ns/shop/sa/cart", HOUR),
            Err(CaError::ForeignId(..))
        ));
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let e = ca.sign(&csr(&p384, &cart), &cart, HOUR).unwrap_err();
        assert!(e.to_string().contains("not ECDSA P-256"), "{e}");
        assert!(matches!(
            ca.sign(b"nope", &cart, HOUR),
            Err(CaError::Csr(_))
        ));
    }

    #[test]
    fn issue_node_writes_credentials() {
        let dir = TempDir::new("ca-node");
        let ca = Ca::init(TD, dir.path(), None, DEFAULT_CA_LIFETIME).unwrap();
        let out = dir.path().join("node-a");
        ca.issue_node("node-a", HOUR, &out).unwrap();
        let (chain, _) =
            files::read_credentials(&out.join(NODE_CERT), &out.join(NODE_KEY), SystemTime::now())
                .unwrap();
        let bundle = files::read_certs(&out.join(NODE_BUNDLE)).unwrap();
        assert_eq!(
            verify_chain(&bundle, &chain, SystemTime::now(), Usage::Client).unwrap(),
            "spiffe://cluster.local/mesh/node/node-a"
        );
        assert!(matches!(
            ca.issue_node("Not_A_Node", HOUR, &out),
            Err(CaError::NodeName(_))
        ));
    }

    #[test]
    fn rotation_keeps_old_roots_trusted_until_pruned() {
        let dir = TempDir::new("ca-rotate");
        let old = Ca::init(TD, dir.path(), None, DEFAULT_CA_LIFETIME).unwrap();
        let cart = mesh_policy::spiffe_id(TD, "shop", "cart");
        let (old_leaf, _) = old.issue(&cart, HOUR).unwrap();

        let new = Ca::rotate(dir.path(), None).unwrap();
        assert_ne!(new.cert(), old.cert());
        assert_eq!(new.bundle().len(), 2);
        let (new_leaf, _) = new.issue(&cart, HOUR).unwrap();
        assert_eq!(new_leaf.len(), 2, "leaf and the cross-signed new root");
        let now = SystemTime::now();
        let new_root_only = std::slice::from_ref(new.cert());
        // The merged bundle trusts both leaves; the new leaf verifies with
        // the old bundle (cross-signed) and with the new root alone.
        verify_chain(new.bundle(), &new_leaf, now, Usage::Server).unwrap();
        verify_chain(new.bundle(), &old_leaf, now, Usage::Server).unwrap();
        verify_chain(old.bundle(), &new_leaf, now, Usage::Client).unwrap();
        verify_chain(new_root_only, &new_leaf, now, Usage::Client).unwrap();
        assert!(verify_chain(new_root_only, &old_leaf, now, Usage::Server).is_err());

        // A second rotation before pruning: chains reach every root.
        let newer = Ca::rotate(dir.path(), None).unwrap();
        assert_eq!(newer.bundle().len(), 3);
        let (newer_leaf, _) = newer.issue(&cart, HOUR).unwrap();
        assert_eq!(newer_leaf.len(), 3);
        verify_chain(old.bundle(), &newer_leaf, now, Usage::Server).unwrap();
        verify_chain(new.bundle(), &old_leaf, now, Usage::Server).unwrap();

        let (pruned, dropped) = Ca::prune(dir.path()).unwrap();
        assert_eq!(dropped.len(), 2);
        assert_eq!(pruned.bundle(), std::slice::from_ref(newer.cert()));
        let (pruned_leaf, _) = pruned.issue(&cart, HOUR).unwrap();
        assert_eq!(pruned_leaf.len(), 1, "no cross-certificates after pruning");
        verify_chain(pruned.bundle(), &pruned_leaf, now, Usage::Server).unwrap();
        verify_chain(pruned.bundle(), &newer_leaf, now, Usage::Server).unwrap();
        assert!(verify_chain(pruned.bundle(), &old_leaf, now, Usage::Server).is_err());
        assert!(verify_chain(old.bundle(), &pruned_leaf, now, Usage::Server).is_err());
        // Pruning again changes nothing.
        assert!(Ca::prune(dir.path()).unwrap().1.is_empty());
    }

    #[test]
    fn handle_follows_the_directory() {
        let dir = TempDir::new("ca-handle");
        Ca::init(TD, dir.path(), None, DEFAULT_CA_LIFETIME).unwrap();
        let handle = CaHandle::load(dir.path()).unwrap();
        let (first, generation) = handle.current_with_generation();
        Ca::rotate(dir.path(), None).unwrap();
        // Force the next check instead of waiting a second.
        handle.0.state.lock().unwrap().checked -= Duration::from_secs(2);
        let (second, next) = handle.current_with_generation();
        assert_ne!(first.cert(), second.cert());
        assert_eq!(next, generation + 1);
        assert_eq!(handle.trust_bundle().roots().len(), 2);
        // The CA's serving certificate chains to both roots.
        let serving = second.serving_svid(HOUR).unwrap();
        verify_chain(
            first.bundle(),
            &serving.key.cert,
            SystemTime::now(),
            Usage::Server,
        )
        .unwrap();
    }
}
