//! The records of the replica catalog (servers and mailboxes) and the one place
//! that decides how addresses and server names are compared.
//!
//! Everything here is plain data: no I/O. The sled layout lives in `store.rs`,
//! file formats in `files.rs`, invariants in `validate.rs`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Administrative state of a mailbox server, set by an administrator (not probed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AdminState {
    /// Takes mail as home and as failover target.
    #[default]
    InService,
    /// Takes no mail at all.
    OutOfService,
    /// Takes mail for mailboxes homed on it, but is never a failover target.
    Restricted,
}

impl AdminState {
    pub const ALL: [AdminState; 3] = [
        AdminState::InService,
        AdminState::OutOfService,
        AdminState::Restricted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::InService => "in-service",
            AdminState::OutOfService => "out-of-service",
            AdminState::Restricted => "restricted",
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AdminState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AdminState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown admin state {s:?} (expected in-service, out-of-service or restricted)"
                )
            })
    }
}

/// The state of one copy of a mailbox on one server — its home copy or a replica
/// — set by an administrator (Domino marks a single mail database out of service
/// or pending delete in the cluster database directory; only that mailbox fails
/// over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Takes this mailbox's mail as the server's admin state allows.
    #[default]
    InService,
    /// Takes none of this mailbox's mail: a home copy out of service fails over
    /// as if the home were down (held mail waits).
    OutOfService,
    /// A replica about to be deleted: takes no new mail (never a home state).
    PendingDelete,
}

impl ReplicaState {
    pub const ALL: [ReplicaState; 3] = [
        ReplicaState::InService,
        ReplicaState::OutOfService,
        ReplicaState::PendingDelete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::InService => "in-service",
            ReplicaState::OutOfService => "out-of-service",
            ReplicaState::PendingDelete => "pending-delete",
        }
    }

    pub fn is_in_service(&self) -> bool {
        *self == ReplicaState::InService
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReplicaState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReplicaState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown replica state {s:?} (expected in-service, out-of-service or pending-delete)"
                )
            })
    }
}

/// A mailbox server of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Unique, compared case-insensitively; stored as first written.
    pub name: String,
    /// Cluster this server belongs to.
    pub cluster: String,
    /// SMTP address `host:port`; the host may be a DNS name, resolved at delivery time.
    pub address: String,
    #[serde(default)]
    pub state: AdminState,
    /// Overrides `routing.availability_threshold` for this server (0–100): below
    /// it the server counts as busy. (No `skip_serializing_if`: bincode needs it.)
    #[serde(default)]
    pub availability_threshold: Option<u8>,
    /// STARTTLS on deliveries to this server (`opportunistic`, `required`, `off`).
    #[serde(default)]
    pub tls: TlsPolicy,
    /// The name its certificate is verified against under `tls = "required"`
    /// (None: the host of `address`).
    #[serde(default)]
    pub tls_name: Option<String>,
}

/// STARTTLS on deliveries to a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsPolicy {
    /// Used when offered, the certificate not verified (Postfix's `may`); a
    /// failed handshake falls back to plain text.
    #[default]
    Opportunistic,
    /// Must be offered and verified; otherwise a temporary failure of the server.
    Required,
    /// Never used.
    Off,
}

/// A cluster's routers: the clustermail relays that take mail for this cluster's
/// mailboxes from routers of other clusters (the next hop; they repeat the routing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    /// SMTP addresses `host:port`, in order of preference.
    #[serde(default)]
    pub routers: Vec<String>,
}

/// A mailbox: its primary address, aliases, home server and ordered replica servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mailbox {
    pub address: String,
    pub home: String,
    /// Servers holding a replica, in order of preference.
    #[serde(default)]
    pub replicas: Vec<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Overrides `routing.failover` for this mailbox (None: the global setting).
    /// (No `skip_serializing_if`: the store's bincode needs every field.)
    #[serde(default)]
    pub failover: Option<bool>,
    /// The state of the home copy.
    #[serde(default)]
    pub home_state: ReplicaState,
    /// The replicas not in service, by server name as in `replicas` (files write
    /// them inside `replicas`: see `files`).
    #[serde(default)]
    pub replica_states: Vec<(String, ReplicaState)>,
}

impl Mailbox {
    /// The state of this mailbox's copy on `server` (home or replica; in service
    /// when not named).
    pub fn state_on(&self, server: &str) -> ReplicaState {
        if server_key(server) == server_key(&self.home) {
            return self.home_state;
        }
        self.replica_states
            .iter()
            .find(|(s, _)| server_key(s) == server_key(server))
            .map_or(ReplicaState::InService, |(_, st)| *st)
    }

    /// Sets the state of the copy on `server`; refused when `server` holds no
    /// copy, or for pending-delete on the home.
    pub fn set_state_on(&mut self, server: &str, state: ReplicaState) -> Result<(), String> {
        let key = server_key(server);
        if key == server_key(&self.home) {
            if state == ReplicaState::PendingDelete {
                return Err(format!(
                    "{}: the home copy cannot be pending-delete (make another server the home first)",
                    self.address
                ));
            }
            self.home_state = state;
            return Ok(());
        }
        let Some(name) = self.replicas.iter().find(|r| server_key(r) == key).cloned() else {
            return Err(format!(
                "{}: no copy on server {server:?} (home {}, replicas {})",
                self.address,
                self.home,
                if self.replicas.is_empty() {
                    "none".into()
                } else {
                    self.replicas.join(", ")
                }
            ));
        };
        self.replica_states.retain(|(s, _)| server_key(s) != key);
        if !state.is_in_service() {
            self.replica_states.push((name, state));
        }
        let at = |s: &str| {
            self.replicas
                .iter()
                .position(|r| server_key(r) == server_key(s))
        };
        let mut states = std::mem::take(&mut self.replica_states);
        states.sort_by_key(|(s, _)| at(s));
        self.replica_states = states;
        Ok(())
    }

    /// The primary address followed by every alias.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.address.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

/// The lookup key of a server name: case-insensitive.
pub fn server_key(name: &str) -> String {
    name.trim().to_lowercase()
}

/// Whether two server names have the same key (without building the keys when
/// both are ASCII).
pub fn same_server(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    if a.is_ascii() && b.is_ascii() {
        a.eq_ignore_ascii_case(b)
    } else {
        a.to_lowercase() == b.to_lowercase()
    }
}

/// How the local part of an address is compared. The domain is always
/// case-insensitive (RFC 5321 §2.4); the local part is case-insensitive unless the
/// administrator asks for exact matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LocalPartMatch {
    #[default]
    CaseInsensitive,
    Exact,
}

/// Checks the syntax of a catalog address (`local@domain`, a dot-atom local part or
/// UTF-8 per RFC 6531, a domain name) and returns why it is not acceptable.
///
/// Catalog addresses are deliberately stricter than what SMTP can carry: quoted
/// local parts, `%` and `!` (old relay-routing syntaxes), IP literals and trailing
/// dots are refused here so that the relay policy never has to decide what they mean.
pub fn check_address(addr: &str) -> Result<(), String> {
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return Err(format!("address {addr:?} has no @domain"));
    };
    if local.is_empty() {
        return Err(format!("address {addr:?} has an empty local part"));
    }
    if local.len() > 64 {
        return Err(format!("address {addr:?}: local part is over 64 octets"));
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(format!("address {addr:?}: local part has a misplaced dot"));
    }
    if let Some(c) = local
        .chars()
        .find(|c| c.is_ascii() && !(c.is_ascii_alphanumeric() || "#$&'*+-/=?^_`{|}~.".contains(*c)))
    {
        return Err(format!(
            "address {addr:?}: character {c:?} is not allowed in a local part"
        ));
    }
    check_domain(domain).map_err(|e| format!("address {addr:?}: {e}"))
}

/// Checks a domain name: labels of letters, digits and hyphens (or UTF-8), no IP literal.
pub fn check_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("empty domain".into());
    }
    if domain.len() > 255 {
        return Err("domain is over 255 octets".into());
    }
    if domain.starts_with('[') {
        return Err("IP literals are not catalog domains".into());
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return Err(format!("domain {domain:?} has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("domain {domain:?} has a label over 63 octets"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "domain {domain:?}: a label starts or ends with '-'"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| c.is_ascii() && !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!("domain {domain:?}: character {c:?} is not allowed"));
        }
    }
    Ok(())
}

/// The lookup key of an address under the given local-part rule.
pub fn address_key(addr: &str, rule: LocalPartMatch) -> String {
    let mut key = String::with_capacity(addr.len());
    push_address_key(&mut key, addr, rule);
    key
}

/// Appends the lookup key of `addr` to `out` (as [`address_key`], into a buffer
/// the caller reuses: validation keys a million addresses without allocating).
pub fn push_address_key(out: &mut String, addr: &str, rule: LocalPartMatch) {
    let addr = addr.trim();
    match addr.rsplit_once('@') {
        Some((local, domain)) => {
            match rule {
                LocalPartMatch::CaseInsensitive => push_lower(out, local),
                LocalPartMatch::Exact => out.push_str(local),
            }
            out.push('@');
            push_lower(out, domain);
        }
        None => push_lower(out, addr),
    }
}

/// Whether two addresses have the same key under `rule` (without building the keys
/// when both are ASCII).
pub fn same_address(a: &str, b: &str, rule: LocalPartMatch) -> bool {
    let (a, b) = (a.trim(), b.trim());
    if !(a.is_ascii() && b.is_ascii()) {
        return address_key(a, rule) == address_key(b, rule);
    }
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => {
            da.eq_ignore_ascii_case(db)
                && match rule {
                    LocalPartMatch::CaseInsensitive => la.eq_ignore_ascii_case(lb),
                    LocalPartMatch::Exact => la == lb,
                }
        }
        (None, None) => a.eq_ignore_ascii_case(b),
        _ => false,
    }
}

fn push_lower(out: &mut String, s: &str) {
    if s.is_ascii() {
        let start = out.len();
        out.push_str(s);
        out[start..].make_ascii_lowercase();
    } else {
        out.push_str(&s.to_lowercase());
    }
}

/// Checks a `host:port` SMTP address (host: DNS name, IPv4, or `[IPv6]`).
pub fn check_server_address(addr: &str) -> Result<(), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("server address {addr:?} is not host:port"));
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(format!("server address {addr:?}: bad port {port:?}")),
        Ok(_) => {}
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(v6) = inner.strip_suffix(']') else {
            return Err(format!("server address {addr:?}: unclosed '['"));
        };
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("server address {addr:?}: bad IPv6 address"));
    }
    if host.contains(':') {
        return Err(format!(
            "server address {addr:?}: IPv6 hosts need brackets, as [::1]:25"
        ));
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    check_domain(host).map_err(|e| format!("server address {addr:?}: {e}"))
}

/// Checks a server or cluster name: 1–64 characters of letters, digits, `-`, `_`, `.`.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if name.len() > 64 {
        return Err(format!("{kind} name {name:?} is over 64 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || "-_.".contains(*c)))
    {
        return Err(format!(
            "{kind} name {name:?}: character {c:?} is not allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fold_case_by_rule() {
        assert_eq!(
            address_key("Alice.Smith@Example.COM", LocalPartMatch::CaseInsensitive),
            "alice.smith@example.com"
        );
        assert_eq!(
            address_key("Alice.Smith@Example.COM", LocalPartMatch::Exact),
            "Alice.Smith@example.com"
        );
        assert_eq!(server_key(" Mail-1 "), "mail-1");
    }

    /// The allocation-free comparisons agree with comparing the keys.
    #[test]
    fn same_address_and_server_agree_with_the_keys() {
        let names = [
            "Alice@Example.com",
            "alice@example.COM",
            " alice@example.com ",
            "ALICE@example.com",
            "alice@example.org",
            "Jörg@Exämple.de",
            "jörg@exämple.de",
            "a@b@c.test",
            "a@B@C.test",
            "noat",
            "NOAT",
        ];
        for rule in [LocalPartMatch::CaseInsensitive, LocalPartMatch::Exact] {
            for a in names {
                for b in names {
                    let keys = address_key(a, rule) == address_key(b, rule);
                    assert_eq!(same_address(a, b, rule), keys, "{a:?} {b:?} {rule:?}");
                    assert_eq!(
                        same_server(a, b),
                        server_key(a) == server_key(b),
                        "{a:?} {b:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn address_syntax() {
        assert!(check_address("a.b+tag@example.com").is_ok());
        assert!(check_address("jörg@exämple.de").is_ok());
        for bad in [
            "noat",
            "@example.com",
            "a..b@example.com",
            ".a@example.com",
            "a@[127.0.0.1]",
            "a@example.com.",
            "\"q\"@example.com",
            "a%b@example.com",
            "a!b@example.com",
            "a@-x.com",
            "a b@example.com",
        ] {
            assert!(check_address(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn server_address_syntax() {
        for good in ["127.0.0.1:25", "mail.example.com:2525", "[::1]:25"] {
            assert!(check_server_address(good).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1",
            "host:0",
            "host:70000",
            "::1:25",
            "[::1:25",
            "bad host:25",
        ] {
            assert!(check_server_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn admin_state_parses() {
        assert_eq!(
            "Restricted".parse::<AdminState>(),
            Ok(AdminState::Restricted)
        );
        assert!("maintenance".parse::<AdminState>().is_err());
    }
}
