//! The proxy's own answers to gRPC calls, in gRPC's terms.
//!
//! When the proxy answers a request itself (an open breaker, no endpoints,
//! a deadline, a rate limit) it writes an HTTP error response (see
//! [`response`](super::response)). A gRPC client reads such a response as a
//! transport failure with a made-up message ("grpc-status header missing,
//! mapped from HTTP status code 503") and drops its headers, so the
//! application learns neither what happened nor which dependency it was.
//! For a gRPC request this layer turns the proxy's response into a
//! *trailers-only* gRPC response: `200 OK`, `content-type: application/grpc`,
//! `grpc-status` and a percent-encoded `grpc-message` carrying the proxy's
//! text, with the proxy's own headers (`x-trellis-proxy-error`,
//! `x-trellis-breaker`, `retry-after`) kept as response metadata. Linkerd
//! answers gRPC calls the same way.
//!
//! Responses of the application pass through untouched: only a response
//! carrying the [`ProxyAnswer`] extension was written by this proxy.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::{HeaderValue, Request, Response, StatusCode, header};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use trellis_policy::GrpcCode;

use super::{
    Body, empty,
    grpc::{GRPC_STATUS, is_grpc},
    response::ProxyAnswer,
};

/// The message header of a gRPC status.
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

/// What `grpc-message` percent-encodes besides non-ASCII bytes: controls
/// and `%` itself (gRPC over HTTP/2, "Responses").
const MESSAGE_ESCAPES: &AsciiSet = &CONTROLS.add(b'%');

/// The gRPC code for the proxy's HTTP status: gRPC's own mapping of HTTP
/// statuses, except that the proxy's 504 is always a deadline that passed.
pub fn code_for(status: StatusCode) -> GrpcCode {
    match status.as_u16() {
        400 => GrpcCode::Internal,
        401 => GrpcCode::Unauthenticated,
        403 => GrpcCode::PermissionDenied,
        404 => GrpcCode::Unimplemented,
        429 | 502 | 503 => GrpcCode::Unavailable,
        504 => GrpcCode::DeadlineExceeded,
        _ => GrpcCode::Unknown,
    }
}

/// `rsp`, written by the proxy, as a trailers-only gRPC response.
pub fn trailers_only(rsp: Response<Body>) -> Response<Body> {
    let (mut parts, _) = rsp.into_parts();
    let code = code_for(parts.status);
    let message = parts
        .extensions
        .get::<ProxyAnswer>()
        .map(|a| a.text.trim().to_owned())
        .unwrap_or_else(|| parts.status.to_string());
    parts.status = StatusCode::OK;
    let h = &mut parts.headers;
    h.remove(header::CONTENT_LENGTH);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(u16::from(code.number())));
    let encoded = utf8_percent_encode(&message, MESSAGE_ESCAPES).to_string();
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        h.insert(GRPC_MESSAGE, v);
    }
    Response::from_parts(parts, empty())
}

/// Applies [`GrpcErrors`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcErrorsLayer;

impl<S> Layer<S> for GrpcErrorsLayer {
    type Service = GrpcErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcErrors(inner)
    }
}

/// Answers a gRPC request the proxy refused with a gRPC status; see the
/// module docs.
#[derive(Clone, Debug)]
pub struct GrpcErrors<S>(S);

impl<S> Service<Request<Body>> for GrpcErrors<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = GrpcErrorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        GrpcErrorsFuture {
            grpc: is_grpc(req.headers()),
            inner: self.0.call(req),
        }
    }
}

pin_project! {
    /// The response of [`GrpcErrors`].
    pub struct GrpcErrorsFuture<F> {
        #[pin]
        inner: F,
        grpc: bool,
    }
}

impl<F, E> Future for GrpcErrorsFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let rsp = ready!(this.inner.poll(cx))?;
        let by_proxy = rsp.extensions().get::<ProxyAnswer>().is_some() && !is_grpc(rsp.headers());
        Poll::Ready(Ok(if *this.grpc && by_proxy {
            trailers_only(rsp)
        } else {
            rsp
        }))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::http::response::{ProxyError, X_BREAKER, X_PROXY_ERROR};

    #[tokio::test]
    async fn an_open_breaker_is_unavailable_with_the_proxys_text_and_headers() {
        let rsp = ProxyError::CircuitOpen {
            service: "user.shop".into(),
            state: "open",
        }
        .into_response();
        let text = rsp.extensions().get::<ProxyAnswer>().unwrap().text.clone();
        let rsp = trailers_only(rsp);
        assert_eq!(rsp.status(), StatusCode::OK);
        let h = rsp.headers();
        assert_eq!(h[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(h[GRPC_STATUS], "14");
        assert_eq!(h[X_PROXY_ERROR], "circuit-open");
        assert_eq!(h[X_BREAKER], "user.shop");
        let message = percent_encoding::percent_decode(h[GRPC_MESSAGE].as_bytes())
            .decode_utf8()
            .unwrap();
        assert_eq!(message, text.trim());
        assert!(message.contains("user.shop"), "{message}");
        assert!(
            rsp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty()
        );
    }

    #[test]
    fn a_deadline_is_deadline_exceeded_and_a_refused_egress_permission_denied() {
        assert_eq!(
            code_for(StatusCode::GATEWAY_TIMEOUT),
            GrpcCode::DeadlineExceeded
        );
        assert_eq!(code_for(StatusCode::FORBIDDEN), GrpcCode::PermissionDenied);
        assert_eq!(
            code_for(StatusCode::TOO_MANY_REQUESTS),
            GrpcCode::Unavailable
        );
        assert_eq!(code_for(StatusCode::BAD_REQUEST), GrpcCode::Internal);
    }

    #[test]
    fn the_message_escapes_percent_controls_and_non_ascii() {
        let rsp = Response::new(empty());
        let (mut parts, body) = rsp.into_parts();
        parts.status = StatusCode::SERVICE_UNAVAILABLE;
        parts.extensions.insert(ProxyAnswer {
            kind: "upstream-failed",
            text: "100% down\nnaïve".into(),
        });
        let rsp = trailers_only(Response::from_parts(parts, body));
        assert_eq!(rsp.headers()[GRPC_MESSAGE], "100%25 down%0Ana%C3%AFve");
    }
}
