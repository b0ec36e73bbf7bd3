//! Capture of the wire between nodes: an AF_PACKET socket on one interface
//! of the fabric, and the checks the mTLS tests make on what it saw.
#![allow(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, ensure};

use crate::netns::Netns;

/// Frames seen on an interface until [`Capture::stop`].
pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

const ETH_P_ALL: u16 = 0x0003;

impl Capture {
    /// Starts capturing every frame of `interface` in `netns`.
    pub fn start(netns: &Netns, interface: &str) -> anyhow::Result<Self> {
        let ns = netns.file()?;
        let interface = interface.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, frames) = (stop.clone(), frames.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let sock = match open_packet_socket(&interface) {
                    Ok(sock) => {
                        let _ = ready_tx.send(Ok(()));
                        sock
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                let mut buf = vec![0u8; 1 << 17];
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: reads into a buffer we own, of its length.
                    let n = unsafe {
                        libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n > 0 {
                        frames.lock().unwrap().push(buf[..n as usize].to_vec());
                    }
                }
                Ok(())
            })
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("capture on {}: {e}", netns.name()),
            Err(_) => anyhow::bail!("capture thread ended before it started"),
        }
        Ok(Self {
            stop,
            frames,
            thread: Some(thread),
        })
    }

    /// Stops and returns the frames, in the order they were seen.
    pub fn stop(mut self) -> anyhow::Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("capture thread")?;
        }
        Ok(std::mem::take(&mut self.frames.lock().unwrap()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A raw socket bound to `interface`, with a 100 ms receive timeout so the
/// loop sees the stop flag.
fn open_packet_socket(interface: &str) -> anyhow::Result<OwnedFd> {
    let index = nix::net::if_::if_nametoindex(interface)
        .with_context(|| format!("no interface {interface}"))?;
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: addr is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "binding to {interface}: {}",
        std::io::Error::last_os_error()
    );
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    ensure!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    // Room for bursts (a 64 MiB transfer arrives faster than it is copied
    // out): a frame dropped here would be a gap in the reassembled stream.
    let size: libc::c_int = 512 << 20;
    // SAFETY: an int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "SO_RCVBUFFORCE: {}",
        std::io::Error::last_os_error()
    );
    Ok(sock)
}

/// One TCP or UDP segment of a captured frame.
#[derive(Debug, Clone)]
pub struct Segment {
    pub proto: u8,
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    pub seq: u32,
    pub syn: bool,
    pub payload: Vec<u8>,
}

/// The TCP and UDP segments of Ethernet frames (IPv4 and IPv6 without
/// extension headers, which is all these tests send).
pub fn segments(frames: &[Vec<u8>]) -> Vec<Segment> {
    frames.iter().filter_map(|f| parse_frame(f)).collect()
}

fn parse_frame(f: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = f.get(14..)?;
    let (proto, src, dst, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (
                *ip.get(9)?,
                IpAddr::from(src),
                IpAddr::from(dst),
                ip.get(ihl..total.min(ip.len()))?,
            )
        }
        0x86dd => {
            let len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                *ip.get(6)?,
                IpAddr::from(src),
                IpAddr::from(dst),
                ip.get(40..(40 + len).min(ip.len()))?,
            )
        }
        _ => return None,
    };
    let port = |at: usize| Some(u16::from_be_bytes([*l4.get(at)?, *l4.get(at + 1)?]));
    match proto {
        6 => {
            let offset = usize::from(l4.get(12)? >> 4) * 4;
            Some(Segment {
                proto,
                src: (src, port(0)?),
                dst: (dst, port(2)?),
                seq: u32::from_be_bytes(l4.get(4..8)?.try_into().ok()?),
                syn: l4.get(13)? & 0x02 != 0,
                payload: l4.get(offset..)?.to_vec(),
            })
        }
        17 => Some(Segment {
            proto,
            src: (src, port(0)?),
            dst: (dst, port(2)?),
            seq: 0,
            syn: false,
            payload: l4.get(8..)?.to_vec(),
        }),
        _ => None,
    }
}

/// One direction of a TCP connection: (source, destination).
pub type Direction = ((IpAddr, u16), (IpAddr, u16));

/// Each direction of each TCP connection, reassembled in sequence order
/// (segments captured out of order are put back in place, retransmitted
/// bytes counted once). A direction whose SYN was not captured cannot be
/// aligned to its first byte, and a hole left at the end means a segment
/// was not captured: both are errors.
pub fn tcp_streams(segs: &[Segment]) -> anyhow::Result<BTreeMap<Direction, Vec<u8>>> {
    type Dir = Direction;
    let mut isn: BTreeMap<Dir, u32> = BTreeMap::new();
    let mut pieces: BTreeMap<Dir, Vec<(u32, &[u8])>> = BTreeMap::new();
    for s in segs.iter().filter(|s| s.proto == 6) {
        let key = (s.src, s.dst);
        if s.syn {
            isn.insert(key, s.seq.wrapping_add(1));
            pieces.entry(key).or_default();
        } else if !s.payload.is_empty() {
            pieces.entry(key).or_default().push((s.seq, &s.payload));
        }
    }
    let mut streams = BTreeMap::new();
    for (key, mut list) in pieces {
        let Some(&first) = isn.get(&key) else {
            anyhow::bail!("data of {:?} → {:?} without a captured SYN", key.0, key.1);
        };
        // Offsets from the first byte (streams here are far below 2 GiB).
        list.sort_by_key(|(seq, _)| seq.wrapping_sub(first));
        let mut stream = Vec::new();
        for (seq, payload) in list {
            let offset = seq.wrapping_sub(first) as usize;
            ensure!(
                offset <= stream.len(),
                "gap in {:?} → {:?} at byte {}: a segment was not captured",
                key.0,
                key.1,
                stream.len()
            );
            let skip = stream.len() - offset;
            if skip < payload.len() {
                stream.extend_from_slice(&payload[skip..]);
            }
        }
        streams.insert(key, stream);
    }
    Ok(streams)
}

/// How a byte stream splits into TLS records: (record type, length) of each
/// complete record; fails at the first byte that is not a record header.
/// An incomplete last record (capture stopped mid-record) is allowed.
pub fn tls_records(stream: &[u8]) -> anyhow::Result<Vec<(u8, usize)>> {
    let mut records = Vec::new();
    let mut at = 0;
    while at + 5 <= stream.len() {
        let kind = stream[at];
        let version = u16::from_be_bytes([stream[at + 1], stream[at + 2]]);
        let len = usize::from(u16::from_be_bytes([stream[at + 3], stream[at + 4]]));
        ensure!(
            (20..=23).contains(&kind)
                && (0x0301..=0x0303).contains(&version)
                && len <= (1 << 14) + 256,
            "byte {at}: not a TLS record header ({:02x?})",
            &stream[at..at + 5]
        );
        records.push((kind, len));
        at += 5 + len;
    }
    Ok(records)
}

/// Whether `needle` occurs anywhere in any captured frame.
pub fn contains(frames: &[Vec<u8>], needle: &[u8]) -> bool {
    frames
        .iter()
        .any(|f| f.windows(needle.len()).any(|w| w == needle))
}
