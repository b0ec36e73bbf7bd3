//! `cargo xtask setup`: installs what a fresh machine lacks to build the
//! kernel programs and run the kernel tests (see docs/development.md).
//! Idempotent: a second run finds everything and says so.
use std::process::Command;

use anyhow::{bail, ensure};

/// Debian packages: Debian's rustc with a prebuilt `core` for the BPF
/// target, LLVM 22 for bpf-linker, bpftool, iproute2 for the tests,
/// iptables for the policy benchmark's baseline, and buildah for the agent's
/// image (`cargo xtask image`: FROM scratch with vfs storage, so it needs no
/// container runtime, overlay or fuse).
const PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    // Clippy of the same rustc, for the kernel crate's lints.
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "buildah",
    // The kernel matrix (`test --kernel`): qemu and busybox for virtme-ng,
    // and the kernels it boots.
    "qemu-system-x86",
    "busybox-static",
    crate::kernels::KERNELS[0].package,
    crate::kernels::KERNELS[1].package,
];
/// virtme-ng, which boots a kernel with this machine's files shared in: a
/// Python package (Debian 12 has none).
const VIRTME_NG: &str = "virtme-ng";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// A tool of the LLVM that `setup` installs for bpf-linker.
pub fn llvm_tool(name: &str) -> String {
    format!("{LLVM_PREFIX}/bin/{name}")
}
/// Debian's rustc, which can build for bpfel-unknown-none.
pub const BPF_RUSTC: &str = "/usr/bin/rustc";
/// Debian's clippy for that rustc (rustup's cannot read its `core`).
pub const BPF_CARGO_CLIPPY: &str = "/usr/bin/cargo-clippy";

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn bpf_linker_ok() -> bool {
    let out = Command::new("bpf-linker").arg("--version").output();
    matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

/// What is missing, in words, or `None` when everything is there.
fn missing() -> Option<String> {
    let packages = missing_packages();
    let mut what = Vec::new();
    if !packages.is_empty() {
        what.push(format!("Debian packages: {}", packages.join(" ")));
    }
    if !bpf_linker_ok() {
        what.push(format!("bpf-linker {BPF_LINKER_VERSION} (feature llvm-22)"));
    }
    if crate::kernels::vng().is_none() {
        what.push(format!("{VIRTME_NG} (pip)"));
    }
    (!what.is_empty()).then(|| what.join("; "))
}

/// Runs setup only when something is missing (what `test` and `demo` call).
pub fn ensure_installed() -> anyhow::Result<()> {
    if missing().is_some() { run() } else { Ok(()) }
}

pub fn run() -> anyhow::Result<()> {
    let Some(what) = missing() else {
        eprintln!("xtask setup: everything is already installed; nothing to do.");
        return Ok(());
    };
    eprintln!("xtask setup: missing {what}");
    let root = Command::new("id").arg("-u").output()?.stdout == b"0\n";
    let apt = Command::new("apt-get").arg("--version").output().is_ok();
    if !root || !apt {
        bail!(
            "cannot install {what}: {}. Install by hand:\n  \
             apt-get install -y {}\n  \
             LLVM_PREFIX={LLVM_PREFIX} LLVM_SYS_221_PREFIX={LLVM_PREFIX} cargo install bpf-linker \
             --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22\n  \
             python3 -m pip install --break-system-packages {VIRTME_NG}",
            if !root {
                "not running as root"
            } else {
                "apt-get is not available"
            },
            PACKAGES.join(" ")
        );
    }
    let packages = missing_packages();
    if !packages.is_empty() {
        eprintln!(
            "xtask setup: step 1/3: Debian packages {}",
            packages.join(" ")
        );
        crate::run(Command::new("apt-get").arg("update"))?;
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&packages)
                .env("DEBIAN_FRONTEND", "noninteractive")
                // The kernels are for VMs, which virtme-ng boots without
                // an initramfs: skip making one (a minute each).
                .env("INITRD", "No"),
        )?;
    } else {
        eprintln!("xtask setup: step 1/3: Debian packages already installed");
    }
    if !bpf_linker_ok() {
        eprintln!(
            "xtask setup: step 2/3: bpf-linker {BPF_LINKER_VERSION} (compiles for a few minutes)"
        );
        crate::run(
            crate::cargo()
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
        )?;
    } else {
        eprintln!("xtask setup: step 2/3: bpf-linker already installed");
    }
    if crate::kernels::vng().is_none() {
        eprintln!("xtask setup: step 3/3: {VIRTME_NG}");
        crate::run(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--break-system-packages"])
                .arg(VIRTME_NG),
        )?;
    } else {
        eprintln!("xtask setup: step 3/3: {VIRTME_NG} already installed");
    }
    ensure!(
        missing().is_none(),
        "setup finished but still missing: {}",
        missing().unwrap_or_default()
    );
    eprintln!("xtask setup: done");
    Ok(())
}
