//! What a sidecar and the identity service say to each other.
//!
//! `POST /v1/certify` over TLS (the service's certificate names
//! `trellis-identity.<namespace>.svc` and chains to the trust bundle), with
//! the sidecar's projected ServiceAccount token as `Authorization: Bearer`
//! and a [`CertifyRequest`] as JSON; the answer is a [`CertifyResponse`],
//! or an error status with a one-line reason in the body.

use serde::{Deserialize, Serialize};

/// The path of the certify call.
pub const CERTIFY_PATH: &str = "/v1/certify";

/// The audience of the ServiceAccount tokens the identity service accepts:
/// a token made for the Kubernetes API is not accepted, and one made for
/// the identity service is no good anywhere else.
pub const TOKEN_AUDIENCE: &str = "trellis-identity";

/// A request to certify a key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyRequest {
    /// A PKCS#10 certificate signing request, PEM.
    pub csr: String,
}

/// A certificate for the requester's key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyResponse {
    /// The identity certified, `spiffe://…`.
    pub identity: String,
    /// The leaf and the issuer's certificate, PEM.
    pub certificate_chain: String,
    /// When the leaf expires, seconds since the Unix epoch.
    pub not_after_unix: u64,
}
