//! SMTP paths (RFC 5321 §4.1.2, RFC 6531): parsing `<...>` into a mailbox, and
//! telling apart what is syntactically broken from what is a relay trick.
//!
//! The relay policy must judge the address that a downstream server would really
//! deliver to. So a source route `<@a,@b:user@c>` is parsed and dropped (RFC 5321
//! §4.1.1.3: the route may be ignored, the mailbox is `user@c`), and the local-part
//! syntaxes that older MTAs interpret as further routing (`%`, `!`, quoted strings)
//! and IP-literal domains are reported as such.
//!
//! What is matched must be what is delivered: an address holding whitespace
//! (Unicode's, not only ASCII's), a control character or an invisible format
//! character is a syntax error (501 5.1.3), never trimmed or ignored, so that no
//! spelling a downstream server would refuse can match a catalog address.

use std::fmt;

/// A parsed mailbox, `local@domain`, as the client wrote it (case kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub local: String,
    pub domain: String,
    /// The local part was a quoted string.
    pub quoted: bool,
    /// The domain was an address literal `[...]`.
    pub literal: bool,
}

impl Mailbox {
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// A local part or domain form that downstream MTAs may route on:
    /// `%` hack, `!` bang path, quoted local part, IP literal.
    pub fn relay_trick(&self) -> Option<&'static str> {
        if self.quoted {
            Some("quoted local parts are not accepted")
        } else if self.literal {
            Some("address literals are not accepted as recipient domains")
        } else if self.local.contains('%') {
            Some("'%' routing is not accepted")
        } else if self.local.contains('!') {
            Some("'!' paths are not accepted")
        } else {
            None
        }
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// A reverse-path: the null sender `<>` or a mailbox.
pub type ReversePath = Option<Mailbox>;

/// Why a path did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError(pub &'static str);

/// Parses `<...>` (the brackets included) from the start of `s`; returns the mailbox
/// (None for `<>`) and the rest of the string (the parameters).
pub fn parse_path(s: &str) -> Result<(ReversePath, &str), PathError> {
    let s = s.trim_start_matches([' ', '\t']);
    let rest = s
        .strip_prefix('<')
        .ok_or(PathError("the address must be in <angle brackets>"))?;
    // Find the closing '>' outside a quoted string.
    let mut in_quote = false;
    let mut escaped = false;
    let mut end = None;
    for (i, c) in rest.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '>' if !in_quote => {
                end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let end = end.ok_or(PathError("missing '>'"))?;
    let inner = &rest[..end];
    let after = &rest[end + 1..];
    if !after.is_empty() && !after.starts_with(' ') {
        return Err(PathError("unexpected text after '>'"));
    }
    if inner.is_empty() {
        return Ok((None, after));
    }
    let inner = strip_source_route(inner)?;
    Ok((Some(parse_mailbox(inner)?), after))
}

/// `@a,@b:user@c` → `user@c`, checking the route's syntax.
fn strip_source_route(s: &str) -> Result<&str, PathError> {
    if !s.starts_with('@') {
        return Ok(s);
    }
    let colon = s.find(':').ok_or(PathError("source route without ':'"))?;
    for hop in s[..colon].split(',') {
        let d = hop.strip_prefix('@').ok_or(PathError("bad source route"))?;
        check_domain(d)?;
    }
    Ok(&s[colon + 1..])
}

fn parse_mailbox(s: &str) -> Result<Mailbox, PathError> {
    let (local, quoted, rest) = if let Some(q) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = q.char_indices();
        let mut close = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, e)) if (' '..='~').contains(&e) || !e.is_ascii() => out.push(e),
                    _ => return Err(PathError("bad quoted-pair")),
                },
                '"' => {
                    close = Some(i);
                    break;
                }
                c if c != ' ' && hidden(c) => {
                    return Err(PathError(
                        "whitespace or control character in quoted string",
                    ))
                }
                c => out.push(c),
            }
        }
        let close = close.ok_or(PathError("unterminated quoted string"))?;
        (out, true, &q[close + 1..])
    } else {
        let at = s
            .rfind('@')
            .ok_or(PathError("the address has no @domain"))?;
        let local = &s[..at];
        check_dot_string(local)?;
        (local.to_string(), false, &s[at..])
    };
    let domain = rest
        .strip_prefix('@')
        .ok_or(PathError("the address has no @domain"))?;
    if local.is_empty() {
        return Err(PathError("empty local part"));
    }
    if local.len() > 64 {
        return Err(PathError("local part over 64 octets"));
    }
    if let Some(lit) = domain.strip_prefix('[') {
        let lit = lit
            .strip_suffix(']')
            .ok_or(PathError("unterminated address literal"))?;
        let ok = lit.parse::<std::net::Ipv4Addr>().is_ok()
            || lit
                .strip_prefix("IPv6:")
                .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok());
        if !ok {
            return Err(PathError("bad address literal"));
        }
        return Ok(Mailbox {
            local,
            domain: domain.to_string(),
            quoted,
            literal: true,
        });
    }
    check_domain(domain)?;
    Ok(Mailbox {
        local,
        domain: domain.to_string(),
        quoted,
        literal: false,
    })
}

/// Dot-string (RFC 5321 §4.1.2) with UTF-8 allowed (RFC 6531).
fn check_dot_string(s: &str) -> Result<(), PathError> {
    if s.is_empty() {
        return Err(PathError("empty local part"));
    }
    for atom in s.split('.') {
        if atom.is_empty() {
            return Err(PathError("misplaced '.' in the local part"));
        }
        if atom.chars().any(hidden) {
            return Err(PathError(
                "whitespace or control character in the local part",
            ));
        }
        if atom.chars().any(|c| {
            c.is_ascii() && !(c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c))
        }) {
            return Err(PathError("character not allowed in the local part"));
        }
    }
    Ok(())
}

/// Whitespace (any Unicode `White_Space`), a control character (C0, DEL, C1), or
/// an invisible format character (zero-width, bidirectional controls, soft hyphen,
/// byte order mark): none has a place in an address, and each can make two
/// spellings look alike.
fn hidden(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(c,
            '\u{ad}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}')
}

/// A domain: dot-separated labels; a trailing dot is a syntax error in SMTP.
fn check_domain(d: &str) -> Result<(), PathError> {
    if d.is_empty() {
        return Err(PathError("empty domain"));
    }
    if d.len() > 255 {
        return Err(PathError("domain over 255 octets"));
    }
    for label in d.split('.') {
        if label.is_empty() {
            return Err(PathError("empty label in the domain (a trailing dot?)"));
        }
        if label.chars().any(hidden) {
            return Err(PathError("whitespace or control character in the domain"));
        }
        if label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
            return Err(PathError("bad label in the domain"));
        }
        if label
            .chars()
            .any(|c| c.is_ascii() && !(c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(PathError("character not allowed in the domain"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> Mailbox {
        parse_path(s).unwrap().0.unwrap()
    }

    #[test]
    fn plain_and_null_paths() {
        assert_eq!(parse_path("<>").unwrap(), (None, ""));
        let (m, rest) = parse_path("<Alice@Example.COM> SIZE=10").unwrap();
        assert_eq!(m.unwrap().to_string(), "Alice@Example.COM");
        assert_eq!(rest, " SIZE=10");
        assert_eq!(mb("<jörg@exämple.de>").domain, "exämple.de");
    }

    #[test]
    fn source_routes_are_judged_on_the_mailbox() {
        let m = mb("<@relay.one,@relay.two:user@final.test>");
        assert_eq!(m.to_string(), "user@final.test");
        assert!(parse_path("<@relay.one:>").is_err());
        assert!(parse_path("<@bad..route:user@x.test>").is_err());
    }

    #[test]
    fn tricks_are_recognised() {
        assert!(mb("<user%other.test@ours.test>").relay_trick().is_some());
        assert!(mb("<other.test!user@ours.test>").relay_trick().is_some());
        let q = mb("<\"user@other.test\"@ours.test>");
        assert!(q.quoted && q.relay_trick().is_some());
        assert_eq!(q.local, "user@other.test");
        assert!(mb("<user@[127.0.0.1]>").relay_trick().is_some());
        assert!(mb("<user@[IPv6:::1]>").literal);
        assert!(mb("<user@ours.test>").relay_trick().is_none());
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "user@x.test",
            "<user@x.test",
            "<user>",
            "<@x.test>",
            "<user@x.test.>",
            "<user@>",
            "<a..b@x.test>",
            "<.a@x.test>",
            "<a b@x.test>",
            "<\"open@x.test>",
            "<user@[999.1.1.1]>",
            "<user@x.test>junk",
            "<\u{a0}alice@x.test>",
            "<alice@x.test\u{3000}>",
            "<ali\u{85}ce@x.test>",
            "<ali\u{200b}ce@x.test>",
            "<alice@x\u{202e}.test>",
            "<\"a\u{2028}b\"@x.test>",
            "<\"a\tb\"@x.test>",
            "<@r\u{a0}.test:alice@x.test>",
        ] {
            assert!(parse_path(bad).is_err(), "{bad} should not parse");
        }
    }
}
