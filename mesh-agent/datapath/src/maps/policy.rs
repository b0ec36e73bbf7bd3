//! `POLICY`: the compiled allow/deny entries.
use aya::maps::MapType;
use mesh_common::{
    map_names,
    policy::{PolicyKey, Verdict},
};

use super::{MapLayout, MapsError, PinnedMaps, layout};

pub const POLICY: (&str, MapLayout) = (
    map_names::POLICY,
    layout::<PolicyKey, Verdict>(MapType::Hash),
);

impl PinnedMaps {
    /// The compiled policy entries.
    pub fn policy(&self) -> Result<Vec<(PolicyKey, Verdict)>, MapsError> {
        self.entries(map_names::POLICY)
    }

    /// One policy entry.
    pub fn policy_entry(&self, key: &PolicyKey) -> Result<Option<Verdict>, MapsError> {
        self.lookup(map_names::POLICY, key)
    }
}
