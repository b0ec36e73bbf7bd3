//! Same-node short-circuit, on the real kernel: two pods (network
//! namespaces) on one node, the agent attached to the test's own cgroup and
//! pinning into the test's own bpffs.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::{self, Agent},
    topology::{TestBed, wait_for_line},
};

const MIB: usize = 1 << 20;
const T: Duration = Duration::from_secs(120);

/// A bed with two pods on one node and the agent running.
fn bed_with_two_pods(test: &str, agent_args: &[&str]) -> (TestBed, Agent) {
    let mut bed = TestBed::new(test).unwrap();
    bed.add_pod(0).unwrap();
    bed.add_pod(0).unwrap();
    let agent = Agent::start(&bed, agent_args).unwrap();
    (bed, agent)
}

/// Two pods, the agent, and a server of `mode` in pod 1 (in the mesh).
fn two_pods(
    test: &str,
    agent_args: &[&str],
    mode: &str,
    v6: bool,
) -> (TestBed, Agent, mesh_tests::process::Spawned, SocketAddr) {
    let (bed, agent) = bed_with_two_pods(test, agent_args);
    let addr = bed.pods[1].addr(v6, 8080);
    let server = bed.server(1, true, addr, mode).unwrap();
    (bed, agent, server, addr)
}

fn counter(bed: &TestBed, name: &str) -> u64 {
    agent::counter(&bed.bpffs.pin_dir(), name).unwrap()
}

/// Runs `mesh-pod transfer` from pod 0 to `to` (in the mesh, or outside
/// its cgroup) and returns the report; every echoed byte has been checked.
fn transfer(
    bed: &TestBed,
    in_mesh: bool,
    to: &str,
    sizes: &str,
    extra: &[&str],
) -> serde_json::Value {
    let mut args = vec!["transfer", "--to", to, "--sizes", sizes];
    args.extend_from_slice(extra);
    bed.client(0, in_mesh, &args, T).unwrap()
}

fn sizes(list: &[usize]) -> String {
    list.iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn redirected_bytes_arrive_intact_from_one_byte_to_16_mib() {
    let (bed, _agent, _server, addr) =
        two_pods("intact", &["--short-circuit", "on"], "echo", false);
    let to = addr.to_string();

    // One-byte writes: every message is its own sk_msg verdict.
    let small = sizes(&[1, 2, 3, 100, 1000]);
    transfer(&bed, true, &to, &small, &["--chunk", "1"]);
    // Odd-sized writes around buffer boundaries, up to 16 MiB.
    let large = [4095, 4096, 4097, 65535, 65536, 65537, MIB, 16 * MIB];
    let report = transfer(&bed, true, &to, &sizes(&large), &["--chunk", "7001"]);
    assert_eq!(report["ok"], true);

    let sent: usize = large.iter().sum::<usize>() + 1106;
    let redirected = counter(&bed, "bytes_redirected") as usize;
    // Both directions go through sk_msg: the request and its echo.
    assert!(
        redirected >= sent,
        "only {redirected} of the {sent} bytes sent each way were redirected"
    );
    assert!(counter(&bed, "msgs_redirected") > 0);
    assert_eq!(counter(&bed, "sockets_track_failed"), 0);
}

#[test]
fn two_hundred_concurrent_connections() {
    let (bed, _agent, _server, addr) =
        two_pods("concurrent", &["--short-circuit", "on"], "echo", false);
    let report = transfer(
        &bed,
        true,
        &addr.to_string(),
        "1,65536,300000",
        &["--connections", "200", "--chunk", "9000"],
    );
    assert_eq!(report["bytes_checked"], 200 * (1 + 65536 + 300000));
    // 600 connections, two sockets each.
    assert!(counter(&bed, "sockets_tracked") >= 1200);
    assert!(counter(&bed, "bytes_redirected") >= 200 * 365537);
}

#[test]
fn ipv6_works_like_ipv4() {
    let (bed, _agent, _server, addr) = two_pods("ipv6", &["--short-circuit", "on"], "echo", true);
    assert!(addr.is_ipv6());
    let to = addr.to_string();
    transfer(&bed, true, &to, "1,65536,4194304", &["--chunk", "5000"]);
    assert!(counter(&bed, "bytes_redirected") >= 4194304 + 65537);

    // While a connection is open, both of its ends are listed with their
    // IPv6 addresses and real ports.
    let pinger = bed
        .workload(0, &["pingpong", "--to", &to, "--seconds", "2"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let sockets = loop {
        let sockets = agent::sockets(&bed.bpffs.pin_dir()).unwrap();
        if sockets.len() >= 2 || Instant::now() > deadline {
            break sockets;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let server_end = sockets
        .iter()
        .find(|s| s["local"] == to.as_str())
        .unwrap_or_else(|| panic!("no socket with local {to} in {sockets:?}"));
    let client_addr = server_end["remote"].as_str().unwrap().to_string();
    assert!(client_addr.starts_with(&format!("[{}]:", bed.pods[0].ip6)));
    assert!(
        sockets
            .iter()
            .any(|s| s["local"] == client_addr.as_str() && s["remote"] == to.as_str())
    );
    assert_eq!(server_end["path"], "redirect");
    let out = pinger.wait_output(T).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn ten_thousand_short_connections_leave_no_entry_behind() {
    let (bed, _agent, _server, addr) = two_pods("short", &["--short-circuit", "on"], "echo", false);
    let report = bed
        .client(
            0,
            true,
            &["short", "--to", &addr.to_string(), "--count", "10000"],
            T,
        )
        .unwrap();
    assert_eq!(report["connections"], 10000);

    // The server closes its end when it sees EOF; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = agent::stats(&bed.bpffs.pin_dir()).unwrap();
        let left = stats["maps"]["SOCK_HASH"]["entries"].as_u64().unwrap()
            + stats["maps"]["SOCKETS"]["entries"].as_u64().unwrap();
        if left == 0 || Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(stats["maps"]["SOCK_HASH"]["entries"], 0, "{stats}");
    assert_eq!(stats["maps"]["SOCKETS"]["entries"], 0, "{stats}");
    let tracked = stats["counters"]["sockets_tracked"].as_u64().unwrap();
    assert!(tracked >= 20000, "{stats}");
    assert_eq!(
        stats["counters"]["sockets_closed"].as_u64().unwrap(),
        tracked,
        "{stats}"
    );
}

#[test]
fn processes_outside_the_cgroup_are_not_touched() {
    let (bed, _agent) = bed_with_two_pods("outside", &[]);
    let addr = bed.pods[1].addr(false, 8080);
    let _server = bed.server(1, false, addr, "echo").unwrap();
    transfer(&bed, false, &addr.to_string(), "1,1048576", &[]);
    let stats = agent::stats(&bed.bpffs.pin_dir()).unwrap();
    for (name, value) in stats["counters"].as_object().unwrap() {
        assert_eq!(
            value, 0,
            "counter {name} moved for traffic outside the mesh's cgroup"
        );
    }
    assert!(agent::sockets(&bed.bpffs.pin_dir()).unwrap().is_empty());
}

#[test]
fn sendfile_sender_and_splice_receiver_get_every_byte() {
    // Default settings: the short-circuit is off, so a splice(2) reader
    // (which cannot see redirected bytes, docs/short-circuit.md) is safe.
    let (bed, _agent, _server, addr) = two_pods("splice", &[], "splice-echo", false);
    let sizes = "1,65536,16777216";
    let report = transfer(&bed, true, &addr.to_string(), sizes, &["--sendfile"]);
    assert_eq!(report["bytes_checked"], 1 + 65536 + 16777216);
    assert_eq!(
        counter(&bed, "sockets_tracked"),
        0,
        "tracked sockets with the short-circuit off"
    );
}

/// With the splice guard (a BPF LSM program: the kernel matrix's Debian
/// kernels have the BPF LSM active, this machine's kernel may not), a
/// splice(2) reader of a short-circuited socket gets EINVAL instead of
/// missing the redirected bytes, reads instead, and gets every byte; the
/// guard outlives a restart of the agent.
#[test]
#[ignore = "needs the BPF LSM (`bpf` in lsm=): runs in the kernel matrix's VMs (cargo xtask test --kernel 6.1)"]
fn splice_readers_of_short_circuited_sockets_fall_back_and_get_every_byte() {
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    assert!(
        lsms.split(',').any(|l| l == "bpf"),
        "this kernel's active LSMs lack bpf (/sys/kernel/security/lsm): run this test in the \
         kernel matrix (cargo xtask test --kernel 6.1)"
    );
    let (bed, mut agent, _server, addr) = two_pods(
        "spliceguard",
        &["--short-circuit", "on"],
        "splice-echo",
        false,
    );
    assert!(
        bed.pin_dir(0).join("lsm_splice_guard").exists(),
        "{}",
        agent.log()
    );
    let sizes = "1,65536,16777216";
    let sent = 1 + 65536 + 16777216;
    let report = transfer(&bed, true, &addr.to_string(), sizes, &[]);
    assert_eq!(report["bytes_checked"], sent);
    assert!(
        counter(&bed, "bytes_redirected") >= sent,
        "the transfer was not short-circuited"
    );
    let refused = counter(&bed, "splice_refused");
    assert!(refused >= 1, "no splice was refused:\n{}", agent.log());

    // A restart attaches the new guard before the old one goes.
    assert!(agent.stop().unwrap().success());
    let agent = Agent::start(&bed, &["--short-circuit", "on"]).unwrap();
    let log = agent.log();
    assert!(log.contains("splice guard attached"), "{log}");
    let report = transfer(&bed, true, &addr.to_string(), sizes, &[]);
    assert_eq!(report["bytes_checked"], sent);
    assert!(counter(&bed, "splice_refused") > refused);
}

#[test]
fn sendfile_sender_is_redirected_intact() {
    let (bed, _agent, _server, addr) =
        two_pods("sendfile", &["--short-circuit", "on"], "echo", false);
    let report = transfer(
        &bed,
        true,
        &addr.to_string(),
        "1,65536,16777216",
        &["--sendfile"],
    );
    assert_eq!(report["bytes_checked"], 1 + 65536 + 16777216);
    assert!(
        counter(&bed, "bytes_redirected") >= 16777216,
        "the sendfile path was not redirected"
    );
}

/// A receiver that does not read (for 1.5 s) flooded with `bytes`: the
/// flood's report (whether the sender was pushed back, and after how many
/// bytes); every byte arrived, in order, or the flood fails.
fn flood_a_receiver_that_holds(bed: &TestBed, bytes: usize) -> serde_json::Value {
    let addr = bed.pods[1].addr(false, 8080);
    // The receiver reads nothing until the writer has been pushed back (or
    // has written everything): a timed hold would end early when the
    // writer is slow, as a debug build under TCG is.
    let release = bed.files.path().join("flood-released");
    let release = release.to_str().unwrap();
    let mut server = bed
        .workload(
            1,
            &[
                "serve",
                "--listen",
                &addr.to_string(),
                "--mode",
                "hold",
                "--release",
                release,
            ],
        )
        .unwrap();
    wait_for_line(&mut server, "listening").unwrap();
    bed.client(
        0,
        true,
        &[
            "flood",
            "--to",
            &addr.to_string(),
            "--bytes",
            &bytes.to_string(),
            "--release",
            release,
        ],
        T,
    )
    .unwrap()
}

/// The most the kernel's sysctl lets TCP buffer, `name`'s third value.
fn sysctl_max(name: &str) -> usize {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// With default settings a receiver that does not read pushes back on its
/// sender through TCP's own flow control.
#[test]
fn slow_receiver_pushes_back_and_loses_nothing() {
    let (bed, _agent) = bed_with_two_pods("slowrecv", &[]);
    let report = flood_a_receiver_that_holds(&bed, 256 * MIB);
    assert_eq!(report["pushed_back"], true, "{report}");
    let buffered = report["accepted_before_pushback"].as_u64().unwrap() as usize;
    // What the kernel holds for a receiver that does not read is bounded by
    // the socket buffers (tcp_wmem + tcp_rmem maxima), not by how much the
    // sender wants to send.
    let bound = sysctl_max("tcp_wmem") + sysctl_max("tcp_rmem");
    assert!(
        buffered <= bound + 4 * MIB,
        "{buffered} bytes were buffered for a receiver that was not reading (bound {bound})"
    );
}

/// Short-circuited, the kernel's redirect path bounds nothing per socket
/// (the self-test's `no_receiver_backpressure`): the mesh counts what the
/// receiver reads (`mesh_inbox_read`), and past the node's bound (tcp_rmem's
/// maximum) sends the connection back to the stack, where TCP pushes back.
/// Every byte still arrives, in order.
#[test]
#[ignore = "needs fexit programs, which this host's kernel refuses (EPERM): runs in the kernel matrix's VMs (cargo xtask test --kernel 6.1)"]
fn short_circuited_slow_receiver_pushes_back_and_loses_nothing() {
    let (bed, agent) = bed_with_two_pods("slowrecv-sc", &["--short-circuit", "on"]);
    let log = agent.log();
    assert!(
        log.contains("redirected reads counted"),
        "the agent could not count redirected reads here:\n{log}"
    );
    // The redirect backlog's bound, then the stack's own buffers.
    let bound = 2 * sysctl_max("tcp_rmem") + sysctl_max("tcp_wmem");
    // Twice what may be held: unbounded, all of it would be (under TCG
    // in the kernel matrix every MiB counts).
    let report = flood_a_receiver_that_holds(&bed, 2 * (bound + 4 * MIB));
    assert_eq!(
        report["pushed_back"],
        true,
        "{report}\n{}\n{}",
        agent.log(),
        agent::cli(&bed.pin_dir(0), &["inspect", "stats"]).unwrap_or_default()
    );
    let buffered = report["accepted_before_pushback"].as_u64().unwrap() as usize;
    assert!(
        buffered <= bound + 4 * MIB,
        "{buffered} bytes were buffered for a receiver that was not reading (bound {bound})"
    );
    assert!(
        counter(&bed, "bytes_redirected") > 0,
        "the flood was not short-circuited at first"
    );
    assert_eq!(counter(&bed, "redirect_backpressure"), 1, "{}", agent.log());
}

#[test]
fn request_response_never_stalls() {
    let (bed, _agent, _server, addr) =
        two_pods("reqresp", &["--short-circuit", "on"], "echo", false);
    let to = addr.to_string();
    for size in ["1", "64", "1500", "16384", "65536"] {
        let report = bed
            .client(
                0,
                true,
                &["pingpong", "--to", &to, "--size", size, "--count", "300"],
                T,
            )
            .unwrap_or_else(|e| panic!("ping-pong of {size} bytes: {e:#}"));
        assert_eq!(report["rounds"], 300);
    }
    assert!(counter(&bed, "msgs_redirected") >= 2 * 5 * 300);
}

#[test]
fn agent_restarts_on_its_pins_and_refuses_a_second_agent() {
    let (bed, mut agent, _server, addr) =
        two_pods("restart", &["--short-circuit", "on"], "echo", false);
    let pins = bed.bpffs.pin_dir();
    let to = addr.to_string();

    let mut second = Agent::spawn(&bed, &[]).unwrap();
    let status = second.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    let log = second.log();
    assert!(
        log.contains("already running") && log.contains(&format!("pid {}", agent.pid())),
        "second agent's log: {log}"
    );

    transfer(&bed, true, &to, "100000", &[]);
    let before = counter(&bed, "bytes_redirected");
    assert!(before >= 100000);

    assert!(
        agent.stop().unwrap().success(),
        "agent log: {}",
        agent.log()
    );
    for pin in ["SOCK_HASH", "SOCKETS", "COUNTERS", "SETTINGS"] {
        assert!(pins.join(pin).exists(), "{pin} was unpinned on exit");
    }
    // No agent: the pinned programs keep short-circuiting.
    transfer(&bed, true, &to, "100000", &[]);
    let while_down = counter(&bed, "bytes_redirected");
    assert!(
        while_down >= before + 100000,
        "not redirected while the agent was down"
    );

    let agent = Agent::start(&bed, &[]).unwrap();
    let log = agent.log();
    assert!(
        log.contains("adopted_pins=true") && log.contains("adopted pinned link"),
        "{log}"
    );
    transfer(&bed, true, &to, "100000", &[]);
    assert!(
        counter(&bed, "bytes_redirected") >= while_down + 100000,
        "counters were reset"
    );
}

#[test]
fn kill_switch_sends_traffic_through_the_stack_without_breaking_connections() {
    let (bed, _agent, _server, addr) =
        two_pods("killswitch", &["--short-circuit", "off"], "echo", false);
    let pins = bed.bpffs.pin_dir();
    let to = addr.to_string();
    let switch = |state: &str| agent::cli(&pins, &["short-circuit", state]).unwrap();

    transfer(&bed, true, &to, "1,65536", &[]);
    assert_eq!(counter(&bed, "msgs_redirected"), 0);
    assert_eq!(counter(&bed, "sockets_tracked"), 0);

    // A connection opened while off keeps working when switched on.
    let opened_off = bed
        .workload(0, &["pingpong", "--to", &to, "--seconds", "2"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(switch("on").trim(), "short-circuit: on");
    transfer(&bed, true, &to, "65536", &[]);
    let redirected = counter(&bed, "msgs_redirected");
    assert!(
        redirected > 0,
        "switching on did not redirect new connections"
    );

    // A redirected connection keeps working when switched off, and its
    // messages then take the stack.
    let opened_on = bed
        .workload(0, &["pingpong", "--to", &to, "--seconds", "2"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(counter(&bed, "msgs_redirected") > redirected);
    assert_eq!(switch("off").trim(), "short-circuit: off");
    let stack_only = counter(&bed, "msgs_stack_only");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        counter(&bed, "msgs_stack_only") > stack_only,
        "messages still redirected after off"
    );

    for (name, process) in [
        ("opened while off", opened_off),
        ("opened while on", opened_on),
    ] {
        let out = process.wait_output(T).unwrap();
        assert!(
            out.status.success(),
            "connection {name} broke: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(switch("status").trim(), "short-circuit: off");
}

/// The agent's start-up self-test reproduces the redirect path's defects on
/// the running kernel (in a private namespace, with a map of its own) and
/// says what it found in kernel.json, `status` and `/metrics`. The two
/// deterministic ones are in every kernel of the matrix (docs/kernels.md):
/// a kernel that fixed one fails here until that page says so.
#[test]
fn the_self_test_finds_the_redirect_paths_defects_of_this_kernel() {
    let bed = TestBed::new("selftest").unwrap();
    let agent = Agent::start_node(&bed, 0, &["--short-circuit", "on"]).unwrap();
    let kernel_json = bed.state_dir(0).join("kernel.json");
    let deadline = std::time::Instant::now() + T;
    let defects = loop {
        let kernel: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&kernel_json).unwrap()).unwrap();
        if !kernel["short_circuit_defects"].is_null() {
            break kernel["short_circuit_defects"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no self-test result:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("self-test on this kernel: {defects}");
    let found = |name: &str| -> Option<bool> {
        defects
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {defects}"))["present"]
            .as_bool()
    };
    assert_eq!(
        found("splice_misses_redirected_bytes"),
        Some(true),
        "{defects}"
    );
    assert_eq!(found("no_receiver_backpressure"), Some(true), "{defects}");
    // Racy by nature: judged, whatever it found.
    assert!(found("blocking_read_eagain").is_some(), "{defects}");
    // The mesh's own sockets were not touched: the test's sockets carry
    // the agent's mark and live in no workload's namespace.
    assert_eq!(counter(&bed, "sockets_tracked"), 0);
    let metrics = agent::scrape_metrics(&bed, 0).unwrap();
    assert!(
        metrics.contains("mesh_kernel_defect{defect=\"splice_misses_redirected_bytes\"} 1"),
        "{metrics}"
    );
    let status = bed.nodes[0]
        .netns
        .exec(
            agent::agent_bin().to_str().unwrap(),
            &[
                "--bpffs",
                bed.pin_dir(0).to_str().unwrap(),
                "--state-dir",
                bed.state_dir(0).to_str().unwrap(),
                "status",
            ],
        )
        .unwrap_or_else(|e| format!("{e:#}"));
    assert!(
        status.contains("the redirect path has")
            && status.contains("splice_misses_redirected_bytes"),
        "{status}"
    );
    // A restart in the same boot reuses the results instead of spending
    // the CPU again while tunnels resume.
    let mut agent = agent;
    assert!(agent.stop().unwrap().success());
    let agent = Agent::start_node(&bed, 0, &["--short-circuit", "on"]).unwrap();
    let log = agent.log();
    assert!(log.contains("this boot's results reused"), "{log}");
    assert!(!log.contains("short-circuit self-test defect="), "{log}");
    let kernel: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&kernel_json).unwrap()).unwrap();
    assert_eq!(kernel["short_circuit_defects"], defects);
}
