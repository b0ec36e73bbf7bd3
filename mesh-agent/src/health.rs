//! Whether the agent is ready: its policy source is reachable and what it
//! says is in the maps, and (with mutual TLS) its workloads have their
//! certificates. Served on the health endpoint (`/ready`) and kept
//! in `<state-dir>/health.json` (replaced atomically) so operators can read
//! it while the agent is down; a not-ready agent still enforces the last
//! policy it applied.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl HealthReport {
    /// What an agent that has not reported yet is.
    pub fn starting() -> Self {
        Self {
            ready: false,
            reason: "starting: no policy applied yet".into(),
        }
    }

    /// `<state-dir>/health.json`, as the last agent wrote it.
    pub fn read(state_dir: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(Health::path(state_dir))?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// The live readiness, for the endpoints (cheap to clone).
pub type HealthWatch = watch::Receiver<HealthReport>;

/// The agent's readiness, from two conditions: the policy source is
/// applied (the control loop says so), and, when the agent starts with
/// mutual TLS, every local workload has its certificate. Ready means every
/// path serves at once: a connection to another node made the moment
/// `/ready` answers 200 gets its tunnel without waiting for anything.
/// Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    state_dir: PathBuf,
    current: watch::Sender<HealthReport>,
    /// Nothing reported yet (the watch holds [`HealthReport::starting`]).
    reported: bool,
    /// Ready once already: later transitions are news for operators.
    been_ready: bool,
    /// Why the policy source is not in the maps; `None` once applied.
    policy: Option<String>,
    /// Until the agent is first ready: the local workloads that have no
    /// certificate yet. Afterwards a new workload waiting for its first
    /// certificate does not make the whole node unready (its own tunnels
    /// are refused until then, and `inspect certs` says why).
    certificates: Option<watch::Receiver<Vec<String>>>,
}

impl Health {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                state_dir: state_dir.to_owned(),
                current: watch::channel(HealthReport::starting()).0,
                reported: false,
                been_ready: false,
                policy: Some(HealthReport::starting().reason),
                certificates: None,
            })),
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("health.json")
    }

    /// Follows every transition from now on.
    pub fn watch(&self) -> HealthWatch {
        self.lock().current.subscribe()
    }

    /// The policy source is applied.
    pub fn ready(&self) {
        let mut inner = self.lock();
        inner.policy = None;
        inner.publish();
    }

    /// The policy source is not applied, for `reason`.
    pub fn not_ready(&self, reason: impl Into<String>) {
        let mut inner = self.lock();
        inner.policy = Some(reason.into());
        inner.publish();
    }

    /// Holds readiness back until `missing` (the local workloads without a
    /// certificate) is empty, and follows it until then.
    pub fn wait_for_certificates(&self, mut missing: watch::Receiver<Vec<String>>) {
        self.lock().certificates = Some(missing.clone());
        let this = self.clone();
        tokio::spawn(async move {
            while missing.changed().await.is_ok() {
                let mut inner = this.lock();
                inner.publish();
                if inner.certificates.is_none() {
                    break;
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is replaced whole on every change: nothing a panic
        // could leave half-written.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn report(&self) -> HealthReport {
        if let Some(reason) = &self.policy {
            return HealthReport {
                ready: false,
                reason: reason.clone(),
            };
        }
        if let Some(missing) = &self.certificates {
            let missing = missing.borrow();
            if !missing.is_empty() {
                return HealthReport {
                    ready: false,
                    reason: format!(
                        "waiting for the certificates of {} (their connections to other nodes \
                         are refused until issued)",
                        missing.join(", ")
                    ),
                };
            }
        }
        HealthReport {
            ready: true,
            reason: String::new(),
        }
    }

    fn publish(&mut self) {
        let report = self.report();
        if report.ready {
            self.certificates = None;
        }
        if self.reported && *self.current.borrow() == report {
            return;
        }
        self.reported = true;
        // The endpoint and the file first: whoever reads the log line
        // finds them saying the same.
        self.current.send_replace(report.clone());
        if let Err(e) = self.write(&report) {
            warn!(error = %e, "could not write {}", Health::path(&self.state_dir).display());
        }
        if report.ready {
            self.been_ready = true;
            info!("ready");
        } else if self.been_ready {
            warn!(reason = %report.reason, "not ready; the policy in force stays in force");
        } else {
            // Starting up: each step is progress, not trouble.
            info!(reason = %report.reason, "not ready yet");
        }
    }

    fn write(&self, report: &HealthReport) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        let tmp = self.state_dir.join(".health.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(report)?)?;
        std::fs::rename(&tmp, Health::path(&self.state_dir))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_watch_follows_transitions_and_the_file_too() {
        let dir = std::env::temp_dir().join(format!("mesh-health-{}", std::process::id()));
        let health = Health::new(&dir);
        let watch = health.watch();
        assert_eq!(*watch.borrow(), HealthReport::starting());
        health.not_ready("invalid configuration: bad.yaml");
        assert!(!watch.borrow().ready);
        assert_eq!(
            HealthReport::read(&dir).unwrap().reason,
            "invalid configuration: bad.yaml"
        );
        health.ready();
        assert!(watch.borrow().ready);
        assert!(HealthReport::read(&dir).unwrap().ready);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn certificates_hold_back_the_first_readiness_and_only_the_first() {
        let dir = std::env::temp_dir().join(format!("mesh-health-certs-{}", std::process::id()));
        let health = Health::new(&dir);
        let mut watch = health.watch();
        let (missing, receiver) = watch::channel(Vec::new());
        health.wait_for_certificates(receiver);
        let web = "spiffe://cluster.local/ns/shop/sa/web".to_string();
        missing.send_replace(vec![web.clone()]);
        health.ready();
        assert!(!watch.borrow().ready, "ready without web's certificate");
        assert!(
            watch.borrow().reason.contains(&web),
            "{:?}",
            *watch.borrow()
        );

        // Issued: ready without any other call.
        missing.send_replace(Vec::new());
        tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|r| r.ready))
            .await
            .expect("ready once the certificate is there")
            .unwrap();

        // A workload that arrives later waits for its certificate alone.
        missing.send_replace(vec!["spiffe://cluster.local/ns/shop/sa/db".into()]);
        health.ready();
        assert!(watch.borrow().ready);
        // The policy still decides.
        health.not_ready("API server unreachable");
        assert_eq!(watch.borrow().reason, "API server unreachable");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
