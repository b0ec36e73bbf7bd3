//! Network namespaces of local workloads, as the kernel names them.
//!
//! The connect-time programs recognise a source workload by the cookie of
//! the network namespace its socket lives in; the kernel hands that cookie
//! out only to sockets inside the namespace, so the agent asks from a
//! short-lived thread that joins it.
use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use nix::sched::{CloneFlags, setns};

/// The cookie of the network namespace at `path` (e.g. `/run/netns/pod`).
pub fn cookie(path: &Path) -> io::Result<u64> {
    inside(path, socket_netns_cookie)
}

/// Runs `f` on a short-lived thread that joined the network namespace at
/// `path`: sockets it creates live in that namespace for good, whichever
/// thread uses them later.
pub fn inside<T: Send>(path: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let ns: OwnedFd = std::fs::File::open(path)?.into();
    // setns changes only the calling thread, which then ends.
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> io::Result<T> {
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::other(format!(
                        "{} is not a network namespace: {e}",
                        path.display()
                    ))
                })?;
                f()
            })
            .join()
            .map_err(|_| io::Error::other("network namespace thread panicked"))?
    })
}

/// The cookie of the caller's own network namespace.
pub fn socket_netns_cookie() -> io::Result<u64> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    crate::sys::netns_cookie(sock.as_fd())
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_namespace_has_a_cookie_and_the_same_one_twice() {
        let a = super::socket_netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, super::socket_netns_cookie().unwrap());
        assert_eq!(
            a,
            super::cookie(std::path::Path::new("/proc/self/ns/net")).unwrap()
        );
    }
}
