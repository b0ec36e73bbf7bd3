//! Steering to the node agent for mutual TLS between nodes.
//!
//! When mTLS is on (`Setting::TunnelPort`), an allowed TCP connect from a
//! local workload to a workload on another node is rewritten to the
//! agent's outbound listener on the workload's own loopback (the agent
//! opened it inside the workload's network namespace, so the listener that
//! accepts says which workload is calling). The original destination is
//! kept per socket in `REDIRECTS` (so `getpeername(2)` still answers it) and,
//! once the socket has a port, in `TUNNEL_ORIG` under the key the agent
//! sees after `accept(2)`.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::{SockAddrContext, SockOpsContext},
};
use mesh_common::{
    AF_INET6, AGENT_SOCKET_MARK, Counter, Setting, ipv4_mapped,
    policy::{Endpoint, OrigDst, TunnelKey, WORLD_IDENTITY},
    service::SockAddr,
};

use crate::{
    attempt::Attempt,
    maps::{REDIRECTS, TUNNEL_ORIG, count, identity_of_caller, lookup, setting},
    service::dialled_service,
    sock_addr::{self, Family, socket_cookie},
};

/// The agent's outbound listener port, or 0 when mTLS is off.
#[inline(always)]
pub(crate) fn tunnel_port() -> u16 {
    setting(Setting::TunnelPort) as u16
}

/// Whether the calling socket is one of the node agent's own: it carries
/// the agent's `SO_MARK` and lives outside every workload's network
/// namespace. The mark alone proves nothing: since Linux 5.17 any process
/// with CAP_NET_RAW, which pods get by default, can set it; the agent's
/// sockets never live in a workload's namespace (its in-pod listeners
/// accept, they never connect). The mark is read first, so unmarked
/// sockets pay no namespace lookup here.
#[inline(always)]
pub(crate) fn is_agent_socket(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel's context for this call; `sk` is checked for null
    // before its u32 field is read.
    let marked = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        !sk.is_null() && core::ptr::read_volatile(&raw const (*sk).mark) == AGENT_SOCKET_MARK
    };
    marked && identity_of_caller(ctx) == WORLD_IDENTITY
}

/// Records where the connection `a` was going before it is steered.
#[inline(always)]
pub(crate) fn remember_redirect(ctx: &SockAddrContext, a: &Attempt, dst: &Endpoint) {
    let orig = OrigDst {
        ip: a.dst_ip,
        port: a.dst_port,
        _pad: [0; 3],
        src_identity: a.src_identity,
        dst_identity: dst.identity,
    };
    // If this fails the connection still goes to the agent, which refuses
    // one it knows no destination for: failing closed, never open.
    let _ = REDIRECTS.insert(socket_cookie(ctx), orig, BPF_ANY as u64);
    count(Counter::TunnelRedirected, 1);
}

/// The agent's outbound listener inside the workload's namespace:
/// 127.0.0.1 for an IPv4 socket, ::1 for an IPv6 one.
#[inline(always)]
pub(crate) fn agent_listener(family: Family) -> [u32; 4] {
    match family {
        Family::V4 => ipv4_mapped(u32::from_ne_bytes([127, 0, 0, 1])),
        Family::V6 => [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
    }
}

/// sockops, `TCP_CONNECT_CB` (the SYN is about to leave; the socket has its
/// port): a steered socket's original destination becomes findable by the
/// agent under (netns, port) before it can accept the connection.
#[inline(always)]
pub(crate) fn publish_for_agent(ctx: &SockOpsContext) {
    // SAFETY: helpers that only read the context they are given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = lookup(&REDIRECTS, &cookie) else {
        return;
    };
    let key = TunnelKey {
        // SAFETY: as above.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: ctx.local_port() as u16,
        family: if ctx.family() == AF_INET6 { 6 } else { 4 },
        _pad: 0,
    };
    let _ = TUNNEL_ORIG.insert(key, orig, BPF_ANY as u64);
}

/// `getpeername(2)` answers what the application dialled: for a socket
/// steered to the agent, the original destination, and for one sent to a
/// Service's backend, the Service address.
#[inline(always)]
fn answer_peer(ctx: &SockAddrContext, family: Family) -> i32 {
    let mut peer = sock_addr::read(ctx, family);
    let mut rewritten = false;
    if let Some(orig) = lookup(&REDIRECTS, &socket_cookie(ctx)) {
        peer = SockAddr::new(orig.ip, orig.port);
        rewritten = true;
    }
    if let Some(service) = dialled_service(ctx, &peer) {
        peer = service;
        rewritten = true;
    }
    if rewritten {
        sock_addr::write(ctx, family, &peer);
    }
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    answer_peer(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    answer_peer(&ctx, Family::V6)
}
