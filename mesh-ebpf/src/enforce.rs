//! Identity-based allow/deny.
//!
//! Connections a local workload opens are judged at `connect(2)` (and per
//! datagram for unconnected UDP, except replies to a peer the socket heard
//! from, which `mesh_recvmsg4/6` remember in `UDP_PEERS`) by the cgroup
//! sock_addr programs: the
//! socket has no source address yet, so the source workload is known by its
//! network namespace (`LOCAL_NETNS`, filled by the agent from the workload's
//! `netns`). A denied connect fails with EPERM before any packet leaves.
//!
//! Packets are judged by the tc programs of `arrival`, with `judge` and
//! `report` from here. docs/security.md says what each rule defends
//! against.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns, generated::bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use mesh_common::{
    Counter, Setting, is_unattributable,
    policy::{
        Action, ConnectionPath, Endpoint, FlowBudget, FlowEvent, FlowSourceKey, Hook, PROTO_ICMP,
        PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, UdpPeerKey, Verdict, WORLD_IDENTITY, connection_path,
        decide_for,
    },
    service::SockAddr,
};

use crate::{
    attempt::Attempt,
    maps::{
        FLOW_SOURCES, FLOWS, UDP_PEERS, count, endpoint, identity_of_caller, lookup, policy_entry,
        setting,
    },
    service::{self, Destination},
    sock_addr::{self, Family},
    tunnel::{agent_listener, is_agent_socket, remember_redirect, tunnel_port},
};

/// `ECONNREFUSED`, as `bpf_set_retval` wants it (negated).
const ECONNREFUSED: i32 = 111;

/// sock_addr programs: 1 lets the call proceed, 0 fails it with EPERM.
const SOCK_ADDR_ALLOW: i32 = 1;
const SOCK_ADDR_DENY: i32 = 0;

/// The verdict for `a` towards the workload `dst`, reported as a flow
/// event. `plaintext`: see `decide_for`.
#[inline(always)]
pub(crate) fn judge(a: &Attempt, dst: &Endpoint, plaintext: bool) -> Verdict {
    let verdict = decide_for(
        dst,
        a.src_identity,
        a.dst_port,
        a.proto,
        plaintext,
        policy_entry,
    );
    count(
        match verdict.action() {
            Action::Allow => Counter::PolicyAllowed,
            Action::Deny => Counter::PolicyDenied,
            Action::Audit => Counter::PolicyAudited,
        },
        1,
    );
    report(a, dst.identity, verdict);
    verdict
}

/// Reports a verdict as a flow event, within its source's rate: past it,
/// the event is left out and counted (a denial too: it was still applied),
/// and the source's next reported event carries the counts.
#[inline(always)]
pub(crate) fn report(a: &Attempt, dst_identity: u64, verdict: Verdict) {
    // SAFETY: reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let denied = verdict.action() == Action::Deny;
    let Some((suppressed, suppressed_denied)) = within_rate(a, now, denied) else {
        count(Counter::FlowEventsSuppressed, 1);
        if denied {
            count(Counter::DeniedEventsSuppressed, 1);
        }
        return;
    };
    let Some(mut entry) = FLOWS.reserve::<FlowEvent>(0) else {
        count(Counter::FlowEventsLost, 1);
        return;
    };
    entry.write(FlowEvent {
        timestamp_ns: now,
        src_identity: a.src_identity,
        dst_identity,
        src_ip: a.src_ip,
        dst_ip: a.dst_ip,
        src_port: a.src_port,
        dst_port: a.dst_port,
        proto: a.proto,
        hook: a.hook as u8,
        _pad: [0; 2],
        verdict,
        service_ip: a.service.ip,
        service_port: a.service.port,
        _pad2: [0; 3],
        suppressed,
        suppressed_denied,
    });
    entry.submit(0);
}

/// `FlowBudget::spend` for `a`'s source; `None` when its event is left
/// out. Two CPUs spending one budget at once may both pass: the rate is a
/// bound on the ring's load, not an exact count.
#[inline(always)]
fn within_rate(a: &Attempt, now: u64, denied: bool) -> Option<(u32, u32)> {
    let rate = setting(Setting::FlowEventsPerSource);
    if rate == 0 {
        return Some((0, 0));
    }
    let key = FlowSourceKey::of(a.src_identity, &a.src_ip);
    let interval = 1_000_000_000 / u64::from(rate);
    let (budget, reported) = FlowBudget::spend(lookup(&FLOW_SOURCES, &key), now, interval, denied);
    let _ = FLOW_SOURCES.insert(key, budget, BPF_ANY as u64);
    reported
}

/// The local port the calling socket is bound to (0: not bound yet).
#[inline(always)]
fn bound_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the kernel's context for this call; `sk` is checked for null
    // before its u32 field is read.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 0;
        }
        core::ptr::read_volatile(&raw const (*sk).src_port) as u16
    }
}

/// The `UDP_PEERS` key for the calling socket and its peer `remote`.
#[inline(always)]
fn udp_peer(ctx: &SockAddrContext, remote: &SockAddr) -> UdpPeerKey {
    UdpPeerKey {
        // SAFETY: the helper only reads the context it is given.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        remote_ip: remote.ip,
        local_port: bound_port(ctx),
        remote_port: remote.port,
        _pad: 0,
    }
}

/// What the connect and sendmsg hooks do with a call.
enum Outcome {
    Allow,
    Deny,
    /// Allowed, and steered to the node agent, which carries it to the
    /// destination's node over mutual TLS.
    Tunnel,
    /// A Service with no backend: ECONNREFUSED.
    Refused,
}

/// Connect and sendmsg: the Service address (if it is one) is translated
/// to a backend first, then the call is judged against the destination
/// workload's policy and, for a workload on another node, steered to the
/// agent.
#[inline(always)]
fn on_sock_addr(ctx: &SockAddrContext, family: Family, hook: Hook) -> i32 {
    let outcome = judge_sock_addr(ctx, family, hook);
    match outcome {
        Outcome::Allow => SOCK_ADDR_ALLOW,
        Outcome::Deny => SOCK_ADDR_DENY,
        Outcome::Tunnel => {
            let agent = SockAddr::new(agent_listener(family), tunnel_port());
            sock_addr::write(ctx, family, &agent);
            SOCK_ADDR_ALLOW
        }
        Outcome::Refused => {
            // SAFETY: sets the error the refused call returns.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            SOCK_ADDR_DENY
        }
    }
}

#[inline(always)]
fn judge_sock_addr(ctx: &SockAddrContext, family: Family, hook: Hook) -> Outcome {
    // SAFETY: the kernel's context for this call.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    let mut dst = sock_addr::read(ctx, family);
    let mut service = SockAddr::new([0; 4], 0);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        // Any other transport (UDP-Lite, SCTP) to a mesh workload is
        // refused, as the destination node's tc program drops it; ping
        // sockets pass, as ICMP does at tc.
        let refused = !workload_transport(proto) && endpoint(&dst.ip).is_some();
        return if refused {
            Outcome::Deny
        } else {
            Outcome::Allow
        };
    }
    match service::resolve(ctx, &dst, proto) {
        Destination::Direct => {}
        Destination::NoBackend => return Outcome::Refused,
        Destination::Backend(backend) => {
            service::remember_service_peer(ctx, &backend, &dst);
            sock_addr::write(ctx, family, &backend);
            service = dst;
            dst = backend;
        }
    }
    if is_agent_socket(ctx) {
        return Outcome::Allow;
    }
    if is_unattributable(&dst.ip) {
        // Link-local, multicast, broadcast: whoever answers on the bridge
        // gets it, with no workload to judge. Refused to workloads; other
        // processes of the cgroup (the host's) are not governed.
        return if identity_of_caller(ctx) == WORLD_IDENTITY {
            Outcome::Allow
        } else {
            Outcome::Deny
        };
    }
    if hook == Hook::Sendmsg && lookup(&UDP_PEERS, &udp_peer(ctx, &dst)).is_some() {
        return Outcome::Allow; // a reply to a datagram this socket received
    }
    let Some(dst_endpoint) = endpoint(&dst.ip) else {
        return Outcome::Allow; // not a mesh workload: policy does not govern it
    };
    let attempt = Attempt {
        src_identity: identity_of_caller(ctx),
        src_ip: [0; 4],
        src_port: 0,
        dst_ip: dst.ip,
        dst_port: dst.port,
        proto,
        hook,
        service,
    };
    // The caller is on this node (known by its network namespace); only
    // connect(2) can be steered to the agent, and only when mTLS is on.
    let path = connection_path(
        &dst_endpoint,
        attempt.src_identity,
        true,
        proto,
        hook == Hook::Connect && tunnel_port() != 0,
    );
    let verdict = judge(&attempt, &dst_endpoint, path.plaintext());
    if !verdict.action().passes() {
        Outcome::Deny
    } else if path == ConnectionPath::Tunnel {
        remember_redirect(ctx, &attempt, &dst_endpoint);
        Outcome::Tunnel
    } else {
        Outcome::Allow
    }
}

/// Whether workloads may use the transport `proto`: TCP and UDP, the
/// protocols policy names, and ICMP, which it does not govern.
#[inline(always)]
fn workload_transport(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6)
}

/// `SOCK_RAW` in `bpf_sock.type`.
const SOCK_RAW: u32 = 3;
/// What a cgroup sock program returns: the socket is created, or refused.
const SOCK_CREATE_ALLOW: i32 = 1;
const SOCK_CREATE_DENY: i32 = 0;

/// `socket(2)` inside a workload's network namespace creates only the
/// transports workloads may use, and no raw socket. A connected UDP-Lite
/// socket, for one, meets no sock_addr hook at all (the kernel's UDP-Lite
/// has no pre-connect hook, and a connected socket's sendmsg runs none); a
/// raw socket sends whatever its process writes, TCP SYNs included, past
/// every connect hook (with `IP_HDRINCL`, whatever its protocol). Ping
/// keeps working through ICMP datagram sockets. Refused with EPERM;
/// outside workloads nothing changes. (`AF_PACKET` sockets meet no cgroup
/// socket hook: a question of their own.)
#[cgroup_sock(sock_create)]
pub fn mesh_sock_create(ctx: SockContext) -> i32 {
    if identity_of_caller(&ctx) == WORLD_IDENTITY {
        return SOCK_CREATE_ALLOW;
    }
    // SAFETY: the kernel's context for this call; both fields are u32.
    let (sock_type, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    let allowed = sock_type != SOCK_RAW && u8::try_from(protocol).is_ok_and(workload_transport);
    if allowed {
        SOCK_CREATE_ALLOW
    } else {
        SOCK_CREATE_DENY
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    on_sock_addr(&ctx, Family::V4, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    on_sock_addr(&ctx, Family::V6, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sock_addr(&ctx, Family::V4, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sock_addr(&ctx, Family::V6, Hook::Sendmsg)
}

/// A datagram being received: its sender is remembered so that the socket
/// may answer (see `UDP_PEERS`), and a backend answering a Service address
/// the socket sent to is shown as that address: resolvers drop answers
/// from any address but the one they asked. Never refuses anything.
#[inline(always)]
fn on_recvmsg(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: the kernel's context for this call.
    if unsafe { (*ctx.sock_addr).protocol } as u8 == PROTO_UDP {
        let src = sock_addr::read(ctx, family);
        let _ = UDP_PEERS.insert(udp_peer(ctx, &src), 1, BPF_ANY as u64);
        if let Some(service) = service::dialled_service(ctx, &src) {
            sock_addr::write(ctx, family, &service);
        }
    }
    SOCK_ADDR_ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    on_recvmsg(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    on_recvmsg(&ctx, Family::V6)
}
