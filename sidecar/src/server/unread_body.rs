//! An HTTP/2 request body that is read to its end even when the stack
//! answered without reading it.
//!
//! The proxy often answers at a request's head: a fail-fast refusal (no
//! ready endpoint, breaker open, rate limit, authorization) drops the
//! body unread. h2 then resets the stream (NO_ERROR, RFC 9113 §8.1), and
//! the client's body frames, already on their way, arrive for a stream it
//! has reset. h2 remembers the streams it reset for a second, fifty at
//! most (hyper's server lets neither be raised); a frame for one it has
//! forgotten draws a STREAM_CLOSED reset that h2 counts as its own error, and after 1,024 of
//! those it ends the client's connection with GOAWAY ENHANCE_YOUR_CALM,
//! failing every request in flight on it. A busy gRPC client whose
//! dependency's breaker opens sends that many within seconds.
//!
//! So a body dropped before its end is handed to a task that reads the
//! rest, up to [`DRAIN_BYTES`] and [`DRAIN_FOR`], and the stream closes as
//! an answered request normally does. Past either bound the body is
//! dropped, and h2 resets the stream as before: a client still sending
//! that much after its answer is told to stop. The task costs nothing on
//! requests whose bodies the stack reads; the wrapper is one `Option`.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// How much of an unread body is read after the answer before the stream
/// is reset instead: the default initial stream window (65,535 bytes),
/// which a client may send without waiting for the proxy.
pub(super) const DRAIN_BYTES: usize = 64 * 1024;

/// How long an unread body's end is waited for after the answer.
pub(super) const DRAIN_FOR: Duration = Duration::from_secs(5);

/// An HTTP/2 request body that, dropped before its end, is read to its end
/// in the background (see the module's doc).
pub(super) struct FinishUnread(Option<Incoming>);

impl FinishUnread {
    pub(super) fn new(body: Incoming) -> Self {
        Self(Some(body))
    }
}

impl Body for FinishUnread {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.0.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for FinishUnread {
    fn drop(&mut self) {
        let Some(body) = self.0.take() else { return };
        if body.is_end_stream() {
            return;
        }
        // Dropped outside a runtime (a test's teardown), it is reset.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(read_to_end(body));
        }
    }
}

/// Reads `body` to its end within the bounds; dropping it earlier resets
/// the stream.
async fn read_to_end(mut body: Incoming) {
    let read = async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let len = frame.data_ref().map_or(0, Bytes::len);
            match left.checked_sub(len) {
                Some(rest) => left = rest,
                None => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_FOR, read).await;
}
