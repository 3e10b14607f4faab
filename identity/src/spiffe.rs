//! SPIFFE IDs: the name a workload proves with its certificate.
//!
//! A pod's identity is its ServiceAccount, written as
//! `spiffe://<trust domain>/ns/<namespace>/sa/<name>`, the form Istio and
//! Linkerd use, so a certificate names exactly one ServiceAccount of one
//! cluster and nothing else.

use std::{fmt, str::FromStr};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The identity of a workload: a ServiceAccount in a trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The trust domain, `cluster.local` by default.
    pub trust_domain: String,
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub service_account: String,
}

/// Why a string or a certificate does not name a workload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    /// Not of the form `spiffe://<trust domain>/ns/<namespace>/sa/<name>`.
    #[error(
        "{0:?} is not a workload identity: expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
    )]
    Malformed(String),
    /// The certificate could not be parsed.
    #[error("the certificate cannot be parsed: {0}")]
    Certificate(String),
    /// The certificate carries no SPIFFE ID, or more than one.
    #[error("the certificate names {0} SPIFFE IDs; a workload certificate names exactly one")]
    Count(usize),
}

impl SpiffeId {
    /// The identity of ServiceAccount `name` in `namespace`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// The one SPIFFE ID among the URI names of a DER certificate.
    pub fn from_certificate(der: &[u8]) -> Result<Self, SpiffeIdError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| SpiffeIdError::Certificate(e.to_string()))?;
        let names = cert
            .subject_alternative_name()
            .map_err(|e| SpiffeIdError::Certificate(e.to_string()))?;
        let uris: Vec<&str> = names
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|n| match n {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [one] => one.parse(),
            other => Err(SpiffeIdError::Count(other.len())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A trust domain or path segment: lowercase letters, digits, `-`, `.` and
/// `_` (SPIFFE's trust domain characters, which cover Kubernetes names).
fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || SpiffeIdError::Malformed(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| is_segment(p)) => {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(malformed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_string_form() {
        let id = SpiffeId::new("cluster.local", "shop", "order");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/order");
        assert_eq!(id.to_string().parse::<SpiffeId>(), Ok(id));
    }

    #[test]
    fn refuses_what_is_not_a_workload_identity() {
        for bad in [
            "",
            "https://cluster.local/ns/shop/sa/order",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/order/extra",
            "spiffe://cluster.local/ns//sa/order",
            "spiffe://Cluster.local/ns/shop/sa/order",
            "spiffe://cluster.local/sa/shop/ns/order",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} was accepted");
        }
    }
}
