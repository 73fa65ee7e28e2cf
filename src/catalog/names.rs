//! The address index: every address key (primary or alias) → its mailbox number,
//! as an immutable finite-state transducer (`fst::Map`) built at a full write,
//! plus a small delta for the merges since.
//!
//! In sled: the fst's bytes in chunks of [`CHUNK`] under `x\0<chunk u32 BE>`, the
//! delta under `y\0<address key>` (value: the entry, or empty for a name removed).
//! In memory ([`Names`]): the fst as one `Vec<u8>` and the delta as a `HashMap`,
//! consulted first. An entry is `number << 1 | alias`.

use anyhow::{anyhow, Context, Result};
use std::collections::HashMap;

/// Bytes of the fst per sled value.
const CHUNK: usize = 1 << 20;

/// Where a name points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) number: u32,
    /// An alias (else the mailbox's primary address).
    pub(super) alias: bool,
}

impl Entry {
    fn pack(self) -> u64 {
        (u64::from(self.number) << 1) | u64::from(self.alias)
    }

    fn unpack(v: u64) -> Entry {
        Entry {
            number: (v >> 1) as u32,
            alias: v & 1 == 1,
        }
    }
}

fn chunk_key(i: u32) -> [u8; 6] {
    let b = i.to_be_bytes();
    [b'x', 0, b[0], b[1], b[2], b[3]]
}

pub(super) fn delta_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + name.len());
    k.extend_from_slice(b"y\0");
    k.extend_from_slice(name.as_bytes());
    k
}

/// Points `name` at `entry` (None: removes it) in a merge's batch.
pub(super) fn put_delta(batch: &mut sled::Batch, name: &str, entry: Option<Entry>) {
    let v = entry.map_or(Vec::new(), |e| e.pack().to_be_bytes().to_vec());
    batch.insert(delta_key(name), v);
}

/// Builds the fst, in memory, from names in strictly ascending order.
pub(super) fn build_fst<'a>(sorted: impl Iterator<Item = (&'a str, Entry)>) -> Result<Vec<u8>> {
    let mut b = fst::MapBuilder::memory();
    for (name, e) in sorted {
        b.insert(name, e.pack())
            .with_context(|| format!("address index: {name:?} out of order or twice"))?;
    }
    Ok(b.into_inner()?)
}

/// Writes a built fst into an empty tree.
pub(super) fn store_fst(tree: &sled::Tree, bytes: &[u8]) -> Result<()> {
    for (i, c) in bytes.chunks(CHUNK).enumerate() {
        tree.insert(chunk_key(i as u32), c)?;
    }
    Ok(())
}

/// The index in memory, as one generation's tree holds it.
pub(super) struct Names {
    fst: std::sync::Arc<fst::Map<Vec<u8>>>,
    delta: HashMap<Box<str>, Option<Entry>>,
}

impl Names {
    pub(super) fn load(tree: &sled::Tree) -> Result<Names> {
        let mut bytes = Vec::new();
        for r in tree.scan_prefix(b"x\0") {
            bytes.extend_from_slice(&r?.1);
        }
        let fst = if bytes.is_empty() {
            fst::Map::default()
        } else {
            fst::Map::new(bytes).map_err(|e| anyhow!("catalog address index broken: {e}"))?
        };
        Ok(Names {
            fst: std::sync::Arc::new(fst),
            delta: load_delta(tree)?,
        })
    }

    /// The same fst with the delta read again from `tree` (after a merge's batch).
    pub(super) fn with_delta(&self, tree: &sled::Tree) -> Result<Names> {
        Ok(Names {
            fst: self.fst.clone(),
            delta: load_delta(tree)?,
        })
    }

    pub(super) fn get(&self, name: &str) -> Option<Entry> {
        if !self.delta.is_empty() {
            if let Some(e) = self.delta.get(name) {
                return *e;
            }
        }
        self.fst.get(name).map(Entry::unpack)
    }

    /// Names in the delta, and in the fst.
    pub(super) fn sizes(&self) -> (usize, usize) {
        (self.delta.len(), self.fst.len())
    }

    /// Every primary address with its mailbox number, in address order.
    pub(super) fn primaries(&self) -> Vec<(String, u32)> {
        use fst::Streamer;
        let mut out = Vec::with_capacity(self.fst.len() / 2);
        let mut s = self.fst.stream();
        while let Some((k, v)) = s.next() {
            let e = Entry::unpack(v);
            if e.alias {
                continue;
            }
            let k = String::from_utf8_lossy(k);
            if !self.delta.contains_key(k.as_ref()) {
                out.push((k.into_owned(), e.number));
            }
        }
        let from_fst = out.len();
        for (k, e) in &self.delta {
            if let Some(e) = e.filter(|e| !e.alias) {
                out.push((k.to_string(), e.number));
            }
        }
        if out.len() > from_fst {
            out.sort_unstable();
        }
        out
    }
}

fn load_delta(tree: &sled::Tree) -> Result<HashMap<Box<str>, Option<Entry>>> {
    let mut delta = HashMap::new();
    for r in tree.scan_prefix(b"y\0") {
        let (k, v) = r?;
        let name = String::from_utf8_lossy(&k[2..]).into();
        let entry = match v.len() {
            0 => None,
            8 => Some(Entry::unpack(u64::from_be_bytes(
                v.as_ref().try_into().unwrap_or([0; 8]),
            ))),
            _ => return Err(anyhow!("catalog address delta broken at {name}")),
        };
        delta.insert(name, entry);
    }
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delta_overrides_the_fst_and_listings_merge_both() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let e = |number, alias| Entry { number, alias };
        let names = [
            ("a@x", e(0, false)),
            ("al@x", e(0, true)),
            ("b@x", e(1, false)),
        ];
        let bytes = build_fst(names.iter().map(|(n, e)| (*n, *e))).unwrap();
        store_fst(&tree, &bytes).unwrap();
        let idx = Names::load(&tree).unwrap();
        assert_eq!(idx.get("al@x"), Some(e(0, true)));
        assert_eq!(idx.get("c@x"), None);
        let mut batch = sled::Batch::default();
        put_delta(&mut batch, "a@x", None);
        put_delta(&mut batch, "c@x", Some(e(2, false)));
        put_delta(&mut batch, "b@x", Some(e(3, false)));
        tree.apply_batch(batch).unwrap();
        let idx = idx.with_delta(&tree).unwrap();
        assert_eq!(idx.get("a@x"), None);
        assert_eq!(idx.get("al@x"), Some(e(0, true)));
        assert_eq!(idx.get("b@x"), Some(e(3, false)));
        assert_eq!(
            idx.primaries(),
            vec![("b@x".to_string(), 3), ("c@x".to_string(), 2)]
        );
        assert_eq!(idx.sizes(), (3, 3));
    }
}
