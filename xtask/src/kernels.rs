//! `cargo xtask test --kernel <name>|all`: the kernel tests on the kernels
//! users run, each booted in a VM. virtme-ng boots a Debian kernel package
//! with this machine's file system shared in (9p), so the test binaries
//! built here run there unchanged; qemu runs under TCG (this machine's
//! /dev/kvm boots no stock kernel), several times slower than native, so
//! each VM runs a subset that covers every program type and hook, and no
//! figure measured there means anything.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};

/// A kernel of the matrix: its name on the command line, the Debian
/// package `setup` installs for it, and its images' prefix in /boot.
pub struct Kernel {
    pub name: &'static str,
    pub package: &'static str,
    image_prefix: &'static str,
}

/// The kernels booted in VMs. `host` (the running kernel) runs every test
/// natively instead.
pub const KERNELS: [Kernel; 2] = [
    // Debian 12's kernel, and the oldest long-term kernel the mesh supports
    // (no TCX: tc programs are clsact filters there).
    Kernel {
        name: "6.1",
        package: "linux-image-amd64",
        image_prefix: "vmlinuz-6.1.",
    },
    // Debian 12's backports kernel, the newest long-term one.
    Kernel {
        name: "6.12",
        package: "linux-image-6.12-amd64",
        image_prefix: "vmlinuz-6.12.",
    },
];

/// What runs in each VM: a test binary of `tests/` and name filters (any
/// test whose name contains one; all of the binary when none). Together
/// they load and attach every program and hook: the cgroup hooks and
/// sockops (policy), tc on the uplink after another tool's program and
/// on the pods' veths (policy), the packet parser on real frames
/// (ingress_frames), sk_msg (same_node), the tunnels (mtls), a restart on
/// the pins (TCX links or clsact filters, as the kernel has), Kubernetes
/// mode against a real API server (kubernetes), Services behind
/// kube-proxy's iptables rules (services), and kernel TLS (the agent's
/// unit tests of bulk tunnels, `mesh_agent`). Under TCG a test takes 20 to
/// 80 s, so the rest of each file runs on the host only, keeping a run of
/// both kernels near 10 minutes (docs/kernels.md says what ran where).
pub const IN_VM: &[(&str, &[&str])] = &[
    (
        "policy",
        &[
            "connectivity_matrix_six_workloads",
            "another_tc_program_on_the_interface",
            // Restart on the pins, in the kernel's own tc mode.
            "sigkill_keeps_enforcing_and_a_restarted_agent_adopts",
            // TCX used where there is TCX, refused by name where not.
            "asked_for_tcx_the_agent_uses_it_or_refuses_naming_it",
        ],
    ),
    ("ingress_frames", &[]),
    (
        "same_node",
        &[
            "redirected_bytes_arrive_intact",
            "the_self_test_finds_the_redirect_paths_defects",
            // Ignored on a host without the BPF LSM, or that refuses
            // fexit programs; run here.
            "splice_readers_of_short_circuited_sockets",
            "short_circuited_slow_receiver",
        ],
    ),
    (
        "mtls",
        &[
            "flows_report_the_identity_mutual_tls_verified",
            "bulk_ports_get_a_tls_connection_each_with_kernel_tls",
        ],
    ),
    (
        "kubernetes",
        &[
            "mesh_policy_is_enforced",
            // The DaemonSet's capabilities load every program type there.
            "the_daemonsets_capabilities_are_enough",
        ],
    ),
    ("services", &["clients_reach_a_service_by_its_address"]),
    // The agent's own unit tests of bulk tunnels: with kernel TLS here
    // (the host's kernel has no CONFIG_TLS), each asserting it was used.
    ("mesh_agent", &["tunnel::bulk_tests::", "tunnel::ktls::"]),
];

/// How much longer tests wait for an agent to start in a VM: under TCG
/// verifying the programs takes 20 to 30 s.
const SLOWDOWN: u32 = 5;

/// Kernel modules the tests need that Debian builds as modules (the host
/// kernel has them built in): loaded before the tests, so a missing one
/// fails loudly rather than as a test's odd errno.
const MODULES: &[&str] = &[
    "tun",
    "veth",
    "sch_ingress",
    "cls_bpf",
    "cls_matchall",
    "act_gact",
    "tls",
];

/// Where virtme-ng is: the Python package `setup` installs.
pub fn vng() -> Option<PathBuf> {
    let found = Command::new("sh")
        .args(["-c", "command -v vng"])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    (found.status.success() && !path.is_empty()).then(|| path.into())
}

/// The newest image in /boot of `kernel`.
pub fn image(kernel: &Kernel) -> Option<PathBuf> {
    let mut images: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(kernel.image_prefix))
        })
        .collect();
    images.sort_by_key(|p| version_key(p));
    images.pop()
}

/// `vmlinuz-6.1.0-50-amd64` → [6, 1, 0, 50], for ordering.
fn version_key(image: &Path) -> Vec<u64> {
    image
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// The kernels named by `--kernel`: `all`, `host`, or a name of [`KERNELS`].
pub fn select(name: &str) -> anyhow::Result<(bool, Vec<&'static Kernel>)> {
    match name {
        "all" => Ok((true, KERNELS.iter().collect())),
        "host" => Ok((true, Vec::new())),
        "vms" => Ok((false, KERNELS.iter().collect())),
        _ => match KERNELS.iter().find(|k| k.name == name) {
            Some(kernel) => Ok((false, vec![kernel])),
            None => bail!(
                "unknown kernel `{name}` (known: all, host, vms, {})",
                KERNELS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

/// The test binaries of `tests/` and the agent's unit tests, built for the
/// host: name → executable.
/// Asked of the whole workspace, as the host's run builds them: with
/// `--package mesh-tests` alone cargo unifies fewer features and compiles a
/// second copy of a dozen dependencies (80 s of a CI run).
pub fn test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = crate::cargo()
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format",
            "json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the kernel tests")?;
    ensure!(out.status.success(), "building the kernel tests failed");
    let manifest = |crate_dir: &str| {
        crate::workspace_root()
            .join(crate_dir)
            .join("Cargo.toml")
            .display()
            .to_string()
    };
    // (manifest, the kind of target whose test binary runs in VMs)
    let wanted = [(manifest("tests"), "test"), (manifest("mesh-agent"), "lib")];
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(kind) = wanted
            .iter()
            .find(|(m, _)| message["manifest_path"].as_str() == Some(m.as_str()))
            .map(|(_, kind)| *kind)
        else {
            continue;
        };
        let (Some(exe), Some(name), true) = (
            message["executable"].as_str(),
            message["target"]["name"].as_str(),
            message["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind)),
        ) else {
            continue;
        };
        found.push((name.to_string(), PathBuf::from(exe)));
    }
    Ok(found)
}

/// The shell script a VM runs: the modules, then each test binary of
/// [`IN_VM`] with its filters, one test at a time.
fn script(binaries: &[(String, PathBuf)], tests_dir: &Path) -> anyhow::Result<String> {
    let mut script = String::from("set -u\nfailed=0\n");
    for module in MODULES {
        script.push_str(&format!(
            "modprobe {module} || {{ echo 'xtask-vm: cannot load module {module}'; failed=1; }}\n"
        ));
    }
    script.push_str(&format!("cd {}\n", tests_dir.display()));
    for (name, filters) in IN_VM {
        let exe = binaries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, exe)| exe)
            .with_context(|| format!("no test binary `{name}`"))?;
        // libtest runs the tests that match any of its filters; ignored
        // ones too: a test the host's kernel cannot run (the splice guard
        // needs the BPF LSM) is ignored there and run here.
        let filters = filters.join(" ");
        script.push_str(&format!(
            "echo \"xtask-vm: {name} $(date +%T)\"\nCI=true MESH_TEST_IN_VM=1 MESH_TEST_SLOWDOWN={SLOWDOWN} {} --test-threads 1 --include-ignored {filters} || failed=1\n",
            exe.display(),
        ));
    }
    script.push_str("echo \"xtask-vm: done failed=$failed\"\n");
    Ok(script)
}

/// Boots `kernel` and runs the tests of [`IN_VM`] there; the passed and
/// failed counts.
pub fn run(kernel: &Kernel, binaries: &[(String, PathBuf)]) -> anyhow::Result<(u64, u64)> {
    let vng = vng().context(
        "virtme-ng (`vng`) is not installed: `cargo xtask setup` installs it (pip install virtme-ng)",
    )?;
    let image = image(kernel).with_context(|| {
        format!(
            "no kernel {} in /boot: `cargo xtask setup` installs it (Debian package {})",
            kernel.name, kernel.package
        )
    })?;
    let tests_dir = crate::workspace_root().join("tests");
    let script_path = crate::workspace_root().join(format!("target/vm-{}.sh", kernel.name));
    std::fs::write(&script_path, script(binaries, &tests_dir)?)?;
    eprintln!(
        "xtask: kernel {} ({}) in a VM, tests: {}",
        kernel.name,
        image.display(),
        IN_VM.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    );
    let started = Instant::now();
    let mut child = Command::new(vng)
        .arg("--run")
        .arg(&image)
        // Under TCG: the paravirtual KVM here boots no stock kernel.
        .args([
            "--disable-kvm",
            "--force-9p",
            "--memory",
            "4G",
            // One vCPU: the VMs run side by side on two cores, and a guest
            // with more vCPUs than it gets cores spins on the locks its
            // descheduled vCPUs hold (two VMs of two vCPUs each took four
            // times as long as one alone).
            "--cpus",
            "1",
        ])
        .arg("--")
        .arg(format!("sh {}", script_path.display()))
        .stdout(std::process::Stdio::piped())
        // Through a pipe, never our own descriptor: qemu reopens the path
        // of a file it is given (`/proc/self/fd/2`) and would truncate the
        // log that the tests before it wrote to.
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting the VM")?;
    let stderr = child.stderr.take().context("VM stderr")?;
    let name = kernel.name;
    let forward = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            eprintln!("[{name}] {line}");
        }
    });
    let stdout = child.stdout.take().context("VM stdout")?;
    let (mut passed, mut failed, mut done) = (0u64, 0u64, None);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("[{}] {line}", kernel.name);
        if let Some((p, f)) = crate::parse_test_result(&line) {
            passed += p;
            failed += f;
        }
        if let Some(rest) = line.trim().strip_prefix("xtask-vm: done failed=") {
            done = Some(rest.trim() == "0");
        }
    }
    let status = child.wait()?;
    let _ = forward.join();
    eprintln!(
        "xtask: kernel {}: {passed} passed, {failed} failed in {:.0?}",
        kernel.name,
        started.elapsed()
    );
    ensure!(
        done.is_some(),
        "the VM of kernel {} ended ({status}) before its tests did",
        kernel.name
    );
    ensure!(
        done == Some(true) && failed == 0,
        "kernel tests failed on {} ({failed} failed)",
        kernel.name
    );
    ensure!(passed > 0, "no test ran on kernel {}", kernel.name);
    Ok((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_order_by_version_not_by_name() {
        let mut images = [
            "vmlinuz-6.1.0-9-amd64",
            "vmlinuz-6.1.0-50-amd64",
            "vmlinuz-6.1.0-41-amd64",
        ]
        .map(PathBuf::from)
        .to_vec();
        images.sort_by_key(|p| version_key(p));
        assert_eq!(images.last().unwrap(), Path::new("vmlinuz-6.1.0-50-amd64"));
    }

    #[test]
    fn the_script_runs_each_filter_and_reports_failures() {
        let binaries: Vec<(String, PathBuf)> = IN_VM
            .iter()
            .map(|(n, _)| (n.to_string(), PathBuf::from(format!("/t/{n}-abc"))))
            .collect();
        let s = script(&binaries, Path::new("/w/tests")).unwrap();
        assert!(s.contains("modprobe cls_bpf"), "{s}");
        assert!(s.contains(
            "CI=true MESH_TEST_IN_VM=1 MESH_TEST_SLOWDOWN=5 /t/policy-abc --test-threads 1 \
             --include-ignored connectivity_matrix_six_workloads another_tc_program_on_the_interface \
             sigkill_keeps_enforcing_and_a_restarted_agent_adopts \
             asked_for_tcx_the_agent_uses_it_or_refuses_naming_it || failed=1"
        ));
        assert!(s.contains(
            "CI=true MESH_TEST_IN_VM=1 MESH_TEST_SLOWDOWN=5 /t/ingress_frames-abc --test-threads 1 \
             --include-ignored  || failed=1"
        ));
        assert!(s.ends_with("echo \"xtask-vm: done failed=$failed\"\n"));
        assert!(select("5.4").is_err());
        assert_eq!(select("6.12").unwrap().1.len(), 1);
    }
}
