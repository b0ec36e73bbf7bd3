//! `CONNTRACK` (the verdicts of flows the tc programs have seen) and
//! `UDP_PEERS` (the peers of connected UDP sockets).
use aya::maps::{MapData, MapType};
use mesh_common::{
    map_names,
    policy::{FlowKey, FlowState, UdpPeerKey},
};

use super::{MapLayout, MapsError, PinnedMaps, layout};

pub const CONNTRACK: (&str, MapLayout) = (
    map_names::CONNTRACK,
    layout::<FlowKey, FlowState>(MapType::LruHash),
);
pub const UDP_PEERS: (&str, MapLayout) = (
    map_names::UDP_PEERS,
    layout::<UdpPeerKey, u32>(MapType::LruHash),
);

impl PinnedMaps {
    /// The flows the tc programs have seen.
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, FlowState)>, MapsError> {
        let name = map_names::CONNTRACK;
        let map: aya::maps::HashMap<MapData, FlowKey, FlowState> =
            self.map(name)?.try_into().map_err(self.err(name))?;
        // Entries can be evicted while we walk the LRU: skip the ones that vanish.
        Ok(map.iter().filter_map(Result::ok).collect())
    }
}
