//! The issuer: the key that certifies workloads, and the root it may be.
//!
//! The identity service holds one [`Issuer`]. It signs a certificate for
//! the public key of a sidecar's certificate signing request, naming the
//! identity the service established from the sidecar's ServiceAccount token,
//! never the names the request asks for: a sidecar cannot choose who it is.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;

use crate::SpiffeId;

/// How far back a certificate's validity starts, so a peer whose clock is
/// a little behind the issuer's accepts it at once.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The issuer's certificate or key is not usable.
    #[error("the issuer's certificate or key is not usable: {0}")]
    Issuer(String),
    /// The certificate signing request is malformed or its signature is wrong.
    #[error("the certificate signing request is refused: {0}")]
    Request(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A certificate made by the issuer, with what it was issued for.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf followed by the issuer's certificate, in PEM.
    pub chain_pem: String,
    /// When the leaf stops being valid.
    pub not_after: SystemTime,
}

/// A certificate authority: its certificate and its private key.
pub struct Issuer {
    issuer: rcgen::Issuer<'static, KeyPair>,
    subject: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Issuer")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive INTEGER: the first bit clear.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

impl Issuer {
    /// A new self-signed root for `trust_domain`, valid for `validity` (an
    /// ECDSA P-256 key, like the workloads').
    pub fn new_root(trust_domain: &str, validity: Duration) -> Result<Self, IssueError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("trellis root for {trust_domain}"),
        );
        dn.push(DnType::OrganizationName, "trellis");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            subject: format!("trellis root for {trust_domain}"),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// The issuer from its certificate and PKCS#8 key, both PEM (the
    /// `ca.crt` and `ca.key` of its Secret).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IssueError> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| IssueError::Issuer(format!("ca.key: {e}")))?;
        let cert_der = crate::pem::certificates(cert_pem)
            .map_err(|e| IssueError::Issuer(format!("ca.crt: {e}")))?
            .into_iter()
            .next()
            .expect("certificates() returns at least one");
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| IssueError::Issuer(format!("ca.crt: {e}")))?;
        if !x509.is_ca() {
            return Err(IssueError::Issuer("ca.crt is not a CA certificate".into()));
        }
        if key.subject_public_key_info() != x509.tbs_certificate.subject_pki.raw {
            return Err(IssueError::Issuer("ca.key is not the key of ca.crt".into()));
        }
        let subject = x509.subject().to_string();
        let issuer = rcgen::Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| IssueError::Issuer(format!("ca.crt: {e}")))?;
        Ok(Self {
            issuer,
            subject,
            cert_pem: cert_pem.trim().to_owned() + "\n",
            cert_der,
        })
    }

    /// The issuer's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The issuer's certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The issuer's private key, PKCS#8 PEM: only for storing it in its Secret.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Certifies the key of a certificate signing request as `id`, for
    /// `lifetime`. The request's signature is checked (the requester holds
    /// the key); the names it asks for are ignored.
    pub fn certify_request(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Issued, IssueError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IssueError::Request(e.to_string()))?;
        self.certify(&csr.public_key, Some(id), &[], SystemTime::now(), lifetime)
    }

    /// Certifies `key` as `id` (when given) and the DNS `names`, valid from
    /// `from` (backdated by [`BACKDATE`]) for `lifetime`, for both server
    /// and client authentication, since a sidecar is both.
    pub fn certify(
        &self,
        key: &impl PublicKeyData,
        id: Option<&SpiffeId>,
        dns_names: &[String],
        from: SystemTime,
        lifetime: Duration,
    ) -> Result<Issued, IssueError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let mut sans = Vec::new();
        if let Some(id) = id {
            let uri = id.to_string().try_into()?;
            sans.push(SanType::URI(uri));
        }
        for name in dns_names {
            sans.push(SanType::DnsName(name.clone().try_into()?));
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (from - BACKDATE).into();
        let not_after = from + lifetime;
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        let leaf = params.signed_by(key, &self.issuer)?;
        Ok(Issued {
            chain_pem: format!("{}{}", leaf.pem(), self.cert_pem),
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issuer_survives_its_secret() {
        let root = Issuer::new_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let again = Issuer::from_pem(root.cert_pem(), &root.key_pem()).unwrap();
        assert_eq!(again.cert_der(), root.cert_der());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let a = Issuer::new_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let b = Issuer::new_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let err = Issuer::from_pem(a.cert_pem(), &b.key_pem()).unwrap_err();
        assert!(err.to_string().contains("not the key of ca.crt"), "{err}");
    }

    #[test]
    fn a_request_gets_the_identity_it_proved_not_the_one_it_asked_for() {
        let root = Issuer::new_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let asked = SpiffeId::new("cluster.local", "shop", "admin");
        let (_key, csr) = crate::request::new_key_and_request(&asked).unwrap();
        let proved = SpiffeId::new("cluster.local", "shop", "order");
        let issued = root
            .certify_request(&csr, &proved, Duration::from_secs(60))
            .unwrap();
        let leaf = crate::pem::certificates(&issued.chain_pem).unwrap();
        assert_eq!(SpiffeId::from_certificate(&leaf[0]).unwrap(), proved);
    }

    #[test]
    fn a_tampered_request_is_refused() {
        let root = Issuer::new_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "order");
        let (_key, csr) = crate::request::new_key_and_request(&id).unwrap();
        let mut der = crate::pem::decode_one(&csr, "CERTIFICATE REQUEST").unwrap();
        let last = der.len() - 1;
        der[last] ^= 1;
        let tampered = crate::pem::encode("CERTIFICATE REQUEST", &der);
        assert!(matches!(
            root.certify_request(&tampered, &id, Duration::from_secs(60)),
            Err(IssueError::Request(_))
        ));
    }
}
