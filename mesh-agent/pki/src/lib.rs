//! The mesh's certificates: the CA, workload SVIDs and the rustls
//! configurations that verify SPIFFE identities.
//!
//! ```text
//! ca (directory: ca.pem, ca-key.pem, chain.pem, bundle.pem)
//!   ├─ service: gRPC Sign over mutual TLS, nodes authenticate with node certs
//!   └─ issuer::LocalIssuer (standalone: the CA inside the agent, same rule)
//! issuer::Issuer ──► rotation::CertManager ──► store::SvidStore ──► rustls configs
//!                                         └──► <state-dir>/certs.json ──► inspect
//! ```
//!
//! Every rustls configuration is built with the ring provider explicitly
//! ([`provider`]) and TLS 1.3 only; nothing relies on a process default.
//! Every key is ECDSA P-256. A CA rotation cross-signs the new root with
//! the old one, so nodes that have not yet received the merged bundle keep
//! accepting the new certificates (see [`ca::Ca::rotate`]).
//!
//! Used by the agent (workload certificates) and by `mesh-agent ca serve`
//! (the CA service); knows nothing of the kernel.
#![forbid(unsafe_code)]

pub mod authz;
pub mod ca;
pub mod cert;
pub mod files;
pub mod issuer;
pub mod rotation;
pub mod service;
pub mod spiffe;
pub mod store;
pub mod verify;

/// Test CAs, handshakes and temporary directories, for this crate's tests
/// and the agent's (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use {
    authz::{AppliedAuthorizer, Authorizer, ConfigDirAuthorizer},
    ca::{Ca, CaError, CaHandle},
    issuer::{IssueError, Issuer, LocalIssuer},
    rotation::{Backoff, CertManager, CertManagerConfig},
    service::{CaClient, CaServer, NodeCredentials},
    spiffe::{identity_from_sni, sni_for},
    store::{Svid, SvidStore},
    verify::{TrustBundle, peer_identity, require_peer},
};

/// The crypto provider of every TLS configuration and signature check of
/// the mesh: ring, chosen explicitly so that no other crate's choice of a
/// process-wide default can change what the mesh uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Fills `buf` from the provider's secure random source.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    provider()
        .secure_random
        .fill(buf)
        .expect("the system's random source works");
}
