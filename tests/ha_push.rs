//! The MASTER's side of the HA queue push (issue 13 item 1, issue 14 item 2),
//! driven by a fake SLAVE over a real, authenticated HA link to a real router:
//! a repeated push is not delivered twice (tombstones), a message with the same
//! id, size and sender but other content is not "the same", and a pushed
//! recipient outside the catalog is bounced, not relayed.

mod common;
mod ha_common;
use clustermail::ha::link::{Link, Msg};
use clustermail::queue::{dsn, Envelope, QueueId, Recipient};
use common::{RecordingSink, Router, Scratch};
use ha_common::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A primary alone (its peer never answers): MASTER after `heartbeat_lost`;
/// mail outside the catalog goes to `outside` (relay_host).
fn lone_master(home: u16, outside: u16) -> (Router, Ports) {
    let p = ports();
    let s = Scratch::new();
    catalog(&s, home);
    let cfg = config(&p, 0, "slave", "pair-secret").replace(
        "[routing]\n",
        &format!("[routing]\nrelay_host = \"127.0.0.1:{outside}\"\n"),
    );
    let r = Router::start_config(s, &cfg, p.smtp[0]);
    wait_mode(&r, "MASTER", 10);
    (r, p)
}

/// An envelope as a SLAVE holds it: (address, catalog mailbox or "" outside).
fn envelope(sender: Option<&str>, rcpts: &[(&str, &str)], message: &[u8]) -> Envelope {
    Envelope {
        id: QueueId::new(),
        sender: sender.map(str::to_string),
        recipients: rcpts
            .iter()
            .map(|(a, m)| Recipient::new(a.to_string(), m.to_string()))
            .collect(),
        client_ip: "127.0.0.1".parse().expect("ip"),
        helo: "unit1.test".into(),
        received_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64,
        size: message.len() as u64,
        smtputf8: false,
        eight_bit: false,
    }
}

/// Pushes one message as the SLAVE would; the MASTER's answer.
fn push(ha_port: u16, env: &Envelope, message: &[u8]) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let answer = rt.block_on(async {
        let addr = format!("127.0.0.1:{ha_port}");
        let mut l = Link::connect(&addr, "pair-secret", Duration::from_secs(5)).await?;
        let push = Msg::Push {
            envelope: env.clone(),
            message: message.to_vec(),
        };
        l.call(&push, Duration::from_secs(30)).await
    });
    match answer {
        Ok(Msg::Stored) => "Stored".into(),
        other => format!("{other:?}"),
    }
}

#[test]
fn a_push_repeated_after_delivery_is_not_delivered_again() {
    let home = RecordingSink::start("m1");
    let outside = RecordingSink::start("out");
    let (r, p) = lone_master(home.port, outside.port);
    let msg = b"Received: from x by unit1.test\r\nSubject: pushed-once\r\n\r\nbody\r\n";
    let env = envelope(Some("sender@x.test"), &[("u@c.test", "u@c.test")], msg);
    assert_eq!(push(p.ha[0], &env, msg), "Stored");
    assert_eq!(home.wait_for(1, 10).len(), 1, "{}", r.log());
    wait_until(10, "the MASTER's queue empty", || {
        status(&r).contains("local queue:   0 message(s)")
    });
    // The "Stored" answer was lost (or the SLAVE crashed before its remove): the
    // SLAVE pushes the very same message again, after it was delivered.
    assert_eq!(push(p.ha[0], &env, msg), "Stored");
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * 8));
    assert_eq!(subjects(&home), ["pushed-once"], "{}", r.log());
    let s = status(&r);
    assert!(s.contains("1 repeated push(es) recognised"), "{s}");
    // Same id, same size, same sender, other content: another message, delivered.
    let other = b"Received: from x by unit1.test\r\nSubject: pushed-othr\r\n\r\nbody\r\n";
    assert_eq!(other.len(), msg.len());
    assert_eq!(push(p.ha[0], &env, other), "Stored");
    assert_eq!(home.wait_for(2, 10).len(), 2, "{}", r.log());
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * 4));
    assert_eq!(subjects(&home), ["pushed-once", "pushed-othr"]);
    assert!(outside.messages().is_empty());
}

#[test]
fn a_pushed_recipient_outside_the_catalog_is_bounced_not_relayed() {
    let home = RecordingSink::start("m1");
    let outside = RecordingSink::start("out");
    let (r, p) = lone_master(home.port, outside.port);
    let msg = b"Received: from x by unit1.test\r\nSubject: relay-attempt\r\n\r\nbody\r\n";
    let env = envelope(
        Some("u@c.test"),
        &[("victim@far.test", ""), ("u@c.test", "u@c.test")],
        msg,
    );
    assert_eq!(push(p.ha[0], &env, msg), "Stored");
    // The catalog recipient gets the message, the sender (u@c.test) the bounce.
    let got = home.wait_for(2, 10);
    assert_eq!(got.len(), 2, "{}", r.log());
    let bounce = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .find(|t| t.contains("Undelivered Mail Returned to Sender"))
        .expect("a bounce to the sender");
    assert!(
        bounce.contains("Final-Recipient: rfc822; victim@far.test") && bounce.contains("5.7.1"),
        "{bounce}"
    );
    assert!(r
        .log()
        .contains("pushed recipient refused by the relay policy"));
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * 5));
    assert!(outside.messages().is_empty(), "relayed outside");
    // A bounce the pair made (null sender, a delivery report) still goes out.
    let original = envelope(Some("someone@far.test"), &[("u@c.test", "u@c.test")], b"");
    let report = dsn::build(
        "unit1.test",
        QueueId::new(),
        &original,
        b"Subject: lost\r\n\r\nx\r\n",
        &[dsn::Failure {
            address: "u@c.test",
            reply: "550 5.1.1 no such user",
        }],
    );
    let back = envelope(None, &[("someone@far.test", "")], &report);
    assert_eq!(push(p.ha[0], &back, &report), "Stored");
    let out = outside.wait_for(1, 10);
    assert_eq!(out.len(), 1, "{}", r.log());
    assert_eq!(out[0].rcpts, ["someone@far.test"]);
}
