//! Hop-by-hop header handling, as RFC 9110 §7.6.1 requires of a proxy.
//!
//! Connection-specific fields describe one TCP connection, not the message:
//! forwarding them would, for instance, make an upstream keep a connection
//! open that the client asked to close, or desynchronise framing
//! (`Transfer-Encoding`). hyper re-frames every message it writes, so the
//! proxy removes these fields on each side and lets hyper set its own.

use std::{
    net::IpAddr,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header};
use tower::{Layer, Service};

use super::{
    Body, framing,
    response::{ProxyAnswer, ProxyError},
};

/// Fields that are connection-specific by definition (RFC 9110 §7.6.1),
/// plus `proxy-connection`, which old clients still send.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` is one of [`HOP_BY_HOP`]; a name is always lowercase.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "proxy-connection" | "keep-alive" | "te" | "transfer-encoding" | "upgrade"
    )
}

/// What stripping found that the forwarder still needs to know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stripped {
    /// The client sent `TE: trailers`: it accepts trailers. gRPC requires this
    /// field on HTTP/2, where it is the one TE value allowed, so the forwarder
    /// puts it back on an HTTP/2 request.
    pub te_trailers: bool,
}

/// Removes hop-by-hop fields: the fixed set, and every field that a
/// `Connection` header names (its connection options).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Stripped {
    // Most messages carry none of these fields, and then `Connection` names
    // nothing either: one pass over the names settles it, where removing
    // each field of the set would hash its name.
    if !headers.keys().any(is_hop_by_hop) {
        return Stripped::default();
    }
    // Collect the names listed in Connection before removing Connection itself.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    });
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    Stripped { te_trailers }
}

/// Appends the client's address to `x-forwarded-for`, keeping any earlier hops.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let mut buf = [0; MAX_IP_LEN];
    let ip = ip_text(client, &mut buf);
    let earlier = || headers.get_all(&XFF).iter().filter_map(|v| v.to_str().ok());
    let earlier_len: usize = earlier().map(|v| v.len() + ", ".len()).sum();
    let value = if earlier_len == 0 {
        HeaderValue::from_bytes(ip)
    } else {
        // Sized exactly, so the bytes become the header value without a copy.
        let mut value = Vec::with_capacity(earlier_len + ip.len());
        for v in earlier() {
            value.extend_from_slice(v.as_bytes());
            value.extend_from_slice(b", ");
        }
        value.extend_from_slice(ip);
        HeaderValue::from_maybe_shared(Bytes::from(value))
    };
    // An IP address and commas are always a valid header value.
    if let Ok(value) = value {
        headers.insert(XFF, value);
    }
}

/// The longest text form of an IP address (an IPv4-mapped IPv6 one).
const MAX_IP_LEN: usize = 45;

/// `ip` in its usual text form, written into `buf`; an IPv4 address (every
/// peer on an IPv4 pod network) without going through `fmt`.
fn ip_text(ip: IpAddr, buf: &mut [u8; MAX_IP_LEN]) -> &[u8] {
    let len = match ip {
        IpAddr::V4(v4) => {
            let mut len = 0;
            let mut push = |b: u8| {
                buf[len] = b;
                len += 1;
            };
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    push(b'.');
                }
                if octet >= 100 {
                    push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    push(b'0' + octet / 10 % 10);
                }
                push(b'0' + octet % 10);
            }
            len
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let mut rest = &mut buf[..];
            write!(rest, "{v6}").expect("45 bytes hold any IPv6 address");
            MAX_IP_LEN - rest.len()
        }
    };
    &buf[..len]
}

/// A layer adding [`StripHopByHop`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HopByHopLayer;

impl<S> Layer<S> for HopByHopLayer {
    type Service = StripHopByHop<S>;
    fn layer(&self, inner: S) -> Self::Service {
        StripHopByHop { inner }
    }
}

/// The 400 for a request with bad framing. The connection closes after it:
/// where this message ends is in doubt, so nothing after it on the same
/// connection can be trusted to be the next request.
fn refuse(e: ProxyError) -> Response<Body> {
    let mut rsp = e.into_response();
    rsp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    rsp
}

/// Strips hop-by-hop fields from requests on the way in and from responses
/// on the way out; what the request's fields said is left in its
/// extensions as [`Stripped`] for the forwarder.
///
/// It reads the framing fields before removing them, so it is also where
/// ambiguous framing is refused (see [`super::framing`]): such a request is
/// answered 400 here and never reaches the service underneath.
#[derive(Clone, Debug)]
pub struct StripHopByHop<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for StripHopByHop<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        if let Some(why) = framing::check_head(&req) {
            return futures::future::ready(Ok(refuse(ProxyError::BadRequest(why)))).boxed();
        }
        let chunked = framing::is_chunked(req.headers());
        let http1_body = req.version() <= http::Version::HTTP_11
            && (chunked
                || req
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .is_some_and(|v| v.as_bytes() != b"0"));
        let stripped = strip_hop_by_hop(req.headers_mut());
        req.extensions_mut().insert(stripped);
        // The service that was made ready is the one called, later, once the
        // body's start has been read: swap in a clone for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        // Boxed and named, like the router's call: spelling out the 'static
        // future avoids a rustc limitation with boxed-error lifetimes.
        let body: BoxFuture<'static, Result<Body, ProxyError>> = if chunked {
            Box::pin(framing::peek_body(body))
        } else {
            Box::pin(futures::future::ready(Ok(body)))
        };
        body.then(
            move |body| -> BoxFuture<'static, Result<Response<Body>, S::Error>> {
                match body {
                    Err(e) => Box::pin(futures::future::ready(Ok(refuse(e)))),
                    Ok(body) => Box::pin(inner.call(Request::from_parts(parts, body)).map(
                        move |res| {
                            res.map(|mut rsp| {
                                strip_hop_by_hop(rsp.headers_mut());
                                // An answer of the proxy's own (a refused
                                // token, a rate limit, no route) may leave an
                                // HTTP/1.1 body unread, after which hyper
                                // closes the connection; saying so keeps the
                                // client from sending its next request on it.
                                if http1_body && rsp.extensions().get::<ProxyAnswer>().is_some() {
                                    rsp.headers_mut().insert(
                                        header::CONNECTION,
                                        HeaderValue::from_static("close"),
                                    );
                                }
                                rsp
                            })
                        },
                    )),
                }
            },
        )
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn removes_the_fixed_set_and_keeps_end_to_end_fields() {
        let mut h = map(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("content-type", "text/plain"),
            ("x-custom", "1"),
        ]);
        let s = strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-custom"]);
        assert!(!s.te_trailers);
    }

    #[test]
    fn removes_fields_named_in_connection_across_values_and_case() {
        let mut h = map(&[
            ("connection", "close, X-Secret"),
            ("connection", " x-other ,"),
            ("x-secret", "s"),
            ("x-other", "o"),
            ("x-kept", "k"),
        ]);
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn remembers_te_trailers() {
        let mut h = map(&[("te", "gzip;q=0.5, Trailers")]);
        assert!(strip_hop_by_hop(&mut h).te_trailers);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn appends_to_forwarded_for() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        append_forwarded_for(&mut h, "::1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, ::1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn writes_addresses_as_display_does() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "10.244.19.255",
            "100.64.9.99",
            "255.255.255.255",
            "::1",
            "fd00::a:1",
            "::ffff:10.1.2.3",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "1:2:3:4:5:6:7:8",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut buf = [0; MAX_IP_LEN];
            assert_eq!(ip_text(ip, &mut buf), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn the_fixed_set_is_what_the_fast_check_looks_for() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        assert!(!is_hop_by_hop(&header::CONTENT_TYPE));
        let mut h = map(&[("content-type", "text/plain"), ("x-custom", "1")]);
        assert_eq!(strip_hop_by_hop(&mut h), Stripped::default());
        assert_eq!(h.len(), 2);
    }
}
