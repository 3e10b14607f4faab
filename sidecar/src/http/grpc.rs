//! gRPC's own outcome of a call, which HTTP's status does not carry.
//!
//! A gRPC server answers `200 OK` to every call it handles and puts the
//! call's result in `grpc-status`: in the response headers when nothing
//! else is sent (a *trailers-only* response, how tonic and grpc-go answer
//! most errors), otherwise in the trailers after the messages. So a call
//! answered `200` may still have failed, and whether it did is known either
//! at the headers or only at the end of the body.
//!
//! [`Outcome::of`] reads what the headers say; [`OnEnd`] wraps a body whose
//! outcome is still to come and reports it when the trailers (or the end,
//! or an error) arrive. The breaker, outlier detection and metrics use both,
//! so a call counts once, when its outcome is known.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Response, StatusCode, header};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use trellis_policy::{FailureKind, GrpcCode};

use super::{Body, BoxError, boxed};

/// The header (or trailer) carrying a gRPC call's status code.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The header a gRPC client sends its deadline in.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Whether `headers` belong to a gRPC message (`content-type: application/grpc…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status code in `headers` (response headers or trailers), if any.
/// A value that is not a number of gRPC's is `UNKNOWN`, as gRPC clients read it.
pub fn status_code(headers: &HeaderMap) -> Option<GrpcCode> {
    let v = headers.get(GRPC_STATUS)?;
    let code = std::str::from_utf8(v.as_bytes())
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .and_then(GrpcCode::from_number)
        .unwrap_or(GrpcCode::Unknown);
    Some(code)
}

/// What kind of failure a gRPC status is for the breaker and outlier
/// detection: the codes that say the server (not the request) failed.
/// `DEADLINE_EXCEEDED` is a timeout; `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`
/// and `DATA_LOSS` are the server's failures, as HTTP's 5xx are (the
/// mapping Envoy's outlier detection uses). Every other code — `NOT_FOUND`,
/// `INVALID_ARGUMENT`, `PERMISSION_DENIED`… — is an answer about the
/// request, and a server giving it is working.
pub fn failure_kind(code: GrpcCode) -> Option<FailureKind> {
    match code {
        GrpcCode::DeadlineExceeded => Some(FailureKind::Timeout),
        GrpcCode::Unavailable | GrpcCode::Internal | GrpcCode::Unknown | GrpcCode::DataLoss => {
            Some(FailureKind::ServerError)
        }
        _ => None,
    }
}

/// The outcome of a response as far as its headers tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a gRPC response, or not one answered `200`: its HTTP status is its outcome.
    Http,
    /// A gRPC response whose status is in its headers (trailers-only).
    Grpc(GrpcCode),
    /// A gRPC response whose status comes in the trailers: see [`OnEnd`].
    InTrailers,
}

impl Outcome {
    /// Reads the outcome of `rsp` from its status and headers.
    pub fn of<B>(rsp: &Response<B>) -> Self {
        if rsp.status() != StatusCode::OK || !is_grpc(rsp.headers()) {
            return Self::Http;
        }
        match status_code(rsp.headers()) {
            Some(code) => Self::Grpc(code),
            None => Self::InTrailers,
        }
    }
}

/// How a gRPC response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The trailers arrived, with this status (`UNKNOWN` when they had none).
    Status(GrpcCode),
    /// The body failed before its end (the stream was reset or the
    /// connection broke): a transport failure.
    Broken,
}

impl End {
    /// What kind of failure this end is, if it is one.
    pub fn failure_kind(self) -> Option<FailureKind> {
        match self {
            Self::Status(code) => failure_kind(code),
            Self::Broken => Some(FailureKind::ConnectFailure),
        }
    }
}

pin_project! {
    /// A response body that calls `on_end` once, when its gRPC outcome is
    /// known. A body dropped before its end (the caller went away) calls
    /// nothing: the call has no outcome, and whatever `on_end` owns is
    /// dropped with it (a breaker ticket hands its slot back).
    pub struct OnEnd<F> {
        #[pin]
        inner: Body,
        on_end: Option<F>,
    }
}

impl<F: FnOnce(End) + Send + 'static> OnEnd<F> {
    /// Wraps `inner`; the result is boxed back into [`Body`].
    pub fn wrap(inner: Body, on_end: F) -> Body {
        boxed(Self {
            inner,
            on_end: Some(on_end),
        })
    }
}

impl<F: FnOnce(End)> HttpBody for OnEnd<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = loop {
            let frame = ready!(this.inner.as_mut().poll_frame(cx));
            if !super::is_empty_data(&frame) {
                break frame;
            }
        };
        let end = match &frame {
            Some(Ok(f)) => f
                .trailers_ref()
                .map(|t| End::Status(status_code(t).unwrap_or(GrpcCode::Unknown))),
            Some(Err(_)) => Some(End::Broken),
            // The end without trailers: gRPC requires a status, so the
            // call's result is unknown, which gRPC clients read as UNKNOWN.
            None => Some(End::Status(GrpcCode::Unknown)),
        };
        if let Some(end) = end
            && let Some(f) = this.on_end.take()
        {
            f(end);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // Not ended until the end has been seen and reported: a caller that
        // trusted the inner body's hint would stop polling before it.
        self.on_end.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Parses a `grpc-timeout` value: at most eight digits and a unit
/// (`H`ours, `M`inutes, `S`econds, `m`illi-, `u`micro-, `n`anoseconds).
/// Anything else is `None`, and the call keeps the configured deadline.
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    fn grpc_response(status: Option<&str>) -> Response<()> {
        let mut r = Response::new(());
        r.headers_mut()
            .insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
        if let Some(s) = status {
            r.headers_mut().insert(GRPC_STATUS, s.parse().unwrap());
        }
        r
    }

    #[test]
    fn reads_the_outcome_from_trailers_only_headers() {
        assert_eq!(
            Outcome::of(&grpc_response(Some("14"))),
            Outcome::Grpc(GrpcCode::Unavailable)
        );
        assert_eq!(
            Outcome::of(&grpc_response(Some("0"))),
            Outcome::Grpc(GrpcCode::Ok)
        );
        assert_eq!(
            Outcome::of(&grpc_response(Some("99"))),
            Outcome::Grpc(GrpcCode::Unknown)
        );
        assert_eq!(Outcome::of(&grpc_response(None)), Outcome::InTrailers);
        let mut not_ok = grpc_response(Some("14"));
        *not_ok.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(Outcome::of(&not_ok), Outcome::Http, "HTTP's status first");
        assert_eq!(Outcome::of(&Response::new(())), Outcome::Http);
    }

    #[test]
    fn classifies_server_failures_only() {
        for code in [
            GrpcCode::Unavailable,
            GrpcCode::Internal,
            GrpcCode::Unknown,
            GrpcCode::DataLoss,
        ] {
            assert_eq!(
                failure_kind(code),
                Some(FailureKind::ServerError),
                "{code:?}"
            );
        }
        assert_eq!(
            failure_kind(GrpcCode::DeadlineExceeded),
            Some(FailureKind::Timeout)
        );
        for code in [
            GrpcCode::Ok,
            GrpcCode::NotFound,
            GrpcCode::InvalidArgument,
            GrpcCode::PermissionDenied,
            GrpcCode::ResourceExhausted,
            GrpcCode::Cancelled,
        ] {
            assert_eq!(failure_kind(code), None, "{code:?}");
        }
    }

    #[tokio::test]
    async fn reports_the_status_in_the_trailers_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut trailers = HeaderMap::new();
        trailers.insert(GRPC_STATUS, "13".parse().unwrap());
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = boxed(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        let record = seen.clone();
        let wrapped = OnEnd::wrap(body, move |end| record.lock().unwrap().push(end));
        let collected = wrapped.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()[GRPC_STATUS], "13");
        assert_eq!(*seen.lock().unwrap(), [End::Status(GrpcCode::Internal)]);
    }

    #[tokio::test]
    async fn drops_empty_data_frames() {
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::trailers(HeaderMap::new())),
        ];
        let body = boxed(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        let mut wrapped = OnEnd::wrap(body, |_| {});
        let mut seen = Vec::new();
        while let Some(frame) = wrapped.frame().await {
            seen.push(frame.unwrap().is_data());
        }
        assert_eq!(seen, [true, false], "the data frame, then the trailers");
    }

    #[tokio::test]
    async fn a_broken_body_is_a_transport_failure() {
        let frames = vec![Err::<Frame<Bytes>, BoxError>("reset".into())];
        let body = boxed(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let wrapped = OnEnd::wrap(body, move |end| *record.lock().unwrap() = Some(end));
        assert!(wrapped.collect().await.is_err());
        assert_eq!(*seen.lock().unwrap(), Some(End::Broken));
        assert_eq!(
            End::Broken.failure_kind(),
            Some(FailureKind::ConnectFailure)
        );
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(
            parse_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [&b""[..], b"m", b"123456789m", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(
                parse_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
