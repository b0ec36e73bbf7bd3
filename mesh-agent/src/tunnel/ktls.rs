//! Carrying a bulk tunnel ([`super::bulk`]) once its `CONNECT` is answered:
//! with kernel TLS where the kernel has it, else in user space.
//!
//! Kernel TLS: rustls did the handshake and the `CONNECT`; its traffic
//! secrets and record sequence numbers go to the kernel (`TCP_ULP tls`,
//! `TLS_TX`, `TLS_RX`), and `splice(2)` moves the bytes between the
//! workload's socket and the TLS socket through a pipe, never through the
//! agent's memory. A record that is not application data (an alert, a
//! post-handshake message) stops a splice with `EINVAL`; it is then read
//! with `recvmsg(2)`, whose control message gives its type.
//!
//! Limits, and what is done about them:
//! - Kernels before 6.13 cannot take new keys on a TLS 1.3 socket, so a
//!   direction that nears its cipher's record limit (2^24 records for
//!   AES-GCM, some 224 GiB of full records) is ended with a reset rather than
//!   sent on under a worn key; a KeyUpdate from the peer likewise.
//! - Session tickets are off on every mesh connection, so none arrives on
//!   a kernel socket (one would fail `recvmsg` for plain readers).
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use nix::{
    fcntl::{OFlag, SpliceFFlags, splice},
    sys::socket::{
        ControlMessageOwned, MsgFlags, Shutdown, TlsGetRecordType, recvmsg, setsockopt, shutdown,
        sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo},
    },
};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::TcpStream,
};
use tracing::{debug, info, warn};

use super::bulk::{BulkTls, TcpSocket};

/// Where a bulk tunnel's records are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Records {
    Kernel,
    User,
}

impl Records {
    pub fn name(self) -> &'static str {
        match self {
            Records::Kernel => "kernel",
            Records::User => "user",
        }
    }
}

/// Whether this agent hands bulk tunnels to kernel TLS: on while the
/// kernel takes the `tls` upper-layer protocol; the first refusal turns it
/// off, with one log line.
#[derive(Debug)]
pub struct KernelTls {
    on: AtomicBool,
    /// Records one key may encrypt, when lower than its cipher's limit:
    /// the tests reach it in a few records.
    record_limit: Option<u64>,
}

impl KernelTls {
    pub fn new(on: bool) -> Self {
        Self {
            on: AtomicBool::new(on),
            record_limit: None,
        }
    }

    #[cfg(test)]
    pub fn with_record_limit(on: bool, records: u64) -> Self {
        Self {
            record_limit: Some(records),
            ..Self::new(on)
        }
    }

    pub(super) fn record_limit(&self) -> Option<u64> {
        self.record_limit
    }

    fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Sets `TCP_ULP tls` on `tcp`; false if the kernel refuses. A kernel
    /// without TLS (`ENOENT`: no such upper-layer protocol) turns kernel
    /// TLS off for good; any other refusal is this socket's (one the peer
    /// has already closed is no longer `ESTABLISHED`).
    pub(super) fn attach(&self, tcp: &TcpStream) -> bool {
        if !self.on() {
            return false;
        }
        match setsockopt(tcp, TcpUlp::default(), b"tls") {
            Ok(()) => true,
            Err(nix::errno::Errno::ENOENT) => {
                if self.on.swap(false, Ordering::Relaxed) {
                    warn!(
                        "the kernel has no TLS (TCP_ULP tls: ENOENT; CONFIG_TLS missing): bulk tunnels encrypt in user space"
                    );
                }
                false
            }
            Err(e) => {
                debug!(error = %e, "kernel TLS refused for this bulk tunnel: it encrypts in user space");
                false
            }
        }
    }
}

/// A connection's keys for the kernel, both directions.
pub struct Secrets {
    tx: TlsCryptoInfo,
    rx: TlsCryptoInfo,
    /// Records the cipher allows under one key.
    limit: u64,
}

impl Secrets {
    pub fn new(secrets: ExtractedSecrets, limit: u64) -> Result<Self, rustls::Error> {
        let unsupported = || rustls::Error::General("a cipher the kernel's TLS lacks".into());
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(Self {
            tx: crypto_info(tx_seq, &tx).ok_or_else(unsupported)?,
            rx: crypto_info(rx_seq, &rx).ok_or_else(unsupported)?,
            limit,
        })
    }

    fn install(&self, tcp: &TcpStream) -> io::Result<()> {
        setsockopt(tcp, TcpTlsTx, &self.tx)?;
        setsockopt(tcp, TcpTlsRx, &self.rx)?;
        Ok(())
    }
}

/// The kernel's TLS 1.3 parameters for one direction: the AEAD key, the
/// 12-byte IV split as the kernel wants it (a 4-byte salt and 8 bytes for
/// AES-GCM, all 12 for ChaCha20), and the next record's sequence number.
fn crypto_info(seq: u64, secrets: &ConnectionTrafficSecrets) -> Option<TlsCryptoInfo> {
    let rec_seq = seq.to_be_bytes();
    let info = |cipher_type| libc::tls_crypto_info {
        version: libc::TLS_1_3_VERSION,
        cipher_type,
    };
    Some(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(4);
            TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: iv.try_into().ok()?,
                key: key.as_ref().try_into().ok()?,
                salt: salt.try_into().ok()?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(4);
            TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: iv.try_into().ok()?,
                key: key.as_ref().try_into().ok()?,
                salt: salt.try_into().ok()?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            TlsCryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: iv.as_ref().try_into().ok()?,
                key: key.as_ref().try_into().ok()?,
                salt: [],
                rec_seq,
            })
        }
        _ => return None,
    })
}

/// How the kernel path takes the workload's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadReads {
    /// `splice(2)` from the workload's socket: no copy at all.
    Splice,
    /// `read(2)` into the agent, then a write the kernel encrypts: for a
    /// socket the same-node short-circuit may feed (the source's agent
    /// accepts on the workload's loopback, which `--short-circuit on`
    /// covers), whose redirected bytes a splice would not see.
    Read,
}

/// Carries the tunnel until both directions have ended: `rest` (what the
/// peer sent behind its head) goes to `workload` first. In the kernel if
/// the socket was readied for it ([`super::bulk::RecordReader::ready_kernel_tls`]),
/// else in user space; `started` learns which. On any failure both
/// sockets are reset.
pub async fn carry<T: BulkTls, U: TcpSocket>(
    mut tls: T,
    rest: Bytes,
    mut workload: U,
    reads: WorkloadReads,
    started: impl FnOnce(Records),
) -> io::Result<()> {
    if tls.io().kernel_ready() {
        let (tcp, secrets) = match tls.into_secrets() {
            Ok(parts) => parts,
            Err(e) => {
                let _ = workload.reset_on_close();
                return Err(io::Error::other(e));
            }
        };
        started(Records::Kernel);
        let result = match secrets.install(&tcp) {
            Ok(()) => splice_both_ways(&tcp, rest, &mut workload, reads, secrets.limit).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tcp.set_zero_linger();
            let _ = workload.reset_on_close();
        }
        return result;
    }
    started(Records::User);
    tls.io_mut().unbound();
    let result = relay_in_user_space(&mut tls, rest, &mut workload).await;
    if result.is_err() {
        let _ = tls.io().tcp().set_zero_linger();
        let _ = workload.reset_on_close();
    }
    result
}

/// Copies both ways through rustls; each direction's end is a close_notify.
async fn relay_in_user_space<T: BulkTls, U: TcpSocket>(
    tls: &mut T,
    rest: Bytes,
    workload: &mut U,
) -> io::Result<()> {
    workload.write_all(&rest).await?;
    let (mut tls_in, mut tls_out) = tokio::io::split(tls);
    let (mut from_workload, mut to_workload) = tokio::io::split(workload);
    let up = async {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = from_workload.read(&mut buf).await?;
            if n == 0 {
                // close_notify, then the TCP end.
                return tls_out.shutdown().await;
            }
            tls_out.write_all(&buf[..n]).await?;
            tls_out.flush().await?;
        }
    };
    let down = async {
        let mut buf = vec![0; 64 * 1024];
        loop {
            // Ok(0) only after a close_notify: a bare TCP end is an error.
            let n = tls_in.read(&mut buf).await?;
            if n == 0 {
                return to_workload.shutdown().await;
            }
            to_workload.write_all(&buf[..n]).await?;
        }
    };
    tokio::try_join!(up, down).map(|_| ())
}

/// Bytes a splice moves at most: a pipe's default capacity.
const PIPE_CHUNK: usize = 64 * 1024;
/// Largest TLS record payload.
const MAX_RECORD: usize = 16 * 1024;

async fn splice_both_ways<U: TcpSocket>(
    tls: &TcpStream,
    rest: Bytes,
    workload: &mut U,
    reads: WorkloadReads,
    limit: u64,
) -> io::Result<()> {
    workload.write_all(&rest).await?;
    let workload = workload.tcp();
    tokio::try_join!(
        workload_to_peer(workload, tls, Pipe::new()?, reads, limit),
        peer_to_workload(tls, workload, Pipe::new()?),
    )
    .map(|_| ())
}

/// Until the workload's end, which becomes a close_notify and a FIN.
async fn workload_to_peer(
    workload: &TcpStream,
    tls: &TcpStream,
    pipe: Pipe,
    mut reads: WorkloadReads,
    limit: u64,
) -> io::Result<()> {
    // Ended well before the cipher's limit: records are counted from
    // above (a splice or a write may end a record early), and the margin
    // is wide.
    let allowed = limit - limit / 8;
    let mut records: u64 = 0;
    let mut buf = Vec::new();
    loop {
        let (n, calls) = match reads {
            WorkloadReads::Splice => match fill(workload, &pipe).await {
                Ok(0) => (0, 0),
                Ok(n) => (n, drain(&pipe, tls, n).await?),
                // The splice guard refuses a short-circuited socket
                // (docs/short-circuit.md): read it instead.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    reads = WorkloadReads::Read;
                    continue;
                }
                Err(e) => return Err(e),
            },
            WorkloadReads::Read => {
                buf.resize(PIPE_CHUNK, 0);
                let n = read_some(workload, &mut buf).await?;
                (n, write_all(tls, &buf[..n]).await?)
            }
        };
        if n == 0 {
            send_close_notify(tls).await?;
            return Ok(shutdown(tls.as_raw_fd(), Shutdown::Write)?);
        }
        records += (n.div_ceil(MAX_RECORD) + calls) as u64;
        if records >= allowed {
            warn!(
                records,
                "a bulk tunnel reached its cipher's record limit, and this kernel cannot rekey: reset"
            );
            return Err(io::Error::other("record limit of the cipher reached"));
        }
    }
}

async fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
    }
}

/// Until the peer's close_notify, which becomes the workload's FIN. A TCP
/// end without one, or any other control record, is an error.
async fn peer_to_workload(tls: &TcpStream, workload: &TcpStream, pipe: Pipe) -> io::Result<()> {
    loop {
        match fill(tls, &pipe).await {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer's TCP end came without a close_notify (truncated)",
                ));
            }
            Ok(n) => {
                drain(&pipe, workload, n).await?;
            }
            // The next record is not application data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match read_record(tls).await? {
                Record::CloseNotify => {
                    return Ok(shutdown(workload.as_raw_fd(), Shutdown::Write)?);
                }
                Record::Data(bytes) => {
                    write_all(workload, &bytes).await?;
                }
                Record::Other(what) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, what));
                }
            },
            Err(e) => return Err(e),
        }
    }
}

/// A pipe between two sockets, non-blocking at both ends.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Self { read, write })
    }
}

const SPLICE: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// Moves what `from` has (up to a pipe's worth) into the empty `pipe`;
/// 0 at `from`'s end.
async fn fill(from: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_io(Interest::READABLE, || {
            Ok(splice(from, None, &pipe.write, None, PIPE_CHUNK, SPLICE)?)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            moved => return moved,
        }
    }
}

/// Moves the `len` bytes in `pipe` to `to`; how many splices it took.
async fn drain(pipe: &Pipe, to: &TcpStream, mut len: usize) -> io::Result<usize> {
    let mut calls = 0;
    while len > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            Ok(splice(&pipe.read, None, to, None, len, SPLICE)?)
        }) {
            Ok(n) => {
                len -= n;
                calls += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(calls)
}

/// Writes all of `bytes`; how many writes it took.
async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<usize> {
    let mut calls = 0;
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => {
                bytes = &bytes[n..];
                calls += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(calls)
}

/// A record read with `recvmsg(2)` from a kernel TLS socket.
#[derive(Debug, PartialEq, Eq)]
enum Record {
    CloseNotify,
    Data(Vec<u8>),
    /// Anything else, described.
    Other(String),
}

async fn read_record(tls: &TcpStream) -> io::Result<Record> {
    loop {
        tls.readable().await?;
        match tls.try_io(Interest::READABLE, || receive_record(tls.as_fd())) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
    }
}

fn receive_record(fd: BorrowedFd<'_>) -> io::Result<Record> {
    let mut buf = vec![0u8; MAX_RECORD + 256];
    let mut control = nix::cmsg_space!(u8);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let (len, kind) = {
        let msg = recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_DONTWAIT,
        )?;
        let kind = msg.cmsgs()?.find_map(|c| match c {
            ControlMessageOwned::TlsGetRecordType(t) => Some(t),
            _ => None,
        });
        (msg.bytes, kind)
    };
    buf.truncate(len);
    Ok(classify(kind, buf))
}

/// What a received record means for the tunnel.
fn classify(kind: Option<TlsGetRecordType>, payload: Vec<u8>) -> Record {
    match kind {
        None | Some(TlsGetRecordType::ApplicationData) if !payload.is_empty() => {
            Record::Data(payload)
        }
        None | Some(TlsGetRecordType::ApplicationData) => {
            Record::Other("the peer's TCP end came without a close_notify (truncated)".into())
        }
        // Alert: level, then description; 0 is close_notify.
        Some(TlsGetRecordType::Alert) if payload.get(1) == Some(&0) => Record::CloseNotify,
        Some(TlsGetRecordType::Alert) => Record::Other(format!("TLS alert {payload:?} from the peer")),
        Some(TlsGetRecordType::Handshake) => Record::Other(
            "a TLS handshake message (a KeyUpdate?) after the handshake, which kernel TLS here cannot follow"
                .into(),
        ),
        Some(other) => Record::Other(format!("an unexpected TLS record ({other:?})")),
    }
}

/// TLS record type of an alert.
const ALERT: u8 = 21;
/// A warning-level close_notify.
const CLOSE_NOTIFY: [u8; 2] = [1, 0];

async fn send_close_notify(tls: &TcpStream) -> io::Result<()> {
    loop {
        tls.writable().await?;
        match tls.try_io(Interest::WRITABLE, || {
            mesh_datapath::sys::send_tls_record(tls.as_fd(), ALERT, &CLOSE_NOTIFY)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            sent => return sent,
        }
    }
}

/// Logs, once at start, where bulk tunnels will be encrypted.
pub fn announce(ports: &[u16], kernel: &KernelTls) {
    if ports.is_empty() {
        return;
    }
    info!(
        ?ports,
        records = if kernel.on() { "kernel" } else { "user" },
        "bulk tunnels: a TLS connection of their own for connections to these ports"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_where_the_kernel_reads_them() {
        use rustls::crypto::cipher::{AeadKey, Iv};
        let key: [u8; 32] = std::array::from_fn(|i| 100 + i as u8);
        let iv: [u8; 12] = std::array::from_fn(|i| i as u8);
        let seq = [0, 0, 0, 0, 0, 0, 1, 2];

        let aes = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from(key),
            iv: Iv::from(iv),
        };
        let Some(TlsCryptoInfo::Aes256Gcm(c)) = crypto_info(0x0102, &aes) else {
            panic!("not AES-256-GCM")
        };
        assert_eq!(
            (c.info.version, c.info.cipher_type),
            (libc::TLS_1_3_VERSION, libc::TLS_CIPHER_AES_GCM_256)
        );
        assert_eq!(
            (c.salt, c.iv, c.key, c.rec_seq),
            ([0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], key, seq)
        );

        let chacha = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from(key),
            iv: Iv::from(iv),
        };
        let Some(TlsCryptoInfo::Chacha20Poly1305(c)) = crypto_info(0x0102, &chacha) else {
            panic!("not ChaCha20-Poly1305")
        };
        assert_eq!(c.info.cipher_type, libc::TLS_CIPHER_CHACHA20_POLY1305);
        assert_eq!((c.iv, c.key, c.rec_seq), (iv, key, seq));

        // A 32-byte key is not an AES-128 key: refused, not truncated.
        let wrong = ConnectionTrafficSecrets::Aes128Gcm {
            key: AeadKey::from(key),
            iv: Iv::from(iv),
        };
        assert!(crypto_info(0, &wrong).is_none());
    }

    #[test]
    fn control_records_are_told_apart() {
        use TlsGetRecordType as T;
        assert_eq!(classify(Some(T::Alert), vec![1, 0]), Record::CloseNotify);
        assert!(matches!(
            classify(Some(T::Alert), vec![2, 40]),
            Record::Other(_)
        ));
        assert!(matches!(
            classify(Some(T::Handshake), vec![24, 0, 0, 1, 0]),
            Record::Other(_)
        ));
        assert_eq!(
            classify(Some(T::ApplicationData), vec![7]),
            Record::Data(vec![7])
        );
        assert!(matches!(classify(None, vec![]), Record::Other(_)));
    }
}
