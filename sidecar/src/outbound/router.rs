//! Routes: one per upstream service, each a balancer with the policy's
//! layers on top, created on first use and kept.
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
use trellis_policy::{Resilience, SidecarPolicy};

use super::{
    egress::{EgressForwarder, External},
    target::{NameRules, ServiceName, authority_of, is_host},
};
use crate::{
    balance::Balanced,
    discovery::{Discovered, EndpointsWatch, Resolver},
    http::{
        Body, BoxError,
        response::{ProxyError, error_response},
    },
    metrics::ServiceLabel,
    policy_watch::PolicyState,
};

/// Builds the balancer of a service over its endpoints.
pub type MakeBalancer = Arc<dyn Fn(&ServiceName, EndpointsWatch) -> Balanced + Send + Sync>;

/// Builds the policy layers of a service over its balancer.
pub type MakePolicyStack =
    Arc<dyn Fn(&ServiceName, Balanced, &Resilience) -> Balanced + Send + Sync>;

struct Route {
    balancer: Balanced,
    /// The policy stack and the policy generation it was built for.
    stack: Option<(u64, Balanced)>,
}

struct Inner {
    rules: NameRules,
    resolver: Resolver,
    policy: watch::Receiver<PolicyState>,
    make_balancer: MakeBalancer,
    make_stack: MakePolicyStack,
    discovery_timeout: Duration,
    egress: EgressForwarder,
    routes: Mutex<HashMap<ServiceName, Route>>,
}

/// Sends each request to the route of the service it names; answers itself
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
    /// Builds balancers.
    pub make_balancer: MakeBalancer,
    /// Builds policy stacks.
    pub make_stack: MakePolicyStack,
    /// How long a request waits for discovery's first answer about a new name.
    pub discovery_timeout: Duration,
    /// Where calls outside the mesh go.
    pub egress: EgressForwarder,
}

impl Router {
    /// A router with no routes yet.
    pub fn new(parts: RouterParts) -> Self {
        Self(Arc::new(Inner {
            rules: parts.rules,
            resolver: parts.resolver,
            policy: parts.policy,
            make_balancer: parts.make_balancer,
            make_stack: parts.make_stack,
            discovery_timeout: parts.discovery_timeout,
            egress: parts.egress,
            routes: Mutex::default(),
        }))
    }
}

/// Where a request goes.
enum Destination {
    /// A service of the mesh, through its route.
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

/// The resilience settings for `target`: its dependency entry's, the
/// policy's defaults for an undeclared service, or the built-in defaults
/// before any policy arrives.
pub fn resilience_for(policy: Option<&SidecarPolicy>, target: &ServiceName) -> Resilience {
    let Some(p) = policy else {
        return Resilience::default();
    };
    p.dependency(&target.name, &target.namespace)
        .map_or_else(|| p.resilience.clone(), |d| p.effective(d))
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

    /// The current stack of `target`, building what is missing or stale.
    fn stack_for(&self, target: &ServiceName, watch: EndpointsWatch) -> Balanced {
        let (generation, resilience) = {
            let state = self.policy.borrow();
            (
                state.generation,
                resilience_for(state.policy.as_deref(), target),
            )
        };
        let mut routes = self.routes.lock().expect("routes lock");
        let route = routes.entry(target.clone()).or_insert_with(|| Route {
            balancer: (self.make_balancer)(target, watch),
            stack: None,
        });
        match &route.stack {
            Some((g, stack)) if *g == generation => stack.clone(),
            _ => {
                let stack = (self.make_stack)(target, route.balancer.clone(), &resilience);
                route.stack = Some((generation, stack.clone()));
                stack
            }
        }
    }

    /// Sends `req` on to `target`'s route; a `target` that is no Service
    /// and no declared dependency is outside the mesh after all, and goes to
    /// `external`. Returns the label the request is counted under.
    async fn route(
        &self,
        target: &ServiceName,
        external: External,
        req: Request<Body>,
    ) -> (String, Result<Response<Body>, BoxError>) {
        let label = target.to_string();
        let mut watch = self.resolver.resolve(target);
        // A name seen for the first time may still be loading; wait briefly
        // for discovery's first answer rather than failing at once.
        let state = tokio::time::timeout(
            self.discovery_timeout,
            watch.wait_for(|d| *d != Discovered::Pending),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map_or(Discovered::Pending, |s| s.clone());
        match state {
            Discovered::Pending => {
                let e = ProxyError::DiscoveryPending(label.clone());
                return (label, Err(e.into()));
            }
            Discovered::NotFound if declared(self.policy.borrow().policy.as_deref(), target) => {
                let e = ProxyError::UnknownService(label.clone());
                return (label, Err(e.into()));
            }
            Discovered::NotFound => {
                return (external.label(), self.egress.forward(&external, req).await);
            }
            // An empty set goes on to the route: its breaker counts
            // "nobody serving" and answers for it while open.
            Discovered::Ready(_) => {}
        }
        // Boxed and named: spelling out the 'static future here avoids a
        // rustc limitation with boxed-error lifetimes inside async blocks.
        let call: BoxFuture<'static, Result<Response<Body>, BoxError>> =
            Box::pin(self.stack_for(target, watch).oneshot(req));
        (label, call.await)
    }
}

impl Service<Request<Body>> for Router {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is per route, checked inside `call`: one slow service
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
            let (label, res) = match inner.destination(&req) {
                Ok(Destination::Mesh(target, external)) => {
                    inner.route(&target, external, req).await
                }
                Ok(Destination::External(external)) => {
                    (external.label(), inner.egress.forward(&external, req).await)
                }
                Err(e) => return Ok(e.into_response()),
            };
            let label: Arc<str> = label.into();
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

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_policy::{Dependency, Duration as PDuration};

    #[test]
    fn picks_the_dependency_overrides_then_the_defaults() {
        let mut p =
            SidecarPolicy::from_json(r#"{"service":"order","namespace":"shop","appPort":8080}"#)
                .unwrap();
        p.dependencies.push(Dependency {
            timeout: Some(PDuration::from_millis(800)),
            ..Dependency::named("user")
        });
        p.dependencies.push(Dependency {
            namespace: Some("other".into()),
            timeout: Some(PDuration::from_millis(100)),
            ..Dependency::named("product")
        });
        let t = |n, ns| resilience_for(Some(&p), &ServiceName::new(n, ns)).timeout;
        assert_eq!(t("user", "shop"), PDuration::from_millis(800));
        assert_eq!(t("product", "other"), PDuration::from_millis(100));
        assert_eq!(t("product", "shop"), PDuration::from_secs(2));
        assert_eq!(t("user", "other"), PDuration::from_secs(2));
        assert_eq!(
            resilience_for(None, &ServiceName::new("x", "y")),
            Resilience::default()
        );
    }
}
