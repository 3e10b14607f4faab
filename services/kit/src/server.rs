//! Serving: JSON logs, a `/health` route that checks the database, request
//! logging, and graceful shutdown on SIGTERM or Ctrl-C.

use std::{net::SocketAddr, time::Instant};

use axum::serve::{Listener, ListenerExt};
use axum::{
    Json, Router,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use http::StatusCode;
use sqlx::AnyPool;
use tokio::net::{TcpListener, TcpStream};

/// JSON logs on stdout, filtered by `RUST_LOG` (default `info`). Safe to call twice.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .try_init();
}

/// `GET /health`: 200 `{"status":"ok"}` when the database answers, else 503.
pub fn health_routes(pool: AnyPool) -> Router {
    Router::new().route("/health", get(health)).with_state(pool)
}

/// The OpenAPI document of `/health`, for services to merge into theirs.
#[derive(utoipa::OpenApi)]
#[openapi(paths(health))]
pub struct HealthDoc;

/// Whether the service and its database are up.
#[utoipa::path(get, path = "/health", tag = "health", responses(
    (status = 200, description = "The service and its database answer"),
    (status = 503, description = "The database does not answer")))]
pub async fn health(State(pool): State<AnyPool>) -> Response {
    match crate::db::ping(&pool).await {
        Ok(()) => Json(serde_json::json!({"status": "ok", "database": "ok"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health: database unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"status": "unavailable", "database": e.to_string()})),
            )
                .into_response()
        }
    }
}

/// The fallback of every service: a JSON 404 with code `no_route`.
pub async fn no_route() -> crate::ApiError {
    crate::ApiError::new(StatusCode::NOT_FOUND, "no_route", None, "no such route")
}

/// A lazily connecting pool that never connects, for building a router only
/// to read its OpenAPI document.
pub fn unconnected_pool() -> AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .connect_lazy("sqlite::memory:")
        .expect("a lazy pool")
}

/// A middleware that logs each request's method, path, status and duration.
pub async fn log_requests(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let start = Instant::now();
    let rsp = next.run(req).await;
    if path != "/health" {
        tracing::info!(
            %method,
            path,
            status = rsp.status().as_u16(),
            ms = start.elapsed().as_millis() as u64,
            request_id,
            "request"
        );
    }
    rsp
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}

/// The listener [`serve`] accepts on: Nagle's algorithm is off on every
/// connection it accepts (`TCP_NODELAY`). With it on, a gRPC response,
/// which HTTP/2 writes as HEADERS, DATA and trailers, waits between writes
/// for the peer's delayed ACK (40 ms on Linux): every call took 40 ms more.
pub async fn bind(
    addr: SocketAddr,
) -> anyhow::Result<impl Listener<Io = TcpStream, Addr = SocketAddr>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    Ok(listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot turn Nagle's algorithm off on a connection");
        }
    }))
}

/// Serves `app` (HTTP/1.1 and h2c on one port) on `addr` until SIGTERM.
/// Services pass [`crate::Config::listen_addr`], loopback unless configured
/// otherwise, so the sidecar is the pod's only way in.
pub async fn serve(app: Router, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_acks() {
        let mut listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(TcpStream::connect(addr));
        let (accepted, _) = listener.accept().await;
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY is off");
        drop(client.await.unwrap().unwrap());
    }

    /// 127.0.0.2 is a loopback address too on Linux (127.0.0.0/8), so a
    /// connection there is refused only when the server bound 127.0.0.1
    /// alone, not the wildcard address every interface answers on.
    #[tokio::test]
    async fn serves_on_loopback_only_by_default() {
        if std::env::var_os("LISTEN_ADDR").is_some() {
            panic!("unset LISTEN_ADDR to run this test: it checks the default");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // The address a service listens on when nothing is configured.
        let cfg = crate::Config::load("t", std::env::temp_dir().join("kit-no-config")).unwrap();
        let addr = SocketAddr::new(cfg.listen, port);
        let app = Router::new().route("/", get(|| async { "ok" }));
        let server = tokio::spawn(serve(app, addr));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the server did not listen on 127.0.0.1:{port}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let other = TcpStream::connect(("127.0.0.2", port)).await;
        server.abort();
        assert!(
            other.is_err(),
            "the server answers on 127.0.0.2:{port}, so it listens beyond 127.0.0.1"
        );
    }
}
