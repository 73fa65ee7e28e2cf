//! Name resolution for outbound delivery, with one shared resolver (and its
//! cache): the addresses of a `host:port` (every one, in the resolver's order), and
//! where mail outside the catalog goes (bounces to outside senders): a configured
//! relay host, else the domain's MX hosts by preference, else the domain itself
//! (RFC 5321 §5.1). The decision over lookup results is pure ([`mx_decision`]).

use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

/// MX hosts tried per attempt, and addresses tried per host (Postfix tries five
/// addresses in all): a domain listing fifty MX hosts of sixteen unreachable
/// addresses each would otherwise hold a delivery slot for hours.
pub const MAX_MX_HOSTS: usize = 5;
pub const MAX_ADDRESSES: usize = 5;

/// The answer to one DNS question, as far as routing cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<T> {
    Records(Vec<T>),
    /// The name exists but has no such records.
    NoRecords,
    /// NXDOMAIN: the name does not exist.
    NoDomain,
    /// The lookup failed (timeout, SERVFAIL, no resolver): try again later.
    Failed(String),
}

/// Where mail for a domain goes, or why it cannot go now or ever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destinations {
    /// `host:25` in preference order: try each (and each of its addresses).
    Hosts(Vec<String>),
    /// Temporary: keep the mail and try again later.
    Defer(String),
    /// Permanent: the recipient fails (the reply for the DSN).
    Fail(String),
}

/// The decision over the MX lookup of `domain`.
pub fn mx_decision(domain: &str, mx: Found<(u16, String)>) -> Destinations {
    match mx {
        Found::Records(mut records) => {
            if records.len() == 1 && matches!(records[0].1.as_str(), "" | ".") {
                return Destinations::Fail(format!(
                    "556 5.1.10 {domain} accepts no mail (null MX)"
                ));
            }
            records.retain(|(_, h)| !matches!(h.as_str(), "" | "."));
            records.sort_by_key(|(preference, _)| *preference);
            let mut hosts: Vec<String> = Vec::with_capacity(records.len());
            for (_, h) in records {
                let h = format!("{}:25", h.trim_end_matches('.'));
                if !hosts.contains(&h) {
                    hosts.push(h);
                }
            }
            hosts.truncate(MAX_MX_HOSTS);
            Destinations::Hosts(hosts)
        }
        // No MX: the domain itself (implicit MX).
        Found::NoRecords => Destinations::Hosts(vec![format!("{domain}:25")]),
        Found::NoDomain => Destinations::Fail(format!("550 5.1.2 {domain}: no such domain")),
        Found::Failed(why) => {
            Destinations::Defer(format!("451 4.4.3 MX lookup for {domain} failed: {why}"))
        }
    }
}

fn resolver() -> Result<&'static TokioResolver, String> {
    static RESOLVER: OnceLock<Result<TokioResolver, String>> = OnceLock::new();
    RESOLVER
        .get_or_init(|| {
            TokioResolver::builder_tokio()
                .and_then(|b| b.build())
                .map_err(|e| format!("resolver: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Where mail for `domain` goes: the relay host when configured, else by MX.
pub async fn destinations(domain: &str, relay: Option<&str>) -> Destinations {
    if let Some(r) = relay {
        return Destinations::Hosts(vec![r.to_string()]);
    }
    let found = match resolver() {
        Err(why) => Found::Failed(why),
        Ok(res) => match res.lookup(domain, RecordType::MX).await {
            Ok(lookup) => Found::Records(
                lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((m.preference, m.exchange.to_utf8())),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(e) if e.is_nx_domain() => Found::NoDomain,
            Err(e) if e.is_no_records_found() => Found::NoRecords,
            Err(e) => Found::Failed(e.to_string()),
        },
    };
    mx_decision(domain, found)
}

/// The addresses of `host:port` (an IP, `[IPv6]`, or a DNS name), at most
/// [`MAX_ADDRESSES`], in the resolver's order.
pub async fn addresses(address: &str) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address}: not host:port"))?;
    let port: u16 = port.parse().map_err(|_| format!("{address}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let ips = resolver()?
        .lookup_ip(host)
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    let all: Vec<SocketAddr> = ips
        .iter()
        .take(MAX_ADDRESSES)
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    if all.is_empty() {
        return Err(format!("{host}: no address"));
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Destinations::{Defer, Fail, Hosts};

    #[test]
    fn mx_hosts_in_preference_order_every_one() {
        let mx = Found::Records(vec![
            (20, "b.example.".into()),
            (10, "a.example.".into()),
            (20, "c.example.".into()),
            (10, "a.example.".into()),
        ]);
        assert_eq!(
            mx_decision("x.example", mx),
            Hosts(vec![
                "a.example:25".into(),
                "b.example:25".into(),
                "c.example:25".into()
            ])
        );
    }

    #[test]
    fn at_most_five_mx_hosts_the_most_preferred() {
        let mx = Found::Records(
            (0..50u16)
                .rev()
                .map(|i| (i, format!("h{i}.example.")))
                .collect(),
        );
        let Hosts(hosts) = mx_decision("x.example", mx) else {
            panic!("hosts expected");
        };
        assert_eq!(
            hosts,
            (0..5)
                .map(|i| format!("h{i}.example:25"))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_failed_lookup_defers_it_is_not_no_mx() {
        let d = mx_decision("x.example", Found::Failed("SERVFAIL".into()));
        assert!(matches!(&d, Defer(why) if why.contains("4.4.3")), "{d:?}");
        assert_eq!(
            mx_decision("x.example", Found::NoRecords),
            Hosts(vec!["x.example:25".into()]),
            "no MX: the domain itself"
        );
        assert!(matches!(mx_decision("x.example", Found::NoDomain), Fail(_)));
        assert!(matches!(
            mx_decision("x.example", Found::Records(vec![(0, ".".into())])),
            Fail(why) if why.contains("5.1.10")
        ));
    }

    #[tokio::test]
    async fn every_address_of_a_literal_and_a_bad_port() {
        assert_eq!(
            addresses("[::1]:25").await.unwrap(),
            vec!["[::1]:25".parse::<SocketAddr>().unwrap()]
        );
        assert!(addresses("127.0.0.1").await.is_err());
        assert!(addresses("127.0.0.1:x").await.is_err());
    }
}
