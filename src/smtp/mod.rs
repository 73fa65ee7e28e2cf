//! Inbound SMTP (RFC 5321): the session state machine, its parsers, and the tokio
//! driver that serves it.
//!
//! - `command`, `address`: parsing command lines and paths (pure).
//! - `session`: the state machine (pure): command in, reply or action out.
//! - `data`: DATA decoding and body checks (pure; the SMTP smuggling defence).
//! - `conn`: framing over a stream (lines, data, BDAT chunks, pipelined replies).
//! - `server`: listeners, limits, timeouts, STARTTLS, durable accept, shutdown.
//! - `limits`: the memory budget for message data shared by all sessions, and
//!   the open-files limit.
//! - `policy`: the catalog-backed relay policy.

pub mod address;
pub mod command;
pub mod conn;
pub mod data;
pub mod limits;
pub mod policy;
pub mod reply;
pub mod server;
pub mod session;
pub mod tls;
