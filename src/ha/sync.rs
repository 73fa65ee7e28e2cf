//! Catalog sync between the units, with versions comparable across them.
//!
//! A catalog version is (master epoch, serial, writer): the epoch of the unit
//! when the catalog was written there, that unit's catalog serial at the time,
//! and which unit it was. A copy keeps the version of the catalog it copied.
//! Epochs only grow with each takeover, so a catalog written under a later
//! epoch is newer, whatever either unit's serial says (serials of different units
//! are unrelated counters: within one epoch, versions of two writers are only
//! *different*, neither is newer). Rules ([`super::Ha::tick`]):
//! - a unit that is not MASTER takes the peer's catalog whenever it is newer,
//!   before its mode is decided: a unit that returns to MASTER (e.g. the primary
//!   with `on_failure = "restore"`) has the newer catalog first;
//! - a SLAVE copies the MASTER's catalog whenever the versions differ.

use super::link::{Link, Msg};
use super::Ha;
use crate::catalog::files;
use crate::catalog::Mode as ImportMode;
use crate::config::HaRole;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogVersion {
    pub epoch: u64,
    pub serial: u64,
    pub writer: HaRole,
}

impl CatalogVersion {
    /// Written under a later master epoch than `other`.
    pub fn newer_than(&self, other: &CatalogVersion) -> bool {
        self.epoch > other.epoch
    }
}

impl fmt::Display for CatalogVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = super::status::role_name(self.writer);
        write!(f, "{}.{} ({w})", self.epoch, self.serial)
    }
}

/// In the HA meta tree: the version (epoch, serial) and the local catalog serial
/// it was recorded at; a different local serial means a local write since.
const VERSION: &[u8] = b"ha.catalog_version";

fn read(meta: &sled::Tree) -> Option<(CatalogVersion, u64)> {
    let v = meta.get(VERSION).ok()??;
    let n = |i: usize| -> Option<u64> {
        Some(u64::from_be_bytes(
            v.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    let writer = match v.get(24)? {
        0 => HaRole::Primary,
        _ => HaRole::Secondary,
    };
    Some((
        CatalogVersion {
            epoch: n(0)?,
            serial: n(1)?,
            writer,
        },
        n(2)?,
    ))
}

fn write(meta: &sled::Tree, v: CatalogVersion, at_local_serial: u64) {
    let mut b = Vec::with_capacity(25);
    for n in [v.epoch, v.serial, at_local_serial] {
        b.extend_from_slice(&n.to_be_bytes());
    }
    b.push(u8::from(v.writer == HaRole::Secondary));
    if let Err(e) = meta.insert(VERSION, b) {
        tracing::warn!(error = %e, "HA: recording the catalog version failed");
    }
}

impl Ha {
    /// This unit's catalog version; a local write since the last record gives a
    /// new version (this unit's epoch, its serial).
    pub fn catalog_version(&self) -> CatalogVersion {
        // While a copy is being imported, the version recorded before it.
        let recorded = read(&self.meta);
        let local = self.catalog.serial();
        let ours = |epoch| CatalogVersion {
            epoch,
            serial: local,
            writer: self.config.mode,
        };
        let Ok(_copying) = self.catalog_lock.try_lock() else {
            return recorded.map_or_else(|| ours(0), |(v, _)| v);
        };
        match recorded {
            Some((v, at)) if at == local => v,
            _ => {
                let v = ours(self.unit().epoch);
                write(&self.meta, v, local);
                v
            }
        }
    }

    /// With `[directory]` the catalog is synced from the directory by each
    /// unit: the HA catalog sync is refused both ways.
    pub fn set_catalog_from_directory(&self) {
        self.catalog_from_directory
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn directory_refusal(&self) -> Option<String> {
        self.catalog_from_directory
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| crate::directory::refusal("the HA catalog sync"))
    }

    /// The catalog as TOML, with its version.
    pub(super) fn export_catalog(&self) -> Result<(CatalogVersion, String)> {
        if let Some(why) = self.directory_refusal() {
            anyhow::bail!(why);
        }
        let version = self.catalog_version();
        let mut out = Vec::new();
        files::write(
            &mut out,
            files::Format::Toml,
            &self.catalog.clusters()?,
            &self.catalog.servers(None),
            &self.catalog.mailboxes(None, None)?,
        )?;
        Ok((version, String::from_utf8(out)?))
    }

    /// Copies the peer's catalog (whole: `--replace`) and its version.
    pub(super) async fn pull_catalog(&self, l: &mut Link) -> Result<()> {
        if let Some(why) = self.directory_refusal() {
            self.status().catalog_error = Some(why);
            return Ok(());
        }
        match l.call(&Msg::CatalogPull, Duration::from_secs(60)).await? {
            Msg::Catalog { version, toml } => {
                let input = files::read_text("the peer's catalog", files::Format::Toml, &toml);
                // A big catalog takes a while: not on a runtime worker's time.
                let result = tokio::task::block_in_place(|| {
                    let _copying = self.catalog_lock.lock().unwrap_or_else(|e| e.into_inner());
                    let r = self.catalog.import(
                        input,
                        ImportMode::Replace,
                        false,
                        &indicatif::ProgressBar::hidden(),
                    );
                    if r.is_ok() {
                        write(&self.meta, version, self.catalog.serial());
                    }
                    r
                });
                let mut s = self.status();
                match result {
                    Ok(_) => {
                        s.catalog_copied = Some(version);
                        s.catalog_error = None;
                        s.event(format!("catalog version {version} copied from the peer"));
                        tracing::info!(%version, "HA: catalog copied from the peer");
                    }
                    Err(e) => s.catalog_error = Some(e.to_string()),
                }
            }
            Msg::Refused(why) => self.status().catalog_error = Some(why),
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_epoch_is_newer_whatever_the_serials() {
        let v = |epoch, serial, writer| CatalogVersion {
            epoch,
            serial,
            writer,
        };
        let old = v(1, 40, HaRole::Primary);
        let new = v(2, 3, HaRole::Secondary);
        assert!(new.newer_than(&old) && !old.newer_than(&new));
        // Same epoch, two writers: different, neither newer.
        let other = v(1, 40, HaRole::Secondary);
        assert_ne!(old, other);
        assert!(!old.newer_than(&other) && !other.newer_than(&old));
    }

    #[test]
    fn the_version_and_its_local_serial_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let meta = db.open_tree("ha").unwrap();
        assert_eq!(read(&meta), None);
        let v = CatalogVersion {
            epoch: 3,
            serial: 9,
            writer: HaRole::Secondary,
        };
        write(&meta, v, 12);
        assert_eq!(read(&meta), Some((v, 12)));
    }
}
