//! The certificates of the mutual-TLS setups (`trellis-mtls`, `haproxy-tls`):
//! one root for the run, made by `trellis_identity::Issuer` (ECDSA P-256,
//! as every workload key), and a stand-in for the identity service so the
//! Trellis sidecars get theirs through their own certify path. The HAProxy
//! pair gets PEM files issued by the same root, with keys of the same type.
//!
//! The stand-in speaks the real protocol (`POST /v1/certify` over TLS, a
//! CSR in, a chain out; `trellis_identity::api`) but checks no token: the
//! token file's text is taken as the ServiceAccount to certify. The real
//! service checks tokens with a TokenReview; that is tested elsewhere and
//! is no part of a request's cost.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use trellis_identity::{
    Issuer, KeyPair, SpiffeId,
    api::{CERTIFY_PATH, CertifyRequest, CertifyResponse},
};

/// The trust domain and namespace of every bench identity.
pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "default";

/// How long certificates are valid: far longer than a run, so no renewal
/// (at 70 % of the life) happens while a phase is measured.
const LIFETIME: Duration = Duration::from_secs(24 * 3600);

pub struct Mesh {
    ca: Arc<Issuer>,
    /// The stand-in identity service's TLS listener (its certificate names
    /// `localhost`, the host of [`Mesh::policy_identity`]'s `issuerAddress`).
    addr: SocketAddr,
    issued: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl Mesh {
    /// A new root and the stand-in identity service, on its own small
    /// runtime (it is busy only while a pair starts).
    pub fn start() -> Result<Self> {
        let ca = Arc::new(Issuer::new_root(TRUST_DOMAIN, LIFETIME)?);
        let key = KeyPair::generate()?;
        let served = ca.certify(
            &key,
            None,
            &["localhost".into()],
            SystemTime::now(),
            LIFETIME,
        )?;
        let config = rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(
                trellis_identity::pem::certificates(&served.chain_pem)
                    .map_err(anyhow::Error::msg)?,
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-identity")
            .enable_all()
            .build()?;
        let issued = Arc::new(AtomicU64::new(0));
        let addr = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            tokio::spawn(serve(listener, acceptor, ca.clone(), issued.clone()));
            anyhow::Ok(addr)
        })?;
        Ok(Self {
            ca,
            addr,
            issued,
            _rt: rt,
        })
    }

    /// The `identity` section of a sidecar policy (`trellis_policy::MeshIdentity`).
    pub fn policy_identity(&self) -> serde_json::Value {
        serde_json::json!({
            "trustDomain": TRUST_DOMAIN,
            "trustBundle": self.ca.cert_pem(),
            "issuerAddress": format!("localhost:{}", self.addr.port()),
        })
    }

    /// The SPIFFE ID of ServiceAccount `account` in the bench's namespace.
    pub fn spiffe_id(account: &str) -> String {
        SpiffeId::new(TRUST_DOMAIN, NAMESPACE, account).to_string()
    }

    /// Certificates the stand-in identity service has issued.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Writes, for HAProxy, `<name>.pem` (a new key's certificate for the
    /// DNS name `name` and the SPIFFE ID of ServiceAccount `name`, the
    /// issuer's certificate and the key, one file as `crt` wants it) and
    /// `ca.pem` (the root, for `ca-file`) into `dir`; returns both paths.
    pub fn haproxy_pems(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let id = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, name);
        let issued =
            self.ca
                .certify(&key, Some(&id), &[name.into()], SystemTime::now(), LIFETIME)?;
        let crt = dir.join(format!("{name}.pem"));
        std::fs::write(&crt, format!("{}{}", issued.chain_pem, key.serialize_pem()))
            .with_context(|| format!("writing {}", crt.display()))?;
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, self.ca.cert_pem())
            .with_context(|| format!("writing {}", ca.display()))?;
        Ok((crt, ca))
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ca: Arc<Issuer>,
    issued: Arc<AtomicU64>,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, ca, issued) = (acceptor.clone(), ca.clone(), issued.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (ca, issued) = (ca.clone(), issued.clone());
                async move { Ok::<_, Infallible>(certify(req, &ca, &issued).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// One certify call: the token names the ServiceAccount, the CSR's key is
/// certified as its SPIFFE ID.
async fn certify(req: Request<Incoming>, ca: &Issuer, issued: &AtomicU64) -> Response<Full<Bytes>> {
    let refuse = |status: StatusCode, why: String| {
        let mut rsp = Response::new(Full::from(why));
        *rsp.status_mut() = status;
        rsp
    };
    if req.method() != Method::POST || req.uri().path() != CERTIFY_PATH {
        return refuse(StatusCode::NOT_FOUND, format!("only POST {CERTIFY_PATH}"));
    }
    let account = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    let Some(account) = account else {
        return refuse(StatusCode::UNAUTHORIZED, "no bearer token".into());
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let csr: CertifyRequest = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let id = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, &account);
    let chain = match ca.certify_request(&csr.csr, &id, LIFETIME) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    issued.fetch_add(1, Ordering::Relaxed);
    let answer = CertifyResponse {
        identity: id.to_string(),
        certificate_chain: chain.chain_pem,
        not_after_unix: chain
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    };
    match serde_json::to_vec(&answer) {
        Ok(json) => Response::new(Full::from(json)),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
