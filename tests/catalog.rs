//! The catalog import tool end to end, through the real binary.

mod common;
use common::{repo, Scratch};

fn fixture(name: &str) -> String {
    repo(&format!("fixtures/catalog/{name}"))
        .display()
        .to_string()
}

fn example() -> String {
    repo("catalog/example.toml").display().to_string()
}

/// Every bad fixture is refused with exit 2, names file and line (or item) for each
/// problem, and leaves the catalog exactly as it was.
#[test]
fn every_kind_of_invalid_input_is_reported_and_changes_nothing() {
    let s = Scratch::new();
    s.ok(&["catalog", "import", &example()]);
    let before = s.ok(&["catalog", "export", "--format", "json"]);
    let servers = fixture("servers.toml");
    let cases: &[(&str, &[&str])] = &[
        ("unknown-home.csv", &["unknown-home.csv:3: home server \"nowhere\" does not exist"]),
        ("unknown-replica.csv", &["unknown-replica.csv:2: replica server \"ghost\" does not exist"]),
        ("replica-is-home.csv", &["replica-is-home.csv:2: replica \"M1\" is the home server"]),
        ("replica-twice.csv", &["replica-twice.csv:2: replica \"m2\" is listed twice"]),
        (
            "replica-other-cluster.csv",
            &["replica-other-cluster.csv:2: replica \"x1\" is in cluster \"c2\", the home \"m1\" is in cluster \"c1\""],
        ),
        ("duplicate-address.csv", &["duplicate-address.csv:3: address \"B@C.test\" already belongs to mailbox \"a@c.test\""]),
        ("duplicate-mailbox.csv", &["duplicate-mailbox.csv:3: mailbox \"A@c.test\" is defined twice"]),
        ("duplicate-alias-in-mailbox.csv", &["duplicate-alias-in-mailbox.csv:2: alias \"X@c.test\" repeats"]),
        (
            "bad-address.csv",
            &[
                "bad-address.csv:2: address \"no-at-sign\" has no @domain",
                "bad-address.csv:3: address \"a%b@c.test\": character '%'",
                "bad-address.csv:4: address \"c@[127.0.0.1]\": IP literals",
                "bad-address.csv:5: alias: address \"bad..alias@c.test\"",
            ],
        ),
        ("bad-columns.csv", &["bad-columns.csv:1: unknown column \"replica\""]),
        ("ragged-row.csv", &["ragged-row.csv:3: row has 2 fields, the header has 4"]),
        ("duplicate-server.toml", &["duplicate-server.toml: server[1]: server \"S1\" is defined twice"]),
        (
            "bad-server.toml",
            &[
                "bad-server.toml: server[0]: server name \"s 1\"",
                "bad-server.toml: server[0]: server address \"127.0.0.1\" is not host:port",
                "bad-server.toml: server[1]: unknown variant `maintenance`",
                "bad-server.toml: server[2]: server \"s3\": availability_threshold must be 0 to 100, not 120",
            ],
        ),
        ("unknown-field.toml", &["unknown-field.toml: mailbox[0]: unknown field `replica`"]),
        (
            "bad-cluster.toml",
            &[
                "bad-cluster.toml: cluster[0]: router: server address \"127.0.0.1\" is not host:port",
                "bad-cluster.toml: cluster[1]: cluster \"EAST\" is defined twice",
            ],
        ),
        ("missing-field.json", &["missing-field.json: mailbox[1]: missing field `home`"]),
        ("syntax-error.toml", &["syntax-error.toml:3: TOML syntax"]),
        ("syntax-error.json", &["syntax-error.json:3: JSON syntax"]),
        ("unknown-key.toml", &["unknown-key.toml: unknown key \"servers\""]),
        ("unknown-type.yaml", &["unknown-type.yaml: unknown file type"]),
    ];
    for (file, expected) in cases {
        for mode in ["--merge", "--replace"] {
            let (code, out, err) = s.run(&["catalog", "import", mode, &servers, &fixture(file)]);
            assert_eq!(code, 2, "{file} {mode}: exit code\n{out}\n{err}");
            for e in *expected {
                assert!(err.contains(e), "{file} {mode}: expected {e:?} in:\n{err}");
            }
            assert!(err.contains("the catalog is unchanged"), "{err}");
            // Exactly the problems expected, no more.
            let problems = err
                .lines()
                .filter(|l| l.contains("fixtures/catalog/"))
                .count();
            assert_eq!(problems, expected.len(), "{file}: {err}");
        }
        let (code, _, _) = s.run(&["catalog", "validate", &servers, &fixture(file)]);
        assert_eq!(code, 2, "validate {file}");
    }
    let after = s.ok(&["catalog", "export", "--format", "json"]);
    assert_eq!(before, after, "a refused import changed the catalog");
}

/// Problems in several files of one import are all reported, in file order.
#[test]
fn problems_across_files_are_all_reported() {
    let s = Scratch::new();
    let (code, _, err) = s.run(&[
        "catalog",
        "import",
        &fixture("servers.toml"),
        &fixture("unknown-home.csv"),
        &fixture("replica-is-home.csv"),
        &fixture("bad-server.toml"),
    ]);
    assert_eq!(code, 2);
    let a = err.find("unknown-home.csv:3").expect(&err);
    let b = err.find("replica-is-home.csv:2").expect(&err);
    let c = err.find("bad-server.toml: server[0]").expect(&err);
    assert!(a < b && b < c, "{err}");
    assert!(err.contains("6 problem(s)"), "{err}");
    assert_eq!(
        s.ok(&["catalog", "list", "servers"]).lines().count(),
        1,
        "only the header"
    );
}

#[test]
fn export_round_trips_in_every_format() {
    let s = Scratch::new();
    s.ok(&["catalog", "import", &example()]);
    let reference = s.ok(&["catalog", "export", "--format", "toml"]);
    assert!(reference.contains("mail-west-3") && reference.contains("Info@East.Example.com"));
    for format in ["toml", "json"] {
        let file = format!("export.{format}");
        s.ok(&["catalog", "export", "--format", format, "--output", &file]);
        let t = Scratch::new();
        t.ok(&[
            "catalog",
            "import",
            &s.path().join(&file).display().to_string(),
        ]);
        assert_eq!(
            t.ok(&["catalog", "export", "--format", "toml"]),
            reference,
            "{format}"
        );
    }
    // CSV holds mailboxes; the servers travel in a TOML beside it, one import unit.
    s.ok(&[
        "catalog",
        "export",
        "--format",
        "toml",
        "--only",
        "servers",
        "-o",
        "servers.toml",
    ]);
    s.ok(&[
        "catalog",
        "export",
        "--format",
        "csv",
        "-o",
        "mailboxes.csv",
    ]);
    let t = Scratch::new();
    let out = t.ok(&[
        "catalog",
        "import",
        &s.path().join("servers.toml").display().to_string(),
        &s.path().join("mailboxes.csv").display().to_string(),
    ]);
    assert!(out.contains("mailboxes: 25 added"), "{out}");
    assert_eq!(t.ok(&["catalog", "export"]), reference);
    // Importing the export over itself changes nothing.
    let out = t.ok(&[
        "catalog",
        "import",
        "--replace",
        &s.path().join("export.toml").display().to_string(),
    ]);
    assert!(
        out.contains("servers:   0 added, 0 updated, 0 removed, 6 unchanged"),
        "{out}"
    );
    assert!(
        out.contains("mailboxes: 0 added, 0 updated, 0 removed, 25 unchanged"),
        "{out}"
    );
}

#[test]
fn merge_upserts_replace_removes_and_dry_run_writes_nothing() {
    let s = Scratch::new();
    s.ok(&["catalog", "import", &example()]);
    let change = s.write(
        "change.csv",
        "address,home,replicas,aliases\n\
         alice@east.example.com,mail-east-2,mail-east-1,\n\
         new@east.example.com,mail-east-3,,\n\
         bob@east.example.com,mail-east-2,mail-east-1;mail-east-3,\n",
    );
    let change = change.display().to_string();
    let before = s.ok(&["catalog", "export"]);
    let out = s.ok(&["catalog", "import", "--dry-run", &change]);
    assert!(
        out.contains("mailboxes: 1 added, 1 updated, 0 removed, 1 unchanged"),
        "{out}"
    );
    assert!(out.contains("dry run"), "{out}");
    assert_eq!(s.ok(&["catalog", "export"]), before);

    let out = s.ok(&["catalog", "import", &change]);
    assert!(
        out.contains("mailboxes: 1 added, 1 updated, 0 removed, 1 unchanged"),
        "{out}"
    );
    let show = s.ok(&["catalog", "show", "alice@east.example.com"]);
    assert!(show.contains("home:     mail-east-2"), "{show}");
    // alice's aliases were replaced by the row's (none): the old alias is free now.
    let (code, _, err) = s.run(&["catalog", "show", "postmaster@east.example.com"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no mailbox or alias"), "{err}");
    assert_eq!(
        s.ok(&["catalog", "list", "mailboxes"]).lines().count(),
        26,
        "merge keeps the rest"
    );

    // Replace: servers from an export, mailboxes from the CSV only.
    s.ok(&[
        "catalog",
        "export",
        "--only",
        "servers",
        "-o",
        "servers.toml",
    ]);
    let servers = s.path().join("servers.toml").display().to_string();
    let out = s.ok(&["catalog", "import", "--replace", &servers, &change]);
    assert!(
        out.contains("mailboxes: 0 added, 0 updated, 23 removed, 3 unchanged"),
        "{out}"
    );
    let list = s.ok(&["catalog", "list", "mailboxes"]);
    assert_eq!(list.lines().count(), 3, "{list}");
    // The server index followed: mail-east-1 holds alice (replica) and bob (replica).
    let on = s.ok(&["catalog", "list", "mailboxes", "--server", "MAIL-EAST-1"]);
    assert!(
        on.contains("alice@") && on.contains("bob@") && !on.contains("new@"),
        "{on}"
    );
}

#[test]
fn merge_is_checked_against_the_catalog() {
    let s = Scratch::new();
    s.ok(&["catalog", "import", &example()]);
    // An alias that belongs to a mailbox this import leaves alone.
    let f = s.write(
        "steal.csv",
        "address,home,replicas,aliases\nthief@east.example.com,mail-east-1,,ORDERS@east.example.com\n",
    );
    let (code, _, err) = s.run(&["catalog", "import", &f.display().to_string()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("steal.csv:2: address \"orders@east.example.com\" already belongs to mailbox \"sales@east.example.com\" in the catalog"),
        "{err}"
    );
    // The same alias moves when its owner is rewritten in the same import.
    let f = s.write(
        "move.csv",
        "address,home,replicas,aliases\n\
         thief@east.example.com,mail-east-1,,orders@east.example.com\n\
         sales@east.example.com,mail-east-1,mail-east-2,\n",
    );
    s.ok(&["catalog", "import", &f.display().to_string()]);
    assert!(s
        .ok(&["catalog", "show", "orders@east.example.com"])
        .contains("address:  thief@"));
    // Moving a server to another cluster would break replicas left as they are.
    let f = s.write(
        "move.toml",
        "[[server]]\nname = \"mail-east-3\"\ncluster = \"west\"\naddress = \"127.0.0.1:2603\"\n",
    );
    let (code, _, err) = s.run(&["catalog", "import", &f.display().to_string()]);
    assert_eq!(code, 2);
    assert!(err.contains("move.toml: server[0]: moving server \"mail-east-3\" to cluster \"west\" breaks mailbox"), "{err}");
}

#[test]
fn lookups_fold_case_unless_configured_exact() {
    let s = Scratch::new();
    s.ok(&["catalog", "import", &example()]);
    for addr in [
        "alice@east.example.com",
        "ALICE@EAST.EXAMPLE.COM",
        "Alice.Smith@East.Example.Com",
        "info@east.example.com",
    ] {
        let (code, out, err) = s.run(&["catalog", "show", addr]);
        assert_eq!(code, 0, "{addr}: {err}");
        assert!(out.contains("home:"), "{out}");
    }
    // Exact local parts: the domain still folds, the local part does not.
    let t = Scratch::new();
    t.write("clustermail.toml", "local_part_match = \"exact\"\n");
    t.ok(&["catalog", "import", &example()]);
    assert_eq!(t.run(&["catalog", "show", "alice@EAST.example.com"]).0, 0);
    assert_eq!(t.run(&["catalog", "show", "Info@east.example.com"]).0, 0);
    assert_eq!(t.run(&["catalog", "show", "ALICE@east.example.com"]).0, 2);
    assert_eq!(t.run(&["catalog", "show", "info@east.example.com"]).0, 2);
    // A catalog built under one rule refuses to open under the other.
    t.write(
        "clustermail.toml",
        "local_part_match = \"case-insensitive\"\n",
    );
    let (code, _, err) = t.run(&["catalog", "show", "alice@east.example.com"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("local_part_match") && err.contains("--replace"),
        "{err}"
    );
}

#[test]
fn set_state_and_list_filters() {
    let s = Scratch::new();
    s.ok(&["catalog", "import", &example()]);
    assert_eq!(
        s.ok(&["catalog", "set-state", "Mail-East-2", "out-of-service"]),
        "mail-east-2: out-of-service\n"
    );
    assert!(s
        .ok(&["catalog", "show", "alice@east.example.com"])
        .contains("mail-east-2 (127.0.0.1:2602, out-of-service"));
    let (code, _, err) = s.run(&["catalog", "set-state", "nope", "restricted"]);
    assert_eq!(code, 1);
    assert!(err.contains("no server named \"nope\""), "{err}");
    let (code, _, err) = s.run(&["catalog", "set-state", "mail-east-2", "sleeping"]);
    assert_eq!(code, 2, "clap refuses the value");
    assert!(err.contains("unknown admin state"), "{err}");
    let west = s.ok(&["catalog", "list", "servers", "--cluster", "west"]);
    assert_eq!(west.lines().count(), 4, "{west}");
    let west_boxes = s.ok(&["catalog", "list", "mailboxes", "--cluster", "WEST"]);
    assert_eq!(west_boxes.lines().count(), 12, "{west_boxes}");
    assert!(west_boxes.lines().all(|l| l.contains("@west.example.org")));
}

#[test]
fn config_check_names_the_bad_key() {
    let s = Scratch::new();
    let out = s.ok(&["config", "check"]);
    assert!(
        out.contains("built-in defaults") && out.contains("127.0.0.1:2525"),
        "{out}"
    );
    let f = s.write(
        "bad.toml",
        "data_dir = \"x\"\n\n[smtp]\nlisten_on = [\"127.0.0.1:25\"]\n",
    );
    let (code, _, err) = s.run(&["config", "check", &f.display().to_string()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.toml:4:") && err.contains("listen_on"),
        "{err}"
    );
}

/// An import killed at any moment leaves either the old catalog or the new one,
/// never a mix: the export afterwards equals one of the two.
#[test]
fn import_killed_midway_is_all_or_nothing() {
    let s = Scratch::new();
    s.ok(&["catalog", "import", &example()]);
    let old = s.ok(&["catalog", "export", "--format", "json"]);
    // A replace large enough to take a while in a debug build.
    let mut csv = String::from("address,home,replicas,aliases\n");
    for i in 0..20_000 {
        csv.push_str(&format!(
            "u{i}@east.example.com,mail-east-{},mail-east-{},a{i}@east.example.com\n",
            i % 3 + 1,
            (i + 1) % 3 + 1
        ));
    }
    let big = s.write("big.csv", &csv).display().to_string();
    let ex = example();
    // Time one whole import, then kill others at fractions of that time.
    let started = std::time::Instant::now();
    s.ok(&["catalog", "import", "--replace", &ex, &big]);
    let full = started.elapsed();
    let new = s.ok(&["catalog", "export", "--format", "json"]);
    s.ok(&["catalog", "import", "--replace", &ex]);
    assert_eq!(s.ok(&["catalog", "export", "--format", "json"]), old);
    let mut outcomes = Vec::new();
    for fraction in [0.2, 0.5, 0.8, 0.95] {
        let mut child = s
            .cmd()
            .args(["catalog", "import", "--replace", &ex, &big])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(full.mul_f64(fraction));
        let _ = child.kill();
        let status = child.wait().expect("wait");
        let now = s.ok(&["catalog", "export", "--format", "json"]);
        if now == old {
            outcomes.push("old");
        } else {
            assert!(
                now == new,
                "a killed import ({status}) left a catalog that is neither the old nor the new one"
            );
            outcomes.push("new");
            s.ok(&["catalog", "import", "--replace", &ex]);
        }
    }
    eprintln!("import took {full:?}; outcomes after kill: {outcomes:?}");
}

#[test]
fn a_mailbox_failover_override_round_trips_through_csv_and_toml() {
    let s = Scratch::new();
    s.ok(&["catalog", "import", &example()]);
    let f = s.write(
        "override.csv",
        "address,home,replicas,aliases,failover\n\
         alice@east.example.com,mail-east-1,mail-east-2,,false\n\
         bob@east.example.com,mail-east-2,mail-east-1,,\n",
    );
    s.ok(&["catalog", "import", &f.display().to_string()]);
    let toml = s.ok(&["catalog", "export"]);
    assert!(toml.contains("address = \"alice@east.example.com\"\nhome = \"mail-east-1\"\nreplicas = [\"mail-east-2\"]\naliases = []\nfailover = false"), "{toml}");
    let csv = s.ok(&["catalog", "export", "--format", "csv"]);
    assert!(
        csv.starts_with("address,home,replicas,aliases,failover\n"),
        "{csv}"
    );
    assert!(
        csv.contains("alice@east.example.com,mail-east-1,mail-east-2,,false\n"),
        "{csv}"
    );
    let bad = s.write(
        "bad.csv",
        "address,home,failover\nx@east.example.com,mail-east-1,sometimes\n",
    );
    let (code, _, err) = s.run(&["catalog", "import", &bad.display().to_string()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.csv:2: failover must be true, false or empty"),
        "{err}"
    );
    // Without overrides the CSV keeps the four columns.
    let t = Scratch::new();
    t.ok(&["catalog", "import", &example()]);
    assert!(t
        .ok(&["catalog", "export", "--format", "csv"])
        .starts_with("address,home,replicas,aliases\n"));
}
