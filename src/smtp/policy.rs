//! The relay policy backed by the replica catalog: no open relay.
//!
//! A recipient is accepted only when it is an address or alias of a catalog
//! mailbox. Any other address of a domain the catalog serves is an unknown user
//! (550 5.1.1); any other domain is relaying denied (550 5.7.1). Relay tricks
//! (`%`, `!`, quoted local parts, address literals) are denied before the catalog is
//! asked, since a downstream server could route on them.

use super::address::Mailbox;
use super::session::{RecipientPolicy, Verdict};
use crate::catalog::Catalog;
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
            Ok(Some(found)) => Verdict::Accept(found.mailbox.address),
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
