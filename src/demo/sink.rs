//! A small SMTP server that stores what it receives in Maildirs, one per recipient:
//! `ROOT/<recipient>/{tmp,new,cur}`, a file per message and recipient, written in
//! `tmp/` and renamed into `new/` before the 250 (the Maildir delivery protocol).
//!
//! It stands in for the cluster's mailbox servers in `clustermail demo`: it takes
//! every recipient, keeps no queue, and can be stopped (listener and sessions
//! closed, so the router sees "connection refused") and started again on the same
//! address.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest message kept (octets); a bigger one gets 552.
const MAX_MESSAGE: usize = 32 << 20;
/// Longest command or data line read.
const MAX_LINE: usize = 64 << 10;

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// One mailbox server: its name, address and Maildir root.
pub struct MaildirServer {
    pub name: String,
    pub addr: SocketAddr,
    pub root: PathBuf,
    running: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

impl MaildirServer {
    /// Binds `addr` (port 0: any free port) and starts serving.
    pub async fn start(name: &str, addr: SocketAddr, root: PathBuf) -> io::Result<MaildirServer> {
        let mut s = MaildirServer {
            name: name.to_string(),
            addr,
            root,
            running: None,
        };
        s.up().await?;
        Ok(s)
    }

    pub fn is_up(&self) -> bool {
        self.running.is_some()
    }

    /// Starts serving again on the same address.
    pub async fn up(&mut self) -> io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let (name, root) = (self.name.clone(), self.root.clone());
        let task = tokio::spawn(accept_loop(listener, name, root, stopped));
        self.running = Some((stop, task));
        Ok(())
    }

    /// Stops listening and closes every session.
    pub async fn down(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    name: String,
    root: PathBuf,
    mut stopped: watch::Receiver<bool>,
) {
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                if let Ok((stream, _)) = r {
                    let (name, root, stopped) = (name.clone(), root.clone(), stopped.clone());
                    sessions.spawn(async move {
                        let mut stopped = stopped;
                        tokio::select! {
                            r = session(stream, &name, &root) => {
                                if let Err(e) = r {
                                    tracing::debug!(server = %name, error = %e, "sink session ended");
                                }
                            }
                            _ = stopped.changed() => {}
                        }
                    });
                }
            }
            _ = stopped.changed() => break,
        }
    }
    // Dropping the listener refuses new connections; close the open ones too.
    drop(listener);
    sessions.abort_all();
    while sessions.join_next().await.is_some() {}
}

/// Reads one line (CRLF or LF ended) into `line`; false at end of stream.
async fn read_line(r: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> io::Result<bool> {
    line.clear();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', line)
        .await?;
    Ok(n > 0)
}

async fn session(stream: TcpStream, name: &str, root: &Path) -> io::Result<()> {
    let mut r = BufReader::new(stream);
    let mut line = Vec::new();
    let mut recipients: Vec<String> = Vec::new();
    let mut sender: Option<String> = None;
    reply(
        &mut r,
        &format!("220 {name} ESMTP clustermail demo mailbox server"),
    )
    .await?;
    while read_line(&mut r, &mut line).await? {
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let verb = text
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let answer = match verb.as_str() {
            "EHLO" => format!("250-{name}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 PIPELINING"),
            "HELO" => format!("250 {name}"),
            "MAIL" => {
                sender = Some(angle(&text));
                recipients.clear();
                "250 2.1.0 Ok".into()
            }
            "RCPT" if sender.is_some() => {
                recipients.push(angle(&text).to_lowercase());
                "250 2.1.5 Ok".into()
            }
            "RCPT" => "503 5.5.1 MAIL first".into(),
            "DATA" if recipients.is_empty() => "503 5.5.1 RCPT first".into(),
            "DATA" => {
                reply(&mut r, "354 End data with <CR><LF>.<CR><LF>").await?;
                let message = read_data(&mut r, &mut line).await?;
                let answer = match message {
                    None => "552 5.3.4 Message too big".to_string(),
                    Some(m) => match store(root, &recipients, &m) {
                        Ok(()) => {
                            tracing::debug!(server = %name, rcpts = recipients.len(), "sink stored a message");
                            format!("250 2.0.0 Ok: stored in Maildir by {name}")
                        }
                        Err(e) => format!("451 4.3.0 Maildir write failed: {e}"),
                    },
                };
                sender = None;
                recipients.clear();
                answer
            }
            "RSET" => {
                sender = None;
                recipients.clear();
                "250 2.0.0 Ok".into()
            }
            "NOOP" => "250 2.0.0 Ok".into(),
            "QUIT" => {
                reply(&mut r, "221 2.0.0 Bye").await?;
                return Ok(());
            }
            _ => "502 5.5.2 Command not recognised".into(),
        };
        reply(&mut r, &answer).await?;
    }
    Ok(())
}

async fn reply(r: &mut BufReader<TcpStream>, text: &str) -> io::Result<()> {
    let s = r.get_mut();
    s.write_all(text.as_bytes()).await?;
    s.write_all(b"\r\n").await?;
    s.flush().await
}

/// The address between the first `<` and the following `>`.
fn angle(line: &str) -> String {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(a, _)| a.to_string())
        .unwrap_or_default()
}

/// Reads message lines up to the lone dot, undoing dot-stuffing. `None`: too big
/// (the rest is still read, so the session stays in step).
async fn read_data(
    r: &mut BufReader<TcpStream>,
    line: &mut Vec<u8>,
) -> io::Result<Option<Vec<u8>>> {
    let mut message = Vec::new();
    let mut too_big = false;
    loop {
        if !read_line(r, line).await? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in DATA",
            ));
        }
        if line.as_slice() == b".\r\n" || line.as_slice() == b".\n" {
            return Ok((!too_big).then_some(message));
        }
        let content = line.strip_prefix(b".").unwrap_or(line);
        if message.len() + content.len() > MAX_MESSAGE {
            too_big = true;
        } else {
            message.extend_from_slice(content);
        }
    }
}

/// A recipient's Maildir folder name: the address, with path separators replaced.
pub fn folder(recipient: &str) -> String {
    recipient
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c == '\0' {
                '_'
            } else {
                c
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

fn store(root: &Path, recipients: &[String], message: &[u8]) -> io::Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    for rcpt in recipients {
        let dir = root.join(folder(rcpt));
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let unique = format!(
            "{}.M{}P{}Q{}.clustermail-demo",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = dir.join("tmp").join(&unique);
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(message)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join("new").join(&unique))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_cannot_escape_the_root() {
        assert_eq!(folder("a@b.test"), "a@b.test");
        assert_eq!(folder("../../etc@x"), "_.._etc@x");
        assert_eq!(folder("a/b@c"), "a_b@c");
    }

    #[test]
    fn angle_addresses() {
        assert_eq!(angle("MAIL FROM:<a@b> SIZE=10"), "a@b");
        assert_eq!(angle("MAIL FROM:<>"), "");
        assert_eq!(angle("RCPT TO:x"), "");
    }
}
