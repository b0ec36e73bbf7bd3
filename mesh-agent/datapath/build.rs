//! Embeds the kernel programs' object into the crate that loads it.
//!
//! The object is built by `cargo xtask build-ebpf` (Debian's rustc and
//! bpf-linker, see docs/development.md). Building without it stops here
//! with the command to run: never a silently empty object.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = match env::var_os("MESH_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("../../target/ebpf/mesh-ebpf.o"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    let len = std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        panic!(
            "\n\nThe mesh's eBPF object is missing: {}\n\
             Build it first with `cargo xtask build-ebpf` \
             (or run `cargo xtask test`, which builds everything).\n\n",
            object.display()
        );
    }
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
}
