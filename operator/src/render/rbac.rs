//! The pods' identity and what it may do: the `<name>` ServiceAccount, and
//! the `<name>-sidecar` Role and RoleBinding. Separate because this is the
//! whole of the access a MicroService's pods get to the Kubernetes API, and
//! it is meant to be read and reviewed in one place: only the sidecar holds
//! a token, and it may read EndpointSlices and its own policy, nothing else.

use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
};

use super::{Renderer, s, sidecar_name, strings};

impl Renderer<'_> {
    pub(super) fn service_account(&self) -> ServiceAccount {
        ServiceAccount {
            metadata: self.meta(self.name.clone()),
            // The token is projected into the sidecar alone (see `pod_spec`).
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        }
    }

    /// The sidecar may read EndpointSlices (discovery) and its own policy
    /// ConfigMap, nothing else. `resourceNames` restricts get by name; for
    /// list and watch the apiserver honours it only when the request carries
    /// `fieldSelector=metadata.name=<name>-sidecar`, which is how the sidecar
    /// watches it.
    pub(super) fn role(&self) -> Role {
        Role {
            metadata: self.meta(sidecar_name(&self.name)),
            rules: Some(vec![
                PolicyRule {
                    api_groups: Some(strings(&["discovery.k8s.io"])),
                    resources: Some(strings(&["endpointslices"])),
                    verbs: strings(&["get", "list", "watch"]),
                    ..PolicyRule::default()
                },
                PolicyRule {
                    api_groups: Some(strings(&[""])),
                    resources: Some(strings(&["configmaps"])),
                    resource_names: Some(vec![sidecar_name(&self.name)]),
                    verbs: strings(&["get", "list", "watch"]),
                    ..PolicyRule::default()
                },
            ]),
        }
    }

    pub(super) fn role_binding(&self) -> RoleBinding {
        RoleBinding {
            metadata: self.meta(sidecar_name(&self.name)),
            role_ref: RoleRef {
                api_group: s("rbac.authorization.k8s.io"),
                kind: s("Role"),
                name: sidecar_name(&self.name),
            },
            subjects: Some(vec![Subject {
                kind: s("ServiceAccount"),
                name: self.name.clone(),
                namespace: Some(self.ns.clone()),
                ..Subject::default()
            }]),
        }
    }
}
