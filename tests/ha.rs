//! The active-passive pair (issue 8): two router processes on loopback with
//! heartbeats, remote SMTP monitoring, takeover, queue push and restore.

mod common;
mod ha_common;
use common::{RecordingSink, Router, Scratch};
use ha_common::*;
use std::time::{Duration, Instant};

#[test]
fn takeover_then_the_old_primary_pushes_its_queue_and_restore_returns_the_roles() {
    let p = ports();
    let mut home = RecordingSink::start("m1");
    home.down();
    let (mut a, b) = pair(&p, home.port, "slave");
    assert_eq!(greeting(p.smtp[1]), 421, "the SLAVE does not take mail");
    // Mail held on the primary (its home is down), then the primary dies.
    send(p.smtp[0], "held-1");
    send(p.smtp[0], "held-2");
    std::thread::sleep(Duration::from_millis(300));
    a.kill9();
    let took = wait_mode(&b, "MASTER", 10);
    let bound = Duration::from_millis(INTERVAL_MS * LOST + 1000);
    assert!(took <= bound, "takeover took {took:?} (bound {bound:?})");
    eprintln!(
        "takeover {} ms after kill -9 (bound {} ms)",
        took.as_millis(),
        bound.as_millis()
    );
    let during = status(&b);
    // Mail sent during the outage is taken and delivered by the new MASTER.
    home.up();
    send(p.smtp[1], "outage");
    assert_eq!(home.wait_for(1, 10).len(), 1, "{}", b.log());
    // The old primary comes back with its queue: FAILED, then SLAVE, pushes it.
    a.restart();
    wait_mode(&a, "SLAVE", 10);
    let got = home.wait_for(3, 15);
    assert_eq!(got.len(), 3, "{}\n{}", status(&a), b.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status(&a).contains("queue push:    2 pushed, 0 left") {
        assert!(Instant::now() < deadline, "{}", status(&a));
        std::thread::sleep(Duration::from_millis(50));
    }
    let after_push = status(&a);
    assert!(
        after_push.contains("local queue:   0 message(s)"),
        "{after_push}"
    );
    // The recent HA events tell the story (the web console's HA page shows them).
    let events = after_push
        .split("recent events (oldest first):")
        .nth(1)
        .unwrap_or_default();
    let failed = events.find("-> FAILED").expect(&after_push);
    let slave = events.find("FAILED -> SLAVE").expect(&after_push);
    let pushed = events
        .find("queue push finished: 2 pushed to the MASTER")
        .expect(&after_push);
    assert!(failed < slave && slave < pushed, "{after_push}");
    assert!(status(&b).contains("-> MASTER (epoch 2)"), "{}", status(&b));
    assert!(
        a.log()
            .contains("the secondary took over while this unit was away"),
        "{}",
        a.log()
    );
    // Exactly once each, nothing delivered by both units.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(subjects(&home), ["held-1", "held-2", "outage"]);
    // The administrator restores the configured roles.
    // The primary first: it becomes MASTER with a higher epoch, the secondary
    // sees it and yields; restoring the secondary is then already done.
    let restored = a.scratch.ok(&["ha", "restore"]);
    assert!(
        restored.contains("configured mode restored: MASTER"),
        "{restored}"
    );
    wait_mode(&a, "MASTER", 10);
    wait_mode(&b, "SLAVE", 10);
    let again = b.scratch.ok(&["ha", "restore"]);
    assert!(
        again.contains("already in its configured mode: SLAVE"),
        "{again}"
    );
    assert!(a
        .scratch
        .ok(&["ha", "restore"])
        .contains("already in its configured mode"));
    assert_eq!(greeting(p.smtp[1]), 421);
    send(p.smtp[0], "after-restore");
    assert_eq!(home.wait_for(4, 10).len(), 4);
    println!("--- secondary during the outage\n{during}\n--- old primary after its push\n{after_push}\n--- primary after restore\n{}\n--- secondary after restore\n{}", status(&a), status(&b));
}

/// A pair, the primary killed and the secondary MASTER, then the primary back.
fn failed_over(on_failure: &str) -> (Router, Router, RecordingSink, Ports) {
    let p = ports();
    let mut home = RecordingSink::start("m1");
    home.down();
    let (mut a, b) = pair(&p, home.port, on_failure);
    send(p.smtp[0], "held");
    std::thread::sleep(Duration::from_millis(300));
    a.kill9();
    wait_mode(&b, "MASTER", 10);
    home.up();
    a.restart();
    (a, b, home, p)
}

#[test]
fn on_failure_restore_takes_the_primary_back_to_master() {
    let (a, b, home, p) = failed_over("restore");
    // FAILED, then MASTER again once the secondary sees its SMTP service; the
    // secondary yields and the held mail is delivered by the primary.
    wait_mode(&a, "MASTER", 10);
    wait_mode(&b, "SLAVE", 10);
    assert!(a.log().contains("to=FAILED"), "{}", a.log());
    assert!(
        a.log()
            .contains("the peer sees this unit's SMTP service again: configured mode restored"),
        "{}",
        a.log()
    );
    assert_eq!(home.wait_for(1, 10).len(), 1);
    assert_eq!(greeting(p.smtp[0]), 220);
    assert_eq!(greeting(p.smtp[1]), 421);
}

#[test]
fn on_failure_off_waits_for_the_administrator() {
    let (a, b, home, p) = failed_over("off");
    wait_mode(&a, "OFF", 10);
    // OFF processes nothing: its held mail stays, its SMTP says 421.
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * (LOST + 2)));
    assert_eq!(
        status(&a)
            .lines()
            .find(|l| l.starts_with("effective"))
            .map(|l| l.contains("OFF")),
        Some(true)
    );
    assert!(home.messages().is_empty());
    assert_eq!(greeting(p.smtp[0]), 421);
    // The administrator makes it SLAVE: it pushes its queue to the MASTER.
    let out = a.scratch.ok(&["ha", "set-mode", "slave"]);
    assert!(out.contains("effective mode: SLAVE"), "{out}");
    assert_eq!(home.wait_for(1, 10).len(), 1, "{}\n{}", status(&a), b.log());
    wait_mode(&b, "MASTER", 1);
}

#[test]
fn with_inactive_smtp_closed_only_the_master_listens() {
    let p = ports();
    let home = RecordingSink::start("m1");
    let closed = |i| config(&p, i, "slave", "pair-secret") + "inactive_smtp = \"closed\"\n";
    let a = Scratch::new();
    catalog(&a, home.port);
    // (`port` is the HA port: a closed SLAVE has no SMTP port to wait for.)
    let mut a = Router::start_config(a, &closed(0), p.ha[0]);
    let mut b = Router::start_config(Scratch::new(), &closed(1), p.ha[1]);
    wait_mode(&a, "MASTER", 10);
    wait_mode(&b, "SLAVE", 10);
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * 2));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", p.smtp[1])).is_err(),
        "a closed SLAVE does not listen"
    );
    a.kill9();
    wait_mode(&b, "MASTER", 10);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", p.smtp[1])).is_err() {
        assert!(Instant::now() < deadline, "{}", b.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(greeting(p.smtp[1]), 220);
    send(p.smtp[1], "to-the-new-master");
    assert_eq!(home.wait_for(1, 10).len(), 1);
    // The old primary comes back (on_failure = slave): a closed SLAVE again.
    a.restart();
    wait_mode(&a, "SLAVE", 10);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", p.smtp[0])).is_ok() {
        assert!(Instant::now() < deadline, "{}", a.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    b.stop();
}
