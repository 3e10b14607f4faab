//! The one helper crate of the example services (user, product, order).
//!
//! It holds what every service needs and nothing a sidecar does: configuration
//! from the environment and the mounted config directory, JSON logs, graceful
//! shutdown, the JSON error type, extractors that answer bad input with that
//! error, the database pool with migrations, a `/health` route, and the copy of
//! W3C trace headers from an incoming request to outgoing ones. No discovery,
//! retries, breakers or spans: the Trellis sidecar does those.

pub mod config;
pub mod db;
pub mod error;
pub mod extract;
pub mod server;
pub mod text;
pub mod trace;

#[cfg(feature = "testing")]
pub mod testing;

pub use config::Config;
pub use error::{ApiError, ErrorBody};
pub use trace::TraceHeaders;

/// The current time as RFC 3339 (UTC, seconds), how the services store timestamps.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
