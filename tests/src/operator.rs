//! The operator for integration tests: the CRDs installed from the committed
//! YAML (so the file CI checks is the file tested) and the controller running
//! in-process, watching one test namespace.

use std::{sync::Arc, time::Duration};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use tokio::{sync::oneshot, task::JoinHandle};
use trellis_operator::{
    MicroService, Settings, gateway::edge_policy::EdgePolicy, metrics::Metrics,
    render::RenderConfig,
};

use crate::{TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// Installs the MicroService CRD from the committed YAML (so the file CI
/// checks is the file tested) and waits until the apiserver serves it.
pub async fn install_crd(client: &Client) {
    install::<MicroService>(client, "crds/microservice.yaml").await;
}

/// Installs the EdgePolicy CRD the same way.
pub async fn install_edge_policy_crd(client: &Client) {
    install::<EdgePolicy>(client, "crds/edgepolicy.yaml").await;
}

/// Applies the CRD in `file` (relative to the workspace) and waits until
/// it is Established and `K` can be listed.
async fn install<K>(client: &Client, file: &str)
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let path = crate::shop::workspace().join(file);
    let yaml = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{file}: {e}"));
    let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml).expect("a CRD");
    let name = crd.metadata.name.clone().expect("a CRD's name");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        &name,
        &PatchParams::apply("trellis-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("installing the CRD");
    eventually("the CRD to be established", WAIT, || {
        let (crds, name) = (crds.clone(), name.clone());
        async move {
            let crd = crds.get(&name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await;
    // The discovery cache of a fresh apiserver lags a little behind Established.
    let probe: Api<K> = Api::all(client.clone());
    eventually("the CRD's kind to be served", WAIT, || {
        let probe = probe.clone();
        async move {
            probe
                .list(&ListParams::default().limit(1))
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}

/// The controller, running in this process for one namespace; stopped on drop.
pub struct Operator {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Operator {
    /// Installs the CRD and starts the controller for `ns`, rendering `sidecar_image`.
    pub async fn start(ns: &TestNamespace, sidecar_image: &str) -> Self {
        Self::start_with(
            ns,
            RenderConfig {
                sidecar_image: sidecar_image.into(),
                cluster_domain: "cluster.local".into(),
                otlp_endpoint: None,
                mesh: None,
            },
        )
        .await
    }

    /// Installs the CRD and starts the controller for `ns` with `render`.
    pub async fn start_with(ns: &TestNamespace, render: RenderConfig) -> Self {
        let settings = Settings {
            render,
            namespace: Some(ns.name.clone()),
            instance: Some("itest".into()),
            ..Settings::default()
        };
        Self::start_settings(&ns.client, settings).await
    }

    /// Installs the CRD and starts the controller with `settings`. An
    /// operator for all namespaces (`namespace: None`) shares the cluster with
    /// every other test: give it a `selector` that only this test's
    /// MicroServices match.
    pub async fn start_settings(client: &Client, settings: Settings) -> Self {
        install_crd(client).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(trellis_operator::run(
            client.clone(),
            settings,
            Arc::new(Metrics::default()),
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            stop: Some(stop),
            task,
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}
