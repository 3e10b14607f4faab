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
//!
//! The sampling decision comes first ([`Tracing::decide`]) and costs no
//! allocation; only a sampled request pays for a span. An unsampled one
//! either passes its caller's unsampled `traceparent` through untouched, or,
//! when it starts the trace, gets a fresh unsampled `traceparent` written
//! from a stack buffer, so the sidecars after it agree not to sample.

pub mod client;
pub mod export;
pub mod propagation;
pub mod sampler;
pub mod server;
pub mod span;

use std::{cell::Cell, time::Duration};

use anyhow::Context as _;
use http::HeaderMap;
use opentelemetry::{
    Context, KeyValue,
    trace::{SpanBuilder, SpanId, TraceId, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{IdGenerator, Sampler, SdkTracer, SdkTracerProvider, Span},
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
    /// The ratio for requests that start a trace (the provider's root sampler too).
    ratio: Option<PolicyRatio>,
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
            .with_sampler(Sampler::ParentBased(Box::new(ratio.clone())))
            .with_id_generator(DecidedIds)
            .with_resource(resource)
            .build();
        tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
        Ok(Self::with_provider(provider, ratio, Some(handle)))
    }

    fn with_provider(
        provider: SdkTracerProvider,
        ratio: PolicyRatio,
        exporter: Option<export::Handle>,
    ) -> Self {
        Self {
            tracer: Some(provider.tracer("trellis-sidecar")),
            ratio: Some(ratio),
            exporter,
            _provider: Some(provider),
        }
    }

    /// Decides whether a request gets a span, before any span work.
    ///
    /// - tracing off, or a caller whose valid `traceparent` is unsampled
    ///   (parent-based sampling follows it): `None`, headers untouched;
    /// - no valid `traceparent`: a new trace id, sampled at the policy's
    ///   ratio. Unsampled: a fresh `traceparent` with the sampled flag off
    ///   replaces whatever was there (and a `tracestate` that belonged to a
    ///   malformed parent goes), and `None`;
    /// - otherwise the request is sampled: [`Sampled::start`] builds its span.
    pub fn decide(&self, headers: &mut HeaderMap) -> Option<Sampled<'_>> {
        let tracer = self.tracer.as_ref()?;
        let parent = headers
            .get(propagation::TRACEPARENT)
            .and_then(|v| propagation::parse_traceparent(v.as_bytes()));
        match parent {
            Some(p) if p.sampled => Some(Sampled { tracer, root: None }),
            Some(_) => None,
            None => {
                let trace_id = new_trace_id();
                if self.ratio.as_ref().is_some_and(|r| r.samples(trace_id)) {
                    return Some(Sampled {
                        tracer,
                        root: Some(trace_id),
                    });
                }
                headers.insert(
                    propagation::TRACEPARENT,
                    propagation::traceparent(trace_id, new_span_id(), false),
                );
                headers.remove(propagation::TRACESTATE);
                None
            }
        }
    }

    /// The tracer, when tracing is on.
    #[cfg(test)]
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

/// A request the sampler kept: the span to build.
#[derive(Debug)]
pub struct Sampled<'a> {
    tracer: &'a SdkTracer,
    /// The trace id the decision was made on, when the request starts a trace.
    root: Option<TraceId>,
}

impl Sampled<'_> {
    /// Starts the span under `parent` (the request's extracted context). A
    /// new trace gets the id it was sampled on, so the SDK's sampler, which
    /// sees the same id, agrees.
    pub fn start(self, builder: SpanBuilder, parent: &Context) -> Span {
        NEXT_TRACE_ID.set(self.root);
        let span = builder.start_with_context(self.tracer, parent);
        NEXT_TRACE_ID.set(None);
        span
    }
}

thread_local! {
    /// The trace id [`Sampled::start`] hands to [`DecidedIds`] for the root
    /// span it is building on this thread (building a span is synchronous).
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// The provider's ids: random, except the trace id of a root span whose
/// sampling [`Tracing::decide`] already decided.
#[derive(Debug)]
struct DecidedIds;

impl IdGenerator for DecidedIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID.take().unwrap_or_else(new_trace_id)
    }

    fn new_span_id(&self) -> SpanId {
        new_span_id()
    }
}

fn new_trace_id() -> TraceId {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return TraceId::from(id);
        }
    }
}

fn new_span_id() -> SpanId {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return SpanId::from(id);
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

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _};

    use super::*;

    fn tracing(ratio: f64) -> Tracing {
        let ratio = PolicyRatio::Fixed(ratio);
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(ratio.clone())))
            .with_id_generator(DecidedIds)
            .build();
        Tracing::with_provider(provider, ratio, None)
    }

    const UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn an_unsampled_caller_passes_through_untouched() {
        let t = tracing(1.0);
        let mut h = HeaderMap::new();
        h.insert("traceparent", UNSAMPLED.parse().unwrap());
        h.insert("tracestate", "vendor=x".parse().unwrap());
        assert!(t.decide(&mut h).is_none());
        assert_eq!(h["traceparent"], UNSAMPLED);
        assert_eq!(h["tracestate"], "vendor=x");
    }

    #[test]
    fn a_new_unsampled_trace_gets_a_fresh_unsampled_parent() {
        let t = tracing(0.0);
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-garbage-01".parse().unwrap());
        h.insert("tracestate", "vendor=x".parse().unwrap());
        assert!(t.decide(&mut h).is_none());
        let p = propagation::parse_traceparent(h["traceparent"].as_bytes()).unwrap();
        assert!(!p.sampled);
        assert!(h.get("tracestate").is_none());
        // The sidecar after it follows the unsampled parent.
        assert!(t.decide(&mut h).is_none());
    }

    #[test]
    fn a_sampled_root_span_has_the_trace_id_it_was_sampled_on() {
        let t = tracing(1.0);
        let mut h = HeaderMap::new();
        let sampled = t.decide(&mut h).expect("ratio 1 samples");
        let root = sampled.root.expect("no parent: a root");
        let tracer = t.tracer().unwrap();
        let span = sampled.start(
            tracer.span_builder("GET").with_kind(SpanKind::Server),
            &Context::new(),
        );
        let cx = Context::new().with_span(span);
        let sc = cx.span().span_context().clone();
        assert_eq!(sc.trace_id(), root);
        assert!(sc.is_sampled());
        // Spans outside `start` get random trace ids again.
        let other = tracer.start("other");
        assert_ne!(
            opentelemetry::trace::Span::span_context(&other).trace_id(),
            root
        );
    }

    #[test]
    fn a_sampled_caller_is_followed_whatever_the_ratio() {
        let t = tracing(0.0);
        let mut h = HeaderMap::new();
        h.insert("traceparent", SAMPLED.parse().unwrap());
        let sampled = t.decide(&mut h).expect("a sampled parent is followed");
        assert!(sampled.root.is_none());
        let parent = propagation::extract(&h);
        let span = sampled.start(t.tracer().unwrap().span_builder("GET"), &parent);
        let cx = parent.with_span(span);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn tracing_off_decides_nothing() {
        let mut h = HeaderMap::new();
        assert!(Tracing::disabled().decide(&mut h).is_none());
        assert!(h.is_empty());
    }
}
