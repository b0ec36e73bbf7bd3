//! `mesh-agent explain` and `mesh-agent flows`: why the kernel decides what
//! it decides.
//!
//! `explain` runs [`mesh_common::policy::decide`] — the very function the
//! kernel programs run — against the pinned maps, so its answer is the
//! kernel's, not a re-interpretation of the documents.
use std::{
    cell::RefCell,
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context as _, bail};
use mesh_common::policy::{
    ANY_IDENTITY, ANY_PORT, ConnectionPath, Endpoint, IpKey, PROTO_TCP, PROTO_UDP, PolicyKey,
    WORLD_IDENTITY, connection_path, decide_for,
};
use serde::Serialize;

use crate::inspect::{Output, json, proto_name};
use mesh_agent::flows::{self, FlowRecord, Request};
use mesh_datapath::maps::PinnedMaps;
use mesh_policy::numeric_identity;
use mesh_policy::state::NodeState;

/// What `explain` is asked: a connection, and how to answer.
#[derive(Debug, Clone)]
pub struct Query {
    /// An IP address or a SPIFFE ID.
    pub from: String,
    /// An IP address, a SPIFFE ID, or a Service: `namespace/name:port`.
    pub to: String,
    /// Required unless `to` is a Service with its port.
    pub port: Option<u16>,
    pub proto: Proto,
    pub output: Output,
}

/// Which of the agent's flow events `flows` prints, and how.
#[derive(Debug, Clone)]
pub struct FlowsQuery {
    pub follow: bool,
    /// A SPIFFE ID, a prefix of one ending in `*`, `world`, or a number.
    pub identity: Option<String>,
    pub verdict: Option<VerdictFilter>,
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictFilter {
    Allow,
    Deny,
    Audit,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub source: String,
    pub source_id: String,
    pub destination: String,
    pub destination_id: String,
    /// Destination workloads this answer covers (one subject).
    pub workloads: Vec<String>,
    pub subject: String,
    pub port: u16,
    pub proto: &'static str,
    pub verdict: &'static str,
    pub rule: u32,
    pub reason: String,
    /// The policy file, when a document's rule decided.
    pub file: Option<String>,
    /// The entry the kernel finds first: "source+port", "source+any port",
    /// "any source+port", "any source+any port", or none (fails closed).
    pub matched_entry: Option<String>,
    /// How the connection travels, and so who proves the source: the
    /// kernel on this node, mutual TLS, or nobody (plaintext).
    pub path: &'static str,
    /// For a Service: `namespace/name` and the address:port dialled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// For a Service: the backend this answer is for, and its share of new
    /// connections (percent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
}

/// A Service named as `namespace/name:port` (the port number of the
/// Service, or its name), if `to` names one.
fn service_target(to: &str) -> Option<(&str, &str)> {
    if to.starts_with("spiffe://") || to.parse::<IpAddr>().is_ok() {
        return None;
    }
    let (service, port) = to.rsplit_once(':').unwrap_or((to, ""));
    service.contains('/').then_some((service, port))
}

/// How a connection from `src` to `dst` travels, as this node sees it, and
/// whether its source is unproven (plaintext, which STRICT refuses):
/// `connection_path`, the function the connect hook (mesh-ebpf enforce.rs)
/// calls, so the two cannot disagree.
fn path(
    names: &NodeState,
    src: u64,
    dst: &Endpoint,
    proto: u8,
    mtls: bool,
) -> (&'static str, bool) {
    let src_on_node = names.workloads.iter().any(|w| w.identity == src && w.local);
    let path = connection_path(dst, src, src_on_node, proto, mtls);
    let text = match path {
        ConnectionPath::NotWorkload => "not a workload: plaintext, known by its address",
        ConnectionPath::SameNode => {
            "same node: the kernel knows the source by its network namespace"
        }
        ConnectionPath::Tunnel => {
            "mTLS tunnel (HBONE): the destination's node checks the source's verified certificate identity against these same entries"
        }
        ConnectionPath::PlaintextFromOtherNode => {
            "plaintext from another node: known only by its address"
        }
        ConnectionPath::PlaintextBetweenNodes => {
            "plaintext between nodes: the destination's node knows the source only by its address"
        }
    };
    (text, path.plaintext())
}

/// The source identity for `--from`.
fn source_identity(maps: &PinnedMaps, from: &str) -> anyhow::Result<u64> {
    if let Ok(ip) = from.parse::<IpAddr>() {
        return Ok(maps
            .endpoint(&IpKey::from(ip))?
            .map_or(WORLD_IDENTITY, |e| e.identity));
    }
    if from == "world" {
        return Ok(WORLD_IDENTITY);
    }
    if from.starts_with("spiffe://") {
        return Ok(numeric_identity(from));
    }
    bail!("--from {from:?} is neither an IP address nor a SPIFFE ID (spiffe://…) nor `world`")
}

/// The destination endpoints for `--to`, one per subject.
fn destinations(
    maps: &PinnedMaps,
    names: &NodeState,
    to: &str,
) -> anyhow::Result<Vec<(Endpoint, Vec<String>)>> {
    let mut found: Vec<(Endpoint, Vec<String>)> = Vec::new();
    let mut add =
        |ep: Endpoint, label: String| match found.iter_mut().find(|(e, _)| e.subject == ep.subject)
        {
            Some((_, labels)) => labels.push(label),
            None => found.push((ep, vec![label])),
        };
    if let Ok(ip) = to.parse::<IpAddr>() {
        let Some(ep) = maps.endpoint(&IpKey::from(ip))? else {
            bail!(
                "{to} is not a mesh workload's address on this node's maps: MeshPolicy does \
                 not govern connections to it"
            );
        };
        let label = names
            .workloads
            .iter()
            .find(|w| w.ips.contains(&ip))
            .map_or(to.to_string(), |w| format!("{}/{}", w.namespace, w.name));
        add(ep, label);
    } else if to.starts_with("spiffe://") {
        let id = numeric_identity(to);
        for w in names.workloads.iter().filter(|w| w.identity == id) {
            if let Some(ip) = w.ips.first()
                && let Some(ep) = maps.endpoint(&IpKey::from(*ip))?
            {
                add(ep, format!("{}/{}", w.namespace, w.name));
            }
        }
        if found.is_empty() {
            bail!("no workload with identity {to} is in this node's maps");
        }
    } else {
        bail!(
            "--to {to:?} is neither an IP address, a SPIFFE ID (spiffe://…) nor a Service (namespace/name:port)"
        );
    }
    Ok(found)
}

/// The kernel's answer for `src` connecting to the workload `dst`.
fn explain_one(
    maps: &PinnedMaps,
    names: &NodeState,
    src: u64,
    (dst, workloads): (Endpoint, Vec<String>),
    port: u16,
    proto: u8,
    mtls: bool,
) -> anyhow::Result<Explanation> {
    let (path, plaintext) = path(names, src, &dst, proto, mtls);
    let failure = RefCell::new(None);
    let matched = RefCell::new(None);
    let verdict = decide_for(&dst, src, port, proto, plaintext, |key| {
        match maps.policy_entry(key) {
            Ok(Some(v)) => {
                *matched.borrow_mut() = Some(*key);
                Some(v)
            }
            Ok(None) => None,
            Err(e) => {
                failure.borrow_mut().get_or_insert(e);
                None
            }
        }
    });
    if let Some(e) = failure.into_inner() {
        return Err(e).context("reading the policy map");
    }
    let rule = names.rules.get(&verdict.rule);
    Ok(Explanation {
        source: names.identity_name(src),
        source_id: src.to_string(),
        destination: names.identity_name(dst.identity),
        destination_id: dst.identity.to_string(),
        workloads,
        subject: format!("{:016x}", dst.subject),
        port,
        proto: proto_name(proto),
        verdict: verdict.action().name(),
        rule: verdict.rule,
        reason: names.rule_name(verdict.rule),
        file: rule.and_then(|r| r.file.clone()),
        matched_entry: matched.into_inner().map(|k: PolicyKey| {
            let s = if k.src_identity == ANY_IDENTITY {
                "any source"
            } else {
                "source"
            };
            let p = if k.port == ANY_PORT {
                "any port"
            } else {
                "port"
            };
            format!("{s}+{p}")
        }),
        path,
        service: None,
        backend: None,
        share: None,
    })
}

/// One answer per backend of the Service `service` (`namespace/name`) on
/// `port` (number or name), as the kernel translates it now.
fn explain_service(
    maps: &PinnedMaps,
    names: &NodeState,
    src: u64,
    (service, port): (&str, &str),
    proto: u8,
    mtls: bool,
) -> anyhow::Result<Vec<Explanation>> {
    let rows = crate::inspect::service_rows(&maps.services()?, &maps.service_backends()?, names);
    let rows: Vec<_> = rows
        .iter()
        .filter(|r| r.service == service && r.protocol == proto_name(proto))
        .filter(|r| {
            port.is_empty()
                || r.address.port().to_string() == port
                || r.port_name.as_deref() == Some(port)
        })
        .collect();
    if rows.is_empty() {
        bail!(
            "no Service {service}{} ({}) in this node's maps (`mesh-agent inspect services` lists them)",
            if port.is_empty() {
                String::new()
            } else {
                format!(" port {port}")
            },
            proto_name(proto)
        );
    }
    let mut answers = Vec::new();
    for row in rows {
        for b in &row.backends {
            let Some(ep) = maps.endpoint(&IpKey::from(b.address.ip()))? else {
                bail!(
                    "backend {} of {service} is not a mesh workload: MeshPolicy does not govern it",
                    b.address
                );
            };
            let label = b.workload.clone().unwrap_or_else(|| b.address.to_string());
            let mut answer = explain_one(
                maps,
                names,
                src,
                (ep, vec![label]),
                b.address.port(),
                proto,
                mtls,
            )?;
            answer.service = Some(format!("{service} {}", row.address));
            answer.backend = Some(b.address.to_string());
            answer.share = Some(b.share);
            answers.push(answer);
        }
        if row.backends.is_empty() {
            bail!(
                "{service} {} has no backend: connections are refused (ECONNREFUSED)",
                row.address
            );
        }
    }
    Ok(answers)
}

pub fn explain(maps: &PinnedMaps, names: &NodeState, args: &Query) -> anyhow::Result<String> {
    let proto = match args.proto {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    };
    let src = source_identity(maps, &args.from)?;
    let mtls = maps.tunnel_port()? != 0;
    let answers = match service_target(&args.to) {
        Some((service, port)) => {
            let port = match (port, args.port) {
                ("", Some(p)) => p.to_string(),
                (port, _) => port.to_string(),
            };
            explain_service(maps, names, src, (service, &port), proto, mtls)?
        }
        None => {
            let port = args.port.filter(|p| *p != 0).context(
                "--port (1-65535) is required unless --to names a Service with its port",
            )?;
            destinations(maps, names, &args.to)?
                .into_iter()
                .map(|dst| explain_one(maps, names, src, dst, port, proto, mtls))
                .collect::<anyhow::Result<_>>()?
        }
    };
    Ok(match args.output {
        Output::Json => json(&answers),
        Output::Table => {
            let mut text = String::new();
            for a in &answers {
                if let (Some(service), Some(backend), Some(share)) =
                    (&a.service, &a.backend, a.share)
                {
                    text += &format!(
                        "via Service {service} -> backend {backend} ({share:.1}% of new connections)\n  "
                    );
                }
                text += &format!(
                    "{verdict}: {src} -> {dst} ({workloads}) port {port}/{proto}\n  decided by: {reason}{file}\n  kernel entry: {entry}\n  path: {path}\n",
                    verdict = a.verdict,
                    src = a.source,
                    dst = a.destination,
                    workloads = a.workloads.join(", "),
                    port = a.port,
                    proto = a.proto,
                    reason = a.reason,
                    file = a.file.as_ref().map_or(String::new(), |f| format!(" ({f})")),
                    entry = a
                        .matched_entry
                        .as_deref()
                        .unwrap_or("none: no policy entry, fails closed"),
                    path = a.path,
                );
            }
            text
        }
    })
}

/// The filter names the end by its SPIFFE ID, or by its number.
fn matches_identity(filter: &str, end: &flows::FlowEnd) -> bool {
    flows::identity_matches(filter, &end.identity) || end.id == filter
}

pub fn flows(state_dir: &Path, args: FlowsQuery) -> anyhow::Result<()> {
    let conn = flows::ask(
        state_dir,
        &Request {
            follow: args.follow,
            ..Request::default()
        },
    )?;
    let verdict = args.verdict.map(|v| match v {
        VerdictFilter::Allow => "ALLOW",
        VerdictFilter::Deny => "DENY",
        VerdictFilter::Audit => "AUDIT",
    });
    let mut out = std::io::stdout().lock();
    let mut header = args.output == Output::Table;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        let record: FlowRecord = serde_json::from_str(&line).context("bad event from the agent")?;
        if verdict.is_some_and(|v| v != record.verdict)
            || args.identity.as_deref().is_some_and(|f| {
                !matches_identity(f, &record.src) && !matches_identity(f, &record.dst)
            })
        {
            continue;
        }
        match args.output {
            Output::Json => writeln!(out, "{line}")?,
            Output::Table => {
                if header {
                    header = false;
                    writeln!(
                        out,
                        "VERDICT HOOK     SOURCE -> DESTINATION PORT/PROTO REASON"
                    )?;
                }
                let end = |e: &flows::FlowEnd| match e.ip {
                    Some(ip) => format!("{} ({ip})", e.identity),
                    None => e.identity.clone(),
                };
                writeln!(
                    out,
                    "{:<7} {:<8} {} -> {} {}/{} {}",
                    record.verdict,
                    record.hook,
                    end(&record.src),
                    match &record.service {
                        // The backend the kernel chose for the Service.
                        Some(service) => format!("{service} -> {}", end(&record.dst)),
                        None => end(&record.dst),
                    },
                    record.dst.port.map_or("*".into(), |p| p.to_string()),
                    record.proto,
                    record.reason
                )?;
                if record.suppressed > 0 {
                    writeln!(
                        out,
                        "        (and {} earlier events of this source left out, {} denials: over --flow-events-per-source)",
                        record.suppressed, record.suppressed_denied
                    )?;
                }
            }
        }
        out.flush()?;
    }
    Ok(())
}
