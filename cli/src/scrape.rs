//! The sidecars' `/metrics`, read back: the Prometheus text format as the
//! sidecar writes it, and the arithmetic `stat` does on two scrapes (rates,
//! and quantiles from histogram buckets, as PromQL's `histogram_quantile`).
//!
//! A parser of our own rather than a crate: it reads only what our sidecar
//! writes (no exemplars, no timestamps), which is a few lines, and the
//! crates that parse the format are unmaintained or pull in a server.

use std::collections::BTreeMap;

/// One sample: a metric name, its labels, its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The series name (`trellis_requests_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, or "".
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }
}

/// Every sample in `text`; lines it cannot read are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end = loop {
            // A label: key="value" with \\, \" and \n escapes; `}` ends the set.
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            let (start, c) = chars.next()?;
            if c == '}' {
                break start + 1;
            }
            let eq = body[start..].find('=')? + start;
            let key = body[start..eq].to_owned();
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.insert(key, value);
        };
        &body[end..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The `q` quantile (0..=1) of the observations between two scrapes of one
/// histogram, from its cumulative buckets as `(le, count)` pairs (each
/// count already the difference between the scrapes). Linear within a
/// bucket, as Prometheus does; `None` with no observations. An answer in
/// the `+Inf` bucket is the highest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let within = count - below;
            if within <= 0.0 {
                return Some(le);
            }
            return Some(lower + (le - lower) * (rank - below) / within);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sidecars_exposition() {
        let text = r#"# HELP trellis_requests Requests proxied
# TYPE trellis_requests counter
trellis_requests_total{direction="outbound",service="user.shop",status_class="2xx"} 42
trellis_request_duration_seconds_bucket{le="+Inf",direction="inbound",service="order"} 7
trellis_policy_generation 3
odd{key="a \"quoted\", value"} 1.5
# EOF
"#;
        let s = parse(text);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].name, "trellis_requests_total");
        assert_eq!(s[0].label("service"), "user.shop");
        assert_eq!(s[0].value, 42.0);
        assert_eq!(s[1].label("le"), "+Inf");
        assert_eq!(s[2].labels.len(), 0);
        assert_eq!(s[2].value, 3.0);
        assert_eq!(s[3].label("key"), "a \"quoted\", value");
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        // 100 observations: 50 under 10 ms, 40 more under 20 ms, 10 over 40 ms.
        let b = [
            (0.01, 50.0),
            (0.02, 90.0),
            (0.04, 90.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((quantile(0.5, &b).unwrap() - 0.01).abs() < 1e-9);
        assert!((quantile(0.7, &b).unwrap() - 0.015).abs() < 1e-9);
        assert!((quantile(0.25, &b).unwrap() - 0.005).abs() < 1e-9);
        // In the +Inf bucket: the highest finite bound.
        assert_eq!(quantile(0.99, &b), Some(0.04));
        assert_eq!(quantile(0.5, &[(0.01, 0.0), (f64::INFINITY, 0.0)]), None);
    }
}
