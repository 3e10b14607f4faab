//! The product service: products over REST (`/api/v1/products`), with stock
//! reservations that never take the stock below zero.
//!
//! It has no discovery, retry, breaker or tracing code: the sidecar does those.

pub mod rest;
pub mod store;

use axum::{Router, routing::get};
use sqlx::{AnyPool, migrate::Migrator};
use trellis_service_kit::server;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

pub static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
pub static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(OpenApi)]
#[openapi(
    info(title = "product-service", description = "Products and stock of the Trellis example shop"),
    tags((name = "products", description = "Products"), (name = "stock", description = "Stock reservations"))
)]
struct ApiDoc;

fn rest(pool: AnyPool) -> (Router, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(rest::list_products, rest::create_product))
        .routes(routes!(
            rest::get_product,
            rest::update_product,
            rest::delete_product
        ))
        .routes(routes!(rest::reserve))
        .routes(routes!(rest::release))
        .split_for_parts();
    doc.merge(server::HealthDoc::openapi());
    (router.with_state(pool), doc)
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    rest(server::unconnected_pool()).1
}

/// The whole application: REST, `/health`, `/openapi.json`.
pub fn app(pool: AnyPool) -> Router {
    let (rest, doc) = rest(pool.clone());
    rest.merge(server::health_routes(pool))
        .route("/openapi.json", get(move || async move { axum::Json(doc) }))
        .fallback(server::no_route)
        .layer(axum::middleware::from_fn(server::log_requests))
}

/// Runs the service until SIGTERM.
pub async fn run() -> anyhow::Result<()> {
    server::init_logging();
    let cfg = trellis_service_kit::Config::from_env("product")?;
    let pool = trellis_service_kit::db::connect(&cfg.database_url, &SQLITE, &POSTGRES).await?;
    server::serve(app(pool), cfg.listen_addr()).await
}
