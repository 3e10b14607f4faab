//! TLS at the edge: the certificates of a port's HTTPS listeners, chosen
//! by the client's SNI (an exact hostname, then the longest wildcard, then
//! a listener without a hostname).

use std::{collections::HashMap, sync::Arc};

use rustls::{
    ServerConfig,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use trellis_policy::gateway::Certificate;

/// The certificates of one port.
#[derive(Debug, Default)]
struct BySni {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By suffix (`.example.com`), longest first.
    wildcards: Vec<(String, Arc<CertifiedKey>)>,
    any: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name().map(str::to_ascii_lowercase) else {
            return self.any.clone();
        };
        self.exact
            .get(&name)
            .or_else(|| {
                self.wildcards
                    .iter()
                    .find(|(suffix, _)| {
                        name.len() > suffix.len() && name.ends_with(suffix.as_str())
                    })
                    .map(|(_, k)| k)
            })
            .or(self.any.as_ref())
            .cloned()
    }
}

fn certified(c: &Certificate) -> Result<Arc<CertifiedKey>, String> {
    let at = c.hostname.as_deref().unwrap_or("any host");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(c.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the certificate for {at} is not PEM: {e}"))?;
    if chain.is_empty() {
        return Err(format!("the certificate for {at} holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
        .map_err(|e| format!("the private key for {at} is not PEM: {e}"))?;
    let signer = any_supported_type(&key)
        .map_err(|e| format!("the private key for {at} is not usable: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// A server configuration presenting `certificates` by SNI, offering
/// HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(certificates: &[Certificate]) -> Result<Arc<ServerConfig>, String> {
    let mut by_sni = BySni::default();
    for c in certificates {
        let key = certified(c)?;
        match c.hostname.as_deref().map(str::to_ascii_lowercase) {
            None => by_sni.any = Some(key),
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => by_sni.wildcards.push((suffix.to_owned(), key)),
                None => {
                    by_sni.exact.insert(h, key);
                }
            },
        }
    }
    by_sni
        .wildcards
        .sort_by_key(|w| std::cmp::Reverse(w.0.len()));
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(by_sni));
    config.alpn_protocols = vec![
        trellis_identity::tls::ALPN_H2.to_vec(),
        trellis_identity::tls::ALPN_HTTP1.to_vec(),
    ];
    Ok(Arc::new(config))
}
