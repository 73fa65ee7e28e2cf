//! The catalog's LDAP shape (schema `catalog/ldap/clustermail.schema`): the
//! attribute and object class names, and the one mapping between a directory
//! entry and a catalog record, both ways (entry → [`Record`] for the consumer,
//! record → LDIF for `catalog export --format ldif`).
//!
//! Pure: no I/O. Attribute names compare case-insensitively, as LDAP does.

use crate::catalog::model::{address_key, server_key, LocalPartMatch};
use crate::catalog::model::{AdminState, Cluster, Mailbox, ReplicaState, Server, TlsPolicy};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;

pub const OC_SERVER: &str = "clustermailServer";
pub const OC_MAILBOX: &str = "clustermailMailbox";
pub const OC_CLUSTER: &str = "clustermailClusterEntry";
/// Structural holder of a mailbox that is not a person entry.
pub const OC_MAILBOX_ENTRY: &str = "clustermailMailboxEntry";

/// The search filter of the consumer: every entry the catalog is made of.
pub const FILTER: &str =
    "(|(objectClass=clustermailServer)(objectClass=clustermailMailbox)(objectClass=clustermailClusterEntry))";
/// The attributes the consumer asks for.
pub const ATTRS: [&str; 16] = [
    "objectClass",
    "cn",
    "mail",
    "clustermailCluster",
    "clustermailAddress",
    "clustermailState",
    "clustermailAvailabilityThreshold",
    "clustermailTls",
    "clustermailTlsName",
    "clustermailAlias",
    "clustermailHome",
    "clustermailReplica",
    "clustermailFailover",
    "clustermailRouter",
    "entryUUID",
    "entryCSN",
];

/// One catalog record as a directory entry holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Cluster(Cluster),
    Server(Server),
    Mailbox(Mailbox),
}

/// What names a record in the catalog: kind + lookup key. Two entries with the
/// same `Key` describe the same catalog record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Key {
    Cluster(String),
    Server(String),
    Mailbox(String),
}

impl Record {
    pub fn key(&self, rule: LocalPartMatch) -> Key {
        match self {
            Record::Cluster(c) => Key::Cluster(server_key(&c.name)),
            Record::Server(s) => Key::Server(server_key(&s.name)),
            Record::Mailbox(m) => Key::Mailbox(address_key(&m.address, rule)),
        }
    }

    /// The name an administrator knows it by.
    pub fn name(&self) -> &str {
        match self {
            Record::Cluster(c) => &c.name,
            Record::Server(s) => &s.name,
            Record::Mailbox(m) => &m.address,
        }
    }
}

/// An entry's attributes, names folded to lower case.
pub type Attrs = HashMap<String, Vec<String>>;

/// Folds attribute names to lower case (LDAP names are case-insensitive).
pub fn fold(attrs: HashMap<String, Vec<String>>) -> Attrs {
    attrs
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

fn one<'a>(attrs: &'a Attrs, name: &str) -> Result<Option<&'a str>, String> {
    match attrs.get(&name.to_ascii_lowercase()).map(Vec::as_slice) {
        None | Some([]) => Ok(None),
        Some([v]) => Ok(Some(v.trim())),
        Some(_) => Err(format!("{name} has several values; it takes one")),
    }
}

fn must<'a>(attrs: &'a Attrs, name: &str) -> Result<&'a str, String> {
    one(attrs, name)?.ok_or_else(|| format!("{name} is missing"))
}

/// Multi-valued attribute in value order: OpenLDAP's ordered values (`{0}mail-2`)
/// sorted by their index, with the index removed; plain values as sent.
fn ordered(attrs: &Attrs, name: &str) -> Vec<String> {
    let mut vals: Vec<(Option<u64>, usize, String)> = attrs
        .get(&name.to_ascii_lowercase())
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, v)| match strip_order(v) {
            Some((n, rest)) => (Some(n), i, rest.trim().to_string()),
            None => (None, i, v.trim().to_string()),
        })
        .collect();
    vals.sort_by_key(|(n, i, _)| (n.unwrap_or(u64::MAX), *i));
    vals.into_iter().map(|(_, _, v)| v).collect()
}

fn strip_order(v: &str) -> Option<(u64, &str)> {
    let rest = v.strip_prefix('{')?;
    let (n, rest) = rest.split_once('}')?;
    Some((n.parse().ok()?, rest))
}

fn has_class(attrs: &Attrs, class: &str) -> bool {
    attrs
        .get("objectclass")
        .is_some_and(|v| v.iter().any(|c| c.eq_ignore_ascii_case(class)))
}

/// `NAME` or `NAME=STATE`, as the catalog's CSV files write a copy.
fn copy(text: &str) -> Result<(String, ReplicaState), String> {
    match text.split_once('=') {
        None => Ok((text.trim().to_string(), ReplicaState::InService)),
        Some((name, state)) => Ok((name.trim().to_string(), state.parse()?)),
    }
}

fn with_state(name: &str, state: ReplicaState) -> String {
    match state {
        ReplicaState::InService => name.to_string(),
        state => format!("{name}={state}"),
    }
}

/// Maps a directory entry to the catalog record it holds; why not, when it is
/// malformed (the catalog's invariants are checked when it is applied).
pub fn to_record(attrs: &Attrs) -> Result<Record, String> {
    if has_class(attrs, OC_SERVER) {
        return server(attrs).map(Record::Server);
    }
    if has_class(attrs, OC_MAILBOX) {
        return mailbox(attrs).map(Record::Mailbox);
    }
    if has_class(attrs, OC_CLUSTER) {
        return Ok(Record::Cluster(Cluster {
            name: must(attrs, "cn")?.to_string(),
            routers: ordered(attrs, "clustermailRouter"),
        }));
    }
    Err("no clustermail object class".into())
}

fn server(attrs: &Attrs) -> Result<Server, String> {
    let state = match one(attrs, "clustermailState")? {
        Some(s) => s.parse::<AdminState>()?,
        None => AdminState::InService,
    };
    let availability_threshold = match one(attrs, "clustermailAvailabilityThreshold")? {
        Some(t) => Some(
            t.parse::<u8>()
                .ok()
                .filter(|t| *t <= 100)
                .ok_or_else(|| format!("clustermailAvailabilityThreshold {t:?} is not 0-100"))?,
        ),
        None => None,
    };
    let tls = match one(attrs, "clustermailTls")? {
        None => TlsPolicy::Opportunistic,
        Some(t) if t.eq_ignore_ascii_case("opportunistic") => TlsPolicy::Opportunistic,
        Some(t) if t.eq_ignore_ascii_case("required") => TlsPolicy::Required,
        Some(t) if t.eq_ignore_ascii_case("off") => TlsPolicy::Off,
        Some(t) => {
            return Err(format!(
                "clustermailTls {t:?} is not opportunistic, required or off"
            ))
        }
    };
    Ok(Server {
        name: must(attrs, "cn")?.to_string(),
        cluster: must(attrs, "clustermailCluster")?.to_string(),
        address: must(attrs, "clustermailAddress")?.to_string(),
        state,
        availability_threshold,
        tls,
        tls_name: one(attrs, "clustermailTlsName")?.map(str::to_string),
    })
}

fn mailbox(attrs: &Attrs) -> Result<Mailbox, String> {
    // A person entry may carry several mail values: the first is the primary
    // address, the others are aliases.
    let mails = ordered(attrs, "mail");
    let Some((address, more)) = mails.split_first() else {
        return Err("mail is missing".into());
    };
    let (home, home_state) = copy(must(attrs, "clustermailHome")?)?;
    let mut replicas = Vec::new();
    let mut replica_states = Vec::new();
    for r in ordered(attrs, "clustermailReplica") {
        let (name, state) = copy(&r)?;
        if !state.is_in_service() {
            replica_states.push((name.clone(), state));
        }
        replicas.push(name);
    }
    let failover = match one(attrs, "clustermailFailover")? {
        None => None,
        Some(f) if f.eq_ignore_ascii_case("TRUE") => Some(true),
        Some(f) if f.eq_ignore_ascii_case("FALSE") => Some(false),
        Some(f) => return Err(format!("clustermailFailover {f:?} is not TRUE or FALSE")),
    };
    let mut aliases: Vec<String> = more.to_vec();
    aliases.extend(ordered(attrs, "clustermailAlias"));
    Ok(Mailbox {
        address: address.clone(),
        home,
        replicas,
        aliases,
        failover,
        home_state,
        replica_states,
    })
}

/// Escapes an RDN value (RFC 4514 §2.4).
pub fn escape_rdn(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = i == 0 && (c == ' ' || c == '#') || i + 1 == v.chars().count() && c == ' ';
        if edge || ",+\"\\<>;=".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One `attr: value` LDIF line; base64 (`attr:: …`) when the value is not a
/// SAFE-STRING (RFC 2849).
fn line(out: &mut String, attr: &str, value: &str) {
    let safe = value.bytes().enumerate().all(|(i, b)| {
        b.is_ascii() && b != 0 && b != b'\n' && b != b'\r' && !(i == 0 && b" :<".contains(&b))
    }) && !value.ends_with(' ');
    if safe {
        let _ = writeln!(out, "{attr}: {value}");
    } else {
        let _ = writeln!(out, "{attr}:: {}", base64(value.as_bytes()));
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `ou=` container entries under `base`.
pub fn containers(base: &str) -> String {
    let mut out = String::new();
    for ou in ["clusters", "servers", "mailboxes"] {
        let _ = writeln!(
            out,
            "dn: ou={ou},{base}\nobjectClass: organizationalUnit\nou: {ou}\n"
        );
    }
    out
}

/// A record as an LDIF entry (with its blank separating line).
pub fn to_ldif(record: &Record, base: &str) -> String {
    let mut out = String::new();
    match record {
        Record::Cluster(c) => {
            line(
                &mut out,
                "dn",
                &format!("cn={},ou=clusters,{base}", escape_rdn(&c.name)),
            );
            line(&mut out, "objectClass", OC_CLUSTER);
            line(&mut out, "cn", &c.name);
            for (i, r) in c.routers.iter().enumerate() {
                line(&mut out, "clustermailRouter", &format!("{{{i}}}{r}"));
            }
        }
        Record::Server(s) => {
            line(
                &mut out,
                "dn",
                &format!("cn={},ou=servers,{base}", escape_rdn(&s.name)),
            );
            line(&mut out, "objectClass", OC_SERVER);
            line(&mut out, "cn", &s.name);
            line(&mut out, "clustermailCluster", &s.cluster);
            line(&mut out, "clustermailAddress", &s.address);
            line(&mut out, "clustermailState", s.state.as_str());
            if let Some(t) = s.availability_threshold {
                line(&mut out, "clustermailAvailabilityThreshold", &t.to_string());
            }
            let tls = match s.tls {
                TlsPolicy::Opportunistic => None,
                TlsPolicy::Required => Some("required"),
                TlsPolicy::Off => Some("off"),
            };
            if let Some(t) = tls {
                line(&mut out, "clustermailTls", t);
            }
            if let Some(n) = &s.tls_name {
                line(&mut out, "clustermailTlsName", n);
            }
        }
        Record::Mailbox(m) => {
            let dn = format!("mail={},ou=mailboxes,{base}", escape_rdn(&m.address));
            line(&mut out, "dn", &dn);
            line(&mut out, "objectClass", OC_MAILBOX_ENTRY);
            line(&mut out, "objectClass", OC_MAILBOX);
            line(&mut out, "mail", &m.address);
            line(
                &mut out,
                "clustermailHome",
                &with_state(&m.home, m.home_state),
            );
            for (i, r) in m.replicas.iter().enumerate() {
                let v = format!("{{{i}}}{}", with_state(r, m.state_on(r)));
                line(&mut out, "clustermailReplica", &v);
            }
            for a in &m.aliases {
                line(&mut out, "clustermailAlias", a);
            }
            if let Some(f) = m.failover {
                line(
                    &mut out,
                    "clustermailFailover",
                    if f { "TRUE" } else { "FALSE" },
                );
            }
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> Attrs {
        let mut a: Attrs = HashMap::new();
        for (k, v) in pairs {
            a.entry(k.to_ascii_lowercase())
                .or_default()
                .push(v.to_string());
        }
        a
    }

    #[test]
    fn mailbox_keeps_replica_order_and_states() {
        let a = attrs(&[
            ("objectClass", "inetOrgPerson"),
            ("objectClass", "clustermailMailbox"),
            ("mail", "a@example.com"),
            ("clustermailHome", "mail-1=out-of-service"),
            ("clustermailReplica", "{1}mail-3=pending-delete"),
            ("clustermailReplica", "{0}mail-2"),
            ("clustermailAlias", "b@example.com"),
            ("clustermailFailover", "FALSE"),
        ]);
        let Record::Mailbox(m) = to_record(&a).unwrap() else {
            panic!("not a mailbox")
        };
        assert_eq!(m.replicas, ["mail-2", "mail-3"]);
        assert_eq!(m.home_state, ReplicaState::OutOfService);
        assert_eq!(m.state_on("mail-3"), ReplicaState::PendingDelete);
        assert_eq!(m.aliases, ["b@example.com"]);
        assert_eq!(m.failover, Some(false));
    }

    #[test]
    fn malformed_entries_say_why() {
        let a = attrs(&[("objectClass", "clustermailServer"), ("cn", "mail-1")]);
        assert_eq!(to_record(&a).unwrap_err(), "clustermailCluster is missing");
        let a = attrs(&[
            ("objectClass", "clustermailServer"),
            ("cn", "mail-1"),
            ("clustermailCluster", "c"),
            ("clustermailAddress", "127.0.0.1:25"),
            ("clustermailState", "sleeping"),
        ]);
        assert!(to_record(&a).unwrap_err().contains("sleeping"));
    }

    #[test]
    fn ldif_round_trips_through_the_mapping() {
        let m = Mailbox {
            address: "a+b@example.com".into(),
            home: "mail-1".into(),
            replicas: vec!["mail-2".into(), "mail-3".into()],
            aliases: vec!["jörg@example.com".into()],
            failover: Some(true),
            home_state: ReplicaState::InService,
            replica_states: vec![("mail-3".into(), ReplicaState::OutOfService)],
        };
        let text = to_ldif(&Record::Mailbox(m.clone()), "dc=example,dc=test");
        assert!(text.starts_with("dn: mail=a\\+b@example.com,ou=mailboxes,dc=example,dc=test\n"));
        assert!(
            text.contains("clustermailAlias:: asO2cmdAZXhhbXBsZS5jb20=\n"),
            "{text}"
        );
        let mut a: Attrs = HashMap::new();
        for l in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with("dn"))
        {
            let (k, v) = l.split_once(": ").unwrap();
            let v = match k.strip_suffix(':') {
                Some(_) => "jörg@example.com".to_string(),
                None => v.to_string(),
            };
            a.entry(k.trim_end_matches(':').to_ascii_lowercase())
                .or_default()
                .push(v);
        }
        assert_eq!(to_record(&a).unwrap(), Record::Mailbox(m));
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
    }
}
