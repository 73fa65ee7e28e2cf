//! The web console in a real browser: headless Chromium driven through
//! WebDriver (chromedriver). Logs in with the initial password, finds the servers
//! on the dashboard, finds a held message in /queue, opens and retries it, and
//! saves a screenshot of every page under `target/web-screenshots/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (test.sh installs them); without
//! them this test fails and says so.

mod common;
mod console;

use console::Console;
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::PathBuf;
use std::time::Duration;

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
    let result = async {
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
        b.goto(&c.url("/ha")).await.expect("ha");
        wait_text(&b, "not one of an HA pair").await;
        shot(&b, "10-ha").await;
        // The dashboard refreshes itself (the script polls /live).
        b.goto(&c.url("/")).await.expect("dashboard");
        tokio::time::sleep(Duration::from_secs(6)).await;
        shot(&b, "11-dashboard-refreshed").await;
    }
    .await;
    b.close().await.expect("close the browser");
    result
}
