//! The tunnels' metrics, owned by the mTLS subsystem and registered by it
//! into the registry the agent hands it.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::tunnel::ktls::Records;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This agent accepted the tunnel (the destination's node).
    Inbound,
    /// This agent opened it for a local workload (the source's node).
    Outbound,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

impl DirectionLabels {
    fn new(direction: Direction) -> Self {
        Self {
            direction: direction.name(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: &'static str,
    result: &'static str,
}

impl HandshakeLabels {
    fn new(direction: Direction, ok: bool) -> Self {
        Self {
            direction: direction.name(),
            result: if ok { "ok" } else { "failed" },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BulkLabels {
    direction: &'static str,
    records: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

/// Tunnels between node agents.
#[derive(Clone, Debug, Default)]
pub struct TunnelMetrics {
    handshakes: Family<HandshakeLabels, Counter>,
    open: Family<DirectionLabels, Gauge>,
    refused: Family<RefusedLabels, Counter>,
    bulk: Family<BulkLabels, Counter>,
}

impl TunnelMetrics {
    /// Made and registered (`tunnel_handshakes`, `tunnels_open`: the names
    /// dashboards know) in `registry`. With mutual TLS on, every series is
    /// shown from the start, at 0.
    pub fn register(registry: &mut Registry, mtls: bool) -> Self {
        let tunnels = Self::default();
        registry.register(
            "tunnel_handshakes",
            "Mutual TLS handshakes of tunnels between node agents, by direction and result",
            tunnels.handshakes.clone(),
        );
        registry.register(
            "tunnels_open",
            "Tunnels carrying a connection now, by direction",
            tunnels.open.clone(),
        );
        registry.register(
            "tunnel_refused_connections",
            "Connections to the tunnel listener closed at accept because a bound was reached: \
             unfinished handshakes of one peer address (handshakes_per_peer) or in all \
             (handshakes), or connections in all (connections)",
            tunnels.refused.clone(),
        );
        registry.register(
            "bulk_tunnels",
            "Bulk tunnels (--bulk-ports) that carried a connection, by direction and by where \
             their TLS records were encrypted (kernel: kernel TLS and splice; user: rustls)",
            tunnels.bulk.clone(),
        );
        if mtls {
            for direction in [Direction::Inbound, Direction::Outbound] {
                for ok in [true, false] {
                    let _ = tunnels
                        .handshakes
                        .get_or_create(&HandshakeLabels::new(direction, ok));
                }
                let _ = tunnels.open.get_or_create(&DirectionLabels::new(direction));
            }
        }
        tunnels
    }

    /// A mutual TLS handshake finished, or failed.
    pub fn handshake(&self, direction: Direction, ok: bool) {
        self.handshakes
            .get_or_create(&HandshakeLabels::new(direction, ok))
            .inc();
    }

    /// A bulk tunnel started carrying its connection, its records
    /// encrypted in the kernel or in user space.
    pub fn bulk(&self, direction: Direction, records: Records) {
        self.bulk
            .get_or_create(&BulkLabels {
                direction: direction.name(),
                records: records.name(),
            })
            .inc();
    }

    /// A connection was closed at accept: `reason` is the bound reached.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// A tunnel carries a connection until the guard is dropped.
    pub fn open(&self, direction: Direction) -> OpenTunnel {
        let gauge = self
            .open
            .get_or_create(&DirectionLabels::new(direction))
            .clone();
        gauge.inc();
        OpenTunnel(gauge)
    }
}

/// Counts one open tunnel while it lives.
#[derive(Debug)]
pub struct OpenTunnel(Gauge);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}
