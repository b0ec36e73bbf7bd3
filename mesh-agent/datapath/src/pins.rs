//! The pin directory: where the maps and links live on the bpf filesystem,
//! so that they outlive the agent, and the lock that gives one agent at a
//! time the right to change them.
use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error("creating pin directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not on a bpf filesystem, so pins would not survive; \
         mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass --bpffs DIR on bpffs"
    )]
    NotBpffs { path: PathBuf },
    #[error("another mesh-agent{} is already running on {path}; refusing to start a second one", holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default())]
    Busy { path: PathBuf, holder: Option<u32> },
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Fails unless `path` is on a bpf filesystem.
pub fn ensure_bpffs(path: &Path) -> Result<(), PinDirError> {
    let stat = nix::sys::statfs::statfs(path).map_err(|e| PinDirError::Create {
        path: path.to_owned(),
        source: e.into(),
    })?;
    if stat.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(PinDirError::NotBpffs {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// A pin directory held exclusively by this process until it is dropped (or
/// the process dies: the kernel releases the lock with the last descriptor).
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl PinDir {
    /// Creates the directory if needed and takes its lock. bpffs holds no
    /// regular files, so the lock is an flock on the directory itself.
    pub fn lock(path: &Path) -> Result<Self, PinDirError> {
        if let Err(source) = std::fs::create_dir_all(path) {
            // Usually: the parent is not a bpf filesystem (sysfs refuses mkdir).
            if let Some(existing) = path.ancestors().find(|p| p.exists()) {
                ensure_bpffs(existing)?;
            }
            return Err(PinDirError::Create {
                path: path.to_owned(),
                source,
            });
        }
        ensure_bpffs(path)?;
        let dir = File::open(path).map_err(|source| PinDirError::Lock {
            path: path.to_owned(),
            source,
        })?;
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self {
                path: path.to_owned(),
                _lock: lock,
            }),
            Err((dir, nix::errno::Errno::EWOULDBLOCK)) => Err(PinDirError::Busy {
                path: path.to_owned(),
                holder: lock_holder(&dir),
            }),
            Err((_, errno)) => Err(PinDirError::Lock {
                path: path.to_owned(),
                source: errno.into(),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid holding an flock on `file`, from /proc/locks (best effort, for
/// the error message only).
fn lock_holder(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    parse_lock_holder(&locks, libc::major(dev), libc::minor(dev), meta.ino())
}

/// Finds the FLOCK on device `major:minor`, inode `ino` in a /proc/locks
/// listing (`1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF`, the device in
/// hex and the inode in decimal).
pub fn parse_lock_holder(locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are shown as "1: -> FLOCK ..."; skip them.
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        (fields.get(5) == Some(&want.as_str())).then(|| fields.get(4)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_of_a_directory_lock() {
        let locks = "1: POSIX  ADVISORY  WRITE 999 00:19:12 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4321 00:1f:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4400 00:1f:5678 0 EOF\n";
        assert_eq!(parse_lock_holder(locks, 0, 0x1f, 5678), Some(4321));
        assert_eq!(parse_lock_holder(locks, 0, 0x1f, 5679), None);
        assert_eq!(
            parse_lock_holder(locks, 0, 0x19, 12),
            None,
            "POSIX locks are not ours"
        );
    }
}
