//! Message bodies up to [`super::bodies::INLINE_MAX`], kept out of sled's log:
//! appended to segment files `store/segments/<n>` (0600, in a 0700 directory),
//! and reclaimed a whole segment at a time, once no message is left in it.
//!
//! Why: sled rewrites a leaf with every value in it when it consolidates the
//! leaf, so a 10 KB body written and deleted there cost ~45 KB of log writes
//! (measured); appended here it is written once, and sled keeps only a 28-octet
//! place (`s` → segment, offset, length, CRC-32).
//!
//! Durability (with `durable`): a body is appended (page cache) before its record
//! is written; each group commit fdatasyncs every segment written since the last
//! round and, when a segment was created, the directory, together with sled's
//! log, before anyone is answered. A record can reach the disk before its body
//! only for a message never acknowledged (sled also flushes on its own): its read
//! fails the length or the CRC and the message is dropped as damaged, never
//! delivered half. A segment is unlinked only when every message in it has been
//! removed durably ([`Segments::release`] after the removal's flush), so no
//! durable record ever points to a missing segment; at open, segments no record
//! points to are orphans of a crash and are removed.
//!
//! Limit: one message held for days keeps its whole segment (at most
//! [`SEGMENT_MAX`]) on disk.

use super::QueueId;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A new segment is started when a body would take the current one past this.
pub const SEGMENT_MAX: u64 = 8 << 20;

/// Where a body is: its segment, offset and length, and its CRC-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

impl Place {
    pub fn encode(&self) -> [u8; 28] {
        let mut v = [0u8; 28];
        v[..8].copy_from_slice(&self.segment.to_be_bytes());
        v[8..16].copy_from_slice(&self.offset.to_be_bytes());
        v[16..24].copy_from_slice(&self.len.to_be_bytes());
        v[24..].copy_from_slice(&self.crc.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<Place> {
        let n = |r: std::ops::Range<usize>| Some(u64::from_be_bytes(v.get(r)?.try_into().ok()?));
        Some(Place {
            segment: n(0..8)?,
            offset: n(8..16)?,
            len: n(16..24)?,
            crc: u32::from_be_bytes(v.get(24..28)?.try_into().ok()?),
        })
    }
}

/// The directory of segments, `store/segments`.
pub fn dir_of(store: &Path) -> PathBuf {
    store.join("segments")
}

struct Active {
    number: u64,
    file: Arc<File>,
    end: u64,
}

#[derive(Default)]
struct State {
    /// The segment appended to (None: the next append starts one).
    active: Option<Active>,
    next: u64,
    /// The messages in each segment (removed only once their removal is durable).
    live: HashMap<u64, HashSet<QueueId>>,
    /// Segments written since the last sync.
    dirty: BTreeMap<u64, Arc<File>>,
    /// A segment was created since the last sync: the directory needs one too.
    created: bool,
}

/// The segment files of one store. Shared by the spool and the flusher.
pub struct Segments {
    dir: PathBuf,
    state: Mutex<State>,
}

fn name(number: u64) -> String {
    format!("{number:016x}")
}

impl Segments {
    /// Opens (creating, 0700) `store/segments`, knowing the places every record
    /// of the store points to; removes the segments none points to.
    pub fn open(
        store: &Path,
        placed: impl IntoIterator<Item = (QueueId, Place)>,
    ) -> std::io::Result<(Segments, usize)> {
        let dir = dir_of(store);
        super::durable::private_dir(store, &dir)?;
        let mut state = State::default();
        for (id, p) in placed {
            state.live.entry(p.segment).or_default().insert(id);
            state.next = state.next.max(p.segment + 1);
        }
        let mut orphans = 0;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let number = entry
                .file_name()
                .to_str()
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            if let Some(n) = number {
                state.next = state.next.max(n + 1);
                if state.live.contains_key(&n) {
                    continue;
                }
            }
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
                orphans += 1;
            }
        }
        let state = Mutex::new(state);
        Ok((Segments { dir, state }, orphans))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends the body of `id` (written, not synced: the next group commit
    /// syncs it) and returns its place.
    pub fn append(&self, id: QueueId, octets: &[u8]) -> std::io::Result<Place> {
        let len = octets.len() as u64;
        let mut s = self.lock();
        let full = s
            .active
            .as_ref()
            .is_none_or(|a| a.end > 0 && a.end + len > SEGMENT_MAX);
        if full {
            self.start_segment(&mut s)?;
        }
        let Some(a) = s.active.as_mut() else {
            return Err(std::io::Error::other("no active segment"));
        };
        if let Err(e) = a.file.write_all_at(octets, a.end) {
            // Whatever part was written is never pointed to: start afresh.
            s.active = None;
            return Err(e);
        }
        let place = Place {
            segment: a.number,
            offset: a.end,
            len,
            crc: crc32fast::hash(octets),
        };
        a.end += len;
        let file = a.file.clone();
        s.dirty.insert(place.segment, file);
        s.live.entry(place.segment).or_default().insert(id);
        Ok(place)
    }

    /// A new active segment; the one before goes if no message is left in it.
    fn start_segment(&self, s: &mut State) -> std::io::Result<()> {
        let number = s.next;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.dir.join(name(number)))?;
        s.next += 1;
        s.created = true;
        let old = s.active.replace(Active {
            number,
            file: Arc::new(file),
            end: 0,
        });
        if let Some(old) = old {
            if !s.live.contains_key(&old.number) {
                self.unlink(old.number);
            }
        }
        Ok(())
    }

    /// fdatasync of every segment written since the last call, and of the
    /// directory if a segment was created (the flusher, each round).
    pub fn sync(&self) -> std::io::Result<()> {
        let (dirty, created) = {
            let mut s = self.lock();
            (std::mem::take(&mut s.dirty), std::mem::take(&mut s.created))
        };
        let synced = dirty
            .values()
            .try_for_each(|f| f.sync_data())
            .and_then(|()| match created {
                true => File::open(&self.dir)?.sync_all(),
                false => Ok(()),
            });
        if synced.is_err() {
            // Synced again next round (this round's waiters are failed).
            let mut s = self.lock();
            s.created |= created;
            for (n, f) in dirty {
                s.dirty.entry(n).or_insert(f);
            }
        }
        synced
    }

    /// The body at `place`; None if its segment is gone, or it is short or not
    /// what was written (its CRC differs).
    pub fn read(&self, place: &Place) -> std::io::Result<Option<Vec<u8>>> {
        let active = {
            let s = self.lock();
            s.active
                .as_ref()
                .filter(|a| a.number == place.segment)
                .map(|a| a.file.clone())
        };
        let file = match active {
            Some(f) => f,
            None => match File::open(self.dir.join(name(place.segment))) {
                Ok(f) => Arc::new(f),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            },
        };
        let Ok(len) = usize::try_from(place.len) else {
            return Ok(None);
        };
        let mut v = vec![0u8; len];
        match file.read_exact_at(&mut v, place.offset) {
            Ok(()) => Ok((crc32fast::hash(&v) == place.crc).then_some(v)),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `id`, in `segment`, is removed durably: a segment left without messages
    /// (and not appended to) is unlinked. Releasing twice is harmless.
    pub fn release(&self, segment: u64, id: QueueId) {
        let mut s = self.lock();
        let Some(ids) = s.live.get_mut(&segment) else {
            return;
        };
        ids.remove(&id);
        if !ids.is_empty() {
            return;
        }
        s.live.remove(&segment);
        if s.active.as_ref().is_some_and(|a| a.number == segment) {
            return;
        }
        s.dirty.remove(&segment);
        self.unlink(segment);
    }

    fn unlink(&self, number: u64) {
        let path = self.dir.join(name(number));
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(file = %path.display(), error = %e,
                    "queue: segment not removed (removed at the next start)");
            }
        }
    }

    /// How many segment files there are (tests, gauges).
    pub fn files(&self) -> usize {
        std::fs::read_dir(&self.dir).map_or(0, |d| d.count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_read_back_and_a_segment_goes_with_its_last_message() {
        let dir = tempfile::tempdir().unwrap();
        let (segs, _) = Segments::open(dir.path(), []).unwrap();
        let body = vec![7u8; (SEGMENT_MAX - 2) as usize];
        let (a, b) = (QueueId::new(), QueueId::new());
        let pa = segs.append(a, &body).unwrap();
        let pb = segs.append(b, b"small").unwrap();
        assert_ne!(pa.segment, pb.segment, "the first segment was full");
        assert_eq!(Place::decode(&pa.encode()), Some(pa));
        segs.sync().unwrap();
        assert_eq!(segs.read(&pa).unwrap(), Some(body));
        assert_eq!(segs.read(&pb).unwrap().as_deref(), Some(&b"small"[..]));
        assert_eq!(segs.files(), 2);
        segs.release(pa.segment, a);
        segs.release(pa.segment, a);
        assert_eq!(segs.files(), 1, "the full segment went with its message");
        assert_eq!(segs.read(&pa).unwrap(), None);
        segs.release(pb.segment, b);
        assert_eq!(segs.files(), 1, "the active segment stays");
    }

    #[test]
    fn a_damaged_or_short_body_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let (segs, _) = Segments::open(dir.path(), []).unwrap();
        let p = segs.append(QueueId::new(), b"hello").unwrap();
        let flipped = Place {
            crc: p.crc ^ 1,
            ..p
        };
        let past = Place { len: 99, ..p };
        assert_eq!(segs.read(&flipped).unwrap(), None);
        assert_eq!(segs.read(&past).unwrap(), None);
    }

    #[test]
    fn at_open_segments_no_record_points_to_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, lost) = (QueueId::new(), QueueId::new());
        let (pk, pl) = {
            let (segs, _) = Segments::open(dir.path(), []).unwrap();
            let big = vec![1u8; SEGMENT_MAX as usize];
            (
                segs.append(kept, &big).unwrap(),
                segs.append(lost, b"x").unwrap(),
            )
        };
        let (segs, orphans) = Segments::open(dir.path(), [(kept, pk)]).unwrap();
        assert_eq!((orphans, segs.files()), (1, 1));
        assert!(segs.read(&pk).unwrap().is_some());
        assert_eq!(segs.read(&pl).unwrap(), None);
        let next = segs.append(QueueId::new(), b"y").unwrap();
        assert!(next.segment > pl.segment, "numbers are never reused");
    }
}
