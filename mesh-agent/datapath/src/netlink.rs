//! The netlink questions the agent asks, framed by hand (a request, its
//! answers, their attributes): which interface is the other end of each
//! veth of a namespace (`RTM_GETLINK`), which interface the route to an
//! address leaves through (`RTM_GETROUTE`), and, of sock_diag, which
//! connected UDP sockets there are, to abort some (`SOCK_DESTROY`, what
//! `ss -K` sends), and which tc filters an interface has (`RTM_GETTFILTER`),
//! where a kernel without TCX keeps the mesh's tc programs. All are asked
//! of the calling thread's network namespace.
use std::{collections::BTreeSet, io, net::IpAddr, os::fd::AsRawFd as _};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
/// `struct tcmsg`: family, padding, ifindex, handle, parent, info.
const TCMSG_LEN: usize = 20;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
/// The clsact qdisc's two hooks, as a filter's parent.
const TC_H_CLSACT_INGRESS: u32 = 0xffff_fff2;
const TC_H_CLSACT_EGRESS: u32 = 0xffff_fff3;
/// `struct ifinfomsg` and `struct rtmsg`: what follows the header.
const IFINFO_LEN: usize = 16;
const RTMSG_LEN: usize = 12;
const IFLA_LINK: u16 = 5;
const IFLA_LINK_NETNSID: u16 = 37;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `struct inet_diag_req_v2`, `struct inet_diag_msg`, and where the
/// `struct inet_diag_sockid` (48 bytes, the socket's addresses and cookie)
/// sits in both.
const INET_DIAG_REQ_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const SOCKID_IN_REQ: usize = 8;
const SOCKID_IN_MSG: usize = 4;
const SOCKID_LEN: usize = 48;
const COOKIE_IN_SOCKID: usize = 40;
/// A UDP socket's state once connected.
const TCP_ESTABLISHED: u32 = 1;

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer")
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Sends one request of `kind` with `body` (after the header) and returns
/// the answers of type `answer`, each without its header, until the kernel
/// says it is done (a dump) or has answered once (a single question).
fn ask(kind: u16, flags: u16, body: &[u8], answer: u16) -> io::Result<Vec<Vec<u8>>> {
    ask_of(SockProtocol::NetlinkRoute, kind, flags, body, answer)
}

/// [`ask`], of the netlink family `protocol`.
fn ask_of(
    protocol: SockProtocol,
    kind: u16,
    flags: u16,
    body: &[u8],
    answer: u16,
) -> io::Result<Vec<Vec<u8>>> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    let mut request = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    request.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    request.extend_from_slice(&kind.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    request.extend_from_slice(body);
    send(sock.as_raw_fd(), &request, MsgFlags::empty())?;

    let dump = flags & NLM_F_DUMP != 0;
    let mut answers = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + NLMSG_HDRLEN <= n {
            let len = u32_at(&buf, at).ok_or_else(malformed)? as usize;
            if len < NLMSG_HDRLEN || at + len > n {
                return Err(malformed());
            }
            let msg = &buf[at..at + len];
            match u16_at(msg, 4) {
                NLMSG_DONE => return Ok(answers),
                NLMSG_ERROR => {
                    let errno = u32_at(msg, NLMSG_HDRLEN).ok_or_else(malformed)? as i32;
                    if errno == 0 {
                        return Ok(answers); // an acknowledgement
                    }
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                t if t == answer => answers.push(msg[NLMSG_HDRLEN..].to_vec()),
                _ => {}
            }
            at += (len + 3) & !3;
        }
        if !dump && !answers.is_empty() {
            return Ok(answers);
        }
    }
}

/// The attributes (type, value) that follow the first `skip` bytes.
fn attributes(payload: &[u8], skip: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = skip;
    std::iter::from_fn(move || {
        if at + 4 > payload.len() {
            return None;
        }
        let len = usize::from(u16_at(payload, at));
        if len < 4 || at + len > payload.len() {
            return None;
        }
        // The type without its NLA_F_NESTED / NLA_F_NET_BYTEORDER flags.
        let attr = (u16_at(payload, at + 2) & 0x3fff, &payload[at + 4..at + len]);
        at += (len + 3) & !3;
        Some(attr)
    })
}

/// The interfaces of the caller's network namespace that are one end of a
/// pair whose other end is in another namespace (a pod's veth): the index
/// of that other end, there (`IFLA_LINK` with `IFLA_LINK_NETNSID`).
pub fn peer_interfaces() -> io::Result<Vec<u32>> {
    let links = ask(RTM_GETLINK, NLM_F_DUMP, &[0u8; IFINFO_LEN], RTM_NEWLINK)?;
    Ok(links
        .iter()
        .filter_map(|link| {
            let (mut peer, mut elsewhere) = (None, false);
            for (kind, value) in attributes(link, IFINFO_LEN) {
                match kind {
                    IFLA_LINK => peer = u32_at(value, 0),
                    IFLA_LINK_NETNSID => elsewhere = true,
                    _ => {}
                }
            }
            peer.filter(|_| elsewhere)
        })
        .collect())
}

/// Brings interface `ifindex` up (`ip link set … up`).
pub fn set_link_up(ifindex: u32) -> io::Result<()> {
    let mut body = [0u8; IFINFO_LEN];
    body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    let up = libc::IFF_UP as u32;
    body[8..12].copy_from_slice(&up.to_ne_bytes()); // flags
    body[12..16].copy_from_slice(&up.to_ne_bytes()); // change
    ask(RTM_NEWLINK, NLM_F_ACK, &body, NLMSG_ERROR).map(drop)
}

/// One tc filter of a clsact hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilter {
    pub priority: u16,
    pub handle: u32,
    /// The classifier: `bpf` for a program.
    pub kind: String,
    /// Of a `bpf` filter: the name it was given and its program's id.
    pub name: String,
    pub program_id: u32,
}

/// The filters on the clsact `ingress` (or egress) hook of interface
/// `ifindex`: none when it has no clsact qdisc.
pub fn tc_filters(ifindex: u32, ingress: bool) -> io::Result<Vec<TcFilter>> {
    let mut body = [0u8; TCMSG_LEN];
    body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    let parent = if ingress {
        TC_H_CLSACT_INGRESS
    } else {
        TC_H_CLSACT_EGRESS
    };
    body[12..16].copy_from_slice(&parent.to_ne_bytes());
    let answers = ask(RTM_GETTFILTER, NLM_F_DUMP, &body, RTM_NEWTFILTER)?;
    Ok(answers
        .iter()
        .filter_map(|answer| parse_tc_filter(answer))
        .collect())
}

/// A `RTM_NEWTFILTER` answer; `None` for the entry of a priority with no
/// filter yet (handle 0), or one cut short.
fn parse_tc_filter(answer: &[u8]) -> Option<TcFilter> {
    let handle = u32_at(answer, 8)?;
    let info = u32_at(answer, 16)?;
    if handle == 0 {
        return None;
    }
    let text =
        |v: &[u8]| String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(&[])).into_owned();
    let mut filter = TcFilter {
        priority: (info >> 16) as u16,
        handle,
        kind: String::new(),
        name: String::new(),
        program_id: 0,
    };
    for (kind, value) in attributes(answer, TCMSG_LEN) {
        match kind {
            TCA_KIND => filter.kind = text(value),
            TCA_OPTIONS => {
                for (option, value) in attributes(value, 0) {
                    match option {
                        TCA_BPF_NAME => filter.name = text(value),
                        TCA_BPF_ID => filter.program_id = u32_at(value, 0).unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(filter)
}

/// The index of the interface the route to `dst` leaves through, if there
/// is a route.
pub fn route_interface(dst: IpAddr) -> io::Result<Option<u32>> {
    let (family, address): (u8, Vec<u8>) = match dst {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type,
    // flags (u32); then RTA_DST.
    let mut body = vec![0u8; RTMSG_LEN];
    body[0] = family;
    body[1] = (address.len() * 8) as u8;
    body.extend_from_slice(&((4 + address.len()) as u16).to_ne_bytes());
    body.extend_from_slice(&RTA_DST.to_ne_bytes());
    body.extend_from_slice(&address);
    let answers = match ask(RTM_GETROUTE, 0, &body, RTM_NEWROUTE) {
        Ok(answers) => answers,
        // No route at all.
        Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(answers.iter().find_map(|route| {
        attributes(route, RTMSG_LEN)
            .find(|(kind, _)| *kind == RTA_OIF)
            .and_then(|(_, value)| u32_at(value, 0))
    }))
}

/// Aborts the connected UDP sockets whose cookie is in `cookies`: each
/// reports `ECONNABORTED` once and is left unconnected, so its application
/// connects again (and is translated afresh). Returns how many were aborted.
/// A kernel built without `CONFIG_INET_DIAG_DESTROY` answers `EOPNOTSUPP`.
pub fn abort_udp_sockets(cookies: &BTreeSet<u64>) -> io::Result<usize> {
    let mut aborted = 0;
    for family in [libc::AF_INET, libc::AF_INET6] {
        let mut dump = [0u8; INET_DIAG_REQ_LEN];
        dump[0] = family as u8;
        dump[1] = libc::IPPROTO_UDP as u8;
        dump[4..8].copy_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
        let sockets = ask_of(
            SockProtocol::NetlinkSockDiag,
            SOCK_DIAG_BY_FAMILY,
            NLM_F_DUMP,
            &dump,
            SOCK_DIAG_BY_FAMILY,
        )?;
        for socket in sockets {
            if socket.len() < INET_DIAG_MSG_LEN {
                return Err(malformed());
            }
            let id = &socket[SOCKID_IN_MSG..SOCKID_IN_MSG + SOCKID_LEN];
            let low = u32_at(id, COOKIE_IN_SOCKID).ok_or_else(malformed)?;
            let high = u32_at(id, COOKIE_IN_SOCKID + 4).ok_or_else(malformed)?;
            if !cookies.contains(&(u64::from(high) << 32 | u64::from(low))) {
                continue;
            }
            // The kernel finds the socket again by its addresses and checks
            // the cookie, so a socket closed meanwhile is never mistaken.
            let mut destroy = dump;
            destroy[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
            destroy[SOCKID_IN_REQ..SOCKID_IN_REQ + SOCKID_LEN].copy_from_slice(id);
            match ask_of(
                SockProtocol::NetlinkSockDiag,
                SOCK_DESTROY,
                NLM_F_ACK,
                &destroy,
                NLMSG_ERROR,
            ) {
                Ok(_) => aborted += 1,
                // Closed since the dump.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(aborted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_to_loopback_leaves_through_lo() {
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        assert_eq!(
            route_interface("127.0.0.1".parse().unwrap()).unwrap(),
            Some(lo)
        );
    }

    #[test]
    fn only_the_named_connected_udp_socket_is_aborted() {
        use std::net::UdpSocket;
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let connected = |to| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(to).unwrap();
            s
        };
        let (doomed, kept) = (
            connected(server.local_addr().unwrap()),
            connected(server.local_addr().unwrap()),
        );
        let cookie = crate::sys::socket_cookie(std::os::fd::AsFd::as_fd(&doomed)).unwrap();
        match abort_udp_sockets(&BTreeSet::from([cookie])) {
            Ok(n) => assert_eq!(n, 1),
            // Outside CI, a kernel without CONFIG_INET_DIAG_DESTROY or a
            // user without CAP_NET_ADMIN cannot run this.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EPERM))
                    && std::env::var_os("CI").is_none() =>
            {
                eprintln!("not run: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        doomed
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        assert_eq!(
            doomed.recv(&mut [0u8; 8]).unwrap_err().raw_os_error(),
            Some(libc::ECONNABORTED)
        );
        // Aborted sockets are left unconnected.
        assert_eq!(
            doomed.send(b"x").unwrap_err().raw_os_error(),
            Some(libc::EDESTADDRREQ)
        );
        kept.send(b"x").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            server.recv_from(&mut buf).unwrap().1,
            kept.local_addr().unwrap()
        );
    }

    #[test]
    fn attributes_stop_at_a_truncated_one() {
        // One 8-byte attribute (type 5, value 7), then 2 stray bytes.
        let mut payload = vec![8, 0, 5, 0, 7, 0, 0, 0, 1, 2];
        payload[0] = 8;
        let found: Vec<(u16, Vec<u8>)> = attributes(&payload, 0)
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(found, vec![(5, vec![7, 0, 0, 0])]);
    }
}
