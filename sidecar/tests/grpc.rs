//! Real gRPC through two sidecars: a tonic client → sidecar A (outbound,
//! static discovery resolves `greeter` to sidecar B's inbound) → sidecar B
//! (inbound, policy protocol GRPC) → a tonic server as B's application.
//!
//! The service is `grpc.health.v1.Health` from `tonic-health`, which ships
//! its generated code, so no protoc is needed: unary `Check`, the
//! server-streaming `Watch`, and a gRPC error status carried in trailers.

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tonic::{
    Code, Request, Status,
    transport::{Channel, Endpoint, Server, server::TcpIncoming},
};
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_check_response, health_client::HealthClient},
    server::HealthReporter,
};
use trellis_sidecar::Running;

/// What the application saw of each request's metadata.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, String)>>>);

impl Seen {
    fn last(&self) -> (String, String) {
        self.0
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request reached the app")
    }
}

/// The application: a tonic server with the health service on an ephemeral
/// loopback port. An interceptor records `x-forwarded-for` and
/// `x-request-id`, which only the sidecars add.
async fn grpc_app() -> (SocketAddr, HealthReporter, Seen) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let seen = Seen::default();
    let record = seen.clone();
    let service =
        tonic::service::interceptor::InterceptedService::new(service, move |req: Request<()>| {
            let get = |k: &str| {
                req.metadata()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            record
                .0
                .lock()
                .unwrap()
                .push((get("x-forwarded-for"), get("x-request-id")));
            Ok::<_, Status>(req)
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    (addr, reporter, seen)
}

/// Sidecar B in front of the app (protocol GRPC: h2c to the app), and
/// sidecar A whose static discovery sends `greeter` to B's inbound.
async fn two_sidecars(app: SocketAddr) -> (Running, Running) {
    let b_policy = serde_json::json!({
        "service": "greeter",
        "namespace": "default",
        "appPort": app.port(),
        "protocol": "GRPC",
    });
    let (b, _) = support::sidecar(&b_policy.to_string(), &[]).await;
    let a_policy = serde_json::json!({"service": "client", "namespace": "default", "appPort": 1});
    let (a, _) = support::sidecar(&a_policy.to_string(), &[("greeter", &[b.inbound])]).await;
    (a, b)
}

/// A tonic channel whose `:authority` is the service name (`greeter`) while
/// every connection goes to sidecar A's outbound listener, as an app whose
/// dependencies all resolve to its sidecar would connect.
async fn client_via(outbound: SocketAddr) -> HealthClient<Channel> {
    let connector = tower::service_fn(move |_: http::Uri| async move {
        TcpStream::connect(outbound).await.map(TokioIo::new)
    });
    let channel = Endpoint::from_static("http://greeter")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .expect("the tonic channel connects to sidecar A");
    HealthClient::new(channel)
}

async fn check(
    client: &mut HealthClient<Channel>,
    service: &str,
) -> Result<health_check_response::ServingStatus, Status> {
    let rsp = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(rsp.into_inner().status())
}

#[tokio::test]
async fn tonic_unary_through_two_sidecars() {
    use health_check_response::ServingStatus as S;
    let (app, reporter, seen) = grpc_app().await;
    let (a, _b) = two_sidecars(app).await;
    let mut client = client_via(a.outbound).await;

    reporter
        .set_service_status("trellis.Greeter", ServingStatus::Serving)
        .await;
    assert_eq!(
        check(&mut client, "trellis.Greeter").await.unwrap(),
        S::Serving
    );
    // The overall server status ("") is SERVING from the start.
    assert_eq!(check(&mut client, "").await.unwrap(), S::Serving);

    // The request crossed sidecar B's inbound (x-forwarded-for) and got an
    // x-request-id on the way.
    let (xff, request_id) = seen.last();
    assert_eq!(xff, "127.0.0.1", "B's inbound adds x-forwarded-for");
    assert_eq!(request_id.len(), 36, "a v4 UUID: {request_id:?}");

    reporter
        .set_service_status("trellis.Greeter", ServingStatus::NotServing)
        .await;
    assert_eq!(
        check(&mut client, "trellis.Greeter").await.unwrap(),
        S::NotServing
    );

    // An error status travels in trailers (a trailers-only response): the
    // health service answers NotFound for a service it does not know.
    let err = check(&mut client, "trellis.Nobody").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Many calls multiplexed on the one HTTP/2 connection.
    let calls = (0..32).map(|_| {
        let mut c = client.clone();
        async move { check(&mut c, "").await }
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap(), S::Serving);
    }
}

#[tokio::test]
async fn tonic_server_stream_through_two_sidecars() {
    use health_check_response::ServingStatus as S;
    let (app, reporter, _) = grpc_app().await;
    let (a, _b) = two_sidecars(app).await;
    let mut client = client_via(a.outbound).await;
    reporter
        .set_service_status("trellis.Greeter", ServingStatus::Serving)
        .await;

    let mut stream = client
        .watch(HealthCheckRequest {
            service: "trellis.Greeter".into(),
        })
        .await
        .expect("Watch starts")
        .into_inner();
    // The current status first, then each change, as they happen: the
    // sidecars forward the response body frame by frame, not buffered.
    assert_eq!(next(&mut stream).await, Some(S::Serving));
    reporter
        .set_service_status("trellis.Greeter", ServingStatus::NotServing)
        .await;
    assert_eq!(next(&mut stream).await, Some(S::NotServing));
    reporter
        .set_service_status("trellis.Greeter", ServingStatus::Serving)
        .await;
    assert_eq!(next(&mut stream).await, Some(S::Serving));

    // Unary calls still work beside the open stream on the same connection.
    assert_eq!(check(&mut client, "").await.unwrap(), S::Serving);

    // A Watch the server refuses: the status comes back in trailers.
    let err = client
        .watch(HealthCheckRequest {
            service: "trellis.Nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Dropping the stream cancels it (the health service never ends it);
    // the connection through both sidecars keeps serving.
    drop(stream);
    assert_eq!(check(&mut client, "").await.unwrap(), S::Serving);
}

/// The next message of a Watch stream, within 5 s.
async fn next(
    s: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> Option<health_check_response::ServingStatus> {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a Watch update arrives within 5 s")
        .expect("no stream error")
        .map(|m| m.status())
}

/// An h2c application answering every request with a gRPC-style response
/// of `frames` DATA frames of 10 bytes each (no END_STREAM on them; empty
/// trailers end the stream), as a server streaming small messages sends.
async fn small_frames_app(frames: usize) -> SocketAddr {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = hyper::service::service_fn(move |_req| async move {
                let data = (0..frames).map(|_| {
                    Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from_static(
                        b"0123456789",
                    )))
                });
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let body = StreamBody::new(futures::stream::iter(
                    data.chain(std::iter::once(Ok(Frame::trailers(trailers)))),
                ));
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)
                        .unwrap(),
                )
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// A client that takes a response slowly (a small HTTP/2 window, read
/// after a pause) makes the sidecar hold the upstream's DATA frames until
/// it can pass them on. A thousand small frames held at once must not make
/// the sidecar's HTTP/2 client close its connection to the upstream: h2
/// limits the memory of buffered small frames to half the connection's
/// flow-control window, and with a 64 KiB window (where an adaptive window
/// starts) that is about 130 frames, which every connection carrying many
/// small gRPC messages reaches under load. In the benchmark at 8,000 gRPC
/// calls/s this closed the connection (`GOAWAY ENHANCE_YOUR_CALM
/// too_many_data_frames`), failed every call on it, and opened the breaker.
#[tokio::test]
async fn small_frames_held_for_a_slow_client_keep_the_upstream_connection() {
    const FRAMES: usize = 1000;
    let app = small_frames_app(FRAMES).await;
    let policy = serde_json::json!({
        "service": "streamer",
        "namespace": "default",
        "appPort": app.port(),
        "protocol": "GRPC",
    });
    let (sidecar, _) = support::sidecar(&policy.to_string(), &[]).await;

    let stream = TcpStream::connect(sidecar.inbound).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(100)
            .initial_connection_window_size(100)
            .handshake::<_, support::TestBody>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("http://streamer/streamer.Stream/Small")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(support::full(""))
        .unwrap();
    send.ready().await.unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    // A proxy error is a trailers-only answer: grpc-status in the head.
    assert_eq!(
        rsp.headers().get("grpc-message"),
        None,
        "{:?}",
        rsp.headers()
    );
    // The app has sent everything by now; the sidecar holds what the
    // client's window has not let through.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = http_body_util::BodyExt::collect(rsp.into_body())
        .await
        .expect("the whole response, not a connection error");
    let trailers = body.trailers().cloned();
    assert_eq!(body.to_bytes().len(), FRAMES * 10);
    assert_eq!(
        trailers.and_then(|t| t.get("grpc-status").cloned()),
        Some(http::HeaderValue::from_static("0"))
    );
}
