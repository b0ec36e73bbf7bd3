//! Logging of the long-running commands (`run`, `ca serve`): plain or JSON
//! on stderr, with a filter the agent's admin endpoint can replace.
use crate::{
    config::LogFormat,
    endpoints::admin::{LogFilter, parse_filter},
};

/// The log filter when `RUST_LOG` does not say: kube's client logs every
/// failed connection attempt at ERROR; the agent says once that it lost the
/// API server and once that it is back.
const DEFAULT_LOG_FILTER: &str = "info,kube_client::client::builder=off";

/// Logs to stderr, plain or JSON, with a filter the admin endpoint can
/// replace while the agent runs.
pub fn init_logging(format: LogFormat) -> LogFilter {
    use std::io::IsTerminal as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt as _, reload};
    let filter = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .and_then(|directives| parse_filter(&directives).ok())
        .unwrap_or_else(|| parse_filter(DEFAULT_LOG_FILTER).expect("the default filter parses"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only for people: log collectors get plain text.
    let ansi = std::io::stderr().is_terminal();
    let (plain, json) = match format {
        LogFormat::Plain => (
            Some(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)),
            None,
        ),
        LogFormat::Json => (None, Some(fmt::layer().json().with_writer(std::io::stderr))),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(json)
        .init();
    LogFilter::new(handle)
}
