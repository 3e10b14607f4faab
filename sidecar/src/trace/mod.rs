//! Distributed tracing, done for the application.
//!
//! - [`propagation`]: W3C `traceparent`/`tracestate` and `baggage` read from
//!   requests and written onto them;
//! - [`server`]: one server span per inbound request, whose context the app
//!   receives (and copies onto its own outgoing calls);
//! - [`client`]: one client span per outbound *try*, so retries show as
//!   sibling spans under the app's server span;
//! - [`sampler`]: parent-based sampling at the ratio the policy sets, changed
//!   live with the policy;
//! - [`export`]: a bounded queue in front of the OTLP exporter that drops and
//!   counts rather than ever making a request wait.
//!
//! Without an OTLP endpoint there is no tracer: requests pass through with
//! their trace headers untouched.

pub mod client;
pub mod export;
pub mod propagation;
pub mod sampler;
pub mod server;
pub mod span;

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracer, SdkTracerProvider},
};
use tokio::sync::watch;

use crate::{metrics::Metrics, policy_watch::PolicyState};
pub use export::ExportSettings;
use sampler::PolicyRatio;

/// Where spans go and who they describe.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// The OTLP/gRPC endpoint (`http://collector:4317`); `None` turns tracing off.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans.
    pub service: String,
    /// `k8s.namespace.name` (and `service.namespace`).
    pub namespace: String,
    /// `k8s.pod.name`.
    pub pod: Option<String>,
    /// `service.version`.
    pub version: Option<String>,
    /// Queue, batch and export timing.
    pub export: ExportSettings,
}

/// The tracer the stacks use, or nothing when tracing is off. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tracing {
    tracer: Option<SdkTracer>,
    exporter: Option<export::Handle>,
    /// Kept so the provider lives as long as any stack.
    _provider: Option<SdkTracerProvider>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing")
            .field("enabled", &self.tracer.is_some())
            .finish()
    }
}

impl Tracing {
    /// Tracing off: spans are never made, headers pass through untouched.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the exporter and the tracer when an endpoint is configured, and
    /// follows the policy's sample ratio. Must run inside the Tokio runtime.
    pub fn start(
        config: &TraceConfig,
        policy: watch::Receiver<PolicyState>,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(Self::disabled());
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(config.export.timeout)
            .build()
            .with_context(|| format!("cannot set up the OTLP exporter for {endpoint:?}"))?;
        let resource = resource(config);
        let (queue, handle) = export::start(exporter, &resource, &config.export, metrics);
        let ratio = PolicyRatio::following(policy);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .with_sampler(Sampler::ParentBased(Box::new(ratio)))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("trellis-sidecar");
        tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
        Ok(Self {
            tracer: Some(tracer),
            exporter: Some(handle),
            _provider: Some(provider),
        })
    }

    /// The tracer, when tracing is on.
    pub fn tracer(&self) -> Option<&SdkTracer> {
        self.tracer.as_ref()
    }

    /// Exports what is queued and stops the exporter (at shutdown), waiting
    /// at most `grace`.
    pub async fn flush(&self, grace: Duration) {
        if let Some(handle) = &self.exporter {
            handle.flush_and_stop(grace).await;
        }
    }
}

/// The resource every span carries: who made it.
fn resource(config: &TraceConfig) -> Resource {
    let mut attributes = vec![
        KeyValue::new("service.namespace", config.namespace.clone()),
        KeyValue::new("k8s.namespace.name", config.namespace.clone()),
    ];
    if let Some(pod) = &config.pod {
        attributes.push(KeyValue::new("k8s.pod.name", pod.clone()));
    }
    if let Some(version) = &config.version {
        attributes.push(KeyValue::new("service.version", version.clone()));
    }
    Resource::builder()
        .with_service_name(config.service.clone())
        .with_attributes(attributes)
        .build()
}
