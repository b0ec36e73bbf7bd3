//! Typed access to the pinned maps, for the agent and for the operator
//! commands (which read the pins directly, so they work with the agent down).
//!
//! One module per map (or pair of maps that work together): its name and
//! layout, and the typed reads and writes of [`PinnedMaps`] on it. This
//! module keeps what they share: opening pins, the errors, layouts, fill.
mod conntrack;
mod counters;
mod endpoints;
mod flows;
mod policy;
mod services;
mod settings;
mod sockets;
mod tunnel;

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapInfo, MapType};
use mesh_common::{
    map_names,
    policy::{Endpoint, IpKey, PolicyKey, Verdict},
    service::{BackendKey, MemberKey, ServiceEntry, ServiceKey, SockAddr},
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("no mesh maps are pinned under {dir} (is the agent running with --bpffs {dir}?)")]
    NotInstalled { dir: PathBuf },
    #[error("map {name} under {dir}")]
    Map {
        name: &'static str,
        dir: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {name} under {dir} has layout {found} but this agent expects {expected}; \
         it was created by an incompatible agent version. Refusing to reuse it \
         (remove the pins to start afresh, which drops the kernel state)"
    )]
    Layout {
        name: &'static str,
        dir: PathBuf,
        found: MapLayout,
        expected: MapLayout,
    },
}

/// What a map looks like to the kernel: enough to tell whether a pinned map
/// can be reused by the programs in this agent's object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapLayout {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} key {} B value {} B",
            self.map_type, self.key_size, self.value_size
        )
    }
}

/// The layout of a map with keys `K` and values `V`.
const fn layout<K, V>(map_type: MapType) -> MapLayout {
    MapLayout {
        map_type,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
    }
}

/// The maps this agent's kernel programs use, with their layouts, from the
/// module of each.
pub const EXPECTED_MAPS: [(&str, MapLayout); 22] = [
    sockets::SOCK_HASH,
    sockets::SOCKETS,
    sockets::SOCKET_INBOX,
    counters::COUNTERS,
    settings::SETTINGS,
    endpoints::ENDPOINTS,
    endpoints::LOCAL_NETNS,
    endpoints::WORKLOAD_INTERFACES,
    policy::POLICY,
    conntrack::CONNTRACK,
    conntrack::OUTBOUND_FLOWS,
    conntrack::UDP_PEERS,
    tunnel::REDIRECTS,
    tunnel::TUNNEL_ORIG,
    services::SERVICES,
    services::SERVICE_BACKENDS,
    services::SERVICE_PEERS,
    services::SERVICE_RANGES,
    services::SERVICE_AFFINITY,
    services::SERVICE_MEMBERS,
    flows::FLOWS,
    flows::FLOW_SOURCES,
];

/// How full a map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MapFill {
    pub entries: u32,
    pub max_entries: u32,
}

/// Handles on the maps pinned under one directory.
#[derive(Debug)]
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    /// Opens the pins under `dir`; fails clearly when nothing is installed there.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        if !dir.join(map_names::SOCK_HASH).exists() {
            return Err(MapsError::NotInstalled {
                dir: dir.to_owned(),
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn err(&self, name: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError + '_ {
        move |source| MapsError::Map {
            name,
            dir: self.dir.clone(),
            source,
        }
    }

    fn map(&self, name: &'static str) -> Result<Map, MapsError> {
        let data = MapData::from_pin(self.dir.join(name)).map_err(self.err(name))?;
        Map::from_map_data(data).map_err(self.err(name))
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<MapData, K, V>, MapsError> {
        self.map(name)?.try_into().map_err(self.err(name))
    }

    fn entries<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<Vec<(K, V)>, MapsError> {
        self.hash::<K, V>(name)?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err(name))
    }

    /// One entry of a hash map, looked up as the kernel programs do.
    fn lookup<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        key: &K,
    ) -> Result<Option<V>, MapsError> {
        match self.hash::<K, V>(name)?.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(self.err(name)(e)),
        }
    }

    /// Writable handles on the maps the control loop keeps in step.
    pub fn policy_maps(&self) -> Result<PolicyMaps, MapsError> {
        Ok(PolicyMaps {
            endpoints: self.hash(map_names::ENDPOINTS)?,
            local_netns: self.hash(map_names::LOCAL_NETNS)?,
            policy: self.hash(map_names::POLICY)?,
            services: self.hash(map_names::SERVICES)?,
            service_backends: self.hash(map_names::SERVICE_BACKENDS)?,
            service_members: self.hash(map_names::SERVICE_MEMBERS)?,
        })
    }

    /// Entries in use and capacity of every map with entries to count.
    pub fn fill(&self) -> Result<Vec<(&'static str, MapFill)>, MapsError> {
        let counts = [
            (map_names::SOCK_HASH, self.sockhash_keys()?.len()),
            (map_names::SOCKETS, self.sockets()?.len()),
            (map_names::ENDPOINTS, self.endpoints()?.len()),
            (map_names::LOCAL_NETNS, self.local_netns()?.len()),
            (map_names::POLICY, self.policy()?.len()),
            (
                map_names::CONNTRACK,
                self.flows(map_names::CONNTRACK)?.len(),
            ),
            (map_names::OUTBOUND_FLOWS, self.outbound_flows()?.len()),
            (map_names::SERVICES, self.services()?.len()),
            (map_names::SERVICE_BACKENDS, self.service_backends()?.len()),
        ];
        counts
            .into_iter()
            .map(|(name, entries)| {
                let info = MapInfo::from_pin(self.dir.join(name)).map_err(self.err(name))?;
                Ok((
                    name,
                    MapFill {
                        entries: entries as u32,
                        max_entries: info.max_entries(),
                    },
                ))
            })
            .collect()
    }

    /// Capacity of a map.
    pub fn max_entries(&self, name: &'static str) -> Result<u32, MapsError> {
        let info = MapInfo::from_pin(self.dir.join(name)).map_err(self.err(name))?;
        Ok(info.max_entries())
    }
}

/// The maps the control loop writes.
pub struct PolicyMaps {
    pub endpoints: HashMap<MapData, IpKey, Endpoint>,
    pub local_netns: HashMap<MapData, u64, u64>,
    pub policy: HashMap<MapData, PolicyKey, Verdict>,
    pub services: HashMap<MapData, ServiceKey, ServiceEntry>,
    pub service_backends: HashMap<MapData, BackendKey, SockAddr>,
    pub service_members: HashMap<MapData, MemberKey, u32>,
}
