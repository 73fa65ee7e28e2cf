//! One SMTP mail transaction on an open connection: MAIL, RCPT for each recipient
//! (pipelined when the server offers PIPELINING), DATA, the data, and the reply to
//! the final "."; what each reply means for each recipient.
//!
//! The line that matters is the data: until the terminating "." may have reached
//! the server, a failure leaves nothing stored and the caller may hand the
//! recipients to a fresh connection or another server; from then on a failure is
//! [`Outcome::Unconfirmed`] and the message is never sent again in this attempt.

use super::client::{Connection, Reply};
use super::path;
use super::{Outcome, Transaction};
use std::time::{Duration, Instant};

/// How a transaction ended.
pub struct Ended {
    /// One outcome per recipient asked for, in order; `None`: refused with 452
    /// after other recipients were taken (too many recipients): ask again in a
    /// new transaction at once.
    pub outcomes: Vec<Option<Outcome>>,
    /// How long the server took to answer MAIL.
    pub response: Option<Duration>,
    /// The connection is in a clean state and may be kept.
    pub reusable: bool,
}

/// The session failed before the data could have reached the server (connection
/// lost, timeout, garbage, 421): nothing was stored.
pub struct BeforeData(pub String);

fn outcome_of(reply: &Reply) -> Outcome {
    let text = reply.to_string();
    match reply.code {
        200..=399 => Outcome::Delivered(text),
        400..=499 => Outcome::Deferred(text),
        _ => Outcome::Permanent(text),
    }
}

/// The message's header block (up to the empty line).
fn header_block(message: &[u8]) -> &[u8] {
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message, |end| &message[..end])
}

/// The MAIL FROM line, or why every recipient fails without asking the server:
/// an unwritable sender, 8-bit data for a server without 8BITMIME (RFC 6152 §3: not
/// converted, refused with 5.6.3), or a message that needs SMTPUTF8 (a UTF-8
/// address or header) for a server without it (RFC 6531 §3.2: 5.6.7). A message
/// that asked for SMTPUTF8 but needs none of it goes without it.
fn mail_line(
    conn: &Connection,
    t: &Transaction<'_>,
    recipients: &[&str],
) -> Result<String, Outcome> {
    let sender = match t.sender {
        None => String::new(),
        Some(s) => {
            path::render(s).map_err(|e| Outcome::Permanent(format!("550 5.1.7 sender {}", e.0)))?
        }
    };
    let ext = conn.extensions;
    let needs_utf8 = !sender.is_ascii()
        || recipients.iter().any(|r| !r.is_ascii())
        || (t.smtputf8 && !header_block(t.message).is_ascii());
    if needs_utf8 && !ext.smtputf8 {
        return Err(Outcome::Permanent(
            "550 5.6.7 the server does not support SMTPUTF8, which this message needs".into(),
        ));
    }
    let eight_bit = !t.message.is_ascii();
    if eight_bit && !ext.eight_bit_mime && !(needs_utf8 && ext.smtputf8) {
        return Err(Outcome::Permanent(
            "554 5.6.3 the server does not support 8BITMIME; 8-bit data is not converted".into(),
        ));
    }
    let mut line = format!("MAIL FROM:<{sender}>");
    if (t.eight_bit || eight_bit) && ext.eight_bit_mime {
        line.push_str(" BODY=8BITMIME");
    }
    if needs_utf8 {
        line.push_str(" SMTPUTF8");
    }
    Ok(line)
}

/// Runs one transaction for `recipients` (a subset of `t.recipients`).
pub async fn run(
    conn: &mut Connection,
    t: &Transaction<'_>,
    recipients: &[&str],
) -> Result<Ended, BeforeData> {
    let n = recipients.len();
    let unasked = |outcomes| Ended {
        outcomes,
        response: None,
        reusable: true,
    };
    let mail = match mail_line(conn, t, recipients) {
        Ok(line) => line,
        Err(o) => return Ok(unasked(vec![Some(o); n])),
    };
    // Recipients that cannot be written get their outcome now and are not asked.
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    let mut lines = Vec::new();
    for (i, r) in recipients.iter().enumerate() {
        match path::render(r) {
            Ok(p) => lines.push((i, format!("RCPT TO:<{p}>"))),
            Err(e) => outcomes[i] = Some(Outcome::Permanent(format!("550 5.1.3 {}", e.0))),
        }
    }
    if lines.is_empty() {
        return Ok(unasked(outcomes));
    }
    let (mail_reply, rcpt_replies, response) = envelope(conn, t.timeout, &mail, &lines).await?;
    let (accepted, o, reusable) = if !mail_reply.is_positive() {
        // MAIL refused: the same answer for every recipient; 4xx here refuses the
        // transaction, not a recipient, so another server may take it now.
        let asked = lines.iter().map(|(i, _)| *i).collect();
        (asked, refused(&mail_reply), false)
    } else {
        let mut accepted = Vec::new();
        for ((i, _), reply) in lines.iter().zip(rcpt_replies) {
            outcomes[*i] = if reply.is_positive() {
                accepted.push(*i);
                None
            } else if reply.code == 452 && !accepted.is_empty() {
                None
            } else {
                Some(outcome_of(&reply))
            };
        }
        if accepted.is_empty() {
            return Ok(Ended {
                outcomes,
                response: Some(response),
                reusable: false,
            });
        }
        let (o, reusable) = data(conn, t).await?;
        (accepted, o, reusable)
    };
    for i in accepted {
        outcomes[i] = Some(o.clone());
    }
    Ok(Ended {
        outcomes,
        response: Some(response),
        reusable,
    })
}

/// A refusal of the whole transaction before the data: a 4xx lets another
/// server take it now.
fn refused(reply: &Reply) -> Outcome {
    match outcome_of(reply) {
        Outcome::Deferred(x) | Outcome::Delivered(x) => Outcome::Temporary(x),
        o => o,
    }
}

/// DATA, the data and the reply to it: the outcome for every accepted recipient
/// and whether the connection may be kept.
async fn data(conn: &mut Connection, t: &Transaction<'_>) -> Result<(Outcome, bool), BeforeData> {
    let data = conn.command("DATA", t.timeout).await.map_err(BeforeData)?;
    if data.code == 421 {
        return Err(BeforeData(format!("DATA: {data}")));
    }
    if data.code != 354 {
        return Ok((refused(&data), false));
    }
    let after = match conn.data(t.message, t.timeout).await {
        Err((why, false)) => return Err(BeforeData(why)),
        Err((why, true)) => Err(why),
        Ok(()) => conn.reply(t.final_timeout, "reply to the data").await,
    };
    Ok(match after {
        Ok(reply) => (outcome_of(&reply), reply.code != 421),
        Err(why) => (Outcome::Unconfirmed(why), false),
    })
}

/// Sends MAIL and the RCPTs (at once under PIPELINING, RFC 2920) and reads their
/// replies; also how long MAIL took to answer. 421 anywhere is a session failure.
async fn envelope(
    conn: &mut Connection,
    timeout: Duration,
    mail: &str,
    rcpts: &[(usize, String)],
) -> Result<(Reply, Vec<Reply>, Duration), BeforeData> {
    let started = Instant::now();
    let pipelined = conn.extensions.pipelining;
    let closed = |r: &Reply| r.code == 421;
    if pipelined {
        let mut batch = format!("{mail}\r\n");
        for (_, l) in rcpts {
            batch.push_str(l);
            batch.push_str("\r\n");
        }
        conn.send(batch.as_bytes(), timeout)
            .await
            .map_err(BeforeData)?;
    }
    let mail_reply = if pipelined {
        conn.reply(timeout, "MAIL").await
    } else {
        conn.command(mail, timeout).await
    }
    .map_err(BeforeData)?;
    let response = started.elapsed();
    if closed(&mail_reply) {
        return Err(BeforeData(format!("MAIL: {mail_reply}")));
    }
    let mut replies = Vec::with_capacity(rcpts.len());
    for (_, l) in rcpts {
        if !pipelined && !mail_reply.is_positive() {
            break;
        }
        let r = if pipelined {
            conn.reply(timeout, "RCPT").await
        } else {
            conn.command(l, timeout).await
        }
        .map_err(BeforeData)?;
        if closed(&r) {
            return Err(BeforeData(format!("RCPT: {r}")));
        }
        replies.push(r);
    }
    Ok((mail_reply, replies, response))
}
