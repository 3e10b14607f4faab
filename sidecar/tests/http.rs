//! HTTP semantics through the sidecar: headers, bodies, HTTP/2 and gRPC,
//! inbound forwarding, malformed input.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_request_ids_flow() {
    let user = upstream("user").await;
    let (sc, _) = sidecar(
        &policy("order", 1, serde_json::json!({})),
        &[("user", &[user.addr])],
    )
    .await;
    let req = Request::get("http://user/h")
        .header("host", "user")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "gzip")
        .header("upgrade", "h2c-not-really")
        .header("x-end-to-end", "kept")
        .body(full(""))
        .unwrap();
    let a = h1(sc.outbound, req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let h = &a.json()["headers"];
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    assert_eq!(h["x-end-to-end"][0], "kept");
    // Created when missing: a v4 UUID, the same upstream and back.
    let id = h["x-request-id"][0].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(a.headers["x-request-id"], id.as_str());

    // Passed on when present.
    let req = Request::get("http://user/h")
        .header("host", "user")
        .header("x-request-id", "abc-123")
        .body(full(""))
        .unwrap();
    let a = h1(sc.outbound, req).await;
    assert_eq!(a.json()["headers"]["x-request-id"][0], "abc-123");
    assert_eq!(a.headers["x-request-id"], "abc-123");
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_stripped() {
    // An upstream that names a header in Connection: a raw HTTP/1.1 server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\nconnection: x-private\r\nx-private: secret\r\nkeep-alive: timeout=9\r\nx-public: yes\r\ncontent-length: 2\r\n\r\nok",
                )
                .await;
        }
    });
    let (sc, _) = sidecar(
        &policy("order", 1, serde_json::json!({})),
        &[("raw", &[addr])],
    )
    .await;
    let a = get_via(sc.outbound, "http://raw/").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.text(), "ok");
    assert_eq!(a.headers["x-public"], "yes");
    assert!(a.headers.get("x-private").is_none(), "{:?}", a.headers);
    assert!(a.headers.get("keep-alive").is_none(), "{:?}", a.headers);
}

#[tokio::test]
async fn bodies_stream_both_ways_large_and_chunked() {
    let user = upstream("user").await;
    let (sc, _) = sidecar(
        &policy("order", 1, serde_json::json!({})),
        &[("user", &[user.addr])],
    )
    .await;

    // A 4 MiB chunked upload, echoed back.
    let chunk = Bytes::from((0..=255u8).cycle().take(64 * 1024).collect::<Vec<u8>>());
    let frames = (0..64).map({
        let chunk = chunk.clone();
        move |_| Ok::<_, BoxError>(Frame::data(chunk.clone()))
    });
    let body = StreamBody::new(futures::stream::iter(frames)).boxed();
    let req = Request::post("http://user/echo")
        .header("host", "user")
        .body(body)
        .unwrap();
    let a = h1(sc.outbound, req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body.len(), 64 * chunk.len());
    assert!(a.body.chunks(chunk.len()).all(|c| c == chunk));

    // A 16 MiB download.
    let a = get_via(sc.outbound, "http://user/big?bytes=16777216").await;
    assert_eq!(a.body.len(), 16 << 20);

    // Status codes pass through untouched (the app's 503 is not the proxy's).
    for code in [201u16, 204, 404, 429, 500, 503] {
        let a = get_via(sc.outbound, &format!("http://user/status/{code}")).await;
        assert_eq!(a.status.as_u16(), code);
        assert!(a.headers.get("x-trellis-proxy-error").is_none());
    }
}

#[tokio::test]
async fn h2c_end_to_end() {
    let user = upstream("user").await;
    let (sc, _) = sidecar(
        &policy("order", 1, serde_json::json!({})),
        &[("user", &[user.addr])],
    )
    .await;
    let mut h2 = h2_connect(sc.outbound).await;
    for i in 0..3 {
        let req = Request::get(format!("http://user/h2/{i}"))
            .body(full(""))
            .unwrap();
        let a = h2_send(&mut h2, req).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(a.version, Version::HTTP_2);
        let j = a.json();
        assert_eq!(j["server"], "user");
        assert_eq!(
            j["version"], "HTTP/2.0",
            "an HTTP/2 request goes upstream as h2c"
        );
        assert_eq!(j["path"], format!("/h2/{i}"));
    }
    // An HTTP/1.1 request stays HTTP/1.1 upstream.
    let a = get_via(sc.outbound, "http://user/h1").await;
    assert_eq!(a.json()["version"], "HTTP/1.1");
}

fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
    b.extend_from_slice(msg);
    b.into()
}

/// A gRPC-style unary call through two sidecars: client → sidecar A
/// (outbound) → sidecar B (inbound) → the app, with HTTP/2 all the way,
/// `te: trailers` kept and the response trailers delivered.
#[tokio::test]
async fn grpc_through_two_sidecars() {
    let app = upstream("grpc-app").await;
    let (b, _) = sidecar(
        &policy(
            "user",
            app.addr.port(),
            serde_json::json!({"protocol": "GRPC"}),
        ),
        &[],
    )
    .await;
    let (a, _) = sidecar(
        &policy("order", 1, serde_json::json!({})),
        &[("user", &[b.inbound])],
    )
    .await;
    let mut h2 = h2_connect(a.outbound).await;
    for _ in 0..3 {
        let req = Request::post("http://user/grpc/trellis.User/Get")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(grpc_frame(b"hello")))
            .unwrap();
        let r = h2_send(&mut h2, req).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, grpc_frame(b"hello"));
        let trailers = r.trailers.expect("trailers arrive");
        assert_eq!(trailers["grpc-status"], "0");
        // The app saw HTTP/2 and te: trailers.
        assert_eq!(
            trailers["grpc-message"],
            "grpc-app-HTTP/2.0-te=Some(trailers)"
        );
    }
}

#[tokio::test]
async fn inbound_forwards_to_the_app_with_forwarded_for() {
    let app = upstream("app").await;
    let (sc, _) = sidecar(
        &policy("order", app.addr.port(), serde_json::json!({})),
        &[],
    )
    .await;
    let req = Request::get("/orders/7")
        .header("host", "order")
        .header("x-forwarded-for", "203.0.113.9")
        .body(full(""))
        .unwrap();
    let a = h1(sc.inbound, req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let j = a.json();
    assert_eq!(j["server"], "app");
    assert_eq!(j["path"], "/orders/7");
    assert_eq!(j["headers"]["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(j["headers"]["host"][0], "order");
    assert!(j["headers"]["x-request-id"][0].is_string());

    // h2c inbound too; an HTTP application still gets HTTP/1.1, because
    // most HTTP servers do not speak cleartext HTTP/2.
    let mut h2 = h2_connect(sc.inbound).await;
    let a = h2_send(
        &mut h2,
        Request::get("http://order/x").body(full("")).unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.version, Version::HTTP_2);
    assert_eq!(a.json()["version"], "HTTP/1.1");
    assert_eq!(
        a.json()["headers"]["host"][0],
        "order",
        "the :authority becomes Host"
    );
}

#[tokio::test]
async fn inbound_without_the_app_answers_502() {
    let (sc, _) = sidecar(
        &policy("order", dead_addr().port(), serde_json::json!({})),
        &[],
    )
    .await;
    let a = get(sc.inbound, "/").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert!(a.text().contains("\"order\""), "{}", a.text());
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let user = upstream("user").await;
    let (sc, _) = sidecar(
        &policy("order", 1, serde_json::json!({})),
        &[("user", &[user.addr])],
    )
    .await;
    for garbage in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET http://user/ HTTP/1.1\r\nhost: user\r\ncontent-length: nope\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(sc.outbound).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 400"), "{garbage:?} → {out:?}");
    }
    // CONNECT (HTTPS_PROXY tunnels) is refused, not forwarded.
    let req = Request::connect("user:443").body(full("")).unwrap();
    let a = h1(sc.outbound, req).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
    assert!(a.text().contains("CONNECT"), "{}", a.text());

    // A huge header is refused, not buffered without bound.
    let req = Request::get("http://user/")
        .header("host", "user")
        .header("x-big", "a".repeat(200 * 1024))
        .body(full(""))
        .unwrap();
    let mut send = h1_connect(sc.outbound).await;
    // An error means the connection was closed: also a refusal.
    if let Ok(rsp) = send.send_request(req).await {
        assert_eq!(rsp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    assert_eq!(
        get_via(sc.outbound, "http://user/").await.status,
        StatusCode::OK
    );
}
