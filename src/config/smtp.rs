//! `[smtp]`: the inbound SMTP service (listeners, limits, timeouts, TLS) and
//! the octet sizes its settings are written in.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The inbound SMTP service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Addresses to listen on (IPv4 and IPv6), `host:port`.
    pub listen: Vec<String>,
    /// Largest message accepted, in octets (advertised as SIZE).
    pub max_message_size: u64,
    /// Most recipients in one transaction; more get 452 4.5.3.
    pub max_recipients: usize,
    /// Most simultaneous connections; more get 421 4.7.0.
    pub max_connections: usize,
    /// Most simultaneous connections from one IP address; more get 421 4.7.0.
    pub max_connections_per_ip: usize,
    /// Most bad commands in one session before it is closed with 421.
    pub max_errors: usize,
    /// What to do with a message text line over 998 octets: `reject` (550 5.6.0
    /// after the data) or `accept` (kept byte for byte; never truncated).
    pub long_lines: LongLines,
    /// What to do with a message holding a bare CR or bare LF (RFC 5321 §2.3.8),
    /// which downstream servers could read as line ends (the SMTP smuggling vector):
    /// `normalize` (each stored as CRLF), `reject` (550 5.6.0) or `accept` (kept
    /// byte for byte).
    pub bare_line_endings: BareLineEndings,
    /// Waiting for the next command (RFC 5321 §4.5.3.2.7: at least 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Waiting for the next piece of message data (RFC 5321 §4.5.3.2.5: 3 minutes).
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// On shutdown, how long transactions in progress may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// New mail gets `452 4.3.1` while the data disk has less free space than
    /// this (instead of failing writes); `"0B"`: never.
    pub min_free_disk: ByteSize,
    /// Message data held in memory by all sessions together (`"256MiB"`): past it,
    /// new data gets 452 4.3.1 instead of growing the router out of memory.
    pub max_data_in_flight: ByteSize,
    /// A whole transaction (MAIL to the end of its data), however busy the client
    /// keeps each read: past it, 421 4.4.2 and the connection closes.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// PEM certificate chain for STARTTLS; STARTTLS is offered only when set.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    pub tls_key: Option<PathBuf>,
}

/// A number of octets, written as an integer or with a unit: `"256MiB"`, `"64 KiB"`,
/// `"1GiB"` (binary), `"100MB"` (decimal), `"4096B"`; the prefix in any case, the
/// final `B` in capitals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

const BYTE_UNITS: [(&str, u64); 7] = [
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let bad = || format!("{text:?} is not a size: write e.g. \"256MiB\", \"64KiB\", \"1GiB\"");
        let n: u64 = t[..digits].parse().map_err(|_| bad())?;
        let unit = t[digits..].trim();
        let mult = if unit.is_empty() {
            1
        } else {
            BYTE_UNITS
                .iter()
                // Any case but the final B: "Mb" would be megabits.
                .find(|(u, _)| unit.ends_with('B') && u.eq_ignore_ascii_case(unit))
                .map(|&(_, m)| m)
                .ok_or_else(bad)?
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl std::fmt::Display for ByteSize {
    /// In the largest binary unit that divides it exactly.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, mult) in BYTE_UNITS.iter().filter(|(u, _)| u.ends_with("iB")) {
            if self.0 >= *mult && self.0.is_multiple_of(*mult) {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Octets(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Octets(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LongLines {
    Reject,
    Accept,
}

/// What the inbound service does with a bare CR or bare LF in message data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BareLineEndings {
    /// Each is stored (and relayed) as CRLF; only CRLF.CRLF ends the data.
    Normalize,
    /// The message is refused with 550 5.6.0.
    Reject,
    /// Kept byte for byte (relayed as is).
    Accept,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["127.0.0.1:2525".into()],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_connections: 1000,
            max_connections_per_ip: 100,
            max_errors: 20,
            long_lines: LongLines::Reject,
            bare_line_endings: BareLineEndings::Normalize,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            shutdown_grace: Duration::from_secs(30),
            min_free_disk: ByteSize(1 << 30),
            max_data_in_flight: ByteSize(256 << 20),
            transaction_timeout: Duration::from_secs(600),
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl SmtpConfig {
    /// Checks values that TOML types alone cannot.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        use std::net::SocketAddr;
        if self.listen.is_empty() {
            bail!("smtp.listen is empty: give at least one host:port");
        }
        for l in &self.listen {
            l.parse::<SocketAddr>().map_err(|_| {
                anyhow::anyhow!("smtp.listen: {l:?} is not an IP:port (IPv6 as [::1]:2525)")
            })?;
        }
        if self.max_message_size == 0 {
            bail!("smtp.max_message_size must be above 0");
        }
        for (name, v) in [
            ("max_recipients", self.max_recipients),
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_errors", self.max_errors),
        ] {
            if v == 0 {
                bail!("smtp.{name} must be above 0");
            }
        }
        if self.max_data_in_flight.0 < 1 << 20 {
            bail!(
                "smtp.max_data_in_flight must be at least 1MiB, not {}",
                self.max_data_in_flight
            );
        }
        if self.transaction_timeout.is_zero() {
            bail!("smtp.transaction_timeout must be above 0");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("smtp.tls_cert and smtp.tls_key go together: set both or neither");
        }
        Ok(())
    }
}
