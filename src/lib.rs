//! clustermail: a Domino-style cluster mail router.
//!
//! For every recipient it consults the replica catalog ([`catalog`]) to find the
//! mailbox's home server and the cluster peers holding replicas, delivers home when
//! the home is up, fails over to a replica when it is not, and otherwise holds the
//! message and retries the home server only.

pub mod admin;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod deliver;
pub mod demo;
pub mod directory;
pub mod gate;
pub mod ha;
pub mod health;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod queue;
pub mod reload;
pub mod route;
pub mod router;
pub mod smtp;
pub mod web;
