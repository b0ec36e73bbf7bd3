//! Named network namespaces (as `ip netns` makes them), removed on drop.
use std::{fs::File, path::PathBuf};

use crate::run;

pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection: the test's addresses are unique by
        // construction, and a link-local address still tentative drops the
        // first IPv6 packets routed over a new link.
        for conf in ["default", "all"] {
            ns.exec(
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.{conf}.accept_dad=0")],
            )?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args…`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs any command inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// The namespace's file, for setns(2).
    pub fn file(&self) -> anyhow::Result<File> {
        Ok(File::open(PathBuf::from("/run/netns").join(&self.name))?)
    }

    /// Runs `f` on a thread inside the namespace (sockets made there stay
    /// there).
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = self.file().expect("the namespace exists while self does");
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the test's namespace");
                f()
            })
            .join()
            .expect("the thread in the namespace panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Removing the namespace removes its interfaces (and the veth peers).
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}
