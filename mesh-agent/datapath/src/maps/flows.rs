//! `FLOWS`: the ring buffer of verdicts the kernel reports (read by the
//! agent's flow hub through `sys::async_ring_buf`), and `FLOW_SOURCES`,
//! each source's rate budget for them.
use aya::maps::MapType;
use mesh_common::{
    map_names,
    policy::{FlowBudget, FlowSourceKey},
};

use super::{MapLayout, layout};

// A ring buffer has neither keys nor values.
pub const FLOWS: (&str, MapLayout) = (map_names::FLOWS, layout::<(), ()>(MapType::RingBuf));

pub const FLOW_SOURCES: (&str, MapLayout) = (
    map_names::FLOW_SOURCES,
    layout::<FlowSourceKey, FlowBudget>(MapType::LruHash),
);
