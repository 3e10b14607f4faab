//! Logs (and, later, traces).
//!
//! Logs are JSON lines by default (`--log-format text` for people), filtered
//! by `RUST_LOG` or `--log-filter`. Every reconcile runs in a `reconcile` span
//! naming the MicroService, so its log lines carry the name and namespace.
//!
//! TODO(issue 6): export those spans over OTLP when `--otlp-endpoint` is set.
//! The opentelemetry, opentelemetry-otlp and tracing-opentelemetry crates
//! are not in the workspace yet, and the sidecar's telemetry (issue 6) will
//! choose their versions; the operator should use the same ones rather than
//! pin a second set. Until then the flag is accepted and a warning logged, so
//! deployments can already set it.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// Installs the global subscriber.
pub fn init(format: LogFormat, filter: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()?,
        LogFormat::Text => registry.with(fmt::layer()).try_init()?,
    }
    if let Some(endpoint) = otlp_endpoint {
        tracing::warn!(
            endpoint,
            "OTLP trace export is not built into this operator yet (issue 6); spans are only logged"
        );
    }
    Ok(())
}
