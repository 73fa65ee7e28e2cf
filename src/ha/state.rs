//! The HA unit's mode as a pure state machine: one [`Unit::tick`] per heartbeat
//! interval with what the heartbeat and the remote service check saw, plus the
//! administrator's commands. No I/O here; `ha::run` feeds it.
//!
//! Effective modes (FortiMail's): **MASTER** takes and delivers mail; **SLAVE**
//! stands by (and pushes any queue it holds to the MASTER); **FAILED** found that
//! it had failed (the peer took over) and waits to recover; **OFF** processes
//! nothing until an administrator sets a mode. **STARTING** waits, at most
//! `heartbeat_lost` intervals, to hear the peer before choosing.
//!
//! Two MASTERs (after a partition, or a unit coming back) are resolved by the
//! *master epoch*: every unit that becomes MASTER takes an epoch above any it has
//! seen, so the most recent takeover wins (equal epochs: the primary). A unit
//! that loses that way as configured secondary simply becomes SLAVE; the
//! configured primary has *failed* and follows `on_failure`.
//!
//! When the HA link gives no answer (peer down, partition, or a failed
//! authentication), the peer's SMTP greeting is what tells its mode: a 220 means
//! it is MASTER and serving, so no unit takes over from it, and of two MASTERs
//! that cannot talk the secondary yields; another answer (421) means it is up but
//! not MASTER. Only a peer whose HA link and SMTP both fail counts as lost.

use crate::config::{HaRole, OnFailure};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Starting,
    Master,
    Slave,
    Failed,
    Off,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Starting => "STARTING",
            Mode::Master => "MASTER",
            Mode::Slave => "SLAVE",
            Mode::Failed => "FAILED",
            Mode::Off => "OFF",
        })
    }
}

/// What the peer said of itself in its last heartbeat answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub role: HaRole,
    pub mode: Mode,
    pub epoch: u64,
    /// The peer's own check of this unit's SMTP service (None: not checked yet).
    pub sees_our_smtp: Option<bool>,
}

/// What the check of the peer's SMTP service saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerSmtp {
    /// Greeted 220: the peer takes mail, so it is MASTER.
    Serving,
    /// Greeted with another 2xx-4xx code (421 4.3.2: up, not MASTER).
    Answering,
    /// No greeting (or a 5xx).
    Down,
}

impl PeerSmtp {
    /// The service answers at all (the MASTER's health check).
    pub fn alive(self) -> bool {
        self != PeerSmtp::Down
    }

    /// From a greeting's code.
    pub fn of_code(code: u16) -> PeerSmtp {
        match code {
            220 => PeerSmtp::Serving,
            200..=499 => PeerSmtp::Answering,
            _ => PeerSmtp::Down,
        }
    }
}

/// One heartbeat interval's observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tick {
    /// The peer answered the heartbeat (None: no answer, refused, timed out, or
    /// the link failed authentication).
    pub peer: Option<PeerView>,
    /// Remote service monitoring: what the peer's SMTP said (None: not checked).
    pub peer_smtp: Option<PeerSmtp>,
    /// This FAILED unit holds mail that the peer may have promoted from shadow
    /// copies (`ha::shadow_store`): it pushes it before it restores its mode.
    pub push_first: bool,
}

/// A unit of the pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub role: HaRole,
    pub on_failure: OnFailure,
    /// `heartbeat_lost`: intervals without an answer (or failed checks of the
    /// MASTER's SMTP) before acting.
    pub lost_after: u32,
    pub mode: Mode,
    pub epoch: u64,
    /// Heartbeats in a row without an answer.
    pub missed: u32,
    /// Failed checks in a row of the MASTER peer's SMTP service.
    pub smtp_failures: u32,
    /// Intervals in a row as SLAVE with a peer that is not MASTER.
    pub masterless: u32,
    /// Intervals in a row as MASTER secondary seeing, without an HA answer, the
    /// peer serve SMTP (220): two MASTERs that cannot compare epochs.
    pub unlinked_masters: u32,
    /// This unit answers SMTP (with 421) when not MASTER, so the peer's check can
    /// tell that its service is back; false (`inactive_smtp = "closed"`): a FAILED
    /// unit with `restore` returns as soon as the peer answers.
    pub smtp_when_inactive: bool,
    /// Why the mode last changed.
    pub why: String,
    /// Why this unit cannot serve (local service monitoring), while it cannot.
    pub local_fault: Option<String>,
    /// Local checks failed in a row.
    pub local_failures: u32,
}

/// A change of mode, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub from: Mode,
    pub to: Mode,
    pub why: String,
}

impl Unit {
    pub fn new(role: HaRole, on_failure: OnFailure, lost_after: u32, epoch: u64) -> Unit {
        Unit {
            role,
            on_failure,
            lost_after: lost_after.max(1),
            mode: Mode::Starting,
            epoch,
            missed: 0,
            smtp_failures: 0,
            masterless: 0,
            unlinked_masters: 0,
            smtp_when_inactive: true,
            why: "starting: waiting for the peer".into(),
            local_fault: None,
            local_failures: 0,
        }
    }

    /// The local service checks of one interval (None: all passed). A MASTER that
    /// fails them `heartbeat_lost` times in a row gives up as `on_failure` says,
    /// so that the peer takes over; while they fail no unit takes MASTER on its
    /// own (an administrator's `set-mode master` still does).
    pub fn local(&mut self, fault: Option<String>) -> Option<Change> {
        let Some(why) = fault else {
            self.local_failures = 0;
            self.local_fault = None;
            return None;
        };
        self.local_failures = self.local_failures.saturating_add(1);
        self.local_fault = Some(why.clone());
        if self.mode == Mode::Master && self.local_failures >= self.lost_after {
            return self.failed(&format!("this unit cannot serve: {why}"));
        }
        None
    }

    fn set(&mut self, to: Mode, why: impl Into<String>) -> Option<Change> {
        let from = self.mode;
        self.mode = to;
        self.why = why.into();
        self.smtp_failures = 0;
        self.masterless = 0;
        self.unlinked_masters = 0;
        (from != to).then(|| Change {
            from,
            to,
            why: self.why.clone(),
        })
    }

    /// MASTER by the state machine: not while the local checks fail.
    fn become_master(&mut self, peer: Option<&PeerView>, why: impl Into<String>) -> Option<Change> {
        if self.mode != Mode::Master {
            if let Some(fault) = &self.local_fault {
                self.why = format!(
                    "would take MASTER ({}) but cannot serve: {fault}",
                    why.into()
                );
                return None;
            }
        }
        self.take_master(peer, why)
    }

    fn take_master(&mut self, peer: Option<&PeerView>, why: impl Into<String>) -> Option<Change> {
        self.epoch = self.epoch.max(peer.map_or(0, |p| p.epoch)) + 1;
        self.set(Mode::Master, why)
    }

    /// This unit has failed (the peer took over): `on_failure` decides.
    fn failed(&mut self, why: &str) -> Option<Change> {
        match self.on_failure {
            OnFailure::Off => self.set(Mode::Off, format!("{why}; on_failure = off")),
            OnFailure::Restore | OnFailure::Slave => self.set(Mode::Failed, why.to_string()),
        }
    }

    /// The configured mode, taken back (recovery with `restore`, `ha restore`).
    fn configured(&mut self, peer: Option<&PeerView>, why: &str) -> Option<Change> {
        match self.role {
            HaRole::Primary => self.become_master(peer, why.to_string()),
            HaRole::Secondary => self.set(Mode::Slave, why.to_string()),
        }
    }

    /// Does `p` (a MASTER) outrank this unit as MASTER?
    fn outranked_by(&self, p: &PeerView) -> bool {
        p.mode == Mode::Master
            && (p.epoch > self.epoch
                || (p.epoch == self.epoch
                    && p.role == HaRole::Primary
                    && self.role == HaRole::Secondary))
    }

    /// The peer as its SMTP greeting shows it when the HA link gave no answer:
    /// 220, a MASTER (of our epoch: of two MASTERs the primary stays); another
    /// answer, up but not MASTER; none, nothing known.
    fn seen_by_smtp(&self, smtp: Option<PeerSmtp>) -> Option<PeerView> {
        let mode = match smtp? {
            PeerSmtp::Serving => Mode::Master,
            PeerSmtp::Answering => Mode::Starting,
            PeerSmtp::Down => return None,
        };
        Some(PeerView {
            role: match self.role {
                HaRole::Primary => HaRole::Secondary,
                HaRole::Secondary => HaRole::Primary,
            },
            mode,
            epoch: self.epoch,
            sees_our_smtp: None,
        })
    }

    /// One heartbeat interval.
    pub fn tick(&mut self, t: &Tick) -> Option<Change> {
        let heard = t.peer;
        let seen = heard.or_else(|| self.seen_by_smtp(t.peer_smtp));
        match seen {
            Some(_) => self.missed = 0,
            None => self.missed = self.missed.saturating_add(1),
        }
        let lost = self.missed >= self.lost_after;
        match (heard.map(|p| p.mode), t.peer_smtp.map(PeerSmtp::alive)) {
            (Some(Mode::Master), Some(false)) => self.smtp_failures += 1,
            (Some(Mode::Master), Some(true)) => self.smtp_failures = 0,
            _ => {}
        }
        if heard.is_none() {
            if let Some(c) = self.unlinked(seen.as_ref()) {
                return Some(c);
            }
        } else {
            self.unlinked_masters = 0;
        }
        let peer = seen.as_ref();
        // A unit that is not MASTER keeps the highest epoch it has seen, so that
        // its own takeover outranks every MASTER before it.
        if let (Some(p), false) = (peer, self.mode == Mode::Master) {
            self.epoch = self.epoch.max(p.epoch);
        }
        match self.mode {
            Mode::Off => None,
            Mode::Starting => self.tick_starting(peer, lost),
            // Epochs compare only with a peer heard over the link (see `unlinked`).
            Mode::Master => match heard.as_ref() {
                Some(p) if self.outranked_by(p) => match self.role {
                    HaRole::Secondary => self.set(Mode::Slave, "the primary is MASTER again"),
                    HaRole::Primary => self.failed(&format!(
                        "the peer took over (its master epoch {} > ours {})",
                        p.epoch, self.epoch
                    )),
                },
                _ => None,
            },
            Mode::Slave => self.tick_slave(peer, lost),
            Mode::Failed => self.tick_failed(peer, t.push_first),
        }
    }

    /// STARTING: the role decides once the peer is heard, or it is lost.
    fn tick_starting(&mut self, peer: Option<&PeerView>, lost: bool) -> Option<Change> {
        let n = self.lost_after;
        match peer {
            Some(p) if p.mode == Mode::Master => match self.role {
                HaRole::Primary => self.failed("the secondary took over while this unit was away"),
                HaRole::Secondary => self.set(Mode::Slave, "the primary is MASTER"),
            },
            Some(p) => match self.role {
                HaRole::Primary => self.become_master(Some(p), "the peer is not MASTER"),
                HaRole::Secondary => self.set(Mode::Slave, "configured secondary"),
            },
            None if lost => self.become_master(
                None,
                format!("no heartbeat answer from the peer in {n} intervals"),
            ),
            None => None,
        }
    }

    /// SLAVE: takes over from a lost MASTER, one whose SMTP fails, or none.
    fn tick_slave(&mut self, peer: Option<&PeerView>, lost: bool) -> Option<Change> {
        let n = self.lost_after;
        match peer {
            None if lost => self.become_master(None, format!("heartbeat lost ({n} missed)")),
            Some(p) if p.mode == Mode::Master && self.smtp_failures >= n => {
                let why = format!("the MASTER's SMTP service failed {n} checks in a row");
                self.become_master(Some(p), why)
            }
            Some(p) if p.mode != Mode::Master => {
                self.masterless += 1;
                if self.masterless >= n {
                    let why = format!("no MASTER for {n} intervals (the peer is {})", p.mode);
                    self.become_master(Some(p), why)
                } else {
                    None
                }
            }
            Some(_) => {
                self.masterless = 0;
                None
            }
            None => None,
        }
    }

    /// FAILED: recovers as `on_failure` says once the peer answers.
    fn tick_failed(&mut self, peer: Option<&PeerView>, push_first: bool) -> Option<Change> {
        match (self.on_failure, peer) {
            (OnFailure::Slave, Some(_)) => self.set(
                Mode::Slave,
                "the peer answers again: SLAVE, pushing the queue",
            ),
            (OnFailure::Restore, Some(p))
                if !push_first && (p.sees_our_smtp == Some(true) || !self.smtp_when_inactive) =>
            {
                self.configured(
                    Some(p),
                    "the peer sees this unit's SMTP service again: configured mode restored",
                )
            }
            _ => None,
        }
    }

    /// What only a peer seen by its SMTP greeting (no HA link) decides: a MASTER
    /// secondary yields to a primary that serves for `heartbeat_lost` intervals
    /// (time for the link to return, so that epochs decide); a unit that is not
    /// MASTER never takes over from a peer that serves.
    fn unlinked(&mut self, seen: Option<&PeerView>) -> Option<Change> {
        let serving = seen.is_some_and(|p| p.mode == Mode::Master);
        if !(serving && self.mode == Mode::Master) {
            self.unlinked_masters = 0;
        }
        match (self.mode, self.role, serving) {
            (Mode::Master, HaRole::Secondary, true) => {
                self.unlinked_masters += 1;
                if self.unlinked_masters < self.lost_after {
                    return None;
                }
                self.set(
                    Mode::Slave,
                    "the primary's SMTP service serves (220) while the HA link fails: \
                     the primary keeps MASTER",
                )
            }
            (Mode::Starting, HaRole::Secondary, true) => self.set(
                Mode::Slave,
                "the primary's SMTP service serves (220); the HA link fails",
            ),
            _ => None,
        }
    }

    /// `ha set-mode master|slave` (the way out of OFF).
    pub fn set_mode(&mut self, master: bool, peer: Option<&PeerView>) -> Option<Change> {
        if master {
            self.take_master(peer, "set by the administrator")
        } else {
            self.set(Mode::Slave, "set by the administrator")
        }
    }

    /// `ha restore`: back to the configured mode; refused while a queue push is
    /// unfinished.
    pub fn restore(
        &mut self,
        push_unfinished: bool,
        peer: Option<&PeerView>,
    ) -> Result<Option<Change>, String> {
        if push_unfinished {
            return Err("the queue push to the MASTER is unfinished: try again when `ha status` shows it done".into());
        }
        let configured = match self.role {
            HaRole::Primary => Mode::Master,
            HaRole::Secondary => Mode::Slave,
        };
        if self.mode == configured {
            return Ok(None);
        }
        Ok(self.configured(
            peer,
            "configured operating mode restored by the administrator",
        ))
    }
}

#[cfg(test)]
mod tests;
