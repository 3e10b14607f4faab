//! REST: `/api/v1/orders`.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use serde::Deserialize;
use trellis_service_kit::{
    ApiError, ErrorBody, TraceHeaders,
    extract::{Id, Json, Query},
};
use utoipa::{IntoParams, ToSchema};

use crate::{
    AppState,
    deps::{Released, ReserveError},
    store::{self, Item, Order, OrderPage},
};

/// One line of a new order.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewItem {
    #[schema(minimum = 1)]
    pub product_id: i64,
    /// 1 to 1000.
    #[schema(minimum = 1, maximum = 1000)]
    pub quantity: i64,
}

/// A new order.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    #[schema(minimum = 1)]
    pub user_id: i64,
    /// 1 to 50 lines, each product once (a product listed twice is refused
    /// with 422 `duplicate_product`).
    #[schema(min_items = 1, max_items = 50)]
    pub items: Vec<NewItem>,
}

/// Whose orders, and which page.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The user whose orders to list.
    #[param(required = true, minimum = 1)]
    pub user_id: Option<i64>,
    /// From 1 (default 1).
    #[param(minimum = 1)]
    pub page: Option<i64>,
    /// 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

/// The header the shop's gateway sets from a verified token's `sub` claim
/// (examples/shop/gateway.yaml, EdgePolicy `shop-orders-login`). The
/// gateway removes any such header a client sends, so when present it
/// names the signed-in user.
pub const USER_HEADER: &str = "x-user-id";

/// A signed-in user places orders for themselves only. Requests without
/// [`USER_HEADER`] (from inside the mesh) are not checked here.
fn check_signed_in_user(headers: &HeaderMap, new: &NewOrder) -> Result<(), ApiError> {
    let Some(value) = headers.get(USER_HEADER) else {
        return Ok(());
    };
    let signed_in = value.to_str().ok().and_then(|v| v.parse::<i64>().ok());
    if signed_in == Some(new.user_id) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        Some("user_id"),
        format!(
            "the signed-in user ({USER_HEADER}: {}) may place orders for itself only, not for user {}",
            String::from_utf8_lossy(value.as_bytes()),
            new.user_id
        ),
    ))
}

fn check(new: &NewOrder) -> Result<(), ApiError> {
    if new.user_id < 1 {
        return Err(ApiError::invalid(
            "user_id",
            "user_id must be a positive integer",
        ));
    }
    if new.items.is_empty() || new.items.len() > 50 {
        return Err(ApiError::invalid("items", "an order has 1 to 50 items"));
    }
    for (i, item) in new.items.iter().enumerate() {
        if item.product_id < 1 {
            return Err(ApiError::invalid(
                &format!("items[{i}].product_id"),
                "product_id must be a positive integer",
            ));
        }
        if !(1..=1000).contains(&item.quantity) {
            return Err(ApiError::invalid(
                &format!("items[{i}].quantity"),
                "quantity must be between 1 and 1000",
            ));
        }
        if new.items[..i]
            .iter()
            .any(|o| o.product_id == item.product_id)
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "duplicate_product",
                Some(&format!("items[{i}].product_id")),
                "a product may appear only once in an order; add its quantities into one line",
            ));
        }
    }
    Ok(())
}

/// Releases what was reserved, best effort: a failure is logged.
async fn release_all(state: &AppState, trace: &TraceHeaders, reserved: &[Item]) {
    for item in reserved {
        match state
            .deps
            .release(trace, item.product_id, item.quantity)
            .await
        {
            Ok(Released::Returned) => {}
            Ok(Released::Gone) => {
                tracing::warn!(
                    product_id = item.product_id,
                    quantity = item.quantity,
                    "a reserved product is gone; nothing to release"
                )
            }
            Err(e) => {
                tracing::error!(product_id = item.product_id, quantity = item.quantity, error = %e, "could not release a reservation")
            }
        }
    }
}

/// Place an order: the user is validated (gRPC), each item's stock reserved
/// (REST), then the order stored; if anything fails, the reservations made are released.
#[utoipa::path(post, path = "/api/v1/orders", tag = "orders", request_body = NewOrder,
    responses((status = 201, body = Order), (status = 400, body = ErrorBody),
        (status = 403, description = "`forbidden`: the signed-in user (header `x-user-id`, set by the gateway from a token) is not `user_id`", body = ErrorBody),
        (status = 409, description = "Not enough stock", body = ErrorBody),
        (status = 422, description = "Input the schema refuses (code validation_failed); beyond it, \
            `invalid_user`: the user is unknown or inactive; `unknown_product`: an item's product does not exist; \
            `duplicate_product`: a product is listed twice", body = ErrorBody),
        (status = 503, description = "A dependency is unavailable; `dependency` names it", body = ErrorBody)))]
pub async fn create_order(
    State(state): State<AppState>,
    trace: TraceHeaders,
    headers: HeaderMap,
    Json(new): Json<NewOrder>,
) -> Result<impl IntoResponse, ApiError> {
    check(&new)?;
    check_signed_in_user(&headers, &new)?;
    if let Err(why) = state.deps.validate_user(&trace, new.user_id).await? {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_user",
            Some("user_id"),
            why,
        ));
    }
    let mut reserved: Vec<Item> = Vec::new();
    for (i, item) in new.items.iter().enumerate() {
        match state
            .deps
            .reserve(&trace, item.product_id, item.quantity)
            .await
        {
            Ok(r) => reserved.push(Item {
                product_id: item.product_id,
                quantity: item.quantity,
                unit_price_cents: r.price_cents,
            }),
            Err(e) => {
                release_all(&state, &trace, &reserved).await;
                return Err(match e {
                    ReserveError::NotFound(m) => ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "unknown_product",
                        Some(&format!("items[{i}].product_id")),
                        m,
                    ),
                    ReserveError::Insufficient(m) => {
                        ApiError::conflict("insufficient_stock", &format!("items[{i}].quantity"), m)
                    }
                    ReserveError::Unavailable(e) => e,
                });
            }
        }
    }
    match store::insert(&state.pool, new.user_id, &reserved).await {
        Ok(order) => Ok((StatusCode::CREATED, axum::Json(order))),
        Err(e) => {
            tracing::error!(error = %e, "could not store an order; releasing its reservations");
            release_all(&state, &trace, &reserved).await;
            Err(e)
        }
    }
}

/// Get an order.
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders",
    params(("id" = i64, Path, minimum = 1, description = "The order's id")),
    responses((status = 200, body = Order), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_order(
    State(state): State<AppState>,
    Id(id): Id,
) -> Result<axum::Json<Order>, ApiError> {
    Ok(axum::Json(store::get(&state.pool, id).await?))
}

/// List a user's orders.
#[utoipa::path(get, path = "/api/v1/orders", tag = "orders", params(ListQuery),
    responses((status = 200, body = OrderPage), (status = 400, body = ErrorBody)))]
pub async fn list_orders(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<OrderPage>, ApiError> {
    let user_id = match q.user_id {
        Some(u) if u > 0 => u,
        Some(_) => {
            return Err(ApiError::bad_request(
                Some("user_id"),
                "user_id must be a positive integer",
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                Some("user_id"),
                "user_id is required",
            ));
        }
    };
    let (page, limit) = (q.page.unwrap_or(1), q.limit.unwrap_or(20));
    if page < 1 {
        return Err(ApiError::bad_request(
            Some("page"),
            "page must be 1 or more",
        ));
    }
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request(
            Some("limit"),
            "limit must be between 1 and 100",
        ));
    }
    Ok(axum::Json(
        store::list_by_user(&state.pool, user_id, page, limit).await?,
    ))
}

/// Cancel an order and release its stock. An item whose product no longer
/// exists (the product service answers 404) is skipped: there is no stock to
/// return it to, and the cancel succeeds.
#[utoipa::path(post, path = "/api/v1/orders/{id}/cancel", tag = "orders",
    params(("id" = i64, Path, minimum = 1, description = "The order's id")),
    responses((status = 200, description = "Cancelled; the stock of each item whose product still exists is released", body = Order), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Already cancelled", body = ErrorBody),
        (status = 503, description = "The product service is unavailable; the order stays as it was", body = ErrorBody)))]
pub async fn cancel_order(
    State(state): State<AppState>,
    trace: TraceHeaders,
    Id(id): Id,
) -> Result<axum::Json<Order>, ApiError> {
    // The status changes first, atomically, so two cancels cannot both release.
    let Some(order) = store::transition(&state.pool, id, "created", "cancelled").await? else {
        let order = store::get(&state.pool, id).await?;
        return Err(ApiError::conflict(
            "already_cancelled",
            "status",
            format!("order {id} is {}", order.status),
        ));
    };
    let mut released = Vec::new();
    for item in &order.items {
        match state
            .deps
            .release(&trace, item.product_id, item.quantity)
            .await
        {
            Ok(Released::Returned) => released.push(item),
            Ok(Released::Gone) => {
                tracing::warn!(
                    order = id,
                    product_id = item.product_id,
                    quantity = item.quantity,
                    "cancel: the product is gone; nothing to release"
                );
            }
            Err(e) => {
                // Put back what was released and the status, so a later cancel starts over.
                for done in &released {
                    if let Err(e) = state
                        .deps
                        .reserve(&trace, done.product_id, done.quantity)
                        .await
                    {
                        let e = match e {
                            ReserveError::NotFound(m) | ReserveError::Insufficient(m) => m,
                            ReserveError::Unavailable(e) => e.to_string(),
                        };
                        tracing::error!(order = id, product_id = done.product_id, error = %e, "could not re-reserve after a failed cancel");
                    }
                }
                store::transition(&state.pool, id, "cancelled", "created").await?;
                return Err(e);
            }
        }
    }
    Ok(axum::Json(order))
}
