//! The address a cgroup sock_addr program is handed (the destination of a
//! connect or sendmsg, the source of a received datagram, the peer that
//! getpeername answers), read and rewritten the same way by every program
//! that translates or steers: Services, the tunnel, getpeername.

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use mesh_common::{ipv4_mapped, service::SockAddr};

/// Which of the context's address fields the hook uses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// `user_ip4`: the `*4` hooks (IPv4 sockets).
    V4,
    /// `user_ip6`: the `*6` hooks (IPv6 sockets, IPv4-mapped peers too).
    V6,
}

/// The context's address, IPv6 or IPv4-mapped, and port in host order.
#[inline(always)]
pub(crate) fn read(ctx: &SockAddrContext, family: Family) -> SockAddr {
    // SAFETY: the kernel's context for this call; each field is a u32 and
    // is read with one aligned load, as the verifier requires.
    unsafe {
        let sa = ctx.sock_addr;
        let ip = match family {
            Family::V4 => ipv4_mapped(core::ptr::read_volatile(&raw const (*sa).user_ip4)),
            Family::V6 => [
                core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
            ],
        };
        // The port is in network byte order in the low 16 bits.
        let port = u16::from_be(core::ptr::read_volatile(&raw const (*sa).user_port) as u16);
        SockAddr::new(ip, port)
    }
}

/// Rewrites the context's address (for a `V4` hook, `addr` is
/// IPv4-mapped and its last word is written).
#[inline(always)]
pub(crate) fn write(ctx: &SockAddrContext, family: Family, addr: &SockAddr) {
    // SAFETY: the kernel's context for this call; connect, sendmsg,
    // recvmsg and getpeername hooks may write the address and port, with
    // one aligned u32 store per word.
    unsafe {
        let sa = ctx.sock_addr;
        match family {
            Family::V4 => core::ptr::write_volatile(&raw mut (*sa).user_ip4, addr.ip[3]),
            Family::V6 => {
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], addr.ip[0]);
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], addr.ip[1]);
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], addr.ip[2]);
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], addr.ip[3]);
            }
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(addr.port.to_be()));
    }
}

/// The calling socket's cookie: how the maps name a socket across hooks.
#[inline(always)]
pub(crate) fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the context it is given.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}
