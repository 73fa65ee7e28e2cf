//! The Received trace header (RFC 5321 §4.4, protocol names from RFC 3848) and an
//! RFC 5322 date, without a date crate.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

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
            if c.is_control() || c == '(' || c == ')' {
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

/// `Tue, 24 Nov 2026 23:54:25 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d} {} {y} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), after Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_564_465);
        assert_eq!(rfc5322_date(t), "Tue, 24 Nov 2026 23:54:25 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
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
