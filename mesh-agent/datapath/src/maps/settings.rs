//! `SETTINGS`: the switches the agent sets for the kernel programs (the
//! short-circuit, the policy generation, the tunnel port, the layout
//! version, revoking established connections).
use aya::maps::{Array, MapData, MapType};
use mesh_common::{Setting, ShortCircuit, map_names};

use super::{MapLayout, MapsError, PinnedMaps, layout};

pub const SETTINGS: (&str, MapLayout) = (map_names::SETTINGS, layout::<u32, u32>(MapType::Array));

impl PinnedMaps {
    fn settings(&self) -> Result<Array<MapData, u32>, MapsError> {
        let name = map_names::SETTINGS;
        self.map(name)?.try_into().map_err(self.err(name))
    }

    pub fn short_circuit(&self) -> Result<ShortCircuit, MapsError> {
        let value = self
            .settings()?
            .get(&(Setting::ShortCircuit as u32), 0)
            .map_err(self.err(map_names::SETTINGS))?;
        Ok(ShortCircuit::from_setting(value))
    }

    pub fn set_short_circuit(&self, to: ShortCircuit) -> Result<(), MapsError> {
        self.settings()?
            .set(Setting::ShortCircuit as u32, to as u32, 0)
            .map_err(self.err(map_names::SETTINGS))
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

    /// Records the layout of the maps the installed programs use.
    pub fn set_layout_version(&self, version: u32) -> Result<(), MapsError> {
        self.settings()?
            .set(Setting::LayoutVersion as u32, version, 0)
            .map_err(self.err(map_names::SETTINGS))
    }

    pub fn set_flow_events_per_source(&self, rate: u32) -> Result<(), MapsError> {
        self.settings()?
            .set(Setting::FlowEventsPerSource as u32, rate, 0)
            .map_err(self.err(map_names::SETTINGS))
    }

    /// The bound on a receiver's unread redirected bytes (0: none).
    pub fn set_redirect_backlog_bytes(&self, bytes: u32) -> Result<(), MapsError> {
        self.settings()?
            .set(Setting::RedirectBacklogBytes as u32, bytes, 0)
            .map_err(self.err(map_names::SETTINGS))
    }

    pub fn redirect_backlog_bytes(&self) -> Result<u32, MapsError> {
        self.settings()?
            .get(&(Setting::RedirectBacklogBytes as u32), 0)
            .map_err(self.err(map_names::SETTINGS))
    }

    pub fn set_revoke_established(&self, on: bool) -> Result<(), MapsError> {
        self.settings()?
            .set(Setting::RevokeEstablished as u32, on as u32, 0)
            .map_err(self.err(map_names::SETTINGS))
    }
}
