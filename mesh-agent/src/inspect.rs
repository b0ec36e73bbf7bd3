//! `mesh-agent inspect …`: what the kernel holds, as a table or JSON.
pub mod certs;

use std::net::{IpAddr, SocketAddr};

use mesh_common::{
    Counter, SOCKET_STACK_ONLY, SocketInfo, SocketKey,
    policy::{ENDPOINT_LOCAL, FLOW_OUTBOUND, PROTO_TCP, PROTO_UDP},
};
use serde::Serialize;

use crate::table;
use mesh_datapath::maps::{MapFill, MapsError, PinnedMaps};
use mesh_policy::state::NodeState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// One tracked socket, as operators see it.
#[derive(Debug, Serialize)]
pub struct SocketRow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Network-namespace cookie, for loopback connections only.
    pub netns_cookie: Option<u64>,
    pub cookie: u64,
    pub age_seconds: f64,
    /// `redirect`: messages go straight to the local peer when it is
    /// tracked; `stack`: pinned to the TCP/IP stack.
    pub path: &'static str,
}

fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

pub fn socket_rows(entries: &[(SocketKey, SocketInfo)], now_ns: u64) -> Vec<SocketRow> {
    let mut rows: Vec<SocketRow> = entries
        .iter()
        .map(|(key, info)| SocketRow {
            local: key.local(),
            remote: key.remote(),
            netns_cookie: (key.netns != 0).then_some(key.netns),
            cookie: info.cookie,
            age_seconds: now_ns.saturating_sub(info.established_ns) as f64 / 1e9,
            path: if info.flags & SOCKET_STACK_ONLY != 0 {
                "stack"
            } else {
                "redirect"
            },
        })
        .collect();
    rows.sort_by_key(|r| (r.local, r.remote));
    rows
}

pub fn sockets(maps: &PinnedMaps, output: Output) -> Result<String, MapsError> {
    let rows = socket_rows(&maps.sockets()?, monotonic_ns());
    Ok(match output {
        Output::Json => json(&rows),
        Output::Table => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.local.to_string(),
                        r.remote.to_string(),
                        r.netns_cookie.map_or("-".into(), |c| c.to_string()),
                        r.cookie.to_string(),
                        format!("{:.1}s", r.age_seconds),
                        r.path.to_string(),
                    ]
                })
                .collect();
            table::render(
                &["LOCAL", "REMOTE", "NETNS", "COOKIE", "AGE", "PATH"],
                &cells,
                "No entries found.",
            )
        }
    })
}

#[derive(Debug, Serialize)]
pub struct Stats {
    /// `off`, `opted-in` or `on`.
    pub short_circuit: &'static str,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    pub maps: std::collections::BTreeMap<&'static str, MapFill>,
}

pub fn collect_stats(maps: &PinnedMaps) -> Result<Stats, MapsError> {
    Ok(Stats {
        short_circuit: mesh_datapath::short_circuit_word(maps.short_circuit()?),
        counters: maps
            .counters()?
            .into_iter()
            .map(|(c, v)| (c.name(), v))
            .collect(),
        maps: maps.fill()?.into_iter().collect(),
    })
}

pub fn stats(maps: &PinnedMaps, output: Output) -> Result<String, MapsError> {
    let stats = collect_stats(maps)?;
    Ok(match output {
        Output::Json => json(&stats),
        Output::Table => {
            let mut text = format!("short-circuit: {}\n\n", stats.short_circuit);
            let counters: Vec<Vec<String>> = Counter::ALL
                .iter()
                .map(|c| vec![c.name().to_string(), stats.counters[c.name()].to_string()])
                .collect();
            text += &table::render(&["COUNTER", "VALUE"], &counters, "No counters.");
            text.push('\n');
            let fill: Vec<Vec<String>> = stats
                .maps
                .iter()
                .map(|(name, fill)| {
                    vec![
                        name.to_string(),
                        fill.entries.to_string(),
                        fill.max_entries.to_string(),
                        format!(
                            "{:.1}%",
                            100.0 * fill.entries as f64 / fill.max_entries.max(1) as f64
                        ),
                    ]
                })
                .collect();
            text += &table::render(&["MAP", "ENTRIES", "MAX", "FILL"], &fill, "No maps.");
            text
        }
    })
}

#[derive(Debug, Serialize)]
pub struct EndpointRow {
    pub ip: IpAddr,
    pub identity: String,
    pub id: String,
    pub subject: String,
    pub local: bool,
}

pub fn endpoints(
    maps: &PinnedMaps,
    names: &NodeState,
    output: Output,
) -> Result<String, MapsError> {
    let mut rows: Vec<EndpointRow> = maps
        .endpoints()?
        .into_iter()
        .map(|(key, ep)| EndpointRow {
            ip: IpAddr::from(key),
            identity: names.identity_name(ep.identity),
            id: ep.identity.to_string(),
            subject: format!("{:016x}", ep.subject),
            local: ep.flags & ENDPOINT_LOCAL != 0,
        })
        .collect();
    rows.sort_by_key(|r| r.ip);
    Ok(match output {
        Output::Json => json(&rows),
        Output::Table => table::render(
            &["IP", "IDENTITY", "ID", "SUBJECT", "LOCAL"],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.ip.to_string(),
                        r.identity.clone(),
                        r.id.clone(),
                        r.subject.clone(),
                        if r.local { "yes" } else { "no" }.into(),
                    ]
                })
                .collect::<Vec<_>>(),
            "No entries found.",
        ),
    })
}

#[derive(Debug, Serialize)]
pub struct IdentityRow {
    pub id: String,
    pub spiffe_id: String,
    /// Addresses of this identity in the kernel's endpoints map.
    pub endpoints: usize,
    /// Local workloads' network namespaces with this identity.
    pub local_netns: usize,
}

pub fn identities(
    maps: &PinnedMaps,
    names: &NodeState,
    output: Output,
) -> Result<String, MapsError> {
    let endpoints = maps.endpoints()?;
    let netns = maps.local_netns()?;
    let mut ids: std::collections::BTreeSet<u64> =
        endpoints.iter().map(|(_, e)| e.identity).collect();
    ids.extend(netns.iter().map(|(_, id)| *id));
    let rows: Vec<IdentityRow> = ids
        .into_iter()
        .map(|id| IdentityRow {
            id: id.to_string(),
            spiffe_id: names.identity_name(id),
            endpoints: endpoints.iter().filter(|(_, e)| e.identity == id).count(),
            local_netns: netns.iter().filter(|(_, i)| *i == id).count(),
        })
        .collect();
    Ok(match output {
        Output::Json => json(&rows),
        Output::Table => table::render(
            &["ID", "SPIFFE ID", "ENDPOINTS", "LOCAL NETNS"],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.spiffe_id.clone(),
                        r.endpoints.to_string(),
                        r.local_netns.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
            "No entries found.",
        ),
    })
}

#[derive(Debug, Serialize)]
pub struct PolicyRow {
    pub subject: String,
    /// The destination identity of the subject.
    pub destination: String,
    pub source: String,
    /// 0: any port.
    pub port: u16,
    pub proto: &'static str,
    pub action: &'static str,
    pub rule: u32,
    pub reason: String,
}

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "?",
    }
}

pub fn policy(maps: &PinnedMaps, names: &NodeState, output: Output) -> Result<String, MapsError> {
    let mut entries = maps.policy()?;
    entries.sort_by_key(|(k, _)| *k);
    let rows: Vec<PolicyRow> = entries
        .into_iter()
        .map(|(k, v)| PolicyRow {
            subject: format!("{:016x}", k.subject),
            destination: names
                .subjects
                .get(&k.subject.to_string())
                .map_or("?".into(), |s| names.identity_name(s.identity)),
            source: names.identity_name(k.src_identity),
            port: k.port,
            proto: proto_name(k.proto),
            action: v.action().name(),
            rule: v.rule,
            reason: names.rule_name(v.rule),
        })
        .collect();
    Ok(match output {
        Output::Json => json(&rows),
        Output::Table => table::render(
            &[
                "SUBJECT",
                "DESTINATION",
                "SOURCE",
                "PORT",
                "PROTO",
                "ACTION",
                "RULE",
            ],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.subject.clone(),
                        r.destination.clone(),
                        r.source.clone(),
                        if r.port == 0 {
                            "*".into()
                        } else {
                            r.port.to_string()
                        },
                        r.proto.into(),
                        r.action.into(),
                        r.reason.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
            "No entries found.",
        ),
    })
}

#[derive(Debug, Serialize)]
pub struct ConntrackRow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The identities the verdict was made for (recorded with the flow).
    pub src_identity: String,
    pub dst_identity: String,
    pub proto: &'static str,
    /// `inbound` (judged by policy) or `outbound` (opened by a local workload).
    pub direction: &'static str,
    pub action: &'static str,
    pub reason: String,
    pub generation: u32,
}

pub fn conntrack(
    maps: &PinnedMaps,
    names: &NodeState,
    output: Output,
) -> Result<String, MapsError> {
    let mut rows: Vec<ConntrackRow> = maps
        .conntrack()?
        .into_iter()
        .map(|(k, st)| {
            let outbound = st.flags & FLOW_OUTBOUND != 0;
            ConntrackRow {
                src: k.src(),
                dst: k.dst(),
                src_identity: flow_identity(names, st.src_identity),
                dst_identity: flow_identity(names, st.dst_identity),
                proto: proto_name(k.proto),
                direction: if outbound { "outbound" } else { "inbound" },
                action: st.verdict.action().name(),
                reason: if outbound {
                    "opened by a local workload".into()
                } else {
                    names.rule_name(st.verdict.rule)
                },
                generation: st.generation,
            }
        })
        .collect();
    rows.sort_by_key(|r| (r.src, r.dst));
    Ok(match output {
        Output::Json => json(&rows),
        Output::Table => table::render(
            &[
                "SRC",
                "DST",
                "SRC IDENTITY",
                "DST IDENTITY",
                "PROTO",
                "DIRECTION",
                "ACTION",
                "RULE",
                "GEN",
            ],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.src.to_string(),
                        r.dst.to_string(),
                        r.src_identity.clone(),
                        r.dst_identity.clone(),
                        r.proto.into(),
                        r.direction.into(),
                        r.action.into(),
                        r.reason.clone(),
                        r.generation.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
            "No entries found.",
        ),
    })
}

/// A flow's recorded identity; 0 is a flow migrated from a layout that
/// did not record it, whose workload was gone.
fn flow_identity(names: &NodeState, id: u64) -> String {
    if id == 0 {
        "unknown".into()
    } else {
        names.identity_name(id)
    }
}

pub fn json<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("inspect output serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::ipv4_mapped;

    fn key(local: [u8; 4], lport: u16, remote: [u8; 4], rport: u16) -> SocketKey {
        SocketKey {
            local_ip: ipv4_mapped(u32::from_ne_bytes(local)),
            remote_ip: ipv4_mapped(u32::from_ne_bytes(remote)),
            local_port: lport,
            remote_port: rport,
            _pad: 0,
            netns: 0,
        }
    }

    #[test]
    fn rows_are_sorted_and_show_the_path() {
        let info = |flags| SocketInfo {
            flags,
            policy_generation: 0,
            cookie: 7,
            established_ns: 1_000_000_000,
        };
        let entries = [
            (
                key([198, 18, 0, 2], 80, [198, 18, 0, 1], 40000),
                info(SOCKET_STACK_ONLY),
            ),
            (key([198, 18, 0, 1], 40000, [198, 18, 0, 2], 80), info(0)),
        ];
        let rows = socket_rows(&entries, 3_500_000_000);
        assert_eq!(rows[0].local.to_string(), "198.18.0.1:40000");
        assert_eq!(rows[0].path, "redirect");
        assert_eq!(rows[1].path, "stack");
        assert!((rows[0].age_seconds - 2.5).abs() < 1e-9);
        assert_eq!(rows[0].netns_cookie, None);
    }
}

/// One Service address as the kernel translates it, with the names behind
/// it (from state.json).
#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub address: SocketAddr,
    pub protocol: &'static str,
    /// `namespace/name`, or `-` when state.json does not know the entry.
    pub service: String,
    pub port_name: Option<String>,
    /// The live revision of the backend set.
    pub revision: u16,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub address: SocketAddr,
    /// Slots of the backend set it holds: its weight.
    pub slots: u32,
    /// Share of new connections it gets, in percent.
    pub share: f64,
    pub workload: Option<String>,
    pub node: Option<String>,
    pub identity: Option<String>,
}

pub fn service_rows(
    services: &[(
        mesh_common::service::ServiceKey,
        mesh_common::service::ServiceEntry,
    )],
    backends: &[(
        mesh_common::service::BackendKey,
        mesh_common::service::SockAddr,
    )],
    names: &NodeState,
) -> Vec<ServiceRow> {
    use std::collections::BTreeMap;
    let socket = |ip: [u32; 4], port: u16| {
        let ip = IpAddr::from(mesh_common::policy::IpKey { ip });
        SocketAddr::new(ip, port)
    };
    let mut rows: Vec<ServiceRow> = services
        .iter()
        .map(|(key, entry)| {
            let address = socket(key.ip, key.port);
            let protocol = proto_name(key.proto);
            let info = names.service(key);
            let mut slots: BTreeMap<SocketAddr, u32> = BTreeMap::new();
            for (k, b) in backends {
                if k.service == *key && k.revision == entry.revision && k.slot < entry.slots {
                    *slots.entry(socket(b.ip, b.port)).or_default() += 1;
                }
            }
            let total = f64::from(entry.slots.max(1));
            let backends = slots
                .into_iter()
                .map(|(address, n)| {
                    let known = info.and_then(|s| {
                        s.backends
                            .iter()
                            .find(|b| b.address == address.ip() && b.port == address.port())
                    });
                    BackendRow {
                        address,
                        slots: n,
                        share: f64::from(n) * 100.0 / total,
                        workload: known.map(|b| b.workload.clone()),
                        node: known.map(|b| b.node.clone()),
                        identity: known.map(|b| names.identity_name(b.identity)),
                    }
                })
                .collect();
            ServiceRow {
                address,
                protocol,
                service: info.map_or("-".into(), |s| s.key()),
                port_name: info.and_then(|s| s.port_name.clone()),
                revision: entry.revision,
                backends,
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, a.address).cmp(&(&b.service, b.address)));
    rows
}

pub fn services(maps: &PinnedMaps, names: &NodeState, output: Output) -> Result<String, MapsError> {
    let rows = service_rows(&maps.services()?, &maps.service_backends()?, names);
    Ok(match output {
        Output::Json => json(&rows),
        Output::Table => {
            let mut cells = Vec::new();
            for r in &rows {
                let service = match &r.port_name {
                    Some(port) => format!("{} ({port})", r.service),
                    None => r.service.clone(),
                };
                let address = format!("{}/{}", r.address, r.protocol);
                if r.backends.is_empty() {
                    cells.push(vec![
                        address.clone(),
                        service.clone(),
                        "(none: connections refused)".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                    ]);
                }
                for b in &r.backends {
                    cells.push(vec![
                        address.clone(),
                        service.clone(),
                        b.address.to_string(),
                        format!("{:.1}%", b.share),
                        b.workload.clone().unwrap_or_else(|| "-".into()),
                        b.node.clone().unwrap_or_else(|| "-".into()),
                        b.identity.clone().unwrap_or_else(|| "-".into()),
                    ]);
                }
            }
            table::render(
                &[
                    "SERVICE ADDRESS",
                    "SERVICE",
                    "BACKEND",
                    "SHARE",
                    "WORKLOAD",
                    "NODE",
                    "IDENTITY",
                ],
                &cells,
                "No entries found.",
            )
        }
    })
}
