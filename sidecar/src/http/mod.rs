//! HTTP plumbing shared by every listener: the body type, hop-by-hop header
//! handling, request ids and the error responses the proxy itself writes.

pub mod framing;
pub mod grpc;
pub mod grpc_errors;
pub mod headers;
pub mod request_id;
pub mod response;

use bytes::Bytes;
use http_body_util::{BodyExt, combinators::UnsyncBoxBody};

/// The error type carried through the stacks: tower's boxed error.
pub type BoxError = tower::BoxError;

/// The one body type every stack speaks, in and out.
///
/// Boxed so that an upstream's `Incoming`, a locally written error page and a
/// wrapped body (load tracking, metrics) are all the same type, which keeps
/// the tower stacks nameable. `Unsync` because hyper's server needs only `Send`.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Whether `frame` is a data frame without bytes.
///
/// Body wrappers drop these rather than pass them on: hyper's HTTP/2
/// server yields one for a client's separate END_STREAM frame, and a wrapper
/// that cannot yet say the body ended would make hyper send it as an empty
/// DATA frame without END_STREAM, which h2 peers allow only 100 of in a
/// connection's life before they end it (GOAWAY `ENHANCE_YOUR_CALM`).
pub fn is_empty_data<E>(frame: &Option<Result<hyper::body::Frame<Bytes>, E>>) -> bool {
    matches!(frame, Some(Ok(f)) if f.data_ref().is_some_and(Bytes::is_empty))
}

/// Boxes any body into [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(http_body_util::Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> Body {
    boxed(http_body_util::Empty::new())
}
