//! Reading the sidecars' Prometheus text (admin `/metrics`, see
//! `sidecar/src/metrics.rs`) in the suites: sums over label subsets, deltas
//! between two scrapes, and latency quantiles as bucket bounds (an upper
//! bound a test can assert against). The text is parsed by the CLI's parser
//! (`trellis_cli::scrape`), the one `trellis stat` uses.

use std::time::Duration;

pub use trellis_cli::scrape::Sample;

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

/// Every sample of one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    /// The samples, in the order exposed.
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the Prometheus text format. Comments and lines it cannot read
    /// are skipped; a test then fails on the missing series, naming it.
    pub fn parse(text: &str) -> Self {
        Self {
            samples: trellis_cli::scrape::parse(text),
        }
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
    fn deltas_and_merges() {
        let before = Scrape::parse(TEXT);
        let after = Scrape::parse(&TEXT.replace("} 8", "} 18").replace("} 2\n", "} 4\n"));
        let d = Scrape::delta(&before, &after);
        assert_eq!(d.sum(REQUESTS, &[("service", "order")]), 12.0);
        let two = Scrape::merge([&d, &d]);
        assert_eq!(two.sum(REQUESTS, &[("service", "order")]), 24.0);
    }
}
