//! Where the issuer and the trust bundle live: the Secret
//! `trellis-identity-issuer` (`ca.crt`, `ca.key`), readable by the identity
//! service alone, and the ConfigMap `trellis-trust-bundle`
//! (`ca-bundle.crt`), public, which the operator copies into every
//! sidecar's policy. On first start, when neither exists, the service makes
//! a root and writes both; after that both belong to the user, and a root
//! rotation is edits of these two objects (docs/security.md).

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use trellis_identity::Issuer;

/// The issuer's Secret.
pub const ISSUER_SECRET: &str = "trellis-identity-issuer";
/// The trust bundle's ConfigMap.
pub const TRUST_BUNDLE: &str = "trellis-trust-bundle";
/// The bundle's key in it.
pub const TRUST_BUNDLE_KEY: &str = "ca-bundle.crt";

/// How long a root made here is valid.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The issuer from its Secret, and the Secret's resourceVersion.
pub async fn load(client: &Client, namespace: &str) -> anyhow::Result<Option<(Issuer, String)>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = secrets.get_opt(ISSUER_SECRET).await? else {
        return Ok(None);
    };
    let version = secret.metadata.resource_version.clone().unwrap_or_default();
    let (Some(cert), Some(key)) = (text(&secret, "ca.crt"), text(&secret, "ca.key")) else {
        anyhow::bail!("Secret {namespace}/{ISSUER_SECRET} needs the keys ca.crt and ca.key (PEM)");
    };
    let issuer = Issuer::from_pem(&cert, &key)
        .with_context(|| format!("Secret {namespace}/{ISSUER_SECRET}"))?;
    Ok(Some((issuer, version)))
}

/// The issuer, made and stored with its bundle when there is none yet.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    trust_domain: &str,
) -> anyhow::Result<(Issuer, String)> {
    if let Some(found) = load(client, namespace).await? {
        return Ok(found);
    }
    let root = Issuer::new_root(trust_domain, ROOT_VALIDITY)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(ISSUER_SECRET.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".into(),
                "trellis".into(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                "ca.crt".into(),
                ByteString(root.cert_pem().as_bytes().to_vec()),
            ),
            ("ca.key".into(), ByteString(root.key_pem().into_bytes())),
        ])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => tracing::info!(secret = ISSUER_SECRET, "made a new root for the mesh"),
        // Another replica made one first: use it.
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).context("cannot store the new root"),
    }
    let (issuer, version) = load(client, namespace)
        .await?
        .context("the issuer Secret vanished after it was made")?;
    let bundles: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let bundle = ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            TRUST_BUNDLE_KEY.into(),
            issuer.cert_pem().to_owned(),
        )])),
        ..ConfigMap::default()
    };
    match bundles.create(&PostParams::default(), &bundle).await {
        Ok(_) => tracing::info!(configmap = TRUST_BUNDLE, "published the trust bundle"),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).context("cannot publish the trust bundle"),
    }
    Ok((issuer, version))
}
