//! Kernel tests need root, bpf and a cgroup2 mount. They never skip: when
//! something is missing they fail, saying what.
use std::path::PathBuf;

/// Panics with a clear message unless this process can run kernel tests.
pub fn require_kernel_test_privileges() {
    if let Err(problem) = check() {
        panic!(
            "kernel tests cannot run here: {problem}\n\
             Run them as root on a kernel with BPF, cgroup v2 and network namespaces \
             (`sudo cargo xtask test`)."
        );
    }
}

fn check() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not running as root (needed for bpf, netns and cgroups)".into());
    }
    cgroup2_root()?;
    for tool in ["ip"] {
        if which(tool).is_none() {
            return Err(format!("`{tool}` is not installed (iproute2)"));
        }
    }
    Ok(())
}

/// Where cgroup v2 is mounted, from /proc/mounts.
pub fn cgroup2_root() -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| "no cgroup2 filesystem is mounted".to_string())
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(tool))
        .find(|p| p.is_file())
}
