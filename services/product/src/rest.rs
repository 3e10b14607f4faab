//! REST: `/api/v1/products`, with stock reservations.

use axum::{extract::State, http::StatusCode, response::IntoResponse};
use serde::Deserialize;
use sqlx::AnyPool;
use trellis_service_kit::{
    ApiError, ErrorBody,
    extract::{Id, Json, Query},
};
use utoipa::IntoParams;

use crate::store::{self, Filter, NewProduct, Product, ProductPage, ProductPatch, Quantity};

/// Filters and paging of the list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Exact category (compared without surrounding whitespace); no NUL characters.
    #[param(pattern = r"^[^\u0000]*$")]
    pub category: Option<String>,
    /// Lowest unit price, in cents.
    #[param(minimum = 0)]
    pub min_price: Option<i64>,
    /// Highest unit price, in cents; below `min_price`, nothing matches.
    #[param(minimum = 0)]
    pub max_price: Option<i64>,
    /// `true`: only products in stock; `false`: only those out of stock.
    pub in_stock: Option<bool>,
    /// From 1 (default 1).
    #[param(minimum = 1)]
    pub page: Option<i64>,
    /// 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

/// List products, filtered by category, price range and availability.
#[utoipa::path(get, path = "/api/v1/products", tag = "products", params(ListQuery),
    responses((status = 200, body = ProductPage), (status = 400, body = ErrorBody)))]
pub async fn list_products(
    State(pool): State<AnyPool>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<ProductPage>, ApiError> {
    let filter = Filter {
        category: q.category,
        min_price: q.min_price,
        max_price: q.max_price,
        in_stock: q.in_stock,
        page: q.page.unwrap_or(1),
        limit: q.limit.unwrap_or(20),
    };
    Ok(axum::Json(store::list(&pool, filter).await?))
}

/// Create a product.
#[utoipa::path(post, path = "/api/v1/products", tag = "products", request_body = NewProduct,
    responses((status = 201, body = Product), (status = 400, body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_product(
    State(pool): State<AnyPool>,
    Json(new): Json<NewProduct>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((
        StatusCode::CREATED,
        axum::Json(store::create(&pool, new).await?),
    ))
}

/// Get a product.
#[utoipa::path(get, path = "/api/v1/products/{id}", tag = "products",
    params(("id" = i64, Path, minimum = 1, description = "The product's id")),
    responses((status = 200, body = Product), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_product(
    State(pool): State<AnyPool>,
    Id(id): Id,
) -> Result<axum::Json<Product>, ApiError> {
    Ok(axum::Json(store::get(&pool, id).await?))
}

/// Change a product.
#[utoipa::path(put, path = "/api/v1/products/{id}", tag = "products", request_body = ProductPatch,
    params(("id" = i64, Path, minimum = 1, description = "The product's id")),
    responses((status = 200, body = Product), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_product(
    State(pool): State<AnyPool>,
    Id(id): Id,
    Json(patch): Json<ProductPatch>,
) -> Result<axum::Json<Product>, ApiError> {
    Ok(axum::Json(store::update(&pool, id, patch).await?))
}

/// Delete a product.
#[utoipa::path(delete, path = "/api/v1/products/{id}", tag = "products",
    params(("id" = i64, Path, minimum = 1, description = "The product's id")),
    responses((status = 204, description = "Deleted"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_product(
    State(pool): State<AnyPool>,
    Id(id): Id,
) -> Result<StatusCode, ApiError> {
    store::delete(&pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Reserve units: the stock goes down by `quantity`, or nothing changes and
/// the answer is 409 `insufficient_stock`. Never below zero, whatever the concurrency.
#[utoipa::path(post, path = "/api/v1/products/{id}/reserve", tag = "stock", request_body = Quantity,
    params(("id" = i64, Path, minimum = 1, description = "The product's id")),
    responses((status = 200, description = "Reserved; the product with its new stock", body = Product),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Not enough stock", body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn reserve(
    State(pool): State<AnyPool>,
    Id(id): Id,
    Json(q): Json<Quantity>,
) -> Result<axum::Json<Product>, ApiError> {
    Ok(axum::Json(store::reserve(&pool, id, q.quantity).await?))
}

/// Release units reserved before: the stock goes up by `quantity`.
#[utoipa::path(post, path = "/api/v1/products/{id}/release", tag = "stock", request_body = Quantity,
    params(("id" = i64, Path, minimum = 1, description = "The product's id")),
    responses((status = 200, description = "Released; the product with its new stock", body = Product),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn release(
    State(pool): State<AnyPool>,
    Id(id): Id,
    Json(q): Json<Quantity>,
) -> Result<axum::Json<Product>, ApiError> {
    Ok(axum::Json(store::release(&pool, id, q.quantity).await?))
}
