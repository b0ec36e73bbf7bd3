//! The admin endpoint: `/config_dump` (what the agent runs with and what
//! it applied) and `/logging` (the log filter, changed live).
//!
//! It can change the agent's behaviour and shows every identity and policy,
//! and on the node's loopback every hostNetwork pod reaches it. So each
//! request must carry the token the agent writes at start to
//! `<state-dir>/admin-token`, readable by root alone: whoever can read it
//! could read the node's state directory anyway.
use std::{io, path::Path, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use serde::Serialize;
use tracing::info;
use tracing_subscriber::{EnvFilter, Registry, reload};

use super::{Reply, Shared, method_not_allowed, not_found, reply, text};
use crate::{config::Config, health::HealthReport};
use mesh_pki::rotation::CertState;
use mesh_policy::state::NodeState;

/// The agent's log filter, which `/logging` reads and replaces.
#[derive(Clone)]
pub struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogFilter {
    pub fn new(handle: reload::Handle<EnvFilter, Registry>) -> Self {
        Self { handle }
    }

    /// The directives in force, as `RUST_LOG` would say them.
    pub fn current(&self) -> String {
        self.handle
            .with_current(|filter| filter.to_string())
            .unwrap_or_default()
    }

    /// Replaces the filter with `directives` (`debug`,
    /// `info,mesh_agent::tunnel=trace`, …); returns the filter now in force.
    pub fn set(&self, directives: &str) -> Result<String, String> {
        let directives = directives.trim();
        if directives.is_empty() {
            return Err("no log level given (?level=debug, or any RUST_LOG directives)".into());
        }
        let filter = parse_filter(directives).map_err(|e| format!("{directives:?}: {e}"))?;
        let previous = self.current();
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        let now = self.current();
        info!(filter = %now, previous = %previous, "log filter changed");
        Ok(now)
    }
}

/// Log directives as `RUST_LOG` and `/logging` take them, with span field
/// values matched as literal text. As regular expressions (tracing's
/// default), one value of a hundred characters could take minutes of CPU
/// to compile, on the thread serving the request (found by the
/// `admin_requests` fuzz target).
pub fn parse_filter(directives: &str) -> Result<EnvFilter, impl std::error::Error + use<>> {
    EnvFilter::builder().with_regex(false).parse(directives)
}

/// What `/config_dump` shows.
#[derive(Serialize)]
struct ConfigDump<'a> {
    version: &'static str,
    /// The effective configuration (flags, environment, defaults).
    config: &'a Config,
    log_filter: String,
    health: HealthReport,
    /// What the control loop last applied: the policy generation, the
    /// identities, workloads, rules of the policies (`rules`), subjects and
    /// nodes behind the maps' numbers (as `<state-dir>/state.json`).
    applied: &'a NodeState,
    /// This node's workload certificates (`inspect certs`); `null` without
    /// mutual TLS.
    certificates: Option<CertState>,
}

/// Where in the state directory the admin token is.
pub const TOKEN_FILE: &str = "admin-token";

/// A fresh token for this run of the agent, written to
/// `<state_dir>/admin-token` (mode 0600) and returned.
pub fn issue_token(state_dir: &Path) -> io::Result<String> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(".admin-token.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(token.as_bytes())?;
    std::fs::rename(&tmp, state_dir.join(TOKEN_FILE))?;
    Ok(token)
}

/// Whether `req` carries `Authorization: Bearer <token>`, compared in
/// constant time.
fn authorized<B>(req: &Request<B>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

const INDEX: &str = "\
mesh-agent admin endpoint
  GET  /config_dump               configuration, applied workloads and policies, certificates (JSON)
  GET  /logging                   the log filter in force
  POST /logging?level=DIRECTIVES  change it (debug, info, warn, or any RUST_LOG directives)
";

/// What an admin request asks for, decided from its head alone.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminRequest {
    /// Without the token: nothing else is looked at.
    Unauthorized,
    Index,
    ConfigDump,
    ShowLogFilter,
    /// `POST /logging`: the directives of `?level=`, or `None` to read them
    /// from the body.
    SetLogFilter(Option<String>),
    MethodNotAllowed,
    NotFound,
}

/// Decides what `req` asks for; every request not carrying `token` is
/// `Unauthorized`.
pub fn route<B>(req: &Request<B>, token: &str) -> AdminRequest {
    if !authorized(req, token) {
        return AdminRequest::Unauthorized;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => AdminRequest::Index,
        (&Method::GET, "/config_dump") => AdminRequest::ConfigDump,
        (&Method::GET, "/logging") => AdminRequest::ShowLogFilter,
        (&Method::POST, "/logging") => {
            AdminRequest::SetLogFilter(query_param(req.uri().query().unwrap_or(""), "level"))
        }
        (_, "/" | "/config_dump" | "/logging") => AdminRequest::MethodNotAllowed,
        _ => AdminRequest::NotFound,
    }
}

/// The most a `POST /logging` body may hold.
const MAX_BODY: usize = 4096;

/// Log directives sent as a request body (`curl --data 'info,…'`).
pub async fn directives_in<B>(body: B) -> Result<String, String>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(body) => Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned()),
        Err(e) => Err(format!("reading the body: {e}")),
    }
}

pub async fn handle(shared: &Shared, req: Request<hyper::body::Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    match route(&req, &shared.admin_token) {
        AdminRequest::Unauthorized => text(
            StatusCode::UNAUTHORIZED,
            format!(
                "the admin endpoint needs `Authorization: Bearer TOKEN`, with the token in {} (root only)",
                shared.config.state_dir.join(TOKEN_FILE).display()
            ),
        ),
        AdminRequest::Index => text(StatusCode::OK, INDEX),
        AdminRequest::ConfigDump => config_dump(shared),
        AdminRequest::ShowLogFilter => text(StatusCode::OK, shared.log_filter.current()),
        AdminRequest::SetLogFilter(directives) => {
            let directives = match directives {
                Some(directives) => directives,
                None => match directives_in(req.into_body()).await {
                    Ok(directives) => directives,
                    Err(e) => return text(StatusCode::BAD_REQUEST, e),
                },
            };
            match shared.log_filter.set(&directives) {
                Ok(now) => text(StatusCode::OK, now),
                Err(e) => text(StatusCode::BAD_REQUEST, e),
            }
        }
        AdminRequest::MethodNotAllowed => method_not_allowed(req.method(), &path),
        AdminRequest::NotFound => not_found(&path),
    }
}

fn config_dump(shared: &Shared) -> Reply {
    let applied: Arc<NodeState> = shared.hub.names();
    let dump = ConfigDump {
        version: env!("CARGO_PKG_VERSION"),
        config: &shared.config,
        log_filter: shared.log_filter.current(),
        health: shared.health.borrow().clone(),
        applied: &applied,
        certificates: mesh_pki::rotation::read_state(&shared.config.state_dir).ok(),
    };
    match serde_json::to_vec_pretty(&dump) {
        Ok(mut body) => {
            body.push(b'\n');
            reply(StatusCode::OK, "application/json", Bytes::from(body))
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The value of `name` in a query string, decoded as forms and curl write
/// it (`%XX` escapes, `+` for a space).
fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_level_from_the_query() {
        assert_eq!(
            query_param("level=debug", "level").as_deref(),
            Some("debug")
        );
        assert_eq!(
            query_param("x=1&level=info%2Cmesh_agent%3A%3Atunnel%3Dtrace", "level").as_deref(),
            Some("info,mesh_agent::tunnel=trace")
        );
        assert_eq!(query_param("levels=debug", "level"), None);
        assert_eq!(
            query_param("level=a+b%zz%41", "level").as_deref(),
            Some("a b%zzA")
        );
    }

    fn request(method: &str, uri: &str, authorization: Option<&str>) -> Request<()> {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(value) = authorization {
            req = req.header(http::header::AUTHORIZATION, value);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn only_the_token_opens_any_route() {
        let token = "0123abcd";
        for auth in [
            None,
            Some("Bearer 0123abcE"),
            Some("Bearer 0123abc"),
            Some("0123abcd"),
            Some("bearer 0123abcd"),
        ] {
            for (method, uri) in [
                ("GET", "/"),
                ("GET", "/config_dump"),
                ("POST", "/logging?level=trace"),
                ("GET", "/nothing"),
            ] {
                assert_eq!(
                    route(&request(method, uri, auth), token),
                    AdminRequest::Unauthorized,
                    "{method} {uri} with {auth:?}"
                );
            }
        }
        let with = |method, uri| route(&request(method, uri, Some("Bearer 0123abcd")), token);
        assert_eq!(with("GET", "/"), AdminRequest::Index);
        assert_eq!(with("GET", "/config_dump"), AdminRequest::ConfigDump);
        assert_eq!(with("GET", "/logging"), AdminRequest::ShowLogFilter);
        assert_eq!(
            with("POST", "/logging?level=info%2Cmesh_agent%3Dtrace"),
            AdminRequest::SetLogFilter(Some("info,mesh_agent=trace".into()))
        );
        assert_eq!(with("POST", "/logging"), AdminRequest::SetLogFilter(None));
        assert_eq!(with("DELETE", "/logging"), AdminRequest::MethodNotAllowed);
        assert_eq!(with("GET", "/config_dump/x"), AdminRequest::NotFound);
    }

    #[test]
    fn a_body_past_the_bound_is_refused() {
        use http_body_util::Full;
        let read = |len| {
            futures::executor::block_on(directives_in(Full::new(Bytes::from(vec![b'a'; len]))))
        };
        assert_eq!(read(MAX_BODY).unwrap().len(), MAX_BODY);
        assert!(read(MAX_BODY + 1).unwrap_err().contains("reading the body"));
    }

    #[test]
    fn span_field_values_are_matched_as_text() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};

        struct CountEvents(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> Layer<S> for CountEvents {
            fn on_event(&self, _: &tracing::Event<'_>, _: Context<'_, S>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let events = Arc::new(AtomicUsize::new(0));
        let filter = parse_filter("off,[conn{peer=a.c}]=debug").unwrap();
        let subscriber = Registry::default()
            .with(filter)
            .with(CountEvents(events.clone()));
        tracing::subscriber::with_default(subscriber, || {
            // Fields as the agent records them (`%`, no quotes). As a
            // regular expression `a.c` would match `abc` too.
            tracing::debug_span!("conn", peer = %"abc").in_scope(|| tracing::debug!("not this"));
            tracing::debug_span!("conn", peer = %"a.c").in_scope(|| tracing::debug!("this"));
        });
        assert_eq!(events.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn changes_the_filter_live() {
        let (layer, handle) = reload::Layer::<EnvFilter, Registry>::new(EnvFilter::new("info"));
        let _subscriber =
            tracing_subscriber::layer::SubscriberExt::with(Registry::default(), layer);
        let filter = LogFilter::new(handle);
        assert_eq!(filter.current(), "info");
        assert_eq!(filter.set("debug").unwrap(), "debug");
        assert_eq!(filter.current(), "debug");
        assert!(filter.set("").is_err());
        let e = filter.set("info,[{").unwrap_err();
        assert!(e.contains("info,[{"), "{e}");
        assert_eq!(
            filter.current(),
            "debug",
            "a refused filter changes nothing"
        );
    }
}
