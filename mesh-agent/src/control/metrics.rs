//! The reconcile loop's metrics, owned by `control` and registered by it
//! into the `reconcile` sub-registry the agent hands it.
use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[cfg(doc)]
use super::ReloadError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

type Buckets = fn() -> Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    mode: &'static str,
    reason: &'static str,
}

/// How long applying a change of the policy source takes, and how often
/// one is refused, by why.
#[derive(Clone, Debug)]
pub struct ReconcileMetrics {
    durations: Family<ModeLabels, Histogram, Buckets>,
    failures: Family<FailureLabels, Counter>,
    refused: Gauge,
}

impl Default for ReconcileMetrics {
    fn default() -> Self {
        // 1 ms to 16 s: a small standalone change takes a few ms, a
        // 10,000-pod cluster's full recompile some 100 ms.
        Self {
            durations: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            failures: Family::default(),
            refused: Gauge::default(),
        }
    }
}

impl ReconcileMetrics {
    /// Made and registered (`duration_seconds`, `failures`) in `registry`,
    /// the agent's `reconcile` sub-registry.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register_with_unit(
            "duration",
            "Time from a change of the policy source to its map diff applied (read or \
             translate, compile, diff, write), by mode",
            Unit::Seconds,
            metrics.durations.clone(),
        );
        registry.register(
            "failures",
            "Changes of the policy source that were refused, the maps left as they were, by \
             mode and reason (invalid_config, capacity, map_update, maps, state_file)",
            metrics.failures.clone(),
        );
        registry.register(
            "refused_documents",
            "Documents left out of the applied state on their own (an identity number two \
             identities share, a policy over the policy budget) while the rest applied",
            metrics.refused.clone(),
        );
        metrics
    }

    /// How many documents the last applied change left out.
    pub fn refused(&self, count: usize) {
        self.refused.set(count as i64);
    }

    /// `mode`: `standalone` or `kubernetes`.
    pub fn observe(&self, mode: &'static str, elapsed: Duration) {
        self.durations
            .get_or_create(&ModeLabels { mode })
            .observe(elapsed.as_secs_f64());
    }

    /// A change was refused; `reason` is [`ReloadError::reason`].
    pub fn failed(&self, mode: &'static str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels { mode, reason })
            .inc();
    }
}
