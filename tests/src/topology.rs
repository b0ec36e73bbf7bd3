//! A test's cluster: one "node" (a network namespace with a bridge) per
//! node, "pods" (network namespaces) plugged into their node's bridge by a
//! veth pair, a cgroup per node for its pods' processes (under one for the
//! test), one bpffs for the agents' pins, and a directory of Workload and
//! MeshPolicy documents. Nodes reach each other through a "fabric"
//! namespace: each node's `uplink` interface plugs into its bridge.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    bpffs::TestBpffs,
    cgroup::TestCgroup,
    netns::Netns,
    privileges::require_kernel_test_privileges,
    process::{Placement, Spawned},
    unique_name,
};

pub use crate::binaries::{pod_tool, sibling_binary};

pub struct Pod {
    pub name: String,
    pub netns: Netns,
    pub node: usize,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Pod {
    pub fn addr(&self, v6: bool, port: u16) -> SocketAddr {
        let ip = if v6 {
            IpAddr::V6(self.ip6)
        } else {
            IpAddr::V4(self.ip4)
        };
        SocketAddr::new(ip, port)
    }
}

pub struct Node {
    pub netns: Netns,
    /// The node's pods' processes.
    pub cgroup: TestCgroup,
    /// Third octet of this node's pod subnet, 198.18.<index>.0/24.
    index: u8,
    pods: u8,
}

impl Node {
    /// The node's name, as workloads' `spec.node` says it.
    pub fn name(&self) -> String {
        format!("node-{}", self.index)
    }
}

/// The IPv4 address of node `index` on its uplink.
pub fn node_uplink_ip(index: usize) -> IpAddr {
    Ipv4Addr::new(198, 19, 255, index as u8 + 1).into()
}

/// Whether `ip` is a node's own address on the link between the nodes
/// (198.19.255.0/24, fd00:ffff::/64): where the agents' tunnels end.
pub fn is_uplink_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [198, 19, 255],
        IpAddr::V6(v6) => v6.segments()[..4] == [0xfd00, 0xffff, 0, 0],
    }
}

/// The interface of each node that faces the other nodes.
pub const UPLINK: &str = "uplink";

/// Everything one test creates; removed in reverse order on drop.
pub struct TestBed {
    pub name: String,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    fabric: Option<Netns>,
    // Declared last so they are dropped after the namespaces' processes.
    pub cgroup: TestCgroup,
    pub bpffs: TestBpffs,
    /// Documents for the agents (`--config-dir`) and their state dirs.
    pub files: TempDir,
}

/// A directory under /tmp, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TestBed {
    /// A bed named after the test, with one node.
    pub fn new(test: &str) -> anyhow::Result<Self> {
        require_kernel_test_privileges();
        // Short: interface and netns names end up in error messages.
        let name = unique_name(&format!("mt-{}", &test[..test.len().min(12)]));
        let cgroup = TestCgroup::create(&name)?;
        let bpffs = TestBpffs::mount(&name)?;
        let files = TempDir::new(&name)?;
        std::fs::create_dir_all(files.path().join("config"))?;
        let mut bed = Self {
            name,
            pods: Vec::new(),
            nodes: Vec::new(),
            fabric: None,
            cgroup,
            bpffs,
            files,
        };
        bed.add_node()?;
        Ok(bed)
    }

    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let index = self.nodes.len() as u8;
        let netns = Netns::create(&format!("{}-n{index}", self.name))?;
        add_bridge(&netns)?;
        netns.ip(&["addr", "add", &format!("198.18.{index}.1/24"), "dev", "br0"])?;
        netns.ip(&[
            "addr",
            "add",
            &format!("fd00:0:0:{index}::1/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        netns.ip(&["link", "set", "br0", "up"])?;
        let cgroup = self.cgroup.child(&format!("node-{index}"))?;
        self.nodes.push(Node {
            netns,
            cgroup,
            index,
            pods: 0,
        });
        Ok(self.nodes.len() - 1)
    }

    /// Joins every node to a fabric (a bridge in a namespace of its own)
    /// through an `uplink` interface, with routes to each other's pod
    /// subnets: 198.19.255.<node+1>/24 and fd00:ffff::<node+1>/64 on the
    /// uplinks.
    pub fn connect_nodes(&mut self) -> anyhow::Result<()> {
        let fabric = Netns::create(&format!("{}-fab", self.name))?;
        add_bridge(&fabric)?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        self.fabric = Some(fabric);
        for node in 0..self.nodes.len() {
            self.plug_uplink(node)?;
            let ns = &self.nodes[node].netns;
            ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }
        for node in 0..self.nodes.len() {
            self.route_to_other_nodes(node)?;
        }
        Ok(())
    }

    /// Deletes `node`'s uplink and plugs a new one in its place (a new
    /// interface of the same name, as a CNI re-creating its device or a
    /// re-plugged link makes), with the same addresses and routes.
    pub fn recreate_uplink(&self, node: usize) -> anyhow::Result<()> {
        self.nodes[node].netns.ip(&["link", "del", UPLINK])?;
        self.plug_uplink(node)?;
        self.route_to_other_nodes(node)
    }

    /// A veth from the fabric's bridge to `node`'s `uplink`, addressed and up.
    fn plug_uplink(&self, node: usize) -> anyhow::Result<()> {
        let fabric = self
            .fabric
            .as_ref()
            .context("no fabric: connect_nodes first")?;
        let node = &self.nodes[node];
        let i = node.index;
        let port = format!("n{i}");
        fabric.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            UPLINK,
            "netns",
            node.netns.name(),
        ])?;
        fabric.ip(&["link", "set", &port, "master", "br0", "up"])?;
        let ns = &node.netns;
        // A fixed address: an uplink plugged again is the same neighbour to
        // the other nodes, whose neighbour caches still name it.
        ns.ip(&[
            "link",
            "set",
            UPLINK,
            "address",
            &format!("02:6d:65:73:68:{i:02x}"),
        ])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", node_uplink_ip(i.into())),
            "dev",
            UPLINK,
        ])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("fd00:ffff::{}/64", i + 1),
            "dev",
            UPLINK,
            "nodad",
        ])?;
        ns.ip(&["link", "set", UPLINK, "up"]).map(drop)
    }

    /// Routes from `node` to every other node's pod subnets, via their
    /// uplinks.
    fn route_to_other_nodes(&self, node: usize) -> anyhow::Result<()> {
        let node = &self.nodes[node];
        for other in self.nodes.iter().filter(|o| o.index != node.index) {
            let j = other.index;
            node.netns.ip(&[
                "route",
                "add",
                &format!("198.18.{j}.0/24"),
                "via",
                &format!("198.19.255.{}", j + 1),
            ])?;
            node.netns.ip(&[
                "-6",
                "route",
                "add",
                &format!("fd00:0:0:{j}::/64"),
                "via",
                &format!("fd00:ffff::{}", j + 1),
            ])?;
        }
        Ok(())
    }

    /// The namespace joining the nodes (its port `n<i>` faces node i).
    pub fn fabric(&self) -> Option<&Netns> {
        self.fabric.as_ref()
    }

    /// Whether the nodes have uplinks (and the agents should watch them).
    pub fn has_fabric(&self) -> bool {
        self.fabric.is_some()
    }

    /// The directory of documents the agents read (`--config-dir`).
    pub fn config_dir(&self) -> std::path::PathBuf {
        self.files.path().join("config")
    }

    /// The agent state directory of `node`.
    pub fn state_dir(&self, node: usize) -> std::path::PathBuf {
        self.files.path().join(format!("state-{node}"))
    }

    /// The pin directory of `node`'s agent.
    pub fn pin_dir(&self, node: usize) -> std::path::PathBuf {
        if node == 0 {
            self.bpffs.pin_dir()
        } else {
            self.bpffs
                .pin_dir()
                .with_file_name(format!("mesh-node-{node}"))
        }
    }

    /// Writes a document file into the config directory atomically (a
    /// rename), as `kubectl`-like tools and editors do, so the agent never
    /// reads half a file.
    pub fn write_config(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.files.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.config_dir().join(file))?;
        Ok(())
    }

    /// MeshNode documents for every node (`nodes.yaml`), with the nodes'
    /// uplink addresses, so agents know where to open tunnels.
    pub fn write_mesh_nodes(&self) -> anyhow::Result<()> {
        let nodes: Vec<String> = (0..self.nodes.len())
            .map(|n| {
                format!(
                    "apiVersion: mesh.dev/v1alpha1\nkind: MeshNode\nmetadata: {{name: {}}}\nspec: {{addresses: [{}]}}\n",
                    self.nodes[n].name(),
                    node_uplink_ip(n)
                )
            })
            .collect();
        self.write_config("nodes.yaml", &nodes.join("---\n"))
    }

    /// A new mesh CA (`mesh-agent ca init`) for `trust_domain`, in the
    /// test's files; its directory.
    pub fn mesh_ca(&self, trust_domain: &str) -> anyhow::Result<std::path::PathBuf> {
        let ca = self.files.path().join("ca");
        let out = Command::new(crate::binaries::agent_bin())
            .args(["ca", "init", "--trust-domain", trust_domain, "--out"])
            .arg(&ca)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "ca init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(ca)
    }

    pub fn remove_config(&self, file: &str) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.config_dir().join(file))?)
    }

    /// A Workload document for `pod` (one file per pod, `workload-<pod>.yaml`).
    pub fn register_workload(
        &self,
        pod: usize,
        namespace: &str,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let p = &self.pods[pod];
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let yaml = format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: pod-{pod}\n  namespace: {namespace}\n  labels: {{{labels}}}\nspec:\n  serviceAccount: {service_account}\n  ips: [\"{}\", \"{}\"]\n  node: {}\n  netns: /run/netns/{}\n",
            p.ip4,
            p.ip6,
            self.nodes[p.node].name(),
            p.netns.name()
        );
        self.write_config(&format!("workload-{pod}.yaml"), &yaml)
    }

    /// Adds a pod to `node`, with the next free addresses of its subnet.
    pub fn add_pod(&mut self, node: usize) -> anyhow::Result<&Pod> {
        let n = &mut self.nodes[node];
        n.pods += 1;
        let host = 10 + n.pods;
        let name = format!("{}-p{}-{host}", self.name, n.index);
        let netns = Netns::create(&name)?;
        let veth = format!("veth{host}");
        n.netns.ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ])?;
        n.netns.ip(&["link", "set", &veth, "master", "br0", "up"])?;
        let ip4 = Ipv4Addr::new(198, 18, n.index, host);
        let ip6: Ipv6Addr = format!("fd00:0:0:{}::{host}", n.index).parse()?;
        netns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{}.1", n.index),
        ])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:0:0:{}::1", n.index),
        ])?;
        self.pods.push(Pod {
            name,
            netns,
            node,
            ip4,
            ip6,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// A mesh workload: runs `mesh-pod args…` in the pod and in the mesh's cgroup.
    pub fn workload(&self, pod: usize, args: &[&str]) -> anyhow::Result<Spawned> {
        self.pod_process(pod, args, true)
    }

    /// The same tool, in the pod but outside the mesh's cgroup.
    pub fn outsider(&self, pod: usize, args: &[&str]) -> anyhow::Result<Spawned> {
        self.pod_process(pod, args, false)
    }

    fn pod_process(&self, pod: usize, args: &[&str], in_mesh: bool) -> anyhow::Result<Spawned> {
        self.pod_process_to(pod, args, in_mesh, Stdio::piped())
    }

    fn pod_process_to(
        &self,
        pod: usize,
        args: &[&str],
        in_mesh: bool,
        stderr: Stdio,
    ) -> anyhow::Result<Spawned> {
        let mut cmd = Command::new(pod_tool());
        cmd.args(args).stdout(Stdio::piped()).stderr(stderr);
        Spawned::spawn(
            cmd,
            &Placement {
                netns: Some(&self.pods[pod].netns),
                cgroup: in_mesh.then_some(&self.nodes[self.pods[pod].node].cgroup),
            },
        )
    }

    /// Starts a server in `pod` and waits until it listens. Its stderr
    /// (a line per failed connection) goes to a file in the bed's
    /// directory: nobody reads a server's pipe, and once thousands of reset
    /// connections had filled one, every connection thread blocked on it
    /// and the server stopped answering.
    pub fn server(
        &self,
        pod: usize,
        in_mesh: bool,
        addr: SocketAddr,
        mode: &str,
    ) -> anyhow::Result<Spawned> {
        let listen = addr.to_string();
        let log = self.files.path().join(format!(
            "server-{}-{}-{mode}.log",
            self.pods[pod].name,
            addr.port()
        ));
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut server = self.pod_process_to(
            pod,
            &["serve", "--listen", &listen, "--mode", mode],
            in_mesh,
            stderr.into(),
        )?;
        wait_for_line(&mut server, "listening").context("server did not start")?;
        Ok(server)
    }

    /// Runs a client to completion and returns its JSON report; fails when
    /// it exits non-zero (the tool exits non-zero on any byte mismatch).
    pub fn client(
        &self,
        pod: usize,
        in_mesh: bool,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let client = self.pod_process(pod, args, in_mesh)?;
        let out = client.wait_output(timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "client {args:?} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("client printed no JSON report: {stdout}"))
    }

    /// `mesh-pod probe` of `target` (`tcp:ADDR`, …) from `pod` in the mesh,
    /// repeated for `ms` (or until SIGTERM); read its counts with
    /// [`probe_counts`].
    pub fn start_probing(&self, pod: usize, target: &str, ms: u64) -> anyhow::Result<Spawned> {
        let ms = ms.to_string();
        let args = [
            "probe",
            "--targets",
            target,
            "--timeout-ms",
            "1000",
            "--repeat-ms",
            &ms,
        ];
        let mut probe = self.workload(pod, &args)?;
        wait_for_line(&mut probe, "probing")?;
        Ok(probe)
    }

    /// One connection attempt from `pod` (in the mesh, or outside its
    /// cgroup) to `target` (`tcp:ADDR` or `udp:ADDR`): `connected`, `eperm`,
    /// `refused`, `timeout`…, as `mesh-pod probe` says.
    pub fn probe(
        &self,
        pod: usize,
        in_mesh: bool,
        target: &str,
        timeout_ms: u64,
    ) -> anyhow::Result<String> {
        let timeout = timeout_ms.to_string();
        let args = ["probe", "--targets", target, "--timeout-ms", &timeout];
        let report = self.client(pod, in_mesh, &args, Duration::from_secs(120))?;
        report["results"][target]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no result for {target}: {report}"))
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        // Anything still running in our cgroup was started by this test.
        let _ = std::fs::write(self.cgroup.path().join("cgroup.kill"), "1");
        // Pods before nodes: the veth pairs go with the pod namespaces.
        self.pods.clear();
        self.fabric = None;
        self.nodes.clear();
    }
}

/// A bridge `br0` in `ns`. No multicast snooping: until it has heard MLD
/// reports it would not forward IPv6 neighbour solicitations reliably.
fn add_bridge(ns: &Netns) -> anyhow::Result<()> {
    ns.ip(&[
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ])?;
    Ok(())
}

/// Result → how often it came up, for the one target of a probe started
/// with [`TestBed::start_probing`], once it has finished.
pub fn probe_counts(
    probe: Spawned,
    timeout: Duration,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let out = probe.wait_output(timeout)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .with_context(|| format!("probe printed no report: {text}"))?;
    let counts = report["counts"]
        .as_object()
        .and_then(|targets| targets.values().next())
        .with_context(|| format!("no counts in {report}"))?;
    Ok(serde_json::from_value(counts.clone())?)
}

/// Reads the process's stdout until a line starting with `prefix`.
pub fn wait_for_line(process: &mut Spawned, prefix: &str) -> anyhow::Result<String> {
    use std::io::BufRead as _;
    let stdout = process
        .child_mut()
        .stdout
        .as_mut()
        .context("stdout not captured")?;
    // The tool prints its readiness line at once; a bounded read is enough.
    let mut reader = std::io::BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        anyhow::ensure!(reader.read_line(&mut line)? > 0, "exited before `{prefix}`");
        if line.starts_with(prefix) {
            return Ok(line);
        }
    }
}
