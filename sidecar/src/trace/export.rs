//! The export queue: finished spans go into a bounded channel; one task
//! batches them to the OTLP exporter.
//!
//! Why not the SDK's `BatchSpanProcessor`: it drops spans when its queue is
//! full too, but only reports the count in a log line at shutdown. A proxy's
//! operator needs that number live, next to the request metrics, so this
//! queue counts every sampled span as `exported`, `dropped` (queue full:
//! the collector is slow or down) or `failed` (the export was refused or
//! timed out) in `trellis_trace_spans_total`. A request only ever pays for
//! a `try_send`: a down collector cannot slow it.

use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// Queue and batch sizes and timing.
#[derive(Clone, Debug)]
pub struct ExportSettings {
    /// Spans held while waiting for export; more are dropped and counted.
    pub queue: usize,
    /// Spans per export call.
    pub batch: usize,
    /// How long a span waits at most before its batch is sent.
    pub interval: Duration,
    /// How long one export call may take.
    pub timeout: Duration,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            queue: 2048,
            batch: 512,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The span processor: hands sampled spans to the export task.
#[derive(Debug)]
pub struct Queue {
    spans: mpsc::Sender<SpanData>,
    metrics: MetricsDebug,
}

/// The way to stop the export task (after a last flush).
#[derive(Clone, Debug)]
pub struct Handle {
    stop: mpsc::Sender<oneshot::Sender<()>>,
}

/// `Metrics` is not `Debug`-printable in a useful way; `SpanProcessor` wants `Debug`.
#[derive(Clone)]
struct MetricsDebug(Metrics);

impl std::fmt::Debug for MetricsDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Starts the export task; returns the processor to install and its handle.
pub fn start<E>(
    mut exporter: E,
    resource: &Resource,
    settings: &ExportSettings,
    metrics: Metrics,
) -> (Queue, Handle)
where
    E: SpanExporter + 'static,
{
    exporter.set_resource(resource);
    let (spans, rx) = mpsc::channel(settings.queue.max(1));
    let (stop, stop_rx) = mpsc::channel(1);
    tokio::spawn(run(
        exporter,
        rx,
        stop_rx,
        settings.clone(),
        metrics.clone(),
    ));
    (
        Queue {
            spans,
            metrics: MetricsDebug(metrics),
        },
        Handle { stop },
    )
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            self.metrics.0.trace_spans("dropped", 1);
        }
    }

    /// Batches leave on their interval and at shutdown ([`Handle::flush_and_stop`]);
    /// a synchronous flush here would block a runtime thread on the network.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

impl Handle {
    /// Sends what is queued and stops the task; waits at most `grace`.
    pub async fn flush_and_stop(&self, grace: Duration) {
        let (done, wait) = oneshot::channel();
        if self.stop.send(done).await.is_ok() {
            let _ = tokio::time::timeout(grace, wait).await;
        }
    }
}

async fn run<E: SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    mut stop: mpsc::Receiver<oneshot::Sender<()>>,
    settings: ExportSettings,
    metrics: Metrics,
) {
    let mut batch = Vec::with_capacity(settings.batch);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            span = spans.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= settings.batch {
                        send(&exporter, &mut batch, &metrics).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => send(&exporter, &mut batch, &metrics).await,
            done = stop.recv() => {
                while let Ok(span) = spans.try_recv() {
                    batch.push(span);
                    if batch.len() >= settings.batch {
                        send(&exporter, &mut batch, &metrics).await;
                    }
                }
                send(&exporter, &mut batch, &metrics).await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
                break;
            }
        }
    }
}

/// Exports one batch and counts the outcome. The exporter's own timeout
/// bounds the wait; meanwhile the queue absorbs (or drops) new spans.
async fn send<E: SpanExporter>(exporter: &E, batch: &mut Vec<SpanData>, metrics: &Metrics) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    match exporter.export(spans).await {
        Ok(()) => metrics.trace_spans("exported", n),
        Err(error) => {
            metrics.trace_spans("failed", n);
            tracing::warn!(%error, spans = n, "trace export failed; spans dropped");
        }
    }
}
