//! The sled-backed replica catalog: opening it (format and rule checks, leftover
//! trees dropped) and every read (lookups, listings); writes are in `import.rs`.
//!
//! Layout: the catalog of one generation lives in one sled tree, `catalog-<gen>`;
//! the `meta` tree's key `catalog.current` names the live one. Inside a tree:
//!
//! | key                         | value                                   |
//! |-----------------------------|-----------------------------------------|
//! | `c\0<cluster key>`          | bincode [`Cluster`] (next-hop routers)  |
//! | `s\0<server key>`           | bincode [`Server`]                      |
//! | `b\0<block u32 BE>`         | a block of mailbox records (`records.rs`) |
//! | `~next`, `~count`           | the next mailbox number; how many mailboxes |
//! | `x\0<chunk u32 BE>`         | the address index's fst (`names.rs`)    |
//! | `y\0<address key>`          | its delta: merges since the last full write |
//! | `h\0<server key>\0<start>`  | a chunk of the server index (`index.rs`) |
//! | `d\0<domain>`               | how many addresses (primary or alias) it has |
//! | `~rule`                     | the local-part rule the keys were made with |
//! | `~meta\0<key>`              | a caller's sync metadata (`Catalog::apply`) |
//!
//! A lookup is an in-memory index probe (fst, then delta) and one block read that
//! decodes one record. `live.rs` joins the tree and its index.
//!
//! Writes: `import.rs` (atomic batches and shadow trees), `change.rs` (`apply`).

use super::codec::{decode, encode, key, meta_key, rule_tag};
use super::index;
use super::live::Gen;
use super::model::{address_key, server_key, AdminState, Cluster, LocalPartMatch, Mailbox, Server};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

pub use super::codec::read_u64;

pub(super) const CURRENT: &[u8] = b"catalog.current";
pub(super) const TREE_PREFIX: &str = "catalog-";
pub(super) const RULE_KEY: &[u8] = b"~rule";
/// In the meta tree: the catalog's change counter, see [`Catalog::serial`].
const SERIAL: &[u8] = b"catalog.serial";
/// The record layout of this catalog tree; bumped whenever a stored record gains or
/// loses a field (bincode records carry no field names). 2: `Mailbox.failover` and
/// `Server.availability_threshold`; 3: `Mailbox.home_state` and `replica_states`;
/// 4: records in blocks, the address index as an fst with a delta.
pub(super) const FORMAT_KEY: &[u8] = b"~format";
pub(super) const FORMAT: &[u8] = b"4";

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
    pub(super) meta: sled::Tree,
    pub(super) db: sled::Db,
    pub(super) rule: LocalPartMatch,
    pub(super) live: RwLock<Live>,
}

pub(super) struct Live {
    pub(super) gen: Arc<Gen>,
    /// Servers are few and read on every lookup: kept in memory, by key.
    pub(super) servers: Arc<HashMap<String, Arc<Server>>>,
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
                let empty = tree.scan_prefix(b"b\0").next().is_none();
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
        let gen = Arc::new(Gen::load(tree)?);
        Ok(Catalog {
            meta,
            db: db.clone(),
            rule,
            live: RwLock::new(Live { gen, servers }),
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
                        gen: Arc::new(Gen::load(tree)?),
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

    pub(super) fn live_tree(&self) -> (Arc<Gen>, Arc<HashMap<String, Arc<Server>>>) {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        (live.gen.clone(), live.servers.clone())
    }

    /// Finds the mailbox that owns `addr` (primary address or alias), with its
    /// home and replica server records. One in-memory index probe and one block
    /// read; never a scan.
    pub fn lookup(&self, addr: &str) -> Result<Option<Lookup>> {
        let k = address_key(addr, self.rule);
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let Some((_, mailbox)) = live.gen.find(&k)? else {
            return Ok(None);
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
        live.gen
            .tree
            .get(key(b'c', &[&server_key(name)]))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Every cluster record, sorted by name.
    pub fn clusters(&self) -> Result<Vec<Cluster>> {
        let (gen, _) = self.live_tree();
        gen.tree
            .scan_prefix(b"c\0")
            .map(|r| decode(&r?.1))
            .collect()
    }

    /// Whether any catalog address (primary or alias) is in `domain`.
    pub fn serves_domain(&self, domain: &str) -> Result<bool> {
        let domain = address_key(&format!("x@{domain}"), self.rule);
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        Ok(live.gen.tree.get(key(b'd', &[&domain[2..]]))?.is_some())
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
        let (gen, servers) = self.live_tree();
        if cluster.is_none() && server.is_none() {
            return gen.all();
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
            addrs.extend(index::postings(&gen.tree, &k)?.into_iter().map(|(a, _)| a));
        }
        addrs
            .into_iter()
            .map(|a| {
                gen.primary(&a)?
                    .ok_or_else(|| anyhow!("catalog index broken at {a}"))
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
        live.gen.tree.insert(key(b's', &[&k]), encode(&server)?)?;
        self.db.flush()?;
        let mut servers = (*live.servers).clone();
        servers.insert(k, Arc::new(server.clone()));
        live.servers = Arc::new(servers);
        drop(live);
        self.bump_serial()?;
        Ok(server)
    }

    /// The live tree and its servers, for a writer holding [`WRITER`].
    pub(super) fn writer_view(&self) -> (Arc<Gen>, Arc<HashMap<String, Arc<Server>>>) {
        self.live_tree()
    }

    /// A value stored by [`Catalog::apply`] or [`Catalog::replace_all`] under `key`.
    pub fn sync_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let (gen, _) = self.live_tree();
        Ok(gen.tree.get(meta_key(key))?.map(|v| v.to_vec()))
    }

    /// A number that changes with every write to the catalog (import, set-state),
    /// kept across restarts: how an HA peer tells that its copy is stale.
    pub fn serial(&self) -> u64 {
        read_u64(&self.meta, SERIAL).unwrap_or(0)
    }

    pub(super) fn bump_serial(&self) -> Result<()> {
        self.meta.update_and_fetch(SERIAL, |old| {
            let n = old
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map_or(0, u64::from_be_bytes);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        Ok(())
    }
}

pub(super) fn load_servers(tree: &sled::Tree) -> Result<HashMap<String, Arc<Server>>> {
    tree.scan_prefix(b"s\0")
        .map(|r| {
            let (k, v) = r?;
            let s: Server = decode(&v)?;
            Ok((String::from_utf8_lossy(&k[2..]).into_owned(), Arc::new(s)))
        })
        .collect()
}
