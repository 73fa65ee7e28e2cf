//! Helpers of the HA tests (tests/ha*.rs): unit configs, waiting for modes, a TCP
//! proxy that can cut the path between the units, and a fake SLAVE that pushes
//! envelopes over a real HA link.
#![allow(dead_code)]

use crate::common::{expect, Client, RecordingSink, Router, Scratch};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const INTERVAL_MS: u64 = 200;
pub const LOST: u64 = 3;

pub struct Ports {
    pub smtp: [u16; 2],
    pub ha: [u16; 2],
}

pub fn ports() -> Ports {
    use crate::common::free_port;
    Ports {
        smtp: [free_port(), free_port()],
        ha: [free_port(), free_port()],
    }
}

/// Config of unit `i` (0 primary, 1 secondary), reaching its peer directly.
pub fn config(p: &Ports, i: usize, on_failure: &str, password: &str) -> String {
    let other = 1 - i;
    config_via(p, i, on_failure, password, p.ha[other], p.smtp[other])
}

/// Config of unit `i` reaching its peer's HA and SMTP ports at these ports.
pub fn config_via(
    p: &Ports,
    i: usize,
    on_failure: &str,
    password: &str,
    peer_ha: u16,
    peer_smtp: u16,
) -> String {
    let role = if i == 0 { "primary" } else { "secondary" };
    format!(
        "router_name = \"unit{i}.test\"\n[smtp]\nlisten = [\"127.0.0.1:{}\"]\n\
         [routing]\nprobe_interval = \"200ms\"\nprobe_timeout = \"500ms\"\nrise = 1\n\
         retry_initial = \"300ms\"\nretry_max = \"600ms\"\ndelivery_timeout = \"2s\"\n\
         [ha]\nmode = \"{role}\"\nlisten = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{peer_ha}\"\n\
         peer_smtp = \"127.0.0.1:{peer_smtp}\"\npassword = \"{password}\"\nheartbeat_interval = \"{INTERVAL_MS}ms\"\n\
         heartbeat_lost = {LOST}\non_failure = \"{on_failure}\"\n",
        p.smtp[i], p.ha[i]
    )
}

/// The catalog: u@c.test homed on `home`, no replica.
pub fn catalog(s: &Scratch, home: u16) {
    let f = s.write(
        "c.toml",
        &format!(
            "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{home}\"\n\n\
             [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n"
        ),
    );
    s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
}

pub fn status(r: &Router) -> String {
    r.scratch.ok(&["ha", "status"])
}

/// The effective mode `ha status` shows.
pub fn mode(r: &Router) -> String {
    status(r)
        .lines()
        .find_map(|l| l.strip_prefix("effective:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

/// Waits until `ha status` says `effective: MODE`; returns the time it took.
pub fn wait_mode(r: &Router, mode: &str, secs: u64) -> Duration {
    let started = Instant::now();
    loop {
        let (code, out, _) = r.scratch.run(&["ha", "status"]);
        if code == 0 && out.contains(&format!("effective:     {mode} ")) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "never {mode}:\n{out}\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until `what` holds (checked every 50 ms), at most `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn send(port: u16, subject: &str) {
    send_to(port, "u@c.test", subject);
}

pub fn send_to(port: u16, rcpt: &str, subject: &str) {
    let mut c = Client::hello(port);
    expect(&c.cmd("MAIL FROM:<sender@x.test>"), 250, "2.1.0");
    expect(&c.cmd(&format!("RCPT TO:<{rcpt}>")), 250, "2.1.5");
    c.cmd("DATA");
    c.send_raw(format!("Subject: {subject}\r\n\r\n.\r\n").as_bytes());
    expect(&c.reply(), 250, "2.0.0");
}

/// The SMTP greeting's code.
pub fn greeting(port: u16) -> u16 {
    Client::connect(port).reply().code
}

pub fn subjects(sink: &RecordingSink) -> Vec<String> {
    let mut v: Vec<String> = sink
        .messages()
        .iter()
        .filter_map(|m| {
            String::from_utf8_lossy(&m.data)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect();
    v.sort();
    v
}

/// Waits until `b` has the catalog server at `home` (the catalog sync).
pub fn wait_catalog(b: &Router, home: u16) {
    wait_until(10, "catalog synced", || {
        b.scratch
            .ok(&["catalog", "list", "servers"])
            .contains(&format!("127.0.0.1:{home}"))
    });
}

/// Both units up from these configs, primary MASTER and secondary SLAVE with the
/// primary's catalog.
pub fn pair_with(p: &Ports, home: u16, configs: [String; 2]) -> (Router, Router) {
    let a = Scratch::new();
    catalog(&a, home);
    let [ca, cb] = configs;
    let a = Router::start_config(a, &ca, p.smtp[0]);
    let b = Router::start_config(Scratch::new(), &cb, p.smtp[1]);
    wait_mode(&a, "MASTER", 10);
    wait_mode(&b, "SLAVE", 10);
    wait_catalog(&b, home);
    (a, b)
}

pub fn pair(p: &Ports, home: u16, on_failure: &str) -> (Router, Router) {
    let configs = [0, 1].map(|i| config(p, i, on_failure, "pair-secret"));
    pair_with(p, home, configs)
}

/// A pair without shadow copies (`ha.shadow = "off"`): a lost MASTER's mail
/// waits for its return and queue push (tests/shadow.rs has the shadowed pair).
pub fn pair_unshadowed(p: &Ports, home: u16, on_failure: &str) -> (Router, Router) {
    let configs = [0, 1].map(|i| config(p, i, on_failure, "pair-secret") + "shadow = \"off\"\n");
    pair_with(p, home, configs)
}

/// A TCP proxy on a loopback port to `target`, which the test can cut (every
/// connection dropped, new ones closed at once) and restore.
pub struct Proxy {
    pub port: u16,
    /// When above 0: the first answer to a request of at least this many octets
    /// is dropped and the path cut (see [`Proxy::drop_answer_to_large_request`]).
    drop_over: Arc<AtomicUsize>,
    /// Set once an answer was dropped so.
    pub dropped: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let p = Proxy {
            port,
            drop_over: Default::default(),
            dropped: Default::default(),
            cut: Default::default(),
            stop: Default::default(),
            open: Default::default(),
        };
        let (cut, stop, open) = (p.cut.clone(), p.stop.clone(), p.open.clone());
        let (drop_over, dropped) = (p.drop_over.clone(), p.dropped.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                if cut.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut list = open.lock().expect("lock");
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        list.push(c);
                    }
                }
                drop(list);
                // Octets sent to `target` since its last answer.
                let pending = Arc::new(AtomicUsize::new(0));
                for (to_target, (mut from, mut to)) in [
                    (true, (client.try_clone(), server.try_clone())),
                    (false, (server.try_clone(), client.try_clone())),
                ]
                .into_iter()
                .filter_map(|(d, (a, b))| Some((d, (a.ok()?, b.ok()?))))
                {
                    let (pending, drop_over, dropped, cut, open) = (
                        pending.clone(),
                        drop_over.clone(),
                        dropped.clone(),
                        cut.clone(),
                        open.clone(),
                    );
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            if to_target {
                                pending.fetch_add(n, Ordering::SeqCst);
                            } else {
                                let over = drop_over.load(Ordering::SeqCst);
                                if over > 0 && pending.swap(0, Ordering::SeqCst) >= over {
                                    // The answer to the large request is lost with the path.
                                    cut.store(true, Ordering::SeqCst);
                                    dropped.store(true, Ordering::SeqCst);
                                    for s in open.lock().expect("lock").drain(..) {
                                        let _ = s.shutdown(Shutdown::Both);
                                    }
                                    break;
                                }
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        p
    }

    /// From now on, the target's answer to the first request of at least `octets`
    /// (e.g. a queue push with a large message) never arrives: the path is cut
    /// before it is passed on, as if the network failed right then.
    pub fn drop_answer_to_large_request(&self, octets: usize) {
        self.drop_over.store(octets, Ordering::SeqCst);
    }

    /// Cuts the path: open connections are shut, new ones closed at once.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().expect("lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
