//! The user service: users over REST (`/api/v1/users`) and gRPC
//! (`user.UserService`) on one port. The server speaks HTTP/1.1 and h2c
//! (HTTP/2 with prior knowledge) on the same listener, so a MicroService
//! with protocol HTTP serves both: the sidecar forwards REST as HTTP/1.1 and
//! anything with gRPC's content type as h2c.
//!
//! It has no discovery, retry, breaker or tracing code: the sidecar does those.

pub mod grpc;
pub mod rest;
pub mod store;

/// The generated gRPC code of `proto/user.proto`.
pub mod pb {
    tonic::include_proto!("user");
}

use axum::{Router, routing::get};
use sqlx::{AnyPool, migrate::Migrator};
use tonic::server::NamedService;
use trellis_service_kit::server;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

pub static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
pub static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(OpenApi)]
#[openapi(
    info(title = "user-service", description = "Users of the Trellis example shop"),
    tags((name = "users", description = "Users"))
)]
struct ApiDoc;

/// The REST routes and their OpenAPI document.
fn rest(pool: AnyPool) -> (Router, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(rest::list_users, rest::create_user))
        .routes(routes!(
            rest::get_user,
            rest::update_user,
            rest::delete_user
        ))
        .split_for_parts();
    doc.merge(trellis_service_kit::server::HealthDoc::openapi());
    (router.with_state(pool), doc)
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    rest(server::unconnected_pool()).1
}

/// The whole application: REST, gRPC, `/health`, `/openapi.json`.
pub fn app(pool: AnyPool) -> Router {
    let (rest, doc) = rest(pool.clone());
    let grpc = pb::user_service_server::UserServiceServer::new(grpc::Grpc { pool: pool.clone() });
    let grpc_path = format!(
        "/{}/{{*rpc}}",
        pb::user_service_server::UserServiceServer::<grpc::Grpc>::NAME
    );
    rest.merge(server::health_routes(pool))
        .route("/openapi.json", get(move || async move { axum::Json(doc) }))
        .route_service(&grpc_path, grpc)
        .fallback(server::no_route)
        .layer(axum::middleware::from_fn(server::log_requests))
}

/// Runs the service until SIGTERM.
pub async fn run() -> anyhow::Result<()> {
    server::init_logging();
    let cfg = trellis_service_kit::Config::from_env("user")?;
    let pool = trellis_service_kit::db::connect(&cfg.database_url, &SQLITE, &POSTGRES).await?;
    server::serve(app(pool), cfg.listen_addr()).await
}
