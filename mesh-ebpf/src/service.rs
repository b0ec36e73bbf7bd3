//! Services in the kernel: a connect or sendmsg to a Service address
//! (`SERVICES`) goes to one of its backends, chosen here, before policy and
//! steering see it; so the verdict and the path (same node, or mutual TLS)
//! are the backend's, and kube-proxy never sees the Service address. The
//! socket remembers what it dialled (`SERVICE_PEERS`), which getpeername
//! and the source of UDP replies answer, as the application expects.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use mesh_common::{
    Counter,
    service::{
        Affinity, AffinityKey, BackendKey, MemberKey, ServiceEntry, ServiceKey, ServicePeerKey,
        SockAddr, pick_slot,
    },
};

use crate::maps::{
    SERVICE_AFFINITY, SERVICE_BACKENDS, SERVICE_MEMBERS, SERVICE_PEERS, SERVICE_RANGES, SERVICES,
    count, lookup,
};
use crate::sock_addr::socket_cookie;

/// What a destination is, for the Service tables.
pub(crate) enum Destination {
    /// Not a Service address: it stays as dialled.
    Direct,
    /// A Service address; this backend was chosen.
    Backend(SockAddr),
    /// A Service address with no usable backend, or an address of the
    /// Service range that is no Service the mesh knows yet: refused with
    /// ECONNREFUSED, as kube-proxy's REJECT rule does.
    NoBackend,
}

/// Whether `ip` lies in the cluster's Service range (`--service-cidr`).
/// Such an address that is no known Service may be one kube-proxy already
/// translates (a Service created a moment ago, a lagging watch): let
/// through, it would reach its backend unjudged, or in plaintext across
/// nodes. Refused instead, until the mesh knows it.
#[inline(always)]
fn in_service_range(ip: &[u32; 4]) -> bool {
    SERVICE_RANGES.get(Key::new(128, *ip)).is_some()
}

/// Looks `dst` up among the Services and picks a backend: the client's
/// own under session affinity, else random over the slots of the live
/// revision (weights are slots).
#[inline(always)]
pub(crate) fn resolve(ctx: &SockAddrContext, dst: &SockAddr, proto: u8) -> Destination {
    let service = ServiceKey::new(dst.ip, dst.port, proto);
    // SAFETY: the helper takes no arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    // The agent switches a Service to a new revision and then deletes the
    // old one's slots: a connect that read the old entry just before may
    // find its slot gone, and reads the entry once more.
    for _ in 0..2 {
        let Some(entry) = lookup(&SERVICES, &service) else {
            if in_service_range(&dst.ip) {
                count(Counter::ServiceUnknown, 1);
                return Destination::NoBackend;
            }
            return Destination::Direct;
        };
        if entry.slots == 0 {
            count(Counter::ServiceNoBackend, 1);
            return Destination::NoBackend;
        }
        if entry.affinity_timeout_s != 0
            && let Some(backend) = affine_backend(ctx, &service, &entry)
        {
            count(Counter::ServiceTranslated, 1);
            return Destination::Backend(backend);
        }
        let slot = BackendKey {
            service,
            revision: entry.revision,
            slot: pick_slot(random, entry.slots),
        };
        if let Some(backend) = lookup(&SERVICE_BACKENDS, &slot) {
            if entry.affinity_timeout_s != 0 {
                remember_affinity(ctx, &service, &backend);
            }
            count(Counter::ServiceTranslated, 1);
            return Destination::Backend(backend);
        }
    }
    count(Counter::ServiceNoBackend, 1);
    Destination::NoBackend
}

#[inline(always)]
fn affinity_key(ctx: &SockAddrContext, service: &ServiceKey) -> AffinityKey {
    AffinityKey {
        service: *service,
        _pad: 0,
        // SAFETY: the helper only reads the context it is given.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: reads the clock.
    unsafe { bpf_ktime_get_ns() }
}

/// The backend this client used last, if that was within the Service's
/// affinity timeout and the backend is still one of the Service's.
#[inline(always)]
fn affine_backend(
    ctx: &SockAddrContext,
    service: &ServiceKey,
    entry: &ServiceEntry,
) -> Option<SockAddr> {
    let key = affinity_key(ctx, service);
    let held = lookup(&SERVICE_AFFINITY, &key)?;
    let now = now_ns();
    let timeout_ns = u64::from(entry.affinity_timeout_s) * 1_000_000_000;
    if now.saturating_sub(held.last_used_ns) > timeout_ns {
        return None;
    }
    let member = MemberKey {
        service: *service,
        _pad: 0,
        backend: held.backend,
    };
    lookup(&SERVICE_MEMBERS, &member)?;
    remember_affinity(ctx, service, &held.backend);
    Some(held.backend)
}

#[inline(always)]
fn remember_affinity(ctx: &SockAddrContext, service: &ServiceKey, backend: &SockAddr) {
    let held = Affinity {
        backend: *backend,
        last_used_ns: now_ns(),
    };
    // If this fails, the next connect picks afresh: affinity is lost, no
    // connection is.
    let _ = SERVICE_AFFINITY.insert(affinity_key(ctx, service), held, BPF_ANY as u64);
}

/// Records that the calling socket dialled `service` and was sent to
/// `backend`.
#[inline(always)]
pub(crate) fn remember_service_peer(ctx: &SockAddrContext, backend: &SockAddr, service: &SockAddr) {
    let key = ServicePeerKey {
        cookie: socket_cookie(ctx),
        backend: *backend,
    };
    // If this fails, getpeername answers the backend: the connection
    // itself is unaffected.
    let _ = SERVICE_PEERS.insert(key, service, BPF_ANY as u64);
}

/// The Service address the calling socket dialled to reach `peer`, if it
/// reached `peer` through one.
#[inline(always)]
pub(crate) fn dialled_service(ctx: &SockAddrContext, peer: &SockAddr) -> Option<SockAddr> {
    let key = ServicePeerKey {
        cookie: socket_cookie(ctx),
        backend: *peer,
    };
    lookup(&SERVICE_PEERS, &key)
}
