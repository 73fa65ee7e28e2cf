//! One generation of the catalog as it is read: its sled tree (`catalog-<gen>`)
//! with what is loaded from it into memory, the address index (`names.rs`) and
//! the record blocks (`records.rs`), and the reads that join the two: a mailbox by
//! address key, every mailbox, the mailbox count. A lookup reads no sled page.
//!
//! Every write to a generation's tree after its full build goes through
//! [`Gen::apply_batch`], which reloads the index's delta and the tail blocks once
//! sled holds the batch: readers see the old state until then, the new after.

use super::model::Mailbox;
use super::names::{Entry, Names};
use super::records::Blocks;
use anyhow::{anyhow, Result};
use std::sync::{Arc, RwLock};

/// How many mailboxes the tree holds (u64 BE).
pub(super) const COUNT_KEY: &[u8] = b"~count";

pub(crate) struct Gen {
    pub(super) tree: sled::Tree,
    state: RwLock<Arc<State>>,
}

/// What a generation's readers use, swapped whole after each batch.
struct State {
    names: Names,
    blocks: Blocks,
}

impl Gen {
    pub(super) fn load(tree: sled::Tree) -> Result<Gen> {
        let state = State {
            names: Names::load(&tree)?,
            blocks: Blocks::load(&tree)?,
        };
        Ok(Gen {
            tree,
            state: RwLock::new(Arc::new(state)),
        })
    }

    fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// (names in the index's delta, names in its fst)
    pub(super) fn index_sizes(&self) -> (usize, usize) {
        self.state().names.sizes()
    }

    pub(super) fn entry(&self, key: &str) -> Option<Entry> {
        self.state().names.get(key)
    }

    /// The mailbox that owns the address key `key` (primary or alias).
    pub(super) fn find(&self, key: &str) -> Result<Option<(Entry, Mailbox)>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match state.names.get(key) {
            Some(e) => Ok(Some((e, state.blocks.get(e.number)?))),
            None => Ok(None),
        }
    }

    /// The mailbox whose primary address key is `key` (None for an alias).
    pub(super) fn primary(&self, key: &str) -> Result<Option<Mailbox>> {
        match self.find(key)? {
            Some((e, m)) if !e.alias => Ok(Some(m)),
            _ => Ok(None),
        }
    }

    /// Applies a merge's batch, then reads the index's delta and the record
    /// blocks past the old end again.
    pub(super) fn apply_batch(&self, batch: sled::Batch) -> Result<()> {
        self.tree.apply_batch(batch)?;
        let old = self.state();
        let state = State {
            names: old.names.with_delta(&self.tree)?,
            blocks: old.blocks.reload_tail(&self.tree)?,
        };
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
        Ok(())
    }

    /// Every mailbox, sorted by primary address key.
    pub(super) fn all(&self) -> Result<Vec<Mailbox>> {
        let state = self.state();
        state
            .names
            .primaries()
            .into_iter()
            .map(|(_, n)| state.blocks.get(n))
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
