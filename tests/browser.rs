//! The web console in a real browser: headless Chromium driven through
//! WebDriver (chromedriver). Logs in with the initial password, finds the servers
//! on the dashboard, finds a held message in /queue, opens and retries it, and
//! saves a screenshot of every page under `target/web-screenshots/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (test.sh installs them); without
//! them this test fails and says so.

mod common;
mod console;

use common::{free_port, RecordingSink, Router, Scratch};
use console::Console;
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

fn need(program: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the browser test needs `{program}` (Debian package {package}): \
             run ./test.sh as root, or `apt-get install chromium chromium-driver`"
        )
    })
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let exe = need("chromedriver", "chromium-driver");
        let port = common::free_port();
        let child = std::process::Command::new(exe)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "chromedriver did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let chromium = need("chromium", "chromium");
    let caps = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000"],
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    // Both rustls crypto back ends are linked (lettre's ring, hyper-rustls's
    // aws-lc): name one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    ClientBuilder::rustls()
        .expect("rustls")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with chromium")
}

fn shots() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo("target"))
        .join("web-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

async fn shot(b: &Client, name: &str) {
    let png = b.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    std::fs::write(shots().join(format!("{name}.png")), png).expect("save screenshot");
}

/// Waits (bounded) until the page's source contains `text`.
async fn wait_text(b: &Client, text: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let src = b.source().await.expect("page source");
        if src.contains(text) {
            return src;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{text:?} never shown:\n{src}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_see_servers_find_and_retry_a_held_message() {
    let c = Console::start();
    let driver = Driver::start();
    let b = browser(&driver).await;
    let session = b.clone();
    let result = tokio::spawn(async move {
        b.goto(&c.url("/")).await.expect("goto");
        assert!(b.current_url().await.expect("url").path() == "/login");
        shot(&b, "01-login").await;
        b.find(Locator::Id("password"))
            .await
            .expect("password field")
            .send_keys(&c.initial_password())
            .await
            .expect("type");
        b.find(Locator::Id("login"))
            .await
            .expect("button")
            .click()
            .await
            .expect("log in");
        let src = wait_text(&b, "Servers").await;
        assert!(src.contains("m1"), "the dashboard lists the servers");
        assert!(src.contains("Last hour"), "charts");
        shot(&b, "02-dashboard").await;

        let id = tokio::task::block_in_place(|| c.held_message());
        // The open dashboard refreshes itself (the script polls /live).
        wait_text(&b, "id=\"queued\">1<").await;
        b.goto(&c.url("/queue?state=held")).await.expect("queue");
        wait_text(&b, &id).await;
        shot(&b, "03-queue").await;
        b.find(Locator::LinkText(&id))
            .await
            .expect("the held message")
            .click()
            .await
            .expect("open");
        let src = wait_text(&b, "queue show").await;
        assert!(src.contains("u@c.test") && src.contains("held"));
        shot(&b, "04-message").await;
        b.find(Locator::Id("action-retry"))
            .await
            .expect("retry")
            .click()
            .await
            .expect("retry");
        wait_text(&b, "Retry this message now?").await;
        shot(&b, "05-confirm-retry").await;
        b.find(Locator::Id("confirm"))
            .await
            .expect("confirm")
            .click()
            .await
            .expect("confirm");
        wait_text(&b, "1 message(s) due for delivery now").await;
        shot(&b, "06-retried").await;

        b.goto(&c.url("/servers")).await.expect("servers");
        wait_text(&b, "Set admin state").await;
        shot(&b, "07-servers").await;
        b.goto(&c.url("/route?address=u@c.test"))
            .await
            .expect("route");
        wait_text(&b, "mailbox u@c.test").await;
        shot(&b, "08-route").await;
        b.goto(&c.url("/catalog?address=u@c.test"))
            .await
            .expect("catalog");
        wait_text(&b, "home:").await;
        shot(&b, "09-catalog").await;
        let file = c
            .router
            .scratch
            .write("more.csv", "address,home,replicas,aliases\nv@c.test,m1,,\n");
        b.find(Locator::Id("upload"))
            .await
            .expect("file input")
            .send_keys(&file.display().to_string())
            .await
            .expect("choose the file");
        b.find(Locator::Id("check"))
            .await
            .expect("check")
            .click()
            .await
            .expect("dry run");
        wait_text(&b, "dry run").await;
        shot(&b, "09b-catalog-dry-run").await;
        b.find(Locator::Id("apply"))
            .await
            .expect("apply")
            .click()
            .await
            .expect("apply");
        let src = wait_text(&b, "class=\"flash ok\"").await;
        assert!(src.contains("mailboxes: 1 added"), "{src}");
        assert!(
            !src.contains("would be; dry run"),
            "applied, not a dry run again"
        );
        shot(&b, "09c-catalog-applied").await;
        b.goto(&c.url("/ha")).await.expect("ha");
        wait_text(&b, "not one of an HA pair").await;
        shot(&b, "10-ha").await;
        b.goto(&c.url("/")).await.expect("dashboard");
        wait_text(&b, "Last hour").await;
        shot(&b, "11-dashboard-later").await;
    })
    .await;
    finish(session, result).await;
}

/// Closes the browser, then fails as the test body did, if it did.
async fn finish(b: Client, result: Result<(), tokio::task::JoinError>) {
    let _ = b.close().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Unit `i` (0 primary, 1 secondary) of a pair on `smtp` / `ha` ports; only
/// the primary has a console, on `web`.
fn ha_config(i: usize, smtp: [u16; 2], ha: [u16; 2], web: u16) -> String {
    let (role, other) = if i == 0 {
        ("primary", 1)
    } else {
        ("secondary", 0)
    };
    let web = if i == 0 {
        format!("127.0.0.1:{web}")
    } else {
        String::new()
    };
    format!(
        "router_name = \"unit{i}.test\"\n[smtp]\nlisten = [\"127.0.0.1:{}\"]\n\
         [routing]\nprobe_interval = \"200ms\"\nprobe_timeout = \"500ms\"\nrise = 1\n\
         retry_initial = \"300ms\"\nretry_max = \"600ms\"\ndelivery_timeout = \"2s\"\n\
         [ha]\nmode = \"{role}\"\nlisten = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\n\
         peer_smtp = \"127.0.0.1:{}\"\npassword = \"pair-secret\"\nheartbeat_interval = \"200ms\"\n\
         heartbeat_lost = 3\non_failure = \"slave\"\n[web]\nlisten = \"{web}\"\n",
        smtp[i], ha[i], ha[other], smtp[other]
    )
}

/// Polls `ha status` until it contains `text`.
fn wait_status(r: &Router, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out, _) = r.scratch.run(&["ha", "status"]);
        if out.contains(text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never {text:?}:\n{out}\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_ha_page_restores_the_primary_to_master() {
    let (smtp, ha, web) = (
        [free_port(), free_port()],
        [free_port(), free_port()],
        free_port(),
    );
    let (a, b, home) = tokio::task::block_in_place(|| {
        let mut home = RecordingSink::start("m1");
        home.down();
        let s = Scratch::new();
        let f = s.write(
            "c.toml",
            &format!(
                "[[server]]\nname = \"m1\"\ncluster = \"c\"\naddress = \"127.0.0.1:{}\"\n\n\
                 [[mailbox]]\naddress = \"u@c.test\"\nhome = \"m1\"\n",
                home.port
            ),
        );
        s.ok(&["catalog", "import", "--replace", &f.display().to_string()]);
        let mut a = Router::start_config(s, &ha_config(0, smtp, ha, web), smtp[0]);
        let b = Router::start_config(Scratch::new(), &ha_config(1, smtp, ha, web), smtp[1]);
        wait_status(&a, "effective:     MASTER");
        wait_status(&b, "effective:     SLAVE");
        // Catalog sync: the secondary holds the primary's catalog.
        let deadline = Instant::now() + Duration::from_secs(20);
        let home_addr = format!("127.0.0.1:{}", home.port);
        while !b
            .scratch
            .ok(&["catalog", "list", "servers"])
            .contains(&home_addr)
        {
            assert!(Instant::now() < deadline, "catalog never synced");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Mail held on the primary, the primary dies, the secondary takes over.
        let mut c = common::Client::hello(smtp[0]);
        c.cmd("MAIL FROM:<sender@x.test>");
        common::expect(&c.cmd("RCPT TO:<u@c.test>"), 250, "2.1.5");
        c.cmd("DATA");
        c.send_raw(b"Subject: held\r\n\r\n.\r\n");
        common::expect(&c.reply(), 250, "2.0.0");
        a.wait_log("decision=hold");
        a.kill9();
        wait_status(&b, "effective:     MASTER");
        home.up();
        // Back, the old primary is SLAVE and pushes its queue to the MASTER.
        a.restart();
        wait_status(&a, "effective:     SLAVE");
        wait_status(&a, "queue push:    1 pushed, 0 left");
        (a, b, home)
    });
    let c = Console { router: a, web };
    let driver = Driver::start();
    let br = browser(&driver).await;
    let session = br.clone();
    let result = tokio::spawn(async move {
        br.goto(&c.url("/login")).await.expect("login page");
        br.find(Locator::Id("password"))
            .await
            .expect("field")
            .send_keys(&c.initial_password())
            .await
            .expect("type");
        br.find(Locator::Id("login"))
            .await
            .expect("button")
            .click()
            .await
            .expect("log in");
        wait_text(&br, "HA mode").await;
        br.goto(&c.url("/ha")).await.expect("ha");
        let src = wait_text(&br, "queue push:    1 pushed, 0 left").await;
        assert!(src.contains("effective:     SLAVE"), "{src}");
        shot(&br, "20-ha-after-failover").await;
        br.find(Locator::Id("action-restore"))
            .await
            .expect("restore")
            .click()
            .await
            .expect("click");
        wait_text(&br, "Restore this unit").await;
        br.find(Locator::Id("confirm"))
            .await
            .expect("confirm")
            .click()
            .await
            .expect("confirm");
        let src = wait_text(&br, "configured mode restored: MASTER").await;
        assert!(src.contains("effective:     MASTER"), "{src}");
        shot(&br, "21-ha-restored").await;
        c
    })
    .await;
    let _ = session.close().await;
    let c = result.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    // The secondary sees the MASTER's higher epoch and yields.
    tokio::task::block_in_place(|| {
        wait_status(&b, "effective:     SLAVE");
        drop((c, b, home));
    });
}
