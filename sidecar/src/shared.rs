//! One `&mut` service shared by every request, without a task of its own.
//!
//! tower's balancer needs `&mut self` to pick an endpoint, so the requests
//! of every connection must take turns on it. tower's `Buffer` gives it a
//! task and sends each request there through a channel, with a oneshot
//! back: a task hop, a channel message and often a wake-up of the other
//! worker thread per request. [`Shared`] lets each request drive the
//! service itself instead, under a lock held only while the service is
//! polled for readiness and called; the response future then runs in the
//! request's own task.
//!
//! A service that is not ready keeps one waker, the one it was last polled
//! with, while several requests may be waiting for it. So it is always
//! polled with the waker of its [`Waiters`], which wakes every waiting
//! request; each polls again and the first to find it ready takes it.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use pin_project_lite::pin_project;
use tower::Service;

use crate::http::BoxError;

/// A service shared by its clones; see the module docs.
pub struct Shared<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S> {
    service: Mutex<S>,
    waiters: Arc<Waiters>,
    /// `waiters` as a waker, made once.
    waker: Waker,
}

impl<S> Shared<S> {
    /// Shares `service`.
    pub fn new(service: S) -> Self {
        let waiters = Arc::new(Waiters::default());
        Self {
            inner: Arc::new(Inner {
                service: Mutex::new(service),
                waker: Waker::from(waiters.clone()),
                waiters,
            }),
        }
    }
}

impl<S, Req> Service<Req> for Shared<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Call<S, Req>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The service's own readiness is awaited in the call's future, as
        // behind a `Buffer`: inside the try, and so within its deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        Call {
            state: State::Waiting {
                req: Some(req),
                shared: self.inner.clone(),
                slot: Slot {
                    waiters: self.inner.waiters.clone(),
                    id: None,
                },
            },
        }
    }
}

pin_project! {
    /// A request on its way through a [`Shared`] service.
    pub struct Call<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        /// Waiting for the service to be ready.
        Waiting {
            req: Option<Req>,
            shared: Arc<Inner<S>>,
            slot: Slot,
        },
        /// Called: the service's response future.
        Called {
            #[pin]
            future: S::Future,
        },
    }
}

impl<S, Req> Future for Call<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        let future = match state.as_mut().project() {
            StateProj::Called { future } => return future.poll(cx).map_err(Into::into),
            StateProj::Waiting { req, shared, slot } => {
                let epoch = shared.waiters.epoch.load(Ordering::Acquire);
                let Ok(mut service) = shared.service.lock() else {
                    return Poll::Ready(Err("a shared service panicked".into()));
                };
                match service.poll_ready(&mut Context::from_waker(&shared.waker)) {
                    Poll::Ready(Ok(())) => {
                        let req = req.take().expect("a request is called once");
                        service.call(req)
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => {
                        drop(service);
                        slot.register(cx.waker());
                        // A wake-up between the poll and the registration
                        // found this request not yet listed: poll again.
                        if shared.waiters.epoch.load(Ordering::Acquire) != epoch {
                            cx.waker().wake_by_ref();
                        }
                        return Poll::Pending;
                    }
                }
            }
        };
        state.set(State::Called { future });
        match state.project() {
            StateProj::Called { future } => future.poll(cx).map_err(Into::into),
            StateProj::Waiting { .. } => unreachable!("just called"),
        }
    }
}

/// The requests waiting for a shared service to be ready.
#[derive(Default)]
struct Waiters {
    list: Mutex<WaitList>,
    /// Counts wake-ups, so a request can tell one happened while it was
    /// registering.
    epoch: AtomicU64,
}

#[derive(Default)]
struct WaitList {
    next_id: u64,
    wakers: Vec<(u64, Waker)>,
}

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let wakers = std::mem::take(&mut self.list.lock().expect("waiters lock").wakers);
        for (_, waker) in wakers {
            waker.wake();
        }
    }
}

/// A request's place in [`Waiters`], given up when the request is called
/// or dropped, so requests that gave up waiting leave nothing behind.
struct Slot {
    waiters: Arc<Waiters>,
    id: Option<u64>,
}

impl Slot {
    fn register(&mut self, waker: &Waker) {
        let mut list = self.waiters.list.lock().expect("waiters lock");
        let id = *self.id.get_or_insert_with(|| {
            list.next_id += 1;
            list.next_id
        });
        match list.wakers.iter_mut().find(|(i, _)| *i == id) {
            Some((_, w)) => w.clone_from(waker),
            None => list.wakers.push((id, waker.clone())),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut list = self.waiters.list.lock().expect("waiters lock");
            list.wakers.retain(|(i, _)| *i != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;

    /// Ready once opened; like the balancer, it keeps only the waker it
    /// was last polled with.
    #[derive(Clone, Default)]
    struct Gate(Arc<Mutex<(bool, Option<Waker>)>>);

    impl Gate {
        fn open(&self) {
            let mut g = self.0.lock().unwrap();
            g.0 = true;
            if let Some(w) = g.1.take() {
                w.wake();
            }
        }
    }

    impl Service<u32> for Gate {
        type Response = u32;
        type Error = BoxError;
        type Future = std::future::Ready<Result<u32, BoxError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            let mut g = self.0.lock().unwrap();
            if g.0 {
                return Poll::Ready(Ok(()));
            }
            g.1 = Some(cx.waker().clone());
            Poll::Pending
        }

        fn call(&mut self, n: u32) -> Self::Future {
            std::future::ready(Ok(n))
        }
    }

    #[tokio::test]
    async fn every_waiting_request_is_served_once_the_service_is_ready() {
        let gate = Gate::default();
        let shared = Shared::new(gate.clone());
        let calls: Vec<_> = (0..8)
            .map(|n| tokio::spawn(shared.clone().oneshot(n)))
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(calls.iter().all(|c| !c.is_finished()));
        gate.open();
        let mut served = Vec::new();
        for c in calls {
            let done = tokio::time::timeout(Duration::from_secs(5), c).await;
            served.push(done.expect("served in time").unwrap().unwrap());
        }
        served.sort_unstable();
        assert_eq!(served, (0..8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_request_that_gives_up_leaves_no_waker_behind() {
        let gate = Gate::default();
        let shared = Shared::new(gate.clone());
        for n in 0..4 {
            let call = shared.clone().oneshot(n);
            let waited = tokio::time::timeout(Duration::from_millis(5), call).await;
            assert!(waited.is_err());
        }
        assert!(shared.inner.waiters.list.lock().unwrap().wakers.is_empty());
        gate.open();
        assert_eq!(shared.clone().oneshot(9).await.unwrap(), 9);
    }
}
