//! `trellis stat`: per MicroService, the golden metrics from its sidecars'
//! own counters — requests per second, success rate (not 5xx), p50/p95/p99
//! latency, inbound and per dependency, with breaker states and retries.
//! Two scrapes of every pod's `/metrics`, `--interval` apart, through the
//! apiserver's pod proxy; the rows are what happened between them.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use kube::{Api, Client, ResourceExt, api::ListParams};
use serde::Serialize;
use trellis_operator::MicroService;

use crate::{
    scrape::{self, Sample},
    sidecars,
};

/// `trellis stat`'s options.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only this MicroService.
    pub microservice: Option<String>,
    /// The namespace (the kubeconfig's by default).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Seconds between the two scrapes the rates come from.
    #[arg(long, default_value_t = 5)]
    pub interval: u64,
    /// Refresh every interval until interrupted.
    #[arg(short, long)]
    pub watch: bool,
    /// `table` or `json` (one array of rows).
    #[arg(short, long, default_value = "table")]
    pub output: String,
}

/// One row: one direction of one MicroService, or one of its dependencies.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// The MicroService's namespace.
    pub namespace: String,
    /// The MicroService.
    pub microservice: String,
    /// `inbound`, or `outbound` for a dependency.
    pub direction: String,
    /// The service called (`name.namespace`), or the MicroService itself inbound.
    pub peer: String,
    /// Requests per second.
    pub rps: f64,
    /// The share of requests not answered 5xx (none when there were none).
    pub success: Option<f64>,
    /// Latency quantiles to the response headers, in milliseconds.
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Retries sent per second (outbound).
    pub retries_per_second: f64,
    /// Breaker states over the pods (`closed`, `open 1/2`...), outbound.
    pub breaker: String,
}

/// Prints the rows once, or every interval with `--watch`.
pub async fn run(opts: Options) -> anyhow::Result<bool> {
    let client = crate::client().await?;
    loop {
        let rows = rows(&client, &opts).await?;
        if opts.output == "json" {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", table(&rows));
        }
        if !opts.watch {
            return Ok(true);
        }
        println!();
    }
}

/// Scrapes every pod of every MicroService in scope twice and computes the rows.
pub async fn rows(client: &Client, opts: &Options) -> anyhow::Result<Vec<Row>> {
    let api = if opts.all_namespaces {
        Api::<MicroService>::all(client.clone())
    } else {
        let ns = opts
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Api::<MicroService>::namespaced(client.clone(), &ns)
    };
    let mut targets = Vec::new();
    for ms in api
        .list(&ListParams::default())
        .await
        .context("listing MicroServices")?
    {
        if opts
            .microservice
            .as_ref()
            .is_some_and(|m| *m != ms.name_any())
        {
            continue;
        }
        let ns = ms.namespace().unwrap_or_default();
        let pods = sidecars::pods(client, &ns, &ms.name_any()).await?;
        targets.push((ns, ms.name_any(), pods));
    }
    if let Some(m) = &opts.microservice
        && targets.is_empty()
    {
        anyhow::bail!("no MicroService {m} here: kubectl get microservices lists them");
    }
    let scrape_all = |targets: &Vec<(String, String, Vec<_>)>| {
        let client = client.clone();
        let targets = targets.clone();
        // Every pod at once, so the scrapes of one round are close in time
        // and a round takes one round trip, not one per pod.
        async move {
            futures::future::join_all(targets.iter().map(|(_, _, pods)| async {
                let texts = futures::future::join_all(
                    pods.iter()
                        .map(|pod| sidecars::admin_get(&client, pod, "/metrics")),
                )
                .await;
                texts
                    .into_iter()
                    .flatten()
                    .flat_map(|text| scrape::parse(&text))
                    .collect::<Vec<_>>()
            }))
            .await
        }
    };
    let first = scrape_all(&targets).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.interval.max(1))).await;
    let second = scrape_all(&targets).await;
    let seconds = started.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for (((ns, name, _), before), after) in targets.iter().zip(&first).zip(&second) {
        rows.extend(compute(ns, name, before, after, seconds));
    }
    Ok(rows)
}

/// The sum over pods of the samples named `name`, by the labels `key` picks.
fn sums<K: Ord>(
    samples: &[Sample],
    name: &str,
    key: impl Fn(&Sample) -> Option<K>,
) -> BTreeMap<K, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        if let Some(k) = key(s) {
            *out.entry(k).or_default() += s.value;
        }
    }
    out
}

/// A series by direction, service and one more label (status class, bucket bound).
type SeriesKey = (String, String, String);

/// The rows of one MicroService from the samples of its pods at two times
/// `seconds` apart (counters summed over pods; a counter that went down —
/// a restarted pod — counts from zero).
pub fn compute(
    ns: &str,
    name: &str,
    before: &[Sample],
    after: &[Sample],
    seconds: f64,
) -> Vec<Row> {
    let delta = |metric: &str, key: &dyn Fn(&Sample) -> Option<SeriesKey>| {
        let (b, a) = (sums(before, metric, key), sums(after, metric, key));
        a.into_iter()
            .map(|(k, v)| {
                let was = b.get(&k).copied().unwrap_or(0.0);
                (k, if v >= was { v - was } else { v })
            })
            .collect::<BTreeMap<_, _>>()
    };
    let requests = delta("trellis_requests_total", &|s| {
        Some((
            s.label("direction").into(),
            s.label("service").into(),
            s.label("status_class").into(),
        ))
    });
    let buckets = delta("trellis_request_duration_seconds_bucket", &|s| {
        Some((
            s.label("direction").into(),
            s.label("service").into(),
            s.label("le").into(),
        ))
    });
    let retries = delta("trellis_retries_total", &|s| {
        Some(("outbound".into(), s.label("service").into(), String::new()))
    });
    let breakers = sums(after, "trellis_circuit_breaker_state", |s| {
        (s.value > 0.0).then(|| (s.label("service").to_owned(), s.label("state").to_owned()))
    });
    let mut peers: BTreeMap<(String, String), ()> = BTreeMap::new();
    for (d, s, _) in requests.keys() {
        peers.insert((d.clone(), s.clone()), ());
    }
    peers
        .into_keys()
        .map(|(direction, peer)| {
            let of = |m: &BTreeMap<SeriesKey, f64>| {
                m.iter()
                    .filter(|((d, s, _), _)| *d == direction && *s == peer)
                    .map(|((_, _, k), v)| (k.clone(), *v))
                    .collect::<Vec<_>>()
            };
            let by_class = of(&requests);
            let total = add_up(by_class.iter().map(|(_, v)| *v));
            let failed = add_up(by_class.iter().filter(|(c, _)| c == "5xx").map(|(_, v)| *v));
            let hist: Vec<(f64, f64)> = of(&buckets)
                .into_iter()
                .filter_map(|(le, v)| {
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    };
                    Some((le, v))
                })
                .collect();
            let q = |q| scrape::quantile(q, &hist).map(|s| s * 1000.0);
            let retried = add_up(of(&retries).iter().map(|(_, v)| *v));
            let states: Vec<String> = breakers
                .iter()
                .filter(|((s, _), _)| *s == peer && direction == "outbound")
                .map(|((_, state), n)| format!("{state} {n}"))
                .collect();
            Row {
                namespace: ns.to_owned(),
                microservice: name.to_owned(),
                direction: direction.clone(),
                peer: peer.clone(),
                rps: total / seconds,
                success: (total > 0.0).then(|| (total - failed) / total),
                p50_ms: q(0.5),
                p95_ms: q(0.95),
                p99_ms: q(0.99),
                retries_per_second: retried / seconds,
                breaker: if states.is_empty() {
                    "-".into()
                } else {
                    states.join(", ")
                },
            }
        })
        .collect()
}

/// The sum of `values`, 0 for none. (`Iterator::sum` of no `f64` is −0.0,
/// which a table prints as `-0.00`.)
fn add_up(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |sum, v| sum + v)
}

/// The rows as a table, one line each.
pub fn table(rows: &[Row]) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}ms"));
    let mut out = format!(
        "{:<12} {:<12} {:<9} {:<28} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}  {}\n",
        "NAMESPACE",
        "NAME",
        "DIRECTION",
        "PEER",
        "RPS",
        "SUCCESS",
        "P50",
        "P95",
        "P99",
        "RETRY/S",
        "BREAKER"
    );
    for r in rows {
        out += &format!(
            "{:<12} {:<12} {:<9} {:<28} {:>8.1} {:>8} {:>9} {:>9} {:>9} {:>8.2}  {}\n",
            r.namespace,
            r.microservice,
            r.direction,
            r.peer,
            r.rps,
            r.success
                .map_or("-".into(), |s| format!("{:.2}%", s * 100.0)),
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            r.retries_per_second,
            r.breaker
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(text: &str) -> Vec<Sample> {
        scrape::parse(text)
    }

    #[test]
    fn rates_success_and_latency_between_two_scrapes() {
        let before = scrape(
            r#"trellis_requests_total{direction="inbound",service="order",status_class="2xx"} 100
trellis_requests_total{direction="outbound",service="user.shop",status_class="2xx"} 10
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="0.01"} 100
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="0.02"} 100
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="+Inf"} 100
"#,
        );
        // Two pods' worth after 10 s: 200 more inbound (10 of them 5xx), all
        // under 10 ms but 20 under 20 ms; user: 30 more, 5 retries, a pod's breaker open.
        let after = scrape(
            r#"trellis_requests_total{direction="inbound",service="order",status_class="2xx"} 190
trellis_requests_total{direction="inbound",service="order",status_class="2xx"} 100
trellis_requests_total{direction="inbound",service="order",status_class="5xx"} 10
trellis_requests_total{direction="outbound",service="user.shop",status_class="2xx"} 40
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="0.01"} 280
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="0.02"} 300
trellis_request_duration_seconds_bucket{direction="inbound",service="order",le="+Inf"} 300
trellis_retries_total{service="user.shop",reason="5xx"} 5
trellis_circuit_breaker_state{service="user.shop",state="open"} 1
trellis_circuit_breaker_state{service="user.shop",state="closed"} 1
trellis_circuit_breaker_state{service="user.shop",state="half-open"} 0
"#,
        );
        let rows = compute("shop", "order", &before, &after, 10.0);
        assert_eq!(rows.len(), 2);
        let inbound = &rows[0];
        assert_eq!(
            (inbound.direction.as_str(), inbound.peer.as_str()),
            ("inbound", "order")
        );
        assert!((inbound.rps - 20.0).abs() < 1e-9);
        assert!((inbound.success.unwrap() - 0.95).abs() < 1e-9);
        // 200 observations: 180 under 10 ms, 20 in 10-20 ms.
        assert!((inbound.p50_ms.unwrap() - 10.0 * 100.0 / 180.0).abs() < 1e-6);
        assert!((inbound.p99_ms.unwrap() - (10.0 + 10.0 * 18.0 / 20.0)).abs() < 1e-6);
        let user = &rows[1];
        assert_eq!(user.peer, "user.shop");
        assert!((user.rps - 3.0).abs() < 1e-9);
        assert!((user.retries_per_second - 0.5).abs() < 1e-9);
        assert_eq!(user.breaker, "closed 1, open 1");
        assert_eq!(user.p50_ms, None);
        assert!(table(&rows).contains("95.00%"));
    }

    #[test]
    fn no_retries_read_zero_not_minus_zero() {
        let text = r#"trellis_requests_total{direction="outbound",service="user.shop",status_class="2xx"} 5
"#;
        let rows = compute("shop", "order", &scrape(text), &scrape(text), 10.0);
        let line = table(&rows);
        assert!(!line.contains("-0.0"), "{line}");
        assert!(line.contains(" 0.00 "), "{line}");
    }
}
