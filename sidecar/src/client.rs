//! The pooled upstream client, shared by every route and the inbound forwarder.
//!
//! Two hyper-util pooled clients sit behind one type: HTTP/1.1, and HTTP/2
//! with prior knowledge (h2c). Cleartext HTTP/2 cannot be negotiated by ALPN,
//! so the proxy decides per request: a request that arrived over HTTP/2, or
//! that carries gRPC's content type, goes upstream as h2c; anything else as
//! HTTP/1.1. Pools are keyed by endpoint address, so each endpoint keeps its
//! own warm connections.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use trellis_identity::SpiffeId;

use crate::{
    http::{Body, BoxError, boxed, headers::Stripped},
    mtls::MeshTls,
};

/// The HTTP/2 connection flow-control window of upstream connections.
const H2_CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The HTTP/2 stream flow-control window of upstream connections.
const H2_STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// How the proxy speaks to one upstream request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge, as gRPC uses.
    H2c,
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    crate::http::grpc::is_grpc(req.headers())
}

impl UpstreamProtocol {
    /// The protocol towards another sidecar (outbound): h2c when the request
    /// arrived as HTTP/2 or is gRPC, else HTTP/1.1. A sidecar's inbound
    /// speaks both, so the caller's choice is kept end to end.
    pub fn for_request<B>(req: &Request<B>) -> Self {
        if is_grpc(req) || req.version() == Version::HTTP_2 {
            Self::H2c
        } else {
            Self::Http1
        }
    }

    /// The protocol towards the application (inbound): what the policy says
    /// it speaks. An HTTP application gets HTTP/1.1 even from an HTTP/2
    /// caller, since most HTTP servers do not accept cleartext HTTP/2;
    /// gRPC always needs HTTP/2.
    pub fn for_app<B>(req: &Request<B>, app: trellis_policy::Protocol) -> Self {
        if app == trellis_policy::Protocol::Grpc || is_grpc(req) {
            Self::H2c
        } else {
            Self::Http1
        }
    }
}

/// Settings of the upstream client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long a TCP connect may take.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            max_idle_per_endpoint: 64,
        }
    }
}

/// Why an upstream exchange failed, split the way retries and breakers
/// (issue 5) need it: a connect failure is always safe to retry.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made to the endpoint.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The connection was made but the exchange failed.
    #[error("request to {addr} failed: {source}")]
    Request {
        /// The endpoint.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

/// A pool of mutual TLS connections to one peer identity.
type MeshPool = Client<HttpsConnector<HttpConnector>, Body>;

/// The pools by (peer, HTTP/2), each with the credentials generation it uses.
type MeshPoolMap = HashMap<(SpiffeId, bool), (u64, MeshPool)>;

/// The pooled client. Cloned for every request (each endpoint's call and
/// the inbound forwarder take one), so its parts sit behind one `Arc`:
/// a clone is one reference count, not one per pool, connector and timer.
#[derive(Clone)]
pub struct UpstreamClient(Arc<Clients>);

struct Clients {
    h1: Client<HttpConnector, Body>,
    h2: Client<HttpConnector, Body>,
    mesh: MeshPools,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamClient")
    }
}

/// Pools of mutual TLS connections, one per (peer identity, HTTP/2), each
/// built for the credentials in force when it was made and replaced once
/// they change, so a renewed certificate is used for new connections.
#[derive(Clone)]
struct MeshPools {
    tls: MeshTls,
    builder: hyper_util::client::legacy::Builder,
    connector: HttpConnector,
    pools: Arc<Mutex<MeshPoolMap>>,
}

impl MeshPools {
    /// The pool towards `peer`, or why there is none.
    fn get(&self, peer: &SpiffeId, h2: bool) -> Result<MeshPool, BoxError> {
        let generation = self.tls.generation();
        let mut pools = self.pools.lock().expect("mesh pools lock");
        let key = (peer.clone(), h2);
        if let Some((g, pool)) = pools.get(&key)
            && *g == generation
        {
            return Ok(pool.clone());
        }
        let (config, generation) = self
            .tls
            .client_config(peer)
            .ok_or("this sidecar has no mesh certificate yet")?;
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only();
        let connector = if h2 {
            https.enable_http2().wrap_connector(self.connector.clone())
        } else {
            https.enable_http1().wrap_connector(self.connector.clone())
        };
        let pool = self.builder.build(connector);
        pools.insert(key, (generation, pool.clone()));
        Ok(pool)
    }
}

impl UpstreamClient {
    /// Builds both pools; connections to meshed peers use `mesh`'s credentials.
    pub fn new(cfg: &ClientConfig, mesh: MeshTls) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        // The proxy rewrites every URI to an address; there is no name to resolve.
        connector.enforce_http(true);

        let mut b = Client::builder(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.idle_timeout)
            .pool_max_idle_per_host(cfg.max_idle_per_endpoint)
            // The original Host is forwarded as is; hyper must not invent one.
            .set_host(false);
        let h1 = b.build(connector.clone());
        let mut tls_connector = connector.clone();
        tls_connector.enforce_http(false);
        let mesh_builder = b.clone();
        b.http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            // Fixed windows (hyper's defaults), not an adaptive one: h2
            // bounds the small DATA frames a connection holds to half its
            // window, and an adaptive window starts at 64 KiB, about 130
            // small gRPC messages, which a loaded connection holds at once;
            // h2 then closes it (GOAWAY ENHANCE_YOUR_CALM) with every call
            // on it. 5 MiB allows about 10,000.
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW);
        let h2 = b.build(connector);
        Self(Arc::new(Clients {
            h1,
            h2,
            mesh: MeshPools {
                tls: mesh,
                builder: mesh_builder,
                connector: tls_connector,
                pools: Arc::default(),
            },
        }))
    }

    /// Sends `req` to `addr`, rewriting its URI to the endpoint and its version
    /// to the chosen protocol; over mutual TLS when the endpoint is a mesh
    /// workload, which must then prove it is `peer`. Hop-by-hop headers
    /// must already be stripped.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        addr: SocketAddr,
        protocol: UpstreamProtocol,
        peer: Option<&SpiffeId>,
    ) -> Result<Response<Body>, ClientError> {
        let authority = req.uri().authority().cloned();
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *req.uri_mut() = Uri::builder()
            .scheme(if peer.is_some() { "https" } else { "http" })
            .authority(addr.to_string())
            .path_and_query(path)
            .build()
            .expect("an address and a path that parsed before make a URI");

        let te_trailers = req
            .extensions()
            .get::<Stripped>()
            .is_some_and(|s| s.te_trailers);
        match protocol {
            UpstreamProtocol::Http1 => {
                *req.version_mut() = Version::HTTP_11;
                // An HTTP/2 request carries its name in :authority; HTTP/1.1 needs Host.
                if let Some(a) = authority
                    && !req.headers().contains_key(header::HOST)
                    && let Ok(v) = HeaderValue::from_str(a.as_str())
                {
                    req.headers_mut().insert(header::HOST, v);
                }
            }
            UpstreamProtocol::H2c => {
                // :authority comes from the URI; a Host beside it could disagree.
                let headers = req.headers_mut();
                headers.remove(header::HOST);
                if te_trailers {
                    // The only TE allowed on HTTP/2, and one gRPC servers require.
                    headers.insert(header::TE, HeaderValue::from_static("trailers"));
                }
                *req.version_mut() = Version::HTTP_2;
            }
        }
        let h2 = protocol == UpstreamProtocol::H2c;
        let clients = &*self.0;
        let sent = match peer {
            None if h2 => clients.h2.request(req).await,
            None => clients.h1.request(req).await,
            Some(peer) => match clients.mesh.get(peer, h2) {
                Ok(pool) => pool.request(req).await,
                Err(source) => return Err(ClientError::Connect { addr, source }),
            },
        };
        match sent {
            Ok(rsp) => Ok(rsp.map(boxed)),
            Err(e) if e.is_connect() => Err(ClientError::Connect {
                addr,
                source: e.into(),
            }),
            Err(e) => Err(ClientError::Request {
                addr,
                source: e.into(),
            }),
        }
    }
}
