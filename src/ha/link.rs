//! The HA link between the two units: a TCP connection, mutually authenticated
//! with the shared password, carrying length-prefixed bincode frames, each with
//! an HMAC-SHA256 tag under a per-connection key.
//!
//! Handshake (HMAC = HMAC-SHA256 keyed with the password):
//! 1. client → server: `CMHA1` + client nonce (32 random octets)
//! 2. server → client: `CMHA1` + server nonce + HMAC("server" ‖ cn ‖ sn)
//! 3. client checks it, then → server: HMAC("client" ‖ sn ‖ cn)
//! 4. server checks it. Session key = HMAC("session" ‖ cn ‖ sn).
//!
//! A frame is `len:u32 BE` ‖ payload ‖ tag, tag = HMAC_session(direction ‖ seq ‖
//! payload): frames cannot be forged, replayed or reordered. The link is not
//! encrypted: run it on loopback or a management network.

use crate::queue::Envelope;
use anyhow::{anyhow, bail, Context, Result};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAGIC: &[u8; 5] = b"CMHA1";
const TAG: usize = 32;
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
}

/// An authenticated connection.
pub struct Link {
    stream: TcpStream,
    key: hmac::Key,
    /// Our direction octet (b'c' client, b's' server) and frame counters.
    me: u8,
    sent: u64,
    received: u64,
}

fn nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| anyhow!("no randomness for the HA handshake"))?;
    Ok(n)
}

fn mac(key: &hmac::Key, parts: &[&[u8]]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign()
}

fn check(key: &hmac::Key, parts: &[&[u8]], tag: &[u8]) -> bool {
    hmac::verify(key, &parts.concat(), tag).is_ok()
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
        let pw = hmac::Key::new(hmac::HMAC_SHA256, password.as_bytes());
        let cn = nonce()?;
        stream.write_all(MAGIC).await?;
        stream.write_all(&cn).await?;
        let mut hello = [0u8; 5 + 32 + TAG];
        stream.read_exact(&mut hello).await.map_err(|_| {
            anyhow!("the peer closed the HA handshake (not a clustermail HA port?)")
        })?;
        if &hello[..5] != MAGIC {
            bail!("the peer does not speak the clustermail HA protocol");
        }
        let sn = &hello[5..37];
        if !check(&pw, &[b"server", &cn, sn], &hello[37..]) {
            bail!("HA authentication failed: the peer does not know the password");
        }
        stream
            .write_all(mac(&pw, &[b"client", sn, &cn]).as_ref())
            .await?;
        let key = mac(&pw, &[b"session", &cn, sn]);
        Ok(Link {
            stream,
            key: hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()),
            me: b'c',
            sent: 0,
            received: 0,
        })
    }

    /// Authenticates an incoming connection.
    pub async fn accept(mut stream: TcpStream, password: &str) -> Result<Link> {
        stream.set_nodelay(true)?;
        let pw = hmac::Key::new(hmac::HMAC_SHA256, password.as_bytes());
        let mut hello = [0u8; 5 + 32];
        stream.read_exact(&mut hello).await?;
        if &hello[..5] != MAGIC {
            bail!("not the clustermail HA protocol");
        }
        let cn = &hello[5..];
        let sn = nonce()?;
        stream.write_all(MAGIC).await?;
        stream.write_all(&sn).await?;
        stream
            .write_all(mac(&pw, &[b"server", cn, &sn]).as_ref())
            .await?;
        let mut proof = [0u8; TAG];
        stream.read_exact(&mut proof).await.map_err(|_| {
            anyhow!("authentication failed: the peer closed the handshake (wrong password?)")
        })?;
        if !check(&pw, &[b"client", &sn, cn], &proof) {
            bail!("authentication failed: wrong password");
        }
        let key = mac(&pw, &[b"session", cn, &sn]);
        Ok(Link {
            stream,
            key: hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()),
            me: b's',
            sent: 0,
            received: 0,
        })
    }

    pub async fn send(&mut self, msg: &Msg) -> Result<()> {
        let payload = bincode::serde::encode_to_vec(msg, bincode::config::standard())?;
        let tag = mac(&self.key, &[&[self.me], &self.sent.to_be_bytes(), &payload]);
        self.sent += 1;
        let len = u32::try_from(payload.len()).context("HA frame too large")?;
        let mut frame = Vec::with_capacity(4 + payload.len() + TAG);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(tag.as_ref());
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    pub async fn recv(&mut self) -> Result<Msg> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            bail!("HA frame of {len} octets is over the limit");
        }
        let mut buf = vec![0u8; len + TAG];
        self.stream.read_exact(&mut buf).await?;
        let (payload, tag) = buf.split_at(len);
        let them = if self.me == b'c' { b's' } else { b'c' };
        if !check(
            &self.key,
            &[&[them], &self.received.to_be_bytes(), payload],
            tag,
        ) {
            bail!("HA frame failed authentication");
        }
        self.received += 1;
        Ok(bincode::serde::decode_from_slice(payload, bincode::config::standard())?.0)
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

    #[tokio::test]
    async fn frames_flow_both_ways_once_authenticated() {
        let (c, s) = pair("secret-1", "secret-1").await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        c.send(&Msg::CatalogPull).await.unwrap();
        assert!(matches!(s.recv().await.unwrap(), Msg::CatalogPull));
        s.send(&Msg::Refused("no".into())).await.unwrap();
        assert!(matches!(c.recv().await.unwrap(), Msg::Refused(w) if w == "no"));
    }

    #[tokio::test]
    async fn a_wrong_password_is_refused_on_both_sides() {
        let (c, s) = pair("secret-1", "secret-2").await;
        let e = c.err().expect("client refuses").to_string();
        assert!(e.contains("authentication failed"), "{e}");
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn a_tampered_frame_is_rejected() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut link = Link::accept(s, "secret-1").await.unwrap();
            link.recv().await
        });
        let mut c = Link::connect(&addr, "secret-1", Duration::from_secs(5))
            .await
            .unwrap();
        // A frame whose tag is not the session's.
        let payload =
            bincode::serde::encode_to_vec(&Msg::CatalogPull, bincode::config::standard()).unwrap();
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(&[0u8; TAG]);
        c.stream.write_all(&frame).await.unwrap();
        let e = server.await.unwrap().expect_err("rejected").to_string();
        assert!(e.contains("failed authentication"), "{e}");
    }
}
