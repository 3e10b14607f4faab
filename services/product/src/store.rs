//! Products in the database, the rules for their fields, and stock.

use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row, any::AnyRow};
use trellis_service_kit::{ApiError, error::is_unique_violation, text};
use utoipa::ToSchema;

/// A product.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub category: String,
    /// The unit price in cents.
    pub price_cents: i64,
    /// Units available; never below zero.
    pub stock: i64,
    pub created_at: String,
    pub updated_at: String,
}

/// A new product.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// 1 to 200 characters, not blank, without control characters, unique;
    /// stored without surrounding whitespace.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F]*[^\s\u0000-\u001F\u007F][^\u0000-\u001F\u007F]*$"
    )]
    pub name: String,
    /// Up to 2000 characters, no NUL (default empty).
    #[serde(default)]
    #[schema(max_length = 2000, pattern = r"^[^\u0000]*$")]
    pub description: String,
    /// 1 to 50 characters, not blank, without control characters.
    #[schema(
        min_length = 1,
        max_length = 50,
        pattern = r"^[^\u0000-\u001F\u007F]*[^\s\u0000-\u001F\u007F][^\u0000-\u001F\u007F]*$"
    )]
    pub category: String,
    /// 0 to 10^12 (so an order's total, up to 50 lines of 1000 units, fits in 64 bits).
    #[schema(minimum = 0, maximum = 1e12)]
    pub price_cents: i64,
    /// 0 to 10^9.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub stock: i64,
}

/// Changes to a product; absent fields stay as they are. Stock changes go
/// through reserve and release, or `stock` here to restock.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    /// As in a new product.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F]*[^\s\u0000-\u001F\u007F][^\u0000-\u001F\u007F]*$"
    )]
    pub name: Option<String>,
    /// As in a new product.
    #[schema(max_length = 2000, pattern = r"^[^\u0000]*$")]
    pub description: Option<String>,
    /// As in a new product.
    #[schema(
        min_length = 1,
        max_length = 50,
        pattern = r"^[^\u0000-\u001F\u007F]*[^\s\u0000-\u001F\u007F][^\u0000-\u001F\u007F]*$"
    )]
    pub category: Option<String>,
    /// 0 to 10^12.
    #[schema(minimum = 0, maximum = 1e12)]
    pub price_cents: Option<i64>,
    /// 0 to 10^9: the stock from now on.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub stock: Option<i64>,
}

/// A quantity of units to reserve or release.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quantity {
    /// 1 to 1000.
    #[schema(minimum = 1, maximum = 1000)]
    pub quantity: i64,
}

/// List filters.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub category: Option<String>,
    pub min_price: Option<i64>,
    pub max_price: Option<i64>,
    pub in_stock: Option<bool>,
    pub page: i64,
    pub limit: i64,
}

/// A page of products.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductPage {
    pub products: Vec<Product>,
    pub total: i64,
    pub page: i64,
    pub limit: i64,
}

/// The rules of `name` and `category`, as documented on [`NewProduct`].
fn check_text(field: &str, v: &str, max: usize) -> Result<String, ApiError> {
    text::check(
        field,
        v,
        1,
        max,
        text::NAME,
        "free of control characters and not blank",
    )?;
    Ok(v.trim().to_owned())
}

/// The rules of `description`, as documented on [`NewProduct`].
fn check_description(v: &str) -> Result<String, ApiError> {
    text::check(
        "description",
        v,
        0,
        2000,
        text::NO_NUL,
        "free of NUL characters",
    )?;
    Ok(v.trim().to_owned())
}

/// The highest `price_cents`: 50 lines of 1000 units at this price still
/// total less than `i64::MAX`.
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000_000;
/// The highest `stock` a client may set.
pub const MAX_STOCK: i64 = 1_000_000_000;

fn check_range(field: &str, v: i64, max: i64) -> Result<i64, ApiError> {
    if !(0..=max).contains(&v) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be between 0 and {max}"),
        ));
    }
    Ok(v)
}

fn check_quantity(q: i64) -> Result<i64, ApiError> {
    if !(1..=1000).contains(&q) {
        return Err(ApiError::invalid(
            "quantity",
            "quantity must be between 1 and 1000",
        ));
    }
    Ok(q)
}

const COLUMNS: &str = "id, name, description, category, price_cents, stock, created_at, updated_at";

fn from_row(r: &AnyRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        category: r.try_get("category")?,
        price_cents: r.try_get("price_cents")?,
        stock: r.try_get("stock")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn duplicate(e: sqlx::Error) -> ApiError {
    if is_unique_violation(&e) {
        ApiError::conflict("duplicate", "name", "a product with this name exists")
    } else {
        e.into()
    }
}

fn not_found(id: i64) -> ApiError {
    ApiError::not_found("id", format!("no product with id {id}"))
}

pub async fn get(pool: &AnyPool, id: i64) -> Result<Product, ApiError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM products WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    match row {
        Some(r) => Ok(from_row(&r)?),
        None => Err(not_found(id)),
    }
}

/// A value bound to a list query.
enum Arg {
    Text(String),
    Int(i64),
}

pub async fn list(pool: &AnyPool, f: Filter) -> Result<ProductPage, ApiError> {
    if f.page < 1 {
        return Err(ApiError::bad_request(
            Some("page"),
            "page must be 1 or more",
        ));
    }
    if !(1..=100).contains(&f.limit) {
        return Err(ApiError::bad_request(
            Some("limit"),
            "limit must be between 1 and 100",
        ));
    }
    for (field, v) in [("min_price", f.min_price), ("max_price", f.max_price)] {
        if v.is_some_and(|v| v < 0) {
            return Err(ApiError::bad_request(
                Some(field),
                format!("{field} must be 0 or more"),
            ));
        }
    }
    if f.category
        .as_deref()
        .is_some_and(|c| !text::matches(text::NO_NUL, c))
    {
        return Err(ApiError::bad_request(
            Some("category"),
            "category must not contain NUL characters",
        ));
    }
    // A `max_price` below `min_price` is an empty range: it matches nothing.
    let mut conds = Vec::new();
    let mut args = Vec::new();
    if let Some(c) = &f.category {
        args.push(Arg::Text(c.trim().to_owned()));
        conds.push(format!("category = ${}", args.len()));
    }
    if let Some(lo) = f.min_price {
        args.push(Arg::Int(lo));
        conds.push(format!("price_cents >= ${}", args.len()));
    }
    if let Some(hi) = f.max_price {
        args.push(Arg::Int(hi));
        conds.push(format!("price_cents <= ${}", args.len()));
    }
    match f.in_stock {
        Some(true) => conds.push("stock > 0".to_owned()),
        Some(false) => conds.push("stock = 0".to_owned()),
        None => {}
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let n = args.len();
    let sql = format!(
        "SELECT {COLUMNS} FROM products{filter} ORDER BY id LIMIT ${} OFFSET ${}",
        n + 1,
        n + 2
    );
    let count_sql = format!("SELECT COUNT(*) AS n FROM products{filter}");
    let mut q = sqlx::query(&sql);
    let mut count = sqlx::query(&count_sql);
    for a in &args {
        match a {
            Arg::Text(s) => {
                q = q.bind(s.clone());
                count = count.bind(s.clone());
            }
            Arg::Int(i) => {
                q = q.bind(*i);
                count = count.bind(*i);
            }
        }
    }
    let rows = q
        .bind(f.limit)
        .bind((f.page - 1).saturating_mul(f.limit))
        .fetch_all(pool)
        .await?;
    let total: i64 = count.fetch_one(pool).await?.try_get("n")?;
    Ok(ProductPage {
        products: rows.iter().map(from_row).collect::<Result<_, _>>()?,
        total,
        page: f.page,
        limit: f.limit,
    })
}

pub async fn create(pool: &AnyPool, new: NewProduct) -> Result<Product, ApiError> {
    let name = check_text("name", &new.name, 200)?;
    let description = check_description(&new.description)?;
    let category = check_text("category", &new.category, 50)?;
    let price = check_range("price_cents", new.price_cents, MAX_PRICE_CENTS)?;
    let stock = check_range("stock", new.stock, MAX_STOCK)?;
    let row = sqlx::query(&format!(
        "INSERT INTO products (name, description, category, price_cents, stock, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(description)
    .bind(category)
    .bind(price)
    .bind(stock)
    .bind(trellis_service_kit::now())
    .fetch_one(pool)
    .await
    .map_err(duplicate)?;
    Ok(from_row(&row)?)
}

pub async fn update(pool: &AnyPool, id: i64, p: ProductPatch) -> Result<Product, ApiError> {
    let cur = get(pool, id).await?;
    let name = p
        .name
        .as_deref()
        .map(|v| check_text("name", v, 200))
        .transpose()?
        .unwrap_or(cur.name);
    let description = p
        .description
        .as_deref()
        .map(check_description)
        .transpose()?
        .unwrap_or(cur.description);
    let category = p
        .category
        .as_deref()
        .map(|v| check_text("category", v, 50))
        .transpose()?
        .unwrap_or(cur.category);
    let price = p
        .price_cents
        .map(|v| check_range("price_cents", v, MAX_PRICE_CENTS))
        .transpose()?
        .unwrap_or(cur.price_cents);
    let stock = p
        .stock
        .map(|v| check_range("stock", v, MAX_STOCK))
        .transpose()?;
    // Stock is set only when given, in the same statement, so a concurrent
    // reservation is not overwritten by a stale read.
    let row = sqlx::query(&format!(
        "UPDATE products SET name = $1, description = $2, category = $3, price_cents = $4, \
         updated_at = $5, stock = COALESCE($6, stock) WHERE id = $7 RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(description)
    .bind(category)
    .bind(price)
    .bind(trellis_service_kit::now())
    .bind(stock)
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(duplicate)?;
    row.map(|r| from_row(&r))
        .transpose()?
        .ok_or_else(|| not_found(id))
}

pub async fn delete(pool: &AnyPool, id: i64) -> Result<(), ApiError> {
    let done = sqlx::query("DELETE FROM products WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(not_found(id));
    }
    Ok(())
}

/// Takes `quantity` units from the stock, atomically: one conditional
/// UPDATE, so concurrent reservations never take the stock below zero.
pub async fn reserve(pool: &AnyPool, id: i64, quantity: i64) -> Result<Product, ApiError> {
    let quantity = check_quantity(quantity)?;
    let row = sqlx::query(&format!(
        "UPDATE products SET stock = stock - $1, updated_at = $2 \
         WHERE id = $3 AND stock >= $1 RETURNING {COLUMNS}"
    ))
    .bind(quantity)
    .bind(trellis_service_kit::now())
    .bind(id)
    .fetch_optional(pool)
    .await?;
    match row {
        Some(r) => Ok(from_row(&r)?),
        None => {
            let p = get(pool, id).await?;
            Err(ApiError::conflict(
                "insufficient_stock",
                "quantity",
                format!("{quantity} requested, {} in stock", p.stock),
            ))
        }
    }
}

/// Returns `quantity` units to the stock.
pub async fn release(pool: &AnyPool, id: i64, quantity: i64) -> Result<Product, ApiError> {
    let quantity = check_quantity(quantity)?;
    let row = sqlx::query(&format!(
        "UPDATE products SET stock = stock + $1, updated_at = $2 WHERE id = $3 RETURNING {COLUMNS}"
    ))
    .bind(quantity)
    .bind(trellis_service_kit::now())
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| from_row(&r))
        .transpose()?
        .ok_or_else(|| not_found(id))
}
