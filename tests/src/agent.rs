//! The node agent as the tests run it: a real `mesh-agent` process, started
//! on the test's cgroup and bpffs, and its CLI.
use std::{
    io::BufRead as _,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    process::{Placement, Spawned},
    topology::{TestBed, sibling_binary},
};

pub fn agent_bin() -> std::path::PathBuf {
    sibling_binary("mesh-agent", "MESH_AGENT_BIN")
}

pub struct Agent {
    process: Spawned,
    log: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts the agent for `bed` and waits until it reports ready.
    pub fn start(bed: &TestBed, extra: &[&str]) -> anyhow::Result<Self> {
        let mut agent = Self::spawn(bed, extra)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if agent.log().contains("ready") {
                return Ok(agent);
            }
            if let Some(status) = agent.process.child_mut().try_wait()? {
                std::thread::sleep(Duration::from_millis(50)); // let the log reader catch up
                anyhow::bail!(
                    "agent exited ({status}) before it was ready:\n{}",
                    agent.log()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "agent not ready after 20 s:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the agent without waiting for it.
    pub fn spawn(bed: &TestBed, extra: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--bpffs")
            .arg(bed.bpffs.pin_dir())
            .arg("run")
            .arg("--cgroup")
            .arg(bed.cgroup.path())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The agent runs in the machine's namespaces, outside the pods' cgroup.
        let mut process = Spawned::spawn(
            cmd,
            &Placement {
                netns: None,
                cgroup: None,
            },
        )?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = process.child_mut().stderr.take().context("agent stderr")?;
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Ok(Self { process, log })
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits for an agent that is expected to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.child_mut().try_wait()? {
                std::thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "agent still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, as Kubernetes stops a pod; returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.process.terminate(Duration::from_secs(10))
    }
}

/// Runs `mesh-agent --bpffs DIR args…` (the operator CLI) and returns stdout.
pub fn cli(pins: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(agent_bin())
        .arg("--bpffs")
        .arg(pins)
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "mesh-agent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// `inspect stats -o json`.
pub fn stats(pins: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&cli(
        pins,
        &["inspect", "stats", "-o", "json"],
    )?)?)
}

/// One counter from `inspect stats`.
pub fn counter(pins: &Path, name: &str) -> anyhow::Result<u64> {
    stats(pins)?["counters"][name]
        .as_u64()
        .with_context(|| format!("no counter {name}"))
}

/// `inspect sockets -o json`.
pub fn sockets(pins: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(serde_json::from_str(&cli(
        pins,
        &["inspect", "sockets", "-o", "json"],
    )?)?)
}
