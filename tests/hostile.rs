//! Hostile input and hostile networks (issue 14), against the real binary on
//! loopback: secrets never printed, a private store and admin socket whatever the
//! umask or the caller, recipients matched as delivered, escaped logs, bare line
//! endings normalized.

mod common;
use common::{expect, without_received, Client, Router, Scratch};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "s3cret-Pa55phrase";

fn ha_section(password_line: &str) -> String {
    format!(
        "[ha]\nmode = \"primary\"\nlisten = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\n\
         peer_smtp = \"127.0.0.1:{}\"\n{password_line}\n",
        common::free_port(),
        common::free_port(),
        common::free_port()
    )
}

#[test]
fn config_check_redacts_the_ha_password_and_reads_a_password_file() {
    let s = Scratch::new();
    s.write(
        "clustermail.toml",
        &format!(
            "router_name = \"mx.test\"\n{}",
            ha_section(&format!("password = \"{SECRET}\""))
        ),
    );
    let (code, out, err) = s.run(&["config", "check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET), "{out}{err}");
    assert!(out.contains("password = \"<redacted>\""), "{out}");

    // The secret in its own file: the config file itself may be world-readable.
    let pw = s.write("ha.secret", &format!("{SECRET}\n"));
    s.write(
        "clustermail.toml",
        &format!(
            "router_name = \"mx.test\"\n{}",
            ha_section(&format!("password_file = \"{}\"", pw.display()))
        ),
    );
    let (code, out, err) = s.run(&["config", "check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET), "{out}{err}");
    assert!(out.contains("password_file = "), "{out}");

    // Both, or a missing file: errors naming the key, never the secret.
    s.write(
        "clustermail.toml",
        &ha_section(&format!(
            "password = \"{SECRET}\"\npassword_file = \"{}\"",
            pw.display()
        )),
    );
    let (code, out, err) = s.run(&["config", "check"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("ha.password_file"), "{err}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET), "{out}{err}");
    s.write(
        "clustermail.toml",
        &ha_section("password_file = \"/nonexistent/ha.secret\""),
    );
    let (code, _, err) = s.run(&["config", "check"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("ha.password_file") && err.contains("/nonexistent"),
        "{err}"
    );
}

/// Permission bits of everything under `dir` that are not 0700 (directories) or
/// 0600 (files, sockets).
fn too_open(dir: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode & !want != 0 {
            bad.push(format!("{} {mode:o}", p.display()));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        }
    }
    bad
}

/// `clustermail serve` under umask 000, in `s`, listening on `port`.
fn serve_with_umask_000(s: &Scratch, port: u16) -> std::process::Child {
    s.write(
        "clustermail.toml",
        &format!("router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n"),
    );
    let log = std::fs::File::create(s.path().join("serve.log")).expect("log");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("umask 000 && exec {} serve", common::bin()))
        .current_dir(s.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "router did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn send_one(port: u16, rcpt: &str, data: &[u8]) -> common::Reply {
    let mut c = Client::hello(port);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd(&format!("RCPT TO:<{rcpt}>")), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(data);
    let r = c.reply();
    c.cmd("QUIT");
    r
}

#[test]
fn the_store_and_admin_socket_are_private_whatever_the_umask() {
    let s = Scratch::new();
    let port = common::free_port();
    let mut child = serve_with_umask_000(&s, port);
    let r = send_one(
        port,
        "dave@east.example.com",
        b"Subject: private\r\n\r\nqueued mail is nobody else's business\r\n.\r\n",
    );
    expect(&r, 250, "2.0.0");
    let data = s.path().join("data");
    let bad = too_open(&data);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        bad.is_empty(),
        "readable by others under umask 000: {bad:?}"
    );
}

const PEER_PROBE: &str = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(json.dumps({"args": ["queue", "list"], "cwd": "/"}).encode() + b"\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode("utf-8", "replace"))
"#;

#[test]
fn the_admin_socket_answers_only_root_and_the_routers_own_user() {
    let mut r = Router::start("");
    let sock = r.scratch.path().join("data/admin.sock");
    // An operator loosened every permission on the way: the peer check still holds.
    // (Acting as another uid, nobody, needs root, as CI runs.)
    for p in [r.scratch.path(), &r.scratch.path().join("data")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let probe = |as_nobody: bool| {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
            ]);
            c
        } else {
            Command::new("/usr/bin/python3")
        };
        let out = cmd
            .args(["-c", PEER_PROBE])
            .arg(&sock)
            .output()
            .expect("python3");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (own, err) = probe(false);
    assert!(own.contains("\"code\":0"), "own user refused: {own} {err}");
    let (other, err) = probe(true);
    assert!(
        !other.contains("\"code\":0") && !other.contains("message(s)"),
        "another user was served: {other} {err}"
    );
    r.wait_log("admin connection refused");
    r.stop();
}

#[test]
fn recipients_are_matched_as_they_are_delivered_and_delivered_once() {
    let mut r = Router::start("");
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<sender@x.test> SMTPUTF8"), 250, "2.1.0");
    // Unicode whitespace around the address, a C1 control inside it.
    for bad in [
        "\u{a0}ALICE@east.example.com\u{3000}",
        "alice\u{85}@east.example.com",
        "alice@east.example.com\u{2028}",
        "ali\u{200b}ce@east.example.com",
    ] {
        expect(&c.cmd(&format!("RCPT TO:<{bad}>")), 501, "5.1.3");
    }
    // The Kelvin sign folds to "k" in Unicode: not frank's address as written.
    expect(
        &c.cmd("RCPT TO:<fran\u{212a}@east.example.com>"),
        550,
        "5.1.1",
    );
    // One mailbox three times: its address, the same in capitals, an alias.
    for same in [
        "alice@east.example.com",
        "ALICE@east.example.com",
        "alice.smith@east.example.com",
    ] {
        expect(&c.cmd(&format!("RCPT TO:<{same}>")), 250, "2.1.5");
    }
    expect(&c.cmd("RCPT TO:<bob@east.example.com>"), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(b"Subject: once\r\n\r\nonce\r\n.\r\n");
    let queued = c.reply();
    expect(&queued, 250, "2.0.0");
    c.cmd("QUIT");
    r.stop();
    let id = queued.text().rsplit(' ').next().unwrap_or("").to_string();
    let show = r.scratch.ok(&["queue", "show", &id]);
    let rcpts: Vec<&str> = show
        .lines()
        .filter(|l| l.starts_with("recipient:"))
        .collect();
    assert_eq!(rcpts.len(), 2, "{show}");
    assert!(rcpts[0].contains("<alice@east.example.com>"), "{show}");
    assert!(rcpts[1].contains("<bob@east.example.com>"), "{show}");
}

/// Runs `serve` with this log format; returns the child and its port.
fn serve_logging(s: &Scratch, format: &str) -> (std::process::Child, u16) {
    let port = common::free_port();
    s.write(
        "clustermail.toml",
        &format!("router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n"),
    );
    let log = std::fs::File::create(s.path().join("serve.log")).expect("log");
    let child = s
        .cmd()
        .env("RUST_LOG", "info")
        .args(["--log-format", format, "serve"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "router did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

#[test]
fn peer_strings_are_escaped_in_both_log_formats() {
    for format in ["pretty", "json"] {
        let s = Scratch::new();
        let (mut child, port) = serve_logging(&s, format);
        let mut c = Client::greeted(port);
        // ESC sequences (7-bit and the 8-bit CSI), a CR faking a new log line, DEL.
        let helo = "evil\x1b[2J\u{9b}31m\rINFO-forged-line\x7f";
        assert_eq!(c.cmd(&format!("EHLO {helo}")).code, 250);
        expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
        expect(&c.cmd("RCPT TO:<dave@east.example.com>"), 250, "2.1.5");
        assert_eq!(c.cmd("DATA").code, 354);
        c.send_raw(b"Subject: log\r\n\r\nx\r\n.\r\n");
        expect(&c.reply(), 250, "2.0.0");
        c.cmd("QUIT");
        let path = s.path().join("serve.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        let log = loop {
            let log = std::fs::read(&path).unwrap_or_default();
            if String::from_utf8_lossy(&log).contains("message accepted") {
                break log;
            }
            assert!(Instant::now() < deadline, "no accept line logged");
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = child.kill();
        let _ = child.wait();
        let text = String::from_utf8(log).expect("the log is UTF-8");
        let line = text
            .lines()
            .find(|l| l.contains("message accepted"))
            .unwrap_or_default();
        for (c, name) in [
            ('\x1b', "ESC"),
            ('\u{9b}', "CSI"),
            ('\r', "CR"),
            ('\x7f', "DEL"),
        ] {
            assert!(
                !text.contains(c),
                "{format}: raw {name} in the log: {line:?}"
            );
        }
        assert!(line.contains("evil"), "{format}: {line:?}");
        assert!(
            !text.lines().any(|l| l.starts_with("INFO-forged")),
            "{format}"
        );
    }
}

#[test]
fn bare_line_endings_are_normalized_by_default() {
    let mut r = Router::start("");
    // DATA: bare LF lines (one dot-stuffed, one a lone dot that must not end the
    // data), a bare CR; only CRLF.CRLF ends it.
    let data: &[u8] =
        b"Subject: lf\nX-A: 1\n\nline1\n..dotted\n.\nMAIL FROM:<evil@x.test>\rend\r\n.\r\n";
    let first = send_one(r.port, "alice@east.example.com", data);
    expect(&first, 250, "2.0.0");
    // BDAT: no terminator and no dot-stuffing; a CR ends one chunk, its LF starts
    // the next (one CRLF), a lone LF and a final bare CR.
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<bob@east.example.com>"), 250, "2.1.5");
    c.send_raw(b"BDAT 13\r\nSubject: b\r\n\r");
    expect(&c.reply(), 250, "2.0.0");
    c.send_raw(b"BDAT 10 LAST\r\n\n.one\ntwo\r");
    let second = c.reply();
    expect(&second, 250, "2.0.0");
    c.cmd("QUIT");
    r.stop();
    let id = |q: &common::Reply| q.text().rsplit(' ').next().unwrap_or("").to_string();
    assert_eq!(
        String::from_utf8_lossy(&without_received(&r.queued_raw(&id(&first)))),
        "Subject: lf\r\nX-A: 1\r\n\r\nline1\r\n.dotted\r\n.\r\nMAIL FROM:<evil@x.test>\r\nend\r\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&without_received(&r.queued_raw(&id(&second)))),
        "Subject: b\r\n\r\n.one\r\ntwo\r\n"
    );
    assert_eq!(r.queue_ids().len(), 2, "nothing smuggled in");
}

#[test]
fn smuggling_sequences_are_normalized_into_content() {
    let mut r = Router::start("");
    let mut c = Client::hello(r.port);
    let evils = [&b"\n.\n"[..], b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n"];
    for evil in evils {
        expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
        expect(&c.cmd("RCPT TO:<alice@east.example.com>"), 250, "2.1.5");
        assert_eq!(c.cmd("DATA").code, 354);
        let mut data = b"Subject: smuggle\r\n\r\nhello".to_vec();
        data.extend_from_slice(evil);
        data.extend_from_slice(
            b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<bob@east.example.com>\r\nDATA\r\nsmuggled\r\n.\r\n",
        );
        c.send_raw(&data);
        // Exactly one reply: the smuggled commands were data.
        expect(&c.reply(), 250, "2.0.0");
        expect(&c.cmd("NOOP"), 250, "2.0.0");
    }
    c.cmd("QUIT");
    r.stop();
    let ids = r.queue_ids();
    assert_eq!(ids.len(), evils.len(), "one message per transaction");
    for id in ids {
        let raw = without_received(&r.queued_raw(&id));
        let text = String::from_utf8_lossy(&raw).into_owned();
        assert!(text.contains("\r\nMAIL FROM:<evil@x.test>\r\n"), "{text:?}");
        let bare = (0..raw.len()).any(|i| {
            (raw[i] == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
                || (raw[i] == b'\r' && raw.get(i + 1) != Some(&b'\n'))
        });
        assert!(!bare, "a bare line end was stored: {text:?}");
        let show = r.scratch.ok(&["queue", "show", &id]);
        assert_eq!(show.matches("recipient:").count(), 1, "{show}");
    }
}

#[test]
fn a_normalized_message_is_relayed_as_stored() {
    let home = common::RecordingSink::start("m1");
    let s = Scratch::new();
    let catalog = s.write(
        "c.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n",
            home.port
        ),
    );
    s.ok(&[
        "catalog",
        "import",
        "--replace",
        &catalog.display().to_string(),
    ]);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [routing]\nprobe_interval = \"200ms\"\nrise = 1\n"
    );
    let r = Router::start_config(s, &config, port);
    // A lone dot after a bare LF, then what would be a second message to a
    // server that took LF as a line end.
    let data: &[u8] =
        b"Subject: relay\n\nbefore\n.\nMAIL FROM:<evil@x.test>\n..stuffed\nafter\r\n.\r\n";
    expect(&send_one(r.port, "u@c.test", data), 250, "2.0.0");
    let got = home.wait_for(1, 20);
    assert_eq!(got.len(), 1, "one message, not two");
    let body = without_received(&got[0].data);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "Subject: relay\r\n\r\nbefore\r\n.\r\nMAIL FROM:<evil@x.test>\r\n.stuffed\r\nafter\r\n"
    );
    assert_eq!(got[0].rcpts, ["u@c.test"]);
}
