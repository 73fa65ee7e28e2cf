//! Administrator commands behind the CLI (`clustermail catalog …`, `config check`);
//! `execute` runs one parsed command (`crate::cli`) for the binary, the admin socket
//! and the web console alike.
//! Each prints for people on stdout, problems on stderr, and returns an [`Exit`].

pub mod catalog;
pub mod directory;
pub mod execute;
pub mod queue;
pub mod routes;
pub mod socket;
pub mod users;

/// How a command ended, as a process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// Something failed (an I/O or store error).
    Failed = 1,
    /// The input was invalid (bad file rows, bad arguments); nothing was changed.
    Invalid = 2,
}

pub use execute::{execute, Context};
