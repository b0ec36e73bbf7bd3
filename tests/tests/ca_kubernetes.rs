//! `mesh-agent ca serve --kubernetes` against the in-test API server: a
//! node gets the identity of a pod scheduled to it, never that of another
//! node's pod, and no longer once the pod is gone. No kernel needed: the CA
//! and the nodes' requests (`mesh-agent ca request`, as in mtls.rs) run on
//! the loopback.
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mesh_tests::{
    agent::agent_bin,
    apiserver::ApiServer,
    deploy::{self, Request},
    process::{Placement, Spawned},
};
use serde_json::{Value, json};

const TD: &str = "cluster.local";
/// How long a change of the cluster may take to reach the CA.
const CONVERGE: Duration = Duration::from_secs(10);

fn id(namespace: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{namespace}/sa/{sa}")
}

fn mesh_agent(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(agent_bin()).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "mesh-agent {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pod(namespace: &str, name: &str, node: &str, sa: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {
            "nodeName": node,
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "app"}],
        },
        "status": {"phase": "Running", "podIP": "198.18.0.10"},
    })
}

struct Ca {
    _service: Spawned,
    address: String,
    log: mpsc::Receiver<String>,
    dir: PathBuf,
}

impl Ca {
    /// A CA in a new directory, nodes' credentials, and `ca serve
    /// --kubernetes` on a free port of the loopback, once it says ready.
    fn start(test: &str, api: &ApiServer) -> Ca {
        let dir = std::env::temp_dir().join(mesh_tests::unique_name(test));
        std::fs::create_dir_all(&dir).unwrap();
        let path = |p: &str| dir.join(p).to_str().unwrap().to_owned();
        mesh_agent(&["ca", "init", "--trust-domain", TD, "--out", &path("ca")]).unwrap();
        for node in ["node-a", "node-b"] {
            mesh_agent(&[
                "ca",
                "issue-node",
                "--ca-dir",
                &path("ca"),
                "--node",
                node,
                "--out",
                &path(node),
            ])
            .unwrap();
        }
        api.write_kubeconfig(&dir.join("kubeconfig")).unwrap();
        let mut cmd = Command::new(agent_bin());
        cmd.args(["ca", "serve", "--kubernetes", "--kubeconfig"])
            .arg(dir.join("kubeconfig"))
            .args(["--ca-dir", &path("ca"), "--listen", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut service = Spawned::spawn(
            cmd,
            &Placement {
                netns: None,
                cgroup: None,
            },
        )
        .unwrap();
        let stderr = service.child_mut().stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut ca = Ca {
            _service: service,
            address: String::new(),
            log,
            dir,
        };
        let ready = ca.wait_for_line(" ready");
        ca.address = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .unwrap_or_else(|| panic!("no listen= in {ready:?}"))
            .to_owned();
        ca
    }

    fn wait_for_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = String::new();
        while Instant::now() < deadline {
            if let Ok(line) = self.log.recv_timeout(Duration::from_millis(100)) {
                if line.contains(needle) {
                    return line;
                }
                seen.push_str(&line);
                seen.push('\n');
            }
        }
        panic!("the CA said no {needle:?} within 20 s:\n{seen}");
    }

    /// `node` asks the CA for `spiffe_id`, with its own credentials.
    fn ask(&self, node: &str, spiffe_id: &str) -> anyhow::Result<String> {
        let credentials = self.dir.join(node);
        mesh_agent(&[
            "ca",
            "request",
            "--ca-address",
            &self.address,
            "--node-credentials",
            credentials.to_str().unwrap(),
            "--spiffe-id",
            spiffe_id,
        ])
    }

    /// Asks until the answer is granted (`true`) or refused, for up to
    /// [`CONVERGE`]; the last answer.
    fn ask_until(&self, node: &str, spiffe_id: &str, granted: bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let answer = self.ask(node, spiffe_id);
            if answer.is_ok() == granted || Instant::now() > deadline {
                return answer;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_refused(answer: anyhow::Result<String>, needles: &[&str]) {
    let text = format!("{:#}", answer.expect_err("a certificate was issued"));
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} not in: {text}");
    }
}

#[test]
fn the_ca_service_signs_only_identities_of_the_pods_a_node_runs() {
    let api = ApiServer::start().unwrap();
    api.apply(pod("shop", "cart-1", "node-a", "cart"));
    api.apply(pod("shop", "web-1", "node-b", "web"));
    // On node-a, but neither grants node-a its identity: on the host's
    // network, and finished.
    let mut host = pod("shop", "host-1", "node-a", "host");
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(host);
    let mut done = pod("shop", "job-1", "node-a", "job");
    done["status"]["phase"] = json!("Succeeded");
    api.apply(done);
    let ca = Ca::start("ca-k8s", &api);

    // Its own pod's identity: granted.
    let issued = ca.ask("node-a", &id("shop", "cart")).unwrap();
    assert!(issued.contains(&id("shop", "cart")), "{issued}");
    // Another node's pod's: refused, saying where it runs.
    assert_refused(
        ca.ask("node-a", &id("shop", "web")),
        &["node-a", &id("shop", "web"), "they run on node-b"],
    );
    ca.ask("node-b", &id("shop", "web")).unwrap();
    assert_refused(
        ca.ask("node-a", &id("shop", "host")),
        &["no pod has this identity"],
    );
    assert_refused(
        ca.ask("node-a", &id("shop", "job")),
        &["no pod has this identity"],
    );

    // A pod created now is granted once the CA has seen it…
    api.apply(pod("shop", "db-1", "node-a", "db"));
    ca.ask_until("node-a", &id("shop", "db"), true).unwrap();
    // …and a deleted one is refused once the CA has seen that.
    assert!(api.delete("v1", "Pod", Some("shop"), "cart-1"));
    assert_refused(
        ca.ask_until("node-a", &id("shop", "cart"), false),
        &["node-a", "no pod has this identity"],
    );

    // The API server gone: the pods last seen keep their grants.
    api.stop_serving();
    ca.ask("node-b", &id("shop", "web")).unwrap();
    api.resume_serving();

    // Everything the CA asked the API server, the deploy/ manifests let it.
    let manifests = deploy::manifests().unwrap();
    let rules =
        deploy::rules_for(&manifests, deploy::NAMESPACE, deploy::CA_SERVICE_ACCOUNT).unwrap();
    let requests: Vec<Request> = api.requests().iter().filter_map(Request::of).collect();
    for request in &requests {
        assert!(
            rules.iter().any(|r| r.allows(request)),
            "deploy/ does not let the CA make {request:?}"
        );
    }
    for rule in &rules {
        assert!(
            requests.iter().any(|r| rule.allows(r)),
            "deploy/ grants the CA {rule}, which it never used"
        );
    }
}
