//! The agent's endpoints on the real kernel: `/live`, `/ready`, `/metrics`,
//! `/config_dump`, `/logging` and `mesh-agent status`, asked from inside the
//! node's network namespace (where the agent listens on its default ports,
//! as a DaemonSet pod would), after real connections from the pods.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::{self, Agent, metric_sample as sample},
    netns::Netns,
    process::{Placement, Spawned},
    topology::TestBed,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const ADMIN: &str = "127.0.0.1:15000";
const METRICS: &str = "127.0.0.1:15020";
const HEALTH: &str = "127.0.0.1:15021";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const ROBOT: &str = "spiffe://cluster.local/ns/shop/sa/robot";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const FRONTEND_POD: usize = 0;
const ROBOT_POD: usize = 1;
const CART_POD: usize = 2;
const PORT: u16 = 8080;

/// One node: frontend and robot (clients) and cart (an echo server), cart
/// allowing frontend only.
fn shop(test: &str) -> (TestBed, Spawned) {
    let mut bed = TestBed::new(test).unwrap();
    for (pod, sa) in ["frontend", "robot", "cart"].into_iter().enumerate() {
        bed.add_pod(0).unwrap();
        bed.register_workload(pod, "shop", sa, &[("app", sa)])
            .unwrap();
    }
    let server = bed
        .server(
            CART_POD,
            true,
            format!("[::]:{PORT}").parse().unwrap(),
            "echo",
        )
        .unwrap();
    bed.write_config(
        "cart.yaml",
        &format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata:\n  name: cart\n  namespace: shop\nspec:\n  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - identity: {FRONTEND}\n"
        ),
    )
    .unwrap();
    (bed, server)
}

/// `mesh-pod probe` from `pod` to cart: connected, eperm, …
fn probe_cart(bed: &TestBed, pod: usize) -> String {
    let target = format!("tcp:{}", bed.pods[CART_POD].addr(false, PORT));
    let report = bed
        .client(
            pod,
            true,
            &["probe", "--targets", &target, "--timeout-ms", "1000"],
            T,
        )
        .unwrap();
    report["results"][&target].as_str().unwrap().to_string()
}

/// Runs `f` on a thread inside `netns` (sockets made there stay there).
fn in_netns<R: Send>(netns: &Netns, f: impl FnOnce() -> R + Send) -> R {
    netns.run_in(f)
}

struct HttpResponse {
    status: u16,
    head: String,
    body: String,
}

/// One HTTP/1.1 request from inside the network namespace of node 0.
fn http(bed: &TestBed, method: &str, address: &str, path: &str) -> HttpResponse {
    http_on(bed, 0, method, address, path)
}

/// One HTTP/1.1 request from inside the network namespace of `node`; to
/// the admin endpoint, with the token the agent wrote.
fn http_on(bed: &TestBed, node: usize, method: &str, address: &str, path: &str) -> HttpResponse {
    try_http_on(bed, node, method, address, path)
        .unwrap_or_else(|e| panic!("{method} {address}{path}: {e}"))
}

/// The admin token node `node`'s agent wrote.
fn admin_token(bed: &TestBed, node: usize) -> String {
    std::fs::read_to_string(bed.state_dir(node).join("admin-token")).unwrap()
}

/// As [`http_on`], failing when nothing listens (yet).
fn try_http_on(
    bed: &TestBed,
    node: usize,
    method: &str,
    address: &str,
    path: &str,
) -> std::io::Result<HttpResponse> {
    let token = (address == ADMIN).then(|| admin_token(bed, node));
    request(bed, node, method, address, path, token.as_deref())
}

/// One request, with `Authorization: Bearer <token>` when given.
fn request(
    bed: &TestBed,
    node: usize,
    method: &str,
    address: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<HttpResponse> {
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let response = in_netns(&bed.nodes[node].netns, || {
        let mut tcp = TcpStream::connect(address)?;
        tcp.set_read_timeout(Some(T))?;
        write!(
            tcp,
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response)?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    })?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Ok(HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

fn get(bed: &TestBed, address: &str, path: &str) -> HttpResponse {
    http(bed, "GET", address, path)
}

/// Asks until `done` says yes (or panics with the last answer after `T`).
fn wait_for(what: &str, mut ask: impl FnMut() -> (bool, String)) -> String {
    let deadline = Instant::now() + T;
    loop {
        let (done, last) = ask();
        if done {
            return last;
        }
        assert!(Instant::now() < deadline, "{what}; last answer:\n{last}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn verdicts(src: &str, verdict: &str, reason: &str) -> String {
    format!(
        "mesh_flow_verdicts_total{{hook=\"connect\",src_identity=\"{src}\",dst_identity=\"{CART}\",verdict=\"{verdict}\",reason=\"{reason}\"}}"
    )
}

/// `mesh-agent status` inside the node's network namespace: exit code and
/// stdout.
fn status(bed: &TestBed, extra: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(agent::agent_bin());
    cmd.arg("--bpffs")
        .arg(bed.pin_dir(0))
        .arg("--state-dir")
        .arg(bed.state_dir(0))
        .arg("status")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = Spawned::spawn(
        cmd,
        &Placement {
            netns: Some(&bed.nodes[0].netns),
            cgroup: None,
        },
    )
    .unwrap()
    .wait_output(T)
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.stderr.is_empty(),
        "status wrote to stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap(), stdout)
}

#[test]
fn endpoints_serve_health_metrics_config_and_log_level() {
    let (bed, _server) = shop("endpoints");
    let agent = Agent::start_node(&bed, 0, &[]).unwrap();

    let live = get(&bed, HEALTH, "/live");
    assert_eq!((live.status, live.body.as_str()), (200, "live\n"));
    // The agent logged "ready": the endpoint says so too.
    let ready = get(&bed, HEALTH, "/ready");
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));

    assert_eq!(probe_cart(&bed, FRONTEND_POD), "connected");
    assert_eq!(probe_cart(&bed, ROBOT_POD), "eperm");

    // The verdicts, named by identity, once the agent has read them from
    // the ring buffer.
    let allowed = verdicts(FRONTEND, "allow", "policy");
    let denied = verdicts(ROBOT, "deny", "not_allowed");
    let metrics = wait_for("no verdicts in /metrics", || {
        let m = get(&bed, METRICS, "/metrics");
        assert_eq!(m.status, 200);
        assert!(
            m.head.contains("application/openmetrics-text"),
            "{}",
            m.head
        );
        let found = sample(&m.body, &allowed).is_some_and(|v| v >= 1.0)
            && sample(&m.body, &denied).is_some_and(|v| v >= 1.0);
        (found, m.body)
    });
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");

    // A burst of 40 concurrent scrapes (any pod can send one: the endpoint
    // listens on every address) walks the maps once or twice, not 40 times.
    let renders = |m: &str| sample(m, "mesh_scrape_renders_total").expect("the render counter");
    std::thread::sleep(Duration::from_millis(1100));
    let before = renders(&get(&bed, METRICS, "/metrics").body);
    let burst: Vec<HttpResponse> = std::thread::scope(|scope| {
        let scrapes: Vec<_> = (0..40)
            .map(|_| scope.spawn(|| get(&bed, METRICS, "/metrics")))
            .collect();
        scrapes.into_iter().map(|s| s.join().unwrap()).collect()
    });
    assert!(
        burst
            .iter()
            .all(|r| r.status == 200 && r.body.ends_with("# EOF\n"))
    );
    let after = burst.iter().map(|r| renders(&r.body)).fold(0.0, f64::max);
    assert!(
        after - before <= 2.0,
        "{} renders for 40 scrapes",
        after - before
    );
    // Three pods, an IPv4 and an IPv6 address each.
    assert_eq!(
        sample(&metrics, "mesh_map_entries{map=\"ENDPOINTS\"}"),
        Some(6.0),
        "{metrics}"
    );
    let fill = sample(&metrics, "mesh_map_fill_ratio{map=\"POLICY\"}").expect("POLICY fill");
    assert!(fill > 0.0 && fill < 0.01, "{metrics}");
    let reconciles = sample(
        &metrics,
        "mesh_reconcile_duration_seconds_count{mode=\"standalone\"}",
    )
    .expect("reconcile histogram");
    assert!(reconciles >= 1.0, "{metrics}");
    assert!(sample(&metrics, "mesh_kernel_policy_denied_total").unwrap() >= 1.0);
    assert_eq!(sample(&metrics, "mesh_ready"), Some(1.0), "{metrics}");
    assert!(sample(&metrics, "mesh_policy_generation").unwrap() >= 1.0);

    // Any process of the node's network namespace reaches the admin
    // endpoint (every hostNetwork pod does): without the token in the state
    // directory, readable by root alone, it gets nothing.
    for token in [None, Some("0".repeat(64)), Some(admin_token(&bed, 0) + "0")] {
        for (method, path) in [("GET", "/config_dump"), ("POST", "/logging?level=off")] {
            let refused = request(&bed, 0, method, ADMIN, path, token.as_deref()).unwrap();
            assert_eq!(
                refused.status, 401,
                "{method} {path} with {token:?}: {}",
                refused.body
            );
            assert!(refused.body.contains("admin-token"), "{}", refused.body);
        }
    }
    let mode = std::fs::metadata(bed.state_dir(0).join("admin-token"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    // The configuration, what was applied, and the health.
    let dump = get(&bed, ADMIN, "/config_dump");
    assert_eq!(dump.status, 200);
    let dump: Value = serde_json::from_str(&dump.body).unwrap();
    assert_eq!(dump["config"]["mesh"]["node"], "node-0");
    assert_eq!(dump["config"]["endpoints"]["health"], "0.0.0.0:15021");
    assert_eq!(dump["health"]["ready"], true);
    let workloads = dump["applied"]["workloads"].as_array().unwrap();
    let cart = workloads
        .iter()
        .find(|w| w["spiffe_id"] == CART)
        .unwrap_or_else(|| panic!("no cart workload in {dump:#}"));
    assert_eq!(cart["name"], "pod-2");
    let ip = bed.pods[CART_POD].ip4.to_string();
    assert!(
        cart["ips"].as_array().unwrap().iter().any(|a| a == &ip),
        "{dump:#}"
    );
    assert!(
        dump["applied"]["rules"]
            .as_object()
            .unwrap()
            .values()
            .any(|r| r["policy"] == "shop/cart"),
        "{dump:#}"
    );
    assert_eq!(dump["certificates"], Value::Null, "mutual TLS is off");

    // The log level, changed live: a debug line of the flow hub appears.
    assert_eq!(get(&bed, ADMIN, "/logging").body, "info\n");
    let bad = http(&bed, "POST", ADMIN, "/logging?level=info,%5B%7B");
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(!agent.log().contains(" DEBUG "), "{}", agent.log());
    let set = http(&bed, "POST", ADMIN, "/logging?level=debug");
    assert_eq!((set.status, set.body.as_str()), (200, "debug\n"));
    assert_eq!(get(&bed, ADMIN, "/logging").body, "debug\n");
    assert_eq!(probe_cart(&bed, FRONTEND_POD), "connected");
    agent
        .wait_log(
            &format!(
                "DEBUG mesh_agent::flows: flow verdict=ALLOW hook=connect src={FRONTEND} dst={CART}"
            ),
            1,
            T,
        )
        .unwrap();

    let (code, text) = status(&bed, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("status: healthy, with 1 warning\n"),
        "{text}"
    );
    for check in ["agent", "ready", "maps", "certificates"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(check) && l.contains(" ok ")),
            "{check} is not ok:\n{text}"
        );
    }
    // One node, no --interfaces: nothing from other nodes is judged on
    // arrival, which status points out.
    assert!(
        text.lines().any(|l| l.starts_with("programs")
            && l.contains(" warn ")
            && l.contains("no --interfaces")),
        "{text}"
    );
    let (code, json) = status(&bed, &["-o", "json"]);
    assert_eq!(code, 0, "{json}");
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["healthy"], true);
    assert!(json["counters"]["policy_denied"].as_u64().unwrap() >= 1);
}

#[test]
fn an_invalid_policy_makes_ready_503_and_status_fail() {
    let (bed, _server) = shop("endpoints-bad");
    let agent = Agent::start_node(&bed, 0, &[]).unwrap();
    assert_eq!(status(&bed, &[]).0, 0);

    bed.write_config("bad.yaml", "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: broken, namespace: shop}\nspec:\n  action: MAYBE\n")
        .unwrap();
    let reason = wait_for("/ready still 200 after an invalid policy", || {
        let ready = get(&bed, HEALTH, "/ready");
        (ready.status == 503, ready.body)
    });
    assert!(
        reason.starts_with("invalid configuration:") && reason.contains("bad.yaml"),
        "{reason}"
    );
    // Alive, and still enforcing the policy in force.
    assert_eq!(get(&bed, HEALTH, "/live").status, 200);
    assert_eq!(probe_cart(&bed, ROBOT_POD), "eperm");
    assert_eq!(
        sample(&get(&bed, METRICS, "/metrics").body, "mesh_ready"),
        Some(0.0)
    );
    // The refusal is counted, by why.
    let metrics = get(&bed, METRICS, "/metrics").body;
    let refused = sample(
        &metrics,
        "mesh_reconcile_failures_total{mode=\"standalone\",reason=\"invalid_config\"}",
    );
    assert!(refused >= Some(1.0), "{metrics}");

    let (code, text) = status(&bed, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.starts_with("status: NOT healthy"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("ready") && l.contains("FAIL") && l.contains("bad.yaml")),
        "{text}"
    );
    let (code, json) = status(&bed, &["-o", "json"]);
    assert_eq!(code, 1);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["ready"], false);
    assert!(
        json["reason"].as_str().unwrap().contains("bad.yaml"),
        "{json}"
    );

    // Fixed: ready again.
    bed.remove_config("bad.yaml").unwrap();
    wait_for("/ready not 200 after the fix", || {
        let ready = get(&bed, HEALTH, "/ready");
        (ready.status == 200, ready.body)
    });
    assert_eq!(status(&bed, &[]).0, 0, "{}", agent.log());
}

#[test]
fn a_port_in_use_stops_the_agent_before_it_touches_the_kernel() {
    let bed = TestBed::new("endpoints-port").unwrap();
    let _taken = in_netns(&bed.nodes[0].netns, || {
        TcpListener::bind("0.0.0.0:15020").unwrap()
    });
    let mut agent = Agent::spawn_node(&bed, 0, &[]).unwrap();
    let exit = agent.wait_exit(T).unwrap();
    assert!(!exit.success());
    let log = agent.log();
    assert!(
        log.contains("cannot listen on 0.0.0.0:15020 (--metrics-address)"),
        "{log}"
    );
    assert!(
        !bed.pin_dir(0).join("SOCK_HASH").exists(),
        "the agent installed programs before it could serve:\n{log}"
    );
    // No agent, no programs: status says so, and exits 1.
    let (code, text) = status(&bed, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("agent") && l.contains("not running")),
        "{text}"
    );
}

/// The agent's log lines as JSON objects (`--log-format json`).
fn json_lines(agent: &Agent) -> Vec<Value> {
    agent
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn tunnels_are_counted_and_their_log_lines_name_both_identities() {
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
    let mut bed = TestBed::new("endpoints-mtls").unwrap();
    bed.add_node().unwrap();
    bed.connect_nodes().unwrap();
    for (node, sa) in [(0, "web"), (1, "db")] {
        bed.add_pod(node).unwrap();
        bed.register_workload(node, "shop", sa, &[]).unwrap();
    }
    let _server = bed
        .server(1, true, format!("[::]:{PORT}").parse().unwrap(), "echo")
        .unwrap();
    bed.write_mesh_nodes().unwrap();
    let ca = bed.mesh_ca("cluster.local").unwrap();

    // JSON logs: readiness comes from /ready, not from a log line.
    let ca = ca.to_str().unwrap();
    let agents: Vec<Agent> = (0..2)
        .map(|n| Agent::spawn_node(&bed, n, &["--ca-dir", ca, "--log-format", "json"]).unwrap())
        .collect();
    for (n, agent) in agents.iter().enumerate() {
        wait_for("an agent is not ready", || {
            match try_http_on(&bed, n, "GET", HEALTH, "/ready") {
                Ok(ready) => (
                    ready.status == 200,
                    format!("{}\n{}", ready.body, agent.log()),
                ),
                Err(e) => (false, format!("{e}\n{}", agent.log())),
            }
        });
        let debug = http_on(
            &bed,
            n,
            "POST",
            ADMIN,
            "/logging?level=info%2Cmesh_agent%3Ddebug",
        );
        assert_eq!(debug.status, 200, "{}", debug.body);
        assert!(debug.body.contains("mesh_agent=debug"), "{}", debug.body);
    }

    let target = format!("tcp:{}", bed.pods[1].addr(false, PORT));
    let report = bed
        .client(
            0,
            true,
            &["probe", "--targets", &target, "--timeout-ms", "2000"],
            T,
        )
        .unwrap();
    assert_eq!(report["results"][&target], "connected", "{report}");

    let series = |node: usize, name: &str| {
        let m = http_on(&bed, node, "GET", METRICS, "/metrics").body;
        (sample(&m, name), m)
    };
    // The source's agent: its handshake, and the tunnel closed again once
    // the probe's connection ended.
    wait_for("node 0 counted no outbound handshake", || {
        let (ok, m) = series(
            0,
            "mesh_tunnel_handshakes_total{direction=\"outbound\",result=\"ok\"}",
        );
        let open = sample(&m, "mesh_tunnels_open{direction=\"outbound\"}");
        (ok >= Some(1.0) && open == Some(0.0), m)
    });
    let (expires, m) = series(
        0,
        &format!("mesh_certificate_expires_in_seconds{{identity=\"{WEB}\"}}"),
    );
    assert!(expires.is_some_and(|s| s > 3600.0), "{m}");
    // The destination's agent: the handshake it accepted, and its verdict
    // on the tunnel for the verified identity.
    wait_for("node 1 counted no inbound tunnel", || {
        let (ok, m) = series(
            1,
            "mesh_tunnel_handshakes_total{direction=\"inbound\",result=\"ok\"}",
        );
        let verdict = sample(
            &m,
            &format!(
                "mesh_flow_verdicts_total{{hook=\"tunnel-in\",src_identity=\"{WEB}\",dst_identity=\"{DB}\",verdict=\"allow\",reason=\"mesh_default\"}}"
            ),
        );
        (ok >= Some(1.0) && verdict >= Some(1.0), m)
    });

    // Log lines about the tunnel carry both identities: the agent's own as
    // fields, the tunnel code's from its span.
    let line = |agent: &Agent, message: &str| {
        wait_for(&format!("no {message:?} line"), || {
            let found = json_lines(agent)
                .into_iter()
                .find(|l| l["fields"]["message"] == message);
            (
                found.is_some(),
                found.map_or_else(|| agent.log(), |l| l.to_string()),
            )
        })
    };
    let open: Value = serde_json::from_str(&line(&agents[0], "tunnel open")).unwrap();
    assert_eq!(
        (
            open["fields"]["src"].as_str(),
            open["fields"]["dst"].as_str()
        ),
        (Some(WEB), Some(DB)),
        "{open}"
    );
    let closed: Value = serde_json::from_str(&line(&agents[1], "tunnel closed")).unwrap();
    assert_eq!(closed["target"], "mesh_agent::tunnel::server", "{closed}");
    assert_eq!(
        (
            closed["span"]["src"].as_str(),
            closed["span"]["dst"].as_str()
        ),
        (Some(WEB), Some(DB)),
        "{closed}"
    );
    let flow: Value = serde_json::from_str(&line(&agents[1], "flow")).unwrap();
    assert_eq!(
        (
            flow["fields"]["src"].as_str(),
            flow["fields"]["dst"].as_str()
        ),
        (Some(WEB), Some(DB)),
        "{flow}"
    );

    // The certificates, in the dump and in status.
    let dump: Value =
        serde_json::from_str(&http_on(&bed, 1, "GET", ADMIN, "/config_dump").body).unwrap();
    assert_eq!(
        dump["certificates"]["certificates"][0]["spiffe_id"], DB,
        "{dump:#}"
    );
    let (code, text) = status(&bed, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("certificates") && l.contains(" ok ") && l.contains("1 valid")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("programs") && l.contains("tc on uplink")),
        "{text}"
    );
}
