//! RFC 5321 conformance of the inbound service, over raw TCP against the real
//! binary on loopback: reply codes, pipelining, dot-stuffing, size limits, SMTP
//! smuggling, relay tricks, timeouts, limits, shutdown, durability.

mod common;
use common::{expect, without_received, Client, Router};

const LIMITS: &str =
    "max_message_size = 10000\nmax_recipients = 3\ncommand_timeout = \"2s\"\ndata_timeout = \"2s\"";

#[test]
fn greeting_and_ehlo_keywords() {
    let r = Router::start(LIMITS);
    let mut c = Client::connect(r.port);
    let g = c.reply();
    assert_eq!(g.code, 220);
    assert!(g.text().starts_with("mx.test ESMTP"), "{g:?}");
    let e = c.cmd("EHLO client.test");
    assert_eq!(e.code, 250);
    for kw in [
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
    ] {
        assert!(e.lines.iter().any(|l| l == kw), "{kw} missing from {e:?}");
    }
    assert!(
        !e.lines.iter().any(|l| l == "STARTTLS"),
        "no certificate, no STARTTLS"
    );
    let helo = c.cmd("HELO client.test");
    assert_eq!(
        (helo.code, helo.text()),
        (250, "mx.test Hello client.test".to_string())
    );
    expect(&c.cmd("NOOP"), 250, "2.0.0");
    expect(&c.cmd("RSET"), 250, "2.0.0");
    expect(&c.cmd("VRFY alice@east.example.com"), 252, "2.5.2");
    expect(&c.cmd("EXPN staff"), 502, "5.5.1");
    expect(&c.cmd("HELP"), 214, "2.0.0");
    expect(&c.cmd("STARTTLS"), 502, "5.5.1");
    expect(&c.cmd("QUIT"), 221, "2.0.0");
    assert!(c.closed());
}

#[test]
fn every_error_reply_code() {
    let r = Router::start(&format!("{LIMITS}\nmax_errors = 50"));
    let mut c = Client::connect(r.port);
    c.reply();
    expect(&c.cmd("XYZZY"), 500, "5.5.1");
    expect(&c.cmd("MAIL FROM:<a@x.test>"), 503, "5.5.1");
    expect(&c.cmd("EHLO"), 501, "5.5.4");
    c.cmd("EHLO client.test");
    expect(&c.cmd("RCPT TO:<alice@east.example.com>"), 503, "5.5.1");
    expect(&c.cmd("DATA"), 503, "5.5.1");
    expect(&c.cmd("MAIL alice"), 501, "5.5.4");
    expect(&c.cmd("MAIL FROM:<a@x.test> SIZE=10001"), 552, "5.3.4");
    expect(&c.cmd("MAIL FROM:<a@x.test> X-UNKNOWN=1"), 555, "5.5.4");
    expect(&c.cmd("MAIL FROM:<not an address>"), 501, "5.1.7");
    expect(&c.cmd("MAIL FROM:<a@x.test> SIZE=100"), 250, "2.1.0");
    expect(&c.cmd("MAIL FROM:<a@x.test>"), 503, "5.5.1");
    expect(
        &c.cmd("RCPT TO:<alice@east.example.com> NOTIFY=NEVER"),
        555,
        "5.5.4",
    );
    for rcpt in ["alice", "bob", "carol"] {
        expect(
            &c.cmd(&format!("RCPT TO:<{rcpt}@east.example.com>")),
            250,
            "2.1.5",
        );
    }
    expect(&c.cmd("RCPT TO:<dave@east.example.com>"), 452, "4.5.3");
    // A command line over 512 octets: 500 5.5.2, and the session stays in sync.
    let long = format!("NOOP {}", "x".repeat(600));
    expect(&c.cmd(&long), 500, "5.5.2");
    expect(&c.cmd("NOOP"), 250, "2.0.0");
    let longer = format!("RCPT TO:<{}@east.example.com>", "y".repeat(5000));
    expect(&c.cmd(&longer), 500, "5.5.2");
    expect(&c.cmd("RSET"), 250, "2.0.0");
}

#[test]
fn too_many_errors_close_the_session() {
    let r = Router::start("max_errors = 3");
    let mut c = Client::connect(r.port);
    c.reply();
    expect(&c.cmd("BAD1"), 500, "5.5.1");
    expect(&c.cmd("BAD2"), 500, "5.5.1");
    expect(&c.cmd("BAD3"), 421, "4.7.0");
    assert!(c.closed());
}

#[test]
fn pipelined_commands_get_every_reply_in_order() {
    let mut r = Router::start(LIMITS);
    let mut c = Client::hello(r.port);
    c.send_raw(
        b"MAIL FROM:<sender@x.test>\r\nRCPT TO:<alice@east.example.com>\r\nRCPT TO:<nobody@east.example.com>\r\n\
          RCPT TO:<bob@EAST.example.com>\r\nDATA\r\n",
    );
    expect(&c.reply(), 250, "2.1.0");
    expect(&c.reply(), 250, "2.1.5");
    expect(&c.reply(), 550, "5.1.1");
    expect(&c.reply(), 250, "2.1.5");
    assert_eq!(c.reply().code, 354);
    // The body, the end, and the next transaction, all in one write.
    c.send_raw(
        b"Subject: pipelined\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<carol@east.example.com>\r\nDATA\r\n",
    );
    let queued = c.reply();
    expect(&queued, 250, "2.0.0");
    assert!(queued.text().contains("queued as"), "{queued:?}");
    expect(&c.reply(), 250, "2.1.0");
    expect(&c.reply(), 250, "2.1.5");
    assert_eq!(c.reply().code, 354);
    c.send_raw(b"Subject: second\r\n\r\n.\r\nQUIT\r\n");
    expect(&c.reply(), 250, "2.0.0");
    expect(&c.reply(), 221, "2.0.0");
    r.stop();
    assert_eq!(r.queue_ids().len(), 2);
}

/// Sends one message with DATA; returns the final reply.
fn send_data(c: &mut Client, rcpt: &str, data: &[u8]) -> common::Reply {
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd(&format!("RCPT TO:<{rcpt}>")), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(data);
    c.reply()
}

#[test]
fn dot_stuffing_is_undone_and_the_message_is_stored_as_sent() {
    let mut r = Router::start(LIMITS);
    let mut c = Client::hello(r.port);
    let reply = send_data(
        &mut c,
        "alice@east.example.com",
        b"Subject: dots\r\n\r\n..starts with a dot\r\n...two dots\r\n.\r\n",
    );
    expect(&reply, 250, "2.0.0");
    c.cmd("QUIT");
    r.stop();
    let ids = r.queue_ids();
    assert_eq!(ids.len(), 1);
    let raw = r.queued_raw(&ids[0]);
    assert_eq!(
        without_received(&raw),
        b"Subject: dots\r\n\r\n.starts with a dot\r\n..two dots\r\n"
    );
    let head = String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
    assert!(
        head.contains("by mx.test (clustermail) with ESMTP id")
            && head.contains("for <alice@east.example.com>"),
        "{head}"
    );
}

#[test]
fn size_limit_is_enforced_while_reading_data_without_losing_sync() {
    let mut r = Router::start(LIMITS);
    let mut c = Client::hello(r.port);
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..200 {
        big.extend_from_slice(&[b'x'; 100]);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b".\r\n");
    expect(
        &send_data(&mut c, "alice@east.example.com", &big),
        552,
        "5.3.4",
    );
    // Still in sync: the next transaction works.
    expect(
        &send_data(
            &mut c,
            "alice@east.example.com",
            b"Subject: small\r\n\r\nok\r\n.\r\n",
        ),
        250,
        "2.0.0",
    );
    c.cmd("QUIT");
    r.stop();
    assert_eq!(r.queue_ids().len(), 1, "only the small message was queued");
}

#[test]
fn smtp_smuggling_never_ends_the_data() {
    // `reject` here; the default, `normalize`: tests/hostile.rs.
    let mut r = Router::start(&format!("{LIMITS}\nbare_line_endings = \"reject\""));
    let mut c = Client::hello(r.port);
    for evil in [&b"\n.\n"[..], b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n"] {
        expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
        expect(&c.cmd("RCPT TO:<alice@east.example.com>"), 250, "2.1.5");
        assert_eq!(c.cmd("DATA").code, 354);
        let mut data = b"Subject: smuggle\r\n\r\nhello".to_vec();
        data.extend_from_slice(evil);
        data.extend_from_slice(b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<bob@east.example.com>\r\nDATA\r\nsmuggled\r\n.\r\n");
        c.send_raw(&data);
        // Exactly one reply: the smuggled commands were data, and the message with
        // bare line endings is refused.
        let reply = c.reply();
        expect(&reply, 550, "5.6.0");
        expect(&c.cmd("NOOP"), 250, "2.0.0");
    }
    c.cmd("QUIT");
    r.stop();
    assert!(r.queue_ids().is_empty(), "nothing was queued");
}

#[test]
fn long_lines_are_refused_or_kept_whole_per_config() {
    let long_line = format!("Subject: long\r\n\r\n{}\r\n.\r\n", "z".repeat(1500));
    let mut r = Router::start(LIMITS);
    let mut c = Client::hello(r.port);
    expect(
        &send_data(&mut c, "alice@east.example.com", long_line.as_bytes()),
        550,
        "5.6.0",
    );
    c.cmd("QUIT");
    r.stop();
    assert!(r.queue_ids().is_empty());

    let mut r = Router::start(&format!("{LIMITS}\nlong_lines = \"accept\""));
    let mut c = Client::hello(r.port);
    expect(
        &send_data(&mut c, "alice@east.example.com", long_line.as_bytes()),
        250,
        "2.0.0",
    );
    c.cmd("QUIT");
    r.stop();
    let ids = r.queue_ids();
    let raw = r.queued_raw(&ids[0]);
    assert_eq!(
        without_received(&raw),
        &long_line.as_bytes()[..long_line.len() - 3],
        "kept byte for byte"
    );
}

#[test]
fn relay_policy_and_tricks() {
    let r = Router::start(LIMITS);
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<>"), 250, "2.1.0");
    let cases = [
        ("alice@east.example.com", 250, "2.1.5"),
        ("ALICE@East.Example.COM", 250, "2.1.5"),
        ("Info@east.example.com", 250, "2.1.5"),
        ("nobody@east.example.com", 550, "5.1.1"),
        ("someone@elsewhere.test", 550, "5.7.1"),
        ("alice%elsewhere.test@east.example.com", 550, "5.7.1"),
        ("elsewhere.test!alice@east.example.com", 550, "5.7.1"),
        ("\"alice@elsewhere.test\"@east.example.com", 550, "5.7.1"),
        ("alice@[127.0.0.1]", 550, "5.7.1"),
        ("@east.example.com:victim@elsewhere.test", 550, "5.7.1"),
        ("@elsewhere.test:bob@east.example.com", 250, "2.1.5"),
        ("alice@east.example.com.", 501, "5.1.3"),
    ];
    for (rcpt, code, status) in cases {
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert_eq!(
            (reply.code, reply.status()),
            (code, status),
            "{rcpt}: {reply:?}"
        );
        if code == 250 {
            // Keep under max_recipients.
            c.cmd("RSET");
            c.cmd("MAIL FROM:<>");
        }
    }
}

#[test]
fn idle_clients_time_out() {
    let r = Router::start("command_timeout = \"1s\"");
    let mut c = Client::connect(r.port);
    c.reply();
    let started = std::time::Instant::now();
    let reply = c.reply();
    expect(&reply, 421, "4.4.2");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    assert!(c.closed());
    // A client that stalls inside DATA times out too.
    let r = Router::start("data_timeout = \"1s\"");
    let mut c = Client::hello(r.port);
    c.cmd("MAIL FROM:<>");
    c.cmd("RCPT TO:<alice@east.example.com>");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(b"Subject: stalled\r\n");
    expect(&c.reply(), 421, "4.4.2");
}

#[test]
fn connection_limits() {
    let r = Router::start("max_connections_per_ip = 2");
    let mut a = Client::greeted(r.port);
    let _b = Client::greeted(r.port);
    let mut third = Client::connect(r.port);
    expect(&third.reply(), 421, "4.7.0");
    assert!(third.closed());
    a.cmd("QUIT");
    assert!(a.closed());
    // The slot is free again.
    Client::greeted(r.port);
    let r = Router::start("max_connections = 1");
    let mut only = Client::greeted(r.port);
    let mut over = Client::connect(r.port);
    expect(&over.reply(), 421, "4.7.0");
    expect(&only.cmd("NOOP"), 250, "2.0.0");
}

#[test]
fn bdat_chunks() {
    let mut r = Router::start(LIMITS);
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<alice@east.example.com>"), 250, "2.1.5");
    let bdat = |chunk: &[u8], last: bool| {
        let mut v = format!(
            "BDAT {}{}\r\n",
            chunk.len(),
            if last { " LAST" } else { "" }
        )
        .into_bytes();
        v.extend_from_slice(chunk);
        v
    };
    c.send_raw(&bdat(b"Subject: chunks\r\n", false));
    expect(&c.reply(), 250, "2.0.0");
    // A chunk holding what looks like the end of DATA and a command: just octets.
    c.send_raw(&bdat(b"\r\nhi\r\n.\r\nQUIT\r\nbye\r\n", true));
    let done = c.reply();
    expect(&done, 250, "2.0.0");
    assert!(done.text().contains("queued as"));
    // BDAT without a transaction: the octets are read and dropped, sync is kept.
    c.send_raw(b"BDAT 5 LAST\r\nNOOP\r");
    expect(&c.reply(), 503, "5.5.1");
    expect(&c.cmd("NOOP"), 250, "2.0.0");
    c.cmd("QUIT");
    r.stop();
    let ids = r.queue_ids();
    assert_eq!(
        without_received(&r.queued_raw(&ids[0])),
        b"Subject: chunks\r\n\r\nhi\r\n.\r\nQUIT\r\nbye\r\n"
    );
}

#[test]
fn shutdown_lets_transactions_finish_and_turns_idle_clients_away() {
    let mut r = Router::start("shutdown_grace = \"10s\"");
    let mut busy = Client::hello(r.port);
    expect(&busy.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&busy.cmd("RCPT TO:<alice@east.example.com>"), 250, "2.1.5");
    let mut idle = Client::hello(r.port);
    r.signal_term();
    expect(&idle.reply(), 421, "4.3.2");
    assert!(idle.closed());
    // New connections are refused once the listener has closed.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(std::net::TcpStream::connect(("127.0.0.1", r.port)).is_err());
    // The transaction in progress completes.
    assert_eq!(busy.cmd("DATA").code, 354);
    busy.send_raw(b"Subject: late\r\n\r\nfinished during shutdown\r\n.\r\n");
    expect(&busy.reply(), 250, "2.0.0");
    // ...and then the session is closed with 421.
    expect(&busy.cmd("MAIL FROM:<>"), 421, "4.3.2");
    let status = r.wait();
    assert!(status.success(), "{status}");
    assert_eq!(r.queue_ids().len(), 1);
}

#[test]
fn accepted_mail_survives_kill_9() {
    let mut r = Router::start("");
    let mut sent = Vec::new();
    for i in 0..5 {
        let mut c = Client::hello(r.port);
        let body = format!("Subject: durable {i}\r\nMessage-ID: <m{i}@x.test>\r\n\r\nbody {i}\r\n");
        let reply = send_data(
            &mut c,
            "alice@east.example.com",
            format!("{body}.\r\n").as_bytes(),
        );
        expect(&reply, 250, "2.0.0");
        let id = reply.text().rsplit(' ').next().unwrap_or("").to_string();
        sent.push((id, body));
    }
    // No QUIT, no shutdown: the process dies right after the last 250.
    r.kill9();
    let ids = r.queue_ids();
    for (id, body) in &sent {
        assert!(
            ids.contains(id),
            "{id} lost after kill -9; queue has {ids:?}"
        );
        assert_eq!(without_received(&r.queued_raw(id)), body.as_bytes());
    }
    // And the router starts again on the same store.
    r.restart();
    let mut c = Client::hello(r.port);
    expect(
        &send_data(
            &mut c,
            "bob@east.example.com",
            b"Subject: after\r\n\r\n.\r\n",
        ),
        250,
        "2.0.0",
    );
}

#[test]
fn listens_on_ipv4_and_ipv6_at_once() {
    let (port4, port6) = (common::free_port(), common::free_port());
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port4}\", \"[::1]:{port6}\"]\n"
    );
    let mut r = Router::start_config(common::Scratch::new(), &config, port4);
    for addr in [format!("127.0.0.1:{port4}"), format!("[::1]:{port6}")] {
        let mut c = Client::connect_to(&addr);
        assert_eq!(c.reply().code, 220, "{addr}");
        c.cmd("EHLO v6.test");
        expect(
            &send_data(
                &mut c,
                "alice@east.example.com",
                b"Subject: family\r\n\r\n.\r\n",
            ),
            250,
            "2.0.0",
        );
    }
    r.stop();
    let ids = r.queue_ids();
    assert_eq!(ids.len(), 2);
    let v6 = String::from_utf8_lossy(&r.queued_raw(&ids[1])).into_owned();
    assert!(
        v6.starts_with("Received: from v6.test ([IPv6:::1])"),
        "{v6}"
    );
}
