//! Shadow redundancy, the SLAVE's side: the shadow copies of the MASTER's
//! messages, in their own sled tree (`ha.shadow`: never the queue, so a SLAVE
//! never delivers them), made durable with the spool's group commit before the
//! MASTER is answered. They survive a restart.
//!
//! Pipelined ([`Ha::serve_shadows`]): the MASTER's shadow connection carries
//! numbered batches without waiting for each answer. Each batch is applied to
//! the tree as it arrives (in order) and handed to the spool's group commit; the
//! answers go back in order, each once its batch is durable. Batches that arrive
//! while a flush runs share the next one: one fdatasync for all of them.
//!
//! At a transition to MASTER ([`Ha::shadows_on_master`]): when the MASTER is lost
//! (no answer, or the peer is up but not MASTER), every shadow is promoted into
//! the queue under its own id, with a tombstone (the push's "same message" rule,
//! [`crate::queue::tombstone`]) in the same atomic write, so the old MASTER's later
//! push of the same message is recognised and not stored twice. A shadow of a
//! message the old MASTER delivered within its last release interval is delivered
//! again: counted (`clustermail_shadow_promoted_total`) and logged per message.
//! When the unit becomes MASTER while the peer is a live MASTER (`ha set-mode`,
//! `ha restore`, a takeover from a MASTER whose SMTP failed), the shadows are
//! dropped instead: that MASTER still holds those messages and pushes them when
//! it steps down.

use super::link::{Link, LinkReader, LinkWriter, Msg};
use super::shadow::{Op, METRICS};
use super::shadow_link::WINDOW;
use super::state::Mode;
use super::Ha;
use crate::queue::tombstone::{self, Tombstones};
use crate::queue::{Envelope, QueueId, RecipientState};
use anyhow::{bail, Result};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const FORMAT: u8 = 1;

/// A batch received: its number and its flush (or why it was refused).
type Due = (u64, Result<JoinHandle<Result<()>>, String>);

/// The shadow tree: `id (8, BE: arrival order)` → format ‖ bincode (envelope, octets).
#[derive(Clone)]
pub struct Store {
    tree: sled::Tree,
    /// How many shadows the tree holds (sled counts by iterating the whole
    /// tree); held while the tree changes, so that it stays exact.
    count: Arc<Mutex<u64>>,
}

fn encode(env: &Envelope, message: &[u8]) -> Result<Vec<u8>> {
    let mut v = vec![FORMAT];
    v.extend(bincode::serde::encode_to_vec(
        (env, message),
        bincode::config::standard(),
    )?);
    Ok(v)
}

fn decode(bytes: &[u8]) -> Result<(Envelope, Vec<u8>)> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            Ok(bincode::serde::decode_from_slice(rest, bincode::config::standard())?.0)
        }
        Some((v, _)) => bail!("shadow record format {v} is not known to this version"),
        None => bail!("empty shadow record"),
    }
}

impl Store {
    pub fn open(db: &sled::Db) -> Result<Store> {
        let tree = db.open_tree("ha.shadow")?;
        let count = Arc::new(Mutex::new(tree.len() as u64));
        Ok(Store { tree, count })
    }

    fn count(&self) -> MutexGuard<'_, u64> {
        self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many shadows, and the arrival time (ms) of the oldest.
    pub fn stats(&self) -> (u64, Option<u64>) {
        let oldest = self
            .tree
            .first()
            .ok()
            .flatten()
            .and_then(|(k, _)| <[u8; 8]>::try_from(&k[..]).ok())
            .map(|b| QueueId::from_bytes(b).millis());
        (*self.count(), oldest)
    }

    fn apply(&self, ops: &[Op]) -> Result<()> {
        let mut count = self.count();
        let mut batch = sled::Batch::default();
        // Whether each key of the batch is there once it is applied.
        let mut there: HashMap<[u8; 8], bool> = HashMap::new();
        for op in ops {
            let (key, put) = match op {
                Op::Put { envelope, message } => {
                    let key = envelope.id.to_bytes();
                    batch.insert(&key, encode(envelope, message)?);
                    (key, true)
                }
                Op::Drop(id) => {
                    batch.remove(&id.to_bytes());
                    (id.to_bytes(), false)
                }
            };
            there.insert(key, put);
        }
        let mut n = *count;
        for (key, put) in &there {
            match (self.tree.contains_key(key)?, put) {
                (false, true) => n += 1,
                (true, false) => n = n.saturating_sub(1),
                _ => {}
            }
        }
        self.tree.apply_batch(batch)?;
        *count = n;
        Ok(())
    }

    /// Drops every shadow.
    fn clear(&self) -> Result<()> {
        let mut count = self.count();
        self.tree.clear()?;
        *count = 0;
        Ok(())
    }

    /// Drops the shadow of `key` (promoted).
    fn remove(&self, key: &[u8]) -> Result<()> {
        let mut count = self.count();
        if self.tree.remove(key)?.is_some() {
            *count = count.saturating_sub(1);
        }
        Ok(())
    }

    /// Keeps only the shadows of `held`; returns those of `held` it lacks.
    fn sync(&self, held: &[QueueId]) -> Result<Vec<QueueId>> {
        let mut count = self.count();
        let keep: HashSet<[u8; 8]> = held.iter().map(|i| i.to_bytes()).collect();
        let mut batch = sled::Batch::default();
        let mut have = HashSet::new();
        for k in self.tree.iter().keys() {
            let k = k?;
            match <[u8; 8]>::try_from(&k[..]) {
                Ok(b) if keep.contains(&b) => {
                    have.insert(b);
                }
                _ => batch.remove(k),
            }
        }
        self.tree.apply_batch(batch)?;
        *count = have.len() as u64;
        Ok(held
            .iter()
            .filter(|i| !have.contains(&i.to_bytes()))
            .copied()
            .collect())
    }

    fn publish(&self) -> (u64, u64) {
        let (held, oldest) = self.stats();
        let oldest = oldest.unwrap_or(0);
        METRICS.held.store(held, Ordering::Relaxed);
        METRICS.oldest.store(oldest, Ordering::Relaxed);
        (held, oldest)
    }
}

impl Ha {
    /// As SLAVE: a shadow connection's first request.
    pub(super) async fn answer_shadow_sync(&self, held: Vec<QueueId>) -> Msg {
        if self.mode() != Mode::Slave {
            return Msg::Refused(format!("this unit is {}, not SLAVE", self.mode()));
        }
        let missing = match self.shadows.sync(&held) {
            Ok(m) => m,
            Err(e) => return Msg::Refused(format!("shadow store: {e:#}")),
        };
        if let Err(e) = self.spool.durable().await {
            return Msg::Refused(format!("shadow store: {e:#}"));
        }
        self.shadows.publish();
        Msg::ShadowMissing(missing)
    }

    /// As SLAVE: a shadow connection, from its first request (the MASTER's
    /// reconciliation) to its end: numbered batches, pipelined (module doc).
    pub(super) async fn serve_shadows(self: &Arc<Self>, mut link: Link, held: Vec<QueueId>) {
        let answer = self.answer_shadow_sync(held).await;
        let go_on = matches!(answer, Msg::ShadowMissing(_));
        if link.send(&answer).await.is_err() || !go_on {
            return;
        }
        let (reader, writer) = link.split();
        let (tx, rx) = mpsc::channel(2 * WINDOW);
        let reading = async {
            self.read_shadows(reader, tx).await;
            // The answers already due still go out; then the writer ends.
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = reading => {}
            _ = self.write_shadowed(writer, rx) => {}
        }
    }

    /// Applies each batch as it arrives and hands its durability to the writer.
    async fn read_shadows(self: &Arc<Self>, mut reader: LinkReader, tx: mpsc::Sender<Due>) {
        while let Ok(msg) = reader.recv().await {
            let due = match msg {
                Msg::Shadow { batch, ops } => (batch, self.apply_shadows(batch, &ops)),
                other => (0, Err(format!("unexpected request {other:?}"))),
            };
            let failed = due.1.is_err();
            if tx.send(due).await.is_err() || failed {
                return;
            }
        }
    }

    /// Keeps and drops shadows; the flush that makes them durable, started.
    fn apply_shadows(
        self: &Arc<Self>,
        batch: u64,
        ops: &[Op],
    ) -> Result<JoinHandle<Result<()>>, String> {
        if self.mode() != Mode::Slave {
            return Err(format!("this unit is {}, not SLAVE", self.mode()));
        }
        let (start, ops_len) = (std::time::Instant::now(), ops.len());
        self.shadows
            .apply(ops)
            .map_err(|e| format!("shadow store: {e:#}"))?;
        let applied = start.elapsed();
        // The spool's group commit: one fdatasync for every write of the store.
        let spool = self.spool.clone();
        Ok(tokio::spawn(async move {
            let r = spool.durable().await;
            tracing::debug!(
                batch,
                ops = ops_len,
                apply_us = applied.as_micros() as u64,
                durable_us = (start.elapsed() - applied).as_micros() as u64,
                "HA shadow: batch durable"
            );
            r
        }))
    }

    /// Answers the batches in order, each once durable; a failed one is
    /// answered `Refused` and ends the connection.
    async fn write_shadowed(&self, mut writer: LinkWriter, mut due: mpsc::Receiver<Due>) {
        while let Some((batch, flush)) = due.recv().await {
            let durable = match flush {
                Ok(f) => match f.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("shadow store: {e:#}")),
                    Err(e) => Err(format!("shadow store: {e}")),
                },
                Err(why) => Err(why),
            };
            let answer = match &durable {
                Ok(()) => {
                    let (held, oldest) = self.shadows.publish();
                    Msg::Shadowed {
                        batch,
                        held,
                        oldest,
                    }
                }
                Err(why) => Msg::Refused(why.clone()),
            };
            if writer.send(&answer).await.is_err() || durable.is_err() {
                return;
            }
        }
    }

    /// This unit has just become MASTER: promotes its shadows if the peer was
    /// lost or is not MASTER (`peer_is_master`: heard as MASTER at this very
    /// tick), drops them otherwise (see the module doc).
    pub(super) async fn shadows_on_master(&self, peer_is_master: bool) {
        let (held, _) = self.shadows.stats();
        if held == 0 {
            return;
        }
        if peer_is_master {
            let _ = self.shadows.clear();
            let _ = self.spool.durable().await;
            self.shadows.publish();
            self.status().event(format!(
                "MASTER while the peer is a live MASTER: {held} shadow copies dropped"
            ));
            tracing::info!(
                dropped = held,
                "HA shadow: MASTER while the peer is a live MASTER: its shadows dropped (it holds those messages and pushes them when it steps down)"
            );
            return;
        }
        match self.promote().await {
            Ok(n) => {
                self.status().event(format!(
                    "the MASTER was lost: {n} shadow copies promoted into the queue"
                ));
                tracing::warn!(
                    promoted = n,
                    "HA shadow: the MASTER was lost: its shadow copies promoted into the queue"
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "HA shadow: promoting shadow copies failed (kept; retried at the next change to MASTER)")
            }
        }
        self.shadows.publish();
    }

    /// Every shadow into the queue (with its tombstone), then out of the shadows.
    async fn promote(&self) -> Result<u64> {
        let now = crate::queue::manager::now_ms();
        let mut promoted = 0;
        for r in self.shadows.tree.iter() {
            let (k, v) = r?;
            let (mut env, message) = match decode(&v) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "HA shadow: unreadable shadow copy kept");
                    continue;
                }
            };
            let id = env.id;
            let digest = tombstone::digest(&env, &message);
            let taken =
                self.tombstones.find(id, &digest)?.is_some() || self.spool.envelope(id)?.is_some();
            if !taken {
                for r in &mut env.recipients {
                    if matches!(r.state, RecipientState::Pending | RecipientState::Held) {
                        r.next_attempt = now;
                    }
                }
                let e = Tombstones::entry(id, &digest, id, now);
                self.spool
                    .enqueue_recorded(&env, &message, self.tombstones.tree(), &e.key, &e.value)
                    .await?;
                METRICS.promoted.inc();
                promoted += 1;
                let from = env.sender.as_deref().unwrap_or("<>");
                tracing::warn!(%id, from, rcpts = env.recipients.len(), "HA shadow: shadow copy promoted into the queue (a duplicate if the lost MASTER delivered it within its last release interval)");
            }
            self.shadows.remove(&k)?;
        }
        self.spool.durable().await?;
        Ok(promoted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Recipient;

    fn env(id: u64) -> Envelope {
        Envelope {
            id: QueueId(id << 20),
            sender: Some("s@x.test".into()),
            recipients: vec![Recipient::new("u@c.test".into(), "u@c.test".into())],
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "h".into(),
            received_at: 0,
            size: 5,
            smtputf8: false,
            eight_bit: false,
        }
    }

    #[test]
    fn shadows_are_kept_dropped_and_reconciled() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let s = Store::open(&db).unwrap();
        let put = |n| Op::Put {
            envelope: env(n),
            message: Arc::new(format!("m{n}").into_bytes()),
        };
        s.apply(&[put(1), put(2), put(3), Op::Drop(env(2).id)])
            .unwrap();
        assert_eq!(s.stats(), (2, Some(1)));
        let (e, m) = decode(&s.tree.get(env(3).id.to_bytes()).unwrap().unwrap()).unwrap();
        assert_eq!((e, m), (env(3), b"m3".to_vec()));
        // The MASTER holds 3 and 4: 1 was released while the link was down.
        let missing = s.sync(&[env(3).id, env(4).id]).unwrap();
        assert_eq!(missing, [env(4).id]);
        assert_eq!(s.stats(), (1, Some(3)));
    }
}
