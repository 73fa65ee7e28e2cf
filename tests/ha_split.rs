//! HA exactly-once (issue 13 items 1, 6, 7, 8): a split brain through cuttable
//! proxies, catalog versions across the units, a password mismatch, and the HA
//! gate at MAIL. Real router processes on loopback.

mod common;
mod ha_common;
use common::{expect, scale, Client, RecordingSink, Router, Scratch};
use ha_common::*;
use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// A pair whose units reach each other (HA link and SMTP check) only through
/// proxies, so that the test can partition them.
fn partitionable(home: u16) -> (Router, Router, [Proxy; 4], Ports) {
    let p = ports();
    let proxies = [p.ha[1], p.smtp[1], p.ha[0], p.smtp[0]].map(Proxy::start);
    let configs = [
        config_via(
            &p,
            0,
            "slave",
            "pair-secret",
            proxies[0].port,
            proxies[1].port,
        ),
        config_via(
            &p,
            1,
            "slave",
            "pair-secret",
            proxies[2].port,
            proxies[3].port,
        ),
    ];
    let (a, b) = pair_with(&p, home, configs);
    (a, b, proxies, p)
}

/// `n` messages of the same size from one sender into unit `port`, the end of
/// each DATA in lockstep with the other unit's sender (same millisecond).
fn lockstep_sender(port: u16, unit: usize, n: usize, barrier: Arc<Barrier>) -> Vec<String> {
    let mut c = Client::hello(port);
    let mut ids = Vec::new();
    for i in 0..n {
        expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
        expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
        assert_eq!(c.cmd("DATA").code, 354);
        barrier.wait();
        c.send_raw(format!("Subject: split-{unit}-{i:05}\r\n\r\nsame size\r\n.\r\n").as_bytes());
        let r = c.reply();
        expect(&r, 250, "2.0.0");
        ids.push(r.text());
    }
    ids
}

#[test]
fn a_split_brain_then_reunion_delivers_every_message_once() {
    let n = 20 * scale();
    let mut home = RecordingSink::start("m1");
    home.down();
    let (a, b, proxies, p) = partitionable(home.port);
    // A true partition: neither the HA link nor the SMTP check gets through.
    for x in &proxies {
        x.cut();
    }
    wait_mode(&b, "MASTER", 15);
    assert_eq!(mode(&a), "MASTER", "both MASTER during the partition");
    let barrier = Arc::new(Barrier::new(2));
    let senders: Vec<_> = [p.smtp[0], p.smtp[1]]
        .into_iter()
        .enumerate()
        .map(|(unit, port)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || lockstep_sender(port, unit, n, barrier))
        })
        .collect();
    let accepted: Vec<Vec<String>> = senders
        .into_iter()
        .map(|s| s.join().expect("sender"))
        .collect();
    let ids: BTreeSet<&String> = accepted.iter().flatten().collect();
    // Reunion: one MASTER (the higher epoch), the other pushes its whole queue.
    let reunited = Instant::now();
    for x in &proxies {
        x.restore();
    }
    wait_until(
        30 + n as u64 / 5,
        "one MASTER, the other's queue pushed",
        || {
            let (ma, mb) = (mode(&a), mode(&b));
            let loser = match (ma.as_str(), mb.as_str()) {
                ("MASTER", "SLAVE") => &b,
                ("SLAVE", "MASTER") => &a,
                _ => return false,
            };
            status(loser).contains("local queue:   0 message(s)")
        },
    );
    let (winner, loser) = if mode(&a) == "MASTER" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let pushed_in = reunited.elapsed();
    assert!(
        status(winner).contains(&format!("local queue:   {} message(s)", 2 * n)),
        "the MASTER holds all {} messages:\n{}\n{}",
        2 * n,
        status(winner),
        winner.log()
    );
    // The homes come back: 2N distinct messages, none twice.
    home.up();
    let got = home.wait_for(2 * n, 30 + n as u64 / 5);
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * 5));
    let subjects = subjects(&home);
    let distinct: BTreeSet<&String> = subjects.iter().collect();
    assert_eq!(
        (got.len(), subjects.len(), distinct.len()),
        (2 * n, 2 * n, 2 * n),
        "{}\n{}",
        status(winner),
        loser.log()
    );
    println!(
        "split brain: {} messages accepted ({} distinct queue ids), {} delivered once each; \
         reunion to queue pushed in {} ms",
        2 * n,
        ids.len(),
        distinct.len(),
        pushed_in.as_millis()
    );
}

#[test]
fn a_mailbox_imported_on_the_secondary_survives_the_primarys_return() {
    let p = ports();
    let mut home = RecordingSink::start("m1");
    let (mut a, b) = pair(&p, home.port, "restore");
    a.kill9();
    wait_mode(&b, "MASTER", 10);
    // As the README tells admins: the import goes to the MASTER, the secondary.
    let f = b.scratch.write(
        "new.toml",
        "[[mailbox]]\naddress = \"new@c.test\"\nhome = \"m1\"\n",
    );
    b.scratch
        .ok(&["catalog", "import", "--merge", &f.display().to_string()]);
    // Mail accepted for it while the home is down waits in the secondary's queue.
    home.down();
    send_to(p.smtp[1], "new@c.test", "for-new-during-outage");
    // The primary returns (on_failure = restore) and becomes MASTER again.
    a.restart();
    wait_mode(&a, "MASTER", 15);
    wait_mode(&b, "SLAVE", 10);
    // It took the newer catalog first: the mailbox is accepted there...
    let mut c = Client::hello(p.smtp[0]);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<new@c.test>"), 250, "2.1.5");
    drop(c);
    send_to(p.smtp[0], "new@c.test", "for-new-after-return");
    // ...the secondary kept it too, and the held mail is delivered, not bounced.
    assert!(b
        .scratch
        .ok(&["catalog", "show", "new@c.test"])
        .contains("new@c.test"));
    home.up();
    let got = home.wait_for(2, 20);
    assert_eq!(
        subjects(&home),
        ["for-new-after-return", "for-new-during-outage"],
        "{}\n{}",
        status(&a),
        a.log()
    );
    assert!(got.iter().all(|m| m.rcpts == ["new@c.test"]), "{got:?}");
    assert!(
        status(&a).contains("last copied from the peer"),
        "{}",
        status(&a)
    );
}

#[test]
fn a_password_mismatch_leaves_one_master_and_raises_the_alarm() {
    let p = ports();
    let home = RecordingSink::start("m1");
    let a = Scratch::new();
    catalog(&a, home.port);
    let a = Router::start_config(a, &config(&p, 0, "slave", "pair-secret"), p.smtp[0]);
    let metrics = common::free_port();
    let b = Router::start_config(
        Scratch::new(),
        &format!(
            "metrics_listen = \"127.0.0.1:{metrics}\"\n{}",
            config(&p, 1, "slave", "wrong-secret")
        ),
        p.smtp[1],
    );
    wait_mode(&a, "MASTER", 10);
    // Long past heartbeat_lost: the secondary never takes over from a peer that
    // serves SMTP (220), and says why.
    let until = Instant::now() + Duration::from_millis(INTERVAL_MS * LOST * 6);
    while Instant::now() < until {
        assert_eq!(mode(&a), "MASTER");
        assert_ne!(mode(&b), "MASTER", "{}\n{}", status(&b), b.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(greeting(p.smtp[0]), 220);
    assert_eq!(greeting(p.smtp[1]), 421);
    for r in [&a, &b] {
        let s = status(r);
        assert!(s.contains("ALARM:         HA authentication failed"), "{s}");
        assert!(r.log().contains("HA ALARM"), "{}", r.log());
    }
    assert!(
        !status(&a).contains("peer's beats"),
        "nothing it says is taken"
    );
    // The metric too.
    let body = http_get(metrics, "/metrics");
    let failures: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("clustermail_ha_auth_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "{body}");
}

/// The body of `GET path` from the metrics endpoint on `port`.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn a_session_opened_before_a_demotion_gets_421_at_its_next_mail() {
    let p = ports();
    let home = RecordingSink::start("m1");
    let (a, b) = pair(&p, home.port, "slave");
    let mut c = Client::hello(p.smtp[0]);
    // A first transaction while MASTER.
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RSET"), 250, "2.0.0");
    // The secondary is made MASTER (higher epoch): the primary is demoted.
    let out = b.scratch.ok(&["ha", "set-mode", "master"]);
    assert!(out.contains("effective mode: MASTER"), "{out}");
    wait_until(10, "the primary demoted", || mode(&a) != "MASTER");
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 421, "4.3.2");
    assert!(c.closed(), "closed after the 421");
    // Mail goes to the new MASTER.
    send(p.smtp[1], "to-the-new-master");
    assert_eq!(home.wait_for(1, 10).len(), 1);
}
