//! Many routers, one catalog: two routers sync their catalogs from a real
//! OpenLDAP slapd (syncprov) started by the test on loopback, seeded with
//! `catalog export --format ldif`. Needs `slapd` and `ldap-utils` (test.sh
//! installs them).

mod common;
use common::{expect, Client, RecordingSink, Router, Scratch};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BASE: &str = "dc=example,dc=test";
const ROOT_DN: &str = "cn=admin,dc=example,dc=test";
const ROOT_PW: &str = "secret-root-pw";

/// slapd on a loopback port, its database in a temp dir (kept across restarts).
struct Slapd {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Slapd {
    fn start() -> Slapd {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("db")).expect("db dir");
        let schema = common::repo("catalog/ldap/clustermail.schema");
        let conf = format!(
            "include /etc/ldap/schema/core.schema\n\
             include /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\n\
             include {schema}\n\
             modulepath /usr/lib/ldap\nmoduleload back_mdb\nmoduleload syncprov\n\
             pidfile {d}/slapd.pid\n\
             database mdb\nmaxsize 104857600\nsuffix \"{BASE}\"\nrootdn \"{ROOT_DN}\"\nrootpw {ROOT_PW}\n\
             directory {d}/db\nindex entryUUID,entryCSN,objectClass eq\n\
             overlay syncprov\nsyncprov-checkpoint 100 1\n",
            schema = schema.display(),
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("slapd.conf"), conf).expect("slapd.conf");
        let mut s = Slapd {
            dir,
            port: common::free_port(),
            child: None,
        };
        s.up();
        s.ldif(
            "ldapadd",
            &format!("dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n"),
        );
        s
    }

    fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// Starts slapd (again) in the foreground; waits until it answers.
    fn up(&mut self) {
        let child = Command::new("/usr/sbin/slapd")
            .arg("-f")
            .arg(self.dir.path().join("slapd.conf"))
            .args(["-h", &format!("{}/", self.url()), "-d", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("slapd is installed (apt-get install slapd ldap-utils)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = Command::new("ldapsearch")
                .args([
                    "-x",
                    "-H",
                    &self.url(),
                    "-b",
                    "",
                    "-s",
                    "base",
                    "(objectClass=*)",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "slapd did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Runs `tool` (ldapadd, ldapmodify, ldapdelete) as the root DN with `input`.
    fn ldif(&self, tool: &str, input: &str) {
        let f = self.dir.path().join("input.ldif");
        std::fs::write(&f, input).expect("ldif");
        let out = Command::new(tool)
            .args(["-x", "-H", &self.url(), "-D", ROOT_DN, "-w", ROOT_PW, "-f"])
            .arg(&f)
            .output()
            .expect("ldap-utils installed");
        assert!(
            out.status.success(),
            "{tool} failed: {}\n{input}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn count(&self, filter: &str) -> usize {
        let out = Command::new("ldapsearch")
            .args([
                "-x",
                "-LLL",
                "-H",
                &self.url(),
                "-D",
                ROOT_DN,
                "-w",
                ROOT_PW,
            ])
            .args(["-b", BASE, filter, "dn"])
            .output()
            .expect("ldapsearch");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("dn:"))
            .count()
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.down();
    }
}

/// The seed catalog (servers m1, m2 on the sinks' ports; mailbox a@) exported
/// as LDIF and added to the directory.
fn seed(slapd: &Slapd, m1: u16, m2: u16) {
    let s = Scratch::new();
    let toml = format!(
        "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m1}\"\n\n\
         [[server]]\nname = \"m2\"\ncluster = \"c\"\naddress = \"127.0.0.1:{m2}\"\n\n\
         [[mailbox]]\naddress = \"a@example.test\"\nhome = \"m1\"\nreplicas = [\"m2\"]\naliases = [\"alias-a@example.test\"]\n"
    );
    let f = s.write("seed.toml", &toml);
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
    let ldif = s.ok(&["catalog", "export", "--format", "ldif", "--base-dn", BASE]);
    assert!(
        ldif.contains("dn: mail=a@example.test,ou=mailboxes,dc=example,dc=test"),
        "{ldif}"
    );
    slapd.ldif("ldapadd", &ldif);
}

fn router(slapd: &Slapd) -> Router {
    router_metrics(slapd).0
}

/// A router syncing from `slapd`, and the port of its metrics endpoint.
fn router_metrics(slapd: &Slapd) -> (Router, u16) {
    router_via(&slapd.url(), "")
}

/// A router syncing from the directory at `url`, with `extra` lines in its
/// `[directory]`, and the port of its metrics endpoint.
fn router_via(url: &str, extra: &str) -> (Router, u16) {
    let s = Scratch::new();
    let pw = s.write("ldap.pw", &format!("{ROOT_PW}\n"));
    let port = common::free_port();
    let metrics = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
         [smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [routing]\nprobe_interval = \"200ms\"\nprobe_timeout = \"500ms\"\nrise = 1\n\
         retry_initial = \"300ms\"\nretry_max = \"600ms\"\n\
         [directory]\nurl = \"{url}\"\nbase_dn = \"{BASE}\"\nbind_dn = \"{ROOT_DN}\"\npassword_file = \"{}\"\n{extra}",
        pw.display()
    );
    (Router::start_config(s, &config, port), metrics)
}

/// The value of the metric `name` (no labels) on the endpoint at `port`.
fn metric(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {body}"))
}

/// The RCPT reply code for `addr` (a fresh session each time).
fn rcpt(r: &Router, addr: &str) -> u16 {
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<s@x.test>"), 250, "2.1.0");
    let code = c.cmd(&format!("RCPT TO:<{addr}>")).code;
    c.cmd("QUIT");
    code
}

/// Polls until RCPT for `addr` gets `code` on `r`; the time it took.
fn wait_rcpt(r: &Router, addr: &str, code: u16, secs: u64) -> Duration {
    let t0 = Instant::now();
    loop {
        if rcpt(r, addr) == code {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "RCPT {addr} never got {code}:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn send(r: &Router, to: &str, subject: &str) {
    let mut c = Client::hello(r.port);
    expect(&c.cmd("MAIL FROM:<s@x.test>"), 250, "2.1.0");
    expect(&c.cmd(&format!("RCPT TO:<{to}>")), 250, "2.1.5");
    assert_eq!(c.cmd("DATA").code, 354);
    c.send_raw(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes());
    expect(&c.reply(), 250, "2.0.0");
    c.cmd("QUIT");
}

fn mailbox_ldif(addr: &str, home: &str) -> String {
    format!(
        "dn: mail={addr},ou=mailboxes,{BASE}\nobjectClass: clustermailMailboxEntry\n\
         objectClass: clustermailMailbox\nmail: {addr}\nclustermailHome: {home}\n"
    )
}

fn sync_status(r: &Router) -> String {
    r.scratch.ok(&["catalog", "sync-status"])
}

/// Polls `catalog sync-status` until it shows `needle`; returns it.
fn wait_status(r: &Router, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = sync_status(r);
        if status.contains(needle) {
            return status;
        }
        assert!(Instant::now() < deadline, "never {needle:?}:\n{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_shipped_schema_loads_and_the_export_seeds_the_directory() {
    let slapd = Slapd::start();
    seed(&slapd, 2601, 2602);
    assert_eq!(slapd.count("(objectClass=clustermailServer)"), 2);
    assert_eq!(slapd.count("(clustermailAlias=alias-a@example.test)"), 1);
    assert_eq!(slapd.count("(objectClass=organizationalUnit)"), 3);
    // The cn=config form loads into a cn=config database as well.
    let cfg = tempfile::tempdir().unwrap();
    let mut ldif = String::from(
        "dn: cn=config\nobjectClass: olcGlobal\ncn: config\n\n\
         dn: cn=schema,cn=config\nobjectClass: olcSchemaConfig\ncn: schema\n\n",
    );
    for f in ["/etc/ldap/schema/core.ldif", "/etc/ldap/schema/cosine.ldif"] {
        ldif.push_str(&std::fs::read_to_string(f).unwrap());
        ldif.push('\n');
    }
    ldif.push_str(&std::fs::read_to_string(common::repo("catalog/ldap/clustermail.ldif")).unwrap());
    let input = cfg.path().join("config.ldif");
    std::fs::write(&input, ldif).unwrap();
    std::fs::create_dir(cfg.path().join("d")).unwrap();
    let out = Command::new("/usr/sbin/slapadd")
        .args(["-n0", "-F"])
        .arg(cfg.path().join("d"))
        .arg("-l")
        .arg(&input)
        .output()
        .expect("slapadd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loaded = cfg
        .path()
        .join("d/cn=config/cn=schema/cn={2}clustermail.ldif");
    let text = std::fs::read_to_string(&loaded).expect("the schema entry");
    for name in [
        "clustermailServer",
        "clustermailMailbox",
        "clustermailClusterEntry",
    ] {
        assert!(text.contains(name), "{name} in {text}");
    }
}

#[test]
fn two_routers_follow_adds_home_changes_and_deletes() {
    let m1 = RecordingSink::start("m1");
    let m2 = RecordingSink::start("m2");
    let slapd = Slapd::start();
    seed(&slapd, m1.port, m2.port);
    let routers = [router(&slapd), router(&slapd)];
    for r in &routers {
        wait_rcpt(r, "a@example.test", 250, 30);
        wait_rcpt(r, "alias-a@example.test", 250, 5);
        assert_eq!(rcpt(r, "b@example.test"), 550);
    }
    // Added in the directory: both routers take it within 1 s.
    slapd.ldif("ldapadd", &mailbox_ldif("b@example.test", "m1"));
    for r in &routers {
        let took = wait_rcpt(r, "b@example.test", 250, 10);
        eprintln!("add seen after {took:?}");
        assert!(took < Duration::from_secs(1), "add took {took:?}");
    }
    send(&routers[0], "b@example.test", "before-move");
    assert_eq!(m1.wait_for(1, 20).len(), 1);
    // Its home changes: the next message goes to the new home.
    slapd.ldif(
        "ldapmodify",
        &format!("dn: mail=b@example.test,ou=mailboxes,{BASE}\nchangetype: modify\nreplace: clustermailHome\nclustermailHome: m2\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !routers[1]
        .scratch
        .ok(&["catalog", "show", "b@example.test"])
        .contains("m2")
    {
        assert!(Instant::now() < deadline, "home change never seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    send(&routers[1], "b@example.test", "after-move");
    assert_eq!(
        m2.wait_for(1, 20).len(),
        1,
        "the new home gets the next message"
    );
    assert_eq!(m1.messages().len(), 1);
    // Deleted: 550 5.1.1 on both.
    let out = Command::new("ldapdelete")
        .args(["-x", "-H", &slapd.url(), "-D", ROOT_DN, "-w", ROOT_PW])
        .arg(format!("mail=b@example.test,ou=mailboxes,{BASE}"))
        .status()
        .expect("ldapdelete");
    assert!(out.success());
    for r in &routers {
        wait_rcpt(r, "b@example.test", 550, 10);
        let mut c = Client::hello(r.port);
        c.cmd("MAIL FROM:<s@x.test>");
        expect(&c.cmd("RCPT TO:<b@example.test>"), 550, "5.1.1");
    }
}

#[test]
fn an_invalid_entry_is_reported_the_others_applied_and_it_waits_to_become_valid() {
    let m1 = RecordingSink::start("m1");
    let m2 = RecordingSink::start("m2");
    let slapd = Slapd::start();
    seed(&slapd, m1.port, m2.port);
    let (r, metrics) = router_metrics(&slapd);
    wait_rcpt(&r, "a@example.test", 250, 30);
    assert_eq!(metric(metrics, "clustermail_directory_connected"), 1.0);
    assert_eq!(
        metric(metrics, "clustermail_directory_rejected_entries"),
        0.0
    );
    // One batch: a mailbox homed on an unknown server, and a good one.
    slapd.ldif(
        "ldapadd",
        &format!(
            "{}\n{}",
            mailbox_ldif("bad@example.test", "m9"),
            mailbox_ldif("good@example.test", "m2")
        ),
    );
    wait_rcpt(&r, "good@example.test", 250, 10);
    assert_eq!(rcpt(&r, "bad@example.test"), 550);
    // (The report follows the catalog write by a moment.)
    let status = wait_status(&r, "rejected:     1");
    assert_eq!(
        metric(metrics, "clustermail_directory_rejected_entries"),
        1.0
    );
    let age = metric(metrics, "clustermail_directory_last_change_age_seconds");
    assert!((0.0..60.0).contains(&age), "{age}");
    assert!(
        status.contains("mail=bad@example.test,ou=mailboxes"),
        "{status}"
    );
    // Writes to the catalog are refused: the directory is the source of truth.
    let f = r.scratch.write(
        "x.toml",
        "[[server]]\nname = \"x\"\ncluster = \"c\"\naddress = \"127.0.0.1:25\"\n",
    );
    let (code, _, err) = r
        .scratch
        .run(&["catalog", "import", &f.display().to_string()]);
    assert_ne!(code, 0);
    assert!(err.contains("source of truth"), "{err}");
    let (code, _, err) = r
        .scratch
        .run(&["catalog", "set-state", "m1", "out-of-service"]);
    assert_ne!(code, 0);
    assert!(err.contains("source of truth"), "{err}");
    // The server it names appears: the waiting mailbox is applied.
    slapd.ldif(
        "ldapadd",
        &format!("dn: cn=m9,ou=servers,{BASE}\nobjectClass: clustermailServer\ncn: m9\nclustermailCluster: c\nclustermailAddress: 127.0.0.1:{}\n", m2.port),
    );
    wait_rcpt(&r, "bad@example.test", 250, 10);
    wait_status(&r, "rejected:     0");
}

#[test]
fn routers_keep_routing_without_the_directory_and_resume_from_their_cookie() {
    let m1 = RecordingSink::start("m1");
    let m2 = RecordingSink::start("m2");
    let mut slapd = Slapd::start();
    seed(&slapd, m1.port, m2.port);
    slapd.ldif("ldapadd", &mailbox_ldif("doomed@example.test", "m1"));
    let (first, metrics) = router_metrics(&slapd);
    let mut routers = [first, router(&slapd)];
    for r in &routers {
        wait_rcpt(r, "a@example.test", 250, 30);
        wait_rcpt(r, "doomed@example.test", 250, 30);
    }
    // The directory goes away: both keep routing on their last synced catalog.
    slapd.down();
    for r in &routers {
        wait_status(r, "NOT CONNECTED");
        assert_eq!(rcpt(r, "a@example.test"), 250);
        send(r, "a@example.test", "no-directory");
        assert!(r.scratch.ok(&["servers"]).contains("NOT CONNECTED"));
    }
    assert_eq!(m1.wait_for(2, 20).len(), 2);
    assert_eq!(metric(metrics, "clustermail_directory_connected"), 0.0);
    // Back; router 2 is down while an entry is added; it sees it after its
    // restart (resuming from its cookie), as router 1 does at once.
    slapd.up();
    routers[1].stop();
    slapd.ldif("ldapadd", &mailbox_ldif("late@example.test", "m2"));
    let deleted = Command::new("ldapdelete")
        .args(["-x", "-H", &slapd.url(), "-D", ROOT_DN, "-w", ROOT_PW])
        .arg(format!("mail=doomed@example.test,ou=mailboxes,{BASE}"))
        .status()
        .expect("ldapdelete");
    assert!(deleted.success());
    wait_rcpt(&routers[0], "late@example.test", 250, 30);
    wait_rcpt(&routers[0], "doomed@example.test", 550, 30);
    routers[1].restart();
    wait_rcpt(&routers[1], "late@example.test", 250, 30);
    // The delete it missed: the refresh names every entry still present.
    wait_rcpt(&routers[1], "doomed@example.test", 550, 30);
    assert!(
        routers[1].log().contains("full=false"),
        "resumed from its cookie:\n{}",
        routers[1].log()
    );
    assert_eq!(rcpt(&routers[1], "a@example.test"), 250);
}

/// A TCP proxy to `target` that can fall silent as a network partition does:
/// frozen, it passes nothing either way and closes its side towards the target
/// (the server gives up on the connection); the client is told nothing. Thawed,
/// new connections pass again, and a connection from before answers whatever
/// the client sends next with a reset, as a server that forgot it would.
struct Partition {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Partition {
    fn start(target: u16) -> Partition {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let frozen = std::sync::Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().take(200) {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                // Each connection lives while the partition has not cut it.
                let cut = std::sync::Arc::new(AtomicBool::new(false));
                let pumps = [(true, &client, &server), (false, &server, &client)];
                for (upstream, from, to) in pumps {
                    let (mut from, mut to) = (
                        from.try_clone().expect("clone"),
                        to.try_clone().expect("clone"),
                    );
                    let (f, cut) = (f.clone(), cut.clone());
                    let server = server.try_clone().expect("clone");
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            if f.load(SeqCst) || cut.load(SeqCst) {
                                // Partitioned: the octets are lost; the server's
                                // side of the connection is gone for good.
                                if !cut.swap(true, SeqCst) {
                                    let _ = server.shutdown(Shutdown::Both);
                                }
                                if upstream && !f.load(SeqCst) {
                                    // Healed: the client hears a reset at last.
                                    let _ = from.shutdown(Shutdown::Both);
                                    break;
                                }
                                continue;
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        if !cut.load(SeqCst) {
                            let _ = to.shutdown(Shutdown::Both);
                        }
                    });
                }
                // A connection made while frozen: the server never answers it.
                if f.load(SeqCst) {
                    cut.store(true, SeqCst);
                    let _ = server.shutdown(Shutdown::Both);
                }
            }
        });
        Partition { port, frozen }
    }

    fn set_frozen(&self, frozen: bool) {
        self.frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_silent_partition_is_noticed_and_the_sync_resumes_when_it_heals() {
    let m1 = RecordingSink::start("m1");
    let m2 = RecordingSink::start("m2");
    let slapd = Slapd::start();
    seed(&slapd, m1.port, m2.port);
    let path = Partition::start(slapd.port);
    let (r, _) = router_via(
        &format!("ldap://127.0.0.1:{}", path.port),
        "idle_probe = \"1s\"\n",
    );
    wait_rcpt(&r, "a@example.test", 250, 30);
    // The path falls silent (no reset, no close seen by the router); the server
    // drops its end; an entry is added meanwhile.
    path.set_frozen(true);
    slapd.ldif("ldapadd", &mailbox_ldif("during@example.test", "m1"));
    let status = wait_status(&r, "NOT CONNECTED");
    assert!(status.contains("probe"), "{status}");
    assert_eq!(rcpt(&r, "a@example.test"), 250, "routing goes on");
    // Healed: the router reconnects, resumes from its cookie, sees the entry.
    path.set_frozen(false);
    wait_rcpt(&r, "during@example.test", 250, 30);
}
