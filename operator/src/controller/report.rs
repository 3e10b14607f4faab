//! What the reconcile tells: the MicroService's status and its Events.

use super::*;

/// The last status this operator wrote for each MicroService, until the
/// cache shows a newer version of that MicroService. The cache is a watch:
/// a reconcile that a child's event brings moments after a status write may
/// still see the MicroService as it was before the write, and would write
/// the same status again (with fresh transition times). Kept small: the
/// version the write was computed from, a fingerprint and the phase.
#[derive(Default)]
pub(super) struct Written(Mutex<HashMap<ObjectRef<MicroService>, WrittenStatus>>);

struct WrittenStatus {
    /// `metadata.resourceVersion` of the MicroService the status was
    /// computed from: while the cache still has that version, it has not
    /// seen the write.
    over: Option<String>,
    fingerprint: u64,
    phase: Option<Phase>,
}

impl Written {
    /// The fingerprint and phase of the status last written for `ms`, if
    /// the cache's `ms` does not show it yet. An entry the cache has caught
    /// up with is dropped.
    fn unseen(&self, ms: &MicroService) -> Option<(u64, Option<Phase>)> {
        let key = ObjectRef::from_obj(ms);
        let mut written = self.0.lock().expect("not poisoned");
        match written.get(&key) {
            Some(w) if w.over == ms.metadata.resource_version => Some((w.fingerprint, w.phase)),
            Some(_) => {
                written.remove(&key);
                None
            }
            None => None,
        }
    }

    fn record(&self, ms: &MicroService, fingerprint: u64, phase: Option<Phase>) {
        self.0.lock().expect("not poisoned").insert(
            ObjectRef::from_obj(ms),
            WrittenStatus {
                over: ms.metadata.resource_version.clone(),
                fingerprint,
                phase,
            },
        );
    }

    /// Forgets `key` (its MicroService is deleted).
    pub(super) fn forget(&self, key: &ObjectRef<MicroService>) {
        self.0.lock().expect("not poisoned").remove(key);
    }
}

/// What a status says, without its conditions' transition times (which a
/// status computed from a stale cache sets afresh).
fn status_fingerprint(status: &MicroServiceStatus) -> u64 {
    let mut s = status.clone();
    for c in &mut s.conditions {
        c.last_transition_time =
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH);
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&s).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Writes the status (server-side apply on the status subresource, same
/// field manager) when it differs from what is there.
pub(super) async fn update_status(
    ms: &MicroService,
    ctx: &Context,
    deployment: Option<&Deployment>,
    failure: Option<Failure>,
) -> Result<(), Error> {
    let name = ms.name_any();
    let ns = ms.namespace().unwrap_or_default();
    let mesh = ctx.render_config().mesh;
    let identity = mesh
        .as_ref()
        .map(|m| trellis_identity::SpiffeId::new(&m.trust_domain, &ns, &name).to_string());
    let authorization = mesh.as_ref().map(|_| {
        let inbound = ms.spec.inbound.clone().unwrap_or_default();
        let who = match &inbound.authorization {
            None => "any caller".to_owned(),
            Some(a) => format!("authorization {:?} ({} rules)", a.mode, a.allow.len()),
        };
        format!("mtls {:?}, {who}", inbound.mtls)
    });
    let authorization_check = callers::check(
        ms,
        &ctx.caches.microservices,
        &ctx.settings,
        ctx.settings.identity.is_some(),
    );
    let status: MicroServiceStatus = status::compute(&Observed {
        generation: ms.metadata.generation,
        deployment,
        url: render::service_url(&name, &ns, &ctx.settings.render.cluster_domain),
        identity,
        authorization,
        authorization_check: authorization_check.clone(),
        failure,
        previous: ms.status.as_ref(),
        now: Timestamp::now(),
    });
    if ms.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let fingerprint = status_fingerprint(&status);
    let unseen = ctx.written.unseen(ms);
    if unseen.is_some_and(|(fp, _)| fp == fingerprint) {
        return Ok(());
    }
    let old_phase = match unseen {
        Some((_, phase)) => phase,
        None => ms.status.as_ref().and_then(|s| s.phase),
    };
    let old_check = ms.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == status::condition::AUTHORIZATION_RESOLVED)
            .map(|c| (c.status == "True", c.message.clone()))
    });
    let api: Api<MicroService> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": MicroService::api_version(&()),
        "kind": MicroService::kind(&()),
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.written.record(ms, fingerprint, status.phase);
    // A misconfigured rule is told once as an Event, when it appears or changes.
    if let Some(c) = authorization_check.filter(|c| !c.resolved)
        && old_check != Some((false, c.message.clone()))
    {
        publish(
            ms,
            ctx,
            EventType::Warning,
            c.reason,
            "Authorization",
            &c.message,
        )
        .await;
    }
    // The first phase a MicroService gets is told only when it is not
    // Ready: its coming up was told by the Created event, so the way to
    // Ready is one Event.
    if old_phase != status.phase && (old_phase.is_some() || status.phase != Some(Phase::Ready)) {
        let summary = status.replica_summary.clone().unwrap_or_default();
        match status.phase {
            Some(Phase::Ready) => {
                publish(
                    ms,
                    ctx,
                    EventType::Normal,
                    "Ready",
                    "Status",
                    &format!("{summary} replicas ready"),
                )
                .await
            }
            Some(Phase::Degraded) => {
                publish(
                    ms,
                    ctx,
                    EventType::Warning,
                    "Degraded",
                    "Status",
                    &format!("{summary} replicas ready"),
                )
                .await
            }
            _ => {}
        }
    }
    Ok(())
}

/// Publishes an Event about `ms`; a failure to publish is logged, not fatal.
pub(crate) async fn publish(
    ms: &MicroService,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let mut note = note.to_owned();
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &ms.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish an event");
    }
}
