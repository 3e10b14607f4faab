//! What a policy reload rebuilds and what it keeps.
//!
//! A stack built from a policy (the inbound rate limit, concurrency limit
//! and timeout) is kept and shared by every connection until a new policy is
//! applied ([`PerPolicy`]); the next request then builds the new stack, and
//! requests still in flight finish on the old one. No request is dropped by
//! a reload. State inside a stack that must survive a reload while its own
//! settings are unchanged (a breaker, a retry budget, a token bucket, a
//! semaphore) is held in a [`Kept`].

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use crate::policy_watch::PolicyState;

/// A value made from some settings (or a policy generation), kept while
/// they are unchanged and made afresh when they change.
#[derive(Debug)]
pub struct Kept<K, T>(Option<(K, T)>);

impl<K, T> Default for Kept<K, T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<K: PartialEq + Clone, T: Clone> Kept<K, T> {
    /// The value for `key`: the kept one if it was made for an equal key,
    /// else a new one from `make`, which replaces it.
    pub fn get_or_make(&mut self, key: &K, make: impl FnOnce() -> T) -> T {
        match &self.0 {
            Some((k, v)) if k == key => v.clone(),
            _ => {
                let v = make();
                self.0 = Some((key.clone(), v.clone()));
                v
            }
        }
    }

    /// Whether a value made for another key is kept, which
    /// [`get_or_make`](Self::get_or_make) with `key` would replace.
    pub fn is_stale(&self, key: &K) -> bool {
        self.0.as_ref().is_some_and(|(k, _)| k != key)
    }

    /// The value kept, if any.
    pub fn value(&self) -> Option<&T> {
        self.0.as_ref().map(|(_, v)| v)
    }
}

type Make<S> = Arc<dyn Fn(&PolicyState) -> S + Send + Sync>;

/// A service made from the policy in force, remade when it changes.
pub struct PerPolicy<S> {
    policy: watch::Receiver<PolicyState>,
    make: Make<S>,
    current: Arc<Mutex<Kept<u64, S>>>,
}

impl<S> Clone for PerPolicy<S> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
            make: self.make.clone(),
            current: self.current.clone(),
        }
    }
}

impl<S: Clone> PerPolicy<S> {
    /// Builds with `make` from the policy in `policy`, now and on each change.
    pub fn new(
        policy: watch::Receiver<PolicyState>,
        make: impl Fn(&PolicyState) -> S + Send + Sync + 'static,
    ) -> Self {
        Self {
            policy,
            make: Arc::new(make),
            current: Arc::default(),
        }
    }

    fn service(&self) -> S {
        let state = self.policy.borrow();
        let mut current = self.current.lock().expect("per-policy lock");
        current.get_or_make(&state.generation, || (self.make)(&state))
    }
}

impl<S, Req> Service<Req> for PerPolicy<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // The stack is chosen per request (the policy may change between
        // poll_ready and call), so readiness is awaited inside `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        Box::pin(self.service().oneshot(req))
    }
}
