//! Outbound SMTP: one transaction to one mailbox server carrying every recipient
//! routed there, over lettre's async SMTP connection (tokio). The queued octets are
//! sent as they are (lettre only dot-stuffs them); each recipient gets its own
//! outcome. Connections are reused per destination, and concurrency is limited per
//! destination ([`Deliverer`]) as well as globally (the queue manager).

pub mod mx;

use crate::health::probe::resolve;
use lettre::address::Address;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Mail, Quit, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// What became of one recipient in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server took the message for this recipient (its reply).
    Delivered(String),
    /// 4xx: try again (another server, or later).
    Temporary(String),
    /// 5xx: will never be taken.
    Permanent(String),
}

/// The transaction as a whole failed: the server is unusable now (could not
/// connect, timed out, 421, connection lost). Recipients must be re-routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable(pub String);

/// A transaction's result: one outcome per recipient, in order, and how long the
/// server took to answer MAIL (a response time independent of the message size,
/// for the availability index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub outcomes: Vec<Outcome>,
    pub response: Duration,
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
    pub timeout: Duration,
}

fn code_of(e: &lettre::transport::smtp::Error) -> Option<u16> {
    e.status().map(u16::from)
}

fn classify(e: &lettre::transport::smtp::Error) -> Result<Outcome, Unusable> {
    let text = e.to_string();
    match code_of(e) {
        Some(421) => Err(Unusable(text)),
        Some(c) if (400..500).contains(&c) => Ok(Outcome::Temporary(text)),
        Some(c) if (500..600).contains(&c) => Ok(Outcome::Permanent(text)),
        _ => Err(Unusable(text)),
    }
}

fn reply_text(r: &lettre::transport::smtp::response::Response) -> String {
    let code: u16 = r.code().into();
    format!("{code} {}", r.message().collect::<Vec<_>>().join(" "))
}

/// Delivers transactions with connection reuse and a concurrency limit per
/// destination: an idle connection to a server is kept for `idle` and used again
/// (after a NOOP proves it alive); at most `per_server` transactions run against one
/// server at once.
pub struct Deliverer {
    per_server: usize,
    idle: Duration,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    pool: Mutex<HashMap<String, Vec<(AsyncSmtpConnection, Instant)>>>,
}

impl Deliverer {
    pub fn new(per_server: usize, idle: Duration) -> Deliverer {
        Deliverer {
            per_server: per_server.max(1),
            idle,
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

    fn pooled(&self, server: &str) -> Option<AsyncSmtpConnection> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let idle = pool.get_mut(server)?;
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < self.idle {
                return Some(conn);
            }
        }
        None
    }

    fn keep(&self, server: &str, conn: AsyncSmtpConnection) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let idle = pool.entry(server.to_string()).or_default();
        if idle.len() < self.per_server {
            idle.push((conn, Instant::now()));
        }
    }

    /// Runs the transaction; one outcome per recipient, in order.
    pub async fn send(&self, t: &Transaction<'_>) -> Result<Sent, Unusable> {
        let limit = self.limit(t.server_address);
        let _permit = limit
            .acquire_owned()
            .await
            .map_err(|_| Unusable("delivery limiter closed".into()))?;
        // A kept connection the server has closed meanwhile fails the NOOP; one that
        // fails mid-transaction is retried once on a fresh connection, so that a stale
        // connection never marks a healthy server down.
        if let Some(mut conn) = self.pooled(t.server_address) {
            if tokio::time::timeout(t.timeout, conn.test_connected())
                .await
                .unwrap_or(false)
            {
                if let Ok(sent) = self.run(conn, t).await {
                    return Ok(sent);
                }
            }
        }
        let conn = connect(t).await?;
        self.run(conn, t).await
    }

    async fn run(
        &self,
        mut conn: AsyncSmtpConnection,
        t: &Transaction<'_>,
    ) -> Result<Sent, Unusable> {
        match tokio::time::timeout(t.timeout * 4, transaction(&mut conn, t)).await {
            Ok(Ok(sent)) => {
                // A clean state for the next transaction, then keep the connection.
                match tokio::time::timeout(t.timeout, conn.command(Rset)).await {
                    Ok(Ok(_)) => self.keep(t.server_address, conn),
                    _ => conn.abort().await,
                }
                Ok(sent)
            }
            Ok(Err(e)) => {
                conn.abort().await;
                Err(e)
            }
            Err(_) => {
                conn.abort().await;
                Err(Unusable(format!(
                    "{}: transaction timed out",
                    t.server_address
                )))
            }
        }
    }

    /// Says QUIT on every kept connection (at shutdown).
    pub async fn close_all(&self) {
        let conns: Vec<AsyncSmtpConnection> = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.drain()
                .flat_map(|(_, v)| v.into_iter().map(|(c, _)| c))
                .collect()
        };
        for mut c in conns {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.command(Quit)).await;
        }
    }
}

async fn connect(t: &Transaction<'_>) -> Result<AsyncSmtpConnection, Unusable> {
    let addr = resolve(t.server_address).await.map_err(Unusable)?;
    let hello = ClientId::Domain(t.hello_name.to_string());
    let unusable = |e: &dyn std::fmt::Display| Unusable(format!("{}: {e}", t.server_address));
    tokio::time::timeout(t.timeout, async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unusable(&format!("Connection error: {e}")))?;
        // Without it Nagle holds the data's last small write back until the
        // server's delayed ACK: 40 ms per message on Linux (measured).
        stream
            .set_nodelay(true)
            .map_err(|e| unusable(&format!("Connection error: {e}")))?;
        AsyncSmtpConnection::connect_with_transport(Box::new(stream), &hello)
            .await
            .map_err(|e| unusable(&e))
    })
    .await
    .map_err(|_| Unusable(format!("{}: connect timed out", t.server_address)))?
}

async fn transaction(
    conn: &mut AsyncSmtpConnection,
    t: &Transaction<'_>,
) -> Result<Sent, Unusable> {
    let mut response = Duration::ZERO;
    let outcomes = recipients(conn, t, &mut response).await?;
    Ok(Sent { outcomes, response })
}

async fn recipients(
    conn: &mut AsyncSmtpConnection,
    t: &Transaction<'_>,
    response: &mut Duration,
) -> Result<Vec<Outcome>, Unusable> {
    let mut params = Vec::new();
    if (t.eight_bit || !t.message.is_ascii())
        && conn.server_info().supports_feature(Extension::EightBitMime)
    {
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    if t.smtputf8 {
        if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            let why = "5.6.7 the server does not support SMTPUTF8".to_string();
            return Ok(vec![Outcome::Permanent(why); t.recipients.len()]);
        }
        params.push(MailParameter::SmtpUtfEight);
    }
    let sender = match t.sender {
        Some(s) => Some(Address::from_str(s).map_err(|e| Unusable(format!("sender <{s}>: {e}")))?),
        None => None,
    };
    let started = Instant::now();
    let mail = conn.command(Mail::new(sender, params)).await;
    *response = started.elapsed();
    if let Err(e) = mail {
        // MAIL refused: the same answer for every recipient.
        let o = classify(&e)?;
        return Ok(vec![o; t.recipients.len()]);
    }
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(t.recipients.len());
    for r in t.recipients {
        let address = match Address::from_str(r) {
            Ok(a) => a,
            Err(e) => {
                outcomes.push(Some(Outcome::Permanent(format!("5.1.3 <{r}>: {e}"))));
                continue;
            }
        };
        match conn.command(Rcpt::new(address, vec![])).await {
            Ok(_) => outcomes.push(None),
            Err(e) => outcomes.push(Some(classify(&e)?)),
        }
    }
    if outcomes.iter().all(Option::is_some) {
        return Ok(outcomes.into_iter().flatten().collect());
    }
    if let Err(e) = conn.command(Data).await {
        let o = classify(&e)?;
        return Ok(outcomes
            .into_iter()
            .map(|x| x.unwrap_or_else(|| o.clone()))
            .collect());
    }
    // lettre ends the data with CRLF.CRLF itself: drop the message's own last CRLF
    // so that the octets arrive exactly as queued.
    let body = t.message.strip_suffix(b"\r\n").unwrap_or(t.message);
    let after_data = match conn.message(body).await {
        Ok(r) => Outcome::Delivered(reply_text(&r)),
        Err(e) => classify(&e)?,
    };
    Ok(outcomes
        .into_iter()
        .map(|x| x.unwrap_or_else(|| after_data.clone()))
        .collect())
}
