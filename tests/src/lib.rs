//! Test harness for the mesh's kernel tests, demo and benchmarks.
//!
//! A test builds its own little cluster: "nodes" and "pods" are network
//! namespaces joined by veth pairs, the pods' processes run in a cgroup v2
//! subtree of the test's own, and the agent pins into a bpf filesystem
//! mounted for the test alone. Everything has a name unique to the test and
//! is removed on drop, also when the test panics. Nothing here touches the
//! machine's own namespaces, cgroups or pins, and traffic only flows between
//! the test's namespaces (addresses from 198.18.0.0/15 and fd00::/8).

pub mod agent;
pub mod apiserver;
pub mod binaries;
pub mod bpffs;
pub mod capture;
pub mod cgroup;
pub mod cluster;
pub mod dashboard;
pub mod deploy;
pub mod foreign_tc;
pub mod kube_proxy;
pub mod netns;
pub mod privileges;
pub mod process;
pub mod topology;

use std::sync::atomic::{AtomicU32, Ordering};

/// A name no other test of any concurrent run uses: the prefix, this
/// process's pid and a counter.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Runs a command, failing with its stderr when it does not succeed.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("running {program}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the tests run in a VM of the kernel matrix (`cargo xtask test
/// --kernel …` sets `MESH_TEST_IN_VM`), whose Debian kernels load every
/// program type the mesh uses.
pub fn in_vm() -> bool {
    std::env::var_os("MESH_TEST_IN_VM").is_some()
}

/// How many times slower than native this machine runs the tests: 1, or
/// `MESH_TEST_SLOWDOWN` where it says (the kernel matrix's VMs run under
/// qemu's TCG, where an agent takes half a minute to verify its programs).
/// It stretches how long a test waits for an agent to start, never a bound
/// a test asserts.
pub fn slowdown() -> u32 {
    std::env::var("MESH_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&f| f >= 1)
        .unwrap_or(1)
}
