//! Validation's index of the input's names: every address key (primary or alias)
//! of the mailboxes accepted so far → the row of its mailbox.
//!
//! A key is held as a 64-bit hash, not as a string (a million mailboxes: ~70 MB
//! instead of ~200 MB of keys, and no allocation per name); a hit is confirmed
//! against the names of the row it points to, so a hash collision is never taken
//! for a duplicate: the colliding key goes to a small map of whole keys.

use super::super::model::{address_key, push_address_key, LocalPartMatch, Mailbox};
use std::collections::hash_map::{Entry, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

/// Address keys → row numbers, by hash.
pub(super) struct NameIndex {
    rule: LocalPartMatch,
    hasher: RandomState,
    slots: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    /// Keys whose hash a different key holds in `slots` (a collision: rare).
    spill: HashMap<String, u32>,
    /// Reused to build each key.
    scratch: String,
}

impl NameIndex {
    pub(super) fn new(names: usize, rule: LocalPartMatch) -> NameIndex {
        NameIndex {
            rule,
            hasher: RandomState::new(),
            slots: HashMap::with_capacity_and_hasher(names, Default::default()),
            spill: HashMap::new(),
            scratch: String::new(),
        }
    }

    /// The hash of the key of address `name`.
    pub(super) fn hash(&mut self, name: &str) -> u64 {
        self.scratch.clear();
        push_address_key(&mut self.scratch, name, self.rule);
        self.hasher.hash_one(self.scratch.as_str())
    }

    /// The hash of the key of address `name`, without the reused buffer (for the
    /// few lookups made outside the pass over the rows).
    pub(super) fn hash_once(&self, name: &str) -> u64 {
        self.hasher.hash_one(address_key(name, self.rule).as_str())
    }

    /// The row whose mailbox has a name with the key of `name` (hashed `h`), if
    /// any; `mailbox` gives a row's mailbox.
    pub(super) fn get<'m>(
        &self,
        name: &str,
        h: u64,
        mailbox: impl Fn(u32) -> &'m Mailbox,
    ) -> Option<u32> {
        let &row = self.slots.get(&h)?;
        // A hit: a duplicate (rare in a valid input) or a collision; compare keys.
        let key = address_key(name, self.rule);
        let owns = |m: &Mailbox| m.names().any(|n| address_key(n, self.rule) == key);
        if owns(mailbox(row)) {
            return Some(row);
        }
        self.spill.get(&key).copied()
    }

    /// Records that `name` (hashed `h`, not yet in the index) belongs to `row`.
    pub(super) fn insert(&mut self, name: &str, h: u64, row: u32) {
        match self.slots.entry(h) {
            Entry::Vacant(e) => {
                e.insert(row);
            }
            Entry::Occupied(_) => {
                self.spill.insert(address_key(name, self.rule), row);
            }
        }
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
    use super::*;

    fn mailbox(address: &str, aliases: &[&str]) -> Mailbox {
        Mailbox {
            address: address.into(),
            home: "s".into(),
            replicas: vec![],
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            failover: None,
            home_state: Default::default(),
            replica_states: vec![],
        }
    }

    /// Two different keys with the same hash (forced here) are both found, each at
    /// its own row; a key never inserted is not found.
    #[test]
    fn a_collision_is_told_apart_from_a_duplicate() {
        let rows = [mailbox("a@x.test", &["b@x.test"]), mailbox("c@x.test", &[])];
        let mut index = NameIndex::new(4, LocalPartMatch::CaseInsensitive);
        let h = index.hash("a@x.test");
        index.insert("a@x.test", h, 0);
        let hb = index.hash("b@x.test");
        index.insert("b@x.test", hb, 0);
        // c@x.test stored under a's hash: a collision.
        index.insert("c@x.test", h, 1);
        let at = |i: u32| &rows[i as usize];
        assert_eq!(index.get("A@X.test", h, at), Some(0));
        assert_eq!(index.get("C@x.TEST", h, at), Some(1));
        assert_eq!(index.get("d@x.test", h, at), None);
        assert_eq!(index.hash("B@x.test"), hb, "keys fold case");
        assert_eq!(index.get("B@x.test", hb, at), Some(0));
        let hd = index.hash("d@x.test");
        assert_eq!(index.get("d@x.test", hd, at), None);
    }
}
