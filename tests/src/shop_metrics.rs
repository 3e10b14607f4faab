//! Reading the sidecars' Prometheus text (admin `/metrics`, see
//! `sidecar/src/metrics.rs`): a small parser, sums over label subsets, deltas
//! between two scrapes, latency quantiles from histogram buckets, and the
//! per-service table the demo prints and the end-to-end suite checks.

use std::{collections::BTreeMap, fmt::Write, time::Duration};

/// Requests proxied, by `direction`, `service` and `status_class`.
pub const REQUESTS: &str = "trellis_requests_total";
/// The latency histogram's buckets, by `direction`, `service` and `le`.
pub const LATENCY_BUCKET: &str = "trellis_request_duration_seconds_bucket";
/// Requests the proxy answered itself, by `direction`, `service` and `kind`.
pub const PROXY_ERRORS: &str = "trellis_proxy_errors_total";
/// gRPC calls by `direction`, `service` and `grpc_code` (its name).
pub const GRPC_RESPONSES: &str = "trellis_grpc_responses_total";
/// 1 for the state each dependency's breaker is in, by `service` and `state`.
pub const BREAKER_STATE: &str = "trellis_circuit_breaker_state";
/// Breaker state changes, by `service`, `from` and `to`.
pub const BREAKER_TRANSITIONS: &str = "trellis_circuit_breaker_transitions_total";
/// How many policies the sidecar has applied since it started.
pub const POLICY_GENERATION: &str = "trellis_policy_generation";
/// Inbound requests refused with 429, by `service`.
pub const RATE_LIMITED: &str = "trellis_inbound_rate_limited_total";

/// One sample: a metric name, its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The series name as exposed (`trellis_requests_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    /// The samples, in the order exposed.
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the Prometheus / OpenMetrics text format. Comments and lines it
    /// cannot read are skipped; a test then fails on the missing series, naming it.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Self { samples }
    }

    /// The sum of every sample of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The samples of `name` whose labels include `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// `after - before` for every sample of `after` (a counter the sidecar
    /// restarted would go negative; a missing `before` sample counts as 0).
    pub fn delta(before: &Scrape, after: &Scrape) -> Scrape {
        let samples = after
            .samples
            .iter()
            .map(|s| {
                let old = before
                    .samples
                    .iter()
                    .find(|b| b.name == s.name && b.labels == s.labels)
                    .map_or(0.0, |b| b.value);
                Sample {
                    value: s.value - old,
                    ..s.clone()
                }
            })
            .collect();
        Scrape { samples }
    }

    /// Adds up several scrapes (the pods of one service) series by series.
    pub fn merge<'a>(scrapes: impl IntoIterator<Item = &'a Scrape>) -> Scrape {
        let mut merged: Vec<Sample> = Vec::new();
        for scrape in scrapes {
            for s in &scrape.samples {
                match merged
                    .iter_mut()
                    .find(|m| m.name == s.name && m.labels == s.labels)
                {
                    Some(m) => m.value += s.value,
                    None => merged.push(s.clone()),
                }
            }
        }
        Scrape { samples: merged }
    }

    /// The `q` quantile (0..1) of a latency histogram, from its cumulative
    /// buckets: the upper bound of the first bucket holding it, as Prometheus'
    /// `histogram_quantile` would bound it. `None` without observations.
    pub fn quantile(&self, q: f64, labels: &[(&str, &str)]) -> Option<Duration> {
        let mut buckets: Vec<(f64, f64)> = self
            .matching(LATENCY_BUCKET, labels)
            .filter_map(|s| {
                let le = s.labels.get("le")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, s.value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Several series (e.g. one per pod, merged) share bounds: add them up.
        buckets.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 += b.1;
                true
            } else {
                false
            }
        });
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (bound, _) = buckets.iter().find(|(_, count)| *count >= rank)?;
        // Past the largest finite bucket there is no bound: report the largest.
        let bound = if bound.is_infinite() {
            buckets
                .iter()
                .rev()
                .find(|(b, _)| b.is_finite())
                .map_or(0.0, |(b, _)| *b)
        } else {
            *bound
        };
        Some(Duration::from_secs_f64(bound))
    }
}

/// `name{k="v",...} value [timestamp]` or `name value`.
fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

/// `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(labels);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_owned(), value);
    }
}

/// One row of the per-service table: what a service's sidecars saw over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// `order`, or `order → product` for a dependency seen from the caller's sidecars.
    pub what: String,
    /// Requests in the window.
    pub requests: f64,
    /// Requests per second over the window.
    pub rate: f64,
    /// Share of requests not answered 5xx (0 to 1); `None` without requests.
    pub success: Option<f64>,
    /// Median latency (bucket bound).
    pub p50: Option<Duration>,
    /// 99th percentile latency (bucket bound).
    pub p99: Option<Duration>,
}

impl Row {
    /// The row of `direction`/`service` in the merged delta of a service's pods.
    pub fn of(
        what: impl Into<String>,
        delta: &Scrape,
        direction: &str,
        service: &str,
        window: Duration,
    ) -> Self {
        let labels = [("direction", direction), ("service", service)];
        let requests = delta.sum(REQUESTS, &labels);
        let failed = delta.sum(
            REQUESTS,
            &[
                ("direction", direction),
                ("service", service),
                ("status_class", "5xx"),
            ],
        );
        Self {
            what: what.into(),
            requests,
            rate: requests / window.as_secs_f64().max(0.001),
            success: (requests > 0.0).then(|| (requests - failed) / requests),
            p50: delta.quantile(0.5, &labels),
            p99: delta.quantile(0.99, &labels),
        }
    }
}

/// The rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let ms = |d: Option<Duration>| {
        d.map_or("-".to_owned(), |d| {
            format!("≤{:.1} ms", d.as_secs_f64() * 1000.0)
        })
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>9} {:>9} {:>9} {:>11} {:>11}",
        "service", "requests", "req/s", "success", "p50", "p99"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<20} {:>9} {:>9.1} {:>9} {:>11} {:>11}",
            r.what,
            r.requests,
            r.rate,
            r.success
                .map_or("-".to_owned(), |s| format!("{:.1}%", s * 100.0)),
            ms(r.p50),
            ms(r.p99),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP trellis_requests Requests proxied
# TYPE trellis_requests counter
trellis_requests_total{direction="inbound",service="order",status_class="2xx"} 8
trellis_requests_total{direction="inbound",service="order",status_class="5xx"} 2
trellis_requests_total{direction="outbound",service="product.shop",status_class="2xx"} 5
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="0.001"} 1
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="0.002"} 6
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="0.004"} 9
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="+Inf"} 10
trellis_policy_generation 3
weird{a="x\"y,z"} 1
# EOF
"#;

    #[test]
    fn parses_names_labels_escapes_and_values() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.samples.len(), 9);
        assert_eq!(s.sum(REQUESTS, &[("service", "order")]), 10.0);
        assert_eq!(
            s.sum(
                REQUESTS,
                &[("direction", "outbound"), ("status_class", "2xx")]
            ),
            5.0
        );
        assert_eq!(s.sum(POLICY_GENERATION, &[]), 3.0);
        assert_eq!(s.samples[8].labels["a"], "x\"y,z");
        assert_eq!(s.sum("absent", &[]), 0.0);
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let s = Scrape::parse(TEXT);
        let l = [("direction", "inbound"), ("service", "order")];
        assert_eq!(s.quantile(0.5, &l), Some(Duration::from_millis(2)));
        assert_eq!(s.quantile(0.9, &l), Some(Duration::from_millis(4)));
        // The 10th observation is past every finite bucket: the largest bound is reported.
        assert_eq!(s.quantile(1.0, &l), Some(Duration::from_millis(4)));
        assert_eq!(s.quantile(0.5, &[("service", "nobody")]), None);
    }

    #[test]
    fn deltas_merges_and_rows() {
        let before = Scrape::parse(TEXT);
        let after = Scrape::parse(&TEXT.replace("} 8", "} 18").replace("} 2\n", "} 4\n"));
        let d = Scrape::delta(&before, &after);
        assert_eq!(d.sum(REQUESTS, &[("service", "order")]), 12.0);
        let two = Scrape::merge([&d, &d]);
        assert_eq!(two.sum(REQUESTS, &[("service", "order")]), 24.0);
        let row = Row::of("order", &d, "inbound", "order", Duration::from_secs(4));
        assert_eq!(row.requests, 12.0);
        assert_eq!(row.rate, 3.0);
        assert_eq!(row.success, Some(10.0 / 12.0));
        let text = table(&[row]);
        assert!(text.contains("83.3%"), "{text}");
    }
}
