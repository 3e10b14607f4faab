//! Configuration: environment variables first, then files in the mounted
//! config directory (`/etc/trellis/config`, where the operator puts
//! `spec.config`; `TRELLIS_CONFIG_DIR` overrides the path).

use std::path::PathBuf;

/// Where the operator mounts `spec.config` as files.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/trellis/config";

/// A service's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The service's name, e.g. `user`.
    pub service: String,
    /// The port to listen on (`PORT`, default 8080), on all interfaces.
    pub port: u16,
    /// `DATABASE_URL`: PostgreSQL when it starts with `postgres://`, else SQLite;
    /// default `sqlite:<service>.db?mode=rwc`, a file in the working directory.
    pub database_url: String,
    /// The sidecar's outbound listener (`TRELLIS_OUTBOUND`), default `http://127.0.0.1:15001`.
    pub outbound: String,
    dir: PathBuf,
}

impl Config {
    /// Reads the settings of service `service`.
    pub fn from_env(service: &str) -> anyhow::Result<Self> {
        let dir = std::env::var_os("TRELLIS_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR));
        let mut cfg = Self {
            service: service.to_owned(),
            port: 8080,
            database_url: format!("sqlite:{service}.db?mode=rwc"),
            outbound: "http://127.0.0.1:15001".to_owned(),
            dir,
        };
        if let Some(port) = cfg.get("PORT") {
            cfg.port = port
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("PORT={port:?} is not a port: {e}"))?;
        }
        if let Some(url) = cfg.get("DATABASE_URL") {
            cfg.database_url = url.trim().to_owned();
        }
        if let Some(url) = cfg.get("TRELLIS_OUTBOUND") {
            cfg.outbound = url.trim().trim_end_matches('/').to_owned();
        }
        Ok(cfg)
    }

    /// A setting: the environment variable `key`, else the file `key` in the
    /// config directory (trimmed), else `None`.
    pub fn get(&self, key: &str) -> Option<String> {
        if let Ok(v) = std::env::var(key)
            && !v.is_empty()
        {
            return Some(v);
        }
        std::fs::read_to_string(self.dir.join(key))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    /// A config directory other than the default, for tests.
    pub fn with_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = dir.into();
        self
    }

    /// The outbound listener as a socket address (`host:port` of `outbound`).
    pub fn outbound_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        let hostport = self
            .outbound
            .strip_prefix("http://")
            .unwrap_or(&self.outbound)
            .trim_end_matches('/');
        hostport
            .parse()
            .map_err(|e| anyhow::anyhow!("TRELLIS_OUTBOUND={:?}: {e}", self.outbound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_in_the_config_dir_are_settings() {
        let dir = std::env::temp_dir().join(format!("kit-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("GREETING"), "hello\n").unwrap();
        let cfg = Config::from_env("t").unwrap().with_dir(&dir);
        assert_eq!(cfg.get("GREETING").as_deref(), Some("hello"));
        assert_eq!(cfg.get("NOPE_NOT_SET_ANYWHERE"), None);
        assert_eq!(cfg.outbound_addr().unwrap().to_string(), "127.0.0.1:15001");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
