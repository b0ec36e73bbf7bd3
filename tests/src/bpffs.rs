//! A bpf filesystem of the test's own: every mount of bpffs is a fresh,
//! empty instance, so the test's pins can't meet anyone else's.
use std::path::{Path, PathBuf};

use crate::run;

pub struct TestBpffs {
    mountpoint: PathBuf,
}

impl TestBpffs {
    pub fn mount(name: &str) -> anyhow::Result<Self> {
        let mountpoint = std::env::temp_dir().join(name).join("bpffs");
        std::fs::create_dir_all(&mountpoint)?;
        let dir = mountpoint.to_str().expect("utf-8 temp dir");
        run("mount", &["-t", "bpf", "bpf", dir])?;
        Ok(Self { mountpoint })
    }

    /// The directory the agent pins into (`--bpffs`).
    pub fn pin_dir(&self) -> PathBuf {
        self.mountpoint.join("mesh")
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for TestBpffs {
    fn drop(&mut self) {
        // Unmounting drops the pins, and with them the maps and links that
        // nothing else holds.
        let dir = self.mountpoint.to_string_lossy().into_owned();
        let _ = run("umount", &["-l", &dir]);
        let _ = std::fs::remove_dir(&self.mountpoint);
        if let Some(parent) = self.mountpoint.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}
