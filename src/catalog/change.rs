//! TEMPORARY contract stub for the directory consumer, replaced by the catalog
//! branch's `change.rs` (issue 16) when it is merged: the types of the
//! record-at-a-time catalog API; the methods refuse until then.

use super::model::{Cluster, Mailbox, Server};
use super::store::Catalog;

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    PutCluster(Cluster),
    RemoveCluster(String),
    PutServer(Server),
    RemoveServer(String),
    PutMailbox(Mailbox),
    RemoveMailbox(String),
}

#[derive(Debug, Clone)]
pub struct Rejected {
    pub index: usize,
    pub change: Change,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub applied: usize,
    pub rejected: Vec<Rejected>,
}

impl Catalog {
    pub fn apply(&self, _c: Vec<Change>, _m: &[(&str, &[u8])]) -> anyhow::Result<ApplyReport> {
        anyhow::bail!("Catalog::apply comes with the catalog branch")
    }
    pub fn replace_all(
        &self,
        _c: Vec<Change>,
        _m: &[(&str, &[u8])],
    ) -> anyhow::Result<ApplyReport> {
        anyhow::bail!("Catalog::replace_all comes with the catalog branch")
    }
    pub fn sync_meta(&self, _k: &str) -> anyhow::Result<Option<Vec<u8>>> {
        anyhow::bail!("Catalog::sync_meta comes with the catalog branch")
    }
}
