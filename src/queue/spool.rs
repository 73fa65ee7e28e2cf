//! The spool: messages in sled, written atomically and made durable before the
//! SMTP 250.
//!
//! Layout (tree `queue`): `e\0<id>` → envelope, `b\0<id>` → the message octets as
//! queued (our Received header first). Both keys of a message go in one
//! `apply_batch`, which sled recovers all or nothing: a crash never leaves half a
//! message. Records start with a format version byte.
//!
//! Durability: [`Spool::enqueue`] returns only after the log holding the message is
//! on disk. Sessions finishing DATA at the same time share one flush (group
//! commit): a flusher thread takes every request waiting, flushes once, and answers
//! them all.

use super::QueueId;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
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

type Waiter = oneshot::Sender<Result<(), String>>;

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
}

impl Spool {
    /// Opens the spool in `db`; must be called inside a tokio runtime (it starts
    /// the flusher task).
    pub fn open(db: &sled::Db) -> Result<Spool> {
        let tree = db.open_tree("queue")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let flushed = db.clone();
        std::thread::Builder::new()
            .name("queue-flusher".into())
            .spawn(move || flusher(flushed, rx))?;
        Ok(Spool {
            db: db.clone(),
            tree,
            flush: tx,
            arrived: std::sync::Arc::new(tokio::sync::Notify::new()),
            arrivals: Default::default(),
            rescan: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
    }

    /// Stores a message and waits until it is on disk. Only then may the caller
    /// say 250.
    pub async fn enqueue(&self, env: &Envelope, message: &[u8]) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(&key(b'e', env.id), encode(env)?);
        batch.insert(&key(b'b', env.id), message);
        // In memory until the flush: cheaper here than a hop to a blocking thread
        // (measured: fewer thread switches per message).
        self.tree.apply_batch(batch)?;
        self.durable().await?;
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(env.id);
        self.arrived.notify_one();
        Ok(())
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

    /// Rewrites a message's envelope (recipient states) and waits until it is on disk.
    pub async fn update(&self, env: &Envelope) -> Result<()> {
        self.tree.insert(key(b'e', env.id), encode(env)?)?;
        self.durable().await
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
        self.tree
            .get(key(b'e', id))?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn message(&self, id: QueueId) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key(b'b', id))?.map(|v| v.to_vec()))
    }

    /// Every envelope, oldest first.
    pub fn envelopes(&self) -> Result<Vec<Envelope>> {
        self.tree
            .scan_prefix(b"e\0")
            .map(|r| decode(&r?.1))
            .collect()
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

    pub fn len(&self) -> usize {
        self.tree.scan_prefix(b"e\0").count()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.scan_prefix(b"e\0").next().is_none()
    }

    /// The sled handle (shared with the catalog).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

/// Flushes on behalf of every waiter that queued up while the previous flush ran.
/// The flusher thread: takes every waiting request, flushes once, answers them
/// all; ends when every [`Spool`] is gone.
fn flusher(db: sled::Db, rx: std::sync::mpsc::Receiver<Waiter>) {
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        tracing::trace!(shared = waiters.len(), "queue flush");
        for w in waiters {
            let _ = w.send(result.clone());
        }
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
        let spool = Spool::open(&db).unwrap();
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
}
