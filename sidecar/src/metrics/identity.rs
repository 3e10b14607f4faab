//! Identity and authorization: the certificate's time left, renewals, and
//! inbound requests refused (or, in audit, that would have been) by
//! authorization or by mutual TLS being required.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Metrics;

/// How a certificate request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Renewal {
    /// A certificate was issued and put in force.
    issued,
    /// The request failed; the current certificate stays in force.
    failed,
}

/// What authorization did with a request no rule allowed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Verdict {
    /// Refused with 403 (`Enforce`).
    denied,
    /// Let through, but no rule allowed it (`Audit`).
    audit_denied,
    /// A plaintext caller refused because mutual TLS is `Strict`.
    plaintext_refused,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RenewalLabels {
    result: Renewal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    service: String,
    verdict: Verdict,
}

/// The identity families.
pub(super) struct Families {
    pub(super) expiry: Gauge<f64, AtomicU64>,
    renewals: Family<RenewalLabels, Counter>,
    refused: Family<VerdictLabels, Counter>,
}

impl Families {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "identity_certificate_expiry_seconds",
            "Seconds until the mesh certificate expires (0 without one)",
            expiry.clone(),
        );
        let renewals = Family::default();
        registry.register(
            "identity_certificate_requests",
            "Certificate requests to the identity service, by result",
            renewals.clone(),
        );
        let refused = Family::default();
        registry.register(
            "inbound_authorization_refused",
            "Inbound requests no authorization rule allowed (audit_denied: served anyway) or refused for lack of mutual TLS",
            refused.clone(),
        );
        Self {
            expiry,
            renewals,
            refused,
        }
    }
}

impl Metrics {
    /// The gauge of seconds until the certificate expires.
    pub fn certificate_expiry(&self) -> Gauge<f64, AtomicU64> {
        self.0.identity.expiry.clone()
    }

    /// Counts a certificate request.
    pub fn certificate_request(&self, result: Renewal) {
        self.0
            .identity
            .renewals
            .get_or_create(&RenewalLabels { result })
            .inc();
    }

    /// Counts an inbound request refused (or audited) by identity.
    pub fn authorization_refused(&self, service: &str, verdict: Verdict) {
        self.0
            .identity
            .refused
            .get_or_create(&VerdictLabels {
                service: service.to_owned(),
                verdict,
            })
            .inc();
    }
}
