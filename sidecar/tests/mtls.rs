//! Mutual TLS and authorization between two real sidecars on loopback,
//! with certificates from a real issuer obtained through the sidecar's own
//! certify path, and a stand-in identity service that trusts tokens of the
//! form `sa:<name>` (the operator's identity service checks real
//! ServiceAccount tokens with TokenReview; its own tests cover that).

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;
use trellis_identity::{
    Issuer, KeyPair, SpiffeId,
    api::{CertifyRequest, CertifyResponse},
};
use trellis_sidecar::Running;

/// A stand-in identity service on `localhost`, issuing from `ca`.
struct IdentityService {
    addr: SocketAddr,
    issued: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl IdentityService {
    async fn start(ca: Arc<Issuer>, lifetime: Duration) -> Self {
        let key = KeyPair::generate().unwrap();
        let served = ca
            .certify(
                &key,
                None,
                &["localhost".into()],
                SystemTime::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                trellis_identity::pem::certificates(&served.chain_pem).unwrap(),
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issued = Arc::new(AtomicUsize::new(0));
        let counter = issued.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, ca, counter) = (acceptor.clone(), ca.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (ca, counter) = (ca.clone(), counter.clone());
                            async move {
                                let sa = req
                                    .headers()
                                    .get("authorization")
                                    .and_then(|v| v.to_str().ok())
                                    .and_then(|v| v.strip_prefix("Bearer sa:"))
                                    .map(str::to_owned);
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let rsp: Response<Full<bytes::Bytes>> = match sa {
                                    None => Response::builder()
                                        .status(StatusCode::UNAUTHORIZED)
                                        .body(Full::from("bad token"))
                                        .unwrap(),
                                    Some(sa) => {
                                        let csr: CertifyRequest =
                                            serde_json::from_slice(&body).unwrap();
                                        let id = SpiffeId::new("cluster.local", "default", &sa);
                                        let issued =
                                            ca.certify_request(&csr.csr, &id, lifetime).unwrap();
                                        counter.fetch_add(1, Ordering::SeqCst);
                                        let answer = CertifyResponse {
                                            identity: id.to_string(),
                                            certificate_chain: issued.chain_pem,
                                            not_after_unix: issued
                                                .not_after
                                                .duration_since(SystemTime::UNIX_EPOCH)
                                                .unwrap()
                                                .as_secs(),
                                        };
                                        Response::new(Full::from(
                                            serde_json::to_vec(&answer).unwrap(),
                                        ))
                                    }
                                };
                                Ok::<_, std::convert::Infallible>(rsp)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, issued, task }
    }

    fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

/// The policy part that turns the mesh identity on.
fn identity(ca: &Issuer, issuer: &IdentityService) -> serde_json::Value {
    serde_json::json!({
        "trustDomain": "cluster.local",
        "trustBundle": ca.cert_pem(),
        "issuerAddress": format!("localhost:{}", issuer.addr.port()),
    })
}

/// A meshed sidecar for `svc` in namespace `default` (its app `app`),
/// whose token says it is ServiceAccount `svc`, with `extra` merged into
/// its policy; `user` is found at `user` and is a meshed workload.
async fn meshed(
    svc: &str,
    app: &Upstream,
    ca: &Issuer,
    issuer: &IdentityService,
    extra: serde_json::Value,
    user: Option<SocketAddr>,
) -> (Running, std::path::PathBuf) {
    let mut p = serde_json::json!({"identity": identity(ca, issuer)});
    if let (Some(p), serde_json::Value::Object(extra)) = (p.as_object_mut(), extra) {
        p.extend(extra);
    }
    let text = policy(svc, app.addr.port(), p);
    let token = temp_path("token");
    std::fs::write(&token, format!("sa:{svc}\n")).unwrap();
    let user: Vec<SocketAddr> = user.into_iter().collect();
    let (sc, path) = sidecar_with_config(&text, &[("user", &user)], |cfg| {
        cfg.identity_token_file = token;
        cfg.service_account = Some(svc.to_owned());
    })
    .await;
    if let Some(r) = sc.static_endpoints() {
        r.set_identity("user", Some("user"));
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            sc.health.readiness().is_ok()
        })
        .await,
        "{svc} never became ready: {:?}",
        sc.health.readiness()
    );
    (sc, path)
}

async fn status(sc: &Running) -> serde_json::Value {
    get(sc.admin, "/status").await.json()
}

struct Shop {
    ca: Arc<Issuer>,
    issuer: IdentityService,
    user_app: Upstream,
    order_app: Upstream,
    user: Running,
    user_policy: std::path::PathBuf,
    order: Running,
}

/// `order` calling `user`, both meshed; `user`'s inbound gets `inbound`.
async fn shop(inbound: serde_json::Value, lifetime: Duration) -> Shop {
    let ca = Arc::new(Issuer::new_root("cluster.local", Duration::from_secs(3600)).unwrap());
    let issuer = IdentityService::start(ca.clone(), lifetime).await;
    let user_app = upstream("user").await;
    let order_app = upstream("order").await;
    let (user, user_policy) = meshed(
        "user",
        &user_app,
        &ca,
        &issuer,
        serde_json::json!({"inbound": inbound}),
        None,
    )
    .await;
    let (order, _) = meshed(
        "order",
        &order_app,
        &ca,
        &issuer,
        serde_json::json!({}),
        Some(user.inbound),
    )
    .await;
    Shop {
        ca,
        issuer,
        user_app,
        order_app,
        user,
        user_policy,
        order,
    }
}

#[tokio::test]
async fn meshed_calls_ride_mutual_tls_and_the_server_learns_the_callers_identity() {
    let s = shop(serde_json::json!({}), Duration::from_secs(3600)).await;
    // HTTP/1.1 and HTTP/2 (ALPN) both cross the mesh hop.
    let a = get_via(s.order.outbound, "http://user/api/v1/users/1").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["server"], "user");
    let mut h2 = h2_connect(s.order.outbound).await;
    let req = Request::get("http://user/api/v1/users/2")
        .body(full(""))
        .unwrap();
    let a = h2_send(&mut h2, req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(s.user_app.hits(), 2);

    // The user sidecar saw order's identity, from its certificate.
    let st = status(&s.user).await;
    let peers = &st["mesh"]["peersSeen"];
    assert!(
        peers["spiffe://cluster.local/ns/default/sa/order"].as_u64() >= Some(1),
        "{st:#}"
    );
    assert_eq!(
        st["mesh"]["identity"],
        "spiffe://cluster.local/ns/default/sa/user"
    );
    assert!(st["mesh"]["expiresInSeconds"].as_u64().unwrap() > 3500);

    // A plaintext caller straight at user's inbound: Strict is the default.
    let a = get(s.user.inbound, "/api/v1/users/1").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.text().contains("mutual TLS only"), "{}", a.text());
    assert_eq!(s.user_app.hits(), 2, "a plaintext call reached the app");
    let m = metrics(&s.user).await;
    assert_eq!(
        metric(
            &m,
            "trellis_inbound_authorization_refused_total{service=\"user\",verdict=\"plaintext_refused\"}"
        ),
        1.0
    );
    let _ = (&s.ca, &s.order_app);
}

#[tokio::test]
async fn permissive_serves_plaintext_callers_too() {
    let s = shop(
        serde_json::json!({"mtls": "Permissive"}),
        Duration::from_secs(3600),
    )
    .await;
    let a = get(s.user.inbound, "/api/v1/users/1").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let a = get_via(s.order.outbound, "http://user/api/v1/users/1").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
}

#[tokio::test]
async fn a_server_that_is_not_the_expected_workload_is_refused() {
    let s = shop(serde_json::json!({}), Duration::from_secs(3600)).await;
    // Discovery now says user's pods run as `admin`: the pod at that
    // address proves it is `user`, so the caller's sidecar refuses it.
    s.order
        .static_endpoints()
        .unwrap()
        .set_identity("user", Some("admin"));
    let a = get_via(s.order.outbound, "http://user/api/v1/users/1").await;
    assert!(a.status.is_server_error(), "{} {}", a.status, a.text());
    assert_eq!(s.user_app.hits(), 0);
}

#[tokio::test]
async fn authorization_enforces_audits_and_changes_live() {
    let only_product = serde_json::json!({"authorization": {
        "mode": "Enforce",
        "allow": [{"microService": "product"}],
    }});
    let s = shop(only_product, Duration::from_secs(3600)).await;
    let a = get_via(s.order.outbound, "http://user/api/v1/users/1").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    assert!(
        a.text()
            .contains("spiffe://cluster.local/ns/default/sa/order may not call user"),
        "{}",
        a.text()
    );
    assert_eq!(s.user_app.hits(), 0);

    // Audit: served, and counted as what would have been refused.
    let audit = policy(
        "user",
        s.user_app.addr.port(),
        serde_json::json!({
            "identity": identity(&s.ca, &s.issuer),
            "inbound": {"authorization": {"mode": "Audit", "allow": [{"microService": "product"}]}},
        }),
    );
    std::fs::write(&s.user_policy, audit).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            get_via(s.order.outbound, "http://user/api/v1/users/1")
                .await
                .status
                == StatusCode::OK
        })
        .await
    );
    let m = metrics(&s.user).await;
    assert!(
        metric(
            &m,
            "trellis_inbound_authorization_refused_total{service=\"user\",verdict=\"audit_denied\"}"
        ) >= 1.0,
        "{m}"
    );

    // Enforce again, allowing order's GETs under /api/v1/users only.
    let narrowed = policy(
        "user",
        s.user_app.addr.port(),
        serde_json::json!({
            "identity": identity(&s.ca, &s.issuer),
            "inbound": {"authorization": {"allow": [
                {"microService": "order", "methods": ["GET"], "pathPrefix": "/api/v1/users"},
            ]}},
        }),
    );
    std::fs::write(&s.user_policy, narrowed).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            get_via(s.order.outbound, "http://user/api/v1/orders")
                .await
                .status
                == StatusCode::FORBIDDEN
        })
        .await
    );
    let a = get_via(s.order.outbound, "http://user/api/v1/users/7").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let req = Request::post("http://user/api/v1/users")
        .header("host", "user")
        .body(full("{}"))
        .unwrap();
    let a = h1(s.order.outbound, req).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
}

#[tokio::test]
async fn certificates_renew_before_expiry_and_an_expired_one_makes_the_sidecar_unready() {
    // Three-second certificates: renewed at 70 %, about every two seconds.
    let s = shop(serde_json::json!({}), Duration::from_secs(3)).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
    let mut calls = 0;
    while tokio::time::Instant::now() < deadline {
        let a = get_via(s.order.outbound, "http://user/api/v1/users/1").await;
        if a.status != StatusCode::OK {
            failures.fetch_add(1, Ordering::SeqCst);
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "of {calls} calls");
    // Both sidecars renewed several times.
    assert!(s.issuer.issued() >= 6, "issued {}", s.issuer.issued());
    for sc in [&s.user, &s.order] {
        assert!(status(sc).await["mesh"]["updates"].as_u64().unwrap() >= 3);
    }

    // The identity service goes away: traffic goes on while the
    // certificates last, then the sidecars turn unready, saying why.
    s.issuer.task.abort();
    assert!(
        eventually(Duration::from_secs(6), || async {
            s.user.health.readiness().is_err()
        })
        .await
    );
    let why = s.user.health.readiness().unwrap_err();
    assert!(why.contains("expired"), "{why}");
    let r = get(s.user.admin, "/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let m = metrics(&s.user).await;
    assert_eq!(
        metric(&m, "trellis_identity_certificate_expiry_seconds"),
        0.0
    );
    assert!(
        metric(
            &m,
            "trellis_identity_certificate_requests_total{result=\"failed\"}"
        ) >= 1.0
    );
}
