//! Command-line interface: `run` (the node agent) and the operator commands
//! that read the pinned maps directly, so they work while the agent is down.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::flags::*;
use mesh_policy::{DefaultAction, MeshSettings};

use crate::{
    explain,
    inspect::{self, Output},
};
use mesh_agent::agent;
use mesh_agent::config::{
    CaSource, Config, EndpointsConfig, KubernetesConfig, LogFormat, MtlsConfig,
};
use mesh_common::ShortCircuit;
use mesh_datapath::{DatapathConfig, TcAttach, maps::PinnedMaps};
use mesh_policy::state::NodeState;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Node agent of the in-kernel service mesh"
)]
pub struct Cli {
    /// Pin directory of this node's mesh (on a bpf filesystem).
    #[arg(long, global = true, env = ENV_BPFFS, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,

    /// The agent's socket and the names behind the maps' numbers.
    #[arg(long, global = true, env = ENV_STATE_DIR, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load and attach the kernel programs, pin their
    /// maps and links, and keep them in step until stopped.
    Run(Box<RunArgs>),
    /// Show what the kernel holds, read from the pinned maps.
    Inspect {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
        output: Output,
        #[command(subcommand)]
        what: InspectWhat,
    },
    /// Switch the same-node short-circuit at runtime (`on`: every socket;
    /// `opted-in`: workloads labelled `mesh.dev/short-circuit: enabled`;
    /// `off`), or show it. Open connections keep working either way.
    ShortCircuit {
        #[arg(value_enum)]
        state: SwitchState,
    },
    /// Show the kernel's verdicts as they happen (from the running agent).
    Flows(FlowsArgs),
    /// Draw this node's service map: identities and Services by namespace,
    /// arrows counting connections by verdict and path (same node, mTLS,
    /// plaintext), denials in red. SVG, Graphviz DOT or JSON on stdout.
    Graph(GraphArgs),
    /// Say what policy decides for a connection, and which rule decides it,
    /// from the entries the kernel itself looks up.
    Explain(ExplainArgs),
    /// Create, serve and rotate the mesh's certificate authority.
    #[command(subcommand)]
    Ca(crate::ca::CaCommand),
    /// Print the CustomResourceDefinitions of the mesh's documents
    /// (MeshPolicy, PeerAuthentication, TrafficSplit), for `kubectl apply -f -`.
    Crds,
    /// Say whether this node's mesh is healthy, and why not: the agent,
    /// its readiness, the kernel programs, map fill, certificates. Exits
    /// 0 when healthy, 1 when not.
    Status(StatusArgs),
    /// Print the completion script of a shell (bash, zsh, fish, elvish,
    /// powershell), e.g. `mesh-agent completions bash >
    /// /etc/bash_completion.d/mesh-agent`.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages of `mesh-agent` and each of its commands
    /// (roff) into a directory; `cargo xtask man` calls it.
    #[command(hide = true)]
    ManPages {
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The agent's health endpoint (`run --health-address`); when it does
    /// not answer, `<state-dir>/health.json` says what the agent last knew.
    #[arg(long, default_value = "127.0.0.1:15021", env = ENV_HEALTH_ADDRESS)]
    pub health_address: SocketAddr,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct GraphArgs {
    /// Only connections of this last while (e.g. `5m`; counted per
    /// minute, at most `1h`); all since the agent started when absent.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<std::time::Duration>,
    /// Only connections with an end (or the Service) in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only connections from or to this identity (a SPIFFE ID, a prefix of
    /// one ending in `*`, or `world`).
    #[arg(long)]
    pub identity: Option<String>,
    #[arg(short, long, value_enum, default_value_t = crate::graph::Format::Svg)]
    pub output: crate::graph::Format,
}

/// `--since`: a duration of at most the hour the agent keeps per minute.
fn parse_since(text: &str) -> Result<std::time::Duration, String> {
    let since: std::time::Duration = text
        .parse::<humantime::Duration>()
        .map_err(|e| format!("{e} (e.g. 30s, 5m, 1h)"))?
        .into();
    let most = std::time::Duration::from_secs(mesh_agent::flows::map::WINDOW_MINUTES * 60);
    if since.is_zero() || since > most {
        return Err(format!(
            "{text} is not within 1s..=1h: the agent counts connections per minute for the last hour"
        ));
    }
    Ok(since)
}

#[derive(Debug, clap::Args)]
pub struct FlowsArgs {
    /// Keep printing new events until interrupted.
    #[arg(short, long)]
    pub follow: bool,
    /// Only flows from or to this identity (a SPIFFE ID, a prefix of one
    /// ending in `*`, `world`, or a numeric identity).
    #[arg(long)]
    pub identity: Option<String>,
    /// Only flows with this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<crate::explain::VerdictFilter>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Source: an IP address or a SPIFFE ID.
    #[arg(long)]
    pub from: String,
    /// Destination: an IP address, a SPIFFE ID, or a Service as
    /// `namespace/name:port` (every backend is explained).
    #[arg(long)]
    pub to: String,
    /// The destination port (for a Service, its port number or name when
    /// `--to` does not say it).
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long, value_enum, default_value_t = crate::explain::Proto::Tcp)]
    pub proto: crate::explain::Proto,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// What happens to established connections when policy stops allowing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Established {
    /// They keep running, as with conntrack-based firewalls; only new
    /// connections see the new policy (never short-circuited again, though).
    Keep,
    /// Their packets from other nodes are checked again and dropped.
    Revoke,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// cgroup v2 directory whose sockets the mesh handles (the pods' cgroup
    /// subtree). Defaults to the cgroup2 mount point, found in /proc/mounts.
    #[arg(long, env = ENV_CGROUP)]
    pub cgroup: Option<PathBuf>,

    /// Redirect payload between local sockets, skipping the TCP/IP stack:
    /// for the workloads that opt in (`opted-in`, their label
    /// `mesh.dev/short-circuit: enabled`), every socket (`on`), or none
    /// (`off`); docs/short-circuit.md says which applications it does not
    /// suit. When not given, a restarted agent keeps the setting in force
    /// (an operator's runtime switch survives restarts); a new pin
    /// directory starts with `opted-in`.
    #[arg(long, value_enum, env = ENV_SHORT_CIRCUIT)]
    pub short_circuit: Option<ShortCircuitArg>,

    /// Capacity of the socket maps (only used when they are created).
    #[arg(long, default_value_t = mesh_common::DEFAULT_MAX_SOCKETS, env = ENV_MAX_SOCKETS)]
    pub max_sockets: u32,

    /// Standalone mode: read Workload and MeshPolicy documents from this
    /// directory and apply every change to it (docs/policy.md).
    // Not `conflicts_with = "kubernetes"`: clap would count
    // MESH_KUBERNETES=false as the flag given (checked in Config instead).
    #[arg(long, env = ENV_CONFIG_DIR)]
    pub config_dir: Option<PathBuf>,

    /// Kubernetes mode: workloads from Pods, policy from MeshPolicy and
    /// PeerAuthentication resources (docs/kubernetes.md). Uses the pod's
    /// service account, or --kubeconfig.
    #[arg(long, env = ENV_KUBERNETES, value_parser = clap::builder::FalseyValueParser::new())]
    pub kubernetes: bool,

    /// Kubernetes mode with this kubeconfig instead of the in-cluster
    /// service account.
    #[arg(long, env = ENV_KUBECONFIG)]
    pub kubeconfig: Option<PathBuf>,

    /// Namespace of the Lease that elects the agent writing the documents'
    /// status (default: the root namespace).
    #[arg(long, env = ENV_POD_NAMESPACE, requires = "kubernetes")]
    pub status_lease_namespace: Option<String>,

    /// Kubernetes mode: `enforce` believes a pod's address only inside its
    /// node's `spec.podCIDRs` (where set), so a compromised node cannot
    /// claim other nodes' pods' addresses; `ignore` for a CNI whose address
    /// management does not follow the nodes' podCIDRs (Calico's or Cilium's
    /// own IPAM, say).
    #[arg(long, default_value = "enforce", env = ENV_POD_CIDRS, value_parser = ["enforce", "ignore"], requires = "kubernetes")]
    pub pod_cidrs: String,

    /// This node's name, as workloads' `spec.node` names it (default: the
    /// host name).
    #[arg(long, env = ENV_NODE_NAME)]
    pub node: Option<String>,

    /// Interfaces where traffic from other nodes arrives; a tc program on
    /// each checks it against policy.
    #[arg(long, value_delimiter = ',', env = ENV_INTERFACES)]
    pub interfaces: Vec<String>,

    /// How the tc programs are attached to interfaces: `tcx` links (Linux
    /// 6.6+), `netlink` clsact filters (older kernels), or `auto`, the
    /// best the kernel has (docs/kernels.md).
    #[arg(long, default_value = "auto", env = ENV_TC_ATTACH, value_parser = ["auto", "tcx", "netlink"])]
    pub tc_attach: String,

    /// The SPIFFE trust domain of the mesh's identities.
    #[arg(long, default_value = "cluster.local", env = ENV_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Policies in this namespace select workloads of every namespace.
    #[arg(long, default_value = "mesh-system", env = ENV_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// Verdict for mesh sources when no ALLOW policy selects the destination.
    #[arg(long, default_value = "allow", env = ENV_DEFAULT_POLICY, value_parser = one_of::<DefaultAction>(&DefaultAction::NAMES))]
    pub default_policy: DefaultAction,

    /// Verdict for sources that are not mesh workloads when no ALLOW policy
    /// selects the destination.
    #[arg(long, default_value = "allow", env = ENV_NON_MESH, value_parser = one_of::<DefaultAction>(&DefaultAction::NAMES))]
    pub non_mesh: DefaultAction,

    /// What a policy change does to established connections it now denies.
    #[arg(long, value_enum, default_value_t = Established::Keep, env = ENV_ESTABLISHED)]
    pub established: Established,

    /// Capacity of the endpoints map (only used when it is created).
    #[arg(long, default_value_t = mesh_common::policy::DEFAULT_MAX_ENDPOINTS, env = ENV_MAX_ENDPOINTS)]
    pub max_endpoints: u32,

    /// Capacity of the policy map (only used when it is created).
    #[arg(long, default_value_t = mesh_common::policy::DEFAULT_MAX_POLICY, env = ENV_MAX_POLICY)]
    pub max_policy: u32,

    /// Capacity of the conntrack map (only used when it is created).
    #[arg(long, default_value_t = mesh_common::policy::DEFAULT_MAX_CONNTRACK, env = ENV_MAX_CONNTRACK)]
    pub max_conntrack: u32,

    /// Flow events each source (a workload's address, or a /24 or /64
    /// outside the mesh) may report per second, in bursts of two seconds'
    /// worth; past it events are left out and counted, never the verdicts.
    /// 0: no limit.
    #[arg(long, default_value_t = 1_000, env = ENV_FLOW_EVENTS_PER_SOURCE)]
    pub flow_events_per_source: u32,

    /// The cluster's Service ranges (kube-apiserver's
    /// --service-cluster-ip-range), comma-separated: a connection to an
    /// address in them that is no Service the mesh knows yet is refused
    /// with ECONNREFUSED instead of reaching a backend unjudged through
    /// kube-proxy (docs/services.md).
    #[arg(long, value_delimiter = ',', env = ENV_SERVICE_CIDR)]
    pub service_cidr: Vec<mesh_datapath::cidr::Cidr>,

    /// Log format.
    #[arg(long, default_value = "plain", env = ENV_LOG_FORMAT, value_parser = one_of::<LogFormat>(&LogFormat::NAMES))]
    pub log_format: LogFormat,

    /// Admin endpoint: `/config_dump`, `/logging` (GET shows the log
    /// filter, POST `?level=…` changes it). It can change the agent's
    /// behaviour: keep it on localhost.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDRESS, env = ENV_ADMIN_ADDRESS)]
    pub admin_address: SocketAddr,

    /// Prometheus endpoint: `/metrics`.
    #[arg(long, default_value = DEFAULT_METRICS_ADDRESS, env = ENV_METRICS_ADDRESS)]
    pub metrics_address: SocketAddr,

    /// Probe endpoint: `/live`, and `/ready` (200 once the maps reflect the
    /// current policy, else 503 and why).
    #[arg(long, default_value = DEFAULT_HEALTH_ADDRESS, env = ENV_HEALTH_ADDRESS)]
    pub health_address: SocketAddr,

    #[command(flatten)]
    pub mtls: MtlsArgs,
}

/// Mutual TLS between nodes (docs/mtls.md). On when a CA is given: either
/// one running inside the agent (`--ca-dir`) or the CA service
/// (`--ca-address` with `--node-credentials`).
#[derive(Debug, Clone, clap::Args)]
pub struct MtlsArgs {
    /// Run the mesh CA inside the agent, from this directory (`ca init`).
    /// It signs only identities of this node's workloads, as the service does.
    #[arg(long, conflicts_with = "ca_address", env = ENV_CA_DIR)]
    pub ca_dir: Option<PathBuf>,

    /// The CA service (`ca serve`), as HOST:PORT.
    #[arg(long, requires = "node_credentials", env = ENV_CA_ADDRESS)]
    pub ca_address: Option<String>,

    /// This node's credentials for the CA service (`ca issue-node`):
    /// cert.pem, key.pem and bundle.pem.
    #[arg(long, env = ENV_NODE_CREDENTIALS)]
    pub node_credentials: Option<PathBuf>,

    /// Port of the agent's tunnel listener (HBONE), on every node.
    #[arg(long, default_value_t = 15008, env = ENV_TUNNEL_PORT)]
    pub tunnel_port: u16,

    /// Port of the agent's outbound listener inside each local workload's
    /// network namespace (on its loopback).
    #[arg(long, default_value_t = 15001, env = ENV_OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// Lifetime of the workload certificates the agent asks for.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, env = ENV_SVID_LIFETIME)]
    pub svid_lifetime: std::time::Duration,

    /// Renew each certificate when this fraction of its lifetime has passed.
    #[arg(long, default_value_t = 0.5, env = ENV_RENEW_FRACTION)]
    pub renew_fraction: f64,

    /// Threads that carry the tunnels (their own runtime, apart from the
    /// control plane's). One keeps each tunnel's socket, HTTP/2 and TLS
    /// work on one thread, with no cross-thread wake-ups: the lowest
    /// latency, and about 5 Gbit/s of mTLS per node on a current core.
    /// More carry more tunnels at once on larger nodes.
    #[arg(long, default_value_t = 1, env = ENV_TUNNEL_THREADS)]
    pub tunnel_threads: usize,

    /// Destination ports (comma-separated) whose connections to other
    /// nodes each get a TLS connection of their own, a bulk tunnel: its
    /// records encrypted by the kernel where it has TLS (CONFIG_TLS), its
    /// bytes moved by splice(2). For long transfers (backups, replication,
    /// object storage); each costs a TLS handshake, so short requests are
    /// better off on the pooled HBONE connections all other ports share.
    #[arg(long, value_delimiter = ',', env = ENV_BULK_PORTS)]
    pub bulk_ports: Vec<u16>,
}

#[derive(Debug, Subcommand)]
pub enum InspectWhat {
    /// Established sockets tracked for same-node short-circuit.
    Sockets,
    /// Counters of the kernel programs and how full each map is.
    Stats,
    /// Workload addresses: identity, subject, local or remote.
    Endpoints,
    /// Identities known to this node, with their numbers.
    Identities,
    /// Compiled policy entries, as the kernel looks them up.
    Policy,
    /// Flows seen by the tc programs, with their verdicts.
    Conntrack,
    /// Service addresses the kernel translates, and each one's backends.
    Services,
    /// This node's workload certificates: identity, serial, expiry, renewal.
    Certs,
}

/// Whose sockets the short-circuit is for (docs/short-circuit.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShortCircuitArg {
    /// Nobody's: the node's kill switch.
    Off,
    /// Workloads labelled `mesh.dev/short-circuit: enabled`, both ends.
    OptedIn,
    /// Every socket of the pods' cgroup.
    On,
}

impl From<ShortCircuitArg> for ShortCircuit {
    fn from(arg: ShortCircuitArg) -> Self {
        match arg {
            ShortCircuitArg::Off => ShortCircuit::Off,
            ShortCircuitArg::OptedIn => ShortCircuit::OptedIn,
            ShortCircuitArg::On => ShortCircuit::All,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SwitchState {
    On,
    OptedIn,
    Off,
    Status,
}

impl RunArgs {
    /// The agent's configuration from these flags and the global ones,
    /// checked: flags that exclude each other, ranges, port clashes.
    pub fn into_config(self, bpffs: PathBuf, state_dir: PathBuf) -> anyhow::Result<Config> {
        let args = self;
        let cgroup = match args.cgroup {
            Some(path) => path,
            None => mesh_datapath::cgroup::detect_cgroup2_mount()?,
        };
        anyhow::ensure!(
            !(args.kubernetes && args.config_dir.is_some()),
            "--config-dir (standalone mode) and --kubernetes exclude each other"
        );
        anyhow::ensure!(
            args.kubernetes || args.kubeconfig.is_none(),
            "--kubeconfig needs --kubernetes"
        );
        for (flag, value) in [
            ("--max-sockets", args.max_sockets),
            ("--max-endpoints", args.max_endpoints),
            ("--max-policy", args.max_policy),
            ("--max-conntrack", args.max_conntrack),
        ] {
            anyhow::ensure!(value > 0, "{flag} must be at least 1");
        }
        let node = match args.node {
            Some(node) => node,
            None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        };
        let m = args.mtls;
        let ca = match (m.ca_dir, m.ca_address, m.node_credentials) {
            (Some(ca_dir), None, _) => Some(CaSource::Local { ca_dir }),
            (None, Some(address), Some(node_credentials)) => Some(CaSource::Remote {
                address,
                node_credentials,
            }),
            (None, None, None) => None,
            (None, None, Some(_)) => anyhow::bail!("--node-credentials needs --ca-address"),
            _ => anyhow::bail!("give either --ca-dir or --ca-address, not both"),
        };
        if ca.is_some() {
            anyhow::ensure!(
                m.renew_fraction > 0.0 && m.renew_fraction < 1.0,
                "--renew-fraction must be between 0 and 1 (exclusive), got {}",
                m.renew_fraction
            );
            anyhow::ensure!(
                m.svid_lifetime >= std::time::Duration::from_secs(1),
                "--svid-lifetime must be at least 1s"
            );
            anyhow::ensure!(
                m.tunnel_port != 0 && m.outbound_port != 0 && m.tunnel_port != m.outbound_port,
                "--tunnel-port and --outbound-port must be two different non-zero ports"
            );
            anyhow::ensure!(
                (1..=256).contains(&m.tunnel_threads),
                "--tunnel-threads must be between 1 and 256, got {}",
                m.tunnel_threads
            );
        }
        let bulk_ports = bulk_ports(m.bulk_ports)?;
        let mtls = ca.map(|ca| MtlsConfig {
            ca,
            tunnel_port: m.tunnel_port,
            outbound_port: m.outbound_port,
            svid_lifetime: m.svid_lifetime,
            renew_fraction: m.renew_fraction,
            tunnel_threads: m.tunnel_threads,
            bulk_ports,
        });
        Ok(Config {
            mtls,
            bpffs,
            state_dir,
            datapath: DatapathConfig {
                cgroup,
                interfaces: args.interfaces,
                tc_attach: match args.tc_attach.as_str() {
                    "tcx" => TcAttach::Tcx,
                    "netlink" => TcAttach::Netlink,
                    _ => TcAttach::Auto,
                },
                short_circuit: args.short_circuit.map(ShortCircuit::from),
                revoke_established: args.established == Established::Revoke,
                max_sockets: args.max_sockets,
                max_endpoints: args.max_endpoints,
                max_policy: args.max_policy,
                max_conntrack: args.max_conntrack,
                flow_events_per_source: args.flow_events_per_source,
                service_cidrs: args.service_cidr,
            },
            kubernetes: args.kubernetes.then(|| KubernetesConfig {
                kubeconfig: args.kubeconfig,
                lease_namespace: args
                    .status_lease_namespace
                    .unwrap_or_else(|| args.root_namespace.clone()),
                enforce_pod_cidrs: args.pod_cidrs == "enforce",
            }),
            config_dir: args.config_dir,
            mesh: MeshSettings {
                trust_domain: args.trust_domain,
                node,
                root_namespace: args.root_namespace,
                default_action: args.default_policy,
                non_mesh_action: args.non_mesh,
                // Half the policy map as it is: set when the map is adopted.
                policy_budget: None,
            },
            log_format: args.log_format,
            endpoints: EndpointsConfig {
                admin: args.admin_address,
                metrics: args.metrics_address,
                health: args.health_address,
            },
        })
    }
}

/// Runs the command; `status` exits 1 when the node's mesh is not healthy.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Status(args) = &cli.command {
        let report = crate::status::run(&cli.bpffs, &cli.state_dir, args.health_address);
        print!("{}", report.render(args.output));
        return Ok(if report.healthy {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    run_command(cli).map(|()| ExitCode::SUCCESS)
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let config = args.into_config(cli.bpffs, cli.state_dir)?;
            agent::run(config)
        }
        Command::Inspect {
            output,
            what: InspectWhat::Certs,
        } => {
            // From the agent's state directory: works without pins, and
            // while the agent is down.
            print!("{}", crate::inspect::certs::certs(&cli.state_dir, output)?);
            Ok(())
        }
        Command::Inspect { output, what } => {
            let maps = PinnedMaps::open(&cli.bpffs)?;
            let names = NodeState::read(&cli.state_dir)?;
            let text = match what {
                InspectWhat::Sockets => inspect::sockets(&maps, output)?,
                InspectWhat::Stats => inspect::stats(&maps, output)?,
                InspectWhat::Endpoints => inspect::endpoints(&maps, &names, output)?,
                InspectWhat::Identities => inspect::identities(&maps, &names, output)?,
                InspectWhat::Policy => inspect::policy(&maps, &names, output)?,
                InspectWhat::Conntrack => inspect::conntrack(&maps, &names, output)?,
                InspectWhat::Services => inspect::services(&maps, &names, output)?,
                InspectWhat::Certs => unreachable!("handled above"),
            };
            print!("{text}");
            Ok(())
        }
        Command::Ca(command) => crate::ca::run(command),
        Command::Crds => {
            print!("{}", mesh_agent::k8s::crds::crds_yaml()?);
            Ok(())
        }
        Command::Flows(args) => explain::flows(
            &cli.state_dir,
            explain::FlowsQuery {
                follow: args.follow,
                identity: args.identity,
                verdict: args.verdict,
                output: args.output,
            },
        ),
        Command::Graph(args) => {
            let reply = crate::graph::fetch(&cli.state_dir, args.since)?;
            let filter = crate::graph::Filter {
                namespace: args.namespace,
                identity: args.identity,
            };
            let map = crate::graph::ServiceMap::build(&reply, &filter);
            print!("{}", map.render(args.output)?);
            Ok(())
        }
        Command::Explain(args) => {
            let maps = PinnedMaps::open(&cli.bpffs)?;
            let names = NodeState::read(&cli.state_dir)?;
            let query = explain::Query {
                from: args.from,
                to: args.to,
                port: args.port,
                proto: args.proto,
                output: args.output,
            };
            print!("{}", explain::explain(&maps, &names, &query)?);
            Ok(())
        }
        Command::Status(_) => unreachable!("handled in dispatch"),
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "mesh-agent", &mut std::io::stdout());
            Ok(())
        }
        Command::ManPages { out_dir } => {
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let cli = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cli, &out_dir)
                .with_context(|| format!("writing man pages into {}", out_dir.display()))
        }
        Command::ShortCircuit { state } => {
            let maps = PinnedMaps::open(&cli.bpffs)?;
            match state {
                SwitchState::On => maps.set_short_circuit(ShortCircuit::All)?,
                SwitchState::OptedIn => maps.set_short_circuit(ShortCircuit::OptedIn)?,
                SwitchState::Off => maps.set_short_circuit(ShortCircuit::Off)?,
                SwitchState::Status => {}
            }
            let now = maps
                .short_circuit()
                .context("reading the short-circuit setting")?;
            println!("short-circuit: {}", mesh_datapath::short_circuit_word(now));
            Ok(())
        }
    }
}

/// `--bulk-ports`, sorted, each once; port 0 and long lists refused.
fn bulk_ports(mut ports: Vec<u16>) -> anyhow::Result<Vec<u16>> {
    anyhow::ensure!(
        !ports.contains(&0),
        "--bulk-ports: 0 is not a port a connection can be made to"
    );
    ports.sort_unstable();
    ports.dedup();
    anyhow::ensure!(
        ports.len() <= MAX_BULK_PORTS,
        "--bulk-ports: at most {MAX_BULK_PORTS} ports, got {}",
        ports.len()
    );
    Ok(ports)
}

/// Bulk tunnels are for a few ports that carry long transfers.
const MAX_BULK_PORTS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_duration_within_the_hour_counted() {
        assert_eq!(parse_since("5m"), Ok(std::time::Duration::from_secs(300)));
        assert_eq!(parse_since("1h"), Ok(std::time::Duration::from_secs(3600)));
        for bad in ["0s", "2h", "five", "-1m"] {
            let e = parse_since(bad).expect_err(bad);
            assert!(!e.is_empty(), "{bad}");
        }
        let e = parse_since("90m").unwrap_err();
        assert!(e.contains("last hour"), "{e}");
    }

    #[test]
    fn completions_know_every_command_and_flag() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut cli = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli, "mesh-agent", &mut script);
            let script = String::from_utf8(script).unwrap();
            // fish spells a long flag `-l tunnel-threads`.
            for word in ["inspect", "flows", "explain", "graph", "tunnel-threads"] {
                assert!(script.contains(word), "{shell}: no {word}");
            }
        }
    }

    #[test]
    fn man_pages_cover_each_command() {
        let dir = std::env::temp_dir().join(format!("mesh-man-{}", std::process::id()));
        let cli = Cli::try_parse_from([
            "mesh-agent",
            "man-pages",
            "--out-dir",
            dir.to_str().unwrap(),
        ])
        .unwrap();
        run_command(cli).unwrap();
        let page = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        let top = page("mesh-agent.1");
        assert!(top.contains(".TH mesh-agent 1"), "{top}");
        assert!(page("mesh-agent-flows.1").contains("\\-\\-follow"));
        assert!(page("mesh-agent-run.1").contains("tunnel\\-threads"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `mesh-agent run ARGS`, with the cgroup and node given so that the
    /// machine's own do not matter, made into a configuration.
    fn config(args: &[&str]) -> anyhow::Result<Config> {
        let mut argv = vec!["mesh-agent", "run", "--cgroup", "/cg", "--node", "n1"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv)?;
        let Command::Run(run) = cli.command else {
            unreachable!("a run command")
        };
        run.into_config(cli.bpffs, cli.state_dir)
    }

    fn refused(args: &[&str]) -> String {
        format!("{:#}", config(args).expect_err("accepted"))
    }

    #[test]
    fn the_two_policy_sources_exclude_each_other() {
        let both = refused(&["--config-dir", "/etc/mesh", "--kubernetes"]);
        assert!(both.contains("exclude each other"), "{both}");
        let kubeconfig = refused(&["--kubeconfig", "/k"]);
        assert!(
            kubeconfig.contains("--kubeconfig needs --kubernetes"),
            "{kubeconfig}"
        );
        let k = config(&["--kubernetes", "--kubeconfig", "/k"]).unwrap();
        let k = k.kubernetes.unwrap();
        assert_eq!(k.kubeconfig.as_deref(), Some(std::path::Path::new("/k")));
        // The status lease lives in the root namespace unless told.
        assert_eq!(k.lease_namespace, "mesh-system");
    }

    #[test]
    fn map_capacities_are_at_least_one() {
        for flag in [
            "--max-sockets",
            "--max-endpoints",
            "--max-policy",
            "--max-conntrack",
        ] {
            let error = refused(&[flag, "0"]);
            assert!(
                error.contains(&format!("{flag} must be at least 1")),
                "{error}"
            );
        }
    }

    #[test]
    fn one_certificate_authority_with_sane_lifetimes_and_ports() {
        assert!(
            config(&[]).unwrap().mtls.is_none(),
            "plaintext without a CA"
        );
        let both = refused(&[
            "--ca-dir",
            "/ca",
            "--ca-address",
            "ca:15012",
            "--node-credentials",
            "/c",
        ]);
        assert!(
            both.contains("--ca-dir") && both.contains("--ca-address"),
            "{both}"
        );
        let credentials = refused(&["--node-credentials", "/c"]);
        assert!(
            credentials.contains("--node-credentials needs --ca-address"),
            "{credentials}"
        );
        for (args, says) in [
            (
                &["--renew-fraction", "1"][..],
                "--renew-fraction must be between 0 and 1",
            ),
            (
                &["--renew-fraction", "0"],
                "--renew-fraction must be between 0 and 1",
            ),
            (
                &["--svid-lifetime", "500ms"],
                "--svid-lifetime must be at least 1s",
            ),
            (&["--tunnel-port", "15001"], "two different non-zero ports"),
            (&["--outbound-port", "0"], "two different non-zero ports"),
        ] {
            let error = refused(&[&["--ca-dir", "/ca"], args].concat());
            assert!(error.contains(says), "{args:?}: {error}");
        }
        let remote = config(&["--ca-address", "ca:15012", "--node-credentials", "/c"]).unwrap();
        let mtls = remote.mtls.unwrap();
        assert!(
            matches!(&mtls.ca, CaSource::Remote { address, .. } if address == "ca:15012"),
            "{:?}",
            mtls.ca
        );
        assert_eq!((mtls.tunnel_port, mtls.outbound_port), (15008, 15001));
    }

    #[test]
    fn choices_parse_without_the_types_knowing_clap() {
        let c = config(&[
            "--log-format",
            "json",
            "--default-policy",
            "deny",
            "--established",
            "revoke",
        ])
        .unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.mesh.default_action, DefaultAction::Deny);
        assert_eq!(c.mesh.non_mesh_action, DefaultAction::Allow);
        assert!(c.datapath.revoke_established);
        let error = refused(&["--log-format", "xml"]);
        assert!(error.contains("possible values: plain, json"), "{error}");
    }
}
