//! The map types as user space shows them: addresses as `IpAddr`, keys in
//! the notation of the operator commands. Not built into the kernel object.
use core::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use crate::{
    SocketKey, ipv4_mapped,
    policy::{FlowKey, IpKey},
};

/// An address as the maps key it: IPv4 as `::ffff:a.b.c.d`, every word in
/// network byte order.
impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self {
                ip: ipv4_mapped(u32::from_ne_bytes(v4.octets())),
            },
            IpAddr::V6(v6) => Self {
                ip: words(v6.octets()),
            },
        }
    }
}

/// The inverse: IPv4-mapped addresses come back as IPv4.
impl From<IpKey> for IpAddr {
    fn from(key: IpKey) -> Self {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(key.ip) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ipv6Addr::from(octets).to_canonical()
    }
}

fn words(octets: [u8; 16]) -> [u32; 4] {
    let mut ip = [0u32; 4];
    for (word, chunk) in ip.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    ip
}

fn addr(words: [u32; 4], port: u16) -> SocketAddr {
    SocketAddr::new(IpKey { ip: words }.into(), port)
}

impl fmt::Display for IpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        IpAddr::from(*self).fmt(f)
    }
}

impl SocketKey {
    pub fn local(&self) -> SocketAddr {
        addr(self.local_ip, self.local_port)
    }

    pub fn remote(&self) -> SocketAddr {
        addr(self.remote_ip, self.remote_port)
    }
}

/// `local -> remote`.
impl fmt::Display for SocketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.local(), self.remote())
    }
}

impl FlowKey {
    pub fn src(&self) -> SocketAddr {
        addr(self.src_ip, self.src_port)
    }

    pub fn dst(&self) -> SocketAddr {
        addr(self.dst_ip, self.dst_port)
    }
}

/// `src -> dst/proto`, the protocol by its IANA number.
impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}/{}", self.src(), self.dst(), self.proto)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, string::ToString as _};

    use super::*;

    #[test]
    fn addresses_round_trip_through_their_keys() {
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        let key = IpKey::from(v4);
        assert_eq!(key.ip, ipv4_mapped(u32::from_ne_bytes([198, 18, 0, 1])));
        assert_eq!(IpAddr::from(key), v4);
        let v6: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(IpAddr::from(IpKey::from(v6)), v6);
        // An IPv4-mapped IPv6 address is the IPv4 address, as in the kernel.
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert_eq!(IpAddr::from(IpKey::from(mapped)), v4);
        assert_eq!(IpKey::from(v6).to_string(), "fd00::2");
        // The words as the kernel writes them: network byte order.
        let words = [u32::from_be(0xfd00_0000), 0, 0, u32::from_be(2)];
        assert_eq!(IpKey { ip: words }.to_string(), "fd00::2");
    }

    #[test]
    fn keys_show_as_addresses() {
        let ip = |s: &str| IpKey::from(s.parse::<IpAddr>().unwrap()).ip;
        let socket = SocketKey {
            local_ip: ip("10.0.0.1"),
            remote_ip: ip("10.0.0.2"),
            local_port: 8080,
            remote_port: 40000,
            _pad: 0,
            netns: 0,
        };
        assert_eq!(format!("{socket}"), "10.0.0.1:8080 -> 10.0.0.2:40000");
        let flow = FlowKey {
            src_ip: ip("fd00::1"),
            dst_ip: ip("fd00::2"),
            src_port: 1234,
            dst_port: 53,
            proto: 17,
            _pad: [0; 3],
        };
        assert_eq!(format!("{flow}"), "[fd00::1]:1234 -> [fd00::2]:53/17");
    }
}
