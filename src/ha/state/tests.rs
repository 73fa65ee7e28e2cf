//! The state machine's cases: roles, takeovers, epochs, recovery, the SMTP view.

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
