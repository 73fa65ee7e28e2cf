//! The HA link's handshake: SPAKE2 over the shared password, key confirmation,
//! and the session keys of the link's authenticated cipher. Owns the wire format
//! of the handshake, the key schedule, the [`AuthFailed`] error and the limit on
//! failed password checks; [`super::link`] owns the frames that follow.
//!
//! Wire (client = SPAKE2 side A, server = side B, Ed25519 group):
//! 1. client → server: `CMHA2` ‖ X (33 octets: side ‖ element)
//! 2. server → client: `CMHA2` ‖ Y (33 octets)
//! 3. client → server: HMAC(k_cc, T), its key confirmation
//! 4. server checks it; → client: `1` ‖ HMAC(k_sc, T), or a single `0` (refused)
//!    and closes
//! 5. client checks the server's confirmation.
//!
//! A server short of password checks (see below) answers step 1 with `CMHA2` ‖ `0`
//! (busy) and closes.
//!
//! T = SHA-256(`CMHA2` ‖ id_client ‖ id_server ‖ X ‖ Y) binds the protocol
//! version and both roles (which SPAKE2 also binds into its key); K = SPAKE2's
//! key. HKDF-SHA256(salt T, K) gives four keys: the client→server and
//! server→client ChaCha20-Poly1305 keys, and the two confirmation keys. A wrong
//! password gives the two ends different K, so the check in step 4 or 5 fails
//! with [`AuthFailed`].
//!
//! Why no one can test password guesses offline:
//! - An eavesdropper sees X = x·G + pw·M and Y = y·G + pw·N, each hidden by a
//!   random scalar, then MACs and sealed frames under keys derived from K. To
//!   test a guess it must compute K = x·y·G, the computational Diffie-Hellman
//!   problem; the MACs and frames are useless without K.
//! - A client (the server's only unauthenticated peer) commits to one guess in X.
//!   The server sends nothing derived from K until the client's confirmation has
//!   checked (step 4 sends one refusal octet otherwise), so the client learns
//!   "right" or "wrong" for that single guess: one online guess per connection.
//!   Each server handshake takes a token from a process-wide budget of
//!   [`GUESS_BURST`] (one more earned per [`GUESS_REFILL`]) before step 2, and
//!   gets it back only if the client proved the password: guesses are held to
//!   2 a second however many connections a guesser opens. While a guesser keeps
//!   the budget spent, the peer's own reconnections may be answered busy too
//!   (an established link is not affected).
//! - Someone posing as the server (a hijacked `ha.peer` address) likewise gets one
//!   guess per connection the client makes: the client reconnects at most once a
//!   heartbeat interval.

use anyhow::{anyhow, bail, Result};
use ring::{aead, digest, hkdf, hmac};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Protocol name and version; a peer speaking another version is refused.
pub const MAGIC: &[u8; 5] = b"CMHA2";
const ID_CLIENT: &[u8] = b"clustermail HA client";
const ID_SERVER: &[u8] = b"clustermail HA server";
/// A SPAKE2 message: the side octet and a compressed Ed25519 point.
const PAKE_MSG: usize = 33;
const CONFIRM: usize = 32;
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 0;
/// Sent instead of the server's SPAKE2 message (whose first octet is its side,
/// `B`) when it takes no password checks for now.
const BUSY: u8 = 0;
/// Failed password checks the server allows in a burst...
pub const GUESS_BURST: f64 = 20.0;
/// ...and the time it takes to earn one more (a misconfigured peer retrying
/// every second never runs the budget out).
pub const GUESS_REFILL: Duration = Duration::from_millis(500);
/// Longest a server handshake waits for a token before answering [`BUSY`].
const THROTTLE_WAIT: Duration = Duration::from_secs(1);

/// The handshake proved that the two ends do not share the password (or that a
/// third party without it is in the middle). `ha status` reports it as an
/// authentication failure: find it with [`is_auth_failed`].
#[derive(Debug, thiserror::Error)]
#[error("HA authentication failed: {0}")]
pub struct AuthFailed(pub &'static str);

/// Whether `e` (or its cause) is an [`AuthFailed`].
pub fn is_auth_failed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<AuthFailed>())
}

/// The keys of one authenticated connection, one cipher per direction.
pub struct Keys {
    pub seal: aead::LessSafeKey,
    pub open: aead::LessSafeKey,
}

/// The four keys the handshake derives from SPAKE2's key.
struct Schedule {
    client_to_server: aead::LessSafeKey,
    server_to_client: aead::LessSafeKey,
    client_confirm: hmac::Key,
    server_confirm: hmac::Key,
    transcript: digest::Digest,
}

impl Schedule {
    fn derive(spake_key: &[u8], client_msg: &[u8], server_msg: &[u8]) -> Result<Schedule> {
        let transcript = transcript(client_msg, server_msg);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, transcript.as_ref()).extract(spake_key);
        let cipher = |label: &[u8]| {
            let info = [label];
            let okm = prk.expand(&info, &aead::CHACHA20_POLY1305)?;
            Ok::<_, ring::error::Unspecified>(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
        };
        let mac = |label: &[u8]| prk.expand(&[label], hmac::HMAC_SHA256).map(hmac::Key::from);
        let schedule = || -> Result<Schedule, ring::error::Unspecified> {
            Ok(Schedule {
                client_to_server: cipher(b"CMHA2 client to server")?,
                server_to_client: cipher(b"CMHA2 server to client")?,
                client_confirm: mac(b"CMHA2 client confirm")?,
                server_confirm: mac(b"CMHA2 server confirm")?,
                transcript,
            })
        };
        schedule().map_err(|_| anyhow!("HA key derivation failed"))
    }

    fn confirm(&self, key: &hmac::Key) -> hmac::Tag {
        hmac::sign(key, self.transcript.as_ref())
    }

    fn check(&self, key: &hmac::Key, tag: &[u8]) -> bool {
        hmac::verify(key, self.transcript.as_ref(), tag).is_ok()
    }
}

fn transcript(client_msg: &[u8], server_msg: &[u8]) -> digest::Digest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in [&MAGIC[..], ID_CLIENT, ID_SERVER, client_msg, server_msg] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part);
    }
    ctx.finish()
}

fn spake(password: &str, client: bool) -> (Spake2<Ed25519Group>, Vec<u8>) {
    let (pw, a, b) = (
        Password::new(password.as_bytes()),
        Identity::new(ID_CLIENT),
        Identity::new(ID_SERVER),
    );
    if client {
        Spake2::<Ed25519Group>::start_a(&pw, &a, &b)
    } else {
        Spake2::<Ed25519Group>::start_b(&pw, &a, &b)
    }
}

fn finish(state: Spake2<Ed25519Group>, theirs: &[u8]) -> Result<Vec<u8>> {
    state
        .finish(theirs)
        .map_err(|e| anyhow!("the peer's HA handshake message is malformed: {e:?}"))
}

/// Reads the peer's `CMHA2` ‖ SPAKE2 message; a server may answer [`BUSY`].
async fn hello(stream: &mut TcpStream, from_server: bool) -> Result<[u8; PAKE_MSG]> {
    let what = if from_server { "peer" } else { "client" };
    let mut magic = [0u8; 5];
    stream
        .read_exact(&mut magic)
        .await
        .map_err(|_| anyhow!("the {what} closed the HA handshake (not a clustermail HA port, or an older clustermail?)"))?;
    if &magic != MAGIC {
        if magic.starts_with(b"CMHA") {
            bail!(
                "the {what} speaks HA protocol {} and this unit {}: run the same clustermail version on both units",
                String::from_utf8_lossy(&magic),
                String::from_utf8_lossy(MAGIC)
            );
        }
        bail!("the {what} does not speak the clustermail HA protocol");
    }
    let mut msg = [0u8; PAKE_MSG];
    let closed = |_| anyhow!("the {what} closed the HA handshake");
    stream.read_exact(&mut msg[..1]).await.map_err(closed)?;
    if from_server && msg[0] == BUSY {
        bail!("the {what} takes no HA handshakes for now: too many failed password checks lately (a unit with the wrong password, or someone guessing)");
    }
    stream.read_exact(&mut msg[1..]).await.map_err(closed)?;
    Ok(msg)
}

/// The client side: proves it knows the password, checks that the server does.
pub async fn client(stream: &mut TcpStream, password: &str) -> Result<Keys> {
    let (state, ours) = spake(password, true);
    stream.write_all(&[&MAGIC[..], &ours].concat()).await?;
    let theirs = hello(stream, true).await?;
    let keys = Schedule::derive(&finish(state, &theirs)?, &ours, &theirs)?;
    stream
        .write_all(keys.confirm(&keys.client_confirm).as_ref())
        .await?;
    let mut verdict = [0u8; 1 + CONFIRM];
    stream.read_exact(&mut verdict[..1]).await.map_err(|_| {
        anyhow!("the peer closed the HA handshake before answering our key confirmation")
    })?;
    if verdict[0] != ACCEPTED {
        return Err(
            AuthFailed("the peer refused our key confirmation: the passwords differ").into(),
        );
    }
    stream
        .read_exact(&mut verdict[1..])
        .await
        .map_err(|_| anyhow!("the peer closed the HA handshake during its key confirmation"))?;
    if !keys.check(&keys.server_confirm, &verdict[1..]) {
        return Err(AuthFailed(
            "the peer's key confirmation is wrong: it does not know the password",
        )
        .into());
    }
    Ok(Keys {
        seal: keys.client_to_server,
        open: keys.server_to_client,
    })
}

/// The server side: the client proves it knows the password first; only then
/// does anything derived from the key go back.
pub async fn server(stream: &mut TcpStream, password: &str) -> Result<Keys> {
    server_with(stream, password, &BUDGET).await
}

async fn server_with(
    stream: &mut TcpStream,
    password: &str,
    budget: &Mutex<Budget>,
) -> Result<Keys> {
    let theirs = hello(stream, false).await?;
    if let Err(e) = admit(budget).await {
        let _ = stream.write_all(&[&MAGIC[..], &[BUSY]].concat()).await;
        return Err(e);
    }
    let (state, ours) = spake(password, false);
    stream.write_all(&[&MAGIC[..], &ours].concat()).await?;
    let keys = Schedule::derive(&finish(state, &theirs)?, &theirs, &ours)?;
    let mut proof = [0u8; CONFIRM];
    stream
        .read_exact(&mut proof)
        .await
        .map_err(|_| anyhow!("the client closed the HA handshake before its key confirmation"))?;
    if !keys.check(&keys.client_confirm, &proof) {
        let _ = stream.write_all(&[REFUSED]).await;
        return Err(AuthFailed(
            "the client's key confirmation is wrong: it does not know the password",
        )
        .into());
    }
    lock(budget).refund();
    let tag = keys.confirm(&keys.server_confirm);
    stream
        .write_all(&[&[ACCEPTED][..], tag.as_ref()].concat())
        .await?;
    Ok(Keys {
        seal: keys.server_to_client,
        open: keys.client_to_server,
    })
}

/// Tokens for password checks: each server handshake takes one before its
/// check and gets it back only if the client proved the password.
#[derive(Debug)]
struct Budget {
    burst: f64,
    refill: Duration,
    tokens: f64,
    at: Option<Instant>,
}

impl Budget {
    const fn new(burst: f64, refill: Duration) -> Budget {
        Budget {
            burst,
            refill,
            tokens: burst,
            at: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let earned =
                now.saturating_duration_since(at).as_secs_f64() / self.refill.as_secs_f64();
            self.tokens = (self.tokens + earned).min(self.burst);
        }
        self.at = Some(now);
    }

    /// Takes a token, or says how long until one is earned.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.refill.mul_f64(1.0 - self.tokens))
        }
    }

    fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }
}

/// The process's budget: every connection to the HA port draws on it, so the
/// rate of password guesses is bounded however many connections a guesser opens.
static BUDGET: Mutex<Budget> = Mutex::new(Budget::new(GUESS_BURST, GUESS_REFILL));

fn lock(budget: &Mutex<Budget>) -> std::sync::MutexGuard<'_, Budget> {
    budget.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits for a password-check token, at most [`THROTTLE_WAIT`].
async fn admit(budget: &Mutex<Budget>) -> Result<()> {
    let deadline = Instant::now() + THROTTLE_WAIT;
    loop {
        let now = Instant::now();
        let wait = match lock(budget).take(now) {
            Ok(()) => return Ok(()),
            Err(wait) => wait,
        };
        if now + wait > deadline {
            bail!("too many failed HA handshakes lately (a password guesser?): refused for now");
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server handshake on a loopback port, and its address.
    async fn server_on(password: &'static str) -> (String, tokio::task::JoinHandle<Result<Keys>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            server(&mut s, password).await
        });
        (addr, task)
    }

    /// Every octet the server sends until it closes (or resets) the connection.
    async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
        let mut rest = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(Ok(n @ 1..)) =
            tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await
        {
            rest.extend_from_slice(&buf[..n]);
        }
        rest
    }

    /// The server's only answers to a client that has not proved the password
    /// are its SPAKE2 message and one refusal octet: nothing derived from the
    /// key, so a guesser learns "wrong" for the one guess it committed to and
    /// has nothing to test other guesses against offline.
    #[tokio::test]
    async fn a_client_without_the_password_learns_one_refusal_octet() {
        let (addr, server) = server_on("the-pair-secret").await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (state, ours) = spake("a-guess-1234", true);
        s.write_all(&[&MAGIC[..], &ours].concat()).await.unwrap();
        let theirs = hello(&mut s, true).await.unwrap();
        let keys = Schedule::derive(&finish(state, &theirs).unwrap(), &ours, &theirs).unwrap();
        s.write_all(keys.confirm(&keys.client_confirm).as_ref())
            .await
            .unwrap();
        assert_eq!(read_to_end(&mut s).await, vec![REFUSED]);
        let e = server.await.unwrap().err().expect("refused");
        assert!(is_auth_failed(&e), "{e:#}");
    }

    #[tokio::test]
    async fn an_older_peer_is_told_to_run_the_same_version() {
        let (addr, server) = server_on("the-pair-secret").await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[&b"CMHA1"[..], &[7u8; 32]].concat())
            .await
            .unwrap();
        let e = server.await.unwrap().err().expect("refused").to_string();
        assert!(
            e.contains("CMHA1") && e.contains("same clustermail version"),
            "{e}"
        );
        assert!(read_to_end(&mut s).await.is_empty(), "nothing sent to it");
    }

    #[tokio::test]
    async fn a_malformed_spake_message_is_a_protocol_error_not_a_guess() {
        let (addr, server) = server_on("the-pair-secret").await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Side 'B' from a client: the roles are bound, a reflected message fails.
        let (_, reflected) = spake("the-pair-secret", false);
        s.write_all(&[&MAGIC[..], &reflected].concat())
            .await
            .unwrap();
        let e = server.await.unwrap().err().expect("refused");
        assert!(!is_auth_failed(&e), "{e:#}");
        assert!(e.to_string().contains("malformed"), "{e:#}");
    }

    /// A guesser that has spent the budget gets `BUSY` at once (after
    /// [`THROTTLE_WAIT`]), a clear error, and no password check.
    #[tokio::test]
    async fn a_spent_budget_answers_busy_and_checks_nothing() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // Spent, and the next token further away than a handshake waits.
        let budget = Mutex::new(Budget::new(1.0, THROTTLE_WAIT * 10));
        lock(&budget).take(Instant::now()).unwrap();
        let server = async {
            let (mut s, _) = l.accept().await.unwrap();
            server_with(&mut s, "the-pair-secret", &budget).await
        };
        let client = async {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            client(&mut s, "the-pair-secret").await
        };
        let (s, c) = tokio::join!(server, client);
        let s = s.err().expect("refused");
        let c = c.err().expect("refused");
        assert!(
            s.to_string().contains("too many failed HA handshakes"),
            "{s:#}"
        );
        assert!(
            c.to_string().contains("too many failed password checks"),
            "{c:#}"
        );
        assert!(!is_auth_failed(&c) && !is_auth_failed(&s));
    }

    #[test]
    fn failed_checks_spend_the_budget_and_time_refills_it() {
        let t0 = Instant::now();
        let mut b = Budget::new(GUESS_BURST, GUESS_REFILL);
        for _ in 0..GUESS_BURST as usize {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).expect_err("the burst is spent");
        assert_eq!(wait, GUESS_REFILL);
        assert!(
            b.take(t0 + GUESS_REFILL / 2).is_err(),
            "half a token is not one"
        );
        assert!(
            b.take(t0 + GUESS_REFILL).is_ok(),
            "one refill period earns one check"
        );
        assert!(b.take(t0 + GUESS_REFILL).is_err());
        // A long quiet spell refills at most the burst.
        let later = t0 + GUESS_REFILL * 1000;
        for _ in 0..GUESS_BURST as usize {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn a_proved_password_gives_its_token_back() {
        let t0 = Instant::now();
        let mut b = Budget::new(GUESS_BURST, GUESS_REFILL);
        for _ in 0..100 {
            b.take(t0)
                .expect("the peer's own reconnections never run out");
            b.refund();
        }
    }
}
