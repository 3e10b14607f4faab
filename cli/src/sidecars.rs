//! The sidecars of a MicroService, and their admin endpoints read through
//! the apiserver's pod proxy (`pods/<pod>:15020/proxy/...`), so the CLI
//! needs no route to the pods and no port-forward.

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};
use trellis_operator::render::{ADMIN_PORT, selector_labels};

/// The running pods of MicroService `name` in `namespace`.
pub async fn pods(client: &Client, namespace: &str, name: &str) -> anyhow::Result<Vec<Pod>> {
    let selector = selector_labels(name)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .with_context(|| format!("listing the pods of {namespace}/{name}"))?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .collect())
}

/// `path` (`/status`, `/metrics`) of the sidecar admin server in `pod`.
pub async fn admin_get(client: &Client, pod: &Pod, path: &str) -> anyhow::Result<String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let uri = format!("/api/v1/namespaces/{namespace}/pods/{name}:{ADMIN_PORT}/proxy{path}");
    let req = http::Request::get(&uri).body(Vec::new())?;
    match client.request_text(req).await {
        Ok(text) => Ok(text),
        Err(kube::Error::Api(e)) if e.code == 403 => bail!(
            "not allowed to read {path} of pod {namespace}/{name} through the apiserver: \
             your account needs `get` on `pods/proxy` in {namespace}"
        ),
        Err(e) => Err(e).with_context(|| format!("reading {path} of pod {namespace}/{name}")),
    }
}
