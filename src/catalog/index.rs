//! The server index (server → mailboxes homed or replicated there), stored as
//! chunked posting lists so that a million mailboxes cost thousands of keys, not
//! millions.
//!
//! Each server's list of `(address key, role)` is sorted and cut into chunks of at
//! most [`MAX_CHUNK`] postings. A chunk's key is `h\0<server>\0<start>`: the first
//! chunk of a server starts at the empty address, every other at the first address
//! it held when it was cut. So the chunk for an address is always the last chunk
//! key at or before `h\0<server>\0<address>`: one range read.

use super::codec::{decode, encode};
use anyhow::Result;
use std::collections::BTreeMap;

/// Home or replica.
pub const HOME: u8 = b'H';
pub const REPLICA: u8 = b'R';

/// Postings per chunk when a list is written whole; a chunk that grows past
/// `2 * CHUNK` by edits is split in two.
const CHUNK: usize = 256;
const MAX_CHUNK: usize = 2 * CHUNK;

pub type Posting = (String, u8);

fn chunk_key(server: &str, start: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + server.len() + start.len());
    k.push(b'h');
    k.push(0);
    k.extend_from_slice(server.as_bytes());
    k.push(0);
    k.extend_from_slice(start.as_bytes());
    k
}

/// Writes whole posting lists, sorted by (server, address), into an empty tree.
/// (A chunk of borrowed `(&str, u8)` encodes as the `Vec<Posting>` it is read as.)
pub fn fill<'a>(
    tree: &sled::Tree,
    sorted: impl Iterator<Item = (&'a str, &'a str, u8)>,
) -> Result<()> {
    let mut server: Option<&str> = None;
    let mut chunk: Vec<(&'a str, u8)> = Vec::with_capacity(CHUNK);
    let mut start = "";
    let flush = |server: &str, start: &str, chunk: &mut Vec<(&'a str, u8)>| -> Result<()> {
        if !chunk.is_empty() {
            tree.insert(chunk_key(server, start), encode(&*chunk)?)?;
            chunk.clear();
        }
        Ok(())
    };
    for (s, addr, role) in sorted {
        if server != Some(s) {
            if let Some(prev) = server {
                flush(prev, start, &mut chunk)?;
            }
            server = Some(s);
            start = "";
        } else if chunk.len() == CHUNK {
            flush(s, start, &mut chunk)?;
            start = addr;
        }
        chunk.push((addr, role));
    }
    if let Some(s) = server {
        flush(s, start, &mut chunk)?;
    }
    Ok(())
}

/// Every posting of one server, in address order.
pub fn postings(tree: &sled::Tree, server: &str) -> Result<Vec<Posting>> {
    let mut out = Vec::new();
    for r in tree.scan_prefix(chunk_key(server, "")) {
        let (_, v) = r?;
        out.extend(decode::<Vec<Posting>>(&v)?);
    }
    Ok(out)
}

/// Edits to posting lists, gathered in memory and written as part of one batch.
pub struct Edit<'a> {
    tree: &'a sled::Tree,
    /// Every chunk touched, by key: its new content (empty: to be removed).
    chunks: BTreeMap<Vec<u8>, Vec<Posting>>,
}

impl<'a> Edit<'a> {
    pub fn new(tree: &'a sled::Tree) -> Edit<'a> {
        Edit {
            tree,
            chunks: BTreeMap::new(),
        }
    }

    /// The key of the chunk that holds (or would hold) `addr`, loaded into memory.
    fn chunk_for(&mut self, server: &str, addr: &str) -> Result<Vec<u8>> {
        let first = chunk_key(server, "");
        let probe = chunk_key(server, addr);
        let on_disk = self
            .tree
            .range(first.clone()..=probe.clone())
            .next_back()
            .transpose()?
            .map(|(k, _)| k.to_vec());
        let in_memory = self
            .chunks
            .range(first.clone()..=probe)
            .next_back()
            .map(|(k, _)| k.clone());
        let k = on_disk.max(in_memory).unwrap_or(first);
        if !self.chunks.contains_key(&k) {
            let content = match self.tree.get(&k)? {
                Some(v) => decode(&v)?,
                None => Vec::new(),
            };
            self.chunks.insert(k.clone(), content);
        }
        Ok(k)
    }

    pub fn add(&mut self, server: &str, addr: &str, role: u8) -> Result<()> {
        let k = self.chunk_for(server, addr)?;
        let Some(chunk) = self.chunks.get_mut(&k) else {
            return Ok(());
        };
        match chunk.binary_search_by(|(a, _)| a.as_str().cmp(addr)) {
            Ok(i) => chunk[i].1 = role,
            Err(i) => chunk.insert(i, (addr.to_string(), role)),
        }
        if chunk.len() > MAX_CHUNK {
            let tail = chunk.split_off(CHUNK);
            let tail_key = chunk_key(server, &tail[0].0);
            self.chunks.insert(tail_key, tail);
        }
        Ok(())
    }

    pub fn remove(&mut self, server: &str, addr: &str) -> Result<()> {
        let k = self.chunk_for(server, addr)?;
        if let Some(chunk) = self.chunks.get_mut(&k) {
            if let Ok(i) = chunk.binary_search_by(|(a, _)| a.as_str().cmp(addr)) {
                chunk.remove(i);
            }
        }
        Ok(())
    }

    /// Puts every touched chunk into `batch`: rewritten, or removed when empty.
    /// Returns how many chunks that is.
    pub fn write(self, batch: &mut sled::Batch) -> Result<usize> {
        let touched = self.chunks.len();
        for (k, chunk) in self.chunks {
            if chunk.is_empty() {
                batch.remove(k);
            } else {
                batch.insert(k, encode(&chunk)?);
            }
        }
        Ok(touched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(tree: &sled::Tree, server: &str) -> Vec<String> {
        postings(tree, server)
            .unwrap()
            .into_iter()
            .map(|(a, _)| a)
            .collect()
    }

    #[test]
    fn edits_keep_lists_sorted_and_split_big_chunks() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let addrs: Vec<String> = (0..1000).map(|i| format!("u{i:04}@x")).collect();
        // Whole lists for two servers.
        let sorted = addrs
            .iter()
            .map(|a| ("s1", a.as_str(), HOME))
            .chain(addrs[..10].iter().map(|a| ("s2", a.as_str(), REPLICA)));
        fill(&tree, sorted).unwrap();
        assert_eq!(all(&tree, "s1"), addrs);
        assert_eq!(all(&tree, "s2").len(), 10);
        assert!(all(&tree, "s").is_empty(), "prefix of another server name");
        // Edits: below the first address, in the middle, past the end; removals.
        let mut edit = Edit::new(&tree);
        edit.add("s1", "a@x", REPLICA).unwrap();
        edit.add("s1", "u0500a@x", HOME).unwrap();
        edit.add("s1", "zz@x", HOME).unwrap();
        edit.remove("s1", "u0001@x").unwrap();
        edit.remove("s1", "nobody@x").unwrap();
        for i in 0..600 {
            edit.add("s3", &format!("v{i:04}@x"), HOME).unwrap();
        }
        for a in &addrs[..10] {
            edit.remove("s2", a).unwrap();
        }
        let mut batch = sled::Batch::default();
        edit.write(&mut batch).unwrap();
        tree.apply_batch(batch).unwrap();
        let mut want: Vec<String> = addrs.iter().filter(|a| *a != "u0001@x").cloned().collect();
        want.extend([
            "a@x".to_string(),
            "u0500a@x".to_string(),
            "zz@x".to_string(),
        ]);
        want.sort();
        assert_eq!(all(&tree, "s1"), want);
        assert!(all(&tree, "s2").is_empty());
        assert_eq!(
            tree.scan_prefix(chunk_key("s2", "")).count(),
            0,
            "empty chunks are removed"
        );
        let s3 = all(&tree, "s3");
        assert_eq!(s3.len(), 600);
        assert!(s3.windows(2).all(|w| w[0] < w[1]));
        assert!(
            tree.scan_prefix(chunk_key("s3", "")).count() >= 2,
            "600 postings were split"
        );
    }
}
