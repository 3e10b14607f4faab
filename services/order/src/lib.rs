//! The order service: orders over REST (`/api/v1/orders`). Creating one
//! validates the user over gRPC and reserves stock over REST, both through
//! the sidecar's outbound listener (`TRELLIS_OUTBOUND`); cancelling releases it.
//!
//! It has no discovery, retry, breaker or tracing code: the sidecar does
//! those. It only copies the W3C trace headers onto its calls (the kit's
//! `TraceHeaders`) and bounds each call with a client timeout.

pub mod deps;
pub mod rest;
pub mod store;

/// The generated gRPC client of the user service.
pub mod pb {
    tonic::include_proto!("user");
}

use axum::{Router, routing::get};
use sqlx::{AnyPool, migrate::Migrator};
use trellis_service_kit::server;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

pub use deps::Deps;

pub static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
pub static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub pool: AnyPool,
    pub deps: Deps,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "order-service", description = "Orders of the Trellis example shop"),
    tags((name = "orders", description = "Orders"))
)]
struct ApiDoc;

fn rest(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(rest::list_orders, rest::create_order))
        .routes(routes!(rest::get_order))
        .routes(routes!(rest::cancel_order))
        .split_for_parts();
    doc.merge(server::HealthDoc::openapi());
    (router.with_state(state), doc)
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let deps = Deps::new(([127, 0, 0, 1], 9).into(), "user", "product").expect("clients");
    rest(AppState {
        pool: server::unconnected_pool(),
        deps,
    })
    .1
}

/// The whole application: REST, `/health`, `/openapi.json`.
pub fn app(state: AppState) -> Router {
    let pool = state.pool.clone();
    let (rest, doc) = rest(state);
    rest.merge(server::health_routes(pool))
        .route("/openapi.json", get(move || async move { axum::Json(doc) }))
        .fallback(server::no_route)
        .layer(axum::middleware::from_fn(server::log_requests))
}

/// Runs the service until SIGTERM. `USER_SERVICE` and `PRODUCT_SERVICE`
/// name the dependencies (default `user` and `product`).
pub async fn run() -> anyhow::Result<()> {
    server::init_logging();
    let cfg = trellis_service_kit::Config::from_env("order")?;
    let pool = trellis_service_kit::db::connect(&cfg.database_url, &SQLITE, &POSTGRES).await?;
    let user = cfg.get("USER_SERVICE").unwrap_or_else(|| "user".to_owned());
    let product = cfg
        .get("PRODUCT_SERVICE")
        .unwrap_or_else(|| "product".to_owned());
    let deps = Deps::new(cfg.outbound_addr()?, &user, &product)?;
    server::serve(app(AppState { pool, deps }), cfg.listen_addr()).await
}
