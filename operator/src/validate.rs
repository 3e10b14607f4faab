//! The operator's own checks of a MicroService, before it renders anything.
//!
//! They mirror the CRD's schema and CEL rules ([`crate::crd`]), so what the
//! apiserver accepts the operator renders, and what either refuses is named
//! by the same field path (`spec.resilience.timeout`, `metadata.name`). The
//! sidecar policy's own rules come from [`trellis_policy::SidecarPolicy::validate`],
//! their fields re-rooted under `spec`.

use std::cmp::Ordering;

use k8s_openapi::api::core::v1::ResourceRequirements;
use trellis_policy::{FieldError, SidecarPolicy};

use crate::crd::{
    CONFIG_MAX_BYTES, MAX_SECRETS, MicroServiceSpec, RESERVED_PORTS, RESOURCE_NAMES,
    SECRET_USE_MESSAGE,
};

fn error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Whether `s` is a DNS-1035 label, as a Service's name must be: at most 63
/// characters, lowercase letters, digits and '-', starting with a letter and
/// ending with a letter or digit.
pub fn is_dns_1035_label(s: &str) -> bool {
    s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `s` is a DNS subdomain, as a Secret's name must be: at most 253
/// characters, dot-separated parts of lowercase letters, digits and '-',
/// each starting and ending with a letter or digit
/// ([`crate::crd::SECRET_NAME_PATTERN`]).
pub fn is_dns_1123_subdomain(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('-')
            && !p.ends_with('-')
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    s.len() <= 253 && s.split('.').all(part)
}

/// Checks the name and every spec field the CRD constrains that the sidecar
/// policy does not cover; `Err` lists each field at fault.
pub fn microservice(name: &str, spec: &MicroServiceSpec) -> Result<(), Vec<FieldError>> {
    let mut e = Vec::new();
    if !is_dns_1035_label(name) {
        e.push(error(
            "metadata.name",
            "must be a DNS-1035 label, as the Service named after it must be: at most 63 \
             characters, lowercase letters, digits and '-', starting with a letter and ending \
             with a letter or digit",
        ));
    }
    if spec.image.is_empty() || spec.image.len() > 512 || spec.image.contains(char::is_whitespace) {
        e.push(error(
            "spec.image",
            "must be 1 to 512 characters without whitespace",
        ));
    }
    if RESERVED_PORTS.contains(&spec.port) {
        e.push(error(
            "spec.port",
            "port 15001, 15006 and 15020 are used by the Trellis sidecar",
        ));
    }
    if let Some(a) = &spec.autoscaling
        && a.min_replicas > a.max_replicas
    {
        e.push(error(
            "spec.autoscaling.minReplicas",
            "minReplicas must not exceed maxReplicas",
        ));
    }
    config(&mut e, spec);
    secrets(&mut e, spec);
    if let Some(r) = &spec.resources {
        resources(&mut e, r);
    }
    if e.is_empty() { Ok(()) } else { Err(e) }
}

/// The ConfigMap rules for `spec.config`: key syntax and the 1 MiB total.
fn config(e: &mut Vec<FieldError>, spec: &MicroServiceSpec) {
    for key in spec.config.keys() {
        let ok = !key.is_empty()
            && key.len() <= 253
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            && key != "."
            && !key.starts_with("..");
        if !ok {
            e.push(error(
                format!("spec.config[{key:?}]"),
                "config keys may contain only letters, digits, '-', '_' and '.', at most 253 of \
                 them, and may not be '.' or start with '..'",
            ));
        }
    }
    let bytes: usize = spec.config.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > CONFIG_MAX_BYTES {
        e.push(error(
            "spec.config",
            format!(
                "config keys and values together must not exceed 1 MiB, the most a ConfigMap \
                 holds; they have {bytes} bytes"
            ),
        ));
    }
}

/// The rules for `spec.secrets`: how many, Secret names, each listed once,
/// each used one way at least.
fn secrets(e: &mut Vec<FieldError>, spec: &MicroServiceSpec) {
    if spec.secrets.len() > MAX_SECRETS {
        e.push(error(
            "spec.secrets",
            format!(
                "must have at most {MAX_SECRETS} items; it has {}",
                spec.secrets.len()
            ),
        ));
    }
    for (i, r) in spec.secrets.iter().enumerate() {
        if !is_dns_1123_subdomain(&r.name) {
            e.push(error(
                format!("spec.secrets[{i}].name"),
                format!(
                    "{:?} is not a Secret name: at most 253 characters, lowercase letters, \
                     digits, '-' and '.', starting and ending with a letter or digit",
                    r.name
                ),
            ));
        } else if spec.secrets[..i].iter().any(|o| o.name == r.name) {
            e.push(error(
                format!("spec.secrets[{i}].name"),
                format!("lists the Secret {} again; list each Secret once", r.name),
            ));
        }
        if !r.env && !r.files {
            e.push(error(format!("spec.secrets[{i}]"), SECRET_USE_MESSAGE));
        }
    }
}

/// The container rules for `spec.resources`.
fn resources(e: &mut Vec<FieldError>, r: &ResourceRequirements) {
    for (kind, list) in [("requests", &r.requests), ("limits", &r.limits)] {
        for (name, q) in list.iter().flatten() {
            let at = format!("spec.resources.{kind}.{name}");
            if !RESOURCE_NAMES.contains(&name.as_str()) {
                e.push(error(
                    at,
                    "requests and limits may name only cpu, memory and ephemeral-storage",
                ));
            } else if parse_quantity(&q.0).is_none_or(|(negative, _)| negative) {
                e.push(error(
                    at,
                    format!(
                        "{:?} is not a non-negative quantity, such as 250m, 0.5 or 128Mi",
                        q.0
                    ),
                ));
            }
        }
    }
    for (name, request) in r.requests.iter().flatten() {
        let limit = r.limits.as_ref().and_then(|l| l.get(name));
        if let (Some((false, req)), Some((false, lim))) = (
            parse_quantity(&request.0),
            limit.and_then(|l| parse_quantity(&l.0)),
        ) && req.cmp(&lim) == Ordering::Greater
        {
            e.push(error(
                format!("spec.resources.requests.{name}"),
                format!(
                    "each request must not exceed its limit: {} is more than {}",
                    request.0,
                    limit.map_or("", |l| l.0.as_str())
                ),
            ));
        }
    }
}

/// A Kubernetes quantity (`250m`, `1.5`, `128Mi`, `1e3`) as (negative,
/// magnitude in billionths, rounded up and saturated), or `None` when it is
/// not one. The grammar is `resource.Quantity`'s.
pub fn parse_quantity(s: &str) -> Option<(bool, u128)> {
    let (negative, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    let (exp10, exp2): (i64, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exp = suffix.strip_prefix(['e', 'E'])?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (exp.parse().ok()?, 0)
        }
    };
    // value = digits × 10^(exp10 - frac.len()) × 2^exp2, in units of 10^-9.
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let scale = exp10 + 9 - frac.len() as i64;
    let mut v: u128 = 0;
    let mut rounded_up = false;
    let keep = if scale >= 0 {
        digits.len()
    } else {
        digits.len().saturating_sub(scale.unsigned_abs() as usize)
    };
    for (i, b) in digits.bytes().enumerate() {
        if i < keep {
            v = v.saturating_mul(10).saturating_add(u128::from(b - b'0'));
        } else if b != b'0' {
            rounded_up = true;
        }
    }
    if scale > 0 {
        v = v.saturating_mul(10u128.saturating_pow(scale.min(60) as u32));
    }
    v = v.saturating_add(u128::from(rounded_up));
    v = v.saturating_mul(1u128 << exp2);
    Some((negative && v > 0, v))
}

/// Re-roots the sidecar policy's field paths where the MicroService has them.
pub fn policy_errors(errors: Vec<FieldError>) -> Vec<FieldError> {
    errors
        .into_iter()
        .map(|mut e| {
            e.field = match e.field.as_str() {
                "service" => "metadata.name".into(),
                "namespace" => "metadata.namespace".into(),
                "appPort" => "spec.port".into(),
                f => format!("spec.{f}"),
            };
            e
        })
        .collect()
}

/// Every check: [`microservice`], then the sidecar policy's.
pub fn all(name: &str, spec: &MicroServiceSpec, policy: &SidecarPolicy) -> Vec<FieldError> {
    let mut e = microservice(name, spec).err().unwrap_or_default();
    if let Err(p) = policy.validate() {
        for f in policy_errors(p) {
            if !e.iter().any(|x| x.field == f.field) {
                e.push(f);
            }
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_1035_labels() {
        for ok in ["a", "order", "order-v2", &"a".repeat(63)] {
            assert!(is_dns_1035_label(ok), "{ok}");
        }
        for bad in [
            "",
            "1order",
            "-a",
            "a-",
            "Order",
            "order.v1",
            "o_r",
            &"a".repeat(64),
        ] {
            assert!(!is_dns_1035_label(bad), "{bad}");
        }
    }

    #[test]
    fn dns_1123_subdomains() {
        for ok in [
            "a",
            "order-db",
            "db.order",
            "0db",
            "a.b-c.d1",
            &"a".repeat(253),
        ] {
            assert!(is_dns_1123_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "Order",
            "order_db",
            "-a",
            "a-",
            ".a",
            "a.",
            "a..b",
            "a.-b",
            "a/b",
            &"a".repeat(254),
        ] {
            assert!(!is_dns_1123_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        let q = |s| parse_quantity(s);
        assert_eq!(q("250m"), Some((false, 250_000_000)));
        assert_eq!(q("0.25"), q("250m"));
        assert_eq!(q(".5"), Some((false, 500_000_000)));
        assert_eq!(q("1."), Some((false, 1_000_000_000)));
        assert_eq!(q("1Ki"), Some((false, 1024 * 1_000_000_000)));
        assert_eq!(q("1k"), Some((false, 1000 * 1_000_000_000)));
        assert_eq!(q("1e3"), q("1k"));
        assert_eq!(q("1E-3"), q("1m"));
        assert_eq!(q("-1"), Some((true, 1_000_000_000)));
        assert_eq!(q("-0"), Some((false, 0)));
        assert_eq!(q("0.0000000001"), Some((false, 1)), "rounded up");
        assert!(q("64Mi").unwrap().1 > q("65M").unwrap().1);
        for bad in [
            "", "lots", "1.2.3", "1KB", "1 Gi", "Mi", ".", "1e", "1e+", "--1",
        ] {
            assert_eq!(q(bad), None, "{bad:?}");
        }
    }
}
