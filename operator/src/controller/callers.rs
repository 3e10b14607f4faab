//! Whether a MicroService's authorization rules can do what they say.
//!
//! A rule naming a MicroService that does not exist (a typo, a caller not yet
//! deployed, the wrong namespace) refuses calls its author meant to allow;
//! rules in a mesh without identity are not applied at all. Both are
//! misconfigurations the sidecar cannot tell from a real refusal, so the
//! operator reports them in the `AuthorizationResolved` condition and a
//! Warning Event.

use kube::{
    ResourceExt,
    runtime::reflector::{ObjectRef, Store},
};
use trellis_policy::AuthorizationMode;

use super::Settings;
use crate::{crd::MicroService, status::AuthorizationCheck};

/// The check of `ms`'s rules; `None` when it has none. `known` holds the
/// MicroServices the operator watches; `mesh` is whether sidecars have a mesh
/// identity. A rule is checked only where the operator sees every MicroService
/// that could match it: not under a label selector, and not in another
/// namespace than the one a namespaced operator watches.
pub(super) fn check(
    ms: &MicroService,
    known: &Store<MicroService>,
    settings: &Settings,
    mesh: bool,
) -> Option<AuthorizationCheck> {
    let authorization = ms.spec.inbound.as_ref()?.authorization.as_ref()?;
    if !mesh {
        return Some(AuthorizationCheck {
            resolved: false,
            reason: "NoMeshIdentity",
            message: "the mesh identity is off (the chart's identity.enabled), so sidecars cannot \
                      tell callers apart: these rules are not applied and every caller is served"
                .into(),
        });
    }
    let own = ms.namespace().unwrap_or_default();
    let unknown: Vec<String> = authorization
        .allow
        .iter()
        .filter_map(|rule| {
            let name = rule.micro_service.as_deref()?;
            let ns = rule.namespace.as_deref().unwrap_or(&own);
            let visible = settings.selector.is_none()
                && settings
                    .namespace
                    .as_deref()
                    .is_none_or(|watched| watched == ns);
            let missing = visible && known.get(&ObjectRef::new(name).within(ns)).is_none();
            missing.then(|| format!("{name:?} in {ns}"))
        })
        .collect();
    if unknown.is_empty() {
        return Some(AuthorizationCheck {
            resolved: true,
            reason: "CallersFound",
            message: "every MicroService the rules allow exists".into(),
        });
    }
    let refused = match authorization.mode {
        AuthorizationMode::Enforce => "are refused",
        AuthorizationMode::Audit => "would be refused",
    };
    let message = format!(
        "the rules allow MicroService {}, which does not exist: its calls {refused} until it is \
         created or the rule is fixed",
        unknown.join(", ")
    );
    Some(AuthorizationCheck {
        resolved: false,
        reason: "UnknownCaller",
        message: crate::status::fit("", &message, ""),
    })
}

#[cfg(test)]
mod tests {
    use kube::runtime::{reflector, watcher};
    use serde_json::json;

    use super::*;

    fn microservice(name: &str, ns: &str, inbound: serde_json::Value) -> MicroService {
        serde_json::from_value(json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "MicroService",
            "metadata": { "name": name, "namespace": ns },
            "spec": { "image": "x:1", "port": 8080, "inbound": inbound },
        }))
        .unwrap()
    }

    fn user(allow: serde_json::Value, mode: &str) -> MicroService {
        microservice(
            "user",
            "shop",
            json!({ "authorization": { "mode": mode, "allow": allow } }),
        )
    }

    fn known(all: &[MicroService]) -> Store<MicroService> {
        let (store, mut writer) = reflector::store();
        for ms in all {
            writer.apply_watcher_event(&watcher::Event::Apply(ms.clone()));
        }
        store
    }

    #[test]
    fn no_rules_nothing_to_report() {
        let ms = microservice("user", "shop", json!({ "mtls": "Strict" }));
        assert!(check(&ms, &known(&[]), &Settings::default(), true).is_none());
    }

    #[test]
    fn rules_naming_existing_callers_are_resolved() {
        let ms = user(
            json!([{ "microService": "order" }, { "microService": "audit", "namespace": "ops" },
                   { "serviceAccount": "cron" }]),
            "Enforce",
        );
        let all = [
            ms.clone(),
            microservice("order", "shop", json!({})),
            microservice("audit", "ops", json!({})),
        ];
        let c = check(&ms, &known(&all), &Settings::default(), true).unwrap();
        assert!(c.resolved, "{c:?}");
        assert_eq!(c.reason, "CallersFound");
    }

    #[test]
    fn a_rule_naming_a_missing_microservice_is_reported_by_name_and_namespace() {
        let ms = user(
            json!([{ "microService": "ordr" }, { "microService": "audit", "namespace": "ops" }]),
            "Enforce",
        );
        let all = [ms.clone(), microservice("audit", "shop", json!({}))];
        let c = check(&ms, &known(&all), &Settings::default(), true).unwrap();
        assert!(!c.resolved);
        assert_eq!(c.reason, "UnknownCaller");
        assert!(
            c.message
                .starts_with("the rules allow MicroService \"ordr\" in shop, \"audit\" in ops"),
            "{}",
            c.message
        );
        assert!(c.message.contains("are refused"), "{}", c.message);
        let audit = user(json!([{ "microService": "ordr" }]), "Audit");
        let c = check(&audit, &known(&[]), &Settings::default(), true).unwrap();
        assert!(c.message.contains("would be refused"), "{}", c.message);
    }

    #[test]
    fn what_the_operator_cannot_see_is_not_reported() {
        let ms = user(
            json!([{ "microService": "audit", "namespace": "ops" }]),
            "Enforce",
        );
        let namespaced = Settings {
            namespace: Some("shop".into()),
            ..Settings::default()
        };
        assert!(check(&ms, &known(&[]), &namespaced, true).unwrap().resolved);
        let selected = Settings {
            selector: Some("team=a".into()),
            ..Settings::default()
        };
        let local = user(json!([{ "microService": "order" }]), "Enforce");
        assert!(
            check(&local, &known(&[]), &selected, true)
                .unwrap()
                .resolved
        );
    }

    #[test]
    fn rules_without_a_mesh_identity_are_reported_as_not_applied() {
        let ms = user(json!([{ "microService": "order" }]), "Enforce");
        let c = check(&ms, &known(&[]), &Settings::default(), false).unwrap();
        assert!(!c.resolved);
        assert_eq!(c.reason, "NoMeshIdentity");
        assert!(
            c.message.contains("every caller is served"),
            "{}",
            c.message
        );
    }
}
