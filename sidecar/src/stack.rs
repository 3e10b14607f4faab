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
//!                        rate limit → concurrency limit (shed) → timeout → app (x-forwarded-for)
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
use trellis_policy::Resilience;

use crate::{
    balance::{BalanceConfig, Balanced, balancer},
    client::UpstreamClient,
    discovery::Resolver,
    http::{
        Body, BoxError,
        grpc_errors::GrpcErrorsLayer,
        headers::HopByHopLayer,
        request_id::RequestIdLayer,
        response::{ProxyError, RespondToErrors},
    },
    inbound::{
        ToApp,
        concurrency::{Permits, is_shed},
        rate_limit::{RateLimit, TokenBucket},
    },
    metrics::{Direction, Metrics, MetricsLayer},
    outbound::{
        egress::EgressForwarder,
        endpoint::Endpoint,
        no_endpoints::FailFast,
        router::{Router, RouterParts},
        target::{NameRules, ServiceName},
    },
    policy_watch::PolicyState,
    reload::PerPolicy,
    resilience::{
        Registry,
        breaker::{self, BreakerService},
        outlier::{Outlier, OutlierSettings},
        retry::{self, PeekTrailers, Replayable, RetryPolicy},
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
}

/// The outbound listener's stack.
pub fn outbound(parts: &StackParts) -> ListenerService {
    let client = parts.client.clone();
    let balance = parts.balance.clone();
    let (registry, outlier) = (parts.resilience.clone(), parts.outlier.clone());
    let (route_registry, metrics) = (parts.resilience.clone(), parts.metrics.clone());
    let tracing = parts.tracing.clone();
    let router = Router::new(RouterParts {
        rules: parts.rules.clone(),
        resolver: parts.resolver.clone(),
        policy: parts.policy.clone(),
        discovery_timeout: parts.discovery_timeout,
        egress: EgressForwarder::new(parts.client.clone(), parts.policy.clone()),
        make_balancer: Arc::new(move |svc: &ServiceName, watch| {
            let (client, label): (_, Arc<str>) = (client.clone(), svc.to_string().into());
            let group = registry.outliers(&label, &outlier);
            let endpoint_label = label.clone();
            let balanced = balancer(
                watch.clone(),
                move |addr| {
                    Outlier::new(
                        Endpoint::new(addr, client.clone(), endpoint_label.clone()),
                        addr,
                        group.clone(),
                    )
                },
                &balance,
            );
            BoxCloneSyncService::new(FailFast::new(balanced, watch, label))
        }),
        make_stack: Arc::new(move |svc, balanced, res| {
            outbound_route(svc, balanced, res, &route_registry, &metrics, &tracing)
        }),
    });
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

/// The policy layers of one outbound service, over its balancer, outermost first:
///
/// - the overall deadline (`timeout`, or a gRPC client's shorter
///   `grpc-timeout`; retries and backoff included: 504 "overall timeout");
/// - replay buffering, which decides whether a request may be retried at all
///   (method or `x-trellis-retryable`, body size);
/// - a counter of tries, for the spans' `http.request.resend_count`;
/// - tower's `Retry` with our policy (statuses, gRPC codes, 429 +
///   Retry-After, connect failures, per-try timeouts; backoff with full
///   jitter; the budget);
/// - a peek at a gRPC response's trailers when they come with its first
///   message, so the retry policy sees a status sent there;
/// - the client span, one per try, so retries are sibling spans;
/// - the circuit breaker, under the retry so it counts every try and an
///   open breaker is never retried;
/// - the per-try deadline, under the breaker so a try that runs out counts
///   as a timeout failure there (and 504 "per-try timeout" when final);
/// - the balancer, so every try picks an endpoint afresh; it refuses at
///   once when the service has no ready endpoint, a failure the breaker
///   counts (see [`FailFast`]).
///
/// Built per policy generation; the breaker and budget come from the
/// registry, which keeps them while their settings are unchanged.
fn outbound_route(
    svc: &ServiceName,
    balanced: Balanced,
    res: &Resilience,
    registry: &Registry,
    metrics: &Metrics,
    tracing: &Tracing,
) -> Balanced {
    let service: Arc<str> = svc.to_string().into();
    let breaker = registry.breaker(&service, breaker::Settings::from(&res.circuit_breaker));
    let budget = registry.budget(&service, &res.retry.budget);
    let settings = Arc::new(retry::Settings::from(&res.retry));
    let policy = RetryPolicy::new(settings.clone(), budget, metrics.clone(), service.clone());

    let per_try = TryTimeout::new(
        balanced,
        res.per_try_timeout.map(|d| d.get()),
        service.clone(),
    );
    let guarded = BreakerService::new(per_try, breaker);
    let traced = ClientSpan::new(guarded, tracing.clone(), service.clone());
    let retrying = CountTries::new(tower::retry::Retry::new(policy, PeekTrailers::new(traced)));
    let replayable = Replayable::new(retrying, settings);
    BoxCloneSyncService::new(Overall::new(replayable, res.timeout.get(), service))
}

/// The inbound listener's stack.
pub fn inbound(parts: &StackParts) -> ListenerService {
    let to_app = ToApp::new(parts.client.clone(), parts.policy.clone(), parts.app_host);
    let metrics = parts.metrics.clone();
    // Kept across reloads while their settings are unchanged: the bucket
    // (a reload must not hand out a fresh burst) and the semaphore
    // (requests in flight keep counting).
    let buckets: Arc<Mutex<Option<Arc<TokenBucket>>>> = Arc::default();
    let permits = Arc::new(Permits::default());
    let per_policy = PerPolicy::new(parts.policy.clone(), move |state| {
        let bucket = state
            .policy
            .as_ref()
            .and_then(|p| p.inbound.rate_limit.as_ref())
            .map(|spec| {
                let mut cur = buckets.lock().expect("bucket lock");
                match &*cur {
                    Some(b) if b.spec() == spec => b.clone(),
                    _ => {
                        let b = Arc::new(TokenBucket::new(spec));
                        *cur = Some(b.clone());
                        b
                    }
                }
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

/// The inbound protections of one policy over the forwarder: the rate
/// limit (429), then the concurrency limit (503 at once when full), then
/// the timeout (504).
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
    let svc = ServiceBuilder::new()
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
