//! Delivery status notifications (RFC 3464): one `multipart/report` per message
//! naming every recipient that failed (`Action: failed`), or that is still not
//! delivered after `routing.delay_warning` (`Action: delayed`, a delay report),
//! with the original's header block quoted (located with mail-parser). Never
//! sent to the null sender.

use super::{Envelope, QueueId};
use crate::message::date::rfc5322_date;
use std::time::{Duration, UNIX_EPOCH};

/// A failed recipient as reported: address and the final reply.
pub struct Failure<'a> {
    pub address: &'a str,
    pub reply: &'a str,
}

/// A recipient still not delivered, as reported: address, the last error (if
/// any) and when it expires.
pub struct Delay<'a> {
    pub address: &'a str,
    pub last_error: Option<&'a str>,
    /// Milliseconds since the epoch.
    pub retry_until: u64,
}

/// The status of a delay: the last error's if it is a 4.x.x, else 4.0.0.
pub fn delay_status(last_error: Option<&str>) -> String {
    match last_error.map(status_of) {
        Some(s) if s.starts_with("4.") => s,
        _ => "4.0.0".into(),
    }
}

/// One recipient's lines of the report.
struct Entry {
    /// The human-readable line (`<address>: why`).
    line: String,
    /// The per-recipient fields of the `message/delivery-status` part.
    fields: String,
}

/// What kind of report, as its subject and opening sentence say.
struct Kind {
    subject: &'static str,
    /// "Your message {subject} " + this.
    sentence: &'static str,
    after: &'static str,
}

/// The enhanced status code in a reply ("550 5.1.1 ..." → "5.1.1"), else from the
/// basic code's class ("4.0.0" / "5.0.0").
pub fn status_of(reply: &str) -> String {
    for word in reply.split_whitespace() {
        let parts: Vec<&str> = word.split('.').collect();
        if parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return word.to_string();
        }
    }
    if reply.trim_start().starts_with('4') {
        "4.0.0".into()
    } else {
        "5.0.0".into()
    }
}

/// Builds the DSN for failed recipients (CRLF line ends, ready to queue).
pub fn build(
    router: &str,
    dsn_id: QueueId,
    env: &Envelope,
    original: &[u8],
    failures: &[Failure],
) -> Vec<u8> {
    let entries: Vec<Entry> = failures
        .iter()
        .map(|f| Entry {
            line: format!("<{}>: {}", f.address, one_line(f.reply)),
            fields: format!(
                "Final-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\nDiagnostic-Code: smtp; {}\r\n",
                f.address,
                status_of(f.reply),
                one_line(f.reply)
            ),
        })
        .collect();
    let kind = Kind {
        subject: "Undelivered Mail Returned to Sender",
        sentence: "could not be delivered to one or more recipients.",
        after: "It is attached below (headers only).",
    };
    report(router, dsn_id, env, original, &kind, &entries)
}

/// Builds the delay report for recipients still not delivered (`Action:
/// delayed`); the mail system keeps trying until each one's `retry_until`.
pub fn build_delayed(
    router: &str,
    dsn_id: QueueId,
    env: &Envelope,
    original: &[u8],
    delays: &[Delay],
) -> Vec<u8> {
    let entries: Vec<Entry> = delays
        .iter()
        .map(|d| {
            let until = rfc5322_date(UNIX_EPOCH + Duration::from_millis(d.retry_until));
            let why = d
                .last_error
                .map_or("not yet delivered".to_string(), one_line);
            let mut fields = format!(
                "Final-Recipient: rfc822; {}\r\nAction: delayed\r\nStatus: {}\r\n",
                d.address,
                delay_status(d.last_error)
            );
            if let Some(e) = d.last_error {
                fields.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", one_line(e)));
            }
            fields.push_str(&format!("Will-Retry-Until: {until}\r\n"));
            Entry {
                line: format!("<{}>: {why}; still trying until {until}", d.address),
                fields,
            }
        })
        .collect();
    let kind = Kind {
        subject: "Delayed Mail (still being retried)",
        sentence: "has not yet been delivered to one or more recipients.",
        after:
            "No action is needed: delivery is still being tried. Its headers are attached below.",
    };
    report(router, dsn_id, env, original, &kind, &entries)
}

/// The `multipart/report` around `entries`.
/// 16 random hex digits (from the OS; the time if there is no random source).
fn unguessable() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        b = (crate::queue::manager::now_ms() ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn report(
    router: &str,
    dsn_id: QueueId,
    env: &Envelope,
    original: &[u8],
    kind: &Kind,
    entries: &[Entry],
) -> Vec<u8> {
    let now = std::time::SystemTime::now();
    // Unguessable: the original's headers go inside the report, and a sender who
    // could predict the boundary could end the part there and add parts of its own.
    let boundary = format!("{dsn_id}/{}/{router}", unguessable());
    let parsed = mail_parser::MessageParser::default().parse(original);
    let (headers, subject) = match &parsed {
        Some(m) => {
            let root = m.root_part();
            let (start, end) = (root.offset_header as usize, root.offset_body as usize);
            let headers = original.get(start..end.min(original.len())).unwrap_or(b"");
            (headers.to_vec(), m.subject().map(str::to_string))
        }
        None => (Vec::new(), None),
    };
    let sender = env.sender.as_deref().unwrap_or("");
    let arrival = rfc5322_date(UNIX_EPOCH + Duration::from_millis(env.received_at));
    let mut out = String::new();
    out.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{router}>\r\n"
    ));
    out.push_str(&format!("To: <{sender}>\r\n"));
    out.push_str(&format!("Subject: {}\r\n", kind.subject));
    out.push_str(&format!("Date: {}\r\n", rfc5322_date(now)));
    out.push_str(&format!("Message-ID: <{dsn_id}.dsn@{router}>\r\n"));
    out.push_str("Auto-Submitted: auto-replied\r\n");
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    out.push_str("This is a MIME-encapsulated message.\r\n\r\n");
    out.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ));
    out.push_str(&format!("This is the mail system at {router}.\r\n\r\n"));
    match &subject {
        Some(s) => out.push_str(&format!(
            "Your message \"{}\" {}\r\n",
            s.replace(['\r', '\n'], " "),
            kind.sentence
        )),
        None => out.push_str(&format!("Your message {}\r\n", kind.sentence)),
    }
    out.push_str(&format!("{}\r\n\r\n", kind.after));
    for e in entries {
        out.push_str(&format!("{}\r\n", e.line));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    out.push_str(&format!("Reporting-MTA: dns; {router}\r\n"));
    out.push_str(&format!("X-Clustermail-Queue-ID: {}\r\n", env.id));
    out.push_str(&format!("Arrival-Date: {arrival}\r\n"));
    for e in entries {
        out.push_str(&format!("\r\n{}", e.fields));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&headers);
    if !headers.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Recipient;

    #[test]
    fn status_codes() {
        assert_eq!(status_of("550 5.1.1 <x> unknown"), "5.1.1");
        assert_eq!(status_of("permanent error (550): 5.7.1 denied"), "5.7.1");
        assert_eq!(status_of("554 no"), "5.0.0");
        assert_eq!(status_of("4.4.7 expired"), "4.4.7");
    }

    /// Message 42 from alice@east.example.com to bob@x.test.
    fn alice_to_bob() -> Envelope {
        Envelope {
            id: QueueId(42),
            sender: Some("alice@east.example.com".into()),
            recipients: vec![Recipient::new("bob@x.test".into(), "bob@x.test".into())],
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "h".into(),
            received_at: 0,
            size: 0,
            smtputf8: false,
            eight_bit: false,
        }
    }

    #[test]
    fn headers_naming_the_old_predictable_boundary_add_no_part() {
        let env = alice_to_bob();
        // What a sender would write to end the headers part early and add its own.
        let original =
            b"Subject: x\r\nX-A: y\r\n--000000000000002B/mx.test\r\nX-B: z\r\n\r\nbody\r\n";
        let failure = [Failure {
            address: "bob@x.test",
            reply: "550 5.1.1 no such user",
        }];
        let dsn = build("mx.test", QueueId(43), &env, original, &failure);
        let m = mail_parser::MessageParser::default().parse(&dsn).unwrap();
        assert_eq!(m.parts.len(), 4, "{}", String::from_utf8_lossy(&dsn));
        let again = build("mx.test", QueueId(43), &env, original, &failure);
        assert_ne!(dsn, again, "each report has its own boundary");
    }

    #[test]
    fn a_report_parses_back_with_its_parts() {
        let env = alice_to_bob();
        let original = b"Received: from a\r\nSubject: Lunch?\r\nMessage-ID: <m1@x.test>\r\n\r\nsecret body\r\n";
        let dsn = build(
            "mx.test",
            QueueId(43),
            &env,
            original,
            &[Failure {
                address: "bob@x.test",
                reply: "550 5.1.1 <bob@x.test> no such user",
            }],
        );
        let text = String::from_utf8(dsn.clone()).unwrap();
        assert!(
            !text.contains("secret body"),
            "only the headers are returned"
        );
        let m = mail_parser::MessageParser::default()
            .parse(&dsn)
            .expect("parses");
        assert_eq!(m.subject(), Some("Undelivered Mail Returned to Sender"));
        assert_eq!(
            m.parts.len(),
            4,
            "multipart + text + delivery-status + headers"
        );
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains(
            "Final-Recipient: rfc822; bob@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(text.contains("Your message \"Lunch?\" could not be delivered"));
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nReceived: from a\r\nSubject: Lunch?\r\nMessage-ID: <m1@x.test>\r\n"));
        assert!(
            crate::smtp::data::check_body(&dsn) == Default::default(),
            "CRLF only, short lines"
        );
        let delayed = build_delayed(
            "mx.test",
            QueueId(44),
            &env,
            original,
            &[Delay {
                address: "bob@x.test",
                last_error: Some("m1: 451 4.3.0 try later"),
                retry_until: 0,
            }],
        );
        let text = String::from_utf8(delayed.clone()).unwrap();
        assert!(text.contains("Subject: Delayed Mail (still being retried)\r\n"));
        assert!(text.contains(
            "Final-Recipient: rfc822; bob@x.test\r\nAction: delayed\r\nStatus: 4.3.0\r\n"
        ));
        assert!(text.contains("Will-Retry-Until: "));
        assert_eq!(
            mail_parser::MessageParser::default()
                .parse(&delayed)
                .expect("parses")
                .parts
                .len(),
            4
        );
        assert_eq!(delay_status(Some("m1: connect: refused")), "4.0.0");
        assert_eq!(delay_status(Some("550 5.1.1 no")), "4.0.0");
        assert_eq!(delay_status(None), "4.0.0");
    }
}
