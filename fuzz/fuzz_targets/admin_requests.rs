//! Requests to the admin endpoint, as bytes on its socket: HTTP/1.1 read
//! by hyper (as the agent serves it), routed by `admin::route`, a body
//! read within its bound, and log directives given to the live filter.
//!
//! What must hold: nothing but a request carrying the token reaches any
//! route, and no input panics the agent or leaves a filter half changed.
#![no_main]

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use mesh_agent::endpoints::admin::{AdminRequest, LogFilter, directives_in, route};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing_subscriber::{EnvFilter, Registry, reload};

const TOKEN: &str = "5f3c0ffee5f3c0ffee5f3c0ffee5f3c0";

async fn answer(filter: LogFilter, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let routed = route(&req, TOKEN);
    if routed != AdminRequest::Unauthorized {
        let auth = req.headers().get(http::header::AUTHORIZATION);
        assert_eq!(
            auth.map(|v| v.as_bytes()),
            Some(format!("Bearer {TOKEN}").as_bytes())
        );
    }
    if let AdminRequest::SetLogFilter(directives) = routed {
        let directives = match directives {
            Some(d) => Some(d),
            None => directives_in(req.into_body()).await.ok(),
        };
        if let Some(directives) = directives {
            let before = filter.current();
            match filter.set(&directives) {
                Ok(now) => assert_eq!(now, filter.current()),
                Err(_) => assert_eq!(before, filter.current(), "a refused filter changed"),
            }
        }
    }
    Response::new(Full::new(Bytes::new()))
}

fuzz_target!(|data: &[u8]| {
    let (layer, handle) = reload::Layer::<EnvFilter, Registry>::new(EnvFilter::new("info"));
    let _subscriber = tracing_subscriber::layer::SubscriberExt::with(Registry::default(), layer);
    let filter = LogFilter::new(handle);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let service = service_fn(move |req| {
            let filter = filter.clone();
            async move { Ok::<_, Infallible>(answer(filter, req).await) }
        });
        let serving =
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(server), service));
        let (mut read, mut write) = tokio::io::split(client);
        let mut replies = Vec::new();
        let _ = tokio::join!(
            async {
                let _ = write.write_all(data).await;
                write.shutdown().await
            },
            read.read_to_end(&mut replies),
        );
        // The connection ends with the input; what matters is that no
        // request handler panicked.
        if let Err(e) = serving.await {
            assert!(!e.is_panic(), "a request panicked the endpoint");
        }
    });
});
