//! Getting and renewing the workload's certificate from the identity service.
//!
//! The key is made here and never leaves the process; the identity
//! service sees a certificate signing request and the pod's projected
//! ServiceAccount token (audience `trellis-identity`, re-read for each
//! request, since the kubelet rotates it). A certificate is renewed at
//! [`RENEW_AT`] of its life; a failure is retried with backoff while the
//! current certificate keeps serving, and only a certificate that has
//! actually expired makes the sidecar unready (see `Health`).

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::sync::watch;
use trellis_identity::{
    Credentials, SpiffeId, TrustBundle,
    api::{CERTIFY_PATH, CertifyRequest, CertifyResponse},
    request::new_key_and_request,
};
use trellis_policy::MeshIdentity;

use super::MeshTls;
use crate::{
    metrics::{Metrics, Renewal},
    policy_watch::PolicyState,
};

/// The share of a certificate's life after which it is renewed.
pub const RENEW_AT: f64 = 0.7;

/// The first wait after a failed request; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long one request to the identity service may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the expiry gauge is brought up to date.
const GAUGE_TICK: Duration = Duration::from_secs(5);

/// Who this sidecar is and how it proves it.
#[derive(Clone, Debug)]
pub struct CertifyConfig {
    /// The projected ServiceAccount token for the identity service.
    pub token_file: PathBuf,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's ServiceAccount (named in the request; the identity
    /// service certifies what the token proves).
    pub service_account: String,
}

/// Keeps `mesh` certified while the policy names a mesh identity, until
/// `shutdown`.
pub async fn run(
    mesh: MeshTls,
    mut policy: watch::Receiver<PolicyState>,
    config: CertifyConfig,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut renew_at: Option<SystemTime> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let identity = policy
            .borrow_and_update()
            .policy
            .as_ref()
            .and_then(|p| p.identity.clone());
        let due = match &identity {
            None => None,
            Some(identity) => match TrustBundle::from_pem(&identity.trust_bundle) {
                Err(error) => {
                    mesh.set_error(format!("the policy's trust bundle is unusable: {error}"));
                    None
                }
                Ok(bundle) => {
                    if let Err(error) = mesh.set_bundle(bundle.clone()) {
                        tracing::warn!(%error, "the new trust bundle cannot be used; keeping the last one");
                    }
                    let now = SystemTime::now();
                    if renew_at.is_none_or(|at| at <= now) {
                        match certify_once(&mesh, identity, bundle, &config).await {
                            Ok(creds) => {
                                metrics.certificate_request(Renewal::issued);
                                let life = creds.remaining(now);
                                tracing::info!(identity = %creds.id(), expires_in = ?life, "mesh certificate issued");
                                renew_at = Some(now + life.mul_f64(RENEW_AT));
                                backoff = BACKOFF_MIN;
                            }
                            Err(error) => {
                                metrics.certificate_request(Renewal::failed);
                                let error = format!("{error:#}");
                                tracing::warn!(%error, retry_in = ?backoff, "mesh certificate request failed; the current certificate stays in force");
                                mesh.set_error(error);
                                renew_at = Some(now + backoff);
                                backoff = (backoff * 2).min(BACKOFF_MAX);
                            }
                        }
                    }
                    renew_at
                }
            },
        };
        mesh.refresh_expiry();
        let wait = due.map_or(GAUGE_TICK, |at| {
            at.duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(GAUGE_TICK)
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = policy.changed() => if changed.is_err() { return },
            _ = crate::shutdown::signalled(&mut shutdown) => return,
        }
    }
}

/// One request: a new key, a CSR, the token, the call, the credentials in force.
async fn certify_once(
    mesh: &MeshTls,
    identity: &MeshIdentity,
    bundle: TrustBundle,
    config: &CertifyConfig,
) -> anyhow::Result<Credentials> {
    let me = SpiffeId::new(
        &identity.trust_domain,
        &config.namespace,
        &config.service_account,
    );
    let (key, csr) = new_key_and_request(&me).context("cannot make a key")?;
    let token = tokio::fs::read_to_string(&config.token_file)
        .await
        .with_context(|| {
            format!(
                "cannot read the ServiceAccount token at {}",
                config.token_file.display()
            )
        })?;
    let answer = tokio::time::timeout(
        REQUEST_TIMEOUT,
        call(&identity.issuer_address, &bundle, token.trim(), &csr),
    )
    .await
    .with_context(|| {
        format!(
            "the identity service at {} did not answer in {REQUEST_TIMEOUT:?}",
            identity.issuer_address
        )
    })??;
    let creds = Credentials::new(&answer.certificate_chain, &key, bundle)
        .context("the identity service's certificate is unusable")?;
    mesh.set(creds.clone())
        .context("the certificate cannot be used for TLS")?;
    Ok(creds)
}

/// `POST /v1/certify` over TLS, the server checked against the bundle by
/// the host name of `address`.
async fn call(
    address: &str,
    bundle: &TrustBundle,
    token: &str,
    csr: &str,
) -> anyhow::Result<CertifyResponse> {
    let (host, _) = address
        .rsplit_once(':')
        .with_context(|| format!("{address:?} is not host:port"))?;
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("cannot connect to the identity service at {address}"))?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(bundle.dns_client_config()))
        .connect(ServerName::try_from(host.to_owned())?, tcp)
        .await
        .with_context(|| format!("TLS with the identity service at {address} failed"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(&CertifyRequest { csr: csr.into() })?;
    let req = Request::post(CERTIFY_PATH)
        .header(header::HOST, host)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(bytes::Bytes::from(body)))?;
    let rsp = sender.send_request(req).await?;
    let status = rsp.status();
    let body = rsp.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        bail!(
            "the identity service refused: {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(512)]).trim()
        );
    }
    serde_json::from_slice(&body).context("the identity service's answer is malformed")
}
