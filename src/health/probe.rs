//! The availability probe: connect, read the greeting, say QUIT, within a timeout.
//! Host names are resolved at probe time (never at import), with the resolver
//! deliveries share (`deliver::mx`); the first address that accepts is probed.

use super::Probe;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Probes one server: the greeting's code and how long it took, or why it failed.
pub async fn probe(address: &str, timeout: Duration) -> Probe {
    let started = Instant::now();
    let attempt = async {
        let mut why = String::from("no address");
        let mut stream = None;
        for addr in crate::deliver::mx::addresses(address).await? {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => why = format!("connect: {e}"),
            }
        }
        let stream = stream.ok_or(why)?;
        let mut reader = BufReader::new(stream);
        // The greeting may span several lines (220-...); its code is what counts.
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before greeting".to_string());
            }
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("not an SMTP greeting: {:?}", line.trim_end()))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                let rtt = started.elapsed();
                let _ = reader.get_mut().write_all(b"QUIT\r\n").await;
                return Ok((code, rtt));
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((code, rtt))) => Probe::Banner { code, rtt },
        Ok(Err(why)) => Probe::Failed(why),
        Err(_) => Probe::Failed(format!("no greeting within {} ms", timeout.as_millis())),
    }
}
