//! Large message bodies, kept out of sled: one file per message in
//! `store/bodies/<queue id>` (sled keeps every value it holds in memory, so a
//! queue of large messages would cost their size in RAM).
//!
//! This module owns the files: writing one (0600, in a 0700 directory), reading
//! it back, unlinking it, and finding orphans. The ordering that makes them as
//! safe as the rest of the spool is the spool's and the flusher's (`durable`): a
//! file is fdatasync'd and its directory entry made durable (one directory fsync
//! per group commit) before the sled record that points to it is written, and the
//! record leaves sled durably before the file is unlinked. So a file without a
//! record is an orphan of a crash (removed at start), and a record without its
//! file is a damaged store (the message is dropped, loudly).

use super::QueueId;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Bodies larger than this (octets) go to a file; smaller ones stay in sled.
/// Measured on a loaded 2-core VM (debug build, end of DATA to 250, median): a
/// 10 KB message unchanged (34 → 36 ms, noise); 1 MB 20–27 → 33–43 ms (one file
/// and one directory sync more) but a p90 of 60–80 ms instead of 130–410 ms; 3 MB
/// (a sled blob before) 131 → 43 ms. Sled no longer holds large bodies in memory.
pub const INLINE_MAX: usize = 256 << 10;

/// The directory of body files, `store/bodies`.
pub fn dir_of(store: &Path) -> PathBuf {
    store.join("bodies")
}

/// The body files of one store.
#[derive(Clone, Debug)]
pub struct Bodies {
    dir: PathBuf,
}

impl Bodies {
    /// Opens (creating, 0700) the body directory of the sled store in `store`.
    pub fn open(store: &Path) -> std::io::Result<Bodies> {
        let dir = dir_of(store);
        super::durable::private_dir(store, &dir)?;
        Ok(Bodies { dir })
    }

    fn path(&self, id: QueueId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// Writes the body of `id` into a new file (0600) and returns it, written but
    /// not synced: the caller has the flusher sync it before pointing to it.
    pub fn write(&self, id: QueueId, octets: &[u8]) -> std::io::Result<File> {
        let path = self.path(id);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        if let Err(e) = file.write_all(octets) {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(file)
    }

    /// The body of `id`; None if there is no file.
    pub fn read(&self, id: QueueId) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(id)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the file of `id` is there with `len` octets.
    pub fn is_whole(&self, id: QueueId, len: u64) -> bool {
        std::fs::metadata(self.path(id)).is_ok_and(|m| m.len() == len)
    }

    /// Unlinks the file of `id` (gone already: fine). Only once no durable
    /// record points to it.
    pub fn remove(&self, id: QueueId) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Unlinks every file that `owned` does not claim (a crash between writing
    /// a body and committing its record, or between a removal and the unlink;
    /// or a name that is no queue id). Returns how many.
    pub fn remove_orphans(&self, owned: impl Fn(QueueId) -> bool) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let id = name
                .to_str()
                .filter(|n| n.len() == 16)
                .and_then(|n| n.parse::<QueueId>().ok());
            if id.is_some_and(&owned) || !entry.file_type()?.is_file() {
                continue;
            }
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_body_is_written_private_read_back_and_removed() {
        let store = tempfile::tempdir().unwrap();
        let bodies = Bodies::open(store.path()).unwrap();
        let dir_mode = std::fs::metadata(dir_of(store.path())).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let id = QueueId::new();
        let file = bodies.write(id, b"the octets").unwrap();
        assert_eq!(file.metadata().unwrap().mode() & 0o777, 0o600);
        assert!(bodies.is_whole(id, 10));
        assert!(
            !bodies.is_whole(id, 11),
            "a file of another length is not whole"
        );
        assert_eq!(
            bodies.read(id).unwrap().as_deref(),
            Some(&b"the octets"[..])
        );
        assert!(bodies.write(id, b"again").is_err(), "never overwritten");
        bodies.remove(id).unwrap();
        assert_eq!(bodies.read(id).unwrap(), None);
        assert!(!bodies.is_whole(id, 10));
        bodies.remove(id).unwrap();
    }

    #[test]
    fn files_nobody_owns_are_removed_as_orphans() {
        let store = tempfile::tempdir().unwrap();
        let bodies = Bodies::open(store.path()).unwrap();
        let (kept, orphan) = (QueueId::new(), QueueId::new());
        bodies.write(kept, b"kept").unwrap();
        bodies.write(orphan, b"orphan").unwrap();
        std::fs::write(dir_of(store.path()).join("junk"), b"x").unwrap();
        assert_eq!(bodies.remove_orphans(|id| id == kept).unwrap(), 2);
        assert_eq!(bodies.read(kept).unwrap().as_deref(), Some(&b"kept"[..]));
        assert_eq!(bodies.read(orphan).unwrap(), None);
        assert_eq!(std::fs::read_dir(dir_of(store.path())).unwrap().count(), 1);
        assert_eq!(bodies.remove_orphans(|id| id == kept).unwrap(), 0);
    }

    fn envelope(size: usize) -> crate::queue::Envelope {
        crate::queue::Envelope {
            id: QueueId::new(),
            sender: None,
            recipients: vec![crate::queue::Recipient::new(
                "r@y.test".into(),
                "r@y.test".into(),
            )],
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "client".into(),
            received_at: 0,
            size: size as u64,
            smtputf8: false,
            eight_bit: false,
        }
    }

    #[tokio::test]
    async fn the_spool_keeps_large_bodies_in_files_and_small_ones_in_sled() {
        let store = tempfile::tempdir().unwrap();
        let db = sled::open(store.path()).unwrap();
        let spool = crate::queue::Spool::open(&db, store.path()).unwrap();
        let (large, small) = (vec![b'x'; INLINE_MAX + 1], vec![b'y'; INLINE_MAX]);
        let (big, little) = (envelope(large.len()), envelope(small.len()));
        spool.enqueue(&big, large.clone()).await.unwrap();
        spool.enqueue(&little, &small).await.unwrap();
        let file = dir_of(store.path()).join(big.id.to_string());
        assert_eq!(std::fs::read(&file).unwrap(), large);
        assert!(!dir_of(store.path()).join(little.id.to_string()).exists());
        assert_eq!(spool.message(big.id).unwrap(), Some(large.clone()));
        assert_eq!(spool.message(little.id).unwrap(), Some(small));
        assert_eq!(
            spool.deliverable(big.id).await.unwrap(),
            Some((big.clone(), large))
        );
        spool.remove(big.id).await.unwrap();
        assert!(!file.exists(), "unlinked after the removal");
        assert_eq!(spool.message(big.id).unwrap(), None);
    }

    #[tokio::test]
    async fn a_message_whose_body_file_is_missing_is_removed_and_orphans_go_at_open() {
        let store = tempfile::tempdir().unwrap();
        let db = sled::open(store.path()).unwrap();
        let spool = crate::queue::Spool::open(&db, store.path()).unwrap();
        let (lost, kept) = (envelope(INLINE_MAX + 1), envelope(INLINE_MAX + 1));
        spool
            .enqueue(&lost, vec![1u8; INLINE_MAX + 1])
            .await
            .unwrap();
        spool
            .enqueue(&kept, vec![2u8; INLINE_MAX + 1])
            .await
            .unwrap();
        std::fs::remove_file(dir_of(store.path()).join(lost.id.to_string())).unwrap();
        assert_eq!(spool.message(lost.id).unwrap(), None);
        assert_eq!(spool.deliverable(lost.id).await.unwrap(), None);
        assert_eq!(spool.envelope(lost.id).unwrap(), None, "removed");
        // A body written, then a crash before its record: an orphan at the next open.
        let orphan = QueueId::new();
        Bodies::open(store.path())
            .unwrap()
            .write(orphan, b"half")
            .unwrap();
        drop(spool);
        let spool = crate::queue::Spool::open(&db, store.path()).unwrap();
        assert!(!dir_of(store.path()).join(orphan.to_string()).exists());
        assert_eq!(
            spool.message(kept.id).unwrap(),
            Some(vec![2u8; INLINE_MAX + 1])
        );
    }

    #[tokio::test]
    async fn a_large_body_written_with_a_record_is_in_a_file_with_the_record() {
        let store = tempfile::tempdir().unwrap();
        let db = sled::open(store.path()).unwrap();
        let spool = crate::queue::Spool::open(&db, store.path()).unwrap();
        let other = db.open_tree("other").unwrap();
        let env = envelope(INLINE_MAX + 10);
        let octets = vec![7u8; INLINE_MAX + 10];
        spool
            .enqueue_recorded(&env, &octets, &other, b"k", b"v")
            .await
            .unwrap();
        assert!(dir_of(store.path()).join(env.id.to_string()).exists());
        assert_eq!(other.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(spool.message(env.id).unwrap(), Some(octets));
    }
}
