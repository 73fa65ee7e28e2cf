//! `[routing]`: failover, availability probes, retries and delivery timeouts.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

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

impl RoutingConfig {
    /// Checks values that TOML types alone cannot.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.rise == 0
            || self.max_deliveries == 0
            || self.max_per_server == 0
            || self.max_hops == 0
        {
            bail!("routing.rise, routing.max_deliveries, routing.max_per_server and routing.max_hops must be above 0");
        }
        if self.availability_threshold > 100 {
            bail!(
                "routing.availability_threshold must be 0 to 100 (0: never busy), not {}",
                self.availability_threshold
            );
        }
        for (name, d) in [
            ("probe_interval", self.probe_interval),
            ("probe_timeout", self.probe_timeout),
            ("retry_initial", self.retry_initial),
            ("delivery_timeout", self.delivery_timeout),
            ("final_reply_timeout", self.final_reply_timeout),
        ] {
            if d.is_zero() {
                bail!("routing.{name} must be above 0");
            }
        }
        for (name, host) in [
            ("relay_host", &self.relay_host),
            ("fallback_relay", &self.fallback_relay),
        ] {
            if let Some(h) = host {
                crate::catalog::model::check_server_address(h)
                    .map_err(|e| anyhow::anyhow!("routing.{name}: {e}"))?;
            }
        }
        if self.retry_max < self.retry_initial {
            bail!("routing.retry_max is shorter than routing.retry_initial");
        }
        if let Some(f) = &self.tls_ca_file {
            crate::deliver::tls::TlsClient::new(Some(f))?;
        }
        Ok(())
    }
}
