//! HTTP/2 requests the proxy answers before their bodies have arrived: a
//! fail-fast refusal (no ready endpoint, breaker open, rate limit) answers
//! at the request's head. The client's body frames are then still on their
//! way, and a busy client's connection carries many such streams at once.
//!
//! The frames are written by hand over TCP, so the order on the wire is
//! exactly that: fifty heads, their fifty answers, then the fifty bodies.
//! A client library would stop sending once it saw the stream closed,
//! which on a real network it sees too late.

mod support;

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use serde_json::json;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// One frame: its type, flags, stream and payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A hand-driven h2c client connection.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Self {
            tcp,
            buf: Vec::new(),
        };
        raw.send(SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = Vec::with_capacity(9 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// A POST's head to `authority`, every field a literal without
    /// indexing (HPACK, RFC 7541 §6.2.2), so no decoder state is needed.
    async fn head(&mut self, stream: u32, authority: &str, end_stream: bool) {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/x"),
            (":authority", authority),
        ] {
            block.push(0x00);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.send(HEADERS, flags, stream, &block).await;
    }

    /// The next frame, answering the server's SETTINGS and PINGs and
    /// returning the connection window its DATA takes on the way; `None` when the connection closes or 5 s pass without one.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let head: Vec<u8> = self.buf.drain(..9).collect();
                    let frame = Frame {
                        kind: head[3],
                        flags: head[4],
                        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]])
                            & 0x7fff_ffff,
                        payload: self.buf.drain(..len).collect(),
                    };
                    match frame.kind {
                        // The answers' bodies use up the connection's
                        // window; give it back as a client does.
                        DATA if !frame.payload.is_empty() => {
                            let len = frame.payload.len() as u32;
                            self.send(WINDOW_UPDATE, 0, 0, &len.to_be_bytes()).await;
                            return Some(frame);
                        }
                        SETTINGS if frame.flags & ACK == 0 => {
                            self.send(SETTINGS, ACK, 0, &[]).await
                        }
                        PING if frame.flags & ACK == 0 => {
                            let payload = frame.payload.clone();
                            self.send(PING, ACK, 0, &payload).await;
                        }
                        _ => return Some(frame),
                    }
                    continue;
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(Duration::from_secs(5), self.tcp.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }
}

/// What the server sent on the connection that was not an answer.
#[derive(Default)]
struct Seen {
    /// Streams reset, with the error code.
    resets: Vec<(u32, u32)>,
    goaway: Option<String>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut codes = std::collections::BTreeMap::<u32, usize>::new();
        for (_, code) in &self.resets {
            *codes.entry(*code).or_default() += 1;
        }
        write!(
            f,
            "resets by error code {codes:?}, GOAWAY {:?}",
            self.goaway
        )
    }
}

impl Seen {
    /// Reads until every stream of `open` has its answer's end (or the
    /// connection ends), noting resets and a GOAWAY.
    async fn answers(&mut self, raw: &mut Raw, mut open: HashSet<u32>) -> HashSet<u32> {
        while !open.is_empty() {
            let Some(frame) = raw.next().await else {
                break;
            };
            match frame.kind {
                HEADERS | DATA if frame.flags & END_STREAM != 0 => {
                    open.remove(&frame.stream);
                }
                RST_STREAM => {
                    let code = u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
                    self.resets.push((frame.stream, code));
                    open.remove(&frame.stream);
                }
                GOAWAY => {
                    let code = u32::from_be_bytes(frame.payload[4..8].try_into().unwrap());
                    let debug = String::from_utf8_lossy(&frame.payload[8..]);
                    self.goaway = Some(format!("code {code}: {debug}"));
                }
                _ => {}
            }
        }
        open
    }
}

/// Before the fix, each answered stream was reset (NO_ERROR) at once; its
/// body, arriving once h2 had forgotten the reset (it keeps fifty at most,
/// for a second), drew a STREAM_CLOSED reset that h2 counts as its own error, and
/// after 1,024 of those it closed the client's connection with GOAWAY
/// ENHANCE_YOUR_CALM ("too_many_internal_resets"), failing every request
/// in flight on it. A busy gRPC client met that whenever a breaker opened.
#[tokio::test]
async fn a_client_answered_before_its_bodies_arrive_keeps_its_connection() {
    let app = upstream("app").await;
    // No endpoint: each request is refused at its head, then (its breaker
    // open) refused by the breaker; both answer without reading the body.
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), json!({})),
        &[("empty", &[])],
    )
    .await;
    let mut raw = Raw::connect(sc.outbound).await;
    let mut seen = Seen::default();
    let (rounds, batch) = (40u32, 50u32);
    let mut next_stream = 1;
    for round in 0..rounds {
        let streams: Vec<u32> = (0..batch).map(|i| next_stream + 2 * i).collect();
        next_stream += 2 * batch;
        for &s in &streams {
            raw.head(s, "empty", false).await;
        }
        let unanswered = seen
            .answers(&mut raw, streams.iter().copied().collect())
            .await;
        assert!(
            unanswered.is_empty() && seen.goaway.is_none(),
            "round {round}: {} of {batch} streams unanswered; {seen:?}",
            unanswered.len()
        );
        for &s in &streams {
            raw.send(DATA, END_STREAM, s, b"a body the proxy never needed")
                .await;
        }
    }
    // The connection still serves: one more request is answered.
    raw.head(next_stream, "empty", true).await;
    let unanswered = seen.answers(&mut raw, HashSet::from([next_stream])).await;
    assert!(
        unanswered.is_empty(),
        "the last request was not answered: {seen:?}"
    );
    assert!(seen.goaway.is_none(), "{seen:?}");
    // Every stream ended with its answer and its client's body: none was
    // reset, so there was nothing for late frames to trip over.
    assert!(seen.resets.is_empty(), "{seen:?}");
    assert_eq!(app.hits(), 0);
}
