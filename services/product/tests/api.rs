//! The product service end to end on loopback: every route, bad inputs,
//! concurrent reservations, `/health` and the OpenAPI document, against
//! SQLite and (when installed) a real PostgreSQL.

use std::net::SocketAddr;

use reqwest::StatusCode;
use serde_json::json;
use trellis_service_kit::testing::{self, Api, Postgres, assert_error as bad, fuzz};

const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/products"),
    ("POST", "/api/v1/products"),
    ("GET", "/api/v1/products/{id}"),
    ("PUT", "/api/v1/products/{id}"),
    ("DELETE", "/api/v1/products/{id}"),
    ("POST", "/api/v1/products/{id}/reserve"),
    ("POST", "/api/v1/products/{id}/release"),
    ("GET", "/health"),
];

async fn start(url: &str) -> SocketAddr {
    let pool =
        trellis_service_kit::db::connect(url, &product_service::SQLITE, &product_service::POSTGRES)
            .await
            .unwrap();
    testing::spawn(product_service::app(pool)).await
}

async fn create(api: &Api, name: &str, category: &str, price: i64, stock: i64) -> i64 {
    let (s, p) = api
        .post(
            "/api/v1/products",
            &json!({"name": name, "category": category, "price_cents": price, "stock": stock,
                "description": format!("a {name}")})
            .to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    assert_eq!(p["stock"], stock);
    p["id"].as_i64().unwrap()
}

fn names(page: &serde_json::Value) -> Vec<String> {
    page["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

async fn scenario(url: &str) {
    let api = Api::new(start(url).await);

    let mug = create(&api, "Mug", "kitchen", 1200, 5).await;
    let pan = create(&api, "Pan", "kitchen", 4500, 0).await;
    let pen = create(&api, "Pen", "office", 150, 100).await;

    // Get.
    let (s, p) = api.get(&format!("/api/v1/products/{mug}")).await;
    assert_eq!((s, &p["name"]), (StatusCode::OK, &json!("Mug")));

    // List with filters.
    let (_, all) = api.get("/api/v1/products").await;
    assert_eq!((all["total"].as_i64(), names(&all).len()), (Some(3), 3));
    let (_, kitchen) = api.get("/api/v1/products?category=kitchen").await;
    assert_eq!(names(&kitchen), ["Mug", "Pan"]);
    let (_, mid) = api
        .get("/api/v1/products?min_price=1000&max_price=5000")
        .await;
    assert_eq!(names(&mid), ["Mug", "Pan"]);
    let (_, cheap) = api.get("/api/v1/products?max_price=1200").await;
    assert_eq!(names(&cheap), ["Mug", "Pen"]);
    let (_, avail) = api
        .get("/api/v1/products?category=kitchen&in_stock=true")
        .await;
    assert_eq!(names(&avail), ["Mug"]);
    let (_, out) = api.get("/api/v1/products?in_stock=false").await;
    assert_eq!(names(&out), ["Pan"]);
    let (_, paged) = api.get("/api/v1/products?page=2&limit=2").await;
    assert_eq!(
        (names(&paged), &paged["total"]),
        (vec!["Pen".to_owned()], &json!(3))
    );

    // Update, restock.
    let (s, p) = api
        .put(
            &format!("/api/v1/products/{pan}"),
            r#"{"price_cents":3999,"stock":7}"#,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(
        (&p["price_cents"], &p["stock"], &p["name"]),
        (&json!(3999), &json!(7), &json!("Pan"))
    );
    let (_, p) = api
        .put(&format!("/api/v1/products/{pan}"), r#"{"name":"Big pan"}"#)
        .await;
    assert_eq!(
        (&p["stock"], &p["name"]),
        (&json!(7), &json!("Big pan")),
        "stock kept"
    );

    // Reserve and release.
    let (s, p) = api
        .post(
            &format!("/api/v1/products/{mug}/reserve"),
            r#"{"quantity":3}"#,
        )
        .await;
    assert_eq!((s, &p["stock"]), (StatusCode::OK, &json!(2)), "{p}");
    bad(
        api.post(
            &format!("/api/v1/products/{mug}/reserve"),
            r#"{"quantity":3}"#,
        )
        .await,
        409,
        "quantity",
    );
    let (_, p) = api.get(&format!("/api/v1/products/{mug}")).await;
    assert_eq!(p["stock"], 2, "a refused reservation takes nothing");
    let (s, p) = api
        .post(
            &format!("/api/v1/products/{mug}/release"),
            r#"{"quantity":3}"#,
        )
        .await;
    assert_eq!((s, &p["stock"]), (StatusCode::OK, &json!(5)));

    // Bad inputs.
    bad(
        api.post("/api/v1/products", r#"{"name":"X","#).await,
        400,
        "body",
    );
    bad(
        api.post(
            "/api/v1/products",
            r#"{"name":"X","category":"c","price_cents":1}"#,
        )
        .await,
        422,
        "stock",
    );
    bad(
        api.post(
            "/api/v1/products",
            r#"{"name":" ","category":"c","price_cents":1,"stock":1}"#,
        )
        .await,
        422,
        "name",
    );
    bad(
        api.post(
            "/api/v1/products",
            r#"{"name":"X","category":"c","price_cents":-1,"stock":1}"#,
        )
        .await,
        422,
        "price_cents",
    );
    bad(
        api.post(
            "/api/v1/products",
            r#"{"name":"X","category":"c","price_cents":1,"stock":-5}"#,
        )
        .await,
        422,
        "stock",
    );
    bad(
        api.post(
            "/api/v1/products",
            r#"{"name":"X","category":"","price_cents":1,"stock":1}"#,
        )
        .await,
        422,
        "category",
    );
    bad(
        api.post(
            "/api/v1/products",
            r#"{"name":"X","category":"c","price_cents":"9.99","stock":1}"#,
        )
        .await,
        422,
        "price_cents",
    );
    bad(
        api.post(
            "/api/v1/products",
            r#"{"name":"Mug","category":"c","price_cents":1,"stock":1}"#,
        )
        .await,
        409,
        "name",
    );
    bad(api.get("/api/v1/products/0").await, 400, "id");
    bad(api.get("/api/v1/products/77777").await, 404, "id");
    // A price range whose top is below its bottom matches nothing.
    let (s, empty) = api
        .get("/api/v1/products?min_price=500&max_price=100")
        .await;
    assert_eq!((s, &empty["total"]), (StatusCode::OK, &json!(0)), "{empty}");
    bad(
        api.get("/api/v1/products?in_stock=maybe").await,
        400,
        "in_stock",
    );
    bad(
        api.get("/api/v1/products?min_price=cheap").await,
        400,
        "min_price",
    );
    bad(api.get("/api/v1/products?limit=0").await, 400, "limit");
    bad(
        api.put(&format!("/api/v1/products/{pen}"), r#"{"stock":-1}"#)
            .await,
        422,
        "stock",
    );
    bad(
        api.put("/api/v1/products/77777", r#"{"stock":1}"#).await,
        404,
        "id",
    );
    bad(
        api.post(
            &format!("/api/v1/products/{mug}/reserve"),
            r#"{"quantity":0}"#,
        )
        .await,
        422,
        "quantity",
    );
    bad(
        api.post(&format!("/api/v1/products/{mug}/reserve"), r#"{}"#)
            .await,
        422,
        "quantity",
    );
    bad(
        api.post(
            &format!("/api/v1/products/{mug}/release"),
            r#"{"quantity":-2}"#,
        )
        .await,
        422,
        "quantity",
    );
    bad(
        api.post("/api/v1/products/77777/reserve", r#"{"quantity":1}"#)
            .await,
        404,
        "id",
    );
    bad(
        api.post("/api/v1/products/77777/release", r#"{"quantity":1}"#)
            .await,
        404,
        "id",
    );

    // Delete.
    let (s, _) = api.delete(&format!("/api/v1/products/{pen}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    bad(api.get(&format!("/api/v1/products/{pen}")).await, 404, "id");
    bad(
        api.delete(&format!("/api/v1/products/{pen}")).await,
        404,
        "id",
    );

    let (s, h) = api.get("/health").await;
    assert_eq!((s, &h["database"]), (StatusCode::OK, &json!("ok")));

    let doc = api.check_openapi_routes(ROUTES).await;
    assert_eq!(
        doc,
        serde_json::to_value(product_service::openapi()).unwrap()
    );

    concurrent_reservations(&api).await;
}

/// 100 concurrent reservations of the last 10 units: exactly 10 succeed,
/// the other 90 are refused with 409, and the stock ends at zero.
async fn concurrent_reservations(api: &Api) {
    let id = create(api, "Last ten", "rare", 100, 10).await;
    let path = format!("/api/v1/products/{id}/reserve");
    let answers =
        futures::future::join_all((0..100).map(|_| api.post(&path, r#"{"quantity":1}"#))).await;
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let refused = answers
        .iter()
        .filter(|(s, b)| *s == StatusCode::CONFLICT && b["code"] == "insufficient_stock")
        .count();
    assert_eq!(
        (ok, refused),
        (10, 90),
        "{:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    let (_, p) = api.get(&format!("/api/v1/products/{id}")).await;
    assert_eq!(p["stock"], 0);
    // And the stock each success saw is distinct: 9, 8, ..., 0.
    let mut seen: Vec<i64> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .map(|(_, b)| b["stock"].as_i64().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn sqlite() {
    scenario(&testing::sqlite_url()).await;
}

#[tokio::test]
async fn postgres() {
    let pg = Postgres::start();
    scenario(&pg.url()).await;
}

/// Requests valid by the served OpenAPI document, generated from it: none
/// gets an answer the document does not allow (a 5xx, an undocumented
/// status, or a 400/422 for a reason it does not state).
async fn fuzz(url: &str) {
    let api = Api::new(start(url).await);
    create(&api, "Mug", "kitchen", 1200, 5).await;
    create(&api, "Pen", "office", 150, 100).await;
    let report = fuzz::assert_clean(&api, 0x09e0_d0c7, 40).await;
    assert!(report.sent >= 300, "{report:?}");
}

#[tokio::test]
async fn fuzz_sqlite() {
    fuzz(&testing::sqlite_url()).await;
}

#[tokio::test]
async fn fuzz_postgres() {
    let pg = Postgres::start();
    fuzz(&pg.url()).await;
}
