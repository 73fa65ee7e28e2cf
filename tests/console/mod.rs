//! The console test helpers: a router with its web console, HTTP requests.
#![allow(dead_code)]

use crate::common::{self, Router, Scratch};
use std::time::{Duration, Instant};

/// A router with its console on a free port; its mail to `u@c.test` is held
/// (its home server refuses connections).
pub struct Console {
    pub router: Router,
    pub web: u16,
}

impl Console {
    pub fn start() -> Console {
        let s = Scratch::new();
        let dead = common::free_port();
        let f = s.write(
            "c.toml",
            &format!(
                "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{dead}\"\n\n\
                 [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n"
            ),
        );
        s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
        let (port, web) = (common::free_port(), common::free_port());
        let config = format!(
            "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [routing]\nprobe_interval = \"200ms\"\nprobe_timeout = \"500ms\"\nretry_initial = \"1h\"\n\
             [web]\nlisten = \"127.0.0.1:{web}\"\n"
        );
        let router = Router::start_config(s, &config, port);
        router.wait_log("web console listening");
        Console { router, web }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.web)
    }

    pub fn initial_password(&self) -> String {
        let p = self.router.scratch.path().join("data/web-initial-password");
        std::fs::read_to_string(p)
            .expect("initial password file")
            .trim()
            .to_string()
    }

    /// Queues a message for u@c.test and returns its id once it is held.
    pub fn held_message(&self) -> String {
        let mut c = common::Client::hello(self.router.port);
        c.cmd("MAIL FROM:<sender@x.test>");
        common::expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
        c.cmd("DATA");
        c.send_raw(b"Subject: held\r\n\r\nbody\r\n.\r\n");
        common::expect(&c.reply(), 250, "2.0.0");
        c.cmd("QUIT");
        self.router.wait_log("decision=hold");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.router.scratch.ok(&["queue", "list"]);
            if out.contains("<u@c.test>: held") {
                return out.lines().nth(1).expect("a message line")[..16].to_string();
            }
            assert!(Instant::now() < deadline, "never held:\n{out}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An HTTP answer.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request, redirects not followed; `headers` as (name, value).
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Answer {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(30))
        .build();
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    let res = match res {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let headers = res
        .headers_names()
        .into_iter()
        .flat_map(|n| {
            res.all(&n)
                .into_iter()
                .map(|v| (n.clone(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    Answer {
        status: res.status(),
        headers,
        body: res.into_string().unwrap_or_default(),
    }
}

pub const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

/// Logs in; returns the cookie header value.
pub fn login(c: &Console, password: &str) -> String {
    let a = http(
        "POST",
        &c.url("/login"),
        &[FORM],
        Some(&format!("user=admin&password={password}")),
    );
    assert_eq!(a.status, 303, "login: {}", a.body);
    let cookie = a
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "no TLS here: {cookie}");
    cookie.split(';').next().expect("name=value").to_string()
}

/// The CSRF token of a logged-in page.
pub fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    page[at..at + 64].to_string()
}
