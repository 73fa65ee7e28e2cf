//! Message tracking: `clustermail track` shows, from the running router's store,
//! when a message was accepted, every delivery attempt and its end (delivered,
//! deleted by an administrator), found by Message-ID, sender or recipient.

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch};
use std::time::{Duration, Instant};

fn send(port: u16, to: &str, message_id: &str) -> String {
    let mut c = Client::hello(port);
    expect(&c.cmd("MAIL FROM:<sender@outside.test>"), 250, "2.1.0");
    expect(&c.cmd(&format!("RCPT TO:<{to}>")), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(format!("Message-ID: {message_id}\r\nSubject: t\r\n\r\nhi\r\n.\r\n").as_bytes());
    let r = c.reply();
    expect(&r, 250, "2.0.0");
    r.text().rsplit(' ').next().unwrap_or("").to_string()
}

fn track_until(r: &Router, args: &[&str], needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = vec!["track"];
        all.extend_from_slice(args);
        let out = r.scratch.ok(&all);
        if out.contains(needle) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never in:\n{out}\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn track_shows_accept_attempts_and_end_of_each_message() {
    let up = RecordingSink::start("m1");
    let mut down = RecordingSink::start("m2");
    down.down();
    let scratch = Scratch::new();
    let f = scratch.write(
        "c.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n\n\
             [[mailbox]]\naddress = \"v@c.test\"\nhome = \"m2\"\n",
            up.port, down.port
        ),
    );
    scratch.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [routing]\nprobe_interval = \"1h\"\nretry_initial = \"1h\"\nretry_max = \"1h\"\n\
         [tracking]\nretention = \"2d\"\n"
    );
    let r = Router::start_config(scratch, &config, port);
    let id = send(port, "u@c.test", "<one@outside.test>");
    let held = send(port, "v@c.test", "<two@outside.test>");

    let out = track_until(
        &r,
        &["--message-id", "one@outside.test"],
        "delivered u@c.test at m1",
    );
    println!("$ clustermail track --message-id one@outside.test\n{out}");
    assert!(
        out.starts_with(&format!("{id} <one@outside.test>")),
        "{out}"
    );
    assert!(
        out.contains("accepted from 127.0.0.1 (helo client.test)"),
        "{out}"
    );
    assert!(
        out.contains("from sender@outside.test to u@c.test"),
        "{out}"
    );
    assert!(
        out.contains("attempt u@c.test -> m1 (home): delivered: 250"),
        "{out}"
    );
    assert!(out.contains("1 message(s)"), "{out}");
    assert!(!out.contains(&held), "{out}");

    // The held one (its home is down): held, then deleted by an administrator.
    track_until(
        &r,
        &["--to", "v@c.test"],
        "held v@c.test: hold and retry home m2",
    );
    r.scratch.ok(&["queue", "delete", &held]);
    let out = track_until(
        &r,
        &["--to", "v@c.test", "--since", "1h"],
        "deleted by an administrator",
    );
    println!("$ clustermail track --to v@c.test --since 1h\n{out}");

    let out = r
        .scratch
        .ok(&["track", "--from", "sender@outside.test", "--since", "2d"]);
    println!("$ clustermail track --from sender@outside.test --since 2d\n{out}");
    assert!(
        out.contains("2 message(s)") && out.contains(&id) && out.contains(&held),
        "{out}"
    );
    let out = r.scratch.ok(&["track", "--from", "nobody@outside.test"]);
    assert!(out.contains("0 message(s)"), "{out}");
    let (code, _, err) = r.scratch.run(&["track"]);
    assert_eq!(code, 2, "{err}");
}
