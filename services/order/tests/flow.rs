//! The order flow through real sidecars in static mode on loopback:
//!
//! order app → sidecar O (outbound) → sidecar U (inbound) → user app (gRPC, h2c)
//!                                  → sidecar P (inbound) → product app (REST)
//!
//! Every order route, bad inputs, releases on failure and cancel, dependency
//! failures (unreachable, breaker open) as 503 naming the dependency, and the
//! OpenAPI document; the order database is SQLite and (when installed) PostgreSQL.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use order_service::{AppState, Deps};
use reqwest::StatusCode;
use serde_json::{Value, json};
use trellis_service_kit::testing::{self, Api, Postgres, assert_error as bad, fuzz};
use trellis_sidecar::{Config, Discovery, Running};

const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/orders"),
    ("POST", "/api/v1/orders"),
    ("GET", "/api/v1/orders/{id}"),
    ("POST", "/api/v1/orders/{id}/cancel"),
    ("GET", "/health"),
];

/// A sidecar in static mode with `policy`, resolving each name to its addresses.
async fn sidecar(policy: Value, endpoints: &[(&str, SocketAddr)]) -> Running {
    let path = testing::temp_dir("sidecar").join("policy.json");
    std::fs::write(&path, policy.to_string()).unwrap();
    let mut cfg = Config::local(Some(path));
    cfg.discovery = Discovery::Static {
        endpoints: endpoints
            .iter()
            .map(|(n, a)| ((*n).to_owned(), vec![*a]))
            .collect(),
        file: None,
    };
    trellis_sidecar::start(cfg).await.unwrap()
}

fn policy(service: &str, app: SocketAddr) -> Value {
    json!({"service": service, "namespace": "default", "appPort": app.port()})
}

struct Shop {
    order: Api,
    user: Api,
    product: Api,
    _sidecars: Vec<Running>,
}

async fn user_app() -> SocketAddr {
    let url = testing::sqlite_url();
    let pool =
        trellis_service_kit::db::connect(&url, &user_service::SQLITE, &user_service::POSTGRES)
            .await
            .unwrap();
    testing::spawn(user_service::app(pool)).await
}

async fn product_app() -> SocketAddr {
    let url = testing::sqlite_url();
    let pool = trellis_service_kit::db::connect(
        &url,
        &product_service::SQLITE,
        &product_service::POSTGRES,
    )
    .await
    .unwrap();
    testing::spawn(product_service::app(pool)).await
}

/// The order app behind sidecar O, whose discovery maps `user` and `product`.
async fn order_app(
    order_db: &str,
    order_policy: Value,
    user: SocketAddr,
    product: SocketAddr,
) -> (Api, Running) {
    let o = sidecar(order_policy, &[("user", user), ("product", product)]).await;
    let pool = trellis_service_kit::db::connect(
        order_db,
        &order_service::SQLITE,
        &order_service::POSTGRES,
    )
    .await
    .unwrap();
    let deps = Deps::new(o.outbound, "user", "product").unwrap();
    let addr = testing::spawn(order_service::app(AppState { pool, deps })).await;
    (Api::new(addr), o)
}

async fn shop(order_db: &str) -> Shop {
    let (user, product) = (user_app().await, product_app().await);
    let u = sidecar(policy("user", user), &[]).await;
    let p = sidecar(policy("product", product), &[]).await;
    let (order, o) = order_app(
        order_db,
        policy("order", ([127, 0, 0, 1], 1).into()),
        u.inbound,
        p.inbound,
    )
    .await;
    Shop {
        order,
        user: Api::new(user),
        product: Api::new(product),
        _sidecars: vec![u, p, o],
    }
}

async fn new_user(api: &Api, name: &str) -> i64 {
    let (s, u) = api
        .post(
            "/api/v1/users",
            &json!({"name": name, "email": format!("{name}@shop.test"), "age": 33}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    u["id"].as_i64().unwrap()
}

async fn new_product(api: &Api, name: &str, price: i64, stock: i64) -> i64 {
    let (s, p) = api
        .post(
            "/api/v1/products",
            &json!({"name": name, "category": "c", "price_cents": price, "stock": stock})
                .to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    p["id"].as_i64().unwrap()
}

async fn stock(api: &Api, id: i64) -> i64 {
    api.get(&format!("/api/v1/products/{id}")).await.1["stock"]
        .as_i64()
        .unwrap()
}

async fn scenario(order_db: &str) {
    let shop = shop(order_db).await;
    let (o, started) = (&shop.order, Instant::now());
    let alice = new_user(&shop.user, "alice").await;
    let bob = new_user(&shop.user, "bob").await;
    let mug = new_product(&shop.product, "Mug", 1200, 5).await;
    let pen = new_product(&shop.product, "Pen", 150, 100).await;

    // Create: the user validated over gRPC, stock reserved over REST, both via the sidecars.
    let (s, order) = o
        .post(
            "/api/v1/orders",
            &json!({"user_id": alice, "items": [{"product_id": mug, "quantity": 2}, {"product_id": pen, "quantity": 3}]})
                .to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{order}");
    assert_eq!(order["status"], "created");
    assert_eq!(order["total_cents"], 2 * 1200 + 3 * 150);
    assert_eq!(order["items"][0]["unit_price_cents"], 1200);
    let id = order["id"].as_i64().unwrap();
    assert_eq!(
        (
            stock(&shop.product, mug).await,
            stock(&shop.product, pen).await
        ),
        (3, 97)
    );

    // Get, list by user.
    let (s, got) = o.get(&format!("/api/v1/orders/{id}")).await;
    assert_eq!((s, &got), (StatusCode::OK, &order));
    let (_, mine) = o.get(&format!("/api/v1/orders?user_id={alice}")).await;
    assert_eq!(
        (mine["total"].as_i64(), mine["orders"][0]["id"].as_i64()),
        (Some(1), Some(id))
    );
    let (_, theirs) = o
        .get(&format!("/api/v1/orders?user_id={bob}&page=1&limit=5"))
        .await;
    assert_eq!(theirs["total"], 0);

    // Signed in at the gateway (x-user-id from the token's `sub`): orders
    // for oneself only; a mismatched or unreadable user is 403 before any
    // stock is reserved.
    let signed_in = |user: &str, for_user: i64| {
        shop.order
            .http
            .post(format!("{}/api/v1/orders", shop.order.base))
            .header("x-user-id", user)
            .json(&json!({"user_id": for_user, "items": [{"product_id": pen, "quantity": 1}]}))
            .send()
    };
    for (user, for_user) in [(bob.to_string(), alice), ("bob".to_owned(), bob)] {
        let rsp = signed_in(&user, for_user).await.unwrap();
        let (s, body) = (rsp.status(), rsp.json::<Value>().await.unwrap());
        bad((s, body.clone()), 403, "user_id");
        assert_eq!(body["code"], "forbidden", "{body}");
    }
    assert_eq!(
        stock(&shop.product, pen).await,
        97,
        "refused before reserving"
    );
    let rsp = signed_in(&bob.to_string(), bob).await.unwrap();
    assert_eq!(rsp.status(), StatusCode::CREATED);
    let own: Value = rsp.json().await.unwrap();
    let (s, _) = o
        .post(&format!("/api/v1/orders/{}/cancel", own["id"]), "")
        .await;
    assert_eq!(s, StatusCode::OK);

    // Not enough stock for the second line: the first line's reservation is released.
    bad(
        o.post(
            "/api/v1/orders",
            &json!({"user_id": alice, "items": [{"product_id": pen, "quantity": 1}, {"product_id": mug, "quantity": 4}]})
                .to_string(),
        )
        .await,
        409,
        "items[1].quantity",
    );
    // An unknown product: the same.
    bad(
        o.post(
            "/api/v1/orders",
            &json!({"user_id": alice, "items": [{"product_id": pen, "quantity": 1}, {"product_id": 9999, "quantity": 1}]})
                .to_string(),
        )
        .await,
        422,
        "items[1].product_id",
    );
    assert_eq!(
        (
            stock(&shop.product, mug).await,
            stock(&shop.product, pen).await
        ),
        (3, 97),
        "released"
    );

    // Unknown and inactive users.
    bad(
        o.post(
            "/api/v1/orders",
            &json!({"user_id": 4242, "items": [{"product_id": pen, "quantity": 1}]}).to_string(),
        )
        .await,
        422,
        "user_id",
    );
    let (s, _) = shop
        .user
        .put(&format!("/api/v1/users/{bob}"), r#"{"active":false}"#)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, e) = o
        .post(
            "/api/v1/orders",
            &json!({"user_id": bob, "items": [{"product_id": pen, "quantity": 1}]}).to_string(),
        )
        .await;
    assert_eq!(
        (&e["code"], &e["message"]),
        (&json!("invalid_user"), &json!("user is inactive"))
    );

    // Bad inputs.
    bad(
        o.post("/api/v1/orders", r#"{"user_id": 1, "items": ["#)
            .await,
        400,
        "body",
    );
    bad(
        o.post("/api/v1/orders", r#"{"user_id": 1}"#).await,
        422,
        "items",
    );
    bad(
        o.post(
            "/api/v1/orders",
            r#"{"user_id": 0, "items": [{"product_id": 1, "quantity": 1}]}"#,
        )
        .await,
        422,
        "user_id",
    );
    bad(
        o.post("/api/v1/orders", r#"{"user_id": 1, "items": []}"#)
            .await,
        422,
        "items",
    );
    bad(
        o.post(
            "/api/v1/orders",
            r#"{"user_id": 1, "items": [{"product_id": 1, "quantity": 0}]}"#,
        )
        .await,
        422,
        "items[0].quantity",
    );
    bad(
        o.post(
            "/api/v1/orders",
            r#"{"user_id": 1, "items": [{"product_id": 1, "quantity": "two"}]}"#,
        )
        .await,
        422,
        "items[0].quantity",
    );
    bad(
        o.post("/api/v1/orders", r#"{"user_id": 1, "items": [{"product_id": 1, "quantity": 1}, {"product_id": 1, "quantity": 2}]}"#)
            .await,
        422,
        "items[1].product_id",
    );
    bad(o.get("/api/v1/orders/abc").await, 400, "id");
    bad(o.get("/api/v1/orders/9999").await, 404, "id");
    bad(o.get("/api/v1/orders").await, 400, "user_id");
    bad(o.get("/api/v1/orders?user_id=x").await, 400, "user_id");
    bad(
        o.get(&format!("/api/v1/orders?user_id={alice}&page=0"))
            .await,
        400,
        "page",
    );
    bad(o.post("/api/v1/orders/9999/cancel", "").await, 404, "id");

    // Cancel releases the stock; a second cancel is a conflict.
    let (s, c) = o.post(&format!("/api/v1/orders/{id}/cancel"), "").await;
    assert_eq!(
        (s, &c["status"]),
        (StatusCode::OK, &json!("cancelled")),
        "{c}"
    );
    assert_eq!(
        (
            stock(&shop.product, mug).await,
            stock(&shop.product, pen).await
        ),
        (5, 100)
    );
    bad(
        o.post(&format!("/api/v1/orders/{id}/cancel"), "").await,
        409,
        "status",
    );
    assert_eq!(stock(&shop.product, mug).await, 5, "released once");

    let (s, h) = o.get("/health").await;
    assert_eq!((s, &h["database"]), (StatusCode::OK, &json!("ok")));
    let doc = o.check_openapi_routes(ROUTES).await;
    assert_eq!(doc, serde_json::to_value(order_service::openapi()).unwrap());

    // The order cannot be stored: its reservations are released.
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(order_db).await.unwrap();
    sqlx::query("DROP TABLE orders")
        .execute(&admin)
        .await
        .unwrap();
    let (s, e) = o
        .post(
            "/api/v1/orders",
            &json!({"user_id": alice, "items": [{"product_id": mug, "quantity": 2}]}).to_string(),
        )
        .await;
    assert!(s.is_server_error(), "{s} {e}");
    assert_eq!(
        stock(&shop.product, mug).await,
        5,
        "released after the failed insert"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_flow_sqlite() {
    scenario(&testing::sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_flow_postgres() {
    let pg = Postgres::start();
    scenario(&pg.url()).await;
}

/// Cancelling an order one of whose products was deleted since: the product
/// service answers the release with 404, which is no dependency failure, so
/// the cancel succeeds and the other items' stock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_succeeds_when_a_product_is_gone() {
    let shop = shop(&testing::sqlite_url()).await;
    let alice = new_user(&shop.user, "alice").await;
    let mug = new_product(&shop.product, "Mug", 1200, 5).await;
    let pen = new_product(&shop.product, "Pen", 150, 10).await;
    let (s, order) = shop
        .order
        .post(
            "/api/v1/orders",
            &json!({"user_id": alice, "items": [{"product_id": mug, "quantity": 2}, {"product_id": pen, "quantity": 3}]})
                .to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{order}");
    let (s, _) = shop
        .product
        .delete(&format!("/api/v1/products/{mug}"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, c) = shop
        .order
        .post(&format!("/api/v1/orders/{}/cancel", order["id"]), "")
        .await;
    assert_eq!(
        (s, &c["status"]),
        (StatusCode::OK, &json!("cancelled")),
        "{c}"
    );
    assert_eq!(stock(&shop.product, pen).await, 10, "the pens are back");
}

/// Requests valid by the served OpenAPI document, generated from it: none
/// gets an answer the document does not allow. The shop has users,
/// products and orders with small ids, one order's product deleted, so the
/// generated ids name them often.
async fn fuzz(order_db: &str) {
    let shop = shop(order_db).await;
    let alice = new_user(&shop.user, "alice").await;
    new_user(&shop.user, "bob").await;
    let mug = new_product(&shop.product, "Mug", 1200, 1000).await;
    let pen = new_product(&shop.product, "Pen", 150, 1000).await;
    let cup = new_product(&shop.product, "Cup", 300, 1000).await;
    for items in [
        json!([{"product_id": mug, "quantity": 1}, {"product_id": pen, "quantity": 2}]),
        json!([{"product_id": cup, "quantity": 1}]),
        json!([{"product_id": pen, "quantity": 1}, {"product_id": cup, "quantity": 1}]),
    ] {
        let (s, o) = shop
            .order
            .post(
                "/api/v1/orders",
                &json!({"user_id": alice, "items": items}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{o}");
    }
    let (s, _) = shop
        .product
        .delete(&format!("/api/v1/products/{cup}"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let report = fuzz::assert_clean(&shop.order, 0x0bde_5eed, 50).await;
    assert!(report.sent >= 250, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_sqlite() {
    fuzz(&testing::sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_postgres() {
    let pg = Postgres::start();
    fuzz(&pg.url()).await;
}

/// A loopback address nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Unreachable dependencies, then an open breaker: each a prompt 503 that
/// names the dependency, and nothing is reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_failures_are_503s_naming_the_dependency() {
    let fragile = json!({
        "service": "order", "namespace": "default", "appPort": 1,
        "resilience": {"retry": {"attempts": 1}, "circuitBreaker": {"consecutiveFailures": 1, "openFor": "60s"}},
    });
    let order_body = |user: i64, product: i64| {
        json!({"user_id": user, "items": [{"product_id": product, "quantity": 1}]}).to_string()
    };

    // The user service is down.
    let product = product_app().await;
    let p = sidecar(policy("product", product), &[]).await;
    let (o, _o) = order_app(
        &testing::sqlite_url(),
        fragile.clone(),
        dead_addr(),
        p.inbound,
    )
    .await;
    let t = Instant::now();
    let (s, e) = o.post("/api/v1/orders", &order_body(1, 1)).await;
    assert_eq!(
        (s.as_u16(), &e["code"], &e["dependency"]),
        (503, &json!("dependency_unavailable"), &json!("user")),
        "{e}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "no hang: {:?}",
        t.elapsed()
    );

    // The product service is down: the first calls fail to connect, then
    // O's breaker opens and answers for it; each is a 503 naming product.
    let user = user_app().await;
    let u = sidecar(policy("user", user), &[]).await;
    let alice = new_user(&Api::new(user), "alice").await;
    let (o, _o) = order_app(&testing::sqlite_url(), fragile, u.inbound, dead_addr()).await;
    let mut messages = Vec::new();
    for _ in 0..4 {
        let t = Instant::now();
        let (s, e) = o.post("/api/v1/orders", &order_body(alice, 1)).await;
        assert_eq!(
            (s.as_u16(), &e["dependency"]),
            (503, &json!("product")),
            "{e}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no hang: {:?}",
            t.elapsed()
        );
        messages.push(e["message"].as_str().unwrap().to_owned());
    }
    assert!(
        messages.last().unwrap().contains("circuit breaker open"),
        "the breaker opened: {messages:?}"
    );
    let (_, orders) = o.get(&format!("/api/v1/orders?user_id={alice}")).await;
    assert_eq!(orders["total"], 0);
}

/// The W3C headers of the request the order service serves reach the
/// product service on the reservation it makes (the trace id kept; the
/// sidecars may start new spans under it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_headers_reach_the_dependencies() {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
    let record = seen.clone();
    // A stand-in product service that records each request's headers.
    let fake_product = axum::Router::new().route(
        "/api/v1/products/{id}/{action}",
        axum::routing::post(move |headers: http::HeaderMap| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(headers);
                axum::Json(json!({"price_cents": 100, "stock": 1}))
            }
        }),
    );
    let product = testing::spawn(fake_product).await;
    let user = user_app().await;
    let alice = new_user(&Api::new(user), "alice").await;
    let u = sidecar(policy("user", user), &[]).await;
    let p = sidecar(policy("product", product), &[]).await;
    let (o, _o) = order_app(
        &testing::sqlite_url(),
        policy("order", ([127, 0, 0, 1], 1).into()),
        u.inbound,
        p.inbound,
    )
    .await;

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let rsp = o
        .http
        .post(format!("{}/api/v1/orders", o.base))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .header("baggage", "tenant=acme")
        .header("x-request-id", "req-42")
        .json(&json!({"user_id": alice, "items": [{"product_id": 7, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        rsp.status(),
        StatusCode::CREATED,
        "{}",
        rsp.text().await.unwrap()
    );
    let seen = seen.lock().unwrap();
    let h = seen
        .last()
        .expect("the reservation reached the product service");
    let traceparent = h["traceparent"].to_str().unwrap();
    assert!(traceparent.contains(trace_id), "{traceparent}");
    assert_eq!(h["baggage"], "tenant=acme");
    assert_eq!(h["x-request-id"], "req-42");
}
