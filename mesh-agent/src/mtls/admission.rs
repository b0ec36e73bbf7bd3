//! Bounds on what peers can hold of the tunnel listener, which every host
//! that reaches the node can connect to. A TLS handshake costs the agent
//! memory and CPU before the peer has proved anything, and may take up to
//! its timeout: without bounds, one host opening connections and never
//! finishing them would hold the listener. So, at accept:
//!
//! - at most [`Limits::handshakes_per_peer`] unfinished handshakes per peer
//!   address, and [`Limits::handshakes`] in all;
//! - at most [`Limits::connections`] authenticated connections in all (each
//!   carries many tunnels, as HTTP/2 streams, bounded per connection).
//!
//! A connection past a bound is closed at once and counted
//! (`mesh_tunnel_refused_connections_total{reason}`).
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub handshakes_per_peer: usize,
    pub handshakes: usize,
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshakes_per_peer: 64,
            handshakes: 1024,
            connections: 8192,
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    HandshakesPerPeer,
    Handshakes,
    Connections,
}

impl Bound {
    pub fn name(self) -> &'static str {
        match self {
            Bound::HandshakesPerPeer => "handshakes_per_peer",
            Bound::Handshakes => "handshakes",
            Bound::Connections => "connections",
        }
    }
}

/// What is held now.
#[derive(Debug, Default)]
struct Held {
    handshakes_by_peer: HashMap<IpAddr, usize>,
    handshakes: usize,
    connections: usize,
}

/// The listener's bookkeeping; slots are released when their guards drop.
#[derive(Clone, Debug, Default)]
pub struct Admission {
    limits: Limits,
    held: Arc<Mutex<Held>>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            held: Arc::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one handshake from `peer`, and one connection: both are
    /// taken now, so that a connection that passes its handshake is never
    /// refused after the work was done.
    pub fn admit(&self, peer: IpAddr) -> Result<Handshake, Bound> {
        let mut held = self.held();
        let of_peer = held.handshakes_by_peer.get(&peer).copied().unwrap_or(0);
        if of_peer >= self.limits.handshakes_per_peer {
            return Err(Bound::HandshakesPerPeer);
        }
        if held.handshakes >= self.limits.handshakes {
            return Err(Bound::Handshakes);
        }
        if held.connections >= self.limits.connections {
            return Err(Bound::Connections);
        }
        *held.handshakes_by_peer.entry(peer).or_default() += 1;
        held.handshakes += 1;
        held.connections += 1;
        Ok(Handshake {
            connection: Some(Connection {
                admission: self.clone(),
            }),
            peer,
        })
    }
}

/// One handshake in progress; dropped when it ends, however it ends.
#[derive(Debug)]
pub struct Handshake {
    connection: Option<Connection>,
    peer: IpAddr,
}

impl Handshake {
    /// The handshake succeeded: the connection keeps its slot.
    pub fn done(mut self) -> Connection {
        let connection = self.connection.take().expect("a handshake ends once");
        release_handshake(&mut connection.admission.held(), self.peer);
        connection
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        // Failed or abandoned: the handshake's slot, and then (as the
        // connection guard drops) the connection's.
        if let Some(connection) = self.connection.take() {
            release_handshake(&mut connection.admission.held(), self.peer);
        }
    }
}

fn release_handshake(held: &mut Held, peer: IpAddr) {
    held.handshakes -= 1;
    if let Some(n) = held.handshakes_by_peer.get_mut(&peer) {
        *n -= 1;
        if *n == 0 {
            held.handshakes_by_peer.remove(&peer);
        }
    }
}

/// One authenticated connection; dropped when it closes.
#[derive(Debug)]
pub struct Connection {
    admission: Admission,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.admission.held().connections -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            handshakes_per_peer: 2,
            handshakes: 3,
            connections: 4,
        }
    }

    #[test]
    fn each_bound_bites_and_slots_come_back() {
        let a = Admission::new(limits());
        let (p, q, r) = (
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "192.0.2.3".parse().unwrap(),
        );
        let p1 = a.admit(p).unwrap();
        let p2 = a.admit(p).unwrap();
        assert_eq!(a.admit(p).unwrap_err(), Bound::HandshakesPerPeer);
        let q1 = a.admit(q).unwrap();
        assert_eq!(a.admit(r).unwrap_err(), Bound::Handshakes);
        // A finished handshake frees its handshake slot, not its connection.
        let c1 = p1.done();
        let p3 = a.admit(p).unwrap();
        let c2 = q1.done();
        assert_eq!(a.admit(r).unwrap_err(), Bound::Connections);
        // A failed one frees both.
        drop(p2);
        let r1 = a.admit(r).unwrap();
        drop((c1, c2, p3, r1));
        let held = a.held();
        assert_eq!((held.handshakes, held.connections), (0, 0));
        assert!(held.handshakes_by_peer.is_empty());
    }
}
