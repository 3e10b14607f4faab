//! Making a request retryable: its body buffered whole before the first
//! try, or copied on the way while the first try sends it, so a retry can
//! send it again (see [`super::retry`] for when a request is retryable).

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame};
use tower::{Service, ServiceExt};

use super::retry::{Settings, X_RETRYABLE};
use crate::http::{
    Body, BoxError, boxed, full, grpc::is_grpc, is_empty_data, response::ProxyError,
};

/// A request body kept for replay: a request extension set by [`Replayable`].
#[derive(Clone, Debug)]
pub enum Replay {
    /// The whole body, read before the first try.
    Whole {
        /// The body's bytes.
        data: Bytes,
        /// Its trailers, if it had any.
        trailers: Option<HeaderMap>,
    },
    /// A copy of the body taken while the first try sends it.
    Tee(Arc<Mutex<Capture>>),
}

impl Replay {
    /// The body again. tower's `Retry` asks for the copy before the first
    /// try starts, when a [`Replay::Tee`] holds nothing yet, so that body
    /// reads the capture when it is first polled: by then the try it would
    /// replace has ended, and [`Replay::is_whole`] allowed the retry.
    pub(super) fn body(&self) -> Body {
        match self {
            Self::Whole { data, trailers } => replay_body(vec![data.clone()], trailers),
            Self::Tee(capture) => boxed(Deferred {
                capture: capture.clone(),
                body: None,
            }),
        }
    }

    /// Whether the whole body is here to be sent again.
    pub(super) fn is_whole(&self) -> bool {
        match self {
            Self::Whole { .. } => true,
            Self::Tee(capture) => {
                let c = capture.lock().expect("capture lock");
                c.complete && !c.lost
            }
        }
    }
}

/// A replay of a [`Capture`], made when first polled.
struct Deferred {
    capture: Arc<Mutex<Capture>>,
    body: Option<Body>,
}

impl hyper::body::Body for Deferred {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.body.is_none() {
            let c = self.capture.lock().expect("capture lock");
            if !c.complete || c.lost {
                drop(c);
                return Poll::Ready(Some(Err("the request body was not kept whole".into())));
            }
            let body = replay_body(c.data.clone(), &c.trailers);
            drop(c);
            self.body = Some(body);
        }
        let body = self.body.as_mut().expect("made above");
        std::pin::Pin::new(body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => {
                let c = self.capture.lock().expect("capture lock");
                let mut hint = hyper::body::SizeHint::new();
                hint.set_lower(c.len);
                hint
            }
        }
    }
}

fn replay_body(data: Vec<Bytes>, trailers: &Option<HeaderMap>) -> Body {
    if trailers.is_none() && data.len() <= 1 {
        return full(data.into_iter().next().unwrap_or_default());
    }
    let frames = data
        .into_iter()
        .map(|d| Ok::<_, BoxError>(Frame::data(d)))
        .chain(trailers.clone().map(|t| Ok(Frame::trailers(t))));
    boxed(http_body_util::StreamBody::new(futures::stream::iter(
        frames.collect::<Vec<_>>(),
    )))
}

/// What a [`Tee`] has copied of a body so far.
#[derive(Debug, Default)]
pub struct Capture {
    data: Vec<Bytes>,
    len: u64,
    trailers: Option<HeaderMap>,
    /// The body ended and every frame of it is here.
    complete: bool,
    /// The body outgrew the limit or failed: it cannot be replayed.
    lost: bool,
}

pin_project_lite::pin_project! {
    /// A request body that copies its frames into a [`Capture`] as they are
    /// sent, up to a limit. The copies share the frames' buffers.
    pub struct Tee {
        #[pin]
        inner: Body,
        capture: Arc<Mutex<Capture>>,
        limit: u64,
    }
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
            if is_empty_data(&frame) {
                continue;
            }
            let mut c = this.capture.lock().expect("capture lock");
            if !c.lost {
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            c.len += d.len() as u64;
                            if c.len > *this.limit {
                                c.lost = true;
                                c.data = Vec::new();
                            } else {
                                c.data.push(d.clone());
                            }
                        } else if let Some(t) = f.trailers_ref() {
                            c.trailers = Some(t.clone());
                        }
                        // The body says no frame follows: the copy is whole
                        // now, so this frame can go out as the last one.
                        if !c.lost && this.inner.is_end_stream() {
                            c.complete = true;
                        }
                    }
                    Some(Err(_)) => c.lost = true,
                    None => c.complete = true,
                }
            }
            return Poll::Ready(frame);
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not ended before the end has been seen, so the copy knows it is whole.
        let c = self.capture.lock().expect("capture lock");
        (c.complete || c.lost) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn idempotent(m: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(m)
}

/// Buffers the body of a retryable request so the retry policy can clone it.
#[derive(Clone, Debug)]
pub struct Replayable<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S> Replayable<S> {
    /// Wraps the retrying service `inner`.
    pub fn new(inner: S, settings: Arc<Settings>) -> Self {
        Self { inner, settings }
    }
}

impl<S> Service<Request<Body>> for Replayable<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let marked = req
            .headers_mut()
            .remove(X_RETRYABLE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let inner = self.inner.clone();
        let grpc = is_grpc(req.headers());
        let eligible = self.settings.attempts > 1 && (marked || grpc || idempotent(req.method()));
        if !eligible {
            return inner.oneshot(req).boxed();
        }
        if req.body().is_end_stream() {
            req.extensions_mut().insert(Replay::Whole {
                data: Bytes::new(),
                trailers: None,
            });
            return inner.oneshot(req).boxed();
        }
        let limit = self.settings.max_replay_bytes;
        let exact = req.body().size_hint().exact();
        if exact.is_none() && grpc {
            // Copy the body as the first try sends it: waiting for the
            // whole body first would stall a client-streaming call.
            let capture = Arc::new(Mutex::new(Capture::default()));
            req.extensions_mut().insert(Replay::Tee(capture.clone()));
            let req = req.map(|inner| {
                boxed(Tee {
                    inner,
                    capture,
                    limit,
                })
            });
            return inner.oneshot(req).boxed();
        }
        if exact.is_none_or(|n| n > limit) {
            return inner.oneshot(req).boxed();
        }
        async move {
            let (mut parts, body) = req.into_parts();
            let collected = body.collect().await.map_err(|e| {
                ProxyError::BadRequest(format!("the request body could not be read: {e}"))
            })?;
            let replay = Replay::Whole {
                trailers: collected.trailers().cloned(),
                data: collected.to_bytes(),
            };
            let body = replay.body();
            parts.extensions.insert(replay);
            let call: BoxFuture<'static, Result<Response<Body>, BoxError>> =
                Box::pin(inner.oneshot(Request::from_parts(parts, body)));
            call.await
        }
        .boxed()
    }
}
