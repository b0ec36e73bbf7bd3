//! The start-up self-test of the kernel's redirect path: the receive-path
//! defects of `net/ipv4/tcp_bpf.c` that make the short-circuit unsafe for
//! some applications (docs/short-circuit.md), each reproduced on the
//! running kernel, so that a kernel with fixes (backports included) is
//! recognised by what it does rather than by its version.
//!
//! It runs on a thread of its own in a private network namespace (only its
//! loopback), with a map and a program of its own
//! (`mesh_self_test_redirect`), so nothing of the node or of the mesh's
//! maps is touched. Its sockets carry the agent's mark: outside every
//! workload's namespace, the mesh's own hooks leave them alone.
use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, SockHash},
    programs::SkMsg,
};
use serde::{Deserialize, Serialize};

use crate::{DatapathError, program_err};

const PROGRAM: &str = "mesh_self_test_redirect";
const MAP: &str = "SELF_TEST_SOCKETS";

/// One defect, and whether this kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Defect {
    /// Short name, as in `status` and `/metrics`.
    pub name: String,
    /// `None`: the test could not tell (its error is in `detail`).
    pub present: Option<bool>,
    /// What the test saw.
    pub detail: String,
}

/// The defects, by name: what each one breaks.
pub const DEFECTS: [(&str, &str); 3] = [
    (
        "blocking_read_eagain",
        "a blocking recv() returns EAGAIN when woken with no data",
    ),
    (
        "splice_misses_redirected_bytes",
        "splice(2) from the socket reads the FIN before redirected bytes",
    ),
    (
        "no_receiver_backpressure",
        "a sender is never pushed back by a receiver that does not read",
    ),
];

/// The self-test, ready to run: its program attached to its map.
pub struct SelfTest {
    sockets: SockHash<MapData, u32>,
}

impl SelfTest {
    /// Runs every test (a second or two; blocking); a test that cannot run
    /// says so in its `detail`.
    pub fn run(self) -> Vec<Defect> {
        let sockets = std::sync::Mutex::new(self.sockets);
        let results = std::thread::scope(|scope| {
            scope
                .spawn(|| -> io::Result<Vec<Defect>> {
                    // This thread alone moves to a namespace of its own.
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
                    crate::netlink::set_link_up(1)?;
                    let sockets = &mut *sockets.lock().expect("only this thread uses it");
                    Ok(vec![
                        judge(DEFECTS[0].0, blocking_read_eagain(sockets)),
                        judge(DEFECTS[1].0, splice_misses_redirected_bytes(sockets)),
                        judge(DEFECTS[2].0, no_receiver_backpressure(sockets)),
                    ])
                })
                .join()
        });
        match results {
            Ok(Ok(defects)) => defects,
            Ok(Err(e)) => untold(&format!("not run: {e}")),
            Err(_) => untold("not run: the self-test thread panicked"),
        }
    }
}

fn untold(why: &str) -> Vec<Defect> {
    DEFECTS
        .iter()
        .map(|(name, _)| Defect {
            name: name.to_string(),
            present: None,
            detail: why.to_string(),
        })
        .collect()
}

fn judge(name: &str, outcome: io::Result<(bool, String)>) -> Defect {
    let (present, detail) = match outcome {
        Ok((present, detail)) => (Some(present), detail),
        Err(e) => (None, format!("could not tell: {e}")),
    };
    Defect {
        name: name.into(),
        present,
        detail,
    }
}

/// Loads the self-test's program and attaches it to its map (once: the
/// map is taken out of `ebpf`).
pub fn prepare(ebpf: &mut Ebpf) -> Result<SelfTest, DatapathError> {
    let map = ebpf
        .take_map(MAP)
        .expect("the object defines the self-test map");
    let sockets: SockHash<MapData, u32> =
        SockHash::try_from(map).map_err(|source| crate::maps::MapsError::Map {
            name: MAP,
            dir: Default::default(),
            source,
        })?;
    let map_fd = sockets
        .fd()
        .try_clone()
        .map_err(|source| DatapathError::Io {
            what: "duplicating the self-test map's descriptor".into(),
            source,
        })?;
    let program: &mut SkMsg = ebpf
        .program_mut(PROGRAM)
        .expect("the object defines the self-test program")
        .try_into()
        .map_err(program_err(PROGRAM))?;
    program.load().map_err(program_err(PROGRAM))?;
    program.attach(&map_fd).map_err(program_err(PROGRAM))?;
    Ok(SelfTest { sockets })
}

/// A loopback connection whose two ends redirect to each other: (client,
/// server).
fn redirected_pair(sockets: &mut SockHash<MapData, u32>) -> io::Result<(TcpStream, TcpStream)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, connect, socket};
    let listener = TcpListener::bind("127.0.0.1:0")?;
    // The accepted end inherits the listener's mark.
    mark(&listener)?;
    let client = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    mark(&client)?;
    let std::net::SocketAddr::V4(to) = listener.local_addr()? else {
        unreachable!("bound to an IPv4 address")
    };
    connect(client.as_raw_fd(), &SockaddrIn::from(to))?;
    let client = TcpStream::from(client);
    let (server, _) = listener.accept()?;
    for end in [&client, &server] {
        let port = u32::from(end.local_addr()?.port());
        sockets
            .insert(port, end.as_fd().as_raw_fd(), 0)
            .map_err(io::Error::other)?;
    }
    Ok((client, server))
}

/// The agent's mark: the mesh's connect hooks and sockops leave the
/// socket alone (it lives in no workload's namespace).
fn mark(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::Mark,
        &mesh_common::AGENT_SOCKET_MARK,
    )
    .map_err(io::Error::from)
}

/// A reader blocked in recv() on a socket of the sockhash when bytes
/// arrive through the TCP/IP stack instead (its peer's are: a peer that
/// took the stack once stays there, docs/short-circuit.md): woken with
/// data, it should return it. Five connections, one byte each.
fn blocking_read_eagain(sockets: &mut SockHash<MapData, u32>) -> io::Result<(bool, String)> {
    const CONNECTIONS: usize = 5;
    let mut spurious = 0;
    for _ in 0..CONNECTIONS {
        // Only the reader's end is in the sockhash: the writer's bytes
        // take the stack.
        let (mut client, server) = redirected_pair(sockets)?;
        sockets
            .remove(&u32::from(client.local_addr()?.port()))
            .map_err(io::Error::other)?;
        // A bound in case nothing wakes it (a timeout is no EAGAIN of the
        // defect: it comes after the whole second).
        server.set_read_timeout(Some(Duration::from_secs(2)))?;
        let outcome = std::thread::scope(|scope| -> io::Result<bool> {
            let reader = scope.spawn(|| {
                let started = Instant::now();
                // One byte or none: any answer but a quick EAGAIN is right.
                match (&server).read_exact(&mut [0u8; 1]) {
                    Err(e) => {
                        e.kind() == io::ErrorKind::WouldBlock
                            && started.elapsed() < Duration::from_secs(1)
                    }
                    Ok(()) => false,
                }
            });
            // Let the reader block first.
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"!")?;
            reader
                .join()
                .map_err(|_| io::Error::other("reader panicked"))
        })?;
        spurious += usize::from(outcome);
        remove_pair(sockets);
    }
    Ok((
        spurious > 0,
        format!(
            "{spurious} of {CONNECTIONS} blocked readers got EAGAIN for bytes that had arrived"
        ),
    ))
}

/// 4 KiB redirected, then the sender's FIN; the receiver splices.
fn splice_misses_redirected_bytes(
    sockets: &mut SockHash<MapData, u32>,
) -> io::Result<(bool, String)> {
    use nix::fcntl::{SpliceFFlags, splice};
    const SENT: usize = 4096;
    let (mut client, server) = redirected_pair(sockets)?;
    client.write_all(&[1u8; SENT])?;
    client.shutdown(Shutdown::Write)?;
    let (pipe_out, pipe_in) = nix::unistd::pipe()?;
    let mut spliced = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while spliced < SENT && Instant::now() < deadline {
        match splice(
            server.as_fd(),
            None,
            pipe_in.as_fd(),
            None,
            SENT - spliced,
            SpliceFFlags::SPLICE_F_NONBLOCK,
        ) {
            Ok(0) => break, // the FIN
            Ok(n) => {
                spliced += n;
                // Keep the pipe empty.
                let mut sink = vec![0u8; n];
                nix::unistd::read(&pipe_out, &mut sink)?;
            }
            Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e.into()),
        }
    }
    remove_pair(sockets);
    Ok((
        spliced < SENT,
        format!("splice read {spliced} of {SENT} redirected bytes before the FIN"),
    ))
}

/// A receiver that does not read: how much a non-blocking sender gets
/// rid of before EAGAIN, against the receiver's buffer.
fn no_receiver_backpressure(sockets: &mut SockHash<MapData, u32>) -> io::Result<(bool, String)> {
    const CAP: usize = 32 * 1024 * 1024;
    let (client, server) = redirected_pair(sockets)?;
    let rcvbuf = nix::sys::socket::getsockopt(&server, nix::sys::socket::sockopt::RcvBuf)
        .map_err(io::Error::from)?;
    client.set_nonblocking(true)?;
    let chunk = vec![3u8; 64 * 1024];
    let mut written = 0;
    while written < CAP {
        match (&client).write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    drop(server);
    remove_pair(sockets);
    // Without the defect the sender stops near the receiver's buffer (and
    // its own); with it, at the cap.
    let present = written >= CAP && rcvbuf < CAP / 4;
    Ok((
        present,
        format!(
            "{} KiB accepted for a receiver that did not read (its buffer: {} KiB)",
            written / 1024,
            rcvbuf / 1024
        ),
    ))
}

/// Closed sockets leave the sockhash by themselves; this clears the keys
/// for the next pair in case a port is reused first.
fn remove_pair(sockets: &mut SockHash<MapData, u32>) {
    let keys: Vec<u32> = sockets.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = sockets.remove(&key);
    }
}
