//! gRPC outcomes through the outbound stack: a call answered `200` with a
//! failing `grpc-status` — in a trailers-only response or in the trailers
//! after a message — is a failure for the breaker, outlier ejection,
//! retries and metrics, and a client's `grpc-timeout` bounds the call.
//!
//! The upstream is a small h2c server that answers like tonic and grpc-go:
//! it reads the request to its end, then answers with the status the test
//! sets, either way.

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{TestBody, full};
use tokio::net::TcpListener;

/// Where the fake server puts its status.
const TRAILERS_ONLY: u8 = 0;
const IN_TRAILERS: u8 = 1;

/// A gRPC server that answers every call with `code`, `failures` times,
/// then with `OK`.
#[derive(Clone)]
struct GrpcUpstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    code: Arc<AtomicU8>,
    style: Arc<AtomicU8>,
    failures: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
}

impl GrpcUpstream {
    async fn start(code: u8, style: u8, failures: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Self {
            addr: listener.local_addr().unwrap(),
            calls: Arc::default(),
            connections: Arc::default(),
            code: Arc::new(AtomicU8::new(code)),
            style: Arc::new(AtomicU8::new(style)),
            failures: Arc::new(AtomicUsize::new(failures)),
            delay_ms: Arc::default(),
        };
        let state = up.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| state.clone().answer(req));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        up
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    async fn answer(self, req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
        // Read the whole request message first, as a gRPC server does
        // before it calls the handler.
        let _ = req.into_body().collect().await;
        self.calls.fetch_add(1, Ordering::SeqCst);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let code = if failing {
            self.code.load(Ordering::SeqCst)
        } else {
            0
        };
        let rsp = Response::builder().header("content-type", "application/grpc");
        Ok(if self.style.load(Ordering::SeqCst) == TRAILERS_ONLY {
            rsp.header("grpc-status", code.to_string())
                .body(full(""))
                .unwrap()
        } else {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", code.to_string().parse().unwrap());
            let frames = vec![
                Ok::<_, support::BoxError>(Frame::data(grpc_message(b"reply"))),
                Ok(Frame::trailers(trailers)),
            ];
            rsp.body(StreamBody::new(futures::stream::iter(frames)).boxed())
                .unwrap()
        })
    }
}

/// One length-prefixed gRPC message.
fn grpc_message(payload: &[u8]) -> Bytes {
    let mut m = vec![0u8];
    m.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    m.extend_from_slice(payload);
    m.into()
}

/// A sidecar whose static discovery sends `user` to `up`, with `dependency`
/// as the user dependency's settings.
async fn sidecar_for(up: &GrpcUpstream, dependency: serde_json::Value) -> trellis_sidecar::Running {
    let mut dep = serde_json::json!({"name": "user"});
    dep.as_object_mut()
        .unwrap()
        .extend(dependency.as_object().unwrap().clone());
    let policy = serde_json::json!({
        "service": "order",
        "namespace": "default",
        "appPort": 1,
        "dependencies": [dep],
    });
    let (running, _) = support::sidecar(&policy.to_string(), &[("user", &[up.addr])]).await;
    running
}

/// What the app saw of one call.
struct Answer {
    status: u16,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    proxy_error: Option<String>,
    breaker: Option<String>,
}

/// One unary call to `user` through the outbound listener at `outbound`,
/// over h2c like a gRPC client. The request body is a stream with no
/// declared length, as gRPC clients send it.
async fn call(outbound: SocketAddr, extra: &[(&str, &str)]) -> Answer {
    let mut send = support::h2_connect(outbound).await;
    let frames = vec![Ok::<_, support::BoxError>(Frame::data(grpc_message(
        b"request",
    )))];
    let mut req = Request::post("http://user/trellis.User/Get")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let req = req
        .body(StreamBody::new(futures::stream::iter(frames)).boxed())
        .unwrap();
    send.ready().await.unwrap();
    let rsp = send.send_request(req).await.unwrap();
    let status = rsp.status().as_u16();
    let header = |k: &str| rsp.headers().get(k).map(|v| v.to_str().unwrap().to_owned());
    let (mut grpc_status, proxy_error) = (header("grpc-status"), header("x-trellis-proxy-error"));
    let (grpc_message, breaker) = (header("grpc-message"), header("x-trellis-breaker"));
    let collected = rsp.into_body().collect().await.unwrap();
    if let Some(t) = collected.trailers() {
        grpc_status = t.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    }
    Answer {
        status,
        grpc_status,
        grpc_message,
        proxy_error,
        breaker,
    }
}

/// `consecutiveFailures: 5` trips on the sixth failure in a row (gobreaker:
/// "more than"), after which the breaker answers: of ten calls, exactly six
/// reach the upstream.
async fn breaker_opens_on(style: u8) {
    let up = GrpcUpstream::start(14, style, usize::MAX).await;
    let sidecar = sidecar_for(
        &up,
        serde_json::json!({
            "retry": {"attempts": 1},
            "circuitBreaker": {"consecutiveFailures": 5, "openFor": "60s"},
        }),
    )
    .await;
    let mut refused = 0;
    for _ in 0..10 {
        let a = call(sidecar.outbound, &[]).await;
        if a.proxy_error.as_deref() == Some("circuit-open") {
            refused += 1;
            // Answered in gRPC's terms: a trailers-only UNAVAILABLE naming
            // the dependency, which a gRPC client reads as such.
            assert_eq!((a.status, a.grpc_status.as_deref()), (200, Some("14")));
            assert_eq!(a.breaker.as_deref(), Some("user.default"));
            let message = a.grpc_message.unwrap_or_default();
            assert!(
                message.contains("circuit breaker") && message.contains("user.default"),
                "{message}"
            );
        } else {
            assert_eq!((a.status, a.grpc_status.as_deref()), (200, Some("14")));
        }
    }
    assert_eq!(up.calls(), 6, "the breaker lets six failures through");
    assert_eq!(refused, 4, "then answers itself");
    // The application saw ten calls end UNAVAILABLE: six from the server,
    // four from the open breaker.
    let metrics = support::get(sidecar.admin, "/metrics").await.text();
    assert!(
        metrics.contains(
            r#"trellis_grpc_responses_total{direction="outbound",service="user.default",grpc_code="UNAVAILABLE"} 10"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn unavailable_in_a_trailers_only_response_opens_the_breaker() {
    breaker_opens_on(TRAILERS_ONLY).await;
}

#[tokio::test]
async fn unavailable_in_the_trailers_opens_the_breaker() {
    breaker_opens_on(IN_TRAILERS).await;
}

/// A code that is an answer about the request (NOT_FOUND) is neither a
/// breaker failure nor retried.
#[tokio::test]
async fn not_found_is_an_answer_not_a_failure() {
    let up = GrpcUpstream::start(5, IN_TRAILERS, usize::MAX).await;
    let sidecar = sidecar_for(
        &up,
        serde_json::json!({"circuitBreaker": {"consecutiveFailures": 1}}),
    )
    .await;
    for _ in 0..5 {
        let a = call(sidecar.outbound, &[]).await;
        assert_eq!((a.status, a.grpc_status.as_deref()), (200, Some("5")));
    }
    assert_eq!(up.calls(), 5, "one try each, none refused");
    let metrics = support::get(sidecar.admin, "/metrics").await.text();
    assert!(metrics.contains(r#"grpc_code="NOT_FOUND"} 5"#), "{metrics}");
}

/// UNAVAILABLE twice, then OK: with the default three attempts the call
/// succeeds on its third try, its body (a stream of unknown length) sent
/// again each time.
async fn unavailable_is_retried(style: u8) {
    let up = GrpcUpstream::start(14, style, 2).await;
    let sidecar = sidecar_for(
        &up,
        serde_json::json!({"retry": {"backoff": {"base": "1ms", "max": "5ms"}}}),
    )
    .await;
    let a = call(sidecar.outbound, &[]).await;
    assert_eq!((a.status, a.grpc_status.as_deref()), (200, Some("0")));
    assert_eq!(up.calls(), 3);
    let metrics = support::get(sidecar.admin, "/metrics").await.text();
    assert!(
        metrics.contains(r#"trellis_retries_total{service="user.default",reason="grpc"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn unavailable_in_a_trailers_only_response_is_retried() {
    unavailable_is_retried(TRAILERS_ONLY).await;
}

#[tokio::test]
async fn unavailable_in_the_trailers_is_retried() {
    unavailable_is_retried(IN_TRAILERS).await;
}

/// Only the configured codes are retried: with `grpcCodes: [INTERNAL]`,
/// UNAVAILABLE is final and INTERNAL is retried.
#[tokio::test]
async fn the_retried_codes_are_configurable() {
    let up = GrpcUpstream::start(14, TRAILERS_ONLY, 1).await;
    let dep = serde_json::json!({
        "retry": {"grpcCodes": ["INTERNAL"], "backoff": {"base": "1ms", "max": "5ms"}},
    });
    let sidecar = sidecar_for(&up, dep).await;
    let a = call(sidecar.outbound, &[]).await;
    assert_eq!(a.grpc_status.as_deref(), Some("14"));
    assert_eq!(up.calls(), 1, "UNAVAILABLE is not in grpcCodes");

    up.code.store(13, Ordering::SeqCst);
    up.failures.store(1, Ordering::SeqCst);
    let a = call(sidecar.outbound, &[]).await;
    assert_eq!(a.grpc_status.as_deref(), Some("0"));
    assert_eq!(up.calls(), 3, "INTERNAL is retried once, then OK");
}

/// The client's `grpc-timeout` is shorter than the policy's timeout, so it
/// is the call's deadline: the sidecar answers DEADLINE_EXCEEDED when it
/// passes rather than waiting for the upstream, which takes 5 s.
#[tokio::test]
async fn a_grpc_timeout_bounds_the_call() {
    let up = GrpcUpstream::start(0, TRAILERS_ONLY, 0).await;
    up.delay_ms.store(5_000, Ordering::SeqCst);
    let sidecar = sidecar_for(&up, serde_json::json!({"timeout": "30s"})).await;
    let started = Instant::now();
    let a = call(sidecar.outbound, &[("grpc-timeout", "200m")]).await;
    let took = started.elapsed();
    assert_eq!(
        (a.status, a.grpc_status.as_deref(), a.proxy_error.as_deref()),
        (200, Some("4"), Some("timeout"))
    );
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(4),
        "answered after {took:?}: the 200 ms client deadline, not the upstream's 5 s"
    );
}

/// Many unary calls over the sidecar's one pooled connection to the
/// upstream: h2 servers end a connection (GOAWAY ENHANCE_YOUR_CALM) that
/// sends more than 100 empty DATA frames without END_STREAM in its life, so
/// the sidecar must never forward the empty end-of-stream chunk of a
/// client's body as a frame of its own.
#[tokio::test]
async fn many_calls_share_one_upstream_connection_without_empty_frames() {
    let up = GrpcUpstream::start(0, TRAILERS_ONLY, 0).await;
    let sidecar = sidecar_for(&up, serde_json::json!({})).await;
    for i in 0..250 {
        let a = call(sidecar.outbound, &[]).await;
        assert_eq!(
            (a.status, a.grpc_status.as_deref()),
            (200, Some("0")),
            "call {i}: {:?} {:?}",
            a.proxy_error,
            a.grpc_message
        );
    }
    assert_eq!(up.calls(), 250, "no call was tried twice");
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "the upstream connection lasted"
    );
}
