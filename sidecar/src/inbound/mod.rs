//! The inbound side: traffic from other services to the application.
//!
//! The listener on the pod's address forwards to the application on
//! localhost, at the port the policy names, adding `x-forwarded-for` so the
//! application still sees who called. The policy's inbound protections —
//! [`authorize`], [`rate_limit`] and [`concurrency`], then a timeout —
//! wrap this in [`crate::stack`].

pub mod authorize;
pub mod concurrency;
pub mod rate_limit;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use tokio::sync::watch;
use tower::Service;

use crate::{
    client::{UpstreamClient, UpstreamProtocol},
    http::{Body, BoxError, headers::append_forwarded_for, response::ProxyError},
    metrics::ServiceLabel,
    policy_watch::PolicyState,
    server::ClientAddr,
};

/// Forwards requests to the application.
#[derive(Clone, Debug)]
pub struct ToApp {
    client: UpstreamClient,
    policy: watch::Receiver<PolicyState>,
    app_host: IpAddr,
}

impl ToApp {
    /// Forwards to `app_host` at the policy's `appPort`.
    pub fn new(
        client: UpstreamClient,
        policy: watch::Receiver<PolicyState>,
        app_host: IpAddr,
    ) -> Self {
        Self {
            client,
            policy,
            app_host,
        }
    }
}

impl Service<Request<Body>> for ToApp {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(policy) = self.policy.borrow().policy.clone() else {
            return futures::future::ready(Err(ProxyError::NoPolicy.into())).boxed();
        };
        if let Some(ClientAddr(peer)) = req.extensions().get::<ClientAddr>().copied() {
            append_forwarded_for(req.headers_mut(), peer.ip());
        }
        let addr = SocketAddr::new(self.app_host, policy.app_port);
        let protocol = UpstreamProtocol::for_app(&req, policy.protocol);
        let client = self.client.clone();
        async move {
            let label = ServiceLabel(Arc::from(policy.service.as_str()));
            match client.send(req, addr, protocol, None).await {
                Ok(mut rsp) => {
                    rsp.extensions_mut().insert(label);
                    Ok(rsp)
                }
                Err(e) => Err(ProxyError::Upstream {
                    service: policy.service.clone(),
                    source: e.into(),
                }
                .into()),
            }
        }
        .boxed()
    }
}
