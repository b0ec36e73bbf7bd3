//! The inbound agent's check of a tunnel: the same entries, in the same
//! order, as the kernel looks up (`decide_for`), with the source identity
//! taken from the verified client certificate instead of an address.
use std::net::SocketAddr;

use aya::maps::{HashMap as BpfHash, MapData};
use mesh_common::policy::{
    ENDPOINT_LOCAL, Endpoint, IpKey, PROTO_TCP, PolicyKey, Verdict, decide_for,
};

use mesh_datapath::maps::{MapsError, PinnedMaps};

/// Read-only handles on the policy maps, opened once.
pub struct PolicyLookup {
    endpoints: BpfHash<MapData, IpKey, Endpoint>,
    policy: BpfHash<MapData, PolicyKey, Verdict>,
}

/// Why a tunnel is not carried to its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The destination is not a workload of this node.
    NotLocal,
    /// Policy denies it (the verdict names the rule).
    Denied(Verdict),
}

impl PolicyLookup {
    pub fn open(pins: &PinnedMaps) -> Result<Self, MapsError> {
        let maps = pins.policy_maps()?;
        Ok(Self {
            endpoints: maps.endpoints,
            policy: maps.policy,
        })
    }

    /// The verdict for a tunnel from `src_identity` to `target`; `Ok` holds
    /// the destination endpoint and a verdict that lets it pass.
    pub fn judge(
        &self,
        src_identity: u64,
        target: SocketAddr,
    ) -> Result<(Endpoint, Verdict), Refused> {
        let dst = match self.endpoints.get(&IpKey::from(target.ip()), 0) {
            Ok(e) if e.flags & ENDPOINT_LOCAL != 0 => e,
            _ => return Err(Refused::NotLocal),
        };
        // Mutual TLS proved the source: never "plaintext" here.
        let verdict = decide_for(&dst, src_identity, target.port(), PROTO_TCP, false, |k| {
            self.policy.get(k, 0).ok()
        });
        if verdict.action().passes() {
            Ok((dst, verdict))
        } else {
            Err(Refused::Denied(verdict))
        }
    }
}
