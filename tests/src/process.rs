//! Processes a test starts inside its pods: each runs in a pod's network
//! namespace and, for mesh workloads, in the test's cgroup. They are stopped
//! by PID when their guard drops, never by name.
use std::{
    io::Read as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{cgroup::TestCgroup, netns::Netns};

/// Where a process runs.
pub struct Placement<'a> {
    pub netns: Option<&'a Netns>,
    /// `None`: outside the mesh's cgroup (not a mesh workload).
    pub cgroup: Option<&'a TestCgroup>,
}

/// Prepares `cmd` to enter the placement between fork and exec.
pub fn place(cmd: &mut Command, placement: &Placement<'_>) -> anyhow::Result<()> {
    let netns = placement.netns.map(Netns::file).transpose()?;
    let procs = placement.cgroup.map(TestCgroup::procs_file).transpose()?;
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (setns and write on descriptors opened before the fork); the files are
    // moved into the closure so they stay open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(ns) = &netns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                // "0" moves the writing process into the cgroup.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// A process the test started; killed by PID on drop.
pub struct Spawned {
    child: Option<Child>,
    what: String,
}

impl Spawned {
    pub fn spawn(mut cmd: Command, placement: &Placement<'_>) -> anyhow::Result<Self> {
        place(&mut cmd, placement)?;
        let what = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {what}: {e}"))?;
        Ok(Self {
            child: Some(child),
            what,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    /// Waits for the process to exit by itself, killing it after `timeout`.
    pub fn wait_output(mut self, timeout: Duration) -> anyhow::Result<Output> {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                let mut stdout = Vec::new();
                let mut stderr = Vec::new();
                if let Some(mut out) = child.stdout.take() {
                    out.read_to_end(&mut stdout)?;
                }
                if let Some(mut err) = child.stderr.take() {
                    err.read_to_end(&mut stderr)?;
                }
                return Ok(Output {
                    status,
                    stdout,
                    stderr,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{} did not finish within {timeout:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.child.as_mut().expect("running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait()?;
                self.child = None;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
