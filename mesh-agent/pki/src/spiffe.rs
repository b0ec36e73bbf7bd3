//! SPIFFE IDs as the mesh uses them, and the TLS server names that carry
//! the identity a client expects.
//!
//! - workloads: `spiffe://<td>/ns/<namespace>/sa/<service-account>`
//! - nodes: `spiffe://<td>/mesh/node/<node-name>`
//! - the CA's gRPC service: `spiffe://<td>/mesh/ca`
//!
//! Node and CA IDs live under `/mesh/`, which no workload ID can start
//! with, so a node certificate can never pass for a workload's.

use rustls::pki_types::ServerName;

/// Server name (SNI) a client uses for the CA's gRPC service; its
/// certificate must carry [`ca_id`].
pub const CA_SERVER_NAME: &str = "ca.mesh.internal";
const SNI_PREFIX: &str = "id-";
const SNI_SUFFIX: &str = ".mesh.internal";
const SCHEME: &str = "spiffe://";

/// `spiffe://<td>/mesh/node/<node>`.
pub fn node_id(trust_domain: &str, node: &str) -> String {
    format!("{SCHEME}{trust_domain}/mesh/node/{node}")
}

/// `spiffe://<td>/mesh/ca`.
pub fn ca_id(trust_domain: &str) -> String {
    format!("{SCHEME}{trust_domain}/mesh/ca")
}

/// `spiffe://<td>`: the trust domain's own ID, carried by the CA
/// certificates so that a CA directory says which trust domain it serves.
pub fn trust_domain_id(trust_domain: &str) -> String {
    format!("{SCHEME}{trust_domain}")
}

/// Splits a SPIFFE ID into its trust domain and path (`/…`, empty for a
/// trust domain's own ID). `None` when it is not a SPIFFE ID: the SPIFFE
/// rules (lowercase trust domain; path segments of letters, digits, `-`,
/// `.`, `_`, no empty, `.` or `..` segment; no query or fragment).
pub fn parse(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix(SCHEME)?;
    let (trust_domain, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    if !is_trust_domain(trust_domain) {
        return None;
    }
    if !path.is_empty() {
        for segment in path[1..].split('/') {
            let ok = !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            if !ok {
                return None;
            }
        }
    }
    Some((trust_domain, path))
}

/// The trust domain of a SPIFFE ID.
pub fn trust_domain_of(id: &str) -> Option<&str> {
    parse(id).map(|(td, _)| td)
}

/// Whether `id` is a SPIFFE ID with a path in `trust_domain`.
pub fn in_trust_domain(id: &str, trust_domain: &str) -> bool {
    matches!(parse(id), Some((td, path)) if td == trust_domain && !path.is_empty())
}

/// Whether `id` is a workload ID of `trust_domain`
/// (`spiffe://<td>/ns/<namespace>/sa/<service-account>`).
pub fn is_workload_id(id: &str, trust_domain: &str) -> bool {
    let Some((td, path)) = parse(id) else {
        return false;
    };
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    td == trust_domain
        && segments.len() == 4
        && segments[0] == "ns"
        && is_dns_label(segments[1])
        && segments[2] == "sa"
        && is_dns_label(segments[3])
}

/// The namespace and service account of a workload ID
/// (`spiffe://<td>/ns/<namespace>/sa/<service-account>`), of any trust
/// domain.
pub fn workload_of(id: &str) -> Option<(&str, &str)> {
    let (_, path) = parse(id)?;
    let (namespace, service_account) = path.strip_prefix("/ns/")?.split_once("/sa/")?;
    (is_dns_label(namespace) && is_dns_label(service_account))
        .then_some((namespace, service_account))
}

/// The node name of a node ID of `trust_domain`.
pub fn node_name<'a>(id: &'a str, trust_domain: &str) -> Option<&'a str> {
    let (td, path) = parse(id)?;
    let name = path.strip_prefix("/mesh/node/")?;
    (td == trust_domain && is_node_name(name)).then_some(name)
}

/// The server name a client sends to reach `identity`:
/// `id-<16 lowercase hex digits>.mesh.internal`. The server picks the
/// certificate of that identity, and the client's verifier checks that the
/// certificate's SPIFFE ID hashes to that number.
pub fn sni_for(identity: u64) -> ServerName<'static> {
    ServerName::try_from(format!("{SNI_PREFIX}{identity:016x}{SNI_SUFFIX}"))
        .expect("id-<hex>.mesh.internal is a DNS name")
}

/// The inverse of [`sni_for`]; `None` for any other name.
pub fn identity_from_sni(name: &str) -> Option<u64> {
    let hex = name.strip_prefix(SNI_PREFIX)?.strip_suffix(SNI_SUFFIX)?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// A SPIFFE trust domain name: lowercase letters, digits, `.`, `-`, `_`.
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// A node name as Kubernetes allows it: a DNS-1123 subdomain.
pub fn is_node_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spiffe_ids() {
        assert_eq!(
            parse("spiffe://cluster.local/ns/shop/sa/cart"),
            Some(("cluster.local", "/ns/shop/sa/cart"))
        );
        assert_eq!(parse("spiffe://td"), Some(("td", "")));
        for bad in [
            "",
            "spiffe://",
            "spiffe://TD/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a/sa/b?x",
            "spiffe://td/",
            "http://td/ns/a/sa/b",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_workload_id_names_its_namespace_and_service_account() {
        assert_eq!(
            workload_of("spiffe://other.td/ns/shop/sa/cart"),
            Some(("shop", "cart"))
        );
        for not in [
            "spiffe://td/ns/shop",
            "spiffe://td/ns/shop/sa/cart/x",
            "spiffe://td/mesh/node/n1",
            "spiffe://td/ns/Shop/sa/cart",
            "world",
        ] {
            assert_eq!(workload_of(not), None, "{not}");
        }
    }

    #[test]
    fn workload_and_node_ids() {
        let td = "cluster.local";
        assert!(is_workload_id("spiffe://cluster.local/ns/shop/sa/cart", td));
        assert!(!is_workload_id("spiffe://other/ns/shop/sa/cart", td));
        assert!(!is_workload_id(&node_id(td, "node-a"), td));
        assert!(!is_workload_id(
            "spiffe://cluster.local/ns/shop/sa/cart/x",
            td
        ));
        assert_eq!(node_name(&node_id(td, "node-a"), td), Some("node-a"));
        assert_eq!(node_name(&node_id(td, "node-a"), "other"), None);
        assert_eq!(node_name(&ca_id(td), td), None);
        assert_eq!(node_name("spiffe://cluster.local/ns/a/sa/b", td), None);
        assert!(in_trust_domain(&ca_id(td), td));
        assert!(!in_trust_domain(&trust_domain_id(td), td));
    }

    #[test]
    fn sni_round_trip() {
        for n in [16u64, 0x0123_4567_89ab_cdef, u64::MAX] {
            let name = sni_for(n);
            let ServerName::DnsName(dns) = &name else {
                panic!("not a DNS name")
            };
            assert_eq!(identity_from_sni(dns.as_ref()), Some(n));
        }
        assert_eq!(sni_for(0xab).to_str(), "id-00000000000000ab.mesh.internal");
        for bad in [
            "id-00000000000000AB.mesh.internal",
            "id-ab.mesh.internal",
            "id-00000000000000abc.mesh.internal",
            "x-00000000000000ab.mesh.internal",
            "id-00000000000000ab.mesh.example",
            CA_SERVER_NAME,
        ] {
            assert_eq!(identity_from_sni(bad), None, "{bad}");
        }
    }
}
