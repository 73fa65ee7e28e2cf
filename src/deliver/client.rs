//! One outbound SMTP connection (RFC 5321) over a tokio `TcpStream`: connect to
//! the first address that answers, read the greeting, EHLO (HELO if refused) and
//! what it advertises, send command lines (several at once under PIPELINING), read
//! replies, and send the message data dot-stuffed in one pass. Every step has a
//! timeout; the caller chooses it (the final reply has its own). STARTTLS
//! (RFC 3207) follows the server's `tls` setting (`TlsRequest`); a connection
//! says which TLS version it uses (`Connection::tls`).
//!
//! Owns the wire format only: what a reply means for a recipient is decided by
//! the transaction (`super::transaction`).

use super::tls::{self, TlsClient};
use crate::catalog::model::TlsPolicy;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest reply line read (RFC 5321 says 512; servers send more).
const MAX_LINE: u64 = 4096;
/// Most lines in one reply (an EHLO lists every extension).
const MAX_LINES: usize = 100;

/// A server reply: its code and the text of its lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" "))
    }
}

/// What the server advertised in its EHLO reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
}

impl Extensions {
    /// Reads the keywords of an EHLO reply (every line after the first).
    pub fn parse(ehlo: &Reply) -> Extensions {
        let mut e = Extensions::default();
        for line in ehlo.lines.iter().skip(1) {
            let keyword = line.split_whitespace().next().unwrap_or("");
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => e.pipelining = true,
                "8BITMIME" => e.eight_bit_mime = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "STARTTLS" => e.starttls = true,
                _ => {}
            }
        }
        e
    }
}

/// The TCP stream, in plain text or after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a delivery asks of STARTTLS: the server's setting and the name its
/// certificate is verified against.
#[derive(Clone, Copy)]
pub struct TlsRequest<'a> {
    pub policy: TlsPolicy,
    /// The server's `host:port`, whose host is the name when `name` is unset.
    pub address: &'a str,
    pub name: Option<&'a str>,
    pub client: &'a TlsClient,
}

/// Why a connection could not be opened; `tls`: the TLS handshake failed (an
/// opportunistic delivery then tries again in plain text).
struct OpenError {
    why: String,
    tls: bool,
}

impl From<String> for OpenError {
    fn from(why: String) -> OpenError {
        OpenError { why, tls: false }
    }
}

/// An open, greeted connection.
pub struct Connection {
    stream: BufReader<Stream>,
    pub extensions: Extensions,
    /// The TLS version in use ("TLSv1.3"), None in plain text.
    pub tls: Option<String>,
}

async fn within<T>(
    timeout: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, f).await.map_err(|_| {
        format!(
            "{what}: no answer within {}",
            humantime::format_duration(timeout)
        )
    })?
}

impl Connection {
    /// Connects to the first of `addrs` that accepts, reads the greeting, says
    /// EHLO `hello` (HELO when EHLO is refused) and starts TLS as `tls` asks: an
    /// opportunistic handshake that fails is retried once in plain text (as
    /// Postfix's `may`); under `required` it fails the connection.
    pub async fn open(
        addrs: &[SocketAddr],
        hello: &str,
        timeout: Duration,
        tls: TlsRequest<'_>,
    ) -> Result<Connection, String> {
        match Connection::open_once(addrs, hello, timeout, tls).await {
            Err(e) if e.tls && tls.policy == TlsPolicy::Opportunistic => {
                tracing::info!(server = %tls.address, why = %e.why, "opportunistic TLS failed: delivering in plain text");
                let plain = TlsRequest {
                    policy: TlsPolicy::Off,
                    ..tls
                };
                Connection::open_once(addrs, hello, timeout, plain)
                    .await
                    .map_err(|e| e.why)
            }
            other => other.map_err(|e| e.why),
        }
    }

    async fn open_once(
        addrs: &[SocketAddr],
        hello: &str,
        timeout: Duration,
        tls: TlsRequest<'_>,
    ) -> Result<Connection, OpenError> {
        let mut why = String::from("no address");
        let mut stream = None;
        for addr in addrs {
            match within(timeout, "connect", async {
                TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect {addr}: {e}"))
            })
            .await
            {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => why = e,
            }
        }
        let stream = stream.ok_or(why)?;
        // Without it Nagle holds the data's last small write back until the
        // server's delayed ACK: 40 ms per message on Linux (measured).
        stream
            .set_nodelay(true)
            .map_err(|e| format!("connect: {e}"))?;
        let mut conn = Connection {
            stream: BufReader::new(Stream::Plain(stream)),
            extensions: Extensions::default(),
            tls: None,
        };
        let greeting = conn.reply(timeout, "greeting").await?;
        if greeting.code != 220 {
            return Err(format!("greeting: {greeting}").into());
        }
        conn.hello(hello, timeout).await?;
        match tls.policy {
            TlsPolicy::Off => Ok(conn),
            TlsPolicy::Opportunistic if !conn.extensions.starttls => Ok(conn),
            TlsPolicy::Required if !conn.extensions.starttls => {
                Err("TLS is required but the server does not offer STARTTLS"
                    .to_string()
                    .into())
            }
            _ => conn.starttls(hello, timeout, tls).await,
        }
    }

    /// EHLO (HELO when EHLO is refused), reading the extensions.
    async fn hello(&mut self, hello: &str, timeout: Duration) -> Result<(), String> {
        let ehlo = self.command(&format!("EHLO {hello}"), timeout).await?;
        if ehlo.code == 250 {
            self.extensions = Extensions::parse(&ehlo);
        } else if ehlo.code >= 500 && ehlo.code != 554 {
            let helo = self.command(&format!("HELO {hello}"), timeout).await?;
            if helo.code != 250 {
                return Err(format!("HELO: {helo}"));
            }
        } else {
            return Err(format!("EHLO: {ehlo}"));
        }
        Ok(())
    }

    /// STARTTLS, the handshake (verified under `required`) and EHLO again. A
    /// refused STARTTLS leaves an opportunistic connection in plain text.
    async fn starttls(
        mut self,
        hello: &str,
        timeout: Duration,
        tls: TlsRequest<'_>,
    ) -> Result<Connection, OpenError> {
        let required = tls.policy == TlsPolicy::Required;
        let reply = self.command("STARTTLS", timeout).await?;
        if reply.code != 220 {
            if required {
                return Err(format!("TLS is required but STARTTLS was refused: {reply}").into());
            }
            return Ok(self);
        }
        // Anything already buffered was sent before the handshake: a plain-text
        // injection (CVE-2011-0411), never read as if it came over TLS.
        if !self.stream.buffer().is_empty() {
            return Err("STARTTLS: the server sent data before the TLS handshake"
                .to_string()
                .into());
        }
        let Stream::Plain(tcp) = self.stream.into_inner() else {
            return Err("STARTTLS: already in TLS".to_string().into());
        };
        let name = tls::server_name(tls.address, tls.name)?;
        let connector = tokio_rustls::TlsConnector::from(tls.client.config(required));
        let handshake = within(timeout, "TLS handshake", async {
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))
        })
        .await;
        let stream = handshake.map_err(|why| OpenError { why, tls: true })?;
        let version = stream.get_ref().1.protocol_version().map(tls::version_name);
        let mut conn = Connection {
            stream: BufReader::new(Stream::Tls(Box::new(stream))),
            extensions: Extensions::default(),
            tls: version.or_else(|| Some("TLS".into())),
        };
        conn.hello(hello, timeout).await?;
        Ok(conn)
    }

    /// Writes `bytes` (one or more command lines, or data).
    pub async fn send(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), String> {
        let stream = self.stream.get_mut();
        within(timeout, "write", async {
            let written = async {
                stream.write_all(bytes).await?;
                stream.flush().await
            };
            written.await.map_err(|e| format!("write: {e}"))
        })
        .await
    }

    /// Sends one command line (without CRLF) and reads its reply.
    pub async fn command(&mut self, line: &str, timeout: Duration) -> Result<Reply, String> {
        self.send(format!("{line}\r\n").as_bytes(), timeout).await?;
        let verb = line.split([' ', ':']).next().unwrap_or(line);
        self.reply(timeout, verb).await
    }

    /// Reads one (possibly multi-line) reply; `what` names the step in errors.
    pub async fn reply(&mut self, timeout: Duration, what: &str) -> Result<Reply, String> {
        let stream = &mut self.stream;
        within(timeout, what, async {
            let mut lines = Vec::new();
            loop {
                let mut raw = Vec::new();
                let n = (&mut *stream)
                    .take(MAX_LINE)
                    .read_until(b'\n', &mut raw)
                    .await
                    .map_err(|e| format!("{what}: {e}"))?;
                if n == 0 {
                    return Err(format!("{what}: connection closed"));
                }
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\r', '\n']);
                let code: u16 = line
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .filter(|c| (200..600).contains(c))
                    .ok_or_else(|| format!("{what}: not an SMTP reply: {line:?}"))?;
                let more = line.as_bytes().get(3) == Some(&b'-');
                lines.push(line.get(4..).unwrap_or("").to_string());
                if !more {
                    return Ok(Reply { code, lines });
                }
                if lines.len() >= MAX_LINES {
                    return Err(format!("{what}: reply of over {MAX_LINES} lines"));
                }
            }
        })
        .await
    }

    /// Sends the message data (after 354) and its terminating ".": Ok, or the
    /// error and whether the terminator may have reached the server (from then on
    /// the server may have stored the message).
    pub async fn data(&mut self, message: &[u8], timeout: Duration) -> Result<(), (String, bool)> {
        let (bytes, body) = stuffed(message);
        let stream = self.stream.get_mut();
        let mut written = 0;
        while written < bytes.len() {
            let step = tokio::time::timeout(timeout, stream.write(&bytes[written..])).await;
            match step {
                Ok(Ok(0)) => return Err(("data: connection closed".into(), written > body)),
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) => return Err((format!("data: {e}"), written > body)),
                Err(_) => {
                    let why = format!(
                        "data: not taken within {}",
                        humantime::format_duration(timeout)
                    );
                    return Err((why, written > body));
                }
            }
        }
        // TLS keeps the last record until flushed.
        match tokio::time::timeout(timeout, stream.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err((format!("data: {e}"), true)),
            Err(_) => Err(("data: not taken (flush)".into(), true)),
        }
    }

    /// Says QUIT, not waiting long for the answer.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT", Duration::from_secs(2)).await;
    }
}

/// The message as sent after DATA: every line starting with "." gets another
/// (RFC 5321 §4.5.2), then CRLF.CRLF (a CRLF first if the message does not end
/// with one). Also returns where the terminator starts.
pub fn stuffed(message: &[u8]) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 5);
    // Lines start at 0 and after every LF: copied in runs, a dot added before
    // each line that starts with one (found by a vectorised search).
    if message.first() == Some(&b'.') {
        out.push(b'.');
    }
    let mut copied = 0;
    for lf in memchr::memmem::find_iter(message, b"\n.") {
        out.extend_from_slice(&message[copied..=lf]);
        out.push(b'.');
        copied = lf + 1;
    }
    out.extend_from_slice(&message[copied..]);
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    let body = out.len();
    out.extend_from_slice(b".\r\n");
    (out, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffing_matches_a_byte_by_byte_reference() {
        fn reference(message: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut line_start = true;
            for &b in message {
                if line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                line_start = b == b'\n';
            }
            out
        }
        let alphabet = [b'.', b'\r', b'\n', b'a'];
        // Every message of up to 6 octets over the alphabet that matters.
        for len in 0..=6u32 {
            for n in 0..4usize.pow(len) {
                let m: Vec<u8> = (0..len).map(|k| alphabet[n / 4usize.pow(k) % 4]).collect();
                let (got, body) = stuffed(&m);
                let mut want = reference(&m);
                if !want.is_empty() && !want.ends_with(b"\r\n") {
                    want.extend_from_slice(b"\r\n");
                }
                assert_eq!(body, want.len(), "{m:?}");
                want.extend_from_slice(b".\r\n");
                assert_eq!(got, want, "{m:?}");
            }
        }
    }

    #[test]
    fn dots_at_line_starts_are_doubled_and_the_terminator_added() {
        assert_eq!(
            stuffed(b".a\r\nb.\r\n..c\r\n").0,
            b"..a\r\nb.\r\n...c\r\n.\r\n"
        );
        assert_eq!(stuffed(b"a\r\n.").0, b"a\r\n..\r\n.\r\n");
        assert_eq!(stuffed(b"x").0, b"x\r\n.\r\n");
        assert_eq!(stuffed(b"").0, b".\r\n");
        let (bytes, body) = stuffed(b"a\r\n");
        assert_eq!(&bytes[body..], b".\r\n");
    }

    #[tokio::test]
    async fn every_address_is_tried_until_one_answers() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"220 hi\r\n").await.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await;
            s.write_all(b"250-mx\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
                .await
                .unwrap();
            let _ = s.read(&mut buf).await;
        });
        let tls = super::TlsClient::new(None).unwrap();
        let req = TlsRequest {
            policy: TlsPolicy::Opportunistic,
            address: "127.0.0.1:25",
            name: None,
            client: &tls,
        };
        let conn = Connection::open(
            &[closed_addr, open_addr],
            "me.test",
            Duration::from_secs(10),
            req,
        )
        .await
        .unwrap();
        assert!(conn.extensions.pipelining && conn.extensions.smtputf8);
        assert!(!conn.extensions.eight_bit_mime);
        let none = Connection::open(&[closed_addr], "me.test", Duration::from_secs(10), req).await;
        assert!(none.is_err());
    }

    #[test]
    fn ehlo_keywords_are_read_case_insensitively() {
        let r = Reply {
            code: 250,
            lines: vec![
                "mx.example Hello".into(),
                "pipelining".into(),
                "SIZE 1000".into(),
                "8BITMIME".into(),
            ],
        };
        let e = Extensions::parse(&r);
        assert!(e.pipelining && e.eight_bit_mime && !e.smtputf8);
        assert!(
            !Extensions::parse(&Reply {
                code: 250,
                lines: vec!["PIPELINING".into()]
            })
            .pipelining
        );
    }
}
