//! The sidecar's side of issuance: a key made in the pod, and a request to
//! certify it.

use rcgen::{CertificateParams, KeyPair, SanType};

use crate::SpiffeId;

/// A new ECDSA P-256 key and a PEM certificate signing request for it that
/// names `id`. The key stays with the caller; only the request is sent.
/// The issuer certifies the identity it establishes itself, so the name
/// here is informative (it shows in the issuer's logs when they differ).
pub fn new_key_and_request(id: &SpiffeId) -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let csr = request_for(&key, id)?;
    Ok((key, csr))
}

/// A PEM certificate signing request for `key`, naming `id`.
pub fn request_for(key: &KeyPair, id: &SpiffeId) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.serialize_request(key)?.pem()
}
