//! REST: `/api/v1/users`.

use axum::{extract::State, http::StatusCode, response::IntoResponse};
use serde::Deserialize;
use sqlx::AnyPool;
use trellis_service_kit::{
    ApiError, ErrorBody,
    extract::{Id, Json, Query},
};
use utoipa::IntoParams;

use crate::store::{self, NewUser, User, UserPage, UserPatch};

/// Paging and search of the list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// From 1 (default 1).
    #[param(minimum = 1)]
    pub page: Option<i64>,
    /// 1 to 100 (default 10).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Matches name or e-mail, case-insensitively; no NUL characters.
    #[param(pattern = r"^[^\u0000]*$")]
    pub search: Option<String>,
}

/// List users, a page at a time, optionally searching name and e-mail.
#[utoipa::path(get, path = "/api/v1/users", tag = "users", params(ListQuery),
    responses((status = 200, body = UserPage), (status = 400, body = ErrorBody)))]
pub async fn list_users(
    State(pool): State<AnyPool>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<UserPage>, ApiError> {
    let page = store::list(
        &pool,
        q.page.unwrap_or(1),
        q.limit.unwrap_or(10),
        q.search.as_deref().unwrap_or_default(),
    )
    .await?;
    Ok(axum::Json(page))
}

/// Create a user.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    responses((status = 201, body = User), (status = 400, body = ErrorBody),
        (status = 409, description = "The e-mail address is taken", body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn create_user(
    State(pool): State<AnyPool>,
    Json(new): Json<NewUser>,
) -> Result<impl IntoResponse, ApiError> {
    let user = store::create(&pool, new).await?;
    Ok((StatusCode::CREATED, axum::Json(user)))
}

/// Get a user.
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users",
    params(("id" = i64, Path, minimum = 1, description = "The user's id")),
    responses((status = 200, body = User), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_user(
    State(pool): State<AnyPool>,
    Id(id): Id,
) -> Result<axum::Json<User>, ApiError> {
    Ok(axum::Json(store::get(&pool, id).await?))
}

/// Change a user's name, e-mail, age or active flag.
#[utoipa::path(put, path = "/api/v1/users/{id}", tag = "users", request_body = UserPatch,
    params(("id" = i64, Path, minimum = 1, description = "The user's id")),
    responses((status = 200, body = User), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_user(
    State(pool): State<AnyPool>,
    Id(id): Id,
    Json(patch): Json<UserPatch>,
) -> Result<axum::Json<User>, ApiError> {
    Ok(axum::Json(store::update(&pool, id, patch).await?))
}

/// Delete a user.
#[utoipa::path(delete, path = "/api/v1/users/{id}", tag = "users",
    params(("id" = i64, Path, minimum = 1, description = "The user's id")),
    responses((status = 204, description = "Deleted"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_user(State(pool): State<AnyPool>, Id(id): Id) -> Result<StatusCode, ApiError> {
    store::delete(&pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
