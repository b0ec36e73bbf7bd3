//! Finding a local pod's network namespace from the cgroups kubelet puts
//! its processes in (the agent runs with the host's PID namespace).
//!
//! kubelet names a pod's cgroup after its uid: `…/kubepods/burstable/pod<uid>/…`
//! with the cgroupfs driver, `…/kubepods-burstable-pod<uid_with_underscores>.slice/…`
//! with the systemd driver. Every process of a pod shares the pod's network
//! namespace (host-network pods are not mesh workloads), so any one of them
//! gives it. Only kubelet and root can place processes in those cgroups, so
//! a pod cannot claim another pod's namespace, as it could with an
//! annotation.
//!
//! A namespace found is held open from then on, and named by the agent's
//! own descriptor (`/proc/<agent>/fd/<n>`), never by the pod process's
//! `/proc/<pid>/ns/net` again: once that process exits, its pid can be
//! given to any other process, in any namespace (the host's too), which the
//! old path would then name, and map to the pod's identity.
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

/// Local pods' network namespaces, by pod uid, each held open.
#[derive(Debug, Default)]
pub struct PodNamespaces {
    held: HashMap<String, (File, PathBuf)>,
}

impl PodNamespaces {
    /// Takes `found` (opened by [`find`]) into the set.
    pub fn extend(&mut self, found: HashMap<String, File>) {
        let agent = std::process::id();
        for (uid, file) in found {
            let path = PathBuf::from(format!("/proc/{agent}/fd/{}", file.as_raw_fd()));
            self.held.insert(uid, (file, path));
        }
    }

    /// The path that names a pod's namespace while the agent runs.
    pub fn path(&self, uid: &str) -> Option<&Path> {
        self.held.get(uid).map(|(_, path)| path.as_path())
    }

    /// Keeps the pods for which `keep(uid, path)` holds; closes the others.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &Path) -> bool) {
        self.held.retain(|uid, (_, path)| keep(uid, path));
    }

    pub fn contains(&self, uid: &str) -> bool {
        self.held.contains_key(uid)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }
}

/// The pod uid a cgroup path belongs to, if any.
pub fn pod_uid_of_cgroup(path: &str) -> Option<String> {
    path.split('/').find_map(|component| {
        if let Some(uid) = component.strip_prefix("pod") {
            return is_uid(uid).then(|| uid.to_owned());
        }
        let uid = component.strip_suffix(".slice")?.rsplit_once("-pod")?.1;
        let uid = uid.replace('_', "-");
        is_uid(&uid).then_some(uid)
    })
}

/// 8-4-4-4-12 hexadecimal digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The pod uid of the cgroup process `pid` is in, as `proc` says now.
fn pod_of_process(proc: &Path, pid: &str) -> Option<String> {
    // Processes come and go: what vanished is no pod's.
    let cgroups = std::fs::read_to_string(proc.join(pid).join("cgroup")).ok()?;
    // cgroup v2: one line "0::<path>".
    cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .and_then(pod_uid_of_cgroup)
}

/// One walk of `/proc`: for each wanted pod uid, the network namespace of
/// one of its processes, opened (`/proc/<pid>/ns/net`). The process is
/// checked to be the pod's again once its namespace is open: had it exited
/// and its pid gone to another process meanwhile, the namespace opened
/// would be that process's.
pub fn find(proc: &Path, wanted: &BTreeSet<String>) -> HashMap<String, File> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc) else {
        return found;
    };
    for entry in entries.flatten() {
        if found.len() == wanted.len() {
            break;
        }
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Some(uid) = pod_of_process(proc, pid) else {
            continue;
        };
        if !wanted.contains(&uid) || found.contains_key(&uid) {
            continue;
        }
        let Ok(netns) = File::open(proc.join(pid).join("ns/net")) else {
            continue;
        };
        if pod_of_process(proc, pid).as_deref() == Some(uid.as_str()) {
            found.insert(uid, netns);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f9a2c1e-7b4d-4e8f-9a0b-1c2d3e4f5a6b";

    #[test]
    fn reads_both_cgroup_drivers() {
        assert_eq!(
            pod_uid_of_cgroup(&format!("/kubepods/burstable/pod{UID}/0123abcd")).as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_of_cgroup(&format!("/kubepods/pod{UID}")).as_deref(),
            Some(UID)
        );
        let systemd = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-ab.scope",
            UID.replace('-', "_")
        );
        assert_eq!(pod_uid_of_cgroup(&systemd).as_deref(), Some(UID));
        assert_eq!(pod_uid_of_cgroup("/system.slice/sshd.service"), None);
        assert_eq!(pod_uid_of_cgroup("/user.slice/podman"), None);
        assert_eq!(pod_uid_of_cgroup("/kubepods/podnot-a-uid"), None);
    }

    #[test]
    fn finds_a_process_of_each_wanted_pod() {
        let dir = std::env::temp_dir().join(format!("mesh-podns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (pid, cgroup) in [
            ("1", "0::/init.scope\n".to_string()),
            ("42", format!("0::/kubepods/pod{UID}/c1\n")),
            ("43", format!("0::/kubepods/pod{UID}/c2\n")),
            ("self", "0::/\n".to_string()),
        ] {
            std::fs::create_dir_all(dir.join(pid).join("ns")).unwrap();
            std::fs::write(dir.join(pid).join("cgroup"), cgroup).unwrap();
            std::fs::write(dir.join(pid).join("ns/net"), pid).unwrap();
        }
        let wanted = BTreeSet::from([
            UID.to_string(),
            "00000000-0000-0000-0000-000000000000".into(),
        ]);
        let mut found = find(&dir, &wanted);
        assert_eq!(found.len(), 1);
        // The file opened is one of the pod's processes' namespace.
        let mut opened = String::new();
        std::io::Read::read_to_string(found.get_mut(UID).unwrap(), &mut opened).unwrap();
        assert!(opened == "42" || opened == "43", "{opened}");
        // Held, it is named by the agent's descriptor, which stays valid
        // whatever becomes of the process.
        let mut held = PodNamespaces::default();
        held.extend(found);
        std::fs::remove_dir_all(&dir).unwrap();
        let path = held.path(UID).unwrap();
        assert!(
            path.starts_with(format!("/proc/{}/fd", std::process::id())),
            "{path:?}"
        );
        assert_eq!(std::fs::read_to_string(path).unwrap(), opened);
    }
}
