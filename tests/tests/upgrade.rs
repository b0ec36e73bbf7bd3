//! Restarts and upgrades of the node agent under continuous traffic, on the
//! real kernel: two nodes with mutual TLS between them, allowed and denied
//! flows on the same node and across nodes running all along, and the agent
//! of one node killed, restarted, upgraded from the previous map layout and
//! downgraded. What the issue promises: no denied flow ever passes, no
//! allowed same-node connection breaks, cross-node connections resume within
//! a second of the new agent being ready.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::{self, Agent},
    process::Spawned,
    topology::{TestBed, UPLINK, wait_for_line},
};
use serde_json::Value;

const T: Duration = Duration::from_secs(120);
const PORT: u16 = 8080;
const TD: &str = "cluster.local";
/// Pods: web on node 0 and db, api, robot on node 1 are workloads; pod 4
/// on node 0 is no workload (plaintext from outside the mesh).
const WEB: usize = 0;
const DB: usize = 1;
const API: usize = 2;
const ROBOT: usize = 3;
const OUTSIDER: usize = 4;

struct Scene {
    bed: TestBed,
    _server: Spawned,
    agents: Vec<Agent>,
    ca: PathBuf,
    config_dir: PathBuf,
    /// Further flags of every agent.
    extra: Vec<&'static str>,
}

impl Drop for Scene {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (n, a) in self.agents.iter().enumerate() {
                eprintln!("--- agent of node {n} ---\n{}", a.log());
            }
        }
    }
}

/// Two connected nodes, db allowing web and api only, a mesh CA; agents
/// of `bin` on both nodes.
fn scene(test: &str, bin: &Path) -> Scene {
    scene_with(test, bin, &[])
}

/// [`scene`], the agents run with the flags `extra`.
fn scene_with(test: &str, bin: &Path, extra: &[&'static str]) -> Scene {
    let mut bed = TestBed::new(test).unwrap();
    bed.add_node().unwrap();
    bed.connect_nodes().unwrap();
    for node in [0, 1, 1, 1, 0] {
        bed.add_pod(node).unwrap();
    }
    for (pod, sa) in [(WEB, "web"), (DB, "db"), (API, "api"), (ROBOT, "robot")] {
        bed.register_workload(pod, "shop", sa, &[]).unwrap();
    }
    let listen: SocketAddr = format!("[::]:{PORT}").parse().unwrap();
    let server = bed.server(DB, true, listen, "echo").unwrap();
    bed.write_mesh_nodes().unwrap();
    bed.write_config(
        "db.yaml",
        &format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: db, namespace: shop}}\nspec:\n  selector: {{serviceAccount: db}}\n  action: ALLOW\n  rules:\n  - from: [{{identity: \"{}\"}}, {{identity: \"{}\"}}]\n",
            id("web"),
            id("api")
        ),
    )
    .unwrap();
    let ca = bed.mesh_ca(TD).unwrap();
    let config_dir = bed.config_dir();
    let mut scene = Scene {
        bed,
        _server: server,
        agents: Vec::new(),
        ca,
        config_dir,
        extra: extra.to_vec(),
    };
    scene.agents = (0..2).map(|n| scene.start(n, bin).unwrap()).collect();
    scene
}

fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/shop/sa/{sa}")
}

impl Scene {
    fn start(&self, node: usize, bin: &Path) -> anyhow::Result<Agent> {
        Agent::start_node_as(&self.bed, node, bin, &self.args())
    }

    fn args(&self) -> Vec<&str> {
        let mut args = vec![
            "--config-dir",
            self.config_dir.to_str().unwrap(),
            "--ca-dir",
            self.ca.to_str().unwrap(),
        ];
        args.extend_from_slice(&self.extra);
        args
    }

    fn db(&self) -> String {
        self.bed.pods[DB].addr(false, PORT).to_string()
    }

    /// Replaces the agent of `node` with one of `bin` (SIGKILL or SIGTERM
    /// first), and returns how long after it said ready a new connection
    /// from web (node 0) to db (node 1) first got through.
    fn replace(&mut self, node: usize, bin: &Path, kill: bool) -> Duration {
        eprintln!("{} replacing the agent of node {node}", unix_ms());
        if kill {
            self.agents[node].kill().unwrap();
        } else {
            let status = self.agents[node].stop().unwrap();
            assert!(status.success(), "the agent stopped with {status}");
        }
        self.agents[node] = self.start(node, bin).unwrap();
        eprintln!("{} the new agent of node {node} is ready", unix_ms());
        let ready = Instant::now();
        while ready.elapsed() < Duration::from_secs(5) {
            if self.probe_db(WEB) == "connected" {
                return ready.elapsed();
            }
        }
        panic!("no cross-node connection within 5 s of the new agent being ready");
    }

    /// One connection attempt from `pod` to db: connected, eperm, timeout…
    /// It waits up to the whole bound on resuming (1 s): an attempt given
    /// up early would only start the tunnel again and blur the figure.
    fn probe_db(&self, pod: usize) -> String {
        let target = format!("tcp:{}", self.db());
        self.bed.probe(pod, true, &target, 1000).unwrap()
    }

    fn pin(&self, node: usize, map: &str) -> PathBuf {
        self.bed.pin_dir(node).join(map)
    }
}

/// Flows that run while agents come and go.
struct Traffic {
    same_node_allowed: Spawned,
    same_node_denied: Spawned,
    cross_node_denied: Spawned,
    long_lived: Spawned,
}

impl Traffic {
    fn start(s: &Scene) -> Self {
        let target = format!("tcp:{}", s.db());
        // Under the SYN's first retransmission (1 s), so a dropped SYN
        // still fails a probe, and far over what a loaded machine takes to
        // schedule the echo (the machines are shared: 200 ms was not).
        let probe = ["probe", "--targets", &target, "--timeout-ms", "900"];
        let probe = [&probe[..], &["--repeat-ms", "600000"]].concat();
        let started = |mut p: Spawned| {
            wait_for_line(&mut p, "probing").unwrap();
            p
        };
        Self {
            same_node_allowed: started(s.bed.workload(API, &probe).unwrap()),
            same_node_denied: started(s.bed.workload(ROBOT, &probe).unwrap()),
            cross_node_denied: started(s.bed.outsider(OUTSIDER, &probe).unwrap()),
            long_lived: s
                .bed
                .workload(API, &["pingpong", "--to", &s.db(), "--seconds", "600"])
                .unwrap(),
        }
    }

    /// Ends the flows (SIGTERM: they report what they saw) and checks it.
    fn finish(self) {
        let allowed = probe_counts(self.same_node_allowed);
        let total: u64 = allowed.values().sum();
        assert!(total >= 20, "too few same-node connections: {allowed:?}");
        assert_eq!(
            allowed.get("connected"),
            Some(&total),
            "an allowed same-node connection failed: {allowed:?}"
        );
        let denied = probe_counts(self.same_node_denied);
        assert!(denied.values().sum::<u64>() >= 20, "{denied:?}");
        assert_eq!(denied.get("connected"), None, "a denied flow passed");
        assert_eq!(denied.keys().collect::<Vec<_>>(), ["eperm"], "{denied:?}");
        let outside = probe_counts(self.cross_node_denied);
        assert!(outside.values().sum::<u64>() >= 5, "{outside:?}");
        assert_eq!(
            outside.get("connected"),
            None,
            "plaintext from outside the mesh passed: {outside:?}"
        );
        let report = sigterm_report(self.long_lived);
        assert_eq!(
            report["ok"], true,
            "the long-lived same-node connection broke: {report}"
        );
        assert!(report["rounds"].as_u64().unwrap() > 100, "{report}");
    }
}

fn sigterm_report(p: Spawned) -> Value {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = p.wait_output(T).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("no report: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// The wall clock in milliseconds, as the probes report their failures.
fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Result → how often it came up.
fn probe_counts(p: Spawned) -> BTreeMap<String, u64> {
    let report = sigterm_report(p);
    if let Some(failures) = report["failures"].as_array().filter(|f| !f.is_empty()) {
        eprintln!("probes that did not connect: {failures:?}");
    }
    let counts = report["counts"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap();
    counts
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

#[test]
fn twenty_restarts_under_traffic_pass_no_denied_flow_and_break_no_allowed_connection() {
    let mut s = scene("restart20", &agent::agent_bin());
    let traffic = Traffic::start(&s);
    let mut resumed = Vec::new();
    for i in 0..20 {
        // The destination's node (whose agent serves the tunnels and runs
        // the flows under way) and the source's (whose agent opens them
        // from web's namespace), by crash and by orderly stop alike.
        let node = if i % 4 < 2 { 1 } else { 0 };
        let kill = i % 2 == 0;
        let took = s.replace(node, &agent::agent_bin(), kill);
        resumed.push((node, if kill { "SIGKILL" } else { "SIGTERM" }, took));
    }
    traffic.finish();
    eprintln!("cross-node connections resumed after (node, signal, time) {resumed:?}");
    let slowest = resumed.iter().max_by_key(|(_, _, took)| *took).unwrap();
    assert!(
        slowest.2 < Duration::from_secs(1),
        "a cross-node connection waited {:?} after the agent of node {} was ready again ({})",
        slowest.2,
        slowest.0,
        slowest.1
    );
    // Every hook kept the first agent's attachment: swapped, never detached.
    for node in 0..2 {
        let log = s.agents[node].log();
        assert!(log.contains("adopted_pins=true"), "{log}");
        // 10 cgroup hooks and tc in both directions on the uplink (TCX
        // links, or clsact filters on a kernel without TCX).
        let adopted = log.matches("adopted pinned link").count()
            + log
                .matches("replaced the program of the mesh's tc filter")
                .count();
        assert_eq!(adopted, 12, "{log}");
    }
}

/// The mesh's tc filters on node `node`'s uplink, from `tc` itself:
/// (hook, priority, handle, program name, program id).
fn uplink_filters(s: &Scene, node: usize) -> Vec<(String, u64, String, String, u64)> {
    let mut found = Vec::new();
    for hook in ["ingress", "egress"] {
        let out = s.bed.nodes[node]
            .netns
            .exec("tc", &["-j", "filter", "show", "dev", UPLINK, hook])
            .unwrap();
        let filters: Value = serde_json::from_str(&out).unwrap_or(Value::Array(vec![]));
        for f in filters.as_array().unwrap() {
            let Some(options) = f.get("options") else {
                continue; // the entry of the priority itself
            };
            found.push((
                hook.to_string(),
                f["pref"].as_u64().unwrap(),
                options["handle"].as_str().unwrap_or_default().to_string(),
                options["bpf_name"].as_str().unwrap_or_default().to_string(),
                options["prog"]["id"].as_u64().unwrap_or_default(),
            ));
        }
    }
    found
}

/// On kernels without TCX (forced here with `--tc-attach netlink`) the tc
/// programs are clsact filters, which cannot be pinned: a restart must give
/// the mesh's filter its new program in place, never leaving the uplink
/// without one (plaintext from outside the mesh would pass) and never
/// adding a second filter beside the first.
#[test]
fn restarts_on_clsact_filters_replace_their_program_in_place() {
    let mut s = scene_with(
        "restart-clsact",
        &agent::agent_bin(),
        &["--tc-attach", "netlink"],
    );
    let first = uplink_filters(&s, 1);
    let ours =
        |filters: &[(String, u64, String, String, u64)]| -> Vec<(String, u64, String, String)> {
            filters
                .iter()
                .map(|(hook, pref, handle, name, _)| {
                    (hook.clone(), *pref, handle.clone(), name.clone())
                })
                .collect()
        };
    // One filter per hook, first in the chain, with the mesh's handle.
    assert_eq!(
        ours(&first),
        [
            (
                "ingress".into(),
                1,
                "0x6d657368".into(),
                "mesh_ingress".into()
            ),
            (
                "egress".into(),
                1,
                "0x6d657368".into(),
                "mesh_egress".into()
            ),
        ],
        "{first:?}"
    );
    // What is pinned for the hook is the filter's program.
    let pinned = Command::new("bpftool")
        .args(["-j", "prog", "show", "pinned"])
        .arg(s.bed.pin_dir(1).join("tc_ingress_uplink"))
        .output()
        .unwrap();
    let pinned: Value = serde_json::from_slice(&pinned.stdout).unwrap();
    assert_eq!(pinned["id"].as_u64(), Some(first[0].4), "{pinned}");
    let traffic = Traffic::start(&s);
    let mut programs = vec![first.iter().map(|f| f.4).collect::<Vec<_>>()];
    for i in 0..8 {
        let node = if i % 4 < 2 { 1 } else { 0 };
        s.replace(node, &agent::agent_bin(), i % 2 == 0);
        if node == 1 {
            let now = uplink_filters(&s, 1);
            assert_eq!(ours(&now), ours(&first), "restart {i}: {now:?}");
            programs.push(now.iter().map(|f| f.4).collect());
        }
    }
    traffic.finish();
    // Each restart of node 1's agent gave the same filters new programs.
    for pair in programs.windows(2) {
        assert!(
            pair[0][0] != pair[1][0] && pair[0][1] != pair[1][1],
            "a restart left a filter's program as it was: {programs:?}"
        );
    }
    let log = s.agents[1].log();
    assert!(
        log.contains("tc=\"netlink\"") || log.contains("tc=netlink"),
        "{log}"
    );
    assert_eq!(
        log.matches("replaced the program of the mesh's tc filter")
            .count(),
        2,
        "{log}"
    );
    // status reads the pinned programs: the uplink is guarded.
    let status = s.bed.nodes[1]
        .netns
        .exec(
            agent::agent_bin().to_str().unwrap(),
            &[
                "--bpffs",
                s.bed.pin_dir(1).to_str().unwrap(),
                "--state-dir",
                s.bed.state_dir(1).to_str().unwrap(),
                "status",
            ],
        )
        .unwrap_or_else(|e| format!("{e:#}"));
    assert!(status.contains("tc on uplink (clsact filters)"), "{status}");
}

/// `bpftool map show` of a pin, as JSON.
fn map_info(pin: &Path) -> Value {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn set_layout_version(pins: &Path, version: u8) {
    let status = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(pins.join("SETTINGS"))
        .args([
            "key",
            "4",
            "0",
            "0",
            "0",
            "value",
            &version.to_string(),
            "0",
            "0",
            "0",
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

fn refused(s: &Scene, node: usize, bin: &Path) -> String {
    let mut agent = Agent::spawn_node_as(&s.bed, node, bin, &s.args()).unwrap();
    let status = agent.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!status.success(), "the agent started:\n{}", agent.log());
    agent.log()
}

#[test]
fn upgrade_from_the_previous_layout_migrates_under_traffic_and_a_downgrade_refuses() {
    let previous = agent::previous_agent_bin().unwrap();
    let current = agent::agent_bin();
    let mut s = scene("upgrade", &previous);
    let conntrack = s.pin(1, "CONNTRACK");
    assert_eq!(
        map_info(&conntrack)["bytes_value"],
        16,
        "layout 1 conntrack"
    );

    let traffic = Traffic::start(&s);
    // Flows the previous agent's programs recorded: the outsider's, denied.
    std::thread::sleep(Duration::from_millis(300));
    let before = map_info(&conntrack)["id"].clone();

    // Upgrade node 1 as a DaemonSet does: SIGTERM, then the new version.
    let upgrade = s.replace(1, &current, false);
    let info = map_info(&conntrack);
    assert_eq!(
        info["bytes_value"], 32,
        "conntrack migrated to layout 2 and on"
    );
    assert_ne!(info["id"], before, "a new map");
    let log = s.agents[1].log();
    assert!(log.contains("map migrated"), "{log}");
    assert!(
        !s.bed.pin_dir(1).join("CONNTRACK_OLD_LAYOUT").exists(),
        "the old map's pin is removed"
    );
    // The flows the old programs recorded were carried over, now with the
    // identities the verdicts were made for.
    let flows: Value = serde_json::from_str(
        &agent::cli(
            &s.bed.pin_dir(1),
            &[
                "--state-dir",
                s.bed.state_dir(1).to_str().unwrap(),
                "inspect",
                "conntrack",
                "-o",
                "json",
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let outsider = s.bed.pods[OUTSIDER].ip4.to_string();
    assert!(
        flows.as_array().unwrap().iter().any(|f| {
            f["src"].as_str().unwrap().starts_with(&outsider)
                && f["src_identity"] == "world"
                && f["dst_identity"] == id("db")
                && f["action"] == "DENY"
        }),
        "{flows:#}"
    );

    // Node 0 too: both nodes on the new version.
    let upgrade0 = s.replace(0, &current, false);

    // A downgrade to the previous layout refuses and leaves the pins be.
    s.agents[1].stop().unwrap();
    let log = refused(&s, 1, &previous);
    assert!(log.contains("Refusing to reuse it"), "{log}");
    assert_eq!(map_info(&conntrack)["bytes_value"], 32);
    // So does this version on pins of a newer layout.
    let ours = mesh_common::MAP_LAYOUT_VERSION as u8;
    set_layout_version(&s.bed.pin_dir(1), ours + 1);
    let log = refused(&s, 1, &current);
    assert!(
        log.contains(&format!("newer than this agent's layout {ours}")),
        "{log}"
    );
    set_layout_version(&s.bed.pin_dir(1), ours);
    s.agents[1] = s.start(1, &current).unwrap();

    traffic.finish();
    for (node, took) in [(1, upgrade), (0, upgrade0)] {
        assert!(
            took < Duration::from_secs(1),
            "node {node}: a cross-node connection waited {took:?} after the upgrade"
        );
    }
}

#[test]
fn sigterm_drains_open_tunnels_turns_new_ones_away_and_leaves_the_programs_enforcing() {
    let mut s = scene("drain", &agent::agent_bin());
    let db = s.db();
    // A cross-node connection through a tunnel, open across the SIGTERM.
    let open = s
        .bed
        .workload(WEB, &["pingpong", "--to", &db, "--seconds", "3"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.agents[1].pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let signalled = Instant::now();
    s.agents[1]
        .wait_log("tunnel listener closed", 1, Duration::from_secs(5))
        .unwrap();
    // While the open tunnel drains, a new one is turned away.
    assert_ne!(s.probe_db(WEB), "connected");
    let out = open.wait_output(T).unwrap();
    assert!(
        out.status.success(),
        "the open tunnel was cut: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status = s.agents[1].wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}");
    let drained = signalled.elapsed();
    assert!(
        drained > Duration::from_secs(2),
        "the agent left before its open tunnel ended ({drained:?})"
    );
    // No agent on node 1 now: its programs still decide.
    assert_eq!(s.probe_db(ROBOT), "eperm");
    assert_eq!(s.probe_db(API), "connected");

    // The client's side drains too: a connection its agent carries into a
    // tunnel runs to its end after that agent's SIGTERM.
    s.agents[1] = s.start(1, &agent::agent_bin()).unwrap();
    let open = s
        .bed
        .workload(WEB, &["pingpong", "--to", &db, "--seconds", "3"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let status = s.agents[0].stop().unwrap();
    assert!(status.success(), "{status}");
    let out = open.wait_output(T).unwrap();
    assert!(
        out.status.success(),
        "the client's agent cut the open tunnel: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
