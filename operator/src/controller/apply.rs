//! The children of a MicroService: what to do with each rendered one
//! (create, update or keep, from the caches), and applying them in the
//! order a pod needs them.

use super::{secrets, slim, *};

/// The annotation on every child holding the sha256 of what the operator
/// last applied (the rendered object without this annotation): a rendered
/// object whose hash matches, and whose fields all hold, is not applied again.
pub const APPLIED_HASH_ANNOTATION: &str = "trellis.dev/applied-hash";

/// What the operator knows of one child: the hash of the rendered object it
/// last applied or found in place, the resourceVersion the apiserver
/// answered its apply with (covering the moment between an apply and its
/// watch event, when the cache lags), and the content fingerprint
/// ([`slim::content_fingerprint`]) known to hold that rendered object.
#[derive(Clone, Debug)]
pub(super) struct Applied {
    hash: String,
    resource_version: Option<u64>,
    holds: Option<u64>,
}

impl Applied {
    /// Known from a comparison, not from an apply of ours.
    pub(super) fn verified(hash: &str) -> Self {
        Self {
            hash: hash.to_owned(),
            resource_version: None,
            holds: None,
        }
    }

    /// Records that content `fp` holds the rendered object of `hash`.
    pub(super) fn verified_as(&mut self, hash: &str, fp: u64) {
        if self.hash != hash {
            *self = Self::verified(hash);
        }
        self.holds = Some(fp);
    }

    /// Whether content `fp` is known to hold the rendered object of `hash`.
    pub(super) fn holds(&self, hash: &str, fp: u64) -> bool {
        self.hash == hash && self.holds == Some(fp)
    }
}

/// What tells whether an apply changed an object: the generation where there
/// is one (so status updates by other controllers do not count), else the
/// resourceVersion.
fn version<K: Resource>(k: &K) -> Option<String> {
    let m = k.meta();
    match m.generation {
        Some(g) => Some(format!("generation {g}")),
        None => m.resource_version.clone(),
    }
}

fn resource_version<K: Resource>(k: &K) -> Option<u64> {
    k.meta().resource_version.as_deref()?.parse().ok()
}

/// The sha256 of a rendered object (which carries no hash annotation yet).
fn applied_hash<K: Serialize>(obj: &K) -> String {
    let json = serde_json::to_vec(obj).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}

/// True when every field of `want` holds in `have`: objects may have more
/// keys in `have` (defaults, other managers), lists must match element by element.
pub(super) fn holds(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| holds(wv, hv)) || wv.is_null()),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(wv, hv)| holds(wv, hv))
        }
        (w, h) => w == h,
    }
}

/// Where one child stands before the apply.
pub(crate) enum Plan {
    /// No object of this name: it is created.
    Create,
    /// Ours, and not as rendered: applied.
    Update {
        what: String,
        before: Option<String>,
    },
    /// Ours and as rendered: not written.
    Keep,
}

/// A rendered child with its plan.
pub(crate) struct Step<K> {
    obj: K,
    hash: String,
    pub(crate) plan: Plan,
}

/// Decides what to do with the rendered `obj`, from the cache alone (which
/// must have listed: [`Caches::ready`]). `Err` names it when an object of
/// that name is not controlled by `ms`.
pub(crate) async fn plan<K: ChildKind>(
    ms: &MicroService,
    ctx: &Context,
    mut obj: K,
) -> Result<Step<K>, Error> {
    // The MicroService's own namespace, or a dependency's for a grant.
    let ns = obj
        .namespace()
        .or_else(|| ms.namespace())
        .unwrap_or_default();
    let name = obj.name_any();
    let what = format!("{} {ns}/{name}", K::kind(&()));
    let hash = applied_hash(&obj);
    obj.annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.into(), hash.clone());
    let key = child_key(&obj);
    let applied = ctx.applied.lock().expect("not poisoned").get(&key).cloned();
    let cached = K::store(&ctx.caches).get(&ObjectRef::new(&name).within(&ns));
    let current: Option<Arc<K>> = match cached {
        Some(c) => Some(c),
        // We applied it and the watch has not reported it yet.
        None if applied
            .as_ref()
            .is_some_and(|a| a.hash == hash && a.resource_version.is_some()) =>
        {
            return Ok(Step {
                obj,
                hash,
                plan: Plan::Keep,
            });
        }
        // The cache holds every object of the kind in scope: the name is
        // free. (One created elsewhere moments ago, which the watch has not
        // delivered yet, is not seen; the apply then takes it over, as it
        // would after a live read that raced its creation, over a wider
        // window: the watch's lag.)
        None => None,
    };
    let Some(current) = current else {
        return Ok(Step {
            obj,
            hash,
            plan: Plan::Create,
        });
    };
    let ours = if obj.namespace() == ms.namespace() {
        render::is_controlled_by(current.meta().owner_references.as_deref(), ms)
    } else {
        grants::is_granted_by(current.meta(), ms)
    };
    if !ours {
        return Err(Error::NameCollision(vec![what]));
    }
    // The cache is older than our last apply of the same object: that apply holds.
    let stale = match (&applied, resource_version(current.as_ref())) {
        (Some(a), Some(have)) => a.hash == hash && a.resource_version.is_some_and(|rv| rv > have),
        _ => false,
    };
    let same = stale
        || (current.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash)
            && slim::verify(ctx, &obj, &hash, current.as_ref()).await?);
    let plan = if same {
        Plan::Keep
    } else {
        Plan::Update {
            what,
            before: version(current.as_ref()),
        }
    };
    Ok(Step { obj, hash, plan })
}

/// Applies a child unless it is kept; returns whether it changed and the
/// object as it now is (`None` for a kept one: the cache has it).
pub(crate) async fn execute<K: ChildKind>(
    ctx: &Context,
    step: &Step<K>,
) -> Result<Option<K>, Error> {
    if matches!(step.plan, Plan::Keep) {
        return Ok(None);
    }
    let obj = &step.obj;
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = api
        .patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await?;
    let key = child_key(obj);
    ctx.caches
        .unverified
        .lock()
        .expect("not poisoned")
        .remove(&key);
    ctx.applied.lock().expect("not poisoned").insert(
        key,
        Applied {
            hash: step.hash.clone(),
            resource_version: resource_version(&applied),
            holds: Some(slim::content_fingerprint(&applied)),
        },
    );
    Ok(Some(applied))
}

/// Collects collisions over all children before the first write.
#[derive(Default)]
pub(crate) struct Preflight {
    pub(crate) collisions: Vec<String>,
}

impl Preflight {
    /// `Ok(Some(step))` for a planned child, `Ok(None)` for a collision
    /// (recorded), `Err` for any other failure.
    pub(crate) fn record<T>(&mut self, r: Result<T, Error>) -> Result<Option<T>, Error> {
        match r {
            Ok(s) => Ok(Some(s)),
            Err(Error::NameCollision(mut names)) => {
                self.collisions.append(&mut names);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// What an apply did, for the Events.
#[derive(Default)]
struct Changes {
    created: Vec<String>,
    updated: Vec<String>,
}

impl Changes {
    /// Publishes a Normal event per kind of change (created, updated, and
    /// the kinds in `removed`).
    async fn publish(self, ms: &MicroService, ctx: &Context, removed: &[&str]) {
        let Changes { created, updated } = self;
        if !created.is_empty() {
            info!(?created, "created children");
            let note = format!("created {}", created.join(", "));
            publish(ms, ctx, EventType::Normal, "Created", "Apply", &note).await;
        }
        if !updated.is_empty() {
            info!(?updated, "updated children");
            let note = format!("updated {}", updated.join(", "));
            publish(ms, ctx, EventType::Normal, "Updated", "Apply", &note).await;
        }
        if !removed.is_empty() {
            let note = format!("deleted {}", removed.join(", "));
            publish(ms, ctx, EventType::Normal, "Deleted", "Apply", &note).await;
        }
    }

    /// Whether a child of `kind` was created or changed.
    fn created_or_updated(&self, kind: &str) -> bool {
        let of_kind = |what: &String| what.split(' ').next() == Some(kind);
        self.created.iter().chain(&self.updated).any(of_kind)
    }

    fn note<K: Resource<DynamicType = ()>>(&mut self, step: &Step<K>, after: Option<&K>) {
        match (&step.plan, after) {
            (Plan::Create, _) => self.created.push(format!(
                "{} {}",
                K::kind(&()),
                step.obj.meta().name.as_deref().unwrap_or_default()
            )),
            (Plan::Update { what, before }, Some(after)) if *before != version(after) => {
                self.updated.push(what.clone())
            }
            _ => {}
        }
    }
}

/// Declares the kinds of child a MicroService has, in the order a pod needs
/// them applied (configuration and RBAC before the Deployment), with
/// [`Child`] and [`AnyStep`] over them.
macro_rules! kinds {
    ($($kind:ident),* $(,)?) => {
        /// One rendered child, of any kind the operator makes.
        #[expect(
            clippy::large_enum_variant,
            reason = "a reconcile holds nine of these for a moment; boxing buys nothing"
        )]
        enum Child {
            $($kind($kind)),*
        }

        /// A planned child, of any kind.
        #[expect(
            clippy::large_enum_variant,
            reason = "a reconcile holds nine of these for a moment; boxing buys nothing"
        )]
        enum AnyStep {
            $($kind(Step<$kind>)),*
        }

        impl Child {
            /// See [`plan`].
            async fn plan(self, ms: &MicroService, ctx: &Context) -> Result<AnyStep, Error> {
                match self {
                    $(Child::$kind(obj) => plan(ms, ctx, obj).await.map(AnyStep::$kind)),*
                }
            }
        }

        impl AnyStep {
            /// See [`execute`]; notes what changed in `changes`.
            async fn execute(
                &self,
                ctx: &Context,
                changes: &mut Changes,
            ) -> Result<Option<Child>, Error> {
                match self {
                    $(AnyStep::$kind(step) => {
                        let after = execute(ctx, step).await?;
                        changes.note(step, after.as_ref());
                        Ok(after.map(Child::$kind))
                    }),*
                }
            }
        }
    };
}

kinds!(
    ConfigMap,
    ServiceAccount,
    Role,
    RoleBinding,
    Deployment,
    Service,
    PodDisruptionBudget,
    HorizontalPodAutoscaler,
);

/// The children [`render`](render::render) produced, in the order they are applied.
fn ordered(c: Children) -> Vec<Child> {
    let mut children = vec![
        Child::ConfigMap(c.config),
        Child::ConfigMap(c.policy),
        Child::ServiceAccount(c.service_account),
        Child::Role(c.role),
        Child::RoleBinding(c.role_binding),
        Child::Deployment(c.deployment),
        Child::Service(c.service),
    ];
    children.extend(c.pdb.map(Child::PodDisruptionBudget));
    children.extend(c.hpa.map(Child::HorizontalPodAutoscaler));
    children
}

/// The Deployment of a MicroService after [`apply`].
pub(super) struct AppliedDeployment {
    /// As the apiserver (or the cache) has it.
    pub(super) deployment: Deployment,
    /// Whether this apply created it or changed its spec (a new generation).
    pub(super) changed: bool,
}

/// Applies every child that is not as rendered, removes the optional ones no
/// longer wanted, and says what changed in Events; returns the Deployment.
pub(super) async fn apply(ms: &MicroService, ctx: &Context) -> Result<AppliedDeployment, Error> {
    let versions = secrets::versions(ms, ctx).await?;
    let c: Children = render::render(ms, &ctx.render_config(), &versions)?;
    // A Deployment naming a Secret that does not exist makes pods that never
    // start (CreateContainerConfigError); nothing is applied instead, and
    // the status names the Secret. Pods already running keep running.
    let missing = versions.missing(&ms.spec.secrets);
    if !missing.is_empty() {
        return Err(Error::SecretMissing {
            namespace: ms.namespace().unwrap_or_default(),
            names: missing.into_iter().map(str::to_owned).collect(),
        });
    }
    let (wants_pdb, wants_hpa) = (c.pdb.is_some(), c.hpa.is_some());
    let deployment_name = c.deployment.name_any();

    // 1. Nothing is written while any child's name is taken by someone else.
    let mut pre = Preflight::default();
    let mut steps = Vec::new();
    for child in ordered(c) {
        steps.extend(pre.record(child.plan(ms, ctx).await)?);
    }
    if !pre.collisions.is_empty() {
        return Err(Error::NameCollision(pre.collisions));
    }

    // 2. Apply, in order.
    let mut changes = Changes::default();
    let mut applied_deployment = None;
    for step in &steps {
        if let Some(Child::Deployment(d)) = step.execute(ctx, &mut changes).await? {
            applied_deployment = Some(d);
        }
    }
    let deployment_changed = changes.created_or_updated("Deployment");

    // 3. Remove what is no longer wanted (only our own).
    let mut removed = Vec::new();
    if !wants_pdb && remove::<PodDisruptionBudget>(ms, ctx).await? {
        removed.push("PodDisruptionBudget");
    }
    if !wants_hpa && remove::<HorizontalPodAutoscaler>(ms, ctx).await? {
        removed.push("HorizontalPodAutoscaler");
    }

    // 4. Say what changed.
    changes.publish(ms, ctx, &removed).await;

    // The Deployment as applied, else as cached (it was kept, so the cache
    // has it, or our apply moments ago does).
    let ns = ms.namespace().unwrap_or_default();
    let key = ObjectRef::new(&deployment_name).within(&ns);
    let deployment = match applied_deployment {
        Some(d) => d,
        None => match Deployment::store(&ctx.caches).get(&key) {
            Some(d) => d.as_ref().clone(),
            None => {
                Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
                    .get(&deployment_name)
                    .await?
            }
        },
    };
    Ok(AppliedDeployment {
        deployment,
        changed: deployment_changed,
    })
}

/// Deletes the child of kind `K` named like the MicroService, if this
/// MicroService controls it (as the cache says). True when something was deleted.
async fn remove<K: ChildKind>(ms: &MicroService, ctx: &Context) -> Result<bool, Error> {
    let ns = ms.namespace().unwrap_or_default();
    let name = ms.name_any();
    let Some(obj) = K::store(&ctx.caches).get(&ObjectRef::new(&name).within(&ns)) else {
        return Ok(false);
    };
    if !render::is_controlled_by(obj.meta().owner_references.as_deref(), ms) {
        return Ok(false);
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}
