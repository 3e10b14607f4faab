//! EdgePolicies in the model: which policy applies to which rule, what it
//! puts in the rule, and each policy's status. Pure, like [`super::model`],
//! which calls it.
//!
//! - **Attachment** (GEP-713, direct): a policy's `targetRefs` name a
//!   Gateway (every rule it serves, from routes of any namespace), one
//!   listener of it (`sectionName`), an HTTPRoute or a GRPCRoute, all in
//!   the policy's namespace.
//! - **Precedence**, field by field: for a rule, `jwt` comes from the most
//!   specific policy that sets it (the route's, then the listener's, then
//!   the Gateway's), and so does `rateLimit`. A route's policy that only
//!   limits rates thus keeps the Gateway's token check: a route owner
//!   cannot turn authentication off by attaching a policy for something
//!   else.
//! - **Conflicts**: of the policies targeting the same object (and
//!   section), the oldest applies (creation time, then namespace/name);
//!   the others are `Accepted=False`, reason `Conflicted`, there.
//! - **Failing closed**: a policy whose key set cannot be read (its Secret
//!   or ConfigMap or key is missing) or is not usable keeps the key set it
//!   last had in force, if this controller saw one since it started; else
//!   every rule it would protect answers 500 rather than serve without the
//!   token check.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use trellis_policy::gateway::{Backend, JwtRule, RateLimitKey, RateLimitRule, RouteRule};

use super::{
    edge_policy::{
        AncestorRef, EdgePolicy, EdgePolicyStatus, JwksSource, LimitKeyType, PolicyAncestorStatus,
        TARGET_GROUP, TargetKind, usable_keys,
    },
    model::Key,
};

/// Where a key set is read from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JwksAt {
    /// The policy's namespace.
    pub namespace: String,
    /// `Secret` or `ConfigMap`.
    pub kind: &'static str,
    /// The object's name.
    pub name: String,
    /// The key.
    pub key: String,
}

impl JwksAt {
    /// Where `source`, in `namespace`, points.
    pub fn of(namespace: &str, source: &JwksSource) -> Option<Self> {
        let (kind, r) = match (&source.secret_ref, &source.config_map_ref) {
            (Some(r), _) => ("Secret", r),
            (None, Some(r)) => ("ConfigMap", r),
            (None, None) => return None,
        };
        Some(Self {
            namespace: namespace.to_owned(),
            kind,
            name: r.name.clone(),
            key: r.key.clone(),
        })
    }
}

impl std::fmt::Display for JwksAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}/{} key {:?}",
            self.kind, self.namespace, self.name, self.key
        )
    }
}

/// What the model needs to apply EdgePolicies.
#[derive(Clone, Debug, Default)]
pub struct EdgeInputs {
    /// Every EdgePolicy.
    pub policies: Vec<Arc<EdgePolicy>>,
    /// The key sets the policies name: the text, or why it cannot be read
    /// (the object or the key is missing).
    pub key_sets: BTreeMap<JwksAt, Result<String, String>>,
    /// The JWT check each policy last had in force, by namespace and name.
    pub last_good: BTreeMap<Key, JwtRule>,
}

/// Every key set `policies` name.
pub fn key_set_refs(policies: &[Arc<EdgePolicy>]) -> BTreeSet<JwksAt> {
    policies
        .iter()
        .filter_map(|p| {
            let ns = p.namespace().unwrap_or_default();
            JwksAt::of(&ns, &p.spec.jwt.as_ref()?.jwks)
        })
        .collect()
}

/// What the model knows of the objects policies may target.
#[derive(Debug, Default)]
pub struct Targets {
    /// Every Gateway: whether this controller serves it, and its listeners.
    pub gateways: BTreeMap<Key, (bool, Vec<String>)>,
    /// Every HTTPRoute.
    pub http_routes: BTreeSet<Key>,
    /// Every GRPCRoute.
    pub grpc_routes: BTreeSet<Key>,
}

/// A policy's JWT check, resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum JwtSetting {
    /// The check to apply.
    Ready(JwtRule),
    /// No key set can be applied: the rules answer 500.
    Broken,
}

/// What one policy puts in the rules it governs.
#[derive(Clone, Debug, Default, PartialEq)]
struct Settings {
    jwt: Option<JwtSetting>,
    rate_limit: Option<RateLimitRule>,
}

/// What applies to one rule.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effective {
    /// The JWT check.
    pub jwt: Option<JwtSetting>,
    /// The per-client limit.
    pub rate_limit: Option<RateLimitRule>,
}

impl Effective {
    /// Puts this into `rule`. A broken JWT check closes the rule: its
    /// filters go and its one backend is an unresolved one, which the data
    /// plane answers with 500.
    pub fn apply(&self, rule: &mut RouteRule) {
        match &self.jwt {
            None => {}
            Some(JwtSetting::Ready(j)) => rule.jwt = Some(j.clone()),
            Some(JwtSetting::Broken) => {
                rule.jwt = None;
                rule.filters.clear();
                rule.backends = vec![Backend {
                    service: None,
                    weight: 1,
                    filters: vec![],
                }];
                return;
            }
        }
        rule.rate_limit = self.rate_limit.clone();
        // The schema lets a claim key only beside a jwt, which precedence
        // keeps in force; should a policy written before that rule slip
        // through, a limit that cannot read claims keys on the address
        // rather than make the gateway refuse its whole configuration.
        if rule.jwt.is_none()
            && let Some(limit) = &mut rule.rate_limit
        {
            limit.key = RateLimitKey::ClientAddress;
        }
    }
}

/// A targeted object (namespace of the policy and the target).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    kind: TargetKind,
    namespace: String,
    name: String,
    section: Option<String>,
}

/// The policies in force, by what they target.
#[derive(Debug, Default)]
pub struct Attached {
    by_target: BTreeMap<Target, Settings>,
}

impl Attached {
    /// What applies to the rules of route `route` (`HTTPRoute` or
    /// `GRPCRoute`) served by Gateway `gateway` through listener `listener`.
    pub fn for_rule(&self, gateway: &Key, listener: &str, kind: &str, route: &Key) -> Effective {
        let route_kind = match kind {
            "GRPCRoute" => TargetKind::GrpcRoute,
            _ => TargetKind::HttpRoute,
        };
        let candidates = [
            Target {
                kind: route_kind,
                namespace: route.0.clone(),
                name: route.1.clone(),
                section: None,
            },
            Target {
                kind: TargetKind::Gateway,
                namespace: gateway.0.clone(),
                name: gateway.1.clone(),
                section: Some(listener.to_owned()),
            },
            Target {
                kind: TargetKind::Gateway,
                namespace: gateway.0.clone(),
                name: gateway.1.clone(),
                section: None,
            },
        ];
        let found: Vec<&Settings> = candidates
            .iter()
            .filter_map(|t| self.by_target.get(t))
            .collect();
        Effective {
            jwt: found.iter().find_map(|s| s.jwt.clone()),
            rate_limit: found.iter().find_map(|s| s.rate_limit.clone()),
        }
    }
}

/// The status of one policy.
#[derive(Debug)]
pub struct PolicyOutcome {
    /// Namespace and name.
    pub key: Key,
    /// This controller's entries.
    pub status: EdgePolicyStatus,
}

/// What the policies come to.
#[derive(Debug, Default)]
pub struct EdgeOutcome {
    /// Each policy's status.
    pub policies: Vec<PolicyOutcome>,
    /// The JWT check of each policy whose key set is good now, to keep as
    /// its last good one.
    pub good: BTreeMap<Key, JwtRule>,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// How one policy's JWT check resolved, for its status.
enum JwtState {
    None,
    Good,
    /// The key set cannot be read (ResolvedRefs) or used (Accepted).
    Bad {
        unreadable: bool,
        why: String,
        serving_last_good: bool,
    },
}

/// Resolves every policy: what applies where, and each one's status.
pub fn resolve(
    inputs: &EdgeInputs,
    targets: &Targets,
    controller: &str,
) -> (Attached, EdgeOutcome) {
    let mut policies: Vec<&Arc<EdgePolicy>> = inputs.policies.iter().collect();
    policies.sort_by_key(|p| {
        (
            p.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
                .unwrap_or(k8s_openapi::jiff::Timestamp::MAX),
            p.namespace().unwrap_or_default(),
            p.name_any(),
        )
    });
    let mut attached = Attached::default();
    let mut owner: BTreeMap<Target, Key> = BTreeMap::new();
    let mut out = EdgeOutcome::default();
    for p in policies {
        let ns = p.namespace().unwrap_or_default();
        let key = (ns.clone(), p.name_any());
        let generation = p.metadata.generation;
        let (settings, state) = settings_of(p, &key, inputs, &mut out.good);
        let mut ancestors = Vec::new();
        for t in &p.spec.target_refs {
            let target = Target {
                kind: t.kind,
                namespace: ns.clone(),
                name: t.name.clone(),
                section: t.section_name.clone(),
            };
            let what = format!("{} {ns}/{}", t.kind.as_str(), t.name);
            let missing = match t.kind {
                TargetKind::Gateway => match targets.gateways.get(&(ns.clone(), t.name.clone())) {
                    None => Some(format!("{what} does not exist")),
                    Some((false, _)) => Some(format!(
                        "{what} is not of a class served by this controller"
                    )),
                    Some((true, listeners)) => t
                        .section_name
                        .as_ref()
                        .filter(|s| !listeners.contains(s))
                        .map(|s| format!("{what} has no listener named {s:?}")),
                },
                TargetKind::HttpRoute => {
                    (!targets.http_routes.contains(&(ns.clone(), t.name.clone())))
                        .then(|| format!("{what} does not exist"))
                }
                TargetKind::GrpcRoute => {
                    (!targets.grpc_routes.contains(&(ns.clone(), t.name.clone())))
                        .then(|| format!("{what} does not exist"))
                }
            };
            let accepted = if let Some(why) = missing {
                condition("Accepted", false, "TargetNotFound", why, generation)
            } else if let Some(older) = owner.get(&target) {
                condition(
                    "Accepted",
                    false,
                    "Conflicted",
                    format!(
                        "EdgePolicy {}/{} targets {what}{} too and is older: it applies there instead",
                        older.0,
                        older.1,
                        t.section_name
                            .as_ref()
                            .map(|s| format!(" listener {s}"))
                            .unwrap_or_default()
                    ),
                    generation,
                )
            } else {
                owner.insert(target.clone(), key.clone());
                attached.by_target.insert(target, settings.clone());
                match &state {
                    JwtState::Bad {
                        unreadable: false,
                        why,
                        serving_last_good,
                    } => condition(
                        "Accepted",
                        false,
                        "Invalid",
                        format!("{why}; {}", fallback(*serving_last_good)),
                        generation,
                    ),
                    _ => condition(
                        "Accepted",
                        true,
                        "Accepted",
                        format!("applies to the rules of {what}"),
                        generation,
                    ),
                }
            };
            let resolved = match &state {
                JwtState::Bad {
                    unreadable: true,
                    why,
                    serving_last_good,
                } => condition(
                    "ResolvedRefs",
                    false,
                    "RefNotFound",
                    format!("{why}; {}", fallback(*serving_last_good)),
                    generation,
                ),
                JwtState::None => condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "the policy refers to nothing".into(),
                    generation,
                ),
                _ => condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "the key set was read".into(),
                    generation,
                ),
            };
            ancestors.push(PolicyAncestorStatus {
                ancestor_ref: AncestorRef {
                    group: TARGET_GROUP.into(),
                    kind: t.kind.as_str().into(),
                    namespace: ns.clone(),
                    name: t.name.clone(),
                    section_name: t.section_name.clone(),
                },
                controller_name: controller.to_owned(),
                conditions: vec![accepted, resolved],
            });
        }
        out.policies.push(PolicyOutcome {
            key,
            status: EdgePolicyStatus { ancestors },
        });
    }
    (attached, out)
}

fn fallback(serving_last_good: bool) -> &'static str {
    if serving_last_good {
        "the last good key set stays in force"
    } else {
        "its rules answer 500 until it is fixed (no token check was in force to keep)"
    }
}

/// What policy `p` sets, and how its JWT check resolved. A good check is
/// added to `good`.
fn settings_of(
    p: &EdgePolicy,
    key: &Key,
    inputs: &EdgeInputs,
    good: &mut BTreeMap<Key, JwtRule>,
) -> (Settings, JwtState) {
    let rate_limit = p.spec.rate_limit.as_ref().map(|l| RateLimitRule {
        id: format!("EdgePolicy/{}/{}", key.0, key.1),
        per_second: l.per_second,
        burst: l.burst,
        key: match (l.key.type_, &l.key.claim) {
            (LimitKeyType::Claim, Some(c)) => RateLimitKey::Claim(c.clone()),
            _ => RateLimitKey::ClientAddress,
        },
    });
    let Some(jwt) = &p.spec.jwt else {
        return (
            Settings {
                jwt: None,
                rate_limit,
            },
            JwtState::None,
        );
    };
    let text = match key_set_text(inputs, &key.0, &jwt.jwks) {
        Ok(text) => usable_keys(&text).map(|_| text).map_err(|why| (false, why)),
        Err(why) => Err((true, why)),
    };
    let (setting, state) = match text {
        Ok(text) => {
            let rule = JwtRule {
                issuer: jwt.issuer.clone(),
                audiences: jwt.audiences.clone(),
                jwks: text,
                required_claims: jwt
                    .required_claims
                    .iter()
                    .map(|c| (c.name.clone(), c.value.clone()))
                    .collect(),
                claims_to_headers: jwt
                    .claim_to_headers
                    .iter()
                    .map(|c| (c.claim.clone(), c.header.clone()))
                    .collect(),
                clock_skew_secs: u64::from(jwt.clock_skew_seconds),
            };
            good.insert(key.clone(), rule.clone());
            (JwtSetting::Ready(rule), JwtState::Good)
        }
        Err((unreadable, why)) => match inputs.last_good.get(key) {
            Some(last) => {
                good.insert(key.clone(), last.clone());
                (
                    JwtSetting::Ready(last.clone()),
                    JwtState::Bad {
                        unreadable,
                        why,
                        serving_last_good: true,
                    },
                )
            }
            None => (
                JwtSetting::Broken,
                JwtState::Bad {
                    unreadable,
                    why,
                    serving_last_good: false,
                },
            ),
        },
    };
    (
        Settings {
            jwt: Some(setting),
            rate_limit,
        },
        state,
    )
}

/// The text of the key set `source` names, or why there is none.
fn key_set_text(
    inputs: &EdgeInputs,
    namespace: &str,
    source: &JwksSource,
) -> Result<String, String> {
    let at = JwksAt::of(namespace, source)
        .ok_or_else(|| "jwks names neither a Secret nor a ConfigMap".to_owned())?;
    match inputs.key_sets.get(&at) {
        Some(Ok(text)) => Ok(text.clone()),
        Some(Err(why)) => Err(why.clone()),
        None => Err(format!("{at} has not been read")),
    }
}
