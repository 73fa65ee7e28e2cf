//! The replica catalog: which server is each mailbox's home and which cluster
//! peers hold replicas (the equivalent of Domino's cluster database directory).
//!
//! `model` holds the records and address rules, `files` the import/export formats,
//! `validate` the invariants; `store` opens the sled layout and reads it, `plan`
//! computes what an import changes, `import` writes it atomically, `change` applies
//! record-at-a-time changes (`Catalog::apply`, for a directory sync); `records` keeps
//! mailbox records in numbered blocks, `names` the address → mailbox index (fst and
//! delta), `live` joins them for one generation; `index` is the server → mailboxes
//! index, `codec` the record and key encoding, `db` the sled store.

mod build;
pub mod change;
mod codec;
mod db;
pub mod files;
mod import;
pub mod index;
mod live;
pub mod model;
mod names;
mod plan;
mod records;
pub mod store;
pub mod validate;

pub use change::{ApplyReport, Change, Rejected};
pub use db::{open_db, store_path};
pub use files::{read_files, Format, Input, Problem};
pub use import::ImportError;
pub use model::{AdminState, Cluster, LocalPartMatch, Mailbox, ReplicaState, Server};
pub use plan::{Counts, ImportReport, Mode};
pub use store::{Catalog, Lookup, StaleFormat};
