//! The SMTP service: listeners, connection limits, and the per-connection driver
//! that runs a [`Session`] over a [`Conn`], queueing each accepted message durably
//! before its 250.
//!
//! Shutdown: when the shutdown signal fires, listeners stop accepting; an idle
//! session (no transaction) is told `421 4.3.2` at once, a session inside a
//! transaction may finish it (bounded by `shutdown_grace`) and is told 421 after.
//!
//! Reload: [`Current`] holds the service new connections get; a reload puts a
//! [`Service::reconfigured`] one there (new limits, certificates), sharing the
//! connection counts, while sessions in progress keep the one they started with.

use super::conn::{Conn, Line};
use super::limits::{self, Budget, Reservation};
use super::policy::CatalogPolicy;
use super::reply::{self, Reply};
use super::session::{Action, Message, RecipientPolicy, Session, Settings};
use crate::catalog::Catalog;
use crate::config::SmtpConfig;
use crate::queue::Spool;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

mod accept;
mod body;
use accept::accept;
pub use accept::Replication;
use body::{read_bdat, read_data, Chunk};

/// Everything the connections of one service share.
pub struct Service {
    pub settings: Settings,
    pub config: SmtpConfig,
    pub policy: Arc<dyn RecipientPolicy + Send + Sync>,
    pub spool: Spool,
    pub tls: Option<TlsAcceptor>,
    /// Closed while this router is not the active unit of its HA pair: new
    /// sessions get 421 4.3.2, or with `close_when_inactive` nobody listens.
    pub gate: crate::gate::Gate,
    pub close_when_inactive: bool,
    /// In an HA pair: the shadow copy of each accepted message (`ha::shadow`).
    pub replication: std::sync::OnceLock<Arc<dyn Replication>>,
    /// Set while the data disk is below `smtp.min_free_disk`.
    pub low_disk: crate::gate::LowDisk,
    connections: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Message data held by all sessions (`smtp.max_data_in_flight`).
    pub(crate) budget: Arc<Budget>,
}

/// The service new connections get (replaced by a reload).
#[derive(Clone)]
pub struct Current(Arc<std::sync::RwLock<Arc<Service>>>);

impl Current {
    pub fn new(service: Arc<Service>) -> Current {
        Current(Arc::new(std::sync::RwLock::new(service)))
    }

    pub fn get(&self) -> Arc<Service> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, service: Arc<Service>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = service;
    }
}

impl Service {
    pub fn new(
        router_name: &str,
        config: &SmtpConfig,
        max_hops: usize,
        catalog: Arc<Catalog>,
        spool: Spool,
        gate: crate::gate::Gate,
        close_when_inactive: bool,
    ) -> Result<Arc<Service>> {
        let (settings, tls) = tuned(router_name, config, max_hops)?;
        Ok(Arc::new(Service {
            settings,
            config: config.clone(),
            policy: Arc::new(CatalogPolicy { catalog }),
            spool,
            tls,
            gate,
            close_when_inactive,
            replication: Default::default(),
            low_disk: Default::default(),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            budget: Budget::new(config.max_data_in_flight.0),
        }))
    }

    /// This service with new settings, limits and certificates (read again from
    /// their files), sharing its queue, gate, connection counts and data budget.
    /// The sizes of the connection limit (`max_connections`) and of the budget
    /// (`max_data_in_flight`) stay as they were.
    pub fn reconfigured(
        &self,
        router_name: &str,
        config: &SmtpConfig,
        max_hops: usize,
    ) -> Result<Arc<Service>> {
        let (settings, tls) = tuned(router_name, config, max_hops)?;
        Ok(Arc::new(Service {
            settings,
            config: config.clone(),
            policy: self.policy.clone(),
            spool: self.spool.clone(),
            tls,
            gate: self.gate.clone(),
            close_when_inactive: self.close_when_inactive,
            low_disk: self.low_disk.clone(),
            // The shadow copies carry over: a reload never turns them off.
            replication: self.replication.clone(),
            connections: self.connections.clone(),
            per_ip: self.per_ip.clone(),
            budget: self.budget.clone(),
        }))
    }
}

/// The session settings and the STARTTLS acceptor (certificates read now).
fn tuned(
    router_name: &str,
    config: &SmtpConfig,
    max_hops: usize,
) -> Result<(Settings, Option<TlsAcceptor>)> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(super::tls::acceptor(c, k)?),
        _ => None,
    };
    let settings = Settings {
        name: router_name.to_string(),
        max_message_size: config.max_message_size,
        max_recipients: config.max_recipients,
        max_errors: config.max_errors,
        long_lines: config.long_lines,
        bare_line_endings: config.bare_line_endings,
        tls_available: tls.is_some(),
        max_hops,
    };
    Ok((settings, tls))
}

/// Binds every configured address (before anything else starts, so a port in use
/// is reported at once), after raising the open-files limit for the connections
/// and having big blocks returned to the system when freed.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>> {
    limits::return_big_blocks();
    match limits::raise_open_files_limit() {
        Ok(n) => tracing::debug!(open_files = n, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    let mut out = Vec::new();
    for a in addrs {
        out.push(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a}"))?,
        );
    }
    Ok(out)
}

/// Serves until `shutdown` turns true, then waits (up to the grace period) for the
/// sessions still running.
pub async fn serve(
    current: Current,
    listeners: Vec<TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut accepting = Vec::new();
    for l in listeners {
        tracing::info!(addr = %l.local_addr()?, "SMTP listening");
        accepting.push(tokio::spawn(accept_loop(
            current.clone(),
            l,
            shutdown.clone(),
        )));
    }
    for a in accepting {
        let _ = a.await;
    }
    let service = current.get();
    // Every live connection holds a permit: all permits back means all sessions ended.
    let max = service.config.max_connections as u32;
    let grace = service.config.shutdown_grace;
    match tokio::time::timeout(
        grace + Duration::from_secs(1),
        service.connections.acquire_many(max),
    )
    .await
    {
        Ok(_) => tracing::info!("all SMTP sessions finished"),
        Err(_) => tracing::warn!(?grace, "SMTP sessions still running after the grace period"),
    }
    Ok(())
}

async fn accept_loop(current: Current, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    // Gate and listening mode are the same in every reloaded service.
    let service = current.get();
    let addr = listener.local_addr().ok();
    let mut listener = Some(listener);
    let mut gate = service.gate.subscribe();
    loop {
        // A standby unit with `inactive_smtp = "closed"` does not listen at all.
        let wanted = !service.close_when_inactive || service.gate.is_active();
        match (&listener, wanted, addr) {
            (Some(_), false, _) => {
                listener = None;
                tracing::info!(
                    ?addr,
                    "SMTP listener closed: not the active unit of the HA pair"
                );
            }
            (None, true, Some(a)) => match TcpListener::bind(a).await {
                Ok(l) => {
                    tracing::info!(addr = %a, "SMTP listening again: the active unit of the HA pair");
                    listener = Some(l);
                }
                Err(e) => {
                    tracing::warn!(addr = %a, error = %e, "SMTP listener cannot be bound again; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ => {}
        }
        let Some(l) = &listener else {
            tokio::select! {
                _ = shutdown.changed() => if *shutdown.borrow() { return },
                _ = gate.changed() => {}
            }
            continue;
        };
        tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
            }
            _ = gate.changed(), if service.close_when_inactive => {}
            accepted = l.accept() => match accepted {
                Ok((stream, peer)) => {
                    let service = current.get();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move { connection(service, stream, peer, shutdown).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Releases a per-IP connection slot when the connection ends.
struct IpSlot<'a> {
    service: &'a Service,
    ip: IpAddr,
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut map = self
            .service
            .per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn refuse(stream: TcpStream, r: Reply) {
    let mut conn = Conn::new(stream);
    conn.reply(&r);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.flush()).await;
}

async fn connection(
    service: Arc<Service>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let Ok(_permit) = service.connections.clone().try_acquire_owned() else {
        tracing::warn!(%peer, "connection refused: max_connections reached");
        return refuse(stream, reply::too_many_connections()).await;
    };
    let ip = peer.ip();
    let admitted = {
        let mut map = service.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        let ok = *n < service.config.max_connections_per_ip;
        if ok {
            *n += 1;
        }
        ok
    };
    if !admitted {
        tracing::warn!(%peer, "connection refused: max_connections_per_ip reached");
        return refuse(stream, reply::too_many_connections()).await;
    }
    let _slot = IpSlot {
        service: &service,
        ip,
    };
    if !service.gate.is_active() {
        return refuse(stream, reply::inactive(&service.settings.name)).await;
    }
    let mut session = Session::new(service.settings.clone());
    let mut conn = Conn::new(stream).with_write_timeout(service.config.command_timeout);
    conn.reply(&session.greeting());
    let outcome = drive(&service, &mut session, &mut conn, peer, shutdown.clone()).await;
    match outcome {
        Ok(Next::StartTls) => {
            let Some(acceptor) = service.tls.clone() else {
                return;
            };
            let tcp = conn.into_inner();
            match tokio::time::timeout(service.config.command_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    session.tls_started();
                    let mut conn =
                        Conn::new(tls).with_write_timeout(service.config.command_timeout);
                    if let Err(e) = drive(&service, &mut session, &mut conn, peer, shutdown).await {
                        log_io_end(peer, &e);
                    }
                }
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
        }
        Ok(Next::Close) => {}
        Err(e) => log_io_end(peer, &e),
    }
}

fn log_io_end(peer: SocketAddr, e: &io::Error) {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => {
            tracing::debug!(%peer, error = %e, "connection lost")
        }
        _ => tracing::info!(%peer, error = %e, "connection ended"),
    }
}

enum Next {
    Close,
    StartTls,
}

/// What the driver keeps of the transaction under way, beside the session.
#[derive(Default)]
struct Tx {
    /// When it must be over (`smtp.transaction_timeout`, from MAIL).
    deadline: Option<Instant>,
    /// The memory its BDAT chunks hold, and how many octets they are.
    bdat: Option<Reservation>,
    bdat_octets: u64,
}

/// Runs the session until the client quits, the session closes, or STARTTLS.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    service: &Service,
    session: &mut Session,
    conn: &mut Conn<S>,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<Next> {
    let cfg = &service.config;
    let name = &service.settings.name;
    let mut tx = Tx::default();
    loop {
        // A transaction's deadline starts at MAIL; its memory goes when it ends.
        if !session.in_transaction() {
            tx = Tx::default();
        } else if tx.deadline.is_none() {
            tx.deadline = Some(Instant::now() + cfg.transaction_timeout);
        }
        if *shutdown.borrow() && !session.in_transaction() {
            conn.reply(&reply::shutting_down(name));
            conn.flush().await?;
            return Ok(Next::Close);
        }
        // Wait for a command, or for shutdown while idle.
        let line = if session.in_transaction() || *shutdown.borrow() {
            within(tx.deadline, conn.read_line(cfg.command_timeout)).await
        } else {
            tokio::select! {
                l = conn.read_line(cfg.command_timeout) => l,
                _ = shutdown.changed() => continue,
            }
        };
        let action = match line {
            Ok(Line::Eof) => return Ok(Next::Close),
            Ok(Line::TooLong) => session.line_too_long(),
            // The HA gate again at MAIL: a session opened before this unit was
            // demoted takes no new transaction (421 4.3.2, then close).
            Ok(Line::Command(l)) if !service.gate.is_active() && is_mail(&l) => {
                Action::Close(reply::inactive(name))
            }
            Ok(Line::Command(l)) if is_mail(&l) && service.shadow_refuses() => {
                Action::Reply(Reply::new(
                    451,
                    "4.3.0",
                    "No shadow copy can be made now, try again later",
                ))
            }
            // Too little free disk for new mail: 452 4.3.1 now, not a failed write.
            Ok(Line::Command(l)) if service.low_disk.is_low() && is_mail(&l) => {
                Action::Reply(reply::low_disk(name))
            }
            Ok(Line::Command(l)) => session.command(&l, service.policy.as_ref()),
            Err(e) => return ended(conn, name, peer, &tx, e).await,
        };
        let step = match action {
            Action::Reply(r) => Ok(r),
            Action::Close(r) => {
                conn.reply(&r);
                conn.flush().await?;
                return Ok(Next::Close);
            }
            Action::StartTls(r) => {
                conn.reply(&r);
                conn.flush().await?;
                let dropped = conn.discard_buffered();
                if dropped > 0 {
                    tracing::warn!(%peer, dropped, "plaintext pipelined after STARTTLS discarded");
                }
                return Ok(Next::StartTls);
            }
            Action::ReadData(r) => read_data(service, session, conn, peer, &tx, r).await,
            Action::ReadBdat { size, last, refuse } => {
                let chunk = Chunk { size, last, refuse };
                read_bdat(service, session, conn, peer, &mut tx, chunk).await
            }
        };
        match step {
            Ok(r) => conn.reply(&r),
            Err(e) => return ended(conn, name, peer, &tx, e).await,
        }
    }
}

/// A MAIL command (any case).
fn is_mail(line: &[u8]) -> bool {
    line.get(..5)
        .is_some_and(|w| w.eq_ignore_ascii_case(b"MAIL "))
}

/// Runs a read of the transaction under way within its deadline (a timeout error
/// past it, like the per-read timeouts).
async fn within<T>(
    deadline: Option<Instant>,
    read: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match deadline {
        None => read.await,
        Some(d) => tokio::time::timeout_at(d, read)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "transaction"))),
    }
}

/// A read failed: a timeout gets 421 4.4.2 and the connection closes; other
/// errors (connection lost) end the session.
async fn ended<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    name: &str,
    peer: SocketAddr,
    tx: &Tx,
    e: io::Error,
) -> io::Result<Next> {
    if e.kind() != io::ErrorKind::TimedOut {
        return Err(e);
    }
    let r = if tx.deadline.is_some_and(|d| Instant::now() >= d) {
        tracing::info!(%peer, "transaction_timeout reached: closing the connection");
        Reply::new(
            421,
            "4.4.2",
            format!("{name} Transaction took too long, closing connection"),
        )
    } else {
        reply::timeout(name)
    };
    conn.reply(&r);
    let _ = conn.flush().await;
    Ok(Next::Close)
}

/// The transaction's log line when the message was refused at its end (size, loop,
/// bare line endings...); [`accept`] writes the line of the others.
fn log_refused(peer: SocketAddr, r: &Reply) {
    tracing::info!(%peer, reply = %r, "message refused");
}
