//! The rustls side: the trust bundle, a workload's credentials, and the
//! configurations that make every mesh connection mutually authenticated.
//!
//! Both ends present a certificate chaining to the trust bundle. The
//! client checks that the server is the workload it meant to reach (its
//! SPIFFE ID, not a DNS name: endpoints are pod addresses); the server
//! accepts any workload of the bundle and hands the caller's identity to
//! authorization. TLS 1.3 only, ring's primitives.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::{SpiffeId, pem};

/// ALPN for HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The crypto every configuration here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why credentials or a bundle are not usable.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The trust bundle is empty or malformed.
    #[error("trust bundle: {0}")]
    Bundle(String),
    /// The certificate chain is malformed or does not fit the key.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The certificate does not chain to the bundle, or is not valid now.
    #[error("the certificate does not verify against the trust bundle: {0}")]
    Untrusted(TlsError),
}

/// The roots a workload trusts: every certificate in the bundle. During a
/// root rotation it holds the old and the new root, so certificates of
/// either verify.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
    pem: Arc<str>,
}

impl TrustBundle {
    /// Parses a PEM bundle of one or more CA certificates.
    pub fn from_pem(bundle: &str) -> Result<Self, CredentialsError> {
        let certs = pem::certificates(bundle).map_err(CredentialsError::Bundle)?;
        let mut roots = RootCertStore::empty();
        for (i, cert) in certs.into_iter().enumerate() {
            roots
                .add(cert)
                .map_err(|e| CredentialsError::Bundle(format!("certificate {}: {e}", i + 1)))?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            pem: bundle.into(),
        })
    }

    /// How many roots it holds.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Whether it holds no root (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The bundle as given.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A client configuration that checks a server's certificate the usual
    /// way (a DNS name), against this bundle: how a sidecar reaches the
    /// identity service.
    pub fn dns_client_config(&self) -> ClientConfig {
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth()
    }

    /// Checks that `chain` (leaf first) chains to this bundle and is valid at `now`.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<(), CredentialsError> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| CredentialsError::Certificate("the chain is empty".into()))?;
        let parsed = ParsedCertificate::try_from(leaf).map_err(CredentialsError::Untrusted)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            UnixTime::since_unix_epoch(
                now.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
            provider().signature_verification_algorithms.all,
        )
        .map_err(CredentialsError::Untrusted)
    }
}

/// A workload's certificate and key, with the bundle it trusts.
#[derive(Clone)]
pub struct Credentials {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivatePkcs8KeyDer<'static>>,
    not_after: SystemTime,
    bundle: TrustBundle,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Credentials from an issued chain and the key it certifies. The chain
    /// must name exactly one SPIFFE ID and verify against `bundle` now.
    pub fn new(
        chain_pem: &str,
        key: &rcgen::KeyPair,
        bundle: TrustBundle,
    ) -> Result<Self, CredentialsError> {
        let chain = pem::certificates(chain_pem).map_err(CredentialsError::Certificate)?;
        let id = SpiffeId::from_certificate(&chain[0])
            .map_err(|e| CredentialsError::Certificate(e.to_string()))?;
        bundle.verify(&chain, SystemTime::now())?;
        let not_after = not_after(&chain[0])?;
        Ok(Self {
            id,
            chain,
            key: Arc::new(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after,
            bundle,
        })
    }

    /// Whose credentials these are.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// When the certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The bundle they trust.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The same certificate, trusting another bundle (a rotation's overlap).
    pub fn with_bundle(&self, bundle: TrustBundle) -> Self {
        Self {
            bundle,
            ..self.clone()
        }
    }

    /// Time left before the certificate expires (zero once it has).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The inbound side: TLS 1.3, a client certificate from the bundle
    /// required, HTTP/2 and HTTP/1.1 offered by ALPN.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, CredentialsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.bundle.roots.clone(), provider())
                .build()
                .map_err(|e| CredentialsError::Bundle(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key())
            .map_err(|e| CredentialsError::Certificate(e.to_string()))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }

    /// The outbound side towards a workload that must be `peer`: this
    /// certificate presented, the server's checked against the bundle and
    /// its SPIFFE ID against `peer`, offering the `alpn` protocols (none:
    /// the server assumes HTTP/1.1).
    pub fn client_config(
        &self,
        peer: SpiffeId,
        alpn: &[&[u8]],
    ) -> Result<ClientConfig, CredentialsError> {
        let verifier = Arc::new(PeerVerifier {
            roots: self.bundle.roots.clone(),
            expected: peer,
            algorithms: provider().signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key())
            .map_err(|e| CredentialsError::Certificate(e.to_string()))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// A plain server configuration presenting this certificate, asking no
    /// client certificate: the identity service's own listener, which
    /// authenticates callers by their ServiceAccount token instead.
    pub fn server_config_without_client_auth(&self) -> Result<Arc<ServerConfig>, CredentialsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key())
            .map_err(|e| CredentialsError::Certificate(e.to_string()))?;
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }
}

/// When a DER certificate expires.
pub fn not_after(der: &[u8]) -> Result<SystemTime, CredentialsError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CredentialsError::Certificate(e.to_string()))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// The SPIFFE ID of a TLS peer, from the leaf of the chain it presented.
pub fn peer_id(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    chain
        .first()
        .and_then(|leaf| SpiffeId::from_certificate(leaf).ok())
}

/// Why a server was refused: not the workload the client meant to reach.
#[derive(Debug, thiserror::Error)]
#[error("the peer is {presented}, not {expected}")]
pub struct WrongPeer {
    /// Who the client meant to reach.
    pub expected: String,
    /// Who the certificate names (or what is wrong with it).
    pub presented: String,
}

/// Checks a server: a chain to the bundle, valid now, naming the expected
/// SPIFFE ID. The DNS name the client asked for is not checked: endpoints
/// are pod addresses, and the identity is what matters.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = SpiffeId::from_certificate(end_entity);
        if presented.as_ref() == Ok(&self.expected) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(TlsError::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(WrongPeer {
                expected: self.expected.to_string(),
                presented: match presented {
                    Ok(id) => id.to_string(),
                    Err(e) => e.to_string(),
                },
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
