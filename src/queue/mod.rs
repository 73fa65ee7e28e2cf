//! The durable queue: every accepted message, its envelope and per-recipient state.
//!
//! `spool` stores messages in sled (their bodies in `segments`, or in `bodies`
//! when large) and makes them durable (group commit) before the SMTP session may
//! say 250 (`durable`: the flusher, with a real fdatasync);
//! `claim` says who may change a message now; `control` is the administrator's
//! actions on the queue; `pause` the servers an administrator paused; `view`
//! the queue views (list filters, summary); `id` makes queue ids;
//! `tombstone` recognises a message handed over twice (id and digest).

pub mod bodies;
pub mod claim;
pub mod control;
pub mod dsn;
pub mod durable;
pub mod envelope;
pub mod id;
pub mod manager;
pub mod pause;
pub mod schedule;
pub mod segments;
pub mod spool;
pub mod tombstone;
pub mod track;
pub mod view;

pub use id::QueueId;
pub use spool::{Envelope, Recipient, RecipientState, Spool};
