//! `SERVICES` (the Service addresses the connect hooks translate),
//! `SERVICE_BACKENDS` (each revision's backend slots) and `SERVICE_PEERS`
//! (the Service address each socket dialled, for getpeername and UDP
//! replies).
use aya::maps::MapType;
use mesh_common::{
    map_names,
    service::{BackendKey, ServiceEntry, ServiceKey, ServicePeerKey, SockAddr},
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

impl PinnedMaps {
    /// Every Service address the kernel translates.
    pub fn services(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>, MapsError> {
        self.entries(map_names::SERVICES)
    }

    /// Every backend slot, of every revision present.
    pub fn service_backends(&self) -> Result<Vec<(BackendKey, SockAddr)>, MapsError> {
        self.entries(map_names::SERVICE_BACKENDS)
    }
}
