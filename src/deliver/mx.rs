//! Destinations outside the catalog (bounces to outside senders): a configured
//! relay host, else the domain's MX hosts by preference, else its address (RFC
//! 5321 §5.1), resolved with hickory-resolver.

use hickory_resolver::proto::rr::{RData, RecordType};

/// `host:port` candidates for `domain`, best first.
pub async fn destinations(domain: &str, relay: Option<&str>) -> Result<Vec<String>, String> {
    if let Some(r) = relay {
        return Ok(vec![r.to_string()]);
    }
    let resolver = hickory_resolver::TokioResolver::builder_tokio()
        .map_err(|e| format!("resolver: {e}"))?
        .build()
        .map_err(|e| format!("resolver: {e}"))?;
    let mut mx: Vec<(u16, String)> = match resolver.lookup(domain, RecordType::MX).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(m) => Some((
                    m.preference,
                    m.exchange.to_utf8().trim_end_matches('.').to_string(),
                )),
                _ => None,
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    mx.sort();
    if mx.is_empty() {
        // No MX: the domain itself (implicit MX).
        return Ok(vec![format!("{domain}:25")]);
    }
    if mx.len() == 1 && mx[0].1.is_empty() {
        return Err(format!("{domain} accepts no mail (null MX)"));
    }
    Ok(mx.into_iter().map(|(_, h)| format!("{h}:25")).collect())
}
