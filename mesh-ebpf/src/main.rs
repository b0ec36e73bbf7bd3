//! The mesh's kernel programs.
//!
//! `mesh_sockops` tracks the established TCP sockets of the pods' cgroup in
//! `SOCK_HASH`; `mesh_msg_redirect` runs on every `sendmsg` of those sockets
//! and hands the payload straight to the peer socket when it is local, so
//! pod-to-pod traffic on one node skips the TCP/IP stack.
//!
//! The programs are thin: each `mesh_*` entry point calls a `try_*` function
//! and turns its error into the safe verdict (pass the message to the stack).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, sk_action::SK_PASS,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, sk_msg, sock_ops},
    maps::{Array, HashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    Counter, DEFAULT_MAX_SOCKETS, MAX_COUNTERS, MAX_SETTINGS, RawTuple, SHORT_CIRCUIT_ON,
    SOCKET_STACK_ONLY, Setting, SocketInfo, SocketKey,
};

#[map]
static SOCK_HASH: SockHash<SocketKey> = SockHash::pinned(DEFAULT_MAX_SOCKETS, 0);

#[map]
static SOCKETS: HashMap<SocketKey, SocketInfo> = HashMap::pinned(DEFAULT_MAX_SOCKETS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_COUNTERS, 0);

#[map]
static SETTINGS: Array<u32> = Array::pinned(MAX_SETTINGS, 0);

#[inline(always)]
fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on a CPU
        // while they run, so nothing else writes it concurrently.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn short_circuit_on() -> bool {
    SETTINGS.get(Setting::ShortCircuit as u32).copied() == Some(SHORT_CIRCUIT_ON)
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            track_established(&ctx)
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => untrack_closed(&ctx),
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

fn track_established(ctx: &SockOpsContext) {
    if !short_circuit_on() {
        return;
    }
    let Some(mut key) = sockops_key(ctx) else {
        return;
    };
    let info = SocketInfo {
        flags: 0,
        _pad: 0,
        // SAFETY: helpers that only read the context / the clock.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        established_ns: unsafe { bpf_ktime_get_ns() },
    };
    // The info entry goes first: the redirect program refuses to redirect a
    // socket it has no info for, so a socket is never half-tracked.
    if SOCKETS.insert(&key, &info, BPF_ANY as u64).is_err() {
        count(Counter::SocketsTrackFailed, 1);
        return;
    }
    // SAFETY: ctx.ops is the kernel's sock_ops context for this call.
    if SOCK_HASH
        .update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
        .is_err()
    {
        let _ = SOCKETS.remove(&key);
        count(Counter::SocketsTrackFailed, 1);
        return;
    }
    // Ask for state changes so the info entry is removed when the socket
    // closes (the kernel removes sockhash entries by itself).
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    count(Counter::SocketsTracked, 1);
}

fn untrack_closed(ctx: &SockOpsContext) {
    if let Some(key) = sockops_key(ctx) {
        if SOCKETS.remove(&key).is_ok() {
            count(Counter::SocketsClosed, 1);
        }
    }
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
    let info = SOCKETS.get_ptr_mut(&key).ok_or(())?;
    // SAFETY: a live hash-map value; this socket's sendmsg holds the socket
    // lock, so only this program touches this entry's flags now.
    let flags = unsafe { &mut (*info).flags };
    if *flags & SOCKET_STACK_ONLY != 0 {
        count(Counter::MsgsStackOnly, 1);
        return Ok(());
    }
    if !short_circuit_on() {
        *flags |= SOCKET_STACK_ONLY;
        count(Counter::MsgsStackOnly, 1);
        return Ok(());
    }
    let size = ctx.size() as u64;
    if SOCK_HASH.redirect_msg(ctx, key.peer(), BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(Counter::MsgsRedirected, 1);
        count(Counter::BytesRedirected, size);
    } else {
        // These bytes take the stack; later ones must follow them there.
        *flags |= SOCKET_STACK_ONLY;
        count(Counter::RedirectFailed, 1);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
