//! Workload identities: SPIFFE IDs, the 64-bit numbers the kernel sees,
//! and identity patterns of `from` entries.

use mesh_common::policy::FIRST_WORKLOAD_IDENTITY;
use sha2::{Digest, Sha256};

/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The number the kernel knows an identity by: the first 8 bytes
/// (big-endian) of the SHA-256 of the SPIFFE ID, raised by
/// [`FIRST_WORKLOAD_IDENTITY`] if it falls among the reserved numbers.
pub fn numeric_identity(spiffe_id: &str) -> u64 {
    let n = hash64(spiffe_id.as_bytes());
    if n < FIRST_WORKLOAD_IDENTITY {
        n + FIRST_WORKLOAD_IDENTITY
    } else {
        n
    }
}

/// Two service accounts of namespace `tenant` whose SPIFFE IDs (trust
/// domain `cluster.local`) have the same [`numeric_identity`],
/// 81bb4b759f06ae42: what a tenant who names service accounts can find, and
/// what the tests use to perform that attack. Found with a
/// distinguished-point rho search over `a<16 hex digits>` names, about
/// 1.2e10 hashes (6 minutes on 2 cores).
pub const COLLIDING_SERVICE_ACCOUNTS: [&str; 2] = ["a52576057c1c155d1", "a8a5c8c3a9c28ee2d"];

/// First 8 bytes of the SHA-256 of `bytes`, big-endian.
pub(crate) fn hash64(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// First 4 bytes of the SHA-256 of `bytes`, big-endian.
pub(crate) fn hash32(bytes: &[u8]) -> u32 {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 4];
    first.copy_from_slice(&digest[..4]);
    u32::from_be_bytes(first)
}

/// Whether `s` is a DNS-1123 label: at most 63 lowercase alphanumerics or
/// `-`, starting and ending with an alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a DNS-1123 subdomain: at most 253 characters, DNS-1123
/// labels separated by dots.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Whether `s` could start a DNS-1123 label (what is left of a label once
/// the trailing `*` of a prefix pattern is removed).
fn is_dns_label_prefix(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-'))
}

/// Whether `s` is a SPIFFE trust domain name: lowercase letters, digits,
/// `.`, `-` and `_`.
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// An `identity:` entry of a rule's `from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityPattern {
    /// `*`: every mesh identity.
    Any,
    /// One SPIFFE ID.
    Exact(String),
    /// A SPIFFE ID prefix (the pattern without its trailing `*`).
    Prefix(String),
}

const SPIFFE_SCHEME: &str = "spiffe://";
const PATTERN_SHAPE: &str = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>";

impl IdentityPattern {
    /// Checks the syntax of a pattern. Whether its trust domain is the
    /// mesh's is checked by the compiler, which knows the trust domain.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern == "*" {
            return Ok(IdentityPattern::Any);
        }
        let Some(rest) = pattern.strip_prefix(SPIFFE_SCHEME) else {
            return Err(format!(
                "{pattern:?} is not a SPIFFE ID ({PATTERN_SHAPE}) or \"*\""
            ));
        };
        let (body, prefix) = match pattern.find('*') {
            None => (rest, false),
            Some(at) if at == pattern.len() - 1 => (&rest[..rest.len() - 1], true),
            Some(_) => {
                return Err(format!(
                    "{pattern:?}: `*` is only allowed as the last character"
                ));
            }
        };
        let Some((trust_domain, path)) = body.split_once('/') else {
            return Err(if prefix {
                format!("{pattern:?}: a pattern must name the trust domain in full")
            } else {
                format!("{pattern:?} is not a SPIFFE ID ({PATTERN_SHAPE})")
            });
        };
        if !is_trust_domain(trust_domain) {
            return Err(format!(
                "{pattern:?}: {trust_domain:?} is not a trust domain name"
            ));
        }
        let segments: Vec<&str> = path.split('/').collect();
        let shape_ok = if prefix {
            // Every segment but the last is complete; the last is the
            // beginning of what the shape expects there.
            segments.len() <= 4
                && segments.iter().enumerate().all(|(i, s)| {
                    let last = i == segments.len() - 1;
                    match (i, last) {
                        (0, false) => *s == "ns",
                        (2, false) => *s == "sa",
                        (1 | 3, false) => is_dns_label(s),
                        (0, true) => "ns".starts_with(s),
                        (2, true) => "sa".starts_with(s),
                        (_, true) => is_dns_label_prefix(s),
                        _ => false,
                    }
                })
        } else {
            segments.len() == 4
                && segments[0] == "ns"
                && is_dns_label(segments[1])
                && segments[2] == "sa"
                && is_dns_label(segments[3])
        };
        if !shape_ok {
            return Err(format!(
                "{pattern:?} is not a SPIFFE ID{} ({PATTERN_SHAPE})",
                if prefix { " prefix" } else { "" }
            ));
        }
        let text = format!("{SPIFFE_SCHEME}{body}");
        Ok(if prefix {
            IdentityPattern::Prefix(text)
        } else {
            IdentityPattern::Exact(text)
        })
    }

    /// The trust domain the pattern is about (`None` for `*`).
    pub fn trust_domain(&self) -> Option<&str> {
        match self {
            IdentityPattern::Any => None,
            IdentityPattern::Exact(s) | IdentityPattern::Prefix(s) => s
                .strip_prefix(SPIFFE_SCHEME)
                .and_then(|rest| rest.split_once('/'))
                .map(|(td, _)| td),
        }
    }

    /// Whether the pattern matches every identity of its trust domain
    /// (`*`, or a prefix such as `spiffe://<td>/*` or `spiffe://<td>/ns/*`).
    pub fn is_universal(&self) -> bool {
        match self {
            IdentityPattern::Any => true,
            IdentityPattern::Exact(_) => false,
            IdentityPattern::Prefix(p) => {
                let path = p
                    .strip_prefix(SPIFFE_SCHEME)
                    .and_then(|rest| rest.split_once('/'))
                    .map_or("", |(_, path)| path);
                "ns/".starts_with(path)
            }
        }
    }

    /// Whether the pattern matches a SPIFFE ID.
    pub fn matches(&self, spiffe_id: &str) -> bool {
        match self {
            IdentityPattern::Any => true,
            IdentityPattern::Exact(id) => id == spiffe_id,
            IdentityPattern::Prefix(p) => spiffe_id.starts_with(p.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_format() {
        assert_eq!(
            spiffe_id("cluster.local", "shop", "cart"),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
    }

    #[test]
    fn numeric_identity_is_deterministic_and_not_reserved() {
        let id = spiffe_id("cluster.local", "shop", "cart");
        assert_eq!(numeric_identity(&id), numeric_identity(&id));
        assert_ne!(
            numeric_identity(&id),
            numeric_identity(&spiffe_id("cluster.local", "shop", "frontend"))
        );
        for i in 0..2000 {
            let n = numeric_identity(&format!("spiffe://td/ns/n/sa/s{i}"));
            assert!(n >= FIRST_WORKLOAD_IDENTITY);
        }
        // Pinned: every node must compute the same number, forever.
        let digest = Sha256::digest(id.as_bytes());
        let expected = u64::from_be_bytes(digest[..8].try_into().unwrap());
        let expected = if expected < FIRST_WORKLOAD_IDENTITY {
            expected + FIRST_WORKLOAD_IDENTITY
        } else {
            expected
        };
        assert_eq!(numeric_identity(&id), expected);
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_label("shop"));
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label("Shop"));
        assert!(!is_dns_label("a.b"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_label(&"a".repeat(63)));
        assert!(is_dns_subdomain("cart-5d8f.v1"));
        assert!(!is_dns_subdomain("cart..v1"));
        assert!(!is_dns_subdomain(""));
    }

    #[test]
    fn identity_patterns() {
        use IdentityPattern::*;
        let p = |s| IdentityPattern::parse(s);
        assert_eq!(p("*"), Ok(Any));
        assert_eq!(
            p("spiffe://cluster.local/ns/shop/sa/cart"),
            Ok(Exact("spiffe://cluster.local/ns/shop/sa/cart".into()))
        );
        assert_eq!(
            p("spiffe://cluster.local/ns/ops/sa/*"),
            Ok(Prefix("spiffe://cluster.local/ns/ops/sa/".into()))
        );
        for ok in [
            "spiffe://cluster.local/*",
            "spiffe://cluster.local/n*",
            "spiffe://cluster.local/ns/*",
            "spiffe://cluster.local/ns/op*",
            "spiffe://cluster.local/ns/ops*",
            "spiffe://cluster.local/ns/ops/s*",
            "spiffe://cluster.local/ns/ops/sa/ca*",
        ] {
            assert!(p(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "**",
            "spiffe://*",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/*/sa/cart",
            "spiffe://cluster.local/ns/shop/sa/ca*t",
            "spiffe://cluster.local/ns/shop/sa/cart/x",
            "spiffe://cluster.local/ns/shop/sa/cart/*",
            "spiffe://cluster.local/ns/Shop/sa/cart",
            "spiffe://cluster.local/xs/shop/sa/cart",
            "spiffe://Cluster/ns/shop/sa/cart",
            "http://cluster.local/ns/shop/sa/cart",
            "shop/cart",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert!(p("*").unwrap().is_universal());
        assert!(p("spiffe://td/*").unwrap().is_universal());
        assert!(p("spiffe://td/ns/*").unwrap().is_universal());
        assert!(!p("spiffe://td/ns/a*").unwrap().is_universal());
        assert!(!p("spiffe://td/ns/a/sa/b").unwrap().is_universal());
        assert_eq!(p("spiffe://td/ns/a*").unwrap().trust_domain(), Some("td"));
        let ops = p("spiffe://td/ns/ops/sa/*").unwrap();
        assert!(ops.matches("spiffe://td/ns/ops/sa/x"));
        assert!(!ops.matches("spiffe://td/ns/ops2/sa/x"));
    }
}
