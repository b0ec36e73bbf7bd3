//! Types shared by the mesh's kernel programs (`mesh-ebpf`) and its node agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding: the kernel hashes
//! keys byte by byte, so no byte of a key may be left uninitialised, and the
//! agent reads the same bytes back from pinned maps. The layout tests at the
//! bottom pin every size and offset; a change to them is a change of the
//! pinned-map format and needs a migration.
#![no_std]
#![deny(unsafe_code)]

pub mod packet;
pub mod policy;
pub mod service;
#[cfg(feature = "user")]
mod user;

/// Names of the maps, as they appear in the object file and under the pin directory.
pub mod map_names {
    /// Sockhash of established local TCP sockets, keyed by [`crate::SocketKey`].
    pub const SOCK_HASH: &str = "SOCK_HASH";
    /// Per-socket state ([`crate::SocketInfo`]) for the sockets in `SOCK_HASH`.
    pub const SOCKETS: &str = "SOCKETS";
    /// Socket cookie → [`crate::Inbox`] for the sockets in `SOCK_HASH`:
    /// the receivers' backlogs, and whose splice(2) the guard refuses.
    pub const SOCKET_INBOX: &str = "SOCKET_INBOX";
    /// Per-CPU counters indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Runtime settings indexed by [`crate::Setting`].
    pub const SETTINGS: &str = "SETTINGS";
    /// IP → [`crate::policy::Endpoint`]: every workload address the node knows.
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// Network-namespace cookie → identity of the local workload living in it.
    pub const LOCAL_NETNS: &str = "LOCAL_NETNS";
    /// Interface index (the node's side of a local workload's interface) →
    /// identity of the workload behind it.
    pub const WORKLOAD_INTERFACES: &str = "WORKLOAD_INTERFACES";
    /// [`crate::policy::PolicyKey`] → [`crate::policy::Verdict`]: compiled policy.
    pub const POLICY: &str = "POLICY";
    /// [`crate::policy::FlowKey`] → [`crate::policy::FlowState`] (LRU): the
    /// verdicts of flows from other nodes.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// [`crate::policy::FlowKey`] → [`crate::policy::FlowState`] (LRU): flows
    /// this node's workloads opened towards other nodes, whose replies pass.
    /// Only packets leaving the node write it, so no flood from outside can
    /// evict an entry.
    pub const OUTBOUND_FLOWS: &str = "OUTBOUND_FLOWS";
    /// [`crate::policy::UdpPeerKey`] → 1 (LRU): whom local UDP sockets heard from.
    pub const UDP_PEERS: &str = "UDP_PEERS";
    /// Ring buffer of [`crate::policy::FlowEvent`]s.
    pub const FLOWS: &str = "FLOWS";
    /// [`crate::policy::FlowSourceKey`] → [`crate::policy::FlowBudget`]
    /// (LRU): each source's flow-event rate budget.
    pub const FLOW_SOURCES: &str = "FLOW_SOURCES";
    /// Socket cookie → [`crate::policy::OrigDst`] (LRU): connections the
    /// connect hook steered to the node agent, for `getpeername(2)`.
    pub const REDIRECTS: &str = "REDIRECTS";
    /// [`crate::policy::TunnelKey`] → [`crate::policy::OrigDst`] (LRU): the
    /// same, keyed as the agent sees the accepted connection.
    pub const TUNNEL_ORIG: &str = "TUNNEL_ORIG";
    /// [`crate::service::ServiceKey`] → [`crate::service::ServiceEntry`]:
    /// the Service addresses the connect hooks translate.
    pub const SERVICES: &str = "SERVICES";
    /// [`crate::service::BackendKey`] → [`crate::service::SockAddr`]: the
    /// backend in each slot of each Service's live backend set.
    pub const SERVICE_BACKENDS: &str = "SERVICE_BACKENDS";
    /// [`crate::service::ServicePeerKey`] → [`crate::service::SockAddr`]
    /// (LRU): the Service address a socket dialled, for `getpeername(2)` and
    /// the source of UDP replies.
    pub const SERVICE_PEERS: &str = "SERVICE_PEERS";
    /// LPM trie of IPv6 (IPv4-mapped) prefixes → 1: the cluster's Service
    /// ranges, where an address that is no known Service is refused.
    pub const SERVICE_RANGES: &str = "SERVICE_RANGES";
    /// [`crate::service::AffinityKey`] → [`crate::service::Affinity`] (LRU):
    /// each client's backend, for Services with ClientIP session affinity.
    pub const SERVICE_AFFINITY: &str = "SERVICE_AFFINITY";
    /// [`crate::service::MemberKey`] → 1: the backends of Services with
    /// session affinity, so a remembered backend that left is not used.
    pub const SERVICE_MEMBERS: &str = "SERVICE_MEMBERS";
}

/// Default capacity of the socket maps: the number of TCP sockets of the
/// node's pods that can be short-circuited at once.
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// Identifies one end of a TCP connection, from that end's point of view.
///
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so that a
/// dual-stack socket talking to an IPv4 peer and the IPv4 peer socket produce
/// matching keys. Addresses are the kernel's network-byte-order words, ports
/// are in host byte order.
///
/// `netns` is the network-namespace cookie for loopback connections and 0
/// otherwise: `127.0.0.1:80` in one pod is not `127.0.0.1:80` in another, but
/// a pod IP is unique on the node, so peers in different namespaces still
/// find each other.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
    pub netns: u64,
}

/// Address family constants as the kernel reports them in `family`.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// The raw socket fields as sock_ops and sk_msg contexts expose them.
#[derive(Clone, Copy, Debug)]
pub struct RawTuple {
    pub family: u32,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_ip6: [u32; 4],
    pub remote_ip6: [u32; 4],
    /// Host byte order.
    pub local_port: u32,
    /// Network byte order in the upper half on little-endian (what the
    /// kernel's context rewrite produces): `u32::from_be` yields the port.
    pub remote_port: u32,
}

impl SocketKey {
    /// Builds the key of the socket whose context fields are `raw`.
    /// Returns `None` for families other than IPv4 and IPv6.
    /// `netns_cookie` is only called for loopback connections.
    #[inline(always)]
    pub fn from_raw(raw: &RawTuple, netns_cookie: impl FnOnce() -> u64) -> Option<Self> {
        let (local_ip, remote_ip) = match raw.family {
            AF_INET => (ipv4_mapped(raw.local_ip4), ipv4_mapped(raw.remote_ip4)),
            AF_INET6 => (raw.local_ip6, raw.remote_ip6),
            _ => return None,
        };
        let netns = if is_loopback(&remote_ip) {
            netns_cookie()
        } else {
            0
        };
        Some(Self {
            local_ip,
            remote_ip,
            local_port: raw.local_port as u16,
            remote_port: u32::from_be(raw.remote_port) as u16,
            _pad: 0,
            netns,
        })
    }

    /// The key under which the other end of this connection is stored.
    #[inline(always)]
    pub fn peer(&self) -> Self {
        Self {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
            netns: self.netns,
        }
    }
}

/// `::ffff:a.b.c.d` for an IPv4 address in network byte order.
#[inline(always)]
pub fn ipv4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), ip4]
}

/// Whether an address (IPv6 or IPv4-mapped, network byte order words) is a
/// loopback address: `::1` or `127.0.0.0/8`.
#[inline(always)]
pub fn is_loopback(ip: &[u32; 4]) -> bool {
    let v6_loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_be(1);
    let v4_loopback = ip[0] == 0
        && ip[1] == 0
        && ip[2] == u32::from_be(0x0000_ffff)
        && (u32::from_be(ip[3]) >> 24) == 127;
    v6_loopback || v4_loopback
}

/// Whether a destination (IPv6 or IPv4-mapped, network byte order words)
/// names no one workload that policy could judge: IPv6 link-local
/// (`fe80::/10`, reached by interface, owned by whatever neighbour answers),
/// multicast (`ff00::/8`, `224.0.0.0/4`: every member of the group on the
/// bridge receives it) and the IPv4 limited broadcast. A workload's
/// connect or sendmsg to one would reach neighbouring pods with no verdict.
#[inline(always)]
pub fn is_unattributable(ip: &[u32; 4]) -> bool {
    let first = u32::from_be(ip[0]);
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff);
    let v4 = u32::from_be(ip[3]);
    if mapped {
        v4 >> 28 == 0xe || v4 == u32::MAX
    } else {
        first & 0xffc0_0000 == 0xfe80_0000 || first >> 24 == 0xff
    }
}

/// What the kernel keeps about each tracked socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    /// `SOCKET_*` flags.
    pub flags: u32,
    /// The policy generation under which the connection was last found
    /// allowed; an older one means "check again before redirecting".
    pub policy_generation: u32,
    /// The kernel's socket cookie (`SO_COOKIE`).
    pub cookie: u64,
    /// When the socket was established, CLOCK_MONOTONIC nanoseconds.
    pub established_ns: u64,
}

/// What a tracked socket has been sent through the short-circuit and has
/// read of it, by its cookie (`SOCKET_INBOX`): the receiver's backlog in
/// the redirect path, which has no per-socket bound of its own. The sender
/// adds what it redirects; a tracing program on the receive path adds what
/// the receiver reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inbox {
    pub redirected: u64,
    pub read: u64,
}

impl Inbox {
    /// Bytes redirected to the socket and not read yet.
    pub const fn backlog(&self) -> u64 {
        self.redirected.saturating_sub(self.read)
    }

    /// Whether `more` bytes would take the backlog past `bound` (0: no
    /// bound, as on pins of an agent that never set one).
    pub const fn would_overflow(&self, more: u64, bound: u64) -> bool {
        bound != 0 && self.backlog() + more > bound
    }
}

/// The socket has sent data through the TCP/IP stack (no local peer yet,
/// or short-circuit off): it must keep doing so, because bytes redirected
/// now would overtake the bytes still travelling through the stack.
pub const SOCKET_STACK_ONLY: u32 = 1;
/// The socket opened the connection (the client end).
pub const SOCKET_ACTIVE: u32 = 2;

/// Indexes of the per-CPU `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Established sockets added to the socket maps.
    SocketsTracked = 0,
    /// Established sockets that could not be added (a map was full).
    SocketsTrackFailed = 1,
    /// Tracked sockets that closed and were removed.
    SocketsClosed = 2,
    /// Messages handed straight to the peer socket.
    MsgsRedirected = 3,
    /// Bytes handed straight to the peer socket.
    BytesRedirected = 4,
    /// Redirects that found no eligible local peer: the message took the
    /// TCP/IP stack (peer on another node, not yet established, or closing).
    RedirectFailed = 5,
    /// Messages of sockets pinned to the TCP/IP stack (`SOCKET_STACK_ONLY`).
    MsgsStackOnly = 6,
    /// New connections or flows that policy allowed.
    PolicyAllowed = 7,
    /// New connections or flows that policy denied.
    PolicyDenied = 8,
    /// New connections or flows that an AUDIT policy let through.
    PolicyAudited = 9,
    /// Flow events dropped because the ring buffer was full.
    FlowEventsLost = 10,
    /// Flows that could not be recorded in CONNTRACK.
    ConntrackFailed = 11,
    /// Connections steered to the node agent for mutual TLS.
    TunnelRedirected = 12,
    /// Connections and datagrams to a Service address translated to one of
    /// its backends.
    ServiceTranslated = 13,
    /// Connections refused because their Service had no backend.
    ServiceNoBackend = 14,
    /// Connections refused because they dialled an address of the Service
    /// range (`--service-cidr`) that is no Service the mesh knows (yet).
    ServiceUnknown = 15,
    /// Packets from another node claiming a workload of this node as their
    /// source: forged, dropped.
    SpoofedSource = 16,
    /// Flow events left out because their source was over its rate
    /// (`--flow-events-per-source`); the verdicts were still applied.
    FlowEventsSuppressed = 17,
    /// Of those, denials.
    DeniedEventsSuppressed = 18,
    /// splice(2) calls from a short-circuited socket refused with EINVAL
    /// (the splice guard); the caller reads instead.
    SpliceRefused = 19,
    /// Connections sent back to the TCP/IP stack because their receiver's
    /// unread redirected bytes reached the bound (`RedirectBacklogBytes`):
    /// from then on TCP's own flow control pushes back on the sender.
    RedirectBackpressure = 20,
}

impl Counter {
    pub const ALL: [Counter; 21] = [
        Counter::SocketsTracked,
        Counter::SocketsTrackFailed,
        Counter::SocketsClosed,
        Counter::MsgsRedirected,
        Counter::BytesRedirected,
        Counter::RedirectFailed,
        Counter::MsgsStackOnly,
        Counter::PolicyAllowed,
        Counter::PolicyDenied,
        Counter::PolicyAudited,
        Counter::FlowEventsLost,
        Counter::ConntrackFailed,
        Counter::TunnelRedirected,
        Counter::ServiceTranslated,
        Counter::ServiceNoBackend,
        Counter::ServiceUnknown,
        Counter::SpoofedSource,
        Counter::FlowEventsSuppressed,
        Counter::DeniedEventsSuppressed,
        Counter::SpliceRefused,
        Counter::RedirectBackpressure,
    ];

    /// The counter's name in `inspect stats` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::SocketsTracked => "sockets_tracked",
            Counter::SocketsTrackFailed => "sockets_track_failed",
            Counter::SocketsClosed => "sockets_closed",
            Counter::MsgsRedirected => "msgs_redirected",
            Counter::BytesRedirected => "bytes_redirected",
            Counter::RedirectFailed => "redirect_failed",
            Counter::MsgsStackOnly => "msgs_stack_only",
            Counter::PolicyAllowed => "policy_allowed",
            Counter::PolicyDenied => "policy_denied",
            Counter::PolicyAudited => "policy_audited",
            Counter::FlowEventsLost => "flow_events_lost",
            Counter::ConntrackFailed => "conntrack_failed",
            Counter::TunnelRedirected => "tunnel_redirected",
            Counter::ServiceTranslated => "service_translated",
            Counter::ServiceNoBackend => "service_no_backend",
            Counter::ServiceUnknown => "service_unknown",
            Counter::SpoofedSource => "spoofed_source",
            Counter::FlowEventsSuppressed => "flow_events_suppressed",
            Counter::DeniedEventsSuppressed => "denied_events_suppressed",
            Counter::SpliceRefused => "splice_refused",
            Counter::RedirectBackpressure => "redirect_backpressure",
        }
    }
}

/// Capacity of `COUNTERS`: room for new counters without a map migration.
pub const MAX_COUNTERS: u32 = 32;

/// Indexes of the `SETTINGS` array map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Which local sockets redirect to each other ([`ShortCircuit`]);
    /// an unknown value sends everything through the TCP/IP stack.
    ShortCircuit = 0,
    /// Bumped by the agent after each policy change: conntrack entries and
    /// socket verdicts computed under an older generation are re-checked.
    PolicyGeneration = 1,
    /// 1: a policy change applies to established flows too (their packets
    /// from other nodes are re-checked); 0 (default): established flows keep
    /// the verdict they started with, as with conntrack-based firewalls.
    RevokeEstablished = 2,
    /// Mutual TLS between nodes: the port (host byte order) of the agent's
    /// outbound listener inside each local workload's network namespace;
    /// TCP connections from local workloads to workloads on other nodes are
    /// steered there. 0: off (plaintext between nodes).
    TunnelPort = 3,
    /// The [`MAP_LAYOUT_VERSION`] of the agent that last installed the
    /// programs on these pins (0: pins made before versions were recorded,
    /// layout 1). An agent refuses pins of a newer layout than its own.
    LayoutVersion = 4,
    /// Flow events each source may report per second (0: no limit); past
    /// it, and its bursts, events are left out and counted.
    FlowEventsPerSource = 5,
    /// Unread bytes a receiver may have in the redirect path before its
    /// sender goes back to the TCP/IP stack (0: no bound). The agent sets
    /// the node's `tcp_rmem` maximum: what TCP would hold for it.
    RedirectBacklogBytes = 6,
}

/// Version of the pinned maps' layout (key and value formats, map types),
/// recorded in `SETTINGS` by every agent that installs the programs. Bump it
/// with every change to a pinned map's layout, together with the migration
/// of the old layout in mesh-agent's `datapath::migrate`.
///
/// - 1: the first layout (unrecorded, read as 0).
/// - 2: `FlowState` (CONNTRACK values) carries the flow's identities.
/// - 3: new maps `OUTBOUND_FLOWS`, `WORKLOAD_INTERFACES` and
///   `FLOW_SOURCES`; `FlowEvent` carries its source's suppressed counts.
///   Nothing to migrate: an older agent must only not reuse these pins.
pub const MAP_LAYOUT_VERSION: u32 = 3;

/// `SO_MARK` of the node agent's own sockets (its tunnels and the
/// connections it makes to local workloads for inbound tunnels): the
/// connect hooks neither judge nor steer them, since the agent has already
/// checked policy against a verified certificate.
pub const AGENT_SOCKET_MARK: u32 = 0x4d53_0000;

/// Capacity of `SETTINGS`.
pub const MAX_SETTINGS: u32 = 16;

/// `Setting::ShortCircuit`: whose sockets on this node are short-circuited.
/// The kernel's redirect path has defects some applications notice
/// (docs/short-circuit.md), so it is for the workloads that opt in.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShortCircuit {
    /// Nobody's: everything takes the TCP/IP stack (the node's kill switch).
    Off = 0,
    /// Every socket of the pods' cgroup.
    All = 1,
    /// The sockets of workloads labelled [`SHORT_CIRCUIT_LABEL`]`: enabled`
    /// (their endpoints carry `ENDPOINT_SHORT_CIRCUIT`), with both ends
    /// opted in. Agents before it read the value as off.
    OptedIn = 2,
}

impl ShortCircuit {
    pub const fn from_setting(value: u32) -> Self {
        match value {
            1 => ShortCircuit::All,
            2 => ShortCircuit::OptedIn,
            _ => ShortCircuit::Off,
        }
    }
}

/// The label (on a Workload or a Pod) with which a workload opts in to the
/// short-circuit: `enabled` or `disabled`.
pub const SHORT_CIRCUIT_LABEL: &str = "mesh.dev/short-circuit";

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    /// Map keys and values the agent reads and writes as plain bytes.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: every one of these types is #[repr(C)], contains only
            // integers, and has no implicit padding (the layout tests below
            // pin that), so every bit pattern is valid and every byte is
            // initialised.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        super::SocketKey,
        super::SocketInfo,
        super::Inbox,
        super::policy::IpKey,
        super::policy::Endpoint,
        super::policy::PolicyKey,
        super::policy::Verdict,
        super::policy::FlowKey,
        super::policy::FlowState,
        super::policy::FlowEvent,
        super::policy::FlowSourceKey,
        super::policy::FlowBudget,
        super::policy::UdpPeerKey,
        super::policy::OrigDst,
        super::policy::TunnelKey,
        super::service::ServiceKey,
        super::service::ServiceEntry,
        super::service::BackendKey,
        super::service::SockAddr,
        super::service::ServicePeerKey,
        super::service::AffinityKey,
        super::service::Affinity,
        super::service::MemberKey,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn socket_key_layout_is_pinned() {
        assert_eq!(size_of::<SocketKey>(), 48);
        assert_eq!(align_of::<SocketKey>(), 8);
        assert_eq!(offset_of!(SocketKey, local_ip), 0);
        assert_eq!(offset_of!(SocketKey, remote_ip), 16);
        assert_eq!(offset_of!(SocketKey, local_port), 32);
        assert_eq!(offset_of!(SocketKey, remote_port), 34);
        assert_eq!(offset_of!(SocketKey, _pad), 36);
        assert_eq!(offset_of!(SocketKey, netns), 40);
    }

    #[test]
    fn socket_info_layout_is_pinned() {
        assert_eq!(size_of::<SocketInfo>(), 24);
        assert_eq!(offset_of!(SocketInfo, flags), 0);
        assert_eq!(offset_of!(SocketInfo, cookie), 8);
        assert_eq!(offset_of!(SocketInfo, established_ns), 16);
    }

    #[test]
    fn inbox_layout_is_pinned_and_its_bound_holds() {
        assert_eq!(size_of::<Inbox>(), 16);
        assert_eq!(offset_of!(Inbox, read), 8);
        let inbox = Inbox {
            redirected: 300,
            read: 100,
        };
        assert_eq!(inbox.backlog(), 200);
        assert!(!inbox.would_overflow(56, 256));
        assert!(inbox.would_overflow(57, 256));
        assert!(!inbox.would_overflow(u32::MAX as u64, 0), "0: no bound");
        // Reads counted before the sender's add (they race) never wrap.
        let ahead = Inbox {
            redirected: 10,
            read: 20,
        };
        assert_eq!(ahead.backlog(), 0);
    }

    #[test]
    fn counter_indexes_are_dense_and_fit() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        assert!(Counter::ALL.len() as u32 <= MAX_COUNTERS);
        assert!((Setting::ShortCircuit as u32) < MAX_SETTINGS);
    }

    /// Network-byte-order word for a.b.c.d, as the kernel stores it.
    fn nbo(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_ne_bytes([a, b, c, d])
    }

    fn v4(local: (u8, u8, u8, u8), lport: u16, remote: (u8, u8, u8, u8), rport: u16) -> RawTuple {
        RawTuple {
            family: AF_INET,
            local_ip4: nbo(local.0, local.1, local.2, local.3),
            remote_ip4: nbo(remote.0, remote.1, remote.2, remote.3),
            local_ip6: [0; 4],
            remote_ip6: [0; 4],
            local_port: lport as u32,
            // What the kernel hands out: the big-endian port, shifted up.
            remote_port: (rport as u32).to_be(),
        }
    }

    #[test]
    fn ipv4_key_is_mapped_and_decodes_ports() {
        let raw = v4((198, 18, 0, 1), 40000, (198, 18, 0, 2), 80);
        let key = SocketKey::from_raw(&raw, || panic!("not loopback")).unwrap();
        assert_eq!(
            key.local_ip,
            [0, 0, nbo(0, 0, 0xff, 0xff), nbo(198, 18, 0, 1)]
        );
        assert_eq!(key.local_port, 40000);
        assert_eq!(key.remote_port, 80);
        assert_eq!(key.netns, 0);
    }

    #[test]
    fn the_two_ends_of_a_connection_find_each_other() {
        let client = v4((198, 18, 0, 1), 40000, (198, 18, 0, 2), 80);
        let server = v4((198, 18, 0, 2), 80, (198, 18, 0, 1), 40000);
        let c = SocketKey::from_raw(&client, || 0).unwrap();
        let s = SocketKey::from_raw(&server, || 0).unwrap();
        assert_eq!(c.peer(), s);
        assert_eq!(s.peer(), c);
    }

    #[test]
    fn unattributable_destinations() {
        use core::net::IpAddr;
        let words = |ip: IpAddr| -> [u32; 4] {
            let v6 = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let o = v6.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        };
        for ip in [
            "fe80::1",
            "febf::1",
            "ff02::1",
            "224.0.0.1",
            "239.1.2.3",
            "255.255.255.255",
        ] {
            assert!(is_unattributable(&words(ip.parse().unwrap())), "{ip}");
        }
        for ip in [
            "fd00::1",
            "fec0::1",
            "2001:db8::1",
            "10.0.0.1",
            "169.254.169.254",
            "223.255.255.255",
            "198.18.0.255",
        ] {
            assert!(!is_unattributable(&words(ip.parse().unwrap())), "{ip}");
        }
    }

    #[test]
    fn dual_stack_socket_matches_its_ipv4_peer() {
        let server = v4((198, 18, 0, 2), 80, (198, 18, 0, 1), 40000);
        let mapped = |ip| ipv4_mapped(ip);
        let client = RawTuple {
            family: AF_INET6,
            local_ip4: 0,
            remote_ip4: 0,
            local_ip6: mapped(nbo(198, 18, 0, 1)),
            remote_ip6: mapped(nbo(198, 18, 0, 2)),
            local_port: 40000,
            remote_port: 80u32.to_be(),
        };
        let c = SocketKey::from_raw(&client, || 0).unwrap();
        let s = SocketKey::from_raw(&server, || 0).unwrap();
        assert_eq!(c.peer(), s);
    }

    #[test]
    fn loopback_keys_carry_the_namespace() {
        let raw = v4((127, 0, 0, 1), 40000, (127, 0, 0, 1), 80);
        let key = SocketKey::from_raw(&raw, || 42).unwrap();
        assert_eq!(key.netns, 42);
        assert_eq!(key.peer().netns, 42);

        let mut v6 = raw;
        v6.family = AF_INET6;
        v6.local_ip6 = [0, 0, 0, u32::from_be(1)];
        v6.remote_ip6 = [0, 0, 0, u32::from_be(1)];
        assert_eq!(SocketKey::from_raw(&v6, || 7).unwrap().netns, 7);
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback(&ipv4_mapped(nbo(127, 1, 2, 3))));
        assert!(!is_loopback(&ipv4_mapped(nbo(128, 0, 0, 1))));
        assert!(is_loopback(&[0, 0, 0, u32::from_be(1)]));
        assert!(!is_loopback(&[
            u32::from_be(0xfd00_0000),
            0,
            0,
            u32::from_be(1)
        ]));
    }

    #[test]
    fn other_families_are_ignored() {
        let mut raw = v4((1, 1, 1, 1), 1, (2, 2, 2, 2), 2);
        raw.family = 1; // AF_UNIX
        assert!(SocketKey::from_raw(&raw, || 0).is_none());
    }
}
