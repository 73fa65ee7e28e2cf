//! Catalog scale bench: generates an N-mailbox CSV (default 1,000,000), imports it
//! with the real import path, then times random lookups.
//!
//! Prints import seconds, lookups/s, lookup p50/p99 and peak RSS, with a baseline
//! measured in the same run: a `HashMap<String, _>` lookup over the same keys, the
//! fastest an in-memory index could be, so the catalog's ratio to it is shown.
//!
//! Then, while `clustermail serve` runs on that catalog, 20 SMTP sessions send
//! RCPT TO for random addresses (every RCPT is a catalog lookup): RCPT replies/s,
//! RCPT p50/p99 and the router's RSS.
//!
//! Also times a `--dry-run` of the same import, and merging 1 and 10,000 mailboxes
//! into the full catalog (as `catalog import` and as `Catalog::apply`, the
//! directory sync's path). Ends with a table of every figure beside its goal
//! (issue 16).
//!
//! Run: `cargo build --release && cargo run --release --bin catalog-bench -- [MAILBOXES] [LOOKUPS]`
//! (`CACHE_MB=N` sets sled's page cache for the lookup phase; default 64 as in config.)

use clustermail::catalog::{self, Catalog, Change, LocalPartMatch, Mailbox, Mode};

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A small deterministic PRNG (xorshift), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A scratch directory removed at the end of the run.
struct TempDir(std::path::PathBuf);
impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("clustermail-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Resets this process's peak RSS (VmHWM), so each phase reports its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A measured figure and its goal (issue 16), for the closing table.
struct Figure {
    name: &'static str,
    value: f64,
    unit: &'static str,
    /// The value must be below this (`at_least`: at least this).
    goal: f64,
    at_least: bool,
}

/// Prints `@fig NAME VALUE` for the parent process to collect.
fn report_figure(name: &str, value: f64) {
    println!("@fig {name} {value}");
}

/// The goals of issue 16, by figure name: (label, unit, goal, at_least).
const GOALS: &[(&str, &str, &str, f64, bool)] = &[
    ("import", "import --replace, 1M mailboxes", "s", 10.0, false),
    ("import_rss", "import peak RSS", "MB", 1024.0, false),
    ("dry_run", "import --replace --dry-run", "s", 5.0, false),
    (
        "lookup_p50",
        "lookup p50 (address or alias, mixed case)",
        "µs",
        2.0,
        false,
    ),
    ("lookup_p99", "lookup p99", "µs", 20.0, false),
    (
        "lookup_ratio",
        "lookups/s ÷ same-run HashMap",
        "",
        0.3,
        true,
    ),
    (
        "serve_start",
        "serve start-up (open to SMTP listening)",
        "s",
        2.0,
        false,
    ),
    (
        "serve_rss",
        "serve RSS after the RCPT lookups",
        "MB",
        300.0,
        false,
    ),
    (
        "merge_1",
        "merge 1 mailbox (catalog import)",
        "ms",
        100.0,
        false,
    ),
    (
        "merge_10k",
        "merge 10,000 mailboxes (catalog import)",
        "ms",
        1000.0,
        false,
    ),
    (
        "apply_1",
        "apply 1 mailbox (Catalog::apply)",
        "ms",
        100.0,
        false,
    ),
    (
        "apply_10k",
        "apply 10,000 mailboxes (Catalog::apply)",
        "ms",
        1000.0,
        false,
    ),
];

fn figures(values: &HashMap<String, f64>) -> Vec<Figure> {
    GOALS
        .iter()
        .map(|&(key, name, unit, goal, at_least)| Figure {
            name,
            value: values.get(key).copied().unwrap_or(f64::NAN),
            unit,
            goal,
            at_least,
        })
        .collect()
}

fn print_table(n: usize, figures: &[Figure]) {
    println!("\ncatalog-bench, {n} mailboxes: figure | measured | goal | met");
    for f in figures {
        let met = if f.at_least {
            f.value >= f.goal
        } else {
            f.value < f.goal
        };
        println!(
            "{:<44} | {:>10.2} {:<2} | {} {} {:<2} | {}",
            f.name,
            f.value,
            f.unit,
            if f.at_least { ">=" } else { "<" },
            f.goal,
            f.unit,
            if met { "yes" } else { "NO" }
        );
    }
}

/// `count` new mailboxes numbered from `first`, homed like the generated ones.
fn extra_mailboxes(first: usize, count: usize) -> Vec<Mailbox> {
    (first..first + count)
        .map(|i| Mailbox {
            address: format!("extra{i}@d{}.example.com", i % 50),
            home: "c0s0".into(),
            replicas: vec!["c0s1".into()],
            aliases: vec![format!("extra-alias{i}@d{}.example.com", i % 50)],
            failover: None,
            home_state: Default::default(),
            replica_states: vec![],
        })
        .collect()
}

/// Times a merge of `mailboxes` through `catalog import` (a CSV file) in ms.
fn time_merge(cat: &Catalog, dir: &std::path::Path, mailboxes: &[Mailbox]) -> anyhow::Result<f64> {
    let csv = dir.join(format!("merge-{}.csv", mailboxes.len()));
    let mut w = std::io::BufWriter::new(std::fs::File::create(&csv)?);
    writeln!(w, "address,home,replicas,aliases")?;
    for m in mailboxes {
        writeln!(
            w,
            "{},{},{},{}",
            m.address,
            m.home,
            m.replicas.join(";"),
            m.aliases.join(";")
        )?;
    }
    drop(w);
    let t = Instant::now();
    let input = catalog::read_files(&[csv]);
    let report = cat
        .import(input, Mode::Merge, false, &indicatif::ProgressBar::hidden())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(report.mailboxes.added == mailboxes.len() as u64);
    Ok(ms)
}

/// Times `Catalog::apply` of `mailboxes` (one batch, with a sync cookie) in ms.
fn time_apply(cat: &Catalog, mailboxes: Vec<Mailbox>) -> anyhow::Result<f64> {
    let n = mailboxes.len();
    let changes = mailboxes.into_iter().map(Change::PutMailbox).collect();
    let t = Instant::now();
    let report = cat.apply(changes, &[("bench.cookie", b"1")])?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(report.applied == n && report.rejected.is_empty());
    Ok(ms)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--lookups") {
        let (Some(dir), Some(n), Some(l)) = (args.get(2), args.get(3), args.get(4)) else {
            anyhow::bail!("usage: catalog-bench --lookups DATA_DIR MAILBOXES LOOKUPS");
        };
        return lookup_phase(std::path::Path::new(dir), n.parse()?, l.parse()?);
    }
    let n: usize = args
        .get(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let lookups: usize = args
        .get(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = TempDir::new()?;
    let servers_per_cluster = 10;
    let clusters = 4;

    let t = Instant::now();
    let mut toml = String::new();
    for c in 0..clusters {
        for s in 0..servers_per_cluster {
            toml.push_str(&format!(
                "[[server]]\nname = \"c{c}s{s}\"\ncluster = \"c{c}\"\naddress = \"127.0.0.1:{}\"\n\n",
                3000 + c * 100 + s
            ));
        }
    }
    let servers = dir.path().join("servers.toml");
    std::fs::write(&servers, toml)?;
    let csv = dir.path().join("mailboxes.csv");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&csv)?);
        writeln!(w, "address,home,replicas,aliases")?;
        for i in 0..n {
            let c = i % clusters;
            let h = (i / clusters) % servers_per_cluster;
            let r1 = (h + 1) % servers_per_cluster;
            let r2 = (h + 2) % servers_per_cluster;
            writeln!(
                w,
                "user{i}@d{}.example.com,c{c}s{h},c{c}s{r1};c{c}s{r2},alias{i}@d{}.example.com",
                i % 50,
                i % 50
            )?;
        }
    }
    println!(
        "generated {n} mailboxes in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let mut values: HashMap<String, f64> = HashMap::new();
    let db = catalog::open_db(&dir.path().join("data"), 64 << 20)?;
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive)?;
    let files = [servers, csv];
    let t = Instant::now();
    let input = catalog::read_files(&files);
    let report = cat
        .import(
            input,
            Mode::Replace,
            true,
            &indicatif::ProgressBar::hidden(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    values.insert("dry_run".into(), t.elapsed().as_secs_f64());
    println!(
        "dry run: {:.2} s, {} mailboxes to add; peak RSS {:.0} MB",
        t.elapsed().as_secs_f64(),
        report.mailboxes.added,
        peak_rss_mb()
    );
    reset_peak_rss();
    let t = Instant::now();
    let input = catalog::read_files(&files);
    let read = t.elapsed();
    let report = cat
        .import(
            input,
            Mode::Replace,
            false,
            &indicatif::ProgressBar::hidden(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let import = t.elapsed();
    println!(
        "import: {:.2} s (read+parse {:.2} s), {} mailboxes added; import process peak RSS {:.0} MB",
        import.as_secs_f64(),
        read.as_secs_f64(),
        report.mailboxes.added,
        peak_rss_mb()
    );
    values.insert("import".into(), import.as_secs_f64());
    values.insert("import_rss".into(), peak_rss_mb());
    for (key, first, count) in [("merge_1", 0, 1), ("merge_10k", 1, 10_000)] {
        let ms = time_merge(&cat, dir.path(), &extra_mailboxes(first, count))?;
        println!("{key}: {ms:.1} ms");
        values.insert(key.into(), ms);
    }
    for (key, first, count) in [("apply_1", 20_000, 1), ("apply_10k", 20_001, 10_000)] {
        let ms = time_apply(&cat, extra_mailboxes(first, count))?;
        println!("{key}: {ms:.1} ms");
        values.insert(key.into(), ms);
    }

    drop(cat);
    drop(db);
    // Lookups run in a fresh process, as a router serving from this catalog would:
    // its RSS is not inflated by what the import allocated and freed.
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--lookups",
            &dir.path().join("data").display().to_string(),
            &n.to_string(),
            &lookups.to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match line.strip_prefix("@fig ").and_then(|f| f.split_once(' ')) {
            Some((k, v)) => {
                values.insert(k.into(), v.parse().unwrap_or(f64::NAN));
            }
            None => println!("{line}"),
        }
    }
    anyhow::ensure!(out.status.success(), "lookup phase failed: {}", out.status);
    serving_phase(dir.path(), n, lookups.min(400_000), &mut values)?;
    print_table(n, &figures(&values));
    Ok(())
}

/// RCPT lookups through a running router: `rcpts` RCPT commands over 20 sessions.
fn serving_phase(
    dir: &std::path::Path,
    n: usize,
    rcpts: usize,
    values: &mut HashMap<String, f64>,
) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let exe = std::env::current_exe()?.with_file_name("clustermail");
    anyhow::ensure!(
        exe.exists(),
        "{} not built: cargo build --release first",
        exe.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nmax_connections_per_ip = 1000\n\
             [routing]\nprobe_interval = \"1h\"\n[web]\nlisten = \"\"\n",
            dir.join("data").display().to_string()
        ),
    )?;
    let mut router = std::process::Command::new(&exe)
        .args(["--config", &config.display().to_string(), "serve"])
        .env("RUST_LOG", "warn")
        .spawn()?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "router did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss = |field: &str| -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", router.id()))
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<f64>().ok())
                })
            })
            .unwrap_or(0.0)
            / 1024.0
    };
    values.insert("serve_start".into(), started.elapsed().as_secs_f64());
    println!(
        "serving: router listening after {:.2} s, RSS {:.0} MB",
        started.elapsed().as_secs_f64(),
        rss("VmRSS:")
    );
    let sessions = 20;
    let per = rcpts / sessions;
    let t = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|s| {
            std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, usize)> {
                let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
                stream.set_nodelay(true)?;
                let mut out = stream.try_clone()?;
                let mut input = BufReader::new(stream);
                let mut line = String::new();
                let mut reply =
                    |input: &mut BufReader<std::net::TcpStream>| -> anyhow::Result<u16> {
                        loop {
                            line.clear();
                            input.read_line(&mut line)?;
                            if line.as_bytes().get(3) != Some(&b'-') {
                                return Ok(line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0));
                            }
                        }
                    };
                reply(&mut input)?;
                write!(out, "EHLO bench.test\r\n")?;
                reply(&mut input)?;
                let mut rng = Rng(0x2545F4914F6CDD1D ^ (s as u64 + 1));
                let mut lat = Vec::with_capacity(per);
                let mut found = 0;
                for j in 0..per {
                    if j % 100 == 0 {
                        write!(out, "RSET\r\nMAIL FROM:<bench@x.test>\r\n")?;
                        reply(&mut input)?;
                        reply(&mut input)?;
                    }
                    let i = (rng.next() % n as u64) as usize;
                    let addr = if i.is_multiple_of(2) {
                        format!("User{i}@D{}.Example.com", i % 50)
                    } else {
                        format!("alias{i}@d{}.example.com", i % 50)
                    };
                    let sent = Instant::now();
                    write!(out, "RCPT TO:<{addr}>\r\n")?;
                    if reply(&mut input)? == 250 {
                        found += 1;
                    }
                    lat.push(sent.elapsed());
                }
                Ok((lat, found))
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(rcpts);
    let mut found = 0;
    for th in threads {
        let (l, f) = th
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        lat.extend(l);
        found += f;
    }
    let secs = t.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "serving: {} RCPT over {sessions} sessions in {secs:.2} s = {:.0} RCPT/s, p50 {:.0} us, p99 {:.0} us, \
         {found} found; router RSS {:.0} MB (peak {:.0} MB)",
        lat.len(),
        lat.len() as f64 / secs,
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6,
        rss("VmRSS:"),
        rss("VmHWM:")
    );
    values.insert("serve_rss".into(), rss("VmRSS:"));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &router.id().to_string()])
        .status();
    router.wait()?;
    Ok(())
}

/// The lookup phase: opens the catalog in `data` and times `lookups` random lookups.
fn lookup_phase(data: &std::path::Path, n: usize, lookups: usize) -> anyhow::Result<()> {
    let cache_mb: u64 = std::env::var("CACHE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let db = catalog::open_db(data, cache_mb << 20)?;
    let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive)?;
    println!(
        "lookup process: catalog opened, RSS {:.0} MB (sled cache {cache_mb} MB)",
        rss_mb()
    );
    // Random lookups, half by primary address and half by alias, mixed case.
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let keys: Vec<String> = (0..lookups)
        .map(|_| {
            let i = (rng.next() % n as u64) as usize;
            if i.is_multiple_of(2) {
                format!("User{i}@D{}.Example.com", i % 50)
            } else {
                format!("alias{i}@d{}.example.com", i % 50)
            }
        })
        .collect();
    let mut lat = Vec::with_capacity(lookups.min(200_000));
    let sample_every = (lookups / 200_000).max(1);
    let t = Instant::now();
    let mut found = 0usize;
    for (j, k) in keys.iter().enumerate() {
        if j % sample_every == 0 {
            let s = Instant::now();
            found += cat.lookup(k)?.is_some() as usize;
            lat.push(s.elapsed());
        } else {
            found += cat.lookup(k)?.is_some() as usize;
        }
    }
    let total = t.elapsed();
    anyhow::ensure!(
        found == lookups,
        "only {found} of {lookups} lookups found a mailbox"
    );
    lat.sort();
    let catalog_rate = lookups as f64 / total.as_secs_f64();

    // Baseline: an in-memory HashMap of lower-cased address → record index.
    let mut map: HashMap<String, u32> = HashMap::with_capacity(2 * n);
    for i in 0..n {
        map.insert(format!("user{i}@d{}.example.com", i % 50), i as u32);
        map.insert(format!("alias{i}@d{}.example.com", i % 50), i as u32);
    }
    let t = Instant::now();
    let mut hits = 0usize;
    for k in &keys {
        hits += map.contains_key(&k.to_lowercase()) as usize;
    }
    let base = t.elapsed();
    anyhow::ensure!(hits == lookups);
    let base_rate = lookups as f64 / base.as_secs_f64();
    drop(map);

    let serving_rss = rss_mb();
    println!(
        "lookups: {lookups} in {:.2} s = {:.0}/s, p50 {:.2} µs, p99 {:.2} µs; RSS after them {serving_rss:.0} MB",
        total.as_secs_f64(),
        catalog_rate,
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "baseline HashMap lookups: {:.0}/s; catalog/baseline = {:.2}",
        base_rate,
        catalog_rate / base_rate
    );
    println!("lookup process peak RSS: {:.0} MB", peak_rss_mb());
    report_figure("lookup_p50", percentile(&lat, 0.5).as_secs_f64() * 1e6);
    report_figure("lookup_p99", percentile(&lat, 0.99).as_secs_f64() * 1e6);
    report_figure("lookup_ratio", catalog_rate / base_rate);
    Ok(())
}
