//! The spool: messages in sled, written atomically and made durable before the
//! SMTP 250.
//!
//! Layout (tree `queue`): `e\0<id>` → envelope, `b\0<id>` → the message octets as
//! queued (our Received header first). Both keys of a message go in one
//! `apply_batch`, which sled recovers all or nothing: a crash never leaves half a
//! message. Records start with a format version byte.
//!
//! Durability: [`Spool::enqueue`] returns only after the message is on disk (group
//! commit with a real fdatasync: see `durable`). A message is in the queue — seen
//! by the manager, the CLI and the HA push — only once it is durable; if its flush
//! fails it is removed and never delivered (the client got 451).
//!
//! Ownership: envelope changes are made under the message's claim (see `claim`),
//! and [`Spool::update`] never re-creates a removed message: a stale writer gets
//! [`Removed`] instead of making an envelope without octets.

use super::claim::Claims;
use super::durable::{self, Waiter};
use super::QueueId;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

const FORMAT: u8 = 4;

/// Where a recipient stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientState {
    /// Not yet routed: the first attempt may fail over.
    Pending,
    /// Kept in the queue: retried on the home server only (see `route`).
    Held,
    /// A server took it (2xx after DATA).
    Delivered {
        server: String,
        reply: String,
        at: u64,
    },
    /// Permanently refused, or expired.
    Failed { reply: String, at: u64 },
    /// Permanently refused or expired, kept for an administrator instead of bounced
    /// (`routing.hold_undeliverable`): `queue release`, `queue bounce` or `queue delete`.
    Undeliverable { reply: String, at: u64 },
}

impl RecipientState {
    /// Delivered or failed: nothing more to do for this recipient.
    /// No more automatic attempts: delivered, failed, or undeliverable (waiting for
    /// an administrator).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RecipientState::Delivered { .. }
                | RecipientState::Failed { .. }
                | RecipientState::Undeliverable { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The forward-path as the client gave it (source route dropped).
    pub address: String,
    /// The catalog mailbox it belongs to (primary address); empty for an address
    /// outside the catalog (a bounce to an outside sender).
    pub mailbox: String,
    pub state: RecipientState,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Milliseconds since the epoch of the next attempt (0: now).
    pub next_attempt: u64,
    /// The last routing decision and why, and the last error, for `queue show`.
    pub last_route: Option<String>,
    pub last_error: Option<String>,
    /// Failed and its bounce queued (or none owed: null sender).
    pub reported: bool,
    /// When it expires, in milliseconds since the epoch; 0: the message's arrival
    /// plus `max_queue_lifetime` (a released recipient gets a new lifetime).
    pub expires_at: u64,
}

impl Recipient {
    pub fn new(address: String, mailbox: String) -> Recipient {
        Recipient {
            address,
            mailbox,
            state: RecipientState::Pending,
            attempts: 0,
            next_attempt: 0,
            last_route: None,
            last_error: None,
            reported: false,
            expires_at: 0,
        }
    }

    /// Failed and no bounce queued yet.
    pub fn needs_bounce(&self) -> bool {
        matches!(self.state, RecipientState::Failed { .. }) && !self.reported
    }

    /// Nothing more to do: delivered, or failed and reported.
    pub fn is_done(&self) -> bool {
        match self.state {
            RecipientState::Delivered { .. } => true,
            RecipientState::Failed { .. } => self.reported,
            _ => false,
        }
    }
}

/// Everything about a queued message except its octets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    /// Reverse-path; None for the null sender `<>`.
    pub sender: Option<String>,
    pub recipients: Vec<Recipient>,
    pub client_ip: IpAddr,
    pub helo: String,
    /// Milliseconds since the epoch.
    pub received_at: u64,
    /// Octets of the queued message (Received header included).
    pub size: u64,
    pub smtputf8: bool,
    pub eight_bit: bool,
}

fn key(kind: u8, id: QueueId) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = kind;
    k[2..].copy_from_slice(&id.to_bytes());
    k
}

fn encode(env: &Envelope) -> Result<Vec<u8>> {
    let mut v = vec![FORMAT];
    v.extend(bincode::serde::encode_to_vec(
        env,
        bincode::config::standard(),
    )?);
    Ok(v)
}

fn decode(bytes: &[u8]) -> Result<Envelope> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            Ok(bincode::serde::decode_from_slice(rest, bincode::config::standard())?.0)
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

/// The queue's store. Clone it freely: clones share the store and the flusher.
#[derive(Clone)]
pub struct Spool {
    db: sled::Db,
    tree: sled::Tree,
    flush: std::sync::mpsc::Sender<Waiter>,
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
        Ok(Spool {
            db: db.clone(),
            tree,
            flush: durable::start(db.clone(), store)?,
            arrived: std::sync::Arc::new(tokio::sync::Notify::new()),
            arrivals: Default::default(),
            rescan: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            unsettled: Default::default(),
            claims: Default::default(),
        })
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
        let id = env.id;
        let mut batch = sled::Batch::default();
        batch.insert(&key(b'e', id), encode(env)?);
        batch.insert(&key(b'b', id), message.as_ref());
        drop(message);
        self.unsettled().insert(id);
        // In memory until the flush: cheaper here than a hop to a blocking thread
        // (measured: fewer thread switches per message).
        if let Err(e) = self.tree.apply_batch(batch) {
            self.unsettled().remove(&id);
            return Err(e.into());
        }
        self.settle(id, None).await
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
        let (e, b) = (key(b'e', id), key(b'b', id));
        let record = encode(env)?;
        self.unsettled().insert(id);
        let written = (&self.tree, other).transaction(|(q, o)| {
            q.insert(&e[..], record.as_slice())?;
            q.insert(&b[..], message)?;
            o.insert(other_key, other_value)?;
            Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
        });
        if let Err(e) = written {
            self.unsettled().remove(&id);
            return Err(anyhow!("queue write failed: {e:?}"));
        }
        self.settle(id, Some((other, other_key))).await
    }

    /// Waits until the write of `id` is on disk, then makes it visible and wakes
    /// the manager. If the flush fails, the message (and `record`, written with
    /// it) is refused: never delivered, and the caller says 451.
    async fn settle(&self, id: QueueId, record: Option<(&sled::Tree, &[u8])>) -> Result<()> {
        if let Err(e) = self.durable().await {
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
        let mut batch = sled::Batch::default();
        batch.remove(&key(b'e', id));
        batch.remove(&key(b'b', id));
        let removed = match self.tree.apply_batch(batch) {
            Ok(()) => self.durable().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match removed {
            Ok(()) => {
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
        Ok(())
    }

    /// Removes a message (envelope and octets, atomically) and waits until it is on disk.
    pub async fn remove(&self, id: QueueId) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.remove(&key(b'e', id));
        batch.remove(&key(b'b', id));
        self.tree.apply_batch(batch)?;
        self.durable().await
    }

    /// Waits for everything written so far to be on disk (shared flush).
    pub async fn durable(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.flush
            .send(tx)
            .map_err(|_| anyhow!("the queue flusher has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("the queue flusher has stopped"))?
            .map_err(|e| anyhow!("queue flush failed: {e}"))
    }

    pub fn envelope(&self, id: QueueId) -> Result<Option<Envelope>> {
        if !self.visible(id) {
            return Ok(None);
        }
        self.tree
            .get(key(b'e', id))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The envelope of `id` if the whole message is there to deliver. An envelope
    /// without its octets (a "zombie" an older version's stale write could make)
    /// can never be delivered: it is removed, durably, and None returned.
    pub async fn deliverable(&self, id: QueueId) -> Result<Option<Envelope>> {
        let Some(env) = self.envelope(id)? else {
            return Ok(None);
        };
        if self.tree.contains_key(key(b'b', id))? {
            return Ok(Some(env));
        }
        tracing::warn!(%id, "queue: removed an envelope without message octets (left by an older version)");
        self.remove(id).await?;
        Ok(None)
    }

    pub fn message(&self, id: QueueId) -> Result<Option<Vec<u8>>> {
        if !self.visible(id) {
            return Ok(None);
        }
        Ok(self.tree.get(key(b'b', id))?.map(|v| v.to_vec()))
    }

    /// Every envelope, oldest first.
    pub fn envelopes(&self) -> Result<Vec<Envelope>> {
        let unsettled = self.unsettled().clone();
        let mut all = Vec::new();
        for r in self.tree.scan_prefix(b"e\0") {
            let env = decode(&r?.1)?;
            if !unsettled.contains(&env.id) {
                all.push(env);
            }
        }
        Ok(all)
    }

    /// Every envelope, oldest first, decoded one at a time as the caller goes
    /// (a page of a long queue decodes only what it shows).
    pub fn scan(&self) -> impl Iterator<Item = Result<Envelope>> + '_ {
        self.tree
            .scan_prefix(b"e\0")
            .map(|r| r.map_err(anyhow::Error::from).and_then(|(_, v)| decode(&v)))
    }

    /// The oldest message in the queue (ids sort by arrival).
    pub fn oldest(&self) -> Result<Option<QueueId>> {
        match self.tree.scan_prefix(b"e\0").next() {
            Some(r) => Ok(Some(decode(&r?.1)?.id)),
            None => Ok(None),
        }
    }

    /// How many messages are stored (a message whose flush is in progress may be
    /// counted: for gauges, not decisions; so may [`Spool::oldest`]).
    pub fn len(&self) -> usize {
        self.tree.scan_prefix(b"e\0").count()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.scan_prefix(b"e\0").next().is_none()
    }

    /// Who is changing which message now (shared by every clone).
    pub fn claims(&self) -> &Arc<Claims> {
        &self.claims
    }

    /// The sled handle (shared with the catalog).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(n: usize) -> Envelope {
        Envelope {
            id: QueueId::new(),
            sender: Some(format!("s{n}@x.test")),
            recipients: vec![Recipient::new("r@y.test".into(), "r@y.test".into())],
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "client".into(),
            received_at: 0,
            size: 5,
            smtputf8: false,
            eight_bit: false,
        }
    }

    #[tokio::test]
    async fn concurrent_enqueues_are_all_stored_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let spool = Spool::open(&db, dir.path()).unwrap();
        let mut tasks = Vec::new();
        for n in 0..50 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                let env = envelope(n);
                spool
                    .enqueue(&env, format!("body {n}").as_bytes())
                    .await
                    .unwrap();
                env
            }));
        }
        let mut envs = Vec::new();
        for t in tasks {
            envs.push(t.await.unwrap());
        }
        assert_eq!(spool.len(), 50);
        for env in &envs {
            assert_eq!(spool.envelope(env.id).unwrap().as_ref(), Some(env));
            let n = env
                .sender
                .as_ref()
                .unwrap()
                .trim_start_matches('s')
                .trim_end_matches("@x.test");
            assert_eq!(
                spool.message(env.id).unwrap().unwrap(),
                format!("body {n}").as_bytes()
            );
        }
        let listed = spool.envelopes().unwrap();
        assert!(listed.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    }

    #[tokio::test]
    async fn an_update_never_recreates_a_removed_message() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let spool = Spool::open(&db, dir.path()).unwrap();
        let mut env = envelope(1);
        spool.enqueue(&env, b"body").await.unwrap();
        env.recipients[0].attempts = 1;
        spool.update(&env).await.unwrap();
        spool.remove(env.id).await.unwrap();
        // A stale writer (a delivery or a command that read it before the removal).
        let e = spool.update(&env).await.unwrap_err();
        assert!(e.is::<Removed>(), "{e}");
        assert_eq!(spool.envelope(env.id).unwrap(), None);
        assert!(spool.envelopes().unwrap().is_empty());
        assert_eq!(spool.len(), 0);
    }

    #[tokio::test]
    async fn an_envelope_without_octets_is_not_deliverable_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let spool = Spool::open(&db, dir.path()).unwrap();
        let (whole, zombie) = (envelope(1), envelope(2));
        spool.enqueue(&whole, b"body").await.unwrap();
        spool.enqueue(&zombie, b"body").await.unwrap();
        spool.tree.remove(key(b'b', zombie.id)).unwrap();
        assert_eq!(spool.deliverable(whole.id).await.unwrap(), Some(whole));
        assert_eq!(spool.deliverable(zombie.id).await.unwrap(), None);
        assert_eq!(spool.envelope(zombie.id).unwrap(), None);
        assert_eq!(spool.len(), 1);
    }
}
