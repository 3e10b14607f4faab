//! The application's configuration: the `<name>-config` ConfigMap the app
//! container reads, and the checksum of it put on the pod template.
//! Separate because the config reaches running pods by two routes, and both
//! are decided here: the ConfigMap's content, and the checksum that rolls
//! the pods when the content changes (unless `spec.hotReload` is set).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use sha2::{Digest, Sha256};

use super::{Renderer, config_map_name};

/// The sha256 (hex) of the application config, as put on the pod template.
pub fn config_checksum(config: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    // Length-prefixed so that {"a": "bc"} and {"ab": "c"} differ.
    for (k, v) in config {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    hex::encode(h.finalize())
}

impl Renderer<'_> {
    /// `<name>-config`: `spec.config` as it is.
    pub(super) fn config_map(&self) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(config_map_name(&self.name)),
            data: Some(self.ms.spec.config.clone()),
            ..ConfigMap::default()
        }
    }
}
