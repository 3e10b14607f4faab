//! Logs and traces.
//!
//! Logs are JSON lines by default (`--log-format text` for people), filtered
//! by `RUST_LOG` or `--log-filter`. Every reconcile runs in a `reconcile` span
//! naming the MicroService, so its log lines carry the name and namespace.
//!
//! With `--otlp-endpoint`, the same spans are exported over OTLP/gRPC
//! through tracing-opentelemetry, so each reconcile is a trace (named
//! `reconcile`, with the MicroService, namespace and generation as
//! attributes and its log lines as events). The batch processor runs on
//! the Tokio runtime: the tonic exporter needs its reactor, which the
//! SDK's default thread-based batch processor does not provide.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource, runtime,
    trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};
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

/// What must live until exit: the trace pipeline, flushed on drop.
#[must_use = "traces are only exported while the guard lives"]
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("could not flush the last reconcile traces: {error}");
        }
    }
}

/// Installs the global subscriber, exporting spans when `otlp_endpoint` is
/// set. Must run inside the Tokio runtime.
pub fn init(format: LogFormat, filter: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<Guard> {
    let filter = EnvFilter::try_new(filter)?;
    let provider = otlp_endpoint.map(provider).transpose()?;
    let traces = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("trellis-operator")));
    let registry = tracing_subscriber::registry().with(filter).with(traces);
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
        tracing::info!(endpoint, "exporting reconcile traces over OTLP/gRPC");
    }
    Ok(Guard(provider))
}

fn provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("cannot set up the OTLP exporter for {endpoint:?}"))?;
    let resource = Resource::builder()
        .with_service_name("trellis-operator")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter, runtime::Tokio).build())
        .with_resource(resource)
        .build())
}
