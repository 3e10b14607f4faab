//! The JSON error every endpoint answers with: `{code, message, field}`.

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use http::StatusCode;
use serde::{Deserialize, Serialize};

/// The body of every error response.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable, e.g. `validation_failed`, `not_found`, `dependency_unavailable`.
    pub code: String,
    /// For people.
    pub message: String,
    /// The input field at fault (`email`, `items[0].quantity`), when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The dependency that failed, for `dependency_unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency: Option<String>,
}

/// An error answer: a status and an [`ErrorBody`].
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &str,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                code: code.to_owned(),
                message: message.into(),
                field: field.map(str::to_owned),
                dependency: None,
            },
        }
    }
    /// 400: malformed input (unparsable JSON, a query parameter of the wrong type).
    pub fn bad_request(field: Option<&str>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", field, message)
    }
    /// 422: well-formed input that breaks a rule.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            Some(field),
            message,
        )
    }
    /// 404.
    pub fn not_found(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", Some(field), message)
    }
    /// 409: the request conflicts with the stored state.
    pub fn conflict(code: &str, field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, Some(field), message)
    }
    /// 503: a dependency (another service, the database) is unavailable.
    pub fn unavailable(dependency: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "dependency_unavailable",
            None,
            message,
        );
        e.body.dependency = Some(dependency.to_owned());
        e
    }
    /// 500, logged; the body does not leak the cause.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            None,
            "internal error",
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.body.code,
            self.body.message
        )
    }
}

impl std::error::Error for ApiError {}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            tracing::error!(error = %e, "database unavailable");
            return Self::unavailable("database", "the database is unavailable");
        }
        Self::internal(e)
    }
}

/// Whether a database error says the database cannot be reached or used
/// for now (a 503 to retry later) rather than that the request failed.
///
/// Besides the pool's and the socket's own failures, these are PostgreSQL's
/// SQLSTATEs for it: class 08 (connection exception), 57P01–57P03 (the
/// server shutting down, crashed, or not accepting connections yet, which
/// also ends sessions an administrator terminates), 53300 (too many
/// connections), and 55000, with which PostgreSQL refuses a connection to a
/// database that does not allow connections.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300" | "55000")
        }),
        _ => false,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// Whether a database error is a unique-constraint violation.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}
