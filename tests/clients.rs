//! Real SMTP clients nobody here wrote, talking to the router: swaks and Python's
//! smtplib (also over STARTTLS, with a certificate made at test time). The queued
//! message must be byte-identical to what was sent, apart from our Received header.

mod common;
use common::{without_received, Router};
use std::process::Command;

const MESSAGE: &[u8] = b"From: Sender <sender@x.test>\r\n\
To: Alice <alice@east.example.com>\r\n\
Subject: =?utf-8?q?caf=C3=A9?=\r\n\
Message-ID: <real-client@x.test>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
caf\xc3\xa9 au lait\r\n\
.a line that starts with a dot\r\n\
\r\n\
-- \r\n\
sender\r\n";

#[test]
fn swaks_delivers_byte_identical() {
    let mut r = Router::start("");
    // With its own terminating dot line, swaks sends the data as it is.
    let data = format!("{}.\r\n", std::str::from_utf8(MESSAGE).unwrap());
    let data = r.scratch.write("message.eml", &data);
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{}", r.port)])
        .args(["--from", "sender@x.test", "--to", "Alice@East.Example.com"])
        .args([
            "--helo",
            "swaks.test",
            "--data",
            &format!("@{}", data.display()),
        ])
        .output()
        .expect("swaks is installed (apt-get install swaks)");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "swaks failed:\n{transcript}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        transcript.contains("<-  250 2.0.0 Ok: queued as"),
        "{transcript}"
    );
    r.stop();
    let ids = r.queue_ids();
    assert_eq!(ids.len(), 1);
    let raw = r.queued_raw(&ids[0]);
    assert_eq!(
        String::from_utf8_lossy(&without_received(&raw)),
        String::from_utf8_lossy(MESSAGE)
    );
    assert!(raw.starts_with(
        b"Received: from swaks.test ([127.0.0.1])\r\n\tby mx.test (clustermail) with ESMTP id "
    ));
}

/// Runs a Python script with the port as argv[1]; returns stdout.
fn python(script: &str, port: u16, extra: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(port.to_string())
        .args(extra)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn python_smtplib_with_pipelined_recipients_and_refusals() {
    let mut r = Router::start("");
    let script = r#"
import smtplib, sys
msg = open(sys.argv[2], 'rb').read()
with smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='py.test', timeout=10) as s:
    code, _ = s.ehlo()
    assert code == 250
    assert s.has_extn('pipelining') and s.has_extn('smtputf8') and s.has_extn('chunking')
    assert int(s.esmtp_features['size']) == 25 * 1024 * 1024
    refused = s.sendmail('sender@x.test', ['alice@east.example.com', 'ghost@east.example.com', 'x@elsewhere.test', 'BOB@east.example.com'], msg)
    print(sorted((k, v[0]) for k, v in refused.items()))
    try:
        s.sendmail('sender@x.test', ['ghost@east.example.com'], msg)
        print('accepted?!')
    except smtplib.SMTPRecipientsRefused as e:
        print('all refused', e.recipients['ghost@east.example.com'][0])
"#;
    let msg = r
        .scratch
        .write("msg.eml", std::str::from_utf8(MESSAGE).unwrap());
    let out = python(script, r.port, &[&msg.display().to_string()]);
    assert!(
        out.contains("[('ghost@east.example.com', 550), ('x@elsewhere.test', 550)]"),
        "{out}"
    );
    assert!(out.contains("all refused 550"), "{out}");
    r.stop();
    let ids = r.queue_ids();
    assert_eq!(ids.len(), 1);
    let raw = r.queued_raw(&ids[0]);
    assert_eq!(without_received(&raw), MESSAGE);
    let show = r.scratch.ok(&["queue", "show", &ids[0]]);
    assert!(
        show.contains("<alice@east.example.com>")
            && show.contains("<BOB@east.example.com> (mailbox bob@east.example.com)"),
        "{show}"
    );
}

/// A router offering STARTTLS with a fresh self-signed certificate for `names`.
fn tls_router(names: &[&str]) -> Router {
    let scratch = common::Scratch::new();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let key = rcgen::generate_simple_self_signed(names).expect("cert");
    let cert = scratch.write("cert.pem", &key.cert.pem());
    let pkey = scratch.write("key.pem", &key.signing_key.serialize_pem());
    Router::start_in(
        scratch,
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}",
            cert.display().to_string(),
            pkey.display().to_string()
        ),
    )
}

#[test]
fn python_smtplib_over_starttls() {
    let mut r = tls_router(&["localhost", "mx.test"]);
    let script = r#"
import smtplib, ssl, sys
msg = open(sys.argv[2], 'rb').read()
with smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='tls.test', timeout=10) as s:
    s.ehlo()
    assert s.has_extn('starttls'), s.esmtp_features
    code, _ = s.starttls(context=ssl._create_unverified_context())
    assert code == 220
    s.ehlo()
    assert not s.has_extn('starttls')
    print('cipher', s.sock.cipher()[1])
    s.sendmail('sender@x.test', ['carol@east.example.com'], msg)
    print('sent')
"#;
    let msg = r
        .scratch
        .write("msg.eml", std::str::from_utf8(MESSAGE).unwrap());
    let out = python(script, r.port, &[&msg.display().to_string()]);
    assert!(
        out.contains("cipher TLSv1.3") && out.contains("sent"),
        "{out}"
    );
    r.stop();
    let ids = r.queue_ids();
    let raw = r.queued_raw(&ids[0]);
    assert_eq!(without_received(&raw), MESSAGE);
    assert!(
        String::from_utf8_lossy(&raw[..120]).contains("with ESMTPS id"),
        "{}",
        String::from_utf8_lossy(&raw[..120])
    );
}

/// Plaintext pipelined behind STARTTLS must not run inside the TLS session.
#[test]
fn starttls_command_injection_is_discarded() {
    let r = tls_router(&["localhost"]);
    let script = r#"
import socket, ssl, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)
f = s.makefile('rb')
def reply():
    lines = []
    while True:
        l = f.readline().decode()
        lines.append(l.strip())
        if l[3] == ' ':
            return lines
reply(); s.sendall(b'EHLO x\r\n'); reply()
s.sendall(b'STARTTLS\r\nNOOP\r\n')
print('starttls', reply()[0])
t = ssl._create_unverified_context().wrap_socket(s, server_hostname='localhost')
t.sendall(b'NOOP\r\n')
tf = t.makefile('rb')
print('first reply in TLS', tf.readline().decode().strip())
"#;
    let out = python(script, r.port, &[]);
    assert!(out.contains("starttls 220 2.0.0"), "{out}");
    // One NOOP reply in TLS: the one sent inside TLS, not the injected one.
    assert!(out.contains("first reply in TLS 250 2.0.0 Ok"), "{out}");
    assert!(
        r.log()
            .contains("plaintext pipelined after STARTTLS discarded"),
        "{}",
        r.log()
    );
}
