//! The Received trace header (RFC 5321 §4.4, protocol names from RFC 3848) this
//! router prepends to what it accepts and to the reports it originates.

use super::date::rfc5322_date;
use std::net::IpAddr;
use std::time::SystemTime;

/// What the Received header says about the transaction.
pub struct Trace<'a> {
    pub helo: &'a str,
    pub client_ip: IpAddr,
    pub router: &'a str,
    pub esmtp: bool,
    pub tls: bool,
    pub smtputf8: bool,
    pub id: &'a str,
    /// Named in a `for` clause only when there is exactly one.
    pub recipients: &'a [(String, String)],
    pub when: SystemTime,
}

pub fn received(t: &Trace) -> String {
    let proto = match (t.smtputf8, t.esmtp, t.tls) {
        (true, _, false) => "UTF8SMTP",
        (true, _, true) => "UTF8SMTPS",
        (false, true, false) => "ESMTP",
        (false, true, true) => "ESMTPS",
        (false, false, _) => "SMTP",
    };
    let helo: String = t
        .helo
        .chars()
        .map(|c| {
            // 8-bit text only in a message that asked for SMTPUTF8: a HELO in
            // UTF-8 must not make a 7-bit message 8-bit (5.6.3 at a server
            // without 8BITMIME, and a bounce).
            if c.is_control() || c == '(' || c == ')' || (!t.smtputf8 && !c.is_ascii()) {
                '?'
            } else {
                c
            }
        })
        .collect();
    let ip = match t.client_ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    let mut h = format!(
        "Received: from {helo} ([{ip}])\r\n\tby {} (clustermail) with {proto} id {}",
        t.router, t.id
    );
    if let [(one, _)] = t.recipients {
        h.push_str(&format!("\r\n\tfor <{one}>"));
    }
    h.push_str(&format!(";\r\n\t{}\r\n", rfc5322_date(t.when)));
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn a_utf8_helo_stays_out_of_a_message_without_smtputf8() {
        let t = |smtputf8| {
            received(&Trace {
                helo: "café.test",
                client_ip: "127.0.0.1".parse().unwrap(),
                router: "mx.test",
                esmtp: true,
                tls: false,
                smtputf8,
                id: "1",
                recipients: &[],
                when: UNIX_EPOCH,
            })
        };
        assert!(
            t(false).starts_with("Received: from caf?.test ("),
            "{}",
            t(false)
        );
        assert!(
            t(true).starts_with("Received: from café.test ("),
            "{}",
            t(true)
        );
    }

    #[test]
    fn received_header() {
        let rcpts = vec![("a@b.test".to_string(), "a@b.test".to_string())];
        let h = received(&Trace {
            helo: "client(evil)",
            client_ip: "::1".parse().unwrap(),
            router: "mx.test",
            esmtp: true,
            tls: true,
            smtputf8: false,
            id: "00000000000000AB",
            recipients: &rcpts,
            when: UNIX_EPOCH,
        });
        assert_eq!(
            h,
            "Received: from client?evil? ([IPv6:::1])\r\n\tby mx.test (clustermail) with ESMTPS id 00000000000000AB\r\n\tfor <a@b.test>;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
    }
}
