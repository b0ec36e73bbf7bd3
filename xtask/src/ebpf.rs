//! `cargo xtask build-ebpf`: builds the kernel programs with Debian's rustc
//! (which ships a prebuilt `core` for bpfel-unknown-none) and bpf-linker.
//! The agent's build script embeds the result.
use anyhow::ensure;

use crate::{cargo, cargo_tool, run, setup, workspace_root};

pub fn build() -> anyhow::Result<()> {
    let root = workspace_root();
    run(bpf_cargo(cargo())?
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", "bpf-linker")
        .env("RUSTFLAGS", "-C link-arg=--btf -C debuginfo=2"))?;
    let linked = root.join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf");
    ensure!(
        linked.is_file(),
        "the build produced no object at {}",
        linked.display()
    );
    // The DWARF was only needed to generate the BTF, which the loader keeps
    // using (.BTF, .BTF.ext). Without it the object the agent embeds is 80 %
    // smaller, and so is its share of the agent's read-only pages.
    // Written only when the linked object is newer: the agent's build
    // script rebuilds whatever embeds it when its time changes.
    let object = root.join(OBJECT);
    let modified = |path: &std::path::Path| path.metadata().and_then(|m| m.modified()).ok();
    if modified(&object) < modified(&linked) {
        installed(&setup::llvm_tool("llvm-objcopy"))?;
        run(std::process::Command::new(setup::llvm_tool("llvm-objcopy"))
            .arg("--strip-debug")
            .arg(&linked)
            .arg(&object))?;
    }
    eprintln!("xtask: eBPF object at {}", object.display());
    Ok(())
}

/// The kernel programs' object the agent embeds, under the workspace root.
const OBJECT: &str = "target/ebpf/mesh-ebpf.o";

/// Clippy on the kernel crate, warnings denied: Debian's clippy, the one
/// that matches the rustc whose `core` the crate builds against.
pub fn clippy() -> anyhow::Result<()> {
    installed(setup::BPF_CARGO_CLIPPY)?;
    let root = workspace_root();
    let mut cmd = cargo_tool(setup::BPF_CARGO_CLIPPY);
    cmd.arg("clippy");
    run(bpf_cargo(cmd)?
        .args(["--release", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        // Its own directory: check builds must not replace the object.
        .arg(root.join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"]))
}

/// A cargo command in the kernel crate with Debian's rustc.
fn bpf_cargo(mut cmd: std::process::Command) -> anyhow::Result<std::process::Command> {
    installed(setup::BPF_RUSTC)?;
    cmd.current_dir(workspace_root().join("mesh-ebpf"))
        .env("RUSTC", setup::BPF_RUSTC)
        // aya-ebpf uses #![feature(asm_experimental_arch)].
        .env("RUSTC_BOOTSTRAP", "1")
        // The host toolchain's variables must not leak into this build.
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    Ok(cmd)
}

/// Fails, naming the fix, when `setup` has not installed `tool`.
fn installed(tool: &str) -> anyhow::Result<()> {
    ensure!(
        std::path::Path::new(tool).exists(),
        "{tool} is missing: run `cargo xtask setup` first"
    );
    Ok(())
}
