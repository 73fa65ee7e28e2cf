//! `clustermail demo`: the example cluster on loopback, with a failover and a hold
//! acted out and printed as a timeline.
//!
//! It starts a [`sink::MaildirServer`] for each server of the built-in example
//! catalog (on free loopback ports), a router on the same code path as `serve`
//! (in this process, with its own store and admin socket under the demo
//! directory), then for alice@east.example.com (home mail-east-1, replicas
//! mail-east-2 and mail-east-3):
//!
//! 1. home up: the mail lands on the home;
//! 2. home stopped: it fails over to the first replica;
//! 3. home and every replica stopped: it is held and retried on the home only;
//! 4. home started again: the held mail lands on the home.
//!
//! Everything the demo observes it reads from the Maildirs and from the router's
//! admin socket and metrics endpoint, as an administrator would.

pub mod sink;

use crate::admin::socket;
use crate::catalog::files;
use crate::config::Config;
use anyhow::{anyhow, bail, Context, Result};
use sink::MaildirServer;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Marks a directory as the demo's own, so that a re-run may wipe it.
const MARKER: &str = ".clustermail-demo";
const MAILBOX: &str = "alice@east.example.com";
const HOME: &str = "mail-east-1";
const REPLICAS: [&str; 2] = ["mail-east-2", "mail-east-3"];
/// How long any one step may take before the demo gives up.
const STEP_LIMIT: Duration = Duration::from_secs(30);

/// Where one demo message landed.
#[derive(Debug, Clone)]
pub struct Landed {
    pub step: &'static str,
    pub server: String,
    pub file: PathBuf,
}

struct Timeline<'a> {
    started: Instant,
    out: &'a mut dyn Write,
}

impl Timeline<'_> {
    fn say(&mut self, what: impl AsRef<str>) -> Result<()> {
        let t = self.started.elapsed().as_secs_f64();
        writeln!(self.out, "[{t:5.1}s] {}", what.as_ref())?;
        self.out.flush()?;
        Ok(())
    }
}

/// Prepares `dir` (wiping an earlier demo there), refusing a directory that is
/// not the demo's.
fn prepare(dir: &Path) -> Result<()> {
    if dir.exists() {
        let ours = dir.join(MARKER).exists();
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("{}", dir.display()))?
            .next()
            .is_none();
        if !ours && !empty {
            bail!(
                "{} exists and is not a demo directory (no {MARKER} file): choose another with --dir",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        "clustermail demo directory: wiped by the next demo\n",
    )?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs the demo in `dir`; prints the timeline on `out`; returns where each
/// message landed.
/// With `web`, the cluster keeps running after the timeline, with the router's
/// web console, until Ctrl-C.
pub async fn run(dir: &Path, out: &mut dyn Write, web: bool) -> Result<Vec<Landed>> {
    prepare(dir)?;
    let mut t = Timeline {
        started: Instant::now(),
        out,
    };
    let maildir = dir.join("maildir");
    let (mut servers, catalog_file) = start_servers(&mut t, dir, &maildir).await?;
    let mut r = start_router(&mut t, dir, web).await?;
    import_catalog(&mut t, &r.store, &catalog_file, &servers).await?;
    let landed = script(&mut t, &mut servers, r.smtp, &r.store, &maildir).await;
    if web && landed.is_ok() {
        keep_running(&mut t, &r.console, &r.store, r.smtp).await?;
    }
    let counters = r.stop(&mut servers).await?;
    let landed = landed?;
    report(&mut t, &landed, &counters, &r.config_file)?;
    Ok(landed)
}

/// The mailbox servers of the example catalog, each on a free loopback port with
/// a Maildir of its own; the catalog rewritten with those ports, in `dir`.
async fn start_servers(
    t: &mut Timeline<'_>,
    dir: &Path,
    maildir: &Path,
) -> Result<(Vec<MaildirServer>, std::path::PathBuf)> {
    // The example catalog, each server moved to a free loopback port.
    let input = files::read_text(
        "catalog/example.toml (built in)",
        files::Format::Toml,
        crate::router::EXAMPLE_CATALOG,
    );
    let mut servers = Vec::new();
    let mut catalog_text = crate::router::EXAMPLE_CATALOG.to_string();
    for row in &input.servers {
        let s = &row.item;
        let server = MaildirServer::start(
            &s.name,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            maildir.join(&s.name),
        )
        .await
        .with_context(|| format!("starting mailbox server {}", s.name))?;
        let (old, new) = (
            format!("address = \"{}\"", s.address),
            format!("address = \"{}\"", server.addr),
        );
        if catalog_text.matches(&old).count() != 1 {
            bail!("the example catalog has no single line {old}");
        }
        catalog_text = catalog_text.replace(&old, &new);
        servers.push(server);
    }
    let catalog_file = dir.join("catalog.toml");
    std::fs::write(&catalog_file, &catalog_text)?;
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("{} {}", s.name, s.addr))
        .collect();
    t.say(format!(
        "{} mailbox servers up (Maildirs under {}): {}",
        servers.len(),
        maildir.display(),
        list.join(", ")
    ))?;

    Ok((servers, catalog_file))
}

/// The demo's router, running in this process.
struct DemoRouter {
    smtp: u16,
    metrics: u16,
    console: String,
    store: std::path::PathBuf,
    config_file: std::path::PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// The router: its own store, SMTP port and metrics port; quick probes and retries.
async fn start_router(t: &mut Timeline<'_>, dir: &Path, web: bool) -> Result<DemoRouter> {
    let (smtp, metrics) = (free_port()?, free_port()?);
    let console = if web {
        format!("127.0.0.1:{}", free_port()?)
    } else {
        String::new()
    };
    let store = dir.join("store");
    let config_file = dir.join("clustermail.toml");
    std::fs::write(
        &config_file,
        format!(
            "# Written by `clustermail demo`.\nrouter_name = \"router.demo.test\"\n\
             data_dir = {store:?}\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
             [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n\
             [routing]\nprobe_interval = \"500ms\"\nprobe_timeout = \"1s\"\nrise = 1\n\
             retry_initial = \"1s\"\nretry_max = \"2s\"\ndelivery_timeout = \"5s\"\n\
             [web]\nlisten = \"{console}\"\n",
            store = store.display().to_string()
        ),
    )?;
    let (config, source) = Config::load(Some(&config_file))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut router = tokio::spawn(crate::router::run(config, source, stopped));
    let listening = wait_until(|| async {
        if router.is_finished() {
            return Some(false);
        }
        TcpStream::connect(("127.0.0.1", smtp))
            .await
            .ok()
            .map(|_| true)
    })
    .await?;
    if !listening {
        return match (&mut router).await {
            Ok(Err(e)) => Err(e.context("the router did not start")),
            _ => Err(anyhow!("the router did not start")),
        };
    }
    t.say(format!(
        "router listening on 127.0.0.1:{smtp} (metrics on 127.0.0.1:{metrics}, config {})",
        config_file.display()
    ))?;
    Ok(DemoRouter {
        smtp,
        metrics,
        console,
        store,
        config_file,
        stop,
        task: router,
    })
}

/// The catalog, as an administrator imports it: through the admin socket; then
/// waits until every server shows up.
async fn import_catalog(
    t: &mut Timeline<'_>,
    store: &Path,
    catalog_file: &Path,
    servers: &[MaildirServer],
) -> Result<()> {
    let file = catalog_file.display().to_string();
    admin(store, &["catalog", "import", "--replace", &file]).await?;
    // Until the probes have seen the servers at their new addresses, routing would
    // act on what it knew of the old ones: wait, as an administrator would.
    let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
    let table = wait_until(|| async {
        let table = admin(store, &["servers"]).await.ok()?;
        let up = |name: &String| {
            table.lines().any(|l| {
                let mut f = l.split_whitespace();
                f.next() == Some(name.as_str()) && f.nth(2) == Some("up")
            })
        };
        names.iter().all(up).then_some(table)
    })
    .await
    .context("the mailbox servers never showed up")?;
    t.say(format!(
        "catalog imported from {}; every server up:\n{}",
        catalog_file.display(),
        table.trim_end()
    ))?;
    Ok(())
}

impl DemoRouter {
    /// Stops the router and the mailbox servers, whatever happened; the metrics
    /// scraped just before.
    async fn stop(&mut self, servers: &mut [MaildirServer]) -> Result<String> {
        let counters = scrape(self.metrics).await.unwrap_or_default();
        let _ = self.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(40), &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e.context("the router failed")),
            Ok(Err(e)) => bail!("the router task failed: {e}"),
            Err(_) => bail!("the router did not stop within 40 s"),
        }
        for s in servers.iter_mut() {
            s.down().await;
        }
        Ok(counters)
    }
}

/// Where the mail landed, the metrics at the end, how to read the kept store.
fn report(
    t: &mut Timeline<'_>,
    landed: &[Landed],
    counters: &str,
    config_file: &Path,
) -> Result<()> {
    t.say("router and mailbox servers stopped")?;
    writeln!(t.out, "\nWhere the mail landed:")?;
    for l in landed {
        writeln!(
            t.out,
            "  {:28} {:12} {}",
            l.step,
            l.server,
            l.file.display()
        )?;
    }
    if !counters.is_empty() {
        writeln!(t.out, "\nMetrics at the end (GET /metrics):")?;
        for line in counters.lines().filter(|l| {
            l.starts_with("clustermail_messages_accepted_total")
                || l.starts_with("clustermail_recipients_delivered_total")
                || l.starts_with("clustermail_recipients_held_total")
                || l.starts_with("clustermail_routing_decisions_total")
        }) {
            writeln!(t.out, "  {line}")?;
        }
    }
    writeln!(
        t.out,
        "\nThe demo's store is kept: `clustermail --config {} servers` (or `queue list`, \
         `route explain {MAILBOX}`) reads it.",
        config_file.display()
    )?;
    Ok(())
}

/// `demo --web`: the console's URL and password, then waits for Ctrl-C.
async fn keep_running(t: &mut Timeline<'_>, console: &str, store: &Path, smtp: u16) -> Result<()> {
    let file = store.join(crate::admin::users::INITIAL_PASSWORD_FILE);
    let password = std::fs::read_to_string(&file)
        .with_context(|| format!("the console's password file {}", file.display()))?;
    t.say(format!(
        "the cluster keeps running: web console http://{console}/ (user admin, password {}); \
         send more mail to 127.0.0.1:{smtp}; Ctrl-C stops the demo",
        password.trim()
    ))?;
    tokio::signal::ctrl_c().await?;
    t.say("Ctrl-C: stopping")?;
    Ok(())
}

/// The four acts; returns where each message landed.
async fn script(
    t: &mut Timeline<'_>,
    servers: &mut [MaildirServer],
    smtp: u16,
    store: &Path,
    maildir: &Path,
) -> Result<Vec<Landed>> {
    let mut landed = Vec::new();
    let index = |name: &str| {
        servers
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| anyhow!("{name} is not in the example catalog"))
    };
    let (home, replicas) = (index(HOME)?, [index(REPLICAS[0])?, index(REPLICAS[1])?]);

    // 1. Home up.
    let subject = "demo 1: home up";
    let id = send(smtp, subject).await?;
    t.say(format!(
        "sent \"{subject}\" to {MAILBOX} (home {HOME}, replicas {}): queued as {id}",
        REPLICAS.join(", ")
    ))?;
    let l = arrival(maildir, subject).await?;
    t.say(format!("  delivered to the home {}", l.server))?;
    landed.push(l);

    // 2. Home down: failover.
    servers[home].down().await;
    t.say(format!("stopped {HOME} (alice's home)"))?;
    let subject = "demo 2: home down";
    let id = send(smtp, subject).await?;
    t.say(format!("sent \"{subject}\": queued as {id}"))?;
    let l = arrival(maildir, subject).await?;
    t.say(format!("  failed over to the replica {}", l.server))?;
    landed.push(l);

    // 3. Home and replicas down: hold.
    for &r in &replicas {
        servers[r].down().await;
    }
    t.say(format!(
        "stopped {} (every replica)",
        REPLICAS.join(" and ")
    ))?;
    let subject = "demo 3: all down, held";
    let id = send(smtp, subject).await?;
    t.say(format!("sent \"{subject}\": queued as {id}"))?;
    let shown = wait_until(|| async {
        let s = admin(store, &["queue", "show", &id]).await.ok()?;
        s.contains("held (retrying the home server only)")
            .then_some(s)
    })
    .await
    .context("the message was never held")?;
    let next = shown
        .lines()
        .find(|l| l.trim_start().starts_with("next attempt:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    t.say(format!(
        "  held in the queue, retrying the home {HOME} only without failover ({next})"
    ))?;

    // 4. Home back: the held message goes home.
    servers[home].up().await?;
    t.say(format!("started {HOME} again"))?;
    let l = arrival(maildir, subject).await?;
    t.say(format!(
        "  the held message was delivered to the home {}",
        l.server
    ))?;
    landed.push(l);
    // The router commits the delivery just after the server's 250: wait for it.
    wait_until(|| async {
        let list = admin(store, &["queue", "list"]).await.ok()?;
        list.lines()
            .any(|l| l.trim() == "0 message(s)")
            .then_some(())
    })
    .await
    .context("the queue never emptied")?;
    t.say("queue empty: every message delivered")?;
    Ok(landed)
}

/// Polls `f` every 50 ms until it gives a value, for at most [`STEP_LIMIT`].
async fn wait_until<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP_LIMIT;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("gave up after {} s", STEP_LIMIT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the message with `subject` to land in one of alice's Maildirs.
async fn arrival(maildir: &Path, subject: &'static str) -> Result<Landed> {
    let needle = format!("Subject: {subject}\r\n");
    wait_until(|| async {
        let servers = std::fs::read_dir(maildir).ok()?;
        for server in servers.flatten() {
            let new = server.path().join(sink::folder(MAILBOX)).join("new");
            for file in std::fs::read_dir(&new).into_iter().flatten().flatten() {
                let text = std::fs::read(file.path()).unwrap_or_default();
                if String::from_utf8_lossy(&text).contains(&needle) {
                    return Some(Landed {
                        step: subject,
                        server: server.file_name().to_string_lossy().into_owned(),
                        file: file.path(),
                    });
                }
            }
        }
        None
    })
    .await
    .with_context(|| format!("\"{subject}\" never reached a Maildir"))
}

/// Runs an admin command against the demo router; its standard output.
async fn admin(store: &Path, args: &[&str]) -> Result<String> {
    let store = store.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let reply = tokio::task::spawn_blocking(move || socket::request(&store, &args))
        .await
        .map_err(|e| anyhow!("admin request failed: {e}"))??
        .ok_or_else(|| anyhow!("the router's admin socket is gone"))?;
    if reply.code != 0 {
        bail!("{}", String::from_utf8_lossy(&reply.stderr));
    }
    Ok(String::from_utf8_lossy(&reply.stdout).into_owned())
}

/// Sends one message for alice through the router; the queue id from the 250.
async fn send(port: u16, subject: &str) -> Result<String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut s = BufReader::new(stream);
    expect(&mut s, None, "220").await?;
    expect(&mut s, Some("EHLO demo.client.test\r\n"), "250").await?;
    expect(&mut s, Some("MAIL FROM:<demo@client.test>\r\n"), "250").await?;
    expect(&mut s, Some(&format!("RCPT TO:<{MAILBOX}>\r\n")), "250").await?;
    expect(&mut s, Some("DATA\r\n"), "354").await?;
    let message = format!(
        "From: <demo@client.test>\r\nTo: <{MAILBOX}>\r\nSubject: {subject}\r\n\
         Message-ID: <{}.{}@client.test>\r\n\r\nSent by clustermail demo.\r\n.\r\n",
        std::process::id(),
        subject.replace([' ', ':', ','], "-")
    );
    let done = expect(&mut s, Some(&message), "250").await?;
    let _ = s.get_mut().write_all(b"QUIT\r\n").await;
    done.trim_end()
        .rsplit(' ')
        .next()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no queue id in {done:?}"))
}

/// Sends `send` (if any), reads a reply and checks its code; the reply's last line.
async fn expect(s: &mut BufReader<TcpStream>, send: Option<&str>, code: &str) -> Result<String> {
    if let Some(line) = send {
        s.get_mut().write_all(line.as_bytes()).await?;
    }
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await? == 0 {
            bail!("the router closed the connection");
        }
        if line.as_bytes().get(3) == Some(&b'-') {
            continue;
        }
        if !line.starts_with(code) {
            bail!("expected {code}, got {}", line.trim_end());
        }
        return Ok(line);
    }
}

/// The router's metrics text.
async fn scrape(port: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text)).await??;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}
