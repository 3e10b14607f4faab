//! Mutual TLS between sidecars: the workload's certificate, kept current,
//! and the TLS configurations both listeners' paths use.
//!
//! [`MeshTls`] holds the credentials in force. [`certify`] obtains them
//! from the identity service and renews them well before they expire;
//! the inbound listener accepts TLS with [`MeshTls::server_config`], and
//! the upstream client opens TLS to a meshed destination with
//! [`MeshTls::client_config`], which checks that the server is the
//! workload the destination's identity says. A sidecar whose policy names
//! no mesh identity has no credentials and speaks plaintext.

pub mod certify;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use prometheus_client::metrics::gauge::Gauge;
use rustls::{ClientConfig, ServerConfig};
use serde::Serialize;
use trellis_identity::{Credentials, SpiffeId, TrustBundle};

/// The peer identities `/status` remembers; more are counted, not named.
const MAX_PEERS_SEEN: usize = 256;

/// Who is on the other end of an inbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A meshed workload, authenticated by mutual TLS.
    Mesh(Arc<SpiffeId>),
    /// A plaintext caller: no identity.
    Plaintext,
}

impl Peer {
    /// The identity, as authorization and logs name it.
    pub fn describe(&self) -> String {
        match self {
            Self::Mesh(id) => id.to_string(),
            Self::Plaintext => "a plaintext caller (no mesh identity)".into(),
        }
    }
}

struct Current {
    credentials: Credentials,
    server: Arc<ServerConfig>,
    generation: u64,
}

#[derive(Default)]
struct Inner {
    current: RwLock<Option<Current>>,
    last_error: Mutex<Option<String>>,
    peers: Mutex<BTreeMap<String, u64>>,
    expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// The workload's mesh credentials, shared by every path that needs them.
#[derive(Clone)]
pub struct MeshTls(Arc<Inner>);

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("generation", &self.generation())
            .finish()
    }
}

impl Default for MeshTls {
    fn default() -> Self {
        Self::new(Gauge::default())
    }
}

/// What `/status` says about identity.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityStatus {
    /// This workload's SPIFFE ID, once certified.
    pub identity: Option<String>,
    /// When the certificate expires (RFC 3339).
    pub expires: Option<String>,
    /// Seconds until it does (0 once it has).
    pub expires_in_seconds: Option<u64>,
    /// Roots in the trust bundle.
    pub trust_roots: usize,
    /// How many times the credentials changed (certificates and bundles).
    pub updates: u64,
    /// The last failure to obtain one, while it is not resolved.
    pub last_error: Option<String>,
    /// Mesh peers that called in, with their connection counts.
    pub peers_seen: BTreeMap<String, u64>,
}

impl MeshTls {
    /// No credentials yet; `expiry` is the gauge of seconds left.
    pub fn new(expiry: Gauge<f64, std::sync::atomic::AtomicU64>) -> Self {
        Self(Arc::new(Inner {
            expiry,
            ..Inner::default()
        }))
    }

    /// Puts `credentials` in force for new connections (open ones keep
    /// theirs until they close).
    pub fn set(&self, credentials: Credentials) -> Result<(), trellis_identity::CredentialsError> {
        let server = credentials.server_config()?;
        let mut current = self.0.current.write().expect("credentials lock");
        let generation = current.as_ref().map_or(1, |c| c.generation + 1);
        *current = Some(Current {
            credentials,
            server,
            generation,
        });
        drop(current);
        *self.0.last_error.lock().expect("error lock") = None;
        self.refresh_expiry();
        Ok(())
    }

    /// Trusts `bundle` from now on with the same certificate (a root
    /// rotation's overlap reaches the sidecar through its policy).
    pub fn set_bundle(
        &self,
        bundle: TrustBundle,
    ) -> Result<(), trellis_identity::CredentialsError> {
        let Some(creds) = self.credentials() else {
            return Ok(());
        };
        if creds.bundle().pem() == bundle.pem() {
            return Ok(());
        }
        self.set(creds.with_bundle(bundle))
    }

    /// The credentials in force.
    pub fn credentials(&self) -> Option<Credentials> {
        let current = self.0.current.read().expect("credentials lock");
        current.as_ref().map(|c| c.credentials.clone())
    }

    /// Records why obtaining a certificate failed, for health and `/status`.
    pub fn set_error(&self, error: String) {
        *self.0.last_error.lock().expect("error lock") = Some(error);
    }

    /// The inbound TLS configuration, once certified and while the
    /// certificate is valid.
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        let current = self.0.current.read().expect("credentials lock");
        current.as_ref().map(|c| c.server.clone())
    }

    /// The outbound TLS configuration towards `peer` (no ALPN: the
    /// client adds the protocol it speaks), with the generation of the
    /// credentials it holds; `None` before the first certificate.
    pub fn client_config(&self, peer: &SpiffeId) -> Option<(ClientConfig, u64)> {
        let current = self.0.current.read().expect("credentials lock");
        let c = current.as_ref()?;
        let config = c.credentials.client_config(peer.clone(), &[]).ok()?;
        Some((config, c.generation))
    }

    /// The identity of ServiceAccount `account` in `namespace` in this
    /// workload's trust domain; `None` without credentials of our own.
    pub fn peer(&self, namespace: &str, account: &str) -> Option<SpiffeId> {
        let current = self.0.current.read().expect("credentials lock");
        let td = &current.as_ref()?.credentials.id().trust_domain;
        Some(SpiffeId::new(td, namespace, account))
    }

    /// The generation of the credentials in force (0: none yet).
    pub fn generation(&self) -> u64 {
        let current = self.0.current.read().expect("credentials lock");
        current.as_ref().map_or(0, |c| c.generation)
    }

    /// Counts a connection from `peer` (bounded: the first peers are named).
    pub fn saw(&self, peer: &SpiffeId) {
        let mut peers = self.0.peers.lock().expect("peers lock");
        let name = peer.to_string();
        if let Some(n) = peers.get_mut(&name) {
            *n += 1;
        } else if peers.len() < MAX_PEERS_SEEN {
            peers.insert(name, 1);
        }
    }

    /// Why the workload has no valid certificate, if it has none.
    pub fn problem(&self, now: SystemTime) -> Option<String> {
        let error = self.0.last_error.lock().expect("error lock").clone();
        let because = error.map(|e| format!(": {e}")).unwrap_or_default();
        match self.credentials() {
            None => Some(format!("no mesh certificate yet{because}")),
            Some(c) if c.not_after() <= now => Some(format!(
                "the mesh certificate of {} expired at {} and could not be renewed{because}",
                c.id(),
                humantime::format_rfc3339_seconds(c.not_after())
            )),
            Some(_) => None,
        }
    }

    /// Updates the seconds-left gauge.
    pub fn refresh_expiry(&self) {
        let left = self
            .credentials()
            .map_or(0.0, |c| c.remaining(SystemTime::now()).as_secs_f64());
        self.0.expiry.set(left);
    }

    /// The identity part of `/status`.
    pub fn status(&self) -> IdentityStatus {
        let creds = self.credentials();
        let generation = self
            .0
            .current
            .read()
            .expect("credentials lock")
            .as_ref()
            .map_or(0, |c| c.generation);
        IdentityStatus {
            identity: creds.as_ref().map(|c| c.id().to_string()),
            expires: creds
                .as_ref()
                .map(|c| humantime::format_rfc3339_seconds(c.not_after()).to_string()),
            expires_in_seconds: creds
                .as_ref()
                .map(|c| c.remaining(SystemTime::now()).as_secs()),
            trust_roots: creds.as_ref().map_or(0, |c| c.bundle().len()),
            updates: generation,
            last_error: self.0.last_error.lock().expect("error lock").clone(),
            peers_seen: self.0.peers.lock().expect("peers lock").clone(),
        }
    }
}
