//! Day-two queue operations end to end on loopback: servers pause/resume (mail
//! waits, no failover, survives a restart), queue hold/unhold by an
//! administrator, and the queue views (summary, filtered and paged list).

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch};
use std::time::{Duration, Instant};

fn cluster(scratch: &Scratch, m1: u16, m2: u16) {
    let toml = format!(
        "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m1}\"\n\n\
         [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m2}\"\n\n\
         [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\nreplicas = [\"m2\"]\n\n\
         [[mailbox]]\naddress = \"v@c.test\"\nhome = \"m2\"\nreplicas = [\"m1\"]\n"
    );
    let f = scratch.write("cluster.toml", &toml);
    scratch.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
}

fn router(scratch: Scratch, retry_initial: &str) -> Router {
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\nprobe_interval = \"200ms\"\n\
         probe_timeout = \"500ms\"\nrise = 1\nretry_initial = \"{retry_initial}\"\nretry_max = \"1h\"\ndelivery_timeout = \"2s\"\n"
    );
    Router::start_config(scratch, &config, port)
}

fn send(r: &Router, from: &str, to: &str) -> String {
    let mut c = Client::hello(r.port);
    c.cmd(&format!("MAIL FROM:<{from}>"));
    expect(&c.cmd(&format!("RCPT TO:<{to}>")), 250, "2.1.5");
    c.cmd("DATA");
    c.send_raw(b"Subject: ops\r\n\r\n.\r\n");
    let reply = c.reply();
    expect(&reply, 250, "2.0.0");
    reply.text().rsplit(' ').next().unwrap_or("").to_string()
}

/// Runs `queue ARGS` until its output contains `needle` (up to 30 s); returns it.
fn wait_output(r: &Router, args: &[&str], needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = r.scratch.ok(args);
        if out.contains(needle) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{args:?} never showed {needle:?}:\n{out}\nlog:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_paused_server_gets_no_mail_and_none_fails_over_until_resumed_even_across_a_restart() {
    let m1 = RecordingSink::start("m1");
    let m2 = RecordingSink::start("m2");
    let s = Scratch::new();
    cluster(&s, m1.port, m2.port);
    let mut r = router(s, "1m");
    assert_eq!(r.scratch.ok(&["servers", "pause", "m1"]), "m1: paused\n");
    let (code, _, err) = r.scratch.run(&["servers", "pause", "nosuch"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nosuch: no such server"), "{err}");
    let id = send(&r, "a@x.test", "u@c.test");
    let list = wait_output(&r, &["queue", "list", "--state", "paused"], &id);
    assert!(list.contains("<u@c.test>: paused"), "{list}");
    let show = r.scratch.ok(&["queue", "show", &id]);
    assert!(
        show.contains("server m1 is paused by an administrator"),
        "{show}"
    );
    // Mail for the other server flows meanwhile.
    send(&r, "a@x.test", "v@c.test");
    assert_eq!(m2.wait_for(1, 30).len(), 1, "log:\n{}", r.log());
    let servers = r.scratch.ok(&["servers"]);
    assert!(
        servers
            .lines()
            .any(|l| l.starts_with("m1 ") && l.contains("paused")),
        "{servers}"
    );
    // The pause survives a restart; the mail still waits.
    r.stop();
    r.restart();
    let list = wait_output(&r, &["queue", "list", "--state", "paused"], &id);
    assert!(list.contains("1 message(s)"), "{list}");
    assert!(m1.messages().is_empty(), "paused: nothing to m1");
    assert_eq!(m2.messages().len(), 1, "paused: no failover to m2");
    assert_eq!(
        r.scratch.ok(&["servers", "resume", "m1"]),
        "m1: in service (resumed)\n"
    );
    assert_eq!(m1.wait_for(1, 30).len(), 1, "log:\n{}", r.log());
    assert_eq!(m2.messages().len(), 1);
}

#[test]
fn a_message_on_hold_is_never_attempted_until_released() {
    let mut m1 = RecordingSink::start("m1");
    let mut m2 = RecordingSink::start("m2");
    m1.down();
    m2.down();
    let s = Scratch::new();
    cluster(&s, m1.port, m2.port);
    let r = router(s, "1h");
    let id = send(&r, "a@x.test", "u@c.test");
    wait_output(&r, &["queue", "list", "--state", "held"], &id);
    assert_eq!(
        r.scratch.ok(&["queue", "hold", &id]),
        format!("{id}: on hold (held by an administrator)\n")
    );
    let (code, _, err) = r.scratch.run(&["queue", "hold", "0000000000000001"]);
    assert_eq!(code, 2, "{err}");
    m1.up();
    // A retry does not bring a message on hold out.
    r.scratch.ok(&["queue", "retry", &id]);
    let list = wait_output(&r, &["queue", "list", "--state", "on-hold"], &id);
    assert!(list.contains("<u@c.test>: on hold"), "{list}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(m1.messages().is_empty(), "log:\n{}", r.log());
    assert_eq!(
        r.scratch.ok(&["queue", "unhold", &id]),
        format!("{id}: released from hold, due now\n")
    );
    assert_eq!(m1.wait_for(1, 30).len(), 1, "log:\n{}", r.log());
}

#[test]
fn a_message_on_hold_still_expires() {
    let mut m1 = RecordingSink::start("m1");
    let mut m2 = RecordingSink::start("m2");
    m1.down();
    m2.down();
    let s = Scratch::new();
    cluster(&s, m1.port, m2.port);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\nprobe_interval = \"200ms\"\n\
         rise = 1\nretry_initial = \"1h\"\nmax_queue_lifetime = \"4s\"\ndelivery_timeout = \"2s\"\n"
    );
    let r = Router::start_config(s, &config, port);
    // The null sender: no bounce, the message leaves the queue when it expires.
    let id = send(&r, "", "u@c.test");
    r.scratch.ok(&["queue", "hold", &id]);
    wait_output(&r, &["queue", "list"], "0 message(s)");
    assert!(r.log().contains("expired"), "log:\n{}", r.log());
}

#[test]
fn queue_views_count_by_server_state_and_age_and_list_filters_page_by_page() {
    let m1 = RecordingSink::start("m1");
    let m2 = RecordingSink::start("m2");
    let s = Scratch::new();
    cluster(&s, m1.port, m2.port);
    let r = router(s, "1m");
    r.scratch.ok(&["servers", "pause", "m1"]);
    let ids: Vec<String> = ["a@x.test", "a@x.test", "a@x.test", "b@x.test"]
        .iter()
        .map(|from| send(&r, from, "u@c.test"))
        .collect();
    wait_output(&r, &["queue", "list", "--state", "paused"], "4 message(s)");
    r.scratch.ok(&["queue", "hold", &ids[1]]);
    let summary = r.scratch.ok(&["queue", "summary"]);
    let row = |server: &str, state: &str| {
        summary
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([server, state]))
            .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>())
    };
    // TOTAL, <5m, <1h, <4h, <1d, older
    assert_eq!(
        row("m1", "paused"),
        Some(vec!["3", "3", "0", "0", "0", "0"]),
        "{summary}"
    );
    assert_eq!(
        row("m1", "on-hold"),
        Some(vec!["1", "1", "0", "0", "0", "0"]),
        "{summary}"
    );
    assert!(summary.contains("4 message(s)"), "{summary}");
    let list = |args: &[&str]| {
        let mut all = vec!["queue", "list"];
        all.extend_from_slice(args);
        r.scratch.ok(&all)
    };
    let held = list(&["--state", "on-hold"]);
    assert!(
        held.contains(&ids[1]) && held.contains("1 message(s)"),
        "{held}"
    );
    let from_b = list(&["--from", "B@x.test"]);
    assert!(
        from_b.contains(&ids[3]) && from_b.contains("1 message(s)"),
        "{from_b}"
    );
    assert!(list(&["--server", "m2"]).contains("0 message(s)"));
    assert!(list(&["--server", "M1", "--to", "u@c.test"]).contains("4 message(s)"));
    assert!(list(&["--older-than", "1h"]).contains("0 message(s)"));
    let first = list(&["--limit", "2"]);
    assert!(
        first.contains(&ids[0]) && first.contains(&ids[1]),
        "{first}"
    );
    assert!(
        first.contains(&format!("2 message(s)\nmore: --after {}\n", ids[1])),
        "{first}"
    );
    let second = list(&["--limit", "2", "--after", &ids[1]]);
    assert!(
        second.contains(&ids[2]) && second.contains(&ids[3]),
        "{second}"
    );
    assert!(
        !second.contains(&ids[0]) && !second.contains("more:"),
        "{second}"
    );
    let (code, _, err) = r.scratch.run(&["queue", "list", "--state", "held-by-me"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_recipient_still_not_delivered_after_delay_warning_gets_one_delay_report() {
    let mut m1 = RecordingSink::start("m1");
    let m3 = RecordingSink::start("m3");
    m1.down();
    let s = Scratch::new();
    let toml = format!(
        "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
         [[server]]\nname = \"m3\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
         [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n\n\
         [[mailbox]]\naddress = \"s@c.test\"\nhome = \"m3\"\n",
        m1.port, m3.port
    );
    let f = s.write("cluster.toml", &toml);
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\nprobe_interval = \"200ms\"\n\
         rise = 1\nretry_initial = \"1h\"\ndelivery_timeout = \"2s\"\ndelay_warning = \"2s\"\n"
    );
    let r = Router::start_config(s, &config, port);
    let id = send(&r, "s@c.test", "u@c.test");
    send(&r, "", "u@c.test"); // never a report to <>
    let got = m3.wait_for(1, 30);
    assert_eq!(got.len(), 1, "log:\n{}", r.log());
    assert_eq!(got[0].from, "");
    assert_eq!(got[0].rcpts, vec!["s@c.test".to_string()]);
    let text = String::from_utf8_lossy(&got[0].data).into_owned();
    assert!(
        text.contains("Subject: Delayed Mail (still being retried)"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; u@c.test\r\nAction: delayed\r\nStatus: 4."),
        "{text}"
    );
    assert!(
        text.contains(&format!("X-Clustermail-Queue-ID: {id}")),
        "{text}"
    );
    // Once per recipient: later passes (a retry now) send no second report.
    r.scratch.ok(&["queue", "retry", "--all"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(m3.messages().len(), 1, "log:\n{}", r.log());
    let list = r.scratch.ok(&["queue", "list", "--state", "held"]);
    assert!(
        list.contains(&id) && list.contains("2 message(s)"),
        "{list}"
    );
}

#[test]
fn held_mail_older_than_fallback_after_goes_to_the_fallback_relay() {
    let mut m1 = RecordingSink::start("m1");
    let mut m2 = RecordingSink::start("m2");
    let fb = RecordingSink::start("fb");
    m1.down();
    m2.down();
    let s = Scratch::new();
    cluster(&s, m1.port, m2.port);
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\nprobe_interval = \"200ms\"\n\
         rise = 1\nretry_initial = \"1s\"\nretry_max = \"2s\"\ndelivery_timeout = \"2s\"\n\
         fallback_relay = \"127.0.0.1:{}\"\nfallback_after = \"3s\"\n",
        fb.port
    );
    let r = Router::start_config(s, &config, port);
    let explain = r.scratch.ok(&["route", "explain", "u@c.test"]);
    assert!(
        explain.contains(&format!(
            "fallback: mail held longer than 3s goes to fallback relay 127.0.0.1:{}",
            fb.port
        )),
        "{explain}"
    );
    let id = send(&r, "a@x.test", "u@c.test");
    // Held first (younger than fallback_after), then to the fallback relay.
    let got = fb.wait_for(1, 30);
    assert_eq!(got.len(), 1, "log:\n{}", r.log());
    assert_eq!(got[0].rcpts, vec!["u@c.test".to_string()]);
    r.wait_log("decision=fallback");
    let log = r.log();
    let held = log.find("decision=hold").expect("held first");
    assert!(held < log.find("decision=fallback").unwrap_or(0), "{log}");
    assert!(log.contains(&format!("id={id}")), "{log}");
    assert!(r.log().contains("fallback relay 127.0.0.1:"), "{}", r.log());
    wait_output(&r, &["queue", "list"], "0 message(s)");
    assert!(m1.messages().is_empty() && m2.messages().is_empty());
}
