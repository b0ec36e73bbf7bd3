//! `SERVICES` (the Service addresses the connect hooks translate),
//! `SERVICE_BACKENDS` (each revision's backend slots) and `SERVICE_PEERS`
//! (the Service address each socket dialled, for getpeername and UDP
//! replies), and `SERVICE_RANGES` (the cluster's Service ranges, where an
//! address that is no known Service is refused).
use std::net::IpAddr;

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
use crate::cidr::Cidr;

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

/// The trie key of a Service range: IPv4 ranges as IPv4-mapped prefixes,
/// as the kernel programs hold every address.
fn range_key(range: &Cidr) -> Key<[u32; 4]> {
    let prefix = match range.address {
        IpAddr::V4(_) => 96 + u32::from(range.prefix),
        IpAddr::V6(_) => u32::from(range.prefix),
    };
    Key::new(prefix, IpKey::from(range.address).ip)
}

impl PinnedMaps {
    /// Makes `SERVICE_RANGES` hold exactly `ranges`: added first, then
    /// the ones no longer configured removed, so a restart with the same
    /// ranges never leaves a moment without them.
    pub fn set_service_ranges(&self, ranges: &[Cidr]) -> Result<(), MapsError> {
        let name = map_names::SERVICE_RANGES;
        let mut trie: LpmTrie<MapData, [u32; 4], u32> =
            self.map(name)?.try_into().map_err(self.err(name))?;
        let wanted: Vec<_> = ranges.iter().map(range_key).collect();
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
    fn service_ranges_map_ipv4_into_ipv6() {
        let v4: Cidr = "10.96.0.0/12".parse().unwrap();
        assert_eq!(range_key(&v4).prefix_len(), 108);
        let v6: Cidr = "fd00:96::/108".parse().unwrap();
        assert_eq!(range_key(&v6).prefix_len(), 108);
    }
}
