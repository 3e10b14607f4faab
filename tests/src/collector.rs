//! A real OpenTelemetry Collector (the pinned build from `cargo xtask tools`)
//! receiving OTLP/gRPC and writing what it receives as JSON lines, and a
//! reader of those lines for assertions.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{cached_tool, free_port};

/// A running collector; killed on drop.
pub struct Collector {
    /// Its OTLP/gRPC endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    output: PathBuf,
    child: Child,
    _dir: TempDir,
}

/// A folder removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Collector {
    /// Starts a collector listening on `host` (loopback for in-process
    /// sidecars, the node address for pods) and waits until it accepts.
    pub fn start(host: [u8; 4]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "trellis-otelcol-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port(host);
        let listen = SocketAddr::from((host, port));
        let output = dir.join("traces.jsonl");
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                r#"receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {listen}
exporters:
  file:
    path: {output}
    flush_interval: 100ms
service:
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
"#,
                output = output.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("otelcol.log")).unwrap();
        let child = Command::new(cached_tool("otelcol", "otelcol"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the OpenTelemetry Collector (cargo xtask tools builds it)");
        let mut collector = Self {
            endpoint: format!("http://{listen}"),
            output,
            child,
            _dir: TempDir(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(listen).is_err() {
            if let Ok(Some(status)) = collector.child.try_wait() {
                panic!("the collector exited ({status}): {}", collector.log());
            }
            assert!(
                Instant::now() < deadline,
                "the collector did not listen on {listen} in 30 s: {}",
                collector.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        collector
    }

    /// What the collector logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.0.join("otelcol.log")).unwrap_or_default()
    }

    /// Every span the collector has written so far.
    pub fn spans(&self) -> Vec<SpanRecord> {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        // Only whole lines: the exporter may be writing the last one.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .flat_map(|line| {
                let v: Value =
                    serde_json::from_str(line).expect("the file exporter writes JSON lines");
                SpanRecord::from_request(&v)
            })
            .collect()
    }

    /// Waits (up to `timeout`) until `enough` holds of the spans written, and returns them.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        enough: impl Fn(&[SpanRecord]) -> bool,
    ) -> Vec<SpanRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if enough(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the collector did not receive the expected spans in {timeout:?}; it has {} spans:\n{}\ncollector log:\n{}",
                spans.len(),
                spans
                    .iter()
                    .map(|s| format!("  {s}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// OTLP span kinds.
pub const SERVER: i64 = 2;
/// OTLP span kinds.
pub const CLIENT: i64 = 3;

/// One span as the collector wrote it (OTLP JSON), flattened for assertions.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    /// `service.name` of its resource.
    pub service: String,
    /// Every resource attribute, as strings.
    pub resource: HashMap<String, String>,
    /// Hex trace id.
    pub trace_id: String,
    /// Hex span id.
    pub span_id: String,
    /// Hex parent span id, empty for a root.
    pub parent: String,
    /// The span name.
    pub name: String,
    /// OTLP kind: [`SERVER`], [`CLIENT`].
    pub kind: i64,
    /// Attributes, as strings.
    pub attributes: HashMap<String, String>,
    /// Event names.
    pub events: Vec<String>,
    /// Status code: 0 unset, 1 ok, 2 error.
    pub status: i64,
}

impl std::fmt::Display for SpanRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} kind={} trace={} span={} parent={} status={} events={:?} peer={:?}",
            self.service,
            self.name,
            self.kind,
            self.trace_id,
            self.span_id,
            self.parent,
            self.status,
            self.events,
            self.attributes.get("peer.service")
        )
    }
}

/// An OTLP `AnyValue` in JSON as a string.
fn any_value(v: &Value) -> String {
    for key in ["stringValue", "intValue", "boolValue", "doubleValue"] {
        if let Some(x) = v.get(key) {
            return match x {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
        }
    }
    v.to_string()
}

fn attributes(v: &Value) -> HashMap<String, String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| Some((kv["key"].as_str()?.to_owned(), any_value(&kv["value"]))))
        .collect()
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

impl SpanRecord {
    /// The spans of one `ExportTraceServiceRequest` line.
    fn from_request(v: &Value) -> Vec<Self> {
        let mut out = Vec::new();
        for rs in v["resourceSpans"].as_array().into_iter().flatten() {
            let resource = attributes(&rs["resource"]["attributes"]);
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    out.push(Self {
                        service: service.clone(),
                        resource: resource.clone(),
                        trace_id: s["traceId"].as_str().unwrap_or_default().to_owned(),
                        span_id: s["spanId"].as_str().unwrap_or_default().to_owned(),
                        parent: s["parentSpanId"].as_str().unwrap_or_default().to_owned(),
                        name: s["name"].as_str().unwrap_or_default().to_owned(),
                        kind: int(&s["kind"]),
                        attributes: attributes(&s["attributes"]),
                        events: s["events"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|e| e["name"].as_str().map(str::to_owned))
                            .collect(),
                        status: int(&s["status"]["code"]),
                    });
                }
            }
        }
        out
    }
}
