//! Outbound delivery against scripted mailbox servers on loopback: what the router
//! does when a server answers the final "." late, drops the connection after
//! storing, refuses single recipients with 4xx, or lacks an extension; and that
//! every address inbound accepted is sent as RFC 5321 requires.
//!
//! Probes run rarely here (`probe_interval = "1h"`), so a server's availability
//! moves only through deliveries: a server marked down stays down.

mod common;
use common::{expect, Client, Router, Scratch};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One message as a [`Mailbox`] stored it.
#[derive(Debug, Clone)]
struct Stored {
    /// MAIL FROM's path, between the brackets, as sent.
    from: String,
    /// RCPT TO paths, as sent.
    rcpts: Vec<String>,
    /// The MAIL command line, as sent.
    mail_line: String,
    data: Vec<u8>,
    at: Instant,
}

/// How a scripted mailbox server misbehaves.
#[derive(Default)]
struct Script {
    /// Wait this long before answering the final "." (after storing)...
    final_delay_ms: AtomicU64,
    /// ...the next this many times.
    slow_finals: AtomicUsize,
    /// Close the connection right after storing, without a reply: this many times.
    drop_after_store: AtomicUsize,
    /// Take at most this many RCPTs per transaction; 452 4.5.3 to the rest (0: no limit).
    max_rcpts: AtomicUsize,
    /// Answer `450 4.2.1` to a RCPT for this address this many times.
    defer_rcpt: Mutex<Option<(String, usize)>>,
    /// EHLO keywords to advertise (None: 8BITMIME, SMTPUTF8, PIPELINING).
    ehlo: Mutex<Option<Vec<String>>>,
}

/// A scriptable mailbox server (std threads), recording what it stores.
struct Mailbox {
    port: u16,
    stored: Arc<Mutex<Vec<Stored>>>,
    script: Arc<Script>,
    stop: Arc<AtomicBool>,
}

impl Mailbox {
    fn start(name: &'static str) -> Mailbox {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let m = Mailbox {
            port,
            stored: Default::default(),
            script: Default::default(),
            stop: Default::default(),
        };
        let (stored, script, stop) = (m.stored.clone(), m.script.clone(), m.stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (stored, script) = (stored.clone(), script.clone());
                std::thread::spawn(move || {
                    let _ = session(conn, name, &stored, &script);
                });
            }
        });
        m
    }

    fn stored(&self) -> Vec<Stored> {
        self.stored.lock().expect("lock").clone()
    }

    /// Waits until at least `n` messages are stored (at most `secs`); returns them.
    fn wait_for(&self, n: usize, secs: u64) -> Vec<Stored> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.stored();
            if m.len() >= n || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn path_of(line: &str) -> String {
    let Some(start) = line.find('<') else {
        return String::new();
    };
    let end = line.rfind('>').unwrap_or(line.len());
    line[start + 1..end].to_string()
}

fn session(
    conn: std::net::TcpStream,
    name: &str,
    stored: &Mutex<Vec<Stored>>,
    script: &Script,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = conn.try_clone()?;
    let mut reader = std::io::BufReader::new(conn);
    write!(out, "220 {name} ESMTP scripted\r\n")?;
    let (mut from, mut mail_line, mut rcpts) = (String::new(), String::new(), Vec::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            let words = script
                .ehlo
                .lock()
                .expect("lock")
                .clone()
                .unwrap_or_else(|| vec!["8BITMIME".into(), "SMTPUTF8".into(), "PIPELINING".into()]);
            write!(out, "250-{name}\r\n")?;
            for w in &words {
                write!(out, "250-{w}\r\n")?;
            }
            write!(out, "250 HELP\r\n")?;
        } else if upper.starts_with("MAIL") {
            from = path_of(&line);
            mail_line = line.trim_end().to_string();
            rcpts.clear();
            write!(out, "250 2.1.0 ok\r\n")?;
        } else if upper.starts_with("RCPT") {
            let r = path_of(&line);
            let max = script.max_rcpts.load(SeqCst);
            let mut defer = script.defer_rcpt.lock().expect("lock");
            let deferred = match defer.as_mut() {
                Some((a, n)) if *n > 0 && a.eq_ignore_ascii_case(&r) => {
                    *n -= 1;
                    true
                }
                _ => false,
            };
            if deferred {
                write!(out, "450 4.2.1 <{r}> try later\r\n")?;
            } else if max > 0 && rcpts.len() >= max {
                write!(out, "452 4.5.3 too many recipients\r\n")?;
            } else {
                rcpts.push(r);
                write!(out, "250 2.1.5 ok\r\n")?;
            }
        } else if upper.starts_with("DATA") {
            write!(out, "354 go\r\n")?;
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                if reader.read_until(b'\n', &mut l)? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                let l = if l.starts_with(b"..") {
                    &l[1..]
                } else {
                    &l[..]
                };
                data.extend_from_slice(l);
            }
            stored.lock().expect("lock").push(Stored {
                from: from.clone(),
                rcpts: rcpts.clone(),
                mail_line: mail_line.clone(),
                data,
                at: Instant::now(),
            });
            let drops = script.drop_after_store.load(SeqCst);
            if drops > 0 {
                script.drop_after_store.store(drops - 1, SeqCst);
                return Ok(());
            }
            let slow = script.slow_finals.load(SeqCst);
            if slow > 0 {
                script.slow_finals.store(slow - 1, SeqCst);
                std::thread::sleep(Duration::from_millis(script.final_delay_ms.load(SeqCst)));
            }
            write!(out, "250 2.0.0 stored by {name}\r\n")?;
        } else if upper.starts_with("QUIT") {
            write!(out, "221 bye\r\n")?;
            return Ok(());
        } else {
            write!(out, "250 ok\r\n")?;
        }
    }
}

/// Imports servers (name, port) of cluster c and mailboxes (address, home, replicas).
fn catalog(scratch: &Scratch, servers: &[(&str, u16)], mailboxes: &[(&str, &str, &[&str])]) {
    let mut toml = String::new();
    for (name, port) in servers {
        toml.push_str(&format!(
            "[[server]]\nname = \"{name}\"\ncluster = \"c\"\naddress = \"127.0.0.1:{port}\"\n\n"
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

fn router(scratch: Scratch, routing: &str) -> Router {
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [routing]\nprobe_interval = \"1h\"\nrise = 1\nretry_max = \"10s\"\n{routing}\n"
    );
    Router::start_config(scratch, &config, port)
}

/// Sends one message (MAIL FROM `from`, the path between the brackets); its queue id.
fn send(r: &Router, from: &str, rcpts: &[&str], subject: &str, smtputf8: bool) -> String {
    let body = format!("Subject: {subject}\r\n\r\nbody of {subject}\r\n.line stuffed\r\n");
    send_body(r, from, rcpts, body.as_bytes(), smtputf8)
}

fn send_body(r: &Router, from: &str, rcpts: &[&str], body: &[u8], smtputf8: bool) -> String {
    let mut c = Client::hello(r.port);
    let param = if smtputf8 { " SMTPUTF8" } else { "" };
    expect(&c.cmd(&format!("MAIL FROM:<{from}>{param}")), 250, "2.1.0");
    for rcpt in rcpts {
        expect(&c.cmd(&format!("RCPT TO:<{rcpt}>")), 250, "2.1.5");
    }
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(body);
    c.send_raw(b".\r\n");
    let reply = c.reply();
    expect(&reply, 250, "2.0.0");
    c.cmd("QUIT");
    reply.text().rsplit(' ').next().unwrap_or("").to_string()
}

fn with_subject(stored: &[Stored], subject: &str) -> usize {
    let needle = format!("Subject: {subject}\r\n");
    stored
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.data).contains(&needle))
        .count()
}

/// Waits until the router logged `needle` `n` times (at most `secs`).
fn wait_log_count(r: &Router, needle: &str, n: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while r.log().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged {n} times:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The `servers` line of `name`.
fn server_line(r: &Router, name: &str) -> String {
    let out = r.scratch.ok(&["servers"]);
    out.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_final_reply_slower_than_the_step_timeout_is_waited_for_one_copy_only() {
    let home = Mailbox::start("m1");
    let replica = Mailbox::start("m2");
    home.script.final_delay_ms.store(5000, SeqCst);
    home.script.slow_finals.store(2, SeqCst);
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port), ("m2", replica.port)],
        &[("u1@c.test", "m1", &["m2"])],
    );
    // delivery_timeout 1s; the final reply's own timeout is the default (10m).
    let mut r = router(s, "delivery_timeout = \"1s\"\nretry_initial = \"300ms\"");
    send(&r, "sender@x.test", &["u1@c.test"], "slow", false);
    send(&r, "sender@x.test", &["u1@c.test"], "slow2", false);
    wait_log_count(&r, "outcome=delivered", 2, 30);
    // Anything re-sent would arrive within a retry or two: give it time.
    std::thread::sleep(Duration::from_secs(2));
    let (at_home, at_replica) = (home.stored(), replica.stored());
    assert_eq!(
        (
            with_subject(&at_home, "slow"),
            with_subject(&at_home, "slow2")
        ),
        (1, 1),
        "log:\n{}",
        r.log()
    );
    assert!(at_replica.is_empty(), "a copy at the replica:\n{}", r.log());
    r.stop();
    assert!(r.queue_ids().is_empty());
}

#[test]
fn a_connection_dropped_after_storing_retries_at_the_home_later_never_the_replica() {
    let home = Mailbox::start("m1");
    let replica = Mailbox::start("m2");
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port), ("m2", replica.port)],
        &[("u1@c.test", "m1", &["m2"])],
    );
    let mut r = router(s, "delivery_timeout = \"2s\"\nretry_initial = \"2s\"");
    // A first message leaves a kept connection: the drop happens on a reused one.
    send(&r, "sender@x.test", &["u1@c.test"], "first", false);
    assert_eq!(home.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    home.script.drop_after_store.store(1, SeqCst);
    send(&r, "sender@x.test", &["u1@c.test"], "dropped", false);
    wait_log_count(&r, "outcome=unconfirmed", 1, 10);
    // The retry comes after the backoff, at the home.
    let got = home.wait_for(3, 30);
    assert_eq!(with_subject(&got, "dropped"), 2, "log:\n{}", r.log());
    let gap = got[2].at.duration_since(got[1].at);
    assert!(
        gap >= Duration::from_millis(1500),
        "re-sent after {gap:?}, not after the backoff"
    );
    assert!(replica.stored().is_empty(), "log:\n{}", r.log());
    assert!(
        server_line(&r, "m1").contains(" up "),
        "{}",
        server_line(&r, "m1")
    );
    r.stop();
    assert!(r.queue_ids().is_empty());
}

#[test]
fn no_reply_within_final_reply_timeout_retries_at_the_home_later_never_the_replica() {
    let home = Mailbox::start("m1");
    let replica = Mailbox::start("m2");
    home.script.final_delay_ms.store(4000, SeqCst);
    home.script.slow_finals.store(1, SeqCst);
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port), ("m2", replica.port)],
        &[("u1@c.test", "m1", &["m2"])],
    );
    let mut r = router(
        s,
        "delivery_timeout = \"5s\"\nfinal_reply_timeout = \"1s\"\nretry_initial = \"1s\"",
    );
    send(&r, "sender@x.test", &["u1@c.test"], "late", false);
    wait_log_count(&r, "outcome=unconfirmed", 1, 20);
    let got = home.wait_for(2, 30);
    assert_eq!(with_subject(&got, "late"), 2, "log:\n{}", r.log());
    wait_log_count(&r, "outcome=delivered", 1, 20);
    assert!(replica.stored().is_empty(), "log:\n{}", r.log());
    assert!(
        server_line(&r, "m1").contains(" up "),
        "{}",
        server_line(&r, "m1")
    );
    r.stop();
    assert!(r.queue_ids().is_empty());
}

#[test]
fn a_quoted_local_part_sender_is_delivered_home_quoted_and_the_home_stays_up() {
    let home = Mailbox::start("m1");
    let replica = Mailbox::start("m2");
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port), ("m2", replica.port)],
        &[("u1@c.test", "m1", &["m2"])],
    );
    let r = router(s, "delivery_timeout = \"2s\"\nretry_initial = \"300ms\"");
    send(
        &r,
        "\"john doe\"@example.net",
        &["u1@c.test"],
        "quoted",
        false,
    );
    let got = home.wait_for(1, 10);
    assert_eq!(got.len(), 1, "log:\n{}", r.log());
    assert_eq!(got[0].from, "\"john doe\"@example.net");
    let line = server_line(&r, "m1");
    assert!(line.contains(" up "), "{line}");
    let started = Instant::now();
    send(&r, "plain@example.net", &["u1@c.test"], "after", false);
    let got = home.wait_for(2, 10);
    assert_eq!(with_subject(&got, "after"), 1, "log:\n{}", r.log());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(replica.stored().is_empty());
}

#[test]
fn utf8_senders_and_address_literals_are_sent_as_accepted() {
    let home = Mailbox::start("m1");
    let s = Scratch::new();
    catalog(&s, &[("m1", home.port)], &[("u1@c.test", "m1", &[])]);
    let r = router(s, "delivery_timeout = \"2s\"\nretry_initial = \"300ms\"");
    send(&r, "jörg@bücher.example", &["u1@c.test"], "utf8", true);
    send(&r, "ops@[127.0.0.1]", &["u1@c.test"], "literal", false);
    send(
        &r,
        "\"a\\\\b\\\"c\"@example.net",
        &["u1@c.test"],
        "escaped",
        false,
    );
    let got = home.wait_for(3, 10);
    assert_eq!(got.len(), 3, "log:\n{}", r.log());
    let from = |subject: &str| {
        got.iter()
            .find(|m| with_subject(std::slice::from_ref(m), subject) == 1)
            .map(|m| (m.from.clone(), m.mail_line.clone()))
            .unwrap_or_default()
    };
    let (utf8, line) = from("utf8");
    assert_eq!(utf8, "jörg@bücher.example");
    assert!(line.ends_with(" SMTPUTF8"), "{line}");
    assert_eq!(from("literal").0, "ops@[127.0.0.1]");
    assert_eq!(from("escaped").0, "\"a\\\\b\\\"c\"@example.net");
    assert!(server_line(&r, "m1").contains(" up "));
}

#[test]
fn a_452_to_some_recipients_sends_the_rest_in_a_new_transaction_at_once() {
    let home = Mailbox::start("m1");
    let replica = Mailbox::start("m2");
    home.script.max_rcpts.store(2, SeqCst);
    let s = Scratch::new();
    let boxes: &[(&str, &str, &[&str])] = &[
        ("u1@c.test", "m1", &["m2"]),
        ("u2@c.test", "m1", &["m2"]),
        ("u3@c.test", "m1", &["m2"]),
        ("u4@c.test", "m1", &["m2"]),
        ("u5@c.test", "m1", &["m2"]),
    ];
    catalog(&s, &[("m1", home.port), ("m2", replica.port)], boxes);
    let mut r = router(s, "delivery_timeout = \"2s\"\nretry_initial = \"10s\"");
    let rcpts = [
        "u1@c.test",
        "u2@c.test",
        "u3@c.test",
        "u4@c.test",
        "u5@c.test",
    ];
    send(&r, "sender@x.test", &rcpts, "many", false);
    let got = home.wait_for(3, 10);
    let mut all: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    all.sort();
    assert_eq!(all, rcpts, "log:\n{}", r.log());
    assert_eq!(got.len(), 3);
    assert!(replica.stored().is_empty(), "log:\n{}", r.log());
    // Up, not busy (a per-recipient 4xx costs no index points by construction:
    // `health` unit tests; the index itself moves with load on this machine).
    let line = server_line(&r, "m1");
    assert!(line.contains(" up "), "{line}");
    r.stop();
    assert!(r.queue_ids().is_empty());
}

#[test]
fn a_4xx_to_one_recipient_retries_it_later_at_the_same_server() {
    let home = Mailbox::start("m1");
    let replica = Mailbox::start("m2");
    *home.script.defer_rcpt.lock().unwrap() = Some(("u2@c.test".into(), 1));
    let s = Scratch::new();
    let boxes: &[(&str, &str, &[&str])] =
        &[("u1@c.test", "m1", &["m2"]), ("u2@c.test", "m1", &["m2"])];
    catalog(&s, &[("m1", home.port), ("m2", replica.port)], boxes);
    let mut r = router(s, "delivery_timeout = \"2s\"\nretry_initial = \"1s\"");
    send(
        &r,
        "sender@x.test",
        &["u1@c.test", "u2@c.test"],
        "deferred",
        false,
    );
    let got = home.wait_for(2, 20);
    assert_eq!(got.len(), 2, "log:\n{}", r.log());
    assert_eq!(got[0].rcpts, ["u1@c.test"]);
    assert_eq!(got[1].rcpts, ["u2@c.test"]);
    assert!(replica.stored().is_empty(), "log:\n{}", r.log());
    // Up, not busy (a per-recipient 4xx costs no index points by construction:
    // `health` unit tests; the index itself moves with load on this machine).
    let line = server_line(&r, "m1");
    assert!(line.contains(" up "), "{line}");
    r.stop();
    assert!(r.queue_ids().is_empty());
}

/// A router whose mail outside the catalog (bounces) goes to `relay`.
fn router_with_relay(s: Scratch, relay: &Mailbox) -> Router {
    let routing = format!(
        "delivery_timeout = \"2s\"\nretry_initial = \"300ms\"\nrelay_host = \"127.0.0.1:{}\"",
        relay.port
    );
    router(s, &routing)
}

#[test]
fn a_server_without_8bitmime_gets_no_8bit_data_the_sender_gets_a_5_6_3_bounce() {
    let home = Mailbox::start("m1");
    *home.script.ehlo.lock().unwrap() = Some(vec!["PIPELINING".into()]);
    let relay = Mailbox::start("relay");
    let s = Scratch::new();
    catalog(&s, &[("m1", home.port)], &[("u1@c.test", "m1", &[])]);
    let r = router_with_relay(s, &relay);
    let body = "Subject: 8bit\r\n\r\ncaf\u{e9} cr\u{e8}me\r\n".as_bytes();
    send_body(&r, "sender@x.test", &["u1@c.test"], body, false);
    // ASCII mail still goes to that server.
    send(&r, "sender@x.test", &["u1@c.test"], "ascii", false);
    let bounce = relay.wait_for(1, 10);
    assert_eq!(bounce.len(), 1, "log:\n{}", r.log());
    assert_eq!(
        (bounce[0].from.as_str(), &bounce[0].rcpts[..]),
        ("", &["sender@x.test".to_string()][..])
    );
    assert!(String::from_utf8_lossy(&bounce[0].data).contains("5.6.3"));
    let got = home.wait_for(1, 10);
    assert_eq!(got.len(), 1, "log:\n{}", r.log());
    assert_eq!(with_subject(&got, "ascii"), 1);
    assert!(
        !got[0].mail_line.contains("BODY=8BITMIME"),
        "{}",
        got[0].mail_line
    );
}

#[test]
fn smtputf8_goes_only_where_needed_and_supported_and_a_bounce_to_a_utf8_sender_uses_it() {
    let home = Mailbox::start("m1");
    *home.script.ehlo.lock().unwrap() = Some(vec!["8BITMIME".into(), "PIPELINING".into()]);
    let relay = Mailbox::start("relay");
    let s = Scratch::new();
    catalog(&s, &[("m1", home.port)], &[("u1@c.test", "m1", &[])]);
    let r = router_with_relay(s, &relay);
    send(&r, "jörg@bücher.example", &["u1@c.test"], "utf8", true);
    // Asked for SMTPUTF8 but needs none of it: goes without.
    send(&r, "plain@x.test", &["u1@c.test"], "ascii", true);
    let bounce = relay.wait_for(1, 10);
    assert_eq!(bounce.len(), 1, "log:\n{}", r.log());
    assert_eq!(bounce[0].rcpts, ["jörg@bücher.example"]);
    assert!(
        bounce[0].mail_line.ends_with(" SMTPUTF8"),
        "{}",
        bounce[0].mail_line
    );
    assert!(String::from_utf8_lossy(&bounce[0].data).contains("5.6.7"));
    let got = home.wait_for(1, 10);
    assert_eq!(got.len(), 1, "log:\n{}", r.log());
    assert_eq!(with_subject(&got, "ascii"), 1);
    assert!(
        !got[0].mail_line.contains("SMTPUTF8"),
        "{}",
        got[0].mail_line
    );
}

/// A stream of mail to a home that, for some messages, drops the connection right
/// after storing (no reply to the final ".") and, for others, answers it only
/// after `delivery_timeout`: every message arrives, none at the replica, and the
/// only second copies are the retries of the replies that were lost (the one
/// duplicate window left). `CLUSTERMAIL_SCALE` multiplies it (bench/faults.sh).
#[test]
fn post_data_faults_under_a_stream_lose_nothing_and_repeat_only_lost_replies() {
    let n = 20 * common::scale();
    let (drops, slow) = (n / 5, n / 10);
    let home = Mailbox::start("m1");
    let replica = Mailbox::start("m2");
    home.script.drop_after_store.store(drops, SeqCst);
    home.script.final_delay_ms.store(1500, SeqCst);
    home.script.slow_finals.store(slow, SeqCst);
    let s = Scratch::new();
    catalog(
        &s,
        &[("m1", home.port), ("m2", replica.port)],
        &[("u1@c.test", "m1", &["m2"])],
    );
    let mut r = router(s, "delivery_timeout = \"1s\"\nretry_initial = \"300ms\"");
    for i in 0..n {
        send(
            &r,
            "sender@x.test",
            &["u1@c.test"],
            &format!("pd-{i}"),
            false,
        );
    }
    let got = home.wait_for(n + drops, 60 + n as u64 / 2);
    // Anything re-sent beyond that would arrive within a retry or two.
    std::thread::sleep(Duration::from_secs(3));
    let got = home.stored().len().max(got.len());
    let at_home = home.stored();
    let lost: Vec<usize> = (0..n)
        .filter(|i| with_subject(&at_home, &format!("pd-{i}")) == 0)
        .collect();
    let duplicates = got - (n - lost.len());
    println!(
        "post-DATA faults: {n} acknowledged, {drops} final replies dropped after storing, \
         {slow} answered after delivery_timeout; {} delivered, {} lost, {duplicates} duplicate(s), \
         {} copies at the replica",
        n - lost.len(),
        lost.len(),
        replica.stored().len()
    );
    assert!(lost.is_empty(), "lost {lost:?}:\n{}", r.log());
    assert!(
        replica.stored().is_empty(),
        "a copy at the replica:\n{}",
        r.log()
    );
    assert_eq!(
        duplicates,
        drops,
        "only the lost replies repeat:\n{}",
        r.log()
    );
    r.stop();
    assert!(r.queue_ids().is_empty());
}
