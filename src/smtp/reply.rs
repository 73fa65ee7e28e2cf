//! SMTP replies with enhanced status codes (RFC 3463), formatted as one or more
//! lines `code-text` / `code text` ending in CRLF.

use std::fmt::Write;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code, e.g. "2.1.5"; empty for 220/221 greetings and EHLO lines.
    pub status: &'static str,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status,
            lines: vec![text.into()],
        }
    }

    pub fn multi(code: u16, lines: Vec<String>) -> Reply {
        Reply {
            code,
            status: "",
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// The reply as it goes on the wire.
    pub fn to_wire(&self) -> String {
        let mut out = String::new();
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let sep = if i + 1 < n { '-' } else { ' ' };
            if self.status.is_empty() {
                let _ = write!(out, "{}{sep}{text}\r\n", self.code);
            } else {
                let _ = write!(out, "{}{sep}{} {text}\r\n", self.code, self.status);
            }
        }
        out
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.to_wire().trim_end())
    }
}

// The replies used in more than one place.
pub fn ok(text: &str) -> Reply {
    Reply::new(250, "2.0.0", text)
}
pub fn bad_sequence(text: &str) -> Reply {
    Reply::new(503, "5.5.1", text)
}
pub fn syntax(text: &str) -> Reply {
    Reply::new(501, "5.5.4", text)
}
pub fn unknown_command() -> Reply {
    Reply::new(500, "5.5.1", "Command unrecognized")
}
pub fn line_too_long() -> Reply {
    Reply::new(500, "5.5.2", "Line too long (512 octets at most)")
}
pub fn too_many_connections() -> Reply {
    Reply::new(421, "4.7.0", "Too many connections, try again later")
}
pub fn timeout(name: &str) -> Reply {
    Reply::new(421, "4.4.2", format!("{name} Timeout, closing connection"))
}
/// This router is the standby (or failed) unit of an HA pair.
pub fn inactive(name: &str) -> Reply {
    Reply::new(
        421,
        "4.3.2",
        format!("{name} Not the active unit of its HA pair, try the other"),
    )
}
/// The data disk is below `smtp.min_free_disk`: new mail is refused for now.
pub fn low_disk(name: &str) -> Reply {
    Reply::new(
        452,
        "4.3.1",
        format!("{name} Insufficient system storage, try again later"),
    )
}
pub fn shutting_down(name: &str) -> Reply {
    Reply::new(
        421,
        "4.3.2",
        format!("{name} Service shutting down, try again later"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(Reply::new(250, "2.1.5", "Ok").to_wire(), "250 2.1.5 Ok\r\n");
        assert_eq!(
            Reply::multi(250, vec!["mx".into(), "PIPELINING".into()]).to_wire(),
            "250-mx\r\n250 PIPELINING\r\n"
        );
    }
}
