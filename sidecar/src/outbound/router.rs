//! The router: which stack a request goes to. Each upstream service has
//! one, a balancer with the policy's layers on top, created on first use
//! and kept.
//!
//! A request's destination is a service of the mesh when its host names a
//! Service (`user`, `user.shop`, `user.shop.svc.cluster.local`) in a
//! namespace the sidecar may read — its own, or one its dependencies name —
//! and that Service exists or is a declared dependency. Anything else —
//! `example.com`, which reads as Service `example` in a namespace `com` the
//! sidecar may not read, a name that is no Service, an IP address — is
//! outside the mesh, and [`EgressForwarder`] forwards or refuses it as the
//! policy's `egress` says. So no host an application calls can start a
//! watch the sidecar is not allowed, or hold its readiness.
//!
//! The balancer of a service lives as long as the sidecar, so its load
//! estimates and warm connections survive policy changes; the policy layers
//! above it are rebuilt when a new policy is applied. Requests already in
//! flight keep the stack they started with.
//!
//! A route once worked out is kept in a [`RouteCache`] for the authority
//! and policy generation it was made for, so the requests after the first
//! skip parsing and lookups.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use tokio::sync::watch;
use tower::{Service, ServiceExt};
use trellis_policy::SidecarPolicy;

use super::{
    ServiceStack,
    egress::{EgressForwarder, External},
    route_cache::{Route, RouteCache, authority_key},
    target::{NameRules, ServiceName, ServiceTarget, authority_of, is_host},
};
use crate::{
    discovery::{Discovered, EndpointsWatch, Resolver},
    http::{
        Body, BoxError,
        response::{ProxyError, error_response},
    },
    metrics::ServiceLabel,
    policy_watch::PolicyState,
    reload::Kept,
};

/// Builds the two parts of a service's stack; the router decides when.
pub trait MakeServiceStack: Send + Sync + 'static {
    /// The balancer over `target`'s endpoints, made once per service and
    /// kept for the sidecar's life.
    fn balancer(&self, target: &ServiceTarget, endpoints: EndpointsWatch) -> ServiceStack;

    /// The policy layers over `balancer`, made for each policy generation.
    fn policy_layers(&self, target: &ServiceTarget, balancer: ServiceStack) -> ServiceStack;
}

/// A service's balancer, and the policy layers over it for the generation
/// they were built for.
struct ServiceStacks {
    balancer: ServiceStack,
    layered: Kept<u64, ServiceStack>,
}

struct Inner {
    rules: NameRules,
    resolver: Resolver,
    policy: watch::Receiver<PolicyState>,
    make: Arc<dyn MakeServiceStack>,
    discovery_timeout: Duration,
    egress: EgressForwarder,
    services: Mutex<HashMap<ServiceName, ServiceStacks>>,
    routes: RouteCache,
}

/// Sends each request to the stack of the service it names; answers itself
/// (503 naming the service) when the service is unknown or discovery has
/// not answered in time.
#[derive(Clone)]
pub struct Router(Arc<Inner>);

/// What a [`Router`] needs.
pub struct RouterParts {
    /// How names complete.
    pub rules: NameRules,
    /// Where endpoints come from.
    pub resolver: Resolver,
    /// The policy in force.
    pub policy: watch::Receiver<PolicyState>,
    /// Builds each service's stack.
    pub make: Arc<dyn MakeServiceStack>,
    /// How long a request waits for discovery's first answer about a new name.
    pub discovery_timeout: Duration,
    /// Where calls outside the mesh go.
    pub egress: EgressForwarder,
}

impl Router {
    /// A router with no services yet.
    pub fn new(parts: RouterParts) -> Self {
        Self(Arc::new(Inner {
            rules: parts.rules,
            resolver: parts.resolver,
            policy: parts.policy,
            make: parts.make,
            discovery_timeout: parts.discovery_timeout,
            egress: parts.egress,
            services: Mutex::default(),
            routes: RouteCache::default(),
        }))
    }
}

/// Where a request goes.
enum Destination {
    /// A service of the mesh, through its stack.
    Mesh(ServiceName, External),
    /// Outside the mesh.
    External(External),
}

/// Whether the sidecar may read `target`'s namespace (see
/// [`SidecarPolicy::may_read`]); before any policy, its own only.
fn readable(rules: &NameRules, policy: Option<&SidecarPolicy>, target: &ServiceName) -> bool {
    target.namespace == rules.default_namespace
        || policy.is_some_and(|p| p.may_read(&target.namespace))
}

/// Whether `target` is one of the policy's dependencies.
pub fn declared(policy: Option<&SidecarPolicy>, target: &ServiceName) -> bool {
    policy.is_some_and(|p| p.dependency(&target.name, &target.namespace).is_some())
}

impl Inner {
    /// Where `req` goes (see the module docs).
    fn destination<B>(&self, req: &Request<B>) -> Result<Destination, ProxyError> {
        let (host, port) = authority_of(req)?;
        let parsed = self.rules.parse_host(&host);
        let external = External {
            port: port.unwrap_or(80),
            host,
        };
        match parsed {
            Ok(svc) => {
                let state = self.policy.borrow();
                if readable(&self.rules, state.policy.as_deref(), &svc) {
                    return Ok(Destination::Mesh(svc, external));
                }
            }
            Err(e) if !is_host(&external.host) => return Err(e),
            Err(_) => {}
        }
        Ok(Destination::External(external))
    }

    /// The stack of `target`, building what is missing or stale.
    fn stack_for(&self, target: &ServiceTarget, endpoints: EndpointsWatch) -> ServiceStack {
        let mut services = self.services.lock().expect("services lock");
        let stacks = services
            .entry(target.name.clone())
            .or_insert_with(|| ServiceStacks {
                balancer: self.make.balancer(target, endpoints),
                layered: Kept::default(),
            });
        let balancer = stacks.balancer.clone();
        stacks.layered.get_or_make(&target.generation, || {
            self.make.policy_layers(target, balancer)
        })
    }

    /// Sends `req` on to the stack of service `name`; a `name` that is no
    /// Service and no declared dependency is outside the mesh after all,
    /// and goes to `external`. Returns the label the request is counted
    /// under.
    async fn to_service(
        &self,
        name: ServiceName,
        external: External,
        req: Request<Body>,
    ) -> (Arc<str>, Result<Response<Body>, BoxError>) {
        let key: Option<Box<[u8]>> = authority_key(&req).map(Into::into);
        let target = {
            let state = self.policy.borrow();
            ServiceTarget::new(name, state.policy.as_deref(), state.generation)
        };
        let label = target.label.clone();
        let mut endpoints = self.resolver.resolve(&target.name);
        // A name seen for the first time may still be loading; wait briefly
        // for discovery's first answer rather than failing at once.
        let state = tokio::time::timeout(
            self.discovery_timeout,
            endpoints.wait_for(|d| *d != Discovered::Pending),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map_or(Discovered::Pending, |s| s.clone());
        match state {
            Discovered::Pending => {
                let e = ProxyError::DiscoveryPending(label.to_string());
                return (label, Err(e.into()));
            }
            Discovered::NotFound
                if declared(self.policy.borrow().policy.as_deref(), &target.name) =>
            {
                let e = ProxyError::UnknownService(label.to_string());
                return (label, Err(e.into()));
            }
            Discovered::NotFound => {
                let res = self.egress.forward(&external, req).await;
                return (external.label().into(), res);
            }
            // An empty set goes on to the stack: its breaker counts
            // "nobody serving" and answers for it while open.
            Discovered::Ready(_) => {}
        }
        let stack = self.stack_for(&target, endpoints.clone());
        if let Some(key) = key {
            self.routes.insert(
                &key,
                Route {
                    target,
                    endpoints,
                    stack: stack.clone(),
                },
            );
        }
        (label, call(stack, req).await)
    }

    /// The route kept for `req`'s authority under the policy in force, when
    /// its service is serving; `None` sends the request the full way.
    fn cached(&self, req: &Request<Body>) -> Option<Arc<Route>> {
        let key = authority_key(req)?;
        let generation = self.policy.borrow().generation;
        let route = self.routes.get(key, generation)?;
        // Anything but a known endpoint set (loading, or gone) is decided
        // afresh by `to_service`.
        let serving = matches!(*route.endpoints.borrow(), Discovered::Ready(_));
        serving.then_some(route)
    }
}

/// Sends `req` through `stack`.
fn call(
    stack: ServiceStack,
    req: Request<Body>,
) -> BoxFuture<'static, Result<Response<Body>, BoxError>> {
    // Boxed and named: spelling out the 'static future here avoids a rustc
    // limitation with boxed-error lifetimes inside async blocks.
    Box::pin(stack.oneshot(req))
}

impl Service<Request<Body>> for Router {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is per service, checked inside `call`: one slow service
        // must not hold up requests to the others.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = self.0.clone();
        async move {
            if req.method() == http::Method::CONNECT {
                // A tunnel would carry opaque bytes past every policy layer.
                let e = ProxyError::BadRequest(
                    "CONNECT tunnels are not supported: send plain HTTP to the outbound listener"
                        .into(),
                );
                return Ok(e.into_response());
            }
            let cached = inner.cached(&req);
            let (label, res) = match cached {
                Some(route) => (
                    route.target.label.clone(),
                    call(route.stack.clone(), req).await,
                ),
                None => match inner.destination(&req) {
                    Ok(Destination::Mesh(name, external)) => {
                        inner.to_service(name, external, req).await
                    }
                    Ok(Destination::External(external)) => (
                        external.label().into(),
                        inner.egress.forward(&external, req).await,
                    ),
                    Err(e) => return Ok(e.into_response()),
                },
            };
            let mut rsp = match res {
                Ok(rsp) => rsp,
                Err(e) => {
                    tracing::debug!(service = %label, error = %e, "outbound request failed");
                    error_response(e, Some(&label))
                }
            };
            rsp.extensions_mut().insert(ServiceLabel(label));
            Ok(rsp)
        }
        .boxed()
    }
}
