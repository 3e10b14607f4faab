//! PEM in and out: certificates, chains and bundles as Kubernetes stores them.

use rustls_pki_types::{CertificateDer, pem::PemObject};

/// Every certificate in `pem`, in order; an error when there is none or a
/// block is malformed.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

/// The DER of the one block labelled `label` in `pem`.
pub fn decode_one(pem: &str, label: &str) -> Result<Vec<u8>, String> {
    let block = pem::parse(pem).map_err(|e| format!("malformed PEM: {e}"))?;
    if block.tag() != label {
        return Err(format!(
            "a {} block where a {label} was expected",
            block.tag()
        ));
    }
    Ok(block.into_contents())
}

/// `der` as one PEM block labelled `label`.
pub fn encode(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}
