//! Tunnels end to end on loopback: application → client agent → HTTP/2
//! (optionally over mutual TLS) → server agent → destination.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::client::{self, OpenError};
use super::pool::{Pool, PoolError};
use super::server::{ConnectRequest, Refusal};
use super::splice::SpliceFailure;
use super::testing::*;
use super::{REASON_HEADER, TunnelSettings};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// Generous bound for steps that take milliseconds, so a loaded machine
/// does not fail the tests; a hang still fails them.
const PATIENCE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress in {PATIENCE:?}"))
}

/// `size` random bytes each way at once, application ↔ destination through
/// both agents; returns the time from the application's connect to the
/// destination's last byte checked.
async fn transfer(size: usize, tls: bool) -> Duration {
    let up = random_bytes(size, 1);
    let down = random_bytes(size, 2);
    let (dest, mut outcomes) = exchange_destination(up.clone(), down.clone()).await;
    let (acceptor, connector) = match tls {
        true => {
            let (acceptor, connector) = mutual_tls();
            (Some(acceptor), Some(connector))
        }
        false => (None, None),
    };
    let settings = TunnelSettings::default();
    let server = ServerAgent::start(settings.clone(), acceptor, connect_to_target).await;
    let agent = client_agent(Pool::new(settings), server.addr, connector, dest).await;

    let start = Instant::now();
    let app = TcpStream::connect(agent).await.unwrap();
    within("application", exchange(app, up, down))
        .await
        .expect("the application gets the destination's bytes, exactly");
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .expect("the destination gets the application's bytes, exactly");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_transfers_are_byte_exact() {
    for tls in [false, true] {
        for size in [1, 64 * KIB + 1] {
            transfer(size, tls).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_both_ways_is_byte_exact() {
    let size = 64 * MIB;
    let took = transfer(size, false).await;
    let rate = 2.0 * size as f64 / MIB as f64 / took.as_secs_f64();
    eprintln!("64 MiB each way at once over TCP: {took:?}, {rate:.0} MiB/s in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_over_mutual_tls_is_byte_exact() {
    let size = 16 * MIB;
    let took = transfer(size, true).await;
    let rate = 2.0 * size as f64 / MIB as f64 / took.as_secs_f64();
    eprintln!("16 MiB each way at once over mutual TLS: {took:?}, {rate:.0} MiB/s in all");
}

/// A client agent tunnelling to `dest` through a plain server agent.
async fn agents(settings: TunnelSettings, dest: SocketAddr) -> (ServerAgent, SocketAddr) {
    let server = ServerAgent::start(settings.clone(), None, connect_to_target).await;
    let agent = client_agent(Pool::new(settings), server.addr, None, dest).await;
    (server, agent)
}

#[tokio::test]
async fn request_half_close_then_full_reply() {
    let request = random_bytes(100 * KIB, 3);
    let reply = random_bytes(300 * KIB, 4);
    let (dest, mut outcomes) = answer_after_request(request.clone(), reply.clone()).await;
    let (_server, agent) = agents(TunnelSettings::default(), dest).await;

    let mut app = TcpStream::connect(agent).await.unwrap();
    within("request", write_and_shut(&mut app, &request))
        .await
        .unwrap();
    within("reply", read_exact_stream(&mut app, &reply))
        .await
        .expect("the reply arrives whole after the application's half-close");
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn destination_half_close_then_application_replies() {
    let greeting = random_bytes(200 * KIB, 5);
    let answer = random_bytes(50 * KIB, 6);
    let (send, expect) = (greeting.clone(), answer.clone());
    // Sends everything and half-closes first, then still receives.
    let (dest, mut outcomes) = destination(move |mut stream| {
        let (send, expect) = (send.clone(), expect.clone());
        async move {
            write_and_shut(&mut stream, &send).await?;
            read_exact_stream(&mut stream, &expect).await
        }
    })
    .await;
    let (_server, agent) = agents(TunnelSettings::default(), dest).await;

    let mut app = TcpStream::connect(agent).await.unwrap();
    within("greeting", read_exact_stream(&mut app, &greeting))
        .await
        .unwrap();
    within("answer", write_and_shut(&mut app, &answer))
        .await
        .unwrap();
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .expect("the destination receives the answer after its own half-close");
}

async fn connection(server: &ServerAgent, settings: &TunnelSettings) -> client::Connection {
    let io = TcpStream::connect(server.addr).await.unwrap();
    client::handshake(io, settings).await.unwrap()
}

#[tokio::test]
async fn refusal_carries_status_and_reason() {
    let settings = TunnelSettings::default();
    let server = ServerAgent::start(
        settings.clone(),
        None,
        |request: ConnectRequest| async move {
            assert_eq!(
                request.headers.get("x-mesh-source").unwrap(),
                "spiffe://mesh.test/ns/a/sa/web"
            );
            Err::<TcpStream, _>(Refusal::new(
                StatusCode::FORBIDDEN,
                "denied by policy a/deny-web, rule 2\n(and a line break)",
            ))
        },
    )
    .await;
    let conn = connection(&server, &settings).await;
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-mesh-source",
        "spiffe://mesh.test/ns/a/sa/web".parse().unwrap(),
    );
    let target: SocketAddr = "10.1.2.3:8080".parse().unwrap();
    let (_app, mut agent_side) = tcp_pair().await;
    match conn.open(target, headers, &mut agent_side).await {
        Err(OpenError::Refused { status, reason }) => {
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(
                reason,
                "denied by policy a/deny-web, rule 2?(and a line break)"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(conn.is_usable(), "a refusal leaves the connection usable");
    assert_eq!(conn.streams(), 0, "a refused tunnel frees its slot");
}

#[tokio::test]
async fn requests_that_are_not_connect_to_an_address_are_refused() {
    let settings = TunnelSettings::default();
    let server = ServerAgent::start(settings, None, connect_to_target).await;
    let io = TcpStream::connect(server.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let cases = [
        (
            Method::GET,
            "http://10.1.2.3:80/",
            StatusCode::METHOD_NOT_ALLOWED,
            "only CONNECT",
        ),
        (
            Method::CONNECT,
            "example.com:80",
            StatusCode::BAD_REQUEST,
            "not an ip:port",
        ),
    ];
    for (method, uri, status, reason) in cases {
        let request = Request::builder().method(method).uri(uri).body(()).unwrap();
        let mut send = send.clone().ready().await.unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), status, "{uri}");
        let said = response.headers()[REASON_HEADER].to_str().unwrap();
        assert!(said.contains(reason), "{uri}: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_streams_leave_the_others_alone() {
    let up = random_bytes(8 * MIB, 7);
    let down = random_bytes(8 * MIB, 8);
    let (dest, mut outcomes) = exchange_destination(up.clone(), down.clone()).await;
    let settings = TunnelSettings::default();
    // Port 1 is refused, port 2 makes the handler panic, others connect.
    let server = ServerAgent::start(
        settings.clone(),
        None,
        |request: ConnectRequest| async move {
            match request.target.port() {
                1 => Err(Refusal::new(StatusCode::FORBIDDEN, "not this one")),
                2 => panic!("handler bug (expected by the test)"),
                _ => connect_to_target(request).await,
            }
        },
    )
    .await;
    let conn = connection(&server, &settings).await;

    let (app, mut agent_side) = tcp_pair().await;
    let tunnel = conn
        .open(dest, HeaderMap::new(), &mut agent_side)
        .await
        .unwrap();
    let spliced = tokio::spawn(tunnel.splice(agent_side));
    let exchanged = tokio::spawn(exchange(app, up, down));

    // Each panic prints its message: a few of them are enough.
    for round in 0..20 {
        let panics: &[u16] = if round % 5 == 0 { &[2] } else { &[] };
        for &port in [1].iter().chain(panics) {
            let status = match port {
                1 => StatusCode::FORBIDDEN,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let target = SocketAddr::from(([127, 0, 0, 1], port));
            let (_app, mut agent_side) = tcp_pair().await;
            match conn.open(target, HeaderMap::new(), &mut agent_side).await {
                Err(OpenError::Refused { status: got, .. }) => assert_eq!(got, status),
                other => panic!("port {port}: expected a refusal, got {other:?}"),
            }
        }
    }
    within("application", exchanged).await.unwrap().unwrap();
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .unwrap();
    let stats = within("splice", spliced).await.unwrap().unwrap();
    assert_eq!(stats.socket_to_tunnel, 8 * MIB as u64);
    assert_eq!(stats.tunnel_to_socket, 8 * MIB as u64);
    // And the connection still opens tunnels.
    let (dest, mut outcomes) = exchange_destination(Bytes::from("a"), Bytes::from("b")).await;
    let (app, mut agent_side) = tcp_pair().await;
    let tunnel = conn
        .open(dest, HeaderMap::new(), &mut agent_side)
        .await
        .unwrap();
    tokio::spawn(tunnel.splice(agent_side));
    within("application", exchange(app, "a".into(), "b".into()))
        .await
        .unwrap();
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_tunnels_share_a_few_connections() {
    const TUNNELS: usize = 1000;
    let dest = echo_destination().await;
    // Fewer streams per connection than tunnels, so that they spill over.
    let settings = TunnelSettings {
        max_concurrent_streams: 100,
        ..TunnelSettings::default()
    };
    let per_connection = settings.max_concurrent_streams as usize;
    let server = ServerAgent::start(settings.clone(), None, connect_to_target).await;
    let pool = Pool::new(settings);
    let agent = client_agent(pool.clone(), server.addr, None, dest).await;

    // Every tunnel stays open until all have been opened, so they really
    // are concurrent.
    let opened = Arc::new(tokio::sync::Barrier::new(TUNNELS));
    let apps: Vec<_> = (0..TUNNELS)
        .map(|i| {
            let opened = opened.clone();
            tokio::spawn(async move {
                let data = random_bytes(2 * KIB + i, i as u64);
                let mut app = TcpStream::connect(agent).await?;
                app.write_all(&data[..1]).await?;
                let mut first = [0];
                app.read_exact(&mut first).await?;
                opened.wait().await;
                write_and_shut(&mut app, &data[1..]).await?;
                read_exact_stream(&mut app, &data[1..]).await
            })
        })
        .collect();
    for app in apps {
        within("tunnel", app)
            .await
            .unwrap()
            .expect("every tunnel carries its bytes intact");
    }
    let handshakes = pool.handshakes() as usize;
    eprintln!("{TUNNELS} concurrent tunnels used {handshakes} connections");
    let least = TUNNELS.div_ceil(per_connection);
    assert!(
        (least..=2 * least).contains(&handshakes),
        "{handshakes} connections for {TUNNELS} tunnels"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_handshake() {
    let dest = echo_destination().await;
    let settings = TunnelSettings::default();
    let server = ServerAgent::start(settings.clone(), None, connect_to_target).await;
    let pool = Pool::<&str>::new(settings);
    let connects = Arc::new(AtomicUsize::new(0));
    let peer = server.addr;
    let slow_connect = {
        let connects = connects.clone();
        move || {
            connects.fetch_add(1, Ordering::SeqCst);
            async move {
                // A TLS handshake takes a while: callers pile up meanwhile.
                tokio::time::sleep(Duration::from_millis(200)).await;
                TcpStream::connect(peer).await
            }
        }
    };
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let (pool, connect) = (pool.clone(), slow_connect.clone());
            tokio::spawn(async move {
                let (mut app, mut agent_side) = tcp_pair().await;
                let tunnel = pool
                    .open(&"peer-b", connect, dest, HeaderMap::new(), &mut agent_side)
                    .await?;
                tokio::spawn(tunnel.splice(agent_side));
                write_and_shut(&mut app, b"ping").await?;
                read_exact_stream(&mut app, b"ping").await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .collect();
    for caller in callers {
        within("caller", caller).await.unwrap().unwrap();
    }
    assert_eq!(connects.load(Ordering::SeqCst), 1, "one TCP/TLS connect");
    assert_eq!(pool.handshakes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_destination_pushes_back_to_the_application() {
    const TOTAL: usize = 96 * MIB;
    let data = random_bytes(TOTAL, 9);
    let (start_reading, reading) = tokio::sync::oneshot::channel::<()>();
    let reading = Arc::new(tokio::sync::Mutex::new(Some(reading)));
    let expect = data.clone();
    // Accepts and reads nothing until told to, then checks everything.
    let (dest, mut outcomes) = destination_on(small_buffer_listener(), move |mut stream| {
        let (reading, expect) = (reading.clone(), expect.clone());
        async move {
            let told = reading.lock().await.take().unwrap();
            let _ = told.await;
            read_exact_stream(&mut stream, &expect).await
        }
    });
    // Every socket on the way has small kernel buffers, so what the path
    // holds is mostly the tunnel's.
    let settings = TunnelSettings::default();
    let handler = |request: ConnectRequest| async move {
        small_buffer_connect(request.target)
            .await
            .map_err(|e| Refusal::new(StatusCode::BAD_GATEWAY, e.to_string()))
    };
    let server = ServerAgent::start(settings.clone(), None, handler).await;
    let pool = Pool::new(settings.clone());
    let agent = client_agent_on(small_buffer_listener(), pool, server.addr, None, dest);

    let mut app = small_buffer_connect(agent).await.unwrap();
    let mut accepted = 0;
    let stalled = loop {
        let end = (accepted + MIB).min(TOTAL);
        match timeout(Duration::from_millis(500), app.write(&data[accepted..end])).await {
            Ok(written) => accepted += written.unwrap(),
            Err(_) => break true,
        }
        if accepted == TOTAL {
            break false;
        }
    };
    eprintln!("a destination that does not read held back the application after {accepted} bytes");
    assert!(
        stalled,
        "all {TOTAL} bytes were accepted by a destination that reads nothing"
    );
    // What the path may hold: the tunnel's stream window (which covers
    // HTTP/2's send queue and the bytes between the agents), one socket
    // read, and the kernel buffers (send and receive, which Linux
    // doubles) of the four sockets at the ends.
    let tunnel = (settings.stream_window + settings.splice_buffer) as usize;
    let kernel = 4 * 2 * 2 * SMALL_BUFFER as usize;
    assert!(
        accepted <= tunnel + kernel,
        "{accepted} bytes accepted: more than the tunnel's window ({tunnel}) and the kernel's buffers ({kernel})"
    );

    // Nothing was lost: once the destination reads, everything arrives.
    start_reading.send(()).unwrap();
    within("rest", write_and_shut(&mut app, &data[accepted..]))
        .await
        .unwrap();
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .expect("every byte arrives once the destination reads");
}

#[tokio::test]
async fn destination_reset_resets_the_application() {
    // Reads the request, then closes abortively (RST).
    let (dest, _outcomes) = destination(|mut stream| async move {
        let mut request = [0; 5];
        stream.read_exact(&mut request).await?;
        stream.set_zero_linger()?;
        Ok(())
    })
    .await;
    let (_server, agent) = agents(TunnelSettings::default(), dest).await;

    let mut app = TcpStream::connect(agent).await.unwrap();
    app.write_all(b"hello").await.unwrap();
    let mut buf = [0; 16];
    let read = within("read", app.read(&mut buf)).await;
    match read {
        Err(error) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset),
        Ok(n) => panic!("expected a reset, read {n} bytes (0 = a clean end of stream)"),
    }
}

/// A destination's next read: Ok when it finds a reset, an error naming
/// what it found instead (bytes, or a clean end of stream).
async fn read_a_reset(stream: &mut TcpStream) -> io::Result<()> {
    let mut rest = [0; 16];
    match stream.read(&mut rest).await {
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        other => Err(io::Error::other(format!("expected a reset, got {other:?}"))),
    }
}

#[tokio::test]
async fn application_reset_resets_the_destination() {
    // Reports how its read after the request ended.
    let (dest, mut outcomes) = destination(|mut stream| async move {
        let mut request = [0; 5];
        stream.read_exact(&mut request).await?;
        read_a_reset(&mut stream).await
    })
    .await;
    let (_server, agent) = agents(TunnelSettings::default(), dest).await;

    let mut app = TcpStream::connect(agent).await.unwrap();
    app.write_all(b"hello").await.unwrap();
    // Let the request through before resetting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.set_zero_linger().unwrap();
    drop(app);
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .expect("the destination sees a reset, not an end of stream");
}

#[tokio::test]
async fn an_abandoned_splice_resets_both_ends() {
    // Reports how its read after the request ended.
    let (dest, mut outcomes) = destination(|mut stream| async move {
        let mut request = [0; 5];
        stream.read_exact(&mut request).await?;
        read_a_reset(&mut stream).await
    })
    .await;
    let settings = TunnelSettings::default();
    let server = ServerAgent::start(settings.clone(), None, connect_to_target).await;
    let conn = connection(&server, &settings).await;
    let (mut app, mut agent_side) = tcp_pair().await;
    let tunnel = conn
        .open(dest, HeaderMap::new(), &mut agent_side)
        .await
        .unwrap();
    let spliced = tokio::spawn(tunnel.splice(agent_side));
    app.write_all(b"hello").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // As when the agent gives up on a drain: the splice is dropped.
    spliced.abort();
    let mut buf = [0; 16];
    match within("read", app.read(&mut buf)).await {
        Err(error) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .expect("the destination sees a reset too");
}

/// Opens a tunnel to an echo destination through the pool and returns the
/// application's end.
async fn pooled_echo(pool: &Pool<u8>, server: &ServerAgent, echo: SocketAddr) -> TcpStream {
    let (app, mut agent_side) = tcp_pair().await;
    let tunnel = pool
        .open(
            &0,
            connector(server.addr, None),
            echo,
            HeaderMap::new(),
            &mut agent_side,
        )
        .await
        .unwrap();
    tokio::spawn(tunnel.splice(agent_side));
    app
}

async fn ping(app: &mut TcpStream, message: &[u8]) {
    app.write_all(message).await.unwrap();
    let mut echoed = vec![0; message.len()];
    within("echo", app.read_exact(&mut echoed)).await.unwrap();
    assert_eq!(echoed, message);
}

/// Waits until `condition` holds, or fails after `PATIENCE`.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test]
async fn pool_reuses_then_retires_without_breaking_open_tunnels() {
    let echo = echo_destination().await;
    let settings = TunnelSettings {
        max_connection_age: Duration::from_millis(300),
        ..TunnelSettings::default()
    };
    let server = ServerAgent::start(settings.clone(), None, connect_to_target).await;
    let pool = Pool::new(settings);

    let mut long_lived = pooled_echo(&pool, &server, echo).await;
    ping(&mut long_lived, b"one").await;
    let mut second = pooled_echo(&pool, &server, echo).await;
    ping(&mut second, b"two").await;
    assert_eq!(
        pool.handshakes(),
        1,
        "the second tunnel reuses the connection"
    );
    drop(second);

    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut third = pooled_echo(&pool, &server, echo).await;
    ping(&mut third, b"three").await;
    assert_eq!(
        pool.handshakes(),
        2,
        "an old connection takes no new tunnel"
    );
    assert_eq!(pool.connections(), 1, "the old connection left the pool");

    // The tunnel on the retired connection still works, to its end.
    ping(&mut long_lived, b"still here").await;
    assert_eq!(server.served.load(Ordering::SeqCst), 0);
    long_lived.shutdown().await.unwrap();
    within("end of stream", read_exact_stream(&mut long_lived, b""))
        .await
        .unwrap();
    // Then the retired connection closes; the new one stays.
    eventually("retired connection closed", || {
        server.served.load(Ordering::SeqCst) == 1
    })
    .await;
    ping(&mut third, b"four").await;
}

#[tokio::test]
async fn graceful_shutdown_drains_open_tunnels_and_turns_new_ones_away() {
    let echo = echo_destination().await;
    let settings = TunnelSettings::default();
    let server = ServerAgent::start(settings.clone(), None, connect_to_target).await;
    let pool = Pool::new(settings.clone());
    let conn = connection(&server, &settings).await;

    let (mut app, mut agent_side) = tcp_pair().await;
    let tunnel = conn
        .open(echo, HeaderMap::new(), &mut agent_side)
        .await
        .unwrap();
    let spliced = tokio::spawn(tunnel.splice(agent_side));
    ping(&mut app, b"before").await;
    let mut pooled = pooled_echo(&pool, &server, echo).await;
    ping(&mut pooled, b"pooled").await;

    server.shut_down();
    eventually("GOAWAY seen", || !conn.is_usable()).await;
    let (_app, mut agent_side) = tcp_pair().await;
    match conn.open(echo, HeaderMap::new(), &mut agent_side).await {
        Err(error @ OpenError::Unavailable(_)) => assert!(error.is_retryable()),
        other => panic!("expected the connection to be unavailable, got {other:?}"),
    }
    // Open tunnels are not cut.
    ping(&mut app, b"during the drain").await;
    ping(&mut pooled, b"pooled, draining").await;
    // The pool opens a new connection (to an agent that still serves).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fresh = pooled_echo(&pool, &server, echo).await;
    ping(&mut fresh, b"fresh").await;
    assert_eq!(pool.handshakes(), 2);

    app.shutdown().await.unwrap();
    within("end of stream", read_exact_stream(&mut app, b""))
        .await
        .unwrap();
    within("splice", spliced).await.unwrap().unwrap();
    // Its last tunnel done, the first connection closes; the pool's, with
    // a tunnel still open, keeps serving it.
    eventually("drained connection closed", || {
        server.served.load(Ordering::SeqCst) == 1
    })
    .await;
    ping(&mut pooled, b"still draining").await;
    drop(pooled);
    eventually("both drained connections closed", || {
        server.served.load(Ordering::SeqCst) == 2
    })
    .await;
}

#[tokio::test]
async fn a_crashed_peer_restarted_on_its_port_is_reached_at_once() {
    let echo = echo_destination().await;
    let settings = TunnelSettings::default();
    let server = ServerAgent::start(settings.clone(), None, connect_to_target).await;
    let pool = Pool::new(settings.clone());
    let mut before = pooled_echo(&pool, &server, echo).await;
    ping(&mut before, b"before").await;

    // SIGKILL, and the next agent on the same port: the pooled connection
    // is dead, and the pool must notice without waiting for a timer.
    let addr = server.addr;
    server.crash().await;
    let restarted = ServerAgent::start_at(addr, settings, None, connect_to_target).await;
    let asked = std::time::Instant::now();
    let mut after = pooled_echo(&pool, &restarted, echo).await;
    ping(&mut after, b"after").await;
    // Anything that waited for a timer would take a retransmission's
    // second at least (the kernel's initial RTO, or a keepalive).
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "the first tunnel after the restart took {:?}",
        asked.elapsed()
    );
    assert_eq!(
        pool.handshakes(),
        2,
        "a new connection replaced the dead one"
    );
    assert_eq!(pool.connections(), 1, "the dead connection left the pool");
}

/// What a [`scripted_peer`] does with a stream once it has its first DATA
/// frame.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Answers 200 and echoes the stream.
    Answer,
    /// Resets the stream with REFUSED_STREAM: not processed.
    Refuse,
    /// Drops the whole connection without a word, as a crashing peer
    /// does after acting on the request.
    Crash,
}

/// A peer agent that answers a `CONNECT` only after its first DATA frame
/// has arrived, so a client that waits for the answer before sending its
/// workload's bytes never gets one. The n-th stream (over all
/// connections) follows `script[n]` (`Answer` past its end); the first
/// frame of every stream is reported.
async fn scripted_peer(
    script: Vec<Step>,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Bytes>) {
    let listener = tokio::net::TcpListener::bind(LOCALHOST).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut streams = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut connection) = h2::server::handshake(tcp).await else {
                continue;
            };
            'connection: while let Some(Ok((request, mut respond))) = connection.accept().await {
                let mut body = request.into_body();
                let Some(Ok(first)) = body.data().await else {
                    continue;
                };
                let _ = body.flow_control().release_capacity(first.len());
                let _ = seen.send(first.clone());
                let step = script.get(streams).copied().unwrap_or(Step::Answer);
                streams += 1;
                match step {
                    Step::Answer => {
                        let response = http::Response::new(());
                        let mut send = respond.send_response(response, false).unwrap();
                        tokio::spawn(async move {
                            send.send_data(first, false)?;
                            while let Some(more) = body.data().await {
                                let more = more?;
                                let _ = body.flow_control().release_capacity(more.len());
                                send.send_data(more, false)?;
                            }
                            send.send_data(Bytes::new(), true)
                        });
                    }
                    Step::Refuse => respond.send_reset(h2::Reason::REFUSED_STREAM),
                    Step::Crash => break 'connection,
                }
            }
        }
    });
    (addr, seen_rx)
}

#[tokio::test]
async fn the_first_bytes_leave_behind_the_connect_without_waiting_for_the_answer() {
    let (peer, mut seen) = scripted_peer(vec![Step::Answer]).await;
    let settings = TunnelSettings::default();
    let conn = client::handshake(TcpStream::connect(peer).await.unwrap(), &settings)
        .await
        .unwrap();
    let (mut app, mut agent_side) = tcp_pair().await;
    app.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let target: SocketAddr = "10.1.2.3:80".parse().unwrap();
    let tunnel = within(
        "the answer",
        conn.open(target, HeaderMap::new(), &mut agent_side),
    )
    .await
    .unwrap();
    assert_eq!(seen.recv().await.unwrap(), "GET / HTTP/1.1\r\n\r\n");
    let spliced = tokio::spawn(tunnel.splice(agent_side));
    app.shutdown().await.unwrap();
    within(
        "echo",
        read_exact_stream(&mut app, b"GET / HTTP/1.1\r\n\r\n"),
    )
    .await
    .unwrap();
    let stats = within("splice", spliced).await.unwrap().unwrap();
    assert_eq!(stats.socket_to_tunnel, 18, "the first read is counted");
    assert_eq!(stats.tunnel_to_socket, 18);
}

/// A workload writes `first`, then its agent opens a pooled tunnel to
/// `peer`: how the open ended, the application's end and the agent's.
async fn open_after_writing(
    peer: SocketAddr,
    first: &[u8],
) -> (Result<client::Tunnel, PoolError>, TcpStream, TcpStream) {
    let pool = Pool::new(TunnelSettings::default());
    let (mut app, mut agent_side) = tcp_pair().await;
    app.write_all(first).await.unwrap();
    let target: SocketAddr = "10.1.2.3:80".parse().unwrap();
    let connect = connector(peer, None);
    let opening = pool.open(&0u8, connect, target, HeaderMap::new(), &mut agent_side);
    let opened = within("the open", opening).await;
    (opened, app, agent_side)
}

/// The tunnel a retry opened carries the workload's bytes, echoed once:
/// the copy sent on the stream the peer did not process went nowhere.
async fn echoed_once(
    tunnel: client::Tunnel,
    mut app: TcpStream,
    agent_side: TcpStream,
    first: &[u8],
) {
    tokio::spawn(tunnel.splice(agent_side));
    app.shutdown().await.unwrap();
    within("echo", read_exact_stream(&mut app, first))
        .await
        .unwrap();
}

/// The open failed for good: the first bytes may have been acted on, so
/// no other connection was tried.
fn failed_for_good(opened: Result<client::Tunnel, PoolError>) {
    match opened {
        Err(PoolError::Open(error @ OpenError::Failed(_))) => assert!(!error.is_retryable()),
        other => panic!("expected the open to fail for good, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_stream_carries_its_first_bytes_again_on_the_retry() {
    let (peer, mut seen) = scripted_peer(vec![Step::Refuse]).await;
    let (opened, app, agent_side) = open_after_writing(peer, b"hello").await;
    let tunnel = opened.unwrap();
    assert_eq!(seen.recv().await.unwrap(), "hello", "the refused stream");
    assert_eq!(seen.recv().await.unwrap(), "hello", "the retried stream");
    echoed_once(tunnel, app, agent_side, b"hello").await;
}

#[tokio::test]
async fn first_bytes_are_not_sent_again_after_the_peer_may_have_acted_on_them() {
    let (peer, mut seen) = scripted_peer(vec![Step::Crash]).await;
    let (opened, _app, _agent_side) = open_after_writing(peer, b"transfer 100").await;
    failed_for_good(opened);
    assert_eq!(seen.recv().await.unwrap(), "transfer 100");
    assert!(
        seen.try_recv().is_err(),
        "the bytes were sent on one stream only"
    );
}

/// Which streams a [`going_away_peer`]'s GOAWAY says it processed.
#[derive(Debug, Clone, Copy)]
enum LastStream {
    /// None: the shutdown began before the stream arrived.
    None,
    /// The stream it took: it may have acted on it before going away.
    Taken,
}

/// A peer agent whose first connection goes away under the first stream:
/// it reads the stream's HEADERS and first DATA (reported), answers with
/// a graceful GOAWAY (NO_ERROR) naming `last` as the last stream it
/// processed, and closes. h2 cannot send that GOAWAY (it counts a stream
/// processed once its HEADERS arrive), so the frames are written by hand.
/// Later connections are passed to `answering`.
async fn going_away_peer(
    last: LastStream,
    answering: SocketAddr,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Bytes>) {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const DATA: u8 = 0;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const ACK: u8 = 1;
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        frame
    }
    let listener = tokio::net::TcpListener::bind(LOCALHOST).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut preface = [0u8; PREFACE.len()];
        tcp.read_exact(&mut preface).await.unwrap();
        assert_eq!(preface, PREFACE);
        tcp.write_all(&frame(SETTINGS, 0, &[])).await.unwrap();
        loop {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    tcp.write_all(&frame(SETTINGS, ACK, &[])).await.unwrap();
                }
                DATA if stream != 0 && !payload.is_empty() => {
                    let _ = seen.send(Bytes::from(payload));
                    let last = match last {
                        LastStream::None => 0,
                        LastStream::Taken => stream,
                    };
                    let mut goaway = last.to_be_bytes().to_vec();
                    goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                    tcp.write_all(&frame(GOAWAY, 0, &goaway)).await.unwrap();
                    break;
                }
                _ => {}
            }
        }
        drop(tcp);
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut upstream = TcpStream::connect(answering).await?;
                tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await
            });
        }
    });
    (addr, seen_rx)
}

#[tokio::test]
async fn a_stream_beyond_a_goaway_carries_its_first_bytes_again_on_a_new_connection() {
    let (answering, mut answered) = scripted_peer(vec![Step::Answer]).await;
    let (peer, mut unprocessed) = going_away_peer(LastStream::None, answering).await;
    let (opened, app, agent_side) = open_after_writing(peer, b"hello").await;
    let tunnel = opened.unwrap();
    assert_eq!(
        unprocessed.recv().await.unwrap(),
        "hello",
        "the stream the GOAWAY left unprocessed"
    );
    assert_eq!(
        answered.recv().await.unwrap(),
        "hello",
        "the retried stream, on a new connection"
    );
    echoed_once(tunnel, app, agent_side, b"hello").await;
}

#[tokio::test]
async fn first_bytes_are_not_sent_again_when_a_goaway_says_their_stream_was_processed() {
    let (answering, mut answered) = scripted_peer(vec![Step::Answer]).await;
    let (peer, mut taken) = going_away_peer(LastStream::Taken, answering).await;
    let (opened, _app, _agent_side) = open_after_writing(peer, b"transfer 100").await;
    failed_for_good(opened);
    assert_eq!(taken.recv().await.unwrap(), "transfer 100");
    assert!(
        answered.try_recv().is_err(),
        "the bytes were sent on one stream only"
    );
}

#[tokio::test]
async fn a_workload_reset_before_the_answer_resets_the_destination() {
    let (dest, mut outcomes) =
        destination(|mut stream| async move { read_a_reset(&mut stream).await }).await;
    let settings = TunnelSettings::default();
    let server = ServerAgent::start(settings.clone(), None, connect_to_target).await;
    let conn = connection(&server, &settings).await;
    let (app, mut agent_side) = tcp_pair().await;
    app.set_zero_linger().unwrap();
    drop(app);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let tunnel = conn
        .open(dest, HeaderMap::new(), &mut agent_side)
        .await
        .unwrap();
    match within("splice", tunnel.splice(agent_side)).await {
        Err(error) => assert!(matches!(error.cause, SpliceFailure::Socket(_)), "{error}"),
        Ok(stats) => panic!("expected a reset, the splice ended cleanly: {stats:?}"),
    }
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .expect("the destination sees a reset, not an end of stream");
}
