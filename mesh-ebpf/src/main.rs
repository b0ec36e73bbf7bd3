//! The mesh's kernel programs.
//!
//! - Policy (`enforce`): `mesh_connect4/6` and `mesh_sendmsg4/6` check every
//!   connection a local workload opens, at `connect(2)` (or per datagram of
//!   an unconnected UDP socket), and refuse denied ones with EPERM before a
//!   packet leaves; `mesh_ingress` checks what arrives from other nodes, once
//!   per flow thanks to `CONNTRACK`, which `mesh_egress` fills so that the
//!   replies of the node's own outbound flows pass.
//! - Same-node short-circuit (`short_circuit`): `mesh_sockops` tracks the
//!   established TCP sockets of allowed connections in `SOCK_HASH`;
//!   `mesh_msg_redirect` hands each message straight to the local peer.
//!
//! - mTLS between nodes (`tunnel`): allowed connections to workloads of other
//!   nodes are steered to the node agent; `mesh_getpeername4/6` keep the
//!   original destination visible to the application.
//!
//! Every decision is a handful of hash lookups (`mesh_common::policy::decide`);
//! the agent compiles policy into those entries. Programs never depend on
//! the agent being up: everything they read is pinned.
#![no_std]
#![no_main]

mod attempt;
mod enforce;
mod packet;
mod short_circuit;
mod tunnel;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use mesh_common::{
    Counter, DEFAULT_MAX_SOCKETS, MAX_COUNTERS, MAX_SETTINGS, SHORT_CIRCUIT_ON, Setting,
    SocketInfo, SocketKey,
    policy::{
        DEFAULT_MAX_CONNTRACK, DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_LOCAL_NETNS, DEFAULT_MAX_POLICY,
        DEFAULT_MAX_REDIRECTS, Endpoint, FLOWS_RING_BYTES, FlowKey, FlowState, IpKey, OrigDst,
        PolicyKey, TunnelKey, UdpPeerKey, Verdict,
    },
};

// Sizes here are defaults; the agent sets the real ones at load time.

#[map]
static SOCK_HASH: SockHash<SocketKey> = SockHash::pinned(DEFAULT_MAX_SOCKETS, 0);

#[map]
static SOCKETS: HashMap<SocketKey, SocketInfo> = HashMap::pinned(DEFAULT_MAX_SOCKETS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_COUNTERS, 0);

#[map]
static SETTINGS: Array<u32> = Array::pinned(MAX_SETTINGS, 0);

#[map]
static ENDPOINTS: HashMap<IpKey, Endpoint> = HashMap::pinned(DEFAULT_MAX_ENDPOINTS, 0);

#[map]
static LOCAL_NETNS: HashMap<u64, u64> = HashMap::pinned(DEFAULT_MAX_LOCAL_NETNS, 0);

#[map]
static POLICY: HashMap<PolicyKey, Verdict> = HashMap::pinned(DEFAULT_MAX_POLICY, 0);

#[map]
static CONNTRACK: LruHashMap<FlowKey, FlowState> = LruHashMap::pinned(DEFAULT_MAX_CONNTRACK, 0);

#[map]
static UDP_PEERS: LruHashMap<UdpPeerKey, u32> = LruHashMap::pinned(DEFAULT_MAX_CONNTRACK, 0);

#[map]
static REDIRECTS: LruHashMap<u64, OrigDst> = LruHashMap::pinned(DEFAULT_MAX_REDIRECTS, 0);

#[map]
static TUNNEL_ORIG: LruHashMap<TunnelKey, OrigDst> = LruHashMap::pinned(DEFAULT_MAX_REDIRECTS, 0);

#[map]
static FLOWS: RingBuf = RingBuf::pinned(FLOWS_RING_BYTES, 0);

#[inline(always)]
fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on a CPU
        // while they run, so nothing else writes it concurrently.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn setting(setting: Setting) -> u32 {
    SETTINGS.get(setting as u32).copied().unwrap_or(0)
}

#[inline(always)]
fn short_circuit_on() -> bool {
    setting(Setting::ShortCircuit) == SHORT_CIRCUIT_ON
}

#[inline(always)]
fn policy_generation() -> u32 {
    setting(Setting::PolicyGeneration)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
