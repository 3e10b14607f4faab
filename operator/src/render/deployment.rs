//! The `<name>` Deployment: the replica count, the pod selector and the pod
//! template's labels and annotations around the pod spec. Separate because
//! what is on the template decides when pods roll (the image, and the config
//! and Secrets checksums unless `spec.hotReload` is set), and the replica count is left
//! to the HorizontalPodAutoscaler when one exists.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};

use super::{
    APP_CONTAINER, CONFIG_CHECKSUM_ANNOTATION, Renderer, SECRETS_CHECKSUM_ANNOTATION,
    config_checksum, s, selector_labels,
};

impl Renderer<'_> {
    pub(super) fn deployment(&self) -> Deployment {
        let spec = &self.ms.spec;
        let mut annotations = BTreeMap::from([(
            s("kubectl.kubernetes.io/default-container"),
            s(APP_CONTAINER),
        )]);
        if !spec.hot_reload {
            annotations.insert(s(CONFIG_CHECKSUM_ANNOTATION), config_checksum(&spec.config));
        }
        if let Some(sum) = self.secrets_checksum() {
            annotations.insert(s(SECRETS_CHECKSUM_ANNOTATION), sum);
        }
        Deployment {
            metadata: ObjectMeta {
                labels: Some(self.versioned_labels()),
                ..self.meta(self.name.clone())
            },
            spec: Some(DeploymentSpec {
                // Left to the HorizontalPodAutoscaler when autoscaling.
                replicas: spec.autoscaling.is_none().then_some(spec.replicas),
                selector: LabelSelector {
                    match_labels: Some(selector_labels(&self.name)),
                    ..LabelSelector::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(self.versioned_labels()),
                        annotations: Some(annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(self.pod_spec()),
                },
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }
}
