//! Identity-based policy as the kernel sees it: endpoints, compiled policy
//! entries, conntrack and flow events, and the one lookup order ([`decide`])
//! that the kernel programs and `mesh-agent explain` share.
//!
//! Numbers only: a workload's identity is a 64-bit number derived from its
//! SPIFFE ID (the agent computes it, the same on every node); a *subject* is
//! the group of destination workloads that the same set of policies selects
//! (workloads with one identity can carry different labels, so policy is
//! keyed by subject, not by identity).

/// Wildcard in [`PolicyKey::src_identity`]: any mesh identity that has no
/// entry of its own.
pub const ANY_IDENTITY: u64 = 0;
/// The identity of every address that is not a mesh workload.
pub const WORLD_IDENTITY: u64 = 1;
/// Numeric identities below this are reserved for the mesh's own use.
pub const FIRST_WORKLOAD_IDENTITY: u64 = 16;

/// Wildcard in [`PolicyKey::port`]: any port that has no entry of its own.
pub const ANY_PORT: u16 = 0;

/// IP protocol numbers, as in the IP header.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// ICMP and ICMPv6: not governed by policy (errors, ping sockets).
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Key of `ENDPOINTS`: an IPv6 or IPv4-mapped address, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKey {
    pub ip: [u32; 4],
}

/// Value of `ENDPOINTS`: who owns an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub identity: u64,
    /// Which policy entries apply when this endpoint is the destination.
    pub subject: u64,
    /// `ENDPOINT_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// The endpoint is a workload on this node.
pub const ENDPOINT_LOCAL: u32 = 1;
/// mTLS mode STRICT: the workload accepts only mutual TLS from the mesh
/// (through its node agent) and workloads of its own node; plaintext from
/// other nodes or from non-mesh processes is refused.
pub const ENDPOINT_STRICT: u32 = 2;
/// A local workload that opted in to the short-circuit
/// (`mesh.dev/short-circuit: enabled`).
pub const ENDPOINT_SHORT_CIRCUIT: u32 = 4;

/// Key of `POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub subject: u64,
    /// A source identity, or [`ANY_IDENTITY`].
    pub src_identity: u64,
    /// Destination port, or [`ANY_PORT`].
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub _pad: [u8; 5],
}

impl PolicyKey {
    #[inline(always)]
    pub const fn new(subject: u64, src_identity: u64, port: u16, proto: u8) -> Self {
        Self {
            subject,
            src_identity,
            port,
            proto,
            _pad: [0; 5],
        }
    }
}

/// What policy says about a connection.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow = 1,
    Deny = 2,
    /// Passes, and is reported as "would deny".
    Audit = 3,
}

impl Action {
    #[inline(always)]
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Action::Allow),
            2 => Some(Action::Deny),
            3 => Some(Action::Audit),
            _ => None,
        }
    }

    /// Whether the kernel lets the traffic through.
    #[inline(always)]
    pub const fn passes(self) -> bool {
        !matches!(self, Action::Deny)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// Value of `POLICY`: the action and the rule that decided it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Verdict {
    /// An [`Action`] as u32.
    pub action: u32,
    /// A rule id (`RULE_*` below, or an id the agent assigned to a rule of
    /// a MeshPolicy document).
    pub rule: u32,
}

impl Verdict {
    #[inline(always)]
    pub const fn new(action: Action, rule: u32) -> Self {
        Self {
            action: action as u32,
            rule,
        }
    }

    /// The action, failing closed on a value this build does not know.
    #[inline(always)]
    pub const fn action(&self) -> Action {
        match Action::from_u32(self.action) {
            Some(a) => a,
            None => Action::Deny,
        }
    }
}

/// The mesh-wide default decided (no ALLOW policy selects the destination).
pub const RULE_MESH_DEFAULT: u32 = 1;
/// The rule for sources that are not mesh workloads decided.
pub const RULE_NON_MESH: u32 = 2;
/// ALLOW policies select the destination and none of their rules matched.
pub const RULE_NOT_ALLOWED: u32 = 3;
/// The destination is an endpoint but no policy entry exists for it: the
/// maps are inconsistent, so the kernel fails closed.
pub const RULE_NO_POLICY: u32 = 4;
/// Plaintext to a workload whose mTLS mode is STRICT.
pub const RULE_STRICT_MTLS: u32 = 5;
/// The destination's identity was refused (its number is another
/// identity's too): nothing reaches it until one of them is renamed.
pub const RULE_REFUSED_IDENTITY: u32 = 6;
/// A policy selecting the destination was refused (it does not fit the
/// policy map): nothing reaches what it selects until it fits.
pub const RULE_REFUSED_POLICY: u32 = 7;
/// Rule ids below this are the reserved ones above.
pub const FIRST_POLICY_RULE: u32 = 16;

/// The order in which policy entries are looked up, most specific first:
/// (source, port), (source, any port), (any source, port), (any, any).
///
/// The agent compiles policy so that the first entry found is the answer
/// (see the compiler in mesh-agent), and a destination endpoint always has
/// an (any, any) entry. `lookup` is a map lookup in the kernel and in
/// `explain`, so both follow exactly the same steps.
#[inline(always)]
pub fn decide(
    subject: u64,
    src_identity: u64,
    port: u16,
    proto: u8,
    lookup: impl Fn(&PolicyKey) -> Option<Verdict>,
) -> Verdict {
    let keys = [
        PolicyKey::new(subject, src_identity, port, proto),
        PolicyKey::new(subject, src_identity, ANY_PORT, proto),
        PolicyKey::new(subject, ANY_IDENTITY, port, proto),
        PolicyKey::new(subject, ANY_IDENTITY, ANY_PORT, proto),
    ];
    // Unrolled by hand: the verifier handles four straight lookups better
    // than a loop over an array of keys on the BPF stack.
    if let Some(v) = lookup(&keys[0]) {
        return v;
    }
    if let Some(v) = lookup(&keys[1]) {
        return v;
    }
    if let Some(v) = lookup(&keys[2]) {
        return v;
    }
    if let Some(v) = lookup(&keys[3]) {
        return v;
    }
    Verdict::new(Action::Deny, RULE_NO_POLICY)
}

/// [`decide`] for a destination endpoint, with its mTLS mode: `plaintext`
/// says the source's identity was not proven by mutual TLS or by the
/// kernel on this node (traffic from another node that is not a tunnel, or
/// a local process that is not a workload), which a STRICT workload refuses.
#[inline(always)]
pub fn decide_for(
    dst: &Endpoint,
    src_identity: u64,
    port: u16,
    proto: u8,
    plaintext: bool,
    lookup: impl Fn(&PolicyKey) -> Option<Verdict>,
) -> Verdict {
    if plaintext && dst.flags & ENDPOINT_STRICT != 0 {
        return Verdict::new(Action::Deny, RULE_STRICT_MTLS);
    }
    decide(dst.subject, src_identity, port, proto, lookup)
}

/// How a connection to a mesh workload travels, and so who proves its
/// source: what [`connection_path`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionPath {
    /// The source is not a workload (`world`): plaintext, known by its address.
    NotWorkload,
    /// Source and destination on the same node: the kernel knows the source
    /// by its network namespace.
    SameNode,
    /// Steered to the node agent and carried over mutual TLS: the
    /// destination's node checks the certificate's identity.
    Tunnel,
    /// From a workload of another node to a workload of this one, without
    /// a tunnel: known only by its address.
    PlaintextFromOtherNode,
    /// To a workload of another node, without a tunnel: the destination's
    /// node knows the source only by its address.
    PlaintextBetweenNodes,
}

impl ConnectionPath {
    /// Whether the source's identity is unproven, which a STRICT
    /// destination refuses: the `plaintext` of [`decide_for`].
    #[inline(always)]
    pub const fn plaintext(self) -> bool {
        match self {
            Self::SameNode | Self::Tunnel => false,
            Self::NotWorkload | Self::PlaintextFromOtherNode | Self::PlaintextBetweenNodes => true,
        }
    }
}

/// How a connection from `src_identity` to the workload `dst` travels, as
/// the node judging it sees it. The connect hook steers to the agent
/// exactly the connections this calls [`ConnectionPath::Tunnel`], and
/// `mesh-agent explain` shows the same answer, so they cannot disagree.
///
/// - `src_on_node`: the source is a workload of this node (always, at the
///   connect hook: it knows the caller by its network namespace).
/// - `tunnels`: the source's node steers this connection to its agent:
///   mutual TLS is on (`Setting::TunnelPort` is not 0) and the connection is
///   being opened by `connect(2)` (only TCP is tunnelled; `proto` decides).
#[inline(always)]
pub fn connection_path(
    dst: &Endpoint,
    src_identity: u64,
    src_on_node: bool,
    proto: u8,
    tunnels: bool,
) -> ConnectionPath {
    let dst_on_node = dst.flags & ENDPOINT_LOCAL != 0;
    if src_identity == WORLD_IDENTITY {
        ConnectionPath::NotWorkload
    } else if dst_on_node && src_on_node {
        ConnectionPath::SameNode
    } else if tunnels && proto == PROTO_TCP {
        ConnectionPath::Tunnel
    } else if dst_on_node {
        ConnectionPath::PlaintextFromOtherNode
    } else {
        ConnectionPath::PlaintextBetweenNodes
    }
}

/// Value of `REDIRECTS` and `TUNNEL_ORIG`: where a connection steered to
/// the node agent was going, and who opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst {
    /// IPv6 or IPv4-mapped, network byte order.
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u16; 3],
    /// The source workload, as the connect hook knew it (netns).
    pub src_identity: u64,
    pub dst_identity: u64,
}

/// Key of `TUNNEL_ORIG`: the client end of a connection to the agent's
/// outbound listener, as the agent sees it after `accept(2)`: the workload's
/// network namespace and the client's local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TunnelKey {
    pub netns: u64,
    /// Host byte order.
    pub port: u16,
    /// 4 or 6: the listener the connection reached.
    pub family: u16,
    pub _pad: u32,
}

/// Key of `CONNTRACK`: one direction of a flow, as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    /// Host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The key of the other direction of the same flow.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowState {
    /// The [`Verdict`] of an inbound flow; for `FLOW_OUTBOUND` the flow
    /// left through a hook that had already checked it.
    pub verdict: Verdict,
    /// The policy generation the verdict was computed under.
    pub generation: u32,
    /// `FLOW_*` flags.
    pub flags: u32,
    /// The identities the verdict was computed for (0 when unknown: an
    /// entry migrated from layout 1 whose address has no endpoint any more).
    /// They name the flow's workloads even after an address moves to
    /// another pod.
    pub src_identity: u64,
    pub dst_identity: u64,
}

/// The flow was opened by a local workload towards another node: packets
/// of the reverse direction are its replies.
pub const FLOW_OUTBOUND: u32 = 1;

/// Key of `UDP_PEERS`: a datagram from `remote_ip:remote_port` was received
/// on a local UDP socket bound to `local_port` in network namespace `netns`.
/// A datagram sent back from that socket is a reply, not a new flow: the
/// stateful-firewall rule TCP gets from its connection state.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpPeerKey {
    pub netns: u64,
    pub remote_ip: [u32; 4],
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

/// Where a flow event was produced.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// connect(2) of a local workload (TCP, or connected UDP).
    Connect = 1,
    /// sendmsg(2) on an unconnected UDP socket of a local workload.
    Sendmsg = 2,
    /// A packet that arrived from another node (tc ingress).
    Ingress = 3,
    /// A packet about to be delivered to a local workload (tc on the node's
    /// side of its interface) that no connect hook judged: only refusals
    /// are reported.
    Delivery = 4,
}

impl Hook {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Hook::Connect),
            2 => Some(Hook::Sendmsg),
            3 => Some(Hook::Ingress),
            4 => Some(Hook::Delivery),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Sendmsg => "sendmsg",
            Hook::Ingress => "ingress",
            Hook::Delivery => "delivery",
        }
    }
}

/// One verdict, sent from the kernel to the agent through the `FLOWS` ring
/// buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    pub src_identity: u64,
    pub dst_identity: u64,
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    /// Host byte order; 0 when not known yet (connect time).
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// A [`Hook`] as u8.
    pub hook: u8,
    pub _pad: [u8; 2],
    pub verdict: Verdict,
    /// The Service address the client dialled, when the connect or sendmsg
    /// hook translated it to `dst_ip:dst_port` (zero otherwise).
    pub service_ip: [u32; 4],
    /// Host byte order; 0 when no Service was dialled.
    pub service_port: u16,
    pub _pad2: [u16; 3],
    /// Events of the same source left out since its last reported one
    /// ([`FlowBudget`]), and how many of those were denials.
    pub suppressed: u32,
    pub suppressed_denied: u32,
}

/// Key of `FLOW_SOURCES`: whose flow events share one rate budget. A mesh
/// source is its identity and address (at connect the address is not
/// known yet: the identity alone); a source outside the mesh is its /24
/// (IPv4) or /64 (IPv6), so that spreading over neighbouring addresses
/// buys no more events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowSourceKey {
    pub identity: u64,
    pub ip: [u32; 4],
}

impl FlowSourceKey {
    #[inline(always)]
    pub fn of(identity: u64, ip: &[u32; 4]) -> Self {
        if identity != WORLD_IDENTITY {
            return Self { identity, ip: *ip };
        }
        // Network byte order: an IPv4-mapped address keeps its first three
        // bytes, an IPv6 address its first eight.
        let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == u32::to_be(0xffff);
        let ip = if v4_mapped {
            [0, 0, ip[2], ip[3] & u32::to_be(0xffff_ff00)]
        } else {
            [ip[0], ip[1], 0, 0]
        };
        Self { identity, ip }
    }
}

/// Value of `FLOW_SOURCES`: one source's flow-event budget, a generic cell
/// rate algorithm (a token bucket in one number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowBudget {
    /// When the source's budget is whole again (CLOCK_MONOTONIC ns).
    pub full_at_ns: u64,
    /// Events left out since the last reported one, and the denials of them.
    pub suppressed: u32,
    pub suppressed_denied: u32,
}

/// How far ahead of now a source may spend: bursts of two seconds' worth
/// of its rate.
pub const FLOW_BURST_NS: u64 = 2_000_000_000;

impl FlowBudget {
    /// One event of a source whose budget is `self` (`None`: not seen yet),
    /// at `now`, with `interval` ns per event: the budget after it, and
    /// `Some((suppressed, suppressed_denied))` when the event is reported,
    /// carrying what was left out before it. A left-out denial is still
    /// counted, here and in the kernel's counters.
    #[inline(always)]
    pub fn spend(
        budget: Option<FlowBudget>,
        now: u64,
        interval: u64,
        denied: bool,
    ) -> (FlowBudget, Option<(u32, u32)>) {
        let mut b = budget.unwrap_or_default();
        let start = if b.full_at_ns > now {
            b.full_at_ns
        } else {
            now
        };
        let next = start + interval;
        if next > now + FLOW_BURST_NS {
            b.suppressed = b.suppressed.saturating_add(1);
            if denied {
                b.suppressed_denied = b.suppressed_denied.saturating_add(1);
            }
            return (b, None);
        }
        let carried = (b.suppressed, b.suppressed_denied);
        (
            FlowBudget {
                full_at_ns: next,
                suppressed: 0,
                suppressed_denied: 0,
            },
            Some(carried),
        )
    }
}

/// Capacity of `FLOW_SOURCES`: sources whose flow-event budgets are
/// remembered (LRU: a forgotten source starts with a whole burst).
pub const MAX_FLOW_SOURCES: u32 = 16_384;

/// Capacity of `FLOWS` in bytes (a power of two, as the kernel requires):
/// 4,681 events of 112 bytes (104 and the ring's header), more than two
/// sources' whole bursts at the default `--flow-events-per-source` while
/// the agent is not reading. The agent maps the events twice (so that
/// one can wrap), and every page counts in its RSS: 1 MiB cost it 2 MiB.
/// A ring pinned by an earlier agent keeps its size.
pub const FLOWS_RING_BYTES: u32 = 1 << 19;

/// Default capacities; each is configurable on `mesh-agent run`.
pub const DEFAULT_MAX_ENDPOINTS: u32 = 65_536;
pub const DEFAULT_MAX_POLICY: u32 = 262_144;
pub const DEFAULT_MAX_CONNTRACK: u32 = 262_144;
pub const DEFAULT_MAX_LOCAL_NETNS: u32 = 4_096;
/// Capacity of `REDIRECTS` and `TUNNEL_ORIG`: connections being handed to
/// the agent (entries are short-lived; LRU evicts the ones left behind).
pub const DEFAULT_MAX_REDIRECTS: u32 = 65_536;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_are_pinned() {
        assert_eq!(size_of::<IpKey>(), 16);
        assert_eq!(size_of::<Endpoint>(), 24);
        assert_eq!(offset_of!(Endpoint, subject), 8);
        assert_eq!(offset_of!(Endpoint, flags), 16);
        assert_eq!(size_of::<PolicyKey>(), 24);
        assert_eq!(offset_of!(PolicyKey, src_identity), 8);
        assert_eq!(offset_of!(PolicyKey, port), 16);
        assert_eq!(offset_of!(PolicyKey, proto), 18);
        assert_eq!(size_of::<Verdict>(), 8);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(offset_of!(FlowKey, src_port), 32);
        assert_eq!(offset_of!(FlowKey, proto), 36);
        assert_eq!(size_of::<FlowState>(), 32);
        assert_eq!(size_of::<UdpPeerKey>(), 32);
        assert_eq!(offset_of!(UdpPeerKey, local_port), 24);
        assert_eq!(size_of::<FlowEvent>(), 104);
        assert_eq!(offset_of!(FlowEvent, suppressed), 96);
        assert_eq!(size_of::<FlowSourceKey>(), 24);
        assert_eq!(size_of::<FlowBudget>(), 16);
        assert_eq!(offset_of!(FlowEvent, service_ip), 72);
        assert_eq!(offset_of!(FlowEvent, service_port), 88);
        assert_eq!(size_of::<OrigDst>(), 40);
        assert_eq!(offset_of!(OrigDst, port), 16);
        assert_eq!(offset_of!(OrigDst, src_identity), 24);
        assert_eq!(size_of::<TunnelKey>(), 16);
        assert_eq!(offset_of!(TunnelKey, port), 8);
        assert_eq!(offset_of!(FlowEvent, src_ip), 24);
        assert_eq!(offset_of!(FlowEvent, src_port), 56);
        assert_eq!(offset_of!(FlowEvent, hook), 61);
        assert_eq!(offset_of!(FlowEvent, verdict), 64);
    }

    #[test]
    fn a_source_gets_its_rate_with_bursts_and_what_it_loses_is_counted() {
        const MS: u64 = 1_000_000;
        // 1,000 events a second: 1 ms each, bursts of 2,000.
        let mut budget = None;
        let mut reported = 0;
        // 10,000 events in the same instant (5,000 of them denials): a
        // burst's worth is reported, the rest left out and counted.
        for i in 0..10_000 {
            let (b, out) = FlowBudget::spend(budget, 1_000 * MS, MS, i % 2 == 0);
            budget = Some(b);
            if out.is_some() {
                reported += 1;
            }
        }
        assert_eq!(reported, 2_000);
        assert_eq!(budget.unwrap().suppressed, 8_000);
        assert_eq!(budget.unwrap().suppressed_denied, 4_000);
        // 1 ms later the budget has one event again: it is reported and
        // carries the count of those left out; the next is left out.
        let (b, out) = FlowBudget::spend(budget, 1_001 * MS, MS, false);
        assert_eq!(out, Some((8_000, 4_000)));
        assert_eq!((b.suppressed, b.suppressed_denied), (0, 0));
        let (b, out) = FlowBudget::spend(Some(b), 1_001 * MS, MS, true);
        assert_eq!(out, None);
        assert_eq!((b.suppressed, b.suppressed_denied), (1, 1));
        let full_at = b.full_at_ns;
        // A quiet source gets its whole burst back, never more.
        let (b, _) = FlowBudget::spend(Some(b), full_at + 3_600_000 * MS, MS, false);
        assert_eq!(b.full_at_ns, full_at + 3_600_000 * MS + MS);
    }

    #[test]
    fn sources_outside_the_mesh_share_a_budget_per_24_or_64() {
        // Addresses as the maps hold them: network byte order in memory.
        let words = |b: [u8; 16]| {
            let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        };
        let v4 = |a: u8, b: u8, c: u8, d: u8| {
            words(
                core::net::Ipv4Addr::new(a, b, c, d)
                    .to_ipv6_mapped()
                    .octets(),
            )
        };
        let world = |ip| FlowSourceKey::of(WORLD_IDENTITY, &ip);
        assert_eq!(world(v4(192, 0, 2, 1)), world(v4(192, 0, 2, 254)));
        assert_ne!(world(v4(192, 0, 2, 1)), world(v4(192, 0, 3, 1)));
        let v6 = |s: &str| words(s.parse::<core::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(
            world(v6("2001:db8:1:2::1")),
            world(v6("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(world(v6("2001:db8:1:2::1")), world(v6("2001:db8:1:3::1")));
        // A mesh source keeps its whole address.
        let mesh = |ip| FlowSourceKey::of(77, &ip);
        assert_ne!(mesh(v4(192, 0, 2, 1)), mesh(v4(192, 0, 2, 2)));
    }

    fn table(entries: &[(PolicyKey, Verdict)]) -> impl Fn(&PolicyKey) -> Option<Verdict> + '_ {
        move |k| entries.iter().find(|(key, _)| key == k).map(|(_, v)| *v)
    }

    #[test]
    fn most_specific_entry_wins() {
        let allow = Verdict::new(Action::Allow, 20);
        let deny = Verdict::new(Action::Deny, 21);
        let entries = [
            (PolicyKey::new(7, ANY_IDENTITY, ANY_PORT, PROTO_TCP), deny),
            (PolicyKey::new(7, 100, 80, PROTO_TCP), allow),
        ];
        assert_eq!(decide(7, 100, 80, PROTO_TCP, table(&entries)), allow);
        assert_eq!(decide(7, 100, 81, PROTO_TCP, table(&entries)), deny);
        assert_eq!(decide(7, 101, 80, PROTO_TCP, table(&entries)), deny);
    }

    #[test]
    fn source_before_port() {
        let by_src = Verdict::new(Action::Deny, 20);
        let by_port = Verdict::new(Action::Allow, 21);
        let entries = [
            (PolicyKey::new(7, 100, ANY_PORT, PROTO_UDP), by_src),
            (PolicyKey::new(7, ANY_IDENTITY, 53, PROTO_UDP), by_port),
        ];
        assert_eq!(decide(7, 100, 53, PROTO_UDP, table(&entries)), by_src);
        assert_eq!(decide(7, 101, 53, PROTO_UDP, table(&entries)), by_port);
    }

    #[test]
    fn unknown_subject_fails_closed() {
        let v = decide(9, 100, 80, PROTO_TCP, |_| None);
        assert_eq!(v.action(), Action::Deny);
        assert_eq!(v.rule, RULE_NO_POLICY);
        assert_eq!(
            Verdict {
                action: 77,
                rule: 0
            }
            .action(),
            Action::Deny
        );
    }

    fn endpoint(flags: u32) -> Endpoint {
        Endpoint {
            identity: 200,
            subject: 7,
            flags,
            _pad: 0,
        }
    }

    #[test]
    fn connection_paths() {
        use ConnectionPath::*;
        let here = endpoint(ENDPOINT_LOCAL);
        let there = endpoint(0);
        // (destination, source identity, source on this node, proto, tunnels) -> path
        let cases = [
            // world is plaintext wherever it goes, tunnels or not
            (here, WORLD_IDENTITY, false, PROTO_TCP, true, NotWorkload),
            (there, WORLD_IDENTITY, true, PROTO_TCP, true, NotWorkload),
            (here, WORLD_IDENTITY, true, PROTO_UDP, false, NotWorkload),
            // same node never goes through a tunnel
            (here, 100, true, PROTO_TCP, true, SameNode),
            (here, 100, true, PROTO_UDP, false, SameNode),
            // between nodes: TCP is tunnelled when mTLS is on
            (there, 100, true, PROTO_TCP, true, Tunnel),
            (here, 100, false, PROTO_TCP, true, Tunnel),
            (there, 100, false, PROTO_TCP, true, Tunnel),
            // UDP, or mTLS off (or not a connect), goes in plaintext
            (there, 100, true, PROTO_UDP, true, PlaintextBetweenNodes),
            (there, 100, true, PROTO_TCP, false, PlaintextBetweenNodes),
            (here, 100, false, PROTO_UDP, true, PlaintextFromOtherNode),
            (here, 100, false, PROTO_TCP, false, PlaintextFromOtherNode),
        ];
        for (dst, src, on_node, proto, tunnels, want) in cases {
            assert_eq!(
                connection_path(&dst, src, on_node, proto, tunnels),
                want,
                "dst flags {}, src {src}, on node {on_node}, proto {proto}, tunnels {tunnels}",
                dst.flags
            );
        }
    }

    #[test]
    fn only_proven_sources_are_not_plaintext() {
        use ConnectionPath::*;
        assert!(!SameNode.plaintext());
        assert!(!Tunnel.plaintext());
        assert!(NotWorkload.plaintext());
        assert!(PlaintextFromOtherNode.plaintext());
        assert!(PlaintextBetweenNodes.plaintext());
    }

    #[test]
    fn strict_refuses_exactly_the_plaintext_paths() {
        let strict = endpoint(ENDPOINT_LOCAL | ENDPOINT_STRICT);
        let allow = Verdict::new(Action::Allow, 20);
        for (src, on_node, tunnels) in [
            (WORLD_IDENTITY, true, true),
            (100, true, false),
            (100, false, true),
            (100, false, false),
        ] {
            let path = connection_path(&strict, src, on_node, PROTO_TCP, tunnels);
            let v = decide_for(&strict, src, 80, PROTO_TCP, path.plaintext(), |_| {
                Some(allow)
            });
            if path.plaintext() {
                assert_eq!(v, Verdict::new(Action::Deny, RULE_STRICT_MTLS), "{path:?}");
            } else {
                assert_eq!(v, allow, "{path:?}");
            }
        }
    }

    #[test]
    fn reversed_flow_is_an_involution() {
        let k = FlowKey {
            src_ip: [1, 2, 3, 4],
            dst_ip: [5, 6, 7, 8],
            src_port: 1000,
            dst_port: 80,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().src_port, 80);
    }
}
