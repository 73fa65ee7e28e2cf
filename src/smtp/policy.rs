//! The relay policy backed by the replica catalog: no open relay.
//!
//! A recipient is accepted only when it is an address or alias of a catalog
//! mailbox. Any other address of a domain the catalog serves is an unknown user
//! (550 5.1.1); any other domain is relaying denied (550 5.7.1). Relay tricks
//! (`%`, `!`, quoted local parts, address literals) are denied before the catalog is
//! asked, since a downstream server could route on them.
//!
//! What is matched is what is delivered: the address as the client wrote it is
//! queued and relayed, so it must equal one of the mailbox's addresses under the
//! documented rule alone: the domain and, with `local_part_match =
//! "case-insensitive"`, the local part compare ASCII letters without regard to
//! case; every other character must be the same. The catalog index folds case more
//! widely (Unicode lowercase: the Kelvin sign `K` finds `k`), so its answer is
//! checked against that rule before it is believed.

use super::address::Mailbox;
use super::session::{RecipientPolicy, Verdict};
use crate::catalog::{Catalog, LocalPartMatch};
use std::sync::Arc;

pub struct CatalogPolicy {
    pub catalog: Arc<Catalog>,
}

impl RecipientPolicy for CatalogPolicy {
    fn check(&self, rcpt: &Mailbox) -> Verdict {
        if let Some(trick) = rcpt.relay_trick() {
            return Verdict::RelayDenied(trick);
        }
        match self.catalog.lookup(&rcpt.to_string()) {
            Ok(Some(found))
                if found
                    .mailbox
                    .names()
                    .any(|n| same_address(n, rcpt, self.catalog.rule())) =>
            {
                Verdict::Accept(found.mailbox.address)
            }
            Ok(Some(_)) => Verdict::UnknownUser,
            Ok(None) => match self.catalog.serves_domain(&rcpt.domain) {
                Ok(true) => Verdict::UnknownUser,
                Ok(false) => Verdict::RelayDenied("this relay serves no such domain"),
                Err(e) => {
                    tracing::error!(error = %e, "catalog domain lookup failed");
                    Verdict::TempFail
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "catalog lookup failed");
                Verdict::TempFail
            }
        }
    }
}

/// `catalog` (a catalog address) and `rcpt` are the same address under `rule`.
fn same_address(catalog: &str, rcpt: &Mailbox, rule: LocalPartMatch) -> bool {
    let Some((local, domain)) = catalog.rsplit_once('@') else {
        return false;
    };
    let local_same = match rule {
        LocalPartMatch::CaseInsensitive => local.eq_ignore_ascii_case(&rcpt.local),
        LocalPartMatch::Exact => local == rcpt.local,
    };
    local_same && domain.eq_ignore_ascii_case(&rcpt.domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
            quoted: false,
            literal: false,
        }
    }

    #[test]
    fn only_the_documented_case_rule_matches() {
        let ci = LocalPartMatch::CaseInsensitive;
        assert!(same_address(
            "Alice@East.example.com",
            &mb("aLICE", "east.EXAMPLE.com"),
            ci
        ));
        assert!(!same_address(
            "alice@east.example.com",
            &mb("ALICE", "east.example.com"),
            LocalPartMatch::Exact
        ));
        assert!(same_address(
            "ALICE@east.example.com",
            &mb("ALICE", "EAST.example.com"),
            LocalPartMatch::Exact
        ));
        // Unicode folding is not the rule: the Kelvin sign is not "k".
        assert!(!same_address(
            "frank@x.test",
            &mb("fran\u{212a}", "x.test"),
            ci
        ));
        assert!(!same_address("jörg@x.test", &mb("JÖRG", "x.test"), ci));
        assert!(same_address("jörg@x.test", &mb("JöRG", "x.test"), ci));
        assert!(!same_address(
            "alice@x.test",
            &mb("alice", "x.test.evil"),
            ci
        ));
    }
}
