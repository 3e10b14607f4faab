//! Real parts for the integration tests: hyper upstreams on loopback that
//! answer with what they saw or do what a test scripts, clients for HTTP/1.1
//! (proxy form included) and h2c, a sidecar started in-process in static
//! mode, and the `trellis-sidecar` binary as a child process.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
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
use trellis_sidecar::{Config, Discovery, OutlierSettings, Running};

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

/// What a scripted upstream does with its n-th request (from 0).
pub enum Act {
    Status(u16),
    WithHeader(u16, &'static str, &'static str),
    /// Accept the request and never answer.
    Hang,
    /// Answer 200 after this long.
    Delay(u64),
}

/// An upstream started by [`scripted`].
#[derive(Clone)]
pub struct Scripted {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Scripted {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

type Script = Arc<dyn Fn(usize, &http::request::Parts, &Bytes) -> Act + Send + Sync>;

/// An upstream on an ephemeral loopback port that does what `f` says with
/// each request, given its number, head and whole body; its answer's body
/// is `n=<request number> len=<body length>`.
pub async fn scripted(
    f: impl Fn(usize, &http::request::Parts, &Bytes) -> Act + Send + Sync + 'static,
) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = Scripted {
        addr: listener.local_addr().unwrap(),
        hits: Arc::default(),
    };
    let script: Script = Arc::new(f);
    let hits = up.hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (script, hits) = (script.clone(), hits.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (script, hits) = (script.clone(), hits.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let n = hits.fetch_add(1, Ordering::SeqCst);
                        let (status, header) = match script(n, &parts, &body) {
                            Act::Status(s) => (s, None),
                            Act::WithHeader(s, k, v) => (s, Some((k, v))),
                            Act::Hang => {
                                futures::future::pending::<()>().await;
                                unreachable!()
                            }
                            Act::Delay(ms) => {
                                sleep_ms(ms).await;
                                (200, None)
                            }
                        };
                        let mut rsp = Response::new(full(format!("n={n} len={}", body.len())));
                        *rsp.status_mut() = StatusCode::from_u16(status).unwrap();
                        if let Some((k, v)) = header {
                            rsp.headers_mut().insert(k, v.parse().unwrap());
                        }
                        Ok::<_, Infallible>(rsp)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    up
}

/// A free port on loopback: bound by the OS, then released.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An address nothing listens on (bound, then released): an upstream that
/// was killed, whose connections are refused.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
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
    let mut send = h1_connect(addr).await;
    collect(send.send_request(req).await.unwrap()).await
}

/// One HTTP/1.1 request to `addr` on a connection from address `source`
/// (any of 127.0.0.0/8 on loopback), as another client would send it.
pub async fn h1_from(source: std::net::IpAddr, addr: SocketAddr, req: Request<TestBody>) -> Answer {
    let socket = match source {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    collect(send.send_request(req).await.unwrap()).await
}

/// An HTTP/1.1 connection to `addr`, kept alive for as many requests as
/// are sent on it.
pub async fn h1_connect<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
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
    sidecar_with_config(policy_text, endpoints, |_| {}).await
}

/// Starts a sidecar as [`sidecar`] does, with its configuration changed by
/// `edit` first.
pub async fn sidecar_with_config(
    policy_text: &str,
    endpoints: &[(&str, &[SocketAddr])],
    edit: impl FnOnce(&mut Config),
) -> (Running, PathBuf) {
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
    edit(&mut cfg);
    (trellis_sidecar::start(cfg).await.unwrap(), path)
}

/// A sidecar for service `order` (its app `app`) whose one dependency,
/// `dep`, is at `dep`, with `resilience` as the policy's defaults, `extra`
/// merged into the policy, and `outlier` as its ejection settings.
pub async fn sidecar_for(
    app: &Upstream,
    dep: &[SocketAddr],
    resilience: serde_json::Value,
    extra: serde_json::Value,
    outlier: OutlierSettings,
) -> (Running, PathBuf) {
    let mut p = serde_json::json!({"resilience": resilience});
    if let (Some(p), serde_json::Value::Object(extra)) = (p.as_object_mut(), extra) {
        p.extend(extra);
    }
    let text = policy("order", app.addr.port(), p);
    sidecar_with_config(&text, &[("dep", dep)], |cfg| cfg.outlier = outlier).await
}

/// Outlier ejection off, so that every request reaches the endpoint it
/// would have gone to whatever it did before.
pub fn no_ejection() -> OutlierSettings {
    OutlierSettings {
        consecutive_failures: 0,
        ..OutlierSettings::default()
    }
}

/// A breaker that never trips, so that a test is about something else and
/// every request reaches the upstream.
pub fn no_breaker() -> serde_json::Value {
    serde_json::json!({"consecutiveFailures": 100000, "failureRatio": 1.0, "minRequests": 1000000})
}

/// The sum of the samples in the Prometheus text `text` whose line starts
/// with `prefix` (a name, or a name and its labels).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sidecar's metrics, as its admin listener serves them.
pub async fn metrics(sc: &Running) -> String {
    get(sc.admin, "/metrics").await.text()
}

/// Sends `total` GETs for `dep` through the outbound listener from
/// `concurrency` callers; returns the answers' statuses.
pub async fn load(sc: &Running, total: usize, concurrency: usize) -> Vec<StatusCode> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, outbound) = (next.clone(), sc.outbound);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < total {
                got.push(get_via(outbound, "http://dep/x").await.status);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// The share of `statuses` that are 200.
pub fn ok_share(statuses: &[StatusCode]) -> f64 {
    statuses.iter().filter(|s| **s == StatusCode::OK).count() as f64 / statuses.len() as f64
}

/// The `trellis-sidecar` binary cargo built for these tests.
pub const SIDECAR_BIN: &str = env!("CARGO_BIN_EXE_trellis-sidecar");

/// The sidecar binary as a child process, killed on drop.
pub struct SidecarProcess {
    pub child: Child,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary from its flags, in static mode on free loopback ports,
/// with the policy text in a file and `--static-endpoints endpoints`, then
/// `extra` flags; its stdout goes to `stdout`, its stderr to the test's.
/// Returns once `/readyz` answers 200.
pub async fn sidecar_process(
    policy_text: &str,
    endpoints: &str,
    extra: &[&str],
    stdout: Stdio,
) -> SidecarProcess {
    let path = temp_path("policy.json");
    std::fs::write(&path, policy_text).unwrap();
    let lo = |p| SocketAddr::from(([127, 0, 0, 1], p));
    let (inbound, outbound, admin) = (lo(free_port()), lo(free_port()), lo(free_port()));
    let child = Command::new(SIDECAR_BIN)
        .env_clear()
        .args(["--inbound-addr", &inbound.to_string()])
        .args(["--outbound-addr", &outbound.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--policy-file", path.to_str().unwrap()])
        .args(["--static-endpoints", endpoints])
        .args(extra)
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let sc = SidecarProcess {
        child,
        outbound,
        admin,
    };
    let ready = eventually(Duration::from_secs(10), || async move {
        match TcpStream::connect(admin).await {
            Ok(_) => get(admin, "/readyz").await.status == StatusCode::OK,
            Err(_) => false,
        }
    })
    .await;
    assert!(ready, "the binary never became ready");
    sc
}

/// A field of `/proc/<pid>/status` given in kB (`field` with its colon, as
/// `VmRSS:`), or `None` when the process or the field is not there.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
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
