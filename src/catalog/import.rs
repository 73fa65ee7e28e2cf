//! Writing the catalog: `Catalog::import` (validate, plan, then one batch or a
//! shadow tree switched in with one key), shared with `Catalog::apply`.
//!
//! Atomicity: a small merge is one `apply_batch`, which sled recovers all or nothing.
//! A replace, a merge too large for one batch, or a compaction (the address index's
//! delta folded into a new fst, once it grows past a threshold) is written into a
//! fresh tree that nobody reads (`build.rs`); a single insert of `catalog.current`
//! then switches to it, so a process killed midway leaves the old catalog live and
//! an orphan tree that the next open drops.

use super::build::{rebuild_input, write_fresh};
use super::files::Input;
use super::live::Gen;
#[cfg(test)] // the tests' `use super::*` (they predate `build.rs`)
use super::model::LocalPartMatch;
use super::plan::{plan, ImportReport, Mode, Plan, TreeView};
use super::store::{load_servers, Catalog, CURRENT, TREE_PREFIX};
use super::validate::{resolve, Resolved};
use anyhow::Result;
use std::sync::Arc;

/// Merges writing more keys than this go through a shadow tree instead of one batch
/// (sled holds a batch in memory and blocks other writers of the store while it applies).
const BATCH_LIMIT: usize = 50_000;

/// The address index's delta is folded into a new fst once it holds more than
/// this many names and more than 1/`DELTA_SHARE` of the fst's.
const DELTA_MIN: usize = 65_536;
const DELTA_SHARE: usize = 20;

/// Why an import did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The input breaks the file formats or the catalog invariants; nothing written.
    /// Each line reads `FILE:LINE: problem` or `FILE: mailbox[i]: problem`.
    #[error("{} problem(s) in the input; the catalog is unchanged", .0.len())]
    Invalid(Vec<String>),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

/// One catalog writer at a time (import, apply, replace_all, set-state).
pub(super) static WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Catalog {
    /// Validates `input` and, unless `dry_run`, applies it atomically.
    pub fn import(
        &self,
        input: Input,
        mode: Mode,
        dry_run: bool,
        progress: &indicatif::ProgressBar,
    ) -> Result<ImportReport, ImportError> {
        // One writer at a time: the write lock is held from validation to switch so the
        // plan cannot go stale. Lookups wait only during the final pointer switch
        // of a shadow import (or the single batch of a small merge).
        let _writer = WRITER.lock().unwrap_or_else(|e| e.into_inner());
        let (tree, servers) = self.live_tree();
        let view = TreeView {
            tree: &tree,
            servers: &servers,
            rule: self.rule,
        };
        let resolved = match mode {
            Mode::Merge => resolve(input, Some(&view), self.rule),
            Mode::Replace => resolve(input, None, self.rule),
        }
        .map_err(ImportError::Invalid)?;
        let plan = plan(&view, &resolved, mode)?;
        if dry_run {
            return Ok(plan.report);
        }
        if plan.is_noop() {
            return Ok(plan.report);
        }
        self.commit(&tree, &resolved, &plan, mode, progress)?;
        Ok(plan.report)
    }

    /// Writes `plan` atomically (one batch, or a shadow tree switched in) and bumps
    /// the serial when it changes the catalog. The caller holds [`WRITER`].
    pub(super) fn commit(
        &self,
        tree: &Gen,
        resolved: &Resolved,
        plan: &Plan,
        mode: Mode,
        progress: &indicatif::ProgressBar,
    ) -> Result<()> {
        progress.set_length(resolved.mailboxes.len() as u64);
        // A merge is one batch (records appended, the address index's delta, the
        // server index chunks it edits) unless it writes too many keys; then it
        // is a full write of a new generation, like a compaction.
        let mut batch = sled::Batch::default();
        let batched =
            mode == Mode::Merge && plan.write(tree, &mut batch, self.rule)? <= BATCH_LIMIT;
        if batched {
            tree.apply_batch(batch)?;
            self.db.flush()?;
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            live.servers = Arc::new(load_servers(&live.gen.tree)?);
            drop(live);
            if needs_compaction(tree) {
                self.apply_shadow(tree, &Resolved::default(), &Plan::default(), mode, progress)?;
            }
        } else {
            drop(batch);
            self.apply_shadow(tree, resolved, plan, mode, progress)?;
        }
        progress.finish_and_clear();
        if !plan.changes_nothing() {
            self.bump_serial()?;
        }
        Ok(())
    }

    /// Writes a new generation and switches to it: `resolved` for a replace, the
    /// live catalog with `plan` applied for a merge (also how the address index's
    /// delta is folded into a new fst: a merge of an empty plan).
    pub(super) fn apply_shadow(
        &self,
        old: &Gen,
        resolved: &Resolved,
        plan: &Plan,
        mode: Mode,
        progress: &indicatif::ProgressBar,
    ) -> Result<()> {
        let old_name = String::from_utf8_lossy(&old.tree.name()).into_owned();
        let gen: u64 = old_name
            .strip_prefix(TREE_PREFIX)
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        let new_name = format!("{TREE_PREFIX}{}", gen + 1);
        self.db.drop_tree(new_name.as_bytes())?;
        let new = self.db.open_tree(new_name.as_bytes())?;
        if mode == Mode::Merge {
            let (whole, meta) = rebuild_input(old, Some(plan), self.rule)?;
            write_fresh(&new, &whole, &meta, self.rule, progress)?;
        } else {
            write_fresh(&new, resolved, &plan.meta, self.rule, progress)?;
        }
        new.flush()?;
        // The switch: one key, then a flush. Before it the old catalog is live, after it the new.
        let servers = Arc::new(load_servers(&new)?);
        let new = Arc::new(Gen::load(new)?);
        {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            self.meta.insert(CURRENT, new_name.as_bytes())?;
            self.db.flush()?;
            live.gen = new;
            live.servers = servers;
        }
        self.db.drop_tree(old_name.as_bytes())?;
        Ok(())
    }
}

/// Whether the address index's delta has grown enough to be folded into a new fst:
/// past [`DELTA_MIN`] names and past 1/[`DELTA_SHARE`] of the fst.
fn needs_compaction(tree: &Gen) -> bool {
    let (delta, fst) = tree.index_sizes();
    delta > DELTA_MIN && delta > fst / DELTA_SHARE
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;
