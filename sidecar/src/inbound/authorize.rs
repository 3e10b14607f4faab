//! Who may call the application: mutual TLS required (`Strict`) and the
//! authorization rules of `inbound.authorization`, checked against the
//! caller's identity from its certificate.
//!
//! A refusal answers 403 naming the caller's identity and the reason. In
//! `Audit` the request goes through and the refusal is logged and counted
//! (`trellis_inbound_authorization_refused{verdict="audit_denied"}`), so a
//! policy can be tried on live traffic before it is enforced. Both are
//! recorded on the request's server span as an event.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::{
    TryFutureExt,
    future::{self, BoxFuture, Either},
};
use http::{Request, Response};
use tower::Service;
use trellis_identity::SpiffeId;
use trellis_policy::{AuthorizationMode, HttpMethod, MtlsMode, SidecarPolicy};

use crate::{
    http::{Body, BoxError, response::ProxyError},
    metrics::{Metrics, Verdict},
    mtls::Peer,
};

/// On a response that authorization let through in `Audit` although no
/// rule allowed it: the server span records it as an event.
#[derive(Clone, Debug)]
pub struct AuditDenied {
    /// The caller's identity.
    pub caller: String,
    /// Why it would have been refused.
    pub reason: &'static str,
}

/// One allow rule, resolved to the identity it allows.
#[derive(Debug)]
struct Allowed {
    caller: SpiffeId,
    methods: Vec<HttpMethod>,
    path_prefix: Option<String>,
}

/// The checks of one policy.
#[derive(Debug)]
pub struct Rules {
    service: String,
    /// Plaintext callers are refused.
    strict: bool,
    /// `None`: any caller (that passed `strict`).
    authorization: Option<(AuthorizationMode, Vec<Allowed>)>,
}

impl Rules {
    /// The checks `policy` asks for. Without a mesh identity nobody has
    /// one, so neither mutual TLS nor authorization can be required; the
    /// sidecar says so in its log once per policy.
    pub fn from_policy(policy: &SidecarPolicy) -> Option<Arc<Self>> {
        let Some(identity) = &policy.identity else {
            if policy.inbound.authorization.is_some() {
                tracing::warn!(
                    "inbound.authorization is set but the mesh has no identity: every caller is served"
                );
            }
            return None;
        };
        let authorization = policy.inbound.authorization.as_ref().map(|a| {
            let allowed = a
                .allow
                .iter()
                .map(|rule| {
                    let (ns, name) = rule.caller(&policy.namespace);
                    Allowed {
                        caller: SpiffeId::new(&identity.trust_domain, ns, name),
                        methods: rule.methods.clone(),
                        path_prefix: rule.path_prefix.clone(),
                    }
                })
                .collect();
            (a.mode, allowed)
        });
        Some(Arc::new(Self {
            service: policy.service.clone(),
            strict: policy.inbound.mtls == MtlsMode::Strict,
            authorization,
        }))
    }

    /// `None` when `peer` may make `req`, else why not.
    fn refusal<B>(&self, peer: &Peer, req: &Request<B>) -> Option<(&'static str, Verdict)> {
        if self.strict && *peer == Peer::Plaintext {
            return Some((
                "this service accepts mutual TLS only (inbound.mtls is Strict); call it from a meshed pod, or set inbound.mtls to Permissive",
                Verdict::plaintext_refused,
            ));
        }
        let (mode, allowed) = self.authorization.as_ref()?;
        let verdict = match mode {
            AuthorizationMode::Enforce => Verdict::denied,
            AuthorizationMode::Audit => Verdict::audit_denied,
        };
        let Peer::Mesh(id) = peer else {
            return Some(("inbound.authorization allows mesh identities only", verdict));
        };
        let allows = |a: &Allowed| {
            a.caller == **id
                && (a.methods.is_empty() || a.methods.iter().any(|m| m.as_str() == req.method()))
                && a.path_prefix
                    .as_deref()
                    .is_none_or(|p| req.uri().path().starts_with(p))
        };
        if allowed.iter().any(allows) {
            None
        } else {
            Some(("no rule of inbound.authorization allows it", verdict))
        }
    }
}

/// The layer: checks each request against [`Rules`] before the inner service.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    rules: Option<Arc<Rules>>,
    metrics: Metrics,
}

impl<S> Authorize<S> {
    /// Checks `rules` (none: every caller passes) in front of `inner`.
    pub fn new(inner: S, rules: Option<Arc<Rules>>, metrics: Metrics) -> Self {
        Self {
            inner,
            rules,
            metrics,
        }
    }
}

impl<S> Service<Request<Body>> for Authorize<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(rules) = &self.rules else {
            return Either::Left(self.inner.call(req));
        };
        let peer = req
            .extensions()
            .get::<Peer>()
            .cloned()
            .unwrap_or(Peer::Plaintext);
        let Some((reason, verdict)) = rules.refusal(&peer, &req) else {
            return Either::Left(self.inner.call(req));
        };
        self.metrics.authorization_refused(&rules.service, verdict);
        let caller = peer.describe();
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        if verdict == Verdict::audit_denied {
            tracing::info!(
                target: "trellis::authorization",
                %caller, %method, %path, reason,
                "audit: this request would be refused (inbound.authorization mode is Audit)"
            );
            let audit = AuditDenied { caller, reason };
            return Either::Right(Box::pin(self.inner.call(req).map_ok(move |mut rsp| {
                rsp.extensions_mut().insert(audit);
                rsp
            })));
        }
        tracing::info!(
            target: "trellis::authorization",
            %caller, %method, %path, reason,
            "refused"
        );
        Either::Right(Box::pin(future::err(
            ProxyError::NotAuthorized {
                service: rules.service.clone(),
                caller,
                reason,
            }
            .into(),
        )))
    }
}
