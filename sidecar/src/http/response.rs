//! The responses the proxy writes itself, when it cannot forward a request.
//!
//! Each says in its body what went wrong and for which service, and carries
//! `x-trellis-proxy-error`, so a caller can tell a proxy failure from an
//! answer of the application (a 503 from the app and from the proxy look
//! alike otherwise).

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use tower::Service;

use crate::metrics::ServiceLabel;

use super::{Body, BoxError, full};

/// Marks a response written by the proxy rather than by an application.
pub const X_PROXY_ERROR: HeaderName = HeaderName::from_static("x-trellis-proxy-error");

/// Names the dependency whose circuit breaker refused a request.
pub const X_BREAKER: HeaderName = HeaderName::from_static("x-trellis-breaker");

/// A response extension on every response the proxy wrote itself: what
/// went wrong, for the layers above (metrics, tracing, the gRPC form),
/// which read it here rather than parse the `x-trellis-proxy-error` header
/// back (that header is for the client; a peer's sidecar sets it too).
#[derive(Clone, Debug)]
pub struct ProxyAnswer {
    /// [`ProxyError::kind`].
    pub kind: &'static str,
    /// The error's text, also the response body.
    pub text: Arc<str>,
}

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request named no service: no absolute URI, no Host, no `:authority`.
    #[error(
        "the request names no service: send it in proxy form (GET http://name/path) or with a Host header"
    )]
    NoAuthority,
    /// The request named something that is not a service name.
    #[error(
        "{0:?} is not a service name: use name, name.namespace or name.namespace.svc.cluster.local"
    )]
    BadAuthority(String),
    /// Discovery knows no service by this name.
    #[error("unknown service {0:?}: discovery knows no service by this name")]
    UnknownService(String),
    /// Discovery has not answered yet about this service.
    #[error("discovery has no answer yet for service {0:?}")]
    DiscoveryPending(String),
    /// The destination is outside the mesh and the policy's egress is `Deny`.
    #[error(
        "{0:?} is not a dependency or a service of the mesh this sidecar can read, and egress is Deny: declare it in spec.dependencies or set spec.egress to Allow"
    )]
    EgressDenied(String),
    /// The caller is not allowed to reach this service: no authorization
    /// rule allows its identity, or it came in plaintext where mutual TLS
    /// is required.
    #[error("{caller} may not call {service}: {reason}")]
    NotAuthorized {
        /// The service called.
        service: String,
        /// The caller's identity, or that it has none.
        caller: String,
        /// Why, and what to change.
        reason: &'static str,
    },
    /// The destination outside the mesh could not be resolved by DNS.
    #[error("{host:?} is outside the mesh and does not resolve: {error}")]
    EgressUnresolved {
        /// The host.
        host: String,
        /// What the resolver said.
        error: String,
    },
    /// The service exists but has no ready endpoint.
    #[error("service {0:?} has no ready endpoints")]
    NoEndpoints(String),
    /// The upstream could not be reached or broke the exchange.
    #[error("upstream {service:?} failed: {}", with_causes(.source.as_ref()))]
    Upstream {
        /// The service called.
        service: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// The overall deadline of the call (retries included) passed.
    #[error("upstream {service:?} did not answer within {timeout:?} (overall timeout)")]
    Timeout {
        /// The service called.
        service: String,
        /// The deadline that passed.
        timeout: std::time::Duration,
    },
    /// One try ran past `perTryTimeout` and was not (or could no longer be) retried.
    #[error("upstream {service:?} did not answer within {timeout:?} (per-try timeout)")]
    TryTimeout {
        /// The service called.
        service: String,
        /// The per-try deadline that passed.
        timeout: std::time::Duration,
    },
    /// The dependency's circuit breaker is open (or half-open and full).
    #[error(
        "circuit breaker for dependency {service:?} is {state}: failing fast instead of calling it"
    )]
    CircuitOpen {
        /// The dependency.
        service: String,
        /// `open` or `half-open`.
        state: &'static str,
    },
    /// The inbound rate limit refused the request.
    #[error("rate limit of service {service:?} exceeded: retry after {retry_after}s")]
    RateLimited {
        /// This sidecar's service.
        service: String,
        /// Seconds until a request would be let through.
        retry_after: u64,
    },
    /// A gateway's per-client rate limit refused the request: this client's
    /// bucket is empty.
    #[error("this client is over the rate limit of {limit}: retry after {retry_after}s")]
    ClientRateLimited {
        /// The limit, as the policy that set it (`kind/namespace/name`).
        limit: String,
        /// Seconds until this client's next request would be let through.
        retry_after: u64,
    },
    /// The inbound concurrency limit is full: the request is shed, not queued.
    #[error("service {service:?} is at its concurrency limit ({limit}): request shed")]
    Overloaded {
        /// This sidecar's service.
        service: String,
        /// The limit in force.
        limit: u32,
    },
    /// No valid policy has been loaded yet, so the application's port is unknown.
    #[error("the sidecar has no valid policy yet")]
    NoPolicy,
    /// The request was malformed in a way hyper let through.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A gateway has no route for the request's host and path.
    #[error("no route for host {host:?} and path {path:?} on this gateway listener")]
    NoRoute {
        /// The request's host.
        host: String,
        /// The request's path.
        path: String,
    },
    /// A gateway route sends this request to a backend it could not
    /// resolve (its status says why), or has no backend at all.
    #[error("route {0} has no valid backend for this request (see the route's status)")]
    InvalidBackend(String),
}

/// An error with every cause under it, `outer: inner: innermost`.
///
/// hyper's client errors say only their kind at the top ("client error
/// (Connect)"); what a caller needs to know — connection refused, closed
/// before the message completed, an invalid HTTP version — is further down
/// the chain. A cause whose text its parent already quotes is not repeated.
pub fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let t = e.to_string();
        if !t.is_empty() && !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = e.source();
    }
    text
}

impl ProxyError {
    /// The status code a client should see.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoAuthority | Self::BadAuthority(_) | Self::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::EgressDenied(_) | Self::NotAuthorized { .. } => StatusCode::FORBIDDEN,
            Self::EgressUnresolved { .. } => StatusCode::BAD_GATEWAY,
            Self::UnknownService(_)
            | Self::NoEndpoints(_)
            | Self::DiscoveryPending(_)
            | Self::NoPolicy
            | Self::CircuitOpen { .. }
            | Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } | Self::TryTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::RateLimited { .. } | Self::ClientRateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::InvalidBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short machine-readable kind, the value of `x-trellis-proxy-error`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoAuthority => "no-authority",
            Self::BadAuthority(_) => "bad-authority",
            Self::UnknownService(_) => "unknown-service",
            Self::NoEndpoints(_) => "no-endpoints",
            Self::DiscoveryPending(_) => "discovery-pending",
            Self::Upstream { .. } => "upstream-failed",
            Self::Timeout { .. } => "timeout",
            Self::TryTimeout { .. } => "per-try-timeout",
            Self::CircuitOpen { .. } => "circuit-open",
            Self::RateLimited { .. } | Self::ClientRateLimited { .. } => "rate-limited",
            Self::Overloaded { .. } => "overloaded",
            Self::NoRoute { .. } => "no-route",
            Self::InvalidBackend(_) => "invalid-backend",
            Self::NoPolicy => "no-policy",
            Self::EgressDenied(_) => "egress-denied",
            Self::NotAuthorized { .. } => "not-authorized",
            Self::EgressUnresolved { .. } => "egress-unresolved",
            Self::BadRequest(_) => "bad-request",
        }
    }

    /// The response the client gets.
    pub fn into_response(self) -> Response<Body> {
        let text: Arc<str> = self.to_string().into();
        let mut rsp = Response::new(full(format!("{text}\n")));
        rsp.extensions_mut().insert(ProxyAnswer {
            kind: self.kind(),
            text,
        });
        *rsp.status_mut() = self.status();
        let h = rsp.headers_mut();
        match &self {
            Self::CircuitOpen { service, .. } => {
                if let Ok(v) = HeaderValue::from_str(service) {
                    h.insert(X_BREAKER, v);
                }
            }
            Self::RateLimited { retry_after, .. } | Self::ClientRateLimited { retry_after, .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(X_PROXY_ERROR, HeaderValue::from_static(self.kind()));
        rsp
    }
}

/// Turns any error that reached the top of a stack into a response: a
/// [`ProxyError`] keeps its status, anything else is a 502.
pub fn error_response(err: BoxError, service: Option<&str>) -> Response<Body> {
    match err.downcast::<ProxyError>() {
        Ok(e) => e.into_response(),
        Err(source) => ProxyError::Upstream {
            service: service.unwrap_or("unknown").to_owned(),
            source,
        }
        .into_response(),
    }
}

/// Answers a failed request with its error response, labelled with the
/// service, so the layers above (metrics) see every outcome as a response.
#[derive(Clone, Debug)]
pub struct RespondToErrors<S> {
    inner: S,
    service: Arc<str>,
    /// An error from `poll_ready`, answered by the next `call`.
    not_ready: Option<Arc<str>>,
}

impl<S> RespondToErrors<S> {
    /// Wraps `inner`, whose failures concern `service`.
    pub fn new(inner: S, service: Arc<str>) -> Self {
        Self {
            inner,
            service,
            not_ready: None,
        }
    }
}

impl<S, B> Service<Request<B>> for RespondToErrors<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(e.to_string().into());
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let service = self.service.clone();
        let label = move |mut rsp: Response<Body>| {
            rsp.extensions_mut().insert(ServiceLabel(service));
            rsp
        };
        if let Some(e) = self.not_ready.take() {
            let rsp = error_response(e.to_string().into(), Some(&self.service));
            return futures::future::ready(Ok(label(rsp))).boxed();
        }
        let service = self.service.clone();
        self.inner
            .call(req)
            .map(move |res| {
                Ok(label(match res {
                    Ok(rsp) => rsp,
                    Err(e) => error_response(e, Some(&service)),
                }))
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_upstream_error_says_its_root_cause_once() {
        let root = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let e = ProxyError::Upstream {
            service: "user.shop".into(),
            source: Box::new(Outer(root)),
        };
        assert_eq!(
            e.to_string(),
            r#"upstream "user.shop" failed: client error (Connect): Connection refused"#
        );
        let rsp = e.into_response();
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(rsp.headers()[X_PROXY_ERROR], "upstream-failed");
    }
}
