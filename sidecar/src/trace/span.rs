//! What server and client spans share: naming, request attributes, how a
//! response or an error is recorded, and ending a span exactly once.

use std::borrow::Cow;

use http::{Request, Response, Version};
use opentelemetry::{
    Context, KeyValue,
    trace::{SpanKind, Status, TraceContextExt},
};

use crate::{
    http::{
        BoxError,
        response::{ProxyAnswer, ProxyError},
    },
    inbound::authorize::AuditDenied,
};

/// The span name and the attributes every span of this request carries,
/// after the stable HTTP (and gRPC) semantic conventions.
///
/// The name is the method (`GET`), or `package.Service/Method` for gRPC:
/// the sidecar does not know the app's routes, and the path is too
/// high-cardinality to name a span.
pub fn describe<B>(req: &Request<B>) -> (Cow<'static, str>, Vec<KeyValue>) {
    let path = req.uri().path().to_owned();
    let mut attrs = vec![
        KeyValue::new("http.request.method", req.method().as_str().to_owned()),
        KeyValue::new("url.path", path.clone()),
        KeyValue::new("url.scheme", "http"),
        KeyValue::new("network.protocol.name", "http"),
        KeyValue::new("network.protocol.version", protocol_version(req.version())),
    ];
    if let Some(ua) = req
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        attrs.push(KeyValue::new("user_agent.original", ua.to_owned()));
    }
    let is_grpc = crate::http::grpc::is_grpc(req.headers());
    let name = match path.trim_start_matches('/').split_once('/') {
        Some((service, method)) if is_grpc => {
            attrs.push(KeyValue::new("rpc.system", "grpc"));
            attrs.push(KeyValue::new("rpc.service", service.to_owned()));
            attrs.push(KeyValue::new("rpc.method", method.to_owned()));
            Cow::Owned(format!("{service}/{method}"))
        }
        _ => Cow::Owned(req.method().as_str().to_owned()),
    };
    (name, attrs)
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// A started span that is ended exactly once: when the response (or error)
/// is recorded, or — if the request is dropped first, by the overall
/// timeout or a caller that went away — with a `cancelled` event.
pub struct Guard {
    cx: Option<Context>,
    kind: SpanKind,
}

impl Guard {
    /// Guards the span `cx` holds.
    pub fn new(cx: Context, kind: SpanKind) -> Self {
        Self { cx: Some(cx), kind }
    }

    /// Records the response and ends the span.
    ///
    /// Server spans are errors on 5xx; client spans on 4xx too (the
    /// convention: the caller's request failed). A response the sidecar made
    /// itself (a [`ProxyAnswer`]) adds an event naming the failure.
    pub fn respond<B>(&mut self, rsp: &Response<B>) {
        let Some(cx) = self.cx.take() else { return };
        let span = cx.span();
        let status = rsp.status().as_u16();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(kind) = rsp.extensions().get::<ProxyAnswer>().map(|a| a.kind) {
            span.add_event(
                event_name(kind),
                vec![KeyValue::new("trellis.error.kind", kind.to_owned())],
            );
        }
        if let Some(audit) = rsp.extensions().get::<AuditDenied>() {
            span.add_event(
                "authorization audit: would be refused",
                vec![
                    KeyValue::new("trellis.peer.identity", audit.caller.clone()),
                    KeyValue::new("trellis.authorization.reason", audit.reason),
                ],
            );
        }
        let failed = status >= 500 || (self.kind == SpanKind::Client && status >= 400);
        if failed {
            span.set_attribute(KeyValue::new("error.type", status.to_string()));
            span.set_status(Status::error(format!("HTTP {status}")));
        }
        span.end();
    }

    /// Records a failure without a response (connect error, open breaker,
    /// per-try timeout) as an event and the error status, and ends the span.
    pub fn fail(&mut self, error: &BoxError) {
        let Some(cx) = self.cx.take() else { return };
        let span = cx.span();
        let kind = error
            .downcast_ref::<ProxyError>()
            .map(|e| e.kind())
            .unwrap_or("upstream-failed");
        span.add_event(
            event_name(kind),
            vec![
                KeyValue::new("trellis.error.kind", kind),
                KeyValue::new("exception.message", error.to_string()),
            ],
        );
        span.set_attribute(KeyValue::new("error.type", kind));
        span.set_status(Status::error(error.to_string()));
        span.end();
    }
}

impl Guard {
    /// Records an error that is not a proxy error, and ends the span.
    pub fn fail_with(&mut self, message: &str) {
        let Some(cx) = self.cx.take() else { return };
        let span = cx.span();
        span.set_status(Status::error(message.to_owned()));
        span.end();
    }
}

/// Event names a trace viewer shows: what stopped the try.
fn event_name(kind: &str) -> &'static str {
    match kind {
        "circuit-open" => "circuit breaker open",
        "per-try-timeout" => "per-try timeout",
        "timeout" => "timeout",
        "rate-limited" => "rate limited",
        "overloaded" => "load shed",
        "not-authorized" => "not authorized",
        _ => "upstream error",
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(cx) = self.cx.take() {
            let span = cx.span();
            span.add_event("cancelled", vec![]);
            span.set_status(Status::error(
                "cancelled before an answer: overall timeout or the caller went away",
            ));
            span.end();
        }
    }
}
