//! The model against small worlds written as the YAML users apply.

use std::sync::Arc;

use serde_json::{Value, json};
use trellis_policy::gateway::PathMatch;

use super::{
    CONTROLLER_NAME,
    api::*,
    model::{Deployed, ServiceInfo, World},
};

fn obj<K: serde::de::DeserializeOwned>(
    kind: &str,
    ns: Option<&str>,
    name: &str,
    spec: Value,
) -> Arc<K> {
    let mut meta =
        json!({"name": name, "generation": 3, "creationTimestamp": "2026-12-03T10:00:00Z"});
    if let Some(ns) = ns {
        meta["namespace"] = json!(ns);
    }
    let version = if kind == "ReferenceGrant" {
        "v1beta1"
    } else {
        "v1"
    };
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": format!("gateway.networking.k8s.io/{version}"),
            "kind": kind,
            "metadata": meta,
            "spec": spec,
        }))
        .unwrap(),
    )
}

/// A world with class `trellis`, Gateway `infra/edge` with `listeners`,
/// Services `web/echo` and `apps/other` on port 8080, and `routes`.
fn world(listeners: Value, routes: Vec<Arc<HTTPRoute>>) -> World {
    let mut w = World {
        controller: CONTROLLER_NAME.into(),
        classes: vec![obj(
            "GatewayClass",
            None,
            "trellis",
            json!({"controllerName": CONTROLLER_NAME}),
        )],
        gateways: vec![obj(
            "Gateway",
            Some("infra"),
            "edge",
            json!({"gatewayClassName": "trellis", "listeners": listeners}),
        )],
        http_routes: routes,
        ..World::default()
    };
    for (ns, name) in [("web", "echo"), ("apps", "other"), ("infra", "local")] {
        w.services.insert(
            (ns.into(), name.into()),
            ServiceInfo {
                ports: vec![(8080, None)],
            },
        );
    }
    w.deployed.insert(
        ("infra".into(), "edge".into()),
        Deployed {
            address: Some("10.0.0.9".into()),
            ready: true,
        },
    );
    w
}

fn route(ns: &str, name: &str, spec: Value) -> Arc<HTTPRoute> {
    obj("HTTPRoute", Some(ns), name, spec)
}

fn http_all(name: &str) -> Value {
    json!({"name": name, "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}})
}

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> (&'a str, &'a str) {
    let c = conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t} in {conditions:?}"));
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn an_attached_route_is_accepted_counted_and_ordered_by_precedence() {
    let r = route(
        "web",
        "echo",
        json!({
            "parentRefs": [{"name": "edge", "namespace": "infra"}],
            "hostnames": ["*.example.com"],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                 "backendRefs": [{"name": "echo", "port": 8080}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api/v1"}}],
                 "backendRefs": [{"name": "echo", "port": 8080}]},
                {"matches": [{"path": {"type": "Exact", "value": "/api"}}],
                 "backendRefs": [{"name": "echo", "port": 8080}]},
            ],
        }),
    );
    let w = world(json!([http_all("http")]), vec![r]);
    let out = w.outcome();
    assert_eq!(out.classes.len(), 1);
    let gw = &out.gateways[0];
    assert_eq!(
        condition(&gw.status.conditions, "Accepted"),
        ("True", "Accepted")
    );
    assert_eq!(
        condition(&gw.status.conditions, "Programmed"),
        ("True", "Programmed")
    );
    assert_eq!(gw.status.addresses[0].value, "10.0.0.9");
    assert_eq!(gw.status.listeners[0].attached_routes, 1);
    let parents = &out.routes[0].parents;
    assert_eq!(
        condition(&parents[0].conditions, "Accepted"),
        ("True", "Accepted")
    );
    assert_eq!(
        condition(&parents[0].conditions, "ResolvedRefs"),
        ("True", "ResolvedRefs")
    );
    assert_eq!(parents[0].conditions[0].observed_generation, Some(3));

    let port = &gw.ports[0];
    assert_eq!(port.port, 80);
    assert_eq!(port.hosts[0].hostname.as_deref(), Some("*.example.com"));
    let paths: Vec<_> = port.hosts[0]
        .rules
        .iter()
        .map(|r| r.matches.path.clone().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            PathMatch::Exact("/api".into()),
            PathMatch::Prefix("/api/v1".into()),
            PathMatch::Prefix("/".into())
        ]
    );
    assert_eq!(gw.backends.len(), 1);
}

#[test]
fn a_cross_namespace_backend_needs_a_reference_grant() {
    let spec = json!({
        "parentRefs": [{"name": "edge", "namespace": "infra"}],
        "rules": [{"backendRefs": [{"name": "other", "namespace": "apps", "port": 8080}]}],
    });
    let w = world(
        json!([http_all("http")]),
        vec![route("web", "r", spec.clone())],
    );
    let out = w.outcome();
    let parents = &out.routes[0].parents;
    assert_eq!(
        condition(&parents[0].conditions, "Accepted"),
        ("True", "Accepted")
    );
    assert_eq!(
        condition(&parents[0].conditions, "ResolvedRefs"),
        ("False", "RefNotPermitted")
    );
    let rule = &out.gateways[0].ports[0].hosts[0].rules[0];
    assert!(rule.backends[0].service.is_none(), "its share gets 500");

    let mut w = world(json!([http_all("http")]), vec![route("web", "r", spec)]);
    w.grants.push(obj(
        "ReferenceGrant",
        Some("apps"),
        "let-web-in",
        json!({
            "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "web"}],
            "to": [{"group": "", "kind": "Service"}],
        }),
    ));
    let out = w.outcome();
    assert_eq!(
        condition(&out.routes[0].parents[0].conditions, "ResolvedRefs"),
        ("True", "ResolvedRefs")
    );
    let rule = &out.gateways[0].ports[0].hosts[0].rules[0];
    assert_eq!(rule.backends[0].service.as_ref().unwrap().namespace, "apps");
}

#[test]
fn missing_backends_and_unknown_kinds_are_named() {
    let spec = |backend: Value| json!({"parentRefs": [{"name": "edge", "namespace": "infra"}], "rules": [{"backendRefs": [backend]}]});
    let cases = [
        (json!({"name": "nothing", "port": 8080}), "BackendNotFound"),
        (json!({"name": "echo", "port": 9999}), "BackendNotFound"),
        (
            json!({"group": "example.com", "kind": "Bucket", "name": "echo"}),
            "InvalidKind",
        ),
    ];
    for (backend, reason) in cases {
        let w = world(
            json!([http_all("http")]),
            vec![route("web", "r", spec(backend.clone()))],
        );
        let out = w.outcome();
        assert_eq!(
            condition(&out.routes[0].parents[0].conditions, "ResolvedRefs"),
            ("False", reason),
            "{backend}"
        );
    }
}

#[test]
fn listeners_refuse_what_they_cannot_serve() {
    let listeners = json!([
        {"name": "tcp", "port": 9000, "protocol": "TCP"},
        {"name": "kinds", "port": 80, "protocol": "HTTP",
         "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}, {"kind": "TCPRoute"}]}},
        {"name": "no-cert", "port": 443, "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "missing"}]}},
    ]);
    let out = world(listeners, vec![]).outcome();
    let ls = &out.gateways[0].status.listeners;
    assert_eq!(
        condition(&ls[0].conditions, "Accepted"),
        ("False", "UnsupportedProtocol")
    );
    assert!(ls[0].supported_kinds.is_empty());
    assert_eq!(
        condition(&ls[1].conditions, "ResolvedRefs"),
        ("False", "InvalidRouteKinds")
    );
    assert_eq!(ls[1].supported_kinds.len(), 1, "HTTPRoute stays supported");
    assert_eq!(
        condition(&ls[2].conditions, "ResolvedRefs"),
        ("False", "InvalidCertificateRef")
    );
    assert_eq!(
        condition(&ls[2].conditions, "Programmed"),
        ("False", "Invalid")
    );
    let ports: Vec<u16> = out.gateways[0].ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, [80], "only the valid listener is served");
}

#[test]
fn routes_that_cannot_attach_say_why() {
    let listeners = json!([
        {"name": "same", "port": 80, "protocol": "HTTP", "hostname": "a.example.com"},
    ]);
    let cases = [
        (
            "web",
            json!({"name": "edge", "namespace": "infra"}),
            json!([]),
            "NotAllowedByListeners",
        ),
        (
            "infra",
            json!({"name": "edge", "sectionName": "other"}),
            json!([]),
            "NoMatchingParent",
        ),
        (
            "infra",
            json!({"name": "edge"}),
            json!(["b.example.com"]),
            "NoMatchingListenerHostname",
        ),
    ];
    for (ns, parent, hostnames, reason) in cases {
        let r = route(
            ns,
            "r",
            json!({"parentRefs": [parent], "hostnames": hostnames, "rules": [{"backendRefs": [{"name": "local", "port": 8080}]}]}),
        );
        let out = world(listeners.clone(), vec![r]).outcome();
        assert_eq!(
            condition(&out.routes[0].parents[0].conditions, "Accepted"),
            ("False", reason),
            "{parent} {hostnames}"
        );
        assert_eq!(out.gateways[0].status.listeners[0].attached_routes, 0);
    }
}

#[test]
fn durations_follow_the_gateway_api_format() {
    use super::model::duration_ms;
    assert_eq!(duration_ms("1s"), Some(1000));
    assert_eq!(duration_ms("500ms"), Some(500));
    assert_eq!(duration_ms("1h2m3s4ms"), Some(3_723_004));
    assert_eq!(duration_ms("10"), None);
    assert_eq!(duration_ms("1d"), None);
}

#[test]
fn a_zero_request_timeout_turns_the_timeout_off() {
    let r = route(
        "infra",
        "r",
        json!({
            "parentRefs": [{"name": "edge"}],
            "rules": [
                {"matches": [{"path": {"value": "/off"}}], "timeouts": {"request": "0s"},
                 "backendRefs": [{"name": "local", "port": 8080}]},
                {"matches": [{"path": {"value": "/on"}}], "timeouts": {"request": "1500ms"},
                 "backendRefs": [{"name": "local", "port": 8080}]},
            ],
        }),
    );
    let out = world(json!([http_all("http")]), vec![r]).outcome();
    let rules = &out.gateways[0].ports[0].hosts[0].rules;
    let timeout_of = |path: &str| {
        rules
            .iter()
            .find(|r| r.matches.path == Some(PathMatch::Prefix(path.into())))
            .unwrap()
            .timeout_ms
    };
    assert_eq!(
        timeout_of("/off"),
        None,
        "0s is no timeout, not an immediate 504"
    );
    assert_eq!(timeout_of("/on"), Some(1500));
}
