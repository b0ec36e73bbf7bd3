//! What the CA and the tunnels take from peers: a node's certificate
//! signing request (the CA service signs it for an identity the node may
//! have), and a peer's certificate (a DER blob checked against the trust
//! bundle). Neither may panic; a CSR the CA signs yields a chain that
//! verifies.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh_pki::{ca::Ca, verify};
use rustls_pki_types::CertificateDer;

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mesh-fuzz-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Ca::init("cluster.local", &dir, None, Duration::from_secs(3600)).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let ca = ca();
    let id = "spiffe://cluster.local/ns/shop/sa/cart";
    if let Ok(chain) = ca.sign(data, id, Duration::from_secs(600)) {
        let verified = verify::verify_chain(
            ca.bundle(),
            &chain,
            std::time::SystemTime::now(),
            verify::Usage::Client,
        );
        assert_eq!(verified.as_deref().ok(), Some(id), "{verified:?}");
    }
    let peer = CertificateDer::from(data.to_vec());
    let _ = verify::verify_chain(
        ca.bundle(),
        &[peer],
        std::time::SystemTime::now(),
        verify::Usage::Server,
    );
});
