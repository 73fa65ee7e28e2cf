//! "On disk before 250", against power loss: the group commit ends in a real
//! fdatasync of the store's log before the client hears 250 (seen with strace);
//! and a message answered 451 because its flush failed is never delivered, not
//! even after a crash and restart.

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn strace_installed() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Attaches strace to every thread of `pid` (and those it starts), writing to
/// `trace`; returns once they are attached.
// The caller waits for the returned child (clippy does not follow the return).
#[allow(clippy::zombie_processes)]
fn attach_strace(pid: u32, trace: &Path, stderr: &Path) -> Child {
    let mut child = Command::new("strace")
        .args(["-f", "-y", "-s", "512", "-e"])
        .arg("trace=read,recvfrom,readv,write,sendto,writev,fsync,fdatasync")
        .arg("-o")
        .arg(trace)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).expect("strace stderr"))
        .spawn()
        .expect("spawn strace");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // "Process N attached with M threads": all of them at once.
        let said = std::fs::read_to_string(stderr).unwrap_or_default();
        if said.contains("attached") {
            return child;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("strace did not attach: {said}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether, in `lines` (the trace), an fdatasync or fsync of the store's log
/// starts and completes between `from` and `to`.
fn synced_between(lines: &[&str], from: usize, to: usize) -> bool {
    let is_sync = |l: &str| l.contains("fdatasync(") || l.contains("fsync(");
    (from + 1..to).any(|i| {
        let l = lines[i];
        if !(is_sync(l) && l.contains("/store/db>")) {
            return false;
        }
        if l.contains(") = 0") {
            return true;
        }
        // `<unfinished ...>`: its `resumed` line must come before the reply too.
        let tid = l.split_whitespace().next().unwrap_or("");
        (i + 1..to).any(|j| {
            lines[j].starts_with(tid)
                && lines[j].contains("sync resumed>")
                && lines[j].contains("= 0")
        })
    })
}

#[test]
fn an_fdatasync_of_the_store_comes_between_the_end_of_data_and_the_250() {
    if !strace_installed() {
        eprintln!(
            "\n*** SKIPPED: strace is not installed (apt-get install strace; .ci/run does): \
             cannot observe the fdatasync before the 250 ***\n"
        );
        return;
    }
    let r = Router::start("");
    let s = Scratch::new();
    let (trace, stderr) = (s.path().join("trace"), s.path().join("strace.err"));
    let mut strace = attach_strace(r.pid(), &trace, &stderr);
    let mut c = Client::hello(r.port);
    for n in 0..3 {
        expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
        expect(&c.cmd("RCPT TO:<alice@east.example.com>"), 250, "2.1.5");
        assert_eq!(c.cmd("DATA").code, 354);
        c.send_raw(format!("Subject: durable-{n}\r\n\r\nbody\r\n.\r\n").as_bytes());
        expect(&c.reply(), 250, "2.0.0");
    }
    assert_eq!(c.cmd("QUIT").code, 221);
    // Let strace write out the last lines, then detach it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&trace)
        .unwrap_or_default()
        .matches("\"250 2.0.0 Ok: queued")
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "the 250s never showed in the trace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-INT", &strace.id().to_string()])
        .status();
    let _ = strace.wait();
    let text = std::fs::read_to_string(&trace).expect("trace");
    let lines: Vec<&str> = text.lines().collect();
    for n in 0..3 {
        let marker = format!("durable-{n}");
        let data_end = lines
            .iter()
            .position(|l| l.contains(&marker) && l.contains("\\r\\n.\\r\\n"))
            .unwrap_or_else(|| panic!("the end of DATA of {marker} is not in the trace:\n{text}"));
        let reply = (data_end..lines.len())
            .find(|&i| lines[i].contains("\"250 2.0.0 Ok: queued"))
            .unwrap_or_else(|| panic!("no 250 after {marker}:\n{text}"));
        assert!(
            synced_between(&lines, data_end, reply),
            "no fdatasync/fsync of store/db between the end of DATA of {marker} and its 250:\n{}",
            lines[data_end..=reply].join("\n")
        );
    }
}

fn send(port: u16, subject: &str) -> common::Reply {
    let mut c = Client::hello(port);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes());
    c.reply()
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
fn a_message_answered_451_after_a_failed_flush_is_never_delivered() {
    let m1 = RecordingSink::start("m1");
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
    s.write(
        "clustermail.toml",
        &format!(
            "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\n\
             probe_interval = \"200ms\"\nrise = 1\nretry_initial = \"200ms\"\n"
        ),
    );
    let trigger = s.path().join("fail-flush");
    let mut router = common::serve_failing_flush(&s, port, &trigger);
    std::fs::write(&trigger, "").expect("arm the hook");
    expect(&send(port, "refused"), 451, "4.3.0");
    std::fs::remove_file(&trigger).expect("disarm the hook");
    expect(&send(port, "accepted"), 250, "2.0.0");
    assert_eq!(m1.wait_for(1, 20).len(), 1);
    // A pass over the whole store (an administrator's retry) must not find it.
    s.ok(&["queue", "retry", "--all"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(subjects(&m1), ["accepted"]);
    // A crash, then a restart: the refused message is not in the store either.
    let _ = router.kill();
    let _ = router.wait();
    let mut router = common::serve_failing_flush(&s, port, &trigger);
    std::thread::sleep(Duration::from_millis(2000));
    let list = s.ok(&["queue", "list"]);
    assert!(list.ends_with("0 message(s)\n"), "{list}");
    assert_eq!(
        subjects(&m1),
        ["accepted"],
        "the 451'd message was delivered"
    );
    let log = std::fs::read_to_string(s.path().join("serve.log")).unwrap_or_default();
    assert!(log.contains("injected flush failure"), "{log}");
    let _ = router.kill();
    let _ = router.wait();
}
