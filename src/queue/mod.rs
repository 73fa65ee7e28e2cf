//! The durable queue: every accepted message, its envelope and per-recipient state.
//!
//! `spool` stores messages in sled and makes them durable (group commit) before the
//! SMTP session may say 250; `id` makes queue ids;
//! `tombstone` recognises a message handed over twice (id and digest).

pub mod dsn;
pub mod id;
pub mod manager;
pub mod schedule;
pub mod spool;
pub mod tombstone;

pub use id::QueueId;
pub use spool::{Envelope, Recipient, RecipientState, Spool};
