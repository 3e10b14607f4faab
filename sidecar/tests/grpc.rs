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
