//! Real parts for the integration tests: hyper upstreams on loopback that
//! answer with what they saw, clients for HTTP/1.1 (proxy form included) and
//! h2c, and a sidecar started in-process in static mode.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::{TcpListener, TcpStream};
use trellis_sidecar::{Config, Discovery, Running};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// An upstream server: HTTP/1.1 and h2c on one port.
#[derive(Clone)]
pub struct Upstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub healthy: Arc<AtomicBool>,
    pub delay_ms: Arc<AtomicU64>,
}

impl Upstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Starts an upstream named `name` on an ephemeral loopback port.
///
/// Paths: `/health` (200 or 503 as `healthy` says), `/echo` (the request
/// body back, streamed), `/big?bytes=N` (N bytes in 64 KiB chunks),
/// `/slow?ms=N`, `/status/NNN`, `/grpc/...` (a gRPC-style answer with
/// trailers); anything else answers JSON describing the request.
pub async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Upstream {
        name,
        addr: listener.local_addr().unwrap(),
        hits: Arc::default(),
        healthy: Arc::new(AtomicBool::new(true)),
        delay_ms: Arc::default(),
    };
    let state = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    up
}

fn query_num(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn handle(up: Upstream, req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_owned();
    if path != "/health" {
        up.hits.fetch_add(1, Ordering::SeqCst);
    }
    let delay = up.delay_ms.load(Ordering::SeqCst);
    if delay > 0 && path != "/health" {
        sleep_ms(delay).await;
    }
    let mut rsp = if path == "/health" {
        let ok = up.healthy.load(Ordering::SeqCst);
        let mut r = Response::new(full(if ok { "ok" } else { "down" }));
        if !ok {
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        r
    } else if path == "/echo" {
        // Stream the request body back frame by frame.
        Response::new(req.into_body().map_err(Into::into).boxed())
    } else if path == "/big" {
        let n = query_num(&req, "bytes").unwrap_or(1 << 20) as usize;
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunks = (0..n.div_ceil(chunk.len())).map(move |i| {
            let len = chunk.len().min(n - i * chunk.len());
            Ok::<_, BoxError>(Frame::data(chunk.slice(..len)))
        });
        Response::new(StreamBody::new(futures::stream::iter(chunks)).boxed())
    } else if path == "/slow" {
        sleep_ms(query_num(&req, "ms").unwrap_or(500)).await;
        Response::new(full("slow done"))
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(full(format!("status {code}")));
        *r.status_mut() = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        r
    } else if path.starts_with("/grpc/") {
        grpc_answer(&up, req).await
    } else {
        Response::new(full(describe(&up, &req).to_string()))
    };
    rsp.headers_mut()
        .insert("x-upstream", up.name.parse().unwrap());
    Ok(rsp)
}

/// A gRPC-style unary answer: the request message echoed in one
/// length-prefixed frame, then `grpc-status: 0` in trailers.
async fn grpc_answer(up: &Upstream, req: Request<Incoming>) -> Response<TestBody> {
    let saw_te = req
        .headers()
        .get("te")
        .map(|v| v.to_str().unwrap().to_owned());
    let version = format!("{:?}", req.version());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert(
        "grpc-message",
        format!("{}-{version}-te={saw_te:?}", up.name)
            .replace(['"', ' '], "")
            .parse()
            .unwrap(),
    );
    let frames = vec![
        Ok::<_, BoxError>(Frame::data(body)),
        Ok(Frame::trailers(trailers)),
    ];
    let mut rsp = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
    rsp.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    rsp
}

fn describe(up: &Upstream, req: &Request<Incoming>) -> serde_json::Value {
    let headers: BTreeMap<String, Vec<String>> = req
        .headers()
        .keys()
        .map(|k| {
            (
                k.to_string(),
                req.headers()
                    .get_all(k)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                    .collect(),
            )
        })
        .collect();
    serde_json::json!({
        "server": up.name,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "uri": req.uri().to_string(),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    })
}

/// A collected response.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn server(&self) -> String {
        self.headers
            .get("x-upstream")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

async fn collect(rsp: Response<Incoming>) -> Answer {
    let (parts, body) = rsp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// Sends one HTTP/1.1 request on a new connection to `addr`, with the
/// request target exactly as in `req` (so an absolute URI is proxy form).
pub async fn h1<B>(addr: SocketAddr, req: Request<B>) -> Answer
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    collect(send.send_request(req).await.unwrap()).await
}

/// A GET in HTTP proxy form through `proxy`.
pub async fn get_via(proxy: SocketAddr, url: &str) -> Answer {
    let uri: http::Uri = url.parse().unwrap();
    let req = Request::get(url)
        .header("host", uri.authority().unwrap().as_str())
        .body(full(""))
        .unwrap();
    h1(proxy, req).await
}

/// An h2c (prior knowledge) connection to `addr`.
pub async fn h2_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// Sends on an h2c connection and collects.
pub async fn h2_send(
    send: &mut hyper::client::conn::http2::SendRequest<TestBody>,
    req: Request<TestBody>,
) -> Answer {
    send.ready().await.unwrap();
    collect(send.send_request(req).await.unwrap()).await
}

/// A plain GET (origin form, Host set) to a listener such as admin.
pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(full(""))
        .unwrap();
    h1(addr, req).await
}

/// A unique temporary file path.
pub fn temp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "trellis-sidecar-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// A minimal valid policy for service `svc` whose app listens on `app_port`.
pub fn policy(svc: &str, app_port: u16, extra: serde_json::Value) -> String {
    let mut p = serde_json::json!({
        "service": svc,
        "namespace": "default",
        "appPort": app_port,
        "health": {"path": "/health", "interval": "100ms", "timeout": "500ms"},
    });
    if let (Some(p), serde_json::Value::Object(extra)) = (p.as_object_mut(), extra) {
        p.extend(extra);
    }
    p.to_string()
}

/// Starts a sidecar in static mode with the policy text in a watched file.
pub async fn sidecar(policy_text: &str, endpoints: &[(&str, &[SocketAddr])]) -> (Running, PathBuf) {
    let path = temp_path("policy.json");
    std::fs::write(&path, policy_text).unwrap();
    let mut cfg = Config::local(Some(path.clone()));
    cfg.discovery = Discovery::Static {
        endpoints: endpoints
            .iter()
            .map(|(n, a)| ((*n).to_owned(), a.to_vec()))
            .collect(),
        file: None,
    };
    (trellis_sidecar::start(cfg).await.unwrap(), path)
}

/// Polls `f` every 20 ms until it is true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
