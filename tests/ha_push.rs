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

/// The path between the units fails right after the MASTER stored a pushed
/// message, before its `Stored` reaches the SLAVE; then the MASTER is lost too.
/// The old SLAVE takes over with its copy and delivers it; when the other unit
/// comes back and pushes the copy it stored, that copy is recognised as the very
/// same message (the push left it in doubt) and not delivered a second time.
#[test]
fn a_push_whose_answer_was_lost_is_not_delivered_again_after_the_roles_change() {
    let p = ports();
    let mut home = RecordingSink::start("m1");
    home.down();
    // The primary reaches the secondary's HA port through a proxy that can lose
    // the answer to a push; the secondary reaches the primary directly.
    let proxy = Proxy::start(p.ha[1]);
    let unshadowed = "shadow = \"off\"\n";
    let configs = [
        config_via(&p, 0, "slave", "pair-secret", proxy.port, p.smtp[1]) + unshadowed,
        config(&p, 1, "slave", "pair-secret") + unshadowed,
    ];
    let (mut a, mut b) = pair_with(&p, home.port, configs);
    // Held on the primary (the home is down): its large body makes the push the
    // only large request on the path.
    let mut c = common::Client::hello(p.smtp[0]);
    common::expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    common::expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    c.cmd("DATA");
    let body = format!("{}\r\n", "0123456789abcdef".repeat(4)).repeat(1024);
    c.send_raw(format!("Subject: in-doubt\r\n\r\n{body}.\r\n").as_bytes());
    common::expect(&c.reply(), 250, "2.0.0");
    a.kill9();
    wait_mode(&b, "MASTER", 10);
    // The primary returns as SLAVE and pushes; the secondary stores the message,
    // its answer is lost with the path, and then the secondary is lost as well.
    proxy.drop_answer_to_large_request(32 * 1024);
    a.restart();
    wait_until(20, "the push's answer dropped", || {
        proxy.dropped.load(std::sync::atomic::Ordering::SeqCst)
    });
    b.kill9();
    assert!(
        b.log().contains("HA: message pushed by the peer queued"),
        "{}",
        b.log()
    );
    // The primary takes over with its own copy and delivers it.
    wait_mode(&a, "MASTER", 15);
    home.up();
    assert_eq!(home.wait_for(1, 15).len(), 1, "{}", a.log());
    wait_until(10, "the primary's queue empty", || {
        status(&a).contains("local queue:   0 message(s)")
    });
    // The secondary returns as SLAVE and pushes the copy it stored.
    b.restart();
    wait_mode(&b, "SLAVE", 15);
    wait_until(15, "the secondary's push finished", || {
        status(&b).contains("local queue:   0 message(s)")
    });
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * 8));
    assert_eq!(subjects(&home), ["in-doubt"], "{}\n{}", a.log(), b.log());
    let s = status(&a);
    assert!(s.contains("1 repeated push(es) recognised"), "{s}");
}
