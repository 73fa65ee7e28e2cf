//! The spool: messages in sled, written atomically and made durable before the
//! SMTP 250.
//!
//! Layout (tree `queue`): `e\0<id>` → envelope, and either `s\0<id>` → the place
//! of the message octets as queued (our Received header first) in a body segment
//! (see `segments`), or, for a body over [`bodies::INLINE_MAX`], `f\0<id>` → its
//! length, the octets being in the file `store/bodies/<id>` (see `bodies`); a
//! store written before segments may hold `b\0<id>` → the octets, read as
//! before. A message's keys are written body key first, envelope last, and
//! removed envelope first (not in a sled batch: each batch rolls sled's io buffer
//! twice, a write and a `sync_file_range` in its io threads; 4 per message
//! measured), so the queue — everything that reads envelopes — never sees half a
//! message; a body key left without its envelope by a crash is removed at open,
//! and an envelope without its body (never acknowledged: the 250 waits for the
//! flush of both) is dropped as undeliverable. A body file is durable before its
//! keys are written, and unlinked only after they are durably removed. Records
//! start with a format version byte.
//!
//! Durability: [`Spool::enqueue`] returns only after the message is on disk (group
//! commit with a real fdatasync: see `durable`). A message is in the queue — seen
//! by the manager, the CLI and the HA push — only once it is durable; if its flush
//! fails it is removed and never delivered (the client got 451).
//!
//! Ownership: envelope changes are made under the message's claim (see `claim`),
//! and [`Spool::update`] never re-creates a removed message: a stale writer gets
//! [`Removed`] instead of making an envelope without octets.

use super::bodies::{self, Bodies};
use super::claim::Claims;
use super::durable::{self, Request};
pub use super::envelope::{Envelope, Recipient, RecipientState};
use super::segments::{Place, Segments};
use super::QueueId;
use anyhow::{anyhow, bail, Result};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

mod read;

const FORMAT: u8 = 4;

fn key(kind: u8, id: QueueId) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = kind;
    k[2..].copy_from_slice(&id.to_bytes());
    k
}

/// Per-recipient state kept after the envelope in its record: an older version
/// reads the envelope and ignores it, and a record without it (written before)
/// reads as all false. (Fields added this way need no format change.)
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Tail {
    delay_reported: Vec<bool>,
}

fn encode(env: &Envelope) -> Result<Vec<u8>> {
    let mut v = vec![FORMAT];
    let config = bincode::config::standard();
    v.extend(bincode::serde::encode_to_vec(env, config)?);
    let tail = Tail {
        delay_reported: env.recipients.iter().map(|r| r.delay_reported).collect(),
    };
    v.extend(bincode::serde::encode_to_vec(&tail, config)?);
    Ok(v)
}

fn decode(bytes: &[u8]) -> Result<Envelope> {
    let config = bincode::config::standard();
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            let (mut env, read): (Envelope, usize) =
                bincode::serde::decode_from_slice(rest, config)?;
            let rest = &rest[read.min(rest.len())..];
            if !rest.is_empty() {
                let tail: Tail = bincode::serde::decode_from_slice(rest, config)?.0;
                for (r, d) in env.recipients.iter_mut().zip(tail.delay_reported) {
                    r.delay_reported = d;
                }
            }
            Ok(env)
        }
        Some((v, _)) => bail!("queue record format {v} is not known to this version"),
        None => bail!("empty queue record"),
    }
}

/// An envelope write for a message no longer in the queue: refused, so that no
/// stale writer re-creates a removed message.
#[derive(Debug, thiserror::Error)]
#[error("{0}: no longer in the queue")]
pub struct Removed(pub QueueId);

/// A message entered or left the queue (for the HA shadow copies, `ha::shadow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Joined the queue (every message, told once it is durable; the HA shadow
    /// copies in the background those its session did not copy: bounces, pushed
    /// messages, mail accepted while degraded).
    Queued(QueueId),
    /// Gone: delivered, bounced, deleted, pushed away or refused.
    Removed(QueueId),
    /// Its envelope was rewritten (a recipient finished, held or released by an
    /// administrator, retried): a shadow copy follows it.
    Updated(QueueId),
}

/// The queue's store. Clone it freely: clones share the store and the flusher.
#[derive(Clone)]
pub struct Spool {
    db: sled::Db,
    tree: sled::Tree,
    flush: std::sync::mpsc::Sender<Request>,
    /// Bodies over [`bodies::INLINE_MAX`], in files.
    bodies: Bodies,
    /// The other bodies, appended to segments.
    segments: Arc<Segments>,
    /// Wakes the queue manager when a message arrives.
    arrived: std::sync::Arc<tokio::sync::Notify>,
    /// Messages queued since the manager last looked (it schedules them at once).
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<QueueId>>>,
    /// Something changed envelopes behind the manager's back (an administrator's
    /// retry, release...): its schedule must be rebuilt from the store.
    rescan: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Messages written but not (yet) durable, or refused after a failed flush:
    /// invisible to every reader.
    unsettled: Arc<Mutex<HashSet<QueueId>>>,
    /// Who is changing which message now.
    claims: Arc<Claims>,
    /// Told of each [`Change`], once someone watches ([`Spool::watch_changes`]).
    changes: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Change>>>,
    /// Servers paused by an administrator.
    pauses: super::pause::Pauses,
}

impl Spool {
    /// Opens the spool in `db`, the sled store in directory `store`; must be called
    /// inside a tokio runtime. Starts the flusher thread.
    pub fn open(db: &sled::Db, store: &std::path::Path) -> Result<Spool> {
        let tree = db.open_tree("queue")?;
        // New ids are above every id queued before a restart (clock stepped back).
        if let Some((k, _)) = tree.scan_prefix(b"e\0").next_back().transpose()? {
            if let Ok(b) = <[u8; 8]>::try_from(&k[2..]) {
                QueueId::observe(QueueId::from_bytes(b));
            }
        }
        let halves = remove_half_messages(&tree)?;
        if halves > 0 {
            tracing::warn!(
                halves,
                "queue: removed message bodies without an envelope (left by a crash)"
            );
        }
        let bodies =
            Bodies::open(store).map_err(|e| anyhow!("{}: {e}", bodies::dir_of(store).display()))?;
        let orphans =
            bodies.remove_orphans(|id| tree.contains_key(key(b'f', id)).unwrap_or(true))?;
        if orphans > 0 {
            tracing::warn!(
                orphans,
                "queue: removed body files no message points to (left by a crash)"
            );
        }
        let segments = open_segments(&tree, store)?;
        Ok(Spool {
            db: db.clone(),
            tree,
            flush: durable::start(db.clone(), store, segments.clone())?,
            bodies,
            segments,
            arrived: std::sync::Arc::new(tokio::sync::Notify::new()),
            arrivals: Default::default(),
            rescan: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            unsettled: Default::default(),
            claims: Default::default(),
            changes: Default::default(),
            pauses: super::pause::Pauses::open(db)?,
        })
    }

    /// Every later [`Change`], in order; only the first caller gets them.
    pub fn watch_changes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Change>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.changes.set(tx).ok().map(|()| rx)
    }

    fn tell(&self, c: Change) {
        if let Some(tx) = self.changes.get() {
            let _ = tx.send(c);
        }
    }

    fn unsettled(&self) -> std::sync::MutexGuard<'_, HashSet<QueueId>> {
        self.unsettled.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn visible(&self, id: QueueId) -> bool {
        !self.unsettled().contains(&id)
    }

    /// Stores a message and waits until it is on disk. Only then may the caller
    /// say 250. On error the message is not queued (and never delivered): the
    /// caller says 451. An owned buffer (`Vec<u8>`) is freed as soon as sled has
    /// its copy, before the wait for the disk.
    pub async fn enqueue(&self, env: &Envelope, message: impl AsRef<[u8]>) -> Result<()> {
        self.enqueue_confirmed(env, message, async { Ok(()) }).await
    }

    /// Like [`Spool::enqueue`], but the message becomes part of the queue only if
    /// `confirm` (run while the local flush runs: the HA shadow copy) succeeds
    /// too; otherwise it is refused like a failed flush (never delivered).
    pub async fn enqueue_confirmed(
        &self,
        env: &Envelope,
        message: impl AsRef<[u8]>,
        confirm: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        let id = env.id;
        let record = encode(env)?;
        self.unsettled().insert(id);
        let body = self.stage_body(id, message.as_ref());
        drop(message);
        let (file, body_key, body_value) = body?;
        let tree = self.tree.clone();
        let write = move || {
            tree.insert(body_key, body_value)
                .and_then(|_| tree.insert(key(b'e', id), record))
                .map(drop)
                .map_err(|e| e.to_string())
        };
        self.commit(id, file, Box::new(write), None, confirm).await
    }

    /// Where the body of `id` goes: a small one appended to a segment (synced
    /// by the group commit with the record) and `s` → its place; a large one
    /// written to its file (to be synced first) and `f` → its length. On error
    /// `id` is no longer unsettled (nothing was stored).
    fn stage_body(
        &self,
        id: QueueId,
        octets: &[u8],
    ) -> Result<(Option<std::fs::File>, [u8; 10], sled::IVec)> {
        if octets.len() <= bodies::INLINE_MAX {
            return match self.segments.append(id, octets) {
                Ok(place) => Ok((None, key(b's', id), sled::IVec::from(&place.encode()[..]))),
                Err(e) => {
                    self.unsettled().remove(&id);
                    Err(anyhow!("queue body segment for {id}: {e}"))
                }
            };
        }
        // In the page cache until the flush: like sled's in-memory write, cheaper
        // here than a hop to a blocking thread.
        match self.bodies.write(id, octets) {
            Ok(file) => Ok((
                Some(file),
                key(b'f', id),
                sled::IVec::from(&(octets.len() as u64).to_be_bytes()[..]),
            )),
            Err(e) => {
                self.unsettled().remove(&id);
                Err(anyhow!("queue body file for {id}: {e}"))
            }
        }
    }

    /// Makes the store write of a new message: a small one at once, then waits for
    /// the disk; one with a body `file` in the flusher once the file is durable.
    /// Then settles it (see [`Spool::settle`]).
    /// `confirm` runs while the local flush runs (the HA shadow copy): the
    /// message joins the queue only if both succeed, else it is refused.
    async fn commit(
        &self,
        id: QueueId,
        file: Option<std::fs::File>,
        write: durable::Apply,
        record: Option<(&sled::Tree, &[u8])>,
        confirm: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        let flush = async {
            match file {
                None => match write() {
                    Ok(()) => self.durable().await,
                    Err(e) => Err(anyhow!("queue write failed: {e}")),
                },
                Some(file) => self.durable_after(file, write).await,
            }
        };
        let (flushed, confirmed) = tokio::join!(flush, confirm);
        self.settle(id, flushed.and(confirmed), record).await?;
        self.tell(Change::Queued(id));
        Ok(())
    }

    /// Like [`Spool::enqueue`], writing `other_key` → `other_value` into `other` in the same
    /// atomic write as the message (a record that it was taken, e.g. a
    /// tombstone): after a crash both are there or neither. If the flush fails,
    /// the record is removed with the message.
    pub async fn enqueue_recorded(
        &self,
        env: &Envelope,
        message: &[u8],
        other: &sled::Tree,
        other_key: &[u8],
        other_value: &[u8],
    ) -> Result<()> {
        use sled::Transactional;
        let id = env.id;
        let record = encode(env)?;
        self.unsettled().insert(id);
        let (file, b, body) = self.stage_body(id, message)?;
        let (tree, o_tree) = (self.tree.clone(), other.clone());
        let (o_key, o_value) = (other_key.to_vec(), other_value.to_vec());
        let write = move || {
            (&tree, &o_tree)
                .transaction(|(q, o)| {
                    q.insert(&key(b'e', id)[..], record.as_slice())?;
                    q.insert(&b[..], body.clone())?;
                    o.insert(o_key.as_slice(), o_value.as_slice())?;
                    Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| format!("{e:?}"))
        };
        self.commit(id, file, Box::new(write), Some((other, other_key)), async {
            Ok(())
        })
        .await
    }

    /// After the flush of the write of `id`: makes it visible and wakes the
    /// manager. If the flush failed, the message (and `record`, written with it)
    /// is refused: never delivered, and the caller says 451.
    async fn settle(
        &self,
        id: QueueId,
        flushed: Result<()>,
        record: Option<(&sled::Tree, &[u8])>,
    ) -> Result<()> {
        if let Err(e) = flushed {
            if let Some((tree, key)) = record {
                if let Err(e) = tree.remove(key) {
                    tracing::error!(%id, error = %e, "queue flush failed: its record could not be removed");
                }
            }
            self.refuse(id).await;
            return Err(e);
        }
        self.unsettled().remove(&id);
        self.announce(id);
        Ok(())
    }

    fn announce(&self, id: QueueId) {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        self.arrived.notify_one();
    }

    /// A message whose flush failed: removed, and invisible for the life of this
    /// process unless the removal is known durable (its octets may have reached
    /// the disk even so: the removal must too, or a restart would deliver it).
    async fn refuse(&self, id: QueueId) {
        self.tell(Change::Removed(id));
        let place = self.place(id).ok().flatten();
        let removed = match remove_keys(&self.tree, id) {
            Ok(()) => self.durable().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match removed {
            Ok(()) => {
                self.unlink(id, place);
                self.unsettled().remove(&id);
                tracing::warn!(%id, "queue flush failed: message refused and removed");
            }
            Err(e) => tracing::error!(%id, error = %e,
                "queue flush failed: message refused; its removal is not yet durable (kept invisible)"),
        }
    }

    /// Wakes the queue manager after envelopes changed outside it (`queue retry`,
    /// `release`...): it rebuilds its schedule from the store.
    pub fn wake(&self) {
        self.rescan.store(true, std::sync::atomic::Ordering::SeqCst);
        self.arrived.notify_one();
    }

    /// Wakes the queue manager without a rebuild (its own schedule is current).
    pub fn nudge(&self) {
        self.arrived.notify_one();
    }

    /// Messages queued since the last call.
    pub fn take_arrivals(&self) -> Vec<QueueId> {
        std::mem::take(&mut *self.arrivals.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether a rebuild was asked for since the last call.
    pub fn take_rescan(&self) -> bool {
        self.rescan.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves when a message has been queued since the last call (or at once if
    /// one was queued meanwhile).
    pub async fn arrival(&self) {
        self.arrived.notified().await
    }

    /// Rewrites a message's envelope (recipient states) and waits until it is on
    /// disk. [`Removed`] if the message left the queue: never re-created.
    pub async fn update(&self, env: &Envelope) -> Result<()> {
        self.put(env)?;
        self.durable().await
    }

    /// Rewrites a message's envelope in the store without waiting for the disk
    /// (follow with [`Spool::durable`]). [`Removed`] if the message left the queue.
    pub fn put(&self, env: &Envelope) -> Result<()> {
        if !self.visible(env.id) {
            return Err(Removed(env.id).into());
        }
        let new = encode(env)?;
        let mut present = false;
        // Atomic in the store: an envelope removed meanwhile stays removed.
        self.tree.fetch_and_update(key(b'e', env.id), |old| {
            present = old.is_some();
            old.map(|_| new.clone())
        })?;
        if !present {
            return Err(Removed(env.id).into());
        }
        self.tell(Change::Updated(env.id));
        Ok(())
    }

    /// Removes a message (envelope and octets, atomically) and waits until it is
    /// on disk; then unlinks its body file, if any.
    pub async fn remove(&self, id: QueueId) -> Result<()> {
        // A damaged place record: the segment is kept until the next start.
        let place = self.place(id).ok().flatten();
        remove_keys(&self.tree, id)?;
        self.tell(Change::Removed(id));
        self.durable().await?;
        self.unlink(id, place);
        Ok(())
    }

    /// Frees the body of a message whose removal is durable: its place in a
    /// segment, or its file (a failure leaves an orphan, removed at the next
    /// start).
    fn unlink(&self, id: QueueId, place: Option<Place>) {
        if let Some(p) = place {
            self.segments.release(p.segment, id);
            return;
        }
        if let Err(e) = self.bodies.remove(id) {
            tracing::warn!(%id, error = %e, "queue: body file not removed (removed at the next start)");
        }
    }

    /// Where the body of `id` is in a segment, if it is in one.
    fn place(&self, id: QueueId) -> Result<Option<Place>> {
        let Some(v) = self.tree.get(key(b's', id))? else {
            return Ok(None);
        };
        Place::decode(&v)
            .map(Some)
            .ok_or_else(|| anyhow!("{id}: damaged body place record"))
    }

    /// The body of `id` from its segment: None if it has none; Some(None) (and
    /// an error logged) if it is not there whole.
    fn segment_body(&self, id: QueueId) -> Result<Option<Option<Vec<u8>>>> {
        let Some(v) = self.tree.get(key(b's', id))? else {
            return Ok(None);
        };
        let body = match Place::decode(&v) {
            Some(place) => self.segments.read(&place)?,
            None => None,
        };
        if body.is_none() {
            tracing::error!(%id, place = ?Place::decode(&v),
                "queue: the message's body is missing from its segment or damaged (never acknowledged, or a damaged store)");
        }
        Ok(Some(body))
    }

    /// Waits for everything written so far to be on disk (shared flush).
    pub async fn durable(&self) -> Result<()> {
        self.request(Request::wait).await
    }

    /// Has the flusher sync the body `file`, then make `write`, then flush.
    async fn durable_after(&self, file: std::fs::File, write: durable::Apply) -> Result<()> {
        self.request(|done| Request {
            files: vec![file],
            then: Some(write),
            done,
        })
        .await
    }

    async fn request(&self, make: impl FnOnce(durable::Waiter) -> Request) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.flush
            .send(make(tx))
            .map_err(|_| anyhow!("the queue flusher has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("the queue flusher has stopped"))?
            .map_err(|e| anyhow!("queue flush failed: {e}"))
    }

    /// Who is changing which message now (shared by every clone).
    pub fn claims(&self) -> &Arc<Claims> {
        &self.claims
    }

    /// The servers paused by an administrator (shared by every clone).
    pub fn pauses(&self) -> &super::pause::Pauses {
        &self.pauses
    }

    /// The sled handle (shared with the catalog).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

/// Opens the body segments of the store, knowing every place the queue points to.
fn open_segments(tree: &sled::Tree, store: &std::path::Path) -> Result<Arc<Segments>> {
    let mut placed = Vec::new();
    for r in tree.scan_prefix(b"s\0") {
        let (k, v) = r?;
        if let (Ok(b), Some(p)) = (<[u8; 8]>::try_from(&k[2..]), Place::decode(&v)) {
            placed.push((QueueId::from_bytes(b), p));
        }
    }
    let dir = super::segments::dir_of(store);
    let (segments, orphans) =
        Segments::open(store, placed).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
    if orphans > 0 {
        tracing::warn!(
            orphans,
            "queue: removed body segments no message points to (left by a crash)"
        );
    }
    Ok(Arc::new(segments))
}

/// Removes every key of a message, its envelope first (see the module doc).
fn remove_keys(tree: &sled::Tree, id: QueueId) -> sled::Result<()> {
    for kind in [b'e', b'b', b'f', b's'] {
        tree.remove(key(kind, id))?;
    }
    Ok(())
}

/// Removes the body keys (`b`, `f`, `s`) no envelope goes with: left by a
/// crash between the two writes of a message, or of its removal. Returns how
/// many.
fn remove_half_messages(tree: &sled::Tree) -> Result<usize> {
    let mut removed = 0;
    for kind in [b'b', b'f', b's'] {
        for k in tree.scan_prefix([kind, 0]).keys() {
            let k = k?;
            let Ok(b) = <[u8; 8]>::try_from(&k[2..]) else {
                continue;
            };
            if !tree.contains_key(key(b'e', QueueId::from_bytes(b)))? {
                tree.remove(&k)?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
