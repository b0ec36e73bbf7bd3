//! `SOCK_HASH` (the sockhash sk_msg redirects through) and `SOCKETS` (what
//! the kernel keeps about each tracked socket): the same-node short-circuit.
use aya::maps::{HashMap, MapData, MapType, SockHash};
use mesh_common::{Inbox, SocketInfo, SocketKey, map_names};

use super::{MapLayout, MapsError, PinnedMaps, layout};

pub const SOCK_HASH: (&str, MapLayout) = (
    map_names::SOCK_HASH,
    layout::<SocketKey, u32>(MapType::SockHash),
);
pub const SOCKETS: (&str, MapLayout) = (
    map_names::SOCKETS,
    layout::<SocketKey, SocketInfo>(MapType::Hash),
);
pub const SOCKET_INBOX: (&str, MapLayout) =
    (map_names::SOCKET_INBOX, layout::<u64, Inbox>(MapType::Hash));

impl PinnedMaps {
    /// The tracked sockets with what the kernel keeps about each.
    pub fn sockets(&self) -> Result<Vec<(SocketKey, SocketInfo)>, MapsError> {
        let name = map_names::SOCKETS;
        let map: HashMap<MapData, SocketKey, SocketInfo> =
            self.map(name)?.try_into().map_err(self.err(name))?;
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err(name))
    }

    /// The keys of the sockhash itself (what sk_msg can redirect to).
    pub fn sockhash_keys(&self) -> Result<Vec<SocketKey>, MapsError> {
        let name = map_names::SOCK_HASH;
        let map: SockHash<MapData, SocketKey> =
            self.map(name)?.try_into().map_err(self.err(name))?;
        map.keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err(name))
    }
}
