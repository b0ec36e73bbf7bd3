//! From documents to the kernel's map entries (docs/policy.md, "How it is
//! compiled"), and [`evaluate`], the reference semantics the compiled
//! entries must reproduce through [`mesh_common::policy::decide`].
//!
//! Choices the document leaves open:
//!
//! - **Which rule decides.** Policies are considered in the order of their
//!   `namespace/name` (plain string order), and the rules of a policy in
//!   their order in `spec.rules`. A verdict names the first matching DENY
//!   rule in that order; otherwise, for an ALLOW policy's say, the first
//!   matching ALLOW rule; for an AUDIT pass, the first matching AUDIT rule.
//! - **Policies without rules** (`rules` omitted or empty). An ALLOW policy
//!   without rules still selects its workloads and allows nothing: they
//!   become default-deny (Istio's "allow nothing"). A DENY or AUDIT policy
//!   without rules matches no connection.
//! - **Rule ids** are a hash of `namespace/name#index`, so that a rule keeps
//!   its id when other documents change (minimal map diffs, and flow events
//!   stay meaningful across reloads); collisions are resolved by probing
//!   upwards, rules taken in sorted order.
//! - **Subjects** are a hash of the identity and the sorted names of the
//!   policies selecting the workload: stable across recompiles too.

use std::collections::{BTreeMap, HashMap};
use std::iter;
use std::net::IpAddr;
use std::path::PathBuf;

use mesh_common::policy::{
    ANY_IDENTITY, ANY_PORT, Action, ENDPOINT_LOCAL, ENDPOINT_SHORT_CIRCUIT, ENDPOINT_STRICT,
    Endpoint, FIRST_POLICY_RULE, IpKey, PolicyKey, RULE_MESH_DEFAULT, RULE_NO_POLICY,
    RULE_NON_MESH, RULE_NOT_ALLOWED, RULE_REFUSED_IDENTITY, RULE_REFUSED_POLICY, RULE_STRICT_MTLS,
    Verdict, WORLD_IDENTITY,
};

use super::documents::{
    ConfigError, Documents, FromEntry, KIND_MESH_POLICY, KIND_WORKLOAD, MeshPolicy, MtlsMode,
    PeerAuthentication, PolicyAction, Protocol, Rule, Selector, Workload,
};
use super::identity::{IdentityPattern, hash32, hash64, numeric_identity, spiffe_id};
use super::services::{ServiceInfo, ServiceSlots, compile_services, owners_compiled, owners_of};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_ROOT_NAMESPACE: &str = "mesh-system";

/// What the agent's flags say about the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshSettings {
    /// `--trust-domain`.
    pub trust_domain: String,
    /// `--node`: this agent's node name.
    pub node: String,
    /// `--root-namespace`: its policies select workloads of every namespace.
    pub root_namespace: String,
    /// `--default-policy`: mesh sources, destination not selected by any ALLOW.
    pub default_action: DefaultAction,
    /// `--non-mesh`: `world` sources, destination not selected by any ALLOW.
    pub non_mesh_action: DefaultAction,
    /// How many policy entries the compiled cluster may have: half the
    /// policy map (`--max-policy`), so that any change fits in the map
    /// beside the entries it replaces. Policies that do not fit are refused
    /// one by one, most recently changed first. `None`: no bound.
    pub policy_budget: Option<usize>,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            node: String::new(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            default_action: DefaultAction::Allow,
            non_mesh_action: DefaultAction::Allow,
            policy_budget: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Allow,
    Deny,
}

impl std::str::FromStr for DefaultAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            other => Err(format!("unknown default action {other:?} (allow or deny)")),
        }
    }
}

impl DefaultAction {
    pub const NAMES: [&str; 2] = ["allow", "deny"];

    pub fn action(self) -> Action {
        match self {
            DefaultAction::Allow => Action::Allow,
            DefaultAction::Deny => Action::Deny,
        }
    }
}

/// The source of a connection, for [`evaluate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A mesh identity (a number the configuration does not know is a mesh
    /// identity that only the wildcard `from` entries match).
    Identity(u64),
    /// Not a mesh workload.
    World,
}

/// Everything the agent puts in the kernel's maps, and what explains it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    /// Every address of every workload, local and remote.
    pub endpoints: BTreeMap<IpKey, Endpoint>,
    /// Network namespace of each local workload → its identity (the agent
    /// turns paths into netns cookies).
    pub local_netns: BTreeMap<PathBuf, u64>,
    pub policy: BTreeMap<PolicyKey, Verdict>,
    /// Numeric identity → SPIFFE ID (and [`WORLD_IDENTITY`] → `world`).
    pub identities: BTreeMap<u64, String>,
    /// Rule id → what it is, reserved ids included.
    pub rules: BTreeMap<u32, RuleInfo>,
    pub subjects: BTreeMap<u64, SubjectInfo>,
    /// Sorted by namespace, then name.
    pub workloads: Vec<WorkloadInfo>,
    /// Node name → the addresses its agent's tunnels are reached at.
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
    /// Every Service address → its backends in slot order.
    pub service_slots: ServiceSlots,
    /// The names behind the Service entries, sorted by namespace and name.
    pub services: Vec<ServiceInfo>,
    /// Documents left out on their own, and why, while the rest compiled:
    /// workloads whose identity number another identity has too, policies
    /// that do not fit the policy budget.
    pub refused: Vec<ConfigError>,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
pub struct RuleInfo {
    pub id: u32,
    /// `namespace/name` of the policy (`None` for the reserved rules).
    pub policy: Option<String>,
    pub file: Option<String>,
    /// Index in `spec.rules`.
    pub rule: Option<usize>,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: String,
    pub description: String,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
pub struct SubjectInfo {
    pub id: u64,
    pub identity: u64,
    /// `namespace/name` of the policies selecting the subject, sorted.
    pub policies: Vec<String>,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub spiffe_id: String,
    pub identity: u64,
    pub subject: u64,
    /// Canonical form: IPv4-mapped IPv6 addresses are shown as IPv4.
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub local: bool,
    #[serde(default)]
    pub mtls: MtlsMode,
    /// Local workloads: the network namespace the agent's listeners go into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

/// Whether `policy` selects a workload of namespace `ns`, service account
/// `sa` and labels `labels`.
pub(crate) fn selects(
    policy: &MeshPolicy,
    root_namespace: &str,
    ns: &str,
    sa: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let pns = policy.metadata.namespace.as_str();
    (pns == ns || pns == root_namespace) && selector_matches(&policy.spec.selector, sa, labels)
}

fn selector_matches(
    selector: &Option<Selector>,
    sa: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.as_ref().is_none_or(|s| {
        s.service_account.as_ref().is_none_or(|want| want == sa)
            && s.match_labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    })
}

/// The mTLS mode of a workload, as Istio resolves PeerAuthentication: a
/// policy with a selector in the workload's namespace beats one for the
/// whole namespace, which beats the root namespace's mesh-wide one; at the
/// same level STRICT wins (the safe choice, where Istio would pick the
/// oldest). PERMISSIVE when none applies.
pub(crate) fn mtls_mode(
    docs: &[PeerAuthentication],
    root_namespace: &str,
    ns: &str,
    sa: &str,
    labels: &BTreeMap<String, String>,
) -> MtlsMode {
    let mut best: Option<(u8, MtlsMode)> = None;
    for p in docs {
        let pns = p.metadata.namespace.as_str();
        let level = match (pns == ns, pns == root_namespace, &p.spec.selector) {
            (true, _, Some(_)) => 3,
            (true, _, None) => 2,
            (false, true, None) => 1,
            _ => continue, // root-namespace selectors are not mesh-wide
        };
        if !selector_matches(&p.spec.selector, sa, labels) {
            continue;
        }
        let candidate = (level, p.spec.mtls.mode);
        best = Some(best.map_or(candidate, |b| b.max(candidate)));
    }
    best.map_or(MtlsMode::Permissive, |(_, mode)| mode)
}

/// Rule ids of every rule of every policy, keyed by (`namespace/name`,
/// index in `spec.rules`).
pub(crate) fn assign_rule_ids(policies: &[MeshPolicy]) -> HashMap<(String, usize), u32> {
    let mut keys: Vec<(String, usize)> = policies
        .iter()
        .flat_map(|p| {
            let key = p.key();
            (0..p.spec.rules.len()).map(move |i| (key.clone(), i))
        })
        .collect();
    keys.sort();
    keys.dedup();
    let mut used = std::collections::HashSet::with_capacity(keys.len());
    let mut ids = HashMap::with_capacity(keys.len());
    for key in keys {
        let mut id = hash32(format!("{}#{}", key.0, key.1).as_bytes());
        while id < FIRST_POLICY_RULE || !used.insert(id) {
            id = id.wrapping_add(1);
        }
        ids.insert(key, id);
    }
    ids
}

/// A rule, with its `from` expanded over the known identities.
struct CompiledRule {
    id: u32,
    /// No `from`: matches every source, `world` included.
    any_source: bool,
    /// A `from` entry matches every mesh identity.
    universal: bool,
    /// Known identities that the other `from` entries match, sorted.
    sources: Vec<u64>,
    /// `None`: every port. Otherwise the ports of each protocol, sorted,
    /// indexed like [`Protocol::ALL`].
    ports: Option<[Vec<u16>; 2]>,
}

struct CompiledPolicy<'a> {
    doc: &'a MeshPolicy,
    key: String,
    /// The document's, or DENY for a refused policy.
    action: PolicyAction,
    rules: Vec<CompiledRule>,
}

fn proto_index(proto: Protocol) -> usize {
    match proto {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    }
}

fn policy_error(p: &MeshPolicy, field: String, message: String) -> ConfigError {
    ConfigError::at(&p.origin, KIND_MESH_POLICY, &p.metadata, field, message)
}

fn workload_error(w: &Workload, field: &str, message: String) -> ConfigError {
    ConfigError::at(&w.origin, KIND_WORKLOAD, &w.metadata, field, message)
}

/// Known SPIFFE IDs starting with `prefix`.
fn with_prefix<'k>(
    known: &'k BTreeMap<String, u64>,
    prefix: &'k str,
) -> impl Iterator<Item = u64> + 'k {
    known
        .range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(move |(id, _)| id.starts_with(prefix))
        .map(|(_, n)| *n)
}

fn compile_rule(
    p: &MeshPolicy,
    index: usize,
    rule: &Rule,
    id: u32,
    known: &BTreeMap<String, u64>,
    settings: &MeshSettings,
) -> Result<CompiledRule, ConfigError> {
    let td = settings.trust_domain.as_str();
    let mut compiled = CompiledRule {
        id,
        any_source: rule.from.is_empty(),
        universal: false,
        sources: Vec::new(),
        ports: None,
    };
    for (j, from) in rule.from.iter().enumerate() {
        match from {
            FromEntry {
                identity: Some(pattern),
                namespace: None,
            } => {
                let field = format!("spec.rules[{index}].from[{j}].identity");
                let parsed = IdentityPattern::parse(pattern)
                    .map_err(|m| policy_error(p, field.clone(), m))?;
                if let Some(other) = parsed.trust_domain()
                    && other != td
                {
                    return Err(policy_error(
                        p,
                        field,
                        format!("{pattern:?} is not in the mesh's trust domain {td:?}"),
                    ));
                }
                match &parsed {
                    _ if parsed.is_universal() => compiled.universal = true,
                    IdentityPattern::Exact(id) => compiled.sources.extend(known.get(id)),
                    IdentityPattern::Prefix(prefix) => {
                        compiled.sources.extend(with_prefix(known, prefix))
                    }
                    IdentityPattern::Any => compiled.universal = true,
                }
            }
            FromEntry {
                identity: None,
                namespace: Some(ns),
            } => {
                if ns == "*" {
                    compiled.universal = true;
                } else {
                    let prefix = format!("spiffe://{td}/ns/{ns}/sa/");
                    compiled.sources.extend(with_prefix(known, &prefix));
                }
            }
            _ => {
                return Err(policy_error(
                    p,
                    format!("spec.rules[{index}].from[{j}]"),
                    "exactly one of `identity` and `namespace` is required".into(),
                ));
            }
        }
    }
    compiled.sources.sort_unstable();
    compiled.sources.dedup();
    if !rule.ports.is_empty() {
        let mut ports = [Vec::new(), Vec::new()];
        for entry in &rule.ports {
            ports[proto_index(entry.protocol)].push(entry.port);
        }
        for list in &mut ports {
            list.sort_unstable();
            list.dedup();
        }
        compiled.ports = Some(ports);
    }
    Ok(compiled)
}

fn describe_rule(p: &MeshPolicy, index: usize, rule: &Rule) -> String {
    let from = if rule.from.is_empty() {
        "any source".to_owned()
    } else {
        rule.from
            .iter()
            .map(|f| match (&f.identity, &f.namespace) {
                (Some(id), _) => id.clone(),
                (None, Some(ns)) => format!("namespace {ns}"),
                (None, None) => "nothing".into(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ports = if rule.ports.is_empty() {
        "any port".to_owned()
    } else {
        rule.ports
            .iter()
            .map(|e| format!("{}/{}", e.protocol.name(), e.port))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{} {} rule {index}: from {from} to {ports}",
        p.spec.action.name(),
        p.key()
    )
}

fn reserved_rules(settings: &MeshSettings) -> [RuleInfo; 7] {
    let info = |id, action: Action, description: String| RuleInfo {
        id,
        policy: None,
        file: None,
        rule: None,
        action: action.name().into(),
        description,
    };
    let flag = |a: DefaultAction| match a {
        DefaultAction::Allow => "allow",
        DefaultAction::Deny => "deny",
    };
    [
        info(
            RULE_MESH_DEFAULT,
            settings.default_action.action(),
            format!(
                "mesh-wide default (--default-policy {}): no ALLOW policy selects the destination",
                flag(settings.default_action)
            ),
        ),
        info(
            RULE_NON_MESH,
            settings.non_mesh_action.action(),
            format!(
                "non-mesh sources (--non-mesh {}): the source is not a mesh workload and no ALLOW policy selects the destination",
                flag(settings.non_mesh_action)
            ),
        ),
        info(
            RULE_NOT_ALLOWED,
            Action::Deny,
            "not allowed: ALLOW policies select the destination and none of their rules matched"
                .into(),
        ),
        info(
            RULE_NO_POLICY,
            Action::Deny,
            "no policy entry for the destination's subject (maps inconsistent): fail closed".into(),
        ),
        info(
            RULE_STRICT_MTLS,
            Action::Deny,
            "mTLS STRICT: the destination accepts only mutual TLS from the mesh, and this was plaintext"
                .into(),
        ),
        info(
            RULE_REFUSED_IDENTITY,
            Action::Deny,
            "refused identity: another identity has the destination's number; nothing reaches it \
             until one of the service accounts is renamed"
                .into(),
        ),
        info(
            RULE_REFUSED_POLICY,
            Action::Deny,
            "refused policy: a policy selecting the destination does not fit the policy budget; \
             nothing reaches what it selects until it fits"
                .into(),
        ),
    ]
}

/// Standalone mode: the documents must say where each local workload's
/// network namespace is (in Kubernetes mode the agent finds it; a local
/// workload without one is then identified by address only).
pub fn require_local_netns(docs: &Documents, node: &str) -> Result<(), ConfigError> {
    match docs
        .workloads
        .iter()
        .find(|w| w.spec.node == node && w.spec.netns.is_none())
    {
        Some(w) => Err(workload_error(
            w,
            "spec.netns",
            format!("required for a workload on this node ({node}): the pod's network namespace"),
        )),
        None => Ok(()),
    }
}

/// Compiles validated documents into map entries, refusing what needs the
/// settings to be checked (identity patterns of another trust domain, a
/// network namespace two identities claim). What one document can do to
/// the whole cluster is refused on its own, in [`Compiled::refused`]: an
/// identity whose number another identity has too, a policy that does not
/// fit [`MeshSettings::policy_budget`].
pub fn compile(docs: &Documents, settings: &MeshSettings) -> Result<Compiled, ConfigError> {
    let identities = Identities::of(docs, settings);
    let mut admitted: Vec<&MeshPolicy> = docs.policies.iter().collect();
    let mut out = compile_policy(docs, settings, &identities, &admitted, &[])?;
    let mut refused = identities.refusals(docs);
    if let Some(budget) = settings.policy_budget
        && out.policy.len() > budget
    {
        let over = admit_within(docs, settings, &identities, &mut admitted, budget)?;
        out = compile_policy(docs, settings, &identities, &admitted, &over)?;
        refused.extend(over.iter().map(|p| {
            policy_error(
                p,
                "spec".into(),
                format!(
                    "refused: with the policies changed before it, the cluster's policy needs \
                     more than this node's budget of {budget} map entries (half of \
                     --max-policy, so that any change fits beside the entries it replaces); \
                     until it fits, the workloads it selects accept no connection"
                ),
            )
        }));
    }
    out.refused = refused;
    (out.service_slots, out.services) = compile_services_only(docs, settings)?;
    Ok(out)
}

/// The identity of each workload, and the numbers that more than one
/// identity hashes to. A tenant who names service accounts can search for
/// two names of their own with the same 64-bit number (about 2^32 hashes),
/// but not for one with the number of an identity they do not name (2^64):
/// so every identity of a shared number is refused, alone, and the rest of
/// the cluster compiles as if it were not there.
struct Identities {
    /// `(SPIFFE ID, number)`, indexed like `docs.workloads`.
    of_workload: Vec<(String, u64)>,
    /// Shared number → the identities that have it, sorted.
    shared: BTreeMap<u64, Vec<String>>,
}

impl Identities {
    fn of(docs: &Documents, settings: &MeshSettings) -> Self {
        let td = settings.trust_domain.as_str();
        let of_workload: Vec<(String, u64)> = docs
            .workloads
            .iter()
            .map(|w| {
                let spiffe = spiffe_id(td, &w.metadata.namespace, &w.spec.service_account);
                let number = numeric_identity(&spiffe);
                (spiffe, number)
            })
            .collect();
        let mut by_number: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (spiffe, number) in &of_workload {
            let ids = by_number.entry(*number).or_default();
            if !ids.contains(spiffe) {
                ids.push(spiffe.clone());
            }
        }
        by_number.retain(|_, ids| ids.len() > 1);
        for ids in by_number.values_mut() {
            ids.sort();
        }
        Self {
            of_workload,
            shared: by_number,
        }
    }

    fn refused(&self, number: u64) -> bool {
        self.shared.contains_key(&number)
    }

    /// One error per refused identity, at its first workload.
    fn refusals(&self, docs: &Documents) -> Vec<ConfigError> {
        let mut told = std::collections::HashSet::new();
        let mut errors = Vec::new();
        for (w, (spiffe, number)) in docs.workloads.iter().zip(&self.of_workload) {
            let Some(ids) = self.shared.get(number) else {
                continue;
            };
            if !told.insert(spiffe) {
                continue;
            }
            let others: Vec<&str> = ids
                .iter()
                .filter(|id| *id != spiffe)
                .map(String::as_str)
                .collect();
            errors.push(workload_error(
                w,
                "spec.serviceAccount",
                format!(
                    "refused: {spiffe} has the same identity number ({number}) as {}; its \
                     workloads accept no connection, and as sources match only rules for every \
                     identity, until one of the service accounts is renamed",
                    others.join(", ")
                ),
            ));
        }
        errors
    }
}

/// Takes out of `admitted` (all of which together are over `budget`), and
/// returns, the policies that do not fit `budget` entries with those
/// changed before them: policies are admitted
/// in the order they last changed (the API server's record; file and
/// document order for files), so the change that overflows the map is the
/// one refused, on every node alike. Each is found by bisecting the
/// admission order (the entries of a set of policies grow with the set).
/// A refused policy still has a say, the safe one: the workloads it
/// selects accept nothing (a few entries), so that refusing a DENY policy
/// never opens what it denies.
fn admit_within<'d>(
    docs: &Documents,
    settings: &MeshSettings,
    identities: &Identities,
    admitted: &mut Vec<&'d MeshPolicy>,
    budget: usize,
) -> Result<Vec<&'d MeshPolicy>, ConfigError> {
    admitted.sort_by(|a, b| admission_order(a).cmp(&admission_order(b)));
    let mut refused = Vec::new();
    let fits = |admitted: &[&MeshPolicy], refused: &[&MeshPolicy]| -> Result<bool, ConfigError> {
        let compiled = compile_policy(docs, settings, identities, admitted, refused)?;
        Ok(compiled.policy.len() <= budget)
    };
    // The caller found all of `admitted` over the budget: no need to
    // compile it again before the first refusal.
    loop {
        if !fits(&[], &refused)? {
            return Err(ConfigError::file(
                "Workloads",
                format!(
                    "without any policy they need more than {budget} policy entries, this \
                     node's budget (half of --max-policy)"
                ),
            ));
        }
        // The shortest prefix that does not fit ends with the policy to
        // refuse.
        let (mut fitting, mut overflowing) = (0, admitted.len());
        while overflowing - fitting > 1 {
            let mid = (fitting + overflowing) / 2;
            if fits(&admitted[..mid], &refused)? {
                fitting = mid;
            } else {
                overflowing = mid;
            }
        }
        refused.push(admitted.remove(overflowing - 1));
        if fits(admitted, &refused)? {
            return Ok(refused);
        }
    }
}

/// When a policy last changed, then where it is: the order policies are
/// admitted in under the policy budget.
fn admission_order(p: &MeshPolicy) -> (Option<i64>, &str, usize, &str, &str) {
    (
        p.origin.changed,
        p.origin.file.as_str(),
        p.origin.document,
        p.metadata.namespace.as_str(),
        p.metadata.name.as_str(),
    )
}

/// The number of the subject whose workloads share a refused identity
/// number: everything to it is denied.
fn refused_subject(number: u64) -> u64 {
    hash64(format!("mesh-subject-refused\n{number}").as_bytes())
}

/// `subject`, or the first number above it no other subject has: two
/// subjects whose hashes collide (names a tenant can search for) both
/// compile, the second one number up, in the workloads' order.
fn free_subject(mut subject: u64, taken: &BTreeMap<u64, SubjectInfo>) -> u64 {
    while taken.contains_key(&subject) {
        subject = subject.wrapping_add(1);
    }
    subject
}

/// [`compile`] of `policies` (some of `docs.policies`), without Services;
/// the `refused` ones only deny everything to the workloads they select.
fn compile_policy(
    docs: &Documents,
    settings: &MeshSettings,
    identities: &Identities,
    policies: &[&MeshPolicy],
    refused: &[&MeshPolicy],
) -> Result<Compiled, ConfigError> {
    let root = settings.root_namespace.as_str();

    // Identities.
    struct Known<'a> {
        doc: &'a Workload,
        spiffe: &'a str,
        identity: u64,
        local: bool,
    }
    let mut workloads: Vec<Known> = Vec::with_capacity(docs.workloads.len());
    let mut known: BTreeMap<String, u64> = BTreeMap::new();
    for (w, (spiffe, identity)) in docs.workloads.iter().zip(&identities.of_workload) {
        if !identities.refused(*identity) {
            known.insert(spiffe.clone(), *identity);
        }
        workloads.push(Known {
            doc: w,
            spiffe,
            identity: *identity,
            local: w.spec.node == settings.node,
        });
    }

    // Policies, in consideration order, rules expanded.
    let rule_ids = assign_rule_ids(&docs.policies);
    // Refused policies take their place in that order too.
    let mut sorted: Vec<(&MeshPolicy, bool)> = policies
        .iter()
        .map(|p| (*p, false))
        .chain(refused.iter().map(|p| (*p, true)))
        .collect();
    sorted.sort_by_cached_key(|(p, _)| p.key());
    let mut policies = Vec::with_capacity(sorted.len());
    let mut rules = BTreeMap::new();
    for info in reserved_rules(settings) {
        rules.insert(info.id, info);
    }
    for (p, is_refused) in sorted {
        let key = p.key();
        if is_refused {
            policies.push(CompiledPolicy {
                doc: p,
                key,
                action: PolicyAction::Deny,
                rules: vec![CompiledRule {
                    id: RULE_REFUSED_POLICY,
                    any_source: true,
                    universal: false,
                    sources: Vec::new(),
                    ports: None,
                }],
            });
            continue;
        }
        let mut compiled_rules = Vec::with_capacity(p.spec.rules.len());
        for (i, rule) in p.spec.rules.iter().enumerate() {
            let id = rule_ids[&(key.clone(), i)];
            compiled_rules.push(compile_rule(p, i, rule, id, &known, settings)?);
            rules.insert(
                id,
                RuleInfo {
                    id,
                    policy: Some(key.clone()),
                    file: Some(p.origin.file.clone()),
                    rule: Some(i),
                    action: p.spec.action.name().into(),
                    description: describe_rule(p, i, rule),
                },
            );
        }
        policies.push(CompiledPolicy {
            doc: p,
            key,
            action: p.spec.action,
            rules: compiled_rules,
        });
    }
    let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, p) in policies.iter().enumerate() {
        by_namespace
            .entry(p.doc.metadata.namespace.as_str())
            .or_default()
            .push(i);
    }

    // Subjects, their entries, and the endpoints.
    let mut out = Compiled {
        rules,
        identities: BTreeMap::from([(WORLD_IDENTITY, "world".to_owned())]),
        ..Compiled::default()
    };
    let mut subject_of: HashMap<(u64, Vec<usize>), u64> = HashMap::new();
    let none = Vec::new();
    for k in &workloads {
        let w = k.doc;
        let ns = w.metadata.namespace.as_str();
        let mut selecting: Vec<usize> = by_namespace
            .get(ns)
            .unwrap_or(&none)
            .iter()
            .chain(if ns == root {
                &none
            } else {
                by_namespace.get(root).unwrap_or(&none)
            })
            .copied()
            .filter(|&i| {
                selects(
                    policies[i].doc,
                    root,
                    ns,
                    &w.spec.service_account,
                    &w.metadata.labels,
                )
            })
            .collect();
        selecting.sort_unstable();
        let subject_key = (k.identity, selecting);
        let subject = match subject_of.get(&subject_key) {
            Some(&subject) => subject,
            None if identities.refused(k.identity) => {
                let subject = free_subject(refused_subject(k.identity), &out.subjects);
                for proto in Protocol::ALL {
                    out.policy.insert(
                        PolicyKey::new(subject, ANY_IDENTITY, ANY_PORT, proto.number()),
                        Verdict::new(Action::Deny, RULE_REFUSED_IDENTITY),
                    );
                }
                out.subjects.insert(
                    subject,
                    SubjectInfo {
                        id: subject,
                        identity: k.identity,
                        policies: Vec::new(),
                    },
                );
                subject_of.insert(subject_key, subject);
                subject
            }
            None => {
                let names: Vec<String> = subject_key
                    .1
                    .iter()
                    .map(|&i| policies[i].key.clone())
                    .collect();
                let mut text = format!("mesh-subject\n{}", k.identity);
                for name in &names {
                    text.push('\n');
                    text.push_str(name);
                }
                let subject = free_subject(hash64(text.as_bytes()), &out.subjects);
                let selected: Vec<&CompiledPolicy> =
                    subject_key.1.iter().map(|&i| &policies[i]).collect();
                emit_subject(subject, &selected, settings, &mut out.policy);
                out.subjects.insert(
                    subject,
                    SubjectInfo {
                        id: subject,
                        identity: k.identity,
                        policies: names,
                    },
                );
                subject_of.insert(subject_key, subject);
                subject
            }
        };
        let mode = mtls_mode(
            &docs.peer_authentications,
            root,
            ns,
            &w.spec.service_account,
            &w.metadata.labels,
        );
        let mut flags = if k.local { ENDPOINT_LOCAL } else { 0 };
        if mode == MtlsMode::Strict {
            flags |= ENDPOINT_STRICT;
        }
        if k.local && w.short_circuit() {
            flags |= ENDPOINT_SHORT_CIRCUIT;
        }
        for ip in &w.spec.ips {
            out.endpoints.insert(
                IpKey::from(*ip),
                Endpoint {
                    identity: k.identity,
                    subject,
                    flags,
                    _pad: 0,
                },
            );
        }
        if k.local
            && let Some(netns) = &w.spec.netns
            && let Some(other) = out.local_netns.insert(netns.clone(), k.identity)
            && other != k.identity
        {
            return Err(workload_error(
                w,
                "spec.netns",
                format!(
                    "{} is already the network namespace of a workload with another identity",
                    netns.display()
                ),
            ));
        }
        let name = match identities.shared.get(&k.identity) {
            Some(ids) => format!("refused: {}", ids.join(" = ")),
            None => k.spiffe.to_owned(),
        };
        out.identities.insert(k.identity, name);
        out.workloads.push(WorkloadInfo {
            namespace: ns.to_owned(),
            name: w.metadata.name.clone(),
            spiffe_id: k.spiffe.to_owned(),
            identity: k.identity,
            subject,
            ips: w
                .spec
                .ips
                .iter()
                .map(|ip| IpAddr::from(IpKey::from(*ip)))
                .collect(),
            node: w.spec.node.clone(),
            local: k.local,
            mtls: mode,
            netns: if k.local { w.spec.netns.clone() } else { None },
        });
    }
    out.workloads
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out.nodes = docs
        .nodes
        .iter()
        .map(|n| (n.metadata.name.clone(), n.spec.addresses.clone()))
        .collect();
    (out.service_slots, out.services) = compile_services_only(docs, settings)?;
    Ok(out)
}

/// The Service part of [`compile`] alone: the same slots and names, from
/// the Services, traffic splits, EndpointSlices and Workloads of `docs`.
pub fn compile_services_only(
    docs: &Documents,
    settings: &MeshSettings,
) -> Result<(ServiceSlots, Vec<ServiceInfo>), ConfigError> {
    let td = settings.trust_domain.as_str();
    let owners = owners_of(&docs.workloads, |w| {
        numeric_identity(&spiffe_id(
            td,
            &w.metadata.namespace,
            &w.spec.service_account,
        ))
    });
    compile_services(
        &docs.services,
        &docs.traffic_splits,
        docs.endpoint_slices.as_deref(),
        &docs.workloads,
        &owners,
        &settings.node,
    )
}

/// The Services of a cluster (`docs` holds its Services, traffic splits
/// and EndpointSlices) against `workloads` as last compiled: for a change
/// that touched Services or EndpointSlices only, neither the pods need
/// translating again nor the policy compiling. The same slots and names as
/// [`compile_services_only`] with the same workloads.
pub fn compile_cluster_services(
    docs: &Documents,
    workloads: &[WorkloadInfo],
    settings: &MeshSettings,
) -> Result<(ServiceSlots, Vec<ServiceInfo>), ConfigError> {
    let slices = docs.endpoint_slices.as_deref().unwrap_or_default();
    compile_services(
        &docs.services,
        &docs.traffic_splits,
        Some(slices),
        &[],
        &owners_compiled(workloads),
        &settings.node,
    )
}

/// Whether a rule without ports, or with ports for the protocol at hand,
/// matches a port: `ports[i]` for an explicit port, `None` for any other.
enum PortMatch {
    All,
    Only(Vec<bool>),
}

/// Emits the entries of one subject: for each protocol, the verdict of
/// every (source, port) the selecting policies name, plus the "any" ones,
/// keeping an entry only where [`mesh_common::policy::decide`] would
/// otherwise find a different one.
fn emit_subject(
    subject: u64,
    policies: &[&CompiledPolicy],
    settings: &MeshSettings,
    out: &mut BTreeMap<PolicyKey, Verdict>,
) {
    // Rules in consideration order: DENY, ALLOW, AUDIT; each by policy
    // name, then rule index.
    let mut rules: Vec<&CompiledRule> = Vec::new();
    let mut bounds = [0usize; 3];
    for (b, action) in [PolicyAction::Deny, PolicyAction::Allow, PolicyAction::Audit]
        .into_iter()
        .enumerate()
    {
        for p in policies.iter().filter(|p| p.action == action) {
            rules.extend(&p.rules);
        }
        bounds[b] = rules.len();
    }
    let [deny_end, allow_end, _] = bounds;
    let has_allow = policies.iter().any(|p| p.action == PolicyAction::Allow);

    let mut sources: Vec<u64> = rules
        .iter()
        .flat_map(|r| r.sources.iter().copied())
        .collect();
    sources.sort_unstable();
    sources.dedup();
    let any_match: Vec<bool> = rules.iter().map(|r| r.any_source || r.universal).collect();

    for proto in Protocol::ALL {
        let pi = proto_index(proto);
        let mut ports: Vec<u16> = rules
            .iter()
            .filter_map(|r| r.ports.as_ref())
            .flat_map(|p| p[pi].iter().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let port_match: Vec<PortMatch> = rules
            .iter()
            .map(|r| match &r.ports {
                None => PortMatch::All,
                Some(p) => PortMatch::Only(
                    ports
                        .iter()
                        .map(|port| p[pi].binary_search(port).is_ok())
                        .collect(),
                ),
            })
            .collect();

        // The verdict for a source (which rules its identity matches) and
        // a port (an index into `ports`, or `None` for any other port).
        let verdict = |source_match: &[bool], world: bool, port: Option<usize>| -> Verdict {
            let hit = |r: &usize| {
                source_match[*r]
                    && match (&port_match[*r], port) {
                        (PortMatch::All, _) => true,
                        (PortMatch::Only(m), Some(i)) => m[i],
                        (PortMatch::Only(_), None) => false,
                    }
            };
            if let Some(r) = (0..deny_end).find(hit) {
                return Verdict::new(Action::Deny, rules[r].id);
            }
            let base = if has_allow {
                match (deny_end..allow_end).find(hit) {
                    Some(r) => Verdict::new(Action::Allow, rules[r].id),
                    None => Verdict::new(Action::Deny, RULE_NOT_ALLOWED),
                }
            } else if world {
                Verdict::new(settings.non_mesh_action.action(), RULE_NON_MESH)
            } else {
                Verdict::new(settings.default_action.action(), RULE_MESH_DEFAULT)
            };
            if base.action().passes()
                && let Some(r) = (allow_end..rules.len()).find(hit)
            {
                return Verdict::new(Action::Audit, rules[r].id);
            }
            base
        };
        let number = proto.number();
        let key = |src: u64, port: u16| PolicyKey::new(subject, src, port, number);

        let any_any = verdict(&any_match, false, None);
        out.insert(key(ANY_IDENTITY, ANY_PORT), any_any);
        let any_port: Vec<Verdict> = (0..ports.len())
            .map(|i| verdict(&any_match, false, Some(i)))
            .collect();
        for (port, v) in ports.iter().zip(&any_port) {
            if *v != any_any {
                out.insert(key(ANY_IDENTITY, *port), *v);
            }
        }
        let mut source_match = vec![false; rules.len()];
        for src in iter::once(WORLD_IDENTITY).chain(sources.iter().copied()) {
            let world = src == WORLD_IDENTITY;
            for (m, r) in source_match.iter_mut().zip(&rules) {
                *m = r.any_source
                    || (!world && (r.universal || r.sources.binary_search(&src).is_ok()));
            }
            if !world && source_match == any_match {
                continue; // answers as "any source" does
            }
            let src_any = verdict(&source_match, world, None);
            let has_src_any = src_any != any_any;
            if has_src_any {
                out.insert(key(src, ANY_PORT), src_any);
            }
            for (i, port) in ports.iter().enumerate() {
                let v = verdict(&source_match, world, Some(i));
                // What decide() finds without a (src, port) entry: (src,
                // any) if there is one, else (any, port) or (any, any),
                // which are both `any_port[i]`.
                let fallback = if has_src_any { src_any } else { any_port[i] };
                if v != fallback {
                    out.insert(key(src, *port), v);
                }
            }
        }
    }
}

/// The reference semantics (docs/policy.md, "Semantics"), evaluated on the
/// documents one connection at a time. Slow and simple on purpose: the
/// compiled entries must give the same answer through `decide`.
pub fn evaluate(
    docs: &Documents,
    settings: &MeshSettings,
    src: Source,
    dst: &WorkloadInfo,
    port: u16,
    proto: u8,
) -> Verdict {
    Evaluator::new(docs, settings).evaluate(src, dst, port, proto)
}

/// [`evaluate`] with the per-configuration work (rule ids, the source
/// identities) done once.
pub(crate) struct Evaluator<'a> {
    docs: &'a Documents,
    settings: &'a MeshSettings,
    rule_ids: HashMap<(String, usize), u32>,
    /// Numeric identity → (SPIFFE ID, namespace).
    sources: HashMap<u64, (String, String)>,
}

impl<'a> Evaluator<'a> {
    pub(crate) fn new(docs: &'a Documents, settings: &'a MeshSettings) -> Self {
        let sources = docs
            .workloads
            .iter()
            .map(|w| {
                let id = spiffe_id(
                    &settings.trust_domain,
                    &w.metadata.namespace,
                    &w.spec.service_account,
                );
                (numeric_identity(&id), (id, w.metadata.namespace.clone()))
            })
            .collect();
        Self {
            docs,
            settings,
            rule_ids: assign_rule_ids(&docs.policies),
            sources,
        }
    }

    pub(crate) fn evaluate(
        &self,
        src: Source,
        dst: &WorkloadInfo,
        port: u16,
        proto: u8,
    ) -> Verdict {
        let settings = self.settings;
        let target = self
            .docs
            .workloads
            .iter()
            .find(|w| w.metadata.namespace == dst.namespace && w.metadata.name == dst.name);
        let no_labels = BTreeMap::new();
        let labels = target.map_or(&no_labels, |w| &w.metadata.labels);
        let sa = match target {
            Some(w) => w.spec.service_account.as_str(),
            None => dst.spiffe_id.rsplit('/').next().unwrap_or_default(),
        };
        let world = src == Source::World;
        let source = match src {
            Source::Identity(n) => self.sources.get(&n),
            Source::World => None,
        };

        let mut selecting: Vec<&MeshPolicy> = self
            .docs
            .policies
            .iter()
            .filter(|p| selects(p, &settings.root_namespace, &dst.namespace, sa, labels))
            .collect();
        selecting.sort_by_key(|p| p.key());

        let from_matches = |f: &FromEntry| {
            if world {
                return false; // `from` entries only match mesh identities
            }
            match (&f.identity, &f.namespace) {
                (Some(pattern), None) => match IdentityPattern::parse(pattern) {
                    Ok(pattern) => match source {
                        Some((id, _)) => pattern.matches(id),
                        None => {
                            pattern.is_universal()
                                && pattern
                                    .trust_domain()
                                    .is_none_or(|td| td == settings.trust_domain)
                        }
                    },
                    Err(_) => false,
                },
                (None, Some(ns)) => ns == "*" || source.is_some_and(|(_, sns)| sns == ns),
                _ => false,
            }
        };
        let rule_matches = |rule: &Rule| {
            (rule.from.is_empty() || rule.from.iter().any(from_matches))
                && (rule.ports.is_empty()
                    || rule
                        .ports
                        .iter()
                        .any(|e| e.port == port && e.protocol.number() == proto))
        };
        let first_match = |action: PolicyAction| {
            selecting
                .iter()
                .filter(|p| p.spec.action == action)
                .find_map(|p| {
                    p.spec
                        .rules
                        .iter()
                        .position(rule_matches)
                        .map(|i| self.rule_ids[&(p.key(), i)])
                })
        };

        if let Some(rule) = first_match(PolicyAction::Deny) {
            return Verdict::new(Action::Deny, rule);
        }
        let base = if selecting
            .iter()
            .any(|p| p.spec.action == PolicyAction::Allow)
        {
            match first_match(PolicyAction::Allow) {
                Some(rule) => Verdict::new(Action::Allow, rule),
                None => Verdict::new(Action::Deny, RULE_NOT_ALLOWED),
            }
        } else if world {
            Verdict::new(settings.non_mesh_action.action(), RULE_NON_MESH)
        } else {
            Verdict::new(settings.default_action.action(), RULE_MESH_DEFAULT)
        };
        if base.action().passes()
            && let Some(rule) = first_match(PolicyAction::Audit)
        {
            return Verdict::new(Action::Audit, rule);
        }
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::diff;
    use crate::documents::{ObjectMeta, Origin, PortEntry, Selector, WorkloadSpec, parse_str};
    use mesh_common::policy::{PROTO_TCP, PROTO_UDP, decide};

    const TD: &str = "cluster.local";

    fn settings() -> MeshSettings {
        MeshSettings {
            node: "node-a".into(),
            ..MeshSettings::default()
        }
    }

    /// A remote workload (no netns needed).
    fn wl(ns: &str, name: &str, sa: &str, labels: &str, ip: &str) -> String {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{serviceAccount: {sa}, ips: ['{ip}'], node: node-b}}\n---\n"
        )
    }

    fn pol(ns: &str, name: &str, spec: &str) -> String {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
        )
    }

    #[test]
    fn identities_that_share_a_number_are_refused_alone_and_fail_closed() {
        let [a, b] = crate::COLLIDING_SERVICE_ACCOUNTS;
        let id = |sa: &str| spiffe_id(TD, "tenant", sa);
        assert_eq!(numeric_identity(&id(a)), numeric_identity(&id(b)));
        let shared = numeric_identity(&id(a));
        let text = [
            base(),
            wl("tenant", "one", a, "", "198.18.1.1"),
            wl("tenant", "two", b, "", "198.18.1.2"),
            wl("tenant", "fine", "fine", "", "198.18.1.3"),
            pol(
                "shop",
                "from-tenant",
                "  selector: {serviceAccount: cart}\n  rules:\n  - from: [{namespace: tenant}]",
            ),
            pol("tenant", "open", "  rules:\n  - {}"),
        ]
        .concat();
        let docs = parse_str("t.yaml", &text).unwrap();
        let c = compile(&docs, &settings()).unwrap();

        // Refused alone, each identity named with the other.
        assert_eq!(c.refused.len(), 2, "{:?}", c.refused);
        for (e, (me, other)) in c.refused.iter().zip([(a, b), (b, a)]) {
            assert_eq!(e.field.as_deref(), Some("spec.serviceAccount"));
            assert!(
                e.message.contains(&id(me)) && e.message.contains(&id(other)),
                "{e}"
            );
        }
        // Nothing reaches their workloads, whatever policy says (tenant/open
        // allows everything to every tenant workload).
        let ep = |ip: &str| c.endpoints[&IpKey::from(ip.parse::<IpAddr>().unwrap())];
        for ip in ["198.18.1.1", "198.18.1.2"] {
            let e = ep(ip);
            assert_eq!(e.identity, shared);
            for (src, proto) in [(WORLD_IDENTITY, PROTO_TCP), (shared, PROTO_UDP)] {
                let v = decide(e.subject, src, 80, proto, |k| c.policy.get(k).copied());
                assert_eq!(v, Verdict::new(Action::Deny, RULE_REFUSED_IDENTITY));
            }
        }
        // The rest compiled: the tenant's other workload, and cart, which
        // allows namespace tenant but not the shared number.
        let fine = ep("198.18.1.3");
        let fine_id = numeric_identity(&id("fine"));
        assert_eq!(fine.identity, fine_id);
        let allowed = |dst: Endpoint, src| {
            decide(dst.subject, src, 8080, PROTO_TCP, |k| {
                c.policy.get(k).copied()
            })
            .action()
            .passes()
        };
        assert!(allowed(fine, WORLD_IDENTITY));
        let cart = ep("198.18.0.2");
        assert!(allowed(cart, fine_id));
        assert!(!allowed(cart, shared));
        assert!(
            c.identities[&shared].starts_with("refused: "),
            "{}",
            c.identities[&shared]
        );
        assert_eq!(c.rules[&RULE_REFUSED_IDENTITY].action, "DENY");
    }

    #[test]
    fn a_subject_number_taken_is_probed_upwards() {
        let mut taken = BTreeMap::new();
        let info = |id| SubjectInfo {
            id,
            identity: 42,
            policies: Vec::new(),
        };
        assert_eq!(free_subject(7, &taken), 7);
        taken.insert(7, info(7));
        taken.insert(8, info(8));
        assert_eq!(free_subject(7, &taken), 9);
        taken.insert(u64::MAX, info(u64::MAX));
        assert_eq!(free_subject(u64::MAX, &taken), 0);
    }

    /// `count` workloads of namespace `ns` (service accounts `<ns>-<i>`).
    fn crowd(ns: &str, count: usize, net: u8) -> String {
        (0..count)
            .map(|i| {
                wl(
                    ns,
                    &format!("w{i}"),
                    &format!("{ns}-{i}"),
                    "",
                    &format!("198.18.{net}.{i}"),
                )
            })
            .collect()
    }

    /// A policy of `ns` selecting `sa`, from namespace `from`, to `ports`
    /// ports from 1000.
    fn ports_policy(ns: &str, name: &str, sa: &str, from: &str, ports: u16) -> String {
        let ports: String = (1..=ports)
            .map(|p| format!("    - {{port: {}}}\n", 1000 + p))
            .collect();
        pol(
            ns,
            name,
            &format!(
                "  selector: {{serviceAccount: {sa}}}\n  rules:\n  - from: [{{namespace: {from}}}]\n    ports:\n{ports}"
            ),
        )
    }

    #[test]
    fn policies_over_the_budget_are_refused_most_recently_changed_first() {
        let text = [
            crowd("shop", 10, 2),
            crowd("tenant", 10, 3),
            ports_policy("shop", "legit", "shop-0", "shop", 20),
            ports_policy("tenant", "flood", "tenant-0", "tenant", 20),
            ports_policy("tenant", "small", "tenant-1", "tenant", 1),
        ]
        .concat();
        let mut docs = parse_str("t.yaml", &text).unwrap();
        let unbounded = compile(&docs, &settings()).unwrap();
        assert!(unbounded.refused.is_empty());
        let alone = |name: &str| {
            let mut d = docs.clone();
            d.policies.retain(|p| p.metadata.name == name);
            compile(&d, &settings()).unwrap().policy.len()
        };
        let (legit, flood, small) = (alone("legit"), alone("flood"), alone("small"));
        let none = {
            let mut d = docs.clone();
            d.policies.clear();
            compile(&d, &settings()).unwrap().policy.len()
        };
        // Room for either big policy with the small one, not for both.
        let budget = legit.max(flood) + small - none + 5;
        assert!(
            legit + flood - none > budget,
            "{legit} {flood} {small} {none}"
        );
        let bounded = MeshSettings {
            policy_budget: Some(budget),
            ..settings()
        };

        // The flood changed last: it alone is refused.
        for (p, changed) in docs.policies.iter_mut().zip([100, 300, 200]) {
            p.origin.changed = Some(changed);
        }
        let c = compile(&docs, &bounded).unwrap();
        assert_eq!(c.refused.len(), 1, "{:?}", c.refused);
        assert_eq!(c.refused[0].name.as_deref(), Some("tenant/flood"));
        assert_eq!(c.refused[0].kind.as_deref(), Some(KIND_MESH_POLICY));
        assert!(c.refused[0].message.contains("budget"), "{}", c.refused[0]);
        assert!(c.policy.len() <= budget);
        let policies: Vec<&str> = c
            .rules
            .values()
            .filter_map(|r| r.policy.as_deref())
            .collect();
        assert!(policies.contains(&"shop/legit") && policies.contains(&"tenant/small"));
        assert!(!policies.contains(&"tenant/flood"));
        // What the refused policy selects accepts nothing (refusing a DENY
        // policy must not open what it denies); the rest is as compiled.
        let ep = |ip: &str| c.endpoints[&IpKey::from(ip.parse::<IpAddr>().unwrap())];
        let verdict = |dst: Endpoint, src: &str, port| {
            let src = numeric_identity(&spiffe_id(TD, src.split('-').next().unwrap(), src));
            decide(dst.subject, src, port, PROTO_TCP, |k| {
                c.policy.get(k).copied()
            })
        };
        assert_eq!(
            verdict(ep("198.18.3.0"), "tenant-5", 1001),
            Verdict::new(Action::Deny, RULE_REFUSED_POLICY)
        );
        assert_eq!(
            verdict(ep("198.18.2.0"), "shop-5", 1001).action(),
            Action::Allow
        );
        assert_eq!(
            verdict(ep("198.18.3.1"), "tenant-5", 1001).action(),
            Action::Allow
        );

        // Had the legitimate policy changed last, it would be the one left
        // out (the change that overflows is refused, whoever made it)...
        for (p, changed) in docs.policies.iter_mut().zip([400, 300, 200]) {
            p.origin.changed = Some(changed);
        }
        let c = compile(&docs, &bounded).unwrap();
        let refused: Vec<_> = c.refused.iter().map(|e| e.name.clone().unwrap()).collect();
        assert_eq!(refused, ["shop/legit"]);

        // ...and files without change times are admitted in file order.
        for p in &mut docs.policies {
            p.origin.changed = None;
        }
        let c = compile(&docs, &bounded).unwrap();
        let refused: Vec<_> = c.refused.iter().map(|e| e.name.clone().unwrap()).collect();
        assert_eq!(refused, ["tenant/flood"]);

        // Workloads that alone overflow the budget are an error of the
        // whole cluster: no policy's refusal would help.
        let tiny = MeshSettings {
            policy_budget: Some(none - 1),
            ..settings()
        };
        let e = compile(&docs, &tiny).unwrap_err();
        assert!(
            e.to_string().starts_with("Workloads: without any policy"),
            "{e}"
        );
    }

    #[test]
    fn compiling_services_alone_gives_what_the_full_compile_gives() {
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {clusterIP: 10.96.0.9, selector: {app: cart}, ports: [{port: 80, targetPort: 8080}]}\n";
        let docs = parse_str("t.yaml", &format!("{}{service}", base())).unwrap();
        let full = compile(&docs, &settings()).unwrap();
        let (slots, infos) = compile_services_only(&docs, &settings()).unwrap();
        assert_eq!(slots, full.service_slots);
        assert_eq!(infos, full.services);
        assert_eq!(infos[0].backends.len(), 1, "{infos:?}");
    }

    #[test]
    fn cluster_services_against_the_compiled_workloads_give_what_the_full_compile_gives() {
        use crate::documents::service::{EndpointSliceDoc, SliceEndpoint, SlicePort};
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80, targetPort: 8080}]}\n";
        let mut docs = parse_str("t.yaml", &format!("{}{service}", base())).unwrap();
        let endpoint = |ip: &str, node: Option<&str>| SliceEndpoint {
            addresses: vec![ip.parse().unwrap()],
            ready: true,
            serving: true,
            terminating: false,
            node: node.map(str::to_owned),
        };
        docs.endpoint_slices = Some(vec![EndpointSliceDoc {
            namespace: "shop".into(),
            name: "cart-1".into(),
            service: "cart".into(),
            ipv6: false,
            ports: vec![SlicePort {
                name: None,
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            // Two pods (one whose slice names no node), and an address
            // that is no workload.
            endpoints: vec![
                endpoint("198.18.0.2", Some("node-b")),
                endpoint("198.18.0.3", None),
                endpoint("203.0.113.7", Some("node-c")),
            ],
        }]);
        let full = compile(&docs, &settings()).unwrap();
        let (slots, infos) = compile_cluster_services(&docs, &full.workloads, &settings()).unwrap();
        assert_eq!(slots, full.service_slots);
        assert_eq!(infos, full.services);
        let named: Vec<(&str, &str, bool)> = infos[0]
            .backends
            .iter()
            .map(|b| {
                (
                    b.workload.as_str(),
                    b.node.as_str(),
                    b.identity == WORLD_IDENTITY,
                )
            })
            .collect();
        assert_eq!(
            named,
            [
                ("shop/cart", "node-b", false),
                ("shop/cart-canary", "node-b", false),
                ("", "node-c", true)
            ]
        );
    }

    /// shop/frontend, shop/cart (app=cart), shop/cart-canary (app=canary,
    /// same service account), ops/admin, ops/viewer, inventory/db (tier=db).
    fn base() -> String {
        [
            wl(
                "shop",
                "frontend",
                "frontend",
                "app: frontend",
                "198.18.0.1",
            ),
            wl("shop", "cart", "cart", "app: cart", "198.18.0.2"),
            wl("shop", "cart-canary", "cart", "app: canary", "198.18.0.3"),
            wl("ops", "admin", "admin", "", "198.18.0.4"),
            wl("ops", "viewer", "viewer", "", "198.18.0.5"),
            wl("inventory", "db", "db", "tier: db", "fd00::6"),
            wl("shop", "db", "db", "tier: db", "198.18.0.7"),
        ]
        .concat()
    }

    struct Mesh {
        docs: Documents,
        settings: MeshSettings,
        compiled: Compiled,
    }

    impl Mesh {
        fn new(text: &str) -> Self {
            Self::with(text, settings())
        }

        fn with(text: &str, settings: MeshSettings) -> Self {
            let docs = parse_str("test.yaml", text).unwrap();
            let compiled = compile(&docs, &settings).unwrap();
            Self {
                docs,
                settings,
                compiled,
            }
        }

        fn workload(&self, key: &str) -> &WorkloadInfo {
            self.compiled
                .workloads
                .iter()
                .find(|w| format!("{}/{}", w.namespace, w.name) == key)
                .unwrap_or_else(|| panic!("no workload {key}"))
        }

        /// The kernel's answer, checked against the reference.
        fn check(&self, src: &str, dst: &str, port: u16, proto: u8) -> Verdict {
            let d = self.workload(dst);
            let (source, id) = if src == "world" {
                (Source::World, WORLD_IDENTITY)
            } else {
                let s = self.workload(src);
                (Source::Identity(s.identity), s.identity)
            };
            let got = decide(d.subject, id, port, proto, |k| {
                self.compiled.policy.get(k).copied()
            });
            let want = evaluate(&self.docs, &self.settings, source, d, port, proto);
            assert_eq!(got, want, "{src} -> {dst}:{port}/{proto}");
            got
        }

        fn tcp(&self, src: &str, dst: &str, port: u16) -> Verdict {
            self.check(src, dst, port, PROTO_TCP)
        }

        fn rule(&self, policy: &str, index: usize) -> u32 {
            self.compiled
                .rules
                .values()
                .find(|r| r.policy.as_deref() == Some(policy) && r.rule == Some(index))
                .unwrap_or_else(|| panic!("no rule {policy}#{index}"))
                .id
        }
    }

    fn allow(rule: u32) -> Verdict {
        Verdict::new(Action::Allow, rule)
    }
    fn deny(rule: u32) -> Verdict {
        Verdict::new(Action::Deny, rule)
    }
    fn audit(rule: u32) -> Verdict {
        Verdict::new(Action::Audit, rule)
    }

    #[test]
    fn deny_wins_over_allow() {
        let m = Mesh::new(&format!(
            "{}{}{}",
            base(),
            pol(
                "shop",
                "cart-allow",
                "  selector: {serviceAccount: cart}\n  rules: [{from: [{namespace: shop}]}]"
            ),
            pol(
                "shop",
                "cart-deny",
                "  selector: {serviceAccount: cart}\n  action: DENY\n  rules: [{from: [{identity: spiffe://cluster.local/ns/shop/sa/frontend}], ports: [{port: 8080}]}]"
            ),
        ));
        let deny_rule = m.rule("shop/cart-deny", 0);
        let allow_rule = m.rule("shop/cart-allow", 0);
        assert_eq!(m.tcp("shop/frontend", "shop/cart", 8080), deny(deny_rule));
        assert_eq!(m.tcp("shop/frontend", "shop/cart", 9090), allow(allow_rule));
        assert_eq!(
            m.check("shop/frontend", "shop/cart", 8080, PROTO_UDP),
            allow(allow_rule)
        );
        assert_eq!(m.tcp("shop/db", "shop/cart", 8080), allow(allow_rule));
        assert_eq!(
            m.tcp("ops/admin", "shop/cart", 8080),
            deny(RULE_NOT_ALLOWED)
        );
        assert_eq!(m.compiled.rules[&deny_rule].action, "DENY");
        assert_eq!(
            m.compiled.rules[&deny_rule].description,
            "DENY shop/cart-deny rule 0: from spiffe://cluster.local/ns/shop/sa/frontend to TCP/8080"
        );
    }

    #[test]
    fn allow_makes_default_deny() {
        let mut s = settings();
        s.default_action = DefaultAction::Allow;
        let m = Mesh::with(
            &format!(
                "{}{}{}",
                base(),
                pol(
                    "shop",
                    "cart",
                    "  selector: {serviceAccount: cart}\n  rules: [{from: [{identity: spiffe://cluster.local/ns/shop/sa/frontend}], ports: [{port: 8080}, {port: 53, protocol: UDP}]}]"
                ),
                pol("ops", "allow-nothing", "  action: ALLOW"),
            ),
            s,
        );
        let r = m.rule("shop/cart", 0);
        assert_eq!(m.tcp("shop/frontend", "shop/cart", 8080), allow(r));
        assert_eq!(m.tcp("shop/frontend", "shop/cart-canary", 8080), allow(r));
        assert_eq!(
            m.tcp("shop/frontend", "shop/cart", 53),
            deny(RULE_NOT_ALLOWED)
        );
        assert_eq!(
            m.check("shop/frontend", "shop/cart", 53, PROTO_UDP),
            allow(r)
        );
        assert_eq!(
            m.check("shop/frontend", "shop/cart", 8080, PROTO_UDP),
            deny(RULE_NOT_ALLOWED)
        );
        assert_eq!(
            m.tcp("ops/admin", "shop/cart", 8080),
            deny(RULE_NOT_ALLOWED)
        );
        assert_eq!(m.tcp("world", "shop/cart", 8080), deny(RULE_NOT_ALLOWED));
        // Not selected: the defaults.
        assert_eq!(
            m.tcp("ops/admin", "shop/frontend", 1),
            allow(RULE_MESH_DEFAULT)
        );
        assert_eq!(m.tcp("world", "shop/frontend", 1), allow(RULE_NON_MESH));
        // An ALLOW policy without rules allows nothing.
        for src in ["ops/viewer", "shop/frontend", "world"] {
            assert_eq!(m.tcp(src, "ops/admin", 80), deny(RULE_NOT_ALLOWED));
        }
    }

    #[test]
    fn audit_passes_and_reports() {
        let mut s = settings();
        s.default_action = DefaultAction::Allow;
        s.non_mesh_action = DefaultAction::Deny;
        let m = Mesh::with(
            &format!(
                "{}{}{}{}",
                base(),
                pol(
                    "shop",
                    "audit-ops",
                    "  action: AUDIT\n  rules: [{from: [{namespace: ops}]}, {ports: [{port: 22}]}]"
                ),
                pol("inventory", "db", "  rules: [{from: [{namespace: ops}]}]"),
                pol("inventory", "audit-db", "  action: AUDIT\n  rules: [{}]"),
            ),
            s,
        );
        let a0 = m.rule("shop/audit-ops", 0);
        let a1 = m.rule("shop/audit-ops", 1);
        assert_eq!(m.tcp("ops/admin", "shop/cart", 80), audit(a0));
        assert_eq!(
            m.tcp("shop/frontend", "shop/cart", 80),
            allow(RULE_MESH_DEFAULT)
        );
        assert_eq!(m.tcp("shop/frontend", "shop/cart", 22), audit(a1));
        // world is denied by --non-mesh: nothing to audit.
        assert_eq!(m.tcp("world", "shop/cart", 22), deny(RULE_NON_MESH));
        // ALLOW then AUDIT; a denied connection is not audited.
        let db = m.rule("inventory/audit-db", 0);
        assert_eq!(m.tcp("ops/viewer", "inventory/db", 5432), audit(db));
        assert_eq!(
            m.tcp("shop/cart", "inventory/db", 5432),
            deny(RULE_NOT_ALLOWED)
        );
    }

    #[test]
    fn defaults_and_non_mesh() {
        for (default, non_mesh) in [
            (DefaultAction::Allow, DefaultAction::Allow),
            (DefaultAction::Allow, DefaultAction::Deny),
            (DefaultAction::Deny, DefaultAction::Allow),
            (DefaultAction::Deny, DefaultAction::Deny),
        ] {
            let mut s = settings();
            s.default_action = default;
            s.non_mesh_action = non_mesh;
            let m = Mesh::with(&base(), s);
            assert_eq!(
                m.tcp("shop/frontend", "shop/cart", 80),
                Verdict::new(default.action(), RULE_MESH_DEFAULT)
            );
            assert_eq!(
                m.check("world", "shop/cart", 53, PROTO_UDP),
                Verdict::new(non_mesh.action(), RULE_NON_MESH)
            );
            assert_eq!(
                m.compiled.rules[&RULE_MESH_DEFAULT].action,
                default.action().name()
            );
            assert_eq!(
                m.compiled.rules[&RULE_NON_MESH].action,
                non_mesh.action().name()
            );
        }
    }

    #[test]
    fn world_is_matched_only_by_rules_without_from() {
        let m = Mesh::new(&format!(
            "{}{}{}",
            base(),
            pol(
                "shop",
                "cart",
                "  selector: {serviceAccount: cart}\n  rules: [{from: [{identity: '*'}], ports: [{port: 80}]}, {from: [{namespace: '*'}], ports: [{port: 81}]}, {from: [{identity: 'spiffe://cluster.local/*'}], ports: [{port: 82}]}, {ports: [{port: 443}]}]"
            ),
            pol(
                "shop",
                "frontend",
                "  selector: {matchLabels: {app: frontend}}\n  action: DENY\n  rules: [{from: []}]"
            ),
        ));
        for port in [80, 81, 82] {
            assert_eq!(m.tcp("world", "shop/cart", port), deny(RULE_NOT_ALLOWED));
            assert_eq!(
                m.tcp("ops/admin", "shop/cart", port).action(),
                Action::Allow
            );
        }
        assert_eq!(
            m.tcp("world", "shop/cart", 443),
            allow(m.rule("shop/cart", 3))
        );
        assert_eq!(
            m.tcp("world", "shop/frontend", 1),
            deny(m.rule("shop/frontend", 0))
        );
        assert_eq!(
            m.tcp("shop/cart", "shop/frontend", 1),
            deny(m.rule("shop/frontend", 0))
        );
    }

    #[test]
    fn namespace_and_prefix_patterns() {
        let m = Mesh::new(&format!(
            "{}{}",
            base(),
            pol(
                "shop",
                "cart",
                "  selector: {serviceAccount: cart}\n  rules:\n    - from: [{namespace: inventory}]\n    - from: [{identity: 'spiffe://cluster.local/ns/ops/sa/adm*'}]\n      ports: [{port: 9000}]\n    - from: [{identity: 'spiffe://cluster.local/ns/sh*'}]\n      ports: [{port: 9001}]"
            ),
        ));
        assert_eq!(
            m.tcp("inventory/db", "shop/cart", 1),
            allow(m.rule("shop/cart", 0))
        );
        assert_eq!(
            m.tcp("ops/admin", "shop/cart", 9000),
            allow(m.rule("shop/cart", 1))
        );
        assert_eq!(
            m.tcp("ops/admin", "shop/cart", 9001),
            deny(RULE_NOT_ALLOWED)
        );
        assert_eq!(
            m.tcp("ops/viewer", "shop/cart", 9000),
            deny(RULE_NOT_ALLOWED)
        );
        assert_eq!(
            m.tcp("shop/db", "shop/cart", 9001),
            allow(m.rule("shop/cart", 2))
        );
        assert_eq!(m.tcp("shop/db", "shop/cart", 9000), deny(RULE_NOT_ALLOWED));
    }

    #[test]
    fn root_namespace_policy_selects_every_namespace() {
        let mut s = settings();
        s.default_action = DefaultAction::Deny;
        let m = Mesh::with(
            &format!(
                "{}{}{}",
                base(),
                pol(
                    "mesh-system",
                    "db-from-shop",
                    "  selector: {matchLabels: {tier: db}}\n  rules: [{from: [{namespace: shop}], ports: [{port: 5432}]}]"
                ),
                pol(
                    "inventory",
                    "not-here",
                    "  action: DENY\n  rules: [{from: [{namespace: ops}]}]"
                ),
            ),
            s,
        );
        let r = m.rule("mesh-system/db-from-shop", 0);
        assert_eq!(m.tcp("shop/frontend", "inventory/db", 5432), allow(r));
        assert_eq!(m.tcp("shop/frontend", "shop/db", 5432), allow(r));
        assert_eq!(m.tcp("ops/admin", "shop/db", 5432), deny(RULE_NOT_ALLOWED));
        assert_eq!(
            m.tcp("ops/admin", "inventory/db", 5432),
            deny(m.rule("inventory/not-here", 0))
        );
        // A policy of another namespace selects nothing in shop.
        assert_eq!(
            m.tcp("ops/admin", "shop/cart", 5432),
            deny(RULE_MESH_DEFAULT)
        );
        let subject = m.workload("inventory/db").subject;
        assert_eq!(
            m.compiled.subjects[&subject].policies,
            vec![
                "inventory/not-here".to_owned(),
                "mesh-system/db-from-shop".to_owned()
            ]
        );
    }

    #[test]
    fn labels_select_and_subjects_group() {
        let m = Mesh::new(&format!(
            "{}{}",
            base(),
            pol(
                "shop",
                "canary-only",
                "  selector: {serviceAccount: cart, matchLabels: {app: canary}}\n  action: DENY\n  rules: [{}]"
            ),
        ));
        let r = m.rule("shop/canary-only", 0);
        assert_eq!(m.tcp("shop/frontend", "shop/cart-canary", 80), deny(r));
        assert_eq!(
            m.tcp("shop/frontend", "shop/cart", 80),
            allow(RULE_MESH_DEFAULT)
        );
        let (cart, canary) = (m.workload("shop/cart"), m.workload("shop/cart-canary"));
        assert_eq!(cart.identity, canary.identity);
        assert_ne!(cart.subject, canary.subject);
        // Same identity, same policies: one subject.
        let (db1, db2) = (m.workload("inventory/db"), m.workload("shop/db"));
        assert_ne!(db1.identity, db2.identity);
        let m2 = Mesh::new(&format!(
            "{}{}",
            base(),
            wl("shop", "cart-2", "cart", "app: cart", "198.18.0.9")
        ));
        assert_eq!(
            m2.workload("shop/cart").subject,
            m2.workload("shop/cart-2").subject
        );
        // Every subject has its (any, any) entries.
        for subject in m.compiled.subjects.keys() {
            for proto in [PROTO_TCP, PROTO_UDP] {
                let key = PolicyKey::new(*subject, ANY_IDENTITY, ANY_PORT, proto);
                assert!(m.compiled.policy.contains_key(&key));
            }
        }
    }

    #[test]
    fn compiled_tables() {
        let text = format!(
            "{}apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: local, namespace: shop}}\nspec: {{serviceAccount: cart, ips: ['198.18.0.20', 'fd00::20'], node: node-a, netns: /run/netns/local}}\n",
            base()
        );
        let m = Mesh::new(&text);
        let local = m.workload("shop/local");
        assert!(local.local);
        assert_eq!(local.spiffe_id, "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(local.identity, numeric_identity(&local.spiffe_id));
        assert_eq!(
            m.compiled.local_netns,
            BTreeMap::from([(PathBuf::from("/run/netns/local"), local.identity)])
        );
        let ep = m.compiled.endpoints[&IpKey::from("fd00::20".parse::<IpAddr>().unwrap())];
        assert_eq!(
            (ep.identity, ep.subject, ep.flags),
            (local.identity, local.subject, ENDPOINT_LOCAL)
        );
        let remote = m.compiled.endpoints[&IpKey::from("198.18.0.1".parse::<IpAddr>().unwrap())];
        assert_eq!(remote.flags, 0);
        assert_eq!(m.compiled.endpoints.len(), 9);
        assert_eq!(m.compiled.identities[&WORLD_IDENTITY], "world");
        assert_eq!(m.compiled.identities.len(), 1 + 6);
        for id in [
            RULE_MESH_DEFAULT,
            RULE_NON_MESH,
            RULE_NOT_ALLOWED,
            RULE_NO_POLICY,
        ] {
            assert!(m.compiled.rules[&id].policy.is_none());
        }
        let names: Vec<_> = m
            .compiled
            .workloads
            .iter()
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn settings_dependent_refusals() {
        let text = format!(
            "{}{}",
            wl("shop", "a", "a", "", "198.18.0.1"),
            pol(
                "shop",
                "p",
                "  rules: [{from: [{namespace: shop}, {identity: 'spiffe://other.org/ns/shop/sa/a'}]}]"
            )
        );
        let docs = parse_str("t.yaml", &text).unwrap();
        let e = compile(&docs, &settings()).unwrap_err().to_string();
        assert_eq!(
            e,
            "t.yaml: document 2 (MeshPolicy shop/p): spec.rules[0].from[1].identity: \"spiffe://other.org/ns/shop/sa/a\" is not in the mesh's trust domain \"cluster.local\""
        );
        let mut other = settings();
        other.trust_domain = "other.org".into();
        compile(&docs, &other).unwrap();

        let text = "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: shop}\nspec: {serviceAccount: a, ips: [198.18.0.1], node: node-a}\n";
        let docs = parse_str("w.yaml", text).unwrap();
        let e = require_local_netns(&docs, &settings().node)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("w.yaml: document 1 (Workload shop/w): spec.netns: required for a workload on this node (node-a)"),
            "{e}"
        );
        let mut elsewhere = settings();
        elsewhere.node = "node-b".into();
        assert!(compile(&docs, &elsewhere).unwrap().local_netns.is_empty());
    }

    #[test]
    fn recompiling_changes_only_what_changed() {
        let before = Mesh::new(&format!(
            "{}{}",
            base(),
            pol(
                "shop",
                "cart",
                "  selector: {serviceAccount: cart}\n  rules: [{from: [{namespace: ops}], ports: [{port: 80}]}]"
            )
        ));
        let again = Mesh::new(&format!(
            "{}{}",
            base(),
            pol(
                "shop",
                "cart",
                "  selector: {serviceAccount: cart}\n  rules: [{from: [{namespace: ops}], ports: [{port: 80}]}]"
            )
        ));
        assert_eq!(before.compiled, again.compiled);
        // One more rule: the existing rule keeps its id and subjects keep
        // theirs; only entries for port 81 appear.
        let after = Mesh::new(&format!(
            "{}{}",
            base(),
            pol(
                "shop",
                "cart",
                "  selector: {serviceAccount: cart}\n  rules: [{from: [{namespace: ops}], ports: [{port: 80}]}, {from: [{namespace: ops}], ports: [{port: 81}]}]"
            )
        ));
        assert_eq!(before.rule("shop/cart", 0), after.rule("shop/cart", 0));
        assert_eq!(before.compiled.subjects, after.compiled.subjects);
        let d = diff(&before.compiled.policy, &after.compiled.policy);
        assert!(d.deletes.is_empty());
        assert!(!d.upserts.is_empty());
        assert!(
            d.upserts.iter().all(|(k, _)| k.port == 81),
            "{:?}",
            d.upserts
        );
        assert!(diff(&before.compiled.endpoints, &after.compiled.endpoints).is_empty());
    }

    // ---- The property: compiled entries + decide == evaluate. ----

    use proptest::prelude::*;

    const NAMESPACES: [&str; 4] = ["a", "b", "mesh-system", "c"];
    const ACCOUNTS: [&str; 3] = ["x", "y", "xy"];
    const PORTS: [u16; 3] = [80, 443, 8080];

    #[derive(Clone, Debug)]
    struct GenWorkload {
        ns: usize,
        sa: usize,
        app: Option<usize>,
        local: bool,
    }

    #[derive(Clone, Debug)]
    struct GenPolicy {
        ns: usize,
        sa: Option<usize>,
        app: Option<usize>,
        action: PolicyAction,
        rules: Vec<(Vec<FromEntry>, Vec<PortEntry>)>,
    }

    fn gen_from() -> impl Strategy<Value = FromEntry> {
        let td = TD;
        let identity = prop_oneof![
            (0..4usize, 0..3usize).prop_map(move |(n, s)| format!(
                "spiffe://{td}/ns/{}/sa/{}",
                NAMESPACES[n], ACCOUNTS[s]
            )),
            (0..4usize).prop_map(move |n| format!("spiffe://{td}/ns/{}/sa/*", NAMESPACES[n])),
            (0..4usize).prop_map(move |n| format!("spiffe://{td}/ns/{}/sa/x*", NAMESPACES[n])),
            Just(format!("spiffe://{td}/ns/m*")),
            Just(format!("spiffe://{td}/ns/*")),
            Just(format!("spiffe://{td}/*")),
            Just("*".to_owned()),
        ]
        .prop_map(|id| FromEntry {
            identity: Some(id),
            namespace: None,
        });
        let namespace = prop_oneof![
            (0..4usize).prop_map(|n| NAMESPACES[n].to_owned()),
            Just("*".to_owned())
        ]
        .prop_map(|ns| FromEntry {
            identity: None,
            namespace: Some(ns),
        });
        prop_oneof![3 => identity, 1 => namespace]
    }

    fn gen_port() -> impl Strategy<Value = PortEntry> {
        (0..3usize, any::<bool>()).prop_map(|(p, udp)| PortEntry {
            port: PORTS[p],
            protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
        })
    }

    fn gen_policy() -> impl Strategy<Value = GenPolicy> {
        let action = prop_oneof![
            Just(PolicyAction::Allow),
            Just(PolicyAction::Deny),
            Just(PolicyAction::Audit)
        ];
        let rule = (
            prop::collection::vec(gen_from(), 0..3),
            prop::collection::vec(gen_port(), 0..3),
        );
        (
            0..3usize,
            prop::option::of(0..3usize),
            prop::option::of(0..2usize),
            action,
            prop::collection::vec(rule, 0..3),
        )
            .prop_map(|(ns, sa, app, action, rules)| GenPolicy {
                ns,
                sa,
                app,
                action,
                rules,
            })
    }

    fn gen_workload() -> impl Strategy<Value = GenWorkload> {
        (
            0..3usize,
            0..3usize,
            prop::option::of(0..2usize),
            any::<bool>(),
        )
            .prop_map(|(ns, sa, app, local)| GenWorkload { ns, sa, app, local })
    }

    fn meta(name: String, ns: usize, app: Option<usize>) -> ObjectMeta {
        ObjectMeta {
            name,
            namespace: NAMESPACES[ns].into(),
            labels: app
                .map(|a| BTreeMap::from([("app".to_owned(), ["p", "q"][a].to_owned())]))
                .unwrap_or_default(),
        }
    }

    fn build(workloads: &[GenWorkload], policies: &[GenPolicy]) -> Documents {
        let origin = |document| Origin {
            file: "gen.yaml".into(),
            document,
            changed: None,
        };
        Documents {
            workloads: workloads
                .iter()
                .enumerate()
                .map(|(i, w)| Workload {
                    api_version: "mesh.dev/v1alpha1".into(),
                    kind: "Workload".into(),
                    metadata: meta(format!("w{i}"), w.ns, w.app),
                    spec: WorkloadSpec {
                        service_account: ACCOUNTS[w.sa].into(),
                        ips: vec![IpAddr::from([10, 0, 0, i as u8 + 1])],
                        node: if w.local { "node-a" } else { "node-b" }.into(),
                        ports: None,
                        netns: Some(PathBuf::from(format!("/run/netns/w{i}"))),
                    },
                    origin: origin(i + 1),
                })
                .collect(),
            policies: policies
                .iter()
                .enumerate()
                .map(|(i, p)| MeshPolicy {
                    api_version: "mesh.dev/v1alpha1".into(),
                    kind: "MeshPolicy".into(),
                    // Names out of order on purpose: consideration order is
                    // by name, not by position.
                    metadata: meta(format!("p{}", 9 - i), p.ns, None),
                    spec: crate::MeshPolicySpec {
                        selector: (p.sa.is_some() || p.app.is_some()).then(|| Selector {
                            service_account: p.sa.map(|s| ACCOUNTS[s].to_owned()),
                            match_labels: meta(String::new(), 0, p.app).labels,
                        }),
                        action: p.action,
                        rules: p
                            .rules
                            .iter()
                            .map(|(from, ports)| Rule {
                                from: from.clone(),
                                ports: ports.clone(),
                            })
                            .collect(),
                    },
                    origin: origin(100 + i),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn action_of(i: usize) -> DefaultAction {
        [DefaultAction::Allow, DefaultAction::Deny][i]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        #[test]
        fn compiled_entries_decide_like_the_reference(
            workloads in prop::collection::vec(gen_workload(), 1..7),
            policies in prop::collection::vec(gen_policy(), 0..6),
            default in 0..2usize,
            non_mesh in 0..2usize,
        ) {
            let docs = build(&workloads, &policies);
            let settings = MeshSettings {
                node: "node-a".into(),
                default_action: action_of(default),
                non_mesh_action: action_of(non_mesh),
                ..MeshSettings::default()
            };
            let compiled = compile(&docs, &settings).unwrap();
            let reference = Evaluator::new(&docs, &settings);
            let mut sources: Vec<(Source, u64)> = compiled
                .identities
                .keys()
                .filter(|&&n| n != WORLD_IDENTITY)
                .map(|&n| (Source::Identity(n), n))
                .collect();
            sources.push((Source::World, WORLD_IDENTITY));
            // An identity the configuration does not know.
            sources.push((Source::Identity(12345), 12345));
            for dst in &compiled.workloads {
                for proto in [PROTO_TCP, PROTO_UDP] {
                    prop_assert!(compiled.policy.contains_key(
                        &PolicyKey::new(dst.subject, ANY_IDENTITY, ANY_PORT, proto)));
                    for port in PORTS.into_iter().chain([9999, 1]) {
                        for (source, id) in &sources {
                            let got = decide(dst.subject, *id, port, proto, |k| compiled.policy.get(k).copied());
                            let want = reference.evaluate(*source, dst, port, proto);
                            prop_assert_eq!(got, want, "{:?} -> {}/{} port {} proto {}", source, dst.namespace, dst.name, port, proto);
                        }
                    }
                }
            }
        }
    }

    // ---- Scale. ----

    /// 1,000 workloads, one policy naming all of them on 100 TCP ports.
    fn big() -> (Documents, MeshSettings) {
        let mut text = String::new();
        for i in 0..1000u32 {
            let ip = std::net::Ipv4Addr::from(0xc612_0000 + i + 1);
            text.push_str(&wl(
                "perf",
                &format!("w{i}"),
                &format!("sa{i}"),
                "",
                &ip.to_string(),
            ));
        }
        text.push_str("apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: big, namespace: perf}\nspec:\n  selector: {serviceAccount: sa0}\n  rules:\n    - from:\n");
        for i in 0..1000 {
            text.push_str(&format!(
                "        - identity: spiffe://cluster.local/ns/perf/sa/sa{i}\n"
            ));
        }
        text.push_str("      ports:\n");
        for port in 1000..1100 {
            text.push_str(&format!("        - port: {port}\n"));
        }
        (parse_str("big.yaml", &text).unwrap(), settings())
    }

    /// `cargo test --release -p mesh-agent --bin mesh-agent policy -- --ignored --nocapture`
    #[test]
    #[ignore = "timing; run in release"]
    fn compiles_100k_entries_quickly() {
        let (docs, settings) = big();
        let start = std::time::Instant::now();
        let compiled = compile(&docs, &settings).unwrap();
        let elapsed = start.elapsed();
        eprintln!(
            "compiled {} policy entries, {} endpoints in {elapsed:?}",
            compiled.policy.len(),
            compiled.endpoints.len()
        );
        assert!(compiled.policy.len() >= 100_000);
        let start = std::time::Instant::now();
        let again = compile(&docs, &settings).unwrap();
        let d = diff(&compiled.policy, &again.policy);
        eprintln!("recompiled and diffed in {:?}", start.elapsed());
        assert!(d.is_empty());
        if !cfg!(debug_assertions) {
            assert!(elapsed < std::time::Duration::from_secs(2), "{elapsed:?}");
        }
    }
}

#[cfg(test)]
mod mtls_mode_tests {
    use super::*;
    use crate::parse_str;

    fn modes(yaml: &str) -> Vec<(String, MtlsMode)> {
        let docs = parse_str("t.yaml", yaml).unwrap();
        let c = compile(&docs, &MeshSettings::default()).unwrap();
        c.workloads
            .iter()
            .map(|w| (w.name.clone(), w.mtls))
            .collect()
    }

    const WORKLOADS: &str = "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: a, namespace: shop, labels: {tier: db}}\nspec: {serviceAccount: db, ips: [10.0.0.1], node: n2}\n---\napiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: b, namespace: shop}\nspec: {serviceAccount: web, ips: [10.0.0.2], node: n2}\n---\napiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: c, namespace: other}\nspec: {serviceAccount: web, ips: [10.0.0.3], node: n2}\n";

    fn pa(ns: &str, name: &str, selector: &str, mode: &str) -> String {
        format!(
            "---\napiVersion: mesh.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{{selector}mtls: {{mode: {mode}}}}}\n"
        )
    }

    #[test]
    fn permissive_without_any_peer_authentication() {
        assert!(
            modes(WORKLOADS)
                .iter()
                .all(|(_, m)| *m == MtlsMode::Permissive)
        );
    }

    #[test]
    fn the_most_specific_peer_authentication_wins_and_strict_wins_a_tie() {
        let yaml = format!(
            "{WORKLOADS}{}{}{}{}",
            pa("mesh-system", "mesh", "", "STRICT"),
            pa("shop", "ns", "", "PERMISSIVE"),
            pa(
                "shop",
                "db",
                "selector: {matchLabels: {tier: db}}, ",
                "STRICT"
            ),
            pa(
                "shop",
                "db-too",
                "selector: {serviceAccount: db}, ",
                "PERMISSIVE"
            ),
        );
        let got = modes(&yaml);
        assert_eq!(
            got,
            vec![
                ("c".into(), MtlsMode::Strict),     // mesh-wide
                ("a".into(), MtlsMode::Strict),     // selector level, STRICT beats PERMISSIVE
                ("b".into(), MtlsMode::Permissive), // namespace level beats mesh-wide
            ]
        );
        let docs = parse_str("t.yaml", &yaml).unwrap();
        let c = compile(&docs, &MeshSettings::default()).unwrap();
        let strict = |ip: &str| {
            c.endpoints[&IpKey::from(ip.parse::<IpAddr>().unwrap())].flags & ENDPOINT_STRICT != 0
        };
        assert!(strict("10.0.0.1") && !strict("10.0.0.2") && strict("10.0.0.3"));
    }

    #[test]
    fn only_local_workloads_labelled_enabled_opt_in_to_the_short_circuit() {
        let local = |name: &str, ip: &str, label: &str| {
            format!(
                "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop, labels: {{{label}}}}}\nspec: {{serviceAccount: {name}, ips: ['{ip}'], node: node-a, netns: /run/netns/{name}}}\n---\n"
            )
        };
        let yaml = [
            local("in", "10.0.0.1", "mesh.dev/short-circuit: enabled"),
            local("out", "10.0.0.2", "mesh.dev/short-circuit: disabled"),
            local("none", "10.0.0.3", ""),
            "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: far, namespace: shop, labels: {mesh.dev/short-circuit: enabled}}\nspec: {serviceAccount: far, ips: ['10.0.0.4'], node: node-b}\n---\n".to_string(),
        ]
        .concat();
        let here = MeshSettings {
            node: "node-a".into(),
            ..MeshSettings::default()
        };
        let c = compile(&parse_str("t.yaml", &yaml).unwrap(), &here).unwrap();
        let opted = |ip: &str| {
            c.endpoints[&IpKey::from(ip.parse::<IpAddr>().unwrap())].flags & ENDPOINT_SHORT_CIRCUIT
                != 0
        };
        assert!(opted("10.0.0.1"));
        assert!(!opted("10.0.0.2") && !opted("10.0.0.3"));
        // Another node's workload: its own agent decides.
        assert!(!opted("10.0.0.4"));
        let bad = local("odd", "10.0.0.5", "mesh.dev/short-circuit: 'yes'");
        let e = parse_str("t.yaml", &bad).unwrap_err().to_string();
        assert!(
            e.contains("Workload shop/odd")
                && e.contains("metadata.labels.mesh.dev/short-circuit")
                && e.contains("`yes`"),
            "{e}"
        );
    }

    #[test]
    fn bad_peer_authentication_and_node_documents_are_refused_with_their_field() {
        let bad_mode = format!("{WORKLOADS}{}", pa("shop", "x", "", "SOMETIMES"));
        let e = parse_str("t.yaml", &bad_mode).unwrap_err().to_string();
        assert!(
            e.contains("PeerAuthentication shop/x") && e.contains("spec.mtls.mode"),
            "{e}"
        );
        let node = "apiVersion: mesh.dev/v1alpha1\nkind: MeshNode\nmetadata: {name: n1}\nspec: {addresses: []}\n";
        let e = parse_str("t.yaml", node).unwrap_err().to_string();
        assert!(
            e.contains("MeshNode n1") && e.contains("spec.addresses"),
            "{e}"
        );
        let twice = format!("{node}---\n{node}").replace("[]", "[192.0.2.1]");
        let e = parse_str("t.yaml", &twice).unwrap_err().to_string();
        assert!(e.contains("duplicate MeshNode n1"), "{e}");
    }
}
