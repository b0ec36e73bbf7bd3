//! `mesh-agent ca …`: create, serve and rotate the mesh CA.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tracing::info;

use mesh_agent::config::LogFormat;
use mesh_agent::signal::ShutdownSignals;

use mesh_pki::{
    authz::{Authorizer, ConfigDirAuthorizer, PodAuthorizer},
    ca::{Ca, CaHandle},
    cert::{CertInfo, rfc3339, spiffe_id_of},
    service::{CaClient, CaServer, NodeCredentials},
    spiffe,
};

#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Create a CA in a new directory: a self-signed root, or an
    /// intermediate signed by a root you bring (--root-cert, --root-key).
    Init(InitArgs),
    /// Write a node's credentials for the CA service (cert.pem, key.pem,
    /// bundle.pem).
    IssueNode(IssueNodeArgs),
    /// Write a certificate and key for any identity of the trust domain
    /// (cert.pem, key.pem, bundle.pem), straight from the CA's key.
    Issue(IssueArgs),
    /// Ask a running CA service for a certificate, as a node would (checks
    /// the node's credentials and what the CA grants it).
    Request(RequestArgs),
    /// Serve the CA over gRPC with mutual TLS: nodes get the certificates
    /// of the workloads that run on them. Runs until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Switch a root CA to a new root; the old roots stay trusted until
    /// `prune`.
    Rotate(RotateArgs),
    /// Stop trusting every root but the one the CA signs with.
    Prune(PruneArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The SPIFFE trust domain of the mesh's identities.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Directory to create the CA in (refused if it already holds one).
    #[arg(long)]
    pub out: PathBuf,
    /// Certificate of the root to sign an intermediate CA with (PEM; may be
    /// followed by its chain up to the root).
    #[arg(long, requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    /// Private key of --root-cert (PEM, PKCS#8, ECDSA P-256).
    #[arg(long, requires = "root_cert")]
    pub root_key: Option<PathBuf>,
    /// Lifetime of the CA certificate (an intermediate never outlives its
    /// root).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10y")]
    pub ca_lifetime: Duration,
}

#[derive(Debug, clap::Args)]
pub struct IssueNodeArgs {
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// The node's name, as workloads' `spec.node` names it.
    #[arg(long)]
    pub node: String,
    /// Directory to write the credentials to.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1y")]
    pub lifetime: Duration,
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// A SPIFFE ID of the CA's trust domain.
    #[arg(long)]
    pub spiffe_id: String,
    /// Directory to write the credentials to.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub lifetime: Duration,
}

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The CA service, host:port.
    #[arg(long)]
    pub ca_address: String,
    /// The node's credentials (from `ca issue-node`).
    #[arg(long)]
    pub node_credentials: PathBuf,
    #[arg(long)]
    pub spiffe_id: String,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub lifetime: Duration,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:15012.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The Workload documents (docs/policy.md) saying which node runs
    /// which workload; re-read when they change.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub config_dir: Option<PathBuf>,
    /// Authorise from the cluster's Pods instead: a node may get the
    /// identity of the pods scheduled to it (docs/deploy.md). Uses the
    /// pod's service account, or --kubeconfig.
    #[arg(long)]
    pub kubernetes: bool,
    /// The cluster's kubeconfig instead of the in-cluster service account.
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Longest lifetime granted to a workload certificate; longer requests
    /// are shortened to it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub max_lifetime: Duration,
    /// Log format.
    #[arg(long, default_value = "plain", env = crate::flags::ENV_LOG_FORMAT, value_parser = crate::flags::one_of::<LogFormat>(&LogFormat::NAMES))]
    pub log_format: LogFormat,
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Lifetime of the new root (default: the old one's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ca_lifetime: Option<Duration>,
}

#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    #[arg(long)]
    pub ca_dir: PathBuf,
}

pub fn run(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init(args) => {
            let root = args.root_cert.as_deref().zip(args.root_key.as_deref());
            let ca = Ca::init(&args.trust_domain, &args.out, root, args.ca_lifetime)?;
            println!(
                "created {} CA of trust domain {} in {} (ca.pem, ca-key.pem, chain.pem, bundle.pem)",
                if ca.is_root() {
                    "a root"
                } else {
                    "an intermediate"
                },
                ca.trust_domain(),
                args.out.display()
            );
            println!("valid until {}", rfc3339(ca.not_after()));
            Ok(())
        }
        CaCommand::IssueNode(args) => {
            let ca = Ca::load(&args.ca_dir)?;
            ca.issue_node(&args.node, args.lifetime, &args.out)?;
            println!(
                "wrote the credentials of {} to {} (cert.pem, key.pem, bundle.pem)",
                spiffe::node_id(ca.trust_domain(), &args.node),
                args.out.display()
            );
            Ok(())
        }
        CaCommand::Issue(args) => {
            let ca = Ca::load(&args.ca_dir)?;
            ca.issue_to(&args.spiffe_id, args.lifetime, &args.out)?;
            println!(
                "wrote the credentials of {} to {} (cert.pem, key.pem, bundle.pem)",
                args.spiffe_id,
                args.out.display()
            );
            Ok(())
        }
        CaCommand::Request(args) => request(args),
        CaCommand::Serve(args) => serve(args),
        CaCommand::Rotate(args) => {
            let ca = Ca::rotate(&args.ca_dir, args.ca_lifetime)?;
            println!(
                "signing with a new root, valid until {}; the bundle trusts {} roots",
                rfc3339(ca.not_after()),
                ca.bundle().len()
            );
            println!(
                "workloads move to the new root as they renew; once every certificate of the \
                 old root has expired or been renewed, run `mesh-agent ca prune --ca-dir {}`",
                args.ca_dir.display()
            );
            Ok(())
        }
        CaCommand::Prune(args) => {
            let (ca, dropped) = Ca::prune(&args.ca_dir)?;
            if dropped.is_empty() {
                println!("nothing to prune: the bundle holds only the signing root");
            }
            for subject in dropped {
                println!("no longer trusted: {subject}");
            }
            for root in ca.bundle() {
                if let Ok(info) = CertInfo::parse(root) {
                    println!("trusted: {}", info.subject);
                }
            }
            Ok(())
        }
    }
}

fn request(args: RequestArgs) -> anyhow::Result<()> {
    let credentials = NodeCredentials::load(&args.node_credentials)?;
    let node_id = spiffe_id_of(&credentials.chain[0])
        .with_context(|| format!("{}: the node certificate", args.node_credentials.display()))?;
    let trust_domain = spiffe::trust_domain_of(&node_id)
        .context("the node certificate's SPIFFE ID has no trust domain")?
        .to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let svid = runtime.block_on(async {
        let client = CaClient::connect(&args.ca_address, credentials, &trust_domain).await?;
        client.sign(&args.spiffe_id, args.lifetime).await
    })?;
    println!(
        "issued {} (serial {}), valid until {}",
        svid.spiffe_id,
        svid.serial,
        rfc3339(svid.not_after)
    );
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    mesh_agent::telemetry::init_logging(args.log_format);
    let ca = CaHandle::load(&args.ca_dir)?;
    let trust_domain = ca.trust_domain();
    let (authorizer, pods): (Arc<dyn Authorizer>, _) = match &args.config_dir {
        Some(dir) => (
            Arc::new(ConfigDirAuthorizer::new(dir, &trust_domain)?),
            None,
        ),
        None => {
            let pods = Arc::new(PodAuthorizer::new(&trust_domain));
            (pods.clone(), Some(pods))
        }
    };
    let server = CaServer::new(ca, authorizer, args.max_lifetime)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut signals = ShutdownSignals::install()?;
        if let Some(pods) = pods {
            let client = mesh_agent::k8s::client(args.kubeconfig.as_deref()).await?;
            tokio::spawn({
                let pods = pods.clone();
                async move { pods.follow(client).await }
            });
            // Listening only once the pods are known: until then every
            // request would be refused, and a readiness probe on the port
            // says when the CA can answer.
            info!("listing the cluster's pods");
            tokio::select! {
                () = pods.wait_listed() => {}
                signal = signals.recv() => {
                    info!(signal, "stopping");
                    return Ok(());
                }
            }
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        info!(
            listen = %listener.local_addr()?,
            trust_domain,
            max_lifetime = %humantime::format_duration(args.max_lifetime),
            "ready"
        );
        server
            .serve(listener, async {
                let signal = signals.recv().await;
                info!(signal, "stopping");
            })
            .await?;
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use mesh_pki::{ca, files, testing::TempDir};

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        ca: CaCommand,
    }

    fn ca(args: &[&str]) -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(std::iter::once("ca").chain(args.iter().copied()))?;
        run(cli.ca)
    }

    #[test]
    fn commands_from_init_to_prune() {
        let dir = TempDir::new("ca-cli");
        let path = |p: &str| dir.path().join(p).display().to_string();
        let ca_dir = path("ca");
        ca(&["init", "--trust-domain", "cluster.local", "--out", &ca_dir]).unwrap();
        let again = ca(&["init", "--out", &ca_dir]).unwrap_err().to_string();
        assert!(again.contains("refusing to overwrite"), "{again}");
        ca(&[
            "init",
            "--out",
            &path("intermediate"),
            "--root-cert",
            &format!("{ca_dir}/ca.pem"),
            "--root-key",
            &format!("{ca_dir}/ca-key.pem"),
            "--ca-lifetime",
            "30d",
        ])
        .unwrap();
        ca(&[
            "issue-node",
            "--ca-dir",
            &ca_dir,
            "--node",
            "node-a",
            "--out",
            &path("node-a"),
        ])
        .unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        ca(&[
            "issue",
            "--ca-dir",
            &ca_dir,
            "--spiffe-id",
            id,
            "--lifetime",
            "5s",
            "--out",
            &path("web"),
        ])
        .unwrap();
        let chain = files::read_certs(&dir.path().join("web").join(ca::NODE_CERT)).unwrap();
        let info = CertInfo::parse(&chain[0]).unwrap();
        assert_eq!(info.uris, vec![id.to_string()]);
        assert!(info.not_after <= std::time::SystemTime::now() + Duration::from_secs(5));
        let e = ca(&[
            "issue",
            "--ca-dir",
            &ca_dir,
            "--spiffe-id",
            "spiffe://other/ns/a/sa/b",
            "--out",
            &path("x"),
        ]);
        assert!(e.is_err());
        ca(&["rotate", "--ca-dir", &ca_dir]).unwrap();
        assert_eq!(
            Ca::load(dir.path().join("ca").as_path())
                .unwrap()
                .bundle()
                .len(),
            2
        );
        ca(&["prune", "--ca-dir", &ca_dir]).unwrap();
        assert_eq!(
            Ca::load(dir.path().join("ca").as_path())
                .unwrap()
                .bundle()
                .len(),
            1
        );
        assert!(
            ca(&[
                "serve",
                "--ca-dir",
                &ca_dir,
                "--listen",
                "nowhere",
                "--config-dir",
                "x"
            ])
            .is_err()
        );
        // One source of authorisations: the documents or the cluster.
        let serve = ["serve", "--ca-dir", &ca_dir, "--listen", "127.0.0.1:0"];
        let e = ca(&serve).unwrap_err().to_string();
        assert!(e.contains("--config-dir"), "{e}");
        let both = [&serve[..], &["--config-dir", "x", "--kubernetes"]].concat();
        let e = ca(&both).unwrap_err().to_string();
        assert!(e.contains("cannot be used with"), "{e}");
    }
}
