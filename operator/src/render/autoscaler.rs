//! The `<name>` HorizontalPodAutoscaler: scales the Deployment on CPU
//! utilisation between `spec.autoscaling`'s bounds. Separate because it is
//! optional (rendered only when `spec.autoscaling` is set), and when it
//! exists it, not the Deployment, owns the replica count.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};

use super::{Renderer, s};

impl Renderer<'_> {
    pub(super) fn hpa(&self) -> Option<HorizontalPodAutoscaler> {
        let a = self.ms.spec.autoscaling.as_ref()?;
        Some(HorizontalPodAutoscaler {
            metadata: self.meta(self.name.clone()),
            spec: Some(HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    api_version: Some(s("apps/v1")),
                    kind: s("Deployment"),
                    name: self.name.clone(),
                },
                min_replicas: Some(a.min_replicas),
                max_replicas: a.max_replicas,
                metrics: Some(vec![MetricSpec {
                    type_: s("Resource"),
                    resource: Some(ResourceMetricSource {
                        name: s("cpu"),
                        target: MetricTarget {
                            type_: s("Utilization"),
                            average_utilization: Some(a.target_cpu_utilization),
                            ..MetricTarget::default()
                        },
                    }),
                    ..MetricSpec::default()
                }]),
                ..HorizontalPodAutoscalerSpec::default()
            }),
            ..HorizontalPodAutoscaler::default()
        })
    }
}
