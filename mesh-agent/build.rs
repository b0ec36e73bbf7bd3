//! Embeds the kernel programs' object into the agent.
//!
//! The object is built by `cargo xtask build-ebpf` (Debian's rustc and
//! bpf-linker, see docs/development.md). Building the agent without it stops
//! here with the command to run: never a silently empty object.
//!
//! Also generates the server side of the CA's gRPC service
//! (`mesh.ca.v1.CertificateAuthority`) from a description in Rust: the
//! messages are hand-written prost structs in `src/pki/service.rs`, so no
//! protoc is needed.
use std::{env, path::PathBuf};

fn main() {
    ca_service();
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = match env::var_os("MESH_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("../target/ebpf/bpfel-unknown-none/release/mesh-ebpf"),
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

/// `mesh.ca.v1.CertificateAuthority/Sign`, server side only: the client
/// speaks HTTP/2 itself over its own mutual-TLS connection (see
/// `src/pki/service.rs`).
fn ca_service() {
    use tonic_build::manual::{Builder, Method, Service};
    let sign = Method::builder()
        .name("sign")
        .route_name("Sign")
        .input_type("super::SignRequest")
        .output_type("super::SignResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let service = Service::builder()
        .name("CertificateAuthority")
        .package("mesh.ca.v1")
        .method(sign)
        .build();
    Builder::new().build_client(false).compile(&[service]);
}
