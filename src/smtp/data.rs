//! Message data: the DATA decoder (end-of-data detection and dot-unstuffing) and
//! the checks every received body goes through, however it arrived (DATA or BDAT).
//!
//! SMTP smuggling: only `CRLF . CRLF` ends the data. A line starts only after CRLF,
//! so `LF . LF`, `LF . CRLF`, `CRLF . LF` and `CR . CR` are content, never the end.
//! Bare CR and bare LF are protocol violations (RFC 5321 §2.3.8) that downstream
//! servers may read as line ends. The decoder can normalize them (each becomes
//! CRLF, as Postfix's `smtpd_forbid_bare_newline = normalize` does), so that what is
//! stored and relayed has no line end but CRLF; otherwise [`check_body`] finds them
//! so that the session can refuse such a message, or keep it as is.

/// Longest text line allowed by RFC 5322 §2.1.1, CRLF excluded.
pub const MAX_LINE: usize = 998;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line: after CRLF or the start of the data (`hard`), or,
    /// when normalizing, after a bare CR or LF (not `hard`: no end of data here).
    LineStart {
        hard: bool,
    },
    Mid,
    /// After a CR in mid line.
    Cr,
    /// After a '.' at the start of a line.
    Dot {
        hard: bool,
    },
    /// After ".\r" at the start of a line.
    DotCr {
        hard: bool,
    },
}

/// Decodes the data that follows `354`: feed it bytes as they come.
///
/// Dot-unstuffing (RFC 5321 §4.5.2) applies to every line the stored message will
/// have: when normalizing, a line ended or begun by a bare CR or LF is a line too
/// (it becomes one), so its leading dot is removed the same way, and a line of a
/// lone dot there is kept as content (`.` then CRLF), never taken as the end.
#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    /// Octets of message received so far (after unstuffing).
    pub size: u64,
    max: u64,
    normalize: bool,
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
    /// A decoder keeping bare CR and LF as they are (for `reject` and `accept`).
    pub fn new(max: u64) -> DataDecoder {
        DataDecoder {
            state: State::LineStart { hard: true },
            size: 0,
            max,
            normalize: false,
        }
    }

    /// A decoder storing every bare CR or LF as CRLF (`normalize`).
    pub fn normalizing(max: u64) -> DataDecoder {
        DataDecoder {
            normalize: true,
            ..DataDecoder::new(max)
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
            if let Some(next) = self.step_line_end(b, out) {
                self.state = next;
                continue;
            }
            self.state = match (self.state, b) {
                (State::LineStart { hard }, b'.') => State::Dot { hard },
                (State::LineStart { .. } | State::Mid, _) => {
                    // Fast path: copy up to the next CR (or LF when normalizing).
                    let rest = &input[i..];
                    let found = match self.normalize {
                        true => memchr::memchr2(b'\r', b'\n', rest),
                        false => memchr::memchr(b'\r', rest),
                    };
                    let end = found.map_or(input.len(), |p| i + p);
                    self.emit(out, &input[i - 1..end]);
                    i = end;
                    State::Mid
                }
                (State::DotCr { hard: true }, b'\n') => {
                    self.state = State::LineStart { hard: true };
                    return Feed::Done(i);
                }
                (State::DotCr { hard }, b'\n') => {
                    // ".CRLF" after a bare line end: a lone dot, content.
                    debug_assert!(self.normalize && !hard);
                    self.emit(out, b".\r\n");
                    State::LineStart { hard: true }
                }
                (State::DotCr { .. } | State::Cr, _) if self.normalize => {
                    // A bare CR (after a lone dot, if any): it ends the line; this
                    // byte starts the next one.
                    i -= 1;
                    let dot: &[u8] = if self.state == State::Cr { b"" } else { b"." };
                    self.emit(out, dot);
                    self.emit(out, b"\r\n");
                    State::LineStart { hard: false }
                }
                (State::Cr, other) => {
                    self.emit(out, &[b'\r', other]);
                    State::Mid
                }
                // ".\r" then something else: the dot is deleted, the CR is content.
                (State::DotCr { .. }, other) => {
                    self.emit(out, &[b'\r', other]);
                    State::Mid
                }
                (State::Dot { .. }, b'\n') => {
                    // ".\n" is content (a bare LF), never the end.
                    self.emit(out, b".\n");
                    State::Mid
                }
                // RFC 5321 §4.5.2: a leading dot on a line with more on it is deleted.
                (State::Dot { .. }, other) => {
                    self.emit(out, &[other]);
                    State::Mid
                }
            };
        }
        Feed::More
    }

    /// The transitions on CR and LF that every mode shares, and the bare LF of
    /// normalizing; `None`: not one of those.
    fn step_line_end(&mut self, b: u8, out: &mut Vec<u8>) -> Option<State> {
        let next = match (self.state, b) {
            (State::LineStart { .. } | State::Mid, b'\r') => State::Cr,
            (State::Dot { hard }, b'\r') => State::DotCr { hard },
            (State::Cr, b'\n') => {
                self.emit(out, b"\r\n");
                State::LineStart { hard: true }
            }
            (State::Cr, b'\r') if !self.normalize => {
                self.emit(out, b"\r");
                State::Cr
            }
            (State::DotCr { .. }, b'\r') if !self.normalize => {
                // ".\r\r": the dot is deleted, the first CR is content.
                self.emit(out, b"\r");
                State::Cr
            }
            (State::LineStart { .. } | State::Mid, b'\n') if self.normalize => {
                self.emit(out, b"\r\n");
                State::LineStart { hard: false }
            }
            (State::Dot { .. }, b'\n') if self.normalize => {
                // A lone dot ended by a bare LF: content.
                self.emit(out, b".\r\n");
                State::LineStart { hard: false }
            }
            _ => return None,
        };
        Some(next)
    }
}

/// The length of `body` once every bare CR or LF is a CRLF.
pub fn normalized_len(body: &[u8]) -> usize {
    let mut n = body.len();
    for (i, &b) in body.iter().enumerate() {
        let bare = match b {
            b'\r' => body.get(i + 1) != Some(&b'\n'),
            b'\n' => i == 0 || body[i - 1] != b'\r',
            _ => false,
        };
        n += usize::from(bare);
    }
    n
}

/// Makes every bare CR or LF a CRLF, in place: the buffer grows to its
/// [`normalized_len`] and is rewritten from the end, so no second copy of the
/// message is ever held.
pub fn normalize_line_endings(body: &mut Vec<u8>) {
    let (old, new) = (body.len(), normalized_len(body));
    if new == old {
        return;
    }
    body.resize(new, 0);
    // `r` reads the original octets backwards, `w` writes behind them; w >= r
    // always (the gap is the bare line endings still to come), so nothing unread
    // is overwritten.
    let (mut r, mut w) = (old, new);
    while r > 0 {
        let b = body[r - 1];
        if b == b'\n' || b == b'\r' {
            // A CRLF (the LF with its CR), or a bare CR or LF: a CRLF.
            r -= if b == b'\n' && r >= 2 && body[r - 2] == b'\r' {
                2
            } else {
                1
            };
            body[w - 2] = b'\r';
            body[w - 1] = b'\n';
            w -= 2;
        } else {
            body[w - 1] = b;
            r -= 1;
            w -= 1;
        }
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
    // From one CR or LF to the next (a vectorised search).
    while let Some(p) = memchr::memchr2(b'\r', b'\n', &body[i..]) {
        let at = i + p;
        if body[at] == b'\r' && body.get(at + 1) == Some(&b'\n') {
            let line = &body[line_start..at];
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
            i = at + 2;
            line_start = i;
        } else {
            c.bare_line_ending = true;
            i = at + 1;
        }
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

    fn normalize_all(input: &[u8]) -> (Vec<u8>, Option<usize>) {
        let mut d = DataDecoder::normalizing(1 << 20);
        let mut out = Vec::new();
        match d.feed(input, &mut out) {
            Feed::Done(n) => (out, Some(n)),
            Feed::More => (out, None),
        }
    }

    #[test]
    fn normalizing_stores_every_line_end_as_crlf() {
        let (body, done) = normalize_all(b"a\nb\rc\r\n..d\n..e\r.\n.\r.x\r\n.\r\nNEXT");
        assert_eq!(
            String::from_utf8_lossy(&body),
            "a\r\nb\r\nc\r\n.d\r\n.e\r\n.\r\n.\r\nx\r\n"
        );
        assert_eq!(done, Some(b"a\nb\rc\r\n..d\n..e\r.\n.\r.x\r\n.\r\n".len()));
        // A lone dot after a bare line end, even followed by CRLF, is content.
        let (body, done) = normalize_all(b"a\n.\r\nb\r\n.\r\n");
        assert_eq!(body, b"a\r\n.\r\nb\r\n");
        assert_eq!(done, Some(11));
        let mut v = b"a\rb\nc\r\n\r\r\n\n\r".to_vec();
        normalize_line_endings(&mut v);
        assert_eq!(v, b"a\r\nb\r\nc\r\n\r\n\r\n\r\n\r\n");
    }

    /// In place, against the obvious forward copy, over inputs of CR, LF and 'x'.
    #[test]
    fn in_place_normalization_matches_a_forward_copy() {
        fn forward(body: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < body.len() {
                match body[i] {
                    b'\r' if body.get(i + 1) == Some(&b'\n') => {
                        out.extend_from_slice(b"\r\n");
                        i += 1;
                    }
                    b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
                    b => out.push(b),
                }
                i += 1;
            }
            out
        }
        for n in 0..6u32 {
            for code in 0..3u32.pow(n) {
                let mut c = code;
                let body: Vec<u8> = (0..n)
                    .map(|_| {
                        let b = [b'\r', b'\n', b'x'][(c % 3) as usize];
                        c /= 3;
                        b
                    })
                    .collect();
                let mut v = body.clone();
                normalize_line_endings(&mut v);
                assert_eq!(v, forward(&body), "{body:?}");
                assert_eq!(normalized_len(&body), v.len(), "{body:?}");
            }
        }
    }

    /// The smuggling oracle of `fuzz/fuzz_targets/data.rs`, over pseudo-random
    /// inputs made of the bytes that matter, each split at every read boundary.
    #[test]
    fn normalizing_never_leaves_a_bare_line_end_nor_ends_early() {
        let alphabet = b"\r\n.ab";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            let input: Vec<u8> = (0..len)
                .map(|k| alphabet[((seed >> (k * 2 % 60)) % 5) as usize])
                .collect();
            let (whole, end) = normalize_all(&input);
            let first_end = if input.starts_with(b".\r\n") {
                Some(3)
            } else {
                input
                    .windows(5)
                    .position(|w| w == b"\r\n.\r\n")
                    .map(|p| p + 5)
            };
            assert_eq!(end, first_end, "{input:?}");
            assert!(
                !check_body(&whole).bare_line_ending,
                "{input:?} -> {whole:?}"
            );
            for split in 0..input.len() {
                let mut d = DataDecoder::normalizing(1 << 20);
                let mut out = Vec::new();
                let done = match d.feed(&input[..split], &mut out) {
                    Feed::Done(n) => Some(n),
                    Feed::More => match d.feed(&input[split..], &mut out) {
                        Feed::Done(n) => Some(split + n),
                        Feed::More => None,
                    },
                };
                assert_eq!((&out, done), (&whole, end), "{input:?} split at {split}");
            }
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
        for bare in [
            &b"a\rb\r\n"[..],
            b"a\nb",
            b"a\r",
            b"\n",
            b"a\r\r\n",
            b"a\r\n\nb",
        ] {
            assert!(check_body(bare).bare_line_ending, "{bare:?}");
        }
        assert!(!check_body(b"a\r\n\r\nb\r\n").bare_line_ending);
        assert!(
            check_body("x".repeat(999).as_bytes()).long_line,
            "the last line, unended"
        );
    }
}
