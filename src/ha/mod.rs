//! Active-passive pair of routers (`[ha]`), so that the relay itself is not a
//! single point of failure.
//!
//! Each unit listens on its HA port ([`link`]: authenticated with the shared
//! password) and, every `heartbeat_interval`, sends the peer a heartbeat and
//! checks the peer's SMTP service (remote service monitoring: it can tell that
//! something failed, not where). [`state::Unit`] turns what it saw into the
//! effective mode. Only the MASTER takes mail (the others answer SMTP with
//! 421 4.3.2) and delivers; the [`Gate`] carries that to the SMTP service and
//! the queue manager.
//!
//! A SLAVE holding mail (the old MASTER after a failover) pushes its queue to
//! the MASTER: each message goes over the link, and is removed here only once
//! the MASTER has it on disk; the MASTER treats a message it already has as
//! stored, so a crash between the two repeats nothing. A SLAVE delivers
//! nothing, so no message is delivered by both units. A SLAVE also copies the
//! MASTER's catalog whenever the MASTER's catalog serial changes.

mod handshake;
pub mod link;
pub mod state;

use crate::catalog::store::read_u64;
use crate::catalog::{files, Catalog, Mode as ImportMode};
use crate::config::{HaConfig, HaRole};
use crate::health::{probe, Probe};
use crate::queue::manager::Manager;
use crate::queue::{RecipientState, Spool};
use anyhow::Result;
use link::{Link, Msg};
use serde::{Deserialize, Serialize};
use state::{Change, Mode, PeerView, Tick, Unit};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Open while this router may take and deliver mail: always when it runs alone,
/// only as MASTER in a pair. Changes can be waited for ([`Gate::subscribe`]).
#[derive(Clone, Debug)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    pub fn open() -> Gate {
        Gate(Arc::new(watch::Sender::new(true)))
    }
    pub fn closed() -> Gate {
        Gate(Arc::new(watch::Sender::new(false)))
    }
    pub fn is_active(&self) -> bool {
        *self.0.borrow()
    }
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
    fn set(&self, active: bool) {
        self.0
            .send_if_modified(|v| std::mem::replace(v, active) != active);
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::open()
    }
}

/// A heartbeat: what a unit says of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    pub role: HaRole,
    pub mode: Mode,
    pub epoch: u64,
    pub queued: u64,
    pub catalog_serial: u64,
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

/// What `ha status` shows besides the unit itself.
#[derive(Debug, Clone, Default)]
struct Status {
    peer: Option<(Beat, SystemTime)>,
    peer_error: Option<String>,
    peer_smtp: Option<(bool, String, SystemTime)>,
    heard_from_peer: Option<SystemTime>,
    since: Option<SystemTime>,
    pushed: u64,
    push_left: u64,
    push_error: Option<String>,
    catalog_synced: Option<u64>,
    catalog_error: Option<String>,
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
}

const EPOCH: &[u8] = b"ha.epoch";
const SYNCED: &[u8] = b"ha.catalog_synced";

fn role_name(r: HaRole) -> &'static str {
    match r {
        HaRole::Primary => "primary",
        HaRole::Secondary => "secondary",
    }
}

fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs}s ago")
}

impl Ha {
    /// The unit, STARTING (gate closed until it is MASTER); its master epoch is
    /// kept in the store across restarts.
    pub fn new(config: HaConfig, db: &sled::Db, spool: Spool, catalog: Arc<Catalog>) -> Result<Ha> {
        let meta = db.open_tree("ha")?;
        let epoch = read_u64(&meta, EPOCH).unwrap_or(0);
        let synced = read_u64(&meta, SYNCED);
        let mut unit = Unit::new(config.mode, config.on_failure, config.heartbeat_lost, epoch);
        unit.smtp_when_inactive = config.inactive_smtp == crate::config::InactiveSmtp::Refuse;
        Ok(Ha {
            unit: Mutex::new(unit),
            status: Mutex::new(Status {
                since: Some(SystemTime::now()),
                catalog_synced: synced,
                ..Status::default()
            }),
            gate: Gate::closed(),
            spool,
            catalog,
            meta,
            manager: Mutex::new(None),
            config,
        })
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
            catalog_serial: self.catalog.serial(),
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
            self.status().since = Some(SystemTime::now());
            tracing::warn!(from = %c.from, to = %c.to, epoch, why = %c.why, "HA mode changed");
        }
    }

    /// `ha set-mode master|slave`.
    pub fn set_mode(&self, master: bool) -> String {
        let peer = self.peer_view();
        let c = self.unit().set_mode(master, peer.as_ref());
        self.changed(c);
        format!("effective mode: {}", self.mode())
    }

    /// `ha restore`: back to the configured mode, unless a queue push is unfinished.
    pub fn restore(&self) -> Result<String, String> {
        // Mail still here on a unit that is not MASTER is mail not yet pushed.
        let unfinished = self.mode() != Mode::Master && !self.spool.is_empty();
        let peer = self.peer_view();
        let c = self.unit().restore(unfinished, peer.as_ref())?;
        let changed = c.is_some();
        self.changed(c);
        Ok(if changed {
            format!("configured mode restored: {}", self.mode())
        } else {
            format!("already in its configured mode: {}", self.mode())
        })
    }

    /// `ha status`.
    pub fn write_status(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let u = self.unit().clone();
        let s = self.status().clone();
        let on_failure = match self.config.on_failure {
            crate::config::OnFailure::Off => "off",
            crate::config::OnFailure::Restore => "restore",
            crate::config::OnFailure::Slave => "slave",
        };
        writeln!(
            out,
            "configured:    {} (on_failure = {on_failure})",
            role_name(u.role)
        )?;
        writeln!(
            out,
            "effective:     {} since {}: {}",
            u.mode,
            s.since.map(ago).unwrap_or_default(),
            u.why
        )?;
        writeln!(out, "master epoch:  {}", u.epoch)?;
        match (&s.peer, &s.peer_error) {
            (Some((b, at)), None) => writeln!(
                out,
                "peer:          {} {} {} (epoch {}), {} queued, last heartbeat {}",
                self.config.peer,
                role_name(b.role),
                b.mode,
                b.epoch,
                b.queued,
                ago(*at)
            )?,
            (last, Some(e)) => writeln!(
                out,
                "peer:          {} unreachable: {e}{}",
                self.config.peer,
                last.as_ref()
                    .map(|(_, at)| format!(" (last heartbeat {})", ago(*at)))
                    .unwrap_or_default()
            )?,
            (None, None) => writeln!(out, "peer:          {} not heard yet", self.config.peer)?,
        }
        if let Some(at) = s.heard_from_peer {
            writeln!(out, "peer's beats:  last received {}", ago(at))?;
        }
        match &s.peer_smtp {
            Some((ok, what, at)) => writeln!(
                out,
                "peer SMTP:     {} {} ({what}, {})",
                self.config.peer_smtp,
                if *ok { "up" } else { "down" },
                ago(*at)
            )?,
            None => writeln!(
                out,
                "peer SMTP:     {} not checked yet",
                self.config.peer_smtp
            )?,
        }
        writeln!(
            out,
            "queue push:    {} pushed, {} left{}",
            s.pushed,
            s.push_left,
            s.push_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        )?;
        writeln!(
            out,
            "catalog:       serial {}{}{}",
            self.catalog.serial(),
            s.catalog_synced
                .map(|n| format!(", copied from the MASTER's serial {n}"))
                .unwrap_or_default(),
            s.catalog_error
                .as_ref()
                .map(|e| format!(" (last sync error: {e})"))
                .unwrap_or_default()
        )?;
        writeln!(out, "local queue:   {} message(s)", self.spool.len())
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
                match self.store_pushed(envelope, &message).await {
                    Ok(()) => Msg::Stored,
                    Err(e) => Msg::Refused(format!("queueing failed: {e:#}")),
                }
            }
            Msg::CatalogPull => {
                if self.mode() != Mode::Master {
                    return Msg::Refused(format!("this unit is {}, not MASTER", self.mode()));
                }
                // A big catalog takes a while: not on a runtime worker's time.
                match tokio::task::block_in_place(|| self.export_catalog()) {
                    Ok(toml) => Msg::Catalog {
                        serial: self.catalog.serial(),
                        toml,
                    },
                    Err(e) => Msg::Refused(format!("catalog export failed: {e:#}")),
                }
            }
            other => Msg::Refused(format!("unexpected request {other:?}")),
        }
    }

    /// Queues a pushed message (durably) for delivery now; one already here (a
    /// push repeated after a crash) counts as stored.
    async fn store_pushed(&self, mut env: crate::queue::Envelope, message: &[u8]) -> Result<()> {
        if let Some(have) = self.spool.envelope(env.id)? {
            if have.size == env.size && have.sender == env.sender {
                return Ok(());
            }
            env.id = crate::queue::QueueId::new();
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for r in &mut env.recipients {
            if matches!(r.state, RecipientState::Pending | RecipientState::Held) {
                r.next_attempt = now;
            }
        }
        self.spool.enqueue(&env, message).await?;
        tracing::info!(id = %env.id, rcpts = env.recipients.len(), "HA: message pushed by the peer queued");
        Ok(())
    }

    fn export_catalog(&self) -> Result<String> {
        let mut out = Vec::new();
        files::write(
            &mut out,
            files::Format::Toml,
            &self.catalog.clusters()?,
            &self.catalog.servers(None),
            &self.catalog.mailboxes(None, None)?,
        )?;
        Ok(String::from_utf8(out)?)
    }

    /// One heartbeat interval of the client side.
    async fn tick(&self, link: &mut Option<Link>) {
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
        let smtp_ok = match smtp {
            Probe::Banner { code, .. } => {
                let ok = (200..500).contains(&code);
                self.status().peer_smtp = Some((ok, format!("greeted {code}"), now));
                ok
            }
            Probe::Failed(why) => {
                self.status().peer_smtp = Some((false, why, now));
                false
            }
        };
        let peer = match beat {
            Ok(b) => {
                let mut s = self.status();
                s.peer = Some((b, now));
                s.peer_error = None;
                Some(b.view())
            }
            Err(e) => {
                *link = None;
                let e = format!("{e:#}");
                if self.status().peer_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(peer = %self.config.peer, error = %e, "HA heartbeat failed");
                }
                self.status().peer_error = Some(e);
                None
            }
        };
        let change = self.unit().tick(&Tick {
            peer,
            peer_smtp_ok: Some(smtp_ok),
        });
        self.changed(change);
        if let (Some(p), Mode::Slave) = (peer, self.mode()) {
            if p.mode == Mode::Master {
                if let Some(l) = link.as_mut() {
                    if let Err(e) = self.sync(l).await {
                        tracing::warn!(error = %e, "HA sync with the MASTER failed");
                        *link = None;
                    }
                }
            }
        }
    }

    /// As SLAVE: copy the MASTER's catalog if it changed, push the local queue.
    async fn sync(&self, l: &mut Link) -> Result<()> {
        let master_serial = self.status().peer.as_ref().map(|(b, _)| b.catalog_serial);
        let synced = self.status().catalog_synced;
        if master_serial.is_some() && master_serial != synced {
            match l.call(&Msg::CatalogPull, Duration::from_secs(60)).await? {
                Msg::Catalog { serial, toml } => {
                    let input =
                        files::read_text("the MASTER's catalog", files::Format::Toml, &toml);
                    let result = tokio::task::block_in_place(|| {
                        self.catalog.import(
                            input,
                            ImportMode::Replace,
                            false,
                            &indicatif::ProgressBar::hidden(),
                        )
                    });
                    let mut s = self.status();
                    match result {
                        Ok(_) => {
                            let _ = self.meta.insert(SYNCED, &serial.to_be_bytes());
                            s.catalog_synced = Some(serial);
                            s.catalog_error = None;
                            tracing::info!(serial, "HA: catalog copied from the MASTER");
                        }
                        Err(e) => s.catalog_error = Some(e.to_string()),
                    }
                }
                Msg::Refused(why) => self.status().catalog_error = Some(why),
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
        self.push(l).await
    }

    /// Pushes queued messages to the MASTER, for at most a heartbeat interval
    /// (the next tick goes on); never one being delivered.
    async fn push(&self, l: &mut Link) -> Result<()> {
        let manager = self
            .manager
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let envelopes = self.spool.envelopes()?;
        self.status().push_left = envelopes.len() as u64;
        if envelopes.is_empty() {
            return Ok(());
        }
        if manager.as_ref().is_some_and(|m| m.deliveries_running() > 0) {
            return Ok(()); // deliveries from our MASTER days are finishing
        }
        let deadline = tokio::time::Instant::now() + self.config.heartbeat_interval;
        for env in envelopes {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            if manager.as_ref().is_some_and(|m| m.delivering(env.id)) {
                continue;
            }
            let Some(message) = self.spool.message(env.id)? else {
                continue;
            };
            let id = env.id;
            match l
                .call(
                    &Msg::Push {
                        envelope: env,
                        message,
                    },
                    Duration::from_secs(60),
                )
                .await?
            {
                Msg::Stored => {
                    self.spool.remove(id).await?;
                    let mut s = self.status();
                    s.pushed += 1;
                    s.push_left = s.push_left.saturating_sub(1);
                    s.push_error = None;
                    drop(s);
                    tracing::info!(%id, "HA: message pushed to the MASTER and removed here");
                }
                Msg::Refused(why) => {
                    self.status().push_error = Some(why);
                    break;
                }
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
        Ok(())
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
                        Err(_) => continue,
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
                            tracing::warn!(%from, error = %e, "HA connection refused");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%from, "HA connection refused: handshake timed out");
                            return;
                        }
                    };
                    while let Ok(msg) = link.recv().await {
                        let answer = ha.answer(msg).await;
                        if link.send(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        })
    };
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
