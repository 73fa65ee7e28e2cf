//! `ha status`: what the unit shows of itself, its peer, the queue push, the
//! catalog version, the authentication alarm and the recent HA events.

use super::sync::CatalogVersion;
use super::{Beat, Ha};
use crate::config::HaRole;
use std::io::Write;
use std::time::SystemTime;

/// What `ha status` shows besides the unit itself.
#[derive(Debug, Clone, Default)]
pub(super) struct Status {
    pub peer: Option<(Beat, SystemTime)>,
    pub peer_error: Option<String>,
    pub peer_smtp: Option<(bool, String, SystemTime)>,
    pub heard_from_peer: Option<SystemTime>,
    pub since: Option<SystemTime>,
    pub pushed: u64,
    pub push_left: u64,
    pub push_error: Option<String>,
    /// As MASTER: pushes recognised as already taken (tombstones), and pushed
    /// recipients refused by the relay policy.
    pub repeats: u64,
    pub refused: u64,
    pub catalog_copied: Option<CatalogVersion>,
    pub catalog_error: Option<String>,
    /// The HA link failed authentication: the last error, since when, how often.
    pub auth_alarm: Option<(String, SystemTime)>,
    pub auth_failures: u64,
    /// The last [`EVENTS`] HA events (mode changes, alarms, push and catalog
    /// copies), oldest first, for `ha status` and the web console's HA page.
    pub events: std::collections::VecDeque<(SystemTime, String)>,
}

/// How many HA events `ha status` keeps.
pub(super) const EVENTS: usize = 20;

impl Status {
    /// Records an HA event (the oldest goes past [`EVENTS`]).
    pub fn event(&mut self, what: String) {
        if self.events.len() == EVENTS {
            self.events.pop_front();
        }
        self.events.push_back((SystemTime::now(), what));
    }
}

pub(super) fn role_name(r: HaRole) -> &'static str {
    match r {
        HaRole::Primary => "primary",
        HaRole::Secondary => "secondary",
    }
}

fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs}s ago")
}

fn last_error(e: &Option<String>) -> String {
    e.as_ref()
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default()
}

impl Ha {
    /// `ha status`.
    pub fn write_status(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let u = self.unit().clone();
        let s = self.status().clone();
        let on_failure = match self.config.on_failure {
            crate::config::OnFailure::Off => "off",
            crate::config::OnFailure::Restore => "restore",
            crate::config::OnFailure::Slave => "slave",
        };
        writeln!(
            out,
            "configured:    {} (on_failure = {on_failure})",
            role_name(u.role)
        )?;
        writeln!(
            out,
            "effective:     {} since {}: {}",
            u.mode,
            s.since.map(ago).unwrap_or_default(),
            u.why
        )?;
        writeln!(out, "master epoch:  {}", u.epoch)?;
        match &u.local_fault {
            None => writeln!(out, "local checks:  ok (SMTP, store, free disk)")?,
            Some(why) => writeln!(
                out,
                "local checks:  FAILING ({} in a row): {why}",
                u.local_failures
            )?,
        }
        if let Some((e, since)) = &s.auth_alarm {
            writeln!(
                out,
                "ALARM:         HA authentication failed ({} times, last {}): {e}; \
                 check ha.password on both units (not a reason to take over)",
                s.auth_failures,
                ago(*since)
            )?;
        }
        self.write_peer(out, &s)?;
        writeln!(
            out,
            "queue push:    {} pushed, {} left{}",
            s.pushed,
            s.push_left,
            last_error(&s.push_error)
        )?;
        writeln!(
            out,
            "pushes taken:  {} repeated push(es) recognised, {} pushed recipient(s) refused; {} remembered",
            s.repeats,
            s.refused,
            self.tombstones.len()
        )?;
        writeln!(
            out,
            "catalog:       version {} (local serial {}){}{}",
            self.catalog_version(),
            self.catalog.serial(),
            s.catalog_copied
                .map(|v| format!(", last copied from the peer: version {v}"))
                .unwrap_or_default(),
            s.catalog_error
                .as_ref()
                .map(|e| format!(" (last sync error: {e})"))
                .unwrap_or_default()
        )?;
        self.write_shadow(out)?;
        writeln!(out, "local queue:   {} message(s)", self.spool.len())?;
        if !s.events.is_empty() {
            writeln!(out, "recent events (oldest first):")?;
            for (at, what) in &s.events {
                writeln!(out, "  {:>8}  {what}", ago(*at))?;
            }
        }
        Ok(())
    }

    /// The peer's lines of `ha status`: its last heartbeat and its SMTP service.
    fn write_peer(&self, out: &mut dyn Write, s: &Status) -> std::io::Result<()> {
        match (&s.peer, &s.peer_error) {
            (Some((b, at)), None) => writeln!(
                out,
                "peer:          {} {} {} (epoch {}), {} queued, last heartbeat {}",
                self.config.peer,
                role_name(b.role),
                b.mode,
                b.epoch,
                b.queued,
                ago(*at)
            )?,
            (last, Some(e)) => writeln!(
                out,
                "peer:          {} unreachable: {e}{}",
                self.config.peer,
                last.as_ref()
                    .map(|(_, at)| format!(" (last heartbeat {})", ago(*at)))
                    .unwrap_or_default()
            )?,
            (None, None) => writeln!(out, "peer:          {} not heard yet", self.config.peer)?,
        }
        if let Some(at) = s.heard_from_peer {
            writeln!(out, "peer's beats:  last received {}", ago(at))?;
        }
        match &s.peer_smtp {
            Some((ok, what, at)) => writeln!(
                out,
                "peer SMTP:     {} {} ({what}, {})",
                self.config.peer_smtp,
                if *ok { "up" } else { "down" },
                ago(*at)
            )?,
            None => writeln!(
                out,
                "peer SMTP:     {} not checked yet",
                self.config.peer_smtp
            )?,
        }
        Ok(())
    }
}
