//! Malformed HTTP/1.1 to the sidecar's inbound and outbound listeners over
//! raw TCP: oversized heads, bad chunking, invalid methods, smuggling
//! attempts with conflicting framing, duplicate fields, obs-fold, NUL.
//! Each is answered 400 (431 for an oversized head, 414 for an oversized
//! target) and never reaches the application or the dependency, whose
//! request counters do not move (three doubled-framing cases hyper resolves
//! unambiguously instead; see `NORMALISED`) — while well-formed requests over the same
//! listeners do reach them, so the counters are seen to count.

mod support;

use std::{net::SocketAddr, time::Duration};

use serde_json::json;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Sends `raw` on a new connection and reads what comes back until the
/// connection closes or 2 s pass; returns the status and the whole text.
async fn raw(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything (an
    // oversized head); a failed write is then expected.
    let _ = stream.write_all(raw).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response to {:?}: {text:?}", preview(raw)));
    (status, text)
}

fn preview(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(120)]).into_owned()
}

/// The malformed requests: a name, the bytes (`{host}` stands for the Host
/// value the listener routes on), and the statuses acceptable for it
/// (`NORMALISED`: forwarded once, unambiguously, see below).
fn cases() -> Vec<(&'static str, Vec<u8>, &'static [u16])> {
    let big = "a".repeat(70 * 1024);
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let chunked = |body: &str| {
        format!(
            "POST /smuggle HTTP/1.1\r\nhost: {{host}}\r\ntransfer-encoding: chunked\r\n\r\n{body}"
        )
    };
    let with = |fields: &str, body: &str| {
        format!("POST /smuggle HTTP/1.1\r\nhost: {{host}}\r\n{fields}\r\n{body}")
    };
    const BAD: &[u16] = &[400];
    // hyper resolves these itself, as RFC 9112 §6.1 and §6.3 allow: with
    // both fields, Transfer-Encoding wins, Content-Length is dropped and
    // the connection is closed after the response; equal duplicate
    // Content-Lengths are one. The sidecar re-frames what it forwards, so
    // the application sees one unambiguous request and nothing smuggled.
    const NORMALISED: &[u16] = &[200];
    let text = |s: String| s.into_bytes();
    vec![
        (
            "oversized header",
            text(format!(
                "GET /x HTTP/1.1\r\nhost: {{host}}\r\nx-big: {big}\r\n\r\n"
            )),
            &[431],
        ),
        (
            "too many headers",
            text(format!("GET /x HTTP/1.1\r\nhost: {{host}}\r\n{many}\r\n")),
            &[431],
        ),
        (
            "oversized target",
            text(format!("GET /{big} HTTP/1.1\r\nhost: {{host}}\r\n\r\n")),
            &[414, 431],
        ),
        (
            "bad chunk size",
            text(chunked("zz\r\nhello\r\n0\r\n\r\n")),
            BAD,
        ),
        (
            "chunk size overflow",
            text(chunked("fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n")),
            BAD,
        ),
        (
            "chunk data without its CRLF",
            text(chunked("5\r\nhelloXX0\r\n\r\n")),
            BAD,
        ),
        (
            "invalid method",
            text("G(T /x HTTP/1.1\r\nhost: {host}\r\n\r\n".into()),
            BAD,
        ),
        (
            "NUL in method",
            b"GE\0T /x HTTP/1.1\r\nhost: {host}\r\n\r\n".to_vec(),
            BAD,
        ),
        (
            "space in target",
            text("GET /a b HTTP/1.1\r\nhost: {host}\r\n\r\n".into()),
            BAD,
        ),
        (
            "unknown version",
            text("GET /x HTTP/1.7\r\nhost: {host}\r\n\r\n".into()),
            &[400, 505],
        ),
        (
            "Content-Length then Transfer-Encoding (CL.TE smuggling)",
            text(with(
                "content-length: 6\r\ntransfer-encoding: chunked\r\n",
                "0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: {host}\r\n\r\n",
            )),
            NORMALISED,
        ),
        (
            "Transfer-Encoding then Content-Length (TE.CL smuggling)",
            text(with(
                "transfer-encoding: chunked\r\ncontent-length: 4\r\n",
                "5c\r\nGET /smuggled HTTP/1.1\r\nhost: {host}\r\ncontent-length: 15\r\n\r\nx=1\r\n0\r\n\r\n",
            )),
            NORMALISED,
        ),
        (
            "Transfer-Encoding gzip, chunked",
            text(with("transfer-encoding: gzip, chunked\r\n", "0\r\n\r\n")),
            BAD,
        ),
        (
            "Transfer-Encoding chunked, identity",
            text(with(
                "transfer-encoding: chunked, identity\r\n",
                "0\r\n\r\n",
            )),
            BAD,
        ),
        (
            "Transfer-Encoding xchunked",
            text(with("transfer-encoding: xchunked\r\n", "0\r\n\r\n")),
            BAD,
        ),
        (
            "Transfer-Encoding twice",
            text(with(
                "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
                "0\r\n\r\n",
            )),
            BAD,
        ),
        (
            "space before the colon of Transfer-Encoding",
            text(with("transfer-encoding : chunked\r\n", "0\r\n\r\n")),
            BAD,
        ),
        (
            "vertical tab in Transfer-Encoding",
            text(with("transfer-encoding:\x0bchunked\r\n", "0\r\n\r\n")),
            BAD,
        ),
        (
            "duplicate equal Content-Length",
            text(with("content-length: 5\r\ncontent-length: 5\r\n", "hello")),
            NORMALISED,
        ),
        (
            "duplicate different Content-Length",
            text(with("content-length: 5\r\ncontent-length: 6\r\n", "hello!")),
            BAD,
        ),
        (
            "Content-Length list",
            text(with("content-length: 5, 5\r\n", "hello")),
            BAD,
        ),
        (
            "negative Content-Length",
            text(with("content-length: -1\r\n", "hello")),
            BAD,
        ),
        (
            "signed Content-Length",
            text(with("content-length: +5\r\n", "hello")),
            BAD,
        ),
        (
            "obs-fold",
            text("GET /x HTTP/1.1\r\nhost: {host}\r\nx-folded: a\r\n b\r\n\r\n".into()),
            BAD,
        ),
        (
            "NUL in a header value",
            b"GET /x HTTP/1.1\r\nhost: {host}\r\nx-nul: a\0b\r\n\r\n".to_vec(),
            BAD,
        ),
        (
            "NUL in a header name",
            b"GET /x HTTP/1.1\r\nhost: {host}\r\nx-\0nul: a\r\n\r\n".to_vec(),
            BAD,
        ),
        (
            "bare CR in a header value",
            text("GET /x HTTP/1.1\r\nhost: {host}\r\nx-cr: a\rb\r\n\r\n".into()),
            BAD,
        ),
        (
            "Host twice",
            text("GET /x HTTP/1.1\r\nhost: {host}\r\nhost: other\r\n\r\n".into()),
            BAD,
        ),
        (
            "HTTP/1.1 without Host",
            text("GET /x HTTP/1.1\r\nx-a: b\r\n\r\n".into()),
            BAD,
        ),
    ]
}

fn fill(raw: &[u8], host: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.windows(6).position(|w| w == b"{host}") {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(host.as_bytes());
        rest = &rest[i + 6..];
    }
    out.extend_from_slice(rest);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_never_reach_the_app() {
    let app = upstream("app").await;
    let dep = upstream("dep").await;
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), json!({})),
        &[("dep", &[dep.addr])],
    )
    .await;

    let mut refused = 0;
    let mut wrong = Vec::new();
    let mut normalised = 0;
    for (name, bytes, expected) in cases() {
        for (listener, addr, host, up) in [
            ("inbound", sc.inbound, "order", &app),
            ("outbound", sc.outbound, "dep", &dep),
        ] {
            let before = up.hits();
            let (status, text) = raw(addr, &fill(&bytes, host)).await;
            if !expected.contains(&status) {
                wrong.push(format!(
                    "{name} on {listener}: {status}, expected {expected:?}:\n{text}"
                ));
                continue;
            }
            // Exactly one answer: nothing smuggled behind it was served.
            let answers = text
                .split("\r\n")
                .filter(|l| {
                    l.strip_prefix("HTTP/1.1 ").is_some_and(|s| {
                        s.len() >= 3 && s.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                    })
                })
                .count();
            if answers != 1 {
                wrong.push(format!(
                    "{name} on {listener}: {answers} responses:\n{text}"
                ));
                continue;
            }
            if status != 200 {
                refused += 1;
                continue;
            }
            // Normalised: the application saw this one request, framed one way.
            let seen: serde_json::Value = text
                .split_once("\r\n\r\n")
                .and_then(|(_, b)| serde_json::from_str(b).ok())
                .unwrap_or_else(|| panic!("{name} on {listener}: not the app's answer:\n{text}"));
            let headers = &seen["headers"];
            let one_framing = headers.get("content-length").is_none()
                || headers.get("transfer-encoding").is_none();
            if up.hits() != before + 1 || seen["path"] != "/smuggle" || !one_framing {
                wrong.push(format!(
                    "{name} on {listener}: the app saw {seen}, {} request(s)",
                    up.hits() - before
                ));
            }
            if bytes
                .windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"transfer-encoding"))
                && !text.to_ascii_lowercase().contains("connection: close")
            {
                wrong.push(format!("{name} on {listener}: the connection stays open after ambiguous framing:\n{text}"));
            }
            normalised += 1;
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        (app.hits(), dep.hits()),
        (normalised / 2, normalised / 2),
        "a refused request reached the application or the dependency"
    );
    eprintln!(
        "{refused} malformed requests refused, none reached the app or the dependency; \
         {normalised} with doubled framing fields forwarded once, unambiguously"
    );
    let (app_base, dep_base) = (app.hits(), dep.hits());

    // The same listeners pass well-formed requests: a chunked POST, a
    // POST with Content-Length, and a chunked body sent in pieces slower
    // than the sidecar's peek.
    for (listener, addr, host, up) in [
        ("inbound", sc.inbound, "order", &app),
        ("outbound", sc.outbound, "dep", &dep),
    ] {
        let (status, text) = raw(
            addr,
            format!("POST /echo HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{listener}: {text}");
        assert!(
            text.contains("hello") && text.contains(" world"),
            "{listener}: {text}"
        );
        let (status, text) = raw(
            addr,
            format!("POST /echo HTTP/1.1\r\nhost: {host}\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello").as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{listener}: {text}");
        assert!(text.contains("hello"), "{listener}: {text}");

        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("POST /echo HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(b"4\r\nslow\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"0\r\n\r\n").await.unwrap();
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
            .await
            .expect("a slow chunked body is answered")
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{listener}: {text}");
        assert!(text.contains("slow"), "{listener}: {text}");
        let base = if listener == "inbound" {
            app_base
        } else {
            dep_base
        };
        assert_eq!(
            up.hits(),
            base + 3,
            "{listener}: the well-formed requests reach it"
        );
    }
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_names_what_is_wrong_and_closes_the_connection() {
    let app = upstream("app").await;
    let (sc, _) = sidecar(&policy("order", app.addr.port(), json!({})), &[]).await;
    let (status, text) = raw(
        sc.inbound,
        b"POST /x HTTP/1.1\r\nhost: order\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{text}");
    assert!(
        lower.contains("x-trellis-proxy-error: bad-request"),
        "{text}"
    );
    assert!(
        text.contains("Transfer-Encoding \"gzip, chunked\" is not supported"),
        "{text}"
    );

    let (status, text) = raw(
        sc.inbound,
        b"POST /x HTTP/1.1\r\nhost: order\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    )
    .await;
    assert_eq!(status, 400);
    assert!(text.contains("chunked body is malformed"), "{text}");
    assert_eq!(app.hits(), 0);
    sc.shutdown().await;
}
