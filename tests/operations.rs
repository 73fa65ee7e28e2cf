//! The operator's view: `clustermail demo` end to end, the metrics endpoint, the
//! README's config reference against the config struct, and the help texts.

mod common;
use common::{expect, Client, Router, Scratch};
use std::io::{Read, Write};
use std::path::Path;

/// The files in `dir/new`, with their contents.
fn maildir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("new"))
        .map(|d| {
            d.flatten()
                .map(|f| {
                    String::from_utf8_lossy(&std::fs::read(f.path()).unwrap_or_default())
                        .into_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn subjects(messages: &[String]) -> Vec<String> {
    let mut v: Vec<String> = messages
        .iter()
        .filter_map(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("Subject: ")
                    .map(|s| s.trim_end().to_string())
            })
        })
        .collect();
    v.sort();
    v
}

#[test]
fn the_demo_delivers_home_then_to_a_replica_then_holds_and_delivers_home() {
    let s = Scratch::new();
    let dir = s.path().join("demo");
    let (code, out, err) = s.run(&["demo", "--dir", &dir.display().to_string()]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let mail = dir.join("maildir");
    let alice = "alice@east.example.com";
    let home = maildir(&mail.join("mail-east-1").join(alice));
    let replica = maildir(&mail.join("mail-east-2").join(alice));
    let other = maildir(&mail.join("mail-east-3").join(alice));
    assert_eq!(
        subjects(&home),
        ["demo 1: home up", "demo 3: all down, held"],
        "{out}"
    );
    assert_eq!(subjects(&replica), ["demo 2: home down"], "{out}");
    assert!(other.is_empty(), "{out}");
    // What landed is what the router relayed: its trace header is on top.
    for m in home.iter().chain(&replica) {
        assert!(m.starts_with("Received: from demo.client.test"), "{m}");
        assert!(m.contains("by router.demo.test"), "{m}");
    }
    // The timeline says what happened, in order.
    let order = [
        "delivered to the home mail-east-1",
        "stopped mail-east-1",
        "failed over to the replica mail-east-2",
        "stopped mail-east-2 and mail-east-3",
        "held in the queue, retrying the home mail-east-1 only",
        "started mail-east-1 again",
        "the held message was delivered to the home mail-east-1",
        "queue empty",
    ];
    let mut at = 0;
    for step in order {
        let found = out[at..]
            .find(step)
            .unwrap_or_else(|| panic!("{step:?} missing or out of order:\n{out}"));
        at += found + step.len();
    }
    // Its metrics, read over HTTP from the router.
    assert!(
        out.contains("clustermail_messages_accepted_total 3"),
        "{out}"
    );
    assert!(
        out.contains("clustermail_recipients_delivered_total 3"),
        "{out}"
    );
    assert!(out.contains("clustermail_recipients_held_total 1"), "{out}");
    // A second run starts afresh in the same directory.
    let (code, out, err) = s.run(&["demo", "--dir", &dir.display().to_string()]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(maildir(&mail.join("mail-east-1").join(alice)).len(), 2);
}

#[test]
fn the_demo_refuses_a_directory_that_is_not_its_own() {
    let s = Scratch::new();
    let dir = s.path().join("precious");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("file.txt"), "keep me").expect("write");
    let (code, _, err) = s.run(&["demo", "--dir", &dir.display().to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not a demo directory"), "{err}");
    assert!(dir.join("file.txt").exists());
}

fn get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// The value of the sample line starting with `prefix`.
fn sample(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{body}"))
}

#[test]
fn metrics_show_counters_server_states_and_the_queue() {
    let s = Scratch::new();
    // m1 is nobody: connection refused. u has no replica: its mail is held.
    let dead = common::free_port();
    let f = s.write(
        "c.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{dead}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n"
        ),
    );
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let (port, metrics) = (common::free_port(), common::free_port());
    let config = format!(
        "router_name = \"mx.test\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [routing]\nprobe_interval = \"200ms\"\nprobe_timeout = \"500ms\"\nretry_initial = \"1h\"\n"
    );
    let r = Router::start_config(s, &config, port);
    let mut c = Client::hello(r.port);
    c.cmd("MAIL FROM:<sender@x.test>");
    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    expect(&c.cmd("RCPT TO:<nobody@c.test>"), 550, "5.1.1");
    c.cmd("DATA");
    c.send_raw(b"Subject: m\r\n\r\n.\r\n");
    expect(&c.reply(), 250, "2.0.0");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let body = loop {
        let (head, body) = get(metrics, "/metrics");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        if sample(&body, "clustermail_recipients_held_total") >= 1.0 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never held:\n{body}\n{}",
            r.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(sample(&body, "clustermail_messages_accepted_total"), 1.0);
    assert_eq!(sample(&body, "clustermail_recipients_delivered_total"), 0.0);
    assert!(
        sample(
            &body,
            "clustermail_routing_decisions_total{decision=\"hold\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(&body, "clustermail_smtp_replies_total{code=\"550\"}"),
        1.0
    );
    assert!(sample(&body, "clustermail_smtp_replies_total{code=\"250\"}") >= 3.0);
    assert_eq!(sample(&body, "clustermail_queue_messages"), 1.0);
    assert!(sample(&body, "clustermail_queue_oldest_age_seconds") > 0.0);
    assert_eq!(
        sample(
            &body,
            "clustermail_server_availability{server=\"m1\",cluster=\"c\",admin_state=\"in-service\",availability=\"down\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            "clustermail_server_availability_index{server=\"m1\"}"
        ),
        0.0
    );
    // Every family is declared before its samples.
    for l in body.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap_or("");
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} undeclared"
        );
    }
    // One line per transaction and per delivery attempt, with their fields.
    let log = r.log();
    assert!(!log.contains("\x1b["), "no colour codes in a log file");
    let accepted = log
        .lines()
        .find(|l| l.contains("message accepted"))
        .expect(&log);
    for field in [
        "id=",
        "peer=127.0.0.1",
        "from=sender@x.test",
        "rcpts=u@c.test",
        "reply=250 2.0.0",
    ] {
        assert!(accepted.contains(field), "{field} in {accepted}");
    }
    let held = log.lines().find(|l| l.contains(" held ")).expect(&log);
    for field in [
        "id=",
        "rcpt=u@c.test",
        "decision=hold",
        "why=hold and retry home m1 without failover",
    ] {
        assert!(held.contains(field), "{field} in {held}");
    }
    let (head, _) = get(metrics, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// Every config key, as `section.key`, from the defaults written as TOML.
fn config_keys() -> Vec<String> {
    let s = Scratch::new();
    let text = s.ok(&["config", "check"]);
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{name}.");
        } else if let Some((k, _)) = line.split_once(" = ") {
            if !line.starts_with('#') {
                keys.push(format!("{section}{}", k.trim()));
            }
        }
    }
    keys
}

#[test]
fn every_config_key_is_documented_in_the_readme() {
    let readme = std::fs::read_to_string(common::repo("README.md")).expect("README");
    let keys = config_keys();
    assert!(keys.len() > 20, "{keys:?}");
    for must in ["smtp.listen", "routing.failover", "data_dir"] {
        assert!(keys.iter().any(|k| k == must), "{must} not in {keys:?}");
    }
    // Unset options are not written by `config check`: name them here.
    let optional = [
        "metrics_listen",
        "smtp.tls_cert",
        "smtp.tls_key",
        "routing.relay_host",
        "routing.local_cluster",
        "routing.local_server",
        "ha.mode",
        "ha.listen",
        "ha.peer",
        "ha.peer_smtp",
        "ha.password",
        "ha.password_file",
        "ha.heartbeat_interval",
        "ha.heartbeat_lost",
        "ha.on_failure",
        "ha.inactive_smtp",
        "directory.url",
        "directory.base_dn",
        "directory.bind_dn",
        "directory.password_file",
        "directory.tls_ca_file",
    ];
    let undocumented: Vec<&str> = keys
        .iter()
        .map(String::as_str)
        .chain(optional)
        .filter(|k| {
            // A row documents `a.b` as `a.b`, or `a.x` / `y` pairs as "`a.x` / `y`".
            let last = k.rsplit('.').next().unwrap_or(k);
            !readme.contains(&format!("`{k}`")) && !readme.contains(&format!("/ `{last}`"))
        })
        .collect();
    assert!(undocumented.is_empty(), "README lacks: {undocumented:?}");
}

#[test]
fn help_texts_describe_every_command() {
    let s = Scratch::new();
    let top = s.ok(&["--help"]);
    for cmd in [
        "serve", "demo", "config", "catalog", "queue", "servers", "route",
    ] {
        let line = top
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{cmd} ")))
            .unwrap_or_else(|| panic!("{cmd} missing from --help:\n{top}"));
        assert!(
            line.split_whitespace().count() > 3,
            "{cmd} has no description: {line}"
        );
    }
    for sub in [
        &["catalog", "--help"][..],
        &["queue", "--help"],
        &["route", "explain", "--help"],
        &["demo", "--help"],
    ] {
        let out = s.ok(sub);
        assert!(out.contains("Usage: clustermail"), "{out}");
    }
    // A mistake names what to fix.
    let (code, _, err) = s.run(&["queue", "show"]);
    assert_eq!(code, 2);
    assert!(err.contains("<ID>"), "{err}");
}

#[test]
fn serve_loads_the_example_catalog_only_into_an_empty_catalog() {
    let mut r = Router::start("");
    // The SMTP port opens before the catalog is loaded: wait for the log line.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !r.log().contains("the catalog was empty") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = r.log();
    assert!(
        log.contains("the catalog was empty: loaded the built-in example catalog"),
        "{log}"
    );
    let servers = r.scratch.ok(&["catalog", "list", "servers"]);
    assert!(
        servers.contains("mail-east-1") && servers.contains("mail-west-3"),
        "{servers}"
    );
    let mut c = Client::hello(r.port);
    c.cmd("MAIL FROM:<you@example.net>");
    expect(&c.cmd("RCPT TO:<alice@east.example.com>"), 250, "2.1.5");
    expect(&c.cmd("QUIT"), 221, "2.0.0");
    drop(c);
    // A catalog of the operator's own is kept as it is across restarts.
    r.stop();
    let f = r.scratch.write(
        "own.toml",
        "[[server]]\nname = \"own\"\ncluster = \"c\"\naddress = \"127.0.0.1:2999\"\n",
    );
    r.scratch
        .ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    r.restart();
    assert!(!r.log().contains("built-in example catalog"), "{}", r.log());
    let servers = r.scratch.ok(&["catalog", "list", "servers"]);
    assert!(
        servers.contains("own") && !servers.contains("mail-east-1"),
        "{servers}"
    );
}
