//! The Gateway API's reasoning, as a pure function: from everything the
//! controller sees ([`World`]) to the status of every class, Gateway and
//! route it serves and each Gateway's data-plane configuration
//! ([`Outcome`]).
//!
//! Conditions carry a placeholder transition time; the writer keeps the
//! time of a condition whose status did not change.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::ResourceExt;
use trellis_policy::gateway::{
    Backend, BackendService, Certificate, Filter, HeaderModifier, PathMatch, PathRewrite,
    PortConfig, Redirect, RequestMatch, Rewrite, RouteRule, ValueMatch, VirtualHost,
};

use super::{
    api::*,
    policy_model::{self, Attached, EdgeInputs, EdgeOutcome, Targets},
};

/// A namespace and a name.
pub type Key = (String, String);

/// A Service as backends need it: its ports and their `appProtocol`.
#[derive(Clone, Debug, Default)]
pub struct ServiceInfo {
    /// (port, appProtocol).
    pub ports: Vec<(i32, Option<String>)>,
}

/// A `kubernetes.io/tls` Secret's certificate chain and key.
#[derive(Clone)]
pub struct TlsPair {
    /// `tls.crt`.
    pub chain_pem: String,
    /// `tls.key`.
    pub key_pem: String,
}

/// What a Gateway's data plane is doing.
#[derive(Clone, Debug, Default)]
pub struct Deployed {
    /// The gateway Service's cluster IP.
    pub address: Option<String>,
    /// Whether a gateway pod is available.
    pub ready: bool,
}

/// Everything the controller sees.
#[derive(Default)]
pub struct World {
    /// The controller name this controller answers to.
    pub controller: String,
    /// Every GatewayClass.
    pub classes: Vec<Arc<GatewayClass>>,
    /// Every Gateway.
    pub gateways: Vec<Arc<Gateway>>,
    /// Every HTTPRoute.
    pub http_routes: Vec<Arc<HTTPRoute>>,
    /// Every GRPCRoute.
    pub grpc_routes: Vec<Arc<GRPCRoute>>,
    /// Every ReferenceGrant.
    pub grants: Vec<Arc<ReferenceGrant>>,
    /// Services by namespace and name.
    pub services: BTreeMap<Key, ServiceInfo>,
    /// Namespace labels by name.
    pub namespaces: BTreeMap<String, NamespaceLabels>,
    /// TLS Secrets by namespace and name.
    pub secrets: BTreeMap<Key, TlsPair>,
    /// The data plane of each Gateway served, by namespace and name.
    pub deployed: BTreeMap<Key, Deployed>,
    /// EdgePolicies and the key sets they name.
    pub edge: EdgeInputs,
}

/// What the controller writes.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The status of each class this controller serves.
    pub classes: Vec<(String, GatewayClassStatus)>,
    /// Each Gateway served.
    pub gateways: Vec<GatewayOutcome>,
    /// Each route with a parent served: this controller's parent entries.
    pub routes: Vec<RouteOutcome>,
    /// Each EdgePolicy's status, and the JWT checks to remember.
    pub edge: EdgeOutcome,
}

/// One Gateway's status and configuration.
#[derive(Debug)]
pub struct GatewayOutcome {
    /// Namespace and name.
    pub key: Key,
    /// Its status.
    pub status: GatewayStatus,
    /// What its data plane serves.
    pub ports: Vec<PortConfig>,
    /// Its backends, which its policy names as dependencies.
    pub backends: BTreeSet<BackendService>,
}

/// One route's parent entries written by this controller.
#[derive(Debug)]
pub struct RouteOutcome {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    /// Namespace and name.
    pub key: Key,
    /// The entries.
    pub parents: Vec<RouteParentStatus>,
}

/// The routes attached to each listener (Gateway, listener index): each
/// route (by index) with the hostnames it serves there.
type Attachments = BTreeMap<(Key, usize), Vec<(usize, Vec<Option<String>>)>>;

/// A port's certificates and rules by hostname, while they are collected.
type PortRules = (
    Vec<Certificate>,
    BTreeMap<Option<String>, Vec<(SortKey, RouteRule)>>,
);

const HTTP_ROUTE: &str = "HTTPRoute";
const GRPC_ROUTE: &str = "GRPCRoute";

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// A route of either kind, as the model needs it.
struct RouteView {
    kind: &'static str,
    key: Key,
    generation: Option<i64>,
    created: String,
    parent_refs: Vec<ParentRef>,
    hostnames: Vec<String>,
    rules: Vec<RuleView>,
}

struct RuleView {
    matches: Vec<RequestMatch>,
    filters: Vec<HttpRouteFilter>,
    backend_refs: Vec<BackendRef>,
    timeout_ms: Option<u64>,
    backend_timeout_ms: Option<u64>,
}

fn view_http(r: &HTTPRoute) -> RouteView {
    RouteView {
        kind: HTTP_ROUTE,
        key: (r.namespace().unwrap_or_default(), r.name_any()),
        generation: r.metadata.generation,
        created: created(&r.metadata),
        parent_refs: r.spec.parent_refs.clone(),
        hostnames: r.spec.hostnames.clone(),
        rules: r
            .spec
            .rules
            .iter()
            .map(|rule| RuleView {
                matches: if rule.matches.is_empty() {
                    vec![RequestMatch {
                        path: Some(PathMatch::Prefix("/".into())),
                        ..RequestMatch::default()
                    }]
                } else {
                    rule.matches.iter().map(http_match).collect()
                },
                filters: rule.filters.clone(),
                backend_refs: rule.backend_refs.clone(),
                // `0s` turns a timeout off.
                timeout_ms: rule
                    .timeouts
                    .as_ref()
                    .and_then(|t| t.request.as_deref())
                    .and_then(duration_ms)
                    .filter(|ms| *ms > 0),
                backend_timeout_ms: rule
                    .timeouts
                    .as_ref()
                    .and_then(|t| t.backend_request.as_deref())
                    .and_then(duration_ms)
                    .filter(|ms| *ms > 0),
            })
            .collect(),
    }
}

fn view_grpc(r: &GRPCRoute) -> RouteView {
    RouteView {
        kind: GRPC_ROUTE,
        key: (r.namespace().unwrap_or_default(), r.name_any()),
        generation: r.metadata.generation,
        created: created(&r.metadata),
        parent_refs: r.spec.parent_refs.clone(),
        hostnames: r.spec.hostnames.clone(),
        rules: r
            .spec
            .rules
            .iter()
            .map(|rule| RuleView {
                matches: if rule.matches.is_empty() {
                    vec![RequestMatch {
                        path: Some(PathMatch::Prefix("/".into())),
                        ..RequestMatch::default()
                    }]
                } else {
                    rule.matches.iter().map(grpc_match).collect()
                },
                filters: rule.filters.clone(),
                backend_refs: rule.backend_refs.clone(),
                timeout_ms: None,
                backend_timeout_ms: None,
            })
            .collect(),
    }
}

fn created(meta: &kube::api::ObjectMeta) -> String {
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

fn value_match(m: &NameValueMatch) -> ValueMatch {
    ValueMatch {
        name: m.name.clone(),
        value: m.value.clone(),
        regex: m.type_.as_deref() == Some("RegularExpression"),
    }
}

fn http_match(m: &HttpRouteMatch) -> RequestMatch {
    let path = m.path.as_ref().map_or(PathMatch::Prefix("/".into()), |p| {
        let value = p.value.clone().unwrap_or_else(|| "/".into());
        match p.type_.as_deref() {
            Some("Exact") => PathMatch::Exact(value),
            Some("RegularExpression") => PathMatch::RegularExpression(value),
            _ => PathMatch::Prefix(value),
        }
    });
    RequestMatch {
        path: Some(path),
        method: m.method.clone(),
        headers: m.headers.iter().map(value_match).collect(),
        query: m.query_params.iter().map(value_match).collect(),
    }
}

/// A gRPC method match is a match on the path `/<service>/<method>`.
fn grpc_match(m: &GrpcRouteMatch) -> RequestMatch {
    let path = m.method.as_ref().map(|mm| {
        let regex = mm.type_.as_deref() == Some("RegularExpression");
        let quote = |s: &str| if regex { s.to_owned() } else { regex_escape(s) };
        match (mm.service.as_deref(), mm.method.as_deref()) {
            (Some(s), Some(m)) if !regex => PathMatch::Exact(format!("/{s}/{m}")),
            (Some(s), None) if !regex => PathMatch::Prefix(format!("/{s}")),
            (s, m) => PathMatch::RegularExpression(format!(
                "/{}/{}",
                s.map_or_else(|| "[^/]+".into(), quote),
                m.map_or_else(|| "[^/]+".into(), quote)
            )),
        }
    });
    RequestMatch {
        path: Some(path.unwrap_or(PathMatch::Prefix("/".into()))),
        method: None,
        headers: m.headers.iter().map(value_match).collect(),
        query: vec![],
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// A Gateway API duration (`1h`, `500ms`, `1m30s`) in milliseconds.
pub fn duration_ms(text: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut digits = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits.parse().ok()?;
        digits.clear();
        let unit = match c {
            'h' => 3_600_000,
            's' => 1_000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            'm' => 60_000,
            _ => return None,
        };
        total += n * unit;
    }
    digits.is_empty().then_some(total)
}

/// Whether a label selector admits `labels`.
fn selects(selector: &LabelSelector, labels: &NamespaceLabels) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_label && by_expression
}

/// The hostname a request for both `listener` and `route` hostnames must
/// have: the more specific one, when they intersect.
fn intersect(listener: Option<&str>, route: &str) -> Option<String> {
    let Some(l) = listener else {
        return Some(route.to_owned());
    };
    match (l.strip_prefix('*'), route.strip_prefix('*')) {
        (None, None) => (l == route).then(|| route.to_owned()),
        (Some(suffix), None) => route.ends_with(suffix).then(|| route.to_owned()),
        (None, Some(suffix)) => l.ends_with(suffix).then(|| l.to_owned()),
        (Some(ls), Some(rs)) => {
            if ls.ends_with(rs) {
                Some(l.to_owned())
            } else if rs.ends_with(ls) {
                Some(route.to_owned())
            } else {
                None
            }
        }
    }
}

/// What the controller knows of one listener after checking it.
struct ListenerCheck {
    supported_kinds: Vec<RouteGroupKind>,
    invalid_kinds: bool,
    /// Why the listener cannot be served at all.
    unsupported: Option<(&'static str, String)>,
    /// Why its references do not resolve.
    unresolved: Option<(&'static str, String)>,
    conflict: Option<&'static str>,
    certificates: Vec<Certificate>,
    attached: BTreeSet<Key>,
}

impl ListenerCheck {
    fn serves_routes(&self) -> bool {
        self.unsupported.is_none() && self.conflict.is_none()
    }
}

fn group_of(g: &Option<String>) -> &str {
    g.as_deref().unwrap_or(GROUP)
}

impl World {
    fn granted(&self, from: (&str, &str, &str), to_ns: &str, to: (&str, &str, &str)) -> bool {
        let (fg, fk, fns) = from;
        let (tg, tk, tname) = to;
        self.grants.iter().any(|g| {
            g.namespace().as_deref() == Some(to_ns)
                && g.spec
                    .from
                    .iter()
                    .any(|f| f.group == fg && f.kind == fk && f.namespace == fns)
                && g.spec.to.iter().any(|t| {
                    t.group == tg && t.kind == tk && t.name.as_deref().is_none_or(|n| n == tname)
                })
        })
    }

    fn check_listener(&self, gw: &Gateway, l: &Listener) -> ListenerCheck {
        let gw_ns = gw.namespace().unwrap_or_default();
        let mut check = ListenerCheck {
            supported_kinds: vec![],
            invalid_kinds: false,
            unsupported: None,
            unresolved: None,
            conflict: None,
            certificates: vec![],
            attached: BTreeSet::new(),
        };
        let http = l.protocol == "HTTP" || l.protocol == "HTTPS";
        if !http {
            check.unsupported = Some((
                "UnsupportedProtocol",
                format!(
                    "protocol {} is not supported: Trellis serves HTTP and HTTPS",
                    l.protocol
                ),
            ));
            return check;
        }
        let supported = [HTTP_ROUTE, GRPC_ROUTE];
        match l.allowed_routes.as_ref().and_then(|a| a.kinds.as_ref()) {
            None => {
                check.supported_kinds = supported
                    .iter()
                    .map(|k| RouteGroupKind {
                        group: Some(GROUP.into()),
                        kind: (*k).into(),
                    })
                    .collect();
            }
            Some(kinds) => {
                for k in kinds {
                    if group_of(&k.group) == GROUP && supported.contains(&k.kind.as_str()) {
                        check.supported_kinds.push(RouteGroupKind {
                            group: Some(GROUP.into()),
                            kind: k.kind.clone(),
                        });
                    } else {
                        check.invalid_kinds = true;
                    }
                }
                if check.invalid_kinds {
                    check.unresolved = Some((
                        "InvalidRouteKinds",
                        "allowedRoutes.kinds names a kind Trellis does not serve: HTTPRoute and GRPCRoute are served".into(),
                    ));
                }
            }
        }
        if l.protocol == "HTTPS" {
            let tls = l.tls.clone().unwrap_or_default();
            if tls.mode.as_deref() == Some("Passthrough") {
                check.unsupported = Some((
                    "UnsupportedProtocol",
                    "HTTPS listeners terminate TLS: Passthrough is for TLS listeners".into(),
                ));
                return check;
            }
            for r in &tls.certificate_refs {
                let ns = r.namespace.clone().unwrap_or_else(|| gw_ns.clone());
                let group = r.group.as_deref().unwrap_or("");
                let kind = r.kind.as_deref().unwrap_or("Secret");
                if !group.is_empty() || kind != "Secret" {
                    check.unresolved = Some((
                        "InvalidCertificateRef",
                        format!(
                            "certificateRef {group}/{kind} {}: only core Secrets are supported",
                            r.name
                        ),
                    ));
                    continue;
                }
                if ns != gw_ns
                    && !self.granted((GROUP, "Gateway", &gw_ns), &ns, ("", "Secret", &r.name))
                {
                    check.unresolved = Some((
                        "RefNotPermitted",
                        format!(
                            "Secret {ns}/{} is in another namespace and no ReferenceGrant there allows this Gateway to use it",
                            r.name
                        ),
                    ));
                    continue;
                }
                match self.secrets.get(&(ns.clone(), r.name.clone())) {
                    Some(pair) => check.certificates.push(Certificate {
                        hostname: l.hostname.clone(),
                        chain_pem: pair.chain_pem.clone(),
                        key_pem: pair.key_pem.clone(),
                    }),
                    None => {
                        check.unresolved = Some((
                            "InvalidCertificateRef",
                            format!(
                                "Secret {ns}/{} does not exist or is not a valid kubernetes.io/tls Secret",
                                r.name
                            ),
                        ));
                    }
                }
            }
            if tls.certificate_refs.is_empty() {
                check.unresolved = Some((
                    "InvalidCertificateRef",
                    "an HTTPS listener needs tls.certificateRefs".into(),
                ));
            }
        }
        check
    }

    /// Checks every listener, marking conflicts between listeners of one port.
    fn check_listeners(&self, gw: &Gateway) -> Vec<ListenerCheck> {
        let mut checks: Vec<ListenerCheck> = gw
            .spec
            .listeners
            .iter()
            .map(|l| self.check_listener(gw, l))
            .collect();
        let ls = &gw.spec.listeners;
        for i in 0..ls.len() {
            for j in 0..ls.len() {
                if i == j || ls[i].port != ls[j].port {
                    continue;
                }
                if ls[i].protocol != ls[j].protocol {
                    checks[i].conflict = Some("ProtocolConflict");
                } else if ls[i].hostname == ls[j].hostname {
                    checks[i].conflict.get_or_insert("HostnameConflict");
                }
            }
        }
        checks
    }

    /// Why a backend reference does not resolve, or the Service it names.
    fn backend(
        &self,
        route: &RouteView,
        b: &BackendRef,
    ) -> Result<BackendService, (&'static str, String)> {
        let group = b.group.as_deref().unwrap_or("");
        let kind = b.kind.as_deref().unwrap_or("Service");
        if !group.is_empty() || kind != "Service" {
            return Err((
                "InvalidKind",
                format!(
                    "backendRef {group}/{kind} {}: only Services are supported",
                    b.name
                ),
            ));
        }
        let (route_ns, _) = &route.key;
        let ns = b.namespace.clone().unwrap_or_else(|| route_ns.clone());
        if &ns != route_ns
            && !self.granted((GROUP, route.kind, route_ns), &ns, ("", "Service", &b.name))
        {
            return Err((
                "RefNotPermitted",
                format!(
                    "Service {ns}/{} is in another namespace and no ReferenceGrant there allows this route to use it",
                    b.name
                ),
            ));
        }
        let Some(port) = b.port else {
            return Err((
                "UnsupportedValue",
                format!("backendRef Service {ns}/{} needs a port", b.name),
            ));
        };
        let Some(svc) = self.services.get(&(ns.clone(), b.name.clone())) else {
            return Err((
                "BackendNotFound",
                format!("Service {ns}/{} does not exist", b.name),
            ));
        };
        let Some((_, app_protocol)) = svc.ports.iter().find(|(p, _)| *p == port) else {
            return Err((
                "BackendNotFound",
                format!("Service {ns}/{} has no port {port}", b.name),
            ));
        };
        let h2c = route.kind == GRPC_ROUTE
            || matches!(app_protocol.as_deref(), Some("kubernetes.io/h2c" | "grpc"));
        Ok(BackendService {
            name: b.name.clone(),
            namespace: ns,
            port: u16::try_from(port).unwrap_or_default(),
            h2c,
        })
    }

    /// Computes everything (see the module docs).
    pub fn outcome(&self) -> Outcome {
        let mut out = Outcome::default();
        let ours: BTreeSet<String> = self
            .classes
            .iter()
            .filter(|c| c.spec.controller_name == self.controller)
            .map(|c| c.name_any())
            .collect();
        for c in self.classes.iter().filter(|c| ours.contains(&c.name_any())) {
            out.classes.push((
                c.name_any(),
                GatewayClassStatus {
                    conditions: vec![condition(
                        "Accepted",
                        true,
                        "Accepted",
                        "served by the Trellis gateway controller",
                        c.metadata.generation,
                    )],
                },
            ));
        }
        let gateways: Vec<&Arc<Gateway>> = self
            .gateways
            .iter()
            .filter(|g| ours.contains(&g.spec.gateway_class_name))
            .collect();
        let mut checks: BTreeMap<Key, Vec<ListenerCheck>> = gateways
            .iter()
            .map(|g| {
                (
                    (g.namespace().unwrap_or_default(), g.name_any()),
                    self.check_listeners(g),
                )
            })
            .collect();
        let by_key: BTreeMap<Key, &Arc<Gateway>> = gateways
            .iter()
            .map(|g| ((g.namespace().unwrap_or_default(), g.name_any()), *g))
            .collect();

        let routes: Vec<RouteView> = self
            .http_routes
            .iter()
            .map(|r| view_http(r))
            .chain(self.grpc_routes.iter().map(|r| view_grpc(r)))
            .collect();
        let (attached, edge) =
            policy_model::resolve(&self.edge, &self.targets(&ours), &self.controller);
        out.edge = edge;
        // (gateway, listener index) → (route index, effective hostnames).
        let mut attachments: Attachments = BTreeMap::new();
        let mut backends_of: BTreeMap<Key, BTreeSet<BackendService>> = BTreeMap::new();
        for (ri, route) in routes.iter().enumerate() {
            let resolved = self.resolve_refs(route);
            let unsupported_filter = route
                .rules
                .iter()
                .flat_map(|r| {
                    r.filters
                        .iter()
                        .chain(r.backend_refs.iter().flat_map(|b| b.filters.iter()))
                })
                .find(|f| convert_filter(f).is_none())
                .map(|f| f.type_.clone());
            let mut parents = Vec::new();
            for pr in &route.parent_refs {
                if group_of(&pr.group) != GROUP
                    || pr.kind.as_deref().unwrap_or("Gateway") != "Gateway"
                {
                    continue;
                }
                let gw_key = (
                    pr.namespace.clone().unwrap_or_else(|| route.key.0.clone()),
                    pr.name.clone(),
                );
                let Some(gw) = by_key.get(&gw_key) else {
                    continue;
                };
                let (accepted, reason, message) = self.attach(route, pr, gw, &checks[&gw_key]);
                let (accepted, reason, message) = match (&unsupported_filter, accepted) {
                    (Some(f), true) => (
                        false,
                        "UnsupportedValue",
                        format!("filter {f} is not supported by Trellis"),
                    ),
                    _ => (accepted, reason, message),
                };
                if accepted {
                    for (li, hosts) in self.matching_listeners(route, pr, gw, &checks[&gw_key]) {
                        checks.get_mut(&gw_key).expect("checked")[li]
                            .attached
                            .insert(route.key.clone());
                        attachments
                            .entry((gw_key.clone(), li))
                            .or_default()
                            .push((ri, hosts));
                    }
                    backends_of
                        .entry(gw_key.clone())
                        .or_default()
                        .extend(resolved.services.iter().flatten().cloned());
                }
                let (ok, rr_reason, rr_message) = match &resolved.problem {
                    None => (true, "ResolvedRefs", "every backend resolved".to_owned()),
                    Some((reason, message)) => (false, *reason, message.clone()),
                };
                parents.push(RouteParentStatus {
                    parent_ref: pr.clone(),
                    controller_name: self.controller.clone(),
                    conditions: vec![
                        condition("Accepted", accepted, reason, &message, route.generation),
                        condition("ResolvedRefs", ok, rr_reason, &rr_message, route.generation),
                    ],
                });
            }
            if !parents.is_empty() {
                out.routes.push(RouteOutcome {
                    kind: route.kind,
                    key: route.key.clone(),
                    parents,
                });
            }
        }

        for (key, gw) in &by_key {
            let checks = &checks[key];
            let deployed = self.deployed.get(key).cloned().unwrap_or_default();
            out.gateways.push(self.gateway_outcome(
                key,
                gw,
                checks,
                &deployed,
                &routes,
                &attachments,
                &attached,
                backends_of.remove(key).unwrap_or_default(),
            ));
        }
        out
    }

    /// Whether a route may attach to the Gateway through `pr`, with the
    /// reason and message of its Accepted condition.
    fn attach(
        &self,
        route: &RouteView,
        pr: &ParentRef,
        gw: &Gateway,
        checks: &[ListenerCheck],
    ) -> (bool, &'static str, String) {
        let named: Vec<usize> = gw
            .spec
            .listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| pr.section_name.as_ref().is_none_or(|s| *s == l.name))
            .filter(|(_, l)| pr.port.is_none_or(|p| p == l.port))
            .map(|(i, _)| i)
            .collect();
        if named.is_empty() {
            return (
                false,
                "NoMatchingParent",
                "no listener of the Gateway has the sectionName and port this parentRef names"
                    .into(),
            );
        }
        let allowed: Vec<usize> = named
            .iter()
            .copied()
            .filter(|i| {
                checks[*i].serves_routes() && self.listener_allows(route, gw, *i, &checks[*i])
            })
            .collect();
        if allowed.is_empty() {
            return (
                false,
                "NotAllowedByListeners",
                "no listener this parentRef names allows this route (its kind or its namespace)"
                    .into(),
            );
        }
        if self.matching_listeners(route, pr, gw, checks).is_empty() {
            return (
                false,
                "NoMatchingListenerHostname",
                "none of the route's hostnames matches a listener's hostname".into(),
            );
        }
        (true, "Accepted", "attached".into())
    }

    fn listener_allows(
        &self,
        route: &RouteView,
        gw: &Gateway,
        li: usize,
        check: &ListenerCheck,
    ) -> bool {
        let l = &gw.spec.listeners[li];
        if !check.supported_kinds.iter().any(|k| k.kind == route.kind) {
            return false;
        }
        let gw_ns = gw.namespace().unwrap_or_default();
        let ns = l
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref());
        match ns.and_then(|n| n.from.as_deref()).unwrap_or("Same") {
            "All" => true,
            "Selector" => {
                let labels = self
                    .namespaces
                    .get(&route.key.0)
                    .cloned()
                    .unwrap_or_default();
                ns.and_then(|n| n.selector.as_ref())
                    .is_some_and(|s| selects(s, &labels))
            }
            _ => route.key.0 == gw_ns,
        }
    }

    /// The listeners `pr` attaches the route to, each with the hostnames
    /// the route serves there.
    fn matching_listeners(
        &self,
        route: &RouteView,
        pr: &ParentRef,
        gw: &Gateway,
        checks: &[ListenerCheck],
    ) -> Vec<(usize, Vec<Option<String>>)> {
        gw.spec
            .listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| pr.section_name.as_ref().is_none_or(|s| *s == l.name))
            .filter(|(_, l)| pr.port.is_none_or(|p| p == l.port))
            .filter(|(i, _)| {
                checks[*i].serves_routes() && self.listener_allows(route, gw, *i, &checks[*i])
            })
            .filter_map(|(i, l)| {
                let hosts: Vec<Option<String>> = if route.hostnames.is_empty() {
                    vec![l.hostname.clone()]
                } else {
                    route
                        .hostnames
                        .iter()
                        .filter_map(|h| intersect(l.hostname.as_deref(), h))
                        .map(Some)
                        .collect()
                };
                (!hosts.is_empty()).then_some((i, hosts))
            })
            .collect()
    }

    fn resolve_refs(&self, route: &RouteView) -> Resolved {
        let mut problem = None;
        let services = route
            .rules
            .iter()
            .map(|rule| {
                rule.backend_refs
                    .iter()
                    .map(|b| match self.backend(route, b) {
                        Ok(s) => Some(s),
                        Err(p) => {
                            problem.get_or_insert(p);
                            None
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        Resolved {
            services: services.into_iter().flatten().collect(),
            per_rule: route
                .rules
                .iter()
                .map(|rule| {
                    rule.backend_refs
                        .iter()
                        .map(|b| self.backend(route, b).ok())
                        .collect()
                })
                .collect(),
            problem,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gateway_outcome(
        &self,
        key: &Key,
        gw: &Gateway,
        checks: &[ListenerCheck],
        deployed: &Deployed,
        routes: &[RouteView],
        attachments: &Attachments,
        attached: &Attached,
        backends: BTreeSet<BackendService>,
    ) -> GatewayOutcome {
        let generation = gw.metadata.generation;
        let programmed = deployed.ready && deployed.address.is_some();
        let listeners =
            gw.spec
                .listeners
                .iter()
                .zip(checks)
                .map(|(l, c)| {
                    let mut conditions = Vec::new();
                    match &c.unsupported {
                        Some((reason, message)) => conditions
                            .push(condition("Accepted", false, reason, message, generation)),
                        None => conditions.push(condition(
                            "Accepted",
                            true,
                            "Accepted",
                            "the listener is served",
                            generation,
                        )),
                    }
                    match &c.unresolved {
                        Some((reason, message)) => conditions.push(condition(
                            "ResolvedRefs",
                            false,
                            reason,
                            message,
                            generation,
                        )),
                        None => conditions.push(condition(
                            "ResolvedRefs",
                            true,
                            "ResolvedRefs",
                            "every reference resolved",
                            generation,
                        )),
                    }
                    match c.conflict {
                        Some(reason) => conditions.push(condition(
                            "Conflicted",
                            true,
                            reason,
                            "another listener on this port conflicts with this one",
                            generation,
                        )),
                        None => conditions.push(condition(
                            "Conflicted",
                            false,
                            "NoConflicts",
                            "no conflict",
                            generation,
                        )),
                    }
                    let valid = c.serves_routes() && c.unresolved.is_none();
                    conditions.push(if !valid {
                        condition(
                            "Programmed",
                            false,
                            "Invalid",
                            "the listener is not valid: see its other conditions",
                            generation,
                        )
                    } else if programmed {
                        condition(
                            "Programmed",
                            true,
                            "Programmed",
                            "the gateway serves this listener",
                            generation,
                        )
                    } else {
                        condition(
                            "Programmed",
                            false,
                            "Pending",
                            "the gateway's pod is not ready yet",
                            generation,
                        )
                    });
                    ListenerStatus {
                        name: l.name.clone(),
                        supported_kinds: c.supported_kinds.clone(),
                        attached_routes: i32::try_from(c.attached.len()).unwrap_or(i32::MAX),
                        conditions,
                    }
                })
                .collect();
        let invalid = checks.iter().filter(|c| !c.serves_routes()).count();
        let accepted = if !gw.spec.addresses.is_empty() {
            condition(
                "Accepted",
                false,
                "UnsupportedAddress",
                "Trellis assigns the gateway's address itself: spec.addresses is not supported",
                generation,
            )
        } else if !checks.is_empty() && invalid == checks.len() {
            condition(
                "Accepted",
                false,
                "ListenersNotValid",
                "no listener can be served: see the listeners' conditions",
                generation,
            )
        } else if invalid > 0 {
            condition(
                "Accepted",
                true,
                "ListenersNotValid",
                "some listeners cannot be served: see the listeners' conditions",
                generation,
            )
        } else {
            condition(
                "Accepted",
                true,
                "Accepted",
                "served by the Trellis gateway",
                generation,
            )
        };
        let programmed_condition = match (&deployed.address, deployed.ready) {
            _ if accepted.status == "False" => condition(
                "Programmed",
                false,
                "Invalid",
                "the Gateway is not accepted",
                generation,
            ),
            (None, _) => condition(
                "Programmed",
                false,
                "AddressNotAssigned",
                "the gateway's Service has no address yet",
                generation,
            ),
            (Some(_), false) => condition(
                "Programmed",
                false,
                "Pending",
                "the gateway's pod is not ready yet",
                generation,
            ),
            (Some(_), true) => condition(
                "Programmed",
                true,
                "Programmed",
                "the gateway serves its listeners",
                generation,
            ),
        };
        let status = GatewayStatus {
            addresses: deployed
                .address
                .iter()
                .map(|a| GatewayAddress {
                    type_: "IPAddress".into(),
                    value: a.clone(),
                })
                .collect(),
            conditions: vec![accepted, programmed_condition],
            listeners,
        };
        GatewayOutcome {
            key: key.clone(),
            status,
            ports: self.ports(key, gw, checks, routes, attachments, attached),
            backends,
        }
    }

    /// What EdgePolicies may target: every Gateway (whether one of `ours`
    /// classes serves it, its listeners) and every route.
    fn targets(&self, ours: &BTreeSet<String>) -> Targets {
        Targets {
            gateways: self
                .gateways
                .iter()
                .map(|g| {
                    (
                        (g.namespace().unwrap_or_default(), g.name_any()),
                        (
                            ours.contains(&g.spec.gateway_class_name),
                            g.spec.listeners.iter().map(|l| l.name.clone()).collect(),
                        ),
                    )
                })
                .collect(),
            http_routes: self
                .http_routes
                .iter()
                .map(|r| (r.namespace().unwrap_or_default(), r.name_any()))
                .collect(),
            grpc_routes: self
                .grpc_routes
                .iter()
                .map(|r| (r.namespace().unwrap_or_default(), r.name_any()))
                .collect(),
        }
    }

    /// The data plane's ports: the listeners that can be served, with the
    /// rules of their routes by hostname in precedence order, each with
    /// the EdgePolicies that apply to it.
    fn ports(
        &self,
        key: &Key,
        gw: &Gateway,
        checks: &[ListenerCheck],
        routes: &[RouteView],
        attachments: &Attachments,
        attached: &Attached,
    ) -> Vec<PortConfig> {
        let mut ports: BTreeMap<u16, PortRules> = BTreeMap::new();
        for (li, l) in gw.spec.listeners.iter().enumerate() {
            let c = &checks[li];
            if !c.serves_routes() || (l.protocol == "HTTPS" && c.certificates.is_empty()) {
                continue;
            }
            let Ok(port) = u16::try_from(l.port) else {
                continue;
            };
            let entry = ports.entry(port).or_default();
            entry.0.extend(c.certificates.iter().cloned());
            for (ri, hosts) in attachments.get(&(key.clone(), li)).into_iter().flatten() {
                let route = &routes[*ri];
                let resolved = self.resolve_refs(route);
                let policy = attached.for_rule(key, &l.name, route.kind, &route.key);
                for host in hosts {
                    let rules = entry.1.entry(host.clone()).or_default();
                    for (rule_i, rule) in route.rules.iter().enumerate() {
                        for (match_i, m) in rule.matches.iter().enumerate() {
                            let sort = SortKey::new(m, route, rule_i, match_i);
                            let mut compiled =
                                compile_rule(route, rule, m, &resolved.per_rule[rule_i]);
                            policy.apply(&mut compiled);
                            rules.push((sort, compiled));
                        }
                    }
                }
            }
        }
        ports
            .into_iter()
            .map(|(port, (certificates, hosts))| PortConfig {
                port,
                certificates,
                hosts: hosts
                    .into_iter()
                    .map(|(hostname, mut rules)| {
                        rules.sort_by(|a, b| a.0.cmp(&b.0));
                        VirtualHost {
                            hostname,
                            rules: rules.into_iter().map(|(_, r)| r).collect(),
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

struct Resolved {
    /// Every backend of every rule, `None` where it does not resolve.
    services: Vec<Option<BackendService>>,
    per_rule: Vec<Vec<Option<BackendService>>>,
    problem: Option<(&'static str, String)>,
}

/// The Gateway API's precedence among matches, smallest first: exact
/// paths, then longer prefixes, then a method, more headers, more query
/// parameters, then the older route, then by namespace and name, then
/// rule and match order.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    path_kind: u8,
    path_len: std::cmp::Reverse<usize>,
    no_method: bool,
    headers: std::cmp::Reverse<usize>,
    query: std::cmp::Reverse<usize>,
    created: String,
    key: Key,
    rule: usize,
    index: usize,
}

impl SortKey {
    fn new(m: &RequestMatch, route: &RouteView, rule: usize, index: usize) -> Self {
        let (path_kind, len) = match &m.path {
            Some(PathMatch::Exact(p)) => (0, p.len()),
            Some(PathMatch::Prefix(p)) => (1, p.trim_end_matches('/').len()),
            Some(PathMatch::RegularExpression(p)) => (2, p.len()),
            None => (1, 0),
        };
        Self {
            path_kind,
            path_len: std::cmp::Reverse(len),
            no_method: m.method.is_none(),
            headers: std::cmp::Reverse(m.headers.len()),
            query: std::cmp::Reverse(m.query.len()),
            created: route.created.clone(),
            key: route.key.clone(),
            rule,
            index,
        }
    }
}

fn header_modifier(h: &HeaderFilter) -> HeaderModifier {
    HeaderModifier {
        set: h
            .set
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect(),
        add: h
            .add
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect(),
        remove: h.remove.clone(),
    }
}

fn path_rewrite(p: &PathModifier) -> Option<PathRewrite> {
    match p.type_.as_str() {
        "ReplaceFullPath" => Some(PathRewrite::ReplaceFullPath(
            p.replace_full_path.clone().unwrap_or_default(),
        )),
        "ReplacePrefixMatch" => Some(PathRewrite::ReplacePrefixMatch(
            p.replace_prefix_match.clone().unwrap_or_default(),
        )),
        _ => None,
    }
}

/// A filter the data plane can apply, or `None` for one it cannot.
fn convert_filter(f: &HttpRouteFilter) -> Option<Filter> {
    match f.type_.as_str() {
        "RequestHeaderModifier" => Some(Filter::RequestHeaderModifier(header_modifier(
            f.request_header_modifier.as_ref()?,
        ))),
        "ResponseHeaderModifier" => Some(Filter::ResponseHeaderModifier(header_modifier(
            f.response_header_modifier.as_ref()?,
        ))),
        "RequestRedirect" => {
            let r = f.request_redirect.as_ref()?;
            Some(Filter::RequestRedirect(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                path: r.path.as_ref().and_then(path_rewrite),
                port: r.port.and_then(|p| u16::try_from(p).ok()),
                status: r
                    .status_code
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(302),
            }))
        }
        "URLRewrite" => {
            let r = f.url_rewrite.as_ref()?;
            Some(Filter::UrlRewrite(Rewrite {
                hostname: r.hostname.clone(),
                path: r.path.as_ref().and_then(path_rewrite),
            }))
        }
        _ => None,
    }
}

fn compile_rule(
    route: &RouteView,
    rule: &RuleView,
    m: &RequestMatch,
    services: &[Option<BackendService>],
) -> RouteRule {
    RouteRule {
        route: format!("{}/{}/{}", route.kind, route.key.0, route.key.1),
        matches: m.clone(),
        filters: rule.filters.iter().filter_map(convert_filter).collect(),
        backends: rule
            .backend_refs
            .iter()
            .zip(services)
            .map(|(b, s)| Backend {
                service: s.clone(),
                weight: b.weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(1),
                filters: b.filters.iter().filter_map(convert_filter).collect(),
            })
            .collect(),
        timeout_ms: rule.timeout_ms,
        backend_timeout_ms: rule.backend_timeout_ms,
        // EdgePolicies fill these in (`policy_model::Effective::apply`).
        jwt: None,
        rate_limit: None,
    }
}
