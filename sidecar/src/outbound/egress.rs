//! Calls to destinations outside the mesh.
//!
//! The operator sets `HTTP_PROXY` for every application, so every plain
//! HTTP call an application makes reaches the outbound listener, the ones
//! to other services and the ones to anything else. A destination is
//! *outside the mesh* when it is not a declared dependency and not a
//! Service the sidecar can discover (see [`super::router`]): then the
//! policy's `egress` decides. `Allow` resolves the host by DNS, as the
//! application would have without a proxy, and forwards the call with the
//! policy's default overall timeout; `Deny` refuses it at once with 403
//! naming the host. Neither touches discovery, so such calls never make
//! the sidecar unready.

use std::time::Duration;

use http::{Request, Response};
use tokio::sync::watch;
use trellis_policy::Egress;

use crate::{
    client::{UpstreamClient, UpstreamProtocol},
    http::{Body, BoxError, grpc::is_grpc, response::ProxyError},
    policy_watch::PolicyState,
};

/// A destination outside the mesh: a host and port as the request named them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    /// The host, a DNS name or an IP address.
    pub host: String,
    /// The port, 80 when the request named none.
    pub port: u16,
}

impl External {
    /// The label of such calls in metrics and logs: `egress:<host>`.
    pub fn label(&self) -> String {
        format!("egress:{}", self.host)
    }
}

/// Forwards calls outside the mesh, or refuses them, as the policy says.
#[derive(Clone)]
pub struct EgressForwarder {
    client: UpstreamClient,
    policy: watch::Receiver<PolicyState>,
}

impl EgressForwarder {
    /// A forwarder through the shared pooled `client`.
    pub fn new(client: UpstreamClient, policy: watch::Receiver<PolicyState>) -> Self {
        Self { client, policy }
    }

    /// Forwards `req` to `dest`, or refuses it.
    pub async fn forward(
        &self,
        dest: &External,
        req: Request<Body>,
    ) -> Result<Response<Body>, BoxError> {
        let (egress, timeout) = {
            let state = self.policy.borrow();
            match &state.policy {
                Some(p) => (p.egress, p.resilience.timeout.get()),
                None => (Egress::default(), Duration::from_secs(2)),
            }
        };
        if egress == Egress::Deny {
            return Err(ProxyError::EgressDenied(dest.host.clone()).into());
        }
        // HTTP/2 without TLS (h2c) is rare outside a mesh: only gRPC, which
        // requires it, goes out as h2c.
        let protocol = if is_grpc(req.headers()) {
            UpstreamProtocol::H2c
        } else {
            UpstreamProtocol::Http1
        };
        let call = async {
            let addr = tokio::net::lookup_host((dest.host.as_str(), dest.port))
                .await
                .map_err(|e| ProxyError::EgressUnresolved {
                    host: dest.host.clone(),
                    error: e.to_string(),
                })?
                .next()
                .ok_or_else(|| ProxyError::EgressUnresolved {
                    host: dest.host.clone(),
                    error: "no addresses".into(),
                })?;
            tracing::debug!(host = %dest.host, %addr, "forwarding outside the mesh");
            self.client
                .send(req, addr, protocol, None)
                .await
                .map_err(BoxError::from)
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(res) => res,
            Err(_) => Err(ProxyError::Timeout {
                service: dest.label(),
                timeout,
            }
            .into()),
        }
    }
}
