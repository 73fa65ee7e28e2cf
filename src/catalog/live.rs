//! One generation of the catalog as it is read: its sled tree (`catalog-<gen>`)
//! with the address index loaded from it (`names.rs`), and the reads that join
//! the two: a mailbox by address key, every mailbox, the mailbox count.
//!
//! Every write to a generation's tree after its full build goes through
//! [`Gen::apply_batch`], which reloads the index's delta once sled holds the
//! batch: readers see the old names (whose records are never overwritten) until
//! then, the new ones after.

use super::model::Mailbox;
use super::names::{Entry, Names};
use super::records;
use anyhow::{anyhow, Result};
use std::sync::{Arc, RwLock};

/// How many mailboxes the tree holds (u64 BE).
pub(super) const COUNT_KEY: &[u8] = b"~count";

pub(crate) struct Gen {
    pub(super) tree: sled::Tree,
    names: RwLock<Arc<Names>>,
}

impl Gen {
    pub(super) fn load(tree: sled::Tree) -> Result<Gen> {
        let names = Names::load(&tree)?;
        Ok(Gen {
            tree,
            names: RwLock::new(Arc::new(names)),
        })
    }

    pub(super) fn names(&self) -> Arc<Names> {
        self.names.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn entry(&self, key: &str) -> Option<Entry> {
        self.names
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
    }

    /// The mailbox that owns the address key `key` (primary or alias).
    pub(super) fn find(&self, key: &str) -> Result<Option<(Entry, Mailbox)>> {
        match self.entry(key) {
            Some(e) => Ok(Some((e, records::read(&self.tree, e.number)?))),
            None => Ok(None),
        }
    }

    /// The mailbox whose primary address key is `key` (None for an alias).
    pub(super) fn primary(&self, key: &str) -> Result<Option<Mailbox>> {
        match self.entry(key) {
            Some(e) if !e.alias => Ok(Some(records::read(&self.tree, e.number)?)),
            _ => Ok(None),
        }
    }

    /// Applies a merge's batch, then reads the index's delta again.
    pub(super) fn apply_batch(&self, batch: sled::Batch) -> Result<()> {
        self.tree.apply_batch(batch)?;
        let names = self.names().with_delta(&self.tree)?;
        *self.names.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(names);
        Ok(())
    }

    /// Every mailbox, sorted by primary address key.
    pub(super) fn all(&self) -> Result<Vec<Mailbox>> {
        let mut reader = records::Reader::new(&self.tree);
        self.names()
            .primaries()
            .into_iter()
            .map(|(_, n)| reader.get(n))
            .collect()
    }

    /// How many mailboxes this generation holds.
    pub(super) fn count(&self) -> Result<u64> {
        Ok(match self.tree.get(COUNT_KEY)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| anyhow!("corrupt catalog mailbox count"))?,
            ),
            None => 0,
        })
    }
}
