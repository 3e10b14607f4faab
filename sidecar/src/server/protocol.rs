//! Telling a connection's protocol from its first bytes, and handing
//! those bytes back to hyper in front of the rest of the stream.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::watchdog::HeadSignal;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first byte of a TLS handshake record (RFC 8446 §5.1): no HTTP/1.1
/// request line or HTTP/2 preface starts with it.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
    /// TLS; the protocol inside comes from ALPN.
    Tls,
}

/// A TCP stream whose first bytes, read to tell the protocol, are read
/// again in front of the rest.
pub(super) struct Replay {
    head: [u8; H2_PREFACE.len()],
    read: usize,
    len: usize,
    stream: TcpStream,
    /// Told when bytes arrive from the stream (HTTP/1.1 only).
    pub(super) heads: Option<Arc<HeadSignal>>,
}

impl Replay {
    pub(super) fn new(stream: TcpStream) -> Self {
        Self {
            head: [0; H2_PREFACE.len()],
            read: 0,
            len: 0,
            stream,
            heads: None,
        }
    }

    /// Reads until the bytes so far are a TLS record, the whole HTTP/2
    /// preface, or differ from it (HTTP/1.1); `None` when the peer closes first.
    pub(super) async fn detect(&mut self) -> io::Result<Option<Protocol>> {
        loop {
            let n = self.stream.read(&mut self.head[self.len..]).await?;
            if n == 0 {
                return Ok(None);
            }
            self.len += n;
            if self.head[0] == TLS_HANDSHAKE {
                return Ok(Some(Protocol::Tls));
            }
            if self.head[..self.len] != H2_PREFACE[..self.len] {
                return Ok(Some(Protocol::Http1));
            }
            if self.len == H2_PREFACE.len() {
                return Ok(Some(Protocol::Http2));
            }
        }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.len {
            let n = (this.len - this.read).min(buf.remaining());
            buf.put_slice(&this.head[this.read..this.read + n]);
            this.read += n;
            return Poll::Ready(Ok(()));
        }
        let filled = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let (Some(heads), Poll::Ready(Ok(()))) = (&this.heads, &read)
            && buf.filled().len() > filled
        {
            heads.bytes_arrived();
        }
        read
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
