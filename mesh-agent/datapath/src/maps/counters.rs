//! `COUNTERS`: what the kernel programs count, per CPU.
use aya::maps::{MapData, MapType, PerCpuArray};
use mesh_common::{Counter, map_names};

use super::{MapLayout, MapsError, PinnedMaps, layout};

pub const COUNTERS: (&str, MapLayout) = (
    map_names::COUNTERS,
    layout::<u32, u64>(MapType::PerCpuArray),
);

impl PinnedMaps {
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
}
