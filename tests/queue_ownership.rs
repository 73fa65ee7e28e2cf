//! Administrator commands racing the queue manager: `queue delete` and `queue retry
//! --all` while a delivery is in progress. One owner per message: a command on a
//! message in delivery waits for it (or says so), and nothing re-creates a removed
//! message or writes back a stale copy.

mod common;
use common::{expect, Client, Router, Scratch};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A mailbox server whose answer to the end of DATA waits while `hold` is set (a
/// server slowly taking the data), then gives `reply`. Counts every message that
/// reached the end of DATA and records the recipients of those it accepted.
struct GatedServer {
    port: u16,
    hold: Arc<AtomicBool>,
    reply: Arc<Mutex<String>>,
    /// Messages whose data ended (answered or not yet).
    data_ended: Arc<AtomicUsize>,
    /// Recipients of each accepted message.
    accepted: Arc<Mutex<Vec<Vec<String>>>>,
}

impl GatedServer {
    fn start(reply: &str) -> GatedServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = GatedServer {
            port: listener.local_addr().expect("addr").port(),
            hold: Arc::new(AtomicBool::new(false)),
            reply: Arc::new(Mutex::new(reply.to_string())),
            data_ended: Default::default(),
            accepted: Default::default(),
        };
        let (hold, reply, ended, accepted) = (
            s.hold.clone(),
            s.reply.clone(),
            s.data_ended.clone(),
            s.accepted.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (hold, reply, ended, accepted) =
                    (hold.clone(), reply.clone(), ended.clone(), accepted.clone());
                std::thread::spawn(move || {
                    let _ = session(conn, &hold, &reply, &ended, &accepted);
                });
            }
        });
        s
    }

    fn accepted_for(&self, rcpt: &str) -> usize {
        let all = self.accepted.lock().expect("lock");
        all.iter().filter(|m| m.iter().any(|r| r == rcpt)).count()
    }

    /// Waits until `n` messages reached the end of DATA.
    fn wait_data_ended(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.data_ended.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "no delivery reached the server");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn session(
    conn: std::net::TcpStream,
    hold: &AtomicBool,
    reply: &Mutex<String>,
    ended: &AtomicUsize,
    accepted: &Mutex<Vec<Vec<String>>>,
) -> std::io::Result<()> {
    use std::io::{BufRead, Write};
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = conn.try_clone()?;
    let mut reader = std::io::BufReader::new(conn);
    write!(out, "220 gated ESMTP\r\n")?;
    let mut rcpts = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            write!(out, "250-gated\r\n250 8BITMIME\r\n")?;
        } else if upper.starts_with("RCPT") {
            let r = line.split(['<', '>']).nth(1).unwrap_or("").to_string();
            rcpts.push(r);
            write!(out, "250 2.1.5 ok\r\n")?;
        } else if upper.starts_with("DATA") {
            write!(out, "354 go\r\n")?;
            loop {
                let mut l = Vec::new();
                if reader.read_until(b'\n', &mut l)? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
            }
            ended.fetch_add(1, Ordering::SeqCst);
            // Bounded: at most 30 s of holding.
            let deadline = Instant::now() + Duration::from_secs(30);
            while hold.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let answer = reply.lock().expect("lock").clone();
            if answer.starts_with('2') {
                accepted
                    .lock()
                    .expect("lock")
                    .push(std::mem::take(&mut rcpts));
            }
            rcpts.clear();
            write!(out, "{answer}\r\n")?;
        } else if upper.starts_with("QUIT") {
            write!(out, "221 bye\r\n")?;
            return Ok(());
        } else {
            if upper.starts_with("MAIL") || upper.starts_with("RSET") {
                rcpts.clear();
            }
            write!(out, "250 ok\r\n")?;
        }
    }
}

/// Servers (name, port) and mailboxes (address, home), no replicas.
fn catalog(scratch: &Scratch, servers: &[(&str, u16)], mailboxes: &[(&str, &str)]) {
    let mut toml = String::new();
    for (name, port) in servers {
        toml.push_str(&format!(
            "[[server]]\nname = \"{name}\"\ncluster = \"c\"\naddress = \"127.0.0.1:{port}\"\n\n"
        ));
    }
    for (address, home) in mailboxes {
        toml.push_str(&format!(
            "[[mailbox]]\naddress = \"{address}\"\nhome = \"{home}\"\n\n"
        ));
    }
    let f = scratch.write("cluster.toml", &toml);
    scratch.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
}

fn router(scratch: Scratch, retry_initial: &str) -> Router {
    let port = common::free_port();
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n[routing]\n\
         probe_interval = \"200ms\"\nprobe_timeout = \"500ms\"\nrise = 1\n\
         retry_initial = \"{retry_initial}\"\nretry_max = \"1h\"\ndelivery_timeout = \"40s\"\n"
    );
    Router::start_config(scratch, &config, port)
}

/// Sends one message per entry of `batches` (its recipients) on one connection;
/// their queue ids.
fn send(r: &Router, batches: &[&[&str]]) -> Vec<String> {
    let mut c = Client::hello(r.port);
    let mut ids = Vec::new();
    for (n, rcpts) in batches.iter().enumerate() {
        expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
        for rcpt in *rcpts {
            expect(&c.cmd(&format!("RCPT TO:<{rcpt}>")), 250, "2.1.5");
        }
        c.cmd("DATA");
        c.send_raw(format!("Subject: {n}\r\n\r\nbody\r\n.\r\n").as_bytes());
        let reply = c.reply();
        expect(&reply, 250, "2.0.0");
        ids.push(reply.text().rsplit(' ').next().unwrap_or("").to_string());
    }
    ids
}

/// Runs a CLI command on its own thread (it may wait for a delivery).
fn spawn_cli(r: &Router, args: &[&str]) -> std::thread::JoinHandle<(i32, String, String)> {
    let mut cmd = r.scratch.cmd();
    cmd.args(args);
    std::thread::spawn(move || {
        let out = cmd.output().expect("run clustermail");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
}

fn listed(r: &Router) -> String {
    r.scratch.ok(&["queue", "list"])
}

#[test]
fn queue_delete_during_a_slow_delivery_leaves_no_zombie() {
    // The server takes the data slowly, then defers: the message stays queued
    // after the delivery unless the delete removed it.
    let slow = GatedServer::start("451 4.3.0 try again later");
    let s = Scratch::new();
    catalog(&s, &[("slow", slow.port)], &[("u@c.test", "slow")]);
    // A short retry: a zombie would fall due every second.
    let r = router(s, "1s");
    slow.hold.store(true, Ordering::SeqCst);
    let id = send(&r, &[&["u@c.test"]]).remove(0);
    slow.wait_data_ended(1);

    // Asked not to wait: refused, the message is untouched and consistent.
    let (code, out, err) = r.scratch.run(&["queue", "delete", &id, "--wait", "0s"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("being delivered"), "{err}");
    assert!(listed(&r).contains(&id));
    r.scratch.ok(&["queue", "show", &id]);

    // Waits for the delivery in progress, then deletes.
    let delete = spawn_cli(&r, &["queue", "delete", &id, "--wait", "60s"]);
    std::thread::sleep(Duration::from_millis(1500));
    slow.hold.store(false, Ordering::SeqCst);
    let (code, out, err) = delete.join().expect("delete");
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{id} deleted\n").as_str()),
        "{err}"
    );
    r.wait_log("delivery attempt");
    // Past the 1 s retry a zombie would have fallen due (twice).
    std::thread::sleep(Duration::from_millis(2500));
    let list = listed(&r);
    assert!(list.ends_with("0 message(s)\n"), "{list}");
    let (code, _, err) = r.scratch.run(&["queue", "show", &id]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no such message"), "{err}");
    let log = r.log();
    assert!(!log.contains("without message octets"), "{log}");
    assert!(!log.contains("delivery attempt failed"), "{log}");
    assert_eq!(
        slow.data_ended.load(Ordering::SeqCst),
        1,
        "one attempt only"
    );
}

#[test]
fn queue_retry_all_racing_a_delivery_never_resends_a_delivered_recipient() {
    // `held`: a home that is down, so older messages wait an hour; the racing
    // message goes to `gate` (slow, then defers) first and `fast` (accepts) next.
    let gate = GatedServer::start("451 4.3.0 try again later");
    let fast = GatedServer::start("250 2.0.0 ok");
    let down = common::free_port();
    let s = Scratch::new();
    catalog(
        &s,
        &[
            ("a-gate", gate.port),
            ("b-fast", fast.port),
            ("c-down", down),
        ],
        &[
            ("g@c.test", "a-gate"),
            ("f@c.test", "b-fast"),
            ("d@c.test", "c-down"),
        ],
    );
    let r = router(s, "1h");
    // Many older messages: `retry --all` has plenty to do before it reaches the
    // newest one.
    let older = 400;
    let batches: Vec<&[&str]> = vec![&["d@c.test"]; older];
    send(&r, &batches);
    gate.hold.store(true, Ordering::SeqCst);
    let id = send(&r, &[&["g@c.test", "f@c.test"]]).remove(0);
    gate.wait_data_ended(1);
    let retry = spawn_cli(&r, &["queue", "retry", "--all", "--wait", "60s"]);
    std::thread::sleep(Duration::from_millis(300));
    // The gate defers; `fast` takes f@c.test; g@c.test is held.
    gate.hold.store(false, Ordering::SeqCst);
    let (code, out, err) = retry.join().expect("retry");
    assert_eq!(code, 0, "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fast.accepted_for("f@c.test") < 1 {
        assert!(Instant::now() < deadline, "f@c.test never delivered");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Once the delivery is recorded, the queue says f@c.test was delivered: no
    // stale copy written back over it (it would say pending, and go out again).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let show = r.scratch.ok(&["queue", "show", &id]);
        if show.contains("<g@c.test> (mailbox g@c.test): held") {
            assert!(
                show.contains("<f@c.test> (mailbox f@c.test): delivered to b-fast"),
                "{show}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{show}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The gate now accepts: a retry delivers g@c.test.
    *gate.reply.lock().expect("lock") = "250 2.0.0 ok".into();
    r.scratch.ok(&["queue", "retry", &id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while gate.accepted_for("g@c.test") < 1 {
        assert!(
            Instant::now() < deadline,
            "g@c.test never delivered:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Settle: anything stale would be due now and delivered again.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fast.accepted_for("f@c.test"), 1, "f@c.test delivered twice");
    assert_eq!(gate.accepted_for("g@c.test"), 1);
    let list = listed(&r);
    assert!(!list.contains(&id), "{list}");
    assert!(list.ends_with(&format!("{older} message(s)\n")), "{list}");
}
