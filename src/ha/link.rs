//! The HA link between the two units: a TCP connection that the handshake
//! ([`super::handshake`]: SPAKE2 over the shared password, then key confirmation)
//! authenticates both ways and keys, carrying length-prefixed bincode frames,
//! each sealed with ChaCha20-Poly1305 under its direction's key. Owns the frame
//! format, [`Msg`] and [`Link`].
//!
//! A frame is `len:u32 BE` ‖ ciphertext ‖ tag (16 octets; `len` counts both and is
//! the associated data). The nonce is the sender's direction octet (`c` or `s`),
//! three zero octets and the frame's sequence number (u64 BE), counted per
//! direction from 0 and never sent: a tampered, replayed, reordered or dropped
//! frame fails to open and ends the link. Nothing crosses in clear but the
//! handshake's SPAKE2 messages, confirmations and the frame lengths.

use crate::queue::Envelope;
use anyhow::{anyhow, bail, Context, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, NONCE_LEN};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::handshake::{self, Keys};
pub use super::handshake::{is_auth_failed, AuthFailed};

/// The AEAD tag after each frame's ciphertext.
const TAG: usize = 16;
/// Largest frame: a queued message plus its envelope.
const MAX_FRAME: usize = 256 << 20;

/// What the units say to each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Msg {
    /// Heartbeat (request) and its answer: the sender's view of itself.
    Beat(super::Beat),
    /// A queued message handed to the MASTER (queue push after a failover); the
    /// answer is `Stored` also when it is the very same message taken before
    /// (same id and digest).
    Push {
        envelope: Envelope,
        message: Vec<u8>,
    },
    /// The MASTER has the pushed message on disk.
    Stored,
    /// The request was not taken, and why.
    Refused(String),
    /// A SLAVE asks for the MASTER's catalog; the answer is `Catalog`.
    CatalogPull,
    /// The answer: the whole catalog and its version (comparable across units).
    Catalog {
        version: super::sync::CatalogVersion,
        toml: String,
    },
    /// MASTER to SLAVE, first on each shadow connection: every message the
    /// MASTER holds; the SLAVE drops its other shadows and answers `ShadowMissing`.
    ShadowSync(Vec<crate::queue::QueueId>),
    /// The messages of a `ShadowSync` the SLAVE has no shadow of.
    ShadowMissing(Vec<crate::queue::QueueId>),
    /// Shadow copies to keep and to drop, in order; answered `Shadowed` with the
    /// same batch number once durable. Several may be in flight on one
    /// connection (numbered from 0 on each); they are answered in order.
    Shadow {
        batch: u64,
        ops: Vec<super::shadow::Op>,
    },
    /// The SLAVE's shadows up to batch `batch` are on disk: how many it holds,
    /// and the arrival time (ms since the epoch) of the oldest (0: none).
    Shadowed { batch: u64, held: u64, oldest: u64 },
}

/// An authenticated connection.
pub struct Link {
    stream: TcpStream,
    keys: Keys,
    /// Our direction octet (b'c' client, b's' server) and frame counters.
    me: u8,
    sent: u64,
    received: u64,
}

fn nonce(direction: u8, seq: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[0] = direction;
    n[NONCE_LEN - 8..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Link {
    /// Connects to the peer's HA port and authenticates both ways.
    pub async fn connect(addr: &str, password: &str, timeout: Duration) -> Result<Link> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connect to {addr} timed out"))?
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        tokio::time::timeout(timeout, Link::client(stream, password))
            .await
            .map_err(|_| anyhow!("HA handshake with {addr} timed out"))?
    }

    async fn client(mut stream: TcpStream, password: &str) -> Result<Link> {
        let keys = handshake::client(&mut stream, password).await?;
        Ok(Link::new(stream, keys, b'c'))
    }

    /// Authenticates an incoming connection.
    pub async fn accept(mut stream: TcpStream, password: &str) -> Result<Link> {
        stream.set_nodelay(true)?;
        let keys = handshake::server(&mut stream, password).await?;
        Ok(Link::new(stream, keys, b's'))
    }

    fn new(stream: TcpStream, keys: Keys, me: u8) -> Link {
        Link {
            stream,
            keys,
            me,
            sent: 0,
            received: 0,
        }
    }

    pub async fn send(&mut self, msg: &Msg) -> Result<()> {
        let frame = self.seal(msg)?;
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next frame to send, with `msg` sealed under our key and sequence number.
    fn seal(&mut self, msg: &Msg) -> Result<Vec<u8>> {
        seal(&self.keys.seal, self.me, &mut self.sent, msg)
    }

    /// A frame of these payload octets (tests: payloads no `Msg` encodes to).
    #[cfg(test)]
    fn seal_payload(&mut self, payload: &[u8]) -> Result<Vec<u8>> {
        let mut frame = vec![0u8; 4];
        frame.extend_from_slice(payload);
        seal_frame(&self.keys.seal, self.me, &mut self.sent, frame)
    }

    pub async fn recv(&mut self) -> Result<Msg> {
        let them = if self.me == b'c' { b's' } else { b'c' };
        recv(&mut self.stream, &self.keys.open, them, &mut self.received).await
    }

    /// Sends a request and waits for its answer.
    pub async fn call(&mut self, msg: &Msg, timeout: Duration) -> Result<Msg> {
        tokio::time::timeout(timeout, async {
            self.send(msg).await?;
            self.recv().await
        })
        .await
        .map_err(|_| anyhow!("the peer did not answer within {} ms", timeout.as_millis()))?
    }

    /// Two halves that send and receive at once (requests pipelined: several
    /// sent before the first answer), keeping the keys and sequence numbers.
    pub fn split(self) -> (LinkReader, LinkWriter) {
        let (read, write) = self.stream.into_split();
        let them = if self.me == b'c' { b's' } else { b'c' };
        let reader = LinkReader {
            stream: read,
            open: self.keys.open,
            them,
            received: self.received,
        };
        let writer = LinkWriter {
            stream: write,
            seal: self.keys.seal,
            me: self.me,
            sent: self.sent,
        };
        (reader, writer)
    }
}

/// Counts the octets written to it.
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The frame carrying `msg`, sealed under `key` with the sender's direction
/// octet `me` and the sequence number `sent` (then counted).
fn seal(key: &LessSafeKey, me: u8, sent: &mut u64, msg: &Msg) -> Result<Vec<u8>> {
    // Encoded in place after the length, in a buffer of the right size: no
    // second copy of a large payload, no spare capacity.
    let mut size = Count(0);
    bincode::serde::encode_into_std_write(msg, &mut size, bincode::config::standard())?;
    if size.0 > MAX_FRAME {
        bail!("HA frame of {} octets is over the limit", size.0);
    }
    let mut frame = Vec::with_capacity(4 + size.0 + TAG);
    frame.extend_from_slice(&[0u8; 4]);
    bincode::serde::encode_into_std_write(msg, &mut frame, bincode::config::standard())?;
    seal_frame(key, me, sent, frame)
}

/// Seals `frame` (four octets for the length, then the payload) in place.
fn seal_frame(key: &LessSafeKey, me: u8, sent: &mut u64, mut frame: Vec<u8>) -> Result<Vec<u8>> {
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        bail!("HA frame of {len} octets is over the limit");
    }
    let header = u32::try_from(len + TAG)
        .context("HA frame too large")?
        .to_be_bytes();
    frame[..4].copy_from_slice(&header);
    let tag = key
        .seal_in_place_separate_tag(nonce(me, *sent), Aad::from(header), &mut frame[4..])
        .map_err(|_| anyhow!("HA frame could not be sealed"))?;
    frame.extend_from_slice(tag.as_ref());
    *sent = sent.checked_add(1).context("HA link sequence exhausted")?;
    Ok(frame)
}

/// Reads and opens the next frame of `stream`, sent by direction `them` with the
/// sequence number `received` (then counted).
async fn recv(
    stream: &mut (impl AsyncRead + Unpin),
    key: &LessSafeKey,
    them: u8,
    received: &mut u64,
) -> Result<Msg> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len < TAG || len - TAG > MAX_FRAME {
        bail!("HA frame of {len} octets is outside the limits");
    }
    // The buffer grows with the octets that really arrive: a forged header
    // announcing MAX_FRAME costs nothing until that much data is sent (and the
    // tag check below refuses it then).
    let mut buf = Vec::with_capacity(len.min(1 << 20));
    stream.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        bail!(
            "HA link closed inside a frame ({} of {len} octets)",
            buf.len()
        );
    }
    let payload = key
        .open_in_place(nonce(them, *received), Aad::from(header), &mut buf)
        .map_err(|_| {
            anyhow!("HA frame failed authentication (tampered, replayed or out of order)")
        })?;
    *received = received
        .checked_add(1)
        .context("HA link sequence exhausted")?;
    // The limit bounds what a length inside the payload may make the decoder
    // allocate (bincode allocates a Vec's announced length before reading it).
    let config = bincode::config::standard().with_limit::<MAX_FRAME>();
    Ok(bincode::serde::decode_from_slice(payload, config)?.0)
}

/// The receiving half of a [`Link`] ([`Link::split`]).
pub struct LinkReader {
    stream: OwnedReadHalf,
    open: LessSafeKey,
    them: u8,
    received: u64,
}

/// The sending half of a [`Link`] ([`Link::split`]).
pub struct LinkWriter {
    stream: OwnedWriteHalf,
    seal: LessSafeKey,
    me: u8,
    sent: u64,
}

impl LinkReader {
    pub async fn recv(&mut self) -> Result<Msg> {
        recv(&mut self.stream, &self.open, self.them, &mut self.received).await
    }
}

impl LinkWriter {
    pub async fn send(&mut self, msg: &Msg) -> Result<()> {
        let frame = seal(&self.seal, self.me, &mut self.sent, msg)?;
        self.stream.write_all(&frame).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
    async fn server_reads(
        c: &mut Link,
        s: &mut Link,
        raw: &[u8],
        frames: usize,
    ) -> Vec<Result<Msg>> {
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
            let to_server =
                Link::connect(&real_addr, "guessed-secret", Duration::from_secs(5)).await;
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
}
