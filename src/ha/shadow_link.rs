//! Shadow redundancy, the MASTER's shadow connection to the SLAVE: the task
//! ([`run`]) that batches the sessions' shadows, the background ones and the
//! releases, and keeps up to [`WINDOW`] batches in flight on one connection.
//!
//! Pipelining: a batch is sent as soon as sessions are waiting and the window
//! has room, without waiting for the answer to the one before; each batch
//! carries its number and the SLAVE answers them in order, once durable (its
//! group commit: one fdatasync covers every batch received meanwhile, see
//! [`super::shadow_store`]). The connection's reader task matches each answer
//! to the oldest batch in flight by number and answers its sessions at once (not
//! behind the writing of the next batch): a gap, a refusal, a lost connection or an answer later than
//! the round trip timeout fails every batch in flight (their sessions get the
//! reason; the unit is degraded) and the connection is dropped. The next one
//! starts with the reconciliation ([`Msg::ShadowSync`]), as before pipelining.
//!
//! Releases (messages that left the queue) ride on the next batch, and go at
//! least every `ha.shadow_release_interval`; a release never overtakes its
//! message's copy (one ordered connection, applied in order by the SLAVE).

use super::link::{Link, LinkReader, LinkWriter, Msg};
use super::shadow::{Done, Op, Request, MAX_BATCH, MAX_BATCH_OCTETS, METRICS};
use super::state::Mode;
use super::Ha;
use crate::queue::spool::Change;
use crate::queue::QueueId;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

/// Batches in flight on the shadow connection, at most.
pub(super) const WINDOW: usize = 4;
/// Most background copies (mail accepted while degraded) in one batch.
const MAX_BACKFILL: usize = 32;
/// Most envelope updates in one batch.
const MAX_UPDATES: usize = 4096;

/// Messages that left the queue and messages to shadow in the background.
#[derive(Default)]
struct Pending {
    releases: Vec<QueueId>,
    backfill: VecDeque<QueueId>,
    /// The release interval passed while the window was full.
    release_due: bool,
    /// Messages whose envelope changed (a recipient finished, a hold, a retry):
    /// the SLAVE's copy follows, with the releases.
    updates: BTreeSet<QueueId>,
    /// Messages whose session sent their copy on this connection, and when:
    /// their entry into the queue (told after the copy is confirmed) needs no
    /// copy in the background.
    shadowed: HashMap<QueueId, Instant>,
}

/// How long a copied message's entry into the queue is waited for (it never
/// comes when the local flush failed).
const SHADOWED_KEPT: Duration = Duration::from_secs(60);

impl Pending {
    fn note(&mut self, c: Change) {
        match c {
            Change::Queued(id) => {
                if self.shadowed.remove(&id).is_none() {
                    self.backfill.push_back(id)
                }
            }
            Change::Removed(id) => {
                self.updates.remove(&id);
                self.releases.push(id)
            }
            Change::Updated(id) => {
                self.updates.insert(id);
            }
        }
    }
    /// Forgets the connection's state: a new one starts with the reconciliation.
    fn clear(&mut self) {
        self.releases.clear();
        self.updates.clear();
        self.backfill.clear();
        self.release_due = false;
        self.shadowed.clear();
    }
    fn forget_old(&mut self) {
        self.shadowed.retain(|_, at| at.elapsed() < SHADOWED_KEPT);
    }
}

/// A batch sent and not yet answered.
struct Batch {
    number: u64,
    puts: usize,
    dones: Vec<Done>,
    /// When it was handed to the connection.
    sent: Instant,
    /// Answered by then, or the connection is given up.
    deadline: Instant,
}

/// The batches in flight on a connection (oldest first), shared by the task
/// that sends them and the one that reads their answers.
type InFlight = Arc<Mutex<VecDeque<Batch>>>;

fn lock(f: &InFlight) -> MutexGuard<'_, VecDeque<Batch>> {
    f.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shadow connection: its sending half, the batches in flight, and its
/// reader task, which answers the sessions of each batch as its answer comes
/// (not behind the sending of the next batch) and tells the shadow task of room
/// in the window (`answered`) or of the connection's failure (`failed`).
struct Conn {
    writer: LinkWriter,
    failed: mpsc::Receiver<String>,
    answered: Arc<Notify>,
    reader: tokio::task::JoinHandle<()>,
    next: u64,
    in_flight: InFlight,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    fn new(ha: Arc<Ha>, link: Link) -> Conn {
        let (reader, writer) = link.split();
        let (tx, failed) = mpsc::channel(1);
        let answered = Arc::new(Notify::new());
        let in_flight = InFlight::default();
        let task = read_answers(ha, reader, in_flight.clone(), answered.clone(), tx);
        Conn {
            writer,
            failed,
            answered,
            reader: tokio::spawn(task),
            next: 0,
            in_flight,
        }
    }

    fn room(&self) -> bool {
        lock(&self.in_flight).len() < WINDOW
    }

    /// When the oldest batch in flight must be answered by.
    fn deadline(&self) -> Option<Instant> {
        lock(&self.in_flight).front().map(|b| b.deadline)
    }
}

/// The reader task: answers each batch in flight as its answer comes, until
/// the connection fails (then the shadow task is told why).
async fn read_answers(
    ha: Arc<Ha>,
    mut reader: LinkReader,
    in_flight: InFlight,
    answered: Arc<Notify>,
    failed: mpsc::Sender<String>,
) {
    loop {
        let r = reader
            .recv()
            .await
            .map_err(|e| format!("shadow copy: {e:#}"));
        match r.and_then(|a| ha.shadow_answered(&in_flight, a)) {
            Ok(()) => answered.notify_one(),
            Err(why) => {
                let _ = failed.send(why).await;
                return;
            }
        }
    }
}

/// What woke the task.
enum Event {
    Request(Request),
    Failed(String),
    Answered,
    Late,
    Change(Change),
    Tick,
    Stop,
}

/// A batch of the connection was answered (Ok) or the connection failed
/// (Err: why); never, without a connection.
async fn next_answer(conn: &mut Option<Conn>) -> Result<(), String> {
    match conn {
        Some(c) => tokio::select! {
            biased;
            why = c.failed.recv() => Err(why.unwrap_or_else(|| "shadow connection closed".into())),
            _ = c.answered.notified() => Ok(()),
        },
        None => std::future::pending().await,
    }
}

impl Ha {
    /// The round trip timeout of the shadow connection.
    fn shadow_timeout(&self) -> Duration {
        self.config.heartbeat_interval * self.config.heartbeat_lost.max(1)
    }

    /// A new shadow connection, reconciled: `pending`'s backfill becomes the
    /// messages the SLAVE lacks.
    async fn shadow_connect(self: &Arc<Self>, pending: &mut Pending) -> Result<Conn, String> {
        let timeout = self.shadow_timeout();
        let mut l = Link::connect(&self.config.peer, &self.config.password, timeout)
            .await
            .map_err(|e| format!("shadow connection: {e:#}"))?;
        let ids = self.spool.ids().map_err(|e| e.to_string())?;
        match l.call(&Msg::ShadowSync(ids.clone()), timeout).await {
            Ok(Msg::ShadowMissing(missing)) => {
                pending.clear();
                // The SLAVE's copies may predate changes made while there was
                // no connection: every message it has gets its envelope again.
                let lacks: HashSet<QueueId> = missing.iter().copied().collect();
                pending
                    .updates
                    .extend(ids.iter().filter(|id| !lacks.contains(id)));
                pending.backfill.extend(missing);
                Ok(Conn::new(self.clone(), l))
            }
            Ok(Msg::Refused(why)) => Err(format!("the SLAVE refused: {why}")),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(format!("shadow sync: {e:#}")),
        }
    }

    /// Sends one batch: the sessions' `puts`, background copies, and the
    /// releases when it carries copies or `release_due`. Err: the connection
    /// is unusable (the caller fails it and answers `dones` with the reason).
    async fn shadow_send(
        self: &Arc<Self>,
        conn: &mut Option<Conn>,
        pending: &mut Pending,
        puts: Vec<Op>,
        dones: Vec<Done>,
        release_due: bool,
    ) -> Result<(), (String, Vec<Done>)> {
        if let Err(why) = self.peer_is_slave() {
            return Err((why, dones));
        }
        if conn.is_none() {
            match self.shadow_connect(pending).await {
                Ok(c) => *conn = Some(c),
                Err(why) => return Err((why, dones)),
            }
        }
        let mut ops = puts;
        self.backfill(pending, &mut ops);
        if release_due || pending.release_due || !ops.is_empty() {
            self.updates(pending, &mut ops);
            ops.extend(pending.releases.drain(..).map(Op::Drop));
            pending.release_due = false;
        }
        let Some(c) = conn.as_mut() else {
            return Err(("no shadow connection".into(), dones));
        };
        if ops.is_empty() {
            if lock(&c.in_flight).is_empty() {
                self.shadow_degraded(None);
            }
            return Ok(());
        }
        let number = c.next;
        c.next += 1;
        let puts = ops.iter().filter(|o| matches!(o, Op::Put { .. })).count();
        let octets: usize = ops.iter().map(Op::octets).sum();
        // In flight before it is written: its answer may come before `send`
        // returns. A failed send fails it with the connection.
        let start = Instant::now();
        let timeout = self.shadow_timeout();
        let n = {
            let mut f = lock(&c.in_flight);
            f.push_back(Batch {
                number,
                puts,
                dones,
                sent: start,
                // Answered within the timeout once sent (sending has its own).
                deadline: start + 2 * timeout,
            });
            f.len()
        };
        self.shadow.set_in_flight(n);
        // The frame is a copy of the batch's octets while it is written: counted
        // in the SMTP data budget for that time.
        let charge = self.shadow.charge(octets as u64);
        let msg = Msg::Shadow { batch: number, ops };
        let sent = tokio::time::timeout(timeout, c.writer.send(&msg)).await;
        drop(msg);
        drop(charge);
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err((format!("shadow copy: {e:#}"), Vec::new())),
            Err(_) => return Err(("shadow copy: sending timed out".into(), Vec::new())),
        }
        METRICS.round_trips.inc();
        if let Some(b) = lock(&c.in_flight).iter_mut().find(|b| b.number == number) {
            b.deadline = Instant::now() + timeout;
        }
        Ok(())
    }

    /// Envelope updates into `ops` (at most [`MAX_UPDATES`] a batch), each
    /// message's envelope as it is now: a promoted copy neither delivers a
    /// finished recipient again nor forgets (or keeps) an administrator's hold.
    fn updates(&self, pending: &mut Pending, ops: &mut Vec<Op>) {
        for _ in 0..MAX_UPDATES {
            let Some(id) = pending.updates.pop_first() else {
                break;
            };
            if let Ok(Some(envelope)) = self.spool.envelope(id) {
                ops.push(Op::Update(envelope));
            }
        }
    }

    /// Background copies into `ops`, within the batch limits.
    fn backfill(&self, pending: &mut Pending, ops: &mut Vec<Op>) {
        let mut octets: usize = ops.iter().map(Op::octets).sum();
        let most = ops.len() + MAX_BACKFILL;
        while ops.len() < most && octets < MAX_BATCH_OCTETS {
            let Some(id) = pending.backfill.pop_front() else {
                break;
            };
            if let (Ok(Some(envelope)), Ok(Some(message))) =
                (self.spool.envelope(id), self.spool.message(id))
            {
                octets += message.len();
                ops.push(Op::Put {
                    envelope,
                    message: Arc::new(message),
                });
            }
        }
    }

    /// An answer of the connection: the oldest batch in flight is durable on
    /// the SLAVE, its sessions are answered. Err: the connection is unusable.
    fn shadow_answered(&self, in_flight: &InFlight, answer: Msg) -> Result<(), String> {
        let (batch, held, oldest) = match answer {
            Msg::Shadowed {
                batch,
                held,
                oldest,
            } => (batch, held, oldest),
            Msg::Refused(why) => return Err(format!("the SLAVE refused: {why}")),
            other => return Err(format!("unexpected answer {other:?}")),
        };
        let (b, left) = {
            let mut f = lock(in_flight);
            let b = f
                .front()
                .is_some_and(|b| b.number == batch)
                .then(|| f.pop_front());
            (b.flatten(), f.len())
        };
        let Some(b) = b else {
            return Err(format!("shadow answer for batch {batch} out of order"));
        };
        for d in b.dones {
            let _ = d.send(Ok(()));
        }
        tracing::debug!(
            batch,
            copies = b.puts,
            round_trip_us = b.sent.elapsed().as_micros() as u64,
            in_flight = left,
            "HA shadow: batch confirmed"
        );
        METRICS.shadowed.add(b.puts as u64);
        METRICS.held.store(held, Ordering::Relaxed);
        METRICS.oldest.store(oldest, Ordering::Relaxed);
        self.shadow.set_peer(held, oldest, left);
        self.shadow_degraded(None);
        Ok(())
    }

    /// Drops the connection: every session waiting on it gets `why`.
    fn shadow_drop(&self, conn: &mut Option<Conn>, pending: &mut Pending, why: &str) {
        if let Some(c) = conn.take() {
            c.reader.abort();
            let batches: Vec<Batch> = lock(&c.in_flight).drain(..).collect();
            let n = batches.len();
            for d in batches.into_iter().flat_map(|b| b.dones) {
                let _ = d.send(Err(why.to_string()));
            }
            tracing::debug!(in_flight = n, why, "HA shadow: connection dropped");
        }
        self.shadow.set_in_flight(0);
        pending.clear();
    }

    /// The connection failed: dropped, and the unit degraded.
    fn shadow_failed(&self, conn: &mut Option<Conn>, pending: &mut Pending, why: &str) {
        self.shadow_drop(conn, pending, why);
        self.shadow_degraded(Some(why));
    }
}

/// The shadow task, until shutdown.
pub(super) async fn run(ha: Arc<Ha>, mut shutdown: watch::Receiver<bool>) {
    let Some(mut inbox) = ha.shadow.take_inbox() else {
        return;
    };
    let Some(mut changes) = ha.spool.watch_changes() else {
        tracing::error!("HA shadow: the queue's changes are already watched: no shadows");
        return;
    };
    let mut conn: Option<Conn> = None;
    let mut pending = Pending::default();
    let mut tick = tokio::time::interval(ha.config.shadow_release_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A request that did not fit in the last batch: first in the next.
    let mut carried: Option<Request> = None;
    loop {
        let room = conn.as_ref().is_none_or(Conn::room);
        let late = conn.as_ref().and_then(Conn::deadline);
        let event = match carried.take() {
            Some(r) if room => Event::Request(r),
            c => {
                carried = c;
                tokio::select! {
                    r = inbox.recv(), if room && carried.is_none() => match r {
                        Some(r) => Event::Request(r),
                        None => Event::Stop,
                    },
                    a = next_answer(&mut conn) => match a {
                        Ok(()) => Event::Answered,
                        Err(why) => Event::Failed(why),
                    },
                    _ = tokio::time::sleep_until(late.unwrap_or_else(Instant::now)), if late.is_some() => Event::Late,
                    Some(c) = changes.recv() => Event::Change(c),
                    _ = tick.tick() => Event::Tick,
                    _ = shutdown.changed() => if *shutdown.borrow() { Event::Stop } else { continue },
                }
            }
        };
        let mut waiting = Vec::new();
        let mut release_due = false;
        match event {
            Event::Stop => return,
            Event::Request(r) => waiting.push(r),
            Event::Failed(why) => {
                ha.shadow_failed(&mut conn, &mut pending, &why);
                continue;
            }
            // Room in the window, or nothing: the loop looks again.
            Event::Answered => continue,
            Event::Late => {
                let why = format!(
                    "shadow copy: the SLAVE did not answer within {} ms",
                    ha.shadow_timeout().as_millis()
                );
                ha.shadow_failed(&mut conn, &mut pending, &why);
                continue;
            }
            Event::Change(c) => pending.note(c),
            Event::Tick => {
                release_due = true;
                pending.forget_old();
            }
        }
        if !waiting.is_empty() {
            carried = gather(&mut inbox, &mut waiting);
        }
        while let Ok(c) = changes.try_recv() {
            pending.note(c);
        }
        if !conn.as_ref().is_none_or(Conn::room) {
            // Only a tick or a change can get here with the window full.
            pending.release_due |= release_due;
            continue;
        }
        if waiting.is_empty() && !release_due && pending.backfill.is_empty() {
            continue;
        }
        ha.shadow_batch(&mut conn, &mut pending, waiting, release_due)
            .await;
    }
}

impl Ha {
    /// Sends the `waiting` requests (and what `pending` adds) as one batch, or
    /// answers them with the reason it cannot be sent.
    async fn shadow_batch(
        self: &Arc<Self>,
        conn: &mut Option<Conn>,
        pending: &mut Pending,
        waiting: Vec<Request>,
        release_due: bool,
    ) {
        if self.mode() != Mode::Master {
            // Nothing to shadow; a new MASTER reconciles on its first connection.
            self.shadow_drop(conn, pending, "this unit is not MASTER");
            self.shadow_degraded(None);
            for w in waiting {
                let _ = w.done.send(Err("this unit is not MASTER".into()));
            }
            return;
        }
        let ids: Vec<QueueId> = waiting.iter().filter_map(|r| r.op.put_id()).collect();
        let (puts, dones): (Vec<Op>, Vec<Done>) =
            waiting.into_iter().map(|r| (r.op, r.done)).unzip();
        match self
            .shadow_send(conn, pending, puts, dones, release_due)
            .await
        {
            Ok(()) => {
                let now = Instant::now();
                pending.shadowed.extend(ids.into_iter().map(|id| (id, now)));
            }
            Err((why, dones)) => {
                self.shadow_failed(conn, pending, &why);
                for d in dones {
                    let _ = d.send(Err(why.clone()));
                }
            }
        }
    }
}

/// Every request waiting now into `waiting`, within the batch limits; the first
/// one that does not fit is returned (it goes first in the next batch).
fn gather(inbox: &mut mpsc::Receiver<Request>, waiting: &mut Vec<Request>) -> Option<Request> {
    let mut octets: usize = waiting.iter().map(|r| r.op.octets()).sum();
    while waiting.len() < MAX_BATCH {
        let Ok(r) = inbox.try_recv() else { break };
        octets += r.op.octets();
        if octets > MAX_BATCH_OCTETS && !waiting.is_empty() {
            return Some(r);
        }
        waiting.push(r);
    }
    None
}
