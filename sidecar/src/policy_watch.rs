//! The running policy, and the sources that offer new ones.
//!
//! Every source (a file polled on an interval, or the `<name>-sidecar`
//! ConfigMap watched through the API) hands text to [`PolicyStore::offer`].
//! A policy that does not parse or validate is refused: the last good one
//! stays in force, and the refusal is logged, counted
//! (`trellis_policy_reloads_total{result="rejected"}`) and shown on
//! `/healthz` until a good policy arrives. Consumers follow a `watch`
//! channel and pick the new policy up on their next request, so in-flight
//! requests finish under the policy they started with.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;
use trellis_policy::{POLICY_KEY, SidecarPolicy};

use crate::{file_watch::poll_file, metrics::Metrics};

/// The last refusal of a policy.
#[derive(Clone, Debug)]
pub struct Rejection {
    /// Why it was refused, naming the fields at fault.
    pub error: String,
    /// Where it came from.
    pub source: String,
    /// When.
    pub at: SystemTime,
}

/// The policy in force and the history that matters for health.
#[derive(Clone, Debug, Default)]
pub struct PolicyState {
    /// The policy in force; `None` until a valid one arrives.
    pub policy: Option<Arc<SidecarPolicy>>,
    /// How many policies have been applied; 0 means none yet.
    pub generation: u64,
    /// Where the policy in force came from.
    pub source: String,
    /// When it was applied.
    pub applied_at: Option<SystemTime>,
    /// The refusal since the policy in force was applied, if any.
    pub rejected: Option<Rejection>,
}

/// Holds the running policy and publishes changes.
#[derive(Clone, Debug)]
pub struct PolicyStore {
    tx: Arc<watch::Sender<PolicyState>>,
    metrics: Metrics,
}

impl PolicyStore {
    /// A store with no policy yet.
    pub fn new(metrics: Metrics) -> Self {
        Self {
            tx: Arc::new(watch::channel(PolicyState::default()).0),
            metrics,
        }
    }

    /// Follows changes.
    pub fn subscribe(&self) -> watch::Receiver<PolicyState> {
        self.tx.subscribe()
    }

    /// The state now.
    pub fn current(&self) -> PolicyState {
        self.tx.borrow().clone()
    }

    /// Offers a policy's text from `source`. `Ok(true)` when applied,
    /// `Ok(false)` when it equals the policy in force, `Err` when refused.
    pub fn offer(&self, text: &str, source: &str) -> Result<bool, trellis_policy::PolicyError> {
        match SidecarPolicy::from_json(text) {
            Err(e) => {
                tracing::error!(%source, error = %e, "policy refused; keeping the last good policy");
                self.tx.send_modify(|s| {
                    s.rejected = Some(Rejection {
                        error: e.to_string(),
                        source: source.to_owned(),
                        at: SystemTime::now(),
                    });
                });
                self.metrics.record_policy(false, 0);
                Err(e)
            }
            Ok(policy) => {
                let mut applied = false;
                self.tx.send_modify(|s| {
                    // A good policy always clears an earlier refusal: the
                    // source now says something valid.
                    s.rejected = None;
                    if s.policy.as_deref() != Some(&policy) {
                        s.policy = Some(Arc::new(policy));
                        s.generation += 1;
                        s.source = source.to_owned();
                        s.applied_at = Some(SystemTime::now());
                        applied = true;
                    }
                });
                let generation = self.tx.borrow().generation;
                if applied {
                    tracing::info!(%source, generation, "policy applied");
                    self.metrics.record_policy(true, generation);
                }
                Ok(applied)
            }
        }
    }

    /// Records that a source has no policy to offer (a ConfigMap without the
    /// key, or deleted): the last good policy stays.
    pub fn refuse(&self, error: String, source: &str) {
        tracing::error!(%source, %error, "no policy offered; keeping the last good policy");
        self.tx.send_modify(|s| {
            s.rejected = Some(Rejection {
                error,
                source: source.to_owned(),
                at: SystemTime::now(),
            });
        });
        self.metrics.record_policy(false, 0);
    }
}

/// Offers the content of `path` now and after every change.
pub async fn watch_file(
    store: PolicyStore,
    path: PathBuf,
    interval: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let source = format!("file:{}", path.display());
    poll_file(path, interval, shutdown, move |text| {
        let _ = store.offer(&text, &source);
    })
    .await;
}

/// Offers the `policy.json` of ConfigMap `name` in `namespace` now and after
/// every change. The watch is narrowed to the one object by a field selector,
/// because the sidecar's RBAC grants get/list/watch on that name only.
pub async fn watch_configmap(
    store: PolicyStore,
    client: Client,
    namespace: String,
    name: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let at = format!("configmap:{namespace}/{name}");
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = crate::shutdown::signalled(&mut shutdown) => return,
        };
        match event {
            None => return,
            Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                let version = cm.metadata.resource_version.clone().unwrap_or_default();
                let source = format!("{at}@{version}");
                match cm.data.as_ref().and_then(|d| d.get(POLICY_KEY)) {
                    Some(text) => {
                        let _ = store.offer(text, &source);
                    }
                    None => {
                        store.refuse(format!("the ConfigMap has no key {POLICY_KEY:?}"), &source)
                    }
                }
            }
            Some(Ok(watcher::Event::Delete(_))) => {
                store.refuse("the ConfigMap was deleted".into(), &at);
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
            Some(Err(error)) => {
                tracing::warn!(source = %at, %error, "policy watch failed; retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"service":"order","namespace":"shop","appPort":8080}"#;
    const OTHER: &str = r#"{"service":"order","namespace":"shop","appPort":8081}"#;
    const BAD: &str = r#"{"service":"order","namespace":"shop","appPort":8080,"resilience":{"retry":{"attempts":0}}}"#;

    #[test]
    fn keeps_the_last_good_policy_and_reports_the_refusal() {
        let m = Metrics::default();
        let store = PolicyStore::new(m.clone());
        assert!(store.offer(GOOD, "test").unwrap());
        assert!(
            !store.offer(GOOD, "test").unwrap(),
            "the same policy is not a change"
        );
        let err = store.offer(BAD, "test").unwrap_err();
        assert!(
            err.to_string().contains("resilience.retry.attempts"),
            "{err}"
        );
        let s = store.current();
        assert_eq!(s.generation, 1);
        assert_eq!(s.policy.unwrap().app_port, 8080);
        assert!(s.rejected.unwrap().error.contains("attempts"));
        assert!(m.encode().contains("trellis_policy_last_reload_ok 0"));

        assert!(store.offer(OTHER, "test").unwrap());
        let s = store.current();
        assert_eq!((s.generation, s.policy.unwrap().app_port), (2, 8081));
        assert!(s.rejected.is_none());
        assert!(m.encode().contains("trellis_policy_generation 2"));
    }
}
