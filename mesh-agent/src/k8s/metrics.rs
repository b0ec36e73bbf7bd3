//! The Kubernetes watches' metrics, owned by `k8s` and registered by it
//! into the `kubernetes` sub-registry the agent hands it.
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};

/// The state of the Kubernetes API server's watches.
#[derive(Clone, Debug, Default)]
pub struct KubernetesMetrics {
    connected: Gauge,
}

impl KubernetesMetrics {
    /// Made and registered (`watch_connected`) in `registry`, the agent's
    /// `kubernetes` sub-registry.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "watch_connected",
            "1 while every watch has listed its kind and the API server answers, else 0",
            metrics.connected.clone(),
        );
        metrics
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }
}
