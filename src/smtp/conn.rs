//! Framing for one SMTP connection: command lines, DATA and BDAT octets, and
//! replies, over any async stream (plain TCP, or TLS after STARTTLS).
//!
//! Pipelining (RFC 2920): replies are buffered and written when the connection
//! would otherwise wait for input, so a client that sends MAIL, RCPT, RCPT, DATA in
//! one write gets every reply, in order, in one write too.

use super::command::MAX_COMMAND_LINE;
use super::data::{DataDecoder, Feed};
use super::limits::Reservation;
use super::reply::Reply;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One command line read from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Command(Vec<u8>),
    /// Over 512 octets: the rest of the line was skipped.
    TooLong,
    Eof,
}

pub struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    /// Unread input is `buf[start..end]`.
    start: usize,
    end: usize,
    out: Vec<u8>,
    /// How long a write of replies may wait for the client to read them.
    write_timeout: Duration,
}

const READ_CHUNK: usize = 16 * 1024;

/// RFC 5321 §4.5.3.2.7's five minutes, unless the driver says otherwise.
const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(300);

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timeout")
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            out: Vec::with_capacity(512),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }

    /// A client that does not read its replies for this long is dropped (a
    /// write waits for the client's window; without a bound, a client that never
    /// reads would hold its connection forever, whatever the command timeout).
    pub fn with_write_timeout(mut self, d: Duration) -> Conn<S> {
        self.write_timeout = d;
        self
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Input already received and not yet read (pipelined commands).
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Drops buffered input: after STARTTLS, plaintext sent before the handshake
    /// must not be taken as commands of the TLS session (CVE-2011-0411).
    pub fn discard_buffered(&mut self) -> usize {
        let n = self.buffered();
        self.start = self.end;
        n
    }

    pub fn reply(&mut self, r: &Reply) {
        crate::metrics::METRICS.smtp_reply(r.code);
        self.out.extend_from_slice(r.to_wire().as_bytes());
    }

    /// Writes the pending replies, within the write timeout.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let write = async {
                self.stream.write_all(&self.out).await?;
                self.stream.flush().await
            };
            tokio::time::timeout(self.write_timeout, write)
                .await
                .map_err(|_| timed_out())??;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more input, flushing pending replies first (we are about to wait).
    async fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        self.flush().await?;
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() + READ_CHUNK, 0);
        }
        let read = self.stream.read(&mut self.buf[self.end..]);
        let n = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| timed_out())??;
        self.end += n;
        Ok(n)
    }

    /// Reads one command line (CRLF or, leniently, LF ended).
    pub async fn read_line(&mut self, timeout: Duration) -> io::Result<Line> {
        let mut skipping = false;
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line_end = self.start + nl;
                let mut line = &self.buf[self.start..line_end];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                let too_long = skipping || nl + 1 > MAX_COMMAND_LINE;
                let line = line.to_vec();
                self.start = line_end + 1;
                return Ok(if too_long {
                    Line::TooLong
                } else {
                    Line::Command(line)
                });
            }
            if pending.len() >= MAX_COMMAND_LINE {
                // Over the limit with no end in sight: drop what we have, keep
                // skipping to the line's end, then say 500 once.
                skipping = true;
                self.start = self.end;
            }
            if self.fill(timeout).await? == 0 {
                return Ok(Line::Eof);
            }
        }
    }

    /// Reads DATA up to and including CRLF.CRLF into `out` through `decoder`
    /// ([`super::session::Session::data_decoder`]), holding no more than `budget`
    /// grants: when it cannot grow, `out` is freed, `budget` dropped (set to None)
    /// and the rest of the data read and discarded, so that the session stays in
    /// sync. Returns the decoder (size, over-size flag); an early EOF is an error.
    pub async fn read_data(
        &mut self,
        mut decoder: DataDecoder,
        timeout: Duration,
        out: &mut Vec<u8>,
        budget: &mut Option<Reservation>,
    ) -> io::Result<DataDecoder> {
        let mut discarded = Vec::new();
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(held) = budget.as_mut().filter(|_| !decoder.over_size()) {
                // Room for twice what it reads: a decoder repairing bare LFs
                // (LF to CRLF) writes up to that.
                let need = out.len() + 2 * pending.len();
                if !held.ensure(need as u64) {
                    *budget = None;
                    *out = Vec::new();
                } else if out.capacity() < need {
                    // Capacity follows the reservation (header room included).
                    out.reserve_exact(held.held() as usize - out.len());
                }
            }
            let sink = if budget.is_some() {
                &mut *out
            } else {
                discarded.clear();
                &mut discarded
            };
            match decoder.feed(pending, sink) {
                Feed::Done(used) => {
                    self.start += used;
                    return Ok(decoder);
                }
                Feed::More => self.start = self.end,
            }
            if self.fill(timeout).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in DATA",
                ));
            }
        }
    }

    /// Reads exactly `size` octets (a BDAT chunk) into `out`, or discards them.
    pub async fn read_exact(
        &mut self,
        size: u64,
        timeout: Duration,
        mut out: Option<&mut Vec<u8>>,
    ) -> io::Result<()> {
        let mut left = size;
        loop {
            let take = (left as usize).min(self.end - self.start);
            if let Some(o) = out.as_deref_mut() {
                o.extend_from_slice(&self.buf[self.start..self.start + take]);
            }
            self.start += take;
            left -= take as u64;
            if left == 0 {
                return Ok(());
            }
            if self.fill(timeout).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in BDAT",
                ));
            }
        }
    }
}
