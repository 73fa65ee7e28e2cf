//! `clustermail queue list|summary|show|retry|delete|release|bounce|hold|unhold`: the queue, through
//! the router's admin socket when it runs, else as stored. The actions are
//! `queue::control`'s; this module only parses ids and prints their results.

use super::Exit;
use crate::catalog::Catalog;
use crate::queue::control::{Control, Refused};
use crate::queue::view::{Filter, Summary, BUCKETS};
use crate::queue::{QueueId, Recipient, RecipientState, Spool};
use anyhow::Result;
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn age(received_at: u64) -> String {
    let then = UNIX_EPOCH + Duration::from_millis(received_at);
    let secs = SystemTime::now()
        .duration_since(then)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// A queue id from the command line; a bad one is reported on `err`.
/// The queued message named by `text`; None (and why, on `err`) when `text` is not
/// a queue id or no such message is queued.
fn find(spool: &Spool, text: &str, err: &mut dyn Write) -> Result<Option<crate::queue::Envelope>> {
    let id: QueueId = match text.parse() {
        Ok(id) => id,
        Err(e) => {
            writeln!(err, "{e}")?;
            return Ok(None);
        }
    };
    let env = spool.envelope(id)?;
    if env.is_none() {
        writeln!(err, "{id}: no such message in the queue")?;
    }
    Ok(env)
}

fn until(at_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(at_ms);
    let secs = at
        .duration_since(SystemTime::now())
        .map(|d| d.as_millis().div_ceil(1000) as u64)
        .unwrap_or(0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn short_state(s: &RecipientState) -> String {
    match s {
        RecipientState::Pending => "pending".into(),
        RecipientState::Held => "held".into(),
        RecipientState::Delivered { server, .. } => format!("delivered to {server}"),
        RecipientState::Failed { .. } => "failed".into(),
        RecipientState::Undeliverable { .. } => "undeliverable".into(),
        RecipientState::Paused => "paused".into(),
        RecipientState::OnHold => "on hold".into(),
    }
}

fn state_line(s: &RecipientState) -> String {
    match s {
        RecipientState::Pending => "pending".into(),
        RecipientState::Held => "held (retrying the home server only)".into(),
        RecipientState::Delivered { server, reply, .. } => {
            format!("delivered to {server}: {reply}")
        }
        RecipientState::Failed { reply, .. } => format!("failed: {reply}"),
        RecipientState::Undeliverable { reply, .. } => {
            format!("undeliverable, held for an administrator: {reply}")
        }
        RecipientState::Paused => "paused (its server is paused by an administrator)".into(),
        RecipientState::OnHold => "on hold (held by an administrator: `queue unhold`)".into(),
    }
}

/// One page of `queue list`: the filter, and where the page starts and ends.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub filter: Filter,
    /// Start after this id (the last of the previous page).
    pub after: Option<QueueId>,
    /// At most this many messages; 0: no limit.
    pub limit: usize,
}

/// Each recipient's destination server for the views: its catalog home (cached
/// per mailbox), `(outside)` for an address outside the catalog.
fn destination(catalog: Option<&Catalog>) -> impl FnMut(&Recipient) -> String + '_ {
    let mut homes: HashMap<String, String> = HashMap::new();
    move |r: &Recipient| {
        if let RecipientState::Delivered { server, .. } = &r.state {
            return server.clone();
        }
        if r.mailbox.is_empty() {
            return "(outside)".into();
        }
        if let Some(home) = homes.get(&r.mailbox) {
            return home.clone();
        }
        let home = catalog
            .and_then(|c| c.lookup(&r.mailbox).ok().flatten())
            .map_or_else(|| "(not in catalog)".to_string(), |l| l.home.name.clone());
        homes.insert(r.mailbox.clone(), home.clone());
        home
    }
}

/// `queue list`, every message, oldest first.
pub fn list(spool: &Spool, out: &mut dyn Write) -> Result<Exit> {
    list_page(spool, None, &Page::default(), out)
}

/// `queue list` with filters, one page, oldest first: reads envelopes one at a
/// time and stops at the end of the page.
pub fn list_page(
    spool: &Spool,
    catalog: Option<&Catalog>,
    page: &Page,
    out: &mut dyn Write,
) -> Result<Exit> {
    writeln!(
        out,
        "{:16}  {:>10}  {:>8}  {:30}  RECIPIENTS",
        "ID", "AGE", "SIZE", "SENDER"
    )?;
    let now = crate::queue::manager::now_ms();
    let mut server_of = destination(catalog);
    let (mut shown, mut last, mut more) = (0usize, None, false);
    for env in spool.scan_after(page.after) {
        let e = env?;
        if !page.filter.matches(&e, now, &mut server_of) {
            continue;
        }
        if page.limit > 0 && shown == page.limit {
            more = true;
            break;
        }
        write_entry(&e, out)?;
        shown += 1;
        last = Some(e.id);
    }
    writeln!(out, "{shown} message(s)")?;
    if let (true, Some(last)) = (more, last) {
        writeln!(out, "more: --after {last}")?;
    }
    Ok(Exit::Ok)
}

/// One message of `queue list`, with a line per recipient.
fn write_entry(e: &crate::queue::Envelope, out: &mut dyn Write) -> Result<()> {
    let rcpts: Vec<&str> = e.recipients.iter().map(|r| r.address.as_str()).collect();
    writeln!(
        out,
        "{}  {:>10}  {:>8}  {:30}  {}",
        e.id,
        age(e.received_at),
        e.size,
        format!("<{}>", e.sender.as_deref().unwrap_or("")),
        rcpts.join(", ")
    )?;
    // One line per recipient: its state, next attempt and last error.
    for r in &e.recipients {
        let mut line = format!("    <{}>: {}", r.address, short_state(&r.state));
        let waits = matches!(r.state, RecipientState::Pending | RecipientState::Held);
        if waits {
            if r.next_attempt > 0 {
                line.push_str(&format!(", next attempt in {}", until(r.next_attempt)));
            } else {
                line.push_str(", due now");
            }
        }
        if let Some(err) = &r.last_error {
            line.push_str(&format!(", last error: {err}"));
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// `queue summary`: open recipients by destination server and state, by age.
pub fn summary(spool: &Spool, catalog: Option<&Catalog>, out: &mut dyn Write) -> Result<Exit> {
    let now = crate::queue::manager::now_ms();
    let mut server_of = destination(catalog);
    let mut sum = Summary::default();
    for env in spool.scan_after(None) {
        sum.add(&env?, now, &mut server_of);
    }
    let mut header = format!("{:16} {:14} {:>7}", "SERVER", "STATE", "TOTAL");
    for (_, name) in BUCKETS {
        header.push_str(&format!(" {name:>7}"));
    }
    writeln!(out, "{header} {:>7}", "older")?;
    let row = |name: &str, state: &str, counts: &[usize]| {
        let mut line = format!("{name:16} {state:14} {:>7}", counts.iter().sum::<usize>());
        for n in counts {
            line.push_str(&format!(" {n:>7}"));
        }
        line
    };
    for ((server, state), counts) in &sum.rows {
        writeln!(out, "{}", row(server, state, counts))?;
    }
    writeln!(out, "{}", row("TOTAL", "", &sum.totals()))?;
    writeln!(
        out,
        "{} message(s); counts are recipients, by the age of their message",
        sum.messages
    )?;
    Ok(Exit::Ok)
}

pub fn show(
    spool: &Spool,
    id: &str,
    raw: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Exit> {
    let Some(env) = find(spool, id, err)? else {
        return Ok(Exit::Invalid);
    };
    let Some(message) = spool.message(env.id)? else {
        writeln!(err, "{}: no such message in the queue", env.id)?;
        return Ok(Exit::Invalid);
    };
    if raw {
        out.write_all(&message)?;
        return Ok(Exit::Ok);
    }
    let out = &mut crate::logging::TerminalSafe(out);
    writeln!(out, "id:        {}", env.id)?;
    writeln!(out, "sender:    <{}>", env.sender.as_deref().unwrap_or(""))?;
    writeln!(out, "client:    {} (HELO {})", env.client_ip, env.helo)?;
    writeln!(out, "received:  {} ago", age(env.received_at))?;
    writeln!(out, "size:      {} octets", env.size)?;
    for r in &env.recipients {
        writeln!(
            out,
            "recipient: <{}> (mailbox {}): {}",
            r.address,
            r.mailbox,
            state_line(&r.state)
        )?;
        writeln!(out, "  attempts: {}", r.attempts)?;
        // Paused and on-hold recipients make no attempt until an administrator acts.
        let waits = matches!(r.state, RecipientState::Pending | RecipientState::Held);
        if r.next_attempt > 0 && waits {
            writeln!(out, "  next attempt: in {}", until(r.next_attempt))?;
        }
        if let Some(e) = &r.last_error {
            writeln!(out, "  last error: {e}")?;
        }
        if let Some(route) = &r.last_route {
            for line in route.lines() {
                writeln!(out, "  {line}")?;
            }
        }
    }
    Ok(Exit::Ok)
}

/// A queue id from the command line; None (and why, on `err`) if it is not one.
fn parse_id(text: &str, err: &mut dyn Write) -> Result<Option<QueueId>> {
    match text.parse() {
        Ok(id) => Ok(Some(id)),
        Err(e) => {
            writeln!(err, "{e}")?;
            Ok(None)
        }
    }
}

/// Prints an action's refusal; its exit code (a store failure is an error).
fn refused(r: Refused, err: &mut dyn Write) -> Result<Exit> {
    let exit = match r {
        Refused::Store(e) => return Err(e),
        Refused::InDelivery(..) => Exit::Failed,
        Refused::NoSuchMessage(_)
        | Refused::LeftQueue(_)
        | Refused::NothingUndeliverable(..)
        | Refused::NothingOpen(..) => Exit::Invalid,
    };
    writeln!(err, "{r}")?;
    Ok(exit)
}

/// One action on one message (`queue delete|release|bounce|hold|unhold|retry
/// ID`): parses `text`, runs `act`, and prints what `said` makes of its result,
/// or why it was refused.
async fn act_on<T, F>(
    text: &str,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
    act: impl FnOnce(QueueId) -> F,
    said: impl FnOnce(QueueId, T) -> String,
) -> Result<Exit>
where
    F: std::future::Future<Output = std::result::Result<T, Refused>>,
{
    let Some(id) = parse_id(text, err)? else {
        return Ok(Exit::Invalid);
    };
    match act(id).await {
        Ok(v) => {
            writeln!(out, "{}", said(id, v))?;
            Ok(Exit::Ok)
        }
        Err(r) => refused(r, err),
    }
}

/// `queue retry ID|--all`: makes every open recipient due now and wakes the
/// queue manager. Held recipients stay held: their retry goes to the home only.
pub async fn retry(
    control: &Control,
    id: Option<&str>,
    all: bool,
    wait: Duration,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    if all {
        let done = match control.retry_all(wait).await {
            Ok(done) => done,
            Err(r) => return refused(r, err),
        };
        writeln!(out, "{} message(s) due for delivery now", done.due)?;
        if done.in_delivery.is_empty() {
            return Ok(Exit::Ok);
        }
        let ids: Vec<String> = done.in_delivery.iter().map(|i| i.to_string()).collect();
        writeln!(
            err,
            "{} message(s) still being delivered after waiting {}, left as they are: {}",
            ids.len(),
            humantime::format_duration(wait),
            ids.join(" ")
        )?;
        return Ok(Exit::Failed);
    }
    let Some(text) = id else {
        writeln!(err, "give a queue id or --all")?;
        return Ok(Exit::Invalid);
    };
    act_on(
        text,
        out,
        err,
        |id| control.retry(id, wait),
        |_, due| format!("{} message(s) due for delivery now", usize::from(due)),
    )
    .await
}

/// `queue delete ID`: drops a message (no bounce).
pub async fn delete(
    control: &Control,
    id: &str,
    wait: Duration,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    act_on(
        id,
        out,
        err,
        |id| control.delete(id, wait),
        |id, ()| format!("{id} deleted"),
    )
    .await
}

/// `queue release ID`: undeliverable recipients are routed again, with a new
/// lifetime (they had expired, or been refused and the cause may be fixed).
pub async fn release(
    control: &Control,
    id: &str,
    lifetime: Duration,
    wait: Duration,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    act_on(
        id,
        out,
        err,
        |id| control.release(id, lifetime, wait),
        |id, n| format!("{id}: {n} recipient(s) released for delivery"),
    )
    .await
}

/// `queue bounce ID`: undeliverable recipients fail now; the bounce goes out.
pub async fn bounce(
    control: &Control,
    id: &str,
    wait: Duration,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    act_on(
        id,
        out,
        err,
        |id| control.bounce(id, wait),
        |id, n| format!("{id}: {n} recipient(s) will bounce"),
    )
    .await
}

/// `queue hold ID`: the message is never attempted until `queue unhold`; it
/// still expires.
pub async fn hold(
    control: &Control,
    id: &str,
    wait: Duration,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    act_on(
        id,
        out,
        err,
        |id| control.hold(id, wait),
        |id, _| format!("{id}: on hold (held by an administrator)"),
    )
    .await
}

/// `queue unhold ID`: released from the administrator's hold, due now.
pub async fn unhold(
    control: &Control,
    id: &str,
    wait: Duration,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Exit> {
    act_on(
        id,
        out,
        err,
        |id| control.unhold(id, wait),
        |id, _| format!("{id}: released from hold, due now"),
    )
    .await
}

impl From<&crate::cli::ListArgs> for Page {
    fn from(a: &crate::cli::ListArgs) -> Page {
        Page {
            filter: crate::queue::view::Filter {
                server: a.server.clone(),
                state: a.state.clone(),
                from: a.from.clone(),
                to: a.to.clone(),
                older_than_ms: a.older_than.map(|d| d.as_millis() as u64),
            },
            after: a.after,
            limit: a.limit,
        }
    }
}
