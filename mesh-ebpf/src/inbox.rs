//! What receivers read of the bytes redirected to them: the other half of
//! each socket's `Inbox` (`short_circuit` adds what it redirects).
//!
//! The kernel's redirect path charges a receiver's memory only against the
//! global TCP limits, never its receive buffer: a sender could queue any
//! amount for a receiver that does not read (the self-test's
//! `no_receiver_backpressure`). `mesh_inbox_read` runs when the kernel
//! copies redirected bytes to a reader (`sk_msg_recvmsg`, or its inner
//! `__sk_msg_recvmsg` where a kernel has one: the agent attaches to the
//! function its kernel calls), and counts them in the reader's inbox; the
//! sender's next message compares.

use aya_ebpf::{
    EbpfContext,
    cty::c_void,
    helpers::{bpf_get_func_ret, bpf_get_socket_cookie},
    macros::fexit,
    programs::FExitContext,
};

use crate::maps::SOCKET_INBOX;

/// `MSG_PEEK`: a peek copies bytes but leaves them queued.
const MSG_PEEK: i32 = 2;

// (sk, psock, msg, len, flags[, copied_from_self]) -> bytes copied.
#[fexit(function = "sk_msg_recvmsg")]
pub fn mesh_inbox_read(ctx: FExitContext) -> i32 {
    let flags: i32 = ctx.arg(4);
    if flags & MSG_PEEK != 0 {
        return 0;
    }
    let mut copied: u64 = 0;
    // SAFETY: the helper writes the traced function's return value into
    // the u64 it is given; its index depends on the function's arity,
    // which the helper knows and this program does not.
    if unsafe { bpf_get_func_ret(ctx.as_ptr(), &mut copied) } != 0 {
        return 0;
    }
    let copied = copied as i32;
    if copied <= 0 {
        return 0;
    }
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` is the traced function's BTF-typed socket argument.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if let Some(inbox) = SOCKET_INBOX.get_ptr_mut(cookie) {
        // SAFETY: a live hash-map value; `read` is written only by reads
        // of this socket, which hold its lock.
        unsafe { (*inbox).read += copied as u64 };
    }
    0
}
