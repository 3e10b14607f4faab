//! Users in the database, and the rules for their fields.

use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row, any::AnyRow};
use trellis_service_kit::{ApiError, error::is_unique_violation, text};
use utoipa::ToSchema;

/// A user.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub age: i64,
    pub active: bool,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// A new user.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// 1 to 100 characters, not blank, without control characters; stored
    /// without surrounding whitespace.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000-\u001F\u007F]*[^\s\u0000-\u001F\u007F][^\u0000-\u001F\u007F]*$"
    )]
    pub name: String,
    /// An e-mail address (`local@domain.tld`), at most 254 characters,
    /// unique among users regardless of case; stored in lower case.
    #[schema(
        format = "email",
        max_length = 254,
        pattern = r"^[^@\s\u0000-\u001F\u007F]+@[^@\s.\u0000-\u001F\u007F]+(\.[^@\s.\u0000-\u001F\u007F]+)+$"
    )]
    pub email: String,
    /// 0 to 150.
    #[schema(minimum = 0, maximum = 150)]
    pub age: i64,
}

/// Changes to a user; absent fields stay as they are.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// As in a new user.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\u0000-\u001F\u007F]*[^\s\u0000-\u001F\u007F][^\u0000-\u001F\u007F]*$"
    )]
    pub name: Option<String>,
    /// As in a new user.
    #[schema(
        format = "email",
        max_length = 254,
        pattern = r"^[^@\s\u0000-\u001F\u007F]+@[^@\s.\u0000-\u001F\u007F]+(\.[^@\s.\u0000-\u001F\u007F]+)+$"
    )]
    pub email: Option<String>,
    /// 0 to 150.
    #[schema(minimum = 0, maximum = 150)]
    pub age: Option<i64>,
    pub active: Option<bool>,
}

/// A page of users.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct UserPage {
    pub users: Vec<User>,
    /// Users matching the search, over all pages.
    pub total: i64,
    pub page: i64,
    pub limit: i64,
}

/// The rules of `name`, as documented on [`NewUser`].
fn check_name(name: &str) -> Result<String, ApiError> {
    text::check(
        "name",
        name,
        1,
        100,
        text::NAME,
        "free of control characters and not blank",
    )?;
    Ok(name.trim().to_owned())
}

/// The rules of `email`, as documented on [`NewUser`].
fn check_email(email: &str) -> Result<String, ApiError> {
    if email.chars().count() > 254 || !text::matches(text::EMAIL, email) {
        return Err(ApiError::invalid(
            "email",
            format!(
                "{email:?} is not an e-mail address (local@domain.tld, at most 254 characters)"
            ),
        ));
    }
    Ok(email.to_lowercase())
}

fn check_age(age: i64) -> Result<i64, ApiError> {
    if !(0..=150).contains(&age) {
        return Err(ApiError::invalid("age", "age must be between 0 and 150"));
    }
    Ok(age)
}

/// Checks `page` (≥ 1) and `limit` (1 to 100).
pub fn check_page(page: i64, limit: i64) -> Result<(), ApiError> {
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
    Ok(())
}

const COLUMNS: &str = "id, name, email, age, active, created_at, updated_at";

fn from_row(r: &AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        email: r.try_get("email")?,
        age: r.try_get("age")?,
        active: r.try_get::<i64, _>("active")? != 0,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn duplicate(e: sqlx::Error) -> ApiError {
    if is_unique_violation(&e) {
        ApiError::conflict(
            "duplicate",
            "email",
            "a user with this e-mail address exists",
        )
    } else {
        e.into()
    }
}

pub async fn get(pool: &AnyPool, id: i64) -> Result<User, ApiError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    match row {
        Some(r) => Ok(from_row(&r)?),
        None => Err(ApiError::not_found("id", format!("no user with id {id}"))),
    }
}

pub async fn list(
    pool: &AnyPool,
    page: i64,
    limit: i64,
    search: &str,
) -> Result<UserPage, ApiError> {
    check_page(page, limit)?;
    if !text::matches(text::NO_NUL, search) {
        return Err(ApiError::bad_request(
            Some("search"),
            "search must not contain NUL characters",
        ));
    }
    let search = search.trim().to_lowercase();
    let (filter, pattern) = if search.is_empty() {
        ("", None)
    } else {
        let escaped = search
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        (
            " WHERE LOWER(name) LIKE $1 ESCAPE '\\' OR LOWER(email) LIKE $1 ESCAPE '\\'",
            Some(format!("%{escaped}%")),
        )
    };
    let n = if pattern.is_some() { 2 } else { 1 };
    let sql = format!(
        "SELECT {COLUMNS} FROM users{filter} ORDER BY id LIMIT ${n} OFFSET ${}",
        n + 1
    );
    let mut q = sqlx::query(&sql);
    let count_sql = format!("SELECT COUNT(*) AS n FROM users{filter}");
    let mut count = sqlx::query(&count_sql);
    if let Some(p) = &pattern {
        q = q.bind(p.clone());
        count = count.bind(p.clone());
    }
    let rows = q
        .bind(limit)
        .bind((page - 1).saturating_mul(limit))
        .fetch_all(pool)
        .await?;
    let total: i64 = count.fetch_one(pool).await?.try_get("n")?;
    Ok(UserPage {
        users: rows.iter().map(from_row).collect::<Result<_, _>>()?,
        total,
        page,
        limit,
    })
}

pub async fn create(pool: &AnyPool, new: NewUser) -> Result<User, ApiError> {
    let name = check_name(&new.name)?;
    let email = check_email(&new.email)?;
    let age = check_age(new.age)?;
    let now = trellis_service_kit::now();
    let row = sqlx::query(&format!(
        "INSERT INTO users (name, email, age, active, created_at, updated_at) \
         VALUES ($1, $2, $3, 1, $4, $4) RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(email)
    .bind(age)
    .bind(now)
    .fetch_one(pool)
    .await
    .map_err(duplicate)?;
    Ok(from_row(&row)?)
}

pub async fn update(pool: &AnyPool, id: i64, patch: UserPatch) -> Result<User, ApiError> {
    let current = get(pool, id).await?;
    let name = match &patch.name {
        Some(n) => check_name(n)?,
        None => current.name,
    };
    let email = match &patch.email {
        Some(e) => check_email(e)?,
        None => current.email,
    };
    let age = match patch.age {
        Some(a) => check_age(a)?,
        None => current.age,
    };
    let active = patch.active.unwrap_or(current.active);
    let row = sqlx::query(&format!(
        "UPDATE users SET name = $1, email = $2, age = $3, active = $4, updated_at = $5 \
         WHERE id = $6 RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(email)
    .bind(age)
    .bind(i64::from(active))
    .bind(trellis_service_kit::now())
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(duplicate)?;
    match row {
        Some(r) => Ok(from_row(&r)?),
        None => Err(ApiError::not_found("id", format!("no user with id {id}"))),
    }
}

pub async fn delete(pool: &AnyPool, id: i64) -> Result<(), ApiError> {
    let done = sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found("id", format!("no user with id {id}")));
    }
    Ok(())
}
