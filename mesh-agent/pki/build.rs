//! Generates the server side of the CA's gRPC service
//! (`mesh.ca.v1.CertificateAuthority`) from a description in Rust: the
//! messages are hand-written prost structs in `src/service.rs`, so no
//! protoc is needed.

/// `mesh.ca.v1.CertificateAuthority/Sign`, server side only: the client
/// speaks HTTP/2 itself over its own mutual-TLS connection (see
/// `src/service.rs`).
fn main() {
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
