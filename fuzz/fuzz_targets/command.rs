//! Fuzzes the command parser and the session state machine: any sequence of
//! command lines must get replies (never a panic), every reply must be well formed,
//! nothing is ever accepted for a recipient the policy refuses, and no accepted
//! recipient holds whitespace or a control character (what is matched is what is
//! delivered: nothing is trimmed).
#![no_main]

use clustermail::config::{BareLineEndings, LongLines};
use clustermail::smtp::address::Mailbox;
use clustermail::smtp::command;
use clustermail::smtp::session::{Action, RecipientPolicy, Session, Settings, Verdict};
use libfuzzer_sys::fuzz_target;

struct Policy;
impl RecipientPolicy for Policy {
    fn check(&self, rcpt: &Mailbox) -> Verdict {
        if rcpt.relay_trick().is_some() {
            return Verdict::RelayDenied("trick");
        }
        if rcpt.domain.eq_ignore_ascii_case("ours.test") {
            Verdict::Accept(rcpt.to_string())
        } else {
            Verdict::RelayDenied("not ours")
        }
    }
}

fn plain(addr: &str) -> bool {
    !addr.chars().any(|c| c.is_whitespace() || c.is_control())
}

fuzz_target!(|data: &[u8]| {
    let _ = command::parse(data, true);
    let _ = command::parse(data, false);
    let mut s = Session::new(Settings {
        name: "mx.test".into(),
        max_message_size: 1000,
        max_recipients: 5,
        max_errors: 1000,
        long_lines: LongLines::Reject,
        bare_line_endings: BareLineEndings::Normalize,
        tls_available: true,
        max_hops: 25,
    });
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let reply = match s.command(line, &Policy) {
            Action::Reply(r) | Action::Close(r) | Action::StartTls(r) | Action::ReadData(r) => r,
            Action::ReadBdat {
                refuse: Some(r), ..
            } => r,
            Action::ReadBdat {
                refuse: None,
                size,
                last,
            } => {
                let chunk = vec![b'x'; size.min(2000) as usize];
                match s.bdat_chunk(chunk, last) {
                    Ok(Some(m)) => {
                        assert!(m
                            .recipients
                            .iter()
                            .all(|(a, _)| a.to_ascii_lowercase().ends_with("@ours.test")));
                        assert!(m.recipients.iter().all(|(a, _)| plain(a)));
                        continue;
                    }
                    Ok(None) => continue,
                    Err(r) => r,
                }
            }
        };
        let wire = reply.to_wire();
        assert!(
            wire.ends_with("\r\n") && (200..600).contains(&reply.code),
            "{wire:?}"
        );
        if reply.code == 354 {
            let mut body = Vec::new();
            let mut decoder = s.data_decoder();
            decoder.feed(b"Subject: x\nbare\r\n.\r\n", &mut body);
            if let Ok(m) = s.data_received(body, decoder.over_size()) {
                assert_eq!(m.body, b"Subject: x\r\nbare\r\n");
                assert!(m.recipients.iter().all(|(a, _)| plain(a)));
                assert!(!m.recipients.is_empty());
                assert!(m
                    .recipients
                    .iter()
                    .all(|(a, _)| a.to_ascii_lowercase().ends_with("@ours.test")));
            }
        }
    }
});
