//! Every stack the sidecar serves, assembled here and only here.
//!
//! Reading this file top to bottom shows what a request goes through:
//!
//! ```text
//! outbound (127.0.0.1):  metrics → gRPC form of the proxy's errors → request id → hop-by-hop
//!                        → router (→ egress outside the mesh)
//!     per service:       overall timeout → replay buffer → retry (budget, backoff)
//!                        → gRPC trailers peek → client span (one per try) → circuit breaker → per-try timeout
//!                        → no-endpoints fail-fast → p2c/peak-EWMA balancer
//!     per endpoint:      outlier ejection (+ the try's deadline) → pooled client (HTTP/1.1 or h2c)
//! inbound (pod IP):      server span → metrics → gRPC form of the proxy's errors → request id
//!                        → hop-by-hop → per policy:
//!                        mTLS required / authorization (403) → rate limit
//!                        → concurrency limit (shed) → timeout → app (x-forwarded-for)
//! gateway (each port):   server span → metrics → gRPC form of the proxy's errors → request id
//!                        → hop-by-hop → routes (host, match, bearer token, per-client
//!                        rate limit, filters, weighted backend)
//!                        → the outbound router's per-service stacks, as above
//! admin:                 /livez /readyz /healthz /metrics /status
//! ```

use std::{
    convert::Infallible,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use tower::{
    ServiceBuilder, limit::GlobalConcurrencyLimitLayer, timeout::error::Elapsed,
    util::BoxCloneSyncService,
};
use trellis_policy::RateLimit as RateLimitSpec;

use crate::{
    balance::{BalanceConfig, balancer},
    client::UpstreamClient,
    discovery::{EndpointsWatch, Resolver},
    gateway::GatewayRoutes,
    http::{
        Body, BoxError,
        grpc_errors::GrpcErrorsLayer,
        headers::HopByHopLayer,
        request_id::RequestIdLayer,
        response::{ProxyError, RespondToErrors},
    },
    inbound::{
        ToApp,
        authorize::{Authorize, Rules},
        concurrency::{Permits, is_shed},
        rate_limit::{RateLimit, TokenBucket},
    },
    metrics::{Direction, Metrics, MetricsLayer},
    outbound::{
        ServiceStack,
        egress::EgressForwarder,
        endpoint::{Endpoint, PeerIdentity},
        no_endpoints::FailFast,
        router::{MakeServiceStack, Router, RouterParts},
        target::{NameRules, ServiceTarget},
    },
    policy_watch::PolicyState,
    reload::{Kept, PerPolicy},
    resilience::{
        Registry,
        breaker::{self, BreakerService},
        outlier::{Outlier, OutlierSettings},
        peek_trailers::PeekTrailers,
        replay::Replayable,
        retry::{self, RetryPolicy},
        timeout::{Overall, TryTimeout},
    },
    trace::{
        Tracing,
        client::{ClientSpan, CountTries},
        server::ServerSpanLayer,
    },
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
    /// Breakers, budgets and outlier state per dependency.
    pub resilience: Registry,
    /// Outlier ejection tuning.
    pub outlier: OutlierSettings,
    /// Spans (or nothing, when tracing is off).
    pub tracing: Tracing,
    /// The mesh credentials.
    pub mesh: crate::mtls::MeshTls,
}

/// The outbound listener's stack.
pub fn outbound(parts: &StackParts) -> ListenerService {
    let router = service_router(parts);
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(MetricsLayer::new(
                parts.metrics.clone(),
                Direction::outbound,
            ))
            .layer(GrpcErrorsLayer)
            .layer(RequestIdLayer)
            .layer(HopByHopLayer)
            .service(router),
    )
}

/// A gateway port's stack, over `router` (one [`service_router`] shared by
/// every port, so a backend's balancer and breaker are shared too).
pub fn gateway(
    parts: &StackParts,
    router: &Router,
    port: u16,
    tables: tokio::sync::watch::Receiver<Arc<crate::gateway::Tables>>,
) -> ListenerService {
    let routes = GatewayRoutes::new(
        port,
        tables,
        BoxCloneSyncService::new(router.clone()),
        &parts.rules.cluster_domain,
        parts.metrics.clone(),
    );
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(ServerSpanLayer::new(parts.tracing.clone()))
            .layer(MetricsLayer::new(parts.metrics.clone(), Direction::gateway))
            .layer(GrpcErrorsLayer)
            .layer(RequestIdLayer)
            .layer(HopByHopLayer)
            .service(routes),
    )
}

/// The router over every upstream service's stack (see [`ServiceStacks`]).
pub fn service_router(parts: &StackParts) -> Router {
    Router::new(RouterParts {
        rules: parts.rules.clone(),
        resolver: parts.resolver.clone(),
        policy: parts.policy.clone(),
        discovery_timeout: parts.discovery_timeout,
        egress: EgressForwarder::new(parts.client.clone(), parts.policy.clone()),
        make: Arc::new(ServiceStacks(parts.clone())),
    })
}

/// Builds the stack of each upstream service for the [`Router`].
struct ServiceStacks(StackParts);

impl MakeServiceStack for ServiceStacks {
    /// The balancer, over one client per endpoint, each behind its outlier
    /// detector; it refuses at once when the service has no ready endpoint,
    /// a failure the breaker counts (see [`FailFast`]).
    fn balancer(&self, target: &ServiceTarget, endpoints: EndpointsWatch) -> ServiceStack {
        let parts = &self.0;
        let group = parts.resilience.outliers(&target.label, &parts.outlier);
        let (client, label) = (parts.client.clone(), target.label.clone());
        let peer = PeerIdentity {
            service: target.name.clone(),
            account: parts.resolver.identity(&target.name),
            mesh: parts.mesh.clone(),
        };
        let balanced = balancer(
            endpoints.clone(),
            move |addr| {
                let endpoint = Endpoint::new(addr, client.clone(), label.clone(), peer.clone());
                Outlier::new(endpoint, addr, group.clone())
            },
            &parts.balance,
        );
        BoxCloneSyncService::new(FailFast::new(balanced, endpoints, target.label.clone()))
    }

    /// The policy layers over the balancer, outermost first. The breaker
    /// and the budget come from the registry, which keeps them while their
    /// settings are unchanged.
    fn policy_layers(&self, target: &ServiceTarget, balancer: ServiceStack) -> ServiceStack {
        let (parts, res, service) = (&self.0, &target.resilience, &target.label);
        let breaker = parts
            .resilience
            .breaker(service, breaker::Settings::from(&res.circuit_breaker));
        let budget = parts.resilience.budget(service, &res.retry.budget);
        let settings = Arc::new(retry::Settings::from(&res.retry));
        let policy = RetryPolicy::new(
            settings.clone(),
            budget,
            parts.metrics.clone(),
            service.clone(),
        );
        let per_try = res.per_try_timeout.map(|d| d.get());
        let stack = ServiceBuilder::new()
            // The overall deadline (`timeout`, or a gRPC client's shorter
            // `grpc-timeout`), retries and backoff included.
            .layer_fn(|s| Overall::new(s, res.timeout.get(), service.clone()))
            // Buffers the body of a request that may be retried (method or
            // `x-trellis-retryable`, and size), so it can be sent again.
            .layer_fn(|s| Replayable::new(s, settings.clone()))
            // Counts tries, for the spans' `http.request.resend_count`.
            .layer_fn(CountTries::new)
            // Retries (statuses, gRPC codes, 429 + Retry-After, connect
            // failures, per-try timeouts) with jittered backoff, within the budget.
            .layer_fn(|s| tower::retry::Retry::new(policy.clone(), s))
            // Reads a gRPC status sent in trailers with the first message,
            // so the retry policy sees it.
            .layer_fn(PeekTrailers::new)
            // One client span per try, so retries are sibling spans.
            .layer_fn(|s| ClientSpan::new(s, parts.tracing.clone(), service.clone()))
            // The breaker counts every try; an open one answers at once and
            // is never retried.
            .layer_fn(|s| BreakerService::new(s, breaker.clone()))
            // The per-try deadline, under the breaker so a try that runs out
            // counts there as a timeout.
            .layer_fn(|s| TryTimeout::new(s, per_try, service.clone()))
            // Every try picks an endpoint afresh.
            .service(balancer);
        BoxCloneSyncService::new(stack)
    }
}

/// The inbound listener's stack.
pub fn inbound(parts: &StackParts) -> ListenerService {
    let to_app = ToApp::new(parts.client.clone(), parts.policy.clone(), parts.app_host);
    let metrics = parts.metrics.clone();
    // Kept across reloads while their settings are unchanged: the bucket
    // (a reload must not hand out a fresh burst) and the semaphore
    // (requests in flight keep counting).
    let buckets: Arc<Mutex<Kept<RateLimitSpec, Arc<TokenBucket>>>> = Arc::default();
    let permits = Arc::new(Permits::default());
    let per_policy = PerPolicy::new(parts.policy.clone(), move |state| {
        let bucket = state
            .policy
            .as_ref()
            .and_then(|p| p.inbound.rate_limit.as_ref())
            .map(|spec| {
                let mut kept = buckets.lock().expect("bucket lock");
                kept.get_or_make(spec, || Arc::new(TokenBucket::new(spec)))
            });
        inbound_policy(state, to_app.clone(), bucket, &permits, &metrics)
    });
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(ServerSpanLayer::new(parts.tracing.clone()))
            .layer(MetricsLayer::new(parts.metrics.clone(), Direction::inbound))
            .layer(GrpcErrorsLayer)
            .layer(RequestIdLayer)
            .layer(HopByHopLayer)
            .service(per_policy),
    )
}

/// The inbound protections of one policy over the forwarder: who may
/// call (403), the rate limit (429), then the concurrency limit (503 at
/// once when full), then the timeout (504).
fn inbound_policy(
    state: &PolicyState,
    to_app: ToApp,
    bucket: Option<Arc<TokenBucket>>,
    permits: &Permits,
    metrics: &Metrics,
) -> ListenerService {
    let (service, timeout, max): (Arc<str>, Duration, u32) = match &state.policy {
        Some(p) => (
            p.service.as_str().into(),
            p.inbound.timeout.get(),
            p.inbound.max_concurrent,
        ),
        None => ("unknown".into(), Duration::from_secs(30), 512),
    };
    let name = service.to_string();
    let (shed_name, shed_metrics) = (name.clone(), metrics.clone());
    let rules = state.policy.as_deref().and_then(Rules::from_policy);
    let svc = ServiceBuilder::new()
        // Before the rate limit: a refused caller spends no token.
        .layer_fn(|inner| Authorize::new(inner, rules.clone(), metrics.clone()))
        .layer_fn(|inner| RateLimit::new(inner, bucket.clone(), service.clone(), metrics.clone()))
        .map_err(move |e: BoxError| -> BoxError {
            if is_shed(e.as_ref()) {
                shed_metrics.shed(&shed_name);
                ProxyError::Overloaded {
                    service: shed_name.clone(),
                    limit: max,
                }
                .into()
            } else {
                e
            }
        })
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(
            permits.for_limit(max),
        ))
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
