//! Services rebuilt when the policy changes.
//!
//! A stack built from a policy (the inbound rate limit, concurrency limit
//! and timeout) is kept and shared by every connection until a new policy is
//! applied; the next request then builds the new stack, and requests still
//! in flight finish on the old one. No request is dropped by a reload.

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use crate::policy_watch::PolicyState;

type Make<S> = Arc<dyn Fn(&PolicyState) -> S + Send + Sync>;

/// A service made from the policy in force, remade when it changes.
pub struct PerPolicy<S> {
    policy: watch::Receiver<PolicyState>,
    make: Make<S>,
    current: Arc<Mutex<Option<(u64, S)>>>,
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
        match &*current {
            Some((g, svc)) if *g == state.generation => svc.clone(),
            _ => {
                let svc = (self.make)(&state);
                *current = Some((state.generation, svc.clone()));
                svc
            }
        }
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
