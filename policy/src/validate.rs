//! Validation of a whole policy, mirroring the CRD's schema and CEL rules.
//!
//! The apiserver already refuses a bad MicroService, but the sidecar reads a
//! ConfigMap that anyone with access can edit, so it checks again and names
//! every field at fault, in the same dotted form `kubectl explain` uses.

use std::{collections::HashSet, fmt};

use crate::{Backoff, CircuitBreaker, Resilience, Retry, SidecarPolicy};

/// One field at fault and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The dotted path of the field, such as `resilience.retry.attempts`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text is not a policy at all (bad JSON, a wrong type, an unknown enum value).
    #[error("policy is not valid JSON of the expected shape: {0}")]
    Parse(#[source] serde_json::Error),
    /// The policy parsed but breaks a rule; every broken rule is listed.
    #[error("policy refused: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

/// Collects field errors under a path prefix.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn check(&mut self, ok: bool, field: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.0.push(FieldError {
                field: field.into(),
                message: message.into(),
            });
        }
    }
}

/// Whether `s` is an RFC 1123 label, as Kubernetes names Services and namespaces.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl SidecarPolicy {
    /// Checks every rule; `Err` lists each field at fault.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut e = Errors::default();
        e.check(
            is_dns_label(&self.service),
            "service",
            "must be a DNS label",
        );
        e.check(
            is_dns_label(&self.namespace),
            "namespace",
            "must be a DNS label",
        );
        e.check(self.app_port != 0, "appPort", "must be between 1 and 65535");
        e.check(
            self.health.path.starts_with('/') && !self.health.path.contains(char::is_whitespace),
            "health.path",
            "must be an absolute path without spaces",
        );
        e.check(
            !self.health.timeout.get().is_zero(),
            "health.timeout",
            "must be more than zero",
        );
        resilience(&mut e, "resilience", &self.resilience);

        let mut seen = HashSet::new();
        for (i, dep) in self.dependencies.iter().enumerate() {
            let at = format!("dependencies[{i}]");
            e.check(
                is_dns_label(&dep.name),
                format!("{at}.name"),
                "must be a DNS label",
            );
            e.check(
                seen.insert((dep.namespace.as_deref(), dep.name.as_str())),
                format!("{at}.name"),
                format!("duplicate dependency {:?}", dep.name),
            );
            e.check(
                !(dep.name == self.service
                    && dep
                        .namespace
                        .as_deref()
                        .is_none_or(|ns| ns == self.namespace)),
                format!("{at}.name"),
                "a service may not depend on itself",
            );
            if let Some(ns) = &dep.namespace {
                e.check(
                    is_dns_label(ns),
                    format!("{at}.namespace"),
                    "must be a DNS label",
                );
            }
            resilience(&mut e, &at, &self.effective(dep));
        }

        e.check(
            self.inbound.max_concurrent >= 1,
            "inbound.maxConcurrent",
            "must be at least 1",
        );
        if let Some(rl) = &self.inbound.rate_limit {
            e.check(
                rl.per_second >= 1,
                "inbound.rateLimit.perSecond",
                "must be at least 1",
            );
        }
        if let Some(authz) = &self.inbound.authorization {
            for (i, rule) in authz.allow.iter().enumerate() {
                let at = format!("inbound.authorization.allow[{i}]");
                e.check(
                    rule.micro_service.is_some() != rule.service_account.is_some(),
                    &at,
                    "name exactly one of microService and serviceAccount",
                );
                let (ns, name) = rule.caller(&self.namespace);
                e.check(
                    is_dns_label(ns),
                    format!("{at}.namespace"),
                    "must be a DNS label",
                );
                e.check(
                    !name.is_empty() && name.len() <= 253 && !name.contains(['/', ':', ' ']),
                    &at,
                    "the caller's name must be a Kubernetes name",
                );
                if let Some(prefix) = &rule.path_prefix {
                    e.check(
                        prefix.starts_with('/') && !prefix.contains(char::is_whitespace),
                        format!("{at}.pathPrefix"),
                        "must be an absolute path without spaces",
                    );
                }
            }
        }
        if let Some(id) = &self.identity {
            e.check(
                !id.trust_domain.is_empty()
                    && id.trust_domain.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)
                    }),
                "identity.trustDomain",
                "must be lowercase letters, digits, '-', '.' or '_'",
            );
            e.check(
                id.trust_bundle.contains("-----BEGIN CERTIFICATE-----"),
                "identity.trustBundle",
                "must hold at least one PEM certificate",
            );
            e.check(
                id.issuer_address
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0)),
                "identity.issuerAddress",
                "must be host:port",
            );
        }
        e.check(
            (0.0..=1.0).contains(&self.tracing.sample_ratio),
            "tracing.sampleRatio",
            "must be between 0 and 1",
        );
        if e.0.is_empty() { Ok(()) } else { Err(e.0) }
    }
}

fn resilience(e: &mut Errors, at: &str, r: &Resilience) {
    e.check(
        !r.timeout.get().is_zero(),
        format!("{at}.timeout"),
        "must be more than zero",
    );
    if let Some(per_try) = r.per_try_timeout {
        e.check(
            per_try <= r.timeout,
            format!("{at}.perTryTimeout"),
            "perTryTimeout must not exceed timeout",
        );
    }
    retry(e, &format!("{at}.retry"), &r.retry);
    breaker(e, &format!("{at}.circuitBreaker"), &r.circuit_breaker);
}

fn retry(e: &mut Errors, at: &str, r: &Retry) {
    e.check(
        (1..=10).contains(&r.attempts),
        format!("{at}.attempts"),
        "must be between 1 and 10",
    );
    e.check(
        r.statuses.iter().all(|s| (500..=599).contains(s)),
        format!("{at}.statuses"),
        "each status must be between 500 and 599",
    );
    backoff(e, &format!("{at}.backoff"), &r.backoff);
    e.check(
        (0.0..=1.0).contains(&r.budget.ratio),
        format!("{at}.budget.ratio"),
        "must be between 0 and 1",
    );
}

fn backoff(e: &mut Errors, at: &str, b: &Backoff) {
    e.check(
        b.base <= b.max,
        format!("{at}.base"),
        "backoff base must not exceed max",
    );
    e.check(
        (1.0..=10.0).contains(&b.multiplier),
        format!("{at}.multiplier"),
        "must be between 1 and 10",
    );
}

fn breaker(e: &mut Errors, at: &str, b: &CircuitBreaker) {
    e.check(
        b.consecutive_failures >= 1,
        format!("{at}.consecutiveFailures"),
        "must be at least 1",
    );
    e.check(
        b.failure_ratio > 0.0 && b.failure_ratio <= 1.0,
        format!("{at}.failureRatio"),
        "must be more than 0 and at most 1",
    );
    e.check(
        b.min_requests >= 1,
        format!("{at}.minRequests"),
        "must be at least 1",
    );
    e.check(
        b.half_open_requests >= 1,
        format!("{at}.halfOpenRequests"),
        "must be at least 1",
    );
    e.check(
        !b.interval.get().is_zero(),
        format!("{at}.interval"),
        "must be more than zero",
    );
    e.check(
        !b.open_for.get().is_zero(),
        format!("{at}.openFor"),
        "must be more than zero",
    );
    e.check(
        !b.failure_on.is_empty(),
        format!("{at}.failureOn"),
        "must name at least one kind of failure",
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dependency, Duration, RateLimit};

    fn policy() -> SidecarPolicy {
        SidecarPolicy::from_json(r#"{"service":"order","namespace":"shop","appPort":8080}"#)
            .expect("a minimal policy is valid")
    }

    fn fields(p: &SidecarPolicy) -> Vec<String> {
        p.validate()
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn an_allow_rule_names_exactly_one_caller() {
        let mut p = policy();
        p.inbound.authorization = Some(crate::Authorization {
            mode: crate::AuthorizationMode::Enforce,
            allow: vec![
                crate::AllowRule {
                    micro_service: Some("order".into()),
                    service_account: Some("order".into()),
                    namespace: None,
                    methods: vec![],
                    path_prefix: None,
                },
                crate::AllowRule {
                    micro_service: None,
                    service_account: None,
                    namespace: Some("Shop".into()),
                    methods: vec![],
                    path_prefix: Some("api".into()),
                },
            ],
        });
        assert_eq!(
            fields(&p),
            [
                "inbound.authorization.allow[0]",
                "inbound.authorization.allow[1]",
                "inbound.authorization.allow[1].namespace",
                "inbound.authorization.allow[1]",
                "inbound.authorization.allow[1].pathPrefix",
            ]
        );
    }

    #[test]
    fn a_minimal_policy_gets_the_design_defaults() {
        let p = policy();
        assert_eq!(p.resilience.retry.attempts, 3);
        assert_eq!(p.resilience.circuit_breaker.consecutive_failures, 5);
        assert_eq!(p.resilience.timeout, Duration::from_secs(2));
        assert_eq!(p.health.path, "/health");
        assert_eq!(p.inbound.max_concurrent, 512);
    }

    #[test]
    fn round_trips_through_json() {
        let mut p = policy();
        p.dependencies.push(Dependency {
            timeout: Some(Duration::from_millis(800)),
            ..Dependency::named("user")
        });
        p.inbound.rate_limit = Some(RateLimit {
            per_second: 200,
            burst: 50,
        });
        assert_eq!(SidecarPolicy::from_json(&p.to_json()).unwrap(), p);
    }

    #[test]
    fn names_each_field_at_fault() {
        let mut p = policy();
        p.resilience.retry.attempts = 0;
        p.resilience.circuit_breaker.failure_ratio = 0.0;
        p.resilience.circuit_breaker.half_open_requests = 0;
        p.resilience.retry.backoff.base = Duration::from_secs(5);
        p.tracing.sample_ratio = 1.5;
        assert_eq!(
            fields(&p),
            [
                "resilience.retry.attempts",
                "resilience.retry.backoff.base",
                "resilience.circuitBreaker.failureRatio",
                "resilience.circuitBreaker.halfOpenRequests",
                "tracing.sampleRatio",
            ]
        );
    }

    #[test]
    fn refuses_duplicate_and_self_dependencies() {
        let mut p = policy();
        p.dependencies = vec![
            Dependency::named("user"),
            Dependency::named("user"),
            Dependency::named("order"),
        ];
        assert_eq!(fields(&p), ["dependencies[1].name", "dependencies[2].name"]);
    }

    #[test]
    fn checks_overrides_in_their_dependency() {
        let mut p = policy();
        p.dependencies = vec![Dependency {
            per_try_timeout: Some(Duration::from_secs(10)),
            ..Dependency::named("user")
        }];
        assert_eq!(fields(&p), ["dependencies[0].perTryTimeout"]);
    }

    #[test]
    fn retry_on_is_retry_on_on_the_wire_and_on_is_still_read() {
        let p = policy();
        let json: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        assert!(json["resilience"]["retry"].get("retryOn").is_some());
        assert!(json["resilience"]["retry"].get("on").is_none());
        let old = SidecarPolicy::from_json(
            r#"{"service":"a","namespace":"b","appPort":1,"resilience":{"retry":{"on":["timeout"]}}}"#,
        )
        .unwrap();
        assert_eq!(old.resilience.retry.on, [crate::RetryOn::Timeout]);
    }

    #[test]
    fn parse_errors_are_not_validation_errors() {
        let err = SidecarPolicy::from_json(r#"{"service":"a","namespace":"b","appPort":"x"}"#)
            .unwrap_err();
        assert!(matches!(err, PolicyError::Parse(_)), "{err}");
        let err = SidecarPolicy::from_json(
            r#"{"service":"a","namespace":"b","appPort":1,"resilience":{"timeout":"2 seconds"}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
    }
}
