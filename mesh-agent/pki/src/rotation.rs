//! Keeping the node's SVIDs current: the certificate manager issues the
//! identities the node's workloads need, renews each at a fraction of its
//! lifetime, drops those no longer wanted, retries failures with capped
//! exponential backoff, takes the trust bundle from each answer of the CA,
//! and records what it holds in `<state-dir>/certs.json` (read by
//! `mesh-agent inspect certs`, also while the agent is down).
//!
//! Renewal only swaps the SVID in the store: connections open with the old
//! certificate keep running; new ones use the new certificate.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::{
    cert::{CertInfo, rfc3339},
    files::{self, Mode},
    issuer::Issuer,
    store::{Svid, SvidStore},
};
use mesh_policy::numeric_identity;

/// The longest the manager sleeps: it then looks at the issuer's trust
/// bundle again, and notices wall-clock jumps.
const RECHECK: Duration = Duration::from_secs(5);

/// The file, in the agent's state directory.
pub const STATE_FILE: &str = "certs.json";

#[derive(Debug, Clone, Serialize)]
pub struct CertManagerConfig {
    /// Lifetime requested for each SVID (the CA may grant less).
    pub lifetime: Duration,
    /// Renew when this fraction of the lifetime has passed.
    pub renew_fraction: f64,
    /// Where `certs.json` goes (the agent's state directory).
    pub state_dir: PathBuf,
}

/// Delays between attempts after a failure: `min`, doubled on each
/// failure up to `max`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// The certificate manager: a tokio task owning an issuer and feeding the
/// store. Dropping it stops the task (the store keeps what it holds).
pub struct CertManager {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    store: SvidStore,
    wanted: watch::Sender<HashSet<String>>,
    /// The wanted identities without a recorded certificate, sorted.
    missing: watch::Sender<Vec<String>>,
    /// The identities whose certificates the task has recorded in
    /// `certs.json`, as of its last record. Readiness waits for `missing`
    /// to empty and promises that `inspect certs` then lists every local
    /// workload's certificate: being in the store is not enough.
    recorded: std::sync::Mutex<HashSet<String>>,
}

impl Shared {
    /// Recomputes the wanted identities whose certificate is not recorded
    /// yet, under the watch's lock from the latest wanted set, so
    /// concurrent updates cannot leave a stale answer.
    fn refresh_missing(&self) {
        self.missing.send_if_modified(|missing| {
            let recorded = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            let mut now: Vec<String> = self
                .wanted
                .borrow()
                .iter()
                .filter(|id| !recorded.contains(*id))
                .cloned()
                .collect();
            now.sort();
            let changed = *missing != now;
            *missing = now;
            changed
        });
    }

    /// What the store holds has been recorded (or its record attempted,
    /// and the failure logged).
    fn recorded(&self) {
        let held = self
            .store
            .all()
            .iter()
            .map(|s| s.spiffe_id.clone())
            .collect();
        *self.recorded.lock().unwrap_or_else(|p| p.into_inner()) = held;
        self.refresh_missing();
    }
}

impl CertManager {
    /// Starts the task (inside a tokio runtime). Nothing is wanted yet.
    pub fn start(
        issuer: Arc<dyn Issuer>,
        store: impl Into<SvidStore>,
        config: CertManagerConfig,
    ) -> CertManager {
        CertManager::start_with_backoff(issuer, store, config, Backoff::default())
    }

    pub fn start_with_backoff(
        issuer: Arc<dyn Issuer>,
        store: impl Into<SvidStore>,
        config: CertManagerConfig,
        backoff: Backoff,
    ) -> CertManager {
        let store = store.into();
        let shared = Arc::new(Shared {
            store,
            wanted: watch::channel(HashSet::new()).0,
            missing: watch::channel(Vec::new()).0,
            recorded: Default::default(),
        });
        let task = tokio::spawn(run(issuer, shared.clone(), config, backoff));
        CertManager { shared, task }
    }

    /// The identities the node needs now (its local workloads'); missing
    /// ones are issued at once, others dropped.
    pub fn set_wanted(&self, spiffe_ids: HashSet<String>) {
        self.shared.wanted.send_if_modified(|wanted| {
            let changed = *wanted != spiffe_ids;
            *wanted = spiffe_ids;
            changed
        });
        self.shared.refresh_missing();
    }

    /// The wanted identities that have no certificate yet (empty: every
    /// local workload has one).
    pub fn missing(&self) -> watch::Receiver<Vec<String>> {
        self.shared.missing.subscribe()
    }

    /// Returns once every wanted identity has a certificate.
    #[cfg(test)]
    pub async fn wait_all_issued(&self) {
        let mut missing = self.missing();
        let _ = missing.wait_for(Vec::is_empty).await;
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the manager knows about one wanted identity beyond its SVID.
#[derive(Debug, Default)]
struct Entry {
    renew_at: Option<SystemTime>,
    retry_at: Option<SystemTime>,
    backoff: Duration,
    last_error: Option<String>,
}

async fn run(
    issuer: Arc<dyn Issuer>,
    shared: Arc<Shared>,
    config: CertManagerConfig,
    backoff: Backoff,
) {
    let mut wanted_rx = shared.wanted.subscribe();
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let store = &shared.store;
    let mut first_round = true;
    loop {
        let wanted = wanted_rx.borrow_and_update().clone();
        let now = SystemTime::now();
        // The first round records what the store starts with.
        let mut changed = first_round;
        first_round = false;

        for svid in store.all() {
            if !wanted.contains(&svid.spiffe_id) {
                store.remove(&svid.spiffe_id);
                info!(identity = %svid.spiffe_id, "certificate dropped: no local workload needs it");
                changed = true;
            } else if now >= svid.not_after {
                store.remove(&svid.spiffe_id);
                warn!(identity = %svid.spiffe_id, "certificate expired before it could be renewed");
                changed = true;
            }
        }
        let before = entries.len();
        entries.retain(|id, _| wanted.contains(id));
        changed |= entries.len() != before;

        let due: Vec<&String> = wanted
            .iter()
            .filter(|id| {
                let entry = entries.get(*id);
                match (entry.and_then(|e| e.retry_at), store.get(id)) {
                    (Some(retry_at), _) => retry_at <= now,
                    (None, None) => true,
                    (None, Some(_)) => entry.and_then(|e| e.renew_at).is_none_or(|at| at <= now),
                }
            })
            .collect();
        if !due.is_empty() {
            let results =
                futures::future::join_all(due.iter().map(|id| issuer.issue(id, config.lifetime)))
                    .await;
            let now = SystemTime::now();
            for (id, result) in due.into_iter().zip(results) {
                let entry = entries.entry(id.clone()).or_default();
                match result {
                    Ok(svid) if svid.spiffe_id == *id => {
                        info!(
                            identity = %id,
                            serial = %svid.serial,
                            not_after = %rfc3339(svid.not_after),
                            "certificate issued"
                        );
                        *entry = Entry {
                            renew_at: Some(renew_at(now, svid.not_after, config.renew_fraction)),
                            ..Entry::default()
                        };
                        store.insert(svid);
                    }
                    Ok(svid) => {
                        warn!(identity = %id, got = %svid.spiffe_id, "issuer returned another identity");
                        failed(
                            entry,
                            now,
                            &backoff,
                            "issuer returned another identity".into(),
                        );
                    }
                    Err(e) => {
                        let retry = failed(entry, now, &backoff, e.to_string());
                        warn!(identity = %id, error = %e, retry_in = ?retry, "certificate request failed");
                    }
                }
            }
            changed = true;
        }
        // Every round, not only after an issuance: in standalone mode a
        // rotated or pruned CA's bundle reaches the node within seconds (a
        // remote CA sends its bundle with each certificate).
        match store.trust_bundle().replace(issuer.trust_bundle()) {
            Ok(true) => {
                info!("trust bundle updated");
                changed = true;
            }
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "the CA's trust bundle is unusable; keeping the previous one")
            }
        }

        if changed {
            // Recorded before readiness is announced: whoever waits for
            // ready (the agent's "ready", then `inspect certs`) finds it.
            if let Err(e) = write_state(&config.state_dir, store, &entries) {
                warn!(error = %e, "cannot record the certificates' state");
            }
            shared.recorded();
        }

        // Sleep until the next renewal, retry or expiry, or a new wanted set.
        let next = entries
            .iter()
            .filter_map(|(id, e)| match e.retry_at {
                Some(at) => Some(at),
                None if store.get(id).is_some() => e.renew_at,
                None => Some(SystemTime::now()),
            })
            .chain(store.all().iter().map(|s| s.not_after))
            .min();
        let wait = next.map_or(RECHECK, |at| {
            at.duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(RECHECK)
        });
        tokio::select! {
            changed = wanted_rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// When to renew: `fraction` of the way from now (issuance) to expiry.
fn renew_at(issued: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    issued + life.mul_f64(fraction.clamp(0.0, 1.0))
}

/// Records a failure; returns the delay before the next attempt: doubled
/// each time from `backoff.min` up to `backoff.max`, plus up to a quarter of
/// jitter so that many nodes do not retry in step.
fn failed(entry: &mut Entry, now: SystemTime, backoff: &Backoff, error: String) -> Duration {
    entry.backoff = if entry.backoff.is_zero() {
        backoff.min
    } else {
        (entry.backoff * 2).min(backoff.max)
    };
    let mut random = [0u8; 1];
    super::random_bytes(&mut random);
    let delay = entry.backoff + entry.backoff.mul_f64(f64::from(random[0]) / 1024.0);
    entry.retry_at = Some(now + delay);
    entry.last_error = Some(error);
    delay
}

/// `certs.json`, also what `inspect certs -o json` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertState {
    pub updated: String,
    /// The identities that have a certificate, by SPIFFE ID.
    pub certificates: Vec<CertificateState>,
    /// Wanted identities still without one.
    pub pending: Vec<PendingState>,
    pub trust_bundle: Vec<RootState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertificateState {
    pub spiffe_id: String,
    /// The kernel's number, as a decimal string (beyond JSON's exact
    /// integers).
    pub identity: String,
    /// Lowercase hex.
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub renew_at: String,
    /// The last failed renewal, while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingState {
    pub spiffe_id: String,
    pub identity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootState {
    pub subject: String,
    pub not_after: String,
}

pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

/// The certificate manager's last record, as `inspect certs`, `status`,
/// the metrics and the admin endpoint show it.
pub fn read_state(state_dir: &Path) -> anyhow::Result<CertState> {
    let path = state_path(state_dir);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no certificate state (has the agent run with mutual TLS?)",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a certificate state file", path.display()))
}

/// Whether `read_state` failed because there is no record at all (the
/// agent has not run with mutual TLS), rather than an unreadable one.
pub fn no_state(state_dir: &Path) -> bool {
    !state_path(state_dir).exists()
}

fn write_state(
    dir: &Path,
    store: &SvidStore,
    entries: &HashMap<String, Entry>,
) -> Result<(), files::FileError> {
    let svids: HashMap<String, Arc<Svid>> = store
        .all()
        .into_iter()
        .map(|s| (s.spiffe_id.clone(), s))
        .collect();
    let mut certificates: Vec<CertificateState> = svids
        .values()
        .map(|s| {
            let entry = entries.get(&s.spiffe_id);
            CertificateState {
                spiffe_id: s.spiffe_id.clone(),
                identity: s.identity.to_string(),
                serial: s.serial.clone(),
                not_before: rfc3339(s.not_before),
                not_after: rfc3339(s.not_after),
                renew_at: rfc3339(entry.and_then(|e| e.renew_at).unwrap_or(s.not_after)),
                last_error: entry.and_then(|e| e.last_error.clone()),
                retry_at: entry.and_then(|e| e.retry_at).map(rfc3339),
            }
        })
        .collect();
    certificates.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
    let mut pending: Vec<PendingState> = entries
        .iter()
        .filter(|(id, _)| !svids.contains_key(*id))
        .map(|(id, e)| PendingState {
            spiffe_id: id.clone(),
            identity: numeric_identity(id).to_string(),
            last_error: e.last_error.clone(),
            retry_at: e.retry_at.map(rfc3339),
        })
        .collect();
    pending.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
    let trust_bundle = store
        .trust_bundle()
        .roots()
        .iter()
        .filter_map(|r| CertInfo::parse(r).ok())
        .map(|r| RootState {
            subject: r.subject,
            not_after: rfc3339(r.not_after),
        })
        .collect();
    let state = CertState {
        updated: rfc3339(SystemTime::now()),
        certificates,
        pending,
        trust_bundle,
    };
    let _ = std::fs::create_dir_all(dir);
    let mut text = serde_json::to_string_pretty(&state).expect("state serialises");
    text.push('\n');
    files::write_atomic(&state_path(dir), text.as_bytes(), Mode::Public)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rustls::pki_types::CertificateDer;

    use super::*;
    use crate::{
        ca::{Ca, CaHandle, DEFAULT_CA_LIFETIME},
        issuer::{BoxFuture, IssueError, LocalIssuer},
        testing::{TempDir, TestCa},
        verify::TrustBundle,
    };

    const TD: &str = "cluster.local";

    fn id(sa: &str) -> String {
        mesh_policy::spiffe_id(TD, "shop", sa)
    }

    fn start(issuer: impl Issuer + 'static, store: &SvidStore, state_dir: &Path) -> CertManager {
        CertManager::start_with_backoff(
            Arc::new(issuer),
            store.clone(),
            CertManagerConfig {
                lifetime: Duration::from_secs(2),
                renew_fraction: 0.5,
                state_dir: state_dir.to_owned(),
            },
            Backoff {
                min: Duration::from_millis(20),
                max: Duration::from_millis(100),
            },
        )
    }

    /// Waits until `done` holds, for at most 5 s.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let waited = async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), waited)
            .await
            .unwrap_or_else(|_| panic!("{what}: not within 5 s"));
    }

    #[tokio::test]
    async fn issues_renews_drops_and_records() {
        let dir = TempDir::new("cert-manager");
        let ca = Ca::init(TD, &dir.path().join("ca"), None, DEFAULT_CA_LIFETIME).unwrap();
        let bundle = TrustBundle::new(ca.bundle().to_vec()).unwrap();
        let issuer = LocalIssuer::new(
            CaHandle::fixed(ca),
            "node-a",
            Arc::new(|_: &str, _: &str| Ok(())),
        );
        let store = SvidStore::new(TD, bundle);
        let state_dir = dir.path().join("state");
        let manager = start(issuer, &store, &state_dir);
        assert!(manager.missing().borrow().is_empty());

        manager.set_wanted([id("cart"), id("frontend")].into());
        assert_eq!(
            *manager.missing().borrow(),
            [id("cart"), id("frontend")],
            "missing until issued"
        );
        tokio::time::timeout(Duration::from_secs(5), manager.wait_all_issued())
            .await
            .unwrap();
        let first = store.get(&id("cart")).unwrap().serial.clone();

        // Renewed at half of its two seconds.
        let renewed = async {
            loop {
                let serial = store.get(&id("cart")).map(|s| s.serial.clone());
                if serial.is_some_and(|s| s != first) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), renewed)
            .await
            .unwrap();

        let text = std::fs::read_to_string(state_path(&state_dir)).unwrap();
        let state: CertState = serde_json::from_str(&text).unwrap();
        let ids: Vec<&str> = state
            .certificates
            .iter()
            .map(|i| i.spiffe_id.as_str())
            .collect();
        assert_eq!(ids, vec![id("cart").as_str(), id("frontend").as_str()]);
        assert!(state.pending.is_empty());
        let cart = &state.certificates[0];
        assert_eq!(cart.identity, numeric_identity(&id("cart")).to_string());
        assert_eq!(cart.serial.len(), 32);
        assert!(cart.renew_at < cart.not_after);
        assert_eq!(state.trust_bundle.len(), 1);
        assert!(
            state.trust_bundle[0]
                .subject
                .contains("mesh root CA cluster.local")
        );

        manager.set_wanted([id("frontend")].into());
        until("cart dropped", || store.get(&id("cart")).is_none()).await;
        assert!(manager.missing().borrow().is_empty());
    }

    /// Fails the first attempts, then issues from a test CA.
    struct Flaky {
        ca: TestCa,
        failures: Mutex<u32>,
        bundle: Vec<CertificateDer<'static>>,
    }

    impl Issuer for Flaky {
        fn issue<'a>(
            &'a self,
            spiffe_id: &'a str,
            _lifetime: Duration,
        ) -> BoxFuture<'a, Result<Svid, IssueError>> {
            Box::pin(async move {
                let mut failures = self.failures.lock().unwrap();
                if *failures > 0 {
                    *failures -= 1;
                    return Err(IssueError::Unavailable("connection refused".into()));
                }
                Ok(self.ca.svid(spiffe_id))
            })
        }

        fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
            self.bundle.clone()
        }
    }

    /// A reload sets the wanted set again while the task records what it
    /// has just issued: the certificate stays missing until it is
    /// recorded, so "ready" is never announced before `inspect certs` can
    /// list it (a CI run read certs.json right after "ready" and found
    /// none). The record's temporary file is a FIFO here, so writing it
    /// holds the task between issuing and recording until the test reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_stays_missing_until_it_is_recorded() {
        let dir = TempDir::new("cert-manager-record");
        let ca = TestCa::root(TD);
        let bundle = ca.bundle().to_vec();
        let store = SvidStore::new(TD, TrustBundle::new(bundle.clone()).unwrap());
        let issuer = Flaky {
            ca,
            failures: Mutex::new(0),
            bundle,
        };
        let manager = start(issuer, &store, dir.path());
        // The first round's record, of no certificate yet.
        until("the first record", || state_path(dir.path()).exists()).await;
        let fifo = dir.path().join(format!(".{STATE_FILE}.tmp"));
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo {}", fifo.display());
        // The reader opens the FIFO when told, or when the test fails
        // first (the sender dropped): the task is never left blocked.
        let (read_now, go) = std::sync::mpsc::channel::<()>();
        let record = std::thread::spawn(move || {
            let _ = go.recv();
            std::fs::read_to_string(fifo).unwrap()
        });
        manager.set_wanted([id("cart")].into());
        until("cart issued", || store.get(&id("cart")).is_some()).await;

        manager.set_wanted([id("cart")].into());
        assert_eq!(
            *manager.missing().borrow(),
            [id("cart")],
            "issued, not recorded yet"
        );
        read_now.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), manager.wait_all_issued())
            .await
            .unwrap();
        assert!(record.join().unwrap().contains(&id("cart")));
    }

    #[tokio::test]
    async fn retries_failures_and_takes_the_bundle_from_the_issuer() {
        let dir = TempDir::new("cert-manager-retry");
        let ca = TestCa::root(TD);
        let rotated = TestCa::root(TD);
        let mut roots = ca.bundle().to_vec();
        roots.extend(rotated.bundle().iter().cloned());
        let issuer = Flaky {
            ca,
            failures: Mutex::new(3),
            bundle: roots.clone(),
        };
        let store = SvidStore::new(TD, TrustBundle::new(issuer.ca.bundle().to_vec()).unwrap());
        let manager = start(issuer, &store, dir.path());
        manager.set_wanted([id("cart")].into());
        // The failed attempts are recorded while retrying.
        until("the failures recorded", || {
            std::fs::read_to_string(state_path(dir.path()))
                .is_ok_and(|text| text.contains("connection refused"))
        })
        .await;
        tokio::time::timeout(Duration::from_secs(5), manager.wait_all_issued())
            .await
            .unwrap();
        assert_eq!(store.trust_bundle().roots(), roots);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let backoff = Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        let mut entry = Entry::default();
        let now = SystemTime::now();
        let mut backoffs = Vec::new();
        for _ in 0..5 {
            let delay = failed(&mut entry, now, &backoff, "x".into());
            assert!(delay >= entry.backoff && delay < entry.backoff.mul_f64(1.25));
            assert_eq!(entry.retry_at, Some(now + delay));
            backoffs.push(entry.backoff.as_secs());
        }
        assert_eq!(backoffs, vec![1, 2, 4, 5, 5]);
        assert_eq!(entry.backoff, Duration::from_secs(5));
        assert_eq!(
            renew_at(now, now + Duration::from_secs(100), 0.5),
            now + Duration::from_secs(50)
        );
    }
}
