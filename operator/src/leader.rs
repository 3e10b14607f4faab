//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator
//! replicas never reconcile at once.
//!
//! kube-runtime 5.0 has no leader election of its own, and the third-party
//! crates lag behind kube's major versions, so this is a small implementation
//! of client-go's algorithm (`tools/leaderelection`):
//!
//! - The Lease names its holder and when the holder last renewed it.
//! - A candidate takes the Lease when it is free or when its record has not
//!   changed for `leaseDuration`, measured on the candidate's own clock from
//!   when it first saw that record (like client-go, so clock skew between
//!   replicas does not matter).
//! - Every write is an update carrying the `resourceVersion` that was read,
//!   so of two candidates racing for the same Lease exactly one wins; the
//!   other gets 409 Conflict. (Server-side apply would not do here: it
//!   merges, where election needs compare-and-swap.)
//! - The leader renews every `retryPeriod`; when it has not renewed for
//!   `renewDeadline` it has lost the Lease and must stop work at once: the
//!   binary exits, and Kubernetes restarts it as a candidate.
//! - On a clean shutdown the leader releases the Lease so a standby takes
//!   over without waiting for it to expire.

use std::{sync::Mutex, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Client,
    api::{Api, PostParams},
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Timing of the election, client-go's defaults.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long a Lease is good for without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up.
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// One candidate for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The Lease record last seen (its resourceVersion) and when it was first seen.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaderElector {
    /// A candidate named `identity` (unique per replica: the pod name) for
    /// the Lease `namespace/name`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: Mutex::new(None),
        }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&self) {
        info!(lease = %self.name, identity = %self.identity, "waiting to become the leader");
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election: cannot read or write the Lease"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews the Lease until it is lost; returns when it is. The caller
    /// must stop all work then.
    pub async fn hold(&self) {
        let mut last_renew = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renew = Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica holds the Lease");
                    return;
                }
                Err(e) => warn!(error = %e, "leader election: cannot renew the Lease"),
            }
            if last_renew.elapsed() > self.timing.renew_deadline {
                warn!(lease = %self.name, "could not renew the Lease in time");
                return;
            }
        }
    }

    /// Gives the Lease up, if held, so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.name, "released the Lease"),
            Err(e) => warn!(error = %e, "could not release the Lease"),
        }
    }

    /// One round: takes the Lease if free or expired, renews it if held.
    /// True when this candidate holds it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let duration_secs = i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };

        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let held_by_me = holder.as_deref() == Some(self.identity.as_str());
        if !held_by_me && holder.is_some() && !self.expired(&lease, &spec) {
            debug!(holder = ?holder, "the Lease is held");
            return Ok(false);
        }
        let mut next = spec;
        if !held_by_me {
            next.acquire_time = Some(MicroTime(now));
            next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
        }
        next.holder_identity = Some(self.identity.clone());
        next.lease_duration_seconds = Some(duration_secs);
        next.renew_time = Some(MicroTime(now));
        lease.spec = Some(next);
        // `lease` carries the resourceVersion read above: compare-and-swap.
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// True when the Lease's record has not changed for its duration, on our clock.
    fn expired(&self, lease: &Lease, spec: &LeaseSpec) -> bool {
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let mut observed = self.observed.lock().expect("not poisoned");
        let seen_at = match &*observed {
            Some((seen, at)) if *seen == rv => *at,
            _ => {
                let at = Instant::now();
                *observed = Some((rv, at));
                at
            }
        };
        let duration = spec
            .lease_duration_seconds
            .map_or(self.timing.lease_duration, |s| {
                Duration::from_secs(s.max(0) as u64)
            });
        seen_at.elapsed() > duration
    }
}

fn conflict_is_false(r: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
