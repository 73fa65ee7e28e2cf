//! The admin CLI against a running router (through the admin socket) and against a
//! stopped one (the store directly): catalog changes take effect for routing at
//! once; queue list/show/retry/delete; servers; route explain.

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch};
use std::time::Duration;

fn cluster(scratch: &Scratch, m1: u16, m2: u16) {
    let toml = format!(
        "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m1}\"\n\n\
         [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m2}\"\n\n\
         [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\nreplicas = [\"m2\"]\n"
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

fn send(r: &Router, subject: &str) -> String {
    let mut c = Client::hello(r.port);
    c.cmd("MAIL FROM:<sender@x.test>");
    expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
    c.cmd("DATA");
    c.send_raw(format!("Subject: {subject}\r\n\r\n.\r\n").as_bytes());
    let reply = c.reply();
    expect(&reply, 250, "2.0.0");
    reply.text().rsplit(' ').next().unwrap_or("").to_string()
}

#[test]
fn a_catalog_change_through_the_socket_reroutes_the_next_message() {
    let m1 = RecordingSink::start("m1");
    let m2 = RecordingSink::start("m2");
    let s = Scratch::new();
    cluster(&s, m1.port, m2.port);
    let r = router(s, "1m");
    // The socket is private to the router's user.
    let mode = std::fs::metadata(r.scratch.path().join("data/admin.sock")).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.ok(), Some(0o600));
    send(&r, "first");
    assert_eq!(m1.wait_for(1, 10).len(), 1);
    // One log line per delivery attempt, with its decision and the server reply.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let attempt = loop {
        let log = r.log();
        if let Some(l) = log.lines().find(|l| l.contains("delivery attempt")) {
            break l.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for field in [
        "id=",
        "rcpt=u@c.test",
        "server=m1",
        "decision=home",
        "why=deliver home to m1",
        "outcome=delivered",
        "reply=250",
    ] {
        assert!(attempt.contains(field), "{field} in {attempt}");
    }
    // set-state goes through the admin socket: the store is locked by the router.
    assert_eq!(
        r.scratch
            .ok(&["catalog", "set-state", "m1", "out-of-service"]),
        "m1: out-of-service\n"
    );
    send(&r, "second");
    assert_eq!(m2.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    assert_eq!(m1.messages().len(), 1);
    let explain = r.scratch.ok(&["route", "explain", "U@C.test"]);
    assert!(
        explain.contains("new mail: fail over to replica m2: home m1 is out of service"),
        "{explain}"
    );
    assert!(explain.contains("passed over: out of service"), "{explain}");
    // An import with a relative path is read from the client's directory.
    r.scratch.write(
        "back.csv",
        "address,home,replicas,aliases\nu@c.test,m2,m1,alias@c.test\n",
    );
    let out = r.scratch.ok(&["catalog", "import", "back.csv"]);
    assert!(out.contains("mailboxes: 0 added, 1 updated"), "{out}");
    r.scratch.ok(&["catalog", "set-state", "m1", "in-service"]);
    send(&r, "third");
    assert_eq!(m2.wait_for(2, 10).len(), 2, "u@c.test is now homed on m2");
    let servers = r.scratch.ok(&["servers"]);
    assert!(
        servers
            .lines()
            .any(|l| l.starts_with("m1 ") && l.contains(" up ")),
        "{servers}"
    );
    assert!(!servers.contains("router not running"), "{servers}");
}

#[test]
fn queue_commands_on_a_running_router_then_a_stopped_one() {
    let mut m1 = RecordingSink::start("m1");
    let mut m2 = RecordingSink::start("m2");
    m1.down();
    m2.down();
    let s = Scratch::new();
    cluster(&s, m1.port, m2.port);
    // A long first retry: only `queue retry` brings the held mail out early.
    let mut r = router(s, "1h");
    let id = send(&r, "held");
    let keep = send(&r, "deleted");
    std::thread::sleep(Duration::from_millis(700));
    let list = r.scratch.ok(&["queue", "list"]);
    assert!(
        list.contains(&id) && list.contains("2 message(s)"),
        "{list}"
    );
    assert!(
        list.contains("    <u@c.test>: held, next attempt in 1h")
            || list.contains("    <u@c.test>: held, next attempt in 59m"),
        "{list}"
    );
    let show = r.scratch.ok(&["queue", "show", &id]);
    assert!(
        show.contains("held (retrying the home server only)"),
        "{show}"
    );
    assert!(
        show.contains(
            "hold and retry home m1 without failover: home is down, no replica available"
        ),
        "{show}"
    );
    assert!(
        show.contains("next attempt: in 1h") || show.contains("next attempt: in 59m"),
        "{show}"
    );
    let raw = r
        .scratch
        .cmd()
        .args(["queue", "show", &id, "--raw"])
        .output()
        .unwrap();
    assert!(
        raw.stdout.starts_with(b"Received: from client.test"),
        "raw octets through the socket"
    );
    assert_eq!(
        r.scratch.ok(&["queue", "delete", &keep]),
        format!("{keep} deleted\n")
    );
    let (code, _, err) = r.scratch.run(&["queue", "delete", &keep]);
    assert_eq!(code, 2, "{err}");
    // The replica returns: held mail does not go there. The home returns: a retry
    // now delivers it without waiting an hour.
    m2.up();
    m1.up();
    std::thread::sleep(Duration::from_millis(600));
    assert!(m1.messages().is_empty() && m2.messages().is_empty());
    assert_eq!(
        r.scratch.ok(&["queue", "retry", "--all"]),
        "1 message(s) due for delivery now\n"
    );
    assert_eq!(m1.wait_for(1, 10).len(), 1, "log:\n{}", r.log());
    assert!(m2.messages().is_empty());
    // Stopped: the same commands read the store directly.
    r.stop();
    let list = r.scratch.ok(&["queue", "list"]);
    assert!(list.contains("0 message(s)"), "{list}");
    let servers = r.scratch.ok(&["servers"]);
    assert!(servers.contains("router not running"), "{servers}");
}
