//! The web console over real HTTP: login, sessions, CSRF, the wrong-password
//! limit, security headers, escaping, API tokens from the CLI, and a queue
//! action through the API.

mod common;
mod console;

use common::{Router, Scratch};
use console::{csrf, http, login, Console, FORM};

#[test]
fn sessions_csrf_headers_and_escaping() {
    let c = Console::start();
    // No session: pages send to /login, the API answers 401.
    let a = http("GET", &c.url("/"), &[], None);
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), Some("/login"));
    let a = http(
        "GET",
        &c.url("/queue"),
        &[("Cookie", "cm_session=forged")],
        None,
    );
    assert_eq!(a.header("location"), Some("/login"));
    assert_eq!(
        http("GET", &c.url("/api/v1/servers"), &[], None).status,
        401
    );
    assert_eq!(http("GET", &c.url("/healthz"), &[], None).status, 200);
    let a = http("GET", &c.url("/login"), &[], None);
    assert_eq!(a.status, 200);

    let cookie = login(&c, &c.initial_password());
    let auth = [("Cookie", cookie.as_str())];
    let a = http("GET", &c.url("/"), &auth, None);
    assert_eq!(a.status, 200);
    assert!(a.body.contains("m1"), "the dashboard lists the servers");
    let csp = a.header("content-security-policy").expect("CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(a.header("x-frame-options"), Some("DENY"));
    assert!(a.header("cache-control").unwrap_or("").contains("no-store"));
    // A confirmation page whose decoded id would aim its form at another action.
    for path in [
        "/queue/..%2F..%2Fha%2Fslave%23/retry",
        "/queue/..%2Fha%2Fmaster",
    ] {
        let a = http("GET", &c.url(path), &auth, None);
        assert_eq!(a.status, 404, "{path}: {}", a.body);
        assert!(!a.body.contains("/ha/"), "{path}: {}", a.body);
    }
    assert!(!a.body.contains("<script>"), "no inline script");

    // Attacker-controlled text is escaped.
    let a = http(
        "GET",
        &c.url("/route?address=%3Cscript%3Ealert(1)%3C/script%3E@c.test"),
        &auth,
        None,
    );
    assert_eq!(a.status, 200);
    assert!(!a.body.contains("<script>alert(1)"), "{}", a.body);
    assert!(
        a.body
            .contains("&lt;script&gt;alert(1)&lt;/script&gt;@c.test"),
        "{}",
        a.body
    );

    // State changes need the session's CSRF token.
    let id = c.held_message();
    let page = http("GET", &c.url(&format!("/queue/{id}")), &auth, None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("u@c.test") && page.body.contains("held"));
    let token = csrf(&page.body);
    let retry = c.url(&format!("/queue/{id}/retry"));
    let a = http("POST", &retry, &[auth[0], FORM], Some(""));
    assert_eq!(a.status, 403, "no token");
    let a = http("POST", &retry, &[auth[0], FORM], Some("csrf=0000"));
    assert_eq!(a.status, 403, "wrong token");
    let a = http("POST", &retry, &[auth[0]], None);
    assert_eq!(a.status, 403, "no body");
    let a = http(
        "POST",
        &retry,
        &[auth[0], FORM],
        Some(&format!("csrf={token}")),
    );
    assert_eq!(a.status, 303, "{}", a.body);
    let a = http("GET", &c.url(&format!("/queue/{id}")), &auth, None);
    assert!(
        a.body.contains("1 message(s) due for delivery now"),
        "{}",
        a.body
    );

    // Logging out ends the session on the server.
    let a = http(
        "POST",
        &c.url("/logout"),
        &[auth[0], FORM],
        Some(&format!("csrf={token}")),
    );
    assert_eq!(a.status, 303);
    assert_eq!(http("GET", &c.url("/"), &auth, None).status, 303);
}

#[test]
fn wrong_passwords_are_limited_per_address() {
    let c = Console::start();
    let password = c.initial_password();
    let try_login = |p: &str| {
        http(
            "POST",
            &c.url("/login"),
            &[FORM],
            Some(&format!("user=admin&password={p}")),
        )
    };
    for n in 1..5 {
        let a = try_login("wrong-password");
        assert_eq!(a.status, 401, "failure {n}");
        assert!(a.body.contains("Wrong user or password"));
    }
    let a = try_login("wrong-password");
    assert_eq!(a.status, 429, "fifth failure");
    assert!(a.header("retry-after").is_some());
    // Even the right password waits now.
    assert_eq!(try_login(&password).status, 429);
    assert!(c
        .router
        .log()
        .contains("web console: wrong user or password"));
    assert!(
        !c.router.log().contains(&password),
        "the password is never logged"
    );
}

#[test]
fn concurrent_wrong_passwords_get_no_more_tries_than_sequential_ones() {
    let c = Console::start();
    let url = c.url("/login");
    // A login form is small: one announcing 1 MiB is refused before it is read.
    {
        use std::io::{Read, Write};
        let addr = url.trim_start_matches("http://").trim_end_matches("/login");
        let mut t = std::net::TcpStream::connect(addr).unwrap();
        t.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        t.write_all(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
              Content-Length: 1048576\r\n\r\nuser=admin&password=",
        )
        .unwrap();
        let mut w = t.try_clone().unwrap();
        // The body, as far as the server takes it (it may close before the end).
        std::thread::spawn(move || {
            let _ = w.write_all(&vec![b'x'; 1 << 20]);
        });
        let mut head = [0u8; 12];
        t.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
    }
    let answers: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|_| {
                s.spawn(|| {
                    http(
                        "POST",
                        &url,
                        &[FORM],
                        Some("user=admin&password=wrong-password"),
                    )
                    .status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let tried = answers.iter().filter(|&&a| a == 401).count();
    assert!(
        tried <= 4,
        "{tried} wrong passwords checked at once: {answers:?}"
    );
    assert!(
        answers.iter().all(|&a| a == 401 || a == 429 || a == 503),
        "{answers:?}"
    );
}

#[test]
fn api_tokens_and_passwords_from_the_cli() {
    let c = Console::start();
    let s = &c.router.scratch;
    let token = s
        .ok(&["web", "create-token", "--name", "ci"])
        .trim()
        .to_string();
    assert!(token.starts_with("cmt_"), "{token}");
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    let a = http("GET", &c.url("/api/v1/servers"), &auth, None);
    assert_eq!(a.status, 200, "{}", a.body);
    let servers: serde_json::Value = serde_json::from_str(&a.body).expect("json");
    assert_eq!(servers[0]["name"], "m1");
    let a = http(
        "POST",
        &c.url("/api/v1/servers/m1/state?state=restricted"),
        &auth,
        None,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(s.ok(&["catalog", "list", "servers"]).contains("restricted"));
    let a = http(
        "GET",
        &c.url("/api/v1/catalog/mailbox/U@c.test"),
        &auth,
        None,
    );
    let mailbox: serde_json::Value = serde_json::from_str(&a.body).expect("json");
    assert_eq!(mailbox["home"]["name"], "m1", "{}", a.body);
    let a = http(
        "GET",
        &c.url("/api/v1/catalog/mailbox/nobody@c.test"),
        &auth,
        None,
    );
    assert_eq!(a.status, 404);

    let id = c.held_message();
    let a = http("GET", &c.url("/api/v1/queue?state=held"), &auth, None);
    let page: serde_json::Value = serde_json::from_str(&a.body).expect("json");
    assert_eq!(page["messages"][0]["id"], id.as_str(), "{}", a.body);
    assert_eq!(page["messages"][0]["recipients"][0]["state"], "held");
    let a = http("GET", &c.url(&format!("/api/v1/queue/{id}")), &auth, None);
    assert!(a.body.contains("recipient: <u@c.test>"), "{}", a.body);
    let a = http(
        "POST",
        &c.url(&format!("/api/v1/queue/{id}/retry")),
        &auth,
        None,
    );
    assert_eq!(a.status, 200, "a token needs no CSRF token: {}", a.body);
    assert!(
        a.body.contains("1 message(s) due for delivery now"),
        "{}",
        a.body
    );
    let a = http(
        "POST",
        &c.url(&format!("/api/v1/queue/{id}/release")),
        &auth,
        None,
    );
    assert_eq!(a.status, 400, "nothing undeliverable: {}", a.body);
    let a = http("GET", &c.url("/api/v1/route?address=u@c.test"), &auth, None);
    assert!(a.body.contains("hold"), "{}", a.body);

    // A session's API POST needs its CSRF token too.
    let cookie = login(&c, &c.initial_password());
    let a = http(
        "POST",
        &c.url(&format!("/api/v1/queue/{id}/retry")),
        &[("Cookie", cookie.as_str())],
        None,
    );
    assert_eq!(a.status, 403);

    assert!(s.ok(&["web", "revoke-token", "ci"]).contains("revoked"));
    assert_eq!(
        http("GET", &c.url("/api/v1/servers"), &auth, None).status,
        401
    );

    // A new password, read from stdin, through the admin socket.
    let mut child = s
        .cmd()
        .args(["web", "set-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("set-password");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"a new long password\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert!(
        !s.path().join("data/web-initial-password").exists(),
        "the generated password's file goes with it"
    );
    let a = http(
        "POST",
        &c.url("/login"),
        &[FORM],
        Some("user=admin&password=a+new+long+password"),
    );
    assert_eq!(a.status, 303, "the new password works");
}

/// `text` as HTML shows it (maud escapes these).
fn escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A multipart/form-data body with one file and the import mode.
fn multipart(name: &str, content: &str, mode: &str) -> (String, String) {
    let boundary = "----clustermail-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: text/csv\r\n\r\n{content}\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"mode\"\r\n\r\n{mode}\r\n--{boundary}--\r\n"
    );
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn catalog_upload_is_checked_first_then_applied() {
    let c = Console::start();
    let s = &c.router.scratch;
    let cookie = login(&c, &c.initial_password());
    let page = http("GET", &c.url("/catalog"), &[("Cookie", &cookie)], None);
    let token = csrf(&page.body);
    let import = c.url(&format!("/catalog/import?csrf={token}"));

    // Every line error, as the CLI prints it for the same file.
    let fixture = common::repo("fixtures/catalog/bad-address.csv");
    let bad = std::fs::read_to_string(&fixture).expect("fixture");
    let (code, _, cli) = s.run(&[
        "catalog",
        "import",
        "--dry-run",
        &fixture.display().to_string(),
    ]);
    assert_eq!(code, 2);
    let (kind, body) = multipart("bad-address.csv", &bad, "merge");
    let a = http(
        "POST",
        &import,
        &[("Cookie", &cookie), ("Content-Type", &kind)],
        Some(&body),
    );
    assert_eq!(a.status, 422, "{}", a.body);
    let cli = cli.replace(&fixture.display().to_string(), "bad-address.csv");
    assert!(cli.lines().count() >= 5, "{cli}");
    for line in cli.lines() {
        assert!(
            a.body.contains(&escaped(line)),
            "{line:?} not in:\n{}",
            a.body
        );
    }
    assert!(!a.body.contains("id=\"apply\""), "nothing to apply");
    let (kind, body) = multipart("bad-address.csv", &bad, "merge");
    let a = http(
        "POST",
        &c.url("/catalog/import"),
        &[("Cookie", &cookie), ("Content-Type", &kind)],
        Some(&body),
    );
    assert_eq!(a.status, 403, "an upload without the CSRF token");

    // A good file: counted by the dry run, applied only on confirmation.
    let good = "address,home,replicas,aliases\nv@c.test,m1,,\n";
    let (kind, body) = multipart("more.csv", good, "merge");
    let a = http(
        "POST",
        &import,
        &[("Cookie", &cookie), ("Content-Type", &kind)],
        Some(&body),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("dry run"), "{}", a.body);
    let (code, _, _) = s.run(&["catalog", "show", "v@c.test"]);
    assert_eq!(code, 2, "a dry run changes nothing");
    let at = a
        .body
        .find("name=\"upload\" value=\"")
        .expect("an apply form")
        + 21;
    let upload = &a.body[at..at + 24];
    let a = http(
        "POST",
        &c.url("/catalog/apply"),
        &[("Cookie", &cookie), FORM],
        Some(&format!("csrf={token}&upload={upload}&mode=merge")),
    );
    assert_eq!(a.status, 303, "{}", a.body);
    assert!(s
        .ok(&["catalog", "show", "v@c.test"])
        .contains("home:     m1"));
    let a = http(
        "GET",
        &c.url("/catalog/export?format=csv"),
        &[("Cookie", &cookie)],
        None,
    );
    assert!(a.body.contains("v@c.test,m1"), "{}", a.body);
    assert!(a
        .header("content-disposition")
        .unwrap_or("")
        .contains("catalog.csv"));
}

#[test]
fn under_tls_the_console_speaks_https_and_its_cookie_is_secure() {
    let s = Scratch::new();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert = s.write("cert.pem", &key.cert.pem());
    let pkey = s.write("key.pem", &key.signing_key.serialize_pem());
    let (port, web) = (common::free_port(), common::free_port());
    let config = format!(
        "router_name = \"mx.test\"\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [web]\nlisten = \"127.0.0.1:{web}\"\ntls_cert = {:?}\ntls_key = {:?}\n",
        cert.display().to_string(),
        pkey.display().to_string()
    );
    let r = Router::start_config(s, &config, port);
    r.wait_log(&format!("url=https://127.0.0.1:{web}/"));
    let password = std::fs::read_to_string(r.scratch.path().join("data/web-initial-password"))
        .expect("password file");
    // Python's client, trusting the fresh certificate.
    let script = r#"
import http.client, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.check_hostname = False
c = http.client.HTTPSConnection('127.0.0.1', int(sys.argv[1]), context=ctx, timeout=20)
c.request('POST', '/login', body='user=admin&password=' + sys.argv[3],
          headers={'Content-Type': 'application/x-www-form-urlencoded'})
r = c.getresponse()
print(r.status, r.getheader('Set-Cookie'))
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &web.to_string(),
            &cert.display().to_string(),
            password.trim(),
        ])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("303 cm_session="), "{text}");
    assert!(text.contains("; Secure"), "{text}");
    // Plain HTTP on the TLS port gets no page.
    use std::io::{Read, Write};
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", web)).expect("connect");
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .ok();
    plain
        .write_all(b"GET /login HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}
