//! The identity service: certificates for sidecars, for the identity
//! their ServiceAccount token proves.
//!
//! It runs as `trellis-operator identity`, its own Deployment with its own
//! ServiceAccount (see docs/architecture.md for why): the issuer's key is
//! readable by that ServiceAccount alone, and it may create TokenReviews,
//! nothing else. A sidecar calls `POST /v1/certify` over TLS
//! ([`trellis_identity::api`]); [`certifier`] decides, [`token_review`]
//! asks the apiserver who the token is, [`store`] keeps the issuer and the
//! trust bundle. The issuer Secret is re-read every [`RELOAD_EVERY`], so a
//! rotated issuer is in force without a restart.

pub mod certifier;
pub mod store;
pub mod token_review;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use kube::Client;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use trellis_identity::{Credentials, Issuer, KeyPair, SpiffeId, TrustBundle, api::CERTIFY_PATH};

use self::certifier::Certifier;

/// How often the issuer Secret is re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(15);

/// The largest request body accepted (a CSR is under 1 KiB).
const MAX_BODY: usize = 16 * 1024;

/// How the identity service runs.
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its own namespace (the issuer Secret and the bundle live there).
    pub namespace: String,
    /// The trust domain of every SPIFFE ID.
    pub trust_domain: String,
    /// How long workload certificates last.
    pub lifetime: Duration,
    /// Its Service's name: its certificate names `<service>.<namespace>.svc`.
    pub service: String,
    /// Its own ServiceAccount (named in its certificate).
    pub service_account: String,
}

/// The service's own serving configuration, certified by `issuer`.
fn serving_config(issuer: &Issuer, s: &IdentitySettings) -> anyhow::Result<Arc<ServerConfig>> {
    let key = KeyPair::generate()?;
    let names = vec![
        format!("{}.{}.svc", s.service, s.namespace),
        format!("{}.{}.svc.cluster.local", s.service, s.namespace),
    ];
    let id = SpiffeId::new(&s.trust_domain, &s.namespace, &s.service_account);
    let issued = issuer.certify(
        &key,
        Some(&id),
        &names,
        std::time::SystemTime::now(),
        Duration::from_secs(7 * 24 * 3600),
    )?;
    let bundle = TrustBundle::from_pem(issuer.cert_pem())?;
    Ok(Credentials::new(&issued.chain_pem, &key, bundle)?.server_config_without_client_auth()?)
}

/// Runs the identity service until the process ends.
pub async fn run(client: Client, settings: IdentitySettings) -> anyhow::Result<()> {
    let (issuer, mut version) =
        store::load_or_create(&client, &settings.namespace, &settings.trust_domain).await?;
    let tls = Arc::new(std::sync::RwLock::new(serving_config(&issuer, &settings)?));
    let certifier = Arc::new(Certifier::new(
        issuer,
        &settings.trust_domain,
        settings.lifetime,
        token_review::KubeReviewer(client.clone()),
    ));
    let listener = TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("cannot listen on {}", settings.addr))?;
    tracing::info!(addr = %settings.addr, trust_domain = %settings.trust_domain, lifetime = ?settings.lifetime, "identity service ready");

    // Follows the issuer Secret: a rotation takes effect within RELOAD_EVERY.
    {
        let (client, settings, certifier, tls) = (
            client.clone(),
            settings.clone(),
            certifier.clone(),
            tls.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                match store::load(&client, &settings.namespace).await {
                    Ok(Some((issuer, v))) if v != version => {
                        match serving_config(&issuer, &settings) {
                            Ok(config) => {
                                *tls.write().expect("tls lock") = config;
                                certifier.set_issuer(issuer);
                                version = v;
                                tracing::info!(
                                    "the issuer changed; certificates are signed by the new one from now on"
                                );
                            }
                            Err(error) => {
                                tracing::error!(%error, "the new issuer is unusable; keeping the last one")
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(error) => tracing::error!(
                        error = format!("{error:#}"),
                        "cannot read the issuer; keeping the last one"
                    ),
                }
            }
        });
    }

    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.read().expect("tls lock").clone());
        let certifier = certifier.clone();
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                tracing::debug!(%peer, "TLS handshake failed");
                return;
            };
            let svc = hyper::service::service_fn(move |req| handle(certifier.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    certifier: Arc<Certifier>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<bytes::Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut rsp = Response::new(Full::from(body));
        *rsp.status_mut() = status;
        Ok(rsp)
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return reply(StatusCode::OK, "ok\n".into()),
        (&Method::POST, CERTIFY_PATH) => {}
        _ => return reply(StatusCode::NOT_FOUND, format!("POST {CERTIFY_PATH} only\n")),
    }
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {MAX_BODY} bytes\n"),
            );
        }
    };
    match certifier.certify(auth.as_deref(), &body).await {
        Ok(answer) => {
            let mut rsp =
                Response::new(Full::from(serde_json::to_vec(&answer).expect("serialises")));
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok(rsp)
        }
        Err(e) => {
            tracing::info!(error = %e, "certify refused");
            reply(e.status(), format!("{e}\n"))
        }
    }
}
