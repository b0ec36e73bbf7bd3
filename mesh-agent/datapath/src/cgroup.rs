//! cgroup v2: where it is mounted, and the directory the programs attach to.
use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading /proc/mounts")]
    Mounts(#[source] std::io::Error),
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/mounts); mount one or pass --cgroup"
    )]
    NotMounted,
    #[error("opening cgroup {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup v2 directory (the socket programs need cgroup2)")]
    NotCgroup2 { path: PathBuf },
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The first cgroup2 mount in a /proc/mounts listing.
pub fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(raw: &str) -> String {
    raw.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

pub fn detect_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(CgroupError::Mounts)?;
    parse_cgroup2_mount(&mounts).ok_or(CgroupError::NotMounted)
}

/// Opens a cgroup v2 directory, refusing anything else.
pub fn open_cgroup2(path: &Path) -> Result<File, CgroupError> {
    let open_err = |source| CgroupError::Open {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let stat = nix::sys::statfs::fstatfs(&file).map_err(|e| open_err(e.into()))?;
    if stat.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// The cgroup's id: on cgroup v2 it is the directory's inode number.
pub fn cgroup_id(cgroup: &File) -> std::io::Result<u64> {
    Ok(cgroup.metadata()?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_layout_mount() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_layout_mount() {
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn no_cgroup2_mount() {
        assert_eq!(
            parse_cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn escaped_mount_paths() {
        let mounts = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }
}
