//! How catalog records and keys are encoded in sled: bincode records, `prefix\0part`
//! keys, and the small helpers every catalog module shares.

use super::model::LocalPartMatch;
use anyhow::Result;

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub(super) fn encode<T: serde::Serialize + ?Sized>(v: &T) -> Result<Vec<u8>> {
    Ok(bincode::serde::encode_to_vec(v, bincode_config())?)
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    Ok(bincode::serde::decode_from_slice(bytes, bincode_config())?.0)
}

pub(super) fn key(prefix: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.push(prefix);
    for p in parts {
        k.push(0);
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// Where a caller's sync metadata (e.g. a directory's sync cookie) is kept: in the
/// catalog tree itself, so it is written in the same batch or shadow tree as the
/// changes it describes.
pub(super) fn meta_key(key: &str) -> Vec<u8> {
    let mut k = b"~meta\0".to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

pub(super) fn rule_tag(rule: LocalPartMatch) -> &'static [u8] {
    match rule {
        LocalPartMatch::CaseInsensitive => b"case-insensitive",
        LocalPartMatch::Exact => b"exact",
    }
}

pub(super) fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// A big-endian u64 stored under `key` (None: absent, unreadable or not 8 octets).
pub fn read_u64(tree: &sled::Tree, key: &[u8]) -> Option<u64> {
    tree.get(key)
        .ok()
        .flatten()
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
}
