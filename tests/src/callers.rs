//! Callers inside the cluster, for what only a caller there can show: a
//! request leaving a meshed pod through its own sidecar (so with that pod's
//! identity), and a plaintext client in a pod outside the mesh.
//!
//! Both run `trellis-smoke get|post` (tests/src/bin/trellis-smoke.rs) from the
//! `trellis/smoke` image, as the restricted Pod Security level requires.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt, api::PostParams};
use serde_json::json;

use crate::{kubectl, shop::run};

/// The image both kinds of caller run.
pub const IMAGE: &str = "trellis/smoke:0.1.0";
const BINARY: &str = "/usr/local/bin/trellis-smoke";

/// What a caller's command did: its exit code and what it printed.
#[derive(Debug)]
pub struct Called {
    /// 0 when the answer was a success (200 for GET, 2xx for POST).
    pub exit_code: i32,
    /// Its output: the body on success, else `<url> answered <status>: <body>`.
    pub output: String,
}

impl Called {
    /// Whether the answer had `status`.
    pub fn answered(&self, status: u16) -> bool {
        match status {
            200..=299 => self.exit_code == 0,
            _ => self.output.contains(&format!("answered {status}:")),
        }
    }
}

/// Runs `trellis-smoke <args>` in a new ephemeral container of `pod`
/// (`kubectl debug`), so it shares the pod's network: with `HTTP_PROXY` set
/// to the app's, its requests leave through the pod's sidecar, carrying the
/// pod's mesh identity. `name` must be new in the pod.
pub async fn from_inside(
    client: &Client,
    namespace: &str,
    pod: &str,
    name: &str,
    args: &[&str],
) -> Result<Called> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let spec = pods.get(pod).await?.spec.context("a pod without a spec")?;
    let proxy = spec
        .containers
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == "HTTP_PROXY")
        .and_then(|e| e.value.clone())
        .with_context(|| format!("no container of {pod} has HTTP_PROXY: is it meshed?"))?;
    run(kubectl()
        .args(["debug", "-n", namespace, pod, "--image", IMAGE])
        .args([
            "--image-pull-policy=Never",
            "--profile=restricted",
            "--quiet",
        ])
        .args(["--container", name])
        .arg(format!("--env=HTTP_PROXY={proxy}"))
        .args(["--", BINARY])
        .args(args))?;
    let exit_code = crate::eventually(
        &format!("ephemeral container {name} of {pod} to finish"),
        Duration::from_secs(60),
        || async {
            let status = pods.get(pod).await.ok()?.status?;
            status
                .ephemeral_container_statuses?
                .into_iter()
                .find(|c| c.name == name)?
                .state?
                .terminated
                .map(|t| t.exit_code)
        },
    )
    .await;
    let output = run(kubectl().args(["logs", "-n", namespace, pod, "-c", name]))?;
    Ok(Called { exit_code, output })
}

/// A pod outside the mesh (no sidecar, its own ServiceAccount `default`),
/// idle until [`outside`] runs a command in it.
pub async fn start_outsider(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app.kubernetes.io/name": name } },
        "spec": {
            "automountServiceAccountToken": false,
            "securityContext": {
                "runAsNonRoot": true,
                "seccompProfile": { "type": "RuntimeDefault" },
            },
            "containers": [{
                "name": "client",
                "image": IMAGE,
                "imagePullPolicy": "Never",
                "args": ["serve", "8080"],
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["ALL"] },
                    "readOnlyRootFilesystem": true,
                },
            }],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    crate::eventually(
        &format!("pod {name} to run"),
        Duration::from_secs(60),
        || async {
            let p = pods.get(name).await.ok()?;
            let running = p.status?.phase.as_deref() == Some("Running");
            running.then_some(())
        },
    )
    .await;
    Ok(())
}

/// Runs `trellis-smoke <args>` in the pod [`start_outsider`] made.
pub fn outside(namespace: &str, pod: &str, args: &[&str]) -> Result<Called> {
    let out = kubectl()
        .args(["exec", "-n", namespace, pod, "--", BINARY])
        .args(args)
        .output()
        .context("running kubectl exec")?;
    let exit_code = out.status.code().unwrap_or(-1);
    if exit_code > 1 {
        bail!(
            "kubectl exec in {pod} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Called {
        exit_code,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

/// The name of the first running pod of `service` (by `app.kubernetes.io/name`).
pub async fn pod_of(client: &Client, namespace: &str, service: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(
            &kube::api::ListParams::default().labels(&format!("app.kubernetes.io/name={service}")),
        )
        .await?;
    list.items
        .iter()
        .find(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .map(|p| p.name_any())
        .with_context(|| format!("no running pod of {service} in {namespace}"))
}
