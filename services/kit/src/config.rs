//! Configuration: environment variables first, then files in the mounted
//! config directory (`/etc/trellis/config`, where the operator puts
//! `spec.config`; `TRELLIS_CONFIG_DIR` overrides the path).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
};

/// Where the operator mounts `spec.config` as files.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/trellis/config";

/// A service's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The service's name, e.g. `user`.
    pub service: String,
    /// The port to listen on (`PORT`, default 8080).
    pub port: u16,
    /// The address to listen on (`LISTEN_ADDR`, default `127.0.0.1`). In a
    /// pod the sidecar is the only way in: it forwards to 127.0.0.1 (its
    /// `TRELLIS_APP_HOST`), and an app that listened on the pod's address
    /// could be called past the sidecar's rate and concurrency limits.
    pub listen: IpAddr,
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
        Self::load(service, dir)
    }

    /// Reads the settings of service `service` from the environment and the
    /// config directory `dir`.
    pub fn load(service: &str, dir: PathBuf) -> anyhow::Result<Self> {
        let mut cfg = Self {
            service: service.to_owned(),
            port: 8080,
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
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
        if let Some(addr) = cfg.get("LISTEN_ADDR") {
            cfg.listen = addr.trim().parse().map_err(|e| {
                anyhow::anyhow!(
                    "LISTEN_ADDR={addr:?} is not an IP address ({e}): give one such as 127.0.0.1, or unset it for loopback"
                )
            })?;
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

    /// Where to listen: `listen` and `port`.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen, self.port)
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
        if std::env::var_os("LISTEN_ADDR").is_none() && std::env::var_os("PORT").is_none() {
            assert_eq!(cfg.listen_addr().to_string(), "127.0.0.1:8080");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_listen_address_is_loopback_unless_set() {
        let dir = std::env::temp_dir().join(format!("kit-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if std::env::var_os("LISTEN_ADDR").is_none() {
            let cfg = Config::load("t", dir.clone()).unwrap();
            assert_eq!(cfg.listen, IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        std::fs::write(dir.join("LISTEN_ADDR"), "0.0.0.0\n").unwrap();
        let cfg = Config::load("t", dir.clone()).unwrap();
        assert_eq!(cfg.listen, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        std::fs::write(dir.join("LISTEN_ADDR"), "pod-ip").unwrap();
        let e = Config::load("t", dir.clone()).unwrap_err().to_string();
        assert!(
            e.starts_with("LISTEN_ADDR=\"pod-ip\" is not an IP address"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
