//! Many routers, one catalog: the local catalog as a replica of an LDAP
//! directory, kept current with RFC 4533 content synchronization (syncrepl,
//! refreshAndPersist).
//!
//! `config` holds `[directory]`; `entry` the catalog's LDAP shape (entry ↔
//! record, LDIF export); `journal` the consumer's local state (entryUUID → record,
//! entries waiting to become valid) and the pure planning of each batch of
//! changes; `consumer` the LDAP connection loop; `status` what
//! `catalog sync-status`, `servers` and the metrics show.

pub mod config;
pub mod consumer;
pub mod entry;
pub mod journal;
pub mod status;
pub mod sync;

pub use config::{refusal, DirectoryConfig};

use crate::catalog::Catalog;
use entry::Record;

/// `catalog export --format ldif --base-dn BASE`: the catalog as directory
/// entries (with the `ou=` containers), for `ldapadd`. `only_mailboxes`: Some(true)
/// writes mailboxes only, Some(false) clusters and servers only.
pub fn write_ldif(
    out: &mut dyn std::io::Write,
    cat: &Catalog,
    base: &str,
    only_mailboxes: Option<bool>,
) -> anyhow::Result<()> {
    out.write_all(entry::containers(base).as_bytes())?;
    if only_mailboxes != Some(true) {
        for c in cat.clusters()? {
            out.write_all(entry::to_ldif(&Record::Cluster(c), base).as_bytes())?;
        }
        for s in cat.servers(None) {
            out.write_all(entry::to_ldif(&Record::Server(s), base).as_bytes())?;
        }
    }
    if only_mailboxes != Some(false) {
        for m in cat.mailboxes(None, None)? {
            out.write_all(entry::to_ldif(&Record::Mailbox(m), base).as_bytes())?;
        }
    }
    Ok(())
}
