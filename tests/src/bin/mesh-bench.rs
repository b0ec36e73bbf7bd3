//! `mesh-bench same-node` (run it with `cargo xtask bench same-node`):
//! plain TCP between two pods against the same pods with the mesh's
//! short-circuit, alternating rounds in one run, medians and ratios.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, ensure};
use clap::Parser;
use mesh_tests::{agent::Agent, topology::TestBed};
use serde_json::{Value, json};

#[derive(Parser)]
struct Cli {
    /// Which benchmark: same-node.
    which: String,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Alternating rounds of each variant.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Ping-pong round trips per round.
    #[arg(long, default_value_t = 20000)]
    pings: usize,
    /// Bytes streamed per throughput round.
    #[arg(long, default_value_t = 2 << 30)]
    stream_bytes: u64,
}

const T: Duration = Duration::from_secs(300);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ensure!(cli.which == "same-node", "unknown benchmark {}", cli.which);
    let latency = hold_cpu_dmalatency();

    let mut bed = TestBed::new("bench")?;
    bed.add_pod(0)?;
    bed.add_pod(0)?;
    let _agent = Agent::start(&bed, &["--short-circuit", "on"])?;
    // Plain: processes outside the mesh's cgroup, which no program sees.
    // Mesh: the same tool inside it, short-circuited.
    let echo = bed.pods[1].addr(false, 8080);
    let sink = bed.pods[1].addr(false, 8081);
    let plain_echo = bed.pods[1].addr(false, 9080);
    let plain_sink = bed.pods[1].addr(false, 9081);
    let _servers = [
        bed.server(1, true, echo, "echo")?,
        bed.server(1, true, sink, "sink")?,
        bed.server(1, false, plain_echo, "echo")?,
        bed.server(1, false, plain_sink, "sink")?,
    ];

    let mut samples: Vec<(&str, Value)> = Vec::new();
    for round in 0..cli.rounds {
        for (variant, in_mesh, echo, sink) in [
            ("plain", false, plain_echo, plain_sink),
            ("mesh", true, echo, sink),
        ] {
            let ping = bed.client(
                0,
                in_mesh,
                &[
                    "pingpong",
                    "--to",
                    &echo.to_string(),
                    "--size",
                    "64",
                    "--count",
                    &cli.pings.to_string(),
                ],
                T,
            )?;
            let stream = bed.client(
                0,
                in_mesh,
                &[
                    "stream",
                    "--to",
                    &sink.to_string(),
                    "--bytes",
                    &cli.stream_bytes.to_string(),
                ],
                T,
            )?;
            eprintln!(
                "round {round} {variant:5}: p50 {:.1} µs, p99 {:.1} µs, {:.2} Gbit/s",
                ping["p50_ns"].as_f64().unwrap() / 1e3,
                ping["p99_ns"].as_f64().unwrap() / 1e3,
                stream["gbit_per_s"].as_f64().unwrap()
            );
            samples.push((variant, json!({ "p50_ns": ping["p50_ns"], "p99_ns": ping["p99_ns"], "gbit_per_s": stream["gbit_per_s"] })));
        }
    }

    let median = |variant: &str, key: &str| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|(n, _)| *n == variant)
            .map(|(_, s)| s[key].as_f64().unwrap())
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let metrics = [
        ("rtt_p50_us", "p50_ns", 1e-3),
        ("rtt_p99_us", "p99_ns", 1e-3),
        ("throughput_gbit_s", "gbit_per_s", 1.0),
    ];
    let mut table = String::from("METRIC             PLAIN     MESH      MESH/PLAIN\n");
    let mut results = serde_json::Map::new();
    for (name, key, scale) in metrics {
        let (plain, mesh) = (median("plain", key) * scale, median("mesh", key) * scale);
        table += &format!("{name:<18} {plain:<9.2} {mesh:<9.2} {:.2}x\n", mesh / plain);
        results.insert(
            name.into(),
            json!({ "plain": plain, "mesh": mesh, "ratio": mesh / plain }),
        );
    }
    let report = json!({
        "benchmark": "same-node",
        "machine": machine(),
        "cpu_dmalatency_held_at_0": latency.is_some(),
        "rounds": cli.rounds,
        "pings_per_round": cli.pings,
        "stream_bytes_per_round": cli.stream_bytes,
        "message_size": 64,
        "medians": results,
        "samples": samples.iter().map(|(n, s)| json!({ "variant": n, "sample": s })).collect::<Vec<_>>(),
    });
    println!(
        "\nsame-node: two pods on one node, {} alternating rounds, medians",
        cli.rounds
    );
    println!(
        "(64-byte ping-pong RTT; single-stream throughput; /dev/cpu_dmalatency held at 0: {})\n",
        latency.is_some()
    );
    print!("{table}");
    std::fs::create_dir_all(&cli.out)?;
    let path = cli.out.join("same-node.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nJSON: {}", path.display());
    Ok(())
}

/// Keeps idle CPUs out of deep sleep while held (as tuned's latency
/// profiles do): waking one adds ~60 µs to a round trip on these VMs.
fn hold_cpu_dmalatency() -> Option<std::fs::File> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dmalatency")
        .ok()?;
    file.write_all(&0i32.to_ne_bytes()).ok()?;
    Some(file)
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown cpu")
        .trim()
        .to_string();
    format!(
        "{} CPUs ({cpu}), kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel.trim()
    )
}
