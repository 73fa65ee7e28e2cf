//! Outbound STARTTLS against a real TLS-speaking SMTP server (Python's aiosmtpd,
//! `tests/common/tls_mailbox.py`) with a test certificate made by rcgen: the
//! catalog server's `tls` setting (`opportunistic`, `required`, `off`), the
//! verification of `required` (against `routing.tls_ca_file`, with `tls_name`),
//! and the delivery log line's `tls` field.

mod common;
use common::{expect, Client, Router, Scratch};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One aiosmtpd process; killed on drop.
struct Mailbox {
    port: u16,
    log: std::path::PathBuf,
    child: Child,
}

impl Mailbox {
    /// Offers STARTTLS with `tls` = (cert, key) files when given.
    fn start(scratch: &Scratch, name: &str, tls: Option<(&str, &str)>) -> Mailbox {
        let port = common::free_port();
        let log = scratch.path().join(format!("{name}.stored"));
        let mut cmd = Command::new("python3");
        cmd.arg(common::repo("tests/common/tls_mailbox.py"))
            .arg(port.to_string())
            .arg(&log);
        if let Some((cert, key)) = tls {
            cmd.args([cert, key]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (pip install aiosmtpd; test.sh does)");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        BufReader::new(out).read_line(&mut line).expect("ready");
        assert_eq!(
            line.trim(),
            "ready",
            "aiosmtpd did not start: is it installed?"
        );
        Mailbox { port, log, child }
    }

    fn stored(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(r: &Router, rcpt: &str) {
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<sender@outside.test>"), 250, "2.1.0");
    expect(&c.cmd(&format!("RCPT TO:<{rcpt}>")), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(format!("Subject: to {rcpt}\r\n\r\nhello\r\n.\r\n").as_bytes());
    expect(&c.reply(), 250, "2.0.0");
    c.cmd("QUIT");
}

/// The `delivery attempt` log line for `rcpt` once it is logged (60 s at most).
fn attempt(r: &Router, rcpt: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = r.log();
        let needle = format!("rcpt={rcpt}");
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("delivery attempt") && l.contains(&needle))
        {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no attempt for {rcpt}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_stored(m: &Mailbox, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = m.stored();
        if let Some(l) = s.lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "{needle} never stored: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn outbound_starttls_follows_each_servers_tls_setting() {
    let scratch = Scratch::new();
    let key = rcgen::generate_simple_self_signed(vec!["mbox.test".to_string()]).expect("cert");
    let cert = scratch.write("mbox.pem", &key.cert.pem());
    let pkey = scratch.write("mbox.key", &key.signing_key.serialize_pem());
    let (cert, pkey) = (cert.display().to_string(), pkey.display().to_string());
    let tls = Mailbox::start(&scratch, "tls", Some((&cert, &pkey)));
    let plain = Mailbox::start(&scratch, "plain", None);
    // Several servers at the same address with different settings: a kept
    // connection must never serve a server with another TLS setting.
    let servers = [
        ("may", tls.port, ""),
        (
            "verified",
            tls.port,
            "tls = \"required\"\ntls_name = \"mbox.test\"\n",
        ),
        (
            "wrongname",
            tls.port,
            "tls = \"required\"\ntls_name = \"other.test\"\n",
        ),
        ("cleartext", tls.port, "tls = \"off\"\n"),
        ("notoffered", plain.port, "tls = \"required\"\n"),
        ("plainmay", plain.port, ""),
    ];
    let mut toml = String::new();
    for (name, port, extra) in servers {
        toml.push_str(&format!(
            "[[server]]\nname = \"{name}\"\ncluster = \"c\"\naddress = \"127.0.0.1:{port}\"\n{extra}\n"
        ));
        toml.push_str(&format!(
            "[[mailbox]]\naddress = \"{name}@c.test\"\nhome = \"{name}\"\n\n"
        ));
    }
    let f = scratch.write("cluster.toml", &toml);
    scratch.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [routing]\nprobe_interval = \"1h\"\nrise = 1\nretry_initial = \"1h\"\n\
         tls_ca_file = {cert:?}\n"
    );
    let r = Router::start_config(scratch, &config, port);
    for (name, _, _) in servers {
        send(&r, &format!("{name}@c.test"));
    }

    // Opportunistic: TLS, the self-signed certificate not verified.
    assert!(wait_stored(&tls, "may@c.test").starts_with("TLSv1."));
    let a = attempt(&r, "may@c.test");
    assert!(
        a.contains("outcome=delivered") && a.contains("tls=TLSv1."),
        "{a}"
    );
    // Required and verified against tls_ca_file with tls_name.
    assert!(wait_stored(&tls, "verified@c.test").starts_with("TLSv1."));
    let a = attempt(&r, "verified@c.test");
    assert!(
        a.contains("outcome=delivered") && a.contains("tls=TLSv1."),
        "{a}"
    );
    // Off: plain text although STARTTLS is offered.
    assert!(wait_stored(&tls, "cleartext@c.test").starts_with("plain "));
    let a = attempt(&r, "cleartext@c.test");
    assert!(
        a.contains("outcome=delivered") && a.contains("tls=none"),
        "{a}"
    );
    // Opportunistic with a server that offers nothing: plain text.
    assert!(wait_stored(&plain, "plainmay@c.test").starts_with("plain "));
    // Required but the name does not match: a temporary failure of that server.
    let a = attempt(&r, "wrongname@c.test");
    assert!(a.contains("outcome=unusable"), "{a}");
    assert!(a.contains("certificate"), "{a}");
    // Required but not offered: the same.
    let a = attempt(&r, "notoffered@c.test");
    assert!(
        a.contains("outcome=unusable") && a.contains("STARTTLS"),
        "{a}"
    );
    assert!(!tls.stored().contains("wrongname@"), "{}", tls.stored());
    assert!(
        !plain.stored().contains("notoffered@"),
        "{}",
        plain.stored()
    );
}
