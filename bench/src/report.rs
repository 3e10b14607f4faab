//! The Markdown tables the sidecar and gateway benches share, written
//! from their JSON rows: one row per setup, with `setup`, `rss_idle_kib`
//! (one entry per proxy instance), `rates` (each [`super::Measured::rate_row`])
//! and `max` ([`super::Measured::max_row`], or `null` under `--fixed-only`).

use std::{fmt::Write as _, fs, path::Path};

use anyhow::Result;
use serde_json::Value;

use super::{mib, ms};

/// A JSON number, NaN when it is not one.
pub fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The value at `key` of the `direct` row's phase at `rate`: what the
/// "added" columns subtract.
fn direct_at(rows: &[&Value], rate: &Value, key: &str) -> f64 {
    rows.iter()
        .find(|x| x["setup"] == "direct")
        .and_then(|d| d["rates"].as_array()?.iter().find(|x| x["rate"] == *rate))
        .map_or(f64::NAN, |x| f(&x[key]))
}

/// `### {title}: latency at fixed rates (open loop)`: every setup's phases,
/// with what each added to `direct` at the same rate.
pub fn fixed_rates(out: &mut String, title: &str, rows: &[&Value]) {
    let _ = writeln!(out, "\n### {title}: latency at fixed rates (open loop)\n");
    let _ = writeln!(
        out,
        "| setup | rate (req/s) | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | added p99.9 ms | errors | proxy CPU s / 10k req |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        for x in row["rates"].as_array().into_iter().flatten() {
            let added = |k: &str| {
                if row["setup"] == "direct" {
                    "–".into()
                } else {
                    ms(f(&x[k]) - direct_at(rows, &x["rate"], k))
                }
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row["setup"].as_str().unwrap_or(""),
                x["rate"],
                ms(f(&x["p50_ms"])),
                ms(f(&x["p99_ms"])),
                ms(f(&x["p999_ms"])),
                added("p50_ms"),
                added("p99_ms"),
                added("p999_ms"),
                x["errors"],
                cpu_cell(row, f(&x["proxy_cpu_s_per_10k"])),
            );
        }
    }
}

/// `### {title}: maximum throughput (closed loop), CPU, memory`. RSS
/// columns hold one figure per instance, joined with ` / `; `instances`
/// names them in the header (`" (A / B)"`, or `""` for one).
pub fn closed_loop(out: &mut String, title: &str, rows: &[&Value], instances: &str) {
    let _ = writeln!(
        out,
        "\n### {title}: maximum throughput (closed loop), CPU, memory\n"
    );
    let _ = writeln!(
        out,
        "| setup | max req/s | p50 ms at max | errors | proxy CPU s / 10k req at max | RSS idle MiB{instances} | RSS peak at highest rate MiB{instances} | RSS peak at max MiB{instances} |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows.iter().filter(|r| !r["max"].is_null()) {
        let m = &row["max"];
        let each = |v: &Value| {
            let kib: Vec<String> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|k| mib(k.as_u64().unwrap_or(0)))
                .collect();
            if kib.is_empty() {
                "–".into()
            } else {
                kib.join(" / ")
            }
        };
        let last = row["rates"]
            .as_array()
            .and_then(|a| a.last())
            .map_or(Value::Null, |x| x["rss_peak_kib"].clone());
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            row["setup"].as_str().unwrap_or(""),
            f(&m["requests_per_s"]),
            ms(f(&m["p50_ms"])),
            m["errors"],
            cpu_cell(row, f(&m["proxy_cpu_s_per_10k"])),
            each(&row["rss_idle_kib"]),
            each(&last),
            each(&m["rss_peak_kib"]),
        );
    }
}

/// `### {title}: {ours} relative to …`: `ours` ÷ each of `others` for the
/// p99 and the added p99 at every rate, the maximum throughput, the CPU
/// per request and the peak RSS at the maximum (`rss` labels it: the sum
/// of every instance). Nothing when `ours` has no closed-loop row.
pub fn ratios(
    out: &mut String,
    title: &str,
    rows: &[&Value],
    (ours, ours_label): (&str, &str),
    others: &[&str],
    rss: &str,
) {
    let Some(our) = rows
        .iter()
        .find(|x| x["setup"] == ours && !x["max"].is_null())
    else {
        return;
    };
    let _ = writeln!(
        out,
        "\n### {title}: {ours_label} relative to {}\n",
        others.join(" and ")
    );
    let _ = writeln!(
        out,
        "Ratios are {ours_label} ÷ other: below 1 is better for latency, CPU and memory; above 1 is better for throughput.\n"
    );
    let _ = writeln!(
        out,
        "| metric |{}",
        others
            .iter()
            .map(|o| format!(" vs {o} |"))
            .collect::<String>()
    );
    let _ = writeln!(out, "|---|{}", "---:|".repeat(others.len()));
    let other = |name: &str| rows.iter().find(|x| x["setup"] == name).copied();
    // Only of two positive figures: an added latency at or below zero is
    // the baseline's noise (a slower `direct` tail), not a proxy's cost.
    let ratio = |a: f64, b: f64| {
        if a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "–".into()
        }
    };
    let line = |label: &str, get: &dyn Fn(&Value) -> f64| {
        let cells: String = others
            .iter()
            .map(|n| {
                let cell = other(n).map_or("–".into(), |o| ratio(get(our), get(o)));
                format!(" {cell} |")
            })
            .collect();
        format!("| {label} |{cells}\n")
    };
    for (i, x) in our["rates"].as_array().into_iter().flatten().enumerate() {
        let p99 = |row: &Value| row["rates"].get(i).map_or(f64::NAN, |o| f(&o["p99_ms"]));
        *out += &line(&format!("p99 at {} req/s", x["rate"]), &p99);
        let added_p99 = |row: &Value| {
            row["rates"].get(i).map_or(f64::NAN, |o| {
                f(&o["p99_ms"]) - direct_at(rows, &x["rate"], "p99_ms")
            })
        };
        *out += &line(&format!("added p99 at {} req/s", x["rate"]), &added_p99);
    }
    *out += &line("max throughput", &|r| f(&r["max"]["requests_per_s"]));
    *out += &line("CPU per request at max", &|r| {
        f(&r["max"]["proxy_cpu_s_per_10k"])
    });
    *out += &line(rss, &|r| {
        r["max"]["rss_peak_kib"]
            .as_array()
            .map_or(f64::NAN, |a| a.iter().filter_map(|v| v.as_f64()).sum())
    });
}

/// A CPU figure, or `–` for `direct` (no proxy to measure).
pub fn cpu_cell(row: &Value, v: f64) -> String {
    if row["setup"] == "direct" || !v.is_finite() {
        "–".into()
    } else {
        format!("{v:.2}")
    }
}

/// The lines that open a report: date and commit, machine, load average,
/// versions, HAProxy's TLS library and the OTLP exports (when recorded).
pub fn header(out: &mut String, r: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let _ = writeln!(out, "Date: {}; commit `{}`", s(&r["date"]), s(&r["commit"]));
    let _ = writeln!(out, "Machine: {}", s(&r["machine"]));
    let _ = writeln!(
        out,
        "Load average (1/5/15 min) before: {}, after: {}",
        s(&r["loadavg_before"]),
        s(&r["loadavg_after"])
    );
    let v = &r["versions"];
    let _ = writeln!(
        out,
        "Versions: {}; {}; {}; {}; {}",
        s(&v["trellis-sidecar"]),
        s(&v["haproxy"]),
        s(&v["nginx"]),
        s(&v["wrk"]),
        s(&v["rustc"])
    );
    if !v["haproxy_tls_library"].is_null() {
        let _ = writeln!(
            out,
            "HAProxy's TLS library: {}",
            s(&v["haproxy_tls_library"])
        );
    }
    let _ = writeln!(
        out,
        "OTLP export requests received by the sink: {}",
        r["otlp_exports_received"]
    );
}

/// Writes `<name>.json` and `<name>.md` into `dir`, prints the Markdown
/// and where both went (with `note` after, when not empty).
pub fn write(dir: &Path, name: &str, report: &Value, md: &str, note: &str) -> Result<()> {
    let json = dir.join(format!("{name}.json"));
    fs::write(&json, serde_json::to_string_pretty(report)?)?;
    fs::write(dir.join(format!("{name}.md")), md)?;
    println!("{md}");
    println!("written: {} and {name}.md{note}", json.display());
    Ok(())
}
