//! The server span: one per inbound request, the parent of everything the
//! app does for it.

use std::{
    pin::Pin,
    task::{Context as TaskContext, Poll, ready},
};

use http::{Request, Response};
use opentelemetry::{
    KeyValue,
    trace::{SpanBuilder, SpanKind, TraceContextExt},
};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{Tracing, propagation, span::Guard};
use crate::{mtls::Peer, server::ClientAddr};

/// Wraps the inbound stack in [`ServerSpan`].
#[derive(Clone, Debug)]
pub struct ServerSpanLayer {
    tracing: Tracing,
}

impl ServerSpanLayer {
    /// Spans from `tracing`'s tracer (none when tracing is off).
    pub fn new(tracing: Tracing) -> Self {
        Self { tracing }
    }
}

impl<S> Layer<S> for ServerSpanLayer {
    type Service = ServerSpan<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerSpan {
            inner,
            tracing: self.tracing.clone(),
        }
    }
}

/// Continues the caller's trace (or starts one), makes the server span and
/// hands its context to the app in `traceparent`, so the app's own calls —
/// which copy the header — become its children.
#[derive(Clone, Debug)]
pub struct ServerSpan<S> {
    inner: S,
    tracing: Tracing,
}

impl<S, B, RB> Service<Request<B>> for ServerSpan<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: std::fmt::Display,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ServerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Unsampled (or tracing off): no span, the context is propagated by
        // `decide` alone.
        let Some(sampled) = self.tracing.decide(req.headers_mut()) else {
            return ServerFuture {
                inner: self.inner.call(req),
                guard: None,
            };
        };
        let parent = propagation::extract(req.headers());
        let (name, mut attrs) = super::span::describe(&req);
        if let Some(host) = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
            attrs.push(KeyValue::new("server.address", host.to_owned()));
        }
        if let Some(ClientAddr(peer)) = req.extensions().get::<ClientAddr>() {
            attrs.push(KeyValue::new("client.address", peer.ip().to_string()));
        }
        if let Some(Peer::Mesh(id)) = req.extensions().get::<Peer>() {
            attrs.push(KeyValue::new("trellis.peer.identity", id.to_string()));
        }
        let span = sampled.start(
            SpanBuilder::from_name(name)
                .with_kind(SpanKind::Server)
                .with_attributes(attrs),
            &parent,
        );
        let cx = parent.with_span(span);
        propagation::inject(&cx, req.headers_mut());
        ServerFuture {
            inner: self.inner.call(req),
            guard: Some(Guard::new(cx, SpanKind::Server)),
        }
    }
}

pin_project! {
    /// The inner response future, recording into the span when it resolves.
    pub struct ServerFuture<F> {
        #[pin]
        inner: F,
        guard: Option<Guard>,
    }
}

impl<F, RB, E> std::future::Future for ServerFuture<F>
where
    F: std::future::Future<Output = Result<Response<RB>, E>>,
    E: std::fmt::Display,
{
    type Output = Result<Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let Some(guard) = this.guard.as_mut() {
            match &out {
                Ok(rsp) => guard.respond(rsp),
                Err(e) => guard.fail_with(&e.to_string()),
            }
        }
        Poll::Ready(out)
    }
}
