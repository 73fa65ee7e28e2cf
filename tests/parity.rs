//! Domino parity in routing (issue 9) on loopback: a busy server still takes mail
//! when it is the only one reachable, an up replica is preferred to a busy home, and
//! the replica on this router's own mailbox server comes first.

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn catalog(scratch: &Scratch, servers: &[(&str, u16)], mailbox: (&str, &str, &[&str])) {
    let mut toml = String::new();
    for (name, port) in servers {
        toml.push_str(&format!(
            "[[server]]\nname = \"{name}\"\ncluster = \"c\"\naddress = \"127.0.0.1:{port}\"\n\n"
        ));
    }
    let reps: Vec<String> = mailbox.2.iter().map(|r| format!("\"{r}\"")).collect();
    toml.push_str(&format!(
        "[[mailbox]]\naddress = \"{}\"\nhome = \"{}\"\nreplicas = [{}]\n",
        mailbox.0,
        mailbox.1,
        reps.join(", ")
    ));
    let f = scratch.write("c.toml", &toml);
    scratch.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
}

fn router(scratch: Scratch, extra_routing: &str) -> Router {
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\nprobe_interval = \"200ms\"\n\
         probe_timeout = \"2s\"\nbusy_threshold = \"150ms\"\nrise = 1\nretry_initial = \"300ms\"\nretry_max = \"600ms\"\n\
         delivery_timeout = \"3s\"\n{extra_routing}"
    );
    Router::start_config(scratch, &config, port)
}

fn send(r: &Router, rcpt: &str) {
    let mut c = Client::hello(r.port);
    c.cmd("MAIL FROM:<sender@x.test>");
    expect(&c.cmd(&format!("RCPT TO:<{rcpt}>")), 250, "2.1.5");
    c.cmd("DATA");
    c.send_raw(b"Subject: parity\r\n\r\n.\r\n");
    expect(&c.reply(), 250, "2.0.0");
}

/// Waits until `servers` shows `name` in `state`.
fn wait_state(r: &Router, name: &str, state: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = r.scratch.ok(&["servers"]);
        if out
            .lines()
            .any(|l| l.starts_with(&format!("{name} ")) && l.contains(&format!(" {state} ")))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never {state}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_busy_home_with_no_replica_still_gets_the_mail() {
    let home = RecordingSink::start("m1");
    home.greeting_delay_ms.store(400, Ordering::SeqCst);
    let s = Scratch::new();
    catalog(&s, &[("m1", home.port)], ("u@c.test", "m1", &[]));
    let r = router(s, "");
    wait_state(&r, "m1", "busy");
    send(&r, "u@c.test");
    assert_eq!(home.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    r.wait_log("deliver home to m1: busy, but no replica is available");
}

#[test]
fn an_up_replica_is_preferred_to_a_busy_home() {
    let home = RecordingSink::start("m1");
    home.greeting_delay_ms.store(400, Ordering::SeqCst);
    let replica = RecordingSink::start("m2");
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port), ("m2", replica.port)],
        ("u@c.test", "m1", &["m2"]),
    );
    let r = router(s, "");
    wait_state(&r, "m1", "busy");
    send(&r, "u@c.test");
    assert_eq!(replica.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    assert!(home.messages().is_empty());
}

#[test]
fn the_replica_on_the_local_server_comes_first() {
    let mut home = RecordingSink::start("m1");
    home.down();
    let far = RecordingSink::start("m2");
    let local = RecordingSink::start("m3");
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port), ("m2", far.port), ("m3", local.port)],
        ("u@c.test", "m1", &["m2", "m3"]),
    );
    let r = router(s, "local_server = \"m3\"\n");
    send(&r, "u@c.test");
    assert_eq!(local.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    assert!(far.messages().is_empty());
    let explain = r.scratch.ok(&["route", "explain", "u@c.test"]);
    assert!(
        explain.contains("taken: the replica on this router's own server comes first"),
        "{explain}"
    );
}

/// `all-hops`: a foreign cluster's first router is down, the second takes the mail;
/// with the default `last-hop` the mail is held instead.
#[test]
fn all_hops_reaches_a_second_next_hop_router() {
    for (scope, reached) in [("all-hops", true), ("last-hop", false)] {
        let mut first = RecordingSink::start("router-a");
        first.down();
        let second = RecordingSink::start("router-b");
        let w1 = RecordingSink::start("w1");
        let s = Scratch::new();
        let toml = format!(
            "[[cluster]]\nname = \"west\"\nrouters = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\n\
             [[server]]\nname = \"w1\"\ncluster = \"west\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[mailbox]]\naddress = \"w@c.test\"\nhome = \"w1\"\n",
            first.port, second.port, w1.port
        );
        let f = s.write("two.toml", &toml);
        s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
        let r = router(
            s,
            &format!("local_cluster = \"east\"\nfailover = \"{scope}\"\n"),
        );
        send(&r, "w@c.test");
        if reached {
            assert_eq!(
                second.wait_for(1, 10).len(),
                1,
                "{scope}: log:\n{}",
                r.log()
            );
        } else {
            std::thread::sleep(Duration::from_millis(1500));
            assert!(
                second.messages().is_empty(),
                "{scope}: the second router was used"
            );
            r.wait_log("no router of cluster west answered");
        }
        assert!(
            w1.messages().is_empty(),
            "{scope}: the west home is not ours to deliver to"
        );
    }
}

#[test]
fn failover_off_holds() {
    let mut home = RecordingSink::start("m1");
    home.down();
    let replica = RecordingSink::start("m2");
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port), ("m2", replica.port)],
        ("u@c.test", "m1", &["m2"]),
    );
    let r = router(s, "failover = \"off\"\n");
    send(&r, "u@c.test");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(replica.messages().is_empty(), "failover off: no replica");
    let explain = r.scratch.ok(&["route", "explain", "u@c.test"]);
    assert!(explain.contains("not tried: failover is off"), "{explain}");
}

#[test]
fn hold_undeliverable_keeps_refused_mail_for_release_or_bounce() {
    let home = RecordingSink::start("m1");
    home.refuse.lock().unwrap().push("u@c.test".into());
    let senders = RecordingSink::start("m2");
    let s = Scratch::new();
    let toml = format!(
        "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
         [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
         [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n\n\
         [[mailbox]]\naddress = \"sender@c.test\"\nhome = \"m2\"\n",
        home.port, senders.port
    );
    let f = s.write("c.toml", &toml);
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let r = router(s, "hold_undeliverable = true\n");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut c = Client::hello(r.port);
        c.cmd("MAIL FROM:<sender@c.test>");
        c.cmd("RCPT TO:<u@c.test>");
        c.cmd("DATA");
        c.send_raw(b"Subject: refused at first\r\n\r\n.\r\n");
        let reply = c.reply();
        expect(&reply, 250, "2.0.0");
        ids.push(reply.text().rsplit(' ').next().unwrap_or("").to_string());
    }
    // Refused with 550: kept, no bounce.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = r.scratch.ok(&["queue", "list"]);
        if list.matches("<u@c.test>: undeliverable").count() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{list}\n{}", r.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(senders.messages().is_empty(), "no bounce while held");
    let show = r.scratch.ok(&["queue", "show", &ids[0]]);
    assert!(
        show.contains("undeliverable, held for an administrator: ") && show.contains("550"),
        "{show}"
    );
    // The mailbox server is fixed: release delivers the first message.
    home.refuse.lock().unwrap().clear();
    assert_eq!(
        r.scratch.ok(&["queue", "release", &ids[0]]),
        format!("{}: 1 recipient(s) released for delivery\n", ids[0])
    );
    assert_eq!(home.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    // The second is bounced by hand: the DSN goes to the sender.
    r.scratch.ok(&["queue", "bounce", &ids[1]]);
    let dsn = senders.wait_for(1, 10);
    assert_eq!(dsn.len(), 1, "log:\n{}", r.log());
    assert!(String::from_utf8_lossy(&dsn[0].data).contains("Status: 5.1.1"));
    let (code, _, err) = r.scratch.run(&["queue", "release", &ids[0]]);
    assert_eq!(code, 2, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(r.scratch.ok(&["queue", "list"]).contains("0 message(s)"));
}

#[test]
fn a_home_slowed_below_its_availability_threshold_is_passed_over() {
    let home = RecordingSink::start("m1");
    let replica = RecordingSink::start("m2");
    let s = Scratch::new();
    // Only m1 has a threshold: the default (0) never makes a server busy.
    let f = s.write(
        "c.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\navailability_threshold = 50\n\n\
             [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\nreplicas = [\"m2\"]\n",
            home.port, replica.port
        ),
    );
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let r = router(s, "");
    // The baseline is learnt while m1 answers at once...
    std::thread::sleep(Duration::from_millis(700));
    wait_state(&r, "m1", "up");
    // ...then its greeting slows to 12x the 5 ms floor, still well under the
    // absolute busy_threshold (150 ms): only the index can tell.
    home.greeting_delay_ms.store(60, Ordering::SeqCst);
    wait_state(&r, "m1", "busy");
    let servers = r.scratch.ok(&["servers"]);
    let line = servers
        .lines()
        .find(|l| l.starts_with("m1 "))
        .unwrap_or_default();
    assert!(
        line.contains("availability index") && line.contains("below threshold 50"),
        "{servers}"
    );
    send(&r, "u@c.test");
    assert_eq!(replica.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    assert!(home.messages().is_empty());
    // Fast again: the index recovers and new mail goes home.
    home.greeting_delay_ms.store(0, Ordering::SeqCst);
    wait_state(&r, "m1", "up");
    send(&r, "u@c.test");
    assert_eq!(home.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
}
