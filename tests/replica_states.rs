//! Per-mailbox replica states end to end: in the catalog files (TOML, JSON, CSV,
//! round trip through export), `catalog set-state --mailbox`, `catalog show`,
//! `route explain`, and routing on loopback (only that mailbox fails over).

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch};

fn servers(m1: u16, m2: u16, m3: u16) -> String {
    format!(
        "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m1}\"\n\n\
         [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m2}\"\n\n\
         [[server]]\nname = \"m3\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m3}\"\n\n"
    )
}

const MAILBOXES: &str =
    "[[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\nhome_state = \"out-of-service\"\n\
     replicas = [\"m2\", { server = \"m3\", state = \"pending-delete\" }]\n\n\
     [[mailbox]]\naddress = \"v@c.test\"\nhome = \"m1\"\nreplicas = [\"m2\"]\n";

fn send(r: &Router, to: &str) {
    let mut c = Client::hello(r.port);
    c.cmd("MAIL FROM:<a@x.test>");
    expect(&c.cmd(&format!("RCPT TO:<{to}>")), 250, "2.1.5");
    c.cmd("DATA");
    c.send_raw(b"Subject: states\r\n\r\n.\r\n");
    expect(&c.reply(), 250, "2.0.0");
}

#[test]
fn replica_states_round_trip_through_every_file_format() {
    let s = Scratch::new();
    let f = s.write("c.toml", &(servers(1025, 1026, 1027) + MAILBOXES));
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let toml = s.ok(&["catalog", "export", "--only", "mailboxes"]);
    assert!(toml.contains("home_state = \"out-of-service\""), "{toml}");
    assert!(
        toml.contains("replicas = [\"m2\", { server = \"m3\", state = \"pending-delete\" }]"),
        "{toml}"
    );
    let csv = s.ok(&["catalog", "export", "--format", "csv"]);
    assert!(
        csv.contains("u@c.test,m1=out-of-service,m2;m3=pending-delete,"),
        "{csv}"
    );
    assert!(csv.contains("v@c.test,m1,m2,"), "{csv}");
    let json = s.ok(&["catalog", "export", "--format", "json"]);
    // Each format read back gives the same catalog.
    for (name, text) in [("again.csv", &csv), ("again.json", &json)] {
        let f = s.write(name, text);
        if name.ends_with(".json") {
            s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
        } else {
            s.ok(&["catalog", "import", "--merge", &f.display().to_string()]);
        }
        assert_eq!(
            s.ok(&["catalog", "export", "--only", "mailboxes"]),
            toml,
            "{name}"
        );
    }
    let show = s.ok(&["catalog", "show", "u@c.test"]);
    assert!(
        show.contains("m1 (") && show.contains("this mailbox's copy: out-of-service"),
        "{show}"
    );
    assert!(
        show.contains("this mailbox's copy: pending-delete"),
        "{show}"
    );
    // Mistakes name the file and line, and what to write instead.
    let bad = s.write("bad.csv", "address,home,replicas\nu@c.test,m1,m2=retired\n");
    let (code, _, err) = s.run(&["catalog", "import", &bad.display().to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad.csv:2:") && err.contains("unknown replica state \"retired\""),
        "{err}"
    );
    let bad = s.write(
        "bad.toml",
        "[[mailbox]]\naddress = \"w@c.test\"\nhome = \"m1\"\nhome_state = \"pending-delete\"\n",
    );
    let (code, _, err) = s.run(&["catalog", "import", &bad.display().to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("only a replica may be pending delete"),
        "{err}"
    );
    let (code, _, err) = s.run(&[
        "catalog",
        "set-state",
        "--mailbox",
        "u@c.test",
        "m1",
        "pending-delete",
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = s.run(&[
        "catalog",
        "set-state",
        "--mailbox",
        "u@c.test",
        "m9",
        "out-of-service",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no copy on server \"m9\""), "{err}");
}

#[test]
fn only_the_mailbox_whose_copy_is_out_of_service_fails_over() {
    let m1 = RecordingSink::start("m1");
    let m2 = RecordingSink::start("m2");
    let m3 = RecordingSink::start("m3");
    let s = Scratch::new();
    let f = s.write("c.toml", &(servers(m1.port, m2.port, m3.port) + MAILBOXES));
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    // m2 is the only replica that takes u's mail (m3's copy is pending delete).
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\nprobe_interval = \"200ms\"\n\
         probe_timeout = \"500ms\"\nrise = 1\nretry_initial = \"1h\"\ndelivery_timeout = \"2s\"\n"
    );
    let r = Router::start_config(s, &config, port);
    let explain = r.scratch.ok(&["route", "explain", "u@c.test"]);
    assert!(
        explain
            .contains("new mail: fail over to replica m2: the home copy on m1 is out of service"),
        "{explain}"
    );
    assert!(
        explain.contains("this mailbox's copy is out of service"),
        "{explain}"
    );
    send(&r, "u@c.test");
    send(&r, "v@c.test");
    assert_eq!(m2.wait_for(1, 30).len(), 1, "u fails over:\n{}", r.log());
    assert_eq!(m1.wait_for(1, 30).len(), 1, "v still goes home");
    assert_eq!(m1.messages()[0].rcpts, vec!["v@c.test".to_string()]);
    // m2 taken out for u too: m3 is pending delete, so u's mail is held.
    assert_eq!(
        r.scratch.ok(&[
            "catalog",
            "set-state",
            "--mailbox",
            "u@c.test",
            "M2",
            "out-of-service"
        ]),
        "u@c.test on m2: out-of-service\n"
    );
    let explain = r.scratch.ok(&["route", "explain", "u@c.test"]);
    assert!(
        explain.contains("new mail: hold and retry home m1"),
        "{explain}"
    );
    assert!(
        explain.contains("this mailbox's copy is pending delete"),
        "{explain}"
    );
    // The home copy back in service: home again.
    r.scratch.ok(&[
        "catalog",
        "set-state",
        "--mailbox",
        "u@c.test",
        "m1",
        "in-service",
    ]);
    send(&r, "u@c.test");
    assert_eq!(m1.wait_for(2, 30).len(), 2, "log:\n{}", r.log());
    assert_eq!(m2.messages().len(), 1);
    assert!(m3.messages().is_empty());
}
