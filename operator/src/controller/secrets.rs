//! The Secrets MicroServices list (`spec.secrets`), as the controller sees
//! them: metadata only. The watch asks the apiserver for
//! `PartialObjectMetadata`, so a Secret's `data` never reaches the operator;
//! what little of the metadata is kept (name, namespace, uid,
//! resourceVersion) is enough to tell that a Secret exists and that it
//! changed. Annotations are dropped as they arrive: `kubectl apply` (client
//! side) copies a whole Secret, values included, into
//! `kubectl.kubernetes.io/last-applied-configuration`.

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::core::PartialObjectMeta;

use super::*;
use crate::{render::SecretVersions, validate};

/// A Secret as the operator holds it: its metadata, and of that only what
/// [`strip`] keeps.
pub(crate) type SecretMeta = PartialObjectMeta<Secret>;

/// Keeps the name, namespace, uid and resourceVersion of a Secret's metadata
/// and drops the rest (labels, annotations, managed fields), before the
/// cache stores it or anything could log it.
pub(super) fn strip(secret: &mut SecretMeta) {
    let m = std::mem::take(&mut secret.metadata);
    secret.metadata = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        ..ObjectMeta::default()
    };
}

/// The watch of Secrets' metadata in the watched namespace(s): the cache
/// [`versions`] reads, and the stream of changed or deleted Secrets that
/// [`referencing`] maps to the MicroServices listing them.
pub(super) fn secret_watch(
    client: &Client,
    ns: Option<&str>,
) -> (
    Store<SecretMeta>,
    impl Stream<Item = Result<SecretMeta, watcher::Error>> + Send + 'static,
) {
    let (store, writer) = reflector::store::<SecretMeta>();
    let trigger = watcher(
        scoped::<SecretMeta>(client, ns),
        watcher::Config::default().any_semantic(),
    )
    .modify(strip)
    .backoff(WatchBackoff::default())
    .reflect(writer)
    .touched_objects();
    (store, trigger)
}

/// The MicroServices (in `microservices`, the controller's cache) that list
/// `secret`: in its namespace, by its name. Any other Secret, such as a
/// ServiceAccount's or a Helm release's, wakes nothing.
pub(super) fn referencing(
    microservices: &Store<MicroService>,
    secret: &SecretMeta,
) -> Vec<ObjectRef<MicroService>> {
    let (Some(name), Some(ns)) = (&secret.metadata.name, &secret.metadata.namespace) else {
        return Vec::new();
    };
    microservices
        .state()
        .iter()
        .filter(|ms| ms.metadata.namespace.as_ref() == Some(ns))
        .filter(|ms| ms.spec.secrets.iter().any(|r| &r.name == name))
        .map(|ms| ObjectRef::from_obj(ms.as_ref()))
        .collect()
}

/// The versions of the Secrets `ms` lists: from the watch's cache, or, for
/// one the cache lacks (the watch has not listed yet, or it does not exist),
/// from a metadata-only read. A name that is not a Secret name is not read;
/// rendering refuses it.
pub(super) async fn versions(ms: &MicroService, ctx: &Context) -> Result<SecretVersions, Error> {
    let ns = ms.namespace().unwrap_or_default();
    let mut versions = SecretVersions::new();
    for r in &ms.spec.secrets {
        if !validate::is_dns_1123_subdomain(&r.name) {
            continue;
        }
        let cached = ctx
            .caches
            .secrets
            .get(&ObjectRef::new(&r.name).within(&ns))
            .map(|s| s.metadata.clone());
        let meta = match cached {
            Some(m) => Some(m),
            None => {
                let api: Api<SecretMeta> = Api::namespaced(ctx.client.clone(), &ns);
                api.get_opt(&r.name).await?.map(|mut s| {
                    strip(&mut s);
                    s.metadata
                })
            }
        };
        if let Some(m) = meta {
            versions.insert(
                r.name.clone(),
                m.uid.as_deref().unwrap_or_default(),
                m.resource_version.as_deref().unwrap_or_default(),
            );
        }
    }
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn secret(ns: &str, name: &str) -> SecretMeta {
        serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": "u-1",
                "resourceVersion": "7",
                "labels": { "team": "shop" },
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration":
                        "{\"stringData\":{\"PASSWORD\":\"hunter2\"}}",
                },
                "managedFields": [{ "manager": "kubectl", "operation": "Update" }],
            },
        }))
        .unwrap()
    }

    #[test]
    fn strip_keeps_what_tells_a_change_and_drops_the_rest() {
        let mut s = secret("shop", "order-db");
        strip(&mut s);
        let m = &s.metadata;
        assert_eq!(
            (
                m.name.as_deref(),
                m.namespace.as_deref(),
                m.uid.as_deref(),
                m.resource_version.as_deref()
            ),
            (Some("order-db"), Some("shop"), Some("u-1"), Some("7"))
        );
        assert_eq!(m.annotations, None);
        assert_eq!(m.labels, None);
        assert_eq!(m.managed_fields, None);
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    fn microservice(ns: &str, name: &str, secrets: &[&str]) -> MicroService {
        serde_json::from_value(json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "MicroService",
            "metadata": { "name": name, "namespace": ns },
            "spec": {
                "image": "order:1",
                "port": 8080,
                "secrets": secrets.iter().map(|s| json!({ "name": s })).collect::<Vec<_>>(),
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_secret_wakes_the_microservices_of_its_namespace_that_list_it() {
        let (store, mut writer) = reflector::store::<MicroService>();
        for ms in [
            microservice("shop", "order", &["order-db", "shared"]),
            microservice("shop", "user", &["user-db", "shared"]),
            microservice("shop", "product", &[]),
            microservice("other", "order", &["order-db"]),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(ms));
        }
        let woken = |ns, name| {
            let mut refs: Vec<String> = referencing(&store, &secret(ns, name))
                .iter()
                .map(|r| format!("{}/{}", r.namespace.as_deref().unwrap(), r.name))
                .collect();
            refs.sort();
            refs
        };
        assert_eq!(woken("shop", "order-db"), ["shop/order"]);
        assert_eq!(woken("shop", "shared"), ["shop/order", "shop/user"]);
        assert_eq!(woken("other", "order-db"), ["other/order"]);
        assert!(woken("shop", "default-token-abc").is_empty());
        assert!(woken("nowhere", "order-db").is_empty());
    }
}
