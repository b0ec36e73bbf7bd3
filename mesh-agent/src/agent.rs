//! `mesh-agent run`: the node agent's lifecycle.
use std::{
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    control::Control,
    endpoints::{
        self, Listeners,
        metrics::{self, Metrics},
    },
    flows::{self, FlowHub},
    health::Health,
    k8s,
    mtls::Mtls,
    signal::ShutdownSignals,
};
use mesh_datapath::{
    Datapath,
    features::{DefectAnswers, KernelFeatures},
    maps::PinnedMaps,
    pins::PinDir,
};
use mesh_policy::state::NodeState;

/// Editors and `kubectl`-like tools write a file in several steps; changes
/// that arrive within this window are applied together.
const SETTLE: Duration = Duration::from_millis(5);

/// How long open tunnels may run on after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub fn run(config: Config) -> anyhow::Result<()> {
    let log_filter = crate::telemetry::init_logging(config.log_format);
    info!(
        config = %serde_json::to_string(&config)?,
        node = %config.mesh.node,
        trust_domain = %config.mesh.trust_domain,
        default_policy = ?config.mesh.default_action,
        non_mesh = ?config.mesh.non_mesh_action,
        "starting mesh-agent {}", env!("CARGO_PKG_VERSION")
    );

    let pins = PinDir::lock(&config.bpffs)?;
    let mut kernel = KernelFeatures::probe();
    if let Some(refusal) = kernel.refusal() {
        anyhow::bail!(refusal);
    }
    for missing in kernel.features.iter().filter(|f| !f.present) {
        warn!(
            feature = %missing.name,
            since = %missing.since,
            instead = %missing.without,
            "this kernel lacks a feature the mesh can do without"
        );
    }
    std::fs::create_dir_all(&config.state_dir).context("creating the state directory")?;
    // A restart in the same boot reuses what the last agent's self-test
    // found (below).
    kernel.short_circuit_defects = kernel.defects_of_this_boot(&config.state_dir);
    kernel
        .write(&config.state_dir)
        .context("writing kernel.json to the state directory")?;
    // Each tunnelled connection holds a descriptor on each node: the
    // container runtime's soft limit (often 1,024) would cap them long
    // before the tunnel's own bounds.
    match mesh_datapath::sys::raise_fd_limit() {
        Ok(limit) => info!(limit, "open files"),
        Err(e) => warn!(error = %e, "could not raise the open-files limit"),
    }

    // The control plane (watches, policy, maps, flows, endpoints) runs on
    // one worker; the tunnels on a runtime of their own (`--tunnel-threads`),
    // so that a tunnel's socket, HTTP/2 and TLS work stays on one thread
    // (measured on two cores: 10 µs less added round trip than sharing one
    // worker with the control plane, 12–35 µs less than sharing two) and
    // a policy compile never delays a tunnel.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mesh-control")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let tunnels = config
        .mtls
        .as_ref()
        .map(|m| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(m.tunnel_threads)
                .thread_name("mesh-tunnel")
                .enable_all()
                .build()
                .context("starting the tunnels' runtime")
        })
        .transpose()?;
    let ran = runtime.block_on(async {
        let mut signals = ShutdownSignals::install()?;
        let health = Health::new(&config.state_dir);
        let metrics = Metrics::new(
            metrics::Options {
                mtls: config.mtls.is_some(),
                kubernetes: config.kubernetes.is_some(),
            },
            metrics::node_readings(
                config.bpffs.clone(),
                config.state_dir.clone(),
                health.watch(),
            ),
        );
        let hub = FlowHub::new(metrics.flows.clone(), config.mtls.is_some());
        // Before anything changes in the kernel: a port in use stops the
        // agent here, naming the flag.
        let listeners = Listeners::bind(&config.endpoints)?;
        endpoints::spawn(
            listeners,
            endpoints::Shared {
                config: config.clone(),
                hub: hub.clone(),
                health: health.watch(),
                metrics: metrics.clone(),
                log_filter,
                admin_token: endpoints::admin::issue_token(&config.state_dir)
                    .context("writing the admin token to the state directory")?,
                scrapes: endpoints::Scrapes::default(),
            },
        );
        let mut installed = Datapath::install(&config.datapath, &pins)?;
        // Which of the redirect path's defects this kernel has: a second or
        // two, off the async workers; kernel.json and status say when done.
        let kernel_tls = kernel.has("ktls");
        // A restart in the same boot reuses what the last agent found.
        if kernel.short_circuit_defects.is_some() {
            info!(
                found = %kernel.defects_summary(&DefectAnswers::attached(&config.bpffs)),
                "short-circuit self-test: this boot's results reused"
            );
        } else {
            let self_test = installed.self_test()?;
            let state_dir = config.state_dir.clone();
            tokio::task::spawn_blocking(move || {
                let defects = self_test.run();
                for d in &defects {
                    info!(defect = %d.name, present = ?d.present, detail = %d.detail, "short-circuit self-test");
                }
                kernel.short_circuit_defects = Some(defects);
                if let Err(e) = kernel.write(&state_dir) {
                    warn!(error = %e, "could not write the self-test's results to kernel.json");
                }
            });
        }
        let datapath = Arc::new(Mutex::new(installed));
        tokio::spawn(guard_interfaces(datapath.clone()));
        hub.set_names(NodeState::read(&config.state_dir).unwrap_or_default());
        tokio::spawn(log_failure(
            "flow events",
            hub.clone().read_kernel_events(config.bpffs.clone()),
        ));
        tokio::spawn(log_failure(
            "agent socket",
            hub.clone().serve(flows::socket_path(&config.state_dir)),
        ));

        // The tunnels' runtime exists exactly when mTLS is configured.
        let mut mtls = match &tunnels {
            Some(tunnels) => Some(
                Mtls::start(
                    &config,
                    hub.clone(),
                    metrics.tunnels.clone(),
                    tunnels.handle().clone(),
                    kernel_tls,
                )
                .await?,
            ),
            None => {
                // Plaintext between nodes: nothing may be steered to a
                // listener that does not exist.
                PinnedMaps::open(&config.bpffs)?.set_tunnel_port(0)?;
                None
            }
        };
        if let Some(mtls) = &mtls {
            // Ready means a tunnel can be opened at once for every local
            // workload: not before each has its certificate.
            health.wait_for_certificates(mtls.missing_certificates());
        }
        let signal = if let Some(dir) = config.config_dir.clone() {
            let mut control = Control::adopt(config.clone(), metrics.reconcile.clone())?;
            control.guard_workloads_with(datapath.clone());
            tokio::select! {
                result = follow_config_dir(control, &dir, &hub, &mut mtls, &health) => {
                    result?;
                    unreachable!("the directory watch only ends with an error")
                }
                signal = signals.recv() => signal,
            }
        } else if let Some(k) = config.kubernetes.clone() {
            let mut control = Control::adopt(config.clone(), metrics.reconcile.clone())?;
            control.guard_workloads_with(datapath.clone());
            tokio::select! {
                result = k8s::follow_cluster(control, &config, &k, &hub, &mut mtls, &health, &metrics.kubernetes) => {
                    result?;
                    unreachable!("following the cluster only ends with an error")
                }
                signal = signals.recv() => signal,
            }
        } else {
            health.ready();
            signals.recv().await
        };
        // The programs and maps stay attached and pinned: the data path keeps
        // enforcing while no agent runs, and the next agent adopts the pins.
        info!(signal, "stopping; kernel programs stay attached");
        if let Some(mtls) = mtls {
            mtls.shutdown(SHUTDOWN_GRACE).await;
        }
        anyhow::Ok(())
    });
    // Whatever the grace period left running is cut here, outside the
    // control runtime (a runtime cannot be dropped from inside another).
    if let Some(tunnels) = tunnels {
        tunnels.shutdown_background();
    }
    ran
}

/// How often the tc links are checked against the interfaces they guard.
const INTERFACE_CHECK: Duration = Duration::from_secs(1);

/// Keeps the tc programs where they belong. Interfaces come and go (a CNI
/// creates its device again, an uplink is re-plugged, a pod's veth goes
/// with its pod), and a link of a deleted interface guards nothing: every
/// second the programs are attached again wherever that happened. (New
/// workloads' interfaces get their checks from the control loop, as part
/// of the change that brings them.)
async fn guard_interfaces(datapath: Arc<Mutex<Datapath>>) {
    let mut tick = tokio::time::interval(INTERFACE_CHECK);
    loop {
        tick.tick().await;
        let mut datapath = datapath.lock().unwrap_or_else(|p| p.into_inner());
        match datapath.guard_interfaces() {
            Ok(again) => {
                for interface in again {
                    warn!(%interface, "interface was re-created: tc programs attached again");
                }
            }
            Err(e) => warn!(
                error = format!("{e:#}"),
                "attaching tc programs again failed; retrying"
            ),
        }
        if let Err(e) = datapath.guard_workloads() {
            warn!(
                error = format!("{e:#}"),
                "checks on workload interfaces failed; retrying"
            );
        }
    }
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
    health: &Health,
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
    let events = mesh_datapath::sys::async_owned_fd(inotify.as_fd().try_clone_to_owned()?)?;
    loop {
        match control.reload() {
            Ok(names) => {
                if let Some(mtls) = mtls.as_mut() {
                    mtls.applied(&names);
                }
                hub.set_names(names);
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
