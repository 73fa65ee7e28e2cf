//! The availability probe: connect, read the greeting, say QUIT, within a timeout.
//! Host names are resolved with hickory-resolver at probe time (never at import).

use super::Probe;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Resolves `host:port` (an IP, `[IPv6]`, or a DNS name).
pub async fn resolve(address: &str) -> Result<SocketAddr, String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address}: not host:port"))?;
    let port: u16 = port.parse().map_err(|_| format!("{address}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let resolver = hickory_resolver::TokioResolver::builder_tokio()
        .map_err(|e| format!("resolver: {e}"))?
        .build()
        .map_err(|e| format!("resolver: {e}"))?;
    let ips = resolver
        .lookup_ip(host)
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    ips.iter()
        .next()
        .map(|ip| SocketAddr::new(ip, port))
        .ok_or_else(|| format!("{host}: no address"))
}

/// Probes one server: the greeting's code and how long it took, or why it failed.
pub async fn probe(address: &str, timeout: Duration) -> Probe {
    let started = Instant::now();
    let attempt = async {
        let addr = resolve(address).await?;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
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
