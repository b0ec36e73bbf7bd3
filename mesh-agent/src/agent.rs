//! `mesh-agent run`: the node agent's lifecycle.
use std::{os::fd::AsFd as _, path::Path, time::Duration};

use anyhow::Context as _;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::{error, info};

use crate::{
    config::{Config, LogFormat},
    control::Control,
    datapath::{Datapath, maps::PinnedMaps, pins::PinDir},
    flows::{self, FlowHub},
    health::Health,
    k8s,
    mtls::Mtls,
    state::NodeState,
};

/// Editors and `kubectl`-like tools write a file in several steps; changes
/// that arrive within this window are applied together.
const SETTLE: Duration = Duration::from_millis(5);

/// How long a new agent waits for its workloads' certificates before it
/// says it is ready anyway (tunnels of workloads without one are refused).
const CERTIFICATES_WAIT: Duration = Duration::from_secs(10);

/// How long open tunnels may run on after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub fn run(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_format);
    info!(
        config = %serde_json::to_string(&config)?,
        node = %config.mesh.node,
        trust_domain = %config.mesh.trust_domain,
        default_policy = ?config.mesh.default_action,
        non_mesh = ?config.mesh.non_mesh_action,
        "starting mesh-agent {}", env!("CARGO_PKG_VERSION")
    );

    let pins = PinDir::lock(&config.bpffs)?;
    let _datapath = Datapath::install(&config, &pins)?;

    // Two workers: tunnels encrypt and copy on one while the other serves
    // the control loop and the flows (these machines have two cores; more
    // threads than cores only add wake-ups).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let hub = FlowHub::new();
        hub.set_names(NodeState::read(&config.state_dir).unwrap_or_default());
        tokio::spawn(log_failure(
            "flow events",
            hub.clone().read_kernel_events(config.bpffs.clone()),
        ));
        tokio::spawn(log_failure(
            "agent socket",
            hub.clone().serve(flows::socket_path(&config.state_dir)),
        ));

        let mut mtls = match &config.mtls {
            Some(_) => Some(Mtls::start(&config, hub.clone()).await?),
            None => {
                // Plaintext between nodes: nothing may be steered to a
                // listener that does not exist.
                PinnedMaps::open(&config.bpffs)?.set_tunnel_port(0)?;
                None
            }
        };
        let mut health = Health::new(&config.state_dir);
        let signal = if let Some(dir) = config.config_dir.clone() {
            let control = Control::adopt(config.clone())?;
            tokio::select! {
                result = follow_config_dir(control, &dir, &hub, &mut mtls, &mut health) => {
                    result?;
                    unreachable!("the directory watch only ends with an error")
                }
                signal = wait_for_shutdown() => signal?,
            }
        } else if let Some(k) = config.kubernetes.clone() {
            let control = Control::adopt(config.clone())?;
            tokio::select! {
                result = k8s::follow_cluster(control, &config, &k, &hub, &mut mtls, &mut health) => {
                    result?;
                    unreachable!("following the cluster only ends with an error")
                }
                signal = wait_for_shutdown() => signal?,
            }
        } else {
            health.ready();
            wait_for_shutdown().await?
        };
        // The programs and maps stay attached and pinned: the data path keeps
        // enforcing while no agent runs, and the next agent adopts the pins.
        info!(signal, "stopping; kernel programs stay attached");
        if let Some(mtls) = mtls {
            mtls.shutdown(SHUTDOWN_GRACE).await;
        }
        anyhow::Ok(())
    })
}

async fn log_failure(what: &'static str, task: impl Future<Output = anyhow::Result<()>>) {
    if let Err(e) = task.await {
        error!(error = format!("{e:#}"), "{what} stopped");
    }
}

/// Applies the directory now and after every change to it. The agent is
/// ready once a configuration has been applied; a refused one leaves the
/// previous policy enforcing and waits for the next change.
async fn follow_config_dir(
    mut control: Control,
    dir: &Path,
    hub: &FlowHub,
    mtls: &mut Option<Mtls>,
    health: &mut Health,
) -> anyhow::Result<()> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    inotify
        .add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_CREATE,
        )
        .with_context(|| format!("watching {}", dir.display()))?;
    let events = crate::datapath::sys::async_owned_fd(inotify.as_fd().try_clone_to_owned()?)?;
    let mut applied_once = false;
    loop {
        match control.reload() {
            Ok(names) => {
                if let Some(mtls) = mtls.as_mut() {
                    mtls.applied(&names);
                }
                hub.set_names(names);
                if !applied_once {
                    if let Some(mtls) = mtls.as_ref() {
                        mtls.wait_certified(CERTIFICATES_WAIT).await;
                    }
                    applied_once = true;
                }
                health.ready();
            }
            Err(e) => {
                error!(
                    error = format!("{e:#}"),
                    "configuration refused; the policy in force stays in force"
                );
                health.not_ready(format!("invalid configuration: {e:#}"));
            }
        }
        // Wait for a change, then let the writer finish.
        loop {
            let mut guard = events.readable().await?;
            match inotify.read_events() {
                Ok(evs) if !evs.is_empty() => {
                    guard.clear_ready();
                    break;
                }
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
        tokio::time::sleep(SETTLE).await;
        while let Ok(evs) = inotify.read_events() {
            if evs.is_empty() {
                break;
            }
        }
    }
}

async fn wait_for_shutdown() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    // kube's client logs every failed connection attempt at ERROR; the
    // agent says once that it lost the API server and once that it is back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off"));
    use std::io::IsTerminal as _;
    // Colours only for people: log collectors get plain text.
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
