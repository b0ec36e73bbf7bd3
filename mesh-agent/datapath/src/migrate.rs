//! Upgrades of the pinned maps' layout (docs/architecture.md, "Upgrades").
//!
//! Every agent records the layout version it installed
//! ([`MAP_LAYOUT_VERSION`]) in `SETTINGS`. A new agent that finds a map
//! pinned with an older layout moves that pin aside, lets the loader create
//! the map anew, copies the entries over (converted), and only then swaps the
//! programs in the pinned links: the old programs keep enforcing with the
//! old map until the very swap, the new ones start with the entries already
//! there. A second copy after the swap catches what the old programs added
//! meanwhile; then the old pin is removed.
//!
//! An agent that finds a newer version than its own refuses to start: it
//! cannot know what the newer maps mean, and reusing them would corrupt them.
//! Everything is checked before anything is moved, so a refusal changes
//! nothing; a migration interrupted half-way is resumed by the next start.
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapInfo, MapType};
use mesh_common::{
    MAP_LAYOUT_VERSION, Setting, map_names,
    policy::{Endpoint, FLOW_OUTBOUND, FlowKey, FlowState, IpKey, Verdict, WORLD_IDENTITY},
};
use tracing::info;

use super::maps::{EXPECTED_MAPS, MapLayout, MapsError};

/// Suffix of a pin moved aside while its map is migrated (bpffs refuses
/// names with dots).
const OLD_SUFFIX: &str = "_OLD_LAYOUT";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(
        "the pins under {dir} have map layout {found}, newer than this agent's layout \
         {ours}: they were installed by a newer mesh-agent. Refusing to start rather than \
         corrupt them; run that version (or newer), or remove the pins to start afresh \
         (which drops the kernel state)"
    )]
    NewerLayout { dir: PathBuf, found: u32, ours: u32 },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A conversion of one map's entries from an older layout to this agent's.
struct Migration {
    map: &'static str,
    /// The layout it converts from.
    from: MapLayout,
    /// Copies every entry of `old` missing in `new`; returns how many.
    copy: fn(old: MapData, new: MapData, endpoints: &Endpoints) -> Result<usize, MapsError>,
}

/// Every layout this agent can migrate from. An entry stays until no
/// supported version can have pinned that layout.
const MIGRATIONS: &[Migration] = &[Migration {
    map: map_names::CONNTRACK,
    from: MapLayout {
        map_type: MapType::LruHash,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<FlowStateV1>() as u32,
    },
    copy: conntrack_from_v1,
}];

/// The layout version the pins under `dir` record: `None` when nothing is
/// pinned yet; 1 for pins made before versions were recorded.
pub fn pinned_version(dir: &Path) -> Result<Option<u32>, MapsError> {
    let path = dir.join(map_names::SETTINGS);
    if !path.exists() {
        return Ok(None);
    }
    let err = |source| MapsError::Map {
        name: map_names::SETTINGS,
        dir: dir.to_owned(),
        source,
    };
    let map = Map::from_map_data(MapData::from_pin(&path).map_err(err)?).map_err(err)?;
    let settings: aya::maps::Array<MapData, u32> = map.try_into().map_err(err)?;
    let recorded = settings
        .get(&(Setting::LayoutVersion as u32), 0)
        .map_err(err)?;
    Ok(Some(recorded.max(1)))
}

/// The migrations the pins under `dir` need, checked and with the old pins
/// moved aside; `Err` when they cannot be used (nothing is changed then).
pub fn prepare(dir: &Path) -> Result<Pending, MigrateError> {
    if let Some(found) = pinned_version(dir)?
        && found > MAP_LAYOUT_VERSION
    {
        return Err(MigrateError::NewerLayout {
            dir: dir.to_owned(),
            found,
            ours: MAP_LAYOUT_VERSION,
        });
    }
    // Check everything first: a refusal must leave the pins as they were.
    let mut needed = Vec::new();
    for (name, expected) in EXPECTED_MAPS {
        let aside = old_pin(dir, name);
        if aside.exists() {
            // An earlier start moved it aside and stopped before the end.
            needed.push(find_migration(
                dir,
                name,
                layout_of(dir, name, &aside)?,
                expected,
            )?);
            continue;
        }
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let found = layout_of(dir, name, &path)?;
        if found != expected {
            needed.push(find_migration(dir, name, found, expected)?);
        }
    }
    for migration in &needed {
        move_aside(dir, migration)?;
        info!(map = migration.map, from = %migration.from, "migrating map to this agent's layout");
    }
    Ok(Pending {
        dir: dir.to_owned(),
        migrations: needed,
    })
}

/// Migrations under way: the new maps exist once the programs are loaded.
pub struct Pending {
    dir: PathBuf,
    migrations: Vec<&'static Migration>,
}

impl Pending {
    /// Copies the old maps' entries into the new ones; run after loading
    /// (the new maps exist) and before attaching (the new programs see them).
    pub fn copy(&self) -> Result<(), MigrateError> {
        if self.migrations.is_empty() {
            return Ok(()); // the usual start: nothing to open
        }
        let endpoints = Endpoints::open(&self.dir)?;
        for m in &self.migrations {
            let err = |source| MapsError::Map {
                name: m.map,
                dir: self.dir.clone(),
                source,
            };
            let old = MapData::from_pin(old_pin(&self.dir, m.map)).map_err(err)?;
            let new = MapData::from_pin(self.dir.join(m.map)).map_err(err)?;
            let copied = (m.copy)(old, new, &endpoints)?;
            info!(
                map = m.map,
                entries = copied,
                "copied entries to the new layout"
            );
        }
        Ok(())
    }

    /// After the programs were swapped: copies what the old programs added
    /// since [`Pending::copy`], then removes the old pins.
    pub fn finish(self) -> Result<(), MigrateError> {
        self.copy()?;
        for m in &self.migrations {
            let aside = old_pin(&self.dir, m.map);
            std::fs::remove_file(&aside).map_err(|source| MigrateError::Io {
                what: "removing the migrated pin",
                path: aside,
                source,
            })?;
            info!(map = m.map, "map migrated");
        }
        Ok(())
    }
}

/// Renames the old map's pin out of the loader's way; the programs using
/// the map hold it, so it lives on.
fn move_aside(dir: &Path, migration: &Migration) -> Result<(), MigrateError> {
    let (path, aside) = (dir.join(migration.map), old_pin(dir, migration.map));
    if aside.exists() {
        return Ok(()); // an interrupted start moved it already
    }
    std::fs::rename(&path, &aside).map_err(|source| MigrateError::Io {
        what: "moving aside the old-layout pin",
        path,
        source,
    })
}

fn old_pin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{OLD_SUFFIX}"))
}

fn layout_of(dir: &Path, name: &'static str, path: &Path) -> Result<MapLayout, MapsError> {
    let err = |source| MapsError::Map {
        name,
        dir: dir.to_owned(),
        source,
    };
    let info = MapInfo::from_pin(path).map_err(err)?;
    Ok(MapLayout {
        map_type: info.map_type().map_err(err)?,
        key_size: info.key_size(),
        value_size: info.value_size(),
    })
}

fn find_migration(
    dir: &Path,
    name: &'static str,
    found: MapLayout,
    expected: MapLayout,
) -> Result<&'static Migration, MapsError> {
    MIGRATIONS
        .iter()
        .find(|m| m.map == name && m.from == found)
        .ok_or(MapsError::Layout {
            name,
            dir: dir.to_owned(),
            found,
            expected,
        })
}

/// The workload addresses, to fill in what an old layout did not record.
pub struct Endpoints(HashMap<MapData, IpKey, Endpoint>);

impl Endpoints {
    fn open(dir: &Path) -> Result<Self, MapsError> {
        let err = |source| MapsError::Map {
            name: map_names::ENDPOINTS,
            dir: dir.to_owned(),
            source,
        };
        let data = MapData::from_pin(dir.join(map_names::ENDPOINTS)).map_err(err)?;
        Ok(Self(
            Map::from_map_data(data)
                .map_err(err)?
                .try_into()
                .map_err(err)?,
        ))
    }

    fn get(&self, ip: &[u32; 4]) -> Option<Endpoint> {
        self.0.get(&IpKey { ip: *ip }, 0).ok()
    }
}

/// `CONNTRACK` values of layout 1: no identities.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct FlowStateV1 {
    verdict: Verdict,
    generation: u32,
    flags: u32,
}

// SAFETY: #[repr(C)] integers only, no padding (as the kernel wrote them).
#[allow(unsafe_code)]
unsafe impl aya::Pod for FlowStateV1 {}

/// Layout 1 → 2: the identities come from today's endpoints, named as the
/// programs name them: the side outside the node is `world` when it is no
/// workload; the local side is 0 (unknown) when its endpoint is gone.
fn convert_flow_state(
    key: &FlowKey,
    old: FlowStateV1,
    endpoint: impl Fn(&[u32; 4]) -> Option<Endpoint>,
) -> FlowState {
    let local = |ip| endpoint(ip).map_or(0, |e: Endpoint| e.identity);
    let remote = |ip| endpoint(ip).map_or(WORLD_IDENTITY, |e: Endpoint| e.identity);
    let (src_identity, dst_identity) = if old.flags & FLOW_OUTBOUND != 0 {
        (local(&key.src_ip), remote(&key.dst_ip))
    } else {
        (remote(&key.src_ip), local(&key.dst_ip))
    };
    FlowState {
        verdict: old.verdict,
        generation: old.generation,
        flags: old.flags,
        src_identity,
        dst_identity,
    }
}

fn conntrack_from_v1(
    old: MapData,
    new: MapData,
    endpoints: &Endpoints,
) -> Result<usize, MapsError> {
    let err = |source| MapsError::Map {
        name: map_names::CONNTRACK,
        dir: PathBuf::new(),
        source,
    };
    let old: HashMap<MapData, FlowKey, FlowStateV1> = Map::from_map_data(old)
        .map_err(err)?
        .try_into()
        .map_err(err)?;
    let mut new: HashMap<MapData, FlowKey, FlowState> = Map::from_map_data(new)
        .map_err(err)?
        .try_into()
        .map_err(err)?;
    let mut copied = 0;
    // Entries may be evicted from the LRU while we walk it: skip those.
    for (key, state) in old.iter().filter_map(Result::ok) {
        // BPF_NOEXIST: an entry the new programs wrote is newer than ours.
        let converted = convert_flow_state(&key, state, |ip| endpoints.get(ip));
        match new.insert(key, converted, 1) {
            Ok(()) => copied += 1,
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_converts_to_the_layout_this_agent_expects() {
        for m in MIGRATIONS {
            let (_, expected) = EXPECTED_MAPS
                .iter()
                .find(|(name, _)| *name == m.map)
                .expect("migrations name maps this agent uses");
            assert_ne!(m.from, *expected, "{}: nothing to migrate", m.map);
            assert_eq!(m.from.map_type, expected.map_type, "{}", m.map);
        }
        // Layout 1 had 16-byte conntrack values; layout 2 adds two identities.
        assert_eq!(size_of::<FlowStateV1>(), 16);
        assert_eq!(size_of::<FlowState>(), 32);
    }

    fn key(src: u32, dst: u32) -> FlowKey {
        FlowKey {
            src_ip: [0, 0, 0xffff_u32.to_be(), src],
            dst_ip: [0, 0, 0xffff_u32.to_be(), dst],
            src_port: 40000,
            dst_port: 8080,
            proto: mesh_common::policy::PROTO_TCP,
            _pad: [0; 3],
        }
    }

    #[test]
    fn layout_1_flows_get_the_identities_the_programs_would_have_recorded() {
        let endpoint = |identity| Endpoint {
            identity,
            subject: identity,
            flags: 0,
            _pad: 0,
        };
        let lookup = |ip: &[u32; 4]| match ip[3] {
            1 => Some(endpoint(100)),
            2 => Some(endpoint(200)),
            _ => None,
        };
        let old = |flags| FlowStateV1 {
            verdict: Verdict::new(mesh_common::policy::Action::Deny, 17),
            generation: 9,
            flags,
        };
        // Inbound from a workload, and from outside the mesh.
        let st = convert_flow_state(&key(1, 2), old(0), lookup);
        assert_eq!((st.src_identity, st.dst_identity), (100, 200));
        assert_eq!(
            (st.verdict, st.generation, st.flags),
            (old(0).verdict, 9, 0)
        );
        let st = convert_flow_state(&key(7, 2), old(0), lookup);
        assert_eq!((st.src_identity, st.dst_identity), (WORLD_IDENTITY, 200));
        // Outbound to outside the mesh; and a local side that is gone.
        let st = convert_flow_state(&key(1, 7), old(FLOW_OUTBOUND), lookup);
        assert_eq!((st.src_identity, st.dst_identity), (100, WORLD_IDENTITY));
        assert_eq!(st.flags, FLOW_OUTBOUND);
        let st = convert_flow_state(&key(7, 8), old(0), lookup);
        assert_eq!((st.src_identity, st.dst_identity), (WORLD_IDENTITY, 0));
    }
}
