//! `CONNTRACK` (the verdicts of flows from other nodes), `OUTBOUND_FLOWS`
//! (flows this node's workloads opened) and `UDP_PEERS` (the peers of
//! connected UDP sockets).
use aya::maps::{MapData, MapType};
use mesh_common::{
    map_names,
    policy::{FLOW_OUTBOUND, FlowKey, FlowState, UdpPeerKey},
};

use super::{MapLayout, MapsError, PinnedMaps, layout};

pub const CONNTRACK: (&str, MapLayout) = (
    map_names::CONNTRACK,
    layout::<FlowKey, FlowState>(MapType::LruHash),
);
pub const OUTBOUND_FLOWS: (&str, MapLayout) = (
    map_names::OUTBOUND_FLOWS,
    layout::<FlowKey, FlowState>(MapType::LruHash),
);
pub const UDP_PEERS: (&str, MapLayout) = (
    map_names::UDP_PEERS,
    layout::<UdpPeerKey, u32>(MapType::LruHash),
);

impl PinnedMaps {
    /// The flows the tc programs have seen: inbound verdicts, then the
    /// outbound records (flagged `FLOW_OUTBOUND`).
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, FlowState)>, MapsError> {
        let mut flows = self.flows(map_names::CONNTRACK)?;
        flows.extend(self.outbound_flows()?);
        Ok(flows)
    }

    /// The flows this node's workloads opened towards other nodes.
    pub fn outbound_flows(&self) -> Result<Vec<(FlowKey, FlowState)>, MapsError> {
        self.flows(map_names::OUTBOUND_FLOWS)
    }

    /// Copies the outbound records an agent from before `OUTBOUND_FLOWS`
    /// kept in `CONNTRACK`, so that the replies of flows opened before the
    /// upgrade keep passing. Returns how many.
    pub fn adopt_outbound_flows(&self) -> Result<usize, MapsError> {
        let name = map_names::OUTBOUND_FLOWS;
        let mut outbound: aya::maps::HashMap<MapData, FlowKey, FlowState> =
            self.map(name)?.try_into().map_err(self.err(name))?;
        let mut adopted = 0;
        for (key, state) in self.flows(map_names::CONNTRACK)? {
            if state.flags & FLOW_OUTBOUND != 0 {
                outbound.insert(key, state, 0).map_err(self.err(name))?;
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    pub(super) fn flows(&self, name: &'static str) -> Result<Vec<(FlowKey, FlowState)>, MapsError> {
        let map: aya::maps::HashMap<MapData, FlowKey, FlowState> =
            self.map(name)?.try_into().map_err(self.err(name))?;
        // Entries can be evicted while we walk the LRU: skip the ones that vanish.
        Ok(map.iter().filter_map(Result::ok).collect())
    }
}
