//! Services: a virtual address (`VIP:port/proto`) the connect and sendmsg
//! hooks translate to one backend before policy is decided, so that the
//! verdict and the path (same node or mutual TLS) are the backend's.
//!
//! Each Service's backend set is a numbered *revision* of slots. The agent
//! writes a new set under the next revision, then switches the Service's
//! entry to it in one map update, then deletes the old slots: a connect
//! reads the entry once and so never sees a mix of two sets.

use crate::policy::{PROTO_TCP, PROTO_UDP};

/// Key of `SERVICES`: the address clients dial.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv6 or IPv4-mapped, network byte order.
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    pub const fn new(ip: [u32; 4], port: u16, proto: u8) -> Self {
        Self {
            ip,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceEntry {
    /// The revision whose slots are live.
    pub revision: u16,
    /// Number of slots in the live revision; 0: no usable backend, and a
    /// connect fails with ECONNREFUSED.
    pub slots: u16,
    /// ClientIP session affinity: seconds a client keeps its backend; 0:
    /// none.
    pub affinity_timeout_s: u32,
}

/// Key of `SERVICE_BACKENDS`: one slot of one revision of a Service.
/// Backends appear in as many slots as their weight asks for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service: ServiceKey,
    pub revision: u16,
    pub slot: u16,
}

/// An address and port: a backend (value of `SERVICE_BACKENDS`), or the
/// Service address a socket dialled (value of `SERVICE_PEERS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockAddr {
    /// IPv6 or IPv4-mapped, network byte order.
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u16; 3],
}

impl SockAddr {
    pub const fn new(ip: [u32; 4], port: u16) -> Self {
        Self {
            ip,
            port,
            _pad: [0; 3],
        }
    }
}

/// Key of `SERVICE_PEERS`: a socket (by cookie) and the backend it was
/// sent to. `getpeername(2)` and the source of the backend's UDP replies
/// answer the Service address recorded under it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServicePeerKey {
    pub cookie: u64,
    pub backend: SockAddr,
}

/// Key of `SERVICE_AFFINITY`: one client (by network namespace, the
/// mesh's "client IP": a pod's every address lives in it) of one Service
/// with `sessionAffinity: ClientIP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service: ServiceKey,
    pub _pad: u32,
    pub netns: u64,
}

/// Value of `SERVICE_AFFINITY`: the client's backend and when it last
/// opened a connection to it (CLOCK_MONOTONIC ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Affinity {
    pub backend: SockAddr,
    pub last_used_ns: u64,
}

/// Key of `SERVICE_MEMBERS`: a backend of a Service with session affinity,
/// whichever slots it holds. A client's remembered backend is used only
/// while it is still a member: affinity moves when the backend goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub service: ServiceKey,
    pub _pad: u32,
    pub backend: SockAddr,
}

/// Whether `proto` can be a Service's: what Kubernetes' kube-proxy
/// translates too (SCTP is refused by the documents).
pub const fn service_protocol(proto: u8) -> bool {
    proto == PROTO_TCP || proto == PROTO_UDP
}

/// The slot a random number picks among `slots` (> 0).
#[inline(always)]
pub const fn pick_slot(random: u32, slots: u16) -> u16 {
    (random % slots as u32) as u16
}

/// Most slots one Service's backend set may have: weights are apportioned
/// to [`WEIGHTED_SLOTS`], and an unweighted set has one slot per backend.
pub const MAX_SLOTS: u16 = 4_096;
/// Slots over which weighted backends are apportioned: 0.1% resolution.
pub const WEIGHTED_SLOTS: u16 = 1_000;

/// Capacity of `SERVICE_AFFINITY`: clients holding a backend (LRU).
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// Capacity of `SERVICE_RANGES`: the Service ranges of a cluster (one or
/// two per family in practice).
pub const MAX_SERVICE_RANGES: u32 = 16;

/// Default capacities (`mesh-agent run` flags).
pub const DEFAULT_MAX_SERVICES: u32 = 16_384;
pub const DEFAULT_MAX_SERVICE_BACKENDS: u32 = 65_536;
/// Capacity of `SERVICE_PEERS`: sockets that dialled a Service (LRU).
pub const DEFAULT_MAX_SERVICE_PEERS: u32 = 65_536;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_are_pinned() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(offset_of!(ServiceKey, port), 16);
        assert_eq!(offset_of!(ServiceKey, proto), 18);
        assert_eq!(size_of::<ServiceEntry>(), 8);
        assert_eq!(offset_of!(ServiceEntry, affinity_timeout_s), 4);
        assert_eq!(size_of::<BackendKey>(), 24);
        assert_eq!(offset_of!(BackendKey, revision), 20);
        assert_eq!(offset_of!(BackendKey, slot), 22);
        assert_eq!(size_of::<SockAddr>(), 24);
        assert_eq!(offset_of!(SockAddr, port), 16);
        assert_eq!(size_of::<ServicePeerKey>(), 32);
        assert_eq!(offset_of!(ServicePeerKey, backend), 8);
        assert_eq!(size_of::<AffinityKey>(), 32);
        assert_eq!(offset_of!(AffinityKey, netns), 24);
        assert_eq!(size_of::<Affinity>(), 32);
        assert_eq!(offset_of!(Affinity, last_used_ns), 24);
        assert_eq!(size_of::<MemberKey>(), 48);
        assert_eq!(offset_of!(MemberKey, backend), 24);
    }

    #[test]
    fn slots_are_picked_within_the_set() {
        assert_eq!(pick_slot(0, 3), 0);
        assert_eq!(pick_slot(u32::MAX, 3), (u32::MAX % 3) as u16);
        assert_eq!(pick_slot(7, 1), 0);
        assert!(service_protocol(PROTO_TCP) && service_protocol(PROTO_UDP));
        assert!(!service_protocol(132));
    }
}
