//! The sled-backed replica catalog: indexed lookups and crash-atomic imports.
//!
//! Layout: the catalog of one generation lives in one sled tree, `catalog-<gen>`;
//! the `meta` tree's key `catalog.current` names the live one. Inside a tree:
//!
//! | key                         | value                                   |
//! |-----------------------------|-----------------------------------------|
//! | `c\0<cluster key>`          | bincode [`Cluster`] (next-hop routers)  |
//! | `s\0<server key>`           | bincode [`Server`]                      |
//! | `m\0<address key>`          | bincode [`Mailbox`], by primary address |
//! | `a\0<alias key>`            | primary address key, `\0`, the record    |
//! | `h\0<server key>\0<start>`  | a chunk of the server index (`index.rs`) |
//! | `d\0<domain>`               | how many addresses (primary or alias) it has |
//! | `~rule`                     | the local-part rule the keys were made with |
//! | `~meta\0<key>`              | a caller's sync metadata (`Catalog::apply`) |
//!
//! An alias carries a copy of its mailbox's record, so every lookup is one read.
//!
//! Atomicity: a small merge is one `apply_batch`, which sled recovers all or nothing.
//! A replace, or a merge too large for one batch, is written into a fresh tree that
//! nobody reads; a single insert of `catalog.current` then switches to it, so a
//! process killed midway leaves the old catalog live and an orphan tree that the
//! next open drops.

use super::files::Input;
use super::index::{self, HOME, REPLICA};
use super::model::{address_key, server_key, AdminState, Cluster, LocalPartMatch, Mailbox, Server};
use super::validate::{resolve, Resolved, View};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

const CURRENT: &[u8] = b"catalog.current";
const TREE_PREFIX: &str = "catalog-";
const RULE_KEY: &[u8] = b"~rule";
/// In the meta tree: the catalog's change counter, see [`Catalog::serial`].
const SERIAL: &[u8] = b"catalog.serial";
/// The record layout of this catalog tree; bumped whenever a stored record gains or
/// loses a field (bincode records carry no field names). 2: `Mailbox.failover` and
/// `Server.availability_threshold`; 3: `Mailbox.home_state` and `replica_states`.
const FORMAT_KEY: &[u8] = b"~format";
const FORMAT: &[u8] = b"3";
/// Changes beyond this many keys go through a shadow tree instead of one batch.
const BATCH_LIMIT: usize = 50_000;

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub(super) fn encode<T: serde::Serialize + ?Sized>(v: &T) -> Result<Vec<u8>> {
    Ok(bincode::serde::encode_to_vec(v, bincode_config())?)
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    Ok(bincode::serde::decode_from_slice(bytes, bincode_config())?.0)
}

fn key(prefix: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.push(prefix);
    for p in parts {
        k.push(0);
        k.extend_from_slice(p.as_bytes());
    }
    k
}

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

/// The result of [`Catalog::lookup`]: a mailbox with its home and replica servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub mailbox: Mailbox,
    pub home: Arc<Server>,
    pub replicas: Vec<Arc<Server>>,
}

/// A catalog written by an older version (its record format differs): refused by
/// [`Catalog::open`], replaced by `catalog import --replace`.
#[derive(Debug, thiserror::Error)]
#[error(
    "the catalog in this data directory was written by an older clustermail \
     (record format {0}, this version reads {fmt}); import your catalog files \
     again with `clustermail catalog import --replace FILE...`",
    fmt = String::from_utf8_lossy(FORMAT)
)]
pub struct StaleFormat(pub String);

/// The replica catalog. Cheap to share: lookups take a read lock only.
pub struct Catalog {
    meta: sled::Tree,
    db: sled::Db,
    rule: LocalPartMatch,
    live: RwLock<Live>,
}

struct Live {
    tree: sled::Tree,
    /// Servers are few and read on every lookup: kept in memory, by key.
    servers: Arc<HashMap<String, Arc<Server>>>,
}

impl Catalog {
    /// Opens the catalog kept in `db`, dropping any tree left by an interrupted import.
    pub fn open(db: &sled::Db, rule: LocalPartMatch) -> Result<Catalog> {
        let meta = db.open_tree("meta")?;
        let name = match meta.get(CURRENT)? {
            Some(n) => String::from_utf8(n.to_vec()).context("corrupt catalog.current")?,
            None => {
                let n = format!("{TREE_PREFIX}1");
                meta.insert(CURRENT, n.as_bytes())?;
                n
            }
        };
        for t in db.tree_names() {
            let t = String::from_utf8_lossy(&t).into_owned();
            if t.starts_with(TREE_PREFIX) && t != name {
                tracing::info!(tree = %t, "dropping catalog tree left by an interrupted import");
                db.drop_tree(t.as_bytes())?;
            }
        }
        let tree = db.open_tree(name.as_bytes())?;
        let empty = tree.scan_prefix(b"s\0").next().is_none();
        match tree.get(FORMAT_KEY)? {
            Some(f) if f.as_ref() == FORMAT => {}
            _ if empty => {
                tree.insert(FORMAT_KEY, FORMAT)?;
            }
            stored => {
                return Err(StaleFormat(stored.map_or("1".to_string(), |f| {
                    String::from_utf8_lossy(&f).into_owned()
                }))
                .into())
            }
        }
        match tree.get(RULE_KEY)? {
            Some(stored) if stored.as_ref() != rule_tag(rule) => {
                let empty = tree.scan_prefix(b"m\0").next().is_none();
                if !empty {
                    bail!(
                        "the catalog was built with local_part_match = {:?}, the config says {:?}; \
                         re-import it with `catalog import --replace` after changing the config",
                        String::from_utf8_lossy(&stored),
                        String::from_utf8_lossy(rule_tag(rule))
                    );
                }
                tree.insert(RULE_KEY, rule_tag(rule))?;
            }
            Some(_) => {}
            None => {
                tree.insert(RULE_KEY, rule_tag(rule))?;
            }
        }
        let servers = Arc::new(load_servers(&tree)?);
        Ok(Catalog {
            meta,
            db: db.clone(),
            rule,
            live: RwLock::new(Live { tree, servers }),
        })
    }

    /// Like [`Catalog::open`], for `catalog import --replace`: a catalog of an
    /// older record format ([`StaleFormat`]) is set aside instead of refused — the
    /// import builds the new catalog beside it and drops it only when it switches
    /// to the new one (an import that fails leaves it as it was).
    pub fn open_for_replace(db: &sled::Db, rule: LocalPartMatch) -> Result<Catalog> {
        match Catalog::open(db, rule) {
            Err(e) if e.is::<StaleFormat>() => {
                let meta = db.open_tree("meta")?;
                let current = meta
                    .get(CURRENT)?
                    .map(|n| String::from_utf8_lossy(&n).into_owned())
                    .unwrap_or_default();
                let gen: u64 = current
                    .strip_prefix(TREE_PREFIX)
                    .and_then(|g| g.parse().ok())
                    .unwrap_or(1);
                // An empty catalog of this format, never made current: dropped as a
                // leftover at the next open unless the import switches past it.
                let name = format!("{TREE_PREFIX}{}", gen + 1);
                db.drop_tree(name.as_bytes())?;
                let tree = db.open_tree(name.as_bytes())?;
                tree.insert(FORMAT_KEY, FORMAT)?;
                tree.insert(RULE_KEY, rule_tag(rule))?;
                tracing::warn!(stale = %e, "replacing a catalog of an older record format");
                Ok(Catalog {
                    meta,
                    db: db.clone(),
                    rule,
                    live: RwLock::new(Live {
                        tree,
                        servers: Default::default(),
                    }),
                })
            }
            other => other,
        }
    }

    pub fn rule(&self) -> LocalPartMatch {
        self.rule
    }

    fn live_tree(&self) -> (sled::Tree, Arc<HashMap<String, Arc<Server>>>) {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        (live.tree.clone(), live.servers.clone())
    }

    /// Finds the mailbox that owns `addr` (primary address or alias), with its
    /// home and replica server records. Two index reads at most; never a scan.
    pub fn lookup(&self, addr: &str) -> Result<Option<Lookup>> {
        let k = address_key(addr, self.rule);
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let tree = &live.tree;
        let mailbox: Mailbox = match tree.get(key(b'm', &[&k]))? {
            Some(v) => decode(&v)?,
            None => match tree.get(key(b'a', &[&k]))? {
                Some(v) => decode(alias_record(&v).1)?,
                None => return Ok(None),
            },
        };
        let server = |name: &str| {
            live.servers.get(&server_key(name)).cloned().ok_or_else(|| {
                anyhow!(
                    "catalog broken: server {name:?} of {} missing",
                    mailbox.address
                )
            })
        };
        let home = server(&mailbox.home)?;
        let replicas = mailbox
            .replicas
            .iter()
            .map(|r| server(r))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Lookup {
            mailbox,
            home,
            replicas,
        }))
    }

    /// One server by name (case-insensitive).
    pub fn server(&self, name: &str) -> Option<Server> {
        self.live_tree()
            .1
            .get(&server_key(name))
            .map(|s| (**s).clone())
    }

    /// A cluster's record (its next-hop routers), if the catalog has one.
    pub fn cluster(&self, name: &str) -> Result<Option<Cluster>> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        live.tree
            .get(key(b'c', &[&server_key(name)]))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Every cluster record, sorted by name.
    pub fn clusters(&self) -> Result<Vec<Cluster>> {
        let (tree, _) = self.live_tree();
        tree.scan_prefix(b"c\0").map(|r| decode(&r?.1)).collect()
    }

    /// Whether any catalog address (primary or alias) is in `domain`.
    pub fn serves_domain(&self, domain: &str) -> Result<bool> {
        let domain = address_key(&format!("x@{domain}"), self.rule);
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        Ok(live.tree.get(key(b'd', &[&domain[2..]]))?.is_some())
    }

    /// All servers sorted by name, optionally of one cluster.
    pub fn servers(&self, cluster: Option<&str>) -> Vec<Server> {
        let mut v: Vec<Server> = self
            .live_tree()
            .1
            .values()
            .filter(|s| cluster.is_none_or(|c| s.cluster.eq_ignore_ascii_case(c)))
            .map(|s| (**s).clone())
            .collect();
        v.sort_by_key(|s| server_key(&s.name));
        v
    }

    /// Mailboxes sorted by address key: all of them, those homed or replicated on
    /// `server`, or those on any server of `cluster`. Filters use the server index.
    pub fn mailboxes(&self, cluster: Option<&str>, server: Option<&str>) -> Result<Vec<Mailbox>> {
        let (tree, servers) = self.live_tree();
        if cluster.is_none() && server.is_none() {
            return tree
                .scan_prefix(b"m\0")
                .map(|r| decode::<Mailbox>(&r?.1))
                .collect();
        }
        let mut keys: Vec<String> = servers
            .iter()
            .filter(|(_, s)| cluster.is_none_or(|c| s.cluster.eq_ignore_ascii_case(c)))
            .filter(|(k, _)| server.is_none_or(|n| server_key(n) == **k))
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        let mut addrs = BTreeSet::new();
        for k in keys {
            addrs.extend(
                index::postings(&tree, &k)?
                    .into_iter()
                    .map(|(a, _)| a.into_bytes()),
            );
        }
        addrs
            .into_iter()
            .map(|a| {
                let mut mk = b"m\0".to_vec();
                mk.extend_from_slice(&a);
                let raw = tree.get(&mk)?.ok_or_else(|| {
                    anyhow!("catalog index broken at {}", String::from_utf8_lossy(&a))
                })?;
                decode(&raw)
            })
            .collect()
    }

    /// Sets a server's admin state; takes effect for the next lookup.
    pub fn set_state(&self, name: &str, state: AdminState) -> Result<Server> {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        let k = server_key(name);
        let mut server = live
            .servers
            .get(&k)
            .map(|s| (**s).clone())
            .ok_or_else(|| anyhow!("no server named {name:?} in the catalog"))?;
        server.state = state;
        live.tree.insert(key(b's', &[&k]), encode(&server)?)?;
        self.db.flush()?;
        let mut servers = (*live.servers).clone();
        servers.insert(k, Arc::new(server.clone()));
        live.servers = Arc::new(servers);
        drop(live);
        self.bump_serial()?;
        Ok(server)
    }

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
        let shadow = mode == Mode::Replace || plan.key_estimate > BATCH_LIMIT;
        if shadow {
            self.apply_shadow(tree, resolved, plan, mode, progress)?;
        } else {
            let mut batch = sled::Batch::default();
            plan.write(tree, &mut batch, self.rule)?;
            tree.apply_batch(batch)?;
            self.db.flush()?;
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            live.servers = Arc::new(load_servers(&live.tree)?);
        }
        progress.finish_and_clear();
        if !plan.changes_nothing() {
            self.bump_serial()?;
        }
        Ok(())
    }

    /// The live tree and its servers, for a writer holding [`WRITER`].
    pub(super) fn writer_view(&self) -> (sled::Tree, Arc<HashMap<String, Arc<Server>>>) {
        self.live_tree()
    }

    /// A value stored by [`Catalog::apply`] or [`Catalog::replace_all`] under `key`.
    pub fn sync_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let (tree, _) = self.live_tree();
        Ok(tree.get(meta_key(key))?.map(|v| v.to_vec()))
    }

    /// A number that changes with every write to the catalog (import, set-state),
    /// kept across restarts: how an HA peer tells that its copy is stale.
    pub fn serial(&self) -> u64 {
        read_u64(&self.meta, SERIAL).unwrap_or(0)
    }

    fn bump_serial(&self) -> Result<()> {
        self.meta.update_and_fetch(SERIAL, |old| {
            let n = old
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map_or(0, u64::from_be_bytes);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
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
            // Sorted key order per prefix: sled appends near the rightmost leaf instead
            // of splitting nodes all over the tree. (Two writer threads were measured
            // slower: sled serialises its log writes.)
            let out = &new;
            out.insert(RULE_KEY, rule_tag(self.rule))?;
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
            let rule = self.rule;
            let mailboxes = &resolved.mailboxes;
            let mut order: Vec<(String, u32)> = mailboxes
                .iter()
                .enumerate()
                .map(|(i, m)| (address_key(&m.address, rule), i as u32))
                .collect();
            order.sort_unstable();
            let mut domains: std::collections::BTreeMap<&str, u64> =
                std::collections::BTreeMap::new();
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

/// One catalog writer at a time (import, apply, replace_all, set-state).
pub(super) static WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Where a caller's sync metadata (e.g. a directory's sync cookie) is kept: in the
/// catalog tree itself, so it is written in the same batch or shadow tree as the
/// changes it describes.
fn meta_key(key: &str) -> Vec<u8> {
    let mut k = b"~meta\0".to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

fn rule_tag(rule: LocalPartMatch) -> &'static [u8] {
    match rule {
        LocalPartMatch::CaseInsensitive => b"case-insensitive",
        LocalPartMatch::Exact => b"exact",
    }
}

fn load_servers(tree: &sled::Tree) -> Result<HashMap<String, Arc<Server>>> {
    tree.scan_prefix(b"s\0")
        .map(|r| {
            let (k, v) = r?;
            let s: Server = decode(&v)?;
            Ok((String::from_utf8_lossy(&k[2..]).into_owned(), Arc::new(s)))
        })
        .collect()
}

fn write_mailbox(batch: &mut sled::Batch, m: &Mailbox, rule: LocalPartMatch) -> Result<()> {
    let primary = address_key(&m.address, rule);
    let record = encode(m)?;
    if !m.aliases.is_empty() {
        let value = alias_value(&primary, &record);
        for alias in &m.aliases {
            batch.insert(key(b'a', &[&address_key(alias, rule)]), value.as_slice());
        }
    }
    batch.insert(key(b'm', &[&primary]), record);
    Ok(())
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

fn alias_value(primary: &str, record: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(primary.len() + 1 + record.len());
    v.extend_from_slice(primary.as_bytes());
    v.push(0);
    v.extend_from_slice(record);
    v
}

/// Splits an alias value into (primary address key, mailbox record).
fn alias_record(v: &[u8]) -> (&[u8], &[u8]) {
    match v.iter().position(|b| *b == 0) {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[]),
    }
}

fn remove_mailbox(batch: &mut sled::Batch, m: &Mailbox, rule: LocalPartMatch) {
    let primary = address_key(&m.address, rule);
    batch.remove(key(b'm', &[&primary]));
    for alias in &m.aliases {
        batch.remove(key(b'a', &[&address_key(alias, rule)]));
    }
}

/// The catalog as it is, as validation sees it.
pub(super) struct TreeView<'a> {
    pub(super) tree: &'a sled::Tree,
    pub(super) servers: &'a HashMap<String, Arc<Server>>,
    pub(super) rule: LocalPartMatch,
}

impl TreeView<'_> {
    pub(super) fn mailbox(&self, primary_key: &str) -> Result<Option<Mailbox>> {
        self.tree
            .get(key(b'm', &[primary_key]))?
            .map(|v| decode(&v))
            .transpose()
    }

    pub(super) fn cluster(&self, cluster_key: &str) -> Result<Option<Cluster>> {
        self.tree
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
        if let Ok(Some(_)) = self.tree.get(key(b'm', &[k])) {
            return Some(k.to_string());
        }
        match self.tree.get(key(b'a', &[k])) {
            Ok(Some(v)) => Some(String::from_utf8_lossy(alias_record(&v).0).into_owned()),
            _ => None,
        }
    }

    fn mailboxes_on(&self, server_key: &str) -> Vec<Mailbox> {
        index::postings(self.tree, server_key)
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
    /// Mailboxes to write, with the record they replace.
    pub(super) mailboxes: Vec<(Mailbox, Option<Mailbox>)>,
    /// Mailboxes a merge removes (a replace drops what it does not rewrite).
    pub(super) removed_mailboxes: Vec<Mailbox>,
    /// The caller's sync metadata, written with the changes (see [`meta_key`]).
    pub(super) meta: Vec<(String, Vec<u8>)>,
    pub(super) key_estimate: usize,
}

impl Plan {
    pub(super) fn is_noop(&self) -> bool {
        self.changes_nothing() && self.meta.is_empty()
    }

    /// Whether the catalog's records stay as they are (metadata aside).
    fn changes_nothing(&self) -> bool {
        self.clusters.is_empty()
            && self.removed_clusters.is_empty()
            && self.servers.is_empty()
            && self.removed_servers.is_empty()
            && self.mailboxes.is_empty()
            && self.removed_mailboxes.is_empty()
            && self.report.mailboxes.removed == 0
    }

    /// Writes a merge's changes over the catalog `tree` as it is (a replace rebuilds
    /// instead); index chunks are read from `tree`.
    fn write(
        &self,
        tree: &sled::Tree,
        batch: &mut sled::Batch,
        rule: LocalPartMatch,
    ) -> Result<()> {
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
        // All removals before any write: a name may move from one mailbox of the
        // import to another, and the later removal must not undo the earlier write.
        let mut edit = index::Edit::new(tree);
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
        }
        let replaced = self.mailboxes.iter().filter_map(|(_, old)| old.as_ref());
        for old in replaced.chain(&self.removed_mailboxes) {
            remove_mailbox(batch, old, rule);
            let primary = address_key(&old.address, rule);
            for s in std::iter::once(&old.home).chain(&old.replicas) {
                edit.remove(&server_key(s), &primary)?;
            }
        }
        for (new, _) in &self.mailboxes {
            write_mailbox(batch, new, rule)?;
            let primary = address_key(&new.address, rule);
            edit.add(&server_key(&new.home), &primary, HOME)?;
            for r in &new.replicas {
                edit.add(&server_key(r), &primary, REPLICA)?;
            }
        }
        edit.write(batch)
    }
}

pub(super) fn plan(view: &TreeView, resolved: &Resolved, mode: Mode) -> Result<Plan> {
    let mut report = ImportReport::default();
    let mut clusters = Vec::new();
    let mut seen_clusters = BTreeSet::new();
    for c in &resolved.clusters {
        let k = server_key(&c.name);
        seen_clusters.insert(k.clone());
        match view
            .tree
            .get(key(b'c', &[&k]))?
            .map(|v| decode::<Cluster>(&v))
            .transpose()?
        {
            None => report.clusters.added += 1,
            Some(old) if old == *c => {
                report.clusters.unchanged += 1;
                continue;
            }
            Some(_) => report.clusters.updated += 1,
        }
        clusters.push(c.clone());
    }
    let mut removed_clusters = Vec::new();
    if mode == Mode::Replace {
        for r in view.tree.scan_prefix(b"c\0") {
            let k = String::from_utf8_lossy(&r?.0[2..]).into_owned();
            if !seen_clusters.contains(&k) {
                removed_clusters.push(k);
            }
        }
        report.clusters.removed = removed_clusters.len() as u64;
    }
    let mut servers = Vec::new();
    let mut seen_servers = BTreeSet::new();
    for s in &resolved.servers {
        let k = server_key(&s.name);
        seen_servers.insert(k.clone());
        match view.servers.get(&k) {
            None => report.servers.added += 1,
            Some(old) if **old == *s => {
                report.servers.unchanged += 1;
                continue;
            }
            Some(_) => report.servers.updated += 1,
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
        report.servers.removed = removed_servers.len() as u64;
    }

    let catalog_empty = view.tree.scan_prefix(b"m\0").next().is_none();
    let mut mailboxes = Vec::new();
    for m in &resolved.mailboxes {
        let old = if catalog_empty {
            None
        } else {
            view.mailbox(&address_key(&m.address, view.rule))?
        };
        match &old {
            None => report.mailboxes.added += 1,
            Some(o) if o == m => {
                report.mailboxes.unchanged += 1;
                continue;
            }
            Some(_) => report.mailboxes.updated += 1,
        }
        mailboxes.push((m.clone(), old));
    }
    if mode == Mode::Replace && !catalog_empty {
        // Every input row is distinct, so the rows of the catalog not matched are removed.
        let before = view.tree.scan_prefix(b"m\0").count() as u64;
        report.mailboxes.removed = before - report.mailboxes.updated - report.mailboxes.unchanged;
    }
    let key_estimate = servers.len()
        + removed_servers.len()
        + mailboxes
            .iter()
            .map(|(m, o)| {
                2 * (2 + m.aliases.len() + m.replicas.len())
                    + o.as_ref().map_or(0, |o| o.aliases.len())
            })
            .sum::<usize>();
    Ok(Plan {
        report,
        clusters,
        removed_clusters,
        servers,
        removed_servers,
        mailboxes,
        key_estimate,
        ..Plan::default()
    })
}

/// A big-endian u64 stored under `key` (None: absent, unreadable or not 8 octets).
pub fn read_u64(tree: &sled::Tree, key: &[u8]) -> Option<u64> {
    tree.get(key)
        .ok()
        .flatten()
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
}

/// sled's log segment size for a new store: 8 MiB. With the default 512 KiB a
/// segment filled every ~50 messages of 10 KB, and the flush that rolled it over
/// took up to 20 ms: that was the whole p99 of accept latency (measured: one
/// client on an idle router, p99 8 ms → 1 ms). sled refuses to open a store with
/// another size than it was made with, so an existing store keeps its own.
fn segment_size(store: &std::path::Path) -> usize {
    // The file ends in a binary checksum: not valid UTF-8 as a whole.
    std::fs::read(store.join("conf"))
        .ok()
        .and_then(|conf| {
            String::from_utf8_lossy(&conf)
                .lines()
                .find_map(|l| l.strip_prefix("segment_size: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(8 << 20)
}

/// The sled store's directory in `data_dir`.
pub fn store_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("store")
}

/// Opens (creating) the sled store of a data dir, with a clear error when another
/// process holds it. Queued mail is private whatever the umask: a new data dir is
/// made 0700, and the store's own files are kept 0600 (its directories 0700).
pub fn open_db(data_dir: &std::path::Path, cache_bytes: u64) -> Result<sled::Db> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    if let Ok(meta) = std::fs::metadata(data_dir) {
        if meta.permissions().mode() & 0o007 != 0 {
            tracing::warn!(data_dir = %data_dir.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the data dir is open to other users: make it 0700 (or 0750 for a group)");
        }
    }
    let path = store_path(data_dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        })
        .with_context(|| format!("cannot create {}", path.display()))?;
    let db = open_sled(&path, cache_bytes)?;
    make_private(&path).with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(db)
}

/// Takes every permission of group and others off `dir` and what it holds (sled
/// made its files under the process umask; a store made by an older version may
/// be readable by all).
fn make_private(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

fn open_sled(path: &std::path::Path, cache_bytes: u64) -> Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .segment_size(segment_size(path))
        .open()
        .map_err(|e| match e {
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock || io.raw_os_error() == Some(11) =>
            {
                anyhow!(
                    "the store {} is in use by another process (is `clustermail serve` running?)",
                    path.display()
                )
            }
            other => anyhow!("cannot open the store {}: {other}", path.display()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::files::{Origin, Place, Row};

    fn input(servers: &[(&str, &str)], mailboxes: &[(&str, &str, &[&str], &[&str])]) -> Input {
        let origin = Origin {
            file: 0,
            place: Place::File,
        };
        Input {
            files: vec!["test".into()],
            servers: servers
                .iter()
                .enumerate()
                .map(|(i, (name, cluster))| Row {
                    item: Server {
                        name: name.to_string(),
                        cluster: cluster.to_string(),
                        address: format!("127.0.0.1:{}", 2000 + i),
                        state: AdminState::InService,
                        availability_threshold: None,
                        tls: Default::default(),
                        tls_name: None,
                    },
                    origin,
                })
                .collect(),
            mailboxes: mailboxes
                .iter()
                .map(|(a, h, r, al)| Row {
                    item: Mailbox {
                        address: a.to_string(),
                        home: h.to_string(),
                        replicas: r.iter().map(|s| s.to_string()).collect(),
                        aliases: al.iter().map(|s| s.to_string()).collect(),
                        failover: None,
                        home_state: Default::default(),
                        replica_states: vec![],
                    },
                    origin,
                })
                .collect(),
            problems: vec![],
            clusters: vec![],
        }
    }

    #[test]
    fn an_interrupted_import_leaves_the_old_catalog_and_its_tree_is_dropped() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
        let hidden = indicatif::ProgressBar::hidden();
        let one = input(
            &[("a", "c"), ("b", "c")],
            &[("x@d.test", "a", &["b"], &["y@d.test"])],
        );
        cat.import(one, Mode::Replace, false, &hidden).unwrap();
        // What a replace killed before its switch leaves: a filled tree nobody points at.
        let orphan = db.open_tree("catalog-99").unwrap();
        orphan
            .insert(b"m\0ghost@d.test", b"junk".as_slice())
            .unwrap();
        drop(cat);
        let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"catalog-99"));
        let l = cat.lookup("Y@D.test").unwrap().expect("alias found");
        assert_eq!(l.mailbox.address, "x@d.test");
        assert_eq!(l.replicas[0].name, "b");
        assert!(cat.lookup("ghost@d.test").unwrap().is_none());
    }

    #[test]
    fn a_store_made_with_the_old_segment_size_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = sled::Config::new()
                .path(dir.path().join("store"))
                .segment_size(512 * 1024)
                .open()
                .unwrap();
            old.insert(b"k", b"v".as_slice()).unwrap();
            old.flush().unwrap();
        }
        let db = open_db(dir.path(), 1 << 20).expect("opens with its own segment size");
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(b"v".as_slice()));
        drop(db);
        // A new store gets the large segments.
        let fresh = tempfile::tempdir().unwrap();
        drop(open_db(fresh.path(), 1 << 20).unwrap());
        assert_eq!(segment_size(&fresh.path().join("store")), 8 << 20);
    }

    #[test]
    fn a_store_left_open_to_others_is_made_private_at_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        drop(open_db(&data, 1 << 20).unwrap());
        assert_eq!(mode(&data), 0o700, "a new data dir");
        // As an older version under umask 022 (or 000) left it.
        let store = data.join("store");
        for f in [&store, &store.join("conf"), &store.join("db")] {
            let open = if f.is_dir() { 0o777 } else { 0o666 };
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(open)).unwrap();
        }
        drop(open_db(&data, 1 << 20).unwrap());
        assert_eq!(mode(&store), 0o700);
        assert_eq!(mode(&store.join("conf")), 0o600);
        assert_eq!(mode(&store.join("db")), 0o600);
    }

    #[test]
    fn a_catalog_of_an_older_record_format_is_refused_with_what_to_do() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
        let one = input(&[("a", "c")], &[("x@d.test", "a", &[], &[])]);
        let hidden = indicatif::ProgressBar::hidden();
        cat.import(one, Mode::Replace, false, &hidden).unwrap();
        let current = cat.meta.get(CURRENT).unwrap().unwrap();
        drop(cat);
        let tree = db.open_tree(current).unwrap();
        assert_eq!(tree.get(FORMAT_KEY).unwrap().as_deref(), Some(FORMAT));
        tree.remove(FORMAT_KEY).unwrap();
        let e = Catalog::open(&db, LocalPartMatch::CaseInsensitive)
            .err()
            .expect("refused");
        let e = format!("{e:#}");
        assert!(
            e.contains("record format 1") && e.contains("import --replace"),
            "{e}"
        );
        // `import --replace` builds a new catalog; a failed one changes nothing.
        let cat = Catalog::open_for_replace(&db, LocalPartMatch::CaseInsensitive).unwrap();
        let bad = input(&[("a", "c")], &[("x@d.test", "nosuch", &[], &[])]);
        assert!(cat.import(bad, Mode::Replace, false, &hidden).is_err());
        drop(cat);
        assert!(
            Catalog::open(&db, LocalPartMatch::CaseInsensitive).is_err(),
            "still stale"
        );
        let cat = Catalog::open_for_replace(&db, LocalPartMatch::CaseInsensitive).unwrap();
        let two = input(&[("a", "c")], &[("y@d.test", "a", &[], &[])]);
        let report = cat.import(two, Mode::Replace, false, &hidden).unwrap();
        assert_eq!(report.mailboxes.added, 1, "{report:?}");
        drop(cat);
        let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
        assert!(cat.lookup("y@d.test").unwrap().is_some());
        assert!(cat.lookup("x@d.test").unwrap().is_none());
    }

    #[test]
    fn small_merge_and_large_merge_give_the_same_catalog() {
        let servers = [("a", "c"), ("b", "c"), ("z", "other")];
        let base: Vec<(String, String)> = (0..300)
            .map(|i| (format!("u{i}@d.test"), format!("al{i}@d.test")))
            .collect();
        let rows: Vec<(&str, &str, &[&str], &[&str])> = Vec::new();
        let mut results = Vec::new();
        for limit_forced in [false, true] {
            let db = sled::Config::new().temporary(true).open().unwrap();
            let cat = Catalog::open(&db, LocalPartMatch::CaseInsensitive).unwrap();
            let hidden = indicatif::ProgressBar::hidden();
            let mut inp = input(&servers, &rows);
            for (a, al) in &base {
                inp.mailboxes.push(Row {
                    item: Mailbox {
                        address: a.clone(),
                        home: "a".into(),
                        replicas: vec!["b".into()],
                        aliases: vec![al.clone()],
                        failover: None,
                        home_state: Default::default(),
                        replica_states: vec![],
                    },
                    origin: inp.servers[0].origin,
                });
            }
            cat.import(inp, Mode::Replace, false, &hidden).unwrap();
            // Move half the mailboxes home to b, drop their aliases.
            let mut change = input(&[], &rows);
            for (a, _) in base.iter().step_by(2) {
                change.mailboxes.push(Row {
                    item: Mailbox {
                        address: a.clone(),
                        home: "b".into(),
                        replicas: vec!["a".into()],
                        aliases: vec![],
                        failover: None,
                        home_state: Default::default(),
                        replica_states: vec![],
                    },
                    origin: Origin {
                        file: 0,
                        place: Place::File,
                    },
                });
            }
            let (tree, servers) = cat.live_tree();
            let view = TreeView {
                tree: &tree,
                servers: &servers,
                rule: cat.rule,
            };
            let resolved = resolve(change, Some(&view), cat.rule).unwrap();
            let plan = plan(&view, &resolved, Mode::Merge).unwrap();
            assert_eq!(plan.report.mailboxes.updated, 150);
            if limit_forced {
                cat.apply_shadow(&tree, &resolved, &plan, Mode::Merge, &hidden)
                    .unwrap();
            } else {
                let mut batch = sled::Batch::default();
                plan.write(&tree, &mut batch, cat.rule).unwrap();
                tree.apply_batch(batch).unwrap();
            }
            let on_a: Vec<String> = cat
                .mailboxes(None, Some("a"))
                .unwrap()
                .into_iter()
                .map(|m| m.address)
                .collect();
            let on_b = cat.mailboxes(None, Some("b")).unwrap().len();
            assert_eq!(on_a.len(), 300);
            assert_eq!(on_b, 300);
            assert!(cat.lookup("al0@d.test").unwrap().is_none(), "dropped alias");
            assert_eq!(cat.lookup("al1@d.test").unwrap().unwrap().home.name, "a");
            assert_eq!(cat.lookup("u0@d.test").unwrap().unwrap().home.name, "b");
            assert!(cat.serves_domain("D.TEST").unwrap());
            assert!(!cat.serves_domain("e.test").unwrap());
            results.push(cat.mailboxes(None, None).unwrap());
        }
        assert_eq!(results[0], results[1]);
    }
}
