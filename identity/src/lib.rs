//! Workload identity for the Trellis mesh.
//!
//! A pod is its ServiceAccount, named by a [`SpiffeId`]. The identity
//! service holds an [`Issuer`] and certifies the key a sidecar generated
//! (a [`request`]), for the identity it established from the sidecar's
//! ServiceAccount token ([`api`]). Sidecars then hold [`Credentials`] and a
//! [`TrustBundle`] and speak mutual TLS ([`tls`]): the caller checks that
//! the server is the workload it meant to reach, the server learns who
//! called. One crate for the operator's identity service and the sidecar,
//! so the two cannot disagree on a name or a check.

pub mod api;
mod issuer;
pub mod pem;
pub mod request;
mod spiffe;
pub mod tls;

pub use issuer::{BACKDATE, IssueError, Issued, Issuer};
pub use rcgen::KeyPair;
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use tls::{Credentials, CredentialsError, TrustBundle};
