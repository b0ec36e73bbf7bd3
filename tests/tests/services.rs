//! Services on the real kernel: clients dial a Service address and the
//! connect and sendmsg hooks send them to a backend before policy is
//! decided, so the backend's policy and the mutual TLS between nodes hold
//! whatever address the client dialled. Two nodes, real processes, a
//! capture of the wire between the nodes.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use mesh_tests::{
    agent::{self, Agent},
    capture::{self, Capture},
    dashboard,
    kube_proxy::{self, ServicePort},
    process::Spawned,
    topology::{TestBed, is_uplink_address, probe_counts, wait_for_line},
};
use serde_json::Value;

const T: Duration = Duration::from_secs(120);
const TD: &str = "cluster.local";
/// `whoami` (TCP) and UDP echo in the backends.
const WHOAMI: u16 = 8080;
const ECHO: u16 = 9090;
const DNS: u16 = 5353;

const WEB: usize = 0;
const ROBOT: usize = 1;
const DB_A: usize = 2;
const DB_B: usize = 3;
/// On node 1, selected by no policy: the capture's plaintext control goes
/// there.
const OTHER: usize = 4;

/// `web` and `robot` on node 0; `db` has a backend on each node. Only
/// `web` may reach `db`.
const DOCS: &str = r#"
apiVersion: mesh.dev/v1alpha1
kind: MeshPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: {serviceAccount: db}
  action: ALLOW
  rules:
  - from: [{identity: "spiffe://cluster.local/ns/shop/sa/web"}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  selector: {app: db}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: echo, port: 90, targetPort: 9090}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db-b, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  clusterIPs: [10.96.0.12, "fd00:96::12"]
  selector: {app: db, zone: b}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: echo, port: 90, targetPort: 9090}
---
apiVersion: v1
kind: Service
metadata: {name: db-a, namespace: shop}
spec:
  clusterIP: 10.96.0.13
  selector: {app: db, zone: a}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: echo, port: 90, targetPort: 9090}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: shop}
spec:
  clusterIP: 10.96.0.14
  selector: {app: db}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  selector: {app: nobody}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

struct Mesh {
    bed: TestBed,
    _servers: Vec<Spawned>,
    agents: Vec<Agent>,
    ca: Option<PathBuf>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (n, a) in self.agents.iter().enumerate() {
                eprintln!("--- agent of node {n} ---\n{}", a.log());
            }
        }
    }
}

impl Mesh {
    /// The bed, the backends' servers and the documents; agents started
    /// with mutual TLS when `mtls`, and with `agent_args`.
    fn new(test: &str, mtls: bool) -> Mesh {
        Self::with_args(test, mtls, &[])
    }

    fn with_args(test: &str, mtls: bool, agent_args: &[&str]) -> Mesh {
        let mut bed = TestBed::new(test).unwrap();
        bed.add_node().unwrap();
        bed.connect_nodes().unwrap();
        type Labels = &'static [(&'static str, &'static str)];
        let pods: [(usize, &str, Labels); 5] = [
            (0, "web", &[("app", "web")]),
            (0, "robot", &[("app", "robot")]),
            (0, "db", &[("app", "db"), ("zone", "a")]),
            (1, "db", &[("app", "db"), ("zone", "b")]),
            (1, "other", &[("app", "other")]),
        ];
        let mut servers = Vec::new();
        for (i, (node, sa, labels)) in pods.iter().enumerate() {
            bed.add_pod(*node).unwrap();
            bed.register_workload(i, "shop", sa, labels).unwrap();
            if i < DB_A {
                continue;
            }
            let at = |port: u16| format!("[::]:{port}");
            servers.push(
                bed.server(i, true, at(WHOAMI).parse().unwrap(), "whoami")
                    .unwrap(),
            );
            servers.push(
                bed.server(i, true, at(ECHO).parse().unwrap(), "echo")
                    .unwrap(),
            );
            let mut udp = bed
                .workload(i, &["serve", "--proto", "udp", "--listen", &at(DNS)])
                .unwrap();
            wait_for_line(&mut udp, "listening").unwrap();
            servers.push(udp);
        }
        bed.write_mesh_nodes().unwrap();
        bed.write_config("services.yaml", DOCS).unwrap();
        let ca = mtls.then(|| bed.mesh_ca(TD).unwrap());
        let mut mesh = Mesh {
            bed,
            _servers: servers,
            agents: Vec::new(),
            ca,
        };
        mesh.agents = (0..2).map(|n| mesh.start_agent(n, agent_args)).collect();
        mesh
    }

    fn start_agent(&self, node: usize, extra: &[&str]) -> Agent {
        let ca = self.ca.as_ref().map(|p| p.display().to_string());
        let mut args: Vec<&str> = match &ca {
            Some(ca) => vec!["--ca-dir", ca],
            None => vec![],
        };
        args.extend_from_slice(extra);
        Agent::start_node(&self.bed, node, &args).unwrap()
    }

    /// kube-proxy's rules in node `node`'s namespace: `address` DNATed to
    /// the `port` of `pods`.
    fn kube_proxy(&self, node: usize, address: &str, pods: &[(usize, u16)]) {
        let address: std::net::SocketAddr = address.parse().unwrap();
        let endpoints = pods
            .iter()
            .map(|&(pod, port)| self.bed.pods[pod].addr(address.is_ipv6(), port))
            .collect();
        let port = ServicePort {
            name: format!("shop/{address}"),
            address,
            protocol: "tcp",
            endpoints,
        };
        kube_proxy::install(&self.bed.nodes[node].netns, &[port]).unwrap();
    }

    fn client(&self, pod: usize, args: &[&str]) -> Value {
        self.bed.client(pod, true, args, T).unwrap()
    }

    fn probe(&self, pod: usize, target: &str) -> String {
        self.bed.probe(pod, true, target, 2000).unwrap()
    }

    /// How many of `count` connections to `service` each backend answered.
    fn tally(&self, pod: usize, service: &str, count: usize) -> BTreeMap<String, u64> {
        let report = self.client(
            pod,
            &["tally", "--to", service, "--count", &count.to_string()],
        );
        serde_json::from_value(report["answers"].clone()).unwrap()
    }

    fn backend(&self, pod: usize, v6: bool, port: u16) -> String {
        self.bed.pods[pod].addr(v6, port).to_string()
    }
}

#[test]
fn clients_reach_a_service_by_its_address_and_the_backends_policy_decides() {
    let m = Mesh::new("svc-basic", false);
    // kube-proxy knows the same Service, with one endpoint only: were it to
    // see the Service address, every answer would come from db-a. The mesh
    // translates first, so it never does.
    for address in ["10.96.0.10:80", "[fd00:96::10]:80"] {
        m.kube_proxy(0, address, &[(DB_A, WHOAMI)]);
    }
    for (service, v6) in [("10.96.0.10:80", false), ("[fd00:96::10]:80", true)] {
        // Both backends, one per node, take new connections; every
        // answer comes from one of them.
        let answers = m.tally(WEB, service, 200);
        let a = m.backend(DB_A, v6, WHOAMI);
        let b = m.backend(DB_B, v6, WHOAMI);
        assert_eq!(
            answers.keys().cloned().collect::<Vec<_>>(),
            {
                let mut both = vec![a.clone(), b.clone()];
                both.sort();
                both
            },
            "{service}: {answers:?}"
        );
        assert!(answers[&a] >= 40 && answers[&b] >= 40, "{answers:?}");

        // The application sees the address it dialled.
        let report = m.client(WEB, &["peername", "--to", service]);
        assert_eq!(report["peer"].as_str().unwrap(), service, "{report}");

        // The Service address is no way around db's policy.
        let denied = m.probe(ROBOT, &format!("tcp:{service}"));
        assert_eq!(denied, "eperm", "robot reached db through {service}");
    }
    // Bytes intact through the Service address, both families.
    for service in ["10.96.0.10:90", "[fd00:96::10]:90"] {
        m.client(
            WEB,
            &["transfer", "--to", service, "--sizes", "1,65537,1048576"],
        );
    }
    // UDP: a resolver-style client (unconnected, answers accepted only from
    // the address it asked) and a connected one; robot is refused.
    for dns in ["10.96.0.10:53", "[fd00:96::10]:53"] {
        for _ in 0..10 {
            assert_eq!(m.probe(WEB, &format!("udp-sendto:{dns}")), "connected");
            assert_eq!(m.probe(WEB, &format!("udp:{dns}")), "connected");
        }
        assert_eq!(m.probe(ROBOT, &format!("udp-sendto:{dns}")), "eperm");
        assert_eq!(m.probe(ROBOT, &format!("udp:{dns}")), "eperm");
    }

    // The operator sees each Service address and its backends by name.
    let pins = m.bed.pin_dir(0);
    let out = agent::node_cli(&m.bed, 0, &["inspect", "services", "-o", "json"]).unwrap();
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    let row = rows
        .iter()
        .find(|r| r["address"] == "10.96.0.10:80" && r["protocol"] == "tcp")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(row["service"], "shop/db");
    let workloads: Vec<&str> = row["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["workload"].as_str().unwrap())
        .collect();
    assert_eq!(workloads, ["shop/pod-2", "shop/pod-3"], "{out}");
    assert!(agent::counter(&pins, "service_translated").unwrap() >= 400);

    // explain names every backend, with the kernel's verdict and path.
    let explain = |pod: usize| -> Vec<Value> {
        let from = m.bed.pods[pod].ip4.to_string();
        let out = agent::node_cli(
            &m.bed,
            0,
            &[
                "explain",
                "--from",
                &from,
                "--to",
                "shop/db:http",
                "-o",
                "json",
            ],
        )
        .unwrap();
        serde_json::from_str(&out).unwrap()
    };
    let web = explain(WEB);
    let backends: Vec<&str> = web.iter().map(|a| a["backend"].as_str().unwrap()).collect();
    // Both families' addresses of the Service, each with both backends.
    let expected: Vec<String> = [false, true]
        .into_iter()
        .flat_map(|v6| [m.backend(DB_A, v6, WHOAMI), m.backend(DB_B, v6, WHOAMI)])
        .collect();
    assert_eq!(backends, expected, "{web:?}");
    assert!(
        web.iter()
            .all(|a| a["verdict"] == "ALLOW" && a["share"] == 50.0),
        "{web:?}"
    );
    assert!(
        web[0]["path"].as_str().unwrap().starts_with("same node"),
        "{web:?}"
    );
    let robot = explain(ROBOT);
    assert!(robot.iter().all(|a| a["verdict"] == "DENY"), "{robot:?}");

    // Flows and metrics name the Service a verdict was for.
    let flows = agent::node_cli(&m.bed, 0, &["flows", "-o", "json"]).unwrap();
    let records: Vec<Value> = flows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records.iter().any(|r| r["service"] == "shop/db"
            && r["verdict"] == "DENY"
            && r["src"]["identity"] == "spiffe://cluster.local/ns/shop/sa/robot"),
        "{flows}"
    );
    let metrics = agent::scrape_metrics(&m.bed, 0).unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("mesh_flow_service_verdicts_total{service=\"shop/db\",verdict=\"deny\"}")),
        "{metrics}"
    );
}

#[test]
fn a_service_without_backends_refuses_at_once_and_serves_once_it_has_one() {
    let m = Mesh::new("svc-empty", false);
    // ECONNREFUSED, as kube-proxy's REJECT: not EPERM, not a timeout.
    assert_eq!(m.probe(WEB, "tcp:10.96.0.11:80"), "refused");
    assert_eq!(m.probe(WEB, "udp-sendto:10.96.0.11:53"), "refused");
    assert!(agent::counter(&m.bed.pin_dir(0), "service_no_backend").unwrap() >= 2);

    // A backend appears: db-b gains the label the Service selects.
    let docs = DOCS.replace("selector: {app: nobody}", "selector: {zone: b}");
    m.bed.write_config("services.yaml", &docs).unwrap();
    wait_backends(&m, 0, "10.96.0.11:80", 1);
    let answers = m.tally(WEB, "10.96.0.11:80", 20);
    let b = m.backend(DB_B, false, WHOAMI);
    assert_eq!(answers, BTreeMap::from([(b, 20)]));
    assert_eq!(m.probe(WEB, "udp-sendto:10.96.0.11:53"), "connected");
}

/// A known plaintext through the Service whose only backend is on the
/// other node, and a control from outside the mesh; what the capture of the
/// node link saw.
fn secret_crosses_in_tls(m: &Mesh, secret: &str) {
    let wire = Capture::start(m.bed.fabric().unwrap(), "n1").unwrap();
    for service in ["10.96.0.12:90", "[fd00:96::12]:90"] {
        m.client(
            WEB,
            &["say", "--to", service, "--text", secret, "--repeat", "200"],
        );
    }
    const CONTROL: &str = "PLAINTEXT-CONTROL-MARKER-9d41";
    let other = m.backend(OTHER, false, ECHO);
    m.bed
        .client(
            WEB,
            false,
            &["say", "--to", &other, "--text", CONTROL, "--repeat", "50"],
            T,
        )
        .unwrap();
    let frames = wire.stop().unwrap();
    assert!(
        capture::contains(&frames, CONTROL.as_bytes()),
        "the capture missed the plaintext control: it cannot prove anything"
    );
    assert!(
        !capture::contains(&frames, secret.as_bytes()),
        "a Service client's plaintext crossed the node link"
    );
    let tunnel: Vec<_> = capture::segments(&frames)
        .into_iter()
        .filter(|s| is_uplink_address(s.src.0) || is_uplink_address(s.dst.0))
        .collect();
    let carried: usize = tunnel
        .iter()
        .filter(|s| s.proto == 6 && (s.src.1 == 15008 || s.dst.1 == 15008))
        .map(|s| s.payload.len())
        .sum();
    // 2 × 200 markers each way went through the tunnel port.
    assert!(
        carried > 4 * 200 * secret.len(),
        "only {carried} bytes crossed in tunnels"
    );
    // A tunnel opened during the capture is TLS from its first byte (one
    // opened before it, and pooled, has no SYN in the capture).
    let opened: Vec<_> = tunnel
        .iter()
        .filter(|s| s.syn)
        .map(|s| (s.src, s.dst))
        .collect();
    let fresh: Vec<_> = tunnel
        .into_iter()
        .filter(|s| opened.contains(&(s.src, s.dst)) || opened.contains(&(s.dst, s.src)))
        .collect();
    for ((src, dst), bytes) in &capture::tcp_streams(&fresh).unwrap() {
        capture::tls_records(bytes).unwrap_or_else(|e| panic!("{src:?} → {dst:?} is not TLS: {e}"));
    }
}

#[test]
fn a_backend_on_another_node_is_reached_in_mutual_tls_permissive_and_strict() {
    let m = Mesh::new("svc-mtls", true);
    secret_crosses_in_tls(&m, "SERVICE-SECRET-PERMISSIVE-4b7e");

    let strict = "apiVersion: mesh.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: db-strict, namespace: shop}\nspec:\n  selector: {serviceAccount: db}\n  mtls: {mode: STRICT}\n";
    m.bed.write_config("strict.yaml", strict).unwrap();
    // Both agents have applied it when their state names db STRICT.
    for node in 0..2 {
        let state = m.bed.state_dir(node).join("state.json");
        let deadline = std::time::Instant::now() + T;
        while !std::fs::read_to_string(&state).is_ok_and(|s| s.contains("\"STRICT\"")) {
            assert!(std::time::Instant::now() < deadline, "STRICT never applied");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    secret_crosses_in_tls(&m, "SERVICE-SECRET-STRICT-0c2d");
    // And policy is still the backend's, across the tunnel too.
    assert_eq!(m.probe(ROBOT, "tcp:10.96.0.12:90"), "eperm");

    // The Grafana dashboard reads what these agents export after this
    // traffic, and after a configuration they refused.
    m.bed
        .write_config("bad.yaml", "kind: MeshPolicy\nspec: [not, a, policy]\n")
        .unwrap();
    let deadline = std::time::Instant::now() + T;
    let scrapes = loop {
        let scrapes: Vec<String> = (0..2)
            .map(|n| agent::scrape_metrics(&m.bed, n).unwrap())
            .collect();
        if scrapes[0].contains("mesh_reconcile_failures_total{")
            || std::time::Instant::now() > deadline
        {
            break scrapes;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let scrapes: Vec<&str> = scrapes.iter().map(String::as_str).collect();
    let dashboard = dashboard::load().unwrap();
    // The API watch's panel is checked by the Kubernetes tests.
    let problems = dashboard::unknown_references(&dashboard, &scrapes, |refs| {
        !refs
            .metrics
            .iter()
            .any(|m| m.starts_with("mesh_kubernetes_"))
    })
    .unwrap();
    assert!(problems.is_empty(), "{problems:#?}\n{}", scrapes[0]);
}

#[test]
fn an_address_only_kube_proxy_knows_is_refused_inside_the_service_range() {
    let m = Mesh::with_args(
        "svc-lag",
        true,
        &["--service-cidr", "10.96.0.0/16,fd00:96::/112"],
    );
    // Services the mesh has not heard of yet (created a moment ago, or its
    // watch lags), which kube-proxy already translates: one to db on this
    // node, one to a workload on the other node.
    for (address, backend) in [
        ("10.96.0.20:80", (DB_A, ECHO)),
        ("[fd00:96::20]:80", (DB_A, ECHO)),
        ("10.96.0.21:90", (OTHER, ECHO)),
        ("[fd00:96::21]:90", (OTHER, ECHO)),
    ] {
        m.kube_proxy(0, address, &[backend]);
        // kube-proxy's rules work: a process of web's pod outside the mesh
        // (no connect hook) gets through them.
        let outside = m
            .bed
            .probe(WEB, false, &format!("tcp:{address}"), 2000)
            .unwrap();
        assert_eq!(
            outside, "connected",
            "{address}: kube-proxy's DNAT does not work here"
        );
        // Robot's connection, past no connect hook and translated after
        // it, still meets db's policy where it is delivered.
        if backend.0 == DB_A {
            let outside = m
                .bed
                .probe(ROBOT, false, &format!("tcp:{address}"), 1000)
                .unwrap();
            assert_eq!(outside, "timeout", "{address}: robot reached db");
        }
        // A mesh workload gets ECONNREFUSED: robot never reaches db past
        // its policy, and web never crosses the node link in plaintext.
        assert_eq!(
            m.probe(ROBOT, &format!("tcp:{address}")),
            "refused",
            "{address}"
        );
        assert_eq!(
            m.probe(WEB, &format!("tcp:{address}")),
            "refused",
            "{address}"
        );
    }
    assert!(agent::counter(&m.bed.pin_dir(0), "service_unknown").unwrap() >= 8);

    // Once the mesh knows the Service, it serves it, with db's policy.
    let known = "\n---\napiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: shop}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: db, zone: a}\n  ports: [{name: echo, port: 80, targetPort: 9090}]\n";
    m.bed
        .write_config("services.yaml", &format!("{DOCS}{known}"))
        .unwrap();
    wait_backends(&m, 0, "10.96.0.20:80", 1);
    assert_eq!(m.probe(WEB, "tcp:10.96.0.20:80"), "connected");
    assert_eq!(m.probe(ROBOT, "tcp:10.96.0.20:80"), "eperm");
}

/// `inspect services -o json` of `node`.
fn services(m: &Mesh, node: usize) -> Vec<Value> {
    let out = agent::node_cli(&m.bed, node, &["inspect", "services", "-o", "json"]).unwrap();
    serde_json::from_str(&out).unwrap()
}

/// Waits until `node`'s kernel translates `address` (TCP) to `backends`
/// backends.
fn wait_backends(m: &Mesh, node: usize, address: &str, backends: usize) {
    wait_services(
        m,
        node,
        &format!("{address} with {backends} backends"),
        |rows| {
            rows.iter()
                .find(|r| r["address"] == address && r["protocol"] == "tcp")
                .is_some_and(|r| r["backends"].as_array().unwrap().len() == backends)
        },
    );
}

/// Waits until `node`'s Service rows (`inspect services`) satisfy `done`.
fn wait_services(m: &Mesh, node: usize, what: &str, done: impl Fn(&[Value]) -> bool) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let rows = services(m, node);
        if done(&rows) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never {what}: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The live revision of each Service address on `node`.
fn revisions(m: &Mesh, node: usize) -> BTreeMap<String, u64> {
    services(m, node)
        .iter()
        .map(|r| {
            let key = format!("{}/{}", r["address"].as_str().unwrap(), r["protocol"]);
            (key, r["revision"].as_u64().unwrap())
        })
        .collect()
}

#[test]
fn backend_sets_change_whole_under_load_and_outlive_the_agent() {
    let mut m = Mesh::new("svc-churn", true);
    let apply = |m: &Mesh, docs: &str, backends: usize| {
        m.bed.write_config("services.yaml", docs).unwrap();
        wait_backends(m, 0, "10.96.0.10:90", backends);
    };
    // A long connection through a Service to a backend on the other node
    // (in a tunnel), alive across everything below.
    let long = m
        .bed
        .workload(
            WEB,
            &["pingpong", "--to", "10.96.0.12:90", "--seconds", "2.5"],
        )
        .unwrap();
    // A storm of new connections through the Service with two backends.
    let storm = m.bed.start_probing(WEB, "tcp:10.96.0.10:90", 3000).unwrap();
    // 2 → 0 → 2 backends, both Services.
    let none = DOCS
        .replacen("selector: {app: db}", "selector: {app: gone}", 1)
        .replace("selector: {app: db, zone: b}", "selector: {app: gone}");
    apply(&m, &none, 0);
    std::thread::sleep(Duration::from_millis(300));
    apply(&m, DOCS, 2);
    let counts = probe_counts(storm, T).unwrap();
    // At 0 backends, ECONNREFUSED; otherwise every connection made it and
    // echoed: never a torn backend set, never a timeout or EPERM.
    assert!(
        counts.keys().all(|k| k == "connected" || k == "refused"),
        "{counts:?}"
    );
    assert!(
        counts.get("refused").copied().unwrap_or(0) > 0,
        "{counts:?}"
    );
    assert!(counts["connected"] > 50, "{counts:?}");
    // The long connection, whose backend left both Services meanwhile,
    // kept working: a connection's backend is chosen once, at connect.
    let out = long.wait_output(T).unwrap();
    assert!(
        out.status.success(),
        "the long connection broke: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The agent dies (SIGKILL), then stops cleanly (SIGTERM), under a
    // storm to a Service of this node: the pinned maps keep translating,
    // and not one connection fails. (Connections carried in tunnels need
    // the agent; docs/mtls.md says what a restart costs them.)
    let before = revisions(&m, 0);
    let storm = m.bed.start_probing(WEB, "tcp:10.96.0.13:90", 3000).unwrap();
    m.agents[0].kill().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    m.agents[0] = m.start_agent(0, &[]);
    m.agents[0].stop().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    m.agents[0] = m.start_agent(0, &[]);
    let counts = probe_counts(storm, T).unwrap();
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["connected"],
        "{counts:?}"
    );
    // The restarted agent adopted the maps as they were.
    assert_eq!(revisions(&m, 0), before);
}

#[test]
fn a_traffic_split_sends_each_backend_its_weight() {
    let m = Mesh::new("svc-split", false);
    let split = "apiVersion: mesh.dev/v1alpha1\nkind: TrafficSplit\nmetadata: {name: db-canary, namespace: shop}\nspec:\n  service: db\n  backends:\n  - {service: db-a, weight: 90}\n  - {service: db-b, weight: 10}\n";
    m.bed.write_config("split.yaml", split).unwrap();
    // The root Service's slots are now the split's: 1,000 of them.
    let deadline = std::time::Instant::now() + T;
    while !services(&m, 0).iter().any(|r| {
        r["service"] == "shop/db"
            && r["address"] == "10.96.0.10:80"
            && r["backends"][0]["slots"] == 900
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the split was never applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let answers = m.tally(WEB, "10.96.0.10:80", 10_000);
    let canary = m.backend(DB_B, false, WHOAMI);
    let stable = m.backend(DB_A, false, WHOAMI);
    assert_eq!(answers.len(), 2, "{answers:?}");
    let share = answers[&canary] as f64 / 10_000.0 * 100.0;
    assert!(
        (8.0..=12.0).contains(&share),
        "canary took {share:.2}%: {answers:?}"
    );
    assert_eq!(answers[&canary] + answers[&stable], 10_000);
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_the_backend_goes() {
    let m = Mesh::new("svc-sticky", false);
    let first = m.tally(WEB, "10.96.0.14:80", 50);
    assert_eq!(first.len(), 1, "not sticky: {first:?}");
    let (held, _) = first.into_iter().next().unwrap();
    // Only the other backend stays in the Service.
    let (zone, other) = if held == m.backend(DB_A, false, WHOAMI) {
        ("b", m.backend(DB_B, false, WHOAMI))
    } else {
        ("a", m.backend(DB_A, false, WHOAMI))
    };
    let docs = DOCS.replace(
        "  clusterIP: 10.96.0.14\n  selector: {app: db}",
        &format!("  clusterIP: 10.96.0.14\n  selector: {{app: db, zone: {zone}}}"),
    );
    m.bed.write_config("services.yaml", &docs).unwrap();
    wait_backends(&m, 0, "10.96.0.14:80", 1);
    assert_eq!(
        m.tally(WEB, "10.96.0.14:80", 20),
        BTreeMap::from([(other, 20)])
    );
}

/// Port of the tagged UDP echo servers: each answer names its backend.
const TAGGED: u16 = 5454;

#[test]
fn a_connected_udp_socket_leaves_a_backend_that_left_its_service() {
    let m = Mesh::new("svc-udp-move", false);
    let mut servers = Vec::new();
    for (pod, tag) in [(DB_A, "db-a"), (DB_B, "db-b")] {
        let listen = format!("[::]:{TAGGED}");
        let mut server = m
            .bed
            .workload(
                pod,
                &["serve", "--proto", "udp", "--listen", &listen, "--tag", tag],
            )
            .unwrap();
        wait_for_line(&mut server, "listening").unwrap();
        servers.push(server);
    }
    // A resolver Service whose one backend is db-a, then db-b.
    let resolver = |zone: &str| {
        format!(
            "{DOCS}---\napiVersion: v1\nkind: Service\nmetadata: {{name: resolver, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.15\n  clusterIPs: [10.96.0.15, \"fd00:96::15\"]\n  selector: {{app: db, zone: {zone}}}\n  ports: [{{name: dns, port: 53, targetPort: {TAGGED}, protocol: UDP}}]\n"
        )
    };
    let backend_is = |pod: usize| {
        let workload = format!("shop/pod-{pod}");
        move |rows: &[Value]| {
            ["10.96.0.15:53", "[fd00:96::15]:53"].iter().all(|address| {
                rows.iter().any(|r| {
                    r["address"] == *address
                        && r["protocol"] == "udp"
                        && r["backends"].as_array().unwrap().len() == 1
                        && r["backends"][0]["workload"] == workload.as_str()
                })
            })
        }
    };
    m.bed.write_config("services.yaml", &resolver("a")).unwrap();
    wait_services(&m, 0, "db-a behind the resolver", backend_is(DB_A));

    // Sockets connected once, through the Service (both families) and
    // straight to db-a's address.
    let session = |to: String, give_up_ms: &str| {
        let mut client = m
            .bed
            .workload(
                WEB,
                &[
                    "udp-session",
                    "--to",
                    &to,
                    "--until",
                    "db-b",
                    "--give-up-ms",
                    give_up_ms,
                ],
            )
            .unwrap();
        assert_eq!(
            wait_for_line(&mut client, "answered by").unwrap().trim(),
            "answered by db-a"
        );
        client
    };
    let through_service = [
        session("10.96.0.15:53".into(), "20000"),
        session("[fd00:96::15]:53".into(), "20000"),
    ];
    let direct = session(m.backend(DB_A, false, TAGGED), "3000");

    // db-a leaves the Service (db-b, on the other node, replaces it).
    m.bed.write_config("services.yaml", &resolver("b")).unwrap();
    wait_services(&m, 0, "db-b behind the resolver", backend_is(DB_B));

    // The kernel aborted each socket the Service had sent to db-a; connected
    // again, it reached db-b.
    for client in through_service {
        let out = client.wait_output(T).unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["moved"], true, "{report}");
        // The abort is reported once; a send may first find the socket
        // unconnected. Nothing else went wrong, not even a lost answer.
        let errors = report["errors"].as_object().unwrap();
        assert_eq!(errors["aborted"], 1, "{report}");
        assert!(
            errors.keys().all(|e| e == "aborted" || e == "unconnected"),
            "{report}"
        );
        assert!(report["reconnects"].as_u64().unwrap() >= 1, "{report}");
    }
    // A socket that dialled db-a itself is the application's choice: kept.
    let out = direct.wait_output(T).unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["moved"], false, "{report}");
    assert_eq!(report["reconnects"], 0, "{report}");
    assert!(report["errors"].as_object().unwrap().is_empty(), "{report}");
}

/// The abort above is reported ahead of whatever the socket had queued, so
/// the answer to the question it interrupted can still be waiting when the
/// client asks again. The client (like a resolver) must skip it, not fall
/// one answer behind for good. A server on loopback leaves such an answer.
#[test]
fn the_udp_client_skips_an_answer_to_an_earlier_question() {
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = server.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut first = true;
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            if std::mem::take(&mut first) {
                // An answer to question 0, which the client never asked in
                // this life of its socket.
                server.send_to(b"late:0", from).unwrap();
            }
            let answer = [b"srv:", &buf[..n]].concat();
            server.send_to(&answer, from).unwrap();
        }
    });
    let out = std::process::Command::new(mesh_tests::topology::pod_tool())
        .args(["udp-session", "--to", &to.to_string(), "--until", "srv"])
        .args(["--give-up-ms", "3000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (first, report) = stdout.split_once('\n').unwrap();
    assert_eq!(first, "answered by srv", "{stdout}");
    let report: Value = serde_json::from_str(report).unwrap();
    assert_eq!(report["moved"], true, "{report}");
    assert_eq!(report["answers"], serde_json::json!({"srv": 1}), "{report}");
    assert!(report["errors"].as_object().unwrap().is_empty(), "{report}");
}
