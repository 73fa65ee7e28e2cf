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
mod tests;
