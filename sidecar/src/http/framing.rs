//! Refusing requests whose framing is ambiguous, before they reach an upstream.
//!
//! Request smuggling works when two HTTP parsers on one path disagree about
//! where a message ends. hyper already refuses what its parser cannot read
//! (invalid methods, bad header syntax, obs-fold, NUL, oversized heads, two
//! different `Content-Length`s); what it accepts but a proxy must not pass
//! on is checked here (RFC 9112 §6.1–6.3, §3.2):
//!
//! - `Content-Length` together with `Transfer-Encoding`;
//! - `Content-Length` more than once, even with equal values;
//! - a `Transfer-Encoding` other than exactly `chunked`, or more than one;
//! - more than one `Host`, or none on an HTTP/1.1 request in origin form.
//!
//! A chunked body can still be malformed after a valid head. The proxy
//! streams bodies, so it cannot see the end of every body before sending
//! the head upstream; it does read the start of a chunked body (up to
//! [`PEEK_BYTES`], for at most [`PEEK_WAIT`]) first, so a body that is bad
//! from the start — the usual shape of a smuggling attempt — is answered
//! 400 and never reaches the application. A body that turns bad later is
//! cut off upstream, which the application sees as an aborted request.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderMap, Request, Version, header};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Frame;

use super::{Body, BoxError, boxed, response::ProxyError};

/// How much of a chunked body is read before the request is forwarded.
pub const PEEK_BYTES: usize = 64 * 1024;

/// How long the proxy waits for the start of a chunked body before
/// forwarding anyway (a client may legitimately send its body later).
pub const PEEK_WAIT: Duration = Duration::from_millis(50);

/// Why a request's head is refused, or `None` when its framing is unambiguous.
pub fn check_head<B>(req: &Request<B>) -> Option<String> {
    let h = req.headers();
    let count = |name: &header::HeaderName| h.get_all(name).iter().count();
    let (cl, te) = (
        count(&header::CONTENT_LENGTH),
        count(&header::TRANSFER_ENCODING),
    );
    if cl > 0 && te > 0 {
        return Some(
            "both Content-Length and Transfer-Encoding are set: the message length is ambiguous"
                .into(),
        );
    }
    if cl > 1
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().contains(&b','))
    {
        return Some("Content-Length is given more than once".into());
    }
    if te > 1 {
        return Some("Transfer-Encoding is given more than once".into());
    }
    if let Some(v) = h.get(header::TRANSFER_ENCODING)
        && !v.as_bytes().eq_ignore_ascii_case(b"chunked")
    {
        return Some(format!(
            "Transfer-Encoding {:?} is not supported: only chunked is",
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    match count(&header::HOST) {
        0 if req.version() == Version::HTTP_11 && req.uri().authority().is_none() => {
            Some("an HTTP/1.1 request needs a Host header".into())
        }
        0 | 1 => None,
        _ => Some("Host is given more than once".into()),
    }
}

/// Whether the request's body is chunked (checked by [`check_head`] first).
pub fn is_chunked(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
}

/// Reads the start of `body` (see the module docs) and returns a body that
/// replays what was read before the rest; a framing error in that start is
/// a [`ProxyError::BadRequest`].
pub async fn peek_body(mut body: Body) -> Result<Body, ProxyError> {
    let deadline = tokio::time::Instant::now() + PEEK_WAIT;
    let mut read: Vec<Frame<Bytes>> = Vec::new();
    let mut bytes = 0;
    let ended = loop {
        if bytes >= PEEK_BYTES {
            break false;
        }
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => break false,
            Ok(None) => break true,
            Ok(Some(Ok(frame))) => {
                bytes += frame.data_ref().map_or(0, Bytes::len);
                read.push(frame);
            }
            Ok(Some(Err(e))) => {
                return Err(ProxyError::BadRequest(format!(
                    "the chunked body is malformed: {}",
                    super::response::with_causes(e.as_ref())
                )));
            }
        }
    };
    let head = futures::stream::iter(read.into_iter().map(Ok::<_, BoxError>));
    Ok(if ended {
        boxed(StreamBody::new(head))
    } else {
        boxed(StreamBody::new(head.chain(BodyStream::new(body))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::post("/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn refuses_ambiguous_framing_and_names_the_field() {
        for (headers, field) in [
            (
                &[
                    ("host", "a"),
                    ("content-length", "5"),
                    ("transfer-encoding", "chunked"),
                ][..],
                "both Content-Length and Transfer-Encoding",
            ),
            (
                &[
                    ("host", "a"),
                    ("content-length", "5"),
                    ("content-length", "5"),
                ],
                "Content-Length",
            ),
            (
                &[("host", "a"), ("content-length", "5, 5")],
                "Content-Length",
            ),
            (
                &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
                "Transfer-Encoding",
            ),
            (
                &[
                    ("host", "a"),
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                "Transfer-Encoding",
            ),
            (&[("host", "a"), ("host", "b")], "Host"),
            (&[], "Host"),
        ] {
            let why = check_head(&req(headers)).unwrap_or_else(|| panic!("{headers:?} passed"));
            assert!(why.contains(field), "{headers:?}: {why}");
        }
    }

    #[test]
    fn passes_unambiguous_framing() {
        for headers in [
            &[("host", "a")][..],
            &[("host", "a"), ("content-length", "5")],
            &[("host", "a"), ("transfer-encoding", "Chunked")],
        ] {
            assert_eq!(check_head(&req(headers)), None, "{headers:?}");
        }
        // HTTP/2 and proxy form carry the authority in the URI.
        let r = Request::get("http://user/x").body(()).unwrap();
        assert_eq!(check_head(&r), None);
    }

    #[tokio::test]
    async fn a_peeked_body_is_replayed_whole() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hel"))),
            Ok(Frame::data(Bytes::from_static(b"lo"))),
        ];
        let body = boxed(StreamBody::new(futures::stream::iter(frames)));
        let out = peek_body(body).await.unwrap();
        assert_eq!(out.collect().await.unwrap().to_bytes(), "hello");

        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ok"))),
            Err("invalid chunk size line".into()),
        ];
        let body = boxed(StreamBody::new(futures::stream::iter(frames)));
        let err = peek_body(body).await.unwrap_err();
        assert!(err.to_string().contains("invalid chunk size"), "{err}");
        assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
    }
}
