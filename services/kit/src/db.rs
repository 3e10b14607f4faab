//! The database: SQLite (a file, created on first use) by default, PostgreSQL
//! when the URL starts with `postgres://` (or `postgresql://`), both through
//! sqlx's `Any` driver so queries are written once. Queries use `$1`-style
//! placeholders, which both backends accept. Each service keeps one migration
//! directory per backend, since their DDL differs (identity columns).

use std::time::Duration;

use sqlx::{AnyPool, any::AnyPoolOptions, migrate::Migrator};

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Connects and runs the matching migrations.
pub async fn connect(
    url: &str,
    sqlite: &'static Migrator,
    postgres: &'static Migrator,
) -> anyhow::Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let pg = is_postgres(url);
    let pool = AnyPoolOptions::new()
        .max_connections(if pg { 10 } else { 4 })
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the database: {e}"))?;
    let migrator = if pg { postgres } else { sqlite };
    migrator
        .run(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("running migrations: {e}"))?;
    Ok(pool)
}

/// Whether the database answers a trivial query.
pub async fn ping(pool: &AnyPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}
