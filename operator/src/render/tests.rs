//! Unit tests of the renderer: every field that matters, without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, PodSpec, Probe},
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use trellis_policy::{Dependency, Duration, Protocol, Resilience, SidecarPolicy};

use super::*;
use crate::crd::{Autoscaling, MicroService, MicroServiceSpec, SecretRef};

const UID: &str = "0b5a1c9e-1111-2222-3333-444455556666";

fn spec() -> MicroServiceSpec {
    serde_json::from_value(serde_json::json!({
        "image": "registry.local:5000/trellis/order-service:0.1.0",
        "port": 8080,
    }))
    .unwrap()
}

fn ms(spec: MicroServiceSpec) -> MicroService {
    let mut ms = MicroService::new("order", spec);
    ms.metadata = ObjectMeta {
        name: Some("order".into()),
        namespace: Some("shop".into()),
        uid: Some(UID.into()),
        generation: Some(1),
        ..ObjectMeta::default()
    };
    ms
}

fn cfg() -> RenderConfig {
    RenderConfig {
        sidecar_image: "trellis/sidecar:test".into(),
        cluster_domain: "cluster.local".into(),
        otlp_endpoint: None,
        mesh: None,
    }
}

fn children(spec: MicroServiceSpec) -> Children {
    render(&ms(spec), &cfg(), &SecretVersions::new()).unwrap()
}

fn pod(c: &Children) -> &PodSpec {
    c.deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn sidecar(c: &Children) -> &Container {
    let inits = pod(c).init_containers.as_ref().unwrap();
    assert_eq!(inits.len(), 1);
    &inits[0]
}

fn app(c: &Children) -> &Container {
    let containers = &pod(c).containers;
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn env(c: &Container) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .map(|e| {
            let v = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    format!("fieldRef:{}", from.field_ref.as_ref().unwrap().field_path)
                }
                _ => String::new(),
            };
            (e.name.clone(), v)
        })
        .collect()
}

fn checksum(c: &Children) -> Option<String> {
    c.deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()
        .get(CONFIG_CHECKSUM_ANNOTATION)
        .cloned()
}

#[test]
fn names_and_owner_references() {
    let c = children(spec());
    let names = [
        c.config.metadata.name.as_deref(),
        c.policy.metadata.name.as_deref(),
        c.service_account.metadata.name.as_deref(),
        c.role.metadata.name.as_deref(),
        c.role_binding.metadata.name.as_deref(),
        c.deployment.metadata.name.as_deref(),
        c.service.metadata.name.as_deref(),
    ];
    assert_eq!(
        names.map(Option::unwrap),
        [
            "order-config",
            "order-sidecar",
            "order",
            "order-sidecar",
            "order-sidecar",
            "order",
            "order"
        ]
    );
    for meta in [
        &c.config.metadata,
        &c.policy.metadata,
        &c.service_account.metadata,
        &c.role.metadata,
        &c.role_binding.metadata,
        &c.deployment.metadata,
        &c.service.metadata,
    ] {
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        let o = &owners[0];
        assert_eq!(
            (
                o.api_version.as_str(),
                o.kind.as_str(),
                o.name.as_str(),
                o.uid.as_str()
            ),
            ("trellis.dev/v1alpha1", "MicroService", "order", UID)
        );
        assert_eq!(o.controller, Some(true));
    }
}

#[test]
fn recommended_labels() {
    let c = children(spec());
    let mut expected = BTreeMap::from(
        [
            ("app.kubernetes.io/name", "order"),
            ("app.kubernetes.io/instance", "order"),
            ("app.kubernetes.io/part-of", "trellis"),
            ("app.kubernetes.io/managed-by", "trellis-operator"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    for meta in [
        &c.config.metadata,
        &c.policy.metadata,
        &c.service_account.metadata,
        &c.role.metadata,
        &c.role_binding.metadata,
    ] {
        assert_eq!(meta.labels.as_ref(), Some(&expected));
    }
    // The Service also names its pods' ServiceAccount (for mutual TLS).
    let mut service = expected.clone();
    service.insert("trellis.dev/service-account".into(), "order".into());
    assert_eq!(c.service.metadata.labels.as_ref(), Some(&service));
    // The version only where there is one: the Deployment and its pods.
    expected.insert("app.kubernetes.io/version".into(), "0.1.0".into());
    assert_eq!(c.deployment.metadata.labels.as_ref(), Some(&expected));
    let template = c
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref();
    assert_eq!(template.unwrap().labels.as_ref(), Some(&expected));
    // The selector must not include the version: it is immutable.
    let selector = BTreeMap::from(
        [
            ("app.kubernetes.io/name", "order"),
            ("app.kubernetes.io/instance", "order"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    assert_eq!(
        c.deployment
            .spec
            .as_ref()
            .unwrap()
            .selector
            .match_labels
            .as_ref(),
        Some(&selector)
    );
    assert_eq!(
        c.service.spec.as_ref().unwrap().selector.as_ref(),
        Some(&selector)
    );
}

#[test]
fn an_image_change_changes_the_deployment_only() {
    let a = children(spec());
    let mut s = spec();
    s.image = "trellis/order-service:0.2.0".into();
    let b = children(s);
    assert_ne!(a.deployment, b.deployment);
    assert_eq!(
        (
            &a.config,
            &a.policy,
            &a.service_account,
            &a.role,
            &a.role_binding,
            &a.service
        ),
        (
            &b.config,
            &b.policy,
            &b.service_account,
            &b.role,
            &b.role_binding,
            &b.service
        )
    );
    assert_eq!(checksum(&a), checksum(&b));
}

#[test]
fn image_versions() {
    assert_eq!(
        image_version("trellis/order:0.1.0").as_deref(),
        Some("0.1.0")
    );
    assert_eq!(
        image_version("localhost:5000/order").as_deref(),
        Some("latest")
    );
    assert_eq!(image_version("order").as_deref(), Some("latest"));
    assert_eq!(image_version("order@sha256:abcd").as_deref(), None);
    assert_eq!(
        image_version("order:1.0@sha256:abcd").as_deref(),
        Some("1.0")
    );
    assert_eq!(
        image_version("order:v1+build.7").as_deref(),
        Some("v1_build.7")
    );
    let long = format!("order:{}", "a".repeat(100));
    assert_eq!(image_version(&long).unwrap().len(), 63);
}

#[test]
fn config_map_holds_the_config() {
    let mut s = spec();
    s.config = BTreeMap::from([("LOG_LEVEL".into(), "info".into())]);
    let c = children(s);
    assert_eq!(
        c.config.data,
        Some(BTreeMap::from([("LOG_LEVEL".into(), "info".into())]))
    );
}

#[test]
fn policy_config_map_holds_the_rendered_policy() {
    let mut s = spec();
    s.dependencies = vec![Dependency {
        timeout: Some(Duration::from_millis(800)),
        ..Dependency::named("user")
    }];
    s.resilience = Some(Resilience {
        timeout: Duration::from_secs(3),
        ..Resilience::default()
    });
    s.protocol = Protocol::Grpc;
    let c = children(s);
    let data = c.policy.data.as_ref().unwrap();
    assert_eq!(data.len(), 1);
    let policy = SidecarPolicy::from_json(&data[trellis_policy::POLICY_KEY]).unwrap();
    assert_eq!(policy.service, "order");
    assert_eq!(policy.namespace, "shop");
    assert_eq!(policy.app_port, 8080);
    assert_eq!(policy.protocol, Protocol::Grpc);
    assert_eq!(policy.resilience.timeout, Duration::from_secs(3));
    assert_eq!(policy.dependencies[0].name, "user");
    assert_eq!(
        policy.dependencies[0].timeout,
        Some(Duration::from_millis(800))
    );
}

#[test]
fn a_self_dependency_in_the_own_namespace_is_refused() {
    let mut s = spec();
    s.dependencies = vec![Dependency {
        namespace: Some("shop".into()),
        ..Dependency::named("order")
    }];
    let err = render(&ms(s), &cfg(), &SecretVersions::new()).unwrap_err();
    assert!(
        err.to_string().contains("may not depend on itself"),
        "{err}"
    );
    // The same name in another namespace is another service.
    let mut s = spec();
    s.dependencies = vec![Dependency {
        namespace: Some("other".into()),
        ..Dependency::named("order")
    }];
    assert!(render(&ms(s), &cfg(), &SecretVersions::new()).is_ok());
}

#[test]
fn render_needs_a_uid() {
    let mut m = ms(spec());
    m.metadata.uid = None;
    assert!(matches!(
        render(&m, &cfg(), &SecretVersions::new()),
        Err(RenderError::MissingMetadata("uid"))
    ));
}

#[test]
fn checksum_follows_the_config_not_the_policy() {
    let base = children(spec());
    let sum = checksum(&base).unwrap();
    assert_eq!(sum, config_checksum(&BTreeMap::new()));
    assert_eq!(sum.len(), 64);

    let mut s = spec();
    s.config.insert("LOG_LEVEL".into(), "debug".into());
    let changed = children(s);
    assert_ne!(checksum(&changed).unwrap(), sum);

    // A policy change changes the policy ConfigMap and nothing in the Deployment.
    let mut s = spec();
    s.resilience = Some(Resilience {
        timeout: Duration::from_secs(9),
        ..Resilience::default()
    });
    s.dependencies = vec![Dependency::named("user")];
    let policy_changed = children(s);
    assert_eq!(policy_changed.deployment, base.deployment);
    assert_ne!(policy_changed.policy, base.policy);
    assert_eq!(policy_changed.config, base.config);
}

#[test]
fn checksum_is_unambiguous() {
    let a = BTreeMap::from([("a".to_owned(), "bc".to_owned())]);
    let b = BTreeMap::from([("ab".to_owned(), "c".to_owned())]);
    assert_ne!(config_checksum(&a), config_checksum(&b));
}

#[test]
fn hot_reload_does_not_roll_pods() {
    let mut s = spec();
    s.hot_reload = true;
    let a = children(s.clone());
    s.config.insert("LOG_LEVEL".into(), "debug".into());
    let b = children(s);
    assert_eq!(checksum(&a), None);
    assert_eq!(a.deployment, b.deployment);
    assert_ne!(a.config, b.config);
}

#[test]
fn an_otlp_endpoint_reaches_the_sidecar_with_the_version() {
    let mut config = cfg();
    config.otlp_endpoint = Some("http://otel.observability:4317".into());
    let mut s = spec();
    s.image = "trellis/order-service:1.4.2".into();
    let c = render(&ms(s), &config, &SecretVersions::new()).unwrap();
    let e = env(sidecar(&c));
    assert_eq!(
        e["OTEL_EXPORTER_OTLP_ENDPOINT"],
        "http://otel.observability:4317"
    );
    assert_eq!(e["TRELLIS_SERVICE_VERSION"], "1.4.2");
    // Off by default: no endpoint, no tracing variables.
    let e = env(sidecar(&children(spec())));
    assert!(!e.contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e:?}");
}

#[test]
fn sidecar_is_a_native_sidecar_with_the_contract() {
    let c = children(spec());
    let sc = sidecar(&c);
    assert_eq!(sc.name, "trellis-sidecar");
    assert_eq!(sc.image.as_deref(), Some("trellis/sidecar:test"));
    assert_eq!(sc.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sc.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let ports: Vec<_> = sc
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref().unwrap(), p.container_port))
        .collect();
    assert_eq!(ports, [("inbound", 15006), ("admin", 15020)]);
    assert_eq!(
        env(sc),
        BTreeMap::from(
            [
                ("TRELLIS_SERVICE", "order"),
                ("TRELLIS_POLICY_CONFIGMAP", "order-sidecar"),
                ("POD_NAMESPACE", "fieldRef:metadata.namespace"),
                ("POD_NAME", "fieldRef:metadata.name"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        )
    );
    let probe = |p: &Option<Probe>| {
        let h = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (h.path.clone().unwrap(), h.port.clone())
    };
    assert_eq!(
        probe(&sc.startup_probe),
        ("/livez".into(), IntOrString::Int(15020))
    );
    assert_eq!(
        probe(&sc.readiness_probe),
        ("/readyz".into(), IntOrString::Int(15020))
    );
    assert_eq!(
        probe(&sc.liveness_probe),
        ("/livez".into(), IntOrString::Int(15020))
    );
    let mounts: Vec<_> = sc
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        mounts,
        [
            ("policy", "/etc/trellis/policy"),
            ("sidecar-tmp", "/tmp"),
            (
                "sidecar-token",
                "/var/run/secrets/kubernetes.io/serviceaccount"
            )
        ]
    );
}

#[test]
fn app_container_goes_out_through_the_sidecar() {
    let c = children(spec());
    let a = app(&c);
    assert_eq!(a.name, "app");
    assert_eq!(
        a.image.as_deref(),
        Some("registry.local:5000/trellis/order-service:0.1.0")
    );
    assert_eq!(
        env(a),
        BTreeMap::from(
            [
                ("PORT", "8080"),
                ("HTTP_PROXY", "http://127.0.0.1:15001"),
                ("TRELLIS_OUTBOUND", "http://127.0.0.1:15001"),
                ("NO_PROXY", "localhost,127.0.0.1"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        )
    );
    let env_from = a.env_from.as_ref().unwrap();
    assert_eq!(
        env_from[0].config_map_ref.as_ref().unwrap().name,
        "order-config"
    );
    let h = a
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(
        (h.path.as_deref(), &h.port),
        (Some("/readyz"), &IntOrString::Int(15020))
    );
    assert!(a.liveness_probe.is_none());
    let mounts: Vec<_> = a
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            ("config", "/etc/trellis/config", Some(true)),
            ("app-tmp", "/tmp", None)
        ]
    );
}

#[test]
fn both_containers_meet_restricted_pod_security() {
    let c = children(spec());
    let p = pod(&c);
    let psc = p.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    for container in [sidecar(&c), app(&c)] {
        let sc = container.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true), "{}", container.name);
        assert_eq!(sc.run_as_user, Some(65532), "{}", container.name);
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{}",
            container.name
        );
        assert_eq!(sc.privileged, Some(false), "{}", container.name);
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{}",
            container.name
        );
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_owned()]),
            "{}",
            container.name
        );
        assert!(sc.capabilities.as_ref().unwrap().add.is_none());
        assert_eq!(
            sc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault",
            "{}",
            container.name
        );
    }
    // No hostPath, no host namespaces.
    assert!(p.host_network.is_none() && p.host_pid.is_none() && p.host_ipc.is_none());
    for v in p.volumes.iter().flatten() {
        assert!(v.host_path.is_none(), "{}", v.name);
    }
}

#[test]
fn only_the_sidecar_gets_an_api_token() {
    let c = children(spec());
    let p = pod(&c);
    assert_eq!(p.service_account_name.as_deref(), Some("order"));
    assert_eq!(p.automount_service_account_token, Some(false));
    assert_eq!(
        c.service_account.automount_service_account_token,
        Some(false)
    );
    assert!(
        app(&c)
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != "sidecar-token")
    );
    let token = p
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "sidecar-token")
        .unwrap();
    let sources = token.projected.as_ref().unwrap().sources.as_ref().unwrap();
    assert!(sources[0].service_account_token.is_some());
    assert_eq!(
        sources[1].config_map.as_ref().unwrap().name,
        "kube-root-ca.crt"
    );
    assert!(sources[2].downward_api.is_some());
}

#[test]
fn volumes_point_at_the_config_maps() {
    let c = children(spec());
    let p = pod(&c);
    let cm = |name: &str| {
        p.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .and_then(|v| v.config_map.as_ref())
            .map(|c| c.name.clone())
    };
    assert_eq!(cm("config").as_deref(), Some("order-config"));
    assert_eq!(cm("policy").as_deref(), Some("order-sidecar"));
}

#[test]
fn role_allows_endpointslices_and_the_own_policy_only() {
    let c = children(spec());
    let rules = c.role.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[0].api_groups,
        Some(vec!["discovery.k8s.io".to_owned()])
    );
    assert_eq!(rules[0].resources, Some(vec!["endpointslices".to_owned()]));
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
    assert_eq!(rules[0].resource_names, None);
    assert_eq!(rules[1].api_groups, Some(vec![String::new()]));
    assert_eq!(rules[1].resources, Some(vec!["configmaps".to_owned()]));
    assert_eq!(
        rules[1].resource_names,
        Some(vec!["order-sidecar".to_owned()])
    );
    assert_eq!(rules[1].verbs, ["get", "list", "watch"]);

    let rb = &c.role_binding;
    assert_eq!(
        (rb.role_ref.kind.as_str(), rb.role_ref.name.as_str()),
        ("Role", "order-sidecar")
    );
    let subject = &rb.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "order", Some("shop"))
    );
}

#[test]
fn service_targets_the_sidecar_inbound_port() {
    let c = children(spec());
    let ports = c.service.spec.as_ref().unwrap().ports.as_ref().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("http"));
    assert_eq!(ports[0].port, 80);
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(15006)));

    let mut s = spec();
    s.protocol = Protocol::Grpc;
    let c = children(s);
    let port = &c.service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(port.name.as_deref(), Some("grpc"));
    assert_eq!(port.app_protocol.as_deref(), Some("kubernetes.io/h2c"));
    assert_eq!(port.target_port, Some(IntOrString::Int(15006)));
}

#[test]
fn replicas_pdb_and_hpa() {
    let c = children(spec());
    assert_eq!(c.deployment.spec.as_ref().unwrap().replicas, Some(1));
    assert!(c.pdb.is_none());
    assert!(c.hpa.is_none());

    let mut s = spec();
    s.replicas = 3;
    let c = children(s);
    assert_eq!(c.deployment.spec.as_ref().unwrap().replicas, Some(3));
    let pdb = c.pdb.unwrap();
    let pdb_spec = pdb.spec.unwrap();
    assert_eq!(pdb_spec.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        pdb_spec.selector.unwrap().match_labels,
        Some(selector_labels("order"))
    );
    assert!(c.hpa.is_none());

    let mut s = spec();
    s.autoscaling = Some(Autoscaling {
        min_replicas: 2,
        max_replicas: 6,
        target_cpu_utilization: 70,
    });
    let c = children(s);
    // The HPA owns the replica count.
    assert_eq!(c.deployment.spec.as_ref().unwrap().replicas, None);
    assert!(c.pdb.is_some());
    let hpa = c.hpa.unwrap().spec.unwrap();
    assert_eq!(hpa.min_replicas, Some(2));
    assert_eq!(hpa.max_replicas, 6);
    assert_eq!(hpa.scale_target_ref.kind, "Deployment");
    assert_eq!(hpa.scale_target_ref.name, "order");
    let metric = &hpa.metrics.unwrap()[0];
    let resource = metric.resource.as_ref().unwrap();
    assert_eq!(resource.name, "cpu");
    assert_eq!(resource.target.average_utilization, Some(70));
}

#[test]
fn app_resources_are_passed_through() {
    let s: MicroServiceSpec = serde_json::from_value(serde_json::json!({
        "image": "order:1", "port": 8080,
        "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "128Mi"}},
    }))
    .unwrap();
    let c = children(s.clone());
    assert_eq!(app(&c).resources, s.resources);
}

#[test]
fn app_gets_the_default_resources_when_none_are_given() {
    let c = children(spec());
    let r = app(&c).resources.clone().expect("the app has resources");
    let q = |list: &Option<BTreeMap<String, Quantity>>, name: &str| {
        list.as_ref().and_then(|l| l.get(name)).map(|q| q.0.clone())
    };
    assert_eq!(q(&r.requests, "cpu").as_deref(), Some("50m"));
    assert_eq!(q(&r.requests, "memory").as_deref(), Some("64Mi"));
    assert_eq!(q(&r.limits, "memory").as_deref(), Some("256Mi"));
    // No CPU limit: CPU is compressible, and a limit throttles latency.
    assert_eq!(q(&r.limits, "cpu"), None);
    assert_eq!(r.limits.as_ref().map(BTreeMap::len), Some(1));
    assert_eq!(r.requests.as_ref().map(BTreeMap::len), Some(2));
}

#[test]
fn replicas_spread_across_nodes_and_zones() {
    let c = children(spec());
    let constraints = pod(&c)
        .topology_spread_constraints
        .clone()
        .expect("topology spread constraints");
    let keys: Vec<&str> = constraints
        .iter()
        .map(|t| t.topology_key.as_str())
        .collect();
    assert_eq!(
        keys,
        ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    );
    for t in &constraints {
        assert_eq!(t.max_skew, 1);
        // A preference, so a single-node cluster still schedules every replica.
        assert_eq!(t.when_unsatisfiable, "ScheduleAnyway");
        assert_eq!(
            t.label_selector,
            Some(LabelSelector {
                match_labels: Some(selector_labels("order")),
                ..LabelSelector::default()
            })
        );
        // Counted per ReplicaSet, so a rollout's new pods spread among themselves.
        assert_eq!(
            t.match_label_keys,
            Some(vec!["pod-template-hash".to_owned()])
        );
        assert_eq!(t.min_domains, None);
    }
    // The selector picks exactly the Deployment's pods.
    let template = c.deployment.spec.as_ref().unwrap().template.clone();
    let labels = template.metadata.unwrap().labels.unwrap();
    for (k, v) in selector_labels("order") {
        assert_eq!(labels.get(&k), Some(&v));
    }
}

#[test]
fn objects_serialise_with_api_version_and_kind() {
    let c = children(spec());
    let v = serde_json::to_value(&c.deployment).unwrap();
    assert_eq!(v["apiVersion"], "apps/v1");
    assert_eq!(v["kind"], "Deployment");
    let v = serde_json::to_value(&c.role).unwrap();
    assert_eq!(v["apiVersion"], "rbac.authorization.k8s.io/v1");
    assert_eq!(v["kind"], "Role");
}

#[test]
fn ownership_check_needs_the_controller_owner_reference() {
    let m = ms(spec());
    let owner = m.controller_owner_ref(&()).unwrap();
    assert!(is_controlled_by(Some(std::slice::from_ref(&owner)), &m));
    let mut other = owner.clone();
    other.uid = "another".into();
    assert!(!is_controlled_by(Some(&[other]), &m));
    let mut not_controller = owner;
    not_controller.controller = Some(false);
    assert!(!is_controlled_by(Some(&[not_controller]), &m));
    assert!(!is_controlled_by(None, &m));
}

#[test]
fn status_url() {
    assert_eq!(
        service_url("order", "shop", "cluster.local"),
        "http://order.shop.svc.cluster.local"
    );
}

/// `order` listing `order-db` as environment variables and `order-tls` as files.
fn with_secrets() -> MicroServiceSpec {
    let mut s = spec();
    s.secrets = vec![
        SecretRef::env("order-db"),
        SecretRef {
            name: "order-tls".into(),
            env: false,
            files: true,
        },
    ];
    s
}

/// Both Secrets of [`with_secrets`], as the operator would have read them.
fn versions() -> SecretVersions {
    let mut v = SecretVersions::new();
    v.insert("order-db", "uid-db", "100");
    v.insert("order-tls", "uid-tls", "200");
    v
}

fn children_with(spec: MicroServiceSpec, versions: &SecretVersions) -> Children {
    render(&ms(spec), &cfg(), versions).unwrap()
}

fn secrets_checksum_of(c: &Children) -> Option<String> {
    c.deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(SECRETS_CHECKSUM_ANNOTATION)
        .cloned()
}

#[test]
fn secrets_reach_the_app_as_env_from_and_read_only_files() {
    let c = children_with(with_secrets(), &versions());
    let a = app(&c);
    let env_from = a.env_from.as_ref().unwrap();
    assert_eq!(env_from.len(), 2, "{env_from:?}");
    // The config first, then the env Secret: a later source wins a key.
    assert_eq!(
        env_from[0].config_map_ref.as_ref().unwrap().name,
        "order-config"
    );
    let secret_ref = env_from[1].secret_ref.as_ref().unwrap();
    assert_eq!(
        (secret_ref.name.as_str(), secret_ref.optional),
        ("order-db", Some(false))
    );
    assert!(
        env_from
            .iter()
            .all(|e| e.secret_ref.as_ref().is_none_or(|s| s.name != "order-tls"))
    );

    let mounts: Vec<_> = a
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            ("config", "/etc/trellis/config", Some(true)),
            ("secret-1", "/etc/trellis/secrets/order-tls", Some(true)),
            ("app-tmp", "/tmp", None),
        ]
    );
    let p = pod(&c);
    let volume = p
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "secret-1")
        .expect("the order-tls volume");
    let source = volume.secret.as_ref().unwrap();
    assert_eq!(source.secret_name.as_deref(), Some("order-tls"));
    assert_eq!(source.optional, Some(false));
    // Readable by the owner (root) and the group only: the group is the
    // pod's fsGroup, which is the app's group, so the app reads the files.
    assert_eq!(source.default_mode, Some(0o440));
    let psc = p.security_context.as_ref().unwrap();
    let app_sc = a.security_context.as_ref().unwrap();
    assert_eq!(psc.fs_group, app_sc.run_as_group);
    assert_eq!(psc.fs_group, Some(RUN_AS));
    // Only one Secret volume: order-db is env only.
    assert_eq!(
        p.volumes
            .iter()
            .flatten()
            .filter(|v| v.secret.is_some())
            .count(),
        1
    );
}

#[test]
fn the_sidecar_gets_nothing_from_the_secrets() {
    let c = children_with(with_secrets(), &versions());
    let sc = sidecar(&c);
    assert!(sc.env_from.is_none(), "{:?}", sc.env_from);
    assert!(
        sc.volume_mounts
            .iter()
            .flatten()
            .all(|m| !m.name.starts_with("secret-") && !m.mount_path.starts_with(SECRETS_MOUNT)),
        "{:?}",
        sc.volume_mounts
    );
    assert!(sc.env.iter().flatten().all(|e| {
        e.value_from
            .as_ref()
            .is_none_or(|f| f.secret_key_ref.is_none())
    }));
}

#[test]
fn secrets_stay_out_of_the_config_maps() {
    let mut s = with_secrets();
    s.config.insert("RUST_LOG".into(), "info".into());
    let c = children_with(s, &versions());
    assert_eq!(
        c.config.data,
        Some(BTreeMap::from([("RUST_LOG".into(), "info".into())]))
    );
    let policy = &c.policy.data.as_ref().unwrap()[trellis_policy::POLICY_KEY];
    for name in ["order-db", "order-tls", "uid-db", "uid-tls"] {
        assert!(!policy.contains(name), "{name} in the policy: {policy}");
    }
}

#[test]
fn the_secrets_checksum_follows_the_listed_secrets_versions_only() {
    let base = children_with(with_secrets(), &versions());
    let sum = secrets_checksum_of(&base).expect("a secrets checksum");
    assert_eq!(sum.len(), 64);
    // The same versions: the same Deployment (no roll on a resync).
    assert_eq!(
        children_with(with_secrets(), &versions()).deployment,
        base.deployment
    );

    // A listed Secret changed: a new resourceVersion, a new checksum, and
    // nothing else differs.
    let mut changed = versions();
    changed.insert("order-db", "uid-db", "101");
    let after = children_with(with_secrets(), &changed);
    assert_ne!(secrets_checksum_of(&after).unwrap(), sum);
    assert_eq!(checksum(&after), checksum(&base));
    assert_eq!(after.config, base.config);

    // Re-created with the same resourceVersion is still another Secret.
    let mut recreated = versions();
    recreated.insert("order-db", "uid-db-2", "100");
    assert_ne!(
        secrets_checksum_of(&children_with(with_secrets(), &recreated)).unwrap(),
        sum
    );

    // A Secret the MicroService does not list: no change.
    let mut other = versions();
    other.insert("someone-else", "uid-x", "999");
    assert_eq!(
        children_with(with_secrets(), &other).deployment,
        base.deployment
    );

    // A missing Secret counts as such, so its creation changes the checksum.
    let mut missing = SecretVersions::new();
    missing.insert("order-db", "uid-db", "100");
    assert_ne!(
        secrets_checksum_of(&children_with(with_secrets(), &missing)).unwrap(),
        sum
    );
    assert_eq!(missing.missing(&with_secrets().secrets), ["order-tls"]);
}

#[test]
fn no_secrets_no_checksum_and_hot_reload_does_not_roll_on_a_secret() {
    // Listing none adds nothing, so an upgrade of the operator rolls no pods.
    let c = children(spec());
    assert_eq!(secrets_checksum_of(&c), None);
    assert_eq!(app(&c).env_from.as_ref().unwrap().len(), 1);
    assert!(pod(&c).volumes.iter().flatten().all(|v| v.secret.is_none()));

    let mut s = with_secrets();
    s.hot_reload = true;
    let a = children_with(s.clone(), &versions());
    let mut changed = versions();
    changed.insert("order-tls", "uid-tls", "201");
    let b = children_with(s, &changed);
    assert_eq!(secrets_checksum_of(&a), None);
    assert_eq!(a.deployment, b.deployment);
}

#[test]
fn secrets_checksum_is_unambiguous_and_ignores_the_order_listed() {
    let refs = |names: &[&str]| names.iter().map(|n| SecretRef::env(*n)).collect::<Vec<_>>();
    let mut v = SecretVersions::new();
    v.insert("a", "u", "1");
    v.insert("b", "u", "1");
    assert_eq!(
        secrets_checksum(&refs(&["a", "b"]), &v),
        secrets_checksum(&refs(&["b", "a"]), &v)
    );
    assert_ne!(
        secrets_checksum(&refs(&["a"]), &v),
        secrets_checksum(&refs(&["a", "b"]), &v)
    );
}

#[test]
fn bad_secret_entries_are_refused_naming_the_field() {
    let mut s = spec();
    s.secrets = vec![
        SecretRef::env("Order_DB"),
        SecretRef {
            name: "order-tls".into(),
            env: false,
            files: false,
        },
        SecretRef::env("order-tls"),
    ];
    let err = render(&ms(s), &cfg(), &SecretVersions::new())
        .unwrap_err()
        .to_string();
    for field in [
        "spec.secrets[0].name",
        "spec.secrets[1]:",
        "spec.secrets[2].name",
    ] {
        assert!(err.contains(field), "{field} not in {err}");
    }
}

#[test]
fn with_a_mesh_identity_the_sidecar_alone_gets_a_token_for_the_identity_service() {
    let mut config = cfg();
    config.mesh = Some(trellis_policy::MeshIdentity {
        trust_domain: "cluster.local".into(),
        trust_bundle: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
        issuer_address: "trellis-identity.trellis-system.svc:8443".into(),
    });
    let c = render(&ms(spec()), &config, &SecretVersions::new()).unwrap();
    let data = c.policy.data.as_ref().unwrap();
    let policy: SidecarPolicy = serde_json::from_str(&data[trellis_policy::POLICY_KEY]).unwrap();
    assert_eq!(policy.identity, config.mesh);

    let volume = pod(&c)
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "identity-token")
        .expect("the identity token volume");
    let projection = &volume.projected.as_ref().unwrap().sources.as_ref().unwrap()[0];
    let token = projection.service_account_token.as_ref().unwrap();
    assert_eq!(token.audience.as_deref(), Some("trellis-identity"));
    let mounted = |c: &Container| {
        c.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == "identity-token" && m.read_only == Some(true))
    };
    assert!(mounted(sidecar(&c)));
    assert!(
        !mounted(app(&c)),
        "the app must not hold the identity token"
    );

    // Callers learn whom the pods must prove to be from the Service.
    let labels = c.service.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["trellis.dev/service-account"], "order");

    // Without a mesh identity: no token, no identity in the policy.
    let plain = children(spec());
    assert!(
        !pod(&plain)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v.name == "identity-token")
    );
    let policy: SidecarPolicy =
        serde_json::from_str(&plain.policy.data.as_ref().unwrap()[trellis_policy::POLICY_KEY])
            .unwrap();
    assert_eq!(policy.identity, None);
}
