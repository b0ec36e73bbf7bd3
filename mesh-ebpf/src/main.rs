//! The mesh's kernel programs.
//!
//! - Policy (`enforce`): `mesh_connect4/6` and `mesh_sendmsg4/6` check every
//!   connection a local workload opens, at `connect(2)` (or per datagram of
//!   an unconnected UDP socket), and refuse denied ones with EPERM before a
//!   packet leaves. The tc programs (`arrival`) check packets where they
//!   arrive: `mesh_ingress` what other nodes send, once per flow thanks to
//!   `CONNTRACK` (`mesh_egress` records the node's own outbound flows so
//!   that their replies pass), and `mesh_to_workload` and
//!   `mesh_from_workload`, on the node's side of each workload's interface,
//!   what no connect hook sees (packet sockets) and forged sources.
//! - Same-node short-circuit (`short_circuit`): `mesh_sockops` tracks the
//!   established TCP sockets of allowed connections in `SOCK_HASH`;
//!   `mesh_msg_redirect` hands each message straight to the local peer.
//!   `mesh_self_test_redirect` (`self_test`) does the same in the agent's
//!   start-up test of the kernel's redirect path.
//!
//! - Services (`service`): a connect or sendmsg to a Service address goes
//!   to one of its backends, chosen before policy, so the verdict and the
//!   path are the backend's; getpeername and UDP replies show the Service
//!   address.
//! - mTLS between nodes (`tunnel`): allowed connections to workloads of other
//!   nodes are steered to the node agent; `mesh_getpeername4/6` keep the
//!   original destination visible to the application.
//!
//! Every decision is a handful of hash lookups (`mesh_common::policy::decide`);
//! the agent compiles policy into those entries. Programs never depend on
//! the agent being up: everything they read is pinned (`maps`, which also
//! holds the one hash-map read every program goes through).
#![no_std]
#![no_main]

mod arrival;
mod attempt;
mod enforce;
mod inbox;
mod maps;
mod packet;
mod self_test;
mod service;
mod short_circuit;
mod sock_addr;
mod splice_guard;
mod tunnel;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible for the kernel (GPL-only helpers); Cargo.toml says the same.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
