//! Unit tests of the session state machine (a test policy, no I/O).

use super::*;

struct Policy;
impl RecipientPolicy for Policy {
    fn check(&self, rcpt: &Mailbox) -> Verdict {
        if let Some(t) = rcpt.relay_trick() {
            return Verdict::RelayDenied(t);
        }
        match (
            rcpt.local.to_lowercase().as_str(),
            rcpt.domain.to_lowercase().as_str(),
        ) {
            (l @ ("alice" | "carol" | "dave"), "ours.test") => {
                Verdict::Accept(format!("{l}@ours.test"))
            }
            ("broken", "ours.test") => Verdict::TempFail,
            (_, "ours.test") => Verdict::UnknownUser,
            _ => Verdict::RelayDenied("not a domain of this relay"),
        }
    }
}

fn session() -> Session {
    Session::new(Settings {
        name: "mx.test".into(),
        max_message_size: 1000,
        max_recipients: 2,
        max_errors: 20,
        long_lines: LongLines::Reject,
        bare_line_endings: BareLineEndings::Reject,
        tls_available: true,
        max_hops: 3,
    })
}

fn say(s: &mut Session, line: &str) -> (u16, &'static str) {
    match s.command(line.as_bytes(), &Policy) {
        Action::Reply(r) | Action::Close(r) | Action::StartTls(r) | Action::ReadData(r) => {
            (r.code, r.status)
        }
        Action::ReadBdat {
            refuse: Some(r), ..
        } => (r.code, r.status),
        Action::ReadBdat { refuse: None, .. } => (0, "bdat"),
    }
}

#[test]
fn a_whole_transaction() {
    let mut s = session();
    assert_eq!(say(&mut s, "MAIL FROM:<a@x.test>"), (503, "5.5.1"));
    assert_eq!(say(&mut s, "EHLO client.test").0, 250);
    assert_eq!(say(&mut s, "DATA"), (503, "5.5.1"));
    assert_eq!(say(&mut s, "RCPT TO:<alice@ours.test>"), (503, "5.5.1"));
    assert_eq!(
        say(&mut s, "MAIL FROM:<a@x.test> SIZE=2000"),
        (552, "5.3.4")
    );
    assert_eq!(say(&mut s, "MAIL FROM:<a@x.test> SIZE=200"), (250, "2.1.0"));
    assert_eq!(say(&mut s, "MAIL FROM:<a@x.test>"), (503, "5.5.1"));
    assert_eq!(say(&mut s, "DATA"), (503, "5.5.1"), "no RCPT yet");
    assert_eq!(say(&mut s, "RCPT TO:<ALICE@Ours.Test>"), (250, "2.1.5"));
    assert_eq!(say(&mut s, "RCPT TO:<bob@ours.test>"), (550, "5.1.1"));
    assert_eq!(say(&mut s, "RCPT TO:<bob@elsewhere.test>"), (550, "5.7.1"));
    assert_eq!(say(&mut s, "RCPT TO:<broken@ours.test>"), (451, "4.3.0"));
    // The same mailbox again: accepted, kept once, not counted.
    assert_eq!(say(&mut s, "RCPT TO:<alice@ours.test>"), (250, "2.1.5"));
    assert_eq!(say(&mut s, "RCPT TO:<carol@ours.test>"), (250, "2.1.5"));
    assert_eq!(say(&mut s, "RCPT TO:<dave@ours.test>"), (452, "4.5.3"));
    assert_eq!(say(&mut s, "DATA"), (354, ""));
    let m = s
        .data_received(b"Subject: hi\r\n\r\nhello\r\n".to_vec(), false)
        .unwrap();
    assert_eq!(m.sender.as_deref(), Some("a@x.test"));
    assert_eq!(
        m.recipients,
        [
            ("ALICE@Ours.Test".to_string(), "alice@ours.test".to_string()),
            ("carol@ours.test".to_string(), "carol@ours.test".to_string())
        ]
    );
    assert!(!s.in_transaction());
    assert_eq!(say(&mut s, "QUIT"), (221, "2.0.0"));
}

#[test]
fn relay_tricks_are_denied() {
    let mut s = session();
    say(&mut s, "EHLO c");
    say(&mut s, "MAIL FROM:<>");
    for trick in [
        "RCPT TO:<alice%elsewhere.test@ours.test>",
        "RCPT TO:<elsewhere.test!alice@ours.test>",
        "RCPT TO:<\"alice@elsewhere.test\"@ours.test>",
        "RCPT TO:<alice@[127.0.0.1]>",
        "RCPT TO:<@ours.test:alice@elsewhere.test>",
    ] {
        assert_eq!(say(&mut s, trick), (550, "5.7.1"), "{trick}");
    }
    assert_eq!(say(&mut s, "RCPT TO:<alice@ours.test.>"), (501, "5.1.3"));
    assert_eq!(
        say(&mut s, "RCPT TO:<@elsewhere.test:alice@ours.test>"),
        (250, "2.1.5"),
        "judged on the mailbox"
    );
    // All refused then DATA: 554 (RFC 2920), not 503.
    let mut s = session();
    say(&mut s, "EHLO c");
    say(&mut s, "MAIL FROM:<>");
    say(&mut s, "RCPT TO:<x@elsewhere.test>");
    assert_eq!(say(&mut s, "DATA"), (554, "5.5.1"));
}

#[test]
fn bodies_with_bare_line_endings_or_long_lines_are_refused() {
    let mut s = session();
    for body in [
        &b"a\nb\r\n"[..],
        &format!("{}\r\n", "x".repeat(999)).into_bytes(),
    ] {
        say(&mut s, "EHLO c");
        say(&mut s, "MAIL FROM:<>");
        say(&mut s, "RCPT TO:<alice@ours.test>");
        assert_eq!(say(&mut s, "DATA").0, 354);
        assert_eq!(
            s.data_received(body.to_vec(), false).unwrap_err().status,
            "5.6.0"
        );
    }
    say(&mut s, "MAIL FROM:<>");
    say(&mut s, "RCPT TO:<alice@ours.test>");
    say(&mut s, "DATA");
    assert_eq!(s.data_received(vec![], true).unwrap_err().code, 552);
    // A loop: more Received headers than max_hops.
    say(&mut s, "MAIL FROM:<>");
    say(&mut s, "RCPT TO:<alice@ours.test>");
    say(&mut s, "DATA");
    let looped = b"Received: a\r\nReceived: b\r\nReceived: c\r\nReceived: d\r\n\r\nx\r\n".to_vec();
    assert_eq!(s.data_received(looped, false).unwrap_err().status, "5.4.6");
}

#[test]
fn bdat_chunks_and_limits() {
    let mut s = session();
    say(&mut s, "EHLO c");
    assert_eq!(
        say(&mut s, "BDAT 10"),
        (503, "5.5.1"),
        "refused but the driver still reads 10 octets"
    );
    say(&mut s, "MAIL FROM:<a@x.test>");
    say(&mut s, "RCPT TO:<alice@ours.test>");
    assert_eq!(say(&mut s, "BDAT 5"), (0, "bdat"));
    assert_eq!(s.bdat_chunk(b"Subje".to_vec(), false), Ok(None));
    assert_eq!(say(&mut s, "DATA"), (503, "5.5.1"));
    assert_eq!(say(&mut s, "BDAT 9 LAST"), (0, "bdat"));
    let m = s
        .bdat_chunk(b"ct: x\r\n\r\n".to_vec(), true)
        .unwrap()
        .unwrap();
    assert_eq!(m.body, b"Subject: x\r\n\r\n");
    say(&mut s, "MAIL FROM:<a@x.test>");
    say(&mut s, "RCPT TO:<alice@ours.test>");
    assert_eq!(say(&mut s, "BDAT 2000 LAST"), (552, "5.3.4"));
    assert!(!s.in_transaction());
}

#[test]
fn errors_are_counted_and_close_the_session() {
    let mut s = session();
    s.settings.max_errors = 5;
    for _ in 0..4 {
        assert_eq!(say(&mut s, "BOGUS").0, 500);
    }
    assert!(matches!(s.command(b"BOGUS", &Policy), Action::Close(r) if r.code == 421));
}

#[test]
fn refused_recipients_are_errors_until_a_message_is_given() {
    let mut s = session();
    s.settings.max_errors = 4;
    say(&mut s, "EHLO c");
    say(&mut s, "MAIL FROM:<a@x.test>");
    for _ in 0..3 {
        assert_eq!(say(&mut s, "RCPT TO:<nobody@ours.test>"), (550, "5.1.1"));
    }
    assert_eq!(say(&mut s, "RCPT TO:<alice@ours.test>").0, 250);
    assert_eq!(say(&mut s, "DATA").0, 354);
    assert!(s
        .data_received(b"Subject: x\r\n\r\nhi\r\n".to_vec(), false)
        .is_ok());
    // The message was given: three more refusals are not yet four errors.
    say(&mut s, "MAIL FROM:<a@x.test>");
    for _ in 0..3 {
        assert_eq!(say(&mut s, "RCPT TO:<x@elsewhere.test>"), (550, "5.7.1"));
    }
    assert!(matches!(
        s.command(b"RCPT TO:<y@elsewhere.test>", &Policy),
        Action::Close(r) if r.code == 421
    ));
}

#[test]
fn utf8_addresses_need_smtputf8() {
    let mut s = session();
    say(&mut s, "EHLO c");
    assert_eq!(say(&mut s, "MAIL FROM:<jörg@x.test>"), (553, "5.6.7"));
    assert_eq!(say(&mut s, "MAIL FROM:<jörg@x.test> SMTPUTF8").0, 250);
    let mut s = session();
    say(&mut s, "HELO c");
    assert_eq!(
        say(&mut s, "MAIL FROM:<a@x.test> SMTPUTF8"),
        (555, "5.5.4"),
        "no parameters after HELO"
    );
}

#[test]
fn starttls_resets_the_session() {
    let mut s = session();
    say(&mut s, "EHLO c");
    assert_eq!(say(&mut s, "STARTTLS"), (220, "2.0.0"));
    s.tls_started();
    assert_eq!(
        say(&mut s, "MAIL FROM:<>"),
        (503, "5.5.1"),
        "EHLO again after TLS"
    );
    let Action::Reply(r) = s.command(b"EHLO c", &Policy) else {
        panic!()
    };
    assert!(!r.lines.iter().any(|l| l == "STARTTLS"));
    assert_eq!(say(&mut s, "STARTTLS"), (503, "5.5.1"));
}

#[test]
fn normalize_stores_bare_line_endings_as_crlf_in_data_and_bdat() {
    let mut s = session();
    s.settings.bare_line_endings = BareLineEndings::Normalize;
    say(&mut s, "EHLO c");
    say(&mut s, "MAIL FROM:<>");
    say(&mut s, "RCPT TO:<alice@ours.test>");
    assert_eq!(say(&mut s, "DATA").0, 354);
    let mut body = Vec::new();
    let mut d = s.data_decoder();
    let input: &[u8] = b"a\n..b\n.\nc\r\n.\r\n";
    assert_eq!(
        d.feed(input, &mut body),
        super::super::data::Feed::Done(input.len())
    );
    let m = s.data_received(body, d.over_size()).unwrap();
    assert_eq!(m.body, b"a\r\n.b\r\n.\r\nc\r\n");
    // BDAT: a CR ending one chunk and the LF starting the next are one CRLF.
    say(&mut s, "MAIL FROM:<>");
    say(&mut s, "RCPT TO:<alice@ours.test>");
    say(&mut s, "BDAT 3");
    assert_eq!(s.bdat_chunk(b"a\nb".to_vec(), false), Ok(None));
    say(&mut s, "BDAT 4 LAST");
    let m = s.bdat_chunk(b"\r\n.\r".to_vec(), true).unwrap().unwrap();
    assert_eq!(m.body, b"a\r\nb\r\n.\r\n");
    // The limit holds for the normalized message: 600 LFs become 1200 octets.
    say(&mut s, "MAIL FROM:<>");
    say(&mut s, "RCPT TO:<alice@ours.test>");
    say(&mut s, "BDAT 600 LAST");
    assert_eq!(s.bdat_chunk(vec![b'\n'; 600], true).unwrap_err().code, 552);
    assert!(!s.in_transaction());
}
