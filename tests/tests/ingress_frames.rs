//! The tc ingress program (`mesh_ingress`) on hand-made frames, run by the
//! kernel with BPF_PROG_TEST_RUN: no interface, no namespace, no packet
//! leaves the test. Each test loads the built kernel object with its maps
//! pinned in a bpffs of its own, and fills them as the agent would: one
//! workload on this node (the server), two workloads on another node (one
//! allowed to reach the server's port 8080, one denied).
//!
//! The verdicts are TCX's: `TCX_NEXT` passes the frame on (to the programs
//! after this one, then the stack), `TC_ACT_SHOT` drops it.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions},
};
use mesh_common::{
    map_names,
    policy::{
        ANY_IDENTITY, ANY_PORT, Action, ENDPOINT_LOCAL, Endpoint, FIRST_POLICY_RULE, IpKey,
        PROTO_TCP, PolicyKey, RULE_NOT_ALLOWED, Verdict,
    },
};
use mesh_tests::{bpffs::TestBpffs, privileges::require_kernel_test_privileges, unique_name};

/// -1 as the test run reports it.
const TCX_NEXT: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

const PROGRAM: &str = "mesh_ingress";

// Addresses from the benchmarking ranges; nothing is sent to them.
const SERVER4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const ALLOWED4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 20);
const DENIED4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 30);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 0x10);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 2, 0x20);
const DENIED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 2, 0x30);
/// Not a workload: the mesh does not govern traffic to it.
const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 9, 0x99);

const SERVER_ID: u64 = 0x1000;
const ALLOWED_ID: u64 = 0x2000;
const DENIED_ID: u64 = 0x3000;
/// The policy subject of the server.
const SUBJECT: u64 = 0x77;
const PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40_000;

const TCP_SYN: u8 = 0x02;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv4 "more fragments" flag in the flags/offset field.
const IP_MF: u16 = 0x2000;

/// The kernel object `cargo xtask build-ebpf` (and `cargo xtask test`) builds.
fn object_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/mesh-ebpf.o")
}

/// The loaded program and its maps. Fields drop in order: the program and
/// map fds first, then the bpffs (unmounting it removes the pins).
struct Ingress {
    ebpf: Ebpf,
    _bpffs: TestBpffs,
}

impl Ingress {
    fn load(test: &str) -> Self {
        require_kernel_test_privileges();
        let object = object_path();
        assert!(
            object.is_file(),
            "the kernel object is missing at {}: build it with `cargo xtask build-ebpf` \
             (`cargo xtask test` does it first)",
            object.display()
        );
        let bpffs = TestBpffs::mount(&unique_name(test)).expect("mounting the test's bpffs");
        let pins = bpffs.pin_dir();
        std::fs::create_dir_all(&pins).expect("creating the pin directory");
        let mut loader = EbpfLoader::new();
        // The maps are pinned-type: they go to the test's own bpffs. Small
        // sizes, as the agent sets them at load time.
        loader.default_map_pin_directory(&pins);
        for name in [
            map_names::SOCK_HASH,
            map_names::SOCKETS,
            map_names::ENDPOINTS,
            map_names::LOCAL_NETNS,
            map_names::POLICY,
            map_names::CONNTRACK,
            map_names::UDP_PEERS,
            map_names::REDIRECTS,
            map_names::TUNNEL_ORIG,
        ] {
            loader.map_max_entries(name, 64);
        }
        let mut ebpf = loader
            .load_file(&object)
            .unwrap_or_else(|e| panic!("loading {}: {e}", object.display()));
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .expect("the object has mesh_ingress")
            .try_into()
            .expect("mesh_ingress is a tc classifier");
        program
            .load()
            .unwrap_or_else(|e| panic!("loading {PROGRAM}: {e:?}"));
        fill_maps(&mut ebpf);
        Self {
            ebpf,
            _bpffs: bpffs,
        }
    }

    /// Runs the program once on `frame`; the kernel's answer, or its refusal.
    fn try_run(&self, frame: &[u8]) -> Result<u32, ProgramError> {
        let program: &SchedClassifier = self
            .ebpf
            .program(PROGRAM)
            .expect("loaded")
            .try_into()
            .expect("a tc classifier");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        Ok(program.test_run(opts)?.return_value)
    }

    fn verdict(&self, frame: &[u8]) -> u32 {
        self.try_run(frame)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {PROGRAM}: {e:?}"))
    }
}

/// The entries the agent would write for the three workloads and one
/// policy: the allowed client may reach the server's TCP port 8080, every
/// other source is denied everything.
fn fill_maps(ebpf: &mut Ebpf) {
    let mut endpoints: HashMap<&mut MapData, IpKey, Endpoint> = ebpf
        .map_mut(map_names::ENDPOINTS)
        .expect("ENDPOINTS")
        .try_into()
        .expect("ENDPOINTS is a hash map");
    let endpoint = |identity, flags| Endpoint {
        identity,
        subject: if identity == SERVER_ID { SUBJECT } else { 0 },
        flags,
        _pad: 0,
    };
    for (ip, identity, flags) in [
        (IpAddr::V4(SERVER4), SERVER_ID, ENDPOINT_LOCAL),
        (IpAddr::V6(SERVER6), SERVER_ID, ENDPOINT_LOCAL),
        (IpAddr::V4(ALLOWED4), ALLOWED_ID, 0),
        (IpAddr::V6(ALLOWED6), ALLOWED_ID, 0),
        (IpAddr::V4(DENIED4), DENIED_ID, 0),
        (IpAddr::V6(DENIED6), DENIED_ID, 0),
    ] {
        endpoints
            .insert(IpKey::from(ip), endpoint(identity, flags), 0)
            .expect("writing ENDPOINTS");
    }
    let mut policy: HashMap<&mut MapData, PolicyKey, Verdict> = ebpf
        .map_mut(map_names::POLICY)
        .expect("POLICY")
        .try_into()
        .expect("POLICY is a hash map");
    for (key, verdict) in [
        (
            PolicyKey::new(SUBJECT, ALLOWED_ID, PORT, PROTO_TCP),
            Verdict::new(Action::Allow, FIRST_POLICY_RULE),
        ),
        (
            PolicyKey::new(SUBJECT, ANY_IDENTITY, ANY_PORT, PROTO_TCP),
            Verdict::new(Action::Deny, RULE_NOT_ALLOWED),
        ),
    ] {
        policy.insert(key, verdict, 0).expect("writing POLICY");
    }
    // SETTINGS stays all zeros: policy generation 0, mTLS off, established
    // flows keep their verdict. Ingress judges the same either way.
}

fn ethernet(ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(l3);
    frame
}

/// A 20-byte TCP header (no options); the checksum is not checked here.
fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // sequence number
    h.extend_from_slice(&0u32.to_be_bytes()); // acknowledgement number
    h.push(5 << 4); // data offset: 5 words
    h.push(flags);
    h.extend_from_slice(&64_240u16.to_be_bytes()); // window
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    h
}

fn syn() -> Vec<u8> {
    tcp(CLIENT_PORT, PORT, TCP_SYN)
}

/// An IPv4 packet (20-byte header, correct checksum) carrying `payload`;
/// `frag` is the flags/fragment-offset field (offset in 8-byte units).
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, frag: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, PROTO_TCP, 0, 0]); // ttl, protocol, checksum
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = h
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let checksum = !((sum & 0xffff) + (sum >> 16)) as u16;
    h[10..12].copy_from_slice(&checksum.to_be_bytes());
    h.extend_from_slice(payload);
    ethernet(0x0800, &h)
}

/// An IPv6 packet whose first next-header is `next`.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    ethernet(0x86dd, &h)
}

/// `segment` behind a hop-by-hop options header, a destination options
/// header and a fragment header (offset 0, no more fragments), as a sender
/// may legitimately build it.
fn ipv6_with_extension_headers(src: Ipv6Addr, dst: Ipv6Addr, segment: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    // Hop-by-hop options: next header, length 0 (8 bytes), PadN of 4.
    payload.extend_from_slice(&[IPPROTO_DSTOPTS, 0, 1, 4, 0, 0, 0, 0]);
    // Destination options, the same padding.
    payload.extend_from_slice(&[IPPROTO_FRAGMENT, 0, 1, 4, 0, 0, 0, 0]);
    // Fragment header: next header, reserved, offset 0 and M clear, id.
    payload.extend_from_slice(&[PROTO_TCP, 0, 0, 0, 0, 0, 0x56, 0x78]);
    payload.extend_from_slice(segment);
    ipv6(src, dst, IPPROTO_HOPOPTS, &payload)
}

#[test]
fn allowed_syn_passes() {
    let ingress = Ingress::load("ingress-allowed");
    assert_eq!(
        ingress.verdict(&ipv4(ALLOWED4, SERVER4, 0, &syn())),
        TCX_NEXT
    );
    assert_eq!(
        ingress.verdict(&ipv6(ALLOWED6, SERVER6, PROTO_TCP, &syn())),
        TCX_NEXT
    );
}

#[test]
fn denied_syn_is_dropped() {
    let ingress = Ingress::load("ingress-denied");
    assert_eq!(
        ingress.verdict(&ipv4(DENIED4, SERVER4, 0, &syn())),
        TC_ACT_SHOT
    );
    assert_eq!(
        ingress.verdict(&ipv6(DENIED6, SERVER6, PROTO_TCP, &syn())),
        TC_ACT_SHOT
    );
    // The allowed client on a port policy does not open.
    let other_port = tcp(CLIENT_PORT, PORT + 1, TCP_SYN);
    assert_eq!(
        ingress.verdict(&ipv4(ALLOWED4, SERVER4, 0, &other_port)),
        TC_ACT_SHOT
    );
    // An address that is no workload is `world`, denied here too.
    let world = Ipv4Addr::new(198, 18, 9, 9);
    assert_eq!(
        ingress.verdict(&ipv4(world, SERVER4, 0, &syn())),
        TC_ACT_SHOT
    );
}

/// Whether the kernel refused to run the program on a frame (EINVAL).
fn refused(result: &Result<u32, ProgramError>) -> bool {
    matches!(result, Err(ProgramError::SyscallError(e))
        if e.io_error.raw_os_error() == Some(libc::EINVAL))
}

#[test]
fn truncated_frames() {
    let ingress = Ingress::load("ingress-truncated");
    let full = ipv4(DENIED4, SERVER4, 0, &syn());
    let full6 = ipv6(DENIED6, SERVER6, PROTO_TCP, &syn());
    // Shorter than an Ethernet header: BPF_PROG_TEST_RUN refuses to run
    // the program at all (EINVAL), on every kernel.
    let result = ingress.try_run(&full[..10]);
    assert!(refused(&result), "a 10-byte frame: {result:?}");
    // IP header cut short: Linux 6.18's BPF_PROG_TEST_RUN refuses these
    // too (IPv4 under 20 bytes, IPv6 under 40). Where a kernel runs them,
    // the program cannot read the addresses and hands the frame to the
    // stack (TCX_NEXT), which drops it: ip_rcv and ipv6_rcv check the
    // header length before anything is delivered.
    for frame in [&full[..14 + 12], &full6[..14 + 20]] {
        let result = ingress.try_run(frame);
        assert!(
            refused(&result) || matches!(result, Ok(TCX_NEXT)),
            "{} bytes: {result:?}",
            frame.len()
        );
    }
    // An IPv4 header whose options are cut short (IHL says 60 bytes, 20
    // are there): the ports are out of reach, so the frame goes to the
    // stack, which drops it (IHL beyond the packet).
    let mut options_cut = ipv4(DENIED4, SERVER4, 0, &[]);
    options_cut[14] = 0x4f;
    assert_eq!(ingress.verdict(&options_cut), TCX_NEXT);
    // An unfragmented packet whose TCP header is cut short (ports, no
    // flags): passed on, and tcp_v4_rcv drops a segment shorter than a TCP
    // header. Unlike a first fragment, nothing can complete it later.
    let cut = ipv4(DENIED4, SERVER4, 0, &syn()[..8]);
    assert_eq!(ingress.verdict(&cut), TCX_NEXT);
}

#[test]
fn first_fragment_with_the_whole_tcp_header_is_judged() {
    let ingress = Ingress::load("ingress-first-fragment");
    // MF set, offset 0, the whole TCP header and some data in this fragment.
    let mut segment = syn();
    segment.extend_from_slice(&[0xab; 16]);
    assert_eq!(
        ingress.verdict(&ipv4(DENIED4, SERVER4, IP_MF, &segment)),
        TC_ACT_SHOT
    );
    assert_eq!(
        ingress.verdict(&ipv4(ALLOWED4, SERVER4, IP_MF, &segment)),
        TCX_NEXT
    );
}

#[test]
fn non_first_fragment_passes() {
    let ingress = Ingress::load("ingress-later-fragment");
    // Offset 8 bytes, last fragment: no ports in it. Useless without its
    // first fragment, which is judged (a tiny first fragment included, see
    // below).
    let rest = [0xcd; 12];
    assert_eq!(ingress.verdict(&ipv4(DENIED4, SERVER4, 1, &rest)), TCX_NEXT);
    // The same with more fragments to come.
    assert_eq!(
        ingress.verdict(&ipv4(DENIED4, SERVER4, IP_MF | 1, &rest)),
        TCX_NEXT
    );
}

#[test]
fn tiny_first_fragment_of_a_syn_is_dropped() {
    let ingress = Ingress::load("ingress-tiny-fragment");
    // A denied client's SYN split so that the first fragment carries only
    // the first 8 bytes of the TCP header (ports, sequence number) and the
    // flags come in the next one: reassembled, it is a SYN to the server.
    // The program cannot read the flags of such a fragment; the later
    // fragment passes (it has no ports), so the first must not.
    let tiny = ipv4(DENIED4, SERVER4, IP_MF, &syn()[..8]);
    assert_eq!(ingress.verdict(&tiny), TC_ACT_SHOT);
    // No stack sends one, so an allowed client loses nothing real: a tiny
    // first fragment to a workload is dropped whoever sends it.
    let tiny = ipv4(ALLOWED4, SERVER4, IP_MF, &syn()[..8]);
    assert_eq!(ingress.verdict(&tiny), TC_ACT_SHOT);
}

/// An Ethernet frame is at least 60 bytes: a short packet arrives padded,
/// and the padding is no part of the IP packet. A tiny first fragment is
/// tiny by its IP length, whatever follows it in the frame.
#[test]
fn a_padded_tiny_first_fragment_is_still_tiny() {
    let ingress = Ingress::load("ingress-padded-fragment");
    for client in [ALLOWED4, DENIED4] {
        let mut frame = ipv4(client, SERVER4, IP_MF, &syn()[..8]);
        frame.resize(60, 0);
        assert_eq!(ingress.verdict(&frame), TC_ACT_SHOT, "from {client}");
    }
}

#[test]
fn ipv6_extension_headers_are_dropped_to_workloads() {
    let ingress = Ingress::load("ingress-ipv6-ext");
    // The program does not walk extension headers: a packet to a local
    // workload whose ports it cannot read is dropped (docs/architecture.md,
    // "Policy enforcement"), whoever sends it.
    assert_eq!(
        ingress.verdict(&ipv6_with_extension_headers(DENIED6, SERVER6, &syn())),
        TC_ACT_SHOT
    );
    assert_eq!(
        ingress.verdict(&ipv6_with_extension_headers(ALLOWED6, SERVER6, &syn())),
        TC_ACT_SHOT
    );
    // To an address that is no workload, policy does not apply.
    assert_eq!(
        ingress.verdict(&ipv6_with_extension_headers(DENIED6, OUTSIDE6, &syn())),
        TCX_NEXT
    );
}
