//! Configuration: a TOML file (`--config FILE`, else `./clustermail.toml` if
//! present, else built-in defaults that run on a laptop). This module owns the
//! file as a whole (loading, `config check`, live groups); `smtp`, `routing` and
//! `ha` the settings of those sections.
//!
//! Every struct denies unknown keys, so a misspelt setting is an error naming the
//! key and line instead of a silently ignored line. Durations are written as
//! `"30s"`, `"5m"`, `"1h"`.
//!
//! Secrets are [`Secret`]s: whatever prints them (`config check`, logs, errors,
//! `Debug`) shows `<redacted>`. Each may be given in the file itself or, so that
//! the config file can be world-readable, in a file of its own (`*_file`).

use crate::catalog::LocalPartMatch;
use anyhow::{bail, Context, Result};

mod ha;
mod routing;
mod secret;
mod smtp;

pub use ha::{HaConfig, HaRole, InactiveSmtp, OnFailure, ShadowMode};
pub use routing::{FailoverScope, RoutingConfig};
pub use secret::Secret;
use serde::{Deserialize, Serialize};
pub use smtp::{BareLineEndings, ByteSize, LongLines, SmtpConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default config file looked for in the working directory.
pub const DEFAULT_FILE: &str = "clustermail.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The name this router gives in its greeting and Received headers.
    pub router_name: String,
    /// Where the sled store (catalog and queue) lives.
    pub data_dir: PathBuf,
    /// How local parts of addresses are compared: `case-insensitive` or `exact`.
    pub local_part_match: LocalPartMatch,
    /// Memory sled may use for its page cache, in MiB.
    pub store_cache_mb: u64,
    /// Prometheus text endpoint `IP:port` (`GET /metrics`); unset: none. Keep it
    /// on loopback or a management network: it has no authentication.
    pub metrics_listen: Option<String>,
    pub smtp: SmtpConfig,
    pub routing: RoutingConfig,
    pub tracking: TrackingConfig,
    /// Active-passive pair of routers; absent: this router runs alone.
    pub ha: Option<HaConfig>,
    pub web: WebConfig,
    /// LDAP directory the catalog is synced from; absent: catalog files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory: Option<crate::directory::DirectoryConfig>,
}

/// `[web]`: the web console (dashboard, queue, servers, HA) and its JSON API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// `IP:port` of the console; `""` turns it off.
    pub listen: String,
    /// PEM certificate chain: the console speaks HTTPS when set (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// How long a console login lasts (server-side expiry).
    #[serde(with = "humantime_serde")]
    pub session_lifetime: Duration,
}

impl WebConfig {
    fn check(&self) -> Result<()> {
        if !self.listen.is_empty() {
            self.listen.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!(
                    "web.listen: {:?} is not an IP:port (\"\" turns the console off)",
                    self.listen
                )
            })?;
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("web.tls_cert and web.tls_key go together: set both or neither");
        }
        if self.session_lifetime.is_zero() {
            bail!("web.session_lifetime must be above 0");
        }
        Ok(())
    }
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: "127.0.0.1:8025".into(),
            tls_cert: None,
            tls_key: None,
            session_lifetime: Duration::from_secs(8 * 3600),
        }
    }
}

/// `[tracking]`: the message-tracking history (`clustermail track`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    /// How long a message's history is kept after its last event.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            retention: Duration::from_secs(7 * 86_400),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            router_name: default_router_name(),
            data_dir: PathBuf::from("./data"),
            local_part_match: LocalPartMatch::CaseInsensitive,
            store_cache_mb: 64,
            metrics_listen: None,
            smtp: SmtpConfig::default(),
            routing: RoutingConfig::default(),
            tracking: TrackingConfig::default(),
            ha: None,
            directory: None,
            web: WebConfig::default(),
        }
    }
}

fn default_router_name() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A group of settings that a reload replaces while the router runs: readers
/// take the current value (and keep it for what they are doing).
#[derive(Debug)]
pub struct Live<T>(std::sync::RwLock<std::sync::Arc<T>>);

impl<T> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live(std::sync::RwLock::new(std::sync::Arc::new(value)))
    }

    pub fn get(&self) -> std::sync::Arc<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(value);
    }
}

/// Where the effective config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Defaults,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Defaults => f.write_str("built-in defaults"),
        }
    }
}

impl Config {
    /// Loads `path`, else `./clustermail.toml` if present, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<(Config, Source)> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_FILE).exists() => PathBuf::from(DEFAULT_FILE),
            None => return Ok((Config::default(), Source::Defaults)),
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))?;
        Ok((config, Source::File(path)))
    }

    /// The defaults with only `data_dir` read from the config file (as far as it
    /// can be read): where `clustermail reload` finds the running router when
    /// the file has errors.
    pub fn with_data_dir_of(path: Option<&Path>) -> Config {
        let mut config = Config::default();
        let path = path.unwrap_or(Path::new(DEFAULT_FILE));
        let dir = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
            .and_then(|t| t.get("data_dir")?.as_str().map(PathBuf::from));
        if let Some(dir) = dir {
            config.data_dir = dir;
        }
        config
    }

    /// Parses and checks a config text; errors read `LINE: problem`.
    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    text.as_bytes()[..s.start.min(text.len())]
                        .iter()
                        .filter(|b| **b == b'\n')
                        .count()
                        + 1
                })
                .unwrap_or(1);
            anyhow::anyhow!("{line}: {}", e.message())
        })?;
        let mut config = config;
        config
            .read_secret_files()
            .and_then(|()| config.check())
            .map_err(|e| anyhow::anyhow!(" {e:#}"))?;
        Ok(config)
    }

    /// Reads every secret given as a file (`ha.password_file`).
    fn read_secret_files(&mut self) -> Result<()> {
        if let Some(ha) = &mut self.ha {
            if let Some(file) = &ha.password_file {
                if !ha.password.is_empty() {
                    bail!("ha.password and ha.password_file: give one, not both");
                }
                ha.password = Secret::read_file("ha.password_file", file)?;
            }
        }
        Ok(())
    }

    /// Checks values that TOML types alone cannot.
    pub fn check(&self) -> Result<()> {
        if self.router_name.trim().is_empty() {
            bail!("router_name is empty");
        }
        crate::catalog::model::check_domain(&self.router_name)
            .or_else(|_| crate::catalog::model::check_name("router", &self.router_name))
            .map_err(|e| anyhow::anyhow!("router_name: {e}"))?;
        self.smtp.check()?;
        if let Some(ha) = &self.ha {
            ha.check()?;
        }
        if let Some(d) = &self.directory {
            d.check().map_err(anyhow::Error::msg)?;
        }
        if let Some(m) = &self.metrics_listen {
            m.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!("metrics_listen: {m:?} is not an IP:port (e.g. 127.0.0.1:9125)")
            })?;
        }
        self.web.check()?;
        self.routing.check()?;
        Ok(())
    }

    /// The effective config as TOML, for `config check`.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Listen addresses, already checked by [`Config::check`].
    pub fn listen_addrs(&self) -> Result<Vec<SocketAddr>> {
        self.smtp
            .listen
            .iter()
            .map(|l| l.parse().with_context(|| format!("smtp.listen: {l:?}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_on_a_laptop() {
        let c = Config::default();
        c.check().expect("defaults are valid");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".to_string()]);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse("router_name = \"mx\"\n[smtp]\nmax_recipient = 5\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("3:"), "{msg}");
        assert!(msg.contains("max_recipient"), "{msg}");
    }

    #[test]
    fn durations_and_round_trip() {
        let c =
            Config::parse("[smtp]\ncommand_timeout = \"2m\"\ndata_timeout = \"45s\"\n").unwrap();
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(120));
        assert_eq!(c.smtp.data_timeout, Duration::from_secs(45));
        let again = Config::parse(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn sizes_take_units_and_round_trip() {
        for (text, want) in [
            ("\"256MiB\"", 256 << 20),
            ("\"65536 KiB\"", 64 << 20),
            ("\"1gIB\"", 1 << 30),
            ("\"100MB\"", 100_000_000),
            ("\"2097152B\"", 2 << 20),
            ("3145728", 3 << 20),
        ] {
            let c = Config::parse(&format!("[smtp]\nmax_data_in_flight = {text}\n")).unwrap();
            assert_eq!(c.smtp.max_data_in_flight, ByteSize(want), "{text}");
            assert_eq!(Config::parse(&c.to_toml().unwrap()).unwrap(), c, "{text}");
        }
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
        assert_eq!(ByteSize(1_500_000).to_string(), "1500000B");
        assert_eq!(
            Config::default().smtp.transaction_timeout,
            Duration::from_secs(600)
        );
    }

    #[test]
    fn failover_scope_takes_names_and_booleans() {
        for (text, want) in [
            ("true", FailoverScope::LastHop),
            ("false", FailoverScope::Off),
            ("\"off\"", FailoverScope::Off),
            ("\"last-hop\"", FailoverScope::LastHop),
            ("\"all-hops\"", FailoverScope::AllHops),
        ] {
            let c = Config::parse(&format!("[routing]\nfailover = {text}\n")).unwrap();
            assert_eq!(c.routing.failover, want, "{text}");
            assert_eq!(
                Config::parse(&c.to_toml().unwrap()).unwrap(),
                c,
                "round trip"
            );
        }
        assert_eq!(Config::default().routing.failover, FailoverScope::LastHop);
    }

    #[test]
    fn secrets_are_never_printed() {
        let ha =
            "[ha]\nmode = \"primary\"\nlisten = \"127.0.0.1:2700\"\npeer = \"127.0.0.1:2701\"\n\
                  peer_smtp = \"127.0.0.1:25\"\n";
        let c = Config::parse(&format!("{ha}password = \"hunter2-hunter2\"\n")).unwrap();
        let pw = &c.ha.as_ref().unwrap().password;
        assert_eq!(pw.expose(), "hunter2-hunter2");
        for shown in [format!("{c:?}"), c.to_toml().unwrap(), pw.to_string()] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert!(c.to_toml().unwrap().contains("password = \"<redacted>\""));
        // A wrong type is refused without echoing the value.
        let err = Config::parse(&format!("{ha}password = 12345678901\n")).unwrap_err();
        assert!(!format!("{err:#}").contains("12345678901"), "{err:#}");
        let err = Config::parse(ha).unwrap_err();
        assert!(format!("{err:#}").contains("ha.password"), "{err:#}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, needle) in [
            ("[smtp]\nlisten = [\"nowhere\"]\n", "smtp.listen"),
            ("[smtp]\ntls_cert = \"c.pem\"\n", "tls_key"),
            ("[smtp]\nmax_recipients = 0\n", "max_recipients"),
            ("[smtp]\nmax_data_in_flight = \"lots\"\n", "lots"),
            ("[smtp]\nmax_data_in_flight = \"256Mb\"\n", "256Mb"),
            ("[smtp]\nmax_data_in_flight = \"1KiB\"\n", "at least 1MiB"),
            (
                "[smtp]\ntransaction_timeout = \"0s\"\n",
                "transaction_timeout",
            ),
            ("local_part_match = \"sometimes\"\n", "sometimes"),
            ("[routing]\nfailover = \"some-hops\"\n", "some-hops"),
            ("[web]\nlisten = \"console\"\n", "web.listen"),
            ("[web]\ntls_key = \"k.pem\"\n", "web.tls_cert"),
        ] {
            let msg = Config::parse(text).unwrap_err().to_string();
            assert!(msg.contains(needle), "{text}: {msg}");
        }
    }
}
