//! Group commit: the flusher thread that makes the store's writes durable before
//! anyone is told they are.
//!
//! Each round takes every waiting request, then (0) for requests carrying body
//! files (large messages, see `bodies`): `fdatasync` of each file and one `fsync`
//! of `store/bodies` for their entries, and only then the request's store write
//! (the record pointing to the file: never on disk before the file is);
//! (1) `sled::Db::flush`, which
//! writes sled's log but on Linux ends in `sync_file_range` — no disk cache flush,
//! no metadata — then (2) a real `fdatasync` of every body segment written since
//! the last round (and of their directory when one was created, see `segments`),
//! of the log file (`store/db`), of every
//! blob file sled wrote since the last round (values over its blob threshold live
//! in `store/blobs/<lsn>`) and, when there are new blobs, `fsync` of the `blobs`
//! directory for their entries; and `fsync` of the store directory when its entries
//! changed (sled renames a new snapshot into place there). Only then are the
//! waiters answered. At open, `conf` and both directories are synced once.
//!
//! Test hook: when the environment variable `CLUSTERMAIL_TEST_FAIL_FLUSH` names a
//! file and that file exists, each round does its flush and then reports failure
//! (the worst case: the data may be on disk, the client is told it is not).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::oneshot;

pub const FAIL_FLUSH_ENV: &str = "CLUSTERMAIL_TEST_FAIL_FLUSH";

/// Answered after the round that covers a request.
pub type Waiter = oneshot::Sender<Result<(), String>>;

/// A store write made by the flusher once a request's body files are durable.
pub type Apply = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// One request for durability: everything written so far, and `files` then `then`.
pub struct Request {
    /// Body files to fdatasync (their directory fsync'd) before `then`.
    pub files: Vec<File>,
    /// Run after `files` are durable, before the round's flush (skipped if
    /// syncing them failed: the request fails).
    pub then: Option<Apply>,
    pub done: Waiter,
}

impl Request {
    /// Waits for everything written so far.
    pub fn wait(done: Waiter) -> Request {
        Request {
            files: Vec::new(),
            then: None,
            done,
        }
    }
}

/// Syncs the store's files after sled's flush.
struct Syncer {
    /// `store/db`, sled's log (opened read-only: fdatasync acts on the inode).
    log: File,
    store: PathBuf,
    /// The store directory's entries at the last sync.
    entries: Vec<OsString>,
    blobs: PathBuf,
    /// `store/bodies` (see `bodies`), fsync'd in rounds that sync body files.
    bodies: PathBuf,
    /// Blob files already synced (pruned to those still present).
    synced: HashSet<OsString>,
    /// The test hook's trigger file, when armed by the environment.
    fail_when: Option<PathBuf>,
    /// The body segments (see `segments`).
    segments: Arc<super::segments::Segments>,
}

impl Syncer {
    fn open(store: &Path, segments: Arc<super::segments::Segments>) -> std::io::Result<Syncer> {
        let log = File::open(store.join("db"))?;
        let blobs = store.join("blobs");
        File::open(store.join("conf"))?.sync_all()?;
        if blobs.is_dir() {
            File::open(&blobs)?.sync_all()?;
        }
        let mut s = Syncer {
            log,
            store: store.to_path_buf(),
            entries: Vec::new(),
            blobs,
            bodies: super::bodies::dir_of(store),
            synced: HashSet::new(),
            fail_when: std::env::var_os(FAIL_FLUSH_ENV).map(PathBuf::from),
            segments,
        };
        // Entries and blobs from before this open: synced once, like everything new.
        s.sync_blobs()?;
        s.sync_store_dir()?;
        Ok(s)
    }

    /// fdatasync of the segments written, the log, new blob files and (if any)
    /// the blob directory.
    fn sync(&mut self) -> std::io::Result<()> {
        self.segments.sync()?;
        self.log.sync_data()?;
        self.sync_blobs()?;
        self.sync_store_dir()?;
        if let Some(trigger) = &self.fail_when {
            if trigger.exists() {
                return Err(std::io::Error::other(format!(
                    "injected flush failure ({FAIL_FLUSH_ENV}: {} exists)",
                    trigger.display()
                )));
            }
        }
        Ok(())
    }

    /// Step (0) of a round: each request's body files, then (once, if there were
    /// any) their directory; a request whose files are durable gets its write
    /// made. Returns each request's outcome so far.
    fn sync_bodies(&mut self, requests: &mut [Request]) -> Vec<Result<(), String>> {
        let mut outcomes: Vec<Result<(), String>> = requests
            .iter()
            .map(|r| r.files.iter().try_for_each(File::sync_data))
            .map(|r| r.map_err(|e| format!("body file sync: {e}")))
            .collect();
        if requests.iter().any(|r| !r.files.is_empty()) {
            if let Err(e) = File::open(&self.bodies).and_then(|d| d.sync_all()) {
                for (r, o) in requests.iter().zip(outcomes.iter_mut()) {
                    if !r.files.is_empty() && o.is_ok() {
                        *o = Err(format!("{}: {e}", self.bodies.display()));
                    }
                }
            }
        }
        for (r, o) in requests.iter_mut().zip(outcomes.iter_mut()) {
            if let Some(then) = r.then.take() {
                if o.is_ok() {
                    *o = then();
                }
            }
            r.files.clear();
        }
        outcomes
    }

    /// fsync of the store directory if its entries changed since the last time.
    fn sync_store_dir(&mut self) -> std::io::Result<()> {
        let mut now = std::fs::read_dir(&self.store)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<Vec<_>>>()?;
        now.sort();
        if now != self.entries {
            File::open(&self.store)?.sync_all()?;
            self.entries = now;
        }
        Ok(())
    }

    fn sync_blobs(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // Collected by sled meanwhile: nothing to make durable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            File::open(&self.blobs)?.sync_all()?;
        }
        self.synced = present;
        Ok(())
    }
}

/// Makes `dir` (in `parent`), private (0700), and durable: a new directory's
/// entry is fsync'd in its parent before anything is written into it.
pub fn private_dir(parent: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => File::open(parent)?.sync_all()?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Starts the flusher thread for the sled store in directory `store` and its
/// body `segments`; it ends when every sender is gone.
pub fn start(
    db: sled::Db,
    store: &Path,
    segments: Arc<super::segments::Segments>,
) -> anyhow::Result<std::sync::mpsc::Sender<Request>> {
    let mut syncer = Syncer::open(store, segments)
        .map_err(|e| anyhow::anyhow!("store {}: {e}", store.display()))?;
    let (tx, rx) = std::sync::mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("queue-flusher".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut requests = vec![first];
                while let Ok(r) = rx.try_recv() {
                    requests.push(r);
                }
                let outcomes = syncer.sync_bodies(&mut requests);
                let result = db
                    .flush()
                    .map_err(|e| e.to_string())
                    .and_then(|_| syncer.sync().map_err(|e| e.to_string()));
                tracing::trace!(shared = requests.len(), "queue flush");
                for (r, o) in requests.into_iter().zip(outcomes) {
                    let _ = r.done.send(o.and(result.clone()));
                }
            }
        })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_blob_file_sled_writes_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB segments: values over ~16 KiB are blob files.
        let db = sled::Config::new()
            .path(dir.path())
            .segment_size(64 << 10)
            .open()
            .unwrap();
        db.insert(b"small", vec![1u8; 100]).unwrap();
        db.insert(b"big1", vec![2u8; 50_000]).unwrap();
        db.flush().unwrap();
        let (segments, _) = super::super::segments::Segments::open(dir.path(), []).unwrap();
        let mut syncer = Syncer::open(dir.path(), Arc::new(segments)).unwrap();
        assert_eq!(syncer.synced.len(), 1, "the blob written before the open");
        db.insert(b"big2", vec![3u8; 50_000]).unwrap();
        db.flush().unwrap();
        syncer.sync().unwrap();
        let on_disk = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert_eq!((syncer.synced.len(), on_disk), (2, 2));
    }
}
