//! `clustermail servers [pause|resume NAME]` and `clustermail route explain
//! ADDRESS`: the router's view of server availability, the administrator's pause
//! of a server, and what the router would do with mail now, and why.

use super::Exit;
use crate::admin::Context;
use crate::queue::control::Control;
use crate::route::{self, Attempt};
use anyhow::Result;
use std::collections::HashMap;
use std::io::Write;
use std::time::SystemTime;

/// Open (not yet delivered or failed) recipients per home server.
fn queued_per_home(ctx: &Context) -> Result<HashMap<String, usize>> {
    let mut counts = HashMap::new();
    for env in ctx.spool.envelopes()? {
        for r in env.recipients.iter().filter(|r| !r.state.is_final()) {
            if let Some(l) = ctx.catalog.lookup(&r.mailbox)? {
                *counts.entry(l.home.name.to_lowercase()).or_insert(0) += 1;
            }
        }
    }
    Ok(counts)
}

/// One server as `clustermail servers` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerRow {
    pub name: String,
    pub cluster: String,
    pub admin_state: String,
    pub availability: String,
    pub index: u8,
    /// Seconds since the last probe; None: never probed.
    pub probed_secs_ago: Option<u64>,
    pub rtt_ms: Option<u64>,
    /// Open recipients homed on it.
    pub queued: usize,
    /// Paused by an administrator (`servers pause`): no deliveries to it.
    pub paused: bool,
    pub problem: Option<String>,
}

/// The data of `clustermail servers`: every catalog server, its state and health.
pub fn server_rows(ctx: &Context) -> Result<Vec<ServerRow>> {
    let queued = queued_per_home(ctx)?;
    let tracker = ctx
        .tracker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(ctx
        .catalog
        .servers(None)
        .into_iter()
        .map(|s| {
            let h = tracker.health(&s.name);
            ServerRow {
                availability: tracker.of(&s).to_string(),
                index: h.index,
                probed_secs_ago: h
                    .last_probe
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .map(|d| d.as_secs()),
                rtt_ms: h.last_rtt.map(|d| d.as_millis() as u64),
                queued: queued.get(&s.name.to_lowercase()).copied().unwrap_or(0),
                paused: ctx.spool.pauses().is_paused(&s.name),
                problem: problem(&tracker, &s, ctx.spool.pauses().is_paused(&s.name)),
                admin_state: s.state.as_str().to_string(),
                name: s.name,
                cluster: s.cluster,
            }
        })
        .collect())
}

pub fn servers(ctx: &Context, out: &mut dyn Write) -> Result<Exit> {
    writeln!(
        out,
        "{:16} {:10} {:15} {:6} {:>5} {:>10} {:>8} {:>6}  PROBLEM",
        "SERVER", "CLUSTER", "ADMIN", "AVAIL", "INDEX", "PROBED", "RTT", "QUEUED"
    )?;
    for s in server_rows(ctx)? {
        let probed = s
            .probed_secs_ago
            .map(|d| format!("{d}s ago"))
            .unwrap_or_else(|| "never".into());
        let rtt = s
            .rtt_ms
            .map(|d| format!("{d}ms"))
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:16} {:10} {:15} {:6} {:>5} {:>10} {:>8} {:>6}  {}",
            s.name,
            s.cluster,
            s.admin_state,
            s.availability,
            s.index,
            probed,
            rtt,
            s.queued,
            s.problem.unwrap_or_default()
        )?;
    }
    if !ctx.live {
        writeln!(
            out,
            "(router not running: availability from a probe made just now)"
        )?;
    }
    if let Some(line) = crate::directory::status::summary_line() {
        writeln!(out, "{line}")?;
    }
    Ok(Exit::Ok)
}

/// The PROBLEM column: the administrator's pause first, then the tracker's view.
fn problem(
    tracker: &crate::health::Tracker,
    s: &crate::catalog::Server,
    paused: bool,
) -> Option<String> {
    let seen = tracker.problem(s);
    match (paused, seen) {
        (false, seen) => seen,
        (true, None) => Some("paused by an administrator".into()),
        (true, Some(seen)) => Some(format!("paused by an administrator; {seen}")),
    }
}

/// `servers pause NAME`: no deliveries to a catalog server; its mail waits.
pub async fn pause(
    ctx: &Context,
    control: &Control,
    name: &str,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    let Some(server) = ctx.catalog.server(name) else {
        writeln!(err, "{name}: no such server in the catalog")?;
        return Ok(Exit::Invalid);
    };
    match control.pause(&server.name).await {
        Ok(_) => writeln!(out, "{}: paused", server.name)?,
        Err(e) => return Err(anyhow::anyhow!("{e}")),
    }
    Ok(Exit::Ok)
}

/// `servers resume NAME`: deliveries again; its paused mail is due now. A name
/// no longer in the catalog may be resumed (its pause lifted).
pub async fn resume(
    ctx: &Context,
    control: &Control,
    name: &str,
    wait: std::time::Duration,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    let name = ctx
        .catalog
        .server(name)
        .map_or(name.to_string(), |s| s.name.clone());
    match control.resume(&name, wait).await {
        Ok(true) => writeln!(out, "{name}: in service (resumed)")?,
        Ok(false) => {
            writeln!(err, "{name}: not paused")?;
            return Ok(Exit::Invalid);
        }
        Err(e) => return Err(anyhow::anyhow!("{e}")),
    }
    Ok(Exit::Ok)
}

pub fn explain(
    ctx: &Context,
    address: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Exit> {
    let Some(entry) = ctx.catalog.lookup(address)? else {
        writeln!(
            err,
            "{address}: not a catalog address; RCPT gets 550 5.1.1 in a served domain, else 550 5.7.1"
        )?;
        return Ok(Exit::Invalid);
    };
    let policy = ctx.routing.get().policy();
    let routers = ctx
        .catalog
        .cluster(&entry.home.cluster)?
        .map(|c| c.routers)
        .unwrap_or_default();
    let tracker = ctx
        .tracker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let avail = |s: &crate::catalog::Server| tracker.of(s);
    let first = route::decide(&entry, &avail, &policy, Attempt::First, &[], &routers);
    writeln!(
        out,
        "mailbox {} (cluster {})",
        entry.mailbox.address, entry.home.cluster
    )?;
    writeln!(out, "new mail: {}", first.why().trim_end())?;
    let retry = route::decide(&entry, &avail, &policy, Attempt::Retry, &[], &routers);
    if retry.decision != first.decision {
        writeln!(out, "held mail: {}", retry.reason)?;
    }
    let routing = ctx.routing.get();
    if let Some(relay) = &routing.fallback_relay {
        writeln!(
            out,
            "fallback: mail held longer than {} goes to fallback relay {relay} (routing.fallback_relay)",
            humantime::format_duration(routing.fallback_after)
        )?;
    }
    Ok(Exit::Ok)
}
