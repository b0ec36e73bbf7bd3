//! The programs' maps, all pinned (the agent adopts them across restarts
//! and sets their real sizes at load time; the sizes here are defaults),
//! and the reads every program shares: one hash-map lookup ([`lookup`]),
//! the endpoint owning an address, policy entries, settings and counters.

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_netns_cookie,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use mesh_common::{
    Counter, DEFAULT_MAX_SOCKETS, Inbox, MAX_COUNTERS, MAX_SETTINGS, Setting, ShortCircuit,
    SocketInfo, SocketKey,
    policy::{
        DEFAULT_MAX_CONNTRACK, DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_LOCAL_NETNS, DEFAULT_MAX_POLICY,
        DEFAULT_MAX_REDIRECTS, Endpoint, FLOWS_RING_BYTES, FlowBudget, FlowKey, FlowSourceKey,
        FlowState, IpKey, MAX_FLOW_SOURCES, OrigDst, PolicyKey, TunnelKey, UdpPeerKey, Verdict,
        WORLD_IDENTITY,
    },
    service::{
        Affinity, AffinityKey, BackendKey, DEFAULT_MAX_AFFINITY, DEFAULT_MAX_SERVICE_BACKENDS,
        DEFAULT_MAX_SERVICE_PEERS, DEFAULT_MAX_SERVICES, MAX_SERVICE_RANGES, MemberKey,
        ServiceEntry, ServiceKey, ServicePeerKey, SockAddr,
    },
};

#[map]
pub(crate) static SOCK_HASH: SockHash<SocketKey> = SockHash::pinned(DEFAULT_MAX_SOCKETS, 0);

#[map]
pub(crate) static SOCKETS: HashMap<SocketKey, SocketInfo> = HashMap::pinned(DEFAULT_MAX_SOCKETS, 0);

/// The sockets in `SOCK_HASH`, by cookie: what each was sent through the
/// short-circuit and has read of it (`inbox`), and whose splice(2) the
/// guard refuses (`splice_guard`).
#[map]
pub(crate) static SOCKET_INBOX: HashMap<u64, Inbox> = HashMap::pinned(DEFAULT_MAX_SOCKETS, 0);

#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_COUNTERS, 0);

#[map]
pub(crate) static SETTINGS: Array<u32> = Array::pinned(MAX_SETTINGS, 0);

#[map]
pub(crate) static ENDPOINTS: HashMap<IpKey, Endpoint> = HashMap::pinned(DEFAULT_MAX_ENDPOINTS, 0);

#[map]
pub(crate) static LOCAL_NETNS: HashMap<u64, u64> = HashMap::pinned(DEFAULT_MAX_LOCAL_NETNS, 0);

#[map]
pub(crate) static WORKLOAD_INTERFACES: HashMap<u32, u64> =
    HashMap::pinned(DEFAULT_MAX_LOCAL_NETNS, 0);

#[map]
pub(crate) static POLICY: HashMap<PolicyKey, Verdict> = HashMap::pinned(DEFAULT_MAX_POLICY, 0);

#[map]
pub(crate) static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::pinned(DEFAULT_MAX_CONNTRACK, 0);

#[map]
pub(crate) static OUTBOUND_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::pinned(DEFAULT_MAX_CONNTRACK, 0);

#[map]
pub(crate) static UDP_PEERS: LruHashMap<UdpPeerKey, u32> =
    LruHashMap::pinned(DEFAULT_MAX_CONNTRACK, 0);

#[map]
pub(crate) static REDIRECTS: LruHashMap<u64, OrigDst> =
    LruHashMap::pinned(DEFAULT_MAX_REDIRECTS, 0);

#[map]
pub(crate) static TUNNEL_ORIG: LruHashMap<TunnelKey, OrigDst> =
    LruHashMap::pinned(DEFAULT_MAX_REDIRECTS, 0);

#[map]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceEntry> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, 0);

#[map]
pub(crate) static SERVICE_BACKENDS: HashMap<BackendKey, SockAddr> =
    HashMap::pinned(DEFAULT_MAX_SERVICE_BACKENDS, 0);

#[map]
pub(crate) static SERVICE_PEERS: LruHashMap<ServicePeerKey, SockAddr> =
    LruHashMap::pinned(DEFAULT_MAX_SERVICE_PEERS, 0);

#[map]
pub(crate) static SERVICE_AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::pinned(DEFAULT_MAX_AFFINITY, 0);

#[map]
pub(crate) static SERVICE_MEMBERS: HashMap<MemberKey, u32> =
    HashMap::pinned(DEFAULT_MAX_SERVICE_BACKENDS, 0);

#[map]
pub(crate) static SERVICE_RANGES: LpmTrie<[u32; 4], u32> = LpmTrie::pinned(MAX_SERVICE_RANGES, 0);

#[map]
pub(crate) static FLOWS: RingBuf = RingBuf::pinned(FLOWS_RING_BYTES, 0);

#[map]
pub(crate) static FLOW_SOURCES: LruHashMap<FlowSourceKey, FlowBudget> =
    LruHashMap::pinned(MAX_FLOW_SOURCES, 0);

/// The hash maps [`lookup`] reads: aya's `HashMap` and `LruHashMap`, whose
/// `get_ptr` answers a pointer to the value the kernel's lookup found.
/// Sealed: no other type can hand `lookup` a pointer.
pub(crate) trait HashLookup<K, V>: sealed::Sealed {
    fn value_ptr(&self, key: &K) -> Option<*const V>;
}

mod sealed {
    pub trait Sealed {}
}

impl<K, V> sealed::Sealed for HashMap<K, V> {}
impl<K, V> sealed::Sealed for LruHashMap<K, V> {}

impl<K, V> HashLookup<K, V> for HashMap<K, V> {
    #[inline(always)]
    fn value_ptr(&self, key: &K) -> Option<*const V> {
        self.get_ptr(key)
    }
}

impl<K, V> HashLookup<K, V> for LruHashMap<K, V> {
    #[inline(always)]
    fn value_ptr(&self, key: &K) -> Option<*const V> {
        self.get_ptr(key)
    }
}

/// The value under `key`, copied out of the map. Every hash-map read of
/// the programs goes through here (the redirect program's in-place update
/// of `SOCKETS` is the one exception, and says why it is sound). `V` is one
/// of mesh-common's map values: plain integers and arrays of them.
#[inline(always)]
pub(crate) fn lookup<K, V: Copy>(map: &impl HashLookup<K, V>, key: &K) -> Option<V> {
    let value = map.value_ptr(key)?;
    // SAFETY: `value` is what `bpf_map_lookup_elem` returned for this key:
    // non-null, aligned, and its memory stays valid while the program runs
    // (freed elements wait for an RCU grace period; preallocated ones are
    // only ever reused as elements of the same map). An update racing with
    // the copy can tear it, but every bit pattern is a valid `V` of plain
    // integers, and the copy is made at once, so no reference outlives it.
    Some(unsafe { value.read() })
}

/// The workload (or nothing) that owns `ip`.
#[inline(always)]
pub(crate) fn endpoint(ip: &[u32; 4]) -> Option<Endpoint> {
    lookup(&ENDPOINTS, &IpKey { ip: *ip })
}

/// The identity of whoever owns `ip`: its workload's, or `world`.
#[inline(always)]
pub(crate) fn identity_of_address(ip: &[u32; 4]) -> u64 {
    match endpoint(ip) {
        Some(e) => e.identity,
        None => WORLD_IDENTITY,
    }
}

/// One compiled policy entry: the `lookup` of `policy::decide`.
#[inline(always)]
pub(crate) fn policy_entry(key: &PolicyKey) -> Option<Verdict> {
    lookup(&POLICY, key)
}

#[inline(always)]
pub(crate) fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on a CPU
        // while they run, so nothing else writes it concurrently.
        unsafe { *slot += n };
    }
}

#[inline(always)]
pub(crate) fn setting(setting: Setting) -> u32 {
    SETTINGS.get(setting as u32).copied().unwrap_or(0)
}

#[inline(always)]
pub(crate) fn short_circuit() -> ShortCircuit {
    ShortCircuit::from_setting(setting(Setting::ShortCircuit))
}

#[inline(always)]
pub(crate) fn policy_generation() -> u32 {
    setting(Setting::PolicyGeneration)
}

/// The identity of the local workload whose network namespace the calling
/// socket lives in; `world` for anything else in the mesh's cgroup.
#[inline(always)]
pub(crate) fn identity_of_caller(ctx: &impl EbpfContext) -> u64 {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    lookup(&LOCAL_NETNS, &cookie).unwrap_or(WORLD_IDENTITY)
}
