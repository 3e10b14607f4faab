//! The admin listener: probes, metrics and a status page.
//!
//! | path       | answers |
//! |------------|---------|
//! | `/livez`   | 200 while the process serves at all |
//! | `/readyz`  | 200 when ready for traffic (with what is degraded, such as stale discovery), else 503 with the reasons |
//! | `/healthz` | JSON detail of every check (200 healthy, 503 unhealthy) |
//! | `/metrics` | Prometheus / OpenMetrics text, with the process's resident memory and open file descriptors |
//! | `/status`  | JSON: the policy in force, refusals, endpoints per service, and per dependency its circuit breaker (state, counts), retry budget and endpoint ejections |

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::json;

use crate::{
    discovery::{Discovered, Resolver},
    health::{Health, status_code},
    http::{Body, full},
    metrics::Metrics,
    mtls::MeshTls,
    policy_watch::PolicyStore,
    process,
    resilience::Registry,
};

/// Identity of this sidecar, shown on `/status`.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// `POD_NAME`.
    pub pod: Option<String>,
    /// `POD_NAMESPACE`.
    pub namespace: String,
    /// `TRELLIS_SERVICE`.
    pub service: Option<String>,
}

/// The admin service.
#[derive(Clone)]
pub struct Admin {
    health: Health,
    metrics: Metrics,
    policy: PolicyStore,
    resolver: Resolver,
    resilience: Registry,
    mesh: MeshTls,
    identity: Identity,
}

impl Admin {
    /// Serves what these report.
    pub fn new(
        health: Health,
        metrics: Metrics,
        policy: PolicyStore,
        resolver: Resolver,
        resilience: Registry,
        mesh: MeshTls,
        identity: Identity,
    ) -> Self {
        Self {
            health,
            metrics,
            policy,
            resolver,
            resilience,
            mesh,
            identity,
        }
    }

    fn respond(&self, req: &Request<Body>) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match req.uri().path() {
            "/livez" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => match self.health.readiness() {
                Ok(()) => text(
                    StatusCode::OK,
                    ["ready".to_owned()]
                        .into_iter()
                        .chain(self.health.warnings())
                        .map(|l| l + "\n")
                        .collect(),
                ),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready\n{why}\n"),
                ),
            },
            "/healthz" => {
                let report = self.health.report();
                let code = status_code(report.status == "healthy");
                json_response(
                    code,
                    &serde_json::to_value(report).expect("report serialises"),
                )
            }
            "/metrics" => {
                // The certificate's time left as of this scrape.
                self.mesh.refresh_expiry();
                let mut rsp = Response::new(full(process::with_footprint(self.metrics.encode())));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                rsp
            }
            "/status" => json_response(StatusCode::OK, &self.status()),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /livez /readyz /healthz /metrics /status\n".into(),
            ),
        }
    }

    fn status(&self) -> serde_json::Value {
        let state = self.policy.current();
        let endpoints: serde_json::Map<String, serde_json::Value> = self
            .resolver
            .snapshot()
            .into_iter()
            .map(|(svc, d)| {
                let v = match d {
                    Discovered::Pending => json!({"state": "pending"}),
                    Discovered::NotFound => json!({"state": "unknown"}),
                    Discovered::Ready(set) => json!({
                        "state": "known",
                        "endpoints": set.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    }),
                };
                (svc.to_string(), v)
            })
            .collect();
        json!({
            "pod": self.identity.pod,
            "namespace": self.identity.namespace,
            "service": self.identity.service,
            "ready": self.health.readiness().is_ok(),
            "policy": {
                "generation": state.generation,
                "source": state.source,
                "appliedAt": state.applied_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                "rejected": state.rejected.map(|r| json!({
                    "error": r.error,
                    "source": r.source,
                    "at": humantime::format_rfc3339_millis(r.at).to_string(),
                })),
                "current": state.policy.as_deref(),
            },
            "discovery": endpoints,
            "dependencies": self.resilience.status(),
            "mesh": self.mesh.status(),
        })
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut rsp = Response::new(full(body));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(v).expect("a JSON value serialises");
    body.push(b'\n');
    let mut rsp = Response::new(full(body));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

impl tower::Service<Request<Body>> for Admin {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let rsp = self.respond(&req);
        futures::future::ready(Ok(rsp)).boxed()
    }
}
