//! Cluster routing end to end on loopback: the router process, mailbox servers
//! that record what they get (and Postfix's smtp-sink), and the catalog pointing
//! at them. Short probe and retry intervals keep each scenario to a few seconds.

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch, SmtpSink};
use std::time::Duration;

const ROUTING: &str =
    "[routing]\nprobe_interval = \"200ms\"\nprobe_timeout = \"500ms\"\nrise = 1\n\
retry_initial = \"300ms\"\nretry_max = \"600ms\"\ndelivery_timeout = \"2s\"\n";

/// Writes a catalog of servers (name, port, state) and mailboxes, imports it.
fn catalog(scratch: &Scratch, servers: &[(&str, u16, &str)], mailboxes: &[(&str, &str, &[&str])]) {
    let mut toml = String::new();
    for (name, port, state) in servers {
        toml.push_str(&format!(
            "[[server]]\nname = \"{name}\"\ncluster = \"c\"\naddress = \"127.0.0.1:{port}\"\nstate = \"{state}\"\n\n"
        ));
    }
    for (addr, home, replicas) in mailboxes {
        let reps: Vec<String> = replicas.iter().map(|r| format!("\"{r}\"")).collect();
        toml.push_str(&format!(
            "[[mailbox]]\naddress = \"{addr}\"\nhome = \"{home}\"\nreplicas = [{}]\n\n",
            reps.join(", ")
        ));
    }
    let f = scratch.write("cluster.toml", &toml);
    scratch.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
}

fn router(scratch: Scratch) -> Router {
    let port = common::free_port();
    let config =
        format!("router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n{ROUTING}");
    Router::start_config(scratch, &config, port)
}

fn send(r: &Router, rcpts: &[&str], subject: &str) -> String {
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    for rcpt in rcpts {
        expect(&c.cmd(&format!("RCPT TO:<{rcpt}>")), 250, "2.1.5");
    }
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(format!("Subject: {subject}\r\nMessage-ID: <{subject}@x.test>\r\n\r\nbody of {subject}\r\n.\r\n").as_bytes());
    let reply = c.reply();
    expect(&reply, 250, "2.0.0");
    c.cmd("QUIT");
    reply.text().rsplit(' ').next().unwrap_or("").to_string()
}

fn subjects(sink: &RecordingSink) -> Vec<String> {
    sink.messages()
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect()
}

/// Waits for the router's queue to empty (checked by stopping it) — used at the end.
fn stop_and_queue(r: &mut Router) -> Vec<String> {
    r.stop();
    r.queue_ids()
}

#[test]
fn home_up_goes_home_byte_for_byte() {
    let home = RecordingSink::start("m1");
    let replica = RecordingSink::start("m2");
    let s = Scratch::new();
    catalog(
        &s,
        &[
            ("m1", home.port, "in-service"),
            ("m2", replica.port, "in-service"),
        ],
        &[("u1@c.test", "m1", &["m2"])],
    );
    let mut r = router(s);
    send(&r, &["U1@C.test"], "home");
    let got = home.wait_for(1, 10);
    assert_eq!(got.len(), 1, "home got nothing; log:\n{}", r.log());
    assert_eq!(got[0].from, "sender@x.test");
    assert_eq!(got[0].rcpts, vec!["U1@C.test".to_string()]);
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(
        text.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby mx.test (clustermail)"),
        "{text}"
    );
    assert!(
        text.ends_with("\r\nSubject: home\r\nMessage-ID: <home@x.test>\r\n\r\nbody of home\r\n"),
        "{text:?}"
    );
    assert!(replica.messages().is_empty());
    assert!(
        stop_and_queue(&mut r).is_empty(),
        "delivered mail leaves the queue"
    );
}

#[test]
fn home_down_fails_over_to_a_replica_smtp_sink() {
    let s = Scratch::new();
    let dump = s.path().join("sink-dump");
    let sink = SmtpSink::start_dumping(&dump);
    let mut home = RecordingSink::start("m1");
    home.down();
    catalog(
        &s,
        &[
            ("m1", home.port, "in-service"),
            ("m3", sink.port, "in-service"),
        ],
        &[("u1@c.test", "m1", &["m3"])],
    );
    let mut r = router(s);
    send(&r, &["u1@c.test"], "failover");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&dump).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica (smtp-sink) got nothing; log:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    r.wait_log("fail over to replica m3");
    assert!(stop_and_queue(&mut r).is_empty());
}

#[test]
fn all_down_holds_a_returning_replica_does_not_take_it_the_home_does() {
    let mut home = RecordingSink::start("m1");
    let mut replica = RecordingSink::start("m2");
    home.down();
    replica.down();
    let s = Scratch::new();
    catalog(
        &s,
        &[
            ("m1", home.port, "in-service"),
            ("m2", replica.port, "in-service"),
        ],
        &[("u1@c.test", "m1", &["m2"])],
    );
    let mut r = router(s);
    send(&r, &["u1@c.test"], "held");
    std::thread::sleep(Duration::from_millis(800));
    // The replica comes back: held mail retries the home only.
    replica.up();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        replica.messages().is_empty(),
        "a held message went to a replica"
    );
    r.wait_log("hold and retry home m1 without failover");
    home.up();
    let got = home.wait_for(1, 10);
    assert_eq!(
        subjects(&home),
        vec!["held".to_string()],
        "log:\n{}",
        r.log()
    );
    assert_eq!(got.len(), 1);
    std::thread::sleep(Duration::from_millis(300));
    assert!(replica.messages().is_empty());
    assert!(stop_and_queue(&mut r).is_empty());
}

#[test]
fn restricted_and_down_replicas_are_skipped_in_preference_order() {
    let mut home = RecordingSink::start("m1");
    home.down();
    let restricted = RecordingSink::start("m2");
    let mut down = RecordingSink::start("m3");
    down.down();
    let taken = RecordingSink::start("m4");
    let s = Scratch::new();
    catalog(
        &s,
        &[
            ("m1", home.port, "in-service"),
            ("m2", restricted.port, "restricted"),
            ("m3", down.port, "in-service"),
            ("m4", taken.port, "in-service"),
        ],
        &[("u1@c.test", "m1", &["m2", "m3", "m4"])],
    );
    let mut r = router(s);
    send(&r, &["u1@c.test"], "skip");
    assert_eq!(taken.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    assert!(restricted.messages().is_empty());
    assert!(stop_and_queue(&mut r).is_empty());
}

#[test]
fn recipients_on_three_homes_make_three_transactions() {
    let sinks = [
        RecordingSink::start("m1"),
        RecordingSink::start("m2"),
        RecordingSink::start("m3"),
    ];
    let s = Scratch::new();
    catalog(
        &s,
        &[
            ("m1", sinks[0].port, "in-service"),
            ("m2", sinks[1].port, "in-service"),
            ("m3", sinks[2].port, "in-service"),
        ],
        &[
            ("a@c.test", "m1", &[]),
            ("b@c.test", "m2", &[]),
            ("c@c.test", "m3", &[]),
            ("d@c.test", "m1", &[]),
        ],
    );
    let mut r = router(s);
    send(
        &r,
        &["a@c.test", "b@c.test", "c@c.test", "d@c.test"],
        "mixed",
    );
    let m1 = sinks[0].wait_for(1, 10);
    let m2 = sinks[1].wait_for(1, 10);
    let m3 = sinks[2].wait_for(1, 10);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        (sinks[0].messages().len(), m2.len(), m3.len()),
        (1, 1, 1),
        "one transaction each"
    );
    assert_eq!(
        m1[0].rcpts,
        vec!["a@c.test".to_string(), "d@c.test".to_string()]
    );
    assert_eq!(m2[0].rcpts, vec!["b@c.test".to_string()]);
    assert!(stop_and_queue(&mut r).is_empty());
}

#[test]
fn a_router_restarted_while_holding_delivers_once() {
    let mut home = RecordingSink::start("m1");
    home.down();
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port, "in-service")],
        &[("solo@c.test", "m1", &[])],
    );
    let mut r = router(s);
    let id = send(&r, &["solo@c.test"], "restart");
    std::thread::sleep(Duration::from_millis(700));
    r.stop();
    let show = r.scratch.ok(&["queue", "show", &id]);
    assert!(
        show.contains("held (retrying the home server only)"),
        "{show}"
    );
    assert!(
        show.contains("hold and retry home m1 without failover: home is down, no replica"),
        "{show}"
    );
    r.restart();
    home.up();
    assert_eq!(home.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(home.messages().len(), 1, "delivered exactly once");
    assert!(stop_and_queue(&mut r).is_empty());
}

#[test]
fn a_refused_recipient_bounces_to_the_sender_and_the_others_are_delivered() {
    let home = RecordingSink::start("m1");
    home.refuse.lock().unwrap().push("gone@c.test".into());
    let senders_home = RecordingSink::start("m2");
    let s = Scratch::new();
    catalog(
        &s,
        &[
            ("m1", home.port, "in-service"),
            ("m2", senders_home.port, "in-service"),
        ],
        &[
            ("ok@c.test", "m1", &[]),
            ("gone@c.test", "m1", &[]),
            ("sender@c.test", "m2", &[]),
        ],
    );
    let mut r = router(s);
    let mut c = Client::hello(r.port);
    c.cmd("MAIL FROM:<sender@c.test>");
    c.cmd("RCPT TO:<ok@c.test>");
    c.cmd("RCPT TO:<gone@c.test>");
    c.cmd("DATA");
    c.send_raw(b"Subject: partial\r\nMessage-ID: <partial@c.test>\r\n\r\nthe body\r\n.\r\n");
    expect(&c.reply(), 250, "2.0.0");
    let got = home.wait_for(1, 10);
    assert_eq!(got[0].rcpts, vec!["ok@c.test".to_string()]);
    // One DSN, from <>, to the sender, naming the failed recipient only.
    let dsn = senders_home.wait_for(1, 10);
    assert_eq!(dsn.len(), 1, "log:\n{}", r.log());
    assert_eq!(
        (dsn[0].from.as_str(), dsn[0].rcpts.clone()),
        ("", vec!["sender@c.test".to_string()])
    );
    let text = String::from_utf8_lossy(&dsn[0].data).into_owned();
    assert!(
        text.contains("Content-Type: multipart/report; report-type=delivery-status"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; gone@c.test\r\nAction: failed\r\nStatus: 5.1.1"),
        "{text}"
    );
    assert!(
        !text.contains("Final-Recipient: rfc822; ok@c.test"),
        "{text}"
    );
    assert!(
        text.contains("Message-ID: <partial@c.test>") && !text.contains("the body"),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        stop_and_queue(&mut r).is_empty(),
        "bounced and delivered: nothing left"
    );
}

#[test]
fn no_bounce_to_the_null_sender() {
    let home = RecordingSink::start("m1");
    home.refuse.lock().unwrap().push("gone@c.test".into());
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port, "in-service")],
        &[("gone@c.test", "m1", &[])],
    );
    let mut r = router(s);
    let mut c = Client::hello(r.port);
    c.cmd("MAIL FROM:<>");
    c.cmd("RCPT TO:<gone@c.test>");
    c.cmd("DATA");
    c.send_raw(b"Subject: bounce of a bounce\r\n\r\n.\r\n");
    expect(&c.reply(), 250, "2.0.0");
    r.wait_log("no bounce to the null sender");
    assert!(home.messages().is_empty());
    assert!(stop_and_queue(&mut r).is_empty());
}

#[test]
fn expired_mail_bounces_and_outside_senders_get_it_through_the_relay_host() {
    let mut home = RecordingSink::start("m1");
    home.down();
    let relay = RecordingSink::start("relay");
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port, "in-service")],
        &[("u@c.test", "m1", &[])],
    );
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n{ROUTING}max_queue_lifetime = \"1s\"\nrelay_host = \"127.0.0.1:{}\"\n",
        relay.port
    );
    let mut r = Router::start_config(s, &config, port);
    send(&r, &["u@c.test"], "expiring");
    let dsn = relay.wait_for(1, 15);
    assert_eq!(dsn.len(), 1, "log:\n{}", r.log());
    assert_eq!(dsn[0].rcpts, vec!["sender@x.test".to_string()]);
    let text = String::from_utf8_lossy(&dsn[0].data).into_owned();
    assert!(
        text.contains("Status: 4.4.7") && text.contains("expired after 1s"),
        "{text}"
    );
    assert!(stop_and_queue(&mut r).is_empty());
}

#[test]
fn a_looping_message_is_refused() {
    let home = RecordingSink::start("m1");
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port, "in-service")],
        &[("u@c.test", "m1", &[])],
    );
    let r = router(s);
    let mut c = Client::hello(r.port);
    c.cmd("MAIL FROM:<sender@x.test>");
    c.cmd("RCPT TO:<u@c.test>");
    assert_eq!(c.cmd("DATA").code, 354);
    let mut data = String::new();
    for i in 0..26 {
        data.push_str(&format!(
            "Received: from hop{i}.test by hop{}.test; Tue, 24 Nov 2026 00:00:00 +0000\r\n",
            i + 1
        ));
    }
    data.push_str("Subject: loop\r\n\r\n.\r\n");
    c.send_raw(data.as_bytes());
    expect(&c.reply(), 554, "5.4.6");
}

#[test]
fn mail_for_another_cluster_goes_to_that_clusters_router() {
    let local_home = RecordingSink::start("e1");
    let west_router = RecordingSink::start("west-router");
    let mut west_home = RecordingSink::start("w1");
    west_home.down();
    let s = Scratch::new();
    let toml = format!(
        "[[cluster]]\nname = \"west\"\nrouters = [\"127.0.0.1:{}\"]\n\n\
         [[server]]\nname = \"e1\"\ncluster = \"east\"\naddress = \"127.0.0.1:{}\"\n\n\
         [[server]]\nname = \"w1\"\ncluster = \"west\"\naddress = \"127.0.0.1:{}\"\n\n\
         [[mailbox]]\naddress = \"e@c.test\"\nhome = \"e1\"\n\n\
         [[mailbox]]\naddress = \"w@c.test\"\nhome = \"w1\"\n",
        west_router.port, local_home.port, west_home.port
    );
    let f = s.write("two.toml", &toml);
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n{ROUTING}local_cluster = \"east\"\n"
    );
    let mut r = Router::start_config(s, &config, port);
    send(&r, &["e@c.test", "w@c.test"], "two clusters");
    assert_eq!(
        local_home.wait_for(1, 10)[0].rcpts,
        vec!["e@c.test".to_string()]
    );
    let hop = west_router.wait_for(1, 10);
    assert_eq!(hop.len(), 1, "log:\n{}", r.log());
    assert_eq!(hop[0].rcpts, vec!["w@c.test".to_string()]);
    let explain = r.scratch.ok(&["route", "explain", "w@c.test"]);
    assert!(
        explain.contains(&format!(
            "transfer to 127.0.0.1:{}, a router of cluster west (next hop)",
            west_router.port
        )),
        "{explain}"
    );
    assert!(stop_and_queue(&mut r).is_empty());
}

#[test]
fn connections_to_a_server_are_reused() {
    let home = RecordingSink::start("m1");
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port, "in-service")],
        &[("u@c.test", "m1", &[])],
    );
    let mut r = router(s);
    for i in 0..3 {
        send(&r, &["u@c.test"], &format!("reuse {i}"));
        assert_eq!(home.wait_for(i + 1, 10).len(), i + 1, "log:\n{}", r.log());
        // Let the delivery finish (RSET) so that the connection is idle again.
        std::thread::sleep(Duration::from_millis(300));
    }
    let conns: Vec<usize> = home.messages().iter().map(|m| m.conn).collect();
    assert!(
        conns.windows(2).all(|w| w[0] == w[1]),
        "three messages, one connection: {conns:?}"
    );
    assert!(stop_and_queue(&mut r).is_empty());
}

#[test]
fn a_silent_server_does_not_hold_back_mail_for_the_others() {
    // A server that accepts connections and never greets: each delivery to it
    // waits for the delivery timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().flatten() {
            held.push(c);
        }
    });
    let fast = RecordingSink::start("fast");
    let s = Scratch::new();
    catalog(
        &s,
        &[
            ("slow", silent_port, "in-service"),
            ("fast", fast.port, "in-service"),
        ],
        &[("a@c.test", "slow", &[]), ("b@c.test", "fast", &[])],
    );
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\nprobe_interval = \"1h\"\n\
         retry_initial = \"1h\"\nretry_max = \"1h\"\ndelivery_timeout = \"20s\"\n"
    );
    let r = Router::start_config(s, &config, port);
    send(&r, &["a@c.test"], "to the silent one");
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    send(&r, &["b@c.test"], "to the fast one");
    // Well before the silent server's delivery could time out (20 s), b is delivered.
    assert_eq!(fast.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_busy_replica_is_skipped() {
    // A replica that greets with 421: the monitor marks it busy.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::Write;
        for mut c in busy.incoming().flatten() {
            let _ = c.write_all(b"421 4.3.2 too busy, try later\r\n");
        }
    });
    let mut home = RecordingSink::start("m1");
    home.down();
    let taken = RecordingSink::start("m3");
    let s = Scratch::new();
    catalog(
        &s,
        &[
            ("m1", home.port, "in-service"),
            ("m2", busy_port, "in-service"),
            ("m3", taken.port, "in-service"),
        ],
        &[("u1@c.test", "m1", &["m2", "m3"])],
    );
    let mut r = router(s);
    // Let the monitor see the servers once.
    std::thread::sleep(Duration::from_millis(600));
    let servers = r.scratch.ok(&["servers"]);
    assert!(
        servers
            .lines()
            .any(|l| l.starts_with("m2 ") && l.contains(" busy ")),
        "{servers}"
    );
    send(&r, &["u1@c.test"], "busy");
    assert_eq!(taken.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    r.wait_log("fail over to replica m3");
    assert!(stop_and_queue(&mut r).is_empty());
}
