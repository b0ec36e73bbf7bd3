//! Whether the agent is ready: its policy source is reachable and what it
//! says is in the maps. Kept in `<state-dir>/health.json` (replaced
//! atomically) so probes and operators can read it; a not-ready agent
//! still enforces the last policy it applied.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

pub struct Health {
    state_dir: PathBuf,
    current: Option<HealthReport>,
}

impl Health {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            current: None,
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("health.json")
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
        if self.current.as_ref() == Some(&report) {
            return;
        }
        if report.ready {
            info!("ready");
        } else {
            warn!(reason = %report.reason, "not ready; the policy in force stays in force");
        }
        if let Err(e) = self.write(&report) {
            warn!(error = %e, "could not write {}", Self::path(&self.state_dir).display());
        }
        self.current = Some(report);
    }

    fn write(&self, report: &HealthReport) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        let tmp = self.state_dir.join(".health.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(report)?)?;
        std::fs::rename(&tmp, Self::path(&self.state_dir))
    }
}
