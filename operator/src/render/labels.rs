//! The labels and metadata every child carries: the recommended
//! `app.kubernetes.io/*` labels, the pod selector and the owner reference.
//! Separate because every other module builds its object's metadata from
//! here, and because which labels go where is a contract of its own: the
//! selector must never change, and only the Deployment and its pods carry
//! the version.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{FIELD_MANAGER, MANAGED_BY_LABEL, Renderer};

/// The `app.kubernetes.io/version` label: the image tag, made a valid label value.
pub fn image_version(image: &str) -> Option<String> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_segment = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let tag = match last_segment.rsplit_once(':') {
        Some((_, tag)) => tag,
        None if image.contains('@') => return None,
        None => "latest",
    };
    let mut v: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    let v = v.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    (!v.is_empty()).then(|| v.to_owned())
}

/// The labels that select a MicroService's pods (stable across updates).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), name.into()),
        ("app.kubernetes.io/instance".into(), name.into()),
    ])
}

impl Renderer<'_> {
    /// The recommended labels every child carries.
    pub(super) fn labels(&self) -> BTreeMap<String, String> {
        let mut l = selector_labels(&self.name);
        l.insert("app.kubernetes.io/part-of".into(), "trellis".into());
        l.insert(MANAGED_BY_LABEL.into(), FIELD_MANAGER.into());
        l
    }

    /// The labels of the Deployment and its pods: those of every child plus
    /// `app.kubernetes.io/version`. Only the versioned objects carry it, so an
    /// image update rewrites the Deployment and nothing else.
    pub(super) fn versioned_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels();
        if let Some(v) = image_version(&self.ms.spec.image) {
            l.insert("app.kubernetes.io/version".into(), v);
        }
        l
    }

    /// The metadata of a child named `name`: its namespace, the labels of
    /// every child and the MicroService as its controlling owner.
    pub(super) fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.ns.clone()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}
