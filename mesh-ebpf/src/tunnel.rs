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
    AF_INET6, AGENT_SOCKET_MARK, Counter, Setting,
    policy::{Endpoint, OrigDst, TunnelKey, WORLD_IDENTITY},
};

use crate::{
    attempt::Attempt,
    maps::{REDIRECTS, TUNNEL_ORIG, count, identity_of_caller, lookup, setting},
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

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the context it is given.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
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

/// Rewrites an IPv4 connect to the agent's listener on 127.0.0.1.
#[inline(always)]
pub(crate) fn steer_to_agent4(ctx: &SockAddrContext) {
    // SAFETY: the kernel's context for this call; connect4 may write the
    // destination address and port.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        (*ctx.sock_addr).user_port = u32::from(tunnel_port().to_be());
    }
}

/// Rewrites an IPv6 connect to the agent's listener on ::1.
#[inline(always)]
pub(crate) fn steer_to_agent6(ctx: &SockAddrContext) {
    // SAFETY: as above; one aligned u32 store per word, as the verifier wants.
    unsafe {
        let sa = ctx.sock_addr;
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], 0);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], 0);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], 0);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], u32::from_ne_bytes([0, 0, 0, 1]));
        (*sa).user_port = u32::from(tunnel_port().to_be());
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

/// `getpeername(2)` of a steered socket answers the original destination,
/// so the application never sees the agent.
#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = lookup(&REDIRECTS, &socket_cookie(&ctx)) {
        // SAFETY: getpeername4 may write the address it returns.
        unsafe {
            (*ctx.sock_addr).user_ip4 = orig.ip[3];
            (*ctx.sock_addr).user_port = u32::from(orig.port.to_be());
        }
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = lookup(&REDIRECTS, &socket_cookie(&ctx)) {
        // SAFETY: as in `steer_to_agent6`.
        unsafe {
            let sa = ctx.sock_addr;
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], orig.ip[0]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], orig.ip[1]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], orig.ip[2]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], orig.ip[3]);
            (*sa).user_port = u32::from(orig.port.to_be());
        }
    }
    1
}
