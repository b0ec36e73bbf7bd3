//! Bulk tunnels end to end on loopback: application → client agent → a TLS
//! connection of its own (HTTP/1.1 `CONNECT`) → server agent →
//! destination. Where the kernel has TLS the records are the kernel's and
//! the bytes are spliced; elsewhere rustls carries them: each test checks
//! which one ran ([`expected_records`]), and the kernel matrix's VMs, whose
//! kernels have TLS, run them too.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::bulk::{self, BulkError, BulkTls as _, RecordReader};
use super::ktls::{self, KernelTls, Records};
use super::server::Refusal;
use super::testing::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const PATIENCE: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress in {PATIENCE:?}"))
}

/// Kernel TLS where the kernel takes the `tls` upper-layer protocol (asked
/// the way the agent asks, on a connected socket); always in the kernel
/// matrix's VMs, whose kernels must have it.
async fn expected_records() -> Records {
    if std::env::var_os("MESH_TEST_IN_VM").is_some() {
        return Records::Kernel;
    }
    let (a, _b) = tcp_pair().await;
    match nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::TcpUlp::default(), b"tls") {
        Ok(()) => Records::Kernel,
        Err(_) => Records::User,
    }
}

/// What the server agent does with a `CONNECT`.
#[derive(Clone, Copy)]
enum Serve {
    Connect,
    Refuse,
    /// Answers 200 and, once the application's first bytes arrive
    /// through the tunnel (so the source carries it by then), sends a few
    /// and ends the TCP connection with no close_notify, as an attacker on
    /// the path forging a FIN would.
    Truncate,
}

struct Bed {
    /// Where applications connect (the outbound listener's role).
    agent: SocketAddr,
    /// Each agent's account of where a tunnel's records were encrypted.
    started: mpsc::UnboundedReceiver<(&'static str, Records)>,
    /// The client agent's outcome of each `CONNECT`.
    opened: mpsc::UnboundedReceiver<Result<(), BulkError>>,
}

impl Bed {
    /// Both agents carried the tunnel the same way, the expected one.
    async fn both_carried_by(&mut self, expected: Records) {
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(
                within("an agent starts carrying", self.started.recv())
                    .await
                    .unwrap(),
            );
        }
        seen.sort_by_key(|(who, _)| *who);
        assert_eq!(seen, [("client", expected), ("server", expected)]);
    }
}

async fn bulk_agents(dest: SocketAddr, serve: Serve) -> Bed {
    bulk_agents_with(dest, serve, || KernelTls::new(true)).await
}

/// Both agents with `kernel` as their kernel TLS.
async fn bulk_agents_with(dest: SocketAddr, serve: Serve, kernel: fn() -> KernelTls) -> Bed {
    let (acceptor, connector) = bulk_mutual_tls();
    let (started_tx, started) = mpsc::unbounded_channel();
    let (opened_tx, opened) = mpsc::unbounded_channel();

    let server = TcpListener::bind(LOCALHOST).await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let started_by_server = started_tx.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = server.accept().await {
            let (acceptor, started) = (acceptor.clone(), started_by_server.clone());
            tokio::spawn(async move {
                let tls = acceptor.accept(RecordReader::new(tcp)).await.unwrap();
                if let Serve::Truncate = serve {
                    truncate_after_answering(tls).await;
                    return;
                }
                let handler = move |request| async move {
                    match serve {
                        Serve::Refuse => Err(Refusal::new(
                            StatusCode::FORBIDDEN,
                            "denied by rule shop/deny-bulk",
                        )),
                        _ => connect_to_target(request).await,
                    }
                };
                let kernel = kernel();
                let _ = bulk::serve(tls, PATIENCE, handler, &kernel, |r| {
                    let _ = started.send(("server", r));
                })
                .await;
            });
        }
    });

    let apps = TcpListener::bind(LOCALHOST).await.unwrap();
    let agent = apps.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((app, _)) = apps.accept().await {
            let (connector, started, opened) =
                (connector.clone(), started_tx.clone(), opened_tx.clone());
            tokio::spawn(async move {
                let tcp = TcpStream::connect(server_addr).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("node-b.mesh.test").unwrap();
                let tls = connector
                    .connect(name, RecordReader::new(tcp))
                    .await
                    .unwrap();
                let kernel = kernel();
                match bulk::open(tls, dest, PATIENCE, &kernel).await {
                    Ok((tls, rest)) => {
                        let _ = opened.send(Ok(()));
                        // As the source's agent carries them.
                        let reads = ktls::WorkloadReads::Read;
                        let _ = ktls::carry(tls, rest, app, reads, |r| {
                            let _ = started.send(("client", r));
                        })
                        .await;
                    }
                    Err(e) => {
                        let _ = app.set_zero_linger();
                        let _ = opened.send(Err(e));
                    }
                }
            });
        }
    });
    Bed {
        agent,
        started,
        opened,
    }
}

/// The `Serve::Truncate` server.
async fn truncate_after_answering(mut tls: tokio_rustls::server::TlsStream<RecordReader>) {
    let mut buf = vec![0; 1024];
    let _ = tls.read(&mut buf).await.unwrap();
    tls.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    tls.flush().await.unwrap();
    tls.io_mut().unbound();
    assert!(tls.read(&mut buf).await.unwrap() > 0);
    tls.write_all(b"partial").await.unwrap();
    tls.flush().await.unwrap();
    let (io, _) = tls.into_inner();
    drop(io);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tunnels_carry_bytes_exactly_both_ways_at_once() {
    let records = expected_records().await;
    for size in [1, 64 * KIB + 1, 8 * MIB, 64 * MIB] {
        let up = random_bytes(size, 11);
        let down = random_bytes(size, 12);
        let (dest, mut outcomes) = exchange_destination(up.clone(), down.clone()).await;
        let mut bed = bulk_agents(dest, Serve::Connect).await;
        let app = TcpStream::connect(bed.agent).await.unwrap();
        within("application", exchange(app, up, down))
            .await
            .unwrap_or_else(|e| panic!("{size} bytes: the application's side: {e}"));
        within("destination", outcomes.recv())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{size} bytes: the destination's side: {e}"));
        bed.both_carried_by(records).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_is_carried_as_a_half_close() {
    let request = random_bytes(300 * KIB, 21);
    let reply = random_bytes(200 * KIB, 22);
    let (dest, mut outcomes) = answer_after_request(request.clone(), reply.clone()).await;
    let mut bed = bulk_agents(dest, Serve::Connect).await;
    let mut app = TcpStream::connect(bed.agent).await.unwrap();
    within("application", async {
        write_and_shut(&mut app, &request).await.unwrap();
        read_exact_stream(&mut app, &reply).await.unwrap();
    })
    .await;
    within("destination", outcomes.recv())
        .await
        .unwrap()
        .expect("the destination read the request to its end, then answered");
    bed.both_carried_by(expected_records().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_carried_as_a_reset_either_way() {
    // The application resets: the destination sees a reset, not an end.
    let (dest, mut outcomes) = destination(|mut stream| async move {
        let mut buf = vec![0; 64 * KIB];
        loop {
            if stream.read(&mut buf).await? == 0 {
                return Err(io::Error::other("a clean end instead of a reset"));
            }
        }
    })
    .await;
    let mut bed = bulk_agents(dest, Serve::Connect).await;
    let mut app = TcpStream::connect(bed.agent).await.unwrap();
    app.write_all(&random_bytes(100 * KIB, 31)).await.unwrap();
    bed.both_carried_by(expected_records().await).await;
    app.set_zero_linger().unwrap();
    drop(app);
    let seen = within("destination", outcomes.recv()).await.unwrap();
    assert_eq!(
        seen.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset)
    );

    // The destination resets: the application sees a reset.
    let (dest, _outcomes) = destination(|stream| async move {
        let mut stream = stream;
        stream.write_all(b"first bytes").await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream.set_zero_linger()?;
        Ok(())
    })
    .await;
    let mut bed = bulk_agents(dest, Serve::Connect).await;
    let mut app = TcpStream::connect(bed.agent).await.unwrap();
    let mut got = Vec::new();
    let read = within("application", app.read_to_end(&mut got)).await;
    assert_eq!(got, b"first bytes");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset)
    );
    bed.both_carried_by(expected_records().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reaches_the_source_with_its_reason() {
    let dest = echo_destination().await;
    let mut bed = bulk_agents(dest, Serve::Refuse).await;
    let mut app = TcpStream::connect(bed.agent).await.unwrap();
    match within("the answer", bed.opened.recv()).await.unwrap() {
        Err(BulkError::Refused { status, reason }) => {
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(reason, "denied by rule shop/deny-bulk");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut got = Vec::new();
    let read = within("application", app.read_to_end(&mut got)).await;
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_end_without_close_notify_resets_the_application() {
    let dest = echo_destination().await;
    let mut bed = bulk_agents(dest, Serve::Truncate).await;
    let mut app = TcpStream::connect(bed.agent).await.unwrap();
    app.write_all(b"go").await.unwrap();
    let mut got = Vec::new();
    let read = within("application", app.read_to_end(&mut got)).await;
    assert_eq!(got, b"partial", "the bytes before the cut still arrive");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset),
        "a truncated stream must not look like a clean end"
    );
    let (who, records) = within("the client agent", bed.started.recv())
        .await
        .unwrap();
    assert_eq!((who, records), ("client", expected_records().await));
}

/// Kernels before 6.13 cannot give a kernel TLS socket new keys, so a bulk
/// tunnel in the kernel is reset before its cipher's record limit (lowered
/// here to 64 records): both ends see a reset, never a clean end that would
/// pass a cut-off transfer for a whole one. In user space rustls updates
/// its keys itself, and the same transfer is carried whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_in_the_kernel_is_reset_before_its_record_limit() {
    let request = random_bytes(4 * MIB, 41);
    let reply = random_bytes(64 * KIB, 42);
    let (dest, mut outcomes) = answer_after_request(request.clone(), reply.clone()).await;
    let mut bed = bulk_agents_with(dest, Serve::Connect, || {
        KernelTls::with_record_limit(true, 64)
    })
    .await;
    let mut app = TcpStream::connect(bed.agent).await.unwrap();
    let application = within("application", async {
        write_and_shut(&mut app, &request).await?;
        read_exact_stream(&mut app, &reply).await
    })
    .await;
    let destination = within("destination", outcomes.recv()).await.unwrap();
    let records = expected_records().await;
    bed.both_carried_by(records).await;
    match records {
        Records::Kernel => {
            let kind = application.expect_err("a whole 4 MiB in 64 records").kind();
            assert!(
                matches!(
                    kind,
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ),
                "the application saw {kind:?}, not a reset"
            );
            let kind = destination.expect_err("the request arrived whole").kind();
            assert_eq!(kind, io::ErrorKind::ConnectionReset);
        }
        Records::User => {
            application.expect("carried whole in user space");
            destination.expect("received whole in user space");
        }
    }
}
