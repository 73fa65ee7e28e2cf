//! What this router writes into messages: the Received trace header (`trace`), on
//! the mail it accepts and on the reports it originates, and the RFC 5322 date
//! (`date`). Shared by the SMTP service and the queue's DSNs, owned by neither.

pub mod date;
pub mod trace;
