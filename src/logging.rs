//! Logging setup (`--log-format pretty|json` on stderr, `RUST_LOG`) and the
//! escaping that keeps peer-supplied text (HELO names, addresses, server replies,
//! error texts) from forging log lines or driving a terminal.
//!
//! The escaping is structural, at the formatter, so every field of every event is
//! covered without each call site remembering it:
//! - `pretty`: each field value (the message too) is written through
//!   [`EscapeControls`]: a control character (C0, DEL, C1), a line or paragraph
//!   separator, or a bidirectional override is written as `\r`, `\n`, `\t` or
//!   `\u{..}`, so an event stays on one line and an ESC sequence stays text.
//! - `json`: JSON escapes C0 controls itself; DEL, C1 controls and the others above
//!   are valid raw in a JSON string, so [`JsonEscapes`] rewrites each as its
//!   `\uXXXX` escape (the same string to a JSON reader, inert to a terminal).
//!
//! Logged values are Rust strings, so always UTF-8: bytes from a peer that are not
//! UTF-8 reach a log only through a lossy conversion (U+FFFD), never raw.

use crate::cli::LogFormat;
use std::fmt::{self, Write as _};
use std::io;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::Writer;

/// Installs the global subscriber: `format` on stderr, `RUST_LOG` else
/// `default_level`.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Pretty => logs
            .with_writer(io::stderr)
            .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
            .fmt_fields(tracing_subscriber::fmt::format::debug_fn(write_field).delimited(" "))
            .init(),
        LogFormat::Json => logs
            .json()
            .with_ansi(false)
            .with_writer(|| JsonEscapes(io::stderr()))
            .init(),
    }
}

/// One field of the pretty format: `name=value`, or the message alone.
fn write_field(
    w: &mut Writer<'_>,
    field: &tracing::field::Field,
    value: &dyn fmt::Debug,
) -> fmt::Result {
    if field.name() != "message" {
        write!(w, "{}=", field.name())?;
    }
    write!(EscapeControls(w), "{value:?}")
}

/// Characters never written raw to a log.
fn unsafe_in_log(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// A `fmt::Write` that escapes [`unsafe_in_log`] characters on their way through.
pub struct EscapeControls<W>(pub W);

impl<W: fmt::Write> fmt::Write for EscapeControls<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(unsafe_in_log) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or('\0');
            match c {
                '\r' => self.0.write_str("\\r")?,
                '\n' => self.0.write_str("\\n")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// An `io::Write` for text shown to an administrator's terminal (`queue show`,
/// `track`): [`unsafe_in_log`] characters other than the line ends are escaped, so
/// text a peer chose (a HELO, a server's reply, a Message-ID) cannot move the
/// cursor, retitle the window or forge a line. Writes must be whole UTF-8 strings
/// (as `write!` makes them).
pub struct TerminalSafe<W>(pub W);

impl<W: std::io::Write> std::io::Write for TerminalSafe<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut escaped = String::with_capacity(text.len());
        for (i, line) in text.split('\n').enumerate() {
            if i > 0 {
                escaped.push('\n');
            }
            fmt::Write::write_str(&mut EscapeControls(&mut escaped), line)
                .map_err(|_| std::io::Error::other("formatting"))?;
        }
        self.0.write_all(escaped.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Writes JSON log lines with DEL, C1 controls and the other [`unsafe_in_log`]
/// characters as `\uXXXX` (raw C0 controls never occur: JSON escapes them, and
/// the line's own end is kept).
pub struct JsonEscapes<W>(pub W);

impl<W: io::Write> io::Write for JsonEscapes<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The formatter hands over one whole event (a String) per write.
        let text = String::from_utf8_lossy(buf);
        let body = text.strip_suffix('\n').unwrap_or(&text);
        let mut out = String::with_capacity(text.len() + 8);
        for c in body.chars() {
            if unsafe_in_log(c) {
                let _ = write!(out, "\\u{:04x}", c as u32);
            } else {
                out.push(c);
            }
        }
        if body.len() < text.len() {
            out.push('\n');
        }
        self.0.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn controls_are_escaped_for_the_pretty_format() {
        let mut out = String::new();
        EscapeControls(&mut out)
            .write_str("evil\x1b[2J\u{9b}31m\rINFO forged\n\t\x7f\u{202e}ok é")
            .unwrap();
        assert_eq!(
            out,
            "evil\\u{1b}[2J\\u{9b}31m\\rINFO forged\\n\\t\\u{7f}\\u{202e}ok é"
        );
    }

    #[test]
    fn json_lines_get_escapes_for_what_json_leaves_raw() {
        let mut out = Vec::new();
        let line = "{\"helo\":\"a\u{9b}b\u{7f}c\u{2028}d\\u001b\"}\n";
        JsonEscapes(&mut out).write_all(line.as_bytes()).unwrap();
        let got = String::from_utf8(out).unwrap();
        assert_eq!(got, "{\"helo\":\"a\\u009bb\\u007fc\\u2028d\\u001b\"}\n");
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["helo"], "a\u{9b}b\u{7f}c\u{2028}d\u{1b}");
    }
}
