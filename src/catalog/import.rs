//! Writing the catalog: `Catalog::import` (validate, plan, then one batch or a
//! shadow tree switched in with one key), shared with `Catalog::apply`.
//!
//! Atomicity: a small merge is one `apply_batch`, which sled recovers all or nothing.
//! A replace, or a merge too large for one batch, is written into a fresh tree that
//! nobody reads; a single insert of `catalog.current` then switches to it, so a
//! process killed midway leaves the old catalog live and an orphan tree that the
//! next open drops.

use super::codec::{alias_value, domain_of, encode, key, meta_key, rule_tag};
use super::files::Input;
use super::index::{self, HOME, REPLICA};
use super::model::{address_key, server_key, LocalPartMatch};
use super::plan::{plan, ImportReport, Mode, Plan, TreeView};
use super::store::{load_servers, Catalog, CURRENT, FORMAT, FORMAT_KEY, RULE_KEY, TREE_PREFIX};
use super::validate::{resolve, Resolved};
use anyhow::Result;
use std::sync::Arc;

/// Merges writing more keys than this go through a shadow tree instead of one batch
/// (sled holds a batch in memory and blocks other writers of the store while it applies).
const BATCH_LIMIT: usize = 50_000;

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
        tree: &sled::Tree,
        resolved: &Resolved,
        plan: &Plan,
        mode: Mode,
        progress: &indicatif::ProgressBar,
    ) -> Result<()> {
        progress.set_length(resolved.mailboxes.len() as u64);
        // A merge is one batch (built in memory, reading the index chunks it edits)
        // unless it writes too many keys; then it goes through a shadow copy, which
        // costs the whole catalog (measured: 10,000 mailboxes into 1,000,000 took
        // 68 s that way, when the estimate counted every posting as keys).
        let mut batch = sled::Batch::default();
        let batched =
            mode == Mode::Merge && plan.write(tree, &mut batch, self.rule)? <= BATCH_LIMIT;
        if batched {
            tree.apply_batch(batch)?;
            self.db.flush()?;
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            live.servers = Arc::new(load_servers(&live.tree)?);
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

    pub(super) fn apply_shadow(
        &self,
        old: &sled::Tree,
        resolved: &Resolved,
        plan: &Plan,
        mode: Mode,
        progress: &indicatif::ProgressBar,
    ) -> Result<()> {
        let old_name = String::from_utf8_lossy(&old.name()).into_owned();
        let gen: u64 = old_name
            .strip_prefix(TREE_PREFIX)
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        let new_name = format!("{TREE_PREFIX}{}", gen + 1);
        self.db.drop_tree(new_name.as_bytes())?;
        let new = self.db.open_tree(new_name.as_bytes())?;
        if mode == Mode::Merge {
            // Copy the catalog as it is (in key order, so sled appends), then apply
            // the plan's removals and rewrites over the copy.
            for r in old.iter() {
                let (k, v) = r?;
                new.insert(k, v)?;
            }
            let mut batch = sled::Batch::default();
            plan.write(&new, &mut batch, self.rule)?;
            new.apply_batch(batch)?;
            progress.set_position(resolved.mailboxes.len() as u64);
        } else {
            write_fresh(&new, resolved, plan, self.rule, progress)?;
        }
        new.flush()?;
        // The switch: one key, then a flush. Before it the old catalog is live, after it the new.
        let servers = Arc::new(load_servers(&new)?);
        {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            self.meta.insert(CURRENT, new_name.as_bytes())?;
            self.db.flush()?;
            live.tree = new;
            live.servers = servers;
        }
        self.db.drop_tree(old_name.as_bytes())?;
        Ok(())
    }
}

/// Writes a whole catalog (a replace) into the empty tree `out`: sorted key order per
/// prefix, so sled appends near the rightmost leaf instead of splitting nodes all
/// over the tree. (Two writer threads were measured slower: sled serialises its log
/// writes.)
fn write_fresh(
    out: &sled::Tree,
    resolved: &Resolved,
    plan: &Plan,
    rule: LocalPartMatch,
    progress: &indicatif::ProgressBar,
) -> Result<()> {
    out.insert(RULE_KEY, rule_tag(rule))?;
    out.insert(FORMAT_KEY, FORMAT)?;
    for (k, v) in &plan.meta {
        out.insert(meta_key(k), v.as_slice())?;
    }
    for c in &resolved.clusters {
        out.insert(key(b'c', &[&server_key(&c.name)]), encode(c)?)?;
    }
    for s in &resolved.servers {
        out.insert(key(b's', &[&server_key(&s.name)]), encode(s)?)?;
    }
    let mailboxes = &resolved.mailboxes;
    let mut order: Vec<(String, u32)> = mailboxes
        .iter()
        .enumerate()
        .map(|(i, m)| (address_key(&m.address, rule), i as u32))
        .collect();
    order.sort_unstable();
    let mut domains: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for m in mailboxes {
        for name in m.names() {
            *domains.entry(domain_of(name)).or_default() += 1;
        }
    }
    for (d, n) in domains {
        out.insert(key(b'd', &[&d.to_lowercase()]), &n.to_be_bytes())?;
    }
    let step = (order.len() / 3).max(1);
    let mut aliases: Vec<(String, u32)> = order
        .iter()
        .enumerate()
        .flat_map(|(pos, (_, idx))| {
            mailboxes[*idx as usize]
                .aliases
                .iter()
                .map(move |a| (address_key(a, rule), pos as u32))
        })
        .collect();
    aliases.sort_unstable();
    for (alias, pos) in &aliases {
        let (primary, idx) = &order[*pos as usize];
        let record = encode(&mailboxes[*idx as usize])?;
        out.insert(key(b'a', &[alias]), alias_value(primary, &record))?;
    }
    drop(aliases);
    progress.set_position(step as u64 / 2);
    let mut postings: Vec<(String, u32, u8)> = Vec::with_capacity(order.len() * 3);
    for (pos, (_, idx)) in order.iter().enumerate() {
        let m = &mailboxes[*idx as usize];
        postings.push((server_key(&m.home), pos as u32, HOME));
        postings.extend(
            m.replicas
                .iter()
                .map(|r| (server_key(r), pos as u32, REPLICA)),
        );
    }
    postings.sort_unstable();
    index::fill(
        out,
        postings
            .iter()
            .map(|(s, pos, role)| (s.as_str(), order[*pos as usize].0.as_str(), *role)),
    )?;
    progress.set_position(2 * step as u64);
    drop(postings);
    for (i, (primary, idx)) in order.iter().enumerate() {
        out.insert(key(b'm', &[primary]), encode(&mailboxes[*idx as usize])?)?;
        if i % 4096 == 0 {
            progress.set_position((2 * step + i / 3) as u64);
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;
