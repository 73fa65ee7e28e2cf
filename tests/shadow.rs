//! Shadow redundancy (issue 20): the MASTER's 250 waits for the SLAVE's durable
//! shadow copy, so a MASTER whose disk is lost loses no acknowledged mail. Two
//! router processes on loopback, kill -9, data directories deleted.

mod common;
mod ha_common;
use common::{expect, scale, Client, RecordingSink, Router};
use ha_common::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A pair with `ha.shadow = shadow`, releases every `release_ms`.
fn shadow_pair(p: &Ports, home: u16, shadow: &str, release_ms: u64) -> (Router, Router) {
    shadow_pair_on_failure(p, home, shadow, release_ms, "slave")
}

fn shadow_pair_on_failure(
    p: &Ports,
    home: u16,
    shadow: &str,
    release_ms: u64,
    on_failure: &str,
) -> (Router, Router) {
    let configs = [0, 1].map(|i| {
        config(p, i, on_failure, "pair-secret")
            + &format!("shadow = \"{shadow}\"\nshadow_release_interval = \"{release_ms}ms\"\n")
    });
    pair_with(p, home, configs)
}

/// The number in `ha status`'s shadow line before `what`.
fn shadow_count(r: &Router, what: &str) -> u64 {
    let s = status(r);
    let line = s
        .lines()
        .find(|l| l.starts_with("shadow") && l.contains(what))
        .unwrap_or_default()
        .to_string();
    let before = line.split(what).next().unwrap_or_default();
    before
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

/// How many times the log says a shadow copy was promoted.
fn promoted(r: &Router) -> usize {
    r.log()
        .matches("shadow copy promoted into the queue")
        .count()
}

#[test]
fn a_primary_whose_disk_is_lost_loses_no_acknowledged_mail() {
    let n = 10 * scale();
    let p = ports();
    let mut home = RecordingSink::start("m1");
    home.down();
    let (mut a, b) = shadow_pair(&p, home.port, "preferred", 1000);
    for i in 0..n {
        send(p.smtp[0], &format!("held-{i}"));
    }
    // Every 250 came after the SLAVE's copy was on disk.
    assert_eq!(
        shadow_count(&b, "held for the peer"),
        n as u64,
        "{}",
        status(&b)
    );
    let killed = Instant::now();
    a.kill9();
    std::fs::remove_dir_all(a.scratch.path().join("data")).expect("delete the data dir");
    wait_mode(&b, "MASTER", 20);
    wait_until(20 + n as u64 / 10, "shadows promoted", || promoted(&b) == n);
    let promoted_after = killed.elapsed();
    home.up();
    let got = home.wait_for(n, 60 + n as u64 / 10);
    eprintln!(
        "disk loss: acknowledged {n}, promoted {} ({} ms after kill -9), delivered {} distinct of {} ({} missing)",
        promoted(&b),
        promoted_after.as_millis(),
        subjects(&home).iter().collect::<std::collections::HashSet<_>>().len(),
        got.len(),
        n.saturating_sub(got.len())
    );
    let mut want: Vec<String> = (0..n).map(|i| format!("held-{i}")).collect();
    want.sort();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(subjects(&home), want, "{}", b.log());
    assert_eq!(got.len(), n);
    assert_eq!(shadow_count(&b, "held for the peer"), 0, "{}", status(&b));
    let event = format!("the MASTER was lost: {n} shadow copies promoted into the queue");
    assert!(status(&b).contains(&event), "{}", status(&b));
}

#[test]
fn a_primary_killed_mid_stream_duplicates_at_most_its_last_release_interval() {
    let release = Duration::from_millis(1000);
    let p = ports();
    let home = RecordingSink::start("m1");
    let (mut a, b) = shadow_pair(&p, home.port, "preferred", release.as_millis() as u64);
    // A sender acknowledging into `acked` until the primary dies.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (acked, stop, port) = (acked.clone(), stop.clone(), p.smtp[0]);
        std::thread::spawn(move || {
            for i in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let subject = format!("stream-{i}");
                let ok = std::panic::catch_unwind(|| send(port, &subject)).is_ok();
                if !ok {
                    return;
                }
                acked.lock().expect("lock").push(subject);
            }
        })
    };
    // The sink's count over time, to know what finished in the last interval.
    let counts = Arc::new(Mutex::new(Vec::<(Instant, usize)>::new()));
    let sampler = {
        let (counts, stop, received) = (counts.clone(), stop.clone(), home.received.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let n = received.lock().expect("lock").len();
                counts.lock().expect("lock").push((Instant::now(), n));
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    wait_until(60, "a stream of deliveries", || home.messages().len() >= 40);
    let killed = Instant::now();
    a.kill9();
    let _ = sender.join();
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let acked = acked.lock().expect("lock").clone();
    wait_mode(&b, "MASTER", 20);
    // Every acknowledged message delivered at least once.
    wait_until(60, "every acknowledged message delivered", || {
        let got = subjects(&home);
        acked.iter().all(|s| got.contains(s))
    });
    std::thread::sleep(Duration::from_secs(2));
    let mut times: HashMap<String, usize> = HashMap::new();
    for s in subjects(&home) {
        *times.entry(s).or_default() += 1;
    }
    let duplicates: usize = times.values().map(|n| n - 1).sum();
    let counts = counts.lock().expect("lock").clone();
    let at = |t: Instant| {
        counts
            .iter()
            .take_while(|(when, _)| *when <= t)
            .last()
            .map_or(0, |(_, n)| *n)
    };
    // What the primary finished in its last release interval (with a second's
    // slack for a loaded machine: its removal, then the release on the wire).
    let window = release + Duration::from_secs(1);
    let finished_last = at(killed) - at(killed.checked_sub(window).expect("time"));
    let promoted = promoted(&b);
    eprintln!(
        "acked {}, delivered {}, duplicates {duplicates}, promoted {promoted}, finished in the last {} ms: {finished_last}",
        acked.len(),
        times.len(),
        window.as_millis()
    );
    assert!(
        duplicates <= promoted,
        "every duplicate is a counted promotion"
    );
    assert!(
        duplicates <= finished_last,
        "duplicates {duplicates} > finished in the last interval {finished_last}"
    );
}

#[test]
fn the_old_primary_returning_with_its_queue_delivers_each_promoted_message_once() {
    let n = 5;
    let p = ports();
    let mut home = RecordingSink::start("m1");
    home.down();
    let (mut a, b) = shadow_pair(&p, home.port, "preferred", 1000);
    for i in 0..n {
        send(p.smtp[0], &format!("held-{i}"));
    }
    a.kill9();
    wait_mode(&b, "MASTER", 20);
    wait_until(20, "shadows promoted", || promoted(&b) == n);
    // The promoted copies are delivered, then the old primary returns with its
    // queue intact and pushes the very same messages.
    home.up();
    assert_eq!(home.wait_for(n, 60).len(), n);
    a.restart();
    wait_mode(&a, "SLAVE", 20);
    wait_until(30, "the old primary's queue pushed", || {
        status(&a).contains(&format!("queue push:    {n} pushed, 0 left"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let mut want: Vec<String> = (0..n).map(|i| format!("held-{i}")).collect();
    want.sort();
    assert_eq!(subjects(&home), want, "each delivered once");
    assert!(
        status(&b).contains(&format!("pushes taken:  {n} repeated push(es) recognised")),
        "{}",
        status(&b)
    );
}

#[test]
fn an_old_primary_restoring_itself_does_not_deliver_what_the_secondary_promoted() {
    let n = 5;
    let p = ports();
    let mut home = RecordingSink::start("m1");
    home.down();
    let (mut a, b) = shadow_pair_on_failure(&p, home.port, "preferred", 1000, "restore");
    for i in 0..n {
        send(p.smtp[0], &format!("held-{i}"));
    }
    a.kill9();
    wait_mode(&b, "MASTER", 20);
    wait_until(20, "shadows promoted", || promoted(&b) == n);
    home.up();
    assert_eq!(home.wait_for(n, 60).len(), n);
    // Back with its queue intact, FAILED, then MASTER again (on_failure = restore).
    a.restart();
    wait_mode(&a, "MASTER", 30);
    wait_mode(&b, "SLAVE", 30);
    send(p.smtp[0], "after");
    assert_eq!(home.wait_for(n + 1, 30).len(), n + 1);
    std::thread::sleep(Duration::from_secs(2));
    let mut want: Vec<String> = (0..n).map(|i| format!("held-{i}")).collect();
    want.push("after".into());
    want.sort();
    assert_eq!(subjects(&home), want, "each delivered once\n{}", a.log());
}

#[test]
fn a_bounce_made_by_the_lost_primary_is_not_lost() {
    let p = ports();
    let m1 = RecordingSink::start("m1");
    let mut m2 = RecordingSink::start("m2");
    m2.down();
    let (mut a, b) = shadow_pair(&p, m1.port, "preferred", 300);
    // The sender's mailbox is homed on m2 (down): its bounce is held.
    let f = a.scratch.write(
        "c2.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n\n\
             [[mailbox]]\naddress = \"s@c.test\"\nhome = \"m2\"\n",
            m1.port, m2.port
        ),
    );
    a.scratch
        .ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    wait_catalog(&b, m2.port);
    m1.refuse.lock().expect("lock").push("u@c.test".into());
    let mut c = Client::hello(p.smtp[0]);
    expect(&c.cmd("MAIL FROM:<s@c.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    c.cmd("DATA");
    c.send_raw(b"Subject: refused\r\n\r\n.\r\n");
    expect(&c.reply(), 250, "2.0.0");
    // The original is released, the bounce the MASTER made is shadowed.
    wait_until(30, "the bounce queued, the original gone", || {
        a.queue_ids().len() == 1
    });
    std::thread::sleep(Duration::from_millis(1500)); // releases: every 300 ms
    assert_eq!(shadow_count(&b, "held for the peer"), 1, "{}", status(&b));
    a.kill9();
    std::fs::remove_dir_all(a.scratch.path().join("data")).expect("delete the data dir");
    wait_mode(&b, "MASTER", 20);
    wait_until(20, "the bounce promoted", || promoted(&b) == 1);
    let line = b
        .log()
        .lines()
        .find(|l| l.contains("shadow copy promoted"))
        .map(str::to_string);
    assert!(
        line.as_deref().is_some_and(|l| l.contains("from=\"<>\"")),
        "{line:?}"
    );
    m2.up();
    let got = m2.wait_for(1, 60);
    assert_eq!(got.len(), 1, "{}", b.log());
    assert_eq!(got[0].from, "", "a bounce: null sender");
    assert!(String::from_utf8_lossy(&got[0].data).contains("report-type=delivery-status"));
}

/// One transaction up to DATA's 354 while the pair is healthy.
fn open_transaction(port: u16) -> Client {
    let mut c = Client::hello(port);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c
}

#[test]
fn required_refuses_without_the_slave_and_preferred_accepts_degraded() {
    let p = ports();
    let home = RecordingSink::start("m1");
    let (a, mut b) = shadow_pair(&p, home.port, "required", 1000);
    send(p.smtp[0], "shadowed");
    assert_eq!(home.wait_for(1, 30).len(), 1);
    // A transaction opened before the SLAVE stops: its data is refused, and the
    // message is never delivered.
    let mut c = open_transaction(p.smtp[0]);
    b.kill9();
    wait_until(20, "the MASTER sees the SLAVE gone", || {
        status(&a).contains("unreachable")
    });
    c.send_raw(b"Subject: unshadowed\r\n\r\n.\r\n");
    expect(&c.reply(), 451, "4.3.0");
    // New transactions are refused at MAIL.
    let mut c = Client::hello(p.smtp[0]);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 451, "4.3.0");
    assert!(status(&a).contains("DEGRADED"), "{}", status(&a));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        subjects(&home),
        ["shadowed"],
        "a 451'd message is never delivered"
    );
    drop((a, b));

    let p = ports();
    let (a, mut b) = shadow_pair(&p, home.port, "preferred", 1000);
    b.kill9();
    wait_until(20, "the MASTER sees the SLAVE gone", || {
        status(&a).contains("unreachable")
    });
    send(p.smtp[0], "degraded");
    let s = status(&a);
    assert!(s.contains("shadow:        preferred, DEGRADED"), "{s}");
    assert!(a.log().contains("HA shadow: DEGRADED"), "{}", a.log());
    assert!(home.wait_for(2, 30).len() == 2);
}

#[test]
fn concurrent_messages_have_several_shadow_batches_in_flight_and_all_are_answered() {
    let p = ports();
    let home = RecordingSink::start("m1");
    let (a, b) = shadow_pair(&p, home.port, "preferred", 1000);
    let sessions = 20;
    let mut sent = 0;
    // Each message's 250 comes after its batch is durable on the SLAVE; with
    // sessions finishing DATA while a batch is on its way, the next batches go
    // without waiting for its answer (rounds repeated on a slow machine).
    for round in 0..5 {
        let senders: Vec<_> = (0..sessions)
            .map(|i| {
                let port = p.smtp[0];
                std::thread::spawn(move || {
                    for j in 0..3 {
                        send(port, &format!("r{round}-s{i}-{j}"));
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().expect("sender");
        }
        sent += sessions * 3;
        if most_in_flight(&a) >= 2 {
            break;
        }
    }
    let s = status(&a);
    assert!(most_in_flight(&a) >= 2, "never two batches in flight: {s}");
    assert!(s.contains("0 batches in flight"), "all answered: {s}");
    assert!(s.contains("shadow:        preferred, ok"), "{s}");
    assert!(
        s.contains(&format!("; {sent} copies confirmed in ")),
        "one copy per message, none again in the background: {s}"
    );
    assert_eq!(home.wait_for(sent, 60).len(), sent);
    // Released once delivered.
    wait_until(30, "every shadow released", || {
        shadow_count(&b, "held for the peer") == 0
    });
}

/// The most shadow batches the MASTER had in flight at once (`ha status`).
fn most_in_flight(a: &Router) -> u64 {
    let s = status(a);
    s.split("batches in flight (at most ")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
