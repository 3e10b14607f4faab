//! Status: what `kubectl get microservices` and `kubectl describe` show.
//!
//! Pure functions from what the operator saw (the Deployment it applied, or
//! the reason it could not) to a [`MicroServiceStatus`], so the phase logic is
//! unit tested without a cluster.

use k8s_openapi::{
    api::apps::v1::Deployment,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::crd::{MicroServiceStatus, Phase};

/// Condition types.
pub mod condition {
    /// Every desired replica is ready and up to date.
    pub const READY: &str = "Ready";
    /// A rollout is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Fewer replicas are ready than desired, or the rollout stalled.
    pub const DEGRADED: &str = "Degraded";
    /// The operator could not reconcile the MicroService.
    pub const RECONCILE_FAILED: &str = "ReconcileFailed";
    /// The authorization rules name callers that exist, in a mesh with
    /// identity; present only when the MicroService has rules.
    pub const AUTHORIZATION_RESOLVED: &str = "AuthorizationResolved";
}

/// What the operator found checking a MicroService's authorization rules
/// (`controller/callers.rs`), for the `AuthorizationResolved` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationCheck {
    /// The rules can do what they say.
    pub resolved: bool,
    /// The condition's reason.
    pub reason: &'static str,
    /// The condition's message.
    pub message: String,
}

/// The most characters a condition message or an event note the operator
/// writes may have: a sentence that fits a `kubectl describe` screen.
pub const MAX_MESSAGE: usize = 256;

/// `prefix`, `detail` and `suffix` in at most [`MAX_MESSAGE`] characters:
/// the detail (an apiserver's or a library's text) is cut, with `…`, when
/// the whole would be longer, and its trailing full stop dropped so the
/// suffix ends the sentence.
pub fn fit(prefix: &str, detail: &str, suffix: &str) -> String {
    let detail = detail.trim().trim_end_matches('.');
    let room = MAX_MESSAGE.saturating_sub(prefix.chars().count() + suffix.chars().count());
    let mut out = String::from(prefix);
    if detail.chars().count() <= room {
        out.push_str(detail);
    } else {
        out.extend(detail.chars().take(room.saturating_sub(1)));
        out.push('…');
    }
    out.push_str(suffix);
    out
}

/// The fields at fault, as many as fit, then what to do:
/// `spec.a: why; spec.b: why; and 3 more. Fix the MicroService and apply it again.`
pub fn field_errors(errors: &[trellis_policy::FieldError]) -> String {
    const ADVICE: &str = ". Fix the MicroService and apply it again.";
    let items: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let mut shown = items.len();
    loop {
        let rest = items.len() - shown;
        let mut text = items[..shown].join("; ");
        if rest > 0 {
            text.push_str(&format!("; and {rest} more"));
        }
        if shown <= 1 || text.chars().count() + ADVICE.chars().count() <= MAX_MESSAGE {
            return fit("", &text, ADVICE);
        }
        shown -= 1;
    }
}

/// Why the last reconcile failed, for the ReconcileFailed condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// A CamelCase reason, such as `NameCollision`.
    pub reason: String,
    /// What happened and what to do about it.
    pub message: String,
}

/// Everything the status is computed from.
#[derive(Debug)]
pub struct Observed<'a> {
    /// The MicroService's `metadata.generation`.
    pub generation: Option<i64>,
    /// The Deployment as the apiserver returned it, when the operator got that far.
    pub deployment: Option<&'a Deployment>,
    /// The in-cluster URL.
    pub url: String,
    /// The pods' mesh identity, when the mesh has identity.
    pub identity: Option<String>,
    /// How callers are checked (see [`crate::crd::MicroServiceStatus::authorization`]).
    pub authorization: Option<String>,
    /// Whether the authorization rules resolve; `None` without rules.
    pub authorization_check: Option<AuthorizationCheck>,
    /// Set when the reconcile failed.
    pub failure: Option<Failure>,
    /// The status as it was, to keep `lastTransitionTime` of unchanged conditions.
    pub previous: Option<&'a MicroServiceStatus>,
    /// Now.
    pub now: Timestamp,
}

/// The Deployment's numbers and whether its rollout is done: all the status
/// is computed from, so the watch of Deployments also triggers a reconcile
/// exactly when it changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rollout {
    desired: i32,
    ready: i32,
    updated: i32,
    available: i32,
    observed: bool,
    stalled: bool,
    has_status: bool,
}

impl Rollout {
    /// Whether the Deployment controller has reported on the Deployment's
    /// current generation.
    pub fn observed(&self) -> bool {
        self.observed
    }
}

/// The [`Rollout`] of `d`.
pub fn rollout(d: &Deployment) -> Rollout {
    let spec_replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    let observed = match (d.metadata.generation, st.observed_generation) {
        (Some(g), Some(o)) => o >= g,
        _ => false,
    };
    let stalled = st.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    Rollout {
        desired: spec_replicas,
        ready: st.ready_replicas.unwrap_or(0),
        updated: st.updated_replicas.unwrap_or(0),
        available: st.available_replicas.unwrap_or(0),
        observed,
        stalled,
        has_status: d.status.is_some() && st.observed_generation.is_some(),
    }
}

/// Computes the status.
pub fn compute(o: &Observed<'_>) -> MicroServiceStatus {
    let prev_conditions = o.previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let last = prev_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(o.now));
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: o.generation,
            last_transition_time: last,
        }
    };

    let r = o.deployment.map(rollout);
    let (replicas, ready) = r.as_ref().map_or((0, 0), |r| (r.desired, r.ready));
    let summary = format!("{ready}/{replicas} replicas ready");

    let (phase, ready_c, progressing_c, degraded_c) = match (&o.failure, &r) {
        // The failure is told once, in ReconcileFailed; the others point there.
        (Some(f), _) => (
            Phase::Failed,
            cond(
                condition::READY,
                false,
                "ReconcileFailed",
                "Not ready: the operator cannot reconcile this MicroService; the ReconcileFailed \
                 condition says why."
                    .into(),
            ),
            cond(
                condition::PROGRESSING,
                false,
                "ReconcileFailed",
                "No rollout until the MicroService can be reconciled.".into(),
            ),
            cond(
                condition::DEGRADED,
                true,
                &f.reason,
                "Pods, if any, keep running the last spec the operator applied.".into(),
            ),
        ),
        (None, None) => (
            Phase::Pending,
            cond(
                condition::READY,
                false,
                "Pending",
                "waiting for the Deployment".into(),
            ),
            cond(
                condition::PROGRESSING,
                true,
                "Pending",
                "waiting for the Deployment".into(),
            ),
            cond(
                condition::DEGRADED,
                false,
                "Pending",
                "waiting for the Deployment".into(),
            ),
        ),
        (None, Some(r)) if !r.has_status => (
            Phase::Pending,
            cond(condition::READY, false, "Pending", summary.clone()),
            cond(
                condition::PROGRESSING,
                true,
                "Pending",
                "the Deployment controller has not reported yet".into(),
            ),
            cond(condition::DEGRADED, false, "Pending", summary.clone()),
        ),
        (None, Some(r)) => {
            let complete = r.observed
                && r.updated >= r.desired
                && r.available >= r.desired
                && r.ready >= r.desired;
            if complete {
                (
                    Phase::Ready,
                    cond(condition::READY, true, "ReplicasReady", summary.clone()),
                    cond(
                        condition::PROGRESSING,
                        false,
                        "RolloutComplete",
                        summary.clone(),
                    ),
                    cond(condition::DEGRADED, false, "ReplicasReady", summary.clone()),
                )
            } else if r.stalled
                || (r.observed && r.updated >= r.desired && r.ready < r.desired && r.ready > 0)
            {
                let reason = if r.stalled {
                    "ProgressDeadlineExceeded"
                } else {
                    "ReplicasNotReady"
                };
                (
                    Phase::Degraded,
                    cond(condition::READY, false, reason, summary.clone()),
                    cond(condition::PROGRESSING, !r.stalled, reason, summary.clone()),
                    cond(condition::DEGRADED, true, reason, summary.clone()),
                )
            } else {
                (
                    Phase::Progressing,
                    cond(condition::READY, false, "RollingOut", summary.clone()),
                    cond(
                        condition::PROGRESSING,
                        true,
                        "RollingOut",
                        format!("{summary}, {} of {} updated", r.updated, r.desired),
                    ),
                    cond(condition::DEGRADED, false, "RollingOut", summary.clone()),
                )
            }
        }
    };
    let failed_c = match &o.failure {
        Some(f) => cond(
            condition::RECONCILE_FAILED,
            true,
            &f.reason,
            f.message.clone(),
        ),
        None => cond(
            condition::RECONCILE_FAILED,
            false,
            "Reconciled",
            "every child object is in its desired state".into(),
        ),
    };

    let mut conditions = vec![ready_c, progressing_c, degraded_c, failed_c];
    if let Some(c) = &o.authorization_check {
        conditions.push(cond(
            condition::AUTHORIZATION_RESOLVED,
            c.resolved,
            c.reason,
            c.message.clone(),
        ));
    }
    MicroServiceStatus {
        observed_generation: o.generation,
        replicas,
        ready_replicas: ready,
        replica_summary: Some(format!("{ready}/{replicas}")),
        phase: Some(phase),
        url: Some(o.url.clone()),
        identity: o.identity.clone(),
        authorization: o.authorization.clone(),
        conditions,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn deployment(desired: i32, ready: i32, updated: i32, observed: bool) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(2),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(desired),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(if observed { 2 } else { 1 }),
                replicas: Some(desired),
                ready_replicas: Some(ready),
                available_replicas: Some(ready),
                updated_replicas: Some(updated),
                ..DeploymentStatus::default()
            }),
        }
    }

    fn observe<'a>(d: Option<&'a Deployment>, failure: Option<Failure>) -> Observed<'a> {
        Observed {
            identity: None,
            authorization: None,
            authorization_check: None,
            generation: Some(3),
            deployment: d,
            url: "http://order.shop.svc.cluster.local".into(),
            failure,
            previous: None,
            now: Timestamp::from_second(1_700_000_000).unwrap(),
        }
    }

    #[test]
    fn authorization_resolved_is_reported_only_for_rules() {
        let d = deployment(1, 1, 1, true);
        let s = compute(&observe(Some(&d), None));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.type_ != condition::AUTHORIZATION_RESOLVED)
        );
        let mut o = observe(Some(&d), None);
        o.authorization_check = Some(AuthorizationCheck {
            resolved: false,
            reason: "UnknownCaller",
            message: "the rules allow MicroService \"ordr\" in shop".into(),
        });
        let s = compute(&o);
        let c = get(&s, condition::AUTHORIZATION_RESOLVED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "UnknownCaller")
        );
        // A misconfigured rule does not make the pods unready.
        assert_eq!(get(&s, "Ready").status, "True");
    }

    fn get<'a>(s: &'a MicroServiceStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn all_ready_is_ready() {
        let d = deployment(2, 2, 2, true);
        let s = compute(&observe(Some(&d), None));
        assert_eq!(s.phase, Some(Phase::Ready));
        assert_eq!(s.replica_summary.as_deref(), Some("2/2"));
        assert_eq!((s.replicas, s.ready_replicas), (2, 2));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(get(&s, "Ready").status, "True");
        assert_eq!(get(&s, "Progressing").status, "False");
        assert_eq!(get(&s, "Degraded").status, "False");
        assert_eq!(get(&s, "ReconcileFailed").status, "False");
        assert_eq!(get(&s, "ReconcileFailed").reason, "Reconciled");
    }

    #[test]
    fn no_ready_pods_yet_is_progressing() {
        let d = deployment(2, 0, 2, true);
        let s = compute(&observe(Some(&d), None));
        assert_eq!(s.phase, Some(Phase::Progressing));
        assert_eq!(get(&s, "Ready").status, "False");
        assert_eq!(get(&s, "Progressing").status, "True");
    }

    #[test]
    fn an_unobserved_generation_is_progressing_even_when_ready() {
        let d = deployment(2, 2, 2, false);
        let s = compute(&observe(Some(&d), None));
        assert_eq!(s.phase, Some(Phase::Progressing));
    }

    #[test]
    fn some_ready_after_rollout_is_degraded() {
        let d = deployment(3, 1, 3, true);
        let s = compute(&observe(Some(&d), None));
        assert_eq!(s.phase, Some(Phase::Degraded));
        assert_eq!(get(&s, "Degraded").status, "True");
        assert_eq!(get(&s, "Degraded").reason, "ReplicasNotReady");
    }

    #[test]
    fn a_stalled_rollout_is_degraded() {
        let mut d = deployment(2, 0, 2, true);
        d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            ..DeploymentCondition::default()
        }]);
        let s = compute(&observe(Some(&d), None));
        assert_eq!(s.phase, Some(Phase::Degraded));
        assert_eq!(get(&s, "Progressing").status, "False");
        assert_eq!(get(&s, "Degraded").reason, "ProgressDeadlineExceeded");
    }

    #[test]
    fn a_failure_is_failed_and_says_why() {
        let f = Failure {
            reason: "NameCollision".into(),
            message: "ConfigMap x is not owned".into(),
        };
        let s = compute(&observe(None, Some(f)));
        assert_eq!(s.phase, Some(Phase::Failed));
        let c = get(&s, "ReconcileFailed");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "NameCollision")
        );
        assert_eq!(c.message, "ConfigMap x is not owned");
        assert_eq!(get(&s, "Ready").status, "False");
    }

    #[test]
    fn a_failure_is_told_once() {
        let f = Failure {
            reason: "InvalidSpec".into(),
            message: "spec.resilience.timeout: must be more than zero, such as 1s. Fix the \
                      MicroService and apply it again."
                .into(),
        };
        let s = compute(&observe(None, Some(f.clone())));
        assert_eq!(get(&s, "ReconcileFailed").message, f.message);
        let messages: Vec<&str> = s.conditions.iter().map(|c| c.message.as_str()).collect();
        for (i, m) in messages.iter().enumerate() {
            assert!(
                !messages[i + 1..].contains(m),
                "{m:?} is in two conditions: {messages:#?}"
            );
            assert!(m.chars().count() <= MAX_MESSAGE, "{m}");
        }
    }

    #[test]
    fn keeps_the_transition_time_of_an_unchanged_condition() {
        let d = deployment(1, 1, 1, true);
        let first = compute(&observe(Some(&d), None));
        let mut later = observe(Some(&d), None);
        later.now = Timestamp::from_second(1_700_000_600).unwrap();
        later.previous = Some(&first);
        let second = compute(&later);
        assert_eq!(
            get(&second, "Ready").last_transition_time,
            get(&first, "Ready").last_transition_time
        );
        let d0 = deployment(1, 0, 1, true);
        let mut changed = observe(Some(&d0), None);
        changed.now = later.now;
        changed.previous = Some(&second);
        let third = compute(&changed);
        assert_eq!(get(&third, "Ready").last_transition_time, Time(later.now));
    }
}
