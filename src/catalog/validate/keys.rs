//! Validation's index of the input's names (primary addresses and aliases), built
//! by sorting rather than by a map of every key.
//!
//! Before the rows are checked, the key of every name of every row is hashed
//! (64 bits, in a reused buffer) and the hashes sorted: a name whose hash no other
//! name has cannot clash with anything, so only names sharing a hash (duplicates,
//! which a valid input has none of, or a rare collision) go into a map by whole
//! key as the rows are accepted. A million mailboxes: one sort of 2M hashes
//! (32 MB) instead of 2M random probes and inserts into a ~200 MB map of keys.
//! The sorted hashes also answer, for a merge, which row owns a catalog name.

use super::super::files::Row;
use super::super::model::{address_key, push_address_key, LocalPartMatch, Mailbox};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

/// The input's names: every (hash, row), and the accepted owners of shared hashes.
pub(super) struct NameIndex {
    rule: LocalPartMatch,
    hasher: RandomState,
    /// (hash of the key, row) of every name of every row, sorted.
    all: Vec<(u64, u32)>,
    /// The hashes that more than one name has.
    shared: HashSet<u64, BuildHasherDefault<Prehashed>>,
    /// Names with a shared hash, by key → the accepted row owning each.
    owners: HashMap<String, u32>,
    /// Reused to build each key.
    scratch: String,
}

impl NameIndex {
    /// Hashes and sorts the names of all `rows` (before any is checked).
    pub(super) fn build(rows: &[Row<Mailbox>], rule: LocalPartMatch) -> NameIndex {
        let names = rows.iter().map(|r| 1 + r.item.aliases.len()).sum();
        let mut index = NameIndex {
            rule,
            hasher: RandomState::new(),
            all: Vec::with_capacity(names),
            shared: HashSet::default(),
            owners: HashMap::new(),
            scratch: String::new(),
        };
        for (row, r) in rows.iter().enumerate() {
            for name in r.item.names() {
                let h = index.hash(name);
                index.all.push((h, row as u32));
            }
        }
        index.all.sort_unstable();
        for pair in index.all.windows(2) {
            if pair[0].0 == pair[1].0 {
                index.shared.insert(pair[0].0);
            }
        }
        index
    }

    /// The hash of the key of address `name`.
    fn hash(&mut self, name: &str) -> u64 {
        self.scratch.clear();
        push_address_key(&mut self.scratch, name, self.rule);
        self.hasher.hash_one(self.scratch.as_str())
    }

    /// The key of `name` when its hash is shared (it may clash), else None (it
    /// cannot: no other name of the input has its key).
    pub(super) fn shared_key(&mut self, name: &str) -> Option<String> {
        if self.shared.is_empty() {
            return None;
        }
        let h = self.hash(name);
        self.shared
            .contains(&h)
            .then(|| address_key(name, self.rule))
    }

    /// The accepted row owning the name with this shared key, if any.
    pub(super) fn owner(&self, shared_key: &str) -> Option<u32> {
        self.owners.get(shared_key).copied()
    }

    /// Records that the name with this shared key belongs to accepted `row`.
    pub(super) fn insert(&mut self, shared_key: String, row: u32) {
        self.owners.insert(shared_key, row);
    }

    /// The rows having a name whose key hashes as `key` does (to be confirmed
    /// against the rows' names: another key may share the hash).
    pub(super) fn rows_hashing_as(&self, key: &str) -> impl Iterator<Item = u32> + '_ {
        let h = self.hasher.hash_one(address_key(key, self.rule).as_str());
        let from = self.all.partition_point(|&(x, _)| x < h);
        self.all[from..]
            .iter()
            .take_while(move |&&(x, _)| x == h)
            .map(|&(_, row)| row)
    }
}

/// A hasher for keys that are already hashes.
#[derive(Default)]
pub(super) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the keys are u64); fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::files::{Origin, Place};
    use super::*;

    fn row(address: &str, aliases: &[&str]) -> Row<Mailbox> {
        Row {
            item: Mailbox {
                address: address.into(),
                home: "s".into(),
                replicas: vec![],
                aliases: aliases.iter().map(|a| a.to_string()).collect(),
                failover: None,
                home_state: Default::default(),
                replica_states: vec![],
            },
            origin: Origin {
                file: 0,
                place: Place::Line(1),
            },
        }
    }

    /// Only names whose key another name has are shared; the sorted hashes find
    /// the rows of a key in any case.
    #[test]
    fn only_repeated_keys_are_shared() {
        let rows = [
            row("a@x.test", &["b@x.test"]),
            row("c@x.test", &["B@X.test"]),
        ];
        let mut index = NameIndex::build(&rows, LocalPartMatch::CaseInsensitive);
        assert_eq!(index.shared_key("A@x.test"), None);
        assert_eq!(index.shared_key("c@x.test"), None);
        let key = index.shared_key("b@X.TEST").expect("b is named twice");
        assert_eq!(key, "b@x.test");
        assert_eq!(index.owner(&key), None);
        index.insert(key.clone(), 0);
        assert_eq!(index.owner(&key), Some(0));
        assert_eq!(index.rows_hashing_as("c@x.test").collect::<Vec<_>>(), [1]);
        assert_eq!(
            index.rows_hashing_as("b@x.test").collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(index.rows_hashing_as("d@x.test").count(), 0);
        let unique = NameIndex::build(&rows[..1], LocalPartMatch::CaseInsensitive);
        assert!(unique.shared.is_empty());
    }
}
