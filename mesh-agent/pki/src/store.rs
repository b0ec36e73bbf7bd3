//! The node's SVIDs (the certificates of its local workloads) and the TLS
//! configurations that present and verify them.
//!
//! One server configuration serves every local identity: the client names
//! the identity it wants in the SNI (`id-<hex>.mesh.internal`) and the
//! server presents that identity's SVID, refusing names it does not host.
//! Client configurations are per source identity and rebuilt when that
//! identity's SVID is replaced, so new connections present the new
//! certificate; established sessions are never touched. TLS session
//! resumption is off on both ends: every connection is verified in full
//! against the current bundle, so a renewal or CA rotation applies to every
//! new connection.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::SystemTime,
};

use rustls::{
    ClientConfig, ServerConfig,
    client::{Resumption, danger::ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer},
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, danger::ClientCertVerifier},
    sign::{CertifiedKey, SingleCertAndKey},
};
use tokio::sync::watch;

use super::{
    cert::{CertError, CertInfo},
    spiffe,
    verify::{SpiffeClientVerifier, SpiffeServerVerifier, TrustBundle},
};
use mesh_policy::numeric_identity;

/// ALPN of mesh connections: HTTP/2 (HBONE tunnels, the CA's gRPC).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of bulk tunnels: one HTTP/1.1 `CONNECT` per TLS connection, whose
/// records the kernel may encrypt (the agent's `tunnel::bulk`).
pub const ALPN_BULK: &[u8] = b"http/1.1";

/// A workload's (or node's) X.509 SVID with its key.
#[derive(Clone)]
pub struct Svid {
    pub spiffe_id: String,
    /// The kernel's number for the identity.
    pub identity: u64,
    /// The chain (leaf first, without the root) and the signing key, as
    /// rustls presents them.
    pub key: Arc<CertifiedKey>,
    /// Lowercase hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("empty certificate chain")]
    EmptyChain,
    #[error("the certificate {0}")]
    Certificate(#[from] CertError),
    #[error("the key is unusable or not the certificate's: {0}")]
    Key(rustls::Error),
}

impl Svid {
    /// Checks that the leaf is an SVID and that the key is its key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Svid, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let info = CertInfo::parse(leaf)?;
        let spiffe_id = info.svid_id()?.to_owned();
        let signing_key = super::provider()
            .key_provider
            .load_private_key(key)
            .map_err(SvidError::Key)?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(SvidError::Key)?;
        Ok(Svid {
            identity: numeric_identity(&spiffe_id),
            spiffe_id,
            key: Arc::new(certified),
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &super::cert::rfc3339(self.not_after))
            .finish()
    }
}

/// The current SVID of each local identity, and the trust bundle. Cheap to
/// clone; every clone is the same store.
#[derive(Clone)]
pub struct SvidStore(Arc<StoreInner>);

struct StoreInner {
    trust_domain: String,
    bundle: TrustBundle,
    svids: RwLock<Svids>,
    client_configs: Mutex<HashMap<String, (String, Arc<ClientConfig>)>>,
    server_config: OnceLock<Arc<ServerConfig>>,
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct Svids {
    by_id: HashMap<String, Arc<Svid>>,
    by_identity: HashMap<u64, Arc<Svid>>,
}

impl SvidStore {
    pub fn new(trust_domain: &str, bundle: TrustBundle) -> SvidStore {
        SvidStore(Arc::new(StoreInner {
            trust_domain: trust_domain.to_owned(),
            bundle,
            svids: RwLock::default(),
            client_configs: Mutex::default(),
            server_config: OnceLock::new(),
            changes: watch::channel(0).0,
        }))
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.0.bundle
    }

    /// Puts `svid` in place of the identity's current one, atomically: a
    /// handshake sees the old or the new, never neither. Returns the
    /// previous one.
    pub fn insert(&self, svid: Svid) -> Option<Arc<Svid>> {
        let svid = Arc::new(svid);
        let previous = {
            let mut svids = self.0.svids.write().unwrap_or_else(|p| p.into_inner());
            svids.by_identity.insert(svid.identity, svid.clone());
            svids.by_id.insert(svid.spiffe_id.clone(), svid)
        };
        self.0.changes.send_modify(|n| *n += 1);
        previous
    }

    /// Forgets an identity: new connections can no longer use it.
    pub fn remove(&self, spiffe_id: &str) -> Option<Arc<Svid>> {
        let removed = {
            let mut svids = self.0.svids.write().unwrap_or_else(|p| p.into_inner());
            let removed = svids.by_id.remove(spiffe_id);
            if let Some(svid) = &removed {
                svids.by_identity.remove(&svid.identity);
            }
            removed
        };
        self.0
            .client_configs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(spiffe_id);
        if removed.is_some() {
            self.0.changes.send_modify(|n| *n += 1);
        }
        removed
    }

    pub fn get(&self, spiffe_id: &str) -> Option<Arc<Svid>> {
        self.read().by_id.get(spiffe_id).cloned()
    }

    /// Every SVID, ordered by SPIFFE ID.
    pub fn all(&self) -> Vec<Arc<Svid>> {
        let mut all: Vec<Arc<Svid>> = self.read().by_id.values().cloned().collect();
        all.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        all
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Svids> {
        self.0.svids.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The node's one server configuration: presents the SVID of the
    /// identity named in the SNI, requires a client workload SVID of the
    /// trust domain (any workload: policy decides), ALPN `h2` or, for bulk
    /// tunnels, `http/1.1` (with the secrets kept for the kernel). Node and
    /// CA certificates are refused as sources: they name no workload, yet
    /// would match "any identity" rules and count as mutual TLS.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.0
            .server_config
            .get_or_init(|| {
                let mut config = Arc::unwrap_or_clone(server_tls_config(
                    Arc::new(SniResolver(Arc::downgrade(&self.0))),
                    Arc::new(
                        SpiffeClientVerifier::new(self.0.bundle.clone(), &self.0.trust_domain)
                            .workloads_only(),
                    ),
                ));
                config.alpn_protocols.push(ALPN_BULK.to_vec());
                config.enable_secret_extraction = true;
                Arc::new(config)
            })
            .clone()
    }

    /// A client configuration presenting `source`'s SVID and accepting only
    /// the server identity named in the SNI (use [`spiffe::sni_for`]).
    /// `None` when the node holds no SVID for `source`.
    pub fn client_config(&self, source: &str) -> Option<Arc<ClientConfig>> {
        let svid = self.get(source)?;
        let mut configs = self
            .0
            .client_configs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((serial, config)) = configs.get(source)
            && *serial == svid.serial
        {
            return Some(config.clone());
        }
        let config = client_tls_config(
            Some(svid.key.clone()),
            Arc::new(SpiffeServerVerifier::new(
                self.0.bundle.clone(),
                &self.0.trust_domain,
            )),
        );
        configs.insert(source.to_owned(), (svid.serial.clone(), config.clone()));
        Some(config)
    }

    /// [`Self::client_config`] for a bulk tunnel: ALPN `http/1.1` only, and
    /// the traffic secrets kept so the kernel can take the records over.
    pub fn bulk_client_config(&self, source: &str) -> Option<Arc<ClientConfig>> {
        let mut config = (*self.client_config(source)?).clone();
        config.alpn_protocols = vec![ALPN_BULK.to_vec()];
        config.enable_secret_extraction = true;
        Some(Arc::new(config))
    }
}

/// The store is already a shared handle; this lets callers that keep it
/// in an `Arc` pass that.
impl From<Arc<SvidStore>> for SvidStore {
    fn from(store: Arc<SvidStore>) -> Self {
        (*store).clone()
    }
}

/// Picks the SVID whose numeric identity the SNI names.
#[derive(Debug)]
struct SniResolver(std::sync::Weak<StoreInner>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let identity = spiffe::identity_from_sni(client_hello.server_name()?)?;
        let store = self.0.upgrade()?;
        let svids = store.svids.read().unwrap_or_else(|p| p.into_inner());
        svids.by_identity.get(&identity).map(|s| s.key.clone())
    }
}

impl std::fmt::Debug for StoreInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidStore")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

/// A TLS 1.3 server configuration of the mesh: the ring provider, ALPN
/// `h2`, mandatory client certificates, no session resumption and no
/// tickets (for bulk tunnels, a ticket arriving on a kernel TLS socket
/// would be a record the kernel cannot pass on).
pub fn server_tls_config(
    certs: Arc<dyn ResolvesServerCert>,
    clients: Arc<dyn ClientCertVerifier>,
) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(clients)
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// A TLS 1.3 client configuration of the mesh: the ring provider, ALPN
/// `h2`, the given client certificate, no session resumption.
pub fn client_tls_config(
    cert: Option<Arc<CertifiedKey>>,
    servers: Arc<dyn ServerCertVerifier>,
) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(servers);
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{TestCa, handshake};

    const TD: &str = "cluster.local";

    fn id(sa: &str) -> String {
        mesh_policy::spiffe_id(TD, "shop", sa)
    }

    #[test]
    fn svid_checks_key_and_certificate() {
        let ca = TestCa::root(TD);
        let (chain, key) = ca.issue(&id("cart"), Duration::from_secs(60));
        let svid = Svid::new(
            chain.clone(),
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
        assert_eq!(svid.spiffe_id, id("cart"));
        assert_eq!(svid.identity, numeric_identity(&id("cart")));
        let (_, other) = ca.issue(&id("cart"), Duration::from_secs(60));
        let e = Svid::new(
            chain,
            rustls::pki_types::PrivatePkcs8KeyDer::from(other.serialize_der()).into(),
        )
        .unwrap_err();
        assert!(matches!(e, SvidError::Key(_)), "{e}");
    }

    #[tokio::test]
    async fn one_server_config_serves_every_local_identity() {
        let ca = TestCa::root(TD);
        let server = ca.store(TD, &[&id("cart"), &id("payments")]);
        let client = ca.store(TD, &[&id("frontend")]);
        let config = client.client_config(&id("frontend")).unwrap();
        for target in [id("cart"), id("payments")] {
            let (server_saw, client_saw) = handshake(
                server.server_config(),
                config.clone(),
                spiffe::sni_for(numeric_identity(&target)),
            )
            .await
            .unwrap();
            assert_eq!(server_saw.as_deref(), Some(id("frontend").as_str()));
            assert_eq!(client_saw.as_deref(), Some(target.as_str()));
        }
        // A name the node does not host is refused.
        let e = handshake(
            server.server_config(),
            config,
            spiffe::sni_for(numeric_identity(&id("ledger"))),
        )
        .await
        .unwrap_err();
        assert!(e.contains("server:"), "{e}");
    }

    /// Tunnel sources are workloads: a node's credential and the CA's
    /// serving certificate are valid certificates of the trust domain, but
    /// they would match "any identity" rules and count as mutual TLS for
    /// STRICT. Only workload SVIDs may open a tunnel.
    #[tokio::test]
    async fn only_workload_svids_are_accepted_as_tunnel_sources() {
        let ca = TestCa::root(TD);
        let server = ca.store(TD, &[&id("cart")]);
        let not_workloads = [spiffe::node_id(TD, "node-a"), spiffe::ca_id(TD)];
        for source in &not_workloads {
            let client = ca.store(TD, &[source.as_str()]);
            let e = handshake(
                server.server_config(),
                client.client_config(source).unwrap(),
                spiffe::sni_for(numeric_identity(&id("cart"))),
            )
            .await
            .unwrap_err();
            assert!(
                e.contains(&format!(
                    "client identity {source} is not a workload identity"
                )),
                "{e}"
            );
        }
        let client = ca.store(TD, &[&id("frontend")]);
        handshake(
            server.server_config(),
            client.client_config(&id("frontend")).unwrap(),
            spiffe::sni_for(numeric_identity(&id("cart"))),
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn renewal_reaches_new_connections_only_through_a_new_config() {
        let ca = TestCa::root(TD);
        let server = ca.store(TD, &[&id("cart")]);
        let client = ca.store(TD, &[&id("frontend")]);
        let first = client.client_config(&id("frontend")).unwrap();
        assert!(Arc::ptr_eq(
            &first,
            &client.client_config(&id("frontend")).unwrap()
        ));
        let old_serial = client.get(&id("frontend")).unwrap().serial.clone();
        client.insert(ca.svid(&id("frontend")));
        let second = client.client_config(&id("frontend")).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        let new_serial = client.get(&id("frontend")).unwrap().serial.clone();
        assert_ne!(old_serial, new_serial);
        let sni = spiffe::sni_for(numeric_identity(&id("cart")));
        handshake(server.server_config(), second, sni)
            .await
            .unwrap();
        assert!(client.remove(&id("frontend")).is_some());
        assert!(client.client_config(&id("frontend")).is_none());
    }
}
