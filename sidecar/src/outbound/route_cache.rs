//! The routes the router has already worked out, by the authority a request
//! names.
//!
//! Working out a route takes parsing the authority, completing the name,
//! reading the policy's settings for the service and finding its stack:
//! several allocations and map lookups that give the same answer for every
//! request to the same authority under the same policy. [`RouteCache`]
//! keeps that answer, keyed by the authority exactly as the request spelt
//! it, and valid for the policy generation it was made under; a request
//! under a newer policy works its route out again and replaces the entry.
//!
//! Only routes to services that had endpoints when the route was made are
//! kept (their stacks exist); a name still loading, unknown or outside the
//! mesh takes the full path every time, so what discovery says about it is
//! read afresh.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{Arc, Mutex},
};

use http::{Request, header};

use super::{ServiceStack, target::ServiceTarget};
use crate::discovery::EndpointsWatch;

/// Routes kept at most. Past this the cache starts afresh: an application
/// naming ever new hosts cannot grow it without bound, and routes in use
/// are back after one request each.
const CAPACITY: usize = 256;

/// A route to a service of the mesh, as worked out for one authority.
pub struct Route {
    /// The service, with the settings of the policy generation the route
    /// was made under.
    pub target: ServiceTarget,
    /// The service's endpoints.
    pub endpoints: EndpointsWatch,
    /// The service's stack for that generation.
    pub stack: ServiceStack,
}

/// The authority a request names, as sent: the URI's when it is in proxy
/// form (or HTTP/2), else `Host`. The same bytes always resolve to the same
/// route under one policy, whichever of the two carried them.
pub fn authority_key<B>(req: &Request<B>) -> Option<&[u8]> {
    match req.uri().authority() {
        Some(a) if req.uri().host().is_some() => Some(a.as_str().as_bytes()),
        _ => req.headers().get(header::HOST).map(|v| v.as_bytes()),
    }
}

/// Routes by authority bytes.
type Routes = HashMap<Box<[u8]>, Arc<Route>, BuildHasherDefault<Fnv>>;

/// Routes by authority; see the module docs.
#[derive(Default)]
pub struct RouteCache {
    routes: Mutex<Routes>,
}

impl RouteCache {
    /// The route kept for `authority`, if it was made under `generation`.
    pub fn get(&self, authority: &[u8], generation: u64) -> Option<Arc<Route>> {
        let routes = self.routes.lock().expect("route cache lock");
        routes
            .get(authority)
            .filter(|r| r.target.generation == generation)
            .cloned()
    }

    /// Keeps `route` for `authority`, replacing any older one.
    pub fn insert(&self, authority: &[u8], route: Route) {
        let mut routes = self.routes.lock().expect("route cache lock");
        if routes.len() >= CAPACITY && !routes.contains_key(authority) {
            routes.clear();
        }
        routes.insert(authority.into(), Arc::new(route));
    }
}

/// FNV-1a: a few instructions per byte for keys a dozen bytes long, where
/// the standard SipHash costs more than the lookup it serves. The keys
/// come from the local application, and the cache is small and cleared
/// when full, so collisions chosen by a caller cost little.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_by_the_authority_either_way_it_is_sent() {
        let req = Request::get("http://user.shop:8080/a")
            .header("host", "ignored")
            .body(())
            .unwrap();
        assert_eq!(authority_key(&req), Some(&b"user.shop:8080"[..]));
        let req = Request::get("/a").header("host", "user").body(()).unwrap();
        assert_eq!(authority_key(&req), Some(&b"user"[..]));
        let req = Request::get("/a").body(()).unwrap();
        assert_eq!(authority_key(&req), None);
    }

    fn route(generation: u64) -> Route {
        let name = crate::outbound::target::ServiceName::new("user", "shop");
        let stack = tower::util::BoxCloneSyncService::new(tower::service_fn(
            |_: Request<crate::http::Body>| async {
                Ok::<_, crate::http::BoxError>(http::Response::new(crate::http::empty()))
            },
        ));
        Route {
            target: ServiceTarget::new(name, None, generation),
            endpoints: tokio::sync::watch::channel(crate::discovery::Discovered::Pending).1,
            stack,
        }
    }

    #[test]
    fn keeps_a_route_for_its_generation_only_and_stays_bounded() {
        let cache = RouteCache::default();
        cache.insert(b"user", route(1));
        assert!(cache.get(b"user", 1).is_some());
        assert!(cache.get(b"user", 2).is_none(), "made under another policy");
        assert!(cache.get(b"User", 1).is_none());
        cache.insert(b"user", route(2));
        assert!(cache.get(b"user", 2).is_some());
        for i in 0..CAPACITY * 2 {
            cache.insert(format!("host-{i}").as_bytes(), route(2));
        }
        assert!(cache.routes.lock().unwrap().len() <= CAPACITY);
    }
}
