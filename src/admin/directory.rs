//! `clustermail catalog sync-status`: the directory consumer's state — the
//! running router's live view, or (router stopped) the state as last synced.

use super::Exit;
use crate::catalog::Catalog;
use crate::directory::journal::{Local, COOKIE};
use crate::directory::status::{RejectedEntry, STATUS};
use crate::directory::DirectoryConfig;
use anyhow::Result;
use std::io::Write;

pub fn sync_status(
    cat: &Catalog,
    directory: Option<&DirectoryConfig>,
    db: &sled::Db,
    out: &mut dyn Write,
) -> Result<Exit> {
    let Some(cfg) = directory else {
        writeln!(
            out,
            "no [directory] in the config: the catalog comes from catalog files (catalog import)"
        )?;
        return Ok(Exit::Ok);
    };
    let live = STATUS.snapshot();
    let rejected = if live.enabled {
        writeln!(out, "directory:    {}", cfg.url.join(" "))?;
        writeln!(out, "base DN:      {}", cfg.base_dn)?;
        let state = match (&live.connected, &live.url, &live.last_error) {
            (true, Some(u), _) => format!("connected to {u}"),
            (_, _, Some(e)) => {
                format!("NOT CONNECTED: {e} (routing on the catalog as last synced)")
            }
            _ => "connecting".into(),
        };
        writeln!(out, "state:        {state}")?;
        let age = live.last_change_age().map_or_else(
            || "none since start".to_string(),
            |d| format!("{}s ago", d.as_secs()),
        );
        writeln!(out, "last change:  {age}")?;
        writeln!(
            out,
            "since start:  {} entries applied, {} full refreshes",
            live.applied, live.full_refreshes
        )?;
        live.rejected
    } else {
        writeln!(
            out,
            "directory:    {} (router not running: state as last synced)",
            cfg.url.join(" ")
        )?;
        let cookie = cat.sync_meta(COOKIE)?;
        writeln!(
            out,
            "synced:       {}",
            if cookie.is_some() {
                "yes (resumes from its cookie)"
            } else {
                "never"
            }
        )?;
        let (local, _) = Local::open(db, cat.rule(), None)?;
        local
            .all()?
            .into_iter()
            .filter_map(|(_, h)| {
                Some(RejectedEntry {
                    name: h.record.as_ref().map_or("", |r| r.name()).to_string(),
                    reason: h.problem?,
                    dn: h.dn,
                })
            })
            .collect()
    };
    writeln!(out, "rejected:     {}", rejected.len())?;
    for r in &rejected {
        writeln!(out, "  {}: {}", r.dn, r.reason)?;
    }
    Ok(Exit::Ok)
}
