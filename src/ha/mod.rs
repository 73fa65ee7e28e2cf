//! Active-passive pair of routers (`[ha]`), so that the relay itself is not a
//! single point of failure.
//!
//! Each unit listens on its HA port ([`link`]: authenticated with the shared
//! password) and, every `heartbeat_interval`, sends the peer a heartbeat and
//! checks the peer's SMTP service (remote service monitoring: it can tell that
//! something failed, not where; a 220 greeting says the peer is MASTER). [`state::Unit`]
//! turns what it saw into the effective mode. Only the MASTER takes mail (the
//! others answer SMTP with 421 4.3.2, also at MAIL on sessions opened before a
//! demotion) and delivers; the [`Gate`] carries that to the SMTP service and the
//! queue manager. A link that fails authentication is an alarm (`ha status`, log,
//! metrics), never a reason to take over.
//!
//! A SLAVE holding mail (the old MASTER after a failover) pushes its queue to
//! the MASTER ([`push`]: exactly once, by id and digest, with tombstones; pushed
//! recipients pass the relay policy). A SLAVE delivers nothing, so no message is
//! delivered by both units. Catalogs carry versions comparable across the units
//! ([`sync`]).
//!
//! Shadow redundancy ([`shadow`], [`shadow_link`], [`shadow_store`]): with `ha.shadow` on, the
//! MASTER says 250 only once the SLAVE also holds a durable shadow copy; a SLAVE
//! that takes over from a lost MASTER promotes its shadows into its queue.

mod handshake;
pub mod hook;
pub mod link;
pub mod local;
pub mod push;
pub mod shadow;
mod shadow_link;
mod shadow_store;
pub mod state;
mod status;
pub mod sync;

use crate::catalog::store::read_u64;
use crate::catalog::Catalog;
use crate::config::{HaConfig, HaRole};
use crate::health::{probe, Probe};
use crate::queue::manager::Manager;
use crate::queue::tombstone::{self, Tombstones};
use crate::queue::{QueueId, Spool};
use anyhow::Result;
use link::{Link, Msg};
use serde::{Deserialize, Serialize};
use state::{Change, Mode, PeerSmtp, PeerView, Tick, Unit};
use status::Status;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use sync::CatalogVersion;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use crate::gate::Gate;

/// A heartbeat: what a unit says of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    pub role: HaRole,
    pub mode: Mode,
    pub epoch: u64,
    pub queued: u64,
    pub catalog: CatalogVersion,
    /// The sender's last check of the receiver's SMTP service.
    pub your_smtp_ok: Option<bool>,
}

impl Beat {
    /// The peer as the state machine sees it.
    fn view(&self) -> PeerView {
        PeerView {
            role: self.role,
            mode: self.mode,
            epoch: self.epoch,
            sees_our_smtp: self.your_smtp_ok,
        }
    }
}

/// The running HA unit.
pub struct Ha {
    config: HaConfig,
    unit: Mutex<Unit>,
    status: Mutex<Status>,
    pub gate: Gate,
    spool: Spool,
    catalog: Arc<Catalog>,
    meta: sled::Tree,
    manager: Mutex<Option<Arc<Manager>>>,
    /// Messages taken from the peer's pushes (see [`push`]).
    tombstones: Tombstones,
    pruned: Mutex<Option<Instant>>,
    /// Held while a copy of the peer's catalog is imported (see [`sync`]).
    catalog_lock: Mutex<()>,
    /// `[directory]`: each unit syncs its catalog from the directory; the HA
    /// catalog sync is refused both ways.
    catalog_from_directory: std::sync::atomic::AtomicBool,
    /// As MASTER: the shadow copies made on the SLAVE ([`shadow`]).
    pub shadow: shadow::Shadow,
    /// As SLAVE: the MASTER's shadow copies held here ([`shadow_store`]).
    shadows: shadow_store::Store,
    /// `ha.on_change`, run on every effective-mode change (see [`hook`]).
    hook: Option<hook::Hook>,
    /// What local service monitoring checks ([`local`]): the data directory and
    /// this unit's SMTP address; unset: the disk and the store only.
    local: Mutex<(std::path::PathBuf, Option<String>)>,
}

const EPOCH: &[u8] = b"ha.epoch";
/// Tombstones are pruned at most this often.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// A link error that is a failed authentication (the peer answers, but with
/// another password, or a frame was forged): an alarm, not a lost peer.
impl Ha {
    /// The unit, STARTING (gate closed until it is MASTER); its master epoch is
    /// kept in the store across restarts. Queue ids made from now on carry this
    /// unit's bit, so the two units never make the same id. `store`: the data
    /// store's directory (the shadows' segments go under it).
    pub fn new(
        config: HaConfig,
        db: &sled::Db,
        store: &std::path::Path,
        spool: Spool,
        catalog: Arc<Catalog>,
    ) -> Result<Ha> {
        QueueId::set_unit(config.mode == HaRole::Secondary);
        let meta = db.open_tree("ha")?;
        let epoch = read_u64(&meta, EPOCH).unwrap_or(0);
        let mut unit = Unit::new(config.mode, config.on_failure, config.heartbeat_lost, epoch);
        unit.smtp_when_inactive = config.inactive_smtp == crate::config::InactiveSmtp::Refuse;
        Ok(Ha {
            unit: Mutex::new(unit),
            status: Mutex::new(Status {
                since: Some(SystemTime::now()),
                ..Status::default()
            }),
            gate: Gate::closed(),
            spool,
            catalog,
            meta,
            manager: Mutex::new(None),
            tombstones: Tombstones::open(db, "ha.pushed", tombstone::KEEP)?,
            pruned: Mutex::new(None),
            catalog_lock: Mutex::new(()),
            catalog_from_directory: Default::default(),
            shadow: shadow::Shadow::new(config.shadow),
            shadows: shadow_store::Store::open(db, store)?,
            local: Mutex::new((std::path::PathBuf::from("."), None)),
            hook: config
                .on_change
                .clone()
                .map(|p| hook::Hook::new(p, config.on_change_timeout)),
            config,
        })
    }

    /// What the local service checks look at: the data directory and this
    /// unit's own SMTP listener (`smtp.listen`).
    pub fn set_local(&self, data_dir: &std::path::Path, smtp_listen: &[String]) {
        *self.local.lock().unwrap_or_else(|e| e.into_inner()) =
            (data_dir.to_path_buf(), local::self_address(smtp_listen));
    }

    /// Local service monitoring: why this unit cannot serve, if it cannot (free
    /// space, store writes, and as MASTER its own SMTP greeting).
    async fn local_problem(&self) -> Option<String> {
        let (dir, smtp) = self.local.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let min_free = self.config.min_free_disk.0;
        if let Some(p) = local::disk_problem(&dir, min_free, "ha.min_free_disk") {
            return Some(p);
        }
        if let Some(p) = local::store_problem(&self.meta).await {
            return Some(p);
        }
        match smtp {
            Some(a) if self.mode() == Mode::Master => {
                local::smtp_problem(
                    &a,
                    self.config.heartbeat_interval.max(Duration::from_secs(1)),
                )
                .await
            }
            _ => None,
        }
    }

    /// The queue manager, so that a push never takes a message being delivered.
    pub fn set_manager(&self, m: Arc<Manager>) {
        *self.manager.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
    }

    fn unit(&self) -> std::sync::MutexGuard<'_, Unit> {
        self.unit.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mode(&self) -> Mode {
        self.unit().mode
    }

    fn beat(&self) -> Beat {
        let (role, mode, epoch) = {
            let u = self.unit();
            (u.role, u.mode, u.epoch)
        };
        Beat {
            role,
            mode,
            epoch,
            queued: self.spool.len() as u64,
            catalog: self.catalog_version(),
            your_smtp_ok: self.status().peer_smtp.as_ref().map(|(ok, _, _)| *ok),
        }
    }

    fn peer_view(&self) -> Option<PeerView> {
        self.status().peer.as_ref().map(|(b, _)| b.view())
    }

    /// Applies a change of mode: log, gate, persisted epoch.
    fn changed(&self, change: Option<Change>) {
        // The epoch (also raised by what a SLAVE hears) is kept across restarts;
        // written only when it moved, not every heartbeat.
        let epoch = self.unit().epoch;
        if read_u64(&self.meta, EPOCH) != Some(epoch) {
            let _ = self.meta.insert(EPOCH, &epoch.to_be_bytes());
            let _ = self.meta.flush();
        }
        let mode = self.mode();
        self.gate.set(mode == Mode::Master);
        if let Some(c) = change {
            let mut s = self.status();
            s.since = Some(SystemTime::now());
            s.event(format!("{} -> {} (epoch {epoch}): {}", c.from, c.to, c.why));
            drop(s);
            tracing::warn!(from = %c.from, to = %c.to, epoch, why = %c.why, "HA mode changed");
            if let Some(h) = &self.hook {
                h.changed(hook::Event {
                    new: c.to.to_string(),
                    old: c.from.to_string(),
                    epoch,
                    why: c.why,
                });
            }
        }
    }

    /// The HA link failed authentication (`side`: our heartbeat, or the peer's
    /// connection): alarm in `ha status`, the log (once per new error) and metrics.
    fn auth_failed(&self, side: &str, e: &str) {
        crate::metrics::METRICS.ha_auth_failures.inc();
        let mut s = self.status();
        s.auth_failures += 1;
        let new = s.auth_alarm.as_ref().map(|(old, _)| old.as_str()) != Some(e);
        s.auth_alarm = Some((e.to_string(), SystemTime::now()));
        if new {
            s.event(format!("ALARM: HA authentication failed ({side}): {e}"));
        }
        drop(s);
        if new {
            tracing::error!(peer = %self.config.peer, side, error = %e, "HA ALARM: authentication with the peer failed; check ha.password on both units (this unit will not take over because of it)");
        }
    }

    /// `ha set-mode master|slave`.
    pub async fn set_mode(&self, master: bool) -> String {
        let peer = self.peer_view();
        let c = self.unit().set_mode(master, peer.as_ref());
        let to_master = c.as_ref().is_some_and(|c| c.to == Mode::Master);
        self.changed(c);
        if to_master {
            // Not a lost MASTER: the peer still holds its messages.
            self.shadows_on_master(true).await;
        }
        format!("effective mode: {}", self.mode())
    }

    /// `ha restore`: back to the configured mode, unless a queue push is unfinished.
    pub async fn restore(&self) -> Result<String, String> {
        // Mail still here on a unit that is not MASTER is mail not yet pushed.
        let unfinished = self.mode() != Mode::Master && !self.spool.is_empty();
        let peer = self.peer_view();
        let c = self.unit().restore(unfinished, peer.as_ref())?;
        let changed = c.is_some();
        let to_master = c.as_ref().is_some_and(|c| c.to == Mode::Master);
        self.changed(c);
        if to_master {
            self.shadows_on_master(true).await;
        }
        Ok(if changed {
            format!("configured mode restored: {}", self.mode())
        } else {
            format!("already in its configured mode: {}", self.mode())
        })
    }

    /// Answers one request from the peer.
    async fn answer(&self, msg: Msg) -> Msg {
        match msg {
            Msg::Beat(_) => {
                self.status().heard_from_peer = Some(SystemTime::now());
                Msg::Beat(self.beat())
            }
            Msg::Push { envelope, message } => {
                if self.mode() != Mode::Master {
                    return Msg::Refused(format!("this unit is {}, not MASTER", self.mode()));
                }
                self.answer_push(envelope, message).await
            }
            // Any mode: a unit about to become MASTER takes a newer catalog first.
            Msg::CatalogPull => match tokio::task::block_in_place(|| self.export_catalog()) {
                Ok((version, toml)) => Msg::Catalog { version, toml },
                Err(e) => Msg::Refused(format!("catalog export failed: {e:#}")),
            },
            other => Msg::Refused(format!("unexpected request {other:?}")),
        }
    }

    /// One heartbeat and SMTP check of the peer: what they saw, recorded.
    async fn observe(&self, link: &mut Option<Link>) -> (Option<Beat>, PeerSmtp) {
        let interval = self.config.heartbeat_interval;
        let smtp_check = probe::probe(&self.config.peer_smtp, interval);
        let heartbeat = async {
            if link.is_none() {
                *link =
                    Some(Link::connect(&self.config.peer, &self.config.password, interval).await?);
            }
            let l = link.as_mut().ok_or_else(|| anyhow::anyhow!("no link"))?;
            match l.call(&Msg::Beat(self.beat()), interval).await? {
                Msg::Beat(b) => Ok(b),
                Msg::Refused(why) => Err(anyhow::anyhow!("refused: {why}")),
                other => Err(anyhow::anyhow!("unexpected answer {other:?}")),
            }
        };
        let (smtp, beat) = tokio::join!(smtp_check, heartbeat);
        let now = SystemTime::now();
        let smtp = match smtp {
            Probe::Banner { code, .. } => {
                let seen = PeerSmtp::of_code(code);
                self.status().peer_smtp = Some((seen.alive(), format!("greeted {code}"), now));
                seen
            }
            Probe::Failed(why) => {
                self.status().peer_smtp = Some((false, why, now));
                PeerSmtp::Down
            }
        };
        let beat = match beat {
            Ok(b) => {
                let mut s = self.status();
                s.peer = Some((b, now));
                s.peer_error = None;
                s.auth_alarm = None;
                Some(b)
            }
            Err(e) => {
                *link = None;
                let auth = crate::ha::link::is_auth_failed(&e);
                let e = format!("{e:#}");
                if auth {
                    self.auth_failed("heartbeat", &e);
                } else if self.status().peer_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(peer = %self.config.peer, error = %e, "HA heartbeat failed");
                }
                self.status().peer_error = Some(e);
                None
            }
        };
        (beat, smtp)
    }

    /// One heartbeat interval of the client side.
    async fn tick(&self, link: &mut Option<Link>) {
        let (beat, smtp) = self.observe(link).await;
        // Before the mode is decided: a unit that is not MASTER takes a newer
        // catalog, and a SLAVE the MASTER's whenever it differs.
        if let (Some(b), Some(l)) = (beat, link.as_mut()) {
            let (ours, mode) = (self.catalog_version(), self.mode());
            let stale = (mode != Mode::Master && b.catalog.newer_than(&ours))
                || (mode == Mode::Slave && b.mode == Mode::Master && b.catalog != ours);
            if stale {
                if let Err(e) = self.pull_catalog(l).await {
                    tracing::warn!(error = %e, "HA catalog sync with the peer failed");
                    *link = None;
                }
            }
        }
        let problem = self.local_problem().await;
        let change = self.unit().local(problem);
        if change.is_some() {
            crate::metrics::METRICS.ha_local_failures.inc();
        }
        self.changed(change);
        // With shadows, a FAILED unit's mail may be promoted on the peer: pushed
        // (the same-message rule drops those), never delivered from here.
        let shadowed = self.config.shadow != crate::config::ShadowMode::Off;
        let failed = self.mode() == Mode::Failed;
        let change = self.unit().tick(&Tick {
            peer: beat.map(|b| b.view()),
            peer_smtp: Some(smtp),
            push_first: shadowed && failed && !self.spool.is_empty(),
        });
        let to_master = change
            .as_ref()
            .is_some_and(|c| c.to == Mode::Master && c.from != Mode::Master);
        self.changed(change);
        if to_master {
            self.shadows_on_master(beat.is_some_and(|b| b.mode == Mode::Master))
                .await;
        }
        let pushing = match self.mode() {
            Mode::Slave => true,
            Mode::Failed => shadowed,
            _ => false,
        };
        if let (Some(b), true, Some(l)) = (beat, pushing, link.as_mut()) {
            if b.mode == Mode::Master {
                if let Err(e) = self.push(l).await {
                    tracing::warn!(error = %e, "HA queue push to the MASTER failed");
                    *link = None;
                }
            }
        }
        self.prune();
    }

    /// Forgets tombstones past their keeping time, at most once an hour.
    fn prune(&self) {
        let mut last = self.pruned.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let now = crate::queue::manager::now_ms();
        match self.tombstones.prune(now) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                forgotten = n,
                "HA: pushed-message tombstones past their keeping time removed"
            ),
            Err(e) => tracing::warn!(error = %e, "HA: pruning tombstones failed"),
        }
    }
}

/// Binds the HA port (before SMTP, like the admin socket).
pub async fn bind(config: &HaConfig) -> Result<TcpListener> {
    TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("ha.listen {}: {e}", config.listen))
}

/// Runs the HA unit until shutdown: the link's server side and the heartbeat loop.
pub async fn run(ha: Arc<Ha>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    tracing::info!(listen = %ha.config.listen, peer = %ha.config.peer, role = ?ha.config.mode, "HA unit starting");
    let server = {
        let ha = ha.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (stream, from) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(s) => s,
                        Err(e) => {
                            // Out of file descriptors, most often: wait, don't spin.
                            tracing::warn!(error = %e, "HA listener: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    _ = shutdown.changed() => return,
                };
                let ha = ha.clone();
                tokio::spawn(async move {
                    let pw = ha.config.password.clone();
                    let link =
                        tokio::time::timeout(Duration::from_secs(5), Link::accept(stream, &pw))
                            .await;
                    let mut link = match link {
                        Ok(Ok(l)) => l,
                        Ok(Err(e)) => {
                            let auth = crate::ha::link::is_auth_failed(&e);
                            let e = format!("{e:#}");
                            if auth {
                                ha.auth_failed("the peer's connection", &e);
                            }
                            tracing::warn!(%from, error = %e, "HA connection refused");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%from, "HA connection refused: handshake timed out");
                            return;
                        }
                    };
                    while let Ok(msg) = link.recv().await {
                        if let Msg::ShadowSync(held) = msg {
                            // The rest of this connection is pipelined shadow batches.
                            ha.serve_shadows(link, held).await;
                            return;
                        }
                        let answer = ha.answer(msg).await;
                        if link.send(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        })
    };
    if ha.shadow.mode != crate::config::ShadowMode::Off {
        tokio::spawn(shadow_link::run(ha.clone(), shutdown.clone()));
    }
    let mut link = None;
    let mut tick = tokio::time::interval(ha.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => ha.tick(&mut link).await,
            _ = shutdown.changed() => if *shutdown.borrow() { break },
        }
    }
    server.abort();
}
