//! JWT authentication of a rule's requests: the bearer token (RFC 6750)
//! a rule with a [`JwtRule`] requires, checked against the issuer's JSON
//! Web Key Set.
//!
//! A rule's check is compiled once, with the route table: the key set is
//! parsed into decoding keys then, and a key set with no usable key
//! refuses the whole configuration, so the last good table stays in force.
//! Signatures, algorithms, `iss` and `aud` are verified by the
//! `jsonwebtoken` crate; `exp` and `nbf` are compared here with the time
//! the caller passes, so tests need no clock.

use std::{
    fmt,
    str::FromStr,
    time::{SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse},
};
use serde_json::{Map, Value};
use trellis_policy::gateway::JwtRule;

use crate::http::{
    Body, full,
    response::{ProxyAnswer, X_PROXY_ERROR},
};

/// The realm named in every `WWW-Authenticate` challenge.
const REALM: &str = "trellis";

/// The claims of a verified token.
pub type Claims = Map<String, Value>;

/// One rule's compiled JWT check.
pub struct JwtCheck {
    keys: Vec<Key>,
    required_claims: Vec<(String, String)>,
    claims_to_headers: Vec<(String, HeaderName)>,
    clock_skew_secs: u64,
}

/// A usable key of the set, with the algorithms it verifies.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    /// The key's algorithms, the issuer and the audiences; `exp` and `nbf`
    /// are left to [`JwtCheck::check`].
    validation: Validation,
}

impl fmt::Debug for JwtCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| k.kid.as_deref()).collect();
        f.debug_struct("JwtCheck")
            .field("kids", &kids)
            .field("required_claims", &self.required_claims)
            .field("claims_to_headers", &self.claims_to_headers)
            .field("clock_skew_secs", &self.clock_skew_secs)
            .finish_non_exhaustive()
    }
}

impl JwtCheck {
    /// Compiles `rule` of route `route`; the error names the route and
    /// what is wrong.
    pub fn compile(rule: &JwtRule, route: &str) -> Result<Self, String> {
        let at = |what: String| format!("{route} jwt: {what}");
        if rule.issuer.is_empty() {
            return Err(at("the issuer is empty".into()));
        }
        if rule.audiences.is_empty() {
            return Err(at(
                "no audience: a token must name one, so none would pass".into()
            ));
        }
        let set: JwkSet = serde_json::from_str(&rule.jwks)
            .map_err(|e| at(format!("the JWKS is not a JSON Web Key Set: {e}")))?;
        let mut keys = Vec::new();
        let mut unusable = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let name = jwk
                .common
                .key_id
                .as_deref()
                .map_or_else(|| format!("key {i}"), |kid| format!("key {kid:?}"));
            match usable_key(jwk, rule) {
                Ok(key) => keys.push(key),
                Err(why) => unusable.push(format!("{name} {why}")),
            }
        }
        if keys.is_empty() {
            let why = if unusable.is_empty() {
                "it has no keys".to_owned()
            } else {
                unusable.join("; ")
            };
            return Err(at(format!("the JWKS has no usable key: {why}")));
        }
        for skipped in &unusable {
            tracing::warn!(%route, key = %skipped, "JWKS key not used");
        }
        let claims_to_headers = rule
            .claims_to_headers
            .iter()
            .map(|(claim, name)| {
                HeaderName::from_str(name)
                    .map(|h| (claim.clone(), h))
                    .map_err(|_| at(format!("claim {claim:?}: {name:?} is not a header name")))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            keys,
            required_claims: rule.required_claims.clone(),
            claims_to_headers,
            clock_skew_secs: rule.clock_skew_secs,
        })
    }

    /// Checks the bearer token in `headers` at time `now`: the headers to
    /// set from its claims, or why the request is refused (what
    /// `authenticate` sets, without setting it). A string claim
    /// is copied as its UTF-8 bytes, any other as JSON text; a claim that
    /// is absent, or holds a control character (which no header value
    /// may), sets no header.
    #[cfg(test)]
    pub fn check(
        &self,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, Refusal> {
        let claims = self.verified(headers, now)?;
        Ok(self.claim_headers(&claims))
    }

    /// The claims of the bearer token in `headers` once it passed every
    /// check at time `now`.
    fn verified(&self, headers: &HeaderMap, now: SystemTime) -> Result<Claims, Refusal> {
        let token = bearer_token(headers)?;
        let claims = self.verify(token)?;
        self.check_times(&claims, now)?;
        for (name, want) in &self.required_claims {
            if !claims.get(name).is_some_and(|c| holds(c, want)) {
                return Err(Refusal::insufficient_scope(format!(
                    "the token lacks claim {name}={want}"
                )));
            }
        }
        Ok(claims)
    }

    fn claim_headers(&self, claims: &Claims) -> Vec<(HeaderName, HeaderValue)> {
        self.claims_to_headers
            .iter()
            .filter_map(|(claim, name)| {
                let value = match claims.get(claim)? {
                    Value::String(s) => HeaderValue::from_bytes(s.as_bytes()).ok()?,
                    other => HeaderValue::from_bytes(other.to_string().as_bytes()).ok()?,
                };
                Some((name.clone(), value))
            })
            .collect()
    }

    /// Checks the bearer token in `headers` and, when the token is good,
    /// replaces every claim header with what the token says: a claim
    /// header the client sent is removed even when the token lacks the
    /// claim, so only the gateway ever sets one. Returns the token's
    /// claims (a per-client rate limit may key on one).
    pub fn authenticate(
        &self,
        headers: &mut HeaderMap,
        now: SystemTime,
    ) -> Result<Claims, Refusal> {
        let claims = self.verified(headers, now)?;
        for (_, name) in &self.claims_to_headers {
            headers.remove(name);
        }
        for (name, value) in self.claim_headers(&claims) {
            headers.append(name, value);
        }
        Ok(claims)
    }

    /// Verifies the token's signature, algorithm, issuer and audience.
    fn verify(&self, token: &str) -> Result<Claims, Refusal> {
        let head = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidToken => {
                Refusal::invalid_token("malformed token: not three base64url parts".into())
            }
            // `alg: none`, and any algorithm the crate does not know, fail
            // here: the header's `alg` does not parse.
            _ => Refusal::invalid_token(
                "malformed token header, or an algorithm that is never accepted".into(),
            ),
        })?;
        let key = match &head.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or_else(|| Refusal::invalid_token(format!("unknown key id {kid:?}")))?,
            None => {
                // Without a key id, only a set with exactly one key for the
                // token's algorithm can say which key to use.
                let mut fit = self
                    .keys
                    .iter()
                    .filter(|k| k.validation.algorithms.contains(&head.alg));
                match (fit.next(), fit.next()) {
                    (Some(k), None) => k,
                    (None, _) => {
                        return Err(Refusal::invalid_token(format!(
                            "no key for algorithm {:?}",
                            head.alg
                        )));
                    }
                    (Some(_), Some(_)) => {
                        return Err(Refusal::invalid_token(
                            "the token names no key id and several keys fit".into(),
                        ));
                    }
                }
            }
        };
        if !key.validation.algorithms.contains(&head.alg) {
            return Err(Refusal::invalid_token(format!(
                "algorithm {:?} does not match the key",
                head.alg
            )));
        }
        jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map(|data| data.claims)
            .map_err(|e| {
                Refusal::invalid_token(match e.kind() {
                    ErrorKind::InvalidSignature => "bad signature".into(),
                    ErrorKind::InvalidAlgorithm => "the algorithm does not match the key".into(),
                    ErrorKind::InvalidIssuer => "wrong issuer".into(),
                    ErrorKind::InvalidAudience => "wrong audience".into(),
                    ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
                    ErrorKind::InvalidClaimFormat(c) => format!("malformed {c} claim"),
                    ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                        "malformed token".into()
                    }
                    _ => "the token cannot be verified".into(),
                })
            })
    }

    /// Checks `exp` (required) and `nbf` (when present) against `now`,
    /// allowing the clock skew either way.
    fn check_times(&self, claims: &Claims, now: SystemTime) -> Result<(), Refusal> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let skew = self.clock_skew_secs as f64;
        let time = |name: &str| match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Refusal::invalid_token(format!("malformed {name} claim"))),
        };
        // RFC 7519: the token is accepted only before `exp`.
        match time("exp")? {
            None => return Err(Refusal::invalid_token("the token has no exp claim".into())),
            Some(exp) if now >= exp + skew => {
                return Err(Refusal::invalid_token("the token expired".into()));
            }
            Some(_) => {}
        }
        if let Some(nbf) = time("nbf")?
            && now + skew < nbf
        {
            return Err(Refusal::invalid_token("the token is not valid yet".into()));
        }
        Ok(())
    }
}

/// `jwk` as a key that verifies tokens of `rule`, or why it cannot.
fn usable_key(jwk: &Jwk, rule: &JwtRule) -> Result<Key, String> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err("is for encryption".into());
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
        AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
        // A key set is published; a shared secret in it would let anyone
        // who reads it mint tokens.
        AlgorithmParameters::OctetKey(_) => return Err("is a shared secret (kty oct)".into()),
        _ => return Err("has an unknown key type".into()),
    };
    let algorithms = match jwk.common.key_algorithm {
        Some(alg) => {
            let alg = Algorithm::from_str(&alg.to_string())
                .map_err(|_| format!("has algorithm {alg} that does not sign"))?;
            if alg.family() != family {
                return Err(format!("has algorithm {alg:?}, not one of its key type"));
            }
            vec![alg]
        }
        // Without `alg`, the key type (and an EC key's curve) says which
        // algorithms it can verify.
        None => match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => return Err(format!("has curve {:?}, not P-256 or P-384", p.curve)),
            },
            _ => family.algorithms().to_vec(),
        },
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("cannot be read: {e}"))?;
    let mut validation = Validation::new_for_family(family);
    validation.algorithms = algorithms;
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.set_issuer(&[&rule.issuer]);
    validation.set_audience(&rule.audiences);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        key,
        validation,
    })
}

/// The token of `Authorization: Bearer <token>`.
fn bearer_token(headers: &HeaderMap) -> Result<&str, Refusal> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(if headers.contains_key(header::AUTHORIZATION) {
            Refusal::invalid_token("more than one Authorization header".into())
        } else {
            Refusal::missing()
        });
    };
    let value = value
        .to_str()
        .map_err(|_| Refusal::invalid_token("the Authorization header is not text".into()))?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    // Another scheme (Basic, say) carries no bearer token: RFC 6750 answers
    // that with a bare challenge.
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Refusal::missing());
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Refusal::invalid_token("empty bearer token".into()));
    }
    Ok(token)
}

/// Whether `claim` holds `want`: equal, one space-separated word of a
/// string (an OAuth `scope`), or an element of an array. A number or a
/// boolean is equal to `want` read as JSON (`3`, `true`).
fn holds(claim: &Value, want: &str) -> bool {
    let same = |v: &Value| match v {
        Value::String(s) => s == want,
        other => serde_json::from_str::<Value>(want).is_ok_and(|w| w == *other),
    };
    match claim {
        Value::String(s) => s == want || s.split(' ').any(|w| w == want),
        Value::Array(items) => items.iter().any(same),
        other => same(other),
    }
}

/// Why a request's token was refused, answered by the gateway itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 401, or 403 for a good token that lacks a required claim.
    pub status: StatusCode,
    /// The RFC 6750 error code; `None` for a request with no token.
    pub error: Option<&'static str>,
    /// What is wrong, for the client and the logs.
    pub description: String,
}

impl Refusal {
    fn missing() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            error: None,
            description: "a bearer token is required (Authorization: Bearer <JWT>)".into(),
        }
    }

    fn invalid_token(description: String) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            error: Some("invalid_token"),
            description,
        }
    }

    fn insufficient_scope(description: String) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            error: Some("insufficient_scope"),
            description,
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 section 3).
    pub fn www_authenticate(&self) -> HeaderValue {
        let mut text = format!("Bearer realm=\"{REALM}\"");
        if let Some(error) = self.error {
            // The description may quote a key id from the token: keep only
            // what RFC 6750 allows inside the quoted string.
            let description: String = self
                .description
                .chars()
                .map(|c| match c {
                    '"' | '\\' => '\'',
                    ' '..='~' => c,
                    _ => '?',
                })
                .collect();
            text.push_str(&format!(
                ", error=\"{error}\", error_description=\"{description}\""
            ));
        }
        HeaderValue::from_str(&text).expect("only visible ASCII and spaces")
    }

    /// The gateway's answer: the status, the challenge, and a body saying
    /// what is wrong.
    pub fn into_response(self) -> Response<Body> {
        let text: std::sync::Arc<str> =
            format!("bearer token refused: {}", self.description).into();
        let mut rsp = Response::new(full(format!("{text}\n")));
        *rsp.status_mut() = self.status;
        let kind = if self.status == StatusCode::FORBIDDEN {
            "forbidden"
        } else {
            "unauthenticated"
        };
        rsp.extensions_mut().insert(ProxyAnswer { kind, text });
        let h = rsp.headers_mut();
        h.insert(header::WWW_AUTHENTICATE, self.www_authenticate());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(X_PROXY_ERROR, HeaderValue::from_static(kind));
        rsp
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const ISSUER: &str = "https://issuer.example";
    /// `{"alg":"none","typ":"JWT"}`, base64url.
    const NONE_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn secs(offset: i64) -> i64 {
        1_800_000_000 + offset
    }

    /// A private key, its algorithm, and the public half as a JWK named `kid`.
    struct TestKey {
        key: EncodingKey,
        alg: Algorithm,
        jwk: Jwk,
    }

    impl TestKey {
        fn rsa(pem: &str, kid: &str) -> Self {
            Self::new(
                EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
                Algorithm::RS256,
                kid,
            )
        }

        fn ec(kid: &str) -> Self {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            Self::new(
                EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
                Algorithm::ES256,
                kid,
            )
        }

        fn new(key: EncodingKey, alg: Algorithm, kid: &str) -> Self {
            let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
            jwk.common.key_id = Some(kid.into());
            Self { key, alg, jwk }
        }

        fn kid(&self) -> String {
            self.jwk.common.key_id.clone().unwrap()
        }

        /// A token of `claims`, signed by this key, naming key `kid`.
        fn sign_as(&self, kid: &str, claims: &Value) -> String {
            let mut header = Header::new(self.alg);
            header.kid = Some(kid.into());
            encode(&header, claims, &self.key).unwrap()
        }

        fn sign(&self, claims: &Value) -> String {
            self.sign_as(&self.kid(), claims)
        }
    }

    struct Fixture {
        rsa: TestKey,
        ec: TestKey,
        check: JwtCheck,
    }

    fn fixture() -> Fixture {
        let rsa = TestKey::rsa(include_str!("../../tests/fixtures/jwt/rsa-a.pem"), "rsa-1");
        let ec = TestKey::ec("ec-1");
        let jwks = json!({"keys": [rsa.jwk, ec.jwk]}).to_string();
        let check = JwtCheck::compile(&rule(jwks), "HTTPRoute/shop/api").unwrap();
        Fixture { rsa, ec, check }
    }

    fn rule(jwks: String) -> JwtRule {
        JwtRule {
            issuer: ISSUER.into(),
            audiences: vec!["shop".into(), "admin".into()],
            jwks,
            required_claims: vec![("scope".into(), "orders:read".into())],
            claims_to_headers: vec![
                ("sub".into(), "x-user".into()),
                ("tier".into(), "x-tier".into()),
            ],
            clock_skew_secs: 60,
        }
    }

    /// Good claims, with `changes` merged in (a null removes a claim).
    fn claims(changes: Value) -> Value {
        let mut c = json!({
            "iss": ISSUER,
            "aud": "shop",
            "sub": "alice",
            "scope": "orders:read orders:write",
            "exp": secs(300),
            "nbf": secs(-300),
        });
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    /// The refusal of `token`, which must be refused.
    fn refused(f: &Fixture, token: &str) -> Refusal {
        f.check.check(&bearer(token), now()).unwrap_err()
    }

    fn assert_invalid(r: &Refusal, says: &str) {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
        assert_eq!(r.error, Some("invalid_token"), "{r:?}");
        assert!(r.description.contains(says), "{r:?} should say {says:?}");
    }

    #[test]
    fn rs256_and_es256_tokens_pass_and_their_claims_become_headers() {
        let f = fixture();
        for key in [&f.rsa, &f.ec] {
            let token = key.sign(&claims(json!({"tier": 3})));
            let set = f.check.check(&bearer(&token), now()).unwrap();
            assert_eq!(
                set,
                vec![
                    (
                        HeaderName::from_static("x-user"),
                        HeaderValue::from_static("alice")
                    ),
                    (
                        HeaderName::from_static("x-tier"),
                        HeaderValue::from_static("3")
                    ),
                ],
                "{:?}",
                key.alg
            );
        }
    }

    #[test]
    fn expiry_and_not_before_allow_the_clock_skew_and_no_more() {
        let f = fixture();
        let ok = |c: Value| f.check.check(&bearer(&f.rsa.sign(&c)), now()).is_ok();
        assert!(ok(claims(json!({"exp": secs(-30)}))), "within the skew");
        assert_invalid(
            &refused(&f, &f.rsa.sign(&claims(json!({"exp": secs(-61)})))),
            "expired",
        );
        assert!(ok(claims(json!({"nbf": secs(30)}))), "within the skew");
        assert_invalid(
            &refused(&f, &f.rsa.sign(&claims(json!({"nbf": secs(600)})))),
            "not valid yet",
        );
        assert_invalid(
            &refused(&f, &f.rsa.sign(&claims(json!({"exp": null})))),
            "no exp",
        );
        assert_invalid(
            &refused(&f, &f.rsa.sign(&claims(json!({"exp": "tomorrow"})))),
            "exp",
        );
    }

    #[test]
    fn the_issuer_and_an_audience_must_match() {
        let f = fixture();
        let wrong_iss = f.ec.sign(&claims(json!({"iss": "https://other.example"})));
        assert_invalid(&refused(&f, &wrong_iss), "wrong issuer");
        let wrong_aud = f.ec.sign(&claims(json!({"aud": "billing"})));
        assert_invalid(&refused(&f, &wrong_aud), "wrong audience");
        assert_invalid(
            &refused(&f, &f.ec.sign(&claims(json!({"aud": null})))),
            "no aud",
        );
        let one_of = f.ec.sign(&claims(json!({"aud": ["billing", "admin"]})));
        assert!(f.check.check(&bearer(&one_of), now()).is_ok());
    }

    #[test]
    fn a_token_signed_by_another_key_is_refused() {
        let f = fixture();
        let other_rsa = TestKey::rsa(include_str!("../../tests/fixtures/jwt/rsa-b.pem"), "x");
        let forged = other_rsa.sign_as("rsa-1", &claims(json!({})));
        assert_invalid(&refused(&f, &forged), "bad signature");
        let other_ec = TestKey::ec("x");
        let forged = other_ec.sign_as("ec-1", &claims(json!({})));
        assert_invalid(&refused(&f, &forged), "bad signature");
        let unknown = f.rsa.sign_as("rsa-2", &claims(json!({})));
        assert_invalid(&refused(&f, &unknown), "unknown key id \"rsa-2\"");
    }

    #[test]
    fn alg_none_and_an_algorithm_not_of_the_key_are_refused() {
        let f = fixture();
        let good = f.rsa.sign(&claims(json!({})));
        let payload = good.split('.').nth(1).unwrap();
        let none = format!("{NONE_HEADER}.{payload}.");
        assert_invalid(&refused(&f, &none), "never accepted");
        // An ES256 token naming the RSA key.
        let mixed = f.ec.sign_as("rsa-1", &claims(json!({})));
        assert_invalid(&refused(&f, &mixed), "does not match the key");
    }

    #[test]
    fn malformed_and_missing_tokens_are_refused() {
        let f = fixture();
        assert_invalid(&refused(&f, "not-a-jwt"), "malformed");
        assert_invalid(&refused(&f, "a.b.c"), "malformed");
        let good = f.rsa.sign(&claims(json!({})));
        let (unsigned, _) = good.rsplit_once('.').unwrap();
        assert_invalid(&refused(&f, unsigned), "malformed");

        let missing = f.check.check(&HeaderMap::new(), now()).unwrap_err();
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(missing.error, None);
        assert_eq!(missing.www_authenticate(), "Bearer realm=\"trellis\"");
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YTpi"),
        );
        assert_eq!(f.check.check(&basic, now()).unwrap_err().error, None);
        assert_invalid(&f.check.check(&bearer(""), now()).unwrap_err(), "empty");
    }

    #[test]
    fn a_valid_token_without_a_required_claim_is_forbidden() {
        let f = fixture();
        let token = f.rsa.sign(&claims(json!({"scope": "orders:write"})));
        let r = refused(&f, &token);
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.error, Some("insufficient_scope"));
        assert!(r.description.contains("scope=orders:read"), "{r:?}");
        let as_array = f.rsa.sign(&claims(json!({"scope": ["orders:read"]})));
        assert!(f.check.check(&bearer(&as_array), now()).is_ok());
    }

    #[test]
    fn a_required_claim_matches_by_value_word_or_element() {
        assert!(holds(&json!("admin"), "admin"));
        assert!(holds(&json!("read write"), "write"));
        assert!(!holds(&json!("readwrite"), "write"));
        assert!(holds(&json!(["a", 7]), "7"));
        assert!(holds(&json!(true), "true"));
        assert!(!holds(&json!(3), "\"3\""));
        assert!(!holds(&json!({"admin": true}), "admin"));
    }

    #[test]
    fn authenticate_replaces_claim_headers_the_client_sent() {
        let f = fixture();
        let mut h = bearer(&f.ec.sign(&claims(json!({}))));
        h.insert("x-user", HeaderValue::from_static("mallory"));
        h.insert("x-tier", HeaderValue::from_static("gold"));
        f.check.authenticate(&mut h, now()).unwrap();
        assert_eq!(h.get_all("x-user").iter().collect::<Vec<_>>(), ["alice"]);
        assert!(h.get("x-tier").is_none(), "the token has no tier claim");

        // A non-ASCII name is copied as UTF-8; a control character cannot
        // be in a header, so that claim sets none.
        let mut h = bearer(&f.ec.sign(&claims(json!({"sub": "Zoë", "tier": "a\nb"}))));
        h.insert("x-tier", HeaderValue::from_static("gold"));
        f.check.authenticate(&mut h, now()).unwrap();
        assert_eq!(h["x-user"].as_bytes(), "Zoë".as_bytes());
        assert!(h.get("x-tier").is_none());
        assert!(
            h.contains_key(header::AUTHORIZATION),
            "kept for the backend"
        );
    }

    #[test]
    fn a_key_set_without_a_usable_key_is_refused_naming_the_route() {
        let refuse =
            |jwks: &str| JwtCheck::compile(&rule(jwks.into()), "HTTPRoute/shop/api").unwrap_err();
        let e = refuse(r#"{"keys": []}"#);
        assert!(
            e.starts_with("HTTPRoute/shop/api jwt:") && e.contains("no usable key"),
            "{e}"
        );
        let e = refuse(r#"{"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}"#);
        assert!(e.contains("key \"s\" is a shared secret"), "{e}");
        let e = refuse("not json");
        assert!(e.contains("not a JSON Web Key Set"), "{e}");
        let mut enc = TestKey::ec("enc").jwk;
        enc.common.public_key_use = Some(PublicKeyUse::Encryption);
        let e = refuse(&json!({"keys": [enc]}).to_string());
        assert!(e.contains("is for encryption"), "{e}");
    }

    #[test]
    fn the_challenge_keeps_to_the_quoted_string_grammar() {
        let r = Refusal::invalid_token("unknown key id \"a\\b\u{1}\"".into());
        assert_eq!(
            r.www_authenticate(),
            "Bearer realm=\"trellis\", error=\"invalid_token\", error_description=\"unknown key id 'a'b?'\""
        );
        let rsp = r.into_response();
        assert_eq!(rsp.status(), StatusCode::UNAUTHORIZED);
        assert!(rsp.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
