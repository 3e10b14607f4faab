//! Deciding a certify request: who the token proves the caller is, and the
//! certificate for the key it sent. Separate from the server so the
//! decisions are tested without TLS or an apiserver.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use http::StatusCode;
use trellis_identity::{
    Issuer, SpiffeId,
    api::{CertifyRequest, CertifyResponse},
};

/// What a token review established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Review {
    /// The token is a ServiceAccount's, for our audience.
    ServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The token is not accepted, and why.
    Refused(String),
}

/// Checks bearer tokens: TokenReview against the apiserver in production
/// ([`super::token_review::KubeReviewer`]), a fake in unit tests.
pub trait TokenReviewer: Send + Sync + 'static {
    /// Reviews `token`; `Err` when the review itself could not be made.
    fn review(&self, token: &str) -> BoxFuture<'static, Result<Review, String>>;
}

/// Why a request was not answered with a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// No bearer token, or one that is refused.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The body or the CSR is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The token could not be reviewed (the apiserver is unreachable).
    #[error("cannot review the token now: {0}")]
    Unavailable(String),
    /// Signing failed.
    #[error("cannot issue: {0}")]
    Issue(String),
}

impl CertifyError {
    /// The HTTP status it answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Issue(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Issues workload certificates for reviewed tokens.
pub struct Certifier {
    issuer: RwLock<Arc<Issuer>>,
    trust_domain: String,
    lifetime: Duration,
    reviewer: Box<dyn TokenReviewer>,
}

impl Certifier {
    /// Certifies with `issuer` for `lifetime`, identities in `trust_domain`.
    pub fn new(
        issuer: Issuer,
        trust_domain: &str,
        lifetime: Duration,
        reviewer: impl TokenReviewer,
    ) -> Self {
        Self {
            issuer: RwLock::new(Arc::new(issuer)),
            trust_domain: trust_domain.to_owned(),
            lifetime,
            reviewer: Box::new(reviewer),
        }
    }

    /// The issuer in force.
    pub fn issuer(&self) -> Arc<Issuer> {
        self.issuer.read().expect("issuer lock").clone()
    }

    /// Puts a new issuer in force (a rotation).
    pub fn set_issuer(&self, issuer: Issuer) {
        *self.issuer.write().expect("issuer lock") = Arc::new(issuer);
    }

    /// Answers one request: the `Authorization` header's value and the body.
    pub async fn certify(
        &self,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Result<CertifyResponse, CertifyError> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                CertifyError::Unauthenticated(
                    "send the pod's projected ServiceAccount token as Authorization: Bearer".into(),
                )
            })?;
        let request: CertifyRequest = serde_json::from_slice(body).map_err(|e| {
            CertifyError::BadRequest(format!("the body is not a certify request: {e}"))
        })?;
        let (namespace, name) = match self
            .reviewer
            .review(token)
            .await
            .map_err(CertifyError::Unavailable)?
        {
            Review::ServiceAccount { namespace, name } => (namespace, name),
            Review::Refused(why) => return Err(CertifyError::Unauthenticated(why)),
        };
        let id = SpiffeId::new(&self.trust_domain, &namespace, &name);
        let issued = self
            .issuer()
            .certify_request(&request.csr, &id, self.lifetime)
            .map_err(|e| match e {
                trellis_identity::IssueError::Request(why) => CertifyError::BadRequest(why),
                other => CertifyError::Issue(other.to_string()),
            })?;
        tracing::info!(identity = %id, lifetime = ?self.lifetime, "certificate issued");
        Ok(CertifyResponse {
            identity: id.to_string(),
            certificate_chain: issued.chain_pem,
            not_after_unix: issued
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::{TrustBundle, pem, request::new_key_and_request};

    /// Accepts `good-<ns>-<sa>`, refuses anything else, fails on `down`.
    struct Fake;

    impl TokenReviewer for Fake {
        fn review(&self, token: &str) -> BoxFuture<'static, Result<Review, String>> {
            let token = token.to_owned();
            Box::pin(async move {
                if token == "down" {
                    return Err("connection refused".into());
                }
                Ok(
                    match token.strip_prefix("good-").and_then(|t| t.split_once('-')) {
                        Some((ns, sa)) => Review::ServiceAccount {
                            namespace: ns.into(),
                            name: sa.into(),
                        },
                        None => Review::Refused("the token is not valid".into()),
                    },
                )
            })
        }
    }

    fn certifier() -> Certifier {
        let root = Issuer::new_root("cluster.local", Duration::from_secs(3600)).unwrap();
        Certifier::new(root, "cluster.local", Duration::from_secs(600), Fake)
    }

    fn body_for(sa: &str) -> Vec<u8> {
        let (_, csr) = new_key_and_request(&SpiffeId::new("cluster.local", "shop", sa)).unwrap();
        serde_json::to_vec(&CertifyRequest { csr }).unwrap()
    }

    #[tokio::test]
    async fn a_reviewed_token_gets_a_certificate_for_its_service_account_only() {
        let c = certifier();
        // The CSR asks for `admin`; the token proves `order`.
        let answer = c
            .certify(Some("Bearer good-shop-order"), &body_for("admin"))
            .await
            .unwrap();
        assert_eq!(answer.identity, "spiffe://cluster.local/ns/shop/sa/order");
        let chain = pem::certificates(&answer.certificate_chain).unwrap();
        assert_eq!(
            SpiffeId::from_certificate(&chain[0]).unwrap().to_string(),
            answer.identity
        );
        let bundle = TrustBundle::from_pem(c.issuer().cert_pem()).unwrap();
        bundle.verify(&chain, SystemTime::now()).unwrap();
        let left = answer.not_after_unix
            - SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs();
        assert!((590..=600).contains(&left), "{left}");
    }

    #[tokio::test]
    async fn refusals_say_why_with_the_right_status() {
        let c = certifier();
        let cases = [
            (None, body_for("order"), StatusCode::UNAUTHORIZED),
            (Some("Basic abc"), body_for("order"), StatusCode::UNAUTHORIZED),
            (Some("Bearer forged"), body_for("order"), StatusCode::UNAUTHORIZED),
            (Some("Bearer down"), body_for("order"), StatusCode::SERVICE_UNAVAILABLE),
            (Some("Bearer good-shop-order"), b"{}".to_vec(), StatusCode::BAD_REQUEST),
            (
                Some("Bearer good-shop-order"),
                br#"{"csr":"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}"#.to_vec(),
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (auth, body, status) in cases {
            let err = c.certify(auth, &body).await.unwrap_err();
            assert_eq!(err.status(), status, "{auth:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_new_issuer_signs_from_then_on() {
        let c = certifier();
        let next = Issuer::new_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let next_bundle = TrustBundle::from_pem(next.cert_pem()).unwrap();
        c.set_issuer(next);
        let answer = c
            .certify(Some("Bearer good-shop-order"), &body_for("order"))
            .await
            .unwrap();
        let chain = pem::certificates(&answer.certificate_chain).unwrap();
        next_bundle.verify(&chain, SystemTime::now()).unwrap();
    }
}
