//! The Trellis operator: reconciles `MicroService` resources into running
//! services with the Trellis sidecar.
//!
//! - [`crd`]: the `MicroService` types and their CRD.
//! - [`validate`]: the operator's own checks, mirroring the CRD's rules.
//! - [`render`]: pure functions from a MicroService to its child objects.
//! - [`status`]: pure functions from what the operator saw to the status.
//! - [`controller`]: the kube-runtime controller that applies them: `run`,
//!   `reconcile` and `error_policy` in its root; the watches and caches
//!   (`watch`), planning and applying the children (`apply`), the status and
//!   Events (`report`) and the errors (`error`) in its modules.
//! - [`grants`]: the sidecar's reads in its dependencies' other namespaces.
//! - [`leader`]: leader election on a Lease.
//! - [`metrics`], [`admin`], [`telemetry`]: operations.

pub mod admin;
pub mod controller;
pub mod crd;
pub mod gateway;
pub mod grants;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod status;
pub mod telemetry;
pub mod validate;

pub use controller::{Context, Error, IdentityConfig, Settings, run};
pub use crd::{MicroService, MicroServiceSpec, MicroServiceStatus, Phase};
