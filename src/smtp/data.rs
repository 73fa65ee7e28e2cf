//! Message data: the DATA decoder (end-of-data detection and dot-unstuffing) and
//! the checks every received body goes through, however it arrived (DATA or BDAT).
//!
//! SMTP smuggling: only `CRLF . CRLF` ends the data. A line starts only after CRLF,
//! so `LF . LF`, `LF . CRLF`, `CRLF . LF` and `CR . CR` are content, never the end.
//! Bare CR and bare LF are protocol violations (RFC 5321 §2.3.8) that downstream
//! servers may read as line ends; [`check_body`] finds them so that the session can
//! refuse such a message (the default) before it is relayed anywhere.

/// Longest text line allowed by RFC 5322 §2.1.1, CRLF excluded.
pub const MAX_LINE: usize = 998;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After CRLF (or at the start of the data).
    LineStart,
    Mid,
    /// After a CR in mid line.
    Cr,
    /// After a '.' at the start of a line.
    Dot,
    /// After ".\r" at the start of a line.
    DotCr,
}

/// Decodes the data that follows `354`: feed it bytes as they come.
#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    /// Octets of message received so far (after unstuffing).
    pub size: u64,
    max: u64,
}

/// What [`DataDecoder::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// All input consumed; the data goes on.
    More,
    /// The end-of-data line was found; this many input bytes were consumed (the
    /// rest belongs to the next command: pipelining).
    Done(usize),
}

impl DataDecoder {
    pub fn new(max: u64) -> DataDecoder {
        DataDecoder {
            state: State::LineStart,
            size: 0,
            max,
        }
    }

    /// The message went over the size limit: its octets were counted, not kept.
    pub fn over_size(&self) -> bool {
        self.size > self.max
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.size <= self.max {
            out.extend_from_slice(bytes);
        }
    }

    /// Consumes `input`, appending message octets to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (State::LineStart, b'.') => State::Dot,
                (State::LineStart | State::Mid, b'\r') => State::Cr,
                (State::LineStart | State::Mid, _) => {
                    // Fast path: copy up to the next CR in one go.
                    let end = input[i..]
                        .iter()
                        .position(|&c| c == b'\r')
                        .map_or(input.len(), |p| i + p);
                    self.emit(out, &input[i - 1..end]);
                    i = end;
                    State::Mid
                }
                (State::Cr, b'\n') => {
                    self.emit(out, b"\r\n");
                    State::LineStart
                }
                (State::Cr, b'\r') => {
                    self.emit(out, b"\r");
                    State::Cr
                }
                (State::Cr, other) => {
                    self.emit(out, &[b'\r', other]);
                    State::Mid
                }
                (State::Dot, b'\r') => State::DotCr,
                (State::Dot, b'\n') => {
                    // ".\n" is content (a bare LF), never the end.
                    self.emit(out, b".\n");
                    State::Mid
                }
                // RFC 5321 §4.5.2: a leading dot on a line with more on it is deleted.
                (State::Dot, other) => {
                    self.emit(out, &[other]);
                    State::Mid
                }
                (State::DotCr, b'\n') => {
                    self.state = State::LineStart;
                    return Feed::Done(i);
                }
                // ".\r" then something else: the dot is deleted, the CR is content.
                (State::DotCr, b'\r') => {
                    self.emit(out, b"\r");
                    State::Cr
                }
                (State::DotCr, other) => {
                    self.emit(out, &[b'\r', other]);
                    State::Mid
                }
            };
        }
        Feed::More
    }
}

/// What [`check_body`] found in a message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BodyCheck {
    /// A CR not followed by LF, or an LF not preceded by CR.
    pub bare_line_ending: bool,
    /// A line over [`MAX_LINE`] octets.
    pub long_line: bool,
    /// `Received:` header fields (for loop detection).
    pub received: usize,
}

/// Scans a whole message once.
pub fn check_body(body: &[u8]) -> BodyCheck {
    let mut c = BodyCheck::default();
    let mut line_start = 0usize;
    let mut in_header = true;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\r' if body.get(i + 1) == Some(&b'\n') => {
                let line = &body[line_start..i];
                if line.len() > MAX_LINE {
                    c.long_line = true;
                }
                if in_header {
                    if line.is_empty() {
                        in_header = false;
                    } else if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
                        c.received += 1;
                    }
                }
                i += 2;
                line_start = i;
                continue;
            }
            b'\r' | b'\n' => c.bare_line_ending = true,
            _ => {}
        }
        i += 1;
    }
    if body.len() - line_start > MAX_LINE {
        c.long_line = true;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(chunks: &[&[u8]]) -> (Vec<u8>, Option<usize>) {
        let mut d = DataDecoder::new(1 << 20);
        let mut out = Vec::new();
        for (n, c) in chunks.iter().enumerate() {
            if let Feed::Done(used) = d.feed(c, &mut out) {
                return (out, Some(n * 1000 + used));
            }
        }
        (out, None)
    }

    #[test]
    fn end_of_data_and_unstuffing() {
        let (body, done) =
            decode_all(&[b"Subject: x\r\n\r\n..leading dot\r\n.hidden\r\nend\r\n.\r\nQUIT\r\n"]);
        assert_eq!(body, b"Subject: x\r\n\r\n.leading dot\r\nhidden\r\nend\r\n");
        assert_eq!(
            done,
            Some(b"Subject: x\r\n\r\n..leading dot\r\n.hidden\r\nend\r\n.\r\n".len())
        );
        let (body, done) = decode_all(&[b".\r\n"]);
        assert_eq!((body.as_slice(), done), (&b""[..], Some(3)));
    }

    #[test]
    fn the_terminator_may_be_split_across_reads() {
        let msg: &[u8] = b"a\r\nb\r\n.\r\n";
        for split in 1..msg.len() {
            let (body, done) = decode_all(&[&msg[..split], &msg[split..]]);
            assert_eq!(body, b"a\r\nb\r\n", "split at {split}");
            assert!(done.is_some(), "split at {split}");
        }
    }

    #[test]
    fn smuggling_sequences_never_end_the_data() {
        for evil in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r.\rMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
        ] {
            let (body, done) = decode_all(&[evil]);
            assert_eq!(
                done,
                None,
                "{:?} ended the data",
                String::from_utf8_lossy(evil)
            );
            assert!(
                check_body(&body).bare_line_ending,
                "{:?}",
                String::from_utf8_lossy(evil)
            );
        }
    }

    #[test]
    fn size_is_counted_past_the_limit_without_keeping_octets() {
        let mut d = DataDecoder::new(10);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"0123456789abcdef\r\n", &mut out), Feed::More);
        assert_eq!(d.feed(b".\r\n", &mut out), Feed::Done(3));
        assert!(d.over_size());
        assert!(out.len() <= 10);
        assert_eq!(d.size, 18);
    }

    #[test]
    fn body_checks() {
        let long = format!("Received: a\r\nreceived: b\r\n\r\n{}\r\n", "x".repeat(999));
        let c = check_body(long.as_bytes());
        assert!(c.long_line && !c.bare_line_ending);
        assert_eq!(c.received, 2);
        let ok = format!(
            "Subject: s\r\n\r\n{}\r\nReceived: not a header\r\n",
            "x".repeat(998)
        );
        assert_eq!(check_body(ok.as_bytes()), BodyCheck::default());
    }
}
