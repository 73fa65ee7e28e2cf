//! The import plan: what an import (or `Catalog::apply`) changes, computed from the
//! validated input and the catalog as it is before anything is written, and how a
//! merge writes it into one sled batch (records at fresh numbers, the address
//! index's delta, domain and mailbox counts, server index).

use super::codec::{decode, domain_of, encode, key, meta_key};
use super::index::{self, HOME, REPLICA};
use super::live::{Gen, COUNT_KEY};
use super::model::{address_key, server_key, Cluster, LocalPartMatch, Mailbox, Server};
use super::names::{put_delta, Entry};
use super::records::Appender;
use super::validate::{Resolved, View};
use anyhow::{anyhow, Result};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Import mode: upsert, or make the catalog equal to the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Merge,
    Replace,
}

/// Added / updated / removed / unchanged, for servers or mailboxes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
    pub unchanged: u64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} added, {} updated, {} removed, {} unchanged",
            self.added, self.updated, self.removed, self.unchanged
        )
    }
}

/// What an import did (or, for a dry run, would do).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportReport {
    pub clusters: Counts,
    pub servers: Counts,
    pub mailboxes: Counts,
}

/// The catalog as it is, as validation sees it.
pub(super) struct TreeView<'a> {
    pub(super) tree: &'a Gen,
    pub(super) servers: &'a HashMap<String, Arc<Server>>,
    pub(super) rule: LocalPartMatch,
}

impl TreeView<'_> {
    pub(super) fn mailbox(&self, primary_key: &str) -> Result<Option<Mailbox>> {
        self.tree.primary(primary_key)
    }

    pub(super) fn cluster(&self, cluster_key: &str) -> Result<Option<Cluster>> {
        self.tree
            .tree
            .get(key(b'c', &[cluster_key]))?
            .map(|v| decode(&v))
            .transpose()
    }
}

impl View for TreeView<'_> {
    fn server(&self, key: &str) -> Option<Server> {
        self.servers.get(key).map(|s| (**s).clone())
    }

    fn owner(&self, k: &str) -> Option<String> {
        match self.tree.entry(k)? {
            e if !e.alias => Some(k.to_string()),
            _ => match self.tree.find(k) {
                Ok(Some((_, m))) => Some(address_key(&m.address, self.rule)),
                _ => None,
            },
        }
    }

    fn mailboxes_on(&self, server_key: &str) -> Vec<Mailbox> {
        index::postings(&self.tree.tree, server_key)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(primary, _)| self.mailbox(&primary).ok().flatten())
            .collect()
    }
}

/// The changes an import makes, computed before anything is written.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) report: ImportReport,
    /// Clusters to write, and cluster keys to remove.
    pub(super) clusters: Vec<Cluster>,
    pub(super) removed_clusters: Vec<String>,
    /// Servers to write, and server keys to remove.
    pub(super) servers: Vec<Server>,
    pub(super) removed_servers: Vec<String>,
    /// Mailboxes a merge writes, with the record they replace (a replace writes
    /// the validated input whole: see the report's counts).
    pub(super) mailboxes: Vec<(Mailbox, Option<Mailbox>)>,
    /// Mailboxes a merge removes (a replace drops what it does not rewrite).
    pub(super) removed_mailboxes: Vec<Mailbox>,
    /// The caller's sync metadata, written with the changes (see [`meta_key`]).
    pub(super) meta: Vec<(String, Vec<u8>)>,
}

impl Plan {
    pub(super) fn is_noop(&self) -> bool {
        self.changes_nothing() && self.meta.is_empty()
    }

    /// Whether the catalog's records stay as they are (metadata aside).
    pub(super) fn changes_nothing(&self) -> bool {
        self.clusters.is_empty()
            && self.removed_clusters.is_empty()
            && self.servers.is_empty()
            && self.removed_servers.is_empty()
            && self.mailboxes.is_empty()
            && self.removed_mailboxes.is_empty()
            && self.report.mailboxes.removed == 0
            && self.report.mailboxes.added == 0
            && self.report.mailboxes.updated == 0
    }

    /// Writes a merge's changes over the catalog `tree` as it is (a replace rebuilds
    /// instead); index chunks and the tail record block are read from `tree`.
    /// Returns how many keys the batch writes or removes (a key written twice
    /// counts twice).
    pub(super) fn write(
        &self,
        tree: &Gen,
        batch: &mut sled::Batch,
        rule: LocalPartMatch,
    ) -> Result<usize> {
        for k in &self.removed_clusters {
            batch.remove(key(b'c', &[k]));
        }
        for c in &self.clusters {
            batch.insert(key(b'c', &[&server_key(&c.name)]), encode(c)?);
        }
        for k in &self.removed_servers {
            batch.remove(key(b's', &[k]));
        }
        for s in &self.servers {
            batch.insert(key(b's', &[&server_key(&s.name)]), encode(s)?);
        }
        for (k, v) in &self.meta {
            batch.insert(meta_key(k), v.as_slice());
        }
        let mut keys = self.removed_clusters.len()
            + self.clusters.len()
            + self.removed_servers.len()
            + self.servers.len()
            + self.meta.len();
        keys += self.write_domain_counts(&tree.tree, batch)?;
        keys += self.write_count(tree, batch)?;
        // All removals before any write: a name may move from one mailbox of the
        // import to another, and the later removal must not undo the earlier write.
        let mut edit = index::Edit::new(&tree.tree);
        let replaced = self.mailboxes.iter().filter_map(|(_, old)| old.as_ref());
        for old in replaced.chain(&self.removed_mailboxes) {
            for name in old.names() {
                put_delta(batch, &address_key(name, rule), None);
            }
            keys += 1 + old.aliases.len();
            let primary = address_key(&old.address, rule);
            for s in std::iter::once(&old.home).chain(&old.replicas) {
                edit.remove(&server_key(s), &primary)?;
            }
        }
        let mut records = Appender::new(&tree.tree)?;
        for (new, _) in &self.mailboxes {
            let number = records.push(new)?;
            let primary = address_key(&new.address, rule);
            put_delta(
                batch,
                &primary,
                Some(Entry {
                    number,
                    alias: false,
                }),
            );
            for alias in &new.aliases {
                let entry = Entry {
                    number,
                    alias: true,
                };
                put_delta(batch, &address_key(alias, rule), Some(entry));
            }
            keys += 1 + new.aliases.len();
            edit.add(&server_key(&new.home), &primary, HOME)?;
            for r in &new.replicas {
                edit.add(&server_key(r), &primary, REPLICA)?;
            }
        }
        Ok(keys + records.write(batch) + edit.write(batch)?)
    }

    /// Adjusts the mailbox count by the mailboxes this plan adds and removes.
    fn write_count(&self, tree: &Gen, batch: &mut sled::Batch) -> Result<usize> {
        let added = self.mailboxes.iter().filter(|(_, o)| o.is_none()).count() as u64;
        let removed = self.removed_mailboxes.len() as u64;
        if added == removed {
            return Ok(0);
        }
        let n = (tree.count()? + added).saturating_sub(removed);
        batch.insert(COUNT_KEY, &n.to_be_bytes());
        Ok(1)
    }

    /// Adjusts the per-domain address counts by the names this plan adds and
    /// removes; returns how many keys that writes.
    fn write_domain_counts(&self, tree: &sled::Tree, batch: &mut sled::Batch) -> Result<usize> {
        let mut domains: HashMap<String, i64> = HashMap::new();
        for (new, old) in &self.mailboxes {
            for name in new.names() {
                *domains.entry(domain_of(name).to_lowercase()).or_default() += 1;
            }
            for name in old.iter().flat_map(|o| o.names()) {
                *domains.entry(domain_of(name).to_lowercase()).or_default() -= 1;
            }
        }
        for name in self.removed_mailboxes.iter().flat_map(|o| o.names()) {
            *domains.entry(domain_of(name).to_lowercase()).or_default() -= 1;
        }
        let mut written = 0;
        for (d, delta) in domains.into_iter().filter(|(_, d)| *d != 0) {
            let k = key(b'd', &[&d]);
            let now = match tree.get(&k)? {
                Some(v) => u64::from_be_bytes(
                    v.as_ref()
                        .try_into()
                        .map_err(|_| anyhow!("corrupt domain count"))?,
                ),
                None => 0,
            };
            match (now as i64).saturating_add(delta) {
                n if n <= 0 => batch.remove(k),
                n => batch.insert(k, &(n as u64).to_be_bytes()),
            }
            written += 1;
        }
        Ok(written)
    }
}

pub(super) fn plan(view: &TreeView, resolved: &Resolved, mode: Mode) -> Result<Plan> {
    let mut report = ImportReport::default();
    let (clusters, removed_clusters) = plan_clusters(view, resolved, mode, &mut report.clusters)?;
    let (servers, removed_servers) = plan_servers(view, resolved, mode, &mut report.servers);
    let mailboxes = plan_mailboxes(view, resolved, mode, &mut report.mailboxes)?;
    Ok(Plan {
        report,
        clusters,
        removed_clusters,
        servers,
        removed_servers,
        mailboxes,
        ..Plan::default()
    })
}

/// The clusters to write (new or changed) and, for a replace, the keys of those to remove.
fn plan_clusters(
    view: &TreeView,
    resolved: &Resolved,
    mode: Mode,
    counts: &mut Counts,
) -> Result<(Vec<Cluster>, Vec<String>)> {
    let mut clusters = Vec::new();
    let mut seen_clusters = BTreeSet::new();
    for c in &resolved.clusters {
        let k = server_key(&c.name);
        seen_clusters.insert(k.clone());
        match view
            .tree
            .tree
            .get(key(b'c', &[&k]))?
            .map(|v| decode::<Cluster>(&v))
            .transpose()?
        {
            None => counts.added += 1,
            Some(old) if old == *c => {
                counts.unchanged += 1;
                continue;
            }
            Some(_) => counts.updated += 1,
        }
        clusters.push(c.clone());
    }
    let mut removed_clusters = Vec::new();
    if mode == Mode::Replace {
        for r in view.tree.tree.scan_prefix(b"c\0") {
            let k = String::from_utf8_lossy(&r?.0[2..]).into_owned();
            if !seen_clusters.contains(&k) {
                removed_clusters.push(k);
            }
        }
        counts.removed = removed_clusters.len() as u64;
    }
    Ok((clusters, removed_clusters))
}

/// The servers to write (new or changed) and, for a replace, the keys of those to remove.
fn plan_servers(
    view: &TreeView,
    resolved: &Resolved,
    mode: Mode,
    counts: &mut Counts,
) -> (Vec<Server>, Vec<String>) {
    let mut servers = Vec::new();
    let mut seen_servers = BTreeSet::new();
    for s in &resolved.servers {
        let k = server_key(&s.name);
        seen_servers.insert(k.clone());
        match view.servers.get(&k) {
            None => counts.added += 1,
            Some(old) if **old == *s => {
                counts.unchanged += 1;
                continue;
            }
            Some(_) => counts.updated += 1,
        }
        servers.push(s.clone());
    }
    let mut removed_servers = Vec::new();
    if mode == Mode::Replace {
        removed_servers = view
            .servers
            .keys()
            .filter(|k| !seen_servers.contains(*k))
            .cloned()
            .collect();
        counts.removed = removed_servers.len() as u64;
    }
    (servers, removed_servers)
}

/// For a merge, the mailboxes to write with the record each replaces; the counts
/// in any case.
fn plan_mailboxes(
    view: &TreeView,
    resolved: &Resolved,
    mode: Mode,
    counts: &mut Counts,
) -> Result<Vec<(Mailbox, Option<Mailbox>)>> {
    let before = view.tree.count()?;
    let catalog_empty = before == 0;
    let mut mailboxes = Vec::new();
    for m in &resolved.mailboxes {
        let old = if catalog_empty {
            None
        } else {
            view.mailbox(&address_key(&m.address, view.rule))?
        };
        match &old {
            None => counts.added += 1,
            Some(o) if o == m => {
                counts.unchanged += 1;
                continue;
            }
            Some(_) => counts.updated += 1,
        }
        // A replace writes `resolved` whole: no copy of each record (1M clones
        // cost 1.9 s and a third of the import's memory).
        if mode == Mode::Merge {
            mailboxes.push((m.clone(), old));
        }
    }
    if mode == Mode::Replace && !catalog_empty {
        // Every input row is distinct, so the rows of the catalog not matched are removed.
        counts.removed = before - counts.updated - counts.unchanged;
    }
    Ok(mailboxes)
}
