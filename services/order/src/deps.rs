//! The order service's dependencies, reached only through the sidecar's
//! outbound listener: the user service over gRPC (`:authority` = its name)
//! and the product service over REST (proxy-form URLs, `http://product/...`).
//! No discovery, retries or breakers here; every call has a client timeout so
//! nothing hangs, and a failure becomes a 503 naming the dependency.

use std::{net::SocketAddr, time::Duration};

use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tonic::{
    Code,
    metadata::MetadataMap,
    transport::{Channel, Endpoint},
};
use trellis_service_kit::{ApiError, ErrorBody, TraceHeaders};

use crate::pb::{ValidateUserRequest, user_service_client::UserServiceClient};

/// How long one call to a dependency may take, end to end.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Clients of the user and product services.
#[derive(Clone)]
pub struct Deps {
    users: UserServiceClient<Channel>,
    http: reqwest::Client,
    user: String,
    product: String,
}

/// A unit reserved from the product service, with its price.
#[derive(Clone, Debug)]
pub struct Reserved {
    pub price_cents: i64,
}

#[derive(Deserialize)]
struct ProductAnswer {
    price_cents: i64,
}

/// What became of units given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// The product's stock went up.
    Returned,
    /// The product no longer exists (the product service answered 404
    /// `not_found`), so there is nothing to return the units to.
    Gone,
}

/// Why a reservation failed.
pub enum ReserveError {
    /// 404: no such product.
    NotFound(String),
    /// 409: not enough stock.
    Insufficient(String),
    /// Anything else: the product service is unavailable.
    Unavailable(ApiError),
}

impl Deps {
    /// Clients whose every connection goes to `outbound`, naming the user
    /// service `user` and the product service `product`.
    pub fn new(outbound: SocketAddr, user: &str, product: &str) -> anyhow::Result<Self> {
        let connector = tower::service_fn(move |_: http::Uri| async move {
            // Nagle off, as tonic's own connector does: an HTTP/2 request is
            // HEADERS then DATA, and the second must not wait for an ACK.
            let tcp = TcpStream::connect(outbound).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, std::io::Error>(TokioIo::new(tcp))
        });
        let channel = Endpoint::from_shared(format!("http://{user}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(CALL_TIMEOUT)
            .connect_with_connector_lazy(connector);
        let http = reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://{outbound}"))?)
            .connect_timeout(Duration::from_secs(2))
            .timeout(CALL_TIMEOUT)
            .build()?;
        Ok(Self {
            users: UserServiceClient::new(channel),
            http,
            user: user.to_owned(),
            product: product.to_owned(),
        })
    }

    /// Whether user `id` exists and is active (`Err(message)` when not).
    pub async fn validate_user(
        &self,
        trace: &TraceHeaders,
        id: i64,
    ) -> Result<Result<(), String>, ApiError> {
        let mut req = tonic::Request::new(ValidateUserRequest { user_id: id as u64 });
        *req.metadata_mut() = MetadataMap::from_headers(trace.0.clone());
        match self.users.clone().validate_user(req).await {
            Ok(rsp) => {
                let rsp = rsp.into_inner();
                Ok(if rsp.valid { Ok(()) } else { Err(rsp.message) })
            }
            Err(s) if s.code() == Code::InvalidArgument => Ok(Err(s.message().to_owned())),
            Err(s) => {
                tracing::warn!(dependency = %self.user, code = ?s.code(), message = s.message(), "user service call failed");
                let breaker = s.metadata().get("x-trellis-breaker").is_some();
                Err(ApiError::unavailable(
                    "user",
                    format!(
                        "the user service is unavailable{}: {}",
                        if breaker {
                            " (circuit breaker open)"
                        } else {
                            ""
                        },
                        s.message()
                    ),
                ))
            }
        }
    }

    async fn stock(
        &self,
        trace: &TraceHeaders,
        action: &str,
        product_id: i64,
        quantity: i64,
    ) -> Result<reqwest::Response, ApiError> {
        let mut headers = http::HeaderMap::new();
        trace.apply(&mut headers);
        self.http
            .post(format!("http://{}/api/v1/products/{product_id}/{action}", self.product))
            .headers(headers)
            .json(&serde_json::json!({ "quantity": quantity }))
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(dependency = %self.product, error = %e, "product service call failed");
                let what = if e.is_timeout() { "did not answer in time" } else { "could not be reached" };
                ApiError::unavailable("product", format!("the product service {what}"))
            })
    }

    /// Reserves `quantity` units of a product.
    pub async fn reserve(
        &self,
        trace: &TraceHeaders,
        product_id: i64,
        quantity: i64,
    ) -> Result<Reserved, ReserveError> {
        let rsp = self
            .stock(trace, "reserve", product_id, quantity)
            .await
            .map_err(ReserveError::Unavailable)?;
        let status = rsp.status().as_u16();
        let breaker = rsp.headers().get("x-trellis-breaker").is_some();
        let proxy_error = rsp
            .headers()
            .get("x-trellis-proxy-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match status {
            200 => rsp
                .json::<ProductAnswer>()
                .await
                .map(|p| Reserved {
                    price_cents: p.price_cents,
                })
                .map_err(|e| {
                    ReserveError::Unavailable(ApiError::unavailable(
                        "product",
                        format!("the product service answered badly: {e}"),
                    ))
                }),
            404 | 409 => {
                let message = rsp
                    .json::<ErrorBody>()
                    .await
                    .map(|b| b.message)
                    .unwrap_or_else(|_| "refused".to_owned());
                Err(if status == 404 {
                    ReserveError::NotFound(message)
                } else {
                    ReserveError::Insufficient(message)
                })
            }
            _ => {
                let why = match (breaker, proxy_error) {
                    (true, _) => "circuit breaker open".to_owned(),
                    (false, Some(kind)) => format!("sidecar: {kind}"),
                    (false, None) => format!("status {status}"),
                };
                tracing::warn!(dependency = %self.product, status, why, "product service refused a reservation");
                Err(ReserveError::Unavailable(ApiError::unavailable(
                    "product",
                    format!("the product service is unavailable ({why})"),
                )))
            }
        }
    }

    /// Returns `quantity` units of a product: [`Released::Gone`] when the
    /// product service answers that the product does not exist (there is no
    /// stock to return to), a 503 naming `product` for any other failure.
    pub async fn release(
        &self,
        trace: &TraceHeaders,
        product_id: i64,
        quantity: i64,
    ) -> Result<Released, ApiError> {
        let rsp = self.stock(trace, "release", product_id, quantity).await?;
        let status = rsp.status();
        if status.is_success() {
            Ok(Released::Returned)
        } else if status == reqwest::StatusCode::NOT_FOUND
            && rsp
                .json::<ErrorBody>()
                .await
                .is_ok_and(|b| b.code == "not_found")
        {
            Ok(Released::Gone)
        } else {
            Err(ApiError::unavailable(
                "product",
                format!(
                    "the product service did not release stock (status {})",
                    status.as_u16()
                ),
            ))
        }
    }
}
