//! `cargo xtask bench sidecar`: the two-hop mesh path, Trellis against
//! HAProxy, nginx and no proxy at all, over HTTP/1.1 and gRPC.
//!
//! ```text
//! generator → A (outbound proxy) → B (inbound proxy) → upstream
//! ```
//!
//! For each protocol and setup, in one run on one upstream: latency
//! p50/p99/p99.9 at fixed rates (open loop, corrected for coordinated
//! omission), the closed-loop maximum, CPU seconds per 10,000 requests of the
//! two proxies together (utime+stime from /proc), and RSS per proxy idle and
//! at the highest rate. Writes `target/bench/sidecar.json` and `sidecar.md`.
//!
//! `trellis-mtls` and `haproxy-tls` run the same two pairs with mutual TLS
//! between A and B, and the report compares each with its plaintext self
//! (the cost of encryption) and the two encrypted pairs with each other.

use std::{fmt::Write as _, fs, thread, time::Duration};

use anyhow::{Result, bail};
use serde_json::json;

use super::{
    commit, ensure_packages, loadavg,
    loadgen::{self, Run, Target},
    machine, measure,
    mesh::Mesh,
    ms, now_utc,
    proxies::{self, Kind, Proto, Setup, Tracing},
    release_binary, report, results_dir, rss_kib,
    upstream::Upstreams,
    version_of,
};

/// Settings of one benchmark run.
#[derive(Clone, Debug, clap::Args)]
pub struct SidecarBench {
    /// Seconds of load at each fixed rate and for the closed loop.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    pub duration: u64,
    /// The fixed rates, requests per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,8000")]
    pub rates: Vec<u64>,
    /// HTTP/1.1 connections of the open-loop generator (and of wrk).
    #[arg(long, default_value = "32")]
    pub connections: usize,
    /// Only these setups (direct, haproxy, nginx, trellis, haproxy-tls,
    /// trellis-mtls, collector-down, hyper-floor); all but hyper-floor when
    /// none are named.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Only HTTP/1.1 (`http`) or only gRPC (`grpc`); both by default.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Use the already built release trellis-sidecar.
    #[arg(long)]
    pub no_build: bool,
    /// Run each sidecar under this command, split on spaces (a profiler:
    /// `valgrind --tool=callgrind --callgrind-out-file=target/bench/callgrind.%p`).
    #[arg(long, value_name = "COMMAND")]
    pub sidecar_wrapper: Option<String>,
    /// Run each sidecar and each HAProxy under callgrind and report the
    /// instructions each executed per request at every fixed rate (counted from just before
    /// the load to just after it, start-up excluded); the profiles are kept
    /// in `target/bench/callgrind/` for `callgrind_annotate`.
    #[arg(long, conflicts_with = "sidecar_wrapper")]
    pub callgrind: bool,
    /// Only the fixed rates: no idle RSS and no closed loop.
    #[arg(long)]
    pub fixed_only: bool,
    /// This trellis-sidecar binary instead of building the release one (to
    /// compare builds).
    #[arg(long, value_name = "PATH")]
    pub sidecar_binary: Option<std::path::PathBuf>,
    /// Skip the "collector down" comparison (Trellis, HTTP/1.1 fixed rates,
    /// at 1 % and 100 % sampling with the OTLP endpoint up and down). It
    /// runs by default, and alone with `--only collector-down`.
    #[arg(long)]
    pub no_collector_down: bool,
    /// More environment for each Trellis sidecar, `KEY=VALUE`, repeatable
    /// (`TRELLIS_PROXY_THREADS=1`; `TRELLIS_LOG` is the `--log` flag's).
    #[arg(long, value_name = "KEY=VALUE")]
    pub sidecar_env: Vec<String>,
}

/// The `--only` name of the collector-down comparison.
const COLLECTOR_DOWN: &str = "collector-down";

/// The tracing variants of the collector-down comparison, in the order they
/// run at each rate: the realistic 1 % with the collector up and down, then
/// every request sampled (so a down collector would show if it mattered),
/// up and down.
const COLLECTOR_VARIANTS: [Tracing; 4] = [
    Tracing::REALISTIC,
    Tracing {
        ratio: 0.01,
        collector_down: true,
    },
    Tracing {
        ratio: 1.0,
        collector_down: false,
    },
    Tracing {
        ratio: 1.0,
        collector_down: true,
    },
];

/// gRPC: HTTP/2 connections of the generator, and callers in the closed loop.
const GRPC_CHANNELS: usize = 4;
const GRPC_CONCURRENCY: usize = 64;

pub fn sidecar(opts: &SidecarBench) -> Result<()> {
    if opts.duration == 0 || opts.connections == 0 || opts.rates.contains(&0) {
        bail!("--duration, --connections and every --rates value must be positive");
    }
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| {
            (opts.only.is_empty() && *k != Kind::HyperFloor)
                || opts.only.iter().any(|o| o == k.name())
        })
        .collect();
    let collector_down = !opts.no_collector_down
        && (opts.only.is_empty() || opts.only.iter().any(|o| o == COLLECTOR_DOWN))
        && opts.protocol.as_deref() != Some("grpc");
    if kinds.is_empty() && !collector_down {
        bail!(
            "--only names none of {}, {COLLECTOR_DOWN}: {:?}",
            Kind::ALL.map(Kind::name).join(", "),
            opts.only
        );
    }
    let protos: Vec<Proto> = match opts.protocol.as_deref() {
        None => vec![Proto::Http1, Proto::Grpc],
        Some("http") => vec![Proto::Http1],
        Some("grpc") => vec![Proto::Grpc],
        Some(other) => bail!("--protocol must be http or grpc, not {other:?}"),
    };
    ensure_packages(&[("wrk", "wrk"), ("haproxy", "haproxy"), ("nginx", "nginx")])?;
    let sidecar = if let Some(path) = &opts.sidecar_binary {
        path.canonicalize()
            .map_err(|e| anyhow::anyhow!("--sidecar-binary {}: {e}", path.display()))?
    } else if kinds.iter().any(|k| k.is_trellis()) || collector_down {
        release_binary("trellis-sidecar", "trellis-sidecar", opts.no_build)?
    } else {
        std::path::PathBuf::from("trellis-sidecar")
    };
    let dir = results_dir()?;
    let logs = dir.join("sidecar-logs");
    fs::create_dir_all(&logs)?;
    let callgrind_dir = dir.join("callgrind");
    if opts.callgrind {
        if !super::on_path("valgrind") {
            bail!("--callgrind needs valgrind (apt-get install valgrind)");
        }
        fs::create_dir_all(&callgrind_dir)?;
    }
    let up = Upstreams::start()?;
    let mesh = if kinds.iter().any(|k| k.is_mtls()) {
        Some(Mesh::start()?)
    } else {
        None
    };
    let duration = Duration::from_secs(opts.duration);
    let load_before = loadavg();

    let mut results = Vec::new();
    for &proto in &protos {
        let upstream = match proto {
            Proto::Http1 => up.http,
            Proto::Grpc => up.grpc,
        };
        for &kind in &kinds {
            eprintln!("== {proto}, {}", kind.name());
            let setup = Setup {
                dir: &logs,
                sidecar: &sidecar,
                upstream,
                http_app: up.http,
                otlp: up.otlp,
                wrapper: opts.sidecar_wrapper.as_deref(),
                callgrind: opts.callgrind.then_some(callgrind_dir.as_path()),
                tracing: Tracing::REALISTIC,
                mesh: mesh.as_ref(),
                sidecar_env: &opts.sidecar_env,
            };
            // A fresh pair for every phase: what one phase leaves behind (an
            // open circuit breaker after an overload, a grown pool) must not
            // decide the next one.
            let idle: Vec<u64> = if opts.fixed_only {
                Vec::new()
            } else {
                let pair = proxies::start(kind, proto, &setup)?;
                thread::sleep(Duration::from_secs(2));
                pair.instances().iter().map(|p| rss_kib(p)).collect()
            };
            let mut rates = Vec::new();
            for &rate in &opts.rates {
                rates.push(fixed_rate(kind, proto, &setup, rate, duration, opts)?);
            }
            if opts.fixed_only {
                results.push(json!({
                    "protocol": proto.to_string(),
                    "setup": kind.name(),
                    "rss_idle_kib": idle,
                    "rates": rates,
                    "max": null,
                }));
                continue;
            }
            let pair = proxies::start(kind, proto, &setup)?;
            let m = measure(pair.instances(), || match proto {
                Proto::Http1 => loadgen::wrk(
                    pair.front,
                    &Target::service(),
                    duration,
                    opts.connections,
                    &logs,
                ),
                Proto::Grpc => {
                    loadgen::grpc_closed_loop(pair.front, duration, GRPC_CHANNELS, GRPC_CONCURRENCY)
                }
            })?;
            let handshakes = pair.mtls_connections();
            eprintln!(
                "   closed loop: {:.0} req/s, p50 {} ms, {} errors{}{}",
                m.run.rate(),
                ms(m.run.ms(0.5)),
                m.run.errors,
                error_note(&m.run),
                handshakes.map_or(String::new(), |n| format!(
                    ", {n} mutual-TLS connections A → B"
                )),
            );
            let mut max = m.max_row();
            max["mtls_connections"] = json!(handshakes);
            results.push(json!({
                "protocol": proto.to_string(),
                "setup": kind.name(),
                "rss_idle_kib": idle,
                "rates": rates,
                "max": max,
            }));
            drop(pair);
        }
    }

    // The collector-down comparison: at each rate, the four tracing variants
    // one after the other, so each pair of rows shares the same minute.
    let mut collector = Vec::new();
    if collector_down {
        eprintln!("== HTTP/1.1, trellis with the OTLP collector up and down");
        let mut rows: Vec<Vec<serde_json::Value>> = vec![Vec::new(); COLLECTOR_VARIANTS.len()];
        for &rate in &opts.rates {
            for (variant, row) in COLLECTOR_VARIANTS.iter().zip(&mut rows) {
                eprintln!("   {}", variant.label());
                let setup = Setup {
                    dir: &logs,
                    sidecar: &sidecar,
                    upstream: up.http,
                    http_app: up.http,
                    otlp: up.otlp,
                    wrapper: opts.sidecar_wrapper.as_deref(),
                    callgrind: opts.callgrind.then_some(callgrind_dir.as_path()),
                    tracing: *variant,
                    mesh: None,
                    sidecar_env: &opts.sidecar_env,
                };
                row.push(fixed_rate(
                    Kind::Trellis,
                    Proto::Http1,
                    &setup,
                    rate,
                    duration,
                    opts,
                )?);
            }
        }
        for (variant, rates) in COLLECTOR_VARIANTS.iter().zip(rows) {
            collector.push(json!({
                "sample_ratio": variant.ratio,
                "collector_down": variant.collector_down,
                "rates": rates,
            }));
        }
    }

    let report = json!({
        "date": now_utc(),
        "commit": commit(),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "versions": {
            "haproxy": version_of("haproxy", &["-v"]),
            "haproxy_tls_library": haproxy_tls_library(),
            "nginx": version_of("nginx", &["-v"]),
            "wrk": version_of("wrk", &["-v"]),
            "rustc": version_of("rustc", &["-V"]),
            "trellis-sidecar": version_of(&sidecar.to_string_lossy(), &["--version"]),
        },
        "settings": {
            "duration_s": opts.duration,
            "rates": opts.rates,
            "http1_connections": opts.connections,
            "grpc_channels": GRPC_CHANNELS,
            "grpc_closed_loop_concurrency": GRPC_CONCURRENCY,
        },
        "otlp_exports_received": up.exports(),
        "mesh_certificates_issued": mesh.as_ref().map(Mesh::issued),
        "mutual_tls": mutual_tls(&results),
        "results": results,
        "collector_down": collector,
    });
    let md = markdown(&report);
    report::write(&dir, "sidecar", &report, &md, "")
}

/// ` (n: reason; m: reason)` for the most frequent errors of a run.
fn error_note(run: &Run) -> String {
    if run.top_errors.is_empty() {
        return String::new();
    }
    let kinds: Vec<String> = run
        .top_errors
        .iter()
        .map(|(why, n)| format!("{n}: {why}"))
        .collect();
    format!(" ({})", kinds.join("; "))
}

/// One fixed-rate phase on a fresh pair: latency, errors, CPU, peak RSS,
/// and for Trellis the span outcomes (and, under `--callgrind`, the
/// instructions per request of A and B).
fn fixed_rate(
    kind: Kind,
    proto: Proto,
    setup: &Setup,
    rate: u64,
    duration: Duration,
    opts: &SidecarBench,
) -> Result<serde_json::Value> {
    let pair = proxies::start(kind, proto, setup)?;
    pair.callgrind_zero()?;
    let m = measure(pair.instances(), || match proto {
        Proto::Http1 => loadgen::h1_open_loop(
            pair.front,
            &Target::service(),
            rate,
            duration,
            opts.connections,
        ),
        Proto::Grpc => loadgen::grpc_open_loop(pair.front, rate, duration, GRPC_CHANNELS),
    })?;
    let run = &m.run;
    let profiles = pair.callgrind_dump()?;
    let per_request: Vec<f64> = profiles
        .iter()
        .map(|(ir, _)| *ir as f64 / run.requests.max(1) as f64)
        .collect();
    // Let the export task send (or fail) its last batch before counting.
    if kind.is_trellis() {
        thread::sleep(Duration::from_millis(2500));
    }
    let spans = pair.trace_spans();
    let handshakes = pair.mtls_connections();
    eprintln!(
        "   {rate:>6} req/s: p50 {} p99 {} p99.9 {} ms, {} errors{}{}{}",
        ms(run.ms(0.5)),
        ms(run.ms(0.99)),
        ms(run.ms(0.999)),
        run.errors,
        error_note(run),
        handshakes.map_or(String::new(), |n| format!(
            ", {n} mutual-TLS connections A → B"
        )),
        if per_request.is_empty() {
            String::new()
        } else {
            format!(
                ", instructions/request (A / B) {}: {}",
                per_request
                    .iter()
                    .map(|n| format!("{n:.0}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
                profiles
                    .iter()
                    .map(|(_, f)| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    );
    let mut x = m.rate_row(rate);
    if kind.is_trellis() {
        x["trace_spans"] = json!({"exported": spans[0], "dropped": spans[1], "failed": spans[2]});
    }
    if !per_request.is_empty() {
        x["instructions_per_request"] = json!(per_request);
    }
    if let Some(n) = handshakes {
        x["mtls_connections"] = json!(n);
    }
    Ok(x)
}

/// The Markdown tables of a report.
fn markdown(r: &serde_json::Value) -> String {
    let mut out = String::new();
    report::header(&mut out, r);
    if let Some(n) = r["mesh_certificates_issued"].as_u64() {
        let _ = writeln!(
            out,
            "Mesh certificates issued to Trellis sidecars by the stand-in identity service: {n}"
        );
    }
    let results = r["results"].as_array().cloned().unwrap_or_default();
    for proto in ["HTTP/1.1", "gRPC (h2c)"] {
        let rows: Vec<&serde_json::Value> =
            results.iter().filter(|x| x["protocol"] == proto).collect();
        if rows.is_empty() {
            continue;
        }
        report::fixed_rates(&mut out, proto, &rows);
        report::closed_loop(&mut out, proto, &rows, " (A / B)");
        let profiled: Vec<String> = rows
            .iter()
            .flat_map(|row| {
                row["rates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| {
                        let n = x["instructions_per_request"].as_array()?;
                        let n: Vec<String> = n
                            .iter()
                            .map(|v| format!("{:.0}", v.as_f64().unwrap_or(f64::NAN)))
                            .collect();
                        Some(format!(
                            "| {} | {} | {} | {} |",
                            row["setup"].as_str().unwrap_or(""),
                            x["rate"],
                            x["requests"],
                            n.join(" / ")
                        ))
                    })
            })
            .collect();
        if !profiled.is_empty() {
            let _ = writeln!(
                out,
                "\n### {proto}: instructions per request under callgrind\n"
            );
            let _ = writeln!(
                out,
                "| setup | rate (req/s) | requests | instructions / request (A / B) |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|");
            for line in profiled {
                let _ = writeln!(out, "{line}");
            }
        }
        report::ratios(
            &mut out,
            proto,
            &rows,
            ("trellis", "Trellis"),
            &["haproxy", "nginx"],
            "RSS peak at max (sum of A and B)",
        );
    }
    out += &mutual_tls_markdown(r);
    out += &collector_markdown(r);
    out
}

/// The setups of the mutual-TLS comparison, in its columns' order, with
/// their JSON keys.
const MTLS_SETUPS: [(&str, &str); 4] = [
    ("trellis", "trellis"),
    ("trellis-mtls", "trellis_mtls"),
    ("haproxy", "haproxy"),
    ("haproxy-tls", "haproxy_tls"),
];

/// Per protocol with a mutual-TLS row: each metric for Trellis and HAProxy
/// in plaintext and with mutual TLS between A and B, the cost of
/// encryption for each (TLS ÷ plaintext) and Trellis ÷ HAProxy, both
/// encrypted. `null` where a setup did not run (or a ratio has no divisor).
fn mutual_tls(results: &[serde_json::Value]) -> serde_json::Value {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let mut out = Vec::new();
    for proto in [Proto::Http1, Proto::Grpc] {
        let proto = proto.to_string();
        let row = |setup: &str| {
            results
                .iter()
                .find(|x| x["protocol"] == proto && x["setup"] == setup)
        };
        if row("trellis-mtls").is_none() && row("haproxy-tls").is_none() {
            continue;
        }
        let direct = row("direct");
        // The rates of whichever setups ran (all run the same ones).
        let rates: Vec<serde_json::Value> = MTLS_SETUPS
            .iter()
            .find_map(|(name, _)| row(name)?["rates"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|x| x["rate"].clone())
            .collect();
        let at = |r: Option<&serde_json::Value>, rate: &serde_json::Value, key: &str| {
            r.and_then(|r| r["rates"].as_array()?.iter().find(|x| x["rate"] == *rate))
                .map_or(f64::NAN, |x| f(&x[key]))
        };
        // (label, unit, value of a setup's row)
        type Get<'a> = Box<dyn Fn(Option<&serde_json::Value>) -> f64 + 'a>;
        let mut metrics: Vec<(String, &str, Get)> = Vec::new();
        for rate in &rates {
            metrics.push((
                format!("p99 at {rate} req/s"),
                "ms",
                Box::new(move |r| at(r, rate, "p99_ms")),
            ));
            metrics.push((
                format!("added p99 at {rate} req/s"),
                "ms",
                Box::new(move |r| at(r, rate, "p99_ms") - at(direct, rate, "p99_ms")),
            ));
            metrics.push((
                format!("proxy CPU s / 10k req at {rate} req/s"),
                "s",
                Box::new(move |r| at(r, rate, "proxy_cpu_s_per_10k")),
            ));
        }
        let max = |key: &'static str| -> Get {
            Box::new(move |r: Option<&serde_json::Value>| r.map_or(f64::NAN, |r| f(&r["max"][key])))
        };
        metrics.push(("max throughput".into(), "req/s", max("requests_per_s")));
        metrics.push(("p50 at max".into(), "ms", max("p50_ms")));
        metrics.push((
            "proxy CPU s / 10k req at max".into(),
            "s",
            max("proxy_cpu_s_per_10k"),
        ));
        metrics.push((
            "RSS peak at max, A + B".into(),
            "MiB",
            Box::new(|r| {
                r.and_then(|r| r["max"]["rss_peak_kib"].as_array())
                    .map_or(f64::NAN, |a| {
                        a.iter().filter_map(|v| v.as_f64()).sum::<f64>() / 1024.0
                    })
            }),
        ));
        let ratio = |a: f64, b: f64| {
            if a.is_finite() && b.is_finite() && b > 0.0 {
                json!(a / b)
            } else {
                serde_json::Value::Null
            }
        };
        let rows: Vec<serde_json::Value> = metrics
            .iter()
            .map(|(label, unit, get)| {
                let v: Vec<f64> = MTLS_SETUPS.iter().map(|(name, _)| get(row(name))).collect();
                let mut m = json!({
                    "metric": label,
                    "unit": unit,
                    "trellis_mtls_per_trellis": ratio(v[1], v[0]),
                    "haproxy_tls_per_haproxy": ratio(v[3], v[2]),
                    "trellis_mtls_per_haproxy_tls": ratio(v[1], v[3]),
                });
                for ((_, key), x) in MTLS_SETUPS.iter().zip(&v) {
                    m[*key] = if x.is_finite() {
                        json!(x)
                    } else {
                        serde_json::Value::Null
                    };
                }
                m
            })
            .collect();
        out.push(json!({"protocol": proto, "metrics": rows}));
    }
    json!(out)
}

/// The mutual-TLS comparison as one table per protocol.
fn mutual_tls_markdown(r: &serde_json::Value) -> String {
    let mut out = String::new();
    for p in r["mutual_tls"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\n### {}: mutual TLS between A and B\n",
            p["protocol"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            out,
            "`trellis-mtls` and `haproxy-tls` are the `trellis` and `haproxy` pairs with mutual TLS 1.3 between A and B (ECDSA P-256 certificates from one root; for gRPC, HTTP/2 negotiated by ALPN on that hop). \"÷ plaintext\" is the cost of encryption for each proxy; the last column compares the two encrypted pairs. Below 1 is better for latency, CPU and memory; above 1 for throughput.\n"
        );
        let _ = writeln!(
            out,
            "| metric | trellis | trellis-mtls | ÷ plaintext | haproxy | haproxy-tls | ÷ plaintext | trellis-mtls ÷ haproxy-tls |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for m in p["metrics"].as_array().into_iter().flatten() {
            let unit = m["unit"].as_str().unwrap_or("");
            let value = |v: &serde_json::Value| match v.as_f64() {
                None => "–".to_owned(),
                Some(x) => match unit {
                    "req/s" => format!("{x:.0}"),
                    "MiB" => format!("{x:.1}"),
                    _ => format!("{x:.2}"),
                },
            };
            let ratio =
                |v: &serde_json::Value| v.as_f64().map_or("–".into(), |x| format!("{x:.2}"));
            let _ = writeln!(
                out,
                "| {} ({unit}) | {} | {} | {} | {} | {} | {} | {} |",
                m["metric"].as_str().unwrap_or(""),
                value(&m["trellis"]),
                value(&m["trellis_mtls"]),
                ratio(&m["trellis_mtls_per_trellis"]),
                value(&m["haproxy"]),
                value(&m["haproxy_tls"]),
                ratio(&m["haproxy_tls_per_haproxy"]),
                ratio(&m["trellis_mtls_per_haproxy_tls"]),
            );
        }
        // How often the Trellis pair did a handshake: once per pooled
        // connection, not per request, if the pool works.
        let mtls_row = r["results"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["protocol"] == p["protocol"] && x["setup"] == "trellis-mtls");
        if let Some(row) = mtls_row {
            let mut phases: Vec<String> = row["rates"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| {
                    Some(format!(
                        "{} at {} req/s",
                        x["mtls_connections"].as_u64()?,
                        x["rate"]
                    ))
                })
                .collect();
            if let Some(n) = row["max"]["mtls_connections"].as_u64() {
                phases.push(format!("{n} in the closed loop"));
            }
            if !phases.is_empty() {
                let _ = writeln!(
                    out,
                    "\nMutual-TLS connections (handshakes) B accepted from A, each phase on a fresh pair: {}.",
                    phases.join(", ")
                );
            }
        }
    }
    out
}

/// The TLS library HAProxy runs on (`haproxy -vv`'s "Running on OpenSSL
/// version : …" line), `null` when it is not installed.
fn haproxy_tls_library() -> serde_json::Value {
    std::process::Command::new("haproxy")
        .arg("-vv")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.trim().strip_prefix("Running on OpenSSL version"))
                .map(|l| json!(l.trim_start_matches([' ', ':']).trim()))
        })
        .unwrap_or(serde_json::Value::Null)
}

/// The collector-down comparison: each variant's row, and its difference
/// from the collector-up row at the same ratio and rate.
fn collector_markdown(r: &serde_json::Value) -> String {
    let mut out = String::new();
    let variants = r["collector_down"].as_array().cloned().unwrap_or_default();
    if variants.is_empty() {
        return out;
    }
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        out,
        "\n### HTTP/1.1: Trellis with the OTLP collector up and down (open loop)\n"
    );
    let _ = writeln!(
        out,
        "Collector up: the bench's OTLP sink; down: a closed loopback port. At each rate the four pairs ran one after the other. Differences are down − up at the same sampling ratio and rate. Spans: counted by both sidecars' `trellis_trace_spans_total`.\n"
    );
    let _ = writeln!(
        out,
        "| sampled | collector | rate (req/s) | p50 ms | p99 ms | p99.9 ms | Δ p50 ms | Δ p99 ms | Δ p99.9 ms | errors | proxy CPU s / 10k req | spans exported / dropped / failed |"
    );
    let _ = writeln!(
        out,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for v in &variants {
        let down = v["collector_down"].as_bool().unwrap_or(false);
        let up = variants
            .iter()
            .find(|u| u["sample_ratio"] == v["sample_ratio"] && u["collector_down"] == false);
        for x in v["rates"].as_array().into_iter().flatten() {
            let up_at = up.and_then(|u| {
                u["rates"]
                    .as_array()?
                    .iter()
                    .find(|y| y["rate"] == x["rate"])
            });
            let delta = |k: &str| match up_at {
                Some(y) if down => ms(f(&x[k]) - f(&y[k])),
                _ => "–".into(),
            };
            let t = &x["trace_spans"];
            let _ = writeln!(
                out,
                "| {}% | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} / {} / {} |",
                f(&v["sample_ratio"]) * 100.0,
                if down { "down" } else { "up" },
                x["rate"],
                ms(f(&x["p50_ms"])),
                ms(f(&x["p99_ms"])),
                ms(f(&x["p999_ms"])),
                delta("p50_ms"),
                delta("p99_ms"),
                delta("p999_ms"),
                x["errors"],
                f(&x["proxy_cpu_s_per_10k"]),
                t["exported"],
                t["dropped"],
                t["failed"],
            );
        }
    }
    out
}
