//! Peers that try to hold the router's resources or slip text past it, against the
//! real binary on loopback: a client that never reads its replies, a mailbox
//! harvester, a huge Message-ID.

mod common;
use common::{expect, Client, Router, Scratch};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn router(extra_smtp: &str) -> Router {
    let s = Scratch::new();
    let catalog = s.write(
        "c.toml",
        "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:9\"\n\n\
         [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n",
    );
    s.ok(&[
        "catalog",
        "import",
        "--replace",
        &catalog.display().to_string(),
    ]);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n{extra_smtp}\n"
    );
    Router::start_config(s, &config, port)
}

#[test]
fn a_client_that_never_reads_its_replies_loses_its_connection_after_the_command_timeout() {
    let r = router("max_connections_per_ip = 1\ncommand_timeout = \"2s\"");
    // Commands with long replies, sent as fast as the kernel takes them, never read:
    // the router's replies fill both socket buffers and its writes stall.
    let mut stuck = TcpStream::connect(("127.0.0.1", r.port)).unwrap();
    stuck.set_nonblocking(true).unwrap();
    let ehlos = b"EHLO x\r\n".repeat(4096);
    let started = Instant::now();
    let mut sent = 0usize;
    while started.elapsed() < Duration::from_secs(5) {
        match stuck.write(&ehlos) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(_) => break,
        }
    }
    assert!(sent > 1 << 20, "the stuck client sent {sent} octets");
    // The one slot of 127.0.0.1 is held by `stuck` until the router gives up on it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let code = Client::connect(r.port).try_reply().map(|r| r.code);
        if code == Some(220) {
            break;
        }
        assert_eq!(code, Some(421), "a refused connection says 421");
        assert!(
            Instant::now() < deadline,
            "a client that never reads still holds its slot after 30 s (command_timeout 2s):\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(stuck);
}

#[test]
fn refused_recipients_count_as_errors_and_a_harvester_is_cut_off() {
    let r = router("max_errors = 5");
    let mut c = Client::greeted(r.port);
    assert_eq!(c.cmd("EHLO harvester.test").code, 250);
    expect(&c.cmd("MAIL FROM:<h@x.test>"), 250, "2.1.0");
    let mut codes = Vec::new();
    for i in 0..20 {
        c.send_raw(format!("RCPT TO:<guess{i}@c.test>\r\n").as_bytes());
        match c.try_reply() {
            Some(reply) => codes.push(reply.code),
            None => break,
        }
        if codes.last() == Some(&421) {
            break;
        }
    }
    assert_eq!(
        codes.last(),
        Some(&421),
        "cut off after max_errors refusals: {codes:?}"
    );
    assert!(
        codes.iter().filter(|&&c| c == 550).count() <= 5,
        "{codes:?}"
    );
    assert!(c.closed(), "closed after the 421");
}

/// Sends one message from a client whose HELO is `helo`; its queue id.
fn send_with_helo(port: u16, helo: &[u8], data: &[u8]) -> String {
    let mut c = Client::greeted(port);
    c.send_raw(&[b"EHLO ", helo, b"\r\n"].concat());
    assert_eq!(c.reply().code, 250);
    expect(&c.cmd("MAIL FROM:<s@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(data);
    let done = c.cmd("\r\n.");
    expect(&done, 250, "2.0.0");
    let text = done.text();
    text.split_whitespace()
        .find(|w| w.len() == 16 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no queue id in {text}"))
        .to_string()
}

#[test]
fn peer_text_shown_to_the_administrator_cannot_drive_a_terminal() {
    let r = router("");
    // An OSC title change and a screen clear in the HELO; a huge folded Message-ID.
    let mut data = b"Message-ID: <a".to_vec();
    for _ in 0..2000 {
        data.extend_from_slice(b"\r\n b");
    }
    data.extend_from_slice(b">\r\nSubject: x\r\n\r\nbody");
    let id = send_with_helo(r.port, b"\x1b]0;owned\x07\x1b[2J", &data);
    for args in [
        vec!["queue", "show", id.as_str()],
        vec!["track", "--from", "s@x.test"],
    ] {
        let (code, out, err) = r.scratch.run(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains(&id), "{args:?}: {out}");
        assert!(
            !out.contains('\u{1b}') && !out.contains('\u{7}'),
            "{args:?} printed raw control characters: {out:?}"
        );
        assert!(out.contains("\\u{1b}]0;owned"), "{args:?}: {out}");
        assert!(
            out.len() < 8000,
            "{args:?}: the Message-ID is bounded: {} octets",
            out.len()
        );
    }
}
