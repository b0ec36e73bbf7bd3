//! `mesh-bench soak`: thousands of connections from a pod on node 0 to a
//! pod on node 1, opened through the mutual-TLS tunnels and held for
//! minutes, with a 64-byte ping-pong on a sample of them every second
//! (checked byte for byte). Each agent's resident memory and open
//! descriptors are sampled before, during and after; the report gives the
//! memory each held connection costs each node's agent, and whether memory
//! and descriptors stay flat while the connections are held.
//!
//! The connections come from two clients of half each, the second started
//! once the first holds its half: the RSS growth from idle over all of
//! them is the cost per connection with the agent's fixed costs in it (its
//! pooled tunnel connections, its bounded flow history), and the growth
//! from half to all of them is the marginal cost of one more.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::Args;
use mesh_tests::topology::wait_for_line;
use serde_json::{Value, json};

use super::{cross_node::Cluster, median};

#[derive(Args)]
pub struct Soak {
    /// Connections held at once.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// How long they are held.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Connections given a ping-pong each second, in turn.
    #[arg(long, default_value_t = 100)]
    sample_per_s: usize,
    /// Seconds between samples of the agents' memory and descriptors.
    #[arg(long, default_value_t = 10)]
    every: u64,
}

/// The soak's echo server, in node 1's mesh cgroup (one thread, event
/// loop: the cross-node servers spend a thread on each connection).
const SOAK_ECHO: u16 = 8090;
/// What the issue asks: RSS per held connection per side.
const TARGET_BYTES_PER_CONNECTION: f64 = 2_500.0;

/// One look at both agents.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at_s: f64,
    rss_kib: [u64; 2],
    fds: [u64; 2],
}

pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    super::status_kib(pid, "VmRSS")
}

fn open_fds(pid: u32) -> anyhow::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count() as u64)
}

impl Sample {
    fn take(c: &Cluster, started: Instant) -> anyhow::Result<Self> {
        let pids = [c.agents[0].pid(), c.agents[1].pid()];
        Ok(Self {
            at_s: started.elapsed().as_secs_f64(),
            rss_kib: [rss_kib(pids[0])?, rss_kib(pids[1])?],
            fds: [open_fds(pids[0])?, open_fds(pids[1])?],
        })
    }

    fn json(&self) -> Value {
        json!({
            "at_s": (self.at_s * 10.0).round() / 10.0,
            "rss_kib": self.rss_kib,
            "fds": self.fds,
        })
    }
}

pub fn run(cli: &Soak, out: &Path) -> anyhow::Result<()> {
    ensure!(cli.connections > 0 && cli.seconds > 0, "nothing to hold");
    let cluster = Cluster::start()?;
    progress!("two nodes, a pod on each, agents ready");
    let result = soak(cli, &cluster, out);
    let logs = cluster.save_logs(out)?;
    if let Err(e) = &result {
        for path in &logs {
            eprintln!("agent log: {}", path.display());
        }
        eprintln!("soak failed: {e:#}");
    }
    result
}

fn soak(cli: &Soak, c: &Cluster, out: &Path) -> anyhow::Result<()> {
    c.wait_until_tunnelling(&c.variants())?;
    let to = c.bed.pods[1].addr(false, SOAK_ECHO).to_string();
    let mut server = c
        .bed
        .workload(1, &["async-echo", "--listen", &to])
        .context("starting the echo server")?;
    wait_for_line(&mut server, "listening").context("echo server")?;

    let started = Instant::now();
    // The agents as they are with no connection held (after the checks
    // above opened and closed a few).
    std::thread::sleep(Duration::from_secs(3));
    let idle = Sample::take(c, started)?;
    progress!("idle: {:?}", idle);

    let half = cli.connections / 2;
    let hold = |connections: usize, seconds: u64| {
        let mut client = c.bed.workload(
            0,
            &[
                "hold",
                "--to",
                &to,
                "--connections",
                &connections.to_string(),
                "--seconds",
                &seconds.to_string(),
                "--sample-per-s",
                &(cli.sample_per_s / 2).max(1).to_string(),
            ],
        )?;
        let held = wait_for_line(&mut client, "held").context("holding the connections")?;
        progress!("{}", held.trim());
        anyhow::Ok(client)
    };
    // The first half outlasts the second, which the samples follow.
    let settle = Duration::from_secs(cli.every.max(3));
    let first = hold(half, cli.seconds + 2 * settle.as_secs())?;
    std::thread::sleep(settle);
    let halfway = Sample::take(c, started)?;
    progress!("half held: {:?}", halfway);
    let mut client = hold(cli.connections - half, cli.seconds)?;
    let ramped = Sample::take(c, started)?;

    let mut during = Vec::new();
    loop {
        std::thread::sleep(Duration::from_secs(cli.every));
        if client.child_mut().try_wait()?.is_some() {
            break;
        }
        let s = Sample::take(c, started)?;
        progress!("held: {:?}", s);
        during.push(s);
    }
    let report_of = |client: mesh_tests::process::Spawned| -> anyhow::Result<Value> {
        let output = client.wait_output(Duration::from_secs(120))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("no report from a client: {stdout}"))
    };
    let reports = [report_of(first)?, report_of(client)?];
    let sum = |field: &str| {
        reports
            .iter()
            .filter_map(|r| r[field].as_u64())
            .sum::<u64>()
    };
    let report = json!({
        "ok": reports.iter().all(|r| r["ok"] == true),
        "pings": sum("pings"),
        "failures": sum("failures"),
        "closed": sum("closed"),
        "failed_to_open": sum("failed_to_open"),
        "ramp_ms": reports.iter().map(|r| r["ramp_ms"].clone()).collect::<Vec<_>>(),
    });
    std::thread::sleep(Duration::from_secs(5));
    let after = Sample::take(c, started)?;
    progress!("after: {:?}", after);
    ensure!(!during.is_empty(), "held for less than one sample");

    let per_side = |side: usize| {
        let rss: Vec<f64> = during.iter().map(|s| s.rss_kib[side] as f64).collect();
        let held = median(rss.clone());
        let bytes = (held - idle.rss_kib[side] as f64) * 1024.0 / cli.connections as f64;
        let marginal =
            (held - halfway.rss_kib[side] as f64) * 1024.0 / (cli.connections - half) as f64;
        let (min, max) = rss
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let fds: Vec<u64> = during.iter().map(|s| s.fds[side]).collect();
        json!({
            "node": side,
            "rss_idle_kib": idle.rss_kib[side],
            "rss_ramped_kib": ramped.rss_kib[side],
            "rss_held_median_kib": held,
            "rss_held_min_kib": min,
            "rss_held_max_kib": max,
            "rss_after_kib": after.rss_kib[side],
            "rss_half_held_kib": halfway.rss_kib[side],
            "bytes_per_connection": bytes.round(),
            "marginal_bytes_per_connection": marginal.round(),
            "fds_idle": idle.fds[side],
            "fds_held_min": fds.iter().min(),
            "fds_held_max": fds.iter().max(),
            "fds_after": after.fds[side],
        })
    };
    let sides = [per_side(0), per_side(1)];
    let worst = sides
        .iter()
        .filter_map(|s| s["bytes_per_connection"].as_f64())
        .fold(0f64, f64::max);
    let result = json!({
        "benchmark": "soak",
        "connections": cli.connections,
        "seconds": cli.seconds,
        "sample_per_s": cli.sample_per_s,
        "client": report,
        "sides": sides,
        "target": format!("RSS per held connection ≤ {TARGET_BYTES_PER_CONNECTION} bytes per side"),
        "target_met": worst <= TARGET_BYTES_PER_CONNECTION && report["ok"] == true,
        "samples": std::iter::once(&idle)
            .chain(std::iter::once(&halfway))
            .chain(std::iter::once(&ramped))
            .chain(&during)
            .chain(std::iter::once(&after))
            .map(Sample::json)
            .collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(out)?;
    let path = out.join("soak.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let over_time = |title: &str, unit, key: &str, scale: f64| super::plot::Panel {
        title: title.into(),
        unit,
        x: "seconds",
        series: [(0, "node 0 (clients)"), (1, "node 1 (servers)")]
            .into_iter()
            .map(|(side, name)| {
                let line = result["samples"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| Some((s["at_s"].as_f64()?, s[key][side].as_f64()? * scale)))
                    .collect();
                (name, line)
            })
            .collect(),
    };
    super::plot::beside(
        &path,
        &format!(
            "soak: {} cross-node connections held through the tunnels",
            cli.connections
        ),
        &[
            over_time("agent RSS", "MiB", "rss_kib", 1.0 / 1024.0),
            over_time("agent file descriptors", "fds", "fds", 1.0),
        ],
    )?;
    println!(
        "soak: {} connections held {} s, {} ping-pongs, {} failures, {} closed",
        cli.connections, cli.seconds, report["pings"], report["failures"], report["closed"]
    );
    for s in &sides {
        println!(
            "  node {}: RSS idle {} KiB, half held {} KiB, held {} KiB (min {}, max {}), after {} KiB: {} bytes per connection ({} for one more); fds {}..{} held, {} idle, {} after",
            s["node"],
            s["rss_idle_kib"],
            s["rss_half_held_kib"],
            s["rss_held_median_kib"],
            s["rss_held_min_kib"],
            s["rss_held_max_kib"],
            s["rss_after_kib"],
            s["bytes_per_connection"],
            s["marginal_bytes_per_connection"],
            s["fds_held_min"],
            s["fds_held_max"],
            s["fds_idle"],
            s["fds_after"],
        );
    }
    println!("report: {}", path.display());
    Ok(())
}
