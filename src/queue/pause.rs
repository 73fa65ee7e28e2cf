//! Servers paused by an administrator (`clustermail servers pause NAME`): no
//! delivery goes to a paused server, and mail for it waits in the queue in state
//! `paused` — no failover, the administrator chose to wait (`out-of-service` in
//! the catalog is the way to fail over). Kept in the store (tree `paused`, keyed
//! by the lower-cased server name), so a pause survives restarts.

use anyhow::Result;

/// The paused servers. Clones share the store.
#[derive(Clone)]
pub struct Pauses {
    tree: sled::Tree,
}

fn key(server: &str) -> Vec<u8> {
    server.to_lowercase().into_bytes()
}

impl Pauses {
    pub fn open(db: &sled::Db) -> Result<Pauses> {
        Ok(Pauses {
            tree: db.open_tree("paused")?,
        })
    }

    /// Pauses `server` (not yet durable: the caller flushes); whether it was running.
    pub fn pause(&self, server: &str) -> Result<bool> {
        Ok(self.tree.insert(key(server), server.as_bytes())?.is_none())
    }

    /// Resumes `server` (not yet durable: the caller flushes); whether it was paused.
    pub fn resume(&self, server: &str) -> Result<bool> {
        Ok(self.tree.remove(key(server))?.is_some())
    }

    pub fn is_paused(&self, server: &str) -> bool {
        // A store that cannot be read counts as not paused: mail flows, as before
        // any pause (the error is logged).
        self.tree.contains_key(key(server)).unwrap_or_else(|e| {
            tracing::error!(%server, error = %e, "cannot read the paused servers");
            false
        })
    }

    /// Every paused server, as named when paused.
    pub fn list(&self) -> Result<Vec<String>> {
        self.tree
            .iter()
            .values()
            .map(|v| Ok(String::from_utf8_lossy(&v?).into_owned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_found_whatever_the_case_and_lifted_by_resume() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let p = Pauses::open(&db).unwrap();
        assert!(p.pause("Mail-1").unwrap());
        assert!(!p.pause("mail-1").unwrap(), "already paused");
        assert!(p.is_paused("MAIL-1"));
        assert!(!p.is_paused("mail-2"));
        assert_eq!(p.list().unwrap(), vec!["mail-1".to_string()]);
        assert!(p.resume("mail-1").unwrap());
        assert!(!p.resume("mail-1").unwrap());
        assert!(!p.is_paused("mail-1"));
    }
}
