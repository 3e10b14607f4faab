//! Whether a MicroService's status waits for the Deployment controller's
//! report on the Deployment a reconcile just created or changed.
//!
//! A status written before the Deployment controller has observed the
//! Deployment's new generation says nothing about its rollout, and is
//! overwritten moments later, when the report brings the MicroService back
//! (its rollout figures trigger a reconcile). So a status waits for that
//! report, up to [`Settings::report_wait`](super::Settings::report_wait):
//! a new MicroService then gets one status write and one Event.
//!
//! The wait pays only while the Deployment controller keeps up. It is
//! behind when a Deployment changed more than the wait ago is still not
//! reported on: it is down, or its client's rate limit (20 requests a
//! second by default, about ten new Deployments a second) is queueing a
//! bulk change. A report then comes after the wait anyway, so waiting
//! would only hold back the status, and the `observedGeneration` clients
//! follow, by the whole wait. While it is behind, a status is written at
//! once and the report brings the next one.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use kube::runtime::reflector::ObjectRef;

use crate::crd::MicroService;

/// The changes awaiting the Deployment controller's report, and the wait.
pub(super) struct ReportWait {
    wait: Duration,
    /// When a reconcile last created or changed each MicroService's
    /// Deployment, until a reconcile finds the change reported on (or the
    /// MicroService deleted). A change past the wait stays: it is what
    /// shows the Deployment controller behind.
    changed: Mutex<HashMap<ObjectRef<MicroService>, Instant>>,
}

impl ReportWait {
    pub(super) fn new(wait: Duration) -> Self {
        Self {
            wait,
            changed: Mutex::default(),
        }
    }

    /// Whether the status of `key` waits, at `now`: this reconcile
    /// `changed` its Deployment (or not), which the Deployment controller
    /// has `observed` (or not). It waits while the change is unreported and
    /// younger than the wait, unless the controller is behind (see the
    /// module's doc). An overdue change counts only while its MicroService
    /// `exists`: one deleted before the report is never reconciled again
    /// (nothing else would forget it), and the garbage collector deletes
    /// its Deployment, so no report comes. Each call looks at every
    /// unreported change: a few thousand at most, and a few microseconds.
    pub(super) fn waits(
        &self,
        key: &ObjectRef<MicroService>,
        changed: bool,
        observed: bool,
        now: Instant,
        exists: impl Fn(&ObjectRef<MicroService>) -> bool,
    ) -> bool {
        let mut pending = self.changed.lock().expect("not poisoned");
        if changed {
            pending.insert(key.clone(), now);
        }
        if observed {
            pending.remove(key);
            return false;
        }
        let overdue = |at: &Instant| now.saturating_duration_since(*at) >= self.wait;
        if pending.get(key).is_none_or(overdue) {
            return false;
        }
        pending.retain(|k, at| !overdue(at) || exists(k));
        !pending.values().any(overdue)
    }

    /// Forgets `key`'s change (its MicroService is being deleted).
    pub(super) fn forget(&self, key: &ObjectRef<MicroService>) {
        self.changed.lock().expect("not poisoned").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// Every MicroService exists.
    fn all(_: &ObjectRef<MicroService>) -> bool {
        true
    }

    fn key(name: &str) -> ObjectRef<MicroService> {
        ObjectRef::new(name).within("shop")
    }

    #[test]
    fn a_change_waits_for_its_report_until_the_wait_is_over() {
        let reports = ReportWait::new(WAIT);
        let t0 = Instant::now();
        assert!(reports.waits(&key("orders"), true, false, t0, all));
        // Brought back by another child's event: still unreported.
        assert!(reports.waits(&key("orders"), false, false, t0 + WAIT / 2, all));
        // The requeue after the wait writes the status without the report.
        assert!(!reports.waits(&key("orders"), false, false, t0 + WAIT, all));
    }

    #[test]
    fn the_report_ends_the_wait() {
        let reports = ReportWait::new(WAIT);
        let t0 = Instant::now();
        assert!(reports.waits(&key("orders"), true, false, t0, all));
        assert!(!reports.waits(&key("orders"), false, true, t0 + WAIT / 10, all));
        // Nothing of it is left to wait for.
        assert!(!reports.waits(&key("orders"), false, false, t0 + WAIT / 5, all));
    }

    #[test]
    fn no_change_no_wait() {
        let reports = ReportWait::new(WAIT);
        // A resync of a MicroService whose Deployment is not yet observed,
        // changed by someone else: nothing this operator waits for.
        assert!(!reports.waits(&key("orders"), false, false, Instant::now(), all));
    }

    #[test]
    fn while_a_report_is_overdue_a_new_change_does_not_wait() {
        let reports = ReportWait::new(WAIT);
        let t0 = Instant::now();
        assert!(reports.waits(&key("orders"), true, false, t0, all));
        // Within the wait of the first change, another waits too.
        assert!(reports.waits(&key("users"), true, false, t0 + WAIT / 2, all));
        // The first is past its wait and still unreported: the Deployment
        // controller is behind, so neither waits any longer.
        let later = t0 + WAIT + Duration::from_millis(1);
        assert!(!reports.waits(&key("orders"), false, false, later, all));
        assert!(!reports.waits(&key("users"), false, false, later, all));
        assert!(!reports.waits(&key("products"), true, false, later, all));
        // It reports on the first: it has caught up, and a change waits again.
        assert!(!reports.waits(&key("orders"), false, true, later, all));
        assert!(reports.waits(&key("carts"), true, false, later, all));
    }

    #[test]
    fn a_microservice_deleted_before_its_report_no_longer_shows_the_controller_behind() {
        let reports = ReportWait::new(WAIT);
        let t0 = Instant::now();
        assert!(reports.waits(&key("orders"), true, false, t0, all));
        // `orders` is deleted before the Deployment controller reports; no
        // reconcile of it comes to forget its change.
        let gone = |k: &ObjectRef<MicroService>| k.name != "orders";
        assert!(reports.waits(&key("users"), true, false, t0 + 2 * WAIT, gone));
    }

    #[test]
    fn a_forgotten_change_no_longer_shows_the_controller_behind() {
        let reports = ReportWait::new(WAIT);
        let t0 = Instant::now();
        reports.waits(&key("orders"), true, false, t0, all);
        reports.forget(&key("orders"));
        assert!(reports.waits(&key("users"), true, false, t0 + 2 * WAIT, all));
    }

    #[test]
    fn a_zero_wait_never_waits() {
        let reports = ReportWait::new(Duration::ZERO);
        assert!(!reports.waits(&key("orders"), true, false, Instant::now(), all));
    }
}
