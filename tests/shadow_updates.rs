//! Shadow copies follow their message: a recipient the MASTER delivered (or an
//! administrator's hold) reaches the SLAVE's copy, so a takeover does not deliver
//! that recipient again however long the message stayed in the queue. Two router
//! processes on loopback, kill -9, the primary's data directory deleted.

mod common;
mod ha_common;
use common::{expect, Client, RecordingSink, Router, Scratch};
use ha_common::*;
use std::time::Duration;

/// A shadowed pair (releases every 200 ms) whose catalog has u@c.test homed on
/// `m1` and v@c.test homed on `m2`.
fn pair_two_homes(p: &Ports, m1: u16, m2: u16) -> (Router, Router) {
    let a = Scratch::new();
    let f = a.write(
        "c.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m1}\"\n\n\
             [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m2}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n\n\
             [[mailbox]]\naddress = \"v@c.test\"\nhome = \"m2\"\n"
        ),
    );
    a.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let [ca, cb] = [0, 1].map(|i| {
        config(p, i, "slave", "pair-secret")
            + "shadow = \"preferred\"\nshadow_release_interval = \"200ms\"\n"
    });
    let a = Router::start_config(a, &ca, p.smtp[0]);
    let b = Router::start_config(Scratch::new(), &cb, p.smtp[1]);
    wait_mode(&a, "MASTER", 10);
    wait_mode(&b, "SLAVE", 10);
    wait_catalog(&b, m2);
    (a, b)
}

fn send_to_both(port: u16, subject: &str) {
    let mut c = Client::hello(port);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    expect(&c.cmd("RCPT TO:<v@c.test>"), 250, "2.1.5");
    c.cmd("DATA");
    c.send_raw(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes());
    expect(&c.reply(), 250, "2.0.0");
}

fn promoted(r: &Router) -> usize {
    r.log()
        .matches("shadow copy promoted into the queue")
        .count()
}

#[test]
fn a_recipient_delivered_before_a_takeover_is_not_delivered_again() {
    let p = ports();
    let m1 = RecordingSink::start("m1");
    let mut m2 = RecordingSink::start("m2");
    m2.down();
    let (mut a, b) = pair_two_homes(&p, m1.port, m2.port);
    // u@ is delivered at once; v@ is held, its home down, for longer than many
    // release intervals.
    send_to_both(p.smtp[0], "both");
    assert_eq!(m1.wait_for(1, 10).len(), 1, "{}", a.log());
    std::thread::sleep(Duration::from_millis(2000));
    // The primary and its disk are lost; the secondary promotes its copy.
    a.kill9();
    std::fs::remove_dir_all(a.scratch.path().join("data")).expect("delete the data dir");
    wait_mode(&b, "MASTER", 20);
    wait_until(20, "the shadow promoted", || promoted(&b) == 1);
    m2.up();
    assert_eq!(m2.wait_for(1, 20).len(), 1, "v@ delivered: {}", b.log());
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * 8));
    assert_eq!(m1.messages().len(), 1, "u@ delivered once:\n{}", b.log());
    assert_eq!(m2.messages().len(), 1);
}

#[test]
fn an_administrators_hold_survives_a_takeover() {
    let p = ports();
    let m1 = RecordingSink::start("m1");
    let mut m2 = RecordingSink::start("m2");
    m2.down();
    let (mut a, b) = pair_two_homes(&p, m1.port, m2.port);
    send_to_both(p.smtp[0], "held-by-admin");
    assert_eq!(m1.wait_for(1, 10).len(), 1, "{}", a.log());
    let ids = a.queue_ids();
    assert_eq!(ids.len(), 1, "{ids:?}");
    a.scratch.ok(&["queue", "hold", &ids[0]]);
    std::thread::sleep(Duration::from_millis(2000));
    a.kill9();
    std::fs::remove_dir_all(a.scratch.path().join("data")).expect("delete the data dir");
    wait_mode(&b, "MASTER", 20);
    wait_until(20, "the shadow promoted", || promoted(&b) == 1);
    m2.up();
    // Held for the administrator on the new MASTER too: not attempted.
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * 10));
    assert!(m2.messages().is_empty(), "{}", b.log());
    let shown = b.scratch.ok(&["queue", "list", "--state", "on-hold"]);
    assert!(shown.contains(&ids[0]), "{shown}");
    b.scratch.ok(&["queue", "unhold", &ids[0]]);
    assert_eq!(m2.wait_for(1, 20).len(), 1, "{}", b.log());
    assert_eq!(m1.messages().len(), 1, "u@ delivered once");
}
