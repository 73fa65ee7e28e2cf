//! Peers that try to hold the router's resources or slip text past it, against the
//! real binary on loopback: a client that never reads its replies, a mailbox
//! harvester, a huge Message-ID.

mod common;
use common::{Router, Scratch};
use std::io::{BufRead, BufReader, Read, Write};
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

/// Reads one (possibly multi-line) reply; its code, or None at EOF / error.
fn reply(r: &mut BufReader<TcpStream>) -> Option<u16> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.get(..3)?.parse().ok();
        }
    }
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
        let c = TcpStream::connect(("127.0.0.1", r.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = BufReader::new(c);
        let code = reply(&mut c);
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
    let c = TcpStream::connect(("127.0.0.1", r.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = c.try_clone().unwrap();
    let mut c = BufReader::new(c);
    assert_eq!(reply(&mut c), Some(220));
    w.write_all(b"EHLO harvester.test\r\nMAIL FROM:<h@x.test>\r\n")
        .unwrap();
    assert_eq!(reply(&mut c), Some(250));
    assert_eq!(reply(&mut c), Some(250));
    let mut codes = Vec::new();
    for i in 0..20 {
        if w.write_all(format!("RCPT TO:<guess{i}@c.test>\r\n").as_bytes())
            .is_err()
        {
            break;
        }
        match reply(&mut c) {
            Some(code) => codes.push(code),
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
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed after the 421: {rest:?}");
}

/// Sends one message from a client whose HELO is `helo`; its queue id.
fn send_with_helo(port: u16, helo: &[u8], data: &[u8]) -> String {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = c.try_clone().unwrap();
    let mut c = BufReader::new(c);
    assert_eq!(reply(&mut c), Some(220));
    w.write_all(b"EHLO ").unwrap();
    w.write_all(helo).unwrap();
    w.write_all(b"\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<u@c.test>\r\nDATA\r\n")
        .unwrap();
    for _ in 0..3 {
        assert_eq!(reply(&mut c), Some(250));
    }
    assert_eq!(reply(&mut c), Some(354));
    w.write_all(data).unwrap();
    w.write_all(b"\r\n.\r\n").unwrap();
    let mut line = String::new();
    c.read_line(&mut line).unwrap();
    assert!(line.starts_with("250 "), "{line}");
    let id = line
        .split_whitespace()
        .find(|w| w.len() == 16 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no queue id in {line}"))
        .to_string();
    let _ = w.write_all(b"QUIT\r\n");
    id
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
