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
    discovery::IdentityWatch,
    http::{Body, BoxError},
    mtls::MeshTls,
    outbound::target::ServiceName,
};

/// Whom an endpoint must prove to be: the service's pods' ServiceAccount
/// (from discovery) in the trust domain of this sidecar's own certificate.
/// No ServiceAccount (a Service outside the mesh) or no certificate of our
/// own (a mesh without identity): plaintext.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    /// The service.
    pub service: ServiceName,
    /// Its pods' ServiceAccount, as discovery knows it.
    pub account: IdentityWatch,
    /// This sidecar's credentials.
    pub mesh: MeshTls,
}

impl PeerIdentity {
    fn expected(&self) -> Option<trellis_identity::SpiffeId> {
        let account = self.account.borrow().clone()?;
        self.mesh.peer(&self.service.namespace, &account)
    }
}

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
    peer: PeerIdentity,
}

impl Endpoint {
    /// The endpoint at `addr` of `service`, which must prove to be `peer`.
    pub fn new(
        addr: SocketAddr,
        client: UpstreamClient,
        service: Arc<str>,
        peer: PeerIdentity,
    ) -> Self {
        Self {
            addr,
            client,
            service,
            peer,
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
        let peer = self.peer.expected();
        tracing::trace!(service = %self.service, %addr, ?protocol, ?peer, "forwarding");
        async move {
            client
                .send(req, addr, protocol, peer.as_ref())
                .await
                .map_err(Into::into)
        }
        .boxed()
    }
}
