//! `mesh-pod`: the workload the kernel tests, the demo and the benchmarks run
//! inside their pods. Servers echo, sink or hold; clients send a
//! deterministic byte stream and check every byte that comes back, printing
//! one JSON report and exiting non-zero on any mismatch, short read or stall.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

/// Every blocking read gives up after this long: a stall is a failure, not a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections forever, serving each on its own thread.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value_t = Mode::Echo)]
        mode: Mode,
        /// For `hold`: how long to leave the first bytes unread.
        #[arg(long, default_value_t = 1000)]
        hold_ms: u64,
        /// For `hold`: leave them unread until this file exists instead
        /// (`flood --release` creates it), so the hold does not depend on
        /// how fast the writer is (a debug build under TCG is slow).
        #[arg(long)]
        release: Option<PathBuf>,
        /// `udp` serves datagrams: each is echoed to its sender.
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        /// For `udp`: each echo starts with `TAG:`, so a client can tell
        /// which server answered.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Try each target once (`tcp:ADDR` or `udp:ADDR`) and report what
    /// happened: connected (and the echo came back), eperm, refused, timeout.
    Probe {
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Keep probing every target in turn for this long (or until
        /// SIGTERM) and report how often each result came up, per target.
        #[arg(long)]
        repeat_ms: Option<u64>,
        /// Set this `SO_MARK` on every probing socket before it connects
        /// (decimal or 0x…), as an attacker with CAP_NET_RAW can.
        #[arg(long, value_parser = parse_mark)]
        mark: Option<u32>,
    },
    /// Probe one target every `interval_ms` until the result differs from
    /// the first one; report both and the CLOCK_MONOTONIC time of the change.
    WaitChange {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 2)]
        interval_ms: u64,
        #[arg(long, default_value_t = 300)]
        timeout_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        give_up_ms: u64,
    },
    /// Send patterned bytes of each size and check the echo, byte for byte.
    Transfer {
        #[arg(long)]
        to: SocketAddr,
        /// Comma-separated sizes in bytes.
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        /// Largest single write; the last write of each size is shorter.
        #[arg(long, default_value_t = 65536)]
        chunk: usize,
        /// Send with sendfile(2) from a file instead of write(2).
        #[arg(long)]
        sendfile: bool,
        /// Parallel connections, each doing every size.
        #[arg(long, default_value_t = 1)]
        connections: usize,
    },
    /// Many short connections, each a one-byte request and response.
    Short {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Close each connection with a reset (SO_LINGER 0), as clients
        /// that avoid TIME_WAIT do, instead of a FIN.
        #[arg(long)]
        rst: bool,
    },
    /// Ping-pong round trips of `size` bytes; reports the RTT distribution.
    Pingpong {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Keep going for this long (or until SIGTERM) instead of `count`
        /// rounds.
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// One-way stream of `bytes` to a `sink` server; reports throughput.
    Stream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 262144)]
        chunk: usize,
    },
    /// Send `text` `repeat` times on one connection to an echo server and
    /// check the echo (a known plaintext for wire captures to look for).
    Say {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        text: String,
        #[arg(long, default_value_t = 1000)]
        repeat: usize,
    },
    /// Connect `count` times to a `whoami` server and count the answers.
    Tally {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Connect and report the addresses the socket sees: the peer
    /// (`getpeername(2)`) and the local end.
    Peername {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Send UDP datagrams to `to` from `from`, an address of this namespace
    /// (on another node, any address its owner adds to `lo`, as a forger
    /// would; by default any). With `count`, datagram i goes to port
    /// `to.port + i`: that many flows, as a flood would make.
    Datagram {
        #[arg(long)]
        from: Option<SocketAddr>,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        text: String,
        #[arg(long, default_value_t = 1)]
        count: u16,
        /// Send each datagram this many times in a row: a flow seen twice
        /// is one an LRU keeps over flows seen once.
        #[arg(long, default_value_t = 1)]
        times: u16,
        /// Do it all this many times, each round from a new socket (a new
        /// source port: new flows).
        #[arg(long, default_value_t = 1)]
        rounds: u16,
        /// Then wait this long for an answer on the same socket: `answer`
        /// is `received` or `timeout`.
        #[arg(long)]
        await_ms: Option<u64>,
    },
    /// Hand the kernel a TCP SYN from `from` to `to` as if it arrived on
    /// the TUN device `device` (an L3 device: no Ethernet header, like the
    /// decapsulated side of an IPIP or WireGuard overlay), and watch the
    /// device for the answer: `connected` for a SYN-ACK, else `timeout`.
    TunSyn {
        #[arg(long)]
        device: String,
        #[arg(long)]
        from: std::net::SocketAddrV4,
        #[arg(long)]
        to: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Send an IPv4 packet on a packet socket (`AF_PACKET`), as a process
    /// with CAP_NET_RAW can: past every socket hook, to the link-layer
    /// address `mac` on `ifname`. A TCP SYN (`--udp` absent; `connected`
    /// when a SYN-ACK comes back on the same socket, else `timeout`) or a
    /// UDP datagram of `text`. `from` defaults to the interface's own
    /// address towards `to`; any other is forged.
    PacketSend {
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long)]
        mac: String,
        #[arg(long)]
        from: Option<std::net::SocketAddrV4>,
        #[arg(long)]
        to: std::net::SocketAddrV4,
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value = "x")]
        text: String,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Send a TCP SYN (32-byte header) to `to` split into two IPv4
    /// fragments, the first carrying `first` bytes of it (8, 16 or 24; 8
    /// is RFC 1858's tiny fragment, whose flags arrive in the second), on a
    /// raw socket: `connected` when the reassembled SYN is answered.
    FragSyn {
        #[arg(long)]
        to: std::net::SocketAddrV4,
        #[arg(long)]
        first: usize,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Keep asking a UDP echo server (`serve --proto udp --tag`) over one
    /// connected socket, every 10 ms, until the server tagged `until`
    /// answers. When the kernel aborts the socket (`ECONNABORTED`), connect
    /// it again, as a resolver would. Prints `answered by TAG` on the first
    /// answer; reports the answers per tag and the reconnects.
    UdpSession {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        until: String,
        #[arg(long, default_value_t = 20_000)]
        give_up_ms: u64,
    },
    /// Wait for one UDP datagram on `listen` (prints `listening` when
    /// bound): reports `received` with its sender and text, or `timeout`.
    AwaitDatagram {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Write to a `hold` server that does not read yet: how much is taken
    /// before the writer is pushed back, then check every byte arrives.
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: usize,
        /// Create this file once pushed back (or once every byte is
        /// taken), for a server started with `hold --release`.
        #[arg(long)]
        release: Option<PathBuf>,
    },
    /// An echo server on one thread with event-loop I/O, for many
    /// thousands of connections at once (`serve` spends a thread on each).
    AsyncEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Open `connections` connections to an echo server and hold them for
    /// `seconds` (prints `held` once all are open), sending a 64-byte
    /// ping-pong on `sample_per_s` of them each second, in turn, checked
    /// byte for byte. Reports the ping-pongs, the failures and the
    /// connections that closed.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        sample_per_s: usize,
    },
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
    /// UDP-Lite (RFC 3828, IP protocol 136): datagrams like UDP's, which
    /// the mesh governs like any protocol it cannot read the ports of.
    Udplite,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Echo with read/write; half-close is passed on.
    Echo,
    /// Echo with splice(2) through a pipe, never copying to user space.
    SpliceEcho,
    /// Read and count; on EOF answer with the byte count (8 bytes, LE).
    Sink,
    /// Leave the first bytes unread for hold_ms (or until `--release`),
    /// then sink with a checksum.
    Hold,
    /// Answer each connection with the address it reached (the server's
    /// own end) and close: which backend a Service picked.
    Whoami,
}

/// Set by SIGTERM in the commands that run for a while (repeated probes, a
/// pingpong for some seconds): they stop early and still print their report,
/// so a test can end them when its scenario is over.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

fn report_on_sigterm() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    // SA_RESTART: a read or write under way is not cut short by the signal.
    let action = SigAction::new(
        SigHandler::Handler(on_sigterm),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { sigaction(Signal::SIGTERM, &action) }.expect("installing the SIGTERM handler");
}

fn main() {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Cmd::Probe {
            repeat_ms: Some(_),
            ..
        } | Cmd::Pingpong {
            seconds: Some(_),
            ..
        }
    ) {
        report_on_sigterm();
    }
    let result = match cli.command {
        Cmd::Serve {
            listen,
            proto: Proto::Udp,
            tag,
            ..
        } => udp_echo(listen, false, tag).map(|()| json!({})),
        Cmd::Serve {
            listen,
            proto: Proto::Udplite,
            tag,
            ..
        } => udp_echo(listen, true, tag).map(|()| json!({})),
        Cmd::Serve {
            listen,
            mode,
            hold_ms,
            release,
            proto: Proto::Tcp,
            ..
        } => {
            let hold = match release {
                Some(file) => Hold::Until(file),
                None => Hold::For(Duration::from_millis(hold_ms)),
            };
            serve(listen, mode, hold).map(|()| json!({}))
        }
        Cmd::Probe {
            targets,
            timeout_ms,
            repeat_ms: None,
            mark,
        } => probe_all(&targets, Duration::from_millis(timeout_ms), mark),
        Cmd::Probe {
            targets,
            timeout_ms,
            repeat_ms: Some(ms),
            mark,
        } => probe_repeatedly(
            &targets,
            Duration::from_millis(timeout_ms),
            Duration::from_millis(ms),
            mark,
        ),
        Cmd::WaitChange {
            target,
            interval_ms,
            timeout_ms,
            give_up_ms,
        } => wait_change(
            &target,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
            Duration::from_millis(give_up_ms),
        ),
        Cmd::Transfer {
            to,
            sizes,
            chunk,
            sendfile,
            connections,
        } => transfer_many(to, &sizes, chunk, sendfile, connections),
        Cmd::Short { to, count, rst } => short(to, count, rst),
        Cmd::Pingpong {
            to,
            size,
            count,
            seconds,
        } => pingpong(to, size, count, seconds),
        Cmd::Stream { to, bytes, chunk } => stream(to, bytes, chunk),
        Cmd::Flood { to, bytes, release } => flood(to, bytes, release.as_deref()),
        Cmd::AsyncEcho { listen } => many::echo(listen).map(|()| json!({})),
        Cmd::Hold {
            to,
            connections,
            seconds,
            sample_per_s,
        } => many::hold(to, connections, Duration::from_secs(seconds), sample_per_s),
        Cmd::Say { to, text, repeat } => say(to, &text, repeat),
        Cmd::Tally { to, count } => tally(to, count),
        Cmd::Datagram {
            from,
            to,
            text,
            count,
            times,
            rounds,
            await_ms,
        } => datagrams(
            from,
            to,
            &text,
            Flood {
                count,
                times,
                rounds,
            },
            await_ms.map(Duration::from_millis),
        ),
        Cmd::TunSyn {
            device,
            from,
            to,
            timeout_ms,
        } => tun_syn(&device, from, to, Duration::from_millis(timeout_ms))
            .map(|result| json!({ "result": result })),
        Cmd::PacketSend {
            ifname,
            mac,
            from,
            to,
            udp,
            text,
            timeout_ms,
        } => packet_send(
            &ifname,
            &mac,
            from,
            to,
            udp.then_some(text.as_bytes()),
            Duration::from_millis(timeout_ms),
        )
        .map(|result| json!({ "result": result })),
        Cmd::FragSyn {
            to,
            first,
            timeout_ms,
        } => frag_syn(to, first, Duration::from_millis(timeout_ms))
            .map(|result| json!({ "result": result })),
        Cmd::UdpSession {
            to,
            until,
            give_up_ms,
        } => udp_session(to, &until, Duration::from_millis(give_up_ms)),
        Cmd::AwaitDatagram { listen, timeout_ms } => {
            await_datagram(listen, Duration::from_millis(timeout_ms))
        }
        Cmd::Peername { to } => connect(to).and_then(|c| {
            Ok(json!({ "ok": true, "peer": c.peer_addr()?.to_string(), "local": c.local_addr()?.to_string() }))
        }),
    };
    match result {
        Ok(report) => println!("{report}"),
        Err(e) => {
            println!("{}", json!({ "ok": false, "error": format!("{e:#}") }));
            std::process::exit(1);
        }
    }
}

/// The byte at `offset` of stream `seed`: not periodic over short spans, so
/// a reordered, duplicated or dropped chunk shows up as a mismatch.
fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let mut x = offset.wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    x as u8
}

fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, offset + i as u64);
    }
}

fn connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

// Event-loop I/O, as Go, tokio, Envoy or nginx do it: sockets are
// non-blocking, and "would block" means wait in poll(2), then retry. A wait
// that sees no readiness for IO_TIMEOUT is a stall and fails the run.

fn wait_ready(conn: &impl std::os::fd::AsFd, events: nix::poll::PollFlags) -> anyhow::Result<()> {
    use nix::poll::{PollFd, PollTimeout, poll};
    let mut fds = [PollFd::new(conn.as_fd(), events)];
    let timeout = PollTimeout::try_from(IO_TIMEOUT.as_millis() as i32).expect("timeout fits");
    loop {
        match poll(&mut fds, timeout) {
            Ok(0) => bail!("stalled: no progress for {IO_TIMEOUT:?}"),
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Retries `op` until it does not report "would block".
fn retry<T>(
    conn: &impl std::os::fd::AsFd,
    events: nix::poll::PollFlags,
    mut op: impl FnMut() -> std::io::Result<T>,
) -> anyhow::Result<T> {
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                wait_ready(conn, events)?
            }
            Err(e) => return Err(e.into()),
        }
    }
}

const READABLE: nix::poll::PollFlags = nix::poll::PollFlags::POLLIN;
const WRITABLE: nix::poll::PollFlags = nix::poll::PollFlags::POLLOUT;

fn read_some(conn: &TcpStream, buf: &mut [u8]) -> anyhow::Result<usize> {
    retry(conn, READABLE, || (&*conn).read(buf))
}

fn write_some(conn: &TcpStream, buf: &[u8]) -> anyhow::Result<usize> {
    retry(conn, WRITABLE, || (&*conn).write(buf))
}

fn write_all(conn: &TcpStream, mut buf: &[u8]) -> anyhow::Result<()> {
    while !buf.is_empty() {
        let n = write_some(conn, buf)?;
        ensure!(n > 0, "write returned 0");
        buf = &buf[n..];
    }
    Ok(())
}

fn read_exact(conn: &TcpStream, mut buf: &mut [u8]) -> anyhow::Result<()> {
    while !buf.is_empty() {
        let n = read_some(conn, buf)?;
        ensure!(n > 0, "connection closed early");
        buf = &mut buf[n..];
    }
    Ok(())
}

// ---------------------------------------------------------------- servers

/// How long a `hold` server leaves the first bytes unread.
#[derive(Clone)]
enum Hold {
    For(Duration),
    /// Until the file exists: the writer says when it is done.
    Until(PathBuf),
}

impl Hold {
    fn wait(&self) {
        match self {
            Hold::For(time) => std::thread::sleep(*time),
            Hold::Until(file) => {
                while !file.exists() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

fn serve(listen: SocketAddr, mode: Mode, hold: Hold) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let conn = conn?;
        let hold = hold.clone();
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let _ = conn.set_nonblocking(true);
            let result = match mode {
                Mode::Echo => echo(conn),
                Mode::SpliceEcho => splice_echo(conn),
                Mode::Sink => sink(conn, None),
                Mode::Hold => sink(conn, Some(&hold)),
                Mode::Whoami => whoami(conn),
            };
            if let Err(e) = result {
                eprintln!("connection: {e:#}");
            }
        });
    }
    Ok(())
}

fn whoami(conn: TcpStream) -> anyhow::Result<()> {
    // A dual-stack listener sees IPv4 clients at mapped addresses.
    let local = conn.local_addr()?;
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    write_all(&conn, local.to_string().as_bytes())?;
    conn.shutdown(Shutdown::Write)?;
    Ok(())
}

/// `count` connections to a `whoami` server (a Service address): how many
/// each backend answered, and how the others failed.
fn tally(to: SocketAddr, count: usize) -> anyhow::Result<serde_json::Value> {
    let mut answers: std::collections::BTreeMap<String, u64> = Default::default();
    for _ in 0..count {
        let answer = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(mut conn) => {
                conn.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut text = String::new();
                match conn.read_to_string(&mut text) {
                    Ok(_) => text,
                    Err(e) => classify(&e),
                }
            }
            Err(e) => classify(&e),
        };
        *answers.entry(answer).or_default() += 1;
    }
    Ok(json!({ "ok": true, "answers": answers }))
}

fn echo(conn: TcpStream) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = read_some(&conn, &mut buf)?;
        if n == 0 {
            conn.shutdown(Shutdown::Write)?;
            return Ok(());
        }
        write_all(&conn, &buf[..n])?;
    }
}

/// Echo with splice(2) as Go's `io.Copy` between sockets does: a socket
/// splice refuses with EINVAL (the mesh's splice guard on a short-circuited
/// socket) is echoed by reading and writing instead.
fn splice_echo(conn: TcpStream) -> anyhow::Result<()> {
    use nix::fcntl::{SpliceFFlags, splice};
    let (pipe_r, pipe_w) = nix::unistd::pipe()?;
    loop {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        let n = match retry(&conn, READABLE, || {
            splice(conn.as_fd(), None, pipe_w.as_fd(), None, 1 << 20, flags).map_err(Into::into)
        }) {
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.raw_os_error() == Some(libc::EINVAL)) =>
            {
                return echo(conn);
            }
            other => other?,
        };
        if n == 0 {
            conn.shutdown(Shutdown::Write)?;
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= retry(&conn, WRITABLE, || {
                splice(pipe_r.as_fd(), None, conn.as_fd(), None, left, flags).map_err(Into::into)
            })?;
        }
    }
}

/// FNV-1a, to prove every held byte arrived without echoing it.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Counts what arrives; held, it first leaves the bytes unread, then also
/// checksums them.
fn sink(conn: TcpStream, hold: Option<&Hold>) -> anyhow::Result<()> {
    if let Some(hold) = hold {
        hold.wait();
    }
    let mut buf = vec![0u8; 256 * 1024];
    let (mut total, mut hash) = (0u64, FNV_OFFSET);
    loop {
        let n = read_some(&conn, &mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if hold.is_some() {
            hash = fnv1a(hash, &buf[..n]);
        }
    }
    write_all(&conn, &total.to_le_bytes())?;
    write_all(&conn, &hash.to_le_bytes())?;
    Ok(())
}

// ---------------------------------------------------------------- clients

fn say(to: SocketAddr, text: &str, repeat: usize) -> anyhow::Result<serde_json::Value> {
    let conn = connect(to)?;
    let message = text.repeat(repeat).into_bytes();
    let mut sent = 0;
    while sent < message.len() {
        sent += write_some(&conn, &message[sent..])?;
    }
    conn.shutdown(Shutdown::Write)?;
    let mut echo = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = read_some(&conn, &mut buf)?;
        if n == 0 {
            break;
        }
        echo.extend_from_slice(&buf[..n]);
    }
    ensure!(
        echo == message,
        "echo differs from what was sent ({} of {} bytes)",
        echo.len(),
        message.len()
    );
    Ok(json!({ "ok": true, "bytes": message.len() }))
}

/// Sends `size` patterned bytes (stream `seed`) on one connection, half-closes,
/// and checks that the echo is the same bytes, in order, then EOF.
fn transfer_one(
    to: SocketAddr,
    seed: u64,
    size: usize,
    chunk: usize,
    sendfile: bool,
) -> anyhow::Result<()> {
    let conn = connect(to)?;
    let writer = conn.try_clone()?;
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        if sendfile {
            send_with_sendfile(&writer, seed, size)?;
        } else {
            let mut buf = vec![0u8; chunk.max(1)];
            let mut sent = 0usize;
            while sent < size {
                let n = chunk.min(size - sent);
                fill_pattern(seed, sent as u64, &mut buf[..n]);
                // write, not write_all: a short write is a partial write
                // that the loop completes, as applications do.
                let written = write_some(&writer, &buf[..n])?;
                ensure!(written > 0, "write returned 0");
                sent += written;
            }
        }
        // Half-close: the echo server sees EOF, echoes the rest, then closes.
        writer.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0usize;
    loop {
        let n = read_some(&conn, &mut buf)
            .with_context(|| format!("reading echo after {received} of {size} bytes"))?;
        if n == 0 {
            break;
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            let at = received + i;
            ensure!(at < size, "echo is longer than the {size} bytes sent");
            ensure!(
                b == pattern_byte(seed, at as u64),
                "byte {at} of {size} differs: data corrupted or out of order"
            );
        }
        received += n;
    }
    sender.join().expect("sender thread")?;
    ensure!(
        received == size,
        "echo ended after {received} of {size} bytes"
    );
    Ok(())
}

/// sendfile(2) from a file holding the pattern, as static file servers do.
fn send_with_sendfile(conn: &TcpStream, seed: u64, size: usize) -> anyhow::Result<()> {
    let mut file = tempfile_in_tmp()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0usize;
    while written < size {
        let n = buf.len().min(size - written);
        fill_pattern(seed, written as u64, &mut buf[..n]);
        file.write_all(&buf[..n])?;
        written += n;
    }
    let mut offset: i64 = 0;
    while (offset as usize) < size {
        let left = size - offset as usize;
        let n = retry(conn, WRITABLE, || {
            nix::sys::sendfile::sendfile(conn.as_fd(), file.as_fd(), Some(&mut offset), left)
                .map_err(Into::into)
        })?;
        ensure!(n > 0, "sendfile sent nothing at offset {offset}");
    }
    Ok(())
}

/// An unlinked temporary file.
fn tempfile_in_tmp() -> anyhow::Result<std::fs::File> {
    let path = std::env::temp_dir().join(format!(
        "mesh-pod-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

fn transfer_many(
    to: SocketAddr,
    sizes: &[usize],
    chunk: usize,
    sendfile: bool,
    connections: usize,
) -> anyhow::Result<serde_json::Value> {
    ensure!(!sizes.is_empty(), "--sizes is empty");
    let start = Instant::now();
    let workers: Vec<_> = (0..connections.max(1))
        .map(|c| {
            let sizes = sizes.to_vec();
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut bytes = 0u64;
                for (i, &size) in sizes.iter().enumerate() {
                    let seed = (c * 1000 + i) as u64 + 1;
                    transfer_one(to, seed, size, chunk, sendfile)
                        .with_context(|| format!("connection {c}, {size} bytes"))?;
                    bytes += size as u64;
                }
                Ok(bytes)
            })
        })
        .collect();
    let mut bytes = 0;
    for w in workers {
        bytes += w.join().expect("worker thread")?;
    }
    Ok(json!({
        "ok": true,
        "connections": connections,
        "bytes_checked": bytes,
        "seconds": start.elapsed().as_secs_f64(),
    }))
}

fn short(to: SocketAddr, count: usize, rst: bool) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    // Each connection's time, connect to echo: what a client waits.
    let mut micros = Vec::with_capacity(count);
    for i in 0..count {
        let began = Instant::now();
        let conn = connect(to)?;
        let byte = [i as u8];
        write_all(&conn, &byte)?;
        let mut back = [0u8; 1];
        read_exact(&conn, &mut back).with_context(|| format!("connection {i}: no echo"))?;
        ensure!(back == byte, "connection {i}: echo differs");
        if rst {
            let abort = nix::sys::socket::sockopt::Linger;
            let now = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            nix::sys::socket::setsockopt(&conn, abort, &now).context("SO_LINGER 0")?;
        }
        micros.push(began.elapsed().as_secs_f64() * 1e6);
    }
    let seconds = start.elapsed().as_secs_f64();
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| {
        micros
            .get(((micros.len() as f64 * q) as usize).min(micros.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(json!({
        "ok": true,
        "connections": count,
        "close": if rst { "rst" } else { "fin" },
        "seconds": seconds,
        "per_second": count as f64 / seconds,
        "p50_us": at(0.50),
        "p99_us": at(0.99),
    }))
}

fn pingpong(
    to: SocketAddr,
    size: usize,
    count: usize,
    seconds: Option<f64>,
) -> anyhow::Result<serde_json::Value> {
    let conn = connect(to)?;
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count);
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mut round = 0u64;
    loop {
        match deadline {
            Some(d) if Instant::now() >= d || stop_requested() => break,
            None if rtts.len() >= count => break,
            _ => {}
        }
        fill_pattern(round + 1, 0, &mut out);
        let t = Instant::now();
        write_all(&conn, &out)?;
        read_exact(&conn, &mut back)
            .with_context(|| format!("round {round}: response did not come"))?;
        rtts.push(t.elapsed().as_nanos() as u64);
        ensure!(back == out, "round {round}: response differs from request");
        round += 1;
    }
    rtts.sort_unstable();
    let pct = |p: f64| {
        rtts.get(((rtts.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    Ok(json!({
        "ok": true,
        "rounds": rtts.len(),
        "p50_ns": pct(0.50),
        "p99_ns": pct(0.99),
    }))
}

fn stream(to: SocketAddr, bytes: u64, chunk: usize) -> anyhow::Result<serde_json::Value> {
    let conn = connect(to)?;
    let buf = vec![0x5au8; chunk];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (chunk as u64).min(bytes - sent) as usize;
        write_all(&conn, &buf[..n])?;
        sent += n as u64;
    }
    conn.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 16];
    read_exact(&conn, &mut reply).context("sink did not confirm")?;
    let seconds = start.elapsed().as_secs_f64();
    let counted = u64::from_le_bytes(reply[..8].try_into().unwrap());
    ensure!(counted == bytes, "sink counted {counted} of {bytes} bytes");
    Ok(
        json!({ "ok": true, "bytes": bytes, "seconds": seconds, "gbit_per_s": bytes as f64 * 8.0 / seconds / 1e9 }),
    )
}

fn flood(
    to: SocketAddr,
    bytes: usize,
    release: Option<&Path>,
) -> anyhow::Result<serde_json::Value> {
    let conn = connect(to)?;
    let seed = 7;
    let mut buf = vec![0u8; 64 * 1024];
    // Phase 1: write until the kernel pushes back (would block).
    let mut sent = 0usize;
    let mut pushed_back = false;
    while sent < bytes {
        let n = buf.len().min(bytes - sent);
        fill_pattern(seed, sent as u64, &mut buf[..n]);
        match (&conn).write(&buf[..n]) {
            Ok(w) => sent += w,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                pushed_back = true;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let accepted_before_pushback = sent;
    if let Some(file) = release {
        std::fs::write(file, b"").with_context(|| format!("releasing {}", file.display()))?;
    }
    // Phase 2: the rest, as the server starts reading.
    while sent < bytes {
        let n = buf.len().min(bytes - sent);
        fill_pattern(seed, sent as u64, &mut buf[..n]);
        sent += write_some(&conn, &buf[..n])?;
    }
    conn.shutdown(Shutdown::Write)?;
    let mut reply = [0u8; 16];
    read_exact(&conn, &mut reply).context("hold server did not confirm")?;
    let counted = u64::from_le_bytes(reply[..8].try_into().unwrap()) as usize;
    let hash = u64::from_le_bytes(reply[8..].try_into().unwrap());
    ensure!(
        counted == bytes,
        "server received {counted} of {bytes} bytes"
    );
    let mut expected = FNV_OFFSET;
    let mut done = 0usize;
    while done < bytes {
        let n = buf.len().min(bytes - done);
        fill_pattern(seed, done as u64, &mut buf[..n]);
        expected = fnv1a(expected, &buf[..n]);
        done += n;
    }
    if hash != expected {
        bail!("server's checksum differs: bytes corrupted or out of order");
    }
    Ok(
        json!({ "ok": true, "pushed_back": pushed_back, "accepted_before_pushback": accepted_before_pushback, "bytes": bytes }),
    )
}

/// A UDP-Lite socket of `addr`'s family, as a `UdpSocket` (the datagram
/// calls are the same; std cannot open one).
fn udplite_socket(addr: &SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::FromRawFd as _;
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new
    // descriptor that nothing else owns.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDPLITE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { std::net::UdpSocket::from_raw_fd(fd) })
}

/// The one's-complement sum RFC 793's TCP checksum is made of.
fn ones_complement_sum(mut sum: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

/// A TCP SYN from `src` to `dst` (IPv4), checksum included.
fn tcp_syn(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4, seq: u32) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words, no options
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut sum = ones_complement_sum(0, &src.ip().octets());
    sum = ones_complement_sum(sum, &dst.ip().octets());
    sum += u32::from(libc::IPPROTO_TCP as u16) + 20;
    sum = ones_complement_sum(sum, &tcp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    tcp
}

/// A SYN written by hand on a raw socket, past connect(2) and its hook, as
/// a process with CAP_NET_RAW can: `connected` when the target answers
/// with a SYN-ACK (seen on the same raw socket), `eperm` when the socket
/// cannot be made, `timeout` when nothing answers.
fn raw_syn(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let SocketAddr::V4(dst) = addr else {
        bail!("raw-syn: IPv4 targets only");
    };
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new
    // descriptor that nothing else owns.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Ok(classify(&std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The source address the route to `dst` would use: learnt from a UDP
    // socket connected to it (connect sends nothing).
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(addr)?;
    let SocketAddr::V4(local) = probe.local_addr()? else {
        bail!("no IPv4 source address towards {addr}");
    };
    let src =
        std::net::SocketAddrV4::new(*local.ip(), 40_000 + (std::process::id() % 20_000) as u16);
    let syn = tcp_syn(src, dst, 0x6d65_7368);
    let to = nix::sys::socket::SockaddrIn::from(dst);
    if let Err(e) = nix::sys::socket::sendto(
        fd.as_raw_fd(),
        &syn,
        &to,
        nix::sys::socket::MsgFlags::empty(),
    ) {
        return Ok(classify(&std::io::Error::from(e)));
    }
    await_syn_ack(fd.as_fd(), src, dst, timeout)
}

/// How many datagrams `datagram` sends: see its options.
struct Flood {
    count: u16,
    times: u16,
    rounds: u16,
}

fn datagrams(
    from: Option<SocketAddr>,
    to: SocketAddr,
    text: &str,
    flood: Flood,
    await_answer: Option<Duration>,
) -> anyhow::Result<serde_json::Value> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let from = from.unwrap_or(any);
    let mut sent = 0u64;
    let mut sock = None;
    for _ in 0..flood.rounds {
        let round = std::net::UdpSocket::bind(from).with_context(|| format!("binding {from}"))?;
        for i in 0..flood.count {
            let mut dst = to;
            dst.set_port(to.port().wrapping_add(i));
            for _ in 0..flood.times {
                round
                    .send_to(text.as_bytes(), dst)
                    .with_context(|| format!("sending from {from} to {dst}"))?;
                sent += 1;
            }
        }
        sock = Some(round);
    }
    let sock = sock.context("--rounds 0")?;
    let mut report = json!({ "ok": true, "sent": sent });
    if let Some(wait) = await_answer {
        sock.set_read_timeout(Some(wait))?;
        let mut buf = [0u8; 2048];
        report["answer"] = match sock.recv_from(&mut buf) {
            Ok(_) => "received".into(),
            Err(e) => classify(&e).into(),
        };
    }
    Ok(report)
}

fn await_datagram(listen: SocketAddr, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let sock = std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    sock.set_read_timeout(Some(timeout))?;
    println!("listening on udp {}", sock.local_addr()?);
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 65536];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => Ok(json!({
            "result": "received",
            "from": from.to_string(),
            "text": String::from_utf8_lossy(&buf[..n]),
        })),
        Err(e) => Ok(json!({ "result": classify(&e) })),
    }
}

/// A UDP header and payload from `src` to `dst`, checksum included.
fn udp_datagram(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut udp = Vec::with_capacity(len);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut sum = ones_complement_sum(0, &src.ip().octets());
    sum = ones_complement_sum(sum, &dst.ip().octets());
    sum += u32::from(libc::IPPROTO_UDP as u16) + len as u32;
    sum = ones_complement_sum(sum, &udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = !(sum as u16);
    udp[6..8].copy_from_slice(&(if checksum == 0 { 0xffff } else { checksum }).to_be_bytes());
    udp
}

fn packet_send(
    ifname: &str,
    mac: &str,
    from: Option<std::net::SocketAddrV4>,
    to: std::net::SocketAddrV4,
    udp: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<String> {
    use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
    let mac: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .context("--mac: six hex bytes, colon-separated")?;
    anyhow::ensure!(mac.len() == 6, "--mac: six bytes");
    let from = match from {
        Some(from) => from,
        // The interface's own IPv4 address (a connected UDP socket would
        // ask the connect hook, which may refuse).
        None => {
            let own = nix::ifaddrs::getifaddrs()?
                .filter(|a| a.interface_name == ifname)
                .find_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
                .with_context(|| format!("{ifname} has no IPv4 address"))?;
            std::net::SocketAddrV4::new(own, 40_000 + (std::process::id() % 20_000) as u16)
        }
    };
    let ifindex = nix::net::if_::if_nametoindex(ifname).with_context(|| format!("no {ifname}"))?;
    let eth_p_ip = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new
    // descriptor that nothing else owns.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(eth_p_ip),
        )
    };
    if fd < 0 {
        return Ok(classify(&std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (l4, proto) = match udp {
        Some(text) => (udp_datagram(from, to, text), libc::IPPROTO_UDP as u8),
        None => (
            tcp_syn(from, to, 0x6d65_7368).to_vec(),
            libc::IPPROTO_TCP as u8,
        ),
    };
    let mut packet = ipv4_header(*from.ip(), *to.ip(), proto, l4.len()).to_vec();
    packet.extend_from_slice(&l4);
    // SAFETY: sockaddr_ll is plain data, for which all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = eth_p_ip;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&mac);
    // SAFETY: sendto reads `packet` and one sockaddr_ll, both alive for the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Ok(classify(&std::io::Error::last_os_error()));
    }
    if udp.is_some() {
        return Ok("sent".into());
    }
    await_syn_ack(fd.as_fd(), from, to, timeout)
}

/// Reads IPv4 packets from `fd` (a raw or packet socket, or a TUN device)
/// until a TCP SYN-ACK from `to` to `from` arrives (`connected`) or
/// `timeout` passes (`timeout`).
fn await_syn_ack(
    fd: std::os::fd::BorrowedFd<'_>,
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms))? == 0 {
            break;
        }
        let n = nix::unistd::read(fd, &mut buf)?;
        // An IPv4 header, then TCP from `to` to `from` with SYN and ACK.
        if n < 20 || buf[0] >> 4 != 4 || buf[9] != libc::IPPROTO_TCP as u8 {
            continue;
        }
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n < ihl + 14 || buf[12..16] != to.ip().octets() {
            continue;
        }
        let tcp = &buf[ihl..n];
        let from_port = u16::from_be_bytes([tcp[0], tcp[1]]);
        let to_port = u16::from_be_bytes([tcp[2], tcp[3]]);
        if from_port == to.port() && to_port == from.port() && tcp[13] & 0x12 == 0x12 {
            return Ok("connected".into());
        }
    }
    Ok("timeout".into())
}

fn frag_syn(to: std::net::SocketAddrV4, first: usize, timeout: Duration) -> anyhow::Result<String> {
    use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
    ensure!(
        first.is_multiple_of(8) && first > 0 && first < 32,
        "--first: 8, 16 or 24"
    );
    let raw = |protocol| -> std::io::Result<OwnedFd> {
        // SAFETY: socket(2) takes no pointers; a non-negative result is a
        // new descriptor that nothing else owns.
        let fd =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    // IPPROTO_RAW: the headers are ours (IP_HDRINCL); a raw TCP socket
    // sees the answer.
    let send_fd = raw(libc::IPPROTO_RAW)?;
    let recv_fd = raw(libc::IPPROTO_TCP)?;
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(to)?;
    let SocketAddr::V4(local) = probe.local_addr()? else {
        bail!("no IPv4 source address towards {to}");
    };
    let from =
        std::net::SocketAddrV4::new(*local.ip(), 40_000 + (std::process::id() % 20_000) as u16);
    // A SYN with 12 bytes of options (MSS, then no-ops): 32 bytes, so that
    // the whole header fits a first fragment of 24 and still leaves one.
    let mut syn = tcp_syn(from, to, 0x6d65_7368).to_vec();
    syn[12] = 8 << 4;
    syn[16..18].copy_from_slice(&[0, 0]);
    syn.extend_from_slice(&[2, 4, 0x05, 0xb4, 1, 1, 1, 1, 1, 1, 1, 1]);
    let mut sum = ones_complement_sum(0, &from.ip().octets());
    sum = ones_complement_sum(sum, &to.ip().octets());
    sum += u32::from(libc::IPPROTO_TCP as u16) + syn.len() as u32;
    sum = ones_complement_sum(sum, &syn);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    syn[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let dst = nix::sys::socket::SockaddrIn::from(to);
    for (offset, part, more) in [(0, &syn[..first], true), (first, &syn[first..], false)] {
        let mut header = ipv4_header(*from.ip(), *to.ip(), libc::IPPROTO_TCP as u8, part.len());
        header[4..6].copy_from_slice(&0x6d73u16.to_be_bytes()); // identification
        let flags_offset = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        header[6..8].copy_from_slice(&flags_offset.to_be_bytes());
        header[10..12].copy_from_slice(&[0, 0]); // the kernel fills the checksum
        let mut packet = header.to_vec();
        packet.extend_from_slice(part);
        nix::sys::socket::sendto(
            send_fd.as_raw_fd(),
            &packet,
            &dst,
            nix::sys::socket::MsgFlags::empty(),
        )
        .context("sending a fragment")?;
    }
    await_syn_ack(recv_fd.as_fd(), from, to, timeout)
}

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// An IPv4 header (no options) for `payload_len` bytes of `proto`, with its
/// checksum.
fn ipv4_header(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    proto: u8,
    payload_len: usize,
) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let mut sum = ones_complement_sum(0, &h);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    h
}

fn tun_syn(
    device: &str,
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<String> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // SAFETY: ifreq is plain data, for which all zeroes is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    anyhow::ensure!(device.len() < ifr.ifr_name.len(), "device name too long");
    for (dst, src) in ifr.ifr_name.iter_mut().zip(device.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("attaching to {device}"));
    }
    // Attaching brings the carrier up, but the device passes packets only
    // once the kernel has acted on it (IFF_RUNNING): an answer sent before
    // that is dropped on the way out.
    let flags_socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let up_by = Instant::now() + Duration::from_secs(5);
    loop {
        // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of one
        // ifreq, which lives for the call.
        if unsafe { libc::ioctl(flags_socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) } < 0 {
            return Err(std::io::Error::last_os_error()).context(format!("flags of {device}"));
        }
        // SAFETY: SIOCGIFFLAGS filled the union's flags member.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
        if flags & libc::IFF_RUNNING != 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < up_by, "{device} never came up");
        std::thread::sleep(Duration::from_millis(5));
    }
    let syn = tcp_syn(from, to, 0x6d65_7368);
    let mut packet = ipv4_header(*from.ip(), *to.ip(), libc::IPPROTO_TCP as u8, syn.len()).to_vec();
    packet.extend_from_slice(&syn);
    (&tun).write_all(&packet).context("writing the SYN")?;
    await_syn_ack(tun.as_fd(), from, to, timeout)
}

fn udp_echo(listen: SocketAddr, lite: bool, tag: Option<String>) -> anyhow::Result<()> {
    let sock = if lite {
        let sock = udplite_socket(&listen)?;
        nix::sys::socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            &nix::sys::socket::SockaddrStorage::from(listen),
        )
        .with_context(|| format!("binding udplite {listen}"))?;
        sock
    } else {
        std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?
    };
    let name = if lite { "udplite" } else { "udp" };
    println!("listening on {name} {}", sock.local_addr()?);
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        let answer = match &tag {
            Some(tag) => [tag.as_bytes(), b":", &buf[..n]].concat(),
            None => buf[..n].to_vec(),
        };
        // A peer that went away is not the server's failure.
        let _ = sock.send_to(&answer, from);
    }
}

fn udp_session(
    to: SocketAddr,
    until: &str,
    give_up: Duration,
) -> anyhow::Result<serde_json::Value> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = std::net::UdpSocket::bind(any)?;
    sock.connect(to)
        .with_context(|| format!("connecting to {to}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let deadline = Instant::now() + give_up;
    let mut answers = std::collections::BTreeMap::<String, u64>::new();
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    let mut reconnects = 0u64;
    let mut buf = [0u8; 2048];
    let mut seq = 0u64;
    loop {
        seq += 1;
        if Instant::now() >= deadline {
            return Ok(
                json!({ "ok": true, "moved": false, "answers": answers, "errors": errors, "reconnects": reconnects }),
            );
        }
        let asked = seq.to_string();
        let outcome = sock.send(asked.as_bytes()).and_then(|_| {
            loop {
                // An answer to an earlier question (one queued before an
                // abort, which the kernel reports ahead of the queue) is
                // skipped, as a resolver matches answers to its question:
                // asking again instead would leave every later answer one
                // question behind.
                let n = sock.recv(&mut buf)?;
                let text = String::from_utf8_lossy(&buf[..n]);
                if let Some((tag, echoed)) = text.split_once(':')
                    && echoed == asked
                {
                    break Ok(tag.to_string());
                }
            }
        });
        match outcome {
            Ok(tag) => {
                if answers.values().sum::<u64>() == 0 {
                    println!("answered by {tag}");
                    std::io::stdout().flush()?;
                }
                *answers.entry(tag.clone()).or_default() += 1;
                if tag == until {
                    return Ok(
                        json!({ "ok": true, "moved": true, "answers": answers, "errors": errors, "reconnects": reconnects }),
                    );
                }
            }
            // The kernel aborted the socket and left it unconnected: the
            // application connects again.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EDESTADDRREQ)
                ) =>
            {
                *errors.entry(classify(&e)).or_default() += 1;
                sock.connect(to)
                    .with_context(|| format!("connecting to {to} again"))?;
                reconnects += 1;
            }
            Err(e) => *errors.entry(classify(&e)).or_default() += 1,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What one attempt to reach a target came to.
fn classify(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "eperm".into(),
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::EACCES) => "eacces".into(),
        Some(libc::ECONNABORTED) => "aborted".into(),
        Some(libc::EDESTADDRREQ) => "unconnected".into(),
        _ if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => "timeout".into(),
        _ => format!("error: {e}"),
    }
}

fn parse_mark(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a socket mark: {e}"))
}

/// A TCP connection to `addr`, its socket marked first when asked.
fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
    mark: Option<u32>,
) -> std::io::Result<TcpStream> {
    use nix::sys::{
        socket::{
            AddressFamily, SockFlag, SockType, SockaddrStorage, connect, setsockopt, socket,
            sockopt,
        },
        time::TimeVal,
    };
    let Some(mark) = mark else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::Mark, &mark)?;
    // A blocking connect gives up after SO_SNDTIMEO, with EINPROGRESS.
    let micros = timeout.as_micros() as i64;
    setsockopt(
        &fd,
        sockopt::SendTimeout,
        &TimeVal::new(micros / 1_000_000, micros % 1_000_000),
    )?;
    match connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    ) {
        Ok(()) => Ok(TcpStream::from(fd)),
        Err(nix::errno::Errno::EINPROGRESS) => Err(ErrorKind::TimedOut.into()),
        Err(e) => Err(e.into()),
    }
}

thread_local! {
    /// Whether the last TCP probe connected before it failed.
    static ECHO_PHASE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn probe(target: &str, timeout: Duration, mark: Option<u32>) -> anyhow::Result<String> {
    let (proto, addr) = target.split_once(':').with_context(|| {
        format!("target {target:?} is not tcp:ADDR, udp:ADDR, udp-sendto:ADDR, udplite:ADDR, udplite-sendto:ADDR or raw-syn:ADDR")
    })?;
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address in {target:?}"))?;
    const PAYLOAD: &[u8] = b"mesh-probe";
    Ok(match proto {
        "tcp" => {
            let mut conn = match connect_tcp(addr, timeout, mark) {
                Ok(c) => c,
                Err(e) => return Ok(classify(&e)),
            };
            ECHO_PHASE.set(true);
            conn.set_read_timeout(Some(timeout))?;
            conn.write_all(PAYLOAD)?;
            let mut back = [0u8; PAYLOAD.len()];
            match conn.read_exact(&mut back) {
                Ok(()) if back == PAYLOAD => "connected".into(),
                Ok(()) => "corrupted".into(),
                Err(e) => classify(&e),
            }
        }
        "udp" | "udplite" | "udplite-sendto" => {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let sock = if proto.starts_with("udplite") {
                match udplite_socket(&addr) {
                    Ok(sock) => sock,
                    Err(e) => return Ok(classify(&e)),
                }
            } else {
                std::net::UdpSocket::bind(local)?
            };
            if let Some(mark) = mark {
                nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Mark, &mark)?;
            }
            sock.set_read_timeout(Some(timeout))?;
            // `udplite-sendto`: every datagram names its destination (an
            // unconnected socket); the others connect first.
            let sent = if proto == "udplite-sendto" {
                sock.send_to(PAYLOAD, addr)
            } else {
                if let Err(e) = sock.connect(addr) {
                    return Ok(classify(&e));
                }
                sock.send(PAYLOAD)
            };
            if let Err(e) = sent {
                return Ok(classify(&e));
            }
            let mut back = [0u8; 64];
            match sock.recv(&mut back) {
                Ok(n) if &back[..n] == PAYLOAD => "connected".into(),
                Ok(_) => "corrupted".into(),
                Err(e) => classify(&e),
            }
        }
        "raw-syn" => raw_syn(addr, timeout)?,
        "udp-sendto" => {
            // As a resolver asks: an unconnected socket, and an answer
            // accepted only from the address asked.
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let sock = std::net::UdpSocket::bind(local)?;
            sock.set_read_timeout(Some(timeout))?;
            if let Err(e) = sock.send_to(PAYLOAD, addr) {
                return Ok(classify(&e));
            }
            let mut back = [0u8; 64];
            match sock.recv_from(&mut back) {
                Ok((_, from)) if from != addr => format!("answered from {from}"),
                Ok((n, _)) if &back[..n] == PAYLOAD => "connected".into(),
                Ok(_) => "corrupted".into(),
                Err(e) => classify(&e),
            }
        }
        other => bail!("unknown protocol {other:?} in {target:?}"),
    })
}

fn probe_all(
    targets: &[String],
    timeout: Duration,
    mark: Option<u32>,
) -> anyhow::Result<serde_json::Value> {
    let mut results = serde_json::Map::new();
    for target in targets {
        results.insert(target.clone(), json!(probe(target, timeout, mark)?));
    }
    Ok(json!({ "ok": true, "results": results }))
}

fn probe_repeatedly(
    targets: &[String],
    timeout: Duration,
    duration: Duration,
    mark: Option<u32>,
) -> anyhow::Result<serde_json::Value> {
    let mut counts: std::collections::BTreeMap<&str, std::collections::BTreeMap<String, u64>> =
        Default::default();
    // When a probe that did not connect ran, and how far it got: what a
    // test needs to tell a dropped SYN (connect) from a lost echo, and to
    // line the failure up with the agents' logs.
    let mut failures = Vec::new();
    let deadline = Instant::now() + duration;
    println!("probing");
    std::io::stdout().flush()?;
    while Instant::now() < deadline && !stop_requested() {
        for target in targets {
            let at = std::time::SystemTime::now();
            let began = Instant::now();
            ECHO_PHASE.set(false);
            let result = probe(target, timeout, mark)?;
            if result != "connected" && failures.len() < 20 {
                let at = at.duration_since(std::time::UNIX_EPOCH)?;
                failures.push(json!({
                    "target": target,
                    "result": result,
                    "unix_ms": at.as_millis() as u64,
                    "took_ms": began.elapsed().as_millis() as u64,
                    "phase": if ECHO_PHASE.get() { "echo" } else { "connect" },
                }));
            }
            *counts.entry(target).or_default().entry(result).or_default() += 1;
        }
    }
    Ok(json!({ "ok": true, "counts": counts, "failures": failures }))
}

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn wait_change(
    target: &str,
    interval: Duration,
    timeout: Duration,
    give_up: Duration,
) -> anyhow::Result<serde_json::Value> {
    let first = probe(target, timeout, None)?;
    println!("first {first}");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + give_up;
    let mut probes = 1u64;
    loop {
        std::thread::sleep(interval);
        let started = monotonic_ns();
        let now = probe(target, timeout, None)?;
        probes += 1;
        if now != first {
            return Ok(json!({
                "ok": true, "from": first, "to": now, "probes": probes,
                "changed_at_ns": started,
            }));
        }
        ensure!(Instant::now() < deadline, "still {first} after {give_up:?}");
    }
}

/// Many connections at once, with tokio on one thread: the soak's client
/// and server.
mod many {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use anyhow::Context as _;
    use serde_json::json;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpSocket, TcpStream};

    const PING: usize = 64;
    /// Connections being opened at once during the ramp-up.
    const OPENING: usize = 64;

    fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?)
    }

    /// As many descriptors as the hard limit allows.
    fn raise_fd_limit() -> anyhow::Result<()> {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        Ok(())
    }

    pub fn echo(listen: SocketAddr) -> anyhow::Result<()> {
        raise_fd_limit()?;
        runtime()?.block_on(async {
            let socket = if listen.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket
                .bind(listen)
                .with_context(|| format!("binding {listen}"))?;
            let listener: TcpListener = socket.listen(4096)?;
            println!("listening {}", listener.local_addr()?);
            loop {
                let (mut conn, _) = listener.accept().await?;
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        })
    }

    pub fn hold(
        to: SocketAddr,
        connections: usize,
        duration: Duration,
        sample_per_s: usize,
    ) -> anyhow::Result<serde_json::Value> {
        raise_fd_limit()?;
        runtime()?.block_on(async {
            let started = Instant::now();
            let mut held: Vec<Option<TcpStream>> = Vec::with_capacity(connections);
            let mut opening = tokio::task::JoinSet::new();
            let mut failed_to_open = 0u64;
            let mut next = 0;
            while held.len() + (failed_to_open as usize) < connections {
                while next < connections && opening.len() < OPENING {
                    opening.spawn(TcpStream::connect(to));
                    next += 1;
                }
                match opening.join_next().await.context("nothing opening")? {
                    Ok(Ok(conn)) => held.push(Some(conn)),
                    _ => failed_to_open += 1,
                }
            }
            let ramp_ms = started.elapsed().as_millis() as u64;
            println!("held {} in {ramp_ms} ms", held.len());

            // Every tenth of a second, a tenth of the sample, in turn.
            let per_tick = sample_per_s.div_ceil(10).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let end = Instant::now() + duration;
            let (mut pings, mut failures, mut closed) = (0u64, 0u64, 0u64);
            let mut turn = 0usize;
            let mut pattern = [0u8; PING];
            while Instant::now() < end && !super::stop_requested() {
                tick.tick().await;
                for _ in 0..per_tick.min(held.len()) {
                    let i = turn % held.len();
                    turn += 1;
                    let Some(conn) = held[i].as_mut() else {
                        continue;
                    };
                    for (j, b) in pattern.iter_mut().enumerate() {
                        *b = (turn + j) as u8;
                    }
                    let mut back = [0u8; PING];
                    let exchange = async {
                        conn.write_all(&pattern).await?;
                        conn.read_exact(&mut back).await?;
                        anyhow::Ok(())
                    };
                    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                        Ok(Ok(())) if back == pattern => pings += 1,
                        Ok(Ok(())) => failures += 1,
                        _ => {
                            failures += 1;
                            closed += 1;
                            held[i] = None;
                        }
                    }
                }
            }
            let still_open = held.iter().filter(|c| c.is_some()).count();
            Ok(json!({
                "ok": failures == 0 && failed_to_open == 0,
                "connections": connections,
                "failed_to_open": failed_to_open,
                "ramp_ms": ramp_ms,
                "pings": pings,
                "failures": failures,
                "closed": closed,
                "still_open": still_open,
            }))
        })
    }
}
