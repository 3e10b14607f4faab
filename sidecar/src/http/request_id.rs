//! `x-request-id`: created when a request arrives without one, passed on
//! upstream, and echoed on the response so a caller can quote it.
//!
//! The id lets one request be found in the logs of every hop; the sidecar
//! creates it at the first hop so applications need not.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// The header carrying the id.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id accepted from a client; a longer one is replaced, so a caller
/// cannot make every hop log kilobytes.
const MAX_LEN: usize = 128;

/// A fresh id: a random (version 4) UUID in its usual text form, written
/// into a stack buffer (the header value's copy is the only allocation).
pub fn new_id() -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut b: u128 = rand::random();
    // Set the version (4) and variant (10xx) bits.
    b = (b & !(0xF << 76)) | (0x4 << 76);
    b = (b & !(0x3 << 62)) | (0x2 << 62);
    let mut out = [b'-'; 36];
    let mut digit = 0;
    for (i, c) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        *c = DIGITS[(b >> (124 - 4 * digit) & 0xF) as usize];
        digit += 1;
    }
    HeaderValue::from_bytes(&out).expect("hex and dashes are a valid header value")
}

/// Ensures a request carries a usable id, returning it.
pub fn ensure(headers: &mut http::HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= MAX_LEN => v.clone(),
        _ => {
            let id = new_id();
            headers.insert(X_REQUEST_ID, id.clone());
            id
        }
    }
}

/// A layer adding [`RequestId`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestId { inner }
    }
}

/// Ensures `x-request-id` on the request and copies it to the response.
#[derive(Clone, Debug)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = EchoId<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = ensure(req.headers_mut());
        EchoId {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project! {
    /// The inner response future, copying the id onto the response (unless
    /// it carries one already).
    pub struct EchoId<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, RB, E> Future for EchoId<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = ready!(this.inner.poll(cx));
        if let (Ok(rsp), Some(id)) = (&mut out, this.id.take()) {
            rsp.headers_mut().entry(X_REQUEST_ID).or_insert(id);
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_v4_uuids_and_differ() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        let groups: Vec<usize> = s.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(
            s.bytes()
                .all(|c| c == b'-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }

    #[test]
    fn keeps_a_good_id_and_replaces_a_missing_or_oversized_one() {
        let mut h = http::HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(ensure(&mut h), "abc");

        let mut h = http::HeaderMap::new();
        let id = ensure(&mut h);
        assert_eq!(h[&X_REQUEST_ID], id);

        let mut h = http::HeaderMap::new();
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&"x".repeat(500)).unwrap(),
        );
        assert_eq!(ensure(&mut h).len(), 36);
    }
}
