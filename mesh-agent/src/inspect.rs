//! `mesh-agent inspect …`: what the kernel holds, as a table or JSON.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use mesh_common::{Counter, SOCKET_STACK_ONLY, SocketInfo, SocketKey};
use serde::Serialize;

use crate::{
    datapath::maps::{MapFill, MapsError, PinnedMaps},
    table,
};

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

/// A kernel address (network-byte-order words, IPv4 mapped) as an IP address.
pub fn kernel_ip(words: [u32; 4]) -> IpAddr {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
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
            local: SocketAddr::new(kernel_ip(key.local_ip), key.local_port),
            remote: SocketAddr::new(kernel_ip(key.remote_ip), key.remote_port),
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
    pub short_circuit: bool,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    pub maps: std::collections::BTreeMap<&'static str, MapFill>,
}

pub fn collect_stats(maps: &PinnedMaps) -> Result<Stats, MapsError> {
    Ok(Stats {
        short_circuit: maps.short_circuit()?,
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
            let mut text = format!(
                "short-circuit: {}\n\n",
                if stats.short_circuit { "on" } else { "off" }
            );
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

fn json<T: Serialize>(value: &T) -> String {
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
    fn decodes_kernel_addresses() {
        assert_eq!(
            kernel_ip(ipv4_mapped(u32::from_ne_bytes([198, 18, 0, 1]))).to_string(),
            "198.18.0.1"
        );
        let v6: [u32; 4] = [u32::from_be(0xfd00_0000), 0, 0, u32::from_be(2)];
        assert_eq!(kernel_ip(v6).to_string(), "fd00::2");
    }

    #[test]
    fn rows_are_sorted_and_show_the_path() {
        let info = |flags| SocketInfo {
            flags,
            _pad: 0,
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
