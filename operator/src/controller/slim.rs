//! What the caches keep of a child, and how a kept child is checked against
//! what is rendered.
//!
//! The watch reduces each object ([`slim`]): anyone else's to its metadata;
//! the operator's own to its metadata, the [`APPLIED_HASH_ANNOTATION`], a
//! fingerprint of its content ([`CONTENT_ANNOTATION`]), and for a Deployment
//! the replicas and status its [`status::Rollout`] is computed from. Whether
//! a kept child still holds everything rendered is then known from memory:
//! the operator records, per child, the content fingerprint known to hold
//! the rendered object of a hash (from the response to its own apply, or
//! from one comparison of the whole object). A child whose fingerprint is
//! not known to hold (after a start, or after someone else changed it) is
//! compared whole once: against the full copy the watch kept of it
//! ([`Unverified`]) until that comparison, else against a live read.

use k8s_openapi::{api::apps::v1::DeploymentSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use super::{apply::holds, *};

/// The annotation on a cached child (never on the object in the cluster:
/// only the watch sets it, on its own copy) holding the
/// [`content_fingerprint`] of the object the watch saw.
pub(super) const CONTENT_ANNOTATION: &str = "trellis.dev/cached-content";

/// A full copy of a child, of its own kind.
pub(super) type FullCopy = Arc<dyn std::any::Any + Send + Sync>;

/// Full copies of the operator's children whose content is not yet known
/// to hold what is rendered, by [`child_key`]: the fingerprint and the
/// object. Each is dropped when compared, or when the child changes again
/// or goes. (A child no reconcile compares, e.g. of a MicroService another
/// operator's `--selector` takes, keeps its copy, as the caches kept every
/// child whole before.)
pub(super) type Unverified = Arc<Mutex<HashMap<String, (u64, FullCopy)>>>;

/// `k` as JSON without its status, resourceVersion and managed fields: what
/// a change of `k` that matters changes.
pub(super) fn without_bookkeeping<K: Serialize>(k: &K) -> serde_json::Value {
    let mut v = serde_json::to_value(k).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
        if let Some(m) = o.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            for volatile in ["resourceVersion", "managedFields"] {
                m.remove(volatile);
            }
        }
    }
    v
}

/// The fingerprint of what a child holds: everything but its status, its
/// resourceVersion and managed fields, and the annotations the Deployment
/// controller writes (`deployment.kubernetes.io/…`).
pub(super) fn content_fingerprint<K: Serialize>(k: &K) -> u64 {
    let mut v = without_bookkeeping(k);
    if let Some(a) = v
        .pointer_mut("/metadata/annotations")
        .and_then(|a| a.as_object_mut())
    {
        a.retain(|k, _| !k.starts_with("deployment.kubernetes.io/"));
        a.remove(CONTENT_ANNOTATION);
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// True when the operator made `meta`'s object, or controls it: it carries
/// the operator's label, a MicroService's controller reference, or a
/// grant's owner labels. (One that lost the label but keeps its owner is
/// still the operator's, and is put back.)
pub(super) fn is_operators(meta: &ObjectMeta) -> bool {
    let labelled = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(render::MANAGED_BY_LABEL))
        .is_some_and(|v| v == FIELD_MANAGER);
    let controlled = meta.owner_references.iter().flatten().any(|o| {
        o.controller == Some(true)
            && o.kind == MicroService::kind(&())
            && o.api_version == MicroService::api_version(&())
    });
    labelled || controlled || grants::owner(meta).is_some()
}

/// Reduces an object as the watch caches it (see the module's doc). A full
/// copy of one of the operator's children goes to `unverified` unless
/// `applied` already knows its content holds its applied hash.
pub(super) fn slim<K: ChildKind>(
    k: &mut K,
    applied: &Mutex<HashMap<String, Applied>>,
    unverified: &Mutex<HashMap<String, (u64, FullCopy)>>,
) {
    k.meta_mut().managed_fields = None;
    if !is_operators(k.meta()) {
        // A collision check reads the name, labels and owners only.
        k.clear_body();
        let m = k.meta_mut();
        m.annotations = None;
        m.finalizers = None;
        return;
    }
    let key = child_key(k);
    let fp = content_fingerprint(k);
    let hash = k.annotations().get(APPLIED_HASH_ANNOTATION).cloned();
    let known = hash.as_ref().is_some_and(|h| {
        applied
            .lock()
            .expect("not poisoned")
            .get(&key)
            .is_some_and(|a| a.holds(h, fp))
    });
    {
        let mut unverified = unverified.lock().expect("not poisoned");
        if known {
            unverified.remove(&key);
        } else {
            unverified.insert(key, (fp, Arc::new(k.clone())));
        }
    }
    let rollout = (k as &mut dyn std::any::Any)
        .downcast_mut::<Deployment>()
        .map(|d| (d.spec.as_ref().and_then(|s| s.replicas), d.status.take()));
    k.clear_body();
    if let Some((replicas, status)) = rollout
        && let Some(d) = (k as &mut dyn std::any::Any).downcast_mut::<Deployment>()
    {
        d.spec = Some(DeploymentSpec {
            replicas,
            ..DeploymentSpec::default()
        });
        d.status = status;
    }
    let mut annotations = std::collections::BTreeMap::new();
    if let Some(h) = hash {
        annotations.insert(APPLIED_HASH_ANNOTATION.to_owned(), h);
    }
    annotations.insert(CONTENT_ANNOTATION.to_owned(), fp.to_string());
    k.meta_mut().annotations = Some(annotations);
}

/// Whether the cached `current` holds every field of the rendered `want`
/// (which carries `hash`): from what is recorded, else by comparing the
/// whole object once (the watch's full copy, else a live read) and
/// recording the answer.
pub(super) async fn verify<K: ChildKind>(
    ctx: &Context,
    want: &K,
    hash: &str,
    current: &K,
) -> Result<bool, Error> {
    let want = serde_json::to_value(want).unwrap_or_default();
    let Some(fp) = current
        .annotations()
        .get(CONTENT_ANNOTATION)
        .and_then(|v| v.parse::<u64>().ok())
    else {
        // Not reduced by a watch: the whole object is at hand.
        return Ok(holds(
            &want,
            &serde_json::to_value(current).unwrap_or_default(),
        ));
    };
    let key = child_key(current);
    let copy = ctx
        .caches
        .unverified
        .lock()
        .expect("not poisoned")
        .remove(&key);
    if ctx
        .applied
        .lock()
        .expect("not poisoned")
        .get(&key)
        .is_some_and(|a| a.holds(hash, fp))
    {
        return Ok(true);
    }
    let copy = copy
        .filter(|(f, _)| *f == fp)
        .and_then(|(f, c)| Some((f, serde_json::to_value(c.downcast_ref::<K>()?).ok()?)));
    let (fp, whole) = match copy {
        Some(copy) => copy,
        None => {
            let ns = current.namespace().unwrap_or_default();
            let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
            match api.get_opt(&current.name_any()).await? {
                Some(live) => (
                    content_fingerprint(&live),
                    serde_json::to_value(&live).unwrap_or_default(),
                ),
                // Gone since the watch saw it: its deletion brings the
                // MicroService back.
                None => return Ok(false),
            }
        }
    };
    let same = holds(&want, &whole);
    if same {
        ctx.applied
            .lock()
            .expect("not poisoned")
            .entry(key)
            .or_insert_with(|| Applied::verified(hash))
            .verified_as(hash, fp);
    }
    Ok(same)
}
