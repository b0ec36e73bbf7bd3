//! `mesh-agent status`: one screen saying whether this node's mesh is
//! healthy, and why not. It asks the agent's health endpoint, and reads the
//! pin directory and the state directory itself, so it also says what is
//! wrong when the agent is down. Exit code 0 when healthy, 1 when not:
//! scripts and probes can use it.
//!
//! Gathering (I/O) and judging ([`evaluate`], pure) are apart, so the
//! verdicts are unit-tested from given inputs.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    inspect::{Output, json},
    table,
};
use mesh_agent::endpoints::metrics::seconds_until;
use mesh_agent::health::HealthReport;
use mesh_common::policy::ENDPOINT_LOCAL;
use mesh_datapath::maps::{MapFill, PinnedMaps};
use mesh_datapath::{
    CGROUP_HOOKS, TcLinkState, TcMode,
    features::{DefectAnswers, KernelFeatures},
};
use mesh_pki::rotation::CertState;
use mesh_policy::state::NodeState;

/// How long the health endpoint may take to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A map this full is worth a warning (a full map refuses new sockets or
/// flows; an LRU map evicts the oldest).
const MAP_FILL_WARN: f64 = 0.9;

/// A certificate with less than this fraction of its lifetime left is
/// expiring soon (renewal is due at half of it).
const CERT_LEFT_WARN: f64 = 0.25;

/// What the agent said, or did not.
#[derive(Debug, Clone)]
pub enum AgentProbe {
    /// The health endpoint answered `/ready`.
    Answered {
        address: SocketAddr,
        health: HealthReport,
    },
    /// It did not: whether a process holds the pin directory (an agent
    /// that serves its endpoints elsewhere, or is stuck), and what
    /// `health.json` last said.
    Silent {
        address: SocketAddr,
        error: String,
        holder: Option<u32>,
        last: Option<HealthReport>,
    },
}

/// What the kernel holds, from the pinned maps.
#[derive(Debug, Clone, Default)]
pub struct KernelReadings {
    pub counters: BTreeMap<&'static str, u64>,
    pub maps: Vec<(&'static str, MapFill)>,
    pub policy_generation: u32,
}

/// Everything `status` judges.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub bpffs: PathBuf,
    pub agent: AgentProbe,
    /// Names in the pin directory.
    pub pins: Result<Vec<String>, String>,
    /// Interfaces whose pinned tc links guard nothing any more (deleted or
    /// created again since the link was made).
    pub stale_interfaces: Vec<String>,
    /// Interfaces the routes to other nodes' workloads leave through, each
    /// with one such workload address: their replies and their own
    /// connections arrive there.
    pub routes_to_other_nodes: Vec<(String, IpAddr)>,
    pub kernel: Result<KernelReadings, String>,
    /// `None`: no `certs.json` (the agent does not run mutual TLS).
    pub certs: Option<Result<CertState, String>>,
    /// The generation `state.json` names, when there is one.
    pub state_generation: Option<u32>,
    /// How the interfaces' tc programs are attached (from the pins).
    pub tc_mode: Option<TcMode>,
    /// What the agent found in the kernel at start (`kernel.json`).
    pub kernel_features: Option<KernelFeatures>,
    /// What is attached against the redirect path's defects (from the pins).
    pub defect_answers: DefectAnswers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ok,
    Warn,
    Fail,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Warn => "warn",
            State::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub state: State,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// No check failed (warnings allowed).
    pub healthy: bool,
    pub checks: Vec<Check>,
    /// `None` when no agent says.
    pub ready: Option<bool>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub policy_generation: Option<u32>,
    pub counters: BTreeMap<&'static str, u64>,
    pub maps: BTreeMap<&'static str, MapFill>,
}

impl Report {
    pub fn render(&self, output: Output) -> String {
        if output == Output::Json {
            return json(self);
        }
        let problems = |state| self.checks.iter().filter(|c| c.state == state).count();
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let mut text = if self.healthy {
            match problems(State::Warn) {
                0 => "status: healthy\n".to_string(),
                n => format!("status: healthy, with {}\n", plural(n, "warning")),
            }
        } else {
            format!(
                "status: NOT healthy ({})\n",
                plural(problems(State::Fail), "failed check")
            )
        };
        text.push('\n');
        let rows: Vec<Vec<String>> = self
            .checks
            .iter()
            .map(|c| vec![c.check.into(), c.state.name().into(), c.detail.clone()])
            .collect();
        text += &table::render(&["CHECK", "STATE", "DETAIL"], &rows, "No checks.");
        text
    }
}

/// Gathers and judges (never fails: what cannot be read is a finding).
pub fn run(bpffs: &Path, state_dir: &Path, health_address: SocketAddr) -> Report {
    evaluate(&gather(bpffs, state_dir, health_address), SystemTime::now())
}

pub fn gather(bpffs: &Path, state_dir: &Path, health_address: SocketAddr) -> Inputs {
    let agent = match probe_ready(health_address) {
        Ok(health) => AgentProbe::Answered {
            address: health_address,
            health,
        },
        Err(error) => AgentProbe::Silent {
            address: health_address,
            error,
            holder: pin_dir_holder(bpffs),
            last: HealthReport::read(state_dir).ok(),
        },
    };
    let pins = std::fs::read_dir(bpffs)
        .and_then(|dir| {
            dir.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| format!("{}: {e}", bpffs.display()));
    let stale_interfaces = pins
        .as_ref()
        .map(|names| stale_interfaces(bpffs, names))
        .unwrap_or_default();
    let routes_to_other_nodes = routes_to_other_nodes(bpffs);
    let kernel = read_kernel(bpffs).map_err(|e| format!("{:#}", anyhow::Error::from(e)));
    let certs = (!mesh_pki::rotation::no_state(state_dir))
        .then(|| mesh_pki::rotation::read_state(state_dir).map_err(|e| format!("{e:#}")));
    let state_generation = NodeState::path(state_dir)
        .exists()
        .then(|| NodeState::read(state_dir).ok().map(|s| s.generation))
        .flatten();
    let tc_mode = pins.as_ref().ok().and_then(|names| {
        names
            .iter()
            .filter(|n| n.starts_with("tc_"))
            .find_map(|n| mesh_datapath::tc::pinned_mode(&bpffs.join(n)))
    });
    Inputs {
        bpffs: bpffs.to_owned(),
        agent,
        pins,
        stale_interfaces,
        routes_to_other_nodes,
        kernel,
        certs,
        state_generation,
        tc_mode,
        kernel_features: KernelFeatures::read(state_dir).ok(),
        defect_answers: DefectAnswers::attached(bpffs),
    }
}

/// How many workloads of other nodes `status` looks up a route to.
const ROUTES_LOOKED_UP: usize = 256;

/// Where the routes to other nodes' workloads leave this node: one
/// interface each, with the first address found behind it (at most
/// [`ROUTES_LOOKED_UP`] addresses are asked about).
fn routes_to_other_nodes(bpffs: &Path) -> Vec<(String, IpAddr)> {
    let Ok(endpoints) = PinnedMaps::open(bpffs).and_then(|m| m.endpoints()) else {
        return Vec::new();
    };
    let mut found: BTreeMap<String, IpAddr> = BTreeMap::new();
    let remote = endpoints
        .into_iter()
        .filter(|(_, e)| e.flags & ENDPOINT_LOCAL == 0)
        .map(|(key, _)| IpAddr::from(key))
        .take(ROUTES_LOOKED_UP);
    for ip in remote {
        let Ok(Some(ifindex)) = mesh_datapath::netlink::route_interface(ip) else {
            continue;
        };
        if let Ok(name) = nix::net::if_::if_indextoname(ifindex) {
            found
                .entry(name.to_string_lossy().into_owned())
                .or_insert(ip);
        }
    }
    found.into_iter().collect()
}

/// The interfaces among the pinned tc links whose link no longer reaches
/// the interface of that name.
fn stale_interfaces(bpffs: &Path, names: &[String]) -> Vec<String> {
    let mut stale: Vec<String> = names
        .iter()
        .filter_map(|n| {
            n.strip_prefix("tc_ingress_")
                .or_else(|| n.strip_prefix("tc_egress_"))
        })
        .filter(|i| {
            ["ingress", "egress"].into_iter().any(|direction| {
                let pin = mesh_datapath::tc_link_pin(bpffs, direction, i);
                mesh_datapath::tc_link_state(&pin, i) != TcLinkState::Guarding
            })
        })
        .map(str::to_owned)
        .collect();
    stale.sort();
    stale.dedup();
    stale
}

fn read_kernel(bpffs: &Path) -> Result<KernelReadings, mesh_datapath::maps::MapsError> {
    let maps = PinnedMaps::open(bpffs)?;
    Ok(KernelReadings {
        counters: maps
            .counters()?
            .into_iter()
            .map(|(c, v)| (c.name(), v))
            .collect(),
        maps: maps.fill()?,
        policy_generation: maps.policy_generation()?,
    })
}

/// The pid holding the agent's lock on the pin directory, if any.
fn pin_dir_holder(bpffs: &Path) -> Option<u32> {
    let meta = std::fs::metadata(bpffs).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let dev = meta.dev();
    mesh_datapath::pins::parse_lock_holder(&locks, libc::major(dev), libc::minor(dev), meta.ino())
}

/// `GET /ready` on the health endpoint (an unspecified listen address is
/// asked on loopback).
fn probe_ready(address: SocketAddr) -> Result<HealthReport, String> {
    let target = match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), address.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), address.port())
        }
        _ => address,
    };
    let exchange = || -> std::io::Result<Vec<u8>> {
        let mut tcp = TcpStream::connect_timeout(&target, PROBE_TIMEOUT)?;
        tcp.set_read_timeout(Some(PROBE_TIMEOUT))?;
        tcp.set_write_timeout(Some(PROBE_TIMEOUT))?;
        write!(
            tcp,
            "GET /ready HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response)?;
        Ok(response)
    };
    let response = exchange().map_err(|e| e.to_string())?;
    let (status, body) =
        parse_response(&response).ok_or_else(|| format!("{target} did not answer HTTP"))?;
    match status {
        200 => Ok(HealthReport {
            ready: true,
            reason: String::new(),
        }),
        503 => Ok(HealthReport {
            ready: false,
            reason: body.trim().to_owned(),
        }),
        other => Err(format!("{target}/ready answered {other}")),
    }
}

/// The status code and body of an HTTP/1.1 response read to its end.
fn parse_response(response: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, body.to_owned()))
}

/// Judges the inputs.
pub fn evaluate(inputs: &Inputs, now: SystemTime) -> Report {
    let mut checks = Vec::new();
    let mut check = |check, state, detail: String| {
        checks.push(Check {
            check,
            state,
            detail,
        })
    };

    // The agent, and whether the maps reflect the current policy.
    let bpffs = inputs.bpffs.display();
    let ready = match &inputs.agent {
        AgentProbe::Answered { address, health } => {
            check(
                "agent",
                State::Ok,
                format!("health endpoint {address} answers"),
            );
            Some((health.clone(), ""))
        }
        AgentProbe::Silent {
            address,
            error,
            holder: Some(pid),
            last,
        } => {
            check(
                "agent",
                State::Warn,
                format!(
                    "running (pid {pid}), but its health endpoint {address} does not answer \
                     ({error}); readiness from health.json"
                ),
            );
            last.clone().map(|h| (h, " (health.json)"))
        }
        AgentProbe::Silent {
            address,
            error,
            holder: None,
            ..
        } => {
            check(
                "agent",
                State::Fail,
                format!(
                    "not running: nothing answers on {address} ({error}) and no process holds {bpffs}"
                ),
            );
            None
        }
    };
    match (&ready, &inputs.agent) {
        (Some((h, from)), _) if h.ready => check(
            "ready",
            State::Ok,
            format!("the maps reflect the current policy{from}"),
        ),
        (Some((h, from)), _) => check("ready", State::Fail, format!("{}{from}", h.reason)),
        (None, AgentProbe::Silent { holder: None, .. }) => check(
            "ready",
            State::Fail,
            "no agent keeps the maps in step with policy; the kernel enforces the last policy applied"
                .into(),
        ),
        (None, _) => check("ready", State::Warn, "unknown: no health.json".into()),
    }

    // The kernel programs: the links pinned by the agent.
    match &inputs.pins {
        Err(e) => check("programs", State::Fail, e.clone()),
        Ok(names) => {
            let (state, detail) = judge_links(
                names,
                &inputs.stale_interfaces,
                &inputs.routes_to_other_nodes,
                &bpffs.to_string(),
                inputs.tc_mode,
            );
            check("programs", state, detail);
        }
    }

    // What the kernel offers, as the agent found it at start: the
    // fallbacks in force are no fault, but an operator should see them.
    match &inputs.kernel_features {
        Some(kernel) => {
            check("features", State::Ok, kernel.summary());
            check(
                "redirect path",
                State::Ok,
                kernel.defects_summary(&inputs.defect_answers),
            );
        }
        None => check(
            "features",
            State::Warn,
            "unknown: no kernel.json (no agent has started with this state directory)".into(),
        ),
    }

    match &inputs.kernel {
        Err(e) => check("maps", State::Fail, e.clone()),
        Ok(k) => {
            let ratio = |f: &MapFill| f64::from(f.entries) / f64::from(f.max_entries.max(1));
            let describe = |(name, f): &(&str, MapFill)| {
                format!(
                    "{name} {:.1}% ({}/{})",
                    100.0 * ratio(f),
                    f.entries,
                    f.max_entries
                )
            };
            let full: Vec<String> = k
                .maps
                .iter()
                .filter(|(_, f)| ratio(f) >= MAP_FILL_WARN)
                .map(describe)
                .collect();
            if !full.is_empty() {
                check(
                    "maps",
                    State::Warn,
                    format!("nearly full: {}", full.join(", ")),
                );
            } else {
                let fullest = k
                    .maps
                    .iter()
                    .max_by(|a, b| ratio(&a.1).total_cmp(&ratio(&b.1)));
                check(
                    "maps",
                    State::Ok,
                    match fullest {
                        Some(m) => format!("fullest: {}", describe(m)),
                        None => "no maps".into(),
                    },
                );
            }
            match inputs.state_generation {
                Some(named) if named != k.policy_generation => check(
                    "policy",
                    State::Warn,
                    format!(
                        "generation {} in the kernel, but state.json names generation {named}",
                        k.policy_generation
                    ),
                ),
                _ => check(
                    "policy",
                    State::Ok,
                    format!("generation {}", k.policy_generation),
                ),
            }
            let c = |name: &str| k.counters.get(name).copied().unwrap_or(0);
            check(
                "denials",
                State::Ok,
                format!(
                    "{} denied, {} audited, {} allowed since the maps were created",
                    c("policy_denied"),
                    c("policy_audited"),
                    c("policy_allowed")
                ),
            );
            let failures: Vec<String> = [
                "sockets_track_failed",
                "conntrack_failed",
                "flow_events_lost",
            ]
            .into_iter()
            .filter(|name| c(name) > 0)
            .map(|name| format!("{name} {}", c(name)))
            .collect();
            if failures.is_empty() {
                check(
                    "kernel",
                    State::Ok,
                    "no failed map writes, no lost flow events".into(),
                );
            } else {
                check(
                    "kernel",
                    State::Warn,
                    format!(
                        "{} (a map or the flow ring buffer was full)",
                        failures.join(", ")
                    ),
                );
            }
        }
    }

    let (state, detail) = judge_certificates(inputs.certs.as_ref(), now);
    check("certificates", state, detail);

    let healthy = !checks.iter().any(|c| c.state == State::Fail);
    let kernel = inputs.kernel.as_ref().ok();
    Report {
        healthy,
        checks,
        ready: ready.as_ref().map(|(h, _)| h.ready),
        reason: ready.map(|(h, _)| h.reason).unwrap_or_default(),
        policy_generation: kernel.map(|k| k.policy_generation),
        counters: kernel.map(|k| k.counters.clone()).unwrap_or_default(),
        maps: kernel
            .map(|k| k.maps.iter().copied().collect())
            .unwrap_or_default(),
    }
}

/// Every cgroup hook linked on one cgroup, and both tc directions on each
/// interface that has one.
fn judge_links(
    names: &[String],
    stale: &[String],
    routes_to_other_nodes: &[(String, IpAddr)],
    bpffs: &str,
    tc_mode: Option<TcMode>,
) -> (State, String) {
    let Some(cgroup) = names.iter().find_map(|n| n.strip_prefix("sockops_cgroup_")) else {
        return (
            State::Fail,
            format!("no kernel programs attached under {bpffs} (no sockops_cgroup_* link)"),
        );
    };
    let has = |name: String| names.contains(&name);
    let missing: Vec<&str> = CGROUP_HOOKS
        .into_iter()
        .filter(|hook| !has(format!("{hook}_cgroup_{cgroup}")))
        .collect();
    if !missing.is_empty() {
        return (
            State::Fail,
            format!("cgroup {cgroup} misses the links of {}", missing.join(", ")),
        );
    }
    let interfaces: std::collections::BTreeSet<&str> = names
        .iter()
        .filter_map(|n| {
            n.strip_prefix("tc_ingress_")
                .or_else(|| n.strip_prefix("tc_egress_"))
        })
        .collect();
    let half: Vec<String> = interfaces
        .iter()
        .filter_map(|i| {
            let missing: Vec<&str> = ["ingress", "egress"]
                .into_iter()
                .filter(|d| !has(format!("tc_{d}_{i}")))
                .collect();
            (!missing.is_empty()).then(|| format!("{i} has no tc {} link", missing.join("/")))
        })
        .collect();
    if !half.is_empty() {
        return (State::Fail, half.join(", "));
    }
    if !stale.is_empty() {
        return (
            State::Fail,
            format!(
                "the tc links of {} guard nothing: the interface was deleted or created again \
                 (a running agent attaches anew within a second; otherwise restart it)",
                stale.join(", ")
            ),
        );
    }
    let hooks = format!("{} cgroup hooks on cgroup {cgroup}", CGROUP_HOOKS.len());
    if interfaces.is_empty() {
        return (
            State::Warn,
            format!(
                "{hooks}; no tc links (no --interfaces): packets from other nodes are not \
                 judged on arrival (fine on a single node)"
            ),
        );
    }
    // Where other nodes' workloads are reached, their packets arrive: an
    // interface there with no tc program lets them in unjudged (an overlay
    // CNI's device left out of --interfaces, say).
    let unguarded: Vec<String> = routes_to_other_nodes
        .iter()
        .filter(|(interface, _)| !interfaces.contains(interface.as_str()))
        .map(|(interface, ip)| format!("{interface} (the route to {ip})"))
        .collect();
    if !unguarded.is_empty() {
        return (
            State::Warn,
            format!(
                "{hooks}; other nodes' workloads are reached through {}, which has no tc \
                 program: their packets arrive there unjudged (add it to --interfaces)",
                unguarded.join(", ")
            ),
        );
    }
    let tc = interfaces.into_iter().collect::<Vec<_>>().join(", ");
    let workloads = names
        .iter()
        .filter(|n| n.starts_with("tc_workload_to_"))
        .count();
    let checks = match workloads {
        0 => String::new(),
        1 => "; checks on 1 workload interface".to_string(),
        n => format!("; checks on {n} workload interfaces"),
    };
    let how = match tc_mode {
        Some(TcMode::Tcx) => " (TCX links)",
        Some(TcMode::Netlink) => " (clsact filters)",
        None => "",
    };
    (State::Ok, format!("{hooks}; tc on {tc}{how}{checks}"))
}

fn judge_certificates(
    certs: Option<&Result<CertState, String>>,
    now: SystemTime,
) -> (State, String) {
    let state = match certs {
        None => return (State::Ok, "none (mutual TLS is off)".into()),
        Some(Err(e)) => return (State::Warn, format!("cannot read: {e}")),
        Some(Ok(state)) => state,
    };
    let mut expired = Vec::new();
    let mut soon = Vec::new();
    let mut next: Option<(f64, &str)> = None;
    for c in &state.certificates {
        let Some(left) = seconds_until(&c.not_after, now) else {
            soon.push(format!(
                "{}: unreadable expiry {:?}",
                c.spiffe_id, c.not_after
            ));
            continue;
        };
        let lifetime = seconds_until(&c.not_after, now)
            .zip(seconds_until(&c.not_before, now))
            .map_or(0.0, |(after, before)| after - before);
        if left <= 0.0 {
            expired.push(c.spiffe_id.clone());
            continue;
        }
        if let Some(e) = &c.last_error {
            soon.push(format!("{} renewal failing: {e}", c.spiffe_id));
        } else if left < lifetime * CERT_LEFT_WARN {
            soon.push(format!("{} expires in {}", c.spiffe_id, duration(left)));
        }
        if next.is_none_or(|(n, _)| left < n) {
            next = Some((left, &c.spiffe_id));
        }
    }
    for p in &state.pending {
        soon.push(match &p.last_error {
            Some(e) => format!("{} has none yet: {e}", p.spiffe_id),
            None => format!("{} has none yet", p.spiffe_id),
        });
    }
    if !expired.is_empty() {
        return (State::Fail, format!("expired: {}", expired.join(", ")));
    }
    if !soon.is_empty() {
        return (State::Warn, soon.join("; "));
    }
    match next {
        Some((left, id)) => (
            State::Ok,
            format!(
                "{} valid; next expiry in {} ({id})",
                state.certificates.len(),
                duration(left)
            ),
        ),
        None => (State::Ok, "none (no local workloads)".into()),
    }
}

/// Whole seconds, as humans read them.
fn duration(seconds: f64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0.0) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_pki::{
        cert::rfc3339,
        rotation::{CertificateState, PendingState},
    };

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-11-21T10:00:00Z").unwrap()
    }

    fn links(interfaces: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = CGROUP_HOOKS
            .iter()
            .map(|h| format!("{h}_cgroup_4242"))
            .collect();
        for i in interfaces {
            names.push(format!("tc_ingress_{i}"));
            names.push(format!("tc_egress_{i}"));
        }
        names.extend(["POLICY", "ENDPOINTS", "SETTINGS"].map(String::from));
        names
    }

    fn cert(id: &str, from: i64, to: i64, error: Option<&str>) -> CertificateState {
        let at = |secs: i64| {
            rfc3339(if secs >= 0 {
                now() + Duration::from_secs(secs as u64)
            } else {
                now() - Duration::from_secs((-secs) as u64)
            })
        };
        CertificateState {
            spiffe_id: id.into(),
            identity: "17".into(),
            serial: "01".into(),
            not_before: at(from),
            not_after: at(to),
            renew_at: at((from + to) / 2),
            last_error: error.map(String::from),
            retry_at: None,
        }
    }

    fn certs(certificates: Vec<CertificateState>) -> Option<Result<CertState, String>> {
        Some(Ok(CertState {
            updated: rfc3339(now()),
            certificates,
            pending: Vec::new(),
            trust_bundle: Vec::new(),
        }))
    }

    fn healthy_inputs() -> Inputs {
        Inputs {
            bpffs: "/sys/fs/bpf/mesh".into(),
            agent: AgentProbe::Answered {
                address: "127.0.0.1:15021".parse().unwrap(),
                health: HealthReport {
                    ready: true,
                    reason: String::new(),
                },
            },
            pins: Ok(links(&["eth0"])),
            stale_interfaces: Vec::new(),
            routes_to_other_nodes: vec![("eth0".into(), "10.1.2.3".parse().unwrap())],
            kernel: Ok(KernelReadings {
                counters: [("policy_denied", 4), ("policy_allowed", 9)].into(),
                maps: vec![
                    (
                        "POLICY",
                        MapFill {
                            entries: 10,
                            max_entries: 100,
                        },
                    ),
                    (
                        "CONNTRACK",
                        MapFill {
                            entries: 3,
                            max_entries: 100,
                        },
                    ),
                ],
                policy_generation: 5,
            }),
            certs: certs(vec![cert(
                "spiffe://cluster.local/ns/shop/sa/cart",
                -3600,
                82_800,
                None,
            )]),
            state_generation: Some(5),
            tc_mode: Some(TcMode::Tcx),
            kernel_features: Some(KernelFeatures {
                release: "6.1.0-50-amd64".into(),
                boot_id: String::new(),
                features: Vec::new(),
                short_circuit_defects: None,
            }),
            defect_answers: DefectAnswers::default(),
        }
    }

    fn state_of(report: &Report, name: &str) -> (State, String) {
        let c = report.checks.iter().find(|c| c.check == name).unwrap();
        (c.state, c.detail.clone())
    }

    #[test]
    fn kernel_fallbacks_are_shown_and_an_unknown_kernel_warns() {
        let mut inputs = healthy_inputs();
        inputs.tc_mode = Some(TcMode::Netlink);
        inputs.kernel_features = Some(KernelFeatures {
            release: "6.1.0-50-amd64".into(),
            boot_id: String::new(),
            features: vec![mesh_datapath::features::Feature {
                name: "tcx".into(),
                present: false,
                need: mesh_datapath::features::Need::Optional,
                since: "6.6".into(),
                with: "links".into(),
                without: "clsact filters".into(),
            }],
            short_circuit_defects: Some(vec![
                mesh_datapath::self_test::Defect {
                    name: "splice_misses_redirected_bytes".into(),
                    present: Some(true),
                    detail: "splice read 0 of 4096".into(),
                },
                mesh_datapath::self_test::Defect {
                    name: "blocking_read_eagain".into(),
                    present: None,
                    detail: "could not tell".into(),
                },
            ]),
        });
        let report = evaluate(&inputs, now());
        assert!(report.healthy, "{report:#?}");
        assert_eq!(
            state_of(&report, "features"),
            (
                State::Ok,
                "Linux 6.1.0-50-amd64: no tcx (Linux 6.6+): clsact filters".into()
            )
        );
        assert!(
            state_of(&report, "programs")
                .1
                .ends_with("tc on eth0 (clsact filters)")
        );
        assert_eq!(
            state_of(&report, "redirect path").1,
            "the redirect path has splice_misses_redirected_bytes: opt in only workloads with \
             event-loop I/O (could not tell: blocking_read_eagain)"
        );
        inputs.defect_answers = DefectAnswers {
            splice_guard: true,
            backlog_bound: Some(6 << 20),
        };
        assert_eq!(
            state_of(&evaluate(&inputs, now()), "redirect path").1,
            "the redirect path has splice_misses_redirected_bytes: opt in only workloads with \
             event-loop I/O; splice(2) from short-circuited sockets fails with EINVAL (splice \
             guard) (could not tell: blocking_read_eagain)"
        );
        inputs.kernel_features = None;
        assert_eq!(
            state_of(&evaluate(&inputs, now()), "features").0,
            State::Warn
        );
    }

    #[test]
    fn a_healthy_node_says_so() {
        let report = evaluate(&healthy_inputs(), now());
        assert!(report.healthy, "{report:#?}");
        assert!(
            report.checks.iter().all(|c| c.state == State::Ok),
            "{report:#?}"
        );
        let text = report.render(Output::Table);
        assert!(text.starts_with("status: healthy\n"), "{text}");
        assert!(text.contains("CHECK"), "{text}");
        assert_eq!(
            state_of(&report, "programs").1,
            "10 cgroup hooks on cgroup 4242; tc on eth0 (TCX links)"
        );
        assert_eq!(
            state_of(&report, "features").1,
            "Linux 6.1.0-50-amd64: every feature the mesh uses"
        );
        assert_eq!(
            state_of(&report, "maps").1,
            "fullest: POLICY 10.0% (10/100)"
        );
        assert_eq!(
            state_of(&report, "denials").1,
            "4 denied, 0 audited, 9 allowed since the maps were created"
        );
        assert!(
            state_of(&report, "certificates")
                .1
                .starts_with("1 valid; next expiry in 23h")
        );
        let json: serde_json::Value = serde_json::from_str(&report.render(Output::Json)).unwrap();
        assert_eq!(json["healthy"], true);
        assert_eq!(json["policy_generation"], 5);
        assert_eq!(json["counters"]["policy_denied"], 4);
    }

    #[test]
    fn not_ready_fails_with_the_reason() {
        let mut inputs = healthy_inputs();
        inputs.agent = AgentProbe::Answered {
            address: "127.0.0.1:15021".parse().unwrap(),
            health: HealthReport {
                ready: false,
                reason: "invalid configuration: bad.yaml: document 1".into(),
            },
        };
        let report = evaluate(&inputs, now());
        assert!(!report.healthy);
        assert_eq!(
            state_of(&report, "ready"),
            (
                State::Fail,
                "invalid configuration: bad.yaml: document 1".into()
            )
        );
        assert_eq!(report.reason, "invalid configuration: bad.yaml: document 1");
        assert!(
            report
                .render(Output::Table)
                .starts_with("status: NOT healthy (1 failed check)\n")
        );
    }

    #[test]
    fn a_silent_agent_falls_back_to_health_json_or_fails() {
        let mut inputs = healthy_inputs();
        inputs.agent = AgentProbe::Silent {
            address: "127.0.0.1:15021".parse().unwrap(),
            error: "Connection refused (os error 111)".into(),
            holder: Some(321),
            last: Some(HealthReport {
                ready: true,
                reason: String::new(),
            }),
        };
        let report = evaluate(&inputs, now());
        assert!(report.healthy, "{report:#?}");
        assert_eq!(state_of(&report, "agent").0, State::Warn);
        assert!(state_of(&report, "agent").1.contains("pid 321"));
        assert_eq!(
            state_of(&report, "ready"),
            (
                State::Ok,
                "the maps reflect the current policy (health.json)".into()
            )
        );

        inputs.agent = AgentProbe::Silent {
            address: "127.0.0.1:15021".parse().unwrap(),
            error: "Connection refused (os error 111)".into(),
            holder: None,
            last: Some(HealthReport {
                ready: true,
                reason: String::new(),
            }),
        };
        let report = evaluate(&inputs, now());
        assert!(!report.healthy);
        assert_eq!(state_of(&report, "agent").0, State::Fail);
        assert_eq!(state_of(&report, "ready").0, State::Fail);
        assert_eq!(report.ready, None);
    }

    #[test]
    fn a_route_to_other_nodes_through_an_unguarded_interface_warns() {
        let mut inputs = healthy_inputs();
        inputs
            .routes_to_other_nodes
            .push(("tunl0".into(), "10.2.0.7".parse().unwrap()));
        let report = evaluate(&inputs, now());
        assert!(report.healthy);
        let (state, detail) = state_of(&report, "programs");
        assert_eq!(state, State::Warn);
        assert!(
            detail.contains("other nodes' workloads are reached through tunl0 (the route to 10.2.0.7), which has no tc program"),
            "{detail}"
        );
        assert!(!detail.contains("eth0 (the route"), "{detail}");
    }

    #[test]
    fn workload_checks_are_counted() {
        let mut inputs = healthy_inputs();
        let mut names = links(&["eth0"]);
        names.extend(
            [
                "tc_workload_to_7",
                "tc_workload_from_7",
                "tc_workload_to_9",
                "tc_workload_from_9",
            ]
            .map(String::from),
        );
        inputs.pins = Ok(names);
        assert_eq!(
            state_of(&evaluate(&inputs, now()), "programs"),
            (
                State::Ok,
                "10 cgroup hooks on cgroup 4242; tc on eth0 (TCX links); checks on 2 workload interfaces"
                    .into()
            )
        );
    }

    #[test]
    fn stale_tc_links_fail_and_no_interfaces_warns() {
        let mut inputs = healthy_inputs();
        inputs.stale_interfaces = vec!["eth0".into()];
        let report = evaluate(&inputs, now());
        assert!(!report.healthy);
        let (state, detail) = state_of(&report, "programs");
        assert_eq!(state, State::Fail);
        assert!(
            detail.starts_with("the tc links of eth0 guard nothing"),
            "{detail}"
        );
        let mut inputs = healthy_inputs();
        inputs.pins = Ok(links(&[]));
        let report = evaluate(&inputs, now());
        assert!(report.healthy, "a warning is not a failure");
        let (state, detail) = state_of(&report, "programs");
        assert_eq!(state, State::Warn);
        assert!(
            detail
                .contains("no tc links (no --interfaces): packets from other nodes are not judged"),
            "{detail}"
        );
    }

    #[test]
    fn missing_links_fail() {
        let mut inputs = healthy_inputs();
        let mut names = links(&["eth0"]);
        names.retain(|n| n != "connect6_cgroup_4242" && n != "tc_egress_eth0");
        inputs.pins = Ok(names.clone());
        let report = evaluate(&inputs, now());
        assert!(!report.healthy);
        assert_eq!(
            state_of(&report, "programs"),
            (
                State::Fail,
                "cgroup 4242 misses the links of connect6".into()
            )
        );
        names.push("connect6_cgroup_4242".into());
        inputs.pins = Ok(names);
        assert_eq!(
            state_of(&evaluate(&inputs, now()), "programs"),
            (State::Fail, "eth0 has no tc egress link".into())
        );
        inputs.pins = Ok(vec!["POLICY".into()]);
        assert!(
            state_of(&evaluate(&inputs, now()), "programs")
                .1
                .starts_with("no kernel programs attached under /sys/fs/bpf/mesh")
        );
    }

    #[test]
    fn full_maps_and_kernel_failures_warn() {
        let mut inputs = healthy_inputs();
        if let Ok(k) = &mut inputs.kernel {
            k.maps[1].1.entries = 95;
            k.counters.insert("conntrack_failed", 2);
        }
        let report = evaluate(&inputs, now());
        assert!(report.healthy);
        assert_eq!(
            state_of(&report, "maps"),
            (State::Warn, "nearly full: CONNTRACK 95.0% (95/100)".into())
        );
        assert_eq!(state_of(&report, "kernel").0, State::Warn);
        assert!(
            report
                .render(Output::Table)
                .starts_with("status: healthy, with 2 warnings\n")
        );
    }

    #[test]
    fn certificates_expired_fail_expiring_warn() {
        let id = "spiffe://cluster.local/ns/shop/sa/cart";
        let mut inputs = healthy_inputs();
        inputs.certs = certs(vec![cert(id, -7200, -1, None)]);
        let report = evaluate(&inputs, now());
        assert!(!report.healthy);
        assert_eq!(
            state_of(&report, "certificates"),
            (State::Fail, format!("expired: {id}"))
        );

        inputs.certs = certs(vec![cert(id, -7200, 600, None)]);
        assert_eq!(
            state_of(&evaluate(&inputs, now()), "certificates"),
            (State::Warn, format!("{id} expires in 10m"))
        );
        inputs.certs = certs(vec![cert(id, -60, 3600, Some("CA unavailable"))]);
        assert_eq!(
            state_of(&evaluate(&inputs, now()), "certificates"),
            (State::Warn, format!("{id} renewal failing: CA unavailable"))
        );
        if let Some(Ok(state)) = &mut inputs.certs {
            state.certificates.clear();
            state.pending.push(PendingState {
                spiffe_id: id.into(),
                identity: "17".into(),
                last_error: None,
                retry_at: None,
            });
        }
        assert_eq!(
            state_of(&evaluate(&inputs, now()), "certificates"),
            (State::Warn, format!("{id} has none yet"))
        );
        inputs.certs = None;
        assert_eq!(
            state_of(&evaluate(&inputs, now()), "certificates").1,
            "none (mutual TLS is off)"
        );
    }

    #[test]
    fn a_lagging_state_file_warns() {
        let mut inputs = healthy_inputs();
        inputs.state_generation = Some(4);
        assert_eq!(state_of(&evaluate(&inputs, now()), "policy").0, State::Warn);
    }

    #[test]
    fn parses_the_health_endpoint_answer() {
        assert_eq!(
            parse_response(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 8\r\n\r\nstarting\n"
            ),
            Some((503, "starting\n".into()))
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\nready\n"),
            Some((200, "ready\n".into()))
        );
        assert_eq!(parse_response(b"SSH-2.0-OpenSSH\r\n"), None);
    }
}
