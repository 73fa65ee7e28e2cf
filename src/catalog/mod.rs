//! The replica catalog: which server is each mailbox's home and which cluster
//! peers hold replicas (the equivalent of Domino's cluster database directory).
//!
//! `model` holds the records and address rules, `files` the import/export formats,
//! `validate` the invariants, `store` the sled layout and atomic imports.

pub mod change;
pub mod files;
pub mod index;
pub mod model;
pub mod store;
pub mod validate;

pub use change::{ApplyReport, Change, Rejected};
pub use files::{read_files, Format, Input, Problem};
pub use model::{AdminState, Cluster, LocalPartMatch, Mailbox, ReplicaState, Server};
pub use store::{open_db, store_path, Catalog, Counts, ImportError, ImportReport, Lookup, Mode};
