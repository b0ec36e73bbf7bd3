//! Verifying peers by SPIFFE identity: the trust bundle and the rustls
//! verifiers for both ends of mutual TLS.
//!
//! A peer is trusted when its chain verifies to a root of the bundle at the
//! current time, for the usage of its end, and its leaf is an SVID (exactly
//! one URI SAN, a SPIFFE ID of the mesh's trust domain, not a CA). Which
//! identity is acceptable is then up to each end: a server accepts any mesh
//! identity (policy decides later) or those of a predicate; a client
//! accepts only the identity its server name asks for.

use std::sync::{Arc, RwLock};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use super::{cert::CertInfo, spiffe};
use mesh_policy::numeric_identity;

/// The roots a node trusts, shared by every TLS configuration built from
/// it and replaceable at any time: a CA rotation reaches new handshakes
/// without rebuilding configurations, and never touches open sessions.
#[derive(Clone)]
pub struct TrustBundle(Arc<RwLock<Arc<Roots>>>);

/// One version of the bundle.
pub struct Roots {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("the trust bundle is empty")]
    Empty,
    #[error("trust bundle root {index}: {message}")]
    BadRoot { index: usize, message: String },
}

impl Roots {
    fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if certs.is_empty() {
            return Err(BundleError::Empty);
        }
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(i, cert)| {
                webpki::anchor_from_trusted_cert(cert)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadRoot {
                        index: i + 1,
                        message: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Roots { certs, anchors })
    }
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        Ok(TrustBundle(Arc::new(RwLock::new(Arc::new(Roots::new(
            roots,
        )?)))))
    }

    /// Replaces the roots; returns whether they changed.
    pub fn replace(&self, roots: Vec<CertificateDer<'static>>) -> Result<bool, BundleError> {
        if self.snapshot().certs == roots {
            return Ok(false);
        }
        let new = Arc::new(Roots::new(roots)?);
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(true)
    }

    /// The roots in force now.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.snapshot().certs.clone()
    }

    pub fn snapshot(&self) -> Arc<Roots> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.snapshot().certs.len())
            .finish()
    }
}

/// Which end of a connection a certificate authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

/// Verifies an SVID chain (leaf, then intermediates) against `roots` at
/// `now`, with real signature checks; returns the leaf's SPIFFE ID. The
/// trust domain is not checked here.
pub fn verify_svid(
    roots: &Roots,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<String, Error> {
    let algorithms = super::provider().signature_verification_algorithms;
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    let usage = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    cert.verify_for_usage(
        algorithms.all,
        &roots.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(pki_error)?;
    let info = CertInfo::parse(end_entity).map_err(|e| refuse(format!("certificate {e}")))?;
    info.svid_id()
        .map(str::to_owned)
        .map_err(|e| refuse(format!("certificate {e}")))
}

/// Verifies a chain (leaf first) against a list of roots at `now`: for
/// checking what a CA returned before using it.
pub fn verify_chain(
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    now: std::time::SystemTime,
    usage: Usage,
) -> Result<String, Error> {
    let roots = Roots::new(roots.to_vec()).map_err(|e| refuse(e.to_string()))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| refuse("empty certificate chain".into()))?;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    verify_svid(&roots, leaf, intermediates, now, usage)
}

/// The SPIFFE ID of the peer of a completed handshake (client or server
/// side: pass the connection, it dereferences to `CommonState`). Only
/// meaningful for connections whose configuration uses this module's
/// verifiers, which refused any peer without a valid SVID.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<String> {
    let leaf = conn.peer_certificates()?.first()?;
    CertInfo::parse(leaf)
        .ok()?
        .svid_id()
        .ok()
        .map(str::to_owned)
}

/// Client side, after the handshake: the server's certificate names
/// exactly `expected`. The server name only carries the identity's 64-bit
/// number, which two identities can share (names a tenant searched for), so
/// the verifier's check of the number alone does not tell them apart.
pub fn require_peer(conn: &rustls::CommonState, expected: &str) -> Result<(), String> {
    match peer_identity(conn) {
        Some(seen) if seen == expected => Ok(()),
        Some(seen) => Err(format!("the server is {seen}, not {expected}")),
        None => Err(format!("the server has no identity, not {expected}")),
    }
}

type Predicate = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Server side: requires a client certificate that is an SVID of the trust
/// domain, optionally only of identities a predicate accepts.
pub struct SpiffeClientVerifier {
    bundle: TrustBundle,
    trust_domain: String,
    only: Option<(String, Predicate)>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: TrustBundle, trust_domain: &str) -> Self {
        SpiffeClientVerifier {
            bundle,
            trust_domain: trust_domain.to_owned(),
            only: None,
            algorithms: super::provider().signature_verification_algorithms,
        }
    }

    /// Accepts only identities for which `accept` is true; `what` says what
    /// they are, for the error (e.g. "a node identity").
    pub fn only(
        mut self,
        what: &str,
        accept: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.only = Some((what.to_owned(), Arc::new(accept)));
        self
    }

    /// Accepts only workload identities
    /// (`spiffe://<td>/ns/<namespace>/sa/<service-account>`): not a node's
    /// credential, not the CA's serving certificate.
    pub fn workloads_only(self) -> Self {
        let td = self.trust_domain.clone();
        self.only("a workload identity", move |id| {
            spiffe::is_workload_id(id, &td)
        })
    }

    /// Accepts only node identities (`spiffe://<td>/mesh/node/<name>`).
    pub fn nodes_only(self) -> Self {
        let td = self.trust_domain.clone();
        self.only("a node identity", move |id| {
            spiffe::node_name(id, &td).is_some()
        })
    }
}

impl std::fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("only", &self.only.as_ref().map(|(what, _)| what))
            .finish()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: each client has the one certificate of its identity, and
    /// the bundle changes at runtime, which a borrowed slice cannot follow.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let roots = self.bundle.snapshot();
        let id = verify_svid(&roots, end_entity, intermediates, now, Usage::Client)?;
        if !spiffe::in_trust_domain(&id, &self.trust_domain) {
            return Err(refuse(format!(
                "client identity {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        if let Some((what, accept)) = &self.only
            && !accept(&id)
        {
            return Err(refuse(format!("client identity {id} is not {what}")));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client side: the server must present an SVID of the trust domain whose
/// identity is the one the server name asks for: `id-<hex>.mesh.internal`
/// (the numeric identity, see [`spiffe::sni_for`]) or the CA's fixed name.
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: TrustBundle, trust_domain: &str) -> Self {
        SpiffeServerVerifier {
            bundle,
            trust_domain: trust_domain.to_owned(),
            algorithms: super::provider().signature_verification_algorithms,
        }
    }

    /// Whether `id` is what `server_name` asks for.
    fn check_expected(&self, id: &str, server_name: &ServerName<'_>) -> Result<(), Error> {
        let ServerName::DnsName(name) = server_name else {
            return Err(refuse(format!(
                "server name {} is not a mesh identity's name",
                server_name.to_str()
            )));
        };
        let name = name.as_ref();
        if name == spiffe::CA_SERVER_NAME {
            let expected = spiffe::ca_id(&self.trust_domain);
            return if id == expected {
                Ok(())
            } else {
                Err(refuse(format!(
                    "server identity {id} is not the CA's ({expected})"
                )))
            };
        }
        let Some(expected) = spiffe::identity_from_sni(name) else {
            return Err(refuse(format!(
                "server name {name} does not name a mesh identity (id-<16 hex digits>.mesh.internal)"
            )));
        };
        let got = numeric_identity(id);
        if got == expected {
            Ok(())
        } else {
            Err(refuse(format!(
                "server identity {id} (identity {got}) is not the expected identity {expected}"
            )))
        }
    }
}

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let roots = self.bundle.snapshot();
        let id = verify_svid(&roots, end_entity, intermediates, now, Usage::Server)?;
        if !spiffe::in_trust_domain(&id, &self.trust_domain) {
            return Err(refuse(format!(
                "server identity {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        self.check_expected(&id, server_name)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A refusal about identity, with the reason for logs and the peer.
struct Refused(String);

/// rustls shows `Other` errors with `{:?}`: keep the reason readable.
impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse(message: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(
        message,
    )))))
}

/// webpki's verdicts in rustls' words (what rustls' own verifier does),
/// keeping the context (times) that makes a log line useful.
fn pki_error(error: webpki::Error) -> Error {
    use webpki::Error as E;
    let cert = match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        #[allow(deprecated)]
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) => {
            CertificateError::InvalidPurpose
        }
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(cert)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        spiffe::sni_for,
        store::{client_tls_config, server_tls_config},
        testing::{TestCa, handshake},
    };

    const TD: &str = "cluster.local";

    fn id(sa: &str) -> String {
        mesh_policy::spiffe_id(TD, "shop", sa)
    }

    fn sni(spiffe_id: &str) -> ServerName<'static> {
        sni_for(numeric_identity(spiffe_id))
    }

    #[test]
    fn chains_verify_to_the_bundle_only() {
        let ca = TestCa::root(TD);
        let other = TestCa::root(TD);
        let (chain, _) = ca.issue(&id("cart"), Duration::from_secs(3600));
        let now = SystemTime::now();
        assert_eq!(
            verify_chain(ca.bundle(), &chain, now, Usage::Server).unwrap(),
            id("cart")
        );
        let e = verify_chain(other.bundle(), &chain, now, Usage::Client).unwrap_err();
        assert_eq!(
            e,
            Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }

    #[tokio::test]
    async fn mutual_tls_between_two_identities() {
        let ca = TestCa::root(TD);
        let server = ca.store(TD, &[&id("cart")]);
        let client = ca.store(TD, &[&id("frontend")]);
        let (server_saw, client_saw) = handshake(
            server.server_config(),
            client.client_config(&id("frontend")).unwrap(),
            sni(&id("cart")),
        )
        .await
        .unwrap();
        assert_eq!(server_saw.as_deref(), Some(id("frontend").as_str()));
        assert_eq!(client_saw.as_deref(), Some(id("cart").as_str()));
    }

    #[tokio::test]
    async fn an_identity_with_the_same_number_passes_the_name_check_but_not_require_peer() {
        // Two service accounts whose SPIFFE IDs share their 64-bit number.
        let [a, b] = mesh_policy::COLLIDING_SERVICE_ACCOUNTS
            .map(|sa| mesh_policy::spiffe_id(TD, "tenant", sa));
        let (a, b) = (a.as_str(), b.as_str());
        assert_eq!(numeric_identity(a), numeric_identity(b));
        let ca = TestCa::root(TD);
        let server = ca.store(TD, &[a]);
        let client = ca.store(TD, &[&id("frontend")]);
        let connector =
            tokio_rustls::TlsConnector::from(client.client_config(&id("frontend")).unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let (x, y) = tokio::io::duplex(64 * 1024);
        // Asking for b, the client gets a's certificate, and the handshake
        // passes: the name carries only the number.
        let (s, c) = tokio::join!(acceptor.accept(x), connector.connect(sni(b), y));
        let (_s, c) = (s.unwrap(), c.unwrap());
        let conn = c.get_ref().1;
        assert_eq!(
            require_peer(conn, b).unwrap_err(),
            format!("the server is {a}, not {b}")
        );
        require_peer(conn, a).unwrap();
    }

    #[tokio::test]
    async fn refuses_another_trust_domain() {
        // The server trusts both roots, so the foreign chain verifies; its
        // identity is still not of the mesh's trust domain.
        let ca = TestCa::root(TD);
        let evil = TestCa::root("evil.example");
        let server = ca.store(TD, &[&id("cart")]);
        let mut roots = ca.bundle().to_vec();
        roots.extend(evil.bundle().iter().cloned());
        server.trust_bundle().replace(roots).unwrap();
        let intruder = evil.svid("spiffe://evil.example/ns/shop/sa/frontend");
        let client = client_tls_config(
            Some(intruder.key),
            Arc::new(SpiffeServerVerifier::new(
                TrustBundle::new(ca.bundle().to_vec()).unwrap(),
                TD,
            )),
        );
        let e = handshake(server.server_config(), client, sni(&id("cart")))
            .await
            .unwrap_err();
        assert!(
            e.contains(
                "spiffe://evil.example/ns/shop/sa/frontend is not in trust domain cluster.local"
            ),
            "{e}"
        );
        // The other way round: a client of the mesh refuses such a server.
        let evil_server = evil.store("evil.example", &["spiffe://evil.example/ns/shop/sa/cart"]);
        let client = ca.store(TD, &[&id("frontend")]);
        let mut roots = ca.bundle().to_vec();
        roots.extend(evil.bundle().iter().cloned());
        client.trust_bundle().replace(roots.clone()).unwrap();
        evil_server.trust_bundle().replace(roots).unwrap();
        let e = handshake(
            evil_server.server_config(),
            client.client_config(&id("frontend")).unwrap(),
            sni("spiffe://evil.example/ns/shop/sa/cart"),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains("client: ") && e.contains("is not in trust domain"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn refuses_an_expired_leaf() {
        let ca = TestCa::root(TD);
        let server = ca.store(TD, &[&id("cart")]);
        let client = ca.store(TD, &[]);
        let now = SystemTime::now();
        client.insert(ca.svid_at(
            &id("frontend"),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        ));
        let e = handshake(
            server.server_config(),
            client.client_config(&id("frontend")).unwrap(),
            sni(&id("cart")),
        )
        .await
        .unwrap_err();
        assert!(
            e.starts_with("server: invalid peer certificate: certificate expired"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn refuses_a_wrong_server_identity() {
        // A server that answers the name of `cart` with the certificate of
        // `payments` (valid, same CA) is refused by the client.
        let ca = TestCa::root(TD);
        let payments = ca.svid(&id("payments"));
        let server = server_tls_config(
            Arc::new(rustls::sign::SingleCertAndKey::from(payments.key.clone())),
            Arc::new(SpiffeClientVerifier::new(
                TrustBundle::new(ca.bundle().to_vec()).unwrap(),
                TD,
            )),
        );
        let client = ca.store(TD, &[&id("frontend")]);
        let e = handshake(
            server,
            client.client_config(&id("frontend")).unwrap(),
            sni(&id("cart")),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains(&format!(
                "client: invalid peer certificate: Other(OtherError(server identity {} (identity",
                id("payments")
            )) && e.contains("is not the expected identity"),
            "{e}"
        );
        // A name that is not a mesh identity's is refused too.
        let e = handshake(
            server_tls_config(
                Arc::new(rustls::sign::SingleCertAndKey::from(payments.key)),
                Arc::new(SpiffeClientVerifier::new(
                    TrustBundle::new(ca.bundle().to_vec()).unwrap(),
                    TD,
                )),
            ),
            client.client_config(&id("frontend")).unwrap(),
            ServerName::try_from("payments.shop.svc").unwrap(),
        )
        .await
        .unwrap_err();
        assert!(e.contains("does not name a mesh identity"), "{e}");
    }

    #[tokio::test]
    async fn refuses_a_client_without_a_certificate() {
        let ca = TestCa::root(TD);
        let server = ca.store(TD, &[&id("cart")]);
        let anonymous = client_tls_config(
            None,
            Arc::new(SpiffeServerVerifier::new(
                TrustBundle::new(ca.bundle().to_vec()).unwrap(),
                TD,
            )),
        );
        let e = handshake(server.server_config(), anonymous, sni(&id("cart")))
            .await
            .unwrap_err();
        assert!(e.starts_with("server: peer sent no certificates"), "{e}");
    }

    #[test]
    fn client_verifier_predicate() {
        let ca = TestCa::root(TD);
        let bundle = TrustBundle::new(ca.bundle().to_vec()).unwrap();
        let verifier = SpiffeClientVerifier::new(bundle, TD).nodes_only();
        let (workload, _) = ca.issue(&id("cart"), Duration::from_secs(60));
        let (node, _) = ca.issue(&spiffe::node_id(TD, "node-a"), Duration::from_secs(60));
        let now = UnixTime::now();
        let e = verifier
            .verify_client_cert(&workload[0], &workload[1..], now)
            .unwrap_err();
        assert!(e.to_string().contains("is not a node identity"), "{e}");
        verifier
            .verify_client_cert(&node[0], &node[1..], now)
            .unwrap();
    }
}
