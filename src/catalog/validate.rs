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
    address_key, check_address, check_name, check_server_address, server_key, LocalPartMatch,
    Mailbox, Server,
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
    pub servers: Vec<Server>,
    pub mailboxes: Vec<Mailbox>,
}

/// Checks the input on its own (replace) or against `existing` (merge).
pub fn resolve(
    input: &Input,
    existing: Option<&dyn View>,
    rule: LocalPartMatch,
) -> Result<Resolved, Vec<Problem>> {
    let mut problems = input.problems.clone();
    let mut report = |origin: Origin, message: String| {
        problems.push(Problem {
            origin: Some(origin),
            message,
        })
    };

    // Servers from the input, by key.
    let mut servers: HashMap<String, (Server, Origin)> = HashMap::new();
    let mut server_order = Vec::new();
    for row in &input.servers {
        let s = &row.item;
        let mut ok = true;
        for e in [
            check_name("server", &s.name),
            check_name("cluster", &s.cluster),
            check_server_address(&s.address),
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
                    input.locate(Some(*first))
                ),
            );
            continue;
        }
        if ok {
            server_order.push(key.clone());
            servers.insert(key, (s.clone(), row.origin));
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
    let mut mailboxes = Vec::with_capacity(input.mailboxes.len());
    let mut primaries: HashMap<String, Origin> = HashMap::with_capacity(input.mailboxes.len());
    let mut names: HashMap<String, (String, Origin)> =
        HashMap::with_capacity(input.mailboxes.len());
    for row in &input.mailboxes {
        let primary = address_key(&row.item.address, rule);
        if let Some(first) = primaries.get(&primary) {
            report(
                row.origin,
                format!(
                    "mailbox {:?} is defined twice (first at {})",
                    row.item.address,
                    input.locate(Some(*first))
                ),
            );
            continue;
        }
        primaries.insert(primary.clone(), row.origin);
        let mailbox = match check_mailbox(&row.item, rule, &lookup_server) {
            Ok(m) => m,
            Err(errors) => {
                for e in errors {
                    report(row.origin, e);
                }
                continue;
            }
        };
        for name in mailbox.names() {
            let key = address_key(name, rule);
            if let Some((owner, first)) = names.get(&key) {
                if *owner != primary {
                    report(
                        row.origin,
                        format!(
                            "address {name:?} already belongs to mailbox {owner:?} (at {})",
                            input.locate(Some(*first))
                        ),
                    );
                }
                continue;
            }
            names.insert(key, (primary.clone(), row.origin));
        }
        mailboxes.push(mailbox);
    }

    if let Some(view) = existing {
        // A name owned in the catalog by a mailbox this input does not rewrite.
        for (key, (primary, origin)) in &names {
            if let Some(owner) = view.owner(key) {
                if owner != *primary && !primaries.contains_key(&owner) {
                    report(
                        *origin,
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
                if primaries.contains_key(&address_key(&m.address, rule)) {
                    continue;
                }
                if let Err(errors) = check_mailbox(&m, rule, &lookup_server) {
                    broken += 1;
                    if broken <= 5 {
                        report(
                            *origin,
                            format!(
                                "moving server {:?} to cluster {:?} breaks mailbox {:?}: {}",
                                server.name,
                                server.cluster,
                                m.address,
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
            servers: server_order
                .into_iter()
                .filter_map(|k| servers.remove(&k).map(|(s, _)| s))
                .collect(),
            mailboxes,
        })
    } else {
        problems.sort_by_key(|p| p.origin.map(|o| (o.file, place_rank(o.place))));
        Err(problems)
    }
}

fn place_rank(p: super::files::Place) -> (u8, u64) {
    use super::files::{ItemKind, Place};
    match p {
        Place::File => (0, 0),
        Place::Line(n) => (1, n),
        Place::Item {
            kind: ItemKind::Server,
            index,
        } => (2, index as u64),
        Place::Item {
            kind: ItemKind::Mailbox,
            index,
        } => (3, index as u64),
    }
}

/// Checks one mailbox against the servers it names; returns it with server names
/// in their canonical spelling, or every problem found.
pub fn check_mailbox(
    m: &Mailbox,
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
    match (home, errors.is_empty()) {
        (Some(h), true) => Ok(Mailbox {
            address: m.address.clone(),
            home: h.name,
            replicas,
            aliases: m.aliases.clone(),
        }),
        _ => Err(errors),
    }
}
