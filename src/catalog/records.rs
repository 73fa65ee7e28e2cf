//! Mailbox records stored in blocks: many records per sled value, addressed by a
//! dense mailbox number, so a million mailboxes cost thousands of keys.
//!
//! Block `b` holds mailbox numbers `b * PER_BLOCK ..`: its key is `b\0<b u32 BE>`,
//! its value a count, an offset table and the bincode records one after another,
//! so reading one mailbox decodes one record, not the block. Numbers are handed out
//! in order (`~next` holds the next one); a record is never rewritten in place: a
//! merge writes the changed record at a fresh number and points its names there
//! (see `names.rs`), leaving the old one as garbage until the next full rebuild.

use super::codec::{decode, encode};
use super::model::Mailbox;
use anyhow::{anyhow, Result};

/// Records per block.
pub(super) const PER_BLOCK: u32 = 256;
/// The next free mailbox number (u32 BE); absent: 0.
const NEXT_KEY: &[u8] = b"~next";

fn block_key(block: u32) -> [u8; 6] {
    let b = block.to_be_bytes();
    [b'b', 0, b[0], b[1], b[2], b[3]]
}

/// A block's value: `count` (u32 LE), `count + 1` offsets (u32 LE, from the start
/// of the data), then the records.
fn encode_block(records: &[Vec<u8>]) -> Vec<u8> {
    let data: usize = records.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(4 + 4 * (records.len() + 1) + data);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    let mut off = 0u32;
    out.extend_from_slice(&off.to_le_bytes());
    for r in records {
        off += r.len() as u32;
        out.extend_from_slice(&off.to_le_bytes());
    }
    for r in records {
        out.extend_from_slice(r);
    }
    out
}

fn le_u32(b: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes) as usize)
}

fn block_len(block: &[u8]) -> Result<usize> {
    le_u32(block, 0).ok_or_else(|| anyhow!("catalog record block truncated"))
}

/// The encoded record in slot `i` of a block.
fn slot(block: &[u8], i: usize) -> Result<&[u8]> {
    let broken = || anyhow!("catalog record block broken at slot {i}");
    let count = block_len(block)?;
    if i >= count {
        return Err(broken());
    }
    let data = 4 + 4 * (count + 1);
    let (start, end) = (
        le_u32(block, 4 + 4 * i).ok_or_else(broken)?,
        le_u32(block, 8 + 4 * i).ok_or_else(broken)?,
    );
    block.get(data + start..data + end).ok_or_else(broken)
}

/// The next free mailbox number of `tree`.
pub(super) fn next(tree: &sled::Tree) -> Result<u32> {
    Ok(match tree.get(NEXT_KEY)? {
        Some(v) => u32::from_be_bytes(
            v.as_ref()
                .try_into()
                .map_err(|_| anyhow!("corrupt {}", String::from_utf8_lossy(NEXT_KEY)))?,
        ),
        None => 0,
    })
}

/// Every record block of a tree, in memory (copied out of sled's pages): a
/// lookup decodes one record without a sled read.
pub(super) struct Blocks(Vec<std::sync::Arc<[u8]>>);

impl Blocks {
    pub(super) fn load(tree: &sled::Tree) -> Result<Blocks> {
        Blocks(Vec::new()).reload_tail(tree)
    }

    /// These blocks with the last one and any after it read again from `tree`
    /// (after a merge's batch: records are only appended, so the blocks before
    /// the last are as they were).
    pub(super) fn reload_tail(&self, tree: &sled::Tree) -> Result<Blocks> {
        let keep = self.0.len().saturating_sub(1);
        let mut blocks: Vec<std::sync::Arc<[u8]>> = self.0[..keep].to_vec();
        for r in tree.range(block_key(keep as u32)..block_key(u32::MAX)) {
            let (k, v) = r?;
            if k.as_ref() != block_key(blocks.len() as u32) {
                return Err(anyhow!(
                    "catalog record blocks broken near block {}",
                    blocks.len()
                ));
            }
            blocks.push(v.as_ref().into());
        }
        Ok(Blocks(blocks))
    }

    pub(super) fn get(&self, number: u32) -> Result<Mailbox> {
        let block = self
            .0
            .get((number / PER_BLOCK) as usize)
            .ok_or_else(|| anyhow!("catalog broken: record block of mailbox {number} missing"))?;
        decode(slot(block, (number % PER_BLOCK) as usize)?)
    }
}

/// Writes `mailboxes` into an empty tree as numbers `0..`, in order.
pub(super) fn write_all<'a>(
    tree: &sled::Tree,
    mailboxes: impl Iterator<Item = &'a Mailbox>,
) -> Result<u32> {
    let mut block = Vec::with_capacity(PER_BLOCK as usize);
    let mut n = 0u32;
    for m in mailboxes {
        block.push(encode(m)?);
        n += 1;
        if n.is_multiple_of(PER_BLOCK) {
            tree.insert(block_key(n / PER_BLOCK - 1), encode_block(&block))?;
            block.clear();
        }
    }
    if !block.is_empty() {
        tree.insert(block_key(n / PER_BLOCK), encode_block(&block))?;
    }
    tree.insert(NEXT_KEY, &n.to_be_bytes())?;
    Ok(n)
}

/// Appends records at fresh numbers, for one batch: the partly filled last block
/// is read and rewritten with the new records after the old.
pub(super) struct Appender {
    next: u32,
    /// The records of the block `next` falls in, old and new.
    tail: Vec<Vec<u8>>,
    /// Full blocks made by this appender, to write.
    full: Vec<(u32, Vec<u8>)>,
    added: bool,
}

impl Appender {
    pub(super) fn new(tree: &sled::Tree) -> Result<Appender> {
        let next = next(tree)?;
        let mut tail = Vec::new();
        if next % PER_BLOCK != 0 {
            if let Some(v) = tree.get(block_key(next / PER_BLOCK))? {
                for i in 0..block_len(&v)?.min((next % PER_BLOCK) as usize) {
                    tail.push(slot(&v, i)?.to_vec());
                }
            }
        }
        Ok(Appender {
            next,
            tail,
            full: Vec::new(),
            added: false,
        })
    }

    /// Adds a record; returns its number.
    pub(super) fn push(&mut self, m: &Mailbox) -> Result<u32> {
        let n = self.next;
        self.tail.push(encode(m)?);
        self.next += 1;
        self.added = true;
        if self.next.is_multiple_of(PER_BLOCK) {
            self.full
                .push((n / PER_BLOCK, encode_block(&std::mem::take(&mut self.tail))));
        }
        Ok(n)
    }

    /// Puts the new blocks and the next number into `batch`; returns how many keys.
    pub(super) fn write(self, batch: &mut sled::Batch) -> usize {
        if !self.added {
            return 0;
        }
        let mut keys = 1 + self.full.len();
        for (b, v) in self.full {
            batch.insert(&block_key(b), v);
        }
        if !self.tail.is_empty() {
            batch.insert(&block_key(self.next / PER_BLOCK), encode_block(&self.tail));
            keys += 1;
        }
        batch.insert(NEXT_KEY, &self.next.to_be_bytes());
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(i: u32) -> Mailbox {
        Mailbox {
            address: format!("u{i}@d.test"),
            home: "a".into(),
            replicas: vec![],
            aliases: vec![format!("al{i}@d.test")],
            failover: None,
            home_state: Default::default(),
            replica_states: vec![],
        }
    }

    #[test]
    fn records_are_read_back_by_number_across_blocks_and_appends() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let first: Vec<Mailbox> = (0..300).map(mailbox).collect();
        assert_eq!(write_all(&tree, first.iter()).unwrap(), 300);
        let blocks = Blocks::load(&tree).unwrap();
        assert_eq!(blocks.get(0).unwrap(), first[0]);
        assert_eq!(blocks.get(299).unwrap(), first[299]);
        // Appends fill the tail block, then start new ones.
        let mut app = Appender::new(&tree).unwrap();
        for i in 300..800 {
            assert_eq!(app.push(&mailbox(i)).unwrap(), i);
        }
        let mut batch = sled::Batch::default();
        app.write(&mut batch);
        tree.apply_batch(batch).unwrap();
        assert_eq!(next(&tree).unwrap(), 800);
        let blocks = blocks.reload_tail(&tree).unwrap();
        for i in 0..800 {
            assert_eq!(blocks.get(i).unwrap(), mailbox(i));
        }
        assert!(blocks.get(800).is_err(), "past the end");
        assert_eq!(Blocks::load(&tree).unwrap().0, blocks.0);
    }
}
