//! Configuration: a TOML file (`--config FILE`, else `./clustermail.toml` if
//! present, else built-in defaults that run on a laptop).
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

mod secret;
pub use secret::Secret;
use serde::{Deserialize, Serialize};
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

/// This unit's configured role in the HA pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HaRole {
    Primary,
    Secondary,
}

/// What a unit does when it finds that it has failed (its peer took over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// OFF: process nothing until an administrator sets the mode.
    Off,
    /// FAILED, then back to the configured mode once the peer sees this unit's
    /// SMTP service again.
    Restore,
    /// FAILED, then SLAVE as soon as the peer answers; the queue is pushed to it.
    #[default]
    Slave,
}

/// `[ha]`: the active-passive pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// `primary` or `secondary`.
    pub mode: HaRole,
    /// Where this unit's HA link listens, `IP:port` (not the SMTP port).
    pub listen: String,
    /// The peer's HA link, `host:port`.
    pub peer: String,
    /// The peer's SMTP service, `host:port`, checked every heartbeat (remote
    /// service monitoring).
    pub peer_smtp: String,
    /// Shared secret: the HA link (heartbeats, queue push, catalog sync) is
    /// refused to a peer without it. Here or in `password_file`, not both.
    #[serde(default, skip_serializing_if = "Secret::not_shown")]
    pub password: Secret,
    /// A file holding the password (trailing line ends ignored), readable by the
    /// router's user only; the config file itself then holds no secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Missed heartbeats (or failed SMTP checks of the MASTER) before acting.
    #[serde(default = "default_heartbeat_lost")]
    pub heartbeat_lost: u32,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// SMTP while not MASTER: `refuse` (listen, answer 421 4.3.2) or `closed`
    /// (stop listening, so that clients move on to the next MX at once).
    #[serde(default)]
    pub inactive_smtp: InactiveSmtp,
    /// Program run on every effective-mode change with the new mode, the old
    /// mode and the epoch as arguments (and `CLUSTERMAIL_HA_*` variables): to
    /// move a virtual IP (see `packaging/ha-vip.sh`).
    #[serde(default)]
    pub on_change: Option<PathBuf>,
    /// Local service monitoring: a MASTER with less free space than this on the
    /// data disk gives up (`on_failure`), as one whose store cannot be written or
    /// whose SMTP listener does not greet.
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk: ByteSize,
    /// How long `on_change` may run before it is killed.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub on_change_timeout: Duration,
    /// Shadow redundancy (`ha::shadow`): the 250 after DATA waits for the SLAVE's
    /// durable copy (`preferred`: unless it cannot be had; `required`: or 451).
    #[serde(default)]
    pub shadow: ShadowMode,
    /// How often, at least, the MASTER tells the SLAVE which shadows to drop
    /// (messages delivered, bounced or deleted): the duplicate window of a takeover.
    #[serde(default = "default_release_interval", with = "humantime_serde")]
    pub shadow_release_interval: Duration,
}

/// `ha.shadow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ShadowMode {
    /// No shadow copies: mail acknowledged by a MASTER whose disk is lost is lost.
    Off,
    /// A shadow copy before the 250 whenever the peer is SLAVE and answers;
    /// otherwise accepted without one (the unit is degraded).
    #[default]
    Preferred,
    /// No 250 without a shadow copy: 451 4.3.0 instead.
    Required,
}

fn default_release_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_min_free_disk() -> ByteSize {
    ByteSize(1 << 30)
}

fn default_hook_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InactiveSmtp {
    #[default]
    Refuse,
    Closed,
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}

fn default_heartbeat_lost() -> u32 {
    3
}

/// Routing, availability and retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Failover scope (Domino's three settings): `off` never fails over; `last-hop`
    /// fails over to a replica of the recipient's mailbox server; `all-hops` also
    /// tries another router of a foreign cluster when its first router is
    /// unreachable. `true` and `false` are read as `last-hop` and `off`.
    pub failover: FailoverScope,
    /// Let retries of held mail fail over too (Domino retries the home only).
    pub retry_failover: bool,
    /// How often every catalog server is probed.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A probe (connect, greeting) slower than this fails.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// A greeting slower than this marks the server busy.
    #[serde(with = "humantime_serde")]
    pub busy_threshold: Duration,
    /// Availability index (0–100) below which an up server counts as busy; 0:
    /// never. A server may set its own in the catalog.
    pub availability_threshold: u8,
    /// Good probes in a row before a server that was down or busy is up again.
    pub rise: u32,
    /// First retry of held mail; doubles with each attempt up to `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Mail still undelivered after this long fails (expired).
    #[serde(with = "humantime_serde")]
    pub max_queue_lifetime: Duration,
    /// Per SMTP step of a delivery (all but the reply to the data).
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// For the server's reply to the final "." of the data (RFC 5321
    /// §4.5.3.2.6: 10 minutes).
    #[serde(with = "humantime_serde")]
    pub final_reply_timeout: Duration,
    /// Messages being delivered at once (all destinations).
    pub max_deliveries: usize,
    /// Transactions running against one server at once (and connections kept
    /// open to it for reuse).
    pub max_per_server: usize,
    /// A message with more Received headers than this is refused (554 5.4.6): a loop.
    pub max_hops: usize,
    /// Where mail for addresses outside the catalog goes (bounces to outside
    /// senders), `host:port`; unset: the domain's MX hosts.
    pub relay_host: Option<String>,
    /// The cluster this router serves: mail homed in another cluster goes to the
    /// routers the catalog names for that cluster. Unset: every cluster is local.
    pub local_cluster: Option<String>,
    /// A permanent failure or expiry keeps the recipient in the queue as
    /// undeliverable for an administrator (`queue release|bounce|delete`) instead of
    /// bouncing it.
    pub hold_undeliverable: bool,
    /// The catalog server this router runs beside (Domino: the local server): when
    /// a home is unusable, a replica on it is chosen before any other.
    pub local_server: Option<String>,
    /// A recipient still not delivered this long after arrival gets one delay
    /// report (DSN `Action: delayed`) sent to the sender; 0: never.
    #[serde(with = "humantime_serde")]
    pub delay_warning: Duration,
    /// Where held mail older than `fallback_after` goes instead of waiting until
    /// it expires, `host:port` (Postfix's `smtp_fallback_relay`); unset: none.
    pub fallback_relay: Option<String>,
    #[serde(with = "humantime_serde")]
    pub fallback_after: Duration,
    /// PEM CA certificates that verify servers with `tls = "required"`; unset:
    /// the system's CA bundle.
    pub tls_ca_file: Option<PathBuf>,
}

impl RoutingConfig {
    /// The settings the routing decision needs.
    pub fn policy(&self) -> crate::route::Policy {
        crate::route::Policy {
            failover: self.failover != FailoverScope::Off,
            all_hops: self.failover == FailoverScope::AllHops,
            retry_failover: self.retry_failover,
            local_cluster: self.local_cluster.clone(),
            local_server: self.local_server.clone(),
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            failover: FailoverScope::LastHop,
            retry_failover: false,
            probe_interval: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(5),
            busy_threshold: Duration::from_secs(2),
            availability_threshold: 0,
            rise: 2,
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_queue_lifetime: Duration::from_secs(5 * 86_400),
            delivery_timeout: Duration::from_secs(30),
            final_reply_timeout: Duration::from_secs(600),
            max_deliveries: 20,
            max_per_server: 5,
            max_hops: 25,
            relay_host: None,
            local_cluster: None,
            local_server: None,
            hold_undeliverable: false,
            delay_warning: Duration::from_secs(4 * 3600),
            fallback_relay: None,
            fallback_after: Duration::from_secs(86_400),
            tls_ca_file: None,
        }
    }
}

/// The inbound SMTP service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Addresses to listen on (IPv4 and IPv6), `host:port`.
    pub listen: Vec<String>,
    /// Largest message accepted, in octets (advertised as SIZE).
    pub max_message_size: u64,
    /// Most recipients in one transaction; more get 452 4.5.3.
    pub max_recipients: usize,
    /// Most simultaneous connections; more get 421 4.7.0.
    pub max_connections: usize,
    /// Most simultaneous connections from one IP address; more get 421 4.7.0.
    pub max_connections_per_ip: usize,
    /// Most bad commands in one session before it is closed with 421.
    pub max_errors: usize,
    /// What to do with a message text line over 998 octets: `reject` (550 5.6.0
    /// after the data) or `accept` (kept byte for byte; never truncated).
    pub long_lines: LongLines,
    /// What to do with a message holding a bare CR or bare LF (RFC 5321 §2.3.8),
    /// which downstream servers could read as line ends (the SMTP smuggling vector):
    /// `normalize` (each stored as CRLF), `reject` (550 5.6.0) or `accept` (kept
    /// byte for byte).
    pub bare_line_endings: BareLineEndings,
    /// Waiting for the next command (RFC 5321 §4.5.3.2.7: at least 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Waiting for the next piece of message data (RFC 5321 §4.5.3.2.5: 3 minutes).
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// On shutdown, how long transactions in progress may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// New mail gets `452 4.3.1` while the data disk has less free space than
    /// this (instead of failing writes); `"0B"`: never.
    pub min_free_disk: ByteSize,
    /// Message data held in memory by all sessions together (`"256MiB"`): past it,
    /// new data gets 452 4.3.1 instead of growing the router out of memory.
    pub max_data_in_flight: ByteSize,
    /// A whole transaction (MAIL to the end of its data), however busy the client
    /// keeps each read: past it, 421 4.4.2 and the connection closes.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// PEM certificate chain for STARTTLS; STARTTLS is offered only when set.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    pub tls_key: Option<PathBuf>,
}

/// A number of octets, written as an integer or with a unit: `"256MiB"`, `"64 KiB"`,
/// `"1GiB"` (binary), `"100MB"` (decimal), `"4096B"`; the prefix in any case, the
/// final `B` in capitals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

const BYTE_UNITS: [(&str, u64); 7] = [
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let bad = || format!("{text:?} is not a size: write e.g. \"256MiB\", \"64KiB\", \"1GiB\"");
        let n: u64 = t[..digits].parse().map_err(|_| bad())?;
        let unit = t[digits..].trim();
        let mult = if unit.is_empty() {
            1
        } else {
            BYTE_UNITS
                .iter()
                // Any case but the final B: "Mb" would be megabits.
                .find(|(u, _)| unit.ends_with('B') && u.eq_ignore_ascii_case(unit))
                .map(|&(_, m)| m)
                .ok_or_else(bad)?
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl std::fmt::Display for ByteSize {
    /// In the largest binary unit that divides it exactly.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, mult) in BYTE_UNITS.iter().filter(|(u, _)| u.ends_with("iB")) {
            if self.0 >= *mult && self.0.is_multiple_of(*mult) {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Octets(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Octets(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LongLines {
    Reject,
    Accept,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverScope {
    Off,
    LastHop,
    AllHops,
}

impl<'de> Deserialize<'de> for FailoverScope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(FailoverScope::LastHop),
            Raw::Bool(false) => Ok(FailoverScope::Off),
            Raw::Name(n) => match n.as_str() {
                "off" => Ok(FailoverScope::Off),
                "last-hop" => Ok(FailoverScope::LastHop),
                "all-hops" => Ok(FailoverScope::AllHops),
                other => Err(serde::de::Error::custom(format!(
                    "failover {other:?}: expected off, last-hop, all-hops, true or false"
                ))),
            },
        }
    }
}

/// What the inbound service does with a bare CR or bare LF in message data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BareLineEndings {
    /// Each is stored (and relayed) as CRLF; only CRLF.CRLF ends the data.
    Normalize,
    /// The message is refused with 550 5.6.0.
    Reject,
    /// Kept byte for byte (relayed as is).
    Accept,
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

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["127.0.0.1:2525".into()],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_connections: 1000,
            max_connections_per_ip: 100,
            max_errors: 10,
            long_lines: LongLines::Reject,
            bare_line_endings: BareLineEndings::Normalize,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            shutdown_grace: Duration::from_secs(30),
            min_free_disk: ByteSize(1 << 30),
            max_data_in_flight: ByteSize(256 << 20),
            transaction_timeout: Duration::from_secs(600),
            tls_cert: None,
            tls_key: None,
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
        let s = &self.smtp;
        if s.listen.is_empty() {
            bail!("smtp.listen is empty: give at least one host:port");
        }
        for l in &s.listen {
            l.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!("smtp.listen: {l:?} is not an IP:port (IPv6 as [::1]:2525)")
            })?;
        }
        if let Some(ha) = &self.ha {
            ha.listen
                .parse::<SocketAddr>()
                .map_err(|_| anyhow::anyhow!("ha.listen: {:?} is not an IP:port", ha.listen))?;
            for (name, v) in [("ha.peer", &ha.peer), ("ha.peer_smtp", &ha.peer_smtp)] {
                crate::catalog::model::check_server_address(v)
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            }
            if ha.password.len() < 8 {
                bail!("ha.password (or ha.password_file): use at least 8 characters");
            }
            if ha.shadow_release_interval.is_zero() {
                bail!("ha.shadow_release_interval must be above 0");
            }
            if ha.heartbeat_interval.is_zero() || ha.heartbeat_lost == 0 {
                bail!("ha.heartbeat_interval and ha.heartbeat_lost must be above 0");
            }
            if ha.on_change_timeout.is_zero() {
                bail!("ha.on_change_timeout must be above 0");
            }
            if let Some(hook) = &ha.on_change {
                if !hook.is_file() {
                    bail!("ha.on_change: {} is not a file", hook.display());
                }
            }
        }
        if let Some(d) = &self.directory {
            d.check().map_err(anyhow::Error::msg)?;
        }
        if let Some(m) = &self.metrics_listen {
            m.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!("metrics_listen: {m:?} is not an IP:port (e.g. 127.0.0.1:9125)")
            })?;
        }
        let w = &self.web;
        if !w.listen.is_empty() {
            w.listen.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!(
                    "web.listen: {:?} is not an IP:port (\"\" turns the console off)",
                    w.listen
                )
            })?;
        }
        if w.tls_cert.is_some() != w.tls_key.is_some() {
            bail!("web.tls_cert and web.tls_key go together: set both or neither");
        }
        if w.session_lifetime.is_zero() {
            bail!("web.session_lifetime must be above 0");
        }
        if s.max_message_size == 0 {
            bail!("smtp.max_message_size must be above 0");
        }
        for (name, v) in [
            ("max_recipients", s.max_recipients),
            ("max_connections", s.max_connections),
            ("max_connections_per_ip", s.max_connections_per_ip),
            ("max_errors", s.max_errors),
        ] {
            if v == 0 {
                bail!("smtp.{name} must be above 0");
            }
        }
        if s.max_data_in_flight.0 < 1 << 20 {
            bail!(
                "smtp.max_data_in_flight must be at least 1MiB, not {}",
                s.max_data_in_flight
            );
        }
        if s.transaction_timeout.is_zero() {
            bail!("smtp.transaction_timeout must be above 0");
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            bail!("smtp.tls_cert and smtp.tls_key go together: set both or neither");
        }
        let r = &self.routing;
        if r.rise == 0 || r.max_deliveries == 0 || r.max_per_server == 0 || r.max_hops == 0 {
            bail!("routing.rise, routing.max_deliveries, routing.max_per_server and routing.max_hops must be above 0");
        }
        if r.availability_threshold > 100 {
            bail!(
                "routing.availability_threshold must be 0 to 100 (0: never busy), not {}",
                r.availability_threshold
            );
        }
        for (name, d) in [
            ("probe_interval", r.probe_interval),
            ("probe_timeout", r.probe_timeout),
            ("retry_initial", r.retry_initial),
            ("delivery_timeout", r.delivery_timeout),
            ("final_reply_timeout", r.final_reply_timeout),
        ] {
            if d.is_zero() {
                bail!("routing.{name} must be above 0");
            }
        }
        for (name, host) in [
            ("relay_host", &r.relay_host),
            ("fallback_relay", &r.fallback_relay),
        ] {
            if let Some(h) = host {
                crate::catalog::model::check_server_address(h)
                    .map_err(|e| anyhow::anyhow!("routing.{name}: {e}"))?;
            }
        }
        if r.retry_max < r.retry_initial {
            bail!("routing.retry_max is shorter than routing.retry_initial");
        }
        if let Some(f) = &r.tls_ca_file {
            crate::deliver::tls::TlsClient::new(Some(f))?;
        }
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
