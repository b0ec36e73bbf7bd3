//! Packets from the wire, as the tc programs parse them
//! (`mesh_common::packet`, the code the kernel runs, here reading a
//! slice). Input: one byte choosing IPv4 (even) or IPv6 (odd), or `0xff`
//! then a big-endian EtherType; the rest is the packet from its network
//! header on.
//!
//! What must hold: a flow's addresses, ports and first-packet flag are the
//! packet's own; an IPv4 flow whose packet is a first fragment carries its
//! whole TCP or UDP header (no tiny fragment hides a SYN); and a TCP or
//! UDP packet is left unjudged only where the stack drops it anyway
//! (headers cut short) or where it is no first fragment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_common::{
    ipv4_mapped,
    packet::{ETH_P_IP, ETH_P_IPV6, IP_MF, IP_OFFSET, L3Packet, Parsed, TCP_HLEN, UDP_HLEN, parse},
    policy::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP},
};

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn words(b: &[u8]) -> [u32; 4] {
    core::array::from_fn(|i| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let (ethertype, bytes) = match choice {
        0xff if rest.len() >= 2 => (be16(rest, 0), &rest[2..]),
        0xff => return,
        c if c % 2 == 0 => (ETH_P_IP, rest),
        _ => (ETH_P_IPV6, rest),
    };
    let parsed = parse(&L3Packet { ethertype, bytes });

    // Where the transport header starts and which addresses are the
    // packet's, read here independently of the parser.
    let (proto, l4, src, dst, first_fragment, more_fragments, ip_len) = match ethertype {
        ETH_P_IP if bytes.len() >= 20 => (
            bytes[9],
            usize::from(bytes[0] & 0x0f) * 4,
            ipv4_mapped(u32::from_ne_bytes(bytes[12..16].try_into().unwrap())),
            ipv4_mapped(u32::from_ne_bytes(bytes[16..20].try_into().unwrap())),
            be16(bytes, 6) & IP_OFFSET == 0,
            be16(bytes, 6) & IP_MF != 0,
            usize::from(be16(bytes, 2)),
        ),
        ETH_P_IPV6 if bytes.len() >= 40 => (
            bytes[6],
            40,
            words(&bytes[8..24]),
            words(&bytes[24..40]),
            true,
            false,
            usize::MAX,
        ),
        ETH_P_IP | ETH_P_IPV6 => {
            assert_eq!(parsed, Parsed::Ignore, "shorter than an IP header");
            return;
        }
        _ => {
            assert_eq!(parsed, Parsed::Ignore, "not IP");
            return;
        }
    };
    let transport = proto == PROTO_TCP || proto == PROTO_UDP;
    let l4_header = match proto {
        PROTO_TCP => TCP_HLEN as usize,
        PROTO_UDP => UDP_HLEN as usize,
        _ => 1,
    };

    match parsed {
        Parsed::Flow { key, syn } => {
            assert!(transport && first_fragment);
            assert_eq!((key.src_ip, key.dst_ip, key.proto), (src, dst, proto));
            assert_eq!(key.src_port, be16(bytes, l4));
            assert_eq!(key.dst_port, be16(bytes, l4 + 2));
            let flags = (proto == PROTO_TCP).then(|| bytes[l4 + 13]);
            assert_eq!(syn, flags.is_some_and(|f| f & 0x12 == 0x02));
            if more_fragments {
                // The whole header is in this fragment, as the IP header
                // counts it: the flags judged are the reassembled packet's.
                assert!(ip_len >= l4 + l4_header && bytes.len() >= l4 + l4_header);
            }
        }
        Parsed::Opaque { dst_ip } => {
            assert_eq!(dst_ip, dst);
            assert!(first_fragment);
            assert!(!transport || more_fragments, "a whole TCP/UDP packet");
        }
        Parsed::Ignore => {
            let icmp = if ethertype == ETH_P_IP {
                PROTO_ICMP
            } else {
                PROTO_ICMPV6
            };
            let not_ours = proto == icmp || !first_fragment;
            // A transport header cut short, which the stack drops.
            let cut = transport
                && !more_fragments
                && bytes.len() < l4 + if proto == PROTO_TCP { 14 } else { 4 };
            assert!(not_ours || cut, "a packet left unjudged");
        }
    }
});
