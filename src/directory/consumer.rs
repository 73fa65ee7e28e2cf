//! The syncrepl consumer (RFC 4533, refreshAndPersist): connects to a directory
//! server of `[directory]`, binds, searches `base_dn` with the Sync Request
//! control (the stored cookie, if any), turns the directory's messages into
//! [`Event`] batches for the [`Syncer`], and on any failure reconnects with
//! backoff (the next URL in turn) and resumes from the cookie.
//!
//! No cookie, or the server's e-syncRefreshRequired: a full refresh, switched
//! atomically (`replace_all`). With a cookie the refresh phase ends with the
//! entries deleted meanwhile: named (refreshDeletes, syncIdSet) or implied (the
//! present phase: every known entry not named present is gone).
//!
//! While no directory server answers, the catalog stays as last synced and the
//! router routes on it.

use super::config::DirectoryConfig;
use super::entry::{fold, ATTRS, FILTER};
use super::journal::Event;
use super::status::STATUS;
use super::sync::Syncer;
use anyhow::{anyhow, bail, Context, Result};
use ldap3::controls::{parse_syncinfo, EntryState, RefreshMode, SyncInfo, SyncRequest, SyncState};
use ldap3::{LdapConnAsync, LdapConnSettings, ResultEntry, Scope, SearchEntry};
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";
/// e-syncRefreshRequired (RFC 4533 §2.6): the cookie is too old; start over.
const REFRESH_REQUIRED: u32 = 4096;
/// Persist-phase changes arriving this close together are applied as one batch.
const COALESCE: Duration = Duration::from_millis(5);
const MAX_BATCH: usize = 2000;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a session ended.
enum End {
    Stopped,
    /// The server asked for a full refresh.
    RefreshRequired,
}

/// Runs the consumer until `stopped` turns true.
pub async fn run(cfg: DirectoryConfig, mut syncer: Syncer, mut stopped: watch::Receiver<bool>) {
    STATUS.started();
    let mut backoff = BACKOFF_MIN;
    let mut full = false;
    let mut at = 0usize;
    while !*stopped.borrow() {
        let url = cfg.url[at % cfg.url.len()].clone();
        let mut synced = false;
        let res = session(&cfg, &url, &mut syncer, full, &mut synced, &mut stopped).await;
        match res {
            Ok(End::Stopped) => break,
            Ok(End::RefreshRequired) => {
                tracing::warn!(%url, "directory: the server asks for a full refresh (e-syncRefreshRequired)");
                full = true;
                continue;
            }
            Err(e) => {
                let e = format!("{e:#}");
                tracing::warn!(%url, error = %e, "directory: sync interrupted; routing on the catalog as last synced");
                STATUS.disconnected(e);
                at += 1;
            }
        }
        if synced {
            backoff = BACKOFF_MIN;
            full = false;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped.changed() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    STATUS.disconnected("stopped".into());
}

async fn connect(cfg: &DirectoryConfig, url: &str) -> Result<ldap3::Ldap> {
    let mut settings = LdapConnSettings::new().set_conn_timeout(CONNECT_TIMEOUT);
    if let Some(ca) = &cfg.tls_ca_file {
        settings = settings.set_config(Arc::new(tls_config(ca)?));
    }
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    ldap3::drive!(conn);
    if let Some(dn) = &cfg.bind_dn {
        let pw = cfg.password()?;
        tokio::time::timeout(cfg.idle_probe, ldap.simple_bind(dn, &pw))
            .await
            .map_err(|_| anyhow!("binding as {dn}: no answer within {:?}", cfg.idle_probe))??
            .success()
            .with_context(|| format!("binding as {dn}"))?;
    }
    Ok(ldap)
}

fn tls_config(ca: &std::path::Path) -> Result<rustls::ClientConfig> {
    let pem =
        std::fs::read(ca).with_context(|| format!("directory.tls_ca_file {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// What one sync session has seen and not yet applied.
#[derive(Default)]
struct Pending {
    events: Vec<Event>,
    cookie: Option<Vec<u8>>,
    /// Entries named in the refresh phase (present or changed).
    present: HashSet<Vec<u8>>,
}

/// The sync search: connected, bound, refreshAndPersist from `cookie` (none: a
/// full refresh); with a handle on the same connection for liveness probes.
async fn start(
    cfg: &DirectoryConfig,
    url: &str,
    cookie: Option<Vec<u8>>,
) -> Result<(SyncStream, ldap3::Ldap)> {
    let mut ldap = connect(cfg, url).await?;
    let prober = ldap.clone();
    let request = SyncRequest {
        mode: RefreshMode::RefreshAndPersist,
        cookie,
        reload_hint: false,
    };
    let search = ldap.with_controls(request).streaming_search(
        &cfg.base_dn,
        Scope::Subtree,
        FILTER,
        ATTRS.to_vec(),
    );
    let stream = tokio::time::timeout(cfg.idle_probe, search)
        .await
        .map_err(|_| {
            anyhow!(
                "starting the sync search: no answer within {:?}",
                cfg.idle_probe
            )
        })?
        .context("starting the sync search")?;
    Ok((stream, prober))
}

type SyncStream = ldap3::SearchStream<'static, &'static str, Vec<&'static str>>;

/// One connection: refresh, then persist until the connection ends.
async fn session(
    cfg: &DirectoryConfig,
    url: &str,
    syncer: &mut Syncer,
    force_full: bool,
    synced: &mut bool,
    stopped: &mut watch::Receiver<bool>,
) -> Result<End> {
    let cookie = if force_full { None } else { syncer.cookie()? };
    let full = cookie.is_none();
    let (mut stream, mut prober) = start(cfg, url, cookie).await?;
    STATUS.connected(url);
    tracing::info!(%url, full, "directory: connected; refreshing the catalog");
    let mut p = Pending::default();
    let mut refreshing = true;
    let mut heard = tokio::time::Instant::now();
    loop {
        let wait = if !refreshing && !p.events.is_empty() {
            COALESCE
        } else {
            cfg.idle_probe.saturating_sub(heard.elapsed())
        };
        let item = tokio::select! {
            r = tokio::time::timeout(wait, stream.next()) => r,
            _ = stopped.changed() => {
                let _ = stream.finish().await;
                return Ok(End::Stopped);
            }
        };
        let re = match item {
            Err(_) if !p.events.is_empty() && !refreshing => {
                flush(syncer, &mut p, false)?;
                continue;
            }
            Err(_) => {
                probe(&mut prober, cfg).await?;
                heard = tokio::time::Instant::now();
                continue;
            }
            Ok(r) => r.context("reading the sync search")?,
        };
        heard = tokio::time::Instant::now();
        let Some(re) = re else {
            let res = stream.finish().await;
            if res.rc == REFRESH_REQUIRED {
                return Ok(End::RefreshRequired);
            }
            bail!(
                "the directory ended the sync search (rc {}: {})",
                res.rc,
                res.text
            );
        };
        if re.is_intermediate() {
            let info = guard("Sync Info", || parse_syncinfo(re))?;
            if info_ends_refresh(syncer, &mut p, info)? && refreshing {
                refreshing = false;
                flush(syncer, &mut p, full)?;
                *synced = true;
                tracing::info!(%url, "directory: refresh done; following changes");
            }
        } else if re.is_ref() {
            continue;
        } else {
            entry(&mut p, re, refreshing)?;
            if !refreshing && p.events.len() >= MAX_BATCH {
                flush(syncer, &mut p, false)?;
            }
        }
    }
}

/// After `idle_probe` of silence: a trivial question (the base entry, no
/// attributes) on the sync connection. No answer within `idle_probe` and the
/// connection is taken for dead: a silent partition, or a server that dropped
/// it unseen; the caller reconnects and resumes from the cookie.
async fn probe(ldap: &mut ldap3::Ldap, cfg: &DirectoryConfig) -> Result<()> {
    let ask = ldap.search(&cfg.base_dn, Scope::Base, "(objectClass=*)", vec!["1.1"]);
    match tokio::time::timeout(cfg.idle_probe, ask).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(anyhow!("the directory failed a liveness probe: {e}")),
        Err(_) => bail!(
            "no answer to a liveness probe within {:?} (directory.idle_probe): connection presumed dead",
            cfg.idle_probe
        ),
    }
}

/// Runs a parser of the ldap3 crate, which panics on malformed server data.
fn guard<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| anyhow!("the directory sent a malformed {what}"))
}

/// A search result entry with its Sync State control.
fn entry(p: &mut Pending, re: ResultEntry, refreshing: bool) -> Result<()> {
    let Some(ctrl) = re.1.iter().find(|c| c.1.ctype == SYNC_STATE_OID) else {
        bail!("the directory sent an entry without a Sync State control");
    };
    let raw = ctrl.1.clone();
    let state: SyncState = guard("Sync State control", || raw.parse::<SyncState>())?;
    if let Some(c) = state.cookie {
        p.cookie = Some(c);
    }
    let uuid = state.entry_uuid;
    if refreshing {
        p.present.insert(uuid.clone());
    }
    match state.state {
        EntryState::Present => {}
        EntryState::Add | EntryState::Modify => {
            let se = guard("entry", || SearchEntry::construct(re))?;
            p.events.push(Event::Upsert {
                uuid,
                dn: se.dn,
                attrs: fold(se.attrs),
            });
        }
        EntryState::Delete => p.events.push(Event::Delete { uuid }),
    }
    Ok(())
}

/// Takes in a Sync Info message; true when it ends the refresh phase.
fn info_ends_refresh(syncer: &Syncer, p: &mut Pending, info: SyncInfo) -> Result<bool> {
    match info {
        SyncInfo::NewCookie(c) => {
            p.cookie = Some(c);
            Ok(false)
        }
        SyncInfo::RefreshDelete {
            cookie,
            refresh_done,
        } => {
            p.cookie = cookie.or(p.cookie.take());
            Ok(refresh_done)
        }
        SyncInfo::RefreshPresent {
            cookie,
            refresh_done,
        } => {
            // The end of a present phase: every entry not named is gone.
            p.cookie = cookie.or(p.cookie.take());
            for uuid in syncer.known()? {
                if !p.present.contains(&uuid) {
                    p.events.push(Event::Delete { uuid });
                }
            }
            Ok(refresh_done)
        }
        SyncInfo::SyncIdSet {
            cookie,
            refresh_deletes,
            sync_uuids,
        } => {
            p.cookie = cookie.or(p.cookie.take());
            for uuid in sync_uuids {
                if refresh_deletes {
                    p.events.push(Event::Delete { uuid });
                } else {
                    p.present.insert(uuid);
                }
            }
            Ok(false)
        }
    }
}

/// Applies what is pending (with its cookie) as one batch.
fn flush(syncer: &mut Syncer, p: &mut Pending, full: bool) -> Result<()> {
    let events = std::mem::take(&mut p.events);
    p.present.clear();
    let cookie = p.cookie.take();
    if events.is_empty() && cookie.is_none() && !full {
        return Ok(());
    }
    tokio::task::block_in_place(|| syncer.batch(events, cookie.as_deref(), full))?;
    Ok(())
}
