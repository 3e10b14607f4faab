//! What a burst of MicroServices should converge to, for the operator's
//! fault tests (tests/tests/control_plane_faults.rs,
//! tests/tests/operator_watch.rs): every one Ready at its generation, each
//! child exactly once with the right controller and the last config,
//! nothing else labelled as the operator's.
//!
//! The MicroServices have `replicas: 0` and their namespace a ResourceQuota
//! of zero pods, so hundreds of them put no pods on the shared node.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, ResourceQuota, Service, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
};
use kube::{
    Resource, ResourceExt,
    api::{ListParams, PostParams},
};
use serde::de::DeserializeOwned;
use serde_json::json;
use trellis_operator::{MicroService, render};

use crate::{TestNamespace, operator::install_crd};

/// A namespace with the CRD installed and room for no pods at all.
pub async fn namespace(prefix: &str) -> TestNamespace {
    let ns = TestNamespace::new(prefix).await;
    install_crd(&ns.client).await;
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": { "name": "no-pods" },
        "spec": { "hard": { "pods": "0" } },
    }))
    .unwrap();
    ns.api::<ResourceQuota>()
        .create(&PostParams::default(), &quota)
        .await
        .unwrap();
    ns
}

/// A MicroService with no pods whose config is `VERSION=version`.
pub fn microservice(name: &str, version: &str) -> MicroService {
    serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "MicroService",
        "metadata": { "name": name },
        "spec": {
            "image": "trellis/smoke:0.1.0",
            "port": 8080,
            "replicas": 0,
            "config": { "VERSION": version },
        },
    }))
    .unwrap()
}

/// The children of one kind carrying the operator's label: name → controller owner uids.
pub async fn children<K>(ns: &TestNamespace) -> Result<BTreeMap<String, (Vec<String>, K)>, String>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let list = ns
        .api::<K>()
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=trellis-operator"))
        .await
        .map_err(|e| format!("listing {}: {e}", K::kind(&())))?;
    Ok(list
        .items
        .into_iter()
        .map(|k| {
            let owners = k
                .owner_references()
                .iter()
                .filter(|o| o.controller == Some(true))
                .map(|o| o.uid.clone())
                .collect();
            (k.name_any(), (owners, k))
        })
        .collect())
}

/// Checks one kind: exactly the expected names, each controlled by exactly its
/// MicroService (no duplicates, no orphans).
pub fn exactly<K>(
    kind: &str,
    have: &BTreeMap<String, (Vec<String>, K)>,
    want: &BTreeMap<String, String>,
) -> Result<(), String> {
    let have_names: BTreeSet<&String> = have.keys().collect();
    let want_names: BTreeSet<&String> = want.keys().collect();
    if have_names != want_names {
        let missing: Vec<_> = want_names.difference(&have_names).take(5).collect();
        let extra: Vec<_> = have_names.difference(&want_names).take(5).collect();
        return Err(format!(
            "{kind}: {} of {} (missing e.g. {missing:?}, unexpected {extra:?})",
            have.len(),
            want.len()
        ));
    }
    for (name, (owners, _)) in have {
        if owners != &vec![want[name].clone()] {
            return Err(format!(
                "{kind} {name}: controller owners {owners:?}, want [{}]",
                want[name]
            ));
        }
    }
    Ok(())
}

/// Whether every MicroService in `want` (name → config VERSION) has converged:
/// Ready at its current generation, every child present exactly once with the
/// right owner and the current config, nothing else labelled as ours.
pub async fn converged(ns: &TestNamespace, want: &BTreeMap<String, String>) -> Result<(), String> {
    let all = ns
        .api::<MicroService>()
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    let uids: BTreeMap<String, String> = all
        .items
        .iter()
        .map(|m| (m.name_any(), m.uid().unwrap_or_default()))
        .collect();
    if uids.keys().collect::<BTreeSet<_>>() != want.keys().collect() {
        return Err(format!("{} MicroServices, want {}", uids.len(), want.len()));
    }
    let not_ready: Vec<String> = all
        .items
        .iter()
        .filter(|m| {
            let st = m.status.as_ref();
            st.and_then(|s| s.observed_generation) != m.metadata.generation
                || !st.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
        })
        .map(|m| m.name_any())
        .collect();
    if !not_ready.is_empty() {
        return Err(format!(
            "{} MicroServices not Ready at their generation, e.g. {:?}",
            not_ready.len(),
            &not_ready[..not_ready.len().min(5)]
        ));
    }

    let by = |suffix: &str| -> BTreeMap<String, String> {
        uids.iter()
            .map(|(n, uid)| (format!("{n}{suffix}"), uid.clone()))
            .collect()
    };
    let mut config_maps = by("-config");
    config_maps.extend(by("-sidecar"));
    let cms = children::<ConfigMap>(ns).await?;
    exactly("ConfigMap", &cms, &config_maps)?;
    exactly(
        "ServiceAccount",
        &children::<ServiceAccount>(ns).await?,
        &by(""),
    )?;
    exactly("Role", &children::<Role>(ns).await?, &by("-sidecar"))?;
    exactly(
        "RoleBinding",
        &children::<RoleBinding>(ns).await?,
        &by("-sidecar"),
    )?;
    exactly("Service", &children::<Service>(ns).await?, &by(""))?;
    let deployments = children::<Deployment>(ns).await?;
    exactly("Deployment", &deployments, &by(""))?;

    // The last write of each MicroService reached its children.
    for (name, version) in want {
        let cm = &cms[&format!("{name}-config")].1;
        let have = cm.data.as_ref().and_then(|d| d.get("VERSION"));
        if have != Some(version) {
            return Err(format!(
                "ConfigMap {name}-config has VERSION {have:?}, want {version}"
            ));
        }
        let config = BTreeMap::from([("VERSION".to_owned(), version.clone())]);
        let checksum = render::config_checksum(&config);
        let d = &deployments[name].1;
        let have = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(render::CONFIG_CHECKSUM_ANNOTATION));
        if have != Some(&checksum) {
            return Err(format!(
                "Deployment {name} has checksum {have:?}, want {checksum}"
            ));
        }
    }
    Ok(())
}

/// Waits until [`converged`], for at most `limit`; the time it took. On
/// time-out, panics saying what has not converged.
pub async fn wait_converged(
    ns: &TestNamespace,
    want: &BTreeMap<String, String>,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < limit {
        match converged(ns, want).await {
            Ok(()) => return started.elapsed(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("not converged after {limit:?}: {last}");
}
