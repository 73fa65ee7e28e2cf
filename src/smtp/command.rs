//! The SMTP command parser: one command line (without its CRLF) in, a [`Command`]
//! or the reply that explains why not out. Pure; fuzzed by `fuzz/`.

use super::address::{parse_path, Mailbox, ReversePath};
use super::reply::{self, Reply};

/// Longest command line including CRLF (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        to: Mailbox,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Body,
    pub smtputf8: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Body {
    #[default]
    SevenBit,
    EightBitMime,
}

/// Parses one command line. `esmtp`: the client said EHLO, so MAIL/RCPT may carry
/// parameters (after HELO they may not).
pub fn parse(line: &[u8], esmtp: bool) -> Result<Command, Reply> {
    let line = std::str::from_utf8(line)
        .map_err(|_| Reply::new(500, "5.5.2", "Command line is not valid UTF-8"))?;
    let (verb, args) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let upper = verb.to_ascii_uppercase();
    let no_args = |cmd: Command| {
        if args.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(reply::syntax(&format!("{upper} takes no arguments")))
        }
    };
    match upper.as_str() {
        "EHLO" | "HELO" => {
            let name = args.trim();
            if name.is_empty() || name.contains(' ') {
                return Err(reply::syntax(&format!("Syntax: {upper} hostname")));
            }
            Ok(if upper == "EHLO" {
                Command::Ehlo(name.to_string())
            } else {
                Command::Helo(name.to_string())
            })
        }
        "MAIL" => {
            let rest = strip_keyword(args, "FROM:")
                .ok_or_else(|| reply::syntax("Syntax: MAIL FROM:<address>"))?;
            let (from, params) = parse_path(rest).map_err(|e| {
                Reply::new(501, "5.1.7", format!("Bad sender address syntax: {}", e.0))
            })?;
            let params = parse_mail_params(params, esmtp)?;
            Ok(Command::Mail { from, params })
        }
        "RCPT" => parse_rcpt(args),
        "DATA" => no_args(Command::Data),
        "BDAT" => parse_bdat(args),
        "RSET" => no_args(Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_args(Command::StartTls),
        _ => Err(reply::unknown_command()),
    }
}

/// `RCPT TO:<address>`: no parameters are supported.
fn parse_rcpt(args: &str) -> Result<Command, Reply> {
    let rest =
        strip_keyword(args, "TO:").ok_or_else(|| reply::syntax("Syntax: RCPT TO:<address>"))?;
    let (to, params) = parse_path(rest).map_err(|e| {
        Reply::new(
            501,
            "5.1.3",
            format!("Bad recipient address syntax: {}", e.0),
        )
    })?;
    let to = to.ok_or_else(|| Reply::new(501, "5.1.3", "The null address is not a recipient"))?;
    if let Some(p) = params.split_whitespace().next() {
        return Err(Reply::new(
            555,
            "5.5.4",
            format!("Unsupported RCPT parameter {p}"),
        ));
    }
    Ok(Command::Rcpt { to })
}

/// `BDAT size [LAST]`.
fn parse_bdat(args: &str) -> Result<Command, Reply> {
    let mut it = args.split_whitespace();
    let size = it
        .next()
        .and_then(|s| {
            if s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse().ok()
            } else {
                None
            }
        })
        .ok_or_else(|| reply::syntax("Syntax: BDAT size [LAST]"))?;
    let last = match it.next() {
        None => false,
        Some(l) if l.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(reply::syntax("Syntax: BDAT size [LAST]")),
    };
    if it.next().is_some() {
        return Err(reply::syntax("Syntax: BDAT size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

/// `FROM:` / `TO:` case-insensitively, tolerating a space after the colon (common).
fn strip_keyword<'a>(args: &'a str, kw: &str) -> Option<&'a str> {
    let head = args.get(..kw.len())?;
    if head.eq_ignore_ascii_case(kw) {
        Some(&args[kw.len()..])
    } else {
        None
    }
}

fn parse_mail_params(s: &str, esmtp: bool) -> Result<MailParams, Reply> {
    let mut p = MailParams::default();
    for param in s.split_whitespace() {
        if !esmtp {
            return Err(Reply::new(555, "5.5.4", "MAIL parameters need EHLO"));
        }
        let (k, v) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        match (k.to_ascii_uppercase().as_str(), v) {
            ("SIZE", Some(v)) => {
                let n = if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() {
                    v.parse::<u64>().unwrap_or(u64::MAX)
                } else {
                    return Err(reply::syntax("Syntax: SIZE=<octets>"));
                };
                p.size = Some(n);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => p.body = Body::SevenBit,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => p.body = Body::EightBitMime,
            ("BODY", Some(_)) => return Err(Reply::new(555, "5.5.4", "Unsupported BODY type")),
            ("SMTPUTF8", None) => p.smtputf8 = true,
            _ => {
                return Err(Reply::new(
                    555,
                    "5.5.4",
                    format!("Unsupported MAIL parameter {k}"),
                ))
            }
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> u16 {
        match parse(line.as_bytes(), true) {
            Ok(_) => 0,
            Err(r) => r.code,
        }
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse(b"ehlo client.test", true),
            Ok(Command::Ehlo("client.test".into()))
        );
        assert_eq!(parse(b"QUIT", true), Ok(Command::Quit));
        assert_eq!(
            parse(b"BDAT 100 LAST", true),
            Ok(Command::Bdat {
                size: 100,
                last: true
            })
        );
        let Ok(Command::Mail { from, params }) = parse(
            b"MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME SMTPUTF8",
            true,
        ) else {
            panic!("MAIL")
        };
        assert_eq!(from.unwrap().to_string(), "a@b.test");
        assert_eq!(
            params,
            MailParams {
                size: Some(1000),
                body: Body::EightBitMime,
                smtputf8: true
            }
        );
        assert!(matches!(
            parse(b"mail from: <>", true),
            Ok(Command::Mail { from: None, .. })
        ));
    }

    #[test]
    fn errors_carry_the_right_codes() {
        assert_eq!(code("FOO"), 500);
        assert_eq!(code("MAIL <a@b.test>"), 501);
        assert_eq!(code("MAIL FROM:a@b.test"), 501);
        assert_eq!(code("MAIL FROM:<a@b.test> FOO=1"), 555);
        assert_eq!(code("MAIL FROM:<a@b.test> BODY=BINARYMIME"), 555);
        assert_eq!(code("MAIL FROM:<a@b.test> SIZE=x"), 501);
        assert_eq!(code("RCPT TO:<>"), 501);
        assert_eq!(code("RCPT TO:<a@b.test> NOTIFY=NEVER"), 555);
        assert_eq!(code("DATA now"), 501);
        assert_eq!(code("BDAT"), 501);
        assert_eq!(code("BDAT -1"), 501);
        assert_eq!(code("EHLO"), 501);
        assert_eq!(
            parse(b"MAIL FROM:<a@b.test> SIZE=10", false)
                .unwrap_err()
                .code,
            555
        );
        assert_eq!(parse(&[0xff, 0xfe], true).unwrap_err().code, 500);
    }
}
