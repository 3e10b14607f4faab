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

mod edge_policies {
    use std::collections::BTreeMap;

    use trellis_policy::gateway::{JwtRule, RateLimitKey, RouteRule};

    use super::*;
    use crate::gateway::{
        edge_policy::EdgePolicy,
        model::Outcome,
        policy_model::{EdgeInputs, JwksAt},
    };

    const GOOD_KEYS: &str =
        r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "x": "f83O", "y": "x_FE"}]}"#;

    fn policy(ns: &str, name: &str, created: &str, spec: Value) -> Arc<EdgePolicy> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "trellis.dev/v1alpha1",
                "kind": "EdgePolicy",
                "metadata": {"name": name, "namespace": ns, "generation": 2,
                             "creationTimestamp": created},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    fn target(kind: &str, name: &str) -> Value {
        json!({"group": "gateway.networking.k8s.io", "kind": kind, "name": name})
    }

    fn jwt(issuer: &str, secret: &str) -> Value {
        json!({"issuer": issuer, "audiences": ["shop"],
               "jwks": {"secretRef": {"name": secret, "key": "jwks.json"}},
               "claimToHeaders": [{"claim": "sub", "header": "x-user"}]})
    }

    fn secret(ns: &str, name: &str) -> JwksAt {
        JwksAt {
            namespace: ns.into(),
            kind: "Secret",
            name: name.into(),
            key: "jwks.json".into(),
        }
    }

    /// Gateway `infra/edge` (listeners `http` on 80 and `alt` on 8080), the
    /// route `web/api` on both (prefix `/api`) and `infra/local` on `http`
    /// (prefix `/local`), with `policies` and the key sets `keys`.
    fn world_with(
        policies: Vec<Arc<EdgePolicy>>,
        keys: Vec<(JwksAt, Result<String, String>)>,
    ) -> World {
        let api = route(
            "web",
            "api",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra"}],
                   "rules": [{"matches": [{"path": {"value": "/api"}}],
                              "filters": [{"type": "RequestHeaderModifier",
                                           "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}]}}],
                              "backendRefs": [{"name": "echo", "port": 8080}]}]}),
        );
        let local = route(
            "infra",
            "local",
            json!({"parentRefs": [{"name": "edge", "sectionName": "http"}],
                   "rules": [{"matches": [{"path": {"value": "/local"}}],
                              "backendRefs": [{"name": "local", "port": 8080}]}]}),
        );
        let mut listeners = json!([http_all("http")]);
        listeners.as_array_mut().unwrap().push(json!(
            {"name": "alt", "port": 8080, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}}
        ));
        let mut w = world(listeners, vec![api, local]);
        w.edge = EdgeInputs {
            policies,
            key_sets: keys.into_iter().collect(),
            last_good: BTreeMap::new(),
        };
        w
    }

    /// The rule of `route` served on `port`.
    fn rule<'a>(out: &'a Outcome, port: u16, route: &str) -> &'a RouteRule {
        out.gateways[0]
            .ports
            .iter()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("no port {port}"))
            .hosts
            .iter()
            .flat_map(|h| &h.rules)
            .find(|r| r.route == route)
            .unwrap_or_else(|| panic!("no rule of {route} on {port}"))
    }

    /// This controller's (status, reason) of `condition` at the policy's
    /// target `i`.
    fn policy_condition(out: &Outcome, name: &str, i: usize, t: &str) -> (String, String, String) {
        let p = out
            .edge
            .policies
            .iter()
            .find(|p| p.key.1 == name)
            .unwrap_or_else(|| panic!("no status for {name}"));
        let c = p.status.ancestors[i]
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap();
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    fn issuer(r: &RouteRule) -> Option<&str> {
        r.jwt.as_ref().map(|j| j.issuer.as_str())
    }

    #[test]
    fn a_route_policy_beats_the_gateway_policy_field_by_field() {
        let on_gateway = policy(
            "infra",
            "gw",
            "2026-12-01T00:00:00Z",
            json!({"targetRefs": [target("Gateway", "edge")],
                   "jwt": jwt("https://gateway.example", "keys"),
                   "rateLimit": {"perSecond": 10, "burst": 20}}),
        );
        let on_route = policy(
            "web",
            "api",
            "2026-12-02T00:00:00Z",
            json!({"targetRefs": [target("HTTPRoute", "api")],
                   "jwt": jwt("https://route.example", "route-keys")}),
        );
        let w = world_with(
            vec![on_gateway, on_route],
            vec![
                (secret("infra", "keys"), Ok(GOOD_KEYS.into())),
                (secret("web", "route-keys"), Ok(GOOD_KEYS.into())),
            ],
        );
        let out = w.outcome();
        let api = rule(&out, 80, "HTTPRoute/web/api");
        assert_eq!(issuer(api), Some("https://route.example"));
        let jwt = api.jwt.as_ref().unwrap();
        assert_eq!(jwt.jwks, GOOD_KEYS);
        assert_eq!(jwt.claims_to_headers, [("sub".into(), "x-user".into())]);
        assert_eq!(jwt.clock_skew_secs, 60);
        // The route's policy sets no rate limit: the Gateway's applies.
        let limit = api.rate_limit.as_ref().expect("the gateway's limit");
        assert_eq!(limit.id, "EdgePolicy/infra/gw");
        assert_eq!((limit.per_second, limit.burst), (10, 20));
        assert_eq!(limit.key, RateLimitKey::ClientAddress);
        // A route without a policy of its own gets the Gateway's, whole.
        let local = rule(&out, 80, "HTTPRoute/infra/local");
        assert_eq!(issuer(local), Some("https://gateway.example"));
        assert!(local.rate_limit.is_some());
        for name in ["gw", "api"] {
            let (status, reason, _) = policy_condition(&out, name, 0, "Accepted");
            assert_eq!((status.as_str(), reason.as_str()), ("True", "Accepted"));
            let (status, _, _) = policy_condition(&out, name, 0, "ResolvedRefs");
            assert_eq!(status, "True");
        }
        let entry = &out.edge.policies[0].status.ancestors[0];
        assert_eq!(entry.controller_name, CONTROLLER_NAME);
        assert_eq!(entry.ancestor_ref.kind, "Gateway");
        assert_eq!(entry.conditions[0].observed_generation, Some(2));

        // Without policies, nothing is set.
        let out = world_with(vec![], vec![]).outcome();
        let api = rule(&out, 80, "HTTPRoute/web/api");
        assert!(api.jwt.is_none() && api.rate_limit.is_none());
    }

    #[test]
    fn a_gateway_policy_covers_grpc_routes_and_a_grpc_route_can_be_targeted() {
        let on_gateway = policy(
            "infra",
            "gw",
            "2026-12-01T00:00:00Z",
            json!({"targetRefs": [target("Gateway", "edge")],
                   "rateLimit": {"perSecond": 10, "burst": 20}}),
        );
        let on_grpc = policy(
            "web",
            "rpc",
            "2026-12-01T00:00:00Z",
            json!({"targetRefs": [target("GRPCRoute", "rpc")],
                   "jwt": jwt("https://rpc.example", "keys")}),
        );
        let mut w = world_with(
            vec![on_gateway, on_grpc],
            vec![(secret("web", "keys"), Ok(GOOD_KEYS.into()))],
        );
        w.grpc_routes.push(obj(
            "GRPCRoute",
            Some("web"),
            "rpc",
            json!({"parentRefs": [{"name": "edge", "namespace": "infra", "sectionName": "http"}],
                   "rules": [{"matches": [{"method": {"service": "shop.Orders"}}],
                              "backendRefs": [{"name": "echo", "port": 8080}]}]}),
        ));
        let out = w.outcome();
        let rpc = rule(&out, 80, "GRPCRoute/web/rpc");
        assert_eq!(issuer(rpc), Some("https://rpc.example"));
        assert_eq!(
            rpc.rate_limit.as_ref().map(|l| l.id.as_str()),
            Some("EdgePolicy/infra/gw")
        );
        // An HTTPRoute of the same name is another target.
        assert!(rule(&out, 80, "HTTPRoute/web/api").jwt.is_none());
    }

    #[test]
    fn a_listener_policy_applies_through_that_listener_only() {
        let p = policy(
            "infra",
            "alt-only",
            "2026-12-01T00:00:00Z",
            json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                   "name": "edge", "sectionName": "alt"}],
                   "rateLimit": {"perSecond": 1, "burst": 1,
                                 "key": {"type": "ClientAddress"}}}),
        );
        let out = world_with(vec![p], vec![]).outcome();
        assert!(rule(&out, 8080, "HTTPRoute/web/api").rate_limit.is_some());
        assert!(rule(&out, 80, "HTTPRoute/web/api").rate_limit.is_none());
        let (_, _, message) = policy_condition(&out, "alt-only", 0, "ResolvedRefs");
        assert_eq!(message, "the policy refers to nothing");
    }

    #[test]
    fn of_two_policies_on_one_target_the_oldest_applies_and_the_other_is_conflicted() {
        let older = policy(
            "web",
            "zz-older",
            "2026-12-01T00:00:00Z",
            json!({"targetRefs": [target("HTTPRoute", "api")],
                   "jwt": jwt("https://older.example", "keys")}),
        );
        let newer = policy(
            "web",
            "aa-newer",
            "2026-12-02T00:00:00Z",
            json!({"targetRefs": [target("HTTPRoute", "api")],
                   "jwt": jwt("https://newer.example", "keys")}),
        );
        let keys = || vec![(secret("web", "keys"), Ok(GOOD_KEYS.to_owned()))];
        // Listed newest first: the order of the cache does not matter.
        let out = world_with(vec![newer.clone(), older.clone()], keys()).outcome();
        assert_eq!(
            issuer(rule(&out, 80, "HTTPRoute/web/api")),
            Some("https://older.example")
        );
        let (status, reason, message) = policy_condition(&out, "aa-newer", 0, "Accepted");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Conflicted"));
        assert!(message.contains("EdgePolicy web/zz-older"), "{message}");
        let (status, reason, _) = policy_condition(&out, "zz-older", 0, "Accepted");
        assert_eq!((status.as_str(), reason.as_str()), ("True", "Accepted"));

        // Created in the same second: namespace/name decides.
        let same = |name: &str, issuer: &str| {
            policy(
                "web",
                name,
                "2026-12-01T00:00:00Z",
                json!({"targetRefs": [target("HTTPRoute", "api")], "jwt": jwt(issuer, "keys")}),
            )
        };
        let out = world_with(
            vec![
                same("b", "https://b.example"),
                same("a", "https://a.example"),
            ],
            keys(),
        )
        .outcome();
        assert_eq!(
            issuer(rule(&out, 80, "HTTPRoute/web/api")),
            Some("https://a.example")
        );
    }

    #[test]
    fn a_target_that_does_not_exist_is_named() {
        let p = policy(
            "web",
            "p",
            "2026-12-01T00:00:00Z",
            json!({"targetRefs": [
                target("HTTPRoute", "nothing"),
                target("GRPCRoute", "api"),
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
                target("HTTPRoute", "api"),
            ], "rateLimit": {"perSecond": 1, "burst": 1}}),
        );
        let mut w = world_with(vec![p], vec![]);
        // A Gateway of another class in the policy's namespace.
        w.gateways.push(obj(
            "Gateway",
            Some("web"),
            "edge",
            json!({"gatewayClassName": "other", "listeners": [http_all("http")]}),
        ));
        let out = w.outcome();
        let expect = [
            ("TargetNotFound", "HTTPRoute web/nothing does not exist"),
            ("TargetNotFound", "GRPCRoute web/api does not exist"),
            (
                "TargetNotFound",
                "Gateway web/edge is not of a class served by this controller",
            ),
            ("Accepted", "applies to the rules of HTTPRoute web/api"),
        ];
        for (i, (reason, message)) in expect.into_iter().enumerate() {
            let (_, r, m) = policy_condition(&out, "p", i, "Accepted");
            assert_eq!((r.as_str(), m.as_str()), (reason, message));
        }
        let gw_listener = policy(
            "infra",
            "l",
            "2026-12-01T00:00:00Z",
            json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                   "name": "edge", "sectionName": "nope"}],
                   "rateLimit": {"perSecond": 1, "burst": 1}}),
        );
        let out = world_with(vec![gw_listener], vec![]).outcome();
        let (_, reason, message) = policy_condition(&out, "l", 0, "Accepted");
        assert_eq!(reason, "TargetNotFound");
        assert!(message.contains("no listener named \"nope\""), "{message}");
        assert!(rule(&out, 80, "HTTPRoute/web/api").rate_limit.is_none());
    }

    fn on_api(jwks_secret: &str) -> Arc<EdgePolicy> {
        policy(
            "web",
            "api",
            "2026-12-01T00:00:00Z",
            json!({"targetRefs": [target("HTTPRoute", "api")],
                   "jwt": jwt("https://issuer.example", jwks_secret),
                   "rateLimit": {"perSecond": 5, "burst": 5, "key": {"type": "Claim", "claim": "sub"}}}),
        )
    }

    fn last_good() -> JwtRule {
        JwtRule {
            issuer: "https://issuer.example".into(),
            audiences: vec!["shop".into()],
            jwks: GOOD_KEYS.into(),
            required_claims: vec![],
            claims_to_headers: vec![],
            clock_skew_secs: 60,
        }
    }

    #[test]
    fn a_missing_key_set_closes_the_rule_or_keeps_the_last_good_check() {
        let missing = (
            secret("web", "keys"),
            Err("Secret web/keys does not exist".to_owned()),
        );
        let out = world_with(vec![on_api("keys")], vec![missing.clone()]).outcome();
        let (status, reason, message) = policy_condition(&out, "api", 0, "ResolvedRefs");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "RefNotFound"));
        assert!(
            message.starts_with("Secret web/keys does not exist") && message.contains("500"),
            "{message}"
        );
        let (status, _, _) = policy_condition(&out, "api", 0, "Accepted");
        assert_eq!(status, "True", "attached, but its key set cannot be read");
        // Fail closed: never served without the check. The rule's filters
        // and backends go; its one backend is unresolved, which is a 500.
        let api = rule(&out, 80, "HTTPRoute/web/api");
        assert!(api.jwt.is_none());
        assert!(api.filters.is_empty());
        assert_eq!(api.backends.len(), 1);
        assert!(api.backends[0].service.is_none());
        assert!(out.edge.good.is_empty());
        // Other routes are untouched.
        assert!(
            rule(&out, 80, "HTTPRoute/infra/local").backends[0]
                .service
                .is_some()
        );

        // With a check in force before, that check stays.
        let mut w = world_with(vec![on_api("keys")], vec![missing]);
        w.edge
            .last_good
            .insert(("web".into(), "api".into()), last_good());
        let out = w.outcome();
        let api = rule(&out, 80, "HTTPRoute/web/api");
        assert_eq!(api.jwt.as_ref(), Some(&last_good()));
        assert!(api.backends[0].service.is_some());
        assert!(api.rate_limit.is_some());
        let (_, _, message) = policy_condition(&out, "api", 0, "ResolvedRefs");
        assert!(
            message.contains("the last good key set stays in force"),
            "{message}"
        );
        assert_eq!(out.edge.good.len(), 1, "still remembered");
    }

    #[test]
    fn a_key_set_without_a_usable_key_is_invalid_and_the_last_good_one_serves() {
        let bad = (
            secret("web", "keys"),
            Ok(r#"{"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}"#.to_owned()),
        );
        let mut w = world_with(vec![on_api("keys")], vec![bad.clone()]);
        w.edge
            .last_good
            .insert(("web".into(), "api".into()), last_good());
        let out = w.outcome();
        let (status, reason, message) = policy_condition(&out, "api", 0, "Accepted");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
        assert!(
            message.contains("key \"s\" is a shared secret")
                && message.contains("the last good key set stays in force"),
            "{message}"
        );
        assert_eq!(
            rule(&out, 80, "HTTPRoute/web/api").jwt.as_ref(),
            Some(&last_good())
        );

        // Never good since the controller started: closed.
        let out = world_with(vec![on_api("keys")], vec![bad]).outcome();
        let api = rule(&out, 80, "HTTPRoute/web/api");
        assert!(api.jwt.is_none() && api.backends[0].service.is_none());

        // Fixed: the new key set is in force and remembered.
        let out = world_with(
            vec![on_api("keys")],
            vec![(secret("web", "keys"), Ok(GOOD_KEYS.into()))],
        )
        .outcome();
        let api = rule(&out, 80, "HTTPRoute/web/api");
        assert_eq!(api.jwt.as_ref().unwrap().jwks, GOOD_KEYS);
        assert_eq!(
            api.rate_limit.as_ref().unwrap().key,
            RateLimitKey::Claim("sub".into())
        );
        assert_eq!(out.edge.good.len(), 1);
    }
}
