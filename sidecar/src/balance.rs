//! Load balancing: power of two choices over peak-EWMA latency.
//!
//! tower's p2c [`Balance`] picks two ready endpoints at random and sends to
//! the one with the lower load; [`PeakEwmaDiscover`] gives each endpoint a
//! load equal to its peak-sensitive moving average of round-trip time times
//! its requests in flight, so a slow or overloaded endpoint quickly gets less
//! traffic. The endpoint set comes from discovery as a stream of tower
//! [`Change`]s, computed here by diffing each new set against the last.
//!
//! The balancer is a single `&mut` service, shared by every request through
//! [`Shared`]: each request takes it in turn, in its own task, to pick an
//! endpoint, with no task or channel between the two.

use std::{
    collections::{BTreeSet, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, stream};
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tower::{
    Service,
    balance::p2c::Balance,
    discover::Change,
    load::{PeakEwmaDiscover, completion::TrackCompletion, peak_ewma},
    util::BoxCloneSyncService,
};

use crate::{
    discovery::{Discovered, EndpointsWatch},
    http::{Body, BoxError, boxed},
    outbound::ServiceStack,
    shared::Shared,
};

/// Tuning of the balancer.
#[derive(Clone, Debug)]
pub struct BalanceConfig {
    /// The latency assumed for an endpoint before it has answered anything.
    pub default_rtt: Duration,
    /// How fast the latency estimate forgets the past.
    pub decay: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            // Linkerd's defaults: a new endpoint is assumed fast (30 ms) so it
            // gets tried, and the estimate decays over 10 s.
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }
}

/// Builds the balancer of one upstream over the endpoints in `watch`, with
/// `make` building the service for each endpoint.
pub fn balancer<E, F>(watch: EndpointsWatch, make: F, cfg: &BalanceConfig) -> ServiceStack
where
    F: Fn(SocketAddr) -> E + Send + 'static,
    E: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Send + 'static,
    E::Future: Send + 'static,
{
    let discover = endpoint_changes(watch, make);
    let discover = PeakEwmaDiscover::new::<Request<Body>>(
        discover,
        cfg.default_rtt,
        cfg.decay,
        CompleteOnBodyEnd,
    );
    let balance = Balance::new(Box::pin(discover));
    BoxCloneSyncService::new(Shared::new(balance))
}

/// Turns a watch of endpoint sets into the insert/remove stream tower's
/// [`Discover`](tower::discover::Discover) expects.
pub fn endpoint_changes<E, F>(
    watch: EndpointsWatch,
    make: F,
) -> impl Stream<Item = Result<Change<SocketAddr, E>, Infallible>> + Send
where
    F: Fn(SocketAddr) -> E + Send + 'static,
    E: Send + 'static,
{
    struct State<F> {
        watch: EndpointsWatch,
        current: BTreeSet<SocketAddr>,
        pending: VecDeque<Change<SocketAddr, SocketAddr>>,
        make: F,
        first: bool,
    }
    let state = State {
        watch,
        current: BTreeSet::new(),
        pending: VecDeque::new(),
        make,
        first: true,
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(change) = s.pending.pop_front() {
                let change = match change {
                    Change::Insert(addr, _) => Change::Insert(addr, (s.make)(addr)),
                    Change::Remove(addr) => Change::Remove(addr),
                };
                return Some((Ok(change), s));
            }
            if !std::mem::take(&mut s.first) && s.watch.changed().await.is_err() {
                // Discovery stopped publishing (shutdown): keep the last set.
                futures::future::pending::<()>().await;
            }
            let next: BTreeSet<SocketAddr> = match &*s.watch.borrow_and_update() {
                Discovered::Ready(set) => (**set).clone(),
                Discovered::NotFound => BTreeSet::new(),
                // Nothing known yet: neither add nor remove.
                Discovered::Pending => continue,
            };
            s.pending
                .extend(s.current.difference(&next).map(|a| Change::Remove(*a)));
            s.pending
                .extend(next.difference(&s.current).map(|a| Change::Insert(*a, *a)));
            s.current = next;
        }
    })
}

/// Counts a request as in flight until its response body ends, not just
/// until the headers arrive: a streaming or large response keeps loading
/// its endpoint for as long as it is being sent. tower's own
/// `CompleteOnResponse` stops at the headers, which hides exactly the
/// expensive requests from the balancer.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompleteOnBodyEnd;

impl TrackCompletion<peak_ewma::Handle, Response<Body>> for CompleteOnBodyEnd {
    type Output = Response<Body>;

    fn track_completion(&self, handle: peak_ewma::Handle, rsp: Response<Body>) -> Response<Body> {
        rsp.map(|inner| {
            boxed(TrackedBody {
                inner,
                handle: Some(handle),
            })
        })
    }
}

/// A body that holds a load handle until its last frame (or until dropped).
struct TrackedBody<H> {
    inner: Body,
    handle: Option<H>,
}

impl<H: Unpin> HttpBody for TrackedBody<H> {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.handle = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use std::sync::Arc;
    use tokio::sync::watch;

    use super::*;

    fn set(addrs: &[&str]) -> Discovered {
        Discovered::Ready(Arc::new(addrs.iter().map(|a| a.parse().unwrap()).collect()))
    }

    fn describe(c: &Change<SocketAddr, SocketAddr>) -> String {
        match c {
            Change::Insert(k, _) => format!("+{k}"),
            Change::Remove(k) => format!("-{k}"),
        }
    }

    #[tokio::test]
    async fn diffs_successive_sets() {
        let (tx, rx) = watch::channel(Discovered::Pending);
        let mut changes = Box::pin(endpoint_changes(rx, |a| a));
        tx.send(set(&["127.0.0.1:1", "127.0.0.1:2"])).unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(describe(&changes.next().await.unwrap().unwrap()));
        }
        assert_eq!(seen, ["+127.0.0.1:1", "+127.0.0.1:2"]);

        tx.send(set(&["127.0.0.1:2", "127.0.0.1:3"])).unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(describe(&changes.next().await.unwrap().unwrap()));
        }
        assert_eq!(seen, ["-127.0.0.1:1", "+127.0.0.1:3"]);

        tx.send(Discovered::NotFound).unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(describe(&changes.next().await.unwrap().unwrap()));
        }
        assert_eq!(seen, ["-127.0.0.1:2", "-127.0.0.1:3"]);
    }
}
