//! An in-process Kubernetes API server for tests.
//!
//! It speaks the Kubernetes HTTP API (JSON over HTTP/1.1, chunked watch
//! streams) on a real TCP socket, so the agent's ordinary `kube` client and
//! kube-runtime watchers talk to it exactly as to a cluster. Objects live in
//! memory under one global resourceVersion counter with their event history,
//! and the test can inject the faults a real cluster has: watches broken
//! mid-stream, history compacted away (410 Gone), bookmarks, an API server
//! that goes away and comes back on the same port.
//!
//! Supported: get, list (`limit`/`continue`, label and field selectors),
//! watch (replay from a resourceVersion, 410 on compacted history,
//! bookmarks, `timeoutSeconds`, `sendInitialEvents`), create, replace (with
//! optimistic concurrency), JSON merge patch, delete (with preconditions),
//! the `/status` subresource, `dryRun`, `generateName` and `GET /version`.
//! `metadata.managedFields` records the time of the last write to the
//! object and to its status (one entry each, without field sets).
//! Server-side apply is approximated by a merge patch that may create the
//! object (fields dropped from the applied configuration are not removed).
//! Not supported: JSON patch and strategic merge patch (415), delete
//! collection, finalizers and graceful deletion, admission (a namespace need
//! not exist), discovery (`/api`, `/apis`), protobuf, authentication (any
//! credentials are accepted).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc as std_mpsc};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Request bodies larger than this are refused (413), as kube-apiserver does
/// at 3 MiB for most writes; tests never need more.
const MAX_BODY: usize = 16 << 20;

/// History beyond this many events is compacted away, as etcd would.
const MAX_HISTORY: usize = 100_000;

/// How long the synchronous controls wait for the server thread.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// What `GET /version` answers.
const GIT_VERSION: &str = "v1.34.0-mesh-test";

/// A resource the server knows: its API group and version, kind and URL
/// plural, scope and subresources.
#[derive(Debug)]
struct ResourceType {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    /// Has a `/status` subresource: writes to the object keep the stored
    /// status and writes to `/status` change nothing else.
    status: bool,
    /// PUT without `metadata.resourceVersion` is allowed, as for built-in
    /// types; custom resources require it.
    unconditional_update: bool,
    /// Field selectors the real server accepts besides `metadata.name` and
    /// `metadata.namespace`.
    fields: &'static [&'static str],
}

impl ResourceType {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name error messages use: `pods`, `meshpolicies.mesh.dev`.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
        status: true,
        unconditional_update: true,
        fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
        status: true,
        unconditional_update: true,
        fields: &["status.phase"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        namespaced: false,
        status: true,
        unconditional_update: true,
        fields: &["spec.unschedulable"],
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
        status: true,
        unconditional_update: true,
        fields: &[],
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
        status: false,
        unconditional_update: true,
        fields: &[],
    },
    ResourceType {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        namespaced: true,
        status: false,
        unconditional_update: true,
        fields: &[],
    },
    ResourceType {
        group: "mesh.dev",
        version: "v1alpha1",
        kind: "MeshPolicy",
        plural: "meshpolicies",
        namespaced: true,
        status: true,
        unconditional_update: false,
        fields: &[],
    },
    ResourceType {
        group: "mesh.dev",
        version: "v1alpha1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        namespaced: true,
        status: true,
        unconditional_update: false,
        fields: &[],
    },
    ResourceType {
        group: "mesh.dev",
        version: "v1alpha1",
        kind: "TrafficSplit",
        plural: "trafficsplits",
        namespaced: true,
        status: true,
        unconditional_update: false,
        fields: &[],
    },
];

fn resource_by_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|rt| rt.kind == kind && rt.api_version() == api_version)
}

fn resource_by_path(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|rt| rt.group == group && rt.version == version && rt.plural == plural)
}

/// One request as the server saw it, for tests to assert on.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// kube-apiserver's name for the request: `get`, `list`, `watch`,
    /// `create`, `update`, `patch`, `delete`, `version`; empty when the path
    /// is nothing the server serves.
    pub verb: String,
    pub path: String,
    /// The raw query string, still percent-encoded.
    pub query: String,
    pub content_type: Option<String>,
    /// The body of a POST, PUT, PATCH or DELETE, when it had one.
    pub body: Option<String>,
}

impl RequestRecord {
    /// A decoded query parameter.
    pub fn param(&self, name: &str) -> Option<String> {
        Query::parse(&self.query).ok()?.get(name).map(str::to_owned)
    }

    /// The body parsed as JSON.
    pub fn body_json(&self) -> Option<Value> {
        serde_json::from_str(self.body.as_deref()?).ok()
    }
}

/// The in-process API server. Dropping it stops the server thread and
/// closes the listener and every connection.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the test thread asks of the server thread.
enum Command {
    Stop(std_mpsc::SyncSender<()>),
    Resume(std_mpsc::SyncSender<io::Result<()>>),
    Shutdown,
}

struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<RequestRecord>>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A test that panicked while holding the lock must not hide its own
        // failure behind poisoned-lock panics elsewhere.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn requests(&self) -> MutexGuard<'_, Vec<RequestRecord>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ApiServer {
    /// Binds 127.0.0.1 on a free port and serves from a thread of its own,
    /// with its own tokio runtime, so it works under any test harness.
    pub fn start() -> anyhow::Result<ApiServer> {
        Self::start_in(None, std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Serves on `ip` (a free port) inside network namespace `netns`, as an
    /// API server running on one of the test's nodes: the agents, which run
    /// in their nodes' namespaces, reach it over the test's own links. The
    /// server thread enters the namespace for good, so listening again
    /// after [`ApiServer::stop_serving`] happens there too.
    pub fn start_in(
        netns: Option<&crate::netns::Netns>,
        ip: std::net::IpAddr,
    ) -> anyhow::Result<ApiServer> {
        let netns = netns.map(crate::netns::Netns::file).transpose()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            requests: Mutex::new(Vec::new()),
        });
        let (commands, receiver) = mpsc::unbounded_channel();
        let (bound, wait_bound) = std_mpsc::sync_channel::<anyhow::Result<SocketAddr>>(1);
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    let setup =
                        || -> anyhow::Result<(tokio::runtime::Runtime, TcpListener, SocketAddr)> {
                            if let Some(netns) = &netns {
                                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                            }
                            let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))?;
                            listener.set_nonblocking(true)?;
                            let addr = listener.local_addr()?;
                            let runtime = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()?;
                            let listener = {
                                let _context = runtime.enter();
                                TcpListener::from_std(listener)?
                            };
                            Ok((runtime, listener, addr))
                        };
                    match setup() {
                        Ok((runtime, listener, addr)) => {
                            let _ = bound.send(Ok(addr));
                            runtime.block_on(serve(shared, listener, addr, receiver))
                        }
                        Err(e) => {
                            let _ = bound.send(Err(e));
                        }
                    }
                }
            })?;
        let addr = wait_bound
            .recv()
            .map_err(|_| anyhow::anyhow!("the API server thread died while starting"))??;
        Ok(ApiServer {
            shared,
            addr,
            commands,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`, the same across stop and resume.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address, for tests that speak raw HTTP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig whose current context points at this server over
    /// plain HTTP with a bearer token, for `--kubeconfig` or
    /// `kube::Config::from_custom_kubeconfig`.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let config = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: mesh-test
  cluster:
    server: {url}
users:
- name: mesh-test
  user:
    token: mesh-test-token
contexts:
- name: mesh-test
  context:
    cluster: mesh-test
    user: mesh-test
    namespace: default
current-context: mesh-test
",
            url = self.url()
        );
        std::fs::write(path, config)
            .map_err(|e| anyhow::anyhow!("writing kubeconfig {}: {e}", path.display()))
    }

    /// Creates or replaces the object named by its apiVersion, kind,
    /// namespace (default `default`) and name, status included, as kubectl
    /// or a controller would; returns the stored object. Panics on an object
    /// the server cannot store: that is a bug in the test.
    pub fn apply(&self, object: Value) -> Value {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource = resource_by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("ApiServer knows no {api_version:?} {kind:?}"));
        let mut store = self.shared.store();
        store
            .apply(resource, object)
            .unwrap_or_else(|e| panic!("ApiServer::apply: {}", e.message))
    }

    /// Deletes an object; false when there was none.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let resource = known(api_version, kind);
        let namespace = scope(resource, namespace);
        self.shared
            .store()
            .remove(resource, &namespace, name)
            .is_some()
    }

    /// The stored object, as a GET would return it.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let resource = known(api_version, kind);
        let namespace = scope(resource, namespace);
        self.shared
            .store()
            .objects
            .get(&(resource, namespace, name.to_owned()))
            .cloned()
    }

    /// The resourceVersion of the latest write (1 before any: like a real
    /// cluster, the server never reports 0, which watches read as "any").
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version
    }

    /// Aborts every open watch mid-response: the connection closes without
    /// the terminating chunk, as when a load balancer or the server drops it.
    pub fn break_watches(&self) {
        let mut store = self.shared.store();
        for watch in store.watches.drain(..) {
            let _ = watch.events.send(WatchMessage::Abort);
        }
    }

    /// Forgets the event history: a watch from an older resourceVersion now
    /// gets 410 Gone, as after etcd compaction.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        store.history.clear();
        store.compacted = store.resource_version;
    }

    /// Sends a BOOKMARK with the current resourceVersion to every watch
    /// that allowed bookmarks.
    pub fn send_bookmarks(&self) {
        let mut store = self.shared.store();
        store.prune_watches();
        let resource_version = store.resource_version;
        for watch in store.watches.iter().filter(|w| w.bookmarks) {
            let line = bookmark_line(&RESOURCES[watch.resource], resource_version, false);
            let _ = watch.events.send(WatchMessage::Line(line));
        }
    }

    /// The API server goes down: the listener and every connection close,
    /// and new connections are refused until [`resume_serving`].
    ///
    /// [`resume_serving`]: ApiServer::resume_serving
    pub fn stop_serving(&self) {
        let (done, wait) = std_mpsc::sync_channel(1);
        if self.commands.send(Command::Stop(done)).is_err() {
            panic!("the API server thread has exited");
        }
        wait.recv_timeout(CONTROL_TIMEOUT)
            .expect("the API server thread did not stop serving");
    }

    /// Listens again on the same port, with the same objects and history.
    pub fn resume_serving(&self) {
        let (done, wait) = std_mpsc::sync_channel(1);
        if self.commands.send(Command::Resume(done)).is_err() {
            panic!("the API server thread has exited");
        }
        match wait.recv_timeout(CONTROL_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("listening again on {}: {e}", self.addr),
            Err(_) => panic!("the API server thread did not resume serving"),
        }
    }

    /// Every request served so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests().clone()
    }

    /// Watch streams open now.
    pub fn watch_count(&self) -> usize {
        let mut store = self.shared.store();
        store.prune_watches();
        store.watches.len()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn known(api_version: &str, kind: &str) -> usize {
    resource_by_kind(api_version, kind)
        .unwrap_or_else(|| panic!("ApiServer knows no {api_version:?} {kind:?}"))
}

/// The store's namespace key: empty for cluster-scoped resources.
fn scope(resource: usize, namespace: Option<&str>) -> String {
    if RESOURCES[resource].namespaced {
        namespace.unwrap_or("default").to_owned()
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------------------
// Serving

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResponseBody = BoxBody<Bytes, BoxError>;

async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut listener = Some(listener);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None | Some(Command::Shutdown) => break,
                Some(Command::Stop(done)) => {
                    listener = None;
                    connections.abort_all();
                    // Only once every task is gone are its sockets closed.
                    while connections.join_next().await.is_some() {}
                    let _ = done.send(());
                }
                Some(Command::Resume(done)) => {
                    let result = match listener {
                        Some(_) => Ok(()),
                        None => listen(addr).await.map(|l| listener = Some(l)),
                    };
                    let _ = done.send(result);
                }
            },
            accepted = accept(listener.as_ref()) => match accepted {
                Ok(stream) => {
                    connections.spawn(serve_connection(shared.clone(), stream));
                }
                // Out of descriptors or the like: the client will retry.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// Binds the old port again. The connections just closed linger in
/// TIME_WAIT, hence SO_REUSEADDR, and a moment's retry if the port is busy.
async fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let mut attempts = 0;
    loop {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(1024)) {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, request).await) }
    });
    // Errors here are clients going away and watches broken on purpose.
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<ResponseBody> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            let error = ApiError::new(413, "RequestEntityTooLarge", e.to_string());
            return error.response();
        }
    };
    let request = ApiRequest {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        content_type: parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
    };
    match respond(shared, &request) {
        Ok(Reply::Object(code, object)) => json_response(code, &object),
        Ok(Reply::Watch(events, timeout)) => watch_response(events, timeout),
        Err(error) => error.response(),
    }
}

struct ApiRequest {
    method: Method,
    path: String,
    query: String,
    content_type: Option<String>,
    body: Bytes,
}

enum Reply {
    Object(u16, Value),
    /// A watch stream and when to end it.
    Watch(mpsc::UnboundedReceiver<WatchMessage>, Option<Duration>),
}

/// What the URL names.
enum Route {
    Version,
    Collection {
        resource: usize,
        namespace: Option<String>,
    },
    Object {
        resource: usize,
        namespace: String,
        name: String,
        status: bool,
    },
}

fn respond(shared: &Shared, request: &ApiRequest) -> Result<Reply, ApiError> {
    let route = parse_route(&request.path);
    let query = Query::parse(&request.query);
    let verb = match (&route, &query) {
        (Ok(route), Ok(query)) => verb(&request.method, route, query),
        _ => "",
    };
    let has_body = matches!(
        request.method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) && !request.body.is_empty();
    shared.requests().push(RequestRecord {
        method: request.method.to_string(),
        verb: verb.to_owned(),
        path: request.path.clone(),
        query: request.query.clone(),
        content_type: request.content_type.clone(),
        body: has_body.then(|| String::from_utf8_lossy(&request.body).into_owned()),
    });
    let (route, query) = (route?, query?);
    let dry_run = query.get("dryRun").is_some_and(|v| !v.is_empty());
    match route {
        Route::Version => match request.method {
            Method::GET => Ok(Reply::Object(200, version_info())),
            _ => Err(ApiError::method_not_allowed()),
        },
        Route::Collection {
            resource,
            namespace,
        } => match (&request.method, verb) {
            (&Method::GET, "watch") => {
                let filter = Filter::parse(resource, &query)?;
                let params = WatchParams::parse(&query)?;
                let events = shared.store().watch(resource, namespace, filter, &params)?;
                Ok(Reply::Watch(events, params.timeout))
            }
            (&Method::GET, _) => {
                let filter = Filter::parse(resource, &query)?;
                let list = shared
                    .store()
                    .list(resource, namespace.as_deref(), &filter, &query)?;
                Ok(Reply::Object(200, list))
            }
            (&Method::POST, _) => {
                // Namespaced objects are created in their namespace's URL.
                let namespace = match (RESOURCES[resource].namespaced, namespace) {
                    (true, None) => return Err(ApiError::method_not_allowed()),
                    (_, namespace) => namespace.unwrap_or_default(),
                };
                let object = parse_json(&request.body)?;
                let created = shared
                    .store()
                    .create(resource, &namespace, object, dry_run)?;
                Ok(Reply::Object(201, created))
            }
            _ => Err(ApiError::method_not_allowed()),
        },
        Route::Object {
            resource,
            namespace,
            name,
            status,
        } => {
            let part = if status { Part::Status } else { Part::Object };
            let key = (resource, namespace, name);
            match request.method {
                Method::GET => shared
                    .store()
                    .objects
                    .get(&key)
                    .cloned()
                    .map(|object| Reply::Object(200, object))
                    .ok_or_else(|| ApiError::not_found(resource, &key.2)),
                Method::PUT => {
                    let object = parse_json(&request.body)?;
                    let stored = shared.store().replace(&key, object, part, dry_run)?;
                    Ok(Reply::Object(200, stored))
                }
                Method::PATCH => {
                    let patch = parse_json(&request.body)?;
                    let content_type = request.content_type.as_deref().unwrap_or_default();
                    let (code, stored) =
                        shared
                            .store()
                            .patch(&key, content_type, &patch, part, dry_run)?;
                    Ok(Reply::Object(code, stored))
                }
                Method::DELETE if !status => {
                    let options = if request.body.is_empty() {
                        Value::Null
                    } else {
                        parse_json(&request.body)?
                    };
                    let deleted = shared.store().delete(&key, &options, dry_run)?;
                    Ok(Reply::Object(200, deleted))
                }
                _ => Err(ApiError::method_not_allowed()),
            }
        }
    }
}

fn verb(method: &Method, route: &Route, query: &Query) -> &'static str {
    match (route, method) {
        (Route::Version, _) => "version",
        (Route::Collection { .. }, &Method::GET) => match query.get("watch") {
            Some("true" | "1") => "watch",
            _ => "list",
        },
        (Route::Collection { .. }, &Method::POST) => "create",
        (Route::Object { .. }, &Method::GET) => "get",
        (Route::Object { .. }, &Method::PUT) => "update",
        (Route::Object { .. }, &Method::PATCH) => "patch",
        (Route::Object { .. }, &Method::DELETE) => "delete",
        _ => "",
    }
}

/// `/version`, `/api/v1/...` and `/apis/{group}/{version}/...`.
fn parse_route(path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::no_such_path()),
    };
    if rest.iter().any(|s| s.is_empty()) {
        return Err(ApiError::no_such_path());
    }
    let find = |plural| resource_by_path(group, version, plural).ok_or_else(ApiError::no_such_path);
    // `namespaces/{ns}/{plural}...` unless it is the Namespace object's own
    // `namespaces/{name}/status`.
    let (resource, namespace, rest) = match rest {
        ["namespaces", namespace, plural, rest @ ..] if *plural != "status" => {
            let resource = find(plural)?;
            if !RESOURCES[resource].namespaced {
                return Err(ApiError::no_such_path());
            }
            (resource, Some((*namespace).to_owned()), rest)
        }
        [plural, rest @ ..] => (find(plural)?, None, rest),
        [] => return Err(ApiError::no_such_path()),
    };
    let namespaced = RESOURCES[resource].namespaced;
    match rest {
        [] => Ok(Route::Collection {
            resource,
            namespace,
        }),
        // A namespaced object has no cluster-wide URL.
        [_, ..] if namespaced && namespace.is_none() => Err(ApiError::no_such_path()),
        [name] | [name, "status"] => Ok(Route::Object {
            resource,
            namespace: namespace.unwrap_or_default(),
            name: (*name).to_owned(),
            status: rest.len() == 2,
        }),
        _ => Err(ApiError::no_such_path()),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn json_response(code: u16, value: &Value) -> Response<ResponseBody> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    response
}

fn watch_response(
    events: mpsc::UnboundedReceiver<WatchMessage>,
    timeout: Option<Duration>,
) -> Response<ResponseBody> {
    let body = WatchBody {
        events,
        deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
    };
    // No length: hyper sends it chunked, one event per chunk.
    let mut response = Response::new(body.boxed());
    response.headers_mut().insert(
        CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    response
}

enum WatchMessage {
    Line(Bytes),
    /// End the response with an error, so hyper drops the connection
    /// without the terminating chunk.
    Abort,
}

struct WatchBody {
    events: mpsc::UnboundedReceiver<WatchMessage>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.events.poll_recv(cx) {
            Poll::Ready(Some(WatchMessage::Line(line))) => {
                return Poll::Ready(Some(Ok(Frame::data(line))));
            }
            Poll::Ready(Some(WatchMessage::Abort)) => {
                return Poll::Ready(Some(Err("watch broken by the test".into())));
            }
            // The server ended the watch (after a 410): a clean end.
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        // timeoutSeconds: end cleanly, with the terminating chunk.
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

// ---------------------------------------------------------------------------
// Errors

/// A failure, answered as a `Status` object with the matching HTTP code.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "Invalid", message)
    }

    fn no_such_path() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    fn about(mut self, resource: usize, name: &str) -> ApiError {
        let rt = &RESOURCES[resource];
        self.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        self
    }

    fn not_found(resource: usize, name: &str) -> ApiError {
        let message = format!("{} {name:?} not found", RESOURCES[resource].qualified());
        ApiError::new(404, "NotFound", message).about(resource, name)
    }

    fn conflict(resource: usize, name: &str, why: &str) -> ApiError {
        let message = format!(
            "Operation cannot be fulfilled on {} {name:?}: {why}",
            RESOURCES[resource].qualified()
        );
        ApiError::new(409, "Conflict", message).about(resource, name)
    }

    fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    fn response(&self) -> Response<ResponseBody> {
        json_response(self.code, &self.status())
    }
}

// ---------------------------------------------------------------------------
// Query parameters and selectors

struct Query(Vec<(String, String)>);

impl Query {
    /// `a=b&c=d`, percent-decoded; kube starts its queries with `?&`.
    fn parse(query: &str) -> Result<Query, ApiError> {
        let mut pairs = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match (percent_decode(key), percent_decode(value)) {
                (Some(key), Some(value)) => pairs.push((key, value)),
                _ => return Err(ApiError::bad_request(format!("malformed query {pair:?}"))),
            }
        }
        Ok(Query(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn number(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid {key} {v:?}"))),
        }
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[derive(Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelRequirement {
    /// As Kubernetes: `!=` and `notin` also match objects without the label.
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        match self {
            LabelRequirement::Equals(k, v) => label(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        }
    }
}

/// `a=b,c!=d,e,!f,g in (h,i),j notin (k)`: all must hold.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut requirements = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    let mut terms = Vec::new();
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let key = |k: &str| {
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(format!("invalid label key {k:?} in {selector:?}"));
        }
        Ok(k.to_owned())
    };
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = if let Some(k) = term.strip_prefix('!') {
            LabelRequirement::NotExists(key(k)?)
        } else if let Some((head, values)) = term.strip_suffix(')').and_then(|t| t.split_once('('))
        {
            let values: Vec<String> = values.split(',').map(|v| v.trim().to_owned()).collect();
            match head.split_whitespace().collect::<Vec<_>>().as_slice() {
                [k, "in"] => LabelRequirement::In(key(k)?, values),
                [k, "notin"] => LabelRequirement::NotIn(key(k)?, values),
                _ => return Err(format!("invalid label selector term {term:?}")),
            }
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelRequirement::NotEquals(key(k)?, v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::Equals(key(k)?, v.trim().to_owned())
        } else {
            LabelRequirement::Exists(key(term)?)
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

#[derive(Debug, PartialEq)]
struct FieldRequirement {
    field: String,
    value: String,
    equals: bool,
}

/// `metadata.name=x,spec.nodeName!=y`, on the fields the real server
/// supports for the resource.
fn parse_field_selector(resource: usize, selector: &str) -> Result<Vec<FieldRequirement>, String> {
    let mut requirements = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (field, value, equals) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (f, v, true)
        } else {
            return Err(format!("invalid field selector term {term:?}"));
        };
        let field = field.trim();
        let supported = ["metadata.name", "metadata.namespace"]
            .iter()
            .chain(RESOURCES[resource].fields)
            .any(|f| *f == field);
        if !supported {
            return Err(format!(
                "field label not supported: {field} (for {})",
                RESOURCES[resource].qualified()
            ));
        }
        requirements.push(FieldRequirement {
            field: field.to_owned(),
            value: value.trim().to_owned(),
            equals,
        });
    }
    Ok(requirements)
}

/// A field's value as a field selector compares it; absent is empty.
fn field_value(object: &Value, field: &str) -> String {
    let value = field.split('.').try_fold(object, |v, part| v.get(part));
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// A request's label and field selectors.
#[derive(Debug, Default)]
struct Filter {
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Filter {
    fn parse(resource: usize, query: &Query) -> Result<Filter, ApiError> {
        Ok(Filter {
            labels: parse_label_selector(query.get("labelSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?,
            fields: parse_field_selector(resource, query.get("fieldSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = object["metadata"]["labels"].as_object();
        self.labels.iter().all(|r| r.matches(labels))
            && self
                .fields
                .iter()
                .all(|r| (field_value(object, &r.field) == r.value) == r.equals)
    }
}

struct WatchParams {
    /// None: start with the current objects (`resourceVersion` empty or 0).
    from: Option<u64>,
    bookmarks: bool,
    send_initial_events: bool,
    timeout: Option<Duration>,
}

impl WatchParams {
    fn parse(query: &Query) -> Result<WatchParams, ApiError> {
        let params = WatchParams {
            from: query.number("resourceVersion")?.filter(|&rv| rv != 0),
            bookmarks: query.flag("allowWatchBookmarks"),
            send_initial_events: query.flag("sendInitialEvents"),
            timeout: query.number("timeoutSeconds")?.map(Duration::from_secs),
        };
        // As kube-apiserver validates streaming lists.
        if params.send_initial_events && !params.bookmarks {
            return Err(ApiError::invalid(
                "allowWatchBookmarks: Required value: allowWatchBookmarks must be set to true when sendInitialEvents is set",
            ));
        }
        Ok(params)
    }
}

// ---------------------------------------------------------------------------
// The store

type ObjectKey = (usize, String, String);

/// Which part of an object a write replaces.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    /// The object through its main URL: the status is kept when the
    /// resource has a status subresource.
    Object,
    /// The `/status` subresource: only the status changes.
    Status,
    /// Everything, status included: the test's own `apply`.
    Whole,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

struct Event {
    resource_version: u64,
    resource: usize,
    namespace: String,
    kind: EventType,
    object: Value,
    /// The object before a modification, to tell watches with selectors
    /// that it entered or left their selection.
    previous: Option<Value>,
}

struct Watch {
    resource: usize,
    namespace: Option<String>,
    filter: Filter,
    bookmarks: bool,
    events: mpsc::UnboundedSender<WatchMessage>,
}

impl Watch {
    /// The line this watch gets for an event, if any. A modification that
    /// moves an object into or out of the selection is an ADDED or DELETED
    /// for it, as kube-apiserver's watch cache does.
    fn line(&self, event: &Event) -> Option<Bytes> {
        if event.resource != self.resource
            || self
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != event.namespace)
        {
            return None;
        }
        let now = self.filter.matches(&event.object);
        let before = event
            .previous
            .as_ref()
            .is_some_and(|p| self.filter.matches(p));
        let kind = match (event.kind, before, now) {
            (EventType::Added | EventType::Deleted, _, true) => event.kind,
            (EventType::Modified, true, true) => EventType::Modified,
            (EventType::Modified, false, true) => EventType::Added,
            (EventType::Modified, true, false) => EventType::Deleted,
            _ => return None,
        };
        Some(event_line(kind, &event.object))
    }
}

fn event_line(kind: EventType, object: &Value) -> Bytes {
    let kind = match kind {
        EventType::Added => "ADDED",
        EventType::Modified => "MODIFIED",
        EventType::Deleted => "DELETED",
    };
    line(&json!({"type": kind, "object": object}))
}

fn line(event: &Value) -> Bytes {
    let mut line = event.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark_line(rt: &ResourceType, resource_version: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(&json!({
        "type": "BOOKMARK",
        "object": {"apiVersion": rt.api_version(), "kind": rt.kind, "metadata": metadata},
    }))
}

struct Store {
    /// The resourceVersion of the latest write.
    resource_version: u64,
    /// Every event after this resourceVersion is in `history`.
    compacted: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<Event>,
    watches: Vec<Watch>,
    uid_seed: RandomState,
    uids: u64,
}

impl Store {
    fn new() -> Store {
        Store {
            // A real cluster never reports 0, which a watch would take to
            // mean "from any state": an empty server's list must not either.
            resource_version: 1,
            compacted: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            watches: Vec::new(),
            uid_seed: RandomState::new(),
            uids: 0,
        }
    }

    fn prune_watches(&mut self) {
        self.watches.retain(|w| !w.events.is_closed());
    }

    /// A random-looking version 4 UUID, unique within the server.
    fn new_uid(&mut self) -> String {
        self.uids += 1;
        let hash = |salt: u64| {
            let mut hasher = self.uid_seed.build_hasher();
            hasher.write_u64(self.uids);
            hasher.write_u64(salt);
            hasher.finish()
        };
        let (a, b) = (hash(1), hash(2));
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    /// Stores an object under the next resourceVersion, records the event
    /// and tells the watches; returns what was stored.
    fn commit(&mut self, resource: usize, mut object: Value) -> Value {
        self.resource_version += 1;
        let resource_version = self.resource_version;
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let previous = self
            .objects
            .insert((resource, namespace.clone(), name), object.clone());
        let kind = match previous {
            Some(_) => EventType::Modified,
            None => EventType::Added,
        };
        self.record(Event {
            resource_version,
            resource,
            namespace,
            kind,
            object: object.clone(),
            previous,
        });
        object
    }

    /// Removes an object under the next resourceVersion; returns it as
    /// the DELETED event carries it.
    fn remove(&mut self, resource: usize, namespace: &str, name: &str) -> Option<Value> {
        let mut object = self
            .objects
            .remove(&(resource, namespace.to_owned(), name.to_owned()))?;
        self.resource_version += 1;
        let resource_version = self.resource_version;
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        self.record(Event {
            resource_version,
            resource,
            namespace: namespace.to_owned(),
            kind: EventType::Deleted,
            object: object.clone(),
            previous: None,
        });
        Some(object)
    }

    fn record(&mut self, event: Event) {
        self.prune_watches();
        for watch in &self.watches {
            if let Some(line) = watch.line(&event) {
                let _ = watch.events.send(WatchMessage::Line(line));
            }
        }
        self.history.push_back(event);
        if self.history.len() > MAX_HISTORY
            && let Some(oldest) = self.history.pop_front()
        {
            self.compacted = oldest.resource_version;
        }
    }

    /// A new object: server-set metadata, generation 1.
    fn insert(&mut self, resource: usize, mut object: Value) -> Value {
        let uid = self.new_uid();
        let metadata = &mut object["metadata"];
        metadata["uid"] = json!(uid);
        metadata["creationTimestamp"] = json!(now_rfc3339());
        metadata["generation"] = json!(1);
        metadata["managedFields"] = written(&Value::Null, false);
        self.commit(resource, object)
    }

    /// The test's `apply`: create or replace everything.
    fn apply(&mut self, resource: usize, object: Value) -> Result<Value, ApiError> {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let namespace = scope(resource, Some(&namespace));
        let object = checked(resource, object, &namespace, None)?;
        let key = (resource, namespace, name_of(&object).to_owned());
        Ok(match self.objects.get(&key) {
            Some(stored) => {
                let next = updated(resource, stored, object, Part::Whole);
                self.commit(resource, next)
            }
            None => self.insert(resource, object),
        })
    }

    fn create(
        &mut self,
        resource: usize,
        namespace: &str,
        object: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let mut object = checked(resource, object, namespace, None)?;
        if let Some(rv) = object["metadata"].get("resourceVersion")
            && !rv.is_null()
            && rv != ""
        {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = name_of(&object).to_owned();
        if self
            .objects
            .contains_key(&(resource, namespace.to_owned(), name.clone()))
        {
            let message = format!(
                "{} {name:?} already exists",
                RESOURCES[resource].qualified()
            );
            return Err(ApiError::new(409, "AlreadyExists", message).about(resource, &name));
        }
        // The status is the controllers' to write, through /status.
        if RESOURCES[resource].status
            && let Some(object) = object.as_object_mut()
        {
            object.remove("status");
        }
        if dry_run {
            return Ok(object);
        }
        Ok(self.insert(resource, object))
    }

    fn stored(&self, key: &ObjectKey) -> Result<&Value, ApiError> {
        self.objects
            .get(key)
            .ok_or_else(|| ApiError::not_found(key.0, &key.2))
    }

    /// Stores `next` unless it changes nothing, which kube-apiserver answers
    /// with the stored object, no new resourceVersion and no event.
    fn update(&mut self, resource: usize, stored: Value, next: Value, dry_run: bool) -> Value {
        if next == stored || dry_run {
            return next;
        }
        self.commit(resource, next)
    }

    fn replace(
        &mut self,
        key: &ObjectKey,
        object: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let (resource, namespace, name) = key;
        let object = checked(*resource, object, namespace, Some(name))?;
        let stored = self.stored(key)?.clone();
        match object["metadata"]["resourceVersion"].as_str() {
            Some(rv) if !rv.is_empty() => precondition(*resource, name, &stored, rv)?,
            _ if !RESOURCES[*resource].unconditional_update => {
                return Err(ApiError::invalid(
                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                ));
            }
            _ => {}
        }
        let next = updated(*resource, &stored, object, part);
        Ok(self.update(*resource, stored, next, dry_run))
    }

    /// A JSON merge patch, or a server-side apply approximated by one.
    fn patch(
        &mut self,
        key: &ObjectKey,
        content_type: &str,
        patch: &Value,
        part: Part,
        dry_run: bool,
    ) -> Result<(u16, Value), ApiError> {
        let (resource, namespace, name) = key;
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        let apply = match media_type {
            "application/merge-patch+json" => false,
            "application/apply-patch+yaml" => true,
            _ => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format ({media_type:?}) - accepted media types include: application/merge-patch+json, application/apply-patch+yaml"
                    ),
                ));
            }
        };
        if !patch.is_object() {
            return Err(ApiError::bad_request("a patch must be a JSON object"));
        }
        // Server-side apply creates what does not exist yet.
        if apply && part == Part::Object && !self.objects.contains_key(key) {
            let created = self.create(*resource, namespace, patch.clone(), dry_run)?;
            return Ok((201, created));
        }
        let stored = self.stored(key)?.clone();
        // A resourceVersion in a patch is a precondition.
        if let Some(rv) = patch["metadata"]["resourceVersion"].as_str() {
            precondition(*resource, name, &stored, rv)?;
        }
        let mut target = stored.clone();
        merge_patch(&mut target, patch);
        let target = checked(*resource, target, namespace, Some(name))?;
        let next = updated(*resource, &stored, target, part);
        Ok((200, self.update(*resource, stored, next, dry_run)))
    }

    fn delete(
        &mut self,
        key: &ObjectKey,
        options: &Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let (resource, namespace, name) = key;
        let stored = self.stored(key)?;
        let preconditions = &options["preconditions"];
        if let Some(uid) = preconditions["uid"].as_str()
            && Some(uid) != stored["metadata"]["uid"].as_str()
        {
            let why = format!("Precondition failed: UID in precondition: {uid}");
            return Err(ApiError::conflict(*resource, name, &why));
        }
        if let Some(rv) = preconditions["resourceVersion"].as_str() {
            precondition(*resource, name, stored, rv)?;
        }
        if dry_run {
            return Ok(stored.clone());
        }
        self.remove(*resource, namespace, name)
            .ok_or_else(|| ApiError::not_found(*resource, name))
    }

    fn list(
        &self,
        resource: usize,
        namespace: Option<&str>,
        filter: &Filter,
        query: &Query,
    ) -> Result<Value, ApiError> {
        let limit = query.number("limit")?.filter(|&l| l > 0);
        let (snapshot, after) = match query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let (rv, namespace, name) = decode_continue(token)
                    .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
                if rv < self.compacted {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some((namespace, name)))
            }
            None => (self.resource_version, None),
        };
        // Objects are kept in (namespace, name) order, the order pages go in.
        let start = match &after {
            Some((ns, name)) => std::ops::Bound::Excluded((resource, ns.clone(), name.clone())),
            None => std::ops::Bound::Included((resource, String::new(), String::new())),
        };
        let mut matching = self
            .objects
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|((r, _, _), _)| *r == resource)
            .filter(|((_, ns, _), _)| namespace.is_none_or(|n| n == ns))
            .filter(|(_, object)| filter.matches(object));
        let limit = limit
            .and_then(|l| usize::try_from(l).ok())
            .unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last = None;
        for ((_, ns, name), object) in matching.by_ref().take(limit) {
            items.push(object.clone());
            last = Some((ns, name));
        }
        // Every page carries the first page's resourceVersion, so a watch
        // from it replays whatever changed while the pages were read.
        let mut metadata = json!({"resourceVersion": snapshot.to_string()});
        if let (Some(_), Some((ns, name))) = (matching.next(), last) {
            metadata["continue"] = json!(encode_continue(snapshot, ns, name));
        }
        let rt = &RESOURCES[resource];
        Ok(json!({
            "apiVersion": rt.api_version(),
            "kind": format!("{}List", rt.kind),
            "metadata": metadata,
            "items": items,
        }))
    }

    fn watch(
        &mut self,
        resource: usize,
        namespace: Option<String>,
        filter: Filter,
        params: &WatchParams,
    ) -> Result<mpsc::UnboundedReceiver<WatchMessage>, ApiError> {
        let (events, receiver) = mpsc::unbounded_channel();
        let watch = Watch {
            resource,
            namespace,
            filter,
            bookmarks: params.bookmarks,
            events,
        };
        let send = |line| {
            let _ = watch.events.send(WatchMessage::Line(line));
        };
        match params.from {
            // Too old: one ERROR event, then the stream ends, as
            // kube-apiserver answers (HTTP 200 and a 410 Status in the event).
            Some(from) if from < self.compacted && !params.send_initial_events => {
                let error = ApiError::expired(format!(
                    "too old resource version: {from} ({})",
                    self.compacted
                ));
                send(line(&json!({"type": "ERROR", "object": error.status()})));
                return Ok(receiver);
            }
            Some(from) if !params.send_initial_events => {
                for event in self.history.iter().filter(|e| e.resource_version > from) {
                    if let Some(line) = watch.line(event) {
                        send(line);
                    }
                }
            }
            // Start from the current state: an ADDED for each object.
            _ => {
                let objects = self
                    .objects
                    .range((resource, String::new(), String::new())..)
                    .take_while(|((r, _, _), _)| *r == resource)
                    .filter(|((_, ns, _), _)| watch.namespace.as_ref().is_none_or(|n| n == ns))
                    .filter(|(_, object)| watch.filter.matches(object));
                for (_, object) in objects {
                    send(event_line(EventType::Added, object));
                }
                if params.send_initial_events {
                    send(bookmark_line(
                        &RESOURCES[resource],
                        self.resource_version,
                        true,
                    ));
                }
            }
        }
        self.watches.push(watch);
        Ok(receiver)
    }
}

/// 409 unless the stored object is at `resource_version`.
fn precondition(
    resource: usize,
    name: &str,
    stored: &Value,
    resource_version: &str,
) -> Result<(), ApiError> {
    if stored["metadata"]["resourceVersion"].as_str() == Some(resource_version) {
        return Ok(());
    }
    Err(ApiError::conflict(
        resource,
        name,
        "the object has been modified; please apply your changes to the latest version and try again",
    ))
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// Checks what a client sent against the URL and the resource, and fills
/// in apiVersion, kind, namespace and (from generateName) the name.
fn checked(
    resource: usize,
    mut object: Value,
    namespace: &str,
    name: Option<&str>,
) -> Result<Value, ApiError> {
    let rt = &RESOURCES[resource];
    let Some(fields) = object.as_object_mut() else {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    };
    for (field, expected) in [
        ("apiVersion", rt.api_version()),
        ("kind", rt.kind.to_owned()),
    ] {
        match fields.get(field) {
            None | Some(Value::Null) => {
                fields.insert(field.to_owned(), json!(expected));
            }
            Some(value) if value.as_str() == Some(expected.as_str()) => {}
            Some(value) => {
                return Err(ApiError::bad_request(format!(
                    "{field} {value} does not match the URL's {expected:?}"
                )));
            }
        }
    }
    let metadata = fields.entry("metadata").or_insert_with(|| json!({}));
    let Some(metadata) = metadata.as_object_mut() else {
        return Err(ApiError::bad_request("metadata must be a JSON object"));
    };
    match metadata.get("namespace").and_then(Value::as_str) {
        _ if !rt.namespaced => {
            metadata.remove("namespace");
        }
        Some(ns) if !ns.is_empty() && ns != namespace => {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        _ => {
            metadata.insert("namespace".to_owned(), json!(namespace));
        }
    }
    let given = metadata
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let object_name = match (given.as_str(), name) {
        ("", None) => match metadata.get("generateName").and_then(Value::as_str) {
            Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", random_suffix()),
            _ => {
                return Err(ApiError::invalid(
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        },
        ("", Some(url)) => url.to_owned(),
        (given, Some(url)) if given != url => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({given}) does not match the name on the URL ({url})"
            )));
        }
        (given, _) => given.to_owned(),
    };
    if !valid_name(&object_name) {
        return Err(ApiError::invalid(format!(
            "metadata.name: Invalid value: {object_name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
        )));
    }
    metadata.insert("name".to_owned(), json!(object_name));
    Ok(object)
}

/// A DNS subdomain, as object names are.
fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut hash = RandomState::new().build_hasher().finish();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(hash % ALPHABET.len() as u64) as usize] as char;
            hash /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// The object to store when `incoming` updates `stored`: the server's
/// metadata from the stored object, the status from the side `part` says,
/// and the generation bumped when the spec changed.
fn updated(resource: usize, stored: &Value, incoming: Value, part: Part) -> Value {
    let mut next = match part {
        Part::Status => {
            let mut next = stored.clone();
            set_or_remove(&mut next, "status", incoming.get("status").cloned());
            next
        }
        Part::Object if RESOURCES[resource].status => {
            let mut next = incoming;
            set_or_remove(&mut next, "status", stored.get("status").cloned());
            next
        }
        Part::Object | Part::Whole => incoming,
    };
    let old = &stored["metadata"];
    for field in ["uid", "creationTimestamp", "resourceVersion"] {
        next["metadata"][field] = old[field].clone();
    }
    next["metadata"]["managedFields"] =
        written(&old["managedFields"], matches!(part, Part::Status));
    let generation = old["generation"].as_u64().unwrap_or(1);
    let spec_changed = next.get("spec") != stored.get("spec");
    next["metadata"]["generation"] = json!(generation + u64::from(spec_changed));
    next
}

/// `managedFields` after a write now: the entry of the object, or of its
/// status (`subresource: status`), gets the time of this write.
fn written(managed: &Value, status: bool) -> Value {
    let subresource = if status { "status" } else { "" };
    let mut entries: Vec<Value> = managed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["subresource"].as_str().unwrap_or_default() != subresource)
        .cloned()
        .collect();
    let mut entry = json!({
        "manager": "mesh-tests",
        "operation": "Update",
        "time": now_rfc3339(),
        "fieldsType": "FieldsV1",
        "fieldsV1": {},
    });
    if status {
        entry["subresource"] = json!("status");
    }
    entries.push(entry);
    Value::Array(entries)
}

fn set_or_remove(object: &mut Value, field: &str, value: Option<Value>) {
    if let Some(fields) = object.as_object_mut() {
        match value {
            Some(value) => fields.insert(field.to_owned(), value),
            None => fields.remove(field),
        };
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Continue tokens are opaque to clients: hex of `rv\nnamespace\nname`.
fn encode_continue(resource_version: u64, namespace: &str, name: &str) -> String {
    format!("{resource_version}\n{namespace}\n{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, '\n');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, parts.next()?.to_owned(), parts.next()?.to_owned()))
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to a Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn label_selectors() {
        use LabelRequirement::*;
        let parsed = parse_label_selector("a=b, c!=d,e,!f,g in (h, i),j notin (k),l==m").unwrap();
        assert_eq!(
            parsed,
            vec![
                Equals("a".into(), "b".into()),
                NotEquals("c".into(), "d".into()),
                Exists("e".into()),
                NotExists("f".into()),
                In("g".into(), vec!["h".into(), "i".into()]),
                NotIn("j".into(), vec!["k".into()]),
                Equals("l".into(), "m".into()),
            ]
        );
        let labels = json!({"a": "b", "e": "", "g": "i"});
        let labels = labels.as_object();
        assert!(parsed[..6].iter().all(|r| r.matches(labels)));
        assert!(!parsed[6].matches(labels));
        assert!(parse_label_selector("a b=c").is_err());
        assert!(!parse_label_selector("x in (a)").unwrap()[0].matches(None));
        assert!(parse_label_selector("x notin (a)").unwrap()[0].matches(None));
    }

    #[test]
    fn field_selectors() {
        let pod = resource_by_kind("v1", "Pod").unwrap();
        let lease = resource_by_kind("coordination.k8s.io/v1", "Lease").unwrap();
        let parsed = parse_field_selector(pod, "spec.nodeName=n1,metadata.name!=x").unwrap();
        let filter = Filter {
            labels: vec![],
            fields: parsed,
        };
        assert!(filter.matches(&json!({"metadata": {"name": "y"}, "spec": {"nodeName": "n1"}})));
        assert!(!filter.matches(&json!({"metadata": {"name": "x"}, "spec": {"nodeName": "n1"}})));
        assert!(!filter.matches(&json!({"metadata": {"name": "y"}})));
        assert!(parse_field_selector(lease, "spec.nodeName=n1").is_err());
        assert!(parse_field_selector(pod, "spec.nodeName").is_err());
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1]});
        merge_patch(
            &mut target,
            &json!({"a": "z", "c": {"f": null}, "l": [2], "n": {"o": 1}}),
        );
        assert_eq!(
            target,
            json!({"a": "z", "c": {"d": "e"}, "l": [2], "n": {"o": 1}})
        );
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, "ns", "a.b");
        assert_eq!(
            decode_continue(&token),
            Some((42, "ns".into(), "a.b".into()))
        );
        assert_eq!(decode_continue("zz"), None);
        assert_eq!(decode_continue("abc"), None);
    }

    #[test]
    fn routes() {
        let pod = resource_by_kind("v1", "Pod").unwrap();
        let ns = resource_by_kind("v1", "Namespace").unwrap();
        assert!(
            matches!(parse_route("/api/v1/pods"), Ok(Route::Collection { resource, namespace: None }) if resource == pod)
        );
        assert!(matches!(
            parse_route("/api/v1/namespaces/x/pods/p/status"),
            Ok(Route::Object { resource, status: true, .. }) if resource == pod
        ));
        assert!(matches!(
            parse_route("/api/v1/namespaces/x/status"),
            Ok(Route::Object { resource, status: true, .. }) if resource == ns
        ));
        assert!(
            matches!(parse_route("/api/v1/namespaces/x"), Ok(Route::Object { resource, .. }) if resource == ns)
        );
        assert!(parse_route("/api/v1/pods/p").is_err());
        assert!(parse_route("/api/v1/namespaces/x/nodes").is_err());
        assert!(parse_route("/apis/example.com/v1/widgets").is_err());
        assert!(parse_route("/api/v1/namespaces/x/pods/p/log").is_err());
        assert!(parse_route("/api/v1/namespaces//pods").is_err());
    }

    #[test]
    fn names() {
        assert!(valid_name("pod-1.a"));
        assert!(!valid_name("Pod"));
        assert!(!valid_name("-a"));
        assert!(!valid_name(""));
    }
}
