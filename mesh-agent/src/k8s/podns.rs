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
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

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

/// One walk of `/proc`: for each wanted pod uid, the network namespace of
/// one of its processes (`/proc/<pid>/ns/net`).
pub fn find(proc: &Path, wanted: &BTreeSet<String>) -> HashMap<String, PathBuf> {
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
        // Processes come and go during the walk: skip what vanished.
        let Ok(cgroups) = std::fs::read_to_string(proc.join(pid).join("cgroup")) else {
            continue;
        };
        // cgroup v2: one line "0::<path>".
        let Some(uid) = cgroups
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .and_then(pod_uid_of_cgroup)
        else {
            continue;
        };
        if wanted.contains(&uid) && !found.contains_key(&uid) {
            found.insert(uid, proc.join(pid).join("ns/net"));
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
            std::fs::create_dir_all(dir.join(pid)).unwrap();
            std::fs::write(dir.join(pid).join("cgroup"), cgroup).unwrap();
        }
        let wanted = BTreeSet::from([
            UID.to_string(),
            "00000000-0000-0000-0000-000000000000".into(),
        ]);
        let found = find(&dir, &wanted);
        assert_eq!(found.len(), 1);
        let path = &found[UID];
        assert!(path == &dir.join("42/ns/net") || path == &dir.join("43/ns/net"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
