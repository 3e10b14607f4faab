//! The outbound side: the application's way to its dependencies.
//!
//! The listener on 127.0.0.1 takes requests in HTTP proxy form or with the
//! service in Host / `:authority`, finds the service ([`target`]), and hands
//! the request to that service's route ([`router`]), whose balancer picks an
//! [`endpoint`], or
//! [`no_endpoints`] refuses at once when nobody serves. A destination
//! outside the mesh goes to [`egress`] instead.

use http::{Request, Response};
use tower::util::BoxCloneSyncService;

use crate::http::{Body, BoxError};

pub mod egress;
pub mod endpoint;
pub mod no_endpoints;
pub mod route_cache;
pub mod router;
pub mod target;

/// The stack of one upstream service, or any part of it from the balancer
/// up: a request in, a response or an error out; cloned for each request
/// and shared by all of them.
pub type ServiceStack = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;
