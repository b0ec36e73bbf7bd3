//! `FLOWS`: the ring buffer of verdicts the kernel reports (read by the
//! agent's flow hub through `sys::async_ring_buf`).
use aya::maps::MapType;
use mesh_common::map_names;

use super::{MapLayout, layout};

// A ring buffer has neither keys nor values.
pub const FLOWS: (&str, MapLayout) = (map_names::FLOWS, layout::<(), ()>(MapType::RingBuf));
