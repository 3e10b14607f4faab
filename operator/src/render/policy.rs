//! The sidecar policy: the MicroService's spec turned into the
//! [`SidecarPolicy`] the sidecar runs by, validated, and the `<name>-sidecar`
//! ConfigMap that carries it. Separate because this is where the operator's
//! input becomes the sidecar's, and where a MicroService the CRD's schema
//! could not refuse is refused before anything is applied.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use trellis_policy::{POLICY_KEY, SidecarPolicy};

use super::{RenderError, Renderer, sidecar_name};
use crate::crd::MicroService;

/// The sidecar policy for a MicroService, validated with the MicroService
/// itself ([`crate::validate::all`]).
pub fn sidecar_policy(ms: &MicroService) -> Result<SidecarPolicy, RenderError> {
    let s = &ms.spec;
    let policy = SidecarPolicy {
        service: ms.name_any(),
        namespace: ms.namespace().unwrap_or_default(),
        app_port: u16::try_from(s.port).unwrap_or(0),
        protocol: s.protocol,
        health: s.health.clone().unwrap_or_default(),
        resilience: s.resilience.clone().unwrap_or_default(),
        dependencies: s.dependencies.clone(),
        inbound: s.inbound.clone().unwrap_or_default(),
        tracing: s.tracing.clone().unwrap_or_default(),
        egress: s.egress.unwrap_or_default(),
        identity: None,
    };
    let errors = crate::validate::all(&ms.name_any(), s, &policy);
    if !errors.is_empty() {
        return Err(RenderError::Invalid(errors));
    }
    Ok(policy)
}

impl Renderer<'_> {
    /// `<name>-sidecar`: the policy as JSON under [`POLICY_KEY`].
    pub(super) fn policy_config_map(&self, policy: &SidecarPolicy) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(sidecar_name(&self.name)),
            data: Some(BTreeMap::from([(POLICY_KEY.into(), policy.to_json())])),
            ..ConfigMap::default()
        }
    }
}
