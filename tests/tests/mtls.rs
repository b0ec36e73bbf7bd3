//! Mutual TLS between nodes on the real kernel: two nodes (network
//! namespaces joined by a fabric), pods behind each, one agent per node with
//! the mesh CA, real TLS, and a capture of the wire between the nodes.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::{self, Agent},
    capture::{self, Capture},
    process::Spawned,
    topology::{TestBed, sibling_binary},
};
use serde_json::Value;

const T: Duration = Duration::from_secs(120);
const PORT: u16 = 8080;
const TD: &str = "cluster.local";

fn id(namespace: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{namespace}/sa/{sa}")
}

/// A workload of the tests: where it runs and who it is.
struct W {
    node: usize,
    namespace: &'static str,
    sa: &'static str,
}

const fn w(node: usize, namespace: &'static str, sa: &'static str) -> W {
    W {
        node,
        namespace,
        sa,
    }
}

struct Mesh {
    bed: TestBed,
    _servers: Vec<Spawned>,
    agents: Vec<Agent>,
    ca: PathBuf,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // A failing test shows what the agents said.
        if std::thread::panicking() {
            for (n, a) in self.agents.iter().enumerate() {
                eprintln!("--- agent of node {n} ---\n{}", a.log());
            }
        }
    }
}

impl Mesh {
    fn ca_dir(&self) -> &Path {
        &self.ca
    }

    fn start_agent(&self, node: usize, extra: &[&str]) -> Agent {
        let ca = self.ca.display().to_string();
        let mut args = vec!["--ca-dir", &ca];
        args.extend_from_slice(extra);
        Agent::start_node(&self.bed, node, &args).unwrap()
    }

    fn server_addr(&self, pod: usize, v6: bool) -> String {
        self.bed.pods[pod].addr(v6, PORT).to_string()
    }

    /// `mesh-pod args…` in `pod`, in the mesh; its JSON report.
    fn client(&self, pod: usize, args: &[&str]) -> Value {
        self.bed.client(pod, true, args, T).unwrap()
    }

    /// One connection attempt, given a second (more in a VM under TCG,
    /// where a tunnel's first handshake alone can take that long).
    fn probe(&self, pod: usize, in_mesh: bool, target: &str) -> String {
        let ms = 1000 * u64::from(mesh_tests::slowdown());
        self.bed
            .probe(pod, in_mesh, &format!("tcp:{target}"), ms)
            .unwrap()
    }
}

fn mesh_agent(args: &[&str]) -> std::process::Output {
    Command::new(agent::agent_bin())
        .args(args)
        .output()
        .unwrap()
}

fn mesh_agent_ok(args: &[&str]) -> String {
    let out = mesh_agent(args);
    assert!(
        out.status.success(),
        "mesh-agent {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two connected nodes, the workloads with an echo server each, their
/// documents and the MeshNode documents, a mesh CA; agents started with
/// `agent_args` unless `start` is false.
fn mesh(test: &str, workloads: &[W], docs: &[(&str, String)], agent_args: &[&str]) -> Mesh {
    let mut mesh = mesh_without_agents(test, workloads, docs);
    mesh.agents = (0..mesh.bed.nodes.len())
        .map(|n| mesh.start_agent(n, agent_args))
        .collect();
    mesh
}

/// [`mesh`] before any agent starts.
fn mesh_without_agents(test: &str, workloads: &[W], docs: &[(&str, String)]) -> Mesh {
    let mut bed = TestBed::new(test).unwrap();
    bed.add_node().unwrap();
    bed.connect_nodes().unwrap();
    let mut servers = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        bed.add_pod(w.node).unwrap();
        bed.register_workload(i, w.namespace, w.sa, &[]).unwrap();
        let listen: SocketAddr = format!("[::]:{PORT}").parse().unwrap();
        servers.push(bed.server(i, true, listen, "echo").unwrap());
    }
    bed.write_mesh_nodes().unwrap();
    for (file, yaml) in docs {
        bed.write_config(file, yaml).unwrap();
    }
    let ca = bed.mesh_ca(TD).unwrap();
    Mesh {
        bed,
        _servers: servers,
        agents: Vec::new(),
        ca,
    }
}

fn strict(namespace: &str, name: &str, sa: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  selector: {{serviceAccount: {sa}}}\n  mtls: {{mode: STRICT}}\n"
    )
}

fn allow_only(namespace: &str, name: &str, sa: &str, from: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  selector: {{serviceAccount: {sa}}}\n  action: ALLOW\n  rules:\n  - from: [{{identity: \"{from}\"}}]\n"
    )
}

fn is_tunnel_end(end: &(std::net::IpAddr, u16)) -> bool {
    mesh_tests::topology::is_uplink_address(end.0)
}

#[test]
fn cross_node_traffic_is_unchanged_for_applications_and_the_wire_carries_only_tls() {
    let m = mesh(
        "xnode",
        &[w(0, "shop", "web"), w(1, "shop", "db")],
        &[],
        &[],
    );
    let (db4, db6) = (m.server_addr(1, false), m.server_addr(1, true));

    let fabric = m.bed.fabric().unwrap();
    let wire = Capture::start(fabric, "n1").unwrap();
    // Captured from the first byte: every tunnel's handshake is on the wire.
    // The application sees the peer it asked for, not the agent.
    for db in [&db4, &db6] {
        let report = m.client(0, &["peername", "--to", db]);
        assert_eq!(report["peer"].as_str().unwrap(), db.as_str(), "{report}");
    }
    // Byte-exact, 1 byte to 64 MiB, both address families.
    m.client(
        0,
        &[
            "transfer",
            "--to",
            &db4,
            "--sizes",
            "1,1000,65537,1048576,67108864",
        ],
    );
    m.client(0, &["transfer", "--to", &db6, "--sizes", "1,65537,4194304"]);

    // 1,000 concurrent connections, each byte-exact.
    let report = m.client(
        0,
        &[
            "transfer",
            "--to",
            &db4,
            "--sizes",
            "4096",
            "--connections",
            "1000",
        ],
    );
    assert_eq!(report["ok"], true, "{report}");
    // A known plaintext from a mesh workload…
    const SECRET: &str = "MESH-SECRET-MARKER-7f3a9c";
    m.client(
        0,
        &["say", "--to", &db4, "--text", SECRET, "--repeat", "2000"],
    );
    // …and, as the capture's own control, one from a process outside the
    // mesh (not tunnelled, so plaintext on the wire).
    const CONTROL: &str = "PLAINTEXT-CONTROL-MARKER-51e2";
    m.bed
        .client(
            0,
            false,
            &["say", "--to", &db4, "--text", CONTROL, "--repeat", "200"],
            T,
        )
        .unwrap();
    let frames = wire.stop().unwrap();

    assert!(
        capture::contains(&frames, CONTROL.as_bytes()),
        "the capture missed the plaintext control: it cannot prove anything"
    );
    assert!(
        !capture::contains(&frames, SECRET.as_bytes()),
        "the mesh workload's plaintext appeared on the wire between the nodes"
    );
    let segments = capture::segments(&frames);
    let control_port = |s: &capture::Segment| !is_tunnel_end(&s.src) && !is_tunnel_end(&s.dst);
    for s in &segments {
        assert!(
            control_port(s) || (s.proto == 6 && (s.src.1 == 15008 || s.dst.1 == 15008)),
            "traffic between the nodes that is not a tunnel: {s:?}"
        );
    }
    let tunnel: Vec<_> = segments
        .iter()
        .filter(|s| !control_port(s))
        .cloned()
        .collect();
    let streams = capture::tcp_streams(&tunnel).unwrap();
    assert!(!streams.is_empty(), "no tunnel traffic captured");
    let application_bytes = tls_application_bytes(&streams);
    // 1000 × 4 KiB each way plus the marker runs, all inside TLS records.
    assert!(application_bytes > 2 * 1000 * 4096, "{application_bytes}");
}

/// The application data carried by `streams`, each of which must be TLS
/// records from its first byte.
fn tls_application_bytes(
    streams: &std::collections::BTreeMap<capture::Direction, Vec<u8>>,
) -> usize {
    streams
        .iter()
        .map(|((src, dst), bytes)| {
            capture::tls_records(bytes)
                .unwrap_or_else(|e| panic!("{src:?} → {dst:?} is not TLS: {e}"))
                .iter()
                .filter(|r| r.0 == 23)
                .map(|r| r.1)
                .sum::<usize>()
        })
        .sum()
}

/// Whether this kernel takes the `tls` upper-layer protocol, asked as the
/// agent asks; in the kernel matrix's VMs it must.
fn kernel_has_tls() -> bool {
    if mesh_tests::in_vm() {
        return true;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let socket = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::TcpUlp::default(),
        b"tls",
    )
    .is_ok()
}

/// `mesh_bulk_tunnels_total` of `node`'s agent for `direction`, with the
/// records where this kernel puts them (0 if absent), and the metrics it
/// was read from.
fn bulk_tunnels(m: &Mesh, node: usize, direction: &str) -> (u64, String) {
    let records = if kernel_has_tls() { "kernel" } else { "user" };
    let metrics = agent::scrape_metrics(&m.bed, node).unwrap();
    let series =
        format!("mesh_bulk_tunnels_total{{direction=\"{direction}\",records=\"{records}\"}}");
    let count = agent::metric_sample(&metrics, &series).unwrap_or(0.0) as u64;
    (count, metrics)
}

#[test]
fn bulk_ports_get_a_tls_connection_each_with_kernel_tls_where_the_kernel_has_it() {
    let m = mesh(
        "bulk",
        &[w(0, "shop", "web"), w(1, "shop", "db")],
        &[],
        &["--bulk-ports", &PORT.to_string()],
    );
    let db = m.server_addr(1, false);
    let wire = Capture::start(m.bed.fabric().unwrap(), "n1").unwrap();
    m.client(0, &["transfer", "--to", &db, "--sizes", "1,65537,67108864"]);
    const SECRET: &str = "BULK-SECRET-MARKER-3c81d0";
    m.client(
        0,
        &["say", "--to", &db, "--text", SECRET, "--repeat", "500"],
    );
    let frames = wire.stop().unwrap();

    assert!(
        !capture::contains(&frames, SECRET.as_bytes()),
        "the workload's plaintext appeared on the wire between the nodes"
    );
    let segments = capture::segments(&frames);
    let tunnel: Vec<_> = segments
        .iter()
        .filter(|s| is_tunnel_end(&s.src) && is_tunnel_end(&s.dst))
        .cloned()
        .collect();
    let streams = capture::tcp_streams(&tunnel).unwrap();
    let application_bytes = tls_application_bytes(&streams);
    assert!(
        application_bytes > 2 * 64 * 1024 * 1024,
        "{application_bytes}"
    );

    // Each connection had its TLS connection, and both agents say where
    // its records were encrypted.
    for (node, direction) in [(0, "outbound"), (1, "inbound")] {
        let (count, metrics) = bulk_tunnels(&m, node, direction);
        assert!(
            count >= 2,
            "node {node}: {direction} bulk tunnels should count the transfer's and the marker's connections\n{metrics}"
        );
    }
}

#[test]
fn bulk_tunnels_ride_through_certificate_rotation_without_a_failed_request() {
    let m = mesh(
        "bulkrot",
        &[w(0, "shop", "web"), w(1, "shop", "db")],
        &[],
        &[
            "--svid-lifetime",
            "4s",
            "--renew-fraction",
            "0.5",
            "--bulk-ports",
            &PORT.to_string(),
        ],
    );
    let db = m.server_addr(1, false);
    let before = served_serials(&m, 1);

    // A bulk tunnel held for three certificate lifetimes, and new ones (a
    // handshake each, with whatever certificates are current) all along.
    let total = traffic_through_renewals(&m, &db, 50);
    let after = served_serials(&m, 1);
    assert_ne!(
        before[&id("shop", "db")],
        after[&id("shop", "db")],
        "never renewed"
    );
    // Every one of them was a bulk tunnel.
    let (bulk, _) = bulk_tunnels(&m, 0, "outbound");
    assert!(
        bulk > total,
        "{bulk} bulk tunnels for {total} probes and a held one"
    );
}

/// A certificate for `spiffe_id` from the CA in `ca`, in `out`.
fn issue(ca: &Path, spiffe_id: &str, lifetime: &str, out: &Path) -> (String, String) {
    mesh_agent_ok(&[
        "ca",
        "issue",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--spiffe-id",
        spiffe_id,
        "--lifetime",
        lifetime,
        "--out",
        out.to_str().unwrap(),
    ]);
    (
        out.join("cert.pem").display().to_string(),
        out.join("key.pem").display().to_string(),
    )
}

/// `mesh-tls-probe` from node 0's namespace, as a peer agent connects:
/// one HBONE tunnel to node 1's agent for `target`, expecting `server_id`.
fn tls_probe(
    bed: &TestBed,
    server_id: &str,
    target: &str,
    credentials: Option<&(String, String)>,
) -> Value {
    let probe = sibling_binary("mesh-tls-probe", "MESH_TLS_PROBE_BIN");
    let mut args = vec![
        "--agent",
        "198.19.255.2:15008",
        "--server-id",
        server_id,
        "--target",
        target,
    ];
    if let Some((cert, key)) = credentials {
        args.extend(["--cert", cert.as_str(), "--key", key.as_str()]);
    }
    let out = bed.nodes[0]
        .netns
        .exec(probe.to_str().unwrap(), &args)
        .unwrap_or_else(|e| panic!("{e:#}"));
    serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("probe printed no JSON: {out}"))
}

#[test]
fn tunnels_are_refused_without_a_valid_certificate_or_when_policy_denies() {
    let docs = [
        ("strict.yaml", strict("shop", "db-strict", "db")),
        (
            "allow.yaml",
            allow_only("shop", "db-from-web", "db", &id("shop", "web")),
        ),
    ];
    let m = mesh(
        "refuse",
        &[
            w(0, "shop", "web"),
            w(1, "shop", "db"),
            w(1, "shop", "api"),
            w(0, "shop", "intruder"),
        ],
        &docs,
        &[],
    );
    let db = m.server_addr(1, false);
    let files = m.bed.files.path().to_owned();
    let in_node0 = |server_id: &str, creds: Option<&(String, String)>| {
        tls_probe(&m.bed, server_id, &db, creds)
    };

    // The mesh path works: web → db through the tunnel, db is STRICT.
    assert_eq!(m.probe(0, true, &db), "connected");

    // A valid certificate of an allowed identity: the tunnel opens, and the
    // agent proves the destination's identity.
    let web = issue(m.ca_dir(), &id("shop", "web"), "1h", &files.join("web"));
    let ok = in_node0(&id("shop", "db"), Some(&web));
    assert_eq!(ok["stage"], "connected", "{ok}");
    assert_eq!(ok["echo"], "hello through the tunnel", "{ok}");
    assert_eq!(ok["served"]["uris"][0], id("shop", "db"), "{ok}");

    // A certificate for an identity the policy denies: refused with the rule.
    let intruder = issue(
        m.ca_dir(),
        &id("shop", "intruder"),
        "1h",
        &files.join("intruder"),
    );
    let denied = in_node0(&id("shop", "db"), Some(&intruder));
    assert_eq!(denied["stage"], "refused", "{denied}");
    assert_eq!(denied["status"], 403, "{denied}");
    assert!(
        denied["reason"].as_str().unwrap().contains("not allowed"),
        "{denied}"
    );

    // Another trust domain's certificate, an expired one, none at all: no
    // tunnel (the handshake fails).
    let other_ca = files.join("other-ca");
    mesh_agent_ok(&[
        "ca",
        "init",
        "--trust-domain",
        "other.example",
        "--out",
        other_ca.to_str().unwrap(),
    ]);
    let foreign = issue(
        &other_ca,
        "spiffe://other.example/ns/shop/sa/web",
        "1h",
        &files.join("foreign"),
    );
    let expired = issue(m.ca_dir(), &id("shop", "web"), "1s", &files.join("expired"));
    std::thread::sleep(Duration::from_millis(2500));
    for (what, creds) in [
        ("another trust domain", Some(&foreign)),
        ("expired", Some(&expired)),
        ("no certificate", None),
    ] {
        let r = in_node0(&id("shop", "db"), creds);
        assert!(
            r["stage"] == "tls" || r["stage"] == "http2",
            "{what}: the agent accepted the tunnel: {r}"
        );
    }

    // Plaintext from outside the mesh to a STRICT workload: dropped at the
    // node (another node) or refused at connect (same node); a PERMISSIVE
    // workload still takes it.
    let api = m.server_addr(2, false);
    assert_eq!(m.probe(0, false, &db), "timeout");
    assert_eq!(m.probe(0, false, &api), "connected");
    // A process of node 1 that is not a workload (the node's own namespace,
    // under the cgroup the programs attach to, as every process is when
    // they attach at the root): refused at connect.
    let target = format!("tcp:{db}");
    let mut cmd = Command::new(mesh_tests::topology::pod_tool());
    cmd.args(["probe", "--targets", &target, "--timeout-ms", "1000"])
        .stdout(std::process::Stdio::piped());
    let host = Spawned::spawn(
        cmd,
        &mesh_tests::process::Placement {
            netns: Some(&m.bed.nodes[1].netns),
            cgroup: Some(&m.bed.nodes[1].cgroup),
        },
    )
    .unwrap();
    let report: Value = serde_json::from_slice(&host.wait_output(T).unwrap().stdout).unwrap();
    assert_eq!(report["results"][&target], "eperm", "{report}");
    // A mesh workload that policy denies is refused by its own node at
    // connect (and never gets a tunnel).
    assert_eq!(m.probe(3, true, &db), "eperm");
}

/// Starts `mesh-pod probe` of TCP `target` in `pod`, repeating for `ms`.
/// New connections from pod 0 to `db` all along for 12 s, and one held
/// for all of it: each must succeed, and at least `least` connect. Their
/// count.
fn traffic_through_renewals(m: &Mesh, db: &str, least: u64) -> u64 {
    let long_lived = m
        .bed
        .workload(0, &["pingpong", "--to", db, "--seconds", "12"])
        .unwrap();
    let counts = finish_probing(start_probing(m, 0, db, 12_000));
    let total: u64 = counts.values().sum();
    assert_eq!(
        counts.get("connected"),
        Some(&total),
        "failed requests: {counts:?}"
    );
    assert!(
        total > least,
        "too few requests to say anything: {counts:?}"
    );
    let out = long_lived.wait_output(T).unwrap();
    assert!(
        out.status.success(),
        "the long-lived connection broke: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    total
}

fn start_probing(m: &Mesh, pod: usize, target: &str, ms: u64) -> Spawned {
    m.bed
        .start_probing(pod, &format!("tcp:{target}"), ms)
        .unwrap()
}

/// Result → how often it came up, for the one target of `start_probing`.
fn finish_probing(p: Spawned) -> std::collections::BTreeMap<String, u64> {
    mesh_tests::topology::probe_counts(p, T).unwrap()
}

/// `inspect certs -o json` of a node: SPIFFE ID → serial.
fn served_serials(m: &Mesh, node: usize) -> std::collections::BTreeMap<String, String> {
    let out = agent::cli(
        &m.bed.pin_dir(node),
        &[
            "--state-dir",
            m.bed.state_dir(node).to_str().unwrap(),
            "inspect",
            "certs",
            "-o",
            "json",
        ],
    )
    .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v["certificates"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|c| {
            (
                c["spiffe_id"].as_str().unwrap().to_string(),
                c["serial"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn certificates_rotate_under_continuous_traffic_without_a_failed_request() {
    let m = mesh(
        "rotate",
        &[w(0, "shop", "web"), w(1, "shop", "db")],
        &[],
        &["--svid-lifetime", "4s", "--renew-fraction", "0.5"],
    );
    let db = m.server_addr(1, false);
    let before = served_serials(&m, 1);
    assert!(before.contains_key(&id("shop", "db")), "{before:?}");
    let web = issue(
        m.ca_dir(),
        &id("shop", "web"),
        "1h",
        &m.bed.files.path().join("web"),
    );
    let first = tls_probe(&m.bed, &id("shop", "db"), &db, Some(&web));
    assert_eq!(first["stage"], "connected", "{first}");

    // New connections all along, and one long-lived connection, for three
    // certificate lifetimes (six renewals).
    traffic_through_renewals(&m, &db, 100);

    let after = served_serials(&m, 1);
    assert_ne!(
        before[&id("shop", "db")],
        after[&id("shop", "db")],
        "never renewed"
    );
    let last = tls_probe(&m.bed, &id("shop", "db"), &db, Some(&web));
    assert_eq!(last["stage"], "connected", "{last}");
    assert_ne!(
        first["served"]["serial"], last["served"]["serial"],
        "the served certificate did not change"
    );
    assert_eq!(
        last["served"]["serial"]
            .as_str()
            .unwrap()
            .replace(':', "")
            .to_lowercase(),
        after[&id("shop", "db")].replace(':', "").to_lowercase(),
        "the agent serves the certificate inspect shows"
    );
}

#[test]
fn a_restarted_agent_carries_new_connections_within_a_second_and_same_node_traffic_never_stops() {
    let mut m = mesh(
        "restart",
        &[w(0, "shop", "web"), w(1, "shop", "db"), w(1, "shop", "api")],
        &[],
        &[],
    );
    let (db, api) = (m.server_addr(1, false), m.server_addr(2, false));
    assert_eq!(m.probe(0, true, &db), "connected");

    // Same-node traffic on node 1 while its agent is killed and restarted.
    let local = start_probing(&m, 2, &db, 4000);
    m.agents[1].kill().unwrap();
    // Fail closed while it is down: refused, never carried in plaintext.
    assert_ne!(m.probe(0, true, &db), "connected");
    let restarted = m.start_agent(1, &[]);
    let ready = Instant::now();
    m.agents[1] = restarted;
    let mut first_ok = None;
    while ready.elapsed() < Duration::from_secs(5) {
        if m.probe(0, true, &db) == "connected" {
            first_ok = Some(ready.elapsed());
            break;
        }
    }
    let first_ok = first_ok.expect("no new cross-node connection within 5 s of the restart");
    assert!(
        first_ok < Duration::from_secs(1),
        "first new connection after {first_ok:?}"
    );
    let counts = finish_probing(local);
    let total: u64 = counts.values().sum();
    assert_eq!(
        counts.get("connected"),
        Some(&total),
        "same-node traffic stopped: {counts:?}"
    );
    let _ = api;
}

#[test]
fn flows_report_the_identity_mutual_tls_verified() {
    let m = mesh(
        "flows",
        &[w(0, "shop", "web"), w(1, "shop", "db")],
        &[],
        &[],
    );
    let db = m.server_addr(1, false);
    assert_eq!(m.probe(0, true, &db), "connected");
    let state = m.bed.state_dir(1);
    let out = agent::cli(
        &m.bed.pin_dir(1),
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "flows",
            "-o",
            "json",
        ],
    )
    .unwrap();
    let tunnel_in: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|f| f["hook"] == "tunnel-in")
        .collect();
    assert!(
        !tunnel_in.is_empty(),
        "no tunnel flow on the destination node: {out}"
    );
    let f = &tunnel_in[0];
    assert_eq!(f["mtls"], id("shop", "web"), "{f}");
    assert_eq!(f["src"]["identity"], id("shop", "web"), "{f}");
    assert_eq!(f["dst"]["identity"], id("shop", "db"), "{f}");
    assert_eq!(f["verdict"], "ALLOW", "{f}");
    // The agent let its node reuse ports in TIME_WAIT (its connections to
    // local workloads close first), or sustained rates run out of ports.
    let reuse = m.bed.nodes[1]
        .netns
        .exec("sysctl", &["-n", "net.ipv4.tcp_tw_reuse"])
        .unwrap();
    assert_eq!(reuse.trim(), "1");

    // explain, on the source's node, says the path proves the identity.
    let state0 = m.bed.state_dir(0);
    let web = id("shop", "web");
    let out = agent::cli(
        &m.bed.pin_dir(0),
        &[
            "--state-dir",
            state0.to_str().unwrap(),
            "explain",
            "--from",
            &web,
            "--to",
            db.rsplit_once(':').unwrap().0,
            "--port",
            "8080",
            "-o",
            "json",
        ],
    )
    .unwrap();
    let e: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e[0]["verdict"], "ALLOW", "{e}");
    assert!(
        e[0]["path"].as_str().unwrap().starts_with("mTLS tunnel"),
        "{e}"
    );
}

#[test]
fn the_ca_service_signs_only_identities_a_node_hosts() {
    let mut m = mesh_without_agents("casvc", &[w(0, "shop", "web"), w(1, "shop", "db")], &[]);
    let files = m.bed.files.path().to_owned();
    let ca = m.ca.clone();
    let creds: Vec<PathBuf> = (0..2)
        .map(|n| {
            let out = files.join(format!("node-{n}"));
            mesh_agent_ok(&[
                "ca",
                "issue-node",
                "--ca-dir",
                ca.to_str().unwrap(),
                "--node",
                &format!("node-{n}"),
                "--out",
                out.to_str().unwrap(),
            ]);
            out
        })
        .collect();
    // The CA service runs on node 0; node 1 reaches it over the fabric.
    let mut cmd = Command::new(agent::agent_bin());
    cmd.args([
        "ca",
        "serve",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--listen",
        "198.19.255.1:15012",
        "--config-dir",
    ])
    .arg(m.bed.config_dir())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let mut service = Spawned::spawn(
        cmd,
        &mesh_tests::process::Placement {
            netns: Some(&m.bed.nodes[0].netns),
            cgroup: None,
        },
    )
    .unwrap();
    wait_for_line_stderr(&mut service, "ready");

    m.agents = (0..2)
        .map(|n| {
            Agent::start_node(
                &m.bed,
                n,
                &[
                    "--ca-address",
                    "198.19.255.1:15012",
                    "--node-credentials",
                    creds[n].to_str().unwrap(),
                ],
            )
            .unwrap()
        })
        .collect();
    let db = m.bed.pods[1].addr(false, PORT).to_string();
    let target = format!("tcp:{db}");
    let report = m
        .bed
        .client(0, true, &["probe", "--targets", &target], T)
        .unwrap();
    assert_eq!(report["results"][&target], "connected", "{report}");

    // Node 0 asking for db's identity (db runs on node 1): refused.
    let ask = |node: usize, spiffe: &str| {
        m.bed.nodes[node].netns.exec(
            agent::agent_bin().to_str().unwrap(),
            &[
                "ca",
                "request",
                "--ca-address",
                "198.19.255.1:15012",
                "--node-credentials",
                creds[node].to_str().unwrap(),
                "--spiffe-id",
                spiffe,
            ],
        )
    };
    let refused = ask(0, &id("shop", "db")).expect_err("node 0 got a certificate for db");
    let text = format!("{refused:#}");
    assert!(
        text.contains("node-0") && text.contains(&id("shop", "db")),
        "{text}"
    );
    // …while its own workload's identity is granted, and node 1 may have db's.
    ask(0, &id("shop", "web")).unwrap();
    ask(1, &id("shop", "db")).unwrap();
}

/// Waits for a line containing `needle` on the process's stderr.
fn wait_for_line_stderr(process: &mut Spawned, needle: &str) {
    use std::io::BufRead as _;
    let stderr = process.child_mut().stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if line.contains(needle) {
                return;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
    }
    panic!("no {needle:?} within 20 s:\n{seen}");
}

#[test]
fn the_ca_rotates_under_continuous_traffic_without_a_failed_request() {
    let m = mesh(
        "carot",
        &[w(0, "shop", "web"), w(1, "shop", "db")],
        &[],
        &["--svid-lifetime", "3s", "--renew-fraction", "0.5"],
    );
    let db = m.server_addr(1, false);
    let ca = m.ca_dir().to_str().unwrap().to_owned();
    let web = issue(
        m.ca_dir(),
        &id("shop", "web"),
        "1h",
        &m.bed.files.path().join("web"),
    );
    let before = tls_probe(&m.bed, &id("shop", "db"), &db, Some(&web));
    assert_eq!(before["stage"], "connected", "{before}");

    let traffic = start_probing(&m, 0, &db, 16_000);
    std::thread::sleep(Duration::from_secs(2));
    mesh_agent_ok(&["ca", "rotate", "--ca-dir", &ca]);
    // Both agents pick the new root up and renew onto it; then the old root
    // is retired everywhere.
    std::thread::sleep(Duration::from_secs(8));
    mesh_agent_ok(&["ca", "prune", "--ca-dir", &ca]);
    let counts = finish_probing(traffic);
    let total: u64 = counts.values().sum();
    assert_eq!(
        counts.get("connected"),
        Some(&total),
        "failed requests: {counts:?}"
    );
    assert!(total > 100, "too few requests to say anything: {counts:?}");

    // The agent now serves a certificate from the new root.
    let fresh = issue(
        m.ca_dir(),
        &id("shop", "web"),
        "1h",
        &m.bed.files.path().join("web2"),
    );
    let after = tls_probe(&m.bed, &id("shop", "db"), &db, Some(&fresh));
    assert_eq!(after["stage"], "connected", "{after}");
    assert_ne!(
        before["served"]["issuer"], after["served"]["issuer"],
        "{before} {after}"
    );
    // And a certificate of the retired root is refused once agents re-read
    // the bundle (within 5 s).
    std::thread::sleep(Duration::from_secs(6));
    let stale = tls_probe(&m.bed, &id("shop", "db"), &db, Some(&web));
    assert!(
        stale["stage"] == "tls" || stale["stage"] == "http2",
        "old root still trusted: {stale}"
    );
}

#[test]
fn the_workload_to_agent_hop_uses_the_short_circuit() {
    let m = mesh(
        "hop",
        &[w(0, "shop", "web"), w(1, "shop", "db")],
        &[],
        &["--short-circuit", "on"],
    );
    let db = m.server_addr(1, false);
    let before = agent::counter(&m.bed.pin_dir(0), "msgs_redirected").unwrap();
    m.client(0, &["transfer", "--to", &db, "--sizes", "1,65537,4194304"]);
    let after = agent::counter(&m.bed.pin_dir(0), "msgs_redirected").unwrap();
    assert!(
        after > before,
        "no message between the workload and the agent was redirected"
    );
}

#[test]
fn a_host_holding_handshakes_open_cannot_hold_the_tunnel_listener() {
    // db on node 0; web on node 1, whose agent tunnels to node 0.
    let m = mesh(
        "hold",
        &[w(0, "shop", "db"), w(1, "shop", "web")],
        &[("strict.yaml", strict("shop", "db-strict", "db"))],
        &[],
    );
    let db = m.server_addr(0, false);

    // Another host (here node 0's own address, a peer of its own) opens 100
    // connections to the tunnel listener and never starts TLS.
    let listener = SocketAddr::new(mesh_tests::topology::node_uplink_ip(0), 15008);
    let held: Vec<std::net::TcpStream> = m.bed.nodes[0]
        .netns
        .run_in(|| {
            (0..100)
                .map(|_| std::net::TcpStream::connect(listener))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .unwrap();
    // Those past the per-peer bound were closed at once; the others wait
    // for a handshake, until its timeout.
    std::thread::sleep(Duration::from_millis(500));
    let closed = held
        .iter()
        .filter(|conn| {
            conn.set_nonblocking(true).unwrap();
            match std::io::Read::read(&mut &**conn, &mut [0u8; 1]) {
                Ok(0) => true,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                Ok(_) => false,
            }
        })
        .count();
    assert_eq!(closed, 100 - 64, "connections closed at accept");
    let metrics = agent::scrape_metrics(&m.bed, 0).unwrap();
    assert!(
        metrics
            .contains("mesh_tunnel_refused_connections_total{reason=\"handshakes_per_peer\"} 36"),
        "{metrics}"
    );
    // Meanwhile another peer's handshakes (node 1's agent has no
    // connection yet) and tunnels are made as ever.
    m.client(1, &["transfer", "--to", &db, "--sizes", "1,65537"]);
    // A scrape within a second of the last one gets the same render.
    std::thread::sleep(Duration::from_millis(1100));
    let metrics = agent::scrape_metrics(&m.bed, 0).unwrap();
    assert!(
        metrics.contains("mesh_tunnel_handshakes_total{direction=\"inbound\",result=\"ok\"} 1"),
        "{metrics}"
    );
    drop(held);
}

/// `mesh-agent graph` on `node`, as `format`.
fn graph(m: &Mesh, node: usize, format: &str) -> String {
    let state = m.bed.state_dir(node);
    agent::cli(
        &m.bed.pin_dir(node),
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "graph",
            "-o",
            format,
        ],
    )
    .unwrap()
}

/// The arcs of a JSON service map: (from's label, to's label, verdict,
/// path) → connections.
fn arcs(json: &str) -> std::collections::BTreeMap<(String, String, String, String), u64> {
    let map: Value = serde_json::from_str(json).unwrap_or_else(|_| panic!("{json}"));
    let label = |id: &Value| {
        let id = id.as_str().unwrap();
        id.rsplit('/').next().unwrap().to_string()
    };
    map["arcs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap().to_string();
            (
                (label(&a["from"]), label(&a["to"]), s("verdict"), s("path")),
                a["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_service_map_shows_real_connections_by_verdict_and_path() {
    let docs = [
        (
            "db.yaml",
            allow_only("shop", "db-from-web", "db", &id("shop", "web")),
        ),
        (
            "cache.yaml",
            allow_only("shop", "cache-from-web", "cache", &id("shop", "web")),
        ),
    ];
    let m = mesh(
        "graph",
        &[
            w(0, "shop", "web"),
            w(1, "shop", "db"),
            w(0, "shop", "cache"),
            w(0, "lab", "robot"),
        ],
        &docs,
        &[],
    );
    let (db, cache) = (m.server_addr(1, false), m.server_addr(2, false));
    for _ in 0..2 {
        assert_eq!(m.probe(0, true, &cache), "connected");
    }
    assert_eq!(m.probe(0, true, &db), "connected");
    for _ in 0..3 {
        assert_ne!(m.probe(3, true, &cache), "connected");
    }
    let key = |from: &str, to: &str, verdict: &str, path: &str| {
        (from.into(), to.into(), verdict.into(), path.into())
    };
    // The flow events reach the agent a moment after the connection.
    let deadline = Instant::now() + T;
    let source_node = loop {
        let arcs = arcs(&graph(&m, 0, "json"));
        if arcs.get(&key("robot", "cache", "denied", "same-node")) == Some(&3)
            || Instant::now() > deadline
        {
            break arcs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        source_node,
        [
            (key("robot", "cache", "denied", "same-node"), 3),
            (key("web", "cache", "allowed", "same-node"), 2),
            (key("web", "db", "allowed", "mtls"), 1),
        ]
        .into_iter()
        .collect(),
    );
    // The destination's node counts what came through its tunnel.
    let dest_node = arcs(&graph(&m, 1, "json"));
    assert_eq!(
        dest_node.get(&key("web", "db", "allowed", "mtls")),
        Some(&1),
        "{dest_node:?}"
    );
    // The pictures of the same counters.
    let dot = graph(&m, 0, "dot");
    assert!(
        dot.contains("subgraph cluster_") && dot.contains("label=\"lab\""),
        "{dot}"
    );
    assert!(dot.contains("\"3 denied, same node\""), "{dot}");
    let svg = graph(&m, 0, "svg");
    assert!(
        svg.contains("<svg") && svg.contains("3 denied, same node"),
        "{svg}"
    );
}
