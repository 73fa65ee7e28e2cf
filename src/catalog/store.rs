//! The sled-backed replica catalog: indexed lookups and crash-atomic imports.
//!
//! Layout: the catalog of one generation lives in one sled tree, `catalog-<gen>`;
//! the `meta` tree's key `catalog.current` names the live one. Inside a tree:
//!
//! | key                         | value                                   |
//! |-----------------------------|-----------------------------------------|
//! | `s\0<server key>`           | bincode [`Server`]                      |
//! | `m\0<address key>`          | bincode [`Mailbox`], by primary address |
//! | `a\0<alias key>`            | primary address key                     |
//! | `h\0<server key>\0<addr>`   | `H` (home) or `R` (replica)             |
//! | `~rule`                     | the local-part rule the keys were made with |
//!
//! Atomicity: a small merge is one `apply_batch`, which sled recovers all or nothing.
//! A replace, or a merge too large for one batch, is written into a fresh tree that
//! nobody reads; a single insert of `catalog.current` then switches to it, so a
//! process killed midway leaves the old catalog live and an orphan tree that the
//! next open drops.

use super::files::{Input, Problem};
use super::model::{address_key, server_key, AdminState, LocalPartMatch, Mailbox, Server};
use super::validate::{resolve, Resolved, View};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

const CURRENT: &[u8] = b"catalog.current";
const TREE_PREFIX: &str = "catalog-";
const RULE_KEY: &[u8] = b"~rule";
/// Changes beyond this many keys go through a shadow tree instead of one batch.
const BATCH_LIMIT: usize = 50_000;
/// Rows per batch while filling a shadow tree.
const FILL_CHUNK: usize = 20_000;

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(bincode::serde::encode_to_vec(v, bincode_config())?)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
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
    pub servers: Counts,
    pub mailboxes: Counts,
}

/// Why an import did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The input breaks the file formats or the catalog invariants; nothing written.
    #[error("{} problem(s) in the input; the catalog is unchanged", .0.len())]
    Invalid(Vec<Problem>),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

/// The result of [`Catalog::lookup`]: a mailbox with its home and replica servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub mailbox: Mailbox,
    pub home: Server,
    pub replicas: Vec<Server>,
}

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
    servers: Arc<HashMap<String, Server>>,
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

    pub fn rule(&self) -> LocalPartMatch {
        self.rule
    }

    fn live_tree(&self) -> (sled::Tree, Arc<HashMap<String, Server>>) {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        (live.tree.clone(), live.servers.clone())
    }

    /// Finds the mailbox that owns `addr` (primary address or alias), with its
    /// home and replica server records. Two index reads at most; never a scan.
    pub fn lookup(&self, addr: &str) -> Result<Option<Lookup>> {
        let k = address_key(addr, self.rule);
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let tree = &live.tree;
        let raw = match tree.get(key(b'm', &[&k]))? {
            Some(v) => v,
            None => {
                let Some(primary) = tree.get(key(b'a', &[&k]))? else {
                    return Ok(None);
                };
                let mut mk = Vec::with_capacity(primary.len() + 2);
                mk.extend_from_slice(b"m\0");
                mk.extend_from_slice(&primary);
                tree.get(mk)?
                    .ok_or_else(|| anyhow!("catalog index broken: alias {k} points nowhere"))?
            }
        };
        let mailbox: Mailbox = decode(&raw)?;
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
        self.live_tree().1.get(&server_key(name)).cloned()
    }

    /// All servers sorted by name, optionally of one cluster.
    pub fn servers(&self, cluster: Option<&str>) -> Vec<Server> {
        let mut v: Vec<Server> = self
            .live_tree()
            .1
            .values()
            .filter(|s| cluster.is_none_or(|c| s.cluster.eq_ignore_ascii_case(c)))
            .cloned()
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
            let prefix = key(b'h', &[&k, ""]);
            for r in tree.scan_prefix(&prefix) {
                let (ik, _) = r?;
                addrs.insert(ik[prefix.len()..].to_vec());
            }
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
            .cloned()
            .ok_or_else(|| anyhow!("no server named {name:?} in the catalog"))?;
        server.state = state;
        live.tree.insert(key(b's', &[&k]), encode(&server)?)?;
        self.db.flush()?;
        let mut servers = (*live.servers).clone();
        servers.insert(k, server.clone());
        live.servers = Arc::new(servers);
        Ok(server)
    }

    /// Validates `input` and, unless `dry_run`, applies it atomically.
    pub fn import(
        &self,
        input: &Input,
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
        progress.set_length(resolved.mailboxes.len() as u64);
        let shadow = mode == Mode::Replace || plan.key_estimate > BATCH_LIMIT;
        if shadow {
            self.apply_shadow(&tree, &resolved, &plan, mode, progress)?;
        } else {
            let mut batch = sled::Batch::default();
            plan.write(&mut batch, self.rule)?;
            tree.apply_batch(batch).map_err(anyhow::Error::from)?;
            self.db.flush().map_err(anyhow::Error::from)?;
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            live.servers = Arc::new(load_servers(&live.tree)?);
        }
        progress.finish_and_clear();
        Ok(plan.report)
    }

    fn apply_shadow(
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
        let mut batch = sled::Batch::default();
        let mut pending = 0usize;
        batch.insert(RULE_KEY, rule_tag(self.rule));
        if mode == Mode::Merge {
            // Copy the catalog as it is; the plan then removes and rewrites what changes.
            for r in old.iter() {
                let (k, v) = r?;
                batch.insert(k, v);
                pending += 1;
                if pending >= FILL_CHUNK * 4 {
                    new.apply_batch(std::mem::take(&mut batch))?;
                    pending = 0;
                }
            }
            new.apply_batch(std::mem::take(&mut batch))?;
            let mut b = sled::Batch::default();
            plan.write(&mut b, self.rule)?;
            new.apply_batch(b)?;
            progress.set_position(resolved.mailboxes.len() as u64);
        } else {
            for s in &resolved.servers {
                batch.insert(key(b's', &[&server_key(&s.name)]), encode(s)?);
            }
            for (i, m) in resolved.mailboxes.iter().enumerate() {
                write_mailbox(&mut batch, m, self.rule)?;
                if (i + 1) % FILL_CHUNK == 0 {
                    new.apply_batch(std::mem::take(&mut batch))?;
                    progress.set_position(i as u64 + 1);
                }
            }
            new.apply_batch(batch)?;
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

static WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rule_tag(rule: LocalPartMatch) -> &'static [u8] {
    match rule {
        LocalPartMatch::CaseInsensitive => b"case-insensitive",
        LocalPartMatch::Exact => b"exact",
    }
}

fn load_servers(tree: &sled::Tree) -> Result<HashMap<String, Server>> {
    tree.scan_prefix(b"s\0")
        .map(|r| {
            let (k, v) = r?;
            let s: Server = decode(&v)?;
            Ok((String::from_utf8_lossy(&k[2..]).into_owned(), s))
        })
        .collect()
}

fn write_mailbox(batch: &mut sled::Batch, m: &Mailbox, rule: LocalPartMatch) -> Result<()> {
    let primary = address_key(&m.address, rule);
    batch.insert(key(b'm', &[&primary]), encode(m)?);
    for alias in &m.aliases {
        batch.insert(key(b'a', &[&address_key(alias, rule)]), primary.as_bytes());
    }
    batch.insert(
        key(b'h', &[&server_key(&m.home), &primary]),
        b"H".as_slice(),
    );
    for r in &m.replicas {
        batch.insert(key(b'h', &[&server_key(r), &primary]), b"R".as_slice());
    }
    Ok(())
}

fn remove_mailbox(batch: &mut sled::Batch, m: &Mailbox, rule: LocalPartMatch) {
    let primary = address_key(&m.address, rule);
    batch.remove(key(b'm', &[&primary]));
    for alias in &m.aliases {
        batch.remove(key(b'a', &[&address_key(alias, rule)]));
    }
    for s in std::iter::once(&m.home).chain(&m.replicas) {
        batch.remove(key(b'h', &[&server_key(s), &primary]));
    }
}

/// The catalog as it is, as validation sees it.
struct TreeView<'a> {
    tree: &'a sled::Tree,
    servers: &'a HashMap<String, Server>,
    rule: LocalPartMatch,
}

impl TreeView<'_> {
    fn mailbox(&self, primary_key: &str) -> Result<Option<Mailbox>> {
        self.tree
            .get(key(b'm', &[primary_key]))?
            .map(|v| decode(&v))
            .transpose()
    }
}

impl View for TreeView<'_> {
    fn server(&self, key: &str) -> Option<Server> {
        self.servers.get(key).cloned()
    }

    fn owner(&self, k: &str) -> Option<String> {
        if let Ok(Some(_)) = self.tree.get(key(b'm', &[k])) {
            return Some(k.to_string());
        }
        match self.tree.get(key(b'a', &[k])) {
            Ok(Some(p)) => Some(String::from_utf8_lossy(&p).into_owned()),
            _ => None,
        }
    }

    fn mailboxes_on(&self, server_key: &str) -> Vec<Mailbox> {
        let prefix = key(b'h', &[server_key, ""]);
        self.tree
            .scan_prefix(&prefix)
            .filter_map(|r| r.ok())
            .filter_map(|(k, _)| {
                let primary = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                self.mailbox(&primary).ok().flatten()
            })
            .collect()
    }
}

/// The changes an import makes, computed before anything is written.
struct Plan {
    report: ImportReport,
    /// Servers to write, and (replace) server keys to remove.
    servers: Vec<Server>,
    removed_servers: Vec<String>,
    /// Mailboxes to write, with the record they replace.
    mailboxes: Vec<(Mailbox, Option<Mailbox>)>,
    key_estimate: usize,
}

impl Plan {
    fn is_noop(&self) -> bool {
        self.servers.is_empty()
            && self.removed_servers.is_empty()
            && self.mailboxes.is_empty()
            && self.report.mailboxes.removed == 0
    }

    /// Writes a merge's changes over the catalog as it is (a replace rebuilds instead).
    fn write(&self, batch: &mut sled::Batch, rule: LocalPartMatch) -> Result<()> {
        for k in &self.removed_servers {
            batch.remove(key(b's', &[k]));
        }
        for s in &self.servers {
            batch.insert(key(b's', &[&server_key(&s.name)]), encode(s)?);
        }
        for (new, old) in &self.mailboxes {
            if let Some(old) = old {
                remove_mailbox(batch, old, rule);
            }
            write_mailbox(batch, new, rule)?;
        }
        Ok(())
    }
}

fn plan(view: &TreeView, resolved: &Resolved, mode: Mode) -> Result<Plan> {
    let mut report = ImportReport::default();
    let mut servers = Vec::new();
    let mut seen_servers = BTreeSet::new();
    for s in &resolved.servers {
        let k = server_key(&s.name);
        seen_servers.insert(k.clone());
        match view.servers.get(&k) {
            None => report.servers.added += 1,
            Some(old) if old == s => {
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
        servers,
        removed_servers,
        mailboxes,
        key_estimate,
    })
}

/// Opens (creating) the sled store of a data dir, with a clear error when another
/// process holds it.
pub fn open_db(data_dir: &std::path::Path, cache_bytes: u64) -> Result<sled::Db> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let path = data_dir.join("store");
    sled::Config::new()
        .path(&path)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
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
