use super::*;
use tokio::net::TcpListener;

async fn pair(client_pw: &str, server_pw: &str) -> (Result<Link>, Result<Link>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server_pw = server_pw.to_string();
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        Link::accept(s, &server_pw).await
    });
    let client = Link::connect(&addr, client_pw, Duration::from_secs(5)).await;
    (client, server.await.unwrap())
}

async fn linked() -> (Link, Link) {
    let (c, s) = pair("secret-1", "secret-1").await;
    (c.unwrap(), s.unwrap())
}

#[tokio::test]
async fn frames_flow_both_ways_once_authenticated() {
    let (mut c, mut s) = linked().await;
    for n in 0..20 {
        c.send(&Msg::Refused(format!("c{n}"))).await.unwrap();
        s.send(&Msg::Refused(format!("s{n}"))).await.unwrap();
    }
    for n in 0..20 {
        assert!(matches!(s.recv().await.unwrap(), Msg::Refused(w) if w == format!("c{n}")));
        assert!(matches!(c.recv().await.unwrap(), Msg::Refused(w) if w == format!("s{n}")));
    }
    let body = vec![b'x'; 1 << 20];
    let request = push(&body);
    let answer = tokio::join!(c.call(&request, Duration::from_secs(10)), async {
        let got = s.recv().await.unwrap();
        s.send(&Msg::Stored).await.unwrap();
        got
    });
    assert!(matches!(answer.0.unwrap(), Msg::Stored));
    assert!(matches!(answer.1, Msg::Push { message, .. } if message == body));
}

#[tokio::test]
async fn split_halves_pipeline_requests_and_keep_the_sequence() {
    let (mut c, mut s) = linked().await;
    // A call on the whole link first: the halves go on from its numbers.
    let (answer, _) = tokio::join!(c.call(&Msg::CatalogPull, Duration::from_secs(10)), async {
        s.recv().await.unwrap();
        s.send(&Msg::Stored).await.unwrap();
    });
    assert!(matches!(answer.unwrap(), Msg::Stored));
    let (mut c_in, mut c_out) = c.split();
    let (mut s_in, mut s_out) = s.split();
    // Five requests out before the first answer is read.
    for n in 0..5 {
        c_out.send(&Msg::Refused(format!("q{n}"))).await.unwrap();
    }
    for n in 0..5 {
        let got = s_in.recv().await.unwrap();
        assert!(matches!(got, Msg::Refused(w) if w == format!("q{n}")));
        s_out.send(&Msg::Refused(format!("a{n}"))).await.unwrap();
    }
    for n in 0..5 {
        let got = c_in.recv().await.unwrap();
        assert!(matches!(got, Msg::Refused(w) if w == format!("a{n}")));
    }
}

#[tokio::test]
async fn a_wrong_password_fails_with_auth_failed_on_both_ends() {
    let (c, s) = pair("secret-1", "secret-2").await;
    let c = c.err().expect("the client refuses");
    let s = s.err().expect("the server refuses");
    assert!(is_auth_failed(&c), "{c:#}");
    assert!(is_auth_failed(&s), "{s:#}");
    assert!(c.to_string().contains("HA authentication failed"), "{c}");
}

/// What the server makes of these raw octets from an authenticated client.
async fn server_reads(c: &mut Link, s: &mut Link, raw: &[u8], frames: usize) -> Vec<Result<Msg>> {
    c.stream.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..frames {
        let r = tokio::time::timeout(Duration::from_secs(10), s.recv())
            .await
            .unwrap();
        let failed = r.is_err();
        got.push(r);
        if failed {
            break;
        }
    }
    got
}

fn refused(r: &Result<Msg>) -> bool {
    matches!(r, Err(e) if e.to_string().contains("failed authentication"))
}

#[tokio::test]
async fn a_tampered_frame_is_refused() {
    for at in [0usize, 4, 9] {
        let (mut c, mut s) = linked().await;
        let mut frame = c.seal(&Msg::Refused("pay 10 EUR".into())).unwrap();
        // 0: the length octets would only stall the read: tamper past them.
        let i = if at == 0 { frame.len() - 1 } else { at };
        frame[i] ^= 0x20;
        let got = server_reads(&mut c, &mut s, &frame, 1).await;
        assert!(refused(&got[0]), "octet {i}: {:?}", got[0].as_ref().err());
    }
}

#[tokio::test]
async fn a_header_announcing_a_huge_frame_then_closing_is_an_error_not_an_allocation() {
    let (mut c, mut s) = linked().await;
    let mut raw = ((MAX_FRAME + TAG) as u32).to_be_bytes().to_vec();
    raw.extend_from_slice(b"only a few octets");
    c.stream.write_all(&raw).await.unwrap();
    c.stream.shutdown().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), s.recv())
        .await
        .unwrap();
    let e = r.expect_err("a truncated frame is refused");
    assert!(
        e.to_string().contains("closed inside a frame (17 of"),
        "{e}"
    );
}

#[tokio::test]
async fn an_authentic_frame_announcing_a_huge_string_is_an_error_not_an_abort() {
    let (mut c, mut s) = linked().await;
    let mut payload =
        bincode::serde::encode_to_vec(Msg::Refused(String::new()), bincode::config::standard())
            .unwrap();
    // The string's length varint (0) becomes 2^40: u64 marker 253, little-endian.
    payload.pop();
    payload.push(253);
    payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let frame = c.seal_payload(&payload).unwrap();
    let got = server_reads(&mut c, &mut s, &frame, 1).await;
    assert!(got[0].is_err(), "{:?}", got[0].as_ref().ok());
}

#[tokio::test]
async fn a_forged_frame_is_refused() {
    let (mut c, mut s) = linked().await;
    let payload =
        bincode::serde::encode_to_vec(&Msg::CatalogPull, bincode::config::standard()).unwrap();
    let mut frame = ((payload.len() + TAG) as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame.extend_from_slice(&[0u8; TAG]);
    let got = server_reads(&mut c, &mut s, &frame, 1).await;
    assert!(refused(&got[0]), "{:?}", got[0].as_ref().err());
}

#[tokio::test]
async fn a_replayed_frame_is_refused() {
    let (mut c, mut s) = linked().await;
    let f0 = c.seal(&Msg::CatalogPull).unwrap();
    let got = server_reads(&mut c, &mut s, &[f0.clone(), f0].concat(), 2).await;
    assert!(matches!(got[0], Ok(Msg::CatalogPull)));
    assert!(refused(&got[1]), "{:?}", got[1].as_ref().err());

    // Into another connection: each handshake makes fresh keys.
    let (mut old, _s) = linked().await;
    let f0 = old.seal(&Msg::CatalogPull).unwrap();
    let (mut c, mut s) = linked().await;
    let got = server_reads(&mut c, &mut s, &f0, 1).await;
    assert!(refused(&got[0]), "{:?}", got[0].as_ref().err());
}

#[tokio::test]
async fn a_reordered_or_dropped_frame_is_refused() {
    let (mut c, mut s) = linked().await;
    let f0 = c.seal(&Msg::Refused("first".into())).unwrap();
    let f1 = c.seal(&Msg::Refused("second".into())).unwrap();
    let got = server_reads(&mut c, &mut s, &[f1.clone(), f0].concat(), 2).await;
    assert!(refused(&got[0]), "{:?}", got[0].as_ref().err());

    let (mut c, mut s) = linked().await;
    let _dropped = c.seal(&Msg::Refused("first".into())).unwrap();
    let f1 = c.seal(&Msg::Refused("second".into())).unwrap();
    let got = server_reads(&mut c, &mut s, &f1, 1).await;
    assert!(refused(&got[0]), "{:?}", got[0].as_ref().err());

    // A frame of one direction reflected back to its sender.
    let (mut c, mut s) = linked().await;
    let f0 = s.seal(&Msg::Stored).unwrap();
    let got = server_reads(&mut c, &mut s, &f0, 1).await;
    assert!(refused(&got[0]), "{:?}", got[0].as_ref().err());
}

#[tokio::test]
async fn a_man_in_the_middle_with_a_wrong_password_cannot_complete() {
    let real = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let real_addr = real.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let (s, _) = real.accept().await.unwrap();
        Link::accept(s, "pair-secret").await
    });
    let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = fake.local_addr().unwrap().to_string();
    // The man in the middle answers the client as the server and calls the
    // server as the client, with the only password it has.
    let mitm = tokio::spawn(async move {
        let (s, _) = fake.accept().await.unwrap();
        let to_client = Link::accept(s, "guessed-secret").await;
        let to_server = Link::connect(&real_addr, "guessed-secret", Duration::from_secs(5)).await;
        (to_client.is_ok(), to_server.is_ok())
    });
    let client = Link::connect(&fake_addr, "pair-secret", Duration::from_secs(5)).await;
    let c = client
        .err()
        .expect("the client refuses the man in the middle");
    let s = server
        .await
        .unwrap()
        .err()
        .expect("the server refuses the man in the middle");
    assert!(is_auth_failed(&c), "{c:#}");
    assert!(is_auth_failed(&s), "{s:#}");
    assert_eq!(
        mitm.await.unwrap(),
        (false, false),
        "the man in the middle got a link"
    );
}

/// A TCP proxy to `to` for one connection, keeping every octet it forwards.
async fn tap(to: String) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        let (a, _) = l.accept().await.unwrap();
        let b = TcpStream::connect(to).await.unwrap();
        let (ar, aw) = a.into_split();
        let (br, bw) = b.into_split();
        let k2 = kept.clone();
        tokio::join!(copy(ar, bw, kept), copy(br, aw, k2));
    });
    (addr, seen)
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        seen.lock().unwrap().extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

fn push(body: &[u8]) -> Msg {
    let mut recipient = crate::queue::Recipient::new("r@y.test".into(), "r@y.test".into());
    recipient.attempts = 0;
    Msg::Push {
        envelope: Envelope {
            id: crate::queue::QueueId::new(),
            sender: Some("sender-marker@x.test".into()),
            recipients: vec![recipient],
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "client".into(),
            received_at: 0,
            size: body.len() as u64,
            smtputf8: false,
            eight_bit: false,
        },
        message: body.to_vec(),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_passive_transcript_holds_no_plaintext_of_a_pushed_message() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = l.local_addr().unwrap().to_string();
    let body = b"Subject: payroll\r\n\r\nTOP-SECRET-BODY-7f3a the quarterly figures\r\n";
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut link = Link::accept(s, "pair-secret-1").await.unwrap();
        let got = link.recv().await.unwrap();
        link.send(&Msg::Stored).await.unwrap();
        got
    });
    let (proxy, seen) = tap(server_addr).await;
    let mut c = Link::connect(&proxy, "pair-secret-1", Duration::from_secs(5))
        .await
        .unwrap();
    let answer = c.call(&push(body), Duration::from_secs(5)).await.unwrap();
    assert!(matches!(answer, Msg::Stored), "{answer:?}");
    match server.await.unwrap() {
        Msg::Push { message, .. } => assert_eq!(message, body.to_vec()),
        other => panic!("{other:?}"),
    }
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > body.len(), "the tap saw the push go by");
    for secret in [
        &b"TOP-SECRET-BODY-7f3a"[..],
        b"sender-marker",
        b"r@y.test",
        b"pair-secret-1",
    ] {
        assert!(
            !contains(&seen, secret),
            "{:?} crossed the link in clear",
            String::from_utf8_lossy(secret)
        );
    }
}
