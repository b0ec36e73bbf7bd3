//! `mesh-agent run`: the node agent's lifecycle.
use anyhow::Context as _;
use tracing::info;

use crate::{
    config::{Config, LogFormat},
    datapath::{Datapath, pins::PinDir},
};

pub fn run(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_format);
    info!(config = %serde_json::to_string(&config)?, "starting mesh-agent {}", env!("CARGO_PKG_VERSION"));

    let pins = PinDir::lock(&config.bpffs)?;
    let _datapath = Datapath::install(&config, &pins)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        info!("ready");
        let signal = wait_for_shutdown().await?;
        // The programs and maps stay attached and pinned: the data path keeps
        // working while no agent runs, and the next agent adopts the pins.
        info!(signal, "stopping; kernel programs stay attached");
        anyhow::Ok(())
    })
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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
