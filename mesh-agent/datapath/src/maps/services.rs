//! `SERVICES` (the Service addresses the connect hooks translate),
//! `SERVICE_BACKENDS` (each revision's backend slots) and `SERVICE_PEERS`
//! (the Service address each socket dialled, for getpeername and UDP
//! replies), and `SERVICE_RANGES` (the cluster's Service ranges, where an
//! address that is no known Service is refused).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{
    MapData, MapType,
    lpm_trie::{Key, LpmTrie},
};
use mesh_common::{
    map_names,
    policy::IpKey,
    service::{
        Affinity, AffinityKey, BackendKey, MemberKey, ServiceEntry, ServiceKey, ServicePeerKey,
        SockAddr,
    },
};

use super::{MapLayout, MapsError, PinnedMaps, layout};

pub const SERVICES: (&str, MapLayout) = (
    map_names::SERVICES,
    layout::<ServiceKey, ServiceEntry>(MapType::Hash),
);
pub const SERVICE_BACKENDS: (&str, MapLayout) = (
    map_names::SERVICE_BACKENDS,
    layout::<BackendKey, SockAddr>(MapType::Hash),
);
pub const SERVICE_PEERS: (&str, MapLayout) = (
    map_names::SERVICE_PEERS,
    layout::<ServicePeerKey, SockAddr>(MapType::LruHash),
);

pub const SERVICE_AFFINITY: (&str, MapLayout) = (
    map_names::SERVICE_AFFINITY,
    layout::<AffinityKey, Affinity>(MapType::LruHash),
);
pub const SERVICE_MEMBERS: (&str, MapLayout) = (
    map_names::SERVICE_MEMBERS,
    layout::<MemberKey, u32>(MapType::Hash),
);

impl PinnedMaps {
    /// The backends of Services with session affinity.
    pub fn service_members(&self) -> Result<Vec<(MemberKey, u32)>, MapsError> {
        self.entries(map_names::SERVICE_MEMBERS)
    }

    /// Every Service address the kernel translates.
    pub fn services(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>, MapsError> {
        self.entries(map_names::SERVICES)
    }

    /// Which backend each socket that dialled a Service address was sent
    /// to, and that address.
    pub fn service_peers(&self) -> Result<Vec<(ServicePeerKey, SockAddr)>, MapsError> {
        self.entries(map_names::SERVICE_PEERS)
    }

    /// Every backend slot, of every revision present.
    pub fn service_backends(&self) -> Result<Vec<(BackendKey, SockAddr)>, MapsError> {
        self.entries(map_names::SERVICE_BACKENDS)
    }
}

/// `SERVICE_RANGES`: LPM trie keyed by 128-bit prefixes (IPv4 ones mapped).
pub const SERVICE_RANGES: (&str, MapLayout) = (
    map_names::SERVICE_RANGES,
    layout::<aya::maps::lpm_trie::Key<[u32; 4]>, u32>(MapType::LpmTrie),
);

/// A Service range (`--service-cidr`): `address/prefix`, IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceCidr {
    pub address: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for ServiceCidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (address, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix)"))?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} in {s:?} is not an IP address"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{prefix:?} in {s:?} is not a prefix length (0-{max})"))?;
        let cidr = Self { address, prefix };
        if cidr.network() != address {
            return Err(format!(
                "{s:?} has host bits set (the range is {}/{prefix})",
                cidr.network()
            ));
        }
        Ok(cidr)
    }
}

impl std::fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl ServiceCidr {
    /// The address with every host bit cleared.
    fn network(&self) -> IpAddr {
        match self.address {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    /// The trie key: IPv4 ranges as IPv4-mapped prefixes, as the kernel
    /// programs hold every address.
    fn key(&self) -> Key<[u32; 4]> {
        let prefix = match self.address {
            IpAddr::V4(_) => 96 + u32::from(self.prefix),
            IpAddr::V6(_) => u32::from(self.prefix),
        };
        Key::new(prefix, IpKey::from(self.address).ip)
    }
}

impl PinnedMaps {
    /// Makes `SERVICE_RANGES` hold exactly `ranges`: added first, then
    /// the ones no longer configured removed, so a restart with the same
    /// ranges never leaves a moment without them.
    pub fn set_service_ranges(&self, ranges: &[ServiceCidr]) -> Result<(), MapsError> {
        let name = map_names::SERVICE_RANGES;
        let mut trie: LpmTrie<MapData, [u32; 4], u32> =
            self.map(name)?.try_into().map_err(self.err(name))?;
        let wanted: Vec<_> = ranges.iter().map(ServiceCidr::key).collect();
        for key in &wanted {
            trie.insert(key, 1, 0).map_err(self.err(name))?;
        }
        let present: Vec<Key<[u32; 4]>> = trie
            .keys()
            .collect::<Result<_, _>>()
            .map_err(self.err(name))?;
        for key in present {
            let kept = wanted
                .iter()
                .any(|w| w.prefix_len() == key.prefix_len() && w.data() == key.data());
            if !kept {
                trie.remove(&key).map_err(self.err(name))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ranges_parse_and_map_ipv4_into_ipv6() {
        let v4: ServiceCidr = "10.96.0.0/12".parse().unwrap();
        assert_eq!(v4.to_string(), "10.96.0.0/12");
        assert_eq!(v4.key().prefix_len(), 108);
        let v6: ServiceCidr = "fd00:96::/108".parse().unwrap();
        assert_eq!(v6.key().prefix_len(), 108);
        for bad in [
            "10.96.0.1/12",
            "10.96.0.0",
            "10.96.0.0/33",
            "x/8",
            "fd00::/129",
        ] {
            assert!(bad.parse::<ServiceCidr>().is_err(), "{bad}");
        }
        assert!("0.0.0.0/0".parse::<ServiceCidr>().is_ok());
    }
}
