//! Orders in the database.

use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row, any::AnyRow};
use trellis_service_kit::ApiError;
use utoipa::ToSchema;

/// One line of an order.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Item {
    pub product_id: i64,
    pub quantity: i64,
    /// The unit price when the order was placed, in cents.
    pub unit_price_cents: i64,
}

/// An order.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    /// `created` or `cancelled`.
    pub status: String,
    pub total_cents: i64,
    pub items: Vec<Item>,
    pub created_at: String,
    pub updated_at: String,
}

/// A page of a user's orders.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderPage {
    pub orders: Vec<Order>,
    pub total: i64,
    pub page: i64,
    pub limit: i64,
}

const COLUMNS: &str = "id, user_id, status, total_cents, items, created_at, updated_at";

fn from_row(r: &AnyRow) -> Result<Order, ApiError> {
    let items: String = r.try_get("items")?;
    Ok(Order {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        status: r.try_get("status")?,
        total_cents: r.try_get("total_cents")?,
        items: serde_json::from_str(&items).map_err(ApiError::internal)?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn not_found(id: i64) -> ApiError {
    ApiError::not_found("id", format!("no order with id {id}"))
}

pub async fn insert(pool: &AnyPool, user_id: i64, items: &[Item]) -> Result<Order, ApiError> {
    let total: i64 = items.iter().map(|i| i.quantity * i.unit_price_cents).sum();
    let row = sqlx::query(&format!(
        "INSERT INTO orders (user_id, status, total_cents, items, created_at, updated_at) \
         VALUES ($1, 'created', $2, $3, $4, $4) RETURNING {COLUMNS}"
    ))
    .bind(user_id)
    .bind(total)
    .bind(serde_json::to_string(items).map_err(ApiError::internal)?)
    .bind(trellis_service_kit::now())
    .fetch_one(pool)
    .await?;
    from_row(&row)
}

pub async fn get(pool: &AnyPool, id: i64) -> Result<Order, ApiError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(|r| from_row(&r))
        .transpose()?
        .ok_or_else(|| not_found(id))
}

pub async fn list_by_user(
    pool: &AnyPool,
    user_id: i64,
    page: i64,
    limit: i64,
) -> Result<OrderPage, ApiError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM orders WHERE user_id = $1 ORDER BY id LIMIT $2 OFFSET $3"
    ))
    .bind(user_id)
    .bind(limit)
    .bind((page - 1).saturating_mul(limit))
    .fetch_all(pool)
    .await?;
    let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(pool)
        .await?
        .try_get("n")?;
    Ok(OrderPage {
        orders: rows.iter().map(from_row).collect::<Result<_, _>>()?,
        total,
        page,
        limit,
    })
}

/// Moves an order from `from` to `to` atomically; `None` when it was not in `from`.
pub async fn transition(
    pool: &AnyPool,
    id: i64,
    from: &str,
    to: &str,
) -> Result<Option<Order>, ApiError> {
    let row = sqlx::query(&format!(
        "UPDATE orders SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4 RETURNING {COLUMNS}"
    ))
    .bind(to.to_owned())
    .bind(trellis_service_kit::now())
    .bind(id)
    .bind(from.to_owned())
    .fetch_optional(pool)
    .await?;
    row.map(|r| from_row(&r)).transpose()
}
