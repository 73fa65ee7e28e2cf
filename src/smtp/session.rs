//! The inbound SMTP session as a pure state machine: a command line in, an
//! [`Action`] (reply, read data, start TLS, close) out. No I/O: the connection
//! driver (`server.rs`) does the reading and writing, the spool the storing.

use super::address::Mailbox;
use super::command::{self, Body, Command};
use super::data::{check_body, normalize_line_endings, normalized_len, BodyCheck, DataDecoder};
use super::reply::{self, Reply};
use crate::config::{BareLineEndings, LongLines};

/// What the session needs to know of the service.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: usize,
    pub long_lines: LongLines,
    pub bare_line_endings: BareLineEndings,
    /// A certificate is configured: STARTTLS may be offered.
    pub tls_available: bool,
    /// More Received headers than this: a mail loop, refused.
    pub max_hops: usize,
}

/// The relay policy's answer for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A catalog mailbox (its primary address).
    Accept(String),
    /// A domain we serve, but no such mailbox.
    UnknownUser,
    /// Not ours: relaying denied (with the reason shown to the client).
    RelayDenied(&'static str),
    /// The catalog could not be read: try again later.
    TempFail,
}

/// Decides which recipients this relay accepts.
pub trait RecipientPolicy {
    fn check(&self, rcpt: &Mailbox) -> Verdict;
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Reply(Reply),
    /// Send the reply, then close the connection.
    Close(Reply),
    /// Send the 220, then run the TLS handshake and call [`Session::tls_started`].
    StartTls(Reply),
    /// Send the 354, then read the data and call [`Session::data_received`].
    ReadData(Reply),
    /// Read exactly `size` octets. With `refuse`, discard them and send that reply;
    /// else pass them to [`Session::bdat_chunk`].
    ReadBdat {
        size: u64,
        last: bool,
        refuse: Option<Reply>,
    },
}

/// A complete message, ready to be queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub sender: Option<String>,
    /// (forward-path as given, catalog mailbox).
    pub recipients: Vec<(String, String)>,
    pub helo: String,
    pub esmtp: bool,
    pub tls: bool,
    pub smtputf8: bool,
    pub eight_bit: bool,
    pub body: Vec<u8>,
    pub check: BodyCheck,
}

#[derive(Debug, Default)]
struct Transaction {
    sender: Option<Mailbox>,
    smtputf8: bool,
    eight_bit: bool,
    recipients: Vec<(String, String)>,
    /// RCPT commands refused (DATA with none accepted then says 554, not 503).
    refused: usize,
    /// BDAT chunks so far.
    chunks: Option<Vec<u8>>,
    /// A BDAT chunk went over the size limit: the rest is discarded.
    bdat_failed: bool,
}

#[derive(Debug)]
pub struct Session {
    settings: Settings,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    tx: Option<Transaction>,
    errors: usize,
}

impl Session {
    pub fn new(settings: Settings) -> Session {
        Session {
            settings,
            helo: None,
            esmtp: false,
            tls: false,
            tx: None,
            errors: 0,
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::multi(
            220,
            vec![format!("{} ESMTP clustermail", self.settings.name)],
        )
    }

    /// A transaction is under way (MAIL given, not yet finished or reset).
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    pub fn tls_active(&self) -> bool {
        self.tls
    }

    /// Counts a client error; past the limit the session closes.
    fn error(&mut self, r: Reply) -> Action {
        self.errors += 1;
        if self.errors >= self.settings.max_errors {
            return Action::Close(Reply::new(
                421,
                "4.7.0",
                format!("{} Too many errors, closing connection", self.settings.name),
            ));
        }
        Action::Reply(r)
    }

    /// A refused RCPT: counted in the transaction (DATA with no recipient then
    /// says 554) and, as in Postfix's hard error limit, as a client error: a
    /// client guessing mailboxes is cut off after `max_errors` refusals without
    /// a message given (a message accepted starts the count again).
    fn refuse_recipient(&mut self, r: Reply) -> Action {
        if let Some(tx) = self.tx.as_mut() {
            tx.refused += 1;
        }
        self.error(r)
    }

    /// The command line was over 512 octets (the driver skipped the rest of it).
    pub fn line_too_long(&mut self) -> Action {
        self.error(reply::line_too_long())
    }

    /// Handles one command line (without CRLF).
    pub fn command(&mut self, line: &[u8], policy: &dyn RecipientPolicy) -> Action {
        let cmd = match command::parse(line, self.esmtp) {
            Ok(c) => c,
            Err(r) => return self.error(r),
        };
        match cmd {
            Command::Ehlo(name) => self.ehlo(name),
            Command::Helo(name) => self.helo(name),
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to } => self.rcpt(to, policy),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.tx = None;
                Action::Reply(reply::ok("Reset"))
            }
            Command::Noop => Action::Reply(reply::ok("Ok")),
            Command::Quit => Action::Close(Reply::new(
                221,
                "2.0.0",
                format!("{} Bye", self.settings.name),
            )),
            Command::Vrfy => Action::Reply(Reply::new(
                252,
                "2.5.2",
                "Cannot VRFY user; send mail and it will be delivered",
            )),
            Command::Expn => Action::Reply(Reply::new(502, "5.5.1", "EXPN is not available")),
            Command::Help => Action::Reply(Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
            )),
            Command::StartTls => self.starttls(),
        }
    }

    /// EHLO: a new session state in ESMTP, and the extensions offered.
    fn ehlo(&mut self, name: String) -> Action {
        self.tx = None;
        self.esmtp = true;
        let mut lines = vec![format!("{} Hello {name}", self.settings.name)];
        lines.extend([
            "PIPELINING".to_string(),
            format!("SIZE {}", self.settings.max_message_size),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            "SMTPUTF8".into(),
            "CHUNKING".into(),
        ]);
        if self.settings.tls_available && !self.tls {
            lines.push("STARTTLS".into());
        }
        lines.push("HELP".into());
        self.helo = Some(name);
        Action::Reply(Reply::multi(250, lines))
    }

    /// HELO: a new session state in plain SMTP.
    fn helo(&mut self, name: String) -> Action {
        self.tx = None;
        self.esmtp = false;
        let r = Reply::multi(250, vec![format!("{} Hello {name}", self.settings.name)]);
        self.helo = Some(name);
        Action::Reply(r)
    }

    /// MAIL: starts a transaction.
    fn mail(&mut self, from: Option<Mailbox>, params: command::MailParams) -> Action {
        if self.helo.is_none() {
            return self.error(reply::bad_sequence("Send EHLO or HELO first"));
        }
        if self.tx.is_some() {
            return self.error(reply::bad_sequence("Nested MAIL command"));
        }
        if let Some(size) = params.size {
            if size > self.settings.max_message_size {
                return Action::Reply(too_big(self.settings.max_message_size));
            }
        }
        if let Some(m) = &from {
            if !m.is_ascii() && !params.smtputf8 {
                return Action::Reply(Reply::new(
                    553,
                    "5.6.7",
                    "Non-ASCII sender address needs SMTPUTF8",
                ));
            }
        }
        let sender = from.as_ref().map(|m| m.to_string()).unwrap_or_default();
        self.tx = Some(Transaction {
            sender: from,
            smtputf8: params.smtputf8,
            eight_bit: params.body == Body::EightBitMime,
            ..Transaction::default()
        });
        Action::Reply(Reply::new(250, "2.1.0", format!("Sender <{sender}> ok")))
    }

    /// DATA: the message follows, if the transaction has a recipient.
    fn data(&mut self) -> Action {
        match &self.tx {
            None => self.error(reply::bad_sequence("Need MAIL command first")),
            Some(tx) if tx.chunks.is_some() => self.error(reply::bad_sequence("DATA after BDAT")),
            Some(tx) if tx.recipients.is_empty() && tx.refused > 0 => {
                Action::Reply(Reply::new(554, "5.5.1", "No valid recipients"))
            }
            Some(tx) if tx.recipients.is_empty() => {
                self.error(reply::bad_sequence("Need RCPT command first"))
            }
            Some(_) => Action::ReadData(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>")),
        }
    }

    /// BDAT: a chunk follows; it is read (and discarded when refused) in any case.
    fn bdat(&mut self, size: u64, last: bool) -> Action {
        let refuse = match &mut self.tx {
            None => Some(reply::bad_sequence("Need MAIL command first")),
            Some(tx) if tx.recipients.is_empty() && tx.refused > 0 => {
                Some(Reply::new(554, "5.5.1", "No valid recipients"))
            }
            Some(tx) if tx.recipients.is_empty() => {
                Some(reply::bad_sequence("Need RCPT command first"))
            }
            Some(tx) => {
                let so_far = tx.chunks.as_ref().map_or(0, |c| c.len() as u64);
                if tx.bdat_failed || so_far.saturating_add(size) > self.settings.max_message_size {
                    tx.bdat_failed = true;
                    Some(too_big(self.settings.max_message_size))
                } else {
                    tx.chunks.get_or_insert_with(Vec::new);
                    None
                }
            }
        };
        if refuse.is_some() && last {
            // The transaction ends with a refused last chunk.
            if self.tx.as_ref().is_some_and(|t| t.bdat_failed) {
                self.tx = None;
            }
        }
        Action::ReadBdat { size, last, refuse }
    }

    /// STARTTLS: only outside a transaction, and only once.
    fn starttls(&mut self) -> Action {
        if !self.settings.tls_available {
            return self.error(Reply::new(502, "5.5.1", "STARTTLS is not available"));
        }
        if self.tls {
            return self.error(bad_tls());
        }
        if self.tx.is_some() {
            return self.error(reply::bad_sequence("STARTTLS inside a transaction"));
        }
        Action::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"))
    }

    /// RCPT: the relay policy decides; a mailbox already a recipient is kept once.
    fn rcpt(&mut self, to: Mailbox, policy: &dyn RecipientPolicy) -> Action {
        let Some(tx) = self.tx.as_mut() else {
            return self.error(reply::bad_sequence("Need MAIL command first"));
        };
        if tx.chunks.is_some() {
            return self.error(reply::bad_sequence("RCPT after BDAT"));
        }
        if tx.recipients.len() >= self.settings.max_recipients {
            return Action::Reply(Reply::new(452, "4.5.3", "Too many recipients"));
        }
        if !to.is_ascii() && !tx.smtputf8 {
            return self.refuse_recipient(Reply::new(
                553,
                "5.6.7",
                "Non-ASCII recipient address needs SMTPUTF8",
            ));
        }
        match policy.check(&to) {
            // The same mailbox again (the same address, or another of its
            // addresses): accepted, delivered once.
            Verdict::Accept(mailbox) if tx.recipients.iter().any(|(_, m)| *m == mailbox) => {
                Action::Reply(Reply::new(
                    250,
                    "2.1.5",
                    format!("Recipient <{to}> ok (already a recipient: delivered once)"),
                ))
            }
            Verdict::Accept(mailbox) => {
                let r = Reply::new(250, "2.1.5", format!("Recipient <{to}> ok"));
                tx.recipients.push((to.to_string(), mailbox));
                Action::Reply(r)
            }
            Verdict::UnknownUser => self.refuse_recipient(Reply::new(
                550,
                "5.1.1",
                format!("<{to}>: no such mailbox here"),
            )),
            Verdict::RelayDenied(why) => self.refuse_recipient(Reply::new(
                550,
                "5.7.1",
                format!("<{to}>: relaying denied: {why}"),
            )),
            Verdict::TempFail => Action::Reply(Reply::new(
                451,
                "4.3.0",
                format!("<{to}>: recipient lookup failed, try again later"),
            )),
        }
    }

    /// The TLS handshake succeeded: the session starts over (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
    }

    /// The decoder for the data that follows the 354 of [`Action::ReadData`].
    pub fn data_decoder(&self) -> DataDecoder {
        match self.settings.bare_line_endings {
            BareLineEndings::Normalize => DataDecoder::normalizing(self.settings.max_message_size),
            BareLineEndings::Reject | BareLineEndings::Accept => {
                DataDecoder::new(self.settings.max_message_size)
            }
        }
    }

    /// The driver refused the transaction's data (the memory budget for message
    /// data was spent): the transaction is over, the session goes on.
    pub fn abort_transaction(&mut self) {
        self.tx = None;
    }

    /// The DATA octets were read (`over_size`: counted past the limit, not kept).
    /// Returns the message to queue, or the reply refusing it; either way the
    /// transaction is over once the driver has called [`Session::finish`] or got a reply.
    pub fn data_received(&mut self, body: Vec<u8>, over_size: bool) -> Result<Message, Reply> {
        let Some(tx) = self.tx.take() else {
            return Err(reply::bad_sequence("No transaction"));
        };
        if over_size {
            return Err(too_big(self.settings.max_message_size));
        }
        self.message(tx, body)
    }

    /// A BDAT chunk was read. Not last: `Ok(None)` and the reply to send is
    /// [`Session::chunk_reply`]. Last: the message to queue, or a refusal.
    /// The first chunk becomes the message buffer (no copy); later ones are appended.
    pub fn bdat_chunk(&mut self, chunk: Vec<u8>, last: bool) -> Result<Option<Message>, Reply> {
        let Some(tx) = self.tx.as_mut() else {
            return Err(reply::bad_sequence("No transaction"));
        };
        let buf = tx.chunks.get_or_insert_with(Vec::new);
        if buf.is_empty() {
            *buf = chunk;
        } else {
            buf.reserve_exact(chunk.len());
            buf.extend_from_slice(&chunk);
        }
        if !last {
            return Ok(None);
        }
        let Some(mut tx) = self.tx.take() else {
            return Err(reply::bad_sequence("No transaction"));
        };
        let mut body = tx.chunks.take().unwrap_or_default();
        if self.settings.bare_line_endings == BareLineEndings::Normalize {
            // On the whole message: a CR ending one chunk and the LF starting the
            // next are one CRLF.
            // Checked before it grows: a body of bare LFs doubles.
            if normalized_len(&body) as u64 > self.settings.max_message_size {
                return Err(too_big(self.settings.max_message_size));
            }
            normalize_line_endings(&mut body);
        }
        self.message(tx, body).map(Some)
    }

    pub fn chunk_reply(size: u64) -> Reply {
        Reply::new(250, "2.0.0", format!("{size} octets received"))
    }

    fn message(&mut self, tx: Transaction, body: Vec<u8>) -> Result<Message, Reply> {
        let check = check_body(&body);
        if check.bare_line_ending && self.settings.bare_line_endings == BareLineEndings::Reject {
            return Err(Reply::new(
                550,
                "5.6.0",
                "Message refused: bare CR or LF in the data (RFC 5321 section 2.3.8)",
            ));
        }
        if check.long_line && self.settings.long_lines == LongLines::Reject {
            return Err(Reply::new(
                550,
                "5.6.0",
                "Message refused: a line is over 998 octets",
            ));
        }
        if check.received > self.settings.max_hops {
            return Err(Reply::new(
                554,
                "5.4.6",
                format!(
                    "Too many hops ({} Received headers): a mail loop",
                    check.received
                ),
            ));
        }
        // A message given: the client's errors so far are forgiven.
        self.errors = 0;
        Ok(Message {
            sender: tx.sender.map(|m| m.to_string()),
            recipients: tx.recipients,
            helo: self.helo.clone().unwrap_or_default(),
            esmtp: self.esmtp,
            tls: self.tls,
            smtputf8: tx.smtputf8,
            eight_bit: tx.eight_bit,
            body,
            check,
        })
    }
}

fn too_big(max: u64) -> Reply {
    Reply::new(
        552,
        "5.3.4",
        format!("Message size exceeds the limit of {max} octets"),
    )
}

fn bad_tls() -> Reply {
    reply::bad_sequence("TLS is already active")
}

#[cfg(test)]
mod tests;
