//! `cargo xtask build-ebpf`: builds the kernel programs with Debian's rustc
//! (which ships a prebuilt `core` for bpfel-unknown-none) and bpf-linker.
//! The agent's build script embeds the result.
use anyhow::ensure;

use crate::{cargo, run, setup, workspace_root};

pub fn build() -> anyhow::Result<()> {
    ensure!(
        std::path::Path::new(setup::BPF_RUSTC).exists(),
        "{} is missing: run `cargo xtask setup` first",
        setup::BPF_RUSTC
    );
    let root = workspace_root();
    run(cargo()
        .current_dir(root.join("mesh-ebpf"))
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env("RUSTC", setup::BPF_RUSTC)
        // aya-ebpf uses #![feature(asm_experimental_arch)].
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", "bpf-linker")
        .env("RUSTFLAGS", "-C link-arg=--btf -C debuginfo=2")
        // The host toolchain's variables must not leak into this build.
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS"))?;
    let object = root.join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf");
    ensure!(
        object.is_file(),
        "the build produced no object at {}",
        object.display()
    );
    eprintln!("xtask: eBPF object at {}", object.display());
    Ok(())
}
