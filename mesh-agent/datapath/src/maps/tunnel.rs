//! `REDIRECTS` (where a steered socket was going, by socket cookie) and
//! `TUNNEL_ORIG` (the same, keyed as the agent accepts the connection):
//! connections carried in mutual TLS between nodes.
use aya::maps::{HashMap, MapData, MapType};
use mesh_common::{
    map_names,
    policy::{OrigDst, TunnelKey},
};

use super::{MapLayout, MapsError, PinnedMaps, layout};

pub const REDIRECTS: (&str, MapLayout) = (
    map_names::REDIRECTS,
    layout::<u64, OrigDst>(MapType::LruHash),
);
pub const TUNNEL_ORIG: (&str, MapLayout) = (
    map_names::TUNNEL_ORIG,
    layout::<TunnelKey, OrigDst>(MapType::LruHash),
);

impl PinnedMaps {
    /// Where steered connections were going, keyed as the agent accepts them.
    pub fn tunnel_orig(&self) -> Result<HashMap<MapData, TunnelKey, OrigDst>, MapsError> {
        self.hash(map_names::TUNNEL_ORIG)
    }
}
