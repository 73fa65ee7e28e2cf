//! Accepting a message: its trace header, its envelope, and queueing it durably
//! (with its shadow copy in an HA pair, through [`Replication`]) before the 250.

use super::{Budget, Message, Reply, Service};
use crate::message::trace::{received, Trace};
use crate::queue::{Envelope, QueueId, Recipient, Spool};
use anyhow::Result;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A durable copy of each accepted message besides the local queue: the HA
/// pair's shadow copy on the SLAVE (`crate::ha::shadow` implements it). The SMTP
/// service knows it only by this trait.
pub trait Replication: Send + Sync {
    /// Queues `message` in `spool` durably, with its copy; Ok only then may the
    /// session say 250. The buffer is freed once both have it.
    fn accept<'a>(
        &'a self,
        spool: &'a Spool,
        budget: &'a Arc<Budget>,
        env: &'a Envelope,
        message: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;
    /// New transactions are refused (`451 4.3.0`): a copy is required and
    /// cannot be made now.
    fn refuses(&self) -> bool;
}

impl Service {
    /// Queues an accepted message durably (and its copy, in an HA pair with
    /// shadows on); Ok only then may the session say 250.
    pub async fn accept_durable(&self, env: &Envelope, message: Vec<u8>) -> Result<()> {
        match self.replication.get() {
            Some(r) => r.accept(&self.spool, &self.budget, env, message).await,
            None => self.spool.enqueue(env, message).await,
        }
    }

    /// Whether a new transaction is refused for want of a copy (`451 4.3.0`).
    pub fn shadow_refuses(&self) -> bool {
        self.replication.get().is_some_and(|r| r.refuses())
    }
}

/// Queues a message durably; the reply is 250 only once it is on disk.
pub(super) async fn accept(service: &Service, m: Message, peer: SocketAddr) -> Reply {
    let id = QueueId::new();
    let id_text = id.to_string();
    let now = SystemTime::now();
    let header = received(&Trace {
        helo: &m.helo,
        client_ip: peer.ip(),
        router: &service.settings.name,
        esmtp: m.esmtp,
        tls: m.tls,
        smtputf8: m.smtputf8,
        id: &id_text,
        recipients: &m.recipients,
        when: now,
    });
    // In place, in the room the budget kept for it: no second copy of the body.
    let mut message = m.body;
    prepend(&mut message, header.as_bytes());
    let env = Envelope {
        id,
        sender: m.sender,
        recipients: m
            .recipients
            .into_iter()
            .map(|(address, mailbox)| Recipient::new(address, mailbox))
            .collect(),
        client_ip: peer.ip(),
        helo: m.helo,
        received_at: now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        size: message.len() as u64,
        smtputf8: m.smtputf8,
        eight_bit: m.eight_bit,
    };
    let rcpts: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
    let rcpts = rcpts.join(",");
    let from = env.sender.as_deref().unwrap_or("<>");
    let message_id = crate::queue::track::message_id(&message);
    match service.accept_durable(&env, message).await {
        Ok(()) => {
            crate::metrics::METRICS.messages_accepted.inc();
            crate::queue::track::accepted(service.spool.db(), &env, message_id);
            let r = Reply::new(250, "2.0.0", format!("Ok: queued as {id_text}"));
            tracing::info!(id = %id_text, %peer, helo = %env.helo, from = %from, rcpts = %rcpts, size = env.size, reply = %r, "message accepted");
            r
        }
        Err(e) => {
            let r = Reply::new(451, "4.3.0", "Queueing failed, try again later");
            tracing::error!(id = %id_text, %peer, from = %from, rcpts = %rcpts, error = %e, reply = %r, "message refused: queueing failed");
            r
        }
    }
}

/// Puts `head` before `body`, moving the body within its own buffer.
fn prepend(body: &mut Vec<u8>, head: &[u8]) {
    let n = body.len();
    body.reserve_exact(head.len());
    body.resize(n + head.len(), 0);
    body.copy_within(0..n, head.len());
    body[..head.len()].copy_from_slice(head);
}
