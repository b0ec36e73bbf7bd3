//! `mesh-tls-probe`: opens one HBONE tunnel to a node agent the way a peer
//! agent would, with whatever credentials the test hands it (none, another
//! trust domain's, an expired one…), and reports what happened as JSON:
//! the TLS outcome, the certificate the agent served, and the CONNECT
//! response (status and the agent's reason). On 200 it sends `--send` and
//! reads the echo.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};
use serde_json::json;
use sha2::{Digest as _, Sha256};

#[derive(Parser)]
struct Args {
    /// The agent's tunnel listener.
    #[arg(long)]
    agent: SocketAddr,
    /// The destination workload's SPIFFE ID (sent as the server name).
    #[arg(long)]
    server_id: String,
    /// The original destination to CONNECT to.
    #[arg(long)]
    target: SocketAddr,
    /// Client certificate chain (PEM); none: no client certificate.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    /// Bytes to send through an accepted tunnel (expects an echo).
    #[arg(long, default_value = "hello through the tunnel")]
    send: String,
}

/// Records the server's certificate and accepts it: the probe reports what
/// was served, the test judges it.
#[derive(Debug)]
struct Recorder(std::sync::Mutex<Option<Vec<u8>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The mesh's numeric identity of a SPIFFE ID, as in the agent.
fn numeric_identity(id: &str) -> u64 {
    let d = Sha256::digest(id.as_bytes());
    let n = u64::from_be_bytes(d[..8].try_into().unwrap());
    if n < 16 { n + 16 } else { n }
}

fn describe(cert: &[u8]) -> serde_json::Value {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, c)) => {
            let uris: Vec<String> = c
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|san| {
                    san.value
                        .general_names
                        .iter()
                        .filter_map(|n| match n {
                            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({ "serial": c.raw_serial_as_string(), "uris": uris, "issuer": c.issuer().to_string() })
        }
        Err(e) => json!({ "error": e.to_string() }),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let report = match tokio::time::timeout(Duration::from_secs(10), probe(Args::parse())).await {
        Ok(report) => report,
        Err(_) => json!({ "stage": "timeout" }),
    };
    println!("{report}");
}

async fn probe(args: Args) -> serde_json::Value {
    let recorder = Arc::new(Recorder(Default::default()));
    let config = match client_config(&args, recorder.clone()) {
        Ok(c) => c,
        Err(e) => return json!({ "stage": "setup", "error": format!("{e:#}") }),
    };
    let tcp = match tokio::net::TcpStream::connect(args.agent).await {
        Ok(t) => t,
        Err(e) => return json!({ "stage": "connect", "error": e.to_string() }),
    };
    let name = ServerName::try_from(format!(
        "id-{:016x}.mesh.internal",
        numeric_identity(&args.server_id)
    ))
    .unwrap();
    let tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => return json!({ "stage": "tls", "error": e.to_string() }),
    };
    let served = recorder.0.lock().unwrap().clone().map(|c| describe(&c));
    let (send, conn) = match h2::client::handshake(tls).await {
        Ok(x) => x,
        Err(e) => return json!({ "stage": "http2", "served": served, "error": e.to_string() }),
    };
    let conn_task = tokio::spawn(conn);
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(args.target.to_string())
        .body(())
        .unwrap();
    let result = async {
        let mut send = send.clone().ready().await?;
        let (response, mut stream) = send.send_request(request, false)?;
        let response = response.await?;
        let status = response.status().as_u16();
        let reason = response
            .headers()
            .get("x-mesh-reason")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if status != 200 {
            return anyhow::Ok(json!({ "stage": "refused", "status": status, "reason": reason }));
        }
        stream.send_data(bytes::Bytes::from(args.send.clone()), true)?;
        let mut body = response.into_body();
        let mut echo = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            echo.extend_from_slice(&chunk);
        }
        Ok(json!({ "stage": "connected", "status": status, "echo": String::from_utf8_lossy(&echo) }))
    }
    .await;
    conn_task.abort();
    let mut report = match result {
        Ok(r) => r,
        // A refused handshake often surfaces only at the first request.
        Err(e) => json!({ "stage": "http2", "error": format!("{e:#}") }),
    };
    report["served"] = served.unwrap_or(serde_json::Value::Null);
    report
}

fn client_config(args: &Args, recorder: Arc<Recorder>) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(recorder);
    let mut config = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| cert.display().to_string())?
                .collect::<Result<Vec<_>, _>>()?;
            let key =
                PrivateKeyDer::from_pem_file(key).with_context(|| key.display().to_string())?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
