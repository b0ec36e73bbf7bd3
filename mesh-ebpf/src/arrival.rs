//! The tc programs: packets judged where they arrive, by source address
//! (`ENDPOINTS`), once per flow. The verdict is cached in `CONNTRACK` under
//! the policy generation and the two identities it was judged for.
//!
//! - On the node's interfaces (`--interfaces`): `mesh_ingress` judges what
//!   other nodes send; `mesh_egress` records in `OUTBOUND_FLOWS` the flows
//!   local workloads open towards other nodes, so that their replies pass.
//!   A packet arriving there with a local workload's address is forged.
//! - On the node's side of each local workload's interface (its veth peer):
//!   `mesh_from_workload` (tc ingress there: what the workload sends) drops
//!   packets that do not carry the workload's own address and records the
//!   flows it opens; `mesh_to_workload` (tc egress there: what is delivered
//!   to it) judges whatever reaches the workload without having passed a
//!   connect hook: a packet socket's frames (`AF_PACKET`), which no cgroup
//!   hook sees. A workload cannot route around either: unlike its own
//!   interface's egress (which `PACKET_QDISC_BYPASS` skips), both run in
//!   the node's namespace.
//!
//! docs/security.md says which attack each rule answers.

use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_SHOT, tcx_action_base::TCX_NEXT},
    macros::classifier,
    programs::TcContext,
};
use mesh_common::{
    AGENT_SOCKET_MARK, Counter, Setting,
    policy::{
        Action, ENDPOINT_LOCAL, Endpoint, FLOW_OUTBOUND, FlowKey, FlowState, Hook, PROTO_TCP,
        Verdict, WORLD_IDENTITY, connection_path, decide_for,
    },
    service::SockAddr,
};

use crate::{
    attempt::Attempt,
    enforce::{judge, report},
    maps::{
        CONNTRACK, OUTBOUND_FLOWS, WORKLOAD_INTERFACES, count, endpoint, identity_of_address,
        lookup, policy_entry, policy_generation, setting,
    },
    packet::{self, Parsed},
};

/// Where a packet to a local workload is being judged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// On one of the node's interfaces: it comes from another node.
    FromOtherNode,
    /// On the node's side of the workload's interface, about to be
    /// delivered: from another local workload, a host process, or another
    /// node (judged on arrival already, and the same again here).
    Delivery,
}

#[inline(always)]
fn local_endpoint(ip: &[u32; 4]) -> Option<Endpoint> {
    endpoint(ip).filter(|e| e.flags & ENDPOINT_LOCAL != 0)
}

/// TCX_NEXT when a packet passes: the programs attached after this one (a
/// CNI's) decide too; TC_ACT_OK would skip them.
#[inline(always)]
fn tc_verdict(pass: bool) -> i32 {
    if pass { TCX_NEXT } else { TC_ACT_SHOT }
}

#[classifier]
pub fn mesh_ingress(ctx: TcContext) -> i32 {
    tc_verdict(arrives(&ctx, Arrival::FromOtherNode))
}

#[classifier]
pub fn mesh_to_workload(ctx: TcContext) -> i32 {
    // The agent's own connections (inbound tunnels) pass: the mark of a
    // socket of the node's namespace survives until the packet leaves it,
    // and a workload's cannot reach here (crossing namespaces clears it).
    // SAFETY: the kernel's context for this packet.
    if unsafe { (*ctx.skb.skb).mark } == AGENT_SOCKET_MARK {
        return TCX_NEXT;
    }
    tc_verdict(arrives(&ctx, Arrival::Delivery))
}

#[inline(always)]
fn arrives(ctx: &TcContext, arrival: Arrival) -> bool {
    match packet::parse(ctx) {
        Parsed::Flow { key, syn } => arrival_passes(&key, syn, arrival),
        // Workloads are reached over TCP and UDP; what this program cannot
        // read the ports of does not reach them.
        Parsed::Opaque { dst_ip } => local_endpoint(&dst_ip).is_none(),
        Parsed::Ignore => true,
    }
}

/// The verdict for a TCP or UDP packet towards a local workload. Conntrack
/// only ever saves work: every entry is bound to the identities it was
/// judged for, and nothing an outsider can send (or make the LRU forget)
/// turns into a wrong verdict.
#[inline(always)]
fn arrival_passes(key: &FlowKey, syn: bool, arrival: Arrival) -> bool {
    let Some(dst) = local_endpoint(&key.dst_ip) else {
        return true; // not a workload of this node: not ours to judge
    };
    let src = endpoint(&key.src_ip);
    let src_on_node = matches!(src, Some(e) if e.flags & ENDPOINT_LOCAL != 0);
    if src_on_node && arrival == Arrival::FromOtherNode {
        // A workload of this node never reaches it through the node's
        // interfaces: the source is forged. Judged as that workload, it
        // would borrow its rights, and the datagram would let the receiver
        // answer it (`UDP_PEERS`) whatever policy says.
        count(Counter::SpoofedSource, 1);
        return false;
    }
    let src_identity = src.map_or(WORLD_IDENTITY, |e| e.identity);
    if !syn && is_reply(key, dst.identity, src_identity) {
        return true;
    }
    let generation = policy_generation();
    // A SYN is a new connection even if an old one used the same ports.
    if !syn
        && let Some(st) = lookup(&CONNTRACK, key)
        && st.src_identity == src_identity
        && st.dst_identity == dst.identity
    {
        let current = st.generation == generation;
        let kept = st.verdict.action().passes() && setting(Setting::RevokeEstablished) == 0;
        if current || kept {
            return st.verdict.action().passes();
        }
    }
    let attempt = Attempt {
        src_identity,
        src_ip: key.src_ip,
        src_port: key.src_port,
        dst_ip: key.dst_ip,
        dst_port: key.dst_port,
        proto: key.proto,
        hook: match arrival {
            Arrival::FromOtherNode => Hook::Ingress,
            Arrival::Delivery => Hook::Delivery,
        },
        service: SockAddr::new([0; 4], 0),
    };
    let verdict = match arrival {
        // Mesh traffic between nodes arrives as tunnels to the agent, never
        // addressed to the workload itself: whatever is, is plaintext.
        Arrival::FromOtherNode => judge(&attempt, &dst, true),
        // What the connect hook let through is judged again, quietly (it
        // reported it); only what it never saw can be denied here.
        Arrival::Delivery => {
            let path = connection_path(&dst, src_identity, src_on_node, key.proto, false);
            let verdict = decide_for(
                &dst,
                src_identity,
                key.dst_port,
                key.proto,
                path.plaintext(),
                policy_entry,
            );
            if !verdict.action().passes() {
                count(Counter::PolicyDenied, 1);
                report(&attempt, dst.identity, verdict);
            }
            verdict
        }
    };
    let passes = verdict.action().passes();
    // A TCP segment other than a SYN with no entry is the middle of a flow
    // this node forgot (LRU eviction) or a forgery. Denied, it is dropped
    // but not remembered: the local end's next packet records the flow
    // again (`record_outbound`), so an eviction never becomes a lasting
    // deny, and forged segments take no room.
    let first_packet = syn || key.proto != PROTO_TCP;
    if passes || first_packet {
        let state = FlowState {
            verdict,
            generation,
            flags: 0,
            src_identity,
            dst_identity: dst.identity,
        };
        if CONNTRACK.insert(key, state, BPF_ANY as u64).is_err() {
            count(Counter::ConntrackFailed, 1);
        }
    }
    passes
}

/// Whether `key` (not a bare SYN) answers a flow between the same two
/// identities that the other end opened: one a local workload opened
/// (`OUTBOUND_FLOWS`), or one judged and let in on its way to a workload
/// (`CONNTRACK`). An address reused by another workload is judged afresh.
#[inline(always)]
fn is_reply(key: &FlowKey, dst_identity: u64, src_identity: u64) -> bool {
    let reversed = key.reversed();
    let same_ends =
        |st: &FlowState| st.src_identity == dst_identity && st.dst_identity == src_identity;
    if let Some(st) = lookup(&OUTBOUND_FLOWS, &reversed)
        && same_ends(&st)
    {
        return true;
    }
    matches!(lookup(&CONNTRACK, &reversed), Some(st) if same_ends(&st) && st.verdict.action().passes())
}

#[classifier]
pub fn mesh_egress(ctx: TcContext) -> i32 {
    if let Parsed::Flow { key, .. } = packet::parse(&ctx) {
        record_outbound(&key);
    }
    // Egress never drops (local workloads were judged at connect time),
    // and leaves the verdict to the programs after it.
    TCX_NEXT
}

#[classifier]
pub fn mesh_from_workload(ctx: TcContext) -> i32 {
    // SAFETY: the kernel's context for this packet.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(owner) = lookup(&WORKLOAD_INTERFACES, &ifindex) else {
        return TCX_NEXT; // not (or no longer) a workload's interface
    };
    // A workload sends from its own addresses only: a packet socket could
    // otherwise speak as a neighbour (and be judged as it on delivery).
    // What carries no ports (ICMP, multicast listener reports from
    // link-local addresses) reaches no workload anyway: delivery drops it.
    let Parsed::Flow { key, .. } = packet::parse(&ctx) else {
        return TCX_NEXT;
    };
    if own_address(&key.src_ip, owner) {
        record_outbound(&key);
        TCX_NEXT
    } else {
        count(Counter::SpoofedSource, 1);
        TC_ACT_SHOT
    }
}

/// Whether `ip` is an address of a local workload of identity `owner`.
#[inline(always)]
fn own_address(ip: &[u32; 4], owner: u64) -> bool {
    matches!(local_endpoint(ip), Some(e) if e.identity == owner)
}

/// Records a packet a local workload sends, so that its replies pass. It
/// was judged when its socket connected or sent; that it leaves at all is
/// the proof. The record lives in `OUTBOUND_FLOWS`, which nothing from
/// outside writes: no flood of other nodes' packets can evict it and make a
/// live flow's replies look like new inbound flows.
#[inline(always)]
fn record_outbound(key: &FlowKey) {
    let Some(src) = local_endpoint(&key.src_ip) else {
        return;
    };
    let dst_identity = identity_of_address(&key.dst_ip);
    if let Some(st) = lookup(&OUTBOUND_FLOWS, key)
        && st.src_identity == src.identity
        && st.dst_identity == dst_identity
    {
        return; // already recorded
    }
    if let Some(st) = lookup(&CONNTRACK, &key.reversed())
        && st.verdict.action().passes()
    {
        return; // a reply of an inbound flow
    }
    let state = FlowState {
        verdict: Verdict::new(Action::Allow, 0),
        generation: policy_generation(),
        flags: FLOW_OUTBOUND,
        src_identity: src.identity,
        dst_identity,
    };
    if OUTBOUND_FLOWS.insert(key, state, BPF_ANY as u64).is_err() {
        count(Counter::ConntrackFailed, 1);
    }
}
