//! The user service end to end on loopback: every REST route, bad inputs,
//! the gRPC service on the same port, `/health` and the OpenAPI document,
//! against SQLite and (when installed) a real PostgreSQL.

use std::net::SocketAddr;

use reqwest::StatusCode;
use serde_json::json;
use trellis_service_kit::testing::{self, Api, Postgres, assert_error as bad, fuzz};
use user_service::pb::{self, user_service_client::UserServiceClient};

/// Every route of the service, as documented.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/users"),
    ("POST", "/api/v1/users"),
    ("GET", "/api/v1/users/{id}"),
    ("PUT", "/api/v1/users/{id}"),
    ("DELETE", "/api/v1/users/{id}"),
    ("GET", "/health"),
];

async fn start(url: &str) -> SocketAddr {
    let pool =
        trellis_service_kit::db::connect(url, &user_service::SQLITE, &user_service::POSTGRES)
            .await
            .unwrap();
    testing::spawn(user_service::app(pool)).await
}

async fn scenario(url: &str) {
    let addr = start(url).await;
    let api = Api::new(addr);

    // Create.
    let (s, alice) = api
        .post(
            "/api/v1/users",
            r#"{"name":"Alice","email":"Alice@Example.com","age":30}"#,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{alice}");
    assert_eq!(alice["email"], "alice@example.com");
    assert_eq!(alice["active"], true);
    let id = alice["id"].as_i64().unwrap();
    for (name, email) in [
        ("Bob", "bob@example.com"),
        ("Carol", "carol@shop.test"),
        ("Dave", "dave@example.com"),
    ] {
        let (s, _) = api
            .post(
                "/api/v1/users",
                &json!({"name": name, "email": email, "age": 40}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }

    // Get.
    let (s, got) = api.get(&format!("/api/v1/users/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["name"], "Alice");

    // List: paging and search.
    let (s, page) = api.get("/api/v1/users?page=1&limit=2").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page["total"], 4);
    assert_eq!(page["users"].as_array().unwrap().len(), 2);
    let (_, page2) = api.get("/api/v1/users?page=2&limit=3").await;
    assert_eq!(page2["users"].as_array().unwrap().len(), 1);
    assert_eq!(page2["users"][0]["name"], "Dave");
    let (_, found) = api.get("/api/v1/users?search=EXAMPLE.com").await;
    assert_eq!(found["total"], 3, "{found}");
    let (_, found) = api.get("/api/v1/users?search=car").await;
    assert_eq!(found["users"][0]["name"], "Carol");
    let (_, none) = api.get("/api/v1/users?search=%25").await;
    assert_eq!(none["total"], 0, "a % is a literal, not a wildcard: {none}");

    // Update.
    let (s, upd) = api
        .put(
            &format!("/api/v1/users/{id}"),
            r#"{"name":"Alice B","active":false}"#,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{upd}");
    assert_eq!(upd["name"], "Alice B");
    assert_eq!(upd["active"], false);
    assert_eq!(upd["email"], "alice@example.com", "unchanged");

    // Bad inputs.
    bad(
        api.post("/api/v1/users", r#"{"name":"X","email":"#).await,
        400,
        "body",
    );
    bad(
        api.post("/api/v1/users", r#"{"name":"X","age":3}"#).await,
        422,
        "email",
    );
    bad(
        api.post("/api/v1/users", r#"{"name":"X","email":"nope","age":3}"#)
            .await,
        422,
        "email",
    );
    bad(
        api.post("/api/v1/users", r#"{"name":"","email":"e@x.io","age":3}"#)
            .await,
        422,
        "name",
    );
    bad(
        api.post("/api/v1/users", r#"{"name":"X","email":"e@x.io","age":-1}"#)
            .await,
        422,
        "age",
    );
    bad(
        api.post(
            "/api/v1/users",
            r#"{"name":"X","email":"e@x.io","age":"old"}"#,
        )
        .await,
        422,
        "age",
    );
    bad(
        api.post(
            "/api/v1/users",
            r#"{"name":"X","email":"bob@example.com","age":3}"#,
        )
        .await,
        409,
        "email",
    );
    bad(api.get("/api/v1/users/999999").await, 404, "id");
    bad(api.get("/api/v1/users/abc").await, 400, "id");
    bad(api.get("/api/v1/users/-4").await, 400, "id");
    bad(api.get("/api/v1/users?page=0").await, 400, "page");
    bad(api.get("/api/v1/users?limit=1000").await, 400, "limit");
    bad(api.get("/api/v1/users?page=abc").await, 400, "page");
    bad(
        api.put("/api/v1/users/999999", r#"{"name":"Y"}"#).await,
        404,
        "id",
    );
    bad(
        api.put(
            &format!("/api/v1/users/{id}"),
            r#"{"email":"bob@example.com"}"#,
        )
        .await,
        409,
        "email",
    );
    bad(
        api.put(&format!("/api/v1/users/{id}"), r#"{"age":151}"#)
            .await,
        422,
        "age",
    );
    bad(
        api.put(&format!("/api/v1/users/{id}"), r#"{"nickname":"x"}"#)
            .await,
        422,
        "nickname",
    );

    // gRPC on the same port (h2c).
    let mut grpc = UserServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let created = grpc
        .create_user(pb::CreateUserRequest {
            name: "Erin".into(),
            email: "erin@example.com".into(),
            age: 25,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(created.name, "Erin");
    let got = grpc
        .get_user(pb::GetUserRequest {
            user_id: created.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.user.unwrap().email, "erin@example.com");
    let v = grpc
        .validate_user(pb::ValidateUserRequest {
            user_id: created.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{v:?}");
    let v = grpc
        .validate_user(pb::ValidateUserRequest { user_id: id as u64 })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid, "Alice was deactivated: {v:?}");
    let v = grpc
        .validate_user(pb::ValidateUserRequest { user_id: 424242 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v.valid, v.message.as_str()), (false, "user not found"));
    let list = grpc
        .list_users(pb::ListUsersRequest {
            page: 0,
            limit: 0,
            search: "example.com".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.total, 4);
    let e = grpc
        .get_user(pb::GetUserRequest { user_id: 424242 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = grpc
        .create_user(pb::CreateUserRequest {
            name: "X".into(),
            email: "not-an-email".into(),
            age: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("email:"), "{e:?}");
    let e = grpc
        .create_user(pb::CreateUserRequest {
            name: "X".into(),
            email: "erin@example.com".into(),
            age: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    let e = grpc
        .list_users(pb::ListUsersRequest {
            page: 1,
            limit: 500,
            search: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Delete.
    let (s, _) = api.delete(&format!("/api/v1/users/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    bad(api.get(&format!("/api/v1/users/{id}")).await, 404, "id");
    bad(api.delete(&format!("/api/v1/users/{id}")).await, 404, "id");

    // Health checks the database.
    let (s, h) = api.get("/health").await;
    assert_eq!((s, &h["database"]), (StatusCode::OK, &json!("ok")));

    // The served document is valid, documents every route, and every
    // documented operation is served.
    let doc = api.check_openapi_routes(ROUTES).await;
    assert_eq!(doc, serde_json::to_value(user_service::openapi()).unwrap());
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
    for (name, email) in [("Ann", "ann@shop.test"), ("Ben", "ben@shop.test")] {
        let (s, b) = api
            .post(
                "/api/v1/users",
                &json!({"name": name, "email": email, "age": 30}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    let report = fuzz::assert_clean(&api, 0x007e_1115, 50).await;
    assert!(report.sent >= 250, "{report:?}");
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

/// A database that refuses connections (as PostgreSQL does for a database
/// with connections turned off, or one an administrator is emptying) is a
/// dependency that is unavailable: 503 naming the database over REST and
/// UNAVAILABLE over gRPC, which callers' breakers count and retry, not a
/// 500 / INTERNAL that says the request broke something.
#[tokio::test]
async fn a_database_refusing_connections_is_unavailable_not_an_internal_error() {
    let pg = Postgres::start();
    let admin = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::query("CREATE DATABASE refusing")
        .execute(&admin)
        .await
        .unwrap();
    let url = format!(
        "{}/refusing",
        pg.url()
            .strip_suffix("/postgres")
            .expect("the postgres database")
    );
    let addr = start(&url).await;
    let api = Api::new(addr);
    let (s, b) = api
        .post(
            "/api/v1/users",
            &json!({"name": "Ann", "email": "ann@shop.test", "age": 30}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = b["id"].as_u64().unwrap();

    sqlx::query("ALTER DATABASE refusing ALLOW_CONNECTIONS false")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'refusing'",
    )
    .execute(&admin)
    .await
    .unwrap();

    for _ in 0..2 {
        let (s, b) = api.get(&format!("/api/v1/users/{id}")).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
        assert_eq!(b["code"], "dependency_unavailable", "{b}");
        assert_eq!(b["dependency"], "database", "{b}");
    }
    let mut grpc = UserServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let e = grpc
        .validate_user(pb::ValidateUserRequest { user_id: id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
}
