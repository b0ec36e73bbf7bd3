//! Just enough header parsing for the tc programs: the flow of an IPv4 or
//! IPv6 TCP/UDP packet. It lives here, generic over where the bytes come
//! from, so that the same code the kernel runs is unit-tested and fuzzed
//! in user space (`fuzz/fuzz_targets/packets.rs`): the kernel reads with
//! `bpf_skb_load_bytes_relative`, the tests from a slice.
//!
//! Offsets count from the network header and the IP version comes from
//! `skb->protocol`, so the same code reads packets behind an Ethernet
//! header and packets of L3 devices, which have none (`tunl0`, `wg0`, the
//! decapsulated side of an overlay).

use crate::{
    ipv4_mapped,
    policy::{FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP},
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: u32 = 40;
/// TCP flags byte: SYN set, ACK clear is the first packet of a connection.
const TCP_FLAGS_OFFSET: u32 = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
pub const TCP_HLEN: u32 = 20;
pub const UDP_HLEN: u32 = 8;
/// IPv4 flags and fragment offset: more fragments follow; the offset.
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

/// A packet as the parser sees it: its EtherType and its bytes from the
/// network header on.
pub trait PacketBytes {
    /// `skb->protocol`, in host byte order.
    fn ethertype(&self) -> u16;
    /// The `N` bytes at `offset` from the network header, or `Err` where
    /// the packet is shorter.
    #[allow(clippy::result_unit_err)]
    fn read<const N: usize>(&self, offset: u32) -> Result<[u8; N], ()>;
}

/// A packet held in memory (tests and fuzzing).
pub struct L3Packet<'a> {
    pub ethertype: u16,
    /// From the network header on.
    pub bytes: &'a [u8],
}

impl PacketBytes for L3Packet<'_> {
    fn ethertype(&self) -> u16 {
        self.ethertype
    }

    fn read<const N: usize>(&self, offset: u32) -> Result<[u8; N], ()> {
        let start = offset as usize;
        let end = start.checked_add(N).ok_or(())?;
        let bytes = self.bytes.get(start..end).ok_or(())?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A TCP or UDP packet (the first fragment, for IPv4).
    Flow { key: FlowKey, syn: bool },
    /// An IP packet this program cannot see the ports of (other protocols,
    /// IPv6 extension headers, an IPv4 first fragment cut inside its TCP or
    /// UDP header): only its destination is known.
    Opaque { dst_ip: [u32; 4] },
    /// Not IP, ICMP, a non-first IPv4 fragment (which carries no ports and
    /// is useless without the first one), or a packet too short for the
    /// headers it claims, which the stack drops: never ours to judge.
    Ignore,
}

#[inline(always)]
pub fn parse<P: PacketBytes>(packet: &P) -> Parsed {
    try_parse(packet).unwrap_or(Parsed::Ignore)
}

#[inline(always)]
fn u8_at<P: PacketBytes>(p: &P, offset: u32) -> Result<u8, ()> {
    Ok(p.read::<1>(offset)?[0])
}

/// A 16-bit field, converted from network byte order.
#[inline(always)]
fn be16_at<P: PacketBytes>(p: &P, offset: u32) -> Result<u16, ()> {
    Ok(u16::from_be_bytes(p.read(offset)?))
}

/// An IPv4 address, kept in network byte order as the maps hold it.
#[inline(always)]
fn ip4_at<P: PacketBytes>(p: &P, offset: u32) -> Result<u32, ()> {
    Ok(u32::from_ne_bytes(p.read(offset)?))
}

/// An IPv6 address, as four words in network byte order.
#[inline(always)]
fn ip6_at<P: PacketBytes>(p: &P, offset: u32) -> Result<[u32; 4], ()> {
    let b: [u8; 16] = p.read(offset)?;
    Ok([
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ])
}

#[inline(always)]
fn try_parse<P: PacketBytes>(p: &P) -> Result<Parsed, ()> {
    let (src_ip, dst_ip, proto, l4) = match p.ethertype() {
        ETH_P_IP => {
            let ver_ihl = u8_at(p, 0)?;
            let total_len = be16_at(p, 2)?;
            let frag = be16_at(p, 6)?;
            let proto = u8_at(p, 9)?;
            let src = ip4_at(p, 12)?;
            let dst = ip4_at(p, 16)?;
            if proto == PROTO_ICMP || frag & IP_OFFSET != 0 {
                return Ok(Parsed::Ignore);
            }
            let l4 = u32::from(ver_ihl & 0x0f) * 4;
            // A first fragment too short for the whole TCP or UDP header
            // hides what the reassembled packet is (RFC 1858's tiny
            // fragment: the flags of a SYN in the second fragment). No
            // stack sends one; judge it by its destination alone. Its
            // length is the IP header's (an Ethernet frame may carry
            // padding after it), and the bytes must be there too.
            let l4_header = match proto {
                PROTO_TCP => TCP_HLEN,
                PROTO_UDP => UDP_HLEN,
                _ => 1,
            };
            let tiny =
                u32::from(total_len) < l4 + l4_header || u8_at(p, l4 + l4_header - 1).is_err();
            if frag & IP_MF != 0 && tiny {
                return Ok(Parsed::Opaque {
                    dst_ip: ipv4_mapped(dst),
                });
            }
            (ipv4_mapped(src), ipv4_mapped(dst), proto, l4)
        }
        ETH_P_IPV6 => {
            let proto = u8_at(p, 6)?;
            let src = ip6_at(p, 8)?;
            let dst = ip6_at(p, 24)?;
            if proto == PROTO_ICMPV6 {
                return Ok(Parsed::Ignore);
            }
            (src, dst, proto, IPV6_HLEN)
        }
        _ => return Ok(Parsed::Ignore),
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(Parsed::Opaque { dst_ip });
    }
    let src_port = be16_at(p, l4)?;
    let dst_port = be16_at(p, l4 + 2)?;
    let syn = proto == PROTO_TCP && {
        let flags = u8_at(p, l4 + TCP_FLAGS_OFFSET)?;
        flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    };
    Ok(Parsed::Flow {
        key: FlowKey {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        },
        syn,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// An IPv4 header (20 bytes) from 10.0.0.1 to 10.0.0.2, then `l4`.
    fn ipv4(proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    /// A TCP header from port 40000 to 80 with `flags`.
    fn tcp(flags: u8) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&40000u16.to_be_bytes());
        h[2..4].copy_from_slice(&80u16.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = flags;
        h
    }

    fn parse_v4(bytes: &[u8]) -> Parsed {
        parse(&L3Packet {
            ethertype: ETH_P_IP,
            bytes,
        })
    }

    fn v4(last: u8) -> [u32; 4] {
        ipv4_mapped(u32::from_ne_bytes([10, 0, 0, last]))
    }

    #[test]
    fn a_syn_is_a_flow_and_its_first_packet() {
        let Parsed::Flow { key, syn } = parse_v4(&ipv4(PROTO_TCP, 0, &tcp(TCP_SYN))) else {
            panic!("not a flow");
        };
        assert!(syn);
        assert_eq!((key.src_ip, key.dst_ip), (v4(1), v4(2)));
        assert_eq!(
            (key.src_port, key.dst_port, key.proto),
            (40000, 80, PROTO_TCP)
        );
        let Parsed::Flow { syn, .. } = parse_v4(&ipv4(PROTO_TCP, 0, &tcp(TCP_SYN | TCP_ACK)))
        else {
            panic!("not a flow");
        };
        assert!(!syn, "a SYN-ACK answers a connection, it does not open one");
    }

    #[test]
    fn a_tiny_first_fragment_is_judged_by_its_destination() {
        let cut = ipv4(PROTO_TCP, IP_MF, &tcp(TCP_SYN)[..8]);
        assert_eq!(parse_v4(&cut), Parsed::Opaque { dst_ip: v4(2) });
        // Padding after the IP packet (a 60-byte Ethernet frame) does not
        // make it whole: its own length says where it ends.
        let mut padded = cut.clone();
        padded.resize(46, 0);
        assert_eq!(parse_v4(&padded), Parsed::Opaque { dst_ip: v4(2) });
        // A whole header in a first fragment is a flow.
        assert!(matches!(
            parse_v4(&ipv4(PROTO_TCP, IP_MF, &tcp(TCP_SYN))),
            Parsed::Flow { syn: true, .. }
        ));
    }

    #[test]
    fn later_fragments_icmp_and_other_ethertypes_are_not_judged() {
        assert_eq!(parse_v4(&ipv4(PROTO_TCP, 1, &tcp(0))), Parsed::Ignore);
        assert_eq!(
            parse_v4(&ipv4(PROTO_ICMP, 0, &[8, 0, 0, 0])),
            Parsed::Ignore
        );
        let arp = L3Packet {
            ethertype: 0x0806,
            bytes: &[0; 28],
        };
        assert_eq!(parse(&arp), Parsed::Ignore);
    }

    #[test]
    fn other_protocols_are_judged_by_their_destination() {
        // SCTP: no ports this parser knows.
        assert_eq!(
            parse_v4(&ipv4(132, 0, &[0; 12])),
            Parsed::Opaque { dst_ip: v4(2) }
        );
    }

    #[test]
    fn a_packet_shorter_than_its_headers_is_left_to_the_stack() {
        let whole = ipv4(PROTO_TCP, 0, &tcp(TCP_SYN));
        for len in [0, 1, 19, 21, 23, 33] {
            assert_eq!(parse_v4(&whole[..len]), Parsed::Ignore, "{len} bytes");
        }
    }

    #[test]
    fn ipv6_udp_is_a_flow_and_extension_headers_are_opaque() {
        let mut p = vec![0x60, 0, 0, 0, 0, 8, PROTO_UDP, 64];
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[0x13, 0x88, 0x00, 0x35, 0, 8, 0, 0]);
        fn packet(bytes: &[u8]) -> L3Packet<'_> {
            L3Packet {
                ethertype: ETH_P_IPV6,
                bytes,
            }
        }
        let Parsed::Flow { key, syn } = parse(&packet(&p)) else {
            panic!("not a flow");
        };
        assert!(!syn);
        assert_eq!(
            (key.src_port, key.dst_port, key.proto),
            (5000, 53, PROTO_UDP)
        );
        assert_eq!(key.dst_ip[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(key.dst_ip[3].to_ne_bytes(), [0, 0, 0, 2]);
        // A fragment header (44): the ports are not where a flow's are.
        p[6] = 44;
        let Parsed::Opaque { dst_ip } = parse(&packet(&p)) else {
            panic!("not opaque");
        };
        assert_eq!(dst_ip, key.dst_ip);
    }

    #[test]
    fn reads_past_the_end_fail() {
        let p = L3Packet {
            ethertype: ETH_P_IP,
            bytes: &[1, 2, 3],
        };
        assert_eq!(p.read::<2>(1), Ok([2, 3]));
        assert_eq!(p.read::<2>(2), Err(()));
        assert_eq!(p.read::<1>(u32::MAX), Err(()));
    }
}
