//! Client connections shared per key: the agent keys them by (source
//! identity, destination identity, peer node), since a connection's TLS
//! session proves one source identity to one peer.
//!
//! - Concurrent callers share a handshake in flight instead of each making
//!   one; a handshake takes as many waiters as a connection takes streams,
//!   and more callers than that start a second one.
//! - A connection carries up to `max_concurrent_streams` tunnels (or the
//!   peer's smaller limit); beyond, another is opened.
//! - A connection leaves the pool when it fails, when the peer says GOAWAY,
//!   or when it reaches `max_connection_age` (so new connections present a
//!   renewed certificate). Leaving the pool never breaks its open tunnels:
//!   they finish on it, and the connection closes when they are done.
//!
//! The pool knows nothing about TLS: the caller supplies the function that
//! makes the byte stream.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::TunnelSettings;
use super::client::{self, Connection, HandshakeError, OpenError, StreamSlot, Tunnel};
use super::splice::{FirstRead, Socket};

/// Why the pool could not reach the peer. Cloneable: every caller waiting
/// on a handshake gets its outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to the peer agent failed: {0}")]
    Connect(Arc<io::Error>),
    #[error(transparent)]
    Handshake(Arc<HandshakeError>),
    #[error("connecting to the peer agent took longer than {0:?}")]
    Timeout(Duration),
    #[error("the connection attempt was abandoned")]
    Abandoned,
    /// Connections were made but took no tunnel (the peer is shutting
    /// down, or advertises no streams): trying again at once would only
    /// hammer it.
    #[error("the peer agent takes no tunnels on new connections")]
    NoCapacity,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// Opening a tunnel on a connection the peer has just closed or told to go
/// away is retried on another; a few times, in case several went at once.
const OPEN_ATTEMPTS: usize = 3;

/// Handshakes in a row that bring no usable slot before a caller gives up:
/// only when the peer turns connections away (closes them at once, or
/// advertises no streams). Losing the race for a new connection's slots to
/// other callers, under a burst of new tunnels, is not such a round: the
/// peer takes tunnels, there were just more of them than slots.
const HANDSHAKE_ROUNDS: usize = 5;

/// A pool of tunnel connections. Cheap to clone: clones share the pool.
pub struct Pool<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for Pool<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<K> {
    settings: TunnelSettings,
    entries: Mutex<HashMap<K, Entry>>,
    next_handshake: AtomicU64,
    handshakes: AtomicU64,
}

#[derive(Default)]
struct Entry {
    connections: Vec<Connection>,
    pending: Vec<Pending>,
}

type HandshakeResult = Result<Connection, ConnectError>;

/// A handshake in flight, shared by the callers waiting for it.
struct Pending {
    id: u64,
    waiters: usize,
    outcome: Shared<BoxFuture<'static, HandshakeResult>>,
}

impl<K> Pool<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    pub fn new(settings: TunnelSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                entries: Mutex::new(HashMap::new()),
                next_handshake: AtomicU64::new(0),
                handshakes: AtomicU64::new(0),
            }),
        }
    }

    /// Opens a tunnel to `target` for the workload's `socket` (whose first
    /// bytes go out behind the `CONNECT`) on a pooled connection for `key`, making
    /// one with `connect` (which returns the peer's mutual-TLS stream) when
    /// none has room. `connect` is called at most once per handshake, with
    /// the pool locked (it should only build the future); the future runs
    /// in a task of its own, so it completes for the other waiters even if
    /// this caller gives up.
    pub async fn open<F, Fut, IO, S>(
        &self,
        key: &K,
        connect: F,
        target: SocketAddr,
        headers: HeaderMap,
        socket: &mut S,
    ) -> Result<Tunnel, PoolError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<IO>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Socket,
    {
        let mut first = FirstRead::Unread;
        let mut attempt = 1;
        loop {
            let (connection, slot) = self.reserve(key, &connect).await?;
            let opened = connection
                .open_in(slot, target, headers.clone(), socket, &mut first)
                .await;
            match opened {
                Err(error) if error.is_retryable() && attempt < OPEN_ATTEMPTS => {
                    tracing::debug!(%error, %target, "tunnel connection unavailable; trying another");
                    attempt += 1;
                }
                result => return result.map_err(PoolError::from),
            }
        }
    }

    /// A connection for `key` with a stream slot taken on it.
    async fn reserve<F, Fut, IO>(
        &self,
        key: &K,
        connect: &F,
    ) -> Result<(Connection, StreamSlot), ConnectError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<IO>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut rounds = 0;
        loop {
            let outcome = {
                let mut entries = self.lock();
                let entry = match entries.get_mut(key) {
                    Some(entry) => entry,
                    None => entries.entry(key.clone()).or_default(),
                };
                self.inner.prune(entry);
                let reserved = entry
                    .connections
                    .iter()
                    .find_map(|c| c.try_reserve().map(|slot| (c.clone(), slot)));
                if let Some(reserved) = reserved {
                    return Ok(reserved);
                }
                let peer_takes_tunnels = entry.connections.iter().any(|c| c.max_streams() > 0);
                if peer_takes_tunnels {
                    rounds = 0;
                } else if rounds == HANDSHAKE_ROUNDS {
                    return Err(ConnectError::NoCapacity);
                }
                rounds += 1;
                let per_connection = self.inner.settings.max_concurrent_streams.max(1) as usize;
                match entry
                    .pending
                    .iter_mut()
                    .find(|p| p.waiters < per_connection)
                {
                    Some(pending) => {
                        pending.waiters += 1;
                        pending.outcome.clone()
                    }
                    None => self.start_handshake(key, entry, connect),
                }
            };
            // Once it is in the pool, take a slot on it (or on any other
            // connection that freed one) like every caller.
            outcome.await?;
        }
    }

    /// Starts a handshake in a task; called with the pool locked, so the
    /// `Pending` is visible before anyone else looks.
    fn start_handshake<F, Fut, IO>(
        &self,
        key: &K,
        entry: &mut Entry,
        connect: &F,
    ) -> Shared<BoxFuture<'static, HandshakeResult>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<IO>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let id = self.inner.next_handshake.fetch_add(1, Ordering::Relaxed);
        let (done, outcome) = oneshot::channel();
        let outcome = outcome
            .map(|received| received.unwrap_or(Err(ConnectError::Abandoned)))
            .boxed()
            .shared();
        entry.pending.push(Pending {
            id,
            waiters: 1,
            outcome: outcome.clone(),
        });
        let stream = connect();
        let inner = Arc::downgrade(&self.inner);
        let key = key.clone();
        let settings = self.inner.settings.clone();
        // In the caller's span: the log lines of the connection name the
        // pair it serves.
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let limit = settings.handshake_timeout;
            let result = tokio::time::timeout(limit, async {
                let io = stream
                    .await
                    .map_err(|e| ConnectError::Connect(Arc::new(e)))?;
                client::handshake(io, &settings)
                    .await
                    .map_err(|e| ConnectError::Handshake(Arc::new(e)))
            })
            .await
            .unwrap_or(Err(ConnectError::Timeout(limit)));
            // Into the pool before the waiters wake, so they find it.
            if let Some(inner) = inner.upgrade() {
                inner.finish_handshake(key, id, &result);
            }
            let _ = done.send(result);
        }));
        outcome
    }

    /// Connections in the pool (all keys).
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.lock().values().map(|e| e.connections.len()).sum()
    }

    /// Successful handshakes since the pool was made.
    #[cfg(test)]
    pub fn handshakes(&self) -> u64 {
        self.inner.handshakes.load(Ordering::Relaxed)
    }

    /// Drops failed, told-to-go-away and expired connections of every key
    /// (lookups do it for their own key). Call it now and then, so that
    /// connections to peers no longer used close when their tunnels end.
    pub fn sweep(&self) {
        let mut entries = self.lock();
        entries.retain(|_, entry| {
            self.inner.prune(entry);
            !entry.connections.is_empty() || !entry.pending.is_empty()
        });
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        // The map holds no invariant a panic could break halfway.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<K: Hash + Eq> Inner<K> {
    fn prune(&self, entry: &mut Entry) {
        let max_age = self.settings.max_connection_age;
        entry
            .connections
            .retain(|c| c.is_usable() && c.age() < max_age);
    }

    fn finish_handshake(&self, key: K, id: u64, result: &HandshakeResult) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match result {
            Ok(connection) => {
                self.handshakes.fetch_add(1, Ordering::Relaxed);
                let entry = entries.entry(key).or_default();
                entry.pending.retain(|p| p.id != id);
                entry.connections.push(connection.clone());
            }
            Err(_) => {
                if let Some(entry) = entries.get_mut(&key) {
                    entry.pending.retain(|p| p.id != id);
                    if entry.connections.is_empty() && entry.pending.is_empty() {
                        entries.remove(&key);
                    }
                }
            }
        }
    }
}

impl<K> std::fmt::Debug for Pool<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}
