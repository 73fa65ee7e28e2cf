//! The consumer's local state and the planning of each batch of directory
//! changes into catalog [`Change`]s.
//!
//! Deletes from the directory carry only the entry's entryUUID, so the consumer
//! keeps, in a sled tree of its own (`directory`), each entry's last state by
//! entryUUID (`u\0UUID` → [`Held`]) and which entry owns each catalog key
//! (`o\0KEY` → UUID): two entries claiming one address are refused, not
//! silently merged.
//!
//! That tree is not written in the catalog's atomic write, so each batch's
//! [`Delta`] goes into the catalog's meta together with the changes and the sync
//! cookie (a redo log, numbered); the tree records the last number it holds, and
//! [`Local::open`] replays a delta the tree missed (a crash between the two
//! writes). Replayed entries are marked waiting, so they are offered again:
//! applying a record the catalog already holds changes nothing.

use super::entry::{to_record, Attrs, Key, Record};
use crate::catalog::model::LocalPartMatch;
use crate::catalog::Change;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Catalog meta key of the sync cookie.
pub const COOKIE: &str = "directory.cookie";
/// Catalog meta key of the last batch's [`Delta`].
pub const JOURNAL: &str = "directory.journal";
const SEQ: &[u8] = b"seq";

/// What the consumer knows of one directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub dn: String,
    /// The entry's last well-formed state (what a delete removes).
    pub record: Option<Record>,
    /// Why the entry's last state is not in the catalog (None: it is).
    pub problem: Option<String>,
    /// `record` is to be offered again after later changes.
    pub waiting: bool,
}

/// One change from the directory.
#[derive(Debug, Clone)]
pub enum Event {
    Upsert {
        uuid: Vec<u8>,
        dn: String,
        attrs: Attrs,
    },
    Delete {
        uuid: Vec<u8>,
    },
}

/// What a batch does to the local state (its redo log).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Delta {
    pub seq: u64,
    /// A full refresh: the local state becomes `put` alone.
    pub full: bool,
    pub put: Vec<(Vec<u8>, Held)>,
    pub gone: Vec<Vec<u8>>,
    /// Written without its entries (a full refresh, or a batch of more than
    /// [`JOURNAL_MAX`]): a replay cannot redo it, the next sync is a full refresh.
    pub truncated: bool,
}

/// Entries a journal holds at most: the journal is a catalog meta value
/// rewritten with every batch, so it must stay small (a value of megabytes in
/// the catalog's tree would be copied with every write near it).
pub const JOURNAL_MAX: usize = 512;

impl Delta {
    /// The journal to write with this batch: the delta itself, or a marker.
    pub fn journal(&self) -> Result<Vec<u8>> {
        if self.full || self.put.len() + self.gone.len() > JOURNAL_MAX {
            return encode(&Delta {
                seq: self.seq,
                full: self.full,
                truncated: true,
                ..Delta::default()
            });
        }
        encode(self)
    }
}

/// A batch planned: the catalog changes, the entry each came from, the delta.
#[derive(Debug, Default)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub origin: Vec<Vec<u8>>,
    pub delta: Delta,
}

fn bin() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(bincode::serde::encode_to_vec(v, bin())?)
}

pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T> {
    Ok(bincode::serde::decode_from_slice(b, bin())?.0)
}

fn ukey(uuid: &[u8]) -> Vec<u8> {
    [b"u\0".as_slice(), uuid].concat()
}

fn okey(key: &Key) -> Result<Vec<u8>> {
    Ok([b"o\0".as_slice(), &encode(key)?].concat())
}

/// The consumer's local state: a sled tree beside the catalog's.
pub struct Local {
    tree: sled::Tree,
    pub rule: LocalPartMatch,
}

impl Local {
    /// Opens the state, replaying `journal` (the catalog's copy of the last
    /// delta) when the tree missed it. The flag: the tree missed a batch that
    /// cannot be replayed (a truncated journal), so the next sync must be a
    /// full refresh.
    pub fn open(
        db: &sled::Db,
        rule: LocalPartMatch,
        journal: Option<&[u8]>,
    ) -> Result<(Local, bool)> {
        let local = Local {
            tree: db.open_tree("directory")?,
            rule,
        };
        let Some(j) = journal else {
            return Ok((local, false));
        };
        let mut delta: Delta = decode(j).context("corrupt directory journal")?;
        if delta.seq <= local.seq() {
            return Ok((local, false));
        }
        if delta.truncated {
            tracing::warn!(
                seq = delta.seq,
                "directory: the last sync batch is not in the local state; a full refresh follows"
            );
            return Ok((local, true));
        }
        tracing::warn!(seq = delta.seq, "directory: replaying the last sync batch");
        for (_, h) in &mut delta.put {
            h.waiting |= h.problem.is_none() && h.record.is_some();
        }
        local.commit(&delta, &HashMap::new())?;
        Ok((local, false))
    }

    pub fn seq(&self) -> u64 {
        self.tree
            .get(SEQ)
            .ok()
            .flatten()
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0)
    }

    pub fn held(&self, uuid: &[u8]) -> Result<Option<Held>> {
        self.tree.get(ukey(uuid))?.map(|v| decode(&v)).transpose()
    }

    pub fn owner(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(okey(key)?)?.map(|v| v.to_vec()))
    }

    /// Every entry, by entryUUID.
    pub fn all(&self) -> Result<Vec<(Vec<u8>, Held)>> {
        self.tree
            .scan_prefix(b"u\0")
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k[2..].to_vec(), decode(&v)?))
            })
            .collect()
    }

    /// Writes `delta` with the catalog's verdicts (`rejected`: UUID → reason).
    pub fn commit(&self, delta: &Delta, rejected: &HashMap<Vec<u8>, String>) -> Result<()> {
        if delta.full {
            self.tree.clear()?;
        }
        let mut batch = sled::Batch::default();
        for uuid in &delta.gone {
            if let Some(old) = self.held(uuid)? {
                if let Some(r) = &old.record {
                    let ok = okey(&r.key(self.rule))?;
                    if self.tree.get(&ok)?.as_deref() == Some(uuid.as_slice()) {
                        batch.remove(ok);
                    }
                }
            }
            batch.remove(ukey(uuid));
        }
        for (uuid, held) in &delta.put {
            let mut held = held.clone();
            // Offered to the catalog in this batch: the key is this entry's.
            let offered = held.problem.is_none();
            if let Some(reason) = rejected.get(uuid) {
                held.problem = Some(reason.clone());
                held.waiting = held.record.is_some();
            }
            if let (Some(r), true) = (&held.record, offered) {
                batch.insert(okey(&r.key(self.rule))?, uuid.as_slice());
            }
            batch.insert(ukey(uuid), encode(&held)?);
        }
        batch.insert(SEQ, &delta.seq.to_be_bytes());
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Plans `events` (in order) against the local state.
    pub fn plan(&self, events: Vec<Event>, full: bool) -> Result<Plan> {
        let mut p = Planner {
            local: self,
            full,
            held: HashMap::new(),
            owner: HashMap::new(),
            plan: Plan::default(),
        };
        for e in events {
            p.event(e)?;
        }
        let Planner { held, mut plan, .. } = p;
        for (uuid, h) in held {
            match h {
                Some(h) => plan.delta.put.push((uuid, h)),
                None => plan.delta.gone.push(uuid),
            }
        }
        plan.delta.full = full;
        plan.delta.seq = self.seq() + 1;
        Ok(plan)
    }

    /// The `candidates` to offer again: well-formed, waiting, their key free.
    pub fn waiting<'a>(&self, candidates: impl Iterator<Item = &'a Vec<u8>>) -> Result<Plan> {
        let mut plan = Plan {
            delta: Delta {
                seq: self.seq() + 1,
                ..Delta::default()
            },
            ..Plan::default()
        };
        for uuid in candidates {
            let Some(mut h) = self.held(uuid)? else {
                continue;
            };
            let (Some(r), true) = (&h.record, h.waiting) else {
                continue;
            };
            if let Some(o) = self.owner(&r.key(self.rule))? {
                if &o != uuid && self.held(&o)?.is_some() {
                    continue;
                }
            }
            plan.changes.push(put(r.clone()));
            plan.origin.push(uuid.clone());
            h.problem = None;
            h.waiting = false;
            plan.delta.put.push((uuid.clone(), h));
        }
        Ok(plan)
    }
}

fn put(r: Record) -> Change {
    match r {
        Record::Cluster(c) => Change::PutCluster(c),
        Record::Server(s) => Change::PutServer(s),
        Record::Mailbox(m) => Change::PutMailbox(m),
    }
}

fn remove(r: &Record) -> Change {
    match r {
        Record::Cluster(c) => Change::RemoveCluster(c.name.clone()),
        Record::Server(s) => Change::RemoveServer(s.name.clone()),
        Record::Mailbox(m) => Change::RemoveMailbox(m.address.clone()),
    }
}

/// One batch's view: the local state overlaid with the batch so far.
struct Planner<'a> {
    local: &'a Local,
    /// A full refresh starts from nothing.
    full: bool,
    held: HashMap<Vec<u8>, Option<Held>>,
    owner: HashMap<Key, Option<Vec<u8>>>,
    plan: Plan,
}

impl Planner<'_> {
    fn held(&self, uuid: &[u8]) -> Result<Option<Held>> {
        match self.held.get(uuid) {
            Some(h) => Ok(h.clone()),
            None if self.full => Ok(None),
            None => self.local.held(uuid),
        }
    }

    fn owner(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        match self.owner.get(key) {
            Some(o) => Ok(o.clone()),
            None if self.full => Ok(None),
            None => self.local.owner(key),
        }
    }

    fn push(&mut self, change: Change, uuid: &[u8]) {
        self.plan.changes.push(change);
        self.plan.origin.push(uuid.to_vec());
    }

    /// Drops `uuid`'s claim on its old record's key (removing the record from
    /// the catalog when it owned it) unless `keep` is that key.
    fn release(&mut self, uuid: &[u8], old: Option<&Held>, keep: Option<&Key>) -> Result<()> {
        let Some(rec) = old.and_then(|h| h.record.as_ref()) else {
            return Ok(());
        };
        let key = rec.key(self.local.rule);
        if Some(&key) == keep || self.owner(&key)?.as_deref() != Some(uuid) {
            return Ok(());
        }
        self.push(remove(rec), uuid);
        self.owner.insert(key, None);
        Ok(())
    }

    fn event(&mut self, e: Event) -> Result<()> {
        match e {
            Event::Delete { uuid } => {
                let old = self.held(&uuid)?;
                self.release(&uuid, old.as_ref(), None)?;
                self.held.insert(uuid, None);
            }
            Event::Upsert { uuid, dn, attrs } => {
                let old = self.held(&uuid)?;
                let held = match to_record(&attrs) {
                    Err(reason) => self.malformed(&uuid, dn, old, reason)?,
                    Ok(rec) => self.upsert(&uuid, dn, old, rec)?,
                };
                self.held.insert(uuid, Some(held));
            }
        }
        Ok(())
    }

    /// A malformed entry: reported; its last good state stays in the catalog.
    fn malformed(
        &mut self,
        uuid: &[u8],
        dn: String,
        old: Option<Held>,
        reason: String,
    ) -> Result<Held> {
        let in_catalog = old
            .as_ref()
            .is_some_and(|h| !h.waiting && h.record.is_some());
        if !in_catalog {
            self.release(uuid, old.as_ref(), None)?;
        }
        Ok(Held {
            dn,
            record: old.and_then(|h| h.record.filter(|_| in_catalog)),
            problem: Some(reason),
            waiting: false,
        })
    }

    fn upsert(&mut self, uuid: &[u8], dn: String, old: Option<Held>, rec: Record) -> Result<Held> {
        let key = rec.key(self.local.rule);
        self.release(uuid, old.as_ref(), Some(&key))?;
        if let Some(other) = self.owner(&key)?.filter(|o| o.as_slice() != uuid) {
            if let Some(h) = self.held(&other)? {
                return Ok(Held {
                    dn,
                    problem: Some(format!("{} is already held by {}", rec.name(), h.dn)),
                    record: Some(rec),
                    waiting: true,
                });
            }
        }
        self.owner.insert(key, Some(uuid.to_vec()));
        self.push(put(rec.clone()), uuid);
        Ok(Held {
            dn,
            record: Some(rec),
            problem: None,
            waiting: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(addr: &str, home: &str) -> Attrs {
        let mut a: Attrs = HashMap::new();
        a.insert("objectclass".into(), vec!["clustermailMailbox".into()]);
        a.insert("mail".into(), vec![addr.into()]);
        a.insert("clustermailhome".into(), vec![home.into()]);
        a
    }

    fn up(uuid: &str, addr: &str) -> Event {
        Event::Upsert {
            uuid: uuid.into(),
            dn: format!("mail={addr}"),
            attrs: mailbox(addr, "mail-1"),
        }
    }

    fn waiting(local: &Local) -> Plan {
        let all: Vec<Vec<u8>> = local.all().unwrap().into_iter().map(|(u, _)| u).collect();
        local.waiting(all.iter()).unwrap()
    }

    fn open() -> (tempfile::TempDir, Local) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let local = Local::open(&db, LocalPartMatch::CaseInsensitive, None).unwrap();
        (dir, local.0)
    }

    #[test]
    fn deletes_find_their_record_by_uuid() {
        let (_d, local) = open();
        let p = local.plan(vec![up("u1", "a@x.test")], false).unwrap();
        assert!(matches!(&p.changes[..], [Change::PutMailbox(m)] if m.address == "a@x.test"));
        local.commit(&p.delta, &HashMap::new()).unwrap();
        let p = local
            .plan(vec![Event::Delete { uuid: "u1".into() }], false)
            .unwrap();
        assert!(matches!(&p.changes[..], [Change::RemoveMailbox(a)] if a == "a@x.test"));
        local.commit(&p.delta, &HashMap::new()).unwrap();
        assert!(local.all().unwrap().is_empty());
    }

    #[test]
    fn a_rename_removes_the_old_address() {
        let (_d, local) = open();
        let p = local.plan(vec![up("u1", "a@x.test")], false).unwrap();
        local.commit(&p.delta, &HashMap::new()).unwrap();
        let p = local.plan(vec![up("u1", "b@x.test")], false).unwrap();
        assert!(matches!(&p.changes[..],
            [Change::RemoveMailbox(a), Change::PutMailbox(m)] if a == "a@x.test" && m.address == "b@x.test"));
    }

    #[test]
    fn an_address_claimed_twice_waits_until_the_first_goes() {
        let (_d, local) = open();
        let p = local
            .plan(vec![up("u1", "a@x.test"), up("u2", "A@x.test")], false)
            .unwrap();
        assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
        local.commit(&p.delta, &HashMap::new()).unwrap();
        let u2 = local.held(b"u2").unwrap().unwrap();
        assert!(u2
            .problem
            .unwrap()
            .contains("already held by mail=a@x.test"));
        assert!(waiting(&local).changes.is_empty());
        let p = local
            .plan(vec![Event::Delete { uuid: "u1".into() }], false)
            .unwrap();
        local.commit(&p.delta, &HashMap::new()).unwrap();
        let w = waiting(&local);
        assert!(matches!(&w.changes[..], [Change::PutMailbox(m)] if m.address == "A@x.test"));
    }

    #[test]
    fn rejected_entries_wait_and_a_lost_commit_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let (local, _) = Local::open(&db, LocalPartMatch::CaseInsensitive, None).unwrap();
        let p = local.plan(vec![up("u1", "a@x.test")], false).unwrap();
        let rejected = HashMap::from([(b"u1".to_vec(), "unknown home".to_string())]);
        local.commit(&p.delta, &rejected).unwrap();
        assert_eq!(waiting(&local).changes.len(), 1);
        // A batch applied to the catalog whose local commit was lost.
        let p = local.plan(vec![up("u2", "b@x.test")], false).unwrap();
        let journal = p.delta.journal().unwrap();
        drop(local);
        let (local, full) =
            Local::open(&db, LocalPartMatch::CaseInsensitive, Some(&journal)).unwrap();
        assert!(!full);
        assert!(local.held(b"u2").unwrap().is_some());
        assert_eq!(waiting(&local).changes.len(), 2);
    }

    #[test]
    fn journals_stay_small_and_a_lost_big_batch_asks_for_a_full_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let (local, _) = Local::open(&db, LocalPartMatch::CaseInsensitive, None).unwrap();
        let events = (0..JOURNAL_MAX + 1)
            .map(|i| up(&format!("u{i}"), &format!("m{i}@x.test")))
            .collect();
        let p = local.plan(events, false).unwrap();
        let journal = p.delta.journal().unwrap();
        assert!(journal.len() < 64, "{} bytes", journal.len());
        drop(local);
        let (local, full) =
            Local::open(&db, LocalPartMatch::CaseInsensitive, Some(&journal)).unwrap();
        assert!(
            full,
            "a lost batch that cannot be replayed needs a full refresh"
        );
        assert!(local.all().unwrap().is_empty());
    }
}
