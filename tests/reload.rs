//! Reload without restart: `clustermail reload` and SIGHUP re-read the config
//! file; SMTP limits, routing settings and TLS certificates apply to new sessions
//! while sessions in progress go on; listen addresses are reported as needing a
//! restart; a config with errors is refused and the running one kept.

mod common;
use common::{expect, Client, Router, Scratch};
use std::time::{Duration, Instant};

fn config(port: u16, max_recipients: usize, retry: &str, listen_extra: &str, tls: &str) -> String {
    format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"{listen_extra}]\n\
         max_recipients = {max_recipients}\n{tls}\n[routing]\nprobe_interval = \"1h\"\nretry_initial = \"{retry}\"\n"
    )
}

/// How many recipients a new session may give in one transaction (up to 3).
fn recipients_taken(port: u16) -> usize {
    let mut c = Client::hello(port);
    expect(&c.cmd("MAIL FROM:<s@outside.test>"), 250, "2.1.0");
    let mut n = 0;
    for rcpt in ["alice", "bob", "carol"] {
        if c.cmd(&format!("RCPT TO:<{rcpt}@east.example.com>")).code == 250 {
            n += 1;
        }
    }
    c.cmd("RSET");
    c.cmd("QUIT");
    n
}

/// The DER of the certificate a new STARTTLS session is given.
fn presented_certificate(port: u16) -> String {
    let script = r#"
import smtplib, ssl, sys
with smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='tls.test', timeout=10) as s:
    s.starttls(context=ssl._create_unverified_context())
    print(s.sock.getpeercert(binary_form=True).hex())
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn wait_count(r: &Router, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.log().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged {n} times:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reload_applies_limits_and_certificates_and_refuses_a_broken_config() {
    let scratch = Scratch::new();
    let first = rcgen::generate_simple_self_signed(vec!["first.test".to_string()]).expect("cert");
    let second = rcgen::generate_simple_self_signed(vec!["second.test".to_string()]).expect("cert");
    let cert = scratch.write("cert.pem", &first.cert.pem());
    let key = scratch.write("key.pem", &first.signing_key.serialize_pem());
    let tls = format!(
        "tls_cert = {:?}\ntls_key = {:?}",
        cert.display().to_string(),
        key.display().to_string()
    );
    let port = common::free_port();
    let mut r = Router::start_config(scratch, &config(port, 3, "60s", "", &tls), port);
    assert_eq!(recipients_taken(port), 3);
    assert_eq!(presented_certificate(port), hex(first.cert.der()));

    // A session open across the reload keeps going.
    let mut open = Client::hello(port);
    expect(&open.cmd("MAIL FROM:<s@outside.test>"), 250, "2.1.0");

    // New limits, a routing change, a new certificate, and a listener (restart).
    r.scratch.write("cert.pem", &second.cert.pem());
    r.scratch
        .write("key.pem", &second.signing_key.serialize_pem());
    let other = common::free_port();
    let extra = format!(", \"127.0.0.1:{other}\"");
    r.scratch
        .write("clustermail.toml", &config(port, 1, "5m", &extra, &tls));
    let out = r.scratch.ok(&["reload"]);
    assert!(out.contains("applied: routing, smtp"), "{out}");
    assert!(
        out.contains("needs a restart (running value kept): smtp.listen"),
        "{out}"
    );
    assert_eq!(recipients_taken(port), 1);
    assert_eq!(presented_certificate(port), hex(second.cert.der()));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other)).is_err(),
        "not listening before a restart"
    );
    // The session opened before: not dropped, its own limits.
    expect(&open.cmd("RCPT TO:<alice@east.example.com>"), 250, "2.1.5");
    expect(&open.cmd("RCPT TO:<bob@east.example.com>"), 250, "2.1.5");
    open.cmd("QUIT");

    // A config with errors: refused, with the file and line; the running one kept.
    r.scratch.write(
        "clustermail.toml",
        "router_name = \"mx.test\"\n[smtp]\nmax_recipients = \"many\"\n",
    );
    let (code, out, err) = r.scratch.run(&["reload"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("reload refused") && err.contains("clustermail.toml:3"),
        "{err}"
    );
    wait_count(&r, "config reload refused", 1);
    assert_eq!(recipients_taken(port), 1);

    // SIGHUP does the same.
    r.scratch
        .write("clustermail.toml", &config(port, 2, "5m", "", &tls));
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &r.pid().to_string()])
        .status();
    wait_count(&r, "config reloaded", 2);
    assert_eq!(recipients_taken(port), 2);
    // Nothing was dropped: the router still runs and stops cleanly.
    assert!(r.stop().success());
}
