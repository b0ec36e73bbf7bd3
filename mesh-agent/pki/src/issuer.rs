//! Where a node's SVIDs come from: the CA's gRPC service ([`CaClient`]) or
//! the CA inside the agent in standalone mode ([`LocalIssuer`]). Both go
//! through the same steps: a fresh key and a CSR made on the node (the
//! private key never leaves it), the same authorisation rule
//! ([`sign_for_node`]), and the same checks of what comes back.
//!
//! [`CaClient`]: super::service::CaClient

use std::{future::Future, pin::Pin, sync::Arc, time::Duration, time::SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use super::{
    authz::{Authorizer, authorize},
    ca::{Ca, CaError, CaHandle},
    store::Svid,
    verify::{Usage, verify_chain},
};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// The CA will not issue this (not authorised, bad request): retrying
    /// the same request does not help until the configuration changes.
    #[error("refused: {0}")]
    Refused(String),
    /// The CA could not be reached or failed; worth retrying.
    #[error("CA unavailable: {0}")]
    Unavailable(String),
    /// The CA answered with something the node must not use.
    #[error("the CA's answer is unusable: {0}")]
    BadResponse(String),
}

/// A source of SVIDs for the certificate manager. Object-safe (boxed
/// futures), so the agent can hold either kind as `Arc<dyn Issuer>`.
pub trait Issuer: Send + Sync {
    /// A new SVID for `spiffe_id`, with a fresh key. The CA may shorten
    /// `lifetime` (to its maximum, or to its own end).
    fn issue<'a>(
        &'a self,
        spiffe_id: &'a str,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Svid, IssueError>>;

    /// The roots to trust, as of the last answer of the CA.
    fn trust_bundle(&self) -> Vec<CertificateDer<'static>>;
}

/// The lifetime the CA grants: the request's, at most `max`; a request of
/// zero means `max`. Longer requests are clamped rather than refused, so
/// agents configured with a longer lifetime keep working; the certificate's
/// `not_after` says what was granted.
pub fn granted_lifetime(requested: Duration, max: Duration) -> Duration {
    if requested.is_zero() || requested > max {
        max
    } else {
        requested
    }
}

/// No maximum but the CA's own end (which `Ca::sign` applies).
const UNLIMITED: Duration = Duration::from_secs(1000 * 365 * 86_400);

/// Why the CA did not sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not authorised: names node and identity.
    Denied(String),
    /// A malformed request (CSR, lifetime).
    Invalid(String),
    /// The CA cannot sign now (expired, …).
    Failed(String),
}

/// What the CA does with a node's request, wherever the CA runs: the
/// authorisation rule, the granted lifetime, then the signature.
pub fn sign_for_node(
    ca: &Ca,
    authorizer: &dyn Authorizer,
    node: &str,
    csr: &[u8],
    spiffe_id: &str,
    requested: Duration,
    max_lifetime: Duration,
) -> Result<Vec<CertificateDer<'static>>, Refusal> {
    authorize(authorizer, ca.trust_domain(), node, spiffe_id).map_err(Refusal::Denied)?;
    let lifetime = granted_lifetime(requested, max_lifetime);
    ca.sign(csr, spiffe_id, lifetime).map_err(|e| match e {
        CaError::Csr(_) | CaError::Lifetime | CaError::ForeignId(..) => {
            Refusal::Invalid(e.to_string())
        }
        other => Refusal::Failed(other.to_string()),
    })
}

/// A fresh P-256 key and a CSR for it. The CSR names nothing: the CA puts
/// in what it authorised.
pub fn new_key_and_csr() -> Result<(KeyPair, Vec<u8>), IssueError> {
    let local =
        |e: rcgen::Error| IssueError::Unavailable(format!("cannot make a key and CSR: {e}"));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(local)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(local)?;
    Ok((key, csr.der().to_vec()))
}

/// Checks what a CA returned before the node uses it: the chain verifies to
/// the returned bundle for both ends of mutual TLS, its SPIFFE ID is the
/// one asked for, and the key is the node's.
pub fn accept_issued(
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
    spiffe_id: &str,
    bundle: &[CertificateDer<'static>],
) -> Result<Svid, IssueError> {
    let bad = |what: String| IssueError::BadResponse(what);
    let now = SystemTime::now();
    for usage in [Usage::Server, Usage::Client] {
        let got = verify_chain(bundle, &chain, now, usage)
            .map_err(|e| bad(format!("the chain does not verify to the bundle: {e}")))?;
        if got != spiffe_id {
            return Err(bad(format!("asked for {spiffe_id}, got {got}")));
        }
    }
    Svid::new(chain, PrivatePkcs8KeyDer::from(key.serialize_der()).into())
        .map_err(|e| bad(e.to_string()))
}

/// Standalone mode: the CA runs inside the agent, under the same rule as
/// the CA service (the agent's node gets its own workloads' identities
/// only).
pub struct LocalIssuer {
    ca: CaHandle,
    node_name: String,
    authorizer: Arc<dyn Authorizer>,
    max_lifetime: Duration,
}

impl LocalIssuer {
    /// Grants the lifetimes asked for (the agent chooses them; only the
    /// CA's own end limits them); see [`LocalIssuer::with_max_lifetime`].
    pub fn new(
        ca: CaHandle,
        node_name: impl Into<String>,
        authorizer: Arc<dyn Authorizer>,
    ) -> LocalIssuer {
        LocalIssuer {
            ca,
            node_name: node_name.into(),
            authorizer,
            max_lifetime: UNLIMITED,
        }
    }

    /// Shortens longer requests to `max`, as the CA service does.
    #[cfg(test)]
    pub fn with_max_lifetime(mut self, max: Duration) -> LocalIssuer {
        self.max_lifetime = max;
        self
    }

    fn issue_now(&self, spiffe_id: &str, lifetime: Duration) -> Result<Svid, IssueError> {
        let ca = self.ca.current();
        let (key, csr) = new_key_and_csr()?;
        let chain = sign_for_node(
            &ca,
            &*self.authorizer,
            &self.node_name,
            &csr,
            spiffe_id,
            lifetime,
            self.max_lifetime,
        )
        .map_err(|refusal| match refusal {
            Refusal::Denied(m) | Refusal::Invalid(m) => IssueError::Refused(m),
            Refusal::Failed(m) => IssueError::Unavailable(m),
        })?;
        accept_issued(chain, key, spiffe_id, ca.bundle())
    }
}

impl Issuer for LocalIssuer {
    fn issue<'a>(
        &'a self,
        spiffe_id: &'a str,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Svid, IssueError>> {
        Box::pin(async move { self.issue_now(spiffe_id, lifetime) })
    }

    fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.ca.current().bundle().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ca::DEFAULT_CA_LIFETIME, testing::TempDir};

    const TD: &str = "cluster.local";

    #[test]
    fn lifetimes_are_clamped_to_the_maximum() {
        let hour = Duration::from_secs(3600);
        assert_eq!(granted_lifetime(Duration::ZERO, hour), hour);
        assert_eq!(granted_lifetime(2 * hour, hour), hour);
        assert_eq!(granted_lifetime(hour / 2, hour), hour / 2);
    }

    #[tokio::test]
    async fn local_issuer_applies_the_node_rule() {
        let dir = TempDir::new("local-issuer");
        let ca = Ca::init(TD, dir.path(), None, DEFAULT_CA_LIFETIME).unwrap();
        let cart = mesh_policy::spiffe_id(TD, "shop", "cart");
        let only_cart = {
            let cart = cart.clone();
            move |node: &str, id: &str| {
                if node == "node-a" && id == cart {
                    Ok(())
                } else {
                    Err("not hosted".to_owned())
                }
            }
        };
        let issuer = LocalIssuer::new(CaHandle::fixed(ca), "node-a", Arc::new(only_cart))
            .with_max_lifetime(Duration::from_secs(600));
        let svid = issuer
            .issue(&cart, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(svid.spiffe_id, cart);
        let granted = svid.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(granted <= Duration::from_secs(600), "{granted:?}");
        let other = mesh_policy::spiffe_id(TD, "shop", "ledger");
        let e = issuer
            .issue(&other, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            IssueError::Refused(format!(
                "node node-a may not get a certificate for {other}: not hosted"
            ))
        );
        assert_eq!(issuer.trust_bundle().len(), 1);
    }
}
