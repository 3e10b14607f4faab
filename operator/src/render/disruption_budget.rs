//! The `<name>` PodDisruptionBudget: at most one pod down at a time during a
//! voluntary disruption (a node drain). Separate because it is optional: it
//! exists only when more than one pod runs, or may run with autoscaling;
//! over a single pod, a budget of one unavailable pod would protect nothing.

use k8s_openapi::{
    api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{Renderer, s, selector_labels};

impl Renderer<'_> {
    /// A PodDisruptionBudget when more than one pod runs (or may run, with autoscaling).
    pub(super) fn pdb(&self) -> Option<PodDisruptionBudget> {
        let spec = &self.ms.spec;
        let pods = spec
            .autoscaling
            .as_ref()
            .map_or(spec.replicas, |a| a.min_replicas);
        (pods > 1).then(|| PodDisruptionBudget {
            metadata: self.meta(self.name.clone()),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(&self.name)),
                    ..LabelSelector::default()
                }),
                unhealthy_pod_eviction_policy: Some(s("AlwaysAllow")),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        })
    }
}
