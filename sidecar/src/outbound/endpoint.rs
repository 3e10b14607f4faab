//! One endpoint of an upstream: where the balancer sends a request it picked.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use tower::Service;

use crate::{
    client::{UpstreamClient, UpstreamProtocol},
    http::{Body, BoxError},
};

/// Sends requests to one address through the shared pooled client.
///
/// Always ready: the pool opens connections on demand, and a connect
/// failure surfaces as the request's error, where retries and breakers
/// (issue 5) see it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    client: UpstreamClient,
    service: Arc<str>,
}

impl Endpoint {
    /// The endpoint at `addr` of `service`.
    pub fn new(addr: SocketAddr, client: UpstreamClient, service: Arc<str>) -> Self {
        Self {
            addr,
            client,
            service,
        }
    }
}

impl Service<Request<Body>> for Endpoint {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let protocol = UpstreamProtocol::for_request(&req);
        let (client, addr) = (self.client.clone(), self.addr);
        tracing::trace!(service = %self.service, %addr, ?protocol, "forwarding");
        async move { client.send(req, addr, protocol).await.map_err(Into::into) }.boxed()
    }
}
