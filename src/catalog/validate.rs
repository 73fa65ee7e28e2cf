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
    address_key, check_address, check_name, check_server_address, server_key, Cluster,
    LocalPartMatch, Mailbox, ReplicaState, Server,
};
use std::collections::{HashMap, HashSet};

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
    let lookup_server = |name: &str| -> Option<Server> {
        let key = server_key(name);
        match servers.by_key.get(&key) {
            Some((s, _)) => Some(s.clone()),
            None => existing.and_then(|v| v.server(&key)),
        }
    };
    let named = c.mailboxes(mailboxes, &lookup_server);
    if let Some(view) = existing {
        c.owned_in_the_catalog(view, &named);
        c.servers_moved(view, &servers, &named, &lookup_server);
    }
    c.finish(Resolved {
        clusters,
        servers: {
            let InputServers { mut by_key, order } = servers;
            order
                .into_iter()
                .filter_map(|k| by_key.remove(&k).map(|(s, _)| s))
                .collect()
        },
        mailboxes: named.mailboxes,
    })
}

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

/// The mailboxes of the input that passed their own checks, with every address
/// key (primary or alias) mapped to its mailbox's index.
struct Named {
    mailboxes: Vec<Mailbox>,
    origins: Vec<Origin>,
    names: HashMap<String, u32>,
}

impl Named {
    /// Whether the mailbox with this primary key is rewritten by this input.
    fn rewrites(&self, primary: &str, rule: LocalPartMatch) -> bool {
        self.names
            .get(primary)
            .is_some_and(|&i| address_key(&self.mailboxes[i as usize].address, rule) == primary)
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
    fn mailboxes(
        &mut self,
        rows: Vec<Row<Mailbox>>,
        lookup_server: &dyn Fn(&str) -> Option<Server>,
    ) -> Named {
        let rule = self.rule;
        let mut n = Named {
            mailboxes: Vec::with_capacity(rows.len()),
            origins: Vec::with_capacity(rows.len()),
            names: HashMap::with_capacity(rows.len() * 2),
        };
        for row in rows {
            let primary = address_key(&row.item.address, rule);
            if let Some(&i) = n.names.get(&primary) {
                let (owner, at) = (&n.mailboxes[i as usize], self.locate(n.origins[i as usize]));
                let m = if address_key(&owner.address, rule) == primary {
                    format!(
                        "mailbox {:?} is defined twice (first at {at})",
                        row.item.address
                    )
                } else {
                    format!(
                        "address {:?} already belongs to mailbox {:?} (at {at})",
                        row.item.address, owner.address
                    )
                };
                self.report(row.origin, m);
                continue;
            }
            let mailbox = match check_mailbox(row.item, rule, lookup_server) {
                Ok(m) => m,
                Err(errors) => {
                    for e in errors {
                        self.report(row.origin, e);
                    }
                    continue;
                }
            };
            let mut clash = false;
            for name in mailbox.names() {
                if let Some(&i) = n.names.get(&address_key(name, rule)) {
                    let m = format!(
                        "address {name:?} already belongs to mailbox {:?} (at {})",
                        n.mailboxes[i as usize].address,
                        self.locate(n.origins[i as usize])
                    );
                    self.report(row.origin, m);
                    clash = true;
                }
            }
            if clash {
                continue;
            }
            let index = n.mailboxes.len() as u32;
            for name in mailbox.names() {
                n.names.insert(address_key(name, rule), index);
            }
            n.mailboxes.push(mailbox);
            n.origins.push(row.origin);
        }
        n
    }

    /// A name owned in the catalog by a mailbox this input does not rewrite.
    fn owned_in_the_catalog(&mut self, view: &dyn View, named: &Named) {
        let rule = self.rule;
        for (key, &i) in &named.names {
            if let Some(owner) = view.owner(key) {
                let primary = address_key(&named.mailboxes[i as usize].address, rule);
                if owner != primary && !named.rewrites(&owner, rule) {
                    self.report(
                        named.origins[i as usize],
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
        lookup_server: &dyn Fn(&str) -> Option<Server>,
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
    server: &dyn Fn(&str) -> Option<Server>,
) -> Result<Mailbox, Vec<String>> {
    let mut errors = Vec::new();
    if let Err(e) = check_address(&m.address) {
        errors.push(e);
    }
    let mut seen = HashSet::new();
    seen.insert(address_key(&m.address, rule));
    for alias in &m.aliases {
        match check_address(alias) {
            Err(e) => errors.push(format!("alias: {e}")),
            Ok(()) => {
                if !seen.insert(address_key(alias, rule)) {
                    errors.push(format!(
                        "alias {alias:?} repeats an address of the same mailbox"
                    ));
                }
            }
        }
    }
    let home = server(&m.home);
    if home.is_none() {
        errors.push(format!("home server {:?} does not exist", m.home));
    }
    let mut replicas = Vec::with_capacity(m.replicas.len());
    let mut seen_servers = HashSet::new();
    for r in &m.replicas {
        let Some(rs) = server(r) else {
            errors.push(format!("replica server {r:?} does not exist"));
            continue;
        };
        if let Some(h) = &home {
            if server_key(&h.name) == server_key(&rs.name) {
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
        if !seen_servers.insert(server_key(&rs.name)) {
            errors.push(format!("replica {r:?} is listed twice"));
            continue;
        }
        replicas.push(rs.name);
    }
    if m.home_state == ReplicaState::PendingDelete {
        errors.push(
            "home_state pending-delete: only a replica may be pending delete (make another server the home first)"
                .into(),
        );
    }
    // States in the canonical spelling and order of the replicas they name.
    let mut replica_states = Vec::new();
    for (r, state) in &m.replica_states {
        match replicas.iter().find(|c| server_key(c) == server_key(r)) {
            Some(c) if !state.is_in_service() => replica_states.push((c.clone(), *state)),
            Some(_) => {}
            None => errors.push(format!(
                "a state is given for {r:?}, not a replica of this mailbox"
            )),
        }
    }
    replica_states.sort_by_key(|(s, _)| replicas.iter().position(|c| c == s));
    match (home, errors.is_empty()) {
        (Some(h), true) => Ok(Mailbox {
            home: h.name,
            replicas,
            replica_states,
            ..m
        }),
        _ => Err(errors),
    }
}
