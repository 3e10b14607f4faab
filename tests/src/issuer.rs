//! A token issuer made by the test: an ES256 key pair of its own, its
//! public half as a JSON Web Key Set (for an EdgePolicy's Secret), tokens
//! signed with the private half, as a login service would sign them.

use serde_json::json;

use anyhow::Result;

use crate::shop::{run, run_with_input};

/// The issuer (`iss`) of every token, as examples/shop/gateway.yaml's
/// EdgePolicy expects it.
pub const ISSUER: &str = "https://login.shop.example";
/// The audience (`aud`) of every token.
pub const AUDIENCE: &str = "shop";
/// The key id in the key set and in each token's header.
const KEY_ID: &str = "shop-login-1";

/// A key pair and what it signs.
pub struct Issuer {
    key: jsonwebtoken::EncodingKey,
    /// The public key as a JSON Web Key Set (RFC 7517).
    pub jwks: String,
}

impl Issuer {
    /// A fresh P-256 key pair.
    pub fn new() -> Self {
        use jsonwebtoken::{Algorithm, EncodingKey, jwk::Jwk};
        let pair =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key pair");
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
            .expect("rcgen's PEM is a valid EC key");
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("an ES256 JWK");
        jwk.common.key_id = Some(KEY_ID.into());
        let jwks = json!({ "keys": [jwk] }).to_string();
        Self { key, jwks }
    }

    /// A token for subject `sub`, valid for ten minutes.
    pub fn token(&self, sub: &str) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "exp": now + 600 });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(KEY_ID.into());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("signing a token")
    }

    /// Stores the key set as Secret `name` (key `jwks.json`) in `namespace`,
    /// replacing one there. Through stdin, so the key set is in no
    /// process's arguments.
    pub fn store(&self, namespace: &str, name: &str) -> Result<()> {
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": { "name": name, "namespace": namespace },
            "stringData": { "jwks.json": self.jwks },
        });
        let _ = run(crate::kubectl().args([
            "delete",
            "secret",
            name,
            "-n",
            namespace,
            "--ignore-not-found",
        ]))?;
        run_with_input(
            crate::kubectl().args(["create", "-f", "-"]),
            &secret.to_string(),
        )?;
        Ok(())
    }
}

impl Default for Issuer {
    fn default() -> Self {
        Self::new()
    }
}
