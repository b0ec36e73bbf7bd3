//! `ENDPOINTS` (who owns each workload address) and `LOCAL_NETNS` (which
//! local workload a network namespace holds): the identities policy is
//! decided on.
use aya::maps::MapType;
use mesh_common::{
    map_names,
    policy::{Endpoint, IpKey},
};

use super::{MapLayout, MapsError, PinnedMaps, layout};

pub const ENDPOINTS: (&str, MapLayout) = (
    map_names::ENDPOINTS,
    layout::<IpKey, Endpoint>(MapType::Hash),
);
pub const LOCAL_NETNS: (&str, MapLayout) =
    (map_names::LOCAL_NETNS, layout::<u64, u64>(MapType::Hash));
pub const WORKLOAD_INTERFACES: (&str, MapLayout) = (
    map_names::WORKLOAD_INTERFACES,
    layout::<u32, u64>(MapType::Hash),
);

impl PinnedMaps {
    /// Every workload address the kernel knows.
    pub fn endpoints(&self) -> Result<Vec<(IpKey, Endpoint)>, MapsError> {
        self.entries(map_names::ENDPOINTS)
    }

    /// Network-namespace cookie → identity of the local workload in it.
    pub fn local_netns(&self) -> Result<Vec<(u64, u64)>, MapsError> {
        self.entries(map_names::LOCAL_NETNS)
    }

    /// Interface index (the node's side of a local workload's interface)
    /// → identity of the workload behind it.
    pub fn workload_interfaces(&self) -> Result<Vec<(u32, u64)>, MapsError> {
        self.entries(map_names::WORKLOAD_INTERFACES)
    }

    /// Makes `WORKLOAD_INTERFACES` hold exactly `desired`: new and changed
    /// entries first, then the ones gone.
    pub fn set_workload_interfaces(
        &self,
        desired: &std::collections::BTreeMap<u32, u64>,
    ) -> Result<(), MapsError> {
        let name = map_names::WORKLOAD_INTERFACES;
        let mut map = self.hash::<u32, u64>(name)?;
        let current: std::collections::BTreeMap<u32, u64> =
            map.iter().filter_map(Result::ok).collect();
        for (ifindex, identity) in desired {
            if current.get(ifindex) != Some(identity) {
                map.insert(ifindex, identity, 0).map_err(self.err(name))?;
            }
        }
        for ifindex in current.keys().filter(|i| !desired.contains_key(i)) {
            map.remove(ifindex).map_err(self.err(name))?;
        }
        Ok(())
    }

    /// The endpoint owning an address.
    pub fn endpoint(&self, key: &IpKey) -> Result<Option<Endpoint>, MapsError> {
        self.lookup(map_names::ENDPOINTS, key)
    }
}
