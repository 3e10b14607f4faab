//! The upstreams every setup shares, on one small tokio runtime: a minimal
//! hyper HTTP/1.1 server, a tonic gRPC server (`grpc.health.v1`), and a sink
//! that accepts OTLP trace exports so the sidecar's exporter has somewhere
//! real to send to.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Result;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

/// What the HTTP upstream answers to every request.
pub const BODY: &str = "hello from the bench upstream\n";

pub struct Upstreams {
    /// HTTP/1.1 keep-alive, 200 with [`BODY`] to everything.
    pub http: SocketAddr,
    /// gRPC (h2c): `grpc.health.v1.Health`, the overall status SERVING.
    pub grpc: SocketAddr,
    /// OTLP/gRPC and OTLP/HTTP sink: accepts and drops every export.
    pub otlp: SocketAddr,
    /// Export requests the sink received.
    pub otlp_exports: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl Upstreams {
    pub fn start() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-upstream")
            .enable_all()
            .build()?;
        let otlp_exports = Arc::new(AtomicU64::new(0));
        let (http, grpc, otlp) = rt.block_on(async {
            let http = TcpListener::bind("127.0.0.1:0").await?;
            let grpc = TcpListener::bind("127.0.0.1:0").await?;
            let otlp = TcpListener::bind("127.0.0.1:0").await?;
            let addrs = (http.local_addr()?, grpc.local_addr()?, otlp.local_addr()?);
            tokio::spawn(serve_http(http));
            let (_reporter, health) = tonic_health::server::health_reporter();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(health)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc)),
            );
            tokio::spawn(serve_otlp(otlp, otlp_exports.clone()));
            anyhow::Ok(addrs)
        })?;
        Ok(Self {
            http,
            grpc,
            otlp,
            otlp_exports,
            _rt: rt,
        })
    }

    pub fn exports(&self) -> u64 {
        self.otlp_exports.load(Ordering::Relaxed)
    }
}

async fn serve_http(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "text/plain")
                        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
                        .expect("a static response"),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// Answers OTLP/gRPC exports with an empty `Export*ServiceResponse` (a
/// zero-length message) and `grpc-status: 0`, and OTLP/HTTP with 200.
async fn serve_otlp(listener: TcpListener, exports: Arc<AtomicU64>) {
    while let Ok((stream, _)) = listener.accept().await {
        let exports = exports.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let exports = exports.clone();
                async move {
                    let grpc = req
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("application/grpc"));
                    let _ = req.into_body().collect().await;
                    exports.fetch_add(1, Ordering::Relaxed);
                    let response = if grpc {
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let frames = futures::stream::iter([
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0; 5]))),
                            Ok(Frame::trailers(trailers)),
                        ]);
                        Response::builder()
                            .header("content-type", "application/grpc")
                            .body(BoxBody::new(StreamBody::new(frames)))
                    } else {
                        Response::builder().body(Full::new(Bytes::new()).boxed())
                    };
                    Ok::<Response<Body>, Infallible>(response.expect("a static response"))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
