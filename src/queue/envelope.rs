//! The queue's records: a message's envelope and each recipient's state (what
//! the spool stores, without the octets; the spool owns their encoding).

use super::QueueId;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Where a recipient stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientState {
    /// Not yet routed: the first attempt may fail over.
    Pending,
    /// Kept in the queue: retried on the home server only (see `route`).
    Held,
    /// A server took it (2xx after DATA).
    Delivered {
        server: String,
        reply: String,
        at: u64,
    },
    /// Permanently refused, or expired.
    Failed { reply: String, at: u64 },
    /// Permanently refused or expired, kept for an administrator instead of bounced
    /// (`routing.hold_undeliverable`): `queue release`, `queue bounce` or `queue delete`.
    Undeliverable { reply: String, at: u64 },
    /// Its server is paused by an administrator (`servers pause`): waits, no
    /// attempt and no failover, until `servers resume`; still expires.
    Paused,
    /// Held by an administrator (`queue hold`): never attempted until `queue
    /// unhold`; still expires. (Not `Held`, the routing state.)
    OnHold,
}

impl RecipientState {
    /// Delivered or failed: nothing more to do for this recipient.
    /// No more automatic attempts: delivered, failed, or undeliverable (waiting for
    /// an administrator).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RecipientState::Delivered { .. }
                | RecipientState::Failed { .. }
                | RecipientState::Undeliverable { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The forward-path as the client gave it (source route dropped).
    pub address: String,
    /// The catalog mailbox it belongs to (primary address); empty for an address
    /// outside the catalog (a bounce to an outside sender).
    pub mailbox: String,
    pub state: RecipientState,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Milliseconds since the epoch of the next attempt (0: now).
    pub next_attempt: u64,
    /// The last routing decision and why, and the last error, for `queue show`.
    pub last_route: Option<String>,
    pub last_error: Option<String>,
    /// Failed and its bounce queued (or none owed: null sender).
    pub reported: bool,
    /// When it expires, in milliseconds since the epoch; 0: the message's arrival
    /// plus `max_queue_lifetime` (a released recipient gets a new lifetime).
    pub expires_at: u64,
    /// Its delay report (`routing.delay_warning`) is queued, or none is owed.
    /// Stored after the envelope record (see the spool's `encode`), not inside it.
    #[serde(skip)]
    pub delay_reported: bool,
}

impl Recipient {
    pub fn new(address: String, mailbox: String) -> Recipient {
        Recipient {
            address,
            mailbox,
            state: RecipientState::Pending,
            attempts: 0,
            next_attempt: 0,
            last_route: None,
            last_error: None,
            reported: false,
            expires_at: 0,
            delay_reported: false,
        }
    }

    /// Open again after a pause or an administrator's hold, due now: held
    /// (retrying its home only) if it was tried before, else pending.
    pub fn reopen(&mut self) {
        self.state = if self.attempts > 0 {
            RecipientState::Held
        } else {
            RecipientState::Pending
        };
        self.next_attempt = 0;
    }

    /// When it expires (ms since the epoch): its own lifetime if released, else
    /// the message's arrival plus `lifetime`.
    pub fn deadline(&self, received_at: u64, lifetime: std::time::Duration) -> u64 {
        if self.expires_at > 0 {
            self.expires_at
        } else {
            received_at + lifetime.as_millis() as u64
        }
    }

    /// Failed and no bounce queued yet.
    pub fn needs_bounce(&self) -> bool {
        matches!(self.state, RecipientState::Failed { .. }) && !self.reported
    }

    /// Nothing more to do: delivered, or failed and reported.
    pub fn is_done(&self) -> bool {
        match self.state {
            RecipientState::Delivered { .. } => true,
            RecipientState::Failed { .. } => self.reported,
            _ => false,
        }
    }
}

/// Everything about a queued message except its octets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    /// Reverse-path; None for the null sender `<>`.
    pub sender: Option<String>,
    pub recipients: Vec<Recipient>,
    pub client_ip: IpAddr,
    pub helo: String,
    /// Milliseconds since the epoch.
    pub received_at: u64,
    /// Octets of the queued message (Received header included).
    pub size: u64,
    pub smtputf8: bool,
    pub eight_bit: bool,
}
