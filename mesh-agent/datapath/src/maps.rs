//! Typed access to the pinned maps, for the agent and for the operator
//! commands (which read the pins directly, so they work with the agent down).
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapInfo, MapType, PerCpuArray, SockHash};
use mesh_common::{
    Counter, SHORT_CIRCUIT_OFF, SHORT_CIRCUIT_ON, Setting, SocketInfo, SocketKey, map_names,
    policy::{
        Endpoint, FlowKey, FlowState, IpKey, OrigDst, PolicyKey, TunnelKey, UdpPeerKey, Verdict,
    },
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

/// The maps this agent's kernel programs use, with their layouts.
pub const EXPECTED_MAPS: [(&str, MapLayout); 12] = [
    (
        map_names::SOCK_HASH,
        layout::<SocketKey, u32>(MapType::SockHash),
    ),
    (
        map_names::SOCKETS,
        layout::<SocketKey, SocketInfo>(MapType::Hash),
    ),
    (
        map_names::COUNTERS,
        layout::<u32, u64>(MapType::PerCpuArray),
    ),
    (map_names::SETTINGS, layout::<u32, u32>(MapType::Array)),
    (
        map_names::ENDPOINTS,
        layout::<IpKey, Endpoint>(MapType::Hash),
    ),
    (map_names::LOCAL_NETNS, layout::<u64, u64>(MapType::Hash)),
    (
        map_names::POLICY,
        layout::<PolicyKey, Verdict>(MapType::Hash),
    ),
    (
        map_names::CONNTRACK,
        layout::<FlowKey, FlowState>(MapType::LruHash),
    ),
    (
        map_names::UDP_PEERS,
        layout::<UdpPeerKey, u32>(MapType::LruHash),
    ),
    (
        map_names::REDIRECTS,
        layout::<u64, OrigDst>(MapType::LruHash),
    ),
    (
        map_names::TUNNEL_ORIG,
        layout::<TunnelKey, OrigDst>(MapType::LruHash),
    ),
    // A ring buffer has neither keys nor values.
    (map_names::FLOWS, layout::<(), ()>(MapType::RingBuf)),
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

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapsError> {
        let name = map_names::COUNTERS;
        let map: PerCpuArray<MapData, u64> = self.map(name)?.try_into().map_err(self.err(name))?;
        Counter::ALL
            .iter()
            .map(|&counter| {
                let per_cpu = map.get(&(counter as u32), 0).map_err(self.err(name))?;
                Ok((counter, per_cpu.iter().sum()))
            })
            .collect()
    }

    fn settings(&self) -> Result<Array<MapData, u32>, MapsError> {
        let name = map_names::SETTINGS;
        self.map(name)?.try_into().map_err(self.err(name))
    }

    pub fn short_circuit(&self) -> Result<bool, MapsError> {
        let value = self
            .settings()?
            .get(&(Setting::ShortCircuit as u32), 0)
            .map_err(self.err(map_names::SETTINGS))?;
        Ok(value == SHORT_CIRCUIT_ON)
    }

    pub fn set_short_circuit(&self, on: bool) -> Result<(), MapsError> {
        let value = if on {
            SHORT_CIRCUIT_ON
        } else {
            SHORT_CIRCUIT_OFF
        };
        self.settings()?
            .set(Setting::ShortCircuit as u32, value, 0)
            .map_err(self.err(map_names::SETTINGS))
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

    /// Every workload address the kernel knows.
    pub fn endpoints(&self) -> Result<Vec<(IpKey, Endpoint)>, MapsError> {
        self.entries(map_names::ENDPOINTS)
    }

    /// Network-namespace cookie → identity of the local workload in it.
    pub fn local_netns(&self) -> Result<Vec<(u64, u64)>, MapsError> {
        self.entries(map_names::LOCAL_NETNS)
    }

    /// The compiled policy entries.
    pub fn policy(&self) -> Result<Vec<(PolicyKey, Verdict)>, MapsError> {
        self.entries(map_names::POLICY)
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

    /// One policy entry.
    pub fn policy_entry(&self, key: &PolicyKey) -> Result<Option<Verdict>, MapsError> {
        self.lookup(map_names::POLICY, key)
    }

    /// The endpoint owning an address.
    pub fn endpoint(&self, key: &IpKey) -> Result<Option<Endpoint>, MapsError> {
        self.lookup(map_names::ENDPOINTS, key)
    }

    /// The flows the tc programs have seen.
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, FlowState)>, MapsError> {
        let name = map_names::CONNTRACK;
        let map: aya::maps::HashMap<MapData, FlowKey, FlowState> =
            self.map(name)?.try_into().map_err(self.err(name))?;
        // Entries can be evicted while we walk the LRU: skip the ones that vanish.
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Writable handles on the maps the control loop keeps in step.
    pub fn policy_maps(&self) -> Result<PolicyMaps, MapsError> {
        Ok(PolicyMaps {
            endpoints: self.hash(map_names::ENDPOINTS)?,
            local_netns: self.hash(map_names::LOCAL_NETNS)?,
            policy: self.hash(map_names::POLICY)?,
        })
    }

    pub fn policy_generation(&self) -> Result<u32, MapsError> {
        self.settings()?
            .get(&(Setting::PolicyGeneration as u32), 0)
            .map_err(self.err(map_names::SETTINGS))
    }

    /// Tells the kernel programs that policy changed: cached verdicts of an
    /// older generation are checked again.
    pub fn bump_policy_generation(&self) -> Result<u32, MapsError> {
        let next = self.policy_generation()?.wrapping_add(1);
        self.settings()?
            .set(Setting::PolicyGeneration as u32, next, 0)
            .map_err(self.err(map_names::SETTINGS))?;
        Ok(next)
    }

    /// The agent's outbound listener port when mTLS is on, 0 when off.
    pub fn tunnel_port(&self) -> Result<u16, MapsError> {
        self.settings()?
            .get(&(Setting::TunnelPort as u32), 0)
            .map(|v| v as u16)
            .map_err(self.err(map_names::SETTINGS))
    }

    /// Turns steering to the agent on (its listener port) or off (0).
    pub fn set_tunnel_port(&self, port: u16) -> Result<(), MapsError> {
        self.settings()?
            .set(Setting::TunnelPort as u32, u32::from(port), 0)
            .map_err(self.err(map_names::SETTINGS))
    }

    /// Where steered connections were going, keyed as the agent accepts them.
    pub fn tunnel_orig(&self) -> Result<HashMap<MapData, TunnelKey, OrigDst>, MapsError> {
        self.hash(map_names::TUNNEL_ORIG)
    }

    /// Records the layout of the maps the installed programs use.
    pub fn set_layout_version(&self, version: u32) -> Result<(), MapsError> {
        self.settings()?
            .set(Setting::LayoutVersion as u32, version, 0)
            .map_err(self.err(map_names::SETTINGS))
    }

    pub fn set_revoke_established(&self, on: bool) -> Result<(), MapsError> {
        self.settings()?
            .set(Setting::RevokeEstablished as u32, on as u32, 0)
            .map_err(self.err(map_names::SETTINGS))
    }

    /// Entries in use and capacity of every map with entries to count.
    pub fn fill(&self) -> Result<Vec<(&'static str, MapFill)>, MapsError> {
        let counts = [
            (map_names::SOCK_HASH, self.sockhash_keys()?.len()),
            (map_names::SOCKETS, self.sockets()?.len()),
            (map_names::ENDPOINTS, self.endpoints()?.len()),
            (map_names::LOCAL_NETNS, self.local_netns()?.len()),
            (map_names::POLICY, self.policy()?.len()),
            (map_names::CONNTRACK, self.conntrack()?.len()),
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
}
