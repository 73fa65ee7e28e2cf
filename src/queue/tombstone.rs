//! The "same message" rule for mail taken over from another unit (the HA queue
//! push; later, promoted shadow copies): a message is the very same one only if
//! its id **and** its [`digest`] (envelope and content) match, never by size or
//! sender. [`Tombstones`] is the bounded record (by default 7 days) of such
//! messages already taken, kept whether they are still queued or long delivered,
//! so that a repeated hand-over (an answer lost, a crash before the sender's
//! local remove) is recognised and never queued, hence never delivered, twice.
//!
//! Tree layout: `id (8) ‖ digest (32)` → `taken at, ms (8) ‖ local id (8)`. The
//! record is written in the same atomic write as the queued copy
//! ([`crate::queue::Spool::enqueue_recorded`]).

use super::{Envelope, QueueId};
use anyhow::Result;
use std::time::Duration;

/// SHA-256 of what makes a message itself.
pub type Digest = [u8; 32];

/// How long a taken message is remembered by default.
pub const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// The digest of a message as its first unit queued it: id, sender, recipient
/// addresses (in order), arrival time, HELO, size and the octets. Recipient
/// states and retry times are left out: they change while it waits.
pub fn digest(env: &Envelope, message: &[u8]) -> Digest {
    let mut d = ring::digest::Context::new(&ring::digest::SHA256);
    let field = |d: &mut ring::digest::Context, b: &[u8]| {
        d.update(&(b.len() as u64).to_be_bytes());
        d.update(b);
    };
    field(&mut d, &env.id.to_bytes());
    field(&mut d, env.sender.as_deref().unwrap_or("<>").as_bytes());
    for r in &env.recipients {
        field(&mut d, r.address.as_bytes());
    }
    field(&mut d, &env.received_at.to_be_bytes());
    field(&mut d, env.helo.as_bytes());
    field(&mut d, &env.size.to_be_bytes());
    field(&mut d, message);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.finish().as_ref());
    out
}

/// The record of messages taken from another unit.
#[derive(Clone)]
pub struct Tombstones {
    tree: sled::Tree,
    keep: Duration,
}

/// One record, ready to be written with the queued copy.
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl Tombstones {
    /// Opens (or creates) the record in tree `name` of `db`.
    pub fn open(db: &sled::Db, name: &str, keep: Duration) -> Result<Tombstones> {
        Ok(Tombstones {
            tree: db.open_tree(name)?,
            keep,
        })
    }

    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn key(id: QueueId, digest: &Digest) -> Vec<u8> {
        let mut k = id.to_bytes().to_vec();
        k.extend_from_slice(digest);
        k
    }

    /// The local id under which the very same message (`id` and `digest`) was
    /// taken, if it was.
    pub fn find(&self, id: QueueId, digest: &Digest) -> Result<Option<QueueId>> {
        Ok(self.tree.get(Self::key(id, digest))?.and_then(|v| {
            let local: [u8; 8] = v.get(8..16)?.try_into().ok()?;
            Some(QueueId::from_bytes(local))
        }))
    }

    /// The record of message `id`/`digest` taken now as `local`.
    pub fn entry(id: QueueId, digest: &Digest, local: QueueId, now_ms: u64) -> Entry {
        let mut value = now_ms.to_be_bytes().to_vec();
        value.extend_from_slice(&local.to_bytes());
        Entry {
            key: Self::key(id, digest),
            value,
        }
    }

    /// Forgets records older than the keeping time; returns how many.
    pub fn prune(&self, now_ms: u64) -> Result<usize> {
        let cutoff = now_ms.saturating_sub(self.keep.as_millis() as u64);
        let mut removed = 0;
        for r in self.tree.iter() {
            let (k, v) = r?;
            let at = v
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            if at < cutoff {
                self.tree.remove(k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Recipient, RecipientState, Spool};

    fn envelope(id: u64, size: u64) -> Envelope {
        Envelope {
            id: QueueId(id),
            sender: Some("s@x.test".into()),
            recipients: vec![Recipient::new("u@c.test".into(), "u@c.test".into())],
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "client".into(),
            received_at: 7,
            size,
            smtputf8: false,
            eight_bit: false,
        }
    }

    #[test]
    fn the_digest_tells_messages_apart_but_not_their_states() {
        let a = envelope(1, 5);
        // Same id, size and sender: another message all the same.
        assert_ne!(digest(&a, b"hello"), digest(&a, b"world"));
        let mut b = a.clone();
        b.recipients[0].address = "v@c.test".into();
        assert_ne!(digest(&a, b"hello"), digest(&b, b"hello"));
        assert_ne!(digest(&a, b"hello"), digest(&envelope(2, 5), b"hello"));
        // Its recipients' progress does not make it another message.
        let mut c = a.clone();
        c.recipients[0].state = RecipientState::Held;
        c.recipients[0].attempts = 3;
        c.recipients[0].next_attempt = 99;
        assert_eq!(digest(&a, b"hello"), digest(&c, b"hello"));
    }

    #[tokio::test]
    async fn a_taken_message_is_found_with_its_copy_until_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let spool = Spool::open(&db, dir.path()).unwrap();
        let t = Tombstones::open(&db, "tombstones", Duration::from_secs(60)).unwrap();
        let env = envelope(10, 5);
        let d = digest(&env, b"hello");
        assert_eq!(t.find(env.id, &d).unwrap(), None);
        let local = envelope(11, 5);
        let e = Tombstones::entry(env.id, &d, local.id, 1_000_000);
        spool
            .enqueue_recorded(&local, b"hello", t.tree(), &e.key, &e.value)
            .await
            .unwrap();
        assert_eq!(t.find(env.id, &d).unwrap(), Some(local.id));
        assert!(spool.envelope(local.id).unwrap().is_some());
        // Another message with the same id is not it.
        assert_eq!(t.find(env.id, &digest(&env, b"other")).unwrap(), None);
        // Still remembered after the copy left the queue (delivered)...
        spool.remove(local.id).await.unwrap();
        assert_eq!(t.find(env.id, &d).unwrap(), Some(local.id));
        assert_eq!(t.prune(1_000_000 + 59_000).unwrap(), 0);
        // ...until the keeping time is over.
        assert_eq!(t.prune(1_000_000 + 61_000).unwrap(), 1);
        assert_eq!(t.find(env.id, &d).unwrap(), None);
        assert!(t.is_empty());
    }
}
