//! A Kubernetes cluster as the agents see it: the in-test API server, and
//! pods that exist both as objects there and as network namespaces with a
//! sandbox process in a kubelet-style pod cgroup (`…/kubepods/pod<uid>`),
//! which is how the agent finds a local pod's network namespace.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::{
    apiserver::ApiServer,
    cgroup::TestCgroup,
    process::{Placement, Spawned},
    topology::TestBed,
};

pub struct Cluster {
    /// Sandboxes before their cgroups (fields drop in order).
    sandboxes: Vec<Sandbox>,
    /// Each node's `kubepods` cgroup, parent of its pods' cgroups.
    kubepods: std::collections::BTreeMap<usize, TestCgroup>,
    pub api: ApiServer,
    pub kubeconfig: PathBuf,
}

/// A pod's "pause" process, in the pod's netns and cgroup.
struct Sandbox {
    uid: String,
    process: Spawned,
    _cgroup: TestCgroup,
}

/// A pod as created by [`Cluster::run_pod`].
#[derive(Clone, Debug)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Cluster {
    /// The requests the agents made that `deploy/`'s RBAC would refuse
    /// them (the test itself writes through the server's own functions, so
    /// every recorded request is an agent's).
    pub fn requests_deploy_refuses(&self) -> Vec<crate::deploy::Request> {
        self.api
            .requests()
            .iter()
            .filter_map(crate::deploy::Request::of)
            .filter(|r| !crate::deploy::agent_allows(r))
            .collect()
    }

    /// Starts the API server on node 0 (on its loopback, or on its uplink
    /// address when the nodes are connected, so every node reaches it) and
    /// writes a kubeconfig for the agents.
    pub fn start(bed: &TestBed) -> anyhow::Result<Self> {
        let ip = if bed.has_fabric() {
            crate::topology::node_uplink_ip(0)
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        };
        let api = ApiServer::start_in(Some(&bed.nodes[0].netns), ip)?;
        let kubeconfig = bed.files.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        Ok(Self {
            sandboxes: Vec::new(),
            kubepods: Default::default(),
            api,
            kubeconfig,
        })
    }

    /// Creates the Namespace object `name` with `labels`.
    pub fn namespace(&self, name: &str, labels: Value) {
        self.api.apply(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }));
    }

    /// Runs test pod `pod` as the Pod `namespace/name`, as kubelet would:
    /// the object is created (Pending, no IP), the sandbox starts in a cgroup
    /// named after the uid the API server gave, and then the status reports
    /// the pod's IPs and Running.
    pub fn run_pod(
        &mut self,
        bed: &TestBed,
        pod: usize,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: Value,
    ) -> anyhow::Result<PodRef> {
        let p = &bed.pods[pod];
        let node = &bed.nodes[p.node];
        let mut object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "nodeName": node.name(),
                "serviceAccountName": service_account,
                "containers": [{"name": "app", "image": "mesh-pod"}],
            },
            "status": {"phase": "Pending"},
        });
        let created = self.api.apply(object.clone());
        let uid = created["metadata"]["uid"]
            .as_str()
            .context("the API server gave the pod no uid")?
            .to_owned();
        let kubepods = match self.kubepods.entry(p.node) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(node.cgroup.child("kubepods")?)
            }
        };
        let cgroup = kubepods.child(&format!("pod{uid}"))?;
        let mut cmd = Command::new("sleep");
        cmd.arg("infinity")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = Spawned::spawn(
            cmd,
            &Placement {
                netns: Some(&p.netns),
                cgroup: Some(&cgroup),
            },
        )?;
        self.sandboxes.push(Sandbox {
            uid: uid.clone(),
            process,
            _cgroup: cgroup,
        });
        object["metadata"]["uid"] = json!(uid);
        object["status"] = json!({
            "phase": "Running",
            "podIP": p.ip4.to_string(),
            "podIPs": [{"ip": p.ip4.to_string()}, {"ip": p.ip6.to_string()}],
        });
        self.api.apply(object);
        Ok(PodRef {
            namespace: namespace.into(),
            name: name.into(),
            uid,
        })
    }

    /// Stops `pod`'s sandbox process (its object and network namespace
    /// stay, as when a pod's last process exits); returns the pid it had.
    pub fn stop_sandbox(&mut self, pod: &PodRef) -> anyhow::Result<u32> {
        let sandbox = self
            .sandboxes
            .iter_mut()
            .find(|s| s.uid == pod.uid)
            .context("no sandbox of that pod")?;
        let pid = sandbox.process.pid();
        sandbox.process.terminate(Duration::from_secs(5))?;
        Ok(pid)
    }

    pub fn delete_pod(&self, pod: &PodRef) -> bool {
        self.api
            .delete("v1", "Pod", Some(&pod.namespace), &pod.name)
    }

    /// Applies every document of a YAML stream, as `kubectl apply -f`.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(document)?;
            if !value.is_null() {
                self.api.apply(value);
            }
        }
        Ok(())
    }

    /// The `Accepted` condition of a document, once it has one for the
    /// object's current generation (waits up to `timeout`).
    pub fn wait_accepted(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let object = self
                .api
                .get("mesh.dev/v1alpha1", kind, Some(namespace), name)
                .with_context(|| format!("no {kind} {namespace}/{name}"))?;
            let generation = object["metadata"]["generation"].clone();
            if let Some(c) = object["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Accepted" && c["observedGeneration"] == generation)
            {
                return Ok(c.clone());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{kind} {namespace}/{name} has no Accepted condition for generation {generation} after {timeout:?}: {object}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
