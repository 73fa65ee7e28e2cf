//! The catalog's invariants, checked as a pure function of the incoming rows and
//! (for a merge) a read-only view of the catalog as it is.
//!
//! - every referenced server exists (in the input or, for a merge, the catalog);
//! - a replica is never the home, nor listed twice;
//! - every replica is in the home's cluster;
//! - an address or alias belongs to exactly one mailbox.
//!
//! Every violation is reported with the origin of the row that causes it.

use super::files::{Input, Origin, Problem};
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
        clusters: cluster_rows,
        servers: server_rows,
        mailboxes: mailbox_rows,
        problems: read_problems,
    } = input;
    let locate = |o: Origin| Input::locate_in(&files, Some(o));
    let mut problems = read_problems;
    let mut report = |origin: Origin, message: String| {
        problems.push(Problem {
            origin: Some(origin),
            message,
        })
    };

    // Clusters (their next-hop routers), by key.
    let mut clusters: Vec<Cluster> = Vec::new();
    let mut cluster_seen: HashMap<String, Origin> = HashMap::new();
    for row in cluster_rows {
        let c = &row.item;
        let mut ok = true;
        if let Err(e) = check_name("cluster", &c.name) {
            report(row.origin, e);
            ok = false;
        }
        for r in &c.routers {
            if let Err(e) = check_server_address(r) {
                report(row.origin, format!("router: {e}"));
                ok = false;
            }
        }
        if let Some(first) = cluster_seen.get(&server_key(&c.name)) {
            report(
                row.origin,
                format!(
                    "cluster {:?} is defined twice (first at {})",
                    c.name,
                    locate(*first)
                ),
            );
            continue;
        }
        cluster_seen.insert(server_key(&c.name), row.origin);
        if ok {
            clusters.push(row.item);
        }
    }

    // Servers from the input, by key.
    let mut servers: HashMap<String, (Server, Origin)> = HashMap::new();
    let mut server_order = Vec::new();
    for row in server_rows {
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
                report(row.origin, e);
                ok = false;
            }
        }
        let key = server_key(&s.name);
        if let Some((_, first)) = servers.get(&key) {
            report(
                row.origin,
                format!(
                    "server {:?} is defined twice (first at {})",
                    s.name,
                    locate(*first)
                ),
            );
            continue;
        }
        if ok {
            server_order.push(key.clone());
            servers.insert(key, (row.item, row.origin));
        }
    }

    let lookup_server = |name: &str| -> Option<Server> {
        let key = server_key(name);
        match servers.get(&key) {
            Some((s, _)) => Some(s.clone()),
            None => existing.and_then(|v| v.server(&key)),
        }
    };

    // Mailboxes from the input: each on its own, then uniqueness of every name.
    // `names` maps every address key (primary or alias) to its mailbox's index.
    let mut mailboxes: Vec<Mailbox> = Vec::with_capacity(mailbox_rows.len());
    let mut origins: Vec<Origin> = Vec::with_capacity(mailbox_rows.len());
    let mut names: HashMap<String, u32> = HashMap::with_capacity(mailbox_rows.len() * 2);
    for row in mailbox_rows {
        let primary = address_key(&row.item.address, rule);
        if let Some(&i) = names.get(&primary) {
            let owner = &mailboxes[i as usize];
            let message = if address_key(&owner.address, rule) == primary {
                format!(
                    "mailbox {:?} is defined twice (first at {})",
                    row.item.address,
                    locate(origins[i as usize])
                )
            } else {
                format!(
                    "address {:?} already belongs to mailbox {:?} (at {})",
                    row.item.address,
                    owner.address,
                    locate(origins[i as usize])
                )
            };
            report(row.origin, message);
            continue;
        }
        let mailbox = match check_mailbox(row.item, rule, &lookup_server) {
            Ok(m) => m,
            Err(errors) => {
                for e in errors {
                    report(row.origin, e);
                }
                continue;
            }
        };
        let index = mailboxes.len() as u32;
        let mut clash = false;
        for name in mailbox.names() {
            let key = address_key(name, rule);
            if let Some(&i) = names.get(&key) {
                report(
                    row.origin,
                    format!(
                        "address {name:?} already belongs to mailbox {:?} (at {})",
                        mailboxes[i as usize].address,
                        locate(origins[i as usize])
                    ),
                );
                clash = true;
            }
        }
        if clash {
            continue;
        }
        for name in mailbox.names() {
            names.insert(address_key(name, rule), index);
        }
        mailboxes.push(mailbox);
        origins.push(row.origin);
    }

    if let Some(view) = existing {
        // Whether the mailbox with this primary key is rewritten by this input.
        let rewritten = |primary: &str| {
            names
                .get(primary)
                .is_some_and(|&i| address_key(&mailboxes[i as usize].address, rule) == primary)
        };
        // A name owned in the catalog by a mailbox this input does not rewrite.
        for (key, &i) in &names {
            if let Some(owner) = view.owner(key) {
                let primary = address_key(&mailboxes[i as usize].address, rule);
                if owner != primary && !rewritten(&owner) {
                    report(
                        origins[i as usize],
                        format!(
                            "address {key:?} already belongs to mailbox {owner:?} in the catalog"
                        ),
                    );
                }
            }
        }
        // A server moved to another cluster must not break mailboxes left as they are.
        for key in &server_order {
            let (server, origin) = &servers[key];
            let Some(old) = view.server(key) else {
                continue;
            };
            if old.cluster == server.cluster {
                continue;
            }
            let mut broken = 0usize;
            for m in view.mailboxes_on(key) {
                if rewritten(&address_key(&m.address, rule)) {
                    continue;
                }
                let address = m.address.clone();
                if let Err(errors) = check_mailbox(m, rule, &lookup_server) {
                    broken += 1;
                    if broken <= 5 {
                        report(
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
                report(
                    *origin,
                    format!("... and {} more mailboxes broken by that move", broken - 5),
                );
            }
        }
    }

    if problems.is_empty() {
        Ok(Resolved {
            clusters,
            servers: server_order
                .into_iter()
                .filter_map(|k| servers.remove(&k).map(|(s, _)| s))
                .collect(),
            mailboxes,
        })
    } else {
        // Stable sort: file order, then place; problems of one row stay in order.
        problems.sort_by_key(|p| p.origin.map(|o| (o.file, place_rank(o.place))));
        Err(problems
            .into_iter()
            .map(|p| format!("{}: {}", Input::locate_in(&files, p.origin), p.message))
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
