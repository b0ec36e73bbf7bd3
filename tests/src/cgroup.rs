//! A cgroup v2 directory of the test's own, for its pods' processes.
use std::{
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::privileges::cgroup2_root;

pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let root = cgroup2_root().map_err(anyhow::Error::msg)?;
        let path = root.join(name);
        std::fs::create_dir(&path)
            .map_err(|e| anyhow::anyhow!("creating cgroup {}: {e}", path.display()))?;
        Ok(Self { path })
    }

    /// A cgroup below this one (a node's pods, under the test's cgroup).
    pub fn child(&self, name: &str) -> anyhow::Result<Self> {
        let path = self.path.join(name);
        std::fs::create_dir(&path)
            .map_err(|e| anyhow::anyhow!("creating cgroup {}: {e}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`, opened before a fork so the child only has to write.
    pub fn procs_file(&self) -> anyhow::Result<File> {
        Ok(std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))?)
    }

    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Our processes are stopped by their own guards; a cgroup can only be
        // removed once it is empty, which may take a moment after they exit.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
