//! Outbound SMTP: one transaction to one mailbox server carrying every recipient
//! routed there, over our own client (`client`: tokio, TCP_NODELAY, PIPELINING,
//! per-step timeouts, the final reply's own timeout). The queued octets are sent as
//! they are (only dot-stuffed); addresses are sent as inbound accepted them
//! (`path`); each recipient gets its own [`Outcome`] (`transaction`). Connections
//! are reused per destination, and concurrency is limited per destination
//! ([`Deliverer`]) as well as globally (the queue manager). STARTTLS follows
//! each server's `tls` setting (`tls`).

pub mod client;
pub mod mx;
pub mod path;
pub mod tls;
pub mod transaction;

use crate::catalog::model::TlsPolicy;
use client::{Connection, TlsRequest};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// What became of one recipient in a delivery to one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server took the message for this recipient (its reply).
    Delivered(String),
    /// 4xx to this recipient (its RCPT, or the reply to the data): retry it later
    /// at the same server. Says nothing about the server's availability.
    Deferred(String),
    /// 4xx to the whole transaction before the data (MAIL, DATA): nothing was
    /// sent, another server may take it now.
    Temporary(String),
    /// 5xx, or an address that cannot be sent: will never be taken.
    Permanent(String),
    /// The data was sent but no reply to it came (timeout, connection lost): the
    /// server may have stored it. Never sent again in this attempt; retried later
    /// at the same server; says nothing about the server's availability.
    Unconfirmed(String),
    /// The session failed before the data could reach the server (connect,
    /// greeting, EHLO, 421, a timeout or lost connection before the data): nothing
    /// was stored; the server is unusable now, the recipient may go elsewhere.
    Unusable(String),
}

impl Outcome {
    /// The word in the `delivery attempt` log line.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Delivered(_) => "delivered",
            Outcome::Deferred(_) => "deferred",
            Outcome::Temporary(_) => "temporary",
            Outcome::Permanent(_) => "failed",
            Outcome::Unconfirmed(_) => "unconfirmed",
            Outcome::Unusable(_) => "unusable",
        }
    }

    /// The server's reply, or why there is none.
    pub fn reply(&self) -> &str {
        match self {
            Outcome::Delivered(x)
            | Outcome::Deferred(x)
            | Outcome::Temporary(x)
            | Outcome::Permanent(x)
            | Outcome::Unconfirmed(x)
            | Outcome::Unusable(x) => x,
        }
    }
}

/// A delivery's result: one outcome per recipient, in order, and how long the
/// server took to answer MAIL (a response time independent of the message size,
/// for the availability index), if it was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub outcomes: Vec<Outcome>,
    pub response: Option<Duration>,
    /// The TLS version of the (last) connection used ("TLSv1.3"); None: plain
    /// text or no connection.
    pub tls: Option<String>,
}

/// One message for one server.
pub struct Transaction<'a> {
    pub server_address: &'a str,
    pub hello_name: &'a str,
    pub sender: Option<&'a str>,
    pub recipients: &'a [String],
    /// The message as queued.
    pub message: &'a [u8],
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// Per SMTP step (`routing.delivery_timeout`).
    pub timeout: Duration,
    /// For the reply to the final "." (`routing.final_reply_timeout`).
    pub final_timeout: Duration,
    /// The server's STARTTLS setting and the name its certificate must carry.
    pub tls: TlsPolicy,
    pub tls_name: Option<&'a str>,
}

impl Transaction<'_> {
    /// Kept connections are told apart by address and TLS setting: one opened
    /// for a server with another setting is never used.
    fn pool_key(&self) -> String {
        format!(
            "{} {:?} {}",
            self.server_address,
            self.tls,
            self.tls_name.unwrap_or("")
        )
    }
}

/// Delivers transactions with connection reuse and a concurrency limit per
/// destination: an idle connection to a server is kept for `idle` and used again
/// (a stale one is replaced before the data); at most `per_server` transactions run against one
/// server at once.
pub struct Deliverer {
    per_server: usize,
    idle: Duration,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    pool: Mutex<HashMap<String, Vec<(Connection, Instant)>>>,
    tls: std::sync::RwLock<tls::TlsClient>,
}

impl Deliverer {
    pub fn new(per_server: usize, idle: Duration, tls: tls::TlsClient) -> Deliverer {
        Deliverer {
            per_server: per_server.max(1),
            idle,
            tls: std::sync::RwLock::new(tls),
            limits: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
        }
    }

    fn limit(&self, server: &str) -> Arc<Semaphore> {
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        limits
            .entry(server.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_server)))
            .clone()
    }

    fn pooled(&self, server: &str) -> Option<Connection> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let idle = pool.get_mut(server)?;
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < self.idle {
                return Some(conn);
            }
        }
        None
    }

    fn keep(&self, server: &str, conn: Connection) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let idle = pool.entry(server.to_string()).or_default();
        if idle.len() < self.per_server {
            idle.push((conn, Instant::now()));
        }
    }

    /// A kept connection (in a clean state: kept only after a transaction ended
    /// normally), else a new one. A kept connection the server has closed
    /// meanwhile fails at MAIL, before the data: `send` then takes a fresh one.
    async fn connection(&self, t: &Transaction<'_>) -> Result<(Connection, bool), String> {
        if let Some(conn) = self.pooled(&t.pool_key()) {
            return Ok((conn, true));
        }
        let addrs = mx::addresses(t.server_address).await?;
        let client = self.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        let tls = TlsRequest {
            policy: t.tls,
            address: t.server_address,
            name: t.tls_name,
            client: &client,
        };
        let conn = Connection::open(&addrs, t.hello_name, t.timeout, tls).await;
        conn.map(|c| (c, false))
            .map_err(|e| format!("{}: {e}", t.server_address))
    }

    /// Delivers to one server; one outcome per recipient, in order.
    ///
    /// A kept connection that fails before the data is replaced by a fresh one
    /// once (a stale connection must not make a healthy server look down); after
    /// the data nothing is sent again. Recipients refused with 452 after others
    /// were taken go in a new transaction at once.
    pub async fn send(&self, t: &Transaction<'_>) -> Sent {
        let n = t.recipients.len();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
        let mut response = None;
        let mut tls = None;
        let Ok(_permit) = self.limit(t.server_address).acquire_owned().await else {
            let why = Outcome::Unusable("delivery limiter closed".into());
            return Sent {
                outcomes: vec![why; n],
                response,
                tls,
            };
        };
        // Each round either settles a recipient or stops: at most n + 1 rounds.
        let mut fresh_tries = 0;
        while outcomes.iter().any(Option::is_none) && fresh_tries < 2 {
            let open: Vec<usize> = (0..n).filter(|&i| outcomes[i].is_none()).collect();
            let (mut conn, pooled) = match self.connection(t).await {
                Ok(c) => c,
                Err(why) => {
                    fill(&mut outcomes, &open, Outcome::Unusable(why));
                    break;
                }
            };
            if !pooled {
                fresh_tries += 1;
            }
            tls = conn.tls.clone();
            let rcpts: Vec<&str> = open.iter().map(|&i| t.recipients[i].as_str()).collect();
            match transaction::run(&mut conn, t, &rcpts).await {
                Err(transaction::BeforeData(why)) if !pooled => {
                    let why = format!("{}: {why}", t.server_address);
                    fill(&mut outcomes, &open, Outcome::Unusable(why));
                }
                Err(transaction::BeforeData(why)) => {
                    tracing::debug!(server = %t.server_address, %why, "kept connection failed before the data: a fresh one");
                }
                Ok(ended) => {
                    response = response.or(ended.response);
                    let progress = ended.outcomes.iter().any(Option::is_some);
                    for (&i, o) in open.iter().zip(ended.outcomes) {
                        outcomes[i] = o;
                    }
                    if ended.reusable {
                        self.keep(&t.pool_key(), conn);
                    }
                    if !progress {
                        break;
                    }
                    fresh_tries = 0;
                }
            }
        }
        let left = Outcome::Deferred("452 4.5.3 too many recipients".into());
        Sent {
            outcomes: outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| left.clone()))
                .collect(),
            response,
            tls,
        }
    }

    /// Uses these CA certificates from now on (a reload).
    pub fn set_tls(&self, tls: tls::TlsClient) {
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = tls;
    }

    /// Says QUIT on every kept connection (at shutdown).
    pub async fn close_all(&self) {
        let conns: Vec<Connection> = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.drain()
                .flat_map(|(_, v)| v.into_iter().map(|(c, _)| c))
                .collect()
        };
        for c in conns {
            c.quit().await;
        }
    }
}

fn fill(outcomes: &mut [Option<Outcome>], which: &[usize], o: Outcome) {
    for &i in which {
        outcomes[i] = Some(o.clone());
    }
}
