//! The Secrets the application reads (`spec.secrets`): their `envFrom`
//! sources, their read-only volumes and mounts, and the checksum on the pod
//! template that rolls the pods when one of them changes. Separate because
//! this is the one place a MicroService touches Secrets, and it does so by
//! name only: the kubelet reads the values, the operator never does. What
//! the operator knows of a Secret is its uid and resourceVersion
//! ([`SecretVersions`]), which is enough to tell that it changed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvFromSource, SecretEnvSource, SecretVolumeSource, Volume, VolumeMount,
};
use sha2::{Digest, Sha256};

use super::{Renderer, SECRETS_MOUNT};
use crate::crd::SecretRef;

/// The file mode of a Secret's files: read by the owner (root) and the
/// group, nobody else. The pod's `fsGroup` is the app's group
/// ([`super::RUN_AS`]), so the kubelet gives the files that group and the
/// app, which runs as that group, reads them; 0440 rather than the
/// kubelet's default 0644, so no other user in the container can.
pub const SECRET_FILE_MODE: i32 = 0o440;

/// What the operator knows of the Secrets a MicroService lists: for each one
/// that exists, its uid and resourceVersion, read from the Secret's metadata
/// alone. A Secret that is not here does not exist (as far as the reader
/// knows). The checksum on the pod template is computed from these, so a
/// change of a Secret, which always gets a new resourceVersion (and a
/// re-created one a new uid too), rolls the pods without the operator ever
/// holding a value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretVersions(BTreeMap<String, String>);

impl SecretVersions {
    /// Knows of no Secret.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the Secret `name` exists with this uid and resourceVersion.
    pub fn insert(&mut self, name: impl Into<String>, uid: &str, resource_version: &str) {
        self.0
            .insert(name.into(), format!("{uid}/{resource_version}"));
    }

    /// Whether the Secret `name` is known to exist.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The Secrets of `refs` not known to exist, in the order listed.
    pub fn missing<'a>(&self, refs: &'a [SecretRef]) -> Vec<&'a str> {
        refs.iter()
            .map(|r| r.name.as_str())
            .filter(|name| !self.contains(name))
            .collect()
    }
}

/// The sha256 (hex) of the listed Secrets' names and versions, as put on the
/// pod template: it changes when a listed Secret is changed, deleted,
/// re-created or first created, and when the list of names changes; not
/// when any other Secret does.
pub fn secrets_checksum(refs: &[SecretRef], versions: &SecretVersions) -> String {
    let mut h = Sha256::new();
    let mut names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    for name in names {
        let version = versions.0.get(name).map_or("absent", String::as_str);
        // Length-prefixed, as the config checksum, so no two lists collide.
        for part in [name, version] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// The name of the volume of the `index`th entry of `spec.secrets`. A
/// Secret's name may be longer than a volume name may be (253 characters,
/// dots) so the volume is named by its place in the list.
fn volume_name(index: usize) -> String {
    format!("secret-{index}")
}

impl Renderer<'_> {
    /// The `envFrom` sources of the Secrets given as environment variables,
    /// in the order listed (a later source wins a key both have). Not
    /// optional: a pod never starts without them.
    pub(super) fn secret_env_sources(&self) -> impl Iterator<Item = EnvFromSource> + '_ {
        self.ms
            .spec
            .secrets
            .iter()
            .filter(|r| r.env)
            .map(|r| EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: r.name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            })
    }

    /// The volumes of the Secrets given as files.
    pub(super) fn secret_volumes(&self) -> impl Iterator<Item = Volume> + '_ {
        self.files().map(|(index, r)| Volume {
            name: volume_name(index),
            secret: Some(SecretVolumeSource {
                secret_name: Some(r.name.clone()),
                default_mode: Some(SECRET_FILE_MODE),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        })
    }

    /// The app container's read-only mounts of those volumes, at
    /// `/etc/trellis/secrets/<name>`.
    pub(super) fn secret_mounts(&self) -> impl Iterator<Item = VolumeMount> + '_ {
        self.files().map(|(index, r)| VolumeMount {
            name: volume_name(index),
            mount_path: format!("{SECRETS_MOUNT}/{}", r.name),
            read_only: Some(true),
            ..VolumeMount::default()
        })
    }

    fn files(&self) -> impl Iterator<Item = (usize, &SecretRef)> + '_ {
        self.ms
            .spec
            .secrets
            .iter()
            .enumerate()
            .filter(|(_, r)| r.files)
    }

    /// The pod template's secrets checksum, when the pods roll on a Secret's
    /// change: some Secret is listed and `hotReload` is off. A MicroService
    /// that lists none gets no annotation, so its pods do not roll when the
    /// operator is upgraded to one that knows about Secrets.
    pub(super) fn secrets_checksum(&self) -> Option<String> {
        let spec = &self.ms.spec;
        (!spec.secrets.is_empty() && !spec.hot_reload)
            .then(|| secrets_checksum(&spec.secrets, self.secrets))
    }
}
