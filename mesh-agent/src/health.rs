//! Whether the agent is ready: its policy source is reachable and what it
//! says is in the maps. Served on the health endpoint (`/ready`) and kept
//! in `<state-dir>/health.json` (replaced atomically) so operators can read
//! it while the agent is down; a not-ready agent still enforces the last
//! policy it applied.
use std::path::{Path, PathBuf};

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

pub struct Health {
    state_dir: PathBuf,
    current: watch::Sender<HealthReport>,
    /// Nothing reported yet (the watch holds [`HealthReport::starting`]).
    reported: bool,
}

impl Health {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            current: watch::channel(HealthReport::starting()).0,
            reported: false,
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("health.json")
    }

    /// Follows every transition from now on.
    pub fn watch(&self) -> HealthWatch {
        self.current.subscribe()
    }

    pub fn ready(&mut self) {
        self.set(HealthReport {
            ready: true,
            reason: String::new(),
        });
    }

    pub fn not_ready(&mut self, reason: impl Into<String>) {
        self.set(HealthReport {
            ready: false,
            reason: reason.into(),
        });
    }

    fn set(&mut self, report: HealthReport) {
        if self.reported && *self.current.borrow() == report {
            return;
        }
        self.reported = true;
        // The endpoint and the file first: whoever reads the log line
        // finds them saying the same.
        self.current.send_replace(report.clone());
        if let Err(e) = self.write(&report) {
            warn!(error = %e, "could not write {}", Self::path(&self.state_dir).display());
        }
        if report.ready {
            info!("ready");
        } else {
            warn!(reason = %report.reason, "not ready; the policy in force stays in force");
        }
    }

    fn write(&self, report: &HealthReport) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        let tmp = self.state_dir.join(".health.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(report)?)?;
        std::fs::rename(&tmp, Self::path(&self.state_dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_follows_transitions_and_the_file_too() {
        let dir = std::env::temp_dir().join(format!("mesh-health-{}", std::process::id()));
        let mut health = Health::new(&dir);
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
}
