//! The manifests of `deploy/` (`kubectl apply -k deploy/`), checked against
//! the agent they run: no kernel, no cluster. Every file the kustomization
//! lists parses into the API's types; the DaemonSet runs the agent
//! unprivileged with the documented capabilities and the host paths it
//! needs; every setting is an environment variable the agent reads; RBAC
//! grants exactly the requests the agent's code makes.
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_tests::deploy::{self, Flag, Request, Rule};
use serde_json::Value;

/// The capabilities the agent's container adds, each explained in the
/// manifest and in docs/deploy.md.
const CAPABILITIES: [&str; 3] = ["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"];

/// The agent's status Lease (mesh-agent/src/k8s/status.rs, LEASE_NAME).
const LEASE: &str = "mesh-agent-status";

fn manifests() -> Vec<Value> {
    deploy::manifests().unwrap_or_else(|e| panic!("deploy/: {e:#}"))
}

fn object<K: serde::de::DeserializeOwned>(kind: &str, name: &str) -> K {
    deploy::object_of(&manifests(), kind, name).unwrap_or_else(|e| panic!("{e:#}"))
}

fn flags() -> Vec<Flag> {
    deploy::agent_run_flags().unwrap_or_else(|e| panic!("{e:#}"))
}

/// The agent's default of `--<long>`, e.g. `0.0.0.0:15021`.
fn default_of(long: &str) -> String {
    flags()
        .into_iter()
        .find(|f| f.long == long)
        .and_then(|f| f.default)
        .unwrap_or_else(|| panic!("mesh-agent run has no --{long} with a default"))
}

fn default_port(long: &str) -> i32 {
    let addr: SocketAddr = default_of(long).parse().unwrap();
    i32::from(addr.port())
}

fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec.template.spec.clone().unwrap()
}

fn agent_container(spec: &PodSpec) -> Container {
    spec.containers
        .iter()
        .find(|c| c.name == deploy::DAEMONSET)
        .expect("the mesh-agent container")
        .clone()
}

/// A container port by number or name.
fn port_number(container: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
    }
}

fn env_value(container: &Container, name: &str) -> String {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| panic!("the container sets no {name}"))
}

/// Parses `value` as `K` and back: every field must survive, so a
/// misspelt or misplaced field (which the API server would drop or
/// refuse) fails here.
fn round_trips<K: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) {
    let what = format!("{} {}", value["kind"], value["metadata"]["name"]);
    let parsed: K = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let again = serde_json::to_value(&parsed).unwrap();
    if let Some(path) = difference(value, &again, String::new()) {
        panic!("{what}: {path} does not survive parsing (unknown or misplaced)");
    }
}

/// The path of the first field where `a` and `b` differ.
fn difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .find_map(|(k, v)| match b.get(k) {
                Some(w) => difference(v, w, format!("{path}.{k}")),
                None => Some(format!("{path}.{k}")),
            })
            .or_else(|| {
                b.keys()
                    .find(|k| !a.contains_key(*k))
                    .map(|k| format!("{path}.{k}"))
            }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| difference(v, w, format!("{path}[{i}]"))),
        _ => (a != b).then_some(path),
    }
}

#[test]
fn every_file_of_the_kustomization_exists_and_parses() {
    let dir = deploy::deploy_dir();
    let files = deploy::resources(&dir).unwrap();
    for file in &files {
        assert!(file.is_file(), "{} is listed but missing", file.display());
    }
    // Nothing written for deploy/ is left out of it.
    let listed: BTreeSet<_> = files.iter().map(|f| f.file_name().unwrap()).collect();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name();
        let yaml = Path::new(&name).extension().is_some_and(|e| e == "yaml");
        if yaml && name != "kustomization.yaml" {
            assert!(
                listed.contains(name.as_os_str()),
                "{name:?} is not in kustomization.yaml"
            );
        }
    }
    let manifests = manifests();
    let mut kinds = BTreeSet::new();
    for m in &manifests {
        let kind = m["kind"].as_str().expect("a kind");
        kinds.insert(kind.to_owned());
        match kind {
            "Namespace" => round_trips::<Namespace>(m),
            "CustomResourceDefinition" => round_trips::<CustomResourceDefinition>(m),
            "ServiceAccount" => round_trips::<ServiceAccount>(m),
            "ClusterRole" => round_trips::<ClusterRole>(m),
            "ClusterRoleBinding" => round_trips::<ClusterRoleBinding>(m),
            "Role" => round_trips::<Role>(m),
            "RoleBinding" => round_trips::<RoleBinding>(m),
            "ConfigMap" => round_trips::<ConfigMap>(m),
            "DaemonSet" => round_trips::<DaemonSet>(m),
            "Deployment" => round_trips::<Deployment>(m),
            "Service" => round_trips::<Service>(m),
            other => panic!("deploy/ holds a {other}, which this test does not know"),
        }
        // Namespaced objects all live in the mesh's namespace.
        let cluster_scoped = matches!(
            kind,
            "Namespace" | "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding"
        );
        let namespace = m["metadata"]["namespace"].as_str();
        if cluster_scoped {
            assert_eq!(namespace, None, "{kind} {}", m["metadata"]["name"]);
        } else {
            assert_eq!(
                namespace,
                Some(deploy::NAMESPACE),
                "{kind} {}",
                m["metadata"]["name"]
            );
        }
    }
    assert!(kinds.contains("DaemonSet") && kinds.contains("CustomResourceDefinition"));
    // The CA's key is never in deploy/: `kubectl apply -k` again must not
    // replace the real Secret with an empty one.
    assert!(!kinds.contains("Secret"), "deploy/ must not hold a Secret");
    let _: Namespace = object("Namespace", deploy::NAMESPACE);
}

#[test]
fn the_daemonset_runs_the_agent_unprivileged_with_the_documented_capabilities() {
    let ds: DaemonSet = object("DaemonSet", deploy::DAEMONSET);
    let spec = pod_spec(&ds);
    let c = agent_container(&spec);
    assert_eq!(
        c.image.as_deref(),
        Some(format!("mesh-agent:{}", env!("CARGO_PKG_VERSION")).as_str()),
        "the image `cargo xtask image` builds for this version"
    );
    assert_eq!(
        c.args.as_deref(),
        Some(&["run".into(), "--kubernetes".into()][..])
    );
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some(deploy::AGENT_SERVICE_ACCOUNT)
    );

    let security = c.security_context.clone().expect("a security context");
    assert_ne!(
        security.privileged,
        Some(true),
        "the agent is not privileged"
    );
    let caps = security.capabilities.expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(caps.add.as_deref().unwrap_or_default(), CAPABILITIES);
    assert_eq!(deploy::daemonset_capabilities(), CAPABILITIES);
    // Each one says why, in the docs.
    let docs = std::fs::read_to_string(deploy::deploy_dir().join("../docs/deploy.md")).unwrap();
    for cap in CAPABILITIES {
        assert!(
            docs.contains(&format!("| `CAP_{cap}` |")),
            "docs/deploy.md does not explain {cap}"
        );
    }

    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.host_pid,
        Some(true),
        "pods' network namespaces through /proc"
    );
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));

    // The host paths, where the agent's settings say.
    let volume_path = |name: &str| {
        spec.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.clone())
            .unwrap_or_else(|| panic!("no hostPath volume {name}"))
    };
    let mount = |name: &str| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no mount of {name}"))
            .clone()
    };
    let bpffs = mount("bpffs");
    assert_eq!(volume_path("bpffs").path, "/sys/fs/bpf");
    assert!(
        env_value(&c, "MESH_BPFFS").starts_with(&format!("{}/", bpffs.mount_path)),
        "the pins are on the host's bpffs"
    );
    // The pins are files of the host's bpffs, so they outlive the pod
    // without propagating mounts back (Bidirectional is for privileged
    // containers only: the API server would refuse it here).
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    let cgroup = mount("cgroup");
    assert_eq!(volume_path("cgroup").path, "/sys/fs/cgroup");
    assert_eq!(env_value(&c, "MESH_CGROUP"), cgroup.mount_path);
    assert_ne!(
        cgroup.mount_path, "/sys/fs/cgroup",
        "not the container's own cgroup view"
    );
    let state = volume_path("state");
    assert_eq!(state.path, "/run/mesh");
    assert_eq!(state.type_.as_deref(), Some("DirectoryOrCreate"));
    assert_eq!(env_value(&c, "MESH_STATE_DIR"), mount("state").mount_path);
    for m in c.volume_mounts.iter().flatten() {
        assert_ne!(
            m.mount_propagation.as_deref(),
            Some("Bidirectional"),
            "{}",
            m.name
        );
    }

    // The downward API.
    let field = |name: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.clone())
            .and_then(|v| v.field_ref)
            .map(|f| f.field_path)
            .unwrap_or_else(|| panic!("{name} is not from the downward API"))
    };
    assert_eq!(field("NODE_NAME"), "spec.nodeName");
    assert_eq!(field("POD_NAMESPACE"), "metadata.namespace");

    // Probes on the agent's own default health port; metrics scraped where
    // the agent serves them.
    let health = default_port("health-address");
    let readiness = c.readiness_probe.clone().unwrap().http_get.unwrap();
    let liveness = c.liveness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(readiness.path.as_deref(), Some("/ready"));
    assert_eq!(liveness.path.as_deref(), Some("/live"));
    assert_eq!(port_number(&c, &readiness.port), health);
    assert_eq!(port_number(&c, &liveness.port), health);
    let metrics = default_port("metrics-address");
    assert_eq!(
        port_number(&c, &IntOrString::String("metrics".into())),
        metrics
    );
    let annotations = ds
        .spec
        .template
        .metadata
        .clone()
        .unwrap()
        .annotations
        .unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], metrics.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // Every node, before other pods, one node at a time.
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let strategy = ds.spec.update_strategy.clone().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        rolling.max_surge,
        Some(IntOrString::Int(0)),
        "two agents cannot share the pins"
    );
    assert!(spec.termination_grace_period_seconds.unwrap() >= 30);

    let resources = c.resources.clone().expect("resources");
    for (what, list) in [
        ("requests", resources.requests),
        ("limits", resources.limits),
    ] {
        let list = list.unwrap_or_else(|| panic!("no {what}"));
        assert!(
            list.contains_key("cpu") && list.contains_key("memory"),
            "{what}: {list:?}"
        );
    }

    // Selectors select the pods they make.
    let labels = ds.spec.template.metadata.clone().unwrap().labels.unwrap();
    for (k, v) in ds.spec.selector.match_labels.unwrap() {
        assert_eq!(labels.get(&k), Some(&v));
    }
}

#[test]
fn every_setting_is_an_environment_variable_the_agent_reads() {
    let accepted: BTreeSet<String> = flags().into_iter().filter_map(|f| f.env).collect();
    assert!(accepted.contains("MESH_TRUST_DOMAIN"), "{accepted:?}");
    let config: ConfigMap = object("ConfigMap", deploy::AGENT_CONFIG);
    let mut names: Vec<String> = config.data.unwrap_or_default().into_keys().collect();
    let ds: DaemonSet = object("DaemonSet", deploy::DAEMONSET);
    let c = agent_container(&pod_spec(&ds));
    names.extend(c.env.iter().flatten().map(|e| e.name.clone()));
    // …and those the mTLS component adds.
    let component = deploy::deploy_dir().join("mtls/agent-config.yaml");
    let patch: ConfigMap =
        serde_json::from_value(deploy::documents(&component).unwrap().remove(0)).unwrap();
    names.extend(patch.data.unwrap_or_default().into_keys());
    for name in names {
        assert!(accepted.contains(&name), "mesh-agent run reads no {name}");
    }
    assert_eq!(
        c.env_from.as_deref().unwrap()[0]
            .config_map_ref
            .as_ref()
            .unwrap()
            .name,
        deploy::AGENT_CONFIG
    );
}

#[test]
fn rbac_grants_the_agent_exactly_the_requests_its_code_makes() {
    let granted: Vec<String> = deploy::agent_rules().iter().map(Rule::to_string).collect();
    assert_eq!(
        granted,
        [
            "list pods (mesh-agent)",
            "list namespaces (mesh-agent)",
            "list nodes (mesh-agent)",
            "list services (mesh-agent)",
            "watch pods (mesh-agent)",
            "watch namespaces (mesh-agent)",
            "watch nodes (mesh-agent)",
            "watch services (mesh-agent)",
            "list endpointslices.discovery.k8s.io (mesh-agent)",
            "watch endpointslices.discovery.k8s.io (mesh-agent)",
            "list meshpolicies.mesh.dev (mesh-agent)",
            "list peerauthentications.mesh.dev (mesh-agent)",
            "list trafficsplits.mesh.dev (mesh-agent)",
            "watch meshpolicies.mesh.dev (mesh-agent)",
            "watch peerauthentications.mesh.dev (mesh-agent)",
            "watch trafficsplits.mesh.dev (mesh-agent)",
            "patch meshpolicies.mesh.dev/status (mesh-agent)",
            "patch peerauthentications.mesh.dev/status (mesh-agent)",
            "patch trafficsplits.mesh.dev/status (mesh-agent)",
            "get /version (mesh-agent)",
            "create leases.coordination.k8s.io in mesh-system (mesh-agent-status)",
            "get leases.coordination.k8s.io [\"mesh-agent-status\"] in mesh-system (mesh-agent-status)",
            "update leases.coordination.k8s.io [\"mesh-agent-status\"] in mesh-system (mesh-agent-status)",
        ]
    );
    assert!(deploy::rbac_allows("list", "", "pods", ""));
    assert!(deploy::rbac_allows(
        "watch",
        "mesh.dev",
        "peerauthentications",
        ""
    ));
    assert!(deploy::rbac_allows(
        "patch",
        "mesh.dev",
        "meshpolicies",
        "status"
    ));
    assert!(!deploy::rbac_allows(
        "patch",
        "mesh.dev",
        "meshpolicies",
        ""
    ));
    assert!(!deploy::rbac_allows("get", "", "pods", ""));
    assert!(!deploy::rbac_allows("list", "", "secrets", ""));
    assert!(deploy::rbac_allows(
        "update",
        "coordination.k8s.io",
        "leases",
        ""
    ));

    // The Lease: in the agents' namespace (POD_NAMESPACE), by name.
    let lease = |verb: &str, ns: &str, name: &str| {
        deploy::agent_allows(
            &Request::parse(
                verb,
                &format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}"),
            )
            .unwrap(),
        )
    };
    assert!(lease("get", deploy::NAMESPACE, LEASE));
    assert!(lease("update", deploy::NAMESPACE, LEASE));
    assert!(!lease("update", deploy::NAMESPACE, "kube-scheduler"));
    assert!(!lease("get", "kube-system", LEASE));
    assert!(!lease("delete", deploy::NAMESPACE, LEASE));
    let ds: DaemonSet = object("DaemonSet", deploy::DAEMONSET);
    assert_eq!(ds.metadata.namespace.as_deref(), Some(deploy::NAMESPACE));

    // The CA service reads pods, nothing else.
    let ca: Vec<String> =
        deploy::rules_for(&manifests(), deploy::NAMESPACE, deploy::CA_SERVICE_ACCOUNT)
            .unwrap()
            .iter()
            .map(Rule::to_string)
            .collect();
    assert_eq!(ca, ["list pods (mesh-ca)", "watch pods (mesh-ca)"]);
}

#[test]
fn the_ca_service_serves_the_secret_operators_create() {
    let d: Deployment = object("Deployment", "mesh-ca");
    let template = d.spec.template.clone();
    let spec = template.spec.unwrap();
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some(deploy::CA_SERVICE_ACCOUNT)
    );
    let c = &spec.containers[0];
    let args = c.args.clone().unwrap();
    assert_eq!(args[..3], ["ca", "serve", "--kubernetes"]);
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].clone())
            .unwrap_or_else(|| panic!("no {flag}"))
    };
    // The Secret is mounted where --ca-dir says.
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("mesh-ca"))
        .expect("the mesh-ca Secret as a volume");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .unwrap();
    assert_eq!(mount.mount_path, arg("--ca-dir"));
    assert_eq!(mount.read_only, Some(true));
    let security = c.security_context.clone().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.capabilities.unwrap().drop.unwrap(), ["ALL"]);

    // The Service reaches the port the CA listens on, and the mTLS
    // component points the agents at the Service.
    let listen: SocketAddr = arg("--listen").parse().unwrap();
    let service: Service = object("Service", "mesh-ca");
    let service_spec = service.spec.unwrap();
    let port = &service_spec.ports.unwrap()[0];
    assert_eq!(
        port_number(c, port.target_port.as_ref().unwrap()),
        i32::from(listen.port())
    );
    let labels = template.metadata.unwrap().labels.unwrap();
    for (k, v) in service_spec.selector.unwrap() {
        assert_eq!(labels.get(&k), Some(&v));
    }
    let component = deploy::deploy_dir().join("mtls/agent-config.yaml");
    let patch = deploy::documents(&component).unwrap().remove(0);
    assert_eq!(
        patch["data"]["MESH_CA_ADDRESS"],
        format!("mesh-ca.{}.svc:{}", deploy::NAMESPACE, port.port)
    );

    // `--from-file=dir/` of what `ca init` writes is exactly what the CA
    // reads; the docs say so.
    let dir = std::env::temp_dir().join(mesh_tests::unique_name("deploy-ca"));
    let out = std::process::Command::new(mesh_tests::agent::agent_bin())
        .args(["ca", "init", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(files, ["bundle.pem", "ca-key.pem", "ca.pem", "chain.pem"]);
    let docs = std::fs::read_to_string(deploy::deploy_dir().join("../docs/deploy.md")).unwrap();
    assert!(docs.contains("kubectl -n mesh-system create secret generic mesh-ca --from-file="));
    for file in files {
        assert!(
            docs.contains(&format!("`{file}`")),
            "docs/deploy.md does not name {file}"
        );
    }
}

#[test]
fn the_mtls_component_mounts_the_node_credentials_the_agent_is_told_about() {
    let dir = deploy::deploy_dir().join("mtls");
    let k = &deploy::documents(&dir.join("kustomization.yaml")).unwrap()[0];
    assert_eq!(k["kind"], "Component");
    let patches: Vec<&str> = k["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    let mut credentials = None;
    let mut mounted = None;
    for patch in patches {
        let doc = deploy::documents(&dir.join(patch)).unwrap().remove(0);
        // Each patch names an object of the base.
        let kind = doc["kind"].as_str().unwrap();
        let name = doc["metadata"]["name"].as_str().unwrap();
        assert!(
            manifests()
                .iter()
                .any(|m| m["kind"] == kind && m["metadata"]["name"] == name),
            "{patch} patches no {kind} {name} of deploy/"
        );
        match kind {
            "ConfigMap" => {
                credentials = doc["data"]["MESH_NODE_CREDENTIALS"]
                    .as_str()
                    .map(str::to_owned)
            }
            "DaemonSet" => {
                let ds: DaemonSet = serde_json::from_value(doc).unwrap();
                let spec = pod_spec(&ds);
                let c = agent_container(&spec);
                let m = c.volume_mounts.unwrap().remove(0);
                assert_eq!(m.read_only, Some(true));
                let v = spec.volumes.unwrap().remove(0);
                assert_eq!(v.name, m.name);
                assert_eq!(v.host_path.unwrap().type_.as_deref(), Some("Directory"));
                mounted = Some(m.mount_path);
            }
            other => panic!("unexpected patch of a {other}"),
        }
    }
    assert!(credentials.is_some());
    assert_eq!(
        credentials, mounted,
        "the credentials are where the agent looks"
    );
}
