//! Shadow redundancy, the SLAVE's side: the shadow copies of the MASTER's
//! messages, in their own sled tree (`ha.shadow`: never the queue, so a SLAVE
//! never delivers them) whose records point to the octets in their own segment
//! files (`store/shadow/segments`, [`crate::queue::segments`]), made durable
//! (the spool's group commit and the segments' fdatasync, at once) before the
//! MASTER is answered. They survive a restart. A segment is unlinked once every
//! shadow in it is dropped durably.
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
use crate::queue::segments::{Place, Segments};
use crate::queue::tombstone::{self, Tombstones};
use crate::queue::{Envelope, QueueId, RecipientState};
use anyhow::{bail, Result};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A record with the message's octets in it (the first format).
const INLINE: u8 = 1;
/// A record with the place of the message's octets in the shadow segments.
const PLACED: u8 = 2;

/// A batch received: its number and its flush (or why it was refused).
type Due = (u64, Result<JoinHandle<Result<()>>, String>);

/// Shadow bodies to let go of once their records' removal is durable: a
/// segment goes with its last one.
pub(super) type Releases = Vec<(u64, QueueId)>;

/// Where a shadow's octets are.
enum Body {
    Inline(Vec<u8>),
    Placed(Place),
}

/// The shadows: the tree `id (8, BE: arrival order)` → record (format ‖
/// place ‖ bincode envelope), the octets appended to segment files
/// (`store/shadow/segments`, like the queue's bodies: written once, fdatasync'd
/// with the batch, a segment unlinked with its last shadow) instead of into
/// sled's log, which rewrites a leaf with every value in it.
#[derive(Clone)]
pub struct Store {
    tree: sled::Tree,
    segments: Arc<Segments>,
    /// How many shadows the tree holds (sled counts by iterating the whole
    /// tree); held while the tree changes, so that it stays exact.
    count: Arc<Mutex<u64>>,
}

fn encode(env: &Envelope, place: &Place) -> Result<Vec<u8>> {
    let mut v = vec![PLACED];
    v.extend(place.encode());
    v.extend(bincode::serde::encode_to_vec(
        env,
        bincode::config::standard(),
    )?);
    Ok(v)
}

fn decode(bytes: &[u8]) -> Result<(Envelope, Body)> {
    let cfg = bincode::config::standard();
    match bytes.split_first() {
        Some((&INLINE, rest)) => {
            let (env, message) = bincode::serde::decode_from_slice(rest, cfg)?.0;
            Ok((env, Body::Inline(message)))
        }
        Some((&PLACED, rest)) if rest.len() >= 28 => {
            let Some(place) = Place::decode(&rest[..28]) else {
                bail!("shadow record: bad place");
            };
            let env = bincode::serde::decode_from_slice(&rest[28..], cfg)?.0;
            Ok((env, Body::Placed(place)))
        }
        Some((v, _)) => bail!("shadow record format {v} is not known to this version"),
        None => bail!("empty shadow record"),
    }
}

/// The place a record points to, if it is a placed one.
fn place_of(bytes: &[u8]) -> Option<Place> {
    match bytes.split_first() {
        Some((&PLACED, rest)) => Place::decode(rest),
        _ => None,
    }
}

impl Store {
    /// The shadow tree of `db`, its segments under `store` (the data store's
    /// directory); segments no shadow points to (a crash's) are removed.
    pub fn open(db: &sled::Db, store: &Path) -> Result<Store> {
        let tree = db.open_tree("ha.shadow")?;
        let mut placed = Vec::new();
        let mut count = 0;
        for r in tree.iter() {
            let (k, v) = r?;
            count += 1;
            let id = <[u8; 8]>::try_from(&k[..]).ok().map(QueueId::from_bytes);
            if let (Some(id), Some(p)) = (id, place_of(&v)) {
                placed.push((id, p));
            }
        }
        let dir = store.join("shadow");
        crate::queue::durable::private_dir(store, &dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let (segments, orphans) =
            Segments::open(&dir, placed).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        if orphans > 0 {
            tracing::warn!(
                orphans,
                "HA shadow: removed shadow segments no shadow points to (left by a crash)"
            );
        }
        Ok(Store {
            tree,
            segments: Arc::new(segments),
            count: Arc::new(Mutex::new(count)),
        })
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

    /// Applies `ops` to the tree (the octets appended to the segments, not yet
    /// synced: [`Store::durable`]); returns the bodies to release once durable.
    fn apply(&self, ops: &[Op]) -> Result<Releases> {
        let mut count = self.count();
        let mut batch = sled::Batch::default();
        // Each key's place once the batch is applied (None: dropped).
        let mut last: HashMap<[u8; 8], Option<Place>> = HashMap::new();
        let mut garbage: Releases = Vec::new();
        for op in ops {
            let (key, place) = match op {
                Op::Put { envelope, message } => {
                    let id = envelope.id;
                    let place = self.segments.append(id, message)?;
                    garbage.push((place.segment, id));
                    batch.insert(&id.to_bytes(), encode(envelope, &place)?);
                    (id.to_bytes(), Some(place))
                }
                Op::Drop(id) => {
                    batch.remove(&id.to_bytes());
                    (id.to_bytes(), None)
                }
                Op::Update(envelope) => {
                    let key = envelope.id.to_bytes();
                    // Its place: put earlier in this batch, or as stored.
                    let place = match last.get(&key) {
                        Some(p) => *p,
                        None => self.tree.get(key)?.as_deref().and_then(place_of),
                    };
                    let Some(p) = place else {
                        continue; // no shadow of it (or one of the first format)
                    };
                    batch.insert(&key, encode(envelope, &p)?);
                    (key, Some(p))
                }
            };
            last.insert(key, place);
        }
        let mut n = *count;
        for (key, place) in &last {
            let old = self.tree.get(key)?;
            if let Some(p) = old.as_deref().and_then(place_of) {
                garbage.push((p.segment, QueueId::from_bytes(*key)));
            }
            match (old.is_some(), place.is_some()) {
                (false, true) => n += 1,
                (true, false) => n = n.saturating_sub(1),
                _ => {}
            }
        }
        self.tree.apply_batch(batch)?;
        *count = n;
        // Every body this batch leaves without a record, except the live ones.
        let live: HashSet<(u64, QueueId)> = last
            .iter()
            .filter_map(|(k, p)| p.map(|p| (p.segment, QueueId::from_bytes(*k))))
            .collect();
        garbage.retain(|g| !live.contains(g));
        Ok(garbage)
    }

    /// The segments written since the last call, fdatasync'd (the tree's
    /// records are made durable by the spool's group commit meanwhile).
    async fn sync_segments(&self) -> Result<()> {
        let segments = self.segments.clone();
        tokio::task::spawn_blocking(move || segments.sync())
            .await
            .map_err(|e| anyhow::anyhow!("shadow segments: {e}"))?
            .map_err(|e| anyhow::anyhow!("shadow segments: {e}"))
    }

    /// Bodies whose records' removal is durable.
    fn release(&self, releases: Releases) {
        for (segment, id) in releases {
            self.segments.release(segment, id);
        }
    }

    /// Drops every shadow; returns the bodies to release once durable.
    fn clear(&self) -> Result<Releases> {
        let mut count = self.count();
        let releases = self.placed()?;
        self.tree.clear()?;
        *count = 0;
        Ok(releases)
    }

    /// Every body a record points to.
    fn placed(&self) -> Result<Releases> {
        let mut v = Vec::new();
        for r in self.tree.iter() {
            let (k, rec) = r?;
            if let (Ok(k), Some(p)) = (<[u8; 8]>::try_from(&k[..]), place_of(&rec)) {
                v.push((p.segment, QueueId::from_bytes(k)));
            }
        }
        Ok(v)
    }

    /// Drops the shadow of `key` (promoted); its body to release once durable.
    fn remove(&self, key: &[u8], releases: &mut Releases) -> Result<()> {
        let mut count = self.count();
        if let Some(old) = self.tree.remove(key)? {
            *count = count.saturating_sub(1);
            if let (Ok(k), Some(p)) = (<[u8; 8]>::try_from(key), place_of(&old)) {
                releases.push((p.segment, QueueId::from_bytes(k)));
            }
        }
        Ok(())
    }

    /// Keeps only the shadows of `held`; returns those of `held` it lacks, and
    /// the bodies to release once durable.
    fn sync(&self, held: &[QueueId]) -> Result<(Vec<QueueId>, Releases)> {
        let mut count = self.count();
        let keep: HashSet<[u8; 8]> = held.iter().map(|i| i.to_bytes()).collect();
        let mut batch = sled::Batch::default();
        let mut have = HashSet::new();
        let mut releases = Vec::new();
        for r in self.tree.iter() {
            let (k, rec) = r?;
            match <[u8; 8]>::try_from(&k[..]) {
                Ok(b) if keep.contains(&b) => {
                    have.insert(b);
                }
                other => {
                    if let (Ok(b), Some(p)) = (other, place_of(&rec)) {
                        releases.push((p.segment, QueueId::from_bytes(b)));
                    }
                    batch.remove(k)
                }
            }
        }
        self.tree.apply_batch(batch)?;
        *count = have.len() as u64;
        let missing = held
            .iter()
            .filter(|i| !have.contains(&i.to_bytes()))
            .copied()
            .collect();
        Ok((missing, releases))
    }

    /// The octets of a shadow (None: its body is gone or damaged, which only a
    /// copy never confirmed to the MASTER can be).
    fn octets(&self, body: Body) -> Result<Option<Vec<u8>>> {
        match body {
            Body::Inline(v) => Ok(Some(v)),
            Body::Placed(p) => Ok(self.segments.read(&p)?),
        }
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
        let (missing, releases) = match self.shadows.sync(&held) {
            Ok(m) => m,
            Err(e) => return Msg::Refused(format!("shadow store: {e:#}")),
        };
        if let Err(e) = self.spool.durable().await {
            return Msg::Refused(format!("shadow store: {e:#}"));
        }
        self.shadows.release(releases);
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
        let releases = self
            .shadows
            .apply(ops)
            .map_err(|e| format!("shadow store: {e:#}"))?;
        let applied = start.elapsed();
        // The spool's group commit (one fdatasync for every write of the store)
        // and the segments' fdatasync, at once.
        let (spool, shadows) = (self.spool.clone(), self.shadows.clone());
        Ok(tokio::spawn(async move {
            let (records, bodies) = tokio::join!(spool.durable(), shadows.sync_segments());
            let r = records.and(bodies);
            if r.is_ok() {
                shadows.release(releases);
            }
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
            let cleared = self.shadows.clear();
            if let (Ok(releases), Ok(())) = (cleared, self.spool.durable().await) {
                self.shadows.release(releases);
            }
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
        let mut releases = Vec::new();
        for r in self.shadows.tree.iter() {
            let (k, v) = r?;
            let (mut env, message) = match decode(&v) {
                Ok((env, body)) => (env, self.shadows.octets(body)?),
                Err(e) => {
                    tracing::error!(error = %e, "HA shadow: unreadable shadow copy kept");
                    continue;
                }
            };
            let Some(message) = message else {
                // Its octets never reached the disk: a copy the MASTER was never
                // told of (it is answered only once they are durable).
                tracing::error!(id = %env.id, "HA shadow: shadow copy without its octets (a crash before it was confirmed) dropped");
                self.shadows.remove(&k, &mut releases)?;
                continue;
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
            self.shadows.remove(&k, &mut releases)?;
        }
        self.spool.durable().await?;
        self.shadows.release(releases);
        Ok(promoted)
    }
}

#[cfg(test)]
mod tests;
