//! Addresses as sent in MAIL FROM and RCPT TO (RFC 5321 §4.1.2): the queue keeps
//! a mailbox as `local@domain` with a quoted local part unquoted, so the local part
//! is quoted again here whenever it is not a dot-string. Address literals and
//! UTF-8 (RFC 6531) pass as they are. Pure: no I/O.

/// Why an address cannot be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsendable(pub String);

/// `local@domain` → the path's inside, quoted as RFC 5321 requires.
pub fn render(address: &str) -> Result<String, Unsendable> {
    let bad = |why: &str| Unsendable(format!("<{address}>: {why}"));
    let (local, domain) = address.rsplit_once('@').ok_or_else(|| bad("no @domain"))?;
    if local.is_empty() {
        return Err(bad("empty local part"));
    }
    if domain.is_empty()
        || domain
            .chars()
            .any(|c| c.is_control() || " <>\"\\@".contains(c))
    {
        return Err(bad("bad domain"));
    }
    if is_dot_string(local) {
        return Ok(address.to_string());
    }
    let mut quoted = String::with_capacity(local.len() + 2);
    quoted.push('"');
    for c in local.chars() {
        if c.is_control() {
            return Err(bad("control character in the local part"));
        }
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    Ok(format!("{quoted}@{domain}"))
}

/// Atoms of atext (UTF-8 allowed, RFC 6531) separated by single dots.
fn is_dot_string(s: &str) -> bool {
    s.split('.').all(|atom| {
        !atom.is_empty()
            && atom.chars().all(|c| {
                !c.is_ascii() || c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_strings_pass_others_are_quoted() {
        assert_eq!(render("a.b+c@x.test").unwrap(), "a.b+c@x.test");
        assert_eq!(render("john doe@x.test").unwrap(), "\"john doe\"@x.test");
        assert_eq!(render("a@b@x.test").unwrap(), "\"a@b\"@x.test");
        assert_eq!(render("a\\b\"c@x.test").unwrap(), "\"a\\\\b\\\"c\"@x.test");
        assert_eq!(render(".a@x.test").unwrap(), "\".a\"@x.test");
        assert_eq!(render("a..b@x.test").unwrap(), "\"a..b\"@x.test");
        assert_eq!(
            render("jörg@bücher.example").unwrap(),
            "jörg@bücher.example"
        );
        assert_eq!(render("ops@[127.0.0.1]").unwrap(), "ops@[127.0.0.1]");
        assert_eq!(
            render("ops@[IPv6:::1]").unwrap(),
            "ops@[IPv6:::1]",
            "the last @ splits"
        );
    }

    #[test]
    fn what_cannot_be_sent_is_an_error_not_a_panic() {
        assert!(render("nodomain").is_err());
        assert!(render("@x.test").is_err());
        assert!(render("a@").is_err());
        assert!(render("a\r\nRCPT TO:<b@x.test>@x.test").is_err());
        assert!(render("a@x.test\r\nRSET").is_err());
        assert!(render("a@x y").is_err());
    }
}
