//! Network namespaces of local workloads, as the kernel names them.
//!
//! The connect-time programs recognise a source workload by the cookie of
//! the network namespace its socket lives in; the kernel hands that cookie
//! out only to sockets inside the namespace, so the agent asks from a
//! short-lived thread that joins it.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
};

use nix::sched::{CloneFlags, setns};

/// The cookie of the network namespace at `path` (e.g. `/run/netns/pod`).
pub fn cookie(path: &Path) -> io::Result<u64> {
    inside(path, socket_netns_cookie)
}

/// Runs `f` on a short-lived thread that joined the network namespace at
/// `path`: sockets it creates live in that namespace for good, whichever
/// thread uses them later.
pub fn inside<T: Send>(path: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let ns: OwnedFd = std::fs::File::open(path)?.into();
    // setns changes only the calling thread, which then ends.
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> io::Result<T> {
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::other(format!(
                        "{} is not a network namespace: {e}",
                        path.display()
                    ))
                })?;
                f()
            })
            .join()
            .map_err(|_| io::Error::other("network namespace thread panicked"))?
    })
}

/// The interfaces of the caller's network namespace that are one end of a
/// pair whose other end is in another namespace (a pod's veth): the index
/// of that other end, there. Asked of the kernel with an `RTM_GETLINK` dump
/// (`IFLA_LINK` and `IFLA_LINK_NETNSID` of each link).
pub fn peer_interfaces() -> io::Result<Vec<u32>> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
        socket,
    };
    const RTM_NEWLINK: u16 = 16;
    const RTM_GETLINK: u16 = 18;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const IFLA_LINK: u16 = 5;
    const IFLA_LINK_NETNSID: u16 = 37;
    const NLMSG_HDRLEN: usize = 16;
    const IFINFO_LEN: usize = 16;

    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    // nlmsghdr, then an ifinfomsg of AF_UNSPEC: every link.
    let mut request = Vec::with_capacity(NLMSG_HDRLEN + IFINFO_LEN);
    request.extend_from_slice(&((NLMSG_HDRLEN + IFINFO_LEN) as u32).to_ne_bytes());
    request.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    request.extend_from_slice(&[0u8; IFINFO_LEN]);
    send(sock.as_raw_fd(), &request, MsgFlags::empty())?;

    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap());
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer");
    let mut peers = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + NLMSG_HDRLEN <= n {
            let len = u32_at(&buf, at) as usize;
            if len < NLMSG_HDRLEN || at + len > n {
                return Err(malformed());
            }
            let msg = &buf[at..at + len];
            match u16_at(msg, 4) {
                NLMSG_DONE => return Ok(peers),
                NLMSG_ERROR => {
                    let errno =
                        i32::from_ne_bytes(msg[16..20].try_into().map_err(|_| malformed())?);
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                RTM_NEWLINK if len >= NLMSG_HDRLEN + IFINFO_LEN => {
                    let (mut link, mut other_netns) = (None, false);
                    let mut attr = NLMSG_HDRLEN + IFINFO_LEN;
                    while attr + 4 <= len {
                        let attr_len = usize::from(u16_at(msg, attr));
                        if attr_len < 4 || attr + attr_len > len {
                            break;
                        }
                        match u16_at(msg, attr + 2) {
                            IFLA_LINK if attr_len >= 8 => link = Some(u32_at(msg, attr + 4)),
                            IFLA_LINK_NETNSID => other_netns = true,
                            _ => {}
                        }
                        attr += (attr_len + 3) & !3;
                    }
                    if let Some(peer) = link.filter(|_| other_netns) {
                        peers.push(peer);
                    }
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
}

/// The cookie of the caller's own network namespace.
pub fn socket_netns_cookie() -> io::Result<u64> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    crate::sys::netns_cookie(sock.as_fd())
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_namespace_has_a_cookie_and_the_same_one_twice() {
        let a = super::socket_netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, super::socket_netns_cookie().unwrap());
        assert_eq!(
            a,
            super::cookie(std::path::Path::new("/proc/self/ns/net")).unwrap()
        );
    }
}
