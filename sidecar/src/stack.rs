//! Every stack the sidecar serves, assembled here and only here.
//!
//! Reading this file top to bottom shows what a request goes through:
//!
//! ```text
//! outbound (127.0.0.1):  metrics → request id → hop-by-hop → router
//!     per service:       timeout → [retry → breaker: issue 5] → p2c/peak-EWMA balancer
//!     per endpoint:      pooled client (HTTP/1.1 or h2c)
//! inbound (pod IP):      metrics → request id → hop-by-hop → per policy:
//!                        [rate limit → concurrency: issue 5] → timeout → app (x-forwarded-for)
//! admin:                 /livez /readyz /healthz /metrics /status
//! ```

use std::{convert::Infallible, net::IpAddr, sync::Arc, time::Duration};

use http::{Request, Response};
use tower::{ServiceBuilder, timeout::error::Elapsed, util::BoxCloneSyncService};
use trellis_policy::Resilience;

use crate::{
    balance::{BalanceConfig, Balanced, balancer},
    client::UpstreamClient,
    discovery::Resolver,
    http::{
        Body, BoxError,
        headers::HopByHopLayer,
        request_id::RequestIdLayer,
        response::{ProxyError, RespondToErrors},
    },
    inbound::ToApp,
    metrics::{Direction, Metrics, MetricsLayer},
    outbound::{
        endpoint::Endpoint,
        router::{Router, RouterParts},
        target::{NameRules, ServiceName},
    },
    policy_watch::PolicyState,
    reload::PerPolicy,
};

/// A listener's whole stack: it answers every request itself, so it never errs.
pub type ListenerService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// What the stacks are built from.
#[derive(Clone)]
pub struct StackParts {
    /// Shared metrics.
    pub metrics: Metrics,
    /// The pooled upstream client.
    pub client: UpstreamClient,
    /// Discovery.
    pub resolver: Resolver,
    /// The policy in force.
    pub policy: tokio::sync::watch::Receiver<PolicyState>,
    /// How outbound names complete.
    pub rules: NameRules,
    /// Balancer tuning.
    pub balance: BalanceConfig,
    /// How long a request for a new name waits for discovery.
    pub discovery_timeout: Duration,
    /// Where the application listens.
    pub app_host: IpAddr,
}

/// The outbound listener's stack.
pub fn outbound(parts: &StackParts) -> ListenerService {
    let client = parts.client.clone();
    let balance = parts.balance.clone();
    let router = Router::new(RouterParts {
        rules: parts.rules.clone(),
        resolver: parts.resolver.clone(),
        policy: parts.policy.clone(),
        discovery_timeout: parts.discovery_timeout,
        make_balancer: Arc::new(move |svc: &ServiceName, watch| {
            let (client, label): (_, Arc<str>) = (client.clone(), svc.to_string().into());
            balancer(
                watch,
                move |addr| Endpoint::new(addr, client.clone(), label.clone()),
                &balance,
            )
        }),
        make_stack: Arc::new(outbound_route),
    });
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(MetricsLayer::new(
                parts.metrics.clone(),
                Direction::outbound,
            ))
            .layer(RequestIdLayer)
            .layer(HopByHopLayer)
            .service(router),
    )
}

/// The policy layers of one outbound service, over its balancer.
///
/// Issue 5 adds, between the timeout and the balancer: retry (with budget),
/// then the circuit breaker. The timeout stays outermost: it is the
/// overall deadline, retries included.
fn outbound_route(svc: &ServiceName, balanced: Balanced, res: &Resilience) -> Balanced {
    let timeout = res.timeout.get();
    let service = svc.to_string();
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_err(move |e: BoxError| {
                if e.is::<Elapsed>() {
                    ProxyError::Timeout {
                        service: service.clone(),
                        timeout,
                    }
                    .into()
                } else {
                    e
                }
            })
            .timeout(timeout)
            .service(balanced),
    )
}

/// The inbound listener's stack.
pub fn inbound(parts: &StackParts) -> ListenerService {
    let to_app = ToApp::new(parts.client.clone(), parts.policy.clone(), parts.app_host);
    let per_policy = PerPolicy::new(parts.policy.clone(), move |state| {
        inbound_policy(state, to_app.clone())
    });
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(MetricsLayer::new(parts.metrics.clone(), Direction::inbound))
            .layer(RequestIdLayer)
            .layer(HopByHopLayer)
            .service(per_policy),
    )
}

/// The inbound protections of one policy over the forwarder. Issue 5 adds
/// the rate limit and the concurrency limit in front of the timeout.
fn inbound_policy(state: &PolicyState, to_app: ToApp) -> ListenerService {
    let (service, timeout): (Arc<str>, Duration) = match &state.policy {
        Some(p) => (p.service.as_str().into(), p.inbound.timeout.get()),
        None => ("unknown".into(), Duration::from_secs(30)),
    };
    let name = service.to_string();
    let svc = ServiceBuilder::new()
        .map_err(move |e: BoxError| -> BoxError {
            if e.is::<Elapsed>() {
                ProxyError::Timeout {
                    service: name.clone(),
                    timeout,
                }
                .into()
            } else {
                e
            }
        })
        .timeout(timeout)
        .service(to_app);
    BoxCloneSyncService::new(RespondToErrors::new(svc, service))
}
