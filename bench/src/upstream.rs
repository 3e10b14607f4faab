//! The upstreams every setup shares, on one small tokio runtime: a minimal
//! hyper HTTP/1.1 server, a tonic gRPC server (`grpc.health.v1`), and a sink
//! that accepts OTLP trace exports so the sidecar's exporter has somewhere
//! real to send to; and for the gateway bench, [`Named`] HTTP/1.1
//! upstreams that check they were routed to.

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

    /// Starts a [`Named`] upstream on this runtime.
    pub fn named(&self, name: &str, expect: Expect) -> Result<Named> {
        let counts = Arc::new(Counts::default());
        let addr = self._rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let answer = Arc::new(Answer {
                body: Bytes::from(format!("{name}\n")),
                name: http::HeaderValue::from_str(name)?,
                expect,
                counts: counts.clone(),
            });
            tokio::spawn(serve_named(listener, answer));
            anyhow::Ok(addr)
        })?;
        Ok(Named {
            name: name.to_owned(),
            addr,
            counts,
        })
    }
}

/// What a [`Named`] upstream requires of the requests it is sent.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    /// A path prefix, matched as the Gateway API's `PathPrefix` does (whole
    /// segments: `/a` takes `/a` and `/a/b`, not `/ab`).
    pub prefix: Option<String>,
    /// A header the edge adds, and its value.
    pub header: Option<(String, String)>,
}

impl Expect {
    /// Why `req` should not have come here, if it should not.
    fn refuse(&self, req: &Request<Incoming>) -> Option<String> {
        if let Some(prefix) = &self.prefix {
            let path = req.uri().path();
            let under = path
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            if !under {
                return Some(format!("path {path} is not under {prefix}"));
            }
        }
        if let Some((name, value)) = &self.header {
            let seen = req.headers().get(name.as_str());
            if seen.is_none_or(|v| v.as_bytes() != value.as_bytes()) {
                return Some(format!("header {name} is {seen:?}, not {value:?}"));
            }
        }
        None
    }
}

/// Requests a [`Named`] upstream answered, and how many it refused.
#[derive(Debug, Default)]
pub struct Counts {
    pub served: AtomicU64,
    pub misdirected: AtomicU64,
}

/// An HTTP/1.1 keep-alive upstream that answers 200 with its name (as the
/// body and in `x-upstream`) when a request meets its [`Expect`], and 421
/// Misdirected Request saying why otherwise: a proxy that routes a path to
/// the wrong upstream, or drops the header it should add, fails the
/// generator's status check on that request.
pub struct Named {
    pub name: String,
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
}

impl Named {
    /// (served, misdirected) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.served.load(Ordering::Relaxed),
            self.counts.misdirected.load(Ordering::Relaxed),
        )
    }
}

struct Answer {
    body: Bytes,
    name: http::HeaderValue,
    expect: Expect,
    counts: Arc<Counts>,
}

async fn serve_named(listener: TcpListener, answer: Arc<Answer>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answer = answer.clone();
                async move {
                    let response = match answer.expect.refuse(&req) {
                        None => {
                            answer.counts.served.fetch_add(1, Ordering::Relaxed);
                            Response::builder()
                                .header("content-type", "text/plain")
                                .header("x-upstream", answer.name.clone())
                                .body(Full::new(answer.body.clone()))
                        }
                        Some(why) => {
                            answer.counts.misdirected.fetch_add(1, Ordering::Relaxed);
                            Response::builder()
                                .status(http::StatusCode::MISDIRECTED_REQUEST)
                                .header("x-upstream", answer.name.clone())
                                .body(Full::new(Bytes::from(why)))
                        }
                    };
                    Ok::<_, Infallible>(response.expect("a valid response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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
