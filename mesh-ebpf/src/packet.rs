//! Just enough header parsing for the tc programs: the flow of an IPv4 or
//! IPv6 TCP/UDP packet. Headers are read relative to the network header
//! (`bpf_skb_load_bytes_relative`, which bounds-checks for us) and the IP
//! version comes from `skb->protocol`, so the same code reads packets
//! behind an Ethernet header and packets of L3 devices, which have none
//! (`tunl0`, `wg0`, the decapsulated side of an overlay).

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_skb_load_bytes_relative, programs::TcContext,
};
use mesh_common::{
    ipv4_mapped,
    policy::{FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: u32 = 40;
/// `bpf_skb_load_bytes_relative`: offsets count from the network header.
const BPF_HDR_START_NET: u32 = 1;
/// TCP flags byte: SYN set, ACK clear is the first packet of a connection.
const TCP_FLAGS_OFFSET: u32 = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_HLEN: u32 = 20;
const UDP_HLEN: u32 = 8;
/// IPv4 flags and fragment offset: more fragments follow; the offset.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

pub enum Parsed {
    /// A TCP or UDP packet (the first fragment, for IPv4).
    Flow { key: FlowKey, syn: bool },
    /// An IP packet this program cannot see the ports of (other protocols,
    /// IPv6 extension headers, an IPv4 first fragment cut inside its TCP or
    /// UDP header): only its destination is known.
    Opaque { dst_ip: [u32; 4] },
    /// Not IP, ICMP, or a non-first IPv4 fragment (which carries no ports
    /// and is useless without the first one): never ours to judge.
    Ignore,
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    match try_parse(ctx) {
        Ok(p) => p,
        // A packet too short to hold the headers it claims: let the stack
        // drop it.
        Err(()) => Parsed::Ignore,
    }
}

/// A `T` at `offset` bytes from the network header.
#[inline(always)]
fn load<T>(ctx: &TcContext, offset: u32) -> Result<T, ()> {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes exactly `size_of::<T>()` bytes into `value`
    // or fails; `T` is a plain integer or array of them, valid for any
    // bytes.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            offset,
            value.as_mut_ptr().cast(),
            core::mem::size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    if ret == 0 {
        // SAFETY: the helper succeeded, so every byte was written.
        Ok(unsafe { value.assume_init() })
    } else {
        Err(())
    }
}

#[inline(always)]
fn try_parse(ctx: &TcContext) -> Result<Parsed, ()> {
    // `skb->protocol` holds the EtherType in network byte order.
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let (src_ip, dst_ip, proto, l4) = match ethertype {
        ETH_P_IP => {
            let ver_ihl: u8 = load(ctx, 0)?;
            let total_len = u16::from_be(load::<u16>(ctx, 2)?);
            let frag = u16::from_be(load::<u16>(ctx, 6)?);
            let proto: u8 = load(ctx, 9)?;
            let src: u32 = load(ctx, 12)?;
            let dst: u32 = load(ctx, 16)?;
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
            let tiny = u32::from(total_len) < l4 + l4_header
                || load::<u8>(ctx, l4 + l4_header - 1).is_err();
            if frag & IP_MF != 0 && tiny {
                return Ok(Parsed::Opaque {
                    dst_ip: ipv4_mapped(dst),
                });
            }
            (ipv4_mapped(src), ipv4_mapped(dst), proto, l4)
        }
        ETH_P_IPV6 => {
            let proto: u8 = load(ctx, 6)?;
            let src: [u32; 4] = load(ctx, 8)?;
            let dst: [u32; 4] = load(ctx, 24)?;
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
    let src_port = u16::from_be(load::<u16>(ctx, l4)?);
    let dst_port = u16::from_be(load::<u16>(ctx, l4 + 2)?);
    let syn = proto == PROTO_TCP && {
        let flags: u8 = load(ctx, l4 + TCP_FLAGS_OFFSET)?;
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
