//! Kubernetes mode on the real kernel: agents (`run --kubernetes`) follow
//! an API server that runs in the test and speaks the real list/watch
//! protocol over a socket; pods are network namespaces with real processes,
//! and policy is judged on real connections.
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::{self, Agent},
    cluster::{Cluster, PodRef},
    dashboard,
    process::Spawned,
    topology::TestBed,
};
use serde_json::{Value, json};

const PORT: u16 = 8080;
/// Long enough for any event to reach the maps on a loaded machine; how
/// fast it really is, is the control-plane benchmark's business.
const CONVERGE: Duration = Duration::from_secs(10);

/// `mesh-agent inspect endpoints -o json` of `node`: IP → (identity, local).
fn endpoints(bed: &TestBed, node: usize) -> BTreeMap<String, (String, bool)> {
    let out = agent::cli(
        &bed.pin_dir(node),
        &[
            "--state-dir",
            bed.state_dir(node).to_str().unwrap(),
            "inspect",
            "endpoints",
            "-o",
            "json",
        ],
    )
    .unwrap();
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    rows.into_iter()
        .map(|r| {
            (
                r["ip"].as_str().unwrap().to_string(),
                (
                    r["identity"].as_str().unwrap().to_string(),
                    r["local"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

/// Numeric identities (`inspect endpoints`' `id`) by IP.
fn endpoint_ids(bed: &TestBed, node: usize) -> BTreeMap<String, String> {
    let out = agent::cli(&bed.pin_dir(node), &["inspect", "endpoints", "-o", "json"]).unwrap();
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    rows.into_iter()
        .map(|r| {
            (
                r["ip"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until `check` holds for node's endpoints; returns how long it took.
fn wait_endpoints(
    bed: &TestBed,
    node: usize,
    what: &str,
    check: impl Fn(&BTreeMap<String, (String, bool)>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let now = endpoints(bed, node);
        if check(&now) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < CONVERGE,
            "{what}: not after {CONVERGE:?}; endpoints: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Everything the agents asked the API server for is granted by `deploy/`.
fn assert_rbac(cluster: &Cluster) {
    assert!(!cluster.api.requests().is_empty(), "no request recorded");
    let refused = cluster.requests_deploy_refuses();
    assert!(
        refused.is_empty(),
        "deploy/'s RBAC does not grant the agent these requests: {refused:#?}"
    );
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// `mesh-pod probe` from `pod` (a mesh workload) to `to`: "connected",
/// "eperm", …
fn probe(bed: &TestBed, pod: usize, to: usize) -> String {
    probe_from(bed, pod, true, to)
}

fn wait_probe(bed: &TestBed, pod: usize, to: usize, want: &str) {
    let started = Instant::now();
    loop {
        let got = probe(bed, pod, to);
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < CONVERGE,
            "pod {pod} → pod {to}: {got}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn health(bed: &TestBed, node: usize) -> Value {
    let text = std::fs::read_to_string(bed.state_dir(node).join("health.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn wait_health(bed: &TestBed, node: usize, ready: bool) -> Value {
    let started = Instant::now();
    loop {
        let h = health(bed, node);
        if h["ready"] == ready {
            return h;
        }
        assert!(
            started.elapsed() < CONVERGE,
            "node {node} health is {h}, expected ready={ready}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One node with `pods` pods, each running a TCP echo server on PORT.
fn bed(test: &str, pods: usize) -> (TestBed, Vec<Spawned>) {
    let mut bed = TestBed::new(test).unwrap();
    let mut servers = Vec::new();
    for i in 0..pods {
        bed.add_pod(0).unwrap();
        let listen = format!("[::]:{PORT}").parse().unwrap();
        servers.push(bed.server(i, true, listen, "echo").unwrap());
    }
    (bed, servers)
}

fn policy_yaml(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

/// Only frontend may reach cart. The same document a standalone agent reads
/// from its directory.
const CART_ALLOW_FRONTEND: &str = "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/web/sa/frontend\n    ports:\n    - port: 8080\n";

#[test]
fn pods_become_endpoints_and_ip_reuse_never_leaves_a_stale_identity() {
    let (bed, _servers) = bed("k8s-pods", 2);
    let mut cluster = Cluster::start(&bed).unwrap();
    cluster.namespace("shop", json!({}));
    let agent = Agent::start_node_kubernetes(&bed, 0, &cluster.kubeconfig, &[]).unwrap();
    let ip0 = bed.pods[0].ip4.to_string();
    let ip0_v6 = bed.pods[0].ip6.to_string();
    assert!(!endpoints(&bed, 0).contains_key(&ip0));

    // Created → both addresses, local, with the pod's identity.
    let cart = cluster
        .run_pod(&bed, 0, "shop", "cart-1", "cart", json!({"app": "cart"}))
        .unwrap();
    let took = wait_endpoints(&bed, 0, "pod created", |e| e.contains_key(&ip0));
    println!("pod created → endpoint in the map after {took:?} (polling the CLI)");
    let now = endpoints(&bed, 0);
    assert_eq!(now[&ip0], (spiffe("shop", "cart"), true));
    assert_eq!(now[&ip0_v6], (spiffe("shop", "cart"), true));

    // Deleted → gone.
    assert!(cluster.delete_pod(&cart));
    wait_endpoints(&bed, 0, "pod deleted", |e| {
        !e.contains_key(&ip0) && !e.contains_key(&ip0_v6)
    });

    // The address goes to a new pod of another identity while the old
    // pod's object still claims it (its deletion not yet seen): the newer
    // pod has it. creationTimestamp has one-second resolution.
    let old = cluster
        .run_pod(&bed, 0, "shop", "cart-2", "cart", json!({}))
        .unwrap();
    wait_endpoints(&bed, 0, "cart-2", |e| {
        e.get(&ip0) == Some(&(spiffe("shop", "cart"), true))
    });
    std::thread::sleep(Duration::from_millis(1100));
    let new = cluster
        .run_pod(&bed, 0, "shop", "db-1", "db", json!({}))
        .unwrap();
    wait_endpoints(&bed, 0, "reused by db-1", |e| {
        e.get(&ip0) == Some(&(spiffe("shop", "db"), true))
    });
    // The old pod's deletion must not take the address from the new one.
    assert!(cluster.delete_pod(&old));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(endpoints(&bed, 0)[&ip0], (spiffe("shop", "db"), true));
    // A pod that finished keeps its object but not its address.
    let mut finished = cluster
        .api
        .get("v1", "Pod", Some("shop"), &new.name)
        .unwrap();
    finished["status"]["phase"] = json!("Succeeded");
    cluster.api.apply(finished);
    wait_endpoints(&bed, 0, "pod finished", |e| !e.contains_key(&ip0));

    // The kernel identifies a local pod's connections by its network
    // namespace, found through the pod's cgroup: a policy allowing only
    // `web/frontend` sees pod 1 as frontend.
    cluster
        .run_pod(&bed, 0, "shop", "cart-3", "cart", json!({}))
        .unwrap();
    cluster.namespace("web", json!({}));
    cluster
        .run_pod(&bed, 1, "web", "frontend-1", "frontend", json!({}))
        .unwrap();
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", CART_ALLOW_FRONTEND))
        .unwrap();
    wait_probe(&bed, 1, 0, "connected");
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_rbac(&cluster);
}

/// A running pod of `shop` on `node`, as that node's kubelet reports it:
/// only the object, with `ip` in its status (no sandbox runs here).
fn reported_pod(
    name: &str,
    node: &str,
    service_account: &str,
    ip: &str,
    annotations: Value,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
        "spec": {"nodeName": node, "serviceAccountName": service_account,
                 "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

#[test]
fn another_node_cannot_claim_a_pods_address() {
    let (bed, _servers) = bed("k8s-claims", 1);
    let mut cluster = Cluster::start(&bed).unwrap();
    cluster.namespace("shop", json!({}));
    let agent = Agent::start_node_kubernetes(&bed, 0, &cluster.kubeconfig, &[]).unwrap();
    let ip0 = bed.pods[0].ip4.to_string();
    cluster
        .run_pod(&bed, 0, "shop", "cart-1", "cart", json!({}))
        .unwrap();
    wait_endpoints(&bed, 0, "cart-1", |e| {
        e.get(&ip0) == Some(&(spiffe("shop", "cart"), true))
    });
    // Two more nodes: one the control plane gave a pod range, one without.
    for (name, spec) in [
        (
            "node-ranged",
            json!({"podCIDR": "10.250.0.0/24", "podCIDRs": ["10.250.0.0/24"]}),
        ),
        ("node-open", json!({})),
    ] {
        cluster.api.apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name},
            "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.99"}]},
        }));
    }
    // Newer pods (creationTimestamp has one-second resolution) whose
    // kubelets report cart's address: one on the ranged node, and a
    // mirror pod (a static pod's copy, written by its node alone).
    std::thread::sleep(Duration::from_millis(1100));
    let pod = |name: &str, node: &str, ip: &str, annotations: Value| {
        reported_pod(name, node, "thief", ip, annotations)
    };
    cluster
        .api
        .apply(pod("thief", "node-ranged", &ip0, json!({})));
    cluster.api.apply(pod(
        "static-thief",
        "node-open",
        &ip0,
        json!({"kubernetes.io/config.mirror": "0123abcd"}),
    ));
    // Witnesses, after them: an address inside the range, and one on the
    // node without a range. Once both are in the map, the thieves were seen.
    cluster
        .api
        .apply(pod("witness", "node-ranged", "10.250.0.5", json!({})));
    cluster
        .api
        .apply(pod("open", "node-open", "10.251.0.5", json!({})));
    wait_endpoints(&bed, 0, "the witnesses", |e| {
        e.contains_key("10.250.0.5") && e.contains_key("10.251.0.5")
    });
    assert_eq!(
        endpoints(&bed, 0)[&ip0],
        (spiffe("shop", "cart"), true),
        "another node took cart's address"
    );
    let log = agent.log();
    assert!(
        log.contains("outside its node's podCIDRs") && log.contains("shop/thief"),
        "{log}"
    );
}

const CART: usize = 0;
const FRONTEND: usize = 1;
const ROBOT: usize = 2;

#[test]
fn a_tenant_cannot_freeze_the_mesh_with_colliding_identities_or_a_policy_over_the_budget() {
    let (bed, _servers) = bed("k8s-tenant", 3);
    let (cluster, _robot) = cart_frontend_robot(&bed);
    cluster.namespace("tenant", json!({}));
    // Room for 100 policy entries (half the map).
    let agent =
        Agent::start_node_kubernetes(&bed, 0, &cluster.kubeconfig, &["--max-policy", "200"])
            .unwrap();
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", CART_ALLOW_FRONTEND))
        .unwrap();
    wait_probe(&bed, ROBOT, CART, "eperm");

    // The tenant's pods, on another node: two whose identities share a
    // number, one ordinary.
    cluster.api.apply(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-other"}, "spec": {},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.98"}]},
    }));
    // Service accounts whose identities share a number, as a tenant finds.
    let [a, b] = mesh_policy::COLLIDING_SERVICE_ACCOUNTS;
    for (name, sa, ip) in [
        ("one", a, "10.251.0.1"),
        ("two", b, "10.251.0.2"),
        ("fine", "fine", "10.251.0.3"),
    ] {
        let mut pod = reported_pod(name, "node-other", sa, ip, json!({}));
        pod["metadata"]["namespace"] = json!("tenant");
        cluster.api.apply(pod);
    }
    // The cluster still converges: the ordinary pod gets its identity, and
    // the two that share a number are refused (nothing reaches them).
    wait_endpoints(&bed, 0, "the tenant's pods", |e| {
        e.get("10.251.0.3") == Some(&(spiffe("tenant", "fine"), false))
    });
    let now = endpoints(&bed, 0);
    for ip in ["10.251.0.1", "10.251.0.2"] {
        assert!(now[ip].0.starts_with("refused: "), "{ip}: {now:?}");
    }
    let log = agent.log();
    assert!(
        log.contains("document refused on its own") && log.contains(&spiffe("tenant", a)),
        "{log}"
    );
    // Policy still applies beside them.
    let from_web =
        "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - namespace: web\n";
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", from_web))
        .unwrap();
    wait_probe(&bed, ROBOT, CART, "connected");

    // A valid policy whose entries (2 sources x 200 ports) overflow the
    // budget: refused alone, with the reason in its status.
    let ports: String = (1..=200)
        .map(|p| format!("    - port: {}\n", 20000 + p))
        .collect();
    cluster
        .apply_yaml(&policy_yaml(
            "tenant",
            "flood",
            &format!("  selector:\n    serviceAccount: fine\n  rules:\n  - from:\n    - namespace: web\n    ports:\n{ports}"),
        ))
        .unwrap();
    let started = Instant::now();
    let refused = loop {
        let c = cluster
            .wait_accepted("MeshPolicy", "tenant", "flood", CONVERGE)
            .unwrap();
        if c["status"] == "False" {
            break c;
        }
        assert!(started.elapsed() < CONVERGE, "flood still {c}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(refused["reason"], "PolicyBudgetExceeded", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("budget of 100"),
        "{refused}"
    );
    // ...and every later change still converges.
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", CART_ALLOW_FRONTEND))
        .unwrap();
    wait_probe(&bed, ROBOT, CART, "eperm");
    assert_eq!(probe(&bed, FRONTEND, CART), "connected");
    let cart = cluster
        .wait_accepted("MeshPolicy", "shop", "cart", CONVERGE)
        .unwrap();
    assert_eq!(cart["status"], "True", "{cart}");
    assert!(
        !agent.log().contains("cluster state refused"),
        "{}",
        agent.log()
    );
    assert_rbac(&cluster);
}

/// The cluster of the policy tests: cart (shop/cart) in pod 0, frontend
/// (web/frontend) in pod 1, robot (web/robot) in pod 2; robot's pod ref.
fn cart_frontend_robot(bed: &TestBed) -> (Cluster, PodRef) {
    let mut cluster = Cluster::start(bed).unwrap();
    for ns in ["shop", "web"] {
        cluster.namespace(ns, json!({}));
    }
    cluster
        .run_pod(bed, CART, "shop", "cart", "cart", json!({}))
        .unwrap();
    cluster
        .run_pod(bed, FRONTEND, "web", "frontend", "frontend", json!({}))
        .unwrap();
    let robot = cluster
        .run_pod(bed, ROBOT, "web", "robot", "robot", json!({}))
        .unwrap();
    (cluster, robot)
}

/// A process with pid `pid`, in `netns`: the next pid handed out is set
/// (`ns_last_pid`, as checkpoint/restore tools do) until one is.
fn spawn_with_pid(pid: u32, netns: &mesh_tests::netns::Netns) -> Spawned {
    use mesh_tests::process::Placement;
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut sleep = std::process::Command::new("sleep");
        sleep.arg("infinity");
        let mut spawned = Spawned::spawn(
            sleep,
            &Placement {
                netns: Some(netns),
                cgroup: None,
            },
        )
        .unwrap();
        if spawned.pid() == pid {
            return spawned;
        }
        // Another process forked in between: again.
        spawned.terminate(Duration::from_secs(5)).unwrap();
    }
    panic!("pid {pid} was never handed to a process of ours");
}

#[test]
fn a_pods_namespace_is_held_not_found_again_by_a_pid_another_process_may_get() {
    // cart, frontend, robot; and a network namespace of the node that is
    // no mesh workload (where a hostNetwork or opted-out process lives).
    let (mut bed, _servers) = bed("k8s-pid-reuse", 3);
    let outsider = bed.add_pod(0).unwrap().netns.name().to_owned();
    const OUTSIDER: usize = 3;
    let (mut cluster, _robot) = cart_frontend_robot(&bed);
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", CART_ALLOW_FRONTEND))
        .unwrap();
    let agent = Agent::start_node_kubernetes(&bed, 0, &cluster.kubeconfig, &[]).unwrap();
    wait_probe(&bed, FRONTEND, CART, "connected");
    assert_eq!(probe(&bed, OUTSIDER, CART), "eperm");

    // frontend's sandbox exits (its namespace stays, held by its
    // containers); the pid it had goes to a process of the outsider's
    // namespace, which the agent could then take for frontend's.
    let frontend = PodRef {
        namespace: "web".into(),
        name: "frontend".into(),
        uid: cluster
            .api
            .get("v1", "Pod", Some("web"), "frontend")
            .unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_owned(),
    };
    let pid = cluster.stop_sandbox(&frontend).unwrap();
    let _impostor = spawn_with_pid(pid, &bed.pods[OUTSIDER].netns);
    // Something changes in the cluster (a pod on another node), and the
    // agent compiles it again.
    cluster.api.apply(reported_pod(
        "elsewhere",
        "node-9",
        "db",
        "10.77.0.1",
        json!({}),
    ));
    wait_endpoints(&bed, 0, "the pod elsewhere", |e| {
        e.contains_key("10.77.0.1")
    });
    // The outsider is still no one; frontend is still frontend.
    assert_eq!(
        probe(&bed, OUTSIDER, CART),
        "eperm",
        "a process that got frontend's old pid speaks as frontend ({outsider})"
    );
    assert_eq!(probe(&bed, FRONTEND, CART), "connected");
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn the_daemonsets_capabilities_are_enough_to_find_pods_and_enforce_policy() {
    let capabilities = mesh_tests::deploy::daemonset_capabilities();
    assert!(!capabilities.is_empty());
    let (bed, _servers) = bed("k8s-caps", 3);
    let (cluster, _robot) = cart_frontend_robot(&bed);
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", CART_ALLOW_FRONTEND))
        .unwrap();
    let agent =
        Agent::start_node_kubernetes_with_capabilities(&bed, 0, &cluster.kubeconfig, &capabilities)
            .unwrap();
    // The agent really runs with those capabilities only.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    assert_ne!(effective, 0);
    assert!(
        effective.count_ones() as usize <= capabilities.len(),
        "{status}"
    );
    // Allowed and denied as the policy says: the pods' network namespaces
    // were found (setns, /proc/<pid>/ns/net of other processes).
    wait_probe(&bed, FRONTEND, CART, "connected");
    assert_eq!(probe(&bed, ROBOT, CART), "eperm");
    // Nothing refused for want of a capability. One refusal is the
    // kernel's, not the capabilities': this project's 6.18 machines refuse
    // fexit programs with EPERM to every process, root with all
    // capabilities included. The kernel matrix's VMs, whose kernels load
    // them, run this test too, so a capability missing for them fails there.
    let log = agent.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Operation not permitted"))
        .filter(|l| !l.contains("the redirect path's reads cannot be counted"))
        .collect();
    assert!(refused.is_empty(), "{log}");
    if mesh_tests::in_vm() {
        assert!(
            log.contains("redirected reads counted") && log.contains("splice guard attached"),
            "{log}"
        );
    }
    assert_rbac(&cluster);
}

#[test]
fn mesh_policy_is_enforced_and_an_invalid_edit_keeps_the_previous_one() {
    let (bed, _servers) = bed("k8s-policy", 3);
    let (cluster, _robot) = cart_frontend_robot(&bed);
    let _agent = Agent::start_node_kubernetes(&bed, 0, &cluster.kubeconfig, &[]).unwrap();
    // No policy: the default allows.
    assert_eq!(probe(&bed, ROBOT, CART), "connected");

    cluster
        .apply_yaml(&policy_yaml("shop", "cart", CART_ALLOW_FRONTEND))
        .unwrap();
    wait_probe(&bed, ROBOT, CART, "eperm");
    assert_eq!(probe(&bed, FRONTEND, CART), "connected");
    let accepted = cluster
        .wait_accepted("MeshPolicy", "shop", "cart", CONVERGE)
        .unwrap();
    assert_eq!(accepted["status"], "True", "{accepted}");
    assert_eq!(accepted["reason"], "Accepted", "{accepted}");

    // An edit that would let robot in, but is invalid (an entry with both
    // identity and namespace): refused with the reason in the status; the
    // previous version stays enforced.
    let invalid = "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/web/sa/frontend\n    - identity: spiffe://cluster.local/ns/web/sa/robot\n      namespace: web\n    ports:\n    - port: 8080\n";
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", invalid))
        .unwrap();
    let refused = cluster
        .wait_accepted("MeshPolicy", "shop", "cart", CONVERGE)
        .unwrap();
    assert_eq!(refused["status"], "False", "{refused}");
    assert_eq!(refused["reason"], "Invalid", "{refused}");
    assert_eq!(
        refused["message"],
        "spec.rules[0].from[1]: exactly one of `identity` and `namespace` is required",
        "{refused}"
    );
    assert_eq!(probe(&bed, ROBOT, CART), "eperm");
    assert_eq!(probe(&bed, FRONTEND, CART), "connected");

    // A valid edit letting robot in is enforced, and accepted.
    let both = "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - namespace: web\n    ports:\n    - port: 8080\n";
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", both))
        .unwrap();
    wait_probe(&bed, ROBOT, CART, "connected");
    let accepted = cluster
        .wait_accepted("MeshPolicy", "shop", "cart", CONVERGE)
        .unwrap();
    assert_eq!(accepted["status"], "True", "{accepted}");

    // A DENY policy of the root namespace applies to every namespace.
    cluster
        .apply_yaml(&policy_yaml(
            "mesh-system",
            "no-robots",
            "  action: DENY\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/web/sa/robot\n",
        ))
        .unwrap();
    wait_probe(&bed, ROBOT, CART, "eperm");
    assert_eq!(probe(&bed, FRONTEND, CART), "connected");
    // Deleted: robot is back.
    cluster.api.delete(
        "mesh.dev/v1alpha1",
        "MeshPolicy",
        Some("mesh-system"),
        "no-robots",
    );
    wait_probe(&bed, ROBOT, CART, "connected");
    assert_rbac(&cluster);

    // The service map in Kubernetes mode: robot's refusals and frontend's
    // connections to cart, as the edges of the identities the pods run as.
    let map: Value =
        serde_json::from_str(&agent::node_cli(&bed, 0, &["graph", "-o", "json"]).unwrap()).unwrap();
    let arc = |from: &str, verdict: &str| {
        map["arcs"].as_array().unwrap().iter().find(|a| {
            a["from"] == spiffe("web", from)
                && a["to"] == spiffe("shop", "cart")
                && a["verdict"] == verdict
                && a["path"] == "same-node"
        })
    };
    for (from, verdict) in [
        ("robot", "denied"),
        ("robot", "allowed"),
        ("frontend", "allowed"),
    ] {
        let found = arc(from, verdict).unwrap_or_else(|| panic!("no {from} {verdict}: {map}"));
        assert!(found["connections"].as_u64() >= Some(1), "{found}");
    }
    assert_eq!(
        map["namespaces"]["web"].as_array().unwrap().len(),
        2,
        "{map}"
    );

    // The dashboard's API watch panel reads what this agent exports (the
    // other panels are checked by the Services test, with tunnels).
    let metrics = agent::scrape_metrics(&bed, 0).unwrap();
    let dashboard = dashboard::load().unwrap();
    let problems = dashboard::unknown_references(&dashboard, &[&metrics], |refs| {
        refs.metrics
            .iter()
            .any(|m| m.starts_with("mesh_kubernetes_"))
    })
    .unwrap();
    assert!(problems.is_empty(), "{problems:#?}\n{metrics}");
}

#[test]
fn watch_breaks_410_and_outages_miss_nothing_clear_nothing_open_nothing() {
    let (bed, _servers) = bed("k8s-outage", 4);
    let (mut cluster, robot) = cart_frontend_robot(&bed);
    const LATE: usize = 3;
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", CART_ALLOW_FRONTEND))
        .unwrap();
    let agent = Agent::start_node_kubernetes(&bed, 0, &cluster.kubeconfig, &[]).unwrap();
    assert_eq!(probe(&bed, ROBOT, CART), "eperm");
    assert_eq!(probe(&bed, FRONTEND, CART), "connected");
    wait_health(&bed, 0, true);

    // Watch the maps all along: they must never lose the entries of the
    // pods that exist throughout (cart and frontend, both addresses).
    let steady: Vec<String> = [CART, FRONTEND]
        .iter()
        .flat_map(|&p| [bed.pods[p].ip4.to_string(), bed.pods[p].ip6.to_string()])
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, samples, steady) = (stop.clone(), samples.clone(), steady.clone());
        let pins = bed.pin_dir(0);
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::Relaxed) {
                let out = agent::cli(&pins, &["inspect", "endpoints", "-o", "json"])
                    .map_err(|e| e.to_string())?;
                let rows: Vec<Value> = serde_json::from_str(&out).map_err(|e| e.to_string())?;
                for ip in &steady {
                    if !rows.iter().any(|r| r["ip"] == ip.as_str()) {
                        return Err(format!("{ip} missing from the map: {out}"));
                    }
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    };

    // 1. The watch breaks mid-stream; a change made meanwhile arrives.
    cluster.api.break_watches();
    let late = cluster
        .run_pod(&bed, LATE, "web", "late", "late", json!({}))
        .unwrap();
    let late_ip = bed.pods[LATE].ip4.to_string();
    wait_endpoints(&bed, 0, "pod created across a broken watch", |e| {
        e.contains_key(&late_ip)
    });

    // 2. While the agent cannot connect, robot is deleted and late's
    // address goes to a new pod of another identity, and the history is
    // compacted: the agent's resourceVersion is too old (410 Gone), it
    // relists, and applies the relist's difference without clearing
    // anything.
    let lists_before = lists(&cluster);
    cluster.api.stop_serving();
    cluster.delete_pod(&robot);
    cluster.delete_pod(&late);
    cluster
        .run_pod(&bed, LATE, "web", "late-2", "frontend", json!({}))
        .unwrap();
    cluster.api.compact();
    cluster.api.resume_serving();
    wait_endpoints(&bed, 0, "relist after 410", |e| {
        !e.contains_key(&bed.pods[ROBOT].ip4.to_string())
            && e.get(&late_ip) == Some(&(spiffe("web", "frontend"), true))
    });
    assert!(
        lists(&cluster) > lists_before,
        "the agent never relisted after 410 Gone"
    );
    assert!(
        cluster.api.requests().iter().any(|r| r.verb == "watch"
            && r.param("resourceVersion")
                .is_some_and(|v| v != "0" && !v.is_empty())),
        "the agent never resumed a watch from its resourceVersion"
    );
    wait_health(&bed, 0, true);

    // 3. The API server goes away for a while: the agent says it is not
    // ready, keeps enforcing, and converges when the server is back, with
    // what changed while it was away.
    cluster.api.stop_serving();
    let h = wait_health(&bed, 0, false);
    assert!(
        h["reason"]
            .as_str()
            .unwrap()
            .contains("API server unreachable"),
        "{h}"
    );
    assert_eq!(probe(&bed, FRONTEND, CART), "connected");
    assert_eq!(probe(&bed, LATE, CART), "connected");
    // Changes while the agent cannot see them: a DENY for frontend.
    cluster
        .apply_yaml(&policy_yaml(
            "shop",
            "deny-frontend",
            "  action: DENY\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/web/sa/frontend\n",
        ))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Still the old policy, still not ready.
    assert_eq!(probe(&bed, FRONTEND, CART), "connected");
    assert_eq!(health(&bed, 0)["ready"], false);
    cluster.api.resume_serving();
    wait_probe(&bed, FRONTEND, CART, "eperm");
    wait_health(&bed, 0, true);

    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap().unwrap();
    assert!(
        samples.load(Ordering::Relaxed) > 10,
        "the map was hardly watched"
    );
    let log = agent.log();
    assert!(log.contains("lost the API server"), "{log}");
    assert_rbac(&cluster);
}

/// LIST requests (not watches) the API server has answered so far.
fn lists(cluster: &Cluster) -> usize {
    cluster
        .api
        .requests()
        .iter()
        .filter(|r| r.verb == "list")
        .count()
}

#[test]
fn identities_agree_across_nodes_and_restarts_and_one_agent_writes_status() {
    let mut bed = TestBed::new("k8s-two").unwrap();
    bed.add_node().unwrap();
    // Node 1's agent reaches the API server (on node 0) over the fabric.
    bed.connect_nodes().unwrap();
    for node in [0, 0, 1, 1] {
        bed.add_pod(node).unwrap();
    }
    let mut cluster = Cluster::start(&bed).unwrap();
    cluster.namespace("shop", json!({}));
    // Pods of the same identities on both nodes, created while both agents
    // start (identities "allocated" concurrently).
    let mut agents: Vec<Agent> = (0..2)
        .map(|n| Agent::spawn_node_kubernetes(&bed, n, &cluster.kubeconfig, &[]).unwrap())
        .collect();
    let pods: Vec<PodRef> = [(0, "cart"), (1, "db"), (2, "cart"), (3, "db")]
        .into_iter()
        .map(|(pod, sa)| {
            cluster
                .run_pod(&bed, pod, "shop", &format!("{sa}-{pod}"), sa, json!({}))
                .unwrap()
        })
        .collect();
    assert_eq!(pods.len(), 4);
    let started = Instant::now();
    while !agents.iter().all(Agent::says_ready) {
        assert!(
            started.elapsed() < CONVERGE,
            "agents not ready:\n{}\n{}",
            agents[0].log(),
            agents[1].log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for node in 0..2 {
        wait_endpoints(&bed, node, "all four pods", |e| {
            (0..4).all(|p| e.contains_key(&bed.pods[p].ip4.to_string()))
        });
    }
    let ids0 = endpoint_ids(&bed, 0);
    let ids1 = endpoint_ids(&bed, 1);
    assert_eq!(ids0, ids1, "the nodes number identities differently");
    // Same service account, same number, whichever node runs the pod.
    assert_eq!(
        ids0[&bed.pods[0].ip4.to_string()],
        ids0[&bed.pods[2].ip4.to_string()]
    );
    assert_ne!(
        ids0[&bed.pods[0].ip4.to_string()],
        ids0[&bed.pods[1].ip4.to_string()]
    );
    // Local on its own node only.
    assert!(endpoints(&bed, 0)[&bed.pods[0].ip4.to_string()].1);
    assert!(!endpoints(&bed, 1)[&bed.pods[0].ip4.to_string()].1);

    // Restarted, node 1's agent numbers them the same again.
    agents[1].kill().unwrap();
    agents[1] = Agent::start_node_kubernetes(&bed, 1, &cluster.kubeconfig, &[]).unwrap();
    assert_eq!(endpoint_ids(&bed, 1), ids0);

    // Two agents, one status writer: each document's status is written
    // once per generation, not once per node.
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", CART_ALLOW_FRONTEND))
        .unwrap();
    cluster
        .wait_accepted("MeshPolicy", "shop", "cart", CONVERGE)
        .unwrap();
    cluster
        .apply_yaml(&policy_yaml(
            "shop",
            "cart",
            "  rules: [{from: [{namespace: shop}]}]\n",
        ))
        .unwrap();
    cluster
        .wait_accepted("MeshPolicy", "shop", "cart", CONVERGE)
        .unwrap();
    // Give a second writer every chance to show itself.
    std::thread::sleep(Duration::from_secs(1));
    let status_writes = cluster
        .api
        .requests()
        .iter()
        .filter(|r| r.verb == "patch" && r.path.ends_with("/meshpolicies/cart/status"))
        .count();
    assert_eq!(status_writes, 2, "one write per generation");
    let lease = cluster
        .api
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some("mesh-system"),
            "mesh-agent-status",
        )
        .unwrap();
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap();
    assert!(holder == "node-0" || holder == "node-1", "{lease}");
    assert_rbac(&cluster);
}

/// `mesh-pod probe` from `pod` to `to`, in the mesh or outside its cgroup.
fn probe_from(bed: &TestBed, pod: usize, in_mesh: bool, to: usize) -> String {
    let target = format!("tcp:{}", bed.pods[to].addr(false, PORT));
    bed.probe(pod, in_mesh, &target, 1000).unwrap()
}

#[test]
fn mutual_tls_between_nodes_from_pods_nodes_and_peer_authentication_objects() {
    let mut bed = TestBed::new("k8s-mtls").unwrap();
    bed.add_node().unwrap();
    bed.connect_nodes().unwrap();
    let mut servers = Vec::new();
    for node in [0, 1] {
        let pod = bed.pods.len();
        bed.add_pod(node).unwrap();
        let listen = format!("[::]:{PORT}").parse().unwrap();
        servers.push(bed.server(pod, true, listen, "echo").unwrap());
    }
    const WEB: usize = 0;
    const DB: usize = 1;
    let mut cluster = Cluster::start(&bed).unwrap();
    cluster.namespace("shop", json!({}));
    // Nodes as kubelet registers them: the tunnel address is the InternalIP.
    for n in 0..2 {
        cluster.api.apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": bed.nodes[n].name()},
            "status": {"addresses": [
                {"type": "Hostname", "address": bed.nodes[n].name()},
                {"type": "InternalIP", "address": mesh_tests::topology::node_uplink_ip(n).to_string()},
            ]},
        }));
    }
    cluster
        .run_pod(&bed, WEB, "shop", "web", "web", json!({}))
        .unwrap();
    cluster
        .run_pod(&bed, DB, "shop", "db", "db", json!({}))
        .unwrap();
    cluster
        .apply_yaml(
            "apiVersion: mesh.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: db-strict, namespace: shop}\nspec:\n  selector: {serviceAccount: db}\n  mtls: {mode: STRICT}\n",
        )
        .unwrap();
    let ca = bed.mesh_ca("cluster.local").unwrap();
    let ca = ca.to_str().unwrap();
    let _agents: Vec<Agent> = (0..2)
        .map(|n| {
            Agent::start_node_kubernetes(&bed, n, &cluster.kubeconfig, &["--ca-dir", ca]).unwrap()
        })
        .collect();

    // STRICT: only a tunnel can reach db from another node, so a connection
    // from web proves the tunnel (certificates issued for the pods the
    // agents saw, peer address from the Node object).
    wait_probe(&bed, WEB, DB, "connected");
    assert_eq!(probe_from(&bed, WEB, false, DB), "timeout");
    let accepted = cluster
        .wait_accepted("PeerAuthentication", "shop", "db-strict", CONVERGE)
        .unwrap();
    assert_eq!(accepted["status"], "True", "{accepted}");
    let certs = agent::cli(
        &bed.pin_dir(0),
        &[
            "--state-dir",
            bed.state_dir(0).to_str().unwrap(),
            "inspect",
            "certs",
            "-o",
            "json",
        ],
    )
    .unwrap();
    assert!(certs.contains(&spiffe("shop", "web")), "{certs}");
    assert!(
        !certs.contains(&spiffe("shop", "db")),
        "node 0 holds a certificate of node 1's workload: {certs}"
    );
    assert_rbac(&cluster);
}

/// `mesh-pod probe` of `target` from `pod`, until it answers `want`.
fn wait_probe_target(bed: &TestBed, pod: usize, target: &str, want: &str) {
    let started = Instant::now();
    loop {
        let got = bed.probe(pod, true, target, 1000).unwrap();
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < CONVERGE,
            "pod {pod} → {target}: {got}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An EndpointSlice of Service `cart` with one endpoint, `pod` of `bed`.
fn cart_slice(bed: &TestBed, v6: bool, conditions: Value) -> String {
    let pod = &bed.pods[CART];
    let (family, address) = if v6 {
        ("IPv6", pod.ip6.to_string())
    } else {
        ("IPv4", pod.ip4.to_string())
    };
    let object = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("cart-{}", family.to_lowercase()),
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "cart"},
        },
        "addressType": family,
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": [{
            "addresses": [address],
            "conditions": conditions,
            "nodeName": bed.nodes[0].name(),
        }],
    });
    serde_json::to_string(&object).unwrap()
}

#[test]
fn services_and_endpoint_slices_are_translated_with_kube_proxys_conventions() {
    let (bed, _servers) = bed("k8s-svc", 3);
    let (cluster, _robot) = cart_frontend_robot(&bed);
    cluster
        .apply_yaml(&policy_yaml("shop", "cart", CART_ALLOW_FRONTEND))
        .unwrap();
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "cart", "namespace": "shop"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.50",
            "clusterIPs": ["10.96.0.50", "fd00:96::50"],
            "ipFamilies": ["IPv4", "IPv6"],
            "selector": {"app": "cart"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            "sessionAffinity": "None",
        },
    });
    cluster.apply_yaml(&service.to_string()).unwrap();
    let ready = json!({"ready": true, "serving": true, "terminating": false});
    for v6 in [false, true] {
        cluster
            .apply_yaml(&cart_slice(&bed, v6, ready.clone()))
            .unwrap();
    }
    // A Service of another proxy: left alone, as kube-proxy leaves it.
    let foreign = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "other", "namespace": "shop",
                      "labels": {"service.kubernetes.io/service-proxy-name": "other-proxy"}},
        "spec": {"clusterIP": "10.97.0.51", "ports": [{"port": 80}]},
    });
    cluster.apply_yaml(&foreign.to_string()).unwrap();
    let agent = Agent::start_node_kubernetes(
        &bed,
        0,
        &cluster.kubeconfig,
        &["--service-cidr", "10.96.0.0/16,fd00:96::/112"],
    )
    .unwrap();
    for vip in ["10.96.0.50:80", "[fd00:96::50]:80"] {
        let target = format!("tcp:{vip}");
        wait_probe_target(&bed, FRONTEND, &target, "connected");
        // The backend's policy decides, whatever address was dialled.
        assert_eq!(bed.probe(ROBOT, true, &target, 1000).unwrap(), "eperm");
    }
    let out = agent::node_cli(&bed, 0, &["inspect", "services", "-o", "json"]).unwrap();
    assert!(
        out.contains("shop/cart") && !out.contains("10.97.0.51"),
        "{out}"
    );

    // The endpoint stops serving: none is usable, and the connect is
    // refused at once…
    let gone = json!({"ready": false, "serving": false, "terminating": true});
    cluster.apply_yaml(&cart_slice(&bed, false, gone)).unwrap();
    wait_probe_target(&bed, FRONTEND, "tcp:10.96.0.50:80", "refused");
    // A change of EndpointSlices alone compiled only the Services.
    agent
        .wait_log("services applied", 1, Duration::from_secs(10))
        .unwrap();
    // …while an endpoint that is terminating but still serving takes
    // connections when no endpoint is ready (KEP-1669).
    let terminating = json!({"ready": false, "serving": true, "terminating": true});
    cluster
        .apply_yaml(&cart_slice(&bed, false, terminating))
        .unwrap();
    wait_probe_target(&bed, FRONTEND, "tcp:10.96.0.50:80", "connected");
    let gone = json!({"ready": false, "serving": false, "terminating": true});
    cluster.apply_yaml(&cart_slice(&bed, false, gone)).unwrap();
    wait_probe_target(&bed, FRONTEND, "tcp:10.96.0.50:80", "refused");

    // A relist after 410 Gone and an outage clear nothing: the IPv6 slice,
    // untouched, keeps serving throughout, and a change made while the
    // agent could not see it arrives.
    cluster.api.stop_serving();
    cluster
        .apply_yaml(&cart_slice(&bed, false, ready.clone()))
        .unwrap();
    cluster.api.compact();
    assert_eq!(
        bed.probe(FRONTEND, true, "tcp:[fd00:96::50]:80", 1000)
            .unwrap(),
        "connected"
    );
    cluster.api.resume_serving();
    wait_probe_target(&bed, FRONTEND, "tcp:10.96.0.50:80", "connected");
    assert_eq!(
        bed.probe(FRONTEND, true, "tcp:[fd00:96::50]:80", 1000)
            .unwrap(),
        "connected"
    );
    assert_rbac(&cluster);
    drop(agent);
}

/// A Service `name` at `vip` in shop whose one EndpointSlice holds `pod`.
fn service_with_endpoint(cluster: &Cluster, bed: &TestBed, name: &str, vip: &str, pod: usize) {
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": vip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    });
    cluster.apply_yaml(&service.to_string()).unwrap();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [bed.pods[pod].ip4.to_string()],
                       "conditions": {"ready": true}, "nodeName": bed.nodes[0].name()}],
    });
    cluster.apply_yaml(&slice.to_string()).unwrap();
}

#[test]
fn a_traffic_split_resource_weights_a_services_backends_and_gets_a_status() {
    let (bed, _servers) = bed("k8s-split", 3);
    let (cluster, _robot) = cart_frontend_robot(&bed);
    // The root Service and two subsets: cart's pod, and robot's pod as the
    // canary (both serve the echo).
    service_with_endpoint(&cluster, &bed, "cart", "10.96.0.60", CART);
    service_with_endpoint(&cluster, &bed, "cart-v1", "10.96.0.61", CART);
    service_with_endpoint(&cluster, &bed, "cart-v2", "10.96.0.62", ROBOT);
    let split = "apiVersion: mesh.dev/v1alpha1\nkind: TrafficSplit\nmetadata: {name: canary, namespace: shop}\nspec:\n  service: cart\n  backends: [{service: cart-v1, weight: 75}, {service: cart-v2, weight: 25}]\n";
    cluster.apply_yaml(split).unwrap();
    // Refused on its own, with the field: a Service split into itself.
    let bad = "apiVersion: mesh.dev/v1alpha1\nkind: TrafficSplit\nmetadata: {name: loop, namespace: shop}\nspec:\n  service: cart-v1\n  backends: [{service: cart-v1, weight: 1}]\n";
    cluster.apply_yaml(bad).unwrap();
    let _agent = Agent::start_node_kubernetes(&bed, 0, &cluster.kubeconfig, &[]).unwrap();

    let accepted = cluster
        .wait_accepted("TrafficSplit", "shop", "canary", CONVERGE)
        .unwrap();
    assert_eq!(accepted["status"], "True", "{accepted}");
    let refused = cluster
        .wait_accepted("TrafficSplit", "shop", "loop", CONVERGE)
        .unwrap();
    assert_eq!(refused["status"], "False", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("spec.backends[0].service"),
        "{refused}"
    );
    // The root's slots are the split's: 750 and 250 of 1,000.
    let started = Instant::now();
    loop {
        let out = agent::node_cli(&bed, 0, &["inspect", "services", "-o", "json"]).unwrap();
        let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
        let slots: Vec<u64> = rows
            .iter()
            .filter(|r| r["address"] == "10.96.0.60:80")
            .flat_map(|r| r["backends"].as_array().unwrap().clone())
            .map(|b| b["slots"].as_u64().unwrap())
            .collect();
        if slots == [750, 250] || slots == [250, 750] {
            break;
        }
        assert!(started.elapsed() < CONVERGE, "{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_rbac(&cluster);
}
