//! Failing fast, below the circuit breaker, when a service has no ready
//! endpoint.
//!
//! tower's balancer waits in `poll_ready` until an endpoint appears, which
//! would hold every request until its timeout. [`FailFast`] answers at once
//! with [`ProxyError::NoEndpoints`] instead. It sits under the breaker on
//! purpose: "nobody is serving" is the dependency's failure like a refused
//! connection (gobreaker in front of a Consul lookup counted it the same
//! way), so a service whose pods all went away trips its breaker and callers
//! get the breaker's answer until a probe finds it serving again.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either, Ready};
use http::{Request, Response};
use tower::Service;

use crate::{
    discovery::{Discovered, EndpointsWatch},
    http::{Body, BoxError, response::ProxyError},
    outbound::ServiceStack,
};

/// A balancer that refuses at once when its endpoint set is empty.
#[derive(Clone)]
pub struct FailFast {
    inner: ServiceStack,
    endpoints: EndpointsWatch,
    service: Arc<str>,
}

impl FailFast {
    /// Guards `inner`, the balancer of `service` over `endpoints`.
    pub fn new(inner: ServiceStack, endpoints: EndpointsWatch, service: Arc<str>) -> Self {
        Self {
            inner,
            endpoints,
            service,
        }
    }

    fn has_endpoints(&self) -> bool {
        match &*self.endpoints.borrow() {
            Discovered::Ready(set) => !set.is_empty(),
            // Not known yet: let the balancer wait for discovery.
            Discovered::Pending => true,
            Discovered::NotFound => false,
        }
    }
}

impl Service<Request<Body>> for FailFast {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Either<
        Ready<Result<Response<Body>, BoxError>>,
        BoxFuture<'static, Result<Response<Body>, BoxError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The balancer is ready at once: it waits for an endpoint inside
        // its call's future (see `crate::shared`), so only once we know
        // there is someone to wait for.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if !self.has_endpoints() {
            let e: BoxError = ProxyError::NoEndpoints(self.service.to_string()).into();
            return Either::Left(futures::future::ready(Err(e)));
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tokio::sync::watch;
    use tower::{ServiceExt, util::BoxCloneSyncService};

    use super::*;

    fn ok_service() -> ServiceStack {
        BoxCloneSyncService::new(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, BoxError>(Response::new(crate::http::empty()))
        }))
    }

    async fn call(svc: &FailFast) -> Result<Response<Body>, BoxError> {
        svc.clone()
            .oneshot(Request::new(crate::http::empty()))
            .await
    }

    #[tokio::test]
    async fn refuses_at_once_when_empty_and_passes_when_serving() {
        let (tx, rx) = watch::channel(Discovered::Ready(Arc::new(BTreeSet::new())));
        let svc = FailFast::new(ok_service(), rx, "product.shop".into());
        let e = call(&svc).await.unwrap_err();
        assert!(
            matches!(e.downcast_ref::<ProxyError>(), Some(ProxyError::NoEndpoints(s)) if s == "product.shop"),
            "{e}"
        );
        // Counted by the breaker as the dependency's failure, never retried.
        assert_eq!(
            crate::resilience::failure_kind(&Err(e)),
            Some(trellis_policy::FailureKind::ConnectFailure)
        );

        tx.send(Discovered::Ready(Arc::new(
            ["127.0.0.1:1".parse().unwrap()].into(),
        )))
        .unwrap();
        assert!(call(&svc).await.is_ok());

        tx.send(Discovered::NotFound).unwrap();
        assert!(call(&svc).await.is_err());
    }
}
