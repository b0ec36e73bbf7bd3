//! Typed access to the pinned maps, for the agent and for the operator
//! commands (which read the pins directly, so they work with the agent down).
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapInfo, MapType, PerCpuArray, SockHash};
use mesh_common::{
    Counter, SHORT_CIRCUIT_OFF, SHORT_CIRCUIT_ON, Setting, SocketInfo, SocketKey, map_names,
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

/// The maps this agent's kernel programs use, with their layouts.
pub const EXPECTED_MAPS: [(&str, MapLayout); 4] = [
    (
        map_names::SOCK_HASH,
        MapLayout {
            map_type: MapType::SockHash,
            key_size: size_of::<SocketKey>() as u32,
            value_size: 4,
        },
    ),
    (
        map_names::SOCKETS,
        MapLayout {
            map_type: MapType::Hash,
            key_size: size_of::<SocketKey>() as u32,
            value_size: size_of::<SocketInfo>() as u32,
        },
    ),
    (
        map_names::COUNTERS,
        MapLayout {
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: 8,
        },
    ),
    (
        map_names::SETTINGS,
        MapLayout {
            map_type: MapType::Array,
            key_size: 4,
            value_size: 4,
        },
    ),
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

    /// Entries in use and capacity of the socket maps.
    pub fn fill(&self) -> Result<Vec<(&'static str, MapFill)>, MapsError> {
        let sockhash = self.sockhash_keys()?.len() as u32;
        let sockets = self.sockets()?.len() as u32;
        [
            (map_names::SOCK_HASH, sockhash),
            (map_names::SOCKETS, sockets),
        ]
        .into_iter()
        .map(|(name, entries)| {
            let info = MapInfo::from_pin(self.dir.join(name)).map_err(self.err(name))?;
            Ok((
                name,
                MapFill {
                    entries,
                    max_entries: info.max_entries(),
                },
            ))
        })
        .collect()
    }
}

/// Refuses pinned maps whose layout differs from what this agent's programs
/// expect: aya would silently reuse them, and the programs would then read
/// garbage. Maps not pinned yet are fine (they will be created).
pub fn check_pinned_layouts(dir: &Path) -> Result<(), MapsError> {
    for (name, expected) in EXPECTED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let err = |source| MapsError::Map {
            name,
            dir: dir.to_owned(),
            source,
        };
        let info = MapInfo::from_pin(&path).map_err(err)?;
        let found = MapLayout {
            map_type: info.map_type().map_err(err)?,
            key_size: info.key_size(),
            value_size: info.value_size(),
        };
        if found != expected {
            return Err(MapsError::Layout {
                name,
                dir: dir.to_owned(),
                found,
                expected,
            });
        }
    }
    Ok(())
}
