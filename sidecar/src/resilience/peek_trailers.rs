//! A look at a gRPC response's first frames: a status sent in trailers
//! that come with the first message is read before the response goes up,
//! so the retry policy and the breaker see it.

use std::{
    collections::VecDeque,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Frame;
use tower::Service;
use trellis_policy::GrpcCode;

use super::replay::Replay;
use crate::http::{
    Body, BoxError, boxed,
    grpc::{Outcome, is_grpc, status_code},
};

/// The gRPC status a [`PeekTrailers`] found in trailers that came with the
/// first message: a response extension the retry policy reads.
#[derive(Clone, Copy, Debug)]
pub struct PeekedStatus(pub GrpcCode);

/// Lets the retry policy see a gRPC status that comes in trailers rather
/// than in a trailers-only response, for calls it could retry.
///
/// It waits for the response's first frame, then takes the next one only
/// if it is already there: a unary call's message and trailers arrive
/// together, while a stream's next message may be long in coming, and
/// waiting for it would hold the stream up. A status that comes later is
/// not retried (the breaker and metrics still count it). Peeked frames are
/// put back in front of the body.
#[derive(Clone, Debug)]
pub struct PeekTrailers<S> {
    inner: S,
}

impl<S> PeekTrailers<S> {
    /// Peeks at the responses of `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> Service<Request<Body>> for PeekTrailers<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let retryable = req.extensions().get::<Replay>().is_some() && is_grpc(req.headers());
        // Boxed and named: the 'static future spelled out avoids a rustc
        // limitation with boxed-error lifetimes inside async blocks.
        let call: BoxFuture<'static, Result<Response<Body>, BoxError>> =
            Box::pin(self.inner.call(req));
        if !retryable {
            return call;
        }
        async move {
            let rsp = call.await?;
            if Outcome::of(&rsp) != Outcome::InTrailers {
                return Ok(rsp);
            }
            Ok(peek(rsp).await)
        }
        .boxed()
    }
}

fn peek(rsp: Response<Body>) -> BoxFuture<'static, Response<Body>> {
    async move { peek_frames(rsp).await }.boxed()
}

async fn peek_frames(rsp: Response<Body>) -> Response<Body> {
    let (mut parts, mut body) = rsp.into_parts();
    let mut frames = VecDeque::new();
    let mut status = None;
    let first = body.frame().await;
    let ended = first.is_none();
    if let Some(first) = first {
        let is_data = matches!(&first, Ok(f) if f.is_data());
        frames.push_back(first);
        if is_data && let Some(Some(next)) = body.frame().now_or_never() {
            frames.push_back(next);
        }
    }
    for f in frames.iter().flatten() {
        if let Some(t) = f.trailers_ref() {
            status = Some(status_code(t).unwrap_or(GrpcCode::Unknown));
        }
    }
    if let Some(code) = status {
        parts.extensions.insert(PeekedStatus(code));
    }
    let rest = (!ended && status.is_none()).then_some(body);
    Response::from_parts(parts, boxed(Prefixed { frames, rest }))
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    frames: VecDeque<Result<Frame<Bytes>, BoxError>>,
    rest: Option<Body>,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(f));
        }
        match &mut self.rest {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}
