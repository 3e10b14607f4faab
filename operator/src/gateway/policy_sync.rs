//! EdgePolicies at run time: the watch, the key sets' reads and the
//! status writes. The reasoning is [`super::policy_model`]'s.
//!
//! **Least privilege, as for TLS Secrets.** The Secrets and ConfigMaps
//! holding key sets are watched for metadata only (no data crosses the
//! watch), and a change wakes the controller only when an EdgePolicy
//! names the object; the controller then GETs the objects policies name,
//! and only those. The operator's role already holds `get`, `list` and
//! `watch` on both kinds (for MicroServices), so EdgePolicies need no new
//! grant on them.
//!
//! **No window without policies.** At start the controller waits for the
//! first full list of EdgePolicies before it computes anything, so a
//! restarted operator never writes a gateway configuration without the
//! token checks its policies require. When the CRD is not installed, it
//! looks again every 30 seconds and applies policies from then on.

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock},
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::Notify;
use trellis_policy::gateway::JwtRule;

use super::{
    edge_policy::{EdgePolicy, EdgePolicyStatus},
    model::Key,
    policy_model::{EdgeInputs, EdgeOutcome, JwksAt, key_set_refs},
    same_conditions, with_times,
};

/// The EdgePolicy cache, once the CRD is found.
#[derive(Clone, Default)]
pub struct PolicyStore(Arc<OnceLock<reflector::Store<EdgePolicy>>>);

impl PolicyStore {
    /// Every EdgePolicy, once the first list is in; none while the CRD is
    /// not installed.
    async fn policies(&self) -> Vec<Arc<EdgePolicy>> {
        match self.0.get() {
            None => vec![],
            Some(store) => {
                // Only fails when the reflector is gone, which never happens
                // while the controller runs.
                let _ = store.wait_until_ready().await;
                store.state()
            }
        }
    }

    /// The policy `key`, as cached.
    fn get(&self, key: &Key) -> Option<Arc<EdgePolicy>> {
        self.0
            .get()?
            .get(&reflector::ObjectRef::new(&key.1).within(&key.0))
    }
}

/// Whether the EdgePolicy CRD is installed. Only the apiserver's 404 says
/// it is not; any other failure is retried until there is an answer,
/// since taking it for "no policies" would write gateway configurations
/// without the checks policies require (the gateways keep serving what was
/// last written meanwhile).
async fn installed(api: &Api<EdgePolicy>) -> bool {
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return true,
            Err(kube::Error::Api(e)) if e.code == 404 => return false,
            Err(error) => {
                tracing::warn!(%error, "cannot list EdgePolicies; the gateway controller waits for them");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Starts the EdgePolicy watch (now, or once the CRD is installed) and the
/// metadata watches of Secrets and ConfigMaps, in `namespace` when the
/// operator watches one and everywhere otherwise, pushing their tasks onto
/// `tasks`. Every event that matters wakes `changed`.
pub async fn watch(
    client: &Client,
    namespace: Option<&str>,
    changed: Arc<Notify>,
    tasks: &mut Vec<BoxFuture<'static, ()>>,
) -> PolicyStore {
    let store = PolicyStore::default();
    let api: Api<EdgePolicy> = super::scoped(client, namespace);
    let found = installed(&api).await;
    if !found {
        tracing::info!(
            "the EdgePolicy CRD is not installed (crds/edgepolicy.yaml); gateways serve without policies until it is"
        );
    }
    if found {
        let (reader, task) = super::follow(api, watcher::Config::default(), changed.clone());
        let _ = store.0.set(reader);
        tasks.push(task);
    } else {
        let (store, changed) = (store.clone(), changed.clone());
        tasks.push(Box::pin(async move {
            while !installed(&api).await {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            tracing::info!("the EdgePolicy CRD is installed: EdgePolicies apply from now on");
            let (reader, task) = super::follow(api, watcher::Config::default(), changed);
            let _ = store.0.set(reader);
            task.await;
        }));
    }
    tasks.push(named_objects::<Secret>(
        client,
        namespace,
        "Secret",
        store.clone(),
        changed.clone(),
    ));
    tasks.push(named_objects::<ConfigMap>(
        client,
        namespace,
        "ConfigMap",
        store.clone(),
        changed,
    ));
    store
}

/// A metadata-only watch of every `K` (in `namespace`, or everywhere) that
/// wakes `changed` when an EdgePolicy names the object changed.
fn named_objects<K>(
    client: &Client,
    namespace: Option<&str>,
    kind: &'static str,
    policies: PolicyStore,
    changed: Arc<Notify>,
) -> BoxFuture<'static, ()>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    K: Clone + std::fmt::Debug + Send + Sync + serde::de::DeserializeOwned + 'static,
{
    let api: Api<PartialObjectMeta<K>> = super::scoped(client, namespace);
    Box::pin(
        watcher(api, watcher::Config::default())
            .default_backoff()
            .for_each(move |event| {
                let named = |o: &PartialObjectMeta<K>| {
                    let Some(store) = policies.0.get() else {
                        return false;
                    };
                    let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
                    key_set_refs(&store.state())
                        .iter()
                        .any(|r| r.kind == kind && r.namespace == ns && r.name == name)
                };
                match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) if named(&o) => {
                        changed.notify_one();
                    }
                    Ok(watcher::Event::InitDone) => changed.notify_one(),
                    Err(error) => {
                        tracing::warn!(%kind, %error, "gateway controller watch failed; retrying");
                    }
                    _ => {}
                }
                async {}
            }),
    )
}

/// What the model needs of EdgePolicies now: the policies, the key sets
/// they name (read by GET, only those), and the checks last in force.
pub async fn inputs(
    client: &Client,
    store: &PolicyStore,
    last_good: &BTreeMap<Key, JwtRule>,
) -> Result<EdgeInputs, kube::Error> {
    let policies = store.policies().await;
    let mut key_sets = BTreeMap::new();
    for at in key_set_refs(&policies) {
        let text = read(client, &at).await?;
        key_sets.insert(at, text);
    }
    Ok(EdgeInputs {
        policies,
        key_sets,
        last_good: last_good.clone(),
    })
}

/// The text under `at`, or why there is none. An error other than "not
/// found" is the controller's to retry, not the policy's fault.
async fn read(client: &Client, at: &JwksAt) -> Result<Result<String, String>, kube::Error> {
    let what = format!("{} {}/{}", at.kind, at.namespace, at.name);
    let value: Option<Vec<u8>> = if at.kind == "Secret" {
        let api: Api<Secret> = Api::namespaced(client.clone(), &at.namespace);
        let Some(s) = api.get_opt(&at.name).await? else {
            return Ok(Err(format!("{what} does not exist")));
        };
        s.data.and_then(|mut d| d.remove(&at.key)).map(|b| b.0)
    } else {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &at.namespace);
        let Some(c) = api.get_opt(&at.name).await? else {
            return Ok(Err(format!("{what} does not exist")));
        };
        c.data
            .and_then(|mut d| d.remove(&at.key))
            .map(String::into_bytes)
            .or_else(|| {
                c.binary_data
                    .and_then(|mut d| d.remove(&at.key))
                    .map(|b| b.0)
            })
    };
    Ok(match value {
        None => Err(format!("{what} has no key {:?}", at.key)),
        Some(bytes) => String::from_utf8(bytes)
            .map_err(|_| format!("{what} key {:?} is not UTF-8 text", at.key)),
    })
}

/// Writes each policy's status where this controller's entries changed,
/// keeping other controllers' entries.
pub async fn write_status(
    client: &Client,
    store: &PolicyStore,
    outcome: &EdgeOutcome,
    controller: &str,
) -> Result<(), kube::Error> {
    for p in &outcome.policies {
        let Some(current) = store.get(&p.key) else {
            continue;
        };
        let old = current.status.clone().unwrap_or_default();
        let (old_ours, others): (Vec<_>, Vec<_>) = old
            .ancestors
            .into_iter()
            .partition(|a| a.controller_name == controller);
        let want = &p.status.ancestors;
        let unchanged = old_ours.len() == want.len()
            && want.iter().zip(&old_ours).all(|(w, o)| {
                w.ancestor_ref == o.ancestor_ref && same_conditions(&w.conditions, &o.conditions)
            });
        if unchanged {
            continue;
        }
        let mut ancestors = others;
        for w in want {
            let mut w = w.clone();
            let before = old_ours
                .iter()
                .find(|o| o.ancestor_ref == w.ancestor_ref)
                .map(|o| o.conditions.clone())
                .unwrap_or_default();
            with_times(&mut w.conditions, &before);
            ancestors.push(w);
        }
        ancestors.truncate(16);
        let status = EdgePolicyStatus { ancestors };
        let api: Api<EdgePolicy> = Api::namespaced(client.clone(), &p.key.0);
        api.patch_status(
            &p.key.1,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await?;
    }
    Ok(())
}
