//! No accepted mail is lost: a client sends messages one after another while the
//! router is killed with SIGKILL at several moments and started again. At the end
//! every message that got a 250 has reached the mailbox server; duplicates (the
//! documented crash window between a server's 250 and our commit) are counted and
//! reported, not failed on.

mod common;
use common::{Client, RecordingSink, Router, Scratch};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Sends one message; Some(()) on 250, None if the router was not there or died.
/// With `kill`, the router is killed the moment the end of data has been written,
/// before its reply is read: the message may or may not have been queued.
fn try_send(port: u16, n: usize, kill: Option<&mut Router>) -> Option<()> {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    drop(stream);
    let mut c = Client::connect(port);
    let greet = c.try_reply()?;
    if greet.code != 220 {
        return None;
    }
    let mut step = |line: &str, want: u16| -> Option<()> {
        c.send_raw(format!("{line}\r\n").as_bytes());
        (c.try_reply()?.code == want).then_some(())
    };
    step("EHLO crash.test", 250)?;
    step("MAIL FROM:<sender@x.test>", 250)?;
    step("RCPT TO:<u@c.test>", 250)?;
    step("DATA", 354)?;
    c.send_raw(
        format!("Message-ID: <n{n}@crash.test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n.\r\n")
            .as_bytes(),
    );
    if let Some(r) = kill {
        r.kill9();
    }
    (c.try_reply()?.code == 250).then_some(())
}

#[test]
fn kill_9_during_a_stream_of_mail_loses_nothing() {
    let home = RecordingSink::start("m1");
    let s = Scratch::new();
    let f = s.write(
        "c.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n[[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n",
            home.port
        ),
    );
    s.ok(&["catalog", "import", &f.display().to_string()]);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\n\
         probe_interval = \"200ms\"\nrise = 1\nretry_initial = \"200ms\"\nretry_max = \"500ms\"\n"
    );
    let mut r = Router::start_config(s, &config, port);
    // CI size; `bench/faults.sh` runs it bigger (CLUSTERMAIL_SCALE=10: 2,400 messages).
    let scale = common::scale();
    let total = 240 * scale;
    // Kills right after a 250 (deliveries of earlier mail under way) ...
    let kills_after_ack = [40 * scale, 110 * scale, 180 * scale];
    // ... and in the middle of accepting a message (end of data sent, no reply read).
    let kills_mid_accept = [75 * scale, 145 * scale, 215 * scale];
    let mut acked = Vec::new();
    let mut mid_done = Vec::new();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(120 * scale as u64);
    while acked.len() < total {
        assert!(Instant::now() < deadline, "the client could not finish");
        let mid = kills_mid_accept.contains(&acked.len()) && !mid_done.contains(&acked.len());
        if mid {
            mid_done.push(acked.len());
        }
        let result = try_send(port, n, if mid { Some(&mut r) } else { None });
        if mid {
            r.restart();
        }
        if result.is_some() {
            acked.push(n);
            if kills_after_ack.contains(&acked.len()) {
                r.kill9();
                r.restart();
            }
        }
        // A message that got no 250 is sent again under a new number, as a client
        // would retry it; it may or may not have been queued.
        n += 1;
    }
    // Every acknowledged message reaches the mailbox server.
    let wait = Instant::now() + Duration::from_secs(30);
    let counts = loop {
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for m in home.messages() {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            if let Some(id) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) {
                if let Ok(k) = id.trim().parse::<usize>() {
                    *counts.entry(k).or_default() += 1;
                }
            }
        }
        if acked.iter().all(|k| counts.contains_key(k)) || Instant::now() > wait {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let missing: Vec<_> = acked.iter().filter(|k| !counts.contains_key(k)).collect();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "{} acknowledged, {} sent in all, {} delivered, {} duplicate deliveries, {} missing",
        acked.len(),
        n,
        counts.len(),
        duplicates,
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged but never delivered: {missing:?}\nlog:\n{}",
        r.log()
    );
    r.stop();
    assert!(r.queue_ids().is_empty(), "the queue drained");
}
