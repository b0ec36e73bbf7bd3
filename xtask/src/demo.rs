//! `cargo xtask demo`: the main job on one machine with no cluster. Two pods
//! (network namespaces) on one node, the agent with the short-circuit on,
//! traffic between the pods, and what the kernel did, from the pinned maps.
use std::time::Duration;

use anyhow::Context as _;
use mesh_tests::{
    agent::{self, Agent},
    topology::TestBed,
};

pub fn run() -> anyhow::Result<()> {
    crate::build_binaries(false)?;
    let mut bed = TestBed::new("demo")?;
    bed.add_pod(0)?;
    bed.add_pod(0)?;
    let pins = bed.bpffs.pin_dir();
    let server_addr = bed.pods[1].addr(false, 8080);
    println!("\n== A node with two pods");
    println!("   pod {} at {}", bed.pods[0].name, bed.pods[0].ip4);
    println!(
        "   pod {} at {} (echo server on {server_addr})",
        bed.pods[1].name, bed.pods[1].ip4
    );

    println!("\n== Starting mesh-agent on the pods' cgroup, short-circuit on");
    let mut agent = Agent::start(&bed, &["--short-circuit", "on"])?;
    println!("   agent pid {}, pins in {}", agent.pid(), pins.display());
    let _server = bed.server(1, true, server_addr, "echo")?;

    println!("\n== Sending 1 B … 16 MiB from pod 0 to pod 1 and checking every echoed byte");
    let to = server_addr.to_string();
    let report = bed.client(
        0,
        true,
        &[
            "transfer",
            "--to",
            &to,
            "--sizes",
            "1,1000,65536,1048576,16777216",
        ],
        Duration::from_secs(120),
    )?;
    println!("   {report}");

    println!("\n== A ping-pong connection is open; the kernel's socket map holds both ends:");
    let pinger = bed.workload(0, &["pingpong", "--to", &to, "--seconds", "2"])?;
    std::thread::sleep(Duration::from_millis(500));
    print_indented(&agent::cli(&pins, &["inspect", "sockets"])?);
    let out = pinger.wait_output(Duration::from_secs(30))?;
    println!(
        "   ping-pong: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );

    println!("\n== What the kernel did (mesh-agent inspect stats):");
    print_indented(&agent::cli(&pins, &["inspect", "stats"])?);

    println!("== Stopping the agent (the programs stay attached) and cleaning up");
    agent.stop().context("stopping the agent")?;
    Ok(())
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("   {line}");
    }
}
