//! Shadow redundancy, the MASTER's side (`ha.shadow`): no 250 after DATA until
//! the message is durable here **and** the SLAVE has a durable shadow copy, so a
//! MASTER that loses its disk loses no acknowledged mail.
//!
//! Owns the accept hook (its `smtp::server::Replication`), the sessions' requests
//! to the shadow task ([`super::shadow_link`], which keeps one dedicated,
//! pipelined shadow connection to the SLAVE), the degraded state, and the
//! `clustermail_shadow_*` metrics. The SLAVE's side (the shadow tree, promotion
//! at a takeover) is [`super::shadow_store`].
//!
//! Batching: each accepting session hands its message to the task, then waits on
//! a oneshot while the local group commit runs ([`Spool::enqueue_confirmed`]). The
//! task sends every message waiting at that moment in one [`Msg::Shadow`] batch,
//! without waiting for the batches before it to be answered (a window); the
//! SLAVE writes them and makes them durable with its group commit before
//! answering. Releases (messages that left the queue: delivered, bounced,
//! deleted, pushed, refused) ride on those batches and go at least every
//! `ha.shadow_release_interval`. Bounces and pushed messages this unit queues get
//! a shadow too, sent in the background (nobody waits for them).
//!
//! Memory: the session's buffer is shared with its shadow copy ([`Octets`]), not
//! copied; it is counted in `smtp.max_data_in_flight` by the session's
//! reservation until the 250. The encoded batch (a frame: a copy of its octets
//! while it is written to the link) is counted in the same budget meanwhile.
//!
//! Reconciliation: each new shadow connection starts with the list of every
//! message this unit holds ([`Msg::ShadowSync`]); the SLAVE drops its other
//! shadows (releases lost in a restart or an outage) and names the ones it lacks,
//! which are sent in the background (mail accepted while degraded).
//!
//! `preferred`: a peer that is unreachable or not SLAVE, or a failed round trip,
//! makes the unit *degraded* (log, `ha status`, metrics) and mail is accepted
//! without a shadow. `required`: such mail is refused (451 4.3.0) and never
//! delivered, and new transactions are refused at MAIL while degraded.

#[cfg(doc)]
use super::link::Msg;
use super::state::Mode;
use super::Ha;
use crate::config::ShadowMode;
use crate::metrics::Counter;
use crate::queue::{Envelope, QueueId, Spool};
use crate::smtp::limits::{Budget, Reservation};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;
use tokio::sync::{mpsc, oneshot};

/// A message's octets, shared by the session, the queue's write and the shadow
/// copy: one buffer.
pub type Octets = Arc<Vec<u8>>;

/// An [`Octets`] handed to the queue (which drops it once written).
struct Shared(Octets);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// One change to the SLAVE's shadows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// Keep this copy of a queued message.
    Put {
        envelope: Envelope,
        #[serde(with = "octets")]
        message: Octets,
    },
    /// The message left the MASTER's queue: drop its shadow.
    Drop(QueueId),
    /// The message's envelope as the MASTER now has it (a recipient finished or
    /// held by an administrator): the shadow keeps its octets, takes the
    /// envelope; no shadow of it, nothing to do.
    Update(Envelope),
}

/// A message's octets as one byte string on the wire (serde's default for a
/// `Vec<u8>` is a sequence, encoded and decoded one octet at a time).
mod octets {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::Octets, D::Error> {
        Ok(std::sync::Arc::new(d.deserialize_byte_buf(Octets)?))
    }

    struct Octets;
    impl<'de> Visitor<'de> for Octets {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("octets")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// Most messages of one batch waited for by sessions.
pub(super) const MAX_BATCH: usize = 512;
/// Octets of messages in one batch, at most (one bigger message goes alone):
/// well under the link's frame limit.
pub(super) const MAX_BATCH_OCTETS: usize = 32 << 20;

impl Op {
    pub(super) fn octets(&self) -> usize {
        match self {
            Op::Put { message, .. } => message.len(),
            Op::Drop(_) | Op::Update(_) => 0,
        }
    }

    /// The message a `Put` copies.
    pub(super) fn put_id(&self) -> Option<QueueId> {
        match self {
            Op::Put { envelope, .. } => Some(envelope.id),
            Op::Drop(_) | Op::Update(_) => None,
        }
    }
}

/// Where a session waiting for its message's shadow gets the answer.
pub(super) type Done = oneshot::Sender<Result<(), String>>;

/// A session waiting for its message's shadow.
pub(super) struct Request {
    pub op: Op,
    pub done: Done,
}

/// What `ha status` and the metrics show of the shadows.
#[derive(Debug, Clone, Default)]
pub(super) struct View {
    /// Why mail is accepted (or refused) without a shadow, and since when.
    pub degraded: Option<(String, SystemTime)>,
    /// As MASTER: the peer's shadows after the last round trip, and the arrival
    /// time (ms) of the oldest unreleased one (0: none).
    pub peer_held: u64,
    pub peer_oldest: u64,
    /// As MASTER: batches sent and not yet answered; the most at once.
    pub in_flight: usize,
    pub most_in_flight: usize,
}

/// The MASTER's shadow state, owned by [`Ha`].
pub struct Shadow {
    pub mode: ShadowMode,
    requests: mpsc::Sender<Request>,
    inbox: Mutex<Option<mpsc::Receiver<Request>>>,
    view: Mutex<View>,
    /// The SMTP service's data budget, once a session has used the hook.
    budget: OnceLock<Arc<Budget>>,
}

impl Shadow {
    pub(super) fn new(mode: ShadowMode) -> Shadow {
        let (requests, inbox) = mpsc::channel(4 * MAX_BATCH);
        Shadow {
            mode,
            requests,
            inbox: Mutex::new(Some(inbox)),
            view: Mutex::new(View::default()),
            budget: OnceLock::new(),
        }
    }

    /// The requests, for the shadow task (once).
    pub(super) fn take_inbox(&self) -> Option<mpsc::Receiver<Request>> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// `octets` held by the shadow task, in the SMTP data budget while the
    /// reservation lives.
    pub(super) fn charge(&self, octets: u64) -> Option<Reservation> {
        self.budget.get().map(|b| b.charge(octets))
    }

    /// Batches in flight now.
    pub(super) fn set_in_flight(&self, n: usize) {
        let mut v = self.view();
        v.in_flight = n;
        v.most_in_flight = v.most_in_flight.max(n);
        drop(v);
        METRICS.in_flight.store(n as u64, Ordering::Relaxed);
    }

    /// The SLAVE's answer to a batch: its shadows, the oldest's arrival time.
    pub(super) fn set_peer(&self, held: u64, oldest: u64, in_flight: usize) {
        let mut v = self.view();
        v.peer_held = held;
        v.peer_oldest = oldest;
        drop(v);
        self.set_in_flight(in_flight);
    }

    pub(super) fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records whether the unit is degraded (the latest reason; since the first);
    /// the log line, and the event for `ha status`, when that changes.
    fn set_degraded(&self, why: Option<&str>) -> Option<String> {
        let mut v = self.view();
        let event = match (why, &mut v.degraded) {
            (Some(w), Some((reason, _))) => {
                if reason != w {
                    *reason = w.to_string();
                }
                None
            }
            (Some(w), None) => {
                v.degraded = Some((w.to_string(), SystemTime::now()));
                let action = match self.mode {
                    ShadowMode::Required => "new mail is refused (451 4.3.0)",
                    _ => "mail is accepted without a shadow copy",
                };
                tracing::warn!(why = %w, "HA shadow: DEGRADED: {action}");
                Some(format!("shadow copies: DEGRADED ({w}): {action}"))
            }
            (None, Some(_)) => {
                v.degraded = None;
                tracing::info!("HA shadow: the SLAVE keeps shadow copies again");
                Some("shadow copies: the SLAVE keeps them again".to_string())
            }
            (None, None) => None,
        };
        METRICS
            .degraded
            .store(u64::from(v.degraded.is_some()), Ordering::Relaxed);
        event
    }

    /// Hands one message's shadow to the task; the answer comes on the
    /// receiver once the SLAVE has it durably.
    async fn put(
        &self,
        envelope: Envelope,
        message: Octets,
    ) -> Result<oneshot::Receiver<Result<(), String>>, String> {
        let (done, answer) = oneshot::channel();
        let op = Op::Put { envelope, message };
        self.requests
            .send(Request { op, done })
            .await
            .map_err(|_| "the shadow task has stopped".to_string())?;
        Ok(answer)
    }

    /// Drops the shadow of a message that was not queued (nobody waits).
    async fn forget(&self, id: QueueId) {
        let (done, _) = oneshot::channel();
        let op = Op::Drop(id);
        let _ = self.requests.send(Request { op, done }).await;
    }
}

/// `clustermail_shadow_*`.
pub struct ShadowMetrics {
    pub promoted: Counter,
    pub unshadowed: Counter,
    pub refused: Counter,
    pub shadowed: Counter,
    pub round_trips: Counter,
    pub degraded: AtomicU64,
    pub held: AtomicU64,
    pub oldest: AtomicU64,
    pub in_flight: AtomicU64,
}

pub static METRICS: ShadowMetrics = ShadowMetrics {
    promoted: Counter::new(),
    unshadowed: Counter::new(),
    refused: Counter::new(),
    shadowed: Counter::new(),
    round_trips: Counter::new(),
    degraded: AtomicU64::new(0),
    held: AtomicU64::new(0),
    oldest: AtomicU64::new(0),
    in_flight: AtomicU64::new(0),
};

/// The shadow families of the Prometheus text.
pub fn render_metrics(out: &mut String) {
    let m = &METRICS;
    for (name, help, c) in [
        ("clustermail_shadow_promoted_total", "Shadow copies promoted into the queue at a takeover (each may duplicate a delivery of the lost MASTER's last release interval).", &m.promoted),
        ("clustermail_shadow_unshadowed_total", "Messages accepted without a shadow copy (degraded, ha.shadow = preferred).", &m.unshadowed),
        ("clustermail_shadow_refused_total", "Messages refused 451 for want of a shadow copy (ha.shadow = required).", &m.refused),
        ("clustermail_shadow_copies_total", "Shadow copies the SLAVE confirmed durable.", &m.shadowed),
        ("clustermail_shadow_round_trips_total", "Shadow batches sent to the SLAVE.", &m.round_trips),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.get());
    }
    let oldest = m.oldest.load(Ordering::Relaxed);
    let age = if oldest == 0 {
        0.0
    } else {
        crate::queue::manager::now_ms().saturating_sub(oldest) as f64 / 1000.0
    };
    for (name, help, v) in [
        (
            "clustermail_shadow_degraded",
            "1 while this MASTER cannot have shadow copies made.",
            m.degraded.load(Ordering::Relaxed) as f64,
        ),
        (
            "clustermail_shadow_held",
            "Shadow copies held (as MASTER: by the peer at the last round trip; as SLAVE: here).",
            m.held.load(Ordering::Relaxed) as f64,
        ),
        (
            "clustermail_shadow_in_flight",
            "Shadow batches sent to the SLAVE and not yet confirmed durable (as MASTER).",
            m.in_flight.load(Ordering::Relaxed) as f64,
        ),
        (
            "clustermail_shadow_oldest_age_seconds",
            "Age of the oldest unreleased shadow copy.",
            age,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
}

impl crate::smtp::server::Replication for Ha {
    fn accept<'a>(
        &'a self,
        spool: &'a crate::queue::Spool,
        budget: &'a Arc<crate::smtp::limits::Budget>,
        env: &'a Envelope,
        message: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            if self.shadow.mode == ShadowMode::Off {
                return spool.enqueue(env, message).await;
            }
            self.shadow.budget.get_or_init(|| budget.clone());
            self.accept_shadowed(spool, env, message).await
        })
    }

    /// `required` and degraded: a new transaction is refused at MAIL (451 4.3.0).
    fn refuses(&self) -> bool {
        self.shadow.mode == ShadowMode::Required
            && (self.peer_is_slave().is_err() || self.shadow.view().degraded.is_some())
    }
}

impl Ha {
    /// Degraded or not (see [`Shadow::set_degraded`]), with its event.
    pub(super) fn shadow_degraded(&self, why: Option<&str>) {
        if let Some(e) = self.shadow.set_degraded(why) {
            self.status().event(e);
        }
    }

    /// The peer is SLAVE by its last heartbeat answer, heard within
    /// `heartbeat_lost` (+1) intervals: the state machine's own measure of a
    /// lost peer. A heartbeat or two unanswered (a loaded or briefly stalled
    /// SLAVE) is not a reason to accept mail without a shadow: the round trip
    /// itself still has to succeed within its timeout.
    pub(super) fn peer_is_slave(&self) -> Result<(), String> {
        let s = self.status();
        let fresh = self.config.heartbeat_interval * (self.config.heartbeat_lost + 1);
        let heard = s
            .peer
            .as_ref()
            .filter(|(_, at)| at.elapsed().unwrap_or_default() <= fresh);
        match (heard, &s.peer_error) {
            (Some((b, _)), _) if b.mode != Mode::Slave => {
                Err(format!("the peer is {}, not SLAVE", b.mode))
            }
            (Some(_), _) => Ok(()),
            (None, Some(e)) => Err(format!("the peer is unreachable: {e}")),
            (None, None) if s.peer.is_some() => Err("no recent heartbeat from the peer".into()),
            (None, None) => Err("the peer is not heard yet".into()),
        }
    }

    /// The accept hook's work: local flush and shadow copy at once (the copy
    /// is handed to the shadow task first, so that it is on its way while the
    /// queue writes the message).
    async fn accept_shadowed(&self, spool: &Spool, env: &Envelope, message: Vec<u8>) -> Result<()> {
        let message: Octets = Arc::new(message);
        let copy = match self.peer_is_slave() {
            Ok(()) => self.shadow.put(env.clone(), message.clone()).await,
            Err(why) => Err(why),
        };
        let copied = copy.is_ok();
        let confirm = async {
            let r = match copy {
                Ok(answer) => answer
                    .await
                    .unwrap_or_else(|_| Err("the shadow task has stopped".to_string())),
                Err(why) => Err(why),
            };
            let Err(why) = r else { return Ok(()) };
            self.shadow_degraded(Some(&why));
            if self.shadow.mode == ShadowMode::Required {
                METRICS.refused.inc();
                return Err(anyhow::anyhow!("no shadow copy on the SLAVE: {why}"));
            }
            METRICS.unshadowed.inc();
            tracing::info!(id = %env.id, why = %why, "HA shadow: message accepted without a shadow copy (degraded)");
            Ok(())
        };
        let queued = spool.enqueue_confirmed(env, Shared(message), confirm).await;
        if queued.is_err() && copied {
            // Not queued (the queue may have failed before telling of it): the
            // shadow goes too, behind its copy on the ordered connection.
            self.shadow.forget(env.id).await;
        }
        queued
    }

    /// `ha status`'s shadow lines.
    pub(super) fn write_shadow(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mode = match self.shadow.mode {
            ShadowMode::Off => "off",
            ShadowMode::Preferred => "preferred",
            ShadowMode::Required => "required",
        };
        let v = self.shadow.view().clone();
        let age = |ms: u64| {
            let now = crate::queue::manager::now_ms();
            format!("{:.1}s", now.saturating_sub(ms) as f64 / 1000.0)
        };
        let state = match &v.degraded {
            Some((why, since)) => format!(
                "DEGRADED since {}s: {why}",
                since.elapsed().map(|d| d.as_secs()).unwrap_or(0)
            ),
            None => "ok".into(),
        };
        writeln!(
            out,
            "shadow:        {mode}, {state}; {} held by the peer, oldest unreleased {}; {} batches in flight (at most {}); {} copies confirmed in {} batches",
            v.peer_held,
            if v.peer_oldest == 0 {
                "-".into()
            } else {
                age(v.peer_oldest)
            },
            v.in_flight,
            v.most_in_flight,
            METRICS.shadowed.get(),
            METRICS.round_trips.get()
        )?;
        let (held, oldest) = self.shadows.stats();
        writeln!(
            out,
            "shadows here:  {held} held for the peer{}",
            oldest
                .map(|o| format!(", oldest {}", age(o)))
                .unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::link::Msg;
    use crate::queue::Recipient;

    #[test]
    fn a_put_crosses_the_wire_whole_and_its_octets_as_one_string() {
        let envelope = Envelope {
            id: QueueId(7 << 20),
            sender: None,
            recipients: vec![Recipient::new("u@c.test".into(), "u@c.test".into())],
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "h".into(),
            received_at: 1,
            size: 3,
            smtputf8: false,
            eight_bit: true,
        };
        let message: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let ops = vec![
            Op::Put {
                envelope: envelope.clone(),
                message: Arc::new(message.clone()),
            },
            Op::Drop(QueueId(9)),
        ];
        let cfg = bincode::config::standard();
        let wire = bincode::serde::encode_to_vec(Msg::Shadow { batch: 3, ops }, cfg).unwrap();
        assert!(wire.len() < message.len() + 200, "{} octets", wire.len());
        let (back, _): (Msg, usize) = bincode::serde::decode_from_slice(&wire, cfg).unwrap();
        let Msg::Shadow {
            batch: 3,
            ops: back,
        } = back
        else {
            panic!("{back:?}")
        };
        assert!(
            matches!(&back[0], Op::Put { envelope: e, message: m } if *e == envelope && **m == message)
        );
        assert!(matches!(back[1], Op::Drop(QueueId(9))));
    }
}
