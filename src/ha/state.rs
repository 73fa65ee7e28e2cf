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
        let n = self.lost_after;
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
            Mode::Starting => match peer {
                Some(p) if p.mode == Mode::Master => match self.role {
                    HaRole::Primary => {
                        self.failed("the secondary took over while this unit was away")
                    }
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
            },
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
            Mode::Slave => match peer {
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
            },
            Mode::Failed => match (self.on_failure, peer) {
                (OnFailure::Slave, Some(_)) => self.set(
                    Mode::Slave,
                    "the peer answers again: SLAVE, pushing the queue",
                ),
                (OnFailure::Restore, Some(p))
                    if !t.push_first
                        && (p.sees_our_smtp == Some(true) || !self.smtp_when_inactive) =>
                {
                    self.configured(
                        Some(p),
                        "the peer sees this unit's SMTP service again: configured mode restored",
                    )
                }
                _ => None,
            },
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
mod tests {
    use super::*;
    use HaRole::{Primary, Secondary};
    use Mode::*;

    fn peer(role: HaRole, mode: Mode, epoch: u64) -> Tick {
        Tick {
            peer: Some(PeerView {
                role,
                mode,
                epoch,
                sees_our_smtp: Some(true),
            }),
            peer_smtp: Some(greeting(mode)),
            push_first: false,
        }
    }

    /// What a unit in `mode` greets SMTP clients with.
    fn greeting(mode: Mode) -> PeerSmtp {
        if mode == Master {
            PeerSmtp::Serving
        } else {
            PeerSmtp::Answering
        }
    }

    const SILENT: Tick = Tick {
        peer: None,
        peer_smtp: Some(PeerSmtp::Down),
        push_first: false,
    };

    /// No HA link (a failed authentication, a cut), the peer's SMTP as in `mode`.
    fn unlinked(mode: Mode) -> Tick {
        Tick {
            peer: None,
            peer_smtp: Some(greeting(mode)),
            push_first: false,
        }
    }

    fn unit(role: HaRole, on_failure: OnFailure, mode: Mode, epoch: u64) -> Unit {
        let mut u = Unit::new(role, on_failure, 3, epoch);
        u.mode = mode;
        u
    }

    #[test]
    fn starting_units_take_their_roles() {
        // (role, what the peer says, expected mode)
        let cases = [
            (Primary, Some((Secondary, Slave)), Master),
            (Primary, Some((Secondary, Starting)), Master),
            (Secondary, Some((Primary, Master)), Slave),
            (Secondary, Some((Primary, Starting)), Slave),
            // A primary that finds the secondary MASTER was failed over.
            (Primary, Some((Secondary, Master)), Failed),
        ];
        for (role, p, want) in cases {
            let mut u = Unit::new(role, OnFailure::Slave, 3, 0);
            let t = p.map_or(SILENT, |(r, m)| peer(r, m, 1));
            u.tick(&t);
            assert_eq!(u.mode, want, "{role:?} seeing {p:?}");
        }
        // Alone: MASTER after heartbeat_lost intervals, whatever the role.
        for role in [Primary, Secondary] {
            let mut u = Unit::new(role, OnFailure::Slave, 3, 4);
            assert_eq!((u.tick(&SILENT), u.tick(&SILENT)), (None, None));
            assert_eq!(u.tick(&SILENT).map(|c| c.to), Some(Master));
            assert_eq!(u.epoch, 5);
        }
    }

    #[test]
    fn the_slave_takes_over_when_heartbeats_are_lost() {
        let mut s = unit(Secondary, OnFailure::Slave, Slave, 0);
        assert_eq!(s.tick(&peer(Primary, Master, 1)), None);
        s.tick(&SILENT);
        s.tick(&SILENT);
        let c = s.tick(&SILENT).expect("takes over");
        assert_eq!((c.from, c.to), (Slave, Master));
        assert!(c.why.contains("heartbeat lost"), "{}", c.why);
        assert_eq!(s.epoch, 2);
    }

    #[test]
    fn the_slave_takes_over_when_the_masters_smtp_fails() {
        let mut s = unit(Secondary, OnFailure::Slave, Slave, 1);
        let mut t = peer(Primary, Master, 1);
        t.peer_smtp = Some(PeerSmtp::Down);
        assert_eq!(s.tick(&t), None);
        assert_eq!(s.tick(&t), None);
        assert_eq!(s.tick(&t).map(|c| c.to), Some(Master));
        assert_eq!(s.epoch, 2, "above the old master's");
        // One good check resets the count.
        let mut s = unit(Secondary, OnFailure::Slave, Slave, 1);
        s.tick(&t);
        s.tick(&t);
        s.tick(&peer(Primary, Master, 1));
        assert_eq!(s.tick(&t), None);
    }

    #[test]
    fn a_master_outranked_follows_on_failure_or_yields() {
        for (on_failure, want) in [
            (OnFailure::Off, Off),
            (OnFailure::Restore, Failed),
            (OnFailure::Slave, Failed),
        ] {
            let mut p = unit(Primary, on_failure, Master, 1);
            p.tick(&peer(Secondary, Master, 2));
            assert_eq!(p.mode, want, "{on_failure:?}");
        }
        // A lower epoch does not outrank; an equal one only if it is the primary.
        let mut p = unit(Primary, OnFailure::Slave, Master, 3);
        assert_eq!(p.tick(&peer(Secondary, Master, 2)), None);
        assert_eq!(p.tick(&peer(Secondary, Master, 3)), None);
        let mut s = unit(Secondary, OnFailure::Slave, Master, 3);
        assert_eq!(s.tick(&peer(Primary, Master, 3)).map(|c| c.to), Some(Slave));
    }

    #[test]
    fn failed_units_recover_as_on_failure_says() {
        // slave: SLAVE as soon as the peer answers.
        let mut u = unit(Primary, OnFailure::Slave, Failed, 1);
        assert_eq!(u.tick(&SILENT), None);
        assert_eq!(
            u.tick(&peer(Secondary, Master, 2)).map(|c| c.to),
            Some(Slave)
        );
        // restore: back to the configured mode once the peer sees our SMTP...
        let mut u = unit(Primary, OnFailure::Restore, Failed, 1);
        let mut t = peer(Secondary, Master, 2);
        if let Some(p) = t.peer.as_mut() {
            p.sees_our_smtp = Some(false);
        }
        assert_eq!(u.tick(&t), None);
        // ...and it holds no mail the peer may have promoted from shadows.
        let unpushed = Tick {
            push_first: true,
            ..peer(Secondary, Master, 2)
        };
        assert_eq!(u.tick(&unpushed), None);
        assert_eq!(
            u.tick(&peer(Secondary, Master, 2)).map(|c| c.to),
            Some(Master)
        );
        assert_eq!(u.epoch, 3, "outranks the peer, which yields");
        // A unit that does not listen while inactive cannot be seen: it returns
        // as soon as the peer answers.
        let mut u = unit(Primary, OnFailure::Restore, Failed, 1);
        u.smtp_when_inactive = false;
        assert_eq!(u.tick(&t).map(|c| c.to), Some(Master));
        // ...which for a secondary is SLAVE.
        let mut u = unit(Secondary, OnFailure::Restore, Failed, 1);
        assert_eq!(u.tick(&peer(Primary, Master, 2)).map(|c| c.to), Some(Slave));
        // off: nothing until the administrator.
        let mut u = unit(Primary, OnFailure::Off, Off, 1);
        assert_eq!(u.tick(&peer(Secondary, Master, 2)), None);
        assert_eq!(u.set_mode(false, None).map(|c| c.to), Some(Slave));
    }

    #[test]
    fn a_slave_with_no_master_takes_over() {
        let mut s = unit(Secondary, OnFailure::Slave, Slave, 1);
        let t = peer(Primary, Failed, 1);
        assert_eq!((s.tick(&t), s.tick(&t)), (None, None));
        assert_eq!(s.tick(&t).map(|c| c.to), Some(Master));
    }

    #[test]
    fn without_the_ha_link_the_peers_greeting_decides_and_one_master_remains() {
        // Both start, the link fails (wrong password): each sees the other's 421.
        let mut p = Unit::new(Primary, OnFailure::Slave, 3, 1);
        let mut s = Unit::new(Secondary, OnFailure::Slave, 3, 1);
        p.tick(&unlinked(Starting));
        s.tick(&unlinked(Starting));
        assert_eq!((p.mode, s.mode), (Master, Slave));
        // Then the primary serves (220): the secondary never takes over.
        for _ in 0..20 {
            assert_eq!(s.tick(&unlinked(p.mode)), None);
            assert_eq!(p.tick(&unlinked(s.mode)), None);
        }
        assert_eq!((p.mode, s.mode), (Master, Slave));
        // Two MASTERs that cannot talk (both took over during a partition): the
        // secondary yields once it has seen the primary serve for heartbeat_lost
        // intervals (time for the link to come back and epochs to decide).
        let mut p = unit(Primary, OnFailure::Slave, Master, 2);
        let mut s = unit(Secondary, OnFailure::Slave, Master, 3);
        assert_eq!(p.tick(&unlinked(Master)), None);
        assert_eq!(
            (s.tick(&unlinked(Master)), s.tick(&unlinked(Master))),
            (None, None)
        );
        let c = s.tick(&unlinked(Master)).expect("yields");
        assert_eq!(c.to, Slave);
        assert!(c.why.contains("220"), "{}", c.why);
        // A SLAVE whose heartbeats go unanswered does not take over while the
        // MASTER serves; it does once the MASTER's SMTP is gone too.
        let mut s = unit(Secondary, OnFailure::Slave, Slave, 1);
        for _ in 0..10 {
            assert_eq!(s.tick(&unlinked(Master)), None);
        }
        s.tick(&SILENT);
        s.tick(&SILENT);
        assert_eq!(s.tick(&SILENT).map(|c| c.to), Some(Master));
        // A unit that is up but not MASTER (421) leaves the SLAVE masterless.
        let mut s = unit(Secondary, OnFailure::Slave, Slave, 1);
        s.tick(&unlinked(Failed));
        s.tick(&unlinked(Failed));
        assert_eq!(s.tick(&unlinked(Failed)).map(|c| c.to), Some(Master));
    }

    #[test]
    fn restore_returns_to_the_configured_mode_unless_a_push_is_unfinished() {
        let mut p = unit(Primary, OnFailure::Slave, Slave, 2);
        assert!(p.restore(true, None).is_err());
        assert_eq!(p.mode, Slave);
        let t = peer(Secondary, Master, 2);
        let c = p.restore(false, t.peer.as_ref()).unwrap().expect("changes");
        assert_eq!((c.to, p.epoch), (Master, 3));
        assert_eq!(p.restore(false, None), Ok(None), "already configured");
        let mut s = unit(Secondary, OnFailure::Slave, Master, 2);
        assert_eq!(s.restore(false, None).unwrap().map(|c| c.to), Some(Slave));
    }
}
