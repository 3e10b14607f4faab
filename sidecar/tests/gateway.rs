//! Gateway mode: a sidecar serving a gateway configuration from a file,
//! routing to real upstreams on loopback through the mesh's per-service
//! stacks.

mod support;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use http::{Request, StatusCode};
use serde_json::{Value, json};
use support::*;
use trellis_sidecar::{Config, Discovery, GatewaySource, Running};

/// One backend reference in the configuration.
fn backend(name: &str, namespace: &str, weight: u32) -> Value {
    json!({"service": {"name": name, "namespace": namespace, "port": 8080}, "weight": weight})
}

/// A configuration serving `hosts` on `port`, with `echo-a` (default) and
/// `echo-b` (namespace apps) as dependencies.
fn config(port: u16, hosts: Value) -> String {
    json!({
        "gateway": "default/edge",
        "policy": {
            "service": "edge",
            "namespace": "default",
            "appPort": 15020,
            "dependencies": [{"name": "echo-a"}, {"name": "echo-b", "namespace": "apps"}],
        },
        "ports": [{"port": port, "hosts": hosts}],
    })
    .to_string()
}

async fn gateway(text: &str, endpoints: &[(&str, &[SocketAddr])]) -> (Running, PathBuf) {
    let path = temp_path("gateway.json");
    std::fs::write(&path, text).unwrap();
    let mut cfg = Config::local(None);
    cfg.gateway = Some(GatewaySource::File(path.clone()));
    cfg.discovery = Discovery::Static {
        endpoints: endpoints
            .iter()
            .map(|(n, a)| ((*n).to_owned(), a.to_vec()))
            .collect(),
        file: None,
    };
    (trellis_sidecar::start(cfg).await.unwrap(), path)
}

async fn send(port: u16, host: &str, path: &str) -> Answer {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let req = Request::get(path)
        .header("host", host)
        .body(full(""))
        .unwrap();
    h1(addr, req).await
}

/// Waits until `port` answers `host` and `path` with `status`.
async fn until(port: u16, host: &str, path: &str, status: StatusCode) {
    let ok = eventually(Duration::from_secs(5), || async {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && send(port, host, path).await.status == status
    })
    .await;
    assert!(ok, "{host}{path} on port {port} never answered {status}");
}

#[tokio::test]
async fn routes_by_host_and_match_apply_filters_and_split_by_weight() {
    let a = upstream("echo-a").await;
    let b = upstream("echo-b").await;
    let port = free_port();
    let hosts = json!([
        {"hostname": "*.example.com", "rules": [
            {"route": "HTTPRoute/default/exact", "matches": {"path": {"type": "exact", "value": "/exact"}},
             "backends": [backend("echo-b", "apps", 1)]},
            {"route": "HTTPRoute/default/headers", "matches": {"path": {"type": "prefix", "value": "/a"}},
             "filters": [
                {"type": "requestHeaderModifier", "set": [["x-set", "1"]], "add": [["x-add", "2"]], "remove": ["x-remove"]},
                {"type": "responseHeaderModifier", "set": [["x-answered-by", "gateway"]]}],
             "backends": [backend("echo-a", "default", 1)]},
            {"route": "HTTPRoute/default/rewrite", "matches": {"path": {"type": "prefix", "value": "/old"}},
             "filters": [{"type": "urlRewrite", "path": {"type": "replacePrefixMatch", "value": "/new"}}],
             "backends": [backend("echo-a", "default", 1)]},
            {"route": "HTTPRoute/default/redirect", "matches": {"path": {"type": "prefix", "value": "/moved"}},
             "filters": [{"type": "requestRedirect", "scheme": "https", "status": 302}]},
            {"route": "HTTPRoute/default/broken", "matches": {"path": {"type": "prefix", "value": "/broken"}},
             "backends": [{"weight": 1}]},
            {"route": "HTTPRoute/default/split", "matches": {"path": {"type": "prefix", "value": "/"}},
             "backends": [backend("echo-a", "default", 1), backend("echo-b", "apps", 1)]},
        ]},
        {"hostname": "only-b.example.com", "rules": [
            {"route": "HTTPRoute/apps/b", "matches": {"path": {"type": "prefix", "value": "/b"}},
             "backends": [backend("echo-b", "apps", 1)]},
        ]},
    ]);
    let (_gw, _) = gateway(
        &config(port, hosts),
        &[("echo-a", &[a.addr]), ("echo-b.apps", &[b.addr])],
    )
    .await;
    until(port, "www.example.com", "/exact", StatusCode::OK).await;

    // An exact match, to the backend in another namespace; the backend
    // sees the client's Host and path.
    let r = send(port, "www.example.com", "/exact").await;
    assert_eq!(r.server(), "echo-b");
    assert_eq!(r.json()["headers"]["host"][0], "www.example.com");
    assert_eq!(r.json()["path"], "/exact");

    // Header filters on the request and on the response.
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let req = Request::get("/a/thing")
        .header("host", "www.example.com")
        .header("x-add", "1")
        .header("x-remove", "gone")
        .body(full(""))
        .unwrap();
    let r = h1(addr, req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-set"][0], "1");
    assert_eq!(seen["x-add"][0], "1,2");
    assert!(seen.get("x-remove").is_none(), "{seen}");
    assert_eq!(r.headers["x-answered-by"], "gateway");

    // A prefix rewrite keeps the rest of the path and the query.
    let r = send(port, "www.example.com", "/old/x?q=1").await;
    assert_eq!(r.json()["uri"], "/new/x?q=1");

    // A redirect is answered by the gateway.
    let r = send(port, "www.example.com", "/moved/here?q=1").await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(
        r.headers["location"],
        "https://www.example.com/moved/here?q=1"
    );

    // An invalid backend gets 500, an unknown host 404.
    assert_eq!(
        send(port, "www.example.com", "/broken").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        send(port, "nowhere.test", "/").await.status,
        StatusCode::NOT_FOUND
    );
    // The exact host wins over the wildcard, with no fallback to it.
    assert_eq!(
        send(port, "only-b.example.com", "/b").await.server(),
        "echo-b"
    );
    assert_eq!(
        send(port, "only-b.example.com", "/exact").await.status,
        StatusCode::NOT_FOUND
    );

    // Equal weights: both backends get a share.
    let (hits_a, hits_b) = (a.hits(), b.hits());
    for _ in 0..60 {
        assert_eq!(
            send(port, "x.example.com", "/split").await.status,
            StatusCode::OK
        );
    }
    let (share_a, share_b) = (a.hits() - hits_a, b.hits() - hits_b);
    assert_eq!(share_a + share_b, 60);
    assert!(share_a >= 10 && share_b >= 10, "a {share_a}, b {share_b}");
}

#[tokio::test]
async fn a_bad_configuration_keeps_the_last_good_one_and_ports_follow_the_configuration() {
    let a = upstream("echo-a").await;
    let (port, second) = (free_port(), free_port());
    let route = |path: &str| {
        json!([{"rules": [{"route": "HTTPRoute/default/r", "matches": {"path": {"type": "prefix", "value": path}},
                            "backends": [backend("echo-a", "default", 1)]}]}])
    };
    let (gw, path) = gateway(&config(port, route("/one")), &[("echo-a", &[a.addr])]).await;
    until(port, "any", "/one", StatusCode::OK).await;

    // A regular expression that does not compile: refused, the last good
    // table keeps serving, and /status says why.
    let mut bad: Value = serde_json::from_str(&config(port, route("/two"))).unwrap();
    bad["ports"][0]["hosts"][0]["rules"][0]["matches"]["headers"] =
        json!([{"name": "x", "value": "([", "regex": true}]);
    std::fs::write(&path, bad.to_string()).unwrap();
    let refused = eventually(Duration::from_secs(5), || async {
        let status = get(gw.admin, "/status").await.text();
        status.contains("HTTPRoute/default/r header")
    })
    .await;
    assert!(refused, "{}", get(gw.admin, "/status").await.text());
    assert_eq!(send(port, "any", "/one").await.status, StatusCode::OK);
    assert_eq!(
        send(port, "any", "/two").await.status,
        StatusCode::NOT_FOUND
    );

    // A new port opens, the old one closes.
    let mut moved: Value = serde_json::from_str(&config(second, route("/two"))).unwrap();
    moved["ports"][0]["port"] = json!(second);
    std::fs::write(&path, moved.to_string()).unwrap();
    until(second, "any", "/two", StatusCode::OK).await;
    let closed = eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    })
    .await;
    assert!(
        closed,
        "port {port} still accepts after it left the configuration"
    );
}

/// A token signed by `key` (algorithm `alg`, key id `kid`) with the
/// standard claims of issuer `https://issuer.example`, audience `shop`,
/// valid for five minutes from now, and `extra` merged in.
fn token(
    key: &jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
    kid: &str,
    extra: Value,
) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = json!({
        "iss": "https://issuer.example",
        "aud": "shop",
        "sub": "alice",
        "exp": now + 300,
    });
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

#[tokio::test]
async fn a_jwt_rule_lets_good_tokens_through_with_their_claims_and_answers_bad_ones() {
    use jsonwebtoken::{Algorithm, EncodingKey, jwk::Jwk};

    let a = upstream("echo-a").await;
    let port = free_port();
    let rsa = EncodingKey::from_rsa_pem(include_bytes!("fixtures/jwt/rsa-a.pem")).unwrap();
    let other_rsa = EncodingKey::from_rsa_pem(include_bytes!("fixtures/jwt/rsa-b.pem")).unwrap();
    let ec_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec = EncodingKey::from_ec_pem(ec_pair.serialize_pem().as_bytes()).unwrap();
    let public = |key: &EncodingKey, alg: Algorithm, kid: &str| {
        let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        jwk
    };
    let jwks = json!({"keys": [public(&rsa, Algorithm::RS256, "rsa-1"), public(&ec, Algorithm::ES256, "ec-1")]});
    let hosts = json!([{"rules": [
        {"route": "HTTPRoute/shop/orders", "matches": {"path": {"type": "prefix", "value": "/api/v1/orders"}},
         "jwt": {
            "issuer": "https://issuer.example",
            "audiences": ["shop"],
            "jwks": jwks.to_string(),
            "requiredClaims": [["scope", "orders:read"]],
            "claimsToHeaders": [["sub", "x-user-id"]],
         },
         "backends": [backend("echo-a", "default", 1)]},
        {"route": "HTTPRoute/shop/open", "matches": {"path": {"type": "prefix", "value": "/"}},
         "backends": [backend("echo-a", "default", 1)]},
    ]}]);
    let (_gw, _) = gateway(&config(port, hosts), &[("echo-a", &[a.addr])]).await;
    until(port, "shop.test", "/open", StatusCode::OK).await;

    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let call = |auth: Option<String>, forged_user: Option<&'static str>| async move {
        let mut req = Request::get("/api/v1/orders/7").header("host", "shop.test");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(u) = forged_user {
            req = req.header("x-user-id", u);
        }
        h1(addr, req.body(full("")).unwrap()).await
    };
    let bearer = |t: String| Some(format!("Bearer {t}"));
    let read = json!({"scope": "orders:read"});

    // Valid, RS256 and ES256: the claim reaches the backend as a header,
    // replacing the one the client forged.
    for (key, alg, kid) in [
        (&rsa, Algorithm::RS256, "rsa-1"),
        (&ec, Algorithm::ES256, "ec-1"),
    ] {
        let r = call(bearer(token(key, alg, kid, read.clone())), Some("mallory")).await;
        assert_eq!(r.status, StatusCode::OK, "{alg:?}: {}", r.text());
        let seen = &r.json()["headers"];
        assert_eq!(seen["x-user-id"], json!(["alice"]), "{seen}");
        assert!(
            seen.get("authorization").is_some(),
            "the backend gets the token too"
        );
    }

    // No token: a bare challenge.
    let r = call(None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"trellis\"");

    // Each bad token: 401 with an invalid_token challenge naming why, and
    // the backend never sees it.
    let hits = a.hits();
    let now = jsonwebtoken::get_current_timestamp();
    let good = token(&rsa, Algorithm::RS256, "rsa-1", read.clone());
    let payload = good.split('.').nth(1).unwrap().to_owned();
    let bad = [
        (
            "expired",
            token(
                &rsa,
                Algorithm::RS256,
                "rsa-1",
                json!({"scope": "orders:read", "exp": now - 600}),
            ),
        ),
        (
            "wrong issuer",
            token(
                &rsa,
                Algorithm::RS256,
                "rsa-1",
                json!({"scope": "orders:read", "iss": "https://evil.example"}),
            ),
        ),
        (
            "wrong audience",
            token(
                &ec,
                Algorithm::ES256,
                "ec-1",
                json!({"scope": "orders:read", "aud": "billing"}),
            ),
        ),
        (
            "bad signature",
            token(&other_rsa, Algorithm::RS256, "rsa-1", read.clone()),
        ),
        // {"alg":"none","typ":"JWT"}, unsigned.
        (
            "never accepted",
            format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}."),
        ),
        ("malformed", "this.is-not.a-token".to_owned()),
    ];
    for (why, t) in bad {
        let r = call(bearer(t), None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{why}: {}", r.text());
        let challenge = r.headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"trellis\", error=\"invalid_token\"")
                && challenge.contains(why),
            "{why}: {challenge}"
        );
        assert!(r.text().contains(why), "{why}: {}", r.text());
    }
    assert_eq!(a.hits(), hits, "no refused request reached the backend");

    // A valid token without the required claim: 403.
    let r = call(
        bearer(token(
            &ec,
            Algorithm::ES256,
            "ec-1",
            json!({"scope": "orders:write"}),
        )),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert!(
        r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("error=\"insufficient_scope\""),
        "{:?}",
        r.headers
    );

    // A rule without a jwt check is open.
    assert_eq!(
        send(port, "shop.test", "/open").await.status,
        StatusCode::OK
    );
}

/// Reads one HTTP/1.1 response head from `conn`, lower-cased.
async fn response_head(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            conn.read(&mut byte).await.unwrap(),
            1,
            "the connection closed mid-head"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[tokio::test]
async fn a_refused_request_with_an_unread_body_says_the_connection_closes() {
    use tokio::io::AsyncWriteExt;

    let a = upstream("echo-a").await;
    let port = free_port();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("ec-1".into());
    let hosts = json!([{"rules": [
        {"route": "HTTPRoute/shop/orders", "matches": {"path": {"type": "prefix", "value": "/api/v1/orders"}},
         "jwt": {"issuer": "https://issuer.example", "audiences": ["shop"], "jwks": json!({"keys": [jwk]}).to_string()},
         "backends": [backend("echo-a", "default", 1)]},
        {"route": "HTTPRoute/shop/open", "matches": {"path": {"type": "prefix", "value": "/"}},
         "backends": [backend("echo-a", "default", 1)]},
    ]}]);
    let (_gw, _) = gateway(&config(port, hosts), &[("echo-a", &[a.addr])]).await;
    until(port, "shop.test", "/open", StatusCode::OK).await;

    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // Refused without a body: nothing is left unread, the connection stays.
    conn.write_all(b"GET /api/v1/orders HTTP/1.1\r\nhost: shop.test\r\n\r\n")
        .await
        .unwrap();
    let head = response_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    tokio::io::AsyncReadExt::read_exact(&mut conn, &mut body)
        .await
        .unwrap();
    // Refused with a body it never read: the answer says the connection ends.
    conn.write_all(
        b"POST /api/v1/orders HTTP/1.1\r\nhost: shop.test\r\ncontent-length: 13\r\n\r\n{\"user_id\":1}",
    )
    .await
    .unwrap();
    let head = response_head(&mut conn).await;
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
}

/// A GET of `path` on the gateway's `port`, from source address `from`,
/// with `Authorization: Bearer <token>` when there is one.
async fn get_from(from: [u8; 4], port: u16, path: &str, token: Option<&str>) -> Answer {
    let mut req = Request::get(path).header("host", "shop.test");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    h1_from(
        from.into(),
        ([127, 0, 0, 1], port).into(),
        req.body(full("")).unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_per_client_rate_limit_refuses_one_client_and_serves_the_others() {
    use jsonwebtoken::{Algorithm, EncodingKey, jwk::Jwk};

    let a = upstream("echo-a").await;
    let port = free_port();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("ec-1".into());
    let limit = |id: &str, key: Value| json!({"id": id, "perSecond": 1, "burst": 2, "key": key});
    let hosts = json!([{"rules": [
        {"route": "HTTPRoute/shop/api", "matches": {"path": {"type": "prefix", "value": "/api"}},
         "jwt": {
            "issuer": "https://issuer.example",
            "audiences": ["shop"],
            "jwks": json!({"keys": [jwk]}).to_string(),
            "claimsToHeaders": [["sub", "x-user-id"]],
         },
         "rateLimit": limit("EdgePolicy/shop/per-user", json!({"type": "claim", "claim": "sub"})),
         "backends": [backend("echo-a", "default", 1)]},
        {"route": "HTTPRoute/shop/open", "matches": {"path": {"type": "prefix", "value": "/"}},
         "rateLimit": limit("EdgePolicy/shop/per-address", json!({"type": "clientAddress"})),
         "backends": [backend("echo-a", "default", 1)]},
    ]}]);
    let (gw, _) = gateway(&config(port, hosts), &[("echo-a", &[a.addr])]).await;
    // A request without a token is refused before the limit: it spends
    // no token, so waiting with it changes nothing below.
    until(port, "shop.test", "/api", StatusCode::UNAUTHORIZED).await;

    // By claim: each `sub` has its own bucket of two, refilled at one a second.
    let token_of = |sub: &str| token(&key, Algorithm::ES256, "ec-1", json!({"sub": sub}));
    let (alice, bob) = (token_of("a"), token_of("b"));
    let local = [127, 0, 0, 1];
    for _ in 0..2 {
        let r = get_from(local, port, "/api/x", Some(alice.as_str())).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["headers"]["x-user-id"], json!(["a"]));
    }
    let hits = a.hits();
    let r = get_from(local, port, "/api/x", Some(alice.as_str())).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.headers["x-trellis-proxy-error"], "rate-limited");
    assert!(
        r.text().contains("EdgePolicy/shop/per-user"),
        "{}",
        r.text()
    );
    assert_eq!(
        a.hits(),
        hits,
        "the refused request never reached the backend"
    );
    // Same address, another subject: its own bucket.
    for _ in 0..2 {
        let r = get_from(local, port, "/api/x", Some(bob.as_str())).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["headers"]["x-user-id"], json!(["b"]));
    }
    // A refilled token lets a back in, one request's worth.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get_from(local, port, "/api/x", Some(alice.as_str()))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get_from(local, port, "/api/x", Some(alice.as_str()))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // By address: 127.0.0.1 spends its burst, 127.0.0.2 still passes.
    for _ in 0..2 {
        assert_eq!(
            get_from(local, port, "/open", None).await.status,
            StatusCode::OK
        );
    }
    let r = get_from(local, port, "/open", None).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    let other = get_from([127, 0, 0, 2], port, "/open", None).await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text());

    let m = metrics(&gw).await;
    assert_eq!(
        metric(
            &m,
            "trellis_gateway_rate_limited_total{limit=\"EdgePolicy/shop/per-user\"}"
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "trellis_gateway_rate_limited_total{limit=\"EdgePolicy/shop/per-address\"}"
        ),
        1.0,
        "{m}"
    );
}
