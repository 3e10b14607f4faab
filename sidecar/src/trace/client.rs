//! The client span: one per outbound try.
//!
//! It sits under the retry layer and over the circuit breaker, so every try
//! — the first and each retry — is its own span, a sibling of the others
//! under the app's span (whose context the app copied onto its request), and
//! a breaker refusal or per-try timeout ends that try's span with an event.
//! The callee's sidecar receives the try's own span as its parent.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context as TaskContext, Poll, ready},
};

use http::{Request, Response};
use opentelemetry::{
    KeyValue,
    trace::{SpanBuilder, SpanKind, TraceContextExt},
};
use pin_project_lite::pin_project;
use tower::Service;

use super::{Tracing, propagation, span::Guard};
use crate::http::BoxError;

/// The tries of one logical call so far, shared by the copies the retry
/// layer makes of the request (an extension put on it above the retry).
#[derive(Clone, Debug, Default)]
pub struct Tries(Arc<AtomicU32>);

/// Puts a fresh [`Tries`] counter on each request, above the retry layer.
#[derive(Clone, Debug)]
pub struct CountTries<S> {
    inner: S,
}

impl<S> CountTries<S> {
    /// Counts tries of requests passed to `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> Service<Request<B>> for CountTries<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(Tries::default());
        self.inner.call(req)
    }
}

/// Makes a client span for each try to `service`.
#[derive(Clone, Debug)]
pub struct ClientSpan<S> {
    inner: S,
    tracing: Tracing,
    service: Arc<str>,
}

impl<S> ClientSpan<S> {
    /// Spans for tries to `service` from `tracing`'s tracer.
    pub fn new(inner: S, tracing: Tracing, service: Arc<str>) -> Self {
        Self {
            inner,
            tracing,
            service,
        }
    }
}

impl<S, B, RB> Service<Request<B>> for ClientSpan<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ClientFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Counted whether or not this try is sampled: each try without a
        // parent decides on its own.
        let resend = req
            .extensions()
            .get::<Tries>()
            .map_or(0, |t| t.0.fetch_add(1, Ordering::Relaxed));
        // Unsampled (or tracing off): no span, the context is propagated by
        // `decide` alone.
        let Some(sampled) = self.tracing.decide(req.headers_mut()) else {
            return ClientFuture {
                inner: self.inner.call(req),
                guard: None,
            };
        };
        let parent = propagation::extract(req.headers());
        let (name, mut attrs) = super::span::describe(&req);
        // `name.namespace`: the address; the name alone is the peer's service.
        let address = self.service.to_string();
        let peer = address.split('.').next().unwrap_or_default().to_owned();
        let url = format!("http://{address}{}", req.uri().path());
        attrs.extend([
            KeyValue::new("server.address", address),
            KeyValue::new("peer.service", peer),
            KeyValue::new("url.full", url),
        ]);
        if resend > 0 {
            attrs.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(resend),
            ));
        }
        let span = sampled.start(
            SpanBuilder::from_name(name)
                .with_kind(SpanKind::Client)
                .with_attributes(attrs),
            &parent,
        );
        let cx = parent.with_span(span);
        propagation::inject(&cx, req.headers_mut());
        ClientFuture {
            inner: self.inner.call(req),
            guard: Some(Guard::new(cx, SpanKind::Client)),
        }
    }
}

pin_project! {
    /// The try's response future, recording into its span when it resolves.
    pub struct ClientFuture<F> {
        #[pin]
        inner: F,
        guard: Option<Guard>,
    }
}

impl<F, RB> std::future::Future for ClientFuture<F>
where
    F: std::future::Future<Output = Result<Response<RB>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let Some(guard) = this.guard.as_mut() {
            match &out {
                Ok(rsp) => guard.respond(rsp),
                Err(e) => guard.fail(e),
            }
        }
        Poll::Ready(out)
    }
}
