//! Slow and idle clients against the inbound listener: connections that
//! send nothing are closed once the first-bytes deadline passes, so a flood
//! of them cannot keep a well-behaved client out even when it outnumbers
//! `max_connections`; a connection with no request in flight (HTTP/1.1 or
//! HTTP/2) is closed after the idle timeout, and one carrying a long stream
//! is not; an HTTP/1.1 client that starts a request head and stalls is
//! closed after the header read timeout, which does not apply to a
//! keep-alive connection waiting between requests.

mod support;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use support::*;
use tokio::{
    io::AsyncReadExt,
    net::TcpStream,
    time::{Instant, timeout},
};
use trellis_sidecar::{Running, ServerLimits};

/// Raises this process's soft limit on open files to at least `need`, up
/// to the hard limit.
fn raise_fd_limit(need: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which we own.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) },
        0,
        "getrlimit(RLIMIT_NOFILE) failed"
    );
    if lim.rlim_cur >= need {
        return;
    }
    assert!(
        lim.rlim_max >= need,
        "this test needs {need} open files but the hard limit is {}; raise it (ulimit -Hn) and run again",
        lim.rlim_max
    );
    lim.rlim_cur = need;
    // SAFETY: setrlimit only reads the struct it is given.
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) },
        0,
        "setrlimit(RLIMIT_NOFILE) failed"
    );
}

/// A sidecar in front of a test application, with `limits` edited by `set`.
async fn sidecar_with(set: impl FnOnce(&mut ServerLimits)) -> (Running, Upstream) {
    let app = upstream("app").await;
    let (sc, _) = sidecar_with_config(&policy("order", app.addr.port(), json!({})), &[], |cfg| {
        set(&mut cfg.limits)
    })
    .await;
    (sc, app)
}

/// Waits until the peer closes `stream`: a read returns end of file or an
/// error (a reset). Data is not expected; it is read and ignored.
async fn closed_by_peer(mut stream: TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

const SILENT: usize = 2000;
/// Below `SILENT`, so the flood alone fills every slot; the rest of it
/// (100) fits the listen backlog (128, tokio's default), so no connect
/// waits on a SYN retransmission.
const MAX_CONNECTIONS: usize = 1900;
const FIRST_BYTES: Duration = Duration::from_secs(1);
/// Slack over the bounds the deadline implies, for a loaded machine.
const SLACK: Duration = Duration::from_secs(5);

/// How many deadline periods a connection can wait at most: the listener
/// takes `MAX_CONNECTIONS` at once and each silent one leaves after
/// `FIRST_BYTES`, so the `n`-th connection in line is taken within
/// `ceil(n / MAX_CONNECTIONS)` periods and then closed one period later.
fn rounds(n: usize) -> u32 {
    u32::try_from(n.div_ceil(MAX_CONNECTIONS)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_a_good_client_is_served_during_the_flood() {
    // Both ends of every connection live in this process, plus slack.
    raise_fd_limit(2 * SILENT as u64 + 1024);
    let (sc, app) = sidecar_with(|l| {
        l.max_connections = MAX_CONNECTIONS;
        l.first_bytes_timeout = FIRST_BYTES;
    })
    .await;
    // The application answers through the sidecar before the flood.
    let a = get(sc.inbound, "/before").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());

    // The flood: SILENT connections that never send a byte. At most
    // MAX_CONNECTIONS are accepted; the rest wait in the listen backlog.
    let start = Instant::now();
    let open = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        let stream = TcpStream::connect(sc.inbound).await.unwrap();
        open.fetch_add(1, Ordering::SeqCst);
        let open = open.clone();
        watchers.push(tokio::spawn(async move {
            closed_by_peer(stream).await;
            open.fetch_sub(1, Ordering::SeqCst);
            start.elapsed()
        }));
    }
    let flood_opened = start.elapsed();

    // A good client behind the whole flood in the backlog is taken once
    // the deadline frees slots, and keeps being served while the flood is
    // being shed.
    let good_bound = FIRST_BYTES * rounds(SILENT + 1) + SLACK;
    let mut served = Vec::new();
    loop {
        let still_open = open.load(Ordering::SeqCst);
        let sent = Instant::now();
        let a = timeout(good_bound, get(sc.inbound, "/during"))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "a good request got no answer in {good_bound:?} with {still_open} of {SILENT} \
                     silent connections open: the flood locked it out"
                )
            });
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        served.push((sent.elapsed(), still_open));
        if still_open == 0 {
            break;
        }
    }

    // Every silent connection was closed by the sidecar within its bound.
    let close_bound = FIRST_BYTES * (rounds(SILENT) + 1) + SLACK;
    let mut late = 0;
    let mut last = Duration::ZERO;
    for w in watchers {
        match timeout(close_bound.saturating_sub(start.elapsed()), w).await {
            Ok(closed_at) => last = last.max(closed_at.unwrap()),
            Err(_) => late += 1,
        }
    }
    assert_eq!(
        late, 0,
        "{late} of {SILENT} silent connections were still open {close_bound:?} after the flood began"
    );
    let slowest = served.iter().map(|(t, _)| *t).max().unwrap();
    let open_at_first = served[0].1;
    println!(
        "{SILENT} silent connections (max_connections {MAX_CONNECTIONS}, first-bytes deadline \
         {FIRST_BYTES:?}): opened in {flood_opened:?}, all closed by {last:?}; {} good requests \
         served meanwhile, the first with {open_at_first} silent open, slowest {slowest:?}",
        served.len()
    );
    assert!(
        app.hits() > served.len(),
        "the application saw the request before the flood and every good one"
    );
}

/// An h2c connection to `addr` whose connection task is returned: it ends
/// when the connection closes.
async fn h2_with_conn(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<TestBody>,
    impl Future<Output = ()>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let task = tokio::spawn(conn);
    (send, async move {
        let _ = task.await;
    })
}

const IDLE: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let (sc, _app) = sidecar_with(|l| l.idle_timeout = IDLE).await;
    let began = Instant::now();
    let (_send, closed) = h2_with_conn(sc.inbound).await;
    // The client answers pings, so only the idle timeout can end it.
    timeout(IDLE + SLACK, closed).await.unwrap_or_else(|_| {
        panic!(
            "an HTTP/2 connection without streams was still open after {:?}",
            IDLE + SLACK
        )
    });
    let lasted = began.elapsed();
    // The sidecar's clock starts after the connect began, so it cannot
    // have run out sooner than IDLE after `began`.
    assert!(
        lasted >= IDLE,
        "closed after {lasted:?}, before the idle timeout {IDLE:?}"
    );
    println!("idle HTTP/2 connection closed after {lasted:?} (idle timeout {IDLE:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_with_a_long_stream_stays_open() {
    let (sc, _app) = sidecar_with(|l| l.idle_timeout = IDLE).await;
    let (mut send, closed) = h2_with_conn(sc.inbound).await;
    tokio::pin!(closed);

    // A response that takes three idle timeouts to start.
    let slow = 3 * IDLE;
    let a = h2_send(
        &mut send,
        Request::get(format!("http://order/slow?ms={}", slow.as_millis()))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.text(), "slow done");

    // A request body streamed over three idle timeouts, echoed back.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    let body = StreamBody::new(tokio_stream_from(rx)).boxed();
    let chunks = 12;
    let every = 3 * IDLE / chunks;
    let writer = tokio::spawn(async move {
        for i in 0..chunks {
            tokio::time::sleep(every).await;
            tx.send(Ok(Frame::data(Bytes::from(format!("chunk{i};")))))
                .await
                .unwrap();
        }
    });
    let a = h2_send(
        &mut send,
        Request::post("http://order/echo").body(body).unwrap(),
    )
    .await;
    writer.await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let expected: String = (0..chunks).map(|i| format!("chunk{i};")).collect();
    assert_eq!(a.text(), expected);

    // Still open: another request goes through on the same connection.
    let a = h2_send(
        &mut send,
        Request::get("http://order/after").body(full("")).unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let idle_from = Instant::now();

    // With its streams done the connection is idle, and closed once the
    // idle timeout passes.
    timeout(IDLE + SLACK, &mut closed)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the connection was still open {:?} after its last stream ended",
                IDLE + SLACK
            )
        });
    println!(
        "HTTP/2 connection kept through a {slow:?} response and a {:?} upload; closed {:?} after \
         its last stream (idle timeout {IDLE:?})",
        3 * IDLE,
        idle_from.elapsed()
    );
}

/// A stream of the frames received on `rx`.
fn tokio_stream_from<T>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + Sync + 'static
where
    T: Send + 'static,
{
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

/// An HTTP/1.1 connection to `addr` whose connection task is returned: it
/// ends when the connection closes.
async fn h1_with_conn(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<TestBody>,
    impl Future<Output = ()>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    (send, async move {
        let _ = task.await;
    })
}

/// One request on an HTTP/1.1 connection; the answer's status and body.
async fn h1_get(
    send: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    path: &str,
) -> Result<(StatusCode, String), hyper::Error> {
    send.ready().await?;
    let rsp = send
        .send_request(
            Request::get(format!("http://order{path}"))
                .body(full(""))
                .unwrap(),
        )
        .await?;
    let status = rsp.status();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

const HEAD: Duration = Duration::from_secs(1);

/// Pooling clients (hyper's and Go's keep idle connections 90 s, this
/// sidecar's own pool 30 s) reuse a connection long after the header read
/// timeout; were the server to close it then, a request sent as the close
/// crosses it fails on a connection the client believed open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_outlives_the_header_read_timeout() {
    let (sc, _app) = sidecar_with(|l| l.header_read_timeout = HEAD).await;
    let (mut send, closed) = h1_with_conn(sc.inbound).await;
    tokio::pin!(closed);
    let (status, body) = h1_get(&mut send, "/first").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");

    let wait = 3 * HEAD;
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = &mut closed => panic!(
            "the server closed a keep-alive connection idle for less than {wait:?}, with a \
             header read timeout of {HEAD:?} and an idle timeout of 5 min"
        ),
    }
    let (status, body) = h1_get(&mut send, "/second")
        .await
        .unwrap_or_else(|e| panic!("the second request on the connection failed: {e}"));
    assert_eq!(status, StatusCode::OK, "{body}");
    println!(
        "a keep-alive connection idle for {wait:?} (header read timeout {HEAD:?}) served again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_head_is_closed_after_the_header_read_timeout() {
    let (sc, _app) = sidecar_with(|l| l.header_read_timeout = HEAD).await;
    // On a fresh connection, and on a kept-alive one after a first request.
    for served_first in [false, true] {
        let mut stream = TcpStream::connect(sc.inbound).await.unwrap();
        if served_first {
            use tokio::io::AsyncWriteExt;
            stream
                .write_all(b"GET /first HTTP/1.1\r\nHost: order\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&buf[..n])
            );
            // Idle for longer than the header read timeout first.
            tokio::time::sleep(2 * HEAD).await;
        }
        use tokio::io::AsyncWriteExt;
        stream
            .write_all(b"GET /stalled HTTP/1.1\r\nHost: ord")
            .await
            .unwrap();
        let began = Instant::now();
        timeout(HEAD + SLACK, closed_by_peer(stream))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "a request head stalled half-way was still open after {:?} (served first: \
                     {served_first})",
                    HEAD + SLACK
                )
            });
        println!(
            "a stalled head closed after {:?} (header read timeout {HEAD:?}, served first: \
             {served_first})",
            began.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_connection_is_closed_after_the_idle_timeout() {
    let (sc, _app) = sidecar_with(|l| l.idle_timeout = IDLE).await;
    let (mut send, closed) = h1_with_conn(sc.inbound).await;
    let (status, body) = h1_get(&mut send, "/first").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let idle_from = Instant::now();
    timeout(IDLE + SLACK, closed).await.unwrap_or_else(|_| {
        panic!(
            "an HTTP/1.1 connection with no request was still open after {:?}",
            IDLE + SLACK
        )
    });
    let lasted = idle_from.elapsed();
    assert!(
        lasted >= IDLE,
        "closed after {lasted:?}, before the idle timeout {IDLE:?}"
    );
    println!("idle HTTP/1.1 connection closed after {lasted:?} (idle timeout {IDLE:?})");
}
