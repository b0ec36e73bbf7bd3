//! Identities from outside: identity patterns of a MeshPolicy's `from`,
//! SPIFFE IDs in peers' certificates, the server names of tunnel
//! handshakes. None may panic, and an ID that parses, with a path, is in
//! its own trust domain (a trust domain's own ID, without one, is in none).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_pki::spiffe;
use mesh_policy::IdentityPattern;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = IdentityPattern::parse(text);
    if let Some((td, path)) = spiffe::parse(text) {
        assert_eq!(spiffe::trust_domain_of(text), Some(td));
        assert_eq!(
            spiffe::in_trust_domain(text, td),
            !path.is_empty(),
            "{text}"
        );
    }
    let _ = spiffe::node_name(text, "cluster.local");
    let _ = spiffe::is_workload_id(text, "cluster.local");
    let _ = spiffe::identity_from_sni(text);
});
