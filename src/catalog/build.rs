//! A full write of one catalog generation into an empty tree (`import --replace`,
//! `replace_all`, a merge too large for one batch, and compaction): mailbox
//! records numbered in address order, the address index's fst, the server index,
//! domain and mailbox counts. Everything in sorted key order per prefix, so sled
//! appends near the rightmost leaf instead of splitting nodes all over the tree.

use super::codec::{decode, domain_of, encode, key, meta_key, rule_tag};
use super::index::{self, HOME, REPLICA};
use super::live::{Gen, COUNT_KEY};
use super::model::{address_key, server_key, Cluster, LocalPartMatch, Mailbox, Server};
use super::names::{build_fst, store_fst, Entry};
use super::plan::Plan;
use super::records;
use super::store::{FORMAT, FORMAT_KEY, RULE_KEY};
use super::validate::Resolved;
use anyhow::{anyhow, Result};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Writes `resolved` (with the sync metadata `meta`) into the empty tree `out`.
pub(super) fn write_fresh(
    out: &sled::Tree,
    resolved: &Resolved,
    meta: &[(String, Vec<u8>)],
    rule: LocalPartMatch,
    progress: &indicatif::ProgressBar,
) -> Result<()> {
    out.insert(RULE_KEY, rule_tag(rule))?;
    out.insert(FORMAT_KEY, FORMAT)?;
    for (k, v) in meta {
        out.insert(meta_key(k), v.as_slice())?;
    }
    for c in &resolved.clusters {
        out.insert(key(b'c', &[&server_key(&c.name)]), encode(c)?)?;
    }
    for s in &resolved.servers {
        out.insert(key(b's', &[&server_key(&s.name)]), encode(s)?)?;
    }
    let mailboxes = &resolved.mailboxes;
    // Mailbox numbers follow primary address order.
    let mut order: Vec<(String, u32)> = mailboxes
        .iter()
        .enumerate()
        .map(|(i, m)| (address_key(&m.address, rule), i as u32))
        .collect();
    order.sort_unstable();
    write_domain_counts(out, mailboxes)?;
    out.insert(COUNT_KEY, &(order.len() as u64).to_be_bytes())?;
    let mut aliases: Vec<(String, u32)> = order
        .iter()
        .enumerate()
        .flat_map(|(pos, (_, i))| {
            mailboxes[*i as usize]
                .aliases
                .iter()
                .map(move |a| (address_key(a, rule), pos as u32))
        })
        .collect();
    aliases.sort_unstable();
    progress.set_position(order.len() as u64 / 4);
    // The address index first, so that its keys and its bytes are freed before
    // the records and the server index are written (sled keeps what is written
    // in memory for a while): the peak of a full write is the input plus the
    // larger of the two, not their sum. Built on a thread of its own meanwhile,
    // it saved ~0.5 s of a 1M import; the import's peak was 845–1,042 MB over
    // four runs then, 768–950 MB over six runs so.
    let fst = build_fst(merge_sorted(entries(&order, &aliases)))?;
    drop(aliases);
    store_fst(out, &fst)?;
    drop(fst);
    progress.set_position(order.len() as u64 / 2);
    records::write_all(out, order.iter().map(|(_, i)| &mailboxes[*i as usize]))?;
    progress.set_position(order.len() as u64 * 3 / 4);
    write_server_index(out, resolved, &order)
}

/// The fst's entries: primaries (numbered by position in `order`) and aliases,
/// each stream sorted.
fn entries<'a>(
    order: &'a [(String, u32)],
    aliases: &'a [(String, u32)],
) -> (
    impl Iterator<Item = (&'a str, Entry)>,
    impl Iterator<Item = (&'a str, Entry)>,
) {
    let primaries = order.iter().enumerate().map(|(pos, (k, _))| {
        let e = Entry {
            number: pos as u32,
            alias: false,
        };
        (k.as_str(), e)
    });
    let aliases = aliases.iter().map(|(k, pos)| {
        let e = Entry {
            number: *pos,
            alias: true,
        };
        (k.as_str(), e)
    });
    (primaries, aliases)
}

/// Two ascending streams as one (a name in both comes out twice: the fst refuses it).
fn merge_sorted<'a>(
    (a, b): (
        impl Iterator<Item = (&'a str, Entry)>,
        impl Iterator<Item = (&'a str, Entry)>,
    ),
) -> impl Iterator<Item = (&'a str, Entry)> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.0 < x.0 => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

fn write_domain_counts(out: &sled::Tree, mailboxes: &[Mailbox]) -> Result<()> {
    // Counted by the domain as written (few distinct), then folded by case.
    let mut raw: HashMap<&str, u64> = HashMap::new();
    for name in mailboxes.iter().flat_map(|m| m.names()) {
        *raw.entry(domain_of(name)).or_default() += 1;
    }
    let mut domains: BTreeMap<String, u64> = BTreeMap::new();
    for (d, n) in raw {
        *domains.entry(d.to_lowercase()).or_default() += n;
    }
    for (d, n) in domains {
        out.insert(key(b'd', &[&d]), &n.to_be_bytes())?;
    }
    Ok(())
}

/// The server index: each server's (address, role) postings, from `order` (the
/// mailboxes in number order, with their primary address keys).
fn write_server_index(
    out: &sled::Tree,
    resolved: &Resolved,
    order: &[(String, u32)],
) -> Result<()> {
    let mut keys: Vec<String> = resolved
        .servers
        .iter()
        .map(|s| server_key(&s.name))
        .collect();
    keys.sort();
    keys.dedup();
    let rank: HashMap<&str, u32> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i as u32))
        .collect();
    let by_name: HashMap<&str, u32> = resolved
        .servers
        .iter()
        .filter_map(|s| Some((s.name.as_str(), *rank.get(server_key(&s.name).as_str())?)))
        .collect();
    let server = |name: &str| -> Result<u32> {
        by_name
            .get(name)
            .or_else(|| rank.get(server_key(name).as_str()))
            .copied()
            .ok_or_else(|| anyhow!("mailbox on unknown server {name:?}"))
    };
    let mut postings: Vec<(u32, u32, u8)> = Vec::with_capacity(order.len() * 3);
    for (pos, (_, i)) in order.iter().enumerate() {
        let m = &resolved.mailboxes[*i as usize];
        postings.push((server(&m.home)?, pos as u32, HOME));
        for r in &m.replicas {
            postings.push((server(r)?, pos as u32, REPLICA));
        }
    }
    postings.sort_unstable();
    index::fill(
        out,
        postings.iter().map(|(s, pos, role)| {
            (
                keys[*s as usize].as_str(),
                order[*pos as usize].0.as_str(),
                *role,
            )
        }),
    )
}

/// A caller's sync metadata, by key (see `codec::meta_key`).
pub(super) type SyncMeta = Vec<(String, Vec<u8>)>;

/// The whole catalog of `old` with `plan` (a merge) applied, as a full write takes
/// it: records, and the sync metadata kept with them.
pub(super) fn rebuild_input(
    old: &Gen,
    plan: Option<&Plan>,
    rule: LocalPartMatch,
) -> Result<(Resolved, SyncMeta)> {
    let mut clusters: BTreeMap<String, Cluster> = BTreeMap::new();
    for r in old.tree.scan_prefix(b"c\0") {
        let c: Cluster = decode(&r?.1)?;
        clusters.insert(server_key(&c.name), c);
    }
    let mut servers: BTreeMap<String, Server> = BTreeMap::new();
    for r in old.tree.scan_prefix(b"s\0") {
        let s: Server = decode(&r?.1)?;
        servers.insert(server_key(&s.name), s);
    }
    let mut meta: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for r in old.tree.scan_prefix(meta_key("")) {
        let (k, v) = r?;
        let k = String::from_utf8_lossy(&k[meta_key("").len()..]).into_owned();
        meta.insert(k, v.to_vec());
    }
    let mut mailboxes = old.all()?;
    if let Some(plan) = plan {
        for k in &plan.removed_clusters {
            clusters.remove(k);
        }
        for c in &plan.clusters {
            clusters.insert(server_key(&c.name), c.clone());
        }
        for k in &plan.removed_servers {
            servers.remove(k);
        }
        for s in &plan.servers {
            servers.insert(server_key(&s.name), s.clone());
        }
        for (k, v) in &plan.meta {
            meta.insert(k.clone(), v.clone());
        }
        let replaced = plan.mailboxes.iter().filter_map(|(_, old)| old.as_ref());
        let gone: HashSet<String> = replaced
            .chain(&plan.removed_mailboxes)
            .map(|m| address_key(&m.address, rule))
            .collect();
        mailboxes.retain(|m| !gone.contains(&address_key(&m.address, rule)));
        mailboxes.extend(plan.mailboxes.iter().map(|(m, _)| m.clone()));
    }
    let resolved = Resolved {
        clusters: clusters.into_values().collect(),
        servers: servers.into_values().collect(),
        mailboxes,
    };
    Ok((resolved, meta.into_iter().collect()))
}
