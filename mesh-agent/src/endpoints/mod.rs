//! The agent's HTTP endpoints, on three listeners as ztunnel and
//! linkerd2-proxy users know them:
//!
//! - admin (`--admin-address`, localhost by default since it can change
//!   behaviour, and each request needs the token in the state directory):
//!   `/config_dump`, `/logging`;
//! - metrics (`--metrics-address`): `/metrics`, Prometheus;
//! - health (`--health-address`): `/live`, `/ready`.
//!
//! The listeners are bound before the kernel programs are installed, so a
//! port in use stops the agent before it changes anything, with the flag
//! to change in the message. `status` is the operator's one-screen summary,
//! asking the health endpoint first.
pub mod admin;
pub mod metrics;

use std::{convert::Infallible, future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tracing::{debug, info, warn};

use crate::{config::Config, flows::FlowHub, health::HealthWatch};
use admin::LogFilter;
use metrics::Metrics;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} ({flag})")]
pub struct BindError {
    flag: &'static str,
    address: SocketAddr,
    #[source]
    source: io::Error,
}

/// The three listeners, bound.
pub struct Listeners {
    admin: TcpListener,
    metrics: TcpListener,
    health: TcpListener,
}

impl Listeners {
    pub fn bind(config: &crate::config::EndpointsConfig) -> Result<Self, BindError> {
        let listeners = Self {
            admin: listen("--admin-address", config.admin)?,
            metrics: listen("--metrics-address", config.metrics)?,
            health: listen("--health-address", config.health)?,
        };
        if !config.admin.ip().is_loopback() {
            warn!(
                address = %config.admin,
                "the admin endpoint is reachable from other hosts; it can change the log level"
            );
        }
        Ok(listeners)
    }
}

/// A listener that a restarted agent can take over while its predecessor's
/// connections are in TIME_WAIT.
fn listen(flag: &'static str, address: SocketAddr) -> Result<TcpListener, BindError> {
    let err = |source| BindError {
        flag,
        address,
        source,
    };
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(address).map_err(err)?;
    socket.listen(128).map_err(err)
}

/// What the endpoints read.
pub struct Shared {
    pub config: Config,
    pub hub: FlowHub,
    pub health: HealthWatch,
    pub metrics: Metrics,
    pub log_filter: LogFilter,
    /// What each admin request must present (`admin::issue_token`).
    pub admin_token: String,
    pub scrapes: Scrapes,
}

/// `/metrics` renders one scrape at a time, and answers a scrape within
/// [`Scrapes::FRESH`] of the last render from it. The endpoint listens on
/// every address and each render walks every map: a burst of scrapes from
/// a pod costs one walk, never one each.
#[derive(Default)]
pub struct Scrapes {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Bytes)>>,
}

impl Scrapes {
    const FRESH: Duration = Duration::from_secs(1);
    /// How long a scrape waits for the one rendering before it.
    const WAIT: Duration = Duration::from_secs(10);
}

/// Serves the three listeners until the agent stops.
pub fn spawn(listeners: Listeners, shared: Shared) {
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(
        admin = addr(&listeners.admin),
        metrics = addr(&listeners.metrics),
        health = addr(&listeners.health),
        "endpoints listening"
    );
    let shared = Arc::new(shared);
    let s = shared.clone();
    tokio::spawn(serve(listeners.admin, move |req| {
        let s = s.clone();
        async move { admin::handle(&s, req).await }
    }));
    let s = shared.clone();
    tokio::spawn(serve(listeners.metrics, move |req| {
        let s = s.clone();
        async move { metrics_endpoint(&s, &req).await }
    }));
    let s = shared;
    tokio::spawn(serve(listeners.health, move |req| {
        let s = s.clone();
        async move { health_endpoint(&s.health, &req) }
    }));
}

pub type Reply = Response<Full<Bytes>>;

/// Accepts HTTP/1.1 connections and answers each request with `handle`.
async fn serve<H, F>(listener: TcpListener, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let reply = handle(req);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                debug!(%peer, error = %e, "endpoint connection ended");
            }
        });
    }
}

pub fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("a status, a valid header and a body make a response")
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    reply(status, "text/plain; charset=utf-8", body)
}

fn not_found(path: &str) -> Reply {
    text(StatusCode::NOT_FOUND, format!("no endpoint {path} here"))
}

fn method_not_allowed(method: &Method, path: &str) -> Reply {
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not served on {path}"),
    )
}

/// `/live`: the process serves. `/ready`: the maps reflect the current
/// policy (the same as health.json says), else 503 and why.
fn health_endpoint<B>(health: &HealthWatch, req: &Request<B>) -> Reply {
    let path = req.uri().path();
    if !matches!(path, "/live" | "/ready") {
        return not_found(path);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed(req.method(), path);
    }
    if path == "/live" {
        return text(StatusCode::OK, "live");
    }
    let report = health.borrow().clone();
    if report.ready {
        text(StatusCode::OK, "ready")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, report.reason)
    }
}

/// `/metrics`: rendered off the async workers, since it reads the maps.
async fn metrics_endpoint<B>(shared: &Shared, req: &Request<B>) -> Reply {
    let path = req.uri().path();
    if path != "/metrics" {
        return not_found(path);
    }
    if req.method() != Method::GET {
        return method_not_allowed(req.method(), path);
    }
    let Ok(mut last) = tokio::time::timeout(Scrapes::WAIT, shared.scrapes.last.lock()).await else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "another scrape is still rendering the metrics",
        );
    };
    if let Some((at, body)) = &*last
        && at.elapsed() < Scrapes::FRESH
    {
        return reply(StatusCode::OK, metrics::CONTENT_TYPE, body.clone());
    }
    let metrics = shared.metrics.clone();
    match tokio::task::spawn_blocking(move || metrics.render()).await {
        Ok(body) => {
            let body = Bytes::from(body);
            *last = Some((tokio::time::Instant::now(), body.clone()));
            reply(StatusCode::OK, metrics::CONTENT_TYPE, body)
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering metrics failed: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    fn body(reply: &Reply) -> String {
        // The bodies are `Full`: one frame, in memory.
        use http_body_util::BodyExt as _;
        let frame = futures::executor::block_on(reply.body().clone().collect()).unwrap();
        String::from_utf8(frame.to_bytes().to_vec()).unwrap()
    }

    #[test]
    fn ready_follows_health_and_says_why_not() {
        let dir = std::env::temp_dir().join(format!("mesh-endpoints-{}", std::process::id()));
        let health = Health::new(&dir);
        let watch = health.watch();
        let live = health_endpoint(&watch, &get("/live"));
        assert_eq!(live.status(), StatusCode::OK);
        let starting = health_endpoint(&watch, &get("/ready"));
        assert_eq!(starting.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(&starting).starts_with("starting"));

        health.not_ready("invalid configuration: bad.yaml: document 1");
        let refused = health_endpoint(&watch, &get("/ready"));
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body(&refused),
            "invalid configuration: bad.yaml: document 1\n"
        );
        health.ready();
        assert_eq!(
            health_endpoint(&watch, &get("/ready")).status(),
            StatusCode::OK
        );
        assert_eq!(
            health_endpoint(&watch, &get("/metrics")).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/ready").body(()).unwrap();
        assert_eq!(
            health_endpoint(&watch, &post).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
