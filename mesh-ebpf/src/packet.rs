//! The tc programs' view of a packet for `mesh_common::packet::parse`: its
//! bytes read with `bpf_skb_load_bytes_relative` from the network header
//! (the helper bounds-checks for us), its IP version from `skb->protocol`.

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_skb_load_bytes_relative, programs::TcContext,
};
use mesh_common::packet::PacketBytes;
pub use mesh_common::packet::Parsed;

/// `bpf_skb_load_bytes_relative`: offsets count from the network header.
const BPF_HDR_START_NET: u32 = 1;

struct Skb<'a>(&'a TcContext);

impl PacketBytes for Skb<'_> {
    #[inline(always)]
    fn ethertype(&self) -> u16 {
        // `skb->protocol` holds the EtherType in network byte order.
        u16::from_be(self.0.skb.protocol() as u16)
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: u32) -> Result<[u8; N], ()> {
        let mut bytes = [0u8; N];
        // SAFETY: the helper writes at most `N` bytes into `bytes`, which
        // has room for them, and fails when the packet is shorter.
        let ret = unsafe {
            bpf_skb_load_bytes_relative(
                self.0.as_ptr(),
                offset,
                bytes.as_mut_ptr().cast(),
                N as u32,
                BPF_HDR_START_NET,
            )
        };
        if ret == 0 { Ok(bytes) } else { Err(()) }
    }
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    mesh_common::packet::parse(&Skb(ctx))
}
