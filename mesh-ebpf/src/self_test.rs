//! The agent's start-up self-test of the kernel's redirect path (see
//! mesh-agent's `datapath::self_test`): in a private network namespace the
//! agent puts both ends of a loopback connection in `SELF_TEST_SOCKETS`,
//! keyed by their local ports, and `mesh_self_test_redirect` hands each
//! message to the other end as `mesh_msg_redirect` does for workloads. A
//! map and a program of their own: the test never touches the mesh's
//! pinned maps, and the mesh's sockets never meet this program.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::{map, sk_msg},
    maps::SockHash,
    programs::SkMsgContext,
};

/// Local port → socket: the two ends of the connection under test.
#[map]
static SELF_TEST_SOCKETS: SockHash<u32> = SockHash::with_max_entries(2, 0);

#[sk_msg]
pub fn mesh_self_test_redirect(ctx: SkMsgContext) -> u32 {
    // SAFETY: ctx.msg is the kernel's sk_msg context for this call.
    let md = unsafe { &*ctx.msg };
    // The remote port, in network byte order, as `SocketKey` reads it.
    let peer = u32::from(u32::from_be(md.remote_port) as u16);
    // Never dropped: a message with no peer takes the stack.
    let _ = SELF_TEST_SOCKETS.redirect_msg(&ctx, peer, BPF_F_INGRESS as u64);
    SK_PASS
}
