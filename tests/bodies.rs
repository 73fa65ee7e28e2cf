//! Large message bodies live in files (`data/store/bodies/<queue id>`) with the
//! spool's guarantees: after a kill -9 an accepted large message is delivered
//! once and no file is left behind; a large message answered 451 is never
//! delivered and its file is gone after the next start; and the body file's
//! fdatasync (and its directory's fsync) comes before the 250 (strace).

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Over the spool's threshold for keeping a body in sled (256 KiB).
const BIG: usize = 600 << 10;

fn bodies_dir(s: &Path) -> PathBuf {
    s.join("data/store/bodies")
}

fn body_files(s: &Path) -> Vec<String> {
    match std::fs::read_dir(bodies_dir(s)) {
        Ok(d) => d
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A message of about `BIG` octets with `subject`, ending in the DATA dot line.
fn big_message(subject: &str) -> Vec<u8> {
    let mut m = format!("Subject: {subject}\r\n\r\n").into_bytes();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while m.len() < BIG {
        m.extend_from_slice(line);
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn send_big(port: u16, subject: &str) -> common::Reply {
    let mut c = Client::hello(port);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(&big_message(subject));
    c.reply()
}

/// A scratch dir whose catalog's only mailbox `u@c.test` lives on `m1`, a port
/// and a router config listening on it.
fn router_for(m1: &RecordingSink) -> (Scratch, u16, String) {
    let s = Scratch::new();
    let f = s.write(
        "cluster.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n",
            m1.port
        ),
    );
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\n\
         probe_interval = \"200ms\"\nrise = 1\nretry_initial = \"200ms\"\n"
    );
    (s, port, config)
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn subjects(m1: &RecordingSink) -> Vec<String> {
    m1.messages()
        .iter()
        .filter_map(|m| {
            String::from_utf8_lossy(&m.data)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect()
}

#[test]
fn a_large_message_accepted_then_killed_is_delivered_once_and_leaves_no_file() {
    let mut m1 = RecordingSink::start("m1");
    m1.down();
    let (s, port, config) = router_for(&m1);
    let mut r = Router::start_config(s, &config, port);
    expect(&send_big(r.port, "big-one"), 250, "2.0.0");
    let files = body_files(r.scratch.path());
    assert_eq!(files.len(), 1, "the body is in a file: {files:?}");
    assert_eq!(r.queue_ids(), files, "the file is named by the queue id");
    // Readers get the octets as before (`queue show --raw`).
    let expected = big_message("big-one");
    let raw = r.queued_raw(&files[0]);
    assert!(
        raw.ends_with(&expected[..expected.len() - 3]),
        "queue show --raw: {} octets",
        raw.len()
    );
    // An orphan, as a crash during an earlier accept leaves (no envelope).
    std::fs::write(
        bodies_dir(r.scratch.path()).join("0000000000000001"),
        b"half",
    )
    .expect("plant an orphan");
    r.kill9();
    m1.up();
    r.restart();
    let got = m1.wait_for(1, 30);
    assert_eq!(got.len(), 1);
    assert!(
        got[0].data.ends_with(&expected[..expected.len() - 3]),
        "the octets as sent ({} octets delivered)",
        got[0].data.len()
    );
    wait_until("the body file to go", 20, || {
        body_files(r.scratch.path()).is_empty()
    });
    assert!(r.log().contains("orphan"), "{}", r.log());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(subjects(&m1), ["big-one"], "delivered once");
}

#[test]
fn a_large_message_answered_451_is_never_delivered_and_its_file_goes() {
    let m1 = RecordingSink::start("m1");
    let (s, port, config) = router_for(&m1);
    s.write("clustermail.toml", &config);
    let trigger = s.path().join("fail-flush");
    let mut router = common::serve_failing_flush(&s, port, &trigger);
    std::fs::write(&trigger, "").expect("arm the hook");
    expect(&send_big(port, "refused"), 451, "4.3.0");
    // Its removal could not be made durable either: the file stays until a start.
    assert_eq!(body_files(s.path()).len(), 1, "the refused body's file");
    // A crash while the refusal is not durable, then a start with a good disk.
    let _ = router.kill();
    let _ = router.wait();
    std::fs::remove_file(&trigger).expect("disarm the hook");
    let mut router = common::serve_failing_flush(&s, port, &trigger);
    expect(&send_big(port, "accepted"), 250, "2.0.0");
    assert_eq!(m1.wait_for(1, 30).len(), 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        subjects(&m1),
        ["accepted"],
        "the 451'd message was delivered"
    );
    wait_until("no body file left", 20, || body_files(s.path()).is_empty());
    let log = std::fs::read_to_string(s.path().join("serve.log")).unwrap_or_default();
    assert!(log.contains("injected flush failure"), "{log}");
    let _ = router.kill();
    let _ = router.wait();
}

#[test]
fn the_body_file_is_fdatasynced_before_the_250() {
    let installed = Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("\n*** SKIPPED: strace is not installed: cannot observe the fdatasync ***\n");
        return;
    }
    let mut m1 = RecordingSink::start("m1");
    m1.down();
    let (s, port, config) = router_for(&m1);
    let r = Router::start_config(s, &config, port);
    let dir = Scratch::new();
    let (trace, stderr) = (dir.path().join("trace"), dir.path().join("strace.err"));
    let mut strace = Command::new("strace")
        .args(["-f", "-y", "-s", "64", "-e"])
        .arg("trace=write,sendto,writev,fsync,fdatasync")
        .arg("-o")
        .arg(&trace)
        .args(["-p", &r.pid().to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("strace stderr"))
        .spawn()
        .expect("spawn strace");
    wait_until("strace to attach", 20, || {
        std::fs::read_to_string(&stderr)
            .unwrap_or_default()
            .contains("attached")
    });
    expect(&send_big(r.port, "traced"), 250, "2.0.0");
    wait_until("the 250 in the trace", 20, || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .contains("\"250 2.0.0 Ok: queued")
    });
    let _ = Command::new("kill")
        .args(["-INT", &strace.id().to_string()])
        .status();
    let _ = strace.wait();
    let text = std::fs::read_to_string(&trace).expect("trace");
    let lines: Vec<&str> = text.lines().collect();
    let reply = lines
        .iter()
        .position(|l| l.contains("\"250 2.0.0 Ok: queued"))
        .expect("the 250 in the trace");
    let id = r.queue_ids().pop().expect("queued");
    let done = |l: &str| l.contains(") = 0") || l.contains("<unfinished");
    let file = format!("/store/bodies/{id}>");
    assert!(
        lines[..reply]
            .iter()
            .any(|l| l.contains("fdatasync(") && l.contains(&file) && done(l)),
        "no fdatasync of {file} before the 250:\n{text}"
    );
    assert!(
        lines[..reply]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains("/store/bodies>") && done(l)),
        "no fsync of the bodies directory before the 250:\n{text}"
    );
}
