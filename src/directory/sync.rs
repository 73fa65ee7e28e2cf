//! Applies batches of directory changes to the catalog: each batch's changes,
//! its sync cookie and its journal in one atomic catalog write; entries the
//! catalog refuses are reported and offered again after every later batch
//! (applied as soon as a later change makes them valid).

use super::entry::Record;
use super::journal::{Delta, Event, Local, Plan, COOKIE, JOURNAL};
use super::status::{RejectedEntry, STATUS};
use crate::catalog::model::LocalPartMatch;
use crate::catalog::{ApplyReport, Catalog, Change};
use anyhow::Result;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// How often waiting entries are offered again after one batch (each round
/// can make more valid: a server, then its mailboxes).
const RETRY_ROUNDS: usize = 4;

/// The catalog as the consumer writes it (the catalog's incremental API; a
/// trait so the planning can be tested without a store).
pub trait Replica: Send + Sync {
    fn apply(&self, changes: Vec<Change>, meta: &[(&str, &[u8])]) -> Result<ApplyReport>;
    fn replace_all(&self, changes: Vec<Change>, meta: &[(&str, &[u8])]) -> Result<ApplyReport>;
    fn sync_meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
}

impl Replica for Catalog {
    fn apply(&self, changes: Vec<Change>, meta: &[(&str, &[u8])]) -> Result<ApplyReport> {
        Catalog::apply(self, changes, meta)
    }
    fn replace_all(&self, changes: Vec<Change>, meta: &[(&str, &[u8])]) -> Result<ApplyReport> {
        Catalog::replace_all(self, changes, meta)
    }
    fn sync_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Catalog::sync_meta(self, key)
    }
}

/// The consumer's writing half: local state + catalog.
pub struct Syncer {
    replica: Arc<dyn Replica>,
    local: Local,
    /// Entries not in the catalog as the directory has them, by entryUUID.
    rejected: BTreeMap<Vec<u8>, RejectedEntry>,
    /// Entries to offer again.
    waiting: HashSet<Vec<u8>>,
    /// The local state missed a batch it cannot replay: the next sync must be
    /// a full refresh (cleared by one).
    needs_full: bool,
}

/// Puts in dependency order (clusters, servers, mailboxes) for a full refresh;
/// the order within a kind is kept.
fn rank(c: &Change) -> u8 {
    match c {
        Change::PutCluster(_) => 0,
        Change::PutServer(_) => 1,
        Change::PutMailbox(_) => 2,
        _ => 3,
    }
}

impl Syncer {
    /// Opens the local state (replaying a lost journal) and offers the waiting
    /// entries again.
    pub fn open(replica: Arc<dyn Replica>, db: &sled::Db, rule: LocalPartMatch) -> Result<Syncer> {
        let journal = replica.sync_meta(JOURNAL)?;
        let (local, needs_full) = Local::open(db, rule, journal.as_deref())?;
        let mut s = Syncer {
            replica,
            local,
            needs_full,
            rejected: BTreeMap::new(),
            waiting: HashSet::new(),
        };
        for (uuid, h) in s.local.all()? {
            s.note(&uuid, Some(&h));
        }
        s.retry()?;
        s.publish();
        Ok(s)
    }

    /// The cookie to resume from (None: never synced, or a full refresh is needed).
    pub fn cookie(&self) -> Result<Option<Vec<u8>>> {
        if self.needs_full {
            return Ok(None);
        }
        self.replica.sync_meta(COOKIE)
    }

    /// Every entryUUID the catalog holds entries of.
    pub fn known(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self.local.all()?.into_iter().map(|(u, _)| u).collect())
    }

    fn note(&mut self, uuid: &[u8], h: Option<&crate::directory::journal::Held>) {
        self.rejected.remove(uuid);
        self.waiting.remove(uuid);
        let Some(h) = h else { return };
        if h.waiting {
            self.waiting.insert(uuid.to_vec());
        }
        if let Some(reason) = &h.problem {
            self.rejected.insert(
                uuid.to_vec(),
                RejectedEntry {
                    dn: h.dn.clone(),
                    name: h.record.as_ref().map_or("", Record::name).to_string(),
                    reason: reason.clone(),
                },
            );
        }
    }

    /// Applies one batch (with `cookie`, the directory's state after it);
    /// `full`: the catalog becomes exactly these entries. Returns the count applied.
    pub fn batch(
        &mut self,
        events: Vec<Event>,
        cookie: Option<&[u8]>,
        full: bool,
    ) -> Result<usize> {
        let mut plan = self.local.plan(events, full)?;
        if full {
            let mut pairs: Vec<_> = plan.changes.into_iter().zip(plan.origin).collect();
            pairs.sort_by_key(|(c, _)| rank(c));
            (plan.changes, plan.origin) = pairs.into_iter().unzip();
        }
        let applied = self.write(plan, cookie, full)?;
        let retried = self.retry()?;
        STATUS.changed(applied + retried, full);
        self.publish();
        Ok(applied)
    }

    /// Writes one plan: catalog first (changes + cookie + journal, atomically),
    /// then the local state.
    fn write(&mut self, plan: Plan, cookie: Option<&[u8]>, full: bool) -> Result<usize> {
        let Plan {
            changes,
            origin,
            delta,
        } = plan;
        if changes.is_empty() && delta.put.is_empty() && delta.gone.is_empty() && cookie.is_none() {
            return Ok(0);
        }
        let journal = delta.journal()?;
        let mut meta: Vec<(&str, &[u8])> = vec![(JOURNAL, &journal)];
        if let Some(c) = cookie {
            meta.push((COOKIE, c));
        }
        let puts: Vec<bool> = changes.iter().map(|c| rank(c) < 3).collect();
        let report = if full {
            self.replica.replace_all(changes, &meta)?
        } else {
            self.replica.apply(changes, &meta)?
        };
        let mut rejected = HashMap::new();
        for r in &report.rejected {
            // A remove of what the catalog no longer holds is not an entry's problem.
            if let (Some(uuid), Some(true)) = (origin.get(r.index), puts.get(r.index)) {
                tracing::warn!(entry = %self.dn_of(&delta, uuid), reason = %r.reason,
                    "directory entry not applied: it waits until a later change makes it valid");
                rejected.insert(uuid.clone(), r.reason.clone());
            }
        }
        self.local.commit(&delta, &rejected)?;
        if full {
            self.needs_full = false;
            self.rejected.clear();
            self.waiting.clear();
        }
        for uuid in &delta.gone {
            self.note(uuid, None);
        }
        for (uuid, _) in &delta.put {
            let h = self.local.held(uuid)?;
            self.note(uuid, h.as_ref());
        }
        Ok(report.applied)
    }

    fn dn_of(&self, delta: &Delta, uuid: &[u8]) -> String {
        delta
            .put
            .iter()
            .find(|(u, _)| u == uuid)
            .map_or_else(String::new, |(_, h)| h.dn.clone())
    }

    /// Offers the waiting entries again until a round applies nothing.
    fn retry(&mut self) -> Result<usize> {
        let mut total = 0;
        for _ in 0..RETRY_ROUNDS {
            if self.waiting.is_empty() {
                break;
            }
            let candidates: Vec<Vec<u8>> = self.waiting.iter().cloned().collect();
            let plan = self.local.waiting(candidates.iter())?;
            if plan.changes.is_empty() {
                break;
            }
            let n = plan.changes.len();
            let before = self.waiting.len();
            total += self.write(plan, None, false)?;
            if self.waiting.len() >= before || n == 0 {
                break;
            }
        }
        Ok(total)
    }

    fn publish(&self) {
        STATUS.set_rejected(self.rejected.values().cloned().collect());
    }
}
