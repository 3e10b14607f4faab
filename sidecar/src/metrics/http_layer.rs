//! The HTTP metrics layer: one count and one latency observation per
//! request that passes a listener, labelled by the service the response
//! names ([`ServiceLabel`]), and a gRPC call's code once it is known (from
//! trailers-only headers at once, from the trailers when they arrive).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use trellis_policy::GrpcCode;

use super::{Direction, Metrics, ServiceLabel};
use crate::http::{
    Body,
    grpc::{End, OnEnd, Outcome},
};

/// A layer recording every request that passes through it.
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Metrics,
    direction: Direction,
}

impl MetricsLayer {
    /// Records under `direction`.
    pub fn new(metrics: Metrics, direction: Direction) -> Self {
        Self { metrics, direction }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = RecordRequests<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RecordRequests {
            inner,
            layer: self.clone(),
        }
    }
}

/// Records status class and latency (to response headers) of each request.
#[derive(Clone, Debug)]
pub struct RecordRequests<S> {
    inner: S,
    layer: MetricsLayer,
}

impl<S, B> Service<Request<B>> for RecordRequests<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Recorded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        Recorded {
            start: Instant::now(),
            layer: self.layer.clone(),
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The inner response future, recording the response when it resolves.
    pub struct Recorded<F> {
        #[pin]
        inner: F,
        start: Instant,
        layer: MetricsLayer,
    }
}

impl<F, E> Future for Recorded<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx));
        if let Ok(rsp) = &mut res {
            let label = rsp.extensions().get::<ServiceLabel>().map(|s| s.0.clone());
            let service = label.as_deref().unwrap_or("unknown");
            let proxy_error = rsp
                .extensions()
                .get::<crate::http::response::ProxyAnswer>()
                .map(|a| a.kind);
            this.layer.metrics.record_request(
                this.layer.direction,
                service,
                rsp.status(),
                this.start.elapsed(),
                proxy_error,
            );
            let direction = this.layer.direction;
            match Outcome::of(rsp) {
                Outcome::Http => {}
                Outcome::Grpc(code) => this.layer.metrics.record_grpc(direction, service, code),
                Outcome::InTrailers => {
                    let (metrics, service) = (this.layer.metrics.clone(), service.to_owned());
                    let body = std::mem::replace(rsp.body_mut(), crate::http::empty());
                    *rsp.body_mut() = OnEnd::wrap(body, move |end| {
                        let code = match end {
                            End::Status(code) => code,
                            End::Broken => GrpcCode::Internal,
                        };
                        metrics.record_grpc(direction, &service, code);
                    });
                }
            }
        }
        Poll::Ready(res)
    }
}
