//! The `hyper-floor` setup: a pair of the smallest proxies the Trellis
//! sidecar's own building blocks make, to measure what those blocks cost
//! before any policy. Each is a hyper server (`hyper-util`'s auto
//! connection builder, HTTP/1.1 and h2c, as the sidecar's listeners) whose
//! one service sends every request unchanged but for its URI to the next hop
//! through `hyper-util`'s pooled client (HTTP/2 only for gRPC, as the
//! sidecar's client), on tokio's multi-thread runtime with one worker per
//! CPU (the sidecar's default). No routing, balancing, retries, timeouts,
//! metrics, tracing or header handling: under `--callgrind` its
//! instructions per request are the floor a proxy built from these crates
//! starts from, to set beside HAProxy's.

use std::{convert::Infallible, net::SocketAddr};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

/// `trellis-bench floor-proxy`: what the `hyper-floor` setup runs, twice.
#[derive(Clone, Debug, clap::Args)]
pub struct FloorProxy {
    /// Where to listen.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where every request goes.
    #[arg(long)]
    pub next: SocketAddr,
    /// Speak HTTP/2 (prior knowledge) to the next hop, as for gRPC.
    #[arg(long)]
    pub http2: bool,
}

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves until killed.
pub fn run(opts: &FloorProxy) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(opts.clone()))
}

async fn serve(opts: FloorProxy) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .http2_only(opts.http2)
        .build(connector);
    let authority: http::uri::Authority = opts.next.to_string().parse()?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, authority) = (client.clone(), authority.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                forward(client.clone(), authority.clone(), req)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The request to `authority`, its answer back; a failure is a 502.
async fn forward(
    client: Client<HttpConnector, Incoming>,
    authority: http::uri::Authority,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let mut uri = parts.uri.into_parts();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(authority);
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = http::Uri::from_parts(uri).expect("scheme, authority and path make a URI");
    Ok(
        match client.request(Request::from_parts(parts, body)).await {
            Ok(response) => response.map(BodyExt::boxed),
            Err(_) => Response::builder()
                .status(http::StatusCode::BAD_GATEWAY)
                .body(
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .expect("a status and an empty body make a response"),
        },
    )
}
