//! Extractors that answer bad input with an [`ApiError`] naming the field:
//! [`Json`] (400 for malformed JSON, 422 for a wrong or missing field),
//! [`Query`] (400 naming the parameter) and [`Id`] (a positive integer path
//! segment, else 400 naming `id`).

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
};
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::ApiError;

/// A JSON body.
pub struct Json<T>(pub T);

/// The field named by a serde error: the path, or for "missing field `x`" the x.
fn field_of(path: &serde_path_to_error::Path, message: &str) -> Option<String> {
    let p = path.to_string();
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next());
    match (p.as_str(), missing) {
        (".", Some(m)) => Some(m.to_owned()),
        (".", None) => None,
        (p, Some(m)) => Some(format!("{p}.{m}")),
        (p, None) => Some(p.to_owned()),
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(None, e.body_text()))?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(de) {
            Ok(v) => Ok(Json(v)),
            Err(e) => {
                let inner = e.inner();
                let message = inner.to_string();
                let field = field_of(e.path(), &message);
                if inner.is_data() {
                    let field = field.unwrap_or_else(|| "body".to_owned());
                    Err(ApiError::invalid(&field, message))
                } else {
                    // Syntax: the body as a whole is at fault; say where it broke.
                    let at = field.map(|f| format!(" (in {f})")).unwrap_or_default();
                    Err(ApiError::bad_request(
                        Some("body"),
                        format!("malformed JSON{at}: {message}"),
                    ))
                }
            }
        }
    }
}

/// Query parameters.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(q.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|e| {
                let message = e.inner().to_string();
                let field = field_of(e.path(), &message);
                ApiError::bad_request(Some(field.as_deref().unwrap_or("query")), message)
            })
    }
}

/// A positive integer id from the single path parameter.
pub struct Id(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::bad_request(Some("id"), e.body_text()))?;
        match raw.parse::<i64>() {
            Ok(id) if id > 0 => Ok(Id(id)),
            _ => Err(ApiError::bad_request(
                Some("id"),
                format!("id must be a positive integer, not {raw:?}"),
            )),
        }
    }
}
