//! Helpers shared by the integration tests: run the real binary in a temp dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_clustermail")
}

pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A scratch directory with its own data dir (the binary runs with it as cwd).
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.current_dir(self.path()).env("RUST_LOG", "warn");
        c
    }

    /// Runs `clustermail ARGS` and returns (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out: Output = self.cmd().args(args).output().expect("run clustermail");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "clustermail {args:?} failed:\n{out}\n{err}");
        out
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

/// A `clustermail serve` process on a free loopback port, with its own data dir.
pub struct Router {
    pub scratch: Scratch,
    pub port: u16,
    child: Option<std::process::Child>,
}

/// How much bigger than CI size the fault tests run: `CLUSTERMAIL_SCALE` (default 1).
pub fn scale() -> usize {
    std::env::var("CLUSTERMAIL_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n >= 1)
        .unwrap_or(1)
}

/// A loopback port free now and never handed out before in this test process:
/// the kernel may give a port just released again, and a test that holds ports
/// for later (a pair's units, a home started after them) would then have two
/// parts on one port (seen: a home's port given to a unit's SMTP listener).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no loopback port not handed out before");
}

impl Router {
    /// Starts a router with `extra_smtp` lines added to its `[smtp]` section.
    pub fn start(extra_smtp: &str) -> Router {
        Router::start_in(Scratch::new(), extra_smtp)
    }

    pub fn start_in(scratch: Scratch, extra_smtp: &str) -> Router {
        let port = free_port();
        let config = format!(
            "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n{extra_smtp}\n"
        );
        Router::start_config(scratch, &config, port)
    }

    /// Starts a router with this whole config file; `port` is a listener to wait for.
    pub fn start_config(scratch: Scratch, config: &str, port: u16) -> Router {
        scratch.write("clustermail.toml", config);
        let mut r = Router {
            scratch,
            port,
            child: None,
        };
        r.restart();
        r
    }

    /// (Re)starts the process on the same port and data dir; waits until it listens.
    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.scratch.path().join("serve.log")).expect("log file");
        let child = self
            .scratch
            .cmd()
            .env("RUST_LOG", "info")
            .arg("serve")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "router did not listen:\n{}",
                self.log()
            );
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("router exited ({status}) before listening:\n{}", self.log());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits up to 10 s for `needle` to appear in the log; panics with the log if
    /// it does not. (Log lines of a delivery follow the server's reply.)
    pub fn wait_log(&self, needle: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "{needle:?} never logged:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.path().join("serve.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().expect("wait")
    }

    pub fn signal_term(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().expect("wait")
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }

    /// Queue ids as listed by `queue list` (router must be stopped).
    pub fn queue_ids(&self) -> Vec<String> {
        self.scratch
            .ok(&["queue", "list"])
            .lines()
            .skip(1)
            // Message lines; recipient lines are indented.
            .filter(|l| !l.ends_with("message(s)") && !l.starts_with(' '))
            .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
            .collect()
    }

    pub fn queued_raw(&self, id: &str) -> Vec<u8> {
        let out = self
            .scratch
            .cmd()
            .args(["queue", "show", id, "--raw"])
            .output()
            .expect("queue show");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw SMTP client over TCP, for conformance tests.
pub struct Client {
    pub stream: std::net::TcpStream,
    reader: std::io::BufReader<std::net::TcpStream>,
}

/// A reply: code and the text of each line (after `code-` / `code `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
    /// The enhanced status code of the last line ("" if none).
    pub fn status(&self) -> &str {
        self.lines
            .last()
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("")
    }
}

impl Client {
    pub fn connect(port: u16) -> Client {
        Client::connect_to(&format!("127.0.0.1:{port}"))
    }

    pub fn connect_to(addr: &str) -> Client {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one reply; None on EOF.
    pub fn try_reply(&mut self) -> Option<Reply> {
        use std::io::BufRead;
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']);
            assert!(line.len() >= 3, "short reply line {line:?}");
            let code: u16 = line[..3].parse().expect("reply code");
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if !more {
                return Some(Reply { code, lines });
            }
        }
    }

    pub fn reply(&mut self) -> Reply {
        self.try_reply().expect("a reply, not EOF")
    }

    /// Sends one command line and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Connects until greeted with 220 (a slot held by a connection that just ended
    /// may take a moment to come free), within 5 s.
    pub fn greeted(port: u16) -> Client {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut c = Client::connect(port);
            if c.try_reply().is_some_and(|r| r.code == 220) {
                return c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never greeted with 220"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Greeting + EHLO.
    pub fn hello(port: u16) -> Client {
        let mut c = Client::greeted(port);
        assert_eq!(c.cmd("EHLO client.test").code, 250);
        c
    }

    /// True if the server closed the connection (EOF) within the read timeout.
    pub fn closed(&mut self) -> bool {
        self.try_reply().is_none()
    }
}

/// Asserts a reply's code and enhanced status.
#[track_caller]
pub fn expect(r: &Reply, code: u16, status: &str) {
    assert_eq!((r.code, r.status()), (code, status), "reply: {r:?}");
}

/// The queued message without our Received header (first field, with its folded lines).
pub fn without_received(raw: &[u8]) -> Vec<u8> {
    assert!(
        raw.starts_with(b"Received: from "),
        "{}",
        String::from_utf8_lossy(raw)
    );
    let mut pos = 0;
    loop {
        pos += raw[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .expect("header line")
            + 1;
        if !matches!(raw.get(pos), Some(b' ' | b'\t')) {
            return raw[pos..].to_vec();
        }
    }
}

/// Postfix's smtp-sink on a free loopback port (killed on drop).
pub struct SmtpSink {
    pub port: u16,
    child: std::process::Child,
}

impl SmtpSink {
    pub fn start() -> SmtpSink {
        SmtpSink::start_with(&[])
    }

    /// An smtp-sink that writes each message it takes into `dir` (`-d`).
    pub fn start_dumping(dir: &Path) -> SmtpSink {
        std::fs::create_dir_all(dir).expect("dump dir");
        // smtp-sink runs as nobody: the directory must be writable by it.
        let _ = std::process::Command::new("chmod")
            .arg("777")
            .arg(dir)
            .status();
        let template = format!("{}/%H%M%S.", dir.display());
        SmtpSink::start_with(&["-d", &template])
    }

    fn start_with(extra: &[&str]) -> SmtpSink {
        let port = free_port();
        let mut cmd = std::process::Command::new("smtp-sink");
        cmd.args(extra);
        // As root, smtp-sink must drop privileges.
        if running_as_root() {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .arg(format!("127.0.0.1:{port}"))
            .arg("50")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("smtp-sink is installed (apt-get install postfix)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "smtp-sink did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        SmtpSink { port, child }
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message as a [`RecordingSink`] received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub from: String,
    pub rcpts: Vec<String>,
    pub data: Vec<u8>,
    /// Which connection (in accept order) carried it.
    pub conn: usize,
}

/// A small mailbox server for routing tests: records every message, refuses
/// recipients listed in `refuse` with 550, can be stopped and started again.
pub struct RecordingSink {
    pub port: u16,
    pub name: &'static str,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    pub refuse: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Milliseconds to wait before the greeting (a slow, busy server).
    pub greeting_delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl RecordingSink {
    pub fn start(name: &'static str) -> RecordingSink {
        let mut s = RecordingSink {
            port: free_port(),
            name,
            received: Default::default(),
            refuse: Default::default(),
            greeting_delay_ms: Default::default(),
            stop: None,
        };
        s.up();
        s
    }

    /// Starts listening (again) on the same port.
    pub fn up(&mut self) {
        use std::sync::atomic::{AtomicBool, Ordering};
        // Bounded: a port taken by someone else fails the test, not hangs it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("sink {}: port {} stays taken: {e}", self.name, self.port)
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        self.stop = Some(stop.clone());
        let (received, refuse, name) = (self.received.clone(), self.refuse.clone(), self.name);
        let delay = self.greeting_delay_ms.clone();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (received, refuse) = (received.clone(), refuse.clone());
                let wait = delay.load(Ordering::SeqCst);
                let stop = stop.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(wait));
                    let _ = sink_session(conn, n, name, &received, &refuse, &stop);
                });
            }
        });
    }

    /// Stops listening: new connections are refused, and open sessions get 421
    /// at their next command (a server shutting down).
    pub fn down(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            // Wake the accept loop so that it sees the flag and drops the listener.
            let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    pub fn messages(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Waits until at least `n` messages arrived (or `secs` pass); returns them.
    pub fn wait_for(&self, n: usize, secs: u64) -> Vec<Received> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let m = self.messages();
            if m.len() >= n || std::time::Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    }
}

impl Drop for RecordingSink {
    fn drop(&mut self) {
        self.down();
    }
}

fn sink_session(
    conn: std::net::TcpStream,
    conn_no: usize,
    name: &str,
    received: &std::sync::Mutex<Vec<Received>>,
    refuse: &std::sync::Mutex<Vec<String>>,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::io::{BufRead, Write};
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut out = conn.try_clone()?;
    let mut reader = std::io::BufReader::new(conn);
    write!(out, "220 {name} ESMTP recording sink\r\n")?;
    let (mut from, mut rcpts) = (String::new(), Vec::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            write!(out, "421 4.3.2 {name} shutting down\r\n")?;
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        let arg = |l: &str| {
            l.split_once(':')
                .map(|(_, a)| {
                    a.trim()
                        .trim_start_matches('<')
                        .split('>')
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_default()
        };
        if upper.starts_with("EHLO") {
            write!(out, "250-{name}\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")?;
        } else if upper.starts_with("MAIL") {
            from = arg(&line);
            rcpts.clear();
            write!(out, "250 2.1.0 ok\r\n")?;
        } else if upper.starts_with("RCPT") {
            let r = arg(&line);
            if refuse
                .lock()
                .expect("lock")
                .iter()
                .any(|x| x.eq_ignore_ascii_case(&r))
            {
                write!(out, "550 5.1.1 <{r}> unknown here\r\n")?;
            } else {
                rcpts.push(r);
                write!(out, "250 2.1.5 ok\r\n")?;
            }
        } else if upper.starts_with("DATA") {
            write!(out, "354 go\r\n")?;
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                if reader.read_until(b'\n', &mut l)? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                let l = if l.starts_with(b"..") {
                    &l[1..]
                } else {
                    &l[..]
                };
                data.extend_from_slice(l);
            }
            received.lock().expect("lock").push(Received {
                from: from.clone(),
                rcpts: rcpts.clone(),
                data,
                conn: conn_no,
            });
            write!(out, "250 2.0.0 stored by {name}\r\n")?;
        } else if upper.starts_with("QUIT") {
            write!(out, "221 bye\r\n")?;
            return Ok(());
        } else {
            write!(out, "250 ok\r\n")?;
        }
    }
}

/// `clustermail serve` in `s` with the flush-failure test hook
/// (`CLUSTERMAIL_TEST_FAIL_FLUSH`) armed by the file `trigger`; its log is
/// appended to `serve.log`. Returns once it listens on `port`.
pub fn serve_failing_flush(
    s: &Scratch,
    port: u16,
    trigger: &std::path::Path,
) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.path().join("serve.log"))
        .expect("log");
    let child = s
        .cmd()
        .env("RUST_LOG", "info")
        .env("CLUSTERMAIL_TEST_FAIL_FLUSH", trigger)
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "router did not listen:\n{}",
            std::fs::read_to_string(s.path().join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}
