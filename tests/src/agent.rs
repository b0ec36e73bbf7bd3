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
    topology::TestBed,
};

pub use crate::binaries::{agent_bin, previous_agent_bin};

pub struct Agent {
    process: Spawned,
    log: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts the agent for `bed` and waits until it reports ready.
    pub fn start(bed: &TestBed, extra: &[&str]) -> anyhow::Result<Self> {
        Self::wait_ready(Self::spawn(bed, extra)?)
    }

    /// Starts the agent of `node` in standalone mode, as a DaemonSet pod
    /// would run it: in the node's network namespace, on the node's cgroup,
    /// its own pins and state, the bed's config directory, and the uplink
    /// when the nodes are connected. Waits until it reports ready.
    pub fn start_node(bed: &TestBed, node: usize, extra: &[&str]) -> anyhow::Result<Self> {
        Self::wait_ready(Self::spawn_node(bed, node, extra)?)
    }

    pub fn spawn_node(bed: &TestBed, node: usize, extra: &[&str]) -> anyhow::Result<Self> {
        let config_dir = bed.config_dir();
        let mut args = vec!["--config-dir", config_dir.to_str().context("config dir")?];
        args.extend_from_slice(extra);
        Self::spawn_node_with(bed, node, &args)
    }

    /// Starts the agent of `node` in Kubernetes mode, talking to the API
    /// server `kubeconfig` names. Waits until it reports ready.
    pub fn start_node_kubernetes(
        bed: &TestBed,
        node: usize,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::wait_ready(Self::spawn_node_kubernetes(bed, node, kubeconfig, extra)?)
    }

    pub fn spawn_node_kubernetes(
        bed: &TestBed,
        node: usize,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = vec![
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().context("kubeconfig path")?,
        ];
        args.extend_from_slice(extra);
        Self::spawn_node_with(bed, node, &args)
    }

    /// The agent of `node`, its policy source in `args`.
    fn spawn_node_with(bed: &TestBed, node: usize, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_node_as(bed, node, &agent_bin(), args)
    }

    /// Like [`Agent::start_node`] with another build of the agent (the
    /// upgrade tests' previous version); `args` name the policy source.
    pub fn start_node_as(
        bed: &TestBed,
        node: usize,
        bin: &Path,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::wait_ready(Self::spawn_node_as(bed, node, bin, args)?)
    }

    pub fn spawn_node_as(
        bed: &TestBed,
        node: usize,
        bin: &Path,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn_node_cmd(bed, node, Command::new(bin), args)
    }

    /// [`Agent::start_node_kubernetes`] with only the Linux capabilities
    /// `capabilities` (names as in a pod's securityContext, e.g. `NET_ADMIN`):
    /// the agent is started under `setpriv` with that bounding set, so root
    /// holds nothing else, as in a container that drops ALL and adds them.
    pub fn start_node_kubernetes_with_capabilities(
        bed: &TestBed,
        node: usize,
        kubeconfig: &Path,
        capabilities: &[String],
    ) -> anyhow::Result<Self> {
        let mut bounding = vec!["-all".to_string()];
        bounding.extend(
            capabilities
                .iter()
                .map(|c| format!("+{}", c.to_lowercase())),
        );
        let mut cmd = Command::new("setpriv");
        cmd.arg("--bounding-set")
            .arg(bounding.join(","))
            .arg("--")
            .arg(agent_bin());
        let kubeconfig = kubeconfig.to_str().context("kubeconfig path")?;
        let args = ["--kubernetes", "--kubeconfig", kubeconfig];
        Self::wait_ready(Self::spawn_node_cmd(bed, node, cmd, &args)?)
    }

    /// The agent of `node` run by `cmd` (the agent binary, or a wrapper
    /// whose last argument is the binary).
    fn spawn_node_cmd(
        bed: &TestBed,
        node: usize,
        mut cmd: Command,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let n = &bed.nodes[node];
        cmd.arg("--bpffs")
            .arg(bed.pin_dir(node))
            .arg("--state-dir")
            .arg(bed.state_dir(node))
            .arg("run")
            .arg("--cgroup")
            .arg(n.cgroup.path())
            .arg("--node")
            .arg(n.name());
        if bed.has_fabric() {
            cmd.arg("--interfaces").arg(crate::topology::UPLINK);
        }
        cmd.args(args);
        // In the node's cgroup, as the DaemonSet's pod is under the root
        // the programs attach to: the agent's own sockets meet the hooks.
        Self::launch(
            cmd,
            &Placement {
                netns: Some(&n.netns),
                cgroup: Some(&n.cgroup),
            },
        )
    }

    /// Waits until an agent started with a `spawn_*` says it is ready.
    pub fn wait_until_ready(self) -> anyhow::Result<Self> {
        Self::wait_ready(self)
    }

    fn wait_ready(mut agent: Self) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(20) * crate::slowdown();
        loop {
            if agent.says_ready() {
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
                "agent not ready after {} s:\n{}",
                20 * crate::slowdown(),
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
            .arg("--state-dir")
            .arg(bed.state_dir(0))
            .arg("run")
            .arg("--cgroup")
            .arg(bed.cgroup.path())
            .args(extra);
        // The machine's network namespace is shared with other tests'
        // agents (and anything else running there): any free ports for the
        // endpoints, unless `extra` names some.
        for var in [
            "MESH_ADMIN_ADDRESS",
            "MESH_METRICS_ADDRESS",
            "MESH_HEALTH_ADDRESS",
        ] {
            cmd.env(var, "127.0.0.1:0");
        }
        // The agent runs in the machine's namespaces, outside the pods' cgroup.
        Self::launch(
            cmd,
            &Placement {
                netns: None,
                cgroup: None,
            },
        )
    }

    fn launch(mut cmd: Command, placement: &Placement<'_>) -> anyhow::Result<Self> {
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut process = Spawned::spawn(cmd, placement)?;
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

    /// Whether the agent has logged that it is ready (not "not ready").
    pub fn says_ready(&self) -> bool {
        self.log().lines().any(|l| l.ends_with(" ready"))
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

    /// SIGKILL: the agent gets no chance to clean anything up.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.process.child_mut().kill()?;
        self.process.child_mut().wait()?;
        Ok(())
    }

    /// Waits until the log contains `needle` `times` times.
    pub fn wait_log(&self, needle: &str, times: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.log().matches(needle).count() < times {
            anyhow::ensure!(
                Instant::now() < deadline,
                "agent log has no {times}× {needle:?} after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
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

/// The operator CLI for `node` of `bed`: its pins and its state directory
/// (where the names behind the kernel's numbers are).
pub fn node_cli(bed: &TestBed, node: usize, args: &[&str]) -> anyhow::Result<String> {
    let state = bed.state_dir(node).display().to_string();
    let mut all = vec!["--state-dir", &state];
    all.extend_from_slice(args);
    cli(&bed.pin_dir(node), &all)
}

/// The body of `GET /metrics` from the agent of `node` (its default
/// metrics address, 0.0.0.0:15020, in the node's namespace).
pub fn scrape_metrics(bed: &TestBed, node: usize) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let response = bed.nodes[node].netns.run_in(|| {
        let mut tcp = std::net::TcpStream::connect("127.0.0.1:15020")?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        tcp.read_to_string(&mut body)?;
        Ok::<_, std::io::Error>(body)
    })?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(response.clone(), |(_, body)| body.to_string()))
}

/// The value of the sample whose name and labels are exactly `series` in
/// a `/metrics` body.
pub fn metric_sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
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
