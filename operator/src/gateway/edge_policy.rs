//! The `EdgePolicy` custom resource (`trellis.dev/v1alpha1`): JWT
//! authentication and per-client rate limits for the rules a Trellis
//! gateway serves, attached to a `Gateway` or a route by the Gateway API's
//! direct policy attachment (GEP-713): `targetRefs` name objects in the
//! policy's own namespace.
//!
//! What the apiserver can check is in the schema (bounds, patterns, enums,
//! CEL rules), so a bad policy is refused at `kubectl apply`. What it
//! cannot — whether the targets exist, whether the key set's text is a
//! usable JSON Web Key Set — the gateway controller reports in the
//! policy's status ([`super::policy_model`]).

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The group of the objects a policy may target.
pub const TARGET_GROUP: &str = "gateway.networking.k8s.io";

/// A DNS subdomain: the name of a Secret, ConfigMap, Gateway or route.
pub const OBJECT_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A Gateway API section name (a listener's name): a DNS-1123 subdomain.
pub const SECTION_NAME_PATTERN: &str = OBJECT_NAME_PATTERN;
/// A key of a Secret or ConfigMap.
pub const DATA_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// An HTTP header name (an RFC 9110 token).
pub const HEADER_NAME_PATTERN: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";

/// Targets are unique (sectionName included).
pub const UNIQUE_TARGETS_RULE: &str = "self.all(a, self.exists_one(b, a.kind == b.kind && \
     a.name == b.name && (has(a.sectionName) ? a.sectionName : '') == \
     (has(b.sectionName) ? b.sectionName : '')))";
/// A policy sets something.
pub const SETS_SOMETHING_RULE: &str = "has(self.jwt) || has(self.rateLimit)";
/// A limit keyed on a claim needs the token check that reads it.
pub const CLAIM_NEEDS_JWT_RULE: &str = "!has(self.rateLimit) || !has(self.rateLimit.key) || \
     self.rateLimit.key.type != 'Claim' || has(self.jwt)";
/// `sectionName` names a listener, so only on a Gateway.
pub const SECTION_ON_GATEWAY_RULE: &str = "self.kind == 'Gateway' || !has(self.sectionName)";
/// The key set comes from one place.
pub const ONE_SOURCE_RULE: &str = "has(self.secretRef) != has(self.configMapRef)";
/// `claim` exactly when the key is a claim.
pub const CLAIM_KEY_RULE: &str = "self.type == 'Claim' ? has(self.claim) : !has(self.claim)";
/// Headers the gateway must not overwrite with a claim.
pub const RESERVED_HEADER_RULE: &str = "!(self.header.lowerAscii() in ['host', 'authorization', \
     'connection', 'content-length', 'transfer-encoding', 'te', 'upgrade', 'keep-alive', \
     'proxy-connection'])";

/// JWT authentication and per-client rate limits for the rules of the
/// Gateways and routes it targets.
// Two printer columns of one type are not a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "EdgePolicy",
    plural = "edgepolicies",
    singular = "edgepolicy",
    // Not `ep`: that is the core `endpoints`, which kubectl would pick.
    shortname = "edgepol",
    category = "trellis",
    namespaced,
    status = "EdgePolicyStatus",
    derive = "PartialEq",
    doc = "An EdgePolicy requires a JWT bearer token and/or limits each client's request rate \
           on the rules of the Gateways and routes it targets (Gateway API direct policy \
           attachment). A policy on a route takes precedence over one on its Gateway, field by \
           field; of two policies on the same object, the older one applies.",
    printcolumn(
        name = "Targets",
        type_ = "string",
        json_path = ".spec.targetRefs[*].name",
        description = "The objects the policy targets"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.ancestors[*].conditions[?(@.type==\"Accepted\")].status",
        description = "Whether the policy applies, per target"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": SETS_SOMETHING_RULE,
    "message": "an EdgePolicy sets jwt, rateLimit or both",
}, {
    "rule": CLAIM_NEEDS_JWT_RULE,
    "message": "a rateLimit keyed on a claim needs jwt in the same policy: the claim is read from the verified token",
    "fieldPath": ".rateLimit.key",
}]))]
pub struct EdgePolicySpec {
    /// The Gateways (every rule of every route they serve, or one
    /// listener's with `sectionName`), HTTPRoutes and GRPCRoutes this
    /// policy applies to, in the policy's own namespace.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": UNIQUE_TARGETS_RULE,
        "message": "each targetRef must be unique",
    }]))]
    pub target_refs: Vec<TargetRef>,

    /// Require a JWT bearer token (`Authorization: Bearer <token>`) signed
    /// by a key of the issuer's key set. A request without one gets 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<EdgeJwt>,

    /// Limit each client's request rate with a token bucket of its own; a
    /// request finding its bucket empty gets 429 with `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<EdgeRateLimit>,
}

/// An object a policy applies to, in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": SECTION_ON_GATEWAY_RULE,
    "message": "sectionName names a listener: only a Gateway target may have one",
}]))]
pub struct TargetRef {
    /// `gateway.networking.k8s.io`.
    #[schemars(extend("enum" = ["gateway.networking.k8s.io"]))]
    pub group: String,
    /// `Gateway`, `HTTPRoute` or `GRPCRoute`.
    pub kind: TargetKind,
    /// The object's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    /// A listener of the Gateway: the policy applies to the rules served
    /// through that listener only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECTION_NAME_PATTERN))]
    pub section_name: Option<String>,
}

/// The kinds a policy may target.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum TargetKind {
    /// Every rule of every route the Gateway serves.
    Gateway,
    /// Every rule of the HTTPRoute.
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    /// Every rule of the GRPCRoute.
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
}

impl TargetKind {
    /// The kind as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "Gateway",
            Self::HttpRoute => "HTTPRoute",
            Self::GrpcRoute => "GRPCRoute",
        }
    }
}

/// JWT authentication: what a token must be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeJwt {
    /// The `iss` a token must carry, exactly.
    #[schemars(length(min = 1, max = 2048))]
    pub issuer: String,
    /// A token's `aud` must name at least one of these.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 256)))]
    pub audiences: Vec<String>,
    /// Where the issuer's public keys are: a JSON Web Key Set (RFC 7517),
    /// as JSON text, under a key of a Secret or ConfigMap in the policy's
    /// namespace. RSA, EC (P-256, P-384) and Ed25519 keys are used; a
    /// shared secret (`kty: oct`) never is. A change of the text applies
    /// within seconds; text without a usable key is refused in the
    /// policy's status and the last good key set keeps serving.
    pub jwks: JwksSource,
    /// Claims a valid token must also carry: a string claim equal to the
    /// value or holding it as a space-separated word (an OAuth `scope`),
    /// or an array claim holding it. A valid token without one gets 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub required_claims: Vec<RequiredClaim>,
    /// Claims copied into request headers for the backend. A header of
    /// one of these names sent by the client is always removed first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub claim_to_headers: Vec<ClaimToHeader>,
    /// How far the gateway's clock may be from the issuer's when `exp` and
    /// `nbf` are checked, in seconds.
    #[serde(default = "default_clock_skew")]
    #[schemars(range(min = 0, max = 300))]
    pub clock_skew_seconds: u32,
}

fn default_clock_skew() -> u32 {
    60
}

/// Where the key set is: exactly one of a Secret and a ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": ONE_SOURCE_RULE,
    "message": "set exactly one of secretRef and configMapRef",
}]))]
pub struct JwksSource {
    /// A key of a Secret in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<DataKeyRef>,
    /// A key of a ConfigMap in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<DataKeyRef>,
}

/// A key of a Secret or ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataKeyRef {
    /// The object's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    /// The key holding the key set's JSON text.
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub key: String,
}

/// A claim a token must hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequiredClaim {
    /// The claim's name (top level of the token's claims).
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// The value it must hold.
    #[schemars(length(min = 1, max = 1024))]
    pub value: String,
}

/// A claim copied into a request header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": RESERVED_HEADER_RULE,
    "message": "this header is the gateway's to set: pick another name",
    "fieldPath": ".header",
}]))]
pub struct ClaimToHeader {
    /// The claim's name: a string claim is copied as is, any other as
    /// JSON text.
    #[schemars(length(min = 1, max = 256))]
    pub claim: String,
    /// The header's name.
    #[schemars(length(min = 1, max = 256), regex(pattern = HEADER_NAME_PATTERN))]
    pub header: String,
}

/// A per-client token bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeRateLimit {
    /// Requests each client may make per second, sustained.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub per_second: u32,
    /// Requests each client may make at once after being idle (the
    /// bucket's size).
    #[schemars(range(min = 1, max = 1_000_000))]
    pub burst: u32,
    /// What tells clients apart: their address (the default) or a claim
    /// of their verified token.
    #[serde(default)]
    pub key: LimitKey,
}

/// What a per-client limit keys its buckets on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": CLAIM_KEY_RULE,
    "message": "claim is set exactly when type is Claim",
}]))]
pub struct LimitKey {
    /// `ClientAddress`: the client's IP address as the gateway sees it
    /// (behind a load balancer that does not keep it, every client is the
    /// balancer). `Claim`: the value of `claim` in the verified token; a
    /// token without it is keyed on the address.
    #[serde(rename = "type", default)]
    pub type_: LimitKeyType,
    /// The claim, for `Claim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub claim: Option<String>,
}

/// What kind of key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LimitKeyType {
    /// The client's address.
    #[default]
    ClientAddress,
    /// A claim of the verified token.
    Claim,
}

/// Gateway API's `PolicyStatus`: one entry per ancestor (here, per
/// target), per controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgePolicyStatus {
    /// What each controller says of the policy at each target.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub ancestors: Vec<PolicyAncestorStatus>,
}

/// The policy's status at one ancestor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAncestorStatus {
    /// The object this entry is about: the target itself (a Gateway, a
    /// listener of it, or a route).
    pub ancestor_ref: AncestorRef,
    /// The controller writing this entry.
    #[schemars(length(min = 1, max = 253))]
    pub controller_name: String,
    /// Accepted (reasons Accepted, Invalid, Conflicted, TargetNotFound)
    /// and ResolvedRefs (the key set's Secret or ConfigMap).
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
}

/// Gateway API's `ParentReference` shape.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct AncestorRef {
    /// The group.
    #[schemars(length(max = 253))]
    pub group: String,
    /// The kind.
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// The namespace.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// The name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The listener, when the target names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub section_name: Option<String>,
}

/// The CRD as installed, tidied like the MicroService's.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = EdgePolicy::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            crate::crd::tidy(schema);
        }
    }
    crd
}

/// The CRD as YAML, the content of `crds/edgepolicy.yaml`.
pub fn crd_yaml() -> String {
    let mut out = String::from(
        "# Generated by `cargo run -p trellis-operator --bin crdgen`; do not edit.\n\
         # CI checks it against the Rust types with `crdgen --check`.\n",
    );
    out.push_str(&serde_yaml::to_string(&crd()).expect("a CRD always serialises"));
    out
}

/// Why a JSON Web Key Set's text cannot verify tokens, or how many of its
/// keys can: the same test the gateway applies when it loads the set (it
/// parses the keys; this checks their shape), so a policy whose key set
/// the gateway would refuse is refused in the policy's status instead of
/// holding back the gateway's whole configuration.
pub fn usable_keys(text: &str) -> Result<usize, String> {
    use serde_json::Value;
    let set: Value =
        serde_json::from_str(text).map_err(|e| format!("the key set is not JSON: {e}"))?;
    let Some(keys) = set.get("keys").and_then(Value::as_array) else {
        return Err(
            "the key set has no \"keys\" array (a JSON Web Key Set is {\"keys\": [...]})".into(),
        );
    };
    let mut usable = 0;
    let mut why = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let name = k
            .get("kid")
            .and_then(Value::as_str)
            .map_or_else(|| format!("key {i}"), |kid| format!("key {kid:?}"));
        match usable_key(k) {
            Ok(()) => usable += 1,
            Err(e) => why.push(format!("{name} {e}")),
        }
    }
    if usable == 0 {
        return Err(if why.is_empty() {
            "the key set has no keys".into()
        } else {
            format!("the key set has no usable key: {}", why.join("; "))
        });
    }
    Ok(usable)
}

fn usable_key(k: &serde_json::Value) -> Result<(), String> {
    let text = |f: &str| k.get(f).and_then(serde_json::Value::as_str);
    let b64 = |f: &str| -> Result<(), String> {
        match text(f) {
            Some(v)
                if !v.is_empty()
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                Ok(())
            }
            Some(_) => Err(format!("has a {f} that is not base64url")),
            None => Err(format!("has no {f}")),
        }
    };
    if text("use") == Some("enc") {
        return Err("is for encryption".into());
    }
    let algs: &[&str] = match text("kty") {
        Some("RSA") => {
            b64("n")?;
            b64("e")?;
            &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
        }
        Some("EC") => {
            b64("x")?;
            b64("y")?;
            match text("crv") {
                Some("P-256") => &["ES256"],
                Some("P-384") => &["ES384"],
                other => return Err(format!("has curve {other:?}, not P-256 or P-384")),
            }
        }
        Some("OKP") => {
            b64("x")?;
            match text("crv") {
                Some("Ed25519") => &["EdDSA"],
                other => return Err(format!("has curve {other:?}, not Ed25519")),
            }
        }
        Some("oct") => return Err("is a shared secret (kty oct)".into()),
        other => return Err(format!("has an unknown key type {other:?}")),
    };
    match text("alg") {
        Some(alg) if !algs.contains(&alg) => {
            Err(format!("has algorithm {alg}, not one of its key type"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn schema() -> Value {
        let crd = serde_json::to_value(crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    fn rules(v: &Value) -> Vec<String> {
        v["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["rule"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn names_scope_columns_and_status() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("edgepolicies.trellis.dev")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["edgepol".to_owned()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["trellis".to_owned()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Targets", "Accepted", "Age"]);
    }

    #[test]
    fn the_schema_says_what_the_apiserver_can_check() {
        let s = schema();
        let spec = &s["properties"]["spec"];
        assert_eq!(spec["required"], json!(["targetRefs"]));
        assert_eq!(rules(spec), [SETS_SOMETHING_RULE, CLAIM_NEEDS_JWT_RULE]);
        let p = &spec["properties"];
        assert_eq!(p["targetRefs"]["maxItems"], 16);
        assert_eq!(p["targetRefs"]["minItems"], 1);
        assert_eq!(rules(&p["targetRefs"]), [UNIQUE_TARGETS_RULE]);
        let target = &p["targetRefs"]["items"];
        assert_eq!(rules(target), [SECTION_ON_GATEWAY_RULE]);
        assert_eq!(
            target["properties"]["group"]["enum"],
            json!(["gateway.networking.k8s.io"])
        );
        assert_eq!(
            target["properties"]["kind"]["enum"],
            json!(["Gateway", "HTTPRoute", "GRPCRoute"])
        );
        let jwt = &p["jwt"]["properties"];
        assert_eq!(p["jwt"]["required"], json!(["audiences", "issuer", "jwks"]));
        assert_eq!(jwt["clockSkewSeconds"]["default"], 60);
        assert_eq!(jwt["clockSkewSeconds"]["maximum"].as_f64(), Some(300.0));
        assert_eq!(jwt["audiences"]["items"]["maxLength"], 256);
        assert_eq!(rules(&jwt["jwks"]), [ONE_SOURCE_RULE]);
        let header = &jwt["claimToHeaders"]["items"];
        assert_eq!(rules(header), [RESERVED_HEADER_RULE]);
        assert_eq!(
            header["properties"]["header"]["pattern"],
            HEADER_NAME_PATTERN
        );
        let limit = &p["rateLimit"];
        assert_eq!(limit["required"], json!(["burst", "perSecond"]));
        assert_eq!(
            limit["properties"]["perSecond"]["minimum"].as_f64(),
            Some(1.0)
        );
        let key = &limit["properties"]["key"];
        assert_eq!(rules(key), [CLAIM_KEY_RULE]);
        assert_eq!(
            key["properties"]["type"]["enum"],
            json!(["ClientAddress", "Claim"])
        );
    }

    #[test]
    fn schema_is_structural_and_bounded() {
        fn walk(path: &str, v: &Value, problems: &mut Vec<String>) {
            let o = v.as_object().unwrap();
            for key in ["oneOf", "anyOf", "allOf", "not", "$ref", "$defs"] {
                if o.contains_key(key) {
                    problems.push(format!("{path}: has {key}"));
                }
            }
            let typed = o.contains_key("type") || o.contains_key("x-kubernetes-int-or-string");
            if !typed {
                problems.push(format!("{path}: no type"));
            }
            if o.get("type") == Some(&Value::from("array")) && !o.contains_key("maxItems") {
                problems.push(format!("{path}: array without maxItems"));
            }
            if o.get("type") == Some(&Value::from("string"))
                && !o.contains_key("maxLength")
                && !o.contains_key("enum")
                && !o.contains_key("format")
            {
                problems.push(format!("{path}: string without maxLength"));
            }
            if !path.is_empty() && !path.ends_with("[]") && !o.contains_key("description") {
                problems.push(format!("{path}: no description"));
            }
            for (k, child) in o
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                walk(&format!("{path}.{k}"), child, problems);
            }
            if let Some(items) = o.get("items") {
                walk(&format!("{path}[]"), items, problems);
            }
        }
        let mut problems = Vec::new();
        walk("", &schema(), &mut problems);
        // The root's and metadata's come from kube; conditions from k8s-openapi.
        problems.retain(|p| {
            p != ".spec: no description"
                && p != ".status: no description"
                && !p.starts_with(".metadata")
                && !p.starts_with(".apiVersion")
                && !p.starts_with(".kind")
                && !p.contains(".conditions[]")
        });
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn a_policy_reads_as_users_write_it() {
        let p: EdgePolicySpec = serde_json::from_value(json!({
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "api"}],
            "jwt": {"issuer": "https://issuer.example", "audiences": ["shop"],
                    "jwks": {"secretRef": {"name": "issuer-keys", "key": "jwks.json"}}},
            "rateLimit": {"perSecond": 5, "burst": 10, "key": {"type": "Claim", "claim": "sub"}},
        }))
        .unwrap();
        assert_eq!(p.target_refs[0].kind, TargetKind::HttpRoute);
        assert_eq!(p.jwt.as_ref().unwrap().clock_skew_seconds, 60);
        assert_eq!(
            p.rate_limit.as_ref().unwrap().key.type_,
            LimitKeyType::Claim
        );
        let by_address: EdgeRateLimit =
            serde_json::from_value(json!({"perSecond": 1, "burst": 1})).unwrap();
        assert_eq!(by_address.key, LimitKey::default());
    }

    #[test]
    fn a_key_set_needs_a_usable_key_and_says_why_not() {
        let rsa = json!({"kty": "RSA", "kid": "r", "n": "sXch", "e": "AQAB", "alg": "RS256"});
        let ec = json!({"kty": "EC", "crv": "P-256", "x": "f83O", "y": "x_FE"});
        assert_eq!(usable_keys(&json!({"keys": [rsa, ec]}).to_string()), Ok(2));
        let cases = [
            ("not json", "not JSON"),
            ("{}", "no \"keys\" array"),
            (r#"{"keys": []}"#, "has no keys"),
            (
                r#"{"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}"#,
                "key \"s\" is a shared secret",
            ),
            (
                r#"{"keys": [{"kty": "RSA", "n": "sXch", "e": "AQAB", "alg": "ES256"}]}"#,
                "key 0 has algorithm ES256",
            ),
            (
                r#"{"keys": [{"kty": "EC", "crv": "P-521", "x": "a", "y": "b"}]}"#,
                "not P-256 or P-384",
            ),
            (
                r#"{"keys": [{"kty": "RSA", "e": "AQAB"}]}"#,
                "key 0 has no n",
            ),
            (
                r#"{"keys": [{"kty": "RSA", "n": "a b", "e": "AQAB"}]}"#,
                "not base64url",
            ),
            (
                r#"{"keys": [{"kty": "EC", "use": "enc", "crv": "P-256", "x": "a", "y": "b"}]}"#,
                "for encryption",
            ),
        ];
        for (text, says) in cases {
            let e = usable_keys(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
