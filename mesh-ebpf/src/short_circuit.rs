//! Same-node short-circuit for allowed connections, between the workloads
//! the node's setting names (by default those that opted in).
//!
//! `mesh_sockops` tracks established TCP sockets in `SOCK_HASH` (and their
//! state in `SOCKETS`) when the connection is allowed; `mesh_msg_redirect`
//! runs on every `sendmsg` of a tracked socket and hands the payload
//! straight to the peer socket when it is local. After a policy change the
//! pair is checked again before its next redirect: a pair that policy now
//! denies goes back to the TCP/IP stack for good.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, sk_action::SK_PASS,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    AGENT_SOCKET_MARK, Counter, Inbox, RawTuple, SOCKET_ACTIVE, SOCKET_STACK_ONLY, Setting,
    ShortCircuit, SocketInfo, SocketKey,
    policy::{ENDPOINT_LOCAL, ENDPOINT_SHORT_CIRCUIT, PROTO_TCP, WORLD_IDENTITY, decide},
};

use crate::maps::{
    SOCK_HASH, SOCKET_INBOX, SOCKETS, count, endpoint, identity_of_address, identity_of_caller,
    lookup, policy_entry, policy_generation, setting, short_circuit,
};

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => track_established(&ctx, SOCKET_ACTIVE),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => track_established(&ctx, 0),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => untrack_closed(&ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => crate::tunnel::publish_for_agent(&ctx),
        _ => {}
    }
    // sock_ops programs return 1 for "handled"; the value is not a verdict.
    1
}

#[inline(always)]
fn sockops_key(ctx: &SockOpsContext) -> Option<SocketKey> {
    let raw = RawTuple {
        family: ctx.family(),
        local_ip4: ctx.local_ip4(),
        remote_ip4: ctx.remote_ip4(),
        local_ip6: ctx.local_ip6(),
        remote_ip6: ctx.remote_ip6(),
        local_port: ctx.local_port(),
        remote_port: ctx.remote_port(),
    };
    // SAFETY: the helper only reads the context it is given.
    SocketKey::from_raw(&raw, || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) })
}

/// Whether policy allows the connection `key` belongs to. `active`: `key`
/// is the client's end. Connections to non-workloads are not governed.
#[inline(always)]
fn connection_allowed(key: &SocketKey, active: bool) -> bool {
    let (client_ip, server_ip, server_port) = if active {
        (key.local_ip, key.remote_ip, key.remote_port)
    } else {
        (key.remote_ip, key.local_ip, key.local_port)
    };
    let Some(server) = endpoint(&server_ip) else {
        return true;
    };
    let client = identity_of_address(&client_ip);
    decide(server.subject, client, server_port, PROTO_TCP, policy_entry)
        .action()
        .passes()
}

/// Whether the connection of socket `key` may be short-circuited now: the
/// node's setting, and under `OptedIn` the labels of the workloads at both
/// ends, which must be local and opted in (a loopback connection has no
/// workload address: only under `All`). Checked again before every
/// redirect, so a label taken away takes effect at the next message.
#[inline(always)]
fn may_short_circuit(key: &SocketKey) -> bool {
    const OPTED_IN: u32 = ENDPOINT_LOCAL | ENDPOINT_SHORT_CIRCUIT;
    let opted_in = |ip| endpoint(ip).is_some_and(|e| e.flags & OPTED_IN == OPTED_IN);
    match short_circuit() {
        ShortCircuit::All => true,
        ShortCircuit::OptedIn => opted_in(&key.local_ip) && opted_in(&key.remote_ip),
        ShortCircuit::Off => false,
    }
}

/// The agent's own sockets outside every workload's namespace (those of
/// its start-up self-test, which redirect through a map of their own) are
/// not the mesh's to track.
#[inline(always)]
fn is_agent_socket(ctx: &SockOpsContext) -> bool {
    // SAFETY: the kernel's context for this call; `sk` is checked for null
    // before its u32 field is read.
    let marked = unsafe {
        let sk = (*ctx.ops).__bindgen_anon_2.sk;
        !sk.is_null() && core::ptr::read_volatile(&raw const (*sk).mark) == AGENT_SOCKET_MARK
    };
    marked && identity_of_caller(ctx) == WORLD_IDENTITY
}

fn track_established(ctx: &SockOpsContext, side: u32) {
    if is_agent_socket(ctx) {
        return;
    }
    let Some(mut key) = sockops_key(ctx) else {
        return;
    };
    if !may_short_circuit(&key) {
        return;
    }
    let generation = policy_generation();
    if !connection_allowed(&key, side == SOCKET_ACTIVE) {
        return;
    }
    // SAFETY: a helper that only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: reads the clock.
    let established_ns = unsafe { bpf_ktime_get_ns() };
    let info = SocketInfo {
        flags: side,
        policy_generation: generation,
        cookie,
        established_ns,
    };
    // The info entry goes first: the redirect program refuses to redirect a
    // socket it has no info for, so a socket is never half-tracked.
    if SOCKETS.insert(key, info, BPF_ANY as u64).is_err() {
        count(Counter::SocketsTrackFailed, 1);
        return;
    }
    // SAFETY: ctx.ops is the kernel's sock_ops context for this call.
    let ops = unsafe { &mut *ctx.ops };
    if SOCK_HASH.update(&mut key, ops, BPF_NOEXIST as u64).is_err() {
        let _ = SOCKETS.remove(key);
        count(Counter::SocketsTrackFailed, 1);
        return;
    }
    // Bytes may now be redirected to this socket: its inbox bounds them
    // (`inbox`), and splice(2) from it would miss them (`splice_guard`).
    // With no inbox the socket is never sent to (`try_msg_redirect`).
    if SOCKET_INBOX
        .insert(cookie, Inbox::default(), BPF_ANY as u64)
        .is_err()
    {
        count(Counter::SocketsTrackFailed, 1);
    }
    // Ask for state changes so the info entry is removed when the socket
    // closes (the kernel removes sockhash entries by itself).
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    count(Counter::SocketsTracked, 1);
}

fn untrack_closed(ctx: &SockOpsContext) {
    if let Some(key) = sockops_key(ctx)
        && SOCKETS.remove(key).is_ok()
    {
        // SAFETY: a helper that only reads the context it is given.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = SOCKET_INBOX.remove(cookie);
        count(Counter::SocketsClosed, 1);
    }
}

/// The inbox of the local socket `peer`, if it is tracked.
#[inline(always)]
fn peer_inbox(peer: &SocketKey) -> Option<*mut Inbox> {
    let cookie = lookup(&SOCKETS, peer)?.cookie;
    SOCKET_INBOX.get_ptr_mut(cookie)
}

#[sk_msg]
pub fn mesh_msg_redirect(ctx: SkMsgContext) -> u32 {
    let _ = try_msg_redirect(&ctx);
    // Always SK_PASS: a message the helper redirected goes to the peer, any
    // other goes through the TCP/IP stack. Never dropped here.
    SK_PASS
}

fn try_msg_redirect(ctx: &SkMsgContext) -> Result<(), ()> {
    // SAFETY: ctx.msg is the kernel's sk_msg context for this call.
    let md = unsafe { &*ctx.msg };
    let raw = RawTuple {
        family: md.family,
        local_ip4: md.local_ip4,
        remote_ip4: md.remote_ip4,
        local_ip6: md.local_ip6,
        remote_ip6: md.remote_ip6,
        local_port: md.local_port,
        remote_port: md.remote_port,
    };
    // SAFETY: the helper only reads the context it is given.
    let key =
        SocketKey::from_raw(&raw, || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }).ok_or(())?;
    let info = SOCKETS.get_ptr_mut(key).ok_or(())?;
    // SAFETY: a live hash-map value; this socket's sendmsg holds the socket
    // lock, so only this program touches this entry now.
    let info = unsafe { &mut *info };
    if info.flags & SOCKET_STACK_ONLY != 0 {
        count(Counter::MsgsStackOnly, 1);
        return Ok(());
    }
    let generation = policy_generation();
    let revoked = info.policy_generation != generation
        && !connection_allowed(&key, info.flags & SOCKET_ACTIVE != 0);
    if revoked || !may_short_circuit(&key) {
        info.flags |= SOCKET_STACK_ONLY;
        count(Counter::MsgsStackOnly, 1);
        return Ok(());
    }
    info.policy_generation = generation;
    let size = ctx.size() as u64;
    let peer = key.peer();
    // The receiver's unread bytes in the redirect path, which the kernel
    // does not bound: past the node's bound this connection takes the
    // stack for good, where TCP's flow control pushes back (in order:
    // what was redirected is read first).
    // SAFETY: a live hash-map value; `redirected` is written only here,
    // under this sender's socket lock, `read` only by the receiver's reads.
    let inbox = peer_inbox(&peer).map(|inbox| unsafe { &mut *inbox });
    let bound = u64::from(setting(Setting::RedirectBacklogBytes));
    if let Some(inbox) = &inbox
        && inbox.would_overflow(size, bound)
    {
        info.flags |= SOCKET_STACK_ONLY;
        count(Counter::RedirectBackpressure, 1);
        count(Counter::MsgsStackOnly, 1);
        return Ok(());
    }
    // A peer with no inbox is no tracked local socket (yet): the redirect
    // is not even tried.
    if let Some(inbox) = inbox
        && SOCK_HASH.redirect_msg(ctx, peer, BPF_F_INGRESS as u64) == SK_PASS as i64
    {
        inbox.redirected += size;
        count(Counter::MsgsRedirected, 1);
        count(Counter::BytesRedirected, size);
    } else {
        // These bytes take the stack; later ones must follow them there.
        info.flags |= SOCKET_STACK_ONLY;
        count(Counter::RedirectFailed, 1);
    }
    Ok(())
}
