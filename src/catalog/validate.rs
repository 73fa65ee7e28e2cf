//! The catalog's invariants, checked as a pure function of the incoming rows and
//! (for a merge) a read-only view of the catalog as it is.
//!
//! - every referenced server exists (in the input or, for a merge, the catalog);
//! - a replica is never the home, nor listed twice;
//! - every replica is in the home's cluster;
//! - an address or alias belongs to exactly one mailbox.
//!
//! Every violation is reported with the origin of the row that causes it.

use super::files::{Input, Origin, Problem, Row};
use super::model::{
    address_key, check_address, check_name, check_server_address, same_address, same_server,
    server_key, Cluster, LocalPartMatch, Mailbox, ReplicaState, Server,
};
use keys::NameIndex;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

mod keys;

/// What validation needs from the catalog as it stands (for a merge).
pub trait View {
    fn server(&self, key: &str) -> Option<Server>;
    /// The primary address key of the mailbox that owns this address key, if any.
    fn owner(&self, address_key: &str) -> Option<String>;
    /// Mailboxes homed or replicated on the server with this key.
    fn mailboxes_on(&self, server_key: &str) -> Vec<Mailbox>;
}

/// Validated input: names canonicalised (references use each server's own
/// spelling), ready to be written.
#[derive(Debug, Default)]
pub struct Resolved {
    pub clusters: Vec<Cluster>,
    pub servers: Vec<Server>,
    pub mailboxes: Vec<Mailbox>,
}

/// Checks the input on its own (replace) or against `existing` (merge). Consumes the
/// rows so that a million-mailbox import holds each record once.
pub fn resolve(
    input: Input,
    existing: Option<&dyn View>,
    rule: LocalPartMatch,
) -> Result<Resolved, Vec<String>> {
    let Input {
        files,
        clusters,
        servers,
        mailboxes,
        problems,
    } = input;
    let mut c = Checker {
        files: &files,
        problems,
        rule,
    };
    let clusters = c.clusters(clusters);
    let servers = c.servers(servers);
    let book = ServerBook {
        input: &servers,
        existing,
        known: RefCell::default(),
    };
    let lookup_server = |name: &str| book.get(name);
    let named = c.mailboxes(mailboxes, &lookup_server);
    if let Some(view) = existing {
        c.owned_in_the_catalog(view, &named);
        c.servers_moved(view, &servers, &named, &lookup_server);
    }
    drop(book);
    c.finish(Resolved {
        clusters,
        servers: {
            let InputServers { mut by_key, order } = servers;
            order
                .into_iter()
                .filter_map(|k| by_key.remove(&k).map(|(s, _)| s))
                .collect()
        },
        mailboxes: named.into_mailboxes(),
    })
}

/// How validation finds the server a mailbox names: the input's, else (for a
/// merge) the catalog's. Each spelling is looked up once, so a million mailboxes
/// naming a few servers cost a few lookups and no copies.
struct ServerBook<'a> {
    input: &'a InputServers,
    existing: Option<&'a dyn View>,
    known: RefCell<HashMap<String, Option<Rc<Server>>>>,
}

impl ServerBook<'_> {
    fn get(&self, name: &str) -> Option<Rc<Server>> {
        if let Some(known) = self.known.borrow().get(name) {
            return known.clone();
        }
        let key = server_key(name);
        let found = match self.input.by_key.get(&key) {
            Some((s, _)) => Some(Rc::new(s.clone())),
            None => self.existing.and_then(|v| v.server(&key)).map(Rc::new),
        };
        self.known
            .borrow_mut()
            .insert(name.to_string(), found.clone());
        found
    }
}

/// How `check_mailbox` finds a server by name.
pub type FindServer<'a> = dyn Fn(&str) -> Option<Rc<Server>> + 'a;

/// The problems found so far, and how to name where each row came from.
struct Checker<'a> {
    files: &'a [std::path::PathBuf],
    problems: Vec<Problem>,
    rule: LocalPartMatch,
}

/// The servers of the input, by key, in input order.
struct InputServers {
    by_key: HashMap<String, (Server, Origin)>,
    order: Vec<String>,
}

/// The mailbox rows of the input, checked in place: `ok` marks those that passed
/// (in their canonical form), and `index` finds the row owning an address key
/// (primary or alias). The rows that failed are left empty.
struct Named {
    rows: Vec<Row<Mailbox>>,
    ok: Vec<bool>,
    index: NameIndex,
}

impl Named {
    fn mailbox(&self, row: u32) -> &Mailbox {
        &self.rows[row as usize].item
    }

    /// Whether the mailbox with this primary key is rewritten by this input.
    fn rewrites(&self, primary: &str, rule: LocalPartMatch) -> bool {
        self.index
            .rows_hashing_as(primary)
            .any(|i| self.ok[i as usize] && address_key(&self.mailbox(i).address, rule) == primary)
    }

    /// The accepted mailboxes, in input order, in the rows' own memory (the
    /// conversion happens in place: a million-mailbox import holds one array).
    fn into_mailboxes(self) -> Vec<Mailbox> {
        let Named {
            mut rows,
            ok,
            index,
            ..
        } = self;
        drop(index);
        let mut at = 0;
        rows.retain(|_| {
            at += 1;
            ok[at - 1]
        });
        rows.into_iter().map(|r| r.item).collect()
    }
}

/// A mailbox with nothing allocated: what a row holds while it is checked, and
/// after it failed.
fn vacant() -> Mailbox {
    Mailbox {
        address: String::new(),
        home: String::new(),
        replicas: Vec::new(),
        aliases: Vec::new(),
        failover: None,
        home_state: ReplicaState::InService,
        replica_states: Vec::new(),
    }
}

impl Checker<'_> {
    fn report(&mut self, origin: Origin, message: String) {
        self.problems.push(Problem {
            origin: Some(origin),
            message,
        })
    }

    fn locate(&self, o: Origin) -> String {
        Input::locate_in(self.files, Some(o))
    }

    /// Clusters (their next-hop routers), each defined once.
    fn clusters(&mut self, rows: Vec<Row<Cluster>>) -> Vec<Cluster> {
        let mut clusters = Vec::new();
        let mut seen: HashMap<String, Origin> = HashMap::new();
        for row in rows {
            let c = &row.item;
            let mut ok = true;
            if let Err(e) = check_name("cluster", &c.name) {
                self.report(row.origin, e);
                ok = false;
            }
            for r in &c.routers {
                if let Err(e) = check_server_address(r) {
                    self.report(row.origin, format!("router: {e}"));
                    ok = false;
                }
            }
            if let Some(first) = seen.get(&server_key(&c.name)) {
                let m = format!(
                    "cluster {:?} is defined twice (first at {})",
                    c.name,
                    self.locate(*first)
                );
                self.report(row.origin, m);
                continue;
            }
            seen.insert(server_key(&c.name), row.origin);
            if ok {
                clusters.push(row.item);
            }
        }
        clusters
    }

    /// Servers, each well formed and defined once.
    fn servers(&mut self, rows: Vec<Row<Server>>) -> InputServers {
        let mut out = InputServers {
            by_key: HashMap::new(),
            order: Vec::new(),
        };
        for row in rows {
            let s = &row.item;
            let mut ok = true;
            for e in [
                check_name("server", &s.name),
                check_name("cluster", &s.cluster),
                check_server_address(&s.address),
                match s.availability_threshold {
                    Some(t) if t > 100 => Err(format!(
                        "server {:?}: availability_threshold must be 0 to 100, not {t}",
                        s.name
                    )),
                    _ => Ok(()),
                },
            ] {
                if let Err(e) = e {
                    self.report(row.origin, e);
                    ok = false;
                }
            }
            let key = server_key(&s.name);
            if let Some((_, first)) = out.by_key.get(&key) {
                let m = format!(
                    "server {:?} is defined twice (first at {})",
                    s.name,
                    self.locate(*first)
                );
                self.report(row.origin, m);
                continue;
            }
            if ok {
                out.order.push(key.clone());
                out.by_key.insert(key, (row.item, row.origin));
            }
        }
        out
    }

    /// Mailboxes: each on its own, then uniqueness of every name in the input.
    fn mailboxes(&mut self, rows: Vec<Row<Mailbox>>, find: &FindServer) -> Named {
        let mut n = Named {
            ok: vec![false; rows.len()],
            index: NameIndex::build(&rows, self.rule),
            rows,
        };
        // The keys of the names that may clash (see `keys`): none in a valid input.
        let mut keys: Vec<Option<String>> = Vec::new();
        for j in 0..n.rows.len() {
            let origin = n.rows[j].origin;
            let item = std::mem::replace(&mut n.rows[j].item, vacant());
            let primary = n.index.shared_key(&item.address);
            if let Some(i) = primary.as_deref().and_then(|k| n.index.owner(k)) {
                let m = self.defined_twice(&n, i, &item.address);
                self.report(origin, m);
                continue;
            }
            let mailbox = match check_mailbox(item, self.rule, find) {
                Ok(m) => m,
                Err(errors) => {
                    for e in errors {
                        self.report(origin, e);
                    }
                    continue;
                }
            };
            keys.clear();
            keys.push(primary);
            for alias in &mailbox.aliases {
                keys.push(n.index.shared_key(alias));
            }
            let mut clash = false;
            for (name, key) in mailbox.names().zip(&keys) {
                if let Some(i) = key.as_deref().and_then(|k| n.index.owner(k)) {
                    let m = format!(
                        "address {name:?} already belongs to mailbox {:?} (at {})",
                        n.mailbox(i).address,
                        self.locate(n.rows[i as usize].origin)
                    );
                    self.report(origin, m);
                    clash = true;
                }
            }
            if clash {
                continue;
            }
            for key in keys.drain(..).flatten() {
                n.index.insert(key, j as u32);
            }
            n.rows[j].item = mailbox;
            n.ok[j] = true;
        }
        n
    }

    /// The problem of a mailbox whose primary address row `i` already holds.
    fn defined_twice(&self, n: &Named, i: u32, address: &str) -> String {
        let (owner, at) = (n.mailbox(i), self.locate(n.rows[i as usize].origin));
        if same_address(&owner.address, address, self.rule) {
            format!("mailbox {address:?} is defined twice (first at {at})")
        } else {
            format!(
                "address {address:?} already belongs to mailbox {:?} (at {at})",
                owner.address
            )
        }
    }

    /// A name owned in the catalog by a mailbox this input does not rewrite.
    fn owned_in_the_catalog(&mut self, view: &dyn View, named: &Named) {
        let rule = self.rule;
        let accepted = named.rows.iter().zip(&named.ok).filter(|(_, ok)| **ok);
        for (row, _) in accepted {
            let primary = address_key(&row.item.address, rule);
            for name in row.item.names() {
                let key = address_key(name, rule);
                let Some(owner) = view.owner(&key) else {
                    continue;
                };
                if owner != primary && !named.rewrites(&owner, rule) {
                    self.report(
                        row.origin,
                        format!(
                            "address {key:?} already belongs to mailbox {owner:?} in the catalog"
                        ),
                    );
                }
            }
        }
    }

    /// A server moved to another cluster must not break mailboxes left as they are.
    fn servers_moved(
        &mut self,
        view: &dyn View,
        servers: &InputServers,
        named: &Named,
        lookup_server: &FindServer,
    ) {
        let rule = self.rule;
        for key in &servers.order {
            let (server, origin) = &servers.by_key[key];
            match view.server(key) {
                Some(old) if old.cluster != server.cluster => {}
                _ => continue,
            }
            let mut broken = 0usize;
            for m in view.mailboxes_on(key) {
                if named.rewrites(&address_key(&m.address, rule), rule) {
                    continue;
                }
                let address = m.address.clone();
                if let Err(errors) = check_mailbox(m, rule, lookup_server) {
                    broken += 1;
                    if broken <= 5 {
                        self.report(
                            *origin,
                            format!(
                                "moving server {:?} to cluster {:?} breaks mailbox {address:?}: {}",
                                server.name,
                                server.cluster,
                                errors.join("; ")
                            ),
                        );
                    }
                }
            }
            if broken > 5 {
                self.report(
                    *origin,
                    format!("... and {} more mailboxes broken by that move", broken - 5),
                );
            }
        }
    }

    /// The resolved input, or every problem as `FILE:LINE: problem`, in file order.
    fn finish(self, resolved: Resolved) -> Result<Resolved, Vec<String>> {
        let mut problems = self.problems;
        if problems.is_empty() {
            return Ok(resolved);
        }
        // Stable sort: file order, then place; problems of one row stay in order.
        problems.sort_by_key(|p| p.origin.map(|o| (o.file, place_rank(o.place))));
        Err(problems
            .into_iter()
            .map(|p| format!("{}: {}", Input::locate_in(self.files, p.origin), p.message))
            .collect())
    }
}

fn place_rank(p: super::files::Place) -> (u8, u64) {
    use super::files::{ItemKind, Place};
    match p {
        Place::File => (0, 0),
        Place::Line(n) => (1, n),
        Place::Item { kind, index } => (
            match kind {
                ItemKind::Cluster => 2,
                ItemKind::Server => 3,
                ItemKind::Mailbox => 4,
            },
            index as u64,
        ),
    }
}

/// Checks one mailbox against the servers it names; returns it with server names
/// in their canonical spelling, or every problem found.
pub fn check_mailbox(
    m: Mailbox,
    rule: LocalPartMatch,
    server: &FindServer,
) -> Result<Mailbox, Vec<String>> {
    let Mailbox {
        address,
        home,
        replicas: named_replicas,
        aliases,
        failover,
        home_state,
        replica_states: named_states,
    } = m;
    let mut errors = Vec::new();
    if let Err(e) = check_address(&address) {
        errors.push(e);
    }
    let mut seen = Names::new(&address, aliases.len(), rule);
    for alias in &aliases {
        match check_address(alias) {
            Err(e) => errors.push(format!("alias: {e}")),
            Ok(()) => {
                if !seen.insert(alias) {
                    errors.push(format!(
                        "alias {alias:?} repeats an address of the same mailbox"
                    ));
                }
            }
        }
    }
    drop(seen);
    let home_server = server(&home);
    if home_server.is_none() {
        errors.push(format!("home server {home:?} does not exist"));
    }
    let replicas = check_replicas(named_replicas, home_server.as_deref(), server, &mut errors);
    if home_state == ReplicaState::PendingDelete {
        errors.push(
            "home_state pending-delete: only a replica may be pending delete (make another server the home first)"
                .into(),
        );
    }
    // States in the canonical spelling and order of the replicas they name.
    let mut replica_states = Vec::new();
    for (r, state) in &named_states {
        match replicas.iter().find(|c| same_server(c, r)) {
            Some(c) if !state.is_in_service() => replica_states.push((c.clone(), *state)),
            Some(_) => {}
            None => errors.push(format!(
                "a state is given for {r:?}, not a replica of this mailbox"
            )),
        }
    }
    replica_states.sort_by_key(|(s, _)| replicas.iter().position(|c| c == s));
    match (home_server, errors.is_empty()) {
        (Some(h), true) => Ok(Mailbox {
            // The name as written, when it is already the server's own spelling.
            home: if home == h.name { home } else { h.name.clone() },
            address,
            replicas,
            aliases,
            failover,
            home_state,
            replica_states,
        }),
        _ => Err(errors),
    }
}

/// The replicas that exist, are not the home, are in the home's cluster and are
/// named once, in their canonical spelling; a problem in `errors` for each other.
fn check_replicas(
    named: Vec<String>,
    home: Option<&Server>,
    server: &FindServer,
    errors: &mut Vec<String>,
) -> Vec<String> {
    let mut replicas: Vec<String> = Vec::with_capacity(named.len());
    for r in named {
        let Some(rs) = server(&r) else {
            errors.push(format!("replica server {r:?} does not exist"));
            continue;
        };
        if let Some(h) = home {
            if same_server(&h.name, &rs.name) {
                errors.push(format!("replica {r:?} is the home server"));
                continue;
            }
            if h.cluster != rs.cluster {
                errors.push(format!(
                    "replica {r:?} is in cluster {:?}, the home {:?} is in cluster {:?}",
                    rs.cluster, h.name, h.cluster
                ));
                continue;
            }
        }
        if replicas.iter().any(|c| same_server(c, &rs.name)) {
            errors.push(format!("replica {r:?} is listed twice"));
            continue;
        }
        replicas.push(if r == rs.name { r } else { rs.name.clone() });
    }
    replicas
}

/// The names of one mailbox seen so far, to find one repeated: compared pairwise
/// while there are few (no key built), by key beyond.
enum Names<'a> {
    Few(Vec<&'a str>, LocalPartMatch),
    Many(HashSet<String>, LocalPartMatch),
}

impl<'a> Names<'a> {
    const FEW: usize = 16;

    fn new(address: &'a str, aliases: usize, rule: LocalPartMatch) -> Names<'a> {
        let mut names = Vec::with_capacity(1 + aliases.min(Self::FEW));
        names.push(address);
        Names::Few(names, rule)
    }

    /// Adds `name`; false if a name with its key was already there.
    fn insert(&mut self, name: &'a str) -> bool {
        match self {
            Names::Few(names, rule) if names.len() < Self::FEW => {
                if names.iter().any(|n| same_address(n, name, *rule)) {
                    return false;
                }
                names.push(name);
                true
            }
            Names::Few(names, rule) => {
                let rule = *rule;
                let keys = names.iter().map(|n| address_key(n, rule)).collect();
                *self = Names::Many(keys, rule);
                self.insert(name)
            }
            Names::Many(keys, rule) => keys.insert(address_key(name, *rule)),
        }
    }
}
