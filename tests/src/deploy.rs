//! The manifests of `deploy/` as tests read them: every file the
//! kustomization lists, parsed into the API's types; the RBAC rules they
//! grant the agent, and whether a request is among them; the agent's flags
//! as `mesh-agent run --help` lists them.
//!
//! A kernel test can check that each request the agent made to the in-test
//! API server is one `deploy/` allows ([`Request::of`], [`agent_allows`])
//! and that each rule granted was used ([`agent_rules`]), and run the agent
//! with exactly the DaemonSet's capabilities ([`daemonset_capabilities`]).
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::apiserver::RequestRecord;

/// The mesh's namespace, where its service accounts live.
pub const NAMESPACE: &str = "mesh-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "mesh-agent";
pub const CA_SERVICE_ACCOUNT: &str = "mesh-ca";
pub const DAEMONSET: &str = "mesh-agent";
pub const AGENT_CONFIG: &str = "mesh-agent-config";

/// The `deploy/` directory of this repository.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The files a kustomization lists under `resources`, in order
/// (directories, other kustomizations, are not followed).
pub fn resources(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let path = dir.join("kustomization.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let k: Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    k["resources"]
        .as_array()
        .with_context(|| format!("{}: no resources", path.display()))?
        .iter()
        .map(|r| {
            r.as_str()
                .map(|r| dir.join(r))
                .with_context(|| format!("{}: resource {r} is not a path", path.display()))
        })
        .collect()
}

/// Every document of a YAML stream, empty ones left out.
pub fn documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(document)
            .with_context(|| format!("{}: document {n}", path.display()))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Every document of every file `deploy/kustomization.yaml` lists.
pub fn manifests() -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for file in resources(&deploy_dir())? {
        out.extend(documents(&file)?);
    }
    Ok(out)
}

/// Every object of `kind` among `manifests`, parsed as `K`.
pub fn objects_of<K: DeserializeOwned>(manifests: &[Value], kind: &str) -> anyhow::Result<Vec<K>> {
    manifests
        .iter()
        .filter(|m| m["kind"] == kind)
        .map(|m| {
            serde_json::from_value(m.clone())
                .with_context(|| format!("{kind} {}", m["metadata"]["name"]))
        })
        .collect()
}

/// The one object of `kind` named `name` among `manifests`.
pub fn object_of<K: DeserializeOwned>(
    manifests: &[Value],
    kind: &str,
    name: &str,
) -> anyhow::Result<K> {
    let found: Vec<&Value> = manifests
        .iter()
        .filter(|m| m["kind"] == kind && m["metadata"]["name"] == name)
        .collect();
    anyhow::ensure!(
        found.len() == 1,
        "{} {kind} named {name} in deploy/",
        found.len()
    );
    serde_json::from_value(found[0].clone()).with_context(|| format!("{kind} {name}"))
}

/// The agent's DaemonSet.
pub fn daemonset() -> anyhow::Result<DaemonSet> {
    object_of(&manifests()?, "DaemonSet", DAEMONSET)
}

/// The capabilities the DaemonSet adds to the agent's container (after
/// dropping all), as written there: `SYS_ADMIN`, …
pub fn daemonset_capabilities() -> Vec<String> {
    let ds = daemonset().unwrap_or_else(|e| panic!("deploy/: {e:#}"));
    let spec = ds.spec.template.spec.expect("a pod spec");
    let container = spec
        .containers
        .into_iter()
        .find(|c| c.name == DAEMONSET)
        .expect("the mesh-agent container");
    container
        .security_context
        .and_then(|s| s.capabilities)
        .and_then(|c| c.add)
        .unwrap_or_default()
}

/// One permission the RBAC manifests grant: one verb on one resource (or
/// URL), everywhere or in one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The Role or ClusterRole granting it.
    pub role: String,
    /// `Some`: only in this namespace (through a RoleBinding).
    pub namespace: Option<String>,
    pub verb: String,
    pub target: Target,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Resource {
        api_group: String,
        resource: String,
        /// Empty: the object itself.
        subresource: String,
        /// Empty: any name.
        names: Vec<String>,
    },
    /// A non-resource URL, such as `/version`.
    Url(String),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ", self.verb)?;
        match &self.target {
            Target::Url(url) => write!(f, "{url}")?,
            Target::Resource {
                api_group,
                resource,
                subresource,
                names,
            } => {
                write!(f, "{resource}")?;
                if !api_group.is_empty() {
                    write!(f, ".{api_group}")?;
                }
                if !subresource.is_empty() {
                    write!(f, "/{subresource}")?;
                }
                if !names.is_empty() {
                    write!(f, " {names:?}")?;
                }
            }
        }
        match &self.namespace {
            Some(ns) => write!(f, " in {ns} ({})", self.role),
            None => write!(f, " ({})", self.role),
        }
    }
}

/// What RBAC sees of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Resource {
        verb: String,
        api_group: String,
        namespace: Option<String>,
        resource: String,
        subresource: String,
        name: Option<String>,
    },
    Url {
        verb: String,
        path: String,
    },
}

impl Request {
    /// A request the in-test API server recorded (`None`: not a path of
    /// the Kubernetes API).
    pub fn of(record: &RequestRecord) -> Option<Request> {
        let verb = match record.verb.as_str() {
            // The server's name for `GET /version`.
            "version" => "get",
            "" => match record.method.as_str() {
                "GET" | "HEAD" => "get",
                "POST" => "create",
                "PUT" => "update",
                "PATCH" => "patch",
                "DELETE" => "delete",
                _ => return None,
            },
            verb => verb,
        };
        Request::parse(verb, &record.path)
    }

    /// An RBAC verb and a URL path, split as kube-apiserver does.
    pub fn parse(verb: &str, path: &str) -> Option<Request> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (api_group, mut rest) = match parts.as_slice() {
            ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
            _ => {
                return Some(Request::Url {
                    verb: verb.to_owned(),
                    path: path.to_owned(),
                });
            }
        };
        let mut namespace = None;
        // `namespaces/{ns}/{resource}…`, but `namespaces/{name}/status` is
        // the Namespace object's own subresource.
        if let ["namespaces", ns, next, ..] = rest
            && !matches!(*next, "status" | "finalize")
        {
            namespace = Some((*ns).to_owned());
            rest = &rest[2..];
        }
        if rest.first() == Some(&"namespaces") && rest.len() >= 2 && namespace.is_none() {
            // The Namespace object: its name is also its namespace.
            namespace = Some(rest[1].to_owned());
        }
        Some(Request::Resource {
            verb: verb.to_owned(),
            api_group: api_group.to_owned(),
            namespace,
            resource: rest.first()?.to_string(),
            name: rest.get(1).map(|s| s.to_string()),
            subresource: rest.get(2).map(|s| s.to_string()).unwrap_or_default(),
        })
    }
}

impl Rule {
    pub fn allows(&self, request: &Request) -> bool {
        let any = |granted: &str, asked: &str| granted == "*" || granted == asked;
        match (&self.target, request) {
            (Target::Url(url), Request::Url { verb, path }) => {
                any(&self.verb, verb)
                    && match url.strip_suffix('*') {
                        Some(prefix) => path.starts_with(prefix),
                        None => url == path,
                    }
            }
            (
                Target::Resource {
                    api_group,
                    resource,
                    subresource,
                    names,
                },
                Request::Resource {
                    verb,
                    api_group: asked_group,
                    namespace,
                    resource: asked_resource,
                    subresource: asked_subresource,
                    name,
                },
            ) => {
                any(&self.verb, verb)
                    && any(api_group, asked_group)
                    && any(resource, asked_resource)
                    && (subresource == asked_subresource
                        || resource == "*" && subresource.is_empty())
                    && (names.is_empty() || name.as_ref().is_some_and(|n| names.contains(n)))
                    && match &self.namespace {
                        None => true,
                        Some(ns) => namespace.as_ref() == Some(ns),
                    }
            }
            _ => false,
        }
    }
}

/// The rules the RBAC manifests among `manifests` grant to the service
/// account `namespace/name`, through its (Cluster)RoleBindings.
pub fn rules_for(manifests: &[Value], namespace: &str, name: &str) -> anyhow::Result<Vec<Rule>> {
    let cluster_roles: Vec<ClusterRole> = objects_of(manifests, "ClusterRole")?;
    let roles: Vec<Role> = objects_of(manifests, "Role")?;
    let is_subject = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == name
                && s.namespace.as_deref() == Some(namespace)
        })
    };
    let cluster_role = |role: &str| {
        cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(role))
            .with_context(|| format!("no ClusterRole {role}"))
    };
    let mut out = Vec::new();
    for b in objects_of::<ClusterRoleBinding>(manifests, "ClusterRoleBinding")? {
        if !is_subject(&b.subjects) {
            continue;
        }
        anyhow::ensure!(b.role_ref.kind == "ClusterRole", "{:?}", b.role_ref);
        let role = cluster_role(&b.role_ref.name)?;
        out.extend(flatten(&b.role_ref.name, None, role.rules.iter().flatten()));
    }
    for b in objects_of::<RoleBinding>(manifests, "RoleBinding")? {
        if !is_subject(&b.subjects) {
            continue;
        }
        let ns = b
            .metadata
            .namespace
            .clone()
            .context("a RoleBinding without namespace")?;
        let rules: Vec<PolicyRule> = match b.role_ref.kind.as_str() {
            "ClusterRole" => cluster_role(&b.role_ref.name)?
                .rules
                .clone()
                .unwrap_or_default(),
            _ => roles
                .iter()
                .find(|r| {
                    r.metadata.name.as_deref() == Some(&b.role_ref.name)
                        && r.metadata.namespace.as_deref() == Some(&ns)
                })
                .with_context(|| format!("no Role {ns}/{}", b.role_ref.name))?
                .rules
                .clone()
                .unwrap_or_default(),
        };
        out.extend(flatten(&b.role_ref.name, Some(&ns), rules.iter()));
    }
    Ok(out)
}

/// One [`Rule`] per verb × group × resource (or URL) of each PolicyRule.
fn flatten<'a>(
    role: &str,
    namespace: Option<&str>,
    rules: impl Iterator<Item = &'a PolicyRule>,
) -> Vec<Rule> {
    let mut out = Vec::new();
    for r in rules {
        let targets: Vec<Target> = match &r.non_resource_urls {
            Some(urls) => urls.iter().cloned().map(Target::Url).collect(),
            None => {
                let mut targets = Vec::new();
                for api_group in r.api_groups.iter().flatten() {
                    for full in r.resources.iter().flatten() {
                        let (resource, subresource) = full.split_once('/').unwrap_or((full, ""));
                        targets.push(Target::Resource {
                            api_group: api_group.clone(),
                            resource: resource.to_owned(),
                            subresource: subresource.to_owned(),
                            names: r.resource_names.clone().unwrap_or_default(),
                        });
                    }
                }
                targets
            }
        };
        for verb in &r.verbs {
            for target in &targets {
                out.push(Rule {
                    role: role.to_owned(),
                    namespace: namespace.map(str::to_owned),
                    verb: verb.clone(),
                    target: target.clone(),
                });
            }
        }
    }
    out
}

/// Every permission `deploy/` grants the agent's service account.
pub fn agent_rules() -> Vec<Rule> {
    let manifests = manifests().unwrap_or_else(|e| panic!("deploy/: {e:#}"));
    rules_for(&manifests, NAMESPACE, AGENT_SERVICE_ACCOUNT)
        .unwrap_or_else(|e| panic!("deploy/: {e:#}"))
}

/// Whether `deploy/` lets the agent make `request`.
pub fn agent_allows(request: &Request) -> bool {
    agent_rules().iter().any(|r| r.allows(request))
}

/// Whether `deploy/` lets the agent `verb` the resource (`subresource`
/// empty: the object itself) of `api_group` (`""`: the core group),
/// anywhere and by any name: some rule grants it.
pub fn rbac_allows(verb: &str, api_group: &str, resource: &str, subresource: &str) -> bool {
    agent_rules().iter().any(|r| match &r.target {
        Target::Resource {
            api_group: g,
            resource: res,
            subresource: sub,
            ..
        } => {
            (r.verb == "*" || r.verb == verb)
                && (g == "*" || g == api_group)
                && (res == "*" || res == resource)
                && sub == subresource
        }
        Target::Url(_) => false,
    })
}

/// One flag of `mesh-agent run --help`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flag {
    /// Without the dashes: `health-address`.
    pub long: String,
    pub env: Option<String>,
    pub default: Option<String>,
}

/// The flags of a clap help text (short or long form), with their
/// `[env: …]` and `[default: …]`.
pub fn parse_help(help: &str) -> Vec<Flag> {
    let mut flags: Vec<Flag> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let starts_flag = trimmed.starts_with("--")
            || (trimmed.starts_with('-') && trimmed.get(2..5) == Some(", -"));
        if starts_flag && let Some(at) = trimmed.find("--") {
            let long: String = trimmed[at + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            flags.push(Flag {
                long,
                env: None,
                default: None,
            });
        }
        let Some(flag) = flags.last_mut() else {
            continue;
        };
        if let Some(at) = line.find("[env: ") {
            let rest = &line[at + 6..];
            let end = rest.find(['=', ']']).unwrap_or(rest.len());
            flag.env = Some(rest[..end].to_owned());
        }
        if let Some(at) = line.find("[default: ") {
            let rest = &line[at + 10..];
            flag.default = Some(rest[..rest.find(']').unwrap_or(rest.len())].to_owned());
        }
    }
    flags
}

/// The flags of `mesh-agent run`, from the built agent's own help.
pub fn agent_run_flags() -> anyhow::Result<Vec<Flag>> {
    let bin = crate::agent::agent_bin();
    let out = std::process::Command::new(&bin)
        .args(["run", "--help"])
        .env_clear()
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "mesh-agent run --help: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(parse_help(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<Rule> {
        let yaml = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader}
rules:
  - apiGroups: [""]
    resources: [pods, nodes]
    verbs: [list, watch]
  - apiGroups: [mesh.dev]
    resources: [meshpolicies/status]
    verbs: [patch]
  - nonResourceURLs: [/version, /healthz/*]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: reader}
subjects: [{kind: ServiceAccount, name: agent, namespace: sys}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: someone-else}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: writer}
subjects: [{kind: ServiceAccount, name: agent, namespace: elsewhere}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: lease, namespace: sys}
rules:
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    resourceNames: [the-lease]
    verbs: [get, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: lease, namespace: sys}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: lease}
subjects: [{kind: ServiceAccount, name: agent, namespace: sys}]
"#;
        let manifests: Vec<Value> = serde_yaml::Deserializer::from_str(yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        rules_for(&manifests, "sys", "agent").unwrap()
    }

    fn allowed(verb: &str, path: &str) -> bool {
        let request = Request::parse(verb, path).unwrap();
        rules().iter().any(|r| r.allows(&request))
    }

    #[test]
    fn rules_are_flattened_per_verb_and_resource_for_the_bound_account_only() {
        let shown: Vec<String> = rules().iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "list pods (reader)",
                "list nodes (reader)",
                "watch pods (reader)",
                "watch nodes (reader)",
                "patch meshpolicies.mesh.dev/status (reader)",
                "get /version (reader)",
                "get /healthz/* (reader)",
                "get leases.coordination.k8s.io [\"the-lease\"] in sys (lease)",
                "update leases.coordination.k8s.io [\"the-lease\"] in sys (lease)",
            ]
        );
    }

    #[test]
    fn requests_are_allowed_by_verb_group_resource_subresource_name_and_namespace() {
        assert!(allowed("list", "/api/v1/pods"));
        assert!(allowed("watch", "/api/v1/nodes"));
        assert!(allowed("list", "/api/v1/namespaces/shop/pods"));
        assert!(!allowed("get", "/api/v1/namespaces/shop/pods/web"));
        assert!(!allowed("list", "/api/v1/namespaces"));
        assert!(!allowed("list", "/apis/mesh.dev/v1alpha1/meshpolicies"));
        // The status subresource, not the object.
        assert!(allowed(
            "patch",
            "/apis/mesh.dev/v1alpha1/namespaces/shop/meshpolicies/p/status"
        ));
        assert!(!allowed(
            "patch",
            "/apis/mesh.dev/v1alpha1/namespaces/shop/meshpolicies/p"
        ));
        // A namespaced Role: its namespace and its names only.
        let lease = "/apis/coordination.k8s.io/v1/namespaces/sys/leases/the-lease";
        assert!(allowed("get", lease));
        assert!(allowed("update", lease));
        assert!(!allowed("delete", lease));
        assert!(!allowed(
            "get",
            "/apis/coordination.k8s.io/v1/namespaces/other/leases/the-lease"
        ));
        assert!(!allowed(
            "get",
            "/apis/coordination.k8s.io/v1/namespaces/sys/leases/another"
        ));
        assert!(!allowed(
            "create",
            "/apis/coordination.k8s.io/v1/namespaces/sys/leases"
        ));
        // Non-resource URLs, exact or by prefix.
        assert!(allowed("get", "/version"));
        assert!(allowed("get", "/healthz/ping"));
        assert!(!allowed("get", "/metrics"));
        assert!(!allowed("post", "/version"));
    }

    #[test]
    fn paths_split_as_the_api_server_splits_them() {
        let r = |verb: &str, path: &str| Request::parse(verb, path).unwrap();
        assert_eq!(
            r(
                "patch",
                "/apis/mesh.dev/v1alpha1/namespaces/a/meshpolicies/p/status"
            ),
            Request::Resource {
                verb: "patch".into(),
                api_group: "mesh.dev".into(),
                namespace: Some("a".into()),
                resource: "meshpolicies".into(),
                subresource: "status".into(),
                name: Some("p".into()),
            }
        );
        // The Namespace object and its own status.
        assert_eq!(
            r("update", "/api/v1/namespaces/a/status"),
            Request::Resource {
                verb: "update".into(),
                api_group: "".into(),
                namespace: Some("a".into()),
                resource: "namespaces".into(),
                subresource: "status".into(),
                name: Some("a".into()),
            }
        );
        assert_eq!(
            r("get", "/version"),
            Request::Url {
                verb: "get".into(),
                path: "/version".into()
            }
        );
        let record = RequestRecord {
            method: "GET".into(),
            verb: "version".into(),
            path: "/version".into(),
            query: String::new(),
            content_type: None,
            body: None,
        };
        assert_eq!(Request::of(&record), Some(r("get", "/version")));
    }

    #[test]
    fn reads_flags_envs_and_defaults_from_both_help_layouts() {
        let long = "\
Usage: mesh-agent run [OPTIONS]

Options:
      --cgroup <CGROUP>
          cgroup v2 directory

          [env: MESH_CGROUP=]

      --health-address <HEALTH_ADDRESS>
          Readiness: `/ready`, `/live`.

          [env: MESH_HEALTH_ADDRESS=]
          [default: 0.0.0.0:15021]

  -o, --output <OUTPUT>
          [default: table]
      --kubernetes
          Kubernetes mode
  -h, --help
          Print help (see a summary with '-h')
";
        let short = "\
      --cgroup <CGROUP>  cgroup v2 directory [env: MESH_CGROUP=/x]
      --health-address <HEALTH_ADDRESS>  Readiness [env: MESH_HEALTH_ADDRESS=] [default: 0.0.0.0:15021]
";
        let flag = |long: &str, env: Option<&str>, default: Option<&str>| Flag {
            long: long.into(),
            env: env.map(Into::into),
            default: default.map(Into::into),
        };
        assert_eq!(
            parse_help(long),
            [
                flag("cgroup", Some("MESH_CGROUP"), None),
                flag(
                    "health-address",
                    Some("MESH_HEALTH_ADDRESS"),
                    Some("0.0.0.0:15021")
                ),
                flag("output", None, Some("table")),
                flag("kubernetes", None, None),
                flag("help", None, None),
            ]
        );
        assert_eq!(parse_help(short), parse_help(long)[..2]);
    }
}
