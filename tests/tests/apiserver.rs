//! The in-process API server against the ordinary kube client and
//! kube-runtime watchers, as the agent uses them. Pure userspace: no root,
//! no kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, ResourceExt};
use mesh_tests::apiserver::{ApiServer, RequestRecord};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

/// A client built the way the agent builds one from `--kubeconfig`.
async fn client(server: &ApiServer) -> Client {
    let path = std::env::temp_dir().join(format!(
        "{}.kubeconfig",
        mesh_tests::unique_name("apiserver")
    ));
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    Client::try_from(config).unwrap()
}

fn pod(namespace: &str, name: &str, labels: Value, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
    })
}

fn requests_with_verb(server: &ApiServer, verb: &str) -> Vec<RequestRecord> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.verb == verb)
        .collect()
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Polls a watch stream until `done` holds, collecting the errors it
/// yields. Polls in short slices so `done` is checked while the watcher
/// waits on an idle watch (a watcher's pending step survives the slice).
async fn pump_until<S, T>(
    stream: &mut S,
    errors: &mut Vec<watcher::Error>,
    mut done: impl FnMut() -> bool,
) where
    S: Stream<Item = Result<T, watcher::Error>> + Unpin,
{
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {WAIT:?}"
        );
        match tokio::time::timeout(Duration::from_millis(20), stream.next()).await {
            Err(_) | Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => errors.push(e),
            Ok(None) => panic!("the watch stream ended"),
        }
    }
}

/// Polls a watch stream for a while, collecting the errors it yields.
async fn pump_for<S, T>(stream: &mut S, errors: &mut Vec<watcher::Error>, duration: Duration)
where
    S: Stream<Item = Result<T, watcher::Error>> + Unpin,
{
    let deadline = Instant::now() + duration;
    while let Ok(item) = tokio::time::timeout_at(deadline, stream.next()).await {
        match item {
            Some(Ok(_)) => {}
            Some(Err(e)) => errors.push(e),
            None => panic!("the watch stream ended"),
        }
    }
}

/// Waits for a condition that a background task makes true.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// name → resourceVersion of the pods a reflector holds.
fn store_versions(store: &Store<Pod>) -> BTreeMap<String, String> {
    store
        .state()
        .iter()
        .map(|p| (p.name_any(), p.resource_version().unwrap_or_default()))
        .collect()
}

/// name → resourceVersion of the named pods as the server holds them.
fn server_versions(
    server: &ApiServer,
    namespace: &str,
    names: &[&str],
) -> BTreeMap<String, String> {
    names
        .iter()
        .map(|name| {
            let pod = server
                .get("v1", "Pod", Some(namespace), name)
                .unwrap_or_else(|| panic!("the server has no pod {name}"));
            let rv = pod["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .to_owned();
            ((*name).to_owned(), rv)
        })
        .collect()
}

#[tokio::test]
async fn version_parses() {
    let server = ApiServer::start().unwrap();
    let info = client(&server).await.apiserver_version().await.unwrap();
    assert_eq!(info.major, "1");
    assert_eq!(info.git_version, "v1.34.0-mesh-test");
    assert_eq!(requests_with_verb(&server, "version").len(), 1);
    // A real request over the socket, as the server recorded it.
    assert_eq!(server.requests()[0].path, "/version");
}

#[tokio::test]
async fn list_paginates_over_many_pages() {
    let server = ApiServer::start().unwrap();
    for i in 0..1203 {
        let namespace = if i % 2 == 0 { "ns-a" } else { "ns-b" };
        server.apply(pod(
            namespace,
            &format!("pod-{i}"),
            json!({"app": "web"}),
            "n1",
        ));
    }
    let pods: Api<Pod> = Api::all(client(&server).await);

    let mut names = BTreeSet::new();
    let mut pages = 0;
    let mut versions = BTreeSet::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = pods.list(&params).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 500, "page of {}", page.items.len());
        versions.insert(page.metadata.resource_version.clone().unwrap());
        for pod in &page.items {
            let key = format!("{}/{}", pod.namespace().unwrap(), pod.name_any());
            assert!(names.insert(key.clone()), "{key} listed twice");
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 1203);
    assert_eq!(
        versions.len(),
        1,
        "every page carries the first page's resourceVersion"
    );
    let lists = requests_with_verb(&server, "list");
    assert_eq!(lists[0].param("limit").as_deref(), Some("500"));
    assert!(lists[0].param("continue").is_none());
    assert!(lists[1].param("continue").is_some());

    // The watcher pages the same way (500 by default) into a full store.
    let (reader, writer) = reflector::store();
    let mut stream = pin!(watcher(pods, watcher::Config::default()).reflect(writer));
    let mut errors = Vec::new();
    pump_until(&mut stream, &mut errors, || reader.state().len() == 1203).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(requests_with_verb(&server, "list").len(), 3 + 3);
}

#[tokio::test]
async fn selectors_filter_lists_and_watches() {
    let server = ApiServer::start().unwrap();
    server.apply(pod("default", "a", json!({"app": "web"}), "n1"));
    server.apply(pod("default", "b", json!({"app": "web"}), "n2"));
    server.apply(pod("default", "c", json!({"app": "db"}), "n1"));
    server.apply(pod("default", "d", json!({}), "n1"));
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "default");

    let names = async |params: ListParams| -> Vec<String> {
        let list = pods.list(&params).await.unwrap();
        list.items.iter().map(|p| p.name_any()).collect()
    };
    assert_eq!(
        names(ListParams::default().labels("app=web")).await,
        ["a", "b"]
    );
    assert_eq!(
        names(ListParams::default().labels("app!=web")).await,
        ["c", "d"]
    );
    assert_eq!(
        names(ListParams::default().labels("app")).await,
        ["a", "b", "c"]
    );
    assert_eq!(names(ListParams::default().labels("!app")).await, ["d"]);
    assert_eq!(
        names(ListParams::default().labels("app in (db,cache)")).await,
        ["c"]
    );
    assert_eq!(
        names(ListParams::default().fields("spec.nodeName=n1")).await,
        ["a", "c", "d"]
    );
    assert_eq!(
        names(ListParams::default().fields("metadata.name=b")).await,
        ["b"]
    );
    let both = ListParams::default()
        .labels("app=web")
        .fields("spec.nodeName=n1");
    assert_eq!(names(both).await, ["a"]);
    let unsupported = pods
        .list(&ListParams::default().fields("spec.hostname=x"))
        .await;
    assert_eq!(api_error(unsupported).code, 400);

    // A watch with selectors sees objects enter and leave its selection.
    let config = watcher::Config::default()
        .labels("app=web")
        .fields("spec.nodeName=n1");
    let (reader, writer) = reflector::store();
    let mut stream = pin!(watcher(pods.clone(), config).reflect(writer));
    let mut errors = Vec::new();
    let in_store = |reader: &Store<Pod>| -> BTreeSet<String> {
        reader.state().iter().map(|p| p.name_any()).collect()
    };
    pump_until(&mut stream, &mut errors, || {
        in_store(&reader) == BTreeSet::from(["a".into()])
    })
    .await;
    server.apply(pod("default", "a", json!({"app": "db"}), "n1"));
    server.apply(pod("default", "b", json!({"app": "web"}), "n1"));
    pump_until(&mut stream, &mut errors, || {
        in_store(&reader) == BTreeSet::from(["b".into()])
    })
    .await;
    assert!(errors.is_empty(), "{errors:?}");
    let watch = &requests_with_verb(&server, "watch")[0];
    assert_eq!(watch.param("labelSelector").as_deref(), Some("app=web"));
    assert_eq!(
        watch.param("fieldSelector").as_deref(),
        Some("spec.nodeName=n1")
    );
}

#[tokio::test]
async fn watches_see_added_modified_deleted() {
    let server = ApiServer::start().unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "default");

    // The raw watch stream, event types as the server sent them.
    let from = server.resource_version().to_string();
    let mut raw = pin!(pods.watch(&WatchParams::default(), &from).await.unwrap());
    // The kube-runtime watcher on top.
    let mut events = pin!(watcher(pods.clone(), watcher::Config::default()));
    let mut next = async || {
        tokio::time::timeout(WAIT, events.next())
            .await
            .expect("a watcher event")
            .expect("the watcher goes on")
            .expect("no watcher error")
    };
    assert!(matches!(next().await, watcher::Event::Init));
    assert!(matches!(next().await, watcher::Event::InitDone));

    server.apply(pod("default", "x", json!({"v": "1"}), "n1"));
    let created = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("default", "y", json!({}), "n1")).unwrap(),
        )
        .await
        .unwrap();
    assert!(created.uid().is_some());
    server.apply(pod("default", "x", json!({"v": "2"}), "n1"));
    pods.delete("x", &DeleteParams::default()).await.unwrap();

    let seen: Vec<String> = {
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(match next().await {
                watcher::Event::Apply(p) => format!(
                    "apply {} v={}",
                    p.name_any(),
                    p.labels().get("v").map_or("", |v| v)
                ),
                watcher::Event::Delete(p) => format!("delete {}", p.name_any()),
                other => panic!("unexpected {other:?}"),
            });
        }
        seen
    };
    assert_eq!(
        seen,
        ["apply x v=1", "apply y v=", "apply x v=2", "delete x"]
    );

    let mut raw_seen = Vec::new();
    for _ in 0..4 {
        let event = tokio::time::timeout(WAIT, raw.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        raw_seen.push(match event {
            WatchEvent::Added(p) => format!("ADDED {}", p.name_any()),
            WatchEvent::Modified(p) => format!("MODIFIED {}", p.name_any()),
            WatchEvent::Deleted(p) => format!("DELETED {}", p.name_any()),
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(raw_seen, ["ADDED x", "ADDED y", "MODIFIED x", "DELETED x"]);
    assert_eq!(server.watch_count(), 2);
}

#[tokio::test]
async fn compaction_while_disconnected_forces_a_relist_that_converges() {
    let server = ApiServer::start().unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("pod-{i}")).collect();
    for name in &names {
        server.apply(pod("default", name, json!({"app": "web"}), "n1"));
    }
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "default");
    let (reader, writer) = reflector::store();
    let mut stream = pin!(watcher(pods, watcher::Config::default()).reflect(writer));
    let mut errors = Vec::new();
    pump_until(&mut stream, &mut errors, || {
        reader.state().len() == 20 && server.watch_count() == 1
    })
    .await;

    // The stream is not polled now, so the watcher cannot reconnect before
    // the changes and the compaction: it misses them for certain.
    server.break_watches();
    assert_eq!(server.watch_count(), 0);
    assert!(server.delete("v1", "Pod", Some("default"), "pod-3"));
    server.apply(pod(
        "default",
        "pod-5",
        json!({"app": "web", "tier": "changed"}),
        "n1",
    ));
    server.apply(pod("default", "pod-new", json!({"app": "web"}), "n1"));
    server.compact();

    let mut expected: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "pod-3")
        .collect();
    expected.push("pod-new");
    let want = server_versions(&server, "default", &expected);
    pump_until(&mut stream, &mut errors, || store_versions(&reader) == want).await;

    let pod5 = reader
        .state()
        .into_iter()
        .find(|p| p.name_any() == "pod-5")
        .unwrap();
    assert_eq!(
        pod5.labels().get("tier").map(String::as_str),
        Some("changed")
    );
    assert_eq!(
        requests_with_verb(&server, "list").len(),
        2,
        "a second LIST after 410"
    );
    let gone = errors
        .iter()
        .any(|e| matches!(e, watcher::Error::WatchError(status) if status.code == 410 && status.reason == "Expired"));
    assert!(gone, "the watcher saw 410 Expired: {errors:?}");
    // The re-watch after the break asked for the old resourceVersion.
    let watches = requests_with_verb(&server, "watch");
    assert!(watches.len() >= 2, "{watches:?}");
    assert_eq!(
        watches[0].param("resourceVersion"),
        watches[1].param("resourceVersion")
    );
}

#[tokio::test]
async fn bookmarks_are_consumed_and_move_the_resume_point() {
    let server = ApiServer::start().unwrap();
    server.apply(pod("default", "web-1", json!({"app": "web"}), "n1"));
    server.apply(pod("default", "web-2", json!({"app": "web"}), "n1"));
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "default");
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels("app=web");
    let mut stream = pin!(watcher(pods, config).reflect(writer));
    let mut errors = Vec::new();
    pump_until(&mut stream, &mut errors, || {
        reader.state().len() == 2 && server.watch_count() == 1
    })
    .await;
    let listed_at = server.resource_version();

    // Writes this watch does not select: only a bookmark tells it the
    // resourceVersion moved on.
    for i in 0..3 {
        server.apply(pod(
            "default",
            &format!("db-{i}"),
            json!({"app": "db"}),
            "n1",
        ));
    }
    let bookmarked_at = server.resource_version();
    assert!(bookmarked_at > listed_at);
    server.send_bookmarks();
    pump_for(&mut stream, &mut errors, Duration::from_millis(500)).await;

    // Resuming from the bookmark needs no history before it.
    server.compact();
    server.break_watches();
    server.apply(pod("default", "web-3", json!({"app": "web"}), "n1"));
    pump_until(&mut stream, &mut errors, || reader.state().len() == 3).await;

    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(requests_with_verb(&server, "list").len(), 1, "no relist");
    let watches = requests_with_verb(&server, "watch");
    assert_eq!(watches.len(), 2);
    assert_eq!(
        watches[0].param("allowWatchBookmarks").as_deref(),
        Some("true")
    );
    assert_eq!(
        watches[0].param("resourceVersion"),
        Some(listed_at.to_string())
    );
    assert_eq!(
        watches[1].param("resourceVersion"),
        Some(bookmarked_at.to_string())
    );
}

#[tokio::test]
async fn stopped_server_refuses_connections_and_the_watcher_converges_after_resume() {
    let server = ApiServer::start().unwrap();
    for i in 0..5 {
        server.apply(pod("default", &format!("pod-{i}"), json!({}), "n1"));
    }
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "default");
    let (reader, writer) = reflector::store();
    let watch = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(|_| async {});
    let task = tokio::spawn(watch);
    wait_until("first sync", || {
        reader.state().len() == 5 && server.watch_count() == 1
    })
    .await;

    server.stop_serving();
    let refused = tokio::net::TcpStream::connect(server.addr())
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let failed = pods.list(&ListParams::default()).await.unwrap_err();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&failed);
    let mut connection_refused = false;
    while let Some(error) = source {
        connection_refused |= error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
        source = error.source();
    }
    assert!(connection_refused, "not a connection error: {failed:?}");

    // Changes while the server is down reach the watcher afterwards.
    assert!(server.delete("v1", "Pod", Some("default"), "pod-1"));
    server.apply(pod("default", "pod-2", json!({"changed": "yes"}), "n1"));
    server.apply(pod("default", "pod-9", json!({}), "n1"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.resume_serving();

    let want = server_versions(
        &server,
        "default",
        &["pod-0", "pod-2", "pod-3", "pod-4", "pod-9"],
    );
    wait_until("convergence after resume", || {
        store_versions(&reader) == want
    })
    .await;
    // History was kept, so the watcher resumed without listing again.
    assert_eq!(requests_with_verb(&server, "list").len(), 1);
    task.abort();
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let server = ApiServer::start().unwrap();
    let gvk = GroupVersionKind::gvk("mesh.dev", "v1alpha1", "MeshPolicy");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "meshpolicies");
    let policies: Api<DynamicObject> =
        Api::namespaced_with(client(&server).await, "default", &resource);
    let policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "mesh.dev/v1alpha1",
        "kind": "MeshPolicy",
        "metadata": {"name": "allow-web"},
        "spec": {"action": "ALLOW"},
        "status": {"phase": "ignored on create"},
    }))
    .unwrap();
    let created = policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "status is not set by create"
    );

    // A status write changes only the status, and not the generation.
    let merge = Patch::Merge(json!({"status": {"phase": "Enforced"}, "spec": {"action": "DENY"}}));
    let patched = policies
        .patch_status("allow-web", &PatchParams::default(), &merge)
        .await
        .unwrap();
    assert_eq!(patched.data["status"]["phase"], "Enforced");
    assert_eq!(patched.data["spec"]["action"], "ALLOW");
    assert_eq!(patched.metadata.generation, Some(1));
    assert_ne!(patched.resource_version(), created.resource_version());
    let stored = server
        .get(
            "mesh.dev/v1alpha1",
            "MeshPolicy",
            Some("default"),
            "allow-web",
        )
        .unwrap();
    assert_eq!(stored["status"]["phase"], "Enforced");
    let record = requests_with_verb(&server, "patch").pop().unwrap();
    assert_eq!(
        record.path,
        "/apis/mesh.dev/v1alpha1/namespaces/default/meshpolicies/allow-web/status"
    );
    assert_eq!(
        record.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(record.body_json().unwrap()["status"]["phase"], "Enforced");

    // A spec change bumps the generation and leaves the status alone.
    let merge = Patch::Merge(json!({"spec": {"action": "DENY"}, "status": {"phase": "ignored"}}));
    let patched = policies
        .patch("allow-web", &PatchParams::default(), &merge)
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["action"], "DENY");
    assert_eq!(patched.data["status"]["phase"], "Enforced");
    assert_eq!(patched.metadata.generation, Some(2));

    // Metadata alone does not.
    let merge = Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}}));
    let patched = policies
        .patch("allow-web", &PatchParams::default(), &merge)
        .await
        .unwrap();
    assert_eq!(patched.labels().get("team").map(String::as_str), Some("a"));
    assert_eq!(patched.metadata.generation, Some(2));

    // A no-op write stores nothing new.
    let again = policies
        .patch("allow-web", &PatchParams::default(), &merge)
        .await
        .unwrap();
    assert_eq!(again.resource_version(), patched.resource_version());

    // Status through server-side apply, as controllers write it.
    let apply = Patch::Apply(json!({
        "apiVersion": "mesh.dev/v1alpha1",
        "kind": "MeshPolicy",
        "status": {"phase": "Applied"},
    }));
    let applied = policies
        .patch_status("allow-web", &PatchParams::apply("mesh-agent"), &apply)
        .await
        .unwrap();
    assert_eq!(applied.data["status"]["phase"], "Applied");
    assert_eq!(applied.metadata.generation, Some(2));

    // Patch types the server does not speak.
    let strategic = Patch::Strategic(json!({"spec": {"action": "AUDIT"}}));
    let refused = policies
        .patch("allow-web", &PatchParams::default(), &strategic)
        .await;
    assert_eq!(api_error(refused).code, 415);
}

#[tokio::test]
async fn writes_with_stale_resource_versions_conflict() {
    let server = ApiServer::start().unwrap();
    let leases: Api<Lease> = Api::namespaced(client(&server).await, "default");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "mesh-leader"},
        "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let again = api_error(leases.create(&PostParams::default(), &lease).await);
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));

    let mut mine = created.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("node-b".into());
    let replaced = leases
        .replace("mesh-leader", &PostParams::default(), &mine)
        .await
        .unwrap();
    assert_ne!(replaced.resource_version(), created.resource_version());

    // Another writer still holding the old resourceVersion loses.
    let mut theirs = created.clone();
    theirs.spec.as_mut().unwrap().holder_identity = Some("node-c".into());
    let conflict = api_error(
        leases
            .replace("mesh-leader", &PostParams::default(), &theirs)
            .await,
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    let stored = server
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some("default"),
            "mesh-leader",
        )
        .unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], "node-b");

    // Delete preconditions are checked the same way.
    let stale = DeleteParams::default().preconditions(kube::api::Preconditions {
        resource_version: created.resource_version(),
        uid: None,
    });
    let conflict = api_error(leases.delete("mesh-leader", &stale).await);
    assert_eq!(conflict.code, 409);
    leases
        .delete("mesh-leader", &DeleteParams::default())
        .await
        .unwrap();
    let missing = api_error(leases.get("mesh-leader").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
}

#[tokio::test]
async fn unknown_resources_are_not_found() {
    let server = ApiServer::start().unwrap();
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::all_with(client(&server).await, &resource);
    let status = api_error(widgets.list(&ListParams::default()).await);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
}

#[tokio::test]
async fn streaming_lists_start_with_initial_events() {
    let server = ApiServer::start().unwrap();
    for i in 0..3 {
        server.apply(pod("default", &format!("pod-{i}"), json!({}), "n1"));
    }
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "default");
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().streaming_lists();
    let mut stream = pin!(watcher(pods, config).reflect(writer));
    let mut errors = Vec::new();
    pump_until(&mut stream, &mut errors, || reader.state().len() == 3).await;
    server.apply(pod("default", "pod-3", json!({}), "n1"));
    pump_until(&mut stream, &mut errors, || reader.state().len() == 4).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(requests_with_verb(&server, "list").is_empty());
    let watches = requests_with_verb(&server, "watch");
    assert_eq!(watches.len(), 1);
    assert_eq!(
        watches[0].param("sendInitialEvents").as_deref(),
        Some("true")
    );
}

/// Sends one HTTP/1.1 request and reads the response until the server
/// closes the connection or `stop` says enough.
async fn raw_get(
    server: &ApiServer,
    path: &str,
    mut stop: impl FnMut(&str) -> bool,
) -> (tokio::net::TcpStream, String) {
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: apiserver\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buffer = [0; 4096];
    loop {
        let read = tokio::time::timeout(WAIT, stream.read(&mut buffer))
            .await
            .expect("response");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
        }
        if stop(&String::from_utf8_lossy(&response)) {
            break;
        }
    }
    (stream, String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test]
async fn watch_streams_end_cleanly_or_broken_as_asked() {
    let server = ApiServer::start().unwrap();
    server.apply(pod("default", "a", json!({}), "n1"));
    const END: &str = "\r\n0\r\n\r\n";

    // timeoutSeconds: the chunked response ends with the terminating chunk.
    let (_, text) = raw_get(
        &server,
        "/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1",
        |_| false,
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{text}"
    );
    assert!(text.contains(r#""type":"ADDED""#), "{text}");
    assert!(text.ends_with(END), "{text:?}");

    // break_watches: the connection closes without it.
    let path = "/api/v1/namespaces/default/pods?watch=1";
    let (mut stream, text) = raw_get(&server, path, |t| t.contains(r#""type":"ADDED""#)).await;
    assert_eq!(server.watch_count(), 1);
    server.break_watches();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the connection closes");
    let text = text + &String::from_utf8_lossy(&rest);
    assert!(!text.ends_with(END), "{text:?}");

    // A resourceVersion older than the history: one 410 ERROR event, then a clean end.
    server.apply(pod("default", "b", json!({}), "n1"));
    server.compact();
    let (_, text) = raw_get(
        &server,
        "/api/v1/namespaces/default/pods?watch=true&resourceVersion=1",
        |_| false,
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(r#""type":"ERROR""#) && text.contains(r#""code":410"#),
        "{text}"
    );
    assert!(text.contains(r#""reason":"Expired""#), "{text}");
    assert!(text.ends_with(END), "{text:?}");
}
