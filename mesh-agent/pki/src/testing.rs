//! Test helpers: temporary directories, a CA, stores and real TLS
//! handshakes over an in-memory pipe.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::{
    ClientConfig, ServerConfig,
    pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName},
};

use super::{
    ca::{Ca, DEFAULT_CA_LIFETIME},
    store::{Svid, SvidStore},
    verify::{TrustBundle, peer_identity},
};

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-pki-{name}-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed P-256 certificate valid from `not_before` to `not_after`.
pub fn self_signed(
    not_before: SystemTime,
    not_after: SystemTime,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["test.example".to_string()]).unwrap();
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    (params.self_signed(&key).unwrap().der().clone(), key)
}

/// A root CA in a temporary directory.
pub struct TestCa {
    _dir: TempDir,
    pub ca: Ca,
}

impl TestCa {
    pub fn root(trust_domain: &str) -> TestCa {
        let dir = TempDir::new("test-ca");
        let ca = Ca::init(trust_domain, dir.path(), None, DEFAULT_CA_LIFETIME).unwrap();
        TestCa { _dir: dir, ca }
    }

    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        self.ca.bundle()
    }

    pub fn issue(
        &self,
        spiffe_id: &str,
        lifetime: Duration,
    ) -> (Vec<CertificateDer<'static>>, KeyPair) {
        self.ca.issue(spiffe_id, lifetime).unwrap()
    }

    /// An SVID valid for an hour.
    pub fn svid(&self, spiffe_id: &str) -> Svid {
        let (chain, key) = self.issue(spiffe_id, Duration::from_secs(3600));
        to_svid(chain, key)
    }

    /// An SVID valid exactly from `not_before` to `not_after`.
    pub fn svid_at(&self, spiffe_id: &str, not_before: SystemTime, not_after: SystemTime) -> Svid {
        let (chain, key) = self
            .ca
            .issue_with_validity(spiffe_id, not_before, not_after);
        to_svid(chain, key)
    }

    /// A store of `trust_domain` trusting this CA, holding SVIDs of `ids`.
    pub fn store(&self, trust_domain: &str, ids: &[&str]) -> SvidStore {
        let store = SvidStore::new(
            trust_domain,
            TrustBundle::new(self.bundle().to_vec()).unwrap(),
        );
        for id in ids {
            store.insert(self.svid(id));
        }
        store
    }
}

pub fn to_svid(chain: Vec<CertificateDer<'static>>, key: KeyPair) -> Svid {
    Svid::new(chain, PrivatePkcs8KeyDer::from(key.serialize_der()).into()).unwrap()
}

/// A TLS handshake between the two configurations over an in-memory pipe.
/// Returns the identity each side verified (server's view of the client,
/// client's view of the server), or both sides' outcomes as text.
pub async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<(Option<String>, Option<String>), String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
    match (s, c) {
        (Ok(s), Ok(c)) => Ok((peer_identity(s.get_ref().1), peer_identity(c.get_ref().1))),
        (s, c) => Err(format!(
            "server: {}; client: {}",
            s.err().map_or("ok".into(), |e| e.to_string()),
            c.err().map_or("ok".into(), |e| e.to_string()),
        )),
    }
}

/// A Workload document (docs/policy.md) of namespace `shop`.
pub fn workload(name: &str, service_account: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\n  namespace: shop\n\
         spec:\n  serviceAccount: {service_account}\n  ips: [{ip}]\n  node: {node}\n---\n"
    )
}
