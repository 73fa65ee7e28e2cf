//! `[ha]`: this unit's place in an active-passive pair (role, peer, heartbeat,
//! failure modes, shadow queue, hooks).

use super::ByteSize;
use super::Secret;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

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

impl HaConfig {
    /// Checks values that TOML types alone cannot.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        use std::net::SocketAddr;
        self.listen
            .parse::<SocketAddr>()
            .map_err(|_| anyhow::anyhow!("ha.listen: {:?} is not an IP:port", self.listen))?;
        for (name, v) in [("ha.peer", &self.peer), ("ha.peer_smtp", &self.peer_smtp)] {
            crate::catalog::model::check_server_address(v)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        }
        if self.password.len() < 8 {
            bail!("ha.password (or ha.password_file): use at least 8 characters");
        }
        if self.shadow_release_interval.is_zero() {
            bail!("ha.shadow_release_interval must be above 0");
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_lost == 0 {
            bail!("ha.heartbeat_interval and ha.heartbeat_lost must be above 0");
        }
        if self.on_change_timeout.is_zero() {
            bail!("ha.on_change_timeout must be above 0");
        }
        if let Some(hook) = &self.on_change {
            if !hook.is_file() {
                bail!("ha.on_change: {} is not a file", hook.display());
            }
        }
        Ok(())
    }
}
