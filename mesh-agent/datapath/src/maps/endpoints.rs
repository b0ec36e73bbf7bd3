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

impl PinnedMaps {
    /// Every workload address the kernel knows.
    pub fn endpoints(&self) -> Result<Vec<(IpKey, Endpoint)>, MapsError> {
        self.entries(map_names::ENDPOINTS)
    }

    /// Network-namespace cookie → identity of the local workload in it.
    pub fn local_netns(&self) -> Result<Vec<(u64, u64)>, MapsError> {
        self.entries(map_names::LOCAL_NETNS)
    }

    /// The endpoint owning an address.
    pub fn endpoint(&self, key: &IpKey) -> Result<Option<Endpoint>, MapsError> {
        self.lookup(map_names::ENDPOINTS, key)
    }
}
