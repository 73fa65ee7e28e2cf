//! Message tracking (Domino's message tracking, Stalwart's delivery history): a
//! bounded history, in the store's `track` tree, of each message — when it was
//! accepted (client, queue id, size, sender, recipients, Message-ID), every
//! delivery attempt (server, decision, outcome, reply, TLS) or hold, and how each
//! recipient ended (delivered, failed or expired, deleted by an administrator).
//! Fed from the accept and delivery log points; kept `tracking.retention` after a
//! message's last event, pruned in the background; read by `clustermail track`.
//!
//! Recording never fails a transaction or a delivery: a store error is logged.

use super::{Envelope, QueueId};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The most events kept per message (a message retried for days stays bounded:
/// the oldest attempts go first).
const MAX_EVENTS: usize = 200;
/// The longest text kept from a peer (a Message-ID, a server's reply, a HELO):
/// RFC 5322's line limit. A record is rewritten at every event, so what a sender
/// puts in it must stay small.
const MAX_TEXT: usize = 998;
/// How often old records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// How a message was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub at: u64,
    pub client: String,
    pub helo: String,
    pub from: String,
    pub to: Vec<String>,
    pub size: u64,
    pub message_id: Option<String>,
}

/// Something that happened to one recipient (or, for `Deleted`, the message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum What {
    Attempt {
        server: String,
        decision: String,
        outcome: String,
        reply: String,
        tls: Option<String>,
    },
    /// Routing held the recipient without trying a server (its home unusable).
    Held {
        why: String,
    },
    Delivered {
        server: String,
    },
    Failed {
        reply: String,
    },
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at: u64,
    pub rcpt: String,
    pub what: What,
}

/// One message's history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub accepted: Option<Accepted>,
    pub events: Vec<Event>,
}

impl Record {
    fn last_at(&self) -> u64 {
        let accepted = self.accepted.as_ref().map_or(0, |a| a.at);
        self.events.iter().map(|e| e.at).fold(accepted, u64::max)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn tree(db: &sled::Db) -> sled::Result<sled::Tree> {
    db.open_tree("track")
}

/// Applies `f` to the record of `id` (created when missing).
fn change(db: &sled::Db, id: &str, f: impl Fn(&mut Record)) {
    let done = tree(db).and_then(|t| {
        t.update_and_fetch(id.as_bytes(), |old| {
            let mut r: Record = old
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_else(|| Record {
                    id: id.to_string(),
                    ..Record::default()
                });
            f(&mut r);
            if r.events.len() > MAX_EVENTS {
                let extra = r.events.len() - MAX_EVENTS;
                r.events.drain(..extra);
            }
            serde_json::to_vec(&r).ok()
        })
    });
    if let Err(e) = done {
        tracing::warn!(%id, error = %e, "message tracking: not recorded");
    }
}

/// The Message-ID header's value (first one; folded lines joined), if any.
pub fn message_id(message: &[u8]) -> Option<String> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    let header = String::from_utf8_lossy(&message[..end]);
    let mut lines = header.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("message-id") {
            continue;
        }
        let mut v = value.trim().to_string();
        while let Some(next) = lines.peek().filter(|l| l.starts_with([' ', '\t'])) {
            if v.len() <= MAX_TEXT {
                v.push_str(next.trim());
            }
            lines.next();
        }
        return (!v.is_empty()).then(|| clip(v));
    }
    None
}

/// `s`, cut to [`MAX_TEXT`] octets (on a character boundary) with an ellipsis.
fn clip(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl What {
    /// The same event with its peer text clipped.
    fn clipped(self) -> What {
        match self {
            What::Attempt {
                server,
                decision,
                outcome,
                reply,
                tls,
            } => What::Attempt {
                server,
                decision,
                outcome,
                reply: clip(reply),
                tls,
            },
            What::Held { why } => What::Held { why: clip(why) },
            What::Failed { reply } => What::Failed { reply: clip(reply) },
            other => other,
        }
    }
}

/// At accept, once the message is queued (`message_id`: from [`message_id`]).
pub fn accepted(db: &sled::Db, env: &Envelope, message_id: Option<String>) {
    let a = Accepted {
        at: env.received_at,
        client: env.client_ip.to_string(),
        helo: clip(env.helo.clone()),
        from: env.sender.clone().unwrap_or_default(),
        to: env.recipients.iter().map(|r| r.address.clone()).collect(),
        size: env.size,
        message_id,
    };
    change(db, &env.id.to_string(), |r| r.accepted = Some(a.clone()));
}

/// Records an event for `rcpt` of message `id`.
pub fn event(db: &sled::Db, id: QueueId, rcpt: &str, what: What) {
    events(db, id, rcpt, [what]);
}

/// Records events for `rcpt` of message `id`, in order, in one write of its
/// record (an attempt and the end it made: one rewrite, not two).
pub fn events(db: &sled::Db, id: QueueId, rcpt: &str, whats: impl IntoIterator<Item = What>) {
    let at = now_ms();
    let new: Vec<Event> = whats
        .into_iter()
        .map(|what| Event {
            at,
            rcpt: rcpt.to_string(),
            what: what.clipped(),
        })
        .collect();
    change(db, &id.to_string(), |r| {
        r.events.extend(new.iter().cloned())
    });
}

/// What `clustermail track` looks for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub message_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Only messages accepted (or, without an accept record, last seen) this
    /// long ago or less.
    pub since: Option<Duration>,
}

fn bare(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase()
}

impl Query {
    pub fn matches(&self, r: &Record, now: u64) -> bool {
        let a = r.accepted.as_ref();
        let since_ok = self.since.is_none_or(|s| {
            let at = a.map_or_else(|| r.last_at(), |a| a.at);
            at >= now.saturating_sub(s.as_millis() as u64)
        });
        let id_ok = self.message_id.as_ref().is_none_or(|want| {
            a.and_then(|a| a.message_id.as_deref())
                .is_some_and(|got| bare(got) == bare(want))
        });
        let from_ok = self
            .from
            .as_ref()
            .is_none_or(|want| a.is_some_and(|a| a.from.eq_ignore_ascii_case(want.trim())));
        let to_ok = self.to.as_ref().is_none_or(|want| {
            let want = want.trim();
            a.is_some_and(|a| a.to.iter().any(|t| t.eq_ignore_ascii_case(want)))
                || r.events.iter().any(|e| e.rcpt.eq_ignore_ascii_case(want))
        });
        since_ok && id_ok && from_ok && to_ok
    }
}

/// The matching records, oldest first.
pub fn find(db: &sled::Db, q: &Query) -> anyhow::Result<Vec<Record>> {
    let now = now_ms();
    let mut out = Vec::new();
    for item in tree(db)?.iter() {
        let (_, v) = item?;
        if let Ok(r) = serde_json::from_slice::<Record>(&v) {
            if q.matches(&r, now) {
                out.push(r);
            }
        }
    }
    out.sort_by_key(|r| r.accepted.as_ref().map_or(r.last_at(), |a| a.at));
    Ok(out)
}

/// Removes records whose last event is older than `retention`; how many.
pub fn prune(db: &sled::Db, retention: Duration) -> anyhow::Result<usize> {
    let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
    let t = tree(db)?;
    let mut n = 0;
    for item in t.iter() {
        let (k, v) = item?;
        let old = serde_json::from_slice::<Record>(&v).map_or(true, |r| r.last_at() < cutoff);
        if old {
            t.remove(k)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Prunes at start and every ten minutes until `stopped`.
pub async fn prune_every(
    db: sled::Db,
    retention: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let d = db.clone();
        match tokio::task::spawn_blocking(move || prune(&d, retention)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                removed = n,
                "message tracking: records past tracking.retention removed"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "message tracking: pruning failed"),
            Err(e) => tracing::warn!(error = %e, "message tracking: pruning task failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stopped.changed() => if *stopped.borrow() { return },
        }
    }
}

fn when(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `clustermail track` output: per message, its accept line, then its events.
pub fn render(records: &[Record], out: &mut dyn Write) -> std::io::Result<()> {
    for r in records {
        match &r.accepted {
            Some(a) => {
                let mid = a.message_id.as_deref().unwrap_or("(no Message-ID)");
                writeln!(out, "{} {mid}", r.id)?;
                let from = if a.from.is_empty() { "<>" } else { &a.from };
                writeln!(
                    out,
                    "  {} accepted from {} (helo {}), {} bytes, from {from} to {}",
                    when(a.at),
                    a.client,
                    a.helo,
                    a.size,
                    a.to.join(", ")
                )?;
            }
            None => writeln!(
                out,
                "{} (accepted by the HA peer: no accept record here)",
                r.id
            )?,
        }
        for e in &r.events {
            let at = when(e.at);
            match &e.what {
                What::Attempt {
                    server,
                    decision,
                    outcome,
                    reply,
                    tls,
                } => writeln!(
                    out,
                    "  {at} attempt {} -> {server} ({decision}): {outcome}: {reply} [tls {}]",
                    e.rcpt,
                    tls.as_deref().unwrap_or("none")
                )?,
                What::Held { why } => writeln!(out, "  {at} held {}: {why}", e.rcpt)?,
                What::Delivered { server } => {
                    writeln!(out, "  {at} delivered {} at {server}", e.rcpt)?
                }
                What::Failed { reply } => writeln!(
                    out,
                    "  {at} failed {} (bounced to the sender): {reply}",
                    e.rcpt
                )?,
                What::Deleted => writeln!(out, "  {at} deleted by an administrator")?,
            }
        }
    }
    writeln!(out, "{} message(s)", records.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_and_its_end_are_recorded_together_in_order() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let id = QueueId::new();
        let attempt = What::Attempt {
            server: "s1".into(),
            decision: "home".into(),
            outcome: "delivered".into(),
            reply: "250 ok".into(),
            tls: None,
        };
        let end = What::Delivered {
            server: "s1".into(),
        };
        events(&db, id, "u@c.test", [attempt.clone(), end.clone()]);
        event(&db, id, "u@c.test", What::Deleted);
        let found = find(&db, &Query::default()).unwrap();
        let whats: Vec<&What> = found[0].events.iter().map(|e| &e.what).collect();
        assert_eq!(whats, [&attempt, &end, &What::Deleted]);
        assert!(found[0].events.iter().all(|e| e.rcpt == "u@c.test"));
    }

    #[test]
    fn the_message_id_is_read_from_the_header_block_only() {
        let m = b"Received: x\r\nMessage-Id:\r\n <abc@x.test>\r\nSubject: s\r\n\r\nMessage-ID: <body@x>\r\n";
        assert_eq!(message_id(m).as_deref(), Some("<abc@x.test>"));
        assert_eq!(message_id(b"Subject: s\r\n\r\nMessage-ID: <b@x>\r\n"), None);
    }

    #[test]
    fn records_past_the_retention_are_pruned() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let id = QueueId::new();
        event(&db, id, "u@c.test", What::Deleted);
        change(&db, "OLD", |r| {
            r.events.push(Event {
                at: 1,
                rcpt: "x".into(),
                what: What::Deleted,
            })
        });
        assert_eq!(find(&db, &Query::default()).unwrap().len(), 2);
        assert_eq!(prune(&db, Duration::from_secs(3600)).unwrap(), 1);
        let left = find(&db, &Query::default()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, id.to_string());
    }

    #[test]
    fn a_huge_folded_message_id_is_clipped_on_a_character_boundary() {
        let mut m = "Message-ID: <é".to_string();
        for _ in 0..100_000 {
            m.push_str("\r\n é");
        }
        m.push_str(">\r\n\r\nbody");
        let id = message_id(m.as_bytes()).unwrap();
        assert!(id.len() <= MAX_TEXT + '…'.len_utf8(), "{}", id.len());
        assert!(id.starts_with("<éé") && id.ends_with('…'), "{id}");
        assert_eq!(clip("short".into()), "short");
    }

    #[test]
    fn queries_match_message_id_sender_recipient_and_age() {
        let now = 10_000_000;
        let r = Record {
            id: "Q".into(),
            accepted: Some(Accepted {
                at: now - 5_000,
                client: "127.0.0.1".into(),
                helo: "h".into(),
                from: "S@x.test".into(),
                to: vec!["u@c.test".into()],
                size: 10,
                message_id: Some("<M@x.test>".into()),
            }),
            events: vec![],
        };
        let q = |f: fn(&mut Query)| {
            let mut q = Query::default();
            f(&mut q);
            q.matches(&r, now)
        };
        assert!(q(|q| q.message_id = Some("m@x.test".into())));
        assert!(!q(|q| q.message_id = Some("<other@x>".into())));
        assert!(q(|q| q.from = Some("s@X.test".into())));
        assert!(q(|q| q.to = Some("U@c.test".into())));
        assert!(!q(|q| q.to = Some("v@c.test".into())));
        assert!(q(|q| q.since = Some(Duration::from_secs(10))));
        assert!(!q(|q| q.since = Some(Duration::from_secs(1))));
    }
}
