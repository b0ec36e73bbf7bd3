//! The agent's Prometheus metrics (`/metrics` on `--metrics-address`, names
//! prefixed `mesh_`), with prometheus-client.
//!
//! Two kinds: what the agent counts as it goes (verdicts, tunnels,
//! reconciles, the API server's watch), each subsystem holding a cheap clone
//! of its part; and what is read at each scrape, from the pinned maps and
//! the state directory (kernel counters, map fill, policy generation,
//! certificates, readiness), so a scrape always says what the kernel holds
//! now, also what an earlier agent did.
use std::{fmt, path::PathBuf, sync::Arc, time::SystemTime};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{
    control::metrics::ReconcileMetrics, flows::FlowMetrics, health::HealthWatch,
    k8s::metrics::KubernetesMetrics, mtls::metrics::TunnelMetrics,
};
use mesh_datapath::maps::{MapFill, PinnedMaps};

/// The registry and the parts the subsystems update. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    renders: prometheus_client::metrics::counter::Counter,
    pub flows: FlowMetrics,
    pub tunnels: TunnelMetrics,
    pub reconcile: ReconcileMetrics,
    pub kubernetes: KubernetesMetrics,
}

/// What the agent is told about its environment when the registry is made.
pub struct Options {
    /// Mutual TLS is on: tunnel metrics are shown from the start (at 0).
    pub mtls: bool,
    /// Kubernetes mode: the watch gauge is shown.
    pub kubernetes: bool,
}

impl Metrics {
    /// A registry whose scrape-time readings come from `read`.
    pub fn new(options: Options, read: impl Fn() -> Readings + Send + Sync + 'static) -> Self {
        let mut registry = Registry::with_prefix("mesh");
        // Each subsystem registers its own metrics; a sub-registry's prefix
        // is the first word of their names.
        let flows = FlowMetrics::register(registry.sub_registry_with_prefix("flow"));
        let tunnels = TunnelMetrics::register(&mut registry, options.mtls);
        let reconcile = ReconcileMetrics::register(registry.sub_registry_with_prefix("reconcile"));
        let kubernetes = if options.kubernetes {
            KubernetesMetrics::register(registry.sub_registry_with_prefix("kubernetes"))
        } else {
            KubernetesMetrics::default()
        };
        registry.register_collector(Box::new(NodeCollector {
            read: Box::new(read),
        }));
        let renders = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "scrape_renders",
            "Renders of /metrics, each a walk of the maps; a scrape within a second of the \
             last render is answered from it",
            renders.clone(),
        );
        Self {
            registry: Arc::new(registry),
            renders,
            flows,
            tunnels,
            reconcile,
            kubernetes,
        }
    }

    /// The OpenMetrics text exposition (reads the maps: call it off the
    /// async workers).
    pub fn render(&self) -> String {
        self.renders.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The `Content-Type` of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a scrape reads from the kernel and the state directory. A part
/// that cannot be read is left empty, and its metrics are not shown.
#[derive(Debug, Default, Clone)]
pub struct Readings {
    /// The kernel programs' counters, by name, summed over CPUs.
    pub counters: Vec<(&'static str, u64)>,
    pub maps: Vec<(&'static str, MapFill)>,
    pub policy_generation: Option<u32>,
    /// SPIFFE ID → seconds until its certificate expires (negative: expired).
    pub certificates: Vec<(String, f64)>,
    pub ready: Option<bool>,
    /// What the agent found in the kernel at start: feature → present.
    pub kernel_features: Vec<(String, bool)>,
    /// What the self-test found in the redirect path: defect → present.
    pub kernel_defects: Vec<(String, bool)>,
}

/// The real readings: the pins under `bpffs`, `certs.json` in `state_dir`,
/// the live health.
pub fn node_readings(
    bpffs: PathBuf,
    state_dir: PathBuf,
    health: HealthWatch,
) -> impl Fn() -> Readings + Send + Sync + 'static {
    move || {
        let mut readings = Readings {
            ready: Some(health.borrow().ready),
            ..Readings::default()
        };
        // Before the programs are installed there is nothing to read.
        if let Ok(maps) = PinnedMaps::open(&bpffs) {
            if let Ok(counters) = maps.counters() {
                readings.counters = counters.into_iter().map(|(c, v)| (c.name(), v)).collect();
            }
            readings.maps = maps.fill().unwrap_or_default();
            readings.policy_generation = maps.policy_generation().ok();
        }
        if let Ok(kernel) = mesh_datapath::features::KernelFeatures::read(&state_dir) {
            readings.kernel_features = kernel
                .features
                .into_iter()
                .map(|f| (f.name, f.present))
                .collect();
            readings.kernel_defects = kernel
                .short_circuit_defects
                .unwrap_or_default()
                .into_iter()
                .filter_map(|d| Some((d.name, d.present?)))
                .collect();
        }
        if let Ok(state) = mesh_pki::rotation::read_state(&state_dir) {
            let now = SystemTime::now();
            readings.certificates = state
                .certificates
                .iter()
                .filter_map(|c| Some((c.spiffe_id.clone(), seconds_until(&c.not_after, now)?)))
                .collect();
        }
        readings
    }
}

/// Seconds from `now` to an RFC 3339 instant, negative when past.
pub fn seconds_until(at: &str, now: SystemTime) -> Option<f64> {
    let at = humantime::parse_rfc3339(at).ok()?;
    Some(match at.duration_since(now) {
        Ok(left) => left.as_secs_f64(),
        Err(past) => -past.duration().as_secs_f64(),
    })
}

/// Encodes the scrape-time readings.
struct NodeCollector {
    read: Box<dyn Fn() -> Readings + Send + Sync>,
}

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let r = (self.read)();
        for (name, value) in &r.counters {
            let metric = format!("kernel_{name}");
            let help = kernel_counter_help(name);
            let m = encoder.encode_descriptor(&metric, &help, None, MetricType::Counter)?;
            ConstCounter::new(*value).encode(m)?;
        }
        if !r.maps.is_empty() {
            type Count = fn(&MapFill) -> u32;
            let counts: [(&str, &str, Count); 2] = [
                ("map_entries", "Entries in each pinned map.", |f| f.entries),
                ("map_max_entries", "Capacity of each pinned map.", |f| {
                    f.max_entries
                }),
            ];
            for (name, help, value) in counts {
                let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for (map, fill) in &r.maps {
                    let labels = [("map", *map)];
                    ConstGauge::new(value(fill)).encode(m.encode_family(&labels)?)?;
                }
            }
            let mut m = encoder.encode_descriptor(
                "map_fill_ratio",
                "Entries over capacity of each pinned map (a full map refuses new sockets or \
                 flows; an LRU map evicts the oldest).",
                None,
                MetricType::Gauge,
            )?;
            for (map, fill) in &r.maps {
                let labels = [("map", *map)];
                let ratio = f64::from(fill.entries) / f64::from(fill.max_entries.max(1));
                ConstGauge::new(ratio).encode(m.encode_family(&labels)?)?;
            }
        }
        if let Some(generation) = r.policy_generation {
            let m = encoder.encode_descriptor(
                "policy_generation",
                "The policy generation in the kernel's settings (bumped by every applied change).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(generation)).encode(m)?;
        }
        if !r.certificates.is_empty() {
            let mut m = encoder.encode_descriptor(
                "certificate_expires_in",
                "Time until each workload certificate of this node expires (negative: expired).",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for (identity, seconds) in &r.certificates {
                let labels = [("identity", identity.as_str())];
                ConstGauge::new(*seconds).encode(m.encode_family(&labels)?)?;
            }
        }
        if !r.kernel_features.is_empty() {
            let mut m = encoder.encode_descriptor(
                "kernel_feature",
                "1 for each kernel feature the agent found at start, 0 for each it did not \
                 (docs/kernels.md: what the mesh does without it).",
                None,
                MetricType::Gauge,
            )?;
            for (feature, present) in &r.kernel_features {
                let labels = [("feature", feature.as_str())];
                ConstGauge::new(i64::from(*present)).encode(m.encode_family(&labels)?)?;
            }
        }
        if !r.kernel_defects.is_empty() {
            let mut m = encoder.encode_descriptor(
                "kernel_defect",
                "1 for each defect of the kernel's redirect path the start-up self-test \
                 reproduced, 0 for each it did not (docs/short-circuit.md).",
                None,
                MetricType::Gauge,
            )?;
            for (defect, present) in &r.kernel_defects {
                let labels = [("defect", defect.as_str())];
                ConstGauge::new(i64::from(*present)).encode(m.encode_family(&labels)?)?;
            }
        }
        if let Some(ready) = r.ready {
            let m = encoder.encode_descriptor(
                "ready",
                "1 when the maps reflect the current policy (as /ready answers), else 0.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(ready)).encode(m)?;
        }
        Ok(())
    }
}

/// What each kernel counter counts (docs/cli.md, `inspect stats`).
fn kernel_counter_help(name: &str) -> String {
    let what = match name {
        "sockets_tracked" => "Established sockets added to the socket maps",
        "sockets_track_failed" => {
            "Sockets that could not be added to the socket maps (a map was full)"
        }
        "sockets_closed" => "Tracked sockets that closed and were removed",
        "msgs_redirected" => "Messages handed straight to the local peer socket (short-circuit)",
        "bytes_redirected" => "Bytes handed straight to the local peer socket (short-circuit)",
        "redirect_failed" => {
            "Messages whose redirect found no local peer socket and took the stack"
        }
        "msgs_stack_only" => "Messages of sockets pinned to the TCP/IP stack",
        "policy_allowed" => "New connections or inbound flows that policy allowed",
        "policy_denied" => "New connections or inbound flows that policy denied",
        "policy_audited" => "New connections or inbound flows that an AUDIT policy let through",
        "flow_events_lost" => "Verdicts not reported because the flow ring buffer was full",
        "conntrack_failed" => "Flows that could not be recorded in CONNTRACK",
        "tunnel_redirected" => "Connections steered to the node agent for mutual TLS",
        "service_translated" => "Connections and datagrams to a Service translated to a backend",
        "service_no_backend" => "Connections refused because their Service had no backend",
        "service_unknown" => {
            "Connections refused: an address of the Service range that is no known Service"
        }
        "spoofed_source" => {
            "Packets from another node that claimed a workload of this node as source (dropped)"
        }
        "flow_events_suppressed" => {
            "Verdicts not reported because their source was over --flow-events-per-source"
        }
        "denied_events_suppressed" => "Of those, denials (applied all the same)",
        _ => return format!("Kernel counter {name} (COUNTERS map, summed over CPUs)."),
    };
    format!("{what} (kernel counter, summed over CPUs).")
}

#[cfg(test)]
mod tests {
    use mesh_common::policy::{
        RULE_MESH_DEFAULT, RULE_NO_POLICY, RULE_NON_MESH, RULE_NOT_ALLOWED, RULE_STRICT_MTLS,
    };

    use std::time::Duration;

    use super::*;
    use crate::{
        flows::{FlowEnd, FlowRecord, reason_label},
        mtls::metrics::Direction,
    };

    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    fn flow(hook: &str, src: &str, dst: &str, verdict: &str, rule: u32) -> FlowRecord {
        let end = |identity: &str| FlowEnd {
            identity: identity.into(),
            id: "17".into(),
            ip: None,
            port: None,
        };
        FlowRecord {
            time: 0.0,
            verdict: verdict.into(),
            hook: hook.into(),
            proto: "tcp".into(),
            src: end(src),
            dst: end(dst),
            rule,
            reason: String::new(),
            mtls: None,
            service: None,
            suppressed: 0,
            suppressed_denied: 0,
        }
    }

    fn fake_readings() -> Readings {
        Readings {
            kernel_features: vec![("tcx".into(), true), ("bpf_lsm".into(), false)],
            kernel_defects: vec![("splice_misses_redirected_bytes".into(), true)],
            counters: vec![("policy_denied", 3), ("bytes_redirected", 1024)],
            maps: vec![(
                "POLICY",
                MapFill {
                    entries: 64,
                    max_entries: 128,
                },
            )],
            policy_generation: Some(7),
            certificates: vec![(CART.into(), 3600.0)],
            ready: Some(true),
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn renders_what_was_counted_and_what_was_read() {
        let metrics = Metrics::new(
            Options {
                mtls: true,
                kubernetes: true,
            },
            fake_readings,
        );
        for _ in 0..2 {
            metrics
                .flows
                .record(&flow("connect", FRONTEND, CART, "ALLOW", 16));
        }
        metrics
            .flows
            .record(&flow("ingress", "world", CART, "DENY", RULE_NOT_ALLOWED));
        metrics
            .flows
            .record(&flow("tunnel-out", FRONTEND, CART, "DENY", 0));
        metrics.tunnels.handshake(Direction::Outbound, true);
        let open = metrics.tunnels.open(Direction::Inbound);
        metrics
            .reconcile
            .observe("standalone", Duration::from_millis(3));
        metrics.reconcile.failed("standalone", "invalid_config");
        metrics.kubernetes.set_connected(true);

        let text = metrics.render();
        let l = lines(&text);
        for want in [
            "# TYPE mesh_flow_verdicts counter",
            &format!(
                "mesh_flow_verdicts_total{{hook=\"connect\",src_identity=\"{FRONTEND}\",dst_identity=\"{CART}\",verdict=\"allow\",reason=\"policy\"}} 2"
            ),
            &format!(
                "mesh_flow_verdicts_total{{hook=\"ingress\",src_identity=\"world\",dst_identity=\"{CART}\",verdict=\"deny\",reason=\"not_allowed\"}} 1"
            ),
            &format!(
                "mesh_flow_verdicts_total{{hook=\"tunnel-out\",src_identity=\"{FRONTEND}\",dst_identity=\"{CART}\",verdict=\"deny\",reason=\"tunnel\"}} 1"
            ),
            "mesh_tunnel_handshakes_total{direction=\"outbound\",result=\"ok\"} 1",
            "mesh_tunnel_handshakes_total{direction=\"inbound\",result=\"failed\"} 0",
            "mesh_tunnels_open{direction=\"inbound\"} 1",
            "mesh_tunnels_open{direction=\"outbound\"} 0",
            "# UNIT mesh_reconcile_duration_seconds seconds",
            "mesh_reconcile_duration_seconds_count{mode=\"standalone\"} 1",
            "mesh_reconcile_duration_seconds_bucket{le=\"0.004\",mode=\"standalone\"} 1",
            "mesh_reconcile_duration_seconds_bucket{le=\"0.002\",mode=\"standalone\"} 0",
            "# TYPE mesh_reconcile_failures counter",
            "mesh_reconcile_failures_total{mode=\"standalone\",reason=\"invalid_config\"} 1",
            "mesh_kubernetes_watch_connected 1",
            "mesh_kernel_policy_denied_total 3",
            "mesh_kernel_bytes_redirected_total 1024",
            "mesh_map_entries{map=\"POLICY\"} 64",
            "mesh_map_max_entries{map=\"POLICY\"} 128",
            "mesh_map_fill_ratio{map=\"POLICY\"} 0.5",
            "mesh_policy_generation 7",
            &format!("mesh_certificate_expires_in_seconds{{identity=\"{CART}\"}} 3600.0"),
            "mesh_ready 1",
            "mesh_kernel_feature{feature=\"tcx\"} 1",
            "mesh_kernel_feature{feature=\"bpf_lsm\"} 0",
            "mesh_kernel_defect{defect=\"splice_misses_redirected_bytes\"} 1",
        ] {
            assert!(l.contains(&want), "no line {want:?} in:\n{text}");
        }
        assert_eq!(l.last(), Some(&"# EOF"));

        drop(open);
        assert!(
            metrics
                .render()
                .contains("mesh_tunnels_open{direction=\"inbound\"} 0\n")
        );
    }

    #[test]
    fn shows_only_what_applies() {
        let metrics = Metrics::new(
            Options {
                mtls: false,
                kubernetes: false,
            },
            Readings::default,
        );
        let text = metrics.render();
        // Nothing counted and nothing readable: only the agent's own
        // bookkeeping, then the end marker.
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "mesh_scrape_renders_total 1",
                "mesh_flow_verdict_series_evicted_total 0",
                "mesh_reconcile_refused_documents 0"
            ],
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn reasons_name_the_deciding_rule() {
        assert_eq!(reason_label(Some(RULE_MESH_DEFAULT)), "mesh_default");
        assert_eq!(reason_label(Some(RULE_NON_MESH)), "non_mesh");
        assert_eq!(reason_label(Some(RULE_NO_POLICY)), "no_policy");
        assert_eq!(reason_label(Some(RULE_STRICT_MTLS)), "strict_mtls");
        assert_eq!(reason_label(Some(16)), "policy");
        assert_eq!(reason_label(None), "tunnel");
    }

    #[test]
    fn certificate_time_left_is_signed() {
        let now = humantime::parse_rfc3339("2026-11-21T10:00:00Z").unwrap();
        assert_eq!(seconds_until("2026-11-21T11:00:00Z", now), Some(3600.0));
        assert_eq!(seconds_until("2026-11-21T09:59:00Z", now), Some(-60.0));
        assert_eq!(seconds_until("yesterday", now), None);
    }
}
