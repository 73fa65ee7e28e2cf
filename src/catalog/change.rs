//! Changes to the catalog one record at a time ([`Change`]), as a directory sync
//! sends them: [`Catalog::apply`] checks each change with the import's own rules
//! (`validate.rs`) against the catalog as the earlier changes of the same call
//! leave it, skips the ones that would break an invariant, and writes the rest,
//! with the caller's sync metadata, in one atomic write. [`Catalog::replace_all`]
//! does the same from an empty catalog and switches to the result like
//! `import --replace`.
//!
//! Removing something that is not in the catalog changes nothing and is not an
//! error (a directory may delete an entry the catalog refused earlier).

use super::files::{Input, Origin, Place, Row};
use super::import::WRITER;
use super::model::{address_key, server_key, Cluster, LocalPartMatch, Mailbox, Server};
use super::plan::{plan, Mode, Plan, TreeView};
use super::store::Catalog;
use super::validate::{resolve, Resolved, View};
use anyhow::Result;
use std::collections::{BTreeMap, HashMap};

/// One change to the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Insert or replace a cluster record (its next-hop routers), by name.
    PutCluster(Cluster),
    /// Remove a cluster record, by name.
    RemoveCluster(String),
    /// Insert or replace a server, by name.
    PutServer(Server),
    /// Remove a server, by name: refused while a mailbox is homed or replicated on it.
    RemoveServer(String),
    /// Insert or replace a mailbox, keyed by its primary address.
    PutMailbox(Mailbox),
    /// Remove a mailbox, by primary address.
    RemoveMailbox(String),
}

/// A change [`Catalog::apply`] skipped, with why (for an administrator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Its position in the list given to `apply`.
    pub index: usize,
    pub change: Change,
    pub reason: String,
}

/// What [`Catalog::apply`] or [`Catalog::replace_all`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Changes accepted (removals of absent records included).
    pub applied: usize,
    pub rejected: Vec<Rejected>,
}

impl Catalog {
    /// Applies `changes` in order. A change that would break a catalog invariant
    /// (unknown home or replica server, replica in another cluster, an address or
    /// alias owned by another mailbox, removing a server still used by a mailbox,
    /// ...) is skipped and listed in `rejected`; the others apply. Everything
    /// applied, plus every `meta` pair, is written in one atomic, flushed write:
    /// lookups see all of it or none of it. Bumps the serial if anything changed.
    pub fn apply(&self, changes: Vec<Change>, meta: &[(&str, &[u8])]) -> Result<ApplyReport> {
        let _writer = WRITER.lock().unwrap_or_else(|e| e.into_inner());
        let (tree, servers) = self.writer_view();
        let base = TreeView {
            tree: &tree,
            servers: &servers,
            rule: self.rule(),
        };
        let mut overlay = Overlay::new(Some(&base), self.rule());
        let report = overlay.take_all(changes)?;
        let mut plan = overlay.merge_plan(&base)?;
        plan.meta = own_meta(meta);
        if plan.is_noop() {
            return Ok(report);
        }
        let hidden = indicatif::ProgressBar::hidden();
        self.commit(&tree, &Resolved::default(), &plan, Mode::Merge, &hidden)?;
        Ok(report)
    }

    /// Full refresh: the catalog becomes exactly the valid subset of `changes`
    /// (each checked against the ones accepted before it), plus `meta`, switched
    /// in atomically like `import --replace`: a kill leaves the old or the new.
    pub fn replace_all(&self, changes: Vec<Change>, meta: &[(&str, &[u8])]) -> Result<ApplyReport> {
        let _writer = WRITER.lock().unwrap_or_else(|e| e.into_inner());
        let (tree, servers) = self.writer_view();
        let live = TreeView {
            tree: &tree,
            servers: &servers,
            rule: self.rule(),
        };
        let mut overlay = Overlay::new(None, self.rule());
        let report = overlay.take_all(changes)?;
        let resolved = overlay.into_resolved();
        let mut plan = plan(&live, &resolved, Mode::Replace)?;
        plan.meta = own_meta(meta);
        let hidden = indicatif::ProgressBar::hidden();
        self.commit(&tree, &resolved, &plan, Mode::Replace, &hidden)?;
        Ok(report)
    }
}

fn own_meta(meta: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    meta.iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect()
}

/// The catalog as the changes accepted so far leave it: what they set (Some) or
/// removed (None) over `base` (None: an empty catalog).
struct Overlay<'a> {
    base: Option<&'a TreeView<'a>>,
    rule: LocalPartMatch,
    clusters: BTreeMap<String, Option<Cluster>>,
    servers: BTreeMap<String, Option<Server>>,
    mailboxes: BTreeMap<String, Option<Mailbox>>,
    /// Address key → the primary key of the mailbox that now owns it (None: nobody).
    owners: HashMap<String, Option<String>>,
}

/// The name validation gives the one-row input of a change; stripped from its reasons.
const ORIGIN_NAME: &str = "change";

impl<'a> Overlay<'a> {
    fn new(base: Option<&'a TreeView<'a>>, rule: LocalPartMatch) -> Overlay<'a> {
        Overlay {
            base,
            rule,
            clusters: BTreeMap::new(),
            servers: BTreeMap::new(),
            mailboxes: BTreeMap::new(),
            owners: HashMap::new(),
        }
    }

    fn take_all(&mut self, changes: Vec<Change>) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        for (index, change) in changes.into_iter().enumerate() {
            match self.take(&change) {
                Ok(()) => report.applied += 1,
                Err(Refusal::Invalid(reason)) => report.rejected.push(Rejected {
                    index,
                    change,
                    reason,
                }),
                Err(Refusal::Store(e)) => return Err(e),
            }
        }
        Ok(report)
    }

    /// Checks one change against the catalog as it now stands and records it.
    fn take(&mut self, change: &Change) -> Result<(), Refusal> {
        let rule = self.rule;
        let mut input = Input {
            files: vec![ORIGIN_NAME.into()],
            ..Input::default()
        };
        let origin = Origin {
            file: 0,
            place: Place::File,
        };
        match change {
            Change::PutCluster(c) => {
                input.clusters.push(Row {
                    item: c.clone(),
                    origin,
                });
                let Some(c) = self.check(input)?.clusters.pop() else {
                    return Err(Refusal::Invalid("invalid cluster".into()));
                };
                self.clusters.insert(server_key(&c.name), Some(c));
            }
            Change::RemoveCluster(name) => {
                self.clusters.insert(server_key(name), None);
            }
            Change::PutServer(s) => {
                input.servers.push(Row {
                    item: s.clone(),
                    origin,
                });
                let Some(s) = self.check(input)?.servers.pop() else {
                    return Err(Refusal::Invalid("invalid server".into()));
                };
                self.servers.insert(server_key(&s.name), Some(s));
            }
            Change::RemoveServer(name) => {
                let k = server_key(name);
                if self.server(&k).is_none() {
                    return Ok(());
                }
                let users = self.mailboxes_on(&k);
                if let Some(first) = users.first() {
                    return Err(Refusal::Invalid(format!(
                        "server {name:?} is still the home or a replica of {} mailbox(es), e.g. {:?}",
                        users.len(),
                        first.address
                    )));
                }
                self.servers.insert(k, None);
            }
            Change::PutMailbox(m) => {
                input.mailboxes.push(Row {
                    item: m.clone(),
                    origin,
                });
                let Some(m) = self.check(input)?.mailboxes.pop() else {
                    return Err(Refusal::Invalid("invalid mailbox".into()));
                };
                let primary = address_key(&m.address, rule);
                self.unown(&primary)?;
                for name in m.names() {
                    self.owners
                        .insert(address_key(name, rule), Some(primary.clone()));
                }
                self.mailboxes.insert(primary, Some(m));
            }
            Change::RemoveMailbox(address) => {
                let primary = address_key(address, rule);
                if self.mailbox(&primary)?.is_none() {
                    return match self.owner(&primary) {
                        Some(owner) => Err(Refusal::Invalid(format!(
                            "{address:?} is an alias of mailbox {owner:?}, not a primary address"
                        ))),
                        None => Ok(()),
                    };
                }
                self.unown(&primary)?;
                self.mailboxes.insert(primary, None);
            }
        }
        Ok(())
    }

    /// The import's validation of a one-row input against the catalog as it now
    /// stands; its problems, joined, when it is refused.
    fn check(&self, input: Input) -> Result<Resolved, Refusal> {
        resolve(input, Some(self), self.rule).map_err(|problems| {
            let prefix = format!("{ORIGIN_NAME}: ");
            Refusal::Invalid(
                problems
                    .iter()
                    .map(|p| p.strip_prefix(&prefix).unwrap_or(p))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })
    }

    /// Frees every name of the mailbox with this primary key (before it is rewritten
    /// or removed).
    fn unown(&mut self, primary: &str) -> Result<()> {
        if let Some(old) = self.mailbox(primary)? {
            for name in old.names() {
                self.owners.insert(address_key(name, self.rule), None);
            }
        }
        Ok(())
    }

    fn mailbox(&self, primary: &str) -> Result<Option<Mailbox>> {
        match (self.mailboxes.get(primary), self.base) {
            (Some(m), _) => Ok(m.clone()),
            (None, Some(base)) => base.mailbox(primary),
            (None, None) => Ok(None),
        }
    }

    /// The merge that turns `base` into this overlay: only what differs.
    fn merge_plan(self, base: &TreeView) -> Result<Plan> {
        let mut plan = Plan::default();
        for (k, c) in self.clusters {
            match (c, base.cluster(&k)?) {
                (Some(c), old) if old.as_ref() != Some(&c) => plan.clusters.push(c),
                (None, Some(_)) => plan.removed_clusters.push(k),
                _ => {}
            }
        }
        for (k, s) in self.servers {
            let old = base.servers.get(&k).map(|s| (**s).clone());
            match (s, old) {
                (Some(s), old) if old.as_ref() != Some(&s) => plan.servers.push(s),
                (None, Some(_)) => plan.removed_servers.push(k),
                _ => {}
            }
        }
        for (k, m) in self.mailboxes {
            match (m, base.mailbox(&k)?) {
                (Some(m), old) if old.as_ref() != Some(&m) => plan.mailboxes.push((m, old)),
                (None, Some(old)) => plan.removed_mailboxes.push(old),
                _ => {}
            }
        }
        Ok(plan)
    }

    /// What the overlay holds, as a replace writes it.
    fn into_resolved(self) -> Resolved {
        Resolved {
            clusters: self.clusters.into_values().flatten().collect(),
            servers: self.servers.into_values().flatten().collect(),
            mailboxes: self.mailboxes.into_values().flatten().collect(),
        }
    }
}

/// Why a change was not taken: it breaks an invariant (skipped, reported), or
/// the store could not be read (the whole call fails).
enum Refusal {
    Invalid(String),
    Store(anyhow::Error),
}

impl From<anyhow::Error> for Refusal {
    fn from(e: anyhow::Error) -> Self {
        Refusal::Store(e)
    }
}

impl View for Overlay<'_> {
    fn server(&self, key: &str) -> Option<Server> {
        match (self.servers.get(key), self.base) {
            (Some(s), _) => s.clone(),
            (None, Some(base)) => base.server(key),
            (None, None) => None,
        }
    }

    fn owner(&self, address_key: &str) -> Option<String> {
        match (self.owners.get(address_key), self.base) {
            (Some(o), _) => o.clone(),
            (None, Some(base)) => base.owner(address_key),
            (None, None) => None,
        }
    }

    fn mailboxes_on(&self, key: &str) -> Vec<Mailbox> {
        let on = |m: &Mailbox| {
            server_key(&m.home) == key || m.replicas.iter().any(|r| server_key(r) == key)
        };
        let mut out: Vec<Mailbox> = self
            .base
            .map(|b| b.mailboxes_on(key))
            .unwrap_or_default()
            .into_iter()
            .filter(|m| {
                !self
                    .mailboxes
                    .contains_key(&address_key(&m.address, self.rule))
            })
            .collect();
        out.extend(self.mailboxes.values().flatten().filter(|m| on(m)).cloned());
        out
    }
}

#[cfg(test)]
#[path = "change_tests.rs"]
mod tests;
