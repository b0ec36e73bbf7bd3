//! HBONE tunnels between node agents: HTTP/2 CONNECT over mutual TLS.
//!
//! The pieces know nothing about TLS or identities: they run over any byte
//! stream (a `tokio_rustls` stream in the agent, plain TCP in some tests).
//!
//! - [`client`]: an HTTP/2 connection to a peer agent, on which
//!   [`client::Connection::open`] sends `CONNECT <ip:port>` and returns a
//!   [`client::Tunnel`], or the peer's refusal with its reason.
//! - [`server`]: serves one HTTP/2 connection from a peer agent, asking a
//!   handler (policy, then a connection to the local destination) for each
//!   `CONNECT`.
//! - [`splice`]: copies bytes between a TCP socket and a tunnel stream, with
//!   half-close, flow-control back-pressure and resets carried both ways.
//! - [`pool`]: shares client connections per (source identity, destination
//!   identity, peer) key, one handshake at a time, retired after a maximum age.
//! - [`bulk`] and [`ktls`]: bulk tunnels, one TLS connection each (HTTP/1.1
//!   `CONNECT`), whose records the kernel encrypts where it can, with the
//!   bytes moved by `splice(2)`.

pub mod bulk;
pub mod client;
pub mod ktls;
pub mod pool;
pub mod server;
pub mod splice;

#[cfg(test)]
mod bulk_tests;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use std::time::Duration;

use serde::Serialize;

/// The response header in which a peer says why it refused a tunnel (for
/// example which policy rule denied it), so the source node can log it.
pub const REASON_HEADER: &str = "x-mesh-reason";

const KIB: u32 = 1024;
const MIB: u32 = 1024 * KIB;
/// HTTP/2's limits (RFC 9113 §6.5.2, §6.9.1).
const MAX_WINDOW: u32 = (1 << 31) - 1;
const MIN_FRAME: u32 = 1 << 14;
const MAX_FRAME: u32 = (1 << 24) - 1;

/// HTTP/2 and pooling settings for tunnels; both ends of a tunnel use the
/// same struct, so one agent configuration tunes both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelSettings {
    /// Receive window of each tunnel stream: how many bytes a peer may send
    /// on one tunnel before this end has written them to the socket. One
    /// window per round trip is a tunnel's top speed: 4 MiB carries
    /// 33 Gbit/s at a 1 ms round trip, far more on a LAN's 0.1–0.3 ms. It is
    /// also the most one tunnel whose application stops reading can hold
    /// in this agent's memory.
    pub stream_window: u32,
    /// Receive window shared by all the tunnels of one connection, which
    /// bounds this agent's buffered receive memory per connection. Larger
    /// than a stream window so that a few tunnels whose applications read
    /// slowly (each holding up to a full stream window) cannot stall the
    /// others: here eight full windows fit.
    pub connection_window: u32,
    /// Largest DATA frame this end accepts. Big frames mean fewer frame
    /// headers and fewer wake-ups per byte; a frame is never bigger than
    /// what one socket read produced, so small writes stay small.
    pub max_frame_size: u32,
    /// Most tunnels one connection carries at once (advertised to the peer,
    /// and the pool's limit before it opens another connection). Each
    /// pooled connection costs about 100 kB (TLS, HTTP/2's codec and frame
    /// queues, its task), so at 100 streams a held tunnel paid 1 kB for its
    /// share of one; at 1,000 it pays 0.1 kB (`mesh-bench soak`). The
    /// tunnels of one connection share its window and its TLS session's
    /// CPU, but only tunnels between the same two workload identities on
    /// the same two nodes ever share a connection.
    pub max_concurrent_streams: u32,
    /// Bytes of one tunnel that may wait in HTTP/2's send queue (for the
    /// connection's socket, TLS, to take them). The splice does not read
    /// the application's socket again until its last read fits here and in
    /// the peer's window: a slow peer slows the application instead of
    /// growing memory. A few frames' worth keeps the socket busy.
    pub send_buffer: u32,
    /// Size of one socket read (and so of the DATA frames it becomes).
    pub splice_buffer: u32,
    /// Age after which the pool stops opening tunnels on a connection, so
    /// that new connections present a renewed certificate. Streams already
    /// open on it finish there; the connection closes when they are done.
    #[serde(serialize_with = "serialize_duration")]
    pub max_connection_age: Duration,
    /// Time allowed to connect and complete the TLS and HTTP/2 handshakes
    /// (client), or to receive the HTTP/2 preface (server): a peer that
    /// never answers must not hold every caller waiting for it.
    #[serde(serialize_with = "serialize_duration")]
    pub handshake_timeout: Duration,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            stream_window: 4 * MIB,
            connection_window: 32 * MIB,
            max_frame_size: MIB,
            max_concurrent_streams: 1000,
            send_buffer: MIB,
            splice_buffer: 256 * KIB,
            // Certificates live for hours and are renewed at half-life; a
            // fresh TLS handshake per peer every half hour costs nothing.
            max_connection_age: Duration::from_secs(30 * 60),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl TunnelSettings {
    /// The splice buffer as a `usize`, at least one byte.
    fn splice_buffer(&self) -> usize {
        (self.splice_buffer as usize).max(1)
    }

    // h2 panics on values outside what HTTP/2 allows; clamp instead.
    fn window(size: u32) -> u32 {
        size.clamp(1, MAX_WINDOW)
    }

    fn frame_size(&self) -> u32 {
        self.max_frame_size.clamp(MIN_FRAME, MAX_FRAME)
    }

    fn h2_client(&self) -> h2::client::Builder {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(Self::window(self.stream_window))
            .initial_connection_window_size(Self::window(self.connection_window))
            .max_frame_size(self.frame_size())
            .max_send_buffer_size(self.send_buffer as usize)
            // Until the peer's SETTINGS arrive, assume it takes as many
            // streams as we would: both ends are agents with one config.
            .initial_max_send_streams(self.max_concurrent_streams as usize)
            .enable_push(false);
        builder
    }

    fn h2_server(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(Self::window(self.stream_window))
            .initial_connection_window_size(Self::window(self.connection_window))
            .max_frame_size(self.frame_size())
            .max_send_buffer_size(self.send_buffer as usize)
            .max_concurrent_streams(self.max_concurrent_streams);
        builder
    }
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}
